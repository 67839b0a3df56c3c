//! The backup verbs the coordinator may send (`Generic{verb, args}` commands): `backup.run`
//! (full|incr|logical|files), `backup.copy`, `backup.verify`, `backup.prune`, `wal.status`,
//! `restore.logical` and `restore.files`. Their args and details are listed in
//! docs/dev/team-contracts.md ("Backup/restore verbs").
//!
//! Why a thin layer over [`crate::backup`]: the data path (repository format, basebackup,
//! verify, prune) is the standalone CLI's too, so it stays in one place; this module only
//! turns command arguments into calls and results into the `details` map the coordinator's
//! catalog reads (`coordinator/src/state/catalog.rs`, `record`). Keys of `details` are that
//! contract; change them on both sides.
//!
//! Trust: the coordinator names a repository by the PATH of a repository config that must
//! already exist on this host (`repo_config`), never by credentials, so storage secrets stay
//! on the hosts that need them and a confused coordinator can at most choose among the
//! repositories this host was given. A `pg_url` must not carry a password (the policy
//! validator refuses one): use peer authentication or a passfile on the host.
//!
//! Prune deletes, so it is meant to run on a designated host whose repository config holds
//! delete-capable credentials (`prune_repo_config` in the policy); hosts that only back up
//! can be given write-only credentials (S3: `s3:PutObject` + `s3:GetObject` + `s3:ListBucket`,
//! no `s3:DeleteObject`), so ransomware on a database host cannot erase the backups.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::{Instrument, info, info_span, warn};

use crate::actions::{ActionCtx, ActionOutput, Registry};
use crate::backup::basebackup::{BackupOptions, run_backup};
use crate::backup::fileset::{FileRestoreOptions, FileSetOptions, restore_files, run_files};
use crate::backup::logical::{
    DumpOptions, RestoreLogicalOptions, resolve_kind, restore_dump, run_dump, url_with_db,
};
use crate::backup::verify::verify;
use crate::backup::{BackupError, BackupId, BackupKind, RepoConfig, Repository};

/// The environment repository configs may read credentials from (captured once at start).
type Env = Arc<HashMap<String, String>>;

/// Registers the backup verbs.
pub fn register(reg: &mut Registry, env: HashMap<String, String>) {
    let env: Env = Arc::new(env);
    let e = env.clone();
    reg.register("restore.logical", move |args, ctx| {
        restore_logical_verb(e.clone(), args, ctx)
    });
    let e = env.clone();
    reg.register("restore.files", move |args, ctx| {
        restore_files_verb(e.clone(), args, ctx)
    });
    let e = env.clone();
    reg.register("backup.run", move |args, ctx| run(e.clone(), args, ctx));
    let e = env.clone();
    reg.register("backup.copy", move |args, ctx| copy(e.clone(), args, ctx));
    let e = env.clone();
    reg.register("backup.verify", move |args, ctx| {
        verify_verb(e.clone(), args, ctx)
    });
    let e = env.clone();
    reg.register("backup.prune", move |args, ctx| prune(e.clone(), args, ctx));
    reg.register("wal.status", move |args, ctx| {
        wal_status(env.clone(), args, ctx)
    });
}

fn arg<'a>(args: &'a HashMap<String, String>, k: &str) -> Result<&'a str, String> {
    match args.get(k).map(String::as_str) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(format!("missing argument `{k}`")),
    }
}

async fn open(env: &Env, path: &str) -> Result<Repository, String> {
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

fn unix_ms(t: chrono::DateTime<chrono::Utc>) -> String {
    t.timestamp_millis().to_string()
}

/// Bytes this process has read so far (`rchar` of /proc/self/io), the progress estimate
/// of a backup: the basebackup reads every data file once and exposes no counter itself.
fn bytes_read_by_me() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|v| v.trim().parse().ok())
}

fn dir_size(path: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&p) else {
            continue;
        };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// `backup.run`: args `repo_config`, `pg_url`, `data_dir`, `type` (full|incr), `target`,
