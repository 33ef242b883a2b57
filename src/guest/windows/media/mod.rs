//! The Windows guest's install media, as the media stage writes them into its output:
//!
//! | file | what |
//! | --- | --- |
//! | `autounattend.xml` | the answer file as far as the media can tell ([`answer::autounattend_xml`]): the image by name, only the user's key. The install stage writes the one it boots with ([`write_answer_medium`]) |
//! | `cygwin.img` | a raw disk: MBR, one FAT16/FAT32 partition at 1 MiB holding the marker, `install.cmd`, `bootstrap.sh`, `map-shares.sh` and, given a Cygwin repository, `setup-x86_64.exe` + `cygwin-packages/` |
//! | `install.cmd`, `bootstrap.sh`, `map-shares.sh` | the scripts, also as plain files: to read, and for the suspend stage, which runs `map-shares.sh` over SSH |
//! | `media.json` | [`MediaSummary`] (not the image's `meta.json`, which the suspend stage writes) |
//! | `README.txt` | what these files are, and what is missing |
//!
//! This module assembles them and is what the stages call. The pieces: [`names`], the names on
//! `cygwin.img` the answer file and scripts rely on; `repo`, the check of a Cygwin repository;
//! `disk`, `cygwin.img` through mtools; `readme`, the text of `README.txt`.
//!
//! The media are built even without a Cygwin repository, so the answer file and scripts can be
//! inspected offline; the summary records the gap and [`ensure_ready_for_install`] refuses
//! such media. A given repository is checked before anything is written, so a missing or
//! corrupt archive fails here rather than an hour into a Windows install.
//!
//! The install stage reads the ISO (the media stage does not need it): it picks the image by
//! its index in install.wim and the product key of its EditionID ([`super::editions`]), and
//! writes the answer file it boots with into its work folder, on a floppy (BIOS) or a small
//! CD (UEFI, where Setup does not look at floppies): [`write_answer_medium`].
//! [`install_drive_args`] gives the QEMU storage devices the install stage attaches.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::cygwin::{ClosureError, SetupIniError, REQUIRED_PACKAGES};
use super::{answer, scripts, WindowsOptions};
use crate::spec::WindowsOptionsError;
use crate::tools::{self, MissingTool};
use disk::{build_fat_disk, build_floppy, FatContent};
use readme::readme_text;
use repo::inspect_repo;

mod disk;
pub mod names;
mod readme;
mod repo;
#[cfg(test)]
mod test_util;

pub const AUTOUNATTEND_XML: &str = "autounattend.xml";
pub const ANSWER_IMG: &str = "answer.img";
pub const CYGWIN_IMG: &str = "cygwin.img";
pub const MAP_SHARES_SH: &str = "map-shares.sh";
/// The [`MediaSummary`]; named apart from the image's `meta.json`, a different record.
pub const MEDIA_JSON: &str = "media.json";
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

