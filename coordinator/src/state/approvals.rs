//! Two-person approvals: the policy, the pending requests, and their decisions.
//!
//! Why in the replicated state: an approval is only worth something if it cannot be lost,
//! replayed or decided twice. The request (with the full payload of the gated RPC), the
//! decision and the launch of the approved operation are all log entries; the launch is
//! committed INSIDE the approving entry ([`ApprovalCommand::Decide::launch`]) and applied
//! here with the requester as origin, so "approved" and "started" can never disagree, even
//! when the leader changes between the two: there is no between.
//!
//! The rules are checked here (not only in the API) so that a stale or forged proposal is
//! refused on every node alike: only an admin decides, nobody approves their own request,
//! a decided request stays decided, an expired one cannot be approved. Refusals change
//! nothing but the audit log, as for every command.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use dr_proto::identity::{Identity, Role, SpiffeId};
use serde::{Deserialize, Serialize};

use super::{Command, Refusal, Request, Response, State};

/// Operation kinds a policy may gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApprovalKind {
    Failover,
    RestoreInPlace,
    Isolate,
    Prune,
    RotateCredentials,
}

impl ApprovalKind {
    pub const ALL: [ApprovalKind; 5] = [
        ApprovalKind::Failover,
        ApprovalKind::RestoreInPlace,
        ApprovalKind::Isolate,
        ApprovalKind::Prune,
        ApprovalKind::RotateCredentials,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalKind::Failover => "failover",
            ApprovalKind::RestoreInPlace => "restore-in-place",
            ApprovalKind::Isolate => "isolate",
            ApprovalKind::Prune => "prune",
            ApprovalKind::RotateCredentials => "rotate-credentials",
        }
    }

    /// Parses the name shown by [`ApprovalKind::as_str`]; the error lists the valid names.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown operation kind `{s}`; use one of: {}",
                    Self::ALL.map(|k| k.as_str()).join(", ")
                )
            })
    }
}

impl fmt::Display for ApprovalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Default lifetime of a pending request.
pub const DEFAULT_TTL_SECS: u64 = 3600;
/// Bounds of a policy's TTL.
pub const MIN_TTL_SECS: u64 = 1;
pub const MAX_TTL_SECS: u64 = 7 * 24 * 3600;
/// Decided and expired requests kept for `drctl approvals list`; the audit log keeps all.
pub const DECIDED_KEPT: usize = 500;

/// Which kinds need a second admin. The default gates nothing, so a fresh cluster behaves
/// as before; production turns it on (docs/operator-guide.md, "Two-person approvals").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalPolicy {
    pub require: BTreeSet<ApprovalKind>,
    pub ttl_secs: u64,
    #[serde(default)]
    pub set_by: String,
    #[serde(default)]
    pub set_at_unix_ms: i64,
}

impl Default for ApprovalPolicy {
    fn default() -> Self {
        ApprovalPolicy {
            require: BTreeSet::new(),
            ttl_secs: DEFAULT_TTL_SECS,
            set_by: String::new(),
            set_at_unix_ms: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    Pending,
    Approved,
    Rejected,
}

/// A gated operation waiting for (or past) its decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    pub id: u64,
    /// Proposer-chosen idempotency key (a retried proposal finds its request by it).
    pub key: String,
    pub kind: ApprovalKind,
    pub target: String,
    /// The gated RPC's request message as JSON: what runs on approval.
    pub payload_json: String,
    /// SPIFFE id of the requester; the approved operation runs as them.
    pub requester: String,
    pub created_at_unix_ms: i64,
    pub expires_at_unix_ms: i64,
    pub state: RequestState,
    #[serde(default)]
    pub decided_by: String,
    #[serde(default)]
    pub decided_at_unix_ms: Option<i64>,
    #[serde(default)]
    pub reason: String,
    /// What the launch did (`create_operation: applied`...).
    #[serde(default)]
    pub launch_result: String,
}

impl ApprovalRequest {
    /// `R-N`, the name operators type.
    pub fn name(&self) -> String {
        request_name(self.id)
    }

