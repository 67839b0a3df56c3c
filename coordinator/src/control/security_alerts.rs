//! Security monitoring on the coordinator side: keeps the TLS layer's revocation set equal
//! to the committed one, turns refused handshakes and changed-file reports into alerts,
//! and pushes the monitoring level to agents.
//!
//! Why it runs on EVERY node, not only the leader: each coordinator terminates its own TLS
//! connections, so each one must refuse revoked certificates (a follower that missed the
//! revocation would let an old agent certificate in) and each one sees its own refused
//! handshakes. The alert itself is one committed command, proposed through the leader,
//! so it lands in the audit log and `drctl status` once, whichever node saw it.
//!
//! Rate limits: a source raises at most one refused-handshake alert per window per node;
//! an integrity alert is raised once per (host, set of changed-file details), so a file
//! that stays changed does not alert on every heartbeat. Pushing the level is retried at
//! most every [`PUSH_RETRY`] per host.
//!
//! Leader-only parts (integrity alerts, level push) read the leader's live registry.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dr_proto::pb;
use dr_proto::tls::ServerTls;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Ctx;
use crate::api::now_unix_ms;
use crate::state::security::SecurityCommand;
use crate::state::{self, Command, NewCommand};

const TICK: Duration = Duration::from_millis(500);
/// How long before the level is pushed again to an agent that still reports another one.
const PUSH_RETRY: Duration = Duration::from_secs(20);
/// Deadline of a level push command.
const PUSH_DEADLINE: Duration = Duration::from_secs(30);
pub const KIND_HANDSHAKES: &str = "refused-handshakes";
pub const KIND_INTEGRITY: &str = "integrity";
pub const KIND_RPCS: &str = "refused-rpcs";
/// The fact agents report their monitoring level in (`dr_agent::integrity::FACT_LEVEL`).
pub const FACT_LEVEL: &str = "security_monitoring_level";
/// The `service` of agents' integrity checks (`dr_agent::integrity::SERVICE`).
pub const INTEGRITY_SERVICE: &str = "security";

/// Sliding-window counter of refusals per source: the remote address for handshakes, the
/// caller's identity for refused RPCs (an operator certificate used from several hosts is
/// still one actor).
#[derive(Debug, Default)]
pub struct RefusalWindow {
    seen: HashMap<String, VecDeque<Instant>>,
    alerted: HashMap<String, Instant>,
}

/// An alert the window decided to raise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowAlert {
    pub source: String,
    pub count: u64,
    pub reason: String,
}

impl RefusalWindow {
    /// Records one refusal at `now`; returns an alert when `source` reached `threshold`
    /// refusals within `window` and has not alerted within the last `window`.
    pub fn record(
        &mut self,
        source: &str,
        reason: String,
        now: Instant,
        threshold: u32,
        window: Duration,
    ) -> Option<WindowAlert> {
        let q = self.seen.entry(source.to_owned()).or_default();
        q.push_back(now);
        while q
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > window)
        {
            q.pop_front();
        }
        let count = q.len() as u64;
        if count < u64::from(threshold.max(1)) {
            return None;
        }
        if self
            .alerted
            .get(source)
            .is_some_and(|t| now.saturating_duration_since(*t) <= window)
        {
            return None;
        }
        self.alerted.insert(source.to_owned(), now);
        Some(WindowAlert {
            source: source.to_owned(),
            count,
            reason,
        })
    }

    /// Forgets sources quiet for longer than `window` (bounded memory under a scan).
    pub fn prune(&mut self, now: Instant, window: Duration) {
        self.seen.retain(|_, q| {
            q.back()
                .is_some_and(|t| now.saturating_duration_since(*t) <= window)
        });
        self.alerted
            .retain(|_, t| now.saturating_duration_since(*t) <= window);
    }
}

