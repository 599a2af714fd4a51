#!/usr/bin/env bash
# lcfs-stress against fio: the same jobs on the same file, interleaved, so
# the bandwidth ratio survives a noisy machine. As root.
#
# The file lives on a fresh ext4 in a sparse loop image under /var/tmp,
# attached with --direct-io=on so O_DIRECT reaches the disk. Jobs (each run
# by both tools with the same flags, over a SIZE file, time based for
# RUNTIME seconds; the order of the tools alternates every round). fio also
# gets --norandommap (lcfs-stress's random offsets repeat the same way) and
# --invalidate=0 (lcfs-stress never drops its file's page cache; fio does at
# every open, and a time-based job reopens at every wrap, which made fio's
# buffered writes half as fast). Each run also reports the average request
# size the loop device saw: a 1 MiB direct request whose buffer is not
# physically contiguous enough is split in two by the loop device's
# 128-segment limit, and that alone moves bandwidth by up to 1.6x.
#   seqwrite-1m  --rw=write --bs=1m --direct=1 --iodepth=16 (io_uring)
#   seqread-1m   --rw=read  --bs=1m --direct=1 --iodepth=16 (io_uring)
#   randread-4k  --rw=randread --bs=4k --direct=1 --iodepth=32 (io_uring)
#   buffered-seqwrite-1m  --rw=write --bs=1m --direct=0 (psync)
# Before every run: sync and drop the page cache (untimed).
#   --rounds N       rounds (default 3)
#   --size SIZE      file size, the region every job goes over (default 1g)
#   --runtime SECS   runtime of every job (default 5)
# Prints each run, then a table: median MiB/s of both tools, the ratio
# lcfs-stress / fio of each round, and the median of those ratios.
E2E_NAME=stress-vs-fio
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/e2e/lib.sh"

