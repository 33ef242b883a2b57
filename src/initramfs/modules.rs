//! Which kernel modules to put in an initramfs, and in which order to load them.
//!
//! The modules folder is flat (`NAME.ko` files, no modules.dep): dependencies are read from
//! each module's own `.modinfo` section, the same `depends=` line depmod reads. A
//! `modules.builtin` file there (the kernel's own list, one `kernel/.../NAME.ko` a line) names
//! what the kernel has built in: such a module needs no file and is not loaded. Debian's kernel
//! builds the guests' drivers as modules; nixpkgs' kernel may build some of them in.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use super::closure::ElfError;
use crate::format::elf::Elf;

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("cannot list kernel modules in {}: {source}", dir.display())]
    ReadDir { dir: PathBuf, source: io::Error },
    /// Two files whose names are equal once '-' and '_' are treated alike.
    #[error("kernel module {module} is ambiguous: both {} and {} match", first.display(), second.display())]
    Ambiguous { module: String, first: PathBuf, second: PathBuf },
    #[error("kernel module {module} ({}) not found in {}{}", wanted_by(needed_by), dir.display(), decompress(compressed))]
    Missing {
        module: String,
        /// None when the caller asked for it directly.
        needed_by: Option<String>,
        dir: PathBuf,
        /// A compressed file of that name, which this reader does not unpack.
        compressed: Option<PathBuf>,
    },
    #[error("cannot read kernel module {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("kernel module {}: {what}", path.display())]
    BadModule { path: PathBuf, what: String },
    #[error("kernel module dependency cycle: {}", chain.join(" -> "))]
    Cycle { chain: Vec<String> },
}

/// `needed by PARENT`, or `requested` when the caller asked for the module directly.
fn wanted_by(needed_by: &Option<String>) -> String {
    match needed_by {
        Some(parent) => format!("needed by {parent}"),
        None => "requested".to_string(),
    }
}

/// The hint when only a compressed file of the module exists.
fn decompress(compressed: &Option<PathBuf>) -> String {
    compressed.as_ref().map(|c| format!("; only {} exists, decompress it first", c.display())).unwrap_or_default()
}

/// The kernel itself treats '-' and '_' in module names as the same character.
pub fn normalize_module_name(name: &str) -> String {
    name.replace('-', "_")
}

const COMPRESSED_SUFFIXES: &[&str] = &[".ko.xz", ".ko.zst", ".ko.gz"];

struct ModuleIndex {
    dir: PathBuf,
    modules: BTreeMap<String, PathBuf>,
    compressed: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

impl ModuleIndex {
    fn scan(dir: &Path) -> Result<ModuleIndex, ModuleError> {
        let read_dir_error = |source| ModuleError::ReadDir { dir: dir.to_path_buf(), source };
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_dir_error)? {
            entries.push(entry.map_err(read_dir_error)?.path());
        }
        // Sorted so that which of two ambiguous files is "first" does not depend on readdir.
        entries.sort();
        let mut index = ModuleIndex {
            dir: dir.to_path_buf(),
            modules: BTreeMap::new(),
            compressed: BTreeMap::new(),
            builtin: BTreeSet::new(),
        };
        for path in entries {
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if file_name == "modules.builtin" {
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| ModuleError::Read { path: path.clone(), source })?;
                index.builtin.extend(text.lines().filter_map(|line| {
                    let name = line.trim().rsplit('/').next()?.strip_suffix(".ko")?;
                    Some(normalize_module_name(name))
                }));
            } else if let Some(stem) = file_name.strip_suffix(".ko") {
                let module = normalize_module_name(stem);
                if let Some(first) = index.modules.get(&module) {
                    return Err(ModuleError::Ambiguous { module, first: first.clone(), second: path.clone() });
                }
                index.modules.insert(module, path);
            } else if let Some(stem) = COMPRESSED_SUFFIXES.iter().find_map(|suffix| file_name.strip_suffix(suffix)) {
                index.compressed.insert(normalize_module_name(stem), path);
            }
        }
        Ok(index)
    }

    /// The module's file; None when the kernel has it built in (and there is no file).
    fn lookup(&self, module: &str, needed_by: Option<&str>) -> Result<Option<&PathBuf>, ModuleError> {
        if let Some(path) = self.modules.get(module) {
            return Ok(Some(path));
        }
        if self.builtin.contains(module) {
            return Ok(None);
        }
        Err(ModuleError::Missing {
            module: module.to_string(),
            needed_by: needed_by.map(str::to_string),
            dir: self.dir.clone(),
            compressed: self.compressed.get(module).cloned(),
        })
    }
}

