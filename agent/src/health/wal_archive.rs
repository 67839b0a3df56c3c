//! `kind = "wal_archive"`: the archive lag of the PostgreSQL server on this host, held under
//! the tier's RPO.
//!
//! Why a check and not PostgreSQL's own `archive_timeout`: the bound that matters is the
//! service's RPO from the topology (15 min, 5 min for critical data in the DRP), and the
//! operator must *see* the lag and a failing `archive_command` in `drctl status` long before
//! a disaster shows it. So every run reads `pg_stat_archiver`; when the oldest unarchived
//! write is about to be older than the RPO it forces `pg_switch_wal()`, which closes the
//! partial segment and hands it to `archive_command` at once. The check fails when the lag
//! reached the RPO anyway (archiving is broken or too slow) or when `archive_command` keeps
//! failing, naming the segment and what to look at.
//!
//! The lag is measured from the last successful archive (or the server start), not from the
//! first write after it, which PostgreSQL does not record: it can only overestimate, so the
//! switch comes early rather than late. On a standby nothing is archived by this server and
//! the check passes saying so.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};
use tracing::info;

use super::Outcome;

/// WAL segment size of every server we manage (initdb's default; `wal_segment_size` other
/// than 16 MiB is refused by the backup code too).
const SEGMENT: u64 = 16 << 20;

/// What one look at `pg_stat_archiver` found (and did).
#[derive(Debug, Clone, PartialEq)]
pub struct ArchiveLag {
    pub in_recovery: bool,
    /// Seconds the oldest unarchived WAL may have waited (0 when nothing waits).
    pub secs: f64,
    /// Bytes written after the end of the last archived segment.
    pub bytes: u64,
    pub last_archived: String,
    /// `archive_command` failed after the last success: (segment, seconds ago, failures so far).
    pub failing: Option<(String, f64, i64)>,
    pub archive_mode: String,
    pub switched: bool,
}

/// Segment number (timeline ignored) of a WAL file name, e.g. `000000010000000A000000FF`.
fn segment_number(name: &str) -> Option<u64> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    Some(log * 0x1_0000_0000 / SEGMENT + seg)
}

fn parse_lsn(s: &str) -> u64 {
    s.split_once('/')
        .and_then(|(hi, lo)| {
            Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
        })
        .unwrap_or(0)
}

/// Reads `pg_stat_archiver` on `conn`; on a primary whose lag reached `switch_at_secs` with
/// WAL waiting, forces `pg_switch_wal()`.
pub async fn measure(
    conn: &mut PgConnection,
    switch_at_secs: Option<f64>,
) -> Result<ArchiveLag, sqlx::Error> {
    type Row = (
        bool,
        String,
        String,
        Option<f64>,
        String,
        Option<f64>,
        i64,
        String,
    );
    let row: Row = sqlx::query_as(
        "select pg_is_in_recovery(), \
                coalesce(last_archived_wal, ''), \
                (case when pg_is_in_recovery() then '0/0'::pg_lsn else pg_current_wal_lsn() end)::text, \
                extract(epoch from now() - coalesce(last_archived_time, pg_postmaster_start_time()))::float8, \
                coalesce(last_failed_wal, ''), \
                (case when last_failed_time > coalesce(last_archived_time, '-infinity') \
                      then extract(epoch from now() - last_failed_time)::float8 end), \
                failed_count, \
                current_setting('archive_mode') \
           from pg_stat_archiver",
    )
    .persistent(false)
    .fetch_one(&mut *conn)
    .await?;
    let (in_recovery, last, current, age, failed_wal, failed_ago, failed_count, mode) = row;
    let archived_end = segment_number(&last).map_or(0, |n| (n + 1) * SEGMENT);
    let bytes = if in_recovery {
        0
    } else {
        parse_lsn(&current).saturating_sub(archived_end)
    };
    let secs = if bytes == 0 { 0.0 } else { age.unwrap_or(0.0) };
    let mut switched = false;
    if !in_recovery && mode != "off" && bytes > 0 && switch_at_secs.is_some_and(|m| secs >= m) {
        let lsn: String = sqlx::query_scalar("select pg_switch_wal()::text")
            .persistent(false)
            .fetch_one(&mut *conn)
            .await?;
        info!(%lsn, lag_secs = secs, lag_bytes = bytes, "archive lag near the RPO: WAL segment switched");
        switched = true;
    }
    Ok(ArchiveLag {
        in_recovery,
        secs,
        bytes,
        last_archived: last,
        failing: failed_ago.map(|ago| (failed_wal, ago, failed_count)),
        archive_mode: mode,
        switched,
    })
}

/// When to force the switch: early enough that the next run (one `interval` later, plus the
/// time to archive a segment) still sees the lag under the RPO.
pub fn switch_threshold(rpo: Duration, interval: Duration) -> f64 {
    let rpo_s = rpo.as_secs_f64();
    (rpo_s - 2.0 * interval.as_secs_f64() - 1.0).max(rpo_s / 2.0)
}

