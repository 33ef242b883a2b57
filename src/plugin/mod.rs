//! The Nix plugin's safe half: the C++ shim (cpp/plugin.cc) turns the user's Nix values into
//! `Node`s, calls `plan`, and creates the planned derivations with Nix's own `derivation`.

pub mod error;
pub mod ffi;
pub mod inputs;
pub mod plan;
pub mod table;
pub mod validate;
pub mod value;

use error::PlanError;
use ffi::bridge::{Node, Plan};
use std::panic::{catch_unwind, AssertUnwindSafe};
use table::Builtin;

/// `key` is bytes: an attribute name need not be UTF-8 (the planner names such a name later).
fn force_depth(builtin: &str, key: &[u8]) -> u32 {
    Builtin::from_name(builtin).map_or(0, |b| b.force_depth(&String::from_utf8_lossy(key)))
}

/// Never unwinds: a panic here would cross the FFI and abort the user's `nix`.
#[allow(clippy::ptr_arg)] // the cxx bridge hands over a rust::Vec, declared as &Vec
fn plan(builtin: &str, nodes: &Vec<Node>, plugin_dir: &str) -> Plan {
    match catch_unwind(AssertUnwindSafe(|| plan_nodes(builtin, nodes, plugin_dir))) {
        Ok(result) => rendered(result),
        Err(_) => error_plan(format!("nix-winvm: internal error while planning {builtin} (a bug: please report it)")),
    }
}

fn plan_nodes(name: &str, nodes: &[Node], plugin_dir: &str) -> Result<Plan, PlanError> {
    let builtin = Builtin::from_name(name).ok_or_else(|| PlanError::UnknownBuiltin(name.to_owned()))?;
    let root = value::from_nodes(nodes).map_err(|error| PlanError::Decode { builtin, error })?;
    let env = inputs::Env::discover(plugin_dir)?;
    Ok(plan::plan(builtin, &root, &env)?)
}

/// The one place an error becomes text: the message the shim throws at the call site.
pub fn rendered(result: Result<Plan, PlanError>) -> Plan {
    result.unwrap_or_else(|e| error_plan(e.to_string()))
}

fn error_plan(error: String) -> Plan {
    Plan { error, drvs: vec![], passthru: vec![], result: 0 }
}

#[cfg(test)]
mod tests;
