//! Stages benchmark: where a revived build's time goes, phase by phase, beside a cold boot's;
//! our state file against QEMU's exec:gzip and the raw stream; a trivial nix-build with a cached
//! image; outputs through the outputs disk; layers (making a trivial one, its size, and a
//! build revived from three layers against one from the base). One run of each, printed as
//! numbers.
//!
//!   cargo bench --bench stages
//!   STAGES_ONLY=layers cargo bench --bench stages    # the layers alone (or outputs)
//!
//! Needs what scripts/setup installs; builds (or reuses) the standin image in /nix/store.
//!
//! The revived build is a real `nix-build` in the sandbox (run outside Nix, the builder would
//! share the whole host store with the standin, which binds every path: tens of seconds). Nix
//! 2.8's nix-build prints the build log live on stderr; each line is stamped on arrival, and the
//! builder's progress lines carry its own clock as well (`nix-winvm: [  0.72 s] guest revived`).
//! Phases are found by the markers in `PHASES`; a marker that never appears prints "-".

#[path = "common.rs"]
mod common;

use common::{
    derivation, derivation_on, nix, nix_build, nix_instantiate, nix_with, run_stamped, Stamped, BUILDER, IMAGE,
};
use nix_winvm::testing::qmp::{Cont, Migrate, Qmp, QueryStatus, Quit, Stop};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// (phase, the substring of the first log line that marks it), in the order they happen.
const PHASES: &[(&str, &str)] = &[
    ("switch up", "switch up"),
    ("QEMU started (guest)", "guest up"),
    ("QEMU started (controller)", "controller up"),
    ("state loaded (guest)", "guest revived"),
    ("state loaded (controller)", "controller revived"),
    ("controller ready", "controller ready"),
    ("session sent", "session sent"),
    ("guest ready / SSH ready", "ssh ready"),
    ("first output", "FIRST-OUTPUT"),
    ("command finished", "command finished"),
    ("teardown done", "VMs stopped"),
    ("outputs collected", "outputs collected"),
    ("command exited", "command exited"),
];

/// The phase that marks the command's first output, for the ratio.
const FIRST_OUTPUT: &str = "FIRST-OUTPUT";

/// Each phase's time on the builder's clock, and the end-to-end exit as the last row.
fn phase_times(run: &Stamped) -> Vec<Option<f64>> {
    let mut times: Vec<Option<f64>> = PHASES.iter().map(|(_, marker)| run.at(marker)).collect();
    times.push(Some(run.exit_at()));
    times
}

/// "  at  +delta" for one column; the delta is from the previous phase that was reached.
fn column(times: &[Option<f64>], i: usize) -> String {
    match times[i] {
        None => format!("{:>8} {:>8}", "-", ""),
        Some(t) => {
            let previous = times[..i].iter().rev().find_map(|t| *t).unwrap_or(0.0);
            format!("{t:8.2} {:>8}", format!("{:+.2}", t - previous))
        }
    }
}

