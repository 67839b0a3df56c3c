//! PostgreSQL management on this host: the building blocks of switchover and failover.
//!
//! The coordinator drives a failover as a plan of small steps (stop, wait for replay,
//! promote, rewind...); each step is one method here, and each is idempotent so a new leader
//! can re-send a half-done step. Everything that decides safety is local and persistent:
//! the data dir's highest fencing epoch (`dr_epoch`) and its fence marker (`dr_fenced`), see
//! [`markers`].
//!
//! ```text
//!  planned switchover (nothing lost):
//!   old primary: stop(Fast) ──► StopReport.checkpoint_lsn ─┐
//!   replica:     wait_replay(checkpoint_lsn) ◄─────────────┘ ──► promote(epoch+1) ──► timeline
//!   old primary: rewind(new primary) ──► configure_standby ──► streams from the new primary
//! ```
//!
//! Queries go over the unix socket with sqlx, one short connection per call: a pooled idle
//! connection would block a smart shutdown and go stale across restarts. Binaries run as
//! `run_as` (see [`process`]). Server processes are never children of the agent (pg_ctl
//! daemonizes them), so an agent restart does not touch the database.
//!
//! `rewind` needs `wal_log_hints = on` or data checksums (`initdb --data-checksums`); the
//! tests use checksums.

pub mod config;
pub mod conninfo;
pub mod lsn;
pub mod markers;
pub mod process;
mod standby;
pub mod status;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection, Row};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

pub use config::{PgConfig, SecretSource};
pub use conninfo::Conninfo;
pub use lsn::Lsn;
pub use markers::{Epoch, FenceMarker};
pub use process::ControlData;
pub use status::{PgStatus, PrimaryEndMemory, ReplicationClient, Role, WalReceiver};

use markers::Markers;
use process::Runner;

/// Errors of PostgreSQL management. Messages say what to do where there is something to do.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("invalid [postgres] config: {field}: {reason}")]
    Config { field: String, reason: String },
    #[error("cannot read secret from {source_desc}: {reason}")]
    Secret { source_desc: String, reason: String },
    #[error("invalid connection string {conninfo:?}: {reason}")]
    Conninfo { conninfo: String, reason: String },
    #[error("cannot run {program}: {reason}")]
    Spawn { program: String, reason: String },
    #[error("{program} failed (exit {code:?}): {stderr}")]
    Command {
        program: String,
        code: Option<i32>,
        stderr: String,
    },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("{what}: {reason}")]
    Io { what: String, reason: String },
    #[error("marker file {path}: {reason}")]
    Marker { path: PathBuf, reason: String },
    #[error(
        "epoch {given} is older than epoch {current} already seen by this data dir: the command comes from a deposed leader"
    )]
    StaleEpoch { given: Epoch, current: Epoch },
    #[error(
        "PostgreSQL is fenced since {since} ({reason}); run unfence with epoch >= {epoch} after making sure another primary is not running"
    )]
    Fenced {
        reason: String,
        since: String,
        epoch: Epoch,
    },
    #[error("PostgreSQL is not running in {data_dir}")]
    NotRunning { data_dir: PathBuf },
    #[error("PostgreSQL is not in recovery (it is a primary): {what}")]
    NotInRecovery { what: String },
    #[error("PostgreSQL is in recovery (a replica): {what}")]
    InRecovery { what: String },
    #[error("{what}: {source}")]
    Query {
        what: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("unexpected answer to {what}: {reason}")]
    Unexpected { what: String, reason: String },
    #[error("invalid replication slot name {name:?}: use 1-63 of [a-z0-9_]")]
    SlotName { name: String },
    #[error("cancelled")]
    Cancelled,
}

impl PgError {
    /// Retrying cannot help (a policy refusal or a bad request), as opposed to a transient
    /// failure (server still starting, timeout).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            PgError::Config { .. }
                | PgError::Secret { .. }
                | PgError::Conninfo { .. }
                | PgError::StaleEpoch { .. }
                | PgError::Fenced { .. }
                | PgError::SlotName { .. }
                | PgError::Cancelled
        )
    }

    fn query(what: &str) -> impl FnOnce(sqlx::Error) -> PgError + '_ {
        move |source| PgError::Query {
            what: what.to_owned(),
            source,
        }
    }
}

