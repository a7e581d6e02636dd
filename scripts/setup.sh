#!/usr/bin/env bash
# Installs the Debian packages ferry needs to build, test and benchmark.
# Idempotent: when every package is already installed it returns at once,
# without touching the network.
set -euo pipefail

PACKAGES=(
  clang llvm libbpf-dev linux-libc-dev bpftool   # eBPF programs: built by clang, inspected with bpftool
  iproute2 nftables ethtool procps               # namespaces, links, nft DNAT mode, offload switches
  iperf3                                         # benchmarks: TCP throughput and request/response
  runc                                           # benchmarks: the bare OCI runtime baseline of bench/sandbox.sh
  dnsutils                                       # dig, for DNS checks
  curl                                           # tests: a caller without a client certificate
  python3                                        # demo and test workloads inside machines
  pkg-config
  e2fsprogs acl                                  # volumes: mkfs.ext4 for size-limited volumes; setfacl in fork tests
  postgresql                                     # the seeds' story in a test: a primary moves, its replica streams on
  docker-registry skopeo umoci busybox-static    # images: a real registry on loopback, images built by the tests, the pull baseline
  etcd-server                                    # the etcd store backend: its conformance tests start a real etcd
  chromium nodejs                                # the dashboard's browser test: headless Debian Chromium, driven by playwright-core on Node
  protobuf-compiler libprotobuf-dev              # protoc and the well-known .proto files (descriptor, struct) that etcd-client's build script compiles
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Python tools for the tests, pinned, in their own virtualenv so nothing of the system's Python
# changes: schemathesis and an OpenAPI validator (crates/ferry/tests/api_contract.rs), and the
# Prometheus project's own OpenMetrics parser (crates/ferry/tests/metrics.rs).
PYTOOLS=/opt/ferry/pytools
PYPKGS=(schemathesis==4.32.5 openapi-spec-validator==0.9.0 prometheus_client==0.21.1)
# (The list is read whole first: `pip freeze | grep -q` under pipefail fails when grep exits
# early and pip gets SIGPIPE.)
have=$("$PYTOOLS/bin/pip" freeze 2>/dev/null || true)
pymissing=0
for p in "${PYPKGS[@]}"; do
  grep -qx "$p" <<<"$have" || pymissing=1
done
if [ "$pymissing" -ne 0 ]; then
  echo "setup: installing ${PYPKGS[*]} into $PYTOOLS" >&2
  python3 -m venv "$PYTOOLS"
  "$PYTOOLS/bin/pip" install -q --disable-pip-version-check "${PYPKGS[@]}"
fi

# playwright-core (pinned in crates/ferry/tests/ui/package-lock.json) drives Debian's Chromium in
# the dashboard's test; it never downloads a browser of its own.
UI_TEST=$(dirname "$0")/../crates/ferry/tests/ui
if ! grep -qs '"version": "1.64.1"' "$UI_TEST/node_modules/playwright-core/package.json"; then
  echo "setup: installing the dashboard test's node packages (npm ci)" >&2
  (cd "$UI_TEST" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent)
fi

# The kernel's BPF filesystem: ferry pins programs and maps there so they
# outlive the agent process.
if ! mountpoint -q /sys/fs/bpf; then
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi
