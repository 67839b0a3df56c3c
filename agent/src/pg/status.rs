//! What one PostgreSQL server looks like right now, and its heartbeat facts.
//!
//! The coordinator decides failovers from these numbers (who is primary, how far behind each
//! replica is), so every field says where it came from and `None` means "unknown", never 0.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::lsn::Lsn;
use super::markers::{Epoch, FenceMarker};

/// The server's role as seen from this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    Replica,
    Stopped,
    /// A postmaster runs but does not answer queries (starting, shutting down, wedged).
    Unknown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Stopped => "stopped",
            Role::Unknown => "unknown",
        }
    }
}

/// One row of `pg_stat_replication` (on a primary).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplicationClient {
    pub application_name: String,
    pub client_addr: String,
    pub state: String,
    pub sync_state: String,
    pub sent_lsn: Option<Lsn>,
    pub flush_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// `pg_current_wal_lsn() - replay_lsn`.
    pub lag_bytes: Option<u64>,
    /// `replay_lag` (NULL once an idle standby has caught up: reported as 0).
    pub lag_seconds: f64,
}

/// `pg_stat_wal_receiver` (on a replica).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WalReceiver {
    pub status: String,
    pub sender_host: String,
    pub sender_port: i32,
    pub slot_name: String,
    pub received_timeline: u32,
    pub flushed_lsn: Option<Lsn>,
    pub last_msg_receipt: Option<DateTime<Utc>>,
}

/// Snapshot from [`super::PgInstance::status`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PgStatus {
    pub running: bool,
    pub pid: Option<u32>,
    /// None when stopped or unreachable.
    pub in_recovery: Option<bool>,
    pub timeline: Option<u32>,
    pub system_identifier: Option<u64>,
    /// Primary: `pg_current_wal_lsn()`. Stopped: the last checkpoint location.
    pub current_lsn: Option<Lsn>,
    /// Replica: `pg_last_wal_receive_lsn()`.
    pub receive_lsn: Option<Lsn>,
    /// Replica: `pg_last_wal_replay_lsn()`.
    pub replay_lsn: Option<Lsn>,
    /// Replica: `pg_last_xact_replay_timestamp()`.
    pub last_replay_at: Option<DateTime<Utc>>,
    /// Replica: 0 when everything received is replayed, else now - last replay.
    pub replay_lag_seconds: Option<f64>,
    pub replication: Vec<ReplicationClient>,
    pub wal_receiver: Option<WalReceiver>,
    pub epoch: Epoch,
    pub fenced: Option<FenceMarker>,
    /// Running but the queries failed: why.
    pub error: Option<String>,
}

impl PgStatus {
    pub fn role(&self) -> Role {
        match (self.running, self.in_recovery) {
            (false, _) => Role::Stopped,
            (true, Some(false)) => Role::Primary,
            (true, Some(true)) => Role::Replica,
            (true, None) => Role::Unknown,
        }
    }

    /// Lag of the slowest client (primary) or of this replica's replay behind its receive.
    pub fn lag_bytes(&self) -> Option<u64> {
        match self.role() {
            Role::Primary => Some(
                self.replication
                    .iter()
                    .filter_map(|c| c.lag_bytes)
                    .max()
                    .unwrap_or(0),
            ),
            Role::Replica => Some(self.receive_lsn?.bytes_since(self.replay_lsn?)),
            _ => None,
        }
    }

    pub fn lag_seconds(&self) -> Option<f64> {
        match self.role() {
            Role::Primary => Some(
                self.replication
                    .iter()
                    .map(|c| c.lag_seconds)
                    .fold(0.0, f64::max),
            ),
            Role::Replica => self.replay_lag_seconds,
            _ => None,
        }
    }

    /// Flat string facts for heartbeats. Keys are stable: the coordinator reads them.
    /// role, lsn, replay_lsn, lag_bytes, lag_seconds, timeline, epoch, fenced, system_identifier,
    /// replicas (primary), wal_receiver (replica). Absent when unknown.
    pub fn facts(&self) -> BTreeMap<String, String> {
        let mut f = BTreeMap::new();
        f.insert("role".into(), self.role().as_str().into());
        f.insert("epoch".into(), self.epoch.to_string());
        f.insert("fenced".into(), self.fenced.is_some().to_string());
        let lsn = match self.role() {
            Role::Replica => self.receive_lsn.or(self.replay_lsn),
            _ => self.current_lsn,
        };
        if let Some(l) = lsn {
            f.insert("lsn".into(), l.to_string());
        }
        if let Some(l) = self.replay_lsn {
            f.insert("replay_lsn".into(), l.to_string());
        }
        if let Some(b) = self.lag_bytes() {
            f.insert("lag_bytes".into(), b.to_string());
        }
        if let Some(s) = self.lag_seconds() {
            f.insert("lag_seconds".into(), format!("{s:.3}"));
        }
        if let Some(t) = self.timeline {
            f.insert("timeline".into(), t.to_string());
        }
        if let Some(id) = self.system_identifier {
            f.insert("system_identifier".into(), id.to_string());
        }
        if self.role() == Role::Primary {
            f.insert("replicas".into(), self.replication.len().to_string());
        }
        if let Some(w) = &self.wal_receiver {
            f.insert("wal_receiver".into(), w.status.clone());
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stopped() -> PgStatus {
        PgStatus {
            running: false,
            pid: None,
            in_recovery: None,
            timeline: Some(1),
            system_identifier: Some(7),
            current_lsn: Some(Lsn(0x3000028)),
            receive_lsn: None,
            replay_lsn: None,
            last_replay_at: None,
            replay_lag_seconds: None,
            replication: vec![],
            wal_receiver: None,
            epoch: Epoch(2),
            fenced: None,
            error: None,
        }
    }

    #[test]
    fn facts_of_stopped_and_replica() {
        let s = stopped();
        let f = s.facts();
        assert_eq!(f["role"], "stopped");
        assert_eq!(f["lsn"], "0/3000028");
        assert_eq!(f["epoch"], "2");
        assert!(!f.contains_key("lag_bytes"));

        let r = PgStatus {
            running: true,
            in_recovery: Some(true),
            receive_lsn: Some(Lsn(0x200)),
            replay_lsn: Some(Lsn(0x100)),
            replay_lag_seconds: Some(1.5),
            ..stopped()
        };
        let f = r.facts();
        assert_eq!(f["role"], "replica");
        assert_eq!(f["lsn"], "0/200");
        assert_eq!(f["replay_lsn"], "0/100");
        assert_eq!(f["lag_bytes"], "256");
        assert_eq!(f["lag_seconds"], "1.500");
    }
}
