//! A small read-only reader for the file systems of disc images, enough to find one file and
//! read pieces of it without unpacking anything: Windows install ISOs, and the answer CD.
//!
//! Microsoft's media (made with oscdimg) keep their files in UDF 1.02; the ISO 9660 side of
//! the bridge holds only a README, and a file above 4 GiB (install.wim of a multi-edition
//! ISO) cannot be in it at all. So UDF is read when its anchor is there, and plain ISO 9660
//! (Joliet names when present) otherwise, as xorriso and other tools write it.
//!
//! Only what a finished, read-only disc image needs: type 1 partition maps, file entries and
//! extended file entries with short, long, extended or embedded allocation descriptors, and
//! ISO 9660 multi-extent files. Every offset is checked against the file's size, so a
//! truncated or hostile image is an error, never a panic or a huge allocation.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SECTOR: u64 = 2048;
/// ECMA-167 3/8.4.2.1: the anchor volume descriptor pointer's fixed place.
const UDF_ANCHOR_SECTOR: u64 = 256;
/// ISO 9660 volume descriptors start after the 32 KiB system area.
const ISO9660_FIRST_DESCRIPTOR: u64 = 16;
/// Directories of install media hold a few dozen entries; anything far larger is damage.
const MAX_DIRECTORY_BYTES: u64 = 16 << 20;
/// Bounds on walks that a damaged image could make endless.
const MAX_DESCRIPTORS: u64 = 256;
const MAX_ALLOCATION_BLOCKS: usize = 4096;
const MAX_PATH_DEPTH: usize = 16;

// ECMA-167 descriptor tag identifiers.
const TAG_ANCHOR: u16 = 2;
const TAG_PARTITION: u16 = 5;
const TAG_LOGICAL_VOLUME: u16 = 6;
const TAG_TERMINATING: u16 = 8;
const TAG_FILE_SET: u16 = 256;
const TAG_FILE_IDENTIFIER: u16 = 257;
const TAG_ALLOCATION_EXTENT: u16 = 258;
const TAG_FILE_ENTRY: u16 = 261;
const TAG_EXTENDED_FILE_ENTRY: u16 = 266;

#[derive(Debug)]
pub struct IsoError {
    pub iso: PathBuf,
    pub problem: IsoProblem,
}

#[derive(Debug)]
pub enum IsoProblem {
    Open(std::io::Error),
    Read {
        offset: u64,
        source: std::io::Error,
    },
    /// The image ends before a structure it points to.
    Truncated {
        offset: u64,
        len: u64,
        size: u64,
    },
    NotAnIso,
    /// A UDF structure that is damaged or of a kind this reader does not handle.
    Udf(String),
    Iso9660(String),
    /// A directory's entries, of the file system named ("UDF" or "ISO 9660"), are damaged.
    Directory {
        file_system: &'static str,
        error: DirectoryError,
    },
    /// None of the wanted files exists.
    NoFile {
        wanted: Vec<String>,
    },
    /// A read past the end of a file inside the image.
    BeyondFile {
        path: String,
        offset: u64,
        len: u64,
        size: u64,
    },
}

impl fmt::Display for IsoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let iso = self.iso.display();
        match &self.problem {
            IsoProblem::Open(e) => write!(f, "opening the ISO {iso}: {e}"),
            IsoProblem::Read { offset, source } => write!(f, "reading the ISO {iso} at byte {offset}: {source}"),
            IsoProblem::Truncated { offset, len, size } => write!(
                f,
                "the ISO {iso} is truncated: it is {size} bytes, but a structure lies at bytes {offset}..{}",
                offset + len
            ),
            IsoProblem::NotAnIso => write!(
                f,
                "{iso} is not an ISO image: it has neither a UDF anchor at sector 256 nor an ISO 9660 volume descriptor at sector 16"
            ),
            IsoProblem::Udf(detail) => write!(f, "the ISO {iso}: UDF: {detail}"),
            IsoProblem::Iso9660(detail) => write!(f, "the ISO {iso}: ISO 9660: {detail}"),
            IsoProblem::Directory { file_system, error } => write!(f, "the ISO {iso}: {file_system}: {error}"),
            IsoProblem::NoFile { wanted } => write!(f, "the ISO {iso} has no {}", wanted.join(" and no ")),
            IsoProblem::BeyondFile { path, offset, len, size } => write!(
                f,
                "the ISO {iso}: {path} is {size} bytes, but bytes {offset}..{} of it were wanted",
                offset + len
            ),
        }
    }
}

