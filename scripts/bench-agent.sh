#!/usr/bin/env bash
# dr-agent at rest (issue 2): one agent with 5 checks every second (tcp, disk, command,
# process pidfile, http) connected to a 3-node cluster; after WARMUP, samples its RSS
# and CPU from /proc over WINDOW seconds. Release binaries needed.
source "$(dirname "$0")/bench-lib.sh"
WARMUP=${WARMUP:-10}
WINDOW=${WINDOW:-60}

machine
start_cluster
"$BIN/drctl" cert issue --ca-dir "$WORK/tls" --kind agent --name rest-1 >/dev/null
echo $$ > "$WORK/self.pid"
cat > "$WORK/agent.toml" <<EOT
version = 1
host_id = "rest-1"
region = "beijing"
site = "bj-dc1"
roles = ["app"]
coordinators = ["127.0.0.1:$((BASE_PORT+1))", "127.0.0.1:$((BASE_PORT+2))", "127.0.0.1:$((BASE_PORT+3))"]
data_dir = "$WORK/data/agent"
[tls]
ca = "$WORK/tls/ca.pem"
cert = "$WORK/tls/agent-rest-1.pem"
key = "$WORK/tls/agent-rest-1.key"
[[checks]]
name = "coordinator-port"
kind = "tcp"
service = "dr"
tier = "critical"
interval = "1s"
timeout = "1s"
addr = "127.0.0.1:$((BASE_PORT+1))"
[[checks]]
name = "disk"
kind = "disk"
service = "dr"
tier = "important"
interval = "1s"
timeout = "1s"
path = "$WORK"
min_free_percent = 1.0
[[checks]]
name = "true"
kind = "command"
service = "dr"
tier = "non-critical"
interval = "1s"
timeout = "1s"
command = ["true"]
[[checks]]
name = "bench-script"
kind = "process"
service = "dr"
tier = "non-critical"
interval = "1s"
timeout = "1s"
pidfile = "$WORK/self.pid"
[[checks]]
name = "coordinator-port-2"
kind = "tcp"
service = "dr"
tier = "important"
interval = "1s"
timeout = "1s"
addr = "127.0.0.1:$((BASE_PORT+2))"
EOT
"$BIN/dr-agent" --config "$WORK/agent.toml" --check-config >/dev/null
RUST_LOG=${RUST_LOG:-warn} "$BIN/dr-agent" --config "$WORK/agent.toml" >>"$WORK/logs/agent.log" 2>&1 &
apid=$!
echo "$apid" >> "$WORK/pids"
sleep "$WARMUP"
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' "/proc/$apid/stat"; }
c0=$(cpu); t0=$(date +%s.%N); max=0
for _ in $(seq 1 "$WINDOW"); do
    r=$(awk '/VmRSS/{print $2}' "/proc/$apid/status"); [ "$r" -gt "$max" ] && max=$r
    sleep 1
done
c1=$(cpu); t1=$(date +%s.%N)
python3 - "$c0" "$c1" "$t0" "$t1" "$ticks" "$max" <<'PY'
import sys
c0, c1, t0, t1, hz, rss = map(float, sys.argv[1:])
print(f"dr-agent at rest, 5 checks/s: cpu {100*(c1-c0)/hz/(t1-t0):.2f} % of a core over {t1-t0:.0f} s, rss max {rss/1024:.1f} MB")
PY
"$BIN/drctl" --config "$WORK/drctl.toml" agents show rest-1 2>/dev/null | head -5 || true
