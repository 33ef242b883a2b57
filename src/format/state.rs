//! The framing of a state file: a payload (a stream, deflate-compressed here) behind a header
//! of the caller's type, framed so that a wrong or truncated file is refused before a byte of
//! the payload is read, and a corrupt one before the end of the payload is handed over (the
//! checksum is checked in the one pass that inflates it).
//!
//! Layout: MAGIC | format version (u32 LE) | header length (u32 LE) | header (JSON)
//!         | payload (raw deflate) | trailer: payload length (u64 LE), raw length (u64 LE),
//!           CRC-32 of the payload (u32 LE), END_MAGIC
//!
//! What the header says, and whether it fits the reader, is the caller's: [`read`] and
//! [`inspect`] take a check of the header, run once the frame has passed.

use flate2::{read::DeflateDecoder, write::DeflateEncoder, Compression, Crc};
use serde::{de::DeserializeOwned, Serialize};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 16] = b"NIX-WINVM-STATE\n";
pub const END_MAGIC: &[u8; 8] = b"STATEEND";
/// 1: no machine type in the header (refused); 2: the header names it.
pub const FORMAT_VERSION: u32 = 2;
pub const TRAILER_LEN: u64 = 8 + 8 + 4 + 8;
/// zlib-rs at level 6: within a few percent of `gzip -6`'s size, and inflates about three
/// times faster than `gzip -d` (measured by benches/stages.rs; README, "Measured here").
pub const LEVEL: u32 = 6;
pub const MAX_HEADER: u32 = 64 * 1024;

/// Where a file's parts are, and its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateInfo<H> {
    pub header: H,
    pub payload_offset: u64,
    pub payload_len: u64,
    pub raw_len: u64,
    pub crc32: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("state file {}: {what}: {source}", path.display())]
    Io { path: PathBuf, what: &'static str, source: io::Error },
    #[error("{} is not a nix-winvm state file (wrong magic number)", path.display())]
    NotAStateFile { path: PathBuf },
    #[error("{}", unsupported(path, *version))]
    UnsupportedFormat { path: PathBuf, version: u32 },
    #[error("state file {} has an unreadable header: {detail}", path.display())]
    BadHeader { path: PathBuf, detail: String },
    #[error("state file {} is truncated (its end marker is missing: the save did not finish)", path.display())]
    Truncated { path: PathBuf },
    #[error("state file {} is corrupt: checksum {actual:08x} does not match the recorded {expected:08x}", path.display())]
    Checksum { path: PathBuf, expected: u32, actual: u32 },
    #[error("state file {} is corrupt: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
}

fn unsupported(path: &Path, version: u32) -> String {
    let path = path.display();
    if version == 1 {
        format!(
            "state file {path} has format version 1, which does not record the QEMU machine type, so only the QEMU that wrote it could load it; this nix-winvm reads version {FORMAT_VERSION}: build the image again (a pinned image: take the pin off, build it, and pin the new hash)"
        )
    } else {
        format!(
            "state file {path} has format version {version}, from a newer nix-winvm; this one reads version {FORMAT_VERSION}: use the nix-winvm that made the image, or a newer one"
        )
    }
}

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

/// Compresses `input` into `path` behind `header`, atomically: the file appears only when
/// complete.
pub fn write<H: Serialize + Clone>(path: &Path, header: &H, input: &mut dyn Read) -> Result<StateInfo<H>, FrameError> {
    let io_err = |what: &'static str| move |source| FrameError::Io { path: path.to_path_buf(), what, source };
    let tmp = path.with_extension("partial");
    let file = File::create(&tmp).map_err(io_err("creating"))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let header_json =
        serde_json::to_vec(header).map_err(|e| FrameError::BadHeader { path: path.into(), detail: e.to_string() })?;
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
    let file =
        out.into_inner().map_err(|e| FrameError::Io { path: path.into(), what: "writing", source: e.into_error() })?;
    file.sync_all().map_err(io_err("syncing"))?;
    std::fs::rename(&tmp, path).map_err(io_err("renaming into place"))?;
    Ok(StateInfo { header: header.clone(), payload_offset, payload_len, raw_len, crc32: crc.sum() })
}

