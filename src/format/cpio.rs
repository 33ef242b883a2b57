//! The cpio "newc" (070701) encoding, the format the Linux kernel unpacks an initramfs from:
//! each entry a header of thirteen 8-digit hex fields, its NUL-terminated name and its data,
//! each padded to 4 bytes; the archive ends with the entry `TRAILER!!!`.

use std::io::{self, Write};

pub const MAGIC: &[u8; 6] = b"070701";
pub const HEADER_LEN: usize = 110;
/// The name of the entry that ends an archive.
pub const TRAILER: &[u8] = b"TRAILER!!!";

pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;

/// The fields of an entry's header that vary; owner, group and time are always 0, so that an
/// archive depends on its contents alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub ino: u32,
    /// File type and permission bits.
    pub mode: u32,
    pub nlink: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
}

/// Zero bytes up to the next multiple of 4 after `len` bytes.
fn padding(len: usize) -> &'static [u8] {
    &[0, 0, 0][..(4 - len % 4) % 4]
}

/// One entry: header, `name` (without its NUL, which is added), `data`, each padded. A name
/// holding a NUL or data of 4 GiB or more cannot be written.
pub fn write_entry<W: Write>(out: &mut W, header: &Header, name: &[u8], data: &[u8]) -> io::Result<()> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("cpio entry: {what}"));
    if name.contains(&0) {
        return Err(invalid("a name holds a NUL byte"));
    }
    let name_size = u32::try_from(name.len() + 1).map_err(|_| invalid("a name is 4 GiB or longer"))?;
    let file_size = u32::try_from(data.len()).map_err(|_| invalid("a file is 4 GiB or larger"))?;
    let fields = [
        header.ino,
        header.mode,
        0, // uid
        0, // gid
        header.nlink,
        0, // mtime
        file_size,
        0, // devmajor
        0, // devminor
        header.rdev_major,
        header.rdev_minor,
        name_size,
        0, // check: only used by the 070702 variant
    ];
    let mut head = String::with_capacity(HEADER_LEN);
    head.push_str(std::str::from_utf8(MAGIC).expect("ASCII"));
    for field in fields {
        head.push_str(&format!("{field:08x}"));
    }
    out.write_all(head.as_bytes())?;
    out.write_all(name)?;
    out.write_all(&[0])?;
    out.write_all(padding(HEADER_LEN + name.len() + 1))?;
    out.write_all(data)?;
    out.write_all(padding(data.len()))
}

/// The entry that ends an archive.
pub fn write_trailer<W: Write>(out: &mut W) -> io::Result<()> {
    let trailer = Header { ino: 0, mode: 0, nlink: 1, rdev_major: 0, rdev_minor: 0 };
    write_entry(out, &trailer, TRAILER, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_its_hex_header_name_and_data_each_padded() {
        let mut out = Vec::new();
        let header = Header { ino: 1, mode: S_IFREG | 0o644, nlink: 1, rdev_major: 0, rdev_minor: 0 };
        write_entry(&mut out, &header, b"init", b"abcde").unwrap();
        let text = String::from_utf8_lossy(&out[..HEADER_LEN]).into_owned();
        let fields = ["00000001", "000081a4", "00000000", "00000000", "00000001", "00000000", "00000005"];
        let rest = ["00000000", "00000000", "00000000", "00000000", "00000005", "00000000"];
        assert_eq!(text, format!("070701{}{}", fields.concat(), rest.concat()));
        // 110 + "init\0" = 115, padded to 116; 5 bytes of data padded to 8.
        assert_eq!(&out[HEADER_LEN..], b"init\0\0abcde\0\0\0");
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn every_name_and_size_length_is_padded_to_four() {
        for name_len in 1..9 {
            for data_len in 0..9 {
                let mut out = Vec::new();
                let header = Header { ino: 1, mode: S_IFREG, nlink: 1, rdev_major: 0, rdev_minor: 0 };
                write_entry(&mut out, &header, &vec![b'n'; name_len], &vec![7; data_len]).unwrap();
                let data_at = (HEADER_LEN + name_len + 1).div_ceil(4) * 4;
                assert_eq!(out.len(), data_at + data_len.div_ceil(4) * 4, "{name_len} {data_len}");
                assert_eq!(&out[data_at..data_at + data_len], &vec![7; data_len][..]);
            }
        }
    }

    #[test]
    fn a_name_with_a_nul_is_refused() {
        let header = Header { ino: 1, mode: S_IFREG, nlink: 1, rdev_major: 0, rdev_minor: 0 };
        let e = write_entry(&mut Vec::new(), &header, b"a\0b", b"").unwrap_err();
        assert_eq!(e.to_string(), "cpio entry: a name holds a NUL byte");
    }
}