fn print_phases(revive: &Stamped, cold: &Stamped) {
    let (r, c) = (phase_times(revive), phase_times(cold));
    println!("  phases, on the builder's clock (s since it started; + since the previous phase reached)");
    println!("  {:<28} {:>8} {:>8}   {:>8} {:>8}", "phase", "revive", "+", "cold", "+");
    let names = PHASES.iter().map(|(name, _)| *name).chain(["process exit"]);
    for (i, name) in names.enumerate() {
        println!("{}", format!("  {name:<28} {}   {}", column(&r, i), column(&c, i)).trim_end());
    }
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

/// A token no earlier run used, so that Nix builds again.
fn token(what: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{what}-{now}")
}

fn main() {
    println!("stages benchmark (standin guest, TCG, one run each)");
    // STAGES_ONLY=layers or outputs: that part alone.
    match std::env::var("STAGES_ONLY").as_deref() {
        Ok("layers") => return layers(),
        Ok("outputs") => return outputs(),
        Ok("memory") => return memory(),
        Ok("memory-layers") => return memory_layers(),
        _ => {}
    }
    // --- image, cached after the first time ---
    let (image, t_image) = nix_build(IMAGE);
    println!("  image: {} ({t_image:.1} s to build or find)", image.display());

    // --- a revived build through nix-build, against a cold boot, phase by phase ---
    let expr = derivation(&token("revive"), "echo FIRST-OUTPUT; echo x > $out");
    let t_eval = nix_instantiate(&expr);
    let mut cmd = nix("nix-build");
    cmd.args(["--no-out-link", "-E", &expr]);
    let revive = run_stamped(cmd);
    if revive.status.success() {
        let out = revive.lines.iter().rev().find(|l| l.stdout).expect("nix-build printed no output path");
        assert_eq!(std::fs::read_to_string(out.text.trim()).unwrap(), "x\n", "the revived build's output");
    }
    let mut cmd = Command::new(BUILDER);
    cmd.args(["run", "--accel", "tcg", "--", "echo", FIRST_OUTPUT]);
    let cold = run_stamped(cmd);
    print_phases(&revive, &cold);
    // A failed run still shows the phases it reached; its log follows, and the bench goes on.
    for (what, run) in [("revived nix-build", &revive), ("cold run", &cold)] {
        if !run.status.success() {
            println!("  THE {what} FAILED ({}); its output:\n{}", run.status, run.log());
        }
    }
    match (revive.at(FIRST_OUTPUT), cold.at(FIRST_OUTPUT)) {
        (Some(r), Some(c)) => {
            println!("  first output: revive {r:.2} s, cold {c:.2} s (builder clock)   ratio revive/cold {:.2}", r / c)
        }
        (r, c) => {
            let show = |t: Option<f64>| t.map_or("not seen".to_string(), |t| format!("{t:.2} s"));
            println!("  first output: revive {}, cold {} (builder clock)", show(r), show(c))
        }
    }
    println!(
        "  revived nix-build, spawn to exit        {:6.2} s   (evaluation {t_eval:.2} s by nix-instantiate; builder started {:.2} s after the spawn)",
        revive.exit,
        revive.offset()
    );
    println!("  cold run, spawn to exit                 {:6.2} s", cold.exit);

    // --- state file: ours against QEMU's exec:gzip and the raw stream, on the same stopped guest ---
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let media = std::fs::read_link(image.join("media")).unwrap();
    let w = tmp.path();
    let key = w.join("key");
    let pubkey = nix_winvm::testing::generate_key(Path::new("/usr/bin/ssh-keygen"), &key).unwrap();
    let initrd = w.join("guest.img");
    let img = nix_winvm::testing::standin_initramfs(
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
        let version = nix_winvm::testing::qemu_version(&qmp);
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
            "{BUILDER} state-write --out {} --memory 256 --qemu-version '{version}' --guest standin --machine q35 --ram-outside no < {}",
            ours.display(),
            raw.display()
        ));
        let t_gunzip = sh(format!("gzip -c -d < {} > /dev/null", gz.display()));
        let t_read = sh(format!("{BUILDER} state-read --in {} > /dev/null", ours.display()));
        println!("  migration stream (raw, via exec:cat)    {t_raw:6.2} s  {:6.1} MB", size(&raw));
        println!("  compress  gzip -c (level 6)             {t_gzip:6.2} s  {:6.1} MB", size(&gz));
        println!(
            "  compress  ours (zlib-rs, level {})       {t_ours:6.2} s  {:6.1} MB   size ratio {:.2}",
            nix_winvm::format::state::LEVEL,
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
        let r_raw = restore(format!("exec:cat {}", raw.display()), "rraw").await;
        let r_gzip = restore(format!("exec:gzip -c -d {}", gz.display()), "rgz").await;
        let r_ours = restore(format!("exec:{BUILDER} state-read --in {}", ours.display()), "rours").await;
        println!("  restore exec:cat (raw, no inflating)    {r_raw:6.2} s   {:.0} MB/s: the floor", size(&raw) / r_raw);
        println!("  restore exec:gzip -c -d                 {r_gzip:6.2} s");
        println!(
            "  restore ours (state-read)               {r_ours:6.2} s   {:.1}x faster than gzip, {:.2}x the raw floor",
            r_gzip / r_ours,
            r_ours / r_raw
        );
    });

    // --- a trivial nix-build with the image cached ---
    let expr = derivation(&token("trivial"), "true > $out");
    let t_eval = nix_instantiate(&expr);
    let (_, t_build) = nix_build(&expr);
    println!("  trivial nix-build, image cached         {t_build:6.2} s   (evaluation {t_eval:.2} s; the rest is the VM session)");

    outputs();
    layers();
    memory();
    memory_layers();
}

