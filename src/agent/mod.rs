//! The agent inside the controller VM (`nix-winvm-builder agent`): Samba up, wait for the
//! guest's SSH, run the command, stream its output into the exchange directory, record its
//! exit code. Blocking code: it is the only thing running in that VM.

pub mod samba;

use crate::protocol::{
    self, AgentConfig, JobConfig, ReadyConfig, ServeConfig, Verdict, AGENT_CONFIG, EXIT_FILE, OUTPUT_LOG, READY_MARKER,
    READY_XCHG, WAITING_DONE,
};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::vm::sys::os;
use crate::vm::wait::{wait_until_blocking, Deadline, WaitError};

pub const SMBD_READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent configuration: {0}")]
    Config(String),
    #[error("agent configuration: {0}")]
    SessionLine(#[from] protocol::GarbledSessionLine),
    #[error("smbd: {0}")]
    Smbd(String),
    #[error("the guest's SSH server at {addr} did not answer within {} s", after.as_secs())]
    SshWait { addr: String, after: Duration },
    /// smbd ended while the guest's command still needed the shares.
    #[error(
        "smbd in the controller ended ({status}) during the command: the guest lost the store and exchange shares, so the command was stopped"
    )]
    SmbdDied { status: String },
    #[error("SSH to the guest failed while {step}: {detail}")]
    Ssh { step: &'static str, detail: String },
    #[error("{0}")]
    Io(String),
    /// The guest's `prepare` (before a ready controller is saved) did not succeed.
    #[error("the guest's prepare command ended with {verdict:?} (its output is above): {command}")]
    Prepare { command: String, verdict: Verdict },
}

/// Progress and the command's output: into the exchange directory's output log, which the
/// host streams into the build log; before a ready controller's session, onto its console.
struct Log(Box<dyn Write>);

impl Log {
    fn file(path: &Path) -> Result<Log, AgentError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| AgentError::Io(format!("cannot open the output log {}: {e}", path.display())))?;
        Ok(Log(Box::new(file)))
    }

    fn console() -> Log {
        Log(Box::new(std::io::stdout()))
    }

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

/// What [`serve`] sets up and a job uses: smbd, and an SSH session logged on to the guest
/// (with its TCP connection, which the smbd watch cuts if smbd ends).
struct Served {
    smbd: SmbdGuard,
    ssh: ssh2::Session,
    tcp: TcpStream,
    /// A ready controller's: a channel whose login already ran in the guest before the save,
    /// its shell waiting for the command on stdin ([`WAITING_COMMAND`]).
    waiting: Option<ssh2::Channel>,
}

/// What the channel kept open across the save runs in the guest: the login shell runs (the
/// standin's binds its store and exchange folders and mounts the store's overlay; Cygwin's
/// reads its mounts), then says [`LOGIN_DONE`], and a shell waits for the command, which the
/// agent sends on stdin followed by the end of input; the command then runs with stdin at its
/// end, as a build's should.
pub const WAITING_COMMAND: &str = r#"echo winvm-login-done; exec /bin/sh -c "$(cat)""#;

/// The line the waiting login prints once its login shell is done: the agent says it is ready
/// (and the pair may be saved) only after it, so no save catches a login in the middle of its
/// mounts.
pub const LOGIN_DONE: &str = "winvm-login-done";

/// How long a waiting login may take to get there.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(120);

/// The host's clock, as it was at `started` (or the controller's own without one).
fn clock_from(host_now: Option<u64>) -> impl Fn() -> std::time::SystemTime {
    let started = Instant::now();
    move || match host_now {
        Some(secs) => std::time::UNIX_EPOCH + Duration::from_secs(secs) + started.elapsed(),
        None => std::time::SystemTime::now(),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, AgentError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AgentError::Config(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))
}

/// `agent`: a controller booted for this one session (direct runs).
pub fn main(config_path: &Path, host_now: Option<u64>) -> Result<i32, AgentError> {
    let clock = clock_from(host_now);
    let cfg: AgentConfig = read_json(config_path)?;
    let mut log = Log::file(&cfg.job.xchg.join(OUTPUT_LOG))?;
    log.line("agent started");
    let result = serve(&cfg.serve, &mut log)
        .and_then(|served| run_job(served, &cfg.job, &mut log, &clock))
        .map(|(verdict, _)| verdict);
    finish(&cfg.job, result, &mut log)
}

