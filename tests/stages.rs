//! The stages as Nix runs them: `nix-build` in the sandbox, with the real store (the image is
//! built once and shared by every test here), TCG, the standin guest.
#![cfg(feature = "plugin")]

mod common;
use common::{builder, kept_build_dir, kept_work_folder, plugin, remove_kept, sandboxed_nix_build, SANDBOX_CONFIG};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const IMAGE: &str = r#"builtins.windowsImage { guest = "standin"; accel = "tcg"; }"#;

fn nix_build(expr: &str, out_link: &Path) -> Output {
    nix_build_args(&[OsStr::new("-E"), OsStr::new(expr)], out_link)
}

fn nix_build_args(args: &[&OsStr], out_link: &Path) -> Output {
    sandboxed_nix_build().arg("-o").arg(out_link).args(args).output().expect("run nix-build")
}

/// A build that is to fail, with its build folder kept (`-K`) under `tmp`.
fn nix_build_kept(tmp: &Path, expr: &str) -> Output {
    sandboxed_nix_build().env("TMPDIR", tmp).args(["-K", "--no-out-link", "-E", expr]).output().expect("run nix-build")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn built(o: &Output) -> PathBuf {
    assert!(o.status.success(), "nix-build failed:\n{}", stderr(o));
    PathBuf::from(String::from_utf8_lossy(&o.stdout).lines().next().expect("an output path"))
}

/// A unique token per test run, so that build derivations are new while the image is shared.
fn token(name: &str) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{name}-{t}")
}

fn build_expr(name: &str, extra: &str, script: &str) -> String {
    format!(
        r#"builtins.windowsDerivation {{ name = "{name}"; image = {IMAGE}; token = "{}"; {extra} script = ''{script}''; }}"#,
        token(name)
    )
}

#[test]
fn two_builds_share_one_image_and_the_second_revives_it() {
    let tmp = tempfile::tempdir().unwrap();
    let a = nix_build(&build_expr("share-a", "", "echo a > $out"), &tmp.path().join("a"));
    assert_eq!(std::fs::read_to_string(built(&a)).unwrap(), "a\n");
    let b = nix_build(&build_expr("share-b", "", "echo b > $out"), &tmp.path().join("b"));
    assert_eq!(std::fs::read_to_string(built(&b)).unwrap(), "b\n");
    let log = stderr(&b);
    assert!(!log.contains("winvm-standin-image.drv'..."), "the image was rebuilt:\n{log}");
    assert!(log.contains("guest revived"), "{log}");
    assert!(log.contains("command exited 0"), "{log}");
}

/// Four builds from one image at once (`-j4` on two cores): four pairs revived side by side
/// from the same state files, each on its own switch, each with its own output.
#[test]
fn four_builds_at_once_from_one_image() {
    let tmp = tempfile::tempdir().unwrap();
    let builds: Vec<String> = (0..4)
        .map(|i| format!("({})", build_expr(&format!("parallel-{i}"), "", &format!("echo build-{i} > $out"))))
        .collect();
    let o = nix_build_args(
        &[OsStr::new("-j4"), OsStr::new("-E"), OsStr::new(&format!("[ {} ]", builds.join(" ")))],
        &tmp.path().join("r"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let outs: Vec<PathBuf> = String::from_utf8_lossy(&o.stdout).lines().map(PathBuf::from).collect();
    assert_eq!(outs.len(), 4, "{outs:?}");
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(std::fs::read_to_string(out).unwrap(), format!("build-{i}\n"));
    }
    assert_eq!(stderr(&o).matches("guest revived").count(), 4, "{}", stderr(&o));
}

#[test]
fn a_failing_build_reports_its_exit_code() {
    let tmp = tempfile::tempdir().unwrap();
    let o = nix_build(&build_expr("fails", "", "echo about to fail; exit 3"), &tmp.path().join("r"));
    assert!(!o.status.success());
    let log = stderr(&o);
    assert!(log.contains("about to fail"), "{log}");
    assert!(log.contains("failed with exit code 3"), "{log}");
}

#[test]
fn multiple_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let drv =
        build_expr("multi", r#"outputs = [ "out" "dev" ];"#, "echo lib > $out; mkdir $dev; echo header > $dev/x.h");
    let o = nix_build(&format!("let d = {drv}; in [ d.out d.dev ]"), &tmp.path().join("r"));
    let out = built(&o);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "lib\n");
    let paths: Vec<String> = String::from_utf8_lossy(&o.stdout).lines().map(String::from).collect();
    let dev = PathBuf::from(paths.iter().find(|p| p.ends_with("-multi-dev")).expect("a dev output path"));
    assert_eq!(std::fs::read_to_string(dev.join("x.h")).unwrap(), "header\n");
}

