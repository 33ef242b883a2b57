//! The typed specs of an image and of a build.
//!
//! The plugin validates the user's Nix attributes into these types at evaluation time and
//! stores them as JSON in the derivation's environment (`winvmImageSpec`, `winvmBuildSpec`);
//! the builder parses the same JSON again, so a hand-edited .drv is refused the same way.

mod shape;
mod windows;

pub use shape::{Accel, MachineShape, MACHINE_ALIAS};
pub use windows::{WindowsOptions, WindowsOptionsError};

use serde::{Deserialize, Serialize};

/// Default memory of the standin guest: a busybox system is happy with little.
pub const STANDIN_MEMORY_MIB: u32 = 256;
/// Default memory of a Windows guest: Windows 11 setup refuses less than 4 GiB without the
/// LabConfig bypass, and builds (MSVC, MinGW) want room.
pub const WINDOWS_MEMORY_MIB: u32 = 4096;
pub const STANDIN_CPUS: u32 = 1;
pub const WINDOWS_CPUS: u32 = 2;
/// Sparse qcow2, so a generous size costs nothing until written.
pub const WINDOWS_DISK_SIZE_MIB: u64 = 65536;
/// Outputs are made on the guest's disk before they are packed: room for a few hundred MB.
pub const STANDIN_DISK_SIZE_MIB: u64 = 1024;
pub const DEFAULT_TIMEOUT_SECS: u64 = 3600;
/// The default of a Windows image under TCG, about 9 times slower than KVM: an install that
/// takes half an hour under KVM takes some 5 hours.
pub const WINDOWS_TCG_TIMEOUT_SECS: u64 = 8 * 3600;
pub const DEFAULT_LOCALE: &str = "en-US";
/// The store the guest sees through the `nixstore` share.
pub const STORE_DIR: &str = "/nix/store";

/// The VM network's fixed addresses (the historic design's): the guest, and the controller that
/// serves it the shares. Shell text names them `@GUEST_IP@` and `@CONTROLLER_IP@`.
pub const GUEST_IP: &str = "192.168.0.1";
pub const CONTROLLER_IP: &str = "192.168.0.2";
/// A test's own network (`windowsTest`): node N (from 1, in the order of their names) is
/// `TEST_NET_PREFIX.N`; the host's forwarder between the nodes answers for the others.
pub const TEST_NET_PREFIX: &str = "192.168.1";

/// The share of a controller saved ready to serve that the guest keeps mounted while the pair
/// is saved: the session (logged on) and its tree survive the save, and the build's store and
/// exchange directory appear in it as the folders [`SESSION_STORE`] and [`SESSION_XCHG`] once
/// the revived controller has mounted them. A build makes no SMB connection, session or tree.
pub const SESSION_SHARE: &str = "winvm";
pub const SESSION_STORE: &str = "store";
pub const SESSION_XCHG: &str = "xchg";

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

/// Which guest an image runs, with that guest's own options: the one place the two differ in
/// a spec. What each guest does with them is its profile (src/guest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestSpec {
    Windows(WindowsOptions),
    Standin,
}