pub type PgResult<T> = Result<T, PgError>;

/// Shutdown modes of `pg_ctl stop -m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopMode {
    /// Waits for clients to disconnect.
    Smart,
    /// Disconnects clients, writes a shutdown checkpoint: the normal choice.
    Fast,
    /// Kills everything; crash recovery at next start. No final checkpoint.
    Immediate,
}

impl StopMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StopMode::Smart => "smart",
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// Result of [`PgInstance::stop`], read from pg_controldata after the server is down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StopReport {
    pub was_running: bool,
    /// A shutdown checkpoint was written: a replica that replayed up to `checkpoint_lsn` has
    /// everything this server ever committed.
    pub clean: bool,
    pub checkpoint_lsn: Lsn,
    pub redo_lsn: Lsn,
    pub timeline: u32,
    pub state: String,
}

/// One PostgreSQL data directory managed by this agent.
pub struct PgInstance {
    cfg: PgConfig,
    env: BTreeMap<String, String>,
    runner: Runner,
    markers: Markers,
    /// Serialises the operations that change server state (start, stop, promote, rewind...).
    /// [`PgInstance::stop_for_fence`] deliberately does not take it: a fence must never wait
    /// behind a long rewind or a hung start.
    op_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for PgInstance {
    // Not derived: `env` may hold secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgInstance")
            .field("cluster", &self.cfg.cluster)
            .field("data_dir", &self.cfg.data_dir)
            .field("port", &self.cfg.port)
            .finish_non_exhaustive()
    }
}

impl PgInstance {
    /// Validates `cfg`; secrets named by environment variable come from the process env.
    pub fn new(cfg: PgConfig) -> PgResult<Self> {
        Self::with_env(cfg, std::env::vars().collect())
    }

    /// Like [`PgInstance::new`] with an explicit environment map (tests, config reload).
    pub fn with_env(cfg: PgConfig, env: BTreeMap<String, String>) -> PgResult<Self> {
        cfg.validate()?;
        let runner = Runner::new(&cfg.bin_dir, &cfg.run_as);
        let markers = Markers::new(&cfg.data_dir).with_owner(runner.owner()?);
        Ok(Self {
            cfg,
            env,
            runner,
            markers,
            op_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn config(&self) -> &PgConfig {
        &self.cfg
    }

    /// The highest fencing epoch this data dir has seen.
    pub fn epoch(&self) -> PgResult<Epoch> {
        self.markers.epoch()
    }

    /// Refuses a command carrying an epoch older than the data dir's (any epoch-bearing
    /// command from the coordinator passes through here first).
    pub fn check_epoch(&self, epoch: Epoch) -> PgResult<()> {
        let current = self.markers.epoch()?;
        if epoch < current {
            return Err(PgError::StaleEpoch {
                given: epoch,
                current,
            });
        }
        Ok(())
    }

    /// Checks `epoch` like [`PgInstance::check_epoch`] and records it as seen: the action
    /// layer calls this for every command that carries an epoch (rewind, configure_standby…),
    /// so a demoted node also refuses what the deposed leader may still send.
    pub fn observe_epoch(&self, epoch: Epoch) -> PgResult<()> {
        self.markers.raise_epoch(epoch).map(|_| ())
    }

    pub fn fence_marker(&self) -> PgResult<Option<FenceMarker>> {
        self.markers.fence()
    }

    /// PID of the running postmaster, from `postmaster.pid`, if that process exists.
    pub fn postmaster_pid(&self) -> PgResult<Option<u32>> {
        let p = self.cfg.data_dir.join("postmaster.pid");
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(PgError::Io {
                    what: format!("read {}", p.display()),
                    reason: e.to_string(),
                });
            }
        };
        let Some(pid) = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
            .filter(|p| *p > 0)
        else {
            // Being written right now, or garbage: treat as running to stay on the safe side
            // only if the file is fresh; a garbage file makes pg_ctl complain anyway.
            return Ok(None);
        };
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
            Ok(()) | Err(nix::errno::Errno::EPERM) => Ok(u32::try_from(pid).ok()),
            Err(_) => Ok(None),
        }
    }

