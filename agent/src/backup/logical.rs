//! Logical dumps: `pg_dump --format=custom` streamed into the repository, and `pg_restore`
//! fed back from it.
//!
//! Why logical dumps beside physical backups: a physical backup restores a whole cluster of
//! the same major version; a dump restores ONE database into any server of the same or a newer
//! version, which is what the DR plan's "Database Restoration" runbook does (`pg_restore
//! --clean --if-exists`). Dumps are the portable, long-lived copy.
//!
//! Why streamed: the dump of a large database must not need a second copy of it on the
//! database host's disk (which is often the disk that is filling up). pg_dump writes to a
//! pipe; the agent cuts the stream into the repository's 1 MiB chunks, seals and uploads them
//! with the same bounded concurrency as a physical backup, so memory stays at a few chunks.
//! The dump is written uncompressed (`--compress=0`): zstd in the repository compresses it
//! better and faster, and uncompressed chunks deduplicate against the previous dump.
//!
//! A custom-format archive written to a pipe has no data offsets in its table of contents, so
//! it must be restored in order, by one job: that is what `pg_restore` does with its input on
//! stdin. The restore runs in ONE transaction (`--single-transaction`, which also stops at the
//! first error), so a failed restore leaves the target database as it was.
//!
//! A failed dump (pg_dump exits non-zero, storage error, cancel) writes no manifest, so it has
//! no catalog entry; its chunks are orphans for `repo prune`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::key::ChunkId;
use super::manifest::{BackupId, BackupKind, BackupStats, Entry, EntryKind, Lsn, Manifest};
use super::repo::{CHUNK_SIZE, Repository};
use super::{BackupError, BackupResult, blocking};

/// Bytes of a child's stderr kept for the error message.
const STDERR_KEEP: usize = 4096;

/// What to dump.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    /// libpq URL (no password: peer auth, a passfile or `PGPASSWORD` in the agent's environment).
    pub pg_url: String,
    /// Database to dump; `None`: the one named in `pg_url`.
    pub dbname: Option<String>,
    /// Directory of pg_dump/pg_restore; `None`: see [`pg_tool`].
    pub pg_bin_dir: Option<PathBuf>,
}

/// Where to restore a dump.
#[derive(Debug, Clone)]
pub struct RestoreLogicalOptions {
    /// libpq URL of the TARGET server.
    pub pg_url: String,
    /// Target database; `None`: the one named in `pg_url`.
    pub dbname: Option<String>,
    /// `CREATE DATABASE` first when it does not exist.
    pub create: bool,
    /// `pg_restore --no-owner` (restore as the connecting role).
    pub no_owner: bool,
    pub pg_bin_dir: Option<PathBuf>,
}

/// Counters of one upload stream.
#[derive(Debug, Default)]
pub(crate) struct Uploaded {
    pub chunks: Vec<ChunkId>,
    pub size: u64,
    pub chunks_new: u64,
    pub bytes_added: u64,
}

/// Cut `reader` into `CHUNK_SIZE` chunks, hash, seal and upload each (at most `concurrency`
/// in flight), in order. `known` holds chunk ids known to exist (skipping a storage round
/// trip) and learns the new ones; `done` counts plaintext bytes read.
pub(crate) async fn upload_stream<R: AsyncRead + Unpin + Send>(
    repo: &Repository,
    reader: R,
    known: &Mutex<HashSet<ChunkId>>,
    done: &AtomicU64,
    cancel: &CancellationToken,
) -> BackupResult<Uploaded> {
    let chunks = futures::stream::unfold(Some(reader), |state| async move {
        let mut r = state?;
        let mut buf = Vec::with_capacity(CHUNK_SIZE);
        let res = async {
            while buf.len() < CHUNK_SIZE {
                let n = (&mut r)
                    .take((CHUNK_SIZE - buf.len()) as u64)
                    .read_buf(&mut buf)
                    .await?;
                if n == 0 {
                    break;
                }
            }
            Ok::<_, std::io::Error>(())
        }
        .await;
        match res {
            Err(e) => Some((Err(BackupError::io("read the stream to back up", e)), None)),
            Ok(()) if buf.is_empty() => None,
            Ok(()) => Some((Ok(buf), Some(r))),
        }
    });
    let uploads = chunks
        .map(|data| async move {
            let data = data?;
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
            let len = data.len() as u64;
            done.fetch_add(len, Ordering::Relaxed);
            let k = repo.key().clone();
            let (data, id) = blocking(move || {
                let id = k.hash(&data);
                Ok((data, id))
            })
            .await?;
            let is_known = known.lock().map(|s| s.contains(&id)).unwrap_or(false);
            let stored = repo.put_chunk(id, data, is_known).await?;
            if let Ok(mut s) = known.lock() {
                s.insert(id);
            }
            Ok::<_, BackupError>((id, len, stored))
        })
        .buffered(repo.config().concurrency.max(1));
    let mut uploads = std::pin::pin!(uploads);
    let mut out = Uploaded::default();
    while let Some(r) = uploads.next().await {
        let (id, len, stored) = r?;
        out.chunks.push(id);
        out.size += len;
        if let Some(s) = stored {
            out.chunks_new += 1;
            out.bytes_added += s;
        }
    }
    Ok(out)
}

