//! Validated specs -> the derivations the shim creates with Nix's own `derivation`.

use super::error::{ArgError, AttrPath, Caller, Problem};
use super::ffi::bridge::{Plan, PlannedAttr, PlannedDrv, Source};
pub use super::inputs::{Env, StoreInput};
use super::table::{self, Builtin, Table};
use super::validate::{self, argument, Attrs};
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

/// The plan whose result is its last derivation.
fn planned(drvs: Vec<PlannedDrv>, passthru: Vec<PlannedAttr>) -> Plan {
    Plan { error: String::new(), result: drvs.len().saturating_sub(1), drvs, passthru }
}

/// The attribute of an image that names its memory stage: the RAM file builds on it map.
pub const MEMORY_ATTR: &str = "winvmMemory";
/// The attribute of a layer and of its memory stage that names its base's memory stage.
pub const BASE_MEMORY_ATTR: &str = "baseMemory";

/// The memory stage of the image that stage `image` makes: its RAM expanded where the builds
/// run (see `builder::stages::memory_stage`). Never substituted: a copy of the image carries
/// its compressed memory, and the expanded one is as large as the guest's memory.
fn memory_stage(name: &str, image: usize, env: &Env) -> PlannedDrv {
    let mut a = base(&format!("{name}-memory"), Stage::Memory.name(), env);
    a.push(stage("image", image));
    a.push(PlannedAttr { int_value: 0, ..attr("allowSubstitutes", Source::Bool) });
    PlannedDrv { attrs: a }
}

/// Adds `image`'s memory stage to `drvs` and makes the image (the stage `image`) the plan's
/// result, which names its memory stage as [`MEMORY_ATTR`].
fn with_memory(name: &str, image: usize, mut drvs: Vec<PlannedDrv>, mut passthru: Vec<PlannedAttr>, env: &Env) -> Plan {
    drvs.push(memory_stage(name, image, env));
    passthru.push(stage(MEMORY_ATTR, drvs.len() - 1));
    Plan { error: String::new(), drvs, passthru, result: image }
}

/// An image value's memory stage, when it names one (an image of this plugin's): the
/// attribute `name` of a derivation that revives it.
fn image_memory(name: &str, image: &Val, path: &[&str]) -> Option<PlannedAttr> {
    let mut at: Vec<&str> = path.to_vec();
    at.push(MEMORY_ATTR);
    matches!(image, Val::Derivation { memory: true, .. })
        .then(|| PlannedAttr { path: at.iter().map(|s| s.to_string()).collect(), ..user(name, &[]) })
}

