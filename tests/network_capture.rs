//! The pair's traffic, captured by the builder on its switch: a failed build kept with
//! `nix-build -K` leaves `network.pcap` in its work folder, and tcpdump reads the SSH
//! handshake between the controller (192.168.0.2) and the guest (192.168.0.1) from it.
#![cfg(feature = "plugin")]

mod common;
use common::{sandboxed_nix_build, STANDIN_TCG};
use std::path::{Path, PathBuf};
use std::process::Command;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The folder Nix kept after a failed `-K` build, as its log names it.
fn kept_build_dir(log: &str) -> PathBuf {
    log.lines()
        .find_map(|l| l.split("keeping build directory ").nth(1))
        .map(|p| PathBuf::from(p.trim().trim_matches(|c| c == '\'' || c == '"')))
        .unwrap_or_else(|| panic!("no kept build folder named in:\n{log}"))
}

/// The session's work folder in the kept build folder: the sandbox's /build is the kept
/// folder itself (Nix 2.8) or its `build` child (later Nix).
fn work_folder(build_dir: &Path) -> PathBuf {
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

fn tcpdump(args: &[&str], pcap: &Path) -> String {
    let o = Command::new("tcpdump").args(args).arg("-r").arg(pcap).output().expect("run tcpdump");
    assert!(o.status.success(), "tcpdump {args:?} -r {} failed:\n{}", pcap.display(), stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_kept_build_has_the_ssh_handshake_in_network_pcap() {
    if !nix_winvm::tools::test_requires("tcpdump", Command::new("tcpdump").arg("--version").output().is_ok()) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let token = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let expr = format!(
        r#"builtins.windowsDerivation {{ name = "captured"; image = {STANDIN_TCG}; token = "{token}"; script = ''echo fails on purpose; exit 7''; }}"#
    );
    let o = sandboxed_nix_build()
        .env("TMPDIR", tmp.path())
        .args(["-K", "--no-out-link", "-E", &expr])
        .output()
        .expect("run nix-build");
    let log = stderr(&o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("command exited 7"), "{log}");
    assert!(log.contains("network captured in network.pcap (at most 64 MiB)"), "{log}");
    let build_dir = kept_build_dir(&log);
    let pcap = work_folder(&build_dir).join("network.pcap");
    assert!(pcap.is_file(), "{} missing", pcap.display());

    let lines = tcpdump(&["-nn"], &pcap);
    let to_guest = lines.lines().find(|l| l.contains(" IP 192.168.0.2.") && l.contains(" > 192.168.0.1.22: Flags [S]"));
    assert!(to_guest.is_some(), "no SYN from the controller to the guest's port 22:\n{lines}");
    let answer = lines.lines().find(|l| l.contains(" IP 192.168.0.1.22 > 192.168.0.2.") && l.contains("Flags [S.]"));
    assert!(answer.is_some(), "no SYN-ACK from the guest's port 22:\n{lines}");
    let ascii = tcpdump(&["-nn", "-A"], &pcap);
    assert!(ascii.contains("SSH-2.0-dropbear"), "the guest's SSH banner is not in the capture");
    assert!(ascii.contains("SSH-2.0-libssh2"), "the controller's SSH banner is not in the capture");

    let top = if build_dir.ends_with("build") { build_dir.parent().unwrap().to_path_buf() } else { build_dir };
    let _ = std::fs::remove_dir_all(top);
}
