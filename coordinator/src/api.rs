//! The coordinator's gRPC services, kept thin.
//!
//! Why thin: handlers authorise ([`auth`]), translate wire messages into state-machine
//! requests, and map every domain error through the one table in [`error`]. Decisions live
//! in [`crate::state`] and [`crate::control`], so they can be tested without a network.

pub mod agent;
pub mod auth;
pub mod backup;
pub mod control;
pub mod error;
pub mod operations;
pub mod restore;
pub mod response;
pub mod security;

/// Milliseconds since the Unix epoch from the system clock. Only proposers call this: the
/// state machine gets time from the request, never from a clock.
pub fn now_unix_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod t50_session;
#[cfg(test)]
mod t51_leader_change;
