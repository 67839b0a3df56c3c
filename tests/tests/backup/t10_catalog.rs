//! The backup catalog end to end: policy apply, full and incremental backups of a real
//! PostgreSQL 15 (with `dr-agent wal-push` as archive_command) recorded in the coordinators'
//! catalog, `drctl backup list/verify`, a corrupt and a missing chunk named by verify, failed
//! backups that leave no catalog entry, and a copy across jurisdictions refused before any byte
//! moves.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail, ensure};
use dr_tests::TestCluster;
use dr_tests::harness::backup::{
    apply_policy, archiving_postgres, catalog_rows, fs_repo_config, full_backup, init_repo,
    last_doc, run_backup, run_ok, text,
};
use dr_tests::harness::cluster::{AgentSpec, get_str, get_u64};
use dr_tests::harness::postgres::pg_bin_dir;
use serde_json::Value;
use tokio::process::Command;
use tracing::info;

const HOST: &str = "db-bj-1";

/// Every regular file under `dir`, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_incr_list_verify_corrupt_and_refusals() -> Result<()> {
    let cluster = TestCluster::builder()
        .coordinators(3)
        .agent(AgentSpec::new(HOST).roles(&["db"]))
        .start()
        .await?;
    let agent = cluster.bins.agent.clone();
    let bk = cluster.dir().join("backup");
    std::fs::create_dir_all(&bk)?;
    let repo_cfg = fs_repo_config(&bk, "repo", &bk.join("repo"))?;
    let overseas_cfg = fs_repo_config(&bk, "overseas", &bk.join("overseas"))?;

    info!("--- PostgreSQL 15 primary, archive_command = dr-agent wal-push");
    let mut pg = archiving_postgres(cluster.dir(), &agent, &repo_cfg).await?;

    info!("--- dr-agent repo init; the repository belongs to postgres (archive_command)");
    init_repo(&agent, &overseas_cfg, &bk).await?;
    init_repo(&agent, &repo_cfg, &bk).await?;

    info!("--- backup policy apply");
    let missing_cfg = bk.join("does-not-exist.toml");
    let pg_url = pg.url("postgres");
    let data_dir = pg.data_dir.display().to_string();
    apply_policy(
        &cluster,
        &bk,
        &format!(
            r#"version = 1
timezone = "Asia/Shanghai"
allowed_transfers = []

[[databases]]
name = "yeslocker"
host = "{HOST}"
pg_url = "{pg_url}"
data_dir = "{data_dir}"
location = "primary"

[[databases]]
name = "misconfigured"
host = "{HOST}"
pg_url = "{pg_url}"
data_dir = "{data_dir}"
location = "nowhere"

[[locations]]
name = "primary"
tier = "primary"
jurisdiction = "cn"
repo_config = "{}"
prune_host = "{HOST}"
prune_repo_config = "{}"

[[locations]]
name = "nowhere"
tier = "nas"
jurisdiction = "cn"
repo_config = "{}"

[[locations]]
name = "overseas"
tier = "offsite"
jurisdiction = "sg"
repo_config = "{}"
copier_host = "{HOST}"
"#,
            repo_cfg.display(),
            repo_cfg.display(),
            missing_cfg.display(),
            overseas_cfg.display()
        ),
    )
    .await?;
    info!("policy applied");

    info!("--- full backup");
    let full = full_backup(&cluster).await?;
    let full = last_doc(full);
    let full_id = get_str(&full, "id")
        .context("full backup has an id")?
        .to_owned();

    info!("--- pgbench writes, then incremental");
    let port = pg.port.to_string();
    run_ok(
        Command::new(pg_bin_dir().join("pgbench"))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(["-i", "-s", "1", "-q", "postgres"]),
        "pgbench -i -s 1",
    )
    .await?;
    let incr = run_backup(&cluster, "yeslocker", "incr").await?;
    let incr = last_doc(incr);
    let incr_id = get_str(&incr, "id")
        .context("incr backup has an id")?
        .to_owned();
    ensure!(full_id != incr_id, "two backups, two ids");

    info!("--- backup list shows both with LSN ranges and sizes");
    let list = catalog_rows(&cluster.drctl_json(["backup", "list"]).await?);
    ensure!(list.len() == 2, "two catalog entries: {list:?}");
    for (b, id, kind) in [(&list[0], &full_id, "full"), (&list[1], &incr_id, "incr")] {
        ensure!(get_str(b, "id") == Some(id.as_str()), "{b}");
        ensure!(get_str(b, "kind") == Some(kind), "{b}");
        ensure!(get_str(b, "db") == Some("yeslocker"), "{b}");
        let start = get_str(b, "start_lsn").unwrap_or_default();
        let stop = get_str(b, "stop_lsn").unwrap_or_default();
        ensure!(
            start.contains('/') && stop.contains('/'),
            "LSN range of {id}: {b}"
        );
        ensure!(
            get_u64(b, "bytes_total").unwrap_or(0) > 0,
            "size of {id}: {b}"
        );
        ensure!(b.to_string().contains("primary"), "location of {id}: {b}");
    }
    ensure!(
        get_str(&list[1], "parent") == Some(full_id.as_str()),
        "the incremental's parent is the full: {}",
        list[1]
    );
    ensure!(
        get_u64(&list[1], "bytes_added").unwrap_or(u64::MAX)
            < get_u64(&list[0], "bytes_added").unwrap_or(0),
        "the incremental adds less than the full: {list:?}"
    );

    let wal = files_under(&bk.join("repo").join("wal"));
    ensure!(
        !wal.is_empty(),
        "archive_command (dr-agent wal-push) archived no WAL"
    );

    info!("--- verify --all passes");
    let out = cluster.drctl(["backup", "verify", "--all"]).await?;
    ensure!(out.status.success(), "verify --all: {}", text(&out));

    info!("--- a copy to another jurisdiction is refused before any byte moves");
    let out = cluster
        .drctl(["backup", "copy", &full_id, "--to", "overseas"])
        .await?;
    ensure!(
        !out.status.success(),
        "copy to sg must be refused: {}",
        text(&out)
    );
    let msg = text(&out);
    ensure!(msg.contains("jurisdiction"), "{msg}");
    info!(%msg, "copy to another jurisdiction");
    let moved: Vec<PathBuf> = files_under(&bk.join("overseas"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "config"))
        .collect();
    ensure!(moved.is_empty(), "bytes moved to overseas: {moved:?}");

    info!("--- a backup with a missing repository config fails and leaves no entry");
    let out = cluster
        .drctl([
            "backup",
            "run",
            "--db",
            "misconfigured",
            "--type",
            "full",
            "--wait",
        ])
        .await?;
    let msg = text(&out);
    ensure!(out.status.code() == Some(1), "exit 1 expected: {msg}");
    ensure!(
        msg.contains("does-not-exist.toml"),
        "names the config: {msg}"
    );
    let list = catalog_rows(&cluster.drctl_json(["backup", "list"]).await?);
    ensure!(list.len() == 2, "no entry for a failed backup: {list:?}");

    info!("--- one chunk corrupted and another deleted: verify fails naming both");
    let chunks = files_under(&bk.join("repo").join("data"));
    ensure!(chunks.len() >= 2, "chunks: {chunks:?}");
    let (bad, gone) = (&chunks[0], &chunks[1]);
    let mut bytes = std::fs::read(bad)?;
    let n = bytes.len() / 2;
    bytes[n] ^= 0x40;
    std::fs::write(bad, bytes)?;
    std::fs::remove_file(gone)?;
    let out = cluster.drctl(["backup", "verify", "--all"]).await?;
    let msg = text(&out);
    ensure!(out.status.code() == Some(1), "verify must exit 1: {msg}");
    info!(%msg, "verify after corrupting one chunk and deleting another");
    for (p, status) in [(bad, "corrupt"), (gone, "missing")] {
        let name = p
            .file_name()
            .context("chunk name")?
            .to_string_lossy()
            .into_owned();
        ensure!(
            msg.lines().any(|l| l.contains(&name) && l.contains(status)),
            "verify names {status} {name}: {msg}"
        );
    }

    info!("--- PostgreSQL stopped: the backup fails with a clear message, no entry");
    pg.stop().await?;
    let out = cluster
        .drctl([
            "backup",
            "run",
            "--db",
            "yeslocker",
            "--type",
            "full",
            "--wait",
        ])
        .await?;
    let msg = text(&out);
    ensure!(out.status.code() == Some(1), "exit 1 expected: {msg}");
    info!(%msg, "backup with PostgreSQL down");
    let list = catalog_rows(&cluster.drctl_json(["backup", "list"]).await?);
    if list.len() != 2 {
        bail!("no entry for a failed backup: {list:?}");
    }

    info!("--- deleting backups (prune kind) waits for a second admin");
    cluster
        .drctl_json(["approvals", "policy", "set", "--require", "prune"])
        .await?;
    let out = cluster
        .drctl(["backup", "delete", &full_id, &incr_id])
        .await?;
    let msg = text(&out);
    ensure!(
        !out.status.success() && msg.contains("without a physical backup"),
        "deleting every physical backup must be refused: {msg}"
    );
    let out = cluster
        .drctl(["backup", "delete", &full_id, "--reason", "t10"])
        .await?;
    let msg = text(&out);
    ensure!(
        !out.status.success() && msg.contains("needs approval"),
        "a gated delete must wait: {msg}"
    );
    let request = msg
        .split_whitespace()
        .find(|w| w.starts_with("R-"))
        .map(|w| w.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-'))
        .context("no request id in the answer")?
        .to_owned();
    let unmarked = |b: &Value| {
        b.to_string().contains("\"marked_for_delete_at_unix_ms\":0")
            || !b.to_string().contains("marked_for_delete_at_unix_ms")
    };
    let b = cluster.drctl_json(["backup", "show", &full_id]).await?;
    ensure!(unmarked(&b), "not marked before approval: {b}");
    let endpoints: Vec<String> = cluster
        .coord_ids()
        .into_iter()
        .map(|id| cluster.coord_listen(id).map(|a| a.to_string()))
        .collect::<Result<_>>()?;
    let bob = cluster.pki.operator("bob", "admin").await?;
    let bob = cluster.write_drctl_config("bob", &endpoints, &bob)?;
    let out = cluster
        .drctl_with(&bob, ["approve", &request, "--output", "json"])
        .await?;
    ensure!(out.status.success(), "approve {request}: {}", text(&out));
    let b = cluster.drctl_json(["backup", "show", &full_id]).await?;
    ensure!(!unmarked(&b), "marked after the second admin approved: {b}");
    let list = catalog_rows(&cluster.drctl_json(["backup", "list"]).await?);
    ensure!(
        list.len() == 2,
        "still listed (and restorable) until the grace passes: {list:?}"
    );

    drop(pg);
    cluster.shutdown().await
}