/// `location`. Details: `backup_id`, `kind`, `parent`, `start_lsn`, `stop_lsn`, `timeline`,
/// `files`, `bytes_total`, `bytes_added`, `started_at_unix_ms`, `finished_at_unix_ms`.
async fn run(env: Env, args: HashMap<String, String>, ctx: ActionCtx) -> ActionOutput {
    let kind = args
        .get("type")
        .cloned()
        .unwrap_or_else(|| "full".to_owned());
    let span = info_span!("backup_run", key = %ctx.key, kind = %kind);
    async move {
        let kind = match kind.as_str() {
            "full" => BackupKind::Full,
            "incr" => BackupKind::Incr,
            "logical" => return run_logical(&env, &args, &ctx).await,
            "files" => return run_files_verb(&env, &args, &ctx).await,
            other => {
                return ActionOutput::failed(format!(
                    "unknown backup type {other} (full|incr|logical|files)"
                ));
            }
        };
        let (repo_config, pg_url, data_dir) = match (
            arg(&args, "repo_config"),
            arg(&args, "pg_url"),
            arg(&args, "data_dir"),
        ) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return ActionOutput::failed(e),
        };
        let repo = match open(&env, repo_config).await {
            Ok(r) => r,
            Err(e) => return ActionOutput::failed(format!("backup failed: {e}")),
        };
        let opts = BackupOptions {
            pg_url: pg_url.to_owned(),
            data_dir: PathBuf::from(data_dir),
            kind,
            fast_checkpoint: true,
        };
        // Progress: the data directory's size against what this process read since start.
        let total = {
            let d = opts.data_dir.clone();
            tokio::task::spawn_blocking(move || dir_size(&d)).await.unwrap_or(0)
        };
        let base = bytes_read_by_me().unwrap_or(0);
        let progress = ctx.progress.clone();
        let ticker_cancel = ctx.cancel.child_token();
        let tc = ticker_cancel.clone();
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    () = tc.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let done = bytes_read_by_me().unwrap_or(base).saturating_sub(base).min(total);
                progress.report("backing up", done, total.max(1));
            }
        });
        let result = run_backup(&repo, &opts, &ctx.cancel).await;
        ticker_cancel.cancel();
        let _stopped = ticker.await;
        match result {
            Ok(m) => {
                ctx.progress.report("backup stored", total, total.max(1));
                info!(backup = %m.id, bytes = m.stats.bytes_total, "backup stored");
                ActionOutput::ok(format!(
                    "backup {} ({}) stored: {} bytes, {} added, LSN {}..{}",
                    m.id, m.kind, m.stats.bytes_total, m.stats.bytes_added, m.start_lsn, m.stop_lsn
                ))
                .with_detail("backup_id", m.id.0.clone())
                .with_detail("kind", m.kind.to_string())
                .with_detail("parent", m.parent.as_ref().map(|p| p.0.clone()).unwrap_or_default())
                .with_detail("start_lsn", m.start_lsn.to_string())
                .with_detail("stop_lsn", m.stop_lsn.to_string())
                .with_detail("timeline", m.timeline.to_string())
                .with_detail("files", m.stats.files.to_string())
                .with_detail("bytes_total", m.stats.bytes_total.to_string())
                .with_detail("bytes_added", m.stats.bytes_added.to_string())
                .with_detail("started_at_unix_ms", unix_ms(m.started_at))
                .with_detail("finished_at_unix_ms", unix_ms(m.finished_at))
            }
            Err(e) => {
                warn!(error = %e, "backup failed");
                ActionOutput::failed(format!(
                    "backup failed, nothing was recorded (chunks already uploaded are removed by the next prune): {e}{}",
                hint(&e)
                ))
            }
        }
    }
    .instrument(span)
    .await
}

