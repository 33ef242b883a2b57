//! How a session fails: one variant per step, each naming what it waited for or touched, with
//! the tail of the log that tells why.

use crate::controller::BadPath;
use crate::initramfs::linux::LinuxInitError;
use crate::vm::process::SpawnError;
use crate::vm::qmp::QmpError;
use crate::vm::state::StateFileError;
use crate::vm::vde::StartSwitchError;
use crate::vm::wait::TimedOut;
use std::fmt;
use std::path::PathBuf;

#[derive(Debug)]
pub enum RunError {
    /// Writing the session's files into its work directory.
    Io {
        what: String,
        source: std::io::Error,
    },
    SessionLine(BadPath),
    /// The controller ended before it said it was ready to serve (suspend stage).
    ControllerNotReady {
        status: String,
        log_tail: String,
    },
    ControllerInit(LinuxInitError),
    Switch(StartSwitchError),
    Spawn(SpawnError),
    QemuNotUp {
        name: String,
        detail: String,
        log_tail: String,
    },
    /// Sending the controller its session line.
    SessionPort {
        path: PathBuf,
        source: std::io::Error,
    },
    SessionLineTimeout(TimedOut),
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
    /// The VDE switch between the guest and the controller ended mid-session.
    SwitchDied {
        status: String,
    },
    Agent {
        message: String,
        log_tail: String,
    },
    /// The build's own time-out, and what the session was doing when it struck.
    Timeout {
        secs: u64,
        during: &'static str,
        /// The guest's serial log, when what it was waiting for was the guest.
        log_tail: String,
    },
    Interrupted {
        signal: &'static str,
    },
    /// Nobody reads the build's log any more: Nix is gone (killed), and no signal said so.
    LogClosed,
    State(StateFileError),
    /// A QMP step of saving or reviving a VM.
    Qmp {
        vm: String,
        step: &'static str,
        source: QmpError,
    },
    /// QEMU reported the save complete, but the state writer did not finish.
    StateWriter(TimedOut),
    /// The state writer failed (its own error is above it in the build log).
    StateWriterFailed {
        name: String,
        status: String,
    },
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
    /// A failure of a session whose guest has a display, and where its last screenshot is.
    Shown {
        error: Box<RunError>,
        screen: String,
    },
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
            RunError::Io { what, source } => write!(f, "{what}: {source}"),
            RunError::SessionLine(e) => write!(f, "the controller's session: {e}"),
            RunError::ControllerNotReady { status, log_tail } => {
                write!(
                    f,
                    "the controller ended ({status}) before it was ready to serve (smbd, the guest's SSH logon and its prepare command)"
                )?;
                tail(f, "the controller's console", log_tail)
            }
            RunError::ControllerInit(e) => write!(f, "the controller's initramfs: {e}"),
            RunError::Switch(e) => write!(f, "{e}"),
            RunError::Spawn(e) => write!(f, "{e}"),
            RunError::QemuNotUp { name, detail, log_tail } => {
                write!(f, "the {name} VM did not come up: {detail}")?;
                tail(f, &format!("the {name}'s QEMU output"), log_tail)
            }
            RunError::SessionPort { path, source } => {
                write!(f, "sending the controller its session line on {}: {source}", path.display())
            }
            RunError::SessionLineTimeout(e) => write!(f, "{e}"),
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
            RunError::SwitchDied { status } => write!(
                f,
                "the VDE switch between the guest and the controller ended ({status}) during the session: the pair was cut off"
            ),
            RunError::NoExitCode { log_tail } => {
                write!(f, "the VM produced no exit code")?;
                tail(f, "the controller's serial log", log_tail)
            }
            RunError::Agent { message, log_tail } => {
                write!(f, "the controller could not run the command: {message}")?;
                tail(f, "the guest's serial log", log_tail)
            }
            RunError::Timeout { secs, during, log_tail } => {
                write!(f, "the build exceeded its timeout of {secs} s while {during}, and was stopped")?;
                tail(f, "the guest's serial log", log_tail)
            }
            RunError::State(e) => write!(f, "{e}"),
            RunError::Qmp { vm, step, source } => write!(f, "{step} the {vm}: {source}"),
            RunError::StateWriter(e) => write!(f, "saving a VM's memory: {e}"),
            RunError::StateWriterFailed { name, status } => {
                write!(f, "saving the {name}'s memory: the state writer ended with {status}")
            }
            RunError::Survived { name, processes } => {
                write!(f, "after the session ended, the {name}'s processes were still running: {processes}")
            }
            RunError::StateLoad { name, reader, detail, log_tail } => {
                write!(f, "the {name}'s saved state could not be loaded: {reader} (QEMU: {detail})")?;
                tail(f, &format!("the {name}'s QEMU output"), log_tail)
            }
            RunError::Interrupted { signal } => write!(f, "interrupted by {signal}; the VMs were stopped"),
            RunError::LogClosed => {
                write!(f, "the build's log was closed: Nix is gone (killed?), so the VMs were stopped")
            }
            RunError::Shown { error, screen } => write!(f, "{error}\n{screen}"),
        }
    }
}

impl std::error::Error for RunError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RunError::Io { source, .. } | RunError::SessionPort { source, .. } => Some(source),
            RunError::ControllerInit(e) => Some(e),
            RunError::Switch(e) => Some(e),
            RunError::Spawn(e) => Some(e),
            RunError::State(e) => Some(e),
            RunError::Qmp { source, .. } => Some(source),
            RunError::StateWriter(e) | RunError::SessionLineTimeout(e) => Some(e),
            RunError::Shown { error, .. } => Some(&**error),
            _ => None,
        }
    }
}

/// `map_err(io("doing what"))` for the session's own files.
pub(super) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Io { what, source }
}
