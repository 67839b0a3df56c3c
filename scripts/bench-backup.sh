#!/usr/bin/env bash
# bench-backup.sh -- dr-agent backups/restores side by side with pgBackRest 2.45 (issues 3, 4).
#
# One scratch PostgreSQL 15 (free port, temp dir, stopped by PID from postmaster.pid at the
# end), `pgbench -i -s $SCALE`, then for every measurement ours and pgBackRest's alternate
# ($REPS runs each, medians), as in ../shared/bench/pgbackrest-anchor.sh:
#   1. archive lag under pgbench (archive_command = ours only, then pgBackRest only)
#   2. full backup (ours into a fresh repository each run; pgBackRest zst, process-max 2)
#   3. pgbench -c 4 -T $PGBENCH_T + incremental ($REPS rounds; bytes added to each repository)
#   4. restore of the latest backup (+ start until promoted, once)
#   5. point-in-time restore until promoted (target time between two batches of rows)
#   6. replay of ~$REPLAY_MB MB of archived WAL through wal-fetch vs the same WAL in pg_wal
#   7. wal-push / archive-push of one real 16 MiB segment (idle server; last, see there)
# Agent peak RSS (VmHWM, via /usr/bin/time -f %M) is recorded for every backup/restore.
#
# Usage (root; PostgreSQL and both tools run as the postgres user):
#   scripts/bench-backup.sh              # builds release dr-agent, ~15-20 min on 2 vCPU
# Knobs: ONLY (sections, e.g. full,restore,pitr; default all) CHUNK_LEVEL (repository default) SCALE (60) REPS (5) PGBENCH_T (30) LAG_T (30) REPLAY_MB (1024) REPLAY_REPS (3)
#        KEEP=1 keeps the work dir; OUT (markdown fragment, default target/bench-backup.md)
# Raw samples: $WORK/raw.tsv (metric, rep, value).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
lib_cleanup() { cleanup; }

SCALE=${SCALE:-60}
REPS=${REPS:-5}
PGBENCH_T=${PGBENCH_T:-30}
LAG_T=${LAG_T:-30}
REPLAY_MB=${REPLAY_MB:-1024}
REPLAY_REPS=${REPLAY_REPS:-3}
# ONLY=full,restore,pitr (comma list of lag,full,incr,push,restore,pitr,replay): run only these
# sections (for iterating on one row; the main repository's full backup is always taken)
ONLY=${ONLY:-}
want() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
# zstd level of our chunks; empty: the repository default (3). Level 1 is ~15% faster on
# pgbench_accounts but its index compresses to 30 MB instead of 22 MB, so the repository
# grows to 1.11x pgBackRest's (measured: CHUNK_LEVEL=1 run of 2026-11-28)
CHUNK_LEVEL=${CHUNK_LEVEL:-}
OUT=${OUT:-$ROOT/target/bench-backup.md}
pg_bench_prelude

# ------------------------------------------------------------------ prerequisites
if ! command -v pgbackrest >/dev/null; then
    made_policy=0
    # apt must not start any packaged daemon (same trick as scripts/test.sh)
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends pgbackrest jq
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
PORT=$(free_port); RPORT=$(free_port); TPORT=$(free_port)

W=$WORK
chmod 755 "$W"
DATA=$W/data
REPO=$W/repo            # our main repository (archive + incrementals)
PGBR_REPO=$W/pgbr
CONF=$W/pgbackrest.conf
RAW=$W/raw.tsv
LOG=$W/run.log
SOCK=$W/sock
mkdir -p "$SOCK" "$PGBR_REPO" "$W/pgbr-log" "$W/pgbr-lock" "$W/pgbr-spool" "$W/walcopy" "$W/spool" "$W/localwal"
: > "$RAW"


