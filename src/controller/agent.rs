//! The agent inside the controller VM (`nix-winvm-builder agent`): Samba up, wait for the
//! guest's SSH, run the command, stream its output into the exchange directory, record its
//! exit code. Blocking code: it is the only thing running in that VM.

use super::{samba, unpack, AgentConfig, EXIT_FILE, OUTPUT_LOG, WAITING_DONE};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::vm::wait::{wait_until_blocking, Deadline, WaitError};

pub const SMBD_READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub enum AgentError {
    Config(String),
    Smbd(String),
    SshWait {
        addr: String,
        after: Duration,
    },
    /// smbd ended while the guest's command still needed the shares.
    SmbdDied {
        status: String,
    },
    Ssh {
        step: &'static str,
        detail: String,
    },
    Io(String),
    Outputs(unpack::UnpackError),
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::Config(e) => write!(f, "agent configuration: {e}"),
            AgentError::Smbd(e) => write!(f, "smbd: {e}"),
            AgentError::SshWait { addr, after } => {
                write!(f, "the guest's SSH server at {addr} did not answer within {} s", after.as_secs())
            }
            AgentError::Ssh { step, detail } => write!(f, "SSH to the guest failed while {step}: {detail}"),
            AgentError::SmbdDied { status } => write!(
                f,
                "smbd in the controller ended ({status}) during the command: the guest lost the store and exchange shares, so the command was stopped"
            ),
            AgentError::Io(e) => write!(f, "{e}"),
            AgentError::Outputs(e) => write!(f, "unpacking the build's outputs: {e}"),
        }
    }
}

impl std::error::Error for AgentError {}

/// Appends progress and the command's output to the exchange directory's output log, which
/// the host streams into the build log.
struct Log(File);

impl Log {
    fn line(&mut self, msg: &str) {
        // The controller's own uptime: where its boot time goes, in the build log.
        let uptime =
            std::fs::read_to_string("/proc/uptime").ok().and_then(|u| u.split_whitespace().next().map(String::from));
        let _ = writeln!(self.0, "nix-winvm: [controller {} s] {msg}", uptime.unwrap_or_else(|| "?".into()));
        let _ = self.0.flush();
    }
}

struct SmbdGuard(Child);

impl Drop for SmbdGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn main(config_path: &Path, host_now: Option<u64>) -> Result<i32, AgentError> {
    let started = Instant::now();
    let clock = move || match host_now {
        Some(secs) => std::time::UNIX_EPOCH + Duration::from_secs(secs) + started.elapsed(),
        None => std::time::SystemTime::now(),
    };
    let text = std::fs::read_to_string(config_path)
        .map_err(|e| AgentError::Config(format!("cannot read {}: {e}", config_path.display())))?;
    let cfg: AgentConfig = serde_json::from_str(&text).map_err(|e| AgentError::Config(e.to_string()))?;
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.xchg.join(OUTPUT_LOG))
        .map_err(|e| AgentError::Io(format!("cannot open the output log: {e}")))?;
    let mut log = Log(log_file);
    let result = run(&cfg, &mut log, &clock);
    let verdict = match &result {
        Ok(Verdict::Exited(code)) => code.to_string(),
        Ok(Verdict::Signal(sig)) => format!("signal {sig}"),
        Err(e) => {
            log.line(&format!("controller: {e}"));
            format!("error {e}")
        }
    };
    // Written last and renamed into place, so the host never reads half a verdict.
    let tmp = cfg.xchg.join(format!("{EXIT_FILE}.tmp"));
    std::fs::write(&tmp, format!("{verdict}\n"))
        .and_then(|_| std::fs::rename(&tmp, cfg.xchg.join(EXIT_FILE)))
        .map_err(|e| AgentError::Io(format!("cannot write the exit code: {e}")))?;
    result.map(|_| 0)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Exited(i32),
    Signal(String),
}

