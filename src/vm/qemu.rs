//! QEMU command lines for the guest and the controller. Pure: built here, run by the caller.

pub use crate::spec::MACHINE_ALIAS;
use crate::spec::{Accel, MachineShape};
use crate::vm::memory::{GuestRam, BACKEND_ID};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

pub const GUEST_MAC: &str = "52:54:00:12:01:01";
pub const CONTROLLER_MAC: &str = "52:54:00:12:01:02";
pub const CONTROLLER_MEMORY_MIB: u32 = 256;

/// The controller beside a guest of shape `guest`: the same accelerator and machine type (the
/// pair is saved and revived together, by one QEMU), its own memory, one CPU, the BIOS.
pub fn controller_shape(guest: &MachineShape) -> MachineShape {
    MachineShape { memory_mib: CONTROLLER_MEMORY_MIB, cpus: 1, efi: false, ..guest.clone() }
}

/// A directory the controller gets over 9p.
#[derive(Debug, Clone)]
pub struct Export {
    pub tag: String,
    pub path: PathBuf,
    pub readonly: bool,
}

/// Direct kernel boot (the Linux VMs); without it the firmware boots the disks (Windows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
}

/// `-L DIR` when `qemu` runs from a tools closure (bin/ beside share/qemu): Debian's QEMU
/// looks for its firmware at the paths it was built with, which a sandbox does not have.
pub fn firmware_args(qemu: &std::path::Path) -> Vec<OsString> {
    match qemu.parent().and_then(|bin| bin.parent()).map(|root| root.join("share/qemu")) {
        Some(dir) if dir.is_dir() && !dir.starts_with("/usr") => vec!["-L".into(), dir.into_os_string()],
        _ => vec![],
    }
}

/// How a VM boots and what it has attached, apart from what the session wires up (network,
/// consoles, QMP): what a guest profile describes for each stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// None: the firmware boots the disks.
    pub boot: Option<KernelBoot>,
    /// A virtio disk (the standin's); Windows attaches its disks through `extra_args`.
    pub disk: Option<PathBuf>,
    pub nic_model: &'static str,
    pub extra_args: Vec<std::ffi::OsString>,
    /// Hyper-V enlightenments under KVM (Windows): without them Windows spins on its locks and
    /// timers. Part of the machine, so identical at suspend and revive, as migration needs.
    pub hyperv: bool,
    /// A standard VGA display (shown nowhere; its screen is taken through QMP).
    pub display: bool,
    /// UEFI firmware instead of the BIOS: part of the machine, as its variable store is part of
    /// the image.
    pub uefi: Option<Uefi>,
}

/// OVMF as two flash chips: its code, read-only, and the image's own variable store (boot
/// entries, Secure Boot keys), writable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uefi {
    pub code: PathBuf,
    pub vars: PathBuf,
}

impl Uefi {
    fn args(&self) -> Vec<OsString> {
        vec![
            s("-drive"),
            s(&format!("if=pflash,unit=0,format=raw,readonly=on,file={}", option_path(&self.code))),
            s("-drive"),
            s(&format!("if=pflash,unit=1,format=raw,file={}", option_path(&self.vars))),
        ]
    }
}

/// A path inside a QEMU option list (`-drive`, `-virtfs`, `-netdev`, `-chardev`, `-qmp`,
/// `-vnc`), where a comma is written twice: every path the VMs' command lines hold goes
/// through here, so a comma in a build folder's name cannot split an option.
pub fn option_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// Why the machine type [`MACHINE_ALIAS`] stands for is unknown.
#[derive(Debug, thiserror::Error)]
pub enum MachineTypeError {
    #[error("running {} -machine help: {source}", qemu.display())]
    Run { qemu: PathBuf, source: std::io::Error },
    #[error("{} -machine help failed ({status})", qemu.display())]
    Failed { qemu: PathBuf, status: std::process::ExitStatus },
    #[error("{} -machine help names no machine type that '{MACHINE_ALIAS}' stands for", qemu.display())]
    NoAlias { qemu: PathBuf },
}

