//! Planner unit tests and a property test: no argument, however malformed, makes the planner
//! panic (a panic would cross the FFI into the user's `nix`).

use super::error::Caller;
use super::ffi::bridge::{Kind, Node, Plan, Source};
use super::inputs::{self, Env, SetUp, StoreInput};
use super::plan;
use super::table::Builtin;
use super::value::{from_nodes, to_nodes, DecodeError, Val};
use proptest::prelude::*;
use std::path::Path;

/// What the shim gets: the plan, or its error rendered.
fn planned(builtin: &str, v: &Val, env: &Env) -> Plan {
    let builtin = Builtin::from_name(builtin).expect("a builtin");
    super::rendered(plan::plan(builtin, v, env).map_err(Into::into))
}

fn env() -> (tempfile::TempDir, Env) {
    let dir = tempfile::tempdir().unwrap();
    let input = |what, path: Option<String>, host: &str| StoreInput {
        what,
        path,
        host: Some(dir.path().join(host)),
        fix: "run scripts/register".into(),
    };
    let env = Env {
        builder: input("the builder", None, "nix-winvm-builder"),
        tools: Some(input(
            "the tools closure",
            Some(format!("/nix/store/{}-winvm-tools", "b".repeat(32))),
            "winvm-tools",
        )),
        tools_lib: Some(input(
            "the tools closure's libraries",
            Some(format!("/nix/store/{}-winvm-tools-lib", "a".repeat(32))),
            "winvm-tools-lib",
        )),
        kernel: input("the VMs' kernel", None, "kernel"),
    };
    (dir, env)
}

#[test]
fn every_derivation_names_the_tools_closure_by_its_store_path() {
    let (_d, env) = env();
    let image = planned("windowsImage", &set(&[("guest", s("standin")), ("accel", s("tcg"))]), &env);
    let build = planned(
        "windowsDerivation",
        &set(&[
            ("name", s("t")),
            ("script", s("")),
            ("image", Val::Derivation { image_spec: Some(plan_spec(&image)), memory: false }),
        ]),
        &env,
    );
    assert_eq!(build.error, "");
    for drv in image.drvs.iter().chain(&build.drvs) {
        let tools = drv.attrs.iter().find(|a| a.name == "winvmTools").expect("winvmTools");
        assert_eq!(tools.source, Source::StorePath);
        let store = format!("/nix/store/{}-winvm-tools", "b".repeat(32));
        assert_eq!(tools.text, store);
        assert_eq!(tools.list[0], store);
        assert!(tools.list[1].ends_with("/winvm-tools"), "{:?}", tools.list);
        assert!(drv.attrs.iter().any(|a| a.name == "winvmToolsLib" && a.source == Source::StorePath));
        let builder = drv.attrs.iter().find(|a| a.name == "builder").expect("builder");
        assert_eq!((builder.source, builder.text.as_str(), builder.list[0].as_str()), (Source::StorePath, "", ""));
    }
}

