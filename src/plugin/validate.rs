//! The user's Nix attributes -> typed specs, with errors that name the attribute and the
//! expected shape. Every message here is user-facing and asserted by tests.

use super::value::Val;
use crate::spec::*;

pub type Attrs = [(String, Val)];

/// The attributes of `windowsImage`, a closed set: a typo is an error, not a silent default.
pub const IMAGE_ATTRS: &[&str] = &[
    "accel",
    "cpus",
    "cygwinPackages",
    "cygwinRepo",
    "diskSize",
    "edition",
    "efi",
    "guest",
    "installCommands",
    "iso",
    "locale",
    "memory",
    "pin",
    "productKey",
    "timeout",
];
const WINDOWS_ONLY_ATTRS: &[&str] =
    &["cygwinPackages", "cygwinRepo", "edition", "installCommands", "iso", "locale", "productKey"];

/// The attributes of a layer: `windowsImage` given a `base` image.
pub const LAYER_ATTRS: &[&str] = &["base", "installCommands", "name", "pin", "timeout"];

/// `pin`: the hash of an image or a layer, which makes it a fixed-output derivation (its
/// store path then depends on its name and this hash alone). Not part of the spec: the
/// derivation the pin copies is the same with and without it, so pinning never rebuilds it.
pub fn pin(builtin: &str, attrs: &Attrs) -> Result<Option<String>, String> {
    const SHAPE: &str = "a SHA-256 hash in SRI form, \"sha256-\" and 44 characters of base64 (the first build says it: leave it as \"sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\" and take the hash Nix got)";
    let Some(v) = get(attrs, "pin") else { return Ok(None) };
    let text = string(builtin, "pin", v, SHAPE)?;
    let ok = text.strip_prefix("sha256-").is_some_and(|b64| {
        b64.len() == 44
            && b64.ends_with('=')
            && b64[..43].bytes().all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
    });
    if !ok {
        return Err(format!("{builtin}: attribute 'pin' must be {SHAPE}, got \"{text}\""));
    }
    Ok(Some(text))
}

/// A layer's validated arguments.
pub struct LayerArgs {
    pub spec: LayerSpec,
    pub name: Option<String>,
}

/// `windowsImage { base = ...; installCommands = [ ... ]; }`: the base's spec, and what the
/// layer adds. The shape is the base's and may not be given again.
pub fn layer_args(builtin: &str, attrs: &Attrs) -> Result<LayerArgs, String> {
    for (k, _) in attrs {
        if LAYER_ATTRS.contains(&k.as_str()) {
            continue;
        }
        if IMAGE_ATTRS.contains(&k.as_str()) {
            return Err(format!(
                "{builtin}: attribute '{k}' cannot be given with 'base': a layer revives its base's memory snapshot, so it keeps everything the base was made with (give '{k}' to the base)"
            ));
        }
        return Err(unknown_attr(builtin, k, LAYER_ATTRS));
    }
    let image = image_of(builtin, "base", get(attrs, "base"))?;
    let commands = match get(attrs, "installCommands") {
        None => 0,
        Some(v) => string_list(
            builtin,
            "installCommands",
            v,
            "a list of strings (commands run in order in the guest's shell)",
        )?
        .len(),
    };
    let timeout_secs = match get(attrs, "timeout") {
        None => image.timeout_secs,
        Some(v) => int_in(builtin, "timeout", v, "seconds", TIMEOUT_SECS_RANGE)? as u64,
    };
    let name = match get(attrs, "name") {
        None => None,
        Some(v) => Some(string(builtin, "name", v, "a string (the layer's derivation name)")?),
    };
    Ok(LayerArgs { spec: LayerSpec { image, timeout_secs, commands }, name })
}

/// Attributes of `windowsDerivation` that the builder owns.
pub const RESERVED_BUILD_ATTRS: &[&str] = &["builder", "args", "system"];

pub fn type_error(builtin: &str, attr: &str, expected: &str, got: &Val) -> String {
    format!("{builtin}: attribute '{attr}' must be {expected}, got {}", got.describe())
}

pub fn as_set<'a>(builtin: &str, v: &'a Val) -> Result<&'a Attrs, String> {
    match v {
        Val::Set(attrs) => Ok(attrs),
        other => Err(format!("{builtin}: the argument must be a set of attributes, got {}", other.describe())),
    }
}

fn get<'a>(attrs: &'a Attrs, key: &str) -> Option<&'a Val> {
    attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// An integer within `range`, checked before it is narrowed into the spec (the spec's own
