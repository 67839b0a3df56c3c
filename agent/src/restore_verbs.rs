//! Restore verbs the coordinator's restore and drill plans send (`Generic{verb, args}`):
//! `restore.wal-list`, `restore.pg-check`, `restore.pg-files`, `restore.pg-start`, `restore.pg-verify`,
//! `restore.pg-discard`; plus the recovery settings shared with the standalone
//! `dr-agent restore` ([`recovery_conf`]).
//!
//! Why one verb per plan step rather than one "restore everything" verb: the coordinator
//! records each step in the Raft log, so after a leader change the plan resumes at the step
//! that was running instead of writing the files again, and `drctl operations show` tells the
//! operator whether the files, the recovery or the verification failed.
//!
//! Safety rules enforced here, whatever the coordinator asks:
//! - `restore.pg-check` and `restore.pg-files` refuse a target directory that is not empty unless
//!   the restore is in place, and in place only when no server runs on it
//!   (`postmaster.pid` with a live process). The replaced directory is kept beside the target
//!   (`<dir>.pre-restore-<unix time>`), never deleted: rolling back a rollback must be
//!   possible.
//! - `restore.pg-start` refuses a directory that still has a `<dir>.partial` sibling or lacks
//!   the marker `restore.pg-files` writes last, so PostgreSQL is never started on a partial
//!   restore; cancelling it (or a recovery that fails) stops the server it started.
//! - `restore.pg-discard` removes only directories carrying the scratch marker written for a
//!   drill, so a confused coordinator cannot delete a production data directory.
//!
//! PostgreSQL binaries run as the `[postgres] run_as` user (through `runuser` when the agent
//! is root, see [`crate::pg::process`]); queries go through `psql` the same way, so peer
//! authentication on the unix socket works without a password.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tracing::{Instrument, info, info_span, warn};

use crate::actions::{ActionCtx, ActionOutput, Registry};
use crate::backup::repo::MAX_WAL_SIZE;
use crate::backup::restore::{RestoreOptions, partial_path, restore_with_progress};
use crate::backup::wal_push::wal_object_name;
use crate::backup::{BackupId, RepoConfig, Repository};
use crate::pg::process::Runner;

/// Written last by `restore.pg-files` into the restored directory; `restore.pg-start` requires it.
pub const MARKER: &str = "dr_restore.json";
/// Server log of a restored instance (inside its data dir: it is thrown away with it).
const LOG: &str = "dr_restore.log";

/// Where PostgreSQL's binaries are and who runs them, from `[postgres]` when present.
#[derive(Clone, Debug)]
pub struct PgBins {
    pub bin_dir: PathBuf,
    pub run_as: String,
}

impl Default for PgBins {
    fn default() -> Self {
        PgBins {
            bin_dir: std::env::var_os("DR_PG_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin")),
            run_as: "postgres".into(),
        }
    }
}

/// The recovery target of a point-in-time restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Replay every archived WAL file, then promote.
    Latest,
    /// Stop as soon as the backup is consistent (exactly the backup's data).
    Immediate,
    /// `recovery_target_time`, RFC 3339 or PostgreSQL's timestamptz text.
    Time(String),
    Lsn(String),
    Xid(String),
    /// A restore point made with `pg_create_restore_point`.
    Name(String),
}

impl Target {
    /// From the `target_type` / `target_value` pair of the verbs and the CLI.
    pub fn parse(kind: &str, value: &str) -> Result<Target, String> {
        let need = |what: &str| -> Result<String, String> {
            if value.trim().is_empty() {
                Err(format!("recovery target {kind} needs a value ({what})"))
            } else {
                Ok(value.trim().to_owned())
            }
        };
        match kind {
            "" | "latest" => Ok(Target::Latest),
            "immediate" => Ok(Target::Immediate),
            "time" => {
                let v = need("a time such as 2026-11-28T10:15:00Z")?;
                Ok(Target::Time(pg_time(&v)?))
            }
            "lsn" => {
                let v = need("an LSN such as 0/3000060")?;
                let ok = v.split_once('/').is_some_and(|(a, b)| {
                    !a.is_empty()
                        && !b.is_empty()
                        && a.len() <= 8
                        && b.len() <= 8
                        && a.chars().chain(b.chars()).all(|c| c.is_ascii_hexdigit())
                });
                if !ok {
                    return Err(format!(
                        "{v:?} is not an LSN (hex HIGH/LOW, e.g. 0/3000060)"
                    ));
                }
                Ok(Target::Lsn(v.to_ascii_uppercase()))
            }
            "xid" => {
                let v = need("a transaction id")?;
                if !v.chars().all(|c| c.is_ascii_digit()) {
                    return Err(format!("{v:?} is not a transaction id (digits only)"));
                }
                Ok(Target::Xid(v))
            }
            "name" => {
                let v = need("a restore point name")?;
                if v.len() > 63 {
                    return Err(format!("restore point name {v:?} is longer than 63 bytes"));
                }
                Ok(Target::Name(v))
            }
            other => Err(format!(
                "unknown recovery target type {other:?}: use latest, immediate, time, lsn, xid or name"
            )),
        }
    }
}

/// RFC 3339 (or already PostgreSQL's text) to the text `recovery_target_time` takes.
pub fn pg_time(v: &str) -> Result<String, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(v) {
        return Ok(t
            .with_timezone(&chrono::Utc)
            .format("%Y-%m-%d %H:%M:%S%.6f+00")
            .to_string());
    }
    if let Ok(ms) = v.parse::<i64>() {
        // Unix milliseconds (what the coordinator stores).
        if let Some(t) = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms) {
            return Ok(t.format("%Y-%m-%d %H:%M:%S%.3f+00").to_string());
        }
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%#z"] {
        if chrono::DateTime::parse_from_str(v, f).is_ok() {
            return Ok(v.to_owned());
        }
    }
    Err(format!(
        "{v:?} is not a time: use RFC 3339 with a zone, e.g. 2026-11-28T10:15:00Z or 2026-11-28T18:15:00+08:00"
    ))
}

