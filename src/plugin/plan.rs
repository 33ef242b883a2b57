//! Validated specs -> the derivations the shim creates with Nix's own `derivation`.

use super::ffi::bridge::{Plan, PlannedAttr, PlannedDrv, Source};
use super::validate::{self, as_set, Attrs};
use super::value::Val;
use crate::spec::*;
use std::path::{Path, PathBuf};

pub const BUILDER_NAME: &str = "nix-winvm-builder";
/// The VM runs on an x86_64 Linux host whatever the guest is.
pub const SYSTEM: &str = "x86_64-linux";

/// Where the plugin finds the host things its derivations need.
#[derive(Debug, Clone)]
pub struct Env {
    /// The builder the derivations run: a store path already (a Nix-built package), or this
    /// checkout's, patched to load its libraries from the tools closure.
    pub builder: PathBuf,
    pub kernel_dir: PathBuf,
    /// None only for a Nix-built builder without a closure (it finds its tools on its own).
    pub tools: Option<Closure>,
}

/// The tools closure: its folders on the host and the store paths they are (content-addressed,
/// so the same in every store). scripts/tools-closure makes both halves from Debian's packages;
/// nix/package.nix records only `tools.path`, a store path of nixpkgs' programs, which need no
/// library folder of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closure {
    pub lib: Option<(PathBuf, String)>,
    pub tools_dir: PathBuf,
    pub tools_store: String,
}

/// The closure's loader: the builder's interpreter.
const LOADER: &str = "ld-linux-x86-64.so.2";

impl Closure {
    /// The closure scripts/tools-closure left in `dir`.
    pub fn read(dir: &Path) -> Result<Closure, String> {
        let missing = |what: &str| {
            format!(
                "nix-winvm: the tools closure is missing or incomplete ({}: {what}); run scripts/setup, or set NIX_WINVM_TOOLS_DIR",
                dir.display()
            )
        };
        let store_path = |file: &str, name: &str| -> Result<String, String> {
            let text = std::fs::read_to_string(dir.join(file)).map_err(|e| missing(&format!("{file}: {e}")))?;
            let path = text.trim();
            let base = path.strip_prefix("/nix/store/").unwrap_or("");
            let ok = base.len() == 33 + name.len()
                && base.ends_with(name)
                && base.as_bytes()[32] == b'-'
                && base[..32].bytes().all(|b| b.is_ascii_alphanumeric());
            if ok {
                Ok(path.to_owned())
            } else {
                Err(missing(&format!("{file} does not hold a store path named {name}")))
            }
        };
        let tools_store = store_path("tools.path", "winvm-tools")?;
        // A Nix-built closure is its own folder: it is in the store already.
        let tools_dir =
            if dir.join("winvm-tools").is_dir() { dir.join("winvm-tools") } else { PathBuf::from(&tools_store) };
        let lib = match dir.join("lib.path").exists() {
            true => Some((dir.join("winvm-tools-lib"), store_path("lib.path", "winvm-tools-lib")?)),
            false => None,
        };
        for d in lib.iter().map(|(d, _)| d).chain([&tools_dir]) {
            if !d.is_dir() {
                return Err(missing(&format!("{} is not a folder", d.display())));
            }
        }
        Ok(Closure { lib, tools_dir, tools_store })
    }
}

/// Where the plugin keeps the builders it patched: the shared cache, and the user's own for a
/// user who may not write there.
fn patched_builders_dirs() -> [PathBuf; 2] {
    let home = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    [Path::new(DEFAULT_CACHE).join("builders"), home.join("nix-winvm/builders")]
}

/// How many patched builders are kept (one per build of this project).
const KEPT_BUILDERS: usize = 4;

