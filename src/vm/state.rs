//! The saved memory of a suspended guest: QEMU's migration stream, deflate-compressed by our
//! own code, framed so that a wrong or truncated file is refused before QEMU reads a byte of
//! it, and a corrupt one before QEMU receives the end of the stream (the checksum is checked
//! in the one pass that feeds QEMU).
//!
//! Layout: MAGIC | format version (u32 LE) | header length (u32 LE) | header (JSON)
//!         | payload (raw deflate) | trailer: payload length (u64 LE), raw length (u64 LE),
//!           CRC-32 of the payload (u32 LE), END_MAGIC
//!
//! `nix-winvm-builder state-write` and `state-read` are the other end of QEMU's migration
//! stream: the session starts them on a pipe and hands QEMU its end (`migrate fd:`,
//! `migrate-incoming fd:`).

use crate::spec::MachineShape;
use flate2::{read::DeflateDecoder, write::DeflateEncoder, Compression, Crc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 16] = b"NIX-WINVM-STATE\n";
pub const END_MAGIC: &[u8; 8] = b"STATEEND";
/// 1: no machine type in the header (refused); 2: the header names it ([`StateHeader::machine`]).
pub const FORMAT_VERSION: u32 = 2;
const TRAILER_LEN: u64 = 8 + 8 + 4 + 8;
/// zlib-rs at level 6: within a few percent of `gzip -6`'s size, and inflates about three
/// times faster than `gzip -d` (measured by benches/stages.rs; README, "Measured here").
pub const LEVEL: u32 = 6;
const MAX_HEADER: u32 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StateHeader {
    /// QEMU's own version string (major.minor.micro and package): the same QEMU or a newer
    /// one loads the stream, on the same machine type.
    pub qemu_version: String,
    pub memory_mib: u32,
    pub guest: String,
    /// The versioned machine type the VM ran as (`pc-q35-10.0`), which a revive asks for again.
    pub machine: String,
}

impl StateHeader {
    /// The header of a VM of `shape` that runs `guest`, saved by QEMU `qemu_version`. Of the
    /// shape it records what a revive checks before QEMU reads a byte, the memory size and the
    /// machine type; the rest is the image's spec, which a build's must equal.
    pub fn new(qemu_version: String, guest: &str, shape: &MachineShape) -> StateHeader {
        StateHeader {
            qemu_version,
            memory_mib: shape.memory_mib,
            guest: guest.into(),
            machine: shape.machine_type.clone(),
        }
    }
}

/// What a revive needs of a state file: the VM it is about to load it into.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub memory_mib: u32,
    /// The running QEMU's version string (see [`StateHeader::qemu_version`]).
    pub qemu_version: &'a str,
    pub machine: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateInfo {
    pub header: StateHeader,
    pub payload_offset: u64,
    pub payload_len: u64,
    pub raw_len: u64,
    pub crc32: u32,
}

#[derive(Debug)]
pub enum StateFileError {
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    NotAStateFile {
        path: PathBuf,
    },
    UnsupportedFormat {
        path: PathBuf,
        version: u32,
    },
    BadHeader {
        path: PathBuf,
        detail: String,
    },
    Truncated {
        path: PathBuf,
    },
    Checksum {
        path: PathBuf,
        expected: u32,
        actual: u32,
    },
    Corrupt {
        path: PathBuf,
        detail: String,
    },
    MemoryMismatch {
        path: PathBuf,
        saved: u32,
        wanted: u32,
    },
    /// Saved by a newer QEMU than the running one (QEMU loads streams of its own version and
    /// older ones, not newer ones).
    QemuMismatch {
        path: PathBuf,
        saved: String,
        running: String,
    },
    MachineMismatch {
        path: PathBuf,
        saved: String,
        wanted: String,
    },
}