/// `backup.verify`: args `repo_config`, `ids` (comma-separated; empty = every backup),
/// `location`, `include_wal`. Details: `verified` (ids), `problems.<id>` ("status object
/// (reason)" joined by "; "), `objects_checked`, `problems`.
async fn verify_verb(env: Env, args: HashMap<String, String>, ctx: ActionCtx) -> ActionOutput {
    let span = info_span!("backup_verify", key = %ctx.key);
    async move {
        let repo = match arg(&args, "repo_config") {
            Ok(p) => match open(&env, p).await {
                Ok(r) => r,
                Err(e) => return ActionOutput::failed(e),
            },
            Err(e) => return ActionOutput::failed(e),
        };
        let ids: Vec<BackupId> = match args.get("ids").map(String::as_str).unwrap_or("") {
            "" => match repo.list_backups().await {
                Ok(v) => v,
                Err(e) => return ActionOutput::failed(format!("list backups: {e}")),
            },
            s => s.split(',').map(|i| BackupId(i.to_owned())).collect(),
        };
        let mut out = ActionOutput::ok("");
        let mut checked = 0;
        let mut lines = Vec::new();
        let mut verified = Vec::new();
        let n = ids.len() as u64;
        for (i, id) in ids.iter().enumerate() {
            if ctx.cancel.is_cancelled() {
                return ActionOutput::failed("verify cancelled");
            }
            ctx.progress
                .report(format!("verifying {id}"), i as u64, n.max(1));
            let rep = match verify(&repo, std::slice::from_ref(id), false).await {
                Ok(r) => r,
                Err(e) => return ActionOutput::failed(format!("verify {id}: {e}")),
            };
            checked += rep.objects_checked;
            let probs: Vec<String> = rep
                .problems
                .iter()
                .map(|p| format!("{} {} ({})", p.status, p.object, p.reason))
                .collect();
            lines.extend(probs.iter().map(|p| format!("{id}: {p}")));
            out.details
                .insert(format!("problems.{id}"), probs.join("; "));
            verified.push(id.0.clone());
        }
        if args.get("include_wal").is_some_and(|v| v == "true") {
            match verify(&repo, &[], true).await {
                Ok(rep) => {
                    checked += rep.objects_checked;
                    lines.extend(
                        rep.problems
                            .iter()
                            .map(|p| format!("wal: {} {} ({})", p.status, p.object, p.reason)),
                    );
                }
                Err(e) => return ActionOutput::failed(format!("verify WAL: {e}")),
            }
        }
        out.details.insert("verified".into(), verified.join(","));
        out.details
            .insert("objects_checked".into(), checked.to_string());
        out.details
            .insert("problems".into(), lines.len().to_string());
        out.success = lines.is_empty();
        out.message = if lines.is_empty() {
            format!(
                "{} backup(s) verified, {checked} objects read back, no problem",
                ids.len()
            )
        } else {
            format!(
                "{} problem(s) in {} backup(s), {checked} objects read back: {}",
                lines.len(),
                ids.len(),
                lines.join("; ")
            )
        };
        out
    }
    .instrument(span)
    .await
}

/// `backup.copy`: args `from_repo_config`, `to_repo_config`, `backup_id`, `to_location`.
/// Copies the manifest, every chunk it names and every archived WAL object the destination
/// lacks, byte for byte (objects are sealed under the shared repository key and bound to
/// their names, so they are valid as they are), then reads every copied object back from
/// the destination and compares its BLAKE3 hash with the source's.
async fn copy(env: Env, args: HashMap<String, String>, ctx: ActionCtx) -> ActionOutput {
    let span = info_span!("backup_copy", key = %ctx.key);
    async move {
        let (from, to, id) = match (
            arg(&args, "from_repo_config"),
            arg(&args, "to_repo_config"),
            arg(&args, "backup_id"),
        ) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, BackupId(c.to_owned())),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return ActionOutput::failed(e),
        };
        let src = match open(&env, from).await {
            Ok(r) => r,
            Err(e) => return ActionOutput::failed(format!("copy source: {e}")),
        };
        let dst = match open(&env, to).await {
            Ok(r) => r,
            Err(e) => return ActionOutput::failed(format!(
                "copy destination: {e} (initialise it with `dr-agent repo init` using the SAME key file as the source)"
            )),
        };
        match copy_objects(&src, &dst, &id, &ctx).await {
            Ok((objects, bytes)) => ActionOutput::ok(format!(
                "copied {id}: {objects} object(s), {bytes} bytes written and read back"
            ))
            .with_detail("backup_id", id.0.clone())
            .with_detail("objects", objects.to_string())
            .with_detail("bytes", bytes.to_string()),
            Err(e) => ActionOutput::failed(format!("copy of {id} failed: {e}")),
        }
    }
    .instrument(span)
    .await
}

