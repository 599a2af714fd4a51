#!/usr/bin/env bash
# Lazy pull on lcfs (docs/lazy.md): a private registry 2.8 behind a proxy
# that counts the bytes it serves (bench/mirror/throttle.py), a private
# containerd 1.7 whose proxy snapshotter is the lcfs daemon under test
# (started with --lazy-config), and a dockerd 26 on containerd's image
# store in it. An image of busybox and a 64 MiB file, converted to eStargz
# (lcfs estargz convert) and pushed, is pulled by dockerd:
#   - the pull mounts its layer lazily (containerd skips the download) and
#     a container reads a small file: the registry serves a fraction of
#     the layer; the 64 MiB file read whole is byte for byte the image's;
#   - the registry gone, a read of a file not fetched fails with EIO after
#     fetch_timeout_ms (never hangs, never wrong data), and works once the
#     registry is back;
#   - lcfs restarted: the layer is still usable, its fetched files served
#     from the device, the others fetched; with the background fetch on,
#     the layer completes, is sealed and verifies, fsck clean;
#   - an image that is not eStargz is pulled the normal way meanwhile;
#   - through a cooperative-pull peer (a second lcfs daemon's mirror, the
#     blob's home): read through it, the registry serving the blob once;
#     with the peer gone, read from the registry;
#   - the layer's registry over HTTPS asking for a password: fetched with
#     the password from a docker config.json, or with containerd's hosts
#     configuration (server, CA, Authorization header); with a wrong
#     password, a normal pull.
E2E_NAME="lazy"
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=scripts/e2e/lib-containerd.sh
. "$E2E_DIR/lib-containerd.sh"

images=("python3" "$E2E_DIR/images.py")
require_commands python3 curl tar busybox runc jq sha256sum
e2e_init
containerd_tools docker registry

proxy_bytes() {
    cat "$E2E_WORK/proxy-bytes" 2>/dev/null || echo 0
}

# lazy_layers: the daemon's lazy layers (GET /v1/lazy on the stats socket).
lazy_layers() {
    curl -fsS --unix-socket "$(dirname "$LCFS_SOCKET")/stats.sock" http://lcfs/v1/lazy
}

# lazy_config BACKGROUND: the daemon's lazy pull configuration.
lazy_config() {
    printf 'fetch_timeout_ms = 3000\nbackground = %s\n[registries]\n"%s" = "http://127.0.0.1:%s"\n' \
        "$1" "$REGISTRY" "$PROXY_PORT" >"$E2E_WORK/lazy.toml"
}

lcfs_build
lcfs_mkfs
LCFS_CONTAINERD_SOCKET="$E2E_WORK/snapshotter.sock"
registry_start
PROXY_PORT=$(free_port) # the lazy configuration names it before the proxy starts
lazy_config false
LCFS_DAEMON_ARGS="--lazy-config $E2E_WORK/lazy.toml"
lcfs_start
containerd_start
lcfs_snapshotter_wait
say "containerd $("$CONTAINERD_BIN" --version | cut -d' ' -f3), registry $REGISTRY (proxy :$PROXY_PORT), lcfs daemon $LCFS_PID"

# --- the image -----------------------------------------------------------------------------
root="$E2E_WORK/root"
mkdir -p "$root"
"${images[@]}" busybox "$E2E_WORK/busybox-rootfs.tar"
tar -C "$root" -xf "$E2E_WORK/busybox-rootfs.tar"
mkdir -p "$root/data"
head -c $((64 << 20)) /dev/urandom >"$root/data/big"
echo "small file" >"$root/data/small.txt"
echo "unread one" >"$root/data/unread-1.txt"
echo "unread two" >"$root/data/unread-2.txt"
head -c $((2 << 20)) /dev/urandom >"$root/data/pad"
big_sum=$(sha256sum <"$root/data/big" | cut -d' ' -f1)
# In this order: a read fetches ahead up to 1 MiB of the files after it,
# so the files read at different moments lie apart.
# shellcheck disable=SC2046
tar -C "$root" --no-recursion -cf "$E2E_WORK/lazy-rootfs.tar" $(cd "$root" && find . -path ./data -prune -o -print) \
    ./data ./data/small.txt ./data/big ./data/unread-1.txt ./data/pad ./data/unread-2.txt
