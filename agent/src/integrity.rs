//! Security monitoring (DRP scenario 3, `enable-security-monitoring --level high` and the
//! "data integrity violations" detection): the verb `security-monitoring level=normal|high`
//! and the file-integrity monitor behind it.
//!
//! Why: after a breach the first question is "what did they change?". The files that decide
//! what this host runs and whom it trusts (binaries, configs, certificates; `[integrity]
//! paths`) are hashed with BLAKE3 at start and on every interval, and a file whose hash
//! differs from its baseline becomes a FAILING check named `integrity:<path>`. Being a check
//! result, the change travels in the next heartbeat, the coordinator commits the transition
//! and `drctl status` shows it, with no new wire message. The list of changed files is also
//! set as the fact `integrity_changed`.
//!
//! The baseline is persisted (`<data_dir>/integrity/baseline.json`), so a file changed
//! while the agent was down (or changed to survive a restart) still shows as changed. A
//! legitimate change (an upgrade) is accepted with `security-monitoring level=... rebaseline=true`.
//!
//! `level=high` re-hashes every `high_interval` instead of `interval` and runs every health
//! check [`HIGH_HEALTH_DIVISOR`] times as often; `level=normal` restores both.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dr_proto::pb;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::actions::{ActionCtx, ActionOutput, Registry};
use crate::config::{Config, IntegritySpec};
use crate::health::Health;
use crate::rotate::atomic_file::write_atomic;
use crate::session::SessionHandle;

pub const STATE_DIR: &str = "integrity";
pub const BASELINE_FILE: &str = "baseline.json";
/// Health checks run this many times as often at `level=high`.
pub const HIGH_HEALTH_DIVISOR: u32 = 5;
/// The `service` of integrity check results.
pub const SERVICE: &str = "security";
pub const FACT_CHANGED: &str = "integrity_changed";
pub const FACT_LEVEL: &str = "security_monitoring_level";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Normal,
    High,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::High => "high",
        }
    }
}

/// What a watched file hashes to (`None`: the file is missing).
type Digest = Option<String>;

