//! `cygwin.img`: a raw disk with an MBR and one FAT16/FAT32 partition at
//! [`PARTITION_OFFSET`], filled by the real mtools (`mformat`, `mmd`, `mcopy`). FAT directories
//! with long names are mtools' job, and mtools honours `SOURCE_DATE_EPOCH`, so with every file
//! copied in sorted order the same inputs give the same bytes. The partition table is there
//! because Windows mounts partitions of fixed disks, not a bare file system on one.
//!
//! `answer.img`: a 1.44 MB FAT12 floppy, by mtools too, holding only the answer file.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{MediaError, MediaTools, PARTITION_OFFSET, SOURCE_DATE_EPOCH};
use crate::format::fat::{self, FatKind};
use crate::format::mbr;

const SECTOR: u64 = 512;
/// Fixed, so the image is reproducible; Windows only needs it to be non-zero.
const DISK_SIGNATURE: u32 = 0x4E57_564D;
const VOLUME_SERIAL: &str = "20100101";
/// Smallest partition: mformat chooses FAT16 from 32 MiB, and Windows reads that everywhere.
const MIN_PARTITION_MIB: u64 = 32;
/// From here the partition is FAT32: FAT16 would need 16 KiB clusters and more.
const FAT32_FROM_MIB: u64 = 512;
/// The largest cluster mformat chooses below [`FAT32_FROM_MIB`] is 8 KiB; sizes are
/// estimated with twice that.
const CLUSTER_ESTIMATE: u64 = 16 * 1024;
const SLACK_MIB: u64 = 16;
/// FAT32 cannot hold a larger file.
const MAX_FAT_FILE: u64 = u32::MAX as u64;

/// Files and directories for a FAT image, by target path ("" is the root, "a/b" a directory).
#[derive(Default)]
pub(super) struct FatContent {
    dirs: Vec<String>,
    /// target directory -> (name upper-cased, source); BTreeMap keeps the copy order sorted.
    files: BTreeMap<String, BTreeMap<String, PathBuf>>,
    bytes: u64,
    entries: u64,
}

impl FatContent {
    pub(super) fn add_file(&mut self, dir: &str, source: &Path) -> Result<(), MediaError> {
        let name = source.file_name().and_then(OsStr::to_str).unwrap_or("");
        check_fat_name(source, name)?;
        let size = fs::metadata(source).map_err(|e| MediaError::Read { path: source.to_path_buf(), source: e })?.len();
        if size > MAX_FAT_FILE {
            return Err(MediaError::NotOnFat { path: source.to_path_buf(), reason: "larger than 4 GiB" });
        }
        let in_dir = self.files.entry(dir.to_string()).or_default();
        if in_dir.insert(name.to_ascii_uppercase(), source.to_path_buf()).is_some() {
            return Err(MediaError::NotOnFat {
                path: source.to_path_buf(),
                reason: "another file in its directory has the same name but for case",
            });
        }
        self.bytes += size.div_ceil(CLUSTER_ESTIMATE) * CLUSTER_ESTIMATE;
        self.entries += 2 + name.len() as u64 / 13;
        Ok(())
    }

    /// `root/rel` and everything below it, symlinks followed (a Nix-built repository is a tree
    /// of links into the store).
    pub(super) fn add_tree(&mut self, root: &Path, rel: &str) -> Result<(), MediaError> {
        let path = root.join(rel);
        let name = path.file_name().and_then(OsStr::to_str).unwrap_or("");
        check_fat_name(&path, name)?;
        self.dirs.push(rel.to_string());
        self.bytes += CLUSTER_ESTIMATE;
        self.entries += 2 + name.len() as u64 / 13;
        let read_error = |source| MediaError::Read { path: path.clone(), source };
        let mut children: Vec<(String, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&path).map_err(read_error)? {
            let entry = entry.map_err(|source| MediaError::Read { path: path.clone(), source })?;
            let Some(child) = entry.file_name().to_str().map(str::to_string) else {
                return Err(MediaError::NotOnFat { path: entry.path(), reason: "its name is not UTF-8" });
            };
            children.push((child, entry.path()));
        }
        children.sort();
        for (child, child_path) in children {
            let metadata =
                fs::metadata(&child_path).map_err(|source| MediaError::Read { path: child_path.clone(), source })?;
            if metadata.is_dir() {
                self.add_tree(root, &format!("{rel}/{child}"))?;
            } else {
                self.add_file(rel, &child_path)?;
            }
        }
        Ok(())
    }
}

