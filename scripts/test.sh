#!/usr/bin/env bash
# THE test command of YesLocker DR (README: run `scripts/test.sh` on a fresh machine; CI
# runs it through .ci/run as root on a clean clone with CI=true and no stdin).
#
# 1. installs what the integration tests need when it is missing (apt: PostgreSQL 15;
#    pip: moto[server]) - more packages are added here as suites need them
#    (nftables, nginx, bind9/knot-dnsutils);
# 2. builds the workspace (the integration tests start the built binaries);
# 3. cargo fmt --check, cargo clippy -D warnings;
# 4. runs every test (cargo-nextest when installed, else cargo test), the integration
#    suite with limited parallelism: each of its tests starts a whole cluster;
# 5. prints a summary of every step, and exits non-zero if any step failed.
#
# Knobs: DR_TEST_THREADS (parallel integration tests, default 2), DR_TEST_TIME_SCALE
# (stretch every wait in the harness), DR_SKIP_INSTALL=1, DR_TEST_FILTER (passed to the
# test runner for dr-tests).
set -uo pipefail

cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export DEBIAN_FRONTEND=noninteractive

log_dir="${DR_TEST_LOG_DIR:-target/test-logs}"
mkdir -p "$log_dir"

declare -a step_names=() step_results=() step_secs=()
failed=0
hr() { printf '%*s\n' 78 '' | tr ' ' '='; }

# step NAME CMD...: runs CMD, records its result and duration, keeps going on failure.
step() {
  local name=$1; shift
  hr; echo "== $name: $*"; hr
  local start=$SECONDS rc=0
  "$@" || rc=$?
  step_names+=("$name"); step_secs+=($((SECONDS - start)))
  if [ "$rc" -eq 0 ]; then step_results+=("ok"); else step_results+=("FAILED (exit $rc)"); failed=1; fi
  return "$rc"
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo -n "$@"
  else echo "need root for: $*" >&2; return 1; fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then as_root apt-get update -q || return 1; apt_updated=1; fi
  as_root apt-get install -y -q --no-install-recommends "$@"
}

install_deps() {
  local pkgs=()
  # PostgreSQL 15 server binaries for tests/src/harness/postgres.rs (initdb on free ports).
  [ -x /usr/lib/postgresql/15/bin/initdb ] || pkgs+=(postgresql-15)
  # curl: the no-client-certificate test speaks raw TLS with it.
  command -v curl >/dev/null || pkgs+=(curl)
  # Agent suites: nftables + iproute2 (isolation in test network namespaces), nginx (traffic
  # switch through a real nginx), bind9 + dig (RFC 2136 updates against a real BIND).
  command -v nft >/dev/null || [ -x /usr/sbin/nft ] || pkgs+=(nftables)
  command -v ip >/dev/null || [ -x /usr/sbin/ip ] || pkgs+=(iproute2)
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || pkgs+=(nginx)
  command -v named >/dev/null || [ -x /usr/sbin/named ] || pkgs+=(bind9)
  command -v dig >/dev/null || pkgs+=(bind9-dnsutils)
  if [ "${#pkgs[@]}" -gt 0 ]; then
    echo "installing: ${pkgs[*]}"
    # The tests start their own servers on loopback: keep apt from starting the packaged
    # daemons (nginx on :80, named on :53, a PostgreSQL cluster) while installing.
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null && as_root chmod +x /usr/sbin/policy-rc.d && made_policy=1
    fi
    apt_install "${pkgs[@]}"; local rc=$?
    [ "$made_policy" -eq 1 ] && as_root rm -f /usr/sbin/policy-rc.d
    [ "$rc" -eq 0 ] || return 1
    # Debian starts a cluster on install; the tests run their own servers.
    if command -v pg_ctlcluster >/dev/null; then pg_ctlcluster 15 main stop 2>/dev/null || true; fi
  fi
  # S3-compatible server for the backup suites.
  if ! command -v moto_server >/dev/null; then
    local pip=pip3; command -v pip3 >/dev/null || pip=pip
    if ! command -v "$pip" >/dev/null; then apt_install python3-pip || return 1; pip=pip3; fi
    "$pip" install -q 'moto[server]' || "$pip" install -q --break-system-packages 'moto[server]' || return 1
  fi
  echo "dependencies present"
}

