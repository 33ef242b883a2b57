//! `run --accel kvm` on a machine where KVM is unusable fails at once and says exactly why.
//! The expected reason is worked out here on its own: the CPU's flags from /proc/cpuinfo, and
//! the device's answers from python3's ioctl.

mod common;
use common::builder;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// What the KVM device does for python3: "works", or the step that failed.
fn device_probe() -> String {
    let script = r#"
import os, fcntl, sys
try:
    fd = os.open('/dev/kvm', os.O_RDWR | os.O_CLOEXEC)
except OSError as e:
    print('open', e.errno); sys.exit()
try:
    v = fcntl.ioctl(fd, 0xAE00, 0)
    vm = fcntl.ioctl(fd, 0xAE01, 0)
    fcntl.ioctl(vm, 0xAE41, 0)
    print('works' if v == 12 else 'version')
except OSError as e:
    print('ioctl', e.errno)
"#;
    let o = Command::new("python3").arg("-c").arg(script).output().expect("run python3");
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

#[test]
fn run_with_kvm_says_exactly_why_kvm_is_unusable() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    // What is tested is the refusal on a CPU without vmx/svm; elsewhere it cannot be seen, and
    // with NIX_WINVM_REQUIRE_TOOLS=1 that fails the test rather than skipping it.
    if !nix_winvm::testing::test_requires(
        "a CPU without hardware virtualisation (no vmx/svm flag in /proc/cpuinfo)",
        !flag,
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let o = Command::new(builder())
        .env("TMPDIR", tmp.path())
        .args(["run", "--guest", "standin", "--accel", "kvm", "--", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    // Refused before anything starts: a boot takes far longer, a busy machine a little longer.
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    let prefix =
        "accel = \"kvm\" was requested but KVM is not usable here: the CPU has no vmx/svm flag in /proc/cpuinfo; ";
    let suffix =
        ". Use accel = \"tcg\" (software emulation, much slower) or build on a machine with hardware virtualisation";
    let note = match device_probe().as_str() {
        "works" => {
            let modules: Vec<&str> =
                ["kvm_intel", "kvm_amd", "kvm_pvm"].into_iter().filter(|m| Path::new("/sys/module").join(m).exists()).collect();
            let modules = if modules.is_empty() { String::new() } else { format!(" ({})", modules.join(", ")) };
            format!("/dev/kvm itself works (API version 12, KVM_CREATE_VM and KVM_CREATE_VCPU succeed), so it is a paravirtual KVM{modules}, on which unmodified guests crawl")
        }
        "open 2" => "/dev/kvm does not exist: the kernel has no KVM module loaded (load one: modprobe kvm_intel, or kvm_amd), or the Nix sandbox does not pass the device in (it does for derivations that require the 'kvm' system feature)".to_owned(),
        other => {
            // A device that fails another way: its own step is named after the CPU's reason.
            assert!(err.contains(prefix) && err.contains("/dev/kvm "), "python3 found '{other}':\n{err}");
            return;
        }
    };
    let expected = format!("{prefix}{note}{suffix}");
    assert!(err.contains(&expected), "expected:\n{expected}\nin:\n{err}");
    // Nothing was started: no work folder left behind.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}
