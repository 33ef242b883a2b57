//! The plugin's errors, typed until `plugin::plan` renders them, once, into the message Nix
//! throws at the call site. An argument's error names the builtin, the attribute (with its
//! path: `iso.sha256`, `layers[1].memory`, element 1 of `cygwinPackages`) and what is wrong.
//!
//! `ArgError`'s Display is written by hand: every message is "<builtin>: <the attribute> <what
//! is wrong>", and which words name the attribute depends on both the path and the problem,
//! which a derive cannot say. `PlanError` is a thiserror derive.

use super::inputs::InputsError;
use super::table::Builtin;
use super::value::DecodeError;
use crate::spec::{Accel, SpecError, SpecJsonError};
use std::fmt;

/// Whose argument is at fault: a builtin's own, or the image arguments inside it
/// (`runInWindowsVM`'s `windowsImage = { ... }`), which say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub builtin: Builtin,
    pub within: Option<&'static str>,
}

impl Caller {
    pub fn of(builtin: Builtin) -> Caller {
        Caller { builtin, within: None }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.builtin.name())?;
        match self.within {
            Some(attr) => write!(f, ": {attr}"),
            None => Ok(()),
        }
    }
}

/// Where in the argument: attribute names and list positions. Empty: the argument itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttrPath(Vec<Step>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Attr(String),
    Element(usize),
}

impl AttrPath {
    pub fn attr(name: &str) -> AttrPath {
        AttrPath(vec![Step::Attr(name.to_owned())])
    }

    /// A field of the set at this path (`iso.sha256`).
    pub fn field(&self, name: &str) -> AttrPath {
        let mut steps = self.0.clone();
        steps.push(Step::Attr(name.to_owned()));
        AttrPath(steps)
    }

    /// Element `index` of the list at this path.
    pub fn element(&self, index: usize) -> AttrPath {
        let mut steps = self.0.clone();
        steps.push(Step::Element(index));
        AttrPath(steps)
    }

    /// The path as one name: `iso.sha256`, `layers[1].memory`.
    pub fn name(&self) -> String {
        let mut name = String::new();
        for step in &self.0 {
            match step {
                Step::Attr(a) if name.is_empty() => name.push_str(a),
                Step::Attr(a) => {
                    name.push('.');
                    name.push_str(a)
                }
                Step::Element(i) => name.push_str(&format!("[{i}]")),
            }
        }
        name
    }
}

/// The subject of a message: "attribute 'iso.sha256'", "element 1 of attribute 'cygwinPackages'".
impl fmt::Display for AttrPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.split_last() {
            Some((Step::Element(i), list)) => {
                write!(f, "element {i} of attribute '{}'", AttrPath(list.to_vec()).name())
            }
            _ => write!(f, "attribute '{}'", self.name()),
        }
    }
}

/// A value of the machine's shape, as a message quotes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeValue {
    Mib(u32),
    Count(u32),
    Accel(Accel),
}

impl fmt::Display for ShapeValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShapeValue::Mib(m) => write!(f, "{m} MiB"),
            ShapeValue::Count(c) => write!(f, "{c}"),
            ShapeValue::Accel(a) => write!(f, "\"{}\"", a.name()),
        }
    }
}

/// What is wrong with the attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The argument itself is not what the builtin takes.
    Argument {
        expected: &'static str,
        got: &'static str,
    },
    /// Not in the builtin's table; `closest` is the likely typo's target.
    Unknown {
        closest: Option<&'static str>,
        known: Vec<&'static str>,
    },
    /// Required (`when`: under this condition) and not given.
    Missing {
        when: Option<&'static str>,
        hint: String,
    },
    /// `runInWindowsVM`'s derivation lacks it.
    MissingFromDerivation {
        hint: Option<&'static str>,
    },
    WrongType {
        expected: String,
        got: &'static str,
    },
    /// The right type, not a value it may have.
    Invalid {
        expected: String,
        value: String,
    },
    OutOfRange {
        value: i64,
        unit: &'static str,
        range: (i64, i64),
    },
    NotUtf8 {
        valid_up_to: usize,
    },
    UnknownField {
        field: String,
        hint: &'static str,
    },
    MissingField {
        field: &'static str,
        hint: &'static str,
    },
    /// Neither of two fields, one of which is required.
    MissingEither {
        one: &'static str,
        other: &'static str,
        hint: &'static str,
    },
    /// Two fields that say the same thing, both given.
    BothFields {
        one: &'static str,
        other: &'static str,
    },
    Empty,
    WindowsOnly,
    /// A layer's shape is its base's.
    GivenWithBase,
    /// nix-winvm's own.
    Reserved,
    /// A build restates its image's shape with another value.
    DiffersFromImage {
        given: ShapeValue,
        image: ShapeValue,
    },
    NotAnImage(SpecJsonError),
    /// The spec's own checks, which the builder runs again; the message names its attribute.
    Spec(SpecError),
}

