//! Retention: which backups to let go (keep-last / daily / weekly / monthly per kind).
//!
//! Why two phases: the leader only MARKS expired backups (a committed `MarkForDelete`); a
//! prune command deletes their manifests after the policy's grace, on the location's
//! designated prune host with delete-capable credentials, while backup hosts may hold
//! write-only ones (the ransomware case). Between mark and delete an operator can still see
//! (and restore) a marked backup. The agent's prune then removes only chunks no remaining
//! manifest references AND older than the grace, so a backup running beside it keeps its
//! fresh chunks. The same prune then deletes archived WAL below the oldest remaining
//! physical backup's start segment (`agent/src/backup/prune.rs`, `prune_wal`), so the WAL
//! every retained backup needs is kept and nothing older piles up.
//!
//! Pure: [`expired`] is a function of the entries, the rules and the time zone.

use std::collections::BTreeSet;

use chrono::{Datelike, TimeZone};
use chrono_tz::Tz;

use crate::state::catalog::{BackupEntry, RetentionPolicy};

/// Ids of `entries` (one db, one kind, one location) that no rule keeps. With every rule at
/// zero nothing expires; the newest backup never expires.
pub fn expired<'a>(entries: &[&'a BackupEntry], rule: &RetentionPolicy, tz: Tz) -> Vec<String> {
    if rule.keep_last == 0
        && rule.keep_daily == 0
        && rule.keep_weekly == 0
        && rule.keep_monthly == 0
    {
        return Vec::new();
    }
    let mut newest_first: Vec<&'a BackupEntry> = entries.to_vec();
    newest_first.sort_by(|a, b| {
        b.finished_at_unix_ms
            .cmp(&a.finished_at_unix_ms)
            .then(b.id.cmp(&a.id))
    });
    let mut keep: BTreeSet<&'a str> = BTreeSet::new();
    for b in newest_first.iter().take(rule.keep_last.max(1) as usize) {
        keep.insert(&b.id);
    }
    let bucket_keep =
        |n: u32, bucket: &dyn Fn(&BackupEntry) -> (i32, u32), keep: &mut BTreeSet<&'a str>| {
            let mut seen = BTreeSet::new();
            for b in &newest_first {
                if seen.len() >= n as usize {
                    break;
                }
                if seen.insert(bucket(b)) {
                    keep.insert(&b.id);
                }
            }
        };
    let local = |b: &BackupEntry| {
        tz.timestamp_millis_opt(b.finished_at_unix_ms)
            .single()
            .map(|t| t.date_naive())
    };
    let day = |b: &BackupEntry| local(b).map(|d| (d.year(), d.ordinal())).unwrap_or((0, 0));
    let week = |b: &BackupEntry| {
        local(b)
            .map(|d| (d.iso_week().year(), d.iso_week().week()))
            .unwrap_or((0, 0))
    };
    let month = |b: &BackupEntry| local(b).map(|d| (d.year(), d.month())).unwrap_or((0, 0));
    bucket_keep(rule.keep_daily, &day, &mut keep);
    bucket_keep(rule.keep_weekly, &week, &mut keep);
    bucket_keep(rule.keep_monthly, &month, &mut keep);
    newest_first
        .iter()
        .filter(|b| !keep.contains(b.id.as_str()))
        .map(|b| b.id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::catalog::Kind;

    fn entry(id: &str, at: i64) -> BackupEntry {
        BackupEntry {
            id: id.into(),
            db: "db".into(),
            kind: Kind::Full,
            parent: String::new(),
            host_id: "h".into(),
            files: 0,
            bytes_total: 0,
            bytes_added: 0,
            duration_ms: 0,
            start_lsn: String::new(),
            stop_lsn: String::new(),
            timeline: 1,
            started_at_unix_ms: at,
            finished_at_unix_ms: at,
            created_by: String::new(),
            command_key: String::new(),
            locations: Default::default(),
        }
    }

    #[test]
    fn keep_last_daily_and_none() {
        let tz: Tz = "Asia/Shanghai".parse().unwrap();
        let day = 86_400_000;
        let base = 1_714_500_000_000; // 2024-05-01
        // Two backups a day for four days.
        let es: Vec<BackupEntry> = (0..8)
            .map(|i| entry(&format!("b{i}"), base + i * day / 2))
            .collect();
        let refs: Vec<&BackupEntry> = es.iter().collect();
        let none = RetentionPolicy {
            kind: "full".into(),
            ..Default::default()
        };
        assert!(expired(&refs, &none, tz).is_empty());
        let last2 = RetentionPolicy {
            kind: "full".into(),
            keep_last: 2,
            ..Default::default()
        };
        let mut ex = expired(&refs, &last2, tz);
        ex.sort();
        assert_eq!(ex, vec!["b0", "b1", "b2", "b3", "b4", "b5"]);
        let daily3 = RetentionPolicy {
            kind: "full".into(),
            keep_last: 1,
            keep_daily: 3,
            ..Default::default()
        };
        let ex = expired(&refs, &daily3, tz);
        assert_eq!(ex.len(), 8 - 3, "{ex:?}");
        assert!(!ex.contains(&"b7".to_string()));
    }
}
