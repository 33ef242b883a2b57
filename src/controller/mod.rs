//! The controller VM: a small Linux that mounts the builder's view of the file system over 9p,
//! chroots into it and runs the agent (this same binary, `nix-winvm-builder agent`), which
//! serves the store and the exchange directory over Samba and hands the command to the guest
//! over SSH.

pub mod agent;
pub mod samba;

use crate::guest::standin;
use crate::initramfs::Initramfs;
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
}

/// A 9p mount the controller's init makes under /fs before the chroot.
#[derive(Debug, Clone)]
pub struct Mount {
    pub tag: String,
    pub at: PathBuf,
}

/// The controller's /init: mounts, chroot, agent, exit code, power off. The paths are fixed
/// per build, so they are written into the script rather than parsed from the command line.
pub fn init_script(mounts: &[Mount], tmpfs: &[PathBuf], agent: &Path, xchg: &Path) -> String {
    let q = |p: &Path| shell_quote(&p.display().to_string());
    let mut s = String::from(
        "mkdir -p /fs\n\
         ip link set lo up\nip addr add 192.168.0.2/24 dev eth0\nip link set eth0 up\n\
         fail() { echo \"winvm-controller: $*\"; poweroff -f; }\n\
         mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro root /fs || fail 'cannot mount the root export'\n",
    );
    for m in mounts {
        s.push_str(&format!(
            "mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 {} /fs{} || fail 'cannot mount export {}'\n",
            m.tag,
            q(&m.at),
            m.tag
        ));
    }
    for t in tmpfs {
        s.push_str(&format!("mount -t tmpfs tmpfs /fs{} || fail 'cannot mount a tmpfs at {}'\n", q(t), t.display()));
    }
    s.push_str("mount -t proc proc /fs/proc 2>/dev/null\nmount -t devtmpfs dev /fs/dev 2>/dev/null\n");
    s.push_str(&format!(
        "echo 'winvm-controller: starting the agent'\nchroot /fs {} agent --config {}\ncode=$?\n\
         echo \"$code\" > /fs{}/agent-exit\necho \"winvm-controller: agent exited $code\"\nsync\npoweroff -f\n",
        q(agent),
        q(&xchg.join(AGENT_CONFIG)),
        q(xchg)
    ));
    s
}

pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b)) {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

pub fn initramfs(busybox: &Path, modules_dir: &Path, init: &str) -> Result<Initramfs, standin::StandinError> {
    let mut img = standin::base(busybox, modules_dir, MODULES)?;
    img.file("/init", 0o755, standin::init(init))
        .map_err(|e| standin::StandinError(format!("controller init: {e}")))?;
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/build/xchg"), "/build/xchg");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn init_mounts_before_chroot_and_always_powers_off() {
        let s = init_script(
            &[Mount { tag: "xchg".into(), at: "/w/xchg".into() }],
            &["/w/run".into()],
            Path::new("/bin/agent"),
            Path::new("/w/xchg"),
        );
        let mount = s.find("xchg /fs/w/xchg").unwrap();
        let chroot = s.find("chroot /fs /bin/agent agent --config /w/xchg/agent.json").unwrap();
        assert!(mount < chroot);
        assert!(s.trim_end().ends_with("poweroff -f"));
    }
}
