//! Where a provider's secret comes from (a file or an environment variable), and a holder that
//! cannot be logged.
//!
//! Secrets are never inline in the config file: configs get copied into tickets and the repo.
//! The environment is passed in as a map (STYLE: never read deep inside), so tests need no
//! `set_var`. [`Secret`]'s `Debug` prints `<redacted>`, so a stray `?cfg` in a log line is safe.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::error::TrafficError;

/// `{ file = "/etc/dr/tsig.key" }` or `{ env = "DR_TSIG_SECRET" }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(p) => write!(f, "file {}", p.display()),
            SecretSource::Env(v) => write!(f, "environment variable {v}"),
        }
    }
}

/// Secret bytes. Deliberately not `Serialize`, not `Display`.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

/// How the text read from a [`SecretSource`] turns into key bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SecretFormat {
    /// A base64 secret, or a BIND key file (`key "n" { algorithm ..; secret "base64"; };`, as
    /// written by `tsig-keygen`), from which the `secret` is taken.
    TsigBase64,
    /// The bytes as they are, trailing newline trimmed.
    Raw,
}

impl SecretSource {
    pub(crate) fn load(
        &self,
        provider: &str,
        env: &BTreeMap<String, String>,
        format: SecretFormat,
    ) -> Result<Secret, TrafficError> {
        let fail = |reason: String| TrafficError::Secret {
            provider: provider.to_owned(),
            source_desc: self.to_string(),
            reason,
        };
        let text = match self {
            SecretSource::File(p) => std::fs::read(p).map_err(|e| fail(e.to_string()))?,
            SecretSource::Env(var) => env
                .get(var)
                .ok_or_else(|| fail("not set".to_owned()))?
                .as_bytes()
                .to_vec(),
        };
        let bytes = match format {
            SecretFormat::Raw => {
                let mut t = text;
                while t.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    t.pop();
                }
                t
            }
            SecretFormat::TsigBase64 => {
                let s = String::from_utf8(text).map_err(|_| fail("not UTF-8 text".to_owned()))?;
                let b64 = bind_key_secret(&s).unwrap_or_else(|| s.trim().to_owned());
                // Never echo the text: a decode error message would print the secret.
                base64::engine::general_purpose::STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|_| fail("not base64 and no `secret \"...\";` statement".to_owned()))?
            }
        };
        if bytes.is_empty() {
            return Err(fail("empty".to_owned()));
        }
        Ok(Secret(bytes))
    }
}

/// The `secret "..."` of a BIND key file, if the text is one.
fn bind_key_secret(text: &str) -> Option<String> {
    let i = text.find("secret")?;
    let rest = &text[i + "secret".len()..];
    let start = rest.find('"')? + 1;
    let len = rest[start..].find('"')?;
    Some(rest[start..start + len].trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bind_key_files_and_plain_base64_without_leaking() {
        let env = BTreeMap::from([
            ("K".to_owned(), "c2VjcmV0\n".to_owned()),
            ("BAD".to_owned(), "hunter2!!".to_owned()),
        ]);
        let s = SecretSource::Env("K".into())
            .load("p", &env, SecretFormat::TsigBase64)
            .unwrap();
        assert_eq!(s.expose(), b"secret");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        let bind = "key \"dr\" {\n\talgorithm hmac-sha256;\n\tsecret \"c2VjcmV0\";\n};\n";
        assert_eq!(bind_key_secret(bind).as_deref(), Some("c2VjcmV0"));
        let err = SecretSource::Env("BAD".into())
            .load("p", &env, SecretFormat::TsigBase64)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let err = SecretSource::Env("MISSING".into())
            .load("p", &env, SecretFormat::Raw)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("environment variable MISSING: not set"),
            "{err}"
        );
    }
}
