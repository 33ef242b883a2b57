//! One table of attributes per builtin. A row names an attribute and gives its type (with its
//! range or choices), its default, whether a build's derivation gets the user's own value, and
//! what it means. Validation (validate.rs), the defaults, how deep the shim forces each
//! attribute (`force_depth`) and the README's attribute reference all come from these rows, so
//! adding an attribute is one row plus the code that uses its value.

use crate::spec::{
    CPUS_RANGE, DEFAULT_LOCALE, DEFAULT_TIMEOUT_SECS, DISK_SIZE_MIB_RANGE, MEMORY_MIB_RANGE, STANDIN_CPUS,
    STANDIN_DISK_SIZE_MIB, STANDIN_MEMORY_MIB, TIMEOUT_SECS_RANGE, WINDOWS_CPUS, WINDOWS_DISK_SIZE_MIB,
    WINDOWS_MEMORY_MIB, WINDOWS_TCG_TIMEOUT_SECS,
};

/// The builtins the plugin registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    WindowsImage,
    WindowsDerivation,
    RunInWindowsVM,
}

impl Builtin {
    pub const ALL: [Builtin; 3] = [Builtin::WindowsImage, Builtin::WindowsDerivation, Builtin::RunInWindowsVM];

    /// The name in `builtins`, and in every error message.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::WindowsImage => "windowsImage",
            Builtin::WindowsDerivation => "windowsDerivation",
            Builtin::RunInWindowsVM => "runInWindowsVM",
        }
    }

    pub fn from_name(name: &str) -> Option<Builtin> {
        Builtin::ALL.into_iter().find(|b| b.name() == name)
    }

    /// What its argument's attributes may be: `windowsImage` takes an image's, or, given
    /// `base`, a layer's.
    pub fn tables(self) -> &'static [&'static Table] {
        match self {
            Builtin::WindowsImage => &[&IMAGE, &LAYER],
            Builtin::WindowsDerivation => &[&BUILD],
            Builtin::RunInWindowsVM => &[&RUN_IN_VM],
        }
    }

    /// How deep the shim forces attribute `key` of the argument before planning (0: not at all).
    /// An attribute the plan only passes on stays lazy, as `derivation` leaves it: forcing it
    /// would make the builtin stricter than `derivation`.
    pub fn force_depth(self, key: &str) -> u32 {
        self.tables().iter().filter_map(|t| t.row(key)).map(|a| a.kind.depth()).max().unwrap_or(0)
    }
}

/// The attributes one builtin (or one form of it) takes.
#[derive(Debug)]
pub struct Table {
    /// Names the table in README.md's marker (`<!-- src/plugin/table.rs: ID -->`).
    pub id: &'static str,
    pub rows: &'static [Attr],
}

impl Table {
    pub fn row(&self, name: &str) -> Option<&'static Attr> {
        // A table is a `static`'s slice: its rows live as long as the program.
        let rows: &'static [Attr] = self.rows;
        rows.iter().find(|a| a.name == name)
    }

    /// The names, sorted, as an error lists them.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.rows.iter().map(|a| a.name).collect();
        names.sort_unstable();
        names
    }
}

/// One attribute.
#[derive(Debug)]
pub struct Attr {
    pub name: &'static str,
    pub kind: Kind,
    /// Completes the kind in an error ("a string (e.g. \"en-US\")"); "" for none.
    pub note: &'static str,
    pub default: Default,
    /// A build's derivation gets the user's own value under this name (its string context
    /// kept). Only the builds' tables use it: an image's stages name what they need themselves.
    pub passed_on: bool,
    /// Only with guest = "windows": an error on the standin.
    pub windows_only: bool,
    /// The README's "meaning" column (read by the test that checks README.md's tables).
    #[cfg_attr(not(test), allow(dead_code))]
    pub doc: &'static str,
}

