#!/usr/bin/env bash
# bench-restic.sh -- our repository format against restic's, measured (issue 3: "weigh
# rustic_core (restic's format over opendal) and decide by measurement").
#
# rustic_core reads and writes restic's repository format, so restic itself (Debian's
# package, installed here if missing) stands in for that format: content-defined chunks
# packed into pack files, zstd (repository version 2, `--compression auto`), AES-256 +
# Poly1305. What the format decides is measured on the same pgbench database:
#   1. full backup: wall time and repository size (fresh repository each repetition)
#   2. after `pgbench -c 4 -T $PGBENCH_T`: the second backup's time and the bytes it added
#      (restic: a second snapshot; ours: an incremental) -- where chunking decides the size
#   3. restore of the latest backup into an empty directory
# One scratch PostgreSQL 15 (free port, mktemp dir, stopped with pg_ctl at the end, removed).
#
# Usage (root): scripts/bench-restic.sh
# Knobs: SCALE (60) REPS (3) PGBENCH_T (30) SKIP_BUILD=1 KEEP=1 BIN=DIR
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

SCALE=${SCALE:-60}
REPS=${REPS:-3}
PGBENCH_T=${PGBENCH_T:-30}
pg_bench_prelude
command -v restic >/dev/null || apt-get install -y restic >/dev/null

W=$WORK; chmod 755 "$W"
DATA=$W/data; RAW=$W/raw.tsv; LOG=$W/run.log
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
mkdir -p "$W/sock"; : > "$RAW"
on_exit() {
    local rc=$?; set +e
    [ -f "$DATA/postmaster.pid" ] && asp "$PGBIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1
    cleanup
    if [ "${KEEP:-0}" != 1 ]; then rm -rf "$W"; else echo "work dir kept: $W" >&2; fi
    exit $rc
}
trap on_exit EXIT

export RESTIC_PASSWORD=bench-only-password
repo_toml() { printf 'version = 1\nkey_file = "%s.key"\n[location]\nkind = "fs"\npath = "%s"\n' "$1" "$1" > "$1.toml"; }
ours() { asp env -u RESTIC_PASSWORD "$AGENT" backup run --repo-config "$1.toml" --pg-url "postgres://postgres@127.0.0.1:$PORT/postgres" --data-dir "$DATA" --type "$2"; }
restic_() { asp env RESTIC_PASSWORD="$RESTIC_PASSWORD" restic --no-cache -q -r "$@"; }

chown -R postgres:postgres "$W"
{ machine; echo "dr-agent: $(cd "$ROOT" && git describe --always --dirty)"; echo "$(restic version)"; } | tee "$W/env.txt" >&2
bench_initdb "$DATA" "$PORT" "$W/sock" /bin/true
asp "$PGBIN/pg_ctl" -D "$DATA" -l "$W/pg.log" -w start >/dev/null
log "pgbench -i -s $SCALE"
asp "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >>"$LOG" 2>&1
q "checkpoint" >/dev/null
rec db_bytes 1 "$(q "select sum(pg_database_size(oid)) from pg_database")"

# 1. full backups, alternating, fresh repositories
for i in $(seq 1 "$REPS"); do
    order="ours restic"; [ $((i % 2)) = 0 ] && order="restic ours"
    for who in $order; do
        r=$W/full-$who-$i; mkdir -p "$r"; chown postgres:postgres "$r"
        if [ "$who" = ours ]; then
            repo_toml "$r/repo"; chown postgres:postgres "$r/repo.toml"
            asp "$AGENT" repo init --repo-config "$r/repo.toml" >>"$LOG" 2>&1
            timed full_ours_s "$i" ours "$r/repo" full
            rec full_ours_repo_bytes "$i" "$(bytes "$r/repo")"
        else
            restic_ "$r/repo" init --repository-version 2 >>"$LOG" 2>&1
            timed full_restic_s "$i" restic_ "$r/repo" backup --compression auto "$DATA"
            rec full_restic_repo_bytes "$i" "$(bytes "$r/repo")"
        fi
        [ "$i" = "$REPS" ] || rm -rf "$r"
    done
done

# 2. pgbench, then the second backup into the last repetition's repositories
OURS=$W/full-ours-$REPS/repo; RESTIC=$W/full-restic-$REPS/repo
asp "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -T "$PGBENCH_T" postgres >>"$LOG" 2>&1
q "checkpoint" >/dev/null
b=$(bytes "$OURS"); timed incr_ours_s 1 ours "$OURS" incr; rec incr_ours_added_bytes 1 "$(( $(bytes "$OURS") - b ))"
b=$(bytes "$RESTIC"); timed incr_restic_s 1 restic_ "$RESTIC" backup --compression auto "$DATA"; rec incr_restic_added_bytes 1 "$(( $(bytes "$RESTIC") - b ))"

# 3. restore of the latest backup
for i in $(seq 1 "$REPS"); do
    for who in ours restic; do
        t=$W/restore-$who; rm -rf "$t"
        if [ "$who" = ours ]; then
            timed restore_ours_s "$i" asp "$AGENT" restore --repo-config "$OURS.toml" --backup latest --target "$t"
        else
            asp mkdir -p "$t"; timed restore_restic_s "$i" restic_ "$RESTIC" restore latest --target "$t"
        fi
        rm -rf "$t"
    done
done

{
    echo "Command: \`scripts/bench-restic.sh\` (SCALE=$SCALE REPS=$REPS PGBENCH_T=$PGBENCH_T)"
    echo; sed 's/^/    /' "$W/env.txt"; echo
    echo "Database: $(mb "$(med db_bytes)") MB. Medians of $REPS (incremental: one)."
    echo
    echo "| measurement | dr-agent | restic (restic's format, as rustic_core writes it) | ratio ours/restic |"
    echo "|---|---|---|---|"
    for m in full_%s_s full_%s_repo_bytes incr_%s_s incr_%s_added_bytes restore_%s_s; do
        o=$(med "$(printf "$m" ours)"); r=$(med "$(printf "$m" restic)")
        case $m in *bytes) ov="$(mb "$o") MB"; rv="$(mb "$r") MB" ;; *) ov="$o s"; rv="$r s" ;; esac
        echo "| ${m//_%s/} | $ov | $rv | $(awk -v a="$o" -v b="$r" 'BEGIN{printf "%.3f", a/b}') |"
    done
} | tee "$ROOT/target/bench-restic.md"
