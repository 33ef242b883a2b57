//! The local Cygwin repository, checked before it is copied onto `cygwin.img`: its setup.ini
//! must parse, and every archive of the closure the install needs (Base,
//! [`REQUIRED_PACKAGES`](cygwin::REQUIRED_PACKAGES), the image's `cygwinPackages`) must be
//! present with the size and, when `sha512sum` is available, the SHA-512 setup.ini states.
//! Cygwin's setup would otherwise find the gap in the guest, an hour into a Windows install.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use super::disk::run_tool;
use super::{names, MediaError, MediaTools};
use crate::guest::windows::cygwin::{self, SetupIni, LOCAL_SETUP_INI};
use crate::guest::windows::WindowsOptions;

/// A repository that passed the checks.
pub(super) struct Repo {
    pub(super) root: PathBuf,
    pub(super) closure: Vec<String>,
    pub(super) archive_bytes: u64,
    pub(super) hashes_checked: bool,
}

pub(super) fn inspect_repo(root: &Path, opts: &WindowsOptions, tools: &MediaTools) -> Result<Repo, MediaError> {
    let setup_exe = root.join(names::CYGWIN_SETUP_EXE);
    if !fs::metadata(&setup_exe).is_ok_and(|m| m.is_file()) {
        return Err(MediaError::RepoMissing { path: setup_exe, what: "Cygwin setup program" });
    }
    let packages_dir = root.join(names::CYGWIN_PACKAGES_DIR);
    let setup_ini = packages_dir.join(LOCAL_SETUP_INI);
    if !fs::metadata(&setup_ini).is_ok_and(|m| m.is_file()) {
        return Err(MediaError::RepoMissing { path: setup_ini, what: "setup.ini" });
    }
    let text = fs::read_to_string(&setup_ini).map_err(|source| MediaError::Read { path: setup_ini.clone(), source })?;
    let ini = SetupIni::parse(&text).map_err(|error| MediaError::SetupIni { path: setup_ini.clone(), error })?;
    let roots = cygwin::base_roots(&ini, &opts.cygwin_packages);
    let roots: Vec<&str> = roots.iter().map(String::as_str).collect();
    let closure =
        cygwin::closure(&ini, &roots).map_err(|error| MediaError::Closure { setup_ini: setup_ini.clone(), error })?;

    let mut archive_bytes = 0;
    let mut to_hash: Vec<(String, PathBuf, String)> = Vec::new();
    for package in &closure {
        let Some(install) = &package.install else {
            continue;
        };
        let path = packages_dir.join(cygwin::LOCAL_MIRROR_DIR).join(&install.path);
        let metadata = match fs::metadata(&path) {
            Ok(metadata) if metadata.is_file() => metadata,
            _ => return Err(MediaError::ArchiveMissing { package: package.name.clone(), path }),
        };
        if metadata.len() != install.size {
            return Err(MediaError::ArchiveSize {
                package: package.name.clone(),
                path,
                expected: install.size,
                found: metadata.len(),
            });
        }
        archive_bytes += install.size;
        to_hash.push((package.name.clone(), path, install.sha512.clone()));
    }
    let hashes_checked = match &tools.sha512sum {
        Some(sha512sum) => {
            check_hashes(sha512sum, &to_hash)?;
            true
        }
        None => false,
    };
    Ok(Repo {
        root: root.to_path_buf(),
        closure: closure.into_iter().map(|package| package.name).collect(),
        archive_bytes,
        hashes_checked,
    })
}

