//! A minimal ELF64 little-endian reader and the shared-library closure of a binary.
//!
//! Only what the initramfs needs is parsed: program headers (PT_INTERP, PT_LOAD, PT_DYNAMIC),
//! the dynamic section (DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_RPATH, DT_RUNPATH) and section
//! headers (for `.modinfo` in kernel modules). Every read is bounds-checked: the input is
//! whatever file the caller points at.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Where the loader of a Debian/Ubuntu x86_64 system looks, in its order. `elf_closure` does
/// not read /etc/ld.so.cache: on the systems we build from these folders are what it lists.
pub const DEFAULT_LIB_DIRS: &[&str] =
    &["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib", "/lib"];

pub fn default_lib_dirs() -> Vec<PathBuf> {
    DEFAULT_LIB_DIRS.iter().map(PathBuf::from).collect()
}

#[derive(Debug)]
pub enum ElfError {
    Read { path: PathBuf, source: io::Error },
    NotElf { path: PathBuf },
    Unsupported { path: PathBuf, what: String },
    Malformed { path: PathBuf, what: String },
    InterpreterMissing { interpreter: PathBuf, binary: PathBuf, source: io::Error },
    LibraryNotFound { library: String, needed_by: PathBuf, searched: Vec<PathBuf> },
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElfError::Read { path, source } => {
                write!(f, "cannot read ELF file {}: {source}", path.display())
            }
            ElfError::NotElf { path } => {
                write!(f, "{} is not an ELF file (no \\x7fELF magic)", path.display())
            }
            ElfError::Unsupported { path, what } => {
                write!(f, "{}: unsupported ELF file: {what}", path.display())
            }
            ElfError::Malformed { path, what } => {
                write!(f, "{}: malformed ELF file: {what}", path.display())
            }
            ElfError::InterpreterMissing { interpreter, binary, source } => {
                write!(f, "interpreter {} of {} cannot be read: {source}", interpreter.display(), binary.display())
            }
            ElfError::LibraryNotFound { library, needed_by, searched } => {
                let dirs: Vec<String> = searched.iter().map(|d| d.display().to_string()).collect();
                write!(
                    f,
                    "shared library {library} needed by {} not found in [{}]",
                    needed_by.display(),
                    dirs.join(", ")
                )
            }
        }
    }
}

impl std::error::Error for ElfError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ElfError::Read { source, .. } | ElfError::InterpreterMissing { source, .. } => Some(source),
            _ => None,
        }
    }
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;

const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

const SHN_XINDEX: u16 = 0xffff;

const PHDR_SIZE: usize = 56;
const SHDR_SIZE: usize = 64;
const DYN_SIZE: usize = 16;

/// Why a byte buffer is not an ELF file we can read. Carries no path: callers add it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ParseError {
    NotElf,
    Unsupported(String),
    Malformed(String),
}

impl ParseError {
    pub(crate) fn at(self, path: &Path) -> ElfError {
        let path = path.to_path_buf();
        match self {
            ParseError::NotElf => ElfError::NotElf { path },
            ParseError::Unsupported(what) => ElfError::Unsupported { path, what },
            ParseError::Malformed(what) => ElfError::Malformed { path, what },
        }
    }
}