fn q(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// The postgresql.auto.conf lines of a recovery to `target`, ending with `action`
/// (`promote` or `pause`), following `timeline` (`latest`, `current` or a number; empty:
/// PostgreSQL's default, latest).
pub fn recovery_conf(target: &Target, action: &str, timeline: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    match target {
        Target::Latest => {}
        Target::Immediate => out.push("recovery_target = 'immediate'".to_owned()),
        Target::Time(t) => out.push(format!("recovery_target_time = {}", q(t))),
        Target::Lsn(l) => out.push(format!("recovery_target_lsn = {}", q(l))),
        Target::Xid(x) => out.push(format!("recovery_target_xid = {}", q(x))),
        Target::Name(n) => out.push(format!("recovery_target_name = {}", q(n))),
    }
    match action {
        "" | "promote" | "pause" => {}
        other => {
            return Err(format!("target action {other:?}: use promote or pause"));
        }
    }
    if *target != Target::Latest {
        let a = if action.is_empty() { "promote" } else { action };
        out.push(format!("recovery_target_action = '{a}'"));
    }
    match timeline {
        "" => {}
        "latest" | "current" => out.push(format!("recovery_target_timeline = '{timeline}'")),
        n if n.parse::<u32>().is_ok_and(|n| n > 0) => {
            out.push(format!("recovery_target_timeline = '{n}'"))
        }
        other => {
            return Err(format!(
                "timeline {other:?}: use latest, current or a timeline number"
            ));
        }
    }
    Ok(out)
}

/// Registers the restore verbs.
pub fn register(reg: &mut Registry, env: HashMap<String, String>, bins: PgBins) {
    let env = Arc::new(env);
    let bins = Arc::new(bins);
    let e = env.clone();
    reg.register("restore.wal-list", move |args, ctx| {
        wal_list(e.clone(), args, ctx)
    });
    let (e, b) = (env.clone(), bins.clone());
    reg.register("restore.pg-check", move |args, ctx| {
        check(e.clone(), b.clone(), args, ctx)
    });
    let (e, b) = (env.clone(), bins.clone());
    reg.register("restore.pg-files", move |args, ctx| {
        files(e.clone(), b.clone(), args, ctx)
    });
    let b = bins.clone();
    reg.register("restore.pg-start", move |args, ctx| {
        start(b.clone(), args, ctx)
    });
    let b = bins.clone();
    reg.register("restore.pg-verify", move |args, ctx| {
        verify(b.clone(), args, ctx)
    });
    reg.register("restore.pg-discard", move |args, ctx| {
        discard(bins.clone(), args, ctx)
    });
}

fn arg<'a>(args: &'a HashMap<String, String>, k: &str) -> Result<&'a str, String> {
    match args.get(k).map(String::as_str) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(format!("missing argument `{k}`")),
    }
}

fn opt<'a>(args: &'a HashMap<String, String>, k: &str) -> &'a str {
    args.get(k).map(String::as_str).unwrap_or("")
}

fn flag(args: &HashMap<String, String>, k: &str) -> bool {
    opt(args, k) == "true"
}

async fn open(env: &HashMap<String, String>, path: &str) -> Result<Repository, String> {
    let p = PathBuf::from(path);
    if !p.is_absolute() {
        return Err(format!(
            "repo_config {path} must be an absolute path on this host"
        ));
    }
    let cfg =
        RepoConfig::load(&p, env).map_err(|e| format!("load repository config {path}: {e}"))?;
    Repository::open(&cfg)
        .await
        .map_err(|e| format!("open repository {}: {e}", cfg.location.describe()))
}

macro_rules! try_out {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return ActionOutput::failed(e),
        }
    };
}

/// One contiguous run of archived segments of one timeline (16 MiB segments).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct WalRun {
    pub timeline: u32,
    pub first: u64,
    pub last: u64,
    pub first_archived_unix_ms: i64,
    pub last_archived_unix_ms: i64,
}

/// `(timeline, segment number)` of a 24-hex-digit WAL segment name.
pub fn parse_segment(name: &str) -> Option<(u32, u64)> {
    if name.len() != 24 || !name.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let tl = u32::from_str_radix(&name[..8], 16).ok()?;
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    Some((tl, log * 256 + seg))
}

/// The segment name of `(timeline, segment number)`.
pub fn segment_name(tl: u32, segno: u64) -> String {
    format!("{tl:08X}{:08X}{:08X}", segno / 256, segno % 256)
}

/// Groups `(timeline, segno, archived_at)` into contiguous runs.
pub fn runs(mut segs: Vec<(u32, u64, i64)>) -> Vec<WalRun> {
    segs.sort();
    let mut out: Vec<WalRun> = Vec::new();
    for (tl, n, at) in segs {
        match out.last_mut() {
            Some(r) if r.timeline == tl && r.last + 1 == n => {
                r.last = n;
                r.last_archived_unix_ms = r.last_archived_unix_ms.max(at);
            }
            _ => out.push(WalRun {
                timeline: tl,
                first: n,
                last: n,
                first_archived_unix_ms: at,
                last_archived_unix_ms: at,
            }),
        }
    }
    out
}

