//! What a session is asked to do: the two VMs' boots, the command, and what follows it.

use super::error::{io, RunError};
use crate::protocol::TerminalRequest;
use crate::spec::{MachineShape, STORE_DIR};
use crate::tools::Tools;
use crate::vm::memory::GuestRam;
use crate::vm::qemu::{KernelBoot, Machine, VIRTIO_NET};
use std::path::PathBuf;
use std::time::Duration;

/// A directory of the host that the guest sees at `guest_path`, through the controller.
#[derive(Debug, Clone)]
pub struct ExtraShare {
    pub name: String,
    pub host_path: PathBuf,
    pub guest_path: String,
}

/// How the guest starts: its machine (from its profile) booted cold, or revived from a state
/// file into the same machine.
#[derive(Debug, Clone)]
pub struct GuestBoot {
    pub machine: Machine,
    /// A state file to revive from (validated by the caller).
    pub revive_from: Option<PathBuf>,
    /// Where its RAM is: a file shared when the pair is saved (the state then holds the
    /// devices alone), a file mapped privately when it is revived from such a state.
    pub ram: GuestRam,
    /// Memory files of layers (bottom first) whose pages are written into a private RAM
    /// before the revived guest runs (see `vm::memory`).
    pub ram_layers: Vec<PathBuf>,
    /// The private key that opens the guest.
    pub key: PathBuf,
}

impl GuestBoot {
    /// A direct run's guest (and its re-run's): the standin booted cold from a kernel and an
    /// initramfs, with no disk, no firmware and no screen (the PVH kernel has none to show).
    pub fn from_kernel(boot: KernelBoot, key: PathBuf) -> GuestBoot {
        GuestBoot {
            machine: Machine {
                boot: Some(boot),
                disk: None,
                nic_model: VIRTIO_NET,
                extra_args: vec![],
                hyperv: false,
                display: false,
                uefi: None,
            },
            revive_from: None,
            ram: GuestRam::Anonymous,
            ram_layers: vec![],
            key,
        }
    }
}

/// What the session does: run the command, or (suspend stage) save the pair.
#[derive(Debug, Clone)]
pub enum After {
    /// Run the command, then stop the VMs.
    Quit,
    /// No command: once the controller, started from its system disk, says it is ready to
    /// serve (smbd up, the guest logged on to, the guest's `prepare` done), both VMs are
    /// stopped together and saved: a consistent pair, whose TCP connections (SSH, SMB) go on
    /// after a revive as if nothing happened.
    SavePair(SaveTo),
    /// A layer: run the command in the revived pair; if it succeeds, the controller makes
    /// itself ready to serve again (see `JobConfig::ready_again`) and the pair is saved as
    /// with [`After::SavePair`].
    SaveLayer(SaveTo),
}

/// Where a saved pair goes: the guest into `guest_state` (its header naming the guest
/// profile `guest`), the controller into `controller_state`.
#[derive(Debug, Clone)]
pub struct SaveTo {
    pub guest_state: PathBuf,
    pub guest: String,
    pub controller_state: PathBuf,
}

/// How the controller starts. Its initramfs and system disk are the same for every session,
/// so an image can carry a saved controller that builds revive instead of booting.
#[derive(Debug, Clone)]
pub struct ControllerBoot {
    /// Its kernel, and the modules its initramfs is made with when none is given.
    pub kernel: PathBuf,
    pub modules: PathBuf,
    /// A prebuilt controller initramfs (the media's); None: made for this session.
    pub initrd: Option<PathBuf>,
    /// The system disk (the media's): smbd and the agent start from it before the session,
    /// so the controller can be saved ready to serve. None: the agent is started from the
    /// host's file system over 9p once the session arrives (direct runs).
    pub system: Option<PathBuf>,
    pub revive_from: Option<PathBuf>,
}

/// What the session does with the pair, and how long it may take.
#[derive(Debug, Clone)]
pub struct Task {
    /// The command line run by the guest's shell (empty when the pair is only saved).
    pub command: String,
    pub after: After,
    /// Bounds the whole session, from its files to its teardown.
    pub timeout: Duration,
    /// What sets `timeout`: its error names it, so that the user knows what to raise.
    pub limit: Limit,
}

/// Where a time-out comes from: the attribute (or the option) that raises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// An image's stages (its install, its suspend): `timeout` of builtins.windowsImage.
    Image,
    /// A layer's session: `timeout` of the builtins.windowsImage call that has `base`.
    Layer,
    /// A build: `timeout` of builtins.windowsDerivation.
    Build,
    /// A build of builtins.runInWindowsVM: `timeout` of the derivation it is given.
    RunInVm,
    /// `nix-winvm-builder run`, `rerun` and `shell`: their `--timeout SECS`.
    Option,
    /// A node of a test (nix/default.nix's `windowsTest`): the test's `timeout`.
    Test,
}