impl GuestSpec {
    pub fn name(&self) -> &'static str {
        match self {
            GuestSpec::Windows(_) => "windows",
            GuestSpec::Standin => "standin",
        }
    }

    /// Memory, CPUs and disk size (MiB, count, MiB) when the user gives none.
    pub fn defaults(&self) -> (u32, u32, u64) {
        match self {
            GuestSpec::Windows(_) => (WINDOWS_MEMORY_MIB, WINDOWS_CPUS, WINDOWS_DISK_SIZE_MIB),
            GuestSpec::Standin => (STANDIN_MEMORY_MIB, STANDIN_CPUS, STANDIN_DISK_SIZE_MIB),
        }
    }

    pub fn windows(&self) -> Option<&WindowsOptions> {
        match self {
            GuestSpec::Windows(options) => Some(options),
            GuestSpec::Standin => None,
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

/// Everything that decides what an image is. Two images with equal specs are interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ImageSpecJson", into = "ImageSpecJson")]
pub struct ImageSpec {
    pub guest: GuestSpec,
    /// Memory, CPUs, accelerator and firmware; the machine type is [`MACHINE_ALIAS`] (the image
    /// records the versioned type its pair was saved as).
    pub shape: MachineShape,
    pub timeout_secs: u64,
    pub disk_size_mib: u64,
}

/// An [`ImageSpec`] as JSON (a derivation's `winvmImageSpec`, an image's meta.json): flat, its
/// fields in the order they have always had, so that a derivation keeps its hash and a kept
/// image its metadata.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ImageSpecJson {
    guest: GuestSpec,
    memory_mib: u32,
    cpus: u32,
    accel: Accel,
    timeout_secs: u64,
    disk_size_mib: u64,
    efi: bool,
}

impl From<ImageSpecJson> for ImageSpec {
    fn from(j: ImageSpecJson) -> ImageSpec {
        ImageSpec {
            guest: j.guest,
            shape: MachineShape::new(j.accel, j.memory_mib, j.cpus, j.efi),
            timeout_secs: j.timeout_secs,
            disk_size_mib: j.disk_size_mib,
        }
    }
}

impl From<ImageSpec> for ImageSpecJson {
    fn from(spec: ImageSpec) -> ImageSpecJson {
        let MachineShape { accel, memory_mib, cpus, efi, .. } = spec.shape;
        ImageSpecJson {
            guest: spec.guest,
            memory_mib,
            cpus,
            accel,
            timeout_secs: spec.timeout_secs,
            disk_size_mib: spec.disk_size_mib,
            efi,
        }
    }
}

impl ImageSpec {
    /// An image of `guest` with that guest's defaults.
    pub fn new(guest: GuestSpec) -> ImageSpec {
        let (memory_mib, cpus, disk_size_mib) = guest.defaults();
        ImageSpec {
            guest,
            shape: MachineShape::new(Accel::Kvm, memory_mib, cpus, false),
            timeout_secs: DEFAULT_TIMEOUT_SECS,
            disk_size_mib,
        }
    }

    #[cfg(test)]
    pub fn standin() -> ImageSpec {
        ImageSpec::new(GuestSpec::Standin)
    }

    /// The checks the plugin runs at evaluation; the builder runs them again on the spec it
    /// parses, so a hand-edited derivation is refused with the same words.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_range("memory", self.shape.memory_mib as i64, "MiB", MEMORY_MIB_RANGE)?;
        check_range("cpus", self.shape.cpus as i64, "count", CPUS_RANGE)?;
        check_range("timeout", self.timeout_secs as i64, "seconds", TIMEOUT_SECS_RANGE)?;
        check_range("diskSize", self.disk_size_mib.min(i64::MAX as u64) as i64, "MiB", DISK_SIZE_MIB_RANGE)?;
        if let GuestSpec::Windows(options) = &self.guest {
            options.validate(self.disk_size_mib)?;
        }
        Ok(())
    }
}

/// An attribute in which two image specs differ: its name as `windowsImage` takes it, and its
/// two values as JSON (strings quoted, as Nix writes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub attr: String,
    pub ours: String,
    pub theirs: String,
}

/// The attributes in which `theirs` differs from `ours`; a Windows
/// guest's options are compared one by one.
pub fn differences(ours: &ImageSpec, theirs: &ImageSpec) -> Vec<Difference> {
    let (ours, theirs) =
        (serde_json::to_value(ours).unwrap_or_default(), serde_json::to_value(theirs).unwrap_or_default());
    let mut found = Vec::new();
    compare_fields(&ours, &theirs, &mut found);
    found
}