/// The `depends=` list of the module file at `path`, names normalized.
pub fn module_depends(path: &Path) -> Result<Vec<String>, ModuleError> {
    let data = std::fs::read(path).map_err(|source| ModuleError::Read { path: path.to_path_buf(), source })?;
    let bad = |what: String| ModuleError::BadModule { path: path.to_path_buf(), what };
    let elf = Elf::parse(&data).map_err(|e| bad(ElfError::parse(path, e).to_string()))?;
    let modinfo = elf
        .section_by_name(".modinfo")
        .map_err(|e| bad(ElfError::parse(path, e).to_string()))?
        .ok_or_else(|| bad("has no .modinfo section".to_string()))?;
    let mut depends = Vec::new();
    for entry in modinfo.split(|&b| b == 0) {
        if let Some(list) = entry.strip_prefix(b"depends=") {
            let list = std::str::from_utf8(list).map_err(|_| bad("its depends= entry is not UTF-8".to_string()))?;
            depends.extend(list.split(',').filter(|name| !name.is_empty()).map(normalize_module_name));
        }
    }
    Ok(depends)
}

/// The `.ko` files in `modules_dir` needed to load the `wanted` modules, in an order in which
/// `insmod` can load them one after the other: every module after all its dependencies.
///
/// Only hard dependencies (`depends=`) are followed. Soft dependencies (`softdep=`) name
/// aliases such as `aes` or `sha512` rather than files, so callers list those modules in
/// `wanted` themselves (cifs needs ctr, gcm, ghash_generic, ccm, cmac, sha512_generic).
/// Modules are found by file name (`NAME.ko`; a wanted name may carry the `.ko`), with '-'
/// and '_' interchangeable.
pub fn module_closure(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>, ModuleError> {
    let index = ModuleIndex::scan(modules_dir)?;
    let mut walk = Walk { index: &index, done: BTreeSet::new(), order: Vec::new() };
    for module in wanted {
        let module = normalize_module_name(module.strip_suffix(".ko").unwrap_or(module));
        walk.visit(&module, &mut Vec::new())?;
    }
    Ok(walk.order)
}

struct Walk<'a> {
    index: &'a ModuleIndex,
    /// Modules already placed in `order`.
    done: BTreeSet<String>,
    order: Vec<PathBuf>,
}

impl Walk<'_> {
    /// Depth-first, dependencies placed before their dependents; `chain` is the path from a
    /// wanted module down to `module`, for error messages and cycle detection.
    fn visit(&mut self, module: &str, chain: &mut Vec<String>) -> Result<(), ModuleError> {
        if self.done.contains(module) {
            return Ok(());
        }
        if let Some(start) = chain.iter().position(|m| m == module) {
            let mut cycle = chain[start..].to_vec();
            cycle.push(module.to_string());
            return Err(ModuleError::Cycle { chain: cycle });
        }
        let Some(path) = self.index.lookup(module, chain.last().map(String::as_str))?.cloned() else {
            self.done.insert(module.to_string());
            return Ok(());
        };
        let depends = module_depends(&path)?;
        chain.push(module.to_string());
        for dependency in &depends {
            self.visit(dependency, chain)?;
        }
        chain.pop();
        self.done.insert(module.to_string());
        self.order.push(path);
        Ok(())
    }
}
