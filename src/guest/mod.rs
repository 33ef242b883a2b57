//! Guest profiles: what runs inside the VM that builds. `standin` is a small Linux that keeps
//! the same contract as the Windows guest (SSH as Administrator on 192.168.0.1, the
//! controller's shares at /nix/store and /tmp/xchg); `windows` generates the unattended
//! install of Windows + Cygwin. [`profile`] is what the stages see of either.

pub mod profile;
pub mod standin;
pub mod windows;

/// The guest's fixed address on the VM network, and the controller's (defined with the spec,
/// at the bottom, so that the initramfs layer can use them too).
pub use crate::spec::{CONTROLLER_IP, GUEST_IP};

/// In the exchange folder: a layer's commands, one file each, `1` ... `N`.
pub const LAYER_DIR: &str = "layer";
/// In the exchange folder, after a layer command failed: its number and exit code.
pub const LAYER_FAILED: &str = "layer-failed";
pub use profile::{profile, MediaInputs, Profile, ProfileError};

pub const SSH_USER: &str = "Administrator";
