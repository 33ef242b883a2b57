//! The Nix plugin's safe half: the C++ shim (cpp/plugin.cc) turns the user's Nix values into
//! `Node`s, calls `plan`, and creates the planned derivations with Nix's own `derivation`.

pub mod ffi;
pub mod inputs;
pub mod plan;
pub mod validate;
pub mod value;

use ffi::bridge::{Node, Plan};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// `key` is bytes: an attribute name need not be UTF-8 (the planner names such a name later).
fn force_depth(builtin: &str, key: &[u8]) -> u32 {
    plan::force_depth(builtin, &String::from_utf8_lossy(key))
}

/// Never unwinds: a panic here would cross the FFI and abort the user's `nix`.
#[allow(clippy::ptr_arg)] // the cxx bridge hands over a rust::Vec, declared as &Vec
fn plan(builtin: &str, nodes: &Vec<Node>, plugin_dir: &str) -> Plan {
    let result = catch_unwind(AssertUnwindSafe(|| {
        let root = value::from_nodes(nodes).map_err(|e| e.message(builtin))?;
        let env = plan::Env::discover(plugin_dir)?;
        Ok::<Plan, String>(plan::plan(builtin, &root, &env))
    }));
    let error = match result {
        Ok(Ok(p)) => return p,
        Ok(Err(e)) => e,
        Err(_) => format!("nix-winvm: internal error while planning {builtin} (a bug: please report it)"),
    };
    Plan { error, drvs: vec![], passthru: vec![] }
}

#[cfg(test)]
mod tests;
