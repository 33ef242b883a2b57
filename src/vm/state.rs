//! The saved memory of a suspended guest: QEMU's migration stream in a state file
//! ([`crate::format::state`]: its framing, compression and checksum), behind a header that
//! says which VM it holds. A revive checks that header against the VM it is about to start
//! before QEMU reads a byte of the stream.
//!
//! `nix-winvm-builder state-write` and `state-read` are the other end of QEMU's migration
//! stream: the session starts them on a pipe and hands QEMU its end (`migrate fd:`,
//! `migrate-incoming fd:`).

use crate::format::state::{self as frame, FrameError};
use crate::spec::MachineShape;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StateHeader {
    /// QEMU's own version string (major.minor.micro and package): the same QEMU or a newer
    /// one loads the stream, on the same machine type.
    pub qemu_version: String,
    pub memory_mib: u32,
    pub guest: String,
    /// The versioned machine type the VM ran as (`pc-q35-10.0`), which a revive asks for again.
    pub machine: String,
    /// The RAM is not in the stream: it was saved in a file of its own (`x-ignore-shared`; see
    /// `vm::memory`), which a revive maps. Absent in the states of images made before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ram_outside: bool,
}

impl StateHeader {
    /// The header of a VM of `shape` that runs `guest`, saved by QEMU `qemu_version`. Of the
    /// shape it records what a revive checks before QEMU reads a byte, the memory size and the
    /// machine type; the rest is the image's spec, which a build's must equal.
    pub fn new(qemu_version: String, guest: &str, shape: &MachineShape) -> StateHeader {
        StateHeader {
            qemu_version,
            memory_mib: shape.memory_mib,
            guest: guest.into(),
            machine: shape.machine_type.clone(),
            ram_outside: false,
        }
    }
}

/// What a revive needs of a state file: the VM it is about to load it into.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub memory_mib: u32,
    /// The running QEMU's version string (see [`StateHeader::qemu_version`]).
    pub qemu_version: &'a str,
    pub machine: &'a str,
}

pub type StateInfo = frame::StateInfo<StateHeader>;

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file itself: missing, foreign, truncated, corrupt.
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(
        "state file {} holds a VM with {saved} MiB of memory, but {wanted} MiB were asked for: the image's metadata does not match its state; {}",
        path.display(),
        repair(path)
    )]
    MemoryMismatch { path: PathBuf, saved: u32, wanted: u32 },
    /// Saved by a newer QEMU than the running one (QEMU loads streams of its own version and
    /// older ones, not newer ones).
    #[error(
        "state file {} was saved by QEMU {saved}, but this is the older QEMU {running}; a memory snapshot loads only into the QEMU that made it or a newer one: use that QEMU or a newer one, or {}",
        path.display(),
        repair(path)
    )]
    QemuMismatch { path: PathBuf, saved: String, running: String },
    #[error(
        "state file {} holds a VM of machine type {saved}, but the revive asked for {wanted}: the image's metadata does not match its state; {}",
        path.display(),
        repair(path)
    )]
    MachineMismatch { path: PathBuf, saved: String, wanted: String },
    #[error(
        "state file {} {}: the image's metadata does not match its state; {}",
        path.display(),
        if *saved_outside { "leaves the RAM to a memory file, but the revive has none" } else { "holds the RAM, but the revive maps a memory file" },
        repair(path)
    )]
    RamMismatch { path: PathBuf, saved_outside: bool },
}

/// What to do about an image whose state file `state` does not match it: build it again.
fn repair(state: &Path) -> String {
    format!("build the image again (nix-store --repair-path {})", state.parent().unwrap_or(state).display())
}

/// What QEMU prints when a whole migration stream describes a VM it does not make: other
/// devices or device versions, another machine, other RAM blocks (as after a QEMU upgrade that
/// changed them). Each line starts with QEMU's program name.
const INCOMPATIBLE: &[&str] = &[
    "Unknown savevm section",
    // QEMU 11 words it so, at the end of its one line "load of migration failed: ...".
    "Unknown section or instance",
    "savevm: unsupported version",
    "error while loading state for instance",
    "Machine type received is",
    "Configuration section missing",
    "Unknown ramblock",
    "Length mismatch",
];

/// QEMU's failed load, from its output.
const LOAD_FAILED: &str = "load of migration failed: ";

/// A stream cut short: QEMU's words for it. The state reader checks a file's length and
/// checksum itself, so a short stream is its failure (or an I/O one), not an incompatible VM.
const SHORT_STREAM: &str = "Input/output error";

