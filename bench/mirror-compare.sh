#!/usr/bin/env bash
# Cooperative pull against direct pulls (docs/mirror.md, docs/benchmarks.md
# section 13): N hosts pull one image at the same moment from a registry
# whose egress is throttled (bench/mirror/throttle.py in front of a
# registry 2.8), either each straight from the registry (direct) or each
# through its own lcfs daemon's mirror, the N daemons peers of each other
# (cooperative). Times how long until every host holds the whole image
# (each blob checked against its digest) and how many bytes left the
# registry.
#
#   sudo bash bench/mirror-compare.sh                      # N = 2 4 8, 3 rounds, 200 MiB at 40 MiB/s
#   sudo bash bench/mirror-compare.sh --hosts "2 4" --rounds 1 --layer-mib 20
#
# Each cooperative round starts N fresh daemons on fresh device files (an
# empty blob cache). A host is one lcfs daemon and one plain OCI client
# (scripts/e2e/oci-pull.py); direct rounds run the clients alone.
E2E_NAME=mirror-compare
: "${E2E_SCRATCH_SIZE:=40G}"
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/e2e/lib.sh"
# shellcheck source=scripts/e2e/lib-containerd.sh
. "$E2E_DIR/lib-containerd.sh"

hosts_list="2 4 8"
rounds=3
layers=4
layer_mib=50
rate_mib=40
out=""
chart=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --hosts) hosts_list=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --layers) layers=$2; shift 2 ;;
        --layer-mib) layer_mib=$2; shift 2 ;;
        --rate-mib) rate_mib=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --chart) chart=$2; shift 2 ;;
        -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

e2e_init
require_commands curl jq
lcfs_build
registry_start
[[ -n $out ]] || out="$E2E_WORK_BASE/mirror-compare.tsv"
: >"$out"

throttle_start "$rate_mib" "$E2E_WORK/upstream-bytes"
upstream="127.0.0.1:$THROTTLE_PORT"
image_bytes=$(python3 "$E2E_REPO/bench/mirror/oci-push.py" "$REGISTRY" bench/big 1 --layers "$layers" --layer-mib "$layer_mib") ||
    die "pushing the image failed"
say "image: $layers layers, $image_bytes bytes of blobs; registry egress throttled to $rate_mib MiB/s"

# pull_all MODE N ROUND: N clients at once; records wall seconds and the
# registry's bytes.
pull_all() {
    local mode=$1 n=$2 round=$3 i pids=() start end before after base
    if [[ $mode != direct ]]; then
        RUST_LOG=warn mirrors_start "$n" "$upstream" 4096 "upstream_timeout_ms = 120000"
    fi
    before=$(cat "$E2E_WORK/upstream-bytes" 2>/dev/null || echo 0)
    sync
    echo 3 >/proc/sys/vm/drop_caches
    start=$(date +%s.%N)
    for ((i = 0; i < n; i++)); do
        if [[ $mode == direct ]]; then base="http://$upstream"; else base="http://127.0.0.1:${MIRROR_PORTS[$i]}"; fi
        python3 "$E2E_DIR/oci-pull.py" "$base" bench/big 1 >"$E2E_WORK/pull-$i.out" 2>&1 &
        pids+=($!)
    done
    for ((i = 0; i < n; i++)); do
        wait "${pids[$i]}" || die "$mode, $n hosts: host $i's pull failed: $(tail -n 3 "$E2E_WORK/pull-$i.out")"
        [[ $(cat "$E2E_WORK/pull-$i.out") == "$image_bytes" ]] || die "host $i got $(cat "$E2E_WORK/pull-$i.out") bytes, not $image_bytes"
    done
    end=$(date +%s.%N)
    sleep 0.2
    after=$(cat "$E2E_WORK/upstream-bytes")
    local wall upstream_x
    wall=$(python3 -c "print(f'{$end - $start:.2f}')")
    upstream_x=$(python3 -c "print(f'{($after - $before) / $image_bytes:.2f}')")
    printf 'mirror\t%s\t%s\t%s\twall\t%s\n' "$n" "$round" "$mode" "$wall" >>"$out"
    printf 'mirror\t%s\t%s\t%s\tupstream\t%s\n' "$n" "$round" "$mode" "$upstream_x" >>"$out"
    say "round $round, $n hosts, $mode: $wall s, registry sent ${upstream_x}x the image"
    if [[ $mode != direct ]]; then
        mirrors_stop
    fi
}

for ((round = 1; round <= rounds; round++)); do
    for n in $hosts_list; do
        # Alternating which goes first, so drift hits both alike.
        if ((round % 2)); then
            pull_all cooperative "$n" "$round"
            pull_all direct "$n" "$round"
        else
            pull_all direct "$n" "$round"
            pull_all cooperative "$n" "$round"
        fi
    done
done

python3 - "$out" <<'EOF' | tee "$out.md"
import statistics
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
values = {}
for _, n, _, mode, metric, v in rows:
    values.setdefault((int(n), metric, mode), []).append(float(v))
print("| hosts | direct s | cooperative s | cooperative / direct | registry bytes, direct | registry bytes, cooperative |")
print("|---|---|---|---|---|---|")
for n in sorted({k[0] for k in values}):
    d = statistics.median(values[(n, "wall", "direct")])
    c = statistics.median(values[(n, "wall", "cooperative")])
    ud = statistics.median(values[(n, "upstream", "direct")])
    uc = statistics.median(values[(n, "upstream", "cooperative")])
    print(f"| {n} | {d:.1f} | {c:.1f} | {c / d:.2f} | {ud:.2f}x | {uc:.2f}x |")
EOF
if [[ -n $chart ]]; then
    (cd "$E2E_REPO" && cargo build --release -q -p lcfs-bench --bin mirror-chart) || die "building mirror-chart failed"
    "$E2E_REPO/target/release/mirror-chart" "$out" "$chart" || die "drawing $chart failed"
    say "chart: $chart"
fi
say "results: $out (summary: $out.md)"
