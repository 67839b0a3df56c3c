//! Security response state: which hosts are isolated, which certificates are revoked, the
//! monitoring level, and the security alerts raised.
//!
//! Why in the replicated state: a revocation must hold on every coordinator, also on one
//! that was down while it was decided (it catches up from the log or a snapshot), and an
//! isolation must still be visible after the leader that ordered it is gone. Alerts live
//! here so that one alert is one committed entry (hence one audit entry), deduplicated the
//! same way on every node. Nothing here is secret: certificates are named by the SHA-256 of
//! their DER, never by content, and alert details carry paths, addresses and counts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use dr_proto::identity::SpiffeId;

use super::approvals::{request_name, same_operator};
use super::{Command, Refusal, Response, State};

/// Alerts kept in the state (the audit log keeps every one for good).
pub const ALERTS_KEPT: usize = 500;
pub const DEFAULT_REFUSAL_THRESHOLD: u32 = 5;
pub const DEFAULT_REFUSAL_WINDOW_S: u32 = 60;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecurityState {
    #[serde(default)]
    pub isolated: BTreeMap<String, Isolation>,
    /// Revoked certificates by hex SHA-256 of their DER.
    #[serde(default)]
    pub revoked: BTreeMap<String, Revocation>,
    /// `normal` (also when empty) or `high`.
    #[serde(default)]
    pub monitoring_level: String,
    /// 0: [`DEFAULT_REFUSAL_THRESHOLD`].
    #[serde(default)]
    pub refusal_threshold: u32,
    /// 0: [`DEFAULT_REFUSAL_WINDOW_S`].
    #[serde(default)]
    pub refusal_window_s: u32,
    #[serde(default)]
    pub alerts: Vec<Alert>,
    /// Certificate rotations granted by an approval, by approval request id. Certificate
    /// rotation is interactive (CSRs out, signed certificates back), so the approval cannot
    /// launch it: it grants the requester the right to run its steps until the expiry.
    #[serde(default)]
    pub cert_grants: BTreeMap<u64, CertGrant>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertGrant {
    /// SPIFFE id of the requester; only the same operator (by name) may use the grant.
    pub requester: String,
    pub granted_at_unix_ms: i64,
    pub expires_at_unix_ms: i64,
}

/// Why a certificate rotation step is refused under the approvals policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error(
        "needs approval: no certificate rotation was granted by {name}; run `drctl rotate-credentials --emergency --scope certs` without --approved to request one, and run again with --approved R-N after another admin approved it",
        name = request_name(*id)
    )]
    Missing { id: u64 },
    #[error(
        "the certificate rotation granted by {name} expired at {expired_at_unix_ms} (unix ms): request a new one (run again without --approved) and have another admin approve it",
        name = request_name(*id)
    )]
    Expired { id: u64, expired_at_unix_ms: i64 },
    #[error(
        "the certificate rotation granted by {name} belongs to {requester}, not to {caller}: only its requester may use it",
        name = request_name(*id)
    )]
    NotYours {
        id: u64,
        requester: String,
        caller: String,
    },
}

impl SecurityState {
    pub fn level(&self) -> &str {
        if self.monitoring_level.is_empty() {
            "normal"
        } else {
            &self.monitoring_level
        }
    }

    pub fn threshold(&self) -> u32 {
        if self.refusal_threshold == 0 {
            DEFAULT_REFUSAL_THRESHOLD
        } else {
            self.refusal_threshold
        }
    }

    pub fn window_s(&self) -> u32 {
        if self.refusal_window_s == 0 {
            DEFAULT_REFUSAL_WINDOW_S
        } else {
            self.refusal_window_s
        }
    }

    /// `Ok` when approval `id` granted a certificate rotation to `caller` (same operator
    /// name, whatever role) that has not expired at `now`.
    pub fn check_grant(&self, id: u64, caller: &str, now: i64) -> Result<(), GrantError> {
        let Some(g) = self.cert_grants.get(&id) else {
            return Err(GrantError::Missing { id });
        };
        let same = match (caller.parse::<SpiffeId>(), g.requester.parse::<SpiffeId>()) {
            (Ok(c), Ok(r)) => same_operator(&c, &r),
            _ => caller == g.requester,
        };
        if !same {
            return Err(GrantError::NotYours {
                id,
                requester: g.requester.clone(),
                caller: caller.to_owned(),
            });
        }
        if now > g.expires_at_unix_ms {
            return Err(GrantError::Expired {
                id,
                expired_at_unix_ms: g.expires_at_unix_ms,
            });
        }
        Ok(())
    }