/// What [`build_media`] wrote; also `media.json`.
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

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("windows image options: {0}")]
    InvalidOptions(#[source] WindowsOptionsError),
    #[error("the SSH public key for the guest {reason}")]
    InvalidAuthorizedKey { reason: &'static str },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "the Cygwin repository (cygwinRepo) has no {what} at {}; build it with nix/cygwin.nix \
         (see docs/WINDOWS.md)",
        path.display()
    )]
    RepoMissing { path: PathBuf, what: &'static str },
    #[error("{}: {error}", path.display())]
    SetupIni {
        path: PathBuf,
        #[source]
        error: SetupIniError,
    },
    #[error("{error} ({})", setup_ini.display())]
    Closure {
        setup_ini: PathBuf,
        #[source]
        error: ClosureError,
    },
    #[error(
        "the Cygwin repository lacks the archive of package '{package}' ({}); build cygwinRepo \
         with the same packages as the image's cygwinPackages",
        path.display()
    )]
    ArchiveMissing { package: String, path: PathBuf },
    #[error(
        "the archive of cygwin package '{package}' ({}) has {found} bytes, setup.ini says {expected}",
        path.display()
    )]
    ArchiveSize { package: String, path: PathBuf, expected: u64, found: u64 },
    #[error(
        "the archive of cygwin package '{package}' ({}) has SHA-512 {found}, setup.ini says {expected}",
        path.display()
    )]
    ArchiveHash { package: String, path: PathBuf, expected: String, found: String },
    #[error("{} cannot go on a FAT file system: {reason}", path.display())]
    NotOnFat { path: PathBuf, reason: &'static str },
    #[error("cannot run {}: {source}", tool.display())]
    ToolStart { tool: PathBuf, source: io::Error },
    #[error("{} {args} failed ({status}){}", tool.display(), stderr_tail(stderr))]
    ToolFailed { tool: PathBuf, args: String, status: String, stderr: String },
    #[error("unexpected output from {}: {detail}", tool.display())]
    ToolOutput { tool: PathBuf, detail: String },
    #[error("{} is not the summary of nix-winvm Windows media: {detail}", path.display())]
    Summary { path: PathBuf, detail: String },
    #[error(
        "the install media {} hold no Cygwin packages, so the install cannot run: build a local \
         package directory with nix/cygwin.nix and pass it as cygwinRepo to builtins.windowsImage \
         (see docs/WINDOWS.md)",
        media.display()
    )]
    CygwinPackagesMissing { media: PathBuf },
    #[error("{0}")]
    MissingTool(#[source] MissingTool),
}

/// `: STDERR` when the tool wrote something.
fn stderr_tail(stderr: &str) -> String {
    let stderr = stderr.trim();
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

/// Writes the media into `out`, which exists. `disk_size_mib` is the image's disk size (the
/// options are validated with it: Windows needs 32 GiB); `authorized_key` is the public key
/// the controller logs in with, one line; `cygwin_repo` is the local package directory
/// (`setup-x86_64.exe` and `cygwin-packages/`, as nix/cygwin.nix builds it).
pub fn build_media(
    opts: &WindowsOptions,
    efi: bool,
    disk_size_mib: u64,
    authorized_key: &str,
    cygwin_repo: Option<&Path>,
    out: &Path,
    tools: &MediaTools,
) -> Result<MediaSummary, MediaError> {
    opts.validate(disk_size_mib).map_err(MediaError::InvalidOptions)?;
    let key = single_line_key(authorized_key)?;
    // Checked first: a bad repository should fail before anything is written.
    let repo = cygwin_repo.map(|root| inspect_repo(root, opts, tools)).transpose()?;

    let mut files = Vec::new();
    let mut write = |name: &str, bytes: &[u8]| -> Result<PathBuf, MediaError> {
        let path = out.join(name);
        fs::write(&path, bytes).map_err(|source| MediaError::Write { path: path.clone(), source })?;
        files.push(name.to_string());
        Ok(path)
    };

    let xml = answer::autounattend_xml(opts, efi, None);
    write(AUTOUNATTEND_XML, xml.as_bytes())?;
    let install_cmd = write(names::INSTALL_CMD, scripts::install_cmd(opts).as_bytes())?;
    let bootstrap = write(names::BOOTSTRAP_SH, scripts::bootstrap_sh(key, opts).as_bytes())?;
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
    requested.extend(opts.cygwin_packages.iter().cloned());
    requested.sort();
    requested.dedup();
    files.push(MEDIA_JSON.to_string());
    files.push(README_TXT.to_string());
    files.sort();
    let summary = MediaSummary {
        format: MEDIA_FORMAT,
        edition: opts.edition.clone(),
        efi,
        locale: opts.locale.clone(),
        product_key_given: opts.product_key.is_some(),
        hardware_check_bypass: opts.needs_hardware_check_bypass(),
        install_commands: opts.install_commands.len(),
        requested_packages: requested,
        cygwin_packages_present: repo.is_some(),
        cygwin_closure: repo.as_ref().map(|r| r.closure.clone()).unwrap_or_default(),
        cygwin_archive_bytes: repo.as_ref().map_or(0, |r| r.archive_bytes),
        cygwin_hashes_checked: repo.as_ref().is_some_and(|r| r.hashes_checked),
        cygwin_image_bytes: image.bytes,
        cygwin_filesystem: image.filesystem.to_string(),
        files,
    };
    let summary_path = out.join(MEDIA_JSON);
    let json = serde_json::to_string_pretty(&summary)
        .map_err(|e| MediaError::Write { path: summary_path.clone(), source: io::Error::other(e) })?;
    fs::write(&summary_path, json + "\n").map_err(|source| MediaError::Write { path: summary_path.clone(), source })?;
    let readme = out.join(README_TXT);
    fs::write(&readme, readme_text(&summary)).map_err(|source| MediaError::Write { path: readme.clone(), source })?;
    Ok(summary)
}

/// Reads `media.json` of media built by [`build_media`].
pub fn read_summary(media: &Path) -> Result<MediaSummary, MediaError> {
    let path = media.join(MEDIA_JSON);
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
    let path = media.join(CYGWIN_IMG);
    fs::metadata(&path).map_err(|source| MediaError::Read { path, source })?;
    Ok(summary)
}

/// Where Setup finds the answer file: a floppy under the BIOS; a CD under UEFI, whose
/// firmware has no floppy driver (Setup searches the root of every removable drive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerMedium {
    Floppy(PathBuf),
    Cd(PathBuf),
}

