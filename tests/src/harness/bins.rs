//! Where the binaries under test are.
//!
//! The tests run the binaries that `cargo build --workspace` put in the target dir, the
//! same profile as the test executable: `target/debug/deps/control_plane-<hash>` ->
//! `target/debug/`. `DR_BIN_DIR` overrides this (e.g. to test installed binaries). A
//! missing binary is an error that says which command builds it, not a confusing spawn
//! failure deep inside a test.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

#[derive(Clone, Debug)]
pub struct Bins {
    pub coordinator: PathBuf,
    pub agent: PathBuf,
    pub drctl: PathBuf,
}

impl Bins {
    pub fn locate() -> Result<Self> {
        let dir = match std::env::var_os("DR_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let exe = std::env::current_exe().context("locate the test executable")?;
                let deps = exe.parent().context("test executable has no parent dir")?;
                // Integration tests live in target/<profile>/deps; unit tests too.
                if deps.file_name().is_some_and(|n| n == "deps") {
                    deps.parent()
                        .context("deps dir has no parent")?
                        .to_path_buf()
                } else {
                    deps.to_path_buf()
                }
            }
        };
        let bins = Self {
            coordinator: dir.join("dr-coordinator"),
            agent: dir.join("dr-agent"),
            drctl: dir.join("drctl"),
        };
        for b in [&bins.coordinator, &bins.agent, &bins.drctl] {
            if !b.is_file() {
                bail!(
                    "binary {} is missing: run `cargo build --workspace` before the tests \
                     (scripts/test.sh does), or set DR_BIN_DIR",
                    b.display()
                );
            }
        }
        Ok(bins)
    }
}