#[test]
fn a_thousand_small_files() {
    let tmp = tempfile::tempdir().unwrap();
    let o = nix_build(
        &build_expr("many", "", "mkdir $out; i=0; while [ $i -lt 1000 ]; do echo $i > $out/f$i; i=$((i+1)); done"),
        &tmp.path().join("r"),
    );
    let out = built(&o);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1000);
    assert_eq!(std::fs::read_to_string(out.join("f999")).unwrap(), "999\n");
}

/// The outputs travel as one archive made on the guest's own disk (issue 11, point 6): links
/// (relative, absolute, to the other output), a hard link (one inode, two names), exec bits, an
/// empty folder, non-ASCII names, an output that is a single file and a 200 MiB file arrive as
/// the guest made them.
#[test]
fn outputs_keep_links_modes_empty_folders_and_big_files() {
    let tmp = tempfile::tempdir().unwrap();
    let script = r#"
df -k / | tail -n 1
mkdir -p $out/bin $out/empty "$out/Grüße-ünïcode-日本"
printf '#!/bin/sh\necho run\n' > $out/bin/run
chmod 755 $out/bin/run
echo data > $out/data
chmod 644 $out/data
echo grüße > "$out/Grüße-ünïcode-日本/日本.txt"
ln -s bin/run $out/rel
ln -s $out/data $out/abs
ln -s $dev $out/to-dev
ln $out/data $out/data-again
dd if=/dev/urandom of=$out/big bs=1048576 count=200 2>/dev/null
md5sum $out/big | cut -d' ' -f1 > $out/big.md5
ls -l $out/big
echo header > $dev
"#;
    let drv = build_expr("kept-as-made", r#"outputs = [ "out" "dev" ];"#, script);
    let o = nix_build(&format!("let d = {drv}; in [ d.out d.dev ]"), &tmp.path().join("r"));
    let log = stderr(&o);
    // The timings, and the guest disk's room (df) before the build.
    for line in log.lines().filter(|l| l.contains("outputs") || l.contains('%') || l.contains("big")) {
        eprintln!("{line}");
    }
    let out = built(&o);
    let paths: Vec<String> = String::from_utf8_lossy(&o.stdout).lines().map(String::from).collect();
    let dev = PathBuf::from(paths.iter().find(|p| p.ends_with("-kept-as-made-dev")).expect("the dev output"));
    assert!(log.contains("outputs: 2 of 2 paths"), "{log}");
    let verify =
        Command::new("nix-store").env_remove("NIX_REMOTE").arg("--verify-path").arg(&out).arg(&dev).output().unwrap();
    assert!(verify.status.success(), "nix-store --verify-path: {}", stderr(&verify));

    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode();
    assert_eq!(std::fs::read_to_string(out.join("bin/run")).unwrap(), "#!/bin/sh\necho run\n");
    assert_ne!(mode(&out.join("bin/run")) & 0o100, 0, "bin/run lost its exec bit");
    assert_eq!(mode(&out.join("data")) & 0o111, 0, "data became executable");
    assert_eq!(std::fs::read_link(out.join("rel")).unwrap(), Path::new("bin/run"));
    assert_eq!(std::fs::read_link(out.join("abs")).unwrap(), out.join("data"));
    assert_eq!(std::fs::read_link(out.join("to-dev")).unwrap(), dev);
    assert_eq!(std::fs::read_to_string(out.join("data-again")).unwrap(), "data\n");
    use std::os::unix::fs::MetadataExt;
    let inode = |p: &Path| std::fs::symlink_metadata(p).unwrap().ino();
    assert_eq!(inode(&out.join("data-again")), inode(&out.join("data")), "data-again is a copy, not a hard link");
    assert!(out.join("empty").is_dir());
    assert_eq!(std::fs::read_dir(out.join("empty")).unwrap().count(), 0);
    assert_eq!(std::fs::read_to_string(out.join("Grüße-ünïcode-日本/日本.txt")).unwrap(), "grüße\n");
    assert_eq!(std::fs::read_to_string(&dev).unwrap(), "header\n");
    let big = out.join("big");
    assert_eq!(std::fs::metadata(&big).unwrap().len(), 200 << 20);
    let md5 = Command::new("md5sum").arg(&big).output().unwrap();
    let host_md5 = String::from_utf8_lossy(&md5.stdout).split_whitespace().next().unwrap_or("").to_owned();
    assert_eq!(std::fs::read_to_string(out.join("big.md5")).unwrap().trim(), host_md5);
}

/// An output the build did not make stays absent, and Nix says so.
#[test]
fn an_output_the_build_did_not_make_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let drv = build_expr("half-made", r#"outputs = [ "out" "dev" ];"#, "echo made > $out");
    let o = nix_build(&format!("let d = {drv}; in [ d.out d.dev ]"), &tmp.path().join("r"));
    let log = stderr(&o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("outputs: 1 of 2 paths"), "{log}");
    assert!(log.contains("failed to produce output path") && log.contains("-half-made-dev"), "{log}");
}

#[test]
fn run_in_windows_vm_runs_the_original_builder_with_its_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let expr = format!(
        r#"builtins.runInWindowsVM (derivation {{
             name = "legacy"; system = "x86_64-linux"; builder = "/bin/sh";
             args = [ "-c" "echo \"$HELLO, $(uname -s) $(uname -r)\" > $out" ];
             HELLO = "hello world"; token = "{}";
             windowsImage = {IMAGE};
           }})"#,
        token("legacy")
    );
    let o = nix_build(&expr, &tmp.path().join("r"));
    // The guest runs the project's own kernel (scripts/setup), not the host's: the builder
    // really ran in the VM.
    let guest_kernel = std::fs::read_to_string("/var/cache/nix-winvm/kernel/version").expect("scripts/setup's kernel");
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(
        guest_kernel.trim(),
        host_kernel.trim(),
        "host and guest kernels must differ for this test to prove anything"
    );
    assert_eq!(std::fs::read_to_string(built(&o)).unwrap(), format!("hello world, Linux {}\n", guest_kernel.trim()));
}

