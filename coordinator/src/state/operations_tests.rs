//! Pure tests of the plan state machine: feed requests, assert outcomes.

use std::collections::{BTreeMap, BTreeSet};

use dr_proto::pb;

use super::plans::{failback_switchover, planned_switchover, unplanned_failover};
use super::*;
use crate::state::topology_spec::TopologySpec;
use crate::state::{Command, Request, apply};

const EXAMPLE: &str = include_str!("../../../deploy/examples/yeslocker/topology.toml");
const OP: &str = "spiffe://t/operator/alice?role=operator";

fn req(at: i64, cmd: Command) -> Request {
    Request {
        at_unix_ms: at,
        origin: OP.into(),
        cmd,
    }
}

struct World {
    state: State,
    index: u64,
    at: i64,
    /// Every key the "agents" ran, with how many times.
    ran: BTreeMap<String, u32>,
}

impl World {
    fn new() -> Self {
        let mut w = World {
            state: State::default(),
            index: 0,
            at: 1_000_000,
            ran: BTreeMap::new(),
        };
        let spec = TopologySpec::parse(EXAMPLE).expect("example");
        for h in &spec.hosts {
            w.apply(Command::HostUp {
                host_id: h.host_id.clone(),
                region: h.region.clone(),
                site: h.site.clone(),
                roles: h.roles.clone(),
                version: "t".into(),
                incarnation: 1,
            });
        }
        let r = w.apply(Command::Ops(OpsCommand::ApplyTopology {
            spec,
            expected_version: 0,
        }));
        assert_eq!(r, Response::Applied);
        w
    }

    fn apply(&mut self, cmd: Command) -> Response {
        self.index += 1;
        self.at += 10;
        apply(&mut self.state, self.index, &req(self.at, cmd))
    }

    fn spec(&self) -> TopologySpec {
        self.state
            .ops
            .topology
            .as_ref()
            .expect("topology")
            .spec
            .clone()
    }

    fn op(&self, id: u64) -> &Operation {
        &self.state.ops.operations[&id]
    }

    /// What a leader would propose for `id` now (None: waiting on agents or done).
    fn proposal(&self, id: u64) -> Option<Command> {
        let op = self.op(id);
        Some(Command::Ops(match next_move(op) {
            Move::StartAgent {
                step,
                attempt,
                timeout_ms,
            } => OpsCommand::StartStep {
                op_id: id,
                step,
                attempt,
                deadline_unix_ms: self.at + i64::try_from(timeout_ms).expect("small"),
            },
            Move::Internal { step, kind } => OpsCommand::CompleteInternal {
                op_id: id,
                step,
                effect: match kind {
                    InternalKind::DecideCandidate => InternalEffect::Decided {
                        candidate: "sh-db-1".into(),
                        estimated_loss_bytes: 128,
                        reason: "most advanced".into(),
                    },
                    InternalKind::WaitLease => InternalEffect::LeaseWaited { waited_ms: 4600 },
                    InternalKind::RaiseEpoch => InternalEffect::EpochRaised,
                    InternalKind::RecordMetrics => InternalEffect::MetricsRecorded,
                    InternalKind::RecordRestore => InternalEffect::RestoreRecorded,
                },
            },
            Move::Wait | Move::Nothing => return None,
        }))
    }

    /// Agents finish every open command of operation `id` (`fail` decides per key).
    fn agents_finish(&mut self, fail: &dyn Fn(&str) -> bool) -> usize {
        let open: Vec<(String, pb::Action)> = self
            .state
            .commands
            .open()
            .map(|c| (c.key.clone(), c.action.clone()))
            .collect();
        for (key, action) in &open {
            *self.ran.entry(key.clone()).or_default() += 1;
            let mut details = std::collections::HashMap::new();
            if let Some(pb::action::Kind::Generic(g)) = &action.kind
                && g.verb == "pg.stop"
            {
                details.insert("checkpoint_lsn".to_owned(), "0/3000028".to_owned());
            }
            if let Some(pb::action::Kind::Generic(g)) = &action.kind
                && g.verb == "pg.switch-wal"
            {
                details.insert("lsn".to_owned(), "0/4000000".to_owned());
            }
            let r = self.apply(Command::CommandCompleted {
                key: key.clone(),
                result: pb::CommandResult {
                    key: key.clone(),
                    success: !fail(key),
                    message: "ok".into(),
                    details,
                    ..Default::default()
                },
            });
            assert_eq!(r, Response::Applied);
        }
        open.len()
    }

