#!/usr/bin/env bash
# Docker-level benchmark: dockerd 20.10 on the lcfs graphdriver plugin beside
# the same dockerd on overlay2 and on fuse-overlayfs (and, on request, btrfs),
# in the same run, interleaved in rounds.
#
#   sudo bash bench/docker-compare.sh                 # full run: 3 rounds, ~10 min
#   sudo bash bench/docker-compare.sh --quick         # 2 rounds, 20 containers, ~5 min
#   sudo bash bench/docker-compare.sh --rows launch --counts 20,40,60,80,100
#   sudo bash bench/docker-compare.sh --peers lcfs,overlay2,fuse-overlayfs,btrfs
#
# Every peer has its own private dockerd (scripts/e2e/lib.sh: own data root,
# exec root and socket; --experimental for the plugin), all with their data
# on one fresh ext4 in a sparse loop image under /var/tmp: overlay2's and
# fuse-overlayfs's data roots are directories on it, the lcfs device is a
# sparse file on it, and btrfs's data root is a btrfs in a sparse loop image
# file on it. Each dockerd imports the cached Debian bookworm minbase rootfs
# (`docker import`, one ~200 MB layer) as debian:bench, once, untimed.
#
# Rows (docs/benchmarks.md, "Docker: lcfs vs overlay2 vs fuse-overlayfs",
# says exactly what each one times):
#   launch  N x `docker run -d --network none debian:bench sleep infinity`,
#           one after another (cold: caches dropped first), then one
#           `docker rm -f` of all N; both timed, and their sum. --counts
#           sweeps N; one TSV row per driver per N in FILE.chart.tsv.
#   build   `DOCKER_BUILDKIT=0 docker build --no-cache --network none` of a
#           9-step Dockerfile FROM debian:bench, one RUN step of which writes
#           --build-mib MiB of random bytes; then the image is removed.
#   load    `docker load` of a `docker save` archive of a one-layer Debian
#           image (the rootfs plus one file, so no dockerd already has the
#           layer); then the image is removed.
# For build and load, a `sync` right after (and `lcfs sync` for lcfs: syncfs
# does not reach a FUSE daemon) is timed too, as "+ sync", since the peers
# leave different amounts of data in memory when the command returns.
# For lcfs, the time spent inside the plugin's calls during each phase comes
# from the daemon (`lcfs stats --json`, section "plugin"): busy time (at
# least one call in hand) and the calls per method.
#
# In every round each peer runs each row once, in an order that rotates
# (A B C, B C A, C A B), so drift and other work on the machine hit every peer
# alike. Prints a Markdown summary (median, min-max, lcfs/peer ratios, the
# issue's goals) and keeps every raw measurement in a TSV file (--out).
# Needs root, dockerd 20.10 (Debian's docker.io), fuse-overlayfs, and for
# btrfs mkfs.btrfs.
E2E_NAME=docker-compare
# Room for every peer's copy of the image, a loaded image and a build at
# once (sparse: only what is written takes space).
# Set before lib.sh, which gives unset sizes its own, smaller defaults.
: "${E2E_SCRATCH_SIZE:=64G}"
: "${LCFS_DEVICE_SIZE:=16G}"
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/e2e/lib.sh"

usage() {
    cat <<'EOF'
usage: bench/docker-compare.sh [--quick] [--rounds N] [--rows LIST] [--peers LIST]
                               [--counts LIST] [--build-mib N] [--out FILE]

  --quick        2 rounds, 20 containers, a 64 MiB build step (~5 min)
  --rounds N     rounds (default 3); the summary shows their median
  --rows LIST    comma-separated subset of launch,build,load (default all)
  --peers LIST   comma-separated subset of lcfs,overlay2,fuse-overlayfs,btrfs
                 (default lcfs,overlay2,fuse-overlayfs)
  --counts LIST  containers per launch measurement, e.g. 20,40,60,80,100
                 (default 100); each count is measured in every round
  --build-mib N  what the build's big RUN step writes (default 200)
  --out FILE     raw results (TSV), the summary (FILE.md) and the launch
                 medians per driver and count (FILE.chart.tsv)
                 (default /var/tmp/lcfs-docker-compare-<time>.tsv)
Environment: LCFS_BIN (a built lcfs instead of target/release/lcfs),
E2E_KEEP=1 (keep the work directory), RUST_LOG (daemon log level, default warn).
EOF
}

