#!/usr/bin/env bash
# FUSE-level benchmark: lcfs beside kernel overlayfs and fuse-overlayfs, on
# the same backing disk, in the same run, interleaved in rounds.
#
#   sudo bash bench/fuse-compare.sh            # full run: 5 rounds, ~10 min
#   sudo bash bench/fuse-compare.sh --quick    # 2 rounds, smaller files, < 5 min
#   sudo bash bench/fuse-compare.sh --rows memory   # rerun only the memory row
#
# The backing disk is one fresh ext4 in a sparse loop image under /var/tmp
# (scripts/e2e/lib.sh; never /tmp, which may be a journal-less or tmpfs mount unlike a host's disk). It holds the lcfs
# device file, kernel overlayfs's lower/upper/work directories and
# fuse-overlayfs's. Each peer's lower layer (for lcfs: an image layer, made
# with `layer create --cold` and committed) holds the Debian bookworm minbase
# rootfs (the tarball scripts/e2e/clone-semantics.sh caches under
# /var/cache/lcfs-test/, built here the same way when missing) plus two files
# of random bytes: bench/seq.bin (row 2) and bench/mem.bin (row 3). Every
# measurement runs in the merged view of a fresh container on top: a kernel
# overlayfs mount, a fuse-overlayfs mount (its own daemon), or an lcfs clone
# of the image layer.
#
# Rows (docs/benchmarks.md section 3 says exactly what each one times):
#   1. metadata: untar the rootfs into <container>/untar; find over the whole
#      container (cold, then warm); lstat of every path (cold, then warm);
#      rm -rf <container>/untar.
#   2. sequential read of bench/seq.bin with dd bs=1M: cold, cached (a second
#      read), and, as an extra, cached while another descriptor holds the
#      file open.
#   randrw (extra row): fio in the merged view, buffered psync: a sequential
#      1 MiB write of a --randrw-mib file (+ fsync), then 4 KiB random reads
#      (cold) and 4 KiB random writes (+ fsync) over it, 5 s each (2 s in --quick).
#   3. memory: one container reading bench/mem.bin, then N containers one
#      after another, then N at once (and an idle control): growth of
#      /proc/meminfo Cached plus the daemons' VmRSS, after the readers finish
#      and at the peak; and the same growth counted exactly, as the page
#      cache of the files involved (cachestat) plus VmRSS, which other work
#      on the machine cannot disturb.
# In every round each peer runs once; the order rotates (A B C, B C A, C A B)
# so drift and any leftover background work hit every peer alike. Caches are
# synced and dropped before every cold step. A warm step during which another
# process dropped the page cache (/proc/vmstat drop_pagecache moved) is
# measured again, at most 3 times.
#
# Prints a Markdown summary (median, min-max, lcfs/peer ratios, goals) and
# keeps every raw measurement in a TSV file (--out). Needs root; installs
# fuse-overlayfs with apt when it is missing.
E2E_NAME=fuse-compare
# The lcfs device and both overlay lowers each hold the rootfs (~210 MB), both
# data files and the rounds' untarred copies: sized with room to spare.
# Set before lib.sh, which gives unset sizes its own, smaller defaults.
: "${E2E_SCRATCH_SIZE:=32G}"
: "${LCFS_DEVICE_SIZE:=12G}"
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/e2e/lib.sh"

usage() {
    cat <<'EOF'
usage: bench/fuse-compare.sh [--quick] [--rounds N] [--rows LIST] [--peers LIST]
                             [--seq-mib N] [--mem-mib N] [--randrw-mib N] [--readers N]
                             [--out FILE]

  --quick        2 rounds, bench/seq.bin 512 MiB, bench/mem.bin 64 MiB, randrw
                 64 MiB and 2 s per random job (< 5 min)
  --rounds N     rounds per row (default 5); the summary shows their median
  --rows LIST    comma-separated subset of metadata,seqread,randrw,memory
                 (default all)
  --peers LIST   comma-separated subset of lcfs,overlay,fuse-overlayfs (default all),
                 and lcfs-nostats: the same lcfs daemon with statistics counting
                 off while it is measured (`lcfs statistics off`), to measure
                 what counting costs; lcfs-again: the same daemon measured
                 again as it is (an A/A control: the spread of two equal peers);
                 lcfs-verified: the same daemon with verified reads of the
                 image layer on while it is measured (docs/integrity.md)
  --seq-mib N    size of the sequential-read file (default 1024)
  --mem-mib N    size of the file the memory row's readers share (default 256)
  --randrw-mib N size of the file the randrw row writes and reads (default 256)
  --readers N    containers in the memory row (default 20)
  --out FILE     raw results (TSV) and the summary (FILE.md)
                 (default /var/tmp/lcfs-fuse-compare-<time>.tsv)
Environment: LCFS_BIN (a built lcfs instead of target/release/lcfs; an
older build without statistics, verified reads or seals runs without them),
E2E_KEEP=1 (keep the work directory), RUST_LOG (daemon log level, default warn).
EOF
}

command_line="bench/fuse-compare.sh${*:+ $*}"
rounds=5
rows=metadata,seqread,randrw,memory
peers=lcfs,overlay,fuse-overlayfs
seq_mib=1024
mem_mib=256
randrw_mib=256
randrw_seconds=5
readers=20
out=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick)
            rounds=2
            seq_mib=512
            mem_mib=64
            randrw_mib=64
            randrw_seconds=2
            ;;
        --rounds) rounds=$2; shift ;;
        --rows) rows=$2; shift ;;
        --peers) peers=$2; shift ;;
        --seq-mib) seq_mib=$2; shift ;;
        --mem-mib) mem_mib=$2; shift ;;
        --randrw-mib) randrw_mib=$2; shift ;;
        --readers) readers=$2; shift ;;
        --out) out=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done
