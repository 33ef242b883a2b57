//! The build's outputs come back from the guest as one tar stream, written by the guest onto
//! its outputs disk (a raw disk that the builder made empty for this build): a tar made on the
//! guest's own disk keeps symbolic links and exec bits, which an SMB share would not, and a
//! disk is many times faster than the share. This reads that stream (it ends at tar's
//! end-of-archive marker; the rest of the disk is never read) and recreates its entries under
//! the declared output paths, and nowhere else.
//!
//! What the guests write (ustar, GNU and pax headers) is read by [`crate::format::tar`].
//! Entries: regular files, folders, symbolic links and hard links; any other kind is refused.
//! Modes: only the owner's exec bit is kept, the one Nix looks at when it canonicalises the
//! outputs. The archive is read once, in order, through a fixed buffer.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::format::tar::{self, CopyError, TarError};

/// One large read buffer: the archive is read once, in order.
const READ_BUFFER_BYTES: usize = 1 << 20;

/// What one archive put in place.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// Output paths the archive held (the others the build did not make).
    pub paths: usize,
    /// Files, folders and links made.
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("reading the outputs archive: {0}")]
    Read(#[source] io::Error),
    /// The stream ended inside an entry or before the end-of-archive marker.
    #[error("the outputs archive is truncated: it ends at byte {offset}, in {reading}")]
    Truncated { offset: u64, reading: &'static str },
    #[error("the outputs archive has a bad header at byte {offset}: {detail}")]
    BadHeader { offset: u64, detail: String },
    #[error("the outputs archive holds '{name}', an absolute path; its names must be relative to the store")]
    AbsolutePath { name: String },
    #[error("the outputs archive holds '{name}', which climbs out with '..'")]
    ParentComponent { name: String },
    #[error("the outputs archive has an entry without a name at byte {offset}")]
    EmptyName { offset: u64 },
    /// The name's first component is none of the build's outputs.
    #[error("the outputs archive holds '{name}', which is outside the build's outputs ({outputs})")]
    Undeclared { name: String, outputs: String },
    /// Below something the archive made as a file or a link: a write through a symbolic link
    /// could land anywhere.
    #[error(
        "the outputs archive holds '{name}' below a file or symbolic link it made earlier; it is not unpacked through a link"
    )]
    BelowNonFolder { name: String },
    #[error("the outputs archive holds '{name}' twice")]
    Duplicate { name: String },
    #[error("the outputs archive links '{name}' to '{target}', which is not a file the archive made before")]
    HardLinkTarget { name: String, target: String },
    #[error(
        "the outputs archive holds '{name}' of tar type '{}', which is not a file, folder or link",
        kind.escape_ascii()
    )]
    Unsupported { name: String, kind: u8 },
    #[error("{} exists already; an output is only ever made by the archive", path.display())]
    AlreadyExists { path: PathBuf },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

impl From<TarError> for UnpackError {
    fn from(error: TarError) -> UnpackError {
        match error {
            TarError::Read(e) => UnpackError::Read(e),
            TarError::Truncated { offset, reading } => UnpackError::Truncated { offset, reading },
            TarError::BadHeader { offset, detail } => UnpackError::BadHeader { offset, detail },
        }
    }
}

/// What the archive made at a path, so that later entries are checked against it without a
/// look at the file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Made {
    Folder,
    File,
    Link,
}

fn shown(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// Where an archive name lands: under the output whose store name is its first component.
struct Outputs<'a> {
    by_name: HashMap<&'a OsStr, &'a Path>,
}

impl<'a> Outputs<'a> {
    fn new(paths: &'a [PathBuf]) -> Outputs<'a> {
        Outputs { by_name: paths.iter().filter_map(|p| Some((p.file_name()?, p.as_path()))).collect() }
    }

    fn listed(&self) -> String {
        let mut names: Vec<String> = self.by_name.keys().map(|n| n.to_string_lossy().into_owned()).collect();
        names.sort();
        names.join(", ")
    }

    /// The output's path and the entry's path below it.
    fn resolve(&self, name: &[u8], offset: u64) -> Result<(&'a Path, PathBuf), UnpackError> {
        if name.first() == Some(&b'/') {
            return Err(UnpackError::AbsolutePath { name: shown(name) });
        }
        let mut parts = name.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".");
        let first = parts.next().ok_or(UnpackError::EmptyName { offset })?;
        if first == b".." {
            return Err(UnpackError::ParentComponent { name: shown(name) });
        }
        let root = *self
            .by_name
            .get(OsStr::from_bytes(first))
            .ok_or_else(|| UnpackError::Undeclared { name: shown(name), outputs: self.listed() })?;
        let mut path = root.to_path_buf();
        for part in parts {
            if part == b".." {
                return Err(UnpackError::ParentComponent { name: shown(name) });
            }
            path.push(OsStr::from_bytes(part));
        }
        Ok((root, path))
    }
}

