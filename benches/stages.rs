//! Stages benchmark: revive against cold boot, our state file against QEMU's exec:gzip, and a
//! trivial nix-build with a cached image. One run of each, printed as numbers.
//!
//!   cargo bench --bench stages
//!
//! Needs what scripts/setup installs; builds (or reuses) the standin image in /nix/store.

use nix_winvm::vm::qmp::{Cont, Migrate, Qmp, QueryStatus, Quit, Stop};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BUILDER: &str = env!("CARGO_BIN_EXE_nix-winvm-builder");
const SANDBOX: &str = include_str!("../nix/sandbox.conf");
const IMAGE: &str = r#"builtins.windowsImage { guest = "standin"; accel = "tcg"; }"#;

fn plugin() -> PathBuf {
    let dir = Path::new(BUILDER).parent().unwrap();
    let fresh = dir.join("deps/libnix_winvm.so");
    if fresh.exists() {
        fresh
    } else {
        dir.join("libnix_winvm.so")
    }
}

fn nix_build(expr: &str) -> (PathBuf, f64) {
    let start = Instant::now();
    let o = Command::new("nix-build")
        .env("NIX_CONFIG", SANDBOX)
        .env("NIX_WINVM_BUILDER", BUILDER)
        .arg("--plugin-files")
        .arg(plugin())
        .args(["--no-out-link", "-E", expr])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()), start.elapsed().as_secs_f64())
}

/// Seconds from spawn until a stderr line contains `marker`, and the total.
fn time_to(mut cmd: Command, marker: &str) -> (f64, f64) {
    let start = Instant::now();
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let mut first = f64::NAN;
    let mut log = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok) {
        if first.is_nan() && line.contains(marker) {
            first = start.elapsed().as_secs_f64();
        }
        log.push_str(&line);
        log.push('\n');
    }
    assert!(child.wait().unwrap().success(), "{log}");
    (first, start.elapsed().as_secs_f64())
}

fn size(p: &Path) -> f64 {
    std::fs::metadata(p).unwrap().len() as f64 / 1e6
}

