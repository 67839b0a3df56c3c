//! Reconnect delays: exponential from `min` to `max`, with full jitter.
//!
//! Why jitter: after a coordinator failover thousands of agents lose their session at the same
//! instant; without jitter they would all dial the new leader in lockstep, every time.
//! Attempt n waits a uniformly random time in `[min, min(max, min * 2^n)]`.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff<R> {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: R,
}

impl<R: Rng> Backoff<R> {
    pub fn new(min: Duration, max: Duration, rng: R) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
            rng,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        let cap = self.min.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        if cap <= self.min {
            return self.min;
        }
        let lo = self.min.as_nanos() as u64;
        let hi = cap.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(self.rng.random_range(lo..=hi))
    }

    /// After a session that got as far as `Welcome`: start again from `min`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn grows_within_bounds_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let mut b = Backoff::new(min, max, StdRng::seed_from_u64(7));
        let mut caps_seen = Vec::new();
        for n in 0..20u32 {
            let d = b.next_delay();
            let cap = min.saturating_mul(1 << n.min(20)).min(max);
            assert!(
                d >= min && d <= cap,
                "attempt {n}: {d:?} outside [{min:?}, {cap:?}]"
            );
            caps_seen.push(d);
        }
        assert!(
            caps_seen
                .iter()
                .skip(10)
                .any(|d| *d > Duration::from_secs(1)),
            "reaches the upper range"
        );
        b.reset();
        assert_eq!(b.next_delay(), min);
    }

    #[test]
    fn jitter_spreads_agents() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let delays: Vec<Duration> = (0..50)
            .map(|seed| {
                let mut b = Backoff::new(min, max, StdRng::seed_from_u64(seed));
                for _ in 0..6 {
                    b.next_delay();
                }
                b.next_delay()
            })
            .collect();
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 40, "delays should differ between agents");
    }
}
