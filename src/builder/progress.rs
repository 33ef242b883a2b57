//! Progress lines in the build log, each with the time since the stage started.

use std::time::{Duration, Instant};

#[derive(Clone, Copy)]
pub struct Progress {
    start: Instant,
}

impl Progress {
    pub fn new() -> Progress {
        Progress { start: Instant::now() }
    }

    pub fn say(&self, msg: &str) {
        eprintln!("nix-winvm: [{:6.2} s] {msg}", self.start.elapsed().as_secs_f64());
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
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
}