/// Write the chunks of a file entry, in order, to `w` (at most `concurrency` downloads in
/// flight, each authenticated and re-hashed). `done` counts plaintext bytes written.
pub(crate) async fn download_to<W: tokio::io::AsyncWrite + Unpin>(
    repo: &Repository,
    chunks: &[ChunkId],
    w: &mut W,
    done: &AtomicU64,
    cancel: &CancellationToken,
) -> BackupResult<()> {
    let mut stream = futures::stream::iter(chunks.iter().copied())
        .map(|id| repo.get_chunk(id))
        .buffered(repo.config().concurrency.max(1));
    while let Some(data) = stream.next().await {
        if cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        let data = data?;
        w.write_all(&data)
            .await
            .map_err(|e| BackupError::io("write restored data", e))?;
        done.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// The libpq URL with `dbname` overriding the database in its path (libpq and sqlx both take
/// the last `dbname` parameter).
pub fn url_with_db(url: &str, dbname: Option<&str>) -> String {
    match dbname {
        None => url.to_owned(),
        Some(db) => {
            let enc: String = db
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}dbname={enc}")
        }
    }
}

/// Full path of a PostgreSQL client tool: in `dir` when given; else in the newest
/// `/usr/lib/postgresql/<major>/bin` that has it (pg_dump must be at least as new as the
/// server); else the bare name, looked up in PATH.
pub fn pg_tool(dir: Option<&std::path::Path>, name: &str) -> PathBuf {
    if let Some(d) = dir {
        return d.join(name);
    }
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        for e in rd.flatten() {
            let Ok(major) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let p = e.path().join("bin").join(name);
            if p.is_file() && best.as_ref().is_none_or(|(m, _)| major > *m) {
                best = Some((major, p));
            }
        }
    }
    best.map(|(_, p)| p).unwrap_or_else(|| PathBuf::from(name))
}

/// Keep the tail of a child's stderr for the error message (and drain it so it never blocks).
fn collect_stderr(stderr: Option<tokio::process::ChildStderr>) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let Some(mut s) = stderr else {
            return String::new();
        };
        let mut keep: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    keep.extend_from_slice(&buf[..n]);
                    if keep.len() > 2 * STDERR_KEEP {
                        keep.drain(..keep.len() - STDERR_KEEP);
                    }
                }
            }
        }
        let start = keep.len().saturating_sub(STDERR_KEEP);
        String::from_utf8_lossy(&keep[start..]).trim().to_owned()
    })
}

async fn wal_position(conn: &mut PgConnection) -> BackupResult<Lsn> {
    let s: String = sqlx::query_scalar(
        "select (case when pg_is_in_recovery() then pg_last_wal_replay_lsn() else pg_current_wal_lsn() end)::text",
    )
    .fetch_one(conn)
    .await?;
    s.parse().map_err(BackupError::Invalid)
}