/// The record a package or scripts/register writes: store paths (a file inside one too), with
/// or without host copies; a builder rebuilt since makes it stale; a path outside the store is
/// refused by name.
#[test]
fn the_record_of_store_paths_is_read_checked_and_seen_stale() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(inputs::RECORD);
    let hash = "0".repeat(32);
    let record = |builder_source: &str| {
        format!(
            r#"{{"builder": {{"path": "/nix/store/{hash}-nix-winvm-builder-0.1.0/bin/nix-winvm-builder"}},
                "tools": {{"path": "/nix/store/{hash}-winvm-tools", "host": "/var/cache/nix-winvm/tools/winvm-tools"}},
                "kernel": {{"path": "/nix/store/{hash}-winvm-kernel"}}{builder_source}}}"#
        )
    };
    std::fs::write(&file, record("")).unwrap();
    let env = Env::recorded(&file, dir.path()).unwrap().expect("a current record");
    assert_eq!(env.builder.root().unwrap(), format!("/nix/store/{hash}-nix-winvm-builder-0.1.0"));
    assert_eq!(
        env.builder.path.as_deref().unwrap(),
        format!("/nix/store/{hash}-nix-winvm-builder-0.1.0/bin/nix-winvm-builder")
    );
    assert_eq!(env.tools_lib, None);
    assert_eq!(env.kernel.root().unwrap(), format!("/nix/store/{hash}-winvm-kernel"));
    let builder = dir.path().join("nix-winvm-builder");
    std::fs::write(&builder, b"one").unwrap();
    let key = inputs::source_key(&builder).unwrap();
    std::fs::write(&file, record(&format!(r#", "builderSource": "{key}""#))).unwrap();
    assert!(Env::recorded(&file, dir.path()).unwrap().is_some());
    std::fs::write(&builder, b"rebuilt").unwrap();
    assert!(Env::recorded(&file, dir.path()).unwrap().is_none(), "a rebuilt builder makes the record stale");
    std::fs::write(&file, record("").replace(&format!("/nix/store/{hash}-winvm-kernel"), "/opt/kernel")).unwrap();
    assert_eq!(
        Env::recorded(&file, dir.path()).unwrap_err().to_string(),
        format!("nix-winvm: the record of store paths {} names the VMs' kernel as /opt/kernel, which is not a path in /nix/store", file.display())
    );
    std::fs::write(&file, "{\"builder\": 1}").unwrap();
    let err = Env::recorded(&file, dir.path()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("nix-winvm: the record of store paths {} is not valid: ", file.display())),
        "{err}"
    );
}

/// What a pure evaluation says when it cannot name a path: one sentence with the way back.
#[test]
fn a_path_the_store_lacks_is_refused_with_the_way_to_put_it_back() {
    let hash = "0".repeat(32);
    let input = |path: Option<String>, host: Option<&str>| StoreInput {
        what: "the tools closure",
        path,
        host: host.map(Into::into),
        fix: "run scripts/register /p to put it in the store and record it beside the plugin".into(),
    };
    let tools = format!("/nix/store/{hash}-winvm-tools");
    assert_eq!(
        input(Some(tools.clone()), Some("/c/winvm-tools")).missing(),
        format!("nix-winvm: the tools closure {tools} is not in this Nix store, and pure evaluation may not copy it from /c/winvm-tools; run scripts/register /p to put it in the store and record it beside the plugin")
    );
    assert_eq!(
        input(Some(format!("{tools}/bin/x")), None).missing(),
        format!("nix-winvm: the tools closure {tools} is not in this Nix store; it is part of the plugin's package, so copy the package's closure into this store (nix copy) or install the package again")
    );
    assert_eq!(
        input(None, Some("/c/b")).missing(),
        "nix-winvm: the tools closure is known only as the host path /c/b, which pure evaluation may not read; run scripts/register /p to put it in the store and record it beside the plugin"
    );
}

fn plan_spec(p: &super::ffi::bridge::Plan) -> String {
    p.drvs[2].attrs.iter().find(|a| a.name == "winvmImageSpec").unwrap().text.clone()
}

#[test]
fn a_missing_or_garbled_closure_is_refused_with_the_way_to_make_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = inputs::Closure::read(dir.path(), SetUp::Debian).unwrap_err().to_string();
    assert!(err.starts_with("nix-winvm: the tools closure is missing or incomplete ("), "{err}");
    assert!(err.ends_with("run scripts/setup, or set NIX_WINVM_TOOLS_DIR"), "{err}");
    // scripts/setup exists only on Debian: elsewhere, the variable or the Nix package.
    let err = inputs::Closure::read(dir.path(), SetUp::Other).unwrap_err().to_string();
    assert!(!err.contains("scripts/setup"), "{err}");
    assert!(err.ends_with("(on NixOS: `nix-winvm.enable = true;`, nix/module.nix)"), "{err}");
    std::fs::write(dir.path().join("tools.path"), format!("/nix/store/{}-winvm-tools\n", "d".repeat(32))).unwrap();
    std::fs::create_dir(dir.path().join("winvm-tools")).unwrap();
    std::fs::write(dir.path().join("lib.path"), "/tmp/elsewhere\n").unwrap();
    let err = inputs::Closure::read(dir.path(), SetUp::Debian).unwrap_err().to_string();
    assert!(err.contains("lib.path does not hold a store path named winvm-tools-lib"), "{err}");
    std::fs::write(dir.path().join("lib.path"), format!("/nix/store/{}-winvm-tools-lib\n", "c".repeat(32))).unwrap();
    std::fs::create_dir(dir.path().join("winvm-tools-lib")).unwrap();
    let closure = inputs::Closure::read(dir.path(), SetUp::Debian).unwrap();
    assert_eq!(closure.tools_store, format!("/nix/store/{}-winvm-tools", "d".repeat(32)));
    assert_eq!(
        closure.lib,
        (dir.path().join("winvm-tools-lib"), format!("/nix/store/{}-winvm-tools-lib", "c".repeat(32)))
    );
}

fn s(text: &str) -> Val {
    Val::Str { text: text.into(), context: false }
}

