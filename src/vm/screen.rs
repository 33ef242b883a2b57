//! What a VM's display shows, kept as PNG files: a stuck installer or a guest that never
//! answers is seen, not guessed. QEMU writes a PPM (`screendump`) through a QMP connection of
//! our own (the second `-qmp` socket of a VM with a display), which is converted here; only the
//! last few are kept. The same connection is the VM's keyboard, for a boot loader that waits
//! for a key.

use super::qmp::{self, Qmp, QmpError};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a running VM's screen is taken.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// How often a key is pressed while [`Screens::press_keys_for`] asks for it.
pub const KEY_INTERVAL: Duration = Duration::from_secs(1);
/// How many screenshots of a VM are kept (older ones are deleted).
pub const KEEP: usize = 5;
/// One `screendump`.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// Connecting to the screen socket: short, as a VM that is gone leaves its socket refusing.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub enum ScreenError {
    Qmp(QmpError),
    /// `screendump` did not answer within its time.
    TimedOut {
        vm: String,
    },
    Io {
        what: String,
        source: std::io::Error,
    },
    /// QEMU's file is not the binary PPM it writes.
    BadPpm {
        path: PathBuf,
        why: &'static str,
    },
}

impl fmt::Display for ScreenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScreenError::Qmp(e) => write!(f, "{e}"),
            ScreenError::TimedOut { vm } => {
                write!(f, "the {vm}'s screendump took more than {} s", STEP_TIMEOUT.as_secs())
            }
            ScreenError::Io { what, source } => write!(f, "{what}: {source}"),
            ScreenError::BadPpm { path, why } => write!(f, "{} is not a binary PPM: {why}", path.display()),
        }
    }
}

impl std::error::Error for ScreenError {}

/// The screenshots of one VM: `DIR/VM-0001.png`, `DIR/VM-0002.png`, ...
pub struct Screens {
    vm: String,
    dir: PathBuf,
    socket: PathBuf,
    qmp: Option<Qmp>,
    taken: Vec<PathBuf>,
    count: u32,
    last_error: Option<String>,
    keys_until: Option<tokio::time::Instant>,
}

impl Screens {
    /// `socket`: the VM's screen QMP socket (it need not exist yet: the connection is made
    /// at the first capture that finds it).
    pub fn new(vm: impl Into<String>, dir: impl Into<PathBuf>, socket: impl Into<PathBuf>) -> Screens {
        Screens {
            vm: vm.into(),
            dir: dir.into(),
            socket: socket.into(),
            qmp: None,
            taken: Vec::new(),
            count: 0,
            last_error: None,
            keys_until: None,
        }
    }

    /// Presses Enter every [`KEY_INTERVAL`] for `window` from now, while [`during`] runs.
    pub fn press_keys_for(&mut self, window: Duration) {
        self.keys_until = Some(tokio::time::Instant::now() + window);
    }

    /// One press of `key`; like a capture, a failure is remembered, not returned.
    pub async fn press(&mut self, key: &str) {
        if let Err(e) = self.try_press(key).await {
            self.qmp = None;
            self.last_error = Some(e.to_string());
        }
    }

