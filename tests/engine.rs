//! The VM engine for real: vde_switch, two QEMUs under TCG, smbd, SSH, the standin guest.
//! Each test gets its own TMPDIR, so leftover processes can be found by their command lines.

mod common;
use common::builder;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch { dir: tempfile::Builder::new().prefix("winvm-engine").tempdir().unwrap() }
    }
    fn tmp(&self) -> PathBuf {
        let t = self.dir.path().join("tmp");
        std::fs::create_dir_all(&t).unwrap();
        t
    }
    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }
    fn command(&self, extra: &[&str], cmd: &[&str]) -> Command {
        let mut c = Command::new(builder());
        c.env("TMPDIR", self.tmp())
            .args(["run", "--guest", "standin", "--accel", "tcg", "--out"])
            .arg(self.out())
            .args(extra)
            .arg("--")
            .args(cmd);
        c
    }
    fn run(&self, extra: &[&str], cmd: &[&str]) -> Output {
        let o = self.command(extra, cmd).output().unwrap();
        self.assert_nothing_left();
        o
    }
    /// Every process whose command line mentions this test's scratch folder.
    fn leftovers(&self) -> Vec<String> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let mut found = vec![];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            if !entry.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
                continue;
            }
            if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains(&needle) && !cmdline.contains("nix-winvm-builder run") {
                    found.push(format!("{}: {}", entry.file_name().to_string_lossy(), cmdline));
                }
            }
        }
        found
    }
    fn assert_nothing_left(&self) {
        // Reaping is synchronous in the builder, but give the kernel a moment to remove entries.
        let start = Instant::now();
        while !self.leftovers().is_empty() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(self.leftovers(), Vec::<String>::new(), "processes left running");
    }
    fn pid_of(&self, marker: &str) -> Option<i32> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains(&needle) && cmdline.contains(marker) && cmdline.contains("qemu-system") {
                    return Some(pid);
                }
            }
        }
        None
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Starts the builder and reads its stderr until `marker` appears; returns the rest in a thread.
fn spawn_until(s: &Scratch, extra: &[&str], cmd: &[&str], marker: &str) -> (Child, std::thread::JoinHandle<String>) {
    let mut child = s.command(extra, cmd).stderr(Stdio::piped()).spawn().unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = marker.to_owned();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        let mut sent = false;
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            if !sent && line.contains(&wanted) {
                let _ = tx.send(());
                sent = true;
            }
        }
        all
    });
    if rx.recv_timeout(Duration::from_secs(300)).is_err() {
        let log = reader.join().unwrap_or_default();
        panic!("'{marker}' never appeared; the builder said:\n{log}");
    }
    (child, reader)
}

#[test]
fn the_issue_example_exits_42_with_its_output_and_a_store_file_read_in_the_guest() {
    let s = Scratch::new();
    let file = s.dir.path().join("input.txt");
    std::fs::write(&file, "from the store\n").unwrap();
    let added =
        Command::new("nix-store").env("NIX_CONFIG", "build-users-group =").arg("--add").arg(&file).output().unwrap();
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let store_path = String::from_utf8_lossy(&added.stdout).trim().to_owned();
    let script = format!("echo hello > $out/greeting; cat {store_path} > $out/copy; exit 42");
    let o = s.run(&[], &["sh", "-c", &script]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(42), "{err}");
    assert_eq!(std::fs::read_to_string(s.out().join("greeting")).unwrap(), "hello\n");
    assert_eq!(std::fs::read_to_string(s.out().join("copy")).unwrap(), "from the store\n");
    let mut last = 0;
    for marker in ["switch up", "guest up", "controller up", "ssh ready", "command exited 42"] {
        let at = err.find(marker).unwrap_or_else(|| panic!("no '{marker}' in:\n{err}"));
        assert!(at >= last, "'{marker}' out of order in:\n{err}");
        last = at;
    }
}

#[test]
fn exit_codes_come_back() {
    let s = Scratch::new();
    for (cmd, code) in [("true", 0), ("exit 1", 1), ("echo to-stderr >&2; exit 3", 3), ("no-such-command", 127)] {
        let o = s.run(&[], &["sh", "-c", cmd]);
        assert_eq!(o.status.code(), Some(code), "{cmd}: {}", stderr(&o));
        assert!(stderr(&o).contains(&format!("command exited {code}")), "{}", stderr(&o));
    }
    let o = s.run(&[], &["sh", "-c", "echo to-stderr >&2; exit 3"]);
    assert!(stderr(&o).contains("to-stderr"), "the command's stderr streams into the log");
}

