//! The guest kernel as QEMU boots it fastest: Debian ships a compressed bzImage (vmlinuz), and
//! under TCG its self-decompression costs seconds. The uncompressed ELF (vmlinux) boots through
//! its PVH entry point instead: measured here, a cold guest reached SSH in 3.5 s instead of 6.5 s.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";

#[derive(Debug, thiserror::Error)]
#[error("cannot make an uncompressed kernel: {0}")]
pub struct PvhError(pub String);

/// Writes the uncompressed kernel inside `vmlinuz` to `dest` (atomically).
pub fn extract_vmlinux(vmlinuz: &Path, dest: &Path, xz: &Path) -> Result<(), PvhError> {
    let image = std::fs::read(vmlinuz).map_err(|e| PvhError(format!("reading {}: {e}", vmlinuz.display())))?;
    let offset = image
        .windows(XZ_MAGIC.len())
        .position(|w| w == XZ_MAGIC)
        .ok_or_else(|| PvhError(format!("{} holds no xz-compressed kernel", vmlinuz.display())))?;
    // Unique per process: two runs may make the same cached kernel at once.
    let tmp = dest.with_extension(format!("partial-{}", std::process::id()));
    let out = std::fs::File::create(&tmp).map_err(|e| PvhError(format!("creating {}: {e}", tmp.display())))?;
    let mut child = Command::new(xz)
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| PvhError(format!("running {}: {e}", xz.display())))?;
    let mut stdin = child.stdin.take().ok_or_else(|| PvhError("no stdin for xz".into()))?;
    // xz stops at the end of its stream; what follows in the bzImage is not its business.
    let _ = stdin.write_all(&image[offset..]);
    drop(stdin);
    let status = child.wait().map_err(|e| PvhError(format!("waiting for xz: {e}")))?;
    let head = std::fs::read(&tmp).map(|b| b.get(..4).map(<[u8]>::to_vec)).ok().flatten();
    if !status.success() || head.as_deref() != Some(b"\x7fELF") {
        let _ = std::fs::remove_file(&tmp);
        return Err(PvhError(format!("xz did not produce an ELF kernel from {}", vmlinuz.display())));
    }
    std::fs::rename(&tmp, dest).map_err(|e| PvhError(format!("renaming into {}: {e}", dest.display())))
}

/// The Linux VMs' kernel command line: console on the serial log, power off on panic.
/// `init_on_free=1`: freed memory is zeroed, and QEMU sends a zero page as a flag, so what a
/// saved VM once used and freed (the boot's initramfs, page cache, exited processes) stays out
/// of its state file, which every build loads.
pub const APPEND: &str = "console=ttyS0 panic=-1 quiet init_on_free=1";

/// A Linux VM with a display: the VGA text console too; the serial port stays the last
/// `console=`, so /dev/console (init's output) is still the serial log.
pub const APPEND_DISPLAY: &str = "console=tty0 console=ttyS0 panic=-1 quiet init_on_free=1";

/// The kernel for a VM with a display: the compressed one, whatever else the folder holds.
/// The PVH entry of the uncompressed kernel passes no screen information, so Linux finds no
/// VGA text console there and the screen stays as the firmware left it; a bzImage gets it
/// from its boot protocol. The price is its self-decompression, paid at cold boots only.
pub fn with_display(dir: &Path) -> PathBuf {
    dir.join("vmlinuz")
}

/// The kernel to boot from a folder holding `vmlinuz` and maybe `vmlinux`: the uncompressed one
/// when it is there.
pub fn bootable(dir: &Path) -> PathBuf {
    let pvh = dir.join("vmlinux");
    if pvh.is_file() {
        pvh
    } else {
        dir.join("vmlinuz")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_debians_kernel_and_refuses_other_files() {
        let kernel = Path::new("/var/cache/nix-winvm/kernel/vmlinuz");
        let xz = crate::tools::find("xz");
        if !crate::tools::test_requires("xz", xz.is_ok())
            || !crate::tools::test_requires(&format!("{} (scripts/setup)", kernel.display()), kernel.is_file())
        {
            return;
        }
        let xz = xz.unwrap();
        let d = tempfile::tempdir().unwrap();
        extract_vmlinux(kernel, &d.path().join("vmlinux"), &xz).unwrap();
        assert_eq!(bootable(d.path()), d.path().join("vmlinux"));
        let bad = d.path().join("bad");
        std::fs::write(&bad, b"not a kernel").unwrap();
        let e = extract_vmlinux(&bad, &d.path().join("x"), &xz).unwrap_err().to_string();
        assert!(e.ends_with("holds no xz-compressed kernel"), "{e}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2, "only vmlinux and bad remain");
    }
}
