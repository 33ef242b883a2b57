//! Faults injected into real runs: a process of the pair killed mid-command, smbd lost in the
//! controller, a guest that never answers, a full file system, damaged images, and Nix
//! interrupted in each stage. Each case asserts the exact error (naming the stage or command
//! and the part that failed), the exit code, and that nothing is left: no process of the run
//! (found by its command line or environment in /proc), no mount (the host's mount table, and
//! for a sandboxed build its sandbox's own: read while the build runs, gone with it after), no
//! file outside the work folder (the run's TMPDIR, looked at before the test cleans anything).
// Needs the builder built with `test-faults` (scripts/test does): without it, the injected faults
// would not happen; scripts/test names this suite when it did not run.
#![cfg(all(feature = "plugin", feature = "test-faults"))]

mod common;
use common::{builder, sandboxed_nix_build};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = r#"builtins.windowsImage { guest = "standin"; accel = "tcg"; }"#;

/// A test's own folder: TMPDIR of what it runs, and the needle that finds its processes.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = tempfile::Builder::new().prefix(&format!("winvm-fault-{name}-")).tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        Scratch { dir }
    }

    fn tmp(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }

    /// `nix-winvm-builder run` of a cold standin pair under TCG, with `env` added.
    fn run_command(&self, env: &[(&str, &str)], extra: &[&str], cmd: &[&str]) -> Command {
        let mut c = Command::new(builder());
        c.env("TMPDIR", self.tmp()).envs(env.iter().copied());
        c.args(["run", "--guest", "standin", "--accel", "tcg"]).args(extra).arg("--").args(cmd);
        c
    }

    /// Checks that nothing of the run is left: processes and mounts (see
    /// [`Scratch::assert_nothing_running`]), files in TMPDIR.
    fn assert_nothing_left(&self, marker: Option<&str>, sandbox: Option<&Sandbox>) {
        self.assert_nothing_running(marker, sandbox);
        self.assert_tmpdir_empty();
    }

    /// No process whose command line names this folder or whose environment holds `marker`;
    /// no mount below this folder in the host's mount table (PID 1's, not the test's own view);
    /// and, for a sandboxed build, no process left in its sandbox's mount namespace: with the
    /// last one the namespace, and every mount in it, is gone.
    fn assert_nothing_running(&self, marker: Option<&str>, sandbox: Option<&Sandbox>) {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let start = Instant::now();
        // Reaping is synchronous, but the kernel takes a moment to drop the entries.
        let mut left = leftovers(&needle, marker);
        while !left.is_empty() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
            left = leftovers(&needle, marker);
        }
        assert_eq!(left, Vec::<String>::new(), "processes left running");
        let mounts: Vec<String> = std::fs::read_to_string("/proc/1/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&needle))
            .map(String::from)
            .collect();
        assert_eq!(mounts, Vec::<String>::new(), "mounts left in the host's mount table");
        if let Some(sandbox) = sandbox {
            let inside = in_namespace(&sandbox.mnt_ns);
            assert_eq!(
                inside,
                Vec::<String>::new(),
                "processes left in the sandbox's mount namespace {} (it held {} mounts, /build among them)",
                sandbox.mnt_ns,
                sandbox.mounts
            );
        }
    }

    /// The run's TMPDIR holds nothing; called before the test removes or unmounts anything.
    fn assert_tmpdir_empty(&self) {
        let files: Vec<PathBuf> = std::fs::read_dir(self.tmp()).unwrap().flatten().map(|e| e.path()).collect();
        assert_eq!(files, Vec::<PathBuf>::new(), "files left in TMPDIR");
    }

    /// The pid of a process of this run whose command line contains `what`.
    fn pid_of(&self, what: &str) -> Option<i32> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        processes().into_iter().find(|(_, cmdline, _)| cmdline.contains(&needle) && cmdline.contains(what)).map(|p| p.0)
    }
}

/// A running build's sandbox, seen from outside: its mount namespace and how many mounts it had.
struct Sandbox {
    mnt_ns: String,
    mounts: usize,
}