fn set(attrs: &[(&str, Val)]) -> Val {
    Val::Set(attrs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
}

#[test]
fn nodes_round_trip() {
    let v = set(&[
        ("a", Val::List(vec![Val::Int(1), s("x"), Val::Null, set(&[("deep", Val::Bool(true))])])),
        ("b", Val::Derivation { image_spec: Some("{}".into()), memory: false }),
        ("c", Val::Path("/p".into())),
        ("d", Val::Float(1.5)),
        ("e", Val::Unforced),
    ]);
    assert_eq!(from_nodes(&to_nodes(&v)).unwrap(), v);
}

#[test]
fn malformed_nodes_are_errors() {
    let mut nodes = to_nodes(&set(&[("a", Val::Int(1))]));
    nodes[0].count = 5;
    assert_eq!(from_nodes(&nodes).unwrap_err(), DecodeError::Malformed("child range out of order".into()));
    nodes[0].count = 1;
    nodes[0].first = 0; // a set that contains itself
    assert_eq!(from_nodes(&nodes).unwrap_err(), DecodeError::Malformed("child range out of order".into()));
    assert_eq!(from_nodes(&[]).unwrap_err(), DecodeError::Malformed("the shim passed no value".into()));
}

#[test]
fn standin_image_plan_has_three_stages_and_passthru() {
    let (_d, env) = env();
    let p = planned("windowsImage", &set(&[("guest", s("standin")), ("accel", s("tcg"))]), &env);
    assert_eq!(p.error, "");
    let names: Vec<String> =
        p.drvs.iter().map(|d| d.attrs.iter().find(|a| a.name == "name").unwrap().text.clone()).collect();
    assert_eq!(
        names,
        ["winvm-standin-media", "winvm-standin-installed", "winvm-standin-image", "winvm-standin-image-memory"]
    );
    // The result is the image; its memory stage, made from it, is never substituted.
    assert_eq!(p.result, 2);
    let memory = &p.drvs[3].attrs;
    let get = |n: &str| memory.iter().find(|a| a.name == n).unwrap_or_else(|| panic!("no {n}"));
    assert_eq!(get("args").list, ["memory"]);
    assert_eq!((get("image").source, get("image").stage), (Source::Stage, 2));
    assert_eq!((get("allowSubstitutes").source, get("allowSubstitutes").int_value), (Source::Bool, 0));
    let installed = &p.drvs[1];
    let media_ref = installed.attrs.iter().find(|a| a.name == "media").unwrap();
    assert_eq!((media_ref.source, media_ref.stage), (Source::Stage, 0));
    assert!(!installed.attrs.iter().any(|a| a.name == "requiredSystemFeatures"));
    let passthru: Vec<(&str, usize)> = p.passthru.iter().map(|a| (a.name.as_str(), a.stage)).collect();
    assert_eq!(passthru, [("media", 0), ("installed", 1), ("winvmMemory", 3)]);
    // A build on an image that names its memory stage maps it; on one that does not, the
    // builder expands the memory itself.
    for (memory, named) in [(true, true), (false, false)] {
        let image =
            Val::Derivation { image_spec: Some(crate::spec::to_json(&crate::spec::ImageSpec::standin())), memory };
        let b = planned("windowsDerivation", &set(&[("name", s("b")), ("image", image), ("script", s("x"))]), &env);
        assert_eq!(b.error, "");
        let m = b.drvs[0].attrs.iter().find(|a| a.name == "winvmMemory");
        assert_eq!(
            m.map(|a| (a.source, a.path.clone())),
            named.then(|| (Source::User, vec!["image".into(), "winvmMemory".into()]))
        );
    }
    assert_eq!(super::plan::MEMORY_ATTR, crate::builder::image::MEMORY_VAR);
    assert_eq!(super::plan::BASE_MEMORY_ATTR, crate::builder::image::BASE_MEMORY_VAR);
}

#[test]
fn missing_kernel_is_an_error_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let builder = dir.path().join("nix-winvm-builder");
    std::fs::write(&builder, b"").unwrap();
    let err = Env::discovered_at(dir.path(), &builder, Path::new("/nonexistent"), dir.path()).unwrap_err();
    let fix = if Path::new("/etc/debian_version").is_file() {
        "run scripts/setup or set NIX_WINVM_KERNEL_DIR"
    } else {
        "set NIX_WINVM_KERNEL_DIR to a folder with vmlinuz, modules/ and version (nix/package.nix's winvmKernel), \
         or use the Nix package of nix-winvm, which records its own (on NixOS: `nix-winvm.enable = true;`, nix/module.nix)"
    };
    assert_eq!(
        err.to_string(),
        format!("nix-winvm: the Linux kernel for the VMs is missing (/nonexistent/vmlinuz); {fix}")
    );
    // A plugin in the store is the Nix package's, even on Debian: scripts/setup is not its way.
    let store = Path::new("/nix/store/00000000000000000000000000000000-nix-winvm/lib");
    assert_eq!(SetUp::of(store), SetUp::Other);
}

#[test]
fn build_forwards_unknown_attributes_by_reference() {
    let (_d, env) = env();
    let image = planned("windowsImage", &set(&[("guest", s("standin"))]), &env);
    let json = image.drvs[2].attrs.iter().find(|a| a.name == "winvmImageSpec").unwrap().text.clone();
    let args = set(&[
        ("name", s("t")),
        ("image", Val::Derivation { image_spec: Some(json), memory: false }),
        ("script", Val::Str { text: "x".into(), context: true }),
        ("FOO", Val::Unforced),
        ("timeout", Val::Int(5)),
    ]);
    let p = planned("windowsDerivation", &args, &env);
    assert_eq!(p.error, "");
    let attrs = &p.drvs[0].attrs;
    for key in ["name", "image", "script", "FOO"] {
        let a = attrs.iter().find(|a| a.name == key).unwrap_or_else(|| panic!("{key} not forwarded"));
        assert_eq!((a.source, a.path.clone()), (Source::User, vec![key.to_string()]));
    }
    assert!(!attrs.iter().any(|a| a.name == "timeout"));
    let features = attrs.iter().find(|a| a.name == "requiredSystemFeatures").unwrap();
    assert_eq!(features.list, ["kvm"]);
}

