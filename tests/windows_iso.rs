//! The Windows install stage checks the edition against the ISO's install.wim before it boots
//! anything: a real WIM (wimlib's wimcapture) in a real UDF ISO (genisoimage) that BIOS boots
//! (a boot image of our own that writes a known line on the screen), the real builder,
//! through nix-build in the sandbox.
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
    nix_winvm::testing::test_requires(name, found)
}

/// What the ISO's boot image writes on the screen: row 2, white on blue, from column 0.
const BOOT_MESSAGE: &str = "winvm-iso-boot-image-ran";
const BOOT_ROW: usize = 2;

/// A BIOS boot image (El Torito, no emulation, loaded at 07C0:0000): it sets the 80x25 text
/// mode (which clears the screen), hides the cursor, writes [`BOOT_MESSAGE`] into the text
/// buffer at [`BOOT_ROW`] with attribute 0x1F, and halts.
fn boot_image() -> Vec<u8> {
    let mut code: Vec<u8> = vec![
        0xB8,
        0x03,
        0x00, // mov ax, 0x0003: text mode 3
        0xCD,
        0x10, // int 0x10
        0xB4,
        0x01, // mov ah, 0x01: cursor shape...
        0xB9,
        0x00,
        0x20, // mov cx, 0x2000: ...none
        0xCD,
        0x10, // int 0x10
        0xB8,
        0xC0,
        0x07, // mov ax, 0x07C0
        0x8E,
        0xD8, // mov ds, ax
        0xB8,
        0x00,
        0xB8, // mov ax, 0xB800: the colour text buffer
        0x8E,
        0xC0, // mov es, ax
        0xBF,
        (BOOT_ROW * 160) as u8,
        ((BOOT_ROW * 160) >> 8) as u8, // mov di, row * 160
        0xBE,
        41,
        0x00, // mov si, 41: the message, after this code
        0xB4,
        0x1F, // mov ah, 0x1F: white on blue
        0xAC, // 30: lodsb
        0x84,
        0xC0, // test al, al
        0x74,
        0x03, // jz 38
        0xAB, // stosw
        0xEB,
        0xF8, // jmp 30
        0xF4, // 38: hlt
        0xEB,
        0xFD, // jmp 38
    ];
    assert_eq!(code.len(), 41);
    code.extend_from_slice(BOOT_MESSAGE.as_bytes());
    code.push(0);
    code.resize(2048, 0);
    code
}

/// Asserts that `png` shows what [`boot_image`] writes and nothing else: an 80x25 text screen,
/// blank but for [`BOOT_MESSAGE`]'s cells, each of two colours on one background, and two
/// cells alike exactly where the message has the same character.
fn assert_shows_boot_message(png: &Path) {
    let (w, h, pixels) = nix_winvm::format::png::decode(&std::fs::read(png).unwrap()).unwrap();
    assert_eq!((w, h), (720, 400), "{} is not the 80x25 text screen", png.display());
    let (w, h) = (w as usize, h as usize);
    let (cw, ch) = (w / 80, h / 25);
    let cell = |row: usize, col: usize| -> Vec<&[u8]> {
        (0..ch)
            .flat_map(|y| (0..cw).map(move |x| ((row * ch + y) * w + col * cw + x) * 3))
            .map(|i| &pixels[i..i + 3])
            .collect()
    };
    let blank = &pixels[..3];
    let message = BOOT_MESSAGE.as_bytes();
    for row in 0..25 {
        for col in 0..80 {
            if row == BOOT_ROW && col < message.len() {
                continue;
            }
            assert!(cell(row, col).iter().all(|p| p == &blank), "cell {row},{col} of {} is not blank", png.display());
        }
    }
    let cells: Vec<Vec<&[u8]>> = (0..message.len()).map(|col| cell(BOOT_ROW, col)).collect();
    let background = cells[0][0];
    assert_ne!(background, blank, "the message's cells have the screen's colour");
    for (i, c) in cells.iter().enumerate() {
        let mut colours: Vec<&[u8]> = c.clone();
        colours.sort();
        colours.dedup();
        assert_eq!(colours.len(), 2, "cell {i} of the message is not one character on its background");
        assert!(colours.contains(&background), "cell {i} has another background");
        for (j, d) in cells.iter().enumerate() {
            assert_eq!(c == d, message[i] == message[j], "cells {i} and {j} of the message");
        }
    }
}

