//! The derivations' builder: `nix-winvm-builder <stage>`, run by Nix inside its sandbox.

pub mod run;

use crate::spec;
use std::fmt;

#[derive(Debug)]
pub enum BuilderError {
    Usage(String),
    MissingEnv(&'static str),
    Spec(spec::SpecJsonError),
    NotImplemented(&'static str),
    RequiredFileMissing { name: String, hash: String },
    Run(String),
}

impl fmt::Display for BuilderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuilderError::Usage(m) => write!(f, "{m}"),
            BuilderError::MissingEnv(v) => write!(f, "environment variable {v} is not set (is this run by Nix?)"),
            BuilderError::Spec(e) => write!(f, "{e}"),
            BuilderError::NotImplemented(stage) => write!(f, "stage '{stage}' is not implemented yet"),
            BuilderError::Run(m) => write!(f, "{m}"),
            BuilderError::RequiredFileMissing { name, hash } => write!(
                f,
                "the file '{name}' is not in the Nix store. Add it with:\n  nix-store --add-fixed sha256 /path/to/{name}\n(expected sha256: {hash})"
            ),
        }
    }
}

impl std::error::Error for BuilderError {}

pub const USAGE: &str = "usage: nix-winvm-builder <media|install|suspend|build|require-file|run> [options]";

fn env(name: &'static str) -> Result<String, BuilderError> {
    std::env::var(name).map_err(|_| BuilderError::MissingEnv(name))
}

/// Runs one stage; returns the process exit code.
pub fn main_with_args(args: &[String]) -> Result<i32, BuilderError> {
    let stage = args.first().map(String::as_str).ok_or_else(|| BuilderError::Usage(USAGE.into()))?;
    match stage {
        "media" | "install" | "suspend" => {
            let spec = spec::image_spec_from_json(&env("winvmImageSpec")?).map_err(BuilderError::Spec)?;
            eprintln!("nix-winvm: stage {stage} of a {} image", spec.guest.name());
            Err(BuilderError::NotImplemented(match stage {
                "media" => "media",
                "install" => "install",
                _ => "suspend",
            }))
        }
        "build" => {
            spec::build_spec_from_json(&env("winvmBuildSpec")?).map_err(BuilderError::Spec)?;
            Err(BuilderError::NotImplemented("build"))
        }
        "require-file" => Err(BuilderError::RequiredFileMissing {
            name: env("winvmRequiredName")?,
            hash: env("outputHash")?,
        }),
        "run" => run::main(&args[1..]),
        "agent" => {
            let config = match args.get(1..) {
                Some([flag, path]) if flag == "--config" => path,
                _ => return Err(BuilderError::Usage("usage: nix-winvm-builder agent --config FILE".into())),
            };
            crate::controller::agent::main(std::path::Path::new(config)).map_err(|e| BuilderError::Run(e.to_string()))
        }
        "--help" | "-h" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => Err(BuilderError::Usage(format!("unknown stage '{other}'\n{USAGE}"))),
    }
}
