//! Debugging a failed build: `run-vm` in the folder `nix-build -K` (or `run -K`) kept starts the
//! session again there, runs a command in the build's environment or opens a shell in the guest
//! on a real pty; `shell IMAGE` does the same for an image. Real nix, QEMU, switch, Samba, SSH.
#![cfg(feature = "plugin")]

mod common;
use common::{builder, kept_build_dir, kept_work_folder, remove_kept, sandboxed_nix_build};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const IMAGE: &str = r#"builtins.windowsImage { guest = "standin"; accel = "tcg"; }"#;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn token(name: &str) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{name}-{t}")
}

/// A build that fails with its folder kept: the kept folder and the stage's work folder in it.
fn failed_build_kept(tmp: &Path, name: &str, script: &str) -> (PathBuf, PathBuf) {
    let expr = format!(
        r#"builtins.windowsDerivation {{ name = "{name}"; image = {IMAGE}; token = "{}"; script = ''{script}''; }}"#,
        token(name)
    );
    let o = sandboxed_nix_build().env("TMPDIR", tmp).args(["-K", "--no-out-link", "-E", &expr]).output().unwrap();
    let log = stderr(&o);
    assert!(!o.status.success(), "{log}");
    let kept = kept_build_dir(&log);
    let work = kept_work_folder(&kept);
    (kept, work)
}

/// The build's `$out`, as its saved environment has it.
fn build_out(work: &Path) -> String {
    let env = std::fs::read_to_string(work.join("xchg/saved-env")).unwrap();
    env.lines()
        .find_map(|l| l.strip_prefix("export out="))
        .map(|v| v.trim_matches('\'').to_owned())
        .unwrap_or_else(|| panic!("no out in saved-env:\n{env}"))
}