/// The frame and the header checked (`check` last), the payload not read.
pub fn inspect<H: DeserializeOwned, E: From<FrameError>>(
    path: &Path,
    check: impl FnOnce(&H) -> Result<(), E>,
) -> Result<StateInfo<H>, E> {
    let p = || path.to_path_buf();
    let io_err = |what: &'static str| move |source| FrameError::Io { path: path.to_path_buf(), what, source };
    let mut f = File::open(path).map_err(io_err("opening"))?;
    let size = f.metadata().map_err(io_err("reading its size"))?.len();
    let mut magic = [0u8; 16];
    if f.read_exact(&mut magic).is_err() || &magic != MAGIC {
        return Err(FrameError::NotAStateFile { path: p() }.into());
    }
    let mut word = [0u8; 4];
    f.read_exact(&mut word).map_err(|_| FrameError::Truncated { path: p() })?;
    let version = u32::from_le_bytes(word);
    if version != FORMAT_VERSION {
        return Err(FrameError::UnsupportedFormat { path: p(), version }.into());
    }
    f.read_exact(&mut word).map_err(|_| FrameError::Truncated { path: p() })?;
    let header_len = u32::from_le_bytes(word);
    if header_len > MAX_HEADER {
        let detail = format!("header length {header_len} is implausible");
        return Err(FrameError::BadHeader { path: p(), detail }.into());
    }
    let mut header_bytes = vec![0u8; header_len as usize];
    f.read_exact(&mut header_bytes).map_err(|_| FrameError::Truncated { path: p() })?;
    let header: H = serde_json::from_slice(&header_bytes)
        .map_err(|e| FrameError::BadHeader { path: p(), detail: e.to_string() })?;
    let payload_offset = (MAGIC.len() + 8) as u64 + header_len as u64;
    if size < payload_offset + TRAILER_LEN {
        return Err(FrameError::Truncated { path: p() }.into());
    }
    f.seek(SeekFrom::Start(size - TRAILER_LEN)).map_err(io_err("seeking"))?;
    let mut trailer = [0u8; TRAILER_LEN as usize];
    f.read_exact(&mut trailer).map_err(io_err("reading the trailer"))?;
    if &trailer[20..28] != END_MAGIC {
        return Err(FrameError::Truncated { path: p() }.into());
    }
    let payload_len = u64::from_le_bytes(trailer[0..8].try_into().expect("8 bytes"));
    let raw_len = u64::from_le_bytes(trailer[8..16].try_into().expect("8 bytes"));
    let expected = u32::from_le_bytes(trailer[16..20].try_into().expect("4 bytes"));
    // The recorded length is untrusted: near u64::MAX the sum would overflow (a panic in a
    // debug build, a wrong comparison otherwise; found by tests/fuzz.rs).
    if payload_len.checked_add(payload_offset + TRAILER_LEN) != Some(size) {
        let detail = format!("payload length {payload_len} does not fit the file size {size}");
        return Err(FrameError::Corrupt { path: p(), detail }.into());
    }
    check(&header)?;
    Ok(StateInfo { header, payload_offset, payload_len, raw_len, crc32: expected })
}

/// Streams the inflated payload to `out`, reading the file once: the checksum and the lengths
/// are checked as the bytes go by, and the last chunk is held back until they pass, so that
/// the reader at the other end never receives the end of a payload that fails them.
pub fn read<H: DeserializeOwned, E: From<FrameError>>(
    path: &Path,
    check: impl FnOnce(&H) -> Result<(), E>,
    out: &mut dyn Write,
) -> Result<StateInfo<H>, E> {
    let info = inspect(path, check)?;
    stream(path, &info, out)?;
    Ok(info)
}