    async fn try_press(&mut self, key: &str) -> Result<(), ScreenError> {
        if self.qmp.is_none() {
            self.qmp = Some(Qmp::connect(&self.socket, CONNECT_TIMEOUT).await.map_err(ScreenError::Qmp)?);
        }
        let qmp = self.qmp.as_mut().expect("connected above");
        let press = qmp::SendKey { keys: vec![qmp::KeyValue::qcode(key)] };
        qmp.execute_within(&press, STEP_TIMEOUT).await.map_err(ScreenError::Qmp)?;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The newest screenshot, if one was taken.
    pub fn last(&self) -> Option<&Path> {
        self.taken.last().map(PathBuf::as_path)
    }

    /// Why the last capture failed, if it did (a VM still booting or already gone).
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Takes one screenshot. A failure is remembered, not returned: screenshots are there to
    /// explain a failure, never to cause one.
    pub async fn capture(&mut self) -> Option<PathBuf> {
        match self.try_capture().await {
            Ok(path) => {
                self.last_error = None;
                Some(path)
            }
            Err(e) => {
                // A broken connection is made again at the next capture.
                if matches!(e, ScreenError::Qmp(_) | ScreenError::TimedOut { .. }) {
                    self.qmp = None;
                }
                self.last_error = Some(e.to_string());
                None
            }
        }
    }

    async fn try_capture(&mut self) -> Result<PathBuf, ScreenError> {
        if self.qmp.is_none() {
            self.qmp = Some(Qmp::connect(&self.socket, CONNECT_TIMEOUT).await.map_err(ScreenError::Qmp)?);
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|source| ScreenError::Io { what: format!("creating {}", self.dir.display()), source })?;
        let ppm = self.dir.join(format!(".{}.ppm", self.vm));
        let qmp = self.qmp.as_mut().expect("connected above");
        let dump = qmp::Screendump { filename: ppm.display().to_string() };
        match tokio::time::timeout(STEP_TIMEOUT, qmp.execute_within(&dump, STEP_TIMEOUT)).await {
            Ok(r) => r.map_err(ScreenError::Qmp)?,
            Err(_) => return Err(ScreenError::TimedOut { vm: self.vm.clone() }),
        };
        let bytes = std::fs::read(&ppm)
            .map_err(|source| ScreenError::Io { what: format!("reading {}", ppm.display()), source })?;
        let _ = std::fs::remove_file(&ppm);
        let png = ppm_to_png(&bytes).map_err(|why| ScreenError::BadPpm { path: ppm.clone(), why })?;
        self.count += 1;
        let path = self.dir.join(format!("{}-{:04}.png", self.vm, self.count));
        std::fs::write(&path, png)
            .map_err(|source| ScreenError::Io { what: format!("writing {}", path.display()), source })?;
        self.taken.push(path.clone());
        while self.taken.len() > KEEP {
            let old = self.taken.remove(0);
            let _ = std::fs::remove_file(old);
        }
        Ok(path)
    }

    /// Where the error of a failed stage points to: the last screenshot and the folder.
    pub fn describe(&self) -> Option<String> {
        self.last().map(|p| {
            format!(
                "the {}'s screen when it failed: {} (the last {KEEP} are in {}; nix-build -K keeps them)",
                self.vm,
                p.display(),
                self.dir.display()
            )
        })
    }
}

/// Runs `work` to its end while taking `screens` (if any) every [`INTERVAL`], starting one
/// interval after the start.
pub async fn during<T>(
    screens: Option<&mut Screens>,
    work: std::pin::Pin<&mut impl std::future::Future<Output = T>>,
) -> T {
    let mut work = work;
    let Some(screens) = screens else { return work.await };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + INTERVAL, INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut keys = tokio::time::interval(KEY_INTERVAL);
    keys.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let pressing = screens.keys_until.is_some_and(|end| tokio::time::Instant::now() < end);
        tokio::select! {
            r = &mut work => return r,
            _ = tick.tick() => { screens.capture().await; }
            _ = keys.tick(), if pressing => { screens.press("ret").await; }
        }
    }
}

/// A binary PPM (P6, 8-bit) as a PNG: RGB, unfiltered rows, zlib-compressed.
pub fn ppm_to_png(ppm: &[u8]) -> Result<Vec<u8>, &'static str> {
    let (width, height, pixels) = parse_ppm(ppm)?;
    let row = width as usize * 3;
    let mut raw = Vec::with_capacity((row + 1) * height as usize);
    for line in pixels.chunks_exact(row) {
        raw.push(0); // filter type: none
        raw.extend_from_slice(line);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(&raw).map_err(|_| "compressing the pixels")?;
    let idat = z.finish().map_err(|_| "compressing the pixels")?;
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8 bits, truecolour, deflate, no filter choice, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
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

/// The CRC-32 of PNG chunks (ISO 3309, reflected polynomial 0xEDB88320).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Width, height and the RGB bytes of a P6 file with a maximum value of 255.
fn parse_ppm(ppm: &[u8]) -> Result<(u32, u32, &[u8]), &'static str> {
    let rest = ppm.strip_prefix(b"P6").ok_or("no P6 magic")?;
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
                None => return Err("the header ends early"),
            }
        }
        let start = pos;
        while rest.get(pos).is_some_and(u8::is_ascii_digit) {
            pos += 1;
        }
        let digits = std::str::from_utf8(&rest[start..pos]).map_err(|_| "a header number is not ASCII")?;
        *field = digits.parse().map_err(|_| "a header number is missing or too large")?;
    }
    let [width, height, max] = fields;
    if max != 255 {
        return Err("only 8-bit samples (maximum 255) are read");
    }
    if width == 0 || height == 0 || width > 16384 || height > 16384 {
        return Err("the size is empty or beyond 16384 pixels");
    }
    // Exactly one white-space byte separates the header from the pixels.
    if !rest.get(pos).is_some_and(u8::is_ascii_whitespace) {
        return Err("no white space after the header");
    }
    let pixels = &rest[pos + 1..];
    let len = width as usize * height as usize * 3;
    let pixels = pixels.get(..len).ok_or("fewer pixels than the header says")?;
    Ok((width, height, pixels))
}