/// A copy of `builder` whose interpreter and RUNPATH are the closure's, so that it runs in a
/// sandbox without the host's /lib; made once per builder (its inode, size and mtime) and
/// closure.
pub fn patched_builder(builder: &Path, closure: &Closure) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let fail = |what: String| format!("nix-winvm: preparing the builder {} for the sandbox: {what}", builder.display());
    let Some((lib_dir, lib_store)) = &closure.lib else {
        return Err(fail(format!("the tools closure {} has no library folder to load it from", closure.tools_store)));
    };
    let meta = std::fs::metadata(builder).map_err(|e| fail(e.to_string()))?;
    let lib_hash = lib_store.trim_start_matches("/nix/store/").get(..12).unwrap_or("");
    let key = format!("{lib_hash}-{:x}-{:x}-{}.{}", meta.ino(), meta.size(), meta.mtime(), meta.mtime_nsec());
    // Every evaluation looks here: a made builder is found without writing anything.
    let [shared, own] = patched_builders_dirs();
    for dir in [&shared, &own] {
        let made = dir.join(&key).join(BUILDER_NAME);
        if made.is_file() {
            return Ok(made);
        }
    }
    let writable = std::fs::create_dir_all(&shared).is_ok() && tempfile::tempfile_in(&shared).is_ok();
    let root = if writable { shared } else { own };
    let out = root.join(&key).join(BUILDER_NAME);
    // The closure's patchelf, through the closure's loader: its store path need not exist yet.
    let loader = lib_dir.join(LOADER);
    let patchelf = closure.tools_dir.join("bin/patchelf");
    let dir = root.join(&key);
    std::fs::create_dir_all(&dir).map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
    // Evaluations may patch the same builder at once: each in its own file, renamed into place.
    let tmp = tempfile::Builder::new()
        .prefix(".partial")
        .tempfile_in(&dir)
        .map_err(|e| fail(format!("creating a file in {}: {e}", dir.display())))?
        .into_temp_path();
    std::fs::copy(builder, &tmp).map_err(|e| fail(format!("copying it: {e}")))?;
    let o = std::process::Command::new(&loader)
        .arg("--library-path")
        .arg(lib_dir)
        .arg(&patchelf)
        .arg("--set-interpreter")
        .arg(format!("{}/{LOADER}", lib_store))
        .arg("--set-rpath")
        .arg(lib_store)
        .arg(&tmp)
        .output()
        .map_err(|e| fail(format!("running {}: {e}", patchelf.display())))?;
    if !o.status.success() {
        return Err(fail(format!("patchelf: {}", String::from_utf8_lossy(&o.stderr).trim())));
    }
    tmp.persist(&out).map_err(|e| fail(format!("renaming into {}: {}", out.display(), e.error)))?;
    prune_builders(&root);
    Ok(out)
}

/// Keeps the newest few patched builders.
fn prune_builders(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> =
        entries.flatten().filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path()))).collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(KEPT_BUILDERS);
    for (_, dir) in dirs.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

impl Env {
    /// The builder sits next to the plugin (cargo's target dir, or the package's lib dir);
    /// `NIX_WINVM_BUILDER` and `NIX_WINVM_KERNEL_DIR` override for unusual layouts.
    pub fn discover(plugin_dir: &str) -> Result<Env, String> {
        let builder = match std::env::var_os("NIX_WINVM_BUILDER") {
            Some(p) => PathBuf::from(p),
            None => {
                let beside = Path::new(plugin_dir).join(BUILDER_NAME);
                let in_bin = Path::new(plugin_dir).join("../bin").join(BUILDER_NAME);
                if !beside.exists() && in_bin.exists() {
                    in_bin
                } else {
                    beside
                }
            }
        };
        if !builder.is_file() {
            return Err(format!(
                "nix-winvm: the builder {} does not exist; build it (cargo build --release) or set NIX_WINVM_BUILDER",
                builder.display()
            ));
        }
        let kernel_dir = match std::env::var_os("NIX_WINVM_KERNEL_DIR") {
            Some(p) => PathBuf::from(p),
            None => Path::new(DEFAULT_CACHE).join("kernel"),
        };
        // Set by hand, shipped with a Nix-built plugin (nix/package.nix), or made by scripts/setup.
        let shipped = Path::new(plugin_dir).join("../share/nix-winvm/tools");
        let tools_dir = match std::env::var_os("NIX_WINVM_TOOLS_DIR") {
            Some(p) => PathBuf::from(p),
            None if shipped.join("tools.path").is_file() => shipped,
            None => Path::new(DEFAULT_CACHE).join("tools"),
        };
        let in_store = builder.starts_with(STORE_DIR);
        let tools = match Closure::read(&tools_dir) {
            Ok(closure) => Some(closure),
            Err(_) if in_store => None,
            Err(e) => return Err(e),
        };
        let builder = match &tools {
            Some(closure) if !in_store => patched_builder(&builder, closure)?,
            _ => builder,
        };
        Ok(Env { builder, kernel_dir, tools })
    }

    fn kernel(&self, builtin: &str) -> Result<String, String> {
        if !self.kernel_dir.join("vmlinuz").is_file() {
            return Err(format!(
                "{builtin}: the Linux kernel for the VMs is missing ({}/vmlinuz); run scripts/setup or set NIX_WINVM_KERNEL_DIR",
                self.kernel_dir.display()
            ));
        }
        Ok(self.kernel_dir.display().to_string())
    }
}

