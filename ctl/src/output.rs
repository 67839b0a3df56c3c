//! Rendering answers for people (compact tables) and for scripts (`--output json`).
//!
//! Why one module: every command prints through the same two paths, so text stays
//! consistent (column alignment, time formats, tier names) and JSON is always the
//! response message itself, serialised by the serde derives of `dr_proto::pb`, which
//! scripts may rely on.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

/// Pretty JSON of any response message, newline-terminated.
pub fn json<T: Serialize>(value: &T) -> String {
    match serde_json::to_string_pretty(value) {
        Ok(mut s) => {
            s.push('\n');
            s
        }
        // Serialising plain data cannot fail; keep the output valid JSON if it ever does.
        Err(e) => format!("{{\"error\": {:?}}}\n", e.to_string()),
    }
}

/// A text table: left-aligned columns separated by two spaces, headers upper-cased.
#[derive(Debug, Default, Clone)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(headers: I) -> Self {
        Self {
            headers: headers
                .into_iter()
                .map(|h| h.into().to_uppercase())
                .collect(),
            rows: Vec::new(),
        }
    }

    pub fn row<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, cells: I) -> &mut Self {
        self.rows.push(cells.into_iter().map(Into::into).collect());
        self
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let cols = self
            .headers
            .len()
            .max(self.rows.iter().map(Vec::len).max().unwrap_or(0));
        let mut widths = vec![0usize; cols];
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `critical`, `important`, `non-critical` for a `pb::Tier` value.
pub fn tier_name(tier: i32) -> &'static str {
    match dr_proto::pb::Tier::try_from(tier) {
        Ok(dr_proto::pb::Tier::Critical) => "critical",
        Ok(dr_proto::pb::Tier::Important) => "important",
        Ok(dr_proto::pb::Tier::NonCritical) => "non-critical",
        _ => "-",
    }
}

/// `passing`, `failing`, `unknown` for a `pb::CheckState` value.
pub fn check_state_name(state: i32) -> &'static str {
    match dr_proto::pb::CheckState::try_from(state) {
        Ok(dr_proto::pb::CheckState::Passing) => "passing",
        Ok(dr_proto::pb::CheckState::Failing) => "failing",
        _ => "unknown",
    }
}

/// How long ago `unix_ms` was, relative to `now_ms`: `3s ago`, `5m ago`, `-` when unset.
pub fn ago(unix_ms: i64, now_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    let secs = (now_ms - unix_ms).max(0) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// RFC 3339 UTC time for `unix_ms`, `-` when unset.
pub fn timestamp(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    chrono::DateTime::from_timestamp_millis(unix_ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| "-".into())
}

pub fn opt_u64(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

pub fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_and_trims() {
        let mut t = Table::new(["host", "state", "checks"]);
        t.row(["bj-db-1", "up", "3/3"])
            .row(["site-gw-001", "down", ""]);
        assert_eq!(
            t.render(),
            "HOST         STATE  CHECKS\nbj-db-1      up     3/3\nsite-gw-001  down\n"
        );
    }

    #[test]
    fn times() {
        assert_eq!(ago(0, 10_000), "-");
        assert_eq!(ago(7_000, 10_000), "3s ago");
        assert_eq!(ago(1, 1 + 7_200_000), "2h ago");
        assert_eq!(timestamp(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn enum_names_and_json() {
        assert_eq!(tier_name(dr_proto::pb::Tier::Critical as i32), "critical");
        assert_eq!(
            check_state_name(dr_proto::pb::CheckState::Failing as i32),
            "failing"
        );
        assert_eq!(tier_name(99), "-");
        let v = dr_proto::pb::WhoAmIResponse {
            identity: "spiffe://x/operator/a?role=admin".into(),
            ..Default::default()
        };
        let s = json(&v);
        let back: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back["identity"], "spiffe://x/operator/a?role=admin");
    }
}