/// `agent-ready`: a controller with a system disk. Serves and logs on to the guest, runs the
/// guest's `prepare`, says [`READY_MARKER`] (the suspend stage saves the pair then), and waits
/// for the session line on `session_port` (after a revive): the host's clock and the build's
/// exports, which it mounts itself. A failure before the line powers the controller off, so
/// the host sees it at once.
pub fn main_ready(config_path: &Path, session_port: &Path) -> Result<i32, AgentError> {
    let mut console = Log::console();
    let mut served = match prepare_ready(config_path, &mut console) {
        Ok(served) => served,
        Err(e) => {
            println!("winvm-controller: the agent failed before the session: {e}");
            power_off();
            return Err(e);
        }
    };
    loop {
        // What the page cache holds of the system disk is read again on demand: dropped, it
        // is not in the saved memory, which every build loads (smbd's and the agent's own
        // pages are mapped, and stay).
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
        println!("{READY_MARKER}");
        let (now, mounts) = read_session(session_port)?;
        let clock = clock_from(Some(now));
        for (tag, at) in &mounts {
            mount_9p(tag, at)?;
            console.line(&format!("mounted the export {tag} at {}", at.display()));
        }
        // The job file is read from the exchange export: first make sure that is what is there.
        check_mounted(Path::new(READY_XCHG), &mounts)?;
        let job: JobConfig = read_json(&Path::new(READY_XCHG).join(AGENT_CONFIG))?;
        let mut log = Log::file(&job.xchg.join(OUTPUT_LOG))?;
        log.line("revived: smbd up and the guest's SSH logon kept since the image was saved");
        let kept = match run_job(served, &job, &mut log, &clock) {
            Ok((Verdict::Exited(0), kept)) if job.ready_again => kept,
            other => return finish(&job, other.map(|(verdict, _)| verdict), &mut log),
        };
        // A layer: the pair is saved again, as the image's was. The verdict first (the host
        // waits for the marker after it), then nothing of this session may stay mounted.
        log.line("the layer's commands succeeded: making ready to serve again");
        served = match wait_again(kept) {
            Ok(served) => served,
            Err(e) => return finish(&job, Err(e), &mut log),
        };
        finish(&job, Ok(Verdict::Exited(0)), &mut log)?;
        drop(log);
        console.line("a new login waits for the next command");
        if let Err(e) = unmount_exports(&mounts) {
            println!("winvm-controller: {e}");
            power_off();
            return Err(e);
        }
        console.line("the layer's exports unmounted");
    }
}

/// A new login that waits for the next session's command (before the save, and again after
/// a layer's commands).
fn wait_again(served: Served) -> Result<Served, AgentError> {
    let mut channel = open_channel(&served.ssh)?;
    channel.exec(WAITING_COMMAND).map_err(ssh_err("starting the login that waits for the command"))?;
    login_done(&served.ssh, &mut channel)?;
    Ok(Served { waiting: Some(channel), ..served })
}

/// Reads the waiting login's output up to its [`LOGIN_DONE`] line. A login that ends first (a
/// mount failed) or takes longer than [`LOGIN_TIMEOUT`] is an error that quotes what it said.
fn login_done(session: &ssh2::Session, channel: &mut ssh2::Channel) -> Result<(), AgentError> {
    let deadline = Instant::now() + LOGIN_TIMEOUT;
    let mut said = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if said_done(&said) {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let quoted = |said: &[u8]| String::from_utf8_lossy(said).trim().to_owned();
        if left.is_zero() {
            return Err(AgentError::Ssh {
                step: "waiting for the guest's login to finish its mounts",
                detail: format!("not done after {} s; it said: {:?}", LOGIN_TIMEOUT.as_secs(), quoted(&said)),
            });
        }
        session.set_timeout(left.as_millis().max(1) as u32);
        let n = channel.read(&mut buf).map_err(|e| AgentError::Ssh {
            step: "waiting for the guest's login to finish its mounts",
            detail: format!("{e}; it said: {:?}", quoted(&said)),
        })?;
        if n == 0 {
            return Err(AgentError::Ssh {
                step: "waiting for the guest's login to finish its mounts",
                detail: format!("the login ended first; it said: {:?}", quoted(&said)),
            });
        }
        said.extend_from_slice(&buf[..n]);
    }
}

/// Whether `said` holds the [`LOGIN_DONE`] line, whole.
fn said_done(said: &[u8]) -> bool {
    said.split(|&b| b == b'\n').rev().skip(1).any(|line| line == LOGIN_DONE.as_bytes())
}

