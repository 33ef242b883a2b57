//! Tar archives, read once, in order, as a stream: ustar (busybox tar), GNU long names and
//! link names (`L`, `K`: GNU tar's `--format=gnu`, and busybox beyond 100 bytes) and pax
//! extended headers (`x`: `path`, `linkpath`, `size`; global `g` headers are skipped). The
//! reader hands out each entry's header, then its data on request; where entries may go and
//! which kinds are welcome is the caller's business.

use std::io::{self, BufRead, BufReader, Read, Write};

pub const BLOCK: usize = 512;
/// A GNU long name or a pax header is metadata: no honest archive needs more.
const MAX_METADATA_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("reading it: {0}")]
    Read(#[source] io::Error),
    /// The stream ended inside an entry or before the end-of-archive marker.
    #[error("it is truncated: it ends at byte {offset}, in {reading}")]
    Truncated { offset: u64, reading: &'static str },
    #[error("it has a bad header at byte {offset}: {detail}")]
    BadHeader { offset: u64, detail: String },
}

/// Why an entry's data did not reach their destination.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Archive(#[from] TarError),
    #[error("writing the data: {0}")]
    Write(#[source] io::Error),
}

/// One entry's header, with the names and size its GNU or pax headers gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Where its own header block starts in the stream.
    pub offset: u64,
    /// The type flag: b'0' or 0 a file, b'5' a folder, b'2' a symbolic link, b'1' a hard link...
    pub kind: u8,
    pub name: Vec<u8>,
    pub link: Vec<u8>,
    pub size: u64,
    mode_field: [u8; 8],
}

impl Entry {
    /// The permission bits; read only when asked for, as only files need them.
    pub fn mode(&self) -> Result<u64, TarError> {
        number(&self.mode_field, "mode", self.offset)
    }
}

pub struct Reader<R> {
    inner: BufReader<R>,
    offset: u64,
    /// Of the current entry: data not yet read, then the padding to the next block.
    data_left: u64,
    padding_left: u64,
}

impl<R: Read> Reader<R> {
    /// Reads `inner` through one buffer of `buffer_bytes`.
    pub fn new(inner: R, buffer_bytes: usize) -> Reader<R> {
        Reader { inner: BufReader::with_capacity(buffer_bytes, inner), offset: 0, data_left: 0, padding_left: 0 }
    }

