//! The VM pieces: processes and their guards, the VDE switch and its capture (pcap), QEMU
//! command lines, QMP, acceleration (the KVM probe), saved state, screenshots, a serial log
//! followed as it grows, the one wait helper, a test's forwarder between the switches of its nodes, and `sys`, the bindgen bindings to the kernel
//! and libvdeplug. A session (src/session) puts them together.

pub mod accel;
pub mod console;
pub mod kernel;
pub mod memory;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod screen;
pub mod state;
pub mod sys;
pub mod vde;
pub mod vlan;
pub mod wait;

/// How much of a VM's log an error shows.
pub const LOG_TAIL_LINES: usize = 30;

/// The last `n` lines of a log (a serial console, QEMU's output), for an error message.
pub fn tail_lines(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