/// The nix-winvms to compare: this one, after the one BENCH_BEFORE names if it is set.
fn winvms() -> Vec<Winvm> {
    let mut winvms = vec![];
    if let Some(dir) = std::env::var_os("BENCH_BEFORE") {
        let dir = PathBuf::from(dir).join("target/release");
        winvms.push(Winvm {
            label: "before".into(),
            builder: dir.join("nix-winvm-builder"),
            plugin: dir.join("libnix_winvm.so"),
        });
    }
    winvms.push(Winvm { label: "after".into(), builder: BUILDER.into(), plugin: common::plugin() });
    winvms
}

/// The 2 GiB standin of the memory bench.
const IMAGE_2G: &str = r#"builtins.windowsImage { guest = "standin"; accel = "tcg"; memory = 2048; timeout = 1800; }"#;

/// A layer on `base` that fills `mib` MiB of a tmpfs with random data.
fn dirty_layer(base: &str, mib: u32, tok: &str) -> String {
    format!(
        r#"(builtins.windowsImage {{ base = {base}; name = "dirty-{mib}"; timeout = 1800; installCommands = [ "mkdir -p /mnt/fill && mount -t tmpfs -o size=1900m none /mnt/fill && dd if=/dev/urandom of=/mnt/fill/random bs=1M count={mib} 2>/dev/null && echo {tok}" ]; }})"#
    )
}

/// Trivial layers on the 1536 MiB-dirty layer of the memory bench (the same token finds it
/// built): one, with its sizes, by each nix-winvm; then, by this one, a chain of five and a
/// build on it against one on the dirty layer itself.
fn memory_layers() {
    let tok = std::env::var("BENCH_DIRTY_TOKEN").unwrap_or_else(|_| token("memory"));
    let dirty = dirty_layer(IMAGE_2G, 1536, &tok);
    let trivial = |base: &str, n: u32| {
        format!(
            r#"(builtins.windowsImage {{ base = {base}; name = "trivial-{n}"; timeout = 1800; installCommands = [ "echo {tok} > /trivial-{n}" ]; }})"#
        )
    };
    // The clean image, five builds each, alternating, so that both meet the same machine.
    let winvms = winvms();
    let mut runs: Vec<Vec<(f64, f64)>> = vec![vec![]; winvms.len()];
    for w in &winvms {
        w.build(IMAGE_2G);
        let _ = w.stamped(&derivation_on(IMAGE_2G, &token("warm"), "true > $out"));
    }
    for _ in 0..5 {
        for (w, runs) in winvms.iter().zip(&mut runs) {
            let run = w.stamped(&derivation_on(IMAGE_2G, &token("clean"), "true > $out"));
            runs.push((run.exit, run.at("guest revived").unwrap_or(f64::NAN)));
        }
    }
    println!("  a trivial build on the clean 2 GiB standin, five runs each, alternating (min / median / max)");
    for (w, runs) in winvms.iter().zip(&mut runs) {
        let stats = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            format!("{:.2} / {:.2} / {:.2}", v[0], v[v.len() / 2], v[v.len() - 1])
        };
        println!(
            "  {:<7} spawn to exit {} s; guest revived at {} s",
            w.label,
            stats(runs.iter().map(|r| r.0).collect()),
            stats(runs.iter().map(|r| r.1).collect())
        );
    }
    println!("  trivial layers on the 1536 MiB-dirty layer of a 2 GiB standin");
    for w in winvms {
        w.build(&dirty);
        let (one, t) = w.build(&trivial(&dirty, 1));
        use std::os::unix::fs::MetadataExt;
        let on_disk = |name: &str| std::fs::metadata(one.join(name)).map_or(0.0, |m| m.blocks() as f64 * 512.0 / 1e6);
        println!(
            "  {:<7} a trivial layer: made in {t:6.1} s; guest state {:.1} MB, memory {:.1} MB, disk {:.2} MB, controller state {:.1} MB",
            w.label,
            on_disk("state"),
            on_disk("memory"),
            on_disk("disk.qcow2"),
            on_disk(nix_winvm::testing::CONTROLLER_STATE)
        );
        if w.label != "after" {
            continue;
        }
        let mut chain = trivial(&dirty, 1);
        let start = Instant::now();
        for n in 2..=5 {
            chain = trivial(&chain, n);
        }
        w.build(&chain);
        println!("  {:<7} four more trivial layers on it: {:.1} s", w.label, start.elapsed().as_secs_f64());
        let mut at = vec![];
        for (what, image) in [("the dirty layer", &dirty), ("five layers on it", &chain)] {
            let _ = w.stamped(&derivation_on(image, &token("warm"), "true > $out"));
            let run = w.stamped(&derivation_on(image, &token("trivial"), "echo FIRST-OUTPUT; true > $out"));
            println!(
                "  {:<7} a trivial build on {what:<18} guest revived at {:>5} s, first output {:>5} s, spawn to exit {:5.2} s",
                w.label,
                run.at("guest revived").map_or("-".to_owned(), |t| format!("{t:.2}")),
                run.at(FIRST_OUTPUT).map_or("-".to_owned(), |t| format!("{t:.2}")),
                run.exit
            );
            at.push(run.at("guest revived"));
        }
        if let [Some(a), Some(b)] = at[..] {
            println!("  {:<7} guest revived, five layers / the dirty layer: {:.2}", w.label, b / a);
        }
    }
}