/// `restore.wal-list`: args `repo_config`. Details: `runs` (JSON [`WalRun`]s), `histories`
/// (JSON `{timeline: history file text}`), `backups` (manifest ids in the repository).
async fn wal_list(
    env: Arc<HashMap<String, String>>,
    args: HashMap<String, String>,
    ctx: ActionCtx,
) -> ActionOutput {
    let span = info_span!("restore_wal_list", key = %ctx.key);
    async move {
        let repo = try_out!(open(&env, try_out!(arg(&args, "repo_config"))).await);
        let entries = try_out!(
            repo.list_objects("wal/")
                .await
                .map_err(|e| format!("list archived WAL: {e}"))
        );
        let mut segs = Vec::new();
        let mut history_names = Vec::new();
        let mut need_stat = Vec::new();
        for e in &entries {
            let name = e.name().to_owned();
            if let Some((tl, n)) = parse_segment(&name) {
                match e.metadata().last_modified() {
                    Some(t) => segs.push((tl, n, t.timestamp_millis())),
                    None => need_stat.push((tl, n, e.path().to_owned())),
                }
            } else if name.ends_with(".history") {
                history_names.push(name);
            }
        }
        // Listing without times (fs): one stat per object, 16 at a time.
        let op = repo.operator().clone();
        let stats: Vec<Result<(u32, u64, i64), String>> = futures::stream::iter(need_stat)
            .map(|(tl, n, path)| {
                let op = op.clone();
                async move {
                    let m = op
                        .stat(&path)
                        .await
                        .map_err(|e| format!("stat {path}: {e}"))?;
                    Ok((tl, n, m.last_modified().map_or(0, |t| t.timestamp_millis())))
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for s in stats {
            segs.push(try_out!(s));
        }
        let mut histories = BTreeMap::new();
        for h in history_names {
            let obj = try_out!(wal_object_name(&h).map_err(|e| e.to_string()));
            let raw = match repo.get_raw(&obj).await {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => return ActionOutput::failed(format!("read {obj}: {e}")),
            };
            let (plain, _) = try_out!(
                repo.key()
                    .open(&obj, raw, MAX_WAL_SIZE)
                    .map_err(|e| format!("object {obj} is corrupt: {e}"))
            );
            let tl = u32::from_str_radix(&h[..8], 16).unwrap_or(0);
            histories.insert(tl, String::from_utf8_lossy(&plain).into_owned());
        }
        let backups = try_out!(
            repo.list_backups()
                .await
                .map_err(|e| format!("list backups: {e}"))
        );
        let runs = runs(segs);
        ActionOutput::ok(format!(
            "{} run(s) of archived WAL on {} timeline(s), {} history file(s)",
            runs.len(),
            runs.iter()
                .map(|r| r.timeline)
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            histories.len()
        ))
        .with_detail("runs", serde_json::to_string(&runs).unwrap_or_default())
        .with_detail(
            "histories",
            serde_json::to_string(&histories).unwrap_or_default(),
        )
        .with_detail(
            "backups",
            backups
                .iter()
                .map(|b| b.0.as_str())
                .collect::<Vec<_>>()
                .join(","),
        )
    }
    .instrument(span)
    .await
}

/// Is a server running on `dir`? (`postmaster.pid` naming a live process.)
pub fn server_running(dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    alive.then_some(pid)
}

fn dir_state(dir: &Path, in_place: bool) -> Result<(), String> {
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_none() {
                return Ok(());
            }
            if !in_place {
                return Err(format!(
                    "target directory {} is not empty: choose an empty or absent --data-dir, or restore in place with --in-place --confirm",
                    dir.display()
                ));
            }
            if let Some(pid) = server_running(dir) {
                return Err(format!(
                    "PostgreSQL (pid {pid}) is running on {}: an in-place restore needs the database stopped; stop it first (e.g. `drctl run service stop`), then retry",
                    dir.display()
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("read {}: {e}", dir.display())),
    }
}

/// `(timeline, first, last)` segment ranges of `wal_required` ("TL:FIRST-LAST;...", hex
/// segment names' parts as produced by the coordinator: `1:3-7`).
fn required(spec: &str) -> Result<Vec<(u32, u64, u64)>, String> {
    let mut out = Vec::new();
    for part in spec.split(';').filter(|p| !p.is_empty()) {
        let bad = || format!("wal_required {part:?}: expected TL:FIRST-LAST");
        let (tl, range) = part.split_once(':').ok_or_else(bad)?;
        let (a, b) = range.split_once('-').ok_or_else(bad)?;
        out.push((
            tl.parse().map_err(|_| bad())?,
            a.parse().map_err(|_| bad())?,
            b.parse().map_err(|_| bad())?,
        ));
    }
    Ok(out)
}

/// `restore.pg-check`: args `repo_config`, `backup_id`, `data_dir`, `in_place`, `wal_required`.
/// Reads the manifest (authenticated), checks that every required WAL segment is in the
/// archive and that the target may be written. Writes nothing.
async fn check(
    env: Arc<HashMap<String, String>>,
    _bins: Arc<PgBins>,
    args: HashMap<String, String>,
    ctx: ActionCtx,
) -> ActionOutput {
    let span = info_span!("restore_check", key = %ctx.key);
    async move {
        let repo = try_out!(open(&env, try_out!(arg(&args, "repo_config"))).await);
        let id = BackupId(try_out!(arg(&args, "backup_id")).to_owned());
        let dir = PathBuf::from(try_out!(arg(&args, "data_dir")));
        try_out!(dir_state(&dir, flag(&args, "in_place")));
        let m = try_out!(
            repo.get_manifest(&id)
                .await
                .map_err(|e| format!("backup {id}: {e}"))
        );
        let mut missing = Vec::new();
        let mut checked = 0u64;
        for (tl, a, b) in try_out!(required(opt(&args, "wal_required"))) {
            for n in a..=b {
                if ctx.cancel.is_cancelled() {
                    return ActionOutput::failed("check cancelled");
                }
                let name = segment_name(tl, n);
                let obj = try_out!(wal_object_name(&name).map_err(|e| e.to_string()));
                match repo.exists(&obj).await {
                    Ok(true) => checked += 1,
                    Ok(false) => missing.push(name),
                    Err(e) => return ActionOutput::failed(format!("stat {obj}: {e}")),
                }
            }
        }
        if !missing.is_empty() {
            return ActionOutput::failed(format!(
                "the WAL chain is incomplete: {} segment(s) missing from the archive ({}{}); nothing was written",
                missing.len(),
                missing.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                if missing.len() > 5 { ", ..." } else { "" }
            ));
        }
        let chunks = m.chunk_ids().len();
        ActionOutput::ok(format!(
            "backup {id} readable ({} files, {chunks} chunks), {checked} WAL segment(s) present, {} may be written",
            m.entries.len(),
            dir.display()
        ))
        .with_detail("wal_segments", checked.to_string())
        .with_detail("bytes_total", m.stats.bytes_total.to_string())
    }
    .instrument(span)
    .await
}

/// A free TCP port on 127.0.0.1 (for scratch instances).
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("find a free port: {e}"))
}

fn chown_tree(runner: &Runner, dir: &Path) -> Result<(), String> {
    let Some((uid, gid)) = runner.owner().map_err(|e| e.to_string())? else {
        return Ok(());
    };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        std::os::unix::fs::lchown(&p, Some(uid.as_raw()), Some(gid.as_raw()))
            .map_err(|e| format!("chown {}: {e}", p.display()))?;
        let is_dir = std::fs::symlink_metadata(&p)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if is_dir {
            let rd = std::fs::read_dir(&p).map_err(|e| format!("read {}: {e}", p.display()))?;
            for e in rd.flatten() {
                stack.push(e.path());
            }
        }
    }
    Ok(())
}

/// The `restore_command` line for the restored server: this executable's `wal-fetch`.
pub fn restore_command(repo_config: &str) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("find the dr-agent executable: {e}"))?;
    Ok(format!(
        "{} wal-fetch %f %p --repo-config {}",
        sh_quote(&exe.to_string_lossy()),
        sh_quote(repo_config)
    ))
}