/// Whether QEMU's output (`qemu_output`) says that the stream it loaded describes a VM it
/// does not make; the line that says why, without QEMU's program name. A stream cut short or
/// unreadable is not one (its own error says so).
pub fn incompatible_load(qemu_output: &str) -> Option<String> {
    let said = |line: &str| line.split_once(": ").map_or(line, |(_, rest)| rest).trim().to_owned();
    let failed = qemu_output.lines().find(|l| l.contains(LOAD_FAILED))?;
    // QEMU 10 ends the line there; QEMU 11 adds the step that failed after it.
    let reason = failed.split_once(LOAD_FAILED).map_or("", |(_, r)| r);
    if reason.starts_with(SHORT_STREAM) {
        return None;
    }
    // From QEMU's reason on: alone on its line (QEMU 10), or after the failure's words (11).
    let why = qemu_output.lines().find_map(|l| INCOMPATIBLE.iter().find_map(|m| l.find(m).map(|at| &l[at..])));
    Some(why.map_or_else(|| said(failed), |w| w.trim().to_owned()))
}

/// Compresses `input` (QEMU's migration stream) into `path`, atomically: the file appears
/// only when complete.
pub fn write(path: &Path, header: &StateHeader, input: &mut dyn Read) -> Result<StateInfo, StateFileError> {
    Ok(frame::write(path, header, input)?)
}

/// Whether QEMU `running` loads a stream that QEMU `saved` wrote: the same version string, or a
/// newer release (major.minor.micro). QEMU keeps loading the streams of older releases for
/// their versioned machine types; an unreadable version counts only when it is identical.
pub fn loads_into(saved: &str, running: &str) -> bool {
    fn release(v: &str) -> Option<(u32, u32, u32)> {
        let mut parts = v.split_whitespace().next()?.split('.').map(|n| n.parse::<u32>().ok());
        Some((parts.next()??, parts.next()??, parts.next()??))
    }
    saved == running || matches!((release(saved), release(running)), (Some(s), Some(r)) if r >= s)
}

/// Whether the VM `header` describes is the one `wanted`, if anything is.
fn check(path: &Path, header: &StateHeader, wanted: Option<Wanted<'_>>) -> Result<(), StateFileError> {
    let Some(w) = wanted else { return Ok(()) };
    let path = path.to_path_buf();
    if header.memory_mib != w.memory_mib {
        return Err(StateFileError::MemoryMismatch { path, saved: header.memory_mib, wanted: w.memory_mib });
    }
    if header.machine != w.machine {
        return Err(StateFileError::MachineMismatch { path, saved: header.machine.clone(), wanted: w.machine.into() });
    }
    if !loads_into(&header.qemu_version, w.qemu_version) {
        return Err(StateFileError::QemuMismatch {
            path,
            saved: header.qemu_version.clone(),
            running: w.qemu_version.into(),
        });
    }
    Ok(())
}

/// The frame and the header checked, the payload not read.
pub fn inspect(path: &Path, wanted: Option<Wanted<'_>>) -> Result<StateInfo, StateFileError> {
    frame::inspect(path, |header| check(path, header, wanted))
}

