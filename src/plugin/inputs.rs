//! What every derivation the plugin makes names besides the user's values: the builder, the
//! tools closure (with its libraries) and the VMs' kernel. Each is a store path known before
//! evaluation, so that evaluation reads no host path and works in pure mode (flakes):
//!
//! - **Recorded** (`nix-winvm.paths.json` beside the plugin): nix/package.nix writes it with its
//!   own closure's paths; on Debian, scripts/register puts the patched builder, the closure and
//!   the kernel into the store and writes it. The shim gives each path its context without
//!   `builtins.storePath`, after asking the store whether it is valid.
//! - **Discovered** (no record, or `NIX_WINVM_BUILDER` set, as the tests do): the builder next
//!   to the plugin, patched here, and the kernel folder are host paths that only an impure
//!   evaluation may copy into the store; pure evaluation refuses them with the way to register.

/// The builder's file name, beside the plugin and in its store path.
pub const BUILDER_NAME: &str = "nix-winvm-builder";
use crate::spec::{DEFAULT_CACHE, STORE_DIR};
use serde::Deserialize;
use std::io;
use std::path::{Path, PathBuf};

/// Why the plugin cannot name what its derivations need.
#[derive(Debug, thiserror::Error)]
pub enum InputsError {
    #[error("nix-winvm: the record of store paths {} cannot be read: {error}", .file.display())]
    RecordUnreadable { file: PathBuf, error: io::Error },
    #[error("nix-winvm: the record of store paths {} is not valid: {error}", .file.display())]
    RecordInvalid { file: PathBuf, error: serde_json::Error },
    #[error("nix-winvm: the record of store paths {} names {what} as {path}, which is not a path in {STORE_DIR}", .file.display())]
    RecordOutsideStore { file: PathBuf, what: &'static str, path: String },
    #[error("nix-winvm: the builder {} does not exist; build it (cargo build --release) or set NIX_WINVM_BUILDER", .0.display())]
    NoBuilder(PathBuf),
    #[error("nix-winvm: the Linux kernel for the VMs is missing ({}/vmlinuz); {}", .dir.display(), .set_up.kernel_fix())]
    NoKernel { dir: PathBuf, set_up: SetUp },
    #[error("nix-winvm: the tools closure is missing or incomplete ({}: {problem}); {}", .dir.display(), .set_up.closure_fix())]
    Closure { dir: PathBuf, problem: ClosureProblem, set_up: SetUp },
    #[error("nix-winvm: preparing the builder {} for the sandbox: {step}", .builder.display())]
    PatchBuilder { builder: PathBuf, step: PatchStep },
}

/// How the plugin's host was set up, which decides what a missing kernel's or closure's error
/// says to do: scripts/setup exists and works only on Debian, for a plugin built from the
/// checkout (scripts/register records its paths); a plugin of nix/package.nix records its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetUp {
    Debian,
    /// Another system (NixOS, another distribution), or a plugin in the Nix store.
    Other,
}

impl SetUp {
    /// The set-up of the plugin in `plugin_dir` on this host.
    pub fn of(plugin_dir: &Path) -> SetUp {
        if Path::new(crate::tools::DEBIAN_VERSION).is_file() && !plugin_dir.starts_with(STORE_DIR) {
            SetUp::Debian
        } else {
            SetUp::Other
        }
    }

    fn kernel_fix(self) -> &'static str {
        match self {
            SetUp::Debian => "run scripts/setup or set NIX_WINVM_KERNEL_DIR",
            SetUp::Other => "set NIX_WINVM_KERNEL_DIR to a folder with vmlinuz, modules/ and version (nix/package.nix's winvmKernel), or use the Nix package of nix-winvm, which records its own (on NixOS: `nix-winvm.enable = true;`, nix/module.nix)",
        }
    }

    fn closure_fix(self) -> &'static str {
        match self {
            SetUp::Debian => "run scripts/setup, or set NIX_WINVM_TOOLS_DIR",
            SetUp::Other => "set NIX_WINVM_TOOLS_DIR to a closure scripts/tools-closure made, or use the Nix package of nix-winvm, which records its own tools (on NixOS: `nix-winvm.enable = true;`, nix/module.nix)",
        }
    }
}