    /// Drives `id` to its end; `leader_change` re-proposes each move a second time after
    /// it applied (a deposed leader's late proposal) and checks it changes nothing.
    fn drive(&mut self, id: u64, leader_change: bool, fail: &dyn Fn(&str) -> bool) {
        for _ in 0..200 {
            if let Some(cmd) = self.proposal(id) {
                assert_eq!(self.apply(cmd.clone()), Response::Applied, "{cmd:?}");
                if leader_change {
                    let before = self.state.ops.clone();
                    assert_eq!(self.apply(cmd), Response::Unchanged);
                    assert_eq!(
                        before, self.state.ops,
                        "a repeated proposal changed nothing"
                    );
                }
                continue;
            }
            if self.agents_finish(fail) == 0 {
                return;
            }
        }
        panic!("operation {id} did not finish");
    }
}

fn switchover(w: &mut World) -> u64 {
    let spec = w.spec();
    let cs = w.state.ops.clusters["yeslocker"].clone();
    let op = planned_switchover(&spec, &cs, "yeslocker", "shanghai", "sh-db-1", "test", "r1");
    assert_eq!(
        w.apply(Command::Ops(OpsCommand::CreateOperation { op })),
        Response::Applied
    );
    w.state.ops.next_id - 1
}

#[test]
fn topology_sets_initial_primary_and_epoch() {
    let w = World::new();
    let c = &w.state.ops.clusters["yeslocker"];
    assert_eq!((c.primary_host.as_str(), c.epoch), ("bj-db-1", 1));
    assert_eq!(w.state.ops.topology.as_ref().map(|t| t.version), Some(1));
}

#[test]
fn planned_switchover_completes_and_records_metrics() {
    let mut w = World::new();
    let id = switchover(&mut w);
    w.drive(id, false, &|_| false);
    let op = w.op(id);
    assert_eq!(op.state, OpState::Succeeded, "{op:#?}");
    let c = &w.state.ops.clusters["yeslocker"];
    assert_eq!((c.primary_host.as_str(), c.epoch), ("sh-db-1", 2));
    assert_eq!(op.results["rpo_bytes"], "0");
    assert!(op.results.contains_key("write_unavailable_ms"));
    // The replay waited for the LSN the stop reported; promote carried the new epoch.
    let wait = w
        .state
        .commands
        .get(&command_key(id, step_index(op, "wait_replay"), 1))
        .expect("wait cmd");
    let promote = w
        .state
        .commands
        .get(&command_key(id, step_index(op, "promote"), 1))
        .expect("promote cmd");
    assert!(format!("{:?}", wait.action).contains("0/3000028"));
    assert!(format!("{:?}", promote.action).contains("\"2\""));
    assert_eq!(promote.epoch, 2);
    assert_eq!(promote.db_cluster, "yeslocker");
    // The old primary's slot is made on the new primary before the old one is re-attached.
    let slot_step = step_index(op, "create_slot_for_old_primary");
    assert_eq!(slot_step + 1, step_index(op, "reattach_old_primary"));
    let slot = w
        .state
        .commands
        .get(&command_key(id, slot_step, 1))
        .expect("create-slot cmd");
    assert_eq!(slot.host_id, "sh-db-1");
    assert!(format!("{:?}", slot.action).contains("pg.create-slot"));
    // Compensation steps were skipped.
    assert!(
        op.steps
            .iter()
            .filter(|s| s.spec.compensation)
            .all(|s| s.state == StepState::Skipped)
    );
}

fn step_index(op: &Operation, name: &str) -> u32 {
    u32::try_from(
        op.steps
            .iter()
            .position(|s| s.spec.name == name)
            .expect("step"),
    )
    .expect("small")
}

#[test]
fn leader_change_at_each_step_completes_exactly_once() {
    let mut w = World::new();
    let id = switchover(&mut w);
    w.drive(id, true, &|_| false);
    assert_eq!(w.op(id).state, OpState::Succeeded);
    assert_eq!(
        w.state.ops.clusters["yeslocker"].epoch, 2,
        "epoch raised once"
    );
    assert!(w.ran.values().all(|n| *n == 1), "{:?}", w.ran);
    let keys: BTreeSet<&String> = w.ran.keys().collect();
    assert_eq!(keys.len(), w.ran.len());
    // A retried create (same request id) does not start a second operation.
    let spec = w.spec();
    let cs = w.state.ops.clusters["yeslocker"].clone();
    let again = planned_switchover(&spec, &cs, "yeslocker", "beijing", "bj-db-1", "t", "r1");
    assert_eq!(
        w.apply(Command::Ops(OpsCommand::CreateOperation { op: again })),
        Response::Unchanged
    );
}

