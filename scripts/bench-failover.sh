#!/usr/bin/env bash
# bench-failover.sh: regional failover, ours vs Patroni, side by side in ONE run (issue 5).
#
#   (a) unplanned: host loss (SIGKILL of the primary's postmaster + children and of its
#       manager: Patroni, or our agent and beijing's coordinator) to the first write accepted
#       on the new primary; median of REPS. Patroni with ttl 10 / loop_wait 2 / retry_timeout 4.
#   (b) planned switchover: request to the first write on the new primary, and the gap
#       between the last write on the old and the first on the new (write-unavailable time);
#       acknowledged rows lost.
#   (c) RPO of (a) with a writer at RPO_RATE inserts/s: acknowledged writes missing after
#       the promotion (ours only; Patroni's writer runs at 10/s, see docs/benchmarks.md).
#
# Patroni is driven by the team's reference script (../shared/bench/patroni-anchor.sh, or
# PATRONI_ANCHOR=...): its functions are sourced and only the tuned experiments run (B and
# C-tuned), so both sides use the same writer method and the same analysis. Ours is driven
# by target/debug/dr-failover-bench (tests/src/bin/dr-failover-bench.rs), which starts the
# real binaries with the test harness (one fresh world per repetition).
#
# Conventions of scripts/bench-lib.sh: everything under a work dir ($WORK), every process
# started is stopped by PID (the anchor's pid files; the bench binary's ChildGuards).
# Installs patroni and etcd-server with apt when missing (this bench only; test.sh never does).
#
# Usage (root; about 25 minutes):
#   scripts/bench-failover.sh      REPS=10 BJ_LEADER_REPS=5 PLANNED_REPS=5 RPO_REPS=5 RPO_RATE=500
#   SKIP_PATRONI=1 scripts/bench-failover.sh      ours only
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPS=${REPS:-10}
PLANNED_REPS=${PLANNED_REPS:-5}
RPO_REPS=${RPO_REPS:-5}
BJ_LEADER_REPS=${BJ_LEADER_REPS:-5}
RPO_RATE=${RPO_RATE:-500}
LEASE=${LEASE:-2s}
DETECT_AFTER=${DETECT_AFTER:-1s}
# Our coordinators' Raft timings: deploy/examples/coordinator.toml's (the test harness's own
# are slower, for CI stability).
RAFT_TIMINGS=${RAFT_TIMINGS:-100ms,500ms,1000ms}
WORK=${WORK:-$(mktemp -d /tmp/dr-bench-failover.XXXXXX)}
PATRONI_ANCHOR=${PATRONI_ANCHOR:-$ROOT/../shared/bench/patroni-anchor.sh}
mkdir -p "$WORK"
echo "work dir: $WORK" >&2

{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -sr), $(nproc) cpus, $(free -g | awk '/Mem/{print $2}') GiB"
    echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)"
} > "$WORK/versions.txt"

