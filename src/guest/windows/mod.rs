//! The Windows guest profile: everything the install media carries, as text and bytes.
//!
//! Nothing here starts a VM or talks to Nix. The media stage assembles these pieces:
//! - a floppy ([`fat::fat12_floppy`]) holding `autounattend.xml` ([`answer::autounattend_xml`]),
//!   which Windows Setup finds on its own by searching the roots of removable media;
//! - a second, larger medium whose root holds [`media::names::MARKER`],
//!   [`media::names::INSTALL_CMD`] ([`scripts::install_cmd`]), [`media::names::BOOTSTRAP_SH`]
//!   ([`scripts::bootstrap_sh`]), [`media::names::CYGWIN_SETUP_EXE`] and the offline Cygwin
//!   repository under [`media::names::CYGWIN_PACKAGES_DIR`] ([`cygwin::local_repo_layout`], with
//!   setup.ini at [`cygwin::LOCAL_SETUP_INI`]). Its file system must keep long names (an ISO
//!   with Joliet, or VFAT): Cygwin's archive names are not 8.3.
//!
//! [`media::build_media`] writes both, and the rest of the media stage's output.
//!
//! The generators take options that passed [`WindowsOptions::validate`]; they still escape
//! every user value for the language they write, so unvalidated input cannot break the
//! structure of the output, only make Windows reject a value.

use std::fmt;

use serde::{Deserialize, Serialize};

pub mod answer;
pub mod cygwin;
pub mod fat;
pub mod media;
pub mod scripts;

/// SSH_USER is the built-in "Administrator": Setup enables that account by itself only when the
/// answer file names it in English, so media whose built-in account has another name (localized
/// Windows) are not supported.
pub use super::{CONTROLLER_IP, GUEST_IP, SSH_USER};
use crate::spec::{DEFAULT_LOCALE, WINDOWS_DISK_SIZE_MIB};

/// The VM network is 192.168.0.0/24.
pub const NETWORK_PREFIX_LEN: u8 = 24;
pub const NETWORK_MASK: &str = "255.255.255.0";

/// Where Cygwin is installed in the guest.
pub const CYGWIN_ROOT: &str = r"C:\cygwin64";

/// Windows 10/11 and Server 2019+ need at least 32 GB.
pub const MIN_DISK_SIZE_MIB: u64 = 32_768;
/// Windows Server enforces password complexity; the default has to pass it.
pub const DEFAULT_ADMIN_PASSWORD: &str = "Nix-WinVM-2010";

// Names the answer file and the scripts both write: here, so neither imports the other.

/// Every line the install writes to the serial console starts with this; the host reads them.
pub const INSTALL_MARKER_PREFIX: &str = "nix-winvm-install:";
/// The alias Windows 8 and later give the first wired adapter.
pub const FIRST_NIC_ALIAS: &str = "Ethernet";
/// No spaces: the name passes through Cygwin's and netsh's quoting unharmed.
pub const FIREWALL_RULE_NAME: &str = "nix-winvm-sshd";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowsOptions {
    /// The image name inside install.wim, exactly as `dism /Get-WimInfo` prints it,
    /// e.g. "Windows 11 Pro" or "Windows Server 2022 SERVERSTANDARD".
    pub edition: String,
    /// Five groups of five characters. None: Setup picks the edition from `edition` alone,
    /// which is what evaluation media need (they reject keys).
    pub product_key: Option<String>,
    /// A language tag such as "en-US"; the UI language must exist on the media.
    pub locale: String,
    pub disk_size_mib: u64,
    /// GPT + UEFI boot when true, MBR + BIOS boot otherwise.
    pub efi: bool,
    /// Cygwin packages on top of the Base category and openssh.
    pub cygwin_packages: Vec<String>,
    /// Cygwin bash commands run once at the end of the install, each in its own `bash -c`.
    pub install_commands: Vec<String>,
    pub admin_password: String,
}

