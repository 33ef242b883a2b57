//! The builder's own calls into the kernel and into libvdeplug, through bindings that bindgen
//! makes from the system's headers at build time (build.rs: `<linux/kvm.h>`,
//! `<libvdeplug.h>`). The raw bindings stay private here; each `unsafe` call is wrapped in a
//! safe function that says why it is sound, and the rest of the crate sees only those.

pub mod kvm;
pub mod os;
pub mod tty;
pub mod vdeplug;

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// Waits until one of `fds` is readable, has hung up or failed, or `timeout` passes (`None`:
/// no limit). Returns, per descriptor, whether it is ready. An interrupted wait is
/// `ErrorKind::Interrupted`, for the caller to retry.
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> std::io::Result<Vec<bool>> {
    let mut polled: Vec<libc::pollfd> =
        fds.iter().map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    let ms = timeout.map(|t| t.as_millis().min(i32::MAX as u128) as i32).unwrap_or(-1);
    // SAFETY: `polled` is a live array of `polled.len()` pollfd structs that poll only reads and
    // whose `revents` it writes; the descriptors are borrowed, so they stay open meanwhile.
    let n = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, ms) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(polled
        .iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0)
        .collect())
}
