#!/usr/bin/env bash
# The control plane on SQLite and on 3-member etcd in one run: create p50/p99 and a drain of
# 100 machines in 20 orgs against its largest org's share alone; then the time a second server
# takes to take over a migration whose server was killed (bench/takeover.sh alone).
#   N=100 R=7 bench/control.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p ferry -p ferry-bench
./target/release/control
exec ./target/release/takeover
