//! The Windows guest's install media, as the media stage writes them into its output:
//!
//! | file | what |
//! | --- | --- |
//! | `autounattend.xml` | the answer file ([`answer::autounattend_xml`]) |
//! | `answer.img` | a 1.44 MB FAT12 floppy holding only `autounattend.xml` ([`fat::fat12_floppy`]) |
//! | `cygwin.img` | a raw disk: MBR, one FAT16/FAT32 partition at 1 MiB holding the marker, `install.cmd`, `bootstrap.sh`, `map-shares.sh` and, given a Cygwin repository, `setup-x86_64.exe` + `cygwin-packages/` |
//! | `install.cmd`, `bootstrap.sh`, `map-shares.sh` | the scripts, also as plain files: to read, and for the suspend stage, which runs `map-shares.sh` over SSH |
//! | `meta.json` | [`MediaSummary`] |
//! | `README.txt` | what these files are, and what is missing |
//!
//! `cygwin.img` is built with the real mtools (`mformat`, `mmd`, `mcopy`): FAT directories with
//! long names are mtools' job, and mtools honours `SOURCE_DATE_EPOCH`, so with every file
//! copied in sorted order the same inputs give the same bytes. The partition table is there
//! because Windows mounts partitions of fixed disks, not a bare file system on one.
//!
//! The media are built even without a Cygwin repository, so the answer file and scripts can be
//! inspected offline; the summary records the gap and [`ensure_ready_for_install`] refuses
//! such media. A repository is checked before it is copied: its setup.ini must parse, and
//! every archive of the closure the install needs (Base, [`REQUIRED_PACKAGES`], the image's
//! `cygwinPackages`) must be present with the size and, when `sha512sum` is available, the
//! SHA-512 setup.ini states. Cygwin's setup would otherwise find the gap in the guest, an hour
//! into a Windows install.
//!
//! [`install_drive_args`] gives the QEMU storage devices the install stage attaches.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use super::cygwin::{self, ClosureError, SetupIni, SetupIniError, LOCAL_SETUP_INI, REQUIRED_PACKAGES};
use super::fat::{self, FatError};
use super::{answer, media as names, scripts, WindowsOptions, WindowsOptionsError, DEFAULT_ADMIN_PASSWORD};
use crate::spec::{WindowsImageOptions, WINDOWS_DISK_SIZE_MIB};
use crate::tools::{self, MissingTool};

pub const AUTOUNATTEND_XML: &str = "autounattend.xml";
pub const ANSWER_IMG: &str = "answer.img";
pub const CYGWIN_IMG: &str = "cygwin.img";
pub const MAP_SHARES_SH: &str = "map-shares.sh";
pub const META_JSON: &str = "meta.json";
pub const README_TXT: &str = "README.txt";

/// Bumped when the layout of the media changes.
pub const MEDIA_FORMAT: u32 = 1;
pub const ANSWER_LABEL: &str = "NIXANSWER";
pub const CYGWIN_LABEL: &str = "NIXCYGWIN";
/// 2010-01-01 00:00 UTC, the guest's clock base and the floppy's file date: every FAT entry
/// mtools writes gets this time.
pub const SOURCE_DATE_EPOCH: u64 = 1_262_304_000;
/// The FAT partition of `cygwin.img` starts at 1 MiB, where Windows' own tools put it.
pub const PARTITION_OFFSET: u64 = 1 << 20;
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

/// The programs the media stage runs; find them with [`MediaTools::find`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaTools {
    pub mformat: PathBuf,
    pub mmd: PathBuf,
    pub mcopy: PathBuf,
    /// Checks the archives' SHA-512; without it only their sizes are checked.
    pub sha512sum: Option<PathBuf>,
}

impl MediaTools {
    pub fn find() -> Result<MediaTools, MissingTool> {
        Ok(MediaTools {
            mformat: tools::find("mformat")?,
            mmd: tools::find("mmd")?,
            mcopy: tools::find("mcopy")?,
            sha512sum: tools::find("sha512sum").ok(),
        })
    }
}

/// What [`build_media`] wrote; also `meta.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MediaSummary {
    pub format: u32,
    pub edition: String,
    pub efi: bool,
    pub locale: String,
    pub product_key_given: bool,
    /// Windows 11's TPM/Secure Boot/CPU checks are switched off by the answer file.
    pub hardware_check_bypass: bool,
    pub install_commands: usize,
    /// What install.cmd asks Cygwin's setup for (setup adds the Base category itself).
    pub requested_packages: Vec<String>,
    pub cygwin_packages_present: bool,
    /// The packages the install needs, dependencies included, all present on `cygwin.img`.
    /// Empty when no repository was given.
    pub cygwin_closure: Vec<String>,
    pub cygwin_archive_bytes: u64,
    /// Whether the archives' SHA-512 were compared with setup.ini (sizes always are).
    pub cygwin_hashes_checked: bool,
    pub cygwin_image_bytes: u64,
    /// "FAT16" or "FAT32"
    pub cygwin_filesystem: String,
    /// The files written into the output, sorted.
    pub files: Vec<String>,
}