impl std::error::Error for IsoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.problem {
            IsoProblem::Open(e) | IsoProblem::Read { source: e, .. } => Some(e),
            IsoProblem::Directory { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Why the bytes of a directory are not a list of entries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    #[error("byte {at} of a directory is not a file identifier descriptor")]
    NotFileIdentifier { at: usize },
    #[error("the file identifier descriptor at byte {at} of a directory overruns it")]
    FileIdentifierOverruns { at: usize },
    #[error("a file name has the unknown compression id {0}")]
    UnknownCompression(u8),
    #[error("the directory record at byte {at} of a directory is damaged")]
    RecordDamaged { at: usize },
    #[error("the directory record at byte {at} of a directory overruns it")]
    RecordOverruns { at: usize },
}

/// A file inside the image, as the pieces of the image that hold it, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoFile {
    /// The path as the image spells it.
    pub path: String,
    pub size: u64,
    extents: Vec<Extent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    /// Byte offset in the image; None for an extent that is allocated but not recorded, which
    /// reads as zeros.
    start: Option<u64>,
    len: u64,
}

/// An entry of a directory, before its file entry (UDF) is read.
struct DirEntry {
    name: String,
    is_dir: bool,
    target: Target,
}

enum Target {
    /// UDF: the ICB (partition reference, logical block) of the file entry.
    Icb { partition: u16, block: u32 },
    /// ISO 9660: the directory records already give size and place.
    Extents { size: u64, extents: Vec<Extent> },
}

struct Udf {
    /// Start sector of each partition, indexed by partition reference number (the order of
    /// the logical volume's partition maps).
    partition_starts: Vec<Option<u32>>,
    root: (u16, u32),
}

struct Iso9660 {
    root: Vec<Extent>,
    root_size: u64,
    joliet: bool,
}

impl Iso9660 {
    fn empty() -> Iso9660 {
        Iso9660 { root: Vec::new(), root_size: 0, joliet: false }
    }
}

enum FileSystem {
    Udf(Udf),
    Iso9660(Iso9660),
}

pub struct Iso {
    path: PathBuf,
    file: File,
    size: u64,
    fs: FileSystem,
}