/// A Nix string may hold any bytes: the script and the environment reach the guest unchanged.
#[test]
fn bytes_that_are_not_utf8_reach_the_guest_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let mut expr =
        build_expr("bytes", "RAW = \"caf\u{1}\";", "printf '%s|' \"$RAW\" > $out; printf 'caf\u{1}' >> $out")
            .into_bytes();
    // \x01 stands in for the byte that is not UTF-8; Nix source files may hold any bytes.
    for b in expr.iter_mut() {
        if *b == 1 {
            *b = 0xe9;
        }
    }
    let file = tmp.path().join("bytes.nix");
    std::fs::write(&file, expr).unwrap();
    let o = nix_build_args(&[file.as_os_str()], &tmp.path().join("r"));
    assert_eq!(std::fs::read(built(&o)).unwrap(), b"caf\xe9|caf\xe9".to_vec());
}

/// A file the guest reads off a share into a pipe ends where it ends: busybox `cat` sends a
/// file into a pipe with sendfile, which the guest's SMB client (Linux 6.1) got wrong when it
/// read past the page cache, padding the pipe with zeros past the file's end (296 bytes came
/// out as 69632 to 131072). Two store files (the build's inputs) and three files of the
/// exchange folder (two the host wrote, one the guest writes), through `cat FILE | wc -c` and
/// `cat FILE | md5sum`, against `wc -c < FILE` and `md5sum < FILE` (plain reads) and the sizes
/// known here.
#[test]
fn files_on_the_shares_read_into_a_pipe_stop_at_their_end() {
    let tmp = tempfile::tempdir().unwrap();
    let small = "0123456789abcdef".repeat(18) + "01234567";
    let lines = 120_000;
    let big_len: usize = (0..lines).map(|i| format!("line {i}\n").len()).sum();
    let extra = format!(
        r#"small = builtins.toFile "pipe-small" "{small}"; big = builtins.toFile "pipe-big" (builtins.concatStringsSep "" (builtins.genList (i: "line ${{toString i}}\n") {lines}));"#
    );
    let script = r#"
dd if=/dev/urandom of=/tmp/xchg/written bs=1024 count=1029 2>/dev/null
for f in small:$small big:$big script:/tmp/xchg/script env:/tmp/xchg/saved-env written:/tmp/xchg/written; do
    p=''${f#*:}
    echo "''${f%%:*} $(wc -c <"$p") $(cat "$p" | wc -c) $(md5sum <"$p" | cut -d' ' -f1) $(cat "$p" | md5sum | cut -d' ' -f1)" >>$out
done
"#;
    let o = nix_build(&build_expr("pipe-reads", &extra, script), &tmp.path().join("r"));
    let report = std::fs::read_to_string(built(&o)).unwrap();
    let known = [
        ("small", Some(small.len())),
        ("big", Some(big_len)),
        ("script", None),
        ("env", None),
        ("written", Some(1029 * 1024)),
    ];
    let rows: Vec<Vec<&str>> = report.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(rows.iter().map(|r| r[0]).collect::<Vec<_>>(), known.map(|(name, _)| name), "{report}");
    for (row, (name, size)) in rows.iter().zip(known) {
        let [_, read, piped, md5_read, md5_piped] = row[..] else { panic!("{name}: a row of five fields:\n{report}") };
        if let Some(size) = size {
            assert_eq!(read, size.to_string(), "{name}: the guest's plain read:\n{report}");
        }
        assert_eq!(piped, read, "{name}: cat into a pipe read {piped} bytes of {read}:\n{report}");
        assert_eq!(md5_piped, md5_read, "{name}: cat into a pipe read other bytes:\n{report}");
    }
}

/// Build stage run by hand against copies of a real image whose state file is damaged.
#[test]
fn bad_state_files_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let o = nix_build(IMAGE, &tmp.path().join("img"));
    let image = built(&o);
    let spec_json = std::fs::read_to_string(image.join("meta.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&spec_json).unwrap();
    // A time-out far beyond what the checks take: the one load that starts VMs must fail on
    // the state file, not on a busy machine's slow boot.
    let build_spec = serde_json::json!({ "image": meta["spec"], "timeoutSecs": 600, "runOriginalBuilder": false });
    let state = std::fs::read(image.join("state")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", state[..state.len() / 2].to_vec(), "is truncated (its end marker is missing"),
        (
            "corrupt",
            {
                let mut s = state.clone();
                let i = s.len() / 2;
                s[i] ^= 0xff;
                s
            },
            "is corrupt: checksum",
        ),
        ("foreign", b"QEVM\0\0\0\x03 not ours".to_vec(), "is not a nix-winvm state file (wrong magic number)"),
    ];
    for (name, bytes, msg) in cases {
        let copy = tmp.path().join(name);
        std::fs::create_dir_all(&copy).unwrap();
        for f in ["disk.qcow2", "key", "meta.json", "controller-state", "memory"] {
            std::fs::copy(image.join(f), copy.join(f)).unwrap();
        }
        std::os::unix::fs::symlink(std::fs::read_link(image.join("media")).unwrap(), copy.join("media")).unwrap();
        std::fs::write(copy.join("state"), bytes).unwrap();
        let start = std::time::Instant::now();
        let o = Command::new(builder())
            .arg("build")
            .env("image", &copy)
            .env("winvmBuildSpec", build_spec.to_string())
            .env("script", "echo never")
            .env("out", tmp.path().join(format!("{name}-out")))
            .env("TMPDIR", tmp.path())
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains(&format!("state file {}", copy.join("state").display()))
                || err.contains(&copy.join("state").display().to_string()),
            "{name}: {err}"
        );
        assert!(err.contains(msg), "{name}: expected '{msg}' in:\n{err}");
        if name == "corrupt" {
            // Found in the one pass that streams the file into QEMU: the VMs started, and the
            // load failed on the withheld end of the stream; the reader's verdict leads.
            assert!(
                err.contains(&format!(
                    "the guest's saved state could not be loaded: state file {}",
                    copy.join("state").display()
                )),
                "{err}"
            );
            // Not the time-out: the load fails when the stream ends.
            assert!(start.elapsed() < std::time::Duration::from_secs(300), "{name}: took {:?}", start.elapsed());
        } else {
            assert!(!err.contains("guest up"), "{name}: a VM was started:\n{err}");
            // Refused before any VM: far quicker than a boot, even on a busy machine.
            assert!(start.elapsed() < std::time::Duration::from_secs(30), "{name}: took {:?}", start.elapsed());
        }
    }
}

#[test]
fn windows_media_builds_offline_without_the_iso() {
    let tmp = tempfile::tempdir().unwrap();
    let hash = "0".repeat(64);
    let o = nix_build(
        &format!(
            r#"(builtins.windowsImage {{ iso = {{ name = "win.iso"; sha256 = "{hash}"; }}; edition = "Windows 11 Pro"; }}).media"#
        ),
        &tmp.path().join("r"),
    );
    let media = built(&o);
    for f in ["autounattend.xml", "cygwin.img", "README.txt", "media.json", "vmlinuz", "key", "key.pub"] {
        assert!(media.join(f).exists(), "{f} missing in {}", media.display());
    }
    let xml = std::fs::read_to_string(media.join("autounattend.xml")).unwrap();
    assert!(xml.contains("Windows 11 Pro") && xml.contains("BypassTPMCheck"), "{xml}");
    let key = std::fs::read_to_string(media.join("key.pub")).unwrap();
    let bootstrap = std::fs::read_to_string(media.join("bootstrap.sh")).unwrap();
    assert!(bootstrap.contains(key.trim()), "the image's key is authorised in the bootstrap");
    // The installed stage needs the ISO and says how to add it; the media stage did not.
    let o = nix_build(
        &format!(
            r#"(builtins.windowsImage {{ iso = {{ name = "win.iso"; sha256 = "{hash}"; }}; edition = "Windows 11 Pro"; }}).installed"#
        ),
        &tmp.path().join("i"),
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nix-store --add-fixed sha256"), "{}", stderr(&o));
}

/// No Windows ISO exists here: the install stage is run by hand with a blank stand-in ISO, to
/// prove that its QEMU command line is accepted and its failure paths are clean.
#[test]
fn windows_install_stage_refuses_incomplete_media_and_a_disc_that_is_no_iso() {
    let tmp = tempfile::tempdir().unwrap();
    let hash = "0".repeat(64);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cygwin-repo");
    let image = |extra: &str| {
        format!(
            r#"builtins.windowsImage {{ iso = {{ name = "win.iso"; sha256 = "{hash}"; }}; edition = "Windows 11 Pro"; accel = "tcg"; timeout = 15; {extra} }}"#
        )
    };
    let bare = built(&nix_build(&format!("({}).media", image("")), &tmp.path().join("bare")));
    let full = built(&nix_build(
        &format!("({}).media", image(&format!("cygwinRepo = {};", repo.display()))),
        &tmp.path().join("full"),
    ));
    // The spec the plugin writes for an image with `extra` attributes (media do not record it).
    let spec_of = |extra: &str| -> String {
        let o = Command::new("nix-instantiate")
            .env("NIX_CONFIG", SANDBOX_CONFIG)
            .env("NIX_WINVM_BUILDER", builder())
            .arg("--plugin-files")
            .arg(plugin())
            .args(["--eval", "--json", "-E", &format!("({}).winvmImageSpec", image(extra))])
            .output()
            .unwrap();
        serde_json::from_slice::<String>(&o.stdout).unwrap()
    };
    let iso = tmp.path().join("blank.iso");
    std::fs::write(&iso, vec![0u8; 1 << 20]).unwrap();
    let run = |media: &Path, spec_extra: &str, name: &str| {
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(media.join("media.json")).unwrap()).unwrap();
        assert_eq!(meta["edition"], "Windows 11 Pro");
        Command::new(builder())
            .arg("install")
            .env("winvmImageSpec", spec_of(spec_extra))
            .env("media", media)
            .env("iso", &iso)
            .env("out", tmp.path().join(name))
            .env("TMPDIR", tmp.path())
            .output()
            .unwrap()
    };
    let o = run(&bare, "", "bare-out");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cygwinRepo"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("installer VM started"));

    // UEFI media: the answer file lays the disk out for it (the install stage is in
    // tests/windows_iso.rs, which has an ISO with an install.wim).
    let efi = built(&nix_build(
        &format!("({}).media", image(&format!("efi = true; cygwinRepo = {};", repo.display()))),
        &tmp.path().join("efi"),
    ));
    assert!(std::fs::read_to_string(efi.join("autounattend.xml")).unwrap().contains("<Type>EFI</Type>"));

    // Full media, but the disc is no ISO: refused before anything boots.
    let o = run(&full, "", "full-out");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("{} is not an ISO image", iso.display())), "{err}");
    assert!(!err.contains("installer VM started"), "{err}");
}

