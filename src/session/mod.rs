//! One build's VMs on the host: the switch, the guest and the controller, the command's output
//! streamed into the build log, the verdict read from the exchange directory, and everything
//! torn down on every path.
//!
//! The lifecycle, in order: [`prepare`](prepare::prepare) the files; start the switch, then
//! both QEMUs; revive each VM from its state file or boot it (the suspend stage then saves the
//! controller waiting for its session); send the controller its session line; [`watch`] the
//! pair until the controller reports the command's verdict; save the pair when asked
//! ([`After::SavePair`], [`After::SaveLayer`]); tear down. Each wait has its own deadline and its own error; the
//! build's time-out and the signals Nix sends bound the whole.

mod config;
mod error;
mod prepare;
mod snapshot;
mod terminal;
pub mod watch;

pub use config::{
    vnc_from_env, After, BadTestFault, ControllerBoot, ExtraShare, GuestBoot, Limit, SaveTo, SessionConfig, Task,
    TestFault,
};
pub use error::{QemuFailure, RunError};
pub use prepare::{CONTROLLER_SERIAL_LOG, GUEST_SERIAL_LOG};
pub use snapshot::qemu_version;
pub use terminal::terminal_request;

use crate::protocol::{self, Verdict};
use crate::vm::process::{describe_status, ProcessGuard};
use crate::vm::qemu::{controller_shape, Export, KernelBoot, VmConfig, CONTROLLER_MAC, GUEST_MAC, VIRTIO_NET};
use crate::vm::qmp::{self, Qmp};
use crate::vm::screen::{self, Screens};
use crate::vm::state::StateHeader;
use crate::vm::vde::{VdeSwitch, CAPTURE_FILE, CAPTURE_LIMIT_MIB};
use crate::vm::wait::{wait_until, Deadline};
use crate::vm::{tail_lines, LOG_TAIL_LINES};
use error::io;
use prepare::Files;
use std::cell::Cell;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Command;
use tokio::signal::unix::{signal, Signal, SignalKind};
use watch::{Failure, Phase, Seen, Step};

/// A QEMU's QMP socket answering; the controller's init reaching its session prompt.
pub const QEMU_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Writing the session line into the controller's second serial port.
pub const SESSION_LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a killed process group may take to disappear after teardown.
pub const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// The guest's second QMP socket, for its screenshots (in the work folder, with them in
/// `screens/`).
pub const GUEST_SCREEN_SOCKET: &str = "guest-screen.sock";
pub const SCREENS_DIR: &str = "screens";
/// How often the watch loop looks at the pair and pumps the command's output.
const WATCH_INTERVAL: Duration = Duration::from_millis(20);

/// Where a session reports its progress: the builder prints it into the build log.
pub trait Report {
    fn say(&self, line: &str);

    /// The session begins a phase ("reviving the VMs"): the builder sends it to Nix as the
    /// build's phase, and keeps it in the stage's report.
    fn phase(&self, _name: &str) {}

    /// New bytes of the exchange directory's output log: the agent's own lines, and a
    /// build's output (unless the session splits the command's streams).
    fn log(&self, bytes: &[u8]);
}

/// What the session is doing from now on: for the time-out's message, and the build's phase.
fn now_doing(doing: &Cell<&'static str>, report: &dyn Report, what: &'static str) {
    if doing.get() != what {
        doing.set(what);
        report.phase(what);
    }
}

/// Bytes to this process's stdout or stderr at once, as they came (a closed one drops them).
pub fn pass_on(to: &mut dyn Write, bytes: &[u8]) {
    let _ = to.write_all(bytes);
    let _ = to.flush();
}

fn spawn_qemu(cfg: &SessionConfig, vm: &VmConfig, log: &Path) -> Result<ProcessGuard, RunError> {
    let out = std::fs::File::create(log).map_err(io(format!("creating {}", log.display())))?;
    let err = out.try_clone().map_err(io(format!("creating {}", log.display())))?;
    let mut cmd = Command::new(&cfg.tools.qemu);
    cmd.args(crate::vm::qemu::firmware_args(&cfg.tools.qemu))
        .args(vm.args())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    ProcessGuard::spawn(&vm.name, cmd).map_err(RunError::Spawn)
}

