//! The verbs a failover plan sends to agents: `pg.*` (the local PostgreSQL) and `traffic.*`
//! (the traffic-switching providers this host executes).
//!
//! Why a thin layer: the work lives in [`crate::pg`], [`crate::fence`] and [`crate::traffic`],
//! where it is tested against real PostgreSQL, BIND and nginx; this module only turns string
//! arguments into calls and results into the `details` map the coordinator's plan executor
//! records on the step (keys below are that contract: `checkpoint_lsn`, `timeline`,
//! `replay_lsn`, ...).
//!
//! Heartbeat facts (set by [`spawn_tasks`] every heartbeat while `[postgres]` is configured):
//! `pg.role` (primary|replica|stopped|unknown), `pg.lsn`, `pg.replay_lsn`, `pg.lag_bytes`,
//! `pg.lag_seconds`, `pg.timeline`, `pg.epoch`, `pg.fenced`, `pg.wal_receiver`,
//! `pg.system_identifier`, `pg.replicas`, and on a replica `pg.primary_end_lsn` /
//! `pg.primary_end_at` (the primary's end of WAL as last heard, kept while the receiver is
//! down: a coordinator leader elected after the primary was lost estimates the loss from it).
//!
//! Fencing epochs arrive twice on purpose: the executor refuses a command whose
//! `Command.epoch` is older than one already seen for the cluster (before anything runs), and
//! `pg.promote` persists its `epoch` argument in the data directory, so a restored or copied
//! data directory cannot be promoted under an old epoch either.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::actions::{ActionCtx, ActionOutput, Registry};
use crate::fence::Fencer;
use crate::pg::{Epoch, Lsn, PgInstance, StopMode};
use crate::traffic::{TrafficPlan, TrafficProviders};

/// What this host can do for a failover; either part may be absent.
#[derive(Clone, Default)]
pub struct FailoverParts {
    pub pg: Option<Arc<PgInstance>>,
    pub fencer: Option<Arc<Fencer>>,
    pub traffic: Option<Arc<TrafficProviders>>,
}

/// Builds the parts this host's config names. An agent without `[postgres]` or `[[traffic]]`
/// still starts; the verbs then answer what is missing.
pub fn build(config: &crate::Config) -> anyhow::Result<FailoverParts> {
    use anyhow::Context as _;
    let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    let pg = match &config.postgres {
        None => None,
        Some(cfg) => Some(Arc::new(
            PgInstance::with_env(cfg.clone(), env.clone()).context("set up [postgres]")?,
        )),
    };
    let fencer = match (&pg, &config.fence) {
        (Some(pg), fence) => Some(Arc::new(
            Fencer::new(pg.clone(), fence.clone().unwrap_or_default()).context("set up [fence]")?,
        )),
        (None, Some(_)) => {
            anyhow::bail!("[fence] needs a [postgres] table: there is nothing to fence")
        }
        (None, None) => None,
    };
    let traffic = if config.traffic.is_empty() {
        None
    } else {
        Some(Arc::new(
            TrafficProviders::from_configs(config.traffic.clone(), &env)
                .context("set up [[traffic]]")?,
        ))
    };
    Ok(FailoverParts {
        pg,
        fencer,
        traffic,
    })
}

/// Starts the self-fence (it fences a primary whose lease ran out) and the task that reports
/// PostgreSQL facts (role, LSNs, lag) with every heartbeat, which is what the coordinator picks
/// failover candidates and measures RPO from.
pub fn spawn_tasks(
    parts: &FailoverParts,
    session: &crate::session::SessionHandle,
    every: Duration,
    tasks: &tokio_util::task::TaskTracker,
    cancel: &tokio_util::sync::CancellationToken,
) {
    use tracing::Instrument as _;
    if let Some(fencer) = &parts.fencer {
        let task = crate::fence::FenceTask::new(fencer.clone(), session.lease_watch());
        let cancel = cancel.child_token();
        tasks.spawn(
            async move {
                if let Err(e) = task.run(cancel).await {
                    tracing::error!(error = format!("{e:#}"), "fence task ended");
                }
            }
            .instrument(tracing::info_span!("fence")),
        );
    }
    if let Some(pg) = &parts.pg {
        let (pg, session, cancel) = (pg.clone(), session.clone(), cancel.child_token());
        tasks.spawn(
            async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut primary_end = crate::pg::PrimaryEndMemory::default();
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    // Replace, not merge: a WAL receiver that stopped must stop being
                    // reported as streaming (the region detector waits for exactly that).
                    match pg.status().await.map(|s| primary_end.facts(&s)) {
                        Ok(facts) => session.replace_facts(
                            "pg.",
                            facts.into_iter().map(|(k, v)| (format!("pg.{k}"), v)),
                        ),
                        Err(e) => {
                            session.replace_facts(
                                "pg.",
                                [("pg.role".to_owned(), "unknown".to_owned())],
                            );
                            tracing::debug!(error = %e, "postgresql facts unavailable");
                        }
                    }
                }
            }
            .instrument(tracing::info_span!("pg_facts")),
        );
    }
}