stop_pg() { # stop one of OUR instances: pg_ctl signals the PID in its postmaster.pid
    local d=$1
    if [ -f "$d/postmaster.pid" ]; then
        asp "$PGBIN/pg_ctl" -D "$d" -m fast -w -t 60 stop >/dev/null 2>&1 || true
    fi
}
on_exit() {
    local rc=$?
    set +e
    for d in "$W"/restore-* "$W"/pitr-* "$W"/replay-* "$DATA"; do [ -d "$d" ] && stop_pg "$d"; done
    lib_cleanup
    if [ "${KEEP:-0}" != 1 ]; then rm -rf "$W"; else echo "work dir kept: $W" >&2; fi
    exit $rc
}
trap on_exit EXIT

# timed_rss METRIC REP "${AGENT_TIMED[@]}" ARGS...: wall time -> METRIC, peak RSS (MiB) -> METRIC_rss_mib
timed_rss() {
    local m=$1 r=$2; shift 2
    local t0 t1
    t0=$(now)
    rm -f "$W/time.out"
    "$@" >>"$LOG" 2>&1 || { log "FAILED: $*"; tail -20 "$LOG" >&2; return 1; }
    t1=$(now)
    rec "$m" "$r" "$(dt "$t0" "$t1")"
    rec "${m}_rss_mib" "$r" "$(awk '{printf "%.1f", $1/1024}' "$W/time.out")"
}
wait_archive() {
    local i
    for i in $(seq 1 1200); do
        compgen -G "$DATA/pg_wal/archive_status/*.ready" >/dev/null || return 0
        sleep 0.25
    done
    echo "archive did not catch up" >&2; return 1
}
wait_promoted() {
    local port=$1 i
    for i in $(seq 1 6000); do
        [ "$(psql_ "$port" -Atc 'select pg_is_in_recovery()' 2>/dev/null)" = f ] && return 0
        sleep 0.1
    done
    echo "instance on port $port never left recovery" >&2; return 1
}

# ------------------------------------------------------------------ configs
repo_toml() { # repo_toml FILE REPO_DIR
    { echo "version = 1"; echo "key_file = \"$W/repo.key\""; echo "spool_dir = \"$W/spool\""
      [ -n "$CHUNK_LEVEL" ] && echo "compression_level = $CHUNK_LEVEL"
      printf '[location]\nkind = "fs"\npath = "%s"\n' "$2"; } > "$1"
}
repo_toml "$W/repo.toml" "$REPO"
repo_toml "$W/walbench.toml" "$W/walbench-repo"

cat > "$CONF" <<EOF
[global]
repo1-path=$PGBR_REPO
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

[bench]
pg1-path=$DATA
pg1-port=$PORT
pg1-socket-path=$SOCK

[walbench]
pg1-path=$DATA
pg1-port=$PORT
pg1-socket-path=$SOCK
EOF
PGBR="pgbackrest --config=$CONF"

# archive_command (pgBackRest checks that its name contains "pgbackrest"): ours, pgBackRest's,
# or both, chosen by $W/archive.mode (no reload needed)
echo both > "$W/archive.mode"
cat > "$W/archive-dr-agent-pgbackrest.sh" <<EOF
#!/bin/sh
set -e
mode=\$(cat $W/archive.mode)
if [ "\$mode" != pgbr ]; then $AGENT wal-push "\$1" --repo-config $W/repo.toml; fi
if [ "\$mode" != ours ]; then $PGBR --stanza=bench archive-push "\$1"; fi
EOF
chmod 755 "$W/archive-dr-agent-pgbackrest.sh"
chown -R postgres:postgres "$W"
{
    machine
    echo "postgres: $("$PGBIN/postgres" --version)"
    echo "pgbackrest: $(pgbackrest version)"
    echo "dr-agent: $(cd "$ROOT" && git describe --always --dirty)"
    echo "scale $SCALE, reps $REPS, pgbench -T $PGBENCH_T"
} | tee "$W/env.txt" >&2

# load sampler: 1-min load average every 5 s
( while true; do echo "$(date +%T) $(cut -d' ' -f1 /proc/loadavg)" >> "$W/load.log"; sleep 5; done ) &
echo $! >> "$WORK/pids"

