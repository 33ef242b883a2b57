//! The VDE switch both VMs plug into, run as a hub. It is ready when the builder itself can
//! plug into it (libvdeplug, src/vm/sys/vdeplug.rs), and that port then captures the pair's
//! traffic into `network.pcap` in the work folder: the hub hands it every frame.

use super::process::{describe_status, ProcessGuard, SpawnError};
use super::sys::{self, vdeplug::Plug};
use super::wait::{wait_until, TimedOut};
use crate::format::pcap::{Frame, PcapWriter};
use std::io::BufWriter;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};
use tokio::process::Command;

pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// One attempt to plug in; a switch that is up answers in milliseconds.
const PLUG_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// The capture in the work folder, which `nix-build -K` and `run -K` keep.
pub const CAPTURE_FILE: &str = "network.pcap";
/// The capture ends at this size: a build that moves gigabytes through its shares must not fill
/// the build folder.
pub const CAPTURE_LIMIT_MIB: u64 = 64;
/// Larger than any frame a VDE switch carries (9216 bytes of MTU and the headers).
const FRAME_BUFFER_BYTES: usize = 16 * 1024;
/// Shorter than an Ethernet header: not a frame (libvdeplug's keep-alives are one byte).
const ETHERNET_HEADER_BYTES: usize = 14;

#[derive(Debug, thiserror::Error)]
pub enum StartSwitchError {
    #[error(transparent)]
    Spawn(SpawnError),
    #[error("vde_switch exited with {status}: {log}")]
    Exited { status: String, log: String },
    #[error("vde_switch did not take a plug: {0}")]
    NotReady(#[source] TimedOut),
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The file could not be made.
    #[error("cannot create {}: {source}", path.display())]
    Create { path: PathBuf, source: std::io::Error },
    /// The capture's thread could not start.
    #[error("cannot start the capture's thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The port that proved the switch ready was already used for a capture.
    #[error("the switch's capture port is already in use")]
    NoPlug,
}

pub struct VdeSwitch {
    // First, so that it is dropped (stopped and flushed) before the switch is killed.
    capture: Option<Capture>,
    /// The port that proved the switch ready, kept for [`VdeSwitch::capture`].
    plug: Option<Plug>,
    pub guard: ProcessGuard,
    pub ctl: PathBuf,
    // Held open: vde_switch in the foreground reads commands from stdin and exits at EOF.
    _stdin: Option<tokio::process::ChildStdin>,
}

impl VdeSwitch {
    pub async fn start(program: &Path, dir: &Path) -> Result<VdeSwitch, StartSwitchError> {
        let ctl = dir.join("vde.ctl");
        let mgmt = dir.join("vde.mgmt");
        let log = dir.join("vde_switch.log");
        let log_file = std::fs::File::create(&log).map_err(|source| {
            StartSwitchError::Spawn(SpawnError {
                name: "vde_switch".into(),
                program: log.display().to_string(),
                source,
            })
        })?;
        let mut cmd = Command::new(program);
        // --dirmode 0700: in the Nix sandbox the builder is not root and cannot chown to a group.
        // --hub: every frame goes to every port, the capture's too (a switch would send the
        // capture only broadcasts, once it has learnt where the two VMs are).
        cmd.arg("-s").arg(&ctl).arg("-M").arg(&mgmt).args(["--dirmode", "0700", "--hub"]);
        cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(log_file);
        let mut guard = ProcessGuard::spawn("vde_switch", cmd).map_err(StartSwitchError::Spawn)?;
        let stdin = guard.take_stdin();
        let what = format!("the builder to plug into vde_switch at {}", ctl.display());
        let ready = wait_until(&what, READY_TIMEOUT, || {
            let exited = guard.try_exited();
            let ctl = ctl.clone();
            async move {
                if let Some(s) = exited {
                    return Some(Err(describe_status(s)));
                }
                plug_in(ctl).await.map(Ok)
            }
        })
        .await;
        match ready {
            Ok(Ok(plug)) => Ok(VdeSwitch { capture: None, plug: Some(plug), guard, ctl, _stdin: stdin }),
            Ok(Err(status)) => Err(StartSwitchError::Exited {
                status,
                log: std::fs::read_to_string(&log).unwrap_or_default().trim().to_owned(),
            }),
            Err(t) => Err(StartSwitchError::NotReady(t)),
        }
    }

