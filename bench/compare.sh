#!/usr/bin/env bash
# Every comparison in one command: the engine beside fio, the lcfs mount
# beside kernel overlayfs and fuse-overlayfs, dockerd 20.10 on lcfs beside
# overlay2, fuse-overlayfs and btrfs, and containerd 1.7 with the lcfs
# snapshotter beside its overlayfs one; then one report with medians,
# spreads, ratios to the best peer and charts of the container lifecycle.
#
#   sudo bash bench/compare.sh --quick --write-docs   # < 10 min
#   sudo bash bench/compare.sh                        # full run, ~35 min
#
# The three tools it runs set up their peers themselves and interleave them
# in rounds, in an order that rotates, so drift on the machine hits every
# peer alike (docs/benchmarks.md sections 2-4 say what each one times):
#   1. target/release/engine-vs-fio --json          engine vs fio, one loop device
#   2. bench/fuse-compare.sh                        metadata, sequential read,
#                                                   randrw, memory of N clones
#   3. bench/docker-compare.sh --peers ...,btrfs    one private dockerd per peer,
#                                                   each started and stopped by it:
#                                                   launch and tear down N containers
#                                                   (N = 20..100), build, load
#   4. bench/containerd-compare.sh                  containerd 1.7, both snapshotters:
#                                                   import, prepare, remove, ctr run
# Their raw outputs (JSON, TSV) go to one directory (--out-dir), and
# target/release/lcfs-bench-report turns them into benchmarks-summary.md and
# charts/*.png there; --write-docs writes those to docs/ instead.
E2E_NAME=compare
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/e2e/lib.sh"

usage() {
    cat <<'EOF'
usage: bench/compare.sh [--quick] [--out-dir DIR] [--write-docs] [--only LIST]

  --quick        fewer rounds, smaller files, N = 20,40 containers (< 10 min);
                 default: the full run, N = 20,40,60,80,100 (~35 min)
  --out-dir DIR  raw outputs, logs, the summary and the charts
                 (default /var/tmp/lcfs-compare-<time>)
  --write-docs   also write docs/benchmarks-summary.md and docs/charts/*.png
  --only LIST    comma-separated subset of engine,fuse,docker,containerd
                 (default all)
Environment: LCFS_BIN (a built lcfs instead of target/release/lcfs).
EOF
}

command_line="bench/compare.sh${*:+ $*}"
mode=full
out_dir=""
write_docs=0
only=engine,fuse,docker,containerd
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) mode=quick ;;
        --out-dir) out_dir=$2; shift ;;
        --write-docs) write_docs=1 ;;
        --only) only=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done
IFS=, read -r -a only_list <<<"$only"
for part in "${only_list[@]}"; do
    [[ $part =~ ^(engine|fuse|docker|containerd)$ ]] || die "unknown part '$part'"
done
runs() { [[ ",$only," == *",$1,"* ]]; }
out_dir=${out_dir:-/var/tmp/lcfs-compare-$(date +%Y%m%d-%H%M%S)}

# Round counts and sizes per mode. Every tool interleaves its peers in each
# round, so fewer rounds widen the spread but do not bias the ratios.
if [[ $mode == quick ]]; then
    engine_args=(--rounds 3 --size-bytes 512M --device-bytes 2G)
    fuse_args=(--quick --readers 10)
    docker_args=(--rounds 2 --counts "20,40" --build-mib 64)
    containerd_args=(--rounds 2 --prepares 20 --writers 4 --runs 10)
else
    engine_args=(--rounds 5)
    fuse_args=(--rounds 5)
    docker_args=(--rounds 3 --counts "20,40,60,80,100")
    containerd_args=(--rounds 3)
fi
docker_args+=(--peers "lcfs,overlay2,fuse-overlayfs,btrfs")

require_root
require_commands cargo fio
mkdir -p "$out_dir"
: >"$out_dir/stages.tsv"
echo "$command_line" >"$out_dir/command.txt"
compare_start=$SECONDS
failed_parts=()

# stage NAME COMMAND...: runs one tool, its output in NAME.log, its time in
# stages.tsv (the report lists both).
stage() {
    local name=$1 start=$SECONDS status=0
    shift
    say "$name: $*"
    "$@" >"$out_dir/$name.log" 2>&1 || status=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$((SECONDS - start))" "$status" "${*//$E2E_REPO\//}" >>"$out_dir/stages.tsv"
    if [[ $status -ne 0 ]]; then
        tail -n 20 "$out_dir/$name.log" >&2
        say "$name failed (exit $status; log $out_dir/$name.log); going on with the rest"
        failed_parts+=("$name")
    else
        say "$name done in $((SECONDS - start)) s"
    fi
}

say "building lcfs, engine-vs-fio and lcfs-bench-report (release)"
(cd "$E2E_REPO" && quietly cargo build --release -p lcfs -p lcfs-bench) ||
    die "the workspace does not build"
export LCFS_BIN=${LCFS_BIN:-$E2E_REPO/target/release/lcfs}
release="$E2E_REPO/target/release"

if runs engine; then
    # --json: the summary on stdout, the human-readable report on stderr.
    engine_start=$SECONDS
    status=0
    "$release/engine-vs-fio" --json "${engine_args[@]}" --file /var/tmp/lcfs-compare-engine.img \
        >"$out_dir/engine-vs-fio.json" 2>"$out_dir/engine.log" || status=$?
    printf '%s\t%s\t%s\t%s\n' engine "$((SECONDS - engine_start))" "$status" \
        "target/release/engine-vs-fio --json ${engine_args[*]}" >>"$out_dir/stages.tsv"
    if [[ $status -ne 0 ]]; then
        say "engine-vs-fio failed (exit $status; log $out_dir/engine.log)"
        failed_parts+=(engine)
    fi
fi
if runs fuse; then
    stage fuse bash "$E2E_REPO/bench/fuse-compare.sh" "${fuse_args[@]}" --out "$out_dir/fuse-compare.tsv"
fi
if runs docker; then
    stage docker bash "$E2E_REPO/bench/docker-compare.sh" "${docker_args[@]}" --out "$out_dir/docker-compare.tsv"
fi
if runs containerd; then
    stage containerd bash "$E2E_REPO/bench/containerd-compare.sh" "${containerd_args[@]}" \
        --out "$out_dir/containerd-compare.tsv"
fi
say "measurements done in $((SECONDS - compare_start)) s"

report_args=(--input-dir "$out_dir" --mode "$mode" --total-seconds "$((SECONDS - compare_start))"
    --command "$command_line")
"$release/lcfs-bench-report" "${report_args[@]}" --output "$out_dir/benchmarks-summary.md" \
    --charts-dir "$out_dir/charts" || die "the report failed"
if [[ $write_docs -eq 1 ]]; then
    "$release/lcfs-bench-report" "${report_args[@]}" --output "$E2E_REPO/docs/benchmarks-summary.md" \
        --charts-dir "$E2E_REPO/docs/charts" || die "the report failed"
    say "wrote docs/benchmarks-summary.md and docs/charts/"
fi
say "done in $((SECONDS - compare_start)) s; outputs in $out_dir"
[[ ${#failed_parts[@]} -eq 0 ]] || die "failed: ${failed_parts[*]} (the summary says 'Not run, or it failed')"
