//! The user's Nix attributes -> typed specs. Each attribute is read through its builtin's table
//! (table.rs), which gives its type, its range or choices and its default; each error names the
//! builtin and the attribute (error.rs). Every message is user-facing and asserted by tests.

use super::error::{ArgError, AttrPath, Caller, Problem, ShapeValue};
use super::table::{self, Attr, Builtin, Default, Guest, Kind, Table, ISO_HASH_SHAPE, ISO_SHAPE, PIN_SHAPE};
use super::value::Val;
use crate::spec::*;

pub type Attrs = [(String, Val)];

/// One argument (a builtin's, or the image arguments inside `runInWindowsVM`'s), read through
/// its table. The code asks for each attribute by name and kind: a name missing from the table,
/// a kind that is not the row's, or a default the row does not have is a bug in this file, and
/// panics (the unit tests read every row; `plugin::plan` would catch it and say "internal error").
#[derive(Clone, Copy)]
pub struct Args<'a> {
    caller: Caller,
    table: &'static Table,
    attrs: &'a Attrs,
}

impl<'a> Args<'a> {
    pub fn new(caller: Caller, table: &'static Table, attrs: &'a Attrs) -> Args<'a> {
        Args { caller, table, attrs }
    }

    pub fn error(&self, attr: AttrPath, problem: Problem) -> ArgError {
        ArgError { caller: self.caller, attr, problem }
    }

    fn error_at(&self, name: &str, problem: Problem) -> ArgError {
        self.error(AttrPath::attr(name), problem)
    }

    pub fn get(&self, name: &str) -> Option<&'a Val> {
        self.attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The row the code reads `name` by: its absence is a bug in this file, found by the tests.
    fn row(&self, name: &str) -> &'static Attr {
        match self.table.row(name) {
            Some(row) => row,
            None => panic!("the table {} has no attribute '{name}'", self.table.id),
        }
    }

    fn wrong_type(&self, path: AttrPath, row: &Attr, got: &Val) -> ArgError {
        self.error(path, Problem::WrongType { expected: row.kind.expected(row.note), got: got.describe() })
    }

    /// The text of a string the plan reads (`row` says what else an error expects).
    fn text_at(&self, path: AttrPath, row: &Attr, v: &Val) -> Result<String, ArgError> {
        match v {
            Val::Str { text, .. } => Ok(text.clone()),
            other => Err(self.not_text(path, row, other)),
        }
    }

    /// A string that is not UTF-8 is named as such; any other value is of the wrong type.
    fn not_text(&self, path: AttrPath, row: &Attr, v: &Val) -> ArgError {
        match v {
            Val::NonUtf8Str { valid_up_to, .. } => self.error(path, Problem::NotUtf8 { valid_up_to: *valid_up_to }),
            other => self.wrong_type(path, row, other),
        }
    }

    /// Every attribute given is in the table.
    pub fn known(&self) -> Result<(), ArgError> {
        match self.attrs.iter().find(|(k, _)| self.table.row(k).is_none()) {
            Some((k, _)) => Err(self.unknown(k)),
            None => Ok(()),
        }
    }

    /// Suggests the closest known name for a typo ("memroy" -> "memory").
    pub fn unknown(&self, attr: &str) -> ArgError {
        let known = self.table.names();
        let closest = known.iter().map(|k| (edit_distance(attr, k), *k)).filter(|(d, _)| *d <= 2).min();
        self.error_at(attr, Problem::Unknown { closest: closest.map(|(_, k)| k), known })
    }

    /// The value of a required attribute.
    pub fn required(&self, name: &str) -> Result<&'a Val, ArgError> {
        let row = self.row(name);
        let when = (row.default == Default::RequiredForWindows).then_some("guest = \"windows\"");
        self.get(name).ok_or_else(|| self.error_at(name, Problem::Missing { when, hint: row.kind.hint(row.note) }))
    }

    /// An integer within its row's range; None when it is not given.
    pub fn int(&self, name: &str) -> Result<Option<i64>, ArgError> {
        let row = self.row(name);
        let Kind::Int { unit, range } = row.kind else { panic!("'{name}' is not an integer in {}", self.table.id) };
        match self.get(name) {
            None => Ok(None),
            Some(Val::Int(i)) if (range.0..=range.1).contains(i) => Ok(Some(*i)),
            Some(Val::Int(i)) => Err(self.error_at(name, Problem::OutOfRange { value: *i, unit, range })),
            Some(other) => Err(self.wrong_type(AttrPath::attr(name), row, other)),
        }
    }

    /// An integer, or its row's default for `guest`.
    pub fn int_or_default(&self, name: &str, guest: Guest) -> Result<i64, ArgError> {
        let row = self.row(name);
        match (self.int(name)?, row.default.int(guest)) {
            (Some(i), _) | (None, Some(i)) => Ok(i),
            (None, None) => panic!("'{name}' has no integer default in {}", self.table.id),
        }
    }

    /// One of its row's choices, as the value at the same position in `values`; None when it is
    /// not given.
    pub fn choice<T: Copy>(&self, name: &str, values: &[T]) -> Result<Option<T>, ArgError> {
        let row = self.row(name);
        let Kind::Choice(names) = row.kind else { panic!("'{name}' is not a choice in {}", self.table.id) };
        let pick = |text: &str| names.iter().position(|n| *n == text).and_then(|i| values.get(i).copied());
        match self.get(name) {
            None => Ok(None),
            Some(Val::Str { text, .. }) => pick(text).map(Some).ok_or_else(|| {
                self.error_at(name, Problem::Invalid { expected: row.kind.expected(row.note), value: text.clone() })
            }),
            Some(other) => Err(self.not_text(AttrPath::attr(name), row, other)),
        }
    }

    /// A choice, or its row's default.
    pub fn choice_or_default<T: Copy>(&self, name: &str, values: &[T]) -> Result<T, ArgError> {
        let row = self.row(name);
        let Default::Text(default) = row.default else { panic!("'{name}' has no default in {}", self.table.id) };
        let Kind::Choice(names) = row.kind else { panic!("'{name}' is not a choice in {}", self.table.id) };
        match self.choice(name, values)? {
            Some(v) => Ok(v),
            None => match names.iter().position(|n| *n == default).and_then(|i| values.get(i)) {
                Some(v) => Ok(*v),
                None => panic!("the default of '{name}' is not one of its choices"),
            },
        }
    }

    /// A Boolean, or its row's default.
    pub fn bool(&self, name: &str) -> Result<bool, ArgError> {
        let row = self.row(name);
        match (self.get(name), row.default) {
            (Some(Val::Bool(b)), _) => Ok(*b),
            (Some(other), _) => Err(self.wrong_type(AttrPath::attr(name), row, other)),
            (None, Default::Bool(b)) => Ok(b),
            (None, _) => panic!("'{name}' has no Boolean default in {}", self.table.id),
        }
    }

    /// Text; None when it is not given (or null, where null is allowed).
    pub fn text(&self, name: &str) -> Result<Option<String>, ArgError> {
        let row = self.row(name);
        match self.get(name) {
            None => Ok(None),
            Some(Val::Null) if row.kind == Kind::TextOrNull => Ok(None),
            Some(v) => self.text_at(AttrPath::attr(name), row, v).map(Some),
        }
    }

    /// Text, or its row's default.
    pub fn text_or_default(&self, name: &str) -> Result<String, ArgError> {
        let row = self.row(name);
        match (self.text(name)?, row.default) {
            (Some(t), _) => Ok(t),
            (None, Default::Text(t)) => Ok(t.to_owned()),
            (None, _) => panic!("'{name}' has no text default in {}", self.table.id),
        }
    }

    /// A required attribute's text.
    pub fn required_text(&self, name: &str) -> Result<String, ArgError> {
        let v = self.required(name)?;
        self.text_at(AttrPath::attr(name), self.row(name), v)
    }

    /// A list of text; None when it is not given.
    pub fn text_list(&self, name: &str) -> Result<Option<Vec<String>>, ArgError> {
        let row = self.row(name);
        let items = match self.get(name) {
            None => return Ok(None),
            Some(Val::List(items)) => items,
            Some(other) => return Err(self.wrong_type(AttrPath::attr(name), row, other)),
        };
        let list = AttrPath::attr(name);
        let element = Attr::element();
        items
            .iter()
            .enumerate()
            .map(|(i, item)| self.text_at(list.element(i), &element, item))
            .collect::<Result<_, _>>()
            .map(Some)
    }

    /// A list of text, empty when it is not given.
    pub fn text_list_or_empty(&self, name: &str) -> Result<Vec<String>, ArgError> {
        Ok(self.text_list(name)?.unwrap_or_default())
    }

    /// The length of a list passed on element by element; 0 when it is not given.
    pub fn list_len(&self, name: &str) -> Result<usize, ArgError> {
        match self.get(name) {
            None => Ok(0),
            Some(Val::List(items)) => Ok(items.len()),
            Some(other) => Err(self.wrong_type(AttrPath::attr(name), self.row(name), other)),
        }
    }

    /// A string passed on untouched: any bytes will do.
    pub fn forwarded_string(&self, name: &str) -> Result<(), ArgError> {
        let row = self.row(name);
        match self.required(name)? {
            Val::Str { .. } | Val::NonUtf8Str { .. } => Ok(()),
            other => Err(self.wrong_type(AttrPath::attr(name), row, other)),
        }
    }

    /// A path or a derivation (or a string with context: a store path), passed on.
    pub fn path_or_derivation(&self, name: &str) -> Result<(), ArgError> {
        match self.get(name) {
            None | Some(Val::Path(_) | Val::Derivation { .. } | Val::Str { context: true, .. }) => Ok(()),
            Some(other) => Err(self.wrong_type(AttrPath::attr(name), self.row(name), other)),
        }
    }

    /// The image `name` holds: the result of `windowsImage`.
    pub fn image(&self, name: &str) -> Result<ImageSpec, ArgError> {
        let row = self.row(name);
        match self.required(name)? {
            Val::Derivation { image_spec: Some(json), .. } => {
                image_spec_from_json(json).map_err(|e| self.error_at(name, Problem::NotAnImage(e)))
            }
            Val::Derivation { image_spec: None, .. } => Err(self.error_at(
                name,
                Problem::WrongType {
                    expected: row.kind.expected(row.note),
                    got: "a derivation that is not a nix-winvm image",
                },
            )),
            other => Err(self.wrong_type(AttrPath::attr(name), row, other)),
        }
    }

    /// `pin`: the hash of an image or a layer, which makes it a fixed-output derivation (its
    /// store path then depends on its name and this hash alone). Not part of the spec: the
    /// derivation the pin copies is the same with and without it, so pinning never rebuilds it.
    pub fn pin(&self) -> Result<Option<String>, ArgError> {
        let Some(text) = self.text("pin")? else { return Ok(None) };
        let ok = text.strip_prefix("sha256-").is_some_and(|b64| {
            b64.len() == 44
                && b64.ends_with('=')
                && b64[..43].bytes().all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
        });
        if !ok {
            return Err(self.error_at("pin", Problem::Invalid { expected: PIN_SHAPE.into(), value: text }));
        }
        Ok(Some(text))
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + (ca != *cb) as usize).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The builtin's argument, a set of attributes (`expected` says which).
pub fn argument<'a>(builtin: Builtin, v: &'a Val, expected: &'static str) -> Result<&'a Attrs, ArgError> {
    match v {
        Val::Set(attrs) => Ok(attrs),
        other => Err(ArgError {
            caller: Caller::of(builtin),
            attr: AttrPath::default(),
            problem: Problem::Argument { expected, got: other.describe() },
        }),
    }
}

