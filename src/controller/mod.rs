//! The controller VM: a small Linux that mounts the builder's view of the file system over 9p,
//! chroots into it and runs the agent (this same binary, `nix-winvm-builder agent`), which
//! serves the store and the exchange directory over Samba and hands the command to the guest
//! over SSH.

pub mod system;

use crate::initramfs::linux::{self, LinuxInitError};
use crate::initramfs::Initramfs;
use crate::protocol::{Subcommand, AGENT_CONFIG, NINEP_OPTIONS, READY_AGENT, READY_CONFIG, READY_XCHG, SESSION_PORT};
use crate::shell;
use std::path::{Path, PathBuf};

pub const MODULES: &[&str] = &["virtio_pci", "virtio_net", "virtio_rng", "9p", "9pnet_virtio"];
/// The system disk of a controller saved ready to serve: virtio-blk, ext2 (through ext4).
pub const SYSTEM_DISK_MODULES: &[&str] = &["virtio_blk", "crc32c_generic", "ext4"];

/// A 9p mount the controller's init makes under /fs before the chroot.
#[derive(Debug, Clone)]
pub struct Mount {
    pub tag: String,
    pub at: PathBuf,
}

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
    chroot /fs @READY_AGENT@ @AGENT_READY_ARGS@
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
        .replace("@AGENT_READY_ARGS@", &agent_ready_args())
        .replace("@READY_CONFIG@", READY_CONFIG)
        .replace("@READY_XCHG@", READY_XCHG)
        .replace("@NINEP_OPTIONS@", NINEP_OPTIONS)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the path {} has white space or '=' in it, which the controller's init cannot take: move it to a plain path (the work folder: TMPDIR, in a build Nix's build-dir)",
    .0.display()
)]
pub struct BadPath(pub PathBuf);

/// How the init starts the agent of a controller with a system disk.
fn agent_ready_args() -> String {
    let sub = Subcommand::AgentReady { config: READY_CONFIG.into(), session: SESSION_PORT.into() };
    sub.args().iter().map(|a| shell::quote(&a.to_string_lossy())).collect::<Vec<_>>().join(" ")
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
    use crate::protocol::{parse_ready_session_line, ready_session_line, WAITING_MARKER};

    /// Both of the init's agent lines are command lines `protocol::Subcommand` parses.
    #[test]
    fn the_init_starts_the_agent_as_the_builder_parses_it() {
        let init = init_script();
        let line = |start: &str| {
            let l = init.lines().map(str::trim).find(|l| l.starts_with(start)).unwrap();
            l.split_whitespace().skip(3).map(|w| w.trim_matches('"').to_owned()).collect::<Vec<String>>()
        };
        let direct = line("chroot /fs \"$AGENT\" agent ");
        let direct: Vec<String> =
            direct.into_iter().map(|w| w.replace("$CONFIG", "/x/agent.json").replace("$NOW", "1796000000")).collect();
        assert_eq!(
            Subcommand::parse(&direct),
            Ok(Subcommand::Agent { config: "/x/agent.json".into(), now: Some(1_796_000_000) })
        );
        let ready = line("chroot /fs /etc/winvm/agent agent-ready ");
        assert_eq!(
            Subcommand::parse(&ready),
            Ok(Subcommand::AgentReady { config: READY_CONFIG.into(), session: SESSION_PORT.into() })
        );
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
        assert!(parse_ready_session_line("NOW=x MOUNTS=''")
            .unwrap_err()
            .to_string()
            .starts_with("garbled session line"));
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
