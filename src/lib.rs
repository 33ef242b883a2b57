//! nix-winvm: Windows builds as ordinary Nix derivations.
//!
//! - `plugin`: the safe half of the Nix plugin (the C++ half is cpp/): arguments -> specs -> derivations.
//! - `spec`: the typed image and build specs shared by the plugin and the builder, and the
//!   machine's shape.
//! - `builder`: the program Nix runs as the derivations' builder, one subcommand per stage.
//! - `session`: one build's VMs; `vm`: switch, QEMU, QMP, process guards, state files;
//!   `agent`: what runs in the controller VM; `controller`: the controller as the host makes
//!   it; `protocol`: what crosses between them; `guest`: the guest profiles (standin,
//!   windows); `initramfs`: initramfs archives; `format`: the file formats' codecs.
//!
//! The public surface is small: the builder's entry point, the codecs, and what the
//! integration tests, benches and fuzz targets drive (`testing`). Everything else is the
//! crate's own.

mod agent;
mod builder;
mod controller;
pub mod format;
mod guest;
mod initramfs;
mod plugin;
mod protocol;
mod session;
mod shell;
mod spec;
mod tools;
mod vm;

pub use builder::main_with_args;
pub use protocol::Subcommand;

/// What the integration tests (tests/), the benches (benches/) and the fuzz targets reach,
/// besides the codecs of [`format`].
pub mod testing {
    pub use crate::builder::image::CONTROLLER_STATE;
    pub use crate::builder::stages::generate_key;
    pub use crate::guest::standin::initramfs as standin_initramfs;
    pub use crate::guest::windows::cygwin;
    pub use crate::plugin::ffi::bridge as plugin_bridge;
    pub use crate::plugin::value as plugin_value;
    pub use crate::session::qemu_version;
    pub use crate::tools::{test_requires, Ovmf};
    pub use crate::vm::screen::KEEP as SCREENS_KEPT;
    pub use crate::vm::{qmp, state, wait};
}

/// The Nix version the plugin was compiled against.
#[cfg(feature = "plugin")]
pub const NIX_VERSION: &str = env!("NIX_WINVM_NIX_VERSION");