async fn qmp_up(name: &str, guard: &mut ProcessGuard, sock: &Path, log: &Path) -> Result<Qmp, RunError> {
    let not_up = |detail: QemuFailure| RunError::QemuNotUp {
        name: name.into(),
        detail: Box::new(detail),
        log_tail: tail_lines(log, LOG_TAIL_LINES),
    };
    tokio::select! {
        r = Qmp::connect(sock, QEMU_UP_TIMEOUT) => r.map_err(|e| not_up(QemuFailure::Qmp(e))),
        s = guard.wait() => Err(not_up(QemuFailure::Exited(describe_status(s)))),
    }
}

/// Hands on the new bytes of a file the agent appends to.
struct Tail {
    path: PathBuf,
    offset: u64,
}

impl Tail {
    fn new(path: PathBuf) -> Tail {
        Tail { path, offset: 0 }
    }

    fn pump(&mut self, sink: &mut dyn FnMut(&[u8])) {
        let Ok(mut f) = std::fs::File::open(&self.path) else { return };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if let Ok(n) = f.read_to_end(&mut buf) {
            if n > 0 {
                self.offset += n as u64;
                sink(&buf);
            }
        }
    }
}

/// What the agent writes while the command runs: its output log, to [`Report::log`]; and,
/// when the command's streams are split ([`SessionConfig::split_streams`]), its stdout to
/// this process's stdout and its stderr to this process's stderr.
struct Outputs {
    log: Tail,
    streams: Option<(Tail, Tail)>,
}

impl Outputs {
    fn new(xchg: &Path, split: bool) -> Outputs {
        Outputs {
            log: Tail::new(xchg.join(protocol::OUTPUT_LOG)),
            streams: split.then(|| {
                (Tail::new(xchg.join(protocol::COMMAND_STDOUT)), Tail::new(xchg.join(protocol::COMMAND_STDERR)))
            }),
        }
    }

    fn pump(&mut self, report: &dyn Report) {
        self.log.pump(&mut |bytes| report.log(bytes));
        if let Some((stdout, stderr)) = &mut self.streams {
            stdout.pump(&mut |bytes| pass_on(&mut std::io::stdout().lock(), bytes));
            stderr.pump(&mut |bytes| pass_on(&mut std::io::stderr().lock(), bytes));
        }
    }
}

/// How Nix stops a build: SIGTERM or SIGINT, or, killed with SIGKILL, by leaving the build log
/// unread. Every long wait of a stage selects on [`NixWatch::stopped`].
pub struct NixWatch {
    term: Signal,
    int: Signal,
}

impl NixWatch {
    /// Installs the signal handlers (before the wait, so that no signal is missed).
    pub fn new() -> Result<NixWatch, RunError> {
        Ok(NixWatch {
            term: signal(SignalKind::terminate()).map_err(io("installing signal handlers"))?,
            int: signal(SignalKind::interrupt()).map_err(io("installing signal handlers"))?,
        })
    }

    /// Resolves when Nix stops the build, with the error that says how.
    pub async fn stopped(&mut self) -> RunError {
        tokio::select! {
            _ = self.term.recv() => RunError::Interrupted { signal: "SIGTERM" },
            _ = self.int.recv() => RunError::Interrupted { signal: "SIGINT" },
            _ = crate::vm::process::log_reader_gone() => RunError::LogClosed,
        }
    }
}

/// Runs the command in a fresh guest. On every path, the VMs and the switch are gone when this
/// returns.
pub async fn run(cfg: &SessionConfig, report: &dyn Report) -> Result<Verdict, RunError> {
    run_then(cfg, report, |_| ()).await.map(|(verdict, ())| verdict)
}

