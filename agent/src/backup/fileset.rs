//! File sets: named paths (application data, configuration, TLS certificates) backed up with
//! their modes and mtimes, and restored to a directory, with a dry run first.
//!
//! Why in the same repository as the database: one key, one verify, one copy to every tier,
//! one retention, and a file that did not change since the previous backup of the set costs
//! nothing (its chunk list is reused when size and mtime match, as for an incremental).
//!
//! Paths are stored without their leading `/` (`etc/nginx/nginx.conf`), so a restore to
//! `target` writes `target/etc/nginx/nginx.conf` and `target = /` puts the files back where
//! they were. Restore is careful with what is already there: every file goes to a temp name
//! beside its destination, is fsynced, gets its mode and mtime, and is then renamed, so no
//! reader ever sees half a certificate; existing files that differ are only replaced with
//! `overwrite`, and without it the restore refuses before writing anything, naming them.
//! Ownership is not recorded (restored files belong to the agent's user).
//!
//! Globs (`exclude`, `include`): `*` and `?` match within one path component, `**` any number
//! of components; a pattern without `/` matches the file name, one with `/` the path below the
//! named root (or, for restore, the stored path).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::key::ChunkId;
use super::logical::{download_to, upload_stream};
use super::manifest::{BackupId, BackupKind, BackupStats, Entry, EntryKind, Lsn, Manifest};
use super::repo::{CHUNK_SIZE, Repository};
use super::{BackupError, BackupResult, blocking};

/// Lines of a restore plan kept in a command's details.
pub const PLAN_LINES: usize = 1000;

/// What to back up.
#[derive(Debug, Clone)]
pub struct FileSetOptions {
    /// Name of the set (recorded in the manifest's label).
    pub name: String,
    /// Absolute paths (files or directories).
    pub paths: Vec<PathBuf>,
    pub exclude: Vec<String>,
    /// When not empty, only files matching one of these are kept.
    pub include: Vec<String>,
}

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct FileRestoreOptions {
    pub dry_run: bool,
    pub overwrite: bool,
    /// When not empty, only stored paths matching one of these are restored.
    pub include: Vec<String>,
}

/// One line of a restore plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanItem {
    /// `create`, `replace` or `unchanged`.
    pub action: &'static str,
    pub path: PathBuf,
    pub size: u64,
}

/// What a restore did (or, dry, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct FileRestoreReport {
    pub backup: String,
    pub dry_run: bool,
    /// Files and links written (or that would be).
    pub written: u64,
    pub unchanged: u64,
    pub bytes: u64,
    pub plan: Vec<PlanItem>,
}

impl FileRestoreReport {
    /// `create|replace|unchanged <path> <size>` lines, at most [`PLAN_LINES`].
    pub fn plan_text(&self) -> String {
        let mut lines: Vec<String> = self
            .plan
            .iter()
            .take(PLAN_LINES)
            .map(|p| format!("{} {} {}", p.action, p.path.display(), p.size))
            .collect();
        if self.plan.len() > PLAN_LINES {
            lines.push(format!("... and {} more", self.plan.len() - PLAN_LINES));
        }
        lines.join("\n")
    }
}

/// Does `pat` (glob) match `text`? `*`/`?` stay within a component, `**` crosses them.
pub fn glob_match(pat: &str, text: &str) -> bool {
    fn rec(p: &[u8], t: &[u8]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some(b'*') if p.get(1) == Some(&b'*') => {
                // `**/` also matches zero components.
                let rest = &p[2..];
                let rest_noslash = rest.strip_prefix(b"/").unwrap_or(rest);
                if rec(rest_noslash, t) || rec(rest, t) {
                    return true;
                }
                (0..t.len()).any(|i| rec(rest, &t[i + 1..]) || rec(rest_noslash, &t[i + 1..]))
            }
            Some(b'*') => {
                let rest = &p[1..];
                for i in 0..=t.len() {
                    if rec(rest, &t[i..]) {
                        return true;
                    }
                    if i < t.len() && t[i] == b'/' {
                        return false;
                    }
                }
                false
            }
            Some(b'?') => t.first().is_some_and(|&c| c != b'/') && rec(&p[1..], &t[1..]),
            Some(&c) => t.first() == Some(&c) && rec(&p[1..], &t[1..]),
        }
    }
    rec(pat.as_bytes(), text.as_bytes())
}

