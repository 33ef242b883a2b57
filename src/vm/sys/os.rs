//! The crate's plain system calls (through libc), each wrapped once, safely: processes and
//! their groups, pipes and descriptor passing, mounts, power, file-system space and read-ahead.
//! The rest of the crate calls these and holds no `unsafe` of its own.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{}: {e}", path.display())))
}

/// The child of `cmd` gets SIGKILL when this process dies (Nix cancelling a build with
/// SIGKILL ends QEMU with it).
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `signal` to the process group `pgid` (at worst ESRCH for a group that is gone).
pub fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: killpg only sends a signal; it takes no pointers.
    unsafe {
        libc::killpg(pgid, signal);
    }
}

/// Waits for this process's own child `pid` to end (it has just been killed).
pub fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: `status` is a local the call writes; blocking is brief for a killed child.
    unsafe {
        libc::waitpid(pid, &mut status, 0);
    }
}

/// A pipe, both ends close-on-exec: (read, write).
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own; on success each is open and
    // ours alone, so OwnedFd may take it.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}

/// Sends `bytes` on the unix socket `socket` with `fd` attached (SCM_RIGHTS); returns how many
/// bytes went out. Never blocks: a full socket is `WouldBlock`.
pub fn send_with_fd(socket: &impl AsRawFd, bytes: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<usize> {
    let raw = fd.as_raw_fd();
    // SAFETY: every pointer handed to sendmsg points into locals that outlive the call: the
    // iovec into `bytes`, the control buffer sized by CMSG_SPACE for one descriptor, which
    // CMSG_FIRSTHDR/CMSG_DATA address inside that buffer. The kernel only reads them.
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) as usize;
        let mut control = vec![0u8; space];
        let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
        std::ptr::copy_nonoverlapping(
            &raw as *const i32 as *const u8,
            libc::CMSG_DATA(cmsg),
            std::mem::size_of::<i32>(),
        );
        let n = libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT);
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Whether nobody reads this process's stderr any more: the pipe's reader closed (POLLERR) or
/// the terminal hung up (POLLHUP). Never blocks.
pub fn stderr_hung_up() -> bool {
    let mut fd = libc::pollfd { fd: libc::STDERR_FILENO, events: 0, revents: 0 };
    // SAFETY: one pollfd that lives through the call; a zero time-out never blocks.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n == 1 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

/// Waits until the descriptor `fd`, which the caller keeps open meanwhile (a socket a library
/// owns, e.g. an SSH session's), is readable or `timeout` passes.
pub fn wait_raw_readable(fd: RawFd, timeout: Duration) -> std::io::Result<bool> {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one pollfd that lives through the call; poll only reads `fd`'s state (a closed
    // descriptor is POLLNVAL, not undefined behaviour).
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n == 1)
}

/// mount(2): `source` of type `fstype` at `target`, with `options` (the file system's data).
pub fn mount(source: &str, target: &Path, fstype: &str, options: &str) -> std::io::Result<()> {
    let invalid = |e: std::ffi::NulError| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let (source, fstype, options) = (
        CString::new(source).map_err(invalid)?,
        CString::new(fstype).map_err(invalid)?,
        CString::new(options).map_err(invalid)?,
    );
    let target = c_path(target)?;
    // SAFETY: every pointer is a valid C string that outlives the call.
    let r = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, options.as_ptr().cast()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// umount(2) of `target`; a busy one is `EBUSY` (`raw_os_error`), for the caller to retry.
pub fn umount(target: &Path) -> std::io::Result<()> {
    let target = c_path(target)?;
    // SAFETY: a valid C string that outlives the call.
    if unsafe { libc::umount(target.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes the file systems' buffers out and powers the machine off (the controller VM's end).
pub fn power_off() {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
}

/// Free bytes on the file system of `path`, for an unprivileged writer.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let c = c_path(path).ok()?;
    // SAFETY: statvfs is plain data, valid when zeroed, and the call fills it in from a valid
    // C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (r == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Asks the kernel to start reading `file` into the page cache now (advice only).
pub fn read_ahead(file: &std::fs::File) {
    // SAFETY: a descriptor the caller's File keeps open; the advice takes no pointers.
    let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
}

/// Where `path` is outside this mount namespace (a Nix sandbox binds the build folder, say
/// `/tmp/nix-build-NAME.drv-0`, at `/build`): the folder the mount that holds `path` shows,
/// from `/proc/self/mountinfo`. None when that is `path` itself (no sandbox), or unknown.
/// The folder is given within its file system: right when the host's build folder is on the
/// host's root file system, and relative to its own when it is a file system of its own.
pub fn host_path(path: &Path) -> Option<std::path::PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    host_path_in(&mountinfo, path)
}

fn host_path_in(mountinfo: &str, path: &Path) -> Option<std::path::PathBuf> {
    // `ID PARENT MAJ:MIN ROOT MOUNTPOINT ...`; a later line mounted over an earlier one.
    let (root, point) = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some((unescape_mount_field(f.get(3)?), unescape_mount_field(f.get(4)?)))
        })
        .filter(|(_, point)| path.starts_with(point))
        .fold(None, |best: Option<(String, String)>, (root, point)| match &best {
            Some((_, p)) if Path::new(p).components().count() > Path::new(&point).components().count() => best,
            _ => Some((root, point)),
        })?;
    let host = Path::new(&root).join(path.strip_prefix(&point).ok()?);
    (host != path).then_some(host)
}

/// mountinfo writes space, tab, newline and backslash as `\040`-style octal escapes.
fn unescape_mount_field(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the next data (`hole` false: SEEK_DATA) or hole (true: SEEK_HOLE) of `file` starts at
/// or after `at`; None past the last data (ENXIO) or where the file system cannot say.
pub fn seek_data(file: &std::fs::File, at: u64, hole: bool) -> Option<u64> {
    let whence = if hole { libc::SEEK_HOLE } else { libc::SEEK_DATA };
    // SAFETY: lseek on a descriptor the borrowed file keeps open; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, whence) };
    (r >= 0).then_some(r as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Nix sandbox's mount table, shortened.
    const SANDBOX: &str = "\
2050 2040 254:0 /nix/store/abc-x.drv.chroot/root / rw,relatime - ext4 /dev/vda rw
2051 2050 254:0 /tmp/nix-build-image\\040x.drv-0 /build rw,relatime - ext4 /dev/vda rw
2052 2050 0:5 / /dev rw,nosuid - devtmpfs udev rw
2053 2050 254:0 /nix/store /nix/store ro,relatime - ext4 /dev/vda rw
";

    #[test]
    fn a_sandboxed_path_is_found_where_the_host_keeps_it() {
        let p = Path::new("/build/winvm12/screens/installer-latest.png");
        assert_eq!(
            host_path_in(SANDBOX, p).unwrap(),
            Path::new("/tmp/nix-build-image x.drv-0/winvm12/screens/installer-latest.png")
        );
        // The longest mount point wins, not the last line; a path the host sees as it is: None.
        assert_eq!(host_path_in(SANDBOX, Path::new("/nix/store/q-y/f")), None);
        assert_eq!(
            host_path_in(SANDBOX, Path::new("/buildx/f")).unwrap(),
            Path::new("/nix/store/abc-x.drv.chroot/root/buildx/f")
        );
        let plain = "25 1 254:0 / / rw - ext4 /dev/vda rw\n";
        assert_eq!(host_path_in(plain, Path::new("/tmp/nix-build-a-0/x")), None);
    }
}
