//! The standin guest: Debian's kernel, busybox and dropbear in an initramfs built by our own
//! code. It honours the Cygwin guest's contract, so every stage is tested for real without
//! Windows media.

use crate::initramfs::{module_closure, Initramfs};
use std::path::Path;

/// Network, SMB client, entropy.
pub const MODULES: &[&str] = &[
    "virtio_pci", "virtio_net", "virtio_rng", "cifs", "ctr", "gcm", "ghash_generic", "ccm", "cmac", "sha512_generic",
];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /run /tmp/xchg /nix/store /etc/dropbear
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m" || echo "winvm-standin: loading $m failed"
done
ip link set lo up
ip addr add 192.168.0.1/24 dev eth0
ip link set eth0 up
echo "winvm-standin: network up"
# Host keys are made at first connection (-R); only public-key logins (-s).
/usr/sbin/dropbear -R -F -E -s -p 22 &
echo "winvm-standin: sshd started"
while :; do wait; sleep 1; done
"#;

/// Runs at every SSH login, as Cygwin rebuilds its mounts from /etc/fstab at every login.
const LOGIN_SHELL: &str = r#"#!/bin/sh
mount_share() {
    grep -q " $2 cifs " /proc/mounts && return 0
    mkdir -p "$2"
    mount -t cifs "//192.168.0.2/$1" "$2" -o username=guest,password=,vers=3.0,uid=0,gid=0,noperm \
        || { echo "winvm-standin: cannot mount the controller's share '$1' at $2" >&2; return 1; }
}
mount_share nixstore /nix/store || exit 255
mount_share xchg /tmp/xchg || exit 255
if [ -f /tmp/xchg/shares ]; then
    while read -r name dir; do mount_share "$name" "$dir" || exit 255; done < /tmp/xchg/shares
fi
exec /bin/sh "$@"
"#;

#[derive(Debug)]
pub struct StandinError(pub String);

impl std::fmt::Display for StandinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "building the standin guest's initramfs: {}", self.0)
    }
}

impl std::error::Error for StandinError {}

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> StandinError + '_ {
    move |e| StandinError(format!("{what}: {e}"))
}

/// Adds busybox (static) with its applets installed at boot, and the modules in load order.
pub fn base(busybox: &Path, modules_dir: &Path, modules: &[&str]) -> Result<Initramfs, StandinError> {
    let mut img = Initramfs::new();
    img.host_file("/bin/busybox", busybox, Some(0o755)).map_err(err("busybox"))?;
    let order = module_closure(modules_dir, modules).map_err(err("kernel modules"))?;
    let mut names = String::new();
    for m in &order {
        let name = m.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        img.host_file(&format!("/lib/modules/{name}"), m, Some(0o644)).map_err(err("kernel module"))?;
        names.push_str(&name);
        names.push('\n');
    }
    img.file("/lib/modules/load-order", 0o644, names.into_bytes()).map_err(err("load order"))?;
    Ok(img)
}

pub fn initramfs(busybox: &Path, dropbear: &Path, modules_dir: &Path, authorized_key: &str) -> Result<Initramfs, StandinError> {
    let mut img = base(busybox, modules_dir, MODULES)?;
    img.elf_with_libs("/usr/sbin/dropbear", dropbear).map_err(err("dropbear"))?;
    let e = err::<crate::initramfs::InitramfsError>;
    img.file("/init", 0o755, INIT.as_bytes().to_vec()).map_err(e("init"))?;
    img.file("/bin/winvm-login", 0o755, LOGIN_SHELL.as_bytes().to_vec()).map_err(e("login shell"))?;
    img.file(
        "/etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nAdministrator:x:0:0:Administrator:/home/Administrator:/bin/winvm-login\n".to_vec(),
    )
    .map_err(e("passwd"))?;
    img.file("/etc/group", 0o644, b"root:x:0:\n".to_vec()).map_err(e("group"))?;
    img.file("/etc/shells", 0o644, b"/bin/sh\n/bin/winvm-login\n".to_vec()).map_err(e("shells"))?;
    img.dir("/home/Administrator/.ssh", 0o700).map_err(e("ssh dir"))?;
    img.file("/home/Administrator/.ssh/authorized_keys", 0o600, format!("{}\n", authorized_key.trim()).into_bytes())
        .map_err(e("authorized_keys"))?;
    Ok(img)
}

pub fn login_shell() -> &'static str {
    LOGIN_SHELL
}

pub fn init_script() -> &'static str {
    INIT
}