/// One RPC refused by [`crate::api::auth::authorize`] on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRpc {
    /// The caller's SPIFFE id; `None` when the call carried no verified identity.
    pub identity: Option<String>,
    pub remote: Option<SocketAddr>,
    pub rpc: &'static str,
    pub reason: &'static str,
}

impl RefusedRpc {
    /// The window key and alert source: who, or failing that, from where.
    pub fn source(&self) -> String {
        match (&self.identity, self.remote) {
            (Some(id), _) => id.clone(),
            (None, Some(r)) => r.ip().to_string(),
            (None, None) => "unknown".to_owned(),
        }
    }
}

/// Most refusals held between two ticks; beyond it the oldest are dropped (a flood of
/// refused calls must not grow memory; the alert is raised long before this fills).
const REFUSED_RPCS_HELD: usize = 10_000;

/// Refused RPCs of this node, handed from the request path to the monitoring loop.
///
/// Why a queue and not a direct proposal: a refused call must not wait on (or be able to
/// flood) Raft; the loop counts them in its window and proposes at most one alert per
/// identity per window.
#[derive(Debug, Default)]
pub struct RefusedRpcLog {
    queue: std::sync::Mutex<VecDeque<RefusedRpc>>,
}

impl RefusedRpcLog {
    pub fn push(&self, r: RefusedRpc) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= REFUSED_RPCS_HELD {
            q.pop_front();
        }
        q.push_back(r);
    }

    pub fn drain(&self) -> Vec<RefusedRpc> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.drain(..).collect()
    }
}

/// The integrity alert detail for one host: its failing security checks, sorted.
pub fn integrity_detail(checks: &BTreeMap<String, pb::CheckResult>) -> Option<String> {
    let failing: Vec<String> = checks
        .values()
        .filter(|c| c.service == INTEGRITY_SERVICE && c.state == pb::CheckState::Failing as i32)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    (!failing.is_empty()).then(|| failing.join("; "))
}

async fn propose(ctx: &Ctx, cmd: Command) {
    let req = state::Request {
        at_unix_ms: now_unix_ms(),
        origin: super::origin(ctx, "security-monitoring"),
        cmd,
    };
    if let Err(e) = ctx.node.write(req).await {
        warn!(error = %e, "security monitoring could not commit");
    }
}

