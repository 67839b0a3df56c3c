//! Benchmark of the audit hash chain: hashing cost per entry (what `apply` adds to every
//! committed request) and the throughput of `drctl audit verify --file` on a large export
//! (parse JSON lines + verify).
//!
//! `cargo run --release -p dr-proto --example bench_audit_chain -- [ENTRIES [EXPORT_FILE]]`
//! (default 1 000 000 entries; with EXPORT_FILE the JSON lines are also written there).
//! Figures go to docs/benchmarks.md, "Audit chain (issue 6)".

use std::time::Instant;

use dr_proto::audit_chain::{AuditEntry, VerifyOptions, chain, entry_hash, parse_jsonl, verify};

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    // Entries shaped like real ones (an operator issuing a command to a host).
    let raw: Vec<AuditEntry> = (1..=n)
        .map(|i| AuditEntry {
            seq: i,
            log_index: i + 3,
            at_unix_ms: 1_780_000_000_000 + i as i64,
            origin: "spiffe://dr.yeslocker.internal/operator/alice?role=operator".into(),
            what: "issue_commands".into(),
            target: format!("run-{i:08}-bj-db-1@bj-db-1 run_checks"),
            result: "applied".into(),
            prev_hash: String::new(),
            hash: String::new(),
        })
        .collect();

    let t = Instant::now();
    let chained = chain(raw);
    let hash_s = t.elapsed().as_secs_f64();

    let mut text = String::with_capacity(chained.len() * 330);
    for e in &chained {
        text.push_str(&serde_json::to_string(e).expect("serialise"));
        text.push('\n');
    }

    // Optionally keep the export, to time a peer (e.g. `sha256sum FILE`) on the same bytes.
    if let Some(path) = std::env::args().nth(2) {
        std::fs::write(&path, &text).expect("write the export");
    }

    let t = Instant::now();
    let (parsed, problems) = parse_jsonl(&text, 1);
    let parse_s = t.elapsed().as_secs_f64();
    assert!(problems.is_empty());

    let t = Instant::now();
    let report = verify(
        &parsed,
        &VerifyOptions {
            from_genesis: true,
            anchors: vec![],
        },
    );
    let verify_s = t.elapsed().as_secs_f64();
    assert!(report.ok(), "{:?}", report.problems);

    // One hash, as apply computes it (the per-request overhead).
    let e = &chained[chained.len() / 2];
    let reps = 200_000;
    let t = Instant::now();
    let mut sink = 0usize;
    for _ in 0..reps {
        sink += entry_hash(e).len();
    }
    let one_ns = t.elapsed().as_nanos() as f64 / reps as f64;
    assert!(sink > 0);

    let mb = text.len() as f64 / 1e6;
    println!("entries               {n}");
    println!("export size           {mb:.1} MB");
    println!("entry_hash (apply)    {one_ns:.0} ns/entry");
    println!(
        "chain build           {:.2} s ({:.0} entries/s)",
        hash_s,
        n as f64 / hash_s
    );
    println!(
        "parse JSON lines      {:.2} s ({:.0} MB/s)",
        parse_s,
        mb / parse_s
    );
    println!(
        "verify                {:.2} s ({:.0} entries/s)",
        verify_s,
        n as f64 / verify_s
    );
    println!(
        "verify --file total   {:.2} s for {n} entries",
        parse_s + verify_s
    );
}
