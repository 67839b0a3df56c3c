//! Durable operations: the topology, each database cluster's primary and fencing epoch, and
//! the plans (switchover, failover, later restores and drills) with the state of every step.
//!
//! Why a plan lives in the log step by step: a coordinator leader can die in the middle of a
//! failover. A new leader must resume where the log says, neither forgetting a half-done
//! promotion nor repeating one. So (docs/failover.md, "Plans"):
//!
//! - an *agent step* starts with ONE committed entry ([`OpsCommand::StartStep`]) that marks it
//!   running AND issues its command(s) with the deterministic key `op-<id>-<step>-<attempt>`
//!   (`...-<host>` when a selector names several hosts); the command's completion
//!   (`CommandCompleted` / expiry / cancel) advances the step inside the same `apply`
//!   ([`on_command_finished`]), so step and command can never disagree;
//! - an *internal step* completes by an entry carrying its effect
//!   ([`OpsCommand::CompleteInternal`]): raising the epoch and marking the step done are one
//!   entry;
//! - every proposal names the step (and attempt) it is for, so a late or repeated proposal
//!   from a deposed leader is `Unchanged` instead of acting twice.
//!
//! ```text
//!  step:  pending ──StartStep / CompleteInternal──► running ──► done
//!            ▲                                         │
//!            └──── retry (attempt < 1 + retries) ◄─────┴──► failed ─► abort | continue | compensate
//! ```
//!
//! [`next_move`] is the pure half of the leader's plan executor: what to propose next.
//! Pure like the rest of `state`: time comes from the request.

use std::collections::BTreeMap;

use dr_proto::pb;
use serde::{Deserialize, Serialize};

use super::commands::{CommandRecord, CommandState};
use super::topology::HostState;
use super::topology_spec::{TopologySpec, diff};
use super::{Refusal, Response, State};

#[path = "operations_plans.rs"]
pub mod plans;
/// Restore and drill planning (issue 4).
#[path = "restore.rs"]
pub mod restore;

/// Operations kept after they finish (older finished ones are dropped).
pub const FINISHED_KEPT: usize = 200;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct OpsState {
    pub topology: Option<TopologyRecord>,
    pub clusters: BTreeMap<String, ClusterState>,
    pub operations: BTreeMap<u64, Operation>,
    pub next_id: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TopologyRecord {
    pub version: u64,
    pub spec: TopologySpec,
    pub applied_at_unix_ms: i64,
    pub applied_by: String,
}

/// What the cluster decided about one database cluster.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterState {
    pub primary_host: String,
    /// Fencing epoch: raised before any promotion; agents refuse older ones.
    pub epoch: u64,
    pub last_failover_unix_ms: i64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Planned: nothing lost.
    Switchover,
    /// Unplanned, decided by the region detector.
    Failover,
    /// Unplanned, forced by an operator (estimated loss stated).
    ForcedFailover,
    /// Restore / point-in-time recovery of a database (issue 4); `cluster` is `restore:<db>`.
    Restore,
    /// Restore drill into a scratch instance (issue 4); `cluster` is `drill:<db>`.
    Drill,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Switchover => "switchover",
            OpKind::Failover => "failover",
            OpKind::ForcedFailover => "forced_failover",
            OpKind::Restore => "restore",
            OpKind::Drill => "drill",
        }
    }
    /// Whether the old primary must stop getting leases as soon as the operation exists
    /// (unplanned: it is presumed gone and must fence itself).
    pub fn revokes_lease_at_start(self) -> bool {
        matches!(self, OpKind::Failover | OpKind::ForcedFailover)
    }
    /// Restores and drills work on backups, not on a topology cluster.
    pub fn is_restore(self) -> bool {
        matches!(self, OpKind::Restore | OpKind::Drill)
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    Running,
    /// Refused automatically and raised to the operator (reason says why).
    NeedsOperator,
    Succeeded,
    Failed,
    Cancelled,
}

impl OpState {
    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Running => "running",
            OpState::NeedsOperator => "needs_operator",
            OpState::Succeeded => "succeeded",
            OpState::Failed => "failed",
            OpState::Cancelled => "cancelled",
        }
    }
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            OpState::Succeeded | OpState::Failed | OpState::Cancelled
        )
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Running,
    Done,
    Failed,
    Skipped,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Done => "done",
            StepState::Failed => "failed",
            StepState::Skipped => "skipped",
        }
    }
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            StepState::Done | StepState::Failed | StepState::Skipped
        )
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    Abort,
    Continue,
    /// Run the plan's compensation steps, then fail.
    Compensate,
}

