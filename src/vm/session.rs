//! One VM session on the host: the switch, the guest and the controller, the command's output
//! streamed into the build log, the verdict read from the exchange directory, and everything
//! torn down in reverse order on every path.

use super::process::{describe_status, ProcessGuard, SpawnError};
use super::qemu::{Export, KernelBoot, VmConfig, CONTROLLER_MAC, CONTROLLER_MEMORY_MIB, GUEST_MAC, VIRTIO_NET};
use super::qmp::Qmp;
use super::state::StateHeader;
use super::vde::{StartSwitchError, VdeSwitch};
use crate::controller::{self, agent::Verdict, AgentConfig, Mount, Share};
use crate::guest::{GUEST_IP, SSH_USER};
use crate::spec::Accel;
use crate::tools::Tools;
use std::fmt;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Command;
use tokio::signal::unix::{signal, SignalKind};

pub const QEMU_UP_TIMEOUT: Duration = Duration::from_secs(60);
pub const LOG_TAIL_LINES: usize = 30;
pub const GUEST_DEATH_GRACE: Duration = Duration::from_secs(2);

/// A directory of the host that the guest sees at `guest_path`, through the controller.
#[derive(Debug, Clone)]
pub struct ExtraShare {
    pub name: String,
    pub host_path: PathBuf,
    pub guest_path: String,
}

/// How the guest starts: cold from a kernel (and maybe a disk), or revived from a state file.
#[derive(Debug, Clone)]
pub struct GuestBoot {
    pub boot: Option<KernelBoot>,
    /// A virtio disk (the standin's); Windows attaches its disks through `extra_args`.
    pub disk: Option<PathBuf>,
    pub nic_model: &'static str,
    pub extra_args: Vec<std::ffi::OsString>,
    /// A state file to revive from (validated by the caller).
    pub revive_from: Option<PathBuf>,
}

/// What happens to the guest once the command succeeded.
#[derive(Debug, Clone)]
pub enum After {
    Quit,
    /// Save the guest's memory into `path` (the image's state file).
    Suspend {
        path: PathBuf,
        guest: String,
    },
}

/// How the controller starts. Its initramfs is the same for every session, so an image can
/// carry a saved controller that builds revive instead of booting.
#[derive(Debug, Clone, Default)]
pub struct ControllerBoot {
    /// A prebuilt controller initramfs (the media's); None: made for this session.
    pub initrd: Option<PathBuf>,
    pub revive_from: Option<PathBuf>,
    /// Save the controller, waiting for its session, into this state file (suspend stage).
    pub save_to: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub timeout: Duration,
    /// Where the session keeps its files; must exist, short enough for unix socket paths.
    pub work: PathBuf,
    /// Kernel and modules of the controller.
    pub kernel: PathBuf,
    pub modules_dir: PathBuf,
    pub guest: GuestBoot,
    pub controller: ControllerBoot,
    /// The private key that opens the guest.
    pub key_file: PathBuf,
    /// The command line run by the guest's shell.
    pub command: String,
    /// Set the guest's clock first: a revived guest's clock lags by the time since the save.
    pub set_clock: bool,
    pub after: After,
    pub store_dir: PathBuf,
    pub store_writable: bool,
    pub extra_shares: Vec<ExtraShare>,
    pub tools: Tools,
    /// This program, run as the controller's agent.
    pub agent: PathBuf,
}