/// The versioned machine type [`MACHINE_ALIAS`] stands for in `qemu` (`pc-q35-10.0`), read from
/// its `-machine help`. An image records it, and every revive asks for it by that name: a newer
/// QEMU keeps older machine types, so it still loads the image's memory.
pub fn machine_type(qemu: &Path) -> Result<String, MachineTypeError> {
    let out = std::process::Command::new(qemu)
        .args(["-machine", "help"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| MachineTypeError::Run { qemu: qemu.into(), source })?;
    if !out.status.success() {
        return Err(MachineTypeError::Failed { qemu: qemu.into(), status: out.status });
    }
    aliased_machine(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| MachineTypeError::NoAlias { qemu: qemu.into() })
}

/// From `-machine help`'s line `q35  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)`.
fn aliased_machine(help: &str) -> Option<String> {
    help.lines()
        .find(|l| l.split_whitespace().next() == Some(MACHINE_ALIAS))
        .and_then(|l| l.split("(alias of ").nth(1))
        .and_then(|rest| rest.split(')').next())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
}

/// virtio for the Linux VMs; e1000e for Windows, which has no virtio driver built in. Its PCI
/// address is fixed: Windows binds its network settings to the adapter's slot.
pub const VIRTIO_NET: &str = "virtio-net-pci";
/// QEMU's VM Generation ID device, with a GUID of its own at every start (see [`VmConfig::args`]).
pub const VMGENID: &str = "vmgenid,guid=auto";
pub const E1000E: &str = "e1000e,addr=0x5";

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub name: String,
    /// `-accel`, `-m`, `-smp`, `-machine` (see [`MachineShape::machine_type`]); its `efi` is
    /// what [`VmConfig::uefi`] gives the files of.
    pub shape: MachineShape,
    pub boot: Option<KernelBoot>,
    pub nic_model: &'static str,
    /// Guest-specific devices (Windows: AHCI disks, CD, floppy, display).
    pub extra_args: Vec<OsString>,
    /// Installers reboot on purpose; everything else powering off means the end.
    pub no_reboot: bool,
    pub serial_log: PathBuf,
    /// The switch to plug into. None: no network; the card is still there if `mac` is set.
    pub vde_ctl: Option<PathBuf>,
    pub mac: String,
    pub qmp: Option<PathBuf>,
    pub exports: Vec<Export>,
    pub disk: Option<PathBuf>,
    /// `-incoming` source for a VM revived from a saved state.
    pub incoming: Option<String>,
    /// Where its RAM is: QEMU's own, or a file (see `vm::memory`).
    pub ram: GuestRam,
    /// See [`Machine::hyperv`]; only under KVM (TCG does not offer them).
    pub hyperv: bool,
    /// OVMF's files: present exactly when the shape's `efi` is set.
    pub uefi: Option<Uefi>,
    /// A VM with a display: the QMP socket its screenshots are taken through (a second
    /// monitor, so that taking them never waits for the session's own QMP traffic).
    pub screen: Option<PathBuf>,
}

/// How a guest's system disk reports errors: to the guest (QEMU's default pauses the VM on a
/// full host file system, which looks like a hang).
pub const DISK_ERRORS: &str = "werror=report,rerror=report";

/// How a system disk passes on what the guest frees: a discard (TRIM) unmaps the overlay's
/// clusters, and a write of zeros is made one, so an overlay keeps only what its session
/// wrote and still holds.
pub const DISK_DISCARD: &str = "discard=unmap,detect-zeroes=unmap";

/// The Hyper-V enlightenments Windows guests use under KVM.
pub const HYPERV_FEATURES: &str = "hv-relaxed,hv-vapic,hv-spinlocks=0x1fff,hv-time";

fn s(x: &str) -> OsString {
    x.into()
}

fn p(x: &Path) -> String {
    option_path(x)
}