fn malformed(what: impl Into<String>) -> ParseError {
    ParseError::Malformed(what.into())
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct ProgramHeader {
    pub p_type: u32,
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct SectionHeader {
    pub name: u32,
    pub offset: u64,
    pub size: u64,
    pub sh_type: u32,
}

const SHT_NOBITS: u32 = 8;

/// A validated view of an ELF64 little-endian file held in memory.
pub(crate) struct Elf<'a> {
    data: &'a [u8],
    pub machine: u16,
    phoff: u64,
    phentsize: u16,
    phnum: u16,
    shoff: u64,
    shentsize: u16,
    shnum: u16,
    shstrndx: u16,
}

fn slice_at(data: &[u8], offset: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let len = usize::try_from(len).ok()?;
    data.get(start..start.checked_add(len)?)
}

fn u16_at(data: &[u8], offset: usize) -> Option<u16> {
    let bytes = data.get(offset..offset.checked_add(2)?)?;
    Some(u16::from_le_bytes([bytes[0], bytes[1]]))
}

fn u32_at(data: &[u8], offset: usize) -> Option<u32> {
    let bytes = data.get(offset..offset.checked_add(4)?)?;
    let mut buf = [0u8; 4];
    buf.copy_from_slice(bytes);
    Some(u32::from_le_bytes(buf))
}

fn u64_at(data: &[u8], offset: usize) -> Option<u64> {
    let bytes = data.get(offset..offset.checked_add(8)?)?;
    let mut buf = [0u8; 8];
    buf.copy_from_slice(bytes);
    Some(u64::from_le_bytes(buf))
}

/// The NUL-terminated string starting at `offset` within `table`.
fn c_str_at(table: &[u8], offset: u64) -> Option<&[u8]> {
    let rest = table.get(usize::try_from(offset).ok()?..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    Some(&rest[..end])
}

impl<'a> Elf<'a> {
    pub(crate) fn parse(data: &'a [u8]) -> Result<Elf<'a>, ParseError> {
        if data.len() < 4 || &data[..4] != b"\x7fELF" {
            return Err(ParseError::NotElf);
        }
        let header = data.get(..64).ok_or_else(|| malformed("file ends inside the 64-byte ELF header"))?;
        match header[4] {
            2 => {}
            1 => return Err(ParseError::Unsupported("32-bit ELF (only ELF64 is read)".into())),
            class => return Err(ParseError::Unsupported(format!("unknown ELF class {class}"))),
        }
        match header[5] {
            1 => {}
            2 => return Err(ParseError::Unsupported("big-endian ELF (only little-endian is read)".into())),
            encoding => return Err(ParseError::Unsupported(format!("unknown ELF data encoding {encoding}"))),
        }
        // The header is 64 bytes long, so these fixed offsets cannot miss.
        let field16 = |offset| u16_at(header, offset).unwrap_or(0);
        let field64 = |offset| u64_at(header, offset).unwrap_or(0);
        let mut elf = Elf {
            data,
            machine: field16(0x12),
            phoff: field64(0x20),
            shoff: field64(0x28),
            phentsize: field16(0x36),
            phnum: field16(0x38),
            shentsize: field16(0x3a),
            shnum: field16(0x3c),
            shstrndx: field16(0x3e),
        };
        if elf.phnum > 0 && usize::from(elf.phentsize) < PHDR_SIZE {
            return Err(malformed(format!("program header entry size {} < 56", elf.phentsize)));
        }
        if elf.shoff != 0 && usize::from(elf.shentsize) < SHDR_SIZE {
            return Err(malformed(format!("section header entry size {} < 64", elf.shentsize)));
        }
        // Files with 0xff00 or more sections keep the real counts in section header 0.
        if elf.shoff != 0 && (elf.shnum == 0 || elf.shstrndx == SHN_XINDEX) {
            let zero = elf.raw_section(0)?;
            if elf.shnum == 0 {
                elf.shnum =
                    u16::try_from(zero.size).map_err(|_| malformed(format!("{} sections are too many", zero.size)))?;
            }
            if elf.shstrndx == SHN_XINDEX {
                let link = u32_at(elf.section_header_bytes(0)?, 40).unwrap_or(0);
                elf.shstrndx =
                    u16::try_from(link).map_err(|_| malformed(format!("section name table index {link} too large")))?;
            }
        }
        Ok(elf)
    }

    pub(crate) fn program_headers(&self) -> Result<Vec<ProgramHeader>, ParseError> {
        (0..usize::from(self.phnum))
            .map(|index| {
                let offset = u64::from(self.phentsize)
                    .checked_mul(index as u64)
                    .and_then(|o| o.checked_add(self.phoff))
                    .ok_or_else(|| malformed("program header offset overflows"))?;
                let bytes = slice_at(self.data, offset, PHDR_SIZE as u64)
                    .ok_or_else(|| malformed(format!("program header {index} lies outside the file")))?;
                Ok(ProgramHeader {
                    p_type: u32_at(bytes, 0).unwrap_or(0),
                    offset: u64_at(bytes, 8).unwrap_or(0),
                    vaddr: u64_at(bytes, 16).unwrap_or(0),
                    filesz: u64_at(bytes, 32).unwrap_or(0),
                })
            })
            .collect()
    }

    fn section_header_bytes(&self, index: usize) -> Result<&'a [u8], ParseError> {
        let offset = u64::from(self.shentsize)
            .checked_mul(index as u64)
            .and_then(|o| o.checked_add(self.shoff))
            .ok_or_else(|| malformed("section header offset overflows"))?;
        slice_at(self.data, offset, SHDR_SIZE as u64)
            .ok_or_else(|| malformed(format!("section header {index} lies outside the file")))
    }

    fn raw_section(&self, index: usize) -> Result<SectionHeader, ParseError> {
        let bytes = self.section_header_bytes(index)?;
        Ok(SectionHeader {
            name: u32_at(bytes, 0).unwrap_or(0),
            sh_type: u32_at(bytes, 4).unwrap_or(0),
            offset: u64_at(bytes, 24).unwrap_or(0),
            size: u64_at(bytes, 32).unwrap_or(0),
        })
    }

    pub(crate) fn section_contents(&self, section: &SectionHeader) -> Result<&'a [u8], ParseError> {
        if section.sh_type == SHT_NOBITS {
            return Ok(&[]);
        }
        slice_at(self.data, section.offset, section.size).ok_or_else(|| {
            malformed(format!(
                "section at offset {:#x}, size {:#x} lies outside the file",
                section.offset, section.size
            ))
        })
    }

    /// The contents of the first section called `name`, if there is one.
    pub(crate) fn section_by_name(&self, name: &str) -> Result<Option<&'a [u8]>, ParseError> {
        if self.shoff == 0 || self.shnum == 0 {
            return Ok(None);
        }
        if self.shstrndx >= self.shnum {
            return Err(malformed(format!(
                "section name table index {} is not below the section count {}",
                self.shstrndx, self.shnum
            )));
        }
        let names = self.section_contents(&self.raw_section(usize::from(self.shstrndx))?)?;
        for index in 0..usize::from(self.shnum) {
            let section = self.raw_section(index)?;
            let section_name = c_str_at(names, u64::from(section.name))
                .ok_or_else(|| malformed(format!("name of section {index} lies outside the name table")))?;
            if section_name == name.as_bytes() {
                return self.section_contents(&section).map(Some);
            }
        }
        Ok(None)
    }

    /// Maps a virtual address to a file offset through the PT_LOAD segments.
    fn file_offset_of(&self, phdrs: &[ProgramHeader], vaddr: u64) -> Option<u64> {
        phdrs.iter().filter(|p| p.p_type == PT_LOAD).find_map(|p| {
            let delta = vaddr.checked_sub(p.vaddr)?;
            (delta < p.filesz).then(|| p.offset.checked_add(delta)).flatten()
        })
    }

    pub(crate) fn dynamic_info(&self) -> Result<DynamicInfo, ParseError> {
        let phdrs = self.program_headers()?;
        let mut info = DynamicInfo::default();
        if let Some(interp) = phdrs.iter().find(|p| p.p_type == PT_INTERP) {
            let bytes = slice_at(self.data, interp.offset, interp.filesz)
                .ok_or_else(|| malformed("PT_INTERP lies outside the file"))?;
            let path = bytes.split(|&b| b == 0).next().unwrap_or(&[]);
            if path.is_empty() {
                return Err(malformed("PT_INTERP is empty"));
            }
            info.interpreter = Some(bytes_to_path(path));
        }
        let Some(dynamic) = phdrs.iter().find(|p| p.p_type == PT_DYNAMIC) else {
            return Ok(info);
        };
        let table = slice_at(self.data, dynamic.offset, dynamic.filesz)
            .ok_or_else(|| malformed("PT_DYNAMIC lies outside the file"))?;
        let (mut strtab, mut strsz) = (None, None);
        let (mut needed, mut rpath, mut runpath) = (Vec::new(), None, None);
        for entry in table.chunks_exact(DYN_SIZE) {
            let tag = u64_at(entry, 0).unwrap_or(DT_NULL);
            let value = u64_at(entry, 8).unwrap_or(0);
            match tag {
                DT_NULL => break,
                DT_NEEDED => needed.push(value),
                DT_STRTAB => strtab = Some(value),
                DT_STRSZ => strsz = Some(value),
                DT_RPATH => rpath = Some(value),
                DT_RUNPATH => runpath = Some(value),
                _ => {}
            }
        }
        if needed.is_empty() && rpath.is_none() && runpath.is_none() {
            return Ok(info);
        }
        let strtab = strtab.ok_or_else(|| malformed("dynamic section has no DT_STRTAB"))?;
        let strtab_offset = self
            .file_offset_of(&phdrs, strtab)
            .ok_or_else(|| malformed(format!("DT_STRTAB address {strtab:#x} is in no PT_LOAD segment")))?;
        // Without DT_STRSZ the table runs to the end of the file; c_str_at still stops at NUL.
        let strings = match strsz {
            Some(size) => slice_at(self.data, strtab_offset, size),
            None => usize::try_from(strtab_offset).ok().and_then(|o| self.data.get(o..)),
        }
        .ok_or_else(|| malformed("dynamic string table lies outside the file"))?;
        let string = |offset: u64, what: &str| {
            c_str_at(strings, offset)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| malformed(format!("{what} string at {offset:#x} lies outside the string table")))
        };
        for offset in needed {
            let name = string(offset, "DT_NEEDED")?;
            info.needed.push(String::from_utf8(name).map_err(|_| malformed("DT_NEEDED is not UTF-8"))?);
        }
        // glibc ignores DT_RPATH when DT_RUNPATH is present.
        let search = match (runpath, rpath) {
            (Some(offset), _) => Some(string(offset, "DT_RUNPATH")?),
            (None, Some(offset)) => Some(string(offset, "DT_RPATH")?),
            (None, None) => None,
        };
        if let Some(search) = search {
            info.search_path = search.split(|&b| b == b':').filter(|dir| !dir.is_empty()).map(bytes_to_path).collect();
        }
        Ok(info)
    }
}