#[test]
fn a_failed_build_kept_with_k_has_its_logs_and_run_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let o = nix_build_kept(tmp.path(), &build_expr("kept", "", "echo boom; exit 9"));
    assert!(!o.status.success());
    let build_dir = kept_build_dir(&stderr(&o));
    // The sandbox's /build is the kept folder itself (Nix 2.8) or its `build` child (later
    // Nix keeps the top folder private and builds in a folder inside it).
    let work = kept_work_folder(&build_dir);
    // run-vm starts the session again from rerun.json (tests/debugging.rs runs it).
    for f in ["run-vm", "rerun.json", "guest-serial.log", "controller-serial.log", "xchg/output.log"] {
        assert!(work.join(f).exists(), "{f} missing in {}", work.display());
    }
    assert!(std::fs::read_to_string(work.join("xchg/output.log")).unwrap().contains("boom"));
    remove_kept(&build_dir);
}

/// `efi = true`: the standin installs, is saved and revived, and builds under OVMF, with its
/// own variable store kept in the image.
#[test]
fn a_uefi_standin_installs_suspends_revives_and_builds() {
    let tmp = tempfile::tempdir().unwrap();
    let image = r#"builtins.windowsImage { guest = "standin"; accel = "tcg"; efi = true; }"#;
    let expr = format!(
        r#"builtins.windowsDerivation {{ name = "uefi"; image = {image}; token = "{}"; script = ''echo uefi > $out; ls /sys/firmware/efi >/dev/null && echo booted-by-uefi >> $out''; }}"#,
        token("uefi")
    );
    let o = nix_build(&expr, &tmp.path().join("uefi"));
    assert_eq!(std::fs::read_to_string(built(&o)).unwrap(), "uefi\nbooted-by-uefi\n");
    let log = stderr(&o);
    assert!(log.contains("guest revived"), "{log}");
    let image = built(&nix_build(image, &tmp.path().join("image")));
    let vars = std::fs::read(image.join("efi-vars.fd")).expect("the image's UEFI variable store");
    let template = nix_winvm::testing::Ovmf::find().unwrap().vars_template;
    assert_eq!(vars.len() as u64, std::fs::metadata(&template).unwrap().len());
    assert_ne!(vars, std::fs::read(&template).unwrap(), "the firmware wrote its variables at the first boot");
}