for number in "$rounds" "$seq_mib" "$mem_mib" "$randrw_mib" "$readers"; do
    [[ $number =~ ^[1-9][0-9]*$ ]] || die "'$number' is not a positive integer"
done
IFS=, read -r -a row_list <<<"$rows"
IFS=, read -r -a peer_list <<<"$peers"
for row in "${row_list[@]}"; do
    [[ $row =~ ^(metadata|seqread|randrw|memory)$ ]] || die "unknown row '$row'"
done
for peer in "${peer_list[@]}"; do
    [[ $peer =~ ^(lcfs|lcfs-nostats|lcfs-again|lcfs-verified|overlay|fuse-overlayfs)$ ]] || die "unknown peer '$peer'"
done
has_row() { [[ ",$rows," == *",$1,"* ]]; }
has_peer() { [[ ",$peers," == *",$1,"* ]]; }
# built_has COMMAND...: the lcfs binary measured has this command. An
# older build given with LCFS_BIN (one measured against today's) may
# predate statistics, verified reads and seals; it runs without them.
built_has() { "$LCFS_BIN" "$@" --help >/dev/null 2>&1; }

# is_lcfs PEER: lcfs, with statistics on or off.
is_lcfs() { [[ $1 == lcfs || $1 == lcfs-nostats || $1 == lcfs-again || $1 == lcfs-verified ]]; }
out=${out:-/var/tmp/lcfs-fuse-compare-$(date +%Y%m%d-%H%M%S).tsv}

tarball=$DEBIAN_TARBALL
# The same options as scripts/e2e/clone-semantics.sh: posix format keeps
# nanosecond mtimes and xattrs; '*' extracts every xattr namespace.
tar_options=(--numeric-owner --xattrs --xattrs-include='*' --format=posix)
# Per-request logging would be measured too.
export RUST_LOG=${RUST_LOG:-warn}
given_bin=${LCFS_BIN:-}
bench_start=$SECONDS

require_root
if ! command -v fuse-overlayfs >/dev/null 2>&1 && has_peer fuse-overlayfs; then
    say "installing fuse-overlayfs (apt)"
    DEBIAN_FRONTEND=noninteractive quietly apt-get -q -y -o DPkg::Lock::Timeout=300 \
        install --no-install-recommends fuse-overlayfs ||
        die "could not install fuse-overlayfs"
fi
require_commands debootstrap tar dd python3 jq fusermount3
has_row randrw && require_commands fio
has_peer fuse-overlayfs && require_commands fuse-overlayfs
e2e_init

# --- our own resources (lib.sh's trap runs after ours) ----------------------