/// Turns a measurement into a check verdict against `rpo`.
pub fn verdict(lag: &ArchiveLag, rpo: Duration) -> Outcome {
    let rpo_s = rpo.as_secs_f64();
    if lag.in_recovery {
        return Outcome::Pass("standby: WAL is archived by the primary".into());
    }
    if lag.archive_mode == "off" {
        return Outcome::Fail(
            "archive_mode is off: no WAL is archived, point-in-time recovery is impossible; set \
             archive_mode = on and archive_command = 'dr-agent wal-push %p' (needs a restart)"
                .into(),
        );
    }
    let mib = lag.bytes as f64 / f64::from(1u32 << 20);
    let status = format!(
        "archive lag {:.0} s, {mib:.1} MiB waiting (RPO {rpo_s:.0} s), last archived {}",
        lag.secs,
        if lag.last_archived.is_empty() {
            "none yet"
        } else {
            &lag.last_archived
        }
    );
    if let Some((wal, ago, count)) = &lag.failing {
        return Outcome::Fail(format!(
            "archive_command is failing: {wal} failed {ago:.0} s ago ({count} failures since \
             the statistics were reset); {status}; see the PostgreSQL log and `dr-agent wal-push` \
             errors (repository reachable? full?)"
        ));
    }
    if lag.secs >= rpo_s {
        return Outcome::Fail(format!(
            "{status}: the lag reached the RPO, the newest writes are not archived; check \
             archive_command and the repository"
        ));
    }
    if lag.switched {
        Outcome::Pass(format!(
            "{status}; segment switch forced to stay under the RPO"
        ))
    } else {
        Outcome::Pass(status)
    }
}

/// The probe's state: the kept connection (see `postgres.rs` for why it is kept).
pub struct WalArchiveState {
    url: String,
    rpo: Duration,
    interval: Duration,
    conn: Option<PgConnection>,
}

impl WalArchiveState {
    pub fn new(url: &str, rpo: Duration, interval: Duration) -> Self {
        Self {
            url: url.to_owned(),
            rpo,
            interval,
            conn: None,
        }
    }

    pub async fn probe(&mut self) -> Outcome {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let opts = match PgConnectOptions::from_str(&self.url) {
                    Ok(o) => o.application_name("dr-agent").disable_statement_logging(),
                    Err(e) => return Outcome::Fail(format!("invalid postgres url: {e}")),
                };
                match opts.connect().await {
                    Ok(c) => c,
                    Err(e) => return Outcome::Fail(self.scrub(format!("cannot connect: {e}"))),
                }
            }
        };
        let switch_at = switch_threshold(self.rpo, self.interval);
        match measure(&mut conn, Some(switch_at)).await {
            Ok(lag) => {
                self.conn = Some(conn);
                verdict(&lag, self.rpo)
            }
            Err(e) => Outcome::Fail(self.scrub(format!("reading pg_stat_archiver: {e}"))),
        }
    }

    fn scrub(&self, msg: String) -> String {
        super::postgres::scrub_password(&self.url, msg)
    }

    pub async fn close(&mut self) {
        if let Some(c) = self.conn.take() {
            let _ignored = c.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lag(secs: f64, bytes: u64) -> ArchiveLag {
        ArchiveLag {
            in_recovery: false,
            secs,
            bytes,
            last_archived: "000000010000000000000003".into(),
            failing: None,
            archive_mode: "on".into(),
            switched: false,
        }
    }

    #[test]
    fn segment_numbers_and_lsns() {
        assert_eq!(segment_number("000000010000000000000003"), Some(3));
        assert_eq!(segment_number("00000001000000010000000A"), Some(256 + 10));
        assert_eq!(segment_number("00000001.history"), None);
        assert_eq!(parse_lsn("1/0A000028"), (1 << 32) | 0x0A00_0028);
        assert_eq!(parse_lsn("garbage"), 0);
    }

    #[test]
    fn switch_comes_before_the_rpo() {
        let t = switch_threshold(Duration::from_secs(900), Duration::from_secs(10));
        assert!(t < 900.0 - 20.0 && t > 800.0, "{t}");
        // A short RPO with a long interval still switches, at half the RPO.
        let t = switch_threshold(Duration::from_secs(10), Duration::from_secs(10));
        assert!((t - 5.0).abs() < f64::EPSILON, "{t}");
    }

    #[test]
    fn verdicts_name_the_problem() {
        let rpo = Duration::from_secs(300);
        assert!(
            matches!(verdict(&lag(12.0, 1 << 20), rpo), Outcome::Pass(d) if d.contains("archive lag 12 s"))
        );
        assert!(
            matches!(verdict(&lag(301.0, 1 << 20), rpo), Outcome::Fail(d) if d.contains("reached the RPO"))
        );
        let mut f = lag(30.0, 1 << 20);
        f.failing = Some(("000000010000000000000004".into(), 3.0, 7));
        assert!(
            matches!(verdict(&f, rpo), Outcome::Fail(d) if d.contains("000000010000000000000004") && d.contains("7 failures"))
        );
        let mut off = lag(0.0, 0);
        off.archive_mode = "off".into();
        assert!(
            matches!(verdict(&off, rpo), Outcome::Fail(d) if d.contains("archive_mode is off"))
        );
        let mut standby = lag(0.0, 0);
        standby.in_recovery = true;
        assert!(matches!(verdict(&standby, rpo), Outcome::Pass(d) if d.contains("standby")));
    }
}
