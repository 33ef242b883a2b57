//! Load: 20 builds in a row from one image, each a real `nix-build` of a new derivation,
//! printing per build: wall time, the builder's peak memory (VmHWM) and the most files it held
//! open (both sampled from /proc every 50 ms while it runs), the files left in TMPDIR, the
//! system's open file handles and its process count afterwards. No growth from the first builds
//! to the last is the check; nothing here is timed against a limit.
//!
//!   cargo bench --bench load [-- BUILDS]
//!
//! Needs what scripts/setup installs; builds (or reuses) the standin image in /nix/store.

#[path = "common.rs"]
mod common;

use common::{nix, nix_build, IMAGE};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

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

/// The builder of the build whose derivation is named `name`: pid, VmHWM in KiB, open fds.
fn sample_builder(name: &str) -> Option<(i32, i64, usize)> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains("nix-winvm-builder\0build") {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if !String::from_utf8_lossy(&environ).contains(name) {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let hwm = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
            .unwrap_or(0);
        let fds = std::fs::read_dir(entry.path().join("fd")).map(|d| d.count()).unwrap_or(0);
        return Some((pid, hwm, fds));
    }
    None
}

fn one_build(tmp: &Path, i: usize, run: u128) -> Sample {
    let name = format!("winvm-load-{run}-{i}");
    let expr = format!(
        r#"builtins.windowsDerivation {{ name = "{name}"; image = {IMAGE}; script = ''echo load-{i} > $out''; }}"#
    );
    let start = Instant::now();
    let child = nix("nix-build")
        .env("TMPDIR", tmp)
        .args(["--no-out-link", "-E", &expr])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (done, name) = (done.clone(), name.clone());
        std::thread::spawn(move || {
            let (mut hwm, mut fds) = (0i64, 0usize);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some((_, h, f)) = sample_builder(&name) {
                    hwm = hwm.max(h);
                    fds = fds.max(f);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            (hwm, fds)
        })
    };
    let o = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (peak_rss_kib, open_fds) = sampler.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(o.status.success(), "build {i} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let out = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), format!("load-{i}\n"), "build {i}'s output");
    let tmp_left = std::fs::read_dir(tmp).unwrap().count();
    Sample { secs, peak_rss_kib, open_fds, tmp_left, system_files: system_files(), processes: process_count() }
}

fn main() {
    let builds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(20);
    let (image, _) = nix_build(IMAGE);
    let run = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let scratch = tempfile::Builder::new().prefix("winvm-load").tempdir().unwrap();
    let tmp = scratch.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    println!("load: {builds} builds in a row from {}", image.display());
    println!(
        "{:>5} {:>8} {:>12} {:>9} {:>9} {:>13} {:>10}",
        "build", "secs", "peak RSS KiB", "max open fds", "tmp left", "system files", "processes"
    );
    let (files_before, processes_before) = (system_files(), process_count());
    let mut samples = vec![];
    for i in 0..builds {
        let s = one_build(&tmp, i, run);
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
