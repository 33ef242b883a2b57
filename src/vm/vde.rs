//! The VDE switch both VMs plug into. Ready when its management socket answers `showinfo`.

use super::process::{ProcessGuard, SpawnError};
use super::wait::{wait_until, TimedOut};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::Command;

pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug)]
pub enum StartSwitchError {
    Spawn(SpawnError),
    Exited { status: String, log: String },
    NotReady(TimedOut),
}

impl fmt::Display for StartSwitchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartSwitchError::Spawn(e) => write!(f, "{e}"),
            StartSwitchError::Exited { status, log } => write!(f, "vde_switch exited with {status}: {log}"),
            StartSwitchError::NotReady(e) => write!(f, "vde_switch did not answer: {e}"),
        }
    }
}

impl std::error::Error for StartSwitchError {}

pub struct VdeSwitch {
    pub guard: ProcessGuard,
    pub ctl: PathBuf,
    pub mgmt: PathBuf,
    // Held open: vde_switch in the foreground reads commands from stdin and exits at EOF.
    _stdin: Option<tokio::process::ChildStdin>,
}

impl VdeSwitch {
    pub async fn start(program: &Path, dir: &Path) -> Result<VdeSwitch, StartSwitchError> {
        let ctl = dir.join("vde.ctl");
        let mgmt = dir.join("vde.mgmt");
        let log = dir.join("vde_switch.log");
        let log_file = std::fs::File::create(&log).map_err(|source| {
            StartSwitchError::Spawn(SpawnError {
                name: "vde_switch".into(),
                program: log.display().to_string(),
                source,
            })
        })?;
        let mut cmd = Command::new(program);
        // --dirmode 0700: in the Nix sandbox the builder is not root and cannot chown to a group.
        cmd.arg("-s").arg(&ctl).arg("-M").arg(&mgmt).args(["--dirmode", "0700"]);
        cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(log_file);
        let mut guard = ProcessGuard::spawn("vde_switch", cmd).map_err(StartSwitchError::Spawn)?;
        let stdin = guard.take_stdin();
        let mgmt_path = mgmt.clone();
        let ready =
            wait_until(&format!("vde_switch to answer 'showinfo' on {}", mgmt.display()), READY_TIMEOUT, || {
                let exited = guard.try_exited();
                let mgmt = mgmt_path.clone();
                async move {
                    if let Some(s) = exited {
                        return Some(Err(super::process::describe_status(s)));
                    }
                    showinfo(&mgmt).await.ok().map(Ok)
                }
            })
            .await;
        match ready {
            Ok(Ok(())) => Ok(VdeSwitch { guard, ctl, mgmt, _stdin: stdin }),
            Ok(Err(status)) => Err(StartSwitchError::Exited {
                status,
                log: std::fs::read_to_string(&log).unwrap_or_default().trim().to_owned(),
            }),
            Err(t) => Err(StartSwitchError::NotReady(t)),
        }
    }
}

/// One management handshake: the switch prints a banner and a prompt, answers `showinfo`
/// with its info and a "1000 Success" line.
pub async fn showinfo(mgmt: &Path) -> std::io::Result<()> {
    let mut s = UnixStream::connect(mgmt).await?;
    s.write_all(b"showinfo\n").await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(12).any(|w| w == b"1000 Success") {
            return Ok(());
        }
    }
}
