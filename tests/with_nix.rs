//! scripts/with-nix hands nix-winvm's variables to a modern Nix's root whole: a `NIX_CONFIG` of
//! several lines, one of them ending in `=`, reaches that Nix as it was given.
#![cfg(feature = "plugin")]

use std::path::Path;
use std::process::Command;

#[test]
fn a_multi_line_nix_config_reaches_each_modern_nix_whole() {
    let cache = std::env::var("NIX_WINVM_CACHE").unwrap_or_else(|_| "/var/cache/nix-winvm".into());
    for version in ["2.26", "2.34"] {
        let root = Path::new(&cache).join(format!("roots/nix-{version}/opt"));
        if !nix_winvm::testing::test_requires(&format!("the Nix {version} root (scripts/setup)"), root.is_dir()) {
            continue;
        }
        let config = "sandbox = true\nbuild-users-group =\nsubstituters =\nconnect-timeout = 7\n";
        let o = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/with-nix"))
            .args([version, "--", "nix", "--extra-experimental-features", "nix-command", "config", "show"])
            .env("NIX_CONFIG", config)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "Nix {version}: with-nix failed:\n{err}");
        let lines: Vec<&str> = out.lines().collect();
        for want in ["connect-timeout = 7", "build-users-group = ", "substituters = ", "sandbox = true"] {
            assert!(lines.contains(&want), "Nix {version}: no line '{want}' in its configuration:\n{out}\n{err}");
        }
    }
}
