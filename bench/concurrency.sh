#!/usr/bin/env bash
# engine-concurrency at two commits, interleaved in one run: the engine as it
# is (after) and as it was at BEFORE (default: the commit before checkpoints
# moved their device I/O out of the store lock). The tool's source is the
# current one in both builds; only the engine differs. As root.
#   --before REV   the older engine (default ae9f22f)
#   --rounds N     rounds, each runs both builds once (default 2)
#   --seconds N    seconds per measurement (default 5)
# Prints every result line tagged with its build, then medians per row and
# the ratio after / before.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

before=ae9f22f
rounds=2
seconds=5
while [[ $# -gt 0 ]]; do
    case $1 in
        --before) before=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "concurrency.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

scratch=/var/tmp/lcfs-concurrency
tree=$scratch/before-tree
cleanup() {
    git worktree remove --force "$tree" >/dev/null 2>&1 || true
    rm -f "$scratch"/*.img
}
trap cleanup EXIT
mkdir -p "$scratch"
git worktree remove --force "$tree" >/dev/null 2>&1 || true
git worktree add --detach "$tree" "$before" >/dev/null
cp bench/src/bin/engine_concurrency.rs "$tree/bench/src/bin/"
cp bench/Cargo.toml "$tree/bench/Cargo.toml"
echo "concurrency.sh: building after ($(git rev-parse --short HEAD)) and before ($before)" >&2
cargo build --release -q -p lcfs-bench --bin engine-concurrency
(cd "$tree" && CARGO_TARGET_DIR=$scratch/target cargo build --release -q -p lcfs-bench --bin engine-concurrency)
after_bin=target/release/engine-concurrency
before_bin=$scratch/target/release/engine-concurrency

results=$scratch/results.jsonl
: >"$results"
for round in $(seq 1 "$rounds"); do
    order=(after before)
    ((round % 2 == 0)) && order=(before after)
    for build in "${order[@]}"; do
        bin=$after_bin
        [[ $build == before ]] && bin=$before_bin
        "$bin" --seconds "$seconds" --file "$scratch/$build.img" 2>/dev/null |
            sed "s/^{/{\"build\":\"$build\",\"round\":$round,/" | tee -a "$results"
    done
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    key = ("scaling", r["threads"]) if r["test"] == "scaling" else ("read_latency", r["during"])
    rows.setdefault(key, {}).setdefault(r["build"], []).append(r)
print()
print("| row | metric | before | after | after / before |")
print("|---|---|---|---|---|")
for key in sorted(rows, key=str):
    metrics = ["write_mib_s", "ops_s"] if key[0] == "scaling" else ["p50_us", "p99_us", "p999_us", "max_us"]
    for m in metrics:
        b = statistics.median(r[m] for r in rows[key].get("before", []))
        a = statistics.median(r[m] for r in rows[key].get("after", []))
        name = f"{key[1]} threads" if key[0] == "scaling" else f"4 KiB read during {key[1]}"
        print(f"| {name} | {m} | {b:.1f} | {a:.1f} | {a / b if b else float('nan'):.2f} |")
PY
