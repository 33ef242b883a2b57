//! The build's outputs come back from the guest as one tar stream, written by the guest onto
//! its outputs disk (a raw disk that the builder made empty for this build): a tar made on the
//! guest's own disk keeps symbolic links and exec bits, which an SMB share would not, and a
//! disk is many times faster than the share. This reads that stream (it ends at tar's
//! end-of-archive marker; the rest of the disk is never read) and recreates its entries under
//! the declared output paths, and nowhere else.
//!
//! What the guests write: ustar (busybox tar), GNU long names and link names (`L`, `K`: GNU
//! tar's `--format=gnu`, and busybox beyond 100 bytes) and pax extended headers (`x`: `path`,
//! `linkpath`, `size`). Entries: regular files, folders, symbolic links and hard links; any
//! other kind is refused. Modes: only the owner's exec bit is kept, the one Nix looks at when
//! it canonicalises the outputs. The archive is read once, in order, through a fixed buffer.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const BLOCK: usize = 512;
/// One large read buffer: the archive is read once, in order.
const READ_BUFFER_BYTES: usize = 1 << 20;
/// A GNU long name or a pax header is metadata: no honest archive needs more.
const MAX_METADATA_BYTES: u64 = 1 << 20;

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

#[derive(Debug)]
pub enum UnpackError {
    Read(io::Error),
    /// The stream ended inside an entry or before the end-of-archive marker.
    Truncated {
        offset: u64,
        reading: &'static str,
    },
    BadHeader {
        offset: u64,
        detail: String,
    },
    AbsolutePath {
        name: String,
    },
    ParentComponent {
        name: String,
    },
    EmptyName {
        offset: u64,
    },
    /// The name's first component is none of the build's outputs.
    Undeclared {
        name: String,
        outputs: String,
    },
    /// Below something the archive made as a file or a link: a write through a symbolic link
    /// could land anywhere.
    BelowNonFolder {
        name: String,
    },
    Duplicate {
        name: String,
    },
    HardLinkTarget {
        name: String,
        target: String,
    },
    Unsupported {
        name: String,
        kind: u8,
    },
    AlreadyExists {
        path: PathBuf,
    },
    Write {
        path: PathBuf,
        source: io::Error,
    },
}

