//! The derivations' builder: `nix-winvm-builder <stage>`, run by Nix inside its sandbox.

pub mod run;
pub mod stages;

use crate::spec;
use std::fmt;

#[derive(Debug)]
pub enum BuilderError {
    Usage(String),
    MissingEnv(&'static str),
    Spec(spec::SpecJsonError),
    RequiredFileMissing { name: String, hash: String },
    Run(String),
}

impl fmt::Display for BuilderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuilderError::Usage(m) => write!(f, "{m}"),
            BuilderError::MissingEnv(v) => write!(f, "environment variable {v} is not set (is this run by Nix?)"),
            BuilderError::Spec(e) => write!(f, "{e}"),
            BuilderError::Run(m) => write!(f, "{m}"),
            BuilderError::RequiredFileMissing { name, hash } => write!(
                f,
                "the file '{name}' is not in the Nix store. Add it with:\n  nix-store --add-fixed sha256 /path/to/{name}\n(expected sha256: {hash})"
            ),
        }
    }
}

impl std::error::Error for BuilderError {}

pub const USAGE: &str =
    "usage: nix-winvm-builder <media|install|suspend|build|require-file|run|agent|state-write|state-read> [options]";

fn env(name: &'static str) -> Result<String, BuilderError> {
    std::env::var(name).map_err(|_| BuilderError::MissingEnv(name))
}

/// Runs one stage; returns the process exit code.
pub fn main_with_args(args: &[String]) -> Result<i32, BuilderError> {
    let stage = args.first().map(String::as_str).ok_or_else(|| BuilderError::Usage(USAGE.into()))?;
    match stage {
        "media" | "install" | "suspend" => {
            let spec = spec::image_spec_from_json(&env("winvmImageSpec")?).map_err(BuilderError::Spec)?;
            let progress = crate::vm::session::Progress::new();
            progress.say(&format!("stage {stage} of a {} image", spec.guest.name()));
            match stage {
                "media" => stages::media(&spec, &progress),
                "install" => stages::install(&spec, &progress),
                _ => stages::suspend(&spec, &progress),
            }
        }
        "build" => {
            let spec = spec::build_spec_from_json(&env("winvmBuildSpec")?).map_err(BuilderError::Spec)?;
            stages::build(&spec, &crate::vm::session::Progress::new())
        }
        "state-write" => state_write(&args[1..]),
        "state-read" => state_read(&args[1..]),
        "require-file" => {
            Err(BuilderError::RequiredFileMissing { name: env("winvmRequiredName")?, hash: env("outputHash")? })
        }
        "run" => run::main(&args[1..]),
        "agent" => {
            let config = flag(args, "--config")?;
            // The host's clock when the session began: a revived controller's own clock lags.
            let now = flag(args, "--now").ok().and_then(|n| n.parse::<u64>().ok());
            crate::controller::agent::main(std::path::Path::new(config), now)
                .map_err(|e| BuilderError::Run(e.to_string()))
        }
        "--help" | "-h" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => Err(BuilderError::Usage(format!("unknown stage '{other}'\n{USAGE}"))),
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Result<&'a str, BuilderError> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .ok_or_else(|| BuilderError::Usage(format!("missing {name}")))
}

/// QEMU's `migrate exec:` end: the migration stream on stdin, into a state file.
fn state_write(args: &[String]) -> Result<i32, BuilderError> {
    let header = crate::vm::state::StateHeader {
        qemu_version: flag(args, "--qemu-version")?.to_owned(),
        memory_mib: flag(args, "--memory")?
            .parse()
            .map_err(|_| BuilderError::Usage("--memory: expected MiB".into()))?,
        guest: flag(args, "--guest")?.to_owned(),
    };
    let path = std::path::PathBuf::from(flag(args, "--out")?);
    let mut stdin = std::io::stdin().lock();
    crate::vm::state::write(&path, &header, &mut stdin).map_err(|e| BuilderError::Run(e.to_string()))?;
    Ok(0)
}

/// QEMU's `-incoming exec:` end: the state file, checked and inflated, on stdout. With
/// `--error-to FILE`, a refusal is also left in FILE for the session (QEMU only sees the
/// stream end).
fn state_read(args: &[String]) -> Result<i32, BuilderError> {
    let path = std::path::PathBuf::from(flag(args, "--in")?);
    let mut stdout = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    if let Err(e) = crate::vm::state::read(&path, None, &mut stdout) {
        if let Ok(file) = flag(args, "--error-to") {
            let _ = std::fs::write(file, e.to_string());
        }
        return Err(BuilderError::Run(e.to_string()));
    }
    Ok(0)
}