fn compare_fields(ours: &serde_json::Value, theirs: &serde_json::Value, found: &mut Vec<Difference>) {
    let empty = serde_json::Map::new();
    let (a, b) = (ours.as_object().unwrap_or(&empty), theirs.as_object().unwrap_or(&empty));
    for (key, value) in a {
        let other = b.get(key).unwrap_or(&serde_json::Value::Null);
        if value == other {
            continue;
        }
        // Both Windows: which of its options.
        let windows = |v: &serde_json::Value| v.get("windows").filter(|w| w.is_object()).cloned();
        if let (true, Some(a), Some(b)) = (key == "guest", windows(value), windows(other)) {
            compare_fields(&a, &b, found);
            continue;
        }
        found.push(Difference { attr: attribute(key).to_owned(), ours: value.to_string(), theirs: other.to_string() });
    }
}

/// The `windowsImage` attribute of a spec's JSON field.
fn attribute(field: &str) -> &str {
    match field {
        "memoryMib" => "memory",
        "timeoutSecs" => "timeout",
        "diskSizeMib" => "diskSize",
        other => other,
    }
}

/// A spec that parsed but says something impossible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("attribute '{attr}' must be between {} and {} ({unit}), got {value}", range.0, range.1)]
    OutOfRange { attr: &'static str, value: i64, unit: &'static str, range: (i64, i64) },
    #[error(transparent)]
    Windows(#[from] WindowsOptionsError),
}

/// `value` of the attribute `attr` within `range`.
pub fn check_range(attr: &'static str, value: i64, unit: &'static str, range: (i64, i64)) -> Result<(), SpecError> {
    if (range.0..=range.1).contains(&value) {
        Ok(())
    } else {
        Err(SpecError::OutOfRange { attr, value, unit, range })
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

/// A layer: an image made from another image (`base`) by running commands in it. The shape is
/// the base's (a memory snapshot revives only into a VM of the same shape), so `image` is the
/// base's spec, and the layer is an image of that spec too: builds and further layers take it
/// as they take the base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LayerSpec {
    pub image: ImageSpec,
    /// The layer's own session (its commands), in seconds.
    pub timeout_secs: u64,
    /// How many commands: each is the derivation attribute `winvmLayerCommand<i>`, a string
    /// with its context, so a command naming a store path makes the layer depend on it.
    pub commands: usize,
}

/// The derivation attribute of a layer's command `index` (from 0).
pub fn layer_command_attr(index: usize) -> String {
    format!("winvmLayerCommand{index}")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {what} (was the derivation written by another nix-winvm version? evaluate its expression again with this one): {detail}"
)]
pub struct SpecJsonError {
    pub what: &'static str,
    pub detail: String,
}

/// Parses and validates an image spec.
pub fn image_spec_from_json(s: &str) -> Result<ImageSpec, SpecJsonError> {
    let what = "image spec";
    let spec: ImageSpec = serde_json::from_str(s).map_err(|e| SpecJsonError { what, detail: e.to_string() })?;
    spec.validate().map_err(|e| SpecJsonError { what, detail: e.to_string() })?;
    Ok(spec)
}

/// Parses and validates a build spec, its image's spec included.
pub fn build_spec_from_json(s: &str) -> Result<BuildSpec, SpecJsonError> {
    let what = "build spec";
    let spec: BuildSpec = serde_json::from_str(s).map_err(|e| SpecJsonError { what, detail: e.to_string() })?;
    spec.image.validate().map_err(|e| SpecJsonError { what, detail: e.to_string() })?;
    check_range("timeout", spec.timeout_secs as i64, "seconds", TIMEOUT_SECS_RANGE)
        .map_err(|e| SpecJsonError { what, detail: e.to_string() })?;
    Ok(spec)
}

