//! The one helper behind every wait: poll a condition until a deadline, and say what was
//! awaited when it runs out.

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedOut {
    pub what: String,
    pub after: Duration,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "timed out after {:.1} s waiting for {}", self.after.as_secs_f64(), self.what)
    }
}

impl std::error::Error for TimedOut {}

pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Calls `check` until it yields `Some`, at most until `timeout` has passed.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if start.elapsed() >= timeout {
            return Err(TimedOut { what: what.into(), after: start.elapsed() });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
