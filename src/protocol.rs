//! What crosses between the host and the controller's agent, and between the builder's own
//! processes: the agent's configuration and each session's job (JSON files in the exchange
//! folder), the session line on the controller's second serial port, the markers both sides
//! wait for, the exit file and its verdict, and the fixed paths of a controller saved ready to
//! serve. The host side (`session`, `builder`) writes these and the agent (`agent`, inside the
//! controller VM) reads them; neither imports the other.
//!
//! A pinned image keeps the agent it was saved with across nix-winvm releases, so what the
//! agent reads must stay readable by older agents: see [`JobConfig`].

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The share of [`READY_SHARE_DIR`] (see `spec::SESSION_SHARE`).
pub use crate::spec::SESSION_SHARE;

/// Files in the exchange directory, the one place both sides see.
pub const WAITING_DONE: &str = "waiting_done";

pub const EXIT_FILE: &str = "in-vm-exit";

pub const AGENT_CONFIG: &str = "agent.json";

pub const OUTPUT_LOG: &str = "output.log";

/// A command whose streams stay apart ([`JobConfig::split_streams`]): its stdout, its stderr.
pub const COMMAND_STDOUT: &str = "command.stdout";

pub const COMMAND_STDERR: &str = "command.stderr";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Share {
    pub name: String,
    pub path: PathBuf,
}

/// What the agent serves and how it reaches the guest: the same for every session of an
/// image, so a controller saved ready to serve has done all of it before the save.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServeConfig {
    pub shares: Vec<Share>,
    /// A tmpfs for Samba's state.
    pub run_dir: PathBuf,
    pub smbd: PathBuf,
    /// Where smbd's log goes.
    pub smbd_log: PathBuf,
    pub guest_addr: String,
    pub user: String,
    pub key_file: PathBuf,
    /// How long the guest may take to answer SSH: the image's (or the build's) time-out.
    pub ssh_timeout_secs: u64,
}

/// One session's command, in the controller's own paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
/// Read by the agent of the image's own controller: the one the image was saved with, which a
/// pinned image keeps across nix-winvm releases. So the agent ignores fields it does not know
/// (a newer builder's), and the builder writes optional fields only when they are set.
#[serde(rename_all = "camelCase")]
pub struct JobConfig {
    pub xchg: PathBuf,
    pub command: String,
    /// Set the guest's clock from the controller's (fresh from the host) before the command.
    pub set_clock: bool,
    /// Tests only (`NIX_WINVM_TEST_FAULT=kill-smbd-after=SECS`): the agent kills its own smbd
    /// that long after the command started, to prove that the loss is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_smbd_after_secs: Option<u64>,
    /// An interactive login (`run-vm`, `shell`): the command runs on a pty in the guest, its
    /// bytes relayed through the session port ([`SESSION_PORT`]) to the host's terminal
    /// instead of into the output log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<TerminalRequest>,
    /// A layer's session: after a command that succeeded, the agent makes itself ready to
    /// serve again (a new waiting login, the exports unmounted, [`READY_MARKER`]) so that the
    /// pair can be saved as a new image.
    #[serde(default, skip_serializing_if = "is_false")]
    pub ready_again: bool,
    /// The command's stdout and stderr each into a file of its own ([`COMMAND_STDOUT`],
    /// [`COMMAND_STDERR`]) instead of merged, in order, into the output log: for
    /// `run-vm -- COMMAND`, whose stdout is the host's. The agent's own lines stay in the log.
    #[serde(default, skip_serializing_if = "is_false")]
    pub split_streams: bool,
}

fn is_false(b: &bool) -> bool {
    !b
}

/// A controller booted for one session (direct runs): everything arrives with the session,
/// written by the host into the exchange directory ([`AGENT_CONFIG`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentConfig {
    pub serve: ServeConfig,
    pub job: JobConfig,
}

/// A controller saved ready to serve (images): read from its system disk ([`READY_CONFIG`])
/// at the suspend stage, where the agent starts smbd, logs on to the guest and runs `prepare`
/// there (which leaves an SMB session open) before the pair is saved. Each build then only
/// sends its [`JobConfig`] ([`AGENT_CONFIG`] in the exchange directory, mounted at
/// [`READY_XCHG`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReadyConfig {
    pub serve: ServeConfig,
    pub prepare: String,
}

/// The pty the guest gives an interactive login: the host terminal's type and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TerminalRequest {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
}

/// The controller's second serial port: it brings the session line, and stays open (the init
/// holds it) so that it can carry an interactive login's bytes afterwards. A revived
/// controller has exactly the devices it was saved with, so no new port can be added.
pub const SESSION_PORT: &str = "/dev/ttyS1";

/// How the controller mounts the host's exports (its init, and a ready agent after a revive).
pub const NINEP_OPTIONS: &str = "trans=virtio,version=9p2000.L,msize=262144";

