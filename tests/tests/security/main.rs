//! Acceptance suite of the security-response issue (issue 6), against the REAL binaries.
//!
//! t10: two-person approvals (a gated failover waits for a second admin; self-approval,
//! non-admins and expired requests are refused). t20: the hash-chained audit log (edited,
//! removed and reordered entries are each named by `drctl audit verify`). t30: drctl
//! isolate/unisolate with the agent inside a test network namespace. t40: emergency
//! rotation with real PostgreSQL and the no-secret-anywhere search. t50: monitoring level,
//! integrity and refused-handshake alerts. t41: certificates of agents AND coordinators
//! re-issued without restart, old ones refused, open sessions of revoked certificates
//! closed, an operator certificate revoked. t42: certificate rotation under the approvals
//! policy (granted by a second admin, used only by its requester). t51: repeated refused
//! RPCs raise an alert.
#![allow(clippy::unwrap_used)]

mod t10_approvals;
mod t20_audit;
mod t30_isolate;
mod t40_rotation;
mod t41_cert_revocation;
mod t42_cert_rotation_approval;
mod t50_alerts;
mod t51_refused_rpcs;
