#!/usr/bin/env bash
# Fan-in benchmark (issue 2): SESSIONS agent sessions over mutual TLS (each its own
# certificate), every one heartbeating every second with 5 check results, against a
# 3-node cluster; samples the leader's CPU and RSS over DURATION and measures the
# RunAction round trip drctl -> leader -> agent -> back. The load generator runs in its
# own process (file descriptors: 10,000 sockets on each side). Release binaries needed.
source "$(dirname "$0")/bench-lib.sh"
SESSIONS=${SESSIONS:-10000}
DURATION=${DURATION:-60s}
ROUND_TRIPS=${ROUND_TRIPS:-200}

ulimit -Sn "$(ulimit -Hn)"
machine
echo "open files: $(ulimit -n)"
start_cluster
leader=0
for _ in $(seq 1 50); do leader=$(leader_id); [ "$leader" != 0 ] && break; sleep 0.2; done
pid=$(cat "$WORK/coordinator-$leader.pid")
echo "leader: node $leader, pid $pid"
EPS="127.0.0.1:$((BASE_PORT+leader))"
for n in 1 2 3; do [ "$n" != "$leader" ] && EPS="$EPS,127.0.0.1:$((BASE_PORT+n))"; done
"$BIN/dr-loadgen" --ca-dir "$WORK/tls" --endpoints "$EPS" --sessions "$SESSIONS" \
    --duration "$DURATION" --round-trips "$ROUND_TRIPS" --watch-pid "$pid" \
    --cert-dir "$WORK/load-certs" ${LOADGEN_ARGS:-}
echo "leader after the run: node $(leader_id) (was $leader)"
# The machine is shared: say how busy it was by the end as well.
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