# Mounts and fuse-overlayfs daemons made per container; released before the
# scratch file system under them.
declare -A container_path=() container_pid=()
bench_mounts=()
sampler_pid=""
# shellcheck disable=SC2317 # called from the EXIT trap
bench_cleanup() {
    local index pid
    set +e
    for ((index = ${#bench_mounts[@]} - 1; index >= 0; index--)); do
        grep -qF " ${bench_mounts[$index]} " /proc/self/mounts &&
            umount -l "${bench_mounts[$index]}" 2>/dev/null
    done
    for pid in "${container_pid[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    [[ -z ${sampler_pid:-} ]] || kill -TERM "$sampler_pid" 2>/dev/null
}
# lib.sh's e2e_cleanup reads the exit status from $?, so it is restored for it.
# shellcheck disable=SC2154 # exit_status is assigned inside the trap string
trap 'exit_status=$?; bench_cleanup; (exit "$exit_status"); e2e_cleanup' EXIT

# --- helpers ------------------------------------------------------------------

# ensure_rootfs_tarball (scripts/e2e/lib.sh) builds $DEBIAN_TARBALL when it
# is missing.

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# Kernel sync, and the lcfs engine's own (syncfs does not reach a FUSE
# daemon): untimed, so one peer's write-back does not land in the next step.
settle() {
    sync
    [[ -z $LCFS_PID ]] || quietly lcfs_ctl sync || die "lcfs sync failed"
}

now_ns() { date +%s%N; }
# seconds_since START_NS
seconds_since() { python3 -c "import sys; print(f'{(int(sys.argv[2]) - int(sys.argv[1])) / 1e9:.4f}')" "$1" "$(now_ns)"; }

record() { # record ROW ROUND PEER METRIC VALUE
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$out"
}

meminfo_kib() { awk -v key="$1:" '$1 == key { print $2 }' /proc/meminfo; }
# rss_kib PID...: the sum of VmRSS of the given processes.
rss_kib() {
    local pid total=0 value
    for pid in "$@"; do
        value=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
        total=$((total + ${value:-0}))
    done
    echo "$total"
}

lcfs_alive() {
    kill -0 "$LCFS_PID" 2>/dev/null && return 0
    lcfs_log_tail
    die "the lcfs daemon ($LCFS_PID) died; see the log above"
}

# container_up PEER NAME: a fresh container on the peer's image; its merged
# view is ${container_path[NAME]}.
container_up() {
    local peer=$1 name=$2 dir mnt
    case $peer in
        lcfs | lcfs-nostats | lcfs-again | lcfs-verified)
            # The switch is the daemon's: set for the peer about to be measured.
            if built_has statistics; then
                quietly lcfs_ctl statistics "$([[ $peer == lcfs-nostats ]] && echo off || echo on)" ||
                    die "lcfs statistics failed"
            elif [[ $peer == lcfs-nostats ]]; then
                die "$LCFS_BIN has no statistics to turn off"
            fi
            if built_has layer verify-reads; then
                quietly lcfs_ctl layer verify-reads image "$([[ $peer == lcfs-verified ]] && echo on || echo off)" ||
                    die "lcfs layer verify-reads failed"
            elif [[ $peer == lcfs-verified ]]; then
                die "$LCFS_BIN has no verified reads"
            fi
            quietly lcfs_ctl layer clone image "$name" || die "lcfs layer clone image $name failed"
            container_path[$name]="$LCFS_MOUNT/$name"
            ;;
        overlay | fuse-overlayfs)
            dir="$E2E_SCRATCH/$peer/containers/$name"
            mnt="$E2E_WORK/c/$peer-$name"
            mkdir -p "$dir/upper" "$dir/work" "$mnt"
            bench_mounts+=("$mnt")
            local options="lowerdir=$E2E_SCRATCH/$peer/lower,upperdir=$dir/upper,workdir=$dir/work"
            if [[ $peer == overlay ]]; then
                mount -t overlay overlay -o "$options" "$mnt" || die "mounting overlayfs $mnt failed"
            else
                fuse-overlayfs -f -o "$options" "$mnt" 2>>"$E2E_WORK/fuse-overlayfs.log" &
                container_pid[$name]=$!
                local waited=0
                until grep -qF " $mnt fuse.fuse-overlayfs " /proc/self/mounts; do
                    kill -0 "${container_pid[$name]}" 2>/dev/null || die "fuse-overlayfs for $mnt exited"
                    waited=$((waited + 1))
                    [[ $waited -lt 300 ]] || die "fuse-overlayfs did not mount $mnt within 30 s"
                    sleep 0.1
                done
            fi
            container_path[$name]="$mnt"
            ;;
    esac
}

container_down() {
    local peer=$1 name=$2 mnt=${container_path[$2]}
    case $peer in
        lcfs | lcfs-nostats | lcfs-again | lcfs-verified) quietly lcfs_ctl layer rm "$name" || die "lcfs layer rm $name failed" ;;
        overlay)
            umount "$mnt" || die "umount $mnt failed"
            rm -rf "$E2E_SCRATCH/$peer/containers/$name"
            ;;
        fuse-overlayfs)
            fusermount3 -u "$mnt" || die "fusermount3 -u $mnt failed"
            wait "${container_pid[$name]}" 2>/dev/null || true
            unset "container_pid[$name]"
            rm -rf "$E2E_SCRATCH/$peer/containers/$name"
            ;;
    esac
    unset "container_path[$name]"
}

# The lcfs engine's block cache hits and misses so far.
block_cache_counters() {
    lcfs_ctl stats --json | jq -r '"\(.block_cache.hits) \(.block_cache.misses)"'
}

# The lstat walk of row 1: lstat of every path find listed (NUL-separated),
# no readdir. Prints its own time and a signature of the tree (entries per
# type, bytes in regular files and symlinks) that must agree across peers.
cat >"$E2E_WORK/lstat.py" <<'EOF'
import os, stat, sys, time
paths = open(sys.argv[1], "rb").read().split(b"\0")[:-1]
kinds = {}
size = 0
start = time.perf_counter()
for path in paths:
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    kinds[kind] = kinds.get(kind, 0) + 1
    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        size += st.st_size
elapsed = time.perf_counter() - start
names = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c",
         stat.S_IFBLK: "b", stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}
signature = " ".join(f"{names.get(k, k)}={v}" for k, v in sorted(kinds.items(), key=lambda kv: names.get(kv[0], "?")))
print(f"{elapsed:.4f}\t{len(paths)} entries {signature} bytes={size}")
EOF

