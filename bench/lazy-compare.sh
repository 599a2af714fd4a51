#!/usr/bin/env bash
# Lazy pull against full pulls (docs/lazy.md, docs/benchmarks.md section
# 14): the time from `docker run` of an image not on the host to the
# container's first output, dockerd 26 on containerd 1.7, the registry's
# egress throttled (bench/mirror/throttle.py in front of a registry 2.8):
#   lazy            the image in eStargz, lcfs mounting it lazily (--lazy-config)
#   full-lcfs       the same image as tar+gzip, pulled whole into lcfs
#   full-overlayfs  the tar+gzip image pulled whole into containerd's overlayfs
# The image: the Debian minbase rootfs, START_MIB of files the container
# reads before it prints, and cold files up to about IMAGE_MIB in all.
#
#   sudo bash bench/lazy-compare.sh                 # 3 rounds, 500 MiB image, 20 MiB read, 100 MiB/s
#   sudo bash bench/lazy-compare.sh --rounds 1 --image-mib 200 --rate-mib 50 --background false
E2E_NAME=lazy-compare
: "${E2E_SCRATCH_SIZE:=20G}"
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../scripts/e2e/lib.sh"
# shellcheck source=scripts/e2e/lib-containerd.sh
. "$E2E_DIR/lib-containerd.sh"

rounds=3
image_mib=500
start_mib=20
rate_mib=100
background=true
out=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --image-mib) image_mib=$2; shift 2 ;;
        --start-mib) start_mib=$2; shift 2 ;;
        --rate-mib) rate_mib=$2; shift 2 ;;
        --background) background=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

images=("python3" "$E2E_DIR/images.py")
e2e_init
require_commands curl jq python3 tar
containerd_tools docker registry
lcfs_build
lcfs_mkfs
[[ -n $out ]] || out="$E2E_WORK_BASE/lazy-compare.tsv"
: >"$out"
LCFS_CONTAINERD_SOCKET="$E2E_WORK/snapshotter.sock"
registry_start
throttle_start "$rate_mib" "$E2E_WORK/proxy-bytes"
# Every pull goes through the throttle: images are named by its address.
source_host="127.0.0.1:$THROTTLE_PORT"
printf 'background = %s\n[registries]\n"%s" = "http://%s"\n' "$background" "$source_host" "$source_host" >"$E2E_WORK/lazy.toml"
LCFS_DAEMON_ARGS="--lazy-config $E2E_WORK/lazy.toml"
lcfs_start
containerd_start
lcfs_snapshotter_wait

# --- the image ---------------------------------------------------------------------------------
ensure_rootfs_tarball
root="$E2E_WORK/root"
mkdir -p "$root"
tar -C "$root" -xzf "$DEBIAN_TARBALL" 2>/dev/null || tar -C "$root" -xf "$DEBIAN_TARBALL"
mkdir -p "$root/data/start" "$root/data/cold"
for ((i = 0; i < start_mib; i++)); do head -c $((1 << 20)) /dev/urandom >"$root/data/start/f$i"; done
base_mib=$(($(du -sm "$root" | cut -f1)))
for ((i = 0; i < (image_mib - base_mib) / 8; i++)); do
    head -c $((8 << 20)) /dev/urandom >"$root/data/cold/f$i"
done
total_mib=$(du -sm "$root" | cut -f1)
tar -C "$root" -cf "$E2E_WORK/rootfs.tar" .
rm -rf "$root"
"${images[@]}" rootfs-image "$E2E_WORK/rootfs.tar" "$E2E_WORK/plain.tar" bench/plain:1 --gzip
"$LCFS_BIN" estargz convert "$E2E_WORK/plain.tar" "$E2E_WORK/esgz" --name "$REGISTRY/bench/esgz:1" >/dev/null ||
    die "lcfs estargz convert failed"