impl fmt::Display for UnpackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnpackError::Read(e) => write!(f, "reading the outputs archive: {e}"),
            UnpackError::Truncated { offset, reading } => {
                write!(f, "the outputs archive is truncated: it ends at byte {offset}, in {reading}")
            }
            UnpackError::BadHeader { offset, detail } => {
                write!(f, "the outputs archive has a bad header at byte {offset}: {detail}")
            }
            UnpackError::AbsolutePath { name } => {
                write!(f, "the outputs archive holds '{name}', an absolute path; its names must be relative to the store")
            }
            UnpackError::ParentComponent { name } => {
                write!(f, "the outputs archive holds '{name}', which climbs out with '..'")
            }
            UnpackError::EmptyName { offset } => write!(f, "the outputs archive has an entry without a name at byte {offset}"),
            UnpackError::Undeclared { name, outputs } => write!(
                f,
                "the outputs archive holds '{name}', which is outside the build's outputs ({outputs})"
            ),
            UnpackError::BelowNonFolder { name } => write!(
                f,
                "the outputs archive holds '{name}' below a file or symbolic link it made earlier; it is not unpacked through a link"
            ),
            UnpackError::Duplicate { name } => write!(f, "the outputs archive holds '{name}' twice"),
            UnpackError::HardLinkTarget { name, target } => write!(
                f,
                "the outputs archive links '{name}' to '{target}', which is not a file the archive made before"
            ),
            UnpackError::Unsupported { name, kind } => write!(
                f,
                "the outputs archive holds '{name}' of tar type '{}', which is not a file, folder or link",
                kind.escape_ascii()
            ),
            UnpackError::AlreadyExists { path } => {
                write!(f, "{} exists already; an output is only ever made by the archive", path.display())
            }
            UnpackError::Write { path, source } => write!(f, "writing {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for UnpackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UnpackError::Read(e) | UnpackError::Write { source: e, .. } => Some(e),
            _ => None,
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

struct Archive<R> {
    inner: BufReader<R>,
    offset: u64,
}

impl<R: Read> Archive<R> {
    /// The next header block; None at a clean end of the stream.
    fn block(&mut self) -> Result<Option<[u8; BLOCK]>, UnpackError> {
        let mut block = [0u8; BLOCK];
        let mut filled = 0;
        while filled < BLOCK {
            let n = match self.inner.read(&mut block[filled..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(UnpackError::Read(e)),
            };
            if n == 0 {
                if filled == 0 {
                    return Ok(None);
                }
                return Err(UnpackError::Truncated { offset: self.offset + filled as u64, reading: "a header" });
            }
            filled += n;
        }
        self.offset += BLOCK as u64;
        Ok(Some(block))
    }

    /// Copies `size` bytes of entry data into `out`, then skips the padding to the next block.
    fn copy(&mut self, size: u64, out: &mut dyn Write, path: &Path) -> Result<(), UnpackError> {
        let mut left = size;
        while left > 0 {
            let buf = self.inner.fill_buf().map_err(UnpackError::Read)?;
            if buf.is_empty() {
                return Err(UnpackError::Truncated { offset: self.offset, reading: "an entry's data" });
            }
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            out.write_all(&buf[..n]).map_err(|source| UnpackError::Write { path: path.to_path_buf(), source })?;
            self.inner.consume(n);
            self.offset += n as u64;
            left -= n as u64;
        }
        let pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        self.skip_exact(pad)
    }

    fn skip_exact(&mut self, n: u64) -> Result<(), UnpackError> {
        let skipped = io::copy(&mut (&mut self.inner).take(n), &mut io::sink()).map_err(UnpackError::Read)?;
        self.offset += skipped;
        if skipped < n {
            return Err(UnpackError::Truncated { offset: self.offset, reading: "an entry's data" });
        }
        Ok(())
    }

    fn skip(&mut self, size: u64) -> Result<(), UnpackError> {
        self.copy(size, &mut io::sink(), Path::new(""))
    }

    fn metadata(&mut self, size: u64, offset: u64) -> Result<Vec<u8>, UnpackError> {
        if size > MAX_METADATA_BYTES {
            return Err(UnpackError::BadHeader { offset, detail: format!("{size} bytes of metadata for one entry") });
        }
        let mut data = Vec::with_capacity(size as usize);
        self.copy(size, &mut data, Path::new(""))?;
        Ok(data)
    }
}

/// The bytes of a header field up to its first NUL.
fn text(field: &[u8]) -> &[u8] {
    field.iter().position(|&b| b == 0).map_or(field, |end| &field[..end])
}

/// A numeric field: octal digits (space or NUL padded), or GNU's base-256 for large values.
fn number(field: &[u8], what: &str, offset: u64) -> Result<u64, UnpackError> {
    let bad = |detail: String| UnpackError::BadHeader { offset, detail };
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut value: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            value = value
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(b)))
                .ok_or_else(|| bad(format!("the {what} does not fit in 64 bits")))?;
        }
        return Ok(value);
    }
    let digits: Vec<u8> = text(field).iter().copied().filter(|b| *b != b' ').collect();
    let mut value: u64 = 0;
    for &d in &digits {
        if !(b'0'..=b'7').contains(&d) {
            return Err(bad(format!("the {what} field is not an octal number: {:?}", String::from_utf8_lossy(field))));
        }
        value = value
            .checked_mul(8)
            .and_then(|v| v.checked_add(u64::from(d - b'0')))
            .ok_or_else(|| bad(format!("the {what} does not fit in 64 bits")))?;
    }
    Ok(value)
}

fn check_sum(block: &[u8; BLOCK], offset: u64) -> Result<(), UnpackError> {
    let stored = number(&block[148..156], "checksum", offset)?;
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    // Some old tars summed signed bytes; both are accepted, as GNU tar does.
    if stored == unsigned || i64::try_from(stored).is_ok_and(|s| s == signed) {
        Ok(())
    } else {
        Err(UnpackError::BadHeader { offset, detail: format!("checksum {stored} recorded, {unsigned} computed") })
    }
}