/// [`run`], and `then` with the verdict, on a thread of its own while the VMs are torn down
/// (a build unpacks its outputs meanwhile: the guest's writes are in the outputs disk's file
/// before the command's verdict). Its result comes back with the verdict; `then` does not run
/// when there is none.
pub async fn run_then<T: Send + 'static>(
    cfg: &SessionConfig,
    report: &dyn Report,
    then: impl FnOnce(&Verdict) -> T + Send + 'static,
) -> Result<(Verdict, T), RunError> {
    let mut nix = NixWatch::new()?;
    let deadline = tokio::time::sleep(cfg.task.timeout);
    tokio::pin!(deadline);
    // What the session was doing, for the time-out's message.
    let doing = Cell::new("preparing the session's files");
    let work = async {
        let files = prepare::prepare(cfg)?;
        report.say("controller initramfs ready");
        run_prepared(cfg, &files, report, &doing, then).await
    };
    tokio::pin!(work);
    let mut screens = cfg.guest.machine.display.then(|| {
        let screens = Screens::new("guest", cfg.work.join(SCREENS_DIR), cfg.work.join(GUEST_SCREEN_SOCKET));
        match &cfg.timeline {
            Some(dir) => screens.with_timeline(dir),
            None => screens,
        }
    });
    let say = |line: &str| report.say(line);
    let result = tokio::select! {
        r = screen::during(screens.as_mut(), work.as_mut(), &say) => r,
        _ = &mut deadline => {
            let during = doing.get();
            // A guest that never answered: what its console said is the first clue.
            let log_tail = if during == Phase::Connecting.doing() {
                tail_lines(&cfg.work.join(prepare::GUEST_SERIAL_LOG), LOG_TAIL_LINES)
            } else {
                String::new()
            };
            Err(RunError::Timeout { secs: cfg.task.timeout.as_secs(), limit: cfg.task.limit, during, log_tail })
        }
        stopped = nix.stopped() => Err(stopped),
    };
    let result = match (result, screens.as_mut()) {
        // Nix is waiting for the build to end: no screenshot then.
        (Err(e @ (RunError::Interrupted { .. } | RunError::LogClosed)), _) => Err(e),
        // The VMs still run (the work is not dropped yet): the screen as the failure left it.
        (Err(error), Some(screens)) => {
            screens.capture().await;
            Err(RunError::with_screen(error, screens))
        }
        (r, _) => r,
    };
    // Returning drops the `work` future (pinned in this frame), and with it every guard it
    // owns: QEMUs and switch killed and reaped.
    result
}

/// The guest's and the controller's QEMU configurations, on `switch`.
fn vm_configs(cfg: &SessionConfig, files: &Files, switch: &Path) -> (VmConfig, VmConfig) {
    let w = &cfg.work;
    let guest = VmConfig {
        name: "guest".into(),
        shape: cfg.shape.clone(),
        boot: cfg.guest.machine.boot.clone(),
        nic_model: cfg.guest.machine.nic_model,
        extra_args: {
            let mut a = cfg.guest.machine.extra_args.clone();
            // A display backend, not a device: a revived guest takes it as well.
            if cfg.vnc {
                a.extend([
                    "-vnc".into(),
                    format!("unix:{}", crate::vm::qemu::option_path(&w.join(config::VNC_SOCKET))).into(),
                ]);
            }
            a
        },
        no_reboot: true,
        serial_log: files.guest_serial.clone(),
        vde_ctl: Some(switch.to_path_buf()),
        mac: GUEST_MAC.into(),
        qmp: Some(w.join("guest-qmp.sock")),
        exports: vec![],
        disk: cfg.guest.machine.disk.clone(),
        // Deferred: the state file is checked against this QEMU's version before it loads.
        incoming: cfg.guest.revive_from.as_ref().map(|_| "defer".to_owned()),
        ram: cfg.guest.ram.clone(),
        hyperv: cfg.guest.machine.hyperv,
        screen: cfg.guest.machine.display.then(|| w.join(GUEST_SCREEN_SOCKET)),
        uefi: cfg.guest.machine.uefi.clone(),
    };
    // A ready controller's devices are the same at its save and each revive: the store and
    // the exchange directory, and its system disk. A booted one also sees the host's root (its
    // agent and smbd) and the direct run's extra shares.
    let mut exports = vec![
        // Read-only: the outputs come back on the guest's outputs disk, and nothing else the
        // guest does may touch the store.
        Export { tag: "store".into(), path: cfg.store_dir.clone(), readonly: true },
        Export { tag: "xchg".into(), path: files.xchg.clone(), readonly: false },
    ];
    let mut extra_args = vec![
        "-chardev".into(),
        format!(
            "socket,id=session,path={},server=on,wait=off",
            crate::vm::qemu::option_path(&w.join("controller-session.sock"))
        )
        .into(),
        "-device".into(),
        "isa-serial,chardev=session".into(),
    ];
    match &cfg.controller.system {
        Some(disk) => extra_args.extend([
            "-drive".into(),
            format!(
                "if=none,id=system,format={},readonly=on,file={}",
                // A pinned image's copy is a compressed qcow2; the guest sees the same disk.
                if disk.extension().is_some_and(|e| e == "qcow2") { "qcow2" } else { "raw" },
                crate::vm::qemu::option_path(disk)
            )
            .into(),
            "-device".into(),
            "virtio-blk-pci,drive=system".into(),
        ]),
        None => {
            exports.insert(0, Export { tag: "root".into(), path: "/".into(), readonly: true });
            for (i, s) in cfg.extra_shares.iter().enumerate() {
                exports.push(Export { tag: format!("share{i}"), path: s.host_path.clone(), readonly: false });
            }
        }
    }
    let controller = VmConfig {
        name: "controller".into(),
        shape: controller_shape(&cfg.shape),
        boot: Some(KernelBoot {
            kernel: cfg.controller.kernel.clone(),
            initrd: files.controller_initrd.clone(),
            append: crate::vm::kernel::APPEND.into(),
        }),
        nic_model: VIRTIO_NET,
        // ttyS1: where the session arrives; the system disk.
        extra_args,
        no_reboot: true,
        serial_log: files.controller_serial.clone(),
        vde_ctl: Some(switch.to_path_buf()),
        mac: CONTROLLER_MAC.into(),
        qmp: Some(w.join("controller-qmp.sock")),
        exports,
        disk: None,
        incoming: cfg.controller.revive_from.as_ref().map(|_| "defer".to_owned()),
        // Small, and saved with the pair: its RAM goes in its state.
        ram: crate::vm::memory::GuestRam::Anonymous,
        hyperv: false,
        // A serial console is all it has.
        screen: None,
        uefi: None,
    };
    (guest, controller)
}

