//! The derivations' builder: `nix-winvm-builder <stage>`, run by Nix inside its sandbox.

pub mod image;
pub mod pin;
pub mod progress;
pub mod report;
pub mod rerun;
pub mod run;
pub mod stages;
pub mod test;
pub mod unpack;

pub use progress::Progress;

use crate::agent::AgentError;
use crate::guest::standin::StandinError;
use crate::guest::ProfileError;
use crate::initramfs::linux::LinuxInitError;
use crate::session::{BadTestFault, RunError};
use crate::spec;
use crate::tools::MissingTool;
use crate::vm::accel::NoKvm;
use crate::vm::kernel::PvhError;
use crate::vm::process::SpawnError;
use crate::vm::qemu::MachineTypeError;
use crate::vm::state::StateFileError;

/// Everything a stage can fail with, each layer's own error kept whole; the chain is rendered
/// once, by `Display`, at the top (src/bin).
#[derive(Debug, thiserror::Error)]
pub enum BuilderError {
    #[error("{0}")]
    Usage(String),
    #[error(
        "environment variable {0} is not set: the stages run in the derivations the plugin makes; build those (nix-build) instead"
    )]
    MissingEnv(&'static str),
    #[error(transparent)]
    Spec(#[from] spec::SpecJsonError),
    #[error(
        "the file '{name}' is not in the Nix store. Add it with:\n  nix-store --add-fixed sha256 /path/to/{name}\n(expected sha256: {hash})"
    )]
    RequiredFileMissing { name: String, hash: String },
    #[error(transparent)]
    NoKvm(#[from] NoKvm),
    #[error(transparent)]
    MissingTool(#[from] MissingTool),
    #[error(transparent)]
    Session(#[from] RunError),
    #[error(transparent)]
    State(#[from] StateFileError),
    #[error(transparent)]
    Initramfs(#[from] LinuxInitError),
    #[error(transparent)]
    Standin(#[from] StandinError),
    #[error(transparent)]
    Guest(#[from] ProfileError),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Pvh(#[from] PvhError),
    #[error(transparent)]
    TestFault(#[from] BadTestFault),
    /// Unpacking the guest's archive of the outputs from its outputs disk.
    #[error("unpacking the build's outputs from the guest's outputs disk: {0}")]
    Outputs(#[source] unpack::UnpackError),
    /// A test's script failed: the driver's exit code, and where the results are kept.
    #[error(
        "the test failed (the driver exited {code}: the log above says which command); its results (log, screenshots, serial logs, captures, JUnit XML) are in {} (kept with nix-build -K)",
        results.display()
    )]
    TestFailed { code: i32, results: std::path::PathBuf },
    /// A test ran past its time-out.
    #[error("the test exceeded its timeout of {secs} s and was stopped; if it needs longer, raise `timeout = SECONDS;` in the windowsTest call")]
    TestTimeout { secs: u64 },
    /// Reading or writing a file, starting a runtime: what was being done, and the cause.
    #[error("{what}: {source}")]
    Io { what: String, source: Box<dyn std::error::Error + Send + Sync> },
    /// A helper program (ssh-keygen, qemu-img) failed: its name and what it said.
    #[error("{tool} {detail}")]
    Tool { tool: String, detail: String },
    /// QEMU did not say which machine type a new image is.
    #[error("qemu {0}")]
    MachineType(#[from] MachineTypeError),
    /// The installer VM ran past the image's time-out.
    #[error(
        "the install exceeded its timeout of {secs} s and was stopped; if it needs longer, {}{}",
        crate::session::Limit::Image.raise(),
        shown(screen)
    )]
    InstallTimeout {
        secs: u64,
        /// Where the installer's last screenshot is.
        screen: Option<String>,
    },
    /// The installer VM ended without announcing success.
    #[error(
        "the installer ended ({status}) without finishing\n--- last lines of the installer's serial log ---\n{log_tail}{}",
        shown(screen)
    )]
    InstallUnfinished { status: String, log_tail: String, screen: Option<String> },
    /// The build's image was made from another spec than the build was planned with: the
    /// attributes that differ, and whether the image is a pinned one (its pin then stands for
    /// an image of other attributes).
    #[error("{}", image_mismatch(image, differs, *pinned))]
    ImageMismatch { image: std::path::PathBuf, differs: Vec<spec::Difference>, pinned: bool },
    /// The image's layout is not the one this builder revives: what it is, and what to do.
    #[error("the image at {} cannot be revived: {detail}", image.display())]
    ImageFormat { image: std::path::PathBuf, detail: String },
    /// A layer's command failed: its number (from 1; 0 when the guest did not say), its exit
    /// code, and its text.
    #[error("{}", layer_command(*index, *code, command))]
    LayerCommand { index: usize, code: i32, command: String },
    /// A layer's commands succeeded, but the guest's check after them failed (its reason is
    /// in the log above).
    #[error(
        "the layer's commands succeeded, but they left the guest in a state a build cannot use (see the line above)"
    )]
    LayerCheck,
    /// The command (a build's script, or `run`'s) was killed by a signal in the guest.
    #[error("the command was killed by signal {signal}")]
    Killed { signal: String },
    /// A part of the image a build needs is missing or unreadable.
    #[error("the image {} {what}; build the image again (nix-store --repair-path {})", image.display(), image.display())]
    ImageDamaged { image: std::path::PathBuf, what: String },
    /// `qemu-img check` finds the image's disk corrupt.
    #[error(
        "the image's disk {} is damaged (qemu-img check: {detail}); build the image again (nix-store --repair-path {})",
        disk.display(),
        disk.parent().unwrap_or(disk).display()
    )]
    DiskDamaged { disk: std::path::PathBuf, detail: String },
    /// The command failed, or the session did, with a file system it writes to full: the
    /// build folder (the exchange folder, the outputs' archive) or `run`'s output folder.
    #[error(
        "no space left on device (ENOSPC): the file system of {} has {free_bytes} bytes free, and {after}; free space there (for a build: where Nix keeps its build folders, TMPDIR or build-dir)",
        path.display()
    )]
    NoSpace { path: std::path::PathBuf, free_bytes: u64, after: String },
}