#[derive(Debug)]
pub enum RunError {
    Prepare(String),
    Switch(StartSwitchError),
    Spawn(SpawnError),
    QemuNotUp {
        name: String,
        detail: String,
        log_tail: String,
    },
    GuestDroppedOut {
        status: String,
        log_tail: String,
    },
    GuestDied {
        status: String,
        log_tail: String,
    },
    ControllerDied {
        status: String,
        log_tail: String,
    },
    NoExitCode {
        log_tail: String,
    },
    Agent {
        message: String,
        log_tail: String,
    },
    Timeout {
        secs: u64,
    },
    Interrupted {
        signal: &'static str,
    },
    State(super::state::StateFileError),
    /// A process of the session outlived its teardown.
    Survived {
        name: String,
        processes: String,
    },
    /// The state reader refused the file while streaming it into QEMU.
    StateLoad {
        name: String,
        reader: String,
        detail: String,
        log_tail: String,
    },
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tail = |f: &mut fmt::Formatter<'_>, what: &str, t: &str| {
            if t.is_empty() {
                Ok(())
            } else {
                write!(f, "\n--- last lines of {what} ---\n{t}")
            }
        };
        match self {
            RunError::Prepare(e) => write!(f, "preparing the VMs: {e}"),
            RunError::Switch(e) => write!(f, "{e}"),
            RunError::Spawn(e) => write!(f, "{e}"),
            RunError::QemuNotUp { name, detail, log_tail } => {
                write!(f, "the {name} VM did not come up: {detail}")?;
                tail(f, &format!("the {name}'s QEMU output"), log_tail)
            }
            RunError::GuestDroppedOut { status, log_tail } => {
                write!(f, "the guest VM dropped out early (QEMU ended with {status} before SSH was reached)")?;
                tail(f, "the guest's serial log", log_tail)
            }
            RunError::GuestDied { status, log_tail } => {
                write!(f, "the guest VM died during the command (QEMU ended with {status})")?;
                tail(f, "the guest's serial log", log_tail)
            }
            RunError::ControllerDied { status, log_tail } => {
                write!(f, "the controller VM ended with {status} before the command finished")?;
                tail(f, "the controller's serial log", log_tail)
            }
            RunError::NoExitCode { log_tail } => {
                write!(f, "the VM produced no exit code")?;
                tail(f, "the controller's serial log", log_tail)
            }
            RunError::Agent { message, log_tail } => {
                write!(f, "the controller could not run the command: {message}")?;
                tail(f, "the guest's serial log", log_tail)
            }
            RunError::Timeout { secs } => write!(f, "the build exceeded its timeout of {secs} s and was stopped"),
            RunError::State(e) => write!(f, "{e}"),
            RunError::Survived { name, processes } => {
                write!(f, "after the session ended, the {name}'s processes were still running: {processes}")
            }
            RunError::StateLoad { name, reader, detail, log_tail } => {
                write!(f, "the {name}'s saved state could not be loaded: {reader} (QEMU: {detail})")?;
                tail(f, &format!("the {name}'s QEMU output"), log_tail)
            }
            RunError::Interrupted { signal } => write!(f, "interrupted by {signal}; the VMs were stopped"),
        }
    }
}

impl std::error::Error for RunError {}

pub fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Progress lines in the build log, with the time since the session started.
pub struct Progress {
    start: Instant,
}

impl Progress {
    pub fn new() -> Progress {
        Progress { start: Instant::now() }
    }
    pub fn say(&self, msg: &str) {
        eprintln!("nix-winvm: [{:6.2} s] {msg}", self.start.elapsed().as_secs_f64());
    }
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

fn prep<E: fmt::Display>(what: &str) -> impl FnOnce(E) -> RunError + '_ {
    move |e| RunError::Prepare(format!("{what}: {e}"))
}

struct Files {
    xchg: PathBuf,
    run: PathBuf,
    controller_initrd: PathBuf,
    /// The line the controller's init waits for on ttyS1.
    session_line: String,
    guest_serial: PathBuf,
    controller_serial: PathBuf,
}