async fn copy_objects(
    src: &Repository,
    dst: &Repository,
    id: &BackupId,
    ctx: &ActionCtx,
) -> Result<(u64, u64), BackupError> {
    let manifest = src.get_manifest(id).await?;
    let mut names: Vec<String> = manifest
        .chunk_ids()
        .into_iter()
        .map(|c| c.object_name())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let have: BTreeSet<String> = dst
        .list_objects("wal/")
        .await?
        .into_iter()
        .map(|e| e.path().to_owned())
        .collect();
    for e in src.list_objects("wal/").await? {
        if !have.contains(e.path()) {
            names.push(e.path().to_owned());
        }
    }
    // The manifest goes LAST: the copy exists at the destination only once it is complete.
    names.push(format!("backups/{id}"));
    let total = names.len() as u64;
    let (mut objects, mut bytes) = (0u64, 0u64);
    for (i, name) in names.iter().enumerate() {
        if ctx.cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        let raw = src
            .get_raw(name)
            .await?
            .ok_or_else(|| BackupError::NotFound { key: name.clone() })?;
        let want = blake3::hash(&raw);
        let existing = dst.get_raw(name).await?;
        if existing.as_ref().map(|b| blake3::hash(b)) != Some(want) {
            bytes += raw.len() as u64;
            dst.put_raw(name, raw).await?;
            objects += 1;
        }
        let back = dst
            .get_raw(name)
            .await?
            .ok_or_else(|| BackupError::NotFound { key: name.clone() })?;
        if blake3::hash(&back) != want {
            return Err(BackupError::Corrupt {
                key: name.clone(),
                reason: "the copy read back differs from the source".into(),
            });
        }
        ctx.progress.report("copying", i as u64 + 1, total);
    }
    // And the destination opens the manifest with its key: the copy is restorable there.
    dst.get_manifest(id).await?;
    Ok((objects, bytes))
}

/// `backup.prune`: args `repo_config` (delete-capable), `delete` (comma-separated ids whose
/// manifests retention marked), `grace_secs`. Removes those manifests, then every chunk no
/// remaining manifest references and older than the grace (so a running backup's chunks
/// survive). Details: `deleted`, `orphans_deleted`.
async fn prune(env: Env, args: HashMap<String, String>, ctx: ActionCtx) -> ActionOutput {
    let span = info_span!("backup_prune", key = %ctx.key);
    async move {
        let repo = match arg(&args, "repo_config") {
            Ok(p) => match open(&env, p).await {
                Ok(r) => r,
                Err(e) => return ActionOutput::failed(e),
            },
            Err(e) => return ActionOutput::failed(e),
        };
        let grace = Duration::from_secs(
            args.get("grace_secs")
                .and_then(|g| g.parse().ok())
                .unwrap_or(3600),
        );
        let mut deleted = Vec::new();
        for id in args
            .get("delete")
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
        {
            let name = format!("backups/{id}");
            match repo.operator().delete(&name).await {
                Ok(()) => deleted.push(id.to_owned()),
                Err(e) => {
                    return ActionOutput::failed(format!(
                        "delete {name}: {e} (does this repository config hold delete rights?)"
                    ))
                    .with_detail("deleted", deleted.join(","));
                }
            }
        }
        let rep = match crate::backup::prune::prune(&repo, grace, false).await {
            Ok(rep) => rep,
            Err(e) => {
                return ActionOutput::failed(format!("prune: {e}"))
                    .with_detail("deleted", deleted.join(","));
            }
        };
        // WAL no remaining physical backup needs (on by default; `wal=false` keeps it all).
        let wal = if args.get("wal").is_none_or(|v| v != "false") {
            match crate::backup::prune::prune_wal(&repo, false).await {
                Ok(w) => w,
                Err(e) => {
                    return ActionOutput::failed(format!("prune archived WAL: {e}"))
                        .with_detail("deleted", deleted.join(","))
                        .with_detail("orphans_deleted", rep.deleted.to_string());
                }
            }
        } else {
            crate::backup::prune::WalPruneReport::default()
        };
        ActionOutput::ok(format!(
            "pruned {} backup(s), {} unreferenced chunk(s) ({} kept for the grace period) and {} WAL file(s) older than segment {}",
            deleted.len(),
            rep.deleted,
            rep.kept_young,
            wal.deleted,
            if wal.keep_from.is_empty() { "-" } else { wal.keep_from.as_str() }
        ))
        .with_detail("deleted", deleted.join(","))
        .with_detail("orphans_deleted", rep.deleted.to_string())
        .with_detail("wal_deleted", wal.deleted.to_string())
        .with_detail("wal_keep_from", wal.keep_from)
    }
    .instrument(span)
    .await
}