/// A pattern without `/` matches the last component; one with `/` the whole relative path.
fn matches_any(pats: &[String], rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    pats.iter().any(|p| {
        let p = p.trim();
        if p.contains('/') {
            let p = p.trim_start_matches('/');
            // `cache/**` leaves out the directory itself too.
            glob_match(p, rel) || p.strip_suffix("/**").is_some_and(|d| glob_match(d, rel))
        } else {
            glob_match(p, name)
        }
    })
}

/// One thing found under the set's paths.
#[derive(Debug, Clone)]
struct Found {
    /// Stored path: the absolute path without its leading `/`.
    stored: String,
    abs: PathBuf,
    mode: u32,
    kind: FoundKind,
}

#[derive(Debug, Clone)]
enum FoundKind {
    Dir,
    File { size: u64, mtime_ns: i64 },
    Symlink { target: String },
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec())
}

/// Walk every path of the set: parents before children, sorted, excludes applied.
fn walk(opts: &FileSetOptions) -> BackupResult<Vec<Found>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for root in &opts.paths {
        if !root.is_absolute() {
            return Err(BackupError::Invalid(format!(
                "file set {}: path {} is not absolute",
                opts.name,
                root.display()
            )));
        }
        let meta = std::fs::symlink_metadata(root).map_err(|e| {
            BackupError::io(
                format!("file set {}: path {}", opts.name, root.display()),
                e,
            )
        })?;
        // Parents of the root, so that restore recreates them.
        let mut parents: Vec<&Path> = root.ancestors().skip(1).collect();
        parents.reverse();
        for p in parents {
            let stored = stored_name(p);
            if stored.is_empty() || !seen.insert(stored.clone()) {
                continue;
            }
            let m = std::fs::metadata(p)
                .map_err(|e| BackupError::io(format!("stat {}", p.display()), e))?;
            out.push(Found {
                stored,
                abs: p.to_path_buf(),
                mode: m.permissions().mode() & 0o7777,
                kind: FoundKind::Dir,
            });
        }
        visit(opts, root, "", &meta, &mut seen, &mut out)?;
    }
    Ok(out)
}

fn stored_name(p: &Path) -> String {
    p.to_string_lossy().trim_start_matches('/').to_owned()
}

fn visit(
    opts: &FileSetOptions,
    abs: &Path,
    rel: &str,
    meta: &std::fs::Metadata,
    seen: &mut HashSet<String>,
    out: &mut Vec<Found>,
) -> BackupResult<()> {
    if !rel.is_empty() && matches_any(&opts.exclude, rel) {
        return Ok(());
    }
    let stored = stored_name(abs);
    let mode = meta.permissions().mode() & 0o7777;
    let ft = meta.file_type();
    if ft.is_dir() {
        if seen.insert(stored.clone()) {
            out.push(Found {
                stored,
                abs: abs.to_path_buf(),
                mode,
                kind: FoundKind::Dir,
            });
        }
        let rd = match std::fs::read_dir(abs) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(BackupError::io(format!("list {}", abs.display()), e)),
        };
        let mut names = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| BackupError::io(format!("list {}", abs.display()), e))?;
            names.push(ent.file_name());
        }
        names.sort();
        for n in names {
            let child = abs.join(&n);
            let child_rel = if rel.is_empty() {
                n.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", n.to_string_lossy())
            };
            let m = match std::fs::symlink_metadata(&child) {
                Ok(m) => m,
                // Removed while we walk: it is not part of this backup.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(BackupError::io(format!("stat {}", child.display()), e)),
            };
            visit(opts, &child, &child_rel, &m, seen, out)?;
        }
        return Ok(());
    }
    let name = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let check = if rel.is_empty() { name.as_str() } else { rel };
    if !opts.include.is_empty() && !matches_any(&opts.include, check) {
        return Ok(());
    }
    if !seen.insert(stored.clone()) {
        return Ok(());
    }
    if ft.is_symlink() {
        let target = std::fs::read_link(abs)
            .map_err(|e| BackupError::io(format!("readlink {}", abs.display()), e))?;
        out.push(Found {
            stored,
            abs: abs.to_path_buf(),
            mode,
            kind: FoundKind::Symlink {
                target: target.to_string_lossy().into_owned(),
            },
        });
    } else if ft.is_file() {
        out.push(Found {
            stored,
            abs: abs.to_path_buf(),
            mode,
            kind: FoundKind::File {
                size: meta.len(),
                mtime_ns: mtime_ns(meta),
            },
        });
    }
    // Sockets, fifos, devices: not application data.
    Ok(())
}

