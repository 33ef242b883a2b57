//! The pair's traffic, captured by the builder on its switch into `network.pcap` in the work
//! folder: a kept build's shows that a revived pair opens no connection (its SSH logon and SMB
//! session were saved with it); a kept direct run's shows the SSH handshake between the
//! controller (192.168.0.2) and the guest (192.168.0.1).
#![cfg(feature = "plugin")]

mod common;
use common::{kept_build_dir, kept_work_folder, remove_kept, sandboxed_nix_build, STANDIN_TCG};
use std::path::Path;
use std::process::Command;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tcpdump(args: &[&str], pcap: &Path) -> String {
    let o = Command::new("tcpdump").args(args).arg("-r").arg(pcap).output().expect("run tcpdump");
    assert!(o.status.success(), "tcpdump {args:?} -r {} failed:\n{}", pcap.display(), stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn has_tcpdump() -> bool {
    nix_winvm::testing::test_requires("tcpdump", Command::new("tcpdump").arg("--version").output().is_ok())
}

/// A build revives a pair saved with its connections open: its capture holds SSH and SMB
/// traffic on those connections, and no new connection at all (no SYN): no SSH handshake, no
/// SMB negotiation or logon in the build.
#[test]
fn a_kept_build_reuses_the_saved_connections_as_network_pcap_shows() {
    if !has_tcpdump() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let token = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let expr = format!(
        r#"builtins.windowsDerivation {{ name = "captured"; image = {STANDIN_TCG}; token = "{token}"; script = ''ls /nix/store >/dev/null; echo fails on purpose; exit 7''; }}"#
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
    let pcap = kept_work_folder(&build_dir).join("network.pcap");
    assert!(pcap.is_file(), "{} missing", pcap.display());

    let lines = tcpdump(&["-nn"], &pcap);
    // No connection is made: no SYN answered (at the very end, smbd's exit makes the guest's
    // SMB client try to reconnect, which the stopping controller refuses), no SSH SYN at all.
    let made: Vec<&str> =
        lines.lines().filter(|l| l.contains("Flags [S.]") || (l.contains(".22: Flags [S]"))).collect();
    assert!(made.is_empty(), "a revived build opened new connections:\n{}", made.join("\n"));
    let ssh = lines.lines().filter(|l| l.contains(" IP 192.168.0.2.") && l.contains(" > 192.168.0.1.22: ")).count();
    assert!(ssh > 0, "no SSH traffic from the controller to the guest:\n{lines}");
    let smb = lines.lines().filter(|l| l.contains(" IP 192.168.0.1.") && l.contains(" > 192.168.0.2.445: ")).count();
    assert!(smb > 0, "no SMB traffic from the guest to the controller:\n{lines}");
    remove_kept(&build_dir);
}

/// A direct run boots both VMs: its kept capture holds the SSH handshake, both banners.
#[test]
fn a_kept_direct_run_has_the_ssh_handshake_in_network_pcap() {
    if !has_tcpdump() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(common::builder())
        .env("TMPDIR", tmp.path())
        .args(["run", "--accel", "tcg", "-K", "--", "true"])
        .output()
        .expect("run nix-winvm-builder run");
    let log = stderr(&o);
    assert!(o.status.success(), "{log}");
    let kept = log
        .lines()
        .find_map(|l| l.split("work directory kept: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| panic!("no kept work directory named:\n{log}"));
    let pcap = kept.join("network.pcap");
    let lines = tcpdump(&["-nn"], &pcap);
    let to_guest = lines.lines().find(|l| l.contains(" IP 192.168.0.2.") && l.contains(" > 192.168.0.1.22: Flags [S]"));
    assert!(to_guest.is_some(), "no SYN from the controller to the guest's port 22:\n{lines}");
    let answer = lines.lines().find(|l| l.contains(" IP 192.168.0.1.22 > 192.168.0.2.") && l.contains("Flags [S.]"));
    assert!(answer.is_some(), "no SYN-ACK from the guest's port 22:\n{lines}");
    let ascii = tcpdump(&["-nn", "-A"], &pcap);
    assert!(ascii.contains("SSH-2.0-dropbear"), "the guest's SSH banner is not in the capture");
    assert!(ascii.contains("SSH-2.0-libssh2"), "the controller's SSH banner is not in the capture");
    let _ = std::fs::remove_dir_all(&kept);
}
