//! The one helper behind every wait: a [`Deadline`] that names what is awaited, polled by
//! [`wait_until`] (async) or [`wait_until_blocking`] (its twin for threads that block, such as
//! the agent's ssh2 steps). When it runs out, the error says what was awaited and for how long.

use std::future::Future;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timed out after {:.1} s waiting for {what}", after.as_secs_f64())]
pub struct TimedOut {
    pub what: String,
    pub after: Duration,
}

pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// A wait's own deadline. Loops that cannot be a closure (they hold a `&mut` QMP connection
/// across an await) call [`Deadline::check`] and [`Deadline::pause`] themselves.
#[derive(Debug, Clone)]
pub struct Deadline {
    what: String,
    start: Instant,
    timeout: Duration,
    interval: Duration,
}

impl Deadline {
    pub fn new(what: impl Into<String>, timeout: Duration) -> Deadline {
        Deadline { what: what.into(), start: Instant::now(), timeout, interval: POLL_INTERVAL }
    }

    /// Polls at `interval` instead of [`POLL_INTERVAL`].
    pub fn every(mut self, interval: Duration) -> Deadline {
        self.interval = interval;
        self
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn remaining(&self) -> Duration {
        self.timeout.saturating_sub(self.start.elapsed())
    }

    /// The error for this wait, as of now.
    pub fn timed_out(&self) -> TimedOut {
        TimedOut { what: self.what.clone(), after: self.start.elapsed() }
    }

    /// `Err` once the deadline has passed.
    pub fn check(&self) -> Result<(), TimedOut> {
        if self.start.elapsed() >= self.timeout {
            Err(self.timed_out())
        } else {
            Ok(())
        }
    }

    /// Sleeps one interval, never past the deadline.
    pub async fn pause(&self) {
        tokio::time::sleep(self.interval.min(self.remaining())).await;
    }

    pub fn pause_blocking(&self) {
        std::thread::sleep(self.interval.min(self.remaining()));
    }
}

/// Calls `check` until it yields `Some`, at most until `timeout` has passed.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Deadline::new(what, timeout);
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        deadline.check()?;
        deadline.pause().await;
    }
}

/// [`wait_until`] for a thread that blocks: `check` may return an error of its own, which
/// ends the wait at once (a server that exited will never listen).
pub fn wait_until_blocking<T, E, F>(deadline: &Deadline, mut check: F) -> Result<T, WaitError<E>>
where
    F: FnMut() -> Result<Option<T>, E>,
{
    loop {
        if let Some(v) = check().map_err(WaitError::Failed)? {
            return Ok(v);
        }
        deadline.check().map_err(WaitError::TimedOut)?;
        deadline.pause_blocking();
    }
}

/// Why a blocking wait ended without its value.
#[derive(Debug, PartialEq, Eq)]
pub enum WaitError<E> {
    TimedOut(TimedOut),
    Failed(E),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_wait_names_what_it_waited_for() {
        let deadline = Deadline::new("the answer", Duration::from_millis(60)).every(Duration::from_millis(10));
        let mut polls = 0;
        let err = wait_until_blocking(&deadline, || {
            polls += 1;
            Ok::<Option<()>, ()>(None)
        })
        .unwrap_err();
        let WaitError::TimedOut(t) = err else { panic!("{err:?}") };
        assert_eq!(t.what, "the answer");
        assert!(t.after >= Duration::from_millis(60), "{:?}", t.after);
        assert!((3..=10).contains(&polls), "{polls} polls");
        assert!(t.to_string().starts_with("timed out after 0."), "{t}");
    }

    #[test]
    fn blocking_wait_stops_at_the_first_failure_or_value() {
        let deadline = Deadline::new("x", Duration::from_secs(5));
        assert_eq!(wait_until_blocking(&deadline, || Err::<Option<()>, _>("gone")), Err(WaitError::Failed("gone")));
        let mut n = 0;
        assert_eq!(
            wait_until_blocking(&deadline.clone().every(Duration::from_millis(1)), || {
                n += 1;
                Ok::<_, ()>((n == 3).then_some(n))
            }),
            Ok(3)
        );
    }

    #[tokio::test]
    async fn async_wait_returns_the_value_or_the_named_timeout() {
        let mut n = 0;
        let v = wait_until("three polls", Duration::from_secs(5), || {
            n += 1;
            let v = (n == 3).then_some(n);
            async move { v }
        })
        .await;
        assert_eq!(v, Ok(3));
        let e = wait_until("never", Duration::from_millis(30), || async { None::<()> }).await.unwrap_err();
        assert_eq!(e.what, "never");
    }
}