    /// Starts writing every frame on the switch into the pcap file `path`, up to
    /// [`CAPTURE_LIMIT_MIB`], in a thread of its own; it ends when the switch does, or when
    /// this is dropped, and flushes the file then. A failure of the capture after it started
    /// is one line on stderr; it never fails the session.
    pub fn capture(&mut self, path: &Path) -> Result<(), CaptureError> {
        let plug = self.plug.take().ok_or(CaptureError::NoPlug)?;
        let file =
            std::fs::File::create(path).map_err(|source| CaptureError::Create { path: path.to_path_buf(), source })?;
        let pcap = PcapWriter::new(BufWriter::with_capacity(256 * 1024, file), CAPTURE_LIMIT_MIB << 20)
            .map_err(|source| CaptureError::Create { path: path.to_path_buf(), source })?;
        let (stop_read, stop_write) = super::process::pipe().map_err(CaptureError::Thread)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let frames = Arc::new(AtomicU64::new(0));
        let counted = frames.clone();
        let thread = std::thread::Builder::new()
            .name("network capture".into())
            .spawn(move || capture_frames(plug, stop_read, pcap, &name, &counted))
            .map_err(CaptureError::Thread)?;
        self.capture = Some(Capture { stop: Some(stop_write), thread: Some(thread), frames });
        Ok(())
    }

