//! What a VM's display shows, kept as PNG files: a stuck installer or a guest that never
//! answers is seen, not guessed. QEMU writes a PPM (`screendump`) through a QMP connection of
//! our own (the second `-qmp` socket of a VM with a display), which is converted here. Three
//! sets are kept: the last few (for a failure's message), `VM-latest.png` (always the newest,
//! named in the log while a long VM runs), and, where asked, a timeline for the stage's report
//! (one about every 30 s, thinned as it grows). The same connection is the VM's keyboard, for a
//! boot loader that waits for a key.

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
/// How far apart the timeline's screenshots are at first.
pub const TIMELINE_SPACING: Duration = Duration::from_secs(30);
/// The most screenshots a timeline keeps: one more, and every other one is deleted and the
/// spacing doubles. A 1 h install keeps 120; an 8 h one between 80 and 160.
pub const TIMELINE_MAX: usize = 160;
/// A VM that has run this long has its newest screenshot named in the log...
pub const ANNOUNCE_AFTER: Duration = Duration::from_secs(60);
/// ... and again this often.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(120);
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

/// One screenshot of a timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shot {
    /// When it was taken, since the VM's screens were first asked for.
    pub at: Duration,
    pub path: PathBuf,
}

/// The screenshots a report shows: one about every `spacing`, the spacing doubled (and every
/// other screenshot deleted) each time there would be more than [`TIMELINE_MAX`].
#[derive(Debug)]
pub struct Timeline {
    dir: PathBuf,
    spacing: Duration,
    shots: Vec<Shot>,
}

impl Timeline {
    pub fn new(dir: impl Into<PathBuf>) -> Timeline {
        Timeline { dir: dir.into(), spacing: TIMELINE_SPACING, shots: Vec::new() }
    }

    /// Whether a screenshot taken at `at` belongs in the timeline.
    fn wants(&self, at: Duration) -> bool {
        self.shots.last().map_or(true, |last| at >= last.at + self.spacing)
    }

    /// Adds `shot`; the screenshots it thins out, to delete.
    fn add(&mut self, shot: Shot) -> Vec<Shot> {
        self.shots.push(shot);
        if self.shots.len() <= TIMELINE_MAX {
            return Vec::new();
        }
        self.spacing *= 2;
        // The first and the newest stay; every other one between goes.
        let all = std::mem::take(&mut self.shots);
        let (mut kept, mut gone) = (Vec::new(), Vec::new());
        let last = all.len() - 1;
        for (i, shot) in all.into_iter().enumerate() {
            if i % 2 == 0 || i == last {
                kept.push(shot);
            } else {
                gone.push(shot);
            }
        }
        self.shots = kept;
        gone
    }

    pub fn shots(&self) -> &[Shot] {
        &self.shots
    }
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
    started: std::time::Instant,
    timeline: Option<Timeline>,
    announced: Option<Duration>,
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
            started: std::time::Instant::now(),
            timeline: None,
            announced: None,
        }
    }

    /// Keeps a timeline of this VM's screen in `dir` (see [`Timeline`]).
    pub fn with_timeline(mut self, dir: impl Into<PathBuf>) -> Screens {
        self.timeline = Some(Timeline::new(dir));
        self
    }

    /// `DIR/VM-latest.png`: the newest screenshot, replaced at each one.
    pub fn latest(&self) -> PathBuf {
        self.dir.join(format!("{}-latest.png", self.vm))
    }

    /// The log's line naming the newest screenshot, when it is due: once the VM has run
    /// [`ANNOUNCE_AFTER`], then every [`ANNOUNCE_EVERY`]. With the path the host sees it at,
    /// when the build runs in a sandbox.
    pub fn due_announcement(&mut self) -> Option<String> {
        let now = self.started.elapsed();
        let due = match self.announced {
            None => now >= ANNOUNCE_AFTER,
            Some(then) => now >= then + ANNOUNCE_EVERY,
        };
        if !due || self.last().is_none() {
            return None;
        }
        self.announced = Some(now);
        let latest = self.latest();
        let host = crate::vm::sys::os::host_path(&latest)
            .map(|h| format!(" (outside the sandbox: {})", h.display()))
            .unwrap_or_default();
        Some(format!(
            "the {}'s screen after {}: {}{host}, replaced every {} s",
            self.vm,
            minutes_seconds(now),
            latest.display(),
            INTERVAL.as_secs()
        ))
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
        // A new name, then a rename: whoever opens the latest never reads half a file.
        let latest = self.latest();
        let fresh = self.dir.join(format!(".{}-latest.png", self.vm));
        let _ = std::fs::remove_file(&fresh);
        link_or_copy(&path, &fresh)?;
        std::fs::rename(&fresh, &latest)
            .map_err(|error| ScreenError::Io { what: format!("renaming {}", fresh.display()), error })?;
        let at = self.started.elapsed();
        if let Some(timeline) = self.timeline.as_mut().filter(|t| t.wants(at)) {
            std::fs::create_dir_all(&timeline.dir)
                .map_err(|error| ScreenError::Io { what: format!("creating {}", timeline.dir.display()), error })?;
            let kept = timeline.dir.join(format!("{}-{}.png", self.vm, timeline_name(at)));
            link_or_copy(&path, &kept)?;
            for gone in timeline.add(Shot { at, path: kept }) {
                let _ = std::fs::remove_file(gone.path);
            }
        }
        Ok(path)
    }

    /// Where the error of a failed stage points to: the last screenshot and the folders.
    pub fn describe(&self) -> Option<String> {
        let timeline = self
            .timeline
            .as_ref()
            .filter(|t| !t.shots().is_empty())
            .map(|t| format!(", one about every {} s since the start in {}", t.spacing.as_secs(), t.dir.display()))
            .unwrap_or_default();
        self.last().map(|p| {
            format!(
                "the {}'s screen when it failed: {} (the last {KEEP} are in {}{timeline}; nix-build -K keeps them)",
                self.vm,
                p.display(),
                self.dir.display()
            )
        })
    }
}