# The memory row's sampler: the largest Cached + VmRSS(pids) seen, every
# 100 ms, printed (KiB) when it gets SIGTERM.
cat >"$E2E_WORK/sampler.py" <<'EOF'
import signal, sys, time
pids = sys.argv[1:]
peak = 0
def sample():
    global peak
    total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                total += int(line.split()[1])
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    peak = max(peak, total)
def done(*_):
    sample()
    print(peak, flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
while True:
    sample()
    time.sleep(0.1)
EOF

# pagecache.py FILE...: bytes of the given files in the page cache (each
# file's own mapping): cachestat(2) (Linux 6.5+), else mmap + mincore. On an
# lcfs or fuse-overlayfs path that is the FUSE inode's pages; on a file of
# the backing ext4 the ext4 pages. Opening a file here never keeps it open,
# so a drop-on-last-close policy still sees the readers' last close.
# pagecache.py --evict FILE...: drops those files' clean pages
# (POSIX_FADV_DONTNEED), and nobody else's.
cat >"$E2E_WORK/pagecache.py" <<'EOF'
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
class Range(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint64)]
class CacheStat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]
SYS_cachestat = 451  # x86_64 and every other architecture (unified number)
page = mmap.PAGESIZE
def resident(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        stat = CacheStat()
        if libc.syscall(SYS_cachestat, fd, ctypes.byref(Range(0, 0)), ctypes.byref(stat), 0) == 0:
            return stat.cache * page
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap " + path)
        try:
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore " + path)
            return sum(v & 1 for v in vec) * page
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
if sys.argv[1] == "--evict":
    for path in sys.argv[2:]:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
else:
    print(sum(resident(p) for p in sys.argv[1:]))
EOF

# --- rows ---------------------------------------------------------------------

signatures="$E2E_WORK/signatures.tsv"

# How often the kernel's page cache was dropped (echo 1 or 3 >
# drop_caches) since boot. Other work on the machine does it too (the e2e
# checks do); a warm measurement it lands in is taken again.
page_cache_drops() { awk '$1 == "drop_pagecache" { print $2 }' /proc/vmstat; }
disturbed=0

# undisturbed ROW ROUND PEER METRIC STEP ARGS...: runs STEP (a warm, timed
# step that sets step_value) until no page-cache drop happened while it ran,
# at most 3 times, and records the value. On a retry STEP gets "again" as
# its first argument (else "first") and warms the caches up first. The first
# attempt's window opens at $window_start (the drop count taken before the
# step that warmed the caches), so a drop during the warm-up counts too.
window_start=""
undisturbed() {
    local row=$1 round=$2 peer=$3 metric=$4 step=$5 attempt before
    shift 5
    for attempt in 1 2 3; do
        before=$(page_cache_drops)
        [[ $attempt != 1 || -z $window_start ]] || before=$window_start
        "$step" "$([[ $attempt == 1 ]] && echo first || echo again)" "$@"
        [[ $(page_cache_drops) != "$before" ]] || break
        disturbed=$((disturbed + 1))
        say "  $peer $metric: another process dropped the page cache meanwhile; measuring again"
    done
    window_start=""
    record "$row" "$round" "$peer" "$metric" "$step_value"
}

# shellcheck disable=SC2317 # called through undisturbed
step_find() { # MODE DIR
    [[ $1 == first ]] || find "$2" -xdev -print0 >/dev/null
    local start
    start=$(now_ns)
    find "$2" -xdev -print0 >/dev/null || die "find over $2 failed"
    step_value=$(seconds_since "$start")
}

# shellcheck disable=SC2317 # called through undisturbed
step_lstat() { # MODE
    local output
    [[ $1 == first ]] || python3 "$E2E_WORK/lstat.py" "$E2E_WORK/paths" >/dev/null
    output=$(python3 "$E2E_WORK/lstat.py" "$E2E_WORK/paths") || die "lstat walk failed"
    step_value=${output%%$'\t'*}
}

step_read() { # MODE FILE
    [[ $1 == first ]] || dd if="$2" of=/dev/null bs=1M status=none
    local start
    start=$(now_ns)
    dd if="$2" of=/dev/null bs=1M status=none || die "reading $2 failed"
    step_value=$(python3 -c "import sys; print(f'{$seq_mib / float(sys.argv[1]):.1f}')" "$(seconds_since "$start")")
}

# Row 1 and row 2 for one peer in one round, in one fresh container.
run_files() {
    local peer=$1 round=$2 name="r$2" c start output
    container_up "$peer" "$name"
    c=${container_path[$name]}
    if has_row metadata; then
        mkdir "$c/untar"
        drop_caches
        start=$(now_ns)
        tar "${tar_options[@]}" -p -C "$c/untar" -xf "$E2E_WORK/tarball/rootfs.tar" ||
            die "$peer: untar into $c/untar failed"
        record metadata "$round" "$peer" untar_s "$(seconds_since "$start")"
        settle

        drop_caches
        window_start=$(page_cache_drops)
        start=$(now_ns)
        find "$c" -xdev -print0 >"$E2E_WORK/paths" || die "$peer: find over $c failed"
        record metadata "$round" "$peer" find_cold_s "$(seconds_since "$start")"
        undisturbed metadata "$round" "$peer" find_warm_s step_find "$c"

        drop_caches
        window_start=$(page_cache_drops)
        output=$(python3 "$E2E_WORK/lstat.py" "$E2E_WORK/paths") || die "$peer: lstat walk over $c failed"
        record metadata "$round" "$peer" stat_cold_s "${output%%$'\t'*}"
        printf '%s\t%s\t%s\n' "$round" "$peer" "${output#*$'\t'}" >>"$signatures"
        undisturbed metadata "$round" "$peer" stat_warm_s step_lstat

        start=$(now_ns)
        rm -rf "$c/untar" || die "$peer: rm -rf $c/untar failed"
        record metadata "$round" "$peer" rm_s "$(seconds_since "$start")"
        [[ ! -e $c/untar ]] || die "$peer: $c/untar still exists after rm -rf"
        settle
    fi
    if has_row seqread; then
        local file="$c/bench/seq.bin" hits_before misses_before holder
        drop_caches
        window_start=$(page_cache_drops)
        ! is_lcfs "$peer" || read -r hits_before misses_before < <(block_cache_counters)
        step_read first "$file"
        record seqread "$round" "$peer" seq_cold_mibs "$step_value"
        if is_lcfs "$peer"; then
            local hits misses
            read -r hits misses < <(block_cache_counters)
            record seqread "$round" "$peer" cold_block_cache_hits $((hits - hits_before))
            record seqread "$round" "$peer" cold_block_cache_misses $((misses - misses_before))
        fi
        undisturbed seqread "$round" "$peer" seq_cached_mibs step_read "$file"
        # Not a row of the issue: the same cached read while another
        # descriptor keeps the file open, so no last close happens between
        # the reads (what a policy that drops pages on last close costs).
        exec {holder}<"$file"
        window_start=$(page_cache_drops)
        dd if="$file" of=/dev/null bs=1M status=none || die "$peer: reading $file failed"
        undisturbed seqread "$round" "$peer" seq_held_mibs step_read "$file"
        exec {holder}<&-
    fi
    if has_row randrw; then
        run_randrw "$peer" "$round" "$c/randrw.bin"
    fi
    ! is_lcfs "$peer" || lcfs_alive
    container_down "$peer" "$name"
    settle
}

# fio_mibs ARGS...: one buffered psync fio job; prints its bandwidth in MiB/s.
fio_mibs() {
    local json
    json=$(fio --name=randrw --ioengine=psync --direct=0 --output-format=json "$@") ||
        die "fio $* failed"
    jq -r '.jobs[0] | (.read.bw_bytes + .write.bw_bytes) / 1048576 | . * 10 | round / 10' <<<"$json"
}

# The randrw row for one peer in one round: FILE is in its container.
run_randrw() {
    local peer=$1 round=$2 file=$3
    drop_caches
    record randrw "$round" "$peer" seqwrite_mibs \
        "$(fio_mibs --filename="$file" --rw=write --bs=1m --size="${randrw_mib}M" --end_fsync=1)"
    drop_caches
    record randrw "$round" "$peer" randread_mibs \
        "$(fio_mibs --filename="$file" --rw=randread --bs=4k --size="${randrw_mib}M" \
            --time_based --runtime="$randrw_seconds")"
    drop_caches
    record randrw "$round" "$peer" randwrite_mibs \
        "$(fio_mibs --filename="$file" --rw=randwrite --bs=4k --size="${randrw_mib}M" \
            --time_based --runtime="$randrw_seconds" --end_fsync=1)"
    rm -f "$file"
    settle
}

# page_cache_files PEER NAME...: every file whose page cache holds
# bench/mem.bin for these containers. lcfs: each clone's FUSE inode, the
# device file (read with O_DIRECT, so it should stay at 0) and, with
# LCFS_DAEMON_ARGS=--passthrough, the image's copy in the copies mount
# (`<layer id>-<inode>`, the inode being the low 40 bits of the node id). Kernel overlayfs
# keeps no pages of its own: the lower ext4 file. fuse-overlayfs: each mount's
# FUSE inode, and the lower ext4 file its daemons read.
page_cache_files() {
    local peer=$1 name
    shift
    case $peer in
        lcfs | lcfs-nostats | lcfs-again | lcfs-verified)
            echo "$LCFS_DEVICE"
            local node id
            if lcfs_passthrough; then
                node=$(stat -c %i "$LCFS_MOUNT/image/bench/mem.bin")
                id=$(lcfs_ctl layer ls --json | jq -er '.[] | select(.name == "image") | .id') ||
                    die "lcfs layer ls: no id for layer image"
                echo "$(lcfs_copies_path)/$id-$((node & ((1 << 40) - 1)))"
            fi
            ;;
        *) echo "$E2E_SCRATCH/$peer/lower/bench/mem.bin" ;;
    esac
    [[ $peer == overlay ]] && return
    for name in "$@"; do
        echo "${container_path[$name]}/bench/mem.bin"
    done
}