/// Shell-quote one argument for a restore_command line.
fn sh_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=:@".contains(c))
    {
        s.to_string()
    } else {
        format!(
            "\"{}\"",
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('$', "\\$")
        )
    }
}

/// The restored copy's socket directory: its data directory, unless the socket path would
/// pass the 107-byte limit of unix socket names (then `/tmp`, PostgreSQL's own default).
fn default_socket_dir(dir: &Path) -> String {
    let d = dir.display().to_string();
    if d.len() + "/.s.PGSQL.65535.lock".len() < 100 {
        d
    } else {
        "/tmp".to_owned()
    }
}

/// `restore.pg-files`: args `repo_config`, `backup_id`, `data_dir`, `in_place`, `port` (0 or
/// empty: a free one), `socket_dir` (empty: the data dir), `target_type`, `target_value`,
/// `target_action`, `timeline`, `scratch`, `keep_archive`. Details: `data_dir`, `port`,
/// `socket_dir`, `files`, `bytes`, `moved_aside`.
async fn files(
    env: Arc<HashMap<String, String>>,
    bins: Arc<PgBins>,
    args: HashMap<String, String>,
    ctx: ActionCtx,
) -> ActionOutput {
    let span = info_span!("restore_files", key = %ctx.key);
    async move {
        let repo_config = try_out!(arg(&args, "repo_config"));
        let repo = try_out!(open(&env, repo_config).await);
        let id = BackupId(try_out!(arg(&args, "backup_id")).to_owned());
        let dir = PathBuf::from(try_out!(arg(&args, "data_dir")));
        let in_place = flag(&args, "in_place");
        let target = try_out!(Target::parse(opt(&args, "target_type"), opt(&args, "target_value")));
        let mut conf = try_out!(recovery_conf(
            &target,
            opt(&args, "target_action"),
            opt(&args, "timeline")
        ));
        try_out!(dir_state(&dir, in_place));
        let port = match opt(&args, "port") {
            "" | "0" => {
                if in_place {
                    0
                } else {
                    try_out!(free_port())
                }
            }
            p => try_out!(p.parse::<u16>().map_err(|_| format!("port {p:?} is not a port"))),
        };
        let socket_dir = match opt(&args, "socket_dir") {
            "" if !in_place => default_socket_dir(&dir),
            s => s.to_owned(),
        };
        if port != 0 {
            conf.push(format!("port = {port}"));
        }
        if !socket_dir.is_empty() {
            conf.push(format!("unix_socket_directories = {}", q(&socket_dir)));
        }
        if !flag(&args, "keep_archive") {
            // A copy must not archive its own timeline into the source's repository.
            conf.push("archive_mode = off".into());
        }
        let mut moved = String::new();
        if in_place && std::fs::read_dir(&dir).is_ok_and(|mut r| r.next().is_some()) {
            let aside = PathBuf::from(format!(
                "{}.pre-restore-{}",
                dir.display(),
                chrono::Utc::now().timestamp()
            ));
            try_out!(std::fs::rename(&dir, &aside).map_err(|e| format!(
                "move {} aside to {}: {e}",
                dir.display(),
                aside.display()
            )));
            info!(from = %dir.display(), to = %aside.display(), "existing data directory kept aside");
            moved = aside.display().to_string();
        }
        let total = repo
            .get_manifest(&id)
            .await
            .map(|m| m.stats.bytes_total)
            .unwrap_or(0);
        let done = Arc::new(AtomicU64::new(0));
        let (d, progress, tc) = (done.clone(), ctx.progress.clone(), ctx.cancel.child_token());
        let stop_ticker = tc.clone();
        let ticker = tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    () = tc.cancelled() => return,
                    _ = t.tick() => {}
                }
                progress.report("restoring", d.load(Ordering::Relaxed).min(total), total.max(1));
            }
        });
        let opts = RestoreOptions {
            restore_command: Some(try_out!(restore_command(repo_config))),
            extra_conf: conf,
        };
        let r = restore_with_progress(&repo, &id, &dir, &opts, &ctx.cancel, Some(&done)).await;
        stop_ticker.cancel();
        let _stopped = ticker.await;
        let st = match r {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "restore failed");
                let hint = if moved.is_empty() {
                    String::new()
                } else {
                    format!("; the previous data directory is kept at {moved}")
                };
                return ActionOutput::failed(format!(
                    "restore of {id} failed, nothing was started (the partial files are in {}): {e}{hint}",
                    partial_path(&dir).display()
                ))
                .with_detail("moved_aside", moved);
            }
        };
        let marker = serde_json::json!({
            "backup_id": id.0, "scratch": flag(&args, "scratch"), "port": port,
            "socket_dir": socket_dir, "restored_at": chrono::Utc::now().to_rfc3339(),
        });
        try_out!(std::fs::write(dir.join(MARKER), marker.to_string())
            .map_err(|e| format!("write {}: {e}", dir.join(MARKER).display())));
        let runner = Runner::new(&bins.bin_dir, &bins.run_as);
        try_out!(chown_tree(&runner, &dir));
        ctx.progress.report("restored", total, total.max(1));
        ActionOutput::ok(format!(
            "backup {id} restored into {} ({} files, {} bytes){}",
            dir.display(),
            st.files,
            st.bytes,
            if moved.is_empty() {
                String::new()
            } else {
                format!("; the previous data directory is kept at {moved}")
            }
        ))
        .with_detail("data_dir", dir.display().to_string())
        .with_detail("port", port.to_string())
        .with_detail("socket_dir", socket_dir)
        .with_detail("files", st.files.to_string())
        .with_detail("bytes", st.bytes.to_string())
        .with_detail("moved_aside", moved)
    }
    .instrument(span)
    .await
}

