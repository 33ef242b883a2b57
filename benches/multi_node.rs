//! Tests with several machines: the time from `nix-build` to the first command on two nodes
//! (a `windowsTest` whose script starts both and runs one command on each), against one build
//! on the same image (a `windowsDerivation` whose script prints a line). Both are real
//! nix-builds in the sandbox, evaluation included, on the cached standin image under TCG; each
//! is made new by a token. Runs alternate; the median of each is printed.
//!
//!   cargo bench --bench multi_node
//!   MULTI_NODE_RUNS=5 cargo bench --bench multi_node
//!
//! Needs what scripts/setup installs (the tools closure with Python); builds (or reuses) the
//! standin image in /nix/store.

#[path = "common.rs"]
mod common;

use common::{derivation, nix, nix_build, run_stamped, IMAGE};

fn library() -> String {
    format!("{}/nix", env!("CARGO_MANIFEST_DIR"))
}

fn two_node_test(token: &str) -> String {
    format!(
        r#"(import {lib} {{ }}).windowsTest {{
  name = "bench-two-nodes";
  nodes = {{ server = {IMAGE}; client = {IMAGE}; }};
  testScript = ''
    # {token}
    start_all()
    server.succeed("true")
    log("FIRST-NODE-" + "RAN")
    client.succeed("true")
    log("BOTH-NODES-" + "RAN")
  '';
}}"#,
        lib = library()
    )
}

/// Seconds from nix-build's spawn to the first line holding `marker`, and to nix-build's exit.
fn measure(expr: &str, markers: &[&str]) -> (Vec<f64>, f64) {
    let mut cmd = nix("nix-build");
    cmd.args(["--no-out-link", "-E", expr]);
    let run = run_stamped(cmd);
    assert!(run.status.success(), "nix-build failed:\n{}", run.log());
    let at = markers
        .iter()
        .map(|m| {
            run.lines
                .iter()
                .find(|l| l.text.contains(m))
                .map(|l| l.arrival)
                .unwrap_or_else(|| panic!("no '{m}' in:\n{}", run.log()))
        })
        .collect();
    (at, run.exit)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("MULTI_NODE_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    // The image (and the plugin's first load) outside the clock.
    let (_, warm) = nix_build(&derivation("multi-node-warm", "mkdir $out"));
    println!("image ready ({warm:.1} s, a build on it included)");
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let (mut build_first, mut build_exit) = (vec![], vec![]);
    let (mut test_first, mut test_both, mut test_exit) = (vec![], vec![], vec![]);
    for i in 0..runs {
        let (at, exit) = measure(
            &derivation(&format!("multi-node-{stamp}-{i}"), "echo FIRST-OUTPUT; mkdir $out"),
            &["FIRST-OUTPUT"],
        );
        build_first.push(at[0]);
        build_exit.push(exit);
        let (at, exit) = measure(&two_node_test(&format!("{stamp}-{i}")), &["FIRST-NODE-RAN", "BOTH-NODES-RAN"]);
        test_first.push(at[0]);
        test_both.push(at[1]);
        test_exit.push(exit);
        println!(
            "run {}: one build: first output {:.2} s, exit {:.2} s; two nodes: first command {:.2} s, on both {:.2} s, exit {:.2} s",
            i + 1,
            build_first[i],
            build_exit[i],
            test_first[i],
            test_both[i],
            test_exit[i]
        );
    }
    let (b, t) = (median(build_first), median(test_both));
    println!("median of {runs}, from nix-build's start (evaluation included), TCG, standin:");
    println!(
        "  one build on the image:        first output      {b:6.2} s   nix-build done {:6.2} s",
        median(build_exit)
    );
    println!("  windowsTest with two nodes:    first command     {:6.2} s", median(test_first));
    println!(
        "                                 a command on both {t:6.2} s   nix-build done {:6.2} s",
        median(test_exit)
    );
    println!("  two nodes / one build (to the first command on both): {:.2}x", t / b);
}