"${images[@]}" rootfs-image "$E2E_WORK/lazy-rootfs.tar" "$E2E_WORK/lazy.tar" lazy:1
image="$REGISTRY/e2e/lazy:1"
layout="$E2E_WORK/lazy-layout"
"$LCFS_BIN" estargz convert "$E2E_WORK/lazy.tar" "$layout" --name "$image" >/dev/null ||
    die "lcfs estargz convert failed"
tar -C "$layout" -cf "$layout.tar" . || die "could not tar $layout"
manifest="$layout/blobs/sha256/$(jq -r '.manifests[0].digest | ltrimstr("sha256:")' "$layout/index.json")"
blob_size=$(jq -r '.layers[0].size' "$manifest")
quietly ctrd images import --no-unpack "$layout.tar" || die "ctr images import failed"
quietly timeout "$E2E_COMMAND_TIMEOUT" "$CTR_BIN" --address "$CONTAINERD_ADDRESS" -n "$CTRD_NAMESPACE" \
    images push --plain-http "$image" || die "pushing $image failed"
quietly ctrd images rm --sync "$image" || die "ctr images rm failed"
# A plain (tar+gzip) image beside it.
"${images[@]}" busybox-image "$E2E_WORK/busybox.tar" busybox:1
registry_push "$E2E_WORK/busybox.tar" e2e/busybox:1
say "eStargz image $image: one layer of $((blob_size >> 10)) KiB"

# --- pull and first reads -----------------------------------------------------------------------
throttle_start 4096 "$E2E_WORK/proxy-bytes" "$PROXY_PORT"
docker26_start l lcfs
d() { docker26 l "$@"; }
start=$(date +%s%N)
quietly d pull "$image" || fail "docker pull $image failed"
say "pulled in $((($(date +%s%N) - start) / 1000000)) ms, $(proxy_bytes) bytes from the registry"
layers=$(lazy_layers) || fail "GET /v1/lazy failed"
expect "the layer is mounted lazily" 1 "$(jq length <<<"$layers")"
jq -e '.[0].absent_blocks > 16000 and .[0].complete == false' <<<"$layers" >/dev/null ||
    fail "the lazy layer after the pull: $layers"
expect "a container reads a small file" "small file" \
    "$(d run --rm --network none "$image" cat /data/small.txt)"
fetched=$(proxy_bytes)
say "pull and first run: $fetched bytes from the registry, of a $blob_size-byte layer"
((fetched < blob_size / 4)) || fail "the pull and a small read fetched $fetched of $blob_size bytes"
expect "the 64 MiB file read whole is the image's" "$big_sum" \
    "$(d run --rm --network none "$image" sha256sum /data/big | cut -d' ' -f1)"
quietly d pull "$REGISTRY/e2e/busybox:1" || fail "docker pull of the plain image failed"
expect "a plain image is pulled the normal way" "hello|1" "$( {
    d run --rm --network none "$REGISTRY/e2e/busybox:1" echo hello
    lazy_layers | jq length
} | paste -sd '|')"

# --- the registry away ----------------------------------------------------------------------------
throttle_stop
start=$SECONDS
out=$(d run --rm --network none "$image" cat /data/unread-1.txt 2>&1) &&
    fail "a read of an unfetched file succeeded with the registry away: $out"
waited=$((SECONDS - start))
[[ $out == *"Input/output error"* ]] || fail "the read without the registry: $out (expected an I/O error)"
((waited < 60)) || fail "the read without the registry took $waited s (fetch_timeout_ms is 3000)"
say "ok: without the registry, the read failed with EIO after $waited s"
throttle_start 4096 "$E2E_WORK/proxy-bytes" "$PROXY_PORT"
expect "the same read once the registry is back" "unread one" \
    "$(d run --rm --network none "$image" cat /data/unread-1.txt)"

# --- lcfs restarted -----------------------------------------------------------------------------------
dockerd_stop l
lcfs_stop
lazy_config true
lcfs_start
lcfs_snapshotter_wait
docker26_start l lcfs
expect "after a restart: a file fetched before" "small file" \
    "$(d run --rm --network none "$image" cat /data/small.txt)"
expect "after a restart: a file not fetched before" "unread two" \
    "$(d run --rm --network none "$image" cat /data/unread-2.txt)"
for _ in $(seq 600); do
    [[ $(lazy_layers | jq -r '.[0].complete') == true ]] && break
    sleep 0.1