/// `wal.status`: args `repo_config`. Details: `archived` (count), `last` (newest WAL file
/// name), `last_modified_unix_ms`.
/// `wal.status` with `pg_url`: also `lag_secs`, `lag_bytes`, `last_archived`, `switched`
/// (see [`archive_lag`]; `max_lag_secs` is the tier's RPO).
async fn wal_status(env: Env, args: HashMap<String, String>, _ctx: ActionCtx) -> ActionOutput {
    let repo = match arg(&args, "repo_config") {
        Ok(p) => match open(&env, p).await {
            Ok(r) => r,
            Err(e) => return ActionOutput::failed(e),
        },
        Err(e) => return ActionOutput::failed(e),
    };
    let mut out = match repo.list_objects("wal/").await {
        Ok(entries) => {
            let mut names: Vec<(String, i64)> = entries
                .iter()
                .map(|e| {
                    (
                        e.name().to_owned(),
                        e.metadata()
                            .last_modified()
                            .map(|t| t.timestamp_millis())
                            .unwrap_or(0),
                    )
                })
                .filter(|(n, _)| n.len() == 24)
                .collect();
            names.sort();
            let (last, at) = names.last().cloned().unwrap_or_default();
            ActionOutput::ok(format!(
                "{} WAL segment(s) archived, newest {last}",
                names.len()
            ))
            .with_detail("archived", names.len().to_string())
            .with_detail("last", last)
            .with_detail(
                "segments",
                names
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .with_detail("last_modified_unix_ms", at.to_string())
        }
        Err(e) => ActionOutput::failed(format!("list archived WAL: {e}")),
    };
    let Some(url) = opt_arg(&args, "pg_url") else {
        return out;
    };
    if !out.success {
        return out;
    }
    let max_lag = args.get("max_lag_secs").and_then(|v| v.parse::<f64>().ok());
    match archive_lag(&url, max_lag).await {
        Ok(lag) => {
            out.message = format!(
                "{}; archive lag {:.0} s, {} bytes{}",
                out.message,
                lag.secs,
                lag.bytes,
                if lag.switched {
                    " (segment switch forced: lag above the RPO)"
                } else {
                    ""
                }
            );
            out.with_detail("lag_secs", format!("{:.1}", lag.secs))
                .with_detail("lag_bytes", lag.bytes.to_string())
                .with_detail("last_archived", lag.last_archived)
                .with_detail("switched", lag.switched.to_string())
        }
        Err(e) => ActionOutput::failed(format!("archive lag: {e}")),
    }
}

/// The server's archive lag (see [`crate::health::wal_archive::measure`]); forces a segment
/// switch when it reached `max_lag_secs` (the tier's RPO).
async fn archive_lag(
    url: &str,
    max_lag_secs: Option<f64>,
) -> Result<crate::health::wal_archive::ArchiveLag, sqlx::Error> {
    use sqlx::Connection as _;
    let mut c = sqlx::PgConnection::connect(url).await?;
    let lag = crate::health::wal_archive::measure(&mut c, max_lag_secs).await;
    let _closed = c.close().await;
    lag
}

/// What to do about an error, when we know: a full location is the common one.
fn hint(e: &BackupError) -> &'static str {
    let t = e.to_string();
    if t.contains("No space left on device") || t.contains("no storage space") {
        " -- the repository location is full: free or add space there (chunks of this failed backup are removed by the next prune after its grace period); earlier backups are intact"
    } else if t.contains("send http request") || t.contains("Connection refused") {
        " -- the storage server could not be reached: check it is up and reachable from this host, then run the backup again; earlier backups are intact"
    } else {
        ""
    }
}