/// Dump one database into the repository and write its manifest. `done` counts dump bytes.
pub async fn run_dump(
    repo: &Repository,
    opts: &DumpOptions,
    done: &AtomicU64,
    cancel: &CancellationToken,
) -> BackupResult<Manifest> {
    let started_at = chrono::Utc::now();
    let id = BackupId::new(started_at, BackupKind::Logical);
    let span = info_span!("logical_dump", backup = %id);
    async move {
        let url = url_with_db(&opts.pg_url, opts.dbname.as_deref());
        let mut conn = PgConnection::connect(&url).await?;
        let (dbname, version, db_size): (String, i32, i64) = sqlx::query_as(
            "select current_database()::text, current_setting('server_version_num')::int, pg_database_size(current_database())",
        )
        .fetch_one(&mut conn)
        .await?;
        let sysid: Option<String> =
            sqlx::query_scalar("select system_identifier::text from pg_control_system()")
                .fetch_optional(&mut conn)
                .await?;
        let start_lsn = wal_position(&mut conn).await?;
        info!(db = %dbname, db_size, "dump started");

        // The previous dump of this database: its chunks are known to exist.
        let known: Mutex<HashSet<ChunkId>> = Mutex::new(HashSet::new());
        let label = format!("logical {dbname}");
        if let Some(prev) = repo
            .list_backups()
            .await?
            .into_iter()
            .rfind(|b| b.0.ends_with("-logical"))
            && let Ok(m) = repo.get_manifest(&prev).await
            && m.label == label
            && let Ok(mut k) = known.lock()
        {
            k.extend(m.chunk_ids());
        }

        let exe = pg_tool(opts.pg_bin_dir.as_deref(), "pg_dump");
        let mut child = tokio::process::Command::new(&exe)
            .args(["--format=custom", "--compress=0", "--no-password"])
            .arg(format!("--dbname={url}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BackupError::io(format!("start {}", exe.display()), e))?;
        let stderr = collect_stderr(child.stderr.take());
        let Some(stdout) = child.stdout.take() else {
            return Err(BackupError::Invalid("pg_dump has no stdout".into()));
        };
        let uploaded = match upload_stream(repo, stdout, &known, done, cancel).await {
            Ok(u) => u,
            Err(e) => {
                if let Err(k) = child.kill().await {
                    warn!(error = %k, "stopping pg_dump after a failed upload");
                }
                let _stderr = stderr.await;
                return Err(e);
            }
        };
        // The stream ended: pg_dump is exiting; its status says whether the dump is whole.
        let status = child
            .wait()
            .await
            .map_err(|e| BackupError::io("wait for pg_dump", e))?;
        let err_text = stderr.await.unwrap_or_default();
        if !status.success() {
            return Err(BackupError::Invalid(format!(
                "pg_dump of database {dbname} failed ({status}): {err_text}"
            )));
        }
        let stop_lsn = wal_position(&mut conn).await.unwrap_or(start_lsn);
        if let Err(e) = conn.close().await {
            warn!(error = %e, "closing the postgres session");
        }
        if cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        let finished_at = chrono::Utc::now();
        let stats = BackupStats {
            files: 1,
            bytes_total: uploaded.size,
            bytes_read: uploaded.size,
            chunks_total: uploaded.chunks.len() as u64,
            chunks_new: uploaded.chunks_new,
            bytes_added: uploaded.bytes_added,
        };
        let manifest = Manifest {
            format_version: 1,
            id: id.clone(),
            kind: BackupKind::Logical,
            parent: None,
            label,
            started_at,
            finished_at,
            start_lsn,
            stop_lsn,
            timeline: 0,
            pg_version_num: u32::try_from(version).unwrap_or_default(),
            system_identifier: sysid,
            backup_label: String::new(),
            tablespace_map: None,
            chunk_size: CHUNK_SIZE as u64,
            stats,
            entries: vec![Entry {
                path: format!("{dbname}.pgdump"),
                mode: 0o600,
                kind: EntryKind::File {
                    size: uploaded.size,
                    mtime_ns: finished_at.timestamp_nanos_opt().unwrap_or(0),
                    chunks: uploaded.chunks,
                },
            }],
        };
        repo.put_manifest(&manifest).await?;
        info!(
            bytes = manifest.stats.bytes_total,
            added = manifest.stats.bytes_added,
            "dump stored"
        );
        Ok(manifest)
    }
    .instrument(span)
    .await
}

/// `latest` (the newest backup of `kind`, of `target` when given: the database or file set
/// named in its label) or an id.
pub async fn resolve_kind(
    repo: &Repository,
    id_or_latest: &str,
    kind: BackupKind,
    target: Option<&str>,
) -> BackupResult<BackupId> {
    if id_or_latest != "latest" {
        return Ok(BackupId(id_or_latest.to_owned()));
    }
    let suffix = format!("-{kind}");
    let ids: Vec<BackupId> = repo
        .list_backups()
        .await?
        .into_iter()
        .filter(|b| b.0.ends_with(&suffix))
        .collect();
    for id in ids.into_iter().rev() {
        match target {
            None => return Ok(id),
            Some(t) => {
                let m = repo.get_manifest(&id).await?;
                if label_target(&m.label) == Some(t) {
                    return Ok(id);
                }
            }
        }
    }
    Err(BackupError::NotFound {
        key: format!(
            "backups/ (no {kind} backup{} in the repository)",
            target.map(|t| format!(" of {t}")).unwrap_or_default()
        ),
    })
}

/// The database or file set a logical/files manifest's label names (`logical app`,
/// `files configuration: /etc/x,/etc/y`).
pub fn label_target(label: &str) -> Option<&str> {
    let rest = label
        .strip_prefix("logical ")
        .or_else(|| label.strip_prefix("files "))?;
    Some(rest.split(':').next().unwrap_or(rest).trim())
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Restore a logical backup with `pg_restore --clean --if-exists --single-transaction`.
/// Returns (target database, bytes fed).
pub async fn restore_dump(
    repo: &Repository,
    id: &BackupId,
    opts: &RestoreLogicalOptions,
    done: &AtomicU64,
    cancel: &CancellationToken,
) -> BackupResult<(String, u64)> {
    let span = info_span!("logical_restore", backup = %id);
    async move {
        let m = repo.get_manifest(id).await?;
        if m.kind != BackupKind::Logical {
            return Err(BackupError::Invalid(format!(
                "backup {id} is a {} backup, not a logical dump; restore it with the matching restore command",
                m.kind
            )));
        }
        let Some((size, chunks)) = m.entries.iter().find_map(|e| match &e.kind {
            EntryKind::File { size, chunks, .. } => Some((*size, chunks.clone())),
            _ => None,
        }) else {
            return Err(BackupError::Corrupt {
                key: format!("backups/{id}"),
                reason: "logical manifest without its dump entry".into(),
            });
        };
        let url = url_with_db(&opts.pg_url, opts.dbname.as_deref());
        let target_db = match &opts.dbname {
            Some(d) => d.clone(),
            None => {
                // The database named in the URL; ask the server rather than parse the URL.
                if opts.create {
                    return Err(BackupError::Invalid(
                        "create=true needs the target database named with dbname".into(),
                    ));
                }
                let mut c = PgConnection::connect(&url).await?;
                let d: String = sqlx::query_scalar("select current_database()::text")
                    .fetch_one(&mut c)
                    .await?;
                let _closed = c.close().await;
                d
            }
        };
        if opts.create {
            let admin = url_with_db(&opts.pg_url, Some("postgres"));
            let mut c = PgConnection::connect(&admin).await?;
            let exists: bool =
                sqlx::query_scalar("select exists(select 1 from pg_database where datname = $1)")
                    .bind(&target_db)
                    .fetch_one(&mut c)
                    .await?;
            if !exists {
                sqlx::query(&format!("create database {}", quote_ident(&target_db)))
                    .execute(&mut c)
                    .await?;
                info!(db = %target_db, "target database created");
            }
            let _closed = c.close().await;
        }
        let exe = pg_tool(opts.pg_bin_dir.as_deref(), "pg_restore");
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args([
            "--clean",
            "--if-exists",
            "--single-transaction",
            "--no-password",
        ]);
        if opts.no_owner {
            cmd.arg("--no-owner");
        }
        let mut child = cmd
            .arg(format!("--dbname={url}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BackupError::io(format!("start {}", exe.display()), e))?;
        let stderr = collect_stderr(child.stderr.take());
        let Some(mut stdin) = child.stdin.take() else {
            return Err(BackupError::Invalid("pg_restore has no stdin".into()));
        };
        let fed = download_to(repo, &chunks, &mut stdin, done, cancel).await;
        // Closing stdin is pg_restore's end of input.
        let closed = stdin.shutdown().await;
        drop(stdin);
        if let Err(e) = fed {
            // pg_restore may have stopped first (a broken pipe here): its own words matter more.
            let exited = matches!(child.try_wait(), Ok(Some(_)));
            if !exited && let Err(k) = child.kill().await {
                warn!(error = %k, "stopping pg_restore after a failed read");
            }
            let _status = child.wait().await;
            let err_text = stderr.await.unwrap_or_default();
            return Err(BackupError::Invalid(format!(
                "restore of {id} into database {target_db} failed, nothing was committed: {e}{}",
                if err_text.is_empty() {
                    String::new()
                } else {
                    format!("; pg_restore: {err_text}")
                }
            )));
        }
        let status = child
            .wait()
            .await
            .map_err(|e| BackupError::io("wait for pg_restore", e))?;
        let err_text = stderr.await.unwrap_or_default();
        if !status.success() {
            return Err(BackupError::Invalid(format!(
                "pg_restore into database {target_db} failed ({status}); it ran in one transaction, so the database is unchanged: {err_text}"
            )));
        }
        if let Err(e) = closed {
            warn!(error = %e, "closing pg_restore's input");
        }
        info!(db = %target_db, bytes = size, "dump restored");
        Ok((target_db, size))
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t10_url_with_db_and_labels() {
        assert_eq!(
            url_with_db("postgres://u@h/postgres", Some("app db")),
            "postgres://u@h/postgres?dbname=app%20db"
        );
        assert_eq!(
            url_with_db("postgres://u@/p?host=/run", Some("x")),
            "postgres://u@/p?host=/run&dbname=x"
        );
        assert_eq!(url_with_db("postgres://u@h/p", None), "postgres://u@h/p");
        assert_eq!(label_target("logical app"), Some("app"));
        assert_eq!(
            label_target("files configuration: /etc/a"),
            Some("configuration")
        );
        assert_eq!(label_target("dr-agent 2026-full"), None);
    }
}