    /// The state as shown to operators at time `now` (a pending request past its expiry
    /// shows `expired`).
    pub fn shown_state(&self, now: i64) -> &'static str {
        match self.state {
            RequestState::Pending if now > self.expires_at_unix_ms => "expired",
            RequestState::Pending => "pending",
            RequestState::Approved => "approved",
            RequestState::Rejected => "rejected",
        }
    }
}

pub fn request_name(id: u64) -> String {
    format!("R-{id}")
}

/// Parses `R-7`, `r-7` or `7`.
pub fn parse_request_name(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t
        .strip_prefix("R-")
        .or_else(|| t.strip_prefix("r-"))
        .unwrap_or(t);
    digits.parse::<u64>().map_err(|_| {
        format!(
            "`{s}` is not an approval request id; ids look like R-7 (see `drctl approvals list`)"
        )
    })
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalBook {
    #[serde(default)]
    pub policy: ApprovalPolicy,
    #[serde(default)]
    pub requests: BTreeMap<u64, ApprovalRequest>,
    #[serde(default)]
    pub next_id: u64,
}

impl ApprovalBook {
    pub fn requires(&self, kind: ApprovalKind) -> bool {
        self.policy.require.contains(&kind)
    }

    pub fn by_key(&self, key: &str) -> Option<&ApprovalRequest> {
        self.requests.values().rev().find(|r| r.key == key)
    }

    /// Checks a decision without changing anything: the API calls it to answer with the
    /// right code, and apply calls it again on the committed entry.
    pub fn check_decide(
        &self,
        id: u64,
        decider: &str,
        approve: bool,
        at: i64,
    ) -> Result<&ApprovalRequest, DecideError> {
        let Some(r) = self.requests.get(&id) else {
            return Err(DecideError::Unknown { id });
        };
        if r.state != RequestState::Pending {
            return Err(DecideError::AlreadyDecided {
                id,
                state: r.state,
                by: r.decided_by.clone(),
            });
        }
        let decider_id: Option<SpiffeId> = decider.parse().ok();
        let requester_id: Option<SpiffeId> = r.requester.parse().ok();
        let same_person = match (&decider_id, &requester_id) {
            (Some(d), Some(q)) => same_operator(d, q),
            _ => decider == r.requester,
        };
        let is_admin = decider_id
            .as_ref()
            .and_then(|d| d.identity.role())
            .is_some_and(|role| role >= Role::Admin);
        if approve {
            if !is_admin {
                return Err(DecideError::NotAdmin {
                    id,
                    who: decider.to_owned(),
                });
            }
            if same_person {
                return Err(DecideError::OwnRequest { id });
            }
            if at > r.expires_at_unix_ms {
                return Err(DecideError::Expired {
                    id,
                    expired_at_unix_ms: r.expires_at_unix_ms,
                });
            }
        } else if !is_admin && !same_person {
            return Err(DecideError::NotAdmin {
                id,
                who: decider.to_owned(),
            });
        }
        Ok(r)
    }

    /// Drops the oldest decided or expired requests beyond [`DECIDED_KEPT`].
    fn trim(&mut self, now: i64) {
        let closed: Vec<u64> = self
            .requests
            .values()
            .filter(|r| r.state != RequestState::Pending || now > r.expires_at_unix_ms)
            .map(|r| r.id)
            .collect();
        if closed.len() > DECIDED_KEPT {
            for id in &closed[..closed.len() - DECIDED_KEPT] {
                self.requests.remove(id);
            }
        }
    }
}

/// The same human: same trust domain and operator name, whatever role the certificate has.
pub fn same_operator(a: &SpiffeId, b: &SpiffeId) -> bool {
    match (&a.identity, &b.identity) {
        (Identity::Operator { name: x, .. }, Identity::Operator { name: y, .. }) => {
            a.trust_domain == b.trust_domain && x == y
        }
        _ => a == b,
    }
}

/// Why a decision is refused. Messages say what to do instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    #[error("approval request {} does not exist; see `drctl approvals list`", request_name(*id))]
    Unknown { id: u64 },
    #[error("approval request {} is already {} (by {by}); nothing to do", request_name(*id), match state { RequestState::Pending => "pending", RequestState::Approved => "approved", RequestState::Rejected => "rejected" })]
    AlreadyDecided {
        id: u64,
        state: RequestState,
        by: String,
    },
    #[error(
        "you requested {} yourself: the two-person rule needs ANOTHER admin to run `drctl approve {}`",
        request_name(*id),
        request_name(*id)
    )]
    OwnRequest { id: u64 },
    #[error(
        "{who} may not decide {}: only an admin certificate (role admin) approves, and only an admin or the requester rejects",
        request_name(*id)
    )]
    NotAdmin { id: u64, who: String },
    #[error(
        "approval request {} expired at {expired_at_unix_ms} (unix ms) and can no longer be approved; the requester must request the operation again",
        request_name(*id)
    )]
    Expired { id: u64, expired_at_unix_ms: i64 },
    #[error("approval request {} cannot be launched: {message}", request_name(*id))]
    Launch { id: u64, message: String },
}