rm -f "$E2E_WORK/rootfs.tar"
registry_push "$E2E_WORK/plain.tar" bench/plain:1
# containerd shares blobs across namespaces: the pushes' copies go, so
# every pull downloads.
pushed=$("$CTR_BIN" --address "$CONTAINERD_ADDRESS" -n e2e-push images ls -q)
# shellcheck disable=SC2086
quietly "$CTR_BIN" --address "$CONTAINERD_ADDRESS" -n e2e-push images rm --sync $pushed
tar -C "$E2E_WORK/esgz" -cf "$E2E_WORK/esgz.tar" .
quietly ctrd images import --no-unpack "$E2E_WORK/esgz.tar" || die "ctr images import failed"
quietly timeout "$E2E_COMMAND_TIMEOUT" "$CTR_BIN" --address "$CONTAINERD_ADDRESS" -n "$CTRD_NAMESPACE" \
    images push --plain-http "$REGISTRY/bench/esgz:1" || die "pushing the eStargz image failed"
quietly ctrd images rm --sync "$REGISTRY/bench/esgz:1"
blob_bytes() { # LAYOUT_MANIFEST: the layer blobs' bytes
    jq '[.layers[].size] | add' "$1"
}
esgz_manifest="$E2E_WORK/esgz/blobs/sha256/$(jq -r '.manifests[0].digest | ltrimstr("sha256:")' "$E2E_WORK/esgz/index.json")"
say "image: $total_mib MiB of files ($start_mib MiB read at start), eStargz layer $(($(blob_bytes "$esgz_manifest") >> 20)) MiB; registry egress $rate_mib MiB/s"

run_cmd=(sh -c 'cat /data/start/* > /dev/null && echo ready')
# one MODE ROUND: a fresh image store's first run of the image; records
# the seconds to its output and the registry's bytes.
one() {
    local mode=$1 round=$2 image snap=lcfs before start end got bytes
    case $mode in
        lazy) image="$source_host/bench/esgz:1" ;;
        full-lcfs) image="$source_host/bench/plain:1" ;;
        full-overlayfs) image="$source_host/bench/plain:1" snap=overlayfs ;;
    esac
    docker26_start "b$round-$mode" "$snap"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    before=$(cat "$E2E_WORK/proxy-bytes" 2>/dev/null || echo 0)
    start=$(date +%s.%N)
    got=$(docker26 "b$round-$mode" run --rm --network none "$image" "${run_cmd[@]}" 2>"$E2E_WORK/run.err" | head -n 1) || true
    end=$(date +%s.%N)
    bytes=$(($(cat "$E2E_WORK/proxy-bytes") - before))
    [[ $got == ready ]] || fail "$mode round $round: the container printed '$got': $(tail -n 3 "$E2E_WORK/run.err")"
    # The same run again, the image local and read: docker run's own floor.
    again=$(date +%s.%N)
    docker26 "b$round-$mode" run --rm --network none "$image" "${run_cmd[@]}" >/dev/null 2>&1 ||
        fail "$mode round $round: the second run failed"
    again=$(echo "$(date +%s.%N) - $again" | bc -l)
    printf '%s\t%s\t%.2f\t%s\t%.2f\n' "$mode" "$round" "$(echo "$end - $start" | bc -l)" "$bytes" "$again" >>"$out"
    say "$mode round $round: $(echo "$end - $start" | bc -l | cut -c1-5) s, $((bytes >> 20)) MiB from the registry; again $(printf '%.2f' "$again") s"
    quietly docker26 "b$round-$mode" image rm -f "$image" || true
    dockerd_stop "b$round-$mode"
}

for ((round = 1; round <= rounds; round++)); do
    if ((round % 2)); then order=(lazy full-lcfs full-overlayfs); else order=(full-overlayfs full-lcfs lazy); fi
    for mode in "${order[@]}"; do one "$mode" "$round"; done
done

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
declare -A med
for mode in lazy full-lcfs full-overlayfs; do
    med[$mode]=$(awk -v m="$mode" '$1 == m { print $3 }' "$out" | median)
    say "$mode: median $(printf '%.2f' "${med[$mode]}") s, registry bytes $(awk -v m="$mode" '$1 == m { print $4 }' "$out" | median)"
done
say "lazy / full-lcfs $(echo "${med[lazy]} / ${med[full-lcfs]}" | bc -l | cut -c1-4), lazy / full-overlayfs $(echo "${med[lazy]} / ${med[full-overlayfs]}" | bc -l | cut -c1-4) (goal <= 0.2)"
containerd_stop
registry_stop
lcfs_stop
e2e_finish "lazy pull against full pulls"
