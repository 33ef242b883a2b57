//! Saving a VM's memory into a state file, and reviving a VM from one. QEMU streams the
//! memory through this program (`state-write`, `state-read`), which frames, checksums and
//! compresses it; see `vm::state`. The session starts that process itself and hands QEMU its
//! end of the pipe over QMP (`getfd`, then an `fd:` URI): QEMU runs no shell, so the sandbox
//! needs none.

use super::error::io;
use super::error::{QemuFailure, RunError};
use super::SessionConfig;
use crate::protocol::Subcommand;
use crate::spec::MachineShape;
use crate::vm::memory::{self, GuestRam};
use crate::vm::process::{self, describe_status, ProcessGuard};
use crate::vm::qmp::{self, Qmp};
use crate::vm::state::{self, StateHeader};
use crate::vm::{tail_lines, LOG_TAIL_LINES};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// Loading or saving a state file; TCG writes a 256 MiB guest in seconds, Windows' 4 GiB in
/// minutes.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// QEMU reports a save complete when it has written the last byte; the writer may still be
/// flushing and renaming (and the reader checking the trailer after a load).
pub const STATE_FILE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a failed load waits for the state reader's verdict.
const READER_VERDICT_GRACE: Duration = Duration::from_secs(5);

/// The name QEMU knows the pipe by.
const STATE_FD: &str = "winvm-state";

/// The state reader or writer: this program, on one end of a pipe whose other end QEMU gets.
fn state_process(
    cfg: &SessionConfig,
    name: &str,
    sub: &crate::protocol::Subcommand,
    qemu_reads: bool,
) -> Result<(ProcessGuard, OwnedFd), RunError> {
    let (read, write) = process::pipe().map_err(io(format!("creating the {name}'s pipe")))?;
    let mut cmd = Command::new(&cfg.agent);
    cmd.args(sub.args()).stderr(Stdio::inherit());
    let qemus_end = if qemu_reads {
        cmd.stdin(Stdio::null()).stdout(Stdio::from(write));
        read
    } else {
        cmd.stdin(Stdio::from(read)).stdout(Stdio::null());
        write
    };
    let guard = ProcessGuard::spawn(name, cmd).map_err(RunError::Spawn)?;
    // The command was dropped with our copy of the child's end: only QEMU's end is left here.
    Ok((guard, qemus_end))
}

/// QEMU's version as its QMP greeting states it; recorded in state files.
pub fn qemu_version(qmp: &Qmp) -> String {
    let v = &qmp.greeting().version;
    format!("{}.{}.{} {}", v.qemu.major, v.qemu.minor, v.qemu.micro, v.package.trim())
}

/// QEMU's migration capability that leaves RAM in a shared file out of the stream.
const IGNORE_SHARED: &str = "x-ignore-shared";

/// Tells QEMU to leave the RAM in a file out of the stream, at a save and at a revive alike
/// (the capability changes the stream's layout).
async fn ignore_shared(qmp: &mut Qmp) -> Result<(), qmp::QmpError> {
    let capabilities = vec![qmp::MigrationCapability { capability: IGNORE_SHARED.into(), state: true }];
    qmp.execute(&qmp::MigrateSetCapabilities { capabilities }).await.map(|_| ())
}

