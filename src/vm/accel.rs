//! KVM where the CPU really has it; TCG otherwise, said once in the log.

use crate::spec::Accel;
use std::fmt;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoKvm {
    pub reason: String,
}

impl fmt::Display for NoKvm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "accel = \"kvm\" was requested but KVM is not usable here: {}. Use accel = \"tcg\" (software emulation, much slower) or build on a machine with hardware virtualisation",
            self.reason
        )
    }
}

impl std::error::Error for NoKvm {}

/// Why KVM cannot be used, or None when it can. A paravirtual /dev/kvm (no vmx/svm flag in the
/// CPU) exists on some cloud machines and makes guests crawl, so the flag is required too.
pub fn kvm_unusable(cpuinfo: &str, dev_kvm: &Path) -> Option<String> {
    let has_flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !has_flag {
        return Some("the CPU has no vmx/svm flag in /proc/cpuinfo".into());
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(dev_kvm) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Some(denied(dev_kvm, &e)),
        Err(e) => Some(format!("{} cannot be opened: {e}", dev_kvm.display())),
    }
}

/// A build user (multi-user Nix) reaches /dev/kvm only through its group or its mode.
fn denied(dev_kvm: &Path, e: &std::io::Error) -> String {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid().to_string()).unwrap_or_else(|_| "?".into());
    format!(
        "{} cannot be opened by uid {uid} ({e}): a build user needs read and write access to it, through the group that owns it (often kvm) or mode 0666, as NixOS sets it",
        dev_kvm.display()
    )
}

/// The accelerator to run with: `requested` if possible. A request for KVM that cannot be met
/// fails fast rather than crawling.
pub fn choose(requested: Accel) -> Result<Accel, NoKvm> {
    match requested {
        Accel::Tcg => Ok(Accel::Tcg),
        Accel::Kvm => {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            match kvm_unusable(&cpuinfo, Path::new("/dev/kvm")) {
                None => Ok(Accel::Kvm),
                Some(reason) => Err(NoKvm { reason }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_user_without_access_is_told_how_to_get_it() {
        let e = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let msg = denied(Path::new("/dev/kvm"), &e);
        assert!(msg.starts_with("/dev/kvm cannot be opened by uid "), "{msg}");
        assert!(msg.ends_with("through the group that owns it (often kvm) or mode 0666, as NixOS sets it"), "{msg}");
    }

    #[test]
    fn paravirtual_kvm_without_cpu_flag_is_refused() {
        let r = kvm_unusable("flags\t\t: fpu vme sse2 hypervisor\n", Path::new("/dev/null"));
        assert_eq!(r.unwrap(), "the CPU has no vmx/svm flag in /proc/cpuinfo");
        let r = kvm_unusable("flags\t\t: fpu vmx\n", Path::new("/nonexistent/kvm"));
        assert!(r.unwrap().starts_with("/nonexistent/kvm cannot be opened"));
        assert_eq!(kvm_unusable("flags : svm\n", Path::new("/dev/null")), None);
    }
}
