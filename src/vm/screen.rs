//! What a VM's display shows, kept as PNG files: a stuck installer or a guest that never
//! answers is seen, not guessed. QEMU writes a PPM (`screendump`) through a QMP connection of
//! our own (the second `-qmp` socket of a VM with a display), which is converted here; only the
//! last few are kept. The same connection is the VM's keyboard, for a boot loader that waits
//! for a key.

use super::qmp::{self, Qmp, QmpError};
use crate::format::{png, ppm};
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

#[derive(Debug, thiserror::Error)]
pub enum ScreenError {
    #[error("{0}")]
    Qmp(QmpError),
    /// `screendump` did not answer within its time.
    #[error("the {vm}'s screendump took more than {} s", STEP_TIMEOUT.as_secs())]
    TimedOut { vm: String },
    /// The I/O error is in the message, and not a `source`.
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    /// QEMU's file is not the binary PPM it writes.
    #[error("{} is not a binary PPM: {why}", path.display())]
    BadPpm { path: PathBuf, why: ppm::PpmError },
}

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
            .map_err(|error| ScreenError::Io { what: format!("creating {}", self.dir.display()), error })?;
        let ppm = self.dir.join(format!(".{}.ppm", self.vm));
        let qmp = self.qmp.as_mut().expect("connected above");
        let dump = qmp::Screendump { filename: ppm.display().to_string() };
        match tokio::time::timeout(STEP_TIMEOUT, qmp.execute_within(&dump, STEP_TIMEOUT)).await {
            Ok(r) => r.map_err(ScreenError::Qmp)?,
            Err(_) => return Err(ScreenError::TimedOut { vm: self.vm.clone() }),
        };
        let bytes = std::fs::read(&ppm)
            .map_err(|error| ScreenError::Io { what: format!("reading {}", ppm.display()), error })?;
        let _ = std::fs::remove_file(&ppm);
        let png = ppm_to_png(&bytes).map_err(|why| ScreenError::BadPpm { path: ppm.clone(), why })?;
        self.count += 1;
        let path = self.dir.join(format!("{}-{:04}.png", self.vm, self.count));
        std::fs::write(&path, png)
            .map_err(|error| ScreenError::Io { what: format!("writing {}", path.display()), error })?;
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

/// A binary PPM (P6, 8-bit) as a PNG.
fn ppm_to_png(ppm: &[u8]) -> Result<Vec<u8>, ppm::PpmError> {
    let (width, height, pixels) = ppm::parse(ppm)?;
    // The reader checked the size against the pixels, which is all the writer asks for.
    Ok(png::encode_rgb(width, height, pixels).expect("a PPM's size and pixels agree"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_screen_dump_becomes_a_png_with_the_same_pixels() {
        let px: Vec<u8> = (0..2 * 3 * 3).map(|i| (i * 13) as u8).collect();
        let mut dump = b"P6\n# made by a test\n2 3\n255\n".to_vec();
        dump.extend_from_slice(&px);
        assert_eq!(png::decode(&ppm_to_png(&dump).unwrap()).unwrap(), (2, 3, px));
        assert_eq!(ppm_to_png(b"P3\n1 1\n255\n000").unwrap_err().to_string(), "no P6 magic");
    }
}
