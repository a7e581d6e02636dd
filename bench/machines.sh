#!/usr/bin/env bash
# Machine lifecycle benchmark: create->started latency (N machines) and MANY machines on one host.
#   N=200 MANY=1000 bench/machines.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p ferry -p ferry-bench
exec ./target/release/machines
