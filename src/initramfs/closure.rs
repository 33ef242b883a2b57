//! The shared-library closure of a binary, as the loader would find it, read through
//! [`crate::format::elf`].

use std::collections::{HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};

use crate::format::elf::{DynamicInfo, Elf, ParseError};

/// Where the loader of a Debian/Ubuntu x86_64 system looks, in its order. `elf_closure` does
/// not read /etc/ld.so.cache: on the systems we build from these folders are what it lists.
pub const DEFAULT_LIB_DIRS: &[&str] =
    &["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib", "/lib"];

pub fn default_lib_dirs() -> Vec<PathBuf> {
    DEFAULT_LIB_DIRS.iter().map(PathBuf::from).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read ELF file {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is not an ELF file (no \\x7fELF magic)", path.display())]
    NotElf { path: PathBuf },
    #[error("{}: unsupported ELF file: {what}", path.display())]
    Unsupported { path: PathBuf, what: String },
    #[error("{}: malformed ELF file: {what}", path.display())]
    Malformed { path: PathBuf, what: String },
    #[error("interpreter {} of {} cannot be read: {source}", interpreter.display(), binary.display())]
    InterpreterMissing { interpreter: PathBuf, binary: PathBuf, source: io::Error },
    #[error("shared library {library} needed by {} not found in [{}]", needed_by.display(), dirs(searched))]
    LibraryNotFound { library: String, needed_by: PathBuf, searched: Vec<PathBuf> },
}

/// The folders searched, as `a, b, c`.
fn dirs(searched: &[PathBuf]) -> String {
    searched.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
}

impl ElfError {
    /// What the reader found wrong with the file at `path`.
    pub(crate) fn parse(path: &Path, error: ParseError) -> ElfError {
        let path = path.to_path_buf();
        match error {
            ParseError::NotElf => ElfError::NotElf { path },
            ParseError::Unsupported(what) => ElfError::Unsupported { path, what },
            ParseError::Malformed(what) => ElfError::Malformed { path, what },
        }
    }
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
    let elf = Elf::parse(&data).map_err(|e| ElfError::parse(path, e))?;
    let info = elf.dynamic_info().map_err(|e| ElfError::parse(path, e))?;
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
            Err(error) => return Err(ElfError::parse(&candidate, error)),
        };
        if elf.machine != machine {
            continue;
        }
        let info = elf.dynamic_info().map_err(|e| ElfError::parse(&candidate, e))?;
        return Ok(Some((candidate, Object { machine: elf.machine, info })));
    }
    Ok(None)
}
