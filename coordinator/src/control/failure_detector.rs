//! The failure detector: decides that a host is down.
//!
//! Why here and not in the session handler: a session ending is not proof the host is
//! down (a coordinator restart or a network blip ends sessions too), and silence without
//! an ended session is what a dead host or a cut link looks like. So one loop on the
//! leader looks at the last sign of life of every host the cluster thinks is up and
//! commits `HostDown` for those silent for `down_after`.
//!
//! A newly elected leader has no heartbeat history: it counts every host's silence from
//! its own election at the earliest, so nothing is declared down before one `down_after`
//! has passed since it began to lead (DESIGN.md: a new leader counts from its election).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Ctx;
use crate::api::now_unix_ms;
use crate::state::{self, Command, HostState};

pub struct FailureDetector {
    ctx: Arc<Ctx>,
    elected_at: Instant,
}

/// A host to declare down, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub host_id: String,
    pub reason: String,
}

/// Decides which up hosts are down. Pure: `last_seen` gives a host's last heartbeat and
/// whether its session is still open.
pub fn decide(
    now: Instant,
    elected_at: Instant,
    down_after: Duration,
    up_hosts: &[String],
    last_seen: impl Fn(&str) -> Option<(Instant, bool)>,
) -> Vec<Verdict> {
    let mut out = Vec::new();
    for host in up_hosts {
        let seen = last_seen(host);
        // Silence is counted from the later of the last heartbeat and the election.
        let since = seen.map_or(elected_at, |(t, _)| t.max(elected_at));
        let silent = now.saturating_duration_since(since);
        if silent < down_after {
            continue;
        }
        let secs = silent.as_secs_f64();
        let reason = match seen {
            Some((t, true)) if t >= elected_at => format!("session open but silent for {secs:.1}s"),
            Some((t, false)) if t >= elected_at => {
                format!("session closed, no heartbeat for {secs:.1}s")
            }
            _ => format!("no session with the leader since it was elected {secs:.1}s ago"),
        };
        out.push(Verdict {
            host_id: host.clone(),
            reason,
        });
    }
    out
}

impl FailureDetector {
    pub fn new(ctx: Arc<Ctx>, elected_at: Instant) -> Self {
        FailureDetector { ctx, elected_at }
    }

