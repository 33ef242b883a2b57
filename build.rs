//! Two jobs. Always: Rust bindings, made with bindgen from the system's headers, for the
//! builder's own use of the kernel and of libraries: `<linux/kvm.h>` (the KVM probe) and
//! `<libvdeplug.h>` (plugging into the VDE switch), and the link to libvdeplug.
//! With the `plugin` feature: the C++ shim (cpp/) compiled against the installed Nix's headers
//! and linked into the plugin (cdylib) only: the builder binary shares the Rust code but never
//! Nix's libraries. Without that feature the crate builds without Nix.

use std::path::{Path, PathBuf};
use std::process::Command;

const NIX_PC_DIRS: &[&str] = &["/usr/lib/nix/pkgconfig"];
const HEADER_CACHE: &str = "/var/cache/nix-winvm";
const HOW_TO_INSTALL: &str = "run `scripts/setup` as root (installs Debian's nix-bin and fetches Nix's headers from Debian's nix source package), or point NIX_HEADERS_DIR at a directory containing nix/eval.hh";

fn fail(msg: &str) -> ! {
    eprintln!("\nnix-winvm build: {msg}\n");
    std::process::exit(1);
}

fn pkg_config(args: &[&str]) -> Option<String> {
    let mut path = std::env::var("PKG_CONFIG_PATH").unwrap_or_default();
    for dir in NIX_PC_DIRS {
        path = if path.is_empty() { dir.to_string() } else { format!("{path}:{dir}") };
    }
    let out = Command::new("pkg-config").args(args).env("PKG_CONFIG_PATH", path).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// "2.8.0", "2.24.15pre20240101_abcdef", "2.36.0+1" -> (2, 8, 0)
fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch: String = parts.next().unwrap_or("0").chars().take_while(|c| c.is_ascii_digit()).collect();
    Some((major, minor, patch.parse().unwrap_or(0)))
}

/// The ioctl numbers are function-like macros (`_IO(KVMIO, 0x01)`), which bindgen does not
/// expand; as enumerators, clang evaluates them and bindgen writes out the values.
const KVM_WRAPPER: &str = "#include <linux/kvm.h>
enum winvm_kvm_ioctl {
    WINVM_KVM_GET_API_VERSION = KVM_GET_API_VERSION,
    WINVM_KVM_CREATE_VM = KVM_CREATE_VM,
    WINVM_KVM_CREATE_VCPU = KVM_CREATE_VCPU,
};
";

/// Only the calls the builder makes; `vde_open` is a macro around `vde_open_real`.
const VDEPLUG_WRAPPER: &str = "#include <libvdeplug.h>\n";

