//! Cygwin's package index (setup.ini), the dependency closure to install offline, and the
//! layout of the local repository `setup-x86_64.exe --local-install` reads.
//!
//! Format reference: "setup.ini" in the cygwin-apps documentation. Lines starting with `#` are
//! comments; header lines come before the first `@ name` line; each package has package-level
//! fields (sdesc, ldesc, category) and version sections, the current one first and unlabelled
//! (or `[curr]`), older and trial ones after `[prev]` / `[test]`. Unknown lines are ignored,
//! as the format asks, so newer files still parse.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Always installed besides the Base category: sshd, and the service wrapper the bootstrap
/// drives directly.
pub const REQUIRED_PACKAGES: &[&str] = &["openssh", "cygrunsrv"];

/// The directory inside the local package directory that plays the mirror. Setup looks for
/// `<local dir>/<mirror>/x86_64/setup.ini` and resolves `install:` paths against `<mirror>`.
pub const LOCAL_MIRROR_DIR: &str = "nix-winvm-mirror";
/// Where setup.ini goes, relative to the local package directory.
pub const LOCAL_SETUP_INI: &str = "nix-winvm-mirror/x86_64/setup.ini";

/// Setup satisfies this pseudo-package from the running Windows version; it is never in
/// setup.ini.
const WINDOWS_PSEUDO_PACKAGE: &str = "_windows";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    /// Relative to the mirror root, e.g. `x86_64/release/bash/bash-5.2.21-1-x86_64.tar.xz`.
    pub path: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha512: String,
}

/// A package as its current version describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Package {
    pub name: String,
    pub version: Option<String>,
    pub sdesc: Option<String>,
    pub ldesc: Option<String>,
    pub categories: Vec<String>,
    /// Names only: version constraints are dropped, since only current versions are installed.
    pub depends: Vec<String>,
    pub provides: Vec<String>,
    /// None for packages without an archive of their own.
    pub install: Option<Install>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SetupIni {
    pub packages: BTreeMap<String, Package>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupIniError {
    #[error("setup.ini line {line}: '@' without a package name")]
    MissingPackageName { line: usize },
    #[error("setup.ini line {line}: package '{name}' appears a second time")]
    DuplicatePackage { name: String, line: usize },
    #[error("setup.ini line {line}: version label before the first package")]
    SectionOutsidePackage { line: usize },
    #[error("setup.ini line {line}: quoted value is never closed")]
    UnterminatedQuote { line: usize },
    #[error("setup.ini line {line}: text after the closing quote")]
    TextAfterClosingQuote { line: usize },
    #[error("setup.ini line {line}: package '{package}' has a second unlabelled (current) version")]
    DuplicateCurrentVersion { package: String, line: usize },
    #[error("setup.ini line {line}: install: needs 'path size sha512', found {found} fields")]
    InstallFieldCount { line: usize, found: usize },
    #[error("setup.ini line {line}: install path '{path}' is not a plain relative path")]
    UnsafeInstallPath { line: usize, path: String },
    #[error("setup.ini line {line}: install size '{value}' is not a number")]
    InvalidInstallSize { line: usize, value: String },
    #[error("setup.ini line {line}: install hash is not 128 hex digits (SHA-512)")]
    InstallHashNotSha512 { line: usize },
    #[error("setup.ini line {line}: unbalanced parentheses in a dependency list")]
    UnbalancedParentheses { line: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClosureError {
    #[error(
        "cygwin package '{name}' (requested for installation) is not in setup.ini: check its name in cygwinPackages"
    )]
    UnknownPackage { name: String },
    #[error(
        "cygwin package '{name}' (required by '{required_by}') is not in setup.ini: the repository's setup.ini is incomplete; build cygwinRepo again"
    )]
    MissingDependency { name: String, required_by: String },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Current,
    Other,
}

/// One package while its lines are read; `requires:` (package-wide, older files) only counts
/// when the current version has no `depends2:`.
struct PackageBuilder {
    package: Package,
    requires: Vec<String>,
    depends2: Option<Vec<String>>,
    section: Section,
}

