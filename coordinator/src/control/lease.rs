//! Leadership confirmation for agent leases.
//!
//! Why: an agent's lease keeps its primary database writable. DESIGN.md (fencing) says
//! only a leader that has confirmed its leadership with a quorum may renew a lease, so a
//! deposed leader cut off with the old primary's region cannot keep that primary alive
//! while the majority promotes elsewhere. Confirming per heartbeat would cost one quorum
//! round per agent per second; instead this loop confirms a few times per heartbeat
//! interval and the session handler renews only while the last confirmation is fresh
//! (see [`crate::registry::Registry::leadership_confirmed_within`]).
//!
//! The confirmation time recorded is when the round STARTED, the conservative end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::Ctx;

pub struct LeaseConfirmer {
    ctx: Arc<Ctx>,
}

impl LeaseConfirmer {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        LeaseConfirmer { ctx }
    }

    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let interval = self.ctx.config.agents.heartbeat_interval;
        let every = (interval / 3).max(Duration::from_millis(20));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let started = Instant::now();
            // A read-only round: safe to abandon on timeout.
            match tokio::time::timeout(interval, self.ctx.node.ensure_linearizable()).await {
                Ok(Ok(())) => self.ctx.registry.confirm_leadership(started),
                Ok(Err(e)) if e.is_fatal() => return Err(e.into()),
                Ok(Err(e)) => debug!(error = %e, "leadership not confirmed"),
                Err(_) => debug!(waited = ?interval, "leadership confirmation timed out"),
            }
        }
    }
}