/// What the controller's init prints before it waits for its session on ttyS1.
pub const WAITING_MARKER: &str = "winvm-controller: waiting for the session";

/// What the agent of a controller with a system disk prints once smbd runs, the guest's SSH
/// logon is made and the guest's `prepare` succeeded: the pair can be saved.
pub const READY_MARKER: &str = "winvm-controller: ready to serve";

/// The system disk's layout (an ext2 file system, read-only; see [`system`]).
pub const READY_CONFIG: &str = "/etc/winvm/ready.json";

/// A link to this program, in the store path it has in the builds.
pub const READY_AGENT: &str = "/etc/winvm/agent";

pub const READY_KEY: &str = "/etc/winvm/key";

/// Where a ready controller mounts the build's store and exchange directory: two folders of
/// [`READY_SHARE_DIR`], the folder of the share the guest keeps mounted across the save.
pub const READY_SHARE_DIR: &str = "/srv";

pub const READY_STORE: &str = "/srv/store";

pub const READY_XCHG: &str = "/srv/xchg";

/// Samba's state, in the ready controller's tmpfs.
pub const READY_SAMBA_DIR: &str = "/run/samba";

/// The line a ready controller's agent reads: the build's two exports, at fixed places (the
/// session adds the host's clock in front, `NOW=SECS `).
pub fn ready_session_line() -> String {
    format!("MOUNTS='store={READY_STORE} xchg={READY_XCHG}'\n")
}

/// A ready controller's session line that says neither the clock nor the exports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("garbled session line: {0:?}")]
pub struct GarbledSessionLine(pub String);

/// The host's clock and the exports (tag, mount point) of a ready controller's session line.
pub fn parse_ready_session_line(line: &str) -> Result<(u64, Vec<(String, PathBuf)>), GarbledSessionLine> {
    let garbled = || GarbledSessionLine(line.into());
    let now = line.trim().strip_prefix("NOW=").and_then(|rest| rest.split(' ').next()).ok_or_else(garbled)?;
    let now = now.parse().map_err(|_| garbled())?;
    let mounts = line.split_once("MOUNTS='").and_then(|(_, rest)| rest.split_once('\'')).ok_or_else(garbled)?.0;
    let mounts = mounts
        .split_whitespace()
        .map(|m| m.split_once('=').map(|(tag, at)| (tag.to_owned(), PathBuf::from(at))).ok_or_else(garbled))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((now, mounts))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Exited(i32),
    Signal(String),
}

/// An exit file without a verdict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExitFileError {
    /// "error MESSAGE": the agent could not run the command.
    #[error("{0}")]
    Agent(String),
    #[error("unreadable exit file: {0:?}")]
    Unreadable(String),
}

/// Parses the agent's exit file: "N", "signal NAME" or "error MESSAGE".
pub fn parse_exit_file(text: &str) -> Result<Verdict, ExitFileError> {
    let t = text.trim();
    if let Some(sig) = t.strip_prefix("signal ") {
        return Ok(Verdict::Signal(sig.to_owned()));
    }
    if let Some(e) = t.strip_prefix("error ") {
        return Err(ExitFileError::Agent(e.to_owned()));
    }
    t.parse::<i32>().map(Verdict::Exited).map_err(|_| ExitFileError::Unreadable(t.to_owned()))
}

/// The builder's subcommands, as the plugin's derivations, the session and the controller's
/// init start them: parsed here and nowhere else, and written by [`Subcommand::args`] for every
/// caller that spawns the builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subcommand {
    /// A derivation's stage; what it needs is in the environment Nix gives it.
    Stage(Stage),
    /// `run`, `rerun` and `shell`, each with its own arguments (see `builder::run`,
    /// `builder::rerun`).
    Run(Vec<String>),
    Rerun(Vec<String>),
    Shell(Vec<String>),
    /// One node of a test, started by the test's driver (see `builder::test`).
    TestNode(Vec<String>),
    /// A test's driver at a prompt, outside Nix.
    TestInteractive(Vec<String>),
    /// The agent of a controller booted for one session.
    Agent {
        config: PathBuf,
        now: Option<u64>,
    },
    /// The agent of a controller with a system disk, saved ready to serve.
    AgentReady {
        config: PathBuf,
        session: PathBuf,
    },
    /// The loading end of QEMU's incoming migration (the state file on stdout).
    StateRead {
        input: PathBuf,
        error_to: Option<PathBuf>,
    },
    /// The saving end of QEMU's migration (the stream on stdin, into a state file).
    StateWrite {
        out: PathBuf,
        memory_mib: u32,
        qemu_version: String,
        guest: String,
        machine: String,
        /// The RAM is left out of the stream (see `vm::memory`).
        ram_outside: bool,
    },
    Help,
}