impl PackageBuilder {
    fn finish(self) -> Package {
        let mut package = self.package;
        package.depends = self.depends2.unwrap_or(self.requires);
        package
    }
}

impl SetupIni {
    pub fn parse(text: &str) -> Result<SetupIni, SetupIniError> {
        let mut packages = BTreeMap::new();
        let mut current: Option<PackageBuilder> = None;
        let mut lines = text.lines().enumerate().map(|(index, line)| (index + 1, line));

        while let Some((line_no, raw)) = lines.next() {
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('@') {
                let name = name.trim();
                if name.is_empty() {
                    return Err(SetupIniError::MissingPackageName { line: line_no });
                }
                if let Some(done) = current.take() {
                    let done = done.finish();
                    packages.insert(done.name.clone(), done);
                }
                if packages.contains_key(name) {
                    return Err(SetupIniError::DuplicatePackage { name: name.to_string(), line: line_no });
                }
                current = Some(PackageBuilder {
                    package: Package { name: name.to_string(), ..Package::default() },
                    requires: Vec::new(),
                    depends2: None,
                    section: Section::Current,
                });
                continue;
            }
            let trimmed = line.trim();
            if trimmed.starts_with('[') && trimmed.ends_with(']') {
                let builder = current.as_mut().ok_or(SetupIniError::SectionOutsidePackage { line: line_no })?;
                builder.section = match &trimmed[1..trimmed.len() - 1] {
                    "curr" => Section::Current,
                    _ => Section::Other,
                };
                continue;
            }
            let Some((key, rest)) = line.split_once(':') else {
                continue; // Unrecognized lines are ignored, as the format asks.
            };
            let value = read_value(rest, line_no, &mut lines)?;
            if let Some(builder) = current.as_mut() {
                apply_field(builder, key.trim(), value, line_no)?;
            }
        }
        if let Some(done) = current.take() {
            let done = done.finish();
            packages.insert(done.name.clone(), done);
        }
        Ok(SetupIni { packages })
    }
}

/// A field's value: the rest of the line, or a double-quoted string that may run over several
/// lines (setup's own lexer has no escapes: a quote always ends the string).
fn read_value<'a>(
    rest: &str,
    line_no: usize,
    lines: &mut impl Iterator<Item = (usize, &'a str)>,
) -> Result<String, SetupIniError> {
    let rest = rest.trim();
    let Some(quoted) = rest.strip_prefix('"') else {
        return Ok(rest.to_string());
    };
    let mut value = String::new();
    let mut piece = quoted.to_string();
    let mut piece_line = line_no;
    loop {
        if let Some(end) = piece.find('"') {
            if !piece[end + 1..].trim().is_empty() {
                return Err(SetupIniError::TextAfterClosingQuote { line: piece_line });
            }
            value.push_str(&piece[..end]);
            return Ok(value);
        }
        value.push_str(&piece);
        value.push('\n');
        let (next_no, next) = lines.next().ok_or(SetupIniError::UnterminatedQuote { line: line_no })?;
        piece = next.trim_end_matches('\r').to_string();
        piece_line = next_no;
    }
}

fn apply_field(builder: &mut PackageBuilder, key: &str, value: String, line: usize) -> Result<(), SetupIniError> {
    if builder.section != Section::Current {
        return Ok(());
    }
    let package = &mut builder.package;
    match key {
        "sdesc" => package.sdesc = Some(value),
        "ldesc" => package.ldesc = Some(value),
        "category" => package.categories = value.split_whitespace().map(str::to_string).collect(),
        "requires" => builder.requires = parse_dependency_list(&value, line)?,
        "depends2" => builder.depends2 = Some(parse_dependency_list(&value, line)?),
        "provides" => package.provides = parse_dependency_list(&value, line)?,
        "version" => {
            if package.version.is_some() {
                return Err(SetupIniError::DuplicateCurrentVersion { package: package.name.clone(), line });
            }
            package.version = Some(value);
        }
        "install" => package.install = Some(parse_install(&value, line)?),
        _ => {}
    }
    Ok(())
}

