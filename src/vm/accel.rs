//! KVM where it really works; TCG otherwise, said once in the log. Whether it works is probed,
//! not guessed: `/dev/kvm` is opened and asked for its API version, a VM and a vCPU are created
//! and closed again (src/vm/sys/kvm.rs), and the CPU must show `vmx` or `svm`. Each step that
//! fails has its own reason.

use super::sys::kvm;
use crate::spec::Accel;
use std::path::{Path, PathBuf};

pub const DEV_KVM: &str = "/dev/kvm";
pub const CPUINFO: &str = "/proc/cpuinfo";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "accel = \"kvm\" was requested but KVM is not usable here: {reason}{}. Use accel = \"tcg\" (software emulation, much slower) or build on a machine with hardware virtualisation",
    note.as_ref().map(|note| format!("; {note}")).unwrap_or_default()
)]
pub struct NoKvm {
    /// Why, in a few words (the fallback line of `run --accel auto` shows it).
    pub reason: String,
    /// What else the probe found, when it helps to know (a device that works on a CPU without
    /// hardware virtualisation).
    pub note: Option<String>,
}

/// The first step of the device probe that failed.
#[derive(Debug, thiserror::Error)]
pub enum KvmDeviceError {
    /// ENOENT: no KVM module loaded, or a sandbox without the device.
    #[error(
        "{} does not exist: the kernel has no KVM module loaded (load one: modprobe kvm_intel, or kvm_amd), or the Nix sandbox does not pass the device in (it does for derivations that require the 'kvm' system feature)",
        path.display()
    )]
    Missing { path: PathBuf },
    /// EACCES: the device's owner, group and mode, and who asked.
    #[error("{}", denied(path, *uid, owner))]
    Denied { path: PathBuf, uid: u32, owner: Owner },
    #[error("{} cannot be opened: {source}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    /// KVM_GET_API_VERSION refused: not a KVM device.
    #[error("{} is not a KVM device: KVM_GET_API_VERSION failed ({source})", path.display())]
    NotKvm { path: PathBuf, source: std::io::Error },
    #[error(
        "{} speaks KVM API version {version}, not {}: this kernel's KVM is not the one QEMU uses",
        path.display(),
        kvm::API_VERSION
    )]
    ApiVersion { path: PathBuf, version: i32 },
    #[error(
        "{} opens, but the kernel refuses to create a VM (KVM_CREATE_VM: {source}); hardware virtualisation may be disabled in the firmware, or taken by another hypervisor",
        path.display()
    )]
    CreateVm { path: PathBuf, source: std::io::Error },
    #[error("{} creates a VM, but not a virtual CPU in it (KVM_CREATE_VCPU: {source})", path.display())]
    CreateVcpu { path: PathBuf, source: std::io::Error },
}

/// Who may open a device file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    /// The group's name, where /etc/group knows it (inside the Nix sandbox it may not).
    pub group: Option<String>,
    pub mode: u32,
}

/// [`KvmDeviceError::Denied`]: who owns the device, and how `uid` gets access.
fn denied(path: &Path, uid: u32, owner: &Owner) -> String {
    let group = owner.group.as_ref().map(|g| format!("'{g}'")).unwrap_or_else(|| format!("gid {}", owner.gid));
    let access = if owner.gid == 0 {
        format!("its group is root's: give it a group of its own (usually 'kvm') with mode 0660 and make uid {uid} a member, or mode 0666 as NixOS does")
    } else {
        format!("join the group {group} (for Nix's build users: add them to it), or give the device mode 0666 as NixOS does")
    };
    format!(
        "{} cannot be opened for reading and writing by uid {uid}: permission denied (owner uid {}, group {group}, mode {:04o}); {access}",
        path.display(),
        owner.uid,
        owner.mode & 0o7777,
    )
}

/// Opens `dev_kvm` and makes the calls QEMU makes first: the API version, a VM, a vCPU. All
/// is closed again before this returns.
pub fn probe_device(dev_kvm: &Path) -> Result<(), KvmDeviceError> {
    let path = dev_kvm.to_path_buf();
    let file =
        std::fs::OpenOptions::new().read(true).write(true).open(dev_kvm).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => KvmDeviceError::Missing { path: path.clone() },
            std::io::ErrorKind::PermissionDenied => {
                KvmDeviceError::Denied { path: path.clone(), uid: current_uid(), owner: owner(dev_kvm) }
            }
            _ => KvmDeviceError::Open { path: path.clone(), source },
        })?;
    let version = kvm::api_version(&file).map_err(|source| KvmDeviceError::NotKvm { path: path.clone(), source })?;
    check_api_version(dev_kvm, version)?;
    let vm = kvm::create_vm(&file).map_err(|source| KvmDeviceError::CreateVm { path: path.clone(), source })?;
    let vcpu = kvm::create_vcpu(&vm, 0).map_err(|source| KvmDeviceError::CreateVcpu { path, source })?;
    // The vCPU holds a reference to its VM: closing both releases them.
    drop((vcpu, vm, file));
    Ok(())
}