/// An ISO whose UDF file system holds sources/install.wim with "Windows 11 Home" (EditionID
/// Core) and "Windows 11 Pro" (Professional), as wimlib writes a WIM, and which BIOS boots
/// into [`boot_image`]; None without the tools.
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
    std::fs::write(tree.join("boot.img"), boot_image()).unwrap();
    let iso = dir.join("win.iso");
    run_ok(
        Command::new("genisoimage")
            .args(["-quiet", "-udf", "-b", "boot.img", "-c", "boot.cat", "-no-emul-boot", "-boot-load-size", "4", "-o"])
            .arg(&iso)
            .arg(&tree),
    );
    Some(iso)
}

/// The fake install's time-out: SeaBIOS reaches the boot image within seconds under TCG, and a
/// busy machine's slowness stays far inside it.
const TIMEOUT: u64 = 30;

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
/// medium it boots with (the image by index, the EditionID's key), and the installer VM starts,
/// with BIOS and with UEFI (OVMF, the answer on a CD); the fake install then runs into its
/// time-out, and the error names the installer's last screenshot. Under BIOS the ISO's boot
/// image ran: the screenshot shows its line. Under UEFI nothing on this ISO boots (its boot
/// image is BIOS-only): there the screenshot is only checked to be a readable PNG.
#[test]
fn an_edition_in_install_wim_passes_the_check_and_the_isos_boot_image_shows_on_the_screenshot() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(iso) = windows_like_iso(tmp.path()) else { return };
    for efi in [false, true] {
        let expr =
            image(&iso, "Windows 11 Pro").replace("timeout = 15;", &format!("timeout = {TIMEOUT}; efi = {efi};"));
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
        assert!(err.contains(&format!("the install exceeded its timeout of {TIMEOUT} s")), "{err}");
        assert!(!out.join("install.json").exists(), "an unfinished install records nothing");
        // Stopped at the time-out (counted from the stage's start), with room for a busy machine.
        let took = start.elapsed();
        assert!(took < std::time::Duration::from_secs(TIMEOUT + 60), "took {took:?}");

        // The answer file the installer got: the image by index, the EditionID's key.
        let work = std::fs::read_dir(&work_parent).unwrap().flatten().map(|e| e.path()).next().expect("work folder");
        let xml = std::fs::read_to_string(work.join("autounattend.xml")).unwrap();
        let compact: String = xml.lines().map(str::trim).collect();
        assert!(compact.contains("<Key>/IMAGE/INDEX</Key><Value>2</Value>"), "{xml}");
        assert!(compact.contains("<ProductKey><Key>W269N-WFGWX-YVC9B-4J6C9-T83GX</Key>"), "{xml}");
        if efi {
            // On a CD (UEFI firmware reads no floppy), read back with the project's ISO reader.
            use nix_winvm::format::iso::Iso;
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
        // The timeline for the report stays in the work folder of the failed stage, named too.
        let timeline = work.join("timeline");
        assert!(err.contains(&format!("since the start in {}", timeline.display())), "{err}");
        let first = std::fs::read_dir(&timeline).unwrap().flatten().map(|e| e.file_name()).min().expect("a screenshot");
        assert!(first.to_string_lossy().starts_with("installer-0000m"), "{first:?}");
        if efi {
            let (w, h, _) = nix_winvm::format::png::decode(&std::fs::read(named).unwrap()).unwrap();
            assert!(w > 0 && h > 0, "{named}");
        } else {
            assert_shows_boot_message(Path::new(named));
        }
    }
}