impl VmConfig {
    pub fn args(&self) -> Vec<OsString> {
        let shape = &self.shape;
        debug_assert_eq!(shape.efi, self.uefi.is_some(), "{}: the firmware's files and the shape disagree", self.name);
        let cpu = match (shape.accel, self.hyperv) {
            (Accel::Kvm, true) => format!("host,{HYPERV_FEATURES}"),
            (Accel::Kvm, false) => "host".to_owned(),
            (Accel::Tcg, _) => "max".to_owned(),
        };
        let backend = self.ram.backend(shape.memory_mib);
        let machine = match backend {
            Some(_) => format!("{},memory-backend={BACKEND_ID}", shape.machine_type),
            None => shape.machine_type.clone(),
        };
        let mut a: Vec<OsString> = vec![
            s("-name"),
            s(&self.name),
            s("-machine"),
            s(&machine),
            s("-accel"),
            s(shape.accel.name()),
            s("-cpu"),
            s(&cpu),
            s("-m"),
            s(&shape.memory_mib.to_string()),
            s("-smp"),
            s(&shape.cpus.to_string()),
            s("-nodefaults"),
            s("-display"),
            s("none"),
            // -serial file:PATH would take the path verbatim; a chardev takes it as an option.
            s("-chardev"),
            s(&format!("file,id=serial0,path={}", p(&self.serial_log))),
            s("-serial"),
            s("chardev:serial0"),
            s("-device"),
            s("virtio-rng-pci"),
            // Every revive of an image starts from the same saved memory, the guest's random
            // number generator included. The VM Generation ID device gets a new GUID at each
            // start (auto) and, on loading a saved state, writes it into the guest and raises
            // an ACPI notification: Windows (8 / 2012 on) and Linux (5.18 on) mix it in and
            // reseed. Part of the machine: present when an image is saved and when it revives.
            s("-device"),
            s(VMGENID),
        ];
        if let Some(backend) = backend {
            a.extend([s("-object"), s(&backend)]);
        }
        if let Some(uefi) = &self.uefi {
            a.extend(uefi.args());
        }
        if self.no_reboot {
            a.push(s("-no-reboot"));
        }
        if let Some(b) = &self.boot {
            a.extend([
                s("-kernel"),
                b.kernel.clone().into(),
                s("-initrd"),
                b.initrd.clone().into(),
                s("-append"),
                s(&b.append),
            ]);
        }
        if let Some(ctl) = &self.vde_ctl {
            a.push(s("-netdev"));
            a.push(s(&format!("vde,id=n0,sock={}", p(ctl))));
            a.push(s("-device"));
            a.push(s(&format!("{},netdev=n0,mac={}", self.nic_model, self.mac)));
        } else if !self.mac.is_empty() {
            // A card connected to nothing: present for the guest's configuration, no traffic.
            a.push(s("-device"));
            a.push(s(&format!("{},mac={}", self.nic_model, self.mac)));
        }
        if let Some(disk) = &self.disk {
            a.push(s("-drive"));
            // writeback, not unsafe: a migration flushes the disk, and the saved memory must
            // match what the overlay holds. A write error (the work folder full) goes to the
            // guest, whose command then fails, rather than pausing the VM until the time-out.
            a.push(s(&format!("file={},if=virtio,format=qcow2,cache=writeback,{DISK_DISCARD},{DISK_ERRORS}", p(disk))));
        }
        a.extend(self.extra_args.iter().cloned());
        if let Some(screen) = &self.screen {
            a.extend([s("-vga"), s("std")]);
            a.push(s("-qmp"));
            a.push(s(&format!("unix:{},server=on,wait=off", p(screen))));
        }
        if let Some(qmp) = &self.qmp {
            a.push(s("-qmp"));
            a.push(s(&format!("unix:{},server=on,wait=off", p(qmp))));
        }
        for e in &self.exports {
            let mut opt = format!("local,path={},mount_tag={},security_model=none,multidevs=remap", p(&e.path), e.tag);
            if e.readonly {
                opt.push_str(",readonly=on");
            }
            a.push(s("-virtfs"));
            a.push(s(&opt));
        }
        if let Some(src) = &self.incoming {
            a.push(s("-incoming"));
            a.push(s(src));
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alias_names_a_versioned_machine_type() {
        let help = "Supported machines are:\n\
                    pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)\n\
                    q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)\n\
                    pc-q35-10.0          Standard PC (Q35 + ICH9, 2009)\n";
        assert_eq!(aliased_machine(help).as_deref(), Some("pc-q35-10.0"));
        assert_eq!(aliased_machine("q35  Standard PC (Q35 + ICH9, 2009)\n"), None);
        // The QEMU of this machine, for real.
        let qemu = crate::tools::Tools::find().map(|t| t.qemu).unwrap_or_else(|_| "qemu-system-x86_64".into());
        let named = machine_type(&qemu).unwrap();
        assert!(named.starts_with("pc-q35-"), "{named}");
    }

    #[test]
    fn command_line_has_the_measured_flags() {
        let c = VmConfig {
            name: "guest".into(),
            shape: MachineShape::new(Accel::Tcg, 256, 1, false).with_machine_type("pc-q35-10.0"),
            boot: Some(KernelBoot { kernel: "/k".into(), initrd: "/i".into(), append: "console=ttyS0".into() }),
            nic_model: VIRTIO_NET,
            extra_args: vec![],
            no_reboot: true,
            serial_log: "/w/serial.log".into(),
            vde_ctl: Some("/w/vde.ctl".into()),
            mac: GUEST_MAC.into(),
            qmp: Some("/w/qmp.sock".into()),
            exports: vec![Export { tag: "root".into(), path: "/".into(), readonly: true }],
            disk: None,
            incoming: None,
            ram: GuestRam::Anonymous,
            hyperv: false,
            screen: None,
            uefi: None,
        };
        let line = c.args().iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        assert!(line.contains("-machine pc-q35-10.0 -accel tcg -cpu max -m 256"), "{line}");
        assert!(
            line.contains("-netdev vde,id=n0,sock=/w/vde.ctl -device virtio-net-pci,netdev=n0,mac=52:54:00:12:01:01")
        );
        assert!(line.contains("-qmp unix:/w/qmp.sock,server=on,wait=off"));
        assert!(line.contains("-virtfs local,path=/,mount_tag=root,security_model=none,multidevs=remap,readonly=on"));
        assert!(!line.contains("-incoming"));
        // A new VM generation ID at every start, for the guest and the controller alike (both
        // are revived from saved memory); the Windows guest's extra devices do not replace it.
        let controller = VmConfig { name: "controller".into(), boot: None, exports: vec![], ..c.clone() };
        let windows = VmConfig { extra_args: vec![s("-device"), s("ahci,id=ahci")], uefi: None, ..c.clone() };
        for vm in [&c, &controller, &windows] {
            let args = vm.args();
            let n = args.windows(2).filter(|w| w[0] == "-device" && w[1] == "vmgenid,guid=auto").count();
            assert_eq!(n, 1, "{args:?}");
        }
        // Hyper-V enlightenments: only where KVM offers them.
        let with_hyperv = VmConfig { hyperv: true, ..c.clone() };
        let tcg = with_hyperv.args().iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        assert!(tcg.contains("-cpu max -m"), "{tcg}");
        let kvm = VmConfig { shape: MachineShape { accel: Accel::Kvm, ..c.shape.clone() }, ..with_hyperv };
        let kvm = kvm.args().iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        assert!(kvm.contains("-accel kvm -cpu host,hv-relaxed,hv-vapic,hv-spinlocks=0x1fff,hv-time -m"), "{kvm}");
        // No display unless asked for; with one, a second QMP socket for its screenshots.
        assert!(!line.contains("-vga"), "{line}");
        let shown = VmConfig { screen: Some("/w/screen.sock".into()), ..c.clone() };
        let shown = shown.args().iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        assert!(
            shown.contains("-vga std -qmp unix:/w/screen.sock,server=on,wait=off -qmp unix:/w/qmp.sock"),
            "{shown}"
        );
        // RAM in a file: the machine takes the backend; saved shared, revived private and
        // read-only (a store file), and never both.
        let shared = VmConfig { ram: GuestRam::Shared("/w/ram".into()), ..c.clone() };
        let shared = shared.args().iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        assert!(shared.contains("-machine pc-q35-10.0,memory-backend=guest-ram "), "{shared}");
        assert!(
            shared.contains("-object memory-backend-file,id=guest-ram,size=256M,mem-path=/w/ram,share=on "),
            "{shared}"
        );
        let private = VmConfig { ram: GuestRam::Private("/s/ram".into()), ..c.clone() };
        let private = private.args().iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        assert!(private.contains("mem-path=/s/ram,share=off,readonly=on,rom=off "), "{private}");
        assert!(!line.contains("memory-backend"), "{line}");
        // Every path in an option list has its commas doubled.
        let commas = VmConfig {
            ram: GuestRam::Shared("/w,1/ram".into()),
            serial_log: "/w,1/serial.log".into(),
            vde_ctl: Some("/w,1/vde.ctl".into()),
            qmp: Some("/w,1/qmp.sock".into()),
            screen: Some("/w,1/screen.sock".into()),
            disk: Some("/w,1/disk.qcow2".into()),
            exports: vec![Export { path: "/w,1/xchg".into(), tag: "xchg".into(), readonly: false }],
            ..c.clone()
        };
        let commas = commas.args().iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>();
        for arg in &commas {
            assert!(!arg.contains("/w,1"), "a single comma in {arg}: {commas:?}");
        }
        assert_eq!(commas.iter().filter(|a| a.contains("/w,,1")).count(), 7, "{commas:?}");
        assert!(line.contains("-chardev file,id=serial0,path=/w/serial.log -serial chardev:serial0"), "{line}");
        // UEFI: OVMF's code read-only, the image's variable store writable; commas doubled.
        assert!(!line.contains("pflash"));
        let uefi = VmConfig {
            shape: MachineShape { efi: true, ..c.shape.clone() },
            uefi: Some(Uefi { code: "/o/CODE.fd".into(), vars: "/w/va,rs.fd".into() }),
            ..c
        };
        let uefi = uefi.args().iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        assert!(
            uefi.contains(
                "-drive if=pflash,unit=0,format=raw,readonly=on,file=/o/CODE.fd -drive if=pflash,unit=1,format=raw,file=/w/va,,rs.fd"
            ),
            "{uefi}"
        );
    }
}
