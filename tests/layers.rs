//! Images made from images (`windowsImage { base = ...; installCommands = [ ... ]; }`), as Nix
//! runs them: real nix-build in the sandbox, TCG, the standin guest. Each test's layers carry
//! a token of their own, so they are built anew on every run; the base image is shared.
#![cfg(feature = "plugin")]

mod common;
use common::{sandboxed_nix_build, STANDIN_TCG};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

fn nix_build(args: &[&str]) -> Output {
    sandboxed_nix_build().arg("--no-out-link").args(args.iter().map(OsStr::new)).output().expect("run nix-build")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn outputs(o: &Output) -> Vec<PathBuf> {
    assert!(o.status.success(), "nix-build failed:\n{}", stderr(o));
    String::from_utf8_lossy(&o.stdout).lines().map(PathBuf::from).collect()
}

fn token(name: &str) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{name}-{t}")
}

/// A Nix string literal ('' ... '') holding `text`.
fn lit(text: &str) -> String {
    format!("''{}''", text.replace("''", "'''").replace("${", "''${"))
}

/// Two layers on the standin base: the first installs a file, a tool (into the guest's own
/// /bin) and a store path its command names (string context); the second a file of its own,
/// `second` its command. Then `script` built on the second.
fn two_layers(tok: &str, second: &str, script: &str) -> String {
    format!(
        r#"let
  payload = builtins.toFile "layer-payload" "payload {tok}";
  one = builtins.windowsImage {{
    base = {STANDIN_TCG};
    name = "layer-one";
    installCommands = [
      "mkdir -p /opt/one && echo 'one {tok}' > /opt/one/file && echo installing-layer-one"
      {tool}
      "cp ${{payload}} /opt/one/payload"
    ];
  }};
  two = builtins.windowsImage {{ base = one; name = "layer-two"; installCommands = [ {second} ]; }};
in builtins.windowsDerivation {{ name = "on-two"; image = two; token = "{tok}"; script = {script}; }}"#,
        tool = lit(
            "printf '#!/bin/sh\\necho tool from layer one\\n' > /bin/layer-one-tool && chmod 755 /bin/layer-one-tool"
        ),
        second = lit(second),
        script = lit(script),
    )
}

const SEE_BOTH: &str = "mkdir $out; cat /opt/one/file /opt/two > $out/files; layer-one-tool > $out/tool; cat /opt/one/payload > $out/payload";

#[test]
fn a_build_on_the_second_layer_sees_what_both_installed_and_a_change_rebuilds_the_layer_its_memory_and_the_build() {
    let tok = token("layers");
    let expr = two_layers(&tok, "echo 'two a' > /opt/two", SEE_BOTH);
    let o = nix_build(&["-E", &expr]);
    let out = outputs(&o).remove(0);
    assert_eq!(std::fs::read_to_string(out.join("files")).unwrap(), format!("one {tok}\ntwo a\n"));
    assert_eq!(std::fs::read_to_string(out.join("tool")).unwrap(), "tool from layer one\n");
    assert_eq!(std::fs::read_to_string(out.join("payload")).unwrap(), format!("payload {tok}"));
    let log = stderr(&o);
    // Each layer's commands print into its own build log, numbered.
    for line in ["layer command 1 of 3", "installing-layer-one", "layer command 3 of 3", "layer command 1 of 1"] {
        assert!(log.contains(line), "no '{line}' in:\n{log}");
    }
    assert_eq!(log.matches("layer saved").count(), 2, "{log}");
    // Each layer keeps its report, which links its base's: the second's base is the first.
    let first = log
        .lines()
        .find_map(|l| l.split_once("] layer 2 on ").map(|(_, r)| r.split_once(": ").unwrap().0.to_owned()))
        .unwrap_or_else(|| panic!("no second layer in:\n{log}"));
    let page = std::fs::read_to_string(Path::new(&first).join("report.html")).unwrap();
    for part in ["Steps of layer", "layer saved", "stopping the VMs", "report.html\">"] {
        assert!(page.contains(part), "{first}/report.html lacks {part:?}");
    }
    let products = std::fs::read_to_string(Path::new(&first).join("nix-support/hydra-build-products")).unwrap();
    assert!(products.starts_with(&format!("doc report {first}/report.html\n")), "{products}");

    // The second layer changed: exactly it and the build are built again.
    let changed = two_layers(&tok, "echo 'two b' > /opt/two", SEE_BOTH);
    let dry = nix_build(&["--dry-run", "-E", &changed]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    let to_build: Vec<String> = stderr(&dry)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("/nix/store/") && l.ends_with(".drv"))
        .map(|l| l.split_once('-').unwrap().1.to_owned())
        .collect();
    let mut to_build_sorted = to_build.clone();
    to_build_sorted.sort();
    // The layer, its memory stage (where builds on it find its memory) and the build.
    assert_eq!(to_build_sorted, ["layer-two-memory.drv", "layer-two.drv", "on-two.drv"], "{}", stderr(&dry));
    let o = nix_build(&["-E", &changed]);
    let out = outputs(&o).remove(0);
    assert_eq!(std::fs::read_to_string(out.join("files")).unwrap(), format!("one {tok}\ntwo b\n"));
    assert!(!stderr(&o).contains("layer-one.drv'..."), "the first layer was rebuilt:\n{}", stderr(&o));
}