impl Iso {
    pub fn open(path: &Path) -> Result<Iso, IsoError> {
        let err = |problem| IsoError { iso: path.to_path_buf(), problem };
        let file = File::open(path).map_err(|e| err(IsoProblem::Open(e)))?;
        let size = file.metadata().map_err(|e| err(IsoProblem::Open(e)))?.len();
        let mut iso = Iso { path: path.to_path_buf(), file, size, fs: FileSystem::Iso9660(Iso9660::empty()) };
        iso.fs = if iso.has_udf_anchor()? {
            FileSystem::Udf(iso.read_udf()?)
        } else if let Some(fs) = iso.read_iso9660()? {
            FileSystem::Iso9660(fs)
        } else {
            return Err(err(IsoProblem::NotAnIso));
        };
        Ok(iso)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file at `path` ('/'-separated, compared case-insensitively), if there is one.
    pub fn find(&self, path: &str) -> Result<Option<IsoFile>, IsoError> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        if parts.is_empty() || parts.len() > MAX_PATH_DEPTH {
            return Ok(None);
        }
        let (mut dir_size, mut dir_extents) = self.root()?;
        let mut spelled = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let entries = self.read_directory(dir_size, &dir_extents)?;
            let wanted = part.to_lowercase();
            let Some(entry) = entries.into_iter().find(|e| e.name.to_lowercase() == wanted) else {
                return Ok(None);
            };
            let last = i + 1 == parts.len();
            if entry.is_dir == last {
                return Ok(None);
            }
            spelled.push(entry.name);
            (dir_size, dir_extents) = self.resolve(entry.target)?;
        }
        Ok(Some(IsoFile { path: spelled.join("/"), size: dir_size, extents: dir_extents }))
    }

    /// The first of `paths` that exists.
    pub fn find_first(&self, paths: &[&str]) -> Result<IsoFile, IsoError> {
        for path in paths {
            if let Some(file) = self.find(path)? {
                return Ok(file);
            }
        }
        Err(self.error(IsoProblem::NoFile { wanted: paths.iter().map(|p| p.to_string()).collect() }))
    }

    /// `len` bytes of `file` from `offset`; only those are read.
    pub fn read(&self, file: &IsoFile, offset: u64, len: usize) -> Result<Vec<u8>, IsoError> {
        let len64 = len as u64;
        if !offset.checked_add(len64).is_some_and(|end| end <= file.size) {
            return Err(self.error(IsoProblem::BeyondFile {
                path: file.path.clone(),
                offset,
                len: len64,
                size: file.size,
            }));
        }
        let mut out = vec![0u8; len];
        let mut extent_start = 0u64;
        for extent in &file.extents {
            let extent_end = extent_start + extent.len;
            let from = offset.max(extent_start);
            let to = (offset + len64).min(extent_end);
            if from < to {
                let dest = &mut out[(from - offset) as usize..(to - offset) as usize];
                if let Some(start) = extent.start {
                    self.read_exact(start + (from - extent_start), dest)?;
                }
            }
            if extent_end >= offset + len64 {
                break;
            }
            extent_start = extent_end;
        }
        Ok(out)
    }

    fn error(&self, problem: IsoProblem) -> IsoError {
        IsoError { iso: self.path.clone(), problem }
    }

    fn read_exact(&self, offset: u64, buf: &mut [u8]) -> Result<(), IsoError> {
        let len = buf.len() as u64;
        if !offset.checked_add(len).is_some_and(|end| end <= self.size) {
            return Err(self.error(IsoProblem::Truncated { offset, len, size: self.size }));
        }
        self.file.read_exact_at(buf, offset).map_err(|source| self.error(IsoProblem::Read { offset, source }))
    }

    fn read_sector(&self, sector: u64) -> Result<Vec<u8>, IsoError> {
        let mut buf = vec![0u8; SECTOR as usize];
        self.read_exact(sector * SECTOR, &mut buf)?;
        Ok(buf)
    }

    fn root(&self) -> Result<(u64, Vec<Extent>), IsoError> {
        match &self.fs {
            FileSystem::Udf(udf) => self.resolve(Target::Icb { partition: udf.root.0, block: udf.root.1 }),
            FileSystem::Iso9660(fs) => Ok((fs.root_size, fs.root.clone())),
        }
    }

    /// Size and extents of a directory entry's file.
    fn resolve(&self, target: Target) -> Result<(u64, Vec<Extent>), IsoError> {
        match target {
            Target::Extents { size, extents } => Ok((size, extents)),
            Target::Icb { partition, block } => self.udf_file_entry(partition, block),
        }
    }

    /// Which file system the image is read through: "UDF" or "ISO 9660".
    fn file_system(&self) -> &'static str {
        match self.fs {
            FileSystem::Udf(_) => "UDF",
            FileSystem::Iso9660(_) => "ISO 9660",
        }
    }

    fn read_directory(&self, size: u64, extents: &[Extent]) -> Result<Vec<DirEntry>, IsoError> {
        if size > MAX_DIRECTORY_BYTES {
            let detail = format!("a directory of {size} bytes is implausibly large");
            return Err(self.error(match self.fs {
                FileSystem::Udf(_) => IsoProblem::Udf(detail),
                FileSystem::Iso9660(_) => IsoProblem::Iso9660(detail),
            }));
        }
        let dir = IsoFile { path: "(directory)".into(), size, extents: extents.to_vec() };
        let data = self.read(&dir, 0, size as usize)?;
        let entries = match &self.fs {
            FileSystem::Udf(_) => udf_directory(&data),
            FileSystem::Iso9660(fs) => iso9660_directory(&data, fs.joliet),
        };
        entries.map_err(|error| self.error(IsoProblem::Directory { file_system: self.file_system(), error }))
    }

    // ---- UDF ----

    fn has_udf_anchor(&self) -> Result<bool, IsoError> {
        if self.size < (UDF_ANCHOR_SECTOR + 1) * SECTOR {
            return Ok(false);
        }
        Ok(descriptor_tag(&self.read_sector(UDF_ANCHOR_SECTOR)?) == Some(TAG_ANCHOR))
    }

    fn udf_error(&self, detail: impl Into<String>) -> IsoError {
        self.error(IsoProblem::Udf(detail.into()))
    }

    fn read_udf(&self) -> Result<Udf, IsoError> {
        let anchor = self.read_sector(UDF_ANCHOR_SECTOR)?;
        // The main volume descriptor sequence: extent_ad (length, location) at 16.
        let length = u64::from(le32(&anchor, 16));
        let location = u64::from(le32(&anchor, 20));
        let mut partitions: Vec<(u16, u32)> = Vec::new();
        let mut logical_volume = None;
        for sector in location..location + (length / SECTOR).min(MAX_DESCRIPTORS) {
            let buf = self.read_sector(sector)?;
            match descriptor_tag(&buf) {
                Some(TAG_PARTITION) => partitions.push((le16(&buf, 22), le32(&buf, 188))),
                Some(TAG_LOGICAL_VOLUME) if logical_volume.is_none() => logical_volume = Some(buf),
                Some(TAG_TERMINATING) | None => break,
                Some(_) => {}
            }
        }
        let lvd = logical_volume
            .ok_or_else(|| self.udf_error("the volume descriptor sequence has no logical volume descriptor"))?;
        let block_size = le32(&lvd, 212);
        if u64::from(block_size) != SECTOR {
            return Err(self.udf_error(format!("logical blocks of {block_size} bytes; only 2048 are supported")));
        }
        let map_count = le32(&lvd, 268) as usize;
        let maps_len = (le32(&lvd, 264) as usize).min(SECTOR as usize - 440);
        let maps = &lvd[440..440 + maps_len];
        let mut partition_starts = Vec::new();
        let mut at = 0;
        for _ in 0..map_count.min(64) {
            let (kind, len) = (*maps.get(at).unwrap_or(&0), *maps.get(at + 1).unwrap_or(&0) as usize);
            if len == 0 || at + len > maps.len() {
                return Err(self.udf_error("the logical volume's partition maps are damaged"));
            }
            // Type 1 maps name a physical partition; type 2 (virtual, sparable, metadata:
            // rewritable media and UDF 2.5) are resolved when something is found on them.
            partition_starts.push(if kind == 1 && len >= 6 {
                let number = le16(maps, at + 4);
                Some(
                    partitions
                        .iter()
                        .find(|(n, _)| *n == number)
                        .map(|(_, start)| *start)
                        .ok_or_else(|| self.udf_error(format!("no partition descriptor for partition {number}")))?,
                )
            } else {
                None
            });
            at += len;
        }
        // The file set descriptor: long_ad in the logical volume contents use, at 248.
        let fsd_block = le32(&lvd, 252);
        let fsd_partition = le16(&lvd, 256);
        let mut udf = Udf { partition_starts, root: (0, 0) };
        let fsd = self.udf_block(&udf, fsd_partition, fsd_block)?;
        if descriptor_tag(&fsd) != Some(TAG_FILE_SET) {
            return Err(self.udf_error(format!(
                "no file set descriptor at block {fsd_block} of partition reference {fsd_partition}"
            )));
        }
        // The root directory ICB: long_ad at 400.
        udf.root = (le16(&fsd, 408), le32(&fsd, 404));
        Ok(udf)
    }

    fn udf(&self) -> &Udf {
        match &self.fs {
            FileSystem::Udf(udf) => udf,
            FileSystem::Iso9660(_) => unreachable!("UDF structures are read only from a UDF image"),
        }
    }

    /// The image's sector holding logical `block` of partition reference `partition`.
    fn udf_sector(&self, udf: &Udf, partition: u16, block: u32) -> Result<u64, IsoError> {
        match udf.partition_starts.get(usize::from(partition)) {
            Some(Some(start)) => Ok(u64::from(*start) + u64::from(block)),
            Some(None) => Err(self.udf_error(format!(
                "partition reference {partition} is a type 2 partition map (virtual, sparable or metadata), which this reader does not support"
            ))),
            None => Err(self.udf_error(format!("partition reference {partition} does not exist"))),
        }
    }

    fn udf_block(&self, udf: &Udf, partition: u16, block: u32) -> Result<Vec<u8>, IsoError> {
        self.read_sector(self.udf_sector(udf, partition, block)?)
    }

    /// Reads a (extended) file entry and turns its allocation descriptors into extents.
    fn udf_file_entry(&self, partition: u16, block: u32) -> Result<(u64, Vec<Extent>), IsoError> {
        let udf = self.udf();
        let sector = self.udf_sector(udf, partition, block)?;
        let fe = self.read_sector(sector)?;
        let (ea_len_at, ad_len_at, ads_at) = match descriptor_tag(&fe) {
            Some(TAG_FILE_ENTRY) => (168, 172, 176),
            Some(TAG_EXTENDED_FILE_ENTRY) => (208, 212, 216),
            other => {
                return Err(self.udf_error(format!(
                    "block {block} of partition reference {partition} should hold a file entry, but has tag {other:?}"
                )))
            }
        };
        let size = le64(&fe, 56);
        let start = ads_at + le32(&fe, ea_len_at) as usize;
        let ads_len = le32(&fe, ad_len_at) as usize;
        if start + ads_len > fe.len() {
            return Err(self.udf_error(format!("the file entry at block {block} overruns its block")));
        }
        // ICB tag flags (at 16 + 18): the low three bits give the descriptor kind.
        let kind = le16(&fe, 34) & 7;
        if kind == 3 {
            // Embedded: the data are the descriptor area itself.
            let len = size.min(ads_len as u64);
            return Ok((size, vec![Extent { start: Some(sector * SECTOR + start as u64), len }]));
        }
        let mut extents = Vec::new();
        let mut area = fe[start..start + ads_len].to_vec();
        for _ in 0..MAX_ALLOCATION_BLOCKS {
            match self.udf_allocation_area(udf, &area, kind, partition, &mut extents)? {
                None => return Ok((size, clip(extents, size))),
                Some((next_partition, next_block)) => {
                    let aed = self.udf_block(udf, next_partition, next_block)?;
                    if descriptor_tag(&aed) != Some(TAG_ALLOCATION_EXTENT) {
                        return Err(self.udf_error(format!(
                            "the allocation descriptors of the file entry at block {block} continue at block {next_block}, which holds no allocation extent descriptor"
                        )));
                    }
                    let len = (le32(&aed, 20) as usize).min(aed.len() - 24);
                    area = aed[24..24 + len].to_vec();
                }
            }
        }
        Err(self.udf_error(format!("the allocation descriptors of the file entry at block {block} do not end")))
    }

    /// Appends the extents one area of allocation descriptors lists; returns where the next
    /// area is, if the list continues.
    fn udf_allocation_area(
        &self,
        udf: &Udf,
        area: &[u8],
        kind: u16,
        icb_partition: u16,
        extents: &mut Vec<Extent>,
    ) -> Result<Option<(u16, u32)>, IsoError> {
        let step = match kind {
            0 => 8,
            1 => 16,
            2 => 20,
            other => return Err(self.udf_error(format!("unknown allocation descriptor type {other}"))),
        };
        for ad in area.chunks_exact(step) {
            let raw_len = le32(ad, 0);
            let (len, extent_type) = (u64::from(raw_len & 0x3FFF_FFFF), raw_len >> 30);
            let (block, partition) = match kind {
                0 => (le32(ad, 4), icb_partition),
                1 => (le32(ad, 4), le16(ad, 8)),
                _ => (le32(ad, 12), le16(ad, 16)),
            };
            if len == 0 {
                return Ok(None);
            }
            match extent_type {
                0 => {
                    let sector = self.udf_sector(udf, partition, block)?;
                    extents.push(Extent { start: Some(sector * SECTOR), len });
                }
                1 | 2 => extents.push(Extent { start: None, len }),
                _ => return Ok(Some((partition, block))),
            }
        }
        Ok(None)
    }

    // ---- ISO 9660 ----

    fn read_iso9660(&self) -> Result<Option<Iso9660>, IsoError> {
        let mut primary = None;
        let mut joliet = None;
        for sector in ISO9660_FIRST_DESCRIPTOR..ISO9660_FIRST_DESCRIPTOR + MAX_DESCRIPTORS {
            if (sector + 1) * SECTOR > self.size {
                break;
            }
            let buf = self.read_sector(sector)?;
            if &buf[1..6] != b"CD001" {
                break;
            }
            match buf[0] {
                1 if primary.is_none() => primary = Some(buf),
                // A supplementary descriptor with a UCS-2 escape sequence is Joliet.
                2 if joliet.is_none() && matches!(&buf[88..91], b"%/@" | b"%/C" | b"%/E") => joliet = Some(buf),
                255 => break,
                _ => {}
            }
        }
        let (descriptor, is_joliet) = match (joliet, primary) {
            (Some(j), _) => (j, true),
            (None, Some(p)) => (p, false),
            (None, None) => return Ok(None),
        };
        let block_size = le16(&descriptor, 128);
        if u64::from(block_size) != SECTOR {
            return Err(self
                .error(IsoProblem::Iso9660(format!("logical blocks of {block_size} bytes; only 2048 are supported"))));
        }
        // The root directory record at 156.
        let root = &descriptor[156..156 + 34];
        let root_size = u64::from(le32(root, 10));
        let root_extent = Extent { start: Some(u64::from(le32(root, 2)) * SECTOR), len: root_size };
        Ok(Some(Iso9660 { root: vec![root_extent], root_size, joliet: is_joliet }))
    }
}