#[test]
fn a_command_killed_by_a_signal_is_a_failure() {
    let s = Scratch::new();
    let o = s.run(&[], &["sh", "-c", "kill -9 $$"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("killed by signal KILL"), "{}", stderr(&o));
}

#[test]
fn fifty_megabytes_of_output_arrive_whole() {
    let s = Scratch::new();
    let o = s.run(&[], &["sh", "-c", "dd if=/dev/urandom of=$out/big bs=1M count=50 2>/dev/null && md5sum $out/big"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let big = s.out().join("big");
    assert_eq!(std::fs::metadata(&big).unwrap().len(), 50 * 1024 * 1024);
    let md5 = Command::new("md5sum").arg(&big).output().unwrap();
    let host_sum = String::from_utf8_lossy(&md5.stdout).split_whitespace().next().unwrap().to_owned();
    assert!(stderr(&o).contains(&host_sum), "guest and host checksums differ:\n{}", stderr(&o));
}

/// The time-out counts from the builder's start, and must strike during the command: under
/// load the controller alone has taken 21 s to be ready, so the time-out is three times that.
/// The run ends no sooner than the time-out, and soon after it.
#[test]
fn a_build_over_its_timeout_is_stopped() {
    const TIMEOUT: Duration = Duration::from_secs(60);
    let s = Scratch::new();
    let start = Instant::now();
    let (child, reader) = spawn_until(&s, &["--timeout", "60"], &["sleep", "600"], "ssh ready");
    let ready = start.elapsed();
    let o = child.wait_with_output().unwrap();
    let took = start.elapsed();
    let err = reader.join().unwrap();
    s.assert_nothing_left();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(ready < TIMEOUT, "SSH was ready only after {ready:?}, past the time-out:\n{err}");
    assert!(err.contains("the build exceeded its timeout of 60 s while running the command, and was stopped"), "{err}");
    assert!(took >= TIMEOUT, "stopped after {took:?}, before its time-out:\n{err}");
    assert!(took < TIMEOUT + Duration::from_secs(30), "stopped only after {took:?}:\n{err}");
}

#[test]
fn sigterm_stops_everything() {
    let s = Scratch::new();
    let (child, reader) = spawn_until(&s, &[], &["sleep", "600"], "ssh ready");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    let err = reader.join().unwrap();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted by SIGTERM; the VMs were stopped"), "{err}");
    s.assert_nothing_left();
}

#[test]
fn a_guest_killed_mid_command_is_reported() {
    let s = Scratch::new();
    let (child, reader) = spawn_until(&s, &[], &["sleep", "600"], "ssh ready");
    let pid = s.pid_of("guest-qmp.sock").expect("guest QEMU not found");
    // SAFETY: killing the test's own guest QEMU.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let start = Instant::now();
    let o = child.wait_with_output().unwrap();
    let err = reader.join().unwrap();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("the guest VM died during the command (QEMU ended with signal 9)"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(30));
    s.assert_nothing_left();
}

/// Whether /proc/cpuinfo's flags show vmx or svm.
fn hardware_virtualisation() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[test]
fn kvm_on_a_machine_without_it_fails_fast() {
    if !nix_winvm::testing::test_requires(
        "a CPU without hardware virtualisation (no vmx/svm flag in /proc/cpuinfo)",
        !hardware_virtualisation(),
    ) {
        return;
    }
    let s = Scratch::new();
    let start = Instant::now();
    let o =
        Command::new(builder()).env("TMPDIR", s.tmp()).args(["run", "--accel", "kvm", "--", "true"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("accel = \"kvm\" was requested but KVM is not usable here"), "{}", stderr(&o));
    // Refused before anything starts: a boot takes far longer, a busy machine a little longer.
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
}

/// `--accel auto` (the default) runs the command on a machine without KVM, saying in one line
/// why it falls back to TCG; where KVM is real it uses it.
#[test]
fn accel_auto_falls_back_to_tcg_and_says_why() {
    let hardware = hardware_virtualisation();
    let s = Scratch::new();
    let o = Command::new(builder())
        .env("TMPDIR", s.tmp())
        .args(["run", "--guest", "standin", "--accel", "auto", "--", "true"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    if hardware {
        assert!(err.contains("accelerator: kvm"), "{err}");
    } else {
        let lines: Vec<&str> = err.lines().filter(|l| l.contains("falling back to TCG")).collect();
        assert_eq!(lines.len(), 1, "one fallback line expected:\n{err}");
        assert!(
            lines[0].contains(
                "KVM unusable (the CPU has no vmx/svm flag in /proc/cpuinfo): falling back to TCG, software emulation, several times slower"
            ),
            "{err}"
        );
        assert!(err.contains("accelerator: tcg"), "{err}");
    }
    s.assert_nothing_left();
}
