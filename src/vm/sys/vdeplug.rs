//! A plug into a VDE switch through libvdeplug: the builder's own port on the switch its VMs
//! use, proving the switch ready and capturing its traffic (src/vm/vde.rs).

use std::ffi::CString;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::NonNull;

#[allow(non_camel_case_types, non_upper_case_globals, dead_code, clippy::upper_case_acronyms)]
mod raw {
    include!(concat!(env!("OUT_DIR"), "/vdeplug.rs"));
}

/// One connection to a switch, closed when dropped.
pub struct Plug {
    conn: NonNull<raw::VDECONN>,
}

// SAFETY: a VDECONN is a heap object with its two sockets and no tie to the thread that opened
// it; `Plug` gives it to one thread at a time (`recv` takes `&mut self`).
unsafe impl Send for Plug {}

impl Plug {
    /// Plugs into the switch whose control folder is `ctl` (vde_switch's `-s`), on any free
    /// port. `description` shows in the switch's port list. Fails at once while the switch is
    /// not listening yet.
    pub fn open(ctl: &Path, description: &str) -> io::Result<Plug> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} holds a NUL byte"));
        // Mutable copies: the C prototype takes `char *`.
        let mut url = CString::new(ctl.as_os_str().as_bytes()).map_err(|_| invalid("the path"))?.into_bytes_with_nul();
        let mut descr = CString::new(description).map_err(|_| invalid("the description"))?.into_bytes_with_nul();
        // The mode of this end's socket, which the switch must be able to use: 0 would leave
        // it to a switch running as root alone (QEMU passes 0700 too).
        let mut args = raw::vde_open_args { port: 0, group: std::ptr::null_mut(), mode: 0o700 };
        // SAFETY: the url and the description are NUL-terminated buffers we own for the whole
        // call, `args` is a live struct (any port, no group, mode 0700); libvdeplug keeps
        // none of these pointers. It returns a connection we then own, or NULL with errno set.
        let conn = unsafe {
            raw::vde_open_real(
                url.as_mut_ptr().cast(),
                descr.as_mut_ptr().cast(),
                raw::LIBVDEPLUG_INTERFACE_VERSION as i32,
                &mut args,
            )
        };
        match NonNull::new(conn) {
            Some(conn) => Ok(Plug { conn }),
            None => {
                let e = io::Error::last_os_error();
                // libvdeplug may fail without setting errno.
                Err(if e.raw_os_error() == Some(0) { io::Error::other("libvdeplug could not connect") } else { e })
            }
        }
    }

    /// Readable when a frame is waiting for [`Plug::recv`].
    pub fn data_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the connection is open while `self` lives, and so is its data socket, which
        // the borrow cannot outlive.
        unsafe { BorrowedFd::borrow_raw(raw::vde_datafd(self.conn.as_ptr())) }
    }

    /// Silent after the handshake; readable (at its end) once the switch has gone.
    pub fn ctl_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: as for `data_fd`: the control socket lives as long as the connection.
        unsafe { BorrowedFd::borrow_raw(raw::vde_ctlfd(self.conn.as_ptr())) }
    }

    /// One frame into `buf`; its length (0 when the switch sent nothing usable).
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is ours, writable for `buf.len()` bytes, and libvdeplug writes at most
        // that many; the connection is open.
        let n = unsafe { raw::vde_recv(self.conn.as_ptr(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Sends one frame into the switch (a test's forwarder between nodes, the capture's tests).
    pub fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: `frame` is readable for its length, which libvdeplug reads no further than;
        // the connection is open.
        let n = unsafe { raw::vde_send(self.conn.as_ptr(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Drop for Plug {
    fn drop(&mut self) {
        // SAFETY: the connection came from vde_open_real and is closed once, here; no borrow of
        // its descriptors outlives `self`.
        unsafe {
            raw::vde_close(self.conn.as_ptr());
        }
    }
}