impl fmt::Display for StateFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use StateFileError::*;
        match self {
            Io { path, what, source } => write!(f, "state file {}: {what}: {source}", path.display()),
            NotAStateFile { path } => write!(f, "{} is not a nix-winvm state file (wrong magic number)", path.display()),
            UnsupportedFormat { path, version: 1 } => write!(
                f,
                "state file {} has format version 1, which does not record the QEMU machine type, so only the QEMU that wrote it could load it; this nix-winvm reads version {FORMAT_VERSION}: build the image again (a pinned image: take the pin off, build it, and pin the new hash)",
                path.display()
            ),
            UnsupportedFormat { path, version } => write!(
                f,
                "state file {} has format version {version}, from a newer nix-winvm; this one reads version {FORMAT_VERSION}: use the nix-winvm that made the image, or a newer one",
                path.display()
            ),
            BadHeader { path, detail } => write!(f, "state file {} has an unreadable header: {detail}", path.display()),
            Truncated { path } => write!(f, "state file {} is truncated (its end marker is missing: the save did not finish)", path.display()),
            Checksum { path, expected, actual } => write!(
                f,
                "state file {} is corrupt: checksum {actual:08x} does not match the recorded {expected:08x}",
                path.display()
            ),
            Corrupt { path, detail } => write!(f, "state file {} is corrupt: {detail}", path.display()),
            MemoryMismatch { path, saved, wanted } => write!(
                f,
                "state file {} holds a VM with {saved} MiB of memory, but {wanted} MiB were asked for: rebuild the image",
                path.display()
            ),
            QemuMismatch { path, saved, running } => write!(
                f,
                "state file {} was saved by QEMU {saved}, but this is the older QEMU {running}; a memory snapshot loads only into the QEMU that made it or a newer one: use that QEMU or a newer one, or build the image again",
                path.display()
            ),
            MachineMismatch { path, saved, wanted } => write!(
                f,
                "state file {} holds a VM of machine type {saved}, but the revive asked for {wanted}: the image's metadata does not match its state",
                path.display()
            ),
        }
    }
}

impl std::error::Error for StateFileError {}

struct CrcWriter<W: Write> {
    inner: W,
    crc: Crc,
}