struct Writer {
    made: HashMap<PathBuf, Made>,
    roots: HashSet<PathBuf>,
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            UnpackError::AlreadyExists { path: path.to_path_buf() }
        } else {
            UnpackError::Write { path: path.to_path_buf(), source }
        }
    }
}

impl Writer {
    /// Every folder from the output down to `path`'s parent exists and was made as a folder by
    /// this archive; the ones the archive did not list are made here.
    fn parents(&mut self, root: &Path, path: &Path, name: &[u8]) -> Result<(), UnpackError> {
        self.roots.insert(root.to_path_buf());
        let Some(parent) = path.parent() else { return Ok(()) };
        if path == root {
            return Ok(());
        }
        let mut at = root.to_path_buf();
        let below = parent.strip_prefix(root).unwrap_or(Path::new(""));
        let mut step = |at: &Path| -> Result<(), UnpackError> {
            match self.made.get(at) {
                Some(Made::Folder) => Ok(()),
                Some(_) => Err(UnpackError::BelowNonFolder { name: shown(name) }),
                None => {
                    DirBuilder::new().mode(0o755).create(at).map_err(write_err(at))?;
                    self.made.insert(at.to_path_buf(), Made::Folder);
                    Ok(())
                }
            }
        };
        step(&at)?;
        for c in below.components() {
            at.push(c);
            step(&at)?;
        }
        Ok(())
    }

    fn claim(&mut self, path: &Path, name: &[u8], made: Made) -> Result<(), UnpackError> {
        if self.made.contains_key(path) {
            return Err(UnpackError::Duplicate { name: shown(name) });
        }
        self.made.insert(path.to_path_buf(), made);
        Ok(())
    }
}

