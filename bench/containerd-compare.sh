#!/usr/bin/env bash
# containerd-level benchmark: the lcfs snapshotter (proxy plugin "lcfs",
# served by the lcfs daemon) beside containerd's own overlayfs snapshotter,
# on one private containerd 1.7, in the same run, interleaved in rounds.
#
#   sudo bash bench/containerd-compare.sh                  # 3 rounds, N = 50 / 10 / 30
#   sudo bash bench/containerd-compare.sh --quick          # 2 rounds, N = 20 / 4 / 10
#   sudo bash bench/containerd-compare.sh --rows import,run --rounds 5
#   sudo bash bench/containerd-compare.sh --rows docker,build  # docker 26 (opt-in)
#
# One containerd (scripts/e2e/lib-containerd.sh: own root, state, sockets,
# pidfile), its root on a fresh ext4 in a sparse loop image under /var/tmp;
# the lcfs device file is a sparse file on the same ext4, so both
# snapshotters write to the same disk. Each peer works in its own containerd
# namespace (bench-lcfs, bench-overlayfs). The image is the cached Debian
# bookworm minbase rootfs (~200 MB, one layer) as a `docker save` archive
# (scripts/e2e/images.py rootfs-image, layer not compressed).
#
# Rows (docs/benchmarks.md section 7 says exactly what each one times):
#   import   `ctr images import --snapshotter X debian.tar` (content written
#            and the layer unpacked into the snapshotter); before it, untimed,
#            the image of the previous round is removed (`images rm --sync`).
#            Also timed up to the end of a `sync` and `lcfs sync` right after
#            ("import+sync"): the peers leave different amounts in memory.
#   prepare  N x (`ctr snapshots prepare --target DIR key TOP` + the printed
#            mount command + umount + `ctr snapshots rm key`), TOP = the
#            image's committed snapshot.
#   ctr      row prepare's fixed cost: N x two `ctr snapshots info TOP`
#            (two ctr processes, one snapshotter call each, no mount); the
#            table also shows prepare minus ctr: what is not the CLI.
#   remove   N snapshots prepared from TOP, each mounted and given 5,000
#            small files (untimed), then one `ctr snapshots rm` of all N and
#            a garbage collection (see gc below), timed until the
#            snapshotter's storage is back to what it was (overlayfs: its
#            snapshot directories; lcfs: its layers).
#   run      N x `ctr run --rm --snapshotter X IMAGE id true`.
#   docker   (not in the default rows) N x `docker run --rm --network none
#            debian:bench true` on a private dockerd 26.1 per peer, on the
#            same containerd, image store in snapshotter X (the image is
#            loaded once, untimed).
#   build    (not in the default rows) a BuildKit build (`docker buildx
#            build --no-cache`, dockerd 26's BuildKit) of a 6-step Dockerfile
#            FROM debian:bench: 500 small files, a COPY of 200, 64 MiB of
#            random bytes and their sha256sum, a check and an rm -rf, a
#            chown -R; image and build cache removed after, untimed.
# In every round each peer runs each row once, the peers' order rotating
# from round to round. Prints a Markdown table (median over the rounds per
# peer, ratio lcfs/overlayfs, the goal and its verdict) and keeps every raw
# measurement in a TSV file (--out).
# The row_* functions are called by name ("row_$row").
# shellcheck disable=SC2317
E2E_NAME="containerd-compare"
: "${E2E_SCRATCH_SIZE:=48G}"
: "${LCFS_DEVICE_SIZE:=16G}"
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/e2e/lib.sh"
# shellcheck source=scripts/e2e/lib-containerd.sh
. "$E2E_DIR/lib-containerd.sh"

usage() {
    cat <<'EOF'
usage: bench/containerd-compare.sh [--quick] [--rounds N] [--rows LIST]
                                   [--prepares N] [--writers N] [--files N] [--runs N]
                                   [--out FILE]

  --quick        2 rounds, --prepares 20 --writers 4 --runs 10
  --rounds N     rounds (default 3); the table shows their median
  --rows LIST    comma-separated subset of import,prepare,ctr,remove,run,docker,
                 build (default all but docker and build)
  --prepares N   prepare/mount/umount/remove cycles per measurement (default 50)
  --writers N    snapshots written and then removed (default 10)
  --files N      small files each writer snapshot gets (default 5000)
  --runs N       `ctr run --rm` (and `docker run --rm`) per measurement (default 30)
  --out FILE     raw results (TSV) and the table (FILE.md)
                 (default /var/tmp/lcfs-containerd-compare-<time>.tsv)
Environment: LCFS_BIN (a built lcfs instead of target/release/lcfs),
E2E_KEEP=1 (keep the work directory), RUST_LOG (daemon log level, default warn).
EOF
}

