//! Integration-test harness for the YesLocker DR control plane.
//!
//! Why a harness crate: the acceptance tests must exercise the REAL binaries
//! (`dr-coordinator`, `dr-agent`, `drctl`) over real mutual TLS, with real PostgreSQL,
//! and with faults injected between the nodes. Every suite under `tests/` shares the
//! pieces here instead of re-inventing process handling:
//!
//! ```text
//!  TestCluster ── Pki (drctl cert init/issue) ── TestDir (kept and printed on failure)
//!      │
//!      ├── ChildGuard per process (SIGTERM, then SIGKILL by PID on drop)
//!      ├── FaultNet: one TCP proxy in front of every coordinator; each accepted
//!      │   connection is attributed to the child process that opened it, so links
//!      │   (source node -> destination node) can be delayed, black-holed or cut,
//!      │   one by one or a whole region at once
//!      └── drctl()/drctl_json() with an admin operator certificate
//! ```
//!
//! Synchronisation is always `wait_until(what, deadline, interval, pred)`, never a bare
//! sleep. Deadlines are generous (CI is a loaded 2-core machine) and can be scaled with
//! `DR_TEST_TIME_SCALE`; no test asserts on timing.

pub mod harness;

pub use harness::certs::{CertPaths, Pki};
pub use harness::cluster::{AgentSpec, ClusterBuilder, TestCluster};
pub use harness::faults::{FaultNet, LinkMode};
pub use harness::process::{ChildGuard, ChildSpec};
pub use harness::testdir::TestDir;
pub use harness::wait::{scaled, wait_until};

use std::sync::Once;

/// Installs a tracing subscriber that writes through the test harness's capture.
/// `RUST_LOG` overrides the default (`info`). Safe to call from every test.
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // A second subscriber (another harness in the same process) is not an error.
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .with_target(false)
            .try_init()
            .ok();
    });
}