command_line="bench/docker-compare.sh${*:+ $*}"
rounds=3
rows=launch,build,load
peers=lcfs,overlay2,fuse-overlayfs
counts=100
build_mib=200
out=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick)
            rounds=2
            counts=20
            build_mib=64
            ;;
        --rounds) rounds=$2; shift ;;
        --rows) rows=$2; shift ;;
        --peers) peers=$2; shift ;;
        --counts) counts=$2; shift ;;
        --build-mib) build_mib=$2; shift ;;
        --out) out=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done
IFS=, read -r -a row_list <<<"$rows"
IFS=, read -r -a peer_list <<<"$peers"
IFS=, read -r -a count_list <<<"$counts"
for number in "$rounds" "$build_mib" "${count_list[@]}"; do
    [[ $number =~ ^[1-9][0-9]*$ ]] || die "'$number' is not a positive integer"
done
for row in "${row_list[@]}"; do
    [[ $row =~ ^(launch|build|load)$ ]] || die "unknown row '$row'"
done
for peer in "${peer_list[@]}"; do
    [[ $peer =~ ^(lcfs|overlay2|fuse-overlayfs|btrfs)$ ]] || die "unknown peer '$peer'"
done
has_row() { [[ ",$rows," == *",$1,"* ]]; }
has_peer() { [[ ",$peers," == *",$1,"* ]]; }
out=${out:-/var/tmp/lcfs-docker-compare-$(date +%Y%m%d-%H%M%S).tsv}

BTRFS_SIZE=${BTRFS_SIZE:-16G}
# Per-request logging would be measured too.
export RUST_LOG=${RUST_LOG:-warn}
# EPOCHREALTIME uses the locale's decimal point.
export LC_NUMERIC=C
bench_start=$SECONDS

require_root
require_commands dockerd tar python3 jq
has_peer fuse-overlayfs && require_commands fuse-overlayfs
has_peer btrfs && require_commands mkfs.btrfs
e2e_init

# --- helpers ------------------------------------------------------------------

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# Kernel sync, and the lcfs engine's own (syncfs does not reach a FUSE
# daemon): untimed, so one peer's write-back does not land in another's step.
settle() {
    sync
    [[ -z $LCFS_PID ]] || quietly lcfs_ctl sync || die "lcfs sync failed"
}

# seconds_since START: START is an earlier $EPOCHREALTIME.
# stamp_lines START: copies its input, each line after the seconds since START.
stamp_lines() {
    local line
    while IFS= read -r line; do
        printf '%s %s\n' "$(seconds_since "$1")" "$line"
    done
}
seconds_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'; }

record() { # record ROW COUNT ROUND PEER METRIC VALUE
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >>"$out"
}

# record_load ROW COUNT ROUND PEER: the 1-minute load average before a step,
# so a round disturbed by other work on the machine shows in the raw data.
record_load() {
    record "$1" "$2" "$3" "$4" load1 "$(cut -d' ' -f1 /proc/loadavg)"
}

# The sync a peer needs after a step so its data is on the disk.
peer_sync() {
    sync
    [[ $1 != lcfs ]] || quietly lcfs_ctl sync || die "lcfs sync failed"
}

d() { docker_cli "$@"; }

lcfs_alive() {
    kill -0 "$LCFS_PID" 2>/dev/null && return 0
    lcfs_log_tail
    die "the lcfs daemon ($LCFS_PID) died; see the log above"
}

# plugin_mark: the plugin's counters now (lcfs only), for plugin_record.
plugin_mark() {
    lcfs_ctl stats --json | jq -c '.plugin' >"$E2E_WORK/plugin.before"
}