/// Kills its QEMU when dropped, so a failed bench leaves nothing running.
struct Vm(std::process::Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn qemu_with_qmp(work: &Path, name: &str, extra: &[&str], initrd: &Path, kernel: &Path) -> (Vm, Qmp) {
    let sock = work.join(format!("{name}.sock"));
    let child = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "256", "-nodefaults", "-display", "none"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet", "-serial"])
        .arg(format!("file:{}", work.join(format!("{name}.log")).display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .args(extra)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let vm = Vm(child);
    let qmp = Qmp::connect(&sock, Duration::from_secs(30)).await.unwrap();
    (vm, qmp)
}

async fn loaded(qmp: &mut Qmp) -> f64 {
    let start = Instant::now();
    loop {
        let s = qmp.execute(&QueryStatus).await.unwrap();
        if s.status != "inmigrate" {
            return start.elapsed().as_secs_f64();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn main() {
    println!("stages benchmark (standin guest, TCG, one run each)");
    // --- image, cached after the first time ---
    let (image, t_image) = nix_build(IMAGE);
    println!("  image: {} ({t_image:.1} s to build or find)", image.display());

    // --- cold boot vs revive, to the first output of the command ---
    let tmp = tempfile::tempdir().unwrap();
    let mut cold = Command::new(BUILDER);
    cold.args(["run", "--accel", "tcg", "--", "echo", "FIRST-OUTPUT"]);
    let (cold_first, _) = time_to(cold, "FIRST-OUTPUT");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(image.join("meta.json")).unwrap()).unwrap();
    let spec = serde_json::json!({ "image": meta["spec"], "timeoutSecs": 600, "runOriginalBuilder": false });
    let mut revive = Command::new(BUILDER);
    revive
        .arg("build")
        .env("image", &image)
        .env("winvmBuildSpec", spec.to_string())
        .env("script", "echo FIRST-OUTPUT")
        .env("out", tmp.path().join("out"))
        .env("TMPDIR", tmp.path());
    let (revive_first, _) = time_to(revive, "FIRST-OUTPUT");
    println!("  cold boot -> first command output      {cold_first:6.2} s");
    println!("  revive    -> first command output      {revive_first:6.2} s   ratio {:.2}", revive_first / cold_first);

    // --- state file: ours against QEMU's exec:gzip, on the same stopped guest ---
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let media = std::fs::read_link(image.join("media")).unwrap();
    let w = tmp.path();
    let key = w.join("key");
    let pubkey = nix_winvm::builder::stages::generate_key(Path::new("/usr/bin/ssh-keygen"), &key).unwrap();
    let initrd = w.join("guest.img");
    let img = nix_winvm::guest::standin::initramfs(
        Path::new("/bin/busybox"),
        Path::new("/usr/sbin/dropbear"),
        &media.join("modules"),
        &pubkey,
    )
    .unwrap();
    img.write_gz_file(&initrd).unwrap();
    let kernel = media.join("vmlinuz");
    rt.block_on(async {
        let (src, mut qmp) = qemu_with_qmp(w, "src", &[], &initrd, &kernel).await;
        // Let it boot to its shell so that memory holds a real system.
        let log = w.join("src.log");
        let start = Instant::now();
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("sshd started")
            && start.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        qmp.execute(&Stop).await.unwrap();
        // QEMU migrates a VM once; the raw stream is kept and both compressors get the same bytes.
        let raw = w.join("state.raw");
        let t = Instant::now();
        qmp.execute(&Migrate { uri: format!("exec:cat > {}", raw.display()) }).await.unwrap();
        qmp.wait_migration(Duration::from_secs(120)).await.unwrap();
        let t_raw = t.elapsed().as_secs_f64();
        let version = nix_winvm::session::qemu_version(&qmp);
        let _ = qmp.execute(&Quit).await;
        drop(src);
        let gz = w.join("state.gz");
        let ours = w.join("state.ours");
        let sh = |cmd: String| {
            let t = Instant::now();
            let st = Command::new("sh").args(["-c", &cmd]).status().unwrap();
            assert!(st.success(), "{cmd}");
            t.elapsed().as_secs_f64()
        };
        let t_gzip = sh(format!("gzip -c < {} > {}", raw.display(), gz.display()));
        let t_ours = sh(format!(
            "{BUILDER} state-write --out {} --memory 256 --qemu-version '{version}' --guest standin < {}",
            ours.display(),
            raw.display()
        ));
        let t_gunzip = sh(format!("gzip -c -d < {} > /dev/null", gz.display()));
        let t_read = sh(format!("{BUILDER} state-read --in {} > /dev/null", ours.display()));
        println!("  migration stream (raw, via exec:cat)    {t_raw:6.2} s  {:6.1} MB", size(&raw));
        println!("  compress  gzip -c (level 6)             {t_gzip:6.2} s  {:6.1} MB", size(&gz));
        println!(
            "  compress  ours (zlib-rs, level {})       {t_ours:6.2} s  {:6.1} MB   size ratio {:.2}",
            nix_winvm::vm::state::LEVEL,
            size(&ours),
            size(&ours) / size(&gz)
        );
        println!("  inflate   gzip -d                       {t_gunzip:6.2} s");
        println!("  inflate   ours (checks the frame too)   {t_read:6.2} s   {:.1}x faster", t_gunzip / t_read);
        let restore = |uri: String, name: &'static str| {
            let w = w.to_path_buf();
            let initrd = initrd.clone();
            let kernel = kernel.clone();
            async move {
                let (q, mut qmp) = qemu_with_qmp(&w, name, &["-incoming", &uri], &initrd, &kernel).await;
                let t = loaded(&mut qmp).await;
                qmp.execute(&Cont).await.unwrap();
                let _ = qmp.execute(&Quit).await;
                drop(q);
                t
            }
        };
        let r_gzip = restore(format!("exec:gzip -c -d {}", gz.display()), "rgz").await;
        let r_ours = restore(format!("exec:{BUILDER} state-read --in {}", ours.display()), "rours").await;
        println!("  restore exec:gzip -c -d                 {r_gzip:6.2} s");
        println!("  restore ours (state-read)               {r_ours:6.2} s   {:.1}x faster", r_gzip / r_ours);
    });

    // --- a trivial nix-build with the image cached ---
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let start = Instant::now();
    let o = Command::new("nix-instantiate")
        .env("NIX_CONFIG", SANDBOX)
        .env("NIX_WINVM_BUILDER", BUILDER)
        .arg("--plugin-files").arg(plugin())
        .args(["-E", &format!(r#"builtins.windowsDerivation {{ name = "bench"; image = {IMAGE}; token = "{t}"; script = "true > $out"; }}"#)])
        .output()
        .unwrap();
    assert!(o.status.success());
    let t_eval = start.elapsed().as_secs_f64();
    let (_, t_build) = nix_build(&format!(
        r#"builtins.windowsDerivation {{ name = "bench"; image = {IMAGE}; token = "{t}"; script = "true > $out"; }}"#
    ));
    println!("  trivial nix-build, image cached         {t_build:6.2} s   (evaluation {t_eval:.2} s; the rest is the VM session)");
}
