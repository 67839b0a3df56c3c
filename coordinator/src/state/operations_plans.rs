//! The failover runbooks as step lists (docs/failover.md, "Plans").
//!
//! Why pure functions of the committed topology: `drctl failover --dry-run` must show
//! exactly the plan that would run, and tests assert plans without a cluster. Step names are
//! stable: `record_metrics` reads `stop_writes`, `wait_replay` and `promote` by name, and
//! `${stop_old_primary.checkpoint_lsn}` takes the LSN the stop step reported.
//!
//! Agent verbs used (the agent's pg / traffic modules): `pg.stop {mode}` → details
//! `checkpoint_lsn`; `pg.wait-replay {lsn}`; `pg.promote {epoch}`; `pg.configure-standby
//! {primary (conninfo), slot, application_name, epoch}`; `pg.start {epoch}`; `pg.fence {reason}`;
//! `traffic.apply {provider, plan}` with the plan as JSON `{"regions": {r: {endpoints, weight}}}`.

use std::collections::BTreeMap;

use super::{
    ActionTemplate, ClusterState, InternalKind, NewOperation, OnFailure, OpKind, StepKind,
    StepSpec, Target,
};
use crate::state::topology_spec::TopologySpec;

const S: u64 = 1000;

fn agent(
    name: &str,
    target: Target,
    action: ActionTemplate,
    timeout_s: u64,
    retries: u32,
    on_failure: OnFailure,
) -> StepSpec {
    StepSpec {
        name: name.to_owned(),
        kind: StepKind::Agent { target, action },
        timeout_ms: timeout_s * S,
        retries,
        on_failure,
        compensation: false,
    }
}

fn internal(name: &str, kind: InternalKind) -> StepSpec {
    StepSpec {
        name: name.to_owned(),
        kind: StepKind::Internal { kind },
        timeout_ms: 0,
        retries: 0,
        on_failure: OnFailure::Abort,
        compensation: false,
    }
}

fn host(h: &str) -> Target {
    Target::Host { host: h.to_owned() }
}

fn sel(region: &str, role: &str) -> Target {
    Target::Selector {
        region: region.to_owned(),
        role: role.to_owned(),
    }
}