    /// Cancel safety: a HostDown write in flight when cancelled may or may not commit;
    /// either is fine (the next leader re-evaluates).
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let cfg = &self.ctx.config.agents;
        let down_after = cfg.down_after;
        let every = (down_after / 4)
            .min(cfg.heartbeat_interval)
            .max(Duration::from_millis(50));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            if now < self.elected_at + down_after {
                continue;
            }
            let up: Vec<String> = self.ctx.node.read(|s| {
                s.hosts
                    .values()
                    .filter(|h| h.state == HostState::Up)
                    .map(|h| h.host_id.clone())
                    .collect()
            });
            let registry = &self.ctx.registry;
            let verdicts = decide(now, self.elected_at, down_after, &up, |h| {
                registry.liveness(h)
            });
            for v in verdicts {
                if cancel.is_cancelled() {
                    return Ok(());
                }
                let req = state::Request {
                    at_unix_ms: now_unix_ms(),
                    origin: super::origin(&self.ctx, "failure-detector"),
                    cmd: Command::HostDown {
                        host_id: v.host_id.clone(),
                        reason: v.reason.clone(),
                    },
                };
                match self.ctx.node.write(req).await {
                    Ok((index, state::Response::Applied)) => {
                        warn!(host = %v.host_id, reason = %v.reason, index, "host declared down");
                    }
                    Ok(_) => {}
                    Err(e) if e.is_fatal() => return Err(e.into()),
                    Err(e) => {
                        // Probably lost leadership; the outer loop will stop us if so.
                        info!(host = %v.host_id, error = %e, "could not commit host down, will retry");
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t10_decide_table() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let down_after = s(5);
        let elected = t0 + s(100);
        let hosts: Vec<String> = ["fresh", "silent", "closed", "never", "old"]
            .iter()
            .map(|h| (*h).into())
            .collect();
        let seen = |h: &str| match h {
            "fresh" => Some((t0 + s(108), true)),
            "silent" => Some((t0 + s(102), true)),
            "closed" => Some((t0 + s(101), false)),
            "never" => None,
            // Heartbeat from a previous term: counts from the election.
            "old" => Some((t0 + s(50), false)),
            _ => unreachable!(),
        };
        // (now, expected down hosts)
        let table: Vec<(Instant, Vec<&str>)> = vec![
            (t0 + s(104), vec![]),
            (t0 + s(105), vec!["never", "old"]),
            (t0 + s(106), vec!["closed", "never", "old"]),
            (t0 + s(107), vec!["silent", "closed", "never", "old"]),
            (
                t0 + s(113),
                vec!["fresh", "silent", "closed", "never", "old"],
            ),
        ];
        for (now, expected) in table {
            let got: Vec<String> = decide(now, elected, down_after, &hosts, seen)
                .into_iter()
                .map(|v| v.host_id)
                .collect();
            assert_eq!(got, expected, "at +{:?}", now - t0);
        }
        let v = decide(t0 + s(107), elected, down_after, &hosts, seen);
        assert_eq!(v[0].reason, "session open but silent for 5.0s");
        assert_eq!(v[1].reason, "session closed, no heartbeat for 6.0s");
        assert_eq!(
            v[2].reason,
            "no session with the leader since it was elected 7.0s ago"
        );
    }

    /// The grace a closed session gets: a host whose session closes and comes back within
    /// `down_after` is never judged down (so its reconnect commits nothing: `ensure_up`
    /// finds it still up with the same incarnation), and one that does not come back is
    /// judged down once `down_after` has passed since its last heartbeat.
    #[test]
    fn t20_closed_session_grace() {
        use crate::registry::{HostInfo, Registry};
        let s = Duration::from_secs;
        let t0 = Instant::now();
        let elected = t0;
        let down_after = s(5);
        let r = Registry::new();
        let hosts: Vec<String> = vec!["back".into(), "gone".into()];
        let (tx1, _rx1) = tokio::sync::mpsc::channel(1);
        let (tx2, _rx2) = tokio::sync::mpsc::channel(1);
        let (b1, _) = r.register("back", HostInfo::default(), tx1, 1, t0 + s(10), 0);
        let (g1, _) = r.register("gone", HostInfo::default(), tx2, 1, t0 + s(10), 0);
        // Both sessions close at +12 after a last heartbeat at +11.
        assert!(r.heartbeat("back", b1, t0 + s(11), 0, &[], &Default::default()));
        assert!(r.heartbeat("gone", g1, t0 + s(11), 0, &[], &Default::default()));
        r.disconnect("back", b1);
        r.disconnect("gone", g1);
        // "back" reconnects at +14 (within the grace) and heartbeats from +15 on.
        let (tx3, _rx3) = tokio::sync::mpsc::channel(1);
        let (b2, _) = r.register("back", HostInfo::default(), tx3, 1, t0 + s(14), 0);
        let mut down_at = None;
        for now in (12..=30).map(|n| t0 + s(n)) {
            if now >= t0 + s(15) {
                assert!(r.heartbeat("back", b2, now, 0, &[], &Default::default()));
            }
            let v = decide(now, elected, down_after, &hosts, |h| r.liveness(h));
            assert!(
                v.iter().all(|v| v.host_id != "back"),
                "a host that reconnected within the grace was judged down at +{:?}",
                now - t0
            );
            if down_at.is_none()
                && let Some(v) = v.iter().find(|v| v.host_id == "gone")
            {
                down_at = Some((now - t0, v.reason.clone()));
            }
        }
        assert_eq!(
            down_at,
            Some((s(16), "session closed, no heartbeat for 5.0s".to_owned())),
            "a host that does not come back is down one down_after after its last heartbeat"
        );
    }
}