#[test]
fn a_failing_layer_command_fails_the_layer_with_its_code_and_names_it() {
    let tok = token("failing");
    let expr = format!(
        r#"builtins.windowsImage {{ base = {STANDIN_TCG}; name = "failing-layer"; installCommands = [
            "echo first-ran {tok}"
            "echo about-to-fail; exit 7"
            "echo never-ran"
        ]; }}"#
    );
    let o = nix_build(&["-E", &expr]);
    let log = stderr(&o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("error in the layer stage: layer command 2 exited 7: echo about-to-fail; exit 7"), "{log}");
    // Nix's words: "builder for '...failing-layer.drv' failed with exit code 7" (2.8, 2.26),
    // "Reason: builder failed with exit code 7." (2.34).
    assert!(log.contains("failed with exit code 7"), "{log}");
    assert!(log.contains("about-to-fail") && log.contains(&format!("first-ran {tok}")), "{log}");
    assert!(!log.contains("never-ran\n"), "{log}");
    assert!(!log.contains("layer saved"), "{log}");
}

#[test]
fn a_layer_that_writes_into_the_store_is_refused() {
    let tok = token("store-write");
    let expr = format!(
        r#"builtins.windowsImage {{ base = {STANDIN_TCG}; installCommands = [ "echo {tok} > /nix/store/stray" ]; }}"#
    );
    let o = nix_build(&["-E", &expr]);
    let log = stderr(&o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("the layer's commands wrote into /nix/store (stray )"), "{log}");
    assert!(log.contains("left the guest in a state a build cannot use"), "{log}");
}

/// Which of `names` have a QEMU running now whose environment has `name=NAME` (a layer's
/// derivation name): its session is under way.
fn sessions_running(names: &[String]) -> Vec<bool> {
    let mut running = vec![false; names.len()];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains("qemu-system") {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        for var in environ.split(|b| *b == 0) {
            if let Some(i) = names.iter().position(|n| var == format!("name={n}").as_bytes()) {
                running[i] = true;
            }
        }
    }
    running
}

/// Two layers of one base built at once (`-j2`), each with a build on top: the base's files
/// are shared read-only, each layer's disk and states are its own. That they ran at the same
/// time is seen in /proc while nix-build runs: at some moment both layers' VMs were running.
#[test]
fn two_layers_from_one_base_build_in_parallel() {
    let tok = token("parallel");
    let build = |i: u32| {
        format!(
            r#"(builtins.windowsDerivation {{
                name = "on-parallel-{i}";
                image = builtins.windowsImage {{ base = {STANDIN_TCG}; name = "parallel-{i}";
                  installCommands = [ "echo 'layer {i} {tok}' > /root-mine" ]; }};
                script = "cat /root-mine > $out";
              }})"#
        )
    };
    let child = sandboxed_nix_build()
        .args(["--no-out-link", "-j2", "-E", &format!("[ {} {} ]", build(0), build(1))])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nix-build");
    let names: Vec<String> = (0..2).map(|i| format!("parallel-{i}")).collect();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watcher = std::thread::spawn(move || {
        let (mut seen, mut together) = (vec![false; 2], false);
        while done_rx.try_recv().is_err() {
            let now = sessions_running(&names);
            seen.iter_mut().zip(&now).for_each(|(s, n)| *s |= n);
            together |= now.iter().all(|n| *n);
            std::thread::sleep(Duration::from_millis(100));
        }
        (seen, together)
    });
    let o = child.wait_with_output().unwrap();
    done_tx.send(()).unwrap();
    let (seen, together) = watcher.join().unwrap();
    let outs = outputs(&o);
    assert_eq!(seen, [true, true], "a layer's VMs were never seen running:\n{}", stderr(&o));
    assert!(together, "the two layers' VMs never ran at the same time:\n{}", stderr(&o));
    assert_eq!(outs.len(), 2, "{outs:?}");
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(std::fs::read_to_string(out).unwrap(), format!("layer {i} {tok}\n"));
    }
    assert_eq!(stderr(&o).matches("layer saved").count(), 2, "{}", stderr(&o));
}