/// A new image's validated arguments.
pub struct ImageArgs {
    pub spec: ImageSpec,
    pub pin: Option<String>,
}

pub fn image_args(caller: Caller, attrs: &Attrs) -> Result<ImageArgs, ArgError> {
    let args = Args::new(caller, &table::IMAGE, attrs);
    args.known()?;
    let windows = args.choice_or_default("guest", &[true, false])?;
    let guest = if windows {
        GuestSpec::Windows(windows_options(&args)?)
    } else {
        if let Some((k, _)) = attrs.iter().find(|(k, _)| args.table.row(k).is_some_and(|a| a.windows_only)) {
            return Err(args.error_at(k, Problem::WindowsOnly));
        }
        GuestSpec::Standin
    };
    let mut spec = ImageSpec::new(guest);
    let mut shape = Guest { windows, tcg: false };
    spec.shape.memory_mib = args.int_or_default("memory", shape)? as u32;
    spec.shape.cpus = args.int_or_default("cpus", shape)? as u32;
    spec.shape.accel = args.choice_or_default("accel", &[Accel::Kvm, Accel::Tcg])?;
    shape.tcg = spec.shape.accel == Accel::Tcg;
    spec.timeout_secs = args.int_or_default("timeout", shape)? as u64;
    spec.disk_size_mib = args.int_or_default("diskSize", shape)? as u64;
    spec.shape.efi = args.bool("efi")?;
    // The checks the builder repeats on the spec it reads back.
    spec.validate().map_err(|e| args.error(AttrPath::default(), Problem::Spec(e)))?;
    Ok(ImageArgs { spec, pin: args.pin()? })
}

