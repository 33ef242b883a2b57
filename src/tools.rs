//! Finding the programs the builder runs (QEMU, vde_switch, smbd, busybox, dropbear, ...).
//! In a build, they come from the tools closure the derivation names (`winvmTools`, a store
//! path made by scripts/tools-closure, or nix/package.nix's `winvm-tools`), so the sandbox
//! needs nothing from the host. Outside Nix (tests, `nix-winvm-builder run`) `NIX_WINVM_TOOLS`
//! (a PATH), PATH and the usual system folders are searched.

use std::path::{Path, PathBuf};

const FALLBACK: &[&str] = &["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin", "/usr/local/sbin"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot find '{name}' (searched {searched}); {hint}")]
pub struct MissingTool {
    pub name: String,
    pub searched: String,
    /// What to do: it depends on where the tools come from (see [`Source`]).
    pub hint: String,
}

/// Where the tools come from, which decides what a missing one's error says to do. Only on
/// Debian does scripts/setup exist and work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A build's tools closure made by scripts/tools-closure (the derivation names its
    /// libraries, `winvmToolsLib`): the Debian route.
    DebianClosure(String),
    /// A build's tools closure of nix/package.nix (`winvm-tools`, no `winvmToolsLib`).
    PackageClosure(String),
    /// The host's programs (tests, `run`), on Debian (`/etc/debian_version`).
    DebianHost,
    /// The host's programs elsewhere (NixOS, another distribution).
    OtherHost,
}

/// Debian (or a derivative) has this file; scripts/setup needs it.
pub const DEBIAN_VERSION: &str = "/etc/debian_version";

impl Source {
    /// This process's: a build's closure, or the host.
    pub fn detect() -> Source {
        match std::env::var("winvmTools") {
            Ok(tools) if std::env::var_os("winvmToolsLib").is_some() => Source::DebianClosure(tools),
            Ok(tools) => Source::PackageClosure(tools),
            Err(_) if Path::new(DEBIAN_VERSION).is_file() => Source::DebianHost,
            Err(_) => Source::OtherHost,
        }
    }

    /// What to do when `name` (a program, or `OVMF`) is missing.
    pub fn hint(&self, name: &str) -> String {
        let package = nixpkgs_package(name);
        match self {
            Source::DebianClosure(tools) => format!(
                "the tools closure {tools} (scripts/tools-closure's) lacks it: run scripts/setup on the host again, then scripts/register"
            ),
            Source::PackageClosure(tools) => {
                format!("the tools closure {tools} (nix/package.nix's winvm-tools) lacks it: its tools list needs nixpkgs' {package}")
            }
            Source::DebianHost => "run scripts/setup".into(),
            Source::OtherHost => {
                format!("install nixpkgs' {package} (or your distribution's) and put it on PATH, or name its folder in NIX_WINVM_TOOLS (a PATH)")
            }
        }
    }
}

/// The nixpkgs package that has `name` (nix/package.nix's tools list).
pub fn nixpkgs_package(name: &str) -> &'static str {
    match name {
        "qemu-system-x86_64" | "qemu-img" => "qemu_kvm",
        "vde_switch" => "vde2",
        "smbd" => "samba",
        "busybox" => "pkgsStatic.busybox",
        "dropbear" => "dropbear",
        "ssh-keygen" => "openssh",
        "xz" => "xz",
        "mke2fs" => "e2fsprogs",
        "mformat" | "mmd" | "mcopy" => "mtools",
        "sha512sum" => "coreutils",
        "xorriso" => "xorriso",
        "python3" => "python3",
        OVMF => "OVMF.fd",
        _ => "package that has it",
    }
}

/// [`MissingTool::name`] of the UEFI firmware.
const OVMF: &str = "OVMF (UEFI firmware, for efi = true)";

fn search_path() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    // The tools closure a derivation names (scripts/tools-closure; the plugin sets it).
    if let Some(tools) = std::env::var_os("winvmTools") {
        dirs.extend(["bin", "sbin"].map(|d| Path::new(&tools).join(d)));
    }
    for var in ["NIX_WINVM_TOOLS", "PATH"] {
        if let Some(v) = std::env::var_os(var) {
            dirs.extend(std::env::split_paths(&v).filter(|p| p.is_absolute()));
        }
    }
    dirs.extend(FALLBACK.iter().map(PathBuf::from));
    dirs
}