#[test]
fn failed_replay_compensates_and_keeps_the_epoch() {
    let mut w = World::new();
    let id = switchover(&mut w);
    let wait = step_index(w.op(id), "wait_replay");
    let prefix = format!("op-{id}-{wait}-");
    w.drive(id, false, &move |k| k.starts_with(&prefix));
    let op = w.op(id);
    assert_eq!(op.state, OpState::Failed);
    assert!(op.reason.contains("wait_replay"), "{}", op.reason);
    let c = &w.state.ops.clusters["yeslocker"];
    assert_eq!((c.primary_host.as_str(), c.epoch), ("bj-db-1", 1));
    let restart = op
        .steps
        .iter()
        .find(|s| s.spec.name == "restart_old_primary")
        .expect("comp");
    assert_eq!(restart.state, StepState::Done);
    assert_eq!(
        op.steps[step_index(op, "promote") as usize].state,
        StepState::Skipped
    );
}

#[test]
fn retries_then_abort_and_expiry_fails_the_step() {
    let mut w = World::new();
    let spec = w.spec();
    let cs = w.state.ops.clusters["yeslocker"].clone();
    let op = unplanned_failover(
        &spec,
        &cs,
        "yeslocker",
        "shanghai",
        "sh-db-1",
        false,
        "beijing lost",
        "",
        Some(5),
    );
    w.apply(Command::Ops(OpsCommand::CreateOperation { op }));
    let id = 1;
    // decide, wait_lease, raise_epoch
    for _ in 0..3 {
        let c = w.proposal(id).expect("internal");
        assert_eq!(w.apply(c), Response::Applied);
    }
    assert_eq!(w.state.ops.clusters["yeslocker"].epoch, 2);
    // promote: 3 attempts (retries 2), each expiring.
    for attempt in 1..=3 {
        let c = w.proposal(id).expect("start promote");
        assert_eq!(w.apply(c), Response::Applied);
        let key = command_key(id, 3, attempt);
        assert!(w.state.commands.get(&key).is_some(), "{key}");
        let r = w.apply(Command::ExpireCommands { now: i64::MAX });
        assert!(matches!(r, Response::Expired { ref keys } if keys == &vec![key.clone()]));
    }
    let op = w.op(id);
    assert_eq!(op.state, OpState::Failed);
    assert_eq!(op.steps[3].attempt, 3);
    assert_eq!(op.vars["detected_at"], "5");
}