/// examples/layers.nix, as the README shows it (its second layer made anew by the message).
#[test]
fn the_layers_example_builds() {
    let tok = token("example");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/layers.nix");
    let o = nix_build(&[example, "--argstr", "message", &format!("three words {tok}")]);
    let out = outputs(&o).remove(0);
    assert_eq!(std::fs::read_to_string(out.join("greeting")).unwrap(), format!("three words {tok}\n"));
    assert_eq!(std::fs::read_to_string(out.join("words")).unwrap(), "3\n");
}

/// The first 24 bytes of a state or memory file's frame, then its JSON header.
fn frame_header(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let len = u32::from_le_bytes(bytes[20..24].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[24..24 + len]).unwrap()
}

fn mb(path: &Path) -> f64 {
    std::fs::metadata(path).unwrap().len() as f64 / 1e6
}

/// A layer keeps only what it changed: its memory file lists the pages that differ from its
/// base's, its state the devices alone, and its disk what its commands still hold (50 MB
/// written and deleted take no room: discarded through to the overlay, trimmed before the
/// save). The first layer leaves 80 MB of random data in a tmpfs, more than a revive writes
/// into its guest: its memory stage puts a RAM file of its own together. The second is
/// trivial: its memory stage links to the first's RAM file, and each revive writes its pages.
/// A build on the second finds both layers' files in the tmpfs, which lives in the guest's
/// memory alone.
#[test]
fn a_layer_stores_only_the_memory_and_disk_it_changed_and_builds_see_every_layers_memory() {
    let tok = token("memory");
    let expr = format!(
        r#"let
  one = builtins.windowsImage {{
    base = {STANDIN_TCG};
    name = "memory-one";
    installCommands = [
      "mkdir -p /mnt/ram && mount -t tmpfs none /mnt/ram && echo 'one {tok}' > /mnt/ram/one"
      "dd if=/dev/urandom of=/mnt/ram/random bs=1M count=80 2>/dev/null && md5sum /mnt/ram/random | cut -c1-32 > /mnt/ram/sum"
      "dd if=/dev/urandom of=/big bs=1M count=50 2>/dev/null && sync && rm /big"
    ];
  }};
  two = builtins.windowsImage {{ base = one; name = "memory-two"; installCommands = [ "echo two > /mnt/ram/two" ]; }};
in {{
  inherit one two;
  build = builtins.windowsDerivation {{
    name = "in-ram";
    image = two;
    script = "cat /mnt/ram/one /mnt/ram/two > $out; md5sum /mnt/ram/random | cut -c1-32 | cmp - /mnt/ram/sum && echo same >> $out";
  }};
}}"#
    );
    let o = nix_build(&["-E", &expr, "-A", "one", "-A", "two", "-A", "build"]);
    let paths = outputs(&o);
    let (one, two, build) = (&paths[0], &paths[1], &paths[2]);
    assert_eq!(std::fs::read_to_string(build).unwrap(), format!("one {tok}\ntwo\nsame\n"));
    let log = stderr(&o);
    // The build mapped a memory stage's RAM file: it expanded nothing itself.
    assert!(!log.contains("expanding the image's memory"), "{log}");
    assert!(log.contains("memory: the base's RAM file, linked; each revive writes the "), "{log}");
    let pages = |layer: &Path| {
        let memory = frame_header(&layer.join("memory"));
        assert_eq!((memory["layer"].as_bool(), memory["memoryMib"].as_u64()), (Some(true), Some(256)), "{memory}");
        memory["pages"].as_u64().unwrap()
    };
    // 80 MB are 19532 pages; the guest's RAM is 256 MiB (65536 pages), and a trivial layer
    // touches a few thousand.
    let (first, second) = (pages(one), pages(two));
    assert!((19532..40000).contains(&first), "the first layer: {first} pages");
    assert!(second > 0 && second < 16384, "the second layer: {second} pages");
    assert!(mb(&two.join("memory")) < 20.0, "the second layer's memory: {} MB", mb(&two.join("memory")));
    for layer in [one, two] {
        let state = frame_header(&layer.join("state"));
        assert_eq!(state["ramOutside"].as_bool(), Some(true), "{state}");
        assert!(mb(&layer.join("state")) < 5.0, "{}: state {} MB", layer.display(), mb(&layer.join("state")));
    }
    // Discarded clusters are holes in the overlay: the file keeps its length, not the room.
    use std::os::unix::fs::MetadataExt;
    let disk = std::fs::metadata(one.join("disk.qcow2")).unwrap().blocks() as f64 * 512.0 / 1e6;
    assert!(disk < 20.0, "the first layer's disk takes {disk} MB: the 50 MB deleted were not discarded");
    // The base lists its pages that are not zero.
    let base = PathBuf::from(
        log.lines()
            .find_map(|l| l.split_once("] layer 1 on ").map(|(_, r)| r.split_once(": ").unwrap().0.to_owned()))
            .unwrap(),
    );
    assert_eq!(frame_header(&base.join("memory"))["layer"].as_bool(), Some(false));
}
