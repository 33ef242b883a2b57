//! Guest profiles: what runs inside the VM that builds. `standin` is a small Linux that keeps
//! the same contract as the Windows guest (SSH as Administrator on 192.168.0.1, the
//! controller's shares at /nix/store and /tmp/xchg); `windows` generates the unattended
//! install of Windows + Cygwin.

pub mod standin;
pub mod windows;

/// The guest's fixed address on the VM network; the controller is .2.
pub const GUEST_IP: &str = "192.168.0.1";
pub const CONTROLLER_IP: &str = "192.168.0.2";
pub const SSH_USER: &str = "Administrator";
