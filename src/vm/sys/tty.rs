//! Terminals: raw mode for a relayed byte stream (the host's terminal while a shell in the
//! guest runs; the controller's serial port that carries it), and a terminal's window size.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

/// A terminal switched to raw mode (no echo, no line editing, no signals from Ctrl-C: every
/// byte goes through); its previous settings come back when this is dropped.
pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    /// `fd` must stay open while the guard lives (the caller's stdin, an open port). With
    /// `keep_newlines`, output still turns "\n" into "\r\n", so that the caller's own log lines
    /// stay readable between the relayed bytes.
    pub fn enter(fd: BorrowedFd<'_>, keep_newlines: bool) -> std::io::Result<RawMode> {
        let fd = fd.as_raw_fd();
        // SAFETY: a zeroed termios is a valid value for tcgetattr to fill in; `fd` is borrowed,
        // so it is open during the call.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: `raw` is an initialised termios; cfmakeraw only changes its flags.
        unsafe { libc::cfmakeraw(&mut raw) };
        if keep_newlines {
            raw.c_oflag |= libc::OPOST | libc::ONLCR;
        }
        // SAFETY: as for tcgetattr; `raw` is a complete termios taken from this terminal.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: the settings read from this descriptor at `enter`; a descriptor closed
        // meanwhile only makes the call fail, which changes nothing.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: isatty only inspects the borrowed, open descriptor.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
}

/// The window size of the terminal on `fd` (columns, rows), if it has one.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u32, u32)> {
    // SAFETY: a zeroed winsize is valid; TIOCGWINSZ writes one winsize into it.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col as u32, ws.ws_row as u32))
}