    pub fn is_running(&self) -> PgResult<bool> {
        Ok(self.postmaster_pid()?.is_some())
    }

    fn standby_signal(&self) -> PathBuf {
        self.cfg.data_dir.join("standby.signal")
    }

    fn connect_options(&self) -> PgResult<PgConnectOptions> {
        let su = &self.cfg.superuser;
        let mut o = PgConnectOptions::new()
            .host(&self.cfg.socket_dir.to_string_lossy())
            .port(self.cfg.port)
            .username(&su.user)
            .database(&su.database)
            .application_name("dr-agent");
        if let Some(src) = &su.password {
            o = o.password(&src.resolve(&self.env)?);
        }
        // Statements may carry primary_conninfo with a password: never log them.
        Ok(o.disable_statement_logging())
    }

    async fn connect(&self) -> PgResult<PgConnection> {
        let opts = self.connect_options()?;
        let t = self.cfg.connect_timeout;
        tokio::time::timeout(t, opts.connect())
            .await
            .map_err(|_| PgError::Timeout {
                what: "a connection to PostgreSQL".into(),
                after: t,
            })?
            .map_err(PgError::query("connect to PostgreSQL"))
    }

    /// A snapshot of the server. Never fails because the server is down: that is a status.
    pub async fn status(&self) -> PgResult<PgStatus> {
        let pid = self.postmaster_pid()?;
        let mut s = PgStatus {
            running: pid.is_some(),
            pid,
            in_recovery: None,
            timeline: None,
            system_identifier: None,
            current_lsn: None,
            receive_lsn: None,
            replay_lsn: None,
            last_replay_at: None,
            replay_lag_seconds: None,
            replication: vec![],
            wal_receiver: None,
            epoch: self.markers.epoch()?,
            fenced: self.markers.fence()?,
            error: None,
        };
        if pid.is_none() {
            if let Ok(cd) = self.controldata().await {
                s.timeline = Some(cd.timeline);
                s.system_identifier = Some(cd.system_identifier);
                s.current_lsn = Some(cd.checkpoint_lsn);
            }
            return Ok(s);
        }
        if let Err(e) = self.query_status(&mut s).await {
            s.in_recovery = None;
            s.error = Some(e.to_string());
        }
        Ok(s)
    }

    /// Heartbeat facts (see [`PgStatus::facts`]).
    pub async fn facts(&self) -> PgResult<BTreeMap<String, String>> {
        Ok(self.status().await?.facts())
    }