pub fn find(name: &str) -> Result<PathBuf, MissingTool> {
    let dirs = search_path();
    for d in &dirs {
        let candidate = d.join(name);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(MissingTool {
        name: name.into(),
        searched: dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":"),
        hint: Source::detect().hint(name),
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// For tests: whether `what` (a program, a file the set-up provides) is there. Without it a
/// test returns early, and says so, unless NIX_WINVM_REQUIRE_TOOLS=1 (scripts/test sets it):
/// then the missing piece fails the test by name, so that no test passes by skipping.
#[doc(hidden)]
pub fn test_requires(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if std::env::var_os("NIX_WINVM_REQUIRE_TOOLS").is_some_and(|v| v == "1") {
        panic!("this test needs {what}, which is missing (NIX_WINVM_REQUIRE_TOOLS=1)");
    }
    eprintln!("skipped: {what} is missing");
    false
}

/// UEFI firmware (`efi = true`): OVMF's code, read-only, and the template of its variable
/// store, which each image copies and keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ovmf {
    pub code: PathBuf,
    pub vars_template: PathBuf,
}

/// Where OVMF is, relative to a tools closure or a system: Debian's 4 MiB build, or nixpkgs'
/// `OVMF.fd` output.
const OVMF_LAYOUTS: &[(&str, &str)] =
    &[("share/OVMF/OVMF_CODE_4M.fd", "share/OVMF/OVMF_VARS_4M.fd"), ("FV/OVMF_CODE.fd", "FV/OVMF_VARS.fd")];

impl Ovmf {
    pub fn find() -> Result<Ovmf, MissingTool> {
        let mut roots: Vec<(PathBuf, &[(&str, &str)])> = Vec::new();
        if let Some(tools) = std::env::var_os("winvmTools") {
            roots.push((tools.into(), OVMF_LAYOUTS));
        }
        // Outside a build (tests, `run`): Debian's.
        roots.push(("/usr".into(), &OVMF_LAYOUTS[..1]));
        for (root, layouts) in &roots {
            for (code, vars) in layouts.iter() {
                let (code, vars_template) = (root.join(code), root.join(vars));
                if code.is_file() && vars_template.is_file() {
                    return Ok(Ovmf { code, vars_template });
                }
            }
        }
        let searched = roots
            .iter()
            .flat_map(|(r, layouts)| layouts.iter().map(move |(code, _)| r.join(code).display().to_string()))
            .collect::<Vec<_>>()
            .join(", ");
        let hint = match Source::detect() {
            Source::DebianHost => "run scripts/setup (it installs Debian's ovmf)".to_owned(),
            source => source.hint(OVMF),
        };
        Err(MissingTool { name: OVMF.into(), searched, hint })
    }
}

/// The programs one VM session needs.
#[derive(Debug, Clone)]
pub struct Tools {
    pub qemu: PathBuf,
    pub vde_switch: PathBuf,
    pub smbd: PathBuf,
    pub busybox: PathBuf,
    pub dropbear: PathBuf,
    pub ssh_keygen: PathBuf,
}

impl Tools {
    pub fn find() -> Result<Tools, MissingTool> {
        Ok(Tools {
            qemu: find("qemu-system-x86_64")?,
            vde_switch: find("vde_switch")?,
            smbd: find("smbd")?,
            busybox: find("busybox")?,
            dropbear: find("dropbear")?,
            ssh_keygen: find("ssh-keygen")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// scripts/setup is named only where it exists and works: on Debian, and for a build's
    /// closure that scripts/tools-closure made there. Elsewhere, the nixpkgs package.
    #[test]
    fn a_missing_tool_says_what_to_do_where_the_tools_come_from() {
        assert_eq!(Source::DebianHost.hint("smbd"), "run scripts/setup");
        let other = Source::OtherHost.hint("smbd");
        assert_eq!(
            other,
            "install nixpkgs' samba (or your distribution's) and put it on PATH, or name its folder in NIX_WINVM_TOOLS (a PATH)"
        );
        let debian = Source::DebianClosure("/nix/store/x-winvm-tools".into()).hint("vde_switch");
        assert!(debian.contains("run scripts/setup on the host again, then scripts/register"), "{debian}");
        let package = Source::PackageClosure("/nix/store/y-winvm-tools".into()).hint("vde_switch");
        assert_eq!(
            package,
            "the tools closure /nix/store/y-winvm-tools (nix/package.nix's winvm-tools) lacks it: its tools list needs nixpkgs' vde2"
        );
        for name in ["qemu-system-x86_64", "vde_switch", "smbd", "busybox", "dropbear", "ssh-keygen", "mke2fs", OVMF] {
            assert_ne!(nixpkgs_package(name), nixpkgs_package("no-such-tool"), "{name}");
        }
    }
}