/// check, which gives the message, runs again on the result).
fn int_in(builtin: &str, attr: &'static str, v: &Val, unit: &'static str, range: (i64, i64)) -> Result<i64, String> {
    match v {
        Val::Int(i) => check_range(attr, *i, unit, range).map(|()| *i).map_err(|e| format!("{builtin}: {e}")),
        other => Err(type_error(builtin, attr, &format!("an integer ({unit})"), other)),
    }
}

fn string(builtin: &str, attr: &str, v: &Val, expected: &str) -> Result<String, String> {
    match v {
        Val::Str { text, .. } => Ok(text.clone()),
        Val::NonUtf8Str { valid_up_to, .. } => Err(not_utf8(builtin, &format!("attribute '{attr}'"), *valid_up_to)),
        other => Err(type_error(builtin, attr, expected, other)),
    }
}

fn not_utf8(builtin: &str, what: &str, valid_up_to: usize) -> String {
    format!("{builtin}: {what} must be UTF-8 text, but byte {valid_up_to} of the string is not valid UTF-8")
}

/// A string the plan only forwards: any bytes will do.
fn any_string(builtin: &str, attr: &str, v: &Val, expected: &str) -> Result<(), String> {
    match v {
        Val::Str { .. } | Val::NonUtf8Str { .. } => Ok(()),
        other => Err(type_error(builtin, attr, expected, other)),
    }
}

fn bool_(builtin: &str, attr: &str, v: &Val) -> Result<bool, String> {
    match v {
        Val::Bool(b) => Ok(*b),
        other => Err(type_error(builtin, attr, "a Boolean", other)),
    }
}

pub fn string_list(builtin: &str, attr: &str, v: &Val, expected: &str) -> Result<Vec<String>, String> {
    let items = match v {
        Val::List(items) => items,
        other => return Err(type_error(builtin, attr, expected, other)),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Val::Str { text, .. } => Ok(text.clone()),
            Val::NonUtf8Str { valid_up_to, .. } => {
                Err(not_utf8(builtin, &format!("element {i} of attribute '{attr}'"), *valid_up_to))
            }
            other => {
                Err(format!("{builtin}: element {i} of attribute '{attr}' must be a string, got {}", other.describe()))
            }
        })
        .collect()
}

fn enum_str<T: Copy>(builtin: &str, attr: &str, v: &Val, choices: &[(&str, T)]) -> Result<T, String> {
    let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
    let expected = format!("one of {}", names.join(", "));
    match v {
        Val::Str { text, .. } => choices
            .iter()
            .find(|(n, _)| n == text)
            .map(|(_, t)| *t)
            .ok_or_else(|| format!("{builtin}: attribute '{attr}' must be {expected}, got \"{text}\"")),
        Val::NonUtf8Str { valid_up_to, .. } => Err(not_utf8(builtin, &format!("attribute '{attr}'"), *valid_up_to)),
        other => Err(type_error(builtin, attr, &expected, other)),
    }
}