#[derive(Debug)]
pub enum MediaError {
    InvalidOptions(WindowsOptionsError),
    InvalidAuthorizedKey { reason: &'static str },
    Write { path: PathBuf, source: io::Error },
    Read { path: PathBuf, source: io::Error },
    Floppy(FatError),
    RepoMissing { path: PathBuf, what: &'static str },
    SetupIni { path: PathBuf, error: SetupIniError },
    Closure { setup_ini: PathBuf, error: ClosureError },
    ArchiveMissing { package: String, path: PathBuf },
    ArchiveSize { package: String, path: PathBuf, expected: u64, found: u64 },
    ArchiveHash { package: String, path: PathBuf, expected: String, found: String },
    NotOnFat { path: PathBuf, reason: &'static str },
    ToolStart { tool: PathBuf, source: io::Error },
    ToolFailed { tool: PathBuf, args: String, status: String, stderr: String },
    ToolOutput { tool: PathBuf, detail: String },
    Summary { path: PathBuf, detail: String },
    CygwinPackagesMissing { media: PathBuf },
}

impl fmt::Display for MediaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use MediaError as E;
        match self {
            E::InvalidOptions(error) => write!(f, "windows image options: {error}"),
            E::InvalidAuthorizedKey { reason } => write!(f, "the SSH public key for the guest {reason}"),
            E::Write { path, source } => write!(f, "writing {}: {source}", path.display()),
            E::Read { path, source } => write!(f, "reading {}: {source}", path.display()),
            E::Floppy(error) => write!(f, "building {ANSWER_IMG}: {error}"),
            E::RepoMissing { path, what } => write!(
                f,
                "the Cygwin repository (cygwinRepo) has no {what} at {}; build it with nix/cygwin.nix \
                 (see docs/WINDOWS.md)",
                path.display()
            ),
            E::SetupIni { path, error } => write!(f, "{}: {error}", path.display()),
            E::Closure { setup_ini, error } => write!(f, "{error} ({})", setup_ini.display()),
            E::ArchiveMissing { package, path } => write!(
                f,
                "the Cygwin repository lacks the archive of package '{package}' ({}); build cygwinRepo \
                 with the same packages as the image's cygwinPackages",
                path.display()
            ),
            E::ArchiveSize { package, path, expected, found } => write!(
                f,
                "the archive of cygwin package '{package}' ({}) has {found} bytes, setup.ini says {expected}",
                path.display()
            ),
            E::ArchiveHash { package, path, expected, found } => write!(
                f,
                "the archive of cygwin package '{package}' ({}) has SHA-512 {found}, setup.ini says {expected}",
                path.display()
            ),
            E::NotOnFat { path, reason } => write!(f, "{} cannot go on a FAT file system: {reason}", path.display()),
            E::ToolStart { tool, source } => write!(f, "cannot run {}: {source}", tool.display()),
            E::ToolFailed { tool, args, status, stderr } => {
                write!(f, "{} {args} failed ({status})", tool.display())?;
                if !stderr.trim().is_empty() {
                    write!(f, ": {}", stderr.trim())?;
                }
                Ok(())
            }
            E::ToolOutput { tool, detail } => write!(f, "unexpected output from {}: {detail}", tool.display()),
            E::Summary { path, detail } => {
                write!(f, "{} is not the summary of nix-winvm Windows media: {detail}", path.display())
            }
            E::CygwinPackagesMissing { media } => write!(
                f,
                "the install media {} hold no Cygwin packages, so the install cannot run: build a local \
                 package directory with nix/cygwin.nix and pass it as cygwinRepo to builtins.windowsImage \
                 (see docs/WINDOWS.md)",
                media.display()
            ),
        }
    }
}

impl std::error::Error for MediaError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MediaError::InvalidOptions(error) => Some(error),
            MediaError::Floppy(error) => Some(error),
            MediaError::SetupIni { error, .. } => Some(error),
            MediaError::Closure { error, .. } => Some(error),
            MediaError::Write { source, .. }
            | MediaError::Read { source, .. }
            | MediaError::ToolStart { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The generators' options for an image. The admin password is [`DEFAULT_ADMIN_PASSWORD`]:
/// the controller logs in with the image's key, never with the password.
pub fn windows_options(opts: &WindowsImageOptions, disk_size_mib: u64) -> WindowsOptions {
    WindowsOptions {
        edition: opts.edition.clone(),
        product_key: opts.product_key.clone(),
        locale: opts.locale.clone(),
        disk_size_mib,
        efi: opts.efi,
        cygwin_packages: opts.cygwin_packages.clone(),
        install_commands: opts.install_commands.clone(),
        admin_password: DEFAULT_ADMIN_PASSWORD.to_string(),
    }
}

/// With the default disk size; use [`windows_options`] to carry the image's own.
impl From<&WindowsImageOptions> for WindowsOptions {
    fn from(opts: &WindowsImageOptions) -> WindowsOptions {
        windows_options(opts, WINDOWS_DISK_SIZE_MIB)
    }
}

/// Writes the media into `out`, which exists. `disk_size_mib` is the image's disk size (the
/// options are validated with it: Windows needs 32 GiB); `authorized_key` is the public key
/// the controller logs in with, one line; `cygwin_repo` is the local package directory
/// (`setup-x86_64.exe` and `cygwin-packages/`, as nix/cygwin.nix builds it).
pub fn build_media(
    opts: &WindowsImageOptions,
    disk_size_mib: u64,
    authorized_key: &str,
    cygwin_repo: Option<&Path>,
    out: &Path,
    tools: &MediaTools,
) -> Result<MediaSummary, MediaError> {
    let wopts = windows_options(opts, disk_size_mib);
    wopts.validate().map_err(MediaError::InvalidOptions)?;
    let key = single_line_key(authorized_key)?;
    // Checked first: a bad repository should fail before anything is written.
    let repo = cygwin_repo.map(|root| inspect_repo(root, &wopts, tools)).transpose()?;

    let mut files = Vec::new();
    let mut write = |name: &str, bytes: &[u8]| -> Result<PathBuf, MediaError> {
        let path = out.join(name);
        fs::write(&path, bytes).map_err(|source| MediaError::Write { path: path.clone(), source })?;
        files.push(name.to_string());
        Ok(path)
    };

    let xml = answer::autounattend_xml(&wopts);
    write(AUTOUNATTEND_XML, xml.as_bytes())?;
    let floppy = fat::fat12_floppy(ANSWER_LABEL, &[(AUTOUNATTEND_XML, xml.as_bytes())]).map_err(MediaError::Floppy)?;
    write(ANSWER_IMG, &floppy)?;
    let install_cmd = write(names::INSTALL_CMD, scripts::install_cmd(&wopts).as_bytes())?;
    let bootstrap = write(names::BOOTSTRAP_SH, scripts::bootstrap_sh(key, &wopts).as_bytes())?;
    let map_shares = write(MAP_SHARES_SH, scripts::map_shares_sh().as_bytes())?;

    // The marker only belongs on the medium; it is written to a scratch directory.
    let scratch = tempfile::Builder::new()
        .prefix("winvm-media")
        .tempdir()
        .map_err(|source| MediaError::Write { path: std::env::temp_dir(), source })?;
    let marker = scratch.path().join(names::MARKER);
    fs::write(&marker, "nix-winvm: the Cygwin install medium. The answer file runs install.cmd from here.\r\n")
        .map_err(|source| MediaError::Write { path: marker.clone(), source })?;

    let mut content = FatContent::default();
    for source in [&marker, &install_cmd, &bootstrap, &map_shares] {
        content.add_file("", source)?;
    }
    if let Some(repo) = &repo {
        content.add_file("", &repo.root.join(names::CYGWIN_SETUP_EXE))?;
        content.add_tree(&repo.root, names::CYGWIN_PACKAGES_DIR)?;
    }
    let image_path = out.join(CYGWIN_IMG);
    let image = build_fat_disk(tools, &image_path, CYGWIN_LABEL, &content)?;
    files.push(CYGWIN_IMG.to_string());

    let mut requested: Vec<String> = REQUIRED_PACKAGES.iter().map(|name| name.to_string()).collect();
    requested.extend(wopts.cygwin_packages.iter().cloned());
    requested.sort();
    requested.dedup();
    files.push(META_JSON.to_string());
    files.push(README_TXT.to_string());
    files.sort();
    let summary = MediaSummary {
        format: MEDIA_FORMAT,
        edition: wopts.edition.clone(),
        efi: wopts.efi,
        locale: wopts.locale.clone(),
        product_key_given: wopts.product_key.is_some(),
        hardware_check_bypass: wopts.needs_hardware_check_bypass(),
        install_commands: wopts.install_commands.len(),
        requested_packages: requested,
        cygwin_packages_present: repo.is_some(),
        cygwin_closure: repo.as_ref().map(|r| r.closure.clone()).unwrap_or_default(),
        cygwin_archive_bytes: repo.as_ref().map_or(0, |r| r.archive_bytes),
        cygwin_hashes_checked: repo.as_ref().is_some_and(|r| r.hashes_checked),
        cygwin_image_bytes: image.bytes,
        cygwin_filesystem: image.filesystem.to_string(),
        files,
    };
    let meta = out.join(META_JSON);
    let json = serde_json::to_string_pretty(&summary)
        .map_err(|e| MediaError::Write { path: meta.clone(), source: io::Error::other(e) })?;
    fs::write(&meta, json + "\n").map_err(|source| MediaError::Write { path: meta.clone(), source })?;
    let readme = out.join(README_TXT);
    fs::write(&readme, readme_text(&summary)).map_err(|source| MediaError::Write { path: readme.clone(), source })?;
    Ok(summary)
}

/// Reads `meta.json` of media built by [`build_media`].
pub fn read_summary(media: &Path) -> Result<MediaSummary, MediaError> {
    let path = media.join(META_JSON);
    let text = fs::read_to_string(&path).map_err(|source| MediaError::Read { path: path.clone(), source })?;
    let summary: MediaSummary =
        serde_json::from_str(&text).map_err(|e| MediaError::Summary { path: path.clone(), detail: e.to_string() })?;
    if summary.format != MEDIA_FORMAT {
        return Err(MediaError::Summary {
            path,
            detail: format!("media format {}, this nix-winvm reads format {MEDIA_FORMAT}", summary.format),
        });
    }
    Ok(summary)
}

/// For the install stage: the media's summary, or why the install cannot use them.
pub fn ensure_ready_for_install(media: &Path) -> Result<MediaSummary, MediaError> {
    let summary = read_summary(media)?;
    if !summary.cygwin_packages_present {
        return Err(MediaError::CygwinPackagesMissing { media: media.to_path_buf() });
    }
    for name in [ANSWER_IMG, CYGWIN_IMG] {
        let path = media.join(name);
        fs::metadata(&path).map_err(|source| MediaError::Read { path, source })?;
    }
    Ok(summary)
}

/// The QEMU storage arguments of the install stage (`-machine q35`): the blank system disk on
/// AHCI port 0, so Windows numbers it disk 0, the disk the answer file wipes and installs to;
/// the ISO as a CD on port 1; `cygwin.img` on port 2 with `snapshot=on` (QEMU's IDE disks
/// refuse read-only images, and the guest's writes must not reach the store); `answer.img` on
/// a floppy drive, a removable medium whose root Setup searches for autounattend.xml. Boot
/// order: the system disk (blank at first, so the firmware moves on), then the CD; later
/// reboots boot the installed disk, never the CD again. Under UEFI the CD's boot loader asks
/// for a key press on the first boot; the caller has to send one (QMP `send-key`).
/// The suspend and build stages must attach the system disk the same way (AHCI, port 0):
/// Windows boots only from the storage controller it was installed on. Not yet tried with
/// real Windows media.
pub fn install_drive_args(media: &Path, iso: &Path, system_disk: &Path) -> Vec<OsString> {
    let drive = |id: &str, file: &Path, options: &str| -> [OsString; 2] {
        let mut value = OsString::from(format!("if=none,id={id},file="));
        value.push(qemu_escape(file.as_os_str()));
        value.push(format!(",{options}"));
        ["-drive".into(), value]
    };
    let device = |value: &str| -> [OsString; 2] { ["-device".into(), value.into()] };
    let mut args = Vec::new();
    args.extend(drive("winvm-system", system_disk, "format=qcow2,cache=writeback"));
    args.extend(device("ide-hd,drive=winvm-system,bus=ide.0,bootindex=0"));
    args.extend(drive("winvm-iso", iso, "format=raw,media=cdrom,readonly=on"));
    args.extend(device("ide-cd,drive=winvm-iso,bus=ide.1,bootindex=1"));
    args.extend(drive("winvm-cygwin", &media.join(CYGWIN_IMG), "format=raw,snapshot=on"));
    args.extend(device("ide-hd,drive=winvm-cygwin,bus=ide.2"));
    args.extend(drive("winvm-answer", &media.join(ANSWER_IMG), "format=raw,readonly=on"));
    args.extend(device("isa-fdc,id=winvm-fdc"));
    args.extend(device("floppy,drive=winvm-answer,bus=winvm-fdc.0"));
    args.extend(["-boot".into(), "strict=on".into()]);
    args
}

/// QEMU's option syntax doubles a comma inside a value.
fn qemu_escape(value: &OsStr) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut bytes = Vec::with_capacity(value.len());
    for &byte in value.as_bytes() {
        bytes.push(byte);
        if byte == b',' {
            bytes.push(b',');
        }
    }
    OsString::from_vec(bytes)
}

fn single_line_key(key: &str) -> Result<&str, MediaError> {
    let key = key.trim();
    if key.is_empty() {
        return Err(MediaError::InvalidAuthorizedKey { reason: "is empty" });
    }
    if key.contains(['\n', '\r', '\0']) {
        return Err(MediaError::InvalidAuthorizedKey { reason: "is more than one line" });
    }
    Ok(key)
}

/// A repository that passed the checks.
struct Repo {
    root: PathBuf,
    closure: Vec<String>,
    archive_bytes: u64,
    hashes_checked: bool,
}

fn inspect_repo(root: &Path, opts: &WindowsOptions, tools: &MediaTools) -> Result<Repo, MediaError> {
    let setup_exe = root.join(names::CYGWIN_SETUP_EXE);
    if !fs::metadata(&setup_exe).is_ok_and(|m| m.is_file()) {
        return Err(MediaError::RepoMissing { path: setup_exe, what: "Cygwin setup program" });
    }
    let packages_dir = root.join(names::CYGWIN_PACKAGES_DIR);
    let setup_ini = packages_dir.join(LOCAL_SETUP_INI);
    if !fs::metadata(&setup_ini).is_ok_and(|m| m.is_file()) {
        return Err(MediaError::RepoMissing { path: setup_ini, what: "setup.ini" });
    }
    let text = fs::read_to_string(&setup_ini).map_err(|source| MediaError::Read { path: setup_ini.clone(), source })?;
    let ini = SetupIni::parse(&text).map_err(|error| MediaError::SetupIni { path: setup_ini.clone(), error })?;
    let roots = cygwin::base_roots(&ini, &opts.cygwin_packages);
    let roots: Vec<&str> = roots.iter().map(String::as_str).collect();
    let closure =
        cygwin::closure(&ini, &roots).map_err(|error| MediaError::Closure { setup_ini: setup_ini.clone(), error })?;

    let mut archive_bytes = 0;
    let mut to_hash: Vec<(String, PathBuf, String)> = Vec::new();
    for package in &closure {
        let Some(install) = &package.install else {
            continue;
        };
        let path = packages_dir.join(cygwin::LOCAL_MIRROR_DIR).join(&install.path);
        let metadata = match fs::metadata(&path) {
            Ok(metadata) if metadata.is_file() => metadata,
            _ => return Err(MediaError::ArchiveMissing { package: package.name.clone(), path }),
        };
        if metadata.len() != install.size {
            return Err(MediaError::ArchiveSize {
                package: package.name.clone(),
                path,
                expected: install.size,
                found: metadata.len(),
            });
        }
        archive_bytes += install.size;
        to_hash.push((package.name.clone(), path, install.sha512.clone()));
    }
    let hashes_checked = match &tools.sha512sum {
        Some(sha512sum) => {
            check_hashes(sha512sum, &to_hash)?;
            true
        }
        None => false,
    };
    Ok(Repo {
        root: root.to_path_buf(),
        closure: closure.into_iter().map(|package| package.name).collect(),
        archive_bytes,
        hashes_checked,
    })
}

fn check_hashes(sha512sum: &Path, files: &[(String, PathBuf, String)]) -> Result<(), MediaError> {
    for batch in files.chunks(256) {
        let mut args: Vec<OsString> = vec!["--".into()];
        args.extend(batch.iter().map(|(_, path, _)| path.as_os_str().to_os_string()));
        let stdout = run_tool(sha512sum, &args)?;
        let stdout = String::from_utf8_lossy(&stdout);
        let sums: Vec<&str> = stdout
            .lines()
            // A name with a backslash or newline makes sha512sum start the line with '\'.
            .map(|line| line.trim_start_matches('\\').split_whitespace().next().unwrap_or(""))
            .collect();
        if sums.len() != batch.len() {
            return Err(MediaError::ToolOutput {
                tool: sha512sum.to_path_buf(),
                detail: format!("{} lines for {} files", sums.len(), batch.len()),
            });
        }
        for ((package, path, expected), found) in batch.iter().zip(sums) {
            if !found.eq_ignore_ascii_case(expected) {
                return Err(MediaError::ArchiveHash {
                    package: package.clone(),
                    path: path.clone(),
                    expected: expected.clone(),
                    found: found.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Files and directories for a FAT image, by target path ("" is the root, "a/b" a directory).
#[derive(Default)]
struct FatContent {
    dirs: Vec<String>,
    /// target directory -> (name upper-cased, source); BTreeMap keeps the copy order sorted.
    files: BTreeMap<String, BTreeMap<String, PathBuf>>,
    bytes: u64,
    entries: u64,
}

impl FatContent {
    fn add_file(&mut self, dir: &str, source: &Path) -> Result<(), MediaError> {
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
    fn add_tree(&mut self, root: &Path, rel: &str) -> Result<(), MediaError> {
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

struct FatImage {
    bytes: u64,
    filesystem: &'static str,
}

/// A raw disk: an MBR with one FAT partition at [`PARTITION_OFFSET`], filled with `content`.
fn build_fat_disk(tools: &MediaTools, image: &Path, label: &str, content: &FatContent) -> Result<FatImage, MediaError> {
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
    let (filesystem, partition_type) = if &boot_sector[82..87] == b"FAT32" {
        ("FAT32", 0x0C) // FAT32, LBA
    } else if &boot_sector[54..59] == b"FAT16" {
        ("FAT16", 0x0E) // FAT16, LBA
    } else {
        return Err(MediaError::ToolOutput {
            tool: tools.mformat.clone(),
            detail: format!("{} holds neither FAT16 nor FAT32 at offset {PARTITION_OFFSET}", image.display()),
        });
    };
    let sectors = u32::try_from(partition_sectors).map_err(|_| MediaError::NotOnFat {
        path: image.to_path_buf(),
        reason: "the content needs a partition over 2 TiB",
    })?;
    write_at(image, 0, &mbr(partition_type, (PARTITION_OFFSET / SECTOR) as u32, sectors))?;
    Ok(FatImage { bytes: total, filesystem })
}

/// A master boot record with one partition. Its code only asks the BIOS to try the next boot
/// device (`int 18h`), like the floppy's boot sector.
fn mbr(partition_type: u8, first_lba: u32, sectors: u32) -> [u8; 512] {
    let mut mbr = [0u8; 512];
    mbr[..5].copy_from_slice(&[0xCD, 0x18, 0xF4, 0xEB, 0xFD]); // int 18h; hlt; jmp $-1
    mbr[440..444].copy_from_slice(&DISK_SIGNATURE.to_le_bytes());
    let entry = &mut mbr[446..462];
    entry[0] = 0x00; // not active
    entry[1..4].copy_from_slice(&[0xFE, 0xFF, 0xFF]); // CHS unused: LBA only
    entry[4] = partition_type;
    entry[5..8].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
    entry[8..12].copy_from_slice(&first_lba.to_le_bytes());
    entry[12..16].copy_from_slice(&sectors.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    mbr
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

/// Runs a tool with a fixed clock and no mtools configuration surprises; returns its stdout.
fn run_tool(tool: &Path, args: &[OsString]) -> Result<Vec<u8>, MediaError> {
    let output = Command::new(tool)
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

fn readme_text(summary: &MediaSummary) -> String {
    let mut text = String::new();
    if !summary.cygwin_packages_present {
        text.push_str(
            "!! THE CYGWIN PACKAGES ARE MISSING. The install stage refuses these media.\n\
             !! No cygwinRepo was given to builtins.windowsImage, so cygwin.img holds the scripts\n\
             !! but not Cygwin's setup program nor its packages. Build a local package directory\n\
             !! from a pinned setup.ini with nix/cygwin.nix and pass it as `cygwinRepo = ...;`\n\
             !! (docs/WINDOWS.md shows how).\n\n",
        );
    }
    text.push_str(&format!(
        "nix-winvm install media for \"{edition}\" ({boot}, locale {locale}).\n\n\
         autounattend.xml  the answer file Windows Setup follows\n\
         answer.img        a 1.44 MB FAT12 floppy holding only autounattend.xml; Setup finds it\n\
         \x20                 on its own at the root of removable media\n\
         cygwin.img        a raw disk (MBR, one {fs} partition at 1 MiB, label {label}) holding\n\
         \x20                 {marker}, install.cmd, bootstrap.sh, map-shares.sh{repo}\n\
         install.cmd       run at the first logon: installs Cygwin offline, runs bootstrap.sh\n\
         bootstrap.sh      configures sshd, the authorized key, the network, then powers off\n\
         map-shares.sh     run over SSH at the suspend stage: maps the controller's Samba shares\n\
         meta.json         this summary as JSON\n\n\
         Cygwin packages requested: {requested} (plus the Base category)\n",
        edition = summary.edition,
        boot = if summary.efi { "UEFI, GPT" } else { "BIOS, MBR" },
        locale = summary.locale,
        fs = summary.cygwin_filesystem,
        label = CYGWIN_LABEL,
        marker = names::MARKER,
        repo = if summary.cygwin_packages_present {
            ",\n                  setup-x86_64.exe and cygwin-packages/"
        } else {
            ""
        },
        requested = summary.requested_packages.join(" "),
    ));
    if summary.cygwin_packages_present {
        text.push_str(&format!(
            "Cygwin packages on cygwin.img ({} with dependencies, {} bytes of archives, {}): {}\n",
            summary.cygwin_closure.len(),
            summary.cygwin_archive_bytes,
            if summary.cygwin_hashes_checked { "sizes and SHA-512 checked" } else { "sizes checked" },
            summary.cygwin_closure.join(" "),
        ));
    }
    text.push_str("\nInspect the images with mtools: mdir -i answer.img ::   mdir -i cygwin.img@@1M -/ ::\n");
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::windows::cygwin::{base_roots, closure, local_repo_layout};
    use crate::guest::windows::test_util::tool_available;
    use crate::spec::IsoSource;

    const KEY: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBHx= nix-winvm\n";
    const FIXTURE_INI: &str = include_str!("../../../tests/fixtures/setup.ini");

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    fn fixture_repo() -> PathBuf {
        fixtures().join("cygwin-repo")
    }

    fn image_options(edition: &str, efi: bool, packages: &[&str]) -> WindowsImageOptions {
        WindowsImageOptions {
            iso: IsoSource::Fixed { name: "win.iso".into(), sha256: "0".repeat(64) },
            edition: edition.into(),
            product_key: None,
            locale: "en-US".into(),
            efi,
            cygwin_packages: packages.iter().map(|p| p.to_string()).collect(),
            install_commands: vec!["echo hello".into()],
        }
    }

    /// The real tools, or None (and a message) when mtools is not installed.
    fn tools() -> Option<MediaTools> {
        match MediaTools::find() {
            Ok(tools) => Some(tools),
            Err(err) => {
                crate::tools::test_requires(&err.to_string(), false);
                None
            }
        }
    }

    fn mtools(tool: &str, args: &[&str]) -> Vec<u8> {
        let output = Command::new(tool)
            .args(args)
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap_or_else(|err| panic!("{tool} did not run: {err}"));
        assert!(output.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        output.stdout
    }

    fn cygwin_target(out: &Path) -> String {
        format!("{}@@{PARTITION_OFFSET}", out.join(CYGWIN_IMG).display())
    }

    /// Every file on a FAT image, as full paths with their long names ("::/a/b").
    fn listing(image: &str) -> Vec<String> {
        let text = String::from_utf8(mtools("mdir", &["-i", image, "-b", "-/", "::/"])).expect("utf-8");
        let mut files: Vec<String> = text.lines().map(|line| line.trim_end_matches('/').to_string()).collect();
        files.sort();
        files
    }

    fn mtype(image: &str, path: &str) -> Vec<u8> {
        mtools("mtype", &["-i", image, &format!("::/{path}")])
    }

    fn compact(xml: &str) -> String {
        xml.lines().map(str::trim).collect()
    }

    #[test]
    fn options_convert_with_the_default_password() {
        let mut image = image_options("Windows 11 Pro", true, &["make"]);
        image.product_key = Some("W269N-WFGWX-YVC9B-4J6C9-T83GX".into());
        image.locale = "de-DE".into();
        let opts = windows_options(&image, 40_000);
        assert_eq!(opts.edition, "Windows 11 Pro");
        assert_eq!(opts.product_key.as_deref(), Some("W269N-WFGWX-YVC9B-4J6C9-T83GX"));
        assert_eq!(opts.locale, "de-DE");
        assert!(opts.efi);
        assert_eq!(opts.cygwin_packages, ["make"]);
        assert_eq!(opts.install_commands, ["echo hello"]);
        assert_eq!(opts.disk_size_mib, 40_000);
        assert_eq!(opts.admin_password, DEFAULT_ADMIN_PASSWORD);
        assert_eq!(WindowsOptions::from(&image).disk_size_mib, WINDOWS_DISK_SIZE_MIB);
        assert_eq!(opts.validate(), Ok(()));
    }

    #[test]
    fn media_without_a_repository_are_built_and_marked_incomplete() {
        let Some(tools) = tools() else { return };
        let out = tempfile::tempdir().expect("temp dir");
        let opts = image_options("Windows 11 Pro", true, &["make"]);
        let summary = build_media(&opts, WINDOWS_DISK_SIZE_MIB, KEY, None, out.path(), &tools).expect("media");
        assert!(!summary.cygwin_packages_present);
        assert!(summary.cygwin_closure.is_empty());
        assert_eq!(summary.requested_packages, ["cygrunsrv", "make", "openssh"]);
        assert_eq!(summary.cygwin_filesystem, "FAT16");
        assert!(summary.hardware_check_bypass && summary.efi);
        assert_eq!(read_summary(out.path()).expect("meta.json"), summary);
        let mut on_disk: Vec<String> = fs::read_dir(out.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        assert_eq!(on_disk, summary.files);

        let readme = fs::read_to_string(out.path().join(README_TXT)).expect("README");
        assert!(readme.starts_with("!! THE CYGWIN PACKAGES ARE MISSING"), "{readme}");
        assert!(readme.contains("nix/cygwin.nix") && readme.contains("cygwinRepo"));
        let err = ensure_ready_for_install(out.path()).expect_err("no packages");
        assert!(matches!(err, MediaError::CygwinPackagesMissing { .. }));
        assert!(err.to_string().contains("pass it as cygwinRepo to builtins.windowsImage"), "{err}");

        // The answer file matches the options, and the floppy holds exactly it.
        let xml = fs::read_to_string(out.path().join(AUTOUNATTEND_XML)).expect("xml");
        let compact_xml = compact(&xml);
        assert!(compact_xml.contains("<Key>/IMAGE/NAME</Key><Value>Windows 11 Pro</Value>"));
        assert!(compact_xml.contains("<Type>EFI</Type>"));
        assert!(compact_xml.contains("LabConfig"));
        if !tool_available("mdir") || !tool_available("mtype") {
            return;
        }
        let floppy = out.path().join(ANSWER_IMG).display().to_string();
        assert_eq!(listing(&floppy), ["::/autounattend.xml"]);
        assert_eq!(mtype(&floppy, AUTOUNATTEND_XML), xml.as_bytes());

        let image = cygwin_target(out.path());
        assert_eq!(
            listing(&image),
            ["::/bootstrap.sh", "::/install.cmd", "::/map-shares.sh", "::/nix-winvm-cygwin.marker"]
        );
        let bootstrap = String::from_utf8(mtype(&image, names::BOOTSTRAP_SH)).expect("utf-8");
        assert!(bootstrap.contains(KEY.trim()), "authorized key on the medium");
        assert_eq!(bootstrap.as_bytes(), fs::read(out.path().join(names::BOOTSTRAP_SH)).expect("bootstrap"));
        let install = mtype(&image, names::INSTALL_CMD);
        assert_eq!(install, fs::read(out.path().join(names::INSTALL_CMD)).expect("install.cmd"));
        assert!(String::from_utf8_lossy(&install).contains("--packages cygrunsrv,make,openssh "));
        assert_eq!(mtype(&image, MAP_SHARES_SH), scripts::map_shares_sh().as_bytes());
    }

    #[test]
    fn media_with_the_fixture_repository_hold_every_file() {
        let Some(tools) = tools() else { return };
        let out = tempfile::tempdir().expect("temp dir");
        let opts = image_options("Windows 10 Pro", false, &["make"]);
        let repo = fixture_repo();
        let summary = build_media(&opts, WINDOWS_DISK_SIZE_MIB, KEY, Some(&repo), out.path(), &tools).expect("media");
        assert!(summary.cygwin_packages_present);
        assert_eq!(
            summary.cygwin_closure,
            ["base-cygwin", "bash", "cygrunsrv", "cygwin", "libintl8", "make", "openssh", "terminfo", "zlib0"]
        );
        assert_eq!(summary.cygwin_hashes_checked, tools.sha512sum.is_some());
        assert!(summary.cygwin_archive_bytes > 0);
        assert_eq!(ensure_ready_for_install(out.path()).expect("ready"), summary);
        let readme = fs::read_to_string(out.path().join(README_TXT)).expect("README");
        assert!(!readme.contains("MISSING") && readme.contains("make openssh"), "{readme}");

        let xml = compact(&fs::read_to_string(out.path().join(AUTOUNATTEND_XML)).expect("xml"));
        assert!(xml.contains("<Value>Windows 10 Pro</Value>"));
        assert!(!xml.contains("<Type>EFI</Type>") && xml.contains("<Active>true</Active>"));
        assert!(!xml.contains("LabConfig"));

        if !tool_available("mdir") || !tool_available("mtype") {
            return;
        }
        let image = cygwin_target(out.path());
        let listed = listing(&image);
        let mut expected: Vec<String> = ["bootstrap.sh", "install.cmd", "map-shares.sh", "nix-winvm-cygwin.marker"]
            .iter()
            .map(|f| format!("::/{f}"))
            .collect();
        let mut repo_files = Vec::new();
        collect_files(&repo, &repo, &mut repo_files);
        for rel in &repo_files {
            expected.push(format!("::/{rel}"));
            let parts: Vec<&str> = rel.split('/').collect();
            for depth in 1..parts.len() {
                expected.push(format!("::/{}", parts[..depth].join("/")));
            }
        }
        expected.sort();
        expected.dedup();
        assert_eq!(listed, expected);
        for rel in &repo_files {
            assert_eq!(mtype(&image, rel), fs::read(repo.join(rel)).expect("fixture"), "{rel}");
        }
        assert!(repo_files.contains(&"setup-x86_64.exe".to_string()));
        assert!(repo_files.contains(&format!("cygwin-packages/{LOCAL_SETUP_INI}")));
    }

    fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                collect_files(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).expect("below root").display().to_string());
            }
        }
        out.sort();
    }

    /// A copy of the fixture repository; `link` makes every file a symlink, as in a Nix build.
    fn copy_repo(link: bool) -> tempfile::TempDir {
        let copy = tempfile::tempdir().expect("temp dir");
        let repo = fixture_repo();
        let mut files = Vec::new();
        collect_files(&repo, &repo, &mut files);
        for rel in files {
            let target = copy.path().join(&rel);
            fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
            if link {
                std::os::unix::fs::symlink(repo.join(&rel), &target).expect("symlink");
            } else {
                fs::copy(repo.join(&rel), &target).expect("copy");
            }
        }
        copy
    }

    #[test]
    fn a_repository_of_symlinks_gives_the_same_image() {
        let Some(tools) = tools() else { return };
        let opts = image_options("Windows 10 Pro", false, &[]);
        let linked = copy_repo(true);
        let a = tempfile::tempdir().expect("temp dir");
        let b = tempfile::tempdir().expect("temp dir");
        build_media(&opts, WINDOWS_DISK_SIZE_MIB, KEY, Some(linked.path()), a.path(), &tools).expect("media");
        build_media(&opts, WINDOWS_DISK_SIZE_MIB, KEY, Some(&fixture_repo()), b.path(), &tools).expect("media");
        for name in [CYGWIN_IMG, ANSWER_IMG, META_JSON, README_TXT, AUTOUNATTEND_XML] {
            assert!(
                fs::read(a.path().join(name)).expect("a") == fs::read(b.path().join(name)).expect("b"),
                "{name} differs: the media are not reproducible"
            );
        }
    }

    #[test]
    fn cygwin_image_has_one_fat_partition_at_one_mib() {
        let Some(tools) = tools() else { return };
        let out = tempfile::tempdir().expect("temp dir");
        let opts = image_options("Windows 10 Pro", false, &[]);
        let summary =
            build_media(&opts, WINDOWS_DISK_SIZE_MIB, KEY, Some(&fixture_repo()), out.path(), &tools).expect("media");
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

    #[test]
    fn incomplete_or_corrupt_repositories_are_refused() {
        let Some(tools) = tools() else { return };
        let out = tempfile::tempdir().expect("temp dir");
        let mirror = format!("{}/{}", names::CYGWIN_PACKAGES_DIR, cygwin::LOCAL_MIRROR_DIR);
        let make = format!("{mirror}/x86_64/release/make/make-4.4.1-2.tar.xz");
        let with_make = image_options("Windows 10 Pro", false, &["make"]);
        let build = |opts: &WindowsImageOptions, repo: &Path| {
            build_media(opts, WINDOWS_DISK_SIZE_MIB, KEY, Some(repo), out.path(), &tools)
        };

        let repo = copy_repo(false);
        fs::remove_file(repo.path().join(&make)).expect("remove");
        // Without make the image does not need the archive.
        build(&image_options("Windows 10 Pro", false, &[]), repo.path()).expect("make not needed");
        let err = build(&with_make, repo.path()).expect_err("make missing");
        assert!(matches!(&err, MediaError::ArchiveMissing { package, .. } if package == "make"), "{err}");
        assert!(err.to_string().contains("lacks the archive of package 'make'"), "{err}");

        let repo = copy_repo(false);
        fs::write(repo.path().join(&make), "short").expect("truncate");
        let err = build(&with_make, repo.path()).expect_err("wrong size");
        assert!(matches!(err, MediaError::ArchiveSize { found: 5, .. }), "{err}");

        if tools.sha512sum.is_some() {
            let repo = copy_repo(false);
            let path = repo.path().join(&make);
            let mut bytes = fs::read(&path).expect("read");
            bytes[0] ^= 1;
            fs::write(&path, bytes).expect("corrupt");
            let err = build(&with_make, repo.path()).expect_err("wrong hash");
            assert!(matches!(&err, MediaError::ArchiveHash { package, .. } if package == "make"), "{err}");
        }

        let repo = copy_repo(false);
        let err = build(&image_options("Windows 10 Pro", false, &["gcc-core"]), repo.path()).expect_err("unknown");
        assert!(
            err.to_string().starts_with("cygwin package 'gcc-core' (requested for installation) is not in setup.ini"),
            "{err}"
        );

        fs::remove_file(repo.path().join(names::CYGWIN_SETUP_EXE)).expect("remove");
        let err = build(&with_make, repo.path()).expect_err("no setup");
        assert!(err.to_string().contains("has no Cygwin setup program"), "{err}");

        let empty = tempfile::tempdir().expect("temp dir");
        fs::write(empty.path().join(names::CYGWIN_SETUP_EXE), "MZ").expect("write");
        let err = build(&with_make, empty.path()).expect_err("no setup.ini");
        assert!(err.to_string().contains("has no setup.ini"), "{err}");
    }

    #[test]
    fn bad_options_and_keys_are_refused_before_writing() {
        let Some(tools) = tools() else { return };
        let out = tempfile::tempdir().expect("temp dir");
        let mut opts = image_options("Windows 10 Pro", false, &[]);
        opts.product_key = Some("12345".into());
        let err = build_media(&opts, WINDOWS_DISK_SIZE_MIB, KEY, None, out.path(), &tools).expect_err("key");
        assert!(err.to_string().starts_with("windows image options: product key '12345'"), "{err}");
        let opts = image_options("Windows 10 Pro", false, &[]);
        let err = build_media(&opts, 1024, KEY, None, out.path(), &tools).expect_err("disk");
        assert!(matches!(err, MediaError::InvalidOptions(WindowsOptionsError::DiskTooSmall { .. })));
        let err = build_media(&opts, WINDOWS_DISK_SIZE_MIB, "a\nb", None, out.path(), &tools).expect_err("two lines");
        assert_eq!(err.to_string(), "the SSH public key for the guest is more than one line");
        assert!(fs::read_dir(out.path()).expect("list").next().is_none(), "nothing written");
    }

    #[test]
    fn missing_tools_are_named() {
        let tools = MediaTools {
            mformat: PathBuf::from("/nonexistent/mformat"),
            mmd: PathBuf::from("/nonexistent/mmd"),
            mcopy: PathBuf::from("/nonexistent/mcopy"),
            sha512sum: None,
        };
        let out = tempfile::tempdir().expect("temp dir");
        let opts = image_options("Windows 10 Pro", false, &[]);
        let err = build_media(&opts, WINDOWS_DISK_SIZE_MIB, KEY, None, out.path(), &tools).expect_err("no mformat");
        assert!(err.to_string().starts_with("cannot run /nonexistent/mformat: "), "{err}");
    }

    #[test]
    fn qemu_accepts_the_install_drives() {
        if !tool_available("qemu-system-x86_64") || !tool_available("qemu-img") {
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        // A comma in the path checks the escaping.
        let media = dir.path().join("media,1");
        fs::create_dir(&media).expect("mkdir");
        fs::write(media.join(ANSWER_IMG), vec![0u8; fat::FLOPPY_BYTES]).expect("floppy");
        fs::write(media.join(CYGWIN_IMG), vec![0u8; 1 << 20]).expect("disk");
        let iso = dir.path().join("win.iso");
        fs::write(&iso, vec![0u8; 1 << 20]).expect("iso");
        let disk = dir.path().join("disk.qcow2");
        let status = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&disk).arg("64M").status();
        assert!(status.expect("qemu-img").success());
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-S", "-monitor", "stdio"])
            .args(install_drive_args(&media, &iso, &disk))
            .env("TMPDIR", dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu starts");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(b"info block\ninfo qtree\nquit\n").expect("monitor");
        }
        let output = child.wait_with_output().expect("qemu ends");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert!(stderr.trim().is_empty(), "QEMU warned: {stderr}");
        for id in ["winvm-system", "winvm-iso", "winvm-cygwin", "winvm-answer"] {
            assert!(stdout.contains(&format!("{id} (#")), "{id} missing:\n{stdout}");
        }
        assert!(stdout.contains("dev: floppy") && stdout.contains("drive = \"winvm-answer\""));
        assert!(stdout.contains("win.iso (raw, read-only)"));
        assert!(stdout.contains("answer.img (raw, read-only)"));
    }

    // --- nix/cygwin.nix against the Rust parser -------------------------------------------

    fn nix_eval(expr: &str) -> Result<serde_json::Value, String> {
        let output = Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json", "-E", expr])
            .env("NIX_CONFIG", "build-users-group =")
            .output()
            .map_err(|e| e.to_string())?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())
    }

    fn nix_string(s: &str) -> String {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"").replace("${", "\\${"))
    }

    fn repo_expr(setup_ini: &Path, packages: &[&str], mirror: &str) -> String {
        let list: Vec<String> = packages.iter().map(|p| nix_string(p)).collect();
        format!(
            "import {nix} {{ setupIni = {ini}; packages = [ {list} ]; mirror = {mirror}; setupExe = {exe}; system = \"x86_64-linux\"; }}",
            nix = Path::new(env!("CARGO_MANIFEST_DIR")).join("nix/cygwin.nix").display(),
            ini = setup_ini.display(),
            list = list.join(" "),
            mirror = nix_string(mirror),
            exe = fixture_repo().join(names::CYGWIN_SETUP_EXE).display(),
        )
    }

    /// Roots, closure and archives as nix/cygwin.nix computes them, next to the Rust answer.
    fn compare_with_rust(setup_ini: &Path, text: &str, packages: &[&str]) {
        let mirror = "https://mirror.invalid/cygwin/";
        let expr =
            format!("let r = {}; in {{ inherit (r) roots closure archives; }}", repo_expr(setup_ini, packages, mirror));
        let nix = nix_eval(&expr).unwrap_or_else(|e| panic!("nix-instantiate failed: {e}"));
        let ini = SetupIni::parse(text).expect("parses");
        let extra: Vec<String> = packages.iter().map(|p| p.to_string()).collect();
        let roots = base_roots(&ini, &extra);
        let root_refs: Vec<&str> = roots.iter().map(String::as_str).collect();
        let pkgs = closure(&ini, &root_refs).expect("closure");
        let names: Vec<&str> = pkgs.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(nix["roots"], serde_json::json!(roots), "roots for {packages:?}");
        assert_eq!(nix["closure"], serde_json::json!(names), "closure for {packages:?}");
        let archives: Vec<serde_json::Value> = pkgs
            .iter()
            .filter_map(|p| {
                p.install.as_ref().map(|i| {
                    serde_json::json!({
                        "name": p.name,
                        "path": i.path,
                        "url": format!("https://mirror.invalid/cygwin/{}", i.path),
                        "sha512": i.sha512,
                        "size": i.size,
                    })
                })
            })
            .collect();
        assert_eq!(nix["archives"], serde_json::json!(archives), "archives for {packages:?}");
        // The same files, where the media stage expects them.
        let layout: Vec<String> = local_repo_layout(&pkgs).into_iter().map(|(path, _, _)| path).collect();
        let mut from_nix: Vec<String> = archives
            .iter()
            .map(|a| format!("{}/{}", cygwin::LOCAL_MIRROR_DIR, a["path"].as_str().expect("path")))
            .collect();
        from_nix.sort();
        assert_eq!(from_nix, layout);
    }

    fn nix_available() -> bool {
        tool_available("nix-instantiate")
    }

    #[test]
    fn nix_closure_matches_rust_on_the_fixtures() {
        if !nix_available() {
            return;
        }
        let ini = fixtures().join("setup.ini");
        for packages in [&[][..], &["make"], &["make", "openssh", "libssl3"], &["zlib0"]] {
            compare_with_rust(&ini, FIXTURE_INI, packages);
        }
        let repo_ini = fixture_repo().join(names::CYGWIN_PACKAGES_DIR).join(LOCAL_SETUP_INI);
        let text = fs::read_to_string(&repo_ini).expect("repo setup.ini");
        compare_with_rust(&repo_ini, &text, &[]);
        compare_with_rust(&repo_ini, &text, &["make"]);
    }

    /// Labels, [curr], requires vs depends2, provides, CRLF, quoted text that looks like
    /// structure, nested version constraints.
    #[test]
    fn nix_closure_matches_rust_on_tricky_input() {
        if !nix_available() {
            return;
        }
        let sha = |c: char| c.to_string().repeat(128);
        let text = format!(
            "# header\r\nrelease: cygwin\r\n\r\n\
             @ base-a\r\ncategory: Base\r\nsdesc: \"A\"\r\nldesc: \"first line\r\n@ not-a-package\r\n[prev]\r\ndepends2: ghost\r\n\"\r\nversion: 1\r\ninstall: x86_64/release/a/a-1.tar.xz 10 {a}\r\ndepends2: lib-b (>= 1 (really)), perl5_036\r\n[prev]\r\nversion: 0\r\ninstall: x86_64/release/a/a-0.tar.xz 9 {a}\r\ndepends2: ghost\r\n\r\n\
             @ lib-b\r\ncategory: Libs\r\nrequires: lib-c\r\nversion: 1\r\ninstall: x86_64/release/b/b-1.tar.xz 11 {b}\r\n\r\n\
             @ lib-c\r\ncategory: Libs\r\nrequires: ghost\r\nversion: 1\r\ndepends2: _windows (>= 10.0)\r\n\r\n\
             @ perl-z\r\ncategory: Perl\r\nprovides: perl5_036\r\nversion: 1\r\ninstall: noarch/release/perl/z.tar.xz 12 {c}\r\n\r\n\
             @ perl-base\r\ncategory: Perl\r\nprovides: perl5_036, perl\r\nversion: 1\r\ninstall: noarch/release/perl/base.tar.xz 13 {d}\r\n\r\n\
             @ labelled\r\ncategory: Devel\r\n[curr]\r\nversion: 2\r\ninstall: x86_64/release/l/l-2.tar.xz 14 {e}\r\ndepends2: lib-c\r\n[test]\r\nversion: 3\r\ndepends2: ghost\r\n\r\n\
             @ openssh\r\ncategory: Net\r\nversion: 1\r\ninstall: x86_64/release/o/o.tar.xz 15 {f}\r\ndepends2: lib-b\r\n\r\n\
             @ cygrunsrv\r\ncategory: Admin\r\nversion: 1\r\n\r\n\
             @ uses-virtual\r\ncategory: Devel\r\nversion: 1\r\ndepends2: perl\r\n",
            a = sha('a'),
            b = sha('b'),
            c = sha('c'),
            d = sha('D'),
            e = sha('e'),
            f = sha('f'),
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("setup.ini");
        fs::write(&path, &text).expect("write");
        compare_with_rust(&path, &text, &[]);
        compare_with_rust(&path, &text, &["labelled", "uses-virtual"]);
        compare_with_rust(&path, &text, &["perl"]);
    }

    #[test]
    fn nix_reports_unknown_packages_like_rust() {
        if !nix_available() {
            return;
        }
        let ini = fixtures().join("setup.ini");
        let expr = format!("({}).closure", repo_expr(&ini, &["no-such-package"], "file:///nowhere"));
        let err = nix_eval(&expr).expect_err("unknown package");
        assert!(
            err.contains("cygwin package 'no-such-package' (requested for installation) is not in setup.ini"),
            "{err}"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let broken = dir.path().join("setup.ini");
        fs::write(&broken, "@ openssh\ndepends2: foo (>= 2)\n@ cygrunsrv\n").expect("write");
        let err = nix_eval(&format!("({}).closure", repo_expr(&broken, &[], "file:///nowhere")))
            .expect_err("missing dependency");
        assert!(err.contains("cygwin package 'foo' (required by 'openssh') is not in setup.ini"), "{err}");
    }

    /// Builds the fixture repository with nix/cygwin.nix from a file:// mirror (a real build:
    /// it writes to the Nix store and needs the host's /usr and /bin in the sandbox), then
    /// media from the result.
    #[test]
    fn nix_builds_the_fixture_repository_offline_and_media_accept_it() {
        let Some(tools) = tools() else { return };
        if !crate::tools::test_requires("nix-build", crate::tools::find("nix-build").is_ok()) {
            return;
        }
        let repo = fixture_repo();
        let mirror = format!("file://{}/{}/{}", repo.display(), names::CYGWIN_PACKAGES_DIR, cygwin::LOCAL_MIRROR_DIR);
        let ini = repo.join(names::CYGWIN_PACKAGES_DIR).join(LOCAL_SETUP_INI);
        let expr = repo_expr(&ini, &["make"], &mirror);
        let output = Command::new("nix-build")
            .args(["--no-out-link", "--option", "sandbox", "true", "--option", "sandbox-paths"])
            .arg(format!("/usr /lib /lib64 /bin=/usr/bin {}", fixtures().display()))
            .args(["-E", &expr])
            .env("NIX_CONFIG", "build-users-group =\nsubstituters =")
            .output()
            .expect("nix-build runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let built = PathBuf::from(String::from_utf8(output.stdout).expect("utf-8").trim());
        let mut built_files = Vec::new();
        collect_files(&built, &built, &mut built_files);
        let mut fixture_files = Vec::new();
        collect_files(&repo, &repo, &mut fixture_files);
        assert_eq!(built_files, fixture_files);
        for rel in &built_files {
            assert_eq!(fs::read(built.join(rel)).expect("built"), fs::read(repo.join(rel)).expect("fixture"), "{rel}");
        }
        let out = tempfile::tempdir().expect("temp dir");
        let opts = image_options("Windows 11 Pro", true, &["make"]);
        let summary = build_media(&opts, WINDOWS_DISK_SIZE_MIB, KEY, Some(&built), out.path(), &tools).expect("media");
        assert!(summary.cygwin_packages_present && summary.cygwin_closure.contains(&"make".to_string()));
        println!("{}", fs::read_to_string(out.path().join(README_TXT)).expect("README"));
        println!("{}", fs::read_to_string(out.path().join(META_JSON)).expect("meta.json"));
    }

    /// Evaluates the derivations (no build, no network): every archive is a fixed-output
    /// fetch pinned by the SHA-512 of setup.ini.
    #[test]
    fn nix_fetches_are_fixed_output_sha512() {
        if !nix_available() {
            return;
        }
        let ini = fixtures().join("setup.ini");
        let expr = format!(
            "let r = {}; links = r.drvAttrs.archiveLinks; \
             fetches = builtins.genList (i: builtins.elemAt links (2 * i + 1)) (builtins.length links / 2); in \
             {{ drv = r.drvPath; fetches = map (f: {{ inherit (f) outputHash outputHashAlgo outputHashMode url; drv = f.drvPath; }}) fetches; \
                paths = builtins.genList (i: builtins.elemAt links (2 * i)) (builtins.length links / 2); }}",
            repo_expr(&ini, &["make"], "https://mirror.invalid/cygwin")
        );
        let nix = nix_eval(&expr).unwrap_or_else(|e| panic!("nix-instantiate failed: {e}"));
        assert!(nix["drv"].as_str().expect("drv").ends_with("-cygwin-repo.drv"));
        let parsed = SetupIni::parse(FIXTURE_INI).expect("parses");
        let roots = base_roots(&parsed, &["make".to_string()]);
        let root_refs: Vec<&str> = roots.iter().map(String::as_str).collect();
        let pkgs = closure(&parsed, &root_refs).expect("closure");
        let installs: Vec<_> = pkgs.iter().filter_map(|p| p.install.as_ref()).collect();
        let fetches = nix["fetches"].as_array().expect("fetches");
        assert_eq!(fetches.len(), installs.len());
        for (fetch, install) in fetches.iter().zip(&installs) {
            assert_eq!(fetch["outputHashAlgo"], "sha512");
            assert_eq!(fetch["outputHash"], install.sha512.as_str());
            assert_eq!(fetch["outputHashMode"], "flat");
            assert_eq!(fetch["url"], format!("https://mirror.invalid/cygwin/{}", install.path).as_str());
        }
        let paths: Vec<&str> = installs.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(nix["paths"], serde_json::json!(paths));
    }
}
