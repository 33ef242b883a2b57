//! PNG, as far as screenshots need it: 8-bit RGB written with unfiltered rows, and read back:
//! what this module writes, and what a browser's screenshot holds (8-bit RGB or RGBA, any row
//! filter, no interlace; alpha dropped), which tests look at. Chunk checksums are CRC-32 from
//! flate2.

use std::io::{Read, Write};

use flate2::Crc;

const SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";
/// The largest width or height read: far beyond any display QEMU emulates, and small enough
/// that the pixel count cannot overflow.
pub const MAX_SIDE: u32 = 16384;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PngError {
    #[error("{len} bytes are not the {width}x{height} RGB pixels given")]
    PixelCount { width: u32, height: u32, len: usize },
    #[error("no PNG signature")]
    NoSignature,
    #[error("a chunk runs past the end")]
    ChunkPastEnd,
    #[error("a chunk's CRC is wrong")]
    Crc,
    #[error("the IHDR chunk is not 13 bytes")]
    BadHeader,
    #[error("not 8-bit RGB or RGBA without interlace")]
    NotRgb8,
    #[error("the size is empty or beyond {MAX_SIDE} pixels")]
    BadSize,
    #[error("the pixel data do not inflate")]
    Inflate,
    #[error("the pixel data have the wrong length")]
    PixelDataLength,
    #[error("a row uses a filter this reader does not undo")]
    Filter,
}

/// A PNG of `width` x `height` pixels from their RGB bytes, row by row: truecolour, 8 bits,
/// unfiltered rows, zlib-compressed at the fast level.
pub fn encode_rgb(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>, PngError> {
    let row = width as usize * 3;
    if row == 0 || height == 0 || rgb.len() != row * height as usize {
        return Err(PngError::PixelCount { width, height, len: rgb.len() });
    }
    let mut raw = Vec::with_capacity((row + 1) * height as usize);
    for line in rgb.chunks_exact(row) {
        raw.push(0); // filter type: none
        raw.extend_from_slice(line);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(&raw).expect("writing into a Vec");
    let idat = z.finish().expect("writing into a Vec");
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8 bits, truecolour, deflate, no filter choice, no interlace
    let mut png = SIGNATURE.to_vec();
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &idat);
    chunk(&mut png, b"IEND", &[]);
    Ok(png)
}

fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    png.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = png.len();
    png.extend_from_slice(kind);
    png.extend_from_slice(data);
    let crc = crc32(&png[start..]);
    png.extend_from_slice(&crc.to_be_bytes());
}

/// The CRC-32 of a chunk's type and data (ISO 3309, as zlib and gzip have it).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = Crc::new();
    crc.update(bytes);
    crc.sum()
}