# ------------------------------------------------------------------ Patroni (tuned)
run_patroni() {
    [ -f "$PATRONI_ANCHOR" ] || { echo "no $PATRONI_ANCHOR: set PATRONI_ANCHOR" >&2; return 1; }
    # shellcheck disable=SC1090
    source <(sed '/^main "\$@"$/d' "$PATRONI_ANCHOR")
    if [ -e "$BASE" ]; then
        for f in "$BASE"/pids/*.pid; do
            [ -f "$f" ] && alive "$(cat "$f")" && { echo "$BASE has live processes ($f)" >&2; return 1; }
        done
        rm -rf "$BASE"
    fi
    mkdir -p "$BASE/logs"; : > "$BASE/run.log"
    install_pkgs
    trap cleanup EXIT
    gen_configs; gen_python
    echo "patroni: $(patroni --version); etcd: $(etcd --version | head -1)" >> "$WORK/versions.txt"
    echo "exp,rep,write_unavail_s,write_gap_s,leader_rest_s,lock_log_s,failed_attempts,acked,present,lost,unacked_present" > "$BASE/results.csv"
    start_etcd || return 1
    start_patroni 1
    wait_code $API1 /primary 200 120 || { log "node1 did not become primary"; return 1; }
    psql_n 1 -c "CREATE TABLE anchor_t(id bigserial primary key, rep text, seq int, ts timestamptz default clock_timestamp())"
    start_patroni 2
    wait_healthy 1 2 120 || { log "replica not streaming"; return 1; }
    set_timing 10 2 4
    log "=== Patroni B: host loss, ttl=10 loop_wait=2 retry_timeout=4, $REPS reps"
    for i in $(seq 1 "$REPS"); do run_kill B "$i" 2 10; done
    log "=== Patroni C-tuned: switchover, $PLANNED_REPS reps"
    for i in $(seq 1 "$PLANNED_REPS"); do run_switchover C-tuned "$i"; done
    $PY "$BASE/bin/summary.py" "$BASE/results.csv" | tee "$WORK/patroni-summary.md"
    cp "$BASE/results.csv" "$WORK/patroni.csv"
    cleanup
    trap - EXIT
}

# ------------------------------------------------------------------ ours
run_ours() {
    (cd "$ROOT" && cargo build -q -p dr-agent -p dr-coordinator -p drctl -p dr-tests --bin dr-failover-bench) || return 1
    # A private copy of the binaries: the shared target dir may be rebuilt by others mid-run.
    mkdir -p "$WORK/bin"
    for b in dr-agent dr-coordinator drctl dr-failover-bench; do cp "$ROOT/target/debug/$b" "$WORK/bin/" || return 1; done
    export DR_BIN_DIR=$WORK/bin
    export DR_HARNESS_RAFT=$RAFT_TIMINGS
    echo "ours: lease $LEASE, detect_after $DETECT_AFTER, raft heartbeat/election $RAFT_TIMINGS" >> "$WORK/versions.txt"
    local b="$WORK/bin/dr-failover-bench" common=(--lease "$LEASE" --detect-after "$DETECT_AFTER" --csv "$WORK/ours.csv")
    echo "mode,rep,to_first_write_s,gap_s,acked,lost,lost_s,leader_was_beijing,rate" > "$WORK/ours.csv"
    RUST_LOG=${RUST_LOG:-warn} "$b" --mode unplanned --reps "$REPS" "${common[@]}" 2>>"$WORK/ours.log" | tee -a "$WORK/ours-summary.txt"
    RUST_LOG=${RUST_LOG:-warn} "$b" --mode unplanned --leader beijing --reps "$BJ_LEADER_REPS" "${common[@]}" 2>>"$WORK/ours.log" | tee -a "$WORK/ours-summary.txt"
    RUST_LOG=${RUST_LOG:-warn} "$b" --mode planned --reps "$PLANNED_REPS" "${common[@]}" 2>>"$WORK/ours.log" | tee -a "$WORK/ours-summary.txt"
    RUST_LOG=${RUST_LOG:-warn} "$b" --mode rpo --rate "$RPO_RATE" --reps "$RPO_REPS" "${common[@]}" 2>>"$WORK/ours.log" | tee -a "$WORK/ours-summary.txt"
}

if [ "${SKIP_PATRONI:-0}" != 1 ]; then
    ( run_patroni ) || echo "Patroni part failed; see /tmp/anchor-patroni/run.log" >&2
fi
run_ours || echo "our part failed; see $WORK/ours.log" >&2
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$WORK/versions.txt"

# ------------------------------------------------------------------ side by side
python3 - "$WORK" <<'EOF'
import csv, os, statistics, sys
w = sys.argv[1]
def med(v):
    v = [x for x in v if x == x]
    return statistics.median(v) if v else float('nan')
ours = list(csv.DictReader(open(os.path.join(w, 'ours.csv')))) if os.path.exists(os.path.join(w, 'ours.csv')) else []
pat = list(csv.DictReader(open(os.path.join(w, 'patroni.csv')))) if os.path.exists(os.path.join(w, 'patroni.csv')) else []
f = lambda rows, k: med([float(r[k]) for r in rows if r[k] not in ('', 'nan')])
ou = [r for r in ours if r['mode'] == 'ours-unplanned']
op = [r for r in ours if r['mode'] == 'ours-planned']
orp = [r for r in ours if r['mode'] == 'ours-rpo']
pb = [r for r in pat if r['exp'] == 'B']
pc = [r for r in pat if r['exp'] == 'C-tuned']
print(open(os.path.join(w, 'versions.txt')).read())
print('| case | ours (n, median) | Patroni tuned (n, median) | ratio |')
print('|---|---|---|---|')
def line(name, a, na, b, nb):
    r = a / b if b == b and b else float('nan')
    print('| %s | %d, %.2f s | %d, %.2f s | %.2f |' % (name, na, a, nb, b, r))
line('unplanned: host loss to first write on the new primary', f(ou, 'to_first_write_s'), len(ou), f(pb, 'write_unavail_s'), len(pb))
ob = [r for r in ours if r['mode'] == 'ours-unplanned-leader-in-beijing']
line('unplanned, our Raft leader lost with beijing (worst case; Patroni: etcd survives)', f(ob, 'to_first_write_s'), len(ob), f(pb, 'write_unavail_s'), len(pb))
line('planned: request to first write on the new primary', f(op, 'to_first_write_s'), len(op), f(pc, 'write_unavail_s'), len(pc))
line('planned: write gap (last old write to first new)', f(op, 'gap_s'), len(op), f(pc, 'write_gap_s'), len(pc))
print('| planned: acknowledged rows lost (total) | %d | %d | |' % (sum(int(r['lost']) for r in op), sum(int(r['lost']) for r in pc)))
print('| unplanned at ~%s writes/s: acknowledged writes lost, median (max) | %s (%s) writes, %.3f s (%.3f s) | | |' % (
    orp[0]['rate'] if orp else '?', med([int(r['lost']) for r in orp]), max([int(r['lost']) for r in orp], default=0),
    f(orp, 'lost_s'), max([float(r['lost_s']) for r in orp], default=0)))
EOF
echo "raw results: $WORK" >&2