/// The shim forces what the plan reads, as deep as it reads it, and nothing it passes on.
#[test]
fn force_depth_keeps_pass_through_attributes_lazy() {
    let depth = |b: &str, k: &str| super::force_depth(b, k.as_bytes());
    assert_eq!(depth("windowsDerivation", "src"), 0);
    assert_eq!(depth("windowsDerivation", "script"), 1);
    assert_eq!(depth("windowsDerivation", "outputs"), 2);
    assert_eq!(depth("windowsImage", "memory"), 1);
    assert_eq!(depth("windowsImage", "iso"), 2, "the set form's fields");
    assert_eq!(depth("windowsImage", "installCommands"), 2);
    assert_eq!(depth("windowsImage", "anything"), 0, "an unknown attribute is an error by its name alone");
    assert_eq!(depth("runInWindowsVM", "windowsImage"), 3, "an image's arguments, one level down");
    assert_eq!(depth("runInWindowsVM", "args"), 2);
    assert_eq!(depth("runInWindowsVM", "HELLO"), 0);
    assert_eq!(depth("notABuiltin", "memory"), 0);
}

fn arb_val() -> impl Strategy<Value = Val> {
    let leaf = prop_oneof![
        Just(Val::Null),
        any::<bool>().prop_map(Val::Bool),
        any::<i64>().prop_map(Val::Int),
        any::<f64>().prop_map(Val::Float),
        ("[a-z\"{}]{0,12}", any::<bool>()).prop_map(|(text, context)| Val::Str { text, context }),
        (0usize..20, any::<bool>()).prop_map(|(valid_up_to, context)| Val::NonUtf8Str { valid_up_to, context }),
        "/[a-z]{0,8}".prop_map(Val::Path),
        Just(Val::Function),
        Just(Val::Unforced),
        proptest::option::of("\\PC{0,40}").prop_map(|image_spec| Val::Derivation { image_spec, memory: false }),
        // A real image spec now and then, so that deeper validation is reached.
        Just(Val::Derivation {
            image_spec: Some(crate::spec::to_json(&crate::spec::ImageSpec::standin())),
            memory: false
        }),
    ];
    let keys = prop_oneof![
        Just("guest".to_string()),
        Just("memory".to_string()),
        Just("cpus".to_string()),
        Just("accel".to_string()),
        Just("timeout".to_string()),
        Just("iso".to_string()),
        Just("edition".to_string()),
        Just("name".to_string()),
        Just("script".to_string()),
        Just("image".to_string()),
        Just("outputs".to_string()),
        Just("windowsImage".to_string()),
        Just("args".to_string()),
        Just("builder".to_string()),
        Just("sha256".to_string()),
        Just("hash".to_string()),
        "[a-zA-Z]{1,6}",
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Val::List),
            proptest::collection::vec((keys.clone(), inner), 0..8).prop_map(Val::Set),
        ]
    })
}

#[test]
fn strings_that_are_not_utf8_are_forwarded_or_named() {
    let (_d, env) = env();
    let image =
        Val::Derivation { image_spec: Some(crate::spec::to_json(&crate::spec::ImageSpec::standin())), memory: false };
    let bad = Val::NonUtf8Str { valid_up_to: 3, context: false };
    let build = |extra: Vec<(&str, Val)>| {
        let mut attrs =
            vec![("name".to_string(), s("x")), ("image".to_string(), image.clone()), ("script".to_string(), s("true"))];
        for (k, v) in extra {
            attrs.retain(|(n, _)| n != k);
            attrs.push((k.to_string(), v));
        }
        planned("windowsDerivation", &Val::Set(attrs), &env)
    };
    // The script and environment attributes are forwarded as the user's own values.
    assert_eq!(build(vec![("script", bad.clone()), ("FOO", bad.clone())]).error, "");
    assert_eq!(
        build(vec![("name", bad.clone())]).error,
        "windowsDerivation: attribute 'name' must be UTF-8 text, but byte 3 of the string is not valid UTF-8"
    );
    let image = Val::Set(vec![("guest".into(), s("standin")), ("accel".into(), bad)]);
    assert_eq!(
        planned("windowsImage", &image, &env).error,
        "windowsImage: attribute 'accel' must be UTF-8 text, but byte 3 of the string is not valid UTF-8"
    );
}