/// The entry's name from the header alone: ustar's prefix and name.
fn header_name(block: &[u8; BLOCK]) -> Vec<u8> {
    let name = text(&block[0..100]);
    // Only POSIX ustar has a prefix field; GNU's magic ("ustar  ") keeps other data there.
    let prefix = if &block[257..263] == b"ustar\0" { text(&block[345..500]) } else { &[][..] };
    if prefix.is_empty() {
        name.to_vec()
    } else {
        [prefix, b"/", name].concat()
    }
}

/// The fields of a pax extended header this reader honours.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
}

/// Records of the form "LENGTH KEY=VALUE\n", LENGTH counting the whole record.
fn parse_pax(data: &[u8], offset: u64) -> Result<Pax, UnpackError> {
    let bad = |detail: &str| UnpackError::BadHeader { offset, detail: format!("pax header: {detail}") };
    let mut pax = Pax::default();
    let mut rest = data;
    while !rest.is_empty() {
        let space = rest.iter().position(|&b| b == b' ').ok_or_else(|| bad("a record without a length"))?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("a record length that is not a number"))?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad("a record whose length does not match it"));
        }
        let record = &rest[space + 1..len - 1];
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(|| bad("a record without '='"))?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        match key {
            b"path" => pax.path = Some(value.to_vec()),
            b"linkpath" => pax.linkpath = Some(value.to_vec()),
            b"size" => {
                pax.size = Some(
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| bad("a size that is not a number"))?,
                )
            }
            // Times, owners, character sets: Nix canonicalises them away.
            _ => {}
        }
        rest = &rest[len..];
    }
    Ok(pax)
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
    let mut r = Archive { inner: BufReader::with_capacity(READ_BUFFER_BYTES, archive), offset: 0 };
    let mut w = Writer { made: HashMap::new(), roots: HashSet::new() };
    let mut summary = Unpacked::default();
    let (mut long_name, mut long_link, mut pax): (Option<Vec<u8>>, Option<Vec<u8>>, Pax) = (None, None, Pax::default());
    loop {
        let offset = r.offset;
        let Some(block) = r.block()? else {
            return Err(UnpackError::Truncated { offset, reading: "the end-of-archive marker" });
        };
        if block.iter().all(|&b| b == 0) {
            break;
        }
        check_sum(&block, offset)?;
        let kind = block[156];
        let header_size = number(&block[124..136], "size", offset)?;
        match kind {
            b'L' => {
                long_name = Some(text(&r.metadata(header_size, offset)?).to_vec());
                continue;
            }
            b'K' => {
                long_link = Some(text(&r.metadata(header_size, offset)?).to_vec());
                continue;
            }
            b'x' => {
                pax = parse_pax(&r.metadata(header_size, offset)?, offset)?;
                continue;
            }
            b'g' => {
                r.skip(header_size)?;
                continue;
            }
            _ => {}
        }
        let size = pax.size.take().unwrap_or(header_size);
        let name = pax.path.take().or(long_name.take()).unwrap_or_else(|| header_name(&block));
        let link = pax.linkpath.take().or(long_link.take()).unwrap_or_else(|| text(&block[157..257]).to_vec());
        let (root, path) = outputs.resolve(&name, offset)?;
        w.parents(root, &path, &name)?;
        match kind {
            b'0' | 0 | b'7' => {
                w.claim(&path, &name, Made::File)?;
                let mode = number(&block[100..108], "mode", offset)?;
                // Nix keeps the owner's exec bit and sets the rest itself.
                let mode = if mode & 0o100 != 0 { 0o755 } else { 0o644 };
                let mut file =
                    OpenOptions::new().write(true).create_new(true).mode(mode).open(&path).map_err(write_err(&path))?;
                r.copy(size, &mut file, &path)?;
                summary.bytes += size;
            }
            b'5' => {
                if w.made.get(&path) != Some(&Made::Folder) {
                    w.claim(&path, &name, Made::Folder)?;
                    DirBuilder::new().mode(0o755).create(&path).map_err(write_err(&path))?;
                }
                r.skip(size)?;
            }
            b'2' => {
                w.claim(&path, &name, Made::Link)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&link), &path).map_err(write_err(&path))?;
                r.skip(size)?;
            }
            b'1' => {
                let target = match outputs.resolve(&link, offset) {
                    Ok((_, target)) if w.made.get(&target) == Some(&Made::File) => target,
                    _ => return Err(UnpackError::HardLinkTarget { name: shown(&name), target: shown(&link) }),
                };
                w.claim(&path, &name, Made::File)?;
                if std::fs::hard_link(&target, &path).is_err() {
                    // A file system without hard links: a copy is the same to Nix.
                    std::fs::copy(&target, &path).map_err(write_err(&path))?;
                }
                r.skip(size)?;
            }
            other => return Err(UnpackError::Unsupported { name: shown(&name), kind: other }),
        }
        summary.entries += 1;
    }
    summary.paths = w.roots.len();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A hand-made archive, block by block.
    #[derive(Default)]
    struct Tar(Vec<u8>);

    impl Tar {
        fn header(&mut self, name: &[u8], kind: u8, mode: u32, size: usize, link: &[u8], magic: &[u8; 8]) {
            let mut h = [0u8; BLOCK];
            h[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
            h[100..108].copy_from_slice(format!("{mode:07o}\0").as_bytes());
            h[108..116].copy_from_slice(b"0000000\0");
            h[116..124].copy_from_slice(b"0000000\0");
            h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
            h[136..148].copy_from_slice(b"00000000000\0");
            h[156] = kind;
            h[157..157 + link.len().min(100)].copy_from_slice(&link[..link.len().min(100)]);
            h[257..265].copy_from_slice(magic);
            h[148..156].copy_from_slice(b"        ");
            let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
            h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
            self.0.extend_from_slice(&h);
        }

        fn data(&mut self, data: &[u8]) {
            self.0.extend_from_slice(data);
            let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
            self.0.extend(std::iter::repeat(0u8).take(pad));
        }

        fn entry(&mut self, name: &str, kind: u8, mode: u32, data: &[u8], link: &str) -> &mut Tar {
            self.header(name.as_bytes(), kind, mode, data.len(), link.as_bytes(), b"ustar\x0000");
            self.data(data);
            self
        }

        fn gnu_long(&mut self, kind: u8, value: &[u8]) -> &mut Tar {
            let mut v = value.to_vec();
            v.push(0);
            self.header(b"././@LongLink", kind, 0, v.len(), b"", b"ustar  \0");
            self.data(&v);
            self
        }

        fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Tar {
            let mut body = Vec::new();
            for (k, v) in records {
                // The length counts its own digits: grow it until it fits.
                let rest = k.len() + v.len() + 3;
                let mut len = rest + 1;
                while len.to_string().len() + rest != len {
                    len += 1;
                }
                body.extend_from_slice(format!("{len} {k}=").as_bytes());
                body.extend_from_slice(v);
                body.push(b'\n');
            }
            self.header(b"PaxHeaders/x", b'x', 0o644, body.len(), b"", b"ustar\x0000");
            self.data(&body);
            self
        }

        fn end(&mut self) -> Vec<u8> {
            self.0.extend(std::iter::repeat(0u8).take(2 * BLOCK));
            std::mem::take(&mut self.0)
        }
    }

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

    #[test]
    fn numbers_octal_and_base_256() {
        assert_eq!(number(b"00000001750\0", "size", 0).unwrap(), 1000);
        assert_eq!(number(b"   1750 \0", "size", 0).unwrap(), 1000);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[7] = 0x02; // 2 << 32
        assert_eq!(number(&big, "size", 0).unwrap(), 2 << 32);
        assert!(number(b"12x\0", "size", 9).unwrap_err().to_string().contains("at byte 9"));
    }
}