/// Suggests the closest known name for a typo ("memroy" -> "memory").
pub fn unknown_attr(builtin: &str, attr: &str, known: &[&str]) -> String {
    let closest = known.iter().map(|k| (edit_distance(attr, k), *k)).filter(|(d, _)| *d <= 2).min();
    match closest {
        Some((_, k)) => format!("{builtin}: unknown attribute '{attr}'; did you mean '{k}'?"),
        None => format!("{builtin}: unknown attribute '{attr}'; known attributes: {}", known.join(", ")),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + (ca != *cb) as usize).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

pub fn image_spec(builtin: &str, attrs: &Attrs) -> Result<ImageSpec, String> {
    for (k, _) in attrs {
        if !IMAGE_ATTRS.contains(&k.as_str()) {
            return Err(unknown_attr(builtin, k, IMAGE_ATTRS));
        }
    }
    let windows = match get(attrs, "guest") {
        None => true,
        Some(v) => enum_str(builtin, "guest", v, &[("windows", true), ("standin", false)])?,
    };
    let guest = if windows {
        GuestSpec::Windows(windows_options(builtin, attrs)?)
    } else {
        if let Some((k, _)) = attrs.iter().find(|(k, _)| WINDOWS_ONLY_ATTRS.contains(&k.as_str())) {
            return Err(format!("{builtin}: attribute '{k}' applies only to guest = \"windows\""));
        }
        GuestSpec::Standin
    };
    let mut spec = ImageSpec::new(guest);
    if let Some(v) = get(attrs, "memory") {
        spec.shape.memory_mib = int_in(builtin, "memory", v, "MiB", MEMORY_MIB_RANGE)? as u32;
    }
    if let Some(v) = get(attrs, "cpus") {
        spec.shape.cpus = int_in(builtin, "cpus", v, "count", CPUS_RANGE)? as u32;
    }
    if let Some(v) = get(attrs, "accel") {
        spec.shape.accel = enum_str(builtin, "accel", v, &[("kvm", Accel::Kvm), ("tcg", Accel::Tcg)])?;
    }
    if let Some(v) = get(attrs, "timeout") {
        spec.timeout_secs = int_in(builtin, "timeout", v, "seconds", TIMEOUT_SECS_RANGE)? as u64;
    } else if windows && spec.shape.accel == Accel::Tcg {
        spec.timeout_secs = crate::spec::WINDOWS_TCG_TIMEOUT_SECS;
    }
    if let Some(v) = get(attrs, "diskSize") {
        spec.disk_size_mib = int_in(builtin, "diskSize", v, "MiB", DISK_SIZE_MIB_RANGE)? as u64;
    }
    if let Some(v) = get(attrs, "efi") {
        spec.shape.efi = bool_(builtin, "efi", v)?;
    }
    // The checks the builder repeats on the spec it reads back.
    spec.validate().map_err(|e| format!("{builtin}: {e}"))?;
    Ok(spec)
}

fn windows_options(builtin: &str, attrs: &Attrs) -> Result<WindowsOptions, String> {
    const ISO_SHAPE: &str =
        "a path to the ISO, or { name; sha256; } for one added with `nix-store --add-fixed sha256 FILE`";
    let iso = match get(attrs, "iso") {
        None => {
            return Err(format!("{builtin}: missing required attribute 'iso' for guest = \"windows\" ({ISO_SHAPE})"))
        }
        Some(Val::Path(_)) | Some(Val::Derivation { .. }) => IsoSource::Path,
        Some(Val::Str { context: true, .. }) => IsoSource::Path,
        Some(Val::Set(fields)) => {
            for (k, _) in fields {
                if k != "name" && k != "sha256" {
                    return Err(format!("{builtin}: attribute 'iso' has unknown field '{k}' ({ISO_SHAPE})"));
                }
            }
            let name = match get(fields, "name") {
                Some(v) => string(builtin, "iso.name", v, "a string (the ISO's file name)")?,
                None => return Err(format!("{builtin}: attribute 'iso' is missing field 'name' ({ISO_SHAPE})")),
            };
            let sha256 = match get(fields, "sha256") {
                Some(v) => string(builtin, "iso.sha256", v, "a string (64 hexadecimal digits)")?,
                None => return Err(format!("{builtin}: attribute 'iso' is missing field 'sha256' ({ISO_SHAPE})")),
            };
            if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "{builtin}: attribute 'iso.sha256' must be 64 hexadecimal digits, got \"{sha256}\""
                ));
            }
            if name.is_empty() || name.contains('/') {
                return Err(format!("{builtin}: attribute 'iso.name' must be a file name without '/', got \"{name}\""));
            }
            IsoSource::Fixed { name, sha256: sha256.to_ascii_lowercase() }
        }
        Some(other) => return Err(type_error(builtin, "iso", ISO_SHAPE, other)),
    };
    let edition = match get(attrs, "edition") {
        Some(v) => string(builtin, "edition", v, "a string (the image name inside install.wim, e.g. \"Windows 11 Pro\")")?,
        None => {
            return Err(format!(
                "{builtin}: missing required attribute 'edition' for guest = \"windows\" (the image name inside install.wim, e.g. \"Windows 11 Pro\")"
            ))
        }
    };
    let product_key = match get(attrs, "productKey") {
        None | Some(Val::Null) => None,
        Some(v) => Some(string(builtin, "productKey", v, "a string (XXXXX-XXXXX-XXXXX-XXXXX-XXXXX) or null")?),
    };
    let locale = match get(attrs, "locale") {
        None => DEFAULT_LOCALE.to_owned(),
        Some(v) => string(builtin, "locale", v, "a string (e.g. \"en-US\")")?,
    };
    let cygwin_packages = match get(attrs, "cygwinPackages") {
        None => vec![],
        Some(v) => string_list(builtin, "cygwinPackages", v, "a list of Cygwin package names")?,
    };
    let install_commands = match get(attrs, "installCommands") {
        None => vec![],
        Some(v) => string_list(builtin, "installCommands", v, "a list of strings (commands run once in Cygwin bash)")?,
    };
    if let Some(v) = get(attrs, "cygwinRepo") {
        match v {
            Val::Path(_) | Val::Derivation { .. } | Val::Str { context: true, .. } => {}
            other => {
                return Err(type_error(
                    builtin,
                    "cygwinRepo",
                    "a path or derivation (a local Cygwin package directory)",
                    other,
                ))
            }
        }
    }
    Ok(WindowsOptions { iso, edition, product_key, locale, cygwin_packages, install_commands })
}