/// A nix-winvm to measure: its builder and its plugin.
struct Winvm {
    label: String,
    builder: PathBuf,
    plugin: PathBuf,
}

impl Winvm {
    fn build(&self, expr: &str) -> (PathBuf, f64) {
        let start = Instant::now();
        let o =
            nix_with("nix-build", &self.builder, &self.plugin).args(["--no-out-link", "-E", expr]).output().unwrap();
        assert!(o.status.success(), "{}: {}", self.label, String::from_utf8_lossy(&o.stderr));
        (PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()), start.elapsed().as_secs_f64())
    }

    fn stamped(&self, expr: &str) -> Stamped {
        let mut cmd = nix_with("nix-build", &self.builder, &self.plugin);
        cmd.args(["--no-out-link", "-E", expr]);
        run_stamped(cmd)
    }
}

/// The parent of process `pid`, from /proc.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command's name in parentheses: state, then the parent.
    stat.rsplit_once(") ")?.1.split_whitespace().nth(1)?.parse().ok()
}

/// The guest QEMUs running now below the processes `roots` (the nix-builds of this bench:
/// their sandboxed builders are their descendants), and their summed resident and proportional
/// sizes in MB (a page shared by n processes counts 1/n in the latter: the memory they really
/// hold together).
fn guest_qemus(roots: &[u32]) -> (usize, f64, f64) {
    let mut n = 0;
    let (mut rss, mut pss) = (0.0, 0.0);
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let mut args = cmdline.split(|b| *b == 0);
        if !args.next().is_some_and(|a| a.ends_with(b"qemu-system-x86_64")) || !args.any(|a| a == b"guest") {
            continue;
        }
        let mut up = Some(pid);
        while let Some(p) = up.filter(|p| *p > 1 && !roots.contains(p)) {
            up = parent_of(p);
        }
        if !up.is_some_and(|p| roots.contains(&p)) {
            continue;
        }
        let Ok(rollup) = std::fs::read_to_string(entry.path().join("smaps_rollup")) else { continue };
        let kb = |key: &str| {
            rollup
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        n += 1;
        rss += kb("Rss:") / 1e3;
        pss += kb("Pss:") / 1e3;
    }
    (n, rss, pss)
}

