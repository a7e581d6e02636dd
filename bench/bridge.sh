#!/usr/bin/env bash
# Bridge benchmark: TCP connections/s and UDP round trips/s, direct vs through the eBPF bridge.
#   ROUNDS=5 SECS=2 bench/bridge.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p ferry -p ferry-bench
exec ./target/release/bridge
