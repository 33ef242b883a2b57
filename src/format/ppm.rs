//! Binary PPM (P6, 8-bit samples), the format of QEMU's `screendump`.

/// Why bytes are not a P6 file this reader takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PpmError {
    #[error("no P6 magic")]
    NoMagic,
    #[error("the header ends early")]
    HeaderEnds,
    #[error("a header number is not ASCII")]
    NotAscii,
    #[error("a header number is missing or too large")]
    BadNumber,
    #[error("only 8-bit samples (maximum 255) are read")]
    Not8Bit,
    #[error("the size is empty or beyond {MAX_SIDE} pixels")]
    BadSize,
    #[error("no white space after the header")]
    NoSeparator,
    #[error("fewer pixels than the header says")]
    TooFewPixels,
}

/// The largest width or height read: far beyond any display QEMU emulates.
pub const MAX_SIDE: u32 = 16384;

/// Width, height and the RGB bytes of a P6 file with a maximum value of 255.
pub fn parse(ppm: &[u8]) -> Result<(u32, u32, &[u8]), PpmError> {
    let rest = ppm.strip_prefix(b"P6").ok_or(PpmError::NoMagic)?;
    let mut pos = 0;
    let mut fields = [0u32; 3];
    for field in &mut fields {
        // White space and comments before each number.
        loop {
            match rest.get(pos) {
                Some(c) if c.is_ascii_whitespace() => pos += 1,
                Some(b'#') => {
                    while rest.get(pos).is_some_and(|&c| c != b'\n') {
                        pos += 1;
                    }
                }
                Some(_) => break,
                None => return Err(PpmError::HeaderEnds),
            }
        }
        let start = pos;
        while rest.get(pos).is_some_and(u8::is_ascii_digit) {
            pos += 1;
        }
        let digits = std::str::from_utf8(&rest[start..pos]).map_err(|_| PpmError::NotAscii)?;
        *field = digits.parse().map_err(|_| PpmError::BadNumber)?;
    }
    let [width, height, max] = fields;
    if max != 255 {
        return Err(PpmError::Not8Bit);
    }
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(PpmError::BadSize);
    }
    // Exactly one white-space byte separates the header from the pixels.
    if !rest.get(pos).is_some_and(u8::is_ascii_whitespace) {
        return Err(PpmError::NoSeparator);
    }
    let pixels = &rest[pos + 1..];
    let len = width as usize * height as usize * 3;
    let pixels = pixels.get(..len).ok_or(PpmError::TooFewPixels)?;
    Ok((width, height, pixels))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn ppm(w: u32, h: u32, header_extra: &str, px: &[u8]) -> Vec<u8> {
        let mut v = format!("P6\n{header_extra}{w} {h}\n255\n").into_bytes();
        v.extend_from_slice(px);
        v
    }

    #[test]
    fn reads_the_size_past_comments_and_the_pixels() {
        let px: Vec<u8> = (0..2 * 3 * 3).map(|i| (i * 13) as u8).collect();
        assert_eq!(parse(&ppm(2, 3, "# made by a test\n", &px)).unwrap(), (2, 3, &px[..]));
    }

    #[test]
    fn bad_ppm_files_are_refused_with_the_reason() {
        let why = |bytes: &[u8]| parse(bytes).unwrap_err().to_string();
        assert_eq!(why(b"P3\n1 1\n255\n000"), "no P6 magic");
        assert_eq!(why(&ppm(2, 2, "", &[0; 11])), "fewer pixels than the header says");
        assert_eq!(why(b"P6\n1 1\n65535\n\0\0\0\0\0\0"), "only 8-bit samples (maximum 255) are read");
        assert_eq!(why(b"P6\n1"), "the header ends early");
        assert_eq!(why(&ppm(0, 2, "", &[])), "the size is empty or beyond 16384 pixels");
        assert_eq!(why(b"P6 x 1 255 "), "a header number is missing or too large");
    }
}