# ------------------------------------------------------------------ cluster
log "initdb on port $PORT"
bench_initdb "$DATA" "$PORT" "$SOCK" "$W/archive-dr-agent-pgbackrest.sh %p"
asp "$PGBIN/pg_ctl" -D "$DATA" -l "$W/pg-primary.log" -w start >/dev/null
asp "$AGENT" repo init --repo-config "$W/repo.toml" >>"$LOG" 2>&1
asp "$AGENT" repo init --repo-config "$W/walbench.toml" >>"$LOG" 2>&1
asp $PGBR --stanza=bench stanza-create >>"$LOG" 2>&1
asp $PGBR --stanza=walbench stanza-create >>"$LOG" 2>&1
asp $PGBR --stanza=bench check >>"$LOG" 2>&1

log "pgbench -i -s $SCALE"
timed pgbench_init 1 asp "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -i -s "$SCALE" -q postgres
q "checkpoint"; wait_archive
DBSIZE=$(q "select sum(pg_database_size(oid)) from pg_database")
rec db_size_bytes 1 "$DBSIZE"
q "create extension if not exists pg_prewarm"
q "select pg_prewarm('pgbench_accounts'), pg_prewarm('pgbench_accounts_pkey')" >/dev/null
PGURL="postgres://postgres@127.0.0.1:$PORT/postgres"
ours_backup() { asp "$AGENT" backup run --repo-config "$1" --pg-url "$PGURL" --data-dir "$DATA" --type "$2"; }
# the same, measured: /usr/bin/time runs as postgres and reports dr-agent's own peak RSS
AGENT_TIMED=(asp /usr/bin/time -f '%M' -o "$W/time.out" "$AGENT")

