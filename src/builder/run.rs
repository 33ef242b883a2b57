//! `nix-winvm-builder run`: boot a fresh standin pair and run one command, for people and tests.
//!
//!   nix-winvm-builder run [--guest standin] [--accel auto|kvm|tcg] [--memory MIB] [--timeout SECS]
//!                         [--out DIR] [-K|--keep] -- COMMAND...

use super::Progress;
use super::{io, BuilderError};
use crate::guest::standin;
use crate::session::{self, After, ControllerBoot, ExtraShare, GuestBoot, Limit, SessionConfig, Task, TestFault};
use crate::shell;
use crate::spec::{Accel, MachineShape, STANDIN_MEMORY_MIB};
use crate::tools::Tools;
use crate::vm::accel;
use crate::vm::qemu::KernelBoot;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunArgs {
    pub accel: Option<Accel>,
    pub memory_mib: u32,
    pub timeout_secs: u64,
    pub out: Option<PathBuf>,
    pub keep: bool,
    pub command: Vec<String>,
}

pub const USAGE: &str = "usage: nix-winvm-builder run [--guest standin] [--accel auto|kvm|tcg] [--memory MIB] [--timeout SECS] [--out DIR] [-K] -- COMMAND...";

pub fn parse(args: &[String]) -> Result<RunArgs, BuilderError> {
    let usage = |m: String| BuilderError::Usage(format!("{m}\n{USAGE}"));
    let mut r = RunArgs {
        accel: None,
        memory_mib: STANDIN_MEMORY_MIB,
        timeout_secs: 600,
        out: None,
        keep: false,
        command: vec![],
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| usage(format!("{name} needs a value")));
        match a.as_str() {
            "--guest" => {
                let g = value("--guest")?;
                if g != "standin" {
                    return Err(usage(format!(
                        "--guest {g}: direct runs boot the standin guest only; Windows guests run from an image (builtins.windowsImage)"
                    )));
                }
            }
            "--accel" => {
                r.accel = match value("--accel")?.as_str() {
                    "auto" => None,
                    "kvm" => Some(Accel::Kvm),
                    "tcg" => Some(Accel::Tcg),
                    other => return Err(usage(format!("--accel {other}: expected auto, kvm or tcg"))),
                }
            }
            "--memory" => {
                let v = value("--memory")?;
                r.memory_mib = v.parse().map_err(|_| usage(format!("--memory {v}: expected MiB")))?;
            }
            "--timeout" => {
                let v = value("--timeout")?;
                r.timeout_secs = v
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| usage(format!("--timeout {v}: expected seconds")))?;
            }
            "--out" => r.out = Some(PathBuf::from(value("--out")?)),
            "-K" | "--keep" => r.keep = true,
            "--" => {
                r.command = it.cloned().collect();
                break;
            }
            other => return Err(usage(format!("unknown option '{other}'"))),
        }
    }
    if r.command.is_empty() {
        return Err(usage("no command given after --".into()));
    }
    Ok(r)
}

pub const GUEST_OUT: &str = "/tmp/out";