#[test]
fn attribute_names_that_are_not_utf8_are_named() {
    let mut nodes = to_nodes(&Val::Set(vec![("ok".into(), Val::Set(vec![("k".into(), Val::Null)]))]));
    nodes[2].key = vec![b'a', 0xff];
    let e = from_nodes(&nodes).unwrap_err();
    assert_eq!(e.message("windowsImage"), "windowsImage: attribute name 'a\u{fffd}' in 'ok' is not valid UTF-8");
}

proptest! {
    #[test]
    fn planning_never_panics(v in arb_val(), builtin in prop_oneof![Just("windowsImage"), Just("windowsDerivation"), Just("runInWindowsVM")]) {
        let (_d, env) = env();
        let p = planned(builtin, &v, &env);
        // Either an error naming the builtin, or derivations whose stage references point backwards.
        if p.error.is_empty() {
            prop_assert!(!p.drvs.is_empty());
            for (i, d) in p.drvs.iter().enumerate() {
                for a in &d.attrs {
                    if a.source == Source::Stage { prop_assert!(a.stage < i); }
                }
            }
        } else {
            prop_assert!(p.error.starts_with(builtin), "{}", p.error);
        }
    }

    #[test]
    fn corrupt_node_arrays_never_panic(raw in proptest::collection::vec((0u8..13, 0usize..12, 0usize..5, any::<i64>()), 0..12)) {
        let kinds = [Kind::Null, Kind::Bool, Kind::Int, Kind::Float, Kind::Str, Kind::Path, Kind::Set,
                     Kind::List, Kind::Function, Kind::Derivation, Kind::Unforced, Kind::External, Kind::Set];
        let nodes: Vec<Node> = raw.iter().map(|(k, first, count, i)| Node {
            kind: kinds[*k as usize], key: vec![], text: vec![], int_value: *i,
            float_value: 0.0, context: false, first: *first, count: *count,
        }).collect();
        let _ = from_nodes(&nodes);
    }
}

#[test]
fn a_windows_image_under_tcg_gets_a_longer_default_timeout() {
    let image_spec =
        |attrs: &[(String, Val)]| super::validate::image_args(Caller::of(Builtin::WindowsImage), attrs).map(|a| a.spec);
    let attrs = |extra: &[(&str, Val)]| -> Vec<(String, Val)> {
        let mut a = vec![("iso".to_owned(), Val::Path("/w.iso".into())), ("edition".to_owned(), s("Windows 11 Pro"))];
        a.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        a
    };
    let kvm = image_spec(&attrs(&[])).unwrap();
    assert_eq!(kvm.timeout_secs, crate::spec::DEFAULT_TIMEOUT_SECS);
    let tcg = image_spec(&attrs(&[("accel", s("tcg"))])).unwrap();
    assert_eq!(tcg.timeout_secs, 8 * 3600);
    let given = image_spec(&attrs(&[("accel", s("tcg")), ("timeout", Val::Int(60))])).unwrap();
    assert_eq!(given.timeout_secs, 60, "a timeout given is kept");
    let standin = image_spec(&[("guest".into(), s("standin")), ("accel".into(), s("tcg"))]).unwrap();
    assert_eq!(standin.timeout_secs, crate::spec::DEFAULT_TIMEOUT_SECS);
}

fn standin_image_val() -> Val {
    Val::Derivation { image_spec: Some(crate::spec::to_json(&crate::spec::ImageSpec::standin())), memory: false }
}

#[test]
fn a_layer_is_one_derivation_carrying_its_bases_spec_and_each_command_as_an_attribute() {
    let (_d, env) = env();
    let cmds = Val::List(vec![s("echo one"), Val::Str { text: "cp /nix/store/x-y /opt".into(), context: true }]);
    let p = planned("windowsImage", &set(&[("base", standin_image_val()), ("installCommands", cmds.clone())]), &env);
    assert_eq!(p.error, "");
    // The layer, then its memory stage; the layer is the result and names the stage.
    assert_eq!((p.drvs.len(), p.result), (2, 0));
    assert_eq!(p.drvs[1].attrs.iter().find(|a| a.name == "args").unwrap().list, ["memory"]);
    assert_eq!(p.passthru.iter().map(|a| (a.name.as_str(), a.stage)).collect::<Vec<_>>(), [("winvmMemory", 1)]);
    // On a base that names its memory stage, the layer's session and its memory stage start
    // from the base's.
    let base =
        Val::Derivation { image_spec: Some(crate::spec::to_json(&crate::spec::ImageSpec::standin())), memory: true };
    let q = planned("windowsImage", &set(&[("base", base), ("installCommands", cmds)]), &env);
    let named = |d: usize, n: &str| q.drvs[d].attrs.iter().find(|a| a.name == n).map(|a| a.path.clone());
    let base_memory = Some(vec!["base".to_owned(), "winvmMemory".to_owned()]);
    assert_eq!((named(0, "baseMemory"), named(1, "baseMemory")), (base_memory.clone(), base_memory));
    // The layer's own attributes hold no `winvmMemory`: its value names its own memory stage so.
    assert!(named(0, "winvmMemory").is_none());
    let attrs = &p.drvs[0].attrs;
    let get = |n: &str| attrs.iter().find(|a| a.name == n).unwrap_or_else(|| panic!("no {n}"));
    assert_eq!(get("name").text, "winvm-standin-layer");
    assert_eq!(get("args").list, ["layer"]);
    assert_eq!(get("winvmImageSpec").text, crate::spec::to_json(&crate::spec::ImageSpec::standin()));
    let layer = crate::spec::layer_spec_from_json(&get("winvmLayerSpec").text).unwrap();
    assert_eq!((layer.commands, layer.timeout_secs), (2, crate::spec::DEFAULT_TIMEOUT_SECS));
    // Passed through from the user's value, so that Nix keeps each command's context.
    assert_eq!((get("image").source, get("image").path.clone()), (Source::User, vec!["base".to_owned()]));
    for i in 0..2 {
        let c = get(&format!("winvmLayerCommand{i}"));
        assert_eq!((c.source, c.path.clone()), (Source::User, vec!["installCommands".to_owned(), i.to_string()]));
    }
    // kvm by default, as the base's accelerator says.
    assert_eq!(get("requiredSystemFeatures").list, ["kvm"]);
}

