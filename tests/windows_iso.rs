//! The Windows install stage checks the edition against the ISO's install.wim before it boots
//! anything: a real WIM (wimlib's wimcapture) in a real UDF ISO (genisoimage), the real
//! builder, through nix-build in the sandbox.
#![cfg(feature = "plugin")]

mod common;
use common::{builder, plugin, sandboxed_nix_build, SANDBOX_CONFIG};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn run_ok(cmd: &mut Command) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?} failed:\n{}", stderr(&o));
}

fn tool(name: &str) -> bool {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {name} >/dev/null")).status().unwrap().success();
    nix_winvm::tools::test_requires(name, found)
}

/// An ISO whose UDF file system holds sources/install.wim with "Windows 11 Home" (EditionID
/// Core) and "Windows 11 Pro" (Professional), as wimlib writes a WIM; None without the tools.
fn windows_like_iso(dir: &Path) -> Option<PathBuf> {
    if !tool("wimcapture") || !tool("genisoimage") {
        return None;
    }
    let content = dir.join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("file.txt"), b"content").unwrap();
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("sources")).unwrap();
    let wim = tree.join("sources/install.wim");
    for (i, (name, edition_id)) in [("Windows 11 Home", "Core"), ("Windows 11 Pro", "Professional")].iter().enumerate()
    {
        run_ok(
            Command::new(if i == 0 { "wimcapture" } else { "wimappend" })
                .arg(&content)
                .arg(&wim)
                .arg(name)
                .args(["--image-property", &format!("WINDOWS/EDITIONID={edition_id}")])
                .args(["--image-property", "WINDOWS/VERSION/BUILD=26100"]),
        );
    }
    let iso = dir.join("win.iso");
    run_ok(Command::new("genisoimage").args(["-quiet", "-udf", "-o"]).arg(&iso).arg(&tree));
    Some(iso)
}

fn image(iso: &Path, edition: &str) -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cygwin-repo");
    format!(
        r#"builtins.windowsImage {{ iso = {}; edition = "{edition}"; cygwinRepo = {}; accel = "tcg"; timeout = 15; }}"#,
        iso.display(),
        repo.display()
    )
}

fn nix_build(expr: &str, out_link: &Path) -> Output {
    sandboxed_nix_build().arg("-o").arg(out_link).args(["-E", expr]).output().expect("run nix-build")
}

#[test]
fn installed_with_an_edition_not_in_install_wim_fails_before_booting_with_the_list() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(iso) = windows_like_iso(tmp.path()) else { return };
    let o = nix_build(&format!("({}).installed", image(&iso, "Windows 11 Enterprise")), &tmp.path().join("result"));
    let err = stderr(&o);
    assert!(!o.status.success(), "the install stage must fail:\n{err}");
    // The ISO is in the store by then; its name stays.
    let listed =
        "-win.iso's sources/install.wim, which has: \"Windows 11 Home\" (Core), \"Windows 11 Pro\" (Professional)";
    assert!(err.contains("edition \"Windows 11 Enterprise\" is not in /nix/store/"), "{err}");
    assert!(err.contains(listed), "{err}");
    // Nothing booted: no accelerator chosen, no installer VM.
    assert!(!err.contains("accelerator:"), "{err}");
    assert!(!err.contains("installer VM started"), "{err}");
}

/// With an edition that is there, the check passes, says what it chose, writes the answer
/// medium it boots with (the image by index, the EditionID's key), and the installer boots, with
/// BIOS and with UEFI (OVMF, the answer on a CD, Enter pressed for the CD's boot loader); the
/// fake install then runs into its 15 s time-out, and the error names the installer's last
/// screenshot.
#[test]
fn an_edition_in_install_wim_passes_the_check_and_the_installer_boots() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(iso) = windows_like_iso(tmp.path()) else { return };
    for efi in [false, true] {
        let expr = image(&iso, "Windows 11 Pro").replace("timeout = 15;", &format!("timeout = 15; efi = {efi};"));
        let media = nix_build(&format!("({expr}).media"), &tmp.path().join(format!("media-{efi}")));
        assert!(media.status.success(), "{}", stderr(&media));
        let media = PathBuf::from(String::from_utf8_lossy(&media.stdout).trim());
        let spec = Command::new("nix-instantiate")
            .env("NIX_CONFIG", SANDBOX_CONFIG)
            .env("NIX_WINVM_BUILDER", builder())
            .arg("--plugin-files")
            .arg(plugin())
            .args(["--eval", "--json", "-E", &format!("({expr}).winvmImageSpec")])
            .output()
            .unwrap();
        let spec: String = serde_json::from_slice(&spec.stdout).expect("the image's spec");
        let out = tmp.path().join(format!("installed-{efi}"));
        let work_parent = tmp.path().join(format!("work-{efi}"));
        std::fs::create_dir_all(&work_parent).unwrap();
        let start = std::time::Instant::now();
        let o = Command::new(builder())
            .arg("install")
            .env("winvmImageSpec", spec)
            .env("media", &media)
            .env("iso", &iso)
            .env("out", &out)
            .env("TMPDIR", &work_parent)
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains(
                "edition \"Windows 11 Pro\" is image 2 of sources/install.wim (EditionID Professional); \
                 product key: the generic key of Professional, W269N-WFGWX-YVC9B-4J6C9-T83GX"
            ),
            "{err}"
        );
        assert!(err.contains("installer VM started"), "{err}");
        assert!(err.contains("the install exceeded its timeout of 15 s"), "{err}");
        assert!(!out.join("install.json").exists(), "an unfinished install records nothing");
        assert!(start.elapsed() < std::time::Duration::from_secs(60));

        // The answer file the installer got: the image by index, the EditionID's key.
        let work = std::fs::read_dir(&work_parent).unwrap().flatten().map(|e| e.path()).next().expect("work folder");
        let xml = std::fs::read_to_string(work.join("autounattend.xml")).unwrap();
        let compact: String = xml.lines().map(str::trim).collect();
        assert!(compact.contains("<Key>/IMAGE/INDEX</Key><Value>2</Value>"), "{xml}");
        assert!(compact.contains("<ProductKey><Key>W269N-WFGWX-YVC9B-4J6C9-T83GX</Key>"), "{xml}");
        if efi {
            // On a CD (UEFI firmware reads no floppy), read back with the project's ISO reader.
            use nix_winvm::guest::windows::iso::Iso;
            let cd = Iso::open(&work.join("answer.iso")).unwrap();
            let file = cd.find("autounattend.xml").unwrap().expect("autounattend.xml on the answer CD");
            assert_eq!(cd.read(&file, 0, file.size as usize).unwrap(), xml.as_bytes());
            assert!(!work.join("answer.img").exists());
            assert!(std::fs::metadata(out.join("efi-vars.fd")).unwrap().len() > 0, "the image's variable store");
        } else {
            assert!(work.join("answer.img").is_file());
        }
        // What the installer showed when it was stopped.
        let named = err
            .lines()
            .find_map(|l| l.split("the installer's screen when it failed: ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no screenshot named in:\n{err}"));
        let (_, _, pixels) = nix_winvm::vm::screen::png_pixels(&std::fs::read(named).unwrap()).unwrap();
        let background = &pixels[..3];
        assert!(pixels.chunks_exact(3).any(|p| p != background), "the installer's screen is blank");
    }
}