fn attr(name: &str, source: Source) -> PlannedAttr {
    PlannedAttr { name: name.into(), source, text: String::new(), list: vec![], int_value: 0, path: vec![], stage: 0 }
}
pub fn text(name: &str, value: &str) -> PlannedAttr {
    PlannedAttr { text: value.into(), ..attr(name, Source::Text) }
}
pub fn list(name: &str, values: Vec<String>) -> PlannedAttr {
    PlannedAttr { list: values, ..attr(name, Source::StrList) }
}
pub fn user(name: &str, path: &[&str]) -> PlannedAttr {
    PlannedAttr { path: path.iter().map(|s| s.to_string()).collect(), ..attr(name, Source::User) }
}
pub fn stage(name: &str, index: usize) -> PlannedAttr {
    PlannedAttr { stage: index, ..attr(name, Source::Stage) }
}
pub fn host_path(name: &str, path: &str) -> PlannedAttr {
    PlannedAttr { text: path.into(), ..attr(name, Source::HostPath) }
}
pub fn cached_path(name: &str, host: &str, store: &str) -> PlannedAttr {
    PlannedAttr { text: host.into(), list: vec![store.into()], ..attr(name, Source::CachedPath) }
}

fn error_plan(msg: String) -> Plan {
    Plan { error: msg, drvs: vec![], passthru: vec![] }
}

/// Which attributes the shim must evaluate before planning. Forcing an attribute the plan only
/// passes through would make the builtin stricter than `derivation`, so those stay lazy.
pub fn force_depth(builtin: &str, key: &str) -> u32 {
    match (builtin, key) {
        ("windowsImage", _) => 3,
        (_, "windowsImage") => 3,
        (_, "image") => 1,
        ("windowsDerivation", "name" | "script" | "memory" | "cpus" | "accel" | "timeout") => 1,
        ("windowsDerivation", "builder" | "args" | "system") => 1,
        (_, "outputs" | "requiredSystemFeatures") => 2,
        ("runInWindowsVM", "args") => 2,
        ("runInWindowsVM", "name" | "timeout" | "builder") => 1,
        _ => 0,
    }
}

pub fn plan(builtin: &str, root: &Val, env: &Env) -> Plan {
    let result = match builtin {
        "windowsImage" => as_set(builtin, root).and_then(|a| plan_image_or_layer(builtin, a, &[], env)),
        "windowsDerivation" => as_set(builtin, root).and_then(|a| plan_build(builtin, a, env)),
        "runInWindowsVM" => plan_run_in_vm(builtin, root, env),
        other => Err(format!("nix-winvm: unknown builtin '{other}'")),
    };
    result.unwrap_or_else(error_plan)
}

/// `requiredSystemFeatures`, or nothing when no feature is needed (Nix treats both alike, and a
/// derivation without it reads more plainly).
fn features(accel: Accel, extra: &[String]) -> Option<PlannedAttr> {
    let mut f: Vec<String> = extra.to_vec();
    if accel == Accel::Kvm && !f.iter().any(|x| x == "kvm") {
        f.push("kvm".into());
    }
    (!f.is_empty()).then(|| list("requiredSystemFeatures", f))
}

fn base(name: &str, stage_arg: &str, env: &Env) -> Vec<PlannedAttr> {
    let mut attrs = vec![text("name", name), text("system", SYSTEM)];
    attrs.extend(runtime(env));
    attrs.push(list("args", vec![stage_arg.into()]));
    attrs
}

/// What every derivation runs with: the builder, and the tools closure it finds its programs
/// in (`winvmTools`; `winvmToolsLib` holds the libraries the builder and the tools load).
fn runtime(env: &Env) -> Vec<PlannedAttr> {
    let mut attrs = vec![host_path("builder", &env.builder.display().to_string())];
    if let Some(c) = &env.tools {
        attrs.push(cached_path("winvmTools", &c.tools_dir.display().to_string(), &c.tools_store));
        if let Some((dir, store)) = &c.lib {
            attrs.push(cached_path("winvmToolsLib", &dir.display().to_string(), store));
        }
    }
    attrs
}

