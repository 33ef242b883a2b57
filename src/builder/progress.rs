//! Progress lines in the build log, each with the time since the stage started.

use std::time::Instant;

#[derive(Clone, Copy)]
pub struct Progress {
    start: Instant,
    quiet: bool,
}

impl Progress {
    pub fn new() -> Progress {
        Progress { start: Instant::now(), quiet: false }
    }

    /// Says nothing, and drops the agent's lines too (`run-vm --quiet -- COMMAND`): errors
    /// are the caller's to print.
    pub fn quiet() -> Progress {
        Progress { start: Instant::now(), quiet: true }
    }

    pub fn say(&self, msg: &str) {
        if self.quiet {
            return;
        }
        eprintln!("nix-winvm: [{:6.2} s] {msg}", self.start.elapsed().as_secs_f64());
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl crate::session::Report for Progress {
    fn say(&self, line: &str) {
        Progress::say(self, line)
    }

    fn log(&self, bytes: &[u8]) {
        if !self.quiet {
            crate::session::pass_on(&mut std::io::stderr().lock(), bytes);
        }
    }
}