command_line="bench/containerd-compare.sh${*:+ $*}"
rounds=3
rows=import,prepare,ctr,remove,run
prepares=50
writers=10
files=5000
runs=30
out=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick)
            rounds=2
            prepares=20
            writers=4
            runs=10
            ;;
        --rounds) rounds=$2; shift ;;
        --rows) rows=$2; shift ;;
        --prepares) prepares=$2; shift ;;
        --writers) writers=$2; shift ;;
        --files) files=$2; shift ;;
        --runs) runs=$2; shift ;;
        --out) out=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done
IFS=, read -r -a row_list <<<"$rows"
for number in "$rounds" "$prepares" "$writers" "$files" "$runs"; do
    [[ $number =~ ^[1-9][0-9]*$ ]] || die "'$number' is not a positive integer"
done
for row in "${row_list[@]}"; do
    [[ $row =~ ^(import|prepare|ctr|remove|run|docker|build)$ ]] || die "unknown row '$row'"
done
out=${out:-/var/tmp/lcfs-containerd-compare-$(date +%Y%m%d-%H%M%S).tsv}
peers=(lcfs overlayfs)
export RUST_LOG=${RUST_LOG:-warn}
export LC_NUMERIC=C
bench_start=$SECONDS

require_root
require_commands python3 tar runc curl
e2e_init
if [[ ",$rows," == *,docker,* || ",$rows," == *,build,* ]]; then
    containerd_tools docker
    # The buildx plugin, for docker 26's CLI: setup.sh unpacks Debian 13's
    # docker-buildx beside docker.io (not pinned: --deb-dir does not know it).
    buildx=$(compgen -G "$(dirname "$(deb_dir docker.io)")/docker-buildx-*/usr/libexec/docker/cli-plugins/docker-buildx" | head -n 1 || true)
    if [[ ",$rows," == *,build,* && ! -x $buildx ]]; then
        die "docker-buildx is not unpacked next to docker.io (scripts/setup.sh)"
    fi
    mkdir -p "$E2E_WORK/docker-config/cli-plugins"
    [[ -z $buildx ]] || ln -s "$buildx" "$E2E_WORK/docker-config/cli-plugins/"
    export DOCKER_CONFIG=$E2E_WORK/docker-config
else
    containerd_tools
fi

# --- helpers ------------------------------------------------------------------

# Kernel sync and the lcfs engine's own (syncfs does not reach a FUSE
# daemon): untimed, so one peer's write-back does not land in the other's step.
settle() {
    sync
    quietly lcfs_ctl sync || die "lcfs sync failed"
}

now() { echo "$EPOCHREALTIME"; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }

# c PEER ARGS...: ctr in PEER's namespace.
c() {
    local peer=$1
    shift
    CTRD_NAMESPACE=bench-$peer ctrd "$@"
}

image=docker.io/library/debian:bench

# top PEER: the image's committed snapshot (its only one: one layer).
top() {
    c "$1" snapshots --snapshotter "$1" ls | awk 'NR > 1 && $NF == "Committed" { print $1 }' | head -n 1
}

# storage_count PEER: what the snapshotter keeps on disk, as a number that
# falls back to its value before a measurement once removed snapshots are
# really gone: overlayfs's snapshot directories; lcfs's layers plus the
# removed ones whose space its background thread is still freeing.
overlay_root() { echo "$E2E_SCRATCH/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots"; }
storage_count() {
    local layers pending
    if [[ $1 == overlayfs ]]; then
        find "$(overlay_root)" -mindepth 1 -maxdepth 1 -type d | wc -l
    else
        layers=$(lcfs_ctl layer ls | grep -vc '^NAME' || true)
        pending=$(lcfs_ctl stats --json | sed -n 's/^ *"removals_pending": \([0-9]*\),$/\1/p')
        echo $((layers + ${pending:-0}))
    fi
}