/// What a value must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An integer within `range`, in `unit` ("MiB", "count", "seconds").
    Int {
        unit: &'static str,
        range: (i64, i64),
    },
    /// One of these strings.
    Choice(&'static [&'static str]),
    Bool,
    /// A string the plan reads: UTF-8 text.
    Text,
    /// A string the plan reads, or null.
    TextOrNull,
    /// A list of strings the plan reads.
    TextList,
    /// A string passed on as it is: any bytes, its context kept.
    Forwarded,
    /// A list passed on element by element, each with its context.
    ForwardedList,
    /// A path or a derivation, passed on: its store path becomes an input.
    PathOrDerivation,
    /// The Windows installation ISO: a path, or `{ name; sha256; }` or `{ name; hash; }`.
    Iso,
    /// The result of `windowsImage`.
    Image,
    /// An image, or `windowsImage`'s arguments, planned along.
    ImageOrArgs,
    /// A SHA-256 hash in SRI form.
    Pin,
    /// Any value the derivation needs; only its presence is checked.
    Any,
    /// nix-winvm's own: an error when given.
    Reserved,
    /// nix-winvm sets it; the user's value is dropped.
    Replaced,
}

pub const ISO_SHAPE: &str =
    "a path to the ISO, or { name; sha256; } or { name; hash; } for one added with `nix-store --add-fixed sha256 FILE`";
/// What `iso.hash` must be.
pub const ISO_HASH_SHAPE: &str =
    "a SHA-256 hash in SRI form, \"sha256-\" and 44 characters of base64 (nix hash file FILE)";
pub const IMAGE_SHAPE: &str = "the result of builtins.windowsImage { ... }";
pub const PIN_SHAPE: &str = "a SHA-256 hash in SRI form, \"sha256-\" and 44 characters of base64 (the first build says it: leave it as \"sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\" and take the hash Nix got)";

impl Kind {
    /// How deep the shim forces a value of this kind: the value itself (1), and a list's
    /// elements or the ISO set's fields (2). `windowsImage`'s arguments inside
    /// `runInWindowsVM` go one level deeper than the deepest image attribute.
    pub fn depth(self) -> u32 {
        match self {
            Kind::Any | Kind::Reserved | Kind::Replaced => 0,
            Kind::TextList | Kind::ForwardedList | Kind::Iso => 2,
            Kind::ImageOrArgs => 1 + IMAGE.rows.iter().chain(LAYER.rows).map(|a| a.kind.depth()).max().unwrap_or(0),
            _ => 1,
        }
    }

    /// What an error says the value must be, completed by the row's `note`.
    pub fn expected(self, note: &str) -> String {
        let noted = |base: &str| if note.is_empty() { base.to_owned() } else { format!("{base} ({note})") };
        match self {
            Kind::Int { unit, .. } => format!("an integer ({unit})"),
            Kind::Choice(names) => {
                let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
                format!("one of {}", quoted.join(", "))
            }
            Kind::Bool => "a Boolean".into(),
            Kind::Text | Kind::Forwarded => noted("a string"),
            Kind::TextOrNull => format!("{} or null", noted("a string")),
            Kind::TextList => noted("a list of strings"),
            Kind::ForwardedList => noted("a list"),
            Kind::PathOrDerivation => noted("a path or derivation"),
            Kind::Iso => ISO_SHAPE.into(),
            Kind::Image | Kind::ImageOrArgs => IMAGE_SHAPE.into(),
            Kind::Pin => PIN_SHAPE.into(),
            Kind::Any | Kind::Reserved | Kind::Replaced => noted("any value"),
        }
    }

    /// What an error about a missing attribute says it should be.
    pub fn hint(self, note: &str) -> String {
        match self {
            Kind::Text | Kind::Forwarded if !note.is_empty() => format!("a string: {note}"),
            Kind::Text | Kind::Forwarded => "a string".into(),
            _ => self.expected(note),
        }
    }
}

/// The value an attribute has when it is not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Default {
    /// The builtin fails without it.
    Required,
    /// Required with guest = "windows".
    RequiredForWindows,
    /// No value.
    Absent,
    Null,
    Bool(bool),
    Text(&'static str),
    /// The empty list.
    NoItems,
    /// Each guest's own.
    PerGuest {
        windows: i64,
        standin: i64,
    },
    /// `value`, but `windows_tcg` for a Windows image under TCG, which runs some 9 times slower.
    SlowerUnderTcg {
        value: i64,
        windows_tcg: i64,
    },
    /// Where the value comes from instead, in words (the image's, the base's).
    Words(&'static str),
}

/// What an integer's default depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guest {
    pub windows: bool,
    pub tcg: bool,
}

