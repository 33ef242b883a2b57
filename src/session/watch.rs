//! The watch loop's state machine, kept apart from the processes it watches so that every
//! path through it can be tested with made-up observations.
//!
//! A session starts [`Phase::Connecting`] (the controller waits for the guest's SSH server),
//! becomes [`Phase::Running`] when the controller says SSH is up, and ends when the
//! controller's exit file holds the command's verdict: the agent writes it last (renamed into
//! place), so the session need not wait for the controller to power off. A guest that ends before SSH was
//! reached dropped out; one that ends mid-command leaves the SSH connection hanging rather
//! than closed, so the controller gets [`GUEST_DEATH_GRACE`] to report before the guest is
//! called dead ([`Phase::GuestGone`]).

use crate::protocol::{parse_exit_file, ExitFileError, Verdict};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

pub const GUEST_DEATH_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connecting,
    Running,
    GuestGone { status: ExitStatus, since: Instant },
}

/// What the session saw on one turn of the loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// The controller has reached the guest's SSH server.
    pub ssh_ready: bool,
    pub guest_exit: Option<ExitStatus>,
    pub controller_exit: Option<ExitStatus>,
    /// The VDE switch ended: the pair can no longer reach each other.
    pub switch_exit: Option<ExitStatus>,
    /// The controller's exit file, once it has written one.
    pub exit_file: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Wait(Phase),
    Done(Verdict),
    Fail(Failure),
}

/// How a session can end without a verdict; the session adds the logs.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    GuestDroppedOut(ExitStatus),
    GuestDied(ExitStatus),
    ControllerDied(ExitStatus),
    /// The switch ended while the pair still needed it.
    SwitchDied(ExitStatus),
    /// The controller ended cleanly but wrote no exit file.
    NoExitCode,
    /// The controller's exit file says it could not run the command, or is unreadable.
    Agent(ExitFileError),
}