record() { # ROW PEER ROUND SECONDS
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$out"
    say "round $3: $1 $2 $4 s"
}

# gc PEER: a garbage collection now, and waits for it. containerd removes a
# snapshot from its own metadata at once and from the snapshotter (overlayfs'
# or the proxy's Remove, then Cleanup) only in a collection, which `ctr
# snapshots rm` does not start by itself (deletion threshold 0, mutation
# threshold 100); a synchronous image delete does (`images rm --sync` of a
# tag made for it).
gc() {
    quietly c "$1" images tag --force "$image" "$image-gc" || die "images tag ($1) failed"
    quietly c "$1" images rm --sync "$image-gc" || die "images rm --sync ($1) failed"
}

ensure_image() {
    local peer=$1
    [[ -n $(top "$peer") ]] && return 0
    quietly c "$peer" images import --snapshotter "$peer" "$E2E_WORK/debian.tar" || die "import ($peer) failed"
}

# --- rows ---------------------------------------------------------------------

row_import() {
    local peer=$1 round=$2 start end
    quietly c "$peer" images rm --sync "$image" || true
    [[ -z $(top "$peer") ]] || die "the image's snapshot is still there after images rm ($peer)"
    settle
    start=$(now)
    quietly c "$peer" images import --snapshotter "$peer" "$E2E_WORK/debian.tar" || die "import ($peer) failed"
    end=$(now)
    record import "$peer" "$round" "$(elapsed "$start" "$end")"
    settle
    record import+sync "$peer" "$round" "$(elapsed "$start" "$(now)")"
}

row_prepare() {
    local peer=$1 round=$2 parent dir="$E2E_WORK/m-$1" i command start end
    ensure_image "$peer"
    parent=$(top "$peer")
    mkdir -p "$dir"
    settle
    start=$(now)
    for ((i = 0; i < prepares; i++)); do
        command=$(c "$peer" snapshots --snapshotter "$peer" prepare --target "$dir" "p-$round-$i" "$parent") ||
            die "prepare ($peer) failed"
        bash -c "$command" || die "mount ($peer): $command failed"
        umount "$dir" || die "umount ($peer) failed"
        c "$peer" snapshots --snapshotter "$peer" rm "p-$round-$i" || die "snapshots rm ($peer) failed"
    done
    end=$(now)
    record prepare "$peer" "$round" "$(elapsed "$start" "$end")"
    gc "$peer"
}

# The fixed cost of row 2's two ctr processes: the same loop with
# `ctr snapshots info TOP` in place of prepare and rm, and no mount.
row_ctr() {
    local peer=$1 round=$2 parent i start end
    ensure_image "$peer"
    parent=$(top "$peer")
    settle
    start=$(now)
    for ((i = 0; i < prepares; i++)); do
        c "$peer" snapshots --snapshotter "$peer" info "$parent" >/dev/null || die "snapshots info ($peer) failed"
        c "$peer" snapshots --snapshotter "$peer" info "$parent" >/dev/null || die "snapshots info ($peer) failed"
    done
    end=$(now)
    record ctr "$peer" "$round" "$(elapsed "$start" "$end")"
    gc "$peer"
}

row_remove() {
    local peer=$1 round=$2 parent dir="$E2E_WORK/m-$1" i command start end before keys=() waited=0
    ensure_image "$peer"
    parent=$(top "$peer")
    mkdir -p "$dir"
    gc "$peer"
    before=$(storage_count "$peer")
    for ((i = 0; i < writers; i++)); do
        command=$(c "$peer" snapshots --snapshotter "$peer" prepare --target "$dir" "w-$round-$i" "$parent") ||
            die "prepare ($peer) failed"
        bash -c "$command" || die "mount ($peer): $command failed"
        tar -xf "$E2E_WORK/small.tar" -C "$dir" || die "writing the small files ($peer) failed"
        umount "$dir" || die "umount ($peer) failed"
        keys+=("w-$round-$i")
    done
    settle
    start=$(now)
    c "$peer" snapshots --snapshotter "$peer" rm "${keys[@]}" || die "snapshots rm ($peer) failed"
    gc "$peer"
    until [[ $(storage_count "$peer") -le $before ]]; do
        waited=$((waited + 1))
        [[ $waited -lt 6000 ]] || die "$peer: the removed snapshots' storage is still there after 120 s"
        sleep 0.02
    done
    end=$(now)
    record remove "$peer" "$round" "$(elapsed "$start" "$end")"
}