impl Default {
    /// An integer default, for `guest`; None when the default is not an integer.
    pub fn int(self, guest: Guest) -> Option<i64> {
        match self {
            Default::PerGuest { windows, standin } => Some(if guest.windows { windows } else { standin }),
            Default::SlowerUnderTcg { value, windows_tcg } => {
                Some(if guest.windows && guest.tcg { windows_tcg } else { value })
            }
            _ => None,
        }
    }
}

const fn row(name: &'static str, kind: Kind, default: Default, doc: &'static str) -> Attr {
    Attr { name, kind, note: "", default, passed_on: false, windows_only: false, doc }
}

impl Attr {
    /// What a list's element is read as: a string.
    pub const fn element() -> Attr {
        row("", Kind::Text, Default::Absent, "")
    }

    /// What a set's field is read as: a string, with `note`.
    pub const fn field(note: &'static str) -> Attr {
        row("", Kind::Text, Default::Absent, "").note(note)
    }

    const fn note(self, note: &'static str) -> Attr {
        Attr { note, ..self }
    }
    const fn passed_on(self) -> Attr {
        Attr { passed_on: true, ..self }
    }
    const fn windows_only(self) -> Attr {
        Attr { windows_only: true, ..self }
    }
}

const fn mib(range: (i64, i64)) -> Kind {
    Kind::Int { unit: "MiB", range }
}
const SECONDS: Kind = Kind::Int { unit: "seconds", range: TIMEOUT_SECS_RANGE };
const COUNT: Kind = Kind::Int { unit: "count", range: CPUS_RANGE };
const ACCEL: Kind = Kind::Choice(&["kvm", "tcg"]);

/// `windowsImage { ... }`: a new image. A closed set: a typo is an error, not a silent default.
pub const IMAGE: Table = Table {
    id: "windowsImage",
    rows: &[
        row("guest", Kind::Choice(&["windows", "standin"]), Default::Text("windows"), "the guest profile"),
        row(
            "memory",
            mib(MEMORY_MIB_RANGE),
            Default::PerGuest { windows: WINDOWS_MEMORY_MIB as i64, standin: STANDIN_MEMORY_MIB as i64 },
            "guest memory; fixed by the snapshot",
        ),
        row(
            "cpus",
            COUNT,
            Default::PerGuest { windows: WINDOWS_CPUS as i64, standin: STANDIN_CPUS as i64 },
            "guest CPUs; fixed by the snapshot",
        ),
        row(
            "accel",
            ACCEL,
            Default::Text("kvm"),
            "`\"kvm\"` adds `requiredSystemFeatures = [ \"kvm\" ]` and fails fast where KVM is unusable; `\"tcg\"` is software emulation",
        ),
        row(
            "timeout",
            SECONDS,
            Default::SlowerUnderTcg { value: DEFAULT_TIMEOUT_SECS as i64, windows_tcg: WINDOWS_TCG_TIMEOUT_SECS as i64 },
            "limit of each stage; builds inherit it",
        ),
        row(
            "diskSize",
            mib(DISK_SIZE_MIB_RANGE),
            Default::PerGuest { windows: WINDOWS_DISK_SIZE_MIB as i64, standin: STANDIN_DISK_SIZE_MIB as i64 },
            "size of the sparse qcow2 disk",
        ),
        row(
            "iso",
            Kind::Iso,
            Default::RequiredForWindows,
            "the installation ISO; the set form is a fixed-output path you add with `nix-store --add-fixed sha256 FILE`, named by its hash: `sha256` in hexadecimal or `hash` in SRI form",
        )
        .windows_only(),
        row("edition", Kind::Text, Default::RequiredForWindows, "image name inside install.wim, e.g. `\"Windows 11 Pro\"`")
            .note("the image name inside install.wim, e.g. \"Windows 11 Pro\"")
            .windows_only(),
        row(
            "productKey",
            Kind::TextOrNull,
            Default::Null,
            "the product key; without one Setup picks the edition by `edition`, as evaluation media need",
        )
        .note("XXXXX-XXXXX-XXXXX-XXXXX-XXXXX")
        .windows_only(),
        row("locale", Kind::Text, Default::Text(DEFAULT_LOCALE), "Windows' UI language, input and system locale; the media must have it")
            .note("e.g. \"en-US\"")
            .windows_only(),
        row(
            "efi",
            Kind::Bool,
            Default::Bool(false),
            "UEFI (OVMF, from the tools closure) instead of the BIOS, for both guests; the image keeps its own variable store",
        ),
        row("cygwinPackages", Kind::TextList, Default::NoItems, "Cygwin packages beyond base + openssh")
            .note("Cygwin package names")
            .windows_only(),
        row(
            "cygwinRepo",
            Kind::PathOrDerivation,
            Default::Absent,
            "the local Cygwin package folder ([nix/cygwin.nix](nix/cygwin.nix))",
        )
        .note("a local Cygwin package directory")
        .windows_only(),
        row("installCommands", Kind::TextList, Default::NoItems, "commands run once in Cygwin at the end of the install")
            .note("commands run once in Cygwin bash")
            .windows_only(),
        row(
            "pin",
            Kind::Pin,
            Default::Absent,
            "makes the image a fixed-output copy that no upgrade rebuilds (\"Keeping images\" below)",
        ),
    ],
};