impl Limit {
    /// What ran out of time, as the error names it.
    pub fn what(self) -> &'static str {
        match self {
            Limit::Image => "the image's stage",
            Limit::Layer => "the layer",
            Limit::Build | Limit::RunInVm | Limit::Option => "the build",
            Limit::Test => "the test's node",
        }
    }

    /// How to give it longer.
    pub fn raise(self) -> &'static str {
        match self {
            Limit::Image => "raise `timeout = SECONDS;` in the builtins.windowsImage call",
            Limit::Layer => "raise `timeout = SECONDS;` in the builtins.windowsImage call that has `base` (the layer's)",
            Limit::Build => "raise `timeout = SECONDS;` in the builtins.windowsDerivation call (without it, the build has the image's)",
            Limit::RunInVm => "raise `timeout = SECONDS;` in the derivation given to builtins.runInWindowsVM (without it, the build has the image's)",
            Limit::Option => "raise it with --timeout SECONDS",
            Limit::Test => "raise `timeout = SECONDS;` in the windowsTest call",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The guest's shape (the controller's follows from it: `qemu::controller_shape`). Its
    /// machine type is a versioned one (`pc-q35-10.0`) wherever a pair is saved or revived.
    pub shape: MachineShape,
    pub guest: GuestBoot,
    pub controller: ControllerBoot,
    pub task: Task,
    /// Where the session keeps its files; must exist, short enough for unix socket paths.
    pub work: PathBuf,
    pub store_dir: PathBuf,
    pub extra_shares: Vec<ExtraShare>,
    pub tools: Tools,
    /// This program, run as the controller's agent and as QEMU's state reader and writer.
    pub agent: PathBuf,
    /// Tests only: a fault to inject (see [`TestFault`]).
    pub test_fault: Option<TestFault>,
    /// An interactive login instead of a logged command: the host's stdin and stdout are
    /// joined to a pty in the guest, through the controller's session port.
    pub terminal: Option<TerminalRequest>,
    /// With `terminal`: the login is joined to the first connection on this unix socket
    /// instead of this process's stdin and stdout (a test driver's channel to its node).
    pub login_socket: Option<PathBuf>,
    /// The guest's screen also as a VNC server on a unix socket in the work folder
    /// ([`VNC_SOCKET`]); no TCP port.
    pub vnc: bool,
    /// The command's stdout to this process's stdout and its stderr to this process's stderr,
    /// apart from the progress lines (`run-vm -- COMMAND`); otherwise both streams, in order,
    /// into the build log.
    pub split_streams: bool,
    /// Where the guest's screen keeps a timeline for the stage's report (see
    /// `screen::Timeline`); none unless the caller asks.
    pub timeline: Option<PathBuf>,
    /// The revived image is a pinned one (the builder knows): a state this QEMU cannot load
    /// is then fixed by pinning a new build, not by rebuilding the path.
    pub pinned_image: bool,
}

impl SessionConfig {
    /// The session of a pair, the guest of `shape`, in `work`, with what every session has
    /// unless its caller changes it: the store shared read-only, no other share, no fault, the
    /// command's streams merged into the log, VNC as the environment asks ([`VNC_VAR`]).
    pub fn new(
        shape: MachineShape,
        guest: GuestBoot,
        controller: ControllerBoot,
        task: Task,
        work: PathBuf,
        tools: Tools,
    ) -> Result<SessionConfig, RunError> {
        Ok(SessionConfig {
            shape,
            guest,
            controller,
            task,
            work,
            store_dir: PathBuf::from(STORE_DIR),
            extra_shares: vec![],
            tools,
            agent: std::env::current_exe().map_err(io("finding this program"))?,
            test_fault: None,
            terminal: None,
            login_socket: None,
            vnc: vnc_from_env(),
            split_streams: false,
            timeline: None,
            pinned_image: false,
        })
    }

    /// Whether the guest's clock is set first: a revived guest's lags by the time since the save.
    pub fn set_clock(&self) -> bool {
        self.guest.revive_from.is_some()
    }
}

/// The guest's VNC socket, in the work folder, when [`SessionConfig::vnc`] asks for one.
pub const VNC_SOCKET: &str = "vnc.sock";
/// Set (to anything but empty or 0) in a stage's environment, a derivation attribute: the
/// guest's screen is served over VNC on the work folder's [`VNC_SOCKET`].
pub const VNC_VAR: &str = "NIX_WINVM_VNC";