pub fn check_api_version(dev_kvm: &Path, version: i32) -> Result<(), KvmDeviceError> {
    if version == kvm::API_VERSION {
        Ok(())
    } else {
        Err(KvmDeviceError::ApiVersion { path: dev_kvm.to_path_buf(), version })
    }
}

/// Whether /proc/cpuinfo's `flags` show hardware virtualisation: Intel's `vmx` or AMD's `svm`.
pub fn cpu_has_virtualisation(cpuinfo: &str) -> bool {
    cpuinfo.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Why KVM cannot be used, from what the CPU shows and what the device did; `None` when it
/// can. A /dev/kvm without vmx/svm in the CPU exists on some cloud machines (a paravirtual
/// KVM, e.g. the kvm_pvm module): it creates VMs, but unmodified guests crawl there, so the
/// flag is required too.
pub fn verdict(
    cpu_flag: bool,
    device: Result<(), KvmDeviceError>,
    dev_kvm: &Path,
    modules: &[String],
) -> Option<NoKvm> {
    const NO_FLAG: &str = "the CPU has no vmx/svm flag in /proc/cpuinfo";
    match (cpu_flag, device) {
        (true, Ok(())) => None,
        (true, Err(e)) => Some(NoKvm { reason: e.to_string(), note: None }),
        (false, Ok(())) => {
            let modules = if modules.is_empty() { String::new() } else { format!(" ({})", modules.join(", ")) };
            Some(NoKvm {
                reason: NO_FLAG.into(),
                note: Some(format!(
                    "{} itself works (API version {}, KVM_CREATE_VM and KVM_CREATE_VCPU succeed), so it is a paravirtual KVM{modules}, on which unmodified guests crawl",
                    dev_kvm.display(),
                    kvm::API_VERSION
                )),
            })
        }
        (false, Err(e)) => Some(NoKvm { reason: NO_FLAG.into(), note: Some(e.to_string()) }),
    }
}

/// The machine's verdict: /proc/cpuinfo, /dev/kvm, and the KVM modules loaded.
pub fn kvm_unusable() -> Option<NoKvm> {
    let cpuinfo = std::fs::read_to_string(CPUINFO).unwrap_or_default();
    let dev_kvm = Path::new(DEV_KVM);
    verdict(cpu_has_virtualisation(&cpuinfo), probe_device(dev_kvm), dev_kvm, &kvm_modules(Path::new("/sys/module")))
}

/// The KVM vendor modules loaded (named in the message of a paravirtual KVM).
fn kvm_modules(sys_module: &Path) -> Vec<String> {
    ["kvm_intel", "kvm_amd", "kvm_pvm"].iter().filter(|m| sys_module.join(m).exists()).map(|m| m.to_string()).collect()
}

/// The accelerator to run with: `requested` if possible. A request for KVM that cannot be met
/// fails fast rather than crawling.
pub fn choose(requested: Accel) -> Result<Accel, NoKvm> {
    match requested {
        Accel::Tcg => Ok(Accel::Tcg),
        Accel::Kvm => match kvm_unusable() {
            None => Ok(Accel::Kvm),
            Some(no) => Err(no),
        },
    }
}

/// The effective uid, as the kernel checks it (the owner of /proc/self).
fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX)
}

fn owner(path: &Path) -> Owner {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok();
    let gid = meta.as_ref().map(|m| m.gid()).unwrap_or(u32::MAX);
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    Owner {
        uid: meta.as_ref().map(|m| m.uid()).unwrap_or(u32::MAX),
        gid,
        group: group_name(&groups, gid),
        mode: meta.map(|m| m.mode()).unwrap_or(0),
    }
}