async fn prepare(cfg: &SessionConfig) -> Result<Files, RunError> {
    let w = &cfg.work;
    let mut files = Files {
        xchg: w.join("xchg"),
        run: w.join("run"),
        controller_initrd: cfg.controller.initrd.clone().unwrap_or_else(|| w.join("controller-initrd.img")),
        session_line: String::new(),
        guest_serial: w.join("guest-serial.log"),
        controller_serial: w.join("controller-serial.log"),
    };
    for d in [&files.xchg, &files.run] {
        std::fs::create_dir_all(d).map_err(prep("creating the work directory"))?;
    }
    let key = files.xchg.join("key");
    std::fs::copy(&cfg.key_file, &key).map_err(prep("copying the key"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).map_err(prep("key permissions"))?;
    }

    let mut mounts = vec![
        Mount { tag: "store".into(), at: cfg.store_dir.clone() },
        Mount { tag: "xchg".into(), at: files.xchg.clone() },
    ];
    let mut shares = vec![
        Share { name: "nixstore".into(), path: cfg.store_dir.clone() },
        Share { name: "xchg".into(), path: files.xchg.clone() },
    ];
    let mut share_list = String::new();
    for (i, s) in cfg.extra_shares.iter().enumerate() {
        mounts.push(Mount { tag: format!("share{i}"), at: s.host_path.clone() });
        shares.push(Share { name: s.name.clone(), path: s.host_path.clone() });
        share_list.push_str(&format!("{} {}\n", s.name, s.guest_path));
    }
    std::fs::write(files.xchg.join("shares"), share_list).map_err(prep("writing the share list"))?;
    files.session_line = controller::session_line(&mounts, &[files.run.clone()], &cfg.agent, &files.xchg)
        .map_err(prep("the controller's session"))?;
    if cfg.controller.initrd.is_none() {
        let ctl = controller::initramfs(&cfg.tools.busybox, &cfg.modules_dir).map_err(prep("controller"))?;
        write_initrd(&ctl, &files.controller_initrd)?;
    }

    let agent = AgentConfig {
        shares,
        xchg: files.xchg.clone(),
        run_dir: files.run.clone(),
        smbd: cfg.tools.smbd.clone(),
        guest_addr: format!("{GUEST_IP}:22"),
        user: SSH_USER.into(),
        key_file: key,
        command: cfg.command.clone(),
        set_clock: cfg.set_clock,
        ssh_timeout_secs: cfg.timeout.as_secs().max(1),
    };
    let json = serde_json::to_string_pretty(&agent).map_err(prep("agent config"))?;
    std::fs::write(files.xchg.join(controller::AGENT_CONFIG), json).map_err(prep("writing the agent config"))?;
    Ok(files)
}

pub fn write_initrd(img: &crate::initramfs::Initramfs, path: &Path) -> Result<(), RunError> {
    let f = std::fs::File::create(path).map_err(prep("creating an initramfs"))?;
    let mut w = std::io::BufWriter::new(f);
    img.write_gz(&mut w).map_err(prep("writing an initramfs"))?;
    w.flush().map_err(prep("writing an initramfs"))
}
fn spawn_qemu(cfg: &SessionConfig, vm: &VmConfig, log: &Path) -> Result<ProcessGuard, RunError> {
    let out = std::fs::File::create(log).map_err(prep("creating a QEMU log"))?;
    let err = out.try_clone().map_err(prep("creating a QEMU log"))?;
    let mut cmd = Command::new(&cfg.tools.qemu);
    cmd.args(vm.args()).stdin(Stdio::null()).stdout(out).stderr(err);
    ProcessGuard::spawn(&vm.name, cmd).map_err(RunError::Spawn)
}

async fn qmp_up(name: &str, guard: &mut ProcessGuard, sock: &Path, log: &Path) -> Result<Qmp, RunError> {
    let not_up =
        |detail: String| RunError::QemuNotUp { name: name.into(), detail, log_tail: tail_lines(log, LOG_TAIL_LINES) };
    tokio::select! {
        r = Qmp::connect(sock, QEMU_UP_TIMEOUT) => r.map_err(|e| not_up(e.to_string())),
        s = guard.wait() => Err(not_up(format!("QEMU exited with {}", describe_status(s)))),
    }
}

/// Streams new bytes of the output log to stderr.
struct Tail {
    path: PathBuf,
    offset: u64,
}

impl Tail {
    fn pump(&mut self) {
        let Ok(mut f) = std::fs::File::open(&self.path) else { return };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if let Ok(n) = f.read_to_end(&mut buf) {
            if n > 0 {
                self.offset += n as u64;
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(&buf);
                let _ = err.flush();
            }
        }
    }
}