/// Parses and validates a layer spec.
pub fn layer_spec_from_json(s: &str) -> Result<LayerSpec, SpecJsonError> {
    let what = "layer spec";
    let spec: LayerSpec = serde_json::from_str(s).map_err(|e| SpecJsonError { what, detail: e.to_string() })?;
    spec.image.validate().map_err(|e| SpecJsonError { what, detail: e.to_string() })?;
    check_range("timeout", spec.timeout_secs as i64, "seconds", TIMEOUT_SECS_RANGE)
        .map_err(|e| SpecJsonError { what, detail: e.to_string() })?;
    Ok(spec)
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

    /// The JSON is a derivation's attribute and part of every kept image's meta.json: the
    /// shape inside the spec leaves it as it was, field for field and in order.
    #[test]
    fn an_image_spec_keeps_its_json() {
        let json = r#"{"guest":"standin","memoryMib":256,"cpus":1,"accel":"kvm","timeoutSecs":3600,"diskSizeMib":1024,"efi":false}"#;
        assert_eq!(to_json(&ImageSpec::standin()), json);
        let spec = image_spec_from_json(&json.replace("256", "512").replace("false", "true")).unwrap();
        assert_eq!(spec.shape, MachineShape::new(Accel::Kvm, 512, 1, true));
        assert_eq!(spec.shape.machine_type, MACHINE_ALIAS);
        let missing = image_spec_from_json(&json.replace(r#","efi":false"#, "")).unwrap_err().to_string();
        assert!(missing.contains("missing field `efi`"), "{missing}");
    }

    #[test]
    fn a_parsed_spec_is_validated_like_the_plugins() {
        let mut spec = ImageSpec::new(GuestSpec::Windows(WindowsOptions::new("Windows 11 Pro")));
        spec.disk_size_mib = 1024;
        assert_eq!(
            image_spec_from_json(&to_json(&spec)).unwrap_err().to_string(),
            "invalid image spec (was the derivation written by another nix-winvm version? evaluate its expression again \
             with this one): \
             attribute 'diskSize' (1024 MiB) is below the 32768 MiB Windows needs"
        );
        let mut spec = ImageSpec::standin();
        spec.shape.memory_mib = 3;
        let build = BuildSpec { image: spec, timeout_secs: 5, run_original_builder: false };
        assert_eq!(
            build_spec_from_json(&to_json(&build)).unwrap_err().detail,
            "attribute 'memory' must be between 64 and 1048576 (MiB), got 3"
        );
    }

    #[test]
    fn two_specs_differ_in_the_attributes_the_user_wrote() {
        let ours = ImageSpec::new(GuestSpec::Windows(WindowsOptions::new("Windows 11 Pro")));
        assert_eq!(differences(&ours, &ours), vec![]);
        let mut theirs = ours.clone();
        theirs.shape.memory_mib = 8192;
        theirs.timeout_secs = 60;
        if let GuestSpec::Windows(options) = &mut theirs.guest {
            options.edition = "Windows 11 Home".into();
        }
        let found: Vec<String> =
            differences(&ours, &theirs).iter().map(|d| format!("{} {} {}", d.attr, d.ours, d.theirs)).collect();
        assert_eq!(found, ["edition \"Windows 11 Pro\" \"Windows 11 Home\"", "memory 4096 8192", "timeout 3600 60"]);
        let standin = differences(&ImageSpec::standin(), &ours);
        let guest = standin.iter().find(|d| d.attr == "guest").expect("the guest differs");
        assert_eq!(guest.ours, "\"standin\"");
    }

    #[test]
    fn the_guest_and_its_options_are_one_value() {
        let windows = ImageSpec::new(GuestSpec::Windows(WindowsOptions::new("Windows 11 Pro")));
        let json = to_json(&windows);
        assert!(json.starts_with(r#"{"guest":{"windows":{"iso":"path","edition":"Windows 11 Pro","#), "{json}");
        assert_eq!(image_spec_from_json(&json).unwrap(), windows);
        assert_eq!(to_json(&ImageSpec::standin().guest), r#""standin""#);
        assert_eq!((windows.shape.memory_mib, windows.disk_size_mib), (WINDOWS_MEMORY_MIB, WINDOWS_DISK_SIZE_MIB));
    }
}
