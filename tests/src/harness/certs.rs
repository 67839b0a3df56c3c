//! Test PKI made with the real `drctl cert init/issue` (docs/dev/team-contracts.md):
//!
//! ```text
//! drctl cert init  --trust-domain D --out DIR                  -> DIR/ca.pem, DIR/ca.key
//! drctl cert issue --ca-dir DIR --kind K --name N [--role R] [--not-after T] [--out DIR]
//!                                                              -> OUT/K-N.pem, OUT/K-N.key
//! ```
//!
//! Using drctl here (rather than rcgen in the test) means the tests also cover the
//! certificates operators will really deploy.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::Command;
use tracing::info;

#[derive(Clone, Debug)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA directory plus the drctl that manages it.
#[derive(Clone, Debug)]
pub struct Pki {
    pub dir: PathBuf,
    pub trust_domain: String,
    drctl: PathBuf,
}

impl Pki {
    /// `drctl cert init` into `dir`.
    pub async fn init(drctl: &Path, dir: &Path, trust_domain: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let pki = Self {
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.to_owned(),
            drctl: drctl.to_path_buf(),
        };
        let d = dir.display().to_string();
        pki.run(&["cert", "init", "--trust-domain", trust_domain, "--out", &d])
            .await?;
        for f in ["ca.pem", "ca.key"] {
            if !dir.join(f).is_file() {
                bail!("drctl cert init did not write {}", dir.join(f).display());
            }
        }
        Ok(pki)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `drctl cert issue --kind KIND --name NAME [extra...]`, files in the CA dir.
    pub async fn issue(&self, kind: &str, name: &str, extra: &[&str]) -> Result<CertPaths> {
        let d = self.dir.display().to_string();
        let mut args = vec![
            "cert", "issue", "--ca-dir", &d, "--kind", kind, "--name", name,
        ];
        args.extend_from_slice(extra);
        self.run(&args).await?;
        let paths = CertPaths {
            cert: self.dir.join(format!("{kind}-{name}.pem")),
            key: self.dir.join(format!("{kind}-{name}.key")),
        };
        for f in [&paths.cert, &paths.key] {
            if !f.is_file() {
                bail!("drctl cert issue did not write {}", f.display());
            }
        }
        Ok(paths)
    }

    pub async fn coordinator(&self, node_id: u64) -> Result<CertPaths> {
        self.issue("coordinator", &node_id.to_string(), &[]).await
    }

    pub async fn agent(&self, host: &str) -> Result<CertPaths> {
        self.issue("agent", host, &[]).await
    }

    pub async fn operator(&self, name: &str, role: &str) -> Result<CertPaths> {
        self.issue("operator", name, &["--role", role]).await
    }

    async fn run(&self, args: &[&str]) -> Result<Output> {
        info!(cmd = %format!("drctl {}", args.join(" ")), "pki");
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            Command::new(&self.drctl)
                .args(args)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .with_context(|| format!("drctl {} took over 60 s", args.join(" ")))?
        .with_context(|| format!("run {}", self.drctl.display()))?;
        if !out.status.success() {
            bail!(
                "drctl {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(out)
    }
}
