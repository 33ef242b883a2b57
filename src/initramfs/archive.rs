//! An in-memory initramfs, written as the cpio "newc" archive ([`crate::format::cpio`]) the
//! Linux kernel unpacks into its rootfs at boot.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use super::closure::{default_lib_dirs, elf_closure, ElfError};
use crate::format::cpio::{self, S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG};

/// The kernel refuses longer names when it unpacks an initramfs.
const PATH_MAX: usize = 4096;
const IMPLICIT_DIR_MODE: u32 = 0o755;
const PERMISSION_BITS: u32 = 0o7777;

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("invalid initramfs path {path:?}: {reason}")]
    InvalidPath { path: PathBuf, reason: &'static str },
    #[error("initramfs path {}: mode {mode:#o} has bits outside 0o7777 (give permissions only)", path.display())]
    InvalidMode { path: PathBuf, mode: u32 },
    /// The path was already added as something else.
    #[error("initramfs path {} added twice: first as {existing}, then as {new}", path.display())]
    Conflict { path: PathBuf, existing: String, new: String },
    /// A parent of the path was added as something other than a directory.
    #[error("initramfs path {} cannot be added: its parent {} is not a directory", path.display(), parent.display())]
    NotADirectory { path: PathBuf, parent: PathBuf },
    #[error("initramfs file {} is {size} bytes; cpio newc holds at most 4 GiB - 1", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    #[error("cannot read {} for initramfs path {}: {source}", host_path.display(), archive_path.display())]
    ReadHost { archive_path: PathBuf, host_path: PathBuf, source: io::Error },
    #[error("cannot collect the libraries of initramfs binary {}: {source}", archive_path.display())]
    Elf { archive_path: PathBuf, source: ElfError },
}

/// Lets callers that deal in `io::Result` use `?` on the builder.
impl From<InitramfsError> for io::Error {
    fn from(error: InitramfsError) -> io::Error {
        let kind = match &error {
            InitramfsError::ReadHost { source, .. } => source.kind(),
            InitramfsError::Conflict { .. } => io::ErrorKind::AlreadyExists,
            _ => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, error)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// `implicit`: created as the parent of another path; an explicit `dir` may set its mode.
    Dir {
        implicit: bool,
    },
    File(Vec<u8>),
    Symlink(Vec<u8>),
    CharDev {
        major: u32,
        minor: u32,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    kind: Kind,
    mode: u32,
}

impl Entry {
    fn describe(&self) -> String {
        let what = match &self.kind {
            Kind::Dir { .. } => "a directory".to_string(),
            Kind::File(bytes) => format!("a {}-byte file", bytes.len()),
            Kind::Symlink(target) => {
                format!("a symlink to {}", String::from_utf8_lossy(target))
            }
            Kind::CharDev { major, minor } => format!("a character device {major}:{minor}"),
        };
        format!("{what} with mode {:04o}", self.mode)
    }

    fn file_type(&self) -> u32 {
        match self.kind {
            Kind::Dir { .. } => S_IFDIR,
            Kind::File(_) => S_IFREG,
            Kind::Symlink(_) => S_IFLNK,
            Kind::CharDev { .. } => S_IFCHR,
        }
    }

    fn data(&self) -> &[u8] {
        match &self.kind {
            Kind::File(bytes) | Kind::Symlink(bytes) => bytes,
            Kind::Dir { .. } | Kind::CharDev { .. } => &[],
        }
    }
}

/// The contents of an initramfs, written out as a cpio newc archive.
///
/// Paths are given as absolute or relative paths and stored relative to the archive root,
/// which is how the kernel and `cpio -i` expect them. Parent directories are created
/// implicitly (mode 0755) the first time a path under them is added; a later explicit `dir`
/// sets their mode.
///
/// Adding a path twice is an error, unless the second entry is identical to the first (so
/// binaries sharing libc can each bring their closure) or the first was an implicit parent
/// directory and the second is `dir`.
///
/// The archive is reproducible: entries are written sorted by path (so every parent precedes
/// its children, as the kernel needs), with mtime 0, uid/gid 0 and inode numbers 1, 2, 3...
/// in that order; the same set of entries gives the same bytes whatever order they were
/// added in.
#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    entries: BTreeMap<Vec<u8>, Entry>,
}

/// The archive name of `path`: its normal components joined by '/', without a leading '/'.
fn archive_name(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    let invalid = |reason| InitramfsError::InvalidPath { path: path.to_path_buf(), reason };
    let mut name = Vec::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => {
                if !name.is_empty() {
                    name.push(b'/');
                }
                name.extend_from_slice(part.as_bytes());
            }
            Component::ParentDir => return Err(invalid("'..' is not allowed")),
            Component::Prefix(_) => return Err(invalid("path prefixes are not allowed")),
        }
    }
    if name.is_empty() {
        return Err(invalid("it names the archive root"));
    }
    if name.contains(&0) {
        return Err(invalid("it contains a NUL byte"));
    }
    if name.len() >= PATH_MAX {
        return Err(invalid("it is longer than the kernel's PATH_MAX"));
    }
    Ok(name)
}