fn run(cfg: &AgentConfig, log: &mut Log, clock: &dyn Fn() -> std::time::SystemTime) -> Result<Verdict, AgentError> {
    log.line("agent started");
    let smbd = start_smbd(cfg)?;
    log.line("controller: smbd up");
    let addr: SocketAddr = cfg.guest_addr.parse().map_err(|e| AgentError::Config(format!("guestAddr: {e}")))?;
    // As long as the image's (or the build's) own time-out: a Windows guest booted cold under
    // TCG takes many minutes to answer.
    let timeout = Duration::from_secs(cfg.ssh_timeout_secs);
    let tcp = wait_for_ssh(addr, timeout)?;
    log.line("guest SSH answered");
    File::create(cfg.xchg.join(WAITING_DONE))
        .map_err(|e| AgentError::Io(format!("cannot create {WAITING_DONE}: {e}")))?;
    // smbd must outlive the command: if it ends, the guest's file access hangs or fails, so
    // the watch cuts the SSH connection and the loss is reported instead of a hang.
    let watch = SmbdWatch::start(smbd, &tcp, cfg.kill_smbd_after_secs.map(Duration::from_secs))?;
    let result = run_command(tcp, cfg, log, clock);
    if let Some(status) = watch.stop() {
        log.line(&format!("controller: smbd ended ({status}) during the command"));
        return Err(AgentError::SmbdDied { status });
    }
    let verdict = result?;
    // A failed build's outputs are discarded by Nix: the guest packs them only on success.
    if verdict == Verdict::Exited(0) && !cfg.outputs.is_empty() {
        unpack_outputs(cfg, log)?;
    }
    Ok(verdict)
}

/// Watches smbd while the command runs; see [`run`].
struct SmbdWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(SmbdGuard, Option<String>)>,
}

impl SmbdWatch {
    fn start(mut smbd: SmbdGuard, tcp: &TcpStream, kill_after: Option<Duration>) -> Result<SmbdWatch, AgentError> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let cut = tcp.try_clone().map_err(|e| AgentError::Io(format!("cannot watch smbd: {e}")))?;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                if kill_after.is_some_and(|after| started.elapsed() >= after) {
                    let _ = smbd.0.kill();
                }
                if let Ok(Some(status)) = smbd.0.try_wait() {
                    let _ = cut.shutdown(std::net::Shutdown::Both);
                    return (smbd, Some(describe(status)));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (smbd, None)
        });
        Ok(SmbdWatch { stop, thread })
    }

    /// Ends the watch; smbd's end status if it ended during the command. smbd itself is
    /// stopped when the returned guard is dropped, here.
    fn stop(self) -> Option<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match self.thread.join() {
            Ok((_guard, died)) => died,
            Err(_) => Some("its watch failed".into()),
        }
    }
}

/// "exit status 1", "signal 9 (SIGKILL)".
fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(9)) => "killed by signal 9".to_owned(),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// The guest's archive of the outputs, unpacked into the real output paths through the
/// store's 9p export, with its links, exec bits and empty folders.
fn unpack_outputs(cfg: &AgentConfig, log: &mut Log) -> Result<(), AgentError> {
    let path = cfg.xchg.join(unpack::ARCHIVE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Nix names each missing output itself.
            log.line("outputs: the command made none of them");
            return Ok(());
        }
        Err(e) => return Err(AgentError::Io(format!("cannot open {}: {e}", path.display()))),
    };
    let archive_bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    let started = Instant::now();
    let done = unpack::unpack(file, &cfg.outputs).map_err(AgentError::Outputs)?;
    let secs = started.elapsed().as_secs_f64();
    log.line(&format!(
        "outputs: {} of {} paths, {} entries, {} unpacked in {secs:.1} s ({}/s; archive {})",
        done.paths,
        cfg.outputs.len(),
        done.entries,
        size(done.bytes as f64),
        size(done.bytes as f64 / secs.max(0.001)),
        size(archive_bytes as f64),
    ));
    // Unpacked, the archive is only a second copy in the build folder.
    let _ = std::fs::remove_file(&path);
    Ok(())
}