/// What is wrong with the tools closure's folder.
#[derive(Debug, thiserror::Error)]
pub enum ClosureProblem {
    #[error("{file}: {error}")]
    Unreadable { file: &'static str, error: io::Error },
    #[error("{file} does not hold a store path named {name}")]
    NotAStorePath { file: &'static str, name: &'static str },
    #[error("{} is not a folder", .0.display())]
    NotAFolder(PathBuf),
}

/// The step of patching the builder that failed.
#[derive(Debug, thiserror::Error)]
pub enum PatchStep {
    #[error("{0}")]
    Stat(io::Error),
    #[error("creating {}: {error}", .dir.display())]
    CreateDir { dir: PathBuf, error: io::Error },
    #[error("creating a file in {}: {error}", .dir.display())]
    CreateFile { dir: PathBuf, error: io::Error },
    #[error("copying it: {0}")]
    Copy(io::Error),
    #[error("running {}: {error}", .patchelf.display())]
    Run { patchelf: PathBuf, error: io::Error },
    /// patchelf's own words, from its stderr.
    #[error("patchelf: {0}")]
    Patchelf(String),
    #[error("renaming into {}: {error}", .out.display())]
    Rename { out: PathBuf, error: io::Error },
}

/// The record's file name, in the plugin's own folder.
pub const RECORD: &str = "nix-winvm.paths.json";

/// One thing a derivation names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInput {
    /// What it is, for errors ("the builder").
    pub what: &'static str,
    /// The path the derivation gets: a store path, or a file inside one (a package's
    /// `bin/nix-winvm-builder`). None when it is known only as a host path.
    pub path: Option<String>,
    /// A host copy of it. Impure evaluation copies it into a store that lacks `path`; the copy is
    /// content-addressed, so it gives `path` again.
    pub host: Option<PathBuf>,
    /// The command that registers it, named in the error a pure evaluation gives.
    pub fix: String,
}

impl StoreInput {
    /// The store path itself: `/nix/store/<hash>-<name>`, without a path inside it.
    pub fn root(&self) -> Option<String> {
        let path = self.path.as_deref()?;
        let rest = path.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
        let name = rest.split('/').next().filter(|n| !n.is_empty())?;
        Some(format!("{STORE_DIR}/{name}"))
    }

    /// The evaluation error when the store lacks the path and the evaluation may not copy it.
    pub fn missing(&self) -> String {
        match (self.root(), &self.host) {
            (Some(root), Some(host)) => format!(
                "nix-winvm: {} {root} is not in this Nix store, and pure evaluation may not copy it from {}; {}",
                self.what,
                host.display(),
                self.fix
            ),
            (Some(root), None) => format!(
                "nix-winvm: {} {root} is not in this Nix store; it is part of the plugin's package, so copy the package's closure into this store (nix copy) or install the package again",
                self.what
            ),
            (None, Some(host)) => format!(
                "nix-winvm: {} is known only as the host path {}, which pure evaluation may not read; {}",
                self.what,
                host.display(),
                self.fix
            ),
            (None, None) => format!("nix-winvm: {} has neither a store path nor a host path; {}", self.what, self.fix),
        }
    }
}

/// Where the plugin finds the host things its derivations need.
#[derive(Debug, Clone)]
pub struct Env {
    pub builder: StoreInput,
    /// None only for a Nix-built builder without a closure (it finds its tools on its own).
    pub tools: Option<StoreInput>,
    /// The closure's libraries and loader (Debian's closure; nixpkgs' programs need none).
    pub tools_lib: Option<StoreInput>,
    /// The VMs' kernel: `vmlinuz`, `modules/`, `version`.
    pub kernel: StoreInput,
}

/// The record nix/package.nix and scripts/register write (see the module's doc).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Record {
    builder: RecordedPath,
    tools: RecordedPath,
    #[serde(default)]
    tools_lib: Option<RecordedPath>,
    kernel: RecordedPath,
    /// The size and modification time of the builder next to the plugin when it was registered:
    /// a builder rebuilt since makes the record stale.
    #[serde(default)]
    builder_source: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordedPath {
    path: String,
    #[serde(default)]
    host: Option<PathBuf>,
}

/// The tools closure: its folders on the host and the store paths they are (content-addressed,
/// so the same in every store). scripts/tools-closure makes both halves from Debian's packages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closure {
    /// The library folder and its store path.
    pub lib: (PathBuf, String),
    pub tools_dir: PathBuf,
    pub tools_store: String,
}

/// The closure's loader: the builder's interpreter.
const LOADER: &str = "ld-linux-x86-64.so.2";

fn is_store_path(path: &str, name: Option<&str>) -> bool {
    let Some(base) = path.strip_prefix("/nix/store/") else { return false };
    base.len() > 33
        && name.map_or(true, |n| base.len() == 33 + n.len() && base.ends_with(n))
        && base.as_bytes()[32] == b'-'
        && base[..32].bytes().all(|b| b.is_ascii_alphanumeric())
}