run_tests() {
  local threads="${DR_TEST_THREADS:-2}" filter=()
  [ -n "${DR_TEST_FILTER:-}" ] && filter=("$DR_TEST_FILTER")
  if command -v cargo-nextest >/dev/null; then
    local rc=0
    # Unit tests and doc-free crates: fast, full parallelism.
    cargo nextest run --workspace --exclude dr-tests --locked --no-fail-fast \
      --no-tests=warn --failure-output=final || rc=1
    # Integration suite: every test starts a cluster of real processes on 2 cores.
    cargo nextest run -p dr-tests --locked --config-file tests/nextest.toml \
      --test-threads "$threads" "${filter[@]}" || rc=1
    cargo test --workspace --locked --doc -q || rc=1
    return "$rc"
  else
    cargo test --workspace --locked --exclude dr-tests || return 1
    cargo test -p dr-tests --locked -- --test-threads "$threads" "${filter[@]}"
  fi
}

total_start=$SECONDS
if [ "${DR_SKIP_INSTALL:-0}" != 1 ]; then step "install test dependencies" install_deps; fi
build_ok=0
step "cargo build --workspace --locked" cargo build --workspace --locked && build_ok=1
step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy -D warnings" cargo clippy --workspace --all-targets --locked -- -D warnings
if [ "$build_ok" -eq 1 ]; then
  hr; echo "== tests (log: $log_dir/tests.log)"; hr
  tests_start=$SECONDS
  run_tests 2>&1 | tee "$log_dir/tests.log"
  rc=${PIPESTATUS[0]}
  step_names+=("tests"); step_secs+=($((SECONDS - tests_start)))
  if [ "$rc" -eq 0 ]; then step_results+=("ok"); else step_results+=("FAILED (exit $rc)"); failed=1; fi
else
  step_names+=("tests"); step_results+=("SKIPPED (build failed)"); step_secs+=(0); failed=1
fi

hr
echo "== summary ($((SECONDS - total_start)) s)"
for i in "${!step_names[@]}"; do
  printf '   %-36s %-24s %s\n' "${step_names[$i]}" "${step_results[$i]}" \
    "$([ "${step_secs[$i]}" -gt 0 ] && echo "${step_secs[$i]} s")"
done
if [ -f "$log_dir/tests.log" ]; then
  echo "== test runner results (full log: $log_dir/tests.log)"
  # Unindented "test result:" only: indented ones are a failed test's own output in nextest's report.
  grep -E '^( *Summary \[|test result:| +(FAIL|FLAKY|TRY [0-9]+ FAIL|TIMEOUT|SIGSEGV|SIGKILL|SIGABRT) \[)' "$log_dir/tests.log" \
    | awk '!seen[$0]++' | tail -40 || true
  # Why each failed test failed, close to the end of the output: a failed test's own report
  # (logs, then a long backtrace) can push its error line out of a truncated CI excerpt.
  if grep -qE '^ +(FAIL|TRY [0-9]+ FAIL|FLAKY|TIMEOUT) \[' "$log_dir/tests.log"; then
    echo "== failure causes (error and panic lines of failed tests)"
    grep -aE '(^|[[:space:]])(Error: |Caused by:|thread .* panicked at|assertion .*failed|child processes panicked)' \
      "$log_dir/tests.log" -A3 | grep -avE '^\s*[0-9]+: |^\s+at ' | cut -c1-400 | head -60 || true
  fi
fi
hr
if [ "$failed" -ne 0 ]; then echo "RESULT: FAILED"; else echo "RESULT: all steps passed"; fi
# Last line: the totals over every runner invocation (nextest "Summary" lines, cargo test
# "test result:" lines), in the plain "N passed, N failed" form.
if [ -f "$log_dir/tests.log" ]; then
  grep -E '^( *Summary \[|test result:)' "$log_dir/tests.log" | awk '
    { for (i = 2; i <= NF; i++) { w = $i; gsub(/[^a-z]/, "", w); n = $(i-1); gsub(/[^0-9]/, "", n)
        if (w == "passed") p += n; if (w == "failed" || w == "timed") f += n; if (w == "skipped" || w == "ignored") s += n } }
    END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }'
fi
exit "$failed"