fn start_smbd(cfg: &AgentConfig) -> Result<SmbdGuard, AgentError> {
    let conf = samba::write_config(&cfg.shares, &cfg.run_dir).map_err(|e| AgentError::Smbd(e.to_string()))?;
    let log = File::create(cfg.xchg.join("smbd.log")).map_err(|e| AgentError::Smbd(e.to_string()))?;
    let log2 = log.try_clone().map_err(|e| AgentError::Smbd(e.to_string()))?;
    let child = Command::new(&cfg.smbd)
        .arg("--foreground")
        .arg("--no-process-group")
        .arg(format!("--configfile={}", conf.display()))
        .arg("--debug-stdout")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| AgentError::Smbd(format!("cannot start {}: {e}", cfg.smbd.display())))?;
    let mut guard = SmbdGuard(child);
    let smb: SocketAddr = ([127, 0, 0, 1], 445).into();
    let deadline = Deadline::new("smbd to listen on port 445", SMBD_READY_TIMEOUT).every(Duration::from_millis(50));
    let listening = wait_until_blocking(&deadline, || {
        if TcpStream::connect_timeout(&smb, Duration::from_millis(200)).is_ok() {
            return Ok(Some(()));
        }
        match guard.0.try_wait() {
            Ok(Some(status)) => Err(status),
            _ => Ok(None),
        }
    });
    match listening {
        Ok(()) => Ok(guard),
        Err(WaitError::Failed(status)) => {
            let tail = std::fs::read_to_string(cfg.xchg.join("smbd.log")).unwrap_or_default();
            Err(AgentError::Smbd(format!("exited with {status} before listening: {}", tail.trim())))
        }
        Err(WaitError::TimedOut(t)) => Err(AgentError::Smbd(t.to_string())),
    }
}

/// Ready means the server sent its SSH banner, not merely that the port accepted.
fn wait_for_ssh(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, AgentError> {
    let deadline = Deadline::new(format!("the SSH banner of {addr}"), timeout).every(Duration::from_millis(100));
    let banner = wait_until_blocking(&deadline, || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1).min(deadline.remaining())) else {
            return Ok::<_, ()>(None);
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut banner = [0u8; 4];
        if s.peek(&mut banner).map(|n| n == 4 && &banner == b"SSH-").unwrap_or(false) {
            let _ = s.set_read_timeout(None);
            return Ok(Some(s));
        }
        // Dropbear starts slowly on a cold TCG guest: a closed connection means try again.
        let _ = s.read(&mut banner);
        Ok(None)
    });
    banner.map_err(|_| AgentError::SshWait { addr: addr.to_string(), after: deadline.elapsed() })
}

/// A session over `tcp`, its handshake done within `deadline` (which stays the session's
/// time-out for each blocking call until the caller changes it).
fn handshake(tcp: TcpStream, deadline: Duration) -> Result<ssh2::Session, AgentError> {
    let mut session = ssh2::Session::new().map_err(step_err("creating a session", deadline))?;
    session.set_tcp_stream(tcp);
    session.set_timeout(deadline.as_millis() as u32);
    session.handshake().map_err(step_err("handshaking", deadline))?;
    Ok(session)
}

/// Each SSH step before the command runs (handshake, authentication, channel, exec) has this
/// deadline of its own; the command's output is then read for as long as the build's own
/// time-out, kept by the host, allows.
pub const SSH_STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// libssh2's LIBSSH2_ERROR_TIMEOUT: a blocking call hit the session's time-out.
const LIBSSH2_ERROR_TIMEOUT: i32 = -9;

fn ssh_err(step: &'static str) -> impl FnOnce(ssh2::Error) -> AgentError {
    step_err(step, SSH_STEP_TIMEOUT)
}

