//! Debugging a session again, by hand:
//!
//!   nix-winvm-builder rerun DIR [--display] [--quiet] [--timeout SECS] [--shell | -- COMMAND...]
//!   nix-winvm-builder shell IMAGE [--display] [--quiet] [--timeout SECS] [-- COMMAND...]
//!
//! `rerun` is what the `run-vm` script of a kept work folder runs (`nix-build -K`,
//! `nix-winvm-builder run -K`). It reads the session's description there ([`RERUN_FILE`]) and
//! starts the same VMs again, as the session did: revived from the image's state on a
//! throw-away overlay, the clock set, on a fresh switch, in `DIR/rerun/`. The build's
//! environment file and script come along, so a login in the guest is where the build was.
//! `shell` does the same for any image, without a build: the store read-only, and a scratch
//! exchange folder.
//!
//! A command's stdout is this program's stdout and its stderr its stderr, so that
//! `run-vm -- cat FILE > copy` copies; the progress lines go to stderr too, and `--quiet`
//! drops them (an error still says what failed).
//!
//! The build's outputs keep their store paths in the guest (`$out` is the build's), but they
//! are made on the guest's own disk and go with it: a re-run writes nothing into the store.

use super::image;
use super::{io, BuilderError, Progress};
use crate::guest::{self, Profile};
use crate::session::{self, After, ControllerBoot, GuestBoot, Limit, SessionConfig, Task};
use crate::spec::{self, Accel, MachineShape};
use crate::tools::Tools;
use crate::vm::accel;
use crate::vm::qemu::KernelBoot;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// In the work folder, beside `run-vm`: what starts the session again.
pub const RERUN_FILE: &str = "rerun.json";
/// In the kept folder: the re-run's own work folder, made afresh each time.
pub const RERUN_DIR: &str = "rerun";
/// An interactive login has no time-out of its own worth the name.
const SHELL_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// A unix socket path has at most 107 bytes; the longest name a session puts in its folder.
const LONGEST_SOCKET_NAME: usize = "/controller-session.sock".len();
const SUN_PATH_MAX: usize = 107;

/// The session as `run-vm` starts it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rerun {
    pub guest: RerunGuest,
    /// The build's time-out, which `run-vm -- COMMAND` keeps.
    pub timeout_secs: u64,
    /// The build's output paths.
    pub outputs: Vec<PathBuf>,
    /// What the build's store held besides them (its inputs' closure, in the sandbox): the
    /// standin binds only these over its local store, not every path of the host's store.
    #[serde(default)]
    pub inputs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "from")]
pub enum RerunGuest {
    /// Revived from an image in the store, as a build does.
    #[serde(rename_all = "camelCase")]
    Image {
        image: PathBuf,
        /// The memory stage's output the build mapped (`winvmMemory`), if it named one: used
        /// again while it is in the store, otherwise the memory is expanded into the work
        /// folder.
        #[serde(default)]
        memory: Option<PathBuf>,
    },
    /// Booted cold, as a direct run does: this kernel, and the standin's initramfs and key in
    /// the folder itself (`guest-initrd.img`, `key`).
    #[serde(rename_all = "camelCase")]
    Cold { accel: Accel, memory_mib: u32, kernel: PathBuf, modules: PathBuf, append: String },
}

impl Rerun {
    /// The names in this process's store besides `outputs`: in a build's sandbox, the closure
    /// of its inputs.
    pub fn store_listing(outputs: &[PathBuf]) -> Vec<String> {
        let outputs: Vec<_> = outputs.iter().filter_map(|o| o.file_name()).collect();
        let Ok(entries) = std::fs::read_dir(spec::STORE_DIR) else { return vec![] };
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| !outputs.contains(&n.as_os_str()))
            .filter_map(|n| n.into_string().ok())
            .filter(|n| !n.starts_with('.') && !n.chars().any(|c| c.is_whitespace() || c == '\'' || c == '"'))
            .collect();
        names.sort();
        names
    }

    /// Writes the description into the work folder. A debugging aid: a failure is not the
    /// session's, and `rerun` then says that the file is missing.
    pub fn record(&self, work: &Path) {
        if let Ok(json) = serde_json::to_string_pretty(self) {
            let _ = std::fs::write(work.join(RERUN_FILE), json);
        }
    }
}