# plugin_record ROW COUNT ROUND PHASE: records the plugin's busy time, summed
# call time, calls, and time and calls per method since plugin_mark.
plugin_record() {
    lcfs_ctl stats --json | jq -c '.plugin' >"$E2E_WORK/plugin.after"
    local metric value
    while IFS=$'\t' read -r metric value; do
        record "$1" "$2" "$3" lcfs "$4_plugin_$metric" "$value"
    done < <(python3 - "$E2E_WORK/plugin.before" "$E2E_WORK/plugin.after" <<'EOF'
import json, sys
before, after = (json.load(open(p)) or {} for p in sys.argv[1:3])
if not after:
    sys.exit("the lcfs daemon reports no plugin section in `lcfs stats --json`")
delta = lambda key: after.get(key, 0) - before.get(key, 0)
print(f"busy_s\t{delta('busy_us') / 1e6:.3f}")
print(f"sum_s\t{delta('total_us') / 1e6:.3f}")
print(f"calls\t{delta('calls')}")
for method, now in after.get("methods", {}).items():
    then = before.get("methods", {}).get(method, {})
    calls = now["calls"] - then.get("calls", 0)
    if calls:
        name = method.split(".")[-1]
        print(f"{name}_s\t{(now['total_us'] - then.get('total_us', 0)) / 1e6:.3f}")
        print(f"{name}_calls\t{calls}")
EOF
    )
}

# --- the rows -------------------------------------------------------------------

# run_launch PEER ROUND COUNT
run_launch() {
    local peer=$1 round=$2 count=$3 index name start launch_s teardown_s running names=()
    for ((index = 1; index <= count; index++)); do
        names+=("bench-$index")
    done
    record_load launch "$count" "$round" "$peer"
    drop_caches
    [[ $peer != lcfs ]] || plugin_mark
    start=$EPOCHREALTIME
    for name in "${names[@]}"; do
        d "$peer" run -d --network none --name "$name" debian:bench sleep infinity >/dev/null ||
            die "$peer: docker run -d ($name) failed"
    done
    launch_s=$(seconds_since "$start")
    [[ $peer != lcfs ]] || plugin_record launch "$count" "$round" launch
    running=$(d "$peer" ps -q | wc -l)
    [[ $running -eq $count ]] || die "$peer: $running containers running, expected $count"
    settle
    [[ $peer != lcfs ]] || plugin_mark
    start=$EPOCHREALTIME
    d "$peer" rm -f "${names[@]}" >/dev/null || die "$peer: docker rm -f failed"
    teardown_s=$(seconds_since "$start")
    [[ $peer != lcfs ]] || plugin_record launch "$count" "$round" teardown
    [[ $(d "$peer" ps -aq | wc -l) -eq 0 ]] || die "$peer: containers left after docker rm -f"
    record launch "$count" "$round" "$peer" launch_s "$launch_s"
    record launch "$count" "$round" "$peer" teardown_s "$teardown_s"
    record launch "$count" "$round" "$peer" total_s "$(awk -v a="$launch_s" -v b="$teardown_s" 'BEGIN { printf "%.3f", a + b }')"
    say "  launch $peer x$count: run -d $launch_s s, rm -f $teardown_s s"
    [[ $peer != lcfs ]] || lcfs_alive
    settle
}

# run_build PEER ROUND
run_build() {
    local peer=$1 round=$2 start build_s sync_s
    record_load build - "$round" "$peer"
    drop_caches
    [[ $peer != lcfs ]] || plugin_mark
    start=$EPOCHREALTIME
    # Each line of the log starts with the seconds since the start, so the
    # time of every step can be read from it.
    DOCKER_BUILDKIT=0 d "$peer" build --no-cache --network none -t built:bench \
        "$E2E_WORK/context" 2>&1 | stamp_lines "$start" >"$E2E_WORK/build-$peer-$round.log" || {
        tail -n 20 "$E2E_WORK/build-$peer-$round.log" >&2
        die "$peer: docker build failed"
    }
    build_s=$(seconds_since "$start")
    peer_sync "$peer"
    sync_s=$(seconds_since "$start")
    [[ $peer != lcfs ]] || plugin_record build - "$round" build
    record build - "$round" "$peer" build_s "$build_s"
    record build - "$round" "$peer" build_sync_s "$sync_s"
    say "  build $peer: $build_s s ($sync_s s with the sync after it)"
    if [[ $round -eq 1 ]]; then
        # The result is right (untimed, first round only: it reads the big file).
        d "$peer" run --rm --network none built:bench sh -c \
            'cd / && sha256sum -c --quiet /app/big.sha256 && test -f /app/tree/d3/f7 && test ! -e /usr/share/doc && grep -q "^app:" /etc/passwd' ||
            die "$peer: the built image is not what the Dockerfile makes"
    fi
    quietly d "$peer" rmi built:bench || die "$peer: docker rmi built:bench failed"
    [[ $peer != lcfs ]] || lcfs_alive
    settle
}