fn check_hashes(sha512sum: &Path, files: &[(String, PathBuf, String)]) -> Result<(), MediaError> {
    for batch in files.chunks(256) {
        let mut args: Vec<OsString> = vec!["--".into()];
        args.extend(batch.iter().map(|(_, path, _)| path.as_os_str().to_os_string()));
        let stdout = run_tool(sha512sum, &args)?;
        let stdout = String::from_utf8_lossy(&stdout);
        let sums: Vec<&str> = stdout
            .lines()
            // A name with a backslash or newline makes sha512sum start the line with '\'.
            .map(|line| line.trim_start_matches('\\').split_whitespace().next().unwrap_or(""))
            .collect();
        if sums.len() != batch.len() {
            return Err(MediaError::ToolOutput {
                tool: sha512sum.to_path_buf(),
                detail: format!("{} lines for {} files", sums.len(), batch.len()),
            });
        }
        for ((package, path, expected), found) in batch.iter().zip(sums) {
            if !found.eq_ignore_ascii_case(expected) {
                return Err(MediaError::ArchiveHash {
                    package: package.clone(),
                    path: path.clone(),
                    expected: expected.clone(),
                    found: found.to_string(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::guest::windows::cygwin::{base_roots, closure, local_repo_layout};
    use crate::guest::windows::media::test_util::*;
    use crate::guest::windows::media::{build_media, MEDIA_JSON, README_TXT};
    use crate::guest::windows::test_util::tool_available;
    use crate::spec::{WindowsOptions, WINDOWS_DISK_SIZE_MIB};

    const FIXTURE_INI: &str = include_str!("../../../../tests/fixtures/setup.ini");

    #[test]
    fn incomplete_or_corrupt_repositories_are_refused() {
        let Some(tools) = tools() else { return };
        let out = tempfile::tempdir().expect("temp dir");
        let mirror = format!("{}/{}", names::CYGWIN_PACKAGES_DIR, cygwin::LOCAL_MIRROR_DIR);
        let make = format!("{mirror}/x86_64/release/make/make-4.4.1-2.tar.xz");
        let with_make = image_options("Windows 10 Pro", &["make"]);
        let build = |opts: &WindowsOptions, repo: &Path| {
            build_media(opts, false, WINDOWS_DISK_SIZE_MIB, KEY, Some(repo), out.path(), &tools)
        };

        let repo = copy_repo(false);
        fs::remove_file(repo.path().join(&make)).expect("remove");
        // Without make the image does not need the archive.
        build(&image_options("Windows 10 Pro", &[]), repo.path()).expect("make not needed");
        let err = build(&with_make, repo.path()).expect_err("make missing");
        assert!(matches!(&err, MediaError::ArchiveMissing { package, .. } if package == "make"), "{err}");
        assert!(err.to_string().contains("lacks the archive of package 'make'"), "{err}");

        let repo = copy_repo(false);
        fs::write(repo.path().join(&make), "short").expect("truncate");
        let err = build(&with_make, repo.path()).expect_err("wrong size");
        assert!(matches!(err, MediaError::ArchiveSize { found: 5, .. }), "{err}");

        if tools.sha512sum.is_some() {
            let repo = copy_repo(false);
            let path = repo.path().join(&make);
            let mut bytes = fs::read(&path).expect("read");
            bytes[0] ^= 1;
            fs::write(&path, bytes).expect("corrupt");
            let err = build(&with_make, repo.path()).expect_err("wrong hash");
            assert!(matches!(&err, MediaError::ArchiveHash { package, .. } if package == "make"), "{err}");
        }

        let repo = copy_repo(false);
        let err = build(&image_options("Windows 10 Pro", &["gcc-core"]), repo.path()).expect_err("unknown");
        assert!(
            err.to_string().starts_with("cygwin package 'gcc-core' (requested for installation) is not in setup.ini"),
            "{err}"
        );

        fs::remove_file(repo.path().join(names::CYGWIN_SETUP_EXE)).expect("remove");
        let err = build(&with_make, repo.path()).expect_err("no setup");
        assert!(err.to_string().contains("has no Cygwin setup program"), "{err}");

        let empty = tempfile::tempdir().expect("temp dir");
        fs::write(empty.path().join(names::CYGWIN_SETUP_EXE), "MZ").expect("write");
        let err = build(&with_make, empty.path()).expect_err("no setup.ini");
        assert!(err.to_string().contains("has no setup.ini"), "{err}");
    }

    // --- nix/cygwin.nix against the Rust parser -------------------------------------------

    /// Why `nix-instantiate --eval` gave no value.
    #[derive(Debug, thiserror::Error)]
    enum NixEvalError {
        #[error("running nix-instantiate: {0}")]
        Run(#[from] std::io::Error),
        /// What it said on stderr (an evaluation error names the package).
        #[error("{0}")]
        Failed(String),
        #[error("its output is not JSON: {0}")]
        Json(#[from] serde_json::Error),
    }

    fn nix_eval(expr: &str) -> Result<serde_json::Value, NixEvalError> {
        let output = Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json", "-E", expr])
            .env("NIX_CONFIG", "build-users-group =")
            .output()?;
        if !output.status.success() {
            return Err(NixEvalError::Failed(String::from_utf8_lossy(&output.stderr).into_owned()));
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    fn nix_string(s: &str) -> String {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"").replace("${", "\\${"))
    }

    /// A store path that stands for the tools closure where nothing is built: without the
    /// plugin, nix/cygwin.nix's default `tools` cannot be read.
    const NO_TOOLS: &str = "\"/nix/store/00000000000000000000000000000000-winvm-tools\"";

    fn repo_expr(setup_ini: &Path, packages: &[&str], mirror: &str) -> String {
        repo_expr_with_tools(setup_ini, packages, mirror, NO_TOOLS)
    }

    /// nix/cygwin.nix's call, with `tools` (a Nix expression) and the defaults of every other
    /// argument but those the tests give.
    fn repo_expr_with_tools(setup_ini: &Path, packages: &[&str], mirror: &str, tools: &str) -> String {
        let list: Vec<String> = packages.iter().map(|p| nix_string(p)).collect();
        format!(
            "import {nix} {{ setupIni = {ini}; packages = [ {list} ]; mirror = {mirror}; setupExe = {exe}; tools = {tools}; }}",
            nix = Path::new(env!("CARGO_MANIFEST_DIR")).join("nix/cygwin.nix").display(),
            ini = setup_ini.display(),
            list = list.join(" "),
            mirror = nix_string(mirror),
            exe = fixture_repo().join(names::CYGWIN_SETUP_EXE).display(),
        )
    }

    /// Roots, closure and archives as nix/cygwin.nix computes them, next to the Rust answer.
    fn compare_with_rust(setup_ini: &Path, text: &str, packages: &[&str]) {
        let mirror = "https://mirror.invalid/cygwin/";
        let expr =
            format!("let r = {}; in {{ inherit (r) roots closure archives; }}", repo_expr(setup_ini, packages, mirror));
        let nix = nix_eval(&expr).unwrap_or_else(|e| panic!("nix-instantiate failed: {e}"));
        let ini = SetupIni::parse(text).expect("parses");
        let extra: Vec<String> = packages.iter().map(|p| p.to_string()).collect();
        let roots = base_roots(&ini, &extra);
        let root_refs: Vec<&str> = roots.iter().map(String::as_str).collect();
        let pkgs = closure(&ini, &root_refs).expect("closure");
        let names: Vec<&str> = pkgs.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(nix["roots"], serde_json::json!(roots), "roots for {packages:?}");
        assert_eq!(nix["closure"], serde_json::json!(names), "closure for {packages:?}");
        let archives: Vec<serde_json::Value> = pkgs
            .iter()
            .filter_map(|p| {
                p.install.as_ref().map(|i| {
                    serde_json::json!({
                        "name": p.name,
                        "path": i.path,
                        "url": format!("https://mirror.invalid/cygwin/{}", i.path),
                        "sha512": i.sha512,
                        "size": i.size,
                    })
                })
            })
            .collect();
        assert_eq!(nix["archives"], serde_json::json!(archives), "archives for {packages:?}");
        // The same files, where the media stage expects them.
        let layout: Vec<String> = local_repo_layout(&pkgs).into_iter().map(|(path, _, _)| path).collect();
        let mut from_nix: Vec<String> = archives
            .iter()
            .map(|a| format!("{}/{}", cygwin::LOCAL_MIRROR_DIR, a["path"].as_str().expect("path")))
            .collect();
        from_nix.sort();
        assert_eq!(from_nix, layout);
    }

    fn nix_available() -> bool {
        tool_available("nix-instantiate")
    }

    #[test]
    fn nix_closure_matches_rust_on_the_fixtures() {
        if !nix_available() {
            return;
        }
        let ini = fixtures().join("setup.ini");
        for packages in [&[][..], &["make"], &["make", "openssh", "libssl3"], &["zlib0"]] {
            compare_with_rust(&ini, FIXTURE_INI, packages);
        }
        let repo_ini = fixture_repo().join(names::CYGWIN_PACKAGES_DIR).join(LOCAL_SETUP_INI);
        let text = fs::read_to_string(&repo_ini).expect("repo setup.ini");
        compare_with_rust(&repo_ini, &text, &[]);
        compare_with_rust(&repo_ini, &text, &["make"]);
    }

    /// Labels, [curr], requires vs depends2, provides, CRLF, quoted text that looks like
    /// structure, nested version constraints.
    #[test]
    fn nix_closure_matches_rust_on_tricky_input() {
        if !nix_available() {
            return;
        }
        let sha = |c: char| c.to_string().repeat(128);
        let text = format!(
            "# header\r\nrelease: cygwin\r\n\r\n\
             @ base-a\r\ncategory: Base\r\nsdesc: \"A\"\r\nldesc: \"first line\r\n@ not-a-package\r\n[prev]\r\ndepends2: ghost\r\n\"\r\nversion: 1\r\ninstall: x86_64/release/a/a-1.tar.xz 10 {a}\r\ndepends2: lib-b (>= 1 (really)), perl5_036\r\n[prev]\r\nversion: 0\r\ninstall: x86_64/release/a/a-0.tar.xz 9 {a}\r\ndepends2: ghost\r\n\r\n\
             @ lib-b\r\ncategory: Libs\r\nrequires: lib-c\r\nversion: 1\r\ninstall: x86_64/release/b/b-1.tar.xz 11 {b}\r\n\r\n\
             @ lib-c\r\ncategory: Libs\r\nrequires: ghost\r\nversion: 1\r\ndepends2: _windows (>= 10.0)\r\n\r\n\
             @ perl-z\r\ncategory: Perl\r\nprovides: perl5_036\r\nversion: 1\r\ninstall: noarch/release/perl/z.tar.xz 12 {c}\r\n\r\n\
             @ perl-base\r\ncategory: Perl\r\nprovides: perl5_036, perl\r\nversion: 1\r\ninstall: noarch/release/perl/base.tar.xz 13 {d}\r\n\r\n\
             @ labelled\r\ncategory: Devel\r\n[curr]\r\nversion: 2\r\ninstall: x86_64/release/l/l-2.tar.xz 14 {e}\r\ndepends2: lib-c\r\n[test]\r\nversion: 3\r\ndepends2: ghost\r\n\r\n\
             @ openssh\r\ncategory: Net\r\nversion: 1\r\ninstall: x86_64/release/o/o.tar.xz 15 {f}\r\ndepends2: lib-b\r\n\r\n\
             @ cygrunsrv\r\ncategory: Admin\r\nversion: 1\r\n\r\n\
             @ uses-virtual\r\ncategory: Devel\r\nversion: 1\r\ndepends2: perl\r\n",
            a = sha('a'),
            b = sha('b'),
            c = sha('c'),
            d = sha('D'),
            e = sha('e'),
            f = sha('f'),
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("setup.ini");
        fs::write(&path, &text).expect("write");
        compare_with_rust(&path, &text, &[]);
        compare_with_rust(&path, &text, &["labelled", "uses-virtual"]);
        compare_with_rust(&path, &text, &["perl"]);
    }

    #[test]
    fn nix_reports_unknown_packages_like_rust() {
        if !nix_available() {
            return;
        }
        let ini = fixtures().join("setup.ini");
        let expr = format!("({}).closure", repo_expr(&ini, &["no-such-package"], "file:///nowhere"));
        let err = nix_eval(&expr).expect_err("unknown package").to_string();
        assert!(
            err.contains("cygwin package 'no-such-package' (requested for installation) is not in setup.ini"),
            "{err}"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let broken = dir.path().join("setup.ini");
        fs::write(&broken, "@ openssh\ndepends2: foo (>= 2)\n@ cygrunsrv\n").expect("write");
        let err = nix_eval(&format!("({}).closure", repo_expr(&broken, &[], "file:///nowhere")))
            .expect_err("missing dependency")
            .to_string();
        assert!(err.contains("cygwin package 'foo' (required by 'openssh') is not in setup.ini"), "{err}");
    }

    /// A mirror on a loopback port: python3's http.server over `root`, stopped when dropped.
    struct Mirror(std::process::Child, u16);

    impl Drop for Mirror {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn serve(root: &Path) -> Mirror {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string(), "--directory"])
            .arg(root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 runs");
        let mirror = Mirror(child, port);
        let deadline = crate::vm::wait::Deadline::new("the test mirror to listen", std::time::Duration::from_secs(20));
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            deadline.check().expect("mirror");
            deadline.pause_blocking();
        }
        mirror
    }

    /// Builds the fixture repository with nix/cygwin.nix (a real build in the sandbox, with no
    /// host path in it: the archives come from a mirror on a loopback port, the builder's shell
    /// and commands from the tools closure, by nix/cygwin.nix's defaults), then media from the
    /// result.
    #[test]
    fn nix_builds_the_fixture_repository_offline_and_media_accept_it() {
        let Some(tools) = tools() else { return };
        if !crate::tools::test_requires("nix-build", crate::tools::find("nix-build").is_ok()) {
            return;
        }
        let closure = std::fs::read_to_string(Path::new(crate::spec::DEFAULT_CACHE).join("tools/tools.path"));
        if !crate::tools::test_requires("the tools closure (scripts/setup makes it)", closure.is_ok()) {
            return;
        }
        // The closure's folder, copied into the store as `nix-store --add` put it there (the same
        // path): a garbage collection since the set-up may have removed it.
        let closure_dir = Path::new(crate::spec::DEFAULT_CACHE).join("tools/winvm-tools");
        let repo = fixture_repo();
        let server = serve(&repo);
        let mirror =
            format!("http://127.0.0.1:{}/{}/{}", server.1, names::CYGWIN_PACKAGES_DIR, cygwin::LOCAL_MIRROR_DIR);
        let ini = repo.join(names::CYGWIN_PACKAGES_DIR).join(LOCAL_SETUP_INI);
        let tools_path = format!(
            "(builtins.path {{ path = {}; name = \"winvm-tools\"; }})",
            nix_string(&closure_dir.display().to_string())
        );
        // The default shell and PATH, from the closure.
        let expr = repo_expr_with_tools(&ini, &["make"], &mirror, &tools_path);
        let output = Command::new("nix-build")
            .args(["--no-out-link", "-E", &expr])
            .env("NIX_CONFIG", include_str!("../../../../nix/sandbox.conf"))
            .output()
            .expect("nix-build runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let built = PathBuf::from(String::from_utf8(output.stdout).expect("utf-8").trim());
        let mut built_files = Vec::new();
        collect_files(&built, &built, &mut built_files);
        let mut fixture_files = Vec::new();
        collect_files(&repo, &repo, &mut fixture_files);
        assert_eq!(built_files, fixture_files);
        for rel in &built_files {
            assert_eq!(fs::read(built.join(rel)).expect("built"), fs::read(repo.join(rel)).expect("fixture"), "{rel}");
        }
        let out = tempfile::tempdir().expect("temp dir");
        let opts = image_options("Windows 11 Pro", &["make"]);
        let summary =
            build_media(&opts, true, WINDOWS_DISK_SIZE_MIB, KEY, Some(&built), out.path(), &tools).expect("media");
        assert!(summary.cygwin_packages_present && summary.cygwin_closure.contains(&"make".to_string()));
        println!("{}", fs::read_to_string(out.path().join(README_TXT)).expect("README"));
        println!("{}", fs::read_to_string(out.path().join(MEDIA_JSON)).expect("media.json"));
    }

    /// Evaluates the derivations (no build, no network): every archive is a fixed-output
    /// fetch pinned by the SHA-512 of setup.ini.
    #[test]
    fn nix_fetches_are_fixed_output_sha512() {
        if !nix_available() {
            return;
        }
        let ini = fixtures().join("setup.ini");
        let expr = format!(
            "let r = {}; links = r.drvAttrs.archiveLinks; \
             fetches = builtins.genList (i: builtins.elemAt links (2 * i + 1)) (builtins.length links / 2); in \
             {{ drv = r.drvPath; fetches = map (f: {{ inherit (f) outputHash outputHashAlgo outputHashMode url; drv = f.drvPath; }}) fetches; \
                paths = builtins.genList (i: builtins.elemAt links (2 * i)) (builtins.length links / 2); }}",
            repo_expr(&ini, &["make"], "https://mirror.invalid/cygwin")
        );
        let nix = nix_eval(&expr).unwrap_or_else(|e| panic!("nix-instantiate failed: {e}"));
        assert!(nix["drv"].as_str().expect("drv").ends_with("-cygwin-repo.drv"));
        let parsed = SetupIni::parse(FIXTURE_INI).expect("parses");
        let roots = base_roots(&parsed, &["make".to_string()]);
        let root_refs: Vec<&str> = roots.iter().map(String::as_str).collect();
        let pkgs = closure(&parsed, &root_refs).expect("closure");
        let installs: Vec<_> = pkgs.iter().filter_map(|p| p.install.as_ref()).collect();
        let fetches = nix["fetches"].as_array().expect("fetches");
        assert_eq!(fetches.len(), installs.len());
        for (fetch, install) in fetches.iter().zip(&installs) {
            assert_eq!(fetch["outputHashAlgo"], "sha512");
            assert_eq!(fetch["outputHash"], install.sha512.as_str());
            assert_eq!(fetch["outputHashMode"], "flat");
            assert_eq!(fetch["url"], format!("https://mirror.invalid/cygwin/{}", install.path).as_str());
        }
        let paths: Vec<&str> = installs.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(nix["paths"], serde_json::json!(paths));
    }
}
