//! Helpers shared by the benches that drive real builds (stages, load): the builder, the plugin,
//! the sandbox configuration, the standin image's expression, and running a command while
//! stamping each line of its output as it arrives.
//!
//! Included with `#[path = "common.rs"] mod common;`; not every bench uses every helper.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Instant;

pub const BUILDER: &str = env!("CARGO_BIN_EXE_nix-winvm-builder");
pub const SANDBOX: &str = include_str!("../nix/sandbox.conf");
pub const IMAGE: &str = r#"builtins.windowsImage { guest = "standin"; accel = "tcg"; }"#;

/// The plugin cargo built with this bench (deps/ holds the newest copy).
pub fn plugin() -> PathBuf {
    let dir = Path::new(BUILDER).parent().unwrap();
    let fresh = dir.join("deps/libnix_winvm.so");
    if fresh.exists() {
        fresh
    } else {
        dir.join("libnix_winvm.so")
    }
}

/// `program` (nix-build, nix-instantiate) with the sandbox configuration, this builder and
/// this plugin.
pub fn nix(program: &str) -> Command {
    nix_with(program, Path::new(BUILDER), &plugin())
}

/// `program` with the sandbox configuration and another builder and plugin (another
/// nix-winvm's, for a before-and-after).
pub fn nix_with(program: &str, builder: &Path, plugin: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("NIX_CONFIG", SANDBOX).env("NIX_WINVM_BUILDER", builder).arg("--plugin-files").arg(plugin);
    cmd
}

/// Builds `expr` (no out link); its output path and the wall time in seconds.
pub fn nix_build(expr: &str) -> (PathBuf, f64) {
    let start = Instant::now();
    let o = nix("nix-build").args(["--no-out-link", "-E", expr]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()), start.elapsed().as_secs_f64())
}

/// Instantiates `expr`; the wall time in seconds (evaluation alone).
pub fn nix_instantiate(expr: &str) -> f64 {
    let start = Instant::now();
    let o = nix("nix-instantiate").args(["-E", expr]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    start.elapsed().as_secs_f64()
}

/// A standin derivation built from the cached image, made new by `token`.
pub fn derivation(token: &str, script: &str) -> String {
    derivation_on(IMAGE, token, script)
}

/// A build of `script` on `image` (a Nix expression).
pub fn derivation_on(image: &str, token: &str, script: &str) -> String {
    format!(
        r#"builtins.windowsDerivation {{ name = "bench"; image = {image}; token = "{token}"; script = "{script}"; }}"#
    )
}

/// One line of a command's output.
pub struct Line {
    /// Seconds from the spawn to the line's arrival, on the bench's clock.
    pub arrival: f64,
    /// The builder's own stamp (seconds since it started), on its progress lines
    /// `nix-winvm: [  0.72 s] ...`; None on every other line (the controller's
    /// `nix-winvm: [controller 6.38 s] ...` and the guest's are on clocks of their own).
    pub stamp: Option<f64>,
    pub stdout: bool,
    pub text: String,
}

/// A finished command: its lines in order of arrival, its exit time and status.
pub struct Stamped {
    pub lines: Vec<Line>,
    /// Seconds from the spawn to the exit.
    pub exit: f64,
    pub status: ExitStatus,
}

/// The builder's stamp on a progress line, if it has one.
pub fn builder_stamp(line: &str) -> Option<f64> {
    let rest = &line[line.find("nix-winvm: [")? + "nix-winvm: [".len()..];
    rest[..rest.find(" s]")?].trim().parse().ok()
}

/// Runs `cmd` (stdin closed), stamping each line of stdout and stderr as it arrives.
pub fn run_stamped(mut cmd: Command) -> Stamped {
    let start = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = move |pipe: Box<dyn Read + Send>, stdout: bool, tx: mpsc::Sender<Line>| {
        std::thread::spawn(move || {
            for text in BufReader::new(pipe).lines().map_while(Result::ok) {
                let arrival = start.elapsed().as_secs_f64();
                let stamp = builder_stamp(&text);
                let _ = tx.send(Line { arrival, stamp, stdout, text });
            }
        })
    };
    let out = reader(Box::new(child.stdout.take().unwrap()), true, tx.clone());
    let err = reader(Box::new(child.stderr.take().unwrap()), false, tx);
    let mut lines: Vec<Line> = rx.iter().collect();
    let status = child.wait().unwrap();
    let exit = start.elapsed().as_secs_f64();
    out.join().unwrap();
    err.join().unwrap();
    lines.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    Stamped { lines, exit, status }
}

impl Stamped {
    /// The whole output, one line each, for a failure's message.
    pub fn log(&self) -> String {
        self.lines.iter().map(|l| format!("[{:7.3}] {}\n", l.arrival, l.text)).collect()
    }

    /// Seconds from the spawn to the builder's start: the least arrival minus stamp over its
    /// stamped lines (each line arrives after it was stamped, so the least lag is the closest
    /// estimate); 0 when no line carries a stamp.
    pub fn offset(&self) -> f64 {
        self.lines.iter().filter_map(|l| l.stamp.map(|s| l.arrival - s)).reduce(f64::min).unwrap_or(0.0)
    }

    /// When the first line containing `marker` arrived, on the builder's clock: its own stamp
    /// if the line has one, else the arrival less the offset.
    pub fn at(&self, marker: &str) -> Option<f64> {
        let offset = self.offset();
        self.lines.iter().find(|l| l.text.contains(marker)).map(|l| l.stamp.unwrap_or(l.arrival - offset))
    }

    /// The exit, on the builder's clock.
    pub fn exit_at(&self) -> f64 {
        self.exit - self.offset()
    }
}