/// Runs the command in a fresh guest. On every path, the VMs and the switch are gone when this
/// returns.
pub async fn run(cfg: &SessionConfig, progress: &Progress) -> Result<Verdict, RunError> {
    let mut term = signal(SignalKind::terminate()).map_err(prep("installing signal handlers"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(prep("installing signal handlers"))?;
    let deadline = tokio::time::sleep(cfg.timeout);
    tokio::pin!(deadline);
    let work = async {
        let files = prepare(cfg).await?;
        progress.say("controller initramfs ready");
        run_prepared(cfg, &files, progress).await
    };
    tokio::select! {
        r = work => r,
        _ = &mut deadline => Err(RunError::Timeout { secs: cfg.timeout.as_secs() }),
        _ = term.recv() => Err(RunError::Interrupted { signal: "SIGTERM" }),
        _ = int.recv() => Err(RunError::Interrupted { signal: "SIGINT" }),
    }
    // Dropping the `work` future drops every guard it owns: QEMUs and switch killed and reaped.
}

async fn run_prepared(cfg: &SessionConfig, files: &Files, progress: &Progress) -> Result<Verdict, RunError> {
    let w = &cfg.work;
    let mut switch = VdeSwitch::start(&cfg.tools.vde_switch, w).await.map_err(RunError::Switch)?;
    progress.say("switch up");

    let guest_vm = VmConfig {
        name: "guest".into(),
        accel: cfg.accel,
        memory_mib: cfg.memory_mib,
        cpus: cfg.cpus,
        boot: cfg.guest.boot.clone(),
        nic_model: cfg.guest.nic_model,
        extra_args: cfg.guest.extra_args.clone(),
        no_reboot: true,
        serial_log: files.guest_serial.clone(),
        vde_ctl: Some(switch.ctl.clone()),
        mac: GUEST_MAC.into(),
        qmp: Some(w.join("guest-qmp.sock")),
        exports: vec![],
        disk: cfg.guest.disk.clone(),
        // Deferred: the state file is checked against this QEMU's version before it loads.
        incoming: cfg.guest.revive_from.as_ref().map(|_| "defer".to_owned()),
    };
    let mut exports = vec![
        Export { tag: "root".into(), path: "/".into(), readonly: true },
        Export { tag: "store".into(), path: cfg.store_dir.clone(), readonly: !cfg.store_writable },
        Export { tag: "xchg".into(), path: files.xchg.clone(), readonly: false },
    ];
    for (i, s) in cfg.extra_shares.iter().enumerate() {
        exports.push(Export { tag: format!("share{i}"), path: s.host_path.clone(), readonly: false });
    }
    let controller_vm = VmConfig {
        name: "controller".into(),
        accel: cfg.accel,
        memory_mib: CONTROLLER_MEMORY_MIB,
        cpus: 1,
        boot: Some(KernelBoot {
            kernel: cfg.kernel.clone(),
            initrd: files.controller_initrd.clone(),
            append: "console=ttyS0 panic=-1 quiet".into(),
        }),
        nic_model: VIRTIO_NET,
        // ttyS1: where the session arrives.
        extra_args: vec![
            "-chardev".into(),
            format!("socket,id=session,path={},server=on,wait=off", w.join("controller-session.sock").display()).into(),
            "-device".into(),
            "isa-serial,chardev=session".into(),
        ],
        no_reboot: true,
        serial_log: files.controller_serial.clone(),
        vde_ctl: Some(switch.ctl.clone()),
        mac: CONTROLLER_MAC.into(),
        qmp: Some(w.join("controller-qmp.sock")),
        exports,
        disk: None,
        incoming: cfg.controller.revive_from.as_ref().map(|_| "defer".to_owned()),
    };
    let guest_log = w.join("guest-qemu.log");
    let controller_log = w.join("controller-qemu.log");
    write_run_vm_script(cfg, &guest_vm, &controller_vm);
    let mut guest = spawn_qemu(cfg, &guest_vm, &guest_log)?;
    let mut ctl = spawn_qemu(cfg, &controller_vm, &controller_log)?;
    let mut guest_qmp = qmp_up("guest", &mut guest, &w.join("guest-qmp.sock"), &guest_log).await?;
    progress.say("guest up");
    let mut ctl_qmp = qmp_up("controller", &mut ctl, &w.join("controller-qmp.sock"), &controller_log).await?;
    progress.say("controller up");
    if let Some(state) = &cfg.guest.revive_from {
        revive(cfg, "guest", state, cfg.memory_mib, &mut guest_qmp, &mut guest, &guest_log).await?;
        progress.say("guest revived");
    }
    if let Some(state) = &cfg.controller.revive_from {
        revive(cfg, "controller", state, CONTROLLER_MEMORY_MIB, &mut ctl_qmp, &mut ctl, &controller_log).await?;
        progress.say("controller revived");
    } else {
        let marker = controller::WAITING_MARKER;
        let serial = files.controller_serial.clone();
        let what = format!("the controller's init ('{marker}')");
        let waited = tokio::select! {
            r = super::wait::wait_until(&what, QEMU_UP_TIMEOUT, || {
                let seen = std::fs::read_to_string(&serial).map(|t| t.contains(marker)).unwrap_or(false);
                async move { seen.then_some(()) }
            }) => r.map_err(|e| e.to_string()),
            s = ctl.wait() => Err(format!("QEMU ended with {}", describe_status(s))),
        };
        waited.map_err(|detail| RunError::QemuNotUp {
            name: "controller".into(),
            detail,
            log_tail: tail_lines(&files.controller_serial, LOG_TAIL_LINES),
        })?;
        if let Some(path) = &cfg.controller.save_to {
            let header = StateHeader {
                qemu_version: qemu_version(&ctl_qmp),
                memory_mib: CONTROLLER_MEMORY_MIB,
                guest: "controller".into(),
            };
            save(cfg, &mut ctl_qmp, path, &header).await?;
            ctl_qmp
                .execute(&super::qmp::Cont)
                .await
                .map_err(|e| RunError::Prepare(format!("continuing the controller: {e}")))?;
            progress.say("controller saved while waiting for its session");
        }
    }
    let _session_port = send_session(&w.join("controller-session.sock"), &files.session_line).await?;

    let mut tail = Tail { path: files.xchg.join(controller::OUTPUT_LOG), offset: 0 };
    let waiting_done = files.xchg.join(controller::WAITING_DONE);
    let mut ssh_ready = false;
    let mut guest_died: Option<(std::process::ExitStatus, Instant)> = None;
    let verdict = loop {
        tail.pump();
        if !ssh_ready && waiting_done.exists() {
            ssh_ready = true;
            progress.say("ssh ready");
        }
        if guest_died.is_none() {
            if let Some(s) = guest.try_exited() {
                tail.pump();
                if !ssh_ready {
                    return Err(RunError::GuestDroppedOut {
                        status: describe_status(s),
                        log_tail: tail_lines(&files.guest_serial, LOG_TAIL_LINES),
                    });
                }
                guest_died = Some((s, Instant::now()));
            }
        }
        // A guest that dies mid-command leaves the SSH connection hanging, not closed: give the
        // controller a moment to report, then call it.
        if let Some((s, at)) = guest_died {
            if at.elapsed() > GUEST_DEATH_GRACE && !files.xchg.join(controller::EXIT_FILE).exists() {
                return Err(RunError::GuestDied {
                    status: describe_status(s),
                    log_tail: tail_lines(&files.guest_serial, LOG_TAIL_LINES),
                });
            }
        }
        if let Some(s) = ctl.try_exited() {
            tail.pump();
            let exit = std::fs::read_to_string(files.xchg.join(controller::EXIT_FILE));
            break match exit {
                Ok(text) => match controller::agent::parse_exit_file(&text) {
                    Ok(v) => v,
                    Err(message) => {
                        return Err(RunError::Agent {
                            message,
                            log_tail: tail_lines(&files.guest_serial, LOG_TAIL_LINES),
                        })
                    }
                },
                Err(_) if s.success() => {
                    return Err(RunError::NoExitCode { log_tail: tail_lines(&files.controller_serial, LOG_TAIL_LINES) })
                }
                Err(_) => {
                    return Err(RunError::ControllerDied {
                        status: describe_status(s),
                        log_tail: tail_lines(&files.controller_serial, LOG_TAIL_LINES),
                    })
                }
            };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if let (After::Suspend { path, guest: guest_name }, Verdict::Exited(0)) = (&cfg.after, &verdict) {
        let header = StateHeader {
            qemu_version: qemu_version(&guest_qmp),
            memory_mib: cfg.memory_mib,
            guest: guest_name.clone(),
        };
        save(cfg, &mut guest_qmp, path, &header).await?;
        progress.say(&format!("guest memory saved to {}", path.display()));
    }
    // The guest has nothing left to do: stop it without a shutdown dance.
    let _ = tokio::time::timeout(Duration::from_secs(2), guest_qmp.execute(&super::qmp::Quit)).await;
    // In reverse start order (switch, guest, controller); each group must then be gone.
    for guard in [&mut ctl, &mut guest, &mut switch.guard] {
        guard.shutdown(Duration::from_secs(2)).await;
    }
    for guard in [&ctl, &guest, &switch.guard] {
        let name = guard.name().to_owned();
        super::wait::wait_until(&format!("the {name}'s processes to end"), TEARDOWN_TIMEOUT, || {
            let left = guard.survivors();
            async move { left.is_empty().then_some(()) }
        })
        .await
        .map_err(|_| RunError::Survived { name, processes: describe_processes(&guard.survivors()) })?;
    }
    Ok(verdict)
}

/// How long a killed process group may take to disappear after teardown.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(2);

fn describe_processes(ps: &[(i32, String)]) -> String {
    ps.iter().map(|(pid, name)| format!("{name} (pid {pid})")).collect::<Vec<_>>().join(", ")
}

/// `run-vm` in the work directory starts the same pair by hand, for `-K` debugging.
fn write_run_vm_script(cfg: &SessionConfig, guest: &VmConfig, ctl: &VmConfig) {
    let q = |a: &std::ffi::OsStr| crate::shell::quote(&a.to_string_lossy());
    let line = |vm: &VmConfig| {
        let mut s = q(cfg.tools.qemu.as_os_str());
        for a in vm.args() {
            s.push(' ');
            s.push_str(&q(&a));
        }
        s
    };
    let ctl_sock = guest.vde_ctl.clone().unwrap_or_default();
    let script = format!(
        "#!/bin/sh\n# Starts this session's VDE switch and both VMs again (nix-winvm -K, nix-build -K).\n\
         # A VM started with -incoming defer waits for migrate-incoming on its QMP socket; the\n\
         # controller waits for its session line on controller-session.sock.\ncd {}\n{} -s {} -M {} --dirmode 0700 -d\n{} &\n{} &\nwait\n",
        crate::shell::quote(&cfg.work.display().to_string()),
        q(cfg.tools.vde_switch.as_os_str()),
        q(ctl_sock.as_os_str()),
        crate::shell::quote(&cfg.work.join("vde.mgmt").display().to_string()),
        line(guest),
        line(ctl)
    );
    let path = cfg.work.join("run-vm");
    if std::fs::write(&path, script).is_ok() {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
    }
}

/// QEMU reads a saved state through this builder: `state-read` checks the frame and the
/// checksum as it inflates, and leaves its error in `error_file` for the session to report.
pub fn state_reader_uri(builder: &Path, state: &Path, error_file: &Path) -> String {
    format!(
        "exec:{} state-read --in {} --error-to {}",
        crate::shell::quote(&builder.display().to_string()),
        crate::shell::quote(&state.display().to_string()),
        crate::shell::quote(&error_file.display().to_string())
    )
}

pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

/// Sends the session line, with the host's clock (a revived controller's lags); the returned
/// connection must stay open while the session runs, so that QEMU can hand the line over as
/// the controller reads it.
async fn send_session(sock: &Path, line: &str) -> Result<tokio::net::UnixStream, RunError> {
    use tokio::io::AsyncWriteExt;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let line = format!("NOW={now} {line}");
    let mut s = tokio::net::UnixStream::connect(sock).await.map_err(|e| {
        RunError::Prepare(format!("connecting to the controller's session port {}: {e}", sock.display()))
    })?;
    s.write_all(line.as_bytes())
        .await
        .map_err(|e| RunError::Prepare(format!("sending the controller its session: {e}")))?;
    Ok(s)
}

/// An incoming VM loads its memory, then waits paused until told to continue.
async fn revive(
    cfg: &SessionConfig,
    name: &str,
    state: &Path,
    memory_mib: u32,
    qmp: &mut Qmp,
    vm: &mut ProcessGuard,
    log: &Path,
) -> Result<(), RunError> {
    let reader_error = cfg.work.join(format!("{name}-state-read.err"));
    // The state reader's own verdict (a corrupt file) comes first; QEMU's view follows.
    let failed = |detail: String| {
        let log_tail = tail_lines(log, LOG_TAIL_LINES);
        match std::fs::read_to_string(&reader_error) {
            Ok(reader) if !reader.trim().is_empty() => {
                RunError::StateLoad { name: name.into(), reader: reader.trim().into(), detail, log_tail }
            }
            _ => RunError::QemuNotUp { name: name.into(), detail, log_tail },
        }
    };
    let version = qemu_version(qmp);
    // The caller checked the frame; here what needs this QEMU: its version, the memory.
    super::state::inspect(state, Some((memory_mib, &version))).map_err(RunError::State)?;
    let uri = state_reader_uri(&cfg.agent, state, &reader_error);
    qmp.execute(&super::qmp::MigrateIncoming { uri }).await.map_err(|e| failed(format!("starting the load: {e}")))?;
    let start = Instant::now();
    loop {
        if let Some(s) = vm.try_exited() {
            return Err(failed(format!("QEMU ended with {} while loading the saved state", describe_status(s))));
        }
        let status = match qmp.execute(&super::qmp::QueryStatus).await {
            Ok(st) => st,
            Err(e) => return Err(failed(format!("while loading the saved state: {e}"))),
        };
        match status.status.as_str() {
            "inmigrate" => {}
            "paused" | "postmigrate" | "prelaunch" => break,
            "running" => return Ok(()),
            other => return Err(failed(format!("the saved state left the {name} in state '{other}'"))),
        }
        if start.elapsed() > MIGRATION_TIMEOUT {
            return Err(failed(format!("the saved state did not load within {} s", MIGRATION_TIMEOUT.as_secs())));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    qmp.execute(&super::qmp::Cont).await.map_err(|e| failed(format!("continuing after the load: {e}")))?;
    Ok(())
}

async fn save(cfg: &SessionConfig, qmp: &mut Qmp, path: &Path, header: &StateHeader) -> Result<(), RunError> {
    let fail = |what: &str, e: String| RunError::Prepare(format!("saving the {}'s memory ({what}): {e}", header.guest));
    qmp.execute(&super::qmp::Stop).await.map_err(|e| fail("stop", e.to_string()))?;
    let uri = format!(
        "exec:{} state-write --out {} --memory {} --qemu-version {} --guest {}",
        crate::shell::quote(&cfg.agent.display().to_string()),
        crate::shell::quote(&path.display().to_string()),
        header.memory_mib,
        crate::shell::quote(&header.qemu_version),
        crate::shell::quote(&header.guest),
    );
    qmp.execute(&super::qmp::Migrate { uri }).await.map_err(|e| fail("migrate", e.to_string()))?;
    qmp.wait_migration(MIGRATION_TIMEOUT).await.map_err(|e| fail("migration", e.to_string()))?;
    // QEMU reports completion when it has written the last byte; the writer may still be
    // flushing. The file appears atomically, so wait for it, then check it whole.
    super::wait::wait_until(&format!("the state file {}", path.display()), Duration::from_secs(60), || {
        let exists = path.exists();
        async move { exists.then_some(()) }
    })
    .await
    .map_err(|e| fail("writer", e.to_string()))?;
    // The writer checksummed what it wrote; its frame and header are checked, not re-read.
    super::state::inspect(path, Some((header.memory_mib, &header.qemu_version)))
        .map_err(|e| fail("check", e.to_string()))?;
    Ok(())
}

/// QEMU's version as its QMP greeting states it; recorded in state files.
pub fn qemu_version(qmp: &Qmp) -> String {
    let v = &qmp.greeting().version;
    format!("{}.{}.{} {}", v.qemu.major, v.qemu.minor, v.qemu.micro, v.package.trim())
}
