//! nix-winvm: Windows builds as ordinary Nix derivations.
//!
//! - `plugin`: the safe half of the Nix plugin (the C++ half is cpp/): arguments -> specs -> derivations.
//! - `spec`: the typed image and build specs shared by the plugin and the builder.
//! - `builder`: the program Nix runs as the derivations' builder, one subcommand per stage.
//! - `vm`: switch, QEMU, QMP, process guards; `controller`: the agent in the controller VM;
//!   `guest`: the guest profiles (standin, windows); `initramfs`: our cpio writer.

pub mod agent;
pub mod builder;
pub mod controller;
pub mod format;
pub mod guest;
pub mod initramfs;
pub mod plugin;
pub mod protocol;
pub mod session;
pub mod shell;
pub mod spec;
pub mod tools;
pub mod vm;

/// The Nix version the plugin was compiled against.
#[cfg(feature = "plugin")]
pub const NIX_VERSION: &str = env!("NIX_WINVM_NIX_VERSION");