fn name_to_path(name: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(name))
}

impl Initramfs {
    pub fn new() -> Initramfs {
        Initramfs::default()
    }

    pub fn dir(&mut self, path: impl AsRef<Path>, mode: u32) -> Result<&mut Self, InitramfsError> {
        self.add(path.as_ref(), mode, Kind::Dir { implicit: false })
    }

    pub fn file(
        &mut self,
        path: impl AsRef<Path>,
        mode: u32,
        contents: impl Into<Vec<u8>>,
    ) -> Result<&mut Self, InitramfsError> {
        let path = path.as_ref();
        let contents = contents.into();
        if u32::try_from(contents.len()).is_err() {
            let size = contents.len() as u64;
            return Err(InitramfsError::TooLarge { path: path.to_path_buf(), size });
        }
        self.add(path, mode, Kind::File(contents))
    }

    /// Adds the contents of `host_path` (symlinks followed) as a regular file; `mode: None`
    /// takes the host file's permission bits.
    pub fn host_file(
        &mut self,
        archive_path: impl AsRef<Path>,
        host_path: impl AsRef<Path>,
        mode: Option<u32>,
    ) -> Result<&mut Self, InitramfsError> {
        let (archive_path, host_path) = (archive_path.as_ref(), host_path.as_ref());
        let read_error = |source| InitramfsError::ReadHost {
            archive_path: archive_path.to_path_buf(),
            host_path: host_path.to_path_buf(),
            source,
        };
        let mode = match mode {
            Some(mode) => mode,
            None => std::fs::metadata(host_path).map_err(read_error)?.permissions().mode() & PERMISSION_BITS,
        };
        let contents = std::fs::read(host_path).map_err(read_error)?;
        self.file(archive_path, mode, contents)
    }

    /// `target` is stored as given; relative targets resolve against the link's folder.
    pub fn symlink(&mut self, path: impl AsRef<Path>, target: impl AsRef<Path>) -> Result<&mut Self, InitramfsError> {
        let path = path.as_ref();
        let target = target.as_ref().as_os_str().as_bytes().to_vec();
        if target.is_empty() || target.contains(&0) {
            let reason = "a symlink target must be non-empty and free of NUL bytes";
            return Err(InitramfsError::InvalidPath { path: path.to_path_buf(), reason });
        }
        self.add(path, 0o777, Kind::Symlink(target))
    }

    pub fn char_dev(
        &mut self,
        path: impl AsRef<Path>,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, InitramfsError> {
        self.add(path.as_ref(), mode, Kind::CharDev { major, minor })
    }

    /// Adds the host binary at `archive_path` and its shared-library closure (see
    /// [`elf_closure`], default library folders) at the same absolute paths as on the host,
    /// as regular files; the interpreter goes to its PT_INTERP path.
    pub fn elf_with_libs(
        &mut self,
        archive_path: impl AsRef<Path>,
        host_binary: impl AsRef<Path>,
    ) -> Result<&mut Self, InitramfsError> {
        self.elf_with_libs_under("/", archive_path, host_binary)
    }

    /// Like [`Initramfs::elf_with_libs`], with the libraries placed under `root` too: for a
    /// system tree that an installer copies elsewhere.
    pub fn elf_with_libs_under(
        &mut self,
        root: impl AsRef<Path>,
        archive_path: impl AsRef<Path>,
        host_binary: impl AsRef<Path>,
    ) -> Result<&mut Self, InitramfsError> {
        let (root, archive_path, host_binary) = (root.as_ref(), archive_path.as_ref(), host_binary.as_ref());
        let closure = elf_closure(host_binary, &default_lib_dirs())
            .map_err(|source| InitramfsError::Elf { archive_path: archive_path.to_path_buf(), source })?;
        self.host_file(archive_path, host_binary, None)?;
        for library in closure {
            let inside = root.join(library.strip_prefix("/").unwrap_or(&library));
            self.host_file(&inside, &library, None)?;
        }
        Ok(self)
    }

    /// The archive's paths in the order they are written, without the trailer.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.entries.keys().map(|name| name_to_path(name)).collect()
    }