/// Width, height and RGB pixels of an 8-bit RGB or RGBA PNG (alpha dropped), such as
/// [`encode_rgb`] writes and browsers save.
pub fn decode(png: &[u8]) -> Result<(u32, u32, Vec<u8>), PngError> {
    let mut rest = png.strip_prefix(SIGNATURE).ok_or(PngError::NoSignature)?;
    let (mut width, mut height, mut idat, mut channels) = (0u32, 0u32, Vec::new(), 3usize);
    while rest.len() >= 12 {
        let len = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let kind = &rest[4..8];
        let data = rest.get(8..8 + len).ok_or(PngError::ChunkPastEnd)?;
        let crc = rest.get(8 + len..12 + len).ok_or(PngError::ChunkPastEnd)?;
        if crc32(&rest[4..8 + len]).to_be_bytes() != crc {
            return Err(PngError::Crc);
        }
        match kind {
            b"IHDR" => {
                if data.len() != 13 {
                    return Err(PngError::BadHeader);
                }
                width = u32::from_be_bytes(data[..4].try_into().expect("4 bytes"));
                height = u32::from_be_bytes(data[4..8].try_into().expect("4 bytes"));
                channels = match data[8..13] {
                    [8, 2, 0, 0, 0] => 3,
                    [8, 6, 0, 0, 0] => 4,
                    _ => return Err(PngError::NotRgb8),
                };
            }
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        rest = &rest[12 + len..];
    }
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(PngError::BadSize);
    }
    let row = width as usize * channels;
    let expected = (row + 1) * height as usize;
    let mut raw = Vec::new();
    // No more than the header's size is inflated, whatever the data hold.
    flate2::read::ZlibDecoder::new(&idat[..])
        .take(expected as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(|_| PngError::Inflate)?;
    if raw.len() != expected {
        return Err(PngError::PixelDataLength);
    }
    let mut pixels = Vec::with_capacity(width as usize * 3 * height as usize);
    let (mut above, mut line) = (vec![0u8; row], vec![0u8; row]);
    for filtered in raw.chunks_exact(row + 1) {
        unfilter(filtered[0], &filtered[1..], &above, channels, &mut line)?;
        for px in line.chunks_exact(channels) {
            pixels.extend_from_slice(&px[..3]);
        }
        std::mem::swap(&mut above, &mut line);
    }
    Ok((width, height, pixels))
}

/// One row's bytes from its filtered ones (PNG's five filter types), given the row above
/// (zeros for the first) and the bytes a pixel has.
fn unfilter(kind: u8, row: &[u8], above: &[u8], bpp: usize, out: &mut [u8]) -> Result<(), PngError> {
    for i in 0..row.len() {
        let left = if i >= bpp { out[i - bpp] } else { 0 };
        let up = above[i];
        let up_left = if i >= bpp { above[i - bpp] } else { 0 };
        let predicted = match kind {
            0 => 0,
            1 => left,
            2 => up,
            3 => ((u16::from(left) + u16::from(up)) / 2) as u8,
            4 => paeth(left, up, up_left),
            _ => return Err(PngError::Filter),
        };
        out[i] = row[i].wrapping_add(predicted);
    }
    Ok(())
}

fn paeth(a: u8, b: u8, c: u8) -> u8 {
    let p = i16::from(a) + i16::from(b) - i16::from(c);
    let (pa, pb, pc) = ((p - i16::from(a)).abs(), (p - i16::from(b)).abs(), (p - i16::from(c)).abs());
    if pa <= pb && pa <= pc {
        a
    } else if pb <= pc {
        b
    } else {
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_png_specification_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }

    #[test]
    fn pixels_read_back_as_they_were_written() {
        let px: Vec<u8> = (0..2 * 3 * 3).map(|i| (i * 13) as u8).collect();
        let png = encode_rgb(2, 3, &px).unwrap();
        assert!(png.ends_with(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82]));
        assert_eq!(decode(&png).unwrap(), (2, 3, px));
        assert_eq!(encode_rgb(2, 3, &[0; 17]), Err(PngError::PixelCount { width: 2, height: 3, len: 17 }));
    }

    /// A PNG of RGBA `pixels` whose row `y` uses filter `y % 5`, filtered here the way the
    /// specification defines each.
    fn rgba_png_with_every_filter(width: usize, pixels: &[u8]) -> Vec<u8> {
        let row = width * 4;
        let mut raw = Vec::new();
        let zero = vec![0u8; row];
        for (y, line) in pixels.chunks_exact(row).enumerate() {
            let above = if y == 0 { &zero[..] } else { &pixels[(y - 1) * row..y * row] };
            let kind = (y % 5) as u8;
            raw.push(kind);
            for i in 0..row {
                let (a, b) = (if i >= 4 { line[i - 4] } else { 0 }, above[i]);
                let c = if i >= 4 { above[i - 4] } else { 0 };
                let predicted = [0, a, b, ((a as u16 + b as u16) / 2) as u8, paeth(a, b, c)][kind as usize];
                raw.push(line[i].wrapping_sub(predicted));
            }
        }
        let mut png = SIGNATURE.to_vec();
        let mut ihdr = (width as u32).to_be_bytes().to_vec();
        ihdr.extend_from_slice(&((pixels.len() / row) as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
        chunk(&mut png, b"IHDR", &ihdr);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&raw).unwrap();
        chunk(&mut png, b"IDAT", &z.finish().unwrap());
        chunk(&mut png, b"IEND", &[]);
        png
    }

    #[test]
    fn rgba_rows_under_every_filter_read_back_as_rgb() {
        let (w, h) = (7, 10);
        let rgba: Vec<u8> = (0..w * h * 4).map(|i| ((i * 37) ^ (i / 5)) as u8).collect();
        let (width, height, rgb) = decode(&rgba_png_with_every_filter(w, &rgba)).unwrap();
        assert_eq!((width, height), (w as u32, h as u32));
        let expected: Vec<u8> = rgba.chunks_exact(4).flat_map(|p| p[..3].to_vec()).collect();
        assert_eq!(rgb, expected);
        // Paeth picks the neighbour nearest to left + up - up-left: left, then up, on a tie.
        assert_eq!(paeth(10, 20, 15), 15);
        assert_eq!(paeth(10, 10, 20), 10);
        assert_eq!(paeth(10, 20, 5), 20);
        assert_eq!(paeth(10, 20, 25), 10);
        assert_eq!(paeth(100, 20, 90), 20);
        assert_eq!(paeth(50, 60, 58), 50);
    }

    #[test]
    fn a_png_with_a_damaged_chunk_is_refused() {
        let mut png = encode_rgb(1, 1, &[1, 2, 3]).unwrap();
        let n = png.len();
        png[n - 20] ^= 0xff;
        assert_eq!(decode(&png).unwrap_err().to_string(), "a chunk's CRC is wrong");
    }
}