impl WindowsOptions {
    pub fn new(edition: impl Into<String>) -> Self {
        WindowsOptions {
            edition: edition.into(),
            product_key: None,
            locale: DEFAULT_LOCALE.to_string(),
            disk_size_mib: WINDOWS_DISK_SIZE_MIB,
            efi: false,
            cygwin_packages: Vec::new(),
            install_commands: Vec::new(),
            admin_password: DEFAULT_ADMIN_PASSWORD.to_string(),
        }
    }

    /// Windows 11 Setup checks TPM, Secure Boot, RAM and CPU; QEMU guests fail those checks.
    pub fn needs_hardware_check_bypass(&self) -> bool {
        self.edition.contains("11")
    }

    pub fn is_server(&self) -> bool {
        self.edition.to_ascii_lowercase().contains("server")
    }

    pub fn validate(&self) -> Result<(), WindowsOptionsError> {
        use WindowsOptionsError as E;
        if self.edition.trim().is_empty() {
            return Err(E::EmptyEdition);
        }
        if self.edition.chars().any(char::is_control) {
            return Err(E::ControlCharacter { field: "edition" });
        }
        if let Some(key) = &self.product_key {
            if !is_product_key(key) {
                return Err(E::InvalidProductKey { key: key.clone() });
            }
        }
        if !is_language_tag(&self.locale) {
            return Err(E::InvalidLocale { locale: self.locale.clone() });
        }
        if self.disk_size_mib < MIN_DISK_SIZE_MIB {
            return Err(E::DiskTooSmall { disk_size_mib: self.disk_size_mib });
        }
        for name in &self.cygwin_packages {
            if !is_cygwin_package_name(name) {
                return Err(E::InvalidCygwinPackage { name: name.clone() });
            }
        }
        for (index, command) in self.install_commands.iter().enumerate() {
            if command.contains('\0') {
                return Err(E::NulInInstallCommand { index });
            }
        }
        if self.admin_password.is_empty() {
            return Err(E::EmptyAdminPassword);
        }
        if self.admin_password.chars().any(char::is_control) {
            return Err(E::ControlCharacter { field: "admin_password" });
        }
        if self.admin_password.chars().count() > MAX_PASSWORD_CHARS {
            return Err(E::AdminPasswordTooLong);
        }
        if self.is_server() && !is_complex_password(&self.admin_password) {
            return Err(E::AdminPasswordNotComplex);
        }
        Ok(())
    }
}

/// The longest password `net user` accepts.
const MAX_PASSWORD_CHARS: usize = 127;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowsOptionsError {
    EmptyEdition,
    ControlCharacter { field: &'static str },
    InvalidProductKey { key: String },
    InvalidLocale { locale: String },
    DiskTooSmall { disk_size_mib: u64 },
    InvalidCygwinPackage { name: String },
    NulInInstallCommand { index: usize },
    EmptyAdminPassword,
    AdminPasswordTooLong,
    AdminPasswordNotComplex,
}

impl fmt::Display for WindowsOptionsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use WindowsOptionsError as E;
        match self {
            E::EmptyEdition => {
                write!(f, "edition is empty: give the image name from install.wim, e.g. \"Windows 11 Pro\"")
            }
            E::ControlCharacter { field } => write!(f, "{field} contains a control character"),
            E::InvalidProductKey { key } => write!(
                f,
                "product key '{key}' is not five groups of five letters or digits \
                 (XXXXX-XXXXX-XXXXX-XXXXX-XXXXX)"
            ),
            E::InvalidLocale { locale } => {
                write!(f, "locale '{locale}' is not a language tag such as \"en-US\"")
            }
            E::DiskTooSmall { disk_size_mib } => {
                write!(f, "disk size {disk_size_mib} MiB is below the {MIN_DISK_SIZE_MIB} MiB Windows needs")
            }
            E::InvalidCygwinPackage { name } => {
                write!(f, "cygwin package name '{name}' may only hold letters, digits and . _ + -")
            }
            E::NulInInstallCommand { index } => {
                write!(f, "install command {index} contains a NUL byte")
            }
            E::EmptyAdminPassword => write!(f, "admin password is empty"),
            E::AdminPasswordTooLong => {
                write!(f, "admin password is longer than {MAX_PASSWORD_CHARS} characters")
            }
            E::AdminPasswordNotComplex => write!(
                f,
                "admin password does not meet Windows Server complexity rules: at least 8 \
                 characters from three of upper case, lower case, digits and symbols"
            ),
        }
    }
}

