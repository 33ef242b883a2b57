//! Fixtures and mtools helpers shared by the media tests: the fixture repository, image
//! options, and reading files back from the FAT images the way Windows would see them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{MediaTools, CYGWIN_IMG, PARTITION_OFFSET};
use crate::spec::{IsoSource, WindowsOptions};

pub const KEY: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBHx= nix-winvm\n";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn fixture_repo() -> PathBuf {
    fixtures().join("cygwin-repo")
}

pub fn image_options(edition: &str, packages: &[&str]) -> WindowsOptions {
    WindowsOptions {
        iso: IsoSource::Fixed { name: "win.iso".into(), sha256: "0".repeat(64) },
        edition: edition.into(),
        product_key: None,
        locale: "en-US".into(),
        cygwin_packages: packages.iter().map(|p| p.to_string()).collect(),
        install_commands: vec!["echo hello".into()],
    }
}

/// The real tools, or None (and a message) when mtools is not installed.
pub fn tools() -> Option<MediaTools> {
    match MediaTools::find() {
        Ok(tools) => Some(tools),
        Err(err) => {
            crate::tools::test_requires(&err.to_string(), false);
            None
        }
    }
}

pub fn mtools(tool: &str, args: &[&str]) -> Vec<u8> {
    let output = Command::new(tool)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|err| panic!("{tool} did not run: {err}"));
    assert!(output.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

pub fn cygwin_target(out: &Path) -> String {
    format!("{}@@{PARTITION_OFFSET}", out.join(CYGWIN_IMG).display())
}

/// Every file on a FAT image, as full paths with their long names ("::/a/b").
pub fn listing(image: &str) -> Vec<String> {
    let text = String::from_utf8(mtools("mdir", &["-i", image, "-b", "-/", "::/"])).expect("utf-8");
    let mut files: Vec<String> = text.lines().map(|line| line.trim_end_matches('/').to_string()).collect();
    files.sort();
    files
}

pub fn mtype(image: &str, path: &str) -> Vec<u8> {
    mtools("mtype", &["-i", image, &format!("::/{path}")])
}

pub fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
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
pub fn copy_repo(link: bool) -> tempfile::TempDir {
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