/// Which host(s) an agent step targets. Strings may use `${var}` templates.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Target {
    Host {
        host: String,
    },
    /// Every host that is up and matches (empty fields match all); zero hosts: skipped.
    Selector {
        region: String,
        role: String,
    },
}

/// The action of an agent step. Strings may use `${var}` templates.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ActionTemplate {
    Generic {
        verb: String,
        args: BTreeMap<String, String>,
    },
    Maintenance {
        enabled: bool,
        reason: String,
    },
    Service {
        service: String,
        start: bool,
    },
    Smoke {
        names: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InternalKind {
    /// Choose (or confirm) the candidate and record the estimated loss.
    DecideCandidate,
    /// Wait until the old primary's lease has certainly run out.
    WaitLease,
    /// Raise the cluster's epoch and make the candidate the recorded primary.
    RaiseEpoch,
    /// Compute RTO / RPO / write-unavailable time from the step timestamps.
    RecordMetrics,
    /// Record a restore's or drill's duration, recovery point and verification.
    RecordRestore,
}

impl InternalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InternalKind::DecideCandidate => "decide_candidate",
            InternalKind::WaitLease => "wait_lease",
            InternalKind::RaiseEpoch => "raise_epoch",
            InternalKind::RecordMetrics => "record_metrics",
            InternalKind::RecordRestore => "record_restore",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StepKind {
    Agent {
        target: Target,
        action: ActionTemplate,
    },
    Internal {
        kind: InternalKind,
    },
}

/// A step as planned.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepSpec {
    pub name: String,
    pub kind: StepKind,
    pub timeout_ms: u64,
    pub retries: u32,
    pub on_failure: OnFailure,
    /// Runs only when the plan is compensating.
    #[serde(default)]
    pub compensation: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Step {
    pub spec: StepSpec,
    pub state: StepState,
    pub attempt: u32,
    pub started_at_unix_ms: Option<i64>,
    pub finished_at_unix_ms: Option<i64>,
    pub command_keys: Vec<String>,
    pub hosts: Vec<String>,
    pub message: String,
    pub details: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NewOperation {
    pub kind: OpKind,
    pub cluster: String,
    pub from_region: String,
    pub to_region: String,
    pub reason: String,
    pub request_id: String,
    /// Initial template variables (candidate, old_primary, ...).
    pub vars: BTreeMap<String, String>,
    pub steps: Vec<StepSpec>,
    /// When set the operation is recorded as `needs_operator` with this reason and not run.
    pub needs_operator: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Operation {
    pub id: u64,
    pub kind: OpKind,
    pub cluster: String,
    pub from_region: String,
    pub to_region: String,
    pub created_by: String,
    pub created_at_unix_ms: i64,
    pub finished_at_unix_ms: Option<i64>,
    pub state: OpState,
    pub reason: String,
    pub request_id: String,
    pub compensating: bool,
    pub steps: Vec<Step>,
    pub vars: BTreeMap<String, String>,
    pub results: BTreeMap<String, String>,
}

/// The effect an internal step commits together with its completion.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InternalEffect {
    Decided {
        candidate: String,
        estimated_loss_bytes: u64,
        reason: String,
    },
    LeaseWaited {
        waited_ms: u64,
    },
    EpochRaised,
    MetricsRecorded,
    RestoreRecorded,
}

/// Tagged `ops` (not `type`): it travels inside `Command::Ops`, whose own tag is `type`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "ops", rename_all = "snake_case")]
pub enum OpsCommand {
    ApplyTopology {
        spec: TopologySpec,
        /// 0: any; otherwise the committed version must be this one.
        expected_version: u64,
    },
    CreateOperation {
        op: NewOperation,
    },
    /// Starts agent step `step` of `op_id` as attempt `attempt` (issues its commands).
    StartStep {
        op_id: u64,
        step: u32,
        attempt: u32,
        deadline_unix_ms: i64,
    },
    CompleteInternal {
        op_id: u64,
        step: u32,
        effect: InternalEffect,
    },
    FailStep {
        op_id: u64,
        step: u32,
        attempt: u32,
        reason: String,
    },
    CancelOperation {
        op_id: u64,
        reason: String,
    },
}

impl OpsCommand {
    pub fn name(&self) -> &'static str {
        match self {
            OpsCommand::ApplyTopology { .. } => "apply_topology",
            OpsCommand::CreateOperation { .. } => "create_operation",
            OpsCommand::StartStep { .. } => "start_step",
            OpsCommand::CompleteInternal { .. } => "complete_internal",
            OpsCommand::FailStep { .. } => "fail_step",
            OpsCommand::CancelOperation { .. } => "cancel_operation",
        }
    }
    pub fn target(&self) -> String {
        match self {
            OpsCommand::ApplyTopology { spec, .. } => spec.name.clone(),
            OpsCommand::CreateOperation { op } => format!("{}:{}", op.kind.as_str(), op.cluster),
            OpsCommand::StartStep { op_id, step, .. }
            | OpsCommand::CompleteInternal { op_id, step, .. }
            | OpsCommand::FailStep { op_id, step, .. } => format!("op-{op_id}/{step}"),
            OpsCommand::CancelOperation { op_id, .. } => format!("op-{op_id}"),
        }
    }
}

/// The command key of an agent step attempt (one host).
pub fn command_key(op_id: u64, step: u32, attempt: u32) -> String {
    format!("op-{op_id}-{step}-{attempt}")
}

/// `(op_id, step, attempt)` of a key made by [`command_key`] (with or without `-<host>`).
pub fn parse_command_key(key: &str) -> Option<(u64, u32, u32)> {
    let rest = key.strip_prefix("op-")?;
    let mut it = rest.splitn(4, '-');
    let op = it.next()?.parse().ok()?;
    let step = it.next()?.parse().ok()?;
    let attempt = it.next()?.parse().ok()?;
    Some((op, step, attempt))
}

fn invalid(message: impl Into<String>) -> Response {
    Response::refused(Refusal::Invalid {
        message: message.into(),
    })
}

/// Applies one operations command (called from `state::apply`).
pub fn apply_ops(
    state: &mut State,
    log_index: u64,
    at: i64,
    origin: &str,
    cmd: &OpsCommand,
) -> Response {
    match cmd {
        OpsCommand::ApplyTopology {
            spec,
            expected_version,
        } => apply_topology(state, at, origin, spec, *expected_version),
        OpsCommand::CreateOperation { op } => create_operation(state, at, origin, op),
        OpsCommand::StartStep {
            op_id,
            step,
            attempt,
            deadline_unix_ms,
        } => start_step(
            state,
            log_index,
            at,
            origin,
            *op_id,
            *step,
            *attempt,
            *deadline_unix_ms,
        ),
        OpsCommand::CompleteInternal {
            op_id,
            step,
            effect,
        } => complete_internal(state, at, *op_id, *step, effect),
        OpsCommand::FailStep {
            op_id,
            step,
            attempt,
            reason,
        } => {
            let Some(op) = state.ops.operations.get_mut(op_id) else {
                return invalid(format!("operation {op_id} does not exist"));
            };
            let i = *step as usize;
            if op.state != OpState::Running
                || current_step(op) != Some(i)
                || op.steps[i].attempt != *attempt
                || op.steps[i].state.is_finished()
            {
                return Response::Unchanged;
            }
            step_failed(op, i, reason, at);
            Response::Applied
        }
        OpsCommand::CancelOperation { op_id, reason } => {
            let Some(op) = state.ops.operations.get_mut(op_id) else {
                return invalid(format!("operation {op_id} does not exist"));
            };
            if op.state.is_finished() {
                return Response::Unchanged;
            }
            op.state = OpState::Cancelled;
            op.finished_at_unix_ms = Some(at);
            op.reason = format!("{} (cancelled: {reason})", op.reason);
            // Open commands of the running step: cancel them too.
            let keys: Vec<String> = op
                .steps
                .iter()
                .filter(|s| s.state == StepState::Running)
                .flat_map(|s| s.command_keys.clone())
                .collect();
            for k in keys {
                if state
                    .commands
                    .get(&k)
                    .is_some_and(|c| !c.state.is_finished())
                {
                    if let Some(c) = state.commands.get_mut(&k) {
                        c.reason = format!("operation {op_id} cancelled");
                    }
                    state.commands.finish(&k, CommandState::Cancelled, at);
                }
            }
            Response::Applied
        }
    }
}

fn apply_topology(
    state: &mut State,
    at: i64,
    origin: &str,
    spec: &TopologySpec,
    expected: u64,
) -> Response {
    if let Err(e) = spec.validate() {
        return invalid(e.to_string());
    }
    let current = state.ops.topology.as_ref().map_or(0, |t| t.version);
    if expected != 0 && expected != current {
        return invalid(format!(
            "topology changed meanwhile: expected version {expected}, committed is {current}; re-run with the new diff"
        ));
    }
    if state
        .ops
        .topology
        .as_ref()
        .is_some_and(|t| diff(Some(&t.spec), spec).is_empty())
    {
        return Response::Unchanged;
    }
    if state
        .ops
        .operations
        .values()
        .any(|o| o.state == OpState::Running)
    {
        return invalid("an operation is running; apply the topology after it finished");
    }
    // New clusters start at the declared primary, epoch 1. Existing ones keep what failovers
    // decided: the file's `primary` is only the initial one.
    for c in &spec.db_clusters {
        state
            .ops
            .clusters
            .entry(c.name.clone())
            .or_insert_with(|| ClusterState {
                primary_host: c.primary.clone(),
                epoch: 1,
                last_failover_unix_ms: 0,
            });
    }
    state
        .ops
        .clusters
        .retain(|name, _| spec.cluster(name).is_some());
    state.ops.topology = Some(TopologyRecord {
        version: current + 1,
        spec: spec.clone(),
        applied_at_unix_ms: at,
        applied_by: origin.to_owned(),
    });
    Response::Applied
}

fn create_operation(state: &mut State, at: i64, origin: &str, new: &NewOperation) -> Response {
    if !new.request_id.is_empty()
        && state
            .ops
            .operations
            .values()
            .any(|o| o.request_id == new.request_id)
    {
        return Response::Unchanged;
    }
    if !new.kind.is_restore() && !state.ops.clusters.contains_key(&new.cluster) {
        return invalid(format!(
            "database cluster `{}` is not in the committed topology",
            new.cluster
        ));
    }
    if new.needs_operator.is_none() {
        if new.steps.is_empty() {
            return invalid("an operation needs at least one step");
        }
        if let Some(o) = state
            .ops
            .operations
            .values()
            .find(|o| o.cluster == new.cluster && o.state == OpState::Running)
        {
            return invalid(format!(
                "operation {} ({}) is already running on cluster {}; wait for it or cancel it",
                o.id,
                o.kind.as_str(),
                new.cluster
            ));
        }
        // An operator acting supersedes what was waiting for one.
        for o in state.ops.operations.values_mut() {
            if o.cluster == new.cluster && o.state == OpState::NeedsOperator {
                o.state = OpState::Cancelled;
                o.finished_at_unix_ms = Some(at);
                o.reason = format!("{} (superseded)", o.reason);
            }
        }
    }
    state.ops.next_id = state.ops.next_id.max(1);
    let id = state.ops.next_id;
    state.ops.next_id += 1;
    let (st, reason) = match &new.needs_operator {
        Some(why) => (OpState::NeedsOperator, why.clone()),
        None => (OpState::Running, new.reason.clone()),
    };
    let mut vars = new.vars.clone();
    vars.insert("cluster".into(), new.cluster.clone());
    vars.insert("from_region".into(), new.from_region.clone());
    vars.insert("to_region".into(), new.to_region.clone());
    vars.insert("op_id".into(), id.to_string());
    vars.entry("detected_at".into())
        .or_insert_with(|| at.to_string());
    let mut op = Operation {
        id,
        kind: new.kind,
        cluster: new.cluster.clone(),
        from_region: new.from_region.clone(),
        to_region: new.to_region.clone(),
        created_by: origin.to_owned(),
        created_at_unix_ms: at,
        finished_at_unix_ms: (st == OpState::NeedsOperator).then_some(at),
        state: st,
        reason,
        request_id: new.request_id.clone(),
        compensating: false,
        steps: new
            .steps
            .iter()
            .map(|s| Step {
                spec: s.clone(),
                state: StepState::Pending,
                attempt: 0,
                started_at_unix_ms: None,
                finished_at_unix_ms: None,
                command_keys: vec![],
                hosts: vec![],
                message: String::new(),
                details: BTreeMap::new(),
            })
            .collect(),
        vars,
        results: BTreeMap::new(),
    };
    if op.state == OpState::Running {
        settle(&mut op, at);
    }
    state.ops.operations.insert(id, op);
    trim_finished(&mut state.ops);
    Response::Applied
}

fn trim_finished(ops: &mut OpsState) {
    let finished: Vec<u64> = ops
        .operations
        .values()
        .filter(|o| o.state.is_finished())
        .map(|o| o.id)
        .collect();
    if finished.len() > FINISHED_KEPT {
        for id in &finished[..finished.len() - FINISHED_KEPT] {
            ops.operations.remove(id);
        }
    }
}

/// Index of the step to run now: the first unfinished one.
pub fn current_step(op: &Operation) -> Option<usize> {
    op.steps.iter().position(|s| !s.state.is_finished())
}

/// Skips compensation steps outside compensation and finishes the operation when no step is
/// left. Called after every step transition.
fn settle(op: &mut Operation, at: i64) {
    loop {
        let Some(i) = current_step(op) else {
            op.state = if op.compensating {
                OpState::Failed
            } else {
                OpState::Succeeded
            };
            op.finished_at_unix_ms = Some(at);
            return;
        };
        let s = &mut op.steps[i];
        if s.spec.compensation && !op.compensating {
            s.state = StepState::Skipped;
            s.message = "not compensating".into();
            continue;
        }
        if !s.spec.compensation && op.compensating {
            s.state = StepState::Skipped;
            s.message = "skipped: compensating".into();
            continue;
        }
        return;
    }
}

fn step_failed(op: &mut Operation, i: usize, message: &str, at: i64) {
    let s = &mut op.steps[i];
    s.message = message.to_owned();
    if s.attempt < 1 + s.spec.retries {
        // Back to pending: the executor starts attempt + 1.
        s.state = StepState::Pending;
        return;
    }
    s.state = StepState::Failed;
    s.finished_at_unix_ms = Some(at);
    match s.spec.on_failure {
        OnFailure::Continue => {}
        OnFailure::Abort => {
            op.state = OpState::Failed;
            op.finished_at_unix_ms = Some(at);
            op.reason = format!("{}; step {} failed: {message}", op.reason, s.spec.name);
            return;
        }
        OnFailure::Compensate => {
            op.compensating = true;
            op.reason = format!("{}; step {} failed: {message}", op.reason, s.spec.name);
        }
    }
    settle(op, at);
}

fn step_done(op: &mut Operation, i: usize, message: String, at: i64) {
    let s = &mut op.steps[i];
    s.state = StepState::Done;
    s.finished_at_unix_ms = Some(at);
    s.message = message;
    let name = s.spec.name.clone();
    for (k, v) in s.details.clone() {
        op.vars.insert(format!("{name}.{k}"), v);
    }
    settle(op, at);
}

/// Replaces `${name}` with `vars[name]`; an unknown name is an error naming it.
pub fn render(template: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("unterminated ${{ in {template:?}"));
        };
        let name = &after[..end];
        match vars.get(name) {
            Some(v) => out.push_str(v),
            None => return Err(format!("`{name}` is not known yet")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn render_action(
    a: &ActionTemplate,
    vars: &BTreeMap<String, String>,
) -> Result<pb::Action, String> {
    use pb::action::Kind;
    let kind = match a {
        ActionTemplate::Generic { verb, args } => {
            let mut out = std::collections::HashMap::new();
            for (k, v) in args {
                out.insert(k.clone(), render(v, vars)?);
            }
            Kind::Generic(pb::Generic {
                verb: verb.clone(),
                args: out,
            })
        }
        ActionTemplate::Maintenance { enabled, reason } => Kind::Maintenance(pb::MaintenanceMode {
            enabled: *enabled,
            reason: render(reason, vars)?,
        }),
        ActionTemplate::Service { service, start } => Kind::Service(pb::ServiceControl {
            service: render(service, vars)?,
            op: if *start {
                pb::service_control::Op::Start as i32
            } else {
                pb::service_control::Op::Stop as i32
            },
        }),
        ActionTemplate::Smoke { names } => Kind::SmokeTest(pb::SmokeTest {
            names: names.clone(),
        }),
    };
    Ok(pb::Action { kind: Some(kind) })
}

#[allow(clippy::too_many_arguments)]
fn start_step(
    state: &mut State,
    log_index: u64,
    at: i64,
    origin: &str,
    op_id: u64,
    step: u32,
    attempt: u32,
    deadline: i64,
) -> Response {
    let Some(op) = state.ops.operations.get(&op_id) else {
        return invalid(format!("operation {op_id} does not exist"));
    };
    let i = step as usize;
    // A stale or repeated proposal (another leader already started it): nothing to do.
    if op.state != OpState::Running
        || current_step(op) != Some(i)
        || op.steps[i].state != StepState::Pending
        || op.steps[i].attempt + 1 != attempt
    {
        return Response::Unchanged;
    }
    let StepKind::Agent { target, action } = &op.steps[i].spec.kind else {
        return invalid(format!(
            "step {step} of operation {op_id} is not an agent step"
        ));
    };
    let cluster = op.cluster.clone();
    let epoch = state.ops.clusters.get(&cluster).map_or(0, |c| c.epoch);
    let rendered = render_action(action, &op.vars);
    let hosts: Result<Vec<String>, String> = match target {
        Target::Host { host } => render(host, &op.vars).map(|h| vec![h]),
        Target::Selector { region, role } => {
            match (render(region, &op.vars), render(role, &op.vars)) {
                (Ok(region), Ok(role)) => Ok(state
                    .hosts
                    .values()
                    .filter(|h| h.state == HostState::Up)
                    .filter(|h| region.is_empty() || h.region == region)
                    .filter(|h| role.is_empty() || h.roles.contains(&role))
                    .map(|h| h.host_id.clone())
                    .collect()),
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        }
    };
    let selector = matches!(target, Target::Selector { .. });
    let Some(op) = state.ops.operations.get_mut(&op_id) else {
        return invalid("operation vanished");
    };
    let s = &mut op.steps[i];
    s.attempt = attempt;
    s.started_at_unix_ms = Some(at);
    s.command_keys.clear();
    let (action, hosts) = match (rendered, hosts) {
        (Ok(a), Ok(h)) => (a, h),
        (Err(e), _) | (_, Err(e)) => {
            step_failed(op, i, &format!("cannot build the command: {e}"), at);
            return Response::Applied;
        }
    };
    if let Some(h) = hosts.iter().find(|h| !state.hosts.contains_key(*h)) {
        step_failed(op, i, &format!("host {h} has never connected"), at);
        return Response::Applied;
    }
    if hosts.is_empty() {
        let s = &mut op.steps[i];
        s.state = StepState::Skipped;
        s.finished_at_unix_ms = Some(at);
        s.message = "no matching host is up".into();
        settle(op, at);
        return Response::Applied;
    }
    let s = &mut op.steps[i];
    s.state = StepState::Running;
    s.hosts.clone_from(&hosts);
    s.message.clear();
    let mut records = Vec::new();
    for h in &hosts {
        let mut key = command_key(op_id, step, attempt);
        if selector {
            key = format!("{key}-{h}");
        }
        s.command_keys.push(key.clone());
        records.push(CommandRecord {
            key,
            host_id: h.clone(),
            action: action.clone(),
            issued_index: log_index,
            issued_at_unix_ms: at,
            deadline_unix_ms: deadline,
            issued_by: origin.to_owned(),
            request_id: format!("op-{op_id}"),
            state: CommandState::Pending,
            acked_at_unix_ms: None,
            finished_at_unix_ms: None,
            reason: String::new(),
            result: None,
            epoch,
            db_cluster: cluster.clone(),
        });
    }
    for r in records {
        if state.commands.get(&r.key).is_none() {
            state.commands.insert(r);
        }
    }
    Response::Applied
}

/// Advances the step that owns `key` after its command finished (called by `apply` after
/// `CommandCompleted`, `CancelCommand` and `ExpireCommands`).
pub fn on_command_finished(state: &mut State, key: &str, at: i64) {
    let Some((op_id, step, attempt)) = parse_command_key(key) else {
        return;
    };
    let Some(op) = state.ops.operations.get_mut(&op_id) else {
        return;
    };
    let i = step as usize;
    if op.state != OpState::Running
        || i >= op.steps.len()
        || op.steps[i].state != StepState::Running
        || op.steps[i].attempt != attempt
        || !op.steps[i].command_keys.iter().any(|k| k == key)
    {
        return;
    }
    let recs: Vec<&CommandRecord> = op.steps[i]
        .command_keys
        .iter()
        .filter_map(|k| state.commands.get(k))
        .collect();
    if recs.len() != op.steps[i].command_keys.len() || recs.iter().any(|r| !r.state.is_finished()) {
        return;
    }
    let mut failures = Vec::new();
    let mut details = BTreeMap::new();
    let mut messages = Vec::new();
    for r in &recs {
        let msg = r
            .result
            .as_ref()
            .map(|x| x.message.clone())
            .unwrap_or_default();
        match r.state {
            CommandState::Done => {
                if let Some(res) = &r.result {
                    for (k, v) in &res.details {
                        details.insert(k.clone(), v.clone());
                    }
                }
                messages.push(format!("{}: {msg}", r.host_id));
            }
            other => {
                let why = if msg.is_empty() {
                    r.reason.clone()
                } else {
                    msg
                };
                failures.push(format!("{} {other}: {why}", r.host_id));
            }
        }
    }
    let s = &mut op.steps[i];
    s.details = details;
    if failures.is_empty() {
        step_done(op, i, messages.join("; "), at);
    } else {
        step_failed(op, i, &failures.join("; "), at);
    }
}

fn complete_internal(
    state: &mut State,
    at: i64,
    op_id: u64,
    step: u32,
    effect: &InternalEffect,
) -> Response {
    let Some(op) = state.ops.operations.get(&op_id) else {
        return invalid(format!("operation {op_id} does not exist"));
    };
    let i = step as usize;
    if op.state != OpState::Running
        || current_step(op) != Some(i)
        || op.steps[i].state != StepState::Pending
    {
        return Response::Unchanged;
    }
    let StepKind::Internal { kind } = op.steps[i].spec.kind else {
        return invalid(format!("step {step} of operation {op_id} is not internal"));
    };
    let matches = matches!(
        (kind, effect),
        (
            InternalKind::DecideCandidate,
            InternalEffect::Decided { .. }
        ) | (InternalKind::WaitLease, InternalEffect::LeaseWaited { .. })
            | (InternalKind::RaiseEpoch, InternalEffect::EpochRaised)
            | (InternalKind::RecordMetrics, InternalEffect::MetricsRecorded)
            | (InternalKind::RecordRestore, InternalEffect::RestoreRecorded)
    );
    if !matches {
        return invalid(format!(
            "step {step} of operation {op_id} is {} and cannot take {effect:?}",
            kind.as_str()
        ));
    }
    let cluster = op.cluster.clone();
    let mut msg = String::new();
    let mut details: BTreeMap<String, String> = BTreeMap::new();
    match effect {
        InternalEffect::Decided {
            candidate,
            estimated_loss_bytes,
            reason,
        } => {
            let member = state
                .ops
                .topology
                .as_ref()
                .and_then(|t| t.spec.cluster(&cluster))
                .is_some_and(|c| c.members.contains(candidate));
            let primary = state
                .ops
                .clusters
                .get(&cluster)
                .map(|c| c.primary_host.clone());
            if !member || primary.as_deref() == Some(candidate.as_str()) {
                return invalid(format!(
                    "{candidate} is not a replica member of cluster {cluster}"
                ));
            }
            details.insert("candidate".into(), candidate.clone());
            details.insert(
                "estimated_loss_bytes".into(),
                estimated_loss_bytes.to_string(),
            );
            msg = format!("candidate {candidate}: {reason}");
        }
        InternalEffect::LeaseWaited { waited_ms } => {
            details.insert("waited_ms".into(), waited_ms.to_string());
            msg = format!("old primary's lease ran out (waited {waited_ms} ms)");
        }
        InternalEffect::EpochRaised => {
            let candidate = op.vars.get("candidate").cloned().unwrap_or_default();
            if candidate.is_empty() {
                return invalid("raise_epoch before a candidate was decided");
            }
            let Some(c) = state.ops.clusters.get_mut(&cluster) else {
                return invalid(format!("cluster {cluster} vanished"));
            };
            c.epoch += 1;
            c.primary_host = candidate.clone();
            c.last_failover_unix_ms = at;
            details.insert("epoch".into(), c.epoch.to_string());
            msg = format!("epoch {} (primary of record: {candidate})", c.epoch);
        }
        InternalEffect::MetricsRecorded | InternalEffect::RestoreRecorded => {}
    }
    let Some(op) = state.ops.operations.get_mut(&op_id) else {
        return invalid("operation vanished");
    };
    let s = &mut op.steps[i];
    s.attempt = 1;
    s.started_at_unix_ms = Some(at);
    for (k, v) in &details {
        op.vars.insert(k.clone(), v.clone());
    }
    op.steps[i].details = details;
    if kind == InternalKind::RecordMetrics {
        record_metrics(op, at);
        msg = op
            .results
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
    }
    if kind == InternalKind::RecordRestore {
        op.results = restore::results(op, at);
        msg = op
            .results
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
    }
    step_done(op, i, msg, at);
    Response::Applied
}

fn step_by_name<'a>(op: &'a Operation, name: &str) -> Option<&'a Step> {
    op.steps.iter().find(|s| s.spec.name == name)
}

/// RTO: from detection (or the request) to now, i.e. service restored in the new region.
/// Write-unavailable: from writes stopping (planned) or detection (unplanned) to the
/// promotion. RPO: 0 when the candidate replayed the old primary's final LSN, else the
/// estimated loss from the decision.
fn record_metrics(op: &mut Operation, at: i64) {
    let detected: i64 = op
        .vars
        .get("detected_at")
        .and_then(|v| v.parse().ok())
        .unwrap_or(op.created_at_unix_ms);
    op.results
        .insert("rto_ms".into(), (at - detected).max(0).to_string());
    let promoted = step_by_name(op, "promote").and_then(|s| s.finished_at_unix_ms);
    let writes_stopped = step_by_name(op, "stop_writes")
        .and_then(|s| s.started_at_unix_ms)
        .unwrap_or(detected);
    if let Some(p) = promoted {
        op.results.insert(
            "write_unavailable_ms".into(),
            (p - writes_stopped).max(0).to_string(),
        );
    }
    let replayed = step_by_name(op, "wait_replay").is_some_and(|s| s.state == StepState::Done);
    let rpo = if replayed {
        "0".to_owned()
    } else {
        op.vars
            .get("estimated_loss_bytes")
            .cloned()
            .unwrap_or_else(|| "unknown".into())
    };
    op.results.insert("rpo_bytes".into(), rpo);
    for k in ["candidate", "epoch", "stop_old_primary.checkpoint_lsn"] {
        if let Some(v) = op.vars.get(k) {
            op.results
                .insert(k.replace("stop_old_primary.", "final_"), v.clone());
        }
    }
}

/// What the plan executor should do next for one operation.
#[derive(Clone, Debug, PartialEq)]
pub enum Move {
    /// Propose `StartStep { step, attempt }`.
    StartAgent {
        step: u32,
        attempt: u32,
        timeout_ms: u64,
    },
    /// Run the internal step (the executor computes the effect).
    Internal { step: u32, kind: InternalKind },
    /// Waiting for agent commands to finish.
    Wait,
    /// Not running.
    Nothing,
}

/// The pure half of the executor.
pub fn next_move(op: &Operation) -> Move {
    if op.state != OpState::Running {
        return Move::Nothing;
    }
    let Some(i) = current_step(op) else {
        return Move::Nothing;
    };
    let s = &op.steps[i];
    let step = u32::try_from(i).unwrap_or(u32::MAX);
    match (&s.spec.kind, s.state) {
        (StepKind::Agent { .. }, StepState::Pending) => Move::StartAgent {
            step,
            attempt: s.attempt + 1,
            timeout_ms: s.spec.timeout_ms,
        },
        (StepKind::Internal { kind }, StepState::Pending) => Move::Internal { step, kind: *kind },
        _ => Move::Wait,
    }
}

impl Operation {
    pub fn to_info(&self) -> pb::OperationInfo {
        pb::OperationInfo {
            id: self.id,
            kind: self.kind.as_str().to_owned(),
            state: self.state.as_str().to_owned(),
            cluster: self.cluster.clone(),
            created_by: self.created_by.clone(),
            created_at_unix_ms: self.created_at_unix_ms,
            finished_at_unix_ms: self.finished_at_unix_ms.unwrap_or(0),
            reason: self.reason.clone(),
            from_region: self.from_region.clone(),
            to_region: self.to_region.clone(),
            results: self.results.clone().into_iter().collect(),
            steps: self
                .steps
                .iter()
                .enumerate()
                .map(|(i, s)| pb::StepInfo {
                    index: u32::try_from(i).unwrap_or(u32::MAX),
                    name: s.spec.name.clone(),
                    kind: describe_kind(&s.spec.kind),
                    state: s.state.as_str().to_owned(),
                    attempt: s.attempt,
                    started_at_unix_ms: s.started_at_unix_ms.unwrap_or(0),
                    finished_at_unix_ms: s.finished_at_unix_ms.unwrap_or(0),
                    command_key: s.command_keys.join(","),
                    host: s.hosts.join(","),
                    message: s.message.clone(),
                    on_failure: format!("{:?}", s.spec.on_failure).to_lowercase(),
                })
                .collect(),
        }
    }
}

fn describe_kind(k: &StepKind) -> String {
    match k {
        StepKind::Internal { kind } => format!("internal {}", kind.as_str()),
        StepKind::Agent { target, action } => {
            let what = match action {
                ActionTemplate::Generic { verb, .. } => verb.clone(),
                ActionTemplate::Maintenance { enabled, .. } => {
                    format!("maintenance {}", if *enabled { "on" } else { "off" })
                }
                ActionTemplate::Service { service, start } => {
                    format!(
                        "service {} {service}",
                        if *start { "start" } else { "stop" }
                    )
                }
                ActionTemplate::Smoke { .. } => "smoke-test".into(),
            };
            let on = match target {
                Target::Host { host } => host.clone(),
                Target::Selector { region, role } => format!("region={region} role={role}"),
            };
            format!("agent {what} on {on}")
        }
    }
}

#[cfg(test)]
#[path = "operations_tests.rs"]
mod tests;

/// Notes for `drctl status`: topology warnings (e.g. no witness: automatic failover
/// refused) and operations waiting for an operator.
pub fn status_notes(state: &State) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(t) = &state.ops.topology {
        notes.extend(t.spec.warnings());
    }
    for o in state.ops.operations.values() {
        if o.state == OpState::NeedsOperator {
            notes.push(format!(
                "operation {} ({} of {}) needs an operator: {}",
                o.id,
                o.kind.as_str(),
                o.cluster,
                o.reason
            ));
        }
        if o.state == OpState::Running {
            notes.push(format!(
                "operation {} ({} of {} to {}) is running: drctl operations watch {}",
                o.id,
                o.kind.as_str(),
                o.cluster,
                o.to_region,
                o.id
            ));
        }
    }
    notes
}