/// The stages a derivation's `args` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Media,
    Install,
    Suspend,
    Layer,
    Pin,
    /// An image's RAM file, expanded from its memory file where builds run (see
    /// `builder::stages::memory_stage`).
    Memory,
    Build,
    RequireFile,
    /// A test with several machines (nix/default.nix's `windowsTest`).
    Test,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Media,
        Stage::Install,
        Stage::Suspend,
        Stage::Layer,
        Stage::Pin,
        Stage::Memory,
        Stage::Build,
        Stage::RequireFile,
        Stage::Test,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Media => "media",
            Stage::Install => "install",
            Stage::Suspend => "suspend",
            Stage::Layer => "layer",
            Stage::Pin => "pin",
            Stage::Memory => "memory",
            Stage::Build => "build",
            Stage::RequireFile => "require-file",
            Stage::Test => "test",
        }
    }
}

/// A command line the builder does not take: what is wrong, then the usage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}\n{USAGE}")]
pub struct UsageError(pub String);

pub const USAGE: &str = "usage: nix-winvm-builder STAGE (media, install, suspend, layer, pin, build, test: in a derivation)\n       nix-winvm-builder run [OPTIONS] -- COMMAND...\n       nix-winvm-builder rerun DIR [OPTIONS] [-- COMMAND...]\n       nix-winvm-builder shell IMAGE [OPTIONS] [-- COMMAND...]\n       nix-winvm-builder test-interactive NODES_JSON [SCRIPT_FILE]";

impl Subcommand {
    pub fn parse(args: &[String]) -> Result<Subcommand, UsageError> {
        let (first, rest) = args.split_first().ok_or_else(|| UsageError("no stage or command given".into()))?;
        let flag = |name: &str| -> Result<&str, UsageError> {
            rest.iter()
                .position(|a| a == name)
                .and_then(|i| rest.get(i + 1))
                .map(String::as_str)
                .ok_or_else(|| UsageError(format!("{first}: missing {name}")))
        };
        if let Some(stage) = Stage::ALL.into_iter().find(|s| s.name() == first) {
            return Ok(Subcommand::Stage(stage));
        }
        Ok(match first.as_str() {
            "run" => Subcommand::Run(rest.to_vec()),
            "rerun" => Subcommand::Rerun(rest.to_vec()),
            "shell" => Subcommand::Shell(rest.to_vec()),
            "test-node" => Subcommand::TestNode(rest.to_vec()),
            "test-interactive" => Subcommand::TestInteractive(rest.to_vec()),
            "agent" => Subcommand::Agent {
                config: flag("--config")?.into(),
                // The host's clock when the session began: a revived controller's own lags.
                now: flag("--now").ok().and_then(|n| n.parse().ok()),
            },
            "agent-ready" => {
                Subcommand::AgentReady { config: flag("--config")?.into(), session: flag("--session")?.into() }
            }
            "state-read" => {
                Subcommand::StateRead { input: flag("--in")?.into(), error_to: flag("--error-to").ok().map(Into::into) }
            }
            "state-write" => Subcommand::StateWrite {
                out: flag("--out")?.into(),
                memory_mib: flag("--memory")?
                    .parse()
                    .map_err(|_| UsageError(format!("{first}: --memory: expected MiB")))?,
                qemu_version: flag("--qemu-version")?.into(),
                guest: flag("--guest")?.into(),
                machine: flag("--machine")?.into(),
                ram_outside: match flag("--ram-outside")? {
                    "yes" => true,
                    "no" => false,
                    _ => return Err(UsageError(format!("{first}: --ram-outside: expected yes or no"))),
                },
            },
            "--help" | "-h" => Subcommand::Help,
            other => return Err(UsageError(format!("unknown stage or command '{other}'"))),
        })
    }