/// The file identifier descriptors of a UDF directory.
fn udf_directory(data: &[u8]) -> Result<Vec<DirEntry>, DirectoryError> {
    let mut entries = Vec::new();
    let mut at = 0;
    while at + 38 <= data.len() {
        let fid = &data[at..];
        if descriptor_tag(fid) != Some(TAG_FILE_IDENTIFIER) {
            return Err(DirectoryError::NotFileIdentifier { at });
        }
        let characteristics = fid[18];
        let name_len = usize::from(fid[19]);
        let impl_len = usize::from(le16(fid, 36));
        let total = (38 + impl_len + name_len).div_ceil(4) * 4;
        if 38 + impl_len + name_len > fid.len() {
            return Err(DirectoryError::FileIdentifierOverruns { at });
        }
        // Bit 2: deleted; bit 3: the parent directory.
        if characteristics & 0b1100 == 0 {
            let name_bytes = &fid[38 + impl_len..38 + impl_len + name_len];
            entries.push(DirEntry {
                name: osta_name(name_bytes)?,
                is_dir: characteristics & 0b10 != 0,
                target: Target::Icb { partition: le16(fid, 28), block: le32(fid, 24) },
            });
        }
        at += total;
    }
    Ok(entries)
}

/// OSTA compressed Unicode (UDF 2.1.1): a compression id, then 8-bit or big-endian 16-bit
/// units.
fn osta_name(bytes: &[u8]) -> Result<String, DirectoryError> {
    match bytes.split_first() {
        None => Ok(String::new()),
        Some((8 | 254, rest)) => Ok(rest.iter().map(|&b| char::from(b)).collect()),
        Some((16 | 255, rest)) => Ok(utf16_be(rest)),
        Some((other, _)) => Err(DirectoryError::UnknownCompression(*other)),
    }
}