/// `a, b (>= 1.0), c` or the older `a b c`: names in order, duplicates and constraints dropped.
fn parse_dependency_list(value: &str, line: usize) -> Result<Vec<String>, SetupIniError> {
    let mut without_constraints = String::with_capacity(value.len());
    let mut depth = 0usize;
    for c in value.chars() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth.checked_sub(1).ok_or(SetupIniError::UnbalancedParentheses { line })?;
            }
            c if depth == 0 => without_constraints.push(c),
            _ => {}
        }
    }
    if depth != 0 {
        return Err(SetupIniError::UnbalancedParentheses { line });
    }
    // A set for the duplicates: scanning the list for each name took minutes on a line of
    // 100,000 names (found by tests/fuzz.rs).
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let mut names: Vec<String> = Vec::new();
    for name in without_constraints.split(|c: char| c == ',' || c.is_whitespace()) {
        if !name.is_empty() && seen.insert(name) {
            names.push(name.to_string());
        }
    }
    Ok(names)
}

fn parse_install(value: &str, line: usize) -> Result<Install, SetupIniError> {
    let fields: Vec<&str> = value.split_whitespace().collect();
    let &[path, size, hash] = fields.as_slice() else {
        return Err(SetupIniError::InstallFieldCount { line, found: fields.len() });
    };
    // These paths become file names on the install medium.
    let safe = !path.starts_with('/')
        && !path.contains('\\')
        && path.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
    if !safe {
        return Err(SetupIniError::UnsafeInstallPath { line, path: path.to_string() });
    }
    let size = size.parse::<u64>().map_err(|_| SetupIniError::InvalidInstallSize { line, value: size.to_string() })?;
    if hash.len() != 128 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SetupIniError::InstallHashNotSha512 { line });
    }
    Ok(Install { path: path.to_string(), size, sha512: hash.to_ascii_lowercase() })
}

/// Everything installed besides the dependencies: the Base category (setup always installs
/// it), [`REQUIRED_PACKAGES`] and the user's extras. Sorted, without duplicates.
pub fn base_roots(ini: &SetupIni, extra: &[String]) -> Vec<String> {
    let mut roots: BTreeSet<String> = ini
        .packages
        .values()
        .filter(|package| package.categories.iter().any(|category| category == "Base"))
        .map(|package| package.name.clone())
        .collect();
    roots.extend(REQUIRED_PACKAGES.iter().map(|name| name.to_string()));
    roots.extend(extra.iter().cloned());
    roots.into_iter().collect()
}

/// The roots and everything they depend on, sorted by name. Dependency cycles are normal
/// (cygwin and bash need each other); each package is visited once.
pub fn closure(ini: &SetupIni, roots: &[&str]) -> Result<Vec<Package>, ClosureError> {
    // BTreeMap order makes the chosen provider the same on every run.
    let mut providers: BTreeMap<&str, &str> = BTreeMap::new();
    for package in ini.packages.values() {
        for virtual_name in &package.provides {
            providers.entry(virtual_name.as_str()).or_insert(package.name.as_str());
        }
    }
    let resolve = |name: &str| -> Option<&Package> {
        ini.packages.get(name).or_else(|| providers.get(name).and_then(|p| ini.packages.get(*p)))
    };

    let mut chosen: BTreeMap<&str, &Package> = BTreeMap::new();
    let mut queue: VecDeque<&Package> = VecDeque::new();
    for root in roots {
        let package = resolve(root).ok_or_else(|| ClosureError::UnknownPackage { name: root.to_string() })?;
        if chosen.insert(package.name.as_str(), package).is_none() {
            queue.push_back(package);
        }
    }
    while let Some(package) = queue.pop_front() {
        for dependency in &package.depends {
            if dependency == WINDOWS_PSEUDO_PACKAGE {
                continue;
            }
            let target = resolve(dependency).ok_or_else(|| ClosureError::MissingDependency {
                name: dependency.clone(),
                required_by: package.name.clone(),
            })?;
            if chosen.insert(target.name.as_str(), target).is_none() {
                queue.push_back(target);
            }
        }
    }
    Ok(chosen.into_values().cloned().collect())
}