impl Closure {
    /// The closure scripts/tools-closure left in `dir`; its error says what to do on `set_up`.
    pub fn read(dir: &Path, set_up: SetUp) -> Result<Closure, InputsError> {
        let missing = |problem| InputsError::Closure { dir: dir.to_owned(), problem, set_up };
        let store_path = |file: &'static str, name: &'static str| -> Result<String, InputsError> {
            let text = std::fs::read_to_string(dir.join(file))
                .map_err(|error| missing(ClosureProblem::Unreadable { file, error }))?;
            let path = text.trim();
            if is_store_path(path, Some(name)) {
                Ok(path.to_owned())
            } else {
                Err(missing(ClosureProblem::NotAStorePath { file, name }))
            }
        };
        let tools_store = store_path("tools.path", "winvm-tools")?;
        let tools_dir = dir.join("winvm-tools");
        let lib = (dir.join("winvm-tools-lib"), store_path("lib.path", "winvm-tools-lib")?);
        for d in [&lib.0, &tools_dir] {
            if !d.is_dir() {
                return Err(missing(ClosureProblem::NotAFolder(d.clone())));
            }
        }
        Ok(Closure { lib, tools_dir, tools_store })
    }
}

/// What scripts/register compares: the builder's size and modification time.
pub fn source_key(builder: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(builder).ok()?;
    Some(format!("{}-{}.{:09}", m.size(), m.mtime(), m.mtime_nsec()))
}

fn register_fix(plugin_dir: &Path) -> String {
    format!("run scripts/register {} to put it in the store and record it beside the plugin", plugin_dir.display())
}

impl Env {
    /// The record beside the plugin when there is one and it is current; otherwise the host
    /// paths next to the plugin and in the set-up's cache (see the module's doc).
    pub fn discover(plugin_dir: &str) -> Result<Env, InputsError> {
        let dir = Path::new(plugin_dir);
        let record = dir.join(RECORD);
        if std::env::var_os("NIX_WINVM_BUILDER").is_none() && record.exists() {
            if let Some(env) = Env::recorded(&record, dir)? {
                return Ok(env);
            }
        }
        Env::discovered(dir)
    }

    /// The record at `file`; None when it is stale (the builder beside it was rebuilt).
    pub fn recorded(file: &Path, plugin_dir: &Path) -> Result<Option<Env>, InputsError> {
        let text = std::fs::read_to_string(file)
            .map_err(|error| InputsError::RecordUnreadable { file: file.to_owned(), error })?;
        let r: Record =
            serde_json::from_str(&text).map_err(|error| InputsError::RecordInvalid { file: file.to_owned(), error })?;
        if let Some(key) = &r.builder_source {
            if source_key(&plugin_dir.join(BUILDER_NAME)).as_ref() != Some(key) {
                return Ok(None);
            }
        }
        let fix = register_fix(plugin_dir);
        let input = |what: &'static str, p: RecordedPath| -> Result<StoreInput, InputsError> {
            let input = StoreInput { what, path: Some(p.path), host: p.host, fix: fix.clone() };
            match input.root() {
                Some(root) if is_store_path(&root, None) => Ok(input),
                _ => Err(InputsError::RecordOutsideStore {
                    file: file.to_owned(),
                    what,
                    path: input.path.unwrap_or_default(),
                }),
            }
        };
        Ok(Some(Env {
            builder: input("the builder", r.builder)?,
            tools: Some(input("the tools closure", r.tools)?),
            tools_lib: r.tools_lib.map(|p| input("the tools closure's libraries", p)).transpose()?,
            kernel: input("the VMs' kernel", r.kernel)?,
        }))
    }

    /// The builder next to the plugin (or `NIX_WINVM_BUILDER`), the closure in
    /// `NIX_WINVM_TOOLS_DIR` or the cache, the kernel in `NIX_WINVM_KERNEL_DIR` or the cache.
    fn discovered(plugin_dir: &Path) -> Result<Env, InputsError> {
        let from_env = |var: &str, default: PathBuf| std::env::var_os(var).map(PathBuf::from).unwrap_or(default);
        let cache = Path::new(DEFAULT_CACHE);
        Env::discovered_at(
            plugin_dir,
            &from_env("NIX_WINVM_BUILDER", plugin_dir.join(BUILDER_NAME)),
            &from_env("NIX_WINVM_KERNEL_DIR", cache.join("kernel")),
            &from_env("NIX_WINVM_TOOLS_DIR", cache.join("tools")),
        )
    }

    pub fn discovered_at(
        plugin_dir: &Path,
        builder: &Path,
        kernel_dir: &Path,
        tools_dir: &Path,
    ) -> Result<Env, InputsError> {
        if !builder.is_file() {
            return Err(InputsError::NoBuilder(builder.to_owned()));
        }
        if !kernel_dir.join("vmlinuz").is_file() {
            return Err(InputsError::NoKernel { dir: kernel_dir.to_owned(), set_up: SetUp::of(plugin_dir) });
        }
        let fix = register_fix(plugin_dir);
        let in_store = builder.starts_with(STORE_DIR);
        let closure = match Closure::read(tools_dir, SetUp::of(plugin_dir)) {
            Ok(closure) => Some(closure),
            Err(_) if in_store => None,
            Err(e) => return Err(e),
        };
        let builder = match &closure {
            Some(c) if !in_store => StoreInput {
                what: "the builder",
                path: None,
                host: Some(patched_builder(builder, c)?),
                fix: fix.clone(),
            },
            _ => StoreInput {
                what: "the builder",
                path: Some(builder.display().to_string()),
                host: None,
                fix: fix.clone(),
            },
        };
        let folder = |what: &'static str, store: &str, dir: &Path| StoreInput {
            what,
            path: Some(store.to_owned()),
            host: Some(dir.to_owned()),
            fix: fix.clone(),
        };
        Ok(Env {
            builder,
            tools: closure.as_ref().map(|c| folder("the tools closure", &c.tools_store, &c.tools_dir)),
            tools_lib: closure.as_ref().map(|c| folder("the tools closure's libraries", &c.lib.1, &c.lib.0)),
            kernel: StoreInput { what: "the VMs' kernel", path: None, host: Some(kernel_dir.to_owned()), fix },
        })
    }
}

