//! The `pin` stage: an image or a layer made to stand alone, as the output of a fixed-output
//! derivation (`windowsImage { ...; pin = "sha256-..."; }`).
//!
//! A Windows install is not reproducible, so a pinned image is made once and then kept and
//! copied (`nix copy`, `nix-store --export`), like a `requireFile` input. Its store path
//! depends on its name and hash alone: a new nix-winvm, QEMU, library or Nix leaves it, and
//! everything made from it, in place. The stage copies the unpinned image the plan built
//! beside it (which stays in the store: a first build with the wrong hash, then a second with
//! the right one, makes the same copy without installing again).
//!
//! A fixed-output path may refer to no other store path, so the copy holds everything a revive
//! reads, and no store path in plain bytes:
//! - `disk.qcow2`: the whole backing chain (installed disk, base layers) flattened into one
//!   compressed qcow2;
//! - the two state files and the memory file, the layers' pages written over their base's
//!   (deflate-compressed already), the key, the install record, the UEFI
//!   variables;
//! - `media/`: the media's files, the controller's system disk (which holds the builder, smbd
//!   and their libraries at their store paths, as the revived controller expects) as a
//!   compressed qcow2, which QEMU reads as it is;
//! - `meta.json`, naming the media by the relative path `media` and no base.
//!
//! The revived controller runs the agent of the system disk it was saved with: the agent of
//! the nix-winvm that made the image, which is why the session protocol stays compatible.

use super::image::{
    self, qemu_img, ImageMeta, CONTROLLER_STATE, CONTROLLER_SYSTEM, EFI_VARS, PINNED_CONTROLLER_SYSTEM, PINNED_MEDIA,
};
use super::{env_path, io, BuilderError, Progress};
use crate::guest::windows::editions::INSTALL_RECORD;
use crate::spec::ImageSpec;
use crate::tools::Tools;
use crate::vm::memory;
use std::path::{Path, PathBuf};

/// What a first build prints before Nix checks the hash.
pub const NOT_REPRODUCIBLE: &str = "a Windows install is not reproducible, so a pinned image is made once and then kept and copied (nix copy, nix-store --export/--import), like a requireFile input: if Nix reports a hash mismatch below, pin the hash it got; the unpinned image stays in the store, so the next build copies it again instead of installing";

pub fn pin(spec: &ImageSpec, progress: &Progress) -> Result<i32, BuilderError> {
    let out = env_path("out")?;
    let image = env_path("image")?;
    let meta = ImageMeta::read(&image, spec)?;
    let tools = Tools::find()?;
    image::check_image(&tools, &image)?;
    progress.say(&format!("pinning {}: {} layers on the install, flattened", image.display(), meta.layers));
    std::fs::create_dir_all(&out).map_err(io(format!("creating {}", out.display())))?;
    let convert = |from: &Path, format: &str, to: &Path| {
        qemu_img(&tools, &["convert", "-q", "-c", "-f", format, "-O", "qcow2"], &[from.as_os_str(), to.as_os_str()], "")
    };
    convert(&image.join("disk.qcow2"), "qcow2", &out.join("disk.qcow2"))?;
    progress.say("disk flattened and compressed");
    if meta.ram_outside() {
        // The memory flattened too: the whole memory, the layers' pages written over their
        // base's, saved as the memory of an image with no base.
        let scratch = tempfile::Builder::new()
            .prefix("winvm-pin-")
            .tempdir()
            .map_err(io("making a scratch folder for the memory"))?;
        let chain = image::chain(&image)?;
        let mib = meta.spec.shape.memory_mib;
        let (bottom, ram) = (scratch.path().join("bottom"), scratch.path().join(memory::RAM_FILE));
        let flat =
            |e: memory::MemoryError| BuilderError::Io { what: "flattening the memory".into(), source: Box::new(e) };
        memory::expand(&chain[0].join(memory::MEMORY_FILE), mib, &bottom).map_err(flat)?;
        let layers: Vec<PathBuf> = chain[1..].iter().map(|i| i.join(memory::MEMORY_FILE)).collect();
        memory::compose(&bottom, &layers, mib, &ram).map_err(flat)?;
        memory::save(&ram, mib, None, &out.join(memory::MEMORY_FILE)).map_err(flat)?;
        progress.say("memory flattened and compressed");
    }
    for name in ["state", CONTROLLER_STATE, "key", INSTALL_RECORD, EFI_VARS] {
        let from = image.join(name);
        if from.is_file() {
            std::fs::copy(&from, out.join(name)).map_err(io(format!("copying {}", from.display())))?;
        }
    }
    let media = out.join(PINNED_MEDIA);
    copy_tree(&meta.media, &media, &|from, to| {
        // The media stage's report may name store paths; a pinned image keeps no report.
        if from.parent().and_then(Path::file_name).is_some_and(|n| n == super::report::REPORT_DIR) {
            return Ok(true);
        }
        if from.file_name().is_some_and(|n| n == CONTROLLER_SYSTEM) {
            convert(from, "raw", &to.with_file_name(PINNED_CONTROLLER_SYSTEM)).map(|()| true)
        } else {
            Ok(false)
        }
    })?;
    ImageMeta { media: PathBuf::from(PINNED_MEDIA), base: None, ..meta }.write(&out)?;
    let mut files = vec![];
    list_files(&out, &mut files);
    stands_alone(&files)?;
    let size: u64 = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    progress.say(&format!("pinned image: {:.1} MB", size as f64 / 1e6));
    progress.say(NOT_REPRODUCIBLE);
    Ok(0)
}

