//! The controller VM: a small Linux that mounts the builder's view of the file system over 9p,
//! chroots into it and runs the agent (this same binary, `nix-winvm-builder agent`), which
//! serves the store and the exchange directory over Samba and hands the command to the guest
//! over SSH.

pub mod agent;
pub mod samba;
pub mod system;

use crate::initramfs::linux::{self, LinuxInitError};
use crate::initramfs::Initramfs;
use crate::shell;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MODULES: &[&str] = &["virtio_pci", "virtio_net", "virtio_rng", "9p", "9pnet_virtio"];
/// The system disk of a controller saved ready to serve: virtio-blk, ext2 (through ext4).
pub const SYSTEM_DISK_MODULES: &[&str] = &["virtio_blk", "crc32c_generic", "ext4"];

/// Files in the exchange directory, the one place both sides see.
pub const WAITING_DONE: &str = "waiting_done";
pub const EXIT_FILE: &str = "in-vm-exit";
pub const AGENT_CONFIG: &str = "agent.json";
pub const OUTPUT_LOG: &str = "output.log";
/// A command whose streams stay apart ([`JobConfig::split_streams`]): its stdout, its stderr.
pub const COMMAND_STDOUT: &str = "command.stdout";
pub const COMMAND_STDERR: &str = "command.stderr";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Share {
    pub name: String,
    pub path: PathBuf,
}

/// What the agent serves and how it reaches the guest: the same for every session of an
/// image, so a controller saved ready to serve has done all of it before the save.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServeConfig {
    pub shares: Vec<Share>,
    /// A tmpfs for Samba's state.
    pub run_dir: PathBuf,
    pub smbd: PathBuf,
    /// Where smbd's log goes.
    pub smbd_log: PathBuf,
    pub guest_addr: String,
    pub user: String,
    pub key_file: PathBuf,
    /// How long the guest may take to answer SSH: the image's (or the build's) time-out.
    pub ssh_timeout_secs: u64,
}

/// One session's command, in the controller's own paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
/// Read by the agent of the image's own controller: the one the image was saved with, which a
/// pinned image keeps across nix-winvm releases. So the agent ignores fields it does not know
/// (a newer builder's), and the builder writes optional fields only when they are set.
#[serde(rename_all = "camelCase")]
pub struct JobConfig {
    pub xchg: PathBuf,
    pub command: String,
    /// Set the guest's clock from the controller's (fresh from the host) before the command.
    pub set_clock: bool,
    /// Tests only (`NIX_WINVM_TEST_FAULT=kill-smbd-after=SECS`): the agent kills its own smbd
    /// that long after the command started, to prove that the loss is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_smbd_after_secs: Option<u64>,
    /// An interactive login (`run-vm`, `shell`): the command runs on a pty in the guest, its
    /// bytes relayed through the session port ([`SESSION_PORT`]) to the host's terminal
    /// instead of into the output log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<TerminalRequest>,
    /// A layer's session: after a command that succeeded, the agent makes itself ready to
    /// serve again (a new waiting login, the exports unmounted, [`READY_MARKER`]) so that the
    /// pair can be saved as a new image.
    #[serde(default, skip_serializing_if = "is_false")]
    pub ready_again: bool,
    /// The command's stdout and stderr each into a file of its own ([`COMMAND_STDOUT`],
    /// [`COMMAND_STDERR`]) instead of merged, in order, into the output log: for
    /// `run-vm -- COMMAND`, whose stdout is the host's. The agent's own lines stay in the log.
    #[serde(default, skip_serializing_if = "is_false")]
    pub split_streams: bool,
}

fn is_false(b: &bool) -> bool {
    !b
}

/// A controller booted for one session (direct runs): everything arrives with the session,
/// written by the host into the exchange directory ([`AGENT_CONFIG`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentConfig {
    pub serve: ServeConfig,
    pub job: JobConfig,
}

/// A controller saved ready to serve (images): read from its system disk ([`READY_CONFIG`])
/// at the suspend stage, where the agent starts smbd, logs on to the guest and runs `prepare`
/// there (which leaves an SMB session open) before the pair is saved. Each build then only
/// sends its [`JobConfig`] ([`AGENT_CONFIG`] in the exchange directory, mounted at
/// [`READY_XCHG`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReadyConfig {
    pub serve: ServeConfig,
    pub prepare: String,
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

/// How the controller mounts the host's exports (its init, and a ready agent after a revive).
pub const NINEP_OPTIONS: &str = "trans=virtio,version=9p2000.L,msize=262144";

