//! Engine benchmark: timings of one cold standin session, printed as numbers.
//!
//!   cargo bench --bench engine
//!
//! Times are taken by the bench as the builder's progress lines arrive on stderr.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

struct Run {
    marks: Vec<(String, f64)>,
    total: f64,
    code: Option<i32>,
}

impl Run {
    fn at(&self, needle: &str) -> f64 {
        self.marks.iter().find(|(l, _)| l.contains(needle)).map(|(_, t)| *t).unwrap_or(f64::NAN)
    }
}

fn run(builder: &str, out: &std::path::Path, script: &str) -> Run {
    let start = Instant::now();
    let mut child = Command::new(builder)
        .args(["run", "--guest", "standin", "--accel", "tcg", "--out"])
        .arg(out)
        .args(["--", "sh", "-c", script])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the builder");
    let mut marks = vec![];
    for line in BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok) {
        marks.push((line, start.elapsed().as_secs_f64()));
    }
    let code = child.wait().unwrap().code();
    Run { marks, total: start.elapsed().as_secs_f64(), code }
}

fn main() {
    let builder = env!("CARGO_BIN_EXE_nix-winvm-builder");
    let out = tempfile::tempdir().unwrap();
    let first = run(builder, out.path(), "echo FIRST-COMMAND; true");
    assert_eq!(first.code, Some(0), "{:#?}", first.marks);
    let write = run(builder, out.path(), "dd if=/dev/zero of=$out/big bs=1M count=50 2>/dev/null; sync");
    assert_eq!(write.code, Some(0), "{:#?}", write.marks);

    println!("engine benchmark (standin guest, TCG, cold boot, one run each)");
    println!("  builder start -> switch ready        {:6.2} s", first.at("switch up"));
    println!("  builder start -> both QEMUs up       {:6.2} s", first.at("controller up"));
    println!("  builder start -> guest SSH ready     {:6.2} s", first.at("ssh ready"));
    println!("  builder start -> first guest output  {:6.2} s", first.at("FIRST-COMMAND"));
    println!("  end-to-end time of `true`            {:6.2} s", first.total);
    let cmd_true = first.at("command exited") - first.at("ssh ready");
    let cmd_write = write.at("command exited") - write.at("ssh ready");
    let secs = (cmd_write - cmd_true).max(0.001);
    println!("  50 MB to $out through the share      {:6.2} s  ({:.1} MB/s)", secs, 50.0 / secs);
}