/// The mount namespace of the running build whose processes' environment holds `marker`, read
/// while it runs: a namespace other than the test's, with the sandbox's /build mounted in it.
/// (nix-build itself may hold the marker too, in its TMPDIR, and has a namespace of its own.)
fn sandbox_of(marker: &str) -> Sandbox {
    let own = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let candidates: Vec<i32> = processes()
        .into_iter()
        .filter(|(_, cmdline, environ)| !cmdline.is_empty() && environ.contains(marker))
        .map(|p| p.0)
        .collect();
    for pid in &candidates {
        let (Ok(ns), Ok(table)) = (
            std::fs::read_link(format!("/proc/{pid}/ns/mnt")),
            std::fs::read_to_string(format!("/proc/{pid}/mountinfo")),
        ) else {
            continue;
        };
        // mountinfo's fifth field is the mount point.
        if ns != own && table.lines().any(|l| l.split(' ').nth(4) == Some("/build")) {
            return Sandbox { mnt_ns: ns.to_string_lossy().into_owned(), mounts: table.lines().count() };
        }
    }
    panic!("no process of the build ({marker:?} in its environment: {candidates:?}) has /build mounted in a namespace of its own");
}

/// Every process whose mount namespace is `ns` (as /proc/PID/ns/mnt names it).
fn in_namespace(ns: &str) -> Vec<String> {
    let start = Instant::now();
    loop {
        let found: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()))
            .filter(|e| std::fs::read_link(e.path().join("ns/mnt")).is_ok_and(|l| l.to_string_lossy() == ns))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if found.is_empty() || start.elapsed() > Duration::from_secs(5) {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every process: pid, command line, environment.
fn processes() -> Vec<(i32, String, String)> {
    let me = std::process::id() as i32;
    let mut found = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid == me {
            continue;
        }
        let read = |f: &str| {
            String::from_utf8_lossy(&std::fs::read(entry.path().join(f)).unwrap_or_default()).replace('\0', " ")
        };
        found.push((pid, read("cmdline"), read("environ")));
    }
    found
}

fn leftovers(needle: &str, marker: Option<&str>) -> Vec<String> {
    processes()
        .into_iter()
        .filter(|(_, cmdline, environ)| {
            !cmdline.is_empty() && (cmdline.contains(needle) || marker.is_some_and(|m| environ.contains(m)))
        })
        .map(|(pid, cmdline, _)| format!("{pid}: {cmdline}"))
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Starts `cmd` with its stderr read in a thread; returns once a line contains every one of
/// `markers` in turn, with the thread that collects the rest.
fn spawn_until(mut cmd: Command, markers: &[&str]) -> (Child, std::thread::JoinHandle<String>) {
    // Its own process group, as a terminal's Ctrl-C would reach it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted: Vec<String> = markers.iter().map(|m| m.to_string()).collect();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        let mut next = 0;
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            if next < wanted.len() && line.contains(&wanted[next]) {
                next += 1;
                if next == wanted.len() {
                    let _ = tx.send(());
                }
            }
        }
        all
    });
    if rx.recv_timeout(Duration::from_secs(600)).is_err() {
        let _ = child.kill();
        let log = reader.join().unwrap_or_default();
        panic!("{markers:?} never appeared; the log:\n{log}");
    }
    (child, reader)
}

fn kill(pid: i32, signal: i32) {
    // SAFETY: signalling a process (or group) this test started.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill({pid}, {signal})");
}

/// Waits for `child` and the rest of its log; asserts exit code 1 and that the log says `msg`.
fn failed_with(child: Child, reader: std::thread::JoinHandle<String>, msg: &str) -> String {
    let o = child.wait_with_output().unwrap();
    let log = reader.join().unwrap();
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(log.contains(msg), "expected {msg:?} in:\n{log}");
    log
}

#[test]
fn the_switch_killed_mid_command_is_named() {
    let s = Scratch::new("switch");
    let (child, reader) = spawn_until(s.run_command(&[], &[], &["sleep", "600"]), &["ssh ready"]);
    kill(s.pid_of("vde_switch").expect("the run's vde_switch"), libc::SIGKILL);
    failed_with(
        child,
        reader,
        "nix-winvm-builder: error in 'run': the VDE switch between the guest and the controller ended (signal 9) during the session: the pair was cut off",
    );
    s.assert_nothing_left(None, None);
}

#[test]
fn the_controller_killed_mid_command_is_named() {
    let s = Scratch::new("controller");
    let (child, reader) = spawn_until(s.run_command(&[], &[], &["sleep", "600"]), &["ssh ready"]);
    kill(s.pid_of("controller-qmp.sock").expect("the controller's QEMU"), libc::SIGKILL);
    failed_with(
        child,
        reader,
        "nix-winvm-builder: error in 'run': the controller VM ended with signal 9 before the command finished",
    );
    s.assert_nothing_left(None, None);
}