/// Unpacks `archive` into `outputs` (absolute store paths; an entry's first name component is
/// an output's store name). Nothing outside them is written, and nothing that exists is
/// replaced.
pub fn unpack(archive: impl Read, outputs: &[PathBuf]) -> Result<Unpacked, UnpackError> {
    let outputs = Outputs::new(outputs);
    let mut r = tar::Reader::new(archive, READ_BUFFER_BYTES);
    let mut w = Writer { made: HashMap::new(), roots: HashSet::new() };
    let mut summary = Unpacked::default();
    while let Some(entry) = r.next_entry()? {
        let (name, link, offset) = (&entry.name, &entry.link, entry.offset);
        let (root, path) = outputs.resolve(name, offset)?;
        w.parents(root, &path, name)?;
        match entry.kind {
            b'0' | 0 | b'7' => {
                w.claim(&path, name, Made::File)?;
                // Nix keeps the owner's exec bit and sets the rest itself.
                let mode = if entry.mode()? & 0o100 != 0 { 0o755 } else { 0o644 };
                let mut file =
                    OpenOptions::new().write(true).create_new(true).mode(mode).open(&path).map_err(write_err(&path))?;
                r.copy_data(&mut file).map_err(|e| match e {
                    CopyError::Archive(e) => e.into(),
                    CopyError::Write(source) => UnpackError::Write { path: path.clone(), source },
                })?;
                summary.bytes += entry.size;
            }
            b'5' => {
                if w.made.get(&path) != Some(&Made::Folder) {
                    w.claim(&path, name, Made::Folder)?;
                    DirBuilder::new().mode(0o755).create(&path).map_err(write_err(&path))?;
                }
            }
            b'2' => {
                w.claim(&path, name, Made::Link)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(link), &path).map_err(write_err(&path))?;
            }
            b'1' => {
                let target = match outputs.resolve(link, offset) {
                    Ok((_, target)) if w.made.get(&target) == Some(&Made::File) => target,
                    _ => return Err(UnpackError::HardLinkTarget { name: shown(name), target: shown(link) }),
                };
                w.claim(&path, name, Made::File)?;
                if std::fs::hard_link(&target, &path).is_err() {
                    // A file system without hard links: a copy is the same to Nix.
                    std::fs::copy(&target, &path).map_err(write_err(&path))?;
                }
            }
            other => return Err(UnpackError::Unsupported { name: shown(name), kind: other }),
        }
        summary.entries += 1;
    }
    summary.paths = w.roots.len();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tar::tests::Tar;
    use std::os::unix::fs::PermissionsExt;

    fn store() -> (tempfile::TempDir, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let outs = vec![dir.path().join("aaaa-t"), dir.path().join("bbbb-t-dev")];
        (dir, outs)
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn files_folders_links_and_long_names_arrive_with_their_exec_bits() {
        let (_dir, outs) = store();
        let long = format!("aaaa-t/{}/Grüße-ünïcode-日本", "d".repeat(120));
        let archive = Tar::default()
            .entry("aaaa-t/", b'5', 0o755, b"", "")
            .entry("aaaa-t/bin/", b'5', 0o755, b"", "")
            .entry("aaaa-t/bin/run", b'0', 0o755, b"#!/bin/sh\n", "")
            .entry("aaaa-t/data", b'0', 0o644, b"plain", "")
            .entry("aaaa-t/empty/", b'5', 0o755, b"", "")
            .entry("aaaa-t/rel", b'2', 0o777, b"", "bin/run")
            .entry("aaaa-t/abs", b'2', 0o777, b"", "/nix/store/aaaa-t/data")
            .entry("aaaa-t/hard", b'1', 0o644, b"", "aaaa-t/data")
            .gnu_long(b'L', long.as_bytes())
            .entry("ignored", b'0', 0o644, b"long", "")
            .gnu_long(b'K', format!("/{}", "k".repeat(150)).as_bytes())
            .entry("aaaa-t/longlink", b'2', 0o777, b"", "ignored")
            .pax(&[("path", "bbbb-t-dev/pax-näme".as_bytes()), ("mtime", b"1.5")])
            .entry("ignored-too", b'0', 0o644, b"pax", "")
            .end();
        let done = unpack(&archive[..], &outs).unwrap();
        assert_eq!(done, Unpacked { paths: 2, entries: 11, bytes: 10 + 5 + 4 + 3 });
        let a = &outs[0];
        assert_eq!(std::fs::read(a.join("bin/run")).unwrap(), b"#!/bin/sh\n");
        assert_eq!(mode(&a.join("bin/run")), 0o755);
        assert_eq!(mode(&a.join("data")), 0o644);
        assert!(a.join("empty").is_dir() && std::fs::read_dir(a.join("empty")).unwrap().count() == 0);
        assert_eq!(std::fs::read_link(a.join("rel")).unwrap(), Path::new("bin/run"));
        assert_eq!(std::fs::read_link(a.join("abs")).unwrap(), Path::new("/nix/store/aaaa-t/data"));
        assert_eq!(std::fs::read(a.join("hard")).unwrap(), b"plain");
        assert_eq!(std::fs::read(a.join(&long["aaaa-t/".len()..])).unwrap(), b"long");
        assert_eq!(std::fs::read_link(a.join("longlink")).unwrap(), PathBuf::from(format!("/{}", "k".repeat(150))));
        assert_eq!(std::fs::read(outs[1].join("pax-näme")).unwrap(), b"pax");
    }

    #[test]
    fn an_output_may_be_a_single_file_or_link_and_missing_outputs_stay_missing() {
        let (_dir, outs) = store();
        let archive = Tar::default().entry("aaaa-t", b'0', 0o555, b"lib\n", "").end();
        assert_eq!(unpack(&archive[..], &outs).unwrap(), Unpacked { paths: 1, entries: 1, bytes: 4 });
        assert_eq!(std::fs::read(&outs[0]).unwrap(), b"lib\n");
        assert_eq!(mode(&outs[0]), 0o755);
        assert!(!outs[1].exists());
        let (_dir, outs) = store();
        let archive = Tar::default().entry("./bbbb-t-dev", b'2', 0o777, b"", "/nix/store/x").end();
        unpack(&archive[..], &outs).unwrap();
        assert_eq!(std::fs::read_link(&outs[1]).unwrap(), Path::new("/nix/store/x"));
    }

    #[test]
    fn a_large_file_streams_through_in_pieces() {
        let (_dir, outs) = store();
        let big: Vec<u8> = (0..3 * READ_BUFFER_BYTES + 77).map(|i| (i * 7 % 251) as u8).collect();
        let archive = Tar::default().entry("aaaa-t", b'0', 0o644, &big, "").end();
        // A reader that hands out odd-sized pieces, as a network file system may.
        struct Dribble<'a>(&'a [u8]);
        impl Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(70_001);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        assert_eq!(unpack(Dribble(&archive), &outs).unwrap().bytes, big.len() as u64);
        assert!(std::fs::read(&outs[0]).unwrap() == big);
    }

    fn refused(archive: &[u8]) -> (String, tempfile::TempDir) {
        let (dir, outs) = store();
        let e = unpack(archive, &outs).unwrap_err().to_string();
        (e, dir)
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut all = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            all.push(e.unwrap().file_name().to_string_lossy().into_owned());
        }
        all.sort();
        all
    }

    #[test]
    fn a_malicious_archive_writes_nothing_outside_the_outputs() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                Tar::default().entry("/etc/passwd", b'0', 0o644, b"x", "").end(),
                "the outputs archive holds '/etc/passwd', an absolute path; its names must be relative to the store",
            ),
            (
                Tar::default().entry("aaaa-t/../../escape", b'0', 0o644, b"x", "").end(),
                "the outputs archive holds 'aaaa-t/../../escape', which climbs out with '..'",
            ),
            (
                Tar::default().entry("../escape", b'0', 0o644, b"x", "").end(),
                "the outputs archive holds '../escape', which climbs out with '..'",
            ),
            (
                Tar::default().entry("cccc-other/x", b'0', 0o644, b"x", "").end(),
                "the outputs archive holds 'cccc-other/x', which is outside the build's outputs (aaaa-t, bbbb-t-dev)",
            ),
            (
                Tar::default().gnu_long(b'L', b"/tmp/escape").entry("aaaa-t/x", b'0', 0o644, b"x", "").end(),
                "the outputs archive holds '/tmp/escape', an absolute path; its names must be relative to the store",
            ),
            (
                Tar::default().pax(&[("path", b"aaaa-t/../zzzz")]).entry("aaaa-t/x", b'0', 0o644, b"x", "").end(),
                "the outputs archive holds 'aaaa-t/../zzzz', which climbs out with '..'",
            ),
            (
                // A link out, then a write through it.
                Tar::default()
                    .entry("aaaa-t/", b'5', 0o755, b"", "")
                    .entry("aaaa-t/l", b'2', 0o777, b"", "/tmp")
                    .entry("aaaa-t/l/escape", b'0', 0o644, b"x", "")
                    .end(),
                "the outputs archive holds 'aaaa-t/l/escape' below a file or symbolic link it made earlier; it is not unpacked through a link",
            ),
            (
                Tar::default()
                    .entry("aaaa-t/f", b'0', 0o644, b"x", "")
                    .entry("aaaa-t/f", b'0', 0o644, b"y", "")
                    .end(),
                "the outputs archive holds 'aaaa-t/f' twice",
            ),
            (
                Tar::default().entry("aaaa-t/h", b'1', 0o644, b"", "/etc/shadow").end(),
                "the outputs archive links 'aaaa-t/h' to '/etc/shadow', which is not a file the archive made before",
            ),
            (
                Tar::default().entry("aaaa-t/dev", b'3', 0o644, b"", "").end(),
                "the outputs archive holds 'aaaa-t/dev' of tar type '3', which is not a file, folder or link",
            ),
        ];
        for (archive, message) in cases {
            let (e, dir) = refused(&archive);
            assert_eq!(e, message);
            // At most the named output's own folder was begun; nothing landed beside it.
            let left: Vec<String> = files_in(dir.path()).into_iter().filter(|n| n != "aaaa-t").collect();
            assert!(left.is_empty(), "{message}: {left:?}");
            if dir.path().join("aaaa-t").is_dir() {
                for f in files_in(&dir.path().join("aaaa-t")) {
                    assert!(["f", "l"].contains(&f.as_str()), "{message}: {f}");
                }
            }
        }
    }

    #[test]
    fn damaged_archives_are_refused_with_the_place() {
        let good = Tar::default().entry("aaaa-t", b'0', 0o644, &[7u8; 1000], "").end();
        let (e, _d) = refused(&good[..700]);
        assert_eq!(e, "the outputs archive is truncated: it ends at byte 700, in an entry's data");
        let (e, _d) = refused(&good[..1536]);
        assert_eq!(e, "the outputs archive is truncated: it ends at byte 1536, in the end-of-archive marker");
        let (e, _d) = refused(&good[..1600]);
        assert_eq!(e, "the outputs archive is truncated: it ends at byte 1600, in a header");
        let mut bad = good.clone();
        bad[3] ^= 1;
        let (e, _d) = refused(&bad);
        assert!(e.starts_with("the outputs archive has a bad header at byte 0: checksum"), "{e}");
        let (e, _d) = refused(b"");
        assert_eq!(e, "the outputs archive is truncated: it ends at byte 0, in the end-of-archive marker");
    }

    #[test]
    fn an_existing_output_is_not_replaced() {
        let (_dir, outs) = store();
        std::fs::write(&outs[0], b"old").unwrap();
        let archive = Tar::default().entry("aaaa-t", b'0', 0o644, b"new", "").end();
        let e = unpack(&archive[..], &outs).unwrap_err();
        assert!(matches!(e, UnpackError::AlreadyExists { .. }), "{e}");
        assert_eq!(std::fs::read(&outs[0]).unwrap(), b"old");
    }

    /// What a tree holds, as (relative name, kind and content) lines, for comparing two.
    fn describe(root: &Path) -> Vec<String> {
        let mut lines = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(p) = stack.pop() {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                lines.push(format!("{rel} -> {}", std::fs::read_link(&p).unwrap().display()));
            } else if meta.is_dir() {
                lines.push(format!("{rel}/"));
                stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            } else {
                let exec = meta.permissions().mode() & 0o100 != 0;
                lines.push(format!("{rel} exec={exec} {:?}", std::fs::read(&p).unwrap()));
            }
        }
        lines.sort();
        lines
    }

    /// The archives the guests' tars write (busybox's ustar, GNU's own format, and pax for good
    /// measure), made by the real programs when this machine has them.
    #[test]
    fn archives_of_the_real_tars_round_trip() {
        let src = tempfile::tempdir().unwrap();
        let tree = src.path().join("aaaa-t");
        let long = "l".repeat(140);
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::create_dir_all(tree.join("empty")).unwrap();
        std::fs::create_dir_all(tree.join(&long)).unwrap();
        std::fs::write(tree.join("bin/run"), b"#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(tree.join("bin/run"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(tree.join("Grüße-ünïcode-日本"), "grüße\n").unwrap();
        std::fs::write(tree.join(&long).join(&long), b"deep").unwrap();
        std::fs::hard_link(tree.join("bin/run"), tree.join("bin/run-again")).unwrap();
        std::os::unix::fs::symlink("bin/run", tree.join("rel")).unwrap();
        std::os::unix::fs::symlink(format!("/nix/store/aaaa-t/{long}/{long}"), tree.join("abs")).unwrap();
        std::fs::write(src.path().join("bbbb-t-dev"), b"single file output").unwrap();
        let tars: [(&str, &[&str]); 3] = [
            ("busybox", &["tar", "-c", "-f"]),
            ("tar", &["--format=gnu", "-c", "-f"]),
            ("tar", &["--format=pax", "-c", "-f"]),
        ];
        for (program, args) in tars {
            if !crate::tools::test_requires(program, crate::tools::find(program).is_ok()) {
                continue;
            }
            let archive = src.path().join("outputs.tar");
            let made = std::process::Command::new(program)
                .args(args)
                .arg(&archive)
                .arg("-C")
                .arg(src.path())
                .args(["aaaa-t", "bbbb-t-dev"])
                .status()
                .unwrap();
            assert!(made.success(), "{program} {args:?}");
            let (_dir, outs) = store();
            let done = unpack(std::fs::File::open(&archive).unwrap(), &outs).unwrap();
            assert_eq!(done.paths, 2, "{program} {args:?}");
            assert_eq!(describe(&outs[0]), describe(&tree), "{program} {args:?}");
            assert_eq!(std::fs::read(&outs[1]).unwrap(), b"single file output");
            std::fs::remove_file(&archive).unwrap();
        }
    }
}