pub fn plan(builtin: Builtin, root: &Val, env: &Env) -> Result<Plan, ArgError> {
    match builtin {
        Builtin::WindowsImage => {
            let attrs = argument(builtin, root, "a set of attributes")?;
            Ok(plan_image_or_layer(Caller::of(builtin), attrs, &[], env)?.plan)
        }
        Builtin::WindowsDerivation => plan_build(builtin, argument(builtin, root, "a set of attributes")?, env),
        Builtin::RunInWindowsVM => plan_run_in_vm(builtin, argument(builtin, root, "a derivation")?, env),
    }
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

/// The derivations of an image or a layer, and the spec of the image the last one is: what a
/// build on it revives.
struct PlannedImage {
    plan: Plan,
    spec: ImageSpec,
}

/// A layer: one derivation, the `layer` stage, on the image `base` (see `builder::stages::layer`).
/// Its commands stay attributes of their own, so their string context makes the layer depend
/// on what they name; the layer carries its base's image spec, so it is an image like any.
fn plan_layer(caller: Caller, attrs: &Attrs, prefix: &[&str], env: &Env) -> Result<PlannedImage, ArgError> {
    let args = validate::layer_args(caller, attrs)?;
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
    // The base's memory stage, as `baseMemory`: the layer's own result names its own memory
    // stage `winvmMemory`, and a derivation's value holds its attributes beside its passthru.
    let base_memory = attrs.iter().find(|(k, _)| k == "base").and_then(|(_, b)| {
        let at = at(&["base"]);
        image_memory(BASE_MEMORY_ATTR, b, &at.iter().map(String::as_str).collect::<Vec<_>>())
    });
    a.extend(base_memory.clone());
    for i in 0..spec.commands {
        a.push(PlannedAttr { path: at(&["installCommands", &i.to_string()]), ..user(&layer_command_attr(i), &[]) });
    }
    a.extend(features(spec.image.shape.accel, &[]));
    let mut drvs = vec![PlannedDrv { attrs: a }];
    let plan = if let Some(hash) = &args.pin {
        // A pinned layer stands alone, its memory flattened: a memory stage of its own.
        drvs.push(pinned(&name, &spec.image, 0, hash, env));
        with_memory(&format!("{name}-pinned"), 1, drvs, vec![], env)
    } else {
        // The layer's memory stage starts from its base's: it links to the base's RAM file, or
        // puts the layers' pages into a RAM file of its own (`builder::stages::memory_stage`).
        let mut plan = with_memory(&name, 0, drvs, vec![], env);
        let stage = plan.drvs.last_mut().expect("the memory stage");
        stage.attrs.extend(base_memory);
        plan
    };
    Ok(PlannedImage { plan, spec: args.spec.image })
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
fn plan_image_or_layer(caller: Caller, attrs: &Attrs, prefix: &[&str], env: &Env) -> Result<PlannedImage, ArgError> {
    if attrs.iter().any(|(k, _)| k == "base") {
        plan_layer(caller, attrs, prefix, env)
    } else {
        plan_image(caller, attrs, prefix, env)
    }
}

/// The three stages of an image: media -> installed disk -> suspended VM. `prefix` locates the
/// image's attributes inside the user's value (empty for `windowsImage`'s own argument).
fn plan_image(caller: Caller, attrs: &Attrs, prefix: &[&str], env: &Env) -> Result<PlannedImage, ArgError> {
    let validate::ImageArgs { spec, pin } = validate::image_args(caller, attrs)?;
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
        // builder only explains how to. `sha256` is hexadecimal, an SRI `hash` converted
        // (validate.rs), which every Nix reads with outputHashAlgo.
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
    let mut name = format!("{restricted}winvm-{guest}-image");
    if let Some(hash) = &pin {
        drvs.push(pinned(&name, &spec, drvs.len() - 1, hash, env));
        name.push_str("-pinned");
    }

    let passthru = vec![stage("media", media_index), stage("installed", installed_index)];
    let result = drvs.len() - 1;
    Ok(PlannedImage { plan: with_memory(&name, result, drvs, passthru, env), spec })
}

/// The user's attributes the table passes on (and those it does not know), each as the user's
/// own value, so that its string context survives.
fn passed_on<'a>(table: &'static Table, attrs: &'a Attrs) -> impl Iterator<Item = PlannedAttr> + 'a {
    attrs.iter().filter(move |(k, _)| table.row(k).map_or(true, |a| a.passed_on)).map(|(k, _)| user(k, &[k]))
}

fn plan_build(builtin: Builtin, attrs: &Attrs, env: &Env) -> Result<Plan, ArgError> {
    let args = validate::build_args(builtin, attrs)?;
    let mut drv = vec![
        text("system", SYSTEM),
        list("args", vec![Stage::Build.name().into()]),
        text("winvmBuildSpec", &to_json(&args.spec)),
    ];
    drv.extend(runtime(env));
    drv.extend(features(args.spec.image.shape.accel, &args.extra_features));
    drv.extend(passed_on(&table::BUILD, attrs));
    if let Some((_, image)) = attrs.iter().find(|(k, _)| k == "image") {
        drv.extend(image_memory(MEMORY_ATTR, image, &["image"]));
    }
    Ok(planned(vec![PlannedDrv { attrs: drv }], vec![]))
}

/// The historic interface: a derivation in, the same derivation run inside the VM out. The
/// shim hands over the derivation's `drvAttrs`.
fn plan_run_in_vm(builtin: Builtin, attrs: &Attrs, env: &Env) -> Result<Plan, ArgError> {
    let args = validate::Args::new(Caller::of(builtin), &table::RUN_IN_VM, attrs);
    let missing = |name: &str, hint| args.error(AttrPath::attr(name), Problem::MissingFromDerivation { hint });
    let mut drvs = Vec::new();
    let memory;
    let (image_attr, image) = match args.get("windowsImage") {
        None => {
            return Err(missing(
                "windowsImage",
                Some("set it to builtins.windowsImage { ... } or to that builtin's arguments"),
            ))
        }
        Some(Val::Set(image_attrs)) => {
            let within = Caller { builtin, within: Some("windowsImage") };
            let image = plan_image_or_layer(within, image_attrs, &["windowsImage"], env)?;
            let result = image.plan.result;
            // The image's memory stage, as its result would name it.
            memory = image.plan.passthru.iter().find(|a| a.name == MEMORY_ATTR).cloned();
            drvs = image.plan.drvs;
            (stage("image", result), image.spec)
        }
        Some(image) => {
            memory = image_memory(MEMORY_ATTR, image, &["windowsImage"]);
            (user("image", &["windowsImage"]), args.image("windowsImage")?)
        }
    };
    let spec = BuildSpec { timeout_secs: validate::build_timeout(&args, &image)?, image, run_original_builder: true };
    let argc = args.list_len("args")?;
    if !args.has("builder") {
        return Err(missing("builder", None));
    }
    let mut drv = vec![
        text("system", SYSTEM),
        list("args", vec![Stage::Build.name().into()]),
        text("winvmBuildSpec", &to_json(&spec)),
        user("winvmOrigBuilder", &["builder"]),
        text("winvmArgc", &argc.to_string()),
        image_attr,
    ];
    drv.extend(memory);
    drv.extend(runtime(env));
    for i in 0..argc {
        let index = i.to_string();
        drv.push(user(&format!("winvmArg{i}"), &["args", &index]));
    }
    let extra = args.text_list_or_empty("requiredSystemFeatures")?;
    drv.extend(features(spec.image.shape.accel, &extra));
    drv.extend(passed_on(&table::RUN_IN_VM, attrs));
    drvs.push(PlannedDrv { attrs: drv });
    Ok(planned(drvs, vec![]))
}
