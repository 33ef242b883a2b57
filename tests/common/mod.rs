//! Shared helpers of the end-to-end tests: the real `nix` with the plugin, a throw-away store.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// target/<profile>/, where cargo puts both the plugin and the builder.
pub fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nix-winvm-builder")).parent().expect("bin dir").to_path_buf()
}

/// `cargo test` rebuilds the cdylib in deps/ without copying it up to target/<profile>/, so the
/// copy in deps/ is the one that matches the code under test.
pub fn plugin() -> PathBuf {
    let fresh = target_dir().join("deps/libnix_winvm.so");
    let p = if fresh.is_file() { fresh } else { target_dir().join("libnix_winvm.so") };
    assert!(p.is_file(), "plugin not built at {}", p.display());
    p
}

pub fn builder() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nix-winvm-builder"))
}

/// A private chroot store and state directory, removed when dropped.
pub struct NixEnv {
    pub dir: tempfile::TempDir,
}

impl NixEnv {
    pub fn new() -> NixEnv {
        NixEnv { dir: tempfile::Builder::new().prefix("nix-winvm-test").tempdir().expect("tempdir") }
    }

    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("NIX_CONFIG", "build-users-group =\nexperimental-features = nix-command\nsubstituters =")
            .env("NIX_STATE_DIR", self.dir.path().join("state"))
            .env("NIX_LOG_DIR", self.dir.path().join("log"))
            .env("HOME", self.dir.path())
            .env("NIX_WINVM_BUILDER", builder())
            .env_remove("NIX_REMOTE")
            .env_remove("NIX_PATH");
        c
    }

    /// `nix-instantiate --plugin-files PLUGIN --store STORE ARGS... -E EXPR`
    pub fn instantiate(&self, args: &[&str], expr: &str) -> Output {
        let mut c = self.command("nix-instantiate");
        c.arg("--plugin-files").arg(plugin()).arg("--store").arg(self.store()).args(args).arg("-E").arg(expr);
        c.output().expect("run nix-instantiate")
    }

    pub fn eval(&self, expr: &str) -> Output {
        self.instantiate(&["--eval", "--strict", "--json"], expr)
    }

    /// `nix --plugin-files PLUGIN --store STORE ARGS...`
    pub fn nix(&self, args: &[&str]) -> Output {
        let mut c = self.command("nix");
        c.arg("--plugin-files").arg(plugin()).arg("--store").arg(self.store()).args(args);
        c.output().expect("run nix")
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean evaluation error (exit 1, not a crash) whose message is exactly `msg`: the
/// last `error: ` line of Nix's report (later Nix prints its trace above it).
pub fn assert_eval_error(o: &Output, msg: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected a Nix error (exit 1), got {:?}\nstderr: {err}", o.status);
    let last = err.lines().rev().find_map(|l| l.trim_start().strip_prefix("error: "));
    assert_eq!(last, Some(msg), "in:\n{err}");
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// The settings the README and scripts/example use.
pub const SANDBOX_CONFIG: &str = include_str!("../../nix/sandbox.conf");

/// `nix-build --plugin-files PLUGIN` in the sandbox, with the machine's store, as the README
/// runs it; the caller adds what to build.
pub fn sandboxed_nix_build() -> Command {
    let mut c = Command::new("nix-build");
    c.env("NIX_CONFIG", SANDBOX_CONFIG)
        .env("NIX_WINVM_BUILDER", builder())
        .env_remove("NIX_REMOTE")
        .arg("--plugin-files")
        .arg(plugin());
    c
}

/// The folder Nix kept after a failed `-K` build, as its log names it: under TMPDIR up to 2.29,
/// under its build-dir after.
pub fn kept_build_dir(log: &str) -> PathBuf {
    log.lines()
        .find_map(|l| l.split("keeping build directory ").nth(1))
        .map(|p| PathBuf::from(p.trim().trim_matches(|c| c == '\'' || c == '"')))
        .unwrap_or_else(|| panic!("no kept build folder named in:\n{log}"))
}

/// The stage's work folder (`winvm…`) in a kept build folder: the sandbox's /build is the kept
/// folder itself (Nix 2.8) or its `build` child (later Nix).
pub fn kept_work_folder(build_dir: &Path) -> PathBuf {
    [build_dir.to_path_buf(), build_dir.join("build")]
        .iter()
        .filter(|d| d.is_dir())
        .find_map(|d| {
            std::fs::read_dir(d)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("winvm")))
        })
        .unwrap_or_else(|| panic!("no work folder in {}", build_dir.display()))
}

