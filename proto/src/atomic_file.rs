//! Replacing a file so that every reader sees either the whole old or the whole new content.
//!
//! Why: applications re-read secret files at any moment (a reload, a reconnect), and a reader
//! that catches a half-written or empty password file fails or, worse, caches the fragment.
//! So: write a temp file in the same directory (same filesystem, so `rename` is atomic),
//! give it the old file's mode and owner, fsync it, rename it over the target, fsync the
//! directory (so the rename survives a crash). The content is never logged.
//!
//! Shared by the agent (secret files, firewall rules, markers) and certificate rotation on
//! agents and coordinators.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("replace {path}: {step}: {source}")]
pub struct AtomicWriteError {
    pub path: PathBuf,
    pub step: &'static str,
    pub source: std::io::Error,
}

/// Atomically replaces (or creates) `path` with `content`. An existing file's mode and owner
/// carry over; a new file gets `new_mode`.
///
/// Blocking: call from `spawn_blocking` in async code.
pub fn write_atomic(path: &Path, content: &[u8], new_mode: u32) -> Result<(), AtomicWriteError> {
    let e = |step: &'static str| {
        let path = path.to_path_buf();
        move |source| AtomicWriteError { path, step, source }
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let old = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(e("stat")(err)),
    };
    let mode = old
        .as_ref()
        .map_or(new_mode, |m| m.permissions().mode() & 0o7777);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    // create_new below refuses an existing name, so a clash fails instead of clobbering.
    let tmp = dir.join(format!(".{name}.dr-tmp-{}-{nanos}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            // Never readable by others, not even for the moment before chmod.
            .mode(0o600)
            .open(&tmp)
            .map_err(e("create temp file"))?;
        if let Some(m) = &old {
            std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid())).map_err(e("chown"))?;
        }
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(e("chmod"))?;
        f.write_all(content).map_err(e("write"))?;
        f.sync_all().map_err(e("fsync"))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(e("rename"))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(e("fsync directory"))
    })();
    if result.is_err() {
        let _gone_or_never_made = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_mode_and_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        std::fs::write(&p, "old\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&p, b"new\n", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new\n");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let fresh = dir.path().join("fresh");
        write_atomic(&fresh, b"x", 0o600).unwrap();
        assert_eq!(
            std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temp file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