fn arg<'a>(args: &'a HashMap<String, String>, k: &str) -> Result<&'a str, ActionOutput> {
    match args.get(k).map(String::as_str) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(ActionOutput::failed(format!("missing argument `{k}`"))),
    }
}

fn opt<'a>(args: &'a HashMap<String, String>, k: &str) -> Option<&'a str> {
    args.get(k).map(String::as_str).filter(|v| !v.is_empty())
}

fn duration_arg(
    args: &HashMap<String, String>,
    k: &str,
    default: Duration,
) -> Result<Duration, ActionOutput> {
    match opt(args, k) {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v)
            .map_err(|e| ActionOutput::failed(format!("invalid `{k}` {v:?}: {e}"))),
    }
}

fn epoch_arg(args: &HashMap<String, String>) -> Result<Epoch, ActionOutput> {
    let v = arg(args, "epoch")?;
    v.parse::<u64>().map(Epoch).map_err(|_| {
        ActionOutput::failed(format!("invalid `epoch` {v:?}: expected a whole number"))
    })
}

fn no_pg() -> ActionOutput {
    ActionOutput::failed("this agent manages no PostgreSQL: add a [postgres] table to its config")
}

macro_rules! pg_verb {
    ($reg:expr, $parts:expr, $verb:literal, $f:ident) => {{
        let pg = $parts.pg.clone();
        let fencer = $parts.fencer.clone();
        $reg.register($verb, move |args, ctx| {
            let pg = pg.clone();
            let fencer = fencer.clone();
            async move {
                match pg {
                    None => no_pg(),
                    Some(pg) => $f(&pg, fencer.as_deref(), args, ctx)
                        .await
                        .unwrap_or_else(|e| e),
                }
            }
        });
    }};
}

/// Registers `pg.*` and `traffic.*`.
pub fn register(reg: &mut Registry, parts: &FailoverParts) {
    pg_verb!(reg, parts, "pg.status", pg_status);
    pg_verb!(reg, parts, "pg.start", pg_start);
    pg_verb!(reg, parts, "pg.stop", pg_stop);
    pg_verb!(reg, parts, "pg.wait-replay", pg_wait_replay);
    pg_verb!(reg, parts, "pg.promote", pg_promote);
    pg_verb!(reg, parts, "pg.create-slot", pg_create_slot);
    pg_verb!(reg, parts, "pg.configure-standby", pg_configure_standby);
    pg_verb!(reg, parts, "pg.rewind", pg_rewind);
    pg_verb!(reg, parts, "pg.reseed", pg_reseed);
    pg_verb!(reg, parts, "pg.checkpoint", pg_checkpoint);
    pg_verb!(reg, parts, "pg.switch-wal", pg_switch_wal);
    pg_verb!(reg, parts, "pg.fence", pg_fence);
    pg_verb!(reg, parts, "pg.unfence", pg_unfence);

    let traffic = parts.traffic.clone();
    reg.register("traffic.apply", move |args, _ctx| {
        let traffic = traffic.clone();
        async move { traffic_apply(traffic, args).await }
    });
    let traffic = parts.traffic.clone();
    reg.register("traffic.status", move |_args, _ctx| {
        let traffic = traffic.clone();
        async move { traffic_status(traffic).await }
    });
}

type VerbResult = Result<ActionOutput, ActionOutput>;

fn pg_err(what: &str, e: impl std::fmt::Display) -> ActionOutput {
    ActionOutput::failed(format!("{what}: {e}"))
}

fn with_facts(
    mut out: ActionOutput,
    facts: std::collections::BTreeMap<String, String>,
) -> ActionOutput {
    out.details.extend(facts);
    out
}

async fn pg_status(
    pg: &PgInstance,
    _f: Option<&Fencer>,
    _args: HashMap<String, String>,
    _ctx: ActionCtx,
) -> VerbResult {
    let facts = pg
        .facts()
        .await
        .map_err(|e| pg_err("read postgresql status", e))?;
    let role = facts.get("role").cloned().unwrap_or_default();
    Ok(with_facts(
        ActionOutput::ok(format!("postgresql is {role}")),
        facts,
    ))
}

