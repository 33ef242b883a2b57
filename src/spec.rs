//! The typed specs of an image and of a build.
//!
//! The plugin validates the user's Nix attributes into these types at evaluation time and
//! stores them as JSON in the derivation's environment (`winvmImageSpec`, `winvmBuildSpec`);
//! the builder parses the same JSON again, so a hand-edited .drv is refused the same way.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Default memory of the standin guest: a busybox system is happy with little.
pub const STANDIN_MEMORY_MIB: u32 = 256;
/// Default memory of a Windows guest: Windows 11 setup refuses less than 4 GiB without the
/// LabConfig bypass, and builds (MSVC, MinGW) want room.
pub const WINDOWS_MEMORY_MIB: u32 = 4096;
pub const STANDIN_CPUS: u32 = 1;
pub const WINDOWS_CPUS: u32 = 2;
/// Sparse qcow2, so a generous size costs nothing until written.
pub const WINDOWS_DISK_SIZE_MIB: u64 = 65536;
pub const STANDIN_DISK_SIZE_MIB: u64 = 256;
pub const DEFAULT_TIMEOUT_SECS: u64 = 3600;
pub const DEFAULT_LOCALE: &str = "en-US";
/// The store the guest sees through the `nixstore` share.
pub const STORE_DIR: &str = "/nix/store";

/// The VM network's fixed addresses (the historic design's): the guest, and the controller that
/// serves it the shares. Shell text names them `@GUEST_IP@` and `@CONTROLLER_IP@`.
pub const GUEST_IP: &str = "192.168.0.1";
pub const CONTROLLER_IP: &str = "192.168.0.2";

/// `text` with the address placeholders filled in from the constants.
pub fn with_addresses(text: &str) -> String {
    text.replace("@GUEST_IP@", GUEST_IP).replace("@CONTROLLER_IP@", CONTROLLER_IP)
}
/// Where scripts/setup puts the guest kernel (and the builder its PVH cache) on the host.
pub const DEFAULT_CACHE: &str = "/var/cache/nix-winvm";

/// Bounds that catch typos (a memory size in bytes, a timeout in milliseconds) early.
pub const MEMORY_MIB_RANGE: (i64, i64) = (64, 1 << 20);
pub const CPUS_RANGE: (i64, i64) = (1, 256);
pub const TIMEOUT_SECS_RANGE: (i64, i64) = (1, 7 * 24 * 3600);
pub const DISK_SIZE_MIB_RANGE: (i64, i64) = (64, 64 << 20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Guest {
    Windows,
    Standin,
}

impl Guest {
    pub fn name(self) -> &'static str {
        match self {
            Guest::Windows => "windows",
            Guest::Standin => "standin",
        }
    }
}

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

/// Where the Windows installation ISO comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub enum IsoSource {
    /// A path the user gave; Nix copies it into the store.
    Path,
    /// `{ name; sha256; }`: a fixed-output store path the user adds with `nix-store --add-fixed`.
    Fixed { name: String, sha256: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WindowsImageOptions {
    pub iso: IsoSource,
    pub edition: String,
    pub product_key: Option<String>,
    pub locale: String,
    pub efi: bool,
    pub cygwin_packages: Vec<String>,
    pub install_commands: Vec<String>,
}

/// Everything that decides what an image is. Two images with equal specs are interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImageSpec {
    pub guest: Guest,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: Accel,
    pub timeout_secs: u64,
    pub disk_size_mib: u64,
    pub windows: Option<WindowsImageOptions>,
}

impl ImageSpec {
    pub fn standin() -> ImageSpec {
        ImageSpec {
            guest: Guest::Standin,
            memory_mib: STANDIN_MEMORY_MIB,
            cpus: STANDIN_CPUS,
            accel: Accel::Kvm,
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            disk_size_mib: STANDIN_DISK_SIZE_MIB,
            windows: None,
        }
    }
}

/// A build revived from an image. Memory and CPUs are the image's: a memory snapshot can only
/// be revived into a VM of the same shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BuildSpec {
    pub image: ImageSpec,
    pub timeout_secs: u64,
    /// Set by `runInWindowsVM`: run the original builder with its arguments instead of `script`.
    pub run_original_builder: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecJsonError {
    pub what: &'static str,
    pub detail: String,
}

impl fmt::Display for SpecJsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} (was the derivation written by another nix-winvm version?): {}", self.what, self.detail)
    }
}

impl std::error::Error for SpecJsonError {}

pub fn image_spec_from_json(s: &str) -> Result<ImageSpec, SpecJsonError> {
    serde_json::from_str(s).map_err(|e| SpecJsonError { what: "image spec", detail: e.to_string() })
}

pub fn build_spec_from_json(s: &str) -> Result<BuildSpec, SpecJsonError> {
    serde_json::from_str(s).map_err(|e| SpecJsonError { what: "build spec", detail: e.to_string() })
}

pub fn to_json<T: Serialize>(v: &T) -> String {
    // Serializing these plain structs cannot fail; fall back to an empty object rather than panic.
    serde_json::to_string(v).unwrap_or_else(|_| "{}".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_text_gets_the_addresses_from_the_constants() {
        assert_eq!(
            with_addresses("ip addr add @GUEST_IP@/24; //@CONTROLLER_IP@/x"),
            "ip addr add 192.168.0.1/24; //192.168.0.2/x"
        );
    }

    #[test]
    fn image_spec_round_trips_and_rejects_unknown_fields() {
        let spec = ImageSpec::standin();
        let json = to_json(&spec);
        assert_eq!(image_spec_from_json(&json).unwrap(), spec);
        let bad = json.replacen('{', "{\"colour\":1,", 1);
        let err = image_spec_from_json(&bad).unwrap_err().to_string();
        assert!(err.contains("unknown field `colour`"), "{err}");
    }
}