/// The processes of a session, in start order; dropped in reverse, each guard killing and
/// reaping its group.
struct Pair {
    switch: VdeSwitch,
    guest: ProcessGuard,
    controller: ProcessGuard,
}

async fn run_prepared<T: Send + 'static>(
    cfg: &SessionConfig,
    files: &Files,
    report: &dyn Report,
    doing: &Cell<&'static str>,
    then: impl FnOnce(&Verdict) -> T + Send + 'static,
) -> Result<(Verdict, T), RunError> {
    let w = &cfg.work;
    now_doing(doing, report, "starting the switch");
    let mut switch = VdeSwitch::start(&cfg.tools.vde_switch, w).await.map_err(RunError::Switch)?;
    report.say("switch up");
    // A debugging aid only: a capture that cannot start is said and the session goes on.
    match switch.capture(&w.join(CAPTURE_FILE)) {
        Ok(()) => report.say(&format!("network captured in {CAPTURE_FILE} (at most {CAPTURE_LIMIT_MIB} MiB)")),
        Err(e) => report.say(&format!("no network capture: {e}")),
    }
    let (guest_vm, controller_vm) = vm_configs(cfg, files, &switch.ctl);
    let guest_log = w.join("guest-qemu.log");
    let controller_log = w.join("controller-qemu.log");
    prepare::write_run_vm_script(cfg);
    now_doing(doing, report, "starting the VMs");
    let guest = spawn_qemu(cfg, &guest_vm, &guest_log)?;
    let controller = spawn_qemu(cfg, &controller_vm, &controller_log)?;
    let mut pair = Pair { switch, guest, controller };
    let mut guest_qmp = qmp_up("guest", &mut pair.guest, &w.join("guest-qmp.sock"), &guest_log).await?;
    report.say("guest up");
    if cfg.vnc {
        let sock = w.join(config::VNC_SOCKET);
        report.say(&format!("the guest's screen is on VNC at {}: vncviewer {}", sock.display(), sock.display()));
    }
    let mut ctl_qmp =
        qmp_up("controller", &mut pair.controller, &w.join("controller-qmp.sock"), &controller_log).await?;
    report.say("controller up");
    // Both loads at once: each is a QEMU reading its own stream.
    now_doing(doing, report, "reviving the VMs");
    let (guest_vm, controller_vm) = (&mut pair.guest, &mut pair.controller);
    let guest_load = async {
        if let Some(state) = &cfg.guest.revive_from {
            let ram = (&cfg.guest.ram, &cfg.guest.ram_layers[..]);
            snapshot::revive(cfg, "guest", state, &cfg.shape, ram, &mut guest_qmp, guest_vm, &guest_log).await?;
            report.say("guest revived");
        }
        Ok::<_, RunError>(())
    };
    let controller_load = async {
        if let Some(state) = &cfg.controller.revive_from {
            let (qmp, shape) = (&mut ctl_qmp, &controller_shape(&cfg.shape));
            let ram = (&crate::vm::memory::GuestRam::Anonymous, &[][..]);
            snapshot::revive(cfg, "controller", state, shape, ram, qmp, controller_vm, &controller_log).await?;
            report.say("controller revived");
        }
        Ok::<_, RunError>(())
    };
    let (g, c) = tokio::join!(guest_load, controller_load);
    g?;
    c?;
    // The verdict; whether the pair was saved (an image's disk then must reach the host's
    // disk); what must stay open while the command runs (the session port, or the terminal's
    // relay through it).
    let (verdict, saved, _session) = match &cfg.task.after {
        After::SavePair(to) => {
            now_doing(doing, report, "waiting for the controller to be ready to serve");
            save_when_ready(cfg, files, &mut pair, (&mut guest_qmp, &mut ctl_qmp), to, report, doing).await?;
            (Verdict::Exited(0), true, (None, None))
        }
        After::Quit | After::SaveLayer(_) => {
            if cfg.controller.revive_from.is_none() {
                // A booted controller takes the line once its init holds the port open.
                now_doing(doing, report, "booting the controller");
                controller_waiting(files, &mut pair.controller).await?;
            }
            report.say("controller ready");
            now_doing(doing, report, "sending the controller its session");
            let session_port = send_session(&w.join("controller-session.sock"), &files.session_line).await?;
            report.say("session sent");
            // An interactive login travels through the same port once the line is read.
            let session = match (&cfg.terminal, &cfg.login_socket) {
                (Some(_), Some(socket)) => {
                    let relay = terminal::start_socket(session_port, socket)
                        .map_err(io(format!("joining {} to the session port", socket.display())))?;
                    (Some(relay), None)
                }
                (Some(_), None) => {
                    let relay =
                        terminal::start(session_port).map_err(io("joining the terminal to the session port"))?;
                    (Some(relay), None)
                }
                (None, _) => (None, Some(session_port)),
            };
            let verdict = watch_pair(files, cfg.split_streams, &mut pair, report, doing).await?;
            report.say("command finished");
            let mut saved = false;
            if let (After::SaveLayer(to), Verdict::Exited(0)) = (&cfg.task.after, &verdict) {
                now_doing(doing, report, "waiting for the controller to be ready to serve again");
                save_when_ready(cfg, files, &mut pair, (&mut guest_qmp, &mut ctl_qmp), to, report, doing).await?;
                saved = true;
            }
            (verdict, saved, session)
        }
    };
    let for_then = verdict.clone();
    let after = tokio::task::spawn_blocking(move || then(&for_then));
    now_doing(doing, report, "stopping the VMs");
    if saved {
        // The image keeps the guest's disk: QMP's `quit` flushes it to the host's disk.
        let _ = tokio::time::timeout(Duration::from_secs(2), guest_qmp.execute(&qmp::Quit)).await;
    } else {
        // The guest has nothing left to do: stopped at once, without a shutdown dance. Not
        // with QMP's `quit`, which flushes its disks to the host's disk first (77 ms after 50
        // MB of outputs, here): its outputs disk and overlay are read or thrown away, and what
        // the guest wrote is in their files already.
        pair.guest.kill_group();
    }
    let torn = teardown(&mut pair).await;
    if torn.is_ok() {
        report.say("VMs stopped");
    }
    let after = after.await.map_err(RunError::After);
    torn?;
    Ok((verdict, after?))
}