async fn pg_start(
    pg: &PgInstance,
    _f: Option<&Fencer>,
    _args: HashMap<String, String>,
    _ctx: ActionCtx,
) -> VerbResult {
    pg.start()
        .await
        .map_err(|e| pg_err("start postgresql", e))?;
    Ok(ActionOutput::ok("postgresql started"))
}

async fn pg_stop(
    pg: &PgInstance,
    _f: Option<&Fencer>,
    args: HashMap<String, String>,
    _ctx: ActionCtx,
) -> VerbResult {
    let mode = match opt(&args, "mode").unwrap_or("fast") {
        "fast" => StopMode::Fast,
        "smart" => StopMode::Smart,
        "immediate" => StopMode::Immediate,
        other => {
            return Err(ActionOutput::failed(format!(
                "invalid `mode` {other:?}: expected fast, smart or immediate"
            )));
        }
    };
    let r = pg
        .stop(mode)
        .await
        .map_err(|e| pg_err("stop postgresql", e))?;
    Ok(ActionOutput::ok(format!(
        "postgresql stopped ({}), final checkpoint {}",
        if r.clean { "clean" } else { "not clean" },
        r.checkpoint_lsn
    ))
    .with_detail("checkpoint_lsn", r.checkpoint_lsn.to_string())
    .with_detail("redo_lsn", r.redo_lsn.to_string())
    .with_detail("timeline", r.timeline.to_string())
    .with_detail("clean", r.clean.to_string())
    .with_detail("was_running", r.was_running.to_string()))
}

async fn pg_wait_replay(
    pg: &PgInstance,
    _f: Option<&Fencer>,
    args: HashMap<String, String>,
    ctx: ActionCtx,
) -> VerbResult {
    let lsn: Lsn = arg(&args, "lsn")?
        .parse()
        .map_err(|e| ActionOutput::failed(format!("invalid `lsn`: {e}")))?;
    let timeout = duration_arg(&args, "timeout", Duration::from_secs(60))?;
    let reached = pg
        .wait_replay(lsn, timeout, &ctx.cancel)
        .await
        .map_err(|e| pg_err(&format!("wait for replay of {lsn}"), e))?;
    Ok(ActionOutput::ok(format!("replayed up to {reached}"))
        .with_detail("replay_lsn", reached.to_string()))
}

async fn pg_promote(
    pg: &PgInstance,
    _f: Option<&Fencer>,
    args: HashMap<String, String>,
    _ctx: ActionCtx,
) -> VerbResult {
    let epoch = epoch_arg(&args)?;
    let timeline = pg
        .promote(epoch)
        .await
        .map_err(|e| pg_err("promote postgresql", e))?;
    let facts = pg.facts().await.unwrap_or_default();
    Ok(with_facts(
        ActionOutput::ok(format!(
            "promoted at epoch {}, timeline {timeline}",
            epoch.0
        )),
        facts,
    )
    .with_detail("timeline", timeline.to_string())
    .with_detail("epoch", epoch.0.to_string()))
}

async fn pg_create_slot(
    pg: &PgInstance,
    _f: Option<&Fencer>,
    args: HashMap<String, String>,
    _ctx: ActionCtx,
) -> VerbResult {
    let name = arg(&args, "name")?;
    pg.create_replication_slot(name)
        .await
        .map_err(|e| pg_err("create replication slot", e))?;
    Ok(ActionOutput::ok(format!("replication slot {name} present")))
}

async fn pg_configure_standby(
    pg: &PgInstance,
    _f: Option<&Fencer>,
    args: HashMap<String, String>,
    _ctx: ActionCtx,
) -> VerbResult {
    let primary = arg(&args, "primary")?;
    pg.configure_standby(primary, opt(&args, "slot"))
        .await
        .map_err(|e| pg_err("configure standby", e))?;
    Ok(ActionOutput::ok("configured as a standby"))
}