impl Phase {
    /// What the session is doing in this phase, as the time-out's message says it.
    pub fn doing(self) -> &'static str {
        match self {
            Phase::Connecting => "waiting for the guest's SSH server",
            Phase::Running => "running the command",
            Phase::GuestGone { .. } => "waiting for the controller's report on the dead guest",
        }
    }

    /// Whether the next step needs the exit file read: while the command runs (the verdict
    /// may be in), or once a process ended.
    pub fn needs_exit_file(self, seen: &Seen) -> bool {
        self != Phase::Connecting || seen.ssh_ready || seen.controller_exit.is_some() || seen.guest_exit.is_some()
    }

    pub fn step(self, seen: &Seen, now: Instant) -> Step {
        let mut phase = self;
        if phase == Phase::Connecting && seen.ssh_ready {
            phase = Phase::Running;
        }
        if let Some(status) = seen.guest_exit {
            match phase {
                Phase::Connecting => return Step::Fail(Failure::GuestDroppedOut(status)),
                Phase::Running => phase = Phase::GuestGone { status, since: now },
                Phase::GuestGone { .. } => {}
            }
        }
        if let Phase::GuestGone { status, since } = phase {
            if now.duration_since(since) > GUEST_DEATH_GRACE && seen.exit_file.is_none() {
                return Step::Fail(Failure::GuestDied(status));
            }
        }
        // The verdict is final once written, whatever the controller does next (it syncs and
        // powers off, which takes a while under TCG).
        if let Some(text) = &seen.exit_file {
            return match parse_exit_file(text) {
                Ok(verdict) => Step::Done(verdict),
                Err(error) => Step::Fail(Failure::Agent(error)),
            };
        }
        if let Some(status) = seen.controller_exit {
            return Step::Fail(match status.success() {
                true => Failure::NoExitCode,
                false => Failure::ControllerDied(status),
            });
        }
        // Without the switch, nothing the pair does can reach the other: no verdict will come.
        if let Some(status) = seen.switch_exit {
            return Step::Fail(Failure::SwitchDied(status));
        }
        Step::Wait(phase)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn killed() -> ExitStatus {
        ExitStatus::from_raw(libc::SIGKILL)
    }

    /// Runs the machine over `turns` (each a moment after the start and what was seen) and
    /// returns every step.
    fn run(turns: &[(u64, Seen)]) -> Vec<Step> {
        let start = Instant::now();
        let mut phase = Phase::Connecting;
        let mut steps = vec![];
        for (ms, seen) in turns {
            let step = phase.step(seen, start + Duration::from_millis(*ms));
            if let Step::Wait(next) = step {
                phase = next;
            }
            steps.push(step);
        }
        steps
    }

    fn seen(ssh_ready: bool) -> Seen {
        Seen { ssh_ready, ..Seen::default() }
    }

    #[test]
    fn a_command_runs_and_its_exit_code_is_the_verdict() {
        let done =
            Seen { ssh_ready: true, controller_exit: Some(exited(0)), exit_file: Some("3\n".into()), ..seen(true) };
        let steps = run(&[(0, seen(false)), (20, seen(true)), (40, done)]);
        assert_eq!(steps[0], Step::Wait(Phase::Connecting));
        assert_eq!(steps[1], Step::Wait(Phase::Running));
        assert_eq!(steps[2], Step::Done(Verdict::Exited(3)));
    }

    #[test]
    fn a_guest_that_ends_before_ssh_dropped_out() {
        let gone = Seen { guest_exit: Some(exited(1)), ..seen(false) };
        assert_eq!(run(&[(0, gone)]).pop(), Some(Step::Fail(Failure::GuestDroppedOut(exited(1)))));
    }

    #[test]
    fn ssh_seen_in_the_same_turn_as_the_guest_ending_is_not_a_drop_out() {
        let both = Seen { guest_exit: Some(killed()), ..seen(true) };
        assert!(matches!(run(&[(0, both)]).pop(), Some(Step::Wait(Phase::GuestGone { .. }))));
    }

    #[test]
    fn a_guest_dead_mid_command_gets_a_grace_then_is_called_dead() {
        let dead = Seen { guest_exit: Some(killed()), ..seen(true) };
        let grace = GUEST_DEATH_GRACE.as_millis() as u64;
        let steps = run(&[(0, seen(true)), (10, dead.clone()), (10 + grace, dead.clone()), (11 + grace, dead)]);
        assert!(matches!(steps[1], Step::Wait(Phase::GuestGone { .. })));
        assert!(matches!(steps[2], Step::Wait(Phase::GuestGone { .. })), "{:?}", steps[2]);
        assert_eq!(steps[3], Step::Fail(Failure::GuestDied(killed())));
    }

    #[test]
    fn the_controllers_report_wins_over_a_dead_guest() {
        let dead = Seen { guest_exit: Some(killed()), ..seen(true) };
        let reported =
            Seen { controller_exit: Some(exited(0)), exit_file: Some("signal KILL\n".into()), ..dead.clone() };
        let steps = run(&[(0, seen(true)), (10, dead), (5000, reported)]);
        assert_eq!(steps[2], Step::Done(Verdict::Signal("KILL".into())));
    }

    #[test]
    fn a_controller_without_an_exit_file_failed_or_produced_nothing() {
        let clean = Seen { controller_exit: Some(exited(0)), ..seen(true) };
        assert_eq!(run(&[(0, clean)]).pop(), Some(Step::Fail(Failure::NoExitCode)));
        let crashed = Seen { controller_exit: Some(exited(2)), ..seen(false) };
        assert_eq!(run(&[(0, crashed)]).pop(), Some(Step::Fail(Failure::ControllerDied(exited(2)))));
    }

    #[test]
    fn an_agent_error_in_the_exit_file_is_reported_as_such() {
        let text = "error authenticating with the image's key: denied\n";
        let refused = Seen { controller_exit: Some(exited(0)), exit_file: Some(text.into()), ..seen(true) };
        assert_eq!(
            run(&[(0, refused)]).pop(),
            Some(Step::Fail(Failure::Agent(ExitFileError::Agent(
                "authenticating with the image's key: denied".into()
            ))))
        );
    }

    #[test]
    fn a_switch_that_ends_fails_the_session_unless_the_verdict_is_in() {
        let cut = Seen { switch_exit: Some(killed()), ..seen(true) };
        assert_eq!(run(&[(0, seen(true)), (10, cut.clone())]).pop(), Some(Step::Fail(Failure::SwitchDied(killed()))));
        let reported = Seen { controller_exit: Some(exited(0)), exit_file: Some("0\n".into()), ..cut };
        assert_eq!(run(&[(0, reported)]).pop(), Some(Step::Done(Verdict::Exited(0))));
    }

    #[test]
    fn the_exit_file_is_read_once_the_command_runs_or_something_ended() {
        assert!(!Phase::Connecting.needs_exit_file(&seen(false)));
        assert!(Phase::Connecting.needs_exit_file(&Seen { controller_exit: Some(exited(0)), ..seen(false) }));
        assert!(Phase::Running.needs_exit_file(&seen(true)));
        let gone = Phase::GuestGone { status: killed(), since: Instant::now() };
        assert!(gone.needs_exit_file(&seen(true)));
    }

    #[test]
    fn the_verdict_ends_the_session_while_the_controller_still_powers_off() {
        let reported = Seen { exit_file: Some("0\n".into()), ..seen(true) };
        assert_eq!(run(&[(0, seen(true)), (10, reported)]).pop(), Some(Step::Done(Verdict::Exited(0))));
        let refused = Seen { exit_file: Some("error smbd: gone\n".into()), ..seen(true) };
        let failed = Failure::Agent(ExitFileError::Agent("smbd: gone".into()));
        assert_eq!(run(&[(0, refused)]).pop(), Some(Step::Fail(failed)));
    }
}
