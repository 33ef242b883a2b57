//! The plugin loaded into the real `nix`: builtins, derivations, validation, string context.
#![cfg(feature = "plugin")]

mod common;
use common::*;
use std::path::Path;

#[test]
fn the_issue_example_evaluates_to_a_derivation_and_instantiates() {
    let env = NixEnv::new();
    let expr =
        format!(r#"(builtins.windowsDerivation {{ name = "t"; image = {STANDIN_TCG}; script = "echo hi > $out"; }})"#);
    let o = env.eval(&format!("{expr}.type"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "\"derivation\"");
    let o = env.instantiate(&[], &expr);
    assert!(o.status.success(), "{}", stderr(&o));
    let drv = stdout(&o);
    assert!(drv.starts_with("/nix/store/") && drv.ends_with("-t.drv"), "{drv}");
    assert!(env.store().join(drv.trim_start_matches('/')).is_file());
}

fn show_derivation(env: &NixEnv, expr: &str) -> serde_json::Value {
    let o = env.instantiate(&[], expr);
    assert!(o.status.success(), "{}", stderr(&o));
    let drv = stdout(&o);
    let o = env.nix(&["show-derivation", &drv]);
    assert!(o.status.success(), "{}", stderr(&o));
    let all: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    if all.get("version").is_none() {
        return all[&drv].clone();
    }
    // Nix 2.33 and later: { version, derivations: { BASENAME: { inputs: { srcs, drvs }, ... } } }.
    let name = drv.trim_start_matches("/nix/store/");
    let mut d = all["derivations"][name].clone();
    assert!(d.is_object(), "{drv} missing in {all}");
    d["inputSrcs"] = d["inputs"]["srcs"].clone();
    d["inputDrvs"] = d["inputs"]["drvs"].clone();
    d
}

#[test]
fn build_derivation_attributes() {
    let env = NixEnv::new();
    let d = show_derivation(
        &env,
        &format!(
            r#"builtins.windowsDerivation {{ name = "t"; image = {STANDIN_TCG}; script = "true"; FOO = "bar"; timeout = 60; outputs = [ "out" "dev" ]; }}"#
        ),
    );
    assert_eq!(d["system"], "x86_64-linux");
    assert_eq!(d["args"], serde_json::json!(["build"]));
    let builder = d["builder"].as_str().unwrap();
    assert!(builder.starts_with("/nix/store/") && builder.ends_with("-nix-winvm-builder"), "{builder}");
    assert_eq!(d["env"]["FOO"], "bar");
    assert_eq!(d["env"]["script"], "true");
    assert!(d["outputs"]["out"].is_object() && d["outputs"]["dev"].is_object(), "{d}");
    assert!(d["env"].get("timeout").is_none(), "timeout is consumed, not passed through");
    let spec: serde_json::Value = serde_json::from_str(d["env"]["winvmBuildSpec"].as_str().unwrap()).unwrap();
    assert_eq!(spec["timeoutSecs"], 60);
    assert_eq!(spec["image"]["guest"], "standin");
    assert_eq!(spec["image"]["accel"], "tcg");
    assert!(d["env"].get("requiredSystemFeatures").is_none(), "tcg needs no kvm feature");
    // The image is an input derivation, its path is in the environment.
    let inputs = d["inputDrvs"].as_object().unwrap();
    assert!(inputs.keys().any(|k| k.ends_with("-winvm-standin-image.drv")), "{inputs:?}");
    assert!(d["env"]["image"].as_str().unwrap().ends_with("-winvm-standin-image"));
}

#[test]
fn kvm_images_require_the_kvm_feature() {
    let env = NixEnv::new();
    let d = show_derivation(
        &env,
        r#"builtins.windowsDerivation { name = "t"; image = builtins.windowsImage { guest = "standin"; }; script = "true"; requiredSystemFeatures = [ "big-parallel" ]; }"#,
    );
    assert_eq!(d["env"]["requiredSystemFeatures"], "big-parallel kvm");
}

#[test]
fn image_is_a_chain_of_three_derivations_with_stages_exposed() {
    let env = NixEnv::new();
    let img = format!("({STANDIN_TCG})");
    let o = env.eval(&format!(
        "let i = {img}; in [ i.name i.media.name i.installed.name i.type (builtins.fromJSON i.winvmImageSpec).memoryMib ]"
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        r#"["winvm-standin-image","winvm-standin-media","winvm-standin-installed","derivation",256]"#
    );
    let d = show_derivation(&env, &img);
    assert_eq!(d["args"], serde_json::json!(["suspend"]));
    let inputs: Vec<&String> = d["inputDrvs"].as_object().unwrap().keys().collect();
    assert!(inputs.iter().any(|k| k.ends_with("-winvm-standin-installed.drv")), "{inputs:?}");
    assert!(inputs.iter().any(|k| k.ends_with("-winvm-standin-media.drv")), "{inputs:?}");
    let media = show_derivation(&env, &format!("{img}.media"));
    assert_eq!(media["args"], serde_json::json!(["media"]));
    let srcs = media["inputSrcs"].as_array().unwrap();
    assert!(srcs.iter().any(|s| s.as_str().unwrap().ends_with("-kernel")), "{srcs:?}");
}

#[test]
fn script_context_makes_files_and_derivations_inputs() {
    let env = NixEnv::new();
    let file = env.dir.path().join("some-file");
    std::fs::write(&file, "hello\n").unwrap();
    let d = show_derivation(
        &env,
        &format!(
            r#"let dep = derivation {{ name = "dep"; system = "x86_64-linux"; builder = "/bin/sh"; }};
               in builtins.windowsDerivation {{ name = "t"; image = {STANDIN_TCG};
                    script = "cat ${{{}}} ${{dep}} > $out"; }}"#,
            path_str(&file)
        ),
    );
    let srcs: Vec<String> = d["inputSrcs"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect();
    assert!(srcs.iter().any(|s| s.ends_with("-some-file")), "{srcs:?}");
    let drvs: Vec<&String> = d["inputDrvs"].as_object().unwrap().keys().collect();
    assert!(drvs.iter().any(|k| k.ends_with("-dep.drv")), "{drvs:?}");
}

#[test]
fn run_in_windows_vm_wraps_a_plain_derivation() {
    let env = NixEnv::new();
    let script = env.dir.path().join("builder.sh");
    std::fs::write(&script, "echo hi > $out\n").unwrap();
    let d = show_derivation(
        &env,
        &format!(
            r#"builtins.runInWindowsVM (derivation {{
                 name = "legacy"; system = "x86_64-linux"; builder = "/bin/sh";
                 args = [ "-e" {} ]; HELLO = "world";
                 windowsImage = {{ guest = "standin"; accel = "tcg"; }};
               }})"#,
            path_str(&script)
        ),
    );
    assert_eq!(d["args"], serde_json::json!(["build"]));
    assert_eq!(d["env"]["winvmOrigBuilder"], "/bin/sh");
    assert_eq!(d["env"]["winvmArgc"], "2");
    assert_eq!(d["env"]["winvmArg0"], "-e");
    assert!(d["env"]["winvmArg1"].as_str().unwrap().ends_with("-builder.sh"), "args keep their context");
    assert_eq!(d["env"]["HELLO"], "world");
    assert!(d["env"].get("windowsImage").is_none());
    let spec: serde_json::Value = serde_json::from_str(d["env"]["winvmBuildSpec"].as_str().unwrap()).unwrap();
    assert_eq!(spec["runOriginalBuilder"], true);
    let drvs: Vec<&String> = d["inputDrvs"].as_object().unwrap().keys().collect();
    assert!(drvs.iter().any(|k| k.ends_with("-winvm-standin-image.drv")), "{drvs:?}");
}

#[test]
fn windows_image_with_fixed_iso_has_a_require_file_stage_and_restricted_names() {
    let env = NixEnv::new();
    let hash = "a".repeat(64);
    let o = env.eval(&format!(
        r#"let i = builtins.windowsImage {{ iso = {{ name = "win.iso"; sha256 = "{hash}"; }}; edition = "Windows 11 Pro"; }};
           in [ i.name i.installed.name i.media.name (builtins.fromJSON i.winvmImageSpec).guest.windows.edition ]"#
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        r#"["RESTRICTDIST-winvm-windows-image","RESTRICTDIST-winvm-windows-installed","winvm-windows-media","Windows 11 Pro"]"#
    );
}

/// `iso = { name; hash; }` with the SRI hash `nix hash file` prints is the same ISO as
/// `{ name; sha256; }` with `sha256sum`'s: the same derivations, and the path
/// `nix-store --add-fixed sha256` adds.
#[test]
fn an_iso_named_by_an_sri_hash_is_the_path_add_fixed_makes() {
    let env = NixEnv::new();
    let iso = env.dir.path().join("win.iso");
    std::fs::write(&iso, "not really an ISO\n").unwrap();
    let hash = |args: &[&str]| {
        let o = env.command("nix").args(["hash", "file"]).args(args).arg(&iso).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let (sri, hex) = (hash(&[]), hash(&["--base16"]));
    assert!(sri.starts_with("sha256-"), "{sri}");
    let o = env
        .command("nix-store")
        .arg("--store")
        .arg(env.store())
        .args(["--add-fixed", "sha256"])
        .arg(&iso)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let added = stdout(&o);
    let image = |field: &str| {
        format!(r#"builtins.windowsImage {{ iso = {{ name = "win.iso"; {field}; }}; edition = "Windows 11 Pro"; }}"#)
    };
    let (by_sri, by_hex) = (image(&format!(r#"hash = "{sri}""#)), image(&format!(r#"sha256 = "{hex}""#)));
    let o = env
        .eval(&format!("let a = {by_sri}; b = {by_hex}; in [ a.drvPath b.drvPath a.installed.drvAttrs.iso.outPath ]"));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0], v[1], "both forms of one hash must make the same image");
    assert_eq!(v[2], added.as_str(), "the require-file stage's output is the path nix-store --add-fixed made");
}

/// Each bad input must be a clean Nix error with exactly this message: never a crash.
#[test]
fn bad_inputs_give_specific_errors() {
    let env = NixEnv::new();
    let img = STANDIN_TCG;
    let cases: Vec<(String, &str)> = vec![
        ("builtins.windowsImage 3".into(), "windowsImage: the argument must be a set of attributes, got an integer"),
        (r#"builtins.windowsImage { guest = "standin"; memroy = 3; }"#.into(), "windowsImage: unknown attribute 'memroy'; did you mean 'memory'?"),
        (r#"builtins.windowsImage { guest = "standin"; colour = 3; }"#.into(), "windowsImage: unknown attribute 'colour'; known attributes: accel, cpus, cygwinPackages, cygwinRepo, diskSize, edition, efi, guest, installCommands, iso, locale, memory, pin, productKey, timeout"),
        // An unknown attribute is refused by its name, unevaluated.
        (r#"builtins.windowsImage { guest = "standin"; colour = throw "forced"; }"#.into(), "windowsImage: unknown attribute 'colour'; known attributes: accel, cpus, cygwinPackages, cygwinRepo, diskSize, edition, efi, guest, installCommands, iso, locale, memory, pin, productKey, timeout"),
        (r#"builtins.windowsImage { guest = "mac"; }"#.into(), r#"windowsImage: attribute 'guest' must be one of "windows", "standin", got "mac""#),
        (r#"builtins.windowsImage { guest = "standin"; memory = "lots"; }"#.into(), "windowsImage: attribute 'memory' must be an integer (MiB), got a string"),
        (r#"builtins.windowsImage { guest = "standin"; memory = 4294967296; }"#.into(), "windowsImage: attribute 'memory' must be between 64 and 1048576 (MiB), got 4294967296"),
        (r#"builtins.windowsImage { guest = "standin"; accel = true; }"#.into(), r#"windowsImage: attribute 'accel' must be one of "kvm", "tcg", got a Boolean"#),
        (r#"builtins.windowsImage { guest = "standin"; edition = "x"; }"#.into(), r#"windowsImage: attribute 'edition' applies only to guest = "windows""#),
        (r#"builtins.windowsImage { edition = "Windows 11 Pro"; }"#.into(), r#"windowsImage: missing required attribute 'iso' for guest = "windows" (a path to the ISO, or { name; sha256; } or { name; hash; } for one added with `nix-store --add-fixed sha256 FILE`)"#),
        (r#"builtins.windowsImage { iso = { name = "w.iso"; sha256 = "abc"; }; edition = "x"; }"#.into(), r#"windowsImage: attribute 'iso.sha256' must be 64 hexadecimal digits, got "abc""#),
        (r#"builtins.windowsImage { iso = { name = "w.iso"; hash = "sha256-abc="; }; edition = "x"; }"#.into(), r#"windowsImage: attribute 'iso.hash' must be a SHA-256 hash in SRI form, "sha256-" and 44 characters of base64 (nix hash file FILE), got "sha256-abc=""#),
        (r#"builtins.windowsImage { iso = { name = "w.iso"; hash = 3; }; edition = "x"; }"#.into(), r#"windowsImage: attribute 'iso.hash' must be a string ("sha256-" and 44 characters of base64), got an integer"#),
        (r#"builtins.windowsImage { iso = { name = "w.iso"; }; edition = "x"; }"#.into(), "windowsImage: attribute 'iso' is missing field 'sha256' or 'hash' (a path to the ISO, or { name; sha256; } or { name; hash; } for one added with `nix-store --add-fixed sha256 FILE`)"),
        (format!(r#"builtins.windowsImage {{ iso = {{ name = "w.iso"; sha256 = "{}"; hash = "sha256-{}="; }}; edition = "x"; }}"#, "0".repeat(64), "A".repeat(43)), "windowsImage: attribute 'iso' has both 'sha256' and 'hash'; give one of them"),
        (r#"builtins.windowsImage { iso = "/tmp/w.iso"; edition = "x"; }"#.into(), "windowsImage: attribute 'iso' must be a path to the ISO, or { name; sha256; } or { name; hash; } for one added with `nix-store --add-fixed sha256 FILE`, got a string"),
        (r#"builtins.windowsImage { iso = ./x; cygwinPackages = [ "git" 3 ]; edition = "x"; }"#.into(), "windowsImage: element 1 of attribute 'cygwinPackages' must be a string, got an integer"),
        // The spec's own checks, which the builder runs again on the spec it reads.
        (r#"builtins.windowsImage { iso = ./x; edition = "Windows 11 Pro"; diskSize = 1024; }"#.into(), "windowsImage: attribute 'diskSize' (1024 MiB) is below the 32768 MiB Windows needs"),
        (r#"builtins.windowsImage { iso = ./x; edition = "Windows 11 Pro"; productKey = "abcde-12345"; }"#.into(), r#"windowsImage: attribute 'productKey' ("abcde-12345") is not five groups of five upper-case letters or digits (XXXXX-XXXXX-XXXXX-XXXXX-XXXXX)"#),
        (r#"builtins.windowsImage { iso = ./x; edition = "Windows 11 Pro"; locale = "english"; }"#.into(), r#"windowsImage: attribute 'locale' ("english") is not a language tag such as "en-US""#),
        (r#"builtins.windowsImage { iso = ./x; edition = "Windows 11 Pro"; cygwinPackages = [ "gcc&calc" ]; }"#.into(), r#"windowsImage: attribute 'cygwinPackages': "gcc&calc" is not a Cygwin package name (letters, digits and . _ + -)"#),
        (r#"builtins.windowsImage { iso = ./x; edition = " "; }"#.into(), r#"windowsImage: attribute 'edition' is empty: give the image name from install.wim, e.g. "Windows 11 Pro""#),
        (format!(r#"builtins.windowsDerivation {{ name = "t"; image = {img}; }}"#), "windowsDerivation: missing required attribute 'script' (a string: the shell script to run in the guest)"),
        (r#"builtins.windowsDerivation { name = "t"; script = ""; }"#.into(), "windowsDerivation: missing required attribute 'image' (the result of builtins.windowsImage { ... })"),
        (r#"builtins.windowsDerivation { name = "t"; script = ""; image = { }; }"#.into(), "windowsDerivation: attribute 'image' must be the result of builtins.windowsImage { ... }, got a set"),
        (r#"builtins.windowsDerivation { name = "t"; script = ""; image = derivation { name = "x"; system = "x"; builder = "x"; }; }"#.into(), "windowsDerivation: attribute 'image' must be the result of builtins.windowsImage { ... }, got a derivation that is not a nix-winvm image"),
        (format!(r#"builtins.windowsDerivation {{ name = "t"; image = {img}; script = ""; memory = "x"; }}"#), "windowsDerivation: attribute 'memory' must be an integer (MiB), got a string"),
        (format!(r#"builtins.windowsDerivation {{ name = "t"; image = {img}; script = ""; memory = 512; }}"#), "windowsDerivation: attribute 'memory' (512 MiB) differs from the image's (256 MiB): a VM revived from a memory snapshot keeps the shape it was saved with; build another image"),
        (format!(r#"builtins.windowsDerivation {{ name = "t"; image = {img}; script = 3; }}"#), "windowsDerivation: attribute 'script' must be a string (the shell script to run in the guest), got an integer"),
        (format!(r#"builtins.windowsDerivation {{ name = "t"; image = {img}; script = ""; builder = "/bin/sh"; }}"#), "windowsDerivation: attribute 'builder' cannot be set: nix-winvm's builder runs the VM; put the build commands in 'script'"),
        (format!(r#"builtins.windowsDerivation {{ name = "t"; image = {img}; script = ""; outputs = [ ]; }}"#), "windowsDerivation: attribute 'outputs' must not be empty"),
        (format!(r#"builtins.windowsDerivation {{ name = "t"; image = {img}; script = ""; timeout = 0; }}"#), "windowsDerivation: attribute 'timeout' must be between 1 and 604800 (seconds), got 0"),
        ("builtins.runInWindowsVM [ ]".into(), "runInWindowsVM: the argument must be a derivation, got a list"),
        ("builtins.runInWindowsVM { }".into(), "runInWindowsVM: the argument must be a derivation, got a set without 'drvAttrs'"),
        (r#"builtins.runInWindowsVM (derivation { name = "x"; system = "x"; builder = "x"; })"#.into(), "runInWindowsVM: the derivation has no attribute 'windowsImage'; set it to builtins.windowsImage { ... } or to that builtin's arguments"),
        (r#"builtins.runInWindowsVM (derivation { name = "x"; system = "x"; builder = "x"; windowsImage = { guest = "standin"; memory = "x"; }; })"#.into(), "runInWindowsVM: windowsImage: attribute 'memory' must be an integer (MiB), got a string"),
    ];
    for (expr, msg) in cases {
        let o = env.instantiate(&[], &expr);
        assert_eval_error(&o, msg);
        // The error points at the caller's expression.
        assert!(stderr(&o).contains("«string»:1:"), "no position in:\n{}", stderr(&o));
    }
}

#[test]
fn errors_thrown_by_the_users_own_values_propagate() {
    let env = NixEnv::new();
    let o = env.eval(r#"builtins.windowsImage { guest = "standin"; memory = throw "my own error"; }"#);
    assert_eval_error(&o, "my own error");
}

#[test]
fn unused_attributes_stay_lazy() {
    // `derivation` does not force attributes it merely passes on, and neither do we.
    let env = NixEnv::new();
    let o = env.eval(&format!(
        r#"(builtins.windowsDerivation {{ name = "t"; image = {STANDIN_TCG}; script = ""; unused = throw "forced"; }}).type"#
    ));
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_plugin_built_for_another_nix_refuses_to_register_with_one_line() {
    let env = NixEnv::new();
    let o = env.eval("builtins ? windowsImage && builtins ? windowsDerivation && builtins ? runInWindowsVM");
    assert_eq!(stdout(&o), "true", "{}", stderr(&o));
    assert!(!stderr(&o).contains("was built for Nix"));

    // The same plugin with the recorded version string patched to another, same-length version.
    let version = nix_winvm::NIX_VERSION;
    let fake: String = version.chars().map(|c| if c.is_ascii_digit() { '9' } else { c }).collect();
    let mut bytes = std::fs::read(plugin()).unwrap();
    let needle = format!("\0{version}\0").into_bytes();
    let mut patched = 0;
    let mut i = 0;
    while i + needle.len() <= bytes.len() {
        if bytes[i..i + needle.len()] == needle[..] {
            bytes[i + 1..i + needle.len() - 1].copy_from_slice(fake.as_bytes());
            patched += 1;
        }
        i += 1;
    }
    assert!(patched > 0, "version string not found in the plugin");
    let other = env.dir.path().join("libnix_winvm_other.so");
    std::fs::write(&other, bytes).unwrap();
    let mut c = env.command("nix-instantiate");
    c.arg("--plugin-files").arg(&other).args(["--eval", "-E", "builtins ? windowsImage"]);
    assert_refused_in_one_line(
        &c.output().unwrap(),
        &format!(
            "nix-winvm: this plugin was built for Nix {fake} but is loaded into Nix {version}; rebuild it against this Nix's headers. Its builtins are not registered."
        ),
    );
}

/// The plugin registered nothing and said why in exactly one line.
fn assert_refused_in_one_line(o: &std::process::Output, line: &str) {
    assert_eq!(stdout(o), "false", "{}", stderr(o));
    let lines: Vec<String> = stderr(o).lines().filter(|l| l.contains("nix-winvm")).map(String::from).collect();
    assert_eq!(lines, vec![line.to_string()]);
}

/// Nix's build hook reloads plugin-files from another folder: a relative path would fail there
/// with "unexpected EOF reading a line", so the plugin refuses it at once, in one line.
#[test]
fn a_plugin_loaded_through_a_relative_path_asks_for_an_absolute_one() {
    let env = NixEnv::new();
    let p = plugin();
    let dir = p.parent().unwrap();
    let relative = Path::new(dir.file_name().unwrap()).join(p.file_name().unwrap());
    let mut c = env.command("nix-instantiate");
    c.current_dir(dir.parent().unwrap()).arg("--plugin-files").arg(&relative).arg("--store").arg(env.store()).args([
        "--eval",
        "-E",
        "builtins ? windowsImage",
    ]);
    assert_refused_in_one_line(
        &c.output().unwrap(),
        &format!(
            "nix-winvm: the plugin was loaded as '{}', a relative path; give --plugin-files (or plugin-files) an absolute path, because Nix's build hook reloads plugins from another folder. Its builtins are not registered.",
            relative.display()
        ),
    );
}

/// Evaluates a Nix file holding `expr`, where the byte \x01 is replaced by 0xff (not UTF-8).
fn instantiate_bytes(env: &NixEnv, args: &[&str], expr: &str) -> std::process::Output {
    let bytes: Vec<u8> = expr.bytes().map(|b| if b == 1 { 0xff } else { b }).collect();
    let file = env.dir.path().join("bytes.nix");
    std::fs::write(&file, bytes).unwrap();
    let mut c = env.command("nix-instantiate");
    c.arg("--plugin-files").arg(plugin()).arg("--store").arg(env.store()).args(args).arg(&file);
    c.output().unwrap()
}

#[test]
fn strings_that_are_not_utf8_are_forwarded_where_forwarded_and_named_where_text() {
    let env = NixEnv::new();
    let img = STANDIN_TCG;
    // Passed through: the bytes land in the derivation unchanged.
    let o = instantiate_bytes(
        &env,
        &[],
        &format!(
            "builtins.windowsDerivation {{ name = \"t\"; image = {img}; script = \"echo \u{1}\"; RAW = \"a\u{1}b\"; }}"
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let drv = std::fs::read(env.store().join(stdout(&o).trim_start_matches('/'))).unwrap();
    let has = |needle: &[u8]| drv.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"\"echo \xff\"") && has(b"\"a\xffb\""), "{}", String::from_utf8_lossy(&drv));
    // Needed as text: a clear error, never "data for rust::String is not utf-8".
    let cases = [
        (
            format!("builtins.windowsDerivation {{ name = \"t\u{1}\"; image = {img}; script = \"\"; }}"),
            "windowsDerivation: attribute 'name' must be UTF-8 text, but byte 1 of the string is not valid UTF-8",
        ),
        (
            "builtins.windowsImage { iso = ./x.iso; edition = \"Windows\u{1}\"; }".to_string(),
            "windowsImage: attribute 'edition' must be UTF-8 text, but byte 7 of the string is not valid UTF-8",
        ),
        (
            "builtins.windowsImage { guest = \"standin\"; \"m\u{1}\" = 1; }".to_string(),
            "windowsImage: attribute name 'm\u{fffd}' is not valid UTF-8",
        ),
        (
            "builtins.windowsImage { iso = ./x.iso; edition = \"W\"; cygwinPackages = [ \"git\" \"\u{1}\" ]; }".to_string(),
            "windowsImage: element 1 of attribute 'cygwinPackages' must be UTF-8 text, but byte 0 of the string is not valid UTF-8",
        ),
    ];
    for (expr, msg) in cases {
        assert_eval_error(&instantiate_bytes(&env, &[], &expr), msg);
    }
}

/// The NixOS module and the package, evaluated against stubs of nixpkgs that hold only the names
/// nixpkgs has (tests/fixtures/module-eval.nix): the plugin is built with the system's `pkgs`
/// against its `nix.package`, a package built for another Nix and Lix are refused, `kvm` goes to
/// `extra-system-features`, and the builder, the tools and the kernel are derivations of their own
/// that the plugin's record names, none of them depending on `nix`.
#[test]
fn the_nixos_module_builds_for_the_systems_nix_and_refuses_another() {
    let env = NixEnv::new();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/module-eval.nix");
    let eval = |args: &[&str]| {
        let mut c = env.command("nix-instantiate");
        c.arg("--store").arg(env.store()).args(["--eval", "--strict", "--json"]).args(args).arg(fixture);
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let store = "/nix/store/00000000000000000000000000000000-";
    let ok = eval(&["--argstr", "systemNix", "2.34.8"]);
    // Only options NixOS declares (the stubs fail on any other), and kvm added, not replacing.
    assert_eq!(
        ok["defines"],
        serde_json::json!(["assertions", "nix.settings.extra-system-features", "nix.settings.plugin-files"]),
        "{ok}"
    );
    assert_eq!(ok["extraFeatures"], serde_json::json!(["kvm"]));
    assert!(ok["assertions"].as_array().unwrap().iter().all(|a| a["assertion"] == true), "{ok}");
    assert_eq!(ok["pkgNix"], "2.34.8");
    assert_eq!(ok["builtWithSystemNix"], true, "built with the system's pkgs and nix.package");
    assert_eq!(ok["plugin"], format!("{store}nix-winvm-0.1.0/lib/libnix_winvm.so"));
    assert_eq!(ok["pluginNamesNix"], true);
    assert_eq!(ok["pluginFlags"], serde_json::json!(["--lib"]));
    // Editing a doc, a test or nix/ rebuilds nothing; the builder's source has no C++ either.
    assert_eq!(ok["pluginSrc"], serde_json::json!(["Cargo.toml", "Cargo.lock", "build.rs", "src", "benches", "cpp"]));
    // The builder: the same crate without the plugin feature, with no `nix` anywhere in it.
    let builder = &ok["builder"];
    assert_eq!(builder["name"], "nix-winvm-builder-0.1.0");
    assert_eq!(builder["namesNix"], false, "{builder}");
    assert_eq!(builder["noDefaultFeatures"], true);
    assert_eq!(builder["flags"], serde_json::json!(["--bin", "nix-winvm-builder"]));
    assert_eq!(builder["src"], serde_json::json!(["Cargo.toml", "Cargo.lock", "build.rs", "src", "benches"]));
    assert!(builder["inputs"].as_array().unwrap().iter().all(|i| !i.as_str().unwrap().starts_with("nix")), "{builder}");
    // The record beside the plugin names the three store paths, and nothing else.
    let record = serde_json::json!({
        "builder": { "path": format!("{store}nix-winvm-builder-0.1.0/bin/nix-winvm-builder") },
        "tools": { "path": format!("{store}winvm-tools") },
        "kernel": { "path": format!("{store}winvm-kernel") },
    });
    assert_eq!(ok["record"], record);
    assert_eq!(ok["recordFile"]["name"], "nix-winvm.paths.json");
    assert_eq!(serde_json::from_str::<serde_json::Value>(ok["recordFile"]["text"].as_str().unwrap()).unwrap(), record);
    assert_eq!(
        ok["postInstall"],
        format!("install -Dm644 {store}nix-winvm.paths.json $out/lib/nix-winvm.paths.json\n")
    );
    // Every program the builder starts (src/tools.rs and its callers), mke2fs among them.
    assert_eq!(ok["tools"], "winvm-tools");
    assert_eq!(
        ok["toolPaths"],
        serde_json::json!([
            "qemu_kvm",
            "vde2",
            "samba",
            "busybox-static",
            "dropbear",
            "openssh",
            "xz",
            "e2fsprogs",
            "mtools",
            "coreutils",
            "xorriso",
            "OVMF-fd",
            "python3"
        ])
    );
    // The controller's libraries: the closure of smbd's package and the builder, in the tools.
    assert_eq!(ok["controllerRoots"], serde_json::json!(["samba", "nix-winvm-builder-0.1.0"]));
    assert!(
        ok["toolsPostBuild"]
            .as_str()
            .unwrap()
            .contains(&format!("ln -s {store}closure-info $out/share/nix-winvm/controller-closure")),
        "{ok}"
    );
    // The kernel: nixpkgs' bzImage and its modules, uncompressed into one flat folder.
    let kernel = &ok["kernel"];
    assert_eq!(kernel["name"], "winvm-kernel");
    assert_eq!(kernel["inputs"], serde_json::json!(["xz", "zstd"]));
    let script = kernel["script"].as_str().unwrap();
    let parts = [
        format!("moddir={store}linux-6.12.60/lib/modules/6.12.60\n"),
        format!("cp {store}linux-6.12.60/bzImage $out/vmlinuz\n"),
        "$moddir/modules.dep".to_string(),
        r#"xz -dc "$moddir/$rel" > "$out/modules/${name%.xz}""#.to_string(),
        "cp $moddir/modules.builtin $out/modules/modules.builtin".to_string(),
    ];
    for part in &parts {
        assert!(script.contains(part.as_str()), "{part} in {script}");
    }

    let no_kvm = eval(&["--argstr", "systemNix", "2.34.8", "--arg", "kvm", "false"]);
    assert_eq!(no_kvm["defines"], serde_json::json!(["assertions", "nix.settings.plugin-files"]), "{no_kvm}");

    let other = eval(&["--argstr", "systemNix", "2.34.8", "--argstr", "builtFor", "2.28.5"]);
    assert_eq!(other["assertions"][1]["assertion"], false, "{other}");
    assert_eq!(
        other["assertions"][1]["message"],
        "nix-winvm.package was built for Nix 2.28.5, but the system runs Nix 2.34.8: the plugin would refuse to load. Use pkgs.callPackage with nix = config.nix.package."
    );

    let lix = eval(&["--argstr", "systemNix", "2.93.3", "--argstr", "nixPname", "lix"]);
    assert_eq!(lix["assertions"][0]["assertion"], false, "{lix}");
    assert_eq!(
        lix["assertions"][0]["message"],
        "nix-winvm does not support Lix yet (nix.package is lix): its plugin interface differs from Nix's. Set nix.package to a Nix (pkgs.nix) to use nix-winvm."
    );
}
