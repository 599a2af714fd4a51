#!/usr/bin/env bash
# Giving space back (docs/gc.md): how long removing N GiB of image layers
# takes until df shows the space, and what the segment cleaner then costs
# the writes that reuse it and the reads of a running container. As root.
# One `lcfs daemon` on a fresh device file, per round:
#   a container (a clone of a frozen 256 MiB image layer) reads 4 KiB at
#   random offsets (fio: O_DIRECT, psync; the daemon's block cache is
#   32 MiB, so most reads reach the device) through every phase;
#   idle           nothing else runs (the reader's baseline);
#   write-fresh    N GiB into a new layer, in empty space: the peer, no
#                  cleaning;
#   remove-whole   that layer removed, until its space is freed, and a sync:
#                  its segments die whole;
#   remove-mixed   N GiB of image layers, written at the same time as N GiB
#                  of a layer that stays (so segments hold both) and a filler
#                  taking the device to about 88%, removed, and a sync;
#   write-reclaimed  N GiB into a new layer again: its room is made by the
#                  cleaner, copying the live half of those segments.
# Then fsck, and the data the cleaner moved is checked byte for byte.
#   --gib N      GiB removed and rewritten (default 2)
#   --size S     device size (default 8G)
#   --rounds R   rounds, a fresh device each (default 1)
# Prints one JSON line per phase and round, then medians and the ratios:
# write-reclaimed against write-fresh (MiB/s), each phase's read latency
# against idle.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

gib=2
size=8G
rounds=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --gib) gib=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        -h | --help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "reclaim.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ $gib =~ ^[1-9][0-9]*$ ]] || { echo "reclaim.sh: --gib takes a whole number" >&2; exit 2; }
command -v fio >/dev/null || { echo "reclaim.sh: needs fio (scripts/setup.sh installs it)" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo "reclaim.sh: run as root" >&2; exit 1; }

