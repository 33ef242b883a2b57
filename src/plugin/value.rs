//! The user's argument as a Rust tree, rebuilt from the shim's flattened nodes.

use super::ffi::bridge::{Kind, Node};

#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str { text: String, context: bool },
    Path(String),
    Set(Vec<(String, Val)>),
    List(Vec<Val>),
    Function,
    Derivation { image_spec: Option<String> },
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

/// Rebuilds the tree rooted at `nodes[0]`. Malformed input (indices out of range, cycles)
/// is an error, never a panic: it crosses the FFI.
pub fn from_nodes(nodes: &[Node]) -> Result<Val, String> {
    if nodes.is_empty() {
        return Err("the shim passed no value".into());
    }
    build(nodes, 0, 0)
}

const MAX_DEPTH: usize = 64;

fn build(nodes: &[Node], index: usize, depth: usize) -> Result<Val, String> {
    if depth > MAX_DEPTH {
        return Err("value nested too deeply".into());
    }
    let node = nodes.get(index).ok_or("node index out of range")?;
    let children = |nodes: &[Node]| -> Result<Vec<usize>, String> {
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
        Kind::Str => Val::Str { text: node.text.clone(), context: node.context },
        Kind::Path => Val::Path(node.text.clone()),
        Kind::Set => {
            let mut attrs = Vec::with_capacity(node.count);
            for i in children(nodes)? {
                attrs.push((nodes[i].key.clone(), build(nodes, i, depth + 1)?));
            }
            Val::Set(attrs)
        }
        Kind::List => {
            let mut items = Vec::with_capacity(node.count);
            for i in children(nodes)? {
                items.push(build(nodes, i, depth + 1)?);
            }
            Val::List(items)
        }
        Kind::Function => Val::Function,
        Kind::Derivation => Val::Derivation {
            image_spec: if node.int_value != 0 { Some(node.text.clone()) } else { None },
        },
        Kind::Unforced => Val::Unforced,
        Kind::External => Val::External,
        _ => return Err("unknown value kind".into()),
    })
}

/// The inverse of `from_nodes`, for tests and fuzzing: lays a tree out the way the shim does.
pub fn to_nodes(v: &Val) -> Vec<Node> {
    let mut nodes = vec![leaf(Kind::Null, "")];
    fill(&mut nodes, 0, v);
    nodes
}

fn leaf(kind: Kind, key: &str) -> Node {
    Node { kind, key: key.into(), text: String::new(), int_value: 0, float_value: 0.0, context: false, first: 0, count: 0 }
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
        Val::Str { text, context } => (n.kind, n.text, n.context) = (Kind::Str, text.clone(), *context),
        Val::Path(p) => (n.kind, n.text) = (Kind::Path, p.clone()),
        Val::Set(attrs) => {
            n.kind = Kind::Set;
            kids = attrs.iter().map(|(k, v)| (k.clone(), v)).collect();
        }
        Val::List(items) => {
            n.kind = Kind::List;
            kids = items.iter().map(|v| (String::new(), v)).collect();
        }
        Val::Function => n.kind = Kind::Function,
        Val::Derivation { image_spec } => {
            n.kind = Kind::Derivation;
            if let Some(s) = image_spec {
                (n.text, n.int_value) = (s.clone(), 1);
            }
        }
        Val::Unforced => n.kind = Kind::Unforced,
        Val::External => n.kind = Kind::External,
    }
    n.first = nodes.len();
    n.count = kids.len();
    for (k, _) in &kids {
        nodes.push(leaf(Kind::Null, k));
    }
    let first = n.first;
    nodes[at] = n;
    for (i, (_, child)) in kids.iter().enumerate() {
        fill(nodes, first + i, child);
    }
}
