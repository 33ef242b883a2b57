//! The Nix library (nix/): the offline toolchains of nix/toolchains.nix, the layers they make
//! of a Windows image, the exact commands those layers run, their argument checks, and the
//! layout that `nix-store --add-fixed --recursive` adds; and nix/cygwin.nix's package folder,
//! built for real in the sandbox with the plugin's tools closure. The layers are evaluated and
//! instantiated only: no Windows media exist on this project's machines (docs/WINDOWS.md,
//! "What cannot be tested here").
#![cfg(feature = "plugin")]

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};

/// A Windows image that evaluates without its ISO: the `{ name; sha256; }` form names the ISO
/// by its hash only.
const WINDOWS_BASE: &str = r#"builtins.windowsImage {
    iso = { name = "RESTRICTDIST-x.iso"; sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"; };
    edition = "Windows 11 Pro";
  }"#;

fn checkout(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// BODY with `winvm` (the library, on the plugin), `stub` (nix/toolchains.nix on a
/// windowsImage that returns its argument), `base` (a Windows image) and `stubBase` in scope.
fn scope(body: &str) -> String {
    format!(
        "let winvm = import {lib} {{ }};\n\
             stub = import {toolchains} {{ windowsImage = args: args; }};\n\
             base = {WINDOWS_BASE};\n\
             stubBase = \"BASE\";\n\
         in {body}",
        lib = checkout("nix").display(),
        toolchains = checkout("nix/toolchains.nix").display(),
    )
}

fn eval(env: &NixEnv, body: &str) -> Value {
    let o = env.eval(&scope(body));
    assert!(o.status.success(), "{}\nin:\n{body}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("json")
}

/// Evaluates without the plugin: the stub's checks and commands are the library's own.
fn eval_without_plugin(env: &NixEnv, body: &str) -> std::process::Output {
    let mut c = env.command("nix-instantiate");
    c.arg("--store").arg(env.store()).args(["--eval", "--strict", "--json", "-E", &scope(body)]);
    c.output().expect("run nix-instantiate")
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("no string '{key}' in {v}"))
}

/// The derivation of EXPR, as `nix show-derivation` prints it.
fn show_derivation(env: &NixEnv, expr: &str) -> Value {
    let o = env.instantiate(&[], &scope(expr));
    assert!(o.status.success(), "{}", stderr(&o));
    show_drv(env, &stdout(&o))
}

/// A .drv as `nix show-derivation` prints it, with the inputs under their old names on Nix
/// 2.33 and later too.
fn show_drv(env: &NixEnv, drv: &str) -> Value {
    let o = env.nix(&["show-derivation", drv]);
    assert!(o.status.success(), "{}", stderr(&o));
    let all: Value = serde_json::from_slice(&o.stdout).expect("json");
    if all.get("version").is_none() {
        return all[drv].clone();
    }
    let name = drv.trim_start_matches("/nix/store/");
    let mut d = all["derivations"][name].clone();
    assert!(d.is_object(), "{drv} missing in {all}");
    d["inputSrcs"] = d["inputs"]["srcs"].clone();
    d["inputDrvs"] = d["inputs"]["drvs"].clone();
    d
}

/// Whole paths: Nix 2.33 and later name the inputs by their base names.
fn input_drvs(d: &Value) -> Vec<String> {
    let keys = d["inputDrvs"].as_object().expect("inputDrvs").keys();
    keys.map(|k| if k.starts_with('/') { k.clone() } else { format!("/nix/store/{k}") }).collect()
}

fn input_srcs(d: &Value) -> Vec<String> {
    d["inputSrcs"].as_array().expect("inputSrcs").iter().map(|s| s.as_str().unwrap().to_owned()).collect()
}

/// The layer's commands as the plugin stored them (`winvmLayerCommand0`, ...), its name, its
/// spec, and the commands the same call gives on the stub, which the plugin must pass on
/// unchanged.
fn layer_json(env: &NixEnv, call: &str) -> Value {
    eval(
        env,
        &format!(
            "let l = winvm.{call}; s = stub.{call}; a = l.drvAttrs;\n\
                 n = builtins.length (builtins.filter (k: builtins.substring 0 17 k == \"winvmLayerCommand\") (builtins.attrNames a));\n\
             in {{ inherit (l) name type; spec = a.winvmLayerSpec;\n\
                  commands = builtins.genList (i: a.${{\"winvmLayerCommand\" + toString i}}) n;\n\
                  stubCommands = s.installCommands; }}"
        ),
    )
}

fn commands(v: &Value) -> Vec<String> {
    v["commands"].as_array().expect("commands").iter().map(|c| c.as_str().unwrap().to_owned()).collect()
}

/// What every layer shares: a derivation named RESTRICTDIST-..., a JSON spec, and the commands
/// of the library, passed on one attribute each.
fn assert_layer(v: &Value, name: &str, count: usize) -> Vec<String> {
    assert_eq!(v["type"], "derivation", "{v}");
    let n = text(v, "name");
    assert!(n.starts_with("RESTRICTDIST-") && n.contains(name), "{n}");
    serde_json::from_str::<Value>(text(v, "spec")).unwrap_or_else(|e| panic!("winvmLayerSpec is not JSON: {e}"));
    let c = commands(v);
    assert_eq!(c.len(), count, "{v}");
    assert_eq!(v["commands"], v["stubCommands"], "the plugin must pass installCommands on unchanged");
    for cmd in &c {
        assert!(cmd.starts_with("set -eu\n"), "{cmd}");
    }
    c
}

/// A folder added as the docs say: `nix-hash --type sha256 DIR`, then
/// `nix-store --add-fixed --recursive sha256 DIR`. Returns (hash, the path it got).
fn add_fixed_folder(env: &NixEnv, name: &str) -> (String, String) {
    let dir = env.dir.path().join(name);
    std::fs::create_dir_all(dir.join("certificates")).unwrap();
    std::fs::write(dir.join("vs_buildtools.exe"), "MZ not really\n").unwrap();
    std::fs::write(dir.join("certificates/manifestRootCertificate.cer"), "certificate\n").unwrap();
    let o = env.command("nix-hash").args(["--type", "sha256"]).arg(&dir).output().expect("nix-hash");
    assert!(o.status.success(), "{}", stderr(&o));
    let hash = stdout(&o);
    let o = env
        .command("nix-store")
        .arg("--store")
        .arg(env.store())
        .args(["--add-fixed", "--recursive", "sha256"])
        .arg(&dir)
        .output()
        .expect("nix-store --add-fixed");
    assert!(o.status.success(), "{}", stderr(&o));
    (hash, stdout(&o))
}

#[test]
fn visual_studio_installs_offline_from_the_layout_added_with_add_fixed() {
    let env = NixEnv::new();
    let (hash, added) = add_fixed_folder(&env, "RESTRICTDIST-vsbt");
    assert!(added.starts_with("/nix/store/") && added.ends_with("-RESTRICTDIST-vsbt"), "{added}");
    let call = format!(
        r#"visualStudioBuildToolsLayer {{ inherit base; layout = {{ name = "RESTRICTDIST-vsbt"; sha256 = "{hash}"; }}; }}"#
    );
    let v = layer_json(&env, &call);
    let c = assert_layer(&v, "vs-buildtools", 2);

    // The { name; sha256; } form is exactly the path `nix-store --add-fixed --recursive` made.
    let layout = format!("layout='{added}'\n");
    assert!(c[0].contains(&layout) && c[1].contains(&layout), "{c:?}");

    // 1: Microsoft's three root certificates, into the machine's Root store.
    assert!(c[0].contains(
        r#"for cert in manifestRootCertificate.cer manifestCounterSignRootCertificate.cer vs_installer_opc.RootCertificate.cer; do"#
    ));
    assert!(c[0].contains(
        r#"run_windows "$logs" "\"$system32\\certutil.exe\" -addstore -f Root \"$(cygpath -w "$layout/certificates/$cert")\"""#
    ));
    assert!(c[0].contains(r#"logs=$(cygpath -u 'C:\nix-winvm\layers\vs-buildtools')"#));

    // 2: the layout's bootstrapper, offline, quiet, waiting, with the documented flags.
    assert!(c[1].contains(
        r#"args=' --noWeb --quiet --wait --norestart --add "Microsoft.VisualStudio.Workload.VCTools" --includeRecommended --installPath "C:\BuildTools"'"#
    ));
    assert!(c[1].contains(r#"run_windows "$logs" "\"$(cygpath -w "$layout")\\vs_buildtools.exe\"$args""#));
    assert!(c[1].contains("\n  0) say \"the Visual Studio installer succeeded\" ;;\n"));
    assert!(
        c[1].contains("\n  3010) say \"the Visual Studio installer succeeded and asks for a restart (exit code 3010);")
    );
    assert!(c[1].contains(r#"if [ ! -f "$install_dir/Common7/Tools/VsDevCmd.bat" ]; then"#));
    // The whole exit code comes from the batch file, not from bash's $? (its low byte only).
    assert!(c[1].contains(r#">"%s\\exit-code" echo %%ERRORLEVEL%%\r\n"#));

    // The layer depends on the layout's fixed-output derivation, named RESTRICTDIST-.
    let d = show_derivation(&env, &format!("winvm.{call}"));
    let drvs = input_drvs(&d);
    assert!(drvs.iter().any(|k| k.ends_with("-RESTRICTDIST-vsbt.drv")), "{drvs:?}");
}

/// `{ name; hash; }` with the SRI hash `nix hash path` prints names the same folder as
/// `{ name; sha256; }`: the path `nix-store --add-fixed --recursive` made, and the same layer.
#[test]
fn an_sri_hash_names_the_layout_as_sha256_does() {
    let env = NixEnv::new();
    let (hex, added) = add_fixed_folder(&env, "RESTRICTDIST-vsbt");
    let o = env.command("nix").args(["hash", "path"]).arg(env.dir.path().join("RESTRICTDIST-vsbt")).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let sri = stdout(&o);
    assert!(sri.starts_with("sha256-") && sri.len() == 51, "{sri}");
    let call = |hash: &str| {
        format!(
            r#"visualStudioBuildToolsLayer {{ inherit base; layout = {{ name = "RESTRICTDIST-vsbt"; {hash}; }}; }}"#
        )
    };
    let by_sri = call(&format!(r#"hash = "{sri}""#));
    let c = assert_layer(&layer_json(&env, &by_sri), "vs-buildtools", 2);
    assert!(c[0].contains(&format!("layout='{added}'\n")), "{}", c[0]);
    let v = eval(
        &env,
        &format!("[ (winvm.{}).outPath (winvm.{}).outPath ]", by_sri, call(&format!(r#"sha256 = "{hex}""#))),
    );
    assert_eq!(v[0], v[1], "the two forms of one hash must make the same layer");
}

#[test]
fn a_missing_layout_stops_the_build_with_the_command_that_adds_it() {
    let env = NixEnv::new();
    let hash = "b".repeat(64);
    let call = format!(
        r#"visualStudioBuildToolsLayer {{ inherit base; layout = {{ name = "RESTRICTDIST-vsgone"; sha256 = "{hash}"; }}; }}"#
    );
    let d = show_derivation(&env, &format!("winvm.{call}"));
    let layout_drv = input_drvs(&d)
        .into_iter()
        .find(|k| k.ends_with("-RESTRICTDIST-vsgone.drv"))
        .unwrap_or_else(|| panic!("no layout input in {d}"));
    // The path `nix-store --add-fixed --recursive sha256` gives a folder of that name and hash.
    let fixed = show_drv(&env, &layout_drv);
    assert_eq!(fixed["env"]["outputHashMode"], "recursive", "{fixed}");
    assert_eq!(fixed["env"]["outputHashAlgo"], "sha256", "{fixed}");
    assert_eq!(fixed["env"]["outputHash"], hash.as_str(), "{fixed}");
    assert_eq!(
        fixed["builder"],
        "/RESTRICTDIST-vsgone is not in the Nix store. Add the folder once with: nix-store --add-fixed --recursive sha256 ./RESTRICTDIST-vsgone"
    );

    // Realising it runs no VM: its builder is the instruction, which Nix prints on failing.
    let o = env.command("nix-store").arg("--store").arg(env.store()).args(["--realise", &layout_drv]).output().unwrap();
    assert!(!o.status.success(), "a missing layout must fail");
    let err = stderr(&o);
    assert!(
        err.contains(
            "/RESTRICTDIST-vsgone is not in the Nix store. Add the folder once with: nix-store --add-fixed --recursive sha256 ./RESTRICTDIST-vsgone"
        ),
        "{err}"
    );
}

#[test]
fn visual_studio_arguments_follow_the_options() {
    let env = NixEnv::new();
    let v = layer_json(
        &env,
        r#"visualStudioBuildToolsLayer {
             inherit base;
             layout = derivation { name = "RESTRICTDIST-vsd"; system = "x86_64-linux"; builder = "/bin/sh"; };
             workloads = [ "Microsoft.VisualStudio.Workload.VCTools" "Microsoft.VisualStudio.Component.VC.ATL;includeOptional" ];
             includeRecommended = false;
             installPath = "D:\\VS Build Tools";
             name = "my-vs";
           }"#,
    );
    let c = assert_layer(&v, "my-vs", 2);
    assert!(c[1].contains(
        r#"args=' --noWeb --quiet --wait --norestart --add "Microsoft.VisualStudio.Workload.VCTools" --add "Microsoft.VisualStudio.Component.VC.ATL;includeOptional" --installPath "D:\VS Build Tools"'"#
    ), "{}", c[1]);
    assert!(c[1].contains(r#"install_path='D:\VS Build Tools'"#), "{}", c[1]);
}

#[test]
fn cygwin_packages_from_a_cygwin_nix_folder_are_copied_from_the_paths_it_links_to() {
    let env = NixEnv::new();
    let repo = format!(
        r#"import {cygwin} {{ setupIni = {ini}; packages = [ "make" ]; mirror = "https://mirror.invalid/cygwin"; setupExe = {exe}; system = "x86_64-linux"; }}"#,
        cygwin = checkout("nix/cygwin.nix").display(),
        ini = checkout("tests/fixtures/setup.ini").display(),
        exe = checkout("tests/fixtures/cygwin-repo/setup-x86_64.exe").display(),
    );
    let call = r#"cygwinPackagesLayer { inherit base repo; packages = [ "make" ]; }"#;
    let v = eval(
        &env,
        &format!(
            "let repo = {repo}; l = winvm.{call}; s = stub.{call}; a = l.drvAttrs; in {{\n\
               inherit (l) name type; spec = a.winvmLayerSpec;\n\
               commands = [ a.winvmLayerCommand0 a.winvmLayerCommand1 ]; more = a ? winvmLayerCommand2;\n\
               stubCommands = s.installCommands;\n\
               links = map toString repo.drvAttrs.archiveLinks;\n\
               setupExe = \"${{repo.setupExe}}\"; setupIni = repo.setupIni; }}"
        ),
    );
    assert_eq!(v["more"], false);
    let c = assert_layer(&v, "cygwin-packages", 2);
    assert!(c[0].contains(&format!("cp '{}' \"$stage/setup-x86_64.exe\"\n", text(&v, "setupExe"))), "{}", c[0]);
    assert!(c[0].contains(&format!("cp '{}' \"$mirror/x86_64/setup.ini\"\n", text(&v, "setupIni"))), "{}", c[0]);
    assert!(c[0].contains("mirror=\"$stage/cygwin-packages/nix-winvm-mirror\"\n"), "{}", c[0]);
    let links: Vec<&str> = v["links"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    let pairs = links.chunks_exact(2);
    assert!(links.len() >= 4 && pairs.remainder().is_empty(), "{links:?}");
    for pair in pairs {
        assert!(c[0].contains(&format!("'{}' '{}'", pair[0], pair[1])), "{pair:?} not copied in:\n{}", c[0]);
    }
    assert!(c[0].contains(r#"stage=$(cygpath -u 'C:\nix-winvm\layers\cygwin')"#));
    assert!(c[0].contains(r#"chmod +x "$stage/setup-x86_64.exe""#));

    assert!(c[1].contains(
        r#"args=' --quiet-mode --no-verify --local-install --local-package-dir "C:\nix-winvm\layers\cygwin\cygwin-packages" --root "C:\cygwin64" --packages make --wait --no-desktop --no-shortcuts --no-startmenu'"#
    ), "{}", c[1]);
    assert!(c[1].contains(r#"run_windows "$logs" "\"$(cygpath -w "$stage")\\setup-x86_64.exe\"$args""#));
    assert!(c[1].contains("\n  118)\n"), "{}", c[1]);
    assert!(c[1].contains("/etc/setup/installed.db"), "{}", c[1]);

    // The archives, setup.ini and setup itself are inputs of the layer.
    let d = show_derivation(&env, &format!("let repo = {repo}; in winvm.{call}"));
    let drvs = input_drvs(&d);
    assert!(drvs.iter().any(|k| k.ends_with("-cygwin-make-4.4.1-2.tar.xz.drv")), "{drvs:?}");
    let srcs = input_srcs(&d);
    assert!(srcs.iter().any(|s| s.ends_with("-setup-x86_64.exe")), "{srcs:?}");
    assert!(srcs.iter().any(|s| s.ends_with("-setup.ini")), "{srcs:?}");
}

#[test]
fn cygwin_packages_from_a_plain_folder_are_copied_as_they_are() {
    let env = NixEnv::new();
    let v = layer_json(
        &env,
        &format!(
            r#"cygwinPackagesLayer {{ inherit base; repo = {}; packages = [ "make" "gcc-core" "make" ]; }}"#,
            checkout("tests/fixtures/cygwin-repo").display()
        ),
    );
    let c = assert_layer(&v, "cygwin-packages", 2);
    assert!(c[0].contains("-cygwin-repo'\n"), "{}", c[0]);
    assert!(c[0].contains("cp \"$repo/setup-x86_64.exe\" \"$stage/setup-x86_64.exe\"\n"), "{}", c[0]);
    assert!(c[0].contains("cp -R \"$repo/cygwin-packages\" \"$stage/cygwin-packages\"\n"), "{}", c[0]);
    // Sorted, each once.
    assert!(c[1].contains(" --packages gcc-core,make --wait "), "{}", c[1]);
    assert!(c[1].contains("packages='gcc-core make'\n"), "{}", c[1]);
}

#[test]
fn python_installs_quietly_for_all_users_then_pip_installs_from_the_wheels() {
    let env = NixEnv::new();
    let installer = env.dir.path().join("python-3.12.4-amd64.exe");
    std::fs::write(&installer, "MZ not really\n").unwrap();
    let wheels = env.dir.path().join("wheels");
    std::fs::create_dir_all(&wheels).unwrap();
    std::fs::write(wheels.join("numpy-2.0.0-cp312-cp312-win_amd64.whl"), "PK not really\n").unwrap();
    let call = format!(
        r#"pythonLayer {{ inherit base; installer = {}; wheels = {}; packages = [ "numpy" "requests>=2" ]; timeout = 7200; }}"#,
        installer.display(),
        wheels.display()
    );
    let v = layer_json(&env, &call);
    let c = assert_layer(&v, "python", 2);
    assert!(c[0].contains(
        r#"args=' /quiet InstallAllUsers=1 PrependPath=1 Include_test=0 Include_debug=0 Include_symbols=0 Shortcuts=0 TargetDir="C:\Python" /log "C:\nix-winvm\layers\python\install.log"'"#
    ), "{}", c[0]);
    assert!(c[0].contains("-python-3.12.4-amd64.exe'\n"), "{}", c[0]);
    assert!(c[0].contains(r#"run_windows "$logs" "\"$(cygpath -w "$installer")\"$args""#));
    assert!(c[0].contains("\n  3010) say "), "{}", c[0]);
    assert!(c[0].contains(r#""$(cygpath -u "$target_dir")/python.exe" --version"#), "{}", c[0]);
    assert!(c[1].contains(
        r#""$python" -m pip install --no-index --disable-pip-version-check --find-links "$(cygpath -w "$stage")" 'numpy' 'requests>=2'"#
    ), "{}", c[1]);
    assert!(c[1].contains("-wheels'\n"), "{}", c[1]);

    let d = show_derivation(&env, &format!("winvm.{call}"));
    let srcs = input_srcs(&d);
    assert!(srcs.iter().any(|s| s.ends_with("-python-3.12.4-amd64.exe")), "{srcs:?}");
    assert!(srcs.iter().any(|s| s.ends_with("-wheels")), "{srcs:?}");

    // Without wheels, the installer alone.
    let v = layer_json(&env, &format!("pythonLayer {{ inherit base; installer = {}; }}", installer.display()));
    assert_layer(&v, "python", 1);
}

#[test]
fn the_layer_function_passes_its_commands_on() {
    let env = NixEnv::new();
    let v = eval(
        &env,
        r#"let l = winvm.layer { inherit base; installCommands = [ "echo one" "echo 'two'" ]; }; in
           [ l.type l.drvAttrs.winvmLayerCommand0 l.drvAttrs.winvmLayerCommand1 (l.drvAttrs ? winvmLayerCommand2) ]"#,
    );
    assert_eq!(v, serde_json::json!(["derivation", "echo one", "echo 'two'", false]));
}

/// What the functions hand to windowsImage: base, installCommands, a RESTRICTDIST- name and,
/// when given, timeout; nothing of the base's shape.
#[test]
fn the_functions_give_windows_image_only_base_commands_name_and_timeout() {
    let env = NixEnv::new();
    let o = eval_without_plugin(
        &env,
        r#"let
             vs = stub.visualStudioBuildToolsLayer { base = stubBase; layout = { name = "RESTRICTDIST-vsbt"; sha256 = "0000000000000000000000000000000000000000000000000000"; }; };
             cyg = stub.cygwinPackagesLayer { base = stubBase; repo = derivation { name = "r"; system = "x86_64-linux"; builder = "/bin/sh"; }; packages = [ "make" ]; name = "RESTRICTDIST-mine"; timeout = 60; };
             py = stub.pythonLayer { base = stubBase; installer = builtins.toFile "python-3.12.4-amd64.exe" "MZ"; };
             shape = l: { keys = builtins.attrNames l; inherit (l) base name; };
           in [ (shape vs) (shape cyg) cyg.timeout (shape py) ]"#,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!([
            { "keys": ["base", "installCommands", "name"], "base": "BASE", "name": "RESTRICTDIST-vs-buildtools" },
            { "keys": ["base", "installCommands", "name", "timeout"], "base": "BASE", "name": "RESTRICTDIST-mine" },
            60,
            { "keys": ["base", "installCommands", "name"], "base": "BASE", "name": "RESTRICTDIST-python" }
        ])
    );
}

/// Each bad argument is a clean evaluation error with exactly this message, before any VM.
#[test]
fn bad_arguments_give_the_documented_errors() {
    let env = NixEnv::new();
    let exe = env.dir.path().join("python-3.12.4-amd64.exe");
    std::fs::write(&exe, "MZ").unwrap();
    let exe = exe.display();
    let hex = "c".repeat(64);
    let sri = format!("sha256-{}A=", "z".repeat(42));
    let repo = r#"(derivation { name = "r"; system = "x86_64-linux"; builder = "/bin/sh"; })"#;
    let vs = |rest: &str| format!("stub.visualStudioBuildToolsLayer {{ base = stubBase; {rest} }}");
    let layout = format!(r#"layout = {{ name = "RESTRICTDIST-vsbt"; sha256 = "{hex}"; }};"#);
    let cases: Vec<(String, String)> = vec![
        (vs(&format!(r#"layout = {{ name = "vsbt"; sha256 = "{hex}"; }};"#)), "visualStudioBuildToolsLayer: attribute 'layout.name' (\"vsbt\") must start with RESTRICTDIST-: Microsoft's files may not be redistributed, and binary caches refuse store paths with that marker (docs/WINDOWS.md, RESTRICTDIST)".into()),
        (vs(r#"layout = { name = "RESTRICTDIST-vsbt"; sha256 = "abc"; };"#), "visualStudioBuildToolsLayer: attribute 'layout.sha256' must be a SHA-256 of the folder, 64 hexadecimal digits (nix-hash --type sha256 DIR) or 52 base-32 characters, got \"abc\"".into()),
        (vs(r#"layout = { name = "RESTRICTDIST-vsbt"; hash = "abc"; };"#), "visualStudioBuildToolsLayer: attribute 'layout.hash' must be a SHA-256 of the folder in SRI form, \"sha256-\" and 44 characters of base64 (nix hash path DIR), got \"abc\"".into()),
        // Base64 that is no SHA-256: a character outside the alphabet, bits after the 256th,
        // another algorithm, no padding.
        (vs(&format!(r#"layout = {{ name = "RESTRICTDIST-vsbt"; hash = "sha256-{}!="; }};"#, "A".repeat(42))), format!("visualStudioBuildToolsLayer: attribute 'layout.hash' must be a SHA-256 of the folder in SRI form, \"sha256-\" and 44 characters of base64 (nix hash path DIR), got \"sha256-{}!=\"", "A".repeat(42))),
        (vs(&format!(r#"layout = {{ name = "RESTRICTDIST-vsbt"; hash = "sha256-{}B="; }};"#, "A".repeat(42))), format!("visualStudioBuildToolsLayer: attribute 'layout.hash' must be a SHA-256 of the folder in SRI form, \"sha256-\" and 44 characters of base64 (nix hash path DIR), got \"sha256-{}B=\"", "A".repeat(42))),
        (vs(&format!(r#"layout = {{ name = "RESTRICTDIST-vsbt"; hash = "sha512-{}A="; }};"#, "A".repeat(42))), format!("visualStudioBuildToolsLayer: attribute 'layout.hash' must be a SHA-256 of the folder in SRI form, \"sha256-\" and 44 characters of base64 (nix hash path DIR), got \"sha512-{}A=\"", "A".repeat(42))),
        (vs(&format!(r#"layout = {{ name = "RESTRICTDIST-vsbt"; hash = "sha256-{}"; }};"#, "A".repeat(44))), format!("visualStudioBuildToolsLayer: attribute 'layout.hash' must be a SHA-256 of the folder in SRI form, \"sha256-\" and 44 characters of base64 (nix hash path DIR), got \"sha256-{}\"", "A".repeat(44))),
        (vs(r#"layout = { name = "RESTRICTDIST-vsbt"; hash = 3; };"#), "visualStudioBuildToolsLayer: attribute 'layout.hash' must be a string, \"sha256-\" and 44 characters of base64 (nix hash path DIR), got an integer".into()),
        (vs(&format!(r#"layout = {{ name = "RESTRICTDIST-vsbt"; hash = "{sri}"; sha256 = "{hex}"; }};"#)), "visualStudioBuildToolsLayer: attribute 'layout' has both 'hash' and 'sha256'; give one of them, the folder's hash".into()),
        (vs(r#"layout = { name = "RESTRICTDIST-vsbt"; };"#), "visualStudioBuildToolsLayer: attribute 'layout' lacks the folder's hash: give 'hash' (\"sha256-\" and 44 characters of base64 (nix hash path DIR)) or 'sha256' (64 hexadecimal digits, nix-hash --type sha256 DIR)".into()),
        (vs(&format!(r#"layout = {{ hash = "{sri}"; }};"#)), "visualStudioBuildToolsLayer: attribute 'layout' lacks 'name', the folder's name in the store".into()),
        (vs(&format!(r#"layout = {{ name = "RESTRICTDIST-vsbt"; hash = "{sri}"; size = 3; }};"#)), "visualStudioBuildToolsLayer: attribute 'layout' as a set must be { name; hash; } or { name; sha256; }, got the attributes hash, name, size".into()),
        (vs(&format!(r#"layout = {{ name = "vsbt"; hash = "{sri}"; }};"#)), "visualStudioBuildToolsLayer: attribute 'layout.name' (\"vsbt\") must start with RESTRICTDIST-: Microsoft's files may not be redistributed, and binary caches refuse store paths with that marker (docs/WINDOWS.md, RESTRICTDIST)".into()),
        (vs(&format!(r#"layout = {{ name = "RESTRICTDIST vsbt"; sha256 = "{hex}"; }};"#)), "visualStudioBuildToolsLayer: attribute 'layout.name' must be a store name (letters, digits and + - . _ ? =, not starting with a dot, at most 150 characters), got \"RESTRICTDIST vsbt\"".into()),
        (vs("layout = 3;"), "visualStudioBuildToolsLayer: attribute 'layout' must be a path or derivation holding the layout, or { name; hash; } (or { name; sha256; }) for a folder added with `nix-store --add-fixed --recursive sha256 DIR`, got an integer".into()),
        (vs(r#"layout = "/nix/store/00000000000000000000000000000000-RESTRICTDIST-vsbt";"#), "visualStudioBuildToolsLayer: attribute 'layout' must be a path or derivation holding the layout, or { name; hash; } (or { name; sha256; }) for a folder added with `nix-store --add-fixed --recursive sha256 DIR`, got a string that is no store path with a dependency (use a path, a derivation or builtins.storePath)".into()),
        (vs(&format!("{layout} workloads = \"x\";")), "visualStudioBuildToolsLayer: attribute 'workloads' must be a list of strings (workload or component IDs), got a string".into()),
        (vs(&format!("{layout} workloads = [ ];")), "visualStudioBuildToolsLayer: attribute 'workloads' is an empty list; give one or more workload or component IDs".into()),
        (vs(&format!("{layout} workloads = [ \"a\" 3 ];")), "visualStudioBuildToolsLayer: element 1 of attribute 'workloads' must be a string, got an integer".into()),
        (vs(&format!("{layout} workloads = [ \"a&calc\" ];")), "visualStudioBuildToolsLayer: attribute 'workloads': \"a&calc\" is not a workload or component ID such as \"Microsoft.VisualStudio.Workload.VCTools\" or \"...;includeRecommended\"".into()),
        (vs(&format!("{layout} includeRecommended = \"yes\";")), "visualStudioBuildToolsLayer: attribute 'includeRecommended' must be a Boolean, got a string".into()),
        (vs(&format!(r#"{layout} installPath = "D:\\BT\\";"#)), r#"visualStudioBuildToolsLayer: attribute 'installPath' must be an absolute Windows path such as "C:\BuildTools", without " or % and without a trailing backslash, got "D:\BT\""#.into()),
        (vs(&format!(r#"{layout} installPath = "C:\\%TEMP%";"#)), r#"visualStudioBuildToolsLayer: attribute 'installPath' must be an absolute Windows path such as "C:\BuildTools", without " or % and without a trailing backslash, got "C:\%TEMP%""#.into()),
        (vs(&format!(r#"{layout} installPath = "C:\\{}";"#, "x".repeat(80))), format!("visualStudioBuildToolsLayer: attribute 'installPath' (\"C:\\{}\") must be shorter than 80 characters, as Microsoft requires", "x".repeat(80))),
        (vs(&format!(r#"{layout} name = "";"#)), "visualStudioBuildToolsLayer: attribute 'name' must be a non-empty string, got an empty string".into()),
        (
            format!(r#"let l = stub.visualStudioBuildToolsLayer {{ base = stubBase; layout = {{ name = "RESTRICTDIST-visual-studio-2022"; sha256 = "{hex}"; }}; }}; in builtins.substring 0 0 (builtins.elemAt l.installCommands 0)"#),
            "__layout_too_long__".into(),
        ),
        (
            r#"stub.visualStudioBuildToolsLayer { base = stubBase; layout = derivation { name = "vs-layout"; system = "x86_64-linux"; builder = "/bin/sh"; }; }"#.into(),
            "__layout_not_restricted__".into(),
        ),
        (format!(r#"stub.cygwinPackagesLayer {{ base = stubBase; repo = {repo}; packages = [ ]; }}"#), "cygwinPackagesLayer: attribute 'packages' is an empty list; give one or more Cygwin package names".into()),
        (format!(r#"stub.cygwinPackagesLayer {{ base = stubBase; repo = {repo}; packages = "make"; }}"#), "cygwinPackagesLayer: attribute 'packages' must be a list of strings (Cygwin package names), got a string".into()),
        (format!(r#"stub.cygwinPackagesLayer {{ base = stubBase; repo = {repo}; packages = [ "gcc&calc" ]; }}"#), r#"cygwinPackagesLayer: attribute 'packages': "gcc&calc" is not a Cygwin package name (letters, digits and . _ + -)"#.into()),
        (r#"stub.cygwinPackagesLayer { base = stubBase; repo = 3; packages = [ "make" ]; }"#.into(), "cygwinPackagesLayer: attribute 'repo' must be a Cygwin package folder (a path or derivation, as nix/cygwin.nix makes), got an integer".into()),
        (format!(r#"stub.pythonLayer {{ base = stubBase; installer = {repo}; }}"#), "__installer_not_exe__".into()),
        (format!(r#"stub.pythonLayer {{ base = stubBase; installer = {exe}; packages = [ "numpy" ]; }}"#), "pythonLayer: attribute 'packages' needs 'wheels', a folder of wheels: the guest has no network, so pip installs with --no-index".into()),
        (format!(r#"stub.pythonLayer {{ base = stubBase; installer = {exe}; wheels = {repo}; }}"#), r#"pythonLayer: attribute 'packages' must name what to install from 'wheels', e.g. [ "numpy" ]"#.into()),
        (format!(r#"stub.pythonLayer {{ base = stubBase; installer = {exe}; wheels = {repo}; packages = [ "--index-url=x" ]; }}"#), "pythonLayer: attribute 'packages': every requirement must be a non-empty line that does not start with -".into()),
        (format!(r#"stub.pythonLayer {{ base = stubBase; installer = {exe}; wheels = {repo}; packages = [ "x" true ]; }}"#), "pythonLayer: element 1 of attribute 'packages' must be a string, got a Boolean".into()),
        (format!(r#"stub.pythonLayer {{ base = stubBase; installer = {exe}; wheels = 5; packages = [ "x" ]; }}"#), "pythonLayer: attribute 'wheels' must be a folder of wheels (a path or derivation), got an integer".into()),
        (format!(r#"stub.pythonLayer {{ base = stubBase; installer = {exe}; targetDir = "Python"; }}"#), r#"pythonLayer: attribute 'targetDir' must be an absolute Windows path such as "C:\Python", without " or % and without a trailing backslash, got "Python""#.into()),
    ];
    for (expr, msg) in cases {
        let o = eval_without_plugin(&env, &expr);
        let err = stderr(&o);
        let last = err.lines().rev().find_map(|l| l.trim_start().strip_prefix("error: ")).unwrap_or("").to_owned();
        assert_eq!(o.status.code(), Some(1), "expected a Nix error for {expr}\nstderr: {err}");
        match msg.as_str() {
            // These name store paths, whose hashes the test does not repeat.
            "__layout_too_long__" => assert!(
                last.starts_with("visualStudioBuildToolsLayer: the layout's path in the guest, \\\\192.168.0.2\\winvm\\store\\")
                    && last.ends_with("-RESTRICTDIST-visual-studio-2022, must be shorter than 80 characters, as Microsoft requires of layouts: give the layout a name of at most 20 characters, such as \"RESTRICTDIST-vsbt\""),
                "{last}"
            ),
            "__layout_not_restricted__" => assert!(
                last.starts_with("visualStudioBuildToolsLayer: the layout's store path, /nix/store/")
                    && last.ends_with("-vs-layout, must have a name that starts with RESTRICTDIST-: Microsoft's files may not be redistributed, and binary caches refuse store paths with that marker (docs/WINDOWS.md, RESTRICTDIST)"),
                "{last}"
            ),
            "__installer_not_exe__" => assert!(
                last.starts_with("pythonLayer: attribute 'installer' must be a store path whose name ends in .exe, because Windows runs programs by their extension, got /nix/store/")
                    && last.ends_with("-r"),
                "{last}"
            ),
            _ => assert_eq!(last, msg, "for {expr}"),
        }
    }

    // The same checks run behind the library the plugin serves.
    let o = env.eval(&scope(&format!("winvm.cygwinPackagesLayer {{ inherit base; repo = {repo}; packages = [ ]; }}")));
    assert_eval_error(
        &o,
        "cygwinPackagesLayer: attribute 'packages' is an empty list; give one or more Cygwin package names",
    );
}

/// The names the layer functions had before: each throws one line that names its new name,
/// in the library the plugin serves and without it.
#[test]
fn the_old_names_of_the_layer_functions_say_their_new_names() {
    let env = NixEnv::new();
    for (old, new) in [
        ("visualStudioBuildTools", "visualStudioBuildToolsLayer"),
        ("cygwinPackages", "cygwinPackagesLayer"),
        ("python", "pythonLayer"),
    ] {
        let msg = format!(
            "nix-winvm: `{old}` was renamed `{new}` (nix/toolchains.nix); call winvm.{new} with the same arguments"
        );
        assert_eval_error(&env.eval(&scope(&format!("winvm.{old} {{ inherit base; }}"))), &msg);
        assert_eval_error(&eval_without_plugin(&env, &format!("stub.{old}")), &msg);
    }
}

/// `tools` of nix/default.nix is the tools closure every derivation of the plugin names, with
/// its context; reading it writes no derivation, even where evaluation may write them.
#[test]
fn the_librarys_tools_are_the_closure_and_reading_them_writes_no_derivation() {
    let env = NixEnv::new();
    let expr = scope("let t = winvm.tools; in { inherit t; context = builtins.attrNames (builtins.getContext t); }");
    let o = env.instantiate(&["--eval", "--strict", "--json", "--read-write-mode"], &expr);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let tools = text(&v, "t");
    assert!(tools.starts_with("/nix/store/") && tools.ends_with("-winvm-tools"), "{v}");
    assert_eq!(v["context"], serde_json::json!([tools]), "the string must carry the path as its context");
    let drvs: Vec<String> = std::fs::read_dir(env.store().join("nix/store"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".drv"))
        .collect();
    assert!(drvs.is_empty(), "reading the tools wrote {drvs:?}");
    // The closure a build names.
    let build = eval(
        &env,
        "(builtins.windowsDerivation { name = \"x\"; script = \"\"; image = winvm.standinImage { }; }).drvAttrs.winvmTools",
    );
    assert_eq!(build, tools);
}

/// A mirror on a loopback port that serves the files under `root`: the fixed-output fetches of
/// nix/cygwin.nix run in the sandbox, which shows no host file to a file:// URL but lets them
/// reach the network. Its thread ends with the test process.
fn serve(root: PathBuf) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = answer(&root, stream);
        }
    });
    port
}

/// One GET, then the connection closes.
fn answer(root: &Path, mut stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let target = request.split(' ').nth(1).unwrap_or("/");
    let body = if target.contains("..") { None } else { std::fs::read(root.join(target.trim_start_matches('/'))).ok() };
    match body {
        Some(b) => {
            write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", b.len())?;
            stream.write_all(&b)
        }
        None => stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    }
}

/// The files below `dir` (links followed), by relative path, with their contents.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(top: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(top, &path, out);
            } else {
                let rel = path.strip_prefix(top).unwrap().display().to_string();
                out.push((rel, std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// nix/cygwin.nix with its defaults: the tools closure's busybox sh and PATH, system
/// x86_64-linux. Built for real in the sandbox (nix/sandbox.conf, no path of the host), once
/// by nix-build and once by a flake in pure evaluation; each build is a new derivation (its
/// name), so neither finds the other's output. The result is the fixture folder, file for file.
#[test]
fn the_cygwin_repository_builds_in_the_sandbox_with_the_tools_closure() {
    let fixture = checkout("tests/fixtures/cygwin-repo");
    let port = serve(fixture.clone());
    let mirror = format!("http://127.0.0.1:{port}/cygwin-packages/nix-winvm-mirror");
    let ini = fixture.join("cygwin-packages/nix-winvm-mirror/x86_64/setup.ini");
    let exe = fixture.join("setup-x86_64.exe");
    let unique = tempfile::Builder::new().prefix("nix-winvm-cygwin").tempdir().unwrap();
    let suffix: String =
        unique.path().file_name().unwrap().to_string_lossy().chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    let expected = files(&fixture);

    // nix-build, impure: the library from the checkout.
    let name = format!("cygwin-repo-{suffix}-build");
    let repo = format!(
        r#"import {cygwin} {{ setupIni = {ini}; packages = [ "make" ]; mirror = "{mirror}"; setupExe = {exe}; name = "{name}"; }}"#,
        cygwin = checkout("nix/cygwin.nix").display(),
        ini = ini.display(),
        exe = exe.display(),
    );
    let o = sandboxed_nix_build()
        .args(["--no-out-link", "-E"])
        .arg(format!(
            "let winvm = import {lib} {{ }}; r = {repo}; in \
               assert r.system == \"x86_64-linux\"; \
               assert r.drvAttrs.builder == \"${{winvm.tools}}/bin/sh\"; \
               assert r.drvAttrs.PATH == \"${{winvm.tools}}/bin\"; \
               assert builtins.hasContext r.drvAttrs.builder; r",
            lib = checkout("nix").display()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let built = PathBuf::from(stdout(&o));
    assert!(built.to_string_lossy().ends_with(&name), "{}", built.display());
    assert_eq!(files(&built), expected, "{}", built.display());

    // A flake, pure: the library copied into it, as a flake that vendors nix/ would hold it.
    let flake = unique.path();
    std::fs::create_dir(flake.join("nix")).unwrap();
    for f in ["default.nix", "cygwin.nix", "toolchains.nix"] {
        std::fs::copy(checkout("nix").join(f), flake.join("nix").join(f)).unwrap();
    }
    std::fs::copy(&ini, flake.join("setup.ini")).unwrap();
    std::fs::copy(&exe, flake.join("setup-x86_64.exe")).unwrap();
    let name = format!("cygwin-repo-{suffix}-flake");
    std::fs::write(
        flake.join("flake.nix"),
        format!(
            r#"{{
  outputs = {{ self }}: {{
    packages.x86_64-linux.default = import ./nix/cygwin.nix {{
      setupIni = ./setup.ini;
      packages = [ "make" ];
      mirror = "{mirror}";
      setupExe = ./setup-x86_64.exe;
      name = "{name}";
    }};
  }};
}}
"#
        ),
    )
    .unwrap();
    let plugin = registered_plugin();
    let o =
        flake_nix(plugin.path(), &["build", "-L", "--no-link", "--json", &format!("path:{}#default", flake.display())]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json: Value = serde_json::from_slice(&o.stdout).unwrap();
    let out = PathBuf::from(json[0]["outputs"]["out"].as_str().unwrap());
    assert!(out.to_string_lossy().ends_with(&name), "{}", out.display());
    assert_eq!(files(&out), expected, "{}", out.display());
}
