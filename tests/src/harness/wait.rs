//! `wait_until`: the only way tests synchronise with the processes they start.
//!
//! A bare `sleep` either wastes time on a fast machine or flakes on a slow one; polling a
//! predicate against a deadline does neither. On timeout the error names what was awaited
//! and the last observation (or error) of the predicate, which is usually the clue.
//!
//! Deadlines are multiplied by `DR_TEST_TIME_SCALE` (default 1.0) so a slow machine can
//! stretch every wait at once without editing tests.

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::time::Instant;
use tracing::debug;

/// `d` multiplied by `DR_TEST_TIME_SCALE` (a positive float; invalid values are ignored).
pub fn scaled(d: Duration) -> Duration {
    let scale = std::env::var("DR_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(1.0);
    d.mul_f64(scale)
}

/// Polls `pred` every `interval` until it returns `Ok(Some(value))`, then returns the value.
///
/// `Ok(None)` means "not yet"; `Err(e)` also means "not yet" but is remembered and
/// reported if the deadline passes (a refused connection while a server starts is not a
/// failure). The deadline is scaled with [`scaled`].
pub async fn wait_until<T, F, Fut>(
    what: &str,
    deadline: Duration,
    interval: Duration,
    mut pred: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = scaled(deadline);
    let start = Instant::now();
    let mut last: Option<String> = None;
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        match pred().await {
            Ok(Some(v)) => {
                debug!(what, attempts, elapsed = ?start.elapsed(), "condition met");
                return Ok(v);
            }
            Ok(None) => {}
            Err(e) => last = Some(format!("{e:#}")),
        }
        if start.elapsed() >= deadline {
            bail!(
                "timed out after {:?} ({attempts} attempts) waiting until {what}; last error: {}",
                deadline,
                last.as_deref()
                    .unwrap_or("none (the condition was simply not met)")
            );
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_value_once_predicate_holds() {
        let mut n = 0;
        let v = wait_until(
            "n reaches 3",
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                n += 1;
                let cur = n;
                async move { Ok((cur >= 3).then_some(cur)) }
            },
        )
        .await
        .unwrap();
        assert_eq!(v, 3);
    }

    #[tokio::test]
    async fn timeout_reports_what_and_last_error() {
        let err = wait_until::<(), _, _>(
            "the impossible",
            Duration::from_millis(20),
            Duration::from_millis(5),
            || async { Err(anyhow::anyhow!("connection refused")) },
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("the impossible"), "{err}");
        assert!(err.contains("connection refused"), "{err}");
    }
}