/// Reports (message, done, total) every 500 ms until dropped: the work counts bytes in
/// atomics and never blocks on the progress channel.
struct Ticker {
    stop: tokio_util::sync::CancellationToken,
}

impl Ticker {
    fn start(
        ctx: &ActionCtx,
        what: &'static str,
        done: Arc<AtomicU64>,
        total: Arc<AtomicU64>,
    ) -> Ticker {
        let stop = ctx.cancel.child_token();
        let s = stop.clone();
        let progress = ctx.progress.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    () = s.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let d = done.load(Ordering::Relaxed);
                // A total that is only an estimate (a dump's size) never reads below done.
                let t = total.load(Ordering::Relaxed).max(d).max(1);
                progress.report(what, d, t);
            }
        });
        Ticker { stop }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn flag(args: &HashMap<String, String>, k: &str) -> bool {
    args.get(k).is_some_and(|v| v == "true" || v == "1")
}

fn opt_arg(args: &HashMap<String, String>, k: &str) -> Option<String> {
    args.get(k).filter(|v| !v.trim().is_empty()).cloned()
}

fn list_arg(args: &HashMap<String, String>, k: &str) -> Vec<String> {
    args.get(k)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn stored_details(out: ActionOutput, m: &crate::backup::Manifest) -> ActionOutput {
    let physical_or_dump = m.kind != BackupKind::Files;
    let lsn = |l: crate::backup::Lsn| {
        if physical_or_dump {
            l.to_string()
        } else {
            String::new()
        }
    };
    out.with_detail("backup_id", m.id.0.clone())
        .with_detail("kind", m.kind.to_string())
        .with_detail(
            "parent",
            m.parent.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
        )
        .with_detail("start_lsn", lsn(m.start_lsn))
        .with_detail("stop_lsn", lsn(m.stop_lsn))
        .with_detail(
            "timeline",
            if m.timeline == 0 {
                String::new()
            } else {
                m.timeline.to_string()
            },
        )
        .with_detail("files", m.stats.files.to_string())
        .with_detail("bytes_total", m.stats.bytes_total.to_string())
        .with_detail("bytes_added", m.stats.bytes_added.to_string())
        .with_detail("started_at_unix_ms", unix_ms(m.started_at))
        .with_detail("finished_at_unix_ms", unix_ms(m.finished_at))
}

/// `backup.run` with `type=logical`: args `repo_config`, `pg_url`, optional `dbname`,
/// `pg_bin_dir`.
async fn run_logical(env: &Env, args: &HashMap<String, String>, ctx: &ActionCtx) -> ActionOutput {
    let (repo_config, pg_url) = match (arg(args, "repo_config"), arg(args, "pg_url")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return ActionOutput::failed(e),
    };
    let repo = match open(env, repo_config).await {
        Ok(r) => r,
        Err(e) => return ActionOutput::failed(format!("logical backup failed: {e}")),
    };
    let opts = DumpOptions {
        pg_url: pg_url.to_owned(),
        dbname: opt_arg(args, "dbname"),
        pg_bin_dir: opt_arg(args, "pg_bin_dir").map(PathBuf::from),
    };
    // The database's size is the progress total: an estimate (the dump is usually smaller).
    let total = Arc::new(AtomicU64::new(0));
    if let Ok(mut c) = <sqlx::PgConnection as sqlx::Connection>::connect(&url_with_db(
        pg_url,
        opts.dbname.as_deref(),
    ))
    .await
    {
        if let Ok(n) = sqlx::query_scalar::<_, i64>("select pg_database_size(current_database())")
            .fetch_one(&mut c)
            .await
        {
            total.store(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
        }
        let _closed = sqlx::Connection::close(c).await;
    }
    let done = Arc::new(AtomicU64::new(0));
    let ticker = Ticker::start(ctx, "dumping", done.clone(), total);
    let result = run_dump(&repo, &opts, &done, &ctx.cancel).await;
    drop(ticker);
    match result {
        Ok(m) => {
            let d = done.load(Ordering::Relaxed);
            ctx.progress.report("dump stored", d, d.max(1));
            stored_details(
                ActionOutput::ok(format!(
                    "logical backup {} ({}) stored: {} dump bytes, {} added",
                    m.id, m.label, m.stats.bytes_total, m.stats.bytes_added
                )),
                &m,
            )
        }
        Err(e) => {
            warn!(error = %e, "logical backup failed");
            ActionOutput::failed(format!(
                "logical backup failed, nothing was recorded (chunks already uploaded are removed by the next prune): {e}{}",
                hint(&e)
            ))
        }
    }
}

/// `backup.run` with `type=files`: args `repo_config`, `target` (set name), `paths`,
/// optional `exclude`, `include`.
async fn run_files_verb(
    env: &Env,
    args: &HashMap<String, String>,
    ctx: &ActionCtx,
) -> ActionOutput {
    let repo_config = match arg(args, "repo_config") {
        Ok(a) => a,
        Err(e) => return ActionOutput::failed(e),
    };
    let paths = list_arg(args, "paths");
    if paths.is_empty() {
        return ActionOutput::failed("missing argument `paths` (comma-separated absolute paths)");
    }
    let repo = match open(env, repo_config).await {
        Ok(r) => r,
        Err(e) => return ActionOutput::failed(format!("file set backup failed: {e}")),
    };
    let opts = FileSetOptions {
        name: opt_arg(args, "target").unwrap_or_else(|| "files".to_owned()),
        paths: paths.into_iter().map(PathBuf::from).collect(),
        exclude: list_arg(args, "exclude"),
        include: list_arg(args, "include"),
    };
    let done = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let ticker = Ticker::start(ctx, "backing up files", done.clone(), total.clone());
    let result = run_files(&repo, &opts, &done, &total, &ctx.cancel).await;
    drop(ticker);
    match result {
        Ok(m) => {
            let t = total.load(Ordering::Relaxed);
            ctx.progress.report("file set stored", t, t.max(1));
            stored_details(
                ActionOutput::ok(format!(
                    "file set backup {} ({}) stored: {} files, {} bytes, {} added",
                    m.id, opts.name, m.stats.files, m.stats.bytes_total, m.stats.bytes_added
                )),
                &m,
            )
        }
        Err(e) => {
            warn!(error = %e, "file set backup failed");
            ActionOutput::failed(format!(
                "file set backup of {} failed, nothing was recorded (chunks already uploaded are removed by the next prune): {e}{}",
                opts.name,
                hint(&e)
            ))
        }
    }
}

/// `restore.logical`: see docs/dev/team-contracts.md.
async fn restore_logical_verb(
    env: Env,
    args: HashMap<String, String>,
    ctx: ActionCtx,
) -> ActionOutput {
    let span = info_span!("restore_logical", key = %ctx.key);
    async move {
        let (repo_config, backup, pg_url) = match (
            arg(&args, "repo_config"),
            arg(&args, "backup_id"),
            arg(&args, "pg_url"),
        ) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return ActionOutput::failed(e),
        };
        let repo = match open(&env, repo_config).await {
            Ok(r) => r,
            Err(e) => return ActionOutput::failed(format!("restore failed: {e}")),
        };
        let target = opt_arg(&args, "target");
        let id = match resolve_kind(&repo, backup, BackupKind::Logical, target.as_deref()).await {
            Ok(id) => id,
            Err(e) => return ActionOutput::failed(format!("restore failed: {e}")),
        };
        let total = Arc::new(AtomicU64::new(
            repo.get_manifest(&id)
                .await
                .map(|m| m.stats.bytes_total)
                .unwrap_or(0),
        ));
        let opts = RestoreLogicalOptions {
            pg_url: pg_url.to_owned(),
            dbname: opt_arg(&args, "dbname"),
            create: flag(&args, "create"),
            no_owner: flag(&args, "no_owner"),
            pg_bin_dir: opt_arg(&args, "pg_bin_dir").map(PathBuf::from),
        };
        let done = Arc::new(AtomicU64::new(0));
        let ticker = Ticker::start(&ctx, "restoring dump", done.clone(), total);
        let result = restore_dump(&repo, &id, &opts, &done, &ctx.cancel).await;
        drop(ticker);
        match result {
            Ok((db, bytes)) => {
                ctx.progress.report("dump restored", bytes, bytes.max(1));
                ActionOutput::ok(format!(
                    "restored logical backup {id} into database {db} ({bytes} dump bytes)"
                ))
                .with_detail("backup_id", id.0.clone())
                .with_detail("dbname", db)
                .with_detail("bytes", bytes.to_string())
            }
            Err(e) => {
                warn!(error = %e, "logical restore failed");
                ActionOutput::failed(format!("restore of {id} failed: {e}"))
                    .with_detail("backup_id", id.0.clone())
            }
        }
    }
    .instrument(span)
    .await
}

/// `restore.files`: see docs/dev/team-contracts.md.
async fn restore_files_verb(
    env: Env,
    args: HashMap<String, String>,
    ctx: ActionCtx,
) -> ActionOutput {
    let span = info_span!("restore_files", key = %ctx.key);
    async move {
        let (repo_config, backup, target) = match (
            arg(&args, "repo_config"),
            arg(&args, "backup_id"),
            arg(&args, "target"),
        ) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, PathBuf::from(c)),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return ActionOutput::failed(e),
        };
        let repo = match open(&env, repo_config).await {
            Ok(r) => r,
            Err(e) => return ActionOutput::failed(format!("restore failed: {e}")),
        };
        let set = opt_arg(&args, "set");
        let id = match resolve_kind(&repo, backup, BackupKind::Files, set.as_deref()).await {
            Ok(id) => id,
            Err(e) => return ActionOutput::failed(format!("restore failed: {e}")),
        };
        let opts = FileRestoreOptions {
            dry_run: flag(&args, "dry_run"),
            overwrite: flag(&args, "overwrite"),
            include: list_arg(&args, "include"),
        };
        let total = Arc::new(AtomicU64::new(
            repo.get_manifest(&id)
                .await
                .map(|m| m.stats.bytes_total)
                .unwrap_or(0),
        ));
        let done = Arc::new(AtomicU64::new(0));
        let ticker = Ticker::start(&ctx, "restoring files", done.clone(), total);
        let result = restore_files(&repo, &id, &target, &opts, &done, &ctx.cancel).await;
        drop(ticker);
        match result {
            Ok(rep) => {
                let verb = if rep.dry_run { "would write" } else { "wrote" };
                ActionOutput::ok(format!(
                    "{id} to {}: {verb} {} file(s) ({} bytes), {} unchanged",
                    target.display(),
                    rep.written,
                    rep.bytes,
                    rep.unchanged
                ))
                .with_detail("backup_id", id.0.clone())
                .with_detail("files", rep.written.to_string())
                .with_detail("bytes", rep.bytes.to_string())
                .with_detail("unchanged", rep.unchanged.to_string())
                .with_detail("dry_run", rep.dry_run.to_string())
                .with_detail("plan", rep.plan_text())
            }
            Err(e) => {
                warn!(error = %e, "file restore failed");
                ActionOutput::failed(format!("restore of {id} failed: {e}"))
                    .with_detail("backup_id", id.0.clone())
            }
        }
    }
    .instrument(span)
    .await
}