fn step_err(step: &'static str, deadline: Duration) -> impl FnOnce(ssh2::Error) -> AgentError {
    move |e| {
        let detail = if e.code() == ssh2::ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT) {
            format!("the guest did not answer within {} s", deadline.as_secs_f64())
        } else {
            e.to_string()
        };
        AgentError::Ssh { step, detail }
    }
}

fn run_command(
    tcp: TcpStream,
    cfg: &AgentConfig,
    log: &mut Log,
    clock: &dyn Fn() -> std::time::SystemTime,
) -> Result<Verdict, AgentError> {
    let session = handshake(tcp, SSH_STEP_TIMEOUT)?;
    session
        .userauth_pubkey_file(&cfg.user, None, &cfg.key_file, None)
        .map_err(ssh_err("authenticating with the image's key"))?;
    let mut channel = session.channel_session().map_err(ssh_err("opening a channel"))?;
    // One stream in order: the build log wants stdout and stderr as they interleave.
    channel.handle_extended_data(ssh2::ExtendedData::Merge).map_err(ssh_err("merging stderr"))?;
    let command = if cfg.set_clock { format!("{}{}", clock_prefix(clock()), cfg.command) } else { cfg.command.clone() };
    if let Some(terminal) = &cfg.terminal {
        return run_on_terminal(&session, channel, terminal, &command, log);
    }
    channel.exec(&command).map_err(ssh_err("starting the command"))?;
    // A build may run silent for long: no deadline per read (0 = none).
    session.set_timeout(0);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n =
            channel.read(&mut buf).map_err(|e| AgentError::Ssh { step: "reading output", detail: e.to_string() })?;
        if n == 0 {
            break;
        }
        log.0.write_all(&buf[..n]).map_err(|e| AgentError::Io(format!("writing the output log: {e}")))?;
        let _ = log.0.flush();
    }
    channel.wait_close().map_err(ssh_err("closing the channel"))?;
    if let Some(signal) = channel.exit_signal().map_err(ssh_err("reading the exit signal"))?.exit_signal {
        return Ok(Verdict::Signal(signal));
    }
    let code = channel.exit_status().map_err(ssh_err("reading the exit status"))?;
    Ok(Verdict::Exited(code))
}

/// An interactive login: the command on a pty in the guest, its bytes relayed both ways
/// between the SSH channel and the session port, which the host joins to its terminal.
fn run_on_terminal(
    session: &ssh2::Session,
    mut channel: ssh2::Channel,
    terminal: &super::TerminalRequest,
    command: &str,
    log: &mut Log,
) -> Result<Verdict, AgentError> {
    use std::os::fd::AsFd;
    let io_err = |what: &str| {
        let what = what.to_owned();
        move |e: std::io::Error| AgentError::Io(format!("{what} {}: {e}", super::SESSION_PORT))
    };
    let mut port =
        OpenOptions::new().read(true).write(true).open(super::SESSION_PORT).map_err(io_err("cannot open"))?;
    let _raw = crate::vm::sys::tty::RawMode::enter(port.as_fd(), false).map_err(io_err("cannot make raw"))?;
    let size = Some((terminal.cols, terminal.rows, 0, 0));
    channel.request_pty(&terminal.term, None, size).map_err(ssh_err("asking for a pty"))?;
    channel.exec(command).map_err(ssh_err("starting the login"))?;
    log.line("terminal: the login is relayed through the session port");
    // Both directions in one loop: libssh2 lets only one thread use a session.
    session.set_blocking(false);
    let relayed = relay(&mut channel, &mut port);
    session.set_blocking(true);
    session.set_timeout(SSH_STEP_TIMEOUT.as_millis() as u32);
    relayed?;
    channel.wait_close().map_err(ssh_err("closing the channel"))?;
    if let Some(signal) = channel.exit_signal().map_err(ssh_err("reading the exit signal"))?.exit_signal {
        return Ok(Verdict::Signal(signal));
    }
    Ok(Verdict::Exited(channel.exit_status().map_err(ssh_err("reading the exit status"))?))
}