# ------------------------------------------------------------------ 1. archive lag under pgbench
# Each tool alone as archive_command; a checkpoint first so the run starts with full-page
# images (the heaviest WAL). Sampled every second: .ready files waiting, and bytes between
# the current insert LSN and the end of the last archived segment.
lag_bytes() { # bytes between the insert position and the end of the last archived segment
    local last cur hi lo curb end
    last=$(q "select coalesce(last_archived_wal,'') from pg_stat_archiver")
    cur=$(q "select pg_current_wal_lsn()")
    hi=${cur%/*}; lo=${cur#*/}; curb=$(( (16#$hi << 32) + 16#$lo ))
    [ ${#last} -ge 24 ] || { echo "$curb"; return; }
    end=$(( (16#${last:8:8} << 32) + (16#${last:16:8} + 1) * 16777216 ))
    [ "$curb" -gt "$end" ] && echo $((curb - end)) || echo 0
}
lag_run() {
    local who=$1
    echo "$who" > "$W/archive.mode"
    q "checkpoint"
    asp "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -j 2 -T "$LAG_T" postgres > "$W/pgbench-lag-$who.out" 2>&1 &
    local pb=$! s=0
    while kill -0 "$pb" 2>/dev/null; do
        local ready lagb
        ready=$(find "$DATA/pg_wal/archive_status" -name '*.ready' | wc -l)
        lagb=$(lag_bytes)
        echo "$s $ready $lagb" >> "$W/lag-$who.tsv"
        s=$((s + 1)); sleep 1
    done
    wait "$pb"
    local t0; t0=$(now); wait_archive; local t1; t1=$(now)
    rec "lag_${who}_tps" 1 "$(awk '/^tps = /{print $3; exit}' "$W/pgbench-lag-$who.out")"
    rec "lag_${who}_max_ready" 1 "$(awk 'BEGIN{m=0} $2>m{m=$2} END{print m}' "$W/lag-$who.tsv")"
    rec "lag_${who}_max_lag_mb" 1 "$(awk 'BEGIN{m=0} $3>m{m=$3} END{printf "%.1f", m/1e6}' "$W/lag-$who.tsv")"
    # growth: mean lag of the last third minus the first third of the run (MB)
    rec "lag_${who}_growth_mb" 1 "$(awk '{v[NR]=$3} END{n=NR; t=int(n/3); if(t<1){print 0; exit} for(i=1;i<=t;i++)a+=v[i]; for(i=n-t+1;i<=n;i++)b+=v[i]; printf "%.1f", (b-a)/t/1e6}' "$W/lag-$who.tsv")"
    rec "lag_${who}_drain_s" 1 "$(dt "$t0" "$t1")"
}
if want lag; then
    log "archive lag: ours"; lag_run ours
    log "archive lag: pgbackrest"; lag_run pgbr
fi
echo both > "$W/archive.mode"

# ------------------------------------------------------------------ 2. full backups
if want full; then
for i in $(seq 1 "$REPS"); do
    q "checkpoint"; wait_archive
    frepo=$W/ours-full-$i
    repo_toml "$W/ours-full-$i.toml" "$frepo"
    asp "$AGENT" repo init --repo-config "$W/ours-full-$i.toml" >>"$LOG" 2>&1
    order="ours pgbr"; [ $((i % 2)) = 0 ] && order="pgbr ours"
    for who in $order; do
        if [ "$who" = ours ]; then
            timed_rss full_ours_s "$i" "${AGENT_TIMED[@]}" backup run --repo-config "$W/ours-full-$i.toml" --pg-url "$PGURL" --data-dir "$DATA" --type full
            rec full_ours_repo_bytes "$i" "$(bytes "$frepo/data" "$frepo/backups")"
            rm -rf "$frepo"
        else
            before=$(bytes "$PGBR_REPO/backup")
            timed full_pgbr_s "$i" asp $PGBR --stanza=bench --type=full backup
            rec full_pgbr_repo_bytes "$i" "$(( $(bytes "$PGBR_REPO/backup") - before ))"
        fi
        q "checkpoint"; wait_archive
    done
done
fi
# the main repository's full (parent of the incrementals), untimed
ours_backup "$W/repo.toml" full >>"$LOG" 2>&1
# pgBackRest's restores need one of its backups too
want full || asp $PGBR --stanza=bench --type=full backup >>"$LOG" 2>&1

# ------------------------------------------------------------------ 3. incrementals
if want incr; then
for i in $(seq 1 "$REPS"); do
    lo=$(q "select pg_walfile_name(pg_current_wal_lsn())")
    asp "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -T "$PGBENCH_T" postgres > "$W/pgbench-$i.out" 2>&1
    echo "$lo $(q "select pg_walfile_name(pg_current_wal_lsn())")" >> "$W/pgbench_wal_ranges.txt"
    rec pgbench_tps "$i" "$(awk '/^tps = /{print $3; exit}' "$W/pgbench-$i.out")"
    q "checkpoint"; wait_archive
    order="ours pgbr"; [ $((i % 2)) = 0 ] && order="pgbr ours"
    for who in $order; do
        if [ "$who" = ours ]; then
            before=$(bytes "$REPO/data" "$REPO/backups")
            timed_rss incr_ours_s "$i" "${AGENT_TIMED[@]}" backup run --repo-config "$W/repo.toml" --pg-url "$PGURL" --data-dir "$DATA" --type incr
            rec incr_ours_added_bytes "$i" "$(( $(bytes "$REPO/data" "$REPO/backups") - before ))"
        else
            before=$(bytes "$PGBR_REPO/backup")
            timed incr_pgbr_s "$i" asp $PGBR --stanza=bench --type=incr backup
            rec incr_pgbr_added_bytes "$i" "$(( $(bytes "$PGBR_REPO/backup") - before ))"
        fi
    done
done
wait_archive

fi
# ------------------------------------------------------------------ 4. restore
LAST_START_LSN=$(asp "$AGENT" backup list --repo-config "$W/repo.toml" --output json | jq -r '[.[] | select(.kind == "full" or .kind == "incr")][-1].start_lsn')
ours_restore() { # DIR
    asp "$AGENT" restore --repo-config "$W/repo.toml" --backup latest --target "$1"
}
restored_conf() { # DIR PORT: archive off in a restored copy (it must not push into the repos)
    printf "archive_mode = off\nport = %s\n" "$2" >> "$1/postgresql.auto.conf"
}
if want restore; then
for i in $(seq 1 "$REPS"); do
    order="ours pgbr"; [ $((i % 2)) = 0 ] && order="pgbr ours"
    for who in $order; do
        d=$W/restore-$who
        stop_pg "$d"; rm -rf "$d"
        if [ "$who" = ours ]; then
            rm -rf "$W/spool"/*
            timed_rss restore_ours_s "$i" "${AGENT_TIMED[@]}" restore --repo-config "$W/repo.toml" --backup latest --target "$d"
        else
            asp mkdir -m 700 "$d"
            timed restore_pgbr_s "$i" asp $PGBR --stanza=bench --pg1-path="$d" --archive-mode=off restore
        fi
        if [ "$i" = 1 ]; then
            [ "$who" = ours ] && restored_conf "$d" "$RPORT"
            t0=$(now)
            asp "$PGBIN/pg_ctl" -D "$d" -l "$W/pg-restore-$who.log" -o "-p $RPORT" -t 600 -w start >/dev/null
            wait_promoted "$RPORT"; t1=$(now)
            rec "restore_${who}_start_until_promoted_s" 1 "$(dt "$t0" "$t1")"
            rec "restore_${who}_accounts_rows" 1 "$(psql_ "$RPORT" -Atc 'select count(*) from pgbench_accounts')"
            stop_pg "$d"
        fi
        rm -rf "$d"
    done
done

fi
# ------------------------------------------------------------------ 5. point-in-time restore
if want pitr; then
q "drop table if exists pitr_t; create table pitr_t(id int, batch int, ts timestamptz default clock_timestamp())"
q "insert into pitr_t(id,batch) select g,1 from generate_series(1,1000) g"
sleep 1; T=$(q "select clock_timestamp()"); sleep 1
q "insert into pitr_t(id,batch) select g,2 from generate_series(1001,2000) g"
SEG=$(q "select pg_walfile_name(pg_switch_wal())")
for _ in $(seq 1 600); do
    la=$(q "select coalesce(last_archived_wal,'') from pg_stat_archiver")
    [[ "$la" > "$SEG" || "$la" == "$SEG" ]] && break; sleep 0.2
done
rec pitr_wal_to_replay_bytes 1 "$(q "select pg_wal_lsn_diff(pg_current_wal_lsn(), '$LAST_START_LSN')")"
log "PITR target $T"
for i in $(seq 1 "$REPS"); do
    order="ours pgbr"; [ $((i % 2)) = 0 ] && order="pgbr ours"
    for who in $order; do
        d=$W/pitr-$who
        stop_pg "$d"; rm -rf "$d"
        t0=$(now)
        if [ "$who" = ours ]; then
            rm -rf "$W/spool"/*
            # dr-agent restore writes recovery.signal + restore_command (wal-fetch); the target
            # lines are what the coordinator's PITR adds (restore.rs RestoreOptions::extra_conf)
            ours_restore "$d" >>"$LOG" 2>&1
            restored_conf "$d" "$TPORT"
            printf "recovery_target_time = '%s'\nrecovery_target_action = 'promote'\n" "$T" >> "$d/postgresql.auto.conf"
        else
            asp mkdir -m 700 "$d"
            asp $PGBR --stanza=bench --pg1-path="$d" --archive-mode=off --type=time "--target=$T" --target-action=promote restore >>"$LOG" 2>&1
        fi
        asp "$PGBIN/pg_ctl" -D "$d" -l "$W/pg-pitr-$who-$i.log" -o "-p $TPORT" -t 600 -w start >/dev/null
        wait_promoted "$TPORT"; t1=$(now)
        rec "pitr_${who}_s" "$i" "$(dt "$t0" "$t1")"
        rec "pitr_${who}_rows_b1_b2" "$i" "$(psql_ "$TPORT" -Atc "select count(*) filter (where batch=1)||'/'||count(*) filter (where batch=2) from pitr_t")"
        stop_pg "$d"; rm -rf "$d"
    done
done

fi
# ------------------------------------------------------------------ 6. WAL replay: wal-fetch vs local pg_wal
if want replay; then
echo ours > "$W/archive.mode"
log "generating ~$REPLAY_MB MB of WAL"
lsn0=$(q "select pg_current_wal_lsn()")
q "create table replay_t(id bigint, pad text)"
rows=$((REPLAY_MB * 1000000 / 145))
q "insert into replay_t select g, repeat('x', 80) from generate_series(1, $rows) g"
SEG=$(q "select pg_walfile_name(pg_switch_wal())")
for _ in $(seq 1 1200); do
    la=$(q "select coalesce(last_archived_wal,'') from pg_stat_archiver")
    [[ "$la" > "$SEG" || "$la" == "$SEG" ]] && break; sleep 0.25
done
rec replay_wal_generated_bytes 1 "$(q "select pg_wal_lsn_diff(pg_current_wal_lsn(), '$lsn0')")"
rec replay_wal_total_bytes 1 "$(q "select pg_wal_lsn_diff(pg_current_wal_lsn(), '$LAST_START_LSN')")"
sl=$(asp "$AGENT" backup list --repo-config "$W/repo.toml" --output json | jq -r '[.[] | select(.kind == "full" or .kind == "incr")][-1].start_lsn')
START_SEG=$(printf '00000001%08X%08X' $((16#${sl%/*})) $((16#${sl#*/} / 16777216)))
for s in $(ls "$REPO/wal/00000001" | grep -E '^[0-9A-F]{24}$' | sort); do
    [[ "$s" < "$START_SEG" ]] && continue
    asp "$AGENT" wal-fetch "$s" "$W/localwal/$s" --repo-config "$W/repo.toml"
done
rm -rf "$W/spool"/*
for i in $(seq 1 "$REPLAY_REPS"); do
    for who in fetch local; do
        d=$W/replay-$who
        stop_pg "$d"; rm -rf "$d"
        ours_restore "$d" >>"$LOG" 2>&1
        restored_conf "$d" "$TPORT"
        if [ "$who" = local ]; then
            # crash recovery from backup_label over the same WAL, already in pg_wal
            rm -f "$d/recovery.signal"
            asp sed -i '/^restore_command/d' "$d/postgresql.auto.conf"
            asp cp "$W/localwal"/* "$d/pg_wal/"
            sync
        fi
        t0=$(now)
        asp "$PGBIN/pg_ctl" -D "$d" -l "$W/pg-replay-$who-$i.log" -o "-p $TPORT" -t 1200 -w start >/dev/null
        wait_promoted "$TPORT"; t1=$(now)
        rec "replay_${who}_s" "$i" "$(dt "$t0" "$t1")"
        rec "replay_${who}_rows" "$i" "$(psql_ "$TPORT" -Atc 'select count(*) from replay_t')"
        stop_pg "$d"; rm -rf "$d" "$W/spool"/*
    done
done
echo both > "$W/archive.mode"

fi
# ------------------------------------------------------------------ 7. one-segment push
# Last: its vacuum writes ~1 GB of WAL here (page images of every page pgbench touched),
# which the restore, PITR and replay sections would otherwise replay after the last backup
# (from 3b38877 they did: PITR WAL 1007 MB instead of ~60 MB, replay 2 GB instead of 1).
# Segments written entirely during pgbench -c 4 rounds (OLTP WAL, as pgbackrest-anchor.sh chose
# them; names strictly between the segments current before and after a round); one round here
# if the incremental section did not run. Both tools push the same segments (into their own
# repositories), in an order that flips every repetition: segments differ up to sevenfold in
# how well they compress.
if want push; then
if [ ! -s "$W/pgbench_wal_ranges.txt" ]; then
    lo=$(q "select pg_walfile_name(pg_current_wal_lsn())")
    asp "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -T "$PGBENCH_T" postgres >>"$LOG" 2>&1
    echo "$lo $(q "select pg_walfile_name(pg_current_wal_lsn())")" >> "$W/pgbench_wal_ranges.txt"
fi
# An idle server, as the section's title says and as pgbackrest-anchor.sh timed archive-push
# (after its other sections): the pgbench round's aftermath (vacuum of the tables it touched,
# a checkpoint) is done and its WAL archived before the first push, and the machine rests a
# few seconds. Run straight after pgbench, both tools' pushes ran ~20 % slower.
q "vacuum" >/dev/null; q "checkpoint" >/dev/null
q "select pg_switch_wal()" >/dev/null; wait_archive
mapfile -t segs < <(ls "$REPO/wal/00000001" | grep -E '^[0-9A-F]{24}$' | sort |
    awk 'NR==FNR{lo[NR]=$1; hi[NR]=$2; n=NR; next} {for(k=1;k<=n;k++) if (($1 "") > (lo[k] "") && ($1 "") < (hi[k] "")) {print; next}}' "$W/pgbench_wal_ranges.txt" - |
    head -n "$REPS")
[ "${#segs[@]}" -ge "$REPS" ] || { echo "only ${#segs[@]} pgbench segments for the push row; raise PGBENCH_T" >&2; exit 1; }
for s in "${segs[@]}"; do asp "$AGENT" wal-fetch "$s" "$W/walcopy/$s" --repo-config "$W/repo.toml"; done
sync; sleep 5
push_row

fi
# ------------------------------------------------------------------ summary
rng() { awk -F'\t' -v m="$1" '$1==m{print $3}' "$RAW" | sort -g | awk '{v[NR]=$1} END{if(NR) printf "%s..%s, n=%d", v[1], v[NR], NR}'; }
ms() { awk -v v="$1" 'BEGIN{printf "%.0f", v*1000}'; }
# A section left out with ONLY (or without samples) is "n/a", never a verdict.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a=="n/a" || b=="n/a" || a+0==0 || b+0==0) print "n/a"; else printf "%.3f", a/b}'; }
verdict() { case "$1" in n/a|-nan|nan|"") echo "not measured"; return;; esac
  awk -v r="$1" -v op="$2" -v t="$3" 'BEGIN{ok = (op=="<=") ? (r<=t) : (r>=t); print (ok ? "met" : "NOT met")}'; }
dbmb=$(mb "$DBSIZE")
fo=$(med full_ours_s); fp=$(med full_pgbr_s)
fro=$(med full_ours_repo_bytes); frp=$(med full_pgbr_repo_bytes)
io=$(med incr_ours_s); ip=$(med incr_pgbr_s)
iao=$(med incr_ours_added_bytes); iap=$(med incr_pgbr_added_bytes)
po=$(med push_ours_ms_raw); pp=$(med push_pgbr_ms_raw)
ro=$(med restore_ours_s); rp=$(med restore_pgbr_s)
to=$(med pitr_ours_s); tp=$(med pitr_pgbr_s)
rf=$(med replay_fetch_s); rl=$(med replay_local_s)
rss_max=$(awk -F'\t' '$1 ~ /^(full|incr)_ours_s_rss_mib$/ && $3>m{m=$3} END{print m+0}' "$RAW")
thr_full=$(ratio "$fp" "$fo"); thr_rest=$(ratio "$rp" "$ro")
{
echo "Command: \`scripts/bench-backup.sh\` (CHUNK_LEVEL=${CHUNK_LEVEL:-default} SCALE=$SCALE REPS=$REPS PGBENCH_T=$PGBENCH_T LAG_T=$LAG_T REPLAY_MB=$REPLAY_MB REPLAY_REPS=$REPLAY_REPS)."
echo
sed 's/^/    /' "$W/env.txt"
echo "    1-min load average during the run: $(awk '{print $2}' "$W/load.log" | sort -n | awk '{v[NR]=$1} END{printf "min %s / median %s / max %s (%d samples)", v[1], v[int((NR+1)/2)], v[NR], NR}')"
echo
echo "Database: $dbmb MB (sum of pg_database_size). Medians, ranges in parentheses; ours and pgBackRest alternate within each repetition."
echo
echo "| measurement | dr-agent | pgBackRest 2.45 (zst, process-max 2) | ratio ours/pgBR | target | verdict |"
echo "|---|---|---|---|---|---|"
echo "| full backup, s | $fo ($(rng full_ours_s)) | $fp ($(rng full_pgbr_s)) | time $(ratio "$fo" "$fp"), throughput x$thr_full | throughput >= 1.5x | $(verdict "$thr_full" ">=" 1.5) |"
echo "| full backup throughput, MB/s | $(awk -v d="$dbmb" -v t="$fo" 'BEGIN{printf "%.0f", d/t}') | $(awk -v d="$dbmb" -v t="$fp" 'BEGIN{printf "%.0f", d/t}') | | | |"
echo "| full backup repository size, MB | $(mb "$fro") | $(mb "$frp") | $(ratio "$fro" "$frp") | <= 1.1x | $(verdict "$(ratio "$fro" "$frp")" "<=" 1.1) |"
echo "| incremental after pgbench -c 4 -T $PGBENCH_T, s | $io ($(rng incr_ours_s)) | $ip ($(rng incr_pgbr_s)) | $(ratio "$io" "$ip") | < 1 | $(verdict "$(ratio "$io" "$ip")" "<=" 0.999) |"
echo "| incremental bytes added, MB | $(mb "$iao") | $(mb "$iap") | $(ratio "$iao" "$iap") | < 1 | $(verdict "$(ratio "$iao" "$iap")" "<=" 0.999) |"
echo "| push of one 16 MiB segment (wall, process), ms | $(ms "$po") | $(ms "$pp") | $(ratio "$po" "$pp") | <= 0.3x | $(verdict "$(ratio "$po" "$pp")" "<=" 0.3) |"
echo "| archive lag under pgbench -c 4 -j 2 -T $LAG_T: tps / max .ready / max lag MB / growth MB (last third - first third) / drain s | $(med lag_ours_tps) / $(med lag_ours_max_ready) / $(med lag_ours_max_lag_mb) / $(med lag_ours_growth_mb) / $(med lag_ours_drain_s) | $(med lag_pgbr_tps) / $(med lag_pgbr_max_ready) / $(med lag_pgbr_max_lag_mb) / $(med lag_pgbr_growth_mb) / $(med lag_pgbr_drain_s) | | lag does not grow | see figures |"
echo "| agent peak RSS during backups (max of all runs), MiB | $rss_max | | | < 200 | $(verdict "$rss_max" "<=" 199.999) |"
echo "| restore of the latest backup, s | $ro ($(rng restore_ours_s)) | $rp ($(rng restore_pgbr_s)) | time $(ratio "$ro" "$rp"), throughput x$thr_rest | throughput >= 1.5x | $(verdict "$thr_rest" ">=" 1.5) |"
echo "| restore peak RSS, MiB | $(med restore_ours_s_rss_mib) | | | | |"
echo "| restore, then start until promoted (once), s | $(med restore_ours_start_until_promoted_s) | $(med restore_pgbr_start_until_promoted_s) | | | |"
echo "| PITR restore + recovery until promoted, s | $to ($(rng pitr_ours_s)) | $tp ($(rng pitr_pgbr_s)) | $(ratio "$to" "$tp") | <= 0.67x | $(verdict "$(ratio "$to" "$tp")" "<=" 0.67) |"
echo "| PITR rows batch1/batch2 (must be 1000/0) | $(med pitr_ours_rows_b1_b2) | $(med pitr_pgbr_rows_b1_b2) | | | |"
echo "| replay of $(mb "$(med replay_wal_total_bytes)") MB WAL: wal-fetch (prefetch) vs same WAL in pg_wal, s | $rf ($(rng replay_fetch_s)) | local: $rl ($(rng replay_local_s)) | $(ratio "$rf" "$rl") | <= 1.2x | $(verdict "$(ratio "$rf" "$rl")" "<=" 1.2) |"
echo
echo "PITR WAL from backup start to target: $(mb "$(med pitr_wal_to_replay_bytes)") MB. pgbench tps during the incremental rounds: $(med pgbench_tps) ($(rng pgbench_tps))."
} > "$W/summary.md"
mkdir -p "$(dirname "$OUT")"
cp "$W/summary.md" "$OUT"
cp "$RAW" "${OUT%.md}.raw.tsv"
cat "$W/summary.md"
log "fragment written to $OUT (raw samples: ${OUT%.md}.raw.tsv)"