/// A guest that never finishes is seen: its screen is taken every few seconds and once more
/// at the time-out, kept as PNG in the work folder, and the error names the last one.
#[test]
fn a_build_that_times_out_names_its_last_screenshot() {
    let tmp = tempfile::tempdir().unwrap();
    let script = "echo winvm-test-on-the-screen > /dev/tty0; echo waiting; sleep 600";
    // The time-out counts from the stage's start and must strike during the command: 60 s
    // leaves the revive and SSH a wide margin on a busy machine.
    let o = nix_build_kept(tmp.path(), &build_expr("stuck", "timeout = 60;", script));
    let log = stderr(&o);
    assert!(!o.status.success(), "{log}");
    assert!(log.contains("the build exceeded its timeout of 60 s while running the command"), "{log}");
    let named = log
        .lines()
        .find_map(|l| l.split("the guest's screen when it failed: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no screenshot named in:\n{log}"));
    assert!(named.ends_with(".png"), "{named}");
    // The sandbox's /build is the kept folder (Nix 2.8) or its `build` child (later Nix).
    let build_dir = kept_build_dir(&log);
    let inside = Path::new(named).strip_prefix("/build").expect("a path in the sandbox's /build");
    let png = [build_dir.join(inside), build_dir.join("build").join(inside)]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{named} is not in the kept folder {}", build_dir.display()));
    let dir = png.parent().unwrap();
    let names: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let numbered = names.iter().filter(|n| !n.ends_with("-latest.png")).count();
    assert!((2..=nix_winvm::testing::SCREENS_KEPT).contains(&numbered), "{numbered} screenshots kept: {names:?}");
    // Beside them, the newest under a name that stays: the one the failure named.
    let latest = std::fs::read(dir.join("guest-latest.png")).expect("guest-latest.png");
    assert_eq!(latest, std::fs::read(&png).unwrap(), "the latest is the last one taken");
    let (w, h, pixels) = nix_winvm::format::png::decode(&std::fs::read(&png).unwrap()).unwrap();
    // VGA text mode: 80x25 cells of 9x16 pixels. Text is there: more than one colour, and
    // more than the firmware's few lines of it.
    assert_eq!((w, h), (720, 400));
    let background = &pixels[..3];
    let lit = pixels.chunks_exact(3).filter(|p| p != &background).count();
    assert!(lit > 2000, "only {lit} pixels differ from the background: the screen is blank");
    remove_kept(&build_dir);
}