/// `windowsImage { base; ... }`: a layer. Its shape is the base's and may not be given again.
pub const LAYER: Table = Table {
    id: "layer",
    rows: &[
        row("base", Kind::Image, Default::Required, "the image to start from: `windowsImage`'s result, a layer too"),
        row(
            "installCommands",
            Kind::TextList,
            Default::NoItems,
            "run in order in the guest's shell (Cygwin bash, or the standin's sh), each as a script of its own with `-e`, stdin at its end",
        )
        .note("commands run in order in the guest's shell"),
        row(
            "name",
            Kind::Text,
            Default::Words("`winvm-<guest>-layer`"),
            "the derivation's name (a Windows layer's starts with `RESTRICTDIST-`)",
        )
        .note("the layer's derivation name"),
        row("timeout", SECONDS, Default::Words("the base's"), "limit of the layer's session"),
        row("pin", Kind::Pin, Default::Absent, "makes the layer a fixed-output copy, as for an image"),
    ],
};

/// `windowsDerivation { ... }`: every attribute not in the table passes into the build's
/// environment, as with `derivation`.
pub const BUILD: Table = Table {
    id: "windowsDerivation",
    rows: &[
        row("name", Kind::Text, Default::Required, "the derivation's name").passed_on(),
        row(
            "image",
            Kind::Image,
            Default::Required,
            "the image the VM is revived from: `windowsImage`'s result, a layer too",
        )
        .passed_on(),
        row(
            "script",
            Kind::Forwarded,
            Default::Required,
            "run with `sh -e` in `/tmp` of the guest; its string context makes inputs",
        )
        .note("the shell script to run in the guest")
        .passed_on(),
        row("timeout", SECONDS, Default::Words("the image's"), "limit of the build"),
        row(
            "memory",
            mib(MEMORY_MIB_RANGE),
            Default::Words("the image's"),
            "the image's, restated; another value is an error",
        ),
        row("cpus", COUNT, Default::Words("the image's"), "the image's, restated; another value is an error"),
        row("accel", ACCEL, Default::Words("the image's"), "the image's, restated; another value is an error"),
        row("outputs", Kind::TextList, Default::Words("`[ \"out\" ]`"), "as with `derivation`; not empty")
            .note("output names")
            .passed_on(),
        row(
            "requiredSystemFeatures",
            Kind::TextList,
            Default::NoItems,
            "as with `derivation`; `\"kvm\"` is added for an image with `accel = \"kvm\"`",
        ),
        row("builder", Kind::Reserved, Default::Words("—"), "nix-winvm's own: cannot be set"),
        row("args", Kind::Reserved, Default::Words("—"), "nix-winvm's own: cannot be set"),
        row("system", Kind::Reserved, Default::Words("—"), "nix-winvm's own: cannot be set"),
    ],
};