/// The name of group `gid` in the text of an /etc/group.
pub fn group_name(etc_group: &str, gid: u32) -> Option<String> {
    etc_group.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?.parse::<u32>().ok()?;
        (id == gid && !name.is_empty()).then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_FLAG_CPU: &str = "processor\t: 0\nflags\t\t: fpu vme sse2 hypervisor\n";
    const VMX_CPU: &str = "flags\t\t: fpu vmx sse2\n";

    #[test]
    fn the_cpu_flag_is_read_from_the_flags_lines() {
        assert!(!cpu_has_virtualisation(NO_FLAG_CPU));
        assert!(cpu_has_virtualisation(VMX_CPU));
        assert!(cpu_has_virtualisation("flags : svm\n"));
        // A flag's name elsewhere (a model name, a bug list) does not count.
        assert!(!cpu_has_virtualisation("model name : vmx\nflags : fpu\n"));
    }

    #[test]
    fn a_missing_device_is_named() {
        let e = probe_device(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(e, KvmDeviceError::Missing { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "/nonexistent/kvm does not exist: the kernel has no KVM module loaded (load one: modprobe kvm_intel, or kvm_amd), or the Nix sandbox does not pass the device in (it does for derivations that require the 'kvm' system feature)"
        );
    }

    #[test]
    fn a_device_that_is_not_kvm_fails_at_the_api_version() {
        // /dev/null opens for reading and writing, and refuses KVM's ioctls.
        let e = probe_device(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(e, KvmDeviceError::NotKvm { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.starts_with("/dev/null is not a KVM device: KVM_GET_API_VERSION failed ("), "{text}");
    }

    #[test]
    fn a_folder_cannot_be_opened() {
        let dir = tempfile::tempdir().unwrap();
        let e = probe_device(dir.path()).unwrap_err();
        assert!(matches!(e, KvmDeviceError::Open { .. }), "{e:?}");
        assert!(e.to_string().starts_with(&format!("{} cannot be opened: ", dir.path().display())), "{e}");
    }

    #[test]
    fn only_api_version_12_is_accepted() {
        assert_eq!(kvm::API_VERSION, 12);
        assert!(check_api_version(Path::new("/dev/kvm"), 12).is_ok());
        assert_eq!(
            check_api_version(Path::new("/dev/kvm"), 11).unwrap_err().to_string(),
            "/dev/kvm speaks KVM API version 11, not 12: this kernel's KVM is not the one QEMU uses"
        );
    }

    #[test]
    fn a_user_without_access_is_told_which_group_to_join() {
        let e = KvmDeviceError::Denied {
            path: "/dev/kvm".into(),
            uid: 30001,
            owner: Owner { uid: 0, gid: 993, group: Some("kvm".into()), mode: 0o20660 },
        };
        assert_eq!(
            e.to_string(),
            "/dev/kvm cannot be opened for reading and writing by uid 30001: permission denied (owner uid 0, group 'kvm', mode 0660); join the group 'kvm' (for Nix's build users: add them to it), or give the device mode 0666 as NixOS does"
        );
        // Inside the Nix sandbox /etc/group does not know the device's group.
        let e = KvmDeviceError::Denied {
            path: "/dev/kvm".into(),
            uid: 1000,
            owner: Owner { uid: 0, gid: 993, group: None, mode: 0o20660 },
        };
        assert!(e.to_string().contains("(owner uid 0, group gid 993, mode 0660); join the group gid 993 "), "{e}");
        let e = KvmDeviceError::Denied {
            path: "/dev/kvm".into(),
            uid: 1000,
            owner: Owner { uid: 0, gid: 0, group: Some("root".into()), mode: 0o20600 },
        };
        assert!(
            e.to_string().ends_with("(owner uid 0, group 'root', mode 0600); its group is root's: give it a group of its own (usually 'kvm') with mode 0660 and make uid 1000 a member, or mode 0666 as NixOS does"),
            "{e}"
        );
    }

    #[test]
    fn a_denied_open_reads_the_owner_of_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("kvm");
        std::fs::write(&f, "").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let o = owner(&f);
        let gid = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(&f).unwrap());
        assert_eq!((o.uid, o.gid, o.mode & 0o777), (current_uid(), gid, 0o640));
        assert_eq!(o.group, group_name(&std::fs::read_to_string("/etc/group").unwrap_or_default(), gid));
    }

    #[test]
    fn group_names_come_from_etc_group() {
        let groups = "root:x:0:\nkvm:x:993:alice,bob\nbroken line\nnixbld:x:30000:nixbld1\n";
        assert_eq!(group_name(groups, 993).as_deref(), Some("kvm"));
        assert_eq!(group_name(groups, 0).as_deref(), Some("root"));
        assert_eq!(group_name(groups, 4), None);
    }

    #[test]
    fn a_paravirtual_kvm_is_refused_for_its_cpu_and_says_the_device_works() {
        let no = verdict(false, Ok(()), Path::new("/dev/kvm"), &["kvm_pvm".into()]).unwrap();
        assert_eq!(no.reason, "the CPU has no vmx/svm flag in /proc/cpuinfo");
        assert_eq!(
            no.to_string(),
            "accel = \"kvm\" was requested but KVM is not usable here: the CPU has no vmx/svm flag in /proc/cpuinfo; /dev/kvm itself works (API version 12, KVM_CREATE_VM and KVM_CREATE_VCPU succeed), so it is a paravirtual KVM (kvm_pvm), on which unmodified guests crawl. Use accel = \"tcg\" (software emulation, much slower) or build on a machine with hardware virtualisation"
        );
    }

    #[test]
    fn the_device_failure_is_the_reason_on_a_capable_cpu() {
        let device = probe_device(Path::new("/nonexistent/kvm"));
        let no = verdict(true, device, Path::new("/nonexistent/kvm"), &[]).unwrap();
        assert!(no.reason.starts_with("/nonexistent/kvm does not exist"), "{no:?}");
        assert_eq!(no.note, None);
        // Without the flag either, both are said.
        let device = probe_device(Path::new("/nonexistent/kvm"));
        let no = verdict(false, device, Path::new("/nonexistent/kvm"), &[]).unwrap();
        assert_eq!(no.reason, "the CPU has no vmx/svm flag in /proc/cpuinfo");
        assert!(no.note.unwrap().starts_with("/nonexistent/kvm does not exist"));
        assert!(verdict(true, Ok(()), Path::new("/dev/kvm"), &[]).is_none());
    }

    #[test]
    fn the_loaded_kvm_modules_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("kvm_amd")).unwrap();
        std::fs::create_dir(dir.path().join("kvm")).unwrap();
        assert_eq!(kvm_modules(dir.path()), vec!["kvm_amd".to_string()]);
    }
}
