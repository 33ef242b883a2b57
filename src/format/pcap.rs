//! The classic pcap file format (what `tcpdump -w` writes, version 2.4, microsecond stamps,
//! little-endian), for Ethernet frames: the switch's traffic that a session keeps in
//! `network.pcap` (`vm::vde`). The file is bounded: a frame that would take it past its
//! limit is refused, and the file ends there.

use std::io::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

const MAGIC_MICROSECONDS: u32 = 0xa1b2_c3d4;
const VERSION_MAJOR: u16 = 2;
const VERSION_MINOR: u16 = 4;
/// LINKTYPE_ETHERNET: each record is an Ethernet frame from its destination MAC on.
pub const LINKTYPE_ETHERNET: u32 = 1;
/// The longest frame kept whole; a VDE frame (at most 9234 bytes) always fits.
pub const SNAPLEN: u32 = 65535;
pub const FILE_HEADER_BYTES: u64 = 24;
pub const RECORD_HEADER_BYTES: u64 = 16;

/// What became of a frame handed to [`PcapWriter::frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    Written,
    /// Not written: the file would have passed its limit.
    Full,
}

pub struct PcapWriter<W: Write> {
    out: W,
    bytes: u64,
    limit: u64,
    frames: u64,
}

impl<W: Write> PcapWriter<W> {
    /// Writes the file header; the file will hold at most `limit` bytes, header included.
    pub fn new(mut out: W, limit: u64) -> io::Result<PcapWriter<W>> {
        let mut header = Vec::with_capacity(FILE_HEADER_BYTES as usize);
        header.extend_from_slice(&MAGIC_MICROSECONDS.to_le_bytes());
        header.extend_from_slice(&VERSION_MAJOR.to_le_bytes());
        header.extend_from_slice(&VERSION_MINOR.to_le_bytes());
        header.extend_from_slice(&0i32.to_le_bytes()); // thiszone: stamps are UTC
        header.extend_from_slice(&0u32.to_le_bytes()); // sigfigs
        header.extend_from_slice(&SNAPLEN.to_le_bytes());
        header.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.write_all(&header)?;
        Ok(PcapWriter { out, bytes: FILE_HEADER_BYTES, limit, frames: 0 })
    }

    /// One record: the frame as received at `at`, cut to [`SNAPLEN`].
    pub fn frame(&mut self, at: SystemTime, frame: &[u8]) -> io::Result<Frame> {
        let kept = frame.len().min(SNAPLEN as usize);
        let size = RECORD_HEADER_BYTES + kept as u64;
        if self.bytes + size > self.limit {
            return Ok(Frame::Full);
        }
        let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut header = [0u8; RECORD_HEADER_BYTES as usize];
        // Seconds wrap in 2106, as the format's 32 bits do for every writer.
        header[0..4].copy_from_slice(&(since_epoch.as_secs() as u32).to_le_bytes());
        header[4..8].copy_from_slice(&since_epoch.subsec_micros().to_le_bytes());
        header[8..12].copy_from_slice(&(kept as u32).to_le_bytes());
        header[12..16].copy_from_slice(&(frame.len() as u32).to_le_bytes());
        self.out.write_all(&header)?;
        self.out.write_all(&frame[..kept])?;
        self.bytes += size;
        self.frames += 1;
        Ok(Frame::Written)
    }

    /// Bytes in the file so far, header included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Flushes what is buffered and hands the writer back.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_file_header_is_pcap_2_4_for_ethernet() {
        let out = PcapWriter::new(Vec::new(), 1 << 20).unwrap().finish().unwrap();
        assert_eq!(
            out,
            [
                0xd4, 0xc3, 0xb2, 0xa1, // magic, little-endian, microseconds
                2, 0, 4, 0, // version 2.4
                0, 0, 0, 0, // thiszone
                0, 0, 0, 0, // sigfigs
                0xff, 0xff, 0, 0, // snaplen 65535
                1, 0, 0, 0, // LINKTYPE_ETHERNET
            ]
        );
    }

    #[test]
    fn a_record_carries_its_time_and_lengths_then_the_frame() {
        let mut w = PcapWriter::new(Vec::new(), 1 << 20).unwrap();
        let at = UNIX_EPOCH + Duration::new(0x0102_0304, 567_890_123);
        assert_eq!(w.frame(at, &[0xaa; 60]).unwrap(), Frame::Written);
        assert_eq!((w.frames(), w.bytes()), (1, 24 + 16 + 60));
        let out = w.finish().unwrap();
        let record = &out[24..];
        assert_eq!(&record[0..4], &[0x04, 0x03, 0x02, 0x01], "seconds");
        assert_eq!(u32::from_le_bytes(record[4..8].try_into().unwrap()), 567_890, "microseconds");
        assert_eq!(&record[8..12], &[60, 0, 0, 0], "bytes kept");
        assert_eq!(&record[12..16], &[60, 0, 0, 0], "bytes on the wire");
        assert_eq!(&record[16..], &[0xaa; 60][..]);
    }

    #[test]
    fn a_frame_longer_than_the_snaplen_is_cut_and_says_how_long_it_was() {
        let mut w = PcapWriter::new(Vec::new(), 1 << 20).unwrap();
        w.frame(UNIX_EPOCH, &vec![7u8; SNAPLEN as usize + 10]).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(u32::from_le_bytes(out[24 + 8..24 + 12].try_into().unwrap()), SNAPLEN);
        assert_eq!(u32::from_le_bytes(out[24 + 12..24 + 16].try_into().unwrap()), SNAPLEN + 10);
        assert_eq!(out.len() as u64, 24 + 16 + SNAPLEN as u64);
    }

    #[test]
    fn the_file_stops_at_its_limit() {
        // Room for the header and exactly two 100-byte frames.
        let mut w = PcapWriter::new(Vec::new(), 24 + 2 * 116).unwrap();
        assert_eq!(w.frame(UNIX_EPOCH, &[1; 100]).unwrap(), Frame::Written);
        assert_eq!(w.frame(UNIX_EPOCH, &[2; 100]).unwrap(), Frame::Written);
        assert_eq!(w.frame(UNIX_EPOCH, &[3; 1]).unwrap(), Frame::Full);
        assert_eq!(w.frames(), 2);
        assert_eq!(w.finish().unwrap().len(), 24 + 2 * 116);
    }
}