fn stream<H>(path: &Path, info: &StateInfo<H>, out: &mut dyn Write) -> Result<(), FrameError> {
    let io_err = |what: &'static str| move |source| FrameError::Io { path: path.to_path_buf(), what, source };
    let corrupt = |detail: String| FrameError::Corrupt { path: path.into(), detail };
    let mut f = File::open(path).map_err(io_err("opening"))?;
    f.seek(SeekFrom::Start(info.payload_offset)).map_err(io_err("seeking"))?;
    let payload = CrcReader { inner: f.take(info.payload_len), crc: Crc::new() };
    let mut dec = DeflateDecoder::new(BufReader::with_capacity(1 << 20, payload));
    let mut chunk = vec![0u8; 1 << 20];
    let mut held: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut total = 0u64;
    // Inflating fails on some damage; the reader at the other end (QEMU) stops reading, a
    // broken pipe, on other damage that inflates. Either way the checksum, finished below,
    // says whether the file is at fault.
    let stopped: Option<FrameError> = loop {
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
        return Err(FrameError::Truncated { path: path.into() });
    }
    if payload.crc.sum() != info.crc32 {
        return Err(FrameError::Checksum { path: path.into(), expected: info.crc32, actual: payload.crc.sum() });
    }
    if let Some(e) = stopped {
        return Err(e);
    }
    if total != info.raw_len {
        return Err(corrupt(format!("it inflates to {total} bytes, not the recorded {}", info.raw_len)));
    }
    out.write_all(&held).map_err(io_err("handing the stream to QEMU"))?;
    out.flush().map_err(io_err("handing the stream to QEMU"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Header {
        name: String,
    }

    fn header() -> Header {
        Header { name: "test".into() }
    }

    fn any(_: &Header) -> Result<(), FrameError> {
        Ok(())
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
        let info = read(&path, any, &mut out).unwrap();
        assert_eq!(out, raw);
        assert_eq!(info.header, header());
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
        let msg = |b: &[u8]| {
            std::fs::write(&path, b).unwrap();
            read(&path, any, &mut io::sink()).unwrap_err().to_string()
        };
        assert_eq!(
            msg(&bytes[..bytes.len() - 100]),
            format!("state file {p} is truncated (its end marker is missing: the save did not finish)")
        );
        let mut flipped = bytes.clone();
        let mid = bytes.len() / 2;
        flipped[mid] ^= 0x55;
        assert!(msg(&flipped).starts_with(&format!("state file {p} is corrupt: checksum ")));
        assert_eq!(msg(b"\x7fELF and more bytes"), format!("{p} is not a nix-winvm state file (wrong magic number)"));
        let mut v1 = bytes.clone();
        v1[16] = 1;
        assert!(
            msg(&v1).starts_with(&format!(
                "state file {p} has format version 1, which does not record the QEMU machine type"
            )),
            "{}",
            msg(&v1)
        );
        let mut v3 = bytes.clone();
        v3[16] = 3;
        assert_eq!(
            msg(&v3),
            format!("state file {p} has format version 3, from a newer nix-winvm; this one reads version 2: use the nix-winvm that made the image, or a newer one")
        );
        // The header's check runs once the frame has passed, and its error is the caller's.
        std::fs::write(&path, &bytes).unwrap();
        #[derive(Debug, PartialEq)]
        enum Refused {
            Frame,
            Header(String),
        }
        impl From<FrameError> for Refused {
            fn from(_: FrameError) -> Refused {
                Refused::Frame
            }
        }
        let refused = read(&path, |h: &Header| Err(Refused::Header(h.name.clone())), &mut io::sink());
        assert_eq!(refused.unwrap_err(), Refused::Header("test".into()));
        assert!(read(&d.path().join("missing"), any, &mut io::sink()).unwrap_err().to_string().contains("opening"));
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
            let e = inspect(&path, any).unwrap_err();
            assert!(matches!(e, FrameError::Corrupt { .. }), "{e}");
            assert!(e.to_string().contains(&format!("payload length {payload_len} does not fit")), "{e}");
        }
    }

    /// The one reading pass never hands over the end of a stream that fails its checks.
    #[test]
    fn a_corrupt_payload_is_named_and_its_end_withheld() {
        let d = tempfile::tempdir().unwrap();
        let (path, raw) = sample(d.path());
        let p = path.display().to_string();
        let info = inspect(&path, any).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for at in [info.payload_offset as usize + 10, bytes.len() / 2, bytes.len() - TRAILER_LEN as usize - 3] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x55;
            std::fs::write(&path, &flipped).unwrap();
            let mut out = vec![];
            let e = read(&path, any, &mut out).unwrap_err().to_string();
            assert!(e.starts_with(&format!("state file {p} is corrupt: ")), "byte {at}: {e}");
            assert!(out.len() < raw.len() && raw.starts_with(&out[..out.len().min(1)]), "byte {at}: the end was sent");
        }
    }
}