row_run() {
    local peer=$1 round=$2 i start end
    ensure_image "$peer"
    settle
    start=$(now)
    for ((i = 0; i < runs; i++)); do
        c "$peer" run --rm --snapshotter "$peer" "$image" "r-$round-$i" true || die "ctr run ($peer) failed"
    done
    end=$(now)
    record run "$peer" "$round" "$(elapsed "$start" "$end")"
    gc "$peer"
}

# docker_ready PEER: PEER's dockerd 26, started on first use, holding
# debian:bench.
docker_ready() {
    [[ -z ${DOCKERD_PIDS[$1]:-} ]] || return 0
    docker26_start "$1" "$1"
    quietly docker26 "$1" load -i "$E2E_WORK/debian.tar" || die "docker load ($1) failed"
}

row_docker() {
    local peer=$1 round=$2 i start end
    docker_ready "$peer"
    settle
    start=$(now)
    for ((i = 0; i < runs; i++)); do
        docker26 "$peer" run --rm --network none debian:bench true || die "docker run ($peer) failed"
    done
    end=$(now)
    record docker "$peer" "$round" "$(elapsed "$start" "$end")"
}

# A BuildKit build (dockerd 26's own BuildKit, buildx's "docker" driver) of
# $E2E_WORK/build, without cache; the image and the build cache are removed
# after, untimed.
row_build() {
    local peer=$1 round=$2 start end
    docker_ready "$peer"
    settle
    start=$(now)
    quietly docker26 "$peer" buildx build --no-cache --network none -t built:bench "$E2E_WORK/build" ||
        die "docker buildx build ($peer) failed"
    end=$(now)
    record build "$peer" "$round" "$(elapsed "$start" "$end")"
    quietly docker26 "$peer" image rm built:bench || die "docker image rm ($peer) failed"
    quietly docker26 "$peer" builder prune -af || die "docker builder prune ($peer) failed"
}

# --- setup ----------------------------------------------------------------------

lcfs_build
lcfs_mkfs
LCFS_CONTAINERD_SOCKET=$E2E_WORK/snapshotter.sock
lcfs_start
lcfs_snapshotter_wait
containerd_start
say "containerd $("$CONTAINERD_BIN" --version | cut -d' ' -f3), lcfs $("$LCFS_BIN" --version 2>/dev/null | cut -d' ' -f2), scratch $E2E_SCRATCH"
ensure_rootfs_tarball
python3 "$E2E_DIR/images.py" rootfs-image "$DEBIAN_TARBALL" "$E2E_WORK/debian.tar" debian:bench
say "image: $(du -h "$E2E_WORK/debian.tar" | cut -f1) archive, one layer"
# The writers' files: $files files of 100-400 bytes in 50 directories.
python3 - "$E2E_WORK/small.tar" "$files" <<'EOF'
import io, sys, tarfile
out, count = sys.argv[1], int(sys.argv[2])
with tarfile.open(out, "w") as tar:
    for d in range(50):
        t = tarfile.TarInfo(f"small/d{d}"); t.type = tarfile.DIRTYPE; t.mode = 0o755
        tar.addfile(t)
    for i in range(count):
        data = (b"%d " % i) * (25 + i % 75)
        data = data[:100 + (i * 37) % 300]
        t = tarfile.TarInfo(f"small/d{i % 50}/f{i}"); t.size = len(data); t.mode = 0o644
        tar.addfile(t, io.BytesIO(data))