/// How long the relay sleeps when neither side has anything.
const RELAY_POLL: Duration = Duration::from_millis(20);

fn relay(channel: &mut ssh2::Channel, port: &mut File) -> Result<(), AgentError> {
    use std::io::ErrorKind::{Interrupted, WouldBlock};
    use std::os::fd::AsFd;
    let ssh_io = |step: &'static str| move |e: std::io::Error| AgentError::Ssh { step, detail: e.to_string() };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let ready = match crate::vm::sys::wait_readable(&[port.as_fd()], Some(RELAY_POLL)) {
            Ok(r) => r,
            Err(e) if e.kind() == Interrupted => continue,
            Err(e) => return Err(AgentError::Io(format!("waiting for the session port: {e}"))),
        };
        if ready[0] {
            let n = port.read(&mut buf).map_err(|e| AgentError::Io(format!("reading the session port: {e}")))?;
            let mut sent = 0;
            while sent < n {
                match channel.write(&buf[sent..n]) {
                    Ok(k) => sent += k,
                    Err(e) if e.kind() == WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                    Err(e) => return Err(ssh_io("sending the terminal's input")(e)),
                }
            }
        }
        loop {
            match channel.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    port.write_all(&buf[..n]).map_err(|e| AgentError::Io(format!("writing the session port: {e}")))?
                }
                Err(e) if e.kind() == WouldBlock => break,
                Err(e) => return Err(ssh_io("reading the login's output")(e)),
            }
        }
        if channel.eof() {
            return Ok(());
        }
    }
}

/// Bytes for people: "3.9 kB", "209.7 MB".
fn size(bytes: f64) -> String {
    if bytes < 1e6 {
        format!("{:.1} kB", bytes / 1e3)
    } else {
        format!("{:.1} MB", bytes / 1e6)
    }
}

/// `date -u -s 'YYYY-MM-DD hh:mm:ss'`: understood by busybox and by Cygwin's GNU date.
pub fn clock_prefix(now: std::time::SystemTime) -> String {
    let secs = now.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "date -u -s '{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}' >/dev/null 2>&1; ",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses the agent's exit file: "N", "signal NAME" or "error MESSAGE".
pub fn parse_exit_file(text: &str) -> Result<Verdict, String> {
    let t = text.trim();
    if let Some(sig) = t.strip_prefix("signal ") {
        return Ok(Verdict::Signal(sig.to_owned()));
    }
    if let Some(e) = t.strip_prefix("error ") {
        return Err(e.to_owned());
    }
    t.parse::<i32>().map(Verdict::Exited).map_err(|_| format!("unreadable exit file: {t:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_prefix_is_utc_civil_time() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(clock_prefix(t), "date -u -s '2026-11-18 11:06:40' >/dev/null 2>&1; ");
        assert_eq!(
            clock_prefix(std::time::UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "date -u -s '2000-02-29 00:00:00' >/dev/null 2>&1; "
        );
    }

    #[test]
    fn a_guest_that_accepts_but_never_answers_fails_the_handshake_in_time() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and holds the connection, never sending SSH's banner.
        let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let tcp = TcpStream::connect(addr).unwrap();
        let start = Instant::now();
        let e = handshake(tcp, Duration::from_millis(500)).err().expect("a time-out");
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
        assert_eq!(e.to_string(), "SSH to the guest failed while handshaking: the guest did not answer within 0.5 s");
        drop(held.join());
    }

    #[test]
    fn exit_file_forms() {
        assert_eq!(parse_exit_file("42\n"), Ok(Verdict::Exited(42)));
        assert_eq!(parse_exit_file("signal KILL"), Ok(Verdict::Signal("KILL".into())));
        assert_eq!(parse_exit_file("error smbd: boom"), Err("smbd: boom".into()));
        assert!(parse_exit_file("").is_err());
    }
}
