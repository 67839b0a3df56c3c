//! The `exec` provider with real `/bin/sh` scripts: plan on stdin and in the environment,
//! non-zero exit reported with stderr's tail, timeouts kill the whole process group.
// Test helpers (outside #[test] fns) may unwrap and ignore best-effort cleanup results.
#![allow(clippy::unwrap_used, clippy::let_underscore_must_use)]

#[path = "traffic_common.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{init_tracing, plan, wait_until};
use dr_agent::traffic::webhook::WebhookBody;
use dr_agent::traffic::{ExecConfig, ExecProvider, TrafficError, TrafficProvider as _};
use tracing::info;

fn sh(dir: &Path, script: &str, timeout: Duration) -> ExecProvider {
    ExecProvider::from_config(ExecConfig {
        name: "gateway".into(),
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env: BTreeMap::from([("OUT_DIR".to_owned(), dir.display().to_string())]),
        working_dir: Some(dir.to_owned()),
        timeout,
    })
    .unwrap()
}

/// Dead or a zombie (a reparented zombie may wait for a busy init to reap it).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[tokio::test]
async fn t10_exec_hook_gets_plan_and_reports_failures() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let shanghai = plan(&["10.1.0.5:443"], &["10.2.0.5:443", "10.2.0.6:443"], 0);

    info!("--- the hook receives the plan on stdin and in DR_TRAFFIC_* variables");
    {
        let hook = sh(
            d,
            r#"cat > "$OUT_DIR/stdin.json"; env | grep '^DR_TRAFFIC_' | sort > "$OUT_DIR/env.txt""#,
            Duration::from_secs(10),
        );
        let applied = hook.apply(&shanghai).await.unwrap();
        assert!(applied.changed);
        let body: WebhookBody =
            serde_json::from_slice(&std::fs::read(d.join("stdin.json")).unwrap()).unwrap();
        assert_eq!(body.plan, shanghai);
        assert_eq!(body.plan_digest, shanghai.digest());
        let env = std::fs::read_to_string(d.join("env.txt")).unwrap();
        for line in [
            "DR_TRAFFIC_ACTIVE_REGIONS=shanghai".to_owned(),
            "DR_TRAFFIC_WEIGHT_BEIJING=0".to_owned(),
            "DR_TRAFFIC_WEIGHT_SHANGHAI=100".to_owned(),
            "DR_TRAFFIC_ENDPOINTS_SHANGHAI=10.2.0.5:443,10.2.0.6:443".to_owned(),
            "DR_TRAFFIC_PROVIDER=gateway".to_owned(),
            format!("DR_TRAFFIC_DIGEST={}", shanghai.digest()),
        ] {
            assert!(env.lines().any(|l| l == line), "missing {line} in\n{env}");
        }

        info!("--- re-applying the same plan does not run the hook again");
        std::fs::remove_file(d.join("stdin.json")).unwrap();
        let again = hook.apply(&shanghai).await.unwrap();
        assert!(!again.changed);
        assert!(std::fs::metadata(d.join("stdin.json")).is_err());
        let state = hook.current().await.unwrap();
        assert_eq!(state.last_applied, Some(shanghai.digest()));
    }

    info!("--- non-zero exit is an error with stderr's tail");
    {
        let hook = sh(
            d,
            "echo 'connecting to gateway'; echo 'gateway locker-7 unreachable' >&2; exit 3",
            Duration::from_secs(10),
        );
        let err = hook.apply(&shanghai).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, TrafficError::ExecFailed { .. }), "{err:?}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.contains("gateway locker-7 unreachable"), "{msg}");
        assert!(!err.is_permanent());
        // A failed plan is not remembered: the next try runs the hook again.
        assert_eq!(hook.current().await.unwrap().last_applied, None);
    }

    info!("--- a hook that hangs is killed with its children at the timeout");
    {
        let hook = sh(
            d,
            r#"sleep 30 & echo $! > "$OUT_DIR/bg.pid"; wait"#,
            Duration::from_millis(500),
        );
        let err = hook.apply(&shanghai).await.unwrap_err();
        assert!(matches!(err, TrafficError::ExecTimeout { .. }), "{err:?}");
        let bg: u32 = std::fs::read_to_string(d.join("bg.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        wait_until(
            "the hook's background child to die",
            Duration::from_secs(10),
            || async { process_gone(bg).then_some(()) },
        )
        .await;
    }

    info!("--- a missing program fails clearly");
    {
        let hook = ExecProvider::from_config(ExecConfig {
            name: "gw".into(),
            program: d.join("no-such-hook"),
            args: vec![],
            env: BTreeMap::new(),
            working_dir: None,
            timeout: Duration::from_secs(1),
        })
        .unwrap();
        let err = hook.apply(&shanghai).await.unwrap_err();
        assert!(err.to_string().contains("cannot start"), "{err}");
    }
}