# run_load PEER ROUND
run_load() {
    local peer=$1 round=$2 start load_s sync_s
    record_load load - "$round" "$peer"
    drop_caches
    [[ $peer != lcfs ]] || plugin_mark
    start=$EPOCHREALTIME
    quietly d "$peer" load -i "$E2E_SCRATCH/load.tar" || die "$peer: docker load failed"
    load_s=$(seconds_since "$start")
    peer_sync "$peer"
    sync_s=$(seconds_since "$start")
    [[ $peer != lcfs ]] || plugin_record load - "$round" load
    record load - "$round" "$peer" load_s "$load_s"
    record load - "$round" "$peer" load_sync_s "$sync_s"
    say "  load $peer: $load_s s ($sync_s s with the sync after it)"
    if [[ $round -eq 1 ]]; then
        [[ $(d "$peer" run --rm --network none load:bench cat /etc/lcfs-bench-load) == loaded ]] ||
            die "$peer: the loaded image does not run"
    fi
    quietly d "$peer" rmi load:bench || die "$peer: docker rmi load:bench failed"
    [[ $peer != lcfs ]] || lcfs_alive
    settle
}

# --- set-up ---------------------------------------------------------------------

: >"$out"
say "results: $out (summary: $out.md, launch chart data: $out.chart.tsv)"
ensure_rootfs_tarball
commit=$(git -C "$E2E_REPO" rev-parse --short HEAD)
dirty=$(git -C "$E2E_REPO" status --porcelain -- engine fsfront daemon dockerplugin Cargo.lock | wc -l)
if has_peer lcfs; then
    lcfs_build
    # A private copy: a rebuild of target/release/lcfs during the run must not
    # change what is measured.
    cp "$LCFS_BIN" "$E2E_WORK/lcfs-bin"
    LCFS_BIN="$E2E_WORK/lcfs-bin"
    say "lcfs at commit $commit ($dirty changed files under engine/ fsfront/ daemon/ dockerplugin/)"
fi

setup_start=$SECONDS
for peer in "${peer_list[@]}"; do
    case $peer in
        lcfs)
            lcfs_mkfs
            lcfs_plugin_name
            lcfs_start
            dockerd_start lcfs "$LCFS_PLUGIN"
            ;;
        overlay2) dockerd_start overlay2 overlay2 ;;
        fuse-overlayfs) dockerd_start fuse-overlayfs fuse-overlayfs ;;
        btrfs)
            # The data root is a btrfs of its own, in a sparse image file on
            # the scratch ext4 (like the lcfs device file).
            truncate -s "$BTRFS_SIZE" "$E2E_SCRATCH/btrfs.img"
            loop=$(losetup --find --show "$E2E_SCRATCH/btrfs.img") || die "losetup of btrfs.img failed"
            E2E_LOOPS+=("$loop")
            quietly mkfs.btrfs -q -f "$loop" || die "mkfs.btrfs on $loop failed"
            mkdir -p "$E2E_SCRATCH/docker-btrfs"
            mount -t btrfs "$loop" "$E2E_SCRATCH/docker-btrfs" || die "mounting btrfs on $loop failed"
            E2E_MOUNTS+=("$E2E_SCRATCH/docker-btrfs")
            dockerd_start btrfs btrfs
            ;;
    esac
    driver=$(d "$peer" info --format '{{.Driver}}')
    case $peer in
        lcfs) [[ $driver == "$LCFS_PLUGIN" ]] ;;
        *) [[ $driver == "$peer" ]] ;;
    esac || die "dockerd $peer uses storage driver '$driver'"
    start=$SECONDS
    quietly d "$peer" import -c 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' "$DEBIAN_TARBALL" debian:bench ||
        die "$peer: docker import of the Debian rootfs failed"
    [[ $(d "$peer" run --rm --network none debian:bench cat /etc/debian_version) == 12* ]] ||
        die "$peer: the Debian image does not run"
    say "dockerd $peer ($driver): Debian rootfs imported in $((SECONDS - start)) s"
done

