//! The Windows guest's half of the outputs' return trip (see `Profile::with_local_outputs`):
//! where Cygwin makes the outputs, and how it packs them.
//!
//! From Cygwin's documentation (the `mount` page): a mount point made with `mount`, unlike one
//! in /etc/fstab, is not persistent and disappears once the user's last process ends, so one
//! made by the build's own command covers the build and goes with it; `-f` mounts without
//! warning that the mount point does not exist yet, which an output's never does before the
//! build. The outputs then live on the guest's own disk instead of the Samba share, where links
//! become Cygwin's special files and the share's `create mask` decides the modes.
//!
//! Not yet run on Windows. To check on the first run: that the mount inside the `/nix/store`
//! mount wins for the paths below it, and that Cygwin's tar packs the NTFS folder's links as
//! links and its exec bits as set (`tar tvf /tmp/xchg/outputs.tar` after a build with `-K`).

/// Before a build: each output's store path becomes a mount of a fresh folder on the guest's
/// disk, under Cygwin's root. Reads `$winvm_outputs` (store names).
pub const REDIRECT_OUTPUTS: &str = r#"winvm_redirect() {
    local here=/var/winvm-out n
    mkdir -p "$here" || return 1
    for n in $winvm_outputs; do
        rm -rf "${here:?}/$n"
        mount -f -o binary "$(cygpath -m "$here/$n")" "/nix/store/$n" || return 1
    done
}
"#;

/// Packs the outputs named in "$@" onto the outputs disk, /dev/sdb (PhysicalDrive1, raw:
/// Cygwin writes a raw disk unbuffered, in tar's 10240-byte records, whole sectors). GNU tar
/// from Cygwin's Base packages, in its own format: long names as 'L' and 'K' records.
pub const PACK_OUTPUTS: &str = r#"winvm_pack() {
    tar --format=gnu -c -f /dev/sdb -C /nix/store "$@" && sync
}
"#;

/// After a layer's commands: what they wrote flushed to the disk before the save (Cygwin's
/// `sync` flushes every file system's buffers). The store is the share, read-only: nothing of
/// theirs can be left there.
pub fn layer_finish() -> String {
    // `defrag C: /L` retrims the volume (Windows 8 and later): the blocks the layer's commands
    // freed are discarded through the AHCI disk, so its overlay keeps only what they wrote.
    "sync\ndefrag.exe C: /L >/dev/null 2>&1 || echo \"nix-winvm: defrag C: /L (retrim) failed: the layer's disk keeps the blocks its commands freed\" >&2\n".into()
}
