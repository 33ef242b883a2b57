//! A build on a Nix remote builder, for real: OpenSSH's sshd on a loopback port with a
//! throw-away key, declared with `--builders`, backed by a store of its own (a chroot store in a
//! temporary folder), and local builds forbidden (`--max-jobs 0`). The derivations' closure
//! (the builder, the tools closure, the kernel) is copied there, every stage is built there,
//! and the output comes back. Nothing on the remote side but Nix and sshd.
#![cfg(feature = "plugin")]

mod common;
use common::{builder, plugin, SANDBOX_CONFIG};
use nix_winvm::testing::wait::{wait_until_blocking, Deadline};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const SSHD: &str = "/usr/sbin/sshd";
const SSHD_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// sshd in the foreground, killed and reaped when dropped.
struct Sshd {
    child: Child,
    port: u16,
    client_key: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "nix-winvm-remote-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("run ssh-keygen");
    assert!(status.success(), "ssh-keygen failed");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

/// Starts sshd for root on 127.0.0.1 with keys of its own in `dir`. Every session runs through
/// a wrapper that gives the remote Nix the same settings as the tests' local one.
fn start_sshd(dir: &Path) -> Sshd {
    assert!(nix_winvm::testing::test_requires("sshd (openssh-server)", Path::new(SSHD).is_file()), "sshd missing");
    keygen(&dir.join("host"));
    keygen(&dir.join("client"));
    std::fs::copy(dir.join("client.pub"), dir.join("authorized_keys")).unwrap();
    let wrapper = dir.join("session");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nNIX_CONFIG='{}'\nexport NIX_CONFIG\nexec /bin/sh -c \"$SSH_ORIGINAL_COMMAND\"\n",
            SANDBOX_CONFIG.trim()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress 127.0.0.1:{port}\nHostKey {host}\nAuthorizedKeysFile {keys}\nPidFile {pid}\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nStrictModes no\nForceCommand {wrapper}\n",
            host = dir.join("host").display(),
            keys = dir.join("authorized_keys").display(),
            pid = dir.join("sshd.pid").display(),
            wrapper = wrapper.display(),
        ),
    )
    .unwrap();
    // sshd's privilege separation needs this folder; it is the one thing outside `dir`.
    std::fs::create_dir_all("/run/sshd").unwrap();
    let child = Command::new(SSHD)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
        .spawn()
        .expect("start sshd");
    let sshd = Sshd { child, port, client_key: dir.join("client") };
    // Ready when it sends its banner.
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline =
        Deadline::new(format!("sshd's banner on port {port}"), SSHD_READY_TIMEOUT).every(Duration::from_millis(50));
    let banner = wait_until_blocking(&deadline, || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return Ok::<_, ()>(None) };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut banner = [0u8; 4];
        Ok((s.read_exact(&mut banner).is_ok() && &banner == b"SSH-").then_some(()))
    });
    if let Err(e) = banner {
        panic!("{e:?}: {}", std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default());
    }
    sshd
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A whole remote build on TCG takes about a minute here; a hang must still end the test.
const BUILD_DEADLINE: Duration = Duration::from_secs(900);

