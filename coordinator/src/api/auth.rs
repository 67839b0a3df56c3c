//! Authorisation: the one place that maps identities to what they may do.
//!
//! Why one place: a permission rule spread over handlers is a rule nobody can review.
//! Every Control API handler names the [`Permission`] it needs and calls [`authorize`];
//! the table below is the whole policy:
//!
//! | permission | who                                          |
//! |------------|----------------------------------------------|
//! | `WhoAmI`   | any authenticated certificate                |
//! | `Read`     | operator certificates with role >= viewer    |
//! | `Act`      | operator certificates with role >= operator  |
//! | `Admin`    | operator certificates with role admin        |
//!
//! Agents and coordinators never use the Control API (except `WhoAmI`): an agent
//! certificate that leaks must not be able to run actions on other hosts.

use dr_proto::identity::{Identity, Role, SpiffeId};

use crate::Ctx;
use crate::control::security_alerts::RefusedRpc;
use crate::metrics::RefusedLabels;

/// What a Control API call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    /// Ask who you are.
    WhoAmI,
    /// Read state: Status, ListAgents, GetAgent, ListCommands, ClusterStatus.
    Read,
    /// Run or cancel actions.
    Act,
    /// Membership and policy: ClusterInit, ClusterAddNode, ClusterRemoveNode.
    Admin,
}

impl Permission {
    /// The least operator role that holds this permission (`None`: anyone).
    pub fn required_role(self) -> Option<Role> {
        match self {
            Permission::WhoAmI => None,
            Permission::Read => Some(Role::Viewer),
            Permission::Act => Some(Role::Operator),
            Permission::Admin => Some(Role::Admin),
        }
    }
}

/// Why a call was refused. The messages say what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "{identity} may not call {rpc}: this is {kind} certificate; use an operator certificate issued with `drctl cert issue --kind operator`"
    )]
    NotOperator {
        identity: String,
        kind: &'static str,
        rpc: &'static str,
    },
    #[error(
        "{identity} may not call {rpc}: its role is {role}, and {rpc} needs role {needed}; ask an admin for a certificate issued with `--role {needed}`"
    )]
    RoleTooLow {
        identity: String,
        role: Role,
        needed: Role,
        rpc: &'static str,
    },
}

impl AuthError {
    /// Label for `rpc_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::NotOperator { .. } => "not_operator",
            AuthError::RoleTooLow { .. } => "role_too_low",
        }
    }
}

/// Decides whether `id` may call `rpc`. Pure: the table test below covers it.
pub fn decide(id: &SpiffeId, rpc: &'static str, perm: Permission) -> Result<(), AuthError> {
    let Some(needed) = perm.required_role() else {
        return Ok(());
    };
    match &id.identity {
        Identity::Operator { role, .. } if *role >= needed => Ok(()),
        Identity::Operator { role, .. } => Err(AuthError::RoleTooLow {
            identity: id.to_string(),
            role: *role,
            needed,
            rpc,
        }),
        Identity::Agent { .. } => Err(AuthError::NotOperator {
            identity: id.to_string(),
            kind: "an agent",
            rpc,
        }),
        Identity::Coordinator { .. } => Err(AuthError::NotOperator {
            identity: id.to_string(),
            kind: "a coordinator",
            rpc,
        }),
    }
}

/// Authenticates the caller of `req` and authorises `perm`. Refusals are counted in
/// `rpc_refused_total` and handed to security monitoring (repeated ones raise an alert).
pub fn authorize<T>(
    ctx: &Ctx,
    req: &tonic::Request<T>,
    rpc: &'static str,
    perm: Permission,
) -> Result<SpiffeId, tonic::Status> {
    let remote = req
        .extensions()
        .get::<dr_proto::tls::PeerInfo>()
        .map(|p| p.remote_addr);
    let record = |identity: Option<String>, reason: &'static str| {
        refused(ctx, reason);
        ctx.metrics.refused_rpcs.push(RefusedRpc {
            identity,
            remote,
            rpc,
            reason,
        });
    };
    let id = dr_proto::tls::peer_identity(req).inspect_err(|_| record(None, "unauthenticated"))?;
    match decide(&id, rpc, perm) {
        Ok(()) => Ok(id),
        Err(e) => {
            record(Some(id.to_string()), e.reason());
            tracing::info!(identity = %id, rpc, reason = e.reason(), "rpc refused");
            Err(tonic::Status::permission_denied(e.to_string()))
        }
    }
}

/// Counts a refused call in `rpc_refused_total`.
pub fn refused(ctx: &Ctx, reason: &str) {
    ctx.metrics
        .rpc_refused_total
        .get_or_create(&RefusedLabels {
            reason: reason.to_owned(),
        })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(identity: Identity) -> SpiffeId {
        SpiffeId {
            trust_domain: "dr.test".into(),
            identity,
        }
    }

    fn op(role: Role) -> SpiffeId {
        id(Identity::Operator {
            name: "alice".into(),
            role,
        })
    }

    #[test]
    fn t10_permission_table() {
        use Permission::*;
        let agent = id(Identity::Agent {
            host_id: "db-1".into(),
        });
        let coord = id(Identity::Coordinator { node_id: 1 });
        let viewer = op(Role::Viewer);
        let operator = op(Role::Operator);
        let admin = op(Role::Admin);
        // (who, permission, allowed)
        let table: Vec<(&SpiffeId, Permission, bool)> = vec![
            (&agent, WhoAmI, true),
            (&agent, Read, false),
            (&agent, Act, false),
            (&agent, Admin, false),
            (&coord, WhoAmI, true),
            (&coord, Read, false),
            (&coord, Admin, false),
            (&viewer, WhoAmI, true),
            (&viewer, Read, true),
            (&viewer, Act, false),
            (&viewer, Admin, false),
            (&operator, Read, true),
            (&operator, Act, true),
            (&operator, Admin, false),
            (&admin, Read, true),
            (&admin, Act, true),
            (&admin, Admin, true),
        ];
        for (who, perm, allowed) in table {
            assert_eq!(decide(who, "Rpc", perm).is_ok(), allowed, "{who} {perm:?}");
        }
    }

    #[test]
    fn t20_messages_name_identity_role_and_need() {
        let e = decide(&op(Role::Viewer), "RunAction", Permission::Act).unwrap_err();
        assert_eq!(
            e.to_string(),
            "spiffe://dr.test/operator/alice?role=viewer may not call RunAction: its role is viewer, and RunAction needs role operator; ask an admin for a certificate issued with `--role operator`"
        );
        let e = decide(
            &id(Identity::Agent {
                host_id: "db-1".into(),
            }),
            "Status",
            Permission::Read,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains(
                "this is an agent certificate; use an operator certificate issued with `drctl cert issue --kind operator`"
            ),
            "{e}"
        );
        assert_eq!(e.reason(), "not_operator");
    }
}