    async fn query_status(&self, s: &mut PgStatus) -> PgResult<()> {
        let mut c = self.connect().await?;
        let row = sqlx::query(
            "select pg_is_in_recovery(), (select system_identifier from pg_control_system())::text",
        )
        .fetch_one(&mut c)
        .await
        .map_err(PgError::query("query recovery state"))?;
        let rec: bool = row
            .try_get(0)
            .map_err(PgError::query("read pg_is_in_recovery"))?;
        let sysid: String = row
            .try_get(1)
            .map_err(PgError::query("read system identifier"))?;
        s.system_identifier = sysid.parse().ok();
        s.in_recovery = Some(rec);
        if !rec {
            let cur = current_lsn(&mut c).await?;
            s.current_lsn = Some(cur);
            s.timeline = Some(primary_timeline(&mut c).await?);
            let rows = sqlx::query(
                "select coalesce(application_name, ''), coalesce(client_addr::text, 'local'), coalesce(state, ''),
                        coalesce(sync_state, ''), sent_lsn::text, flush_lsn::text, replay_lsn::text,
                        coalesce(extract(epoch from replay_lag)::float8, 0)
                   from pg_stat_replication order by application_name",
            )
            .fetch_all(&mut c)
            .await
            .map_err(PgError::query("query pg_stat_replication"))?;
            for r in rows {
                let lsn_at = |i: usize| -> Option<Lsn> {
                    r.try_get::<Option<String>, _>(i)
                        .ok()
                        .flatten()?
                        .parse()
                        .ok()
                };
                let replay = lsn_at(6);
                s.replication.push(ReplicationClient {
                    application_name: r.try_get(0).unwrap_or_default(),
                    client_addr: r.try_get(1).unwrap_or_default(),
                    state: r.try_get(2).unwrap_or_default(),
                    sync_state: r.try_get(3).unwrap_or_default(),
                    sent_lsn: lsn_at(4),
                    flush_lsn: lsn_at(5),
                    replay_lsn: replay,
                    lag_bytes: replay.map(|l| cur.bytes_since(l)),
                    lag_seconds: r.try_get(7).unwrap_or(0.0),
                });
            }
        } else {
            let r = sqlx::query(
                "select pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text,
                        extract(epoch from pg_last_xact_replay_timestamp())::float8,
                        case when pg_last_wal_receive_lsn() is null
                               or pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() then 0
                             else coalesce(extract(epoch from now() - pg_last_xact_replay_timestamp())::float8, 0) end,
                        (select timeline_id from pg_control_checkpoint())",
            )
            .fetch_one(&mut c)
            .await
            .map_err(PgError::query("query replay position"))?;
            s.receive_lsn = r
                .try_get::<Option<String>, _>(0)
                .ok()
                .flatten()
                .and_then(|t| t.parse().ok());
            s.replay_lsn = r
                .try_get::<Option<String>, _>(1)
                .ok()
                .flatten()
                .and_then(|t| t.parse().ok());
            s.last_replay_at = r
                .try_get::<Option<f64>, _>(2)
                .ok()
                .flatten()
                .and_then(unix_to_utc);
            s.replay_lag_seconds = r.try_get::<Option<f64>, _>(3).ok().flatten();
            s.timeline = r
                .try_get::<Option<i32>, _>(4)
                .ok()
                .flatten()
                .and_then(|t| u32::try_from(t).ok());
            let w = sqlx::query(
                "select status, coalesce(sender_host, ''), coalesce(sender_port, 0), coalesce(slot_name, ''),
                        received_tli, flushed_lsn::text, extract(epoch from last_msg_receipt_time)::float8,
                        latest_end_lsn::text, extract(epoch from latest_end_time)::float8
                   from pg_stat_wal_receiver",
            )
            .fetch_optional(&mut c)
            .await
            .map_err(PgError::query("query pg_stat_wal_receiver"))?;
            if let Some(w) = w {
                let tli = w
                    .try_get::<Option<i32>, _>(4)
                    .ok()
                    .flatten()
                    .and_then(|t| u32::try_from(t).ok())
                    .unwrap_or(0);
                if tli > 0 {
                    s.timeline = Some(s.timeline.map_or(tli, |t| t.max(tli)));
                }
                s.wal_receiver = Some(WalReceiver {
                    status: w.try_get(0).unwrap_or_default(),
                    sender_host: w.try_get(1).unwrap_or_default(),
                    sender_port: w.try_get(2).unwrap_or_default(),
                    slot_name: w.try_get(3).unwrap_or_default(),
                    received_timeline: tli,
                    flushed_lsn: w
                        .try_get::<Option<String>, _>(5)
                        .ok()
                        .flatten()
                        .and_then(|t| t.parse().ok()),
                    last_msg_receipt: w
                        .try_get::<Option<f64>, _>(6)
                        .ok()
                        .flatten()
                        .and_then(unix_to_utc),
                    latest_end_lsn: w
                        .try_get::<Option<String>, _>(7)
                        .ok()
                        .flatten()
                        .and_then(|t| t.parse().ok()),
                    latest_end_time: w
                        .try_get::<Option<f64>, _>(8)
                        .ok()
                        .flatten()
                        .and_then(unix_to_utc),
                });
            }
        }
        // Best effort: the connection is dropped anyway.
        if let Err(e) = c.close().await {
            tracing::debug!(error = %e, "closing status connection");
        }
        Ok(())
    }

