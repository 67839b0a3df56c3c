#!/usr/bin/env bash
# Commit throughput (issue 2): concurrent writes through RaftNode::write on 3 in-process
# nodes (SQLite log, synchronous=FULL, mTLS replication over loopback); median of RUNS.
source "$(dirname "$0")/bench-lib.sh"
machine
setup_pki
cd "$ROOT"
cargo run --release -q -p dr-coordinator --example bench_commit -- --tls-dir "$WORK/tls" \
    --nodes 3 --concurrency "${CONCURRENCY:-128}" --writes "${WRITES:-20000}" --runs "${RUNS:-5}"
