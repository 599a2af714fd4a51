#!/usr/bin/env bash
# Concurrency at two commits, interleaved in one run: lcfs as it is (after)
# and as it was at BEFORE (default: the commit before checkpoints and the
# cleaner moved their device I/O out of the store lock). As root.
#  - engine: engine-concurrency (the current tool's source in both builds;
#    only the engine differs): 1, 2, 4, 8 threads on separate layers;
#    1, 2, 4, 8 threads of lookups + getattrs in clones of a frozen layer
#    beside a writer; 4 KiB read latency alone, during checkpoints, during
#    cleaning, during online fscks.
#  - mount: each build's `lcfs daemon` on a fresh device file, T layers, fio
#    with T jobs, one per layer directory (64 KiB random reads and writes,
#    psync, an fsync every 64 writes, 64 MiB per job, time based), T = 1, 2,
#    4, 8; read + write MiB/s of all jobs.
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
        -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "concurrency.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

scratch=/var/tmp/lcfs-concurrency
tree=$scratch/before-tree
cleanup() {
    for m in "$scratch"/mount-*/root/mnt; do
        umount -l "$m" 2>/dev/null || true
    done
    git worktree remove --force "$tree" >/dev/null 2>&1 || true
    rm -rf "$scratch"/*.img "$scratch"/mount-*
}
trap cleanup EXIT
mkdir -p "$scratch"
git worktree remove --force "$tree" >/dev/null 2>&1 || true
git worktree add --detach "$tree" "$before" >/dev/null
cp bench/src/bin/engine_concurrency.rs "$tree/bench/src/bin/"
cp bench/Cargo.toml "$tree/bench/Cargo.toml"
echo "concurrency.sh: building after ($(git rev-parse --short HEAD)) and before ($before)" >&2
cargo build --release -q -p lcfs-bench --bin engine-concurrency
cargo build --release -q -p lcfs
(cd "$tree" && CARGO_TARGET_DIR=$scratch/target cargo build --release -q -p lcfs-bench --bin engine-concurrency)
(cd "$tree" && CARGO_TARGET_DIR=$scratch/target cargo build --release -q -p lcfs)
after_bin=target/release/engine-concurrency
before_bin=$scratch/target/release/engine-concurrency
after_lcfs=$PWD/target/release/lcfs
before_lcfs=$scratch/target/release/lcfs
command -v fio >/dev/null || { echo "concurrency.sh: needs fio (scripts/setup.sh installs it)" >&2; exit 1; }

# mount_run BUILD LCFS ROUND: fio through BUILD's daemon, one line per T.
mount_run() {
    local build=$1 lcfs=$2 round=$3 dir=$scratch/mount-$1
    local dev=$dir/device.img mnt=$dir/root/mnt sock=$dir/control.sock
    rm -rf "$dir" && mkdir -p "$dir/root" && chmod 700 "$dir/root"
    "$lcfs" mkfs "$dev" --size 8G >/dev/null
    local extra=()
    "$lcfs" daemon --help 2>&1 | grep -q -- --no-containerd && extra=(--no-containerd)
    "$lcfs" daemon --device "$dev" --mount "$mnt" --control-socket "$sock" "${extra[@]}" \
        >"$dir/daemon.log" 2>&1 &
    local pid=$! waited=0
    until [[ -S $sock ]] && "$lcfs" layer ls --control-socket "$sock" >/dev/null 2>&1; do
        sleep 0.1
        waited=$((waited + 1))
        [[ $waited -lt 300 ]] || { cat "$dir/daemon.log" >&2; kill "$pid"; return 1; }
    done
    for threads in 1 2 4 8; do
        local dirs=()
        for t in $(seq 1 "$threads"); do
            "$lcfs" layer create --control-socket "$sock" "t$threads-$t" >/dev/null
            dirs+=("$mnt/t$threads-$t")
        done
        local list
        list=$(IFS=:; echo "${dirs[*]}")
        fio --name=layers --directory="$list" --numjobs="$threads" --rw=randrw --bs=64k \
            --size=64m --ioengine=psync --fsync=64 --runtime="$seconds" --time_based \
            --group_reporting --output-format=json >"$dir/fio-$threads.json"
        python3 - "$dir/fio-$threads.json" "$build" "$round" "$threads" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
mib = (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / (1 << 20)
print(json.dumps({"build": sys.argv[2], "round": int(sys.argv[3]), "test": "mount",
                  "threads": int(sys.argv[4]), "rw_mib_s": round(mib, 1)}))
PY
    done
    kill -TERM "$pid"
    wait "$pid" || true
    rm -rf "$dir"
}

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
        lcfs=$after_lcfs
        [[ $build == before ]] && lcfs=$before_lcfs
        mount_run "$build" "$lcfs" "$round" | tee -a "$results"
    done
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    key = (r["test"], r["threads"]) if r["test"] in ("scaling", "mount", "metadata") else ("read_latency", r["during"])
    rows.setdefault(key, {}).setdefault(r["build"], []).append(r)
print()
print("| row | metric | before | after | after / before |")
print("|---|---|---|---|---|")
for key in sorted(rows, key=str):
    metrics = {"scaling": ["write_mib_s", "ops_s"], "mount": ["rw_mib_s"],
               "metadata": ["ops_s", "writer_mib_s"]}.get(
        key[0], ["p50_us", "p99_us", "p999_us", "max_us"])
    for m in metrics:
        b = statistics.median(r[m] for r in rows[key].get("before", []))
        a = statistics.median(r[m] for r in rows[key].get("after", []))
        name = {"scaling": f"engine, {key[1]} threads", "mount": f"mount, {key[1]} fio jobs",
                "metadata": f"lookup + getattr, {key[1]} threads beside a writer"}.get(
            key[0], f"4 KiB read during {key[1]}")
        print(f"| {name} | {m} | {b:.1f} | {a:.1f} | {a / b if b else float('nan'):.2f} |")
PY