fn label(opts: &FileSetOptions) -> String {
    let paths: Vec<String> = opts.paths.iter().map(|p| p.display().to_string()).collect();
    format!("files {}: {}", opts.name, paths.join(","))
}

/// Back up a file set and write its manifest. `done` counts bytes read; `total` is set to
/// the bytes the set holds once the walk is done.
pub async fn run_files(
    repo: &Repository,
    opts: &FileSetOptions,
    done: &AtomicU64,
    total: &AtomicU64,
    cancel: &CancellationToken,
) -> BackupResult<Manifest> {
    let started_at = chrono::Utc::now();
    let id = BackupId::new(started_at, BackupKind::Files);
    let span = info_span!("files_backup", backup = %id, set = %opts.name);
    async move {
        if opts.name.contains(':') || opts.name.trim().is_empty() {
            return Err(BackupError::Invalid(format!(
                "file set name {:?} must be non-empty and without ':'",
                opts.name
            )));
        }
        if opts.paths.is_empty() {
            return Err(BackupError::Invalid(format!(
                "file set {} names no paths",
                opts.name
            )));
        }
        let o = opts.clone();
        let found = blocking(move || walk(&o)).await?;
        total.store(
            found
                .iter()
                .map(|f| match f.kind {
                    FoundKind::File { size, .. } => size,
                    _ => 0,
                })
                .sum(),
            std::sync::atomic::Ordering::Relaxed,
        );
        // The previous backup of this set: unchanged files reuse its chunk lists.
        let label = label(opts);
        let mut parent: Option<Manifest> = None;
        for prev in repo
            .list_backups()
            .await?
            .into_iter()
            .filter(|b| b.0.ends_with("-files"))
            .rev()
        {
            let m = repo.get_manifest(&prev).await?;
            if super::logical::label_target(&m.label) == Some(opts.name.as_str()) {
                parent = Some(m);
                break;
            }
        }
        let parent_files: HashMap<&str, &EntryKind> = parent
            .as_ref()
            .map(|p| {
                p.entries
                    .iter()
                    .filter(|e| matches!(e.kind, EntryKind::File { .. }))
                    .map(|e| (e.path.as_str(), &e.kind))
                    .collect()
            })
            .unwrap_or_default();
        let known: Mutex<HashSet<ChunkId>> = Mutex::new(
            parent
                .as_ref()
                .map(|p| p.chunk_ids().into_iter().collect())
                .unwrap_or_default(),
        );
        let mut stats = BackupStats::default();
        let mut entries = Vec::with_capacity(found.len());
        for f in found {
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
            let kind = match f.kind {
                FoundKind::Dir => EntryKind::Dir,
                FoundKind::Symlink { target } => EntryKind::Symlink { target },
                FoundKind::File { size, mtime_ns } => {
                    stats.files += 1;
                    match parent_files.get(f.stored.as_str()) {
                        Some(EntryKind::File {
                            size: ps,
                            mtime_ns: pm,
                            chunks,
                        }) if *ps == size && *pm == mtime_ns => {
                            stats.bytes_total += size;
                            stats.chunks_total += chunks.len() as u64;
                            done.fetch_add(size, std::sync::atomic::Ordering::Relaxed);
                            EntryKind::File {
                                size,
                                mtime_ns,
                                chunks: chunks.clone(),
                            }
                        }
                        _ => {
                            let file = match tokio::fs::File::open(&f.abs).await {
                                Ok(file) => file,
                                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                                    stats.files -= 1;
                                    continue;
                                }
                                Err(e) => {
                                    return Err(BackupError::io(
                                        format!("open {}", f.abs.display()),
                                        e,
                                    ));
                                }
                            };
                            let up = upload_stream(repo, file, &known, done, cancel).await?;
                            stats.bytes_total += up.size;
                            stats.bytes_read += up.size;
                            stats.chunks_total += up.chunks.len() as u64;
                            stats.chunks_new += up.chunks_new;
                            stats.bytes_added += up.bytes_added;
                            EntryKind::File {
                                size: up.size,
                                mtime_ns,
                                chunks: up.chunks,
                            }
                        }
                    }
                }
            };
            entries.push(Entry {
                path: f.stored,
                mode: f.mode,
                kind,
            });
        }
        if cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        let manifest = Manifest {
            format_version: 1,
            id: id.clone(),
            kind: BackupKind::Files,
            parent: parent.as_ref().map(|p| p.id.clone()),
            label,
            started_at,
            finished_at: chrono::Utc::now(),
            start_lsn: Lsn(0),
            stop_lsn: Lsn(0),
            timeline: 0,
            pg_version_num: 0,
            system_identifier: None,
            backup_label: String::new(),
            tablespace_map: None,
            chunk_size: CHUNK_SIZE as u64,
            stats,
            entries,
        };
        repo.put_manifest(&manifest).await?;
        info!(
            files = manifest.stats.files,
            bytes = manifest.stats.bytes_total,
            added = manifest.stats.bytes_added,
            "file set stored"
        );
        Ok(manifest)
    }
    .instrument(span)
    .await
}

