#!/usr/bin/env bash
# Bridge benchmark: TCP connections/s and UDP round trips/s, direct vs through the bridge,
# first with the cgroup eBPF programs, then with the nftables DNAT mode.
#   ROUNDS=9 SECS=2 bench/bridge.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p ferry -p ferry-bench
BRIDGE_MODE=ebpf ./target/release/bridge
BRIDGE_MODE=nft ./target/release/bridge
