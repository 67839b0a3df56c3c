//! Topology apply/show through drctl, the dry-run plans, and the refusals an operator sees.

use anyhow::{Context as _, Result};
use dr_tests::TestCluster;
use dr_tests::harness::cluster::{AgentSpec, json_list};
use tracing::info;

fn example() -> String {
    format!(
        "{}/../deploy/examples/yeslocker/topology.toml",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[tokio::test]
async fn apply_show_plan_and_refusals() -> Result<()> {
    let cluster = TestCluster::builder()
        .coordinators(3)
        .agent(AgentSpec::new("bj-db-1").region("beijing").roles(&["db"]))
        .agent(AgentSpec::new("sh-db-1").region("shanghai").roles(&["db"]))
        .start()
        .await?;
    let file = example();

    info!("--- dry run shows the diff and commits nothing");
    {
        let v = cluster
            .drctl_json(["apply", "-f", &file, "--dry-run"])
            .await?;
        assert_eq!(v["applied"], false, "{v}");
        let diff = json_list(&v, "diff");
        assert!(diff.iter().any(|l| l == "+ host bj-db-1"), "{v}");
        let t = cluster.drctl_json(["topology", "show"]).await?;
        assert!(t.get("version").is_none_or(|x| x == 0), "{t}");
    }

    info!("--- apply commits version 1; the cluster starts at its declared primary, epoch 1");
    {
        let v = cluster.drctl_json(["apply", "-f", &file]).await?;
        assert_eq!(v["applied"], true, "{v}");
        let t = cluster.drctl_json(["topology", "show"]).await?;
        assert_eq!(t["version"], 1, "{t}");
        let c = &json_list(&t, "clusters")[0];
        assert_eq!(c["primary_host"], "bj-db-1", "{t}");
        assert_eq!(c["epoch"], 1, "{t}");
        let again = cluster.drctl_json(["apply", "-f", &file]).await?;
        assert_eq!(
            again["applied"], false,
            "no change, no new version: {again}"
        );
    }

    info!("--- failover --dry-run shows the planned switchover; a witness target is refused");
    {
        let v = cluster
            .drctl_json(["failover", "--to", "shanghai", "--dry-run"])
            .await?;
        let steps = json_list(&v["operation"], "steps");
        let names: Vec<&str> = steps.iter().filter_map(|s| s["name"].as_str()).collect();
        for n in ["stop_old_primary", "wait_replay", "raise_epoch", "promote"] {
            assert!(names.contains(&n), "{n} missing: {names:?}");
        }
        let out = cluster
            .drctl(["failover", "--to", "witness", "--dry-run"])
            .await?;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("witness"), "{err}");
    }

    info!("--- a two-region topology without a witness: drctl status says why");
    {
        let text = std::fs::read_to_string(&file).context("read example")?;
        let two = text
            .replace("[[regions]]\nname = \"witness\"\nkind = \"witness\"\n", "")
            .replace("name = \"yeslocker\"\n\n", "name = \"yeslocker-two\"\n\n");
        let path = cluster.dir().path().join("two-regions.toml");
        std::fs::write(&path, two)?;
        let path = path.to_string_lossy().into_owned();
        let v = cluster.drctl_json(["apply", "-f", &path]).await?;
        assert!(
            json_list(&v, "warnings")
                .iter()
                .any(|w| w.as_str().is_some_and(|w| w.contains("no witness"))),
            "{v}"
        );
        let st = cluster.drctl_json(["status"]).await?;
        assert!(
            json_list(&st, "notes")
                .iter()
                .any(|n| n.as_str().is_some_and(|n| n.contains("no witness"))),
            "{st}"
        );
    }
    cluster.shutdown().await
}