    /// `pg_controldata` of the data dir (works whether the server runs or not).
    pub async fn controldata(&self) -> PgResult<ControlData> {
        let out = self
            .runner
            .run_ok(
                "pg_controldata",
                &[self.cfg.data_dir.clone().into()],
                &[],
                Duration::from_secs(30),
            )
            .await?;
        ControlData::parse(&out.stdout).map_err(|reason| PgError::Unexpected {
            what: "pg_controldata".into(),
            reason,
        })
    }

    /// Starts the server and waits until it accepts connections. Idempotent.
    ///
    /// Refuses while the data dir is fenced, unless it is configured as a standby
    /// (`standby.signal`): a standby cannot accept writes, and a fenced old primary must be
    /// able to come back as a replica after `rewind`.
    pub async fn start(&self) -> PgResult<()> {
        let _g = self.op_lock.lock().await;
        self.start_locked()
            .instrument(info_span!("pg_start", cluster = %self.cfg.cluster))
            .await
    }

    fn refuse_if_fenced_primary(&self) -> PgResult<()> {
        if let Some(m) = self.markers.fence()?
            && !self.standby_signal().is_file()
        {
            return Err(fenced_error(&m));
        }
        Ok(())
    }

    async fn start_locked(&self) -> PgResult<()> {
        if self.is_running()? {
            return Ok(());
        }
        self.refuse_if_fenced_primary()?;
        info!(data_dir = %self.cfg.data_dir.display(), port = self.cfg.port, "starting postgresql");
        if let Some(unit) = &self.cfg.systemd_unit {
            systemctl(&["start", unit], self.cfg.start_timeout).await?;
        } else {
            let mut opts = format!(
                "-p {} -k '{}'",
                self.cfg.port,
                self.cfg.socket_dir.display()
            );
            if let Some(h) = &self.cfg.listen_host {
                opts.push_str(&format!(" -h '{h}'"));
            }
            let args: Vec<OsString> = vec![
                "start".into(),
                "-D".into(),
                self.cfg.data_dir.clone().into(),
                "-w".into(),
                "-t".into(),
                self.cfg.start_timeout.as_secs().max(1).to_string().into(),
                "-l".into(),
                self.cfg.log_file().into(),
                "-o".into(),
                opts.into(),
            ];
            if let Err(e) = self
                .runner
                .run_ok(
                    "pg_ctl",
                    &args,
                    &[],
                    self.cfg.start_timeout + Duration::from_secs(10),
                )
                .await
            {
                return Err(PgError::Command {
                    program: "pg_ctl start".into(),
                    code: None,
                    stderr: format!(
                        "{e}\n--- server log tail ---\n{}",
                        log_tail(&self.cfg.log_file())
                    ),
                });
            }
        }
        // A fence that raced with us (marker written after our check) wins.
        if let Err(e) = self.refuse_if_fenced_primary() {
            warn!("fenced while starting, stopping again");
            self.stop_locked(StopMode::Immediate, self.cfg.stop_timeout)
                .await?;
            return Err(e);
        }
        Ok(())
    }

    /// Stops the server and reports the final checkpoint. Idempotent: stopping a stopped
    /// server reports the checkpoint of its last shutdown.
    pub async fn stop(&self, mode: StopMode) -> PgResult<StopReport> {
        let _g = self.op_lock.lock().await;
        self.stop_locked(mode, self.cfg.stop_timeout)
            .instrument(info_span!("pg_stop", cluster = %self.cfg.cluster, mode = mode.as_str()))
            .await
    }

