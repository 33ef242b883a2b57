//! The user's argument as a Rust tree, rebuilt from the shim's flattened nodes.

use super::ffi::bridge::{Kind, Node};

#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str {
        text: String,
        context: bool,
    },
    /// A Nix string whose bytes are not UTF-8: fine where the plan only forwards the user's
    /// value, an error where the text itself is needed. `valid_up_to` locates the first bad byte.
    NonUtf8Str {
        valid_up_to: usize,
        context: bool,
    },
    Path(String),
    Set(Vec<(String, Val)>),
    List(Vec<Val>),
    Function,
    Derivation {
        image_spec: Option<String>,
        /// It has `winvmMemory`: an image of this plugin's, whose memory stage a build names.
        memory: bool,
    },
    Unforced,
    External,
}

impl Val {
    /// Names the type the way Nix's own error messages do.
    pub fn describe(&self) -> &'static str {
        match self {
            Val::Null => "null",
            Val::Bool(_) => "a Boolean",
            Val::Int(_) => "an integer",
            Val::Float(_) => "a float",
            Val::Str { .. } => "a string",
            Val::NonUtf8Str { .. } => "a string that is not valid UTF-8",
            Val::Path(_) => "a path",
            Val::Set(_) => "a set",
            Val::List(_) => "a list",
            Val::Function => "a function",
            Val::Derivation { .. } => "a derivation",
            Val::Unforced => "an unevaluated value",
            Val::External => "an external value",
        }
    }

    pub fn get<'a>(&'a self, key: &str) -> Option<&'a Val> {
        match self {
            Val::Set(attrs) => attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Why the shim's nodes could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The user's value has an attribute name that is not UTF-8 (`path` leads to its set).
    NonUtf8Name { path: String, lossy: String },
    /// A path or an image's spec that is not UTF-8.
    NonUtf8Text { path: String },
    /// The nodes themselves are malformed: a bug in the shim.
    Malformed(String),
}

impl DecodeError {
    /// The message for the user of `builtin`.
    pub fn message(&self, builtin: &str) -> String {
        match self {
            DecodeError::NonUtf8Name { path, lossy } if path.is_empty() => {
                format!("{builtin}: attribute name '{lossy}' is not valid UTF-8")
            }
            DecodeError::NonUtf8Name { path, lossy } => {
                format!("{builtin}: attribute name '{lossy}' in '{path}' is not valid UTF-8")
            }
            DecodeError::NonUtf8Text { path } => {
                format!("{builtin}: the path in attribute '{path}' is not valid UTF-8")
            }
            DecodeError::Malformed(e) => format!("nix-winvm: internal error reading the argument: {e}"),
        }
    }
}

impl From<&str> for DecodeError {
    fn from(e: &str) -> DecodeError {
        DecodeError::Malformed(e.into())
    }
}

