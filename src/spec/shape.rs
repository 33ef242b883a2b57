//! The shape of a VM: what QEMU is asked for, and what a memory snapshot is bound to (a saved
//! VM loads only into a VM of the same shape).
//!
//! One type from the image's spec to QEMU's command line: the spec gives it (its machine type
//! [`MACHINE_ALIAS`]); the suspend stage resolves the alias to the versioned type this QEMU
//! has, and the image records that; every revive asks for the image's shape again. The
//! session's config, QEMU's configuration and the state header take it from here.

use serde::{Deserialize, Serialize};

/// The machine every VM is: QEMU's name for its newest Q35 machine type.
pub const MACHINE_ALIAS: &str = "q35";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineShape {
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    /// QEMU's `-machine`: [`MACHINE_ALIAS`] where nothing is saved (a spec, a direct run); the
    /// versioned type it stood for (`pc-q35-10.0`) wherever a pair is saved or revived, so
    /// that a newer QEMU revives the same machine (see `vm::qemu::machine_type`).
    pub machine_type: String,
    /// UEFI firmware (OVMF) instead of the BIOS: part of the machine, as its variable store
    /// is part of the image.
    pub efi: bool,
}

impl MachineShape {
    /// A machine of the newest type ([`MACHINE_ALIAS`]).
    pub fn new(accel: Accel, memory_mib: u32, cpus: u32, efi: bool) -> MachineShape {
        MachineShape { accel, memory_mib, cpus, machine_type: MACHINE_ALIAS.into(), efi }
    }

    /// The same machine as the versioned `machine_type`.
    pub fn with_machine_type(&self, machine_type: &str) -> MachineShape {
        MachineShape { machine_type: machine_type.into(), ..self.clone() }
    }
}