/// Commands of the approvals book.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ApprovalCommand {
    /// Replace the policy (admin).
    SetPolicy {
        require: Vec<ApprovalKind>,
        ttl_secs: u64,
    },
    /// Record a gated request; the origin is the requester.
    Create {
        key: String,
        kind: ApprovalKind,
        target: String,
        payload_json: String,
    },
    /// Approve (with the launch, committed in this same entry) or reject.
    Decide {
        id: u64,
        approve: bool,
        #[serde(default)]
        reason: String,
        /// The state command the approved request runs, as the requester.
        #[serde(default)]
        launch: Option<Box<Command>>,
        /// Why no launch could be built (the approval is then refused and audited).
        #[serde(default)]
        launch_error: String,
    },
}

impl ApprovalCommand {
    pub fn name(&self) -> &'static str {
        match self {
            ApprovalCommand::SetPolicy { .. } => "approvals.set_policy",
            ApprovalCommand::Create { .. } => "approvals.request",
            ApprovalCommand::Decide { approve: true, .. } => "approvals.approve",
            ApprovalCommand::Decide { approve: false, .. } => "approvals.reject",
        }
    }

    /// Audit target: never the payload (it stays in the book), only what names the request.
    pub fn target(&self) -> String {
        match self {
            ApprovalCommand::SetPolicy { require, ttl_secs } => format!(
                "require=[{}] ttl={ttl_secs}s",
                require
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            ApprovalCommand::Create { kind, target, .. } => format!("{kind} {target}"),
            ApprovalCommand::Decide { id, .. } => request_name(*id),
        }
    }
}

