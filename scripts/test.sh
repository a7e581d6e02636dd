#!/usr/bin/env bash
# Sets everything up and runs every check and test (README, second command; CI runs this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# A crashed earlier run must not break this one (names are unique per run, but be tidy).
cargo build -q -p ferry
./target/debug/ferry dev clean >/dev/null
cargo fmt --all -- --check
bash scripts/check-doc-anchors.sh
cargo clippy -q --workspace --all-targets -- -D warnings
cargo test --workspace
# The end-to-end tests of the control plane once more, every dev fleet's state on etcd (a
# single-member etcd started by the tests themselves) instead of SQLite.
FERRY_TEST_STORE=etcd cargo test -p ferry --test machines --test migrate --test volumes --test bridge
# Nothing of ours may be left behind by the tests.
left=$(ip netns list | grep -c '^ferry-' || true)
if [ "$left" -ne 0 ]; then
  echo "tests left $left ferry-* namespaces behind:" >&2
  ip netns list | grep '^ferry-' >&2
  exit 1
fi
