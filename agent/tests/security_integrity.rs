//! The integrity monitor end to end (without a coordinator): watched files are hashed at
//! start, `security-monitoring level=high` shortens the interval, a modified file becomes a
//! FAILING `integrity:<path>` check in the results the next heartbeat carries, a restart
//! keeps the baseline, and `rebaseline=true` accepts the change.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dr_agent::actions::{ActionCtx, Progress, Registry};
use dr_agent::config::Config;
use dr_agent::health::Health;
use dr_agent::integrity::{self, IntegrityMonitor};
use dr_agent::metrics::Metrics;
use dr_proto::pb;
use tokio_util::sync::CancellationToken;

fn ctx() -> ActionCtx {
    ActionCtx {
        key: "t".into(),
        cancel: CancellationToken::new(),
        progress: Progress::new("t", None),
    }
}

fn state_of(health: &Health, path: &Path) -> Option<(pb::CheckState, String)> {
    let name = integrity::check_name(path);
    health
        .latest()
        .into_iter()
        .find(|c| c.name == name)
        .map(|c| {
            (
                pb::CheckState::try_from(c.state).unwrap_or(pb::CheckState::Unspecified),
                c.detail,
            )
        })
}

async fn wait_for(health: &Health, path: &Path, want: pb::CheckState, within: Duration) -> String {
    let start = Instant::now();
    loop {
        if let Some((s, detail)) = state_of(health, path)
            && s == want
        {
            return detail;
        }
        assert!(
            start.elapsed() < within,
            "{} not {want:?} within {within:?}: {:?}",
            path.display(),
            state_of(health, path)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Agent {
    health: Health,
    monitor: IntegrityMonitor,
    reg: Registry,
    cancel: CancellationToken,
}

fn start(config: &Config) -> Agent {
    let health = Health::new(&[], Arc::new(Metrics::new()));
    let monitor = IntegrityMonitor::new(config, health.clone());
    let mut reg = Registry::default();
    integrity::register(&mut reg, monitor.clone());
    let cancel = CancellationToken::new();
    tokio::spawn(monitor.clone().run(cancel.clone()));
    Agent {
        health,
        monitor,
        reg,
        cancel,
    }
}

#[tokio::test]
async fn t10_modified_file_fails_its_integrity_check() {
    let dir = tempfile::tempdir().unwrap();
    let (bin, conf) = (dir.path().join("app-bin"), dir.path().join("app.conf"));
    std::fs::write(&bin, b"\x7fELF original").unwrap();
    std::fs::write(&conf, "listen = 8443\n").unwrap();
    let text = format!(
        "version = 1\nhost_id = \"h1\"\nregion = \"r\"\nsite = \"s\"\ncoordinators = [\"127.0.0.1:1\"]\ndata_dir = \"data\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n[integrity]\npaths = [\"{}\", \"app.conf\"]\ninterval = \"1h\"\nhigh_interval = \"100ms\"\n",
        bin.display()
    );
    let config = Config::parse(&text, &dir.path().join("agent.toml")).unwrap();
    assert_eq!(config.integrity.paths[1], conf, "relative paths resolve");

    let agent = start(&config);
    // --- hashed at start: both pass; the names are part of the reported checks
    {
        wait_for(
            &agent.health,
            &bin,
            pb::CheckState::Passing,
            Duration::from_secs(10),
        )
        .await;
        wait_for(
            &agent.health,
            &conf,
            pb::CheckState::Passing,
            Duration::from_secs(10),
        )
        .await;
        let names = agent.health.names();
        assert!(names.contains(&integrity::check_name(&bin)), "{names:?}");
    }
    // --- level=high: a change is seen within the short interval (normal is an hour)
    {
        let out = agent
            .reg
            .call(
                "security-monitoring",
                HashMap::from([("level".into(), "high".into())]),
                ctx(),
            )
            .await;
        assert!(out.success, "{out:?}");
        assert_eq!(out.details["level"], "high");
        assert_eq!(out.details["interval"], "100ms");
        assert_eq!(out.details["health_interval_divisor"], "5");
        assert_eq!(out.details["changed"], "");

        std::fs::write(&bin, b"\x7fELF backdoored").unwrap();
        let detail = wait_for(
            &agent.health,
            &bin,
            pb::CheckState::Failing,
            Duration::from_secs(5),
        )
        .await;
        assert!(detail.starts_with("changed: baseline blake3 "), "{detail}");
        assert_eq!(
            state_of(&agent.health, &conf).unwrap().0,
            pb::CheckState::Passing
        );
        assert_eq!(agent.monitor.changed(), vec![bin.clone()]);
    }
    agent.cancel.cancel();

    // --- a restarted agent still sees the change (persisted baseline)
    let agent = start(&config);
    {
        wait_for(
            &agent.health,
            &bin,
            pb::CheckState::Failing,
            Duration::from_secs(10),
        )
        .await;
        std::fs::remove_file(&conf).unwrap();
        let out = agent
            .reg
            .call(
                "security-monitoring",
                HashMap::from([("level".into(), "normal".into())]),
                ctx(),
            )
            .await;
        assert!(out.success, "{out:?}");
        assert_eq!(
            out.details["changed"],
            format!("{},{}", bin.display(), conf.display()),
            "a deleted file is a change too"
        );
    }
    // --- rebaseline accepts the current content
    {
        let out = agent
            .reg
            .call(
                "security-monitoring",
                HashMap::from([
                    ("level".into(), "normal".into()),
                    ("rebaseline".into(), "true".into()),
                ]),
                ctx(),
            )
            .await;
        assert!(out.success && out.details["changed"].is_empty(), "{out:?}");
        assert_eq!(
            state_of(&agent.health, &bin).unwrap().0,
            pb::CheckState::Passing
        );
        let bad = agent
            .reg
            .call(
                "security-monitoring",
                HashMap::from([("level".into(), "max".into())]),
                ctx(),
            )
            .await;
        assert!(!bad.success);
    }
    agent.cancel.cancel();
}