/// Chunk ids of the file at `path` as the repository would compute them, or `None` when it
/// cannot be read as a regular file.
fn file_chunk_ids(repo: &Repository, path: &Path) -> Option<Vec<ChunkId>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut ids = Vec::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        let mut filled = 0;
        while filled < CHUNK_SIZE {
            match f.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        if filled == 0 {
            break;
        }
        ids.push(repo.key().hash(&buf[..filled]));
        if filled < CHUNK_SIZE {
            break;
        }
    }
    Some(ids)
}

fn dest_of(target: &Path, stored: &str) -> BackupResult<PathBuf> {
    let rel = Path::new(stored);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(BackupError::Invalid(format!(
            "manifest path {stored:?} is not a plain relative path; refusing to restore it"
        )));
    }
    Ok(target.join(rel))
}

/// The plan: what each file and link of the manifest would do at `target`.
fn plan(
    repo: &Repository,
    m: &Manifest,
    target: &Path,
    include: &[String],
) -> BackupResult<Vec<(PlanItem, usize)>> {
    let mut out = Vec::new();
    for (i, e) in m.entries.iter().enumerate() {
        if !include.is_empty()
            && !matches!(e.kind, EntryKind::Dir)
            && !matches_any(include, &e.path)
        {
            continue;
        }
        let dest = dest_of(target, &e.path)?;
        let existing = std::fs::symlink_metadata(&dest).ok();
        let (action, size) = match &e.kind {
            EntryKind::Dir => {
                if existing.as_ref().is_some_and(|m| !m.is_dir()) {
                    return Err(BackupError::Invalid(format!(
                        "{} exists and is not a directory; move it away first",
                        dest.display()
                    )));
                }
                continue;
            }
            EntryKind::File { size, chunks, .. } => {
                let action = match &existing {
                    None => "create",
                    Some(meta) if meta.is_dir() => {
                        return Err(BackupError::Invalid(format!(
                            "{} is a directory where the backup has a file; move it away first",
                            dest.display()
                        )));
                    }
                    Some(meta)
                        if meta.is_file()
                            && meta.len() == *size
                            && file_chunk_ids(repo, &dest).as_ref() == Some(chunks)
                            && meta.permissions().mode() & 0o7777 == e.mode =>
                    {
                        "unchanged"
                    }
                    Some(_) => "replace",
                };
                (action, *size)
            }
            EntryKind::Symlink { target: t } => {
                let action = match &existing {
                    None => "create",
                    Some(meta)
                        if meta.file_type().is_symlink()
                            && std::fs::read_link(&dest)
                                .is_ok_and(|l| l.to_string_lossy() == t.as_str()) =>
                    {
                        "unchanged"
                    }
                    Some(meta) if meta.is_dir() => {
                        return Err(BackupError::Invalid(format!(
                            "{} is a directory where the backup has a link; move it away first",
                            dest.display()
                        )));
                    }
                    Some(_) => "replace",
                };
                (action, 0)
            }
        };
        out.push((
            PlanItem {
                action,
                path: dest,
                size,
            },
            i,
        ));
    }
    Ok(out)
}