    /// Bytes of the stream read so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next entry, the rest of the current one's data skipped; None at the end-of-archive
    /// marker (a block of zeros), which a stream must reach.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, TarError> {
        self.skip_data()?;
        let (mut long_name, mut long_link, mut pax): (Option<Vec<u8>>, Option<Vec<u8>>, Pax) =
            (None, None, Pax::default());
        loop {
            let offset = self.offset;
            let Some(block) = self.block()? else {
                return Err(TarError::Truncated { offset, reading: "the end-of-archive marker" });
            };
            if block.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            check_sum(&block, offset)?;
            let kind = block[156];
            let header_size = number(&block[124..136], "size", offset)?;
            match kind {
                b'L' => {
                    long_name = Some(text(&self.metadata(header_size, offset)?).to_vec());
                    continue;
                }
                b'K' => {
                    long_link = Some(text(&self.metadata(header_size, offset)?).to_vec());
                    continue;
                }
                b'x' => {
                    pax = parse_pax(&self.metadata(header_size, offset)?, offset)?;
                    continue;
                }
                b'g' => {
                    self.start_data(header_size);
                    self.skip_data()?;
                    continue;
                }
                _ => {}
            }
            let size = pax.size.take().unwrap_or(header_size);
            let name = pax.path.take().or(long_name.take()).unwrap_or_else(|| header_name(&block));
            let link = pax.linkpath.take().or(long_link.take()).unwrap_or_else(|| text(&block[157..257]).to_vec());
            let mode_field = block[100..108].try_into().expect("8 bytes");
            self.start_data(size);
            return Ok(Some(Entry { offset, kind, name, link, size, mode_field }));
        }
    }

    /// Copies what is left of the current entry's data into `out`.
    pub fn copy_data(&mut self, out: &mut dyn Write) -> Result<(), CopyError> {
        while self.data_left > 0 {
            let buf = self.inner.fill_buf().map_err(TarError::Read)?;
            if buf.is_empty() {
                return Err(TarError::Truncated { offset: self.offset, reading: "an entry's data" }.into());
            }
            let n = buf.len().min(usize::try_from(self.data_left).unwrap_or(usize::MAX));
            out.write_all(&buf[..n]).map_err(CopyError::Write)?;
            self.inner.consume(n);
            self.offset += n as u64;
            self.data_left -= n as u64;
        }
        let pad = std::mem::take(&mut self.padding_left);
        let skipped = io::copy(&mut (&mut self.inner).take(pad), &mut io::sink()).map_err(TarError::Read)?;
        self.offset += skipped;
        if skipped < pad {
            return Err(TarError::Truncated { offset: self.offset, reading: "an entry's data" }.into());
        }
        Ok(())
    }

    /// Skips what is left of the current entry's data.
    pub fn skip_data(&mut self) -> Result<(), TarError> {
        match self.copy_data(&mut io::sink()) {
            Ok(()) => Ok(()),
            Err(CopyError::Archive(e)) => Err(e),
            Err(CopyError::Write(e)) => Err(TarError::Read(e)),
        }
    }

    fn start_data(&mut self, size: u64) {
        self.data_left = size;
        self.padding_left = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
    }

    /// The next header block; None at a clean end of the stream.
    fn block(&mut self) -> Result<Option<[u8; BLOCK]>, TarError> {
        let mut block = [0u8; BLOCK];
        let mut filled = 0;
        while filled < BLOCK {
            let n = match self.inner.read(&mut block[filled..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(TarError::Read(e)),
            };
            if n == 0 {
                if filled == 0 {
                    return Ok(None);
                }
                return Err(TarError::Truncated { offset: self.offset + filled as u64, reading: "a header" });
            }
            filled += n;
        }
        self.offset += BLOCK as u64;
        Ok(Some(block))
    }

    fn metadata(&mut self, size: u64, offset: u64) -> Result<Vec<u8>, TarError> {
        if size > MAX_METADATA_BYTES {
            return Err(TarError::BadHeader { offset, detail: format!("{size} bytes of metadata for one entry") });
        }
        let mut data = Vec::with_capacity(size as usize);
        self.start_data(size);
        match self.copy_data(&mut data) {
            Ok(()) => Ok(data),
            Err(CopyError::Archive(e)) => Err(e),
            Err(CopyError::Write(e)) => Err(TarError::Read(e)),
        }
    }
}

/// The bytes of a header field up to its first NUL.
fn text(field: &[u8]) -> &[u8] {
    field.iter().position(|&b| b == 0).map_or(field, |end| &field[..end])
}