#[test]
fn unplanned_failover_records_loss() {
    let mut w = World::new();
    let spec = w.spec();
    let cs = w.state.ops.clusters["yeslocker"].clone();
    let op = unplanned_failover(
        &spec,
        &cs,
        "yeslocker",
        "shanghai",
        "sh-db-1",
        false,
        "beijing lost",
        "",
        None,
    );
    w.apply(Command::Ops(OpsCommand::CreateOperation { op }));
    w.drive(1, true, &|_| false);
    let op = w.op(1);
    assert_eq!(op.state, OpState::Succeeded, "{op:#?}");
    assert_eq!(op.results["rpo_bytes"], "128");
    assert_eq!(w.state.ops.clusters["yeslocker"].primary_host, "sh-db-1");
    // Traffic plans send everything to shanghai.
    let t = w
        .state
        .commands
        .iter()
        .find(|c| c.key.starts_with("op-1-") && format!("{:?}", c.action).contains("traffic.apply"))
        .expect("traffic");
    assert!(
        format!("{:?}", t.action).contains(r#"\"weight\":100"#),
        "{:?}",
        t.action
    );
}

#[test]
fn one_running_operation_per_cluster_and_needs_operator() {
    let mut w = World::new();
    let id = switchover(&mut w);
    let spec = w.spec();
    let cs = w.state.ops.clusters["yeslocker"].clone();
    let op = unplanned_failover(
        &spec,
        &cs,
        "yeslocker",
        "shanghai",
        "sh-db-1",
        true,
        "x",
        "r2",
        None,
    );
    assert!(matches!(
        w.apply(Command::Ops(OpsCommand::CreateOperation { op: op.clone() })),
        Response::Refused { .. }
    ));
    assert_eq!(
        w.apply(Command::Ops(OpsCommand::CancelOperation {
            op_id: id,
            reason: "t".into()
        })),
        Response::Applied
    );
    let mut held = op.clone();
    held.needs_operator = Some("lag above RPO".into());
    held.request_id = "r3".into();
    assert_eq!(
        w.apply(Command::Ops(OpsCommand::CreateOperation { op: held })),
        Response::Applied
    );
    assert_eq!(w.op(id + 1).state, OpState::NeedsOperator);
    assert_eq!(
        w.apply(Command::Ops(OpsCommand::CreateOperation { op })),
        Response::Applied
    );
    assert_eq!(
        w.op(id + 1).state,
        OpState::Cancelled,
        "superseded by the forced one"
    );
    assert_eq!(w.op(id + 2).state, OpState::Running);
}

#[test]
fn ops_commands_survive_the_json_trip_of_the_log() {
    // Command is internally tagged by `type`: a nested tag of the same name would make the
    // log unreadable (found by the e2e test: "duplicate field `type`").
    let w = World::new();
    let cmd = Command::Ops(OpsCommand::ApplyTopology {
        spec: w.spec(),
        expected_version: 1,
    });
    let json = serde_json::to_string(&cmd).expect("serialise");
    let back: Command = serde_json::from_str(&json).expect("deserialise");
    assert_eq!(back, cmd);
    let state_json = serde_json::to_string(&w.state).expect("state");
    let back: State = serde_json::from_str(&state_json).expect("state back");
    assert_eq!(back.ops, w.state.ops);
}

#[test]
fn failback_rejoins_and_catches_up_before_the_switchover() {
    let mut w = World::new();
    let first = switchover(&mut w);
    w.drive(first, false, &|_| false);
    let spec = w.spec();
    let cs = w.state.ops.clusters["yeslocker"].clone();
    let op = failback_switchover(&spec, &cs, "yeslocker", "beijing", "bj-db-1", "t", "r2");
    let names: Vec<&str> = op.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names[..6],
        [
            "create_slot_for_candidate",
            "rejoin_candidate",
            "unfence_candidate",
            "mark_catch_up",
            "catch_up",
            "maintenance_on"
        ],
        "{names:?}"
    );
    assert_eq!(
        w.apply(Command::Ops(OpsCommand::CreateOperation { op })),
        Response::Applied
    );
    let id = w.state.ops.next_id - 1;
    w.drive(id, true, &|_| false);
    let op = w.op(id);
    assert_eq!(op.state, OpState::Succeeded, "{op:#?}");
    let c = &w.state.ops.clusters["yeslocker"];
    assert_eq!((c.primary_host.as_str(), c.epoch), ("bj-db-1", 3));
    let cmd = |name: &str| {
        let c = w
            .state
            .commands
            .get(&command_key(id, step_index(op, name), 1))
            .expect("command");
        (c.host_id.clone(), format!("{:?}", c.action))
    };
    // The slot on the current primary; pg_rewind connects as the agent's superuser (no
    // `user=replicator` from the topology), falls back to a re-seed.
    let (h, a) = cmd("create_slot_for_candidate");
    assert_eq!(h, "sh-db-1");
    assert!(a.contains("dr_bj_db_1"), "{a}");
    let (h, a) = cmd("rejoin_candidate");
    assert_eq!(h, "bj-db-1");
    assert!(a.contains("pg.rewind") && a.contains("reseed"), "{a}");
    assert!(!a.contains("replicator"), "{a}");
    let (_, a) = cmd("unfence_candidate");
    assert!(a.contains("\"2\""), "unfence at the epoch before: {a}");
    let (h, a) = cmd("catch_up");
    assert_eq!(h, "bj-db-1");
    assert!(a.contains("0/4000000"), "{a}");
}

#[test]
fn percentage_splits_every_traffic_step_between_new_and_old_region() {
    let w = World::new();
    let spec = w.spec();
    assert!(
        !spec.traffic.is_empty(),
        "the example has traffic providers"
    );
    let cs = w.state.ops.clusters["yeslocker"].clone();
    let mut op = planned_switchover(&spec, &cs, "yeslocker", "shanghai", "sh-db-1", "t", "r");
    super::plans::split_traffic(&spec, &mut op, "beijing", "shanghai", 30).expect("split");
    let plans: Vec<serde_json::Value> = op
        .steps
        .iter()
        .filter(|s| s.name.starts_with("traffic_"))
        .filter_map(|s| match &s.kind {
            StepKind::Agent {
                action: ActionTemplate::Generic { args, .. },
                ..
            } => serde_json::from_str(&args["plan"]).ok(),
            _ => None,
        })
        .collect();
    assert!(!plans.is_empty());
    for p in &plans {
        assert_eq!(p["regions"]["shanghai"]["weight"], 30, "{p}");
        assert_eq!(p["regions"]["beijing"]["weight"], 70, "{p}");
    }
    for bad in [0, 101] {
        let e = super::plans::split_traffic(&spec, &mut op, "beijing", "shanghai", bad)
            .expect_err("out of range");
        assert!(e.contains("1..=100"), "{e}");
    }
}
