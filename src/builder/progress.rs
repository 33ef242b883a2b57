//! Progress lines in the build log, each with the time since the stage started; the stage's
//! phases as Nix's structured progress (`@nix {"action":"setPhase",…}`, as stdenv sends them:
//! `nix build`'s status line shows the phase, and the build log keeps the line); and the
//! journal of both that the stage's report keeps (see `report`).

use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One line of a stage's journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Seconds since the stage started.
    pub at: f64,
    pub text: String,
    /// A phase begins here (it was also sent to Nix as one).
    #[serde(default)]
    pub phase: bool,
}

#[derive(Clone)]
pub struct Progress {
    start: Instant,
    quiet: bool,
    /// Phases go to Nix: this process is a derivation's builder (Nix gives every builder
    /// `NIX_LOG_FD`). A direct run in a terminal keeps them in its journal only.
    to_nix: bool,
    journal: Arc<Mutex<Vec<Step>>>,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            start: Instant::now(),
            quiet: false,
            to_nix: std::env::var_os("NIX_LOG_FD").is_some(),
            journal: Arc::default(),
        }
    }

    /// Says nothing, and drops the agent's lines too (`run-vm --quiet -- COMMAND`): errors
    /// are the caller's to print.
    pub fn quiet() -> Progress {
        Progress { quiet: true, ..Progress::new() }
    }

    /// Seconds since the stage started.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    pub fn say(&self, msg: &str) {
        if self.quiet {
            return;
        }
        let at = self.elapsed();
        self.record(Step { at, text: msg.to_owned(), phase: false });
        eprintln!("nix-winvm: [{at:6.2} s] {msg}");
    }

    /// A new phase of the stage: to Nix as `setPhase` (the status line of `nix build`), and
    /// into the journal. Not a log line of its own: the step that begins it is one.
    pub fn phase(&self, name: &str) {
        if self.quiet {
            return;
        }
        self.record(Step { at: self.elapsed(), text: name.to_owned(), phase: true });
        if self.to_nix {
            eprintln!("{}", set_phase_line(name));
        }
    }

    fn record(&self, step: Step) {
        if let Ok(mut journal) = self.journal.lock() {
            journal.push(step);
        }
    }

    /// Everything said and every phase so far.
    pub fn journal(&self) -> Vec<Step> {
        self.journal.lock().map(|j| j.clone()).unwrap_or_default()
    }
}

/// Nix's structured progress line for a phase: `@nix {"action":"setPhase","phase":NAME}`. A
/// builder's line that starts with `@nix ` is read as JSON by Nix (2.4 and later) and kept in
/// the build log as it is.
pub fn set_phase_line(name: &str) -> String {
    let message = serde_json::json!({ "action": "setPhase", "phase": name });
    format!("@nix {message}")
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

    fn phase(&self, name: &str) {
        Progress::phase(self, name)
    }

    fn log(&self, bytes: &[u8]) {
        if !self.quiet {
            crate::session::pass_on(&mut std::io::stderr().lock(), bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_is_the_json_line_nix_reads() {
        let line = set_phase_line("install: copying the \"system\"");
        let json = line.strip_prefix("@nix ").expect("Nix reads only lines that start with '@nix '");
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["action"], "setPhase");
        assert_eq!(v["phase"], "install: copying the \"system\"");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn the_journal_keeps_steps_and_phases_in_order_and_quiet_keeps_none() {
        let p = Progress::new();
        p.phase("install");
        p.say("installer VM started");
        let j = p.journal();
        assert_eq!(
            j.iter().map(|s| (s.text.as_str(), s.phase)).collect::<Vec<_>>(),
            [("install", true), ("installer VM started", false)]
        );
        assert!(j[0].at <= j[1].at);
        let q = Progress::quiet();
        q.say("x");
        q.phase("y");
        assert!(q.journal().is_empty());
    }
}
