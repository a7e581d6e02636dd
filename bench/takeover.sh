#!/usr/bin/env bash
# Migration takeover: two `ferry server`s on 3-member etcd, the one driving a migration killed
# (SIGKILL) R times; time until the other holds the claim and records the next step.
#   R=7 bench/takeover.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p ferry -p ferry-bench
exec ./target/release/takeover