pub fn main(args: &[String]) -> Result<i32, BuilderError> {
    let a = parse(args)?;
    let progress = Progress::new();
    let accel = match a.accel {
        Some(requested) => accel::choose(requested)?,
        None => match accel::choose(Accel::Kvm) {
            Ok(k) => k,
            Err(e) => {
                progress.say(&format!(
                    "KVM unusable ({}): falling back to TCG, software emulation, several times slower",
                    e.reason
                ));
                Accel::Tcg
            }
        },
    };
    progress.say(&format!("accelerator: {}", accel.name()));
    let tools = Tools::find()?;
    let kernel_dir = std::env::var_os("NIX_WINVM_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(crate::spec::DEFAULT_CACHE).join("kernel"));
    let work = tempfile::Builder::new().prefix("nix-winvm-").tempdir().map_err(io("cannot create a work directory"))?;
    // Where the work folder is: after it is gone, its file system still tells if it was full.
    let tmp_dir = work.path().parent().map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let mut extra_shares = vec![];
    let mut command = String::new();
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).map_err(io(format!("cannot create {}", out.display())))?;
        let out = out.canonicalize().map_err(io(out.display().to_string()))?;
        extra_shares.push(ExtraShare { name: "out".into(), host_path: out, guest_path: GUEST_OUT.into() });
        command.push_str(&format!("out={GUEST_OUT}; export out; "));
    }
    command.push_str("exec");
    for c in &a.command {
        command.push(' ');
        command.push_str(&shell::quote(c));
    }
    let kernel = pvh_kernel(&kernel_dir, &progress);
    // A cold guest: a fresh key, and the standin system as the initramfs.
    let key = work.path().join("key");
    let pubkey = super::stages::generate_key(&tools.ssh_keygen, &key)?;
    let test_fault = TestFault::from_env()?;
    let mut append = crate::vm::kernel::APPEND.to_owned();
    if test_fault == Some(TestFault::NoSshd) {
        append.push(' ');
        append.push_str(standin::NO_SSHD_FAULT);
    }
    let modules_dir = kernel_dir.join("modules");
    let guest_initrd = work.path().join("guest-initrd.img");
    let img = standin::initramfs(&tools.busybox, &tools.dropbear, &modules_dir, &pubkey)?;
    img.write_gz_file(&guest_initrd).map_err(super::io(format!("writing {}", guest_initrd.display())))?;
    let guest = GuestBoot::from_kernel(KernelBoot { kernel: kernel.clone(), initrd: guest_initrd, append }, key);
    let controller = ControllerBoot { kernel, modules: modules_dir, initrd: None, system: None, revive_from: None };
    let task = Task { command, after: After::Quit, timeout: Duration::from_secs(a.timeout_secs), limit: Limit::Option };
    // Booted for this run alone, never saved: QEMU's newest machine.
    let shape = MachineShape::new(accel, a.memory_mib, 1, false);
    let mut cfg = SessionConfig::new(shape, guest, controller, task, work.path().to_path_buf(), tools)?;
    cfg.extra_shares = extra_shares;
    cfg.test_fault = test_fault;
    let rerun = super::rerun::Rerun {
        guest: super::rerun::RerunGuest::Cold {
            accel,
            memory_mib: a.memory_mib,
            kernel: cfg.controller.kernel.clone(),
            modules: cfg.controller.modules.clone(),
            append: match &cfg.guest.machine.boot {
                Some(boot) => boot.append.clone(),
                None => String::new(),
            },
        },
        timeout_secs: a.timeout_secs,
        outputs: vec![],
        inputs: vec![],
    };
    rerun.record(&cfg.work);
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io("cannot start the runtime"))?;
    let result = rt.block_on(session::run(&cfg, &progress));
    drop(rt);
    if a.keep {
        let kept = work.keep();
        progress.say(&format!(
            "work directory kept: {} (run-vm restarts the VMs; network.pcap holds their traffic, for tcpdump -r)",
            kept.display()
        ));
    }
    let mut writes = vec![tmp_dir.as_path()];
    if let Some(out) = &a.out {
        writes.push(out.as_path());
    }
    super::finish(result, &progress, &writes)
}

/// The uncompressed kernel, made once per kernel version in the cache (direct runs have no
/// media stage to make it); the compressed one when that fails.
fn pvh_kernel(kernel_dir: &std::path::Path, progress: &Progress) -> PathBuf {
    if kernel_dir.join("vmlinux").is_file() {
        return kernel_dir.join("vmlinux");
    }
    let version = std::fs::read_to_string(kernel_dir.join("version")).unwrap_or_else(|_| "unknown".into());
    let dir = PathBuf::from(crate::spec::DEFAULT_CACHE).join("pvh").join(version.trim());
    let pvh = dir.join("vmlinux");
    if pvh.is_file() {
        return pvh;
    }
    let made = std::fs::create_dir_all(&dir)
        .map_err(io(format!("creating {}", dir.display())))
        .and_then(|()| super::extract_vmlinux(&kernel_dir.join("vmlinuz"), &pvh));
    match made {
        Ok(()) => {
            progress.say(&format!("uncompressed kernel cached in {}", pvh.display()));
            pvh
        }
        Err(e) => {
            progress.say(&format!("booting the compressed kernel ({e})"));
            kernel_dir.join("vmlinuz")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_the_issue_example() {
        let r = parse(&v(&["--guest", "standin", "--accel", "tcg", "--out", "/tmp/o", "--", "sh", "-c", "exit 42"]))
            .unwrap();
        assert_eq!(r.accel, Some(Accel::Tcg));
        assert_eq!(r.out, Some(PathBuf::from("/tmp/o")));
        assert_eq!(r.command, v(&["sh", "-c", "exit 42"]));
    }

    #[test]
    fn rejects_bad_options() {
        let e = parse(&v(&["--accel", "hvf", "--", "true"])).unwrap_err().to_string();
        assert!(e.starts_with("--accel hvf: expected auto, kvm or tcg"), "{e}");
        let e = parse(&v(&["--guest", "windows", "--", "true"])).unwrap_err().to_string();
        assert!(e.starts_with("--guest windows: direct runs boot the standin guest only"), "{e}");
        let e = parse(&v(&["--accel", "tcg"])).unwrap_err().to_string();
        assert!(e.starts_with("no command given after --"), "{e}");
    }
}