impl std::error::Error for WindowsOptionsError {}

fn is_product_key(key: &str) -> bool {
    let groups: Vec<&str> = key.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .all(|group| group.len() == 5 && group.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()))
}

fn is_language_tag(tag: &str) -> bool {
    let mut parts = tag.split('-');
    let language_ok = parts
        .next()
        .is_some_and(|language| (2..=3).contains(&language.len()) && language.bytes().all(|b| b.is_ascii_lowercase()));
    let rest: Vec<&str> = parts.collect();
    language_ok
        && !rest.is_empty()
        && rest.iter().all(|part| (2..=8).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_alphanumeric()))
}

pub(crate) fn is_cygwin_package_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
}

fn is_complex_password(password: &str) -> bool {
    let classes = [
        password.chars().any(|c| c.is_uppercase()),
        password.chars().any(|c| c.is_lowercase()),
        password.chars().any(|c| c.is_ascii_digit()),
        password.chars().any(|c| !c.is_alphanumeric()),
    ];
    password.chars().count() >= 8 && classes.iter().filter(|&&present| present).count() >= 3
}

/// The Generic Volume License Key Microsoft publishes for an edition, if there is one
/// ("KMS client activation and product keys"). It selects the edition during Setup on retail
/// and volume media that would otherwise ask for a key; it activates nothing. Evaluation
/// media reject it, so it is never used unless the caller puts it into `product_key`.
pub fn kms_client_key(edition: &str) -> Option<&'static str> {
    const KEYS: &[(&str, &str)] = &[
        ("Windows 10 Pro", "W269N-WFGWX-YVC9B-4J6C9-T83GX"),
        ("Windows 11 Pro", "W269N-WFGWX-YVC9B-4J6C9-T83GX"),
        ("Windows 10 Enterprise", "NPPR9-FWDCX-D2C8J-H872K-2YT43"),
        ("Windows 11 Enterprise", "NPPR9-FWDCX-D2C8J-H872K-2YT43"),
        ("Windows 10 Education", "NW6C2-QMPVW-D7KKK-3GKT6-VCFB2"),
        ("Windows 11 Education", "NW6C2-QMPVW-D7KKK-3GKT6-VCFB2"),
        ("Windows Server 2019 Standard", "N69G4-B89J2-4G8F4-WWYCC-J464C"),
        ("Windows Server 2019 Datacenter", "WMDGN-G9PQG-XVVXX-R3X43-63DFG"),
        ("Windows Server 2022 Standard", "VDYBN-27WPP-V4HQT-9VMD4-VMK7H"),
        ("Windows Server 2022 Datacenter", "WX4NM-KYWYW-QJJR4-XV3QB-6VM33"),
        ("Windows Server 2025 Standard", "TVRH6-WHNXV-R9WG3-9XRFY-MY832"),
        ("Windows Server 2025 Datacenter", "D764K-2NDRG-47T6Q-P8T8W-YP6DF"),
    ];
    KEYS.iter().find(|(name, _)| *name == edition).map(|(_, key)| *key)
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh scratch file path; the caller removes it.
    pub fn temp_path(name: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        std::env::temp_dir().join(format!("nix-winvm-test-{}-{n}-{name}", std::process::id()))
    }

    pub fn tool_available(tool: &str) -> bool {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool} >/dev/null 2>&1"))
            .status()
            .map(|status| status.success())
            .unwrap_or(false);
        crate::tools::test_requires(tool, found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_gives_valid_defaults_for_client_and_server() {
        assert_eq!(WindowsOptions::new("Windows 11 Pro").validate(), Ok(()));
        assert_eq!(WindowsOptions::new("Windows Server 2022 SERVERSTANDARD").validate(), Ok(()));
    }

    #[test]
    fn serde_rejects_unknown_fields_and_round_trips() {
        let opts = WindowsOptions::new("Windows 10 Pro");
        let json = serde_json::to_string(&opts).expect("serializable");
        let back: WindowsOptions = serde_json::from_str(&json).expect("round trip");
        assert_eq!(back, opts);
        let with_extra = json.replacen('{', "{\"colour\":\"blue\",", 1);
        let err = serde_json::from_str::<WindowsOptions>(&with_extra).expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn validation_messages_name_the_problem() {
        let mut opts = WindowsOptions::new("Windows 10 Pro");
        opts.product_key = Some("abcde-12345".into());
        assert_eq!(
            opts.validate().map_err(|e| e.to_string()),
            Err("product key 'abcde-12345' is not five groups of five letters or digits \
                 (XXXXX-XXXXX-XXXXX-XXXXX-XXXXX)"
                .to_string())
        );

        let mut opts = WindowsOptions::new("Windows 10 Pro");
        opts.locale = "english".into();
        assert_eq!(
            opts.validate().map_err(|e| e.to_string()),
            Err("locale 'english' is not a language tag such as \"en-US\"".to_string())
        );

        let mut opts = WindowsOptions::new("Windows 10 Pro");
        opts.disk_size_mib = 1024;
        assert_eq!(opts.validate(), Err(WindowsOptionsError::DiskTooSmall { disk_size_mib: 1024 }));

        let mut opts = WindowsOptions::new("Windows 10 Pro");
        opts.cygwin_packages = vec!["make".into(), "gcc&calc".into()];
        assert_eq!(
            opts.validate().map_err(|e| e.to_string()),
            Err("cygwin package name 'gcc&calc' may only hold letters, digits and . _ + -".to_string())
        );

        let mut opts = WindowsOptions::new("Windows Server 2025 Datacenter");
        opts.admin_password = "password".into();
        assert_eq!(opts.validate(), Err(WindowsOptionsError::AdminPasswordNotComplex));

        let mut opts = WindowsOptions::new("");
        opts.edition = " ".into();
        assert_eq!(opts.validate(), Err(WindowsOptionsError::EmptyEdition));
    }

    #[test]
    fn accepts_real_shapes() {
        assert!(is_language_tag("en-US"));
        assert!(is_language_tag("sr-Latn-RS"));
        assert!(!is_language_tag("EN-us"));
        assert!(is_product_key("W269N-WFGWX-YVC9B-4J6C9-T83GX"));
        assert!(is_cygwin_package_name("libstdc++6"));
        assert!(!is_cygwin_package_name("-rf"));
    }

    #[test]
    fn kms_keys_are_well_formed_and_exact_match_only() {
        assert_eq!(kms_client_key("Windows 11 Pro"), Some("W269N-WFGWX-YVC9B-4J6C9-T83GX"));
        assert_eq!(kms_client_key("Windows 11 Pro N"), None);
        for edition in ["Windows 10 Pro", "Windows Server 2022 Standard"] {
            assert!(kms_client_key(edition).is_some_and(is_product_key));
        }
    }

    #[test]
    fn hardware_bypass_only_for_windows_11() {
        assert!(WindowsOptions::new("Windows 11 Enterprise").needs_hardware_check_bypass());
        assert!(!WindowsOptions::new("Windows 10 Pro").needs_hardware_check_bypass());
        assert!(!WindowsOptions::new("Windows Server 2025 Standard").needs_hardware_check_bypass());
    }
}