#[test]
fn smbd_lost_in_the_controller_is_named() {
    let s = Scratch::new("smbd");
    let fault = [("NIX_WINVM_TEST_FAULT", "kill-smbd-after=3")];
    // The command loops for ever: only smbd's end, 3 s into it, stops it. The clock starts
    // where the command does, not at the boot, whose length a busy machine varies.
    let cmd = s.run_command(&fault, &[], &["sh", "-c", "while :; do ls /nix/store >/dev/null; sleep 1; done"]);
    let (child, reader) = spawn_until(cmd, &["ssh ready"]);
    let start = Instant::now();
    failed_with(
        child,
        reader,
        "nix-winvm-builder: error in 'run': the controller could not run the command: smbd in the controller ended (killed by signal 9) during the command: the guest lost the store and exchange shares, so the command was stopped",
    );
    assert!(start.elapsed() < Duration::from_secs(120), "took {:?} after the command began", start.elapsed());
    s.assert_nothing_left(None, None);
}

#[test]
fn a_guest_that_never_answers_ssh_is_named_with_its_console() {
    let s = Scratch::new("nossh");
    // The time-out must strike while the test waits for SSH, after both VMs are up: under
    // load the controller alone has taken 21 s to be ready, so 60 s leaves a wide margin.
    let o = s.run_command(&[("NIX_WINVM_TEST_FAULT", "no-sshd")], &["--timeout", "60"], &["true"]).output().unwrap();
    let log = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(
        log.contains(
            "nix-winvm-builder: error in 'run': the build exceeded its timeout of 60 s while waiting for the guest's SSH server, and was stopped"
        ),
        "{log}"
    );
    assert!(log.contains("--- last lines of the guest's serial log ---"), "{log}");
    assert!(log.contains("winvm-standin: no sshd (test fault)"), "{log}");
    s.assert_nothing_left(None, None);
}

/// The build folder on a file system too small for what the build writes: the guest's disk
/// overlay and the outputs' archive both live there.
#[test]
fn a_full_build_folder_is_named_as_enospc() {
    let root = nix_winvm::testing::test_requires("root (to mount a small tmpfs)", unsafe { libc::geteuid() } == 0);
    if !root {
        return;
    }
    let s = Scratch::new("enospc");
    let image = built(&sandboxed_nix_build().args(["--no-out-link", "-E", IMAGE]).output().unwrap());
    assert!(image.is_dir());
    let tmp = s.tmp();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=24m", "winvm-fault-tmpfs"]).arg(&tmp).status();
    assert!(mounted.unwrap().success());
    let o = sandboxed_nix_build()
        .env("TMPDIR", &tmp)
        .args(["--no-out-link", "-E", &build_expr("enospc", "dd if=/dev/zero of=$out bs=1M count=64")])
        .output()
        .unwrap();
    // TMPDIR is the small file system itself: what is left there is seen before it goes.
    let left: Vec<PathBuf> = std::fs::read_dir(&tmp).unwrap().flatten().map(|e| e.path()).collect();
    let unmounted = Command::new("umount").arg(&tmp).status();
    let log = stderr(&o);
    assert!(unmounted.unwrap().success());
    assert_eq!(left, Vec::<PathBuf>::new(), "files left in TMPDIR (the tmpfs):\n{log}");
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(
        log.contains(
            "nix-winvm-builder: error in the build stage: no space left on device (ENOSPC): the file system of /build"
        ),
        "{log}"
    );
    s.assert_nothing_running(Some("winvm-fault-enospc"), None);
}

fn built(o: &Output) -> PathBuf {
    assert!(o.status.success(), "nix-build failed:\n{}", stderr(o));
    PathBuf::from(String::from_utf8_lossy(&o.stdout).lines().next().expect("an output path"))
}

fn build_expr(name: &str, script: &str) -> String {
    let token = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!(
        r#"builtins.windowsDerivation {{ name = "winvm-fault-{name}"; image = {IMAGE}; token = "{token}"; script = ''{script}''; }}"#
    )
}

