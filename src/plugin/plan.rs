//! Validated specs -> the derivations the shim creates with Nix's own `derivation`.

use super::ffi::bridge::{Plan, PlannedAttr, PlannedDrv, Source};
pub use super::inputs::{Env, StoreInput};
use super::validate::{self, as_set, Attrs};
use super::value::Val;
use crate::protocol::Stage;
use crate::spec::*;

/// The VM runs on an x86_64 Linux host whatever the guest is.
pub const SYSTEM: &str = "x86_64-linux";

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
/// A store path the derivation names (see `inputs`): the shim gives it its context when the
/// store has it, copies its host copy in impure evaluation, and otherwise throws `missing()`.
pub fn store_input(name: &str, input: &StoreInput) -> PlannedAttr {
    let host = input.host.as_ref().map(|h| h.display().to_string()).unwrap_or_default();
    PlannedAttr {
        text: input.path.clone().unwrap_or_default(),
        list: vec![input.root().unwrap_or_default(), host, input.missing()],
        ..attr(name, Source::StorePath)
    }
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
    let mut attrs = vec![store_input("builder", &env.builder)];
    attrs.extend(env.tools.iter().map(|t| store_input("winvmTools", t)));
    attrs.extend(env.tools_lib.iter().map(|l| store_input("winvmToolsLib", l)));
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
    let mut a = base(&name, Stage::Layer.name(), env);
    a.push(text("winvmImageSpec", &to_json(&spec.image)));
    a.push(text("winvmLayerSpec", &to_json(spec)));
    a.push(PlannedAttr { path: at(&["base"]), ..user("image", &[]) });
    for i in 0..spec.commands {
        a.push(PlannedAttr { path: at(&["installCommands", &i.to_string()]), ..user(&layer_command_attr(i), &[]) });
    }
    a.extend(features(spec.image.shape.accel, &[]));
    let mut drvs = vec![PlannedDrv { attrs: a }];
    if let Some(hash) = validate::pin(builtin, attrs)? {
        drvs.push(pinned(&name, &spec.image, 0, &hash, env));
    }
    Ok(Plan { error: String::new(), drvs, passthru: vec![] })
}

/// A pinned image or layer: a fixed-output derivation (`pin` stage) whose output is a copy of
/// the unpinned one (the stage at `index`) that stands alone: its store path depends on its name
/// and hash alone, so no change to nix-winvm, its tools or Nix rebuilds it once it is in the
/// store; and the unpinned one is left to the store, which makes the copy again, byte for
/// byte, if the first build's hash has to be learnt.
fn pinned(name: &str, spec: &ImageSpec, index: usize, hash: &str, env: &Env) -> PlannedDrv {
    let mut a = base(&format!("{name}-pinned"), Stage::Pin.name(), env);
    a.extend([
        text("winvmImageSpec", &to_json(spec)),
        stage("image", index),
        text("outputHashMode", "recursive"),
        text("outputHashAlgo", "sha256"),
        text("outputHash", hash),
    ]);
    PlannedDrv { attrs: a }
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
        let mut a = base(name, Stage::RequireFile.name(), env);
        a.extend([
            text("outputHashMode", "flat"),
            text("outputHashAlgo", "sha256"),
            text("outputHash", sha256),
            text("winvmRequiredName", name),
        ]);
        iso_stage = Some(drvs.len());
        drvs.push(PlannedDrv { attrs: a });
    }

    let mut media = base(&format!("winvm-{guest}-media"), Stage::Media.name(), env);
    media.push(text("winvmImageSpec", &spec_json));
    media.push(store_input("kernel", &env.kernel));
    if attrs.iter().any(|(k, _)| k == "cygwinRepo") {
        media.push(user("cygwinRepo", &at("cygwinRepo")));
    }
    let media_index = drvs.len();
    drvs.push(PlannedDrv { attrs: media });

    let vm_features = features(spec.shape.accel, &[]);
    let mut installed = base(&format!("{restricted}winvm-{guest}-installed"), Stage::Install.name(), env);
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

    let mut image = base(&format!("{restricted}winvm-{guest}-image"), Stage::Suspend.name(), env);
    image.push(text("winvmImageSpec", &spec_json));
    image.push(stage("media", media_index));
    image.push(stage("installed", installed_index));
    image.extend(vm_features);
    drvs.push(PlannedDrv { attrs: image });
    if let Some(hash) = validate::pin(builtin, attrs)? {
        let name = format!("{restricted}winvm-{guest}-image");
        drvs.push(pinned(&name, &spec, drvs.len() - 1, &hash, env));
    }

    let passthru = vec![stage("media", media_index), stage("installed", installed_index)];
    Ok(Plan { error: String::new(), drvs, passthru })
}

fn plan_build(builtin: &str, attrs: &Attrs, env: &Env) -> Result<Plan, String> {
    let args = validate::build_args(builtin, attrs)?;
    let mut drv = vec![
        text("system", SYSTEM),
        list("args", vec![Stage::Build.name().into()]),
        text("winvmBuildSpec", &to_json(&args.spec)),
    ];
    drv.extend(runtime(env));
    drv.extend(features(args.spec.image.shape.accel, &args.extra_features));
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
        list("args", vec![Stage::Build.name().into()]),
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
    drv.extend(features(spec.image.shape.accel, &extra));
    const OWNED: &[&str] = &["builder", "args", "system", "windowsImage", "requiredSystemFeatures", "image"];
    for (k, _) in attrs {
        if !OWNED.contains(&k.as_str()) {
            drv.push(user(k, &[k]));
        }
    }
    drvs.push(PlannedDrv { attrs: drv });
    Ok(Plan { error: String::new(), drvs, passthru: vec![] })
}