if has_row load; then
    # The image to load: the rootfs plus one file, imported into the first
    # peer and saved, then removed there. Its layer differs from
    # debian:bench's, so no dockerd has it before a load.
    cp "$DEBIAN_TARBALL" "$E2E_SCRATCH/load-rootfs.tar"
    mkdir -p "$E2E_WORK/load-extra/etc"
    echo loaded >"$E2E_WORK/load-extra/etc/lcfs-bench-load"
    tar --numeric-owner --format=posix -C "$E2E_WORK/load-extra" -rf "$E2E_SCRATCH/load-rootfs.tar" ./etc/lcfs-bench-load
    first=${peer_list[0]}
    quietly d "$first" import -c 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' "$E2E_SCRATCH/load-rootfs.tar" load:bench ||
        die "$first: importing the load image failed"
    d "$first" save -o "$E2E_SCRATCH/load.tar" load:bench || die "$first: docker save failed"
    quietly d "$first" rmi load:bench
    rm -f "$E2E_SCRATCH/load-rootfs.tar"
    say "load image: $(du -m "$E2E_SCRATCH/load.tar" | cut -f1) MiB (docker save of one layer)"
fi

if has_row build; then
    # The build context: a Dockerfile and a small tree for COPY.
    context="$E2E_WORK/context"
    for dir_index in 1 2 3 4 5; do
        mkdir -p "$context/tree/d$dir_index"
        for file_index in $(seq 1 40); do
            head -c 2048 /dev/urandom >"$context/tree/d$dir_index/f$file_index"
        done
    done
    cat >"$context/Dockerfile" <<EOF
FROM debian:bench
ENV LANG=C.UTF-8
RUN mkdir -p /app/data && for i in \$(seq 1 500); do echo "line \$i" > /app/data/file-\$i; done
COPY tree /app/tree
RUN head -c ${build_mib}M /dev/urandom > /app/big && sha256sum /app/big > /app/big.sha256
RUN cd / && sha256sum -c --quiet /app/big.sha256 && rm -rf /usr/share/doc /usr/share/man
RUN echo 'app:x:1000:1000::/app:/bin/sh' >> /etc/passwd && chown -R 1000:1000 /app/data
WORKDIR /app
CMD ["sh"]
EOF
fi
settle
say "set-up done in $((SECONDS - setup_start)) s"

# --- measurement ----------------------------------------------------------------

# rotated ROUND: the peers in this round's order.
rotated() {
    local round=$1 count=${#peer_list[@]} index
    for ((index = 0; index < count; index++)); do
        echo "${peer_list[$(((round - 1 + index) % count))]}"
    done
}

for ((round = 1; round <= rounds; round++)); do
    round_start=$SECONDS
    for row in "${row_list[@]}"; do
        case $row in
            launch)
                for count in "${count_list[@]}"; do
                    for peer in $(rotated "$round"); do
                        run_launch "$peer" "$round" "$count"
                    done
                done
                ;;
            build)
                for peer in $(rotated "$round"); do
                    run_build "$peer" "$round"
                done
                ;;
            load)
                for peer in $(rotated "$round"); do
                    run_load "$peer" "$round"
                done
                ;;
        esac
    done
    say "round $round/$rounds done in $((SECONDS - round_start)) s"
done

for peer in "${peer_list[@]}"; do
    # Called in a `||` list, so errexit is off inside: lib.sh's dockerd_stop
    # runs `kill -KILL` and `wait` on a dockerd that may have exited and been
    # reaped already, and their failure ended a --quick run here before the
    # summary.
    dockerd_stop "$peer" || true
done
if has_peer lcfs; then
    lcfs_stop
    lcfs_check_log
fi

# --- summary --------------------------------------------------------------------