/// Rebuilds the tree rooted at `nodes[0]`. Malformed input (indices out of range, cycles,
/// a node claimed by two parents) is an error, never a panic: it crosses the FFI.
pub fn from_nodes(nodes: &[Node]) -> Result<Val, DecodeError> {
    if nodes.is_empty() {
        return Err("the shim passed no value".into());
    }
    // The shim lays out a tree. Child ranges that overlap would make a DAG, and rebuilding a
    // DAG as a tree takes time exponential in its depth (found by tests/fuzz.rs): each node is
    // therefore read at most once, which bounds the work by the number of nodes.
    let mut seen = vec![false; nodes.len()];
    build(nodes, &mut seen, 0, 0, "")
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

const MAX_DEPTH: usize = 64;

fn build(nodes: &[Node], seen: &mut [bool], index: usize, depth: usize, path: &str) -> Result<Val, DecodeError> {
    if depth > MAX_DEPTH {
        return Err("value nested too deeply".into());
    }
    let node = nodes.get(index).ok_or("node index out of range")?;
    if std::mem::replace(&mut seen[index], true) {
        return Err("a node is the child of two values".into());
    }
    let children = |nodes: &[Node]| -> Result<Vec<usize>, DecodeError> {
        let end = node.first.checked_add(node.count).ok_or("child range overflows")?;
        if end > nodes.len() || (node.count > 0 && node.first <= index) {
            return Err("child range out of order".into());
        }
        Ok((node.first..end).collect())
    };
    Ok(match node.kind {
        Kind::Null => Val::Null,
        Kind::Bool => Val::Bool(node.int_value != 0),
        Kind::Int => Val::Int(node.int_value),
        Kind::Float => Val::Float(node.float_value),
        Kind::Str => match std::str::from_utf8(&node.text) {
            Ok(text) => Val::Str { text: text.to_owned(), context: node.context },
            Err(e) => Val::NonUtf8Str { valid_up_to: e.valid_up_to(), context: node.context },
        },
        Kind::Path => Val::Path(text(node, path)?),
        // The children first: `count` is only believed once the range fits the array (an
        // allocation sized by a bad count aborted the process; found by tests/fuzz.rs).
        Kind::Set => {
            let ids = children(nodes)?;
            let mut attrs = Vec::with_capacity(ids.len());
            for i in ids {
                let key = String::from_utf8(nodes[i].key.clone()).map_err(|_| DecodeError::NonUtf8Name {
                    path: path.to_owned(),
                    lossy: String::from_utf8_lossy(&nodes[i].key).into_owned(),
                })?;
                let child = build(nodes, seen, i, depth + 1, &join(path, &key))?;
                attrs.push((key, child));
            }
            Val::Set(attrs)
        }
        Kind::List => {
            let ids = children(nodes)?;
            let mut items = Vec::with_capacity(ids.len());
            for (n, i) in ids.into_iter().enumerate() {
                items.push(build(nodes, seen, i, depth + 1, &join(path, &n.to_string()))?);
            }
            Val::List(items)
        }
        Kind::Function => Val::Function,
        Kind::Derivation => {
            // Bit 0: it has `winvmImageSpec` (in `text`); bit 1: it has `winvmMemory`.
            let image_spec = if node.int_value & 1 != 0 { Some(text(node, path)?) } else { None };
            Val::Derivation { image_spec, memory: node.int_value & 2 != 0 }
        }
        Kind::Unforced => Val::Unforced,
        Kind::External => Val::External,
        _ => return Err("unknown value kind".into()),
    })
}

fn text(node: &Node, path: &str) -> Result<String, DecodeError> {
    String::from_utf8(node.text.clone()).map_err(|_| DecodeError::NonUtf8Text { path: path.to_owned() })
}

/// The inverse of `from_nodes`, for tests and fuzzing: lays a tree out the way the shim does.
pub fn to_nodes(v: &Val) -> Vec<Node> {
    let mut nodes = vec![leaf(Kind::Null, b"")];
    fill(&mut nodes, 0, v);
    nodes
}

fn leaf(kind: Kind, key: &[u8]) -> Node {
    Node { kind, key: key.to_vec(), text: vec![], int_value: 0, float_value: 0.0, context: false, first: 0, count: 0 }
}

fn fill(nodes: &mut Vec<Node>, at: usize, v: &Val) {
    let key = std::mem::take(&mut nodes[at].key);
    let mut n = leaf(Kind::Null, &key);
    let mut kids: Vec<(String, &Val)> = Vec::new();
    match v {
        Val::Null => {}
        Val::Bool(b) => (n.kind, n.int_value) = (Kind::Bool, *b as i64),
        Val::Int(i) => (n.kind, n.int_value) = (Kind::Int, *i),
        Val::Float(f) => (n.kind, n.float_value) = (Kind::Float, *f),
        Val::Str { text, context } => (n.kind, n.text, n.context) = (Kind::Str, text.clone().into(), *context),
        // Any bytes that are not UTF-8 at `valid_up_to` stand for such a string.
        Val::NonUtf8Str { valid_up_to, context } => {
            let mut bytes = vec![b'x'; *valid_up_to];
            bytes.push(0xff);
            (n.kind, n.text, n.context) = (Kind::Str, bytes, *context)
        }
        Val::Path(p) => (n.kind, n.text) = (Kind::Path, p.clone().into()),
        Val::Set(attrs) => {
            n.kind = Kind::Set;
            kids = attrs.iter().map(|(k, v)| (k.clone(), v)).collect();
        }
        Val::List(items) => {
            n.kind = Kind::List;
            kids = items.iter().map(|v| (String::new(), v)).collect();
        }
        Val::Function => n.kind = Kind::Function,
        Val::Derivation { image_spec, memory } => {
            n.kind = Kind::Derivation;
            if let Some(s) = image_spec {
                (n.text, n.int_value) = (s.clone().into(), 1);
            }
            if *memory {
                n.int_value |= 2;
            }
        }
        Val::Unforced => n.kind = Kind::Unforced,
        Val::External => n.kind = Kind::External,
    }
    n.first = nodes.len();
    n.count = kids.len();
    for (k, _) in &kids {
        nodes.push(leaf(Kind::Null, k.as_bytes()));
    }
    let first = n.first;
    nodes[at] = n;
    for (i, (_, child)) in kids.iter().enumerate() {
        fill(nodes, first + i, child);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(kind: Kind, first: usize, count: usize) -> Node {
        Node { kind, first, count, ..leaf(kind, b"") }
    }

    /// tests/fuzz.rs, plugin-value input #16: each list's children overlap the next list's,
    /// a DAG that unfolded into 2^60 values (a hang) before each node could be read only once.
    #[test]
    fn overlapping_child_ranges_are_refused_at_once() {
        let mut nodes: Vec<Node> = (0..64).map(|i| node(Kind::List, i + 1, 2)).collect();
        nodes.extend([node(Kind::Null, 0, 0), node(Kind::Null, 0, 0)]);
        let started = std::time::Instant::now();
        assert_eq!(from_nodes(&nodes), Err(DecodeError::Malformed("a node is the child of two values".into())));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    /// tests/fuzz.rs, plugin-value input #3988: a set's count of 70912304466406019 was the
    /// capacity of a vector before the range was checked, and the allocation aborted.
    #[test]
    fn a_huge_child_count_is_an_error_not_an_allocation() {
        for kind in [Kind::Set, Kind::List] {
            let nodes = [node(Kind::List, 1, 1), node(kind, 2, 70_912_304_466_406_019)];
            assert_eq!(from_nodes(&nodes), Err(DecodeError::Malformed("child range out of order".into())));
            let nodes = [node(kind, 1, usize::MAX)];
            assert_eq!(from_nodes(&nodes), Err(DecodeError::Malformed("child range overflows".into())));
        }
    }
}