/// How long the exports may stay busy after a layer's commands: the guest's SMB client may
/// keep a file open for a moment after its last use (deferred close), and smbd with it.
pub const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// The session's exports unmounted, so that QEMU lets the controller be saved (a mounted
/// 9p export blocks migration) and the next session mounts its own at the same places.
fn unmount_exports(mounts: &[(String, std::path::PathBuf)]) -> Result<(), AgentError> {
    for (tag, at) in mounts.iter().rev() {
        let deadline = Deadline::new(format!("the export {tag} at {} to unmount", at.display()), UNMOUNT_TIMEOUT)
            .every(Duration::from_millis(100));
        let done = wait_until_blocking(&deadline, || match os::umount(at) {
            Ok(()) => Ok(Some(())),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(None),
            Err(e) => Err(e),
        });
        match done {
            Ok(()) => {}
            Err(WaitError::Failed(e)) => {
                return Err(AgentError::Io(format!("cannot unmount the export {tag} at {}: {e}", at.display())))
            }
            Err(WaitError::TimedOut(t)) => {
                return Err(AgentError::Io(format!("{t}: something in the controller still uses it")))
            }
        }
    }
    Ok(())
}

fn prepare_ready(config_path: &Path, console: &mut Log) -> Result<Served, AgentError> {
    let ready: ReadyConfig = read_json(config_path)?;
    console.line("agent started from the system disk");
    let served = serve(&ready.serve, console)?;
    console.line("preparing the guest (its SMB session stays open while the pair is saved)");
    let verdict = exec(&served.ssh, &ready.prepare, console, "running the guest's prepare command")?;
    if verdict != Verdict::Exited(0) {
        return Err(AgentError::Prepare { command: ready.prepare.clone(), verdict });
    }
    // The build's login, done now: after the revive only the command is left to run.
    let served = wait_again(served)?;
    console.line("a login waits for the build's command");
    Ok(served)
}

/// One line from the session port (a tty in canonical mode: one read, one line).
fn read_session(port: &Path) -> Result<(u64, Vec<(String, std::path::PathBuf)>), AgentError> {
    let io_err = |e: std::io::Error| AgentError::Io(format!("reading the session line from {}: {e}", port.display()));
    let mut file = File::open(port).map_err(io_err)?;
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    while !line.ends_with(b"\n") {
        let n = file.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            return Err(AgentError::Io(format!("{} closed before the session line", port.display())));
        }
        line.extend_from_slice(&buf[..n]);
    }
    Ok(protocol::parse_ready_session_line(&String::from_utf8_lossy(&line))?)
}

/// The host's folder exported as `tag`, mounted at `at` (mount(2) directly: no process to
/// start under TCG).
fn mount_9p(tag: &str, at: &Path) -> Result<(), AgentError> {
    os::mount(tag, at, "9p", protocol::NINEP_OPTIONS)
        .map_err(|e| AgentError::Io(format!("cannot mount the export {tag} at {}: {e}", at.display())))
}

/// Checks that `at` is the mount point of one of `mounts` (which names its export in the
/// error): its device differs from its parent folder's. (statfs cannot tell a 9p export from
/// the disk: 9p2000.L hands on the type of the host's file system.)
fn check_mounted(at: &Path, mounts: &[(String, std::path::PathBuf)]) -> Result<(), AgentError> {
    use std::os::unix::fs::MetadataExt;
    let tag = mounts.iter().find(|(_, m)| m == at).map_or("(none)", |(tag, _)| tag.as_str());
    let parent = at.parent().unwrap_or(Path::new("/"));
    let dev = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.dev())
            .map_err(|e| AgentError::Io(format!("checking the export {tag} at {}: {}: {e}", at.display(), p.display())))
    };
    if dev(at)? == dev(parent)? {
        return Err(AgentError::Io(format!(
            "{} is not a mount point: the export {tag} is not mounted there, so the session's files cannot be read",
            at.display()
        )));
    }
    Ok(())
}

fn power_off() {
    // The controller has nothing left to do.
    os::power_off();
}

/// Records the verdict in the exchange directory: written last and renamed into place, so the
/// host never reads half of it.
fn finish(job: &JobConfig, result: Result<Verdict, AgentError>, log: &mut Log) -> Result<i32, AgentError> {
    let verdict = match &result {
        Ok(Verdict::Exited(code)) => code.to_string(),
        Ok(Verdict::Signal(sig)) => format!("signal {sig}"),
        Err(e) => {
            log.line(&format!("controller: {e}"));
            format!("error {e}")
        }
    };
    let tmp = job.xchg.join(format!("{EXIT_FILE}.tmp"));
    std::fs::write(&tmp, format!("{verdict}\n"))
        .and_then(|_| std::fs::rename(&tmp, job.xchg.join(EXIT_FILE)))
        .map_err(|e| AgentError::Io(format!("cannot write the exit code: {e}")))?;
    result.map(|_| 0)
}