fn windows_options(args: &Args) -> Result<WindowsOptions, ArgError> {
    let iso = iso(args)?;
    let edition = args.required_text("edition")?;
    let product_key = args.text("productKey")?;
    let locale = args.text_or_default("locale")?;
    let cygwin_packages = args.text_list_or_empty("cygwinPackages")?;
    let install_commands = args.text_list_or_empty("installCommands")?;
    args.path_or_derivation("cygwinRepo")?;
    Ok(WindowsOptions { iso, edition, product_key, locale, cygwin_packages, install_commands })
}

/// `iso`: a path (or derivation, or store path) Nix copies, or `{ name; sha256; }` or
/// `{ name; hash; }` for a fixed-output path the user adds. An SRI `hash` becomes the
/// hexadecimal `sha256` it stands for, so both forms of one hash make the same derivations.
fn iso(args: &Args) -> Result<IsoSource, ArgError> {
    let at = AttrPath::attr("iso");
    let fields = match args.required("iso")? {
        Val::Path(_) | Val::Derivation { .. } | Val::Str { context: true, .. } => return Ok(IsoSource::Path),
        Val::Set(fields) => fields,
        other => return Err(args.wrong_type(at, args.row("iso"), other)),
    };
    if let Some((k, _)) = fields.iter().find(|(k, _)| !["name", "sha256", "hash"].contains(&k.as_str())) {
        return Err(args.error(at, Problem::UnknownField { field: k.clone(), hint: ISO_SHAPE }));
    }
    let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let text = |name: &'static str, note: &'static str, v: &Val| args.text_at(at.field(name), &Attr::field(note), v);
    let name =
        get("name").ok_or_else(|| args.error(at.clone(), Problem::MissingField { field: "name", hint: ISO_SHAPE }))?;
    let name = text("name", "the ISO's file name", name)?;
    let sha256 = match (get("sha256"), get("hash")) {
        (Some(_), Some(_)) => return Err(args.error(at, Problem::BothFields { one: "sha256", other: "hash" })),
        (None, None) => {
            return Err(args.error(at, Problem::MissingEither { one: "sha256", other: "hash", hint: ISO_SHAPE }))
        }
        (Some(v), None) => {
            let sha256 = text("sha256", "64 hexadecimal digits", v)?;
            if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                let expected = "64 hexadecimal digits".into();
                return Err(args.error(at.field("sha256"), Problem::Invalid { expected, value: sha256 }));
            }
            sha256.to_ascii_lowercase()
        }
        (None, Some(v)) => {
            let hash = text("hash", "\"sha256-\" and 44 characters of base64", v)?;
            match sri_sha256_hex(&hash) {
                Some(hex) => hex,
                None => {
                    let expected = ISO_HASH_SHAPE.into();
                    return Err(args.error(at.field("hash"), Problem::Invalid { expected, value: hash }));
                }
            }
        }
    };
    if name.is_empty() || name.contains('/') {
        return Err(
            args.error(at.field("name"), Problem::Invalid { expected: "a file name without '/'".into(), value: name })
        );
    }
    Ok(IsoSource::Fixed { name, sha256 })
}