fn utf16_be(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    String::from_utf16_lossy(&units)
}

/// The directory records of an ISO 9660 directory; a multi-extent file is one entry.
fn iso9660_directory(data: &[u8], joliet: bool) -> Result<Vec<DirEntry>, DirectoryError> {
    let mut entries: Vec<DirEntry> = Vec::new();
    let mut continuing = false;
    let mut at = 0;
    while at < data.len() {
        let len = usize::from(data[at]);
        if len == 0 {
            // Records do not cross sectors: the rest of this one is padding.
            at = (at / SECTOR as usize + 1) * SECTOR as usize;
            continue;
        }
        if len < 34 || at + len > data.len() {
            return Err(DirectoryError::RecordDamaged { at });
        }
        let record = &data[at..at + len];
        let name_len = usize::from(record[32]);
        if 33 + name_len > len {
            return Err(DirectoryError::RecordOverruns { at });
        }
        let raw_name = &record[33..33 + name_len];
        let flags = record[25];
        let size = u64::from(le32(record, 10));
        let extent = Extent { start: Some(u64::from(le32(record, 2)) * SECTOR), len: size };
        at += len;
        // The first two records are the directory itself and its parent.
        if name_len == 1 && raw_name[0] <= 1 {
            continue;
        }
        if continuing {
            if let Some(DirEntry { target: Target::Extents { size: total, extents }, .. }) = entries.last_mut() {
                *total += size;
                extents.push(extent);
            }
        } else {
            let name = if joliet { utf16_be(raw_name) } else { raw_name.iter().map(|&b| char::from(b)).collect() };
            entries.push(DirEntry {
                name: iso9660_plain_name(&name),
                is_dir: flags & 0b10 != 0,
                target: Target::Extents { size, extents: vec![extent] },
            });
        }
        // Bit 7: the file goes on in the next record.
        continuing = flags & 0x80 != 0;
    }
    Ok(entries)
}

