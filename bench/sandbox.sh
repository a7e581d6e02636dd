#!/usr/bin/env bash
# What the machine sandbox adds to a start, against no sandbox and against bare runc (if installed).
#   N=100 bench/sandbox.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p ferry -p ferry-bench
exec ./target/release/sandbox
