//! Child processes owned by guards: each in its own process group, shut down gracefully on
//! request, and killed as a group and reaped when the guard is dropped, whatever happened.

use std::fmt;
use std::process::ExitStatus;
use std::time::Duration;
use tokio::process::{Child, Command};

#[derive(Debug)]
pub struct SpawnError {
    pub name: String,
    pub program: String,
    pub source: std::io::Error,
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot start {} ({}): {}", self.name, self.program, self.source)
    }
}

impl std::error::Error for SpawnError {}

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
        // SAFETY: the closure runs between fork and exec and only calls prctl, which is
        // async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
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
            // SAFETY: killpg only sends a signal; the group is the one this guard created, and
            // a stale group id at worst yields ESRCH.
            unsafe {
                libc::killpg(self.pid, signal);
            }
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
            let mut status = 0;
            // SAFETY: waits for our own child, which SIGKILL has just ended; blocking is brief.
            unsafe {
                libc::waitpid(self.pid, &mut status, 0);
            }
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
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own; on success each is open and
    // ours alone, so OwnedFd may take it.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])))
    }
}

/// Sends `bytes` on the unix socket `socket` with `fd` attached (SCM_RIGHTS), as QEMU's
/// `getfd` wants it; returns how many bytes went out. Never blocks: a full socket is
/// `WouldBlock`.
pub fn send_with_fd(
    socket: &impl std::os::fd::AsRawFd,
    bytes: &[u8],
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    // SAFETY: every pointer handed to sendmsg points into locals that outlive the call: the
    // iovec into `bytes`, the control buffer sized by CMSG_SPACE for one descriptor, which
    // CMSG_FIRSTHDR/CMSG_DATA address inside that buffer. The kernel only reads them.
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) as usize;
        let mut control = vec![0u8; space];
        let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
        std::ptr::copy_nonoverlapping(
            &raw as *const i32 as *const u8,
            libc::CMSG_DATA(cmsg),
            std::mem::size_of::<i32>(),
        );
        let n = libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT);
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
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
    let mut fd = libc::pollfd { fd: libc::STDERR_FILENO, events: 0, revents: 0 };
    // SAFETY: one pollfd that lives through the call; a zero time-out never blocks.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n == 1 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
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