/// Memory at scale: a 2 GiB standin with a layer that fills 0, 512 or 1536 MiB of a tmpfs
/// with random data, then a trivial build on it; by this nix-winvm, and by another one given
/// as BENCH_BEFORE=DIR (a checkout of it, built with cargo build --release) for the before
/// and after in one run. Then the guests' memory with one build and with four at once.
fn memory() {
    let winvms = winvms();
    let image = IMAGE_2G;
    let tok = std::env::var("BENCH_DIRTY_TOKEN").unwrap_or_else(|_| token("memory"));
    println!("  (the dirty layers' token: BENCH_DIRTY_TOKEN={tok})");
    let layer = |mib: u32| dirty_layer(image, mib, &tok);
    println!("  memory at scale: a 2 GiB standin, a layer filling N MiB of a tmpfs, a trivial build on it");
    println!(
        "  {:<7} {:>6} {:>12} {:>12} {:>10} {:>12} {:>14}",
        "", "dirty", "state MB", "memory MB", "layer s", "build s", "revived at s"
    );
    let mut dirtiest: Option<(String, String)> = None;
    for w in &winvms {
        let (base, _) = w.build(image);
        for mib in [0u32, 512, 1536] {
            let (expr, path, made) = if mib == 0 {
                (image.to_owned(), base.clone(), None)
            } else {
                let expr = layer(mib);
                let (path, t) = w.build(&expr);
                (expr, path, Some(t))
            };
            let mb = |name: &str| std::fs::metadata(path.join(name)).map_or(0.0, |m| m.len() as f64 / 1e6);
            // The first build on an image makes its memory stage (once per image): untimed.
            let _ = w.stamped(&derivation_on(&expr, &token("warm"), "true > $out"));
            let run = w.stamped(&derivation_on(&expr, &token("trivial"), "true > $out"));
            let revived = run.at("guest revived").map_or("-".to_owned(), |t| format!("{t:.2}"));
            println!(
                "  {:<7} {:>6} {:>12.1} {:>12.1} {:>10} {:>12.2} {:>14}",
                w.label,
                mib,
                mb("state"),
                mb("memory"),
                made.map_or("-".to_owned(), |t| format!("{t:.1}")),
                run.exit,
                revived
            );
            if !run.status.success() {
                println!("  THE BUILD FAILED ({}); its output:\n{}", run.status, run.log());
            }
            if mib == 1536 {
                dirtiest = Some((w.label.clone(), expr));
            }
        }
        // Parallel builds: the guests' memory, sampled while 1 and then 4 builds sleep.
        let Some((label, expr)) = dirtiest.take() else { continue };
        for n in [1usize, 4] {
            let mut children = vec![];
            for i in 0..n {
                let script = "sleep 20; true > $out";
                let mut cmd = nix_with("nix-build", &w.builder, &w.plugin);
                cmd.args(["--no-out-link", "-j4", "-E", &derivation_on(&expr, &token(&format!("par{i}")), script)]);
                children.push(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
            }
            let (mut peak_rss, mut peak_pss, mut most) = (0.0f64, 0.0f64, 0);
            let roots: Vec<u32> = children.iter().map(|c| c.id()).collect();
            let start = Instant::now();
            while children.iter_mut().any(|c| c.try_wait().unwrap().is_none())
                && start.elapsed() < Duration::from_secs(300)
            {
                let (k, rss, pss) = guest_qemus(&roots);
                if k >= most {
                    most = k;
                    peak_rss = peak_rss.max(rss);
                    peak_pss = peak_pss.max(pss);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            for mut c in children {
                let _ = c.kill();
                let _ = c.wait();
            }
            println!(
                "  {label:<7} {n} build(s) at once on the 1536 MiB layer: {most} guests seen, their memory {peak_pss:7.0} MB (PSS; RSS summed {peak_rss:7.0} MB)"
            );
        }
    }
}

/// Outputs: the script's end to the builder's end (the outputs unpacked from the outputs disk
/// and the VMs gone), for 50 and 500 MB; then an input of 50 MB read by the guest from the
/// store (through the controller's share), on the guest's clock.
fn outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input-50mb");
    let mut data = vec![0u8; 50_000_000];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2654435761) >> 13) as u8;
    }
    data[..16].copy_from_slice(&format!("{:<16}", token("in")).as_bytes()[..16]);
    std::fs::write(&input, &data).unwrap();
    let script =
        "read a i </proc/uptime; cat $big >/dev/null; read b i </proc/uptime; echo INPUT-READ $a $b; touch $out";
    let expr = format!(
        r#"builtins.windowsDerivation {{ name = "bench"; image = {IMAGE}; big = builtins.path {{ path = {}; name = "input-50mb"; }}; token = "{}"; script = "{script}"; }}"#,
        input.display(),
        token("input")
    );
    let mut cmd = nix("nix-build");
    cmd.args(["--no-out-link", "-E", &expr]);
    let run = run_stamped(cmd);
    let read = run.lines.iter().find_map(|l| {
        let mut w = l.text.split_whitespace().skip_while(|w| *w != "INPUT-READ").skip(1);
        Some((w.next()?.parse::<f64>().ok()?, w.next()?.parse::<f64>().ok()?))
    });
    match read {
        Some((a, b)) => println!(
            "   50 MB from the store (an input), read by the guest       {:5.2} s = {:4.0} MB/s",
            b - a,
            50.0 / (b - a)
        ),
        None => println!("  the 50 MB input build printed no INPUT-READ line ({}):\n{}", run.status, run.log()),
    }
    for mb in [50, 500] {
        let script = format!("head -c {mb}000000 /dev/urandom > $out; echo WRITTEN");
        let mut cmd = nix("nix-build");
        cmd.args(["--no-out-link", "-E", &derivation(&token(&format!("out{mb}")), &script)]);
        let run = run_stamped(cmd);
        if !run.status.success() {
            println!("  THE {mb} MB OUTPUT BUILD FAILED ({}); its output:\n{}", run.status, run.log());
            continue;
        }
        let arrived = |marker: &str| run.lines.iter().find(|l| l.text.contains(marker)).map(|l| l.arrival);
        // The guest's own clock for its packing: from its two progress lines.
        let guest = |marker: &str| {
            let line = run.lines.iter().find(|l| l.text.contains(marker))?;
            let rest = &line.text[line.text.find("[guest ")? + 7..];
            rest[..rest.find(" s]")?].parse::<f64>().ok()
        };
        match (arrived("WRITTEN"), arrived("command exited"), guest("packing"), guest("outputs packed")) {
            (Some(w), Some(c), Some(p0), Some(p1)) => println!(
                "  {mb:3} MB to $out: script end -> builder done {:5.2} s = {:4.0} MB/s   (packed in the guest {:5.2} s = {:4.0} MB/s)",
                c - w,
                mb as f64 / (c - w),
                p1 - p0,
                mb as f64 / (p1 - p0)
            ),
            _ => println!("  {mb} MB to $out: markers missing in:\n{}", run.log()),
        }
    }
}