/// A screenshot's line under an error, when one was taken.
fn shown(screen: &Option<String>) -> String {
    screen.as_ref().map(|s| format!("\n{s}")).unwrap_or_default()
}

/// An image made with other attributes than the build (or layer, or pin) was planned with:
/// which, and what to do.
fn image_mismatch(image: &std::path::Path, differs: &[spec::Difference], pinned: bool) -> String {
    let listed: Vec<String> = differs
        .iter()
        .map(|d| format!("{} = {} in the image, {} in this build's plan", d.attr, d.ours, d.theirs))
        .collect();
    let advice = if pinned {
        "the image is pinned, and its pin stands for an image made with the old attributes: take the pin off, build the image again, and pin the new hash"
    } else {
        "build it with the image derivation this build was planned with (the same builtins.windowsImage call), or build that image again"
    };
    format!(
        "the image at {} was made with other attributes than this build expects: {}; {advice}",
        image.display(),
        if listed.is_empty() { "its spec differs".to_owned() } else { listed.join(", ") }
    )
}

/// A failed layer command: which one and its text (shortened), or only the code when the guest
/// did not say which.
fn layer_command(index: usize, code: i32, command: &str) -> String {
    if index == 0 {
        return format!("the layer's commands exited {code} (the log above says where)");
    }
    let shown: String = command.trim().chars().take(LAYER_COMMAND_SHOWN).collect();
    let cut = if command.trim().chars().count() > LAYER_COMMAND_SHOWN { " ..." } else { "" };
    format!("layer command {index} exited {code}: {shown}{cut}")
}

/// A session's verdict as the builder's exit: the command's code, or an error; a failure
/// that a full file system among `writes` explains says so.
pub fn finish(
    result: Result<crate::protocol::Verdict, RunError>,
    progress: &Progress,
    writes: &[&std::path::Path],
) -> Result<i32, BuilderError> {
    use crate::protocol::Verdict;
    if let Ok(Verdict::Exited(code)) = &result {
        progress.say(&format!("command exited {code}"));
    }
    let after = match &result {
        Ok(Verdict::Exited(0)) => return Ok(0),
        Ok(Verdict::Exited(code)) => format!("the command exited {code}"),
        Ok(Verdict::Signal(signal)) => format!("the command was killed by signal {signal}"),
        Err(e) => format!("the session failed: {e}"),
    };
    if let Some(full) = explain_full_disk(writes, after) {
        return Err(full);
    }
    match result {
        Ok(Verdict::Exited(code)) => Ok(code),
        Ok(Verdict::Signal(signal)) => Err(BuilderError::Killed { signal }),
        Err(e) => Err(e.into()),
    }
}

