//! Standalone backup CLI: works with every coordinator down (the total-loss case).
//!
//! Why here and not in main.rs: main.rs belongs to the agent service; it only gains one
//! `#[command(flatten)] Backup(backup::cli::Command)` variant and one dispatch line calling
//! [`run`]. Commands:
//! ```text
//! dr-agent repo init    --repo-config F            create key file (0600) and repository
//! dr-agent repo prune   --repo-config F [--grace 1h] [--dry-run] [--keep-wal]
//! dr-agent backup run   --repo-config F --pg-url URL --data-dir DIR --type full|incr
//! dr-agent backup run   --repo-config F --type logical --pg-url URL [--dbname D]
//! dr-agent backup run   --repo-config F --type files --name SET --path P... [--exclude G]...
//! dr-agent restore-logical --repo-config F --backup ID|latest --pg-url URL [--dbname D] [--create]
//! dr-agent restore-files --repo-config F --backup ID|latest --target DIR [--dry-run] [--overwrite]
//! dr-agent backup list  --repo-config F [--output json]
//! dr-agent backup verify --repo-config F [ID | --all] [--output json]
//! dr-agent restore      --repo-config F [--backup ID|latest] --target DIR [--no-recovery]
//!                       [--to-time T | --to-lsn L | --to-xid X | --to-name N | --immediate]
//!                       [--target-action promote|pause] [--timeline TL] [--port P] [--start]
//! dr-agent wal-push %p  --repo-config F [--push-ahead N]   archive_command
//! dr-agent wal-fetch %f %p --repo-config F         restore_command (exit 1 if absent, 200 on error)
//! ```
//! Exit codes: 0 success; 1 failure; errors go to stderr with what to do. wal-fetch: 0 found,
//! 1 not in the archive, and on an error (unreadable repository, wrong key, corrupt object)
//! [`WAL_FETCH_ERROR_EXIT`] outside a standby. Why: PostgreSQL takes any exit status up to 125
//! as "not in the archive", and during a restore that means "end of recovery": it would promote
//! a database missing the WAL it could not read. Above 125 it stops recovery instead, so a
//! failed fetch never starts a half-restored database. A standby (`standby.signal` in the data
//! directory, PostgreSQL's working directory for restore_command) gets 1: it retries the
//! archive and streams meanwhile, and must not shut down over a transient storage error.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::basebackup::{BackupOptions, run_backup};
use super::fileset::{FileRestoreOptions, FileSetOptions, restore_files, run_files};
use super::logical::{DumpOptions, RestoreLogicalOptions, resolve_kind, restore_dump, run_dump};
use super::manifest::{BackupId, BackupKind};
use super::repo::Repository;
use super::repo_config::Location;
use super::repo_config::RepoConfig;
use super::verify::verify;
use super::wal_fetch::{wal_fetch, wal_fetch_spooled};
use super::wal_push::{PushOutcome, wal_push, wal_push_fs, wal_push_fs_ahead};

