//! Child processes owned by guards: each in its own process group, shut down gracefully on
//! request, and killed as a group and reaped when the guard is dropped, whatever happened.

use std::process::ExitStatus;
use std::time::Duration;
use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
#[error("cannot start {name} ({program}): {source}")]
pub struct SpawnError {
    pub name: String,
    pub program: String,
    pub source: std::io::Error,
}

pub struct ProcessGuard {
    name: String,
    child: Child,
    pid: i32,
    status: Option<ExitStatus>,
}

impl ProcessGuard {
    pub fn spawn(name: &str, mut cmd: Command) -> Result<ProcessGuard, SpawnError> {
        let program = format!("{:?}", cmd.as_std().get_program());
        // Own process group: one killpg reaches QEMU's helpers (e.g. a migration's gzip) too.
        cmd.process_group(0).kill_on_drop(true);
        // If the builder itself is SIGKILLed (Nix cancelling a build), the kernel ends the child.
        super::sys::os::die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|source| SpawnError { name: name.into(), program, source })?;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        Ok(ProcessGuard { name: name.into(), child, pid, status: None })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn take_stdin(&mut self) -> Option<tokio::process::ChildStdin> {
        self.child.stdin.take()
    }

    /// The exit status if the process has exited (reaping it), without waiting.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
            }
        }
        self.status
    }

    pub async fn wait(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        match self.child.wait().await {
            Ok(s) => {
                self.status = Some(s);
                s
            }
            Err(_) => {
                self.kill_group();
                std::os::unix::process::ExitStatusExt::from_raw(libc::SIGKILL)
            }
        }
    }

    /// SIGTERM to the group, then SIGKILL after `grace`. Always leaves the process reaped.
    pub async fn shutdown(&mut self, grace: Duration) -> ExitStatus {
        if self.try_exited().is_none() {
            self.signal_group(libc::SIGTERM);
            if tokio::time::timeout(grace, self.wait()).await.is_err() {
                self.kill_group();
            }
        }
        let status = self.wait().await;
        // The leader is gone; anything it left in its group goes too.
        self.kill_group();
        status
    }

    fn signal_group(&self, signal: i32) {
        if self.pid > 0 {
            // The group is the one this guard created; a stale one at worst yields ESRCH.
            super::sys::os::signal_group(self.pid, signal);
        }
    }

    pub fn kill_group(&self) {
        self.signal_group(libc::SIGKILL);
    }

    /// The processes of this guard's group still running (pid, name), read from /proc.
    pub fn survivors(&self) -> Vec<(i32, String)> {
        group_members(self.pid)
    }
}

/// Running processes of process group `pgid`. A zombie is not counted: it has ended, and only
/// waits for whoever inherited it to reap it.
pub fn group_members(pgid: i32) -> Vec<(i32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
            let (head, rest) = stat.rsplit_once(')')?;
            let comm = head.split_once('(')?.1.to_owned();
            let mut fields = rest.split_whitespace();
            let state = fields.next()?;
            let pgrp: i32 = fields.nth(1)?.parse().ok()?;
            (pgrp == pgid && state != "Z" && state != "X").then_some((pid, comm))
        })
        .collect()
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill_group();
        if self.status.is_none() && self.pid > 0 {
            super::sys::os::reap(self.pid);
        }
    }
}

/// Describes how a process ended, for error messages.
pub fn describe_status(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => "an unknown status".into(),
    }
}

/// A pipe, both ends close-on-exec: (read, write). A child gets its end through
/// `Stdio::from`, which dups it into place.
pub fn pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    super::sys::os::pipe()
}

/// Sends `bytes` on the unix socket `socket` with `fd` attached (SCM_RIGHTS), as QEMU's
/// `getfd` wants it; returns how many bytes went out. Never blocks: a full socket is
/// `WouldBlock`.
pub fn send_with_fd(
    socket: &impl std::os::fd::AsRawFd,
    bytes: &[u8],
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<usize> {
    super::sys::os::send_with_fd(socket, bytes, fd)
}

/// How often [`log_reader_gone`] looks.
pub const LOG_READER_POLL: Duration = Duration::from_millis(500);

/// Resolves when nobody reads this process's stderr any more: the pipe's reader closed
/// (POLLERR) or the terminal hung up (POLLHUP). Nix reads a builder's log from that pipe, so this
/// is how a builder learns that Nix is gone (killed with SIGKILL, as the OOM killer does), which
/// no signal tells it. Pending for ever while the log is read, or when stderr is a file.
pub async fn log_reader_gone() {
    loop {
        if stderr_reader_gone() {
            return;
        }
        tokio::time::sleep(LOG_READER_POLL).await;
    }
}

fn stderr_reader_gone() -> bool {
    super::sys::os::stderr_hung_up()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Running, as opposed to gone or a zombie waiting for whoever inherited it to reap it.
    fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) != Some("Z"),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn survivors_are_the_groups_running_processes() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & sleep 30 & wait"]);
        let mut guard = ProcessGuard::spawn("sleepers", cmd).unwrap();
        let mut names = vec![];
        for _ in 0..100 {
            names = guard.survivors().into_iter().map(|(_, n)| n).collect::<Vec<_>>();
            if names.iter().filter(|n| *n == "sleep").count() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        names.sort();
        assert_eq!(names, ["sh", "sleep", "sleep"]);
        guard.shutdown(Duration::from_secs(2)).await;
        for _ in 0..100 {
            if guard.survivors().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(guard.survivors(), vec![]);
    }

    #[tokio::test]
    async fn drop_kills_the_whole_group() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & echo $! ; wait"]).stdout(std::process::Stdio::piped());
        let mut guard = ProcessGuard::spawn("sleeper", cmd).unwrap();
        let mut out = guard.child.stdout.take().unwrap();
        let mut buf = [0u8; 32];
        let n = tokio::io::AsyncReadExt::read(&mut out, &mut buf).await.unwrap();
        let grandchild: i32 = std::str::from_utf8(&buf[..n]).unwrap().trim().parse().unwrap();
        let leader = guard.pid();
        assert!(alive(grandchild));
        drop(guard);
        // The grandchild is not ours to reap; give init a moment to do it.
        for _ in 0..50 {
            if !alive(grandchild) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(grandchild), "grandchild {grandchild} survived");
        assert!(!alive(leader), "leader {leader} not reaped");
    }

    #[tokio::test]
    async fn shutdown_escalates_to_sigkill() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; sleep 30"]);
        let mut guard = ProcessGuard::spawn("stubborn", cmd).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let start = std::time::Instant::now();
        let status = guard.shutdown(Duration::from_millis(300)).await;
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(describe_status(status), "signal 9");
    }
}