/// How much of a failed layer command its error shows.
const LAYER_COMMAND_SHOWN: usize = 200;

/// Below this many free bytes a file system counts as full.
pub const FULL_BELOW_BYTES: u64 = 256 * 1024;

/// Free bytes on the file system of `path`, for an unprivileged writer.
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    crate::vm::sys::os::free_bytes(path)
}

/// A failure that a full file system explains: the first of `paths` that is full, named with
/// what went wrong (`after`) instead of a bare exit code.
pub fn explain_full_disk(paths: &[&std::path::Path], after: String) -> Option<BuilderError> {
    paths.iter().find_map(|p| {
        let free = free_bytes(p)?;
        (free < FULL_BELOW_BYTES).then(|| BuilderError::NoSpace {
            path: p.to_path_buf(),
            free_bytes: free,
            after: after.clone(),
        })
    })
}

impl BuilderError {
    /// The builder's exit code: a failed layer command's own (so Nix says it too), 1 for
    /// everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            BuilderError::LayerCommand { code, .. } if (1..=255).contains(code) => *code,
            _ => 1,
        }
    }
}

/// `map_err(io("doing what"))`: an I/O (or parse) failure with what was being done.
pub fn io<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> BuilderError {
    let what = what.into();
    move |e| BuilderError::Io { what, source: e.into() }
}

/// A path the derivation gives in the environment (`out`, `image`, `media`...).
pub(crate) fn env_path(name: &'static str) -> Result<std::path::PathBuf, BuilderError> {
    std::env::var_os(name).map(std::path::PathBuf::from).ok_or(BuilderError::MissingEnv(name))
}

/// The async runtime of a stage's session: one thread (the session waits on its VMs).
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, BuilderError> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io("starting the runtime"))
}

/// The uncompressed kernel inside `vmlinuz`, written to `dest` with the tools' xz.
fn extract_vmlinux(vmlinuz: &std::path::Path, dest: &std::path::Path) -> Result<(), BuilderError> {
    let xz = crate::tools::find("xz")?;
    Ok(crate::vm::kernel::extract_vmlinux(vmlinuz, dest, &xz)?)
}

fn env(name: &'static str) -> Result<String, BuilderError> {
    std::env::var(name).map_err(|_| BuilderError::MissingEnv(name))
}

/// Runs one stage or command; returns the process exit code.
pub fn main_with_args(args: &[String]) -> Result<i32, BuilderError> {
    use crate::protocol::{Stage, Subcommand};
    let sub = Subcommand::parse(args).map_err(|e| BuilderError::Usage(e.to_string()))?;
    let progress = Progress::new();
    match sub {
        Subcommand::Stage(stage @ (Stage::Media | Stage::Install | Stage::Suspend | Stage::Pin)) => {
            let spec = spec::image_spec_from_json(&env("winvmImageSpec")?).map_err(BuilderError::Spec)?;
            progress.say(&format!("stage {} of a {} image", stage.name(), spec.guest.name()));
            progress.phase(stage.name());
            match stage {
                Stage::Media => stages::media(&spec, &progress),
                Stage::Install => stages::install(&spec, &progress),
                Stage::Pin => pin::pin(&spec, &progress),
                _ => stages::suspend(&spec, &progress),
            }
        }
        Subcommand::Stage(Stage::Layer) => {
            let spec = spec::layer_spec_from_json(&env("winvmLayerSpec")?).map_err(BuilderError::Spec)?;
            progress.say(&format!("stage layer of a {} image", spec.image.guest.name()));
            progress.phase("layer");
            stages::layer(&spec, &progress)
        }
        Subcommand::Stage(Stage::Memory) => {
            progress.phase("memory");
            stages::memory_stage(&progress)
        }
        Subcommand::Stage(Stage::Build) => {
            let spec = spec::build_spec_from_json(&env("winvmBuildSpec")?).map_err(BuilderError::Spec)?;
            progress.phase("build");
            stages::build(&spec, &progress)
        }
        Subcommand::Stage(Stage::RequireFile) => {
            Err(BuilderError::RequiredFileMissing { name: env("winvmRequiredName")?, hash: env("outputHash")? })
        }
        Subcommand::StateWrite { out, memory_mib, qemu_version, guest, machine, ram_outside } => {
            let header = crate::vm::state::StateHeader { qemu_version, memory_mib, guest, machine, ram_outside };
            let mut stdin = std::io::stdin().lock();
            crate::vm::state::write(&out, &header, &mut stdin)?;
            Ok(0)
        }
        Subcommand::StateRead { input, error_to } => state_read(&input, error_to.as_deref()),
        Subcommand::Run(rest) => run::main(&rest),
        Subcommand::Rerun(rest) => rerun::rerun_main(&rest),
        Subcommand::Shell(rest) => rerun::shell_main(&rest),
        Subcommand::Stage(Stage::Test) => {
            progress.phase("test");
            test::stage(&progress)
        }
        Subcommand::TestNode(rest) => test::node_main(&rest),
        Subcommand::TestInteractive(rest) => test::interactive_main(&rest),
        Subcommand::Agent { config, now } => Ok(crate::agent::main(&config, now)?),
        Subcommand::AgentReady { config, session } => Ok(crate::agent::main_ready(&config, &session)?),
        Subcommand::Help => {
            println!("{}", crate::protocol::USAGE);
            Ok(0)
        }
    }
}

