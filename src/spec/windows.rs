//! A Windows image's own options, and their validation: the same checks run when the plugin
//! evaluates `windowsImage` and when the builder reads the spec back, so a bad product key or
//! a 1 GiB disk fails in seconds at evaluation, not an hour into an install.

use super::IsoSource;
use serde::{Deserialize, Serialize};

/// Windows 10/11 and Server 2019+ need at least 32 GB.
pub const MIN_DISK_SIZE_MIB: u64 = 32_768;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WindowsOptions {
    pub iso: IsoSource,
    /// The image name inside install.wim, exactly as `dism /Get-WimInfo` prints it,
    /// e.g. "Windows 11 Pro" or "Windows Server 2022 SERVERSTANDARD".
    pub edition: String,
    /// Five groups of five characters. None: Setup picks the edition from `edition` alone,
    /// which is what evaluation media need (they reject keys).
    pub product_key: Option<String>,
    /// A language tag such as "en-US"; the UI language must exist on the media.
    pub locale: String,
    /// Cygwin packages on top of the Base category and openssh.
    pub cygwin_packages: Vec<String>,
    /// Cygwin bash commands run once at the end of the install, each in its own `bash -c`.
    pub install_commands: Vec<String>,
}

impl WindowsOptions {
    /// The built-in Administrator's password, the same in every image. It is a credential:
    /// Cygwin's sshd logs the key-authenticated user on with it (`passwd -R`), so that builds
    /// reach the controller's shares, and the controller's Samba has an account `Administrator`
    /// with it (the standin mounts with it too). Windows Server enforces complexity; it passes.
    pub const ADMIN_PASSWORD: &'static str = "Nix-WinVM-2010";

    /// The defaults for an edition, from an ISO the user names by path.
    #[cfg(test)]
    pub fn new(edition: impl Into<String>) -> Self {
        WindowsOptions {
            iso: IsoSource::Path,
            edition: edition.into(),
            product_key: None,
            locale: super::DEFAULT_LOCALE.to_string(),
            cygwin_packages: Vec::new(),
            install_commands: Vec::new(),
        }
    }

    /// Windows 11 Setup checks TPM, Secure Boot, RAM and CPU; QEMU guests fail those checks.
    pub fn needs_hardware_check_bypass(&self) -> bool {
        self.edition.contains("11")
    }

    /// The options, for an image whose disk has `disk_size_mib`.
    pub fn validate(&self, disk_size_mib: u64) -> Result<(), WindowsOptionsError> {
        use WindowsOptionsError as E;
        if self.edition.trim().is_empty() {
            return Err(E::EmptyEdition);
        }
        if self.edition.chars().any(char::is_control) {
            return Err(E::ControlCharacter { attr: "edition" });
        }
        if let Some(key) = &self.product_key {
            if !is_product_key(key) {
                return Err(E::InvalidProductKey { key: key.clone() });
            }
        }
        if !is_language_tag(&self.locale) {
            return Err(E::InvalidLocale { locale: self.locale.clone() });
        }
        if disk_size_mib < MIN_DISK_SIZE_MIB {
            return Err(E::DiskTooSmall { disk_size_mib });
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
        Ok(())
    }
}

/// Each names the `windowsImage` attribute at fault, as the user wrote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowsOptionsError {
    #[error("attribute 'edition' is empty: give the image name from install.wim, e.g. \"Windows 11 Pro\"")]
    EmptyEdition,
    #[error("attribute '{attr}' contains a control character")]
    ControlCharacter { attr: &'static str },
    #[error(
        "attribute 'productKey' (\"{key}\") is not five groups of five upper-case letters or digits \
         (XXXXX-XXXXX-XXXXX-XXXXX-XXXXX)"
    )]
    InvalidProductKey { key: String },
    #[error("attribute 'locale' (\"{locale}\") is not a language tag such as \"en-US\"")]
    InvalidLocale { locale: String },
    #[error("attribute 'diskSize' ({disk_size_mib} MiB) is below the {MIN_DISK_SIZE_MIB} MiB Windows needs")]
    DiskTooSmall { disk_size_mib: u64 },
    #[error("attribute 'cygwinPackages': \"{name}\" is not a Cygwin package name (letters, digits and . _ + -)")]
    InvalidCygwinPackage { name: String },
    #[error("attribute 'installCommands': command {index} contains a NUL byte")]
    NulInInstallCommand { index: usize },
}

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

pub fn is_cygwin_package_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_gives_valid_defaults_for_client_and_server() {
        assert_eq!(WindowsOptions::new("Windows 11 Pro").validate(MIN_DISK_SIZE_MIB), Ok(()));
        assert_eq!(WindowsOptions::new("Windows Server 2022 SERVERSTANDARD").validate(65536), Ok(()));
    }

    #[test]
    fn serde_rejects_unknown_fields_and_round_trips() {
        let opts = WindowsOptions::new("Windows 10 Pro");
        let json = serde_json::to_string(&opts).expect("serializable");
        let back: WindowsOptions = serde_json::from_str(&json).expect("round trip");
        assert_eq!(back, opts);
        let with_extra = json.replacen('{', "{\"colour\":\"blue\",", 1);
        let err = serde_json::from_str::<WindowsOptions>(&with_extra).expect_err("unknown field");
        assert!(err.to_string().starts_with("unknown field `colour`"), "{err}");
    }

    fn message(opts: &WindowsOptions, disk: u64) -> String {
        opts.validate(disk).unwrap_err().to_string()
    }

    #[test]
    fn validation_messages_name_the_attribute_and_the_problem() {
        let mut opts = WindowsOptions::new("Windows 10 Pro");
        opts.product_key = Some("abcde-12345".into());
        assert_eq!(
            message(&opts, 65536),
            "attribute 'productKey' (\"abcde-12345\") is not five groups of five upper-case letters or digits \
             (XXXXX-XXXXX-XXXXX-XXXXX-XXXXX)"
        );
        let mut opts = WindowsOptions::new("Windows 10 Pro");
        opts.locale = "english".into();
        assert_eq!(message(&opts, 65536), "attribute 'locale' (\"english\") is not a language tag such as \"en-US\"");
        let opts = WindowsOptions::new("Windows 10 Pro");
        assert_eq!(message(&opts, 1024), "attribute 'diskSize' (1024 MiB) is below the 32768 MiB Windows needs");
        let mut opts = WindowsOptions::new("Windows 10 Pro");
        opts.cygwin_packages = vec!["make".into(), "gcc&calc".into()];
        assert_eq!(
            message(&opts, 65536),
            "attribute 'cygwinPackages': \"gcc&calc\" is not a Cygwin package name (letters, digits and . _ + -)"
        );
        let opts = WindowsOptions::new(" ");
        assert_eq!(opts.validate(65536), Err(WindowsOptionsError::EmptyEdition));
        let opts = WindowsOptions::new("Windows\u{7} 10");
        assert_eq!(message(&opts, 65536), "attribute 'edition' contains a control character");
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
    fn hardware_bypass_only_for_windows_11() {
        assert!(WindowsOptions::new("Windows 11 Enterprise").needs_hardware_check_bypass());
        assert!(!WindowsOptions::new("Windows 10 Pro").needs_hardware_check_bypass());
        assert!(!WindowsOptions::new("Windows Server 2025 Standard").needs_hardware_check_bypass());
    }
}