/// smbd up, the guest's SSH answered and logged on to with the image's key.
fn serve(cfg: &ServeConfig, log: &mut Log) -> Result<Served, AgentError> {
    let smbd = start_smbd(cfg)?;
    log.line("controller: smbd up");
    let addr: SocketAddr = cfg.guest_addr.parse().map_err(|e| AgentError::Config(format!("guestAddr: {e}")))?;
    // As long as the image's (or the build's) own time-out: a Windows guest booted cold under
    // TCG takes many minutes to answer.
    let tcp = wait_for_ssh(addr, Duration::from_secs(cfg.ssh_timeout_secs))?;
    log.line("guest SSH answered");
    let cut = tcp.try_clone().map_err(|e| AgentError::Io(format!("cannot keep the SSH connection: {e}")))?;
    let ssh = handshake(tcp, SSH_STEP_TIMEOUT)?;
    ssh.userauth_pubkey_file(&cfg.user, None, &cfg.key_file, None)
        .map_err(ssh_err("authenticating with the image's key"))?;
    log.line("logged on to the guest");
    Ok(Served { smbd, ssh, tcp: cut, waiting: None })
}

/// Runs the job's command; the verdict, and what served it (smbd, the SSH session) for a
/// layer's next session ([`wait_again`]).
fn run_job(
    served: Served,
    job: &JobConfig,
    log: &mut Log,
    clock: &dyn Fn() -> std::time::SystemTime,
) -> Result<(Verdict, Served), AgentError> {
    File::create(job.xchg.join(WAITING_DONE))
        .map_err(|e| AgentError::Io(format!("cannot create {WAITING_DONE}: {e}")))?;
    // smbd must outlive the command: if it ends, the guest's file access hangs or fails, so
    // the watch cuts the SSH connection and the loss is reported instead of a hang.
    let Served { smbd, ssh, tcp, waiting } = served;
    let watch = SmbdWatch::start(smbd, &tcp, job.kill_smbd_after_secs.map(Duration::from_secs))?;
    let result = run_command(&ssh, waiting, job, log, clock);
    let smbd = watch.stop().map_err(|SmbdEnded { status }| {
        log.line(&format!("controller: smbd ended ({status}) during the command"));
        AgentError::SmbdDied { status }
    })?;
    Ok((result?, Served { smbd, ssh, tcp, waiting: None }))
}

/// Watches smbd while the command runs; see [`run_job`].
struct SmbdWatch {
    /// Dropped (or sent to) when the command is over: the watch ends at once.
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<(SmbdGuard, Option<String>)>,
}

impl SmbdWatch {
    fn start(mut smbd: SmbdGuard, tcp: &TcpStream, kill_after: Option<Duration>) -> Result<SmbdWatch, AgentError> {
        use std::sync::mpsc::RecvTimeoutError;
        let cut = tcp.try_clone().map_err(|e| AgentError::Io(format!("cannot watch smbd: {e}")))?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let started = Instant::now();
        let thread = std::thread::spawn(move || loop {
            if kill_after.is_some_and(|after| started.elapsed() >= after) {
                let _ = smbd.0.kill();
            }
            if let Ok(Some(status)) = smbd.0.try_wait() {
                let _ = cut.shutdown(std::net::Shutdown::Both);
                return (smbd, Some(describe(status)));
            }
            match stopped.recv_timeout(Duration::from_millis(100)) {
                Err(RecvTimeoutError::Timeout) => continue,
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return (smbd, None),
            }
        });
        Ok(SmbdWatch { stop, thread })
    }

    /// Ends the watch: smbd (stopped when its guard is dropped), or how it ended if it ended
    /// during the command.
    fn stop(self) -> Result<SmbdGuard, SmbdEnded> {
        let _ = self.stop.send(());
        match self.thread.join() {
            Ok((guard, None)) => Ok(guard),
            Ok((_, Some(status))) => Err(SmbdEnded { status }),
            Err(_) => Err(SmbdEnded { status: "its watch failed".into() }),
        }
    }
}