load=$(cut -d' ' -f1-3 /proc/loadavg)
dockerd_version=$(dockerd --version | cut -d' ' -f3 | tr -d ,)
fuse_version=$(fuse-overlayfs --version 2>/dev/null | awk '/fuse-overlayfs:/ { print $3 }' || true)
{
    echo "Command: \`$command_line\` (rounds $rounds, counts $counts, build step $build_mib MiB)"
    echo "lcfs commit $commit ($dirty changed files under engine/ fsfront/ daemon/ dockerplugin/); dockerd $dockerd_version; fuse-overlayfs ${fuse_version:-?}; $(uname -r); $(fuse_wake_here); $(nproc) vCPU; load average at the end $load; total $((SECONDS - bench_start)) s."
    echo "Busiest processes at the end: $(ps -eo pcpu=,comm= --sort=-pcpu | head -n 6 | awk '{ printf "%s%s %s%%", (NR > 1 ? ", " : ""), $2, $1 }')."
    echo
    python3 - "$out" "$out.chart.tsv" <<'EOF'
import statistics, sys
from collections import defaultdict
out, chart = sys.argv[1], sys.argv[2]
values = defaultdict(list)
for line in open(out):
    row, count, rnd, peer, metric, value = line.rstrip("\n").split("\t")
    values[(row, count, metric, peer)].append(float(value))
order = ("lcfs", "overlay2", "fuse-overlayfs", "btrfs")
peers = [p for p in order if any(k[3] == p for k in values)]
others = [p for p in peers if p != "lcfs"] if "lcfs" in peers else []
counts = sorted({int(k[1]) for k in values if k[0] == "launch"})
def fmt(x):
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"
def med(row, count, metric, peer):
    v = values.get((row, count, metric, peer))
    return statistics.median(v) if v else None
def cell(row, count, metric, peer):
    v = values.get((row, count, metric, peer))
    return f"{fmt(statistics.median(v))} ({fmt(min(v))}-{fmt(max(v))})" if v else "-"

print("Seconds, median (min-max) over the rounds; ratio = lcfs median / peer median.")
print()
print("| row | " + " | ".join(peers) + "".join(f" | lcfs / {p}" for p in others) + " |")
print("|" + "---|" * (1 + len(peers) + len(others)))
lines = []
for n in counts:
    for metric, what in (("launch_s", "run -d"), ("teardown_s", "rm -f"), ("total_s", "run -d + rm -f")):
        lines.append(("launch", str(n), metric, f"{n} containers: {what}"))
lines += [("build", "-", "build_s", "classic build"), ("build", "-", "build_sync_s", "classic build + sync"),
          ("load", "-", "load_s", "docker load"), ("load", "-", "load_sync_s", "docker load + sync")]
for row, count, metric, label in lines:
    if not any((row, count, metric, p) in values for p in peers):
        continue
    m = {p: med(row, count, metric, p) for p in peers}
    ratios = [f"{m['lcfs'] / m[p]:.2f}" if m["lcfs"] is not None and m[p] else "-" for p in others]
    print(f"| {label} | " + " | ".join(cell(row, count, metric, p) for p in peers)
          + "".join(f" | {r}" for r in ratios) + " |")
print()

# The plugin's share of lcfs's time.
plugin_lines = []
for n in counts:
    for phase in ("launch", "teardown"):
        plugin_lines.append(("launch", str(n), phase, f"{n} containers: {'run -d' if phase == 'launch' else 'rm -f'}", f"{phase}_s"))
plugin_lines += [("build", "-", "build", "classic build", "build_s"), ("load", "-", "load", "docker load", "load_s")]
shown = False
for row, count, phase, label, total_metric in plugin_lines:
    busy = med(row, count, f"{phase}_plugin_busy_s", "lcfs")
    if busy is None:
        continue
    if not shown:
        print("Time inside the lcfs plugin's calls (lcfs `stats` section `plugin`), medians: busy = at least one call in hand; "
              "sum = every call's time added (concurrent calls overlap); share = busy / the phase's time.")
        print()
        print("| phase | lcfs time (s) | plugin busy (s) | share | plugin sum (s) | calls | most time by method (s, calls) |")
        print("|---|---|---|---|---|---|---|")
        shown = True
    total = med(row, count, total_metric, "lcfs")
    total_sum = med(row, count, f"{phase}_plugin_sum_s", "lcfs")
    calls = med(row, count, f"{phase}_plugin_calls", "lcfs")
    prefix = f"{phase}_plugin_"
    methods = []
    for (r, c, metric, p), v in values.items():
        if (r, c, p) == (row, count, "lcfs") and metric.startswith(prefix) and metric.endswith("_s") \
                and metric not in (prefix + "busy_s", prefix + "sum_s"):
            name = metric[len(prefix):-2]
            method_calls = med(row, count, f"{prefix}{name}_calls", "lcfs") or 0
            methods.append((statistics.median(v), name, method_calls))
    methods.sort(reverse=True)
    top = ", ".join(f"{name} {fmt(t)} ({c:.0f})" for t, name, c in methods[:4])
    share = f"{100 * busy / total:.{1 if busy < 0.1 * total else 0}f}%" if total else "-"
    print(f"| {label} | {fmt(total)} | {fmt(busy)} | {share} | {fmt(total_sum)} | {calls:.0f} | {top} |")
if shown:
    print()

# The issue's goals.
by_round = defaultdict(dict)
for line in open(out):
    row, count, rnd, peer, metric, value = line.rstrip("\n").split("\t")
    by_round[(row, count, metric, peer)][int(rnd)] = float(value)
def round_ratios(row, count, metric, peer):
    a, b = by_round.get((row, count, metric, "lcfs"), {}), by_round.get((row, count, metric, peer), {})
    return [a[r] / b[r] for r in sorted(a) if r in b and b[r]]
def goal(label, row, count, metric, peer, limit):
    a, b = med(row, count, metric, "lcfs"), med(row, count, metric, peer)
    if a is None or b is None:
        return
    ratio = a / b
    verdict = "met" if ratio <= limit else "**not met**"
    rounds = round_ratios(row, count, metric, peer)
    per_round = ", ".join(f"{r:.2f}" for r in rounds)
    within = sum(r <= limit for r in rounds)
    print(f"| {label} | lcfs <= {limit:g}x {peer} | {ratio:.2f}x | {per_round} (median {statistics.median(rounds):.2f}; "
          f"{within} of {len(rounds)} rounds within) | {verdict} |")
print("Goals: the verdict is on the ratio of the medians; the ratios within each round (same round, minutes apart) "
      "show how far the noise reaches.")
print()
print("| goal | target | median / median | per round, in round order | verdict |")
print("|---|---|---|---|---|")
if counts:
    n = str(100 if 100 in counts else counts[-1])
    goal(f"launch + tear down {n} containers", "launch", n, "total_s", "overlay2", 0.9)
    goal(f"launch + tear down {n} containers", "launch", n, "total_s", "fuse-overlayfs", 1.0)
goal("classic build", "build", "-", "build_s", "overlay2", 0.5)
goal("classic build + sync", "build", "-", "build_sync_s", "overlay2", 0.5)
goal("docker load", "load", "-", "load_s", "overlay2", 0.8)
goal("docker load + sync", "load", "-", "load_sync_s", "overlay2", 0.8)

loads = defaultdict(list)
for (row, count, metric, peer), per in by_round.items():
    if metric == "load1":
        for rnd, v in per.items():
            loads[rnd].append(v)
if loads:
    print()
    print("1-minute load average before each step, per round (min-max): "
          + "; ".join(f"round {r} {min(v):.1f}-{max(v):.1f}" for r, v in sorted(loads.items())) + ".")

# One row per driver per count, for a chart.
with open(chart, "w") as f:
    f.write("driver\tcount\trounds\tlaunch_s\tlaunch_min_s\tlaunch_max_s\tteardown_s\tteardown_min_s\tteardown_max_s"
            "\ttotal_s\ttotal_min_s\ttotal_max_s\tplugin_busy_s\n")
    for p in peers:
        for n in counts:
            cols = [p, str(n)]
            v = values.get(("launch", str(n), "total_s", p), [])
            if not v:
                continue
            cols.append(str(len(v)))
            for metric in ("launch_s", "teardown_s", "total_s"):
                v = values[("launch", str(n), metric, p)]
                cols += [f"{statistics.median(v):.3f}", f"{min(v):.3f}", f"{max(v):.3f}"]
            busy = [a + b for a, b in zip(values.get(("launch", str(n), "launch_plugin_busy_s", p), []),
                                          values.get(("launch", str(n), "teardown_plugin_busy_s", p), []))]
            cols.append(f"{statistics.median(busy):.3f}" if busy else "")
            f.write("\t".join(cols) + "\n")
EOF
} >"$out.md"
cat "$out.md"
e2e_finish "measured $rounds rounds in $((SECONDS - bench_start)) s; summary in $out.md"