/// `nix-build` that may build only on `builders`, stopped (and failed) at BUILD_DEADLINE.
fn remote_build(sshd: &Sshd, builders: &str, expr: &str, out_link: &Path) -> Output {
    let mut child = Command::new("nix-build")
        .env("NIX_CONFIG", format!("{SANDBOX_CONFIG}\nbuilders-use-substitutes = false\n"))
        .env(
            "NIX_SSHOPTS",
            format!("-p {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR", sshd.port),
        )
        .env("NIX_WINVM_BUILDER", builder())
        .env_remove("NIX_REMOTE")
        .arg("--plugin-files")
        .arg(plugin())
        .args(["--max-jobs", "0", "--builders", builders, "-o"])
        .arg(out_link)
        .args(["-E", expr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nix-build");
    let deadline = Deadline::new("nix-build to end", BUILD_DEADLINE).every(Duration::from_millis(200));
    while child.try_wait().expect("wait for nix-build").is_none() {
        if let Err(e) = deadline.check() {
            let _ = child.kill();
            let o = child.wait_with_output().expect("reap nix-build");
            panic!("{e}:\n{}", stderr(&o));
        }
        deadline.pause_blocking();
    }
    child.wait_with_output().expect("read nix-build's output")
}

/// The remote: sshd in `tmp`/ssh, and a chroot store of its own in `tmp`/remote (a store the
/// local one shares nothing with, as on another machine). Returns the builder URI.
fn remote(tmp: &Path) -> (Sshd, String, PathBuf) {
    let ssh = tmp.join("ssh");
    std::fs::create_dir(&ssh).unwrap();
    let sshd = start_sshd(&ssh);
    let root = tmp.join("remote");
    std::fs::create_dir(&root).unwrap();
    let store = format!("local?root={}", root.display());
    let encoded: String = store
        .chars()
        .map(|c| match c {
            '?' => "%3F".to_owned(),
            '=' => "%3D".to_owned(),
            '/' => "%2F".to_owned(),
            c => c.to_string(),
        })
        .collect();
    (sshd, format!("ssh://root@127.0.0.1?remote-store={encoded}"), root)
}

fn token() -> String {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos().to_string()
}

#[test]
fn a_standin_build_runs_on_a_remote_builder_with_a_store_of_its_own() {
    let tmp = tempfile::Builder::new().prefix("nix-winvm-remote").tempdir().unwrap();
    let (sshd, uri, remote_root) = remote(tmp.path());
    let builders = format!("{uri} x86_64-linux {} 1 1 benchmark", sshd.client_key.display());
    // A new image on every run (its timeout is unique), so that every stage builds there.
    let t = token();
    let timeout = 3600 + t.parse::<u128>().unwrap() % 100_000;
    let expr = format!(
        r#"builtins.windowsDerivation {{ name = "remote"; image = builtins.windowsImage {{ guest = "standin"; accel = "tcg"; timeout = {timeout}; }}; token = "{t}"; script = ''uname -r > $out''; }}"#
    );
    let o = remote_build(&sshd, &builders, &expr, &tmp.path().join("result"));
    let err = stderr(&o);
    assert!(o.status.success(), "remote build failed:\n{err}");
    let out = PathBuf::from(String::from_utf8_lossy(&o.stdout).lines().next().expect("an output path"));
    let kernel = std::fs::read_to_string("/var/cache/nix-winvm/kernel/version").expect("scripts/setup's kernel");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), format!("{}\n", kernel.trim()));
    for stage in ["winvm-standin-media", "winvm-standin-installed", "winvm-standin-image", "remote"] {
        assert!(err.contains(&format!("-{stage}.drv' on '{uri}'")), "{stage} was not built on the remote:\n{err}");
    }
    // The output was made in the remote's store and copied back.
    let remote_out = remote_root.join(out.strip_prefix("/").unwrap());
    assert_eq!(std::fs::read(&remote_out).unwrap(), std::fs::read(&out).unwrap());
    // What the remote got: the builder and the tools closure, through the store.
    let remote_paths: Vec<String> = std::fs::read_dir(remote_root.join("nix/store"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for name in ["-nix-winvm-builder", "-winvm-tools", "-winvm-tools-lib"] {
        assert!(remote_paths.iter().any(|p| p.ends_with(name)), "no *{name} in the remote store: {remote_paths:?}");
    }
}

#[test]
fn a_kvm_image_is_not_sent_to_a_builder_without_the_kvm_feature() {
    let tmp = tempfile::Builder::new().prefix("nix-winvm-remote").tempdir().unwrap();
    let (sshd, uri, _remote_root) = remote(tmp.path());
    let builders = format!("{uri} x86_64-linux {} 1 1", sshd.client_key.display());
    let expr = format!(
        r#"builtins.windowsDerivation {{ name = "remote-kvm"; image = builtins.windowsImage {{ guest = "standin"; accel = "kvm"; timeout = 1234; }}; token = "{}"; script = ''true''; }}"#,
        token()
    );
    let o = remote_build(&sshd, &builders, &expr, &tmp.path().join("result"));
    let err = stderr(&o);
    assert!(!o.status.success(), "a kvm build ran without a kvm builder:\n{err}");
    // The installed stage, the first to run a VM, asks for kvm; nothing was started for it.
    assert!(err.contains("-winvm-standin-installed.drv\nrequired (system, features): (x86_64-linux, kvm)"), "{err}");
    assert!(!err.contains("-winvm-standin-installed.drv' on"), "{err}");
}

/// A pinned image is kept and copied, not made again: `nix copy` puts it alone into another
/// store (the remote's), and a build there revives it without any stage of the image.
#[test]
fn a_pinned_image_copied_into_another_store_serves_a_build_there() {
    let image_expr = r#"builtins.windowsImage { guest = "standin"; accel = "tcg"; pin = "{PIN}"; }"#;
    let (pinned, hash, _) = common::pin(image_expr);
    let tmp = tempfile::Builder::new().prefix("nix-winvm-remote").tempdir().unwrap();
    let (sshd, uri, remote_root) = remote(tmp.path());
    let started = std::time::Instant::now();
    let o = Command::new("nix")
        .args(["--extra-experimental-features", "nix-command", "copy", "--no-check-sigs", "--to"])
        .arg(format!("local?root={}", remote_root.display()))
        .arg(&pinned)
        .output()
        .unwrap();
    assert!(o.status.success(), "nix copy failed:\n{}", stderr(&o));
    let took = started.elapsed();
    let du = Command::new("du").arg("-sb").arg(&pinned).output().unwrap();
    let bytes: f64 = String::from_utf8_lossy(&du.stdout).split_whitespace().next().unwrap().parse().unwrap();
    eprintln!("nix copy of the pinned image ({:.1} MB) into a second store: {:.2} s", bytes / 1e6, took.as_secs_f64());
    let remote_names = || -> Vec<String> {
        std::fs::read_dir(remote_root.join("nix/store"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    // It came alone: nothing it was made from.
    let copied = remote_names();
    assert_eq!(copied.iter().filter(|n| !n.starts_with('.')).count(), 1, "{copied:?}");

    let builders = format!("{uri} x86_64-linux {} 1 1 benchmark", sshd.client_key.display());
    let t = token();
    let expr = format!(
        r#"builtins.windowsDerivation {{ name = "on-copied-pin"; image = {}; token = "{t}"; script = ''echo revived > $out''; }}"#,
        image_expr.replace("{PIN}", &hash)
    );
    let o = remote_build(&sshd, &builders, &expr, &tmp.path().join("result"));
    let err = stderr(&o);
    assert!(o.status.success(), "remote build failed:\n{err}");
    assert!(err.contains(&format!("-on-copied-pin.drv' on '{uri}'")), "{err}");
    let out = PathBuf::from(String::from_utf8_lossy(&o.stdout).lines().next().expect("an output path"));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "revived\n");
    for stage in ["-winvm-standin-media", "-winvm-standin-installed", "-winvm-standin-image"] {
        assert!(!remote_names().iter().any(|n| n.ends_with(stage)), "{stage} reached the remote store");
    }
}
