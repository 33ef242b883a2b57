//! The host's end of an interactive login: stdin and stdout joined to the controller's session
//! port, whose other end the agent relays to a pty in the guest. From the login's first byte the
//! terminal is in raw mode, so Ctrl-C, line editing and the like are the guest pty's business;
//! before it, Ctrl-C stops the session as usual.

use crate::vm::sys::tty::{self, RawMode};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the input thread looks whether it should stop.
const INPUT_POLL: Duration = Duration::from_millis(100);

/// A running relay. Dropping it stops both directions, joins their threads and gives the
/// terminal its settings back.
pub(super) struct Relay {
    stop: Arc<AtomicBool>,
    port: UnixStream,
    threads: Vec<JoinHandle<()>>,
    /// Raw from the login's first byte on: until then Ctrl-C still stops the session.
    raw: Arc<Mutex<Option<RawMode>>>,
}

/// The terminal's type and size, as the guest's pty should have them; a plain default
/// without a terminal.
pub fn terminal_request() -> crate::protocol::TerminalRequest {
    let stdin = std::io::stdin();
    let (cols, rows) = tty::window_size(stdin.as_fd()).unwrap_or((80, 24));
    let term = std::env::var("TERM").ok().filter(|t| !t.is_empty()).unwrap_or_else(|| "xterm".into());
    crate::protocol::TerminalRequest { term, cols, rows }
}

pub(super) fn start(port: tokio::net::UnixStream) -> std::io::Result<Relay> {
    let port = port.into_std()?;
    port.set_nonblocking(false)?;
    let raw = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let mut to_guest = port.try_clone()?;
    let mut from_guest = port.try_clone()?;
    let stopped = stop.clone();
    let input = std::thread::spawn(move || {
        let stdin = std::io::stdin();
        // Larger than Stdin's own buffer, so reads bypass it: bytes kept there would be
        // invisible to the poll below.
        let mut buf = vec![0u8; 64 * 1024];
        while !stopped.load(Ordering::Relaxed) {
            match crate::vm::sys::wait_readable(&[stdin.as_fd()], Some(INPUT_POLL)) {
                Ok(ready) if ready[0] => {}
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
            match stdin.lock().read(&mut buf) {
                // The end of the input (a pipe): the login ends when its shell reads it too.
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to_guest.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let raw_from_now = raw.clone();
    let output = std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        let mut stdout = std::io::stdout();
        while let Ok(n) = from_guest.read(&mut buf) {
            if n == 0 {
                return;
            }
            if let Ok(mut raw) = raw_from_now.lock() {
                let stdin = std::io::stdin();
                if raw.is_none() && tty::is_terminal(stdin.as_fd()) {
                    *raw = RawMode::enter(stdin.as_fd(), true).ok();
                }
            }
            if stdout.write_all(&buf[..n]).and_then(|_| stdout.flush()).is_err() {
                return;
            }
        }
    });
    Ok(Relay { stop, port, threads: vec![input, output], raw })
}

/// The login joined to the first connection on a unix socket at `path` (made here), instead of
/// this terminal: a test driver's channel to its node. The socket is listened on until a
/// client comes or the relay is dropped; one client only, as a terminal has one user.
pub(super) fn start_socket(port: tokio::net::UnixStream, path: &Path) -> std::io::Result<Relay> {
    let port = port.into_std()?;
    port.set_nonblocking(false)?;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let to_guest = port.try_clone()?;
    let mut from_guest = port.try_clone()?;
    let stopped = stop.clone();
    let joined = std::thread::spawn(move || {
        let client = loop {
            if stopped.load(Ordering::Relaxed) {
                return;
            }
            match listener.accept() {
                Ok((client, _)) => break client,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(INPUT_POLL / 10),
                Err(_) => return,
            }
        };
        if client.set_nonblocking(false).is_err() {
            return;
        }
        let (Ok(mut client_in), Ok(mut client_out)) = (client.try_clone(), client.try_clone()) else { return };
        let mut to_guest = to_guest;
        // The client's bytes to the guest on a thread of its own; the guest's to the client here.
        let input = std::thread::spawn(move || {
            let _ = std::io::copy(&mut client_in, &mut to_guest);
        });
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = from_guest.read(&mut buf) {
            if n == 0 || client_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = client.shutdown(std::net::Shutdown::Both);
        let _ = input.join();
    });
    Ok(Relay { stop, port, threads: vec![joined], raw: Arc::new(Mutex::new(None)) })
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Ends the output thread's read; QEMU sees the session port closed.
        let _ = self.port.shutdown(std::net::Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Ok(mut raw) = self.raw.lock() {
            raw.take();
        }
    }
}
