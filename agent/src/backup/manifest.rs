//! The backup manifest: the catalog entry of one backup and its complete file list.
//!
//! Why self-contained: a manifest lists every file with all its chunk ids, whatever the kind
//! of backup, so restoring needs this manifest and the chunks it names, never its parent.
//! `parent` is kept for the operator (and for the (size, mtime) shortcut of the next
//! incremental), not for restore.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::key::ChunkId;

/// A backup's id: UTC time of its start, sortable, e.g. `20261128T101500123Z-full`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BackupId(pub String);

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl BackupId {
    pub fn new(now: chrono::DateTime<chrono::Utc>, kind: BackupKind) -> Self {
        BackupId(format!("{}-{}", now.format("%Y%m%dT%H%M%S%3fZ"), kind))
    }
}

/// A PostgreSQL WAL position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl std::str::FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (hi, lo) = s.split_once('/').ok_or_else(|| format!("bad LSN {s:?}"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|e| format!("bad LSN {s:?}: {e}"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|e| format!("bad LSN {s:?}: {e}"))?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return Err(format!("bad LSN {s:?}"));
        }
        Ok(Lsn(hi << 32 | lo))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    Full,
    Incr,
    /// `pg_dump --format=custom` of one database (one entry: the dump).
    Logical,
    /// A named file set (application data, configuration, certificates).
    Files,
}

impl BackupKind {
    /// Full and incremental backups are physical (a data directory plus WAL).
    pub fn is_physical(self) -> bool {
        matches!(self, BackupKind::Full | BackupKind::Incr)
    }
}

impl fmt::Display for BackupKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackupKind::Full => "full",
            BackupKind::Incr => "incr",
            BackupKind::Logical => "logical",
            BackupKind::Files => "files",
        })
    }
}

/// One entry of the data directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative to the data directory, `/`-separated.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    #[serde(flatten)]
    pub kind: EntryKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File {
        size: u64,
        /// Modification time (ns since the epoch) observed *before* the file was read.
        mtime_ns: i64,
        /// Chunk ids in file order; every chunk but the last is exactly `CHUNK_SIZE` bytes.
        chunks: Vec<ChunkId>,
    },
    Symlink {
        target: String,
    },
}

/// Counters recorded for the operator and the benchmark.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStats {
    pub files: u64,
    /// Bytes of the data directory this backup describes.
    pub bytes_total: u64,
    /// Bytes actually read (unchanged files of an incremental are not read).
    pub bytes_read: u64,
    pub chunks_total: u64,
    /// Chunks uploaded by this backup (the rest already existed).
    pub chunks_new: u64,
    /// Bytes this backup added to the repository (sealed chunk sizes).
    pub bytes_added: u64,
}

/// A backup's catalog entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub id: BackupId,
    pub kind: BackupKind,
    pub parent: Option<BackupId>,
    pub label: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: chrono::DateTime<chrono::Utc>,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    pub timeline: u32,
    pub pg_version_num: u32,
    pub system_identifier: Option<String>,
    pub backup_label: String,
    pub tablespace_map: Option<String>,
    pub chunk_size: u64,
    pub stats: BackupStats,
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// All distinct chunk ids, sorted.
    pub fn chunk_ids(&self) -> Vec<ChunkId> {
        let mut ids: Vec<ChunkId> = self
            .entries
            .iter()
            .flat_map(|e| match &e.kind {
                EntryKind::File { chunks, .. } => chunks.as_slice(),
                _ => &[],
            })
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Name of the WAL segment holding `lsn` (16 MiB segments).
    pub fn segment_name(timeline: u32, lsn: Lsn) -> String {
        let seg = lsn.0 / (16 << 20);
        format!("{:08X}{:08X}{:08X}", timeline, seg / 256, seg % 256)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t10_lsn_roundtrip_and_segment() {
        let l: Lsn = "1/2A000028".parse().unwrap();
        assert_eq!(l.to_string(), "1/2A000028");
        assert_eq!(Manifest::segment_name(1, l), "00000001000000010000002A");
        assert!("zz".parse::<Lsn>().is_err());
    }
}
