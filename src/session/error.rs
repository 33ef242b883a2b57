//! How a session fails: one variant per step, each naming what it waited for or touched, with
//! the tail of the log that tells why.

use super::config::Limit;
use crate::controller::BadPath;
use crate::initramfs::linux::LinuxInitError;
use crate::protocol::ExitFileError;
use crate::vm::process::SpawnError;
use crate::vm::qmp::QmpError;
use crate::vm::state::StateFileError;
use crate::vm::vde::StartSwitchError;
use crate::vm::wait::TimedOut;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Writing the session's files into its work directory.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("the controller's session: {0}")]
    SessionLine(#[source] BadPath),
    /// The controller ended before it said it was ready to serve (suspend stage).
    #[error(
        "the controller ended ({status}) before it was ready to serve (smbd, the guest's SSH logon and its prepare command){}",
        tail("the controller's console", log_tail)
    )]
    ControllerNotReady { status: String, log_tail: String },
    #[error("the controller's initramfs: {0}")]
    ControllerInit(#[source] LinuxInitError),
    #[error("{0}")]
    Switch(#[source] StartSwitchError),
    #[error("{0}")]
    Spawn(#[source] SpawnError),
    #[error("the {name} VM did not come up: {detail}{}", tail(&format!("the {name}'s QEMU output"), log_tail))]
    QemuNotUp {
        name: String,
        #[source]
        detail: Box<QemuFailure>,
        log_tail: String,
    },
    /// Sending the controller its session line.
    #[error("sending the controller its session line on {}: {source}", path.display())]
    SessionPort { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    SessionLineTimeout(#[source] TimedOut),
    #[error(
        "the guest VM dropped out early (QEMU ended with {status} before SSH was reached){}",
        tail("the guest's serial log", log_tail)
    )]
    GuestDroppedOut { status: String, log_tail: String },
    #[error(
        "the guest VM died during the command (QEMU ended with {status}){}",
        tail("the guest's serial log", log_tail)
    )]
    GuestDied { status: String, log_tail: String },
    #[error(
        "the controller VM ended with {status} before the command finished{}",
        tail("the controller's serial log", log_tail)
    )]
    ControllerDied { status: String, log_tail: String },
    #[error("the VM produced no exit code{}", tail("the controller's serial log", log_tail))]
    NoExitCode { log_tail: String },
    /// The VDE switch between the guest and the controller ended mid-session.
    #[error(
        "the VDE switch between the guest and the controller ended ({status}) during the session: the pair was cut off"
    )]
    SwitchDied { status: String },
    #[error("the controller could not run the command: {error}{}", tail("the guest's serial log", log_tail))]
    Agent {
        #[source]
        error: ExitFileError,
        log_tail: String,
    },
    /// The session's own time-out, what sets it, and what the session was doing when it struck.
    #[error(
        "{} exceeded its timeout of {secs} s while {during}, and was stopped; if it needs longer, {}{}",
        limit.what(),
        limit.raise(),
        tail("the guest's serial log", log_tail)
    )]
    Timeout {
        secs: u64,
        limit: Limit,
        during: &'static str,
        /// The guest's serial log, when what it was waiting for was the guest.
        log_tail: String,
    },
    #[error("interrupted by {signal}; the VMs were stopped")]
    Interrupted { signal: &'static str },
    /// Nobody reads the build's log any more: Nix is gone (killed), and no signal said so.
    #[error("the build's log was closed: Nix is gone (killed?), so the VMs were stopped")]
    LogClosed,
    #[error("{0}")]
    State(#[source] StateFileError),
    /// A memory file of the image, or writing its pages into the revived guest.
    #[error("the guest's memory: {0}")]
    Memory(#[source] crate::vm::memory::MemoryError),
    /// A QMP step of saving or reviving a VM.
    #[error("{step} the {vm}: {source}")]
    Qmp { vm: String, step: &'static str, source: QmpError },
    /// QEMU reported the save complete, but the state writer did not finish.
    #[error("saving a VM's memory: {0}")]
    StateWriter(#[source] TimedOut),
    /// The state writer failed (its own error is above it in the build log).
    #[error("saving the {name}'s memory: the state writer ended with {status}")]
    StateWriterFailed { name: String, status: String },
    /// A process of the session outlived its teardown.
    #[error("after the session ended, the {name}'s processes were still running: {processes}")]
    Survived { name: String, processes: String },
    /// The state reader refused the file while streaming it into QEMU: the image is damaged.
    #[error(
        "the {name}'s saved state could not be loaded: {reader} (QEMU: {detail}); build the image again (nix-store --repair-path {}){}",
        image.display(),
        tail(&format!("the {name}'s QEMU output"), log_tail)
    )]
    StateLoad {
        name: String,
        reader: String,
        image: PathBuf,
        #[source]
        detail: Box<QemuFailure>,
        log_tail: String,
    },
    /// QEMU refused a whole state file as a VM it does not make (other devices, device
    /// versions, machine): the image was saved by another QEMU, and is made again with this one.
    #[error(
        "the {name}'s saved state {} does not load into this QEMU: {qemu_said}; the image was saved by a QEMU whose VM differs (as after a QEMU upgrade): {}{}",
        state.display(),
        rebuild_advice(state, *pinned),
        tail(&format!("the {name}'s QEMU output"), log_tail)
    )]
    StateIncompatible {
        name: String,
        state: PathBuf,
        /// QEMU's line that says why.
        qemu_said: String,
        /// Whether the image is a pinned one (a fixed-output copy: its pin comes off to rebuild).
        pinned: bool,
        log_tail: String,
    },
    /// The work done after the verdict (a build's unpacking) did not finish: it panicked.
    #[error("waiting for the work done after the verdict: {0}")]
    After(#[source] tokio::task::JoinError),
    /// A failure of a session whose guest has a display, and where its last screenshot is.
    #[error("{error}\n{screen}")]
    Shown {
        #[source]
        error: Box<RunError>,
        screen: String,
    },
}

/// What a VM did instead of coming up, or of loading its saved state.
#[derive(Debug, thiserror::Error)]
pub enum QemuFailure {
    /// Its QMP socket did not answer.
    #[error(transparent)]
    Qmp(QmpError),
    /// A QMP step of the load failed.
    #[error("{step}: {source}")]
    Step { step: &'static str, source: QmpError },
    #[error("QEMU exited with {0}")]
    Exited(String),
    /// The controller's init did not say it waits for its session.
    #[error(transparent)]
    NotWaiting(TimedOut),
    #[error("QEMU ended with {0}")]
    Ended(String),
    #[error("QEMU ended with {0} while loading the saved state")]
    EndedLoading(String),
    #[error("the state reader did not end within {} s of the load", after.as_secs())]
    ReaderLate { after: std::time::Duration },
    #[error("the state reader ended with {0}")]
    ReaderFailed(String),
}

/// How to make the image that holds `state` again with this QEMU.
fn rebuild_advice(state: &std::path::Path, pinned: bool) -> String {
    let image = state.parent().unwrap_or(state).display();
    if pinned {
        format!("rebuild the image: {image} is pinned, so take `pin` off its windowsImage call, build it, and pin the new hash")
    } else {
        format!(
            "rebuild the image: nix-store --delete {image} (remove the result links and layers that keep it first), then build it again (nix-build); or, as a trusted user, nix-store --repair-path {image}"
        )
    }
}

/// The tail of a log under an error, headed by what it is; nothing when the log said nothing.
fn tail(what: &str, log_tail: &str) -> String {
    if log_tail.is_empty() {
        String::new()
    } else {
        format!("\n--- last lines of {what} ---\n{log_tail}")
    }
}

impl RunError {
    /// `error`, naming the guest's last screenshot if one was taken.
    pub fn with_screen(error: RunError, screens: &crate::vm::screen::Screens) -> RunError {
        match screens.describe() {
            Some(screen) => RunError::Shown { error: Box::new(error), screen },
            None => error,
        }
    }

    /// The error itself, without the screenshot it may carry.
    pub fn cause(&self) -> &RunError {
        match self {
            RunError::Shown { error, .. } => error.cause(),
            e => e,
        }
    }
}

/// `map_err(io("doing what"))` for the session's own files.
pub(super) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Io { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state file QEMU refuses as another VM says to rebuild the image, with the command.
    #[test]
    fn an_incompatible_state_says_to_rebuild_the_image() {
        let error = |pinned| RunError::StateIncompatible {
            name: "guest".into(),
            state: "/nix/store/x-image/state".into(),
            qemu_said: "Unknown savevm section or instance 'kvmclock' 0".into(),
            pinned,
            log_tail: String::new(),
        };
        assert_eq!(
            error(false).to_string(),
            "the guest's saved state /nix/store/x-image/state does not load into this QEMU: Unknown savevm section or \
             instance 'kvmclock' 0; the image was saved by a QEMU whose VM differs (as after a QEMU upgrade): rebuild \
             the image: nix-store --delete /nix/store/x-image (remove the result links and layers that keep it first), \
             then build it again (nix-build); or, as a trusted user, nix-store --repair-path /nix/store/x-image"
        );
        assert!(
            error(true).to_string().ends_with(
                "rebuild the image: /nix/store/x-image is pinned, so take `pin` off its windowsImage call, build it, and pin the new hash"
            ),
            "{}",
            error(true)
        );
    }
}