fn generic(verb: &str, args: &[(&str, &str)]) -> ActionTemplate {
    ActionTemplate::Generic {
        verb: verb.to_owned(),
        args: args
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

/// The traffic plan sending everything to `to` (JSON for `traffic.apply`).
pub fn traffic_plan_json(endpoints: &BTreeMap<String, Vec<String>>, to: &str) -> String {
    traffic_split_json(endpoints, to, "", 100)
}

/// The traffic plan giving `to` `percent` % and `rest_to` the rest (every other region 0).
fn traffic_split_json(
    endpoints: &BTreeMap<String, Vec<String>>,
    to: &str,
    rest_to: &str,
    percent: u32,
) -> String {
    let regions: serde_json::Map<String, serde_json::Value> = endpoints
        .iter()
        .map(|(r, eps)| {
            let weight = if r == to {
                percent
            } else if r == rest_to {
                100 - percent
            } else {
                0
            };
            (
                r.clone(),
                serde_json::json!({ "endpoints": eps, "weight": weight }),
            )
        })
        .collect();
    serde_json::json!({ "regions": regions }).to_string()
}

/// `drctl failover --percentage N` (the DRP's `enable-traffic --percentage N`): every traffic
/// step of a planned switchover gives `to` N % and the region being left (`from`) the rest,
/// instead of 100 / 0. Providers map it as they can (nginx weights; DNS has no weights and
/// keeps every address of a region with a share, docs/failover.md). Refused for a provider
/// without endpoints in `from`: the rest would have nowhere to go.
pub fn split_traffic(
    spec: &TopologySpec,
    op: &mut NewOperation,
    from: &str,
    to: &str,
    percent: u32,
) -> Result<(), String> {
    if !(1..=100).contains(&percent) {
        return Err(format!(
            "--percentage must be 1..=100 (the share of traffic for {to}), got {percent}"
        ));
    }
    for t in spec.traffic.iter().filter(|t| t.endpoints.contains_key(to)) {
        if percent < 100 && !t.endpoints.contains_key(from) {
            return Err(format!(
                "traffic provider `{}` has no endpoints in {from}: the other {} % have nowhere to go; use --percentage 100 or add {from}'s endpoints to the topology",
                t.name,
                100 - percent
            ));
        }
        let name = format!("traffic_{}", t.name);
        for step in op.steps.iter_mut().filter(|s| s.name == name) {
            if let StepKind::Agent {
                action: ActionTemplate::Generic { args, .. },
                ..
            } = &mut step.kind
            {
                args.insert(
                    "plan".into(),
                    traffic_split_json(&t.endpoints, to, from, percent),
                );
            }
        }
    }
    Ok(())
}

/// Roles of the services' hosts, deduplicated ("app", "gateway" ...), and per role the
/// agent service names to start/stop.
fn app_services(spec: &TopologySpec) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for s in &spec.services {
        let svc = if s.agent_service.is_empty() {
            s.name.clone()
        } else {
            s.agent_service.clone()
        };
        for r in &s.roles {
            v.push((r.clone(), svc.clone()));
        }
    }
    v
}

fn traffic_and_apps(spec: &TopologySpec, to: &str, steps: &mut Vec<StepSpec>) {
    for t in &spec.traffic {
        if !t.endpoints.contains_key(to) {
            continue;
        }
        steps.push(agent(
            &format!("traffic_{}", t.name),
            host(&t.host),
            generic(
                "traffic.apply",
                &[
                    ("provider", &t.name),
                    ("plan", &traffic_plan_json(&t.endpoints, to)),
                ],
            ),
            60,
            2,
            OnFailure::Continue,
        ));
    }
    for (role, svc) in app_services(spec) {
        steps.push(agent(
            &format!("start_{svc}_{role}"),
            sel(to, &role),
            ActionTemplate::Service {
                service: svc,
                start: true,
            },
            60,
            1,
            OnFailure::Continue,
        ));
    }
    let smoke: Vec<String> = spec
        .services
        .iter()
        .flat_map(|s| s.smoke_tests.clone())
        .collect();
    if !smoke.is_empty() {
        steps.push(agent(
            "smoke_tests",
            sel(to, ""),
            ActionTemplate::Smoke { names: smoke },
            120,
            1,
            OnFailure::Continue,
        ));
    }
}

fn replication_args(spec: &TopologySpec, cluster: &str, member: &str) -> (String, String) {
    spec.cluster(cluster).map_or_else(Default::default, |c| {
        (
            c.replication.slots.get(member).cloned().unwrap_or_default(),
            c.replication.application_name.clone(),
        )
    })
}

/// Planned switchover: nothing lost (stop writes, clean stop, replay to the final LSN).
pub fn planned_switchover(
    spec: &TopologySpec,
    cs: &ClusterState,
    cluster: &str,
    to_region: &str,
    candidate: &str,
    reason: &str,
    request_id: &str,
) -> NewOperation {
    let old = cs.primary_host.as_str();
    let from = spec.region_of(old).to_owned();
    let mut steps = Vec::new();
    let why = format!("switchover of {cluster} to {to_region}");
    steps.push(agent(
        "maintenance_on",
        sel(&from, ""),
        ActionTemplate::Maintenance {
            enabled: true,
            reason: why.clone(),
        },
        30,
        0,
        OnFailure::Continue,
    ));
    let apps = app_services(spec);
    for (n, (role, svc)) in apps.iter().enumerate() {
        let name = if n == 0 {
            "stop_writes".to_owned()
        } else {
            format!("stop_{svc}_{role}")
        };
        steps.push(agent(
            &name,
            sel(&from, role),
            ActionTemplate::Service {
                service: svc.clone(),
                start: false,
            },
            60,
            1,
            OnFailure::Compensate,
        ));
    }
    steps.push(agent(
        "stop_old_primary",
        host(old),
        generic("pg.stop", &[("mode", "fast")]),
        120,
        1,
        OnFailure::Compensate,
    ));
    steps.push(agent(
        "wait_replay",
        host(candidate),
        generic(
            "pg.wait-replay",
            &[
                ("lsn", "${stop_old_primary.checkpoint_lsn}"),
                ("timeout", "110s"),
            ],
        ),
        120,
        0,
        OnFailure::Compensate,
    ));
    steps.push(internal("raise_epoch", InternalKind::RaiseEpoch));
    steps.push(agent(
        "promote",
        host(candidate),
        generic("pg.promote", &[("epoch", "${epoch}")]),
        120,
        2,
        OnFailure::Abort,
    ));
    let (slot, app) = replication_args(spec, cluster, old);
    let primary_conninfo = spec
        .cluster(cluster)
        .and_then(|c| c.replication.conninfo.get(candidate).cloned())
        .unwrap_or_else(|| format!("host={candidate}"));
    // The old primary streams from the new one through its own slot: make it there first
    // (nothing else creates it, and a standby whose slot is missing never streams).
    if !slot.is_empty() {
        steps.push(agent(
            "create_slot_for_old_primary",
            host(candidate),
            generic("pg.create-slot", &[("name", &slot)]),
            60,
            1,
            OnFailure::Continue,
        ));
    }
    steps.push(agent(
        "reattach_old_primary",
        host(old),
        generic(
            "pg.configure-standby",
            &[
                ("primary", &primary_conninfo),
                ("slot", &slot),
                ("application_name", &app),
                ("epoch", "${epoch}"),
                ("rewind", "auto"),
            ],
        ),
        300,
        1,
        OnFailure::Continue,
    ));
    traffic_and_apps(spec, to_region, &mut steps);
    steps.push(agent(
        "maintenance_off",
        sel(&from, ""),
        ActionTemplate::Maintenance {
            enabled: false,
            reason: why.clone(),
        },
        30,
        0,
        OnFailure::Continue,
    ));
    steps.push(internal("record_metrics", InternalKind::RecordMetrics));
    // Compensation: writes stopped but the candidate could not take over: bring the old
    // primary and its applications back.
    let mut comp = vec![agent(
        "restart_old_primary",
        host(old),
        generic("pg.start", &[("epoch", "${epoch_before}")]),
        120,
        1,
        OnFailure::Continue,
    )];
    for (role, svc) in &apps {
        comp.push(agent(
            &format!("restart_{svc}_{role}"),
            sel(&from, role),
            ActionTemplate::Service {
                service: svc.clone(),
                start: true,
            },
            60,
            1,
            OnFailure::Continue,
        ));
    }
    comp.push(agent(
        "maintenance_off_after_abort",
        sel(&from, ""),
        ActionTemplate::Maintenance {
            enabled: false,
            reason: why,
        },
        30,
        0,
        OnFailure::Continue,
    ));
    for mut c in comp {
        c.compensation = true;
        steps.push(c);
    }
    let mut vars = BTreeMap::new();
    vars.insert("candidate".into(), candidate.to_owned());
    vars.insert("old_primary".into(), old.to_owned());
    vars.insert("epoch_before".into(), cs.epoch.to_string());
    NewOperation {
        kind: OpKind::Switchover,
        cluster: cluster.to_owned(),
        from_region: from,
        to_region: to_region.to_owned(),
        reason: reason.to_owned(),
        request_id: request_id.to_owned(),
        vars,
        steps,
        needs_operator: None,
    }
}

/// A conninfo without `user` and `password`: pg_rewind must connect as the agent's
/// superuser (it reads files through SQL), which the topology's replication conninfo is not.
fn without_credentials(conninfo: &str) -> String {
    conninfo
        .split_whitespace()
        .filter(|kv| {
            let k = kv.split('=').next().unwrap_or("").trim();
            !k.eq_ignore_ascii_case("user") && !k.eq_ignore_ascii_case("password")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Failback (docs/failover.md, "Failback"): the target member is not a streaming replica,
/// typically the old primary after an unplanned failover (diverged, fenced, stopped). It is
/// first rejoined to the current primary (pg_rewind, or a fresh base backup when rewind is
/// impossible), its fence lifted (safe: it is a standby now, and promote still needs the raised
/// epoch), and caught up; only then does the planned switchover run. Why these steps come
/// before maintenance: the copy can take long, and writes continue meanwhile.
pub fn failback_switchover(
    spec: &TopologySpec,
    cs: &ClusterState,
    cluster: &str,
    to_region: &str,
    candidate: &str,
    reason: &str,
    request_id: &str,
) -> NewOperation {
    let mut op = planned_switchover(spec, cs, cluster, to_region, candidate, reason, request_id);
    let primary = cs.primary_host.as_str();
    let (slot, _) = replication_args(spec, cluster, candidate);
    let source = spec
        .cluster(cluster)
        .and_then(|c| c.replication.conninfo.get(primary).cloned())
        .unwrap_or_else(|| format!("host={primary}"));
    let mut pre = Vec::new();
    if !slot.is_empty() {
        pre.push(agent(
            "create_slot_for_candidate",
            host(primary),
            generic("pg.create-slot", &[("name", &slot)]),
            60,
            1,
            OnFailure::Abort,
        ));
    }
    pre.push(agent(
        "rejoin_candidate",
        host(candidate),
        generic(
            "pg.rewind",
            &[
                ("source", &without_credentials(&source)),
                ("slot", &slot),
                ("fallback", "reseed"),
            ],
        ),
        3600,
        0,
        OnFailure::Abort,
    ));
    pre.push(agent(
        "unfence_candidate",
        host(candidate),
        generic("pg.unfence", &[("epoch", "${epoch_before}")]),
        30,
        1,
        OnFailure::Abort,
    ));
    pre.push(agent(
        "mark_catch_up",
        host(primary),
        generic("pg.switch-wal", &[]),
        30,
        1,
        OnFailure::Abort,
    ));
    pre.push(agent(
        "catch_up",
        host(candidate),
        generic(
            "pg.wait-replay",
            &[("lsn", "${mark_catch_up.lsn}"), ("timeout", "600s")],
        ),
        610,
        0,
        OnFailure::Abort,
    ));
    op.steps.splice(0..0, pre);
    op.vars.insert("failback".into(), "true".into());
    op
}

/// Unplanned failover (automatic or forced): decide, wait out the lease, raise the epoch,
/// promote, switch traffic, start applications.
#[allow(clippy::too_many_arguments)]
pub fn unplanned_failover(
    spec: &TopologySpec,
    cs: &ClusterState,
    cluster: &str,
    to_region: &str,
    candidate: &str,
    forced: bool,
    reason: &str,
    request_id: &str,
    detected_at_unix_ms: Option<i64>,
) -> NewOperation {
    let old = cs.primary_host.as_str();
    let from = spec.region_of(old).to_owned();
    let mut steps = Vec::new();
    if forced {
        // Best effort: if the old primary can still hear us, fence it now instead of
        // relying on its lease alone.
        steps.push(agent(
            "fence_old_primary",
            host(old),
            generic("pg.fence", &[("reason", "forced failover")]),
            5,
            0,
            OnFailure::Continue,
        ));
    }
    steps.push(internal("decide", InternalKind::DecideCandidate));
    steps.push(internal("wait_lease", InternalKind::WaitLease));
    steps.push(internal("raise_epoch", InternalKind::RaiseEpoch));
    steps.push(agent(
        "promote",
        host("${candidate}"),
        generic("pg.promote", &[("epoch", "${epoch}")]),
        120,
        2,
        OnFailure::Abort,
    ));
    traffic_and_apps(spec, to_region, &mut steps);
    steps.push(internal("record_metrics", InternalKind::RecordMetrics));
    let mut vars = BTreeMap::new();
    vars.insert("candidate".into(), candidate.to_owned());
    vars.insert("old_primary".into(), old.to_owned());
    vars.insert("epoch_before".into(), cs.epoch.to_string());
    if let Some(d) = detected_at_unix_ms {
        vars.insert("detected_at".into(), d.to_string());
    }
    NewOperation {
        kind: if forced {
            OpKind::ForcedFailover
        } else {
            OpKind::Failover
        },
        cluster: cluster.to_owned(),
        from_region: from,
        to_region: to_region.to_owned(),
        reason: reason.to_owned(),
        request_id: request_id.to_owned(),
        vars,
        steps,
        needs_operator: None,
    }
}