/// Streams the decompressed migration stream to `out`, reading the file once: the checksum
/// and the lengths are checked as the bytes go by, and the last chunk is held back until they
/// pass, so that QEMU never receives the end of a stream that fails them (it then refuses the
/// incomplete stream instead of running a damaged guest).
pub fn read(path: &Path, wanted: Option<Wanted<'_>>, out: &mut dyn Write) -> Result<StateInfo, StateFileError> {
    frame::read(path, |header| check(path, header, wanted), out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{self, Write};

    fn header() -> StateHeader {
        StateHeader {
            qemu_version: "10.0.2 (test)".into(),
            memory_mib: 256,
            guest: "standin".into(),
            machine: "pc-q35-10.0".into(),
            ram_outside: false,
        }
    }

    fn wanted(memory_mib: u32, qemu_version: &str) -> Option<Wanted<'_>> {
        Some(Wanted { memory_mib, qemu_version, machine: "pc-q35-10.0" })
    }

    fn sample(dir: &Path) -> (PathBuf, Vec<u8>) {
        let raw: Vec<u8> = (0..300_000u32).map(|i| if i % 7 == 0 { (i % 251) as u8 } else { 0 }).collect();
        let path = dir.join("state");
        write(&path, &header(), &mut &raw[..]).unwrap();
        (path, raw)
    }

    #[test]
    fn round_trip_into_the_vm_it_was_saved_from() {
        let d = tempfile::tempdir().unwrap();
        let (path, raw) = sample(d.path());
        let mut out = vec![];
        let info = read(&path, wanted(256, "10.0.2 (test)"), &mut out).unwrap();
        assert_eq!(out, raw);
        assert_eq!(info.header, header());
    }

    #[test]
    fn another_vm_is_refused_with_the_file_and_the_difference() {
        let d = tempfile::tempdir().unwrap();
        let (path, _) = sample(d.path());
        let p = path.display().to_string();
        let msg = |wanted: Option<Wanted<'_>>| read(&path, wanted, &mut io::sink()).unwrap_err().to_string();
        assert_eq!(
            msg(wanted(512, "10.0.2 (test)")),
            format!(
                "state file {p} holds a VM with 256 MiB of memory, but 512 MiB were asked for: the image's metadata does \
                 not match its state; build the image again (nix-store --repair-path {})",
                d.path().display()
            )
        );
        assert!(msg(wanted(256, "9.2.0")).contains("was saved by QEMU 10.0.2 (test), but this is the older QEMU 9.2.0"));
        let other_machine = Some(Wanted { memory_mib: 256, qemu_version: "10.0.2 (test)", machine: "pc-q35-9.2" });
        assert!(
            msg(other_machine).contains("holds a VM of machine type pc-q35-10.0, but the revive asked for pc-q35-9.2")
        );
        // A newer QEMU loads it.
        let mut out = vec![];
        read(&path, wanted(256, "11.1.2 (Debian 1:11.1.2+ds-3)"), &mut out).unwrap();
        // The frame is checked first: a truncated file is truncated, whatever VM is wanted.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
        let e = inspect(&path, wanted(512, "1.0.0")).unwrap_err();
        assert!(matches!(e, StateFileError::Frame(FrameError::Truncated { .. })), "{e}");
    }

    /// QEMU's output when a stream does not load, from a real QEMU: a VM saved with a device
    /// the loading one lacks (as a QEMU upgrade changes a device) is named, with QEMU's line;
    /// a stream cut short is not.
    #[test]
    fn a_stream_of_another_vm_is_told_from_a_short_one_by_what_qemu_says() {
        let Ok(qemu) = crate::tools::find("qemu-system-x86_64") else {
            crate::tools::test_requires("qemu-system-x86_64", false);
            return;
        };
        let d = tempfile::tempdir().unwrap();
        let stream = d.path().join("stream");
        let vm = |extra: &[&str]| {
            let mut c = std::process::Command::new(&qemu);
            c.args(["-machine", "q35,accel=tcg", "-m", "64", "-nodefaults", "-display", "none"]).args(extra);
            c
        };
        // Saved stopped, by the monitor's synchronous `migrate`.
        let mut saver = vm(&["-S", "-device", "virtio-rng-pci", "-monitor", "stdio"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let command = format!("migrate \"exec:cat > {}\"\nquit\n", stream.display());
        saver.stdin.take().unwrap().write_all(command.as_bytes()).unwrap();
        assert!(saver.wait().unwrap().success());
        assert!(std::fs::metadata(&stream).unwrap().len() > 0);
        let load = |extra: &[&str], uri: String| {
            let o = vm(extra).args(["-incoming", &uri]).output().unwrap();
            assert!(!o.status.success());
            String::from_utf8_lossy(&o.stderr).into_owned()
        };
        let other = load(&[], format!("exec:cat {}", stream.display()));
        let said = incompatible_load(&other).unwrap_or_else(|| panic!("not named:\n{other}"));
        // QEMU 10: "Unknown savevm section or instance ..."; QEMU 11: "Unknown section or instance ...".
        assert!(said.starts_with("Unknown "), "{said}");
        assert!(said.contains("section or instance '0000:00:01.0/virtio-rng' 0"), "{said}");
        let short = load(&["-device", "virtio-rng-pci"], format!("exec:head -c 100000 {}", stream.display()));
        assert!(short.contains(LOAD_FAILED), "{short}");
        assert_eq!(incompatible_load(&short), None, "{short}");
    }

    #[test]
    fn a_newer_qemu_loads_an_older_stream_and_an_older_one_does_not() {
        assert!(loads_into("10.0.2 (Debian 1:10.0.2+ds-2)", "10.0.2 (Debian 1:10.0.2+ds-2)"));
        assert!(loads_into("10.0.2 (Debian 1:10.0.2+ds-2)", "10.0.13 (Debian 1:10.0.13+ds-0+deb13u1)"));
        assert!(loads_into("10.0.2", "11.1.2 (Debian 1:11.1.2+ds-3)"));
        assert!(!loads_into("11.1.2", "10.0.13"));
        assert!(!loads_into("10.0.13", "10.0.2"));
        assert!(!loads_into("odd", "10.0.2"));
        assert!(loads_into("odd", "odd"));
    }
}
