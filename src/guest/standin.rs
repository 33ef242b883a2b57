//! The standin guest: Debian's kernel, busybox and dropbear in an initramfs built by our own
//! code. It honours the Cygwin guest's contract, so every stage is tested for real without
//! Windows media.

use crate::initramfs::linux::{add_busybox_and_modules, base, init, LinuxInitError};
use crate::initramfs::Initramfs;
use std::path::Path;

/// Network, SMB client, entropy.
pub const MODULES: &[&str] =
    &["virtio_pci", "virtio_net", "virtio_rng", "cifs", "ctr", "gcm", "ghash_generic", "ccm", "cmac", "sha512_generic"];

const INIT: &str = r#"mkdir -p /run /tmp/xchg /nix/store /etc/dropbear
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
ip link set lo up
ip addr add @GUEST_IP@/24 dev eth0
ip link set eth0 up
say "winvm-standin: network up"
# Host keys are made at first connection (-R); only public-key logins (-s). The tests' fault
# (winvm.fault=no-sshd on the kernel's command line) leaves it out: a guest that never answers.
if grep -qw winvm.fault=no-sshd /proc/cmdline; then
    say "winvm-standin: no sshd (test fault)"
else
    /usr/sbin/dropbear -R -F -E -s -p 22 &
    say "winvm-standin: sshd started"
fi
while :; do wait; sleep 1; done
"#;

/// The kernel argument of the tests' `no-sshd` fault (see `session::TestFault`).
pub const NO_SSHD_FAULT: &str = "winvm.fault=no-sshd";

/// Progress lines go to the serial log, which the stages read, and to the screen (the VGA
/// text console), which the screenshots show: the standin's screen tells what Windows' would.
const SAY: &str = "say() { echo \"$*\"; echo \"$*\" >/dev/tty0 2>/dev/null || :; }\n";

fn standin_init(body: &str) -> Vec<u8> {
    init(&format!("{SAY}{body}"))
}

/// Runs at every SSH login, as Cygwin rebuilds its mounts from /etc/fstab at every login.
const LOGIN_SHELL: &str = r#"#!/bin/sh
mount_share() {
    grep -q " $2 cifs " /proc/mounts && return 0
    mkdir -p "$2"
    # The account the Windows guest's logons carry: NTLMSSP, signed SMB3, as Windows does it.
    mount -t cifs "//@CONTROLLER_IP@/$1" "$2" \
        -o username=Administrator,password=@ADMIN_PASSWORD@,sec=ntlmssp,vers=3.0,uid=0,gid=0,noperm \
        || { echo "winvm-standin: cannot mount the controller's share '$1' at $2 as Administrator" >&2; return 1; }
}
mount_share nixstore /nix/store || exit 255
mount_share xchg /tmp/xchg || exit 255
if [ -f /tmp/xchg/shares ]; then
    while read -r name dir; do mount_share "$name" "$dir" || exit 255; done < /tmp/xchg/shares
fi
exec /bin/sh "$@"
"#;

/// Building the standin's initramfs failed, in the part it names.
#[derive(Debug)]
pub struct StandinError(pub LinuxInitError);

impl std::fmt::Display for StandinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "building the standin guest's initramfs: {}", self.0)
    }
}

impl std::error::Error for StandinError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl From<LinuxInitError> for StandinError {
    fn from(e: LinuxInitError) -> StandinError {
        StandinError(e)
    }
}

fn err<E: Into<Box<dyn std::error::Error + Send + Sync>>>(what: &'static str) -> impl FnOnce(E) -> StandinError {
    move |e| StandinError(crate::initramfs::linux::err(what)(e))
}

/// The standin system under `root` ("" for a cold-boot initramfs, "/system" inside the
/// installer, which copies it onto the disk).
pub fn add_system(
    img: &mut Initramfs,
    root: &str,
    busybox: &Path,
    dropbear: &Path,
    modules_dir: &Path,
    authorized_key: &str,
) -> Result<(), StandinError> {
    let at = |p: &str| format!("{root}{p}");
    let e = err::<crate::initramfs::InitramfsError>;
    add_busybox_and_modules(img, root, busybox, modules_dir, MODULES)?;
    let root_dir = if root.is_empty() { "/" } else { root };
    img.elf_with_libs_under(root_dir, at("/usr/sbin/dropbear"), dropbear).map_err(err("dropbear"))?;
    img.file(at("/init"), 0o755, standin_init(INIT)).map_err(e("init"))?;
    img.file(
        at("/bin/winvm-login"),
        0o755,
        crate::spec::with_addresses(LOGIN_SHELL)
            .replace("@ADMIN_PASSWORD@", crate::spec::WindowsOptions::ADMIN_PASSWORD)
            .into_bytes(),
    )
    .map_err(e("login shell"))?;
    img.file(
        at("/etc/passwd"),
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nAdministrator:x:0:0:Administrator:/home/Administrator:/bin/winvm-login\n"
            .to_vec(),
    )
    .map_err(e("passwd"))?;
    img.file(at("/etc/group"), 0o644, b"root:x:0:\n".to_vec()).map_err(e("group"))?;
    img.file(at("/etc/shells"), 0o644, b"/bin/sh\n/bin/winvm-login\n".to_vec()).map_err(e("shells"))?;
    img.dir(at("/home/Administrator/.ssh"), 0o700).map_err(e("ssh dir"))?;
    img.file(
        at("/home/Administrator/.ssh/authorized_keys"),
        0o600,
        format!("{}\n", authorized_key.trim()).into_bytes(),
    )
    .map_err(e("authorized_keys"))?;
    Ok(())
}