rounds=3
size=1g
runtime=5
while [[ $# -gt 0 ]]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer"
require_commands fio
E2E_SCRATCH_SIZE=1G
e2e_init
if [[ -n ${LCFS_STRESS_BIN:-} ]]; then
    [[ -x $LCFS_STRESS_BIN ]] || die "LCFS_STRESS_BIN=$LCFS_STRESS_BIN is not an executable"
else
    say "building lcfs-stress"
    (cd "$E2E_REPO" && quietly cargo build --release -p lcfs-bench --bin lcfs-stress) ||
        die "lcfs-stress does not build"
    LCFS_STRESS_BIN="$E2E_REPO/target/release/lcfs-stress"
fi
stress_bin="$E2E_WORK/lcfs-stress"
cp "$LCFS_STRESS_BIN" "$stress_bin"

# The data disk: ext4 on a loop device that does direct I/O to its image.
image="$E2E_WORK/data.img"
truncate -s 8G "$image"
loop=$(losetup --find --show --direct-io=on "$image") || die "losetup failed"
E2E_LOOPS+=("$loop")
quietly mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0,nodiscard "$loop" || die "mkfs.ext4 failed"
data="$E2E_WORK/data"
mkdir -p "$data"
mount -t ext4 "$loop" "$data" || die "mount failed"
E2E_MOUNTS+=("$data")
file="$data/job.dat"
say "$(fio --version); file $file on ext4 on $loop (direct-io=on); size $size; $rounds rounds"
# Lay the file out once, so every job (reads included) finds it whole.
fio --name=layout --filename="$file" --rw=write --bs=1m --size="$size" --ioengine=psync \
    --end_fsync=1 --output=/dev/null || die "laying out $file failed"

jobs=(
    "seqwrite-1m|--rw=write --bs=1m --direct=1 --iodepth=16 --ioengine=io_uring"
    "seqread-1m|--rw=read --bs=1m --direct=1 --iodepth=16 --ioengine=io_uring"
    "randread-4k|--rw=randread --bs=4k --direct=1 --iodepth=32 --ioengine=io_uring"
    "buffered-seqwrite-1m|--rw=write --bs=1m --direct=0 --ioengine=psync"
)
results="$E2E_WORK/results.tsv"
: >"$results"

# bandwidth TOOL JSON-FILE: bytes/s of the job's only direction.
bandwidth() {
    python3 - "$1" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
report = json.loads(text[text.index("{"):])
job = report["jobs"][0]
print(max(job["read"]["bw_bytes"], job["write"]["bw_bytes"]))
PY
}

# run_one TOOL JOB OPTIONS...: one run; appends "job round tool bytes/s".
run_one() {
    local tool=$1 job=$2 round=$3 out="$E2E_WORK/$1-$2-$3.json" before after
    shift 3
    sync
    echo 3 >/proc/sys/vm/drop_caches
    before=$(cat "/sys/block/$(basename "$loop")/stat")
    case $tool in
        fio) fio --name="$job" --filename="$file" --norandommap --invalidate=0 "$@" \
            --output-format=json >"$out" ||
            die "fio $job failed" ;;
        lcfs-stress) "$stress_bin" --name="$job" --filename="$file" --seed=1 "$@" \
            --output-format=json >"$out" 2>"$out.err" || {
            cat "$out.err" >&2
            die "lcfs-stress $job failed"
        } ;;
    esac
    after=$(cat "/sys/block/$(basename "$loop")/stat")
    local bw request_kib
    bw=$(bandwidth "$out") || die "no bandwidth in $out"
    # /sys/block/*/stat: reads, -, read sectors, -, writes, -, write sectors.
    request_kib=$(python3 -c '
import sys
a, b = (list(map(int, x.split())) for x in sys.argv[1:3])
ios = b[0] - a[0] + b[4] - a[4]
print(f"{(b[2] - a[2] + b[6] - a[6]) / 2 / max(ios, 1):.0f}")' "$before" "$after")
    printf '%s\t%s\t%s\t%s\t%s\n' "$job" "$round" "$tool" "$bw" "$request_kib" >>"$results"
    say "round $round $job $tool: $(python3 -c "print(f'{$bw / 2**20:.1f}')") MiB/s (loop device requests ${request_kib} KiB on average)"
}

for ((round = 1; round <= rounds; round++)); do
    for entry in "${jobs[@]}"; do
        job=${entry%%|*}
        # Word splitting of the job's options is intended.
        # shellcheck disable=SC2206
        options=(${entry#*|} --size="$size" --time_based --runtime="$runtime")
        if ((round % 2)); then
            run_one fio "$job" "$round" "${options[@]}"
            run_one lcfs-stress "$job" "$round" "${options[@]}"
        else
            run_one lcfs-stress "$job" "$round" "${options[@]}"
            run_one fio "$job" "$round" "${options[@]}"
        fi
    done
done

python3 - "$results" <<'PY'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
jobs = []
for row in rows:
    if row[0] not in jobs:
        jobs.append(row[0])
print()
print("| job | fio MiB/s (median) | lcfs-stress MiB/s (median) | ratio lcfs-stress/fio (median of rounds) | per round | loop request KiB fio / lcfs-stress (medians) |")
print("|---|---|---|---|---|---|")
worst = 0.0
for job in jobs:
    fio = {r: float(b) for j, r, t, b, _ in rows if j == job and t == "fio"}
    ours = {r: float(b) for j, r, t, b, _ in rows if j == job and t == "lcfs-stress"}
    kib_fio = statistics.median(float(k) for j, _, t, _, k in rows if j == job and t == "fio")
    kib_ours = statistics.median(float(k) for j, _, t, _, k in rows if j == job and t == "lcfs-stress")
    mf, mo = statistics.median(fio.values()), statistics.median(ours.values())
    # Each round's two runs are seconds apart: their ratio is what survives
    # the machine's noise, so the summary is the median of those.
    ratios = [ours[r] / fio[r] for r in sorted(fio, key=int)]
    per_round = ", ".join(f"{x:.2f}" for x in ratios)
    ratio = statistics.median(ratios)
    worst = max(worst, abs(ratio - 1))
    print(f"| {job} | {mf / 2**20:.1f} | {mo / 2**20:.1f} | {ratio:.2f} | {per_round} | {kib_fio:.0f} / {kib_ours:.0f} |")
print()
print(f"largest deviation of a median ratio from 1: {worst * 100:.1f}% (goal: within 15%)")
PY
e2e_finish "lcfs-stress vs fio, $rounds rounds"