/// The SHA-256 of an SRI hash (`sha256-` and 32 bytes in base64: 43 digits and one `=`), in
/// hexadecimal; None for anything else. The last digit holds the hash's last 4 bits and 2 zero
/// bits: any other would be a hash that another string names too.
pub fn sri_sha256_hex(sri: &str) -> Option<String> {
    let digits = sri.strip_prefix("sha256-")?.strip_suffix('=')?;
    if digits.len() != 43 {
        return None;
    }
    let (mut bytes, mut bits, mut held) = (Vec::with_capacity(32), 0u32, 0u32);
    for c in digits.bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(value);
        held += 6;
        if held >= 8 {
            held -= 8;
            bytes.push((bits >> held) as u8);
            bits &= (1 << held) - 1;
        }
    }
    (bits == 0 && bytes.len() == 32).then(|| bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A layer's validated arguments.
pub struct LayerArgs {
    pub spec: LayerSpec,
    pub name: Option<String>,
    pub pin: Option<String>,
}

/// `windowsImage { base = ...; installCommands = [ ... ]; }`: the base's spec, and what the
/// layer adds. The shape is the base's and may not be given again.
pub fn layer_args(caller: Caller, attrs: &Attrs) -> Result<LayerArgs, ArgError> {
    let args = Args::new(caller, &table::LAYER, attrs);
    for (k, _) in attrs {
        if args.table.row(k).is_some() {
            continue;
        }
        if table::IMAGE.row(k).is_some() {
            return Err(args.error_at(k, Problem::GivenWithBase));
        }
        return Err(args.unknown(k));
    }
    let image = args.image("base")?;
    let commands = args.text_list_or_empty("installCommands")?.len();
    let timeout_secs = args.int("timeout")?.map_or(image.timeout_secs, |t| t as u64);
    let name = args.text("name")?;
    Ok(LayerArgs { spec: LayerSpec { image, timeout_secs, commands }, name, pin: args.pin()? })
}

/// `windowsDerivation`'s validated arguments; its other attributes pass into the environment.
pub struct BuildArgs {
    pub spec: BuildSpec,
    pub extra_features: Vec<String>,
}

pub fn build_args(builtin: Builtin, attrs: &Attrs) -> Result<BuildArgs, ArgError> {
    let args = Args::new(Caller::of(builtin), &table::BUILD, attrs);
    if let Some((k, _)) = attrs.iter().find(|(k, _)| args.table.row(k).is_some_and(|a| a.kind == Kind::Reserved)) {
        return Err(args.error_at(k, Problem::Reserved));
    }
    args.required_text("name")?;
    args.forwarded_string("script")?;
    let image = args.image("image")?;
    let timeout_secs = build_timeout(&args, &image)?;
    restated_shape(&args, &image)?;
    if args.text_list("outputs")?.is_some_and(|o| o.is_empty()) {
        return Err(args.error_at("outputs", Problem::Empty));
    }
    let extra_features = args.text_list_or_empty("requiredSystemFeatures")?;
    Ok(BuildArgs { spec: BuildSpec { image, timeout_secs, run_original_builder: false }, extra_features })
}

/// A build's time-out: its own, or its image's.
pub fn build_timeout(args: &Args, image: &ImageSpec) -> Result<u64, ArgError> {
    Ok(args.int("timeout")?.map_or(image.timeout_secs, |t| t as u64))
}

/// A build inherits the image's shape; it may only restate it.
fn restated_shape(args: &Args, image: &ImageSpec) -> Result<(), ArgError> {
    let differs = |name: &str, given: ShapeValue, image: ShapeValue| {
        if given == image {
            Ok(())
        } else {
            Err(args.error_at(name, Problem::DiffersFromImage { given, image }))
        }
    };
    if let Some(m) = args.int("memory")? {
        differs("memory", ShapeValue::Mib(m as u32), ShapeValue::Mib(image.shape.memory_mib))?;
    }
    if let Some(c) = args.int("cpus")? {
        differs("cpus", ShapeValue::Count(c as u32), ShapeValue::Count(image.shape.cpus))?;
    }
    if let Some(a) = args.choice("accel", &[Accel::Kvm, Accel::Tcg])? {
        differs("accel", ShapeValue::Accel(a), ShapeValue::Accel(image.shape.accel))?;
    }
    Ok(())
}
