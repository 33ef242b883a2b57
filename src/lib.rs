//! nix-winvm: Windows builds as ordinary Nix derivations.
//!
//! - `plugin`: the safe half of the Nix plugin (the C++ half is cpp/): arguments -> specs -> derivations.
//! - `spec`: the typed image and build specs shared by the plugin and the builder.
//! - `builder`: the program Nix runs as the derivations' builder, one subcommand per stage.

pub mod builder;
pub mod plugin;
pub mod spec;

/// The Nix version the plugin was compiled against.
pub const NIX_VERSION: &str = env!("NIX_WINVM_NIX_VERSION");