    fn add(&mut self, path: &Path, mode: u32, kind: Kind) -> Result<&mut Self, InitramfsError> {
        if mode & !PERMISSION_BITS != 0 {
            return Err(InitramfsError::InvalidMode { path: path.to_path_buf(), mode });
        }
        let name = archive_name(path)?;
        self.ensure_parents(path, &name)?;
        let new = Entry { kind, mode };
        match self.entries.get_mut(&name) {
            None => {
                self.entries.insert(name, new);
            }
            Some(existing) => match (&existing.kind, &new.kind) {
                (Kind::Dir { implicit: true }, Kind::Dir { .. }) => *existing = new,
                (old, _) if *old == new.kind && existing.mode == new.mode => {}
                _ => {
                    return Err(InitramfsError::Conflict {
                        path: name_to_path(&name),
                        existing: existing.describe(),
                        new: new.describe(),
                    })
                }
            },
        }
        Ok(self)
    }

    fn ensure_parents(&mut self, path: &Path, name: &[u8]) -> Result<(), InitramfsError> {
        let slashes = name.iter().enumerate().filter(|(_, &b)| b == b'/').map(|(i, _)| i);
        for end in slashes {
            let parent = &name[..end];
            match self.entries.get(parent) {
                None => {
                    let entry = Entry { kind: Kind::Dir { implicit: true }, mode: IMPLICIT_DIR_MODE };
                    self.entries.insert(parent.to_vec(), entry);
                }
                Some(Entry { kind: Kind::Dir { .. }, .. }) => {}
                Some(_) => {
                    return Err(InitramfsError::NotADirectory {
                        path: path.to_path_buf(),
                        parent: name_to_path(parent),
                    })
                }
            }
        }
        Ok(())
    }

    /// Writes the uncompressed archive, trailer included.
    pub fn write_cpio<W: Write>(&self, mut out: W) -> io::Result<()> {
        for (index, (name, entry)) in self.entries.iter().enumerate() {
            let (rdev_major, rdev_minor) = match entry.kind {
                Kind::CharDev { major, minor } => (major, minor),
                _ => (0, 0),
            };
            let header = cpio::Header {
                ino: u32::try_from(index + 1).unwrap_or(u32::MAX),
                mode: entry.file_type() | entry.mode,
                nlink: if matches!(entry.kind, Kind::Dir { .. }) { 2 } else { 1 },
                rdev_major,
                rdev_minor,
            };
            cpio::write_entry(&mut out, &header, name, entry.data())?;
        }
        cpio::write_trailer(&mut out)?;
        out.flush()
    }

    pub fn to_cpio(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = self.write_cpio(&mut bytes);
        bytes
    }

    /// Writes the archive gzip-compressed (no name, mtime 0 in the gzip header), which every
    /// kernel that can unpack an initramfs supports.
    pub fn write_gz<W: Write>(&self, out: W) -> io::Result<()> {
        let mut encoder = flate2::GzBuilder::new().mtime(0).write(out, flate2::Compression::default());
        self.write_cpio(&mut encoder)?;
        encoder.finish()?.flush()
    }

    /// The gzipped archive as the file `path`, as QEMU's `-initrd` takes it.
    pub fn write_gz_file(&self, path: &std::path::Path) -> io::Result<()> {
        let mut out = io::BufWriter::new(std::fs::File::create(path)?);
        self.write_gz(&mut out)?;
        out.flush()
    }
}
