//! Keeping images: what an image records so that a later nix-winvm, on a later QEMU, revives
//! it, and the refusal, before any VM starts, of an image whose layout it does not revive.
//! Real nix-build in the sandbox, QEMU under TCG, the standin guest.
#![cfg(feature = "plugin")]

mod common;
use common::{builder, nix_build_with, pin, sandboxed_nix_build};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = r#"builtins.windowsImage { guest = "standin"; accel = "tcg"; }"#;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn image() -> PathBuf {
    let o = sandboxed_nix_build().args(["--no-out-link", "-E", IMAGE]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

fn meta(image: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(image.join("meta.json")).unwrap()).unwrap()
}

/// The state file's format version and header (see src/vm/state.rs for the layout).
fn state_header(path: &Path) -> (u32, serde_json::Value) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..16], b"NIX-WINVM-STATE\n");
    let version = u32::from_le_bytes(bytes[16..20].try_into().unwrap());
    let len = u32::from_le_bytes(bytes[20..24].try_into().unwrap()) as usize;
    (version, serde_json::from_slice(&bytes[24..24 + len]).unwrap())
}

/// What `q35` stands for in the QEMU on PATH (the builder's own, outside a build).
fn qemu_machine() -> String {
    let o = Command::new("qemu-system-x86_64").args(["-machine", "help"]).output().unwrap();
    let help = String::from_utf8_lossy(&o.stdout).into_owned();
    help.lines()
        .find(|l| l.starts_with("q35 "))
        .and_then(|l| l.split("(alias of ").nth(1))
        .map(|r| r.trim_end_matches(')').to_owned())
        .unwrap_or_else(|| panic!("no q35 alias in:\n{help}"))
}

/// A writable copy of `image` (its links to the store kept), to be altered.
fn copy_of(image: &Path, dir: &Path) -> PathBuf {
    let copy = dir.join("image");
    let o = Command::new("cp").arg("-a").arg(image).arg(&copy).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = Command::new("chmod").args(["-R", "u+w"]).arg(&copy).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    copy
}

/// `nix-winvm-builder shell IMAGE -- true`: its output, and how long it took.
fn shell(image: &Path) -> (Output, Duration) {
    let started = Instant::now();
    let o = Command::new(builder()).arg("shell").arg(image).args(["--", "true"]).stdin(Stdio::null()).output().unwrap();
    (o, started.elapsed())
}

fn assert_refused_before_any_vm(o: &Output, took: Duration, sentence: &str) {
    let log = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(log.contains(sentence), "expected {sentence:?} in:\n{log}");
    for started in ["switch up", "guest up", "controller up"] {
        assert!(!log.contains(started), "a VM was started ({started}):\n{log}");
    }
    assert!(took < Duration::from_secs(30), "the refusal took {took:?}");
}

#[test]
fn an_image_records_its_machine_type_and_a_revive_asks_for_it() {
    let image = image();
    let meta = meta(&image);
    let machine = qemu_machine();
    assert_eq!(meta["format"], 3, "{meta}");
    assert_eq!(meta["machine"], machine.as_str(), "{meta}");
    assert!(machine.starts_with("pc-q35-"), "{machine}");
    for state in ["state", "controller-state"] {
        let (version, header) = state_header(&image.join(state));
        assert_eq!(version, 2, "{state}");
        assert_eq!(header["machine"], machine.as_str(), "{state}: {header}");
    }
    // The revive asks for the recorded type: another one in the metadata is refused by the
    // state file's own header, before QEMU loads a byte.
    let tmp = tempfile::tempdir().unwrap();
    let copy = copy_of(&image, tmp.path());
    let mut altered = meta.clone();
    altered["machine"] = "pc-q35-9.2".into();
    std::fs::write(copy.join("meta.json"), altered.to_string()).unwrap();
    let (o, _) = shell(&copy);
    let log = stderr(&o);
    assert!(!o.status.success(), "{log}");
    assert!(
        log.contains(&format!("holds a VM of machine type {machine}, but the revive asked for pc-q35-9.2")),
        "{log}"
    );
}