# Row 3 for one peer, one mode (single, sequential, parallel; idle is the
# control: one container, nobody reads), one round.
# The lcfs daemon is restarted first so its block cache starts empty and its
# RSS from the same point each time, as each fuse-overlayfs daemon does.
# Taken again (at most 3 times) when another process dropped the page cache
# during the measurement.
run_memory() {
    local attempt
    for attempt in 1 2 3; do
        measure_memory "$@" "$([[ $attempt == 3 ]] && echo last || echo try)" && return 0
        disturbed=$((disturbed + 1))
        say "  memory $3 $1: another process dropped the page cache meanwhile; measuring again"
    done
}

# measure_memory PEER ROUND MODE try|last: returns 1, recording nothing, when
# the page cache was dropped by someone else during a "try".
measure_memory() {
    local peer=$1 round=$2 mode=$3 attempt=$4 count index name pids=() names=() files=()
    count=$([[ $mode == single || $mode == idle ]] && echo 1 || echo "$readers")
    if is_lcfs "$peer"; then
        lcfs_stop
        lcfs_start
    fi
    for ((index = 0; index < count; index++)); do
        name="m$round-$index"
        container_up "$peer" "$name"
        names+=("$name")
        [[ $peer != fuse-overlayfs ]] || pids+=("${container_pid[$name]}")
    done
    ! is_lcfs "$peer" || pids=("$LCFS_PID")
    mapfile -t files < <(page_cache_files "$peer" "${names[@]}")
    # Only the measured files are evicted: drop_caches would make every other
    # process on the machine refill its caches during the measurement, which
    # shows up as Cached growth (hundreds of MiB in a few seconds here).
    sync
    local drops_before
    drops_before=$(page_cache_drops)
    python3 "$E2E_WORK/pagecache.py" --evict "${files[@]}"
    sleep 1
    local cached_before rss_before files_before
    files_before=$(python3 "$E2E_WORK/pagecache.py" "${files[@]}")
    cached_before=$(meminfo_kib Cached)
    rss_before=$(rss_kib "${pids[@]}")
    local hits_before misses_before
    ! is_lcfs "$peer" || read -r hits_before misses_before < <(block_cache_counters)
    python3 "$E2E_WORK/sampler.py" "${pids[@]}" >"$E2E_WORK/peak" &
    sampler_pid=$!
    local start
    start=$(now_ns)
    if [[ $mode == idle ]]; then
        # The control: no reader, about as long as a sequential lcfs run.
        sleep 3
    elif [[ $mode == parallel ]]; then
        local reader_pids=()
        for name in "${names[@]}"; do
            dd if="${container_path[$name]}/bench/mem.bin" of=/dev/null bs=1M status=none &
            reader_pids+=($!)
        done
        for index in "${reader_pids[@]}"; do
            wait "$index" || die "$peer: a parallel reader of bench/mem.bin failed"
        done
    else
        for name in "${names[@]}"; do
            dd if="${container_path[$name]}/bench/mem.bin" of=/dev/null bs=1M status=none ||
                die "$peer: reading ${container_path[$name]}/bench/mem.bin failed"
        done
    fi
    local read_s
    read_s=$(seconds_since "$start")
    # What stays once the readers have closed their files (a policy may drop
    # pages on last close, asynchronously: give it a second).
    sleep 1
    local cached_after rss_after files_after peak
    cached_after=$(meminfo_kib Cached)
    rss_after=$(rss_kib "${pids[@]}")
    kill -TERM "$sampler_pid"
    wait "$sampler_pid" || true
    sampler_pid=""
    files_after=$(python3 "$E2E_WORK/pagecache.py" "${files[@]}")
    peak=$(<"$E2E_WORK/peak")
    if [[ $(page_cache_drops) != "$drops_before" ]]; then
        if [[ $attempt != last ]]; then
            for name in "${names[@]}"; do
                container_down "$peer" "$name"
            done
            return 1
        fi
        record memory "$round" "$peer" "${mode}_disturbed" 1
    fi
    if is_lcfs "$peer"; then
        local hits misses
        read -r hits misses < <(block_cache_counters)
        record memory "$round" "$peer" "${mode}_block_cache_hits" $((hits - hits_before))
        record memory "$round" "$peer" "${mode}_block_cache_misses" $((misses - misses_before))
    fi
    local cached_mib=$(((cached_after - cached_before) / 1024))
    local rss_mib=$(((rss_after - rss_before) / 1024))
    local files_mib=$(((files_after - files_before) / 1048576))
    local peak_mib=$(((peak - cached_before - rss_before) / 1024))
    record memory "$round" "$peer" "${mode}_cached_mib" "$cached_mib"
    record memory "$round" "$peer" "${mode}_rss_mib" "$rss_mib"
    record memory "$round" "$peer" "${mode}_files_cache_mib" "$files_mib"
    record memory "$round" "$peer" "${mode}_growth_mib" $((cached_mib + rss_mib))
    record memory "$round" "$peer" "${mode}_attributed_mib" $((files_mib + rss_mib))
    record memory "$round" "$peer" "${mode}_peak_mib" "$peak_mib"
    record memory "$round" "$peer" "${mode}_read_s" "$read_s"
    say "  memory $mode $peer: Cached +$cached_mib MiB (of it the files' pages +$files_mib MiB), RSS +$rss_mib MiB, peak +$peak_mib MiB; $count x $mem_mib MiB read in $read_s s"
    ! is_lcfs "$peer" || lcfs_alive
    for name in "${names[@]}"; do
        container_down "$peer" "$name"
    done
    settle
}