/// The loading end of QEMU's incoming migration: the state file, checked and inflated, on
/// stdout. A refusal is also left in `error_to` for the session (QEMU only sees the stream end).
fn state_read(input: &std::path::Path, error_to: Option<&std::path::Path>) -> Result<i32, BuilderError> {
    let mut stdout = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    if let Err(e) = crate::vm::state::read(input, None, &mut stdout) {
        // QEMU closing its end is no refusal of the file: QEMU's own output says why it stopped.
        let qemu_stopped = matches!(&e, StateFileError::Frame(crate::format::state::FrameError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::BrokenPipe);
        if let (Some(file), false) = (error_to, qemu_stopped) {
            let _ = std::fs::write(file, e.to_string());
        }
        return Err(e.into());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image of other attributes than the build's plan: which ones, and what to do, for a
    /// plain image and a pinned one.
    #[test]
    fn an_image_mismatch_names_the_attributes_and_the_fix() {
        use image::{ImageMeta, IMAGE_FORMAT, PINNED_CONTROLLER_SYSTEM, PINNED_MEDIA};
        let dir = tempfile::tempdir().unwrap();
        let made = spec::ImageSpec::standin();
        let meta = ImageMeta {
            format: IMAGE_FORMAT,
            spec: made.clone(),
            state_format: 1,
            machine: "pc-q35-10.0".into(),
            media: dir.path().join("media"),
            layers: 0,
            base: None,
        };
        meta.write(dir.path()).unwrap();
        assert!(ImageMeta::read(dir.path(), &made).is_ok());
        let mut planned = made.clone();
        planned.shape.memory_mib = 512;
        planned.shape.efi = true;
        let e = ImageMeta::read(dir.path(), &planned).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "the image at {} was made with other attributes than this build expects: \
                 efi = false in the image, true in this build's plan, memory = 256 in the image, 512 in this build's plan; \
                 build it with the image derivation this build was planned with (the same builtins.windowsImage call), or build that image again",
                dir.path().display()
            )
        );
        std::fs::create_dir(dir.path().join(PINNED_MEDIA)).unwrap();
        std::fs::write(dir.path().join(PINNED_MEDIA).join(PINNED_CONTROLLER_SYSTEM), "").unwrap();
        let e = ImageMeta::read(dir.path(), &planned).unwrap_err().to_string();
        assert!(e.ends_with("take the pin off, build the image again, and pin the new hash"), "{e}");
    }

    #[test]
    fn an_install_time_out_names_the_images_timeout() {
        let e = BuilderError::InstallTimeout { secs: 30, screen: None };
        assert_eq!(
            e.to_string(),
            "the install exceeded its timeout of 30 s and was stopped; if it needs longer, \
             raise `timeout = SECONDS;` in the builtins.windowsImage call"
        );
    }
}
