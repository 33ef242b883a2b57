//! A session's files, written before any process starts: the exchange directory with the
//! key and the agent's configuration, the controller's session line, and the `run-vm` script
//! that starts the same pair again by hand.

use super::config::TestFault;
use super::error::{io, RunError};
use super::SessionConfig;
use crate::controller::{self, Mount};
use crate::guest::{GUEST_IP, SSH_USER};
use crate::protocol::{self, AgentConfig, JobConfig, ServeConfig, Share, READY_XCHG};
use std::path::{Path, PathBuf};

/// The guest's serial console, in the work folder.
pub const GUEST_SERIAL_LOG: &str = "guest-serial.log";
pub const CONTROLLER_SERIAL_LOG: &str = "controller-serial.log";

pub(super) struct Files {
    pub xchg: PathBuf,
    pub run: PathBuf,
    pub controller_initrd: PathBuf,
    /// The line the controller's init waits for on ttyS1.
    pub session_line: String,
    pub guest_serial: PathBuf,
    pub controller_serial: PathBuf,
}

pub(super) fn prepare(cfg: &SessionConfig) -> Result<Files, RunError> {
    let w = &cfg.work;
    let mut files = Files {
        xchg: w.join("xchg"),
        run: w.join("run"),
        controller_initrd: cfg.controller.initrd.clone().unwrap_or_else(|| w.join("controller-initrd.img")),
        session_line: String::new(),
        guest_serial: w.join(GUEST_SERIAL_LOG),
        controller_serial: w.join(CONTROLLER_SERIAL_LOG),
    };
    for d in [&files.xchg, &files.run] {
        std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
    }
    let job = JobConfig {
        xchg: files.xchg.clone(),
        command: cfg.task.command.clone(),
        set_clock: cfg.set_clock(),
        kill_smbd_after_secs: match cfg.test_fault {
            Some(TestFault::KillSmbdAfter(secs)) => Some(secs),
            _ => None,
        },
        terminal: cfg.terminal.clone(),
        ready_again: matches!(cfg.task.after, super::After::SaveLayer(_)),
        split_streams: cfg.split_streams,
    };
    if cfg.controller.system.is_some() {
        // A ready controller serves already; its paths are its own (see controller::READY_*).
        files.session_line = protocol::ready_session_line();
        let job = JobConfig { xchg: READY_XCHG.into(), ..job };
        write_json(&files.xchg.join(protocol::AGENT_CONFIG), &job)?;
        return Ok(files);
    }
    let key = files.xchg.join("key");
    std::fs::copy(&cfg.guest.key, &key).map_err(io(format!("copying the key {}", cfg.guest.key.display())))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).map_err(io("making the key private"))?;
    }

    let mut mounts = vec![
        Mount { tag: "store".into(), at: cfg.store_dir.clone() },
        Mount { tag: "xchg".into(), at: files.xchg.clone() },
    ];
    let mut shares = vec![
        Share { name: "nixstore".into(), path: cfg.store_dir.clone() },
        Share { name: "xchg".into(), path: files.xchg.clone() },
    ];
    let mut share_list = String::new();
    for (i, s) in cfg.extra_shares.iter().enumerate() {
        mounts.push(Mount { tag: format!("share{i}"), at: s.host_path.clone() });
        shares.push(Share { name: s.name.clone(), path: s.host_path.clone() });
        share_list.push_str(&format!("{} {}\n", s.name, s.guest_path));
    }
    std::fs::write(files.xchg.join("shares"), share_list).map_err(io("writing the share list"))?;
    files.session_line = controller::session_line(&mounts, &[files.run.clone()], &cfg.agent, &files.xchg)
        .map_err(RunError::SessionLine)?;
    if cfg.controller.initrd.is_none() {
        let ctl = controller::initramfs(&cfg.tools.busybox, &cfg.controller.modules, false)
            .map_err(RunError::ControllerInit)?;
        ctl.write_gz_file(&files.controller_initrd)
            .map_err(io(format!("writing {}", files.controller_initrd.display())))?;
    }
    let agent = AgentConfig {
        serve: ServeConfig {
            shares,
            run_dir: files.run.clone(),
            smbd: cfg.tools.smbd.clone(),
            smbd_log: files.xchg.join("smbd.log"),
            guest_addr: format!("{GUEST_IP}:22"),
            user: SSH_USER.into(),
            key_file: key,
            ssh_timeout_secs: cfg.task.timeout.as_secs().max(1),
        },
        job,
    };
    write_json(&files.xchg.join(protocol::AGENT_CONFIG), &agent)?;
    Ok(files)
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), RunError> {
    let json = serde_json::to_string_pretty(value).map_err(|e| io("the agent's configuration")(e.into()))?;
    std::fs::write(path, json).map_err(io(format!("writing {}", path.display())))
}
/// `run-vm` in the work directory starts the session again by hand, for `-K` debugging: it
/// runs this program's `rerun` on the folder it sits in, wherever the folder was kept, which
/// reads the session's description there (`rerun.json`, written by the build and by `run`).
pub(super) fn write_run_vm_script(cfg: &SessionConfig) {
    let q = |p: &std::path::Path| crate::shell::quote(&p.display().to_string());
    // The tools closure a build names: outside the sandbox nobody sets it.
    let tools = std::env::var_os("winvmTools")
        .map(|t| format!("winvmTools={} ", q(std::path::Path::new(&t))))
        .unwrap_or_default();
    let script = format!(
        "#!/bin/sh\n\
         # Starts this session's VMs again from this folder, wherever it was kept (nix-build -K,\n\
         # nix-winvm-builder run -K): fresh VMs as the session started them, on a fresh switch.\n\
         #   sh run-vm                 a shell in the guest, in the build's environment\n\
         #   sh run-vm -- COMMAND...   one command in that environment: its stdout on stdout,\n\
         #                             its stderr on stderr, its exit code run-vm's\n\
         #   sh run-vm --quiet ...     no progress lines (on stderr otherwise)\n\
         #   sh run-vm --display       also the guest's screen on VNC (a unix socket here)\n\
         here=$(cd \"$(dirname \"$0\")\" && pwd) || exit 1\n\
         {tools}exec {} {} \"$here\" \"$@\"\n",
        q(&cfg.agent),
        crate::protocol::Subcommand::Rerun(vec![]).name()
    );
    let path = cfg.work.join("run-vm");
    if std::fs::write(&path, script).is_ok() {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
    }
}