/// A booted controller prints its marker, then waits for its session line.
async fn controller_waiting(files: &Files, controller: &mut ProcessGuard) -> Result<(), RunError> {
    let marker = protocol::WAITING_MARKER;
    let serial = &files.controller_serial;
    let what = format!("the controller's init ('{marker}')");
    let waited = tokio::select! {
        r = wait_until(&what, QEMU_UP_TIMEOUT, || {
            let seen = std::fs::read_to_string(serial).map(|t| t.contains(marker)).unwrap_or(false);
            async move { seen.then_some(()) }
        }) => r.map_err(QemuFailure::NotWaiting),
        s = controller.wait() => Err(QemuFailure::Ended(describe_status(s))),
    };
    waited.map_err(|detail| RunError::QemuNotUp {
        name: "controller".into(),
        detail: Box::new(detail),
        log_tail: tail_lines(serial, LOG_TAIL_LINES),
    })
}

/// Once the controller says it is ready to serve, the pair saved into `to`; the controller
/// told to quit (the guest's QMP stays for the caller's teardown).
async fn save_when_ready(
    cfg: &SessionConfig,
    files: &Files,
    pair: &mut Pair,
    (guest_qmp, ctl_qmp): (&mut Qmp, &mut Qmp),
    to: &SaveTo,
    report: &dyn Report,
    doing: &Cell<&'static str>,
) -> Result<(), RunError> {
    controller_ready(files, pair, report).await?;
    report.say("controller ready");
    now_doing(doing, report, "saving the pair");
    save_pair(cfg, guest_qmp, ctl_qmp, to).await?;
    report.say(&format!("pair saved: {} and {}", to.guest_state.display(), to.controller_state.display()));
    let _ = tokio::time::timeout(Duration::from_secs(2), ctl_qmp.execute(&qmp::Quit)).await;
    Ok(())
}