/// Multi-user Nix: the daemon's default, `build-users-group = nixbld`. The builder, QEMU, the
/// switch and smbd then run as a build user; nothing they need may be readable only by root.
#[test]
fn builds_run_as_a_build_user_of_the_nixbld_group() {
    let group = Command::new("getent").args(["group", "nixbld"]).output().unwrap();
    assert!(
        nix_winvm::testing::test_requires(
            "the nixbld group and its users (scripts/setup makes them)",
            group.status.success()
        ),
        "no nixbld group"
    );
    let config = SANDBOX_CONFIG.replace("build-users-group =", "build-users-group = nixbld");
    assert!(config.contains("build-users-group = nixbld"), "{config}");
    let tmp = tempfile::tempdir().unwrap();
    let run = |expr: &str, keep: bool| {
        let mut c = Command::new("nix-build");
        c.env("NIX_CONFIG", &config).env("NIX_WINVM_BUILDER", builder()).env("TMPDIR", tmp.path());
        c.env_remove("NIX_REMOTE").arg("--plugin-files").arg(plugin()).arg("--no-out-link");
        if keep {
            c.arg("-K");
        }
        c.args(["-E", expr]).output().unwrap()
    };
    let ok = run(&build_expr("as-build-user", "", "echo ok > $out"), false);
    assert_eq!(std::fs::read_to_string(built(&ok)).unwrap(), "ok\n");
    // Who ran it: the owner of the build folder Nix keeps after a failure.
    let failed = run(&build_expr("as-build-user-kept", "", "exit 4"), true);
    let log = stderr(&failed);
    assert!(!failed.status.success(), "{log}");
    assert!(log.contains("command exited 4"), "{log}");
    let kept = kept_build_dir(&log);
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata(&kept).unwrap().uid();
    let name = Command::new("getent").args(["passwd", &uid.to_string()]).output().unwrap();
    let name = String::from_utf8_lossy(&name.stdout).split(':').next().unwrap_or("").to_owned();
    assert!(name.starts_with("nixbld"), "the build ran as uid {uid} ({name:?}), not a build user");
    remove_kept(&kept);
}