/// The build stage by hand against copies of a real image with one part damaged: each is
/// refused before a VM starts, or named when QEMU refuses it.
#[test]
fn damaged_images_are_refused_with_the_reason() {
    let s = Scratch::new("damaged");
    let image = built(&sandboxed_nix_build().args(["--no-out-link", "-E", IMAGE]).output().unwrap());
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(image.join("meta.json")).unwrap()).unwrap();
    let spec = serde_json::json!({ "image": meta["spec"], "timeoutSecs": 60, "runOriginalBuilder": false });
    let copy_of = |name: &str| -> PathBuf {
        let copy = s.dir.path().join(name);
        std::fs::create_dir_all(&copy).unwrap();
        for entry in std::fs::read_dir(&image).unwrap().flatten() {
            let to = copy.join(entry.file_name());
            // The report (report/, nix-support/) is not what a build revives.
            if entry.file_type().unwrap().is_dir() {
                continue;
            }
            if entry.file_type().unwrap().is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), to).unwrap();
            } else {
                std::fs::copy(entry.path(), &to).unwrap();
                std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
            }
        }
        copy
    };
    let build = |copy: &Path| -> Output {
        Command::new(builder())
            .arg("build")
            .env("image", copy)
            .env("winvmBuildSpec", spec.to_string())
            .env("script", "echo never")
            .env("out", s.dir.path().join("out"))
            .env("TMPDIR", s.tmp())
            .output()
            .unwrap()
    };
    // A state file of the right length, all of it noise.
    let noise = copy_of("noise");
    let len = std::fs::metadata(noise.join("state")).unwrap().len() as usize;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(noise.join("state"), bytes).unwrap();
    // The disk overlay cut short.
    let cut = copy_of("cut");
    let disk = cut.join("disk.qcow2");
    let disk_len = std::fs::metadata(&disk).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(disk_len / 3).unwrap();
    // The key gone.
    let keyless = copy_of("keyless");
    std::fs::remove_file(keyless.join("key")).unwrap();
    // The memory file cut short: its end marker gone.
    let forgetful = copy_of("forgetful");
    let memory = forgetful.join("memory");
    let memory_len = std::fs::metadata(&memory).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&memory).unwrap().set_len(memory_len - 10).unwrap();
    let cases: [(&Path, String); 4] = [
        (
            &forgetful,
            format!(
                "nix-winvm-builder: error in the build stage: the image {} has a damaged memory file: state file {} is truncated",
                forgetful.display(),
                memory.display()
            ),
        ),
        (
            &noise,
            format!(
                "nix-winvm-builder: error in the build stage: the image {} has a damaged state file: {} is not a nix-winvm state file (wrong magic number); build the image again (nix-store --repair-path {})",
                noise.display(),
                noise.join("state").display(),
                noise.display()
            ),
        ),
        (&cut, format!("nix-winvm-builder: error in the build stage: the image's disk {} is damaged", disk.display())),
        (
            &keyless,
            format!(
                "nix-winvm-builder: error in the build stage: the image {} has no key: {}",
                keyless.display(),
                keyless.join("key").display()
            ),
        ),
    ];
    for (copy, msg) in cases {
        let start = Instant::now();
        let o = build(copy);
        let log = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{log}");
        assert!(log.contains(&msg), "expected {msg:?} in:\n{log}");
        assert!(!log.contains("guest up"), "a VM was started:\n{log}");
        // Refused before any VM: far quicker than a boot, even on a busy machine.
        assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
        // Without -K the refused stage removes its work folder: TMPDIR is empty after each.
        s.assert_tmpdir_empty();
    }
    // A whole state file, of the image's header, whose stream is of another VM (one more
    // device), as a QEMU upgrade that changes a device leaves one: QEMU refuses it, and the
    // error says to rebuild the image, with the command.
    let other = copy_of("other");
    let bytes = std::fs::read(image.join("state")).unwrap();
    let len = u32::from_le_bytes(bytes[20..24].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[24..24 + len]).unwrap();
    let stream = s.dir.path().join("other-stream");
    let memory = header["memoryMib"].to_string();
    // Saved as images are: its RAM in a shared file, left out of the stream.
    let ram = s.dir.path().join("other-ram");
    let mut saver = Command::new("qemu-system-x86_64")
        .args(["-machine", &format!("{},accel=tcg,memory-backend=guest-ram", meta["machine"].as_str().unwrap())])
        .args([
            "-object",
            &format!("memory-backend-file,id=guest-ram,size={memory}M,mem-path={},share=on", ram.display()),
        ])
        .args(["-m", &memory, "-nodefaults", "-display", "none", "-S", "-device", "virtio-rng-pci"])
        .args(["-monitor", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let migrate =
        format!("migrate_set_capability x-ignore-shared on\nmigrate \"exec:cat > {}\"\nquit\n", stream.display());
    std::io::Write::write_all(&mut saver.stdin.take().unwrap(), migrate.as_bytes()).unwrap();
    assert!(saver.wait().unwrap().success());
    std::fs::remove_file(other.join("state")).unwrap();
    let o = Command::new(builder())
        .arg("state-write")
        .arg("--out")
        .arg(other.join("state"))
        .args(["--memory", &memory, "--qemu-version", header["qemuVersion"].as_str().unwrap()])
        .args(["--guest", header["guest"].as_str().unwrap(), "--machine", header["machine"].as_str().unwrap()])
        .args(["--ram-outside", "yes"])
        .stdin(std::fs::File::open(&stream).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = build(&other);
    let log = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{log}");
    let msg = format!(
        "nix-winvm-builder: error in the build stage: the guest's saved state {} does not load into this QEMU: Unknown savevm section or instance",
        other.join("state").display()
    );
    assert!(log.contains(&msg), "expected {msg:?} in:\n{log}");
    assert!(log.contains(&format!("rebuild the image: nix-store --delete {}", other.display())), "{log}");
    s.assert_nothing_running(None, None);
}

/// `nix-build` interrupted (SIGINT to its process group, as Ctrl-C sends it) in the middle of
/// a stage: it says so and exits 1 (Nix 2.8's words: these tests run on 2.8 only), and nothing
/// of the stage is left. Each image stage gets an image of its own (a memory size no other test
/// uses), so that the stage really runs.
fn interrupted(stage: &str, expr: &str, markers: &[&str], marker_env: &str) {
    let s = Scratch::new(&format!("sigint-{stage}"));
    let mut cmd = sandboxed_nix_build();
    cmd.env("TMPDIR", s.tmp()).args(["--no-out-link", "-E", expr]);
    let (child, reader) = spawn_until(cmd, markers);
    let sandbox = sandbox_of(marker_env);
    kill(-(child.id() as i32), libc::SIGINT);
    let start = Instant::now();
    let o = child.wait_with_output().unwrap();
    let log = reader.join().unwrap();
    assert_eq!(o.status.code(), Some(1), "{log}");
    // Nix's own last word, not a failure of the build (that would be "builder for ... failed").
    assert_eq!(log.lines().rev().find(|l| !l.trim().is_empty()), Some("error: interrupted by the user"), "{log}");
    assert!(!log.contains("failed with exit code"), "{log}");
    // Nix kills the sandbox outright; the clock starts at the signal.
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?} to stop:\n{log}", start.elapsed());
    s.assert_nothing_left(Some(marker_env), Some(&sandbox));
}

#[test]
fn nix_build_interrupted_during_the_install() {
    let image = r#"builtins.windowsImage { guest = "standin"; accel = "tcg"; memory = 264; }"#;
    let expr = format!("({image}).installed");
    interrupted("install", &expr, &["stage install", "installer VM started"], "\"memoryMib\":264");
}

#[test]
fn nix_build_interrupted_during_the_suspend() {
    let image = r#"builtins.windowsImage { guest = "standin"; accel = "tcg"; memory = 268; }"#;
    interrupted("suspend", image, &["stage suspend", "guest up"], "\"memoryMib\":268");
}

#[test]
fn nix_build_interrupted_during_the_build() {
    let expr = build_expr("sigint-build", "sleep 600");
    interrupted("build", &expr, &["ssh ready"], "winvm-fault-sigint-build");
}

/// `nix-build` killed with SIGKILL (as the OOM killer does) in the middle of a build: no
/// signal reaches the builder, but the build log's reader is gone, and within a few seconds
/// the builder has stopped the switch and both VMs and ended. (The build folder stays: Nix,
/// killed, never removes it.)
#[test]
fn nix_build_killed_during_the_build_leaves_nothing_running() {
    let s = Scratch::new("sigkill-build");
    let marker = "winvm-fault-sigkill-build";
    let expr = build_expr("sigkill-build", "sleep 600");
    let mut cmd = sandboxed_nix_build();
    cmd.env("TMPDIR", s.tmp()).args(["--no-out-link", "-E", &expr]);
    let (mut child, reader) = spawn_until(cmd, &["ssh ready"]);
    let running = leftovers(marker, Some(marker));
    assert!(running.iter().any(|p| p.contains("qemu-system")), "no VM of the build is running: {running:?}");
    kill(child.id() as i32, libc::SIGKILL);
    let killed = Instant::now();
    child.wait().unwrap();
    let log = reader.join().unwrap();
    let mut left = leftovers(marker, Some(marker));
    while !left.is_empty() && killed.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        left = leftovers(marker, Some(marker));
    }
    assert_eq!(
        left,
        Vec::<String>::new(),
        "{:?} after nix-build was killed, still running; its log:\n{log}",
        killed.elapsed()
    );
}
