//! Leader-only drill scheduler: starts the `[[restore.drills]]` of the backup policy at
//! their cron slots (the spec's weekly "Backup Restore Test").
//!
//! Why no state of its own: a drill is an operation whose request id is derived from the
//! slot (`drill-<name>-<slot label>`), and creating an operation with an existing request id
//! is `Unchanged`, so two leaders (or one leader retrying) start a slot's drill once. A slot
//! missed while there was no leader runs when a leader exists within [`CATCH_UP`] after it;
//! later than that it is skipped until the next slot (a drill at an unexpected hour would
//! load a production host). A slot from before the schedule was applied is not "missed"
//! (`Catalog::drill_since`): it never runs. Failures to start (no backup yet, host down) are retried once
//! per leader term, not every tick, and logged.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use chrono_tz::Tz;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::scheduler::cron::{Cron, slot_label};
use crate::Ctx;
use crate::state::operations::restore::DrillPolicy;

const TICK: Duration = Duration::from_secs(10);
/// How late a drill slot may still start.
pub const CATCH_UP: chrono::Duration = chrono::Duration::hours(1);

pub struct DrillScheduler {
    ctx: Arc<Ctx>,
    origin: String,
}

/// The request id of `drill`'s slot.
pub fn request_id(drill: &DrillPolicy, label: &str) -> String {
    format!("drill-{}-{label}", drill.name)
}

impl DrillScheduler {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        let origin = super::origin(&ctx, "drill_scheduler");
        DrillScheduler { ctx, origin }
    }

    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut tried: HashSet<String> = HashSet::new();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let Some(policy) = self.ctx.node.read(|s| s.catalog.policy.clone()) else {
                continue;
            };
            let Ok(tz) = Tz::from_str(&policy.timezone) else {
                continue;
            };
            let now = Utc::now();
            for d in &policy.restore.drills {
                if d.cron.is_empty() {
                    continue;
                }
                let Ok(cron) = Cron::parse(&d.cron) else {
                    continue;
                };
                let Some(slot) = cron.latest_at_or_before(tz, now) else {
                    continue;
                };
                if now - slot > CATCH_UP {
                    continue;
                }
                // A slot from before this schedule was applied is not a missed slot.
                let key = crate::state::catalog::drill_schedule_key(d);
                let since = self
                    .ctx
                    .node
                    .read(|s| s.catalog.drill_since.get(&key).copied());
                if since.is_some_and(|t| slot.timestamp_millis() < t) {
                    continue;
                }
                let rid = request_id(d, &slot_label(tz, slot));
                let exists = self
                    .ctx
                    .node
                    .read(|s| s.ops.operations.values().any(|o| o.request_id == rid));
                if exists || !tried.insert(rid.clone()) {
                    continue;
                }
                info!(drill = %d.name, db = %d.db, slot = %slot, "starting scheduled drill");
                if let Err(e) =
                    crate::api::restore::start_drill(&self.ctx, &self.origin, &d.db, &d.host, &rid)
                        .await
                {
                    warn!(drill = %d.name, error = %e, "scheduled drill could not start");
                }
            }
        }
    }
}