/// An incoming VM loads its devices' state (and its memory, unless `ram` is a file: the
/// layers' pages `ram_layers` are then written into it first), then waits paused until told to
/// continue.
#[allow(clippy::too_many_arguments)]
pub(super) async fn revive(
    cfg: &SessionConfig,
    name: &str,
    state: &Path,
    shape: &MachineShape,
    (ram, ram_layers): (&GuestRam, &[PathBuf]),
    qmp: &mut Qmp,
    vm: &mut ProcessGuard,
    log: &Path,
) -> Result<(), RunError> {
    let reader_error = cfg.work.join(format!("{name}-state-read.err"));
    // The state reader's own verdict (a corrupt file) comes first; QEMU's view follows.
    let failed = |detail: QemuFailure| {
        let detail = Box::new(detail);
        let log_tail = tail_lines(log, LOG_TAIL_LINES);
        let image = state.parent().unwrap_or(state).to_path_buf();
        if let Ok(reader) = std::fs::read_to_string(&reader_error) {
            if !reader.trim().is_empty() {
                return RunError::StateLoad {
                    name: name.into(),
                    reader: reader.trim().into(),
                    image,
                    detail,
                    log_tail,
                };
            }
        }
        // A whole file that QEMU refuses as another VM: made by another QEMU.
        let output = std::fs::read(log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        match state::incompatible_load(&output) {
            Some(qemu_said) => RunError::StateIncompatible {
                name: name.into(),
                state: state.to_path_buf(),
                qemu_said,
                pinned: cfg.pinned_image,
                log_tail,
            },
            None => RunError::QemuNotUp { name: name.into(), detail, log_tail },
        }
    };
    let version = qemu_version(qmp);
    // The caller checked the frame; here what needs this QEMU: its version, the memory.
    let wanted = state::Wanted { memory_mib: shape.memory_mib, qemu_version: &version, machine: &shape.machine_type };
    let info = state::inspect(state, Some(wanted)).map_err(RunError::State)?;
    let step = |step: &'static str| move |source| failed(QemuFailure::Step { step, source });
    if info.header.ram_outside != ram.outside_the_stream() {
        let mismatch =
            state::StateFileError::RamMismatch { path: state.to_path_buf(), saved_outside: info.header.ram_outside };
        return Err(RunError::State(mismatch));
    }
    if ram.outside_the_stream() {
        ignore_shared(qmp).await.map_err(step("leaving the RAM file out of the load"))?;
        if let (GuestRam::Private(mapped), false) = (ram, ram_layers.is_empty()) {
            // Before the load: QEMU starts the guest as soon as the stream ends.
            memory::apply_to_process(vm.pid(), mapped, ram_layers, shape.memory_mib).map_err(RunError::Memory)?;
        }
    }
    let sub = Subcommand::StateRead { input: state.to_path_buf(), error_to: Some(reader_error.clone()) };
    let (mut reader, qemus_end) = state_process(cfg, &format!("{name}'s state reader"), &sub, true)?;
    qmp.pass_fd(STATE_FD, qemus_end.as_fd()).await.map_err(step("handing QEMU the state"))?;
    drop(qemus_end);
    let uri = format!("fd:{STATE_FD}");
    qmp.execute(&qmp::MigrateIncoming { uri }).await.map_err(step("starting the load"))?;
    let loaded = tokio::select! {
        r = qmp.wait_incoming(MIGRATION_TIMEOUT) => {
            r.map_err(|source| QemuFailure::Step { step: "loading the saved state", source })
        }
        s = vm.wait() => Err(QemuFailure::EndedLoading(describe_status(s))),
    };
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(detail) => {
            // A corrupt file fails QEMU before the reader reaches the checksum, which it still
            // finishes: its verdict says why, so it gets a moment to write it.
            let _ = tokio::time::timeout(READER_VERDICT_GRACE, reader.wait()).await;
            return Err(failed(detail));
        }
    };
    // QEMU has read the whole stream; the reader has then checked the trailer and ended.
    let status = tokio::time::timeout(STATE_FILE_TIMEOUT, reader.wait())
        .await
        .map_err(|_| failed(QemuFailure::ReaderLate { after: STATE_FILE_TIMEOUT }))?;
    if !status.success() {
        return Err(failed(QemuFailure::ReaderFailed(describe_status(status))));
    }
    if loaded != "running" {
        qmp.execute(&qmp::Cont).await.map_err(step("continuing after the load"))?;
    }
    Ok(())
}

/// Stops the VM and streams its memory into `path`; the VM stays stopped.
pub(super) async fn save(
    cfg: &SessionConfig,
    qmp: &mut Qmp,
    path: &Path,
    header: &StateHeader,
) -> Result<(), RunError> {
    let vm = header.guest.clone();
    let step = |step: &'static str| {
        let vm = vm.clone();
        move |source| RunError::Qmp { vm, step, source }
    };
    qmp.execute(&qmp::Stop).await.map_err(step("stopping"))?;
    if header.ram_outside {
        ignore_shared(qmp).await.map_err(step("leaving the RAM file out of the save of"))?;
    }
    let sub = Subcommand::StateWrite {
        out: path.to_path_buf(),
        memory_mib: header.memory_mib,
        qemu_version: header.qemu_version.clone(),
        guest: header.guest.clone(),
        machine: header.machine.clone(),
        ram_outside: header.ram_outside,
    };
    let (mut writer, qemus_end) = state_process(cfg, &format!("{vm}'s state writer"), &sub, false)?;
    qmp.pass_fd(STATE_FD, qemus_end.as_fd()).await.map_err(step("handing the state writer's pipe to"))?;
    drop(qemus_end);
    qmp.execute(&qmp::Migrate { uri: format!("fd:{STATE_FD}") }).await.map_err(step("starting to save"))?;
    qmp.wait_migration(MIGRATION_TIMEOUT).await.map_err(step("saving the memory of"))?;
    // QEMU closes its end when the migration completes; the writer then checks what it wrote,
    // renames the file into place and ends.
    let what = format!("the {vm}'s state writer to finish {}", path.display());
    let status = tokio::time::timeout(STATE_FILE_TIMEOUT, writer.wait())
        .await
        .map_err(|_| RunError::StateWriter(crate::vm::wait::TimedOut { what, after: STATE_FILE_TIMEOUT }))?;
    if !status.success() {
        return Err(RunError::StateWriterFailed { name: vm.clone(), status: describe_status(status) });
    }
    let wanted =
        state::Wanted { memory_mib: header.memory_mib, qemu_version: &header.qemu_version, machine: &header.machine };
    state::inspect(path, Some(wanted)).map_err(RunError::State)?;
    Ok(())
}
