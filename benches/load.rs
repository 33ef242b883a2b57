//! Load: 20 builds in a row from one image, each the build stage run by hand (so that the
//! builder is this program's child), printing per build: wall time, the builder's peak memory
//! (wait4's ru_maxrss), the files it holds open while the command runs, the files left in
//! TMPDIR besides its work folder, the system's open file handles and its process count. No
//! growth from the first builds to the last is the check; nothing here is timed against a limit.
//!
//!   cargo bench --bench load [-- BUILDS]
//!
//! Needs what scripts/setup installs; builds (or reuses) the standin image in /nix/store.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const BUILDER: &str = env!("CARGO_BIN_EXE_nix-winvm-builder");
const SANDBOX: &str = include_str!("../nix/sandbox.conf");
const IMAGE: &str = r#"builtins.windowsImage { guest = "standin"; accel = "tcg"; }"#;

fn plugin() -> PathBuf {
    let dir = Path::new(BUILDER).parent().unwrap();
    let fresh = dir.join("deps/libnix_winvm.so");
    if fresh.exists() {
        fresh
    } else {
        dir.join("libnix_winvm.so")
    }
}

fn image() -> PathBuf {
    let o = Command::new("nix-build")
        .env("NIX_CONFIG", SANDBOX)
        .env("NIX_WINVM_BUILDER", BUILDER)
        .arg("--plugin-files")
        .arg(plugin())
        .args(["--no-out-link", "-E", IMAGE])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

/// The system's allocated file handles (the first field of /proc/sys/fs/file-nr).
fn system_files() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/file-nr")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn process_count() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()))
        .count()
}

struct Sample {
    secs: f64,
    peak_rss_kib: i64,
    open_fds: usize,
    tmp_left: usize,
    system_files: u64,
    processes: usize,
}

/// One build stage by hand; the builder's stderr is read until it ends, its fds counted when
/// the command runs, its rusage taken with wait4 (which reaps it: `Child::wait` would not
/// give the rusage).
#[allow(clippy::zombie_processes)]
fn one_build(image: &Path, spec: &str, tmp: &Path, i: usize) -> Sample {
    let out = tmp.parent().unwrap().join(format!("out-{i}"));
    let start = Instant::now();
    let mut child = Command::new(BUILDER)
        .arg("build")
        .env("image", image)
        .env("winvmBuildSpec", spec)
        .env("script", format!("echo load-{i} > $out"))
        .env("out", &out)
        .env("TMPDIR", tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut open_fds = 0;
    let mut log = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok) {
        if line.contains("ssh ready") {
            open_fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
        }
        log.push_str(&line);
        log.push('\n');
    }
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it in for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "build {i} failed:\n{log}");
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), format!("load-{i}\n"), "build {i}'s output");
    std::fs::remove_file(&out).unwrap();
    // Outside Nix the work folder stays (Nix removes its build folder); anything else would be
    // a leak.
    let mut tmp_left = 0;
    for entry in std::fs::read_dir(tmp).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with("winvm") && entry.path().is_dir() {
            std::fs::remove_dir_all(entry.path()).unwrap();
        } else {
            tmp_left += 1;
        }
    }
    Sample {
        secs,
        peak_rss_kib: usage.ru_maxrss,
        open_fds,
        tmp_left,
        system_files: system_files(),
        processes: process_count(),
    }
}

fn main() {
    let builds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(20);
    let image = image();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(image.join("meta.json")).unwrap()).unwrap();
    let spec =
        serde_json::json!({ "image": meta["spec"], "timeoutSecs": 300, "runOriginalBuilder": false }).to_string();
    let scratch = tempfile::Builder::new().prefix("winvm-load").tempdir().unwrap();
    let tmp = scratch.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    println!("load: {builds} builds in a row from {}", image.display());
    println!(
        "{:>5} {:>8} {:>12} {:>9} {:>9} {:>13} {:>10}",
        "build", "secs", "peak RSS KiB", "open fds", "tmp left", "system files", "processes"
    );
    let (files_before, processes_before) = (system_files(), process_count());
    let mut samples = vec![];
    for i in 0..builds {
        let s = one_build(&image, &spec, &tmp, i);
        println!(
            "{:>5} {:>8.2} {:>12} {:>9} {:>9} {:>13} {:>10}",
            i + 1,
            s.secs,
            s.peak_rss_kib,
            s.open_fds,
            s.tmp_left,
            s.system_files,
            s.processes
        );
        samples.push(s);
    }
    let first = &samples[..samples.len().min(3)];
    let last = &samples[samples.len().saturating_sub(3)..];
    let mean = |xs: &[Sample], f: fn(&Sample) -> f64| xs.iter().map(f).sum::<f64>() / xs.len() as f64;
    println!("before the builds: {files_before} system files, {processes_before} processes");
    for (name, f) in [
        ("secs", (|s: &Sample| s.secs) as fn(&Sample) -> f64),
        ("peak RSS KiB", |s| s.peak_rss_kib as f64),
        ("open fds", |s| s.open_fds as f64),
        ("tmp left", |s| s.tmp_left as f64),
        ("system files", |s| s.system_files as f64),
        ("processes", |s| s.processes as f64),
    ] {
        let (a, b) = (mean(first, f), mean(last, f));
        println!("{name:>13}: first 3 {a:.1}, last 3 {b:.1} (ratio {:.3})", if a == 0.0 { 1.0 } else { b / a });
    }
}
