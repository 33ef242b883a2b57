//! Saving a VM's memory into a state file, and reviving a VM from one. QEMU streams the
//! memory through this program (`state-write`, `state-read`), which frames, checksums and
//! compresses it; see `vm::state`.

use super::error::RunError;
use super::SessionConfig;
use crate::vm::process::{describe_status, ProcessGuard};
use crate::vm::qmp::{self, Qmp};
use crate::vm::state::{self, StateHeader};
use crate::vm::wait::wait_until;
use crate::vm::{tail_lines, LOG_TAIL_LINES};
use std::path::Path;
use std::time::Duration;

/// Loading or saving a state file; TCG writes a 256 MiB guest in seconds, Windows' 4 GiB in
/// minutes.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
/// QEMU reports a save complete when it has written the last byte; the writer may still be
/// flushing and renaming.
pub const STATE_FILE_TIMEOUT: Duration = Duration::from_secs(60);

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

/// QEMU's version as its QMP greeting states it; recorded in state files.
pub fn qemu_version(qmp: &Qmp) -> String {
    let v = &qmp.greeting().version;
    format!("{}.{}.{} {}", v.qemu.major, v.qemu.minor, v.qemu.micro, v.package.trim())
}

/// An incoming VM loads its memory, then waits paused until told to continue.
pub(super) async fn revive(
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
    state::inspect(state, Some((memory_mib, &version))).map_err(RunError::State)?;
    let uri = state_reader_uri(&cfg.agent, state, &reader_error);
    qmp.execute(&qmp::MigrateIncoming { uri }).await.map_err(|e| failed(format!("starting the load: {e}")))?;
    let loaded = tokio::select! {
        r = qmp.wait_incoming(MIGRATION_TIMEOUT) => r.map_err(|e| failed(format!("loading the saved state: {e}"))),
        s = vm.wait() => Err(failed(format!("QEMU ended with {} while loading the saved state", describe_status(s)))),
    }?;
    if loaded != "running" {
        qmp.execute(&qmp::Cont).await.map_err(|e| failed(format!("continuing after the load: {e}")))?;
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
    let uri = format!(
        "exec:{} state-write --out {} --memory {} --qemu-version {} --guest {}",
        crate::shell::quote(&cfg.agent.display().to_string()),
        crate::shell::quote(&path.display().to_string()),
        header.memory_mib,
        crate::shell::quote(&header.qemu_version),
        crate::shell::quote(&header.guest),
    );
    qmp.execute(&qmp::Migrate { uri }).await.map_err(step("starting to save"))?;
    qmp.wait_migration(MIGRATION_TIMEOUT).await.map_err(step("saving the memory of"))?;
    // The file appears atomically: wait for it, then check its frame and header. The writer
    // checksummed what it wrote, so the body is not read again.
    wait_until(&format!("the state file {}", path.display()), STATE_FILE_TIMEOUT, || {
        let exists = path.exists();
        async move { exists.then_some(()) }
    })
    .await
    .map_err(RunError::StateWriter)?;
    state::inspect(path, Some((header.memory_mib, &header.qemu_version))).map_err(RunError::State)?;
    Ok(())
}
