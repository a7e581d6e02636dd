#!/usr/bin/env bash
# Bridge benchmark: TCP connections/s and UDP round trips/s, direct vs through the bridge,
# first with the cgroup eBPF programs, then with the nftables DNAT mode. Each round is one client
# process alternating 100 ms blocks on the two paths (see crates/ferry-bench/src/bin/bridge.rs).
#   ROUNDS=15 SECS=2 bench/bridge.sh          (BLOCK_MS=100; BPF_STATS=1 adds ns per program run)
# Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p ferry -p ferry-bench
target="${CARGO_TARGET_DIR:-target}"
export FERRY_BIN="$target/release/ferry"
BRIDGE_MODE=ebpf "$target/release/bridge"
BRIDGE_MODE=nft "$target/release/bridge"
