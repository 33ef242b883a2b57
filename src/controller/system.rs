//! The system disk of a controller saved ready to serve: a read-only ext2 file system with
//! smbd, this program (the agent) and the libraries both load, at the store paths they have in
//! a build, plus the agent's [`ReadyConfig`] and the image's key. smbd and the agent run from
//! it before the pair is saved; a disk, unlike 9p, does not stop QEMU from migrating the VM,
//! and only the pages they touched are in the saved memory (an initramfs would put all of
//! Samba's libraries there).

use crate::protocol::{ReadyConfig, READY_AGENT, READY_CONFIG, READY_KEY, READY_STORE, READY_XCHG};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Making the system disk failed at the step it names.
#[derive(Debug, thiserror::Error)]
#[error("making the controller's system disk: {what}: {detail}")]
pub struct SystemDiskError {
    pub what: String,
    pub detail: String,
}

fn err<E: fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> SystemDiskError {
    let what = what.into();
    move |e| SystemDiskError { what, detail: e.to_string() }
}

/// What goes on the disk: whole store paths (a folder or a file each) at their own paths.
pub struct SystemInputs<'a> {
    /// The tools' library folder, the smbd program and the builder: store paths.
    pub store_paths: &'a [PathBuf],
    /// The agent: a store path among `store_paths`, linked from [`READY_AGENT`].
    pub agent: &'a Path,
    pub key: &'a Path,
    pub config: &'a ReadyConfig,
    pub mke2fs: &'a Path,
    /// A scratch folder (removed afterwards).
    pub staging: &'a Path,
}

/// Every file's time on the disk: the disk is the same for the same inputs.
const FIXED_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// Writes the disk image to `out`.
pub fn write(inputs: &SystemInputs, out: &Path) -> Result<(), SystemDiskError> {
    let root = inputs.staging;
    std::fs::create_dir_all(root).map_err(err(format!("creating {}", root.display())))?;
    let result = stage_and_format(inputs, root, out);
    let _ = std::fs::remove_dir_all(root);
    result
}

fn stage_and_format(inputs: &SystemInputs, root: &Path, out: &Path) -> Result<(), SystemDiskError> {
    let under = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    for dir in ["/run", "/tmp", "/proc", "/dev", "/etc/winvm", READY_STORE, READY_XCHG] {
        std::fs::create_dir_all(under(Path::new(dir))).map_err(err(format!("creating {dir}")))?;
    }
    for p in inputs.store_paths {
        copy_tree(p, &under(p))?;
    }
    // smbd looks its unix users up: root (the username map makes the guests' account root)
    // and its guest account, nobody, which it sets up even when no share allows guests.
    let passwd = b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n";
    write_file(&under(Path::new("/etc/passwd")), passwd, 0o644)?;
    write_file(&under(Path::new("/etc/group")), b"root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    let key = std::fs::read(inputs.key).map_err(err(format!("reading {}", inputs.key.display())))?;
    write_file(&under(Path::new(READY_KEY)), &key, 0o600)?;
    let json = serde_json::to_vec_pretty(inputs.config).map_err(err("the agent's ready configuration"))?;
    write_file(&under(Path::new(READY_CONFIG)), &json, 0o644)?;
    std::os::unix::fs::symlink(inputs.agent, under(Path::new(READY_AGENT))).map_err(err("linking the agent"))?;
    fix_times(root)?;
    let bytes = tree_size(root)?;
    // Room for the file system's own blocks; the disk is read-only.
    let size_kib = (bytes / 1024) * 5 / 4 + 8 * 1024;
    let _ = std::fs::remove_file(out);
    let output = Command::new(inputs.mke2fs)
        .args(["-q", "-F", "-t", "ext2", "-b", "4096", "-I", "256", "-m", "0", "-L", "winvm-controller"])
        .args(["-U", "6e69782d-7769-6e76-6d2d-636f6e74726c"])
        .args(["-E", "root_owner=0:0,hash_seed=6e69782d-7769-6e76-6d2d-636f6e74726c"])
        .arg("-d")
        .arg(root)
        .arg(out)
        .arg(format!("{size_kib}k"))
        // No /etc/mke2fs.conf in a sandbox: the defaults built into mke2fs, the same everywhere.
        .env("MKE2FS_CONFIG", "/dev/null")
        .env("E2FSPROGS_FAKE_TIME", FIXED_TIME.as_secs().to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(err(format!("running {}", inputs.mke2fs.display())))?;
    if !output.status.success() {
        return Err(SystemDiskError {
            what: format!("{} -d", inputs.mke2fs.display()),
            detail: format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim()),
        });
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SystemDiskError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes).map_err(err(format!("writing {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(err(format!("chmod {}", path.display())))
}

/// Copies a file, a link or a folder, with modes (made writable for the owner in the staging
/// copy, as store paths are read-only).
fn copy_tree(from: &Path, to: &Path) -> Result<(), SystemDiskError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(from).map_err(err(format!("reading {}", from.display())))?;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(err(format!("creating {}", parent.display())))?;
    }
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(from).map_err(err(format!("reading {}", from.display())))?;
        std::os::unix::fs::symlink(target, to).map_err(err(format!("linking {}", to.display())))?;
    } else if meta.is_dir() {
        std::fs::create_dir_all(to).map_err(err(format!("creating {}", to.display())))?;
        for entry in std::fs::read_dir(from).map_err(err(format!("reading {}", from.display())))? {
            let entry = entry.map_err(err(format!("reading {}", from.display())))?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.permissions().mode() | 0o700))
            .map_err(err(format!("chmod {}", to.display())))?;
    } else {
        std::fs::copy(from, to).map_err(err(format!("copying {}", from.display())))?;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.permissions().mode() | 0o200))
            .map_err(err(format!("chmod {}", to.display())))?;
    }
    Ok(())
}

fn fix_times(path: &Path) -> Result<(), SystemDiskError> {
    let meta = std::fs::symlink_metadata(path).map_err(err(format!("reading {}", path.display())))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(err(format!("reading {}", path.display())))? {
            fix_times(&entry.map_err(err(format!("reading {}", path.display())))?.path())?;
        }
    }
    let t = std::time::UNIX_EPOCH + FIXED_TIME;
    let times = std::fs::FileTimes::new().set_accessed(t).set_modified(t);
    let file = std::fs::File::open(path).map_err(err(format!("opening {}", path.display())))?;
    file.set_times(times).map_err(err(format!("setting the times of {}", path.display())))
}

fn tree_size(path: &Path) -> Result<u64, SystemDiskError> {
    let meta = std::fs::symlink_metadata(path).map_err(err(format!("reading {}", path.display())))?;
    let mut total = meta.len().div_ceil(4096) * 4096 + 4096;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(err(format!("reading {}", path.display())))? {
            total += tree_size(&entry.map_err(err(format!("reading {}", path.display())))?.path())?;
        }
    }
    Ok(total)
}