/// How to reach a restored server: through `psql` as the run_as user.
struct Psql {
    runner: Runner,
    socket_dir: String,
    port: String,
    user: String,
}

impl Psql {
    fn new(bins: &PgBins, args: &HashMap<String, String>, dir: &Path) -> Self {
        let marker: serde_json::Value = std::fs::read_to_string(dir.join(MARKER))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let from_marker = |k: &str| -> String {
            match marker.get(k) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                _ => String::new(),
            }
        };
        let pick = |k: &str, default: &str| -> String {
            let v = opt(args, k);
            if !v.is_empty() && v != "0" {
                return v.to_owned();
            }
            let m = from_marker(k);
            if !m.is_empty() && m != "0" {
                return m;
            }
            default.to_owned()
        };
        Psql {
            runner: Runner::new(&bins.bin_dir, &bins.run_as),
            socket_dir: pick("socket_dir", "/var/run/postgresql"),
            port: pick("port", "5432"),
            user: pick("pg_user", "postgres"),
        }
    }

    fn base(&self, db: &str) -> Vec<OsString> {
        [
            "-h",
            &self.socket_dir,
            "-p",
            &self.port,
            "-U",
            &self.user,
            "-d",
            db,
        ]
        .iter()
        .map(OsString::from)
        .collect()
    }

    /// One query, its text output (`-XAtq`), or the error psql printed.
    async fn query(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut a = self.base(db);
        a.extend(["-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql].map(OsString::from));
        self.runner
            .run_ok("psql", &a, &[], Duration::from_secs(600))
            .await
            .map(|o| o.stdout.trim().to_owned())
            .map_err(|e| e.to_string())
    }
}

fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join(LOG)).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            // `dr-agent:` lines are wal-fetch's own errors (restore_command's stderr goes to
            // the server log): they name the repository object that could not be served.
            l.contains("FATAL")
                || l.contains("ERROR")
                || l.contains("PANIC")
                || l.contains("dr-agent:")
        })
        .collect();
    let pick = if lines.is_empty() {
        text.lines().rev().take(3).collect::<Vec<_>>()
    } else {
        lines.into_iter().rev().take(3).collect()
    };
    pick.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

async fn stop_server(runner: &Runner, dir: &Path) {
    if server_running(dir).is_none() {
        return;
    }
    let a: Vec<OsString> = vec![
        "stop".into(),
        "-D".into(),
        dir.into(),
        "-m".into(),
        "fast".into(),
        "-w".into(),
    ];
    if let Err(e) = runner
        .run_ok("pg_ctl", &a, &[], Duration::from_secs(60))
        .await
    {
        warn!(error = %e, dir = %dir.display(), "pg_ctl stop failed, trying immediate");
        let a: Vec<OsString> = vec![
            "stop".into(),
            "-D".into(),
            dir.into(),
            "-m".into(),
            "immediate".into(),
            "-w".into(),
        ];
        let _best_effort = runner.run("pg_ctl", &a, &[], Duration::from_secs(30)).await;
    }
}