fn tmp_name(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.dr-restore-{}", std::process::id()))
}

fn set_mtime(path: &Path, mtime_ns: i64) -> std::io::Result<()> {
    let t = std::time::UNIX_EPOCH
        + std::time::Duration::from_nanos(u64::try_from(mtime_ns).unwrap_or(0));
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.set_modified(t)
}

/// Restore a files backup below `target` (see the module docs). `done` counts bytes written.
pub async fn restore_files(
    repo: &Repository,
    id: &BackupId,
    target: &Path,
    opts: &FileRestoreOptions,
    done: &AtomicU64,
    cancel: &CancellationToken,
) -> BackupResult<FileRestoreReport> {
    let span = info_span!("files_restore", backup = %id, target = %target.display());
    async move {
        if !target.is_absolute() {
            return Err(BackupError::Invalid(format!(
                "restore target {} must be an absolute path",
                target.display()
            )));
        }
        let m = repo.get_manifest(id).await?;
        if m.kind != BackupKind::Files {
            return Err(BackupError::Invalid(format!(
                "backup {id} is a {} backup, not a file set; restore it with the matching restore command",
                m.kind
            )));
        }
        let (r2, m2, t2, inc) = (
            repo.clone(),
            m.clone(),
            target.to_path_buf(),
            opts.include.clone(),
        );
        let items = blocking(move || plan(&r2, &m2, &t2, &inc)).await?;
        let mut report = FileRestoreReport {
            backup: id.0.clone(),
            dry_run: opts.dry_run,
            ..Default::default()
        };
        for (p, _) in &items {
            if p.action == "unchanged" {
                report.unchanged += 1;
            } else {
                report.written += 1;
                report.bytes += p.size;
            }
        }
        let replaced: Vec<String> = items
            .iter()
            .filter(|(p, _)| p.action == "replace")
            .map(|(p, _)| p.path.display().to_string())
            .collect();
        report.plan = items.iter().map(|(p, _)| p.clone()).collect();
        if opts.dry_run {
            return Ok(report);
        }
        if !replaced.is_empty() && !opts.overwrite {
            let shown: Vec<&str> = replaced.iter().take(20).map(String::as_str).collect();
            return Err(BackupError::Invalid(format!(
                "{} existing file(s) differ from the backup and would be replaced: {}{}; nothing was written. Pass overwrite (or --overwrite) to replace them, or restore to an empty directory",
                replaced.len(),
                shown.join(", "),
                if replaced.len() > shown.len() { ", ..." } else { "" }
            )));
        }
        // Directories first (parents before children, as in the manifest).
        let mut dirs = Vec::new();
        for e in &m.entries {
            if let EntryKind::Dir = e.kind {
                let dest = dest_of(target, &e.path)?;
                std::fs::create_dir_all(&dest)
                    .map_err(|err| BackupError::io(format!("create {}", dest.display()), err))?;
                dirs.push((dest, e.mode));
            }
        }
        for (p, i) in &items {
            if p.action == "unchanged" {
                continue;
            }
            if cancel.is_cancelled() {
                return Err(BackupError::Cancelled);
            }
            let e = &m.entries[*i];
            if let Some(parent) = p.path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|err| BackupError::io(format!("create {}", parent.display()), err))?;
            }
            let tmp = tmp_name(&p.path);
            let written = write_one(repo, e, &p.path, &tmp, done, cancel).await;
            if let Err(err) = written {
                if let Err(rm) = std::fs::remove_file(&tmp)
                    && rm.kind() != std::io::ErrorKind::NotFound
                {
                    warn!(path = %tmp.display(), error = %rm, "removing a temp file");
                }
                return Err(err);
            }
        }
        // Directory modes last: a read-only directory would stop its own restore.
        for (d, mode) in dirs.iter().rev() {
            if let Err(e) = std::fs::set_permissions(d, std::fs::Permissions::from_mode(*mode)) {
                warn!(path = %d.display(), error = %e, "setting a directory's mode");
            }
        }
        info!(
            written = report.written,
            unchanged = report.unchanged,
            bytes = report.bytes,
            "file set restored"
        );
        Ok(report)
    }
    .instrument(span)
    .await
}