/// Files of the local repository: (path relative to the local package directory, sha512,
/// size), sorted by path. setup.ini itself goes to [`LOCAL_SETUP_INI`].
pub fn local_repo_layout(pkgs: &[Package]) -> Vec<(String, String, u64)> {
    let mut files: Vec<(String, String, u64)> = pkgs
        .iter()
        .filter_map(|package| package.install.as_ref())
        .map(|install| (format!("{LOCAL_MIRROR_DIR}/{}", install.path), install.sha512.clone(), install.size))
        .collect();
    files.sort();
    files.dedup();
    files
}

/// A Nix list of the archives to fetch, one attribute set per package:
/// `{ name = "..."; path = "..."; url = "..."; sha512 = "..."; size = N; }`, where `path` is
/// relative to the mirror root (prefix [`LOCAL_MIRROR_DIR`] for the medium) and `url` is
/// `mirror_placeholder`, a slash and `path`. The placeholder is inserted verbatim inside the
/// string literal, so it can be a URL or an interpolation such as `${mirror}`.
pub fn nix_package_set(pkgs: &[Package], mirror_placeholder: &str) -> String {
    let mut sorted: Vec<(&Package, &Install)> =
        pkgs.iter().filter_map(|package| package.install.as_ref().map(|install| (package, install))).collect();
    sorted.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let mut out = String::from("[\n");
    for (package, install) in sorted {
        let path = nix_string_body(&install.path);
        out.push_str(&format!(
            "  {{ name = \"{}\"; path = \"{path}\"; url = \"{mirror_placeholder}/{path}\"; sha512 = \"{}\"; size = {}; }}\n",
            nix_string_body(&package.name),
            install.sha512,
            install.size,
        ));
    }
    out.push(']');
    out
}