#[test]
fn a_layer_refuses_the_shape_and_a_base_that_is_not_an_image() {
    let (_d, env) = env();
    let plan_err = |attrs: &[(&str, Val)]| planned("windowsImage", &set(attrs), &env).error;
    assert_eq!(
        plan_err(&[("base", standin_image_val()), ("memory", Val::Int(512))]),
        "windowsImage: attribute 'memory' cannot be given with 'base': a layer revives its base's memory snapshot, so it keeps everything the base was made with (give 'memory' to the base)"
    );
    assert_eq!(
        plan_err(&[("base", standin_image_val()), ("instalCommands", Val::List(vec![]))]),
        "windowsImage: unknown attribute 'instalCommands'; did you mean 'installCommands'?"
    );
    assert_eq!(
        plan_err(&[("base", Val::Derivation { image_spec: None, memory: false })]),
        "windowsImage: attribute 'base' must be the result of builtins.windowsImage { ... }, got a derivation that is not a nix-winvm image"
    );
    assert_eq!(
        plan_err(&[("base", standin_image_val()), ("installCommands", s("echo"))]),
        "windowsImage: attribute 'installCommands' must be a list of strings (commands run in order in the guest's shell), got a string"
    );
    assert_eq!(
        plan_err(&[("base", standin_image_val()), ("timeout", Val::Int(0))]),
        "windowsImage: attribute 'timeout' must be between 1 and 604800 (seconds), got 0"
    );
    // A Windows layer is restricted as its base is, whatever its name.
    let windows = crate::spec::ImageSpec::new(crate::spec::GuestSpec::Windows(crate::spec::WindowsOptions::new("W")));
    let base = Val::Derivation { image_spec: Some(crate::spec::to_json(&windows)), memory: false };
    let p = planned("windowsImage", &set(&[("base", base), ("name", s("vs"))]), &env);
    assert_eq!(p.drvs[0].attrs.iter().find(|a| a.name == "name").unwrap().text, "RESTRICTDIST-vs");
}

/// `pin` adds a fixed-output derivation on top, and leaves what it copies as it was: the same
/// derivations, attribute for attribute, as without a pin.
#[test]
fn a_pin_adds_a_fixed_output_copy_and_changes_nothing_below_it() {
    let (_d, env) = env();
    let hash = format!("sha256-{}=", "A".repeat(43));
    let plain = set(&[("guest", s("standin")), ("accel", s("tcg"))]);
    let pinned = set(&[("guest", s("standin")), ("accel", s("tcg")), ("pin", s(&hash))]);
    let (p, q) = (planned("windowsImage", &plain, &env), planned("windowsImage", &pinned, &env));
    assert_eq!((p.error.as_str(), q.error.as_str()), ("", ""));
    assert_eq!(q.drvs.len(), p.drvs.len() + 1);
    // The same stages up to the image; the memory stage follows the pinned copy, of which it
    // is made, and the pinned copy is the result.
    for (a, b) in p.drvs.iter().zip(&q.drvs).take(p.drvs.len() - 1) {
        assert_eq!(format!("{:?}", a.attrs), format!("{:?}", b.attrs));
    }
    assert_eq!(q.result, q.drvs.len() - 2);
    let memory = &q.drvs.last().unwrap().attrs;
    let from = memory.iter().find(|a| a.name == "image").unwrap();
    assert_eq!((from.source, from.stage), (Source::Stage, q.result));
    let last = &q.drvs[q.result].attrs;
    let get = |n: &str| last.iter().find(|a| a.name == n).unwrap_or_else(|| panic!("no {n}"));
    assert_eq!(get("name").text, "winvm-standin-image-pinned");
    assert_eq!(get("args").list, ["pin"]);
    assert_eq!((get("outputHashMode").text.as_str(), get("outputHash").text.as_str()), ("recursive", hash.as_str()));
    assert_eq!((get("image").source, get("image").stage), (Source::Stage, p.result));
    // A layer too, with a memory stage of its own (a pin flattens the memory).
    let layer = set(&[("base", standin_image_val()), ("pin", s(&hash))]);
    let l = planned("windowsImage", &layer, &env);
    assert_eq!(l.error, "");
    assert_eq!((l.drvs.len(), l.result), (3, 1));
    assert!(l.drvs[1].attrs.iter().any(|a| a.name == "name" && a.text == "winvm-standin-layer-pinned"));
    // Not a hash: said with the shape.
    for bad in ["sha256-short=", "sha512-AAAA", &format!("sha256-{}", "A".repeat(44))] {
        let e = planned("windowsImage", &set(&[("guest", s("standin")), ("pin", s(bad))]), &env).error;
        assert!(e.starts_with("windowsImage: attribute 'pin' must be a SHA-256 hash in SRI form"), "{bad}: {e}");
    }
    let e = planned("windowsImage", &set(&[("guest", s("standin")), ("pin", Val::Int(3))]), &env).error;
    assert!(e.contains("'pin'"), "{e}");
}

