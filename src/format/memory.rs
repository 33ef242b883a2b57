//! A guest's memory as a list of pages: the payload of a memory file (framed, compressed and
//! checksummed by [`super::state`]). Each record is a page's index (u64 LE) and its
//! [`PAGE`] bytes; pages not listed are the base's (zero for a whole memory, the layer
//! below's for a layer's differences). Records may come in any order; a later record of the
//! same page wins.

use std::io::{self, Write};

/// The page size of the records: x86's, which QEMU's RAM blocks are made of.
pub const PAGE: usize = 4096;
/// A record's length: the index, then the page.
pub const RECORD: usize = 8 + PAGE;

/// Whether a page is all zero bytes.
pub fn is_zero(page: &[u8]) -> bool {
    // Or-ed a word at a time, with no early exit: the compiler makes it a vector loop.
    let words = page.chunks_exact(8).fold(0u64, |acc, w| acc | u64::from_ne_bytes(w.try_into().expect("8 bytes")));
    words == 0 && page.chunks_exact(8).remainder().iter().all(|b| *b == 0)
}

/// Writes page records into `out`.
pub struct PageWriter<W: Write> {
    out: W,
    pages: u64,
}

impl<W: Write> PageWriter<W> {
    pub fn new(out: W) -> PageWriter<W> {
        PageWriter { out, pages: 0 }
    }

    /// Adds page `index` (exactly [`PAGE`] bytes).
    pub fn put(&mut self, index: u64, page: &[u8]) -> io::Result<()> {
        assert_eq!(page.len(), PAGE, "a page record holds one page");
        self.out.write_all(&index.to_le_bytes())?;
        self.out.write_all(page)?;
        self.pages += 1;
        Ok(())
    }

    /// How many records were written.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// A sink for a stream of page records, handed in pieces of any size: each whole record goes to
/// `page` (its index, its bytes). [`PageSink::finish`] says whether the stream ended between
/// records.
pub struct PageSink<F: FnMut(u64, &[u8]) -> io::Result<()>> {
    page: F,
    partial: Vec<u8>,
    pages: u64,
}

impl<F: FnMut(u64, &[u8]) -> io::Result<()>> PageSink<F> {
    pub fn new(page: F) -> PageSink<F> {
        PageSink { page, partial: Vec::with_capacity(RECORD), pages: 0 }
    }

    fn record(&mut self, r: &[u8]) -> io::Result<()> {
        let index = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
        self.pages += 1;
        (self.page)(index, &r[8..])
    }

    /// The number of records, or an error if the stream stopped inside one.
    pub fn finish(self) -> io::Result<u64> {
        if self.partial.is_empty() {
            Ok(self.pages)
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the page list ends inside a record ({} of its {RECORD} bytes)", self.partial.len()),
            ))
        }
    }
}

impl<F: FnMut(u64, &[u8]) -> io::Result<()>> Write for PageSink<F> {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let n = buf.len();
        if !self.partial.is_empty() {
            let take = (RECORD - self.partial.len()).min(buf.len());
            self.partial.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.partial.len() < RECORD {
                return Ok(n);
            }
            let whole = std::mem::take(&mut self.partial);
            self.record(&whole)?;
            self.partial = whole;
            self.partial.clear();
        }
        while buf.len() >= RECORD {
            self.record(&buf[..RECORD])?;
            buf = &buf[RECORD..];
        }
        self.partial.extend_from_slice(buf);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE]
    }

    /// Records written are read back whole, whatever the sizes of the pieces they arrive in.
    #[test]
    fn records_survive_any_split() {
        let mut w = PageWriter::new(Vec::new());
        w.put(7, &page(1)).unwrap();
        w.put(0, &page(2)).unwrap();
        w.put(1 << 40, &page(3)).unwrap();
        assert_eq!(w.pages(), 3);
        let bytes = w.into_inner();
        for piece in [1, 7, 4095, 4104, 5000, bytes.len()] {
            let mut seen = Vec::new();
            let mut sink = PageSink::new(|i, p: &[u8]| {
                seen.push((i, p[0], p.len()));
                Ok(())
            });
            for chunk in bytes.chunks(piece) {
                sink.write_all(chunk).unwrap();
            }
            assert_eq!(sink.finish().unwrap(), 3);
            assert_eq!(seen, vec![(7, 1, PAGE), (0, 2, PAGE), (1 << 40, 3, PAGE)], "pieces of {piece}");
        }
    }

    #[test]
    fn a_stream_cut_inside_a_record_is_refused() {
        let mut w = PageWriter::new(Vec::new());
        w.put(1, &page(9)).unwrap();
        let bytes = w.into_inner();
        let mut sink = PageSink::new(|_, _: &[u8]| Ok(()));
        sink.write_all(&bytes[..100]).unwrap();
        let e = sink.finish().unwrap_err();
        assert!(e.to_string().contains("ends inside a record (100 of its 4104 bytes)"), "{e}");
    }

    #[test]
    fn zero_pages_are_told_from_others() {
        assert!(is_zero(&page(0)));
        let mut p = page(0);
        p[PAGE - 1] = 1;
        assert!(!is_zero(&p));
        p[PAGE - 1] = 0;
        p[0] = 1;
        assert!(!is_zero(&p));
    }
}
