//! The standin guest: Debian's kernel, busybox and dropbear in an initramfs built by our own
//! code. It honours the Cygwin guest's contract, so every stage is tested for real without
//! Windows media.

use crate::initramfs::linux::{add_busybox_and_modules, base, init, LinuxInitError};
use crate::initramfs::Initramfs;
use std::path::Path;

/// Network, SMB client, entropy, and overlayfs (a build's outputs on the guest's disk).
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_rng",
    "cifs",
    "ctr",
    "gcm",
    "ghash_generic",
    "ccm",
    "cmac",
    "sha512_generic",
    "overlay",
];

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

/// Runs at every SSH login, as Cygwin rebuilds its mounts from /etc/fstab at every login. In a
/// ready pair the controller's session share is mounted already (see [`prepare_command`]): the
/// store and the exchange folder are its folders, mounted by the login the controller keeps
/// waiting across the save, so a build finds them in place; the store as an overlay, the
/// share's folder below, a folder of the guest's disk above, where the build's outputs land
/// (see [`REDIRECT_OUTPUTS`]). Otherwise (a direct run) each is a share of its own.
const LOGIN_SHELL: &str = r#"#!/bin/sh
# Whether something is mounted at $1: the shell's own read and test, no process started (each
# one costs milliseconds under TCG, and this runs before every build).
mounted() {
    while read -r _ winvm_at _; do [ "$winvm_at" = "$1" ] && return 0; done </proc/mounts
    return 1
}
bind_folder() {
    mounted "$2" && return 0
    [ -d "$2" ] || mkdir -p "$2"
    mount -o bind "@SESSION_MOUNT@/$1" "$2" \
        || { echo "winvm-standin: cannot bind the session share's folder $1 at $2" >&2; return 1; }
}
if mounted @SESSION_MOUNT@; then
    if ! mounted /nix/store; then
        bind_folder @SESSION_STORE@ @STORE_SHARE@ || exit 255
        [ -d @STORE_LOCAL@ ] || mkdir -p @STORE_LOCAL@ @STORE_WORK@
        mount -t overlay overlay -o lowerdir=@STORE_SHARE@,upperdir=@STORE_LOCAL@,workdir=@STORE_WORK@ /nix/store \
            || { echo "winvm-standin: cannot mount the store's overlay at /nix/store" >&2; exit 255; }
    fi
    bind_folder @SESSION_XCHG@ /tmp/xchg || exit 255
    exec /bin/sh "$@"
fi
mount_share() {
    mounted "$2" && return 0
    mkdir -p "$2"
    # The account the Windows guest's logons carry: NTLMSSP, signed SMB3, as Windows does it.
    mount -t cifs "//@CONTROLLER_IP@/$1" "$2" -o @CIFS_OPTIONS@ \
        || { echo "winvm-standin: cannot mount the controller's share '$1' at $2 as Administrator" >&2; return 1; }
}
mount_share nixstore /nix/store || exit 255
mount_share xchg /tmp/xchg || exit 255
if [ -f /tmp/xchg/shares ]; then
    while read -r name dir; do mount_share "$name" "$dir" || exit 255; done < /tmp/xchg/shares
fi
exec /bin/sh "$@"
"#;

/// The mount options of every share: one SMB session serves them all (same server, same
/// account, same options), so a mount after the first is a tree connect alone.
///
/// `cache=loose`: reads go through the guest's page cache. The client of the standin's kernel
/// (Debian's 6.1) gets a splice wrong when it reads uncached, as it does with `cache=strict`
/// (the default) on a file it holds no read lease on, which is every file but the `nixstore`
/// share's (the others are served without oplocks, see `agent::samba`), and with
/// `cache=none`: the pipe is filled for the whole length asked and not trimmed to what the
/// server sent, so `cat FILE | wc -c` (busybox cat sends the file with sendfile) counted 69632
/// to 131072 bytes for a 296-byte file, zeros past its end. Only the page cache's path is right.
///
/// Coherence: with no write lease (none is granted but on `nixstore`) the client sends each
/// write() to the server at once (one SMB write per write(), as many as `cache=strict` sends)
/// and close() and fsync() wait for the server's answers, so a file the guest has written and
/// closed (a verdict: `echo ... >/tmp/xchg/layer-failed`) is on the controller's disk when its
/// close returns. (`sync`, which would make write() itself wait, is ignored by this client.) The
/// page cache is checked against the server's size and time when a file's attributes are
/// refreshed (at most a second old, `actimeo`, as `cache=strict` keeps them for lookups too):
/// the files the guest reads from the exchange folder are written before it is revived, and
/// the store's files never change.
fn cifs_options() -> String {
    format!(
        "username=Administrator,password={},sec=ntlmssp,vers=3.0,uid=0,gid=0,noperm,cache=loose",
        crate::spec::WindowsOptions::ADMIN_PASSWORD
    )
}

/// Run before the pair is saved, in the login the controller keeps: the login shell has just
/// mounted the store and the exchange shares (proving that they work); the controller's
/// session share is mounted and the other two unmounted, so that the saved pair holds one SMB
/// session with one tree, the session share's, and no tree of the shares whose folders each
/// build's controller mounts anew. A build's login binds the session share's folders.
pub fn prepare_command() -> String {
    crate::spec::with_addresses(&format!(
        "mkdir -p {dir} && mount -t cifs //@CONTROLLER_IP@/{share} {dir} -o {opts} && umount /nix/store /tmp/xchg",
        dir = SESSION_MOUNT,
        share = crate::spec::SESSION_SHARE,
        opts = cifs_options(),
    ))
}