# --- set-up ---------------------------------------------------------------------

: >"$out"
say "results: $out (summary: $out.md)"
ensure_rootfs_tarball
# The tarball sits in a tmpfs: drop_caches cannot evict it, so untar reads it
# from memory on every peer and times only the writes.
tmpfs_mount "$E2E_WORK/tarball" "$(($(stat -c %s "$tarball") / 1048576 + 64))M"
cp "$tarball" "$E2E_WORK/tarball/rootfs.tar"

lcfs_build
# A private copy: a rebuild of target/release/lcfs during the run (the memory
# row restarts the daemon) must not change what is measured.
cp "$LCFS_BIN" "$E2E_WORK/lcfs-bin"
LCFS_BIN="$E2E_WORK/lcfs-bin"
commit=$(git -C "$E2E_REPO" rev-parse --short HEAD)
dirty=$(git -C "$E2E_REPO" status --porcelain -- engine fsfront daemon Cargo.lock | wc -l)
measured="lcfs commit $commit ($dirty changed files under engine/ fsfront/ daemon/)"
# A binary given with LCFS_BIN need not be built from this worktree.
[[ -z $given_bin ]] || measured="lcfs binary $given_bin (given with LCFS_BIN; this worktree is at commit $commit)"
say "measuring $measured"

mkdir -p "$E2E_SCRATCH/data"
dd if=/dev/urandom of="$E2E_SCRATCH/data/seq.bin" bs=1M count="$seq_mib" status=none
dd if=/dev/urandom of="$E2E_SCRATCH/data/mem.bin" bs=1M count="$mem_mib" status=none

# populate DIR: the rootfs and the two data files, as an image would hold them.
populate() {
    tar "${tar_options[@]}" -p -C "$1" -xf "$E2E_WORK/tarball/rootfs.tar" || die "untar into $1 failed"
    mkdir -p "$1/bench"
    cp "$E2E_SCRATCH/data/seq.bin" "$E2E_SCRATCH/data/mem.bin" "$1/bench/"
}