/// `runInWindowsVM drv`: the attributes of `drv` it reads; every other one passes into the
/// build's environment.
pub const RUN_IN_VM: Table = Table {
    id: "runInWindowsVM",
    rows: &[
        row(
            "windowsImage",
            Kind::ImageOrArgs,
            Default::Required,
            "the image the VM is revived from; given as arguments, the image's derivations are made along",
        ),
        row("builder", Kind::Any, Default::Required, "run in the guest with the derivation's environment"),
        row("args", Kind::ForwardedList, Default::NoItems, "the builder's arguments, each with its string context"),
        row("timeout", SECONDS, Default::Words("the image's"), "limit of the build").passed_on(),
        row(
            "requiredSystemFeatures",
            Kind::TextList,
            Default::NoItems,
            "as with `derivation`; `\"kvm\"` is added for an image with `accel = \"kvm\"`",
        ),
        row(
            "system",
            Kind::Replaced,
            Default::Words("`\"x86_64-linux\"`"),
            "set by nix-winvm, whatever the derivation says",
        ),
        row("image", Kind::Replaced, Default::Words("the image"), "set by nix-winvm, whatever the derivation says"),
    ],
};

/// Every table, in the README's order.
#[cfg(test)]
pub const TABLES: [&Table; 4] = [&IMAGE, &LAYER, &BUILD, &RUN_IN_VM];

/// The README's reference: each table as Markdown, checked against README.md by a test.
#[cfg(test)]
pub mod readme {
    use super::*;

    /// The comment that precedes a table in README.md.
    pub fn marker(table: &Table) -> String {
        format!("<!-- src/plugin/table.rs: {} -->", table.id)
    }

    pub const HEADER: [&str; 2] = ["| attribute | type | default | meaning |", "| --- | --- | --- | --- |"];

    pub fn row(a: &Attr) -> String {
        format!("| `{}` | {} | {} | {} |", a.name, kind(a.kind), default(a.default), a.doc)
    }

    fn kind(k: Kind) -> String {
        match k {
            Kind::Int { unit: "count", .. } => "integer".into(),
            Kind::Int { unit, .. } => format!("integer, {unit}"),
            Kind::Choice(names) => {
                let quoted: Vec<String> = names.iter().map(|n| format!("`\"{n}\"`")).collect();
                match quoted.split_last() {
                    Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
                    _ => quoted.join(""),
                }
            }
            Kind::Bool => "bool".into(),
            Kind::Text | Kind::Forwarded => "string".into(),
            Kind::TextOrNull => "string or null".into(),
            Kind::TextList => "list of strings".into(),
            Kind::ForwardedList => "list".into(),
            Kind::PathOrDerivation => "path or derivation".into(),
            Kind::Iso => "path, or `{ name; sha256; }` or `{ name; hash; }`".into(),
            Kind::Image => "an image".into(),
            Kind::ImageOrArgs => "an image, or `windowsImage`'s arguments".into(),
            Kind::Pin => "string, `\"sha256-…\"` (SRI)".into(),
            Kind::Any => "as with `derivation`".into(),
            Kind::Reserved | Kind::Replaced => "—".into(),
        }
    }

    fn default(d: Default) -> String {
        match d {
            Default::Required => "required".into(),
            Default::RequiredForWindows => "required for windows".into(),
            Default::Absent => "none".into(),
            Default::Null => "null".into(),
            Default::Bool(b) => b.to_string(),
            Default::Text(t) => format!("`\"{t}\"`"),
            Default::NoItems => "[ ]".into(),
            Default::PerGuest { windows, standin } => format!("{windows} (windows), {standin} (standin)"),
            Default::SlowerUnderTcg { value, windows_tcg } => {
                format!("{value} (Windows with `accel = \"tcg\"`: {windows_tcg})")
            }
            Default::Words(w) => w.into(),
        }
    }

    /// The whole table, as README.md holds it under its marker.
    pub fn table(t: &Table) -> String {
        let mut lines: Vec<String> = HEADER.iter().map(|h| h.to_string()).collect();
        lines.extend(t.rows.iter().map(row));
        lines.join("\n")
    }
}