/// Both VMs stopped at once (so that neither sends the other anything the saved other would
/// not have seen), then each streamed into its state file.
async fn save_pair(cfg: &SessionConfig, guest_qmp: &mut Qmp, ctl_qmp: &mut Qmp, to: &SaveTo) -> Result<(), RunError> {
    let SaveTo { guest_state, guest: guest_name, controller_state } = to;
    let stop = |vm: &'static str| move |source| RunError::Qmp { vm: vm.into(), step: "stopping", source };
    let (g, c) = tokio::join!(guest_qmp.execute(&qmp::Stop), ctl_qmp.execute(&qmp::Stop));
    g.map_err(stop("guest"))?;
    c.map_err(stop("controller"))?;
    let controller_header = StateHeader::new(qemu_version(ctl_qmp), "controller", &controller_shape(&cfg.shape));
    let guest_header = StateHeader {
        ram_outside: cfg.guest.ram.outside_the_stream(),
        ..StateHeader::new(qemu_version(guest_qmp), guest_name, &cfg.shape)
    };
    snapshot::save(cfg, ctl_qmp, controller_state, &controller_header).await?;
    snapshot::save(cfg, guest_qmp, guest_state, &guest_header).await?;
    Ok(())
}

/// A controller started from its system disk says [`protocol::READY_MARKER`] once it serves
/// and the guest is prepared; meanwhile its progress lines go into the build log. The stage's
/// time-out bounds the wait (a Windows guest's first boot is long).
async fn controller_ready(files: &Files, pair: &mut Pair, report: &dyn Report) -> Result<(), RunError> {
    let mut shown = 0;
    loop {
        let text = std::fs::read_to_string(&files.controller_serial).unwrap_or_default();
        for line in text.lines().skip(shown) {
            if line.starts_with("nix-winvm: ") || line.starts_with("winvm-controller: ") {
                report.say(line.trim_start_matches("nix-winvm: "));
            }
        }
        shown = text.lines().count();
        if text.contains(protocol::READY_MARKER) {
            return Ok(());
        }
        let failed = |status| RunError::ControllerNotReady {
            status: describe_status(status),
            log_tail: tail_lines(&files.controller_serial, LOG_TAIL_LINES),
        };
        if let Some(status) = pair.controller.try_exited() {
            return Err(failed(status));
        }
        if let Some(status) = pair.guest.try_exited() {
            return Err(RunError::GuestDroppedOut {
                status: describe_status(status),
                log_tail: tail_lines(&files.guest_serial, LOG_TAIL_LINES),
            });
        }
        tokio::time::sleep(WATCH_INTERVAL).await;
    }
}

