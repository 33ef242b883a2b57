//! The controller VM: a small Linux that mounts the builder's view of the file system over 9p,
//! chroots into it and runs the agent (this same binary, `nix-winvm-builder agent`), which
//! serves the store and the exchange directory over Samba and hands the command to the guest
//! over SSH.

pub mod agent;
pub mod samba;
pub mod unpack;

use crate::initramfs::linux::{self, LinuxInitError};
use crate::initramfs::Initramfs;
use crate::shell;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MODULES: &[&str] = &["virtio_pci", "virtio_net", "virtio_rng", "9p", "9pnet_virtio"];

/// Files in the exchange directory, the one place both sides see.
pub const WAITING_DONE: &str = "waiting_done";
pub const EXIT_FILE: &str = "in-vm-exit";
pub const AGENT_CONFIG: &str = "agent.json";
pub const OUTPUT_LOG: &str = "output.log";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Share {
    pub name: String,
    pub path: PathBuf,
}

/// What the agent does, written by the host into the exchange directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentConfig {
    pub shares: Vec<Share>,
    pub xchg: PathBuf,
    /// A tmpfs for Samba's state.
    pub run_dir: PathBuf,
    pub smbd: PathBuf,
    pub guest_addr: String,
    pub user: String,
    pub key_file: PathBuf,
    pub command: String,
    /// Set the guest's clock from the controller's (fresh from the host) before the command.
    pub set_clock: bool,
    pub ssh_timeout_secs: u64,
    /// The build's output paths. After a command that succeeded, the guest's archive of them
    /// ([`unpack::ARCHIVE`] in the exchange folder) is unpacked into these and nowhere else.
    #[serde(default)]
    pub outputs: Vec<PathBuf>,
    /// Tests only (`NIX_WINVM_TEST_FAULT=kill-smbd-after=SECS`): the agent kills its own smbd
    /// that long after the command started, to prove that the loss is named.
    #[serde(default)]
    pub kill_smbd_after_secs: Option<u64>,
    /// An interactive login (`run-vm`, `shell`): the command runs on a pty in the guest, its
    /// bytes relayed through the session port ([`SESSION_PORT`]) to the host's terminal
    /// instead of into the output log.
    #[serde(default)]
    pub terminal: Option<TerminalRequest>,
}

/// The pty the guest gives an interactive login: the host terminal's type and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TerminalRequest {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
}

/// The controller's second serial port: it brings the session line, and stays open (the init
/// holds it) so that it can carry an interactive login's bytes afterwards. A revived
/// controller has exactly the devices it was saved with, so no new port can be added.
pub const SESSION_PORT: &str = "/dev/ttyS1";

/// A 9p mount the controller's init makes under /fs before the chroot.
#[derive(Debug, Clone)]
pub struct Mount {
    pub tag: String,
    pub at: PathBuf,
}

/// What the controller's init prints before it waits for its session on ttyS1.
pub const WAITING_MARKER: &str = "winvm-controller: waiting for the session";

/// The controller's /init. It is the same for every session, so the controller can be saved
/// while it waits and revived later: the session's paths arrive afterwards, as one line of
/// shell assignments on the second serial port (see `session_line`).
pub const INIT: &str = r#"mkdir -p /fs
ip link set lo up
ip addr add @CONTROLLER_IP@/24 dev eth0
ip link set eth0 up
fail() { echo "winvm-controller: $*"; poweroff -f; }
# Held open from here on: bytes that reach a closed serial port are lost.
exec 3</dev/ttyS1 || fail "no ttyS1"
stty -F /dev/ttyS1 -echo 2>/dev/null
echo "winvm-controller: waiting for the session"
read -r session <&3 || fail "no session on ttyS1"
eval "$session"
[ -n "$AGENT" ] && [ -n "$XCHG" ] || fail "garbled session line: $session"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro root /fs || fail 'cannot mount the root export'
for m in $MOUNTS; do
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 "${m%%=*}" "/fs${m#*=}" || fail "cannot mount export ${m%%=*}"
done
for t in $TMPFS; do mount -t tmpfs tmpfs "/fs$t" || fail "cannot mount a tmpfs at $t"; done
mount -t proc proc /fs/proc 2>/dev/null
mount -t devtmpfs dev /fs/dev 2>/dev/null
echo 'winvm-controller: starting the agent'
chroot /fs "$AGENT" agent --config "$CONFIG" --now "$NOW"
code=$?
echo "$code" > "/fs$XCHG/agent-exit"
echo "winvm-controller: agent exited $code"
sync
poweroff -f
"#;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPath(pub PathBuf);

impl std::fmt::Display for BadPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the path {} has white space or '=' in it, which the controller's init cannot take", self.0.display())
    }
}

/// The session as the controller's init reads it: shell assignments on one line.
pub fn session_line(mounts: &[Mount], tmpfs: &[PathBuf], agent: &Path, xchg: &Path) -> Result<String, BadPath> {
    let plain = |p: &Path| {
        let t = p.display().to_string();
        if t.chars().any(|c| c.is_whitespace() || c == '=') {
            Err(BadPath(p.to_path_buf()))
        } else {
            Ok(t)
        }
    };
    let mut list = Vec::new();
    for m in mounts {
        list.push(format!("{}={}", m.tag, plain(&m.at)?));
    }
    let tmpfs: Vec<String> = tmpfs.iter().map(|t| plain(t)).collect::<Result<_, _>>()?;
    Ok(format!(
        "AGENT={} CONFIG={} XCHG={} MOUNTS={} TMPFS={}\n",
        shell::quote(&plain(agent)?),
        shell::quote(&plain(&xchg.join(AGENT_CONFIG))?),
        shell::quote(&plain(xchg)?),
        shell::quote(&list.join(" ")),
        shell::quote(&tmpfs.join(" "))
    ))
}

pub fn initramfs(busybox: &Path, modules_dir: &Path) -> Result<Initramfs, LinuxInitError> {
    let mut img = linux::base(busybox, modules_dir, MODULES)?;
    img.file("/init", 0o755, linux::init(INIT)).map_err(linux::err("controller init"))?;
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_mounts_before_chroot_and_always_powers_off() {
        let mount = INIT.find("for m in $MOUNTS").unwrap();
        let chroot = INIT.find("chroot /fs").unwrap();
        assert!(INIT.find(WAITING_MARKER).unwrap() < mount && mount < chroot);
        assert!(INIT.trim_end().ends_with("poweroff -f"));
    }

    #[test]
    fn session_line_is_one_line_of_quoted_assignments() {
        let line = session_line(
            &[
                Mount { tag: "xchg".into(), at: "/w/xchg".into() },
                Mount { tag: "store".into(), at: "/nix/store".into() },
            ],
            &["/w/run".into()],
            Path::new("/bin/agent"),
            Path::new("/w/xchg"),
        )
        .unwrap();
        assert_eq!(
            line,
            "AGENT=/bin/agent CONFIG=/w/xchg/agent.json XCHG=/w/xchg MOUNTS='xchg=/w/xchg store=/nix/store' TMPFS=/w/run\n"
        );
        let bad = session_line(&[], &[], Path::new("/a b"), Path::new("/x")).unwrap_err();
        assert_eq!(bad, BadPath("/a b".into()));
    }
}