/// What the guest does in a re-run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// A login on a pty, joined to this terminal.
    Shell,
    /// One command: its stdout ours, its stderr ours, its exit code ours.
    Command(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// The kept folder (`rerun`) or the image (`shell`).
    pub target: PathBuf,
    pub mode: Mode,
    pub display: bool,
    /// No progress lines.
    pub quiet: bool,
    pub timeout_secs: Option<u64>,
}

impl Args {
    fn progress(&self) -> Progress {
        if self.quiet {
            Progress::quiet()
        } else {
            Progress::new()
        }
    }
}

pub const RERUN_USAGE: &str =
    "usage: nix-winvm-builder rerun DIR [--display] [--quiet] [--timeout SECS] [--shell | -- COMMAND...]";
pub const SHELL_USAGE: &str =
    "usage: nix-winvm-builder shell IMAGE [--display] [--quiet] [--timeout SECS] [-- COMMAND...]";

pub fn parse(args: &[String], usage: &str) -> Result<Args, BuilderError> {
    let usage_err = |m: String| BuilderError::Usage(format!("{m}\n{usage}"));
    let mut it = args.iter();
    let target =
        it.next().filter(|t| !t.starts_with('-')).ok_or_else(|| usage_err("no folder or image given".into()))?;
    let mut a =
        Args { target: PathBuf::from(target), mode: Mode::Shell, display: false, quiet: false, timeout_secs: None };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--shell" => a.mode = Mode::Shell,
            "--display" => a.display = true,
            "--quiet" | "-q" => a.quiet = true,
            "--timeout" => {
                let v = it.next().ok_or_else(|| usage_err("--timeout needs a value".into()))?;
                a.timeout_secs = Some(
                    v.parse()
                        .ok()
                        .filter(|s| *s > 0)
                        .ok_or_else(|| usage_err(format!("--timeout {v}: expected seconds")))?,
                );
            }
            "--" => {
                let command: Vec<String> = it.cloned().collect();
                if command.is_empty() {
                    return Err(usage_err("no command given after --".into()));
                }
                a.mode = Mode::Command(command);
                break;
            }
            other => return Err(usage_err(format!("unknown option '{other}'"))),
        }
    }
    Ok(a)
}

/// `nix-winvm-builder rerun DIR ...`: the session of the kept folder DIR, again.
pub fn rerun_main(args: &[String]) -> Result<i32, BuilderError> {
    let a = parse(args, RERUN_USAGE)?;
    let dir = a.target.canonicalize().map_err(io(format!("the kept folder {}", a.target.display())))?;
    let described = dir.join(RERUN_FILE);
    let text = std::fs::read_to_string(&described).map_err(io(format!(
        "reading {} (only a build's or a direct run's work folder can be started again)",
        described.display()
    )))?;
    let rerun: Rerun =
        serde_json::from_str(&text).map_err(io(format!("{} is not a re-run's description", described.display())))?;
    let progress = a.progress();
    let work = fresh_work(&dir, &progress)?;
    // The build's environment and script, where the guest finds them (/tmp/xchg).
    let xchg = work.join("xchg");
    std::fs::create_dir_all(&xchg).map_err(io(format!("creating {}", xchg.display())))?;
    let mut has = Has::default();
    for (name, flag) in [("saved-env", &mut has.env), ("script", &mut has.script)] {
        let from = dir.join("xchg").join(name);
        if from.is_file() {
            std::fs::copy(&from, xchg.join(name)).map_err(io(format!("copying {}", from.display())))?;
            *flag = true;
        }
    }
    let cfg = match &rerun.guest {
        RerunGuest::Image { image, memory } => {
            let memory = memory.clone().filter(|m| m.join(crate::vm::memory::RAM_FILE).is_file());
            revived(image, memory, &work, &rerun, &a, has, &progress)?
        }
        RerunGuest::Cold { .. } => cold(&dir, &work, &rerun, &a, &progress)?,
    };
    if !rerun.outputs.is_empty() {
        progress
            .say("the outputs keep their store paths in the guest, on its own disk: nothing is written to the store");
    }
    run(cfg, &progress, &work)
}