/// Drives [`watch::Phase`] with what the pair does until the controller has the verdict,
/// streaming the command's output into the build log meanwhile. Bounded by the build's
/// time-out, which [`run`] keeps.
async fn watch_pair(
    files: &Files,
    split_streams: bool,
    pair: &mut Pair,
    report: &dyn Report,
    doing: &Cell<&'static str>,
) -> Result<Verdict, RunError> {
    let mut outputs = Outputs::new(&files.xchg, split_streams);
    let ssh_ready_file = files.xchg.join(protocol::WAITING_DONE);
    let exit_file = files.xchg.join(protocol::EXIT_FILE);
    let mut phase = Phase::Connecting;
    now_doing(doing, report, phase.doing());
    loop {
        outputs.pump(report);
        let mut seen = Seen {
            ssh_ready: phase != Phase::Connecting || ssh_ready_file.exists(),
            guest_exit: pair.guest.try_exited(),
            controller_exit: pair.controller.try_exited(),
            switch_exit: pair.switch.guard.try_exited(),
            exit_file: None,
        };
        if phase.needs_exit_file(&seen) {
            // The agent writes the exit file after the last output: read in this order, all
            // of the output is pumped.
            seen.exit_file = std::fs::read_to_string(&exit_file).ok();
            outputs.pump(report);
        }
        let failure = match phase.step(&seen, Instant::now()) {
            Step::Wait(next) => {
                if phase == Phase::Connecting && next != Phase::Connecting {
                    report.say("ssh ready");
                }
                phase = next;
                now_doing(doing, report, phase.doing());
                tokio::time::sleep(WATCH_INTERVAL).await;
                continue;
            }
            Step::Done(verdict) => return Ok(verdict),
            Step::Fail(failure) => failure,
        };
        let guest_tail = || tail_lines(&files.guest_serial, LOG_TAIL_LINES);
        let controller_tail = || tail_lines(&files.controller_serial, LOG_TAIL_LINES);
        return Err(match failure {
            Failure::GuestDroppedOut(s) => {
                RunError::GuestDroppedOut { status: describe_status(s), log_tail: guest_tail() }
            }
            Failure::GuestDied(s) => RunError::GuestDied { status: describe_status(s), log_tail: guest_tail() },
            Failure::ControllerDied(s) => {
                RunError::ControllerDied { status: describe_status(s), log_tail: controller_tail() }
            }
            Failure::SwitchDied(s) => RunError::SwitchDied { status: describe_status(s) },
            Failure::NoExitCode => RunError::NoExitCode { log_tail: controller_tail() },
            Failure::Agent(error) => RunError::Agent { error, log_tail: guest_tail() },
        });
    }
}

/// Stops the pair, both QEMUs at once (neither needs the other any more), then the switch they
/// were plugged into; then each group must be gone, or the survivors are named.
async fn teardown(pair: &mut Pair) -> Result<(), RunError> {
    let grace = Duration::from_secs(2);
    tokio::join!(pair.controller.shutdown(grace), pair.guest.shutdown(grace));
    pair.switch.guard.shutdown(grace).await;
    for guard in [&pair.controller, &pair.guest, &pair.switch.guard] {
        let name = guard.name().to_owned();
        // Killed processes take a moment to go: looked at often, the builder ends sooner.
        let deadline =
            Deadline::new(format!("the {name}'s processes to end"), TEARDOWN_TIMEOUT).every(Duration::from_millis(5));
        while !guard.survivors().is_empty() {
            if deadline.check().is_err() {
                return Err(RunError::Survived { name, processes: describe_processes(&guard.survivors()) });
            }
            deadline.pause().await;
        }
    }
    Ok(())
}

fn describe_processes(ps: &[(i32, String)]) -> String {
    ps.iter().map(|(pid, name)| format!("{name} (pid {pid})")).collect::<Vec<_>>().join(", ")
}

/// Sends the session line, with the host's clock (a revived controller's lags); the returned
/// connection must stay open while the session runs, so that QEMU can hand the line over as
/// the controller reads it.
async fn send_session(sock: &Path, line: &str) -> Result<tokio::net::UnixStream, RunError> {
    use tokio::io::AsyncWriteExt;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let line = format!("NOW={now} {line}");
    let port = |source| RunError::SessionPort { path: sock.to_path_buf(), source };
    let deadline = Deadline::new(
        format!("the controller's session port {} to take the line", sock.display()),
        SESSION_LINE_TIMEOUT,
    );
    let send = async {
        let mut s = tokio::net::UnixStream::connect(sock).await.map_err(port)?;
        s.write_all(line.as_bytes()).await.map_err(port)?;
        Ok(s)
    };
    tokio::time::timeout(deadline.remaining(), send)
        .await
        .map_err(|_| RunError::SessionLineTimeout(deadline.timed_out()))?
}
