//! The pair's traffic, captured by the builder on its switch: a failed build kept with
//! `nix-build -K` leaves `network.pcap` in its work folder, and tcpdump reads the SSH
//! handshake between the controller (192.168.0.2) and the guest (192.168.0.1) from it.
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
    let pcap = kept_work_folder(&build_dir).join("network.pcap");
    assert!(pcap.is_file(), "{} missing", pcap.display());

    let lines = tcpdump(&["-nn"], &pcap);
    let to_guest = lines.lines().find(|l| l.contains(" IP 192.168.0.2.") && l.contains(" > 192.168.0.1.22: Flags [S]"));
    assert!(to_guest.is_some(), "no SYN from the controller to the guest's port 22:\n{lines}");
    let answer = lines.lines().find(|l| l.contains(" IP 192.168.0.1.22 > 192.168.0.2.") && l.contains("Flags [S.]"));
    assert!(answer.is_some(), "no SYN-ACK from the guest's port 22:\n{lines}");
    let ascii = tcpdump(&["-nn", "-A"], &pcap);
    assert!(ascii.contains("SSH-2.0-dropbear"), "the guest's SSH banner is not in the capture");
    assert!(ascii.contains("SSH-2.0-libssh2"), "the controller's SSH banner is not in the capture");

    remove_kept(&build_dir);
}