/// The answer CD's volume label and file (`xorriso`, ISO 9660 with Joliet).
pub const ANSWER_ISO: &str = "answer.iso";

/// Writes the answer file the install boots with into `dir`: `autounattend.xml` for
/// `image`, the selection read from the ISO, and the medium holding it (`answer.img` or
/// `answer.iso`). Same inputs, same bytes: mtools and xorriso take SOURCE_DATE_EPOCH, and the
/// floppy's serial number is fixed.
pub fn write_answer_medium(
    opts: &WindowsOptions,
    efi: bool,
    image: &super::editions::Selection,
    dir: &Path,
) -> Result<AnswerMedium, MediaError> {
    let xml = answer::autounattend_xml(opts, efi, Some(image));
    let xml_path = dir.join(AUTOUNATTEND_XML);
    fs::write(&xml_path, &xml).map_err(|source| MediaError::Write { path: xml_path.clone(), source })?;
    if !efi {
        let path = dir.join(ANSWER_IMG);
        build_floppy(&path, ANSWER_LABEL, &xml_path)?;
        return Ok(AnswerMedium::Floppy(path));
    }
    let xorriso = tools::find("xorriso").map_err(MediaError::MissingTool)?;
    // Only the answer file goes on the CD: a folder of its own.
    let content = dir.join("answer-cd");
    fs::create_dir_all(&content).map_err(|source| MediaError::Write { path: content.clone(), source })?;
    let inside = content.join(AUTOUNATTEND_XML);
    fs::write(&inside, &xml).map_err(|source| MediaError::Write { path: inside.clone(), source })?;
    let path = dir.join(ANSWER_ISO);
    let args: Vec<OsString> = vec![
        "-as".into(),
        "mkisofs".into(),
        "-quiet".into(),
        "-J".into(),
        "-r".into(),
        "-V".into(),
        ANSWER_LABEL.into(),
        "-o".into(),
        path.clone().into(),
        content.clone().into(),
    ];
    let output = std::process::Command::new(&xorriso)
        .args(&args)
        .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH.to_string())
        .output()
        .map_err(|source| MediaError::ToolStart { tool: xorriso.clone(), source })?;
    if !output.status.success() {
        return Err(MediaError::ToolFailed {
            tool: xorriso,
            args: args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(AnswerMedium::Cd(path))
}

/// The QEMU storage arguments of the install stage (`-machine q35`): the blank system disk on
/// AHCI port 0, so Windows numbers it disk 0, the disk the answer file wipes and installs to;
/// the ISO as a CD on port 1; `cygwin.img` on port 2 with `snapshot=on` (QEMU's IDE disks
/// refuse read-only images, and the guest's writes must not reach the store); the answer
/// medium, a removable medium whose root Setup searches for autounattend.xml: a floppy, or
/// (UEFI) a second CD on port 3. Boot order: the system disk (blank at first, so the firmware
/// moves on), then the installation CD; later reboots boot the installed disk, never the CD
/// again. Under UEFI the CD's boot loader asks for a key press on the first boot; the install
/// stage presses one (QMP `send-key`, see `Install::press_keys`).
/// The suspend and build stages must attach the system disk the same way (AHCI, port 0):
/// Windows boots only from the storage controller it was installed on. Not yet tried with
/// real Windows media.
pub fn install_drive_args(media: &Path, answer: &AnswerMedium, iso: &Path, system_disk: &Path) -> Vec<OsString> {
    let mut args = system_disk_args(system_disk);
    args.extend(drive("winvm-iso", iso, "format=raw,media=cdrom,readonly=on"));
    args.extend(device("ide-cd,drive=winvm-iso,bus=ide.1,bootindex=1"));
    args.extend(drive("winvm-cygwin", &media.join(CYGWIN_IMG), "format=raw,snapshot=on"));
    args.extend(device("ide-hd,drive=winvm-cygwin,bus=ide.2"));
    match answer {
        AnswerMedium::Floppy(img) => {
            args.extend(drive("winvm-answer", img, "format=raw,readonly=on"));
            args.extend(device("isa-fdc,id=winvm-fdc"));
            args.extend(device("floppy,drive=winvm-answer,bus=winvm-fdc.0"));
        }
        AnswerMedium::Cd(iso) => {
            args.extend(drive("winvm-answer", iso, "format=raw,media=cdrom,readonly=on"));
            args.extend(device("ide-cd,drive=winvm-answer,bus=ide.3"));
        }
    }
    args.extend(["-boot".into(), "strict=on".into()]);
    args
}

/// The system disk on AHCI port 0, as the install and every later stage attach it.
pub fn system_disk_args(system_disk: &Path) -> Vec<OsString> {
    let mut args = Vec::new();
    let options =
        format!("format=qcow2,cache=writeback,{},{}", crate::vm::qemu::DISK_DISCARD, crate::vm::qemu::DISK_ERRORS);
    args.extend(drive("winvm-system", system_disk, &options));
    args.extend(device("ide-hd,drive=winvm-system,bus=ide.0,bootindex=0"));
    args
}

fn drive(id: &str, file: &Path, options: &str) -> [OsString; 2] {
    let mut value = OsString::from(format!("if=none,id={id},file="));
    value.push(qemu_escape(file.as_os_str()));
    value.push(format!(",{options}"));
    ["-drive".into(), value]
}

fn device(value: &str) -> [OsString; 2] {
    ["-device".into(), value.into()]
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

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::test_util::*;
    use super::*;
    use crate::guest::windows::cygwin::LOCAL_SETUP_INI;
    use crate::guest::windows::test_util::tool_available;
    use crate::spec::WINDOWS_DISK_SIZE_MIB;

    fn compact(xml: &str) -> String {
        xml.lines().map(str::trim).collect()
    }

    #[test]
    fn media_without_a_repository_are_built_and_marked_incomplete() {
        let Some(tools) = tools() else { return };
        let out = tempfile::tempdir().expect("temp dir");
        let opts = image_options("Windows 11 Pro", &["make"]);
        let summary = build_media(&opts, true, WINDOWS_DISK_SIZE_MIB, KEY, None, out.path(), &tools).expect("media");
        assert!(!summary.cygwin_packages_present);
        assert!(summary.cygwin_closure.is_empty());
        assert_eq!(summary.requested_packages, ["cygrunsrv", "make", "openssh"]);
        assert_eq!(summary.cygwin_filesystem, "FAT16");
        assert!(summary.hardware_check_bypass && summary.efi);
        assert_eq!(read_summary(out.path()).expect("media.json"), summary);
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
        let opts = image_options("Windows 10 Pro", &["make"]);
        let repo = fixture_repo();
        let summary =
            build_media(&opts, false, WINDOWS_DISK_SIZE_MIB, KEY, Some(&repo), out.path(), &tools).expect("media");
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

    #[test]
    fn a_repository_of_symlinks_gives_the_same_image() {
        let Some(tools) = tools() else { return };
        let opts = image_options("Windows 10 Pro", &[]);
        let linked = copy_repo(true);
        let a = tempfile::tempdir().expect("temp dir");
        let b = tempfile::tempdir().expect("temp dir");
        build_media(&opts, false, WINDOWS_DISK_SIZE_MIB, KEY, Some(linked.path()), a.path(), &tools).expect("media");
        build_media(&opts, false, WINDOWS_DISK_SIZE_MIB, KEY, Some(&fixture_repo()), b.path(), &tools).expect("media");
        for name in [CYGWIN_IMG, MEDIA_JSON, README_TXT, AUTOUNATTEND_XML] {
            assert!(
                fs::read(a.path().join(name)).expect("a") == fs::read(b.path().join(name)).expect("b"),
                "{name} differs: the media are not reproducible"
            );
        }
    }

    #[test]
    fn bad_options_and_keys_are_refused_before_writing() {
        let Some(tools) = tools() else { return };
        let out = tempfile::tempdir().expect("temp dir");
        let mut opts = image_options("Windows 10 Pro", &[]);
        opts.product_key = Some("12345".into());
        let err = build_media(&opts, false, WINDOWS_DISK_SIZE_MIB, KEY, None, out.path(), &tools).expect_err("key");
        assert!(err.to_string().starts_with("windows image options: attribute 'productKey' (\"12345\")"), "{err}");
        let opts = image_options("Windows 10 Pro", &[]);
        let err = build_media(&opts, false, 1024, KEY, None, out.path(), &tools).expect_err("disk");
        assert!(matches!(err, MediaError::InvalidOptions(WindowsOptionsError::DiskTooSmall { .. })));
        let err =
            build_media(&opts, false, WINDOWS_DISK_SIZE_MIB, "a\nb", None, out.path(), &tools).expect_err("two lines");
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
        let opts = image_options("Windows 10 Pro", &[]);
        let err =
            build_media(&opts, false, WINDOWS_DISK_SIZE_MIB, KEY, None, out.path(), &tools).expect_err("no mformat");
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
        fs::write(media.join(ANSWER_IMG), vec![0u8; 1_474_560]).expect("floppy");
        fs::write(media.join(ANSWER_ISO), vec![0u8; 1 << 20]).expect("answer CD");
        fs::write(media.join(CYGWIN_IMG), vec![0u8; 1 << 20]).expect("disk");
        let iso = dir.path().join("win.iso");
        fs::write(&iso, vec![0u8; 1 << 20]).expect("iso");
        let disk = dir.path().join("disk.qcow2");
        let status = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&disk).arg("64M").status();
        assert!(status.expect("qemu-img").success());
        let floppy = qemu_info(&install_drive_args(&media, &AnswerMedium::Floppy(media.join(ANSWER_IMG)), &iso, &disk));
        assert!(floppy.contains("dev: floppy") && floppy.contains("drive = \"winvm-answer\""));
        assert!(floppy.contains("answer.img (raw, read-only)"));
        // UEFI: the answer on a second CD, on the last IDE port.
        let cd = qemu_info(&install_drive_args(&media, &AnswerMedium::Cd(media.join(ANSWER_ISO)), &iso, &disk));
        assert!(!cd.contains("dev: floppy"));
        assert!(cd.contains("answer.iso (raw, read-only)"), "{cd}");
        assert_eq!(cd.matches("dev: ide-cd").count(), 2, "{cd}");
    }

    /// `info block` and `info qtree` of a stopped QEMU with `args`; QEMU must not warn.
    fn qemu_info(args: &[OsString]) -> String {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-S", "-monitor", "stdio"])
            .args(args)
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
        assert!(stdout.contains("win.iso (raw, read-only)"));
        stdout.into_owned()
    }
}