/// A layer: one derivation, the `layer` stage, on the image `base` (see `builder::stages::layer`).
/// Its commands stay attributes of their own, so their string context makes the layer depend
/// on what they name; the layer carries its base's image spec, so it is an image like any.
fn plan_layer(builtin: &str, attrs: &Attrs, prefix: &[&str], env: &Env) -> Result<Plan, String> {
    let args = validate::layer_args(builtin, attrs)?;
    let spec = &args.spec;
    let guest = spec.image.guest.name();
    // A layer holds Windows as its base does.
    let restricted = if spec.image.guest.windows().is_some() { "RESTRICTDIST-" } else { "" };
    let name = match args.name {
        Some(n) if n.starts_with(restricted) => n,
        Some(n) => format!("{restricted}{n}"),
        None => format!("{restricted}winvm-{guest}-layer"),
    };
    let at = |keys: &[&'_ str]| -> Vec<String> { prefix.iter().chain(keys).map(|k| k.to_string()).collect() };
    let mut a = base(&name, "layer", env);
    a.push(text("winvmImageSpec", &to_json(&spec.image)));
    a.push(text("winvmLayerSpec", &to_json(spec)));
    a.push(PlannedAttr { path: at(&["base"]), ..user("image", &[]) });
    for i in 0..spec.commands {
        a.push(PlannedAttr { path: at(&["installCommands", &i.to_string()]), ..user(&layer_command_attr(i), &[]) });
    }
    a.extend(features(spec.image.accel, &[]));
    Ok(Plan { error: String::new(), drvs: vec![PlannedDrv { attrs: a }], passthru: vec![] })
}

/// `windowsImage`'s argument: a layer when it names a `base`, a new image otherwise.
fn plan_image_or_layer(builtin: &str, attrs: &Attrs, prefix: &[&str], env: &Env) -> Result<Plan, String> {
    if attrs.iter().any(|(k, _)| k == "base") {
        plan_layer(builtin, attrs, prefix, env)
    } else {
        plan_image(builtin, attrs, prefix, env)
    }
}

/// The three stages of an image: media -> installed disk -> suspended VM. `prefix` locates the
/// image's attributes inside the user's value (empty for `windowsImage`'s own argument).
fn plan_image(builtin: &str, attrs: &Attrs, prefix: &[&str], env: &Env) -> Result<Plan, String> {
    let spec = validate::image_spec(builtin, attrs)?;
    let spec_json = to_json(&spec);
    let kernel = env.kernel(builtin)?;
    let guest = spec.guest.name();
    // Stages holding Windows itself carry the marker binary caches use to refuse redistribution.
    let windows = spec.guest.windows();
    let restricted = if windows.is_some() { "RESTRICTDIST-" } else { "" };
    let at = |k: &'static str| -> Vec<&str> { prefix.iter().copied().chain([k]).collect() };
    let mut drvs = Vec::new();

    let mut iso_stage = None;
    if let Some(WindowsOptions { iso: IsoSource::Fixed { name, sha256 }, .. }) = windows {
        // Like nixpkgs' requireFile: the path exists once the user adds the file; otherwise the
        // builder only explains how to.
        let mut a = base(name, "require-file", env);
        a.extend([
            text("outputHashMode", "flat"),
            text("outputHashAlgo", "sha256"),
            text("outputHash", sha256),
            text("winvmRequiredName", name),
        ]);
        iso_stage = Some(drvs.len());
        drvs.push(PlannedDrv { attrs: a });
    }

    let mut media = base(&format!("winvm-{guest}-media"), "media", env);
    media.push(text("winvmImageSpec", &spec_json));
    media.push(host_path("kernel", &kernel));
    if attrs.iter().any(|(k, _)| k == "cygwinRepo") {
        media.push(user("cygwinRepo", &at("cygwinRepo")));
    }
    let media_index = drvs.len();
    drvs.push(PlannedDrv { attrs: media });

    let vm_features = features(spec.accel, &[]);
    let mut installed = base(&format!("{restricted}winvm-{guest}-installed"), "install", env);
    installed.push(text("winvmImageSpec", &spec_json));
    installed.push(stage("media", media_index));
    match (windows, iso_stage) {
        (Some(_), Some(i)) => installed.push(stage("iso", i)),
        (Some(_), None) => installed.push(user("iso", &at("iso"))),
        _ => {}
    }
    installed.extend(vm_features.clone());
    let installed_index = drvs.len();
    drvs.push(PlannedDrv { attrs: installed });

    let mut image = base(&format!("{restricted}winvm-{guest}-image"), "suspend", env);
    image.push(text("winvmImageSpec", &spec_json));
    image.push(stage("media", media_index));
    image.push(stage("installed", installed_index));
    image.extend(vm_features);
    drvs.push(PlannedDrv { attrs: image });

    let passthru = vec![stage("media", media_index), stage("installed", installed_index)];
    Ok(Plan { error: String::new(), drvs, passthru })
}

fn plan_build(builtin: &str, attrs: &Attrs, env: &Env) -> Result<Plan, String> {
    let args = validate::build_args(builtin, attrs)?;
    let mut drv =
        vec![text("system", SYSTEM), list("args", vec!["build".into()]), text("winvmBuildSpec", &to_json(&args.spec))];
    drv.extend(runtime(env));
    drv.extend(features(args.spec.image.accel, &args.extra_features));
    for (k, _) in attrs {
        if validate::BUILD_CONSUMED_ATTRS.contains(&k.as_str()) || k == "requiredSystemFeatures" {
            continue;
        }
        drv.push(user(k, &[k]));
    }
    Ok(Plan { error: String::new(), drvs: vec![PlannedDrv { attrs: drv }], passthru: vec![] })
}

/// The historic interface: a derivation in, the same derivation run inside the VM out. The
/// shim hands over the derivation's `drvAttrs`.
fn plan_run_in_vm(builtin: &str, root: &Val, env: &Env) -> Result<Plan, String> {
    let attrs = match root {
        Val::Set(a) => a,
        other => {
            return Err(format!("{builtin}: the argument must be a derivation, got {}", other.describe()));
        }
    };
    let mut drvs = Vec::new();
    let image_attr = match attrs.iter().find(|(k, _)| k == "windowsImage").map(|(_, v)| v) {
        None => {
            return Err(format!(
                "{builtin}: the derivation has no attribute 'windowsImage'; set it to builtins.windowsImage {{ ... }} or to that builtin's arguments"
            ))
        }
        Some(Val::Set(image_attrs)) => {
            let image_plan =
                plan_image_or_layer(&format!("{builtin}: windowsImage"), image_attrs, &["windowsImage"], env)?;
            drvs = image_plan.drvs;
            stage("image", drvs.len() - 1)
        }
        Some(v) => {
            validate::image_of(builtin, "windowsImage", Some(v))?;
            user("image", &["windowsImage"])
        }
    };
    let image = match image_attr.source {
        Source::Stage => {
            let json = drvs[image_attr.stage].attrs.iter().find(|a| a.name == "winvmImageSpec").map(|a| a.text.clone());
            image_spec_from_json(&json.unwrap_or_default()).map_err(|e| format!("{builtin}: {e}"))?
        }
        _ => validate::image_of(
            builtin,
            "windowsImage",
            attrs.iter().find(|(k, _)| k == "windowsImage").map(|(_, v)| v),
        )?,
    };
    let mut spec = BuildSpec { timeout_secs: image.timeout_secs, image, run_original_builder: true };
    validate::apply_build_overrides(builtin, &[], &mut spec)?;
    if let Some((_, v)) = attrs.iter().find(|(k, _)| k == "timeout") {
        let only_timeout = vec![("timeout".to_owned(), v.clone())];
        validate::apply_build_overrides(builtin, &only_timeout, &mut spec)?;
    }
    let argc = match attrs.iter().find(|(k, _)| k == "args").map(|(_, v)| v) {
        None => 0,
        Some(Val::List(items)) => items.len(),
        Some(other) => return Err(validate::type_error(builtin, "args", "a list", other)),
    };
    if !attrs.iter().any(|(k, _)| k == "builder") {
        return Err(format!("{builtin}: the derivation has no attribute 'builder'"));
    }
    let mut drv = vec![
        text("system", SYSTEM),
        list("args", vec!["build".into()]),
        text("winvmBuildSpec", &to_json(&spec)),
        user("winvmOrigBuilder", &["builder"]),
        text("winvmArgc", &argc.to_string()),
        image_attr,
    ];
    drv.extend(runtime(env));
    for i in 0..argc {
        let index = i.to_string();
        drv.push(user(&format!("winvmArg{i}"), &["args", &index]));
    }
    let extra = match attrs.iter().find(|(k, _)| k == "requiredSystemFeatures").map(|(_, v)| v) {
        None => vec![],
        Some(v) => validate::string_list(builtin, "requiredSystemFeatures", v, "a list of strings")?,
    };
    drv.extend(features(spec.image.accel, &extra));
    const OWNED: &[&str] = &["builder", "args", "system", "windowsImage", "requiredSystemFeatures", "image"];
    for (k, _) in attrs {
        if !OWNED.contains(&k.as_str()) {
            drv.push(user(k, &[k]));
        }
    }
    drvs.push(PlannedDrv { attrs: drv });
    Ok(Plan { error: String::new(), drvs, passthru: vec![] })
}