/// Every revive of an image starts from the same saved memory, the kernel's random-number
/// generator included: without QEMU's VM Generation ID device (a new GUID at each start, which
/// the guest's kernel mixes in and reseeds from) two builds read the same "random" bytes.
#[test]
fn each_revive_gets_its_own_random_state() {
    let tmp = tempfile::tempdir().unwrap();
    let script = "dd if=/dev/urandom bs=4096 count=1 2>/dev/null | md5sum > $out";
    let a = nix_build(&build_expr("random-a", "", script), &tmp.path().join("a"));
    let b = nix_build(&build_expr("random-b", "", script), &tmp.path().join("b"));
    for o in [&a, &b] {
        assert!(stderr(o).contains("guest revived"), "{}", stderr(o));
    }
    let (a, b) = (std::fs::read_to_string(built(&a)).unwrap(), std::fs::read_to_string(built(&b)).unwrap());
    assert_eq!(a.len(), 36, "{a:?}");
    assert_ne!(a, b, "two revives of one image read the same bytes from /dev/urandom");
}

/// A script in the store runs through PATH in a build, and `test -x` holds for it: what the
/// Windows guest's `mount -f` of the store keeps (Cygwin mounts a network share `notexec`
/// otherwise; src/guest/windows/scripts.rs tests the mount line). On the standin, Linux's SMB
/// client has no such default, so this shows the behaviour builds rely on, not Cygwin's fault.
#[test]
fn a_script_in_the_store_runs_through_path_in_a_build() {
    let tmp = tempfile::tempdir().unwrap();
    let tool = build_expr(
        "store-tool",
        "",
        "mkdir -p $out/bin; printf '#!/bin/sh\\necho tool-ran\\n' > $out/bin/store-tool; chmod 755 $out/bin/store-tool",
    );
    let user = format!(
        r#"builtins.windowsDerivation {{ name = "uses-store-tool"; image = {IMAGE}; token = "{}"; tool = {tool}; script = ''PATH=$tool/bin:$PATH; test -x $tool/bin/store-tool; store-tool > $out''; }}"#,
        token("uses-store-tool")
    );
    let o = nix_build(&user, &tmp.path().join("r"));
    assert_eq!(std::fs::read_to_string(built(&o)).unwrap(), "tool-ran\n");
}
