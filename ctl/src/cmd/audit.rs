//! `drctl audit list|export|verify`: the hash-chained audit log.
//!
//! Why an offline verify (`--file`): an export is compliance evidence that outlives the
//! cluster; an auditor must be able to check it without access to a coordinator, with
//! the same verifier the coordinators run (`dr_proto::audit_chain`). Verification reports
//! every problem, each naming its entry, and fails (exit 1) if there is any.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use dr_proto::audit_chain::{self, AuditEntry, VerifyOptions};
use dr_proto::pb;
use dr_proto::pb::audit_service_client::AuditServiceClient;
use futures::StreamExt as _;

use crate::client::Client;
use crate::cmd::UsageError;
use crate::output::{OutputFormat, Table, json, now_ms, timestamp};

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Newest entries (archive and state of the answering coordinator), oldest first.
    List {
        /// RFC 3339 time (2026-01-31T12:00:00Z), or an age (2h, 7d).
        #[arg(long, value_parser = parse_since)]
        since: Option<i64>,
        /// Only entries whose origin contains this (an operator name, `agent/bj-db-1`).
        #[arg(long)]
        actor: Option<String>,
        /// At most this many entries (the newest).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Every entry as JSON lines (the archive's format), for compliance evidence.
    Export {
        #[arg(long, value_parser = parse_since)]
        since: Option<i64>,
        /// Write to this file (atomically) instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Verify the hash chain held by the coordinator, or an export file offline (--file).
    Verify {
        /// An export (`drctl audit export`) or a node's audit-archive.jsonl: verified
        /// locally, no coordinator needed.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// The file is an export made with --since (it need not start at seq 1).
        #[arg(long)]
        partial: bool,
        /// SEQ:HASH recorded earlier (printed by every verify) that must still match.
        #[arg(long = "anchor", value_name = "SEQ:HASH")]
        anchors: Vec<String>,
    },
}

/// `--since`: RFC 3339, an age like `2h`, or unix milliseconds.
pub fn parse_since(s: &str) -> Result<i64, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(now_ms() - i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        Err(_) => Err(format!(
            "`{s}` is neither an RFC 3339 time (2026-01-31T12:00:00Z) nor an age (2h, 7d)"
        )),
    }
}

fn entry(r: pb::AuditRecord) -> AuditEntry {
    AuditEntry {
        seq: r.seq,
        log_index: r.log_index,
        at_unix_ms: r.at_unix_ms,
        origin: r.origin,
        what: r.what,
        target: r.target,
        result: r.result,
        prev_hash: r.prev_hash,
        hash: r.hash,
    }
}

pub async fn run(client: &Client, cmd: AuditCmd, format: OutputFormat) -> anyhow::Result<()> {
    match cmd {
        AuditCmd::List {
            since,
            actor,
            limit,
        } => {
            let req = pb::ListAuditRequest {
                since_unix_ms: since.unwrap_or(0),
                actor: actor.unwrap_or_default(),
                limit,
            };
            let resp = client
                .call_service("audit list", AuditServiceClient::new, |mut c| {
                    let req = req.clone();
                    async move { c.list_audit(req).await }
                })
                .await?;
            match format {
                OutputFormat::Json => print!("{}", json(&resp)),
                OutputFormat::Text => {
                    let mut t = Table::new(["seq", "time", "origin", "what", "target", "result"]);
                    for e in &resp.entries {
                        t.row([
                            e.seq.to_string(),
                            timestamp(e.at_unix_ms),
                            e.origin.clone(),
                            e.what.clone(),
                            e.target.clone(),
                            e.result.clone(),
                        ]);
                    }
                    print!("{}", t.render());
                    println!("head: {}:{}", resp.head_seq, resp.head_hash);
                }
            }
        }
        AuditCmd::Export { since, out } => {
            let entries = export(client, since.unwrap_or(0)).await?;
            let mut buf = Vec::with_capacity(entries.len() * 300);
            for e in &entries {
                serde_json::to_writer(&mut buf, e)?;
                buf.push(b'\n');
            }
            match out {
                None => std::io::stdout().write_all(&buf)?,
                Some(path) => {
                    write_atomically(&path, &buf)?;
                    eprintln!("{} entries written to {}", entries.len(), path.display());
                }
            }
        }
        AuditCmd::Verify {
            file: Some(path),
            partial,
            anchors,
        } => {
            let anchors = parse_anchors(&anchors)?;
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("read the audit export {}", path.display()))?;
            let (entries, mut problems) = audit_chain::parse_jsonl(&text, 1);
            let report = audit_chain::verify(
                &entries,
                &VerifyOptions {
                    from_genesis: !partial,
                    anchors,
                },
            );
            problems.extend(report.problems.iter().cloned());
            let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
            let summary = pb::VerifyAuditResponse {
                ok: lines.is_empty(),
                node_id: 0,
                entries: report.entries as u64,
                archived: 0,
                in_state: 0,
                pre_chain: report.pre_chain as u64,
                duplicates: report.duplicates as u64,
                first_seq: report.first_seq,
                head_seq: report.head_seq,
                head_hash: report.head_hash.clone(),
                problems: lines,
            };
            print_verify(&summary, &format!("file {}", path.display()), format);
            finish(&summary)?;
        }
        AuditCmd::Verify {
            file: None,
            partial: _,
            anchors,
        } => {
            parse_anchors(&anchors)?;
            let resp = client
                .call_service("audit verify", AuditServiceClient::new, |mut c| {
                    let req = pb::VerifyAuditRequest {
                        anchors: anchors.clone(),
                    };
                    async move { c.verify_audit(req).await }
                })
                .await?;
            let source = format!(
                "coordinator {} ({} archived + {} in state)",
                resp.node_id, resp.archived, resp.in_state
            );
            print_verify(&resp, &source, format);
            finish(&resp)?;
        }
    }
    Ok(())
}