/// The inside of a Nix double-quoted string.
fn nix_string_body(value: &str) -> String {
    value.replace('\\', r"\\").replace('"', "\\\"").replace("${", "\\${")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../../tests/fixtures/setup.ini");

    fn fixture() -> SetupIni {
        SetupIni::parse(FIXTURE).expect("fixture parses")
    }

    fn names(packages: &[Package]) -> Vec<&str> {
        packages.iter().map(|package| package.name.as_str()).collect()
    }

    #[test]
    fn parses_the_fixture() {
        let ini = fixture();
        assert_eq!(ini.packages.len(), 19);
        let openssh = &ini.packages["openssh"];
        assert_eq!(openssh.version.as_deref(), Some("9.9p1-1"));
        assert_eq!(openssh.sdesc.as_deref(), Some("The OpenSSH server and client programs"));
        assert_eq!(openssh.categories, ["Net"]);
        assert_eq!(
            openssh.depends,
            ["bash", "csih", "cygrunsrv", "cygwin", "diffutils", "editrights", "libcrypt2", "libssl3", "zlib0"]
        );
        let install = openssh.install.as_ref().expect("install line");
        assert_eq!(install.path, "x86_64/release/openssh/openssh-9.9p1-1-x86_64.tar.xz");
        assert_eq!(install.size, 1_265_140);
        assert_eq!(install.sha512.len(), 128);
        let ldesc = openssh.ldesc.as_deref().expect("ldesc");
        assert!(ldesc.starts_with("OpenSSH is a program for logging into"), "{ldesc}");
        assert!(ldesc.contains("\n\nThis package"), "blank line kept: {ldesc}");
        assert!(ldesc.ends_with("and sftp."), "{ldesc}");
    }

    #[test]
    fn only_the_current_version_counts() {
        let ini = fixture();
        // [test] has a newer cygwin with another dependency; [prev] an older openssh.
        let cygwin = &ini.packages["cygwin"];
        assert_eq!(cygwin.version.as_deref(), Some("3.6.4-1"));
        assert_eq!(cygwin.depends, ["_windows", "bash", "libgcc1", "libintl8", "zlib0"]);
        assert!(ini.packages["openssh"].depends.iter().all(|d| d != "libssl1.1"));
    }

    #[test]
    fn requires_is_the_fallback_for_depends2() {
        let ini = fixture();
        assert_eq!(ini.packages["zlib0"].depends, ["cygwin"]);
        let ini = SetupIni::parse("@ a\nrequires: b c\nversion: 1\ndepends2: d\n@ b\n").expect("ok");
        assert_eq!(ini.packages["a"].depends, ["d"]);
    }

    #[test]
    fn base_closure_holds_base_openssh_and_dependencies_but_not_extras() {
        let ini = fixture();
        let roots = base_roots(&ini, &[]);
        let roots: Vec<&str> = roots.iter().map(String::as_str).collect();
        let packages = closure(&ini, &roots).expect("closure");
        let all: Vec<&str> = ini.packages.keys().map(String::as_str).filter(|n| *n != "make").collect();
        assert_eq!(names(&packages), all);

        let roots = base_roots(&ini, &["make".to_string()]);
        let roots: Vec<&str> = roots.iter().map(String::as_str).collect();
        assert!(names(&closure(&ini, &roots).expect("closure")).contains(&"make"));
    }

    #[test]
    fn cycles_terminate() {
        let ini = fixture();
        assert!(ini.packages["bash"].depends.iter().any(|d| d == "cygwin"));
        assert!(ini.packages["cygwin"].depends.iter().any(|d| d == "bash"));
        assert_eq!(
            names(&closure(&ini, &["bash"]).expect("closure")),
            [
                "bash",
                "coreutils",
                "cygwin",
                "libgcc1",
                "libiconv2",
                "libintl8",
                "libncursesw10",
                "libreadline7",
                "zlib0"
            ]
        );
    }

    #[test]
    fn missing_dependency_names_both_packages() {
        let ini = SetupIni::parse("@ openssh\nversion: 1\ndepends2: cygwin, foo (>= 2)\n@ cygwin\nversion: 1\n")
            .expect("parses");
        assert_eq!(
            closure(&ini, &["openssh"]).map_err(|e| e.to_string()),
            Err("cygwin package 'foo' (required by 'openssh') is not in setup.ini: the repository's setup.ini is \
                 incomplete; build cygwinRepo again"
                .to_string())
        );
        assert_eq!(
            closure(&ini, &["nope"]).map_err(|e| e.to_string()),
            Err("cygwin package 'nope' (requested for installation) is not in setup.ini: check its name in cygwinPackages"
                .to_string())
        );
    }

    #[test]
    fn virtual_names_resolve_to_providers() {
        let ini = SetupIni::parse(
            "@ tool\nversion: 1\ndepends2: perl5_036\n@ perl_base\nversion: 5.36\nprovides: perl5_036\n",
        )
        .expect("parses");
        assert_eq!(names(&closure(&ini, &["tool"]).expect("closure")), ["perl_base", "tool"]);
    }

    #[test]
    fn parse_errors_carry_line_numbers() {
        let cases: &[(&str, SetupIniError)] = &[
            ("@\n", SetupIniError::MissingPackageName { line: 1 }),
            ("@ a\n@ b\n@ a\n", SetupIniError::DuplicatePackage { name: "a".into(), line: 3 }),
            ("[prev]\n@ a\n", SetupIniError::SectionOutsidePackage { line: 1 }),
            ("@ a\nldesc: \"never\nclosed\n", SetupIniError::UnterminatedQuote { line: 2 }),
            ("@ a\nsdesc: \"x\" y\n", SetupIniError::TextAfterClosingQuote { line: 2 }),
            ("@ a\nversion: 1\nversion: 2\n", SetupIniError::DuplicateCurrentVersion { package: "a".into(), line: 3 }),
            ("@ a\ninstall: x 1\n", SetupIniError::InstallFieldCount { line: 2, found: 2 }),
            (
                "@ a\ninstall: ../../etc/passwd 1 ab\n",
                SetupIniError::UnsafeInstallPath { line: 2, path: "../../etc/passwd".into() },
            ),
            ("@ a\ninstall: x/y 1k 00\n", SetupIniError::InvalidInstallSize { line: 2, value: "1k".into() }),
            (
                "@ a\ninstall: x/y 10 d41d8cd98f00b204e9800998ecf8427e\n",
                SetupIniError::InstallHashNotSha512 { line: 2 },
            ),
            ("@ a\ndepends2: b (>= 1\n", SetupIniError::UnbalancedParentheses { line: 2 }),
        ];
        for (text, expected) in cases {
            assert_eq!(SetupIni::parse(text).as_ref(), Err(expected), "{text:?}");
        }
        assert_eq!(
            SetupIniError::UnterminatedQuote { line: 7 }.to_string(),
            "setup.ini line 7: quoted value is never closed"
        );
    }

    #[test]
    fn quoted_text_may_hold_structure_characters_and_crlf() {
        let text = "@ a\r\nldesc: \"first\r\n@ not a package\r\n[prev]\r\nlast\"\r\nversion: 1\r\n";
        let ini = SetupIni::parse(text).expect("parses");
        assert_eq!(ini.packages.len(), 1);
        assert_eq!(ini.packages["a"].ldesc.as_deref(), Some("first\n@ not a package\n[prev]\nlast"));
        assert_eq!(ini.packages["a"].version.as_deref(), Some("1"));
    }

    #[test]
    fn repo_layout_and_nix_set_are_sorted_and_complete() {
        let ini = fixture();
        let packages = closure(&ini, &["openssh", "bash"]).expect("closure");
        let layout = local_repo_layout(&packages);
        assert_eq!(layout.len(), packages.len());
        assert!(layout.windows(2).all(|pair| pair[0].0 < pair[1].0));
        let (path, sha512, size) =
            layout.iter().find(|(path, _, _)| path.contains("/openssh-")).expect("openssh archive");
        assert_eq!(path, "nix-winvm-mirror/x86_64/release/openssh/openssh-9.9p1-1-x86_64.tar.xz");
        assert_eq!(
            Some(sha512),
            packages.iter().find(|p| p.name == "openssh").and_then(|p| p.install.as_ref()).map(|i| &i.sha512)
        );
        assert_eq!(*size, 1_265_140);

        let nix = nix_package_set(&packages, "${mirror}");
        assert!(nix.starts_with("[\n  { name = \"bash\"; path = \"x86_64/release/bash/"));
        assert!(nix.contains("url = \"${mirror}/x86_64/release/openssh/openssh-9.9p1-1-x86_64.tar.xz\"; sha512 = \""));
        assert!(nix.ends_with("; size = 103024; }\n]"), "{nix}");
        assert_eq!(nix.lines().count(), packages.len() + 2);
        assert_eq!(nix, nix_package_set(&packages, "${mirror}"));
    }

    /// tests/fuzz.rs, setup.ini: a dependency list of 100,000 distinct names took about a
    /// minute (each name was looked up in the list so far).
    #[test]
    fn a_long_dependency_list_is_read_in_linear_time() {
        let names: Vec<String> = (0..100_000).map(|i| format!("p{i}")).collect();
        let text = format!("@ a\nversion: 1\ndepends2: {}, p7 (>= 1)\n", names.join(", "));
        let started = std::time::Instant::now();
        let ini = SetupIni::parse(&text).expect("parses");
        assert_eq!(ini.packages["a"].depends, names);
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    }

    #[test]
    fn nix_strings_are_escaped() {
        assert_eq!(nix_string_body(r#"a"b\c${d}"#), r#"a\"b\\c\${d}"#);
    }
}