#[test]
fn images_of_another_format_are_refused_with_what_to_do() {
    let image = image();
    let tmp = tempfile::tempdir().unwrap();
    let copy = copy_of(&image, tmp.path());
    let meta = meta(&image);

    // As the last nix-winvm wrote it: no format, no machine type.
    let mut old = meta.clone();
    old.as_object_mut().unwrap().retain(|k, _| k != "format" && k != "machine");
    std::fs::write(copy.join("meta.json"), old.to_string()).unwrap();
    let (o, took) = shell(&copy);
    assert_refused_before_any_vm(
        &o,
        took,
        &format!(
            "the image at {} cannot be revived: it has image format 1, from an older nix-winvm that did not record the QEMU machine type",
            copy.display()
        ),
    );
    assert!(
        stderr(&o).contains("build the image again (a pinned image: take the pin off, build it, and pin the new hash)")
    );

    // From a newer nix-winvm.
    let mut newer = meta.clone();
    newer["format"] = 4.into();
    newer["somethingNew"] = true.into();
    std::fs::write(copy.join("meta.json"), newer.to_string()).unwrap();
    let (o, took) = shell(&copy);
    assert_refused_before_any_vm(
        &o,
        took,
        "it has image format 4, from a newer nix-winvm; this one revives formats 2 and 3: use the nix-winvm that made it, or a newer one",
    );

    // The metadata current, a state file of format 1.
    std::fs::write(copy.join("meta.json"), meta.to_string()).unwrap();
    let mut state = std::fs::read(copy.join("state")).unwrap();
    state[16] = 1;
    std::fs::write(copy.join("state"), &state).unwrap();
    let (o, took) = shell(&copy);
    assert_refused_before_any_vm(
        &o,
        took,
        &format!(
            "state file {} has format version 1, which does not record the QEMU machine type",
            copy.join("state").display()
        ),
    );
}