/// A trivial layer (one command writing a line onto the guest's disk): the time to make it
/// through nix-build with its base cached, and what it takes on disk; then a build on a
/// three-layer image beside the same build on the base, each revived from a cached image.
fn layers() {
    // The base, made or found first, untimed.
    nix_build(IMAGE);
    let tok = token("layer");
    let layer = |base: &str, n: u32| {
        format!(
            r#"(builtins.windowsImage {{ base = {base}; name = "bench-layer-{n}"; installCommands = [ "echo {tok} > /layer-{n}" ]; }})"#
        )
    };
    let one = layer(IMAGE, 1);
    let (one_path, t_one) = nix_build(&one);
    let file_mb = |name: &str| std::fs::metadata(one_path.join(name)).map_or(0.0, |m| m.len() as f64 / 1e6);
    println!(
        "  trivial layer, base cached: made in    {t_one:6.2} s   its disk {:.2} MB, guest state {:.1} MB, guest memory {:.2} MB, controller state {:.1} MB",
        file_mb("disk.qcow2"),
        file_mb("state"),
        file_mb("memory"),
        file_mb(nix_winvm::testing::CONTROLLER_STATE)
    );
    let three = layer(&layer(&one, 2), 3);
    let (_, t_two_more) = nix_build(&three);
    println!("  two more layers on it                   {t_two_more:6.2} s   ({:.2} s each)", t_two_more / 2.0);
    let script = "echo FIRST-OUTPUT; cat /layer-1 /layer-2 /layer-3 > $out 2>/dev/null || echo base > $out";
    let mut first = Vec::new();
    for (what, image) in [("base", IMAGE.to_owned()), ("three layers", three)] {
        // Made once untimed, so both runs below revive a cached image and only the build runs.
        let mut cmd = nix("nix-build");
        cmd.args(["--no-out-link", "-E", &derivation_on(&image, &token("revive"), script)]);
        let run = run_stamped(cmd);
        if !run.status.success() {
            println!("  THE BUILD ON {what} FAILED ({}); its output:\n{}", run.status, run.log());
            continue;
        }
        let at = |m: &str| run.at(m).map_or("-".to_owned(), |t| format!("{t:.2}"));
        println!(
            "  build on {what:<13} guest revived {:>5} s, first output {:>5} s, spawn to exit {:5.2} s",
            at("guest revived"),
            at(FIRST_OUTPUT),
            run.exit
        );
        first.push(run.at(FIRST_OUTPUT));
    }
    if let [Some(base), Some(three)] = first[..] {
        println!("  first output, three layers / base       {:6.2}", three / base);
    }
}