/// `nix-winvm-builder shell IMAGE ...`: a login in any image, no build needed.
pub fn shell_main(args: &[String]) -> Result<i32, BuilderError> {
    let a = parse(args, SHELL_USAGE)?;
    let image = a.target.canonicalize().map_err(io(format!("the image {}", a.target.display())))?;
    let progress = a.progress();
    let work = tempfile::Builder::new().prefix("winvm-shell-").tempdir().map_err(io("creating a work directory"))?;
    let rerun = Rerun {
        guest: RerunGuest::Image { image: image.clone(), memory: None },
        timeout_secs: 3600,
        outputs: vec![],
        inputs: vec![],
    };
    let cfg = revived(&image, None, work.path(), &rerun, &a, Has::default(), &progress)?;
    progress.say(&format!("work folder {} (removed at the end): the guest's /tmp/xchg", work.path().display()));
    run(cfg, &progress, work.path())
}

fn run(cfg: SessionConfig, progress: &Progress, work: &Path) -> Result<i32, BuilderError> {
    let result = super::runtime()?.block_on(session::run(&cfg, progress));
    super::finish(result, progress, &[work])
}

/// The re-run's own work folder: `DIR/rerun`, emptied; or, where that path is too long for
/// the sockets in it, a fresh folder in TMPDIR.
fn fresh_work(dir: &Path, progress: &Progress) -> Result<PathBuf, BuilderError> {
    let work = dir.join(RERUN_DIR);
    if work.as_os_str().len() + LONGEST_SOCKET_NAME > SUN_PATH_MAX {
        let tmp = tempfile::Builder::new().prefix("winvm-rerun-").tempdir().map_err(io("creating a work directory"))?;
        let tmp = tmp.keep();
        progress.say(&format!(
            "{} is too long for unix sockets: the re-run works in {}",
            work.display(),
            tmp.display()
        ));
        return Ok(tmp);
    }
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(io(format!("removing the last re-run's {}", work.display())))?;
    }
    std::fs::create_dir_all(&work).map_err(io(format!("creating {}", work.display())))?;
    progress.say(&format!("re-run's work folder: {}", work.display()));
    Ok(work)
}

/// Which of the build's files the re-run has in its exchange folder.
#[derive(Debug, Clone, Copy, Default)]
struct Has {
    env: bool,
    script: bool,
}

/// An image's VMs revived as a build revives them (see `stages::build`).
fn revived(
    image: &Path,
    memory: Option<PathBuf>,
    work: &Path,
    rerun: &Rerun,
    a: &Args,
    has: Has,
    progress: &Progress,
) -> Result<SessionConfig, BuilderError> {
    let revivable = image::revivable(image, None, progress)?;
    let disk = work.join("disk.qcow2");
    image::overlay(&revivable.tools, &image.join("disk.qcow2"), &disk)?;
    let profile = guest::profile(&revivable.meta.spec.guest);
    let command = guest_command(profile, &rerun.outputs, &rerun.inputs, has, &a.mode);
    let memory = revivable.memory(memory, work, progress)?;
    let mut cfg = revivable.session(
        disk,
        work,
        Task { command, after: After::Quit, timeout: timeout(rerun, a), limit: Limit::Option },
        memory.as_ref(),
    )?;
    finish_config(&mut cfg, a);
    Ok(cfg)
}

/// A direct run's cold pair booted again, from the kernel and the initramfs it used.
fn cold(dir: &Path, work: &Path, rerun: &Rerun, a: &Args, progress: &Progress) -> Result<SessionConfig, BuilderError> {
    let RerunGuest::Cold { accel, memory_mib, kernel, modules, append } = &rerun.guest else {
        unreachable!("called for a cold guest")
    };
    let accel = accel::choose(*accel)?;
    progress.say(&format!("accelerator: {}", accel.name()));
    let boot = KernelBoot { kernel: kernel.clone(), initrd: dir.join("guest-initrd.img"), append: append.clone() };
    let guest = GuestBoot::from_kernel(boot, dir.join("key"));
    let controller_initrd = dir.join("controller-initrd.img");
    let controller = ControllerBoot {
        kernel: kernel.clone(),
        modules: modules.clone(),
        initrd: controller_initrd.is_file().then_some(controller_initrd),
        system: None,
        revive_from: None,
    };
    let task = Task {
        command: guest_command(Profile::Standin, &[], &[], Has::default(), &a.mode),
        after: After::Quit,
        timeout: timeout(rerun, a),
        limit: Limit::Option,
    };
    // As the run booted it: never saved, QEMU's newest machine.
    let shape = MachineShape::new(accel, *memory_mib, 1, false);
    let mut cfg = SessionConfig::new(shape, guest, controller, task, work.to_path_buf(), Tools::find()?)?;
    finish_config(&mut cfg, a);
    Ok(cfg)
}