/// `windowsDerivation`'s own attributes; every other attribute passes into the environment.
pub struct BuildArgs {
    pub spec: BuildSpec,
    pub extra_features: Vec<String>,
}

pub const BUILD_CONSUMED_ATTRS: &[&str] = &["memory", "cpus", "accel", "timeout"];

pub fn build_args(builtin: &str, attrs: &Attrs) -> Result<BuildArgs, String> {
    for reserved in RESERVED_BUILD_ATTRS {
        if get(attrs, reserved).is_some() {
            return Err(format!(
                "{builtin}: attribute '{reserved}' cannot be set: nix-winvm's builder runs the VM; put the build commands in 'script'"
            ));
        }
    }
    match get(attrs, "name") {
        None => return Err(format!("{builtin}: missing required attribute 'name' (a string)")),
        Some(v) => {
            string(builtin, "name", v, "a string")?;
        }
    }
    match get(attrs, "script") {
        None => {
            return Err(format!(
                "{builtin}: missing required attribute 'script' (a string: the shell script to run in the guest)"
            ))
        }
        Some(v) => {
            any_string(builtin, "script", v, "a string (the shell script to run in the guest)")?;
        }
    }
    let image = image_of(builtin, "image", get(attrs, "image"))?;
    let mut spec = BuildSpec { timeout_secs: image.timeout_secs, image, run_original_builder: false };
    apply_build_overrides(builtin, attrs, &mut spec)?;
    if let Some(v) = get(attrs, "outputs") {
        let outputs = string_list(builtin, "outputs", v, "a list of output names")?;
        if outputs.is_empty() {
            return Err(format!("{builtin}: attribute 'outputs' must not be empty"));
        }
    }
    let extra_features = match get(attrs, "requiredSystemFeatures") {
        None => vec![],
        Some(v) => string_list(builtin, "requiredSystemFeatures", v, "a list of strings")?,
    };
    Ok(BuildArgs { spec, extra_features })
}

/// A build inherits the image's shape; it may only restate it, and may change the time-out.
pub fn apply_build_overrides(builtin: &str, attrs: &Attrs, spec: &mut BuildSpec) -> Result<(), String> {
    if let Some(v) = get(attrs, "timeout") {
        spec.timeout_secs = int_in(builtin, "timeout", v, "seconds", TIMEOUT_SECS_RANGE)? as u64;
    }
    const FIXED: &str = "a VM revived from a memory snapshot keeps the shape it was saved with; build another image";
    if let Some(v) = get(attrs, "memory") {
        let m = int_in(builtin, "memory", v, "MiB", MEMORY_MIB_RANGE)? as u32;
        if m != spec.image.shape.memory_mib {
            return Err(format!(
                "{builtin}: attribute 'memory' ({m} MiB) differs from the image's ({} MiB): {FIXED}",
                spec.image.shape.memory_mib
            ));
        }
    }
    if let Some(v) = get(attrs, "cpus") {
        let c = int_in(builtin, "cpus", v, "count", CPUS_RANGE)? as u32;
        if c != spec.image.shape.cpus {
            return Err(format!(
                "{builtin}: attribute 'cpus' ({c}) differs from the image's ({}): {FIXED}",
                spec.image.shape.cpus
            ));
        }
    }
    if let Some(v) = get(attrs, "accel") {
        let a = enum_str(builtin, "accel", v, &[("kvm", Accel::Kvm), ("tcg", Accel::Tcg)])?;
        if a != spec.image.shape.accel {
            return Err(format!(
                "{builtin}: attribute 'accel' (\"{}\") differs from the image's (\"{}\"): {FIXED}",
                a.name(),
                spec.image.shape.accel.name()
            ));
        }
    }
    Ok(())
}

/// The image of a build: the result of `builtins.windowsImage`.
pub fn image_of(builtin: &str, attr: &str, v: Option<&Val>) -> Result<ImageSpec, String> {
    const SHAPE: &str = "the result of builtins.windowsImage { ... }";
    match v {
        None => Err(format!("{builtin}: missing required attribute '{attr}' ({SHAPE})")),
        Some(Val::Derivation { image_spec: Some(json) }) => image_spec_from_json(json)
            .map_err(|e| format!("{builtin}: attribute '{attr}' is not a usable nix-winvm image: {e}")),
        Some(Val::Derivation { image_spec: None }) => Err(format!(
            "{builtin}: attribute '{attr}' must be {SHAPE}, got a derivation that is not a nix-winvm image"
        )),
        Some(other) => Err(type_error(builtin, attr, SHAPE, other)),
    }
}
