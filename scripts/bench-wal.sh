#!/usr/bin/env bash
# bench-wal.sh -- the WAL rows of bench-backup.sh alone, for a faster loop (issues 3 and 4):
#   push:   `dr-agent wal-push` vs `pgbackrest archive-push` (zst, archive-async=n) of real
#           16 MiB pgbench segments, both tools the same segment in each repetition, order
#           flipping every repetition, timed by bench-lib.sh's push_time inside the postgres
#           user's shell; medians.
#   replay: (REPLAY_MB > 0) replay of ~REPLAY_MB MB of archived WAL through
#           `restore_command = dr-agent wal-fetch` vs the same WAL already in pg_wal (crash
#           recovery from backup_label), as bench-backup.sh's row 7; medians.
# One scratch PostgreSQL 15 (free port, mktemp dir, stopped with pg_ctl at the end, removed).
#
# Usage (root): scripts/bench-wal.sh
# Knobs: REPS (9) SCALE (10) REPLAY_MB (0: no replay row; bench-backup.sh uses 1024)
#        REPLAY_REPS (3) BACKLOG (0: no backlog row; else that many segments)
#        SKIP_BUILD=1 KEEP=1
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

REPS=${REPS:-9}
SCALE=${SCALE:-10}
REPLAY_MB=${REPLAY_MB:-0}
REPLAY_REPS=${REPLAY_REPS:-3}
BACKLOG=${BACKLOG:-0}
command -v pgbackrest >/dev/null || { echo "pgbackrest is not installed (scripts/bench-backup.sh installs it)" >&2; exit 2; }
pg_bench_prelude

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
PORT=$(free_port); TPORT=$(free_port)
W=$WORK; chmod 755 "$W"
DATA=$W/data; REPO=$W/repo; RAW=$W/raw.tsv; LOG=$W/run.log
mkdir -p "$W/sock" "$W/pgbr" "$W/pgbr-log" "$W/pgbr-lock" "$W/pgbr-spool" "$W/walcopy" "$W/spool" "$W/localwal" "$W/arch"
: > "$RAW"
stop_pg() { [ -f "$1/postmaster.pid" ] && asp "$PGBIN/pg_ctl" -D "$1" -m fast -w -t 60 stop >/dev/null 2>&1 || true; }
on_exit() {
    local rc=$?; set +e
    for d in "$W"/replay-* "$DATA"; do [ -d "$d" ] && stop_pg "$d"; done
    cleanup
    if [ "${KEEP:-0}" != 1 ]; then rm -rf "$W"; else echo "work dir kept: $W" >&2; fi
    exit $rc
}
trap on_exit EXIT
wait_promoted() {
    local port=$1 i
    for i in $(seq 1 6000); do
        [ "$(psql_ "$port" -Atc 'select pg_is_in_recovery()' 2>/dev/null)" = f ] && return 0
        sleep 0.1
    done
    echo "instance on port $port never left recovery" >&2; return 1
}

cat > "$W/repo.toml" <<EOF
version = 1
key_file = "$W/repo.key"
spool_dir = "$W/spool"
[location]
kind = "fs"
path = "$REPO"
EOF
sed "s#$REPO#$W/walbench-repo#" "$W/repo.toml" > "$W/walbench.toml"
grep -v '^spool_dir' "$W/repo.toml" > "$W/nospool.toml"   # copies out of the archive: no prefetcher
cat > "$W/pgbackrest.conf" <<EOF
[global]
repo1-path=$W/pgbr
repo1-retention-full=99
log-path=$W/pgbr-log
lock-path=$W/pgbr-lock
spool-path=$W/pgbr-spool
log-level-console=warn
log-level-file=off
start-fast=y
archive-async=n
compress-type=zst
process-max=2

[walbench]
pg1-path=$DATA
pg1-port=$PORT
pg1-socket-path=$W/sock
EOF
PGBR="pgbackrest --config=$W/pgbackrest.conf"
# archive_command: ours into the main repository (the replay row restores from it)
cat > "$W/archive.sh" <<EOF
#!/bin/sh
exec $AGENT wal-push "\$1" --repo-config $W/repo.toml
EOF
chmod 755 "$W/archive.sh"
chown -R postgres:postgres "$W"
{ machine; echo "dr-agent: $(cd "$ROOT" && git describe --always --dirty)"; echo "pgbackrest: $(pgbackrest version)"; } | tee "$W/env.txt" >&2
( while true; do echo "$(date +%T) $(cut -d' ' -f1 /proc/loadavg)" >> "$W/load.log"; sleep 5; done ) &
echo $! >> "$WORK/pids"