    /// The arguments that start this subcommand (after the program's path).
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec![self.name().into()];
        let mut flag = |name: &str, value: &std::ffi::OsStr| {
            a.push(name.into());
            a.push(value.into());
        };
        match self {
            Subcommand::Stage(_) | Subcommand::Help => {}
            Subcommand::Run(rest)
            | Subcommand::Rerun(rest)
            | Subcommand::Shell(rest)
            | Subcommand::TestNode(rest)
            | Subcommand::TestInteractive(rest) => a.extend(rest.iter().map(Into::into)),
            Subcommand::Agent { config, now } => {
                flag("--config", config.as_os_str());
                if let Some(now) = now {
                    flag("--now", now.to_string().as_ref());
                }
            }
            Subcommand::AgentReady { config, session } => {
                flag("--config", config.as_os_str());
                flag("--session", session.as_os_str());
            }
            Subcommand::StateRead { input, error_to } => {
                flag("--in", input.as_os_str());
                if let Some(e) = error_to {
                    flag("--error-to", e.as_os_str());
                }
            }
            Subcommand::StateWrite { out, memory_mib, qemu_version, guest, machine, ram_outside } => {
                flag("--out", out.as_os_str());
                flag("--memory", memory_mib.to_string().as_ref());
                flag("--qemu-version", qemu_version.as_ref());
                flag("--guest", guest.as_ref());
                flag("--machine", machine.as_ref());
                flag("--ram-outside", if *ram_outside { "yes" } else { "no" }.as_ref());
            }
        }
        a
    }

    pub fn name(&self) -> &'static str {
        match self {
            Subcommand::Stage(s) => s.name(),
            Subcommand::Run(_) => "run",
            Subcommand::Rerun(_) => "rerun",
            Subcommand::Shell(_) => "shell",
            Subcommand::TestNode(_) => "test-node",
            Subcommand::TestInteractive(_) => "test-interactive",
            Subcommand::Agent { .. } => "agent",
            Subcommand::AgentReady { .. } => "agent-ready",
            Subcommand::StateRead { .. } => "state-read",
            Subcommand::StateWrite { .. } => "state-write",
            Subcommand::Help => "--help",
        }
    }

    /// What the builder's error line says it was doing: "in the build stage", "in 'shell'".
    pub fn doing(&self) -> String {
        match self {
            Subcommand::Stage(s) => format!("in the {} stage", s.name()),
            other => format!("in '{}'", other.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an image's agent reads from later builders: unknown fields are let be, and a
    /// plain job names only the fields every agent knows.
    #[test]
    fn a_job_file_stays_readable_across_releases() {
        let job = JobConfig {
            xchg: "/srv/xchg".into(),
            command: "true".into(),
            set_clock: true,
            kill_smbd_after_secs: None,
            terminal: None,
            ready_again: false,
            split_streams: false,
        };
        let json = serde_json::to_string(&job).unwrap();
        assert_eq!(json, r#"{"xchg":"/srv/xchg","command":"true","setClock":true}"#);
        let newer = r#"{"xchg":"/srv/xchg","command":"true","setClock":true,"somethingLater":[1]}"#;
        assert_eq!(serde_json::from_str::<JobConfig>(newer).unwrap(), job);
        let split = JobConfig { split_streams: true, ..job };
        assert!(serde_json::to_string(&split).unwrap().ends_with(r#""splitStreams":true}"#));
    }

    #[test]
    fn exit_file_forms() {
        assert_eq!(parse_exit_file("42\n"), Ok(Verdict::Exited(42)));
        assert_eq!(parse_exit_file("signal KILL"), Ok(Verdict::Signal("KILL".into())));
        assert_eq!(parse_exit_file("error smbd: boom"), Err(ExitFileError::Agent("smbd: boom".into())));
        assert_eq!(parse_exit_file("4x").unwrap_err().to_string(), "unreadable exit file: \"4x\"");
        assert!(parse_exit_file("").is_err());
    }

    #[test]
    fn every_subcommand_parses_what_args_writes() {
        let all = [
            Subcommand::Stage(Stage::Pin),
            Subcommand::Rerun(vec!["/k".into(), "--".into(), "true".into()]),
            Subcommand::Agent { config: "/x/agent.json".into(), now: Some(1_796_000_000) },
            Subcommand::Agent { config: "/x/agent.json".into(), now: None },
            Subcommand::AgentReady { config: READY_CONFIG.into(), session: SESSION_PORT.into() },
            Subcommand::StateRead { input: "/i/state".into(), error_to: Some("/w/e".into()) },
            Subcommand::StateWrite {
                out: "/o/state".into(),
                memory_mib: 256,
                qemu_version: "10.0.2 (Debian)".into(),
                guest: "standin".into(),
                machine: "pc-q35-10.0".into(),
                ram_outside: true,
            },
        ];
        for sub in all {
            let args: Vec<String> = sub.args().into_iter().map(|a| a.into_string().unwrap()).collect();
            assert_eq!(Subcommand::parse(&args), Ok(sub.clone()), "{args:?}");
        }
        for stage in Stage::ALL {
            assert_eq!(Subcommand::parse(&[stage.name().to_owned()]), Ok(Subcommand::Stage(stage)));
        }
        let e = Subcommand::parse(&["bogus".into()]).unwrap_err().to_string();
        assert!(e.starts_with("unknown stage or command 'bogus'\nusage: "), "{e}");
        let e = Subcommand::parse(&["state-write".into(), "--out".into(), "/o".into()]).unwrap_err();
        assert_eq!(e.0, "state-write: missing --memory");
        assert_eq!(Subcommand::Stage(Stage::Build).doing(), "in the build stage");
        assert_eq!(Subcommand::Shell(vec![]).doing(), "in 'shell'");
    }
}