/// "INSTALL.WIM;1" -> "INSTALL.WIM", "SOURCES." -> "SOURCES".
fn iso9660_plain_name(name: &str) -> String {
    let without_version = name.split(';').next().unwrap_or(name);
    without_version.strip_suffix('.').unwrap_or(without_version).to_owned()
}

/// Extents cut to the file's size (the last one may be rounded up to a block).
fn clip(extents: Vec<Extent>, size: u64) -> Vec<Extent> {
    let mut left = size;
    let mut out = Vec::new();
    for extent in extents {
        if left == 0 {
            break;
        }
        let len = extent.len.min(left);
        out.push(Extent { start: extent.start, len });
        left -= len;
    }
    out
}

/// The tag identifier of an ECMA-167 descriptor whose tag checksum is right.
fn descriptor_tag(buf: &[u8]) -> Option<u16> {
    let tag = buf.get(..16)?;
    let sum = tag.iter().enumerate().filter(|(i, _)| *i != 4).fold(0u8, |s, (_, b)| s.wrapping_add(*b));
    (sum == tag[4]).then(|| le16(tag, 0)).filter(|&id| id != 0)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{temp_path, tool_available};
    use super::*;
    use std::process::Command;

    /// A folder with `sources/install.wim` (the given bytes) and a README at the root.
    fn tree(name: &str, wim: &[u8]) -> PathBuf {
        let dir = temp_path(name);
        std::fs::create_dir_all(dir.join("sources")).unwrap();
        std::fs::write(dir.join("sources/install.wim"), wim).unwrap();
        std::fs::write(dir.join("README.TXT"), b"readme").unwrap();
        dir
    }

    fn run(cmd: &mut Command) {
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 2048) as u8).collect()
    }

    fn check_reads(iso_path: &Path, wim: &[u8], fs: &str) {
        let iso = Iso::open(iso_path).unwrap();
        assert_eq!(iso.file_system(), fs);
        let file = iso.find_first(&["sources/install.esd", "Sources/Install.WIM"]).unwrap();
        assert_eq!(file.size, wim.len() as u64);
        assert_eq!(file.path.to_lowercase(), "sources/install.wim");
        assert_eq!(iso.read(&file, 0, wim.len()).unwrap(), wim);
        assert_eq!(iso.read(&file, 4000, 5000).unwrap(), &wim[4000..9000]);
        let err = iso.read(&file, wim.len() as u64 - 1, 2).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "is {} bytes, but bytes {}..{} of it were wanted",
                wim.len(),
                wim.len() - 1,
                wim.len() + 1
            )),
            "{err}"
        );
        assert!(iso.find("sources").unwrap().is_none(), "a directory is not a file");
        assert!(iso.find("sources/install.wim/x").unwrap().is_none());
        let missing = iso.find_first(&["sources/install.esd"]).unwrap_err().to_string();
        assert_eq!(missing, format!("the ISO {} has no sources/install.esd", iso_path.display()));
    }

    #[test]
    fn reads_a_file_through_udf_as_genisoimage_writes_it() {
        if !tool_available("genisoimage") {
            return;
        }
        let wim = pattern(300_000);
        let dir = tree("udf-tree", &wim);
        let iso = temp_path("udf.iso");
        run(Command::new("genisoimage").args(["-quiet", "-udf", "-o"]).arg(&iso).arg(&dir));
        check_reads(&iso, &wim, "UDF");
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_file(iso).unwrap();
    }

    #[test]
    fn reads_a_file_through_joliet_as_xorriso_writes_it() {
        if !tool_available("xorriso") {
            return;
        }
        let wim = pattern(300_000);
        let dir = tree("joliet-tree", &wim);
        let iso = temp_path("joliet.iso");
        run(Command::new("xorriso").args(["-as", "mkisofs", "-quiet", "-J", "-o"]).arg(&iso).arg(&dir));
        check_reads(&iso, &wim, "ISO 9660");
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_file(iso).unwrap();
    }

    #[test]
    fn plain_iso9660_names_lose_their_version() {
        assert_eq!(iso9660_plain_name("INSTALL.WIM;1"), "INSTALL.WIM");
        assert_eq!(iso9660_plain_name("SOURCES"), "SOURCES");
        assert_eq!(iso9660_plain_name("README.;1"), "README");
    }

    #[test]
    fn osta_names_in_both_widths() {
        assert_eq!(osta_name(b"\x08sources").unwrap(), "sources");
        assert_eq!(osta_name(b"\x10\x00i\x00n\x00s\x00t\x00a\x00l\x00l").unwrap(), "install");
        assert_eq!(osta_name(b"\x07x").unwrap_err().to_string(), "a file name has the unknown compression id 7");
    }

    #[test]
    fn a_multi_extent_iso9660_file_is_one_entry() {
        let record = |name: &[u8], flags: u8, start: u32, size: u32| {
            let len = (33 + name.len()).div_ceil(2) * 2;
            let mut r = vec![0u8; len];
            r[0] = len as u8;
            r[2..6].copy_from_slice(&start.to_le_bytes());
            r[10..14].copy_from_slice(&size.to_le_bytes());
            r[25] = flags;
            r[32] = name.len() as u8;
            r[33..33 + name.len()].copy_from_slice(name);
            r
        };
        let mut dir = [record(b"\0", 2, 20, 2048), record(b"\x01", 2, 18, 2048)].concat();
        dir.extend(record(b"INSTALL.WIM;1", 0x80, 100, 4096));
        dir.extend(record(b"INSTALL.WIM;1", 0, 102, 10));
        dir.extend(record(b"X.TXT;1", 0, 200, 3));
        let entries = iso9660_directory(&dir, false).unwrap();
        assert_eq!(entries.len(), 2);
        let Target::Extents { size, extents } = &entries[0].target else { panic!() };
        assert_eq!((entries[0].name.as_str(), *size), ("INSTALL.WIM", 4106));
        assert_eq!(extents[1], Extent { start: Some(102 * 2048), len: 10 });
    }

    #[test]
    fn a_read_spans_extents_and_unrecorded_ones_read_as_zeros() {
        let path = temp_path("extents.bin");
        std::fs::write(&path, pattern(4096)).unwrap();
        let file = File::open(&path).unwrap();
        let iso = Iso { path: path.clone(), file, size: 4096, fs: FileSystem::Iso9660(Iso9660::empty()) };
        let extents = vec![
            Extent { start: Some(0), len: 10 },
            Extent { start: None, len: 5 },
            Extent { start: Some(2048), len: 20 },
        ];
        let f = IsoFile { path: "f".into(), size: 35, extents };
        let all = iso.read(&f, 0, 35).unwrap();
        let p = pattern(4096);
        assert_eq!(&all[..10], &p[..10]);
        assert_eq!(&all[10..15], &[0; 5]);
        assert_eq!(&all[15..], &p[2048..2068]);
        assert_eq!(iso.read(&f, 8, 10).unwrap(), [&p[8..10], &[0; 5], &p[2048..2051]].concat());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn not_an_iso_and_truncated_images_are_named() {
        let path = temp_path("zeros.iso");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let err = Iso::open(&path).err().unwrap().to_string();
        assert_eq!(
            err,
            format!(
                "{} is not an ISO image: it has neither a UDF anchor at sector 256 nor an ISO 9660 volume descriptor at sector 16",
                path.display()
            )
        );
        std::fs::remove_file(&path).unwrap();
        let err = Iso::open(&path).err().unwrap().to_string();
        assert!(err.starts_with(&format!("opening the ISO {}: ", path.display())), "{err}");
    }

    #[test]
    fn a_cut_off_udf_image_is_truncated_not_a_panic() {
        if !tool_available("genisoimage") {
            return;
        }
        let wim = pattern(100_000);
        let dir = tree("udf-cut", &wim);
        let iso = temp_path("cut.iso");
        run(Command::new("genisoimage").args(["-quiet", "-udf", "-o"]).arg(&iso).arg(&dir));
        let full = std::fs::read(&iso).unwrap();
        // Every cut either opens and reads or fails with a message, never panics.
        for keep in (0..full.len()).step_by(full.len() / 97).chain([257 * 2048, full.len() - 2048]) {
            std::fs::write(&iso, &full[..keep]).unwrap();
            if let Ok(opened) = Iso::open(&iso) {
                if let Ok(file) = opened.find_first(&["sources/install.wim"]) {
                    let _ = opened.read(&file, 0, file.size as usize);
                }
            }
        }
        // Cut inside the file's data: the structures are read, the data are not there.
        std::fs::write(&iso, &full).unwrap();
        let data_start = {
            let opened = Iso::open(&iso).unwrap();
            opened.find_first(&["sources/install.wim"]).unwrap().extents[0].start.unwrap()
        };
        std::fs::write(&iso, &full[..data_start as usize + 1000]).unwrap();
        let opened = Iso::open(&iso).unwrap();
        let file = opened.find_first(&["sources/install.wim"]).unwrap();
        let Err(err) = opened.read(&file, 0, file.size as usize) else { panic!("a truncated read succeeded") };
        let err = err.to_string();
        assert!(err.starts_with(&format!("the ISO {} is truncated: it is ", iso.display())), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_file(iso).unwrap();
    }
}