bench_initdb "$DATA" "$PORT" "$W/sock" "$W/archive.sh %p"
asp "$PGBIN/pg_ctl" -D "$DATA" -l "$W/pg.log" -w start >/dev/null
asp "$AGENT" repo init --repo-config "$W/repo.toml" >>"$LOG" 2>&1
asp "$AGENT" repo init --repo-config "$W/walbench.toml" >>"$LOG" 2>&1
asp $PGBR --stanza=walbench stanza-create >>"$LOG" 2>&1

log "pgbench -i -s $SCALE, then pgbench -c 4 -T 20 (segments for the push row)"
asp "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >>"$LOG" 2>&1
PGURL="postgres://postgres@127.0.0.1:$PORT/postgres"
asp "$AGENT" backup run --repo-config "$W/repo.toml" --pg-url "$PGURL" --data-dir "$DATA" --type full >>"$LOG" 2>&1
# The push row takes segments written entirely during pgbench -c 4 rounds (OLTP WAL, as
# ../shared/bench/pgbackrest-anchor.sh chose them for its archive-push figure): names strictly
# between the segment current before the first round and the one current after the last.
NSEG=$(( REPS > BACKLOG ? REPS : BACKLOG ))
LO=$(q "select pg_walfile_name(pg_current_wal_lsn())")
for round in 1 2 3 4 5 6; do
    asp "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -T 20 postgres >>"$LOG" 2>&1
    HI=$(q "select pg_walfile_name(pg_current_wal_lsn())")
    n=$(( 16#${HI:8:8} * 256 + 16#${HI:16:8} - 16#${LO:8:8} * 256 - 16#${LO:16:8} - 1 ))
    log "pgbench round $round: segments $LO..$HI, $n full"
    [ "$n" -ge "$NSEG" ] && break
done
# An idle server for the push row (see bench-backup.sh's section 4): vacuum and checkpoint
# after the rounds, their WAL archived with the rest before the first push.
q "vacuum" >/dev/null; q "checkpoint" >/dev/null
SEG=$(q "select pg_walfile_name(pg_switch_wal())")
for _ in $(seq 1 1200); do
    la=$(q "select coalesce(last_archived_wal,'') from pg_stat_archiver")
    [[ "$la" > "$SEG" || "$la" == "$SEG" ]] && break; sleep 0.25
done

# ------------------------------------------------------------------ push row
# The first REPS of those segments; each is pushed by both tools, into their own repositories, in an order
# that flips every repetition: segments differ up to sevenfold in how well they compress
# (0.47-3.2 MB per 16 MiB), so giving the tools different segments would time the segments.
mapfile -t segs < <(ls "$REPO/wal/00000001" | grep -E '^[0-9A-F]{24}$' | sort |
    awk -v lo="$LO" -v hi="$HI" '($1 "") > (lo "") && ($1 "") < (hi "")' | head -n "$NSEG")
[ "${#segs[@]}" -ge "$NSEG" ] || { echo "only ${#segs[@]} segments; lower REPS/BACKLOG or raise SCALE" >&2; exit 1; }
for s in "${segs[@]}"; do asp "$AGENT" wal-fetch "$s" "$W/walcopy/$s" --repo-config "$W/nospool.toml"; done
# PostgreSQL fsyncs a segment before it marks it .ready; the copies just written are still
# dirty, and their writeback would land in both tools' journal commits during the first pushes.
sync; sleep 5
push_row
# a repeat of an archived segment (the archive_command retry after a crash)
for i in $(seq 1 "$REPS"); do
    push_time push_repeat_ours_ms_raw "$i" "$AGENT" wal-push "$W/walcopy/${segs[$((i - 1))]}" --repo-config "$W/walbench.toml"
done

# ------------------------------------------------------------------ backlog row (async modes)
# A backlog of BACKLOG segments with .ready files in a pg_wal-like directory (of a fake data
# dir holding only PG_VERSION and global/pg_control, which pgBackRest reads), then
# PostgreSQL's archiver emulated: archive_command for each segment in order, back to back,
# .ready renamed to .done after each success. Ours: `wal-push --push-ahead 4` (read-ahead);
# pgBackRest: `archive-push --archive-async --process-max=2` (its asynchronous mode; the
# foreground waits until its segment is pushed). Per-call wall time (median) and drain time.
if [ "$BACKLOG" -gt 0 ]; then
    mapfile -t bsegs < <(ls "$W/walcopy" | sort | head -n "$BACKLOG")
    for who in ours pgbr; do
        f=$W/fake-$who; rm -rf "$f"; mkdir -p "$f/global" "$f/pg_wal/archive_status"
        cp "$DATA/PG_VERSION" "$f/"; cp "$DATA/global/pg_control" "$f/global/"
        for s in "${bsegs[@]}"; do cp "$W/walcopy/$s" "$f/pg_wal/"; : > "$f/pg_wal/archive_status/$s.ready"; done
        chown -R postgres:postgres "$f"; chmod 700 "$f"
    done
    sed "s#$W/walbench-repo#$W/backlog-repo#" "$W/walbench.toml" | sed "s#$W/spool#$W/backlog-spool#" > "$W/backlog.toml"
    chown postgres "$W/backlog.toml"
    asp "$AGENT" repo init --repo-config "$W/backlog.toml" >>"$LOG" 2>&1
    printf '\n[backlog]\npg1-path=%s\npg1-port=%s\npg1-socket-path=%s\n' "$W/fake-pgbr" "$PORT" "$W/sock" >> "$W/pgbackrest.conf"
    # stanza-create asks the running server (same system id as the fake dir's pg_control)
    asp $PGBR --stanza=backlog --pg1-path="$DATA" stanza-create >>"$LOG" 2>&1
    for who in ours pgbr; do
        f=$W/fake-$who; t0=$(now); i=0
        for s in "${bsegs[@]}"; do
            i=$((i + 1))
            if [ "$who" = ours ]; then
                push_time "backlog_ours_ms_raw" "$i" "$AGENT" wal-push "$f/pg_wal/$s" --repo-config "$W/backlog.toml" --push-ahead 4
            else
                push_time "backlog_pgbr_ms_raw" "$i" $PGBR --stanza=backlog --archive-async --process-max=2 archive-push "$f/pg_wal/$s"
            fi
            mv "$f/pg_wal/archive_status/$s.ready" "$f/pg_wal/archive_status/$s.done"
        done
        t1=$(now); rec "backlog_${who}_drain_s" 1 "$(dt "$t0" "$t1")"
        sleep 6   # background pushers finish / exit before the next tool runs
    done
fi

# ------------------------------------------------------------------ replay row
if [ "$REPLAY_MB" -gt 0 ]; then
    log "generating ~$REPLAY_MB MB of WAL"
    sl=$(asp "$AGENT" backup list --repo-config "$W/repo.toml" --output json | jq -r '[.[] | select(.kind == "full" or .kind == "incr")][-1].start_lsn')
    q "create table replay_t(id bigint, pad text)"
    q "insert into replay_t select g, repeat('x', 80) from generate_series(1, $((REPLAY_MB * 1000000 / 145))) g"
    SEG=$(q "select pg_walfile_name(pg_switch_wal())")
    for _ in $(seq 1 2400); do
        la=$(q "select coalesce(last_archived_wal,'') from pg_stat_archiver")
        [[ "$la" > "$SEG" || "$la" == "$SEG" ]] && break; sleep 0.25
    done
    rec replay_wal_total_bytes 1 "$(q "select pg_wal_lsn_diff(pg_current_wal_lsn(), '$sl')")"
    START_SEG=$(printf '00000001%08X%08X' $((16#${sl%/*})) $((16#${sl#*/} / 16777216)))
    for s in $(ls "$REPO/wal/00000001" | grep -E '^[0-9A-F]{24}$' | sort); do
        [[ "$s" < "$START_SEG" ]] && continue
        asp "$AGENT" wal-fetch "$s" "$W/localwal/$s" --repo-config "$W/nospool.toml"
    done
    rm -rf "$W/spool"/*
    for i in $(seq 1 "$REPLAY_REPS"); do
        for who in fetch local; do
            d=$W/replay-$who
            stop_pg "$d"; rm -rf "$d"
            asp "$AGENT" restore --repo-config "$W/repo.toml" --backup latest --target "$d" >>"$LOG" 2>&1
            printf "archive_mode = off\nport = %s\n" "$TPORT" >> "$d/postgresql.auto.conf"
            if [ "$who" = local ]; then
                rm -f "$d/recovery.signal"
                asp sed -i '/^restore_command/d' "$d/postgresql.auto.conf"
                asp cp "$W/localwal"/* "$d/pg_wal/"
                sync
            fi
            t0=$(now)
            asp "$PGBIN/pg_ctl" -D "$d" -l "$W/pg-replay-$who-$i.log" -o "-p $TPORT" -t 1200 -w start >/dev/null
            wait_promoted "$TPORT"; t1=$(now)
            rec "replay_${who}_s" "$i" "$(dt "$t0" "$t1")"
            stop_pg "$d"; rm -rf "$d" "$W/spool"/*
        done
    done
fi

# ------------------------------------------------------------------ summary
rng() { awk -F'\t' -v m="$1" '$1==m{print $3}' "$RAW" | sort -g | awk '{v[NR]=$1} END{if(NR) printf "%s..%s, n=%d", v[1], v[NR], NR}'; }
ms() { awk -v v="$1" 'BEGIN{ if (v=="n/a") print v; else printf "%.1f", v*1000}'; }
rngms() { awk -F'\t' -v m="$1" '$1==m{print $3*1000}' "$RAW" | sort -g | awk '{v[NR]=$1} END{if(NR) printf "%.1f..%.1f, n=%d", v[1], v[NR], NR}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b==0 || a=="n/a" || b=="n/a") print "n/a"; else printf "%.3f", a/b}'; }
{
    echo "Command: \`scripts/bench-wal.sh\` (REPS=$REPS SCALE=$SCALE BACKLOG=$BACKLOG REPLAY_MB=$REPLAY_MB REPLAY_REPS=$REPLAY_REPS)"
    sed 's/^/    /' "$W/env.txt"
    echo "    1-min load average during the run: $(awk '{print $2}' "$W/load.log" | sort -n | awk '{v[NR]=$1} END{printf "min %s / median %s / max %s", v[1], v[int((NR+1)/2)], v[NR]}')"
    echo
    echo "| measurement | dr-agent | pgBackRest 2.45 | ratio | target |"
    echo "|---|---|---|---|---|"
    echo "| push of one 16 MiB segment (sync, both), ms | $(ms "$(med push_ours_ms_raw)") ($(rngms push_ours_ms_raw)) | $(ms "$(med push_pgbr_ms_raw)") ($(rngms push_pgbr_ms_raw)) | $(ratio "$(med push_ours_ms_raw)" "$(med push_pgbr_ms_raw)") | <= 0.3 |"
    echo "| repeat push of an archived segment, ms | $(ms "$(med push_repeat_ours_ms_raw)") ($(rngms push_repeat_ours_ms_raw)) | | | |"
    if [ "$BACKLOG" -gt 0 ]; then
        echo "| backlog of $BACKLOG segments, per archive_command call (ours --push-ahead 4, pgBackRest archive-async process-max 2), ms | $(ms "$(med backlog_ours_ms_raw)") ($(rngms backlog_ours_ms_raw)) | $(ms "$(med backlog_pgbr_ms_raw)") ($(rngms backlog_pgbr_ms_raw)) | $(ratio "$(med backlog_ours_ms_raw)" "$(med backlog_pgbr_ms_raw)") | (async modes) |"
        echo "| same, time to drain the backlog, s | $(med backlog_ours_drain_s) | $(med backlog_pgbr_drain_s) | $(ratio "$(med backlog_ours_drain_s)" "$(med backlog_pgbr_drain_s)") | |"
    fi
    if [ "$REPLAY_MB" -gt 0 ]; then
        echo "| replay of $(awk -v b="$(med replay_wal_total_bytes)" 'BEGIN{printf "%.1f", b/1e6}') MB WAL: wal-fetch vs local pg_wal, s | $(med replay_fetch_s) ($(rng replay_fetch_s)) | local: $(med replay_local_s) ($(rng replay_local_s)) | $(ratio "$(med replay_fetch_s)" "$(med replay_local_s)") | <= 1.2 |"
    fi
} | tee "$ROOT/target/bench-wal.md"
