//! The hash-chained audit log end to end: list, export, verify online and offline, and
//! tampering with an export (edit, delete, swap, rewrite) detected and named.
//!
//! Not covered here: tampering with a coordinator's on-disk archive, because entries reach
//! the archive only after 10 000 are in the state; the archive uses the export's format and
//! the same verifier (unit tests in `state::audit` cover the chain across trim).

use anyhow::{Context as _, Result};
use dr_proto::audit_chain::{AuditEntry, entry_hash};
use dr_tests::TestCluster;
use dr_tests::harness::cluster::{cli, json_list};
use serde_json::Value;
use tracing::info;

fn read_export(path: &std::path::Path) -> Result<Vec<AuditEntry>> {
    let text = std::fs::read_to_string(path).context("read export")?;
    text.lines()
        .map(|l| serde_json::from_str(l).context("export line"))
        .collect()
}

fn write_export(path: &std::path::Path, entries: &[AuditEntry]) -> Result<()> {
    let mut s = String::new();
    for e in entries {
        s.push_str(&serde_json::to_string(e)?);
        s.push('\n');
    }
    std::fs::write(path, s).context("write export")
}

/// `drctl audit verify --file F`: (success, stdout).
async fn verify_file(
    cluster: &TestCluster,
    path: &std::path::Path,
    extra: &[&str],
) -> Result<(bool, String)> {
    let mut args = vec!["audit", "verify", "--file", path.to_str().unwrap()];
    args.extend(extra);
    let out = cluster.drctl(&args).await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

#[tokio::test]
async fn tampering_is_detected_and_named() -> Result<()> {
    let cluster = TestCluster::builder()
        .coordinators(3)
        .agents(["h1"])
        .start()
        .await?;

    info!("--- some history: actions on an agent, a policy change");
    for _ in 0..3 {
        let out = cluster.drctl(cli::run_checks("h1")).await?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    cluster
        .drctl_json(["approvals", "policy", "set", "--require", "isolate"])
        .await?;

    info!("--- list shows who, what, when, target, result; filters apply");
    let v = cluster.drctl_json(["audit", "list"]).await?;
    let entries = json_list(&v, "entries");
    assert!(entries.len() >= 8, "{v}");
    let issued = entries
        .iter()
        .find(|e| e["what"] == "issue_commands")
        .expect("an issue_commands entry");
    assert!(
        issued["target"]
            .as_str()
            .unwrap()
            .contains("@h1 run_checks"),
        "the verb and host are recorded: {issued}"
    );
    assert!(
        issued["origin"]
            .as_str()
            .unwrap()
            .contains("/operator/admin")
    );
    assert!(
        entries
            .iter()
            .any(|e| e["what"] == "command_completed" && e["result"] == "applied: success"),
        "{v}"
    );
    let v = cluster
        .drctl_json(["audit", "list", "--actor", "agent/h1", "--limit", "2"])
        .await?;
    let some = json_list(&v, "entries");
    assert!(!some.is_empty() && some.len() <= 2, "{v}");
    assert!(
        some.iter()
            .all(|e| e["origin"].as_str().unwrap().contains("agent/h1")),
        "{v}"
    );
    let v = cluster
        .drctl_json(["audit", "list", "--since", "2999-01-01T00:00:00Z"])
        .await?;
    assert!(json_list(&v, "entries").is_empty(), "{v}");

    info!("--- the chain the coordinators hold verifies; one anchor matches on every node");
    let v = cluster.drctl_json_at(1, ["audit", "verify"]).await?;
    assert_eq!(v["ok"], true, "{v}");
    let anchor = format!(
        "{}:{}",
        v["head_seq"].as_u64().unwrap(),
        v["head_hash"].as_str().unwrap()
    );
    for id in cluster.coord_ids() {
        // Followers may lag by a few entries: retry briefly.
        let mut ok = false;
        for _ in 0..20 {
            let out = cluster
                .drctl_at(id, ["audit", "verify", "--anchor", &anchor])
                .await?;
            if out.status.success() {
                ok = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        assert!(ok, "coordinator {id} does not hold anchor {anchor}");
    }

    info!("--- an export verifies offline");
    let dir = cluster.dir().path().to_path_buf();
    let export = dir.join("audit.jsonl");
    let out = cluster
        .drctl(["audit", "export", "--out", export.to_str().unwrap()])
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let good = read_export(&export)?;
    assert!(good.len() >= 10, "{}", good.len());
    assert_eq!(good[0].seq, 1);
    let (ok, text) = verify_file(&cluster, &export, &[]).await?;
    assert!(ok, "{text}");
    assert!(text.contains("audit chain OK"), "{text}");

    info!("--- edit one, delete one, swap two: each is named, verify fails");
    let mut bad = good.clone();
    let edited = bad[3].seq;
    bad[3].result = "applied".into();
    bad[3].target = "nothing to see".into();
    let removed = bad[6].seq;
    bad.remove(6);
    // After the removal, positions 8 and 9 hold seq removed+2 and removed+3.
    let (sa, sb) = (bad[8].seq, bad[9].seq);
    bad.swap(8, 9);
    let tampered = dir.join("tampered.jsonl");
    write_export(&tampered, &bad)?;
    let (ok, text) = verify_file(&cluster, &tampered, &[]).await?;
    assert!(!ok, "tampering not detected: {text}");
    assert!(text.contains("audit chain FAILED: 3 problem(s)"), "{text}");
    assert!(
        text.contains(&format!("entry seq {edited} (position 4) was EDITED")),
        "{text}"
    );
    assert!(
        text.contains(&format!("entry seq {removed} was REMOVED")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "entry seq {sa} (position 10) was REORDERED: it comes after entry seq {sb}"
        )),
        "{text}"
    );

    info!("--- each alone is detected too");
    for (name, mutate) in [
        (
            "edit",
            Box::new(|v: &mut Vec<AuditEntry>| {
                v[2].origin = "spiffe://x/operator/eve?role=admin".into()
            }) as Box<dyn Fn(&mut Vec<AuditEntry>)>,
        ),
        (
            "delete",
            Box::new(|v: &mut Vec<AuditEntry>| {
                v.remove(4);
            }),
        ),
        ("swap", Box::new(|v: &mut Vec<AuditEntry>| v.swap(1, 2))),
        (
            "delete-first",
            Box::new(|v: &mut Vec<AuditEntry>| {
                v.remove(0);
            }),
        ),
    ] {
        let mut v = good.clone();
        mutate(&mut v);
        let f = dir.join(format!("{name}.jsonl"));
        write_export(&f, &v)?;
        let (ok, text) = verify_file(&cluster, &f, &[]).await?;
        assert!(!ok, "{name} not detected: {text}");
    }

    info!("--- a rewritten, re-hashed tail verifies alone, but not against the anchor");
    let mut forged = good.clone();
    forged[2].result = "refused: forged".into();
    for i in 2..forged.len() {
        forged[i].prev_hash = forged[i - 1].hash.clone();
        forged[i].hash = entry_hash(&forged[i]);
    }
    let f = dir.join("forged.jsonl");
    write_export(&f, &forged)?;
    let (ok, text) = verify_file(&cluster, &f, &[]).await?;
    assert!(
        ok,
        "a consistent rewrite cannot be told apart without an anchor: {text}"
    );
    let last = good.last().unwrap();
    let real_anchor = format!("{}:{}", last.seq, last.hash);
    let (ok, text) = verify_file(&cluster, &f, &["--anchor", &real_anchor]).await?;
    assert!(!ok, "{text}");
    assert!(text.contains(&format!("anchor seq {}", last.seq)), "{text}");
    let v: Value = cluster
        .drctl_json(["audit", "verify", "--anchor", &real_anchor])
        .await?;
    assert_eq!(
        v["ok"], true,
        "the coordinators still hold the real chain: {v}"
    );
    cluster.shutdown().await
}