fn bindings(name: &str, header: &str, allow: impl FnOnce(bindgen::Builder) -> bindgen::Builder) {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join(format!("{name}.rs"));
    let builder = bindgen::Builder::default()
        .header_contents(&format!("winvm_{name}.h"), header)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        // The crate's rust-version (Cargo.toml), so the output compiles wherever the crate does.
        .rust_target(bindgen::RustTarget::stable(75, 0).unwrap_or_else(|e| fail(&e.to_string())))
        .prepend_enum_name(false)
        .layout_tests(false);
    let generated = allow(builder).generate().unwrap_or_else(|e| {
        fail(&format!(
            "bindgen could not read {}: {e}. It needs libclang and the headers: on Debian `apt-get install libclang-dev libvdeplug-dev linux-libc-dev` (scripts/setup does it)",
            header.lines().next().unwrap_or(header)
        ))
    });
    generated.write_to_file(&out).unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", out.display())));
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    bindings("kvm", KVM_WRAPPER, |b| b.allowlist_var("KVM_API_VERSION").allowlist_type("winvm_kvm_ioctl"));
    bindings("vdeplug", VDEPLUG_WRAPPER, |b| {
        b.allowlist_function("vde_(open_real|recv|send|datafd|ctlfd|close)")
            .allowlist_type("vde_open_args")
            .allowlist_var("LIBVDEPLUG_INTERFACE_VERSION")
            .opaque_type("vdeconn")
    });
    println!("cargo:rustc-link-lib=dylib=vdeplug");

    if std::env::var_os("CARGO_FEATURE_PLUGIN").is_none() {
        // Built without the plugin feature: no C++ shim, no Nix needed.
        return;
    }
    println!("cargo:rerun-if-changed=cpp/plugin.cc");
    println!("cargo:rerun-if-changed=cpp/nix_compat.hh");
    println!("cargo:rerun-if-changed=src/plugin/ffi.rs");
    println!("cargo:rerun-if-env-changed=NIX_HEADERS_DIR");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    // Nix's nix-expr, or else Lix's lix-expr: Lix's plugin API is a second backend in
    // cpp/nix_compat.hh, chosen by NIXC_LIX (its version comes from its own lix/config.h).
    let (module, lix) = if pkg_config(&["--exists", "nix-expr"]).is_some() {
        ("nix-expr", false)
    } else if pkg_config(&["--exists", "lix-expr"]).is_some() {
        ("lix-expr", true)
    } else {
        fail(&format!(
            "Nix's development files (pkg-config module nix-expr, or lix-expr for Lix) were not found; {HOW_TO_INSTALL}."
        ))
    };
    let version = pkg_config(&["--modversion", module])
        .unwrap_or_else(|| fail(&format!("`pkg-config --modversion {module}` failed; {HOW_TO_INSTALL}.")));
    let (major, minor, patch) =
        parse_version(&version).unwrap_or_else(|| fail(&format!("cannot parse the Nix version '{version}'")));
    let cflags = pkg_config(&["--cflags", module]).unwrap_or_default();

    let mut include_dirs: Vec<PathBuf> =
        cflags.split_whitespace().filter_map(|f| f.strip_prefix("-I")).map(PathBuf::from).collect();
    let std_flag = cflags
        .split_whitespace()
        .find(|f| f.starts_with("-std="))
        .map(|f| f.trim_start_matches("-std=").to_owned())
        // Lix's .pc names no standard; Lix itself is built as C++23 (its meson.build).
        .unwrap_or_else(|| if lix { "c++23".into() } else { "c++17".into() });
    let has_headers = |dirs: &[PathBuf]| {
        dirs.iter().any(|d| {
            d.join("eval.hh").is_file()
                || d.join("nix/expr/eval.hh").is_file()
                || d.join("lix/libexpr/eval.hh").is_file()
        })
    };
    if !has_headers(&include_dirs) {
        // Debian ships Nix without headers: scripts/setup extracts them from the source package.
        let candidates: Vec<PathBuf> = match std::env::var_os("NIX_HEADERS_DIR") {
            Some(d) => vec![PathBuf::from(d)],
            None => vec![Path::new(HEADER_CACHE).join(format!("nix-headers-{version}"))],
        };
        for c in candidates {
            include_dirs.insert(0, c.join("nix"));
            include_dirs.insert(0, c);
        }
        if !has_headers(&include_dirs) {
            fail(&format!("Nix {version}'s C++ headers were not found; {HOW_TO_INSTALL}."));
        }
    }

    let mut build = cxx_build::bridge("src/plugin/ffi.rs");
    if lix {
        build.define("NIXC_LIX", "1");
        // Lix is built with clang (GCC miscompiles its coroutines); its headers are read the same way.
        if std::env::var_os("CXX").is_none() && Command::new("clang++").arg("--version").output().is_ok() {
            build.compiler("clang++");
        }
    } else {
        build
            .define("NIX_MAJOR", major.to_string().as_str())
            .define("NIX_MINOR", minor.to_string().as_str())
            .define("NIX_PATCH", patch.to_string().as_str());
    }
    build
        .file("cpp/plugin.cc")
        .std(&std_flag)
        .define("NIX_WINVM_BUILT_FOR", format!("\"{version}\"").as_str())
        .flag_if_supported("-Wno-deprecated-declarations")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-missing-field-initializers")
        .include("cpp")
        // The shim goes into the cdylib only (below), so that the builder binary never links it.
        .cargo_metadata(false);
    // Nix's headers warn under -Wextra; they are not ours to fix.
    for d in &include_dirs {
        build.flag("-isystem").flag(d.to_str().unwrap_or_else(|| fail("non-UTF-8 include path")));
    }
    for f in cflags.split_whitespace().filter(|f| !f.starts_with("-I") && !f.starts_with("-std=")) {
        build.flag(f);
    }
    build.compile("nix_winvm_shim");

    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // The static RegisterPrimOp object is referenced by nobody, so the archive must be linked
    // whole. Nix's own symbols stay undefined: they come from the `nix` process that loads us.
    println!("cargo:rustc-cdylib-link-arg=-Wl,--whole-archive");
    println!("cargo:rustc-cdylib-link-arg={}", out.join("libnix_winvm_shim.a").display());
    println!("cargo:rustc-cdylib-link-arg=-Wl,--no-whole-archive");
    println!("cargo:rustc-cdylib-link-arg=-lstdc++");
    println!("cargo:rustc-env=NIX_WINVM_NIX_VERSION={version}");
}