fn timeout(rerun: &Rerun, a: &Args) -> Duration {
    match (a.timeout_secs, &a.mode) {
        (Some(secs), _) => Duration::from_secs(secs),
        (None, Mode::Shell) => SHELL_TIMEOUT,
        (None, Mode::Command(_)) => Duration::from_secs(rerun.timeout_secs),
    }
}

/// What every re-run shares: nothing unpacked, the terminal and screen, a command's streams
/// kept apart.
fn finish_config(cfg: &mut SessionConfig, a: &Args) {
    cfg.vnc = a.display || session::vnc_from_env();
    cfg.terminal = (a.mode == Mode::Shell).then(session::terminal_request);
    cfg.split_streams = matches!(a.mode, Mode::Command(_));
}

/// The guest's side (see `Profile::rerun_command`).
fn guest_command(profile: Profile<'_>, outputs: &[PathBuf], inputs: &[String], has: Has, mode: &Mode) -> String {
    let names: Vec<String> =
        outputs.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
    let command = match mode {
        Mode::Command(args) => Some(&args[..]),
        Mode::Shell => None,
    };
    profile.rerun_command(&names, inputs, has.env, has.script, command)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_the_modes() {
        let a = parse(&v(&["/k", "--display"]), RERUN_USAGE).unwrap();
        assert_eq!((a.mode, a.display, a.quiet), (Mode::Shell, true, false));
        let a = parse(&v(&["/k", "-q", "--", "cat", "f"]), RERUN_USAGE).unwrap();
        assert_eq!((a.mode, a.quiet), (Mode::Command(v(&["cat", "f"])), true));
        let a = parse(&v(&["/k", "--", "sh", "-c", "exit 5"]), RERUN_USAGE).unwrap();
        assert_eq!(a.mode, Mode::Command(v(&["sh", "-c", "exit 5"])));
        let e = parse(&v(&["/k", "--bogus"]), RERUN_USAGE).unwrap_err().to_string();
        assert!(e.starts_with("unknown option '--bogus'"), "{e}");
        let e = parse(&v(&["--shell"]), SHELL_USAGE).unwrap_err().to_string();
        assert!(e.starts_with("no folder or image given"), "{e}");
    }

    #[test]
    fn the_description_round_trips() {
        let r = Rerun {
            guest: RerunGuest::Image { image: "/nix/store/x-image".into(), memory: None },
            timeout_secs: 60,
            outputs: vec!["/nix/store/y-out".into()],
            inputs: vec!["z-in".into()],
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""from":"image""#), "{json}");
        assert_eq!(serde_json::from_str::<Rerun>(&json).unwrap(), r);
    }

    #[test]
    fn the_command_restores_the_environment_and_keeps_outputs_off_the_store() {
        let has = Has { env: true, script: true };
        let c = guest_command(
            Profile::Standin,
            &["/nix/store/aaaa-x".into()],
            &["bbbb-in".into()],
            has,
            &Mode::Command(v(&["echo", "a b"])),
        );
        assert!(c.starts_with("cd /tmp\n. /tmp/xchg/saved-env\nwinvm_inputs=bbbb-in\nwinvm_outputs=aaaa-x\n"), "{c}");
        assert!(c.contains("for winvm_i in $winvm_inputs; do"), "{c}");
        assert!(c.contains("winvm_redirect ||"), "{c}");
        assert!(c.ends_with("exec echo 'a b'"), "{c}");
        let s = guest_command(Profile::Standin, &[], &[], has, &Mode::Shell);
        assert!(s.contains("/bin/sh -e /tmp/xchg/script"), "{s}");
        assert!(s.ends_with("exec /bin/sh -i"), "{s}");
    }
}
