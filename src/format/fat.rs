//! A 1.44 MB FAT12 floppy image, written by hand: Windows Setup searches the root of removable
//! media for `autounattend.xml`, and a floppy needs no partition table and no external tool.
//! Also what a FAT16 or FAT32 boot sector says it is ([`kind`]), for disks mtools formats.
//!
//! Names that fit 8.3 are stored upper-cased in a single entry. Longer names (the answer
//! file's own, `autounattend.xml`, is twelve characters before the dot) get VFAT long-name
//! entries plus a generated `NAME~N.EXT` short name, as Windows itself writes them.

use std::collections::BTreeSet;

pub const FLOPPY_BYTES: usize = 1_474_560;

const SECTOR_BYTES: usize = 512;
const TOTAL_SECTORS: usize = FLOPPY_BYTES / SECTOR_BYTES;
const RESERVED_SECTORS: usize = 1;
const FAT_COPIES: usize = 2;
const SECTORS_PER_FAT: usize = 9;
const ROOT_ENTRIES: usize = 224;
const SECTORS_PER_TRACK: u16 = 18;
const HEADS: u16 = 2;
const MEDIA_DESCRIPTOR: u8 = 0xF0;
const DIR_ENTRY_BYTES: usize = 32;
const ROOT_DIR_SECTORS: usize = ROOT_ENTRIES * DIR_ENTRY_BYTES / SECTOR_BYTES;
const FIRST_ROOT_SECTOR: usize = RESERVED_SECTORS + FAT_COPIES * SECTORS_PER_FAT;
const FIRST_DATA_SECTOR: usize = FIRST_ROOT_SECTOR + ROOT_DIR_SECTORS;
/// One sector per cluster; data clusters are numbered from 2.
const DATA_CLUSTERS: usize = TOTAL_SECTORS - FIRST_DATA_SECTOR;
const FAT12_END_OF_CHAIN: u16 = 0xFFF;

const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_ARCHIVE: u8 = 0x20;
const ATTR_LONG_NAME: u8 = 0x0F;
const LONG_NAME_CHARS_PER_ENTRY: usize = 13;
const LAST_LONG_ENTRY: u8 = 0x40;
const MAX_LONG_NAME_UNITS: usize = 255;

/// 2010-01-01 00:00, the guest's clock base. Every entry gets it, so the same files always
/// give the same image.
const FAT_DATE: u16 = ((2010 - 1980) << 9) | (1 << 5) | 1;
const FAT_TIME: u16 = 0;