scratch=/var/tmp/lcfs-reclaim
src=/dev/shm/lcfs-reclaim-src
lcfs=$PWD/target/release/lcfs
dir=$scratch/run
dev=$dir/device.img
mnt=$dir/root/mnt
sock=$dir/control.sock
daemon_pid=
reader_pid=
cleanup() {
    [[ -z $reader_pid ]] || kill -INT "$reader_pid" 2>/dev/null || true
    [[ -z $daemon_pid ]] || { kill -TERM "$daemon_pid" 2>/dev/null; wait "$daemon_pid" 2>/dev/null || true; }
    umount -l "$mnt" 2>/dev/null || true
    # The logs stay, for a failed run.
    cp "$dir"/*.json "$dir"/*.log "$scratch"/ 2>/dev/null || true
    rm -rf "$dir" "$src"
}
trap cleanup EXIT
echo "reclaim.sh: building lcfs ($(git rev-parse --short HEAD))" >&2
cargo build --release -q -p lcfs
mkdir -p "$scratch"
# The bytes written: 256 MiB of random data in memory, copied as often as
# needed (lcfs does not deduplicate).
head -c 256M /dev/urandom >"$src"
chunks=$((gib * 4))

ctl() { "$lcfs" "$@" --control-socket "$sock"; }
stat_json() { ctl stats --json; }
now_ns() { date +%s%N; }
secs() { python3 -c "import sys; print(round((int(sys.argv[2]) - int(sys.argv[1])) / 1e9, 3))" "$1" "$2"; }
avail_bytes() { df -B1 --output=avail "$mnt/$1" | tail -1 | tr -d ' '; }

# fill LAYER FIRST COUNT: COUNT copies of the source into LAYER, each
# flushed to the device.
fill() {
    local layer=$1 first=$2 count=$3 i
    for ((i = first; i < first + count; i++)); do
        dd if="$src" of="$mnt/$layer/f$i" bs=1M conv=fsync status=none
    done
}

# interleave A B: the source into files A and B, 1 MiB to each in turn,
# each MiB flushed (an fsync) before the next: the device log gets them
# alternating, so every 4 MiB segment holds both.
interleave() {
    python3 - "$src" "$1" "$2" <<'PY'
import os, sys
src, a, b = sys.argv[1:]
with open(src, "rb") as s, open(a, "wb") as fa, open(b, "wb") as fb:
    while chunk := s.read(1 << 20):
        for f in (fa, fb):
            f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
PY
}

reader_start() { # PHASE
    fio --name=reader --filename="$mnt/ctr/reader.dat" --rw=randread --bs=4k --direct=1 \
        --ioengine=psync --time_based --runtime=3600 --output-format=json \
        --output="$dir/reader-$1.json" >"$dir/reader-$1.log" 2>&1 &
    reader_pid=$!
    sleep 1
}
# reader_stop PHASE ROUND SECONDS MIBS EXTRA_JSON: stops the reader, prints
# the phase's line.
reader_stop() {
    kill -INT "$reader_pid"
    wait "$reader_pid" || true
    reader_pid=
    python3 - "$dir/reader-$1.json" "$1" "$2" "$3" "$4" "$5" <<'PY'
import json, sys
path, phase, rnd, seconds, mibs, extra = sys.argv[1:]
text = open(path).read()  # fio writes "terminating on signal" first
r = json.loads(text[text.index("{"):])["jobs"][0]["read"]
p = r["clat_ns"]["percentile"]
line = {"phase": phase, "round": int(rnd), "seconds": float(seconds),
        "mib_s": float(mibs), "reads": r["total_ios"],
        "read_p50_us": round(p["50.000000"] / 1e3, 1),
        "read_p99_us": round(p["99.000000"] / 1e3, 1),
        "read_p999_us": round(p["99.900000"] / 1e3, 1),
        "read_max_us": round(r["clat_ns"]["max"] / 1e3, 1)}
line.update(json.loads(extra))
print(json.dumps(line))
PY
}

# timed_write PHASE ROUND LAYER: N GiB into a new layer, the reader beside.
timed_write() {
    local phase=$1 round=$2 layer=$3 before after t0 t1 s
    ctl layer create --cold "$layer" >/dev/null
    before=$(stat_json)
    reader_start "$phase"
    t0=$(now_ns)
    fill "$layer" 0 "$chunks"
    ctl sync >/dev/null
    t1=$(now_ns)
    s=$(secs "$t0" "$t1")
    after=$(stat_json)
    reader_stop "$phase" "$round" "$s" "$(python3 -c "print(round($gib * 1024 / $s, 1))")" \
        "$(jq -nc --argjson b "$before" --argjson a "$after" \
            '{segments_cleaned: ($a.engine.segments_cleaned - $b.engine.segments_cleaned),
              blocks_relocated: ($a.engine.blocks_relocated - $b.engine.blocks_relocated)}')"
}

# timed_remove PHASE ROUND LAYER...: removes the layers (`layer rm` answers
# at once; the daemon frees their space in the background), waits until no
# removal is pending, and syncs; seconds until then, when df shows the
# space, and until the removals answered.
timed_remove() {
    local phase=$1 round=$2 t0 t1 answered before after
    shift 2
    before=$(avail_bytes ctr)
    reader_start "$phase"
    t0=$(now_ns)
    for layer in "$@"; do
        ctl layer rm "$layer" >/dev/null
    done
    answered=$(now_ns)
    until [[ $(ctl stats --json | jq .removals_pending) == 0 ]]; do
        sleep 0.01
    done
    ctl sync >/dev/null
    t1=$(now_ns)
    after=$(avail_bytes ctr)
    reader_stop "$phase" "$round" "$(secs "$t0" "$t1")" 0 \
        "$(jq -nc --argjson b "$before" --argjson a "$after" --argjson r "$(secs "$t0" "$answered")" \
            '{df_gib_back: ((($a - $b) / 1073741824) * 100 | round / 100), rm_answered_s: $r}')"
}

results=$scratch/results.jsonl
: >"$results"
for round in $(seq 1 "$rounds"); do
    rm -rf "$dir" && mkdir -p "$dir/root" && chmod 700 "$dir/root"
    "$lcfs" mkfs "$dev" --size "$size" >/dev/null
    "$lcfs" daemon --device "$dev" --mount "$mnt" --control-socket "$sock" --no-containerd \
        --block-cache-mib 32 \
        >"$dir/daemon.log" 2>&1 &
    daemon_pid=$!
    for _ in $(seq 300); do
        [[ -S $sock ]] && ctl layer ls >/dev/null 2>&1 && break
        sleep 0.1
    done
    ctl layer ls >/dev/null || { cat "$dir/daemon.log" >&2; exit 1; }
    # The running container and its file.
    ctl layer create --cold image >/dev/null
    dd if="$src" of="$mnt/image/reader.dat" bs=1M conv=fsync status=none
    ctl layer clone image ctr >/dev/null
    {
        reader_start idle
        sleep 10
        reader_stop idle "$round" 9 0 '{}'
        timed_write write-fresh "$round" fresh
        timed_remove remove-whole "$round" fresh
        # Image layers written beside a layer that stays, then a filler.
        ctl layer create --cold stays >/dev/null
        names=()
        for ((i = 0; i < chunks; i++)); do
            ctl layer create --cold "img$i" >/dev/null
            names+=("img$i")
            interleave "$mnt/img$i/f$i" "$mnt/stays/f$i"
        done
        total=$(stat_json | jq '.capacity_bytes')
        fillers=0
        while (($(stat_json | jq '.live_bytes') < total / 100 * 88)); do
            fillers=$((fillers + 1))
            ctl layer create --cold "filler$fillers" >/dev/null
            fill "filler$fillers" 0 1
        done
        echo "reclaim.sh: device at $(stat_json | jq '.live_bytes * 100 / .capacity_bytes | floor')%, $(stat_json | jq '.segments_free') free segments" >&2
        timed_remove remove-mixed "$round" "${names[@]}"
        timed_write write-reclaimed "$round" again
        # What the cleaner moved reads back as written.
        want=$(sha256sum <"$src" | cut -d' ' -f1)
        for ((i = 0; i < chunks; i++)); do
            [[ $(sha256sum <"$mnt/stays/f$i" | cut -d' ' -f1) == "$want" ]] ||
                { echo "reclaim.sh: stays/f$i differs after cleaning" >&2; exit 1; }
        done
        ctl fsck --online >/dev/null || { echo "reclaim.sh: fsck found problems" >&2; exit 1; }
    } | tee -a "$results"
    kill -TERM "$daemon_pid"
    wait "$daemon_pid" || true
    daemon_pid=
done

python3 - "$results" "$gib" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault(r["phase"], []).append(r)
med = lambda phase, key: statistics.median(r[key] for r in rows[phase])
print()
print(f"| phase ({sys.argv[2]} GiB) | seconds | MiB/s | read p50 / p99 / p99.9 µs | read max, ms | p99 / idle p99 |")
print("|---|---|---|---|---|---|")
idle = med("idle", "read_p99_us")
for phase in ["idle", "write-fresh", "remove-whole", "remove-mixed", "write-reclaimed"]:
    if phase not in rows:
        continue
    print(f"| {phase} | {med(phase, 'seconds'):.2f} | {med(phase, 'mib_s') or '-'} | "
          f"{med(phase, 'read_p50_us')} / {med(phase, 'read_p99_us')} / {med(phase, 'read_p999_us')} | "
          f"{med(phase, 'read_max_us') / 1e3:.1f} | {med(phase, 'read_p99_us') / idle:.2f} |")
fresh, again = med("write-fresh", "mib_s"), med("write-reclaimed", "mib_s")
print(f"\nwrite-reclaimed / write-fresh: {again / fresh:.2f} "
      f"(segments cleaned {med('write-reclaimed', 'segments_cleaned')}, "
      f"blocks moved {med('write-reclaimed', 'blocks_relocated')})")
for phase in ["remove-whole", "remove-mixed"]:
    if phase in rows:
        print(f"{phase}: df shows {med(phase, 'df_gib_back')} GiB back after {med(phase, 'seconds'):.2f} s"
              f" (layer rm answered after {med(phase, 'rm_answered_s'):.3f} s)")
PY
