#!/usr/bin/env bash
# ferry's .internal DNS vs NSD, same records, same machine, each server pinned to one core
# (taskset -c 1), dnsperf pinned to the other (taskset -c 0). Several rounds, alternating.
# Prints qps per round, the medians and the ratio ferry/NSD. Loopback only; NSD runs in the
# foreground from a temp dir and is stopped at the end (also on error).
#
#   bench/dns/run.sh            # ROUNDS=3 SECONDS_PER_RUN=10 by default
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS="${ROUNDS:-3}"
SECS="${SECONDS_PER_RUN:-10}"
FERRY_PORT="${FERRY_PORT:-25353}"
NSD_PORT="${NSD_PORT:-25354}"
SERVER_CPU="${SERVER_CPU:-1}"
CLIENT_CPU="${CLIENT_CPU:-0}"

if ! command -v dnsperf >/dev/null || ! command -v nsd >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dnsperf nsd >/dev/null
fi
NSD=$(command -v nsd || echo /usr/sbin/nsd)

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-dns}"
cargo build -q --release -p ferry-dns --bin ferry-dns-bench
BENCH="$CARGO_TARGET_DIR/release/ferry-dns-bench"

TMP=$(mktemp -d /tmp/ferry-dns-bench.XXXXXX)
FERRY_PID=""
NSD_PID=""
cleanup() {
  [ -n "$FERRY_PID" ] && kill "$FERRY_PID" 2>/dev/null || true
  [ -n "$NSD_PID" ] && kill "$NSD_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && cp "$TMP/dnsperf.log" /tmp/dnsperf-last.log 2>/dev/null; rm -rf "$TMP"
}
trap cleanup EXIT

"$BENCH" zone >"$TMP/internal.zone"
"$BENCH" queries >"$TMP/queries.txt"
cat >"$TMP/nsd.conf" <<CONF
server:
  ip-address: 127.0.0.1@$NSD_PORT
  port: $NSD_PORT
  server-count: 1
  username: ""
  chroot: ""
  zonesdir: "$TMP"
  database: ""
  zonelistfile: "$TMP/zone.list"
  xfrdfile: "$TMP/xfrd.state"
  pidfile: "$TMP/nsd.pid"
  logfile: "$TMP/nsd.log"
  hide-version: yes
  verbosity: 0
  # Debian's NSD rate-limits by default (RRL), which turns a benchmark into a drop test.
  rrl-ratelimit: 0
  rrl-whitelist-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: internal
  zonefile: "$TMP/internal.zone"
CONF

taskset -c "$SERVER_CPU" "$BENCH" serve "$FERRY_PORT" 2>"$TMP/ferry.log" &
FERRY_PID=$!
taskset -c "$SERVER_CPU" "$NSD" -d -c "$TMP/nsd.conf" &
NSD_PID=$!

# Wait (bounded) until both answer, and check they give the same answer for a sample name.
# dig prints a failure (e.g. "connection refused" before the server bound) as ";;" lines on
# stdout: those are not answers.
for i in $(seq 1 50); do
  a=$(dig +short +time=1 +tries=1 @127.0.0.1 -p "$FERRY_PORT" vms.app1x0.internal TXT | grep -v '^;;' || true)
  b=$(dig +short +time=1 +tries=1 @127.0.0.1 -p "$NSD_PORT" vms.app1x0.internal TXT | grep -v '^;;' || true)
  [ -n "$a" ] && [ -n "$b" ] && break
  sleep 0.2
done
[ -n "$a" ] && [ -n "$b" ] || { echo "servers did not come up"; cat "$TMP"/*.log; exit 1; }
[ "$a" = "$b" ] || { echo "answers differ: ferry=$a nsd=$b"; exit 1; }
for name in app1x0.internal ord.app2x3.internal; do
  fa=$(dig +short @127.0.0.1 -p "$FERRY_PORT" "$name" AAAA | sort)
  na=$(dig +short @127.0.0.1 -p "$NSD_PORT" "$name" AAAA | sort)
  [ "$fa" = "$na" ] || { echo "AAAA $name differs"; exit 1; }
done

run() { # port -> qps
  taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$1" -d "$TMP/queries.txt" -l "$SECS" -e -q 200 2>&1 \
    | tee -a "$TMP/dnsperf.log" | awk '/Queries per second/ {print $4}'
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

echo "queries: $(wc -l <"$TMP/queries.txt") names, mixed AAAA/TXT/NXDOMAIN; $SECS s per run, $ROUNDS rounds"
: >"$TMP/ferry.qps"; : >"$TMP/nsd.qps"
for r in $(seq 1 "$ROUNDS"); do
  f=$(run "$FERRY_PORT"); echo "$f" >>"$TMP/ferry.qps"
  n=$(run "$NSD_PORT"); echo "$n" >>"$TMP/nsd.qps"
  echo "round $r: ferry $f qps, nsd $n qps"
done
FM=$(median <"$TMP/ferry.qps")
NM=$(median <"$TMP/nsd.qps")
echo "median: ferry $FM qps, nsd $NM qps, ratio ferry/nsd $(awk -v f="$FM" -v n="$NM" 'BEGIN {printf "%.2f", f/n}')"
