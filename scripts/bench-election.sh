#!/usr/bin/env bash
# Election benchmark (issue 2): kill -9 the leader of a 3-node cluster ROUNDS times
# (restarting it each time) and measure kill -> first committed write at the new leader.
# Timings are those of deploy/examples/coordinator.toml (150 ms heartbeat, 600-1200 ms
# election timeout). Prints every sample and the median. Needs release binaries:
#   cargo build --release -p dr-coordinator -p dr-agent -p dr-tests -p drctl
source "$(dirname "$0")/bench-lib.sh"
ROUNDS=${ROUNDS:-10}

machine
start_cluster
EPS="127.0.0.1:$((BASE_PORT+1)),127.0.0.1:$((BASE_PORT+2)),127.0.0.1:$((BASE_PORT+3))"
probe() {
    "$BIN/dr-bench" --ca "$WORK/tls/ca.pem" --cert "$WORK/tls/operator-bench.pem" \
        --key "$WORK/tls/operator-bench.key" first-write --endpoints "$EPS" "$@"
}
probe --since-unix-ms "$(now_ms)" >/dev/null   # the cluster takes writes

samples=()
for round in $(seq 1 "$ROUNDS"); do
    leader=0
    for _ in $(seq 1 50); do leader=$(leader_id); [ "$leader" != 0 ] && break; sleep 0.2; done
    [ "$leader" = 0 ] && { echo "no leader before round $round" >&2; exit 1; }
    pid=$(cat "$WORK/coordinator-$leader.pid")
    t0=$(now_ms)
    kill -KILL "$pid"
    ms=$(probe --since-unix-ms "$t0")
    samples+=("$ms")
    echo "round $round: killed leader $leader, first committed write after $ms ms"
    start_coord "$leader"
    sleep 3   # let the restarted node catch up before the next round
done
printf '%s\n' "${samples[@]}" | sort -n | awk '{a[NR]=$1} END {
    m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2;
    printf "median of %d: %d ms (min %d, max %d)\n", NR, m, a[1], a[NR] }'
