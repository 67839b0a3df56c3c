//! The dispatcher: pushes committed decisions about commands to live agent sessions.
//!
//! Why a loop on `applied()` rather than the RunAction handler sending directly: the
//! handler may run on a follower, and the log is the only place every issued command is
//! guaranteed to appear. Newly issued commands (by their issue log index) are sent to the
//! target's session; commands that left the open set as cancelled or expired get a
//! `CancelCommand`. Sends never wait: a full or closed session is skipped, and the agent
//! gets every open command again when its session (re)starts.
//!
//! No gap with session start: a session registers first and then reads the open
//! commands; the dispatcher reads the state first and then looks up sessions.

use std::collections::BTreeMap;
use std::sync::Arc;

use dr_proto::pb::{self, coordinator_message::Msg};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::Ctx;
use crate::state::CommandState;

pub struct Dispatcher {
    ctx: Arc<Ctx>,
}

impl Dispatcher {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Dispatcher { ctx }
    }

    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut applied = self.ctx.node.applied();
        // Commands issued up to now reach agents when their sessions start (agents can
        // only connect to a leader, and we just became it).
        let mut high_water = *applied.borrow_and_update();
        let mut open: BTreeMap<String, String> = self.ctx.node.read(|s| {
            s.commands
                .open()
                .map(|c| (c.key.clone(), c.host_id.clone()))
                .collect()
        });
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                changed = applied.changed() => if changed.is_err() { return Ok(()) },
            }
            let seen = *applied.borrow_and_update();
            let (new, now_open, closed) = self.ctx.node.read(|s| {
                let now_open: BTreeMap<String, String> = s
                    .commands
                    .open()
                    .map(|c| (c.key.clone(), c.host_id.clone()))
                    .collect();
                let mut new: Vec<(String, pb::Command, u64)> = s
                    .commands
                    .open()
                    .filter(|c| c.issued_index > high_water && c.state == CommandState::Pending)
                    .map(|c| (c.host_id.clone(), c.to_wire(), c.issued_index))
                    .collect();
                new.sort_by_key(|(_, _, i)| *i);
                let closed: Vec<(String, String, String)> = open
                    .iter()
                    .filter(|(k, _)| !now_open.contains_key(*k))
                    .filter_map(|(k, h)| {
                        let c = s.commands.get(k)?;
                        matches!(c.state, CommandState::Cancelled | CommandState::Expired)
                            .then(|| (k.clone(), h.clone(), c.reason.clone()))
                    })
                    .collect();
                (new, now_open, closed)
            });
            open = now_open;
            for (host, cmd, index) in new {
                high_water = high_water.max(index);
                self.push(&host, Msg::Command(cmd));
            }
            high_water = high_water.max(seen);
            for (key, host, reason) in closed {
                self.push(&host, Msg::Cancel(pb::CancelCommand { key, reason }));
            }
        }
    }

    fn push(&self, host: &str, msg: Msg) {
        let Some(tx) = self.ctx.registry.sender(host) else {
            debug!(%host, "no live session, message waits for the next session");
            return;
        };
        if tx
            .try_send(Box::new(Ok(pb::CoordinatorMessage { msg: Some(msg) })))
            .is_err()
        {
            debug!(%host, "session full or closed, message waits for the next session");
        }
    }
}
