//! `drctl demo --once`: the newcomer's one command (a local 3-coordinator cluster with
//! agents and a leader failover) must pass end to end.

use std::time::Duration;

use anyhow::Result;
use dr_tests::harness::bins::Bins;
use dr_tests::{ChildGuard, ChildSpec, TestDir, init_tracing};
use tracing::info;

#[tokio::test]
async fn drctl_demo_once_passes() -> Result<()> {
    init_tracing();
    let mut dir = TestDir::new()?;
    let bins = Bins::locate()?;
    info!("--- drctl demo --once");
    let demo_dir = dir.join("demo");
    let mut demo = ChildGuard::spawn(
        ChildSpec::new("drctl-demo", &bins.drctl, dir.log_path("drctl-demo"))
            .args([
                "demo".to_owned(),
                "--once".to_owned(),
                "--dir".to_owned(),
                demo_dir.display().to_string(),
            ])
            .cwd(dir.path()),
    )?;
    let st = demo.wait_exit(Duration::from_secs(600)).await?;
    assert!(
        st.success(),
        "drctl demo --once failed ({st}):\n{}",
        demo.log()
    );
    dir.passed();
    Ok(())
}