/// Whether the environment asks for a VNC server ([`VNC_VAR`]).
pub fn vnc_from_env() -> bool {
    std::env::var(VNC_VAR).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Faults the tests inject through `NIX_WINVM_TEST_FAULT` (an environment variable of the
/// builder, so a derivation attribute of that name too), to prove that each is named and
/// cleaned up. Only a builder built with the `test-faults` feature (scripts/test's) reads it:
/// the shipped builder ignores the variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestFault {
    /// `kill-smbd-after=SECS`: the controller's agent kills its smbd that long into the command.
    KillSmbdAfter(u64),
    /// `no-sshd`: a cold standin guest does not start its SSH server.
    NoSshd,
}

pub const TEST_FAULT_VAR: &str = "NIX_WINVM_TEST_FAULT";

/// A [`TEST_FAULT_VAR`] that names no fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{TEST_FAULT_VAR}={text}: expected kill-smbd-after=SECS or no-sshd")]
pub struct BadTestFault {
    pub text: String,
}

impl TestFault {
    pub fn parse(text: &str) -> Result<TestFault, BadTestFault> {
        if text == "no-sshd" {
            return Ok(TestFault::NoSshd);
        }
        text.strip_prefix("kill-smbd-after=")
            .and_then(|secs| secs.parse().ok())
            .map(TestFault::KillSmbdAfter)
            .ok_or_else(|| BadTestFault { text: text.into() })
    }

    /// The fault the environment asks for, if any.
    pub fn from_env() -> Result<Option<TestFault>, BadTestFault> {
        TestFault::from_var(std::env::var(TEST_FAULT_VAR).ok())
    }

    /// The fault `value` (the variable's) asks for: none in a builder without `test-faults`.
    pub fn from_var(value: Option<String>) -> Result<Option<TestFault>, BadTestFault> {
        if !cfg!(feature = "test-faults") {
            return Ok(None);
        }
        value.filter(|v| !v.is_empty()).map(|v| TestFault::parse(&v)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A time-out says which attribute of which builtin raises it, and that builtin has it.
    #[test]
    fn a_time_out_names_the_attribute_that_raises_it() {
        let e =
            RunError::Timeout { secs: 60, limit: Limit::Build, during: "running the command", log_tail: String::new() };
        assert_eq!(
            e.to_string(),
            "the build exceeded its timeout of 60 s while running the command, and was stopped; if it needs longer, \
             raise `timeout = SECONDS;` in the builtins.windowsDerivation call (without it, the build has the image's)"
        );
        use crate::plugin::table::{Builtin, LAYER};
        for (limit, builtin) in [
            (Limit::Image, Builtin::WindowsImage),
            (Limit::Layer, Builtin::WindowsImage),
            (Limit::Build, Builtin::WindowsDerivation),
            (Limit::RunInVm, Builtin::RunInWindowsVM),
        ] {
            assert!(
                limit.raise().contains("`timeout = SECONDS;` in the ")
                    && limit.raise().contains(&format!("builtins.{} ", builtin.name())),
                "{limit:?}"
            );
            assert!(builtin.tables().iter().any(|t| t.row("timeout").is_some()), "{limit:?}");
        }
        assert!(LAYER.row("base").is_some() && LAYER.row("timeout").is_some());
        assert!(Limit::Layer.raise().contains("that has `base`"));
        let run = RunError::Timeout { secs: 5, limit: Limit::Option, during: "x", log_tail: String::new() };
        assert!(run.to_string().ends_with("raise it with --timeout SECONDS"), "{run}");
        let layer = RunError::Timeout { secs: 5, limit: Limit::Layer, during: "x", log_tail: String::new() };
        assert!(layer.to_string().starts_with("the layer exceeded its timeout of 5 s"), "{layer}");
    }

    #[test]
    fn test_faults_parse_or_are_refused_by_name() {
        assert_eq!(TestFault::parse("kill-smbd-after=5"), Ok(TestFault::KillSmbdAfter(5)));
        assert_eq!(TestFault::parse("no-sshd"), Ok(TestFault::NoSshd));
        assert_eq!(
            TestFault::parse("kill-smbd-after=x").unwrap_err().to_string(),
            "NIX_WINVM_TEST_FAULT=kill-smbd-after=x: expected kill-smbd-after=SECS or no-sshd"
        );
    }

    /// A derivation attribute NIX_WINVM_TEST_FAULT reaches the builder's environment: only a
    /// test build acts on it.
    #[test]
    fn only_a_test_build_reads_the_fault_variable() {
        let read = TestFault::from_var(Some("no-sshd".into()));
        if cfg!(feature = "test-faults") {
            assert_eq!(read, Ok(Some(TestFault::NoSshd)));
        } else {
            assert_eq!(read, Ok(None));
        }
        assert_eq!(TestFault::from_var(None), Ok(None));
    }
}
