#!/usr/bin/env bash
# Dashboard rendering of a large fleet: a release dev fleet with N machines (default 1000, on 2
# hosts), then headless Chromium loads /ui#/machines ROUNDS times (default 5).
#   N=1000 ROUNDS=5 bench/dashboard.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p ferry
N=${N:-1000}
ROUNDS=${ROUNDS:-5}
NAME=bdash$$
STATE=$(mktemp -d /tmp/ferry-bench-dash.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
API=http://127.0.0.1:$PORT
"${CARGO_TARGET_DIR:-target}/release/ferry" dev --no-demo --name "$NAME" --hosts 2 --state-dir "$STATE" \
  --listen "127.0.0.1:$PORT" --dns-listen "127.0.0.1:0" >"$STATE.log" 2>&1 &
DEV=$!
cleanup() { kill -INT "$DEV" 2>/dev/null || true; wait "$DEV" 2>/dev/null || true; rm -rf "$STATE" "$STATE.log"; }
trap cleanup EXIT
# The fleet's admin token (ferry dev writes it before it listens).
for _ in $(seq 600); do [ -s "$STATE/admin.token" ] && break; sleep 0.1; done
TOKEN=$(cat "$STATE/admin.token")
python3 - "$API" "$N" "$TOKEN" <<'PY'
import json, sys, time, urllib.error, urllib.request, concurrent.futures as cf
api, n, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def call(method, path, body=None):
    req = urllib.request.Request(api + path, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"content-type": "application/json", "authorization": "Bearer " + token})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)
deadline = time.time() + 120
while True:
    try:
        if len(call("GET", "/v1/hosts")) == 2: break
    except Exception: pass
    if time.time() > deadline: sys.exit("the dev fleet did not come up")
    time.sleep(0.2)
for a in range(10):
    call("POST", "/v1/apps", {"app_name": f"dash{a}", "org_slug": f"org{a}"})
retries = 0
def make(i):
    # 503 means "try again" (the store or an agent was busy): a client does, a few times.
    global retries
    for attempt in range(6):
        try:
            return call("POST", f"/v1/apps/dash{i % 10}/machines", {"config": {"init": {"cmd": ["sleep", "infinity"]}}})
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == 5:
                raise SystemExit(f"create {i}: {e.code} {e.read().decode()}")
            retries += 1
            time.sleep(0.2 * (attempt + 1))
t = time.time()
with cf.ThreadPoolExecutor(4) as ex:
    list(ex.map(make, range(n)))
print(f"created {n} machines in {time.time() - t:.1f} s ({retries} creates retried after a 503)")
PY
# The browser driver is the one the dashboard's test installs (scripts/setup.sh).
ln -sfn ../../crates/ferry/tests/ui/node_modules bench/dashboard/node_modules
node bench/dashboard/render.mjs "$API" "$N" "$ROUNDS" "$TOKEN"
