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
    /// `latest_end_lsn`: the sender's end of WAL as its last message or keepalive reported
    /// it. After the primary is lost this is the best this replica knows of its position.
    pub latest_end_lsn: Option<Lsn>,
    /// `latest_end_time`: when the sender reported `latest_end_lsn` (its clock).
    pub latest_end_time: Option<DateTime<Utc>>,
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
    /// replicas (primary), wal_receiver, primary_end_lsn, primary_end_at (replica). Absent when
    /// unknown.
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
            if let Some(l) = w.latest_end_lsn {
                f.insert("primary_end_lsn".into(), l.to_string());
                if let Some(t) = w.latest_end_time {
                    f.insert("primary_end_at".into(), fact_time(t));
                }
            }
        }
        f
    }
}

fn fact_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The primary's end of WAL as this replica last heard it, kept across heartbeats.
///
/// Why: `pg_stat_wal_receiver` has no row while the receiver is down, which is exactly the
/// state after the primary's region is lost, when a forced failover needs the number (a
/// coordinator leader elected after the loss never heard the primary's own LSN). Held in the
/// agent's memory only: a restarted agent knows it again once the receiver reconnects.
#[derive(Clone, Debug, Default)]
pub struct PrimaryEndMemory {
    last: Option<(Lsn, Option<DateTime<Utc>>)>,
}

impl PrimaryEndMemory {
    /// [`PgStatus::facts`] plus `primary_end_lsn` / `primary_end_at` remembered from an
    /// earlier status while this server is still a replica (or stopped). Forgotten once it is
    /// a primary: there is no upstream any more.
    pub fn facts(&mut self, s: &PgStatus) -> BTreeMap<String, String> {
        let mut f = s.facts();
        if s.role() == Role::Primary {
            self.last = None;
            return f;
        }
        if let Some(w) = &s.wal_receiver
            && let Some(l) = w.latest_end_lsn
        {
            self.last = Some((l, w.latest_end_time));
        }
        if let (Some((l, at)), false) = (self.last, f.contains_key("primary_end_lsn")) {
            f.insert("primary_end_lsn".into(), l.to_string());
            if let Some(t) = at {
                f.insert("primary_end_at".into(), fact_time(t));
            }
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
        assert!(!f.contains_key("primary_end_lsn"));
    }

    #[test]
    fn primary_end_is_remembered_while_the_receiver_is_down_and_forgotten_on_promotion() {
        let at = DateTime::from_timestamp(1_700_000_000, 0).expect("valid time");
        let streaming = PgStatus {
            running: true,
            in_recovery: Some(true),
            replay_lsn: Some(Lsn(0x100)),
            wal_receiver: Some(WalReceiver {
                status: "streaming".into(),
                sender_host: "bj-db-1".into(),
                sender_port: 5432,
                slot_name: "shanghai".into(),
                received_timeline: 1,
                flushed_lsn: Some(Lsn(0x180)),
                last_msg_receipt: Some(at),
                latest_end_lsn: Some(Lsn(0x200)),
                latest_end_time: Some(at),
            }),
            ..stopped()
        };
        let mut mem = PrimaryEndMemory::default();
        let f = mem.facts(&streaming);
        assert_eq!(f["primary_end_lsn"], "0/200");
        assert_eq!(f["primary_end_at"], "2023-11-14T22:13:20.000Z");

        let receiver_gone = PgStatus {
            wal_receiver: None,
            ..streaming.clone()
        };
        assert!(!receiver_gone.facts().contains_key("primary_end_lsn"));
        let f = mem.facts(&receiver_gone);
        assert_eq!(f["primary_end_lsn"], "0/200");
        assert_eq!(f["primary_end_at"], "2023-11-14T22:13:20.000Z");

        let promoted = PgStatus {
            in_recovery: Some(false),
            ..receiver_gone
        };
        assert!(!mem.facts(&promoted).contains_key("primary_end_lsn"));
        assert!(!mem.facts(&stopped()).contains_key("primary_end_lsn"));
    }
}