/// A numeric field: octal digits (space or NUL padded), or GNU's base-256 for large values.
fn number(field: &[u8], what: &str, offset: u64) -> Result<u64, TarError> {
    let bad = |detail: String| TarError::BadHeader { offset, detail };
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

fn check_sum(block: &[u8; BLOCK], offset: u64) -> Result<(), TarError> {
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
        Err(TarError::BadHeader { offset, detail: format!("checksum {stored} recorded, {unsigned} computed") })
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
fn parse_pax(data: &[u8], offset: u64) -> Result<Pax, TarError> {
    let bad = |detail: &str| TarError::BadHeader { offset, detail: format!("pax header: {detail}") };
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
            // Times, owners, character sets: the caller has no use for them.
            _ => {}
        }
        rest = &rest[len..];
    }
    Ok(pax)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A hand-made archive, block by block.
    #[derive(Default)]
    pub(crate) struct Tar(Vec<u8>);

    impl Tar {
        pub(crate) fn header(&mut self, name: &[u8], kind: u8, mode: u32, size: usize, link: &[u8], magic: &[u8; 8]) {
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

        pub(crate) fn data(&mut self, data: &[u8]) {
            self.0.extend_from_slice(data);
            let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
            self.0.extend(std::iter::repeat(0u8).take(pad));
        }

        pub(crate) fn entry(&mut self, name: &str, kind: u8, mode: u32, data: &[u8], link: &str) -> &mut Tar {
            self.header(name.as_bytes(), kind, mode, data.len(), link.as_bytes(), b"ustar\x0000");
            self.data(data);
            self
        }

        pub(crate) fn gnu_long(&mut self, kind: u8, value: &[u8]) -> &mut Tar {
            let mut v = value.to_vec();
            v.push(0);
            self.header(b"././@LongLink", kind, 0, v.len(), b"", b"ustar  \0");
            self.data(&v);
            self
        }

        pub(crate) fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Tar {
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

        pub(crate) fn end(&mut self) -> Vec<u8> {
            self.0.extend(std::iter::repeat(0u8).take(2 * BLOCK));
            std::mem::take(&mut self.0)
        }
    }

    /// An entry as (kind, name, link, mode, data).
    type ReadEntry = (u8, String, String, u64, Vec<u8>);

    /// Every entry of `archive`, or the first error.
    fn entries(archive: &[u8]) -> Result<Vec<ReadEntry>, TarError> {
        let mut reader = Reader::new(archive, 4096);
        let mut all = Vec::new();
        while let Some(entry) = reader.next_entry()? {
            let mut data = Vec::new();
            reader.copy_data(&mut data).map_err(|e| match e {
                CopyError::Archive(e) => e,
                CopyError::Write(e) => TarError::Read(e),
            })?;
            let shown = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            all.push((entry.kind, shown(&entry.name), shown(&entry.link), entry.mode()?, data));
        }
        Ok(all)
    }

    #[test]
    fn long_names_and_pax_headers_name_the_next_entry_only() {
        let long = format!("a/{}", "d".repeat(150));
        let archive = Tar::default()
            .entry("a/", b'5', 0o755, b"", "")
            .gnu_long(b'L', long.as_bytes())
            .gnu_long(b'K', b"/target/of/the/link")
            .entry("short", b'2', 0o777, b"", "short-link")
            .pax(&[("path", "a/päx".as_bytes()), ("size", b"3"), ("mtime", b"1.5")])
            .entry("ignored", b'0', 0o644, b"pax", "")
            .entry("a/plain", b'0', 0o600, b"plain", "")
            .end();
        let got = entries(&archive).unwrap();
        let summary: Vec<(u8, &str, &str, u64, &[u8])> =
            got.iter().map(|(k, n, l, m, d)| (*k, n.as_str(), l.as_str(), *m, d.as_slice())).collect();
        assert_eq!(
            summary,
            [
                (b'5', "a/", "", 0o755, &b""[..]),
                (b'2', long.as_str(), "/target/of/the/link", 0o777, b""),
                (b'0', "a/päx", "", 0o644, b"pax"),
                (b'0', "a/plain", "", 0o600, b"plain"),
            ]
        );
    }

    #[test]
    fn damage_is_an_error_with_its_place() {
        let good = Tar::default().entry("f", b'0', 0o644, &[7u8; 1000], "").end();
        let why = |bytes: &[u8]| entries(bytes).unwrap_err().to_string();
        assert_eq!(why(&good[..700]), "it is truncated: it ends at byte 700, in an entry's data");
        assert_eq!(why(&good[..1200]), "it is truncated: it ends at byte 1200, in an entry's data");
        assert_eq!(why(&good[..1536]), "it is truncated: it ends at byte 1536, in the end-of-archive marker");
        let mut bad = good.clone();
        bad[3] ^= 1;
        assert!(why(&bad).starts_with("it has a bad header at byte 0: checksum"), "{}", why(&bad));
        let pax = Tar::default().pax(&[("size", b"x")]).entry("f", b'0', 0o644, b"", "").end();
        assert_eq!(why(&pax), "it has a bad header at byte 0: pax header: a size that is not a number");
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