/// `restore.pg-start`: args `data_dir`, `port`, `socket_dir`, `target_action`, `pg_user`.
/// Starts the restored server and waits until recovery reached its target (promoted, or
/// paused with `target_action = pause`). Details: `recovery_lsn`, `recovery_time`,
/// `timeline`, `recovery_ms`, `state` (promoted|paused). On failure or cancel the server
/// is stopped.
async fn start(bins: Arc<PgBins>, args: HashMap<String, String>, ctx: ActionCtx) -> ActionOutput {
    let span = info_span!("restore_start", key = %ctx.key);
    async move {
        let dir = PathBuf::from(try_out!(arg(&args, "data_dir")));
        if partial_path(&dir).exists() {
            return ActionOutput::failed(format!(
                "{} exists: a restore into {} did not finish; refusing to start PostgreSQL on it (restore again)",
                partial_path(&dir).display(),
                dir.display()
            ));
        }
        if !dir.join(MARKER).is_file() {
            return ActionOutput::failed(format!(
                "{} has no {MARKER}: it was not completely restored by dr-agent; refusing to start PostgreSQL on it",
                dir.display()
            ));
        }
        let psql = Psql::new(&bins, &args, &dir);
        let pause = opt(&args, "target_action") == "pause";
        let t0 = Instant::now();
        if server_running(&dir).is_none() {
            let a: Vec<OsString> = vec![
                "start".into(),
                "-D".into(),
                dir.clone().into(),
                "-l".into(),
                dir.join(LOG).into(),
                "-W".into(),
            ];
            try_out!(
                psql.runner
                    .run_ok("pg_ctl", &a, &[], Duration::from_secs(60))
                    .await
                    .map_err(|e| format!("start PostgreSQL on {}: {e}", dir.display()))
            );
        }
        let mut seen_running = false;
        let state = loop {
            if ctx.cancel.is_cancelled() {
                stop_server(&psql.runner, &dir).await;
                return ActionOutput::failed(
                    "recovery cancelled; the restored server was stopped",
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let running = server_running(&dir).is_some();
            if !running {
                // Not started yet, or stopped by a failed recovery (FATAL in its log).
                let fatal = t0.elapsed() > Duration::from_secs(1) && log_tail(&dir).contains("FATAL");
                if seen_running || fatal || t0.elapsed() > Duration::from_secs(30) {
                    return ActionOutput::failed(format!(
                        "PostgreSQL stopped during recovery: {}",
                        log_tail(&dir)
                    ));
                }
                continue;
            }
            seen_running = true;
            let sql = "select case when pg_is_in_recovery() then 'true,' || pg_get_wal_replay_pause_state() else 'false,' end";
            let Ok(out) = psql.query("postgres", sql).await else {
                continue;
            };
            let (in_recovery, pause_state) = out.split_once(',').unwrap_or((&out, ""));
            if in_recovery == "false" {
                break "promoted";
            }
            if pause && pause_state == "paused" {
                break "paused";
            }
            ctx.progress.report("replaying WAL", 0, 0);
        };
        let recovery_ms = t0.elapsed().as_millis().to_string();
        let sql = "select coalesce(pg_last_wal_replay_lsn()::text, ''), coalesce(to_char(pg_last_xact_replay_timestamp() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), ''), case when pg_is_in_recovery() then '' else substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) end";
        let out = psql.query("postgres", sql).await.unwrap_or_default();
        let mut it = out.split('|');
        let lsn = it.next().unwrap_or("").to_owned();
        let time = it.next().unwrap_or("").to_owned();
        let tl = it
            .next()
            .and_then(|t| u32::from_str_radix(t, 16).ok())
            .map(|t| t.to_string())
            .unwrap_or_default();
        info!(state, %lsn, %time, "recovery reached its target");
        ActionOutput::ok(format!(
            "PostgreSQL {state} on {} (port {}) after recovery to {lsn} ({}) in {recovery_ms} ms",
            dir.display(),
            psql.port,
            if time.is_empty() { "no transaction replayed" } else { &time }
        ))
        .with_detail("state", state)
        .with_detail("recovery_lsn", lsn)
        .with_detail("recovery_time", time)
        .with_detail("timeline", tl)
        .with_detail("recovery_ms", recovery_ms)
        .with_detail("port", psql.port.clone())
    }
    .instrument(span)
    .await
}

/// `restore.pg-verify`: args `data_dir`, `port`, `socket_dir`, `pg_user`, `databases`
/// (comma-separated, default `postgres`), `tables` (`db.schema.table` or `schema.table`,
/// comma-separated: row counts), `queries` (`;;`-separated SQL returning true when good),
/// `amcheck` (`true`|`false`, default true). Details: `amcheck`, `rows.<table>`,
/// `queries_ok`, `verify_ms`.
async fn verify(bins: Arc<PgBins>, args: HashMap<String, String>, ctx: ActionCtx) -> ActionOutput {
    let span = info_span!("restore_verify", key = %ctx.key);
    async move {
        let dir = PathBuf::from(try_out!(arg(&args, "data_dir")));
        let psql = Psql::new(&bins, &args, &dir);
        let t0 = Instant::now();
        let mut out = ActionOutput::ok("");
        let mut problems = Vec::new();
        let mut notes = Vec::new();
        let in_recovery = psql
            .query("postgres", "select pg_is_in_recovery()")
            .await
            .is_ok_and(|v| v == "t");
        if in_recovery && opt(&args, "amcheck") != "false" {
            out.details.insert("amcheck".into(), "skipped".into());
            notes.push(
                "pg_amcheck skipped: the server is paused in recovery (read-only)".to_owned(),
            );
        } else if opt(&args, "amcheck") != "false" {
            if bins.bin_dir.join("pg_amcheck").is_file() {
                let mut a = psql.base("postgres");
                a.extend(["--all", "--no-dependent-indexes"].map(OsString::from));
                // pg_amcheck needs the amcheck extension in each database it checks; it
                // creates it with --install-missing.
                a.push("--install-missing".into());
                match psql
                    .runner
                    .run("pg_amcheck", &a, &[], Duration::from_secs(3600))
                    .await
                {
                    Ok(o) if o.code == Some(0) => {
                        out.details.insert("amcheck".into(), "ok".into());
                        notes.push("pg_amcheck: no corruption".to_owned());
                    }
                    Ok(o) => {
                        let msg = format!("{}{}", o.stdout, o.stderr);
                        let first: Vec<&str> = msg.lines().take(5).collect();
                        out.details.insert("amcheck".into(), "failed".into());
                        problems.push(format!("pg_amcheck: {}", first.join(" | ")));
                    }
                    Err(e) => problems.push(format!("pg_amcheck: {e}")),
                }
            } else {
                out.details.insert("amcheck".into(), "absent".into());
                notes.push("pg_amcheck not installed: skipped".to_owned());
            }
        }
        for t in opt(&args, "tables")
            .split(',')
            .filter(|t| !t.trim().is_empty())
        {
            if ctx.cancel.is_cancelled() {
                return ActionOutput::failed("verify cancelled");
            }
            let t = t.trim();
            let parts: Vec<&str> = t.split('.').collect();
            let (db, rel) = if parts.len() == 3 {
                (parts[0], format!("{}.{}", parts[1], parts[2]))
            } else {
                ("postgres", t.to_owned())
            };
            let ident = rel
                .split('.')
                .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
                .collect::<Vec<_>>()
                .join(".");
            match psql
                .query(db, &format!("select count(*) from {ident}"))
                .await
            {
                Ok(n) => {
                    out.details.insert(format!("rows.{t}"), n.clone());
                    notes.push(format!("{t}: {n} rows"));
                }
                Err(e) => problems.push(format!("count {t}: {e}")),
            }
        }
        let mut ok_queries = 0;
        for sql in opt(&args, "queries")
            .split(";;")
            .filter(|s| !s.trim().is_empty())
        {
            match psql.query("postgres", sql.trim()).await {
                Ok(v) if v == "t" || v == "true" => ok_queries += 1,
                Ok(v) => problems.push(format!("integrity query {:?} returned {v:?}", sql.trim())),
                Err(e) => problems.push(format!("integrity query {:?}: {e}", sql.trim())),
            }
        }
        out.details
            .insert("queries_ok".into(), ok_queries.to_string());
        let ms = t0.elapsed().as_millis().to_string();
        out.details.insert("verify_ms".into(), ms.clone());
        if problems.is_empty() {
            out.message = format!("verified in {ms} ms: {}", notes.join("; "));
        } else {
            out.success = false;
            out.message = format!("verification failed: {}", problems.join("; "));
        }
        out
    }
    .instrument(span)
    .await
}

/// `restore.pg-discard`: args `data_dir`. Stops the scratch server and deletes the directory
/// (and a `.partial` leftover); refuses a directory without the scratch marker.
async fn discard(bins: Arc<PgBins>, args: HashMap<String, String>, ctx: ActionCtx) -> ActionOutput {
    let span = info_span!("restore_discard", key = %ctx.key);
    async move {
        let dir = PathBuf::from(try_out!(arg(&args, "data_dir")));
        let runner = Runner::new(&bins.bin_dir, &bins.run_as);
        let partial = partial_path(&dir);
        if partial.exists() {
            try_out!(
                std::fs::remove_dir_all(&partial)
                    .map_err(|e| format!("remove {}: {e}", partial.display()))
            );
        }
        if !dir.exists() {
            return ActionOutput::ok(format!(
                "{} does not exist: nothing to discard",
                dir.display()
            ));
        }
        let scratch = std::fs::read_to_string(dir.join(MARKER))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("scratch").and_then(serde_json::Value::as_bool))
            .unwrap_or(false);
        if !scratch {
            return ActionOutput::failed(format!(
                "{} is not a scratch restore (no scratch marker): refusing to delete it",
                dir.display()
            ));
        }
        stop_server(&runner, &dir).await;
        if let Some(pid) = server_running(&dir) {
            return ActionOutput::failed(format!(
                "the scratch server (pid {pid}) on {} did not stop; remove it by hand",
                dir.display()
            ));
        }
        try_out!(
            std::fs::remove_dir_all(&dir).map_err(|e| format!("remove {}: {e}", dir.display()))
        );
        ActionOutput::ok(format!(
            "scratch instance {} stopped and removed",
            dir.display()
        ))
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_lines_per_target() {
        let t = Target::parse("time", "2026-11-28T10:15:00+08:00").unwrap();
        assert_eq!(
            recovery_conf(&t, "pause", "").unwrap(),
            vec![
                "recovery_target_time = '2026-11-28 02:15:00.000000+00'",
                "recovery_target_action = 'pause'"
            ]
        );
        let l = Target::parse("lsn", "0/3000060").unwrap();
        assert_eq!(
            recovery_conf(&l, "", "1").unwrap(),
            vec![
                "recovery_target_lsn = '0/3000060'",
                "recovery_target_action = 'promote'",
                "recovery_target_timeline = '1'"
            ]
        );
        assert!(recovery_conf(&Target::Latest, "", "").unwrap().is_empty());
        let n = Target::parse("name", "before 'x'").unwrap();
        assert_eq!(
            recovery_conf(&n, "promote", "").unwrap()[0],
            "recovery_target_name = 'before ''x'''"
        );
        assert!(Target::parse("lsn", "zz").is_err());
        assert!(Target::parse("xid", "12a").is_err());
        assert!(
            Target::parse("time", "yesterday")
                .unwrap_err()
                .contains("RFC 3339")
        );
        assert!(recovery_conf(&l, "shutdown-now", "").is_err());
        assert!(recovery_conf(&l, "", "x").is_err());
    }

    #[test]
    fn segments_group_into_runs() {
        assert_eq!(parse_segment("000000010000000100000002"), Some((1, 258)));
        assert_eq!(segment_name(1, 258), "000000010000000100000002");
        let r = runs(vec![
            (1, 3, 30),
            (1, 1, 10),
            (1, 2, 20),
            (1, 5, 50),
            (2, 5, 55),
        ]);
        assert_eq!(r.len(), 3);
        assert_eq!(
            (r[0].first, r[0].last, r[0].last_archived_unix_ms),
            (1, 3, 30)
        );
        assert_eq!((r[1].first, r[1].last), (5, 5));
        assert_eq!(r[2].timeline, 2);
    }

    #[test]
    fn required_ranges_parse() {
        assert_eq!(required("1:3-7;2:7-9").unwrap(), vec![(1, 3, 7), (2, 7, 9)]);
        assert!(required("1:3").is_err());
    }

    #[test]
    fn non_empty_target_refused_unless_in_place() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("PG_VERSION"), "15").unwrap();
        assert!(
            dir_state(d.path(), false)
                .unwrap_err()
                .contains("not empty")
        );
        assert!(dir_state(d.path(), true).is_ok());
        std::fs::write(
            d.path().join("postmaster.pid"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        assert!(dir_state(d.path(), true).unwrap_err().contains("running"));
    }
}

/// `dr-agent restore` with no coordinator at all (the total-loss case): the same restore,
/// recovery settings and start as the coordinator's plan, driven from the command line.
#[derive(Clone, Debug, Default)]
pub struct StandaloneRestore {
    pub repo_config: PathBuf,
    /// Backup id, `latest`, or `None`: the newest one that ends before the target.
    pub backup: Option<String>,
    pub target: PathBuf,
    pub no_recovery: bool,
    pub target_type: String,
    pub target_value: String,
    pub target_action: String,
    pub timeline: String,
    pub port: u16,
    pub socket_dir: Option<String>,
    pub keep_archive: bool,
    /// Start the server and wait until recovery reached the target.
    pub start: bool,
}

/// For `--timeline N`: the timelines recovery along N passes through, each with the LSN where
/// N's history leaves it (None for N itself), from `N.history` in the repository. A base
/// backup on another timeline, or taken on an ancestor after N branched off, holds a past N
/// never had (PostgreSQL then fails on the first segment). None: any backup (latest,
/// current or PostgreSQL's default).
async fn timeline_path(
    repo: &Repository,
    timeline: &str,
) -> anyhow::Result<Option<Vec<(u32, Option<u64>)>>> {
    use anyhow::Context;
    let Ok(n) = timeline.parse::<u32>() else {
        return Ok(None);
    };
    let mut path = vec![(n, None)];
    if n > 1 {
        let obj = wal_object_name(&format!("{n:08X}.history"))?;
        let raw = repo
            .get_raw(&obj)
            .await
            .with_context(|| format!("read {obj}"))?
            .with_context(|| {
                format!("timeline {n} has no history file {obj} in the repository: was it ever archived?")
            })?;
        let (plain, _) = repo
            .key()
            .open(&obj, raw, MAX_WAL_SIZE)
            .with_context(|| format!("object {obj} is corrupt"))?;
        // Lines: `<parent timeline> <switch LSN> <reason>`, oldest first; comments start with #.
        for line in String::from_utf8_lossy(&plain).lines() {
            let mut it = line.split_whitespace();
            let (Some(tl), Some(lsn)) = (it.next(), it.next()) else {
                continue;
            };
            if let (Ok(tl), Ok(lsn)) = (tl.parse::<u32>(), lsn.parse::<crate::backup::Lsn>()) {
                path.push((tl, Some(lsn.0)));
            }
        }
    }
    Ok(Some(path))
}

/// Runs a standalone restore; returns the lines to print.
pub async fn standalone(
    r: StandaloneRestore,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Vec<String>> {
    use anyhow::Context;
    let env: HashMap<String, String> = std::env::vars().collect();
    let cfg = RepoConfig::load(&r.repo_config, &env).context("load repository config")?;
    let repo = Repository::open(&cfg)
        .await
        .with_context(|| format!("open backup repository {}", cfg.location.describe()))?;
    let target = Target::parse(&r.target_type, &r.target_value).map_err(anyhow::Error::msg)?;
    let id = match r.backup.as_deref() {
        Some(b) if !b.is_empty() => repo.resolve(b).await?,
        _ => {
            // The newest physical backup that ends before the target, and, when a timeline
            // number is asked for, one that timeline's recovery can start from.
            let ms = repo.list_manifests().await.context("list backups")?;
            let on_path = timeline_path(&repo, &r.timeline).await?;
            let before = |m: &crate::backup::Manifest| -> bool {
                match &target {
                    Target::Time(_) => {
                        let t = chrono::DateTime::parse_from_rfc3339(r.target_value.trim())
                            .map(|t| t.with_timezone(&chrono::Utc))
                            .ok();
                        t.is_none_or(|t| m.finished_at <= t)
                    }
                    Target::Lsn(l) => l
                        .parse::<crate::backup::Lsn>()
                        .is_ok_and(|l| m.stop_lsn.0 <= l.0),
                    _ => true,
                }
            };
            let m = ms
                .iter()
                .filter(|m| {
                    matches!(
                        m.kind,
                        crate::backup::BackupKind::Full | crate::backup::BackupKind::Incr
                    )
                })
                .filter(|m| before(m))
                .filter(|m| {
                    on_path.as_ref().is_none_or(|p| {
                        p.iter()
                            .any(|(tl, end)| *tl == m.timeline && end.is_none_or(|e| m.stop_lsn.0 <= e))
                    })
                })
                .max_by_key(|m| m.finished_at)
                .with_context(|| {
                    let oldest = ms
                        .iter()
                        .map(|m| (m.finished_at, m.stop_lsn))
                        .min_by_key(|(t, _)| *t);
                    match oldest {
                        Some((t, l)) => format!(
                            "no backup ends before the target; the oldest ends at {} (LSN {l}): choose a later target",
                            t.to_rfc3339()
                        ),
                        None => "the repository holds no physical backup".to_owned(),
                    }
                })?;
            m.id.clone()
        }
    };
    let mut conf = Vec::new();
    if !r.no_recovery {
        conf = recovery_conf(&target, &r.target_action, &r.timeline).map_err(anyhow::Error::msg)?;
    }
    if r.port != 0 {
        conf.push(format!("port = {}", r.port));
    }
    let socket_dir = r.socket_dir.clone().unwrap_or_default();
    if !socket_dir.is_empty() {
        conf.push(format!("unix_socket_directories = {}", q(&socket_dir)));
    }
    if !r.keep_archive {
        conf.push("archive_mode = off".into());
    }
    let conf_path = cfg.source.clone().unwrap_or(r.repo_config.clone());
    let restore_command = if r.no_recovery {
        None
    } else {
        Some(restore_command(&conf_path.display().to_string()).map_err(anyhow::Error::msg)?)
    };
    let opts = RestoreOptions {
        restore_command,
        extra_conf: conf,
    };
    let st = restore_with_progress(&repo, &id, &r.target, &opts, &cancel, None)
        .await
        .with_context(|| {
            format!(
                "restore {id} (nothing was started; partial files are in {})",
                partial_path(&r.target).display()
            )
        })?;
    let marker = serde_json::json!({
        "backup_id": id.0, "scratch": false, "port": r.port,
        "socket_dir": socket_dir, "restored_at": chrono::Utc::now().to_rfc3339(),
    });
    std::fs::write(r.target.join(MARKER), marker.to_string())
        .with_context(|| format!("write {}", r.target.join(MARKER).display()))?;
    let bins = PgBins::default();
    let runner = Runner::new(&bins.bin_dir, &bins.run_as);
    chown_tree(&runner, &r.target).map_err(anyhow::Error::msg)?;
    let mut out = vec![format!(
        "restored {id} into {} ({} files, {} bytes)",
        r.target.display(),
        st.files,
        st.bytes
    )];
    if r.start {
        let mut args = HashMap::new();
        args.insert("data_dir".to_owned(), r.target.display().to_string());
        args.insert("port".to_owned(), r.port.to_string());
        args.insert("socket_dir".to_owned(), socket_dir);
        args.insert("target_action".to_owned(), r.target_action.clone());
        let ctx = ActionCtx {
            key: "standalone-restore".into(),
            cancel,
            progress: crate::actions::Progress::new("standalone-restore", None),
        };
        let res = start(Arc::new(bins), args, ctx).await;
        if !res.success {
            anyhow::bail!("{}", res.message);
        }
        out.push(res.message);
    }
    Ok(out)
}