/// Runs until `cancel` fires. Spawned by the server on every node.
pub async fn run(ctx: Arc<Ctx>, tls: ServerTls, cancel: CancellationToken) {
    let mut window = RefusalWindow::default();
    let mut rpc_window = RefusalWindow::default();
    let mut revoked_seen: Option<HashSet<String>> = None;
    let mut pushed: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        // 1. Revocations: the committed set, on this node's TLS layer.
        let revoked: HashSet<String> = ctx
            .node
            .read(|s| s.security.revoked.keys().cloned().collect());
        if revoked_seen.as_ref() != Some(&revoked) {
            // Both sides: clients presenting a revoked certificate, and peers (coordinators
            // whose certificate was rotated) answering with one. Open connections of a
            // revoked certificate are closed, not only new handshakes refused.
            let cut_clients = tls.set_revoked(revoked.clone());
            let cut_servers = ctx.tls.client.set_revoked(revoked.clone());
            info!(
                revoked = revoked.len(),
                closed_client_connections = cut_clients,
                closed_peer_connections = cut_servers,
                "revocation set applied to the tls layer"
            );
            if cut_clients + cut_servers > 0 {
                warn!(
                    closed = cut_clients + cut_servers,
                    "closed open connections whose certificate is now revoked"
                );
            }
            revoked_seen = Some(revoked);
        }

        // 2. Refused handshakes at this node.
        let (threshold, window_s) = ctx
            .node
            .read(|s| (s.security.threshold(), s.security.window_s()));
        let win = Duration::from_secs(u64::from(window_s));
        let now = Instant::now();
        for r in tls.drain_refusals() {
            debug!(remote = %r.remote, reason = %r.reason, "refused handshake recorded");
            let reason = match &r.identity {
                Some(id) => format!("{id}: {}", r.reason),
                None => r.reason.clone(),
            };
            if let Some(a) = window.record(&r.remote.ip().to_string(), reason, now, threshold, win)
            {
                warn!(source = %a.source, count = a.count, window_s, "repeated refused handshakes: raising an alert");
                propose(
                    &ctx,
                    Command::Security(SecurityCommand::RaiseAlert {
                        kind: KIND_HANDSHAKES.into(),
                        source: a.source.to_string(),
                        detail: format!(
                            "{} refused handshakes within {window_s}s at coordinator {}; last: {}",
                            a.count,
                            ctx.node.id(),
                            a.reason
                        ),
                        count: a.count,
                    }),
                )
                .await;
            }
        }
        window.prune(now, win);

        // 2b. Refused RPCs at this node, counted per identity.
        for r in ctx.metrics.refused_rpcs.drain() {
            let source = r.source();
            let last = format!(
                "{} from {} ({})",
                r.rpc,
                r.remote.map_or_else(|| "?".to_owned(), |a| a.to_string()),
                r.reason
            );
            if let Some(a) = rpc_window.record(&source, last, now, threshold, win) {
                warn!(source = %a.source, count = a.count, window_s, "repeated refused rpcs: raising an alert");
                propose(
                    &ctx,
                    Command::Security(SecurityCommand::RaiseAlert {
                        kind: KIND_RPCS.into(),
                        source: a.source,
                        detail: format!(
                            "{} refused RPCs within {window_s}s at coordinator {}; last: {}",
                            a.count,
                            ctx.node.id(),
                            a.reason
                        ),
                        count: a.count,
                    }),
                )
                .await;
            }
        }
        rpc_window.prune(now, win);
        // Every node follows the committed alerts into its own metrics.
        let wall_now = now_unix_ms();
        ctx.node
            .read(|s| ctx.metrics.observe_security(&s.security, wall_now));

        if !ctx.node.is_leader() {
            pushed.clear();
            continue;
        }
        // 3. Integrity reports (leader: the live registry) and 4. the level push. Only the
        //    hosts that need one of them are copied out of the registry.
        let level = ctx.node.read(|s| s.security.level().to_owned());
        let mut todo: Vec<(String, Option<String>, bool)> = Vec::new();
        ctx.registry.for_each(|e| {
            if !e.connected {
                return;
            }
            let detail = integrity_detail(e.checks);
            let level_differs = e.facts.get(FACT_LEVEL).is_some_and(|l| *l != level);
            if detail.is_some() || level_differs {
                todo.push((e.host_id.to_owned(), detail, level_differs));
            }
        });
        let last_integrity: HashMap<String, String> = ctx.node.read(|s| {
            todo.iter()
                .filter(|(_, detail, _)| detail.is_some())
                .filter_map(|(host, _, _)| {
                    s.security
                        .last_alert(KIND_INTEGRITY, host)
                        .map(|a| (host.clone(), a.detail.clone()))
                })
                .collect()
        });
        // 5. Isolation records follow finished isolate/unisolate commands (an approved
        //    request launches the commands without a handler waiting for them).
        let wall = now_unix_ms();
        for cmd in ctx.node.read(|s| isolation_changes(s, wall)) {
            info!(target_host = %cmd.target(), "isolation record follows a finished command");
            propose(&ctx, Command::Security(cmd)).await;
        }
        for (host, detail, level_differs) in todo {
            if let Some(detail) = detail
                && last_integrity.get(&host) != Some(&detail)
            {
                warn!(host = %host, "watched files changed on a host: raising an alert");
                propose(
                    &ctx,
                    Command::Security(SecurityCommand::RaiseAlert {
                        kind: KIND_INTEGRITY.into(),
                        source: host.clone(),
                        detail,
                        count: 1,
                    }),
                )
                .await;
            }
            if level_differs
                && pushed
                    .get(&host)
                    .is_none_or(|t| now.saturating_duration_since(*t) > PUSH_RETRY)
            {
                pushed.insert(host.clone(), now);
                info!(host = %host, level = %level, "pushing the security monitoring level");
                let deadline = now_unix_ms()
                    + i64::try_from(PUSH_DEADLINE.as_millis()).unwrap_or(i64::MAX / 4);
                propose(
                    &ctx,
                    Command::IssueCommands {
                        commands: vec![NewCommand {
                            key: format!("security-level-{}-{}", host, uuid::Uuid::new_v4()),
                            host_id: host.clone(),
                            action: pb::Action {
                                kind: Some(pb::action::Kind::Generic(pb::Generic {
                                    verb: "security-monitoring".into(),
                                    args: [("level".to_owned(), level.clone())]
                                        .into_iter()
                                        .collect(),
                                })),
                            },
                            deadline_unix_ms: deadline,
                            request_id: String::new(),
                        }],
                    },
                )
                .await;
            }
        }
    }
}