async fn pg_rewind(
    pg: &PgInstance,
    _f: Option<&Fencer>,
    args: HashMap<String, String>,
    _ctx: ActionCtx,
) -> VerbResult {
    let source = arg(&args, "source")?;
    let slot = opt(&args, "slot");
    match pg.rewind(source, slot).await {
        Ok(()) => {
            Ok(ActionOutput::ok("rewound and attached as a standby")
                .with_detail("method", "rewind"))
        }
        // Failback: when the history cannot be rewound (no common checkpoint, missing WAL,
        // no checksums), a full copy from the same source still makes a standby of it.
        Err(e) if opt(&args, "fallback") == Some("reseed") => {
            tracing::warn!(error = %e, "pg_rewind failed; re-seeding from the source");
            pg.reseed(source, slot)
                .await
                .map_err(|e2| pg_err(&format!("pg_rewind failed ({e}); re-seed"), e2))?;
            Ok(ActionOutput::ok(format!(
                "pg_rewind failed ({e}); re-seeded and attached as a standby"
            ))
            .with_detail("method", "reseed"))
        }
        Err(e) => Err(pg_err("pg_rewind", e)),
    }
}

async fn pg_reseed(
    pg: &PgInstance,
    _f: Option<&Fencer>,
    args: HashMap<String, String>,
    _ctx: ActionCtx,
) -> VerbResult {
    let source = arg(&args, "source")?;
    pg.reseed(source, opt(&args, "slot"))
        .await
        .map_err(|e| pg_err("re-seed from the primary", e))?;
    Ok(ActionOutput::ok("re-seeded and attached as a standby"))
}

async fn pg_checkpoint(
    pg: &PgInstance,
    _f: Option<&Fencer>,
    _args: HashMap<String, String>,
    _ctx: ActionCtx,
) -> VerbResult {
    pg.checkpoint().await.map_err(|e| pg_err("checkpoint", e))?;
    Ok(ActionOutput::ok("checkpoint done"))
}

async fn pg_switch_wal(
    pg: &PgInstance,
    _f: Option<&Fencer>,
    _args: HashMap<String, String>,
    _ctx: ActionCtx,
) -> VerbResult {
    let lsn = pg.switch_wal().await.map_err(|e| pg_err("switch wal", e))?;
    Ok(ActionOutput::ok(format!("switched wal at {lsn}")).with_detail("lsn", lsn.to_string()))
}

async fn pg_fence(
    _pg: &PgInstance,
    fencer: Option<&Fencer>,
    args: HashMap<String, String>,
    _ctx: ActionCtx,
) -> VerbResult {
    let Some(fencer) = fencer else {
        return Err(ActionOutput::failed(
            "fencing is not configured on this agent",
        ));
    };
    let reason = opt(&args, "reason").unwrap_or("fenced by the coordinator");
    let report = fencer.fence(reason).await.map_err(|e| pg_err("fence", e))?;
    Ok(ActionOutput::ok(format!("fenced: {report:?}")))
}

async fn pg_unfence(
    pg: &PgInstance,
    _f: Option<&Fencer>,
    args: HashMap<String, String>,
    _ctx: ActionCtx,
) -> VerbResult {
    let epoch = epoch_arg(&args)?;
    pg.unfence(epoch).await.map_err(|e| pg_err("unfence", e))?;
    Ok(ActionOutput::ok(format!("unfenced at epoch {}", epoch.0)))
}

async fn traffic_apply(
    traffic: Option<Arc<TrafficProviders>>,
    args: HashMap<String, String>,
) -> ActionOutput {
    let Some(traffic) = traffic else {
        return ActionOutput::failed(
            "this agent executes no traffic provider: add [[traffic]] tables to its config",
        );
    };
    let plan: TrafficPlan = match args.get("plan").map(|p| serde_json::from_str(p)) {
        Some(Ok(p)) => p,
        Some(Err(e)) => return ActionOutput::failed(format!("invalid traffic plan: {e}")),
        None => return ActionOutput::failed("missing argument `plan` (a JSON traffic plan)"),
    };
    let outcomes = traffic.apply_all(&plan, opt(&args, "provider")).await;
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.error.as_ref().map(|e| format!("{}: {e}", o.provider)))
        .collect();
    let json = serde_json::to_string(&outcomes).unwrap_or_default();
    let out = if failed.is_empty() {
        ActionOutput::ok(format!("traffic applied by {} provider(s)", outcomes.len()))
    } else {
        ActionOutput::failed(format!("traffic switch failed: {}", failed.join("; ")))
    };
    out.with_detail("outcomes", json)
        .with_detail("plan_digest", plan.digest())
}

async fn traffic_status(traffic: Option<Arc<TrafficProviders>>) -> ActionOutput {
    let Some(traffic) = traffic else {
        return ActionOutput::failed(
            "this agent executes no traffic provider: add [[traffic]] tables to its config",
        );
    };
    let outcomes = traffic.status_all().await;
    let json = serde_json::to_string(&outcomes).unwrap_or_default();
    ActionOutput::ok(format!("{} provider(s)", outcomes.len())).with_detail("providers", json)
}
