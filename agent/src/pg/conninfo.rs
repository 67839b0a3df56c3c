//! libpq connection strings, parsed only as far as the agent needs, and redacted for logs.
//!
//! Connection strings travel from the coordinator ("stream from this primary") into
//! `primary_conninfo`, `pg_rewind --source-server` and `pg_basebackup -d`. The coordinator never
//! sends secrets: the agent adds the replication user and password it knows locally. Every
//! conninfo that reaches a log line, an error or a `details` map goes through [`redact`].

use std::fmt;

use super::{PgError, PgResult};

/// A key/value libpq connection string (`host=a port=5432 user=repl`). URL forms
/// (`postgresql://…`) are accepted and passed through untouched, but not completed.
#[derive(Clone, PartialEq, Eq)]
pub struct Conninfo {
    raw: String,
    pairs: Option<Vec<(String, String)>>,
}

impl Conninfo {
    pub fn parse(s: &str) -> PgResult<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(PgError::Conninfo {
                conninfo: String::new(),
                reason: "empty".into(),
            });
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(Self {
                raw: s.to_owned(),
                pairs: None,
            });
        }
        let pairs = parse_pairs(s).map_err(|reason| PgError::Conninfo {
            conninfo: redact(s),
            reason: reason.into(),
        })?;
        Ok(Self {
            raw: s.to_owned(),
            pairs: Some(pairs),
        })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .as_ref()?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `key` unless the string already has it (URL forms are left unchanged).
    pub fn with_default(mut self, key: &str, value: &str) -> Self {
        if let Some(pairs) = &mut self.pairs
            && !pairs.iter().any(|(k, _)| k == key)
        {
            pairs.push((key.to_owned(), value.to_owned()));
        }
        self
    }

    /// The full string, secrets included: for libpq only, never for logs.
    pub fn expose(&self) -> String {
        match &self.pairs {
            None => self.raw.clone(),
            Some(pairs) => pairs
                .iter()
                .map(|(k, v)| format!("{k}={}", quote(v)))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    /// The string without any `password`.
    pub fn without_password(&self) -> Self {
        match &self.pairs {
            None => self.clone(),
            Some(pairs) => Self {
                raw: self.raw.clone(),
                pairs: Some(
                    pairs
                        .iter()
                        .filter(|(k, _)| k != "password")
                        .cloned()
                        .collect(),
                ),
            },
        }
    }
}

impl fmt::Display for Conninfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.expose()))
    }
}

impl fmt::Debug for Conninfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Conninfo({self})")
    }
}

fn quote(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\', '\t', '\n']) {
        return v.to_owned();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

fn parse_pairs(s: &str) -> Result<Vec<(String, String)>, &'static str> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = it.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            it.next();
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.next() != Some('=') || key.is_empty() {
            return Err("expected key=value pairs");
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        let mut val = String::new();
        if it.peek() == Some(&'\'') {
            it.next();
            loop {
                match it.next() {
                    None => return Err("unterminated quoted value"),
                    Some('\\') => val.push(it.next().ok_or("dangling backslash")?),
                    Some('\'') => break,
                    Some(c) => val.push(c),
                }
            }
        } else {
            while let Some(&c) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    it.next();
                    val.push(it.next().ok_or("dangling backslash")?);
                    continue;
                }
                val.push(c);
                it.next();
            }
        }
        out.push((key, val));
    }
}

/// Replaces every password in a conninfo (key/value or URL form) by `***`. Works on strings
/// that do not parse, too, because it is used to print the ones that do not.
pub fn redact(s: &str) -> String {
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        return redact_url(s);
    }
    match parse_pairs(s) {
        Ok(pairs) => pairs
            .iter()
            .map(|(k, v)| {
                if k == "password" {
                    format!("{k}=***")
                } else {
                    format!("{k}={}", quote(v))
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        // Unparseable: keep nothing after a `password` token.
        Err(_) => match s.find("password") {
            Some(i) => format!("{}password=***", &s[..i]),
            None => s.to_owned(),
        },
    }
}

fn redact_url(s: &str) -> String {
    let (scheme, rest) = s.split_once("://").unwrap_or(("", s));
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let q: Vec<String> = query
                .split('&')
                .map(|kv| {
                    if kv.starts_with("password=") {
                        "password=***".to_owned()
                    } else {
                        kv.to_owned()
                    }
                })
                .collect();
            format!("{path}?{}", q.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_key_value_and_urls() {
        assert_eq!(
            redact("host=a password=s3cret user=u"),
            "host=a password=*** user=u"
        );
        assert_eq!(
            redact("host=a password='s e c' user=u"),
            "host=a password=*** user=u"
        );
        assert_eq!(
            redact("host=a password='unterminated"),
            "host=a password=***"
        );
        assert_eq!(
            redact("postgresql://u:s3cret@h:5432/db?sslmode=require"),
            "postgresql://u:***@h:5432/db?sslmode=require"
        );
        assert_eq!(
            redact("postgres://h/db?user=u&password=s3cret"),
            "postgres://h/db?user=u&password=***"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn completes_and_displays_without_secret() {
        let c = Conninfo::parse("host=127.0.0.1 port=5433")
            .unwrap()
            .with_default("user", "repl")
            .with_default("port", "1")
            .with_default("password", "it's secret");
        assert_eq!(c.get("port"), Some("5433"));
        assert_eq!(
            c.expose(),
            r"host=127.0.0.1 port=5433 user=repl password='it\'s secret'"
        );
        assert_eq!(
            c.to_string(),
            "host=127.0.0.1 port=5433 user=repl password=***"
        );
        assert!(!format!("{c:?}").contains("secret"));
        assert_eq!(
            Conninfo::parse(&c.expose()).unwrap().get("password"),
            Some("it's secret")
        );
        assert_eq!(
            c.without_password().expose(),
            "host=127.0.0.1 port=5433 user=repl"
        );
        assert!(Conninfo::parse("host").is_err());
        assert!(Conninfo::parse("").is_err());
    }
}