/// Outside TMPDIR (Nix's build-dir) nothing else removes a kept folder: Nix 2.34 names the
/// inner `build` folder, whose private parent it made for this build alone.
pub fn remove_kept(build_dir: &Path) {
    let top = if build_dir.ends_with("build") { build_dir.parent().unwrap() } else { build_dir };
    let _ = std::fs::remove_dir_all(top);
}

pub const STANDIN_TCG: &str = r#"builtins.windowsImage { guest = "standin"; accel = "tcg"; }"#;

/// A hash no image has: the first build of a pin, which Nix answers with the hash it got.
pub const UNKNOWN_PIN: &str = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

/// The hash Nix got, from its mismatch message (`got:    sha256-…`).
pub fn got_hash(log: &str) -> String {
    log.lines()
        .find_map(|l| l.trim().strip_prefix("got:"))
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|| panic!("no hash mismatch in:\n{log}"))
}

pub fn nix_build_with(builder: &Path, args: &[&str]) -> Output {
    sandboxed_nix_build().env("NIX_WINVM_BUILDER", builder).args(args).output().unwrap()
}

/// Pins `expr` (`{PIN}` in it stands for the hash) as a user does: a first build with an unknown
/// hash, then the hash it got. The pinned path, its hash, and the first build's log.
pub fn pin(expr: &str) -> (PathBuf, String, String) {
    let first = nix_build_with(&builder(), &["--no-out-link", "-E", &expr.replace("{PIN}", UNKNOWN_PIN)]);
    let first_log = stderr(&first);
    assert!(!first.status.success(), "{first_log}");
    assert!(first_log.contains("a Windows install is not reproducible, so a pinned image is made once"), "{first_log}");
    let hash = got_hash(&first_log);
    let second = nix_build_with(&builder(), &["--no-out-link", "-E", &expr.replace("{PIN}", &hash)]);
    let log = stderr(&second);
    assert!(second.status.success(), "{log}");
    // Nothing was installed again: Nix kept the first build's output under the hash it got
    // (Nix 2.8 does), or the pin stage copied the unpinned image again.
    let built: Vec<&str> = log.lines().filter(|l| l.starts_with("building '")).collect();
    assert!(built.iter().all(|l| l.contains("-pinned.drv")), "{log}");
    (PathBuf::from(String::from_utf8_lossy(&second.stdout).trim()), hash, first_log)
}

/// The plugin and its builder copied into a folder of their own, registered by scripts/register
/// as the README's Debian route does (the tests' own plugin in target/ stays unregistered).
pub fn registered_plugin() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("nix-winvm-registered").tempdir().unwrap();
    std::fs::copy(plugin(), dir.path().join("libnix_winvm.so")).unwrap();
    std::fs::copy(builder(), dir.path().join("nix-winvm-builder")).unwrap();
    let o = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/register"))
        .arg(dir.path())
        .env_remove("NIX_WINVM_BUILDER")
        .output()
        .unwrap();
    assert!(o.status.success(), "scripts/register failed:\n{}", stderr(&o));
    dir
}

/// `nix --plugin-files PLUGIN ARGS...` with flakes on, pure evaluation (the default), the
/// sandbox on, and none of the variables that make the plugin look for host paths. Without
/// the evaluation cache: it is keyed by the flake alone, so it would hand back a drvPath that
/// an earlier plugin (another builder) made (README, "What a derivation depends on").
pub fn flake_nix(plugin_dir: &Path, args: &[&str]) -> Output {
    Command::new("nix")
        .env(
            "NIX_CONFIG",
            format!("{SANDBOX_CONFIG}\nexperimental-features = nix-command flakes\neval-cache = false\n"),
        )
        .env_remove("NIX_WINVM_BUILDER")
        .env_remove("NIX_WINVM_KERNEL_DIR")
        .env_remove("NIX_REMOTE")
        .arg("--plugin-files")
        .arg(plugin_dir.join("libnix_winvm.so"))
        .args(args)
        .output()
        .expect("run nix")
}