setup_start=$SECONDS
if has_peer lcfs || has_peer lcfs-nostats || has_peer lcfs-again || has_peer lcfs-verified; then
    lcfs_mkfs
    lcfs_start
    quietly lcfs_ctl layer create image --cold || die "lcfs layer create image failed"
    populate "$LCFS_MOUNT/image"
    quietly lcfs_ctl layer commit image || die "lcfs layer commit image failed"
    # Sealed now rather than in the background during a measurement
    # (docs/integrity.md); lcfs-verified's reads are checked against it.
    if built_has verify; then
        quietly lcfs_ctl verify image || die "lcfs verify image (sealing it) failed"
    fi
    settle
fi
for peer in overlay fuse-overlayfs; do
    has_peer "$peer" || continue
    mkdir -p "$E2E_SCRATCH/$peer/lower" "$E2E_SCRATCH/$peer/containers"
    populate "$E2E_SCRATCH/$peer/lower"
done
settle
# The data must read back right through every peer's merged view.
for peer in "${peer_list[@]}"; do
    container_up "$peer" check
    drop_caches
    for file in seq.bin mem.bin; do
        cmp "$E2E_SCRATCH/data/$file" "${container_path[check]}/bench/$file" ||
            die "$peer: bench/$file read through a container differs from what was written"
    done
    container_down "$peer" check
done
say "set-up done in $((SECONDS - setup_start)) s: rootfs ($(tar -tf "$tarball" | wc -l) entries), bench/seq.bin $seq_mib MiB, bench/mem.bin $mem_mib MiB in each peer's lower layer; data verified through each"

# --- measurement ----------------------------------------------------------------