/// Characters allowed in short names besides A-Z and 0-9.
const SHORT_NAME_PUNCTUATION: &[u8] = b"$%'-_@~`!(){}^#&";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FatError {
    #[error("FAT volume label '{label}' {reason}")]
    InvalidLabel { label: String, reason: &'static str },
    #[error("file name '{name}' cannot go on a FAT floppy: it {reason}")]
    InvalidFileName { name: String, reason: &'static str },
    #[error("file name '{name}' appears twice (FAT compares names without case)")]
    DuplicateFileName { name: String },
    #[error("the files need {entries_needed} root directory entries, the floppy has {entries_available}")]
    TooManyFiles { entries_needed: usize, entries_available: usize },
    #[error("the files need {bytes_needed} bytes of clusters, the floppy has {bytes_available}")]
    DoesNotFit { bytes_needed: usize, bytes_available: usize },
}

/// A file's directory name: the 8.3 entry, and the long name when 8.3 cannot hold it.
struct DirName {
    short: [u8; 11],
    long: Option<Vec<u16>>,
}

pub fn fat12_floppy(label: &str, files: &[(&str, &[u8])]) -> Result<Vec<u8>, FatError> {
    let label = volume_label(label)?;
    let names = directory_names(files)?;

    let entries_needed = usize::from(label.is_some())
        + names.iter().map(|name| 1 + name.long.as_ref().map_or(0, |long| long_entry_count(long.len()))).sum::<usize>();
    if entries_needed > ROOT_ENTRIES {
        return Err(FatError::TooManyFiles { entries_needed, entries_available: ROOT_ENTRIES });
    }
    let clusters_needed: usize = files.iter().map(|(_, data)| data.len().div_ceil(SECTOR_BYTES)).sum();
    if clusters_needed > DATA_CLUSTERS {
        return Err(FatError::DoesNotFit {
            bytes_needed: clusters_needed * SECTOR_BYTES,
            bytes_available: DATA_CLUSTERS * SECTOR_BYTES,
        });
    }

    let mut image = vec![0u8; FLOPPY_BYTES];
    write_boot_sector(&mut image[..SECTOR_BYTES], label, volume_id(label, files));

    let mut fat = vec![0u8; SECTORS_PER_FAT * SECTOR_BYTES];
    set_fat12(&mut fat, 0, 0xF00 | u16::from(MEDIA_DESCRIPTOR));
    set_fat12(&mut fat, 1, FAT12_END_OF_CHAIN);

    let mut root = Vec::with_capacity(ROOT_ENTRIES * DIR_ENTRY_BYTES);
    if let Some(label) = label {
        root.extend_from_slice(&short_entry(&label, ATTR_VOLUME_ID, 0, 0));
    }
    let mut next_cluster = 2usize;
    for ((_, data), name) in files.iter().zip(&names) {
        let clusters = data.len().div_ceil(SECTOR_BYTES);
        let first_cluster = if clusters == 0 { 0 } else { next_cluster };
        for index in 0..clusters {
            let cluster = next_cluster + index;
            let next = if index + 1 == clusters { FAT12_END_OF_CHAIN } else { (cluster + 1) as u16 };
            set_fat12(&mut fat, cluster, next);
        }
        let start = (FIRST_DATA_SECTOR + next_cluster - 2) * SECTOR_BYTES;
        image[start..start + data.len()].copy_from_slice(data);
        next_cluster += clusters;

        if let Some(long) = &name.long {
            for entry in long_name_entries(long, &name.short) {
                root.extend_from_slice(&entry);
            }
        }
        root.extend_from_slice(&short_entry(&name.short, ATTR_ARCHIVE, first_cluster as u16, data.len() as u32));
    }

    for copy in 0..FAT_COPIES {
        let start = (RESERVED_SECTORS + copy * SECTORS_PER_FAT) * SECTOR_BYTES;
        image[start..start + fat.len()].copy_from_slice(&fat);
    }
    let root_start = FIRST_ROOT_SECTOR * SECTOR_BYTES;
    image[root_start..root_start + root.len()].copy_from_slice(&root);
    Ok(image)
}

fn write_boot_sector(sector: &mut [u8], label: Option<[u8; 11]>, volume_id: u32) {
    // A short jump over the BPB to code that asks the BIOS to try the next boot device.
    sector[0..3].copy_from_slice(&[0xEB, 0x3C, 0x90]);
    sector[3..11].copy_from_slice(b"MSWIN4.1");
    sector[11..13].copy_from_slice(&(SECTOR_BYTES as u16).to_le_bytes());
    sector[13] = 1; // sectors per cluster
    sector[14..16].copy_from_slice(&(RESERVED_SECTORS as u16).to_le_bytes());
    sector[16] = FAT_COPIES as u8;
    sector[17..19].copy_from_slice(&(ROOT_ENTRIES as u16).to_le_bytes());
    sector[19..21].copy_from_slice(&(TOTAL_SECTORS as u16).to_le_bytes());
    sector[21] = MEDIA_DESCRIPTOR;
    sector[22..24].copy_from_slice(&(SECTORS_PER_FAT as u16).to_le_bytes());
    sector[24..26].copy_from_slice(&SECTORS_PER_TRACK.to_le_bytes());
    sector[26..28].copy_from_slice(&HEADS.to_le_bytes());
    // Hidden sectors (28..32) and the 32-bit sector count (32..36) stay zero.
    sector[36] = 0x00; // BIOS drive number of a floppy
    sector[38] = 0x29; // the next three fields are present
    sector[39..43].copy_from_slice(&volume_id.to_le_bytes());
    sector[43..54].copy_from_slice(&label.unwrap_or(*b"NO NAME    "));
    sector[54..62].copy_from_slice(b"FAT12   ");
    sector[62..67].copy_from_slice(&[0xCD, 0x18, 0xF4, 0xEB, 0xFD]); // int 18h; hlt; jmp $-1
    sector[510] = 0x55;
    sector[511] = 0xAA;
}

/// FAT12 packs two 12-bit entries into three bytes.
fn set_fat12(fat: &mut [u8], cluster: usize, value: u16) {
    let offset = cluster * 3 / 2;
    if cluster & 1 == 0 {
        fat[offset] = (value & 0xFF) as u8;
        fat[offset + 1] = (fat[offset + 1] & 0xF0) | ((value >> 8) & 0x0F) as u8;
    } else {
        fat[offset] = (fat[offset] & 0x0F) | ((value << 4) & 0xF0) as u8;
        fat[offset + 1] = (value >> 4) as u8;
    }
}

fn short_entry(name: &[u8; 11], attributes: u8, first_cluster: u16, size: u32) -> [u8; 32] {
    let mut entry = [0u8; 32];
    entry[0..11].copy_from_slice(name);
    entry[11] = attributes;
    entry[14..16].copy_from_slice(&FAT_TIME.to_le_bytes()); // created
    entry[16..18].copy_from_slice(&FAT_DATE.to_le_bytes());
    entry[18..20].copy_from_slice(&FAT_DATE.to_le_bytes()); // accessed
    entry[22..24].copy_from_slice(&FAT_TIME.to_le_bytes()); // written
    entry[24..26].copy_from_slice(&FAT_DATE.to_le_bytes());
    entry[26..28].copy_from_slice(&first_cluster.to_le_bytes());
    entry[28..32].copy_from_slice(&size.to_le_bytes());
    entry
}

fn long_entry_count(units: usize) -> usize {
    units.div_ceil(LONG_NAME_CHARS_PER_ENTRY)
}

/// The entries in on-disk order: the last piece of the name first, flagged, then down to 1.
fn long_name_entries(long: &[u16], short: &[u8; 11]) -> Vec<[u8; 32]> {
    let checksum = short_name_checksum(short);
    let count = long_entry_count(long.len());
    (1..=count)
        .rev()
        .map(|sequence| {
            // Past the name: one NUL terminator, then 0xFFFF padding.
            let start = (sequence - 1) * LONG_NAME_CHARS_PER_ENTRY;
            let units: Vec<u16> = (start..start + LONG_NAME_CHARS_PER_ENTRY)
                .map(|i| match i.cmp(&long.len()) {
                    std::cmp::Ordering::Less => long[i],
                    std::cmp::Ordering::Equal => 0x0000,
                    std::cmp::Ordering::Greater => 0xFFFF,
                })
                .collect();
            let mut entry = [0u8; 32];
            entry[0] = sequence as u8 | if sequence == count { LAST_LONG_ENTRY } else { 0 };
            entry[11] = ATTR_LONG_NAME;
            entry[13] = checksum;
            let slots = (1..11).step_by(2).chain((14..26).step_by(2)).chain((28..32).step_by(2));
            for (slot, unit) in slots.zip(units) {
                entry[slot..slot + 2].copy_from_slice(&unit.to_le_bytes());
            }
            entry
        })
        .collect()
}

fn short_name_checksum(short: &[u8; 11]) -> u8 {
    short.iter().fold(0u8, |sum, &byte| sum.rotate_right(1).wrapping_add(byte))
}

fn is_short_name_byte(byte: u8) -> bool {
    byte.is_ascii_uppercase() || byte.is_ascii_digit() || SHORT_NAME_PUNCTUATION.contains(&byte)
}

fn volume_label(label: &str) -> Result<Option<[u8; 11]>, FatError> {
    if label.is_empty() {
        return Ok(None);
    }
    let invalid = |reason| FatError::InvalidLabel { label: label.to_string(), reason };
    let upper = label.to_ascii_uppercase();
    if upper.len() > 11 {
        return Err(invalid("is longer than 11 characters"));
    }
    if !upper.bytes().all(|b| is_short_name_byte(b) || b == b' ') {
        return Err(invalid("may only hold letters, digits, spaces and $%'-_@~`!(){}^#&"));
    }
    if upper.starts_with(' ') {
        return Err(invalid("starts with a space"));
    }
    let mut field = [b' '; 11];
    field[..upper.len()].copy_from_slice(upper.as_bytes());
    Ok(Some(field))
}

/// The 8.3 form of a name that already is one: NAME.EXT, upper-cased.
fn as_short_name(name: &str) -> Option<[u8; 11]> {
    let upper = name.to_ascii_uppercase();
    let (base, ext) = upper.split_once('.').unwrap_or((&upper, ""));
    let fits = (1..=8).contains(&base.len())
        && ext.len() <= 3
        && !ext.contains('.')
        && base.bytes().chain(ext.bytes()).all(is_short_name_byte);
    if !fits {
        return None;
    }
    let mut short = [b' '; 11];
    short[..base.len()].copy_from_slice(base.as_bytes());
    short[8..8 + ext.len()].copy_from_slice(ext.as_bytes());
    Some(short)
}

fn check_long_name(name: &str) -> Result<Vec<u16>, FatError> {
    let invalid = |reason| FatError::InvalidFileName { name: name.to_string(), reason };
    if name.is_empty() {
        return Err(invalid("is empty"));
    }
    if name.contains('/') || name.contains('\\') {
        return Err(invalid("holds a path separator; only the root directory is written"));
    }
    if name.chars().any(|c| c.is_control() || "\"*:<>?|".contains(c)) {
        return Err(invalid("holds a control character or one of \" * : < > ? |"));
    }
    if name.ends_with('.') || name.ends_with(' ') {
        return Err(invalid("ends with a dot or a space"));
    }
    let units: Vec<u16> = name.encode_utf16().collect();
    if units.len() > MAX_LONG_NAME_UNITS {
        return Err(invalid("is longer than 255 characters"));
    }
    Ok(units)
}

/// Windows' scheme: up to six characters of the name, `~N`, and the first three of the
/// extension, with anything 8.3 cannot hold replaced by `_`.
fn generated_short_name(name: &str, used: &BTreeSet<[u8; 11]>) -> Option<[u8; 11]> {
    let shorten = |part: &str| -> Vec<u8> {
        part.chars()
            .filter(|&c| c != ' ' && c != '.')
            .map(|c| {
                let byte = if c.is_ascii() { c.to_ascii_uppercase() as u8 } else { b'_' };
                if is_short_name_byte(byte) {
                    byte
                } else {
                    b'_'
                }
            })
            .collect()
    };
    let trimmed = name.trim_start_matches('.');
    let (base, ext) = match trimmed.rfind('.') {
        Some(dot) => (shorten(&trimmed[..dot]), shorten(&trimmed[dot + 1..])),
        None => (shorten(trimmed), Vec::new()),
    };
    let base = if base.is_empty() { b"_".to_vec() } else { base };
    (1..=999_999u32).find_map(|n| {
        let tail = format!("~{n}");
        let keep = base.len().min(8 - tail.len());
        let mut short = [b' '; 11];
        short[..keep].copy_from_slice(&base[..keep]);
        short[keep..keep + tail.len()].copy_from_slice(tail.as_bytes());
        let ext_len = ext.len().min(3);
        short[8..8 + ext_len].copy_from_slice(&ext[..ext_len]);
        (!used.contains(&short)).then_some(short)
    })
}

fn directory_names(files: &[(&str, &[u8])]) -> Result<Vec<DirName>, FatError> {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut used: BTreeSet<[u8; 11]> = BTreeSet::new();
    let mut slots: Vec<(Option<[u8; 11]>, Vec<u16>)> = Vec::with_capacity(files.len());
    // Names that are 8.3 already claim their short names before any ~N is generated.
    for (name, _) in files {
        let long = check_long_name(name)?;
        if !seen.insert(name.to_uppercase()) {
            return Err(FatError::DuplicateFileName { name: name.to_string() });
        }
        let short = as_short_name(name);
        if let Some(short) = short {
            used.insert(short);
        }
        slots.push((short, long));
    }
    let mut names = Vec::with_capacity(files.len());
    for ((name, _), (short, long)) in files.iter().zip(slots) {
        let dir_name = match short {
            Some(short) => DirName { short, long: None },
            None => {
                let short = generated_short_name(name, &used)
                    .ok_or(FatError::TooManyFiles { entries_needed: files.len(), entries_available: ROOT_ENTRIES })?;
                used.insert(short);
                DirName { short, long: Some(long) }
            }
        };
        names.push(dir_name);
    }
    Ok(names)
}

/// Derived from the content rather than the clock, so images are reproducible.
fn volume_id(label: Option<[u8; 11]>, files: &[(&str, &[u8])]) -> u32 {
    let mut hash: u32 = 0x811C_9DC5;
    let mut feed = |bytes: &[u8]| {
        for &byte in bytes {
            hash = (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193);
        }
    };
    feed(&label.unwrap_or([0; 11]));
    for (name, data) in files {
        feed(name.as_bytes());
        feed(&(data.len() as u64).to_le_bytes());
        feed(data);
    }
    hash
}

/// FAT16 or FAT32, as a boot sector's extended BIOS parameter block names its file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatKind {
    Fat16,
    Fat32,
}

impl FatKind {
    pub fn name(self) -> &'static str {
        match self {
            FatKind::Fat16 => "FAT16",
            FatKind::Fat32 => "FAT32",
        }
    }
}