/// The RGB pixels of a PNG this module wrote (for checks): width, height, pixels.
pub fn png_pixels(png: &[u8]) -> Result<(u32, u32, Vec<u8>), &'static str> {
    use std::io::Read;
    let mut rest = png.strip_prefix(b"\x89PNG\r\n\x1a\n").ok_or("no PNG signature")?;
    let (mut width, mut height, mut idat) = (0u32, 0u32, Vec::new());
    while rest.len() >= 12 {
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        let kind = &rest[4..8];
        let data = rest.get(8..8 + len).ok_or("a chunk runs past the end")?;
        let crc = rest.get(8 + len..12 + len).ok_or("a chunk runs past the end")?;
        if crc32(&rest[4..8 + len]).to_be_bytes() != crc {
            return Err("a chunk's CRC is wrong");
        }
        match kind {
            b"IHDR" => {
                width = u32::from_be_bytes(data[..4].try_into().unwrap());
                height = u32::from_be_bytes(data[4..8].try_into().unwrap());
                if data[8..10] != [8, 2] {
                    return Err("not 8-bit RGB");
                }
            }
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        rest = &rest[12 + len..];
    }
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..]).read_to_end(&mut raw).map_err(|_| "the pixel data do not inflate")?;
    let row = width as usize * 3;
    if raw.len() != (row + 1) * height as usize {
        return Err("the pixel data have the wrong length");
    }
    let mut pixels = Vec::with_capacity(row * height as usize);
    for line in raw.chunks_exact(row + 1) {
        if line[0] != 0 {
            return Err("a row uses a filter this reader does not undo");
        }
        pixels.extend_from_slice(&line[1..]);
    }
    Ok((width, height, pixels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ppm(w: u32, h: u32, header_extra: &str, px: &[u8]) -> Vec<u8> {
        let mut v = format!("P6\n{header_extra}{w} {h}\n255\n").into_bytes();
        v.extend_from_slice(px);
        v
    }

    #[test]
    fn crc_matches_the_png_specification_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }

    #[test]
    fn a_ppm_becomes_a_png_with_the_same_pixels() {
        let px: Vec<u8> = (0..2 * 3 * 3).map(|i| (i * 13) as u8).collect();
        let png = ppm_to_png(&ppm(2, 3, "# made by a test\n", &px)).unwrap();
        assert!(png.ends_with(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82]));
        assert_eq!(png_pixels(&png).unwrap(), (2, 3, px));
    }

    #[test]
    fn bad_ppm_files_are_refused_with_the_reason() {
        assert_eq!(ppm_to_png(b"P3\n1 1\n255\n000").unwrap_err(), "no P6 magic");
        assert_eq!(ppm_to_png(&ppm(2, 2, "", &[0; 11])).unwrap_err(), "fewer pixels than the header says");
        assert_eq!(
            ppm_to_png(b"P6\n1 1\n65535\n\0\0\0\0\0\0").unwrap_err(),
            "only 8-bit samples (maximum 255) are read"
        );
        assert_eq!(ppm_to_png(b"P6\n1").unwrap_err(), "the header ends early");
        assert_eq!(ppm_to_png(&ppm(0, 2, "", &[])).unwrap_err(), "the size is empty or beyond 16384 pixels");
        assert_eq!(ppm_to_png(b"P6 x 1 255 ").unwrap_err(), "a header number is missing or too large");
    }

    #[test]
    fn a_png_with_a_damaged_chunk_is_refused() {
        let mut png = ppm_to_png(&ppm(1, 1, "", &[1, 2, 3])).unwrap();
        let n = png.len();
        png[n - 20] ^= 0xff;
        assert_eq!(png_pixels(&png).unwrap_err(), "a chunk's CRC is wrong");
    }
}