fn hash_file(path: &Path) -> Result<Digest, String> {
    match std::fs::File::open(path) {
        Ok(mut f) => {
            let mut h = blake3::Hasher::new();
            std::io::copy(&mut f, &mut h).map_err(|e| e.to_string())?;
            Ok(Some(h.finalize().to_hex().to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

fn short(d: &Digest) -> String {
    d.as_ref().map_or_else(
        || "missing".to_string(),
        |h| format!("blake3 {}", &h[..16.min(h.len())]),
    )
}

pub fn check_name(path: &Path) -> String {
    format!("integrity:{}", path.display())
}

struct State {
    baseline: BTreeMap<PathBuf, Digest>,
    changed: Vec<PathBuf>,
    session: Option<SessionHandle>,
}

/// The file-integrity monitor of this host. Cheap to clone.
#[derive(Clone)]
pub struct IntegrityMonitor {
    spec: Arc<IntegritySpec>,
    dir: PathBuf,
    health: Health,
    level: watch::Sender<Level>,
    scan_now: Arc<Notify>,
    state: Arc<Mutex<State>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl IntegrityMonitor {
    /// Declares one UNKNOWN `integrity:<path>` check per watched file (so the first Hello
    /// names them); nothing is hashed until [`Self::run`].
    pub fn new(config: &Config, health: Health) -> Self {
        for p in &config.integrity.paths {
            health.report_external(pb::CheckResult {
                name: check_name(p),
                service: SERVICE.into(),
                tier: pb::Tier::Important as i32,
                state: pb::CheckState::Unknown as i32,
                detail: "not hashed yet".into(),
                duration_ms: 0,
                observed_at_unix_ms: 0,
            });
        }
        Self {
            spec: Arc::new(config.integrity.clone()),
            dir: config.data_dir.join(STATE_DIR),
            health,
            level: watch::Sender::new(Level::Normal),
            scan_now: Arc::new(Notify::new()),
            state: Arc::new(Mutex::new(State {
                baseline: BTreeMap::new(),
                changed: Vec::new(),
                session: None,
            })),
        }
    }

    /// Facts go to this session from now on.
    pub fn attach_session(&self, session: SessionHandle) {
        let mut st = lock(&self.state);
        session.set_fact(FACT_LEVEL, self.level.borrow().as_str());
        session.set_fact(FACT_CHANGED, join_paths(&st.changed));
        st.session = Some(session);
    }

    pub fn level(&self) -> Level {
        *self.level.borrow()
    }

    pub fn interval(&self) -> Duration {
        match self.level() {
            Level::Normal => self.spec.interval,
            Level::High => self.spec.high_interval,
        }
    }

    /// Files whose hash differs from the baseline at the last scan.
    pub fn changed(&self) -> Vec<PathBuf> {
        lock(&self.state).changed.clone()
    }

    pub fn set_level(&self, level: Level) {
        self.level.send_replace(level);
        self.health.set_interval_divisor(match level {
            Level::Normal => 1,
            Level::High => HIGH_HEALTH_DIVISOR,
        });
        if let Some(s) = &lock(&self.state).session {
            s.set_fact(FACT_LEVEL, level.as_str());
        }
        self.scan_now.notify_one();
    }

    fn baseline_path(&self) -> PathBuf {
        self.dir.join(BASELINE_FILE)
    }

    /// Loads the persisted baseline; hashes files that have none and persists the result.
    /// With `reset`, every file is re-baselined (accepting its current content).
    pub async fn load_baseline(&self, reset: bool) -> Result<(), String> {
        let (spec, path, dir) = (self.spec.clone(), self.baseline_path(), self.dir.clone());
        let baseline = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let mut saved: BTreeMap<PathBuf, Digest> = if reset {
                BTreeMap::new()
            } else {
                match std::fs::read(&path) {
                    Ok(b) => serde_json::from_slice(&b)
                        .map_err(|e| format!("{}: {e}", path.display()))?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
                    Err(e) => return Err(format!("{}: {e}", path.display())),
                }
            };
            saved.retain(|p, _| spec.paths.contains(p));
            let mut grew = reset;
            for p in &spec.paths {
                if !saved.contains_key(p) {
                    saved.insert(
                        p.clone(),
                        hash_file(p).map_err(|e| format!("{}: {e}", p.display()))?,
                    );
                    grew = true;
                }
            }
            if grew {
                std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                let json = serde_json::to_vec_pretty(&saved).map_err(|e| e.to_string())?;
                write_atomic(&path, &json, 0o600).map_err(|e| e.to_string())?;
            }
            Ok(saved)
        })
        .await
        .map_err(|e| e.to_string())??;
        lock(&self.state).baseline = baseline;
        Ok(())
    }

    /// Hashes every watched file once and reports the results.
    pub async fn scan(&self) {
        let baseline = lock(&self.state).baseline.clone();
        let results = {
            let paths = self.spec.paths.clone();
            tokio::task::spawn_blocking(move || {
                paths
                    .into_iter()
                    .map(|p| {
                        let started = std::time::Instant::now();
                        let h = hash_file(&p);
                        (p, h, started.elapsed())
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default()
        };
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let mut changed = Vec::new();
        for (path, hashed, took) in results {
            let base = baseline.get(&path).cloned().unwrap_or(None);
            let (state, detail) = match hashed {
                Err(e) => (pb::CheckState::Unknown, format!("cannot hash: {e}")),
                Ok(now) if now == base => (
                    pb::CheckState::Passing,
                    format!("unchanged ({})", short(&now)),
                ),
                Ok(now) => {
                    changed.push(path.clone());
                    (
                        pb::CheckState::Failing,
                        format!("changed: baseline {}, now {}", short(&base), short(&now)),
                    )
                }
            };
            self.health.report_external(pb::CheckResult {
                name: check_name(&path),
                service: SERVICE.into(),
                tier: pb::Tier::Important as i32,
                state: state as i32,
                detail,
                duration_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                observed_at_unix_ms: now_ms,
            });
        }
        let mut st = lock(&self.state);
        if st.changed != changed {
            if changed.is_empty() {
                info!("all watched files match their baseline again");
            } else {
                warn!(files = %join_paths(&changed), "watched files changed");
            }
            if let Some(s) = &st.session {
                s.set_fact(FACT_CHANGED, join_paths(&changed));
            }
        }
        st.changed = changed;
    }

    /// Loads the baseline, then scans on every interval (of the current level) and whenever
    /// the level changes, until `cancel`.
    ///
    /// Cancel safety: yes; a scan only reads files and updates in-memory results.
    pub async fn run(self, cancel: CancellationToken) {
        if self.spec.paths.is_empty() {
            return;
        }
        if let Err(e) = self.load_baseline(false).await {
            warn!(error = %e, "integrity baseline unavailable, checks stay unknown");
            return;
        }
        loop {
            self.scan().await;
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(self.interval()) => {}
                () = self.scan_now.notified() => {}
            }
        }
    }
}

fn join_paths(p: &[PathBuf]) -> String {
    p.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The `security-monitoring` verb.
pub async fn monitoring_action(
    mon: &IntegrityMonitor,
    args: HashMap<String, String>,
) -> ActionOutput {
    if let Some(k) = args
        .keys()
        .find(|k| !["level", "rebaseline"].contains(&k.as_str()))
    {
        return ActionOutput::failed(format!(
            "security-monitoring: unknown argument `{k}`; allowed: level=normal|high, rebaseline=true"
        ));
    }
    let level = match args.get("level").map(String::as_str) {
        Some("normal") => Level::Normal,
        Some("high") => Level::High,
        _ => return ActionOutput::failed("security-monitoring needs level=normal|high"),
    };
    let rebaseline = match args.get("rebaseline").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return ActionOutput::failed(format!("rebaseline={other:?}: use true or false"));
        }
    };
    if rebaseline {
        if let Err(e) = mon.load_baseline(true).await {
            return ActionOutput::failed(format!("rebaseline failed: {e}"));
        }
        info!("integrity baseline reset to the files' current content");
    }
    mon.set_level(level);
    // Answer with a fresh verdict rather than the last interval's.
    mon.scan().await;
    let changed = mon.changed();
    let msg = format!(
        "security monitoring {}: {} file(s) watched every {}, health checks {}; {}",
        level.as_str(),
        mon.spec.paths.len(),
        humantime::format_duration(mon.interval()),
        if level == Level::High {
            format!("{HIGH_HEALTH_DIVISOR}x as often")
        } else {
            "at their configured intervals".to_string()
        },
        if changed.is_empty() {
            "no file changed".to_string()
        } else {
            format!("CHANGED: {}", join_paths(&changed))
        }
    );
    info!(
        level = level.as_str(),
        changed = changed.len(),
        "security monitoring level set"
    );
    ActionOutput::ok(msg)
        .with_detail("level", level.as_str())
        .with_detail(
            "interval",
            humantime::format_duration(mon.interval()).to_string(),
        )
        .with_detail(
            "health_interval_divisor",
            if level == Level::High {
                HIGH_HEALTH_DIVISOR
            } else {
                1
            }
            .to_string(),
        )
        .with_detail("watched", mon.spec.paths.len().to_string())
        .with_detail("changed", join_paths(&changed))
        .with_detail("rebaselined", rebaseline.to_string())
}

/// Registers `security-monitoring`.
pub fn register(reg: &mut Registry, mon: IntegrityMonitor) {
    reg.register(
        "security-monitoring",
        move |args: HashMap<String, String>, ctx: ActionCtx| {
            let mon = mon.clone();
            async move {
                monitoring_action(&mon, args)
                    .instrument(info_span!("security_monitoring", key = %ctx.key))
                    .await
            }
        },
    );
}
