#!/usr/bin/env bash
# OCI images: create->started from a cached image vs the default image (N each, alternated), and
# first start of a BIG_MB image vs `skopeo copy` of it to a directory (R rounds, alternated).
#   N=200 R=3 BIG_MB=100 bench/images.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p ferry -p ferry-bench
exec ./target/release/images
