//! Fencing state that lives next to the data: `<data_dir>/dr_epoch` and `<data_dir>/dr_fenced`.
//!
//! Both sit in the data directory on purpose: they travel with the data they protect (a
//! restored or moved data dir keeps its epoch), and they survive agent restarts and reboots.
//! `dr_epoch` is the highest fencing epoch this data dir has seen; a promotion with an older
//! epoch comes from a deposed leader and is refused. `dr_fenced` is written BEFORE the fence
//! stops the server, so no concurrent `start()` can slip in between.
//!
//! pg_rewind and pg_basebackup copy (or delete) files from the source's data dir, markers
//! included; [`Markers::snapshot`]/[`Markers::restore`] keep the target's own state across them.
//!
//! Writes are atomic: temp file, fsync, rename, fsync of the directory.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{PgError, PgResult};

pub const EPOCH_FILE: &str = "dr_epoch";
pub const FENCE_FILE: &str = "dr_fenced";

/// Fencing epoch of a database cluster (raised in the Raft log before every promotion).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Content of `dr_fenced`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceMarker {
    pub reason: String,
    pub fenced_at: DateTime<Utc>,
    /// The data dir's epoch when it was fenced; `unfence` needs at least this.
    pub epoch: Epoch,
}

/// The two marker files of one data dir.
#[derive(Clone, Debug)]
pub struct Markers {
    dir: PathBuf,
    /// Owner given to the files: when the agent is root, the run_as user, so that pg_rewind
    /// and pg_basebackup (which run as that user) can overwrite or delete them.
    owner: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
}

/// Marker state captured before a tool that rewrites the data dir.
#[derive(Clone, Debug)]
pub struct MarkerSnapshot {
    epoch: Epoch,
    fence: Option<FenceMarker>,
}

