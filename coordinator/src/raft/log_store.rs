//! The Raft log on local disk: SQLite through sqlx (`<data_dir>/raft.db`).
//!
//! Why SQLite: an embedded, crash-safe store with no C++ build, and one file an operator
//! can inspect with `sqlite3`. The database runs with a WAL journal and
//! `synchronous=FULL`, so once `append` reports the entries flushed they survive a power
//! cut: Raft's safety rests on an acknowledged entry (and vote) never being forgotten.
//!
//! Layout:
//!
//! ```text
//!  log(idx INTEGER PRIMARY KEY, entry TEXT)   one row per entry, serde-JSON of openraft::Entry
//!  meta(key TEXT PRIMARY KEY, value TEXT)     vote, committed, last_purged (serde-JSON)
//! ```
//!
//! All entries of one `append` call go in one transaction, so a batch is either wholly on
//! disk or not at all. Purging records `last_purged` in the same transaction as the delete,
//! so the log state stays consistent after a crash between the two.

// openraft's StorageError is large by design; every storage method must return it.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::str::FromStr;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::typ::{Entry, LogId, StorageError, TypeConfig, Vote};

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";

/// Why the log store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    #[error("open raft log database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
}

/// The SQLite-backed Raft log. Cheap to clone (a connection pool).
#[derive(Clone, Debug)]
pub struct LogStore {
    pool: SqlitePool,
}

impl LogStore {
    /// Opens (creating if needed) the database file at `path`.
    pub async fn open(path: &Path) -> Result<LogStore, LogStoreError> {
        let err = |source| LogStoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let opts = SqliteConnectOptions::from_str("sqlite:")
            .map_err(err)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(false);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(err)?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, entry TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )
        .execute(&pool)
        .await
        .map_err(err)?;
        Ok(LogStore { pool })
    }

    /// Closes the pool, waiting for connections to finish (checkpointing the WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, sqlx::Error> {
        let row = sqlx::query("SELECT value FROM meta WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            None => Ok(None),
            Some(row) => {
                let text: String = row.try_get(0)?;
                serde_json::from_str(&text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
            }
        }
    }

    async fn write_meta<T: serde::Serialize>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<(), sqlx::Error> {
        let text = serde_json::to_string(value).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        sqlx::query("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)")
            .bind(key)
            .bind(text)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// SQLite integers are signed; Raft indices stay far below `i64::MAX`.
fn to_sql(index: u64) -> i64 {
    i64::try_from(index).unwrap_or(i64::MAX)
}

fn decode_entry(text: &str) -> Result<Entry, StorageError> {
    serde_json::from_str(text).map_err(|e| StorageIOError::read_logs(&e).into())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => to_sql(*i),
            Bound::Excluded(i) => to_sql(i.saturating_add(1)),
            Bound::Unbounded => 0,
        };
        // Inclusive end; `Excluded(0)` is an empty range.
        let end = match range.end_bound() {
            Bound::Included(i) => to_sql(*i),
            Bound::Excluded(0) => return Ok(Vec::new()),
            Bound::Excluded(i) => to_sql(*i - 1),
            Bound::Unbounded => i64::MAX,
        };
        let rows = sqlx::query("SELECT entry FROM log WHERE idx >= ? AND idx <= ? ORDER BY idx")
            .bind(start)
            .bind(end)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| StorageIOError::read_logs(&e))?;
        rows.iter()
            .map(|row| {
                let text: String = row.try_get(0).map_err(|e| StorageIOError::read_logs(&e))?;
                decode_entry(&text)
            })
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self
            .read_meta(KEY_LAST_PURGED)
            .await
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let row = sqlx::query("SELECT entry FROM log ORDER BY idx DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let last = match row {
            Some(row) => {
                let text: String = row.try_get(0).map_err(|e| StorageIOError::read_logs(&e))?;
                Some(decode_entry(&text)?.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(KEY_VOTE, vote)
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(KEY_VOTE)
            .await
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.write_meta(KEY_COMMITTED, &committed)
            .await
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let v: Option<Option<LogId>> = self
            .read_meta(KEY_COMMITTED)
            .await
            .map_err(|e| StorageIOError::read(&e))?;
        Ok(v.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for entry in entries {
            let text = serde_json::to_string(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            rows.push((to_sql(entry.log_id.index), text));
        }
        let result: Result<(), sqlx::Error> = async {
            let mut tx = self.pool.begin().await?;
            for (idx, text) in rows {
                sqlx::query("INSERT OR REPLACE INTO log (idx, entry) VALUES (?, ?)")
                    .bind(idx)
                    .bind(text)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        }
        .await;
        match result {
            Ok(()) => {
                // synchronous=FULL: the commit returned after the WAL was fsynced.
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(&e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "truncating raft log");
        sqlx::query("DELETE FROM log WHERE idx >= ?")
            .bind(to_sql(log_id.index))
            .execute(&self.pool)
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "purging raft log");
        let text =
            serde_json::to_string(&Some(log_id)).map_err(|e| StorageIOError::write_logs(&e))?;
        let result: Result<(), sqlx::Error> = async {
            let mut tx = self.pool.begin().await?;
            sqlx::query("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)")
                .bind(KEY_LAST_PURGED)
                .bind(text)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM log WHERE idx <= ?")
                .bind(to_sql(log_id.index))
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }
        .await;
        result.map_err(|e| StorageIOError::write_logs(&e).into())
    }
}