/// QEMU of the Debian root scripts/test sets up for Nix 2.34 (a newer release than the host's),
/// run on the host through that root's own loader and libraries.
fn newer_qemu(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let cache =
        std::env::var_os("NIX_WINVM_CACHE").map_or_else(|| PathBuf::from("/var/cache/nix-winvm"), PathBuf::from);
    let root = cache.join("roots/nix-2.34");
    if !root.join("usr/bin/qemu-system-x86_64").is_file() {
        return None;
    }
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let used = dir.join("used");
    let r = root.display();
    let script = format!(
        "#!/bin/sh\n\
         echo \"$*\" >> '{used}'\n\
         export QEMU_MODULE_DIR='{r}/usr/lib/x86_64-linux-gnu/qemu'\n\
         exec '{r}/lib64/ld-linux-x86-64.so.2' --library-path '{r}/lib/x86_64-linux-gnu:{r}/usr/lib/x86_64-linux-gnu' \
         '{r}/usr/bin/qemu-system-x86_64' -L '{r}/usr/share/qemu' -L '{r}/usr/share/seabios' \"$@\"\n",
        used = used.display()
    );
    let qemu = bin.join("qemu-system-x86_64");
    std::fs::write(&qemu, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    Some((qemu, used))
}

fn version_of(qemu: &Path) -> (u32, u32) {
    let o = Command::new(qemu).arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let v = text.split_whitespace().nth(3).unwrap_or_else(|| panic!("no version in {text}"));
    let mut parts = v.split('.').map(|n| n.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

/// An upgrade of QEMU: the image the host's QEMU saved, revived by a newer release, which is
/// asked for the image's machine type and loads both memories.
#[test]
fn a_newer_qemu_revives_the_image_as_the_machine_it_was_saved_as() {
    let image = image();
    let machine = meta(&image)["machine"].as_str().unwrap().to_owned();
    let tmp = tempfile::tempdir().unwrap();
    let newer = newer_qemu(tmp.path());
    if !nix_winvm::testing::test_requires("the Nix 2.34 root's QEMU (scripts/setup makes it)", newer.is_some()) {
        return;
    }
    let (qemu, used) = newer.unwrap();
    let host = version_of(Path::new("qemu-system-x86_64"));
    let newer_version = version_of(&qemu);
    assert!(newer_version > host, "the root's QEMU {newer_version:?} is not newer than the host's {host:?}");
    let o = Command::new(builder())
        .arg("shell")
        .arg(&image)
        .args(["--", "sh", "-c", &format!("uname -s; wc -c < {}/meta.json", image.display())])
        .env("NIX_WINVM_TOOLS", qemu.parent().unwrap())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = stderr(&o);
    assert!(o.status.success(), "{log}");
    // The store is served too: a file of it read in the guest.
    let size = std::fs::metadata(image.join("meta.json")).unwrap().len();
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("Linux\n{size}\n"), "{log}");
    assert!(log.contains("guest revived") && log.contains("controller revived"), "{log}");
    let ran = std::fs::read_to_string(&used).unwrap();
    let vms: Vec<&str> = ran.lines().filter(|l| l.starts_with("-name ")).collect();
    assert_eq!(vms.len(), 2, "{ran}");
    for line in vms {
        // The guest's machine names its memory backend after the type.
        assert!(
            line.contains(&format!("-machine {machine} "))
                || line.contains(&format!("-machine {machine},memory-backend=")),
            "{line}"
        );
    }
}

/// A copy of the builder with a string of its build stage changed, as a new release of
/// nix-winvm would have: another store path, and a builder that says so in its log.
fn upgraded_builder(dir: &Path) -> PathBuf {
    let mut bytes = std::fs::read(builder()).unwrap();
    let (from, to) = (b"command exited ", b"command EXITED ");
    let mut changed = 0;
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            changed += 1;
        }
        i += 1;
    }
    assert!(changed > 0, "no string to change in the builder");
    let path = dir.join("nix-winvm-builder");
    std::fs::write(&path, bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// An image pinned, a layer on it pinned, a build on the layer; then a new nix-winvm: a new
/// build on the pinned layer is the only thing to build, and the new builder revives the layer.
#[test]
fn pinned_images_stand_alone_and_survive_a_new_builder() {
    let tok = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let image_expr = r#"builtins.windowsImage { guest = "standin"; accel = "tcg"; pin = "{PIN}"; }"#;
    image(); // the unpinned image, as a first build would have made it
    let started = Instant::now();
    let (pinned_image, image_hash, first_log) = pin(image_expr);
    eprintln!(
        "pinning the image (first build with the unknown hash, then with the right one): {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(first_log.contains("pinned image: "), "{first_log}");
    let size = first_log.lines().find_map(|l| l.split("pinned image: ").nth(1)).unwrap();
    eprintln!("pinned standin image: {size} ({})", pinned_image.display());
    let o = Command::new("nix-store").args(["-q", "--references"]).arg(&pinned_image).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "", "a pinned image refers to other store paths");
    let meta = meta(&pinned_image);
    assert_eq!((meta["media"].as_str(), meta["base"].is_null()), (Some("media"), true), "{meta}");
    let started = Instant::now();
    let o = Command::new("nix-hash").args(["--type", "sha256"]).arg(&pinned_image).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    eprintln!("nix-hash of the pinned image: {:.2} s", started.elapsed().as_secs_f64());

    // A layer on the pinned image, pinned too.
    let image_expr = image_expr.replace("{PIN}", &image_hash);
    let layer_expr = format!(
        r#"builtins.windowsImage {{ base = {image_expr}; name = "pinned-layer"; installCommands = [ "mkdir -p /opt && echo 'layer {tok}' > /opt/layer-file" ]; pin = "{{PIN}}"; }}"#
    );
    let (pinned_layer, layer_hash, _) = pin(&layer_expr);
    let o = Command::new("nix-store").args(["-q", "--references"]).arg(&pinned_layer).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "", "a pinned layer refers to other store paths");
    let layer_expr = layer_expr.replace("{PIN}", &layer_hash);
    let build = |name: &str| {
        format!(
            r#"builtins.windowsDerivation {{ name = "{name}"; image = {layer_expr}; token = "{tok}"; script = "cat /opt/layer-file > $out"; }}"#
        )
    };
    let o = nix_build_with(&builder(), &["--no-out-link", "-E", &build("on-pinned-layer")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    assert_eq!(std::fs::read_to_string(out).unwrap(), format!("layer {tok}\n"));

    // A new nix-winvm: only the new build is to be built, and the pinned layer's memory stage
    // (its RAM file expanded again by the new builder, where the build runs); it revives the
    // pinned layer.
    let tmp = tempfile::tempdir().unwrap();
    let upgraded = upgraded_builder(tmp.path());
    let expr = build("after-upgrade");
    let o = nix_build_with(&upgraded, &["--dry-run", "--no-out-link", "-E", &expr]);
    let log = stderr(&o);
    assert!(o.status.success(), "{log}");
    let mut to_build: Vec<&str> = log.lines().map(str::trim).filter(|l| l.ends_with(".drv")).collect();
    to_build.sort_by_key(|d| d.split_once('-').map(|(_, n)| n.to_owned()));
    assert_eq!(to_build.len(), 2, "{log}");
    assert!(to_build[0].ends_with("-after-upgrade.drv"), "{log}");
    assert!(to_build[1].ends_with("-pinned-layer-pinned-memory.drv"), "{log}");
    let o = nix_build_with(&upgraded, &["--no-out-link", "-E", &expr]);
    let log = stderr(&o);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("guest revived") && log.contains("command EXITED 0"), "not the new builder's log:\n{log}");
    let out = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    assert_eq!(std::fs::read_to_string(out).unwrap(), format!("layer {tok}\n"));
}

/// The build log Nix kept of the derivation that made `path`.
fn build_log_of(path: &Path) -> String {
    let deriver = Command::new("nix-store").arg("-q").arg("--deriver").arg(path).output().unwrap();
    let drv = String::from_utf8_lossy(&deriver.stdout).trim().to_owned();
    assert!(drv.ends_with(".drv"), "no deriver of {}: {}", path.display(), stderr(&deriver));
    let log = Command::new("nix-store").args(["-l", &drv]).output().unwrap();
    assert!(log.status.success(), "nix-store -l {drv}: {}", stderr(&log));
    String::from_utf8_lossy(&log.stdout).into_owned()
}

/// The lines of `log` that say `text` as a timed progress line: `nix-winvm: [  12.34 s] text`.
fn timed(log: &str, text: &str) -> bool {
    log.lines().any(|l| {
        l.strip_prefix("nix-winvm: [")
            .and_then(|r| r.split_once(" s] "))
            .is_some_and(|(t, said)| t.trim().parse::<f64>().is_ok() && said == text)
    })
}

fn set_phase(phase: &str) -> String {
    format!("@nix {}", serde_json::json!({ "action": "setPhase", "phase": phase }))
}

#[test]
fn a_standin_images_build_log_shows_its_steps_with_times_and_nix_phases() {
    let image = image();
    let installed = std::fs::read_link(image.join("report/install")).expect("report/install links the install's");
    let installed = installed.parent().and_then(Path::parent).unwrap().to_path_buf();
    let install_log = build_log_of(&installed);
    // Each step the standin's installer writes on its console, as it came, with its time.
    for step in ["formatting /dev/vda", "copying the system", "done"] {
        assert!(timed(&install_log, &format!("installer: {step}")), "no timed step {step:?} in:\n{install_log}");
        assert!(install_log.contains(&set_phase(&format!("install: {step}"))), "no phase {step:?} in:\n{install_log}");
    }
    assert!(install_log.contains(&set_phase("install")), "{install_log}");
    let suspend_log = build_log_of(&image);
    assert!(suspend_log.contains(&set_phase("suspend")), "{suspend_log}");
    for phase in ["starting the VMs", "saving the pair"] {
        assert!(suspend_log.contains(&set_phase(phase)), "no phase {phase:?} in:\n{suspend_log}");
    }
    assert!(timed(&suspend_log, "guest up"), "{suspend_log}");
}

/// `page` as headless Chromium (Debian's) draws it in a 1280 x 2400 window, as RGB pixels.
fn render_in_chromium(page: &Path, dir: &Path) -> (u32, u32, Vec<u8>) {
    let shot = dir.join("rendered.png");
    let o = Command::new("timeout")
        .args(["120", "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"])
        .args(["--force-device-scale-factor=1", "--window-size=1280,2400", "--no-first-run", "--disable-sync"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-quic"])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success() && shot.is_file(), "chromium could not render {}: {}", page.display(), stderr(&o));
    nix_winvm::format::png::decode(&std::fs::read(&shot).unwrap()).unwrap()
}

/// Pixels of the standin's console (white-on-black text): nearly black.
fn dark_pixels(rgb: &[u8]) -> usize {
    rgb.chunks_exact(3).filter(|p| p.iter().all(|&c| c < 48)).count()
}

#[test]
fn a_standin_images_report_shows_its_screenshots_in_chromium() {
    let chromium = Command::new("chromium").arg("--version").output().is_ok_and(|o| o.status.success());
    if !nix_winvm::testing::test_requires("chromium (Debian's package; scripts/setup installs it)", chromium) {
        return;
    }
    let image = image();
    let page = image.join("report.html");
    let html = std::fs::read_to_string(&page).unwrap();
    // Every product Hydra would offer is there; the screenshots are PNGs the page shows.
    let products = std::fs::read_to_string(image.join("nix-support/hydra-build-products")).unwrap();
    assert_eq!(products.lines().next().unwrap(), format!("doc report {}", page.display()));
    let shots: Vec<PathBuf> =
        products.lines().filter_map(|l| l.strip_prefix("file screenshot ")).map(PathBuf::from).collect();
    for stage in ["install", "suspend"] {
        assert!(
            shots.iter().any(|s| s.starts_with(image.join("report").join(stage))),
            "no {stage} screenshot: {products}"
        );
    }
    for shot in &shots {
        let bytes = std::fs::read(shot).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{}", shot.display());
        let relative = shot.strip_prefix(&image).unwrap().display().to_string();
        assert!(html.contains(&format!("<img src=\"{relative}\"")), "the page does not show {relative}");
    }
    for part in ["Time per phase", "Steps of install", "installer: copying the system", "saving the pair"] {
        assert!(html.contains(part), "the page lacks {part:?}");
    }
    // Drawn by a real browser: the screenshots fill their boxes with the console's black.
    let tmp = tempfile::tempdir().unwrap();
    let (width, height, rgb) = render_in_chromium(&page, tmp.path());
    let kept = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("report-rendered.png");
    let _ = std::fs::copy(tmp.path().join("rendered.png"), &kept);
    eprintln!("the rendered report: {} ({width} x {height})", kept.display());
    let shown = dark_pixels(&rgb);
    // The same page without its screenshots: broken images draw an icon and their text.
    let alone = tmp.path().join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    std::fs::copy(&page, alone.join("report.html")).unwrap();
    let (_, _, broken_rgb) = render_in_chromium(&alone.join("report.html"), &alone);
    let broken = dark_pixels(&broken_rgb);
    // The page's text is dark too, in both. A 320-pixel-wide thumbnail of a 720 x 400 console
    // is 320 x 178 (57,000 pixels), most of them black; each stage's first row of screenshots
    // is in the window.
    let visible = shots.len().min(2);
    assert!(
        shown >= broken + visible * 30_000,
        "{shown} dark pixels with the screenshots, {broken} without: the {visible} screenshots are not drawn"
    );
}
