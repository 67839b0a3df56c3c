//! Reading and replacing one secret in an application's secret file.
//!
//! Two formats, because that is how applications take secrets: a plain file that holds only
//! the secret (systemd `LoadCredential=`, Docker secrets), and an env file of `KEY=value`
//! lines (systemd `EnvironmentFile=`), where only KEY's line may change: the other lines are
//! someone else's configuration. Replacement is atomic ([`super::atomic_file`]), so a reader
//! sees the old file or the new one, never a mix. No function here logs, and errors name the
//! file, never its content.

use std::path::{Path, PathBuf};

use super::Secret;
use super::atomic_file::{AtomicWriteError, write_atomic};
use crate::config::{SecretFile, SecretFormat};

#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("read secret file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret file {path} is not UTF-8 text")]
    NotText { path: PathBuf },
    #[error("{0}")]
    Write(#[from] AtomicWriteError),
    #[error("writing {path}: {reason}")]
    Task { path: PathBuf, reason: String },
}

/// The current secret held by `content` in `format` (`None`: not there).
pub fn extract(content: &str, format: &SecretFormat) -> Option<String> {
    match format {
        SecretFormat::Plain => {
            let s = content
                .strip_suffix('\n')
                .map(|s| s.strip_suffix('\r').unwrap_or(s))
                .unwrap_or(content);
            (!s.is_empty()).then(|| s.to_string())
        }
        SecretFormat::Env { key } => content.lines().find_map(|l| {
            let (_, value) = env_line(l, key)?;
            Some(unquote(value).to_string())
        }),
    }
}

/// `(prefix up to and including '=', value)` when `line` assigns `key`.
fn env_line<'a>(line: &'a str, key: &str) -> Option<(&'a str, &'a str)> {
    let eq = line.find('=')?;
    let lhs = line[..eq].trim();
    let name = lhs.strip_prefix("export ").map_or(lhs, str::trim);
    (name == key).then(|| (&line[..=eq], &line[eq + 1..]))
}

fn unquote(v: &str) -> &str {
    let t = v.trim();
    for q in ['"', '\''] {
        if let Some(inner) = t.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return inner;
        }
    }
    t
}

/// `content` with the secret replaced by `new` (the file's other bytes unchanged).
pub fn replace(content: &str, format: &SecretFormat, new: &Secret) -> String {
    match format {
        SecretFormat::Plain => {
            let ending = if content.ends_with("\r\n") {
                "\r\n"
            } else if content.ends_with('\n') {
                "\n"
            } else {
                ""
            };
            format!("{}{ending}", new.expose())
        }
        SecretFormat::Env { key } => {
            let mut found = false;
            let mut out = String::with_capacity(content.len() + 64);
            for line in content.split_inclusive('\n') {
                let (body, nl) = match line.strip_suffix('\n') {
                    Some(b) => (b, "\n"),
                    None => (line, ""),
                };
                match env_line(body, key) {
                    Some((prefix, value)) if !found => {
                        found = true;
                        let t = value.trim();
                        let q = ['"', '\'']
                            .into_iter()
                            .find(|q| t.len() >= 2 && t.starts_with(*q) && t.ends_with(*q));
                        match q {
                            Some(q) => out.push_str(&format!("{prefix}{q}{}{q}", new.expose())),
                            None => out.push_str(&format!("{prefix}{}", new.expose())),
                        }
                        out.push_str(nl);
                    }
                    _ => out.push_str(line),
                }
            }
            if !found {
                if !out.is_empty() && !out.ends_with('\n') {
                    out.push('\n');
                }
                out.push_str(&format!("{key}={}\n", new.expose()));
            }
            out
        }
    }
}

async fn read_opt(path: &Path) -> Result<Option<String>, SecretFileError> {
    match tokio::fs::read(path).await {
        Ok(b) => String::from_utf8(b)
            .map(Some)
            .map_err(|_| SecretFileError::NotText {
                path: path.to_path_buf(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SecretFileError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The secret currently held by the first file of `files` that has one.
pub async fn read_first(files: &[SecretFile]) -> Result<Option<Secret>, SecretFileError> {
    for f in files {
        if let Some(content) = read_opt(&f.path).await?
            && let Some(s) = extract(&content, &f.format)
        {
            return Ok(Some(Secret::new(s)));
        }
    }
    Ok(None)
}

/// Writes `new` into `file` atomically (mode and owner of the old file; 0600 for a new one).
pub async fn write(file: &SecretFile, new: &Secret) -> Result<(), SecretFileError> {
    let old = read_opt(&file.path).await?.unwrap_or_default();
    let content = replace(&old, &file.format, new);
    let path = file.path.clone();
    tokio::task::spawn_blocking(move || write_atomic(&path, content.as_bytes(), 0o600))
        .await
        .map_err(|e| SecretFileError::Task {
            path: file.path.clone(),
            reason: e.to_string(),
        })??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> SecretFormat {
        SecretFormat::Env { key: k.into() }
    }

    #[test]
    fn plain_files_keep_their_line_ending() {
        let n = Secret::new("NEW".into());
        assert_eq!(replace("old\n", &SecretFormat::Plain, &n), "NEW\n");
        assert_eq!(replace("old", &SecretFormat::Plain, &n), "NEW");
        assert_eq!(extract("old\r\n", &SecretFormat::Plain).unwrap(), "old");
        assert_eq!(extract("", &SecretFormat::Plain), None);
    }

    #[test]
    fn env_files_change_only_the_key_line() {
        let n = Secret::new("NEW".into());
        let text = "# db\nA=1\nexport DB_PASSWORD=\"old\"\nDB_PASSWORD_X=keep\nB=2";
        assert_eq!(extract(text, &env("DB_PASSWORD")).unwrap(), "old");
        assert_eq!(
            replace(text, &env("DB_PASSWORD"), &n),
            "# db\nA=1\nexport DB_PASSWORD=\"NEW\"\nDB_PASSWORD_X=keep\nB=2"
        );
        assert_eq!(replace("A=1", &env("K"), &n), "A=1\nK=NEW\n");
        assert_eq!(replace("K = old\n", &env("K"), &n), "K =NEW\n");
    }
}