/// Where the plugin keeps the builders it patched: the shared cache, and the user's own for a
/// user who may not write there.
fn patched_builders_dirs() -> [PathBuf; 2] {
    let home = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    [Path::new(DEFAULT_CACHE).join("builders"), home.join("nix-winvm/builders")]
}

/// How many patched builders are kept (one per build of this project).
const KEPT_BUILDERS: usize = 4;

/// A copy of `builder` whose interpreter and RUNPATH are the closure's, so that it runs in a
/// sandbox without the host's /lib; made once per builder (its inode, size and mtime) and
/// closure.
pub fn patched_builder(builder: &Path, closure: &Closure) -> Result<PathBuf, InputsError> {
    use std::os::unix::fs::MetadataExt;
    let fail = |step| InputsError::PatchBuilder { builder: builder.to_owned(), step };
    let (lib_dir, lib_store) = &closure.lib;
    let meta = std::fs::metadata(builder).map_err(|e| fail(PatchStep::Stat(e)))?;
    let lib_hash = lib_store.trim_start_matches("/nix/store/").get(..12).unwrap_or("");
    let key = format!("{lib_hash}-{:x}-{:x}-{}.{}", meta.ino(), meta.size(), meta.mtime(), meta.mtime_nsec());
    // Every evaluation looks here: a made builder is found without writing anything.
    let [shared, own] = patched_builders_dirs();
    for dir in [&shared, &own] {
        let made = dir.join(&key).join(BUILDER_NAME);
        if made.is_file() {
            return Ok(made);
        }
    }
    let writable = std::fs::create_dir_all(&shared).is_ok() && tempfile::tempfile_in(&shared).is_ok();
    let root = if writable { shared } else { own };
    let out = root.join(&key).join(BUILDER_NAME);
    // The closure's patchelf, through the closure's loader: its store path need not exist yet.
    let loader = lib_dir.join(LOADER);
    let patchelf = closure.tools_dir.join("bin/patchelf");
    let dir = root.join(&key);
    std::fs::create_dir_all(&dir).map_err(|error| fail(PatchStep::CreateDir { dir: dir.clone(), error }))?;
    // Evaluations may patch the same builder at once: each in its own file, renamed into place.
    let tmp = tempfile::Builder::new()
        .prefix(".partial")
        .tempfile_in(&dir)
        .map_err(|error| fail(PatchStep::CreateFile { dir: dir.clone(), error }))?
        .into_temp_path();
    std::fs::copy(builder, &tmp).map_err(|e| fail(PatchStep::Copy(e)))?;
    let o = std::process::Command::new(&loader)
        .arg("--library-path")
        .arg(lib_dir)
        .arg(&patchelf)
        .arg("--set-interpreter")
        .arg(format!("{}/{LOADER}", lib_store))
        .arg("--set-rpath")
        .arg(lib_store)
        .arg(&tmp)
        .output()
        .map_err(|error| fail(PatchStep::Run { patchelf: patchelf.clone(), error }))?;
    if !o.status.success() {
        return Err(fail(PatchStep::Patchelf(String::from_utf8_lossy(&o.stderr).trim().to_owned())));
    }
    tmp.persist(&out).map_err(|e| fail(PatchStep::Rename { out: out.clone(), error: e.error }))?;
    prune_builders(&root);
    Ok(out)
}

/// Keeps the newest few patched builders.
fn prune_builders(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> =
        entries.flatten().filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path()))).collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(KEPT_BUILDERS);
    for (_, dir) in dirs.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(dir);
    }
}