/// Applies one approvals command. Returns the response and, for audit, a short outcome
/// (`None`: the generic applied/unchanged/refused text).
pub fn apply(
    state: &mut State,
    log_index: u64,
    at: i64,
    origin: &str,
    cmd: &ApprovalCommand,
) -> (Response, Option<String>) {
    match cmd {
        ApprovalCommand::SetPolicy { require, ttl_secs } => {
            if !(MIN_TTL_SECS..=MAX_TTL_SECS).contains(ttl_secs) {
                return (
                    invalid(format!(
                        "approval ttl {ttl_secs}s is out of range {MIN_TTL_SECS}s..{MAX_TTL_SECS}s"
                    )),
                    None,
                );
            }
            let require: BTreeSet<ApprovalKind> = require.iter().copied().collect();
            let p = &mut state.approvals.policy;
            if p.require == require && p.ttl_secs == *ttl_secs {
                return (Response::Unchanged, None);
            }
            *p = ApprovalPolicy {
                require,
                ttl_secs: *ttl_secs,
                set_by: origin.to_owned(),
                set_at_unix_ms: at,
            };
            (Response::Applied, None)
        }
        ApprovalCommand::Create {
            key,
            kind,
            target,
            payload_json,
        } => {
            if key.is_empty() {
                return (invalid("approval request without a key".into()), None);
            }
            if let Some(r) = state.approvals.by_key(key) {
                return (
                    Response::Unchanged,
                    Some(format!("unchanged: {}", r.name())),
                );
            }
            let book = &mut state.approvals;
            book.next_id += 1;
            let id = book.next_id;
            let ttl_ms =
                i64::try_from(book.policy.ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
            book.requests.insert(
                id,
                ApprovalRequest {
                    id,
                    key: key.clone(),
                    kind: *kind,
                    target: target.clone(),
                    payload_json: payload_json.clone(),
                    requester: origin.to_owned(),
                    created_at_unix_ms: at,
                    expires_at_unix_ms: at.saturating_add(ttl_ms),
                    state: RequestState::Pending,
                    decided_by: String::new(),
                    decided_at_unix_ms: None,
                    reason: String::new(),
                    launch_result: String::new(),
                },
            );
            book.trim(at);
            (
                Response::Applied,
                Some(format!("pending: {}", request_name(id))),
            )
        }
        ApprovalCommand::Decide {
            id,
            approve,
            reason,
            launch,
            launch_error,
        } => decide(
            state,
            log_index,
            at,
            origin,
            *id,
            *approve,
            reason,
            launch.as_deref(),
            launch_error,
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn decide(
    state: &mut State,
    log_index: u64,
    at: i64,
    origin: &str,
    id: u64,
    approve: bool,
    reason: &str,
    launch: Option<&Command>,
    launch_error: &str,
) -> (Response, Option<String>) {
    let requester = match state.approvals.check_decide(id, origin, approve, at) {
        Ok(r) => r.requester.clone(),
        Err(e) => return (invalid(e.to_string()), None),
    };
    let mut launch_result = String::new();
    if approve {
        let Some(cmd) = launch else {
            let message = if launch_error.is_empty() {
                "no launch was proposed".to_owned()
            } else {
                launch_error.to_owned()
            };
            return (
                invalid(DecideError::Launch { id, message }.to_string()),
                None,
            );
        };
        // Neither a nested decision nor a group-committed batch may ride on an approval.
        if matches!(cmd, Command::Approvals(_)) || cmd.name() == "batch" {
            return (
                invalid(
                    DecideError::Launch {
                        id,
                        message: format!("a launch may not be a `{}` command", cmd.name()),
                    }
                    .to_string(),
                ),
                None,
            );
        }
        let inner = Request {
            at_unix_ms: at,
            origin: requester,
            cmd: cmd.clone(),
        };
        // The launch gets its own audit entry (origin: the requester), right before this one.
        let resp = super::apply(state, log_index, &inner);
        if let Response::Refused { refusal } = &resp {
            return (
                invalid(
                    DecideError::Launch {
                        id,
                        message: format!("{} was refused: {refusal}", cmd.name()),
                    }
                    .to_string(),
                ),
                None,
            );
        }
        launch_result = format!("{}: {}", cmd.name(), short(&resp));
    }
    let Some(r) = state.approvals.requests.get_mut(&id) else {
        return (invalid(DecideError::Unknown { id }.to_string()), None);
    };
    r.state = if approve {
        RequestState::Approved
    } else {
        RequestState::Rejected
    };
    origin.clone_into(&mut r.decided_by);
    r.decided_at_unix_ms = Some(at);
    reason.clone_into(&mut r.reason);
    let outcome = if approve {
        format!("approved; launched {launch_result} as {}", r.requester)
    } else {
        "rejected".to_owned()
    };
    r.launch_result = launch_result;
    (Response::Applied, Some(outcome))
}

fn short(resp: &Response) -> &'static str {
    match resp {
        Response::Unchanged => "unchanged",
        Response::Refused { .. } => "refused",
        _ => "applied",
    }
}

fn invalid(message: String) -> Response {
    Response::refused(Refusal::Invalid { message })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "spiffe://dr.test/operator/alice?role=admin";
    const ALICE_OP: &str = "spiffe://dr.test/operator/alice?role=operator";
    const BOB: &str = "spiffe://dr.test/operator/bob?role=admin";
    const CAROL_OP: &str = "spiffe://dr.test/operator/carol?role=operator";

    fn run(state: &mut State, index: u64, at: i64, origin: &str, cmd: ApprovalCommand) -> Response {
        crate::state::apply(
            state,
            index,
            &Request {
                at_unix_ms: at,
                origin: origin.to_owned(),
                cmd: Command::Approvals(cmd),
            },
        )
    }

    fn policy(s: &mut State, ttl: u64) {
        let r = run(
            s,
            1,
            1,
            ALICE,
            ApprovalCommand::SetPolicy {
                require: vec![ApprovalKind::Failover],
                ttl_secs: ttl,
            },
        );
        assert_eq!(r, Response::Applied);
    }

    fn create(s: &mut State, at: i64, origin: &str, key: &str) -> u64 {
        let r = run(
            s,
            2,
            at,
            origin,
            ApprovalCommand::Create {
                key: key.into(),
                kind: ApprovalKind::Failover,
                target: "main -> shanghai".into(),
                payload_json: "{\"to_region\":\"shanghai\"}".into(),
            },
        );
        assert!(
            matches!(r, Response::Applied | Response::Unchanged),
            "{r:?}"
        );
        s.approvals.by_key(key).expect("created").id
    }

    /// A launch that needs no topology: registering a host always applies.
    fn launch() -> Option<Box<Command>> {
        Some(Box::new(Command::HostUp {
            host_id: "h9".into(),
            region: "beijing".into(),
            site: "bj".into(),
            roles: vec![],
            version: "1".into(),
            incarnation: 1,
        }))
    }

    fn decide(
        s: &mut State,
        at: i64,
        origin: &str,
        id: u64,
        approve: bool,
        launch: Option<Box<Command>>,
    ) -> Response {
        run(
            s,
            3,
            at,
            origin,
            ApprovalCommand::Decide {
                id,
                approve,
                reason: String::new(),
                launch,
                launch_error: String::new(),
            },
        )
    }

    fn refusal(r: &Response) -> String {
        match r {
            Response::Refused { refusal } => refusal.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn t10_create_is_idempotent_and_expires_by_policy_ttl() {
        let mut s = State::default();
        assert!(!s.approvals.requires(ApprovalKind::Failover));
        policy(&mut s, 60);
        assert!(s.approvals.requires(ApprovalKind::Failover));
        let a = create(&mut s, 1_000, ALICE_OP, "k1");
        let again = create(&mut s, 1_500, ALICE_OP, "k1");
        assert_eq!((a, again), (1, 1));
        let b = create(&mut s, 2_000, CAROL_OP, "k2");
        assert_eq!(b, 2);
        let r = &s.approvals.requests[&1];
        assert_eq!(r.expires_at_unix_ms, 61_000);
        assert_eq!(r.requester, ALICE_OP);
        assert_eq!(r.shown_state(61_000), "pending");
        assert_eq!(r.shown_state(61_001), "expired");
        assert_eq!(r.name(), "R-1");
        assert_eq!(parse_request_name("R-12"), Ok(12));
        assert_eq!(parse_request_name("12"), Ok(12));
        assert!(parse_request_name("X-1").is_err());
        // TTL bounds.
        let r = run(
            &mut s,
            4,
            1,
            ALICE,
            ApprovalCommand::SetPolicy {
                require: vec![],
                ttl_secs: 0,
            },
        );
        assert!(refusal(&r).contains("out of range"));
    }

    #[test]
    fn t20_state_machine_rules() {
        let mut s = State::default();
        policy(&mut s, 60);
        let id = create(&mut s, 1_000, ALICE_OP, "k1");
        // The requester, under another certificate of the same name, may not approve.
        let r = decide(&mut s, 2_000, ALICE, id, true, launch());
        assert!(refusal(&r).contains("yourself"), "{r:?}");
        // An operator may not approve.
        let r = decide(&mut s, 2_000, CAROL_OP, id, true, launch());
        assert!(refusal(&r).contains("only an admin"), "{r:?}");
        // An approval without a launch is refused with the reason.
        let r = run(
            &mut s,
            3,
            2_000,
            BOB,
            ApprovalCommand::Decide {
                id,
                approve: true,
                reason: String::new(),
                launch: None,
                launch_error: "topology changed".into(),
            },
        );
        assert!(refusal(&r).contains("topology changed"), "{r:?}");
        assert_eq!(s.approvals.requests[&id].state, RequestState::Pending);
        // Another admin approves: the launch runs as the requester, in the same entry.
        let before = s.audit.len();
        assert_eq!(
            decide(&mut s, 3_000, BOB, id, true, launch()),
            Response::Applied
        );
        let req = &s.approvals.requests[&id];
        assert_eq!(req.state, RequestState::Approved);
        assert_eq!(req.decided_by, BOB);
        let new: Vec<_> = s.audit.entries()[before..].to_vec();
        assert_eq!(new.len(), 2, "launch entry + approval entry: {new:?}");
        assert_eq!(
            (new[0].origin.as_str(), new[0].what.as_str()),
            (ALICE_OP, "host_up")
        );
        assert_eq!(
            (new[1].origin.as_str(), new[1].what.as_str()),
            (BOB, "approvals.approve")
        );
        assert!(
            new[1].result.starts_with("approved; launched host_up"),
            "{:?}",
            new[1]
        );
        // Exactly once: a second approval (a retry after a leader change) is refused.
        let r = decide(&mut s, 3_500, BOB, id, true, launch());
        assert!(refusal(&r).contains("already approved"), "{r:?}");
        assert_eq!(
            s.audit.len(),
            before + 3,
            "the refused retry launched nothing"
        );
    }

    #[test]
    fn t30_expired_and_rejected() {
        let mut s = State::default();
        policy(&mut s, 10);
        let id = create(&mut s, 1_000, ALICE_OP, "k1");
        let r = decide(&mut s, 11_001, BOB, id, true, launch());
        assert!(refusal(&r).contains("expired"), "{r:?}");
        // Rejecting works for the requester (withdraw) and admins, not other operators.
        let id2 = create(&mut s, 20_000, ALICE_OP, "k2");
        let r = decide(&mut s, 20_001, CAROL_OP, id2, false, None);
        assert!(refusal(&r).contains("only an admin"), "{r:?}");
        assert_eq!(
            decide(&mut s, 20_002, ALICE_OP, id2, false, None),
            Response::Applied
        );
        assert_eq!(s.approvals.requests[&id2].state, RequestState::Rejected);
        let r = decide(&mut s, 20_003, BOB, id2, true, launch());
        assert!(refusal(&r).contains("already rejected"), "{r:?}");
        let r = decide(&mut s, 20_003, BOB, 77, true, launch());
        assert!(refusal(&r).contains("R-77 does not exist"), "{r:?}");
    }

    #[test]
    fn t40_nested_launch_refused_and_serde_roundtrip() {
        let mut s = State::default();
        policy(&mut s, 60);
        let id = create(&mut s, 1_000, ALICE_OP, "k1");
        let nested = Some(Box::new(Command::Approvals(ApprovalCommand::Decide {
            id,
            approve: true,
            reason: String::new(),
            launch: launch(),
            launch_error: String::new(),
        })));
        let r = decide(&mut s, 2_000, BOB, id, true, nested.clone());
        assert!(refusal(&r).contains("may not be"), "{r:?}");
        let cmd = Command::Approvals(ApprovalCommand::Decide {
            id,
            approve: true,
            reason: "ok".into(),
            launch: launch(),
            launch_error: String::new(),
        });
        let back: Command = serde_json::from_str(&serde_json::to_string(&cmd).unwrap()).unwrap();
        assert_eq!(back, cmd);
        let snap: State = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(snap.approvals, s.approvals);
        // A snapshot from before approvals existed still loads.
        let mut v = serde_json::to_value(&s).unwrap();
        v.as_object_mut().unwrap().remove("approvals");
        let old: State = serde_json::from_value(v).unwrap();
        assert_eq!(old.approvals, ApprovalBook::default());
    }
}