/// How long after a command finished the records follow it; until then the handler that
/// issued it (if any) commits the record itself, with the operator's reason.
const RECORD_GRACE_MS: i64 = 5_000;

/// The isolation records that disagree with the newest successful isolate/unisolate
/// command of each host.
pub fn isolation_changes(s: &state::State, now_ms: i64) -> Vec<SecurityCommand> {
    let mut latest: BTreeMap<&str, (&state::CommandRecord, bool)> = BTreeMap::new();
    for c in s.commands.iter() {
        if c.state != state::CommandState::Done || !c.result.as_ref().is_some_and(|r| r.success) {
            continue;
        }
        let Some(pb::action::Kind::Generic(g)) = &c.action.kind else {
            continue;
        };
        let isolate = match g.verb.as_str() {
            "isolate" => true,
            "unisolate" => false,
            _ => continue,
        };
        let fin = c.finished_at_unix_ms.unwrap_or(0);
        if latest
            .get(c.host_id.as_str())
            .is_none_or(|(p, _)| p.finished_at_unix_ms.unwrap_or(0) < fin)
        {
            latest.insert(c.host_id.as_str(), (c, isolate));
        }
    }
    latest
        .into_iter()
        .filter_map(|(h, (c, isolate))| {
            let fin = c.finished_at_unix_ms.unwrap_or(0);
            if now_ms - fin < RECORD_GRACE_MS {
                return None;
            }
            match (isolate, s.security.isolated.get(h)) {
                (true, None) => Some(SecurityCommand::Isolated {
                    host_id: h.to_owned(),
                    reason: format!("isolated by command {}", c.key),
                    allow_mgmt: match &c.action.kind {
                        Some(pb::action::Kind::Generic(g)) => g
                            .args
                            .get("allow")
                            .map(|a| a.split(',').map(str::to_owned).collect())
                            .unwrap_or_default(),
                        _ => Vec::new(),
                    },
                }),
                (false, Some(i)) if fin > i.since_unix_ms => Some(SecurityCommand::Unisolated {
                    host_id: h.to_owned(),
                }),
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_alerts_once_at_threshold_then_again_after_the_window() {
        let mut w = RefusalWindow::default();
        let ip = "127.0.0.9";
        let t0 = Instant::now();
        let win = Duration::from_secs(60);
        for i in 0..4 {
            assert_eq!(
                w.record(ip, "x".into(), t0 + Duration::from_secs(i), 5, win),
                None
            );
        }
        let a = w
            .record(ip, "bad ca".into(), t0 + Duration::from_secs(4), 5, win)
            .unwrap();
        assert_eq!((a.count, a.reason.as_str()), (5, "bad ca"));
        // Rate limited within the window.
        assert_eq!(
            w.record(ip, "x".into(), t0 + Duration::from_secs(5), 5, win),
            None
        );
        // Old refusals fall out of the window: one new refusal alone is below threshold.
        assert_eq!(
            w.record(ip, "x".into(), t0 + Duration::from_secs(200), 5, win),
            None
        );
        // Another source is counted apart.
        let other = "127.0.0.10";
        assert_eq!(w.record(other, "x".into(), t0, 5, win), None);
        w.prune(t0 + Duration::from_secs(400), win);
        assert!(w.seen.is_empty() && w.alerted.is_empty());
    }

    #[test]
    fn isolation_records_follow_finished_commands_after_the_grace() {
        use crate::state::{Request, apply};
        let mut s = state::State::default();
        let mut idx = 0;
        let mut run = |s: &mut state::State, at: i64, cmd: Command| {
            idx += 1;
            apply(
                s,
                idx,
                &Request {
                    at_unix_ms: at,
                    origin: "spiffe://t/operator/a?role=admin".into(),
                    cmd,
                },
            )
        };
        run(
            &mut s,
            1,
            Command::HostUp {
                host_id: "h1".into(),
                region: "r".into(),
                site: "s".into(),
                roles: vec![],
                version: "v".into(),
                incarnation: 1,
            },
        );
        let verb = |v: &str, allow: Option<&str>| pb::Action {
            kind: Some(pb::action::Kind::Generic(pb::Generic {
                verb: v.into(),
                args: allow
                    .map(|a| [("allow".to_owned(), a.to_owned())].into_iter().collect())
                    .unwrap_or_default(),
            })),
        };
        let finish = |s: &mut state::State,
                      run: &mut dyn FnMut(&mut state::State, i64, Command) -> state::Response,
                      key: &str,
                      v: &str,
                      at: i64| {
            run(
                s,
                at,
                Command::IssueCommands {
                    commands: vec![NewCommand {
                        key: key.into(),
                        host_id: "h1".into(),
                        action: verb(v, Some("10.0.0.5/32:22")),
                        deadline_unix_ms: at + 60_000,
                        request_id: String::new(),
                    }],
                },
            );
            run(
                s,
                at,
                Command::CommandCompleted {
                    key: key.into(),
                    result: pb::CommandResult {
                        key: key.into(),
                        success: true,
                        host_id: "h1".into(),
                        ..Default::default()
                    },
                },
            );
        };
        finish(&mut s, &mut run, "k1", "isolate", 1_000);
        assert!(isolation_changes(&s, 2_000).is_empty(), "within the grace");
        let c = isolation_changes(&s, 7_000);
        assert_eq!(
            c,
            vec![SecurityCommand::Isolated {
                host_id: "h1".into(),
                reason: "isolated by command k1".into(),
                allow_mgmt: vec!["10.0.0.5/32:22".into()],
            }]
        );
        run(&mut s, 7_000, Command::Security(c[0].clone()));
        assert!(isolation_changes(&s, 8_000).is_empty(), "record agrees");
        finish(&mut s, &mut run, "k2", "unisolate", 20_000);
        assert_eq!(
            isolation_changes(&s, 30_000),
            vec![SecurityCommand::Unisolated {
                host_id: "h1".into()
            }]
        );
    }

    #[test]
    fn integrity_detail_lists_failing_security_checks_only() {
        let mk = |name: &str, service: &str, state: pb::CheckState| pb::CheckResult {
            name: name.into(),
            service: service.into(),
            state: state as i32,
            detail: "changed".into(),
            ..Default::default()
        };
        let mut checks = BTreeMap::new();
        checks.insert(
            "a".into(),
            mk("integrity:/etc/a", "security", pb::CheckState::Failing),
        );
        checks.insert(
            "b".into(),
            mk("integrity:/etc/b", "security", pb::CheckState::Passing),
        );
        checks.insert("c".into(), mk("pg", "postgres", pb::CheckState::Failing));
        assert_eq!(
            integrity_detail(&checks).as_deref(),
            Some("integrity:/etc/a: changed")
        );
        checks.remove("a");
        assert_eq!(integrity_detail(&checks), None);
    }
}