    /// For the fence: no operation lock, fast with a bound, then immediate, then SIGKILL of
    /// the postmaster. Returns once no postmaster runs.
    pub async fn stop_for_fence(&self, fast_bound: Duration) -> PgResult<StopReport> {
        match self.stop_locked(StopMode::Fast, fast_bound).await {
            Ok(r) => return Ok(r),
            Err(e) => warn!(error = %e, "fast shutdown did not finish, escalating to immediate"),
        }
        match self.stop_locked(StopMode::Immediate, fast_bound).await {
            Ok(r) => return Ok(r),
            Err(e) => warn!(error = %e, "immediate shutdown failed, killing the postmaster"),
        }
        if let Some(pid) = self.postmaster_pid()? {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
            // SIGKILL on the postmaster alone leaves backends; they exit when they notice
            // the postmaster is gone, and no new connection can be accepted.
            if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL) {
                warn!(error = %e, "kill -9 postmaster");
            }
            let deadline = tokio::time::Instant::now() + fast_bound;
            while self.is_running()? {
                if tokio::time::Instant::now() > deadline {
                    return Err(PgError::Timeout {
                        what: "the postmaster to die".into(),
                        after: fast_bound,
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let cd = self.controldata().await?;
        Ok(stop_report(true, cd))
    }

    async fn stop_locked(&self, mode: StopMode, timeout: Duration) -> PgResult<StopReport> {
        let was_running = self.is_running()?;
        if was_running {
            info!(mode = mode.as_str(), "stopping postgresql");
            if let Some(unit) = &self.cfg.systemd_unit {
                if mode == StopMode::Immediate {
                    systemctl(&["kill", "--signal=SIGQUIT", unit], timeout).await?;
                }
                systemctl(&["stop", unit], timeout).await?;
            } else {
                let args: Vec<OsString> = vec![
                    "stop".into(),
                    "-D".into(),
                    self.cfg.data_dir.clone().into(),
                    "-m".into(),
                    mode.as_str().into(),
                    "-w".into(),
                    "-t".into(),
                    timeout.as_secs().max(1).to_string().into(),
                ];
                let out = self
                    .runner
                    .run("pg_ctl", &args, &[], timeout + Duration::from_secs(5))
                    .await?;
                // Exit 1 with "PID file does not exist" = it stopped meanwhile: fine.
                if out.code != Some(0) && self.is_running()? {
                    return Err(PgError::Command {
                        program: "pg_ctl stop".into(),
                        code: out.code,
                        stderr: out.stderr,
                    });
                }
            }
        }
        let cd = self.controldata().await?;
        let r = stop_report(was_running, cd);
        info!(clean = r.clean, checkpoint_lsn = %r.checkpoint_lsn, state = %r.state, "postgresql stopped");
        Ok(r)
    }

    /// Waits until this replica has replayed `lsn`; returns the replay LSN reached.
    /// Cancel safety: read-only, safe to drop.
    pub async fn wait_replay(
        &self,
        lsn: Lsn,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> PgResult<Lsn> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut conn: Option<PgConnection> = None;
        let mut last = None;
        async {
            loop {
                if conn.is_none() {
                    conn = self.connect().await.ok();
                }
                if let Some(c) = &mut conn {
                    match sqlx::query("select pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")
                        .fetch_one(&mut *c)
                        .await
                    {
                        Ok(r) => {
                            let rec: bool = r
                                .try_get(0)
                                .map_err(PgError::query("read pg_is_in_recovery"))?;
                            if !rec {
                                return Err(PgError::NotInRecovery {
                                    what: format!("cannot wait for replay of {lsn}"),
                                });
                            }
                            let replay: Option<Lsn> = r
                                .try_get::<Option<String>, _>(1)
                                .ok()
                                .flatten()
                                .and_then(|t| t.parse().ok());
                            if let Some(replay) = replay {
                                last = Some(replay);
                                if replay >= lsn {
                                    info!(%replay, "replayed up to the target");
                                    return Ok(replay);
                                }
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "replay position query failed, reconnecting");
                            conn = None;
                        }
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(PgError::Timeout {
                        what: format!(
                            "replay of {lsn} (reached {})",
                            last.map_or("nothing".to_owned(), |l: Lsn| l.to_string())
                        ),
                        after: timeout,
                    });
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Err(PgError::Cancelled),
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
        .instrument(info_span!("pg_wait_replay", %lsn))
        .await
    }

    /// Promotes this replica, recording `epoch` first; returns the new timeline.
    /// Refuses an epoch older than the data dir's and a fenced data dir. Idempotent: on a
    /// primary it records the epoch and returns the current timeline.
    pub async fn promote(&self, epoch: Epoch) -> PgResult<u32> {
        let _g = self.op_lock.lock().await;
        async {
            if let Some(m) = self.markers.fence()? {
                return Err(fenced_error(&m));
            }
            // Persisted before promoting: after a crash mid-promotion the data dir still
            // refuses anything older.
            self.markers.raise_epoch(epoch)?;
            if !self.is_running()? {
                return Err(PgError::NotRunning {
                    data_dir: self.cfg.data_dir.clone(),
                });
            }
            let mut c = self.connect().await?;
            let rec: bool = sqlx::query_scalar("select pg_is_in_recovery()")
                .fetch_one(&mut c)
                .await
                .map_err(PgError::query("query recovery state"))?;
            if rec {
                info!("promoting");
                let ok: bool = sqlx::query_scalar("select pg_promote(true, 60)")
                    .fetch_one(&mut c)
                    .await
                    .map_err(PgError::query("pg_promote"))?;
                if !ok {
                    return Err(PgError::Timeout {
                        what: "promotion (pg_promote returned false)".into(),
                        after: Duration::from_secs(60),
                    });
                }
                // PostgreSQL 15 records the new timeline in pg_control only at the first
                // checkpoint after promotion, and pg_rewind reads the source's timeline from
                // there: without this, rewinding the old primary onto us says "no rewind
                // required" and leaves it on the dead timeline (Patroni does the same).
                sqlx::query("checkpoint")
                    .execute(&mut c)
                    .await
                    .map_err(PgError::query("checkpoint after promote"))?;
            } else {
                info!("already primary");
            }
            let tl = primary_timeline(&mut c).await?;
            info!(timeline = tl, "primary");
            Ok(tl)
        }
        .instrument(info_span!("pg_promote", cluster = %self.cfg.cluster, %epoch))
        .await
    }

    /// Creates a physical replication slot on this primary (reserving WAL now). Idempotent.
    pub async fn create_replication_slot(&self, name: &str) -> PgResult<()> {
        validate_slot(name)?;
        let mut c = self.connect().await?;
        let exists: bool = sqlx::query_scalar(
            "select exists(select 1 from pg_replication_slots where slot_name = $1)",
        )
        .bind(name)
        .fetch_one(&mut c)
        .await
        .map_err(PgError::query("query pg_replication_slots"))?;
        if !exists {
            sqlx::query("select pg_create_physical_replication_slot($1, true)")
                .bind(name)
                .execute(&mut c)
                .await
                .map_err(PgError::query("pg_create_physical_replication_slot"))?;
            info!(slot = name, "replication slot created");
        }
        Ok(())
    }

    /// Drops a replication slot if it exists (an old replica that will not come back).
    pub async fn drop_replication_slot(&self, name: &str) -> PgResult<()> {
        validate_slot(name)?;
        let mut c = self.connect().await?;
        sqlx::query("select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = $1")
            .bind(name)
            .execute(&mut c)
            .await
            .map_err(PgError::query("pg_drop_replication_slot"))?;
        Ok(())
    }

    /// `CHECKPOINT` (a restartpoint on a replica).
    pub async fn checkpoint(&self) -> PgResult<()> {
        let mut c = self.connect().await?;
        sqlx::query("checkpoint")
            .execute(&mut c)
            .await
            .map_err(PgError::query("checkpoint"))?;
        Ok(())
    }

    /// `pg_switch_wal()`: closes the current WAL segment (so it can be archived); returns
    /// the end of the closed segment.
    pub async fn switch_wal(&self) -> PgResult<Lsn> {
        let mut c = self.connect().await?;
        let t: String = sqlx::query_scalar("select pg_switch_wal()::text")
            .fetch_one(&mut c)
            .await
            .map_err(PgError::query("pg_switch_wal"))?;
        t.parse()
            .map_err(|e: lsn::LsnParseError| PgError::Unexpected {
                what: "pg_switch_wal".into(),
                reason: e.to_string(),
            })
    }

    /// Writes the fence marker (before anything else in a fence).
    pub fn mark_fenced(&self, reason: &str) -> PgResult<FenceMarker> {
        let m = FenceMarker {
            reason: reason.to_owned(),
            fenced_at: chrono::Utc::now(),
            epoch: self.markers.epoch()?,
        };
        self.markers.set_fence(&m)?;
        Ok(m)
    }

    /// Lifts the fence. `epoch` must be at least the data dir's; it is recorded. Does not
    /// start the server.
    pub async fn unfence(&self, epoch: Epoch) -> PgResult<()> {
        let _g = self.op_lock.lock().await;
        self.markers.raise_epoch(epoch)?;
        if let Some(m) = self.markers.fence()? {
            warn!(%epoch, fenced_since = %m.fenced_at, reason = %m.reason, "lifting the fence");
            self.markers.clear_fence()?;
        }
        Ok(())
    }
}

fn stop_report(was_running: bool, cd: ControlData) -> StopReport {
    StopReport {
        was_running,
        clean: cd.is_clean_shutdown(),
        checkpoint_lsn: cd.checkpoint_lsn,
        redo_lsn: cd.redo_lsn,
        timeline: cd.timeline,
        state: cd.state,
    }
}

fn fenced_error(m: &FenceMarker) -> PgError {
    PgError::Fenced {
        reason: m.reason.clone(),
        since: m.fenced_at.to_rfc3339(),
        epoch: m.epoch,
    }
}

fn validate_slot(name: &str) -> PgResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(PgError::SlotName {
            name: name.to_owned(),
        })
    }
}

fn unix_to_utc(secs: f64) -> Option<chrono::DateTime<chrono::Utc>> {
    if !secs.is_finite() {
        return None;
    }
    let whole = secs.floor();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    chrono::DateTime::from_timestamp(whole as i64, ((secs - whole) * 1e9) as u32)
}

async fn current_lsn(c: &mut PgConnection) -> PgResult<Lsn> {
    let t: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
        .fetch_one(c)
        .await
        .map_err(PgError::query("pg_current_wal_lsn"))?;
    t.parse()
        .map_err(|e: lsn::LsnParseError| PgError::Unexpected {
            what: "pg_current_wal_lsn".into(),
            reason: e.to_string(),
        })
}

/// The timeline a primary writes on: the first 8 hex digits of its current WAL file name
/// (`pg_control_checkpoint()` lags until the first checkpoint after a promotion).
async fn primary_timeline(c: &mut PgConnection) -> PgResult<u32> {
    let name: String = sqlx::query_scalar("select pg_walfile_name(pg_current_wal_lsn())")
        .fetch_one(c)
        .await
        .map_err(PgError::query("pg_walfile_name"))?;
    name.get(..8)
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| PgError::Unexpected {
            what: "pg_walfile_name".into(),
            reason: format!("{name:?}"),
        })
}

async fn systemctl(args: &[&str], timeout: Duration) -> PgResult<()> {
    let out = tokio::time::timeout(
        timeout,
        tokio::process::Command::new("systemctl")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| PgError::Timeout {
        what: format!("systemctl {}", args.join(" ")),
        after: timeout,
    })?
    .map_err(|e| PgError::Spawn {
        program: "systemctl".into(),
        reason: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(PgError::Command {
            program: format!("systemctl {}", args.join(" ")),
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(10).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names() {
        validate_slot("shanghai_1").unwrap();
        for bad in ["", "A", "a-b", "a b", &"x".repeat(64)] {
            assert!(validate_slot(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unix_times() {
        let t = unix_to_utc(1.5).unwrap();
        assert_eq!(t.timestamp_millis(), 1500);
        assert!(unix_to_utc(f64::NAN).is_none());
    }
}