impl Markers {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.to_owned(),
            owner: None,
        }
    }

    pub fn with_owner(mut self, owner: Option<(nix::unistd::Uid, nix::unistd::Gid)>) -> Self {
        self.owner = owner;
        self
    }

    /// Highest epoch seen; 0 when the file is absent.
    pub fn epoch(&self) -> PgResult<Epoch> {
        let p = self.dir.join(EPOCH_FILE);
        match std::fs::read_to_string(&p) {
            Ok(s) => s
                .trim()
                .parse::<u64>()
                .map(Epoch)
                .map_err(|e| PgError::Marker {
                    path: p.clone(),
                    reason: format!("not an epoch: {e}"),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Epoch(0)),
            Err(e) => Err(PgError::Marker {
                path: p,
                reason: e.to_string(),
            }),
        }
    }

    /// Raises the stored epoch to `epoch`. Refuses (without writing) an epoch below it.
    pub fn raise_epoch(&self, epoch: Epoch) -> PgResult<Epoch> {
        let current = self.epoch()?;
        if epoch < current {
            return Err(PgError::StaleEpoch {
                given: epoch,
                current,
            });
        }
        if epoch > current {
            write_atomic(
                self.owner,
                &self.dir.join(EPOCH_FILE),
                format!("{}\n", epoch.0).as_bytes(),
            )?;
        }
        Ok(epoch)
    }

    pub fn fence(&self) -> PgResult<Option<FenceMarker>> {
        let p = self.dir.join(FENCE_FILE);
        match std::fs::read(&p) {
            // A marker we cannot parse still fences: presence is what counts.
            Ok(b) => Ok(Some(serde_json::from_slice(&b).unwrap_or_else(|e| {
                FenceMarker {
                    reason: format!("unreadable fence marker ({e})"),
                    fenced_at: DateTime::<Utc>::UNIX_EPOCH,
                    epoch: Epoch(u64::MAX),
                }
            }))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(PgError::Marker {
                path: p,
                reason: e.to_string(),
            }),
        }
    }

    pub fn set_fence(&self, m: &FenceMarker) -> PgResult<()> {
        let json = serde_json::to_vec_pretty(m).map_err(|e| PgError::Marker {
            path: self.dir.join(FENCE_FILE),
            reason: e.to_string(),
        })?;
        write_atomic(self.owner, &self.dir.join(FENCE_FILE), &json)
    }

    pub fn clear_fence(&self) -> PgResult<()> {
        let p = self.dir.join(FENCE_FILE);
        match std::fs::remove_file(&p) {
            Ok(()) => fsync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(PgError::Marker {
                path: p,
                reason: e.to_string(),
            }),
        }
    }

    pub fn snapshot(&self) -> PgResult<MarkerSnapshot> {
        Ok(MarkerSnapshot {
            epoch: self.epoch()?,
            fence: self.fence()?,
        })
    }

    /// After a copy from another data dir: epoch = max(ours, copied), fence = ours.
    pub fn restore(&self, snap: &MarkerSnapshot) -> PgResult<()> {
        let copied = self.epoch().unwrap_or(Epoch(0));
        if snap.epoch > copied {
            write_atomic(
                self.owner,
                &self.dir.join(EPOCH_FILE),
                format!("{}\n", snap.epoch.0).as_bytes(),
            )?;
        }
        match &snap.fence {
            Some(m) => self.set_fence(m),
            None => self.clear_fence(),
        }
    }
}

fn write_atomic(
    owner: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
    path: &Path,
    content: &[u8],
) -> PgResult<()> {
    let err = |e: std::io::Error| PgError::Marker {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let dir = path.parent().ok_or_else(|| PgError::Marker {
        path: path.to_owned(),
        reason: "no parent".into(),
    })?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(content).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    if let Some((uid, gid)) = owner {
        nix::unistd::chown(&tmp, Some(uid), Some(gid)).map_err(|e| PgError::Marker {
            path: tmp.clone(),
            reason: format!("chown: {e}"),
        })?;
    }
    std::fs::rename(&tmp, path).map_err(err)?;
    fsync_dir(dir)
}

fn fsync_dir(dir: &Path) -> PgResult<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| PgError::Marker {
            path: dir.to_owned(),
            reason: format!("fsync directory: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_only_rises() {
        let d = tempfile::tempdir().unwrap();
        let m = Markers::new(d.path());
        assert_eq!(m.epoch().unwrap(), Epoch(0));
        m.raise_epoch(Epoch(3)).unwrap();
        m.raise_epoch(Epoch(3)).unwrap();
        assert!(matches!(
            m.raise_epoch(Epoch(2)),
            Err(PgError::StaleEpoch { .. })
        ));
        assert_eq!(m.epoch().unwrap(), Epoch(3));
    }

    #[test]
    fn fence_marker_and_snapshot() {
        let d = tempfile::tempdir().unwrap();
        let m = Markers::new(d.path());
        assert!(m.fence().unwrap().is_none());
        let f = FenceMarker {
            reason: "lease expired".into(),
            fenced_at: Utc::now(),
            epoch: Epoch(4),
        };
        m.raise_epoch(Epoch(4)).unwrap();
        m.set_fence(&f).unwrap();
        let snap = m.snapshot().unwrap();
        // a tool copies another dir's markers over ours
        std::fs::write(d.path().join(EPOCH_FILE), "2\n").unwrap();
        std::fs::remove_file(d.path().join(FENCE_FILE)).unwrap();
        m.restore(&snap).unwrap();
        assert_eq!(m.epoch().unwrap(), Epoch(4));
        assert_eq!(m.fence().unwrap(), Some(f));
        std::fs::write(d.path().join(FENCE_FILE), "garbage").unwrap();
        assert!(
            m.fence().unwrap().is_some(),
            "an unreadable marker still fences"
        );
        m.clear_fence().unwrap();
        m.clear_fence().unwrap();
        assert!(m.fence().unwrap().is_none());
    }
}