/// `iso = { name; hash; }` with an SRI hash plans exactly what `{ name; sha256; }` with the same
/// hash in hexadecimal does: the require-file stage's outputHash is hexadecimal either way.
#[test]
fn an_iso_named_by_an_sri_hash_is_the_iso_named_by_its_sha256() {
    let (_d, env) = env();
    let hex = "0123456789abcdef".repeat(4);
    let sri = "sha256-ASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4mrze8=";
    let image = |iso: &[(&str, Val)]| {
        planned("windowsImage", &set(&[("iso", set(iso)), ("edition", s("Windows 11 Pro")), ("accel", s("tcg"))]), &env)
    };
    let by_hex = image(&[("name", s("w.iso")), ("sha256", s(&hex.to_uppercase()))]);
    let by_sri = image(&[("name", s("w.iso")), ("hash", s(sri))]);
    assert_eq!((by_hex.error.as_str(), by_sri.error.as_str()), ("", ""));
    assert_eq!(format!("{:?}", by_hex.drvs), format!("{:?}", by_sri.drvs));
    let require = &by_sri.drvs[0].attrs;
    let get = |n: &str| require.iter().find(|a| a.name == n).unwrap_or_else(|| panic!("no {n}")).text.clone();
    assert_eq!((get("outputHashAlgo"), get("outputHash")), ("sha256".to_owned(), hex.clone()));
    assert_eq!(super::validate::sri_sha256_hex(sri), Some(hex));
    // 32 bytes of 0xff: the last digit holds the last 4 bits, then 2 zero bits.
    assert_eq!(super::validate::sri_sha256_hex(&format!("sha256-{}8=", "/".repeat(42))), Some("f".repeat(64)));
}

/// Each way `iso`'s hash can be wrong has its own message, naming the field.
#[test]
fn a_wrong_iso_hash_is_named_with_what_it_must_be() {
    let (_d, env) = env();
    let error = |iso: &[(&str, Val)]| {
        planned("windowsImage", &set(&[("iso", set(iso)), ("edition", s("Windows 11 Pro"))]), &env).error
    };
    let name = || ("name", s("w.iso"));
    let sri = "sha256-ASNFZ4mrze8BI0VniavN7wEjRWeJq83vASNFZ4mrze8=";
    let shape = "a path to the ISO, or { name; sha256; } or { name; hash; } for one added with `nix-store --add-fixed sha256 FILE`";
    assert_eq!(
        error(&[name(), ("hash", Val::Int(3))]),
        r#"windowsImage: attribute 'iso.hash' must be a string ("sha256-" and 44 characters of base64), got an integer"#
    );
    assert_eq!(
        error(&[name(), ("hash", s(sri)), ("sha256", s(&"0".repeat(64)))]),
        "windowsImage: attribute 'iso' has both 'sha256' and 'hash'; give one of them"
    );
    assert_eq!(
        error(&[name()]),
        format!("windowsImage: attribute 'iso' is missing field 'sha256' or 'hash' ({shape})")
    );
    assert_eq!(error(&[("hash", s(sri))]), format!("windowsImage: attribute 'iso' is missing field 'name' ({shape})"));
    assert_eq!(
        error(&[name(), ("hash", s(sri)), ("size", Val::Int(1))]),
        format!("windowsImage: attribute 'iso' has unknown field 'size' ({shape})")
    );
    // Not base64 of 32 bytes: a digit outside the alphabet, bits past the 256th, too short, no
    // padding, another algorithm, base 32.
    let body = &sri["sha256-".len()..];
    for bad in [
        format!("sha256-{}!=", &body[..42]),
        format!("sha256-{}9=", &body[..42]),
        format!("sha256-{}=", &body[..40]),
        format!("sha256-{}", &body[..43]),
        format!("sha512-{body}"),
        format!("sha256:{}", "0".repeat(52)),
    ] {
        assert_eq!(
            error(&[name(), ("hash", s(&bad))]),
            format!(
                r#"windowsImage: attribute 'iso.hash' must be a SHA-256 hash in SRI form, "sha256-" and 44 characters of base64 (nix hash file FILE), got "{bad}""#
            ),
            "{bad}"
        );
    }
}

