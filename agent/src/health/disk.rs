//! `kind = "disk"`: free space under a path (statvfs), against a percentage and/or a byte
//! floor. A full WAL disk stops PostgreSQL; this is the early warning. statvfs may block on
//! a dead network mount, so it runs on the blocking pool and the check's timeout bounds it.

use std::path::{Path, PathBuf};

use super::Outcome;

/// Free (for unprivileged users) and total bytes of the filesystem holding `path`.
pub fn free_space(path: &Path) -> nix::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path)?;
    let frsize = st.fragment_size();
    Ok((st.blocks_available() * frsize, st.blocks() * frsize))
}

pub async fn probe(
    path: &Path,
    min_free_percent: Option<f64>,
    min_free_bytes: Option<u64>,
) -> Outcome {
    let p: PathBuf = path.to_path_buf();
    let res = match tokio::task::spawn_blocking(move || free_space(&p)).await {
        Ok(r) => r,
        Err(e) => return Outcome::Unknown(format!("statvfs task failed: {e}")),
    };
    let (free, total) = match res {
        Ok(x) => x,
        Err(e) => return Outcome::Fail(format!("statvfs {}: {e}", path.display())),
    };
    evaluate(free, total, min_free_percent, min_free_bytes)
}

fn evaluate(
    free: u64,
    total: u64,
    min_free_percent: Option<f64>,
    min_free_bytes: Option<u64>,
) -> Outcome {
    let pct = if total == 0 {
        0.0
    } else {
        free as f64 * 100.0 / total as f64
    };
    let detail = format!("{pct:.1}% free ({} of {})", bytes(free), bytes(total));
    if let Some(min) = min_free_percent
        && pct < min
    {
        return Outcome::Fail(format!("{detail}, below {min}%"));
    }
    if let Some(min) = min_free_bytes
        && free < min
    {
        return Outcome::Fail(format!("{detail}, below {}", bytes(min)));
    }
    Outcome::Pass(detail)
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        assert!(matches!(
            evaluate(50, 100, Some(10.0), None),
            Outcome::Pass(_)
        ));
        assert!(matches!(
            evaluate(5, 100, Some(10.0), None),
            Outcome::Fail(_)
        ));
        assert!(matches!(evaluate(5, 100, None, Some(6)), Outcome::Fail(_)));
        assert!(matches!(
            evaluate(5, 100, Some(1.0), Some(5)),
            Outcome::Pass(_)
        ));
    }

    #[tokio::test]
    async fn real_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            probe(dir.path(), Some(0.0), None).await,
            Outcome::Pass(_)
        ));
        assert!(matches!(
            probe(dir.path(), None, Some(u64::MAX)).await,
            Outcome::Fail(_)
        ));
        assert!(matches!(
            probe(&dir.path().join("missing"), Some(0.0), None).await,
            Outcome::Fail(_)
        ));
    }
}