/// smbd ended while the command ran: how ("exit status 1", "killed by signal 9").
struct SmbdEnded {
    status: String,
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

fn start_smbd(cfg: &ServeConfig) -> Result<SmbdGuard, AgentError> {
    let conf = samba::write_config(&cfg.shares, &cfg.run_dir).map_err(|e| AgentError::Smbd(e.to_string()))?;
    let log = File::create(&cfg.smbd_log)
        .map_err(|e| AgentError::Smbd(format!("cannot create {}: {e}", cfg.smbd_log.display())))?;
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
            let tail = std::fs::read_to_string(&cfg.smbd_log).unwrap_or_default();
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
    session: &ssh2::Session,
    waiting: Option<ssh2::Channel>,
    job: &JobConfig,
    log: &mut Log,
    clock: &dyn Fn() -> std::time::SystemTime,
) -> Result<Verdict, AgentError> {
    let command = if job.set_clock { format!("{}{}", clock_prefix(clock()), job.command) } else { job.command.clone() };
    if let Some(terminal) = &job.terminal {
        // A login on a pty of its own; the waiting one ends with the session.
        let channel = session.channel_session().map_err(ssh_err("opening a channel"))?;
        return run_on_terminal(session, channel, terminal, &command, log);
    }
    let split = if job.split_streams { Some(SplitFiles::create(&job.xchg)?) } else { None };
    let mut channel = match waiting {
        Some(mut channel) => {
            session.set_timeout(SSH_STEP_TIMEOUT.as_millis() as u32);
            channel.write_all(command.as_bytes()).map_err(|e| AgentError::Ssh {
                step: "sending the command to the waiting login",
                detail: e.to_string(),
            })?;
            channel.send_eof().map_err(ssh_err("ending the command's input"))?;
            channel
        }
        None => {
            let mut channel = open_channel(session)?;
            channel.exec(&command).map_err(ssh_err("starting the command"))?;
            channel
        }
    };
    match split {
        None => pump(session, channel, log),
        Some(files) => {
            // Merging is libssh2's own choice at each read, not at arrival: a channel opened
            // merged (the waiting login's, before the save, or a new one) can still keep its
            // streams apart, since nothing has been read from it yet.
            channel.handle_extended_data(ssh2::ExtendedData::Normal).map_err(ssh_err("keeping stderr apart"))?;
            pump_split(session, &mut channel, files)?;
            verdict(session, channel)
        }
    }
}

/// A command's two streams, each into a file of its own in the exchange directory.
struct SplitFiles {
    stdout: File,
    stderr: File,
}

impl SplitFiles {
    fn create(xchg: &Path) -> Result<SplitFiles, AgentError> {
        let create = |name: &str| {
            let path = xchg.join(name);
            File::create(&path).map_err(|e| AgentError::Io(format!("cannot create {}: {e}", path.display())))
        };
        Ok(SplitFiles { stdout: create(protocol::COMMAND_STDOUT)?, stderr: create(protocol::COMMAND_STDERR)? })
    }
}

/// How long [`pump_split`] waits on the socket before it looks at both streams again: libssh2
/// may have queued one stream's data while the other was read.
const SPLIT_POLL: Duration = Duration::from_millis(100);

/// The channel's stdout and stderr, each into its file, until both end. Without blocking:
/// a blocking read of one stream, while the command writes only to the other, would leave
/// that stream's window full and the command stalled.
fn pump_split(session: &ssh2::Session, channel: &mut ssh2::Channel, mut files: SplitFiles) -> Result<(), AgentError> {
    session.set_blocking(false);
    let pumped = pump_split_nonblocking(session, channel, &mut files);
    session.set_blocking(true);
    pumped
}

fn pump_split_nonblocking(
    session: &ssh2::Session,
    channel: &mut ssh2::Channel,
    files: &mut SplitFiles,
) -> Result<(), AgentError> {
    use std::io::ErrorKind::{Interrupted, WouldBlock};
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut moved = false;
        for (id, file) in [(0, &mut files.stdout), (ssh2::EXTENDED_DATA_STDERR, &mut files.stderr)] {
            let mut stream = channel.stream(id);
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        file.write_all(&buf[..n])
                            .map_err(|e| AgentError::Io(format!("writing the command's output: {e}")))?;
                        moved = true;
                    }
                    Err(e) if e.kind() == WouldBlock => break,
                    Err(e) if e.kind() == Interrupted => continue,
                    Err(e) => return Err(AgentError::Ssh { step: "reading output", detail: e.to_string() }),
                }
            }
        }
        if channel.eof() {
            return Ok(());
        }
        if !moved {
            // The session owns its socket, open for as long as the session lives.
            match os::wait_raw_readable(session.as_raw_fd(), SPLIT_POLL) {
                Ok(_) => {}
                Err(e) if e.kind() == Interrupted => {}
                Err(e) => return Err(AgentError::Io(format!("waiting for the command's output: {e}"))),
            }
        }
    }
}