done
[[ $(lazy_layers | jq -r '.[0].complete') == true ]] ||
    fail "the background fetch did not complete the layer in 60 s: $(lazy_layers)"
say "the background fetch completed the layer: $(lazy_layers | jq -c '.[0] | {blocks, absent_blocks, fetched_bytes}')"
expect "lcfs lazy: the layer is complete" "complete 0" \
    "$(lcfs_ctl lazy --json | jq -r '.[0] | "\(if .complete then "complete" else "lazy" end) \(.absent_blocks)"')"
lcfs_ctl lazy
quietly lcfs_ctl verify --all || fail "lcfs verify --all failed"
quietly lcfs_ctl fsck --online || fail "fsck found problems"
expect "the completed layer still reads right" "$big_sum" \
    "$(d run --rm --network none "$image" sha256sum /data/big | cut -d' ' -f1)"

# --- through a cooperative-pull peer -------------------------------------------------------------------
# A second lcfs daemon serves the registry mirror (docs/mirror.md); the
# daemon under test serves one too, both peers, its port picked so that
# the lazy layer's blob has its home at the other. The image pulled again
# is mounted lazily through that home: it passes the first ranges on from
# the registry and fetches the blob whole once; the reads after that cost
# the registry nothing; with the home gone, reads go to the registry.
quietly d image rm "$image" || fail "docker image rm failed"
dockerd_stop l
lcfs_stop
lazy_config false
peer_upstream() { printf '[upstreams]\n"%s" = "http://127.0.0.1:%s"\n' "$REGISTRY" "$PROXY_PORT"; }
mirrors_start 1 "$REGISTRY" 512 "" peer_upstream
home="127.0.0.1:${MIRROR_PORTS[0]}"
blob_hex=$(jq -r '.layers[0].digest | ltrimstr("sha256:")' "$manifest")
# This host's mirror address: a free loopback address and port whose
# rendezvous score (docs/mirror.md, "Where a blob comes from") for the
# blob is below the peer's.
me=$(python3 -c 'import hashlib, random, socket, sys
score = lambda p: hashlib.sha256(p.encode() + b"\0" + sys.argv[2].encode()).digest()[:8]
for _ in range(100000):
    s = socket.socket()
    s.bind(("127.%d.%d.%d" % (random.randrange(256), random.randrange(256), random.randrange(1, 255)), 0))
    me = "%s:%d" % s.getsockname()
    s.close()
    if score(me) < score(sys.argv[1]):
        print(me)
        break' "$home" "$blob_hex")
[[ -n $me ]] || die "no address of this host leaves the blob's home at the peer $home"
printf 'listen = "%s"\nself = "%s"\npeers = ["%s", "%s"]\ndefault_upstream = "%s"\n%s' \
    "$me" "$me" "$me" "$home" "$REGISTRY" "$(peer_upstream)" >"$E2E_WORK/mirror.toml"
LCFS_DAEMON_ARGS="--lazy-config $E2E_WORK/lazy.toml --mirror-config $E2E_WORK/mirror.toml"
lcfs_start
lcfs_snapshotter_wait
docker26_start l lcfs
quietly d pull "$image" || fail "docker pull $image through the peer failed"
expect "through the peer: a container reads a small file" "small file" \
    "$(d run --rm --network none "$image" cat /data/small.txt)"
layers=$(lazy_layers)
jq -e '.[0].peer_bytes > 0 and .[0].peer_bytes == .[0].fetched_bytes' <<<"$layers" >/dev/null ||
    fail "the lazy layer did not read through its home peer: $layers"
mirror_ctl 0 stats --json | jq -e '.mirror.ranges_passed >= 1' >/dev/null ||
    fail "the home passed no range on: $(mirror_ctl 0 stats --json | jq -c .mirror)"
for _ in $(seq 600); do
    [[ $(mirror_ctl 0 stats --json | jq -r .mirror.blobs_from_upstream) == 1 ]] && break
    sleep 0.1
done
expect "the home fetched the blob whole, once" 1 "$(mirror_ctl 0 stats --json | jq -r .mirror.blobs_from_upstream)"
registry_bytes=$(proxy_bytes)
expect "through the peer: the 64 MiB file read whole is the image's" "$big_sum" \
    "$(d run --rm --network none "$image" sha256sum /data/big | cut -d' ' -f1)"
expect "reads from the home's cache cost the registry nothing" "$registry_bytes" "$(proxy_bytes)"
say "through the peer: $(lazy_layers | jq -c '.[0] | {fetched_bytes, peer_bytes}'); home $(mirror_ctl 0 stats --json | jq -c '.mirror | {ranges_passed, bytes_from_upstream, bytes_to_peers}')"
mirrors_stop
expect "the home gone: a file not fetched reads from the registry" "unread two" \
    "$(d run --rm --network none "$image" cat /data/unread-2.txt)"
LCFS_DAEMON_ARGS="--lazy-config $E2E_WORK/lazy.toml"

# --- a registry that asks for a password, over HTTPS ------------------------------------------------
# The same storage behind a registry with TLS (a CA made for the run) and
# htpasswd; the lazy mount reaches it for the registry dockerd pulls from,
# with the password from a docker config.json, then with a wrong one.
quietly d image rm "$image" "$REGISTRY/e2e/busybox:1" || fail "docker image rm failed"
dockerd_stop l
secure_registry_start
secure_config() {
    local dir="$E2E_WORK/credentials"
    mkdir -p "$dir"
    (umask 077 && printf '{"auths": {"%s": {"auth": "%s"}}}\n' "$REGISTRY" \
        "$(printf 'e2e-puller:%s' "$1" | base64 -w0)" >"$dir/config.json")
    printf 'fetch_timeout_ms = 3000\n[registries."%s"]\nurl = "https://%s"\nca_file = "%s"\ndocker_config = "%s"\n' \
        "$REGISTRY" "$SECURE_REGISTRY" "$SECURE_REGISTRY_CA" "$dir/config.json" >"$E2E_WORK/lazy.toml"
}
# The same through containerd's hosts configuration (a hosts directory
# as containerd's config_path names it): the server, its CA, and the
# password as an Authorization header.
hosts_config() {
    local dir="$E2E_WORK/certs.d" host="$E2E_WORK/certs.d/${REGISTRY%:*}_${REGISTRY##*:}_"
    mkdir -p "$host"
    printf 'server = "https://%s"\nca = "%s"\n[header]\nAuthorization = "Basic %s"\n' "$SECURE_REGISTRY" \
        "$SECURE_REGISTRY_CA" "$(printf 'e2e-puller:%s' "$SECURE_REGISTRY_PASSWORD" | base64 -w0)" >"$host/hosts.toml"
    chmod 0600 "$host/hosts.toml"
    printf 'fetch_timeout_ms = 3000\nhosts_dir = "%s"\n' "$dir" >"$E2E_WORK/lazy.toml"
}
for how in right wrong hosts-dir; do
    case $how in
    right) secure_config "$SECURE_REGISTRY_PASSWORD" ;;
    wrong) secure_config wrong ;;
    hosts-dir) hosts_config ;;
    esac
    lcfs_stop
    lcfs_start
    lcfs_snapshotter_wait
    docker26_start l lcfs
    expect "$how: the image runs" "unread one" \
        "$(d run --rm --network none "$image" cat /data/unread-1.txt)"
    layers=$(lazy_layers)
    if [[ $how == wrong ]]; then
        expect "a wrong password: a normal pull, no lazy layer" 0 "$(jq length <<<"$layers")"
        grep -q 'no lazy mount (.*401' "$LCFS_LOG" || fail "the daemon log does not say why there was no lazy mount"
    else
        expect "$how: over HTTPS with a password, the layer is mounted lazily from the secure registry" \
            "https://$SECURE_REGISTRY" "$(jq -r '.[0].blob | split("/v2/")[0]' <<<"$layers")"
    fi
    quietly d image rm "$image" || fail "docker image rm failed"
    dockerd_stop l
done

# --- removal ---------------------------------------------------------------------------------------
expect "no snapshots left by docker" "" \
    "$(CTRD_NAMESPACE=docker-l ctrd snapshots --snapshotter lcfs ls | awk 'NR > 1')"
throttle_stop
containerd_stop
registry_stop
target_finish
e2e_finish "lazy pull: containerd $("$CONTAINERD_BIN" --version | cut -d' ' -f3) and dockerd $("$DOCKERD26_BIN" --version | cut -d' ' -f3 | tr -d ,) on lcfs"