/// A builtin's argument refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgError {
    pub caller: Caller,
    pub attr: AttrPath,
    pub problem: Problem,
}

impl std::error::Error for ArgError {}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Problem as P;
        let at = &self.attr;
        write!(f, "{}: ", self.caller)?;
        match &self.problem {
            P::Argument { expected, got } => write!(f, "the argument must be {expected}, got {got}"),
            P::Unknown { closest: Some(k), .. } => write!(f, "unknown attribute '{}'; did you mean '{k}'?", at.name()),
            P::Unknown { closest: None, known } => {
                write!(f, "unknown attribute '{}'; known attributes: {}", at.name(), known.join(", "))
            }
            P::Missing { when, hint } => {
                write!(f, "missing required attribute '{}'", at.name())?;
                if let Some(when) = when {
                    write!(f, " for {when}")?;
                }
                write!(f, " ({hint})")
            }
            P::MissingFromDerivation { hint } => {
                write!(f, "the derivation has no attribute '{}'", at.name())?;
                match hint {
                    Some(hint) => write!(f, "; {hint}"),
                    None => Ok(()),
                }
            }
            P::WrongType { expected, got } => write!(f, "{at} must be {expected}, got {got}"),
            P::Invalid { expected, value } => write!(f, "{at} must be {expected}, got \"{value}\""),
            P::OutOfRange { value, unit, range } => {
                write!(f, "{at} must be between {} and {} ({unit}), got {value}", range.0, range.1)
            }
            P::NotUtf8 { valid_up_to } => {
                write!(f, "{at} must be UTF-8 text, but byte {valid_up_to} of the string is not valid UTF-8")
            }
            P::UnknownField { field, hint } => write!(f, "{at} has unknown field '{field}' ({hint})"),
            P::MissingField { field, hint } => write!(f, "{at} is missing field '{field}' ({hint})"),
            P::MissingEither { one, other, hint } => write!(f, "{at} is missing field '{one}' or '{other}' ({hint})"),
            P::BothFields { one, other } => write!(f, "{at} has both '{one}' and '{other}'; give one of them"),
            P::Empty => write!(f, "{at} must not be empty"),
            P::WindowsOnly => write!(f, "{at} applies only to guest = \"windows\""),
            P::GivenWithBase => write!(
                f,
                "{at} cannot be given with 'base': a layer revives its base's memory snapshot, so it keeps everything the base was made with (give '{}' to the base)",
                at.name()
            ),
            P::Reserved => {
                write!(f, "{at} cannot be set: nix-winvm's builder runs the VM; put the build commands in 'script'")
            }
            P::DiffersFromImage { given, image } => write!(
                f,
                "{at} ({given}) differs from the image's ({image}): a VM revived from a memory snapshot keeps the shape it was saved with; build another image"
            ),
            P::NotAnImage(e) => write!(f, "{at} is not a usable nix-winvm image: {e}"),
            P::Spec(e) => write!(f, "{e}"),
        }
    }
}

/// Everything planning can fail with.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Argument(#[from] ArgError),
    /// The builder, the tools or the kernel cannot be named.
    #[error(transparent)]
    Inputs(#[from] InputsError),
    /// The shim's nodes could not be read back.
    #[error("{}", .error.message(.builtin.name()))]
    Decode { builtin: Builtin, error: DecodeError },
    #[error("nix-winvm: unknown builtin '{0}'")]
    UnknownBuiltin(String),
}
