#!/usr/bin/env bash
# Migration downtime as a client sees it: ferry's pre-copy migration vs a cold migration (stop,
# copy everything, start), 1 GiB and 4 GiB volumes, alternating rounds (issue 6); and vs its
# floor, the same machine restarted in place, also with a server that writes until it is
# stopped (issue 17 item 2).
#   PAIRS_1G=3 PAIRS_4G=2 bash bench/migrate.sh      (results: bench/migrate/RESULTS.md)
#   COLD=0 (no cold rounds), WRITING=0 (no writing-server rounds), SIZES_MB=1024
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p ferry -p ferry-bench
target="${CARGO_TARGET_DIR:-target}"
FERRY_BIN="$target/release/ferry" "$target/release/migrate"
