//! The VM pieces: processes and their guards, the VDE switch, QEMU command lines, QMP,
//! acceleration, and the one wait helper.

pub mod accel;
pub mod kernel;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod session;
pub mod state;
pub mod vde;
pub mod wait;