/// What the controller's init prints before it waits for its session on ttyS1.
pub const WAITING_MARKER: &str = "winvm-controller: waiting for the session";

/// What the agent of a controller with a system disk prints once smbd runs, the guest's SSH
/// logon is made and the guest's `prepare` succeeded: the pair can be saved.
pub const READY_MARKER: &str = "winvm-controller: ready to serve";

/// The system disk's layout (an ext2 file system, read-only; see [`system`]).
pub const READY_CONFIG: &str = "/etc/winvm/ready.json";
/// A link to this program, in the store path it has in the builds.
pub const READY_AGENT: &str = "/etc/winvm/agent";
pub const READY_KEY: &str = "/etc/winvm/key";
/// Where a ready controller mounts the build's store and exchange directory: two folders of
/// [`READY_SHARE_DIR`], the folder of the share the guest keeps mounted across the save.
pub const READY_SHARE_DIR: &str = "/srv";
pub const READY_STORE: &str = "/srv/store";
pub const READY_XCHG: &str = "/srv/xchg";
/// The share of [`READY_SHARE_DIR`] (see `spec::SESSION_SHARE`).
pub use crate::spec::SESSION_SHARE;
/// Samba's state, in the ready controller's tmpfs.
pub const READY_SAMBA_DIR: &str = "/run/samba";

/// The controller's /init. It is the same for every session, so the controller can be saved
/// while it waits and revived later: the session's paths arrive afterwards, as one line of
/// shell assignments on the second serial port (see `session_line`).
///
/// With a system disk (/dev/vda, images), the agent starts before the session from that disk:
/// smbd, the guest's SSH logon and its `prepare` are done when the pair is saved, and a
/// revived build only mounts its two exports and tells the agent to go. Without one (direct
/// runs), the session line names the agent in the host's file system, seen over 9p.
pub const INIT: &str = r#"mkdir -p /fs
ip link set lo up
ip addr add @CONTROLLER_IP@/24 dev eth0
ip link set eth0 up
# Both sides' addresses are fixed: no ARP exchange after a revive.
arp -s @GUEST_IP@ @GUEST_MAC@ 2>/dev/null
fail() { echo "winvm-controller: $*"; poweroff -f; }
# Held open from here on: bytes that reach a closed serial port are lost.
exec 3</dev/ttyS1 || fail "no ttyS1"
stty -F /dev/ttyS1 -echo 2>/dev/null
mount9p() { mount -t 9p -o @NINEP_OPTIONS@ "$1" "$2" || fail "cannot mount export $1 at $2"; }
if [ -b /dev/vda ]; then
    mount -t ext2 -o ro /dev/vda /fs || fail "cannot mount the system disk /dev/vda"
    for t in /run /tmp; do mount -t tmpfs tmpfs "/fs$t" || fail "cannot mount a tmpfs at $t"; done
    mount -t proc proc /fs/proc
    mount -t devtmpfs dev /fs/dev
    echo 'winvm-controller: starting the agent from the system disk'
    # It reads the session line itself and mounts the build's exports: no process to start
    # after the revive.
    chroot /fs @READY_AGENT@ agent-ready --config @READY_CONFIG@ --session /dev/ttyS1
    code=$?
    echo "$code" > "/fs@READY_XCHG@/agent-exit"
else
    echo "winvm-controller: waiting for the session"
    read -r session <&3 || fail "no session on ttyS1"
    eval "$session"
    [ -n "$AGENT" ] && [ -n "$XCHG" ] || fail "garbled session line: $session"
    mount -t 9p -o @NINEP_OPTIONS@,cache=loose,ro root /fs || fail 'cannot mount the root export'
    for m in $MOUNTS; do mount9p "${m%%=*}" "/fs${m#*=}"; done
    for t in $TMPFS; do mount -t tmpfs tmpfs "/fs$t" || fail "cannot mount a tmpfs at $t"; done
    mount -t proc proc /fs/proc 2>/dev/null
    mount -t devtmpfs dev /fs/dev 2>/dev/null
    echo 'winvm-controller: starting the agent'
    chroot /fs "$AGENT" agent --config "$CONFIG" --now "$NOW"
    code=$?
    echo "$code" > "/fs$XCHG/agent-exit"
fi
echo "winvm-controller: agent exited $code"
sync
poweroff -f
"#;

