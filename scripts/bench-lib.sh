# Shared helpers of the scripts/bench-*.sh benchmarks (sourced, not run).
# Starts release binaries on 127.0.0.1 under a work dir; every process it starts is
# recorded in $WORK/pids and stopped by PID on exit. A work dir this file made (no WORK given)
# is removed on exit unless KEEP=1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}
MADE_WORK=0
if [ -z "${WORK:-}" ]; then WORK=$(mktemp -d /tmp/dr-bench.XXXXXX); MADE_WORK=1; fi
BASE_PORT=${BASE_PORT:-27100}
mkdir -p "$WORK"
: > "$WORK/pids"

cleanup() {
    [ -f "$WORK/pids" ] || return 0   # already cleaned up (a script may call it before exit)
    while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done < "$WORK/pids"
    sleep 1
    while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done < "$WORK/pids"
    if [ "$MADE_WORK" = 1 ] && [ "${KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

now_ms() { date +%s%3N; }

# setup_pki: CA, coordinators 1..3, an admin operator.
setup_pki() {
    "$BIN/drctl" cert init --trust-domain bench.dr --out "$WORK/tls" >/dev/null
    for n in 1 2 3; do
        "$BIN/drctl" cert issue --ca-dir "$WORK/tls" --kind coordinator --name "$n" >/dev/null
    done
    "$BIN/drctl" cert issue --ca-dir "$WORK/tls" --kind operator --name bench --role admin >/dev/null
    cat > "$WORK/drctl.toml" <<EOT
endpoints = ["127.0.0.1:$((BASE_PORT+1))", "127.0.0.1:$((BASE_PORT+2))", "127.0.0.1:$((BASE_PORT+3))"]
timeout = "5s"
[tls]
ca = "$WORK/tls/ca.pem"
cert = "$WORK/tls/operator-bench.pem"
key = "$WORK/tls/operator-bench.key"
EOT
}

# coord_config N: by default the election timings of deploy/examples/coordinator.toml
# (override with HEARTBEAT, ELECTION_MIN, ELECTION_MAX).
coord_config() {
    local n=$1 regions=(x beijing shanghai witness)
    {
        echo "version = 1"
        echo "node_id = $n"
        echo "region = \"${regions[$n]}\""
        echo "listen = \"127.0.0.1:$((BASE_PORT+n))\""
        echo "data_dir = \"$WORK/data/coordinator-$n\""
        for p in 1 2 3; do
            [ "$p" = "$n" ] && continue
            printf '[[peers]]\nnode_id = %s\naddr = "127.0.0.1:%s"\nregion = "%s"\n' "$p" "$((BASE_PORT+p))" "${regions[$p]}"
        done
        printf '[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n' "$WORK/tls/ca.pem" "$WORK/tls/coordinator-$n.pem" "$WORK/tls/coordinator-$n.key"
        printf '[raft]\nheartbeat_interval = "%s"\nelection_timeout_min = "%s"\nelection_timeout_max = "%s"\nsnapshot_every = 5000\n' "${HEARTBEAT:-150ms}" "${ELECTION_MIN:-600ms}" "${ELECTION_MAX:-1200ms}"
        printf '[agents]\nheartbeat_interval = "1s"\ndown_after = "5s"\n'
    } > "$WORK/coordinator-$n.toml"
}

# start_coord N: starts coordinator N, its PID in $WORK/coordinator-N.pid.
start_coord() {
    local n=$1
    mkdir -p "$WORK/logs"
    RUST_LOG=${RUST_LOG:-warn} "$BIN/dr-coordinator" --config "$WORK/coordinator-$n.toml" \
        >>"$WORK/logs/coordinator-$n.log" 2>&1 &
    echo $! > "$WORK/coordinator-$n.pid"
    echo $! >> "$WORK/pids"
}

drctl() { "$BIN/drctl" --config "$WORK/drctl.toml" "$@"; }

start_cluster() {
    setup_pki
    for n in 1 2 3; do coord_config "$n"; start_coord "$n"; done
    local members=()
    for n in 1 2 3; do
        local r; r=$(sed -n 's/^region = "\(.*\)"/\1/p' "$WORK/coordinator-$n.toml")
        members+=(--member "$n=127.0.0.1:$((BASE_PORT+n))@$r")
    done
    for _ in $(seq 1 100); do
        drctl --endpoint "127.0.0.1:$((BASE_PORT+1))" cluster init "${members[@]}" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "cluster init failed" >&2
    return 1
}

# leader_id: the leader's node id as node ENDPOINT sees it (0: none).
leader_id() {
    drctl --output json cluster status 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin).get("leader_id", 0))' 2>/dev/null || echo 0
}

machine() {
    echo "machine: $(nproc) vCPU, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -sr), load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
}