async fn write_one(
    repo: &Repository,
    e: &Entry,
    dest: &Path,
    tmp: &Path,
    done: &AtomicU64,
    cancel: &CancellationToken,
) -> BackupResult<()> {
    match &e.kind {
        EntryKind::Dir => Ok(()),
        EntryKind::Symlink { target } => {
            std::os::unix::fs::symlink(target, tmp)
                .map_err(|err| BackupError::io(format!("create link {}", tmp.display()), err))?;
            std::fs::rename(tmp, dest)
                .map_err(|err| BackupError::io(format!("rename to {}", dest.display()), err))
        }
        EntryKind::File {
            chunks, mtime_ns, ..
        } => {
            let mut f = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(tmp)
                .await
                .map_err(|err| BackupError::io(format!("create {}", tmp.display()), err))?;
            download_to(repo, chunks, &mut f, done, cancel).await?;
            f.sync_all()
                .await
                .map_err(|err| BackupError::io(format!("sync {}", tmp.display()), err))?;
            drop(f);
            std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(e.mode))
                .map_err(|err| BackupError::io(format!("chmod {}", tmp.display()), err))?;
            // A file without owner write permission still takes its mtime (we are its owner).
            if let Err(err) = set_mtime(tmp, *mtime_ns) {
                warn!(path = %dest.display(), error = %err, "setting the mtime");
            }
            std::fs::rename(tmp, dest)
                .map_err(|err| BackupError::io(format!("rename to {}", dest.display()), err))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t10_globs() {
        assert!(glob_match("*.tmp", "a.tmp"));
        assert!(!glob_match("*.tmp", "dir/a.tmp"));
        assert!(glob_match("**/*.tmp", "dir/sub/a.tmp"));
        assert!(glob_match("**/*.tmp", "a.tmp"));
        assert!(glob_match("cache/**", "cache/x/y"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "a/c"));
        assert!(matches_any(&["*.key".into()], "tls/private/server.key"));
        assert!(matches_any(
            &["tls/private/*".into()],
            "tls/private/server.key"
        ));
        assert!(!matches_any(
            &["private/*".into()],
            "tls/private/server.key"
        ));
        assert!(matches_any(
            &["**/private/*".into()],
            "tls/private/server.key"
        ));
    }

    #[test]
    fn t10_walk_excludes_and_parents() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("app");
        std::fs::create_dir_all(root.join("cache")).unwrap();
        std::fs::write(root.join("a.conf"), b"a").unwrap();
        std::fs::write(root.join("b.tmp"), b"b").unwrap();
        std::fs::write(root.join("cache/c"), b"c").unwrap();
        std::os::unix::fs::symlink("a.conf", root.join("link")).unwrap();
        let opts = FileSetOptions {
            name: "t".into(),
            paths: vec![root.clone()],
            exclude: vec!["*.tmp".into(), "cache".into()],
            include: vec![],
        };
        let found = walk(&opts).unwrap();
        let names: Vec<&str> = found.iter().map(|f| f.stored.as_str()).collect();
        let r = stored_name(&root);
        assert!(names.contains(&r.as_str()));
        assert!(names.contains(&format!("{r}/a.conf").as_str()));
        assert!(names.contains(&format!("{r}/link").as_str()));
        assert!(
            !names
                .iter()
                .any(|n| n.ends_with("b.tmp") || n.contains("cache"))
        );
        // Parents come first.
        assert_eq!(names[0], r.split('/').next().unwrap());
        assert!(dest_of(Path::new("/t"), "../etc/passwd").is_err());
    }
}