/// A second name for `from` (the same file: no room taken), or a copy where links fail.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), ScreenError> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(drop)
        .map_err(|error| ScreenError::Io { what: format!("copying {} to {}", from.display(), to.display()), error })
}

/// `12m05s`: a timeline screenshot's time in its name (sorted by name, in time order).
fn timeline_name(at: Duration) -> String {
    let s = at.as_secs();
    format!("{:04}m{:02}s", s / 60, s % 60)
}

/// The time a timeline screenshot's file name (`VM-0012m05s.png`) gives.
pub fn timeline_time(file_name: &str) -> Option<Duration> {
    let (_, time) = file_name.strip_suffix(".png")?.rsplit_once('-')?;
    let (m, s) = time.strip_suffix('s')?.split_once('m')?;
    Some(Duration::from_secs(m.parse::<u64>().ok()? * 60 + s.parse::<u64>().ok()?))
}

/// `12 min 5 s`, `40 s`.
pub fn minutes_seconds(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s} s")
    } else {
        format!("{} min {} s", s / 60, s % 60)
    }
}

/// Runs `work` to its end while taking `screens` (if any) every [`INTERVAL`], starting one
/// interval after the start; `say` gets the line naming the newest screenshot when one is due
/// (see [`Screens::due_announcement`]).
pub async fn during<T>(
    screens: Option<&mut Screens>,
    work: std::pin::Pin<&mut impl std::future::Future<Output = T>>,
    say: &dyn Fn(&str),
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
            _ = tick.tick() => {
                screens.capture().await;
                if let Some(line) = screens.due_announcement() {
                    say(&line);
                }
            }
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

    /// Offers a screenshot every `every` for `total`, as the captures would.
    fn run_timeline(every: Duration, total: Duration) -> (Timeline, usize) {
        let mut t = Timeline::new("/nowhere");
        let (mut at, mut deleted) = (Duration::ZERO, 0);
        while at <= total {
            if t.wants(at) {
                deleted += t.add(Shot { at, path: PathBuf::from(format!("{}", at.as_secs())) }).len();
            }
            at += every;
        }
        (t, deleted)
    }

    #[test]
    fn a_timeline_keeps_one_shot_every_30_s_for_an_hour_and_stays_bounded_for_eight() {
        let (hour, deleted) = run_timeline(INTERVAL, Duration::from_secs(3600));
        assert_eq!(hour.shots().len(), 121, "0 s, 30 s, ..., 3600 s");
        assert_eq!(deleted, 0);
        assert!(hour.shots().windows(2).all(|w| w[1].at - w[0].at == TIMELINE_SPACING));
        for hours in [2, 8, 24, 100] {
            let (long, deleted) = run_timeline(INTERVAL, Duration::from_secs(3600 * hours));
            let n = long.shots().len();
            assert!((TIMELINE_MAX / 2..=TIMELINE_MAX).contains(&n), "{hours} h keeps {n}");
            assert!(deleted > 0);
            // Still spread over the whole run: the first screenshot and a recent one.
            assert_eq!(long.shots()[0].at, Duration::ZERO);
            let last = long.shots().last().unwrap().at;
            assert!(Duration::from_secs(3600 * hours) - last <= long.spacing, "{hours} h: last at {last:?}");
        }
    }

    #[test]
    fn timeline_names_sort_in_time_order() {
        let names: Vec<String> = [5, 65, 600, 3599, 36000].map(|s| timeline_name(Duration::from_secs(s))).into();
        assert_eq!(names[0], "0000m05s");
        assert_eq!(names[4], "0600m00s");
        assert_eq!(timeline_time(&format!("installer-{}.png", names[1])), Some(Duration::from_secs(65)));
        assert_eq!(timeline_time("installer-latest.png"), None);
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, names);
    }
}
