//! Flakes evaluate purely: a flake without inputs that calls the builtins directly, with the
//! plugin whose store paths scripts/register put into the store and recorded beside it, is
//! evaluated and built by the real `nix` with no `--impure`; where a path is missing, pure
//! evaluation names it and the way to put it back.
#![cfg(feature = "plugin")]

mod common;
use common::{flake_nix as nix, registered_plugin, stderr, stdout};
use std::path::Path;
use std::process::Output;

/// examples/flake: no inputs, its default package a build on the standin.
fn example_flake() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/flake"))
}

fn flake_ref(dir: &Path) -> String {
    format!("path:{}#default", dir.display())
}

fn last_error(o: &Output) -> String {
    let err = stderr(o);
    err.lines().rev().find_map(|l| l.trim_start().strip_prefix("error: ")).unwrap_or(&err).to_owned()
}

/// examples/flake, built by `nix build` with no `--impure`.
#[test]
fn a_flake_without_inputs_builds_in_pure_evaluation() {
    let plugin = registered_plugin();
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(plugin.path().join("nix-winvm.paths.json")).unwrap()).unwrap();
    let flake = example_flake();
    let eval = nix(plugin.path(), &["eval", "--raw", &format!("{}.drvPath", flake_ref(flake))]);
    assert!(eval.status.success(), "nix eval failed:\n{}", stderr(&eval));
    let drv_path = stdout(&eval);
    // The derivation names the recorded store paths, not host paths.
    let drv = std::fs::read_to_string(&drv_path).unwrap();
    for key in ["builder", "tools", "toolsLib"] {
        let path = record[key]["path"].as_str().unwrap();
        assert!(drv.contains(&format!("\"{path}\"")), "{drv_path} does not name {key} {path}:\n{drv}");
    }
    for host in [&plugin.path().display().to_string(), "/var/cache/nix-winvm", env!("CARGO_MANIFEST_DIR")] {
        assert!(!drv.contains(host), "{drv_path} names the host path {host}:\n{drv}");
    }

    let build = nix(plugin.path(), &["build", "-L", "--no-link", "--json", &flake_ref(flake)]);
    assert!(build.status.success(), "nix build failed:\n{}", stderr(&build));
    let json: serde_json::Value = serde_json::from_slice(&build.stdout).unwrap();
    assert_eq!(json[0]["drvPath"], drv_path.as_str());
    let out = json[0]["outputs"]["out"].as_str().unwrap();
    let greeting = std::fs::read_to_string(Path::new(out).join("greeting")).unwrap();
    assert_eq!(greeting, "hello from a flake, in the standin guest\n");
}

/// A store that lacks the recorded paths (a new chroot store): pure evaluation may not copy
/// them from the host, so it names the first one and the command that puts it back; with
/// `--impure` the same evaluation copies them and works.
#[test]
fn pure_evaluation_names_a_missing_path_and_the_way_to_put_it_back() {
    let plugin = registered_plugin();
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(plugin.path().join("nix-winvm.paths.json")).unwrap()).unwrap();
    let store = tempfile::Builder::new().prefix("nix-winvm-store").tempdir().unwrap();
    let store_arg = store.path().display().to_string();
    let attr = format!("{}.drvPath", flake_ref(example_flake()));
    let pure = nix(plugin.path(), &["--store", &store_arg, "eval", "--raw", &attr]);
    assert_eq!(
        last_error(&pure),
        format!(
            "nix-winvm: the builder {} is not in this Nix store, and pure evaluation may not copy it from {}; run scripts/register {} to put it in the store and record it beside the plugin",
            record["builder"]["path"].as_str().unwrap(),
            record["builder"]["host"].as_str().unwrap(),
            plugin.path().display()
        )
    );
    let impure = nix(plugin.path(), &["--store", &store_arg, "eval", "--impure", "--raw", &attr]);
    assert!(impure.status.success(), "{}", stderr(&impure));
    // The copies are the recorded paths: content-addressed, the same in every store.
    let again = nix(plugin.path(), &["--store", &store_arg, "eval", "--raw", &attr]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(stdout(&again), stdout(&impure));
}

/// Without a current record (none written, or the builder rebuilt since), the plugin knows its
/// builder only as a host path: pure evaluation refuses it and says to register.
#[test]
fn without_a_current_record_pure_evaluation_says_to_register() {
    let plugin = registered_plugin();
    let attr = format!("{}.drvPath", flake_ref(example_flake()));
    let expected_prefix = "nix-winvm: the builder is known only as the host path ";
    let expected_suffix = format!(
        ", which pure evaluation may not read; run scripts/register {} to put it in the store and record it beside the plugin",
        plugin.path().display()
    );
    // A builder rebuilt after the record was written (cargo build without scripts/register).
    let builder = plugin.path().join("nix-winvm-builder");
    std::fs::write(&builder, [std::fs::read(&builder).unwrap(), vec![0]].concat()).unwrap();
    let stale = nix(plugin.path(), &["eval", "--raw", &attr]);
    let err = last_error(&stale);
    assert!(err.starts_with(expected_prefix) && err.ends_with(&expected_suffix), "{err}");
    std::fs::remove_file(plugin.path().join("nix-winvm.paths.json")).unwrap();
    let none = nix(plugin.path(), &["eval", "--raw", &attr]);
    let err = last_error(&none);
    assert!(err.starts_with(expected_prefix) && err.ends_with(&expected_suffix), "{err}");
    // An impure evaluation still works without a record: it copies the host paths.
    let impure = nix(plugin.path(), &["eval", "--impure", "--raw", &attr]);
    assert!(impure.status.success(), "{}", stderr(&impure));
}