/// A new channel, its stdout and stderr merged.
fn open_channel(session: &ssh2::Session) -> Result<ssh2::Channel, AgentError> {
    session.set_timeout(SSH_STEP_TIMEOUT.as_millis() as u32);
    let mut channel = session.channel_session().map_err(ssh_err("opening a channel"))?;
    // One stream in order: the build log wants stdout and stderr as they interleave.
    channel.handle_extended_data(ssh2::ExtendedData::Merge).map_err(ssh_err("merging stderr"))?;
    Ok(channel)
}

/// Runs `command` on a new channel of `session`, its stdout and stderr merged into `log` as
/// they come; its exit code or signal.
fn exec(session: &ssh2::Session, command: &str, log: &mut Log, step: &'static str) -> Result<Verdict, AgentError> {
    let mut channel = open_channel(session)?;
    channel.exec(command).map_err(ssh_err(step))?;
    pump(session, channel, log)
}

/// The channel's output into `log` until it closes; its exit code or signal.
fn pump(session: &ssh2::Session, mut channel: ssh2::Channel, log: &mut Log) -> Result<Verdict, AgentError> {
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
    verdict(session, channel)
}

/// The ended command's exit code or signal, once its channel has closed.
fn verdict(session: &ssh2::Session, mut channel: ssh2::Channel) -> Result<Verdict, AgentError> {
    session.set_timeout(SSH_STEP_TIMEOUT.as_millis() as u32);
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
    terminal: &protocol::TerminalRequest,
    command: &str,
    log: &mut Log,
) -> Result<Verdict, AgentError> {
    use std::os::fd::AsFd;
    let io_err = |what: &str| {
        let what = what.to_owned();
        move |e: std::io::Error| AgentError::Io(format!("{what} {}: {e}", protocol::SESSION_PORT))
    };
    let mut port =
        OpenOptions::new().read(true).write(true).open(protocol::SESSION_PORT).map_err(io_err("cannot open"))?;
    let _raw = crate::vm::sys::tty::RawMode::enter(port.as_fd(), false).map_err(io_err("cannot make raw"))?;
    let size = Some((terminal.cols, terminal.rows, 0, 0));
    channel.request_pty(&terminal.term, None, size).map_err(ssh_err("asking for a pty"))?;
    channel.exec(command).map_err(ssh_err("starting the login"))?;
    log.line("terminal: the login is relayed through the session port");
    // Both directions in one loop: libssh2 lets only one thread use a session.
    session.set_blocking(false);
    let relayed = relay(&mut channel, &mut port);
    session.set_blocking(true);
    relayed?;
    verdict(session, channel)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The waiting login's marker counts only as a whole line of its own, once complete.
    #[test]
    fn the_login_is_done_only_at_its_whole_marker_line() {
        assert!(!said_done(b""));
        assert!(!said_done(b"winvm-login-do"));
        assert!(!said_done(b"winvm-login-done"), "the line is not complete yet");
        assert!(said_done(b"winvm-login-done\n"));
        assert!(said_done(b"mounting...\nwinvm-login-done\n"));
        assert!(!said_done(b"echo winvm-login-done-not\n"));
        assert!(WAITING_COMMAND.starts_with(&format!("echo {LOGIN_DONE};")));
    }

    /// The exchange folder is checked before the job file is read from it: a folder that is
    /// not a mount point is named, with the export that should be there.
    #[test]
    fn a_folder_that_is_not_mounted_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mounts = vec![("xchg".to_string(), dir.path().to_path_buf())];
        let err = check_mounted(dir.path(), &mounts).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "{} is not a mount point: the export xchg is not mounted there",
                dir.path().display()
            )),
            "{err}"
        );
        let err = check_mounted(Path::new("/nonexistent-winvm"), &mounts).unwrap_err().to_string();
        assert!(err.contains("checking the export (none) at /nonexistent-winvm: /nonexistent-winvm: "), "{err}");
        // /proc is a mount point of its own on any Linux this runs on.
        check_mounted(Path::new("/proc"), &mounts).unwrap();
    }

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
}
