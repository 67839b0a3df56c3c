//! Two-person approvals end to end: policy, a gated failover, refusals, approval, exactly once.
//!
//! A failover can be requested without PostgreSQL (as in the failover suite's t10): the
//! plan needs only the committed topology and connected agents. What is checked is that no
//! operation exists (and the epoch stays) until a second admin approves, and that exactly
//! one exists afterwards, created by the requester.

use std::path::Path;

use anyhow::{Context as _, Result};
use dr_tests::TestCluster;
use dr_tests::harness::cluster::{AgentSpec, json_list};
use serde_json::Value;
use tracing::info;

fn example() -> String {
    format!(
        "{}/../deploy/examples/yeslocker/topology.toml",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs drctl with `cfg`, expects failure, returns stderr.
async fn refused(cluster: &TestCluster, cfg: &Path, args: &[&str]) -> Result<String> {
    let out = cluster.drctl_with(cfg, args).await?;
    assert!(
        !out.status.success(),
        "{args:?} should have been refused: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(stderr(&out))
}

async fn json_with(cluster: &TestCluster, cfg: &Path, args: &[&str]) -> Result<Value> {
    let mut a: Vec<&str> = args.to_vec();
    a.extend(["--output", "json"]);
    let out = cluster.drctl_with(cfg, &a).await?;
    anyhow::ensure!(out.status.success(), "{a:?} failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).with_context(|| format!("{a:?} printed no JSON"))
}

async fn operations(cluster: &TestCluster) -> Result<Vec<Value>> {
    let v = cluster.drctl_json(["operations", "list"]).await?;
    Ok(json_list(&v, "operations"))
}

async fn epoch(cluster: &TestCluster) -> Result<u64> {
    let t = cluster.drctl_json(["topology", "show"]).await?;
    Ok(json_list(&t, "clusters")[0]["epoch"].as_u64().unwrap_or(0))
}

/// The request id (`R-N`) named in a "needs approval" answer.
fn request_id(err: &str) -> String {
    let start = err.find("request R-").expect("a request id") + "request ".len();
    err[start..]
        .chars()
        .take_while(|c| *c == 'R' || *c == '-' || c.is_ascii_digit())
        .collect()
}

#[tokio::test]
async fn failover_waits_for_a_second_admin() -> Result<()> {
    let cluster = TestCluster::builder()
        .coordinators(3)
        .agent(AgentSpec::new("bj-db-1").region("beijing").roles(&["db"]))
        .agent(AgentSpec::new("sh-db-1").region("shanghai").roles(&["db"]))
        .start()
        .await?;
    let endpoints: Vec<String> = cluster
        .coord_ids()
        .into_iter()
        .map(|id| cluster.coord_listen(id).map(|a| a.to_string()))
        .collect::<Result<_>>()?;
    let bob = cluster.pki.operator("bob", "admin").await?;
    let bob = cluster.write_drctl_config("bob", &endpoints, &bob)?;
    let olga = cluster.pki.operator("olga", "operator").await?;
    let olga = cluster.write_drctl_config("olga", &endpoints, &olga)?;
    let admin = cluster.admin_drctl_config();
    cluster.drctl_json(["apply", "-f", &example()]).await?;
    let epoch0 = epoch(&cluster).await?;

    info!("--- the default policy gates nothing; an operator cannot change it");
    let p = cluster.drctl_json(["approvals", "policy", "show"]).await?;
    assert!(json_list(&p, "require").is_empty(), "{p}");
    let err = refused(
        &cluster,
        &olga,
        &["approvals", "policy", "set", "--require", "failover"],
    )
    .await?;
    assert!(err.contains("admin"), "{err}");
    let err = refused(
        &cluster,
        &admin,
        &["approvals", "policy", "set", "--require", "failovr"],
    )
    .await?;
    assert!(err.contains("unknown operation kind `failovr`"), "{err}");

    info!("--- an expired request cannot be approved");
    let p = cluster
        .drctl_json([
            "approvals",
            "policy",
            "set",
            "--require",
            "failover",
            "--ttl",
            "2s",
        ])
        .await?;
    assert_eq!(
        json_list(&p, "require"),
        vec![Value::from("failover")],
        "{p}"
    );
    let err = refused(&cluster, &admin, &["failover", "--to", "shanghai"]).await?;
    assert!(err.contains("needs approval: request R-"), "{err}");
    let expired = request_id(&err);
    tokio::time::sleep(std::time::Duration::from_millis(3_000)).await;
    let err = refused(&cluster, &bob, &["approve", &expired]).await?;
    assert!(err.contains("expired"), "{err}");
    let list = json_with(&cluster, &bob, &["approvals", "list"]).await?;
    let shown = json_list(&list, "approvals");
    assert_eq!(shown[0]["state"], "expired", "{list}");
    assert!(
        operations(&cluster).await?.is_empty(),
        "an expired request ran"
    );

    info!("--- a gated failover does not start; the requester cannot approve it");
    cluster
        .drctl_json([
            "approvals",
            "policy",
            "set",
            "--require",
            "failover,prune",
            "--ttl",
            "1h",
        ])
        .await?;
    let err = refused(&cluster, &admin, &["failover", "--to", "shanghai"]).await?;
    assert!(err.contains("needs approval"), "{err}");
    let id = request_id(&err);
    assert!(
        err.contains(&format!("another admin runs `drctl approve {id}`")),
        "{err}"
    );
    assert!(
        operations(&cluster).await?.is_empty(),
        "failover started without approval"
    );
    assert_eq!(epoch(&cluster).await?, epoch0);
    let err = refused(&cluster, &admin, &["approve", &id]).await?;
    assert!(err.contains("yourself"), "{err}");
    let err = refused(&cluster, &olga, &["approve", &id]).await?;
    assert!(err.contains("only an admin"), "{err}");
    // Dry runs are never gated: nothing is committed by them.
    cluster
        .drctl_json(["failover", "--to", "shanghai", "--dry-run"])
        .await?;
    assert!(operations(&cluster).await?.is_empty());
    let shown = json_with(&cluster, &olga, &["approvals", "show", &id]).await?;
    assert_eq!(shown["state"], "pending", "{shown}");
    assert!(
        shown["payload_json"].as_str().unwrap().contains("shanghai"),
        "{shown}"
    );

    info!("--- a second admin approves: the failover starts, as the requester, once");
    let v = json_with(&cluster, &bob, &["approve", &id, "--reason", "checked"]).await?;
    assert_eq!(v["state"], "approved", "{v}");
    assert!(v["decided_by"].as_str().unwrap().contains("bob"), "{v}");
    let ops = operations(&cluster).await?;
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert!(
        ops[0]["created_by"]
            .as_str()
            .unwrap()
            .contains("/operator/admin"),
        "runs as the requester: {ops:?}"
    );
    assert_eq!(ops[0]["to_region"], "shanghai", "{ops:?}");
    let err = refused(&cluster, &bob, &["approve", &id]).await?;
    assert!(err.contains("already approved"), "{err}");
    assert_eq!(
        operations(&cluster).await?.len(),
        1,
        "approved twice, ran twice"
    );

    info!("--- every step is in the audit log, refusals included");
    let a = cluster
        .drctl_json(["audit", "list", "--limit", "1000"])
        .await?;
    let entries = json_list(&a, "entries");
    let has = |what: &str, result: &str| {
        entries.iter().any(|e| {
            e["what"] == what && e["result"].as_str().is_some_and(|r| r.starts_with(result))
        })
    };
    assert!(has("approvals.set_policy", "applied"), "{a}");
    assert!(has("approvals.request", "pending: "), "{a}");
    assert!(
        has(
            "approvals.approve",
            "refused: invalid request: you requested"
        ),
        "{a}"
    );
    assert!(
        has(
            "approvals.approve",
            "refused: invalid request: approval request"
        ),
        "{a}"
    );
    assert!(
        has("approvals.approve", "approved; launched create_operation"),
        "{a}"
    );
    assert!(has("create_operation", "applied"), "{a}");
    let v = cluster.drctl_json(["audit", "verify"]).await?;
    assert_eq!(v["ok"], true, "{v}");
    cluster.shutdown().await
}