    /// How many frames the capture has taken so far (buffered: the file has them at its end).
    #[cfg(test)]
    fn captured_frames(&self) -> u64 {
        self.capture.as_ref().map(|c| c.frames.load(Ordering::Relaxed)).unwrap_or(0)
    }
}

/// One attempt to plug into the switch at `ctl`. libvdeplug blocks while it talks to the
/// switch, so the attempt runs on a blocking thread and is given up after
/// [`PLUG_ATTEMPT_TIMEOUT`].
async fn plug_in(ctl: PathBuf) -> Option<Plug> {
    let attempt = tokio::task::spawn_blocking(move || Plug::open(&ctl, "nix-winvm capture"));
    match tokio::time::timeout(PLUG_ATTEMPT_TIMEOUT, attempt).await {
        Ok(Ok(Ok(plug))) => Some(plug),
        _ => None,
    }
}

/// The capture's thread, stopped by closing the write end of its pipe.
struct Capture {
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    /// Frames taken so far: what the tests wait for.
    #[cfg_attr(not(test), allow(dead_code))]
    frames: Arc<AtomicU64>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        // The thread sees the pipe's end at once, writes out what it holds and returns.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn capture_frames(
    mut plug: Plug,
    stop: OwnedFd,
    mut pcap: PcapWriter<BufWriter<std::fs::File>>,
    name: &str,
    frames: &AtomicU64,
) {
    let say = |line: String| eprintln!("nix-winvm: {name}: {line}");
    let mut buf = vec![0u8; FRAME_BUFFER_BYTES];
    loop {
        let ready = match sys::wait_readable(&[plug.data_fd(), plug.ctl_fd(), stop.as_fd()], None) {
            Ok(ready) => ready,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                say(format!("the capture stopped: waiting for frames failed: {e}"));
                break;
            }
        };
        let (data, switch_gone, stopped) = (ready[0], ready[1], ready[2]);
        if stopped {
            break;
        }
        if data {
            // The frames still queued when the switch goes are read before the end.
            match plug.recv(&mut buf) {
                Ok(n) if n >= ETHERNET_HEADER_BYTES => match pcap.frame(SystemTime::now(), &buf[..n]) {
                    Ok(Frame::Written) => frames.store(pcap.frames(), Ordering::Relaxed),
                    Ok(Frame::Full) => {
                        say(format!(
                            "the capture reached its limit of {CAPTURE_LIMIT_MIB} MiB ({} frames); later frames are not in it",
                            pcap.frames()
                        ));
                        break;
                    }
                    Err(e) => {
                        say(format!("the capture stopped: writing failed: {e}"));
                        return;
                    }
                },
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock) => {}
                Err(e) => {
                    // A switch that has gone leaves its data socket in error: that is the end.
                    if !switch_gone {
                        say(format!("the capture stopped: reading from the switch failed: {e}"));
                    }
                    break;
                }
            }
            continue;
        }
        if switch_gone {
            break;
        }
    }
    if let Err(e) = pcap.finish() {
        say(format!("the capture could not be written out: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn switch_program() -> Option<PathBuf> {
        let found = crate::tools::find("vde_switch").ok();
        crate::tools::test_requires("vde_switch", found.is_some()).then(|| found.unwrap())
    }

    /// The real vde_switch: ready once plugged into; a frame another port sends reaches the
    /// capture, which ends with the switch and leaves a whole pcap file.
    #[test]
    fn the_capture_port_sees_the_frames_of_the_other_ports() {
        let Some(program) = switch_program() else { return };
        let dir = tempfile::tempdir().unwrap();
        let pcap = dir.path().join(CAPTURE_FILE);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut frame = vec![0xffu8; 6]; // broadcast
        frame.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x01, 0x09, 0x88, 0xb5]); // local experimental type
        frame.extend_from_slice(b"nix-winvm capture test");
        rt.block_on(async {
            let mut switch = VdeSwitch::start(&program, dir.path()).await.unwrap();
            switch.capture(&pcap).unwrap();
            let mut a = Plug::open(&switch.ctl, "test sender").unwrap();
            let mut b = Plug::open(&switch.ctl, "test receiver").unwrap();
            // Two frames: the hub hands each to every other port, the capture's included.
            a.send(&frame).unwrap();
            a.send(&frame).unwrap();
            // Once the receiver has both, the hub has passed them to the capture too.
            let mut buf = vec![0u8; FRAME_BUFFER_BYTES];
            for _ in 0..2 {
                let ready = sys::wait_readable(&[b.data_fd()], Some(Duration::from_secs(5))).unwrap();
                assert!(ready[0], "the hub did not pass the frame on");
                assert_eq!(b.recv(&mut buf).unwrap(), frame.len());
            }
            let captured = wait_until("the capture to take both frames", Duration::from_secs(5), || {
                let n = switch.captured_frames();
                async move { (n == 2).then_some(()) }
            });
            captured.await.unwrap();
            switch.guard.shutdown(Duration::from_secs(2)).await;
            drop(switch);
        });
        let bytes = std::fs::read(&pcap).unwrap();
        assert_eq!(&bytes[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
        let record = 16 + frame.len();
        assert_eq!(bytes.len(), 24 + 2 * record, "two records expected");
        assert_eq!(&bytes[24 + 16..24 + record], &frame[..]);
    }

    #[test]
    fn a_second_capture_is_refused() {
        let Some(program) = switch_program() else { return };
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut switch = VdeSwitch::start(&program, dir.path()).await.unwrap();
            switch.capture(&dir.path().join("a.pcap")).unwrap();
            assert!(matches!(switch.capture(&dir.path().join("b.pcap")), Err(CaptureError::NoPlug)));
            let e = switch.capture(&dir.path().join("b.pcap")).unwrap_err();
            assert_eq!(e.to_string(), "the switch's capture port is already in use");
        });
        // The capture ended with the switch (dropped above) and its file is whole.
        assert_eq!(std::fs::read(dir.path().join("a.pcap")).unwrap().len(), 24);
    }

    #[test]
    fn an_unwritable_capture_file_is_an_error_not_a_failed_session() {
        let Some(program) = switch_program() else { return };
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut switch = VdeSwitch::start(&program, dir.path()).await.unwrap();
            let e = switch.capture(&dir.path().join("missing/network.pcap")).unwrap_err();
            assert!(e
                .to_string()
                .starts_with(&format!("cannot create {}/missing/network.pcap: ", dir.path().display())));
            // The switch is still up: another port plugs in.
            assert!(Plug::open(&switch.ctl, "after").is_ok());
        });
    }
}
