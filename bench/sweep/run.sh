#!/usr/bin/env bash
# Sweep benchmark: `ferry sweep --json` against ripgrep on the same generated 1 GiB tree of
# config files, warm page cache, several rounds each; prints medians, GB/s and the ratio
# (ferry throughput / rg throughput). Goal: ratio >= 1.
#
# env: FERRY_SWEEP_BENCH_DIR (default /tmp/ferry-sweep-bench; the tree is generated once and
#      reused), BENCH_SIZE (bytes, default 1 GiB), ROUNDS (default 5), THREADS (default: all CPUs,
#      given to both tools), FERRY_BIN (use this ferry binary instead of building one).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dir="${FERRY_SWEEP_BENCH_DIR:-/tmp/ferry-sweep-bench}"
size="${BENCH_SIZE:-1073741824}"
rounds="${ROUNDS:-5}"
threads="${THREADS:-$(nproc)}"
tree="$dir/tree-$size"

if ! command -v rg >/dev/null; then
    echo "installing ripgrep (Debian package)" >&2
    if [ "$(id -u)" = 0 ]; then apt-get install -y ripgrep >/dev/null || { apt-get update >/dev/null && apt-get install -y ripgrep >/dev/null; }
    else sudo apt-get install -y ripgrep >/dev/null; fi
fi

if [ ! -f "$tree.done" ]; then
    rm -rf "$tree"
    mkdir -p "$dir"
    python3 "$here/gen.py" "$tree" "$size"
    touch "$tree.done"
fi

if [ -n "${FERRY_BIN:-}" ]; then
    ferry="$FERRY_BIN"    # an already built binary (e.g. while the tree does not build)
else
    (cd "$repo" && cargo build --release -p ferry >&2)
    ferry="$repo/target/release/ferry"
fi
out="$dir/out"
mkdir -p "$out"

# A comparable search for rg: case-insensitive fdaa followed by address characters, not inside a
# larger word, with line and column of each match, over everything (no ignore files, hidden
# files too, like ferry). Output goes to a file for both tools: rg stops at the first match when
# it sees stdout is /dev/null, which would not be a fair race.
rg_cmd=(rg --no-config --no-ignore --hidden --threads "$threads" -i -o -n --column '(?-u:\b)fdaa:[0-9a-f:.]+' "$tree")
ferry_cmd=("$ferry" sweep --json --threads "$threads" --owners "$tree.owners.json" "$tree")

bytes=$(find "$tree" -type f -printf "%s\n" | awk "{ s += \$1 } END { print s }")
files=$(find "$tree" -type f | wc -l)

# one run of a command; prints seconds. Exit 1 is "matches found" for both tools.
time_one() {
    local start end rc
    start=$(date +%s%N)
    set +e; "$@" > "$out/stdout" 2> "$out/stderr"; rc=$?; set -e
    end=$(date +%s%N)
    if [ "$rc" -gt 1 ]; then echo "command failed ($rc): $*" >&2; cat "$out/stderr" >&2; exit 1; fi
    awk -v s="$start" -v e="$end" 'BEGIN { printf "%.4f\n", (e - s) / 1e9 }'
}

median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

echo "tree: $tree ($files files, $bytes bytes); threads: $threads; rounds: $rounds" >&2
# Warm the page cache (and check both find the same number of literals).
"${rg_cmd[@]}" > "$out/rg.txt" || true
"${ferry_cmd[@]}" > "$out/ferry.json" || true
rg_hits=$(wc -l < "$out/rg.txt")
ferry_hits=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["summary"]["hits"])' "$out/ferry.json")
echo "matches: rg $rg_hits lines of output, ferry $ferry_hits literals" >&2

rg_times=(); ferry_times=()
for i in $(seq "$rounds"); do
    # Alternate which goes first so neither always runs on the other's leftovers.
    if [ $((i % 2)) = 1 ]; then
        rg_times+=("$(time_one "${rg_cmd[@]}")"); ferry_times+=("$(time_one "${ferry_cmd[@]}")")
    else
        ferry_times+=("$(time_one "${ferry_cmd[@]}")"); rg_times+=("$(time_one "${rg_cmd[@]}")")
    fi
done
rg_med=$(printf '%s\n' "${rg_times[@]}" | median)
ferry_med=$(printf '%s\n' "${ferry_times[@]}" | median)
awk -v b="$bytes" -v r="$rg_med" -v f="$ferry_med" -v rt="${rg_times[*]}" -v ft="${ferry_times[*]}" -v rv="$(rg --version | sed -n 1p)" 'BEGIN {
    printf "rg     (%s): rounds [%s] s, median %.3f s, %.2f GB/s\n", rv, rt, r, b / r / 1e9
    printf "ferry  (sweep --json):    rounds [%s] s, median %.3f s, %.2f GB/s\n", ft, f, b / f / 1e9
    printf "ratio (ferry throughput / rg throughput): %.2fx\n", r / f
}'