fn check_fat_name(path: &Path, name: &str) -> Result<(), MediaError> {
    let reason = if name.is_empty() {
        Some("it has no UTF-8 file name")
    } else if name.len() > 255 {
        Some("its name is longer than 255 characters")
    } else if name.chars().any(|c| c.is_control() || "\"*/:<>?\\|".contains(c)) {
        Some("its name holds a character FAT does not allow (\" * / : < > ? \\ | or a control character)")
    } else if name.ends_with('.') || name.ends_with(' ') {
        Some("its name ends with a dot or a space")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(MediaError::NotOnFat { path: path.to_path_buf(), reason }),
        None => Ok(()),
    }
}

pub(super) struct FatImage {
    pub(super) bytes: u64,
    pub(super) filesystem: &'static str,
}

/// A raw disk: an MBR with one FAT partition at [`PARTITION_OFFSET`], filled with `content`.
pub(super) fn build_fat_disk(
    tools: &MediaTools,
    image: &Path,
    label: &str,
    content: &FatContent,
) -> Result<FatImage, MediaError> {
    const MIB: u64 = 1 << 20;
    let estimate = content.bytes + content.entries * 32 + CLUSTER_ESTIMATE;
    let partition_mib = (estimate + estimate / 8).div_ceil(MIB).saturating_add(SLACK_MIB).max(MIN_PARTITION_MIB);
    let partition_sectors = partition_mib * MIB / SECTOR;
    let total = PARTITION_OFFSET + partition_mib * MIB;
    let write_error = |source| MediaError::Write { path: image.to_path_buf(), source };
    let file = fs::File::create(image).map_err(write_error)?;
    file.set_len(total).map_err(|source| MediaError::Write { path: image.to_path_buf(), source })?;
    drop(file);

    let mut target = image.as_os_str().to_os_string();
    target.push(format!("@@{PARTITION_OFFSET}"));
    let mut args: Vec<OsString> =
        vec!["-i".into(), target.clone(), "-v".into(), label.into(), "-N".into(), VOLUME_SERIAL.into()];
    args.extend(["-H".into(), (PARTITION_OFFSET / SECTOR).to_string().into()]);
    args.extend([
        "-T".into(),
        partition_sectors.to_string().into(),
        "-h".into(),
        "64".into(),
        "-s".into(),
        "32".into(),
    ]);
    if partition_mib >= FAT32_FROM_MIB {
        args.push("-F".into());
    }
    args.push("::".into());
    run_tool(&tools.mformat, &args)?;

    if !content.dirs.is_empty() {
        let mut args: Vec<OsString> = vec!["-i".into(), target.clone()];
        args.extend(content.dirs.iter().map(|dir| OsString::from(format!("::/{dir}"))));
        run_tool(&tools.mmd, &args)?;
    }
    for (dir, files) in &content.files {
        let sources: Vec<&PathBuf> = files.values().collect();
        for batch in sources.chunks(128) {
            let mut args: Vec<OsString> = vec!["-i".into(), target.clone()];
            args.extend(batch.iter().map(|path| path.as_os_str().to_os_string()));
            args.push(if dir.is_empty() { "::/".into() } else { format!("::/{dir}/").into() });
            run_tool(&tools.mcopy, &args)?;
        }
    }

    let boot_sector = read_at(image, PARTITION_OFFSET, 512)?;
    let (kind, partition_type) = match fat::kind(&boot_sector) {
        Some(FatKind::Fat32) => (FatKind::Fat32, mbr::TYPE_FAT32_LBA),
        Some(FatKind::Fat16) => (FatKind::Fat16, mbr::TYPE_FAT16_LBA),
        None => {
            return Err(MediaError::ToolOutput {
                tool: tools.mformat.clone(),
                detail: format!("{} holds neither FAT16 nor FAT32 at offset {PARTITION_OFFSET}", image.display()),
            })
        }
    };
    let sectors = u32::try_from(partition_sectors).map_err(|_| MediaError::NotOnFat {
        path: image.to_path_buf(),
        reason: "the content needs a partition over 2 TiB",
    })?;
    let first_lba = (PARTITION_OFFSET / SECTOR) as u32;
    write_at(image, 0, &mbr::one_partition(DISK_SIGNATURE, partition_type, first_lba, sectors))?;
    Ok(FatImage { bytes: total, filesystem: kind.name() })
}

fn read_at(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, MediaError> {
    use std::os::unix::fs::FileExt;
    let error = |source| MediaError::Read { path: path.to_path_buf(), source };
    let file = fs::File::open(path).map_err(error)?;
    let mut buffer = vec![0u8; len];
    file.read_exact_at(&mut buffer, offset).map_err(|source| MediaError::Read { path: path.to_path_buf(), source })?;
    Ok(buffer)
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) -> Result<(), MediaError> {
    use std::os::unix::fs::FileExt;
    let error = |source| MediaError::Write { path: path.to_path_buf(), source };
    let file = fs::OpenOptions::new().write(true).open(path).map_err(error)?;
    file.write_all_at(bytes, offset).map_err(|source| MediaError::Write { path: path.to_path_buf(), source })
}

/// A 1.44 MB FAT12 floppy at `image` (which must not exist) holding `file` in its root, as
/// Windows Setup looks for `autounattend.xml` on removable media.
pub(super) fn build_floppy(image: &Path, label: &str, file: &Path) -> Result<(), MediaError> {
    let mformat = crate::tools::find("mformat").map_err(MediaError::MissingTool)?;
    let mcopy = crate::tools::find("mcopy").map_err(MediaError::MissingTool)?;
    let mut args: Vec<OsString> =
        ["-C", "-f", "1440", "-v", label, "-N", VOLUME_SERIAL, "-i"].into_iter().map(OsString::from).collect();
    args.extend([image.into(), "::".into()]);
    run_tool(&mformat, &args)?;
    run_tool(&mcopy, &["-i".into(), image.into(), file.into(), "::/".into()])?;
    Ok(())
}

/// Runs a tool with a fixed clock and no mtools configuration surprises; returns its stdout.
pub(super) fn run_tool(tool: &Path, args: &[OsString]) -> Result<Vec<u8>, MediaError> {
    let mut command = Command::new(tool);
    // mtools converts names through codepage 850 with glibc's iconv, whose modules a tools
    // closure carries beside bin/ (the sandbox has no /usr/lib/.../gconv).
    if let Some(gconv) = tool.parent().and_then(Path::parent).map(|root| root.join("lib/gconv")) {
        if gconv.is_dir() {
            command.env("GCONV_PATH", gconv);
        }
    }
    let output = command
        .args(args)
        .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH.to_string())
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("MTOOLSRC", "/dev/null")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| MediaError::ToolStart { tool: tool.to_path_buf(), source })?;
    if !output.status.success() {
        let shown: Vec<String> = args.iter().take(8).map(|arg| arg.to_string_lossy().into_owned()).collect();
        let mut shown = shown.join(" ");
        if args.len() > 8 {
            shown.push_str(&format!(" ... ({} arguments)", args.len()));
        }
        return Err(MediaError::ToolFailed {
            tool: tool.to_path_buf(),
            args: shown,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::guest::windows::media::test_util::*;
    use crate::guest::windows::media::{build_media, CYGWIN_IMG};
    use crate::guest::windows::test_util::tool_available;
    use crate::spec::WINDOWS_DISK_SIZE_MIB;

    #[test]
    fn cygwin_image_has_one_fat_partition_at_one_mib() {
        let Some(tools) = tools() else { return };
        let out = tempfile::tempdir().expect("temp dir");
        let opts = image_options("Windows 10 Pro", &[]);
        let summary = build_media(&opts, false, WINDOWS_DISK_SIZE_MIB, KEY, Some(&fixture_repo()), out.path(), &tools)
            .expect("media");
        let image = fs::read(out.path().join(CYGWIN_IMG)).expect("image");
        assert_eq!(image.len() as u64, summary.cygwin_image_bytes);
        assert_eq!(image.len() as u64, PARTITION_OFFSET + MIN_PARTITION_MIB * (1 << 20));
        assert_eq!(&image[510..512], &[0x55, 0xAA]);
        let entry = &image[446..462];
        assert_eq!(entry[4], 0x0E, "FAT16 LBA");
        assert_eq!(u32::from_le_bytes(entry[8..12].try_into().unwrap()), 2048);
        let sectors = u32::from_le_bytes(entry[12..16].try_into().unwrap()) as u64;
        assert_eq!(PARTITION_OFFSET + sectors * 512, image.len() as u64);
        assert!(image[462..510].iter().all(|&b| b == 0), "one partition only");
        let boot = &image[PARTITION_OFFSET as usize..PARTITION_OFFSET as usize + 512];
        assert_eq!(&boot[43..54], b"NIXCYGWIN  ");
        assert_eq!(u32::from_le_bytes(boot[28..32].try_into().unwrap()), 2048, "hidden sectors");

        if tool_available("fsck.fat") {
            let partition = out.path().join("partition.img");
            fs::write(&partition, &image[PARTITION_OFFSET as usize..]).expect("write");
            let output = Command::new("fsck.fat").arg("-n").arg(&partition).output().expect("fsck.fat");
            assert!(
                output.status.success(),
                "fsck.fat: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    #[test]
    fn the_size_follows_the_content() {
        let Some(tools) = tools() else { return };
        let dir = tempfile::tempdir().expect("temp dir");
        let big = dir.path().join("big.bin");
        let mut bytes = vec![0u8; 48 << 20];
        bytes[(48 << 20) - 1] = 0x5A;
        fs::write(&big, &bytes).expect("write");
        let mut content = FatContent::default();
        content.add_file("", &big).expect("add");
        let image = dir.path().join("big.img");
        let built = build_fat_disk(&tools, &image, "BIG", &content).expect("image");
        assert_eq!(built.filesystem, "FAT16");
        assert!(built.bytes > 48 << 20 && built.bytes < 80 << 20, "{}", built.bytes);
        if tool_available("mdir") && tool_available("mtype") {
            let target = format!("{}@@{PARTITION_OFFSET}", image.display());
            assert_eq!(listing(&target), ["::/big.bin"]);
            assert!(mtype(&target, "big.bin") == bytes, "big.bin differs");
        }
    }

    /// The answer floppy: what Setup reads, the same bytes for the same file, no trace of the
    /// folder it was made in.
    #[test]
    fn the_answer_floppy_holds_the_file_and_is_reproducible() {
        if !["mformat", "mcopy", "mdir", "mtype"].iter().all(|t| tool_available(t)) {
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let xml = dir.path().join("autounattend.xml");
        fs::write(&xml, b"<?xml version=\"1.0\"?>\n<unattend/>\n").expect("write");
        let (one, two) = (dir.path().join("one.img"), dir.path().join("two.img"));
        build_floppy(&one, "NIXANSWER", &xml).expect("floppy");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        build_floppy(&two, "NIXANSWER", &xml).expect("floppy");
        let bytes = fs::read(&one).expect("read");
        assert_eq!(bytes.len(), 1_474_560);
        assert!(bytes == fs::read(&two).expect("read"), "two floppies of the same file differ");
        let folder = dir.path().to_string_lossy().into_owned();
        assert!(!bytes.windows(folder.len()).any(|w| w == folder.as_bytes()), "the floppy names its folder");
        let target = one.display().to_string();
        assert_eq!(listing(&target), ["::/autounattend.xml"]);
        assert_eq!(mtype(&target, "autounattend.xml"), fs::read(&xml).expect("read"));
        assert_eq!(&bytes[43..54], b"NIXANSWER  ", "the volume label");
        assert_eq!(&bytes[54..62], b"FAT12   ");
        if tool_available("fsck.fat") {
            let output = Command::new("fsck.fat").arg("-n").arg(&one).output().expect("fsck.fat");
            assert!(output.status.success(), "fsck.fat: {}", String::from_utf8_lossy(&output.stdout));
        }
    }

    /// Only the FAT tables are written, so this is cheap despite the size.
    #[test]
    fn big_media_are_fat32() {
        let Some(tools) = tools() else { return };
        let dir = tempfile::tempdir().expect("temp dir");
        let content = FatContent { bytes: 600 << 20, ..FatContent::default() };
        let image = dir.path().join("big.img");
        let built = build_fat_disk(&tools, &image, "BIG", &content).expect("image");
        assert_eq!(built.filesystem, "FAT32");
        assert!(built.bytes > 600 << 20 && built.bytes < 720 << 20, "{}", built.bytes);
        let mbr = read_at(&image, 0, 512).expect("read");
        assert_eq!(mbr[446 + 4], 0x0C, "FAT32 LBA");
    }
}