struct CrcReader<R: Read> {
    inner: R,
    crc: Crc,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Compresses `input` (QEMU's migration stream) into `path`, atomically: the file appears
/// only when complete.
pub fn write(path: &Path, header: &StateHeader, input: &mut dyn Read) -> Result<StateInfo, StateFileError> {
    let io_err = |what: &'static str| move |source| StateFileError::Io { path: path.to_path_buf(), what, source };
    let tmp = path.with_extension("partial");
    let file = File::create(&tmp).map_err(io_err("creating"))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let header_json = serde_json::to_vec(header)
        .map_err(|e| StateFileError::BadHeader { path: path.into(), detail: e.to_string() })?;
    out.write_all(MAGIC).map_err(io_err("writing"))?;
    out.write_all(&FORMAT_VERSION.to_le_bytes()).map_err(io_err("writing"))?;
    out.write_all(&(header_json.len() as u32).to_le_bytes()).map_err(io_err("writing"))?;
    out.write_all(&header_json).map_err(io_err("writing"))?;
    let payload_offset = (MAGIC.len() + 8 + header_json.len()) as u64;
    let mut enc = DeflateEncoder::new(CrcWriter { inner: out, crc: Crc::new() }, Compression::new(LEVEL));
    let raw_len = io::copy(input, &mut enc).map_err(io_err("compressing the migration stream"))?;
    let CrcWriter { inner: mut out, crc } = enc.finish().map_err(io_err("finishing compression"))?;
    let payload_len = crc.amount() as u64;
    out.write_all(&payload_len.to_le_bytes()).map_err(io_err("writing"))?;
    out.write_all(&raw_len.to_le_bytes()).map_err(io_err("writing"))?;
    out.write_all(&crc.sum().to_le_bytes()).map_err(io_err("writing"))?;
    out.write_all(END_MAGIC).map_err(io_err("writing"))?;
    let file = out.into_inner().map_err(|e| StateFileError::Io {
        path: path.into(),
        what: "writing",
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io_err("syncing"))?;
    std::fs::rename(&tmp, path).map_err(io_err("renaming into place"))?;
    Ok(StateInfo { header: header.clone(), payload_offset, payload_len, raw_len, crc32: crc.sum() })
}

/// Whether QEMU `running` loads a stream that QEMU `saved` wrote: the same version string, or a
/// newer release (major.minor.micro). QEMU keeps loading the streams of older releases for
/// their versioned machine types; an unreadable version counts only when it is identical.
pub fn loads_into(saved: &str, running: &str) -> bool {
    fn release(v: &str) -> Option<(u32, u32, u32)> {
        let mut parts = v.split_whitespace().next()?.split('.').map(|n| n.parse::<u32>().ok());
        Some((parts.next()??, parts.next()??, parts.next()??))
    }
    saved == running || matches!((release(saved), release(running)), (Some(s), Some(r)) if r >= s)
}

/// The frame and the header checked, the payload not read.
pub fn inspect(path: &Path, wanted: Option<Wanted<'_>>) -> Result<StateInfo, StateFileError> {
    let p = || path.to_path_buf();
    let io_err = |what: &'static str| move |source| StateFileError::Io { path: path.to_path_buf(), what, source };
    let mut f = File::open(path).map_err(io_err("opening"))?;
    let size = f.metadata().map_err(io_err("reading its size"))?.len();
    let mut magic = [0u8; 16];
    if f.read_exact(&mut magic).is_err() || &magic != MAGIC {
        return Err(StateFileError::NotAStateFile { path: p() });
    }
    let mut word = [0u8; 4];
    f.read_exact(&mut word).map_err(|_| StateFileError::Truncated { path: p() })?;
    let version = u32::from_le_bytes(word);
    if version != FORMAT_VERSION {
        return Err(StateFileError::UnsupportedFormat { path: p(), version });
    }
    f.read_exact(&mut word).map_err(|_| StateFileError::Truncated { path: p() })?;
    let header_len = u32::from_le_bytes(word);
    if header_len > MAX_HEADER {
        return Err(StateFileError::BadHeader {
            path: p(),
            detail: format!("header length {header_len} is implausible"),
        });
    }
    let mut header_bytes = vec![0u8; header_len as usize];
    f.read_exact(&mut header_bytes).map_err(|_| StateFileError::Truncated { path: p() })?;
    let header: StateHeader = serde_json::from_slice(&header_bytes)
        .map_err(|e| StateFileError::BadHeader { path: p(), detail: e.to_string() })?;
    let payload_offset = (MAGIC.len() + 8) as u64 + header_len as u64;
    if size < payload_offset + TRAILER_LEN {
        return Err(StateFileError::Truncated { path: p() });
    }
    f.seek(SeekFrom::Start(size - TRAILER_LEN)).map_err(io_err("seeking"))?;
    let mut trailer = [0u8; TRAILER_LEN as usize];
    f.read_exact(&mut trailer).map_err(io_err("reading the trailer"))?;
    if &trailer[20..28] != END_MAGIC {
        return Err(StateFileError::Truncated { path: p() });
    }
    let payload_len = u64::from_le_bytes(trailer[0..8].try_into().expect("8 bytes"));
    let raw_len = u64::from_le_bytes(trailer[8..16].try_into().expect("8 bytes"));
    let expected = u32::from_le_bytes(trailer[16..20].try_into().expect("4 bytes"));
    // The recorded length is untrusted: near u64::MAX the sum would overflow (a panic in a
    // debug build, a wrong comparison otherwise; found by tests/fuzz.rs).
    if payload_len.checked_add(payload_offset + TRAILER_LEN) != Some(size) {
        return Err(StateFileError::Corrupt {
            path: p(),
            detail: format!("payload length {payload_len} does not fit the file size {size}"),
        });
    }
    if let Some(w) = wanted {
        if header.memory_mib != w.memory_mib {
            return Err(StateFileError::MemoryMismatch { path: p(), saved: header.memory_mib, wanted: w.memory_mib });
        }
        if header.machine != w.machine {
            return Err(StateFileError::MachineMismatch {
                path: p(),
                saved: header.machine.clone(),
                wanted: w.machine.into(),
            });
        }
        if !loads_into(&header.qemu_version, w.qemu_version) {
            return Err(StateFileError::QemuMismatch {
                path: p(),
                saved: header.qemu_version.clone(),
                running: w.qemu_version.into(),
            });
        }
    }
    Ok(StateInfo { header, payload_offset, payload_len, raw_len, crc32: expected })
}

/// Streams the decompressed migration stream to `out`, reading the file once: the checksum
/// and the lengths are checked as the bytes go by, and the last chunk is held back until they
/// pass, so that QEMU never receives the end of a stream that fails them (it then refuses the
/// incomplete stream instead of running a damaged guest).
pub fn read(path: &Path, wanted: Option<Wanted<'_>>, out: &mut dyn Write) -> Result<StateInfo, StateFileError> {
    let info = inspect(path, wanted)?;
    let io_err = |what: &'static str| move |source| StateFileError::Io { path: path.to_path_buf(), what, source };
    let corrupt = |detail: String| StateFileError::Corrupt { path: path.into(), detail };
    let mut f = File::open(path).map_err(io_err("opening"))?;
    f.seek(SeekFrom::Start(info.payload_offset)).map_err(io_err("seeking"))?;
    let payload = CrcReader { inner: f.take(info.payload_len), crc: Crc::new() };
    let mut dec = DeflateDecoder::new(BufReader::with_capacity(1 << 20, payload));
    let mut chunk = vec![0u8; 1 << 20];
    let mut held: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut total = 0u64;
    // Inflating fails on some damage; QEMU stops reading (a broken pipe) on other damage that
    // inflates. Either way the checksum, finished below, says whether the file is at fault.
    let stopped: Option<StateFileError> = loop {
        let n = match dec.read(&mut chunk) {
            Ok(0) => break None,
            Ok(n) => n,
            Err(e) => break Some(corrupt(e.to_string())),
        };
        total += n as u64;
        if !held.is_empty() {
            if let Err(e) = out.write_all(&held) {
                break Some(io_err("handing the stream to QEMU")(e));
            }
        }
        held.clear();
        held.extend_from_slice(&chunk[..n]);
    };
    // Whatever the inflater left unread still counts for the checksum.
    let mut payload = dec.into_inner().into_inner();
    io::copy(&mut payload, &mut io::sink()).map_err(io_err("reading"))?;
    if payload.crc.amount() as u64 != info.payload_len {
        return Err(StateFileError::Truncated { path: path.into() });
    }
    if payload.crc.sum() != info.crc32 {
        return Err(StateFileError::Checksum { path: path.into(), expected: info.crc32, actual: payload.crc.sum() });
    }
    if let Some(e) = stopped {
        return Err(e);
    }
    if total != info.raw_len {
        return Err(corrupt(format!("it inflates to {total} bytes, not the recorded {}", info.raw_len)));
    }
    out.write_all(&held).map_err(io_err("handing the stream to QEMU"))?;
    out.flush().map_err(io_err("handing the stream to QEMU"))?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> StateHeader {
        StateHeader {
            qemu_version: "10.0.2 (test)".into(),
            memory_mib: 256,
            guest: "standin".into(),
            machine: "pc-q35-10.0".into(),
        }
    }

    fn wanted(memory_mib: u32, qemu_version: &str) -> Option<Wanted<'_>> {
        Some(Wanted { memory_mib, qemu_version, machine: "pc-q35-10.0" })
    }

    fn sample(dir: &Path) -> (PathBuf, Vec<u8>) {
        let raw: Vec<u8> = (0..3_000_000u32).map(|i| if i % 7 == 0 { (i % 251) as u8 } else { 0 }).collect();
        let path = dir.join("state");
        write(&path, &header(), &mut &raw[..]).unwrap();
        (path, raw)
    }

    #[test]
    fn round_trip() {
        let d = tempfile::tempdir().unwrap();
        let (path, raw) = sample(d.path());
        let mut out = vec![];
        let info = read(&path, wanted(256, "10.0.2 (test)"), &mut out).unwrap();
        assert_eq!(out, raw);
        assert_eq!(info.raw_len, raw.len() as u64);
        assert!(info.payload_len < raw.len() as u64 / 3);
        assert!(!path.with_extension("partial").exists());
    }

    #[test]
    fn refusals_name_the_file_and_the_fault() {
        let d = tempfile::tempdir().unwrap();
        let (path, _) = sample(d.path());
        let p = path.display().to_string();
        let bytes = std::fs::read(&path).unwrap();
        let msg = |b: &[u8], wanted: Option<Wanted<'_>>| {
            std::fs::write(&path, b).unwrap();
            read(&path, wanted, &mut io::sink()).unwrap_err().to_string()
        };
        assert_eq!(
            msg(&bytes[..bytes.len() - 100], None),
            format!("state file {p} is truncated (its end marker is missing: the save did not finish)")
        );
        let mut flipped = bytes.clone();
        let mid = bytes.len() / 2;
        flipped[mid] ^= 0x55;
        assert!(msg(&flipped, None).starts_with(&format!("state file {p} is corrupt: checksum ")));
        assert_eq!(
            msg(b"\x7fELF and more bytes", None),
            format!("{p} is not a nix-winvm state file (wrong magic number)")
        );
        let mut v1 = bytes.clone();
        v1[16] = 1;
        assert!(
            msg(&v1, None).starts_with(&format!(
                "state file {p} has format version 1, which does not record the QEMU machine type"
            )),
            "{}",
            msg(&v1, None)
        );
        let mut v3 = bytes.clone();
        v3[16] = 3;
        assert_eq!(
            msg(&v3, None),
            format!("state file {p} has format version 3, from a newer nix-winvm; this one reads version 2: use the nix-winvm that made the image, or a newer one")
        );
        assert_eq!(
            msg(&bytes, wanted(512, "10.0.2 (test)")),
            format!("state file {p} holds a VM with 256 MiB of memory, but 512 MiB were asked for: rebuild the image")
        );
        assert!(msg(&bytes, wanted(256, "9.2.0"))
            .contains("was saved by QEMU 10.0.2 (test), but this is the older QEMU 9.2.0"));
        let other_machine = Some(Wanted { memory_mib: 256, qemu_version: "10.0.2 (test)", machine: "pc-q35-9.2" });
        assert!(msg(&bytes, other_machine)
            .contains("holds a VM of machine type pc-q35-10.0, but the revive asked for pc-q35-9.2"));
        // A newer QEMU loads it.
        let mut out = vec![];
        read(&path, wanted(256, "11.1.2 (Debian 1:11.1.2+ds-3)"), &mut out).unwrap();
        assert!(read(&d.path().join("missing"), None, &mut io::sink()).unwrap_err().to_string().contains("opening"));
    }

    #[test]
    fn a_newer_qemu_loads_an_older_stream_and_an_older_one_does_not() {
        assert!(loads_into("10.0.2 (Debian 1:10.0.2+ds-2)", "10.0.2 (Debian 1:10.0.2+ds-2)"));
        assert!(loads_into("10.0.2 (Debian 1:10.0.2+ds-2)", "10.0.13 (Debian 1:10.0.13+ds-0+deb13u1)"));
        assert!(loads_into("10.0.2", "11.1.2 (Debian 1:11.1.2+ds-3)"));
        assert!(!loads_into("11.1.2", "10.0.13"));
        assert!(!loads_into("10.0.13", "10.0.2"));
        assert!(!loads_into("odd", "10.0.2"));
        assert!(loads_into("odd", "odd"));
    }

    /// A payload length near u64::MAX once overflowed the size check (tests/fuzz.rs).
    #[test]
    fn a_payload_length_near_the_maximum_is_corrupt_not_an_overflow() {
        let d = tempfile::tempdir().unwrap();
        let (path, _) = sample(d.path());
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - TRAILER_LEN as usize;
        for payload_len in [u64::MAX, u64::MAX - 60] {
            bytes[at..at + 8].copy_from_slice(&payload_len.to_le_bytes());
            std::fs::write(&path, &bytes).unwrap();
            let e = inspect(&path, None).unwrap_err();
            assert!(matches!(e, StateFileError::Corrupt { .. }), "{e}");
            assert!(e.to_string().contains(&format!("payload length {payload_len} does not fit")), "{e}");
        }
    }

    /// The one reading pass never hands QEMU the end of a stream that fails its checks.
    #[test]
    fn a_corrupt_payload_is_named_and_its_end_withheld() {
        let d = tempfile::tempdir().unwrap();
        let (path, raw) = sample(d.path());
        let p = path.display().to_string();
        let info = inspect(&path, None).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for at in [info.payload_offset as usize + 10, bytes.len() / 2, bytes.len() - TRAILER_LEN as usize - 3] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x55;
            std::fs::write(&path, &flipped).unwrap();
            let mut out = vec![];
            let e = read(&path, None, &mut out).unwrap_err().to_string();
            assert!(e.starts_with(&format!("state file {p} is corrupt: ")), "byte {at}: {e}");
            assert!(out.len() < raw.len() && raw.starts_with(&out[..out.len().min(1)]), "byte {at}: the end was sent");
        }
    }
}
