//! Incidents P0-P3 (the DRP's `activate-incident --level P0`) through the real binaries:
//! open with the level's response deadline and escalation, notes, a level change moving the
//! deadline, refusals (unknown level, a viewer opening), `drctl status` listing the open
//! incident, resolution with the measured duration, and every change in the audit log.

#![allow(clippy::unwrap_used)]

use anyhow::Result;
use dr_tests::TestCluster;
use serde_json::Value;
use tracing::info;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn open_note_level_resolve_audited() -> Result<()> {
    let cluster = TestCluster::builder().coordinators(3).start().await?;

    info!("--- open a P0");
    let i = cluster
        .drctl_json([
            "incident",
            "open",
            "--level",
            "P0",
            "--title",
            "beijing region unreachable",
            "--summary",
            "all beijing hosts down since 03:12",
        ])
        .await?;
    assert_eq!(i["id"], "I-1", "{i}");
    assert_eq!(i["level"], "P0", "{i}");
    assert_eq!(i["state"], "open", "{i}");
    let opened = i["opened_at_unix_ms"].as_i64().unwrap();
    assert_eq!(
        i["respond_by_unix_ms"].as_i64().unwrap(),
        opened + 15 * 60_000,
        "P0: respond within 15 minutes: {i}"
    );
    assert!(i["escalation"].as_str().unwrap().contains("CTO"), "{i}");

    info!("--- refusals");
    let out = cluster
        .drctl(["incident", "open", "--level", "P7", "--title", "x"])
        .await?;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("P0") && stderr(&out).contains("P3"),
        "an unknown level names the valid ones: {}",
        stderr(&out)
    );
    let cert = cluster.pki.operator("vera", "viewer").await?;
    let viewer =
        cluster.write_drctl_config("viewer", &[cluster.coord_listen(1)?.to_string()], &cert)?;
    let out = cluster
        .drctl_with(
            &viewer,
            ["incident", "open", "--level", "P2", "--title", "x"],
        )
        .await?;
    assert!(!out.status.success(), "a viewer opened an incident");
    assert!(stderr(&out).contains("viewer"), "{}", stderr(&out));
    let out = cluster
        .drctl_with(&viewer, ["incident", "list", "--output", "json"])
        .await?;
    assert!(out.status.success(), "a viewer reads: {}", stderr(&out));

    info!("--- note and level change");
    cluster
        .drctl_json(["incident", "note", "I-1", "DNS moved to shanghai"])
        .await?;
    let i = cluster
        .drctl_json(["incident", "level", "I-1", "P1"])
        .await?;
    assert_eq!(i["level"], "P1", "{i}");
    assert_eq!(
        i["respond_by_unix_ms"].as_i64().unwrap(),
        opened + 30 * 60_000,
        "{i}"
    );

    info!("--- drctl status lists the open incident");
    let out = cluster.drctl(["status"]).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("open incidents") && text.contains("I-1"),
        "{text}"
    );

    info!("--- resolve");
    let i = cluster
        .drctl_json([
            "incident",
            "resolve",
            "I-1",
            "--summary",
            "failed over to shanghai",
        ])
        .await?;
    assert_eq!(i["state"], "resolved", "{i}");
    assert!(i["duration_ms"].as_i64().unwrap() > 0, "{i}");
    let kinds: Vec<&str> = i["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["opened", "note", "level", "resolved"], "{i}");
    let open = cluster.drctl_json(["incident", "list", "--open"]).await?;
    assert!(
        open["incidents"].as_array().is_none_or(Vec::is_empty),
        "{open}"
    );

    info!("--- every change is in the audit log");
    let a = cluster
        .drctl_json(["audit", "list", "--limit", "1000"])
        .await?;
    let entries: Vec<Value> = a["entries"].as_array().cloned().unwrap_or_default();
    for what in [
        "incident_open",
        "incident_note",
        "incident_level",
        "incident_resolve",
    ] {
        assert!(
            entries
                .iter()
                .any(|e| e["what"].as_str().is_some_and(|w| w.contains(what))),
            "{what} not audited: {a}"
        );
    }
    cluster.shutdown().await
}