#[derive(Debug, Clone, clap::Args)]
pub struct RepoArg {
    /// Repository config file (TOML; see deploy/examples/repository.toml).
    #[arg(long, env = "DR_REPO_CONFIG")]
    pub repo_config: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// The backup-related subcommands, flattened into the agent's command enum.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Physical backups: run, list, verify.
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Restore a backup into an empty directory.
    Restore(Box<RestoreArgs>),
    /// Restore a logical backup with pg_restore --clean --if-exists (one transaction).
    RestoreLogical(Box<RestoreLogicalArgs>),
    /// Restore a file-set backup below a directory (`/` = in place); --dry-run lists.
    RestoreFiles(Box<RestoreFilesArgs>),
    /// Repository maintenance: init, prune.
    #[command(subcommand)]
    Repo(RepoCmd),
    /// archive_command: archive one WAL file (`wal-push %p`).
    WalPush(WalPushArgs),
    /// restore_command: fetch one WAL file (`wal-fetch %f %p`); exit 1 if the archive has none.
    WalFetch(WalFetchArgs),
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum BackupCmd {
    /// Take a backup: physical (full|incr) of a running server, a logical dump of one
    /// database, or a file set.
    Run(Box<RunArgs>),
    /// List backups, oldest first.
    List {
        #[command(flatten)]
        repo: RepoArg,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Read objects back and name every missing or corrupt one (exit 1 if any).
    Verify {
        #[command(flatten)]
        repo: RepoArg,
        /// Backup id or `latest`.
        id: Option<String>,
        /// Every backup and every archived WAL file.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// `dr-agent backup run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub repo: RepoArg,
    /// Connection URL (full|incr: a role allowed to run pg_backup_start; logical: one
    /// that can read the database). Not used by `--type files`.
    #[arg(long, env = "DR_PG_URL")]
    pub pg_url: Option<String>,
    /// The server's data directory (full|incr; read directly: run on the database host).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long = "type", value_enum, default_value_t = BackupKind::Incr)]
    pub kind: BackupKind,
    /// Use a spread checkpoint instead of an immediate one (full|incr).
    #[arg(long)]
    pub spread_checkpoint: bool,
    /// logical: the database to dump (default: the one in --pg-url).
    #[arg(long)]
    pub dbname: Option<String>,
    /// logical: directory of pg_dump (default: newest /usr/lib/postgresql/*/bin, else PATH).
    #[arg(long)]
    pub pg_bin_dir: Option<PathBuf>,
    /// files: name of the file set (recorded in the backup).
    #[arg(long, default_value = "files")]
    pub name: String,
    /// files: an absolute file or directory path (repeat for several).
    #[arg(long = "path")]
    pub paths: Vec<PathBuf>,
    /// files: glob to leave out (repeatable; `*.tmp`, `cache/**`).
    #[arg(long)]
    pub exclude: Vec<String>,
    /// files: glob a file must match to be kept (repeatable; default: every file).
    #[arg(long)]
    pub include: Vec<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub repo: RepoArg,
    /// Backup id or `latest`; default: the newest backup that ends before the target.
    #[arg(long)]
    pub backup: Option<String>,
    /// Absent or empty directory.
    #[arg(long)]
    pub target: PathBuf,
    /// Do not write recovery.signal / restore_command.
    #[arg(long)]
    pub no_recovery: bool,
    /// Recover to this time (RFC 3339 with a zone).
    #[arg(long, group = "pitr")]
    pub to_time: Option<String>,
    /// Recover to this LSN (e.g. 0/3000060).
    #[arg(long, group = "pitr")]
    pub to_lsn: Option<String>,
    /// Recover until this transaction committed.
    #[arg(long, group = "pitr")]
    pub to_xid: Option<String>,
    /// Recover to this restore point (pg_create_restore_point).
    #[arg(long, group = "pitr")]
    pub to_name: Option<String>,
    /// Stop as soon as the backup is consistent (exactly the backup's data).
    #[arg(long, group = "pitr")]
    pub immediate: bool,
    /// promote (default) or pause at the target.
    #[arg(long, default_value = "promote", value_parser = ["promote", "pause"])]
    pub target_action: String,
    /// recovery_target_timeline: latest (default), current or a number.
    #[arg(long, default_value = "")]
    pub timeline: String,
    /// Port of the restored server (written to postgresql.auto.conf).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// unix_socket_directories of the restored server.
    #[arg(long)]
    pub socket_dir: Option<String>,
    /// Keep archive_mode as backed up (default: off, so a copy does not archive into the
    /// source's repository).
    #[arg(long)]
    pub keep_archive: bool,
    /// Start the server (as the postgres user) and wait until recovery reached the target.
    #[arg(long)]
    pub start: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RestoreLogicalArgs {
    #[command(flatten)]
    pub repo: RepoArg,
    /// Backup id, or `latest` (the newest logical backup; of --source-db when given).
    #[arg(long)]
    pub backup: String,
    /// With `latest`: the database whose newest dump to restore.
    #[arg(long)]
    pub source_db: Option<String>,
    /// Connection URL of the TARGET server (no password in it).
    #[arg(long, env = "DR_PG_URL")]
    pub pg_url: String,
    /// Target database (default: the one in --pg-url).
    #[arg(long)]
    pub dbname: Option<String>,
    /// Create the target database first when it does not exist (needs --dbname).
    #[arg(long)]
    pub create: bool,
    /// Restore as the connecting role (pg_restore --no-owner).
    #[arg(long)]
    pub no_owner: bool,
    /// Directory of pg_restore (default: newest /usr/lib/postgresql/*/bin, else PATH).
    #[arg(long)]
    pub pg_bin_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RestoreFilesArgs {
    #[command(flatten)]
    pub repo: RepoArg,
    /// Backup id, or `latest` (the newest files backup; of --set when given).
    #[arg(long)]
    pub backup: String,
    /// With `latest`: the file set whose newest backup to restore.
    #[arg(long)]
    pub set: Option<String>,
    /// Directory the stored paths are written below (`/` puts them back in place).
    #[arg(long)]
    pub target: PathBuf,
    /// Write nothing; print what would be created, replaced or left unchanged.
    #[arg(long)]
    pub dry_run: bool,
    /// Replace existing files that differ (without it the restore refuses, naming them).
    #[arg(long)]
    pub overwrite: bool,
    /// Restore only stored paths matching these globs (repeatable).
    #[arg(long)]
    pub include: Vec<String>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum RepoCmd {
    /// Create the key file (0600) if absent and initialise the repository.
    Init {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Delete chunks no backup references and older than the grace period.
    Prune {
        #[command(flatten)]
        repo: RepoArg,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
        #[arg(long)]
        dry_run: bool,
        /// Keep every archived WAL file (default: delete WAL below the oldest physical
        /// backup's start segment, which no backup can use).
        #[arg(long)]
        keep_wal: bool,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct WalPushArgs {
    /// Path of the WAL file (`%p`).
    pub path: PathBuf,
    /// Read-ahead (fs locations, needs spool_dir): after this segment, a detached pusher
    /// stores the next N `.ready` segments, so PostgreSQL's later calls for them only verify
    /// (hash) and return. 0: off.
    #[arg(long, default_value_t = 0)]
    pub push_ahead: usize,
    #[command(flatten)]
    pub repo: RepoArg,
}

#[derive(Debug, Clone, clap::Args)]
pub struct WalFetchArgs {
    /// WAL file name (`%f`).
    pub file_name: String,
    /// Destination path (`%p`).
    pub dest: PathBuf,
    #[command(flatten)]
    pub repo: RepoArg,
}

fn load(arg: &RepoArg) -> anyhow::Result<RepoConfig> {
    let env: HashMap<String, String> = std::env::vars().collect();
    RepoConfig::load(&arg.repo_config, &env).context("load repository config")
}

async fn open(arg: &RepoArg) -> anyhow::Result<Repository> {
    let cfg = load(arg)?;
    Repository::open(&cfg)
        .await
        .with_context(|| format!("open backup repository {}", cfg.location.describe()))
}

/// Cancel on Ctrl-C / SIGTERM; the work checks the token between steps.
fn cancel_on_signal() -> CancellationToken {
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = term => {}
        }
        info!("signal received, cancelling");
        c.cancel();
    });
    cancel
}

/// wal-fetch's exit status for an error outside a standby (see the module docs).
pub const WAL_FETCH_ERROR_EXIT: u8 = 200;

/// The exit status of a failed wal-fetch: 1 in a standby's data directory (PostgreSQL retries
/// there), [`WAL_FETCH_ERROR_EXIT`] otherwise (PostgreSQL stops recovery instead of ending it).
fn wal_fetch_error_code() -> ExitCode {
    if std::path::Path::new("standby.signal").exists() {
        ExitCode::FAILURE
    } else {
        ExitCode::from(WAL_FETCH_ERROR_EXIT)
    }
}

/// Entry point for `main.rs`: logging to stderr, a runtime, the command, an exit code.
/// wal-push/wal-fetch run once per WAL file from PostgreSQL, so they log warnings only
/// (override with RUST_LOG).
pub fn main(cmd: Command) -> ExitCode {
    let quiet = matches!(cmd, Command::WalPush(_) | Command::WalFetch(_));
    let fetch = matches!(cmd, Command::WalFetch(_));
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if quiet { "warn" } else { "info,sqlx=warn" })
    });
    // Ignore a second init (tests may call this in-process).
    let _ignored = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    // The per-segment WAL commands' fast paths run before any runtime exists.
    if let Some(code) = wal_fast_path(&cmd) {
        return code;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dr-agent: start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dr-agent: {e:#}");
            if fetch {
                wal_fetch_error_code()
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `wal-push` to an fs location, and a `wal-fetch` served from the spool, without an async
/// runtime (PostgreSQL starts one process per segment; see `wal_push` and `wal_fetch` docs).
/// None: take the general path.
fn wal_fast_path(cmd: &Command) -> Option<ExitCode> {
    let fail = |e: anyhow::Error| {
        eprintln!("dr-agent: {e:#}");
        Some(ExitCode::FAILURE)
    };
    match cmd {
        Command::WalPush(a) => {
            let cfg = match load(&a.repo) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            if !matches!(cfg.location, Location::Fs { .. }) {
                return None;
            }
            let pushed = if a.push_ahead > 0 {
                wal_push_fs_ahead(&cfg, &a.path, a.push_ahead)
            } else {
                wal_push_fs(&cfg, &a.path)
            };
            match pushed {
                Ok(_) => Some(ExitCode::SUCCESS),
                Err(e) => {
                    fail(anyhow::Error::new(e).context(format!("archive {}", a.path.display())))
                }
            }
        }
        Command::WalFetch(a) => {
            let fail = |e: anyhow::Error| {
                eprintln!("dr-agent: {e:#}");
                Some(wal_fetch_error_code())
            };
            let cfg = match load(&a.repo) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            match wal_fetch_spooled(&cfg, &a.file_name, &a.dest) {
                Ok(true) => Some(ExitCode::SUCCESS),
                Ok(false) => None,
                Err(e) => {
                    fail(anyhow::Error::new(e).context(format!("fetch WAL file {}", a.file_name)))
                }
            }
        }
        _ => None,
    }
}

/// Execute one backup command.
pub async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Repo(RepoCmd::Init { repo }) => {
            let cfg = load(&repo)?;
            Repository::init(&cfg)
                .await
                .with_context(|| format!("initialise repository {}", cfg.location.describe()))?;
            println!(
                "repository ready at {}; key file {} (keep an offline copy: without it nothing can be restored)",
                cfg.location.describe(),
                cfg.key_file.display()
            );
        }
        Command::Repo(RepoCmd::Prune {
            repo,
            grace,
            dry_run,
            keep_wal,
        }) => {
            let r = open(&repo).await?;
            let rep = super::prune::prune(&r, grace, dry_run)
                .await
                .context("prune repository")?;
            let wal = if keep_wal {
                super::prune::WalPruneReport::default()
            } else {
                super::prune::prune_wal(&r, dry_run)
                    .await
                    .context("prune archived WAL")?
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"chunks": rep, "wal": wal}))?
            );
        }
        Command::Backup(BackupCmd::Run(a)) => {
            let RunArgs {
                repo,
                pg_url,
                data_dir,
                kind,
                spread_checkpoint,
                dbname,
                pg_bin_dir,
                name,
                paths,
                exclude,
                include,
            } = *a;
            let r = open(&repo).await?;
            let cancel = cancel_on_signal();
            let done = AtomicU64::new(0);
            let m = match kind {
                BackupKind::Full | BackupKind::Incr => {
                    let (Some(pg_url), Some(data_dir)) = (pg_url, data_dir) else {
                        anyhow::bail!("--type {kind} needs --pg-url and --data-dir");
                    };
                    let opts = BackupOptions {
                        pg_url,
                        data_dir,
                        kind,
                        fast_checkpoint: !spread_checkpoint,
                    };
                    run_backup(&r, &opts, &cancel).await.context("run backup")?
                }
                BackupKind::Logical => {
                    let Some(pg_url) = pg_url else {
                        anyhow::bail!("--type logical needs --pg-url");
                    };
                    let opts = DumpOptions {
                        pg_url,
                        dbname,
                        pg_bin_dir,
                    };
                    run_dump(&r, &opts, &done, &cancel)
                        .await
                        .context("logical backup (nothing was recorded)")?
                }
                BackupKind::Files => {
                    if paths.is_empty() {
                        anyhow::bail!("--type files needs at least one --path");
                    }
                    let opts = FileSetOptions {
                        name,
                        paths,
                        exclude,
                        include,
                    };
                    let total = AtomicU64::new(0);
                    run_files(&r, &opts, &done, &total, &cancel)
                        .await
                        .context("file set backup (nothing was recorded)")?
                }
            };
            println!("{}", m.id);
        }
        Command::RestoreLogical(a) => {
            let a = *a;
            let r = open(&a.repo).await?;
            let id = resolve_kind(&r, &a.backup, BackupKind::Logical, a.source_db.as_deref())
                .await
                .context("find the backup")?;
            let cancel = cancel_on_signal();
            let opts = RestoreLogicalOptions {
                pg_url: a.pg_url,
                dbname: a.dbname,
                create: a.create,
                no_owner: a.no_owner,
                pg_bin_dir: a.pg_bin_dir,
            };
            let done = AtomicU64::new(0);
            let (db, bytes) = restore_dump(&r, &id, &opts, &done, &cancel)
                .await
                .context("logical restore")?;
            println!("restored {id} into database {db} ({bytes} dump bytes)");
        }
        Command::RestoreFiles(a) => {
            let a = *a;
            let r = open(&a.repo).await?;
            let id = resolve_kind(&r, &a.backup, BackupKind::Files, a.set.as_deref())
                .await
                .context("find the backup")?;
            let cancel = cancel_on_signal();
            let opts = FileRestoreOptions {
                dry_run: a.dry_run,
                overwrite: a.overwrite,
                include: a.include,
            };
            let done = AtomicU64::new(0);
            let rep = restore_files(&r, &id, &a.target, &opts, &done, &cancel)
                .await
                .context("file restore")?;
            match a.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rep)?),
                Output::Text => {
                    for p in &rep.plan {
                        println!("{} {} {}", p.action, p.path.display(), p.size);
                    }
                    println!(
                        "{}{} file(s) ({} bytes), {} unchanged",
                        if rep.dry_run {
                            "dry run, would write "
                        } else {
                            "wrote "
                        },
                        rep.written,
                        rep.bytes,
                        rep.unchanged
                    );
                }
            }
        }
        Command::Backup(BackupCmd::List { repo, output }) => {
            let r = open(&repo).await?;
            let ms = r.list_manifests().await.context("list backups")?;
            match output {
                Output::Json => {
                    let rows: Vec<serde_json::Value> = ms
                        .iter()
                        .map(|m| {
                            serde_json::json!({
                                "id": m.id, "kind": m.kind, "parent": m.parent,
                                "started_at": m.started_at, "finished_at": m.finished_at,
                                "start_lsn": m.start_lsn.to_string(), "stop_lsn": m.stop_lsn.to_string(),
                                "timeline": m.timeline, "stats": m.stats,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                }
                Output::Text => {
                    println!(
                        "{:<30} {:<5} {:>12} {:>12} {:>4} {:>14} {:>14}",
                        "ID", "KIND", "START LSN", "STOP LSN", "TL", "DB BYTES", "ADDED BYTES"
                    );
                    for m in &ms {
                        println!(
                            "{:<30} {:<5} {:>12} {:>12} {:>4} {:>14} {:>14}",
                            m.id.0,
                            m.kind.to_string(),
                            m.start_lsn.to_string(),
                            m.stop_lsn.to_string(),
                            m.timeline,
                            m.stats.bytes_total,
                            m.stats.bytes_added
                        );
                    }
                }
            }
        }
        Command::Backup(BackupCmd::Verify {
            repo,
            id,
            all,
            output,
        }) => {
            let r = open(&repo).await?;
            let ids: Vec<BackupId> = if all {
                r.list_backups().await?
            } else {
                vec![r.resolve(id.as_deref().unwrap_or("latest")).await?]
            };
            let rep = verify(&r, &ids, all).await.context("verify")?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rep)?),
                Output::Text => {
                    for p in &rep.problems {
                        println!("{} {} ({})", p.status, p.object, p.reason);
                    }
                    println!(
                        "{} objects checked in {} backup(s), {} problem(s)",
                        rep.objects_checked,
                        rep.backups.len(),
                        rep.problems.len()
                    );
                }
            }
            if !rep.is_ok() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Restore(a) => {
            let (target_type, target_value) = match (&a.to_time, &a.to_lsn, &a.to_xid, &a.to_name) {
                (Some(t), _, _, _) => ("time", t.clone()),
                (_, Some(l), _, _) => ("lsn", l.clone()),
                (_, _, Some(x), _) => ("xid", x.clone()),
                (_, _, _, Some(n)) => ("name", n.clone()),
                _ if a.immediate => ("immediate", String::new()),
                _ => ("latest", String::new()),
            };
            let req = crate::restore_verbs::StandaloneRestore {
                repo_config: a.repo.repo_config.clone(),
                backup: a.backup.clone(),
                target: a.target.clone(),
                no_recovery: a.no_recovery,
                target_type: target_type.to_owned(),
                target_value,
                target_action: a.target_action.clone(),
                timeline: a.timeline.clone(),
                port: a.port,
                socket_dir: a.socket_dir.clone(),
                keep_archive: a.keep_archive,
                start: a.start,
            };
            for line in crate::restore_verbs::standalone(req, cancel_on_signal()).await? {
                println!("{line}");
            }
        }
        Command::WalPush(a) => {
            let r = open(&a.repo).await?;
            // Errors are printed once, by `main`; PostgreSQL logs our stderr.
            match wal_push(&r, &a.path)
                .await
                .with_context(|| format!("archive {}", a.path.display()))?
            {
                PushOutcome::Stored | PushOutcome::AlreadyArchived => {}
            }
        }
        Command::WalFetch(a) => {
            let r = open(&a.repo).await?;
            let found = wal_fetch(&r, &a.file_name, &a.dest)
                .await
                .with_context(|| format!("fetch WAL file {}", a.file_name))?;
            if !found {
                // PostgreSQL asks past the end of the archive as a matter of course: quiet.
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
