#!/usr/bin/env bash
# The control plane on SQLite and on 3-member etcd in one run: create p50/p99 and a drain of
# 100 machines in 20 orgs against its largest org's share alone.
#   N=100 bench/control.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p ferry -p ferry-bench
exec ./target/release/control
