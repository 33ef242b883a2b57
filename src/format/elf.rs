//! A minimal ELF64 little-endian reader: program headers (PT_INTERP, PT_LOAD, PT_DYNAMIC),
//! the dynamic section (DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_RPATH, DT_RUNPATH) and section
//! headers (for `.modinfo` in kernel modules). Every read is bounds-checked: the input is
//! whatever file the caller points at.

use std::path::PathBuf;

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

/// Why a byte buffer is not an ELF file this reader reads. Carries no path: callers add it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not an ELF file (no \\x7fELF magic)")]
    NotElf,
    #[error("unsupported ELF file: {0}")]
    Unsupported(String),
    #[error("malformed ELF file: {0}")]
    Malformed(String),
}

fn malformed(what: impl Into<String>) -> ParseError {
    ParseError::Malformed(what.into())
}

#[derive(Debug, Clone, Copy)]
pub struct ProgramHeader {
    pub p_type: u32,
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct SectionHeader {
    pub name: u32,
    pub offset: u64,
    pub size: u64,
    pub sh_type: u32,
}

const SHT_NOBITS: u32 = 8;

/// A validated view of an ELF64 little-endian file held in memory.
pub struct Elf<'a> {
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
    pub fn parse(data: &'a [u8]) -> Result<Elf<'a>, ParseError> {
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

    pub fn program_headers(&self) -> Result<Vec<ProgramHeader>, ParseError> {
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

    pub fn section_contents(&self, section: &SectionHeader) -> Result<&'a [u8], ParseError> {
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
    pub fn section_by_name(&self, name: &str) -> Result<Option<&'a [u8]>, ParseError> {
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

    pub fn dynamic_info(&self) -> Result<DynamicInfo, ParseError> {
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
pub struct DynamicInfo {
    pub interpreter: Option<PathBuf>,
    pub needed: Vec<String>,
    /// DT_RUNPATH (or DT_RPATH when there is no DT_RUNPATH), still with `$ORIGIN` in it.
    pub search_path: Vec<PathBuf>,
}
