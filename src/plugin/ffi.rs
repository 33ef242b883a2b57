//! The cxx bridge between the C++ shim (cpp/plugin.cc) and the safe Rust planner.
//! Declarations only. The shim calls into Rust; Rust never calls Nix, so the builder binary,
//! which links this crate's rlib, never needs Nix's libraries.

use super::{force_depth, plan};

#[cxx::bridge(namespace = "nix_winvm")]
pub mod bridge {
    // ---- shared structs ------------------------------------------------------------------

    /// The shape of one Nix value, as far as the shim forced it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Kind {
        Null,
        Bool,
        Int,
        Float,
        Str,
        Path,
        Set,
        List,
        Function,
        /// A set with `type = "derivation"`; `text` holds its `winvmImageSpec` if it has one.
        Derivation,
        /// Not forced: the planner only passes it through.
        Unforced,
        External,
    }

    /// One value in a flattened tree: a set's or list's children are `nodes[first..first+count]`.
    /// `key` and `text` are bytes: a Nix string (or attribute name) may hold any bytes, and
    /// whether they must be UTF-8 is the planner's decision, per attribute.
    #[derive(Debug, Clone)]
    struct Node {
        kind: Kind,
        key: Vec<u8>,
        text: Vec<u8>,
        int_value: i64,
        float_value: f64,
        /// The string carries Nix string context (store paths it depends on).
        context: bool,
        first: usize,
        count: usize,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Source {
        Text,
        StrList,
        Int,
        Bool,
        /// The user's own value at `path` (attribute names, or list indices as decimal text),
        /// forwarded untouched so its string context survives.
        User,
        /// The result of an earlier derivation of this plan, `stage`.
        Stage,
        /// A store path known before evaluation (`text`: it, or a path inside it; `list`: its
        /// store path, a host copy or "", and the error when the store lacks it and the
        /// evaluation may not copy the host copy).
        StorePath,
    }

    #[derive(Debug, Clone)]
    struct PlannedAttr {
        name: String,
        source: Source,
        text: String,
        list: Vec<String>,
        int_value: i64,
        path: Vec<String>,
        stage: usize,
    }

    #[derive(Debug, Clone)]
    struct PlannedDrv {
        attrs: Vec<PlannedAttr>,
    }

    /// Derivations to create in order; the result is the one at `result` with `passthru`
    /// added. A non-empty `error` is thrown as a Nix evaluation error at the call site.
    #[derive(Debug, Clone)]
    struct Plan {
        error: String,
        drvs: Vec<PlannedDrv>,
        passthru: Vec<PlannedAttr>,
        result: usize,
    }

    // ---- Rust, called by the shim ----------------------------------------------------------
    extern "Rust" {
        /// How deep the shim should force attribute `key` of `builtin`'s argument (0: not at all).
        fn force_depth(builtin: &str, key: &[u8]) -> u32;
        fn plan(builtin: &str, nodes: &Vec<Node>, plugin_dir: &str) -> Plan;
    }
}