/// Which of FAT16 and FAT32 the boot sector of a volume holds (the type names at their
/// fields of the two extended BPB layouts), if either.
pub fn kind(boot_sector: &[u8]) -> Option<FatKind> {
    if boot_sector.get(82..87) == Some(b"FAT32") {
        Some(FatKind::Fat32)
    } else if boot_sector.get(54..59) == Some(b"FAT16") {
        Some(FatKind::Fat16)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{temp_path, tool_available};
    use super::*;
    use std::path::Path;
    use std::process::Command;

    struct TempImage(std::path::PathBuf);
    impl TempImage {
        fn new(bytes: &[u8]) -> TempImage {
            let path = temp_path("floppy.img");
            std::fs::write(&path, bytes).expect("write image");
            TempImage(path)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn run(tool: &str, args: &[&str], image: &TempImage) -> (bool, Vec<u8>, String) {
        let output = Command::new(tool)
            .args(args.iter().map(|arg| arg.replace("{img}", &image.path().display().to_string())))
            .env("MTOOLS_SKIP_CHECK", "0")
            .output()
            .unwrap_or_else(|err| panic!("{tool} did not run: {err}"));
        (output.status.success(), output.stdout, String::from_utf8_lossy(&output.stderr).into())
    }

    fn sample_files() -> Vec<(&'static str, Vec<u8>)> {
        let xml = b"<?xml version=\"1.0\"?>\n<unattend/>\n".to_vec();
        let big: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        vec![
            ("autounattend.xml", xml),
            ("INSTALL.CMD", b"@echo off\r\n".to_vec()),
            ("readme.txt", b"lower-case 8.3 name\n".to_vec()),
            ("big.bin", big),
            ("empty", Vec::new()),
            ("A file with spaces and a long name.text", b"long\n".to_vec()),
        ]
    }

    fn build(files: &[(&'static str, Vec<u8>)]) -> Vec<u8> {
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        fat12_floppy("nixwinvm", &refs).expect("image")
    }

    #[test]
    fn layout_matches_a_standard_floppy() {
        let image = build(&sample_files());
        assert_eq!(image.len(), FLOPPY_BYTES);
        assert_eq!(&image[510..512], &[0x55, 0xAA]);
        assert_eq!(u16::from_le_bytes([image[19], image[20]]), 2880);
        assert_eq!(&image[43..54], b"NIXWINVM   ");
        assert_eq!(&image[54..62], b"FAT12   ");
        let fat1 = &image[512..512 + 9 * 512];
        let fat2 = &image[512 + 9 * 512..512 + 18 * 512];
        assert_eq!(fat1, fat2);
        assert_eq!(&fat1[..3], &[0xF0, 0xFF, 0xFF]);
    }

    #[test]
    fn eight_three_names_are_upper_cased_and_long_names_get_lfn_entries() {
        let image = build(&sample_files());
        let root = &image[FIRST_ROOT_SECTOR * 512..FIRST_DATA_SECTOR * 512];
        let shorts: Vec<&[u8]> = root
            .chunks(32)
            .filter(|entry| entry[0] != 0 && entry[11] != ATTR_LONG_NAME)
            .map(|entry| &entry[..11])
            .collect();
        assert_eq!(
            shorts,
            [
                &b"NIXWINVM   "[..],
                b"AUTOUN~1XML",
                b"INSTALL CMD",
                b"README  TXT",
                b"BIG     BIN",
                b"EMPTY      ",
                b"AFILEW~1TEX",
            ]
        );
        assert_eq!(as_short_name("readme.txt"), Some(*b"README  TXT"));
        assert_eq!(as_short_name("autounattend.xml"), None);
    }

    #[test]
    fn mtools_reads_the_files_back() {
        if !tool_available("mdir") || !tool_available("mtype") {
            return;
        }
        let files = sample_files();
        let image = TempImage::new(&build(&files));
        let (ok, listing, stderr) = run("mdir", &["-i", "{img}", "::"], &image);
        let listing = String::from_utf8_lossy(&listing).into_owned();
        assert!(ok, "mdir failed: {stderr}");
        assert!(listing.contains("Volume in drive : is NIXWINVM"), "{listing}");
        assert!(listing.contains("autounattend.xml"), "{listing}");
        for (name, data) in &files {
            let upper = format!("::/{}", name.to_uppercase());
            let (ok, content, stderr) = run("mtype", &["-i", "{img}", &upper], &image);
            assert!(ok, "mtype {upper} failed: {stderr}");
            assert_eq!(&content, data, "{name}");
        }
        let (ok, content, _) = run("mtype", &["-i", "{img}", "::/AUTOUNATTEND.XML"], &image);
        assert!(ok);
        assert_eq!(content, files[0].1);
    }

    #[test]
    fn fsck_finds_nothing_to_fix() {
        if !tool_available("fsck.fat") {
            return;
        }
        let image = TempImage::new(&build(&sample_files()));
        let (ok, stdout, stderr) = run("fsck.fat", &["-n", "-v", "{img}"], &image);
        let stdout = String::from_utf8_lossy(&stdout);
        assert!(ok, "fsck.fat failed:\n{stdout}{stderr}");
        assert!(!stdout.contains("differ"), "{stdout}");
        assert!(stdout.contains("2 FATs, 12 bit entries"), "{stdout}");
        assert!(stdout.contains("7 files, 10/2847 clusters"), "{stdout}");
    }

    #[test]
    fn colliding_long_names_get_distinct_short_names() {
        let files = vec![
            ("longfilename1.txt", b"one".to_vec()),
            ("longfilename2.txt", b"two".to_vec()),
            ("LONGFI~1.TXT", b"already taken".to_vec()),
        ];
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        let names = directory_names(&refs).expect("names");
        assert_eq!(&names[0].short, b"LONGFI~2TXT");
        assert_eq!(&names[1].short, b"LONGFI~3TXT");
        assert_eq!(&names[2].short, b"LONGFI~1TXT");
        if tool_available("mtype") {
            let image = TempImage::new(&fat12_floppy("", &refs).expect("image"));
            for (name, data) in &files {
                let (ok, content, stderr) = run("mtype", &["-i", "{img}", &format!("::/{name}")], &image);
                assert!(ok, "{name}: {stderr}");
                assert_eq!(&content, data);
            }
        }
    }

    #[test]
    fn rejects_what_fat_cannot_hold() {
        let one = |name: &'static str| fat12_floppy("X", &[(name, b"x")]);
        assert_eq!(
            one("what?.txt").map_err(|e| e.to_string()),
            Err("file name 'what?.txt' cannot go on a FAT floppy: it holds a control character \
                 or one of \" * : < > ? |"
                .to_string())
        );
        assert!(matches!(one("dir/file"), Err(FatError::InvalidFileName { .. })));
        assert!(matches!(one(""), Err(FatError::InvalidFileName { .. })));
        assert!(matches!(one("trailing."), Err(FatError::InvalidFileName { .. })));
        assert_eq!(
            fat12_floppy("X", &[("a.txt", b"1"), ("A.TXT", b"2")]),
            Err(FatError::DuplicateFileName { name: "A.TXT".into() })
        );
        assert!(matches!(fat12_floppy("this label is long", &[]), Err(FatError::InvalidLabel { .. })));
        assert!(matches!(fat12_floppy("bad*", &[]), Err(FatError::InvalidLabel { .. })));
    }

    #[test]
    fn rejects_too_many_or_too_large_files() {
        let names: Vec<String> = (0..224).map(|i| format!("F{i}.TXT")).collect();
        let files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b""[..])).collect();
        assert_eq!(
            fat12_floppy("LABEL", &files),
            Err(FatError::TooManyFiles { entries_needed: 225, entries_available: 224 })
        );
        assert!(fat12_floppy("", &files).is_ok(), "224 entries fit without a label");

        let big = vec![0u8; DATA_CLUSTERS * 512 + 1];
        assert_eq!(
            fat12_floppy("X", &[("BIG.BIN", &big)]).map_err(|e| e.to_string()),
            Err("the files need 1458176 bytes of clusters, the floppy has 1457664".to_string())
        );
        let exact = vec![7u8; DATA_CLUSTERS * 512];
        assert!(fat12_floppy("X", &[("FULL.BIN", &exact)]).is_ok());
    }

    #[test]
    fn the_kind_is_read_where_each_layout_names_it() {
        let mut sector = [0u8; 512];
        assert_eq!(kind(&sector), None);
        sector[54..62].copy_from_slice(b"FAT16   ");
        assert_eq!(kind(&sector), Some(FatKind::Fat16));
        sector[82..90].copy_from_slice(b"FAT32   ");
        assert_eq!(kind(&sector).map(FatKind::name), Some("FAT32"));
        assert_eq!(kind(&build(&sample_files())), None, "a FAT12 floppy is neither");
        assert_eq!(kind(&sector[..60]), Some(FatKind::Fat16));
    }

    #[test]
    fn images_are_deterministic() {
        let files = sample_files();
        assert_eq!(build(&files), build(&files.clone()));
    }

    #[test]
    fn fat12_packing_round_trips() {
        let mut fat = vec![0u8; 12];
        for (cluster, value) in [(0, 0xFF0), (1, 0xFFF), (2, 0x003), (3, 0xABC), (4, 0x123)] {
            set_fat12(&mut fat, cluster, value);
        }
        let get = |n: usize| {
            let offset = n * 3 / 2;
            let pair = u16::from_le_bytes([fat[offset], fat[offset + 1]]);
            if n & 1 == 0 {
                pair & 0xFFF
            } else {
                pair >> 4
            }
        };
        assert_eq!([get(0), get(1), get(2), get(3), get(4)], [0xFF0, 0xFFF, 0x003, 0xABC, 0x123]);
    }
}