/// A cold-booting standin: the system itself is the initramfs.
pub fn initramfs(
    busybox: &Path,
    dropbear: &Path,
    modules_dir: &Path,
    authorized_key: &str,
) -> Result<Initramfs, StandinError> {
    let mut img = Initramfs::new();
    add_system(&mut img, "", busybox, dropbear, modules_dir, authorized_key)?;
    Ok(img)
}

/// Disk and file system drivers for booting from the installed disk.
pub const DISK_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];

const INSTALLER_INIT: &str = r#"mkdir -p /mnt
fail() { say "winvm-install: FAILED: $*"; poweroff -f; }
[ -b /dev/vda ] || fail "no disk /dev/vda"
say "winvm-install: formatting /dev/vda"
mke2fs -q -L winvm-standin /dev/vda || fail "mke2fs"
mount -t ext2 /dev/vda /mnt || fail "mounting the new file system"
say "winvm-install: copying the system"
cp -a /system/. /mnt/ || fail "copying the system"
sync
umount /mnt || fail "unmounting"
say "winvm-install: done"
poweroff -f
"#;

pub const INSTALL_DONE: &str = "winvm-install: done";

/// The installer: a system to copy, and an init that puts it on /dev/vda.
pub fn installer(
    busybox: &Path,
    dropbear: &Path,
    modules_dir: &Path,
    authorized_key: &str,
) -> Result<Initramfs, StandinError> {
    let mut img = base(busybox, modules_dir, DISK_MODULES)?;
    img.file("/init", 0o755, standin_init(INSTALLER_INIT)).map_err(err("installer init"))?;
    add_system(&mut img, "/system", busybox, dropbear, modules_dir, authorized_key)?;
    Ok(img)
}

const BOOT_INIT: &str = r#"mkdir -p /newroot
mount -t ext2 /dev/vda /newroot || { say "winvm-boot: cannot mount /dev/vda"; poweroff -f; }
umount /proc /sys /dev
exec switch_root /newroot /init
"#;

/// What a boot loader would do for a disk-installed system: load the disk drivers, mount the
/// root file system, hand over.
pub fn boot(busybox: &Path, modules_dir: &Path) -> Result<Initramfs, StandinError> {
    let mut img = base(busybox, modules_dir, DISK_MODULES)?;
    img.file("/init", 0o755, standin_init(BOOT_INIT)).map_err(err("boot init"))?;
    Ok(img)
}

/// Before a build: the store the login mounted moves aside, and `/nix/store` becomes a fresh
/// folder of the guest's own disk in which every store path of the share is bound again, the
/// outputs excepted (the system's own `/nix/store`, dropbear's libraries, stays hidden, as
/// under the share). So a build makes its outputs (a file, a folder or a link, as it likes) on a Linux
/// file system, and one it does not make stays absent. Linux has no prefix mounts like
/// Cygwin's and this kernel has no overlayfs module: a bind mount needs its mount point to
/// exist with the right type, which an output's cannot before the build. One bind per store
/// path suits the sandbox's store, which holds the build's inputs alone. Reads
/// `$winvm_outputs` (store names).
pub const REDIRECT_OUTPUTS: &str = r#"winvm_redirect() {
    winvm_share=/var/winvm/store-share winvm_local=/var/winvm/store
    rm -rf "$winvm_local" && mkdir -p "$winvm_share" "$winvm_local" || return 1
    mount -o move /nix/store "$winvm_share" && mount -o bind "$winvm_local" /nix/store || return 1
    for winvm_p in "$winvm_share"/*; do
        winvm_n=${winvm_p##*/}
        case " $winvm_outputs " in *" $winvm_n "*) continue ;; esac
        winvm_at=/nix/store/$winvm_n
        if [ -L "$winvm_p" ]; then
            ln -s "$(readlink "$winvm_p")" "$winvm_at" || return 1
        elif [ -d "$winvm_p" ]; then
            mkdir "$winvm_at" && mount -o bind "$winvm_p" "$winvm_at" || return 1
        elif [ -e "$winvm_p" ]; then
            : >"$winvm_at" && mount -o bind "$winvm_p" "$winvm_at" || return 1
        fi
    done
}
"#;

/// Busybox tar: ustar, with GNU long names beyond 100 bytes; links stay links.
pub const PACK_OUTPUTS: &str = "tar -c -f";