    /// The newest alert of `kind` from `source`, if any.
    pub fn last_alert(&self, kind: &str, source: &str) -> Option<&Alert> {
        self.alerts
            .iter()
            .rev()
            .find(|a| a.kind == kind && a.source == source)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Isolation {
    pub since_unix_ms: i64,
    pub by: String,
    pub reason: String,
    #[serde(default)]
    pub allow_mgmt: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revocation {
    pub identity: String,
    pub at_unix_ms: i64,
    pub by: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Alert {
    pub seq: u64,
    pub at_unix_ms: i64,
    pub kind: String,
    pub source: String,
    pub detail: String,
    pub count: u64,
}

/// A certificate to revoke.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevokeCert {
    pub sha256: String,
    pub identity: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SecurityCommand {
    /// The host's agent reported the isolation rules installed.
    Isolated {
        host_id: String,
        reason: String,
        #[serde(default)]
        allow_mgmt: Vec<String>,
    },
    /// The host's agent restored its pre-isolation ruleset.
    Unisolated { host_id: String },
    Revoke {
        certs: Vec<RevokeCert>,
        reason: String,
    },
    SetMonitoring {
        level: String,
        refusal_threshold: u32,
        refusal_window_s: u32,
    },
    /// Deduplicated by the proposer (see `control::security_alerts`); `apply` only
    /// appends and bounds the list.
    RaiseAlert {
        kind: String,
        source: String,
        detail: String,
        count: u64,
    },
    /// The launch of an approved certificate rotation (scope certs or all): the requester
    /// may run the certificate steps with `--approved R-N` until `expires_at_unix_ms`.
    /// `then` is what else the approval launches (the secrets fan-out of scope all),
    /// applied first; the grant is recorded only if it was not refused.
    GrantCertRotation {
        request: u64,
        requester: String,
        expires_at_unix_ms: i64,
        #[serde(default)]
        then: Option<Box<Command>>,
    },
}

impl SecurityCommand {
    pub fn name(&self) -> &'static str {
        match self {
            SecurityCommand::Isolated { .. } => "security_isolated",
            SecurityCommand::Unisolated { .. } => "security_unisolated",
            SecurityCommand::Revoke { .. } => "security_revoke",
            SecurityCommand::SetMonitoring { .. } => "security_set_monitoring",
            SecurityCommand::RaiseAlert { .. } => "security_alert",
            SecurityCommand::GrantCertRotation { .. } => "security_grant_cert_rotation",
        }
    }

    /// What the audit entry names as target.
    pub fn target(&self) -> String {
        match self {
            SecurityCommand::Isolated { host_id, .. } | SecurityCommand::Unisolated { host_id } => {
                host_id.clone()
            }
            SecurityCommand::Revoke { certs, .. } => certs
                .iter()
                .map(|c| format!("{} sha256:{}", c.identity, short(&c.sha256)))
                .collect::<Vec<_>>()
                .join(","),
            SecurityCommand::SetMonitoring {
                level,
                refusal_threshold,
                refusal_window_s,
            } => format!(
                "level={level} refusal_threshold={refusal_threshold} refusal_window_s={refusal_window_s}"
            ),
            SecurityCommand::RaiseAlert {
                kind,
                source,
                detail,
                count,
            } => format!("{kind} from {source} (x{count}): {detail}"),
            SecurityCommand::GrantCertRotation {
                request,
                requester,
                expires_at_unix_ms,
                ..
            } => format!(
                "{} to {requester} until {expires_at_unix_ms}",
                request_name(*request)
            ),
        }
    }
}

fn short(h: &str) -> &str {
    &h[..16.min(h.len())]
}

fn invalid(message: impl Into<String>) -> Response {
    Response::refused(Refusal::Invalid {
        message: message.into(),
    })
}

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Applies one security command (validated first, refused as a whole).
pub fn apply(
    state: &mut State,
    log_index: u64,
    at: i64,
    origin: &str,
    cmd: &SecurityCommand,
) -> Response {
    if let SecurityCommand::GrantCertRotation {
        request,
        requester,
        expires_at_unix_ms,
        then,
    } = cmd
    {
        return grant(
            state,
            log_index,
            at,
            *request,
            requester,
            *expires_at_unix_ms,
            then.as_deref(),
        );
    }
    let sec = &mut state.security;
    match cmd {
        SecurityCommand::GrantCertRotation { .. } => Response::Unchanged,
        SecurityCommand::Isolated {
            host_id,
            reason,
            allow_mgmt,
        } => {
            if !state.hosts.contains_key(host_id) {
                return Response::refused(Refusal::UnknownHost {
                    host_id: host_id.clone(),
                });
            }
            if sec.isolated.contains_key(host_id) {
                return Response::Unchanged;
            }
            sec.isolated.insert(
                host_id.clone(),
                Isolation {
                    since_unix_ms: at,
                    by: origin.to_owned(),
                    reason: reason.clone(),
                    allow_mgmt: allow_mgmt.clone(),
                },
            );
            Response::Applied
        }
        SecurityCommand::Unisolated { host_id } => {
            if sec.isolated.remove(host_id).is_some() {
                Response::Applied
            } else {
                Response::Unchanged
            }
        }
        SecurityCommand::Revoke { certs, reason } => {
            if certs.is_empty() {
                return invalid("nothing to revoke");
            }
            if let Some(bad) = certs.iter().find(|c| !is_sha256_hex(&c.sha256)) {
                return invalid(format!(
                    "revocation of {} names {:?}, not a lowercase hex SHA-256",
                    bad.identity, bad.sha256
                ));
            }
            let mut changed = false;
            for c in certs {
                if !sec.revoked.contains_key(&c.sha256) {
                    sec.revoked.insert(
                        c.sha256.clone(),
                        Revocation {
                            identity: c.identity.clone(),
                            at_unix_ms: at,
                            by: origin.to_owned(),
                            reason: reason.clone(),
                        },
                    );
                    changed = true;
                }
            }
            if changed {
                Response::Applied
            } else {
                Response::Unchanged
            }
        }
        SecurityCommand::SetMonitoring {
            level,
            refusal_threshold,
            refusal_window_s,
        } => {
            if level != "normal" && level != "high" {
                return invalid(format!(
                    "monitoring level {level:?} is unknown: use normal or high"
                ));
            }
            let before = sec.clone();
            sec.monitoring_level = level.clone();
            if *refusal_threshold > 0 {
                sec.refusal_threshold = *refusal_threshold;
            }
            if *refusal_window_s > 0 {
                sec.refusal_window_s = *refusal_window_s;
            }
            if *sec == before {
                Response::Unchanged
            } else {
                Response::Applied
            }
        }
        SecurityCommand::RaiseAlert {
            kind,
            source,
            detail,
            count,
        } => {
            let seq = sec.alerts.last().map_or(1, |a| a.seq + 1);
            sec.alerts.push(Alert {
                seq,
                at_unix_ms: at,
                kind: kind.clone(),
                source: source.clone(),
                detail: detail.clone(),
                count: *count,
            });
            if sec.alerts.len() > ALERTS_KEPT {
                let excess = sec.alerts.len() - ALERTS_KEPT;
                sec.alerts.drain(..excess);
            }
            Response::Applied
        }
    }
}

fn grant(
    state: &mut State,
    log_index: u64,
    at: i64,
    request: u64,
    requester: &str,
    expires_at_unix_ms: i64,
    then: Option<&Command>,
) -> Response {
    if requester.is_empty() {
        return invalid("a certificate rotation grant names its requester");
    }
    if state.security.cert_grants.contains_key(&request) {
        return Response::Unchanged;
    }
    if let Some(cmd) = then {
        if matches!(cmd, Command::Approvals(_) | Command::Security(_)) || cmd.name() == "batch" {
            return invalid(format!(
                "a certificate rotation grant may not carry a `{}` command",
                cmd.name()
            ));
        }
        // Its own audit entry, as the requester (like every approved launch).
        let inner = super::Request {
            at_unix_ms: at,
            origin: requester.to_owned(),
            cmd: cmd.clone(),
        };
        if let Response::Refused { refusal } = super::apply(state, log_index, &inner) {
            return Response::refused(refusal);
        }
    }
    let grants = &mut state.security.cert_grants;
    grants.retain(|_, g| g.expires_at_unix_ms >= at);
    grants.insert(
        request,
        CertGrant {
            requester: requester.to_owned(),
            granted_at_unix_ms: at,
            expires_at_unix_ms,
        },
    );
    Response::Applied
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, Request, apply as apply_req};

    fn req(at: i64, cmd: SecurityCommand) -> Request {
        Request {
            at_unix_ms: at,
            origin: "spiffe://t/operator/alice?role=admin".into(),
            cmd: Command::Security(cmd),
        }
    }

    #[test]
    fn revocation_is_idempotent_and_validated() {
        let mut s = State::default();
        let fp = "ab".repeat(32);
        let revoke = |fp: &str| SecurityCommand::Revoke {
            certs: vec![RevokeCert {
                sha256: fp.into(),
                identity: "spiffe://t/agent/a".into(),
            }],
            reason: "emergency".into(),
        };
        assert_eq!(
            apply_req(&mut s, 1, &req(10, revoke(&fp))),
            Response::Applied
        );
        assert_eq!(
            apply_req(&mut s, 2, &req(11, revoke(&fp))),
            Response::Unchanged
        );
        assert!(matches!(
            apply_req(&mut s, 3, &req(12, revoke("nothex"))),
            Response::Refused { .. }
        ));
        assert_eq!(s.security.revoked.len(), 1);
        assert_eq!(s.audit.entries().last().unwrap().what, "security_revoke");
    }

    #[test]
    fn isolation_needs_a_known_host_and_monitoring_a_known_level() {
        let mut s = State::default();
        let iso = SecurityCommand::Isolated {
            host_id: "ghost".into(),
            reason: "breach".into(),
            allow_mgmt: vec![],
        };
        assert!(matches!(
            apply_req(&mut s, 1, &req(1, iso)),
            Response::Refused { .. }
        ));
        let bad = SecurityCommand::SetMonitoring {
            level: "paranoid".into(),
            refusal_threshold: 0,
            refusal_window_s: 0,
        };
        assert!(matches!(
            apply_req(&mut s, 2, &req(2, bad)),
            Response::Refused { .. }
        ));
        let high = SecurityCommand::SetMonitoring {
            level: "high".into(),
            refusal_threshold: 3,
            refusal_window_s: 0,
        };
        assert_eq!(apply_req(&mut s, 3, &req(3, high)), Response::Applied);
        assert_eq!(s.security.level(), "high");
        assert_eq!(s.security.threshold(), 3);
        assert_eq!(s.security.window_s(), DEFAULT_REFUSAL_WINDOW_S);
    }

    #[test]
    fn alerts_are_numbered_and_bounded() {
        let mut s = State::default();
        for i in 0..(ALERTS_KEPT + 3) {
            let a = SecurityCommand::RaiseAlert {
                kind: "refused-handshakes".into(),
                source: "127.0.0.9".into(),
                detail: format!("{i}"),
                count: 5,
            };
            apply_req(&mut s, i as u64 + 1, &req(1, a));
        }
        assert_eq!(s.security.alerts.len(), ALERTS_KEPT);
        assert_eq!(
            s.security.alerts.last().unwrap().seq,
            (ALERTS_KEPT + 3) as u64
        );
    }

    #[test]
    fn cert_rotation_grant_is_for_its_requester_until_it_expires() {
        let mut s = State::default();
        let alice = "spiffe://t/operator/alice?role=admin";
        let g = SecurityCommand::GrantCertRotation {
            request: 7,
            requester: alice.into(),
            expires_at_unix_ms: 5_000,
            then: None,
        };
        assert_eq!(
            apply_req(&mut s, 1, &req(1_000, g.clone())),
            Response::Applied
        );
        assert_eq!(apply_req(&mut s, 2, &req(1_001, g)), Response::Unchanged);
        assert_eq!(
            s.audit.entries().last().unwrap().what,
            "security_grant_cert_rotation"
        );
        let sec = &s.security;
        // Same operator, whatever role the certificate carries.
        assert_eq!(
            sec.check_grant(7, "spiffe://t/operator/alice?role=operator", 2_000),
            Ok(())
        );
        assert!(matches!(
            sec.check_grant(7, "spiffe://t/operator/bob?role=admin", 2_000),
            Err(GrantError::NotYours { .. })
        ));
        assert!(matches!(
            sec.check_grant(8, alice, 2_000),
            Err(GrantError::Missing { id: 8 })
        ));
        assert!(matches!(
            sec.check_grant(7, alice, 5_001),
            Err(GrantError::Expired { .. })
        ));
        // A grant may not carry a security (or approvals) command.
        let nested = SecurityCommand::GrantCertRotation {
            request: 9,
            requester: alice.into(),
            expires_at_unix_ms: 5_000,
            then: Some(Box::new(Command::Security(SecurityCommand::Unisolated {
                host_id: "a".into(),
            }))),
        };
        assert!(matches!(
            apply_req(&mut s, 3, &req(1_002, nested)),
            Response::Refused { .. }
        ));
        assert!(!s.security.cert_grants.contains_key(&9));
    }

    #[test]
    fn a_grant_applies_what_it_carries_first_as_the_requester() {
        let mut s = State::default();
        let alice = "spiffe://t/operator/alice?role=admin";
        let g = SecurityCommand::GrantCertRotation {
            request: 3,
            requester: alice.into(),
            expires_at_unix_ms: 9_000,
            then: Some(Box::new(Command::HostUp {
                host_id: "h1".into(),
                region: "beijing".into(),
                site: "bj".into(),
                roles: vec![],
                version: "1".into(),
                incarnation: 1,
            })),
        };
        // Committed by the approver; the carried command and the grant are the requester's.
        let approver = Request {
            at_unix_ms: 1_000,
            origin: "spiffe://t/operator/bob?role=admin".into(),
            cmd: Command::Security(g),
        };
        assert_eq!(apply_req(&mut s, 1, &approver), Response::Applied);
        assert!(s.hosts.contains_key("h1"));
        assert_eq!(s.security.check_grant(3, alice, 2_000), Ok(()));
        let entries = s.audit.entries();
        let carried = &entries[entries.len() - 2];
        assert_eq!(carried.origin, alice, "{carried:?}");
    }
}