EOF
mkdir -p "$E2E_WORK/build/context"
for i in $(seq 200); do echo "copied file $i" >"$E2E_WORK/build/context/c$i"; done
cat >"$E2E_WORK/build/Dockerfile" <<'EOF'
FROM debian:bench
RUN mkdir /files && for i in $(seq 500); do echo "file $i" > /files/f$i; done
COPY context/ /copied/
RUN head -c 64M /dev/urandom > /big && sha256sum /big > /big.sum
RUN sha256sum -c /big.sum && rm -rf /usr/share/doc /usr/share/man
RUN chown -R 1000:1000 /files /copied
EOF
mkdir -p "$(dirname "$out")"
printf 'row\tpeer\tround\tseconds\n' >"$out"
# Untimed warm-up: each peer imports the image once (content and snapshot).
for peer in "${peers[@]}"; do
    ensure_image "$peer"
done

for ((round = 1; round <= rounds; round++)); do
    if ((round % 2 == 1)); then order=(lcfs overlayfs); else order=(overlayfs lcfs); fi
    for row in "${row_list[@]}"; do
        for peer in "${order[@]}"; do
            "row_$row" "$peer" "$round"
        done
    done
done

# --- summary --------------------------------------------------------------------

python3 - "$out" "$command_line" "$rounds" "$prepares" "$writers" "$files" "$runs" >"$out.md" <<'EOF'
import csv, statistics, sys
path, command, rounds, prepares, writers, files, runs = sys.argv[1:]
rows = {}
for r in csv.DictReader(open(path), delimiter="\t"):
    rows.setdefault(r["row"], {}).setdefault(r["peer"], []).append(float(r["seconds"]))
what = {
    "import": ("1. `ctr images import` of the ~200 MB Debian image (s)", 0.8),
    "import+sync": ("1. the same + `sync` + `lcfs sync` (s)", 0.8),
    "prepare": (f"2. {prepares} x prepare + mount + umount + rm (s)", 0.25),
    "ctr": (f"2. its ctr cost: {prepares} x two `ctr snapshots info` (s)", None),
    "prepare-ctr": (f"2. prepare minus ctr: the snapshotter and the mount (s)", 0.25),
    "remove": (f"3. rm {writers} snapshots of {files} small files each, until reclaimed (s)", 0.25),
    "run": (f"4. {runs} x `ctr run --rm ... true` (s)", 0.9),
    "build": ("5. BuildKit build, 6 steps, no cache (s)", None),
    "docker": (f"5. {runs} x docker 26 `docker run --rm ... true` (s)", 0.9),
}
print(f"`sudo {command}` ({rounds} rounds)\n")
print("| row | lcfs median (min-max) | overlayfs median (min-max) | ratio lcfs/overlayfs | per-round ratios | goal | verdict |")
print("|---|---|---|---|---|---|---|")
if "prepare" in rows and "ctr" in rows:
    rows["prepare-ctr"] = {p: [a - b for a, b in zip(rows["prepare"].get(p, []), rows["ctr"].get(p, []))]
                           for p in ("lcfs", "overlayfs")}
for key in ["import", "import+sync", "prepare", "ctr", "prepare-ctr", "remove", "run", "docker", "build"]:
    if key not in rows:
        continue
    l, o = rows[key].get("lcfs", []), rows[key].get("overlayfs", [])
    if not l or not o:
        continue
    lm, om = statistics.median(l), statistics.median(o)
    ratio = lm / om
    per = ", ".join(f"{a / b:.2f}" for a, b in zip(l, o))
    label, goal = what[key]
    verdict = "-" if goal is None else ("met" if ratio <= goal else "not met")
    goal = "-" if goal is None else f"<= {goal}"
    print(f"| {label} | {lm:.2f} ({min(l):.2f}-{max(l):.2f}) | {om:.2f} ({min(o):.2f}-{max(o):.2f}) | **{ratio:.2f}** | {per} | {goal} | {verdict} |")
EOF
echo "lcfs binary $LCFS_BIN; $(uname -r); $(fuse_wake_here); $(nproc) vCPU; load average at the end $(cut -d' ' -f1-3 /proc/loadavg)" >>"$out.md"
cat "$out.md"
say "done in $((SECONDS - bench_start)) s; raw results in $out, table in $out.md"
for peer in "${!DOCKERD_PIDS[@]}"; do
    dockerd_stop "$peer"
done
containerd_stop
e2e_finish "containerd $("$CONTAINERD_BIN" --version | cut -d" " -f3): lcfs vs overlayfs"
