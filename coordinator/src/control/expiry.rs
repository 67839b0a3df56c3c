//! Command expiry: commits `ExpireCommands` when an open command passes its deadline.
//!
//! Why a controller: the state machine has no clock, so "the deadline passed" must be
//! proposed by someone; only the leader does, and only when something is actually due, so
//! an idle cluster writes nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Ctx;
use crate::api::now_unix_ms;
use crate::metrics::ResultLabels;
use crate::state::{self, Command};

/// How often deadlines are checked.
const EVERY: Duration = Duration::from_secs(1);

pub struct Expiry {
    ctx: Arc<Ctx>,
}

impl Expiry {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Expiry { ctx }
    }

    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let now = now_unix_ms();
            let due = self
                .ctx
                .node
                .read(|s| s.commands.open().any(|c| c.deadline_unix_ms <= now));
            if !due {
                continue;
            }
            let req = state::Request {
                at_unix_ms: now,
                origin: super::origin(&self.ctx, "expiry"),
                cmd: Command::ExpireCommands { now },
            };
            match self.ctx.node.write(req).await {
                Ok((index, state::Response::Expired { keys })) if !keys.is_empty() => {
                    info!(count = keys.len(), index, keys = %keys.join(","), "commands expired");
                    self.ctx
                        .metrics
                        .commands_completed_total
                        .get_or_create(&ResultLabels {
                            result: "expired".to_owned(),
                        })
                        .inc_by(keys.len() as u64);
                }
                Ok(_) => {}
                Err(e) if e.is_fatal() => return Err(e.into()),
                Err(e) => warn!(error = %e, "could not commit command expiry, will retry"),
            }
        }
    }
}
