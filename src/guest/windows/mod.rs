//! The Windows guest profile: everything the install media carries, as text and bytes.
//!
//! Nothing here starts a VM or talks to Nix. The media stage assembles these pieces:
//! - a floppy (made by mtools, [`media::write_answer_medium`]) holding `autounattend.xml`
//!   ([`answer::autounattend_xml`]), which Windows Setup finds on its own by searching the roots
//!   of removable media;
//! - a second, larger medium whose root holds [`media::names::MARKER`],
//!   [`media::names::INSTALL_CMD`] ([`scripts::install_cmd`]), [`media::names::BOOTSTRAP_SH`]
//!   ([`scripts::bootstrap_sh`]), [`media::names::CYGWIN_SETUP_EXE`] and the offline Cygwin
//!   repository under [`media::names::CYGWIN_PACKAGES_DIR`] ([`cygwin::local_repo_layout`], with
//!   setup.ini at [`cygwin::LOCAL_SETUP_INI`]). Its file system must keep long names (an ISO
//!   with Joliet, or VFAT): Cygwin's archive names are not 8.3.
//!
//! [`media::build_media`] writes both, and the rest of the media stage's output.
//!
//! The generators take options that passed [`WindowsOptions::validate`] (in the spec, so the
//! plugin runs the same checks at evaluation); they still escape
//! every user value for the language they write, so unvalidated input cannot break the
//! structure of the output, only make Windows reject a value.

pub mod answer;
pub mod cygwin;
pub mod editions;
pub mod media;
pub mod outputs;
pub mod scripts;

/// SSH_USER is the built-in "Administrator": Setup enables that account by itself only when the
/// answer file names it in English, so media whose built-in account has another name (localized
/// Windows) are not supported.
pub use super::{CONTROLLER_IP, GUEST_IP, SSH_USER};
pub use crate::spec::WindowsOptions;

/// The VM network is 192.168.0.0/24.
pub const NETWORK_PREFIX_LEN: u8 = 24;
pub const NETWORK_MASK: &str = "255.255.255.0";

/// Where Cygwin is installed in the guest.
pub const CYGWIN_ROOT: &str = r"C:\cygwin64";

// Names the answer file and the scripts both write: here, so neither imports the other.

/// Every line the install writes to the serial console starts with this; the host reads them.
pub const INSTALL_MARKER_PREFIX: &str = "nix-winvm-install:";
/// The alias Windows 8 and later give the first wired adapter.
pub const FIRST_NIC_ALIAS: &str = "Ethernet";
/// No spaces: the name passes through Cygwin's and netsh's quoting unharmed.
pub const FIREWALL_RULE_NAME: &str = "nix-winvm-sshd";

/// The codecs' test helpers serve the Windows profile's tests too.
#[cfg(test)]
pub(crate) use crate::format::test_util;

#[cfg(test)]
mod tests {
    use super::*;

    /// Windows Server refuses a password without three of: upper, lower, digit, symbol.
    #[test]
    fn the_admin_password_meets_windows_server_complexity() {
        let p = WindowsOptions::ADMIN_PASSWORD;
        let classes = [
            p.chars().any(|c| c.is_ascii_uppercase()),
            p.chars().any(|c| c.is_ascii_lowercase()),
            p.chars().any(|c| c.is_ascii_digit()),
            p.chars().any(|c| !c.is_ascii_alphanumeric()),
        ];
        assert!(p.len() >= 8 && classes.iter().filter(|&&c| c).count() >= 3);
    }
}
