#!/usr/bin/env bash
# Sets everything up and runs a dev fleet with its demo (README, first command).
# Extra arguments go to `ferry dev` (e.g. --hosts 5, --exit-after-demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p ferry
exec ./target/release/ferry dev "$@"