fn init_script() -> String {
    crate::spec::with_addresses(INIT)
        .replace("@GUEST_MAC@", crate::vm::qemu::GUEST_MAC)
        .replace("@READY_AGENT@", READY_AGENT)
        .replace("@READY_CONFIG@", READY_CONFIG)
        .replace("@READY_XCHG@", READY_XCHG)
        .replace("@NINEP_OPTIONS@", NINEP_OPTIONS)
}

/// The line a ready controller's agent reads: the build's two exports, at fixed places (the
/// session adds the host's clock in front, `NOW=SECS `).
pub fn ready_session_line() -> String {
    format!("MOUNTS='store={READY_STORE} xchg={READY_XCHG}'\n")
}

/// The host's clock and the exports (tag, mount point) of a ready controller's session line.
pub fn parse_ready_session_line(line: &str) -> Result<(u64, Vec<(String, PathBuf)>), String> {
    let garbled = || format!("garbled session line: {line:?}");
    let now = line.trim().strip_prefix("NOW=").and_then(|rest| rest.split(' ').next()).ok_or_else(garbled)?;
    let now = now.parse().map_err(|_| garbled())?;
    let mounts = line.split_once("MOUNTS='").and_then(|(_, rest)| rest.split_once('\'')).ok_or_else(garbled)?.0;
    let mounts = mounts
        .split_whitespace()
        .map(|m| m.split_once('=').map(|(tag, at)| (tag.to_owned(), PathBuf::from(at))).ok_or_else(garbled))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((now, mounts))
}

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

/// The controller's initramfs; `system_disk`: with the drivers for a system disk (images).
pub fn initramfs(busybox: &Path, modules_dir: &Path, system_disk: bool) -> Result<Initramfs, LinuxInitError> {
    let modules: Vec<&str> = if system_disk { [MODULES, SYSTEM_DISK_MODULES].concat() } else { MODULES.to_vec() };
    let mut img = linux::base(busybox, modules_dir, &modules)?;
    img.file("/init", 0o755, linux::init(&init_script())).map_err(linux::err("controller init"))?;
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an image's agent reads from later builders: unknown fields are let be, and a
    /// plain job names only the fields every agent knows.
    #[test]
    fn a_job_file_stays_readable_across_releases() {
        let job = JobConfig {
            xchg: "/srv/xchg".into(),
            command: "true".into(),
            set_clock: true,
            kill_smbd_after_secs: None,
            terminal: None,
            ready_again: false,
            split_streams: false,
        };
        let json = serde_json::to_string(&job).unwrap();
        assert_eq!(json, r#"{"xchg":"/srv/xchg","command":"true","setClock":true}"#);
        let newer = r#"{"xchg":"/srv/xchg","command":"true","setClock":true,"somethingLater":[1]}"#;
        assert_eq!(serde_json::from_str::<JobConfig>(newer).unwrap(), job);
        let split = JobConfig { split_streams: true, ..job };
        assert!(serde_json::to_string(&split).unwrap().ends_with(r#""splitStreams":true}"#));
    }

    #[test]
    fn init_mounts_before_chroot_and_always_powers_off() {
        let init = init_script();
        let (ready, booted) = init.split_once("\nelse\n").unwrap();
        // Booted for one session: the session's mounts, then the agent.
        let mount = booted.find("for m in $MOUNTS").unwrap();
        let chroot = booted.find("chroot /fs").unwrap();
        assert!(booted.find(WAITING_MARKER).unwrap() < mount && mount < chroot);
        // Ready to serve: the agent first, from the system disk; the build's mounts after the
        // session line, and only then the go.
        let agent = ready
            .find("chroot /fs /etc/winvm/agent agent-ready --config /etc/winvm/ready.json --session /dev/ttyS1")
            .unwrap();
        assert!(ready.find("mount -t ext2 -o ro /dev/vda /fs").unwrap() < agent);
        assert!(ready.find("exec 3</dev/ttyS1").is_none() || init.find("exec 3</dev/ttyS1").unwrap() < agent);
        assert!(init.trim_end().ends_with("poweroff -f"));
        assert_eq!(ready_session_line(), "MOUNTS='store=/srv/store xchg=/srv/xchg'\n");
        let line = format!("NOW=1796000000 {}", ready_session_line());
        assert_eq!(
            parse_ready_session_line(&line).unwrap(),
            (1796000000, vec![("store".into(), "/srv/store".into()), ("xchg".into(), "/srv/xchg".into())])
        );
        assert!(parse_ready_session_line("NOW=x MOUNTS=''").unwrap_err().starts_with("garbled session line"));
        assert!(parse_ready_session_line("MOUNTS='a=/b'").is_err());
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
