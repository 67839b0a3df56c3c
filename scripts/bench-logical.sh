#!/usr/bin/env bash
# Logical dump throughput (issue 3): `dr-agent backup run --type logical` (pg_dump -Fc
# --compress=0 streamed into an fs repository: chunked, zstd, encrypted) against the peer
# `pg_dump -Fc -f FILE` (gzip level default) on the same database in the same run.
# Usage: scripts/bench-logical.sh [SCALE=20] [RUNS=3]   (run as root; builds nothing:
# needs target/debug/dr-agent or DR_AGENT=path). Prints the median wall time of each.
set -euo pipefail
SCALE=${1:-20}
RUNS=${2:-3}
PGBIN=/usr/lib/postgresql/15/bin
AGENT=${DR_AGENT:-$(cd "$(dirname "$0")/.." && pwd)/target/debug/dr-agent}
DIR=$(mktemp -d /tmp/bench-logical.XXXXXX)
chmod 755 "$DIR"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
PGPID=""
cleanup() {
  if [ -n "$PGPID" ] && kill -0 "$PGPID" 2>/dev/null; then
    kill -INT "$PGPID"
    while kill -0 "$PGPID" 2>/dev/null; do sleep 0.2; done
  fi
  rm -rf "$DIR"
}
trap cleanup EXIT
mkdir -p "$DIR/data" "$DIR/log" && chown postgres:postgres "$DIR/data" "$DIR/log"
runuser -u postgres -- "$PGBIN/initdb" -D "$DIR/data" -U postgres --auth=trust -N >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/log/pg.log" \
  -o "-p $PORT -k $DIR/data -c listen_addresses=127.0.0.1" -w start >/dev/null
PGPID=$(head -1 "$DIR/data/postmaster.pid")
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
URL="postgres://postgres@127.0.0.1:$PORT/postgres"
cat >"$DIR/repo.toml" <<EOF
version = 1
key_file = "repo.key"
concurrency = 4
[location]
kind = "fs"
path = "$DIR/repo"
EOF
"$AGENT" repo init --repo-config "$DIR/repo.toml" >/dev/null
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
t_agent=(); t_peer=()
for i in $(seq "$RUNS"); do
  s=$(date +%s.%N); "$PGBIN/pg_dump" -Fc -f "$DIR/peer.dump" "$URL"; e=$(date +%s.%N)
  t_peer+=("$(echo "$e - $s" | bc)")
  s=$(date +%s.%N)
  "$AGENT" backup run --type logical --pg-url "$URL" --repo-config "$DIR/repo.toml" >/dev/null 2>&1
  e=$(date +%s.%N)
  t_agent+=("$(echo "$e - $s" | bc)")
done
echo "db size: $(psql -X -A -t -h 127.0.0.1 -p "$PORT" -U postgres -c "select pg_size_pretty(pg_database_size('postgres'))" postgres)"
echo "pg_dump -Fc file: median $(printf '%s\n' "${t_peer[@]}" | median) s, $(stat -c %s "$DIR/peer.dump") bytes"
echo "dr-agent logical: median $(printf '%s\n' "${t_agent[@]}" | median) s, repository $(du -sb "$DIR/repo" | cut -f1) bytes after $RUNS dumps"
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
