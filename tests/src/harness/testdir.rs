//! A per-test directory: configs, certificates, data dirs and child logs live here.
//!
//! Removed when the test passes; kept, with its path and the tails of every `*.log`
//! printed to stderr, when the test fails. "Passed" means the test called
//! [`TestDir::passed`] (the cluster's `shutdown` does) before the directory was dropped:
//! a panic or an early `?` return both leave it unset, so failures need no extra code.
//!
//! Directories live under `$DR_TEST_ROOT` (default `<tmp>/dr-tests`) with mode 0755, so a
//! PostgreSQL started as user `postgres` can reach its data dir inside.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub struct TestDir {
    path: PathBuf,
    passed: bool,
}

impl TestDir {
    /// Creates a fresh directory named after the current test (the test thread's name).
    pub fn new() -> Result<Self> {
        let name = std::thread::current()
            .name()
            .unwrap_or("test")
            .replace("::", "-")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect::<String>();
        let root = std::env::var_os("DR_TEST_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("dr-tests"));
        fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).ok();
        let path = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in(&root)
            .with_context(|| format!("create a test dir under {}", root.display()))?
            .keep();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", path.display()))?;
        fs::create_dir_all(path.join("logs"))?;
        Ok(Self {
            path,
            passed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }

    /// Where child processes write their stdout and stderr.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.path.join("logs").join(format!("{name}.log"))
    }

    /// Marks the test as passed: the directory is removed on drop.
    pub fn passed(&mut self) {
        self.passed = true;
    }

    /// Every child log, sorted by name.
    pub fn logs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(self.path.join("logs"))
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Prints the path and the last `lines` lines of every child log to stderr.
    pub fn print_failure_report(&self, lines: usize) {
        eprintln!(
            "\n==== test failed; its directory is kept: {}",
            self.path.display()
        );
        for log in self.logs() {
            eprintln!("---- tail of {}", log.display());
            eprintln!("{}", tail(&log, lines));
        }
        eprintln!("==== end of child logs ({})\n", self.path.display());
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if self.passed && std::env::var_os("DR_TEST_KEEP").is_none() {
            fs::remove_dir_all(&self.path).ok();
        } else if !self.passed {
            self.print_failure_report(40);
        }
    }
}

/// The last `lines` lines of a file (reads at most its last 64 KiB).
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return format!("(cannot open {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024))).ok();
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok();
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