fn bytes_to_path(bytes: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct DynamicInfo {
    pub interpreter: Option<PathBuf>,
    pub needed: Vec<String>,
    /// DT_RUNPATH (or DT_RPATH when there is no DT_RUNPATH), still with `$ORIGIN` in it.
    pub search_path: Vec<PathBuf>,
}

fn read_file(path: &Path) -> Result<Vec<u8>, ElfError> {
    std::fs::read(path).map_err(|source| ElfError::Read { path: path.to_path_buf(), source })
}

struct Object {
    machine: u16,
    info: DynamicInfo,
}

fn read_object(path: &Path) -> Result<Object, ElfError> {
    let data = read_file(path)?;
    let elf = Elf::parse(&data).map_err(|e| e.at(path))?;
    let info = elf.dynamic_info().map_err(|e| e.at(path))?;
    Ok(Object { machine: elf.machine, info })
}

/// Expands `$ORIGIN`/`${ORIGIN}` against the folder of the (symlink-resolved) object, as
/// ld.so does; Nix-built binaries rely on RUNPATH, sometimes relative to $ORIGIN.
fn expand_origin(dir: &Path, object: &Path) -> PathBuf {
    let text = dir.to_string_lossy();
    if !text.contains("$ORIGIN") && !text.contains("${ORIGIN}") {
        return dir.to_path_buf();
    }
    let real = std::fs::canonicalize(object).unwrap_or_else(|_| object.to_path_buf());
    let origin = real.parent().unwrap_or(Path::new("/")).to_string_lossy().into_owned();
    PathBuf::from(text.replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin))
}

