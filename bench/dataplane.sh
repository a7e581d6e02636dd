#!/usr/bin/env bash
# Data-plane benchmark: eBPF swap path vs plain routes, same run. Prints medians and ratios.
#   ROUNDS=5 SECS=3 bench/dataplane.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p ferry-bench --bin dataplane
exec ./target/release/dataplane