# rotated ROUND: the peers in this round's order.
rotated() {
    local round=$1 count=${#peer_list[@]} index
    for ((index = 0; index < count; index++)); do
        echo "${peer_list[$(((round - 1 + index) % count))]}"
    done
}

if has_row metadata || has_row seqread || has_row randrw; then
    for ((round = 1; round <= rounds; round++)); do
        for peer in $(rotated "$round"); do
            run_start=$SECONDS
            run_files "$peer" "$round"
            say "round $round/$rounds $peer: rows 1-2 in $((SECONDS - run_start)) s"
        done
    done
fi
if has_row memory; then
    for ((round = 1; round <= rounds; round++)); do
        for peer in $(rotated "$round"); do
            for mode in idle single sequential parallel; do
                run_memory "$peer" "$round" "$mode"
            done
        done
        say "memory round $round/$rounds done"
    done
fi
[[ -z $LCFS_PID ]] || lcfs_check_log
say "warm measurements taken again because another process dropped the page cache: $disturbed"

# --- summary --------------------------------------------------------------------

load=$(cut -d' ' -f1-3 /proc/loadavg)
summary_status=0
{
    echo "Command: \`$command_line\` (rounds $rounds, seq.bin $seq_mib MiB, mem.bin $mem_mib MiB, $readers readers)"
    echo "$measured; $(uname -r); $(fuse_wake_here); $(nproc) vCPU; fuse-overlayfs $(fuse-overlayfs --version 2>/dev/null | awk '/fuse-overlayfs:/ { print $3 }'); load average at the end $load; total $((SECONDS - bench_start)) s; warm measurements taken again after another process dropped the page cache: $disturbed"
    echo "Busiest processes at the end: $(ps -eo pcpu=,comm= --sort=-pcpu | head -n 6 | awk '{ printf "%s%s %s%%", (NR > 1 ? ", " : ""), $2, $1 }')."
    echo
    python3 - "$out" "$signatures" "$readers" <<'EOF'
import statistics, sys
from collections import defaultdict
out, signatures, readers = sys.argv[1], sys.argv[2], int(sys.argv[3])
values = defaultdict(list)
for line in open(out):
    row, rnd, peer, metric, value = line.rstrip("\n").split("\t")
    values[(metric, peer)].append(float(value))
peers = [p for p in ("lcfs", "lcfs-nostats", "lcfs-again", "lcfs-verified", "overlay", "fuse-overlayfs") if any(k[1] == p for k in values)]
others = [p for p in peers if p != "lcfs"] if "lcfs" in peers else []
def fmt(x):
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"
def median(metric, peer):
    v = values.get((metric, peer))
    return statistics.median(v) if v else None
def cell(metric, peer):
    v = values.get((metric, peer))
    return f"{fmt(statistics.median(v))} ({fmt(min(v))}-{fmt(max(v))})" if v else "-"
def table(rows):
    if not any((metric, p) in values for metric, *_ in rows for p in peers):
        return
    print("| row | unit | " + " | ".join(f"{p}: median (min-max)" for p in peers)
          + "".join(f" | lcfs / {p}" for p in others) + " | goals |")
    print("|" + "---|" * (3 + len(peers) + len(others)))
    for metric, label, unit, higher, goal in rows:
        if not any((metric, p) in values for p in peers):
            continue
        m = {p: median(metric, p) for p in peers}
        ratios = [f"{m['lcfs'] / m[p]:.2f}" if m.get("lcfs") is not None and m[p] else "-" for p in others]
        notes = []
        lc, fo, ov = m.get("lcfs"), m.get("fuse-overlayfs"), m.get("overlay")
        if lc is not None and fo is not None and goal != "none":
            notes.append("ahead of fuse-overlayfs: " + ("met" if (lc > fo if higher else lc < fo) else "**not met**"))
        if lc is not None and ov is not None and goal == "metadata":
            notes.append("within 2x of overlay: " + ("met" if lc <= 2 * ov else "**not met**"))
        if lc is not None and ov is not None and goal == "cached":
            notes.append(">= 80% of overlay: " + ("met" if lc >= 0.8 * ov else "**not met**"))
        print(f"| {label} | {unit} | " + " | ".join(cell(metric, p) for p in peers)
              + "".join(f" | {r}" for r in ratios) + " | " + ("; ".join(notes) or "-") + " |")
    print()
table([
    ("untar_s", "untar the rootfs into the container", "s", False, "metadata"),
    ("find_cold_s", "find over the container, cold", "s", False, "metadata"),
    ("find_warm_s", "find over the container, warm", "s", False, "metadata"),
    ("stat_cold_s", "lstat every path, cold", "s", False, "metadata"),
    ("stat_warm_s", "lstat every path, warm", "s", False, "metadata"),
    ("rm_s", "rm -rf the untarred tree", "s", False, "metadata"),
    ("seq_cold_mibs", "sequential read, cold", "MiB/s", True, "seq"),
    ("seq_cached_mibs", "sequential read, cached (second read)", "MiB/s", True, "cached"),
    ("seq_held_mibs", "(extra) cached read, file held open by another fd", "MiB/s", True, "none"),
    ("seqwrite_mibs", "(randrw) sequential write 1 MiB + fsync", "MiB/s", True, "none"),
    ("randread_mibs", "(randrw) random read 4 KiB, cold", "MiB/s", True, "none"),
    ("randwrite_mibs", "(randrw) random write 4 KiB + fsync", "MiB/s", True, "none"),
])
memory_rows = []
for kind, what in (("attributed", "files' page cache + daemon RSS, after"),
                   ("growth", "meminfo Cached + daemon RSS, after"),
                   ("peak", "meminfo Cached + daemon RSS, peak")):
    for mode, who in (("idle", "control, nobody reads (3 s)"), ("single", "1 reader"),
                      ("sequential", f"{readers} readers one after another"),
                      ("parallel", f"{readers} readers at once")):
        memory_rows.append((f"{mode}_{kind}_mib", f"memory, {who}: {what}", "MiB", False,
                            "none" if mode == "idle" else "memory"))
table(memory_rows)
for kind, what in (("attributed", "files' page cache + daemon RSS, after the readers closed"),
                   ("growth", "meminfo Cached + daemon RSS, after the readers closed"),
                   ("peak", "meminfo Cached + daemon RSS, peak while reading")):
    parts = []
    for p in peers:
        one = median(f"single_{kind}_mib", p)
        for mode in ("sequential", "parallel"):
            many = median(f"{mode}_{kind}_mib", p)
            if one is None or many is None:
                continue
            if one <= 0:
                parts.append(f"{p} {mode}: n/a (1-reader growth {one:.0f} MiB)")
                continue
            ratio = many / one
            verdict = (" (goal <= 1.5: " + ("met" if ratio <= 1.5 else "**not met**") + ")") if p == "lcfs" else ""
            parts.append(f"{p} {mode} {ratio:.2f}x{verdict}")
    if parts:
        print(f"- {readers} readers / 1 reader, {what}: " + "; ".join(parts) + ".")
components = defaultdict(list)
for (metric, peer), v in sorted(values.items()):
    if metric.endswith(("_cached_mib", "_rss_mib", "_files_cache_mib")):
        components[peer].append(f"{metric[:-4]} {statistics.median(v):.0f}")
for p in peers:
    if components[p]:
        print(f"- memory components, {p} (MiB, medians): " + ", ".join(components[p]) + ".")
for prefix, what in (("cold", "the cold sequential read"), ("single", "the memory row, 1 reader"),
                     ("sequential", f"the memory row, {readers} readers one after another"),
                     ("parallel", f"the memory row, {readers} readers at once")):
    hits, misses = values.get((f"{prefix}_block_cache_hits", "lcfs")), values.get((f"{prefix}_block_cache_misses", "lcfs"))
    if hits and misses:
        print(f"- lcfs block cache (4 KiB blocks) in {what}, per round: hits {[int(h) for h in hits]}, misses {[int(m) for m in misses]}.")
kept = [f"{m[0][:-len('_disturbed')]} {m[1]}" for m in values if m[0].endswith("_disturbed")]
if kept:
    print("- memory measurements where another process dropped the page cache in all 3 attempts (kept anyway): " + ", ".join(kept) + ".")
# Every peer must have seen the same tree in the same round.
by_round = defaultdict(dict)
try:
    for line in open(signatures):
        rnd, peer, sig = line.rstrip("\n").split("\t")
        by_round[rnd][peer] = sig
except FileNotFoundError:
    pass
bad = [(r, s) for r, s in by_round.items() if len(set(s.values())) > 1]
if by_round and not bad:
    print("- tree check: every peer listed and lstat-ed the same tree in every round ("
          + next(iter(next(iter(by_round.values())).values())) + ").")
for r, s in bad:
    print(f"- **TREE MISMATCH** in round {r}: " + "; ".join(f"{p}: {v}" for p, v in s.items()))
sys.exit(1 if bad else 0)
EOF
} >"$out.md" || summary_status=$?
cat "$out.md"
[[ $summary_status -eq 0 ]] || fail "the peers did not see the same tree (see TREE MISMATCH above)"
e2e_finish "measured $rounds rounds in $((SECONDS - bench_start)) s; summary in $out.md"