/// The files a dynamically linked `binary` needs at run time: its interpreter (the PT_INTERP
/// path as written in the binary) first, then every shared library reachable through
/// DT_NEEDED, breadth-first in DT_NEEDED order.
///
/// Each library is looked up in the needing object's RUNPATH/RPATH, then in `lib_dirs` in
/// order (see [`DEFAULT_LIB_DIRS`]); a candidate built for another machine is skipped, as
/// ld.so skips it. The path returned for a library is the one the loader will open
/// (`lib_dir/soname`), which may be a symlink on the host: it is followed to read the real
/// file, and two names of the same real file are returned once. A static binary yields an
/// empty list.
pub fn elf_closure(binary: &Path, lib_dirs: &[PathBuf]) -> Result<Vec<PathBuf>, ElfError> {
    let root = read_object(binary)?;
    let mut closure = Vec::new();
    let mut seen_files = HashSet::new();
    if let Some(interpreter) = &root.info.interpreter {
        let real = std::fs::canonicalize(interpreter).map_err(|source| ElfError::InterpreterMissing {
            interpreter: interpreter.clone(),
            binary: binary.to_path_buf(),
            source,
        })?;
        seen_files.insert(real);
        closure.push(interpreter.clone());
    }
    let machine = root.machine;
    let mut resolved_names: HashSet<String> = HashSet::new();
    let mut queue = VecDeque::from([(binary.to_path_buf(), root.info)]);
    while let Some((object_path, info)) = queue.pop_front() {
        for name in &info.needed {
            if !resolved_names.insert(name.clone()) {
                continue;
            }
            let mut searched: Vec<PathBuf> =
                info.search_path.iter().map(|dir| expand_origin(dir, &object_path)).collect();
            searched.extend(lib_dirs.iter().cloned());
            let found = if name.contains('/') {
                // A DT_NEEDED with a slash is a path, used as it is, like ld.so does.
                let path = PathBuf::from(name);
                match path.exists() {
                    true => Some((path.clone(), read_object(&path)?)),
                    false => None,
                }
            } else {
                find_library(name, &searched, machine)?
            };
            let Some((path, object)) = found else {
                return Err(ElfError::LibraryNotFound {
                    library: name.clone(),
                    needed_by: object_path.clone(),
                    searched,
                });
            };
            let real = std::fs::canonicalize(&path).map_err(|source| ElfError::Read { path: path.clone(), source })?;
            if seen_files.insert(real) {
                closure.push(path.clone());
                queue.push_back((path, object.info));
            }
        }
    }
    Ok(closure)
}

/// The first `dir/name` that is an ELF object for `machine`, with its dynamic information.
fn find_library(name: &str, dirs: &[PathBuf], machine: u16) -> Result<Option<(PathBuf, Object)>, ElfError> {
    for dir in dirs {
        let candidate = dir.join(name);
        if !candidate.is_file() {
            continue;
        }
        let data = read_file(&candidate)?;
        let elf = match Elf::parse(&data) {
            Ok(elf) => elf,
            // ld.so also skips files it cannot use and keeps searching.
            Err(ParseError::NotElf | ParseError::Unsupported(_)) => continue,
            Err(error) => return Err(error.at(&candidate)),
        };
        if elf.machine != machine {
            continue;
        }
        let info = elf.dynamic_info().map_err(|e| e.at(&candidate))?;
        return Ok(Some((candidate, Object { machine: elf.machine, info })));
    }
    Ok(None)
}