fn parse_anchors(anchors: &[String]) -> anyhow::Result<Vec<(u64, String)>> {
    anchors
        .iter()
        .map(|a| audit_chain::parse_anchor(a).map_err(|e| UsageError(e).into()))
        .collect()
}

async fn export(client: &Client, since: i64) -> anyhow::Result<Vec<AuditEntry>> {
    let stream = client
        .call_service(
            "audit export",
            AuditServiceClient::new,
            |mut c| async move {
                c.export_audit(pb::ExportAuditRequest {
                    since_unix_ms: since,
                })
                .await
            },
        )
        .await?;
    let mut stream = stream;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| {
            anyhow::anyhow!(
                "audit export interrupted: {}; nothing was written",
                s.message()
            )
        })?;
        out.extend(chunk.entries.into_iter().map(entry));
    }
    Ok(out)
}

/// Writes `FILE.tmp`, fsyncs it, renames it over `FILE`: never half an export.
fn write_atomically(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

fn print_verify(r: &pb::VerifyAuditResponse, source: &str, format: OutputFormat) {
    match format {
        OutputFormat::Json => print!("{}", json(r)),
        OutputFormat::Text => {
            let range = if r.entries == 0 {
                "no entries".to_owned()
            } else {
                format!("seq {}..{}", r.first_seq, r.head_seq)
            };
            if r.ok {
                println!(
                    "audit chain OK: {} entries ({range}) in {source}",
                    r.entries
                );
            } else {
                println!(
                    "audit chain FAILED: {} problem(s) in {} entries ({range}) in {source}",
                    r.problems.len(),
                    r.entries
                );
                for p in &r.problems {
                    println!("  - {p}");
                }
            }
            if r.pre_chain > 0 {
                println!(
                    "note: the first {} entries predate the hash chain and cannot be verified",
                    r.pre_chain
                );
            }
            if r.duplicates > 0 {
                println!("note: {} identical duplicate entries ignored", r.duplicates);
            }
            if !r.head_hash.is_empty() {
                println!(
                    "head (anchor): {}:{}  (record it; `drctl audit verify --anchor {}:{}` checks it later, also on other coordinators)",
                    r.head_seq, r.head_hash, r.head_seq, r.head_hash
                );
            }
        }
    }
}

fn finish(r: &pb::VerifyAuditResponse) -> anyhow::Result<()> {
    if r.ok {
        Ok(())
    } else {
        anyhow::bail!(
            "audit chain verification failed with {} problem(s) (listed above)",
            r.problems.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_rfc3339_age_and_ms() {
        assert_eq!(parse_since("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(parse_since("1234"), Ok(1234));
        let two_h = parse_since("2h").unwrap();
        assert!((now_ms() - two_h - 7_200_000).abs() < 5_000);
        assert!(parse_since("yesterday").unwrap_err().contains("RFC 3339"));
    }
}