/// Where the standin keeps the controller's session share mounted.
pub const SESSION_MOUNT: &str = "/var/winvm/srv";

/// Building the standin's initramfs failed, in the part it names.
#[derive(Debug, thiserror::Error)]
#[error("building the standin guest's initramfs: {0}")]
pub struct StandinError(#[from] pub LinuxInitError);

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
            .replace("@CIFS_OPTIONS@", &cifs_options())
            .replace("@SESSION_MOUNT@", SESSION_MOUNT)
            .replace("@SESSION_STORE@", crate::spec::SESSION_STORE)
            .replace("@SESSION_XCHG@", crate::spec::SESSION_XCHG)
            .replace("@STORE_SHARE@", STORE_SHARE)
            .replace("@STORE_LOCAL@", STORE_LOCAL)
            .replace("@STORE_WORK@", STORE_WORK)
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
/// What starts each of the installer's steps on its console.
pub const INSTALL_STEP: &str = "winvm-install:";

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

/// Where the store's overlay keeps its parts: the share's store below, a folder of the guest's
/// disk above (empty in a saved image, so empty in each build), overlayfs' work folder.
pub const STORE_SHARE: &str = "/var/winvm/store-share";
pub const STORE_LOCAL: &str = "/var/winvm/store";
pub const STORE_WORK: &str = "/var/winvm/store-work";

/// Before a build: `/nix/store` must be an overlay of the share's store (read-only below) and
/// a fresh folder of the guest's own disk (above), where whatever the build writes into the
/// store lands. So a build makes its outputs (a file, a folder or a link, as it likes) on a
/// Linux file system, one it does not make stays absent, and the system's own `/nix/store`
/// (dropbear's libraries) stays hidden, as under the share. Builds revive a ready pair, whose
/// waiting login made that overlay before the save (see [`LOGIN_SHELL`]): this only checks
/// that it is there.
pub const REDIRECT_OUTPUTS: &str = r#"winvm_redirect() {
    while read -r _ winvm_at winvm_type _; do
        [ "$winvm_at" = /nix/store ] && [ "$winvm_type" = overlay ] && return 0
    done </proc/mounts
    echo "nix-winvm: /nix/store is not the overlay the waiting login makes" >&2
    return 1
}
"#;

/// The same for a run outside the sandbox (`run-vm` of a kept build), where the share is the
/// host's whole store: `/nix/store` becomes a fresh folder of the guest's disk in which only the
/// store paths named in `$winvm_inputs` (what the build's sandbox held) are bound again, so the
/// guest sees what the build saw. Reads `$winvm_outputs` and `$winvm_inputs` (store names).
pub const REDIRECT_OUTPUTS_LISTED: &str = r#"winvm_redirect() {
    # Folders of their own: the store seen so far (the share, or the overlay a ready pair's
    # login made) moves under the first, the second becomes /nix/store.
    winvm_share=/var/winvm/rerun-seen winvm_local=/var/winvm/rerun-store
    rm -rf "$winvm_local" && mkdir -p "$winvm_share" "$winvm_local" || return 1
    mount -o move /nix/store "$winvm_share" && mount -o bind "$winvm_local" /nix/store || return 1
    for winvm_i in $winvm_inputs; do
        winvm_p=$winvm_share/$winvm_i winvm_n=$winvm_i
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

/// Packs the outputs named in "$@" onto the outputs disk, /dev/vdb. Busybox tar: ustar, with
/// GNU long names beyond 100 bytes; links stay links. Through dd in whole 4 MiB blocks with
/// O_DIRECT: the guest's page cache is skipped, which under TCG is most of the cost (in one
/// run here, 100 MB took 1.2 s written by tar to the device, 0.47 s through this dd). An
/// archive is a whole number of 512-byte blocks, so the last, short block is one O_DIRECT
/// takes.
pub const PACK_OUTPUTS: &str = r#"winvm_pack() {
    (set -o pipefail; tar -c -f - -C /nix/store "$@" | dd of=/dev/vdb bs=4M iflag=fullblock oflag=direct 2>/dev/null)
}
"#;

/// After a layer's commands: the store's overlay must hold nothing of theirs (a build's
/// outputs are found there; a layer installs onto the guest's disk, and sees the host's store
/// read-only), and the guest's caches are dropped before the save.
pub fn layer_finish() -> String {
    r#"if [ -n "$(ls -A @STORE_LOCAL@)" ]; then
    echo "nix-winvm: the layer's commands wrote into /nix/store ($(ls -A @STORE_LOCAL@ | head -n 5 | tr '\n' ' ')): a layer installs onto the guest's disk; the store it sees is the host's, read-only" >&2
    echo "check 1" >/tmp/xchg/@LAYER_FAILED@
    exit 1
fi
sync
fstrim / 2>/dev/null || echo "nix-winvm: fstrim / failed: the layer's disk keeps the blocks its commands freed" >&2
echo 3 >/proc/sys/vm/drop_caches
"#
    .replace("@STORE_LOCAL@", STORE_LOCAL)
    .replace("@LAYER_FAILED@", super::LAYER_FAILED)
}