/// README.md's attribute reference is the tables': each one under its marker, row for row.
#[test]
fn the_readmes_attribute_tables_are_the_plugins_own() {
    use super::table::{readme, TABLES};
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let name_of =
        |line: &str| line.split('|').nth(1).map(|c| c.trim().trim_matches('`').to_owned()).unwrap_or_default();
    for table in TABLES {
        let fix = format!("README.md's table {} should read:\n\n{}\n", table.id, readme::table(table));
        let marker = readme::marker(table);
        let at = text.find(&marker).unwrap_or_else(|| panic!("README.md lacks the marker {marker}; {fix}"));
        let documented: Vec<&str> =
            text[at + marker.len()..].trim_start().lines().take_while(|l| l.starts_with('|')).collect();
        assert!(documented.len() >= 2 && documented[..2] == readme::HEADER, "{fix}");
        for a in table.rows {
            let Some(line) = documented.iter().find(|l| name_of(l) == a.name) else {
                panic!("README.md's table {} lacks `{}`; {fix}", table.id, a.name)
            };
            assert_eq!(
                *line,
                readme::row(a),
                "README.md's row of `{}` ({}) differs from src/plugin/table.rs",
                a.name,
                table.id
            );
        }
        for line in &documented[2..] {
            let name = name_of(line);
            assert!(
                table.row(&name).is_some(),
                "README.md documents `{name}`, which the table {} lacks; {fix}",
                table.id
            );
        }
        assert_eq!(documented.join("\n"), readme::table(table), "the rows' order; {fix}");
    }
}

/// Each row's default is a value its own type allows, and the defaults are the spec's.
#[test]
fn the_tables_defaults_fit_their_rows_and_are_the_specs() {
    use super::table::{Default, Guest, Kind, TABLES};
    for table in TABLES {
        let mut names = table.names();
        names.dedup();
        assert_eq!(names.len(), table.rows.len(), "a name twice in {}", table.id);
        for a in table.rows {
            match (a.kind, a.default) {
                (Kind::Choice(choices), Default::Text(d)) => assert!(choices.contains(&d), "{}", a.name),
                (Kind::Int { range, .. }, d) => {
                    for windows in [false, true] {
                        for tcg in [false, true] {
                            if let Some(i) = d.int(Guest { windows, tcg }) {
                                assert!((range.0..=range.1).contains(&i), "{}: {i}", a.name);
                            }
                        }
                    }
                }
                _ => {}
            }
            if a.default == Default::RequiredForWindows {
                assert!(a.windows_only, "{} is required for windows only", a.name);
            }
        }
    }
    let caller = Caller::of(Builtin::WindowsImage);
    let standin = super::validate::image_args(caller, &[("guest".into(), s("standin"))]).unwrap();
    assert_eq!(standin.spec, crate::spec::ImageSpec::standin());
    let windows = [("iso".to_owned(), Val::Path("/w.iso".into())), ("edition".to_owned(), s("Windows 11 Pro"))];
    let windows = super::validate::image_args(caller, &windows).unwrap();
    let options = crate::spec::WindowsOptions::new("Windows 11 Pro");
    assert_eq!(windows.spec, crate::spec::ImageSpec::new(crate::spec::GuestSpec::Windows(options)));
}

/// An error names the attribute by its path, a list's element by its position.
#[test]
fn an_error_names_the_attribute_by_its_path() {
    use super::error::{ArgError, AttrPath, Problem};
    let error = |attr: AttrPath| ArgError {
        caller: Caller::of(Builtin::WindowsImage),
        attr,
        problem: Problem::OutOfRange { value: 3, unit: "MiB", range: (64, 128) },
    };
    assert_eq!(
        error(AttrPath::attr("layers").element(1).field("memory")).to_string(),
        "windowsImage: attribute 'layers[1].memory' must be between 64 and 128 (MiB), got 3"
    );
    assert_eq!(
        error(AttrPath::attr("sizes").element(2)).to_string(),
        "windowsImage: element 2 of attribute 'sizes' must be between 64 and 128 (MiB), got 3"
    );
    let within = ArgError {
        caller: super::error::Caller { builtin: Builtin::RunInWindowsVM, within: Some("windowsImage") },
        ..error(AttrPath::attr("memory"))
    };
    assert_eq!(
        within.to_string(),
        "runInWindowsVM: windowsImage: attribute 'memory' must be between 64 and 128 (MiB), got 3"
    );
}