/// Copies `from` into `to`, following links (a link into the store would be a reference);
/// `special` may write a file its own way (true: done).
fn copy_tree(
    from: &Path,
    to: &Path,
    special: &dyn Fn(&Path, &Path) -> Result<bool, BuilderError>,
) -> Result<(), BuilderError> {
    std::fs::create_dir_all(to).map_err(io(format!("creating {}", to.display())))?;
    let entries = std::fs::read_dir(from).map_err(io(format!("reading {}", from.display())))?;
    for entry in entries {
        let entry = entry.map_err(io(format!("reading {}", from.display())))?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = std::fs::metadata(&source).map_err(io(format!("reading {}", source.display())))?;
        if kind.is_dir() {
            copy_tree(&source, &target, special)?;
        } else if !special(&source, &target)? {
            std::fs::copy(&source, &target).map_err(io(format!("copying {}", source.display())))?;
        }
    }
    Ok(())
}

/// The files of the pinned image that are not compressed (compressed qcow2 clusters and the
/// deflated state files hide the paths they hold from Nix's scan, and are whole images of
/// their own anyway) must name no store path: said here with the file, rather than by Nix as
/// "illegal path references" without one.
fn stands_alone(files: &[PathBuf]) -> Result<(), BuilderError> {
    let compressed = |p: &Path| {
        p.extension().is_some_and(|e| e == "qcow2")
            || p.file_name().is_some_and(|n| n == "state" || n == CONTROLLER_STATE || n == memory::MEMORY_FILE)
    };
    for file in files.iter().filter(|f| !compressed(f)) {
        let bytes = std::fs::read(file).map_err(io(format!("reading {}", file.display())))?;
        if let Some(path) = store_path_in(&bytes) {
            return Err(BuilderError::Io {
                what: format!(
                    "pinning: {} names the store path {path}, but a pinned image must stand alone (a fixed-output path refers to no other)",
                    file.display()
                ),
                source: "a store path in the pinned image".into(),
            });
        }
    }
    Ok(())
}

fn list_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => list_files(&e.path(), files),
            _ => files.push(e.path()),
        }
    }
}

/// The first `/nix/store/` followed by a 32-character hash in `bytes`.
fn store_path_in(bytes: &[u8]) -> Option<String> {
    const PREFIX: &[u8] = b"/nix/store/";
    const HASH_CHARS: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    bytes.windows(PREFIX.len() + 32).find_map(|w| {
        (w.starts_with(PREFIX) && w[PREFIX.len()..].iter().all(|c| HASH_CHARS.contains(c)))
            .then(|| String::from_utf8_lossy(w).into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_paths_are_found_in_bytes() {
        let hash = "0g7mcv4hrkkdx39rcqdqcc5yw2980rfc";
        let text = format!("\0\x01 link to /nix/store/{hash}-winvm-tools-lib here");
        assert_eq!(store_path_in(text.as_bytes()), Some(format!("/nix/store/{hash}")));
        assert_eq!(store_path_in(b"/nix/store/not-a-hash-at-all-but-long-enough-yes"), None);
        assert_eq!(store_path_in(b"/nix/store/"), None);
    }
}