# Helpers of the PostgreSQL benches (bench-backup.sh, bench-wal.sh, bench-restic.sh). They
# read the caller's PGBIN, PORT, LOG (the run log) and RAW (metric, rep, value per line).

# pg_bench_prelude: what each of them needs first: PostgreSQL's binaries (PGBIN), the agent
# (AGENT, built in release unless SKIP_BUILD=1), and root (PostgreSQL and the tools run as
# the postgres user).
pg_bench_prelude() {
    PGBIN=/usr/lib/postgresql/15/bin
    AGENT=$BIN/dr-agent
    [ "$(id -u)" = 0 ] || { echo "run as root (PostgreSQL runs as the postgres user)" >&2; exit 2; }
    if [ "${SKIP_BUILD:-0}" != 1 ]; then (cd "$ROOT" && cargo build --release -p dr-agent); fi
}
asp() { runuser -u postgres -- "$@"; }
psql_() { local p=$1; shift; asp "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$p" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }
q() { psql_ "$PORT" -Atc "$1"; }
now() { date +%s.%N; }
dt() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }
log() { echo "[$(date +%T)] $*" | tee -a "$LOG" >&2; }
rec() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$RAW"; log "RESULT $1 #$2 = $3"; }
bytes() { du -sb "$@" 2>/dev/null | awk '{s+=$1} END{print s+0}'; }
# timed METRIC REP CMD...: record CMD's wall time in seconds (its output goes to LOG).
timed() {
    local m=$1 r=$2; shift 2
    local t0 t1
    t0=$(now)
    "$@" >>"$LOG" 2>&1 || { log "FAILED: $*"; tail -20 "$LOG" >&2; return 1; }
    t1=$(now)
    rec "$m" "$r" "$(dt "$t0" "$t1")"
}
# med METRIC: the median of METRIC's values in RAW ("n/a" without any); mb BYTES: megabytes.
med() { awk -F'\t' -v m="$1" '$1==m{print $3}' "$RAW" | sort -g | awk '{v[NR]=$1} END{if(!NR){print "n/a"; exit} printf "%s", v[int((NR+1)/2)]}'; }
mb() { awk -v v="$1" 'BEGIN{printf "%.1f", v/1e6}'; }

# The push row of bench-backup.sh and bench-wal.sh: the helpers above plus the caller's AGENT,
# PGBR, REPS, W (with walbench.toml and walcopy/) and the segs array.
#
# push_time METRIC REP CMD...: wall time of CMD alone. It is timed inside the postgres user's
# shell, so runuser's own 5-7 ms are not in it. It reads bash's EPOCHREALTIME, so no `date`
# process is started and waited for inside the interval either.
push_time() {
    local m=$1 r=$2 v; shift 2
    v=$(asp bash -c 's=${EPOCHREALTIME//[!0-9]/}; "$@" >/dev/null 2>&1 || exit 1; e=${EPOCHREALTIME//[!0-9]/}; echo $(( e - s ))' _ "$@") \
        || { log "FAILED: $*"; return 1; }
    rec "$m" "$r" "$(awk -v u="$v" 'BEGIN{printf "%.4f", u/1e6}')"
}

# push_row: in each of REPS repetitions, both tools push the same segment, each into its own
# repository. Ours goes first on odd repetitions and second on even ones.
push_row() {
    local i s
    for i in $(seq 1 "$REPS"); do
        s=${segs[$((i - 1))]}
        if [ $((i % 2)) = 1 ]; then
            push_time push_ours_ms_raw "$i" "$AGENT" wal-push "$W/walcopy/$s" --repo-config "$W/walbench.toml"
            push_time push_pgbr_ms_raw "$i" $PGBR --stanza=walbench archive-push "$W/walcopy/$s"
        else
            push_time push_pgbr_ms_raw "$i" $PGBR --stanza=walbench archive-push "$W/walcopy/$s"
            push_time push_ours_ms_raw "$i" "$AGENT" wal-push "$W/walcopy/$s" --repo-config "$W/walbench.toml"
        fi
    done
}

# bench_initdb DATA PORT SOCKET_DIR ARCHIVE_COMMAND: a scratch PostgreSQL 15 cluster made by
# the postgres user, set up as every backup bench runs it (1 GB shared buffers, archiving on,
# checkpoints only when asked for).
bench_initdb() {
    local data=$1 port=$2 sock=$3 arch=$4
    runuser -u postgres -- /usr/lib/postgresql/15/bin/initdb -D "$data" -U postgres --auth=trust >/dev/null
    cat >> "$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$sock'
shared_buffers = 1GB
max_wal_size = 4GB
checkpoint_timeout = 30min
wal_level = replica
max_wal_senders = 4
archive_mode = on
archive_command = '$arch'
logging_collector = off
EOF
}
