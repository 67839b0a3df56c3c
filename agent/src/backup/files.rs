//! Which files of a PostgreSQL data directory a physical backup copies.
//!
//! Why a list of exclusions: the PostgreSQL manual ("Making a Base Backup Using the Low Level
//! API") and `basebackup.c` name what must not (or need not) be copied; copying `pg_wal` or
//! `postmaster.pid` makes a restore fail or start with stale state. The rules, in one place:
//! * contents of `pg_wal/` (recreated with an empty `archive_status/`), `pg_replslot/`,
//!   `pg_dynshmem/`, `pg_notify/`, `pg_serial/`, `pg_snapshots/`, `pg_stat_tmp/`,
//!   `pg_subtrans/` — the directories themselves are kept;
//! * `postmaster.pid`, `postmaster.opts`, `backup_label`, `tablespace_map`, `backup_manifest`,
//!   `pg_internal.init`, `postgresql.auto.conf.tmp`, `current_logfiles.tmp`, anything named
//!   `pgsql_tmp*` (temporary files and directories);
//! * unlogged relations: every fork of a relation that has an `_init` fork, except the `_init`
//!   fork itself (PostgreSQL resets them from it at startup).
//!
//! Tablespaces outside the data directory (`pg_tblspc/*` symlinks) are refused for now rather
//! than silently left out.

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{BackupError, BackupResult};

const EXCLUDE_CONTENTS: &[&str] = &[
    "pg_wal",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];

const EXCLUDE_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "pg_internal.init",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
];

/// One entry found in the data directory.
#[derive(Debug, Clone)]
pub struct Found {
    pub rel: String,
    pub abs: PathBuf,
    pub mode: u32,
    pub kind: FoundKind,
}

#[derive(Debug, Clone)]
pub enum FoundKind {
    Dir,
    File { size: u64, mtime_ns: i64 },
    Symlink { target: String },
}

/// Walk `data_dir` and return what a backup must copy, parents before children.
pub fn walk(data_dir: &Path) -> BackupResult<Vec<Found>> {
    let mut out = Vec::new();
    walk_dir(data_dir, "", &mut out)?;
    Ok(out)
}

fn walk_dir(dir: &Path, rel: &str, out: &mut Vec<Found>) -> BackupResult<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        // A database dropped during the backup: WAL replay removes it anyway.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !rel.is_empty() => return Ok(()),
        Err(e) => return Err(BackupError::io(format!("list {}", dir.display()), e)),
    };
    let mut names = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| BackupError::io(format!("list {}", dir.display()), e))?;
        names.push(ent.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    let unlogged: HashSet<&str> = names
        .iter()
        .filter_map(|n| n.strip_suffix("_init"))
        .collect();
    for name in &names {
        if EXCLUDE_FILES.contains(&name.as_str()) || name.starts_with("pgsql_tmp") {
            continue;
        }
        if is_unlogged_fork(name, &unlogged) {
            continue;
        }
        let abs = dir.join(name);
        let rel_path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let meta = match std::fs::symlink_metadata(&abs) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(BackupError::io(format!("stat {}", abs.display()), e)),
        };
        let mode = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        if ft.is_symlink() {
            if rel == "pg_tblspc" {
                return Err(BackupError::Unsupported(format!(
                    "tablespace {rel_path} outside the data directory; not yet backed up by dr-agent"
                )));
            }
            let target = std::fs::read_link(&abs)
                .map_err(|e| BackupError::io(format!("readlink {}", abs.display()), e))?;
            out.push(Found {
                rel: rel_path,
                abs,
                mode,
                kind: FoundKind::Symlink {
                    target: target.to_string_lossy().into_owned(),
                },
            });
        } else if ft.is_dir() {
            out.push(Found {
                rel: rel_path.clone(),
                abs: abs.clone(),
                mode,
                kind: FoundKind::Dir,
            });
            if rel.is_empty() && EXCLUDE_CONTENTS.contains(&name.as_str()) {
                if name == "pg_wal" {
                    out.push(Found {
                        rel: "pg_wal/archive_status".into(),
                        abs: abs.join("archive_status"),
                        mode,
                        kind: FoundKind::Dir,
                    });
                }
                continue;
            }
            walk_dir(&abs, &rel_path, out)?;
        } else if ft.is_file() {
            let mtime_ns = meta
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec());
            out.push(Found {
                rel: rel_path,
                abs,
                mode,
                kind: FoundKind::File {
                    size: meta.len(),
                    mtime_ns,
                },
            });
        }
        // Sockets, fifos: nothing to back up.
    }
    Ok(())
}

/// `12345`, `12345.1`, `12345_fsm`, `12345_vm` of a relation with `12345_init`.
fn is_unlogged_fork(name: &str, unlogged: &HashSet<&str>) -> bool {
    if unlogged.is_empty() || name.ends_with("_init") {
        return false;
    }
    let base = name.split(['.', '_']).next().unwrap_or(name);
    unlogged.contains(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t10_exclusions() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        for dir in [
            "pg_wal/archive_status",
            "base/5/pgsql_tmp",
            "pg_replslot/s1",
            "global",
            "pg_stat_tmp",
        ] {
            std::fs::create_dir_all(p.join(dir)).unwrap();
        }
        for f in [
            "PG_VERSION",
            "postmaster.pid",
            "pg_wal/000000010000000000000001",
            "pg_replslot/s1/state",
            "base/5/1000",
            "base/5/2000",
            "base/5/2000_init",
            "base/5/2000_fsm",
            "base/5/2000.1",
            "base/5/pgsql_tmp/pgsql_tmp1.0",
            "base/5/pg_internal.init",
            "global/pg_control",
            "pg_stat_tmp/global.stat",
        ] {
            std::fs::write(p.join(f), b"x").unwrap();
        }
        let got: Vec<String> = walk(p).unwrap().into_iter().map(|f| f.rel).collect();
        assert_eq!(
            got,
            vec![
                "PG_VERSION",
                "base",
                "base/5",
                "base/5/1000",
                "base/5/2000_init",
                "global",
                "global/pg_control",
                "pg_replslot",
                "pg_stat_tmp",
                "pg_wal",
                "pg_wal/archive_status",
            ]
        );
    }
}