/// Processes whose command line names `needle` (a work folder): none may outlive a re-run.
fn processes_naming(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()))
        .filter(|e| e.file_name().to_string_lossy() != me)
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle).then(|| format!("{}: {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

fn assert_nothing_left(work: &Path) {
    let needle = work.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_naming(&needle);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left running:\n{}", left.join("\n"));
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn run_vm_from_the_kept_folder_runs_a_command_in_the_build_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let (kept, work) = failed_build_kept(tmp.path(), "rerun-cmd", "echo failing; exit 7");
    let out = build_out(&work);
    let o = Command::new("sh")
        .arg(work.join("run-vm"))
        .args(["--", "sh", "-c", "echo $out; cat $out; exit 5"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = stderr(&o);
    assert_eq!(o.status.code(), Some(5), "{log}");
    // The command's stdout alone on stdout; its stderr and the progress lines on stderr.
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("{out}\n"), "{log}");
    assert!(log.contains("guest revived"), "{log}");
    assert!(log.contains("No such file"), "{log}");
    assert_nothing_left(&work);
    // The store got nothing.
    assert!(!Path::new(&out).exists());

    // `run-vm --quiet -- CMD > copy` copies: a MiB of random bytes through stdout twice, byte
    // for byte, with the command's stderr written between them, and no progress line. (The
    // bytes are read from the guest's own disk, a copy of them left in the exchange folder.)
    let o = Command::new("sh")
        .arg(work.join("run-vm"))
        .args([
            "--quiet",
            "--",
            "sh",
            "-c",
            "dd if=/dev/urandom of=/tmp/random bs=65536 count=16 2>/dev/null; cp /tmp/random /tmp/xchg/random; \
             echo first >&2; cat /tmp/random; echo second >&2; cat /tmp/random",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "first\nsecond\n");
    let random = std::fs::read(work.join("rerun/xchg/random")).unwrap();
    assert_eq!(random.len(), 1 << 20);
    let expected = [&random[..], &random[..]].concat();
    assert!(o.stdout == expected, "stdout: {} bytes, not the {} written", o.stdout.len(), expected.len());
    assert_nothing_left(&work);

    // --display: the guest's screen on a VNC server on a unix socket in the re-run's folder.
    let child = Command::new("sh")
        .arg(work.join("run-vm"))
        .args(["--display", "--", "sh", "-c", "sleep 20"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sock = work.join("rerun/vnc.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut greeting = [0u8; 12];
    loop {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.read_exact(&mut greeting).unwrap();
            break;
        }
        assert!(Instant::now() < deadline, "no VNC server on {}", sock.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(greeting.starts_with(b"RFB 003."), "{greeting:?}");
    let o = child.wait_with_output().unwrap();
    let log = stderr(&o);
    assert!(o.status.success(), "{log}");
    assert!(log.contains(&format!("vncviewer {}", sock.display())), "{log}");
    assert_nothing_left(&work);
    remove_kept(&kept);
}

/// A terminal for the child: the pty's master end, read into a buffer by a thread.
struct Pty {
    master: std::fs::File,
    seen: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Pty {
    /// A pty of `cols` x `rows`; the slave end for the child.
    fn open(cols: u16, rows: u16) -> (Pty, OwnedFd) {
        let (mut master, mut slave) = (0, 0);
        let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: two out-parameters for the new descriptors, no name, no termios, a winsize.
        let r = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty just made both descriptors; each is owned once, here.
        let (master, slave) = unsafe { (std::fs::File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (mut from, into) = (master.try_clone().unwrap(), seen.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the child and everything it started have closed the slave.
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                into.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        (Pty { master, seen, reader: Some(reader) }, slave)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    fn type_in(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
    }

    /// Waits until what the terminal shows after `from` contains `what`; returns where it ends.
    fn expect(&self, from: usize, what: &str, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let text = self.text();
            if let Some(i) = text.get(from..).and_then(|t| t.find(what)) {
                return from + i + what.len();
            }
            assert!(Instant::now() < deadline, "no {what:?} within {within:?}; the terminal shows:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn run_vm_opens_a_shell_in_the_guest_on_a_real_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let (kept, work) = failed_build_kept(tmp.path(), "rerun-shell", "echo failing; exit 7");
    let out = build_out(&work);
    let (mut pty, slave) = Pty::open(100, 30);
    let started = Instant::now();
    let mut child = Command::new("sh")
        .arg(work.join("run-vm"))
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let prompt = "winvm:/tmp$ ";
    let mut at = pty.expect(0, prompt, Duration::from_secs(120));
    eprintln!("run-vm to the prompt: {:.2} s", started.elapsed().as_secs_f64());
    let t = pty.text();
    assert!(t.contains("/bin/sh -e /tmp/xchg/script"), "the script is not offered:\n{t}");
    // Output comes back; the build's environment is there; the pty has the terminal's size.
    pty.type_in(b"echo sum-$((6*7)) $out; stty size\r");
    at = pty.expect(at, &format!("sum-42 {out}"), Duration::from_secs(30));
    at = pty.expect(at, "30 100", Duration::from_secs(30));
    at = pty.expect(at, prompt, Duration::from_secs(30));
    // Ctrl-C reaches the guest's command: the sleep ends long before its 300 s. It is sent
    // once the sleep runs, as a job in the background sees in the guest's process list (its
    // word computed, so that the echo of the typed line does not match it).
    // Each typed line fits the terminal's 100 columns.
    pty.type_in(b"w() { until ps | grep -q '[s]leep 300'; do :; done; echo sleep-runs-$((40+2)); }\r");
    at = pty.expect(at, prompt, Duration::from_secs(30));
    pty.type_in(b"w & sleep 300; echo not-interrupted\r");
    at = pty.expect(at, "sleep-runs-42", Duration::from_secs(60));
    pty.type_in(b"\x03");
    at = pty.expect(at, prompt, Duration::from_secs(30));
    pty.type_in(b"echo after-$((1+1))\r");
    at = pty.expect(at, "after-2", Duration::from_secs(30));
    at = pty.expect(at, prompt, Duration::from_secs(30));
    // Its echo of the typed line aside, the words never came.
    assert!(!pty.text().contains("\nnot-interrupted"), "{}", pty.text());
    // The script can be run again, and writes its outputs on the guest's disk.
    pty.type_in(b"echo hi > $out && cat $out\r");
    at = pty.expect(at, "\nhi", Duration::from_secs(30));
    pty.expect(at, prompt, Duration::from_secs(30));
    pty.type_in(b"exit\r");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "run-vm still runs after exit:\n{}", pty.text());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}:\n{}", pty.text());
    assert_nothing_left(&work);
    assert!(!Path::new(&out).exists(), "the re-run wrote into the store");
    drop(pty.master);
    let _ = pty.reader.take().map(|r| r.join());
    remove_kept(&kept);
}

#[test]
fn run_vm_of_a_direct_run_kept_with_k_runs_again() {
    let o = Command::new(builder())
        .args(["run", "--accel", "tcg", "-K", "--", "sh", "-c", "exit 3"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{log}");
    let work = log
        .lines()
        .find_map(|l| l.split("work directory kept: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no kept folder named in:\n{log}"));
    // A cold controller runs the command on a channel of its own (no waiting login): the
    // streams stay apart there too, and 4 MiB on stderr, more than an SSH window, do not stall
    // the stdout that follows.
    let o = Command::new(work.join("run-vm"))
        .args(["--", "sh", "-c", "head -c 4194304 /dev/zero | tr '\\0' e >&2; uname -s; exit 4"])
        .output()
        .unwrap();
    let text = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{}", text.replace(&"e".repeat(64), ""));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "Linux\n");
    assert!(text.contains(&"e".repeat(4 << 20)), "the 4 MiB of stderr did not arrive whole");
    assert_nothing_left(&work);
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn shell_revives_an_image_without_a_build() {
    let tmp = tempfile::tempdir().unwrap();
    let o = sandboxed_nix_build().arg("-o").arg(tmp.path().join("image")).args(["-E", IMAGE]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let image = String::from_utf8_lossy(&o.stdout).lines().next().unwrap().to_owned();
    let o = Command::new(builder())
        // The guest's /nix/store takes writes on its own disk (an overlay, as a build makes its
        // outputs there); the share below it, the host's store, refuses them.
        .args([
            "shell",
            &image,
            "--",
            "sh",
            "-c",
            "uname -a; touch /nix/store/winvm-shell-probe && echo overlay-writable; \
             touch /var/winvm/srv/store/winvm-shell-probe 2>/dev/null || echo store-read-only",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = stderr(&o);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    assert!(said.starts_with("Linux "), "{said}");
    assert!(said.contains("\noverlay-writable\n"), "{said}");
    assert!(said.ends_with("\nstore-read-only\n"), "{said}");
    assert!(!Path::new("/nix/store/winvm-shell-probe").exists(), "a write reached the host's store");
    let work = text
        .lines()
        .find_map(|l| l.split("work folder ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no work folder named in:\n{text}"));
    assert_nothing_left(Path::new(work));
    assert!(!Path::new(work).exists(), "the scratch folder is left");
}

#[test]
fn run_vm_says_what_is_missing_in_a_folder_without_a_description() {
    let tmp = tempfile::tempdir().unwrap();
    // --quiet silences progress, not errors.
    let o = Command::new(builder()).args(["rerun"]).arg(tmp.path()).arg("--quiet").output().unwrap();
    let text = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("only a build's or a direct run's work folder can be started again"), "{text}");
}

/// A new build called `name` on the standin image, running `script`.
fn build_on_the_image(name: &str, script: &str) -> String {
    format!(
        r#"builtins.windowsDerivation {{ name = "{name}"; image = {IMAGE}; token = "{}"; script = "{script}"; }}"#,
        token(name)
    )
}

/// While a build runs past a minute, its log names the guest's newest screenshot, at the path
/// the host sees: opened here while the build still runs, it is a PNG.
#[test]
fn a_long_builds_log_names_its_newest_screenshot_which_root_opens_while_it_runs() {
    let expr = build_on_the_image("long", "sleep 85; echo done > $out");
    let mut child = sandboxed_nix_build()
        .args(["--no-out-link", "-E", &expr])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let mut log = String::new();
    let mut opened = None;
    for line in lines {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        let Some(host) = line.split_once("(outside the sandbox: ").and_then(|(_, r)| r.split_once("), ")) else {
            continue;
        };
        if opened.is_none() {
            let png = std::fs::read(host.0).unwrap_or_else(|e| panic!("{}: {e}\n{log}", host.0));
            let still_running = child.try_wait().unwrap().is_none();
            opened = Some((png.starts_with(b"\x89PNG"), still_running, line.clone()));
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{log}");
    let (is_png, still_running, line) = opened.unwrap_or_else(|| panic!("no screenshot named in:\n{log}"));
    assert!(is_png && still_running, "{line}: a PNG {is_png}, opened while the build ran {still_running}");
    assert!(line.contains("the guest's screen after 1 min"), "{line}");
    assert!(line.contains("/build/"), "the path in the sandbox comes first: {line}");
}

/// `nix build`'s status line (on a terminal: `script` gives it one) shows the session's phase.
#[test]
fn nix_builds_status_line_shows_the_builds_phase() {
    let expr = build_on_the_image("phases", "sleep 8; echo ok > $out");
    let tmp = tempfile::tempdir().unwrap();
    let typescript = tmp.path().join("typescript");
    let plugin = common::plugin();
    let command = format!(
        "nix --plugin-files '{}' build --no-link --impure --expr '{}'",
        plugin.display(),
        expr.replace('\'', "'\\''")
    );
    let o = Command::new("script")
        .args(["-q", "-e", "-c", &command])
        .arg(&typescript)
        .env("NIX_CONFIG", common::SANDBOX_CONFIG)
        .env("NIX_WINVM_BUILDER", builder())
        .env_remove("NIX_REMOTE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).into_owned();
    assert!(o.status.success(), "{}\n{shown}", stderr(&o));
    // The bar is drawn a few times a second: a phase of 8 s is on it, shorter ones may not be.
    let phase = "(running the command)";
    assert!(shown.contains(&format!("phases\x1b[0m {phase}")), "no {phase} on the status line:\n{shown}");
}
