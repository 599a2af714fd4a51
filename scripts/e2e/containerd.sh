#!/usr/bin/env bash
# containerd on lcfs: a private containerd 1.7 whose proxy snapshotter "lcfs"
# is the snapshots service of the lcfs daemon under test, a private dockerd
# 26.1 on containerd's image store in that snapshotter, and a private
# registry 2.8 on 127.0.0.1 that every image is pulled from. The images are
# built here (scripts/e2e/images.py: busybox-static, a three-layer image with
# whiteouts, an opaque directory, hardlinks, a fifo and an xattr, the cached
# Debian minbase rootfs) and pushed with ctr. One lcfs daemon, one containerd and one
# registry serve every part; each part's time is printed at the end.
#   infrastructure  registry, containerd, pushes; pull and run on containerd's
#                   own overlayfs snapshotter (the reference for part c)
#   a. ctr          pull (timed in lcfs's statistics), run, a container that writes, its snapshot
#                   committed and checked through a fresh snapshot and a
#                   diff (computed by the lcfs differ), removal, `ctr snapshots ls`, image removal and
#                   garbage collection down to no snapshot and no lcfs layer
#   b. docker 26    pull, run, write, docker commit, run the committed
#                   image, diff, docker exec into a running container, a
#                   BuildKit build (RUN writing 64 MiB and small files,
#                   COPY; its layer diffs computed by the lcfs differ) run
#                   and checked, rm, image rm
#   c. byte for byte every file of each image (content, mode, owner, size,
#                   mtime, links, xattrs) as the lcfs snapshot shows it
#                   equals containerd's overlayfs unpack of the same image,
#                   imported (`ctr images import`, uncompressed layers) and
#                   pulled (gzip layers), each layer applied by the lcfs
#                   differ (proxy plugin lcfs-diff) inside the daemon
#   d. kill -9      the lcfs daemon killed while a container writes;
#                   restarted, containerd (not restarted) lists the same
#                   committed snapshots, runs the images, removes the dead
#                   container; fsck clean. Then the lcfs daemon, and then
#                   containerd, killed during an unpack (a pull between
#                   Prepare and Commit): the image pulled again runs and
#                   equals overlayfs's, and after containerd's garbage
#                   collection lcfs holds exactly the snapshots containerd
#                   lists
#   e. both fronts  dockerd 20.10 through the graphdriver plugin and
#                   containerd through the snapshotter, served by the same
#                   lcfs daemon at the same time
#   f. mirrors      four lcfs daemons serving the registry mirror as peers
#                   of each other, their upstream the registry over HTTPS
#                   with a password; containerd (hosts.toml) and three OCI
#                   clients pull one image at once: each blob leaves the
#                   registry once, a container runs from it
#   g. eStargz      the busybox image converted (lcfs estargz convert),
#                   imported and run, pushed, and a file read from its
#                   layer in the registry by ranges (lcfs estargz fetch)
# E2E_CONTAINERD_TARGET=overlayfs runs parts a to c on containerd's overlayfs
# snapshotter instead, which proves the checks themselves (d and e need lcfs).
# The lcfs daemon serves the snapshotter on E2E_SNAPSHOTTER_SOCKET (default: a
# socket in the work directory). Without that service the check stops with
# "snapshotter socket not found" after the infrastructure part.
E2E_NAME="containerd"
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=scripts/e2e/lib-containerd.sh
. "$E2E_DIR/lib-containerd.sh"

target=${E2E_CONTAINERD_TARGET:-lcfs}
case $target in
    lcfs | overlayfs) ;;
    *) die "E2E_CONTAINERD_TARGET must be lcfs or overlayfs, not '$target'" ;;
esac
tree=("python3" "$E2E_DIR/tree.py")
images=("python3" "$E2E_DIR/images.py")

require_commands python3 curl tar busybox runc dockerd
e2e_init
containerd_tools docker registry

# --- timing ---------------------------------------------------------------------
part_names=()
part_seconds=()
part_start=0
part() {
    part_done
    part_names+=("$1")
    part_start=$SECONDS
    say "--- $1"
}
part_done() {
    [[ ${#part_names[@]} -gt ${#part_seconds[@]} ]] || return 0
    part_seconds+=($((SECONDS - part_start)))
}
part_report() {
    local index
    part_done
    for index in "${!part_seconds[@]}"; do
        printf '%s: %4d s  %s\n' "$E2E_NAME" "${part_seconds[$index]}" "${part_names[$index]}"
    done
}

# lcfs_computed: how many diffs the lcfs differ has computed (its log lines).
lcfs_computed() {
    grep -c 'containerd diff: computed' "$LCFS_LOG" || true
}

# lcfs_applied: how many layers the lcfs differ has applied (its log lines).
lcfs_applied() {
    grep -c 'containerd diff: applied' "$LCFS_LOG" || true
}

# snapshots SNAPSHOTTER: `ctr snapshots ls` as sorted "KEY KIND" lines.
snapshots() {
    ctrd snapshots --snapshotter "$1" ls | awk 'NR > 1 { print $1, $NF }' | LC_ALL=C sort
}

# lcfs_layers_left: the lcfs layers, once the snapshotter has freed what
# containerd removed (Remove only marks a layer; Cleanup, which containerd's
# garbage collection calls, or the daemon's background pass frees it):
# waits up to 10 s for the list to empty.
lcfs_layers_left() {
    local layers waited=0
    while :; do
        layers=$(lcfs_ctl layer ls | grep -v '^NAME' || true)
        [[ -n $layers && $waited -lt 100 ]] || break
        waited=$((waited + 1))
        sleep 0.1
    done
    echo "$layers"
}

# mount_snapshot SNAPSHOTTER KEY DIR: mounts snapshot KEY at DIR the way
# containerd would for a container (the mounts the snapshotter returns).
mount_snapshot() {
    local command
    mkdir -p "$3"
    command=$(ctrd snapshots --snapshotter "$1" mounts "$3" "$2") || die "ctr snapshots mounts $2 failed"
    [[ $command == "mount "* ]] || die "unexpected mount command for snapshot $2: $command"
    bash -c "$command" || die "mounting snapshot $2 ($command) failed"
    E2E_MOUNTS+=("$3")
}

# image_manifest SNAPSHOTTER IMAGE OUT: tree.py manifest of IMAGE's root file
# system as SNAPSHOTTER unpacked it (a read-only view, as a container sees
# it before it writes). Left out: the root entry (containerd makes it) and
# directory link counts (overlayfs answers 1 for merged directories).
# OUT.root: the view's layer root by scripts/layer-root.py (docs/format.md,
# "Layer digests"); with lcfs also OUT.lcfs-root, `lcfs layer digest` of the
# view's layer.
image_manifest() {
    local snapshotter=$1 image=$2 out=$3 dir layer
    dir="$E2E_WORK/view-$snapshotter"
    mkdir -p "$dir"
    quietly ctrd images mount --snapshotter "$snapshotter" "$image" "$dir" ||
        die "ctr images mount $image ($snapshotter) failed"
    "${tree[@]}" manifest "$dir" | grep -v $'^\\.\t' |
        sed -E $'s/^([^\t]*\td\t[^\t]*\t[^\t]*\t)nlink=[0-9]+/\\1/' >"$out"
    python3 "$E2E_DIR/../layer-root.py" "$dir" >"$out.root" || die "layer-root.py $dir failed"
    if [[ $snapshotter == lcfs ]]; then
        # The view is a bind mount of its layer's directory: lcfs[/LAYER].
        layer=$(findmnt -n -o SOURCE --target "$dir" | sed -n 's|.*\[/\([^]/]*\)\]$|\1|p')
        [[ -n $layer ]] || die "no lcfs layer behind $dir ($(findmnt -n -o SOURCE --target "$dir"))"
        lcfs_ctl layer digest "$layer" --json | jq -r .root >"$out.lcfs-root" ||
            die "lcfs layer digest $layer failed"
    fi
    quietly ctrd images unmount --rm "$dir" || die "ctr images unmount $dir failed"
}

# lcfs_agrees LABEL: containerd's garbage collection run (a removed
# snapshot marks the snapshotter for cleanup, a synchronous lease removal
# runs it), then, within 20 s, lcfs holds exactly one layer per snapshot
# containerd lists: nothing containerd committed is missing, nothing it does
# not know is left.
lcfs_agrees() {
    local label=$1 snaps layers waited=0 lease before
    before=$(lcfs_ctl layer ls | grep -vc '^NAME' || true)
    quietly ctrd snapshots --snapshotter lcfs prepare gc-trigger ||
        die "$label: preparing a snapshot to trigger garbage collection failed"
    quietly ctrd snapshots --snapshotter lcfs rm gc-trigger || die "$label: removing gc-trigger failed"
    lease=$(ctrd leases create | awk '{ print $1 }') || die "$label: ctr leases create failed"
    quietly ctrd leases rm --sync "$lease" || die "$label: ctr leases rm --sync failed"
    while :; do
        snaps=$(snapshots lcfs | wc -l)
        layers=$(lcfs_ctl layer ls | grep -vc '^NAME' || true)
        [[ $snaps != "$layers" && $waited -lt 200 ]] || break
        waited=$((waited + 1))
        sleep 0.1
    done
    expect "$label: lcfs holds one layer per snapshot containerd lists" "$snaps" "$layers"
    say "$label: $before lcfs layers before containerd's garbage collection, $layers after"
}

# unpack_then_kill WHAT: removes the Debian image, pulls it again into lcfs
# in the background and kills WHAT (lcfs or containerd) with SIGKILL as soon
# as its layer's unpack snapshot exists (between Prepare and Commit, while
# the differ applies the layer); restarts it, removes what the failed pull
# left (its lease: a pull that dies with containerd keeps it), pulls and runs
# the image, checks it file by file, and checks that containerd and lcfs
# agree, fsck clean.
unpack_then_kill() {
    local what=$1 pull_pid waited=0 lease
    quietly ctrd images rm --sync "$debian" || die "ctr images rm $debian failed"
    ctrd images pull --plain-http --snapshotter lcfs "$debian" >"$E2E_WORK/pull-$what.log" 2>&1 &
    pull_pid=$!
    until snapshots lcfs | grep -q '^extract-.* Active$'; do
        waited=$((waited + 1))
        [[ $waited -lt 600 ]] || die "no unpack of $debian began within 60 s"
        sleep 0.05
    done
    case $what in
        lcfs) lcfs_kill9 ;;
        containerd)
            kill -KILL "$CONTAINERD_PID"
            wait "$CONTAINERD_PID" 2>/dev/null || true
            CONTAINERD_PID=""
            ;;
    esac
    if wait "$pull_pid"; then
        fail "kill -9 of $what during an unpack: the pull finished first (nothing was tested)"
    fi
    case $what in
        lcfs) lcfs_start && lcfs_snapshotter_wait ;;
        containerd) containerd_start ;;
    esac
    for lease in $(ctrd leases ls -q); do
        quietly ctrd leases rm --sync "$lease" || fail "removing lease $lease after the kill failed"
    done
    # containerd's client of the snapshotter answers with its last dial
    # error ("connection refused", unavailable) until its reconnect
    # backoff ends, though lcfs is back: such a pull is tried again.
    for try in 1 2 3 4 5 6; do
        out=$(ctrd images pull --plain-http --snapshotter lcfs "$debian" 2>&1) && break
        [[ $out == *unavailable* && $try -lt 6 ]] || {
            printf '%s\n' "$out" >&2
            die "pulling $debian again after kill -9 of $what failed"
        }
        sleep 2
    done
    expect "kill -9 of $what during an unpack: the image pulled again runs" "12" \
        "$(ctrd run --rm --snapshotter lcfs "$debian" after-unpack cut -d. -f1 /etc/debian_version)"
    image_manifest lcfs "$debian" "$E2E_WORK/debian.after-unpack-$what.manifest"
    if cmp -s "$E2E_WORK/debian.overlayfs.manifest" "$E2E_WORK/debian.after-unpack-$what.manifest"; then
        say "ok: kill -9 of $what during an unpack: the Debian image pulled again equals overlayfs's"
    else
        fail "kill -9 of $what during an unpack: the Debian image pulled again differs from overlayfs"
    fi
    lcfs_agrees "kill -9 of $what during an unpack"
    quietly lcfs_ctl fsck --online || fail "fsck after kill -9 of $what during an unpack found problems"
}

lcfs_build
lcfs_mkfs
lcfs_plugin_name
LCFS_CONTAINERD_SOCKET=${E2E_SNAPSHOTTER_SOCKET:-$E2E_WORK/snapshotter.sock}
mkdir -p "$(dirname "$LCFS_CONTAINERD_SOCKET")"
# The garbage collector runs only when asked (at the end, through containerd).
gc_policy="$E2E_WORK/gc.toml"
echo 'enabled = false' >"$gc_policy"
LCFS_DAEMON_ARGS="--gc-config $gc_policy"

# mirror_part: four more lcfs daemons, each serving the registry mirror
# (docs/mirror.md) with the other three as peers; containerd pulls the
# Debian image through the first (hosts.toml), plain OCI clients through
# the others, all at once. The mirrors' upstream for $REGISTRY is the same
# storage served over HTTPS with a password (secure_registry_start): each
# mirror logs in with credentials of its own (mirror 0 from a docker
# config.json, the others from a password file), containerd and the
# clients have none. Each blob must reach every host whole while the
# registry serves it about once, and a container must run from the image
# containerd pulled.
mirror_upstream() {
    local i=$1 dir="$E2E_WORK/mirror-credentials"
    mkdir -p "$dir"
    echo "[upstreams.\"$REGISTRY\"]"
    echo "url = \"https://$SECURE_REGISTRY\""
    echo "ca_file = \"$SECURE_REGISTRY_CA\""
    if [[ $i == 0 ]]; then
        (umask 077 && printf '{"auths": {"%s": {"auth": "%s"}}}\n' "$REGISTRY" \
            "$(printf 'e2e-puller:%s' "$SECURE_REGISTRY_PASSWORD" | base64 -w0)" >"$dir/config.json")
        echo "docker_config = \"$dir/config.json\""
    else
        # A file per mirror: one shared file, rewritten for the next
        # mirror's configuration, was empty while a started mirror read it.
        (umask 077 && echo "$SECURE_REGISTRY_PASSWORD" >"$dir/password.$i")
        echo "username = \"e2e-puller\""
        echo "password_file = \"$dir/password.$i\""
    fi
}

mirror_part() {
    local i reg_log before
    secure_registry_start
    reg_log="$E2E_WORK/registry-secure/registry.log"
    expect "the HTTPS registry refuses a pull without credentials" 401 \
        "$(curl -s -o /dev/null -w '%{http_code}' --cacert "$SECURE_REGISTRY_CA" "https://$SECURE_REGISTRY/v2/e2e/debian/manifests/1")"
    mirrors_start 4 "$REGISTRY" 512 "" mirror_upstream
    mkdir -p "$E2E_WORK/hosts.d/$REGISTRY"
    cat >"$E2E_WORK/hosts.d/$REGISTRY/hosts.toml" <<EOF
server = "http://$REGISTRY"
[host."http://127.0.0.1:${MIRROR_PORTS[0]}"]
  capabilities = ["pull", "resolve"]
EOF
    # containerd fetches what its content store lacks: nothing of the
    # image may be left there, in any namespace (the images are gone from
    # this one since part e; the pushes' namespace still holds them), nor
    # in the store below the namespaces (a garbage collection run by a
    # synchronous lease removal deletes it).
    local ns
    for ns in "$CTRD_NAMESPACE" e2e-push; do
        "$CTR_BIN" --address "$CONTAINERD_ADDRESS" --namespace "$ns" images ls -q |
            xargs -r "$CTR_BIN" --address "$CONTAINERD_ADDRESS" --namespace "$ns" images rm >/dev/null ||
            fail "ctr images rm ($ns) failed"
        "$CTR_BIN" --address "$CONTAINERD_ADDRESS" --namespace "$ns" content ls -q |
            xargs -r "$CTR_BIN" --address "$CONTAINERD_ADDRESS" --namespace "$ns" content rm >/dev/null ||
            fail "ctr content rm ($ns) failed"
    done
    local lease
    lease=$(ctrd leases create | awk '{ print $1 }') || die "ctr leases create failed"
    quietly ctrd leases rm --sync "$lease" || die "ctr leases rm --sync failed"
    before=$(wc -l <"$reg_log")
    ctrd images pull --plain-http --hosts-dir "$E2E_WORK/hosts.d" --snapshotter lcfs "$debian" \
        >"$E2E_WORK/mirror-ctr.log" 2>&1 &
    local ctr_pid=$! client_pids=()
    for i in 1 2 3; do
        python3 "$E2E_DIR/oci-pull.py" "http://127.0.0.1:${MIRROR_PORTS[$i]}" e2e/debian 1 \
            >"$E2E_WORK/mirror-pull$i.out" 2>&1 &
        client_pids+=($!)
    done
    wait "$ctr_pid" || fail "containerd's pull through mirror 0 failed: $(tail -n 3 "$E2E_WORK/mirror-ctr.log")"
    for i in 1 2 3; do
        wait "${client_pids[$((i - 1))]}" || fail "the pull through mirror $i failed: $(tail -n 3 "$E2E_WORK/mirror-pull$i.out")"
    done
    local image_bytes served gets from_peers=0 n
    image_bytes=$(head -n 1 "$E2E_WORK/mirror-pull1.out")
    # The registry's access log: blob GETs answered since the pulls began.
    gets=$(tail -n +"$((before + 1))" "$reg_log" | grep -E '"GET /v2/e2e/debian/blobs/sha256:[0-9a-f]{64} HTTP/1.1" (200|206) ' || true)
    served=$(sed -E 's/.*HTTP\/1\.1" [0-9]+ ([0-9]+) .*/\1/' <<<"$gets" | awk '{ sum += $1 } END { print sum + 0 }')
    say "mirror: image blobs $image_bytes bytes; the registry served $(grep -c . <<<"$gets") blob GETs, $served bytes"
    expect "the registry served no blob twice for four hosts" "" \
        "$(grep -oE 'sha256:[0-9a-f]{64}' <<<"$gets" | sort | uniq -d)"
    expect "the HTTPS registry served the image's blobs (to the mirrors)" 1 "$((served >= image_bytes))"
    expect "upstream bytes at most 1.25x the image's blobs" 1 "$(python3 -c "print(int($served <= 1.25 * $image_bytes))")"
    expect "inside a container: the image pulled through the mirror" "12" \
        "$(ctrd run --rm --snapshotter lcfs "$debian" mirror-run cut -d. -f1 /etc/debian_version)"
    expect "containerd fetched the image's blobs through mirror 0" true \
        "$(mirror_ctl 0 stats --json | jq -r '.mirror.served_to_clients >= 2')"
    for i in 0 1 2 3; do
        n=$(mirror_ctl "$i" stats --json | jq -r '.mirror.blobs_from_peers')
        from_peers=$((from_peers + n))
    done
    expect "some blobs came from peers instead of the registry" 1 "$((from_peers > 0))"
    quietly ctrd images rm --sync "$debian" || fail "ctr images rm $debian failed"
    mirrors_stop
    mirror_faults
}

# estargz_part: the busybox image converted to eStargz layers
# (docs/lazy.md) is an ordinary image: ctr imports it (its layers applied
# by the lcfs differ) and runs it on lcfs.
estargz_part() {
    local name="$REGISTRY/e2e/busybox-esgz:1" layout="$E2E_WORK/busybox-esgz"
    "$LCFS_BIN" estargz convert "$E2E_WORK/busybox.tar" "$layout" --name "$name" >/dev/null ||
        die "lcfs estargz convert of the busybox image failed"
    tar -C "$layout" -cf "$layout.tar" . || die "could not tar $layout"
    quietly ctrd images import --snapshotter lcfs "$layout.tar" || fail "ctr images import of the eStargz image failed"
    expect "an eStargz image runs on lcfs" "hello from estargz" \
        "$(ctrd run --rm --snapshotter lcfs "$name" esgz-hello echo hello from estargz)"
    # Pushed to the registry, one file read from its layer there with
    # ranges only (lcfs estargz fetch), checked against the TOC digest the
    # layer's annotation carries and each chunk's.
    quietly timeout "$E2E_COMMAND_TIMEOUT" "$CTR_BIN" --address "$CONTAINERD_ADDRESS" -n "$CTRD_NAMESPACE" \
        images push --plain-http "$name" || fail "pushing the eStargz image failed"
    local manifest digest toc
    manifest="$layout/blobs/sha256/$(jq -r '.manifests[0].digest | ltrimstr("sha256:")' "$layout/index.json")"
    digest=$(jq -r '.layers[0].digest' "$manifest")
    toc=$(jq -r '.layers[0].annotations["containerd.io/snapshot/stargz/toc.digest"]' "$manifest")
    "$LCFS_BIN" estargz fetch "http://$REGISTRY/v2/e2e/busybox-esgz/blobs/$digest" bin/busybox \
        --toc-digest "$toc" -o "$E2E_WORK/busybox.fetched" 2>"$E2E_WORK/fetch.err" ||
        fail "lcfs estargz fetch failed: $(tail -n 2 "$E2E_WORK/fetch.err")"
    say "$(cat "$E2E_WORK/fetch.err")"
    expect "bin/busybox read from the registry by ranges is the image's" ok \
        "$(cmp -s "$E2E_WORK/busybox.fetched" /bin/busybox && echo ok)"
    quietly ctrd images rm --sync "$name" || fail "ctr images rm $name failed"
}

# mirror_faults: three mirrors whose upstream is the registry behind a
# 16 MiB/s throttle (bench/mirror/throttle.py), and an image of two
# random 32 MiB layers. Each layer is pulled through a mirror other than
# its home while the home is stopped (SIGSTOP: a stalled peer), and then
# while the home is killed (-9) in the middle of the blob. Both pulls get
# the right bytes; the counters show the fallbacks.
mirror_faults() {
    local digests home client blob n
    throttle_start 16 "$E2E_WORK/faults-bytes"
    quietly python3 "$E2E_REPO/bench/mirror/oci-push.py" "$REGISTRY" e2e/faults 1 --layers 2 --layer-mib 32 ||
        die "pushing e2e/faults failed"
    digests=$(curl -fsS -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
        "http://$REGISTRY/v2/e2e/faults/manifests/1" | jq -r '.layers[].digest') || die "the e2e/faults manifest"
    mirrors_start 3 "$REGISTRY" 512 "peer_timeout_ms = 1500" throttled_upstream
    local stalled killed
    stalled=$(sed -n 1p <<<"$digests")
    killed=$(sed -n 2p <<<"$digests")

    # A stalled home: the pull waits peer_timeout_ms, then the upstream.
    home=$(mirror_home "$stalled")
    client=$(((home + 1) % 3))
    kill -STOP "${MIRROR_PIDS[$home]}"
    blob=$(curl -fsS "http://127.0.0.1:${MIRROR_PORTS[$client]}/v2/e2e/faults/blobs/$stalled" | sha256sum | cut -d' ' -f1)
    kill -CONT "${MIRROR_PIDS[$home]}"
    expect "a blob whose home is stopped: right, from the upstream" "$stalled" "sha256:$blob"
    expect "the stalled home counted as a fallback" true \
        "$(mirror_ctl "$client" stats --json | jq -r '.mirror.fallbacks >= 1 and .mirror.blobs_from_upstream == 1')"

    # A home killed mid-blob: the client's stream goes on from the upstream.
    # The client is not the one that left the stalled home out for 30 s.
    local stall_client=$client c
    home=$(mirror_home "$killed")
    for c in 0 1 2; do
        if [[ $c != "$home" && $c != "$stall_client" ]]; then
            client=$c
            break
        fi
    done
    (sleep 1 && kill -KILL "${MIRROR_PIDS[$home]}") &
    local killer=$!
    n=$(mirror_ctl "$client" stats --json | jq -r '.mirror.fallbacks')
    blob=$(curl -fsS "http://127.0.0.1:${MIRROR_PORTS[$client]}/v2/e2e/faults/blobs/$killed" | sha256sum | cut -d' ' -f1)
    wait "$killer"
    wait "${MIRROR_PIDS[$home]}" 2>/dev/null || true
    umount -l "$E2E_WORK/mirror$home/mnt" 2>/dev/null || true
    expect "a blob whose home was killed mid-blob: right" "$killed" "sha256:$blob"
    expect "the killed home: part of the blob from it, the rest from the upstream" true \
        "$(mirror_ctl "$client" stats --json | jq -r --argjson n "$n" \
            '.mirror.fallbacks > $n and .mirror.bytes_from_peers > 0 and .mirror.bytes_from_peers < 33554432')"
    say "mirror faults: $(mirror_ctl "$client" stats --json | jq -c '.mirror | {fallbacks, bytes_from_peers, bytes_from_upstream}')"
    mirrors_stop
    throttle_stop
}

throttled_upstream() {
    printf '[upstreams."%s"]\nurl = "http://127.0.0.1:%s"\n' "$REGISTRY" "$THROTTLE_PORT"
}

# mirror_home DIGEST: the index of the mirror whose rendezvous score for
# DIGEST is highest (docs/mirror.md).
mirror_home() {
    python3 - "${1#sha256:}" "${MIRROR_PORTS[@]}" <<'PY'
import hashlib, sys
hexd, ports = sys.argv[1], sys.argv[2:]
score = lambda p: hashlib.sha256(f"127.0.0.1:{p}".encode() + b"\0" + hexd.encode()).digest()[:8]
print(max(range(len(ports)), key=lambda i: score(ports[i])))
PY
}


# --- infrastructure -----------------------------------------------------------------
part "infrastructure: registry, containerd, images pushed, overlayfs reference"
lcfs_start
registry_start
containerd_start
say "containerd $("$CONTAINERD_BIN" --version | cut -d' ' -f3), registry $REGISTRY, lcfs daemon $LCFS_PID"
ensure_rootfs_tarball
"${images[@]}" busybox-image "$E2E_WORK/busybox.tar" busybox:1
"${images[@]}" multilayer "$E2E_WORK/multilayer.tar"
"${images[@]}" rootfs-image "$DEBIAN_TARBALL" "$E2E_WORK/debian.tar" debian:1 --gzip
say "images built in $((SECONDS - part_start)) s"
start=$SECONDS
busybox=$REGISTRY/e2e/busybox:1
multilayer=$REGISTRY/e2e/multilayer:1
debian=$REGISTRY/e2e/debian:1
registry_push "$E2E_WORK/busybox.tar" e2e/busybox:1
registry_push "$E2E_WORK/multilayer.tar" e2e/multilayer:1
registry_push "$E2E_WORK/debian.tar" e2e/debian:1
rm -f "$E2E_WORK/debian.tar"
say "pushed in $((SECONDS - start)) s"
start=$SECONDS
for image in "$busybox" "$multilayer" "$debian"; do
    quietly ctrd images pull --plain-http --snapshotter overlayfs "$image" || die "pulling $image (overlayfs) failed"
done
say "pulled and unpacked on overlayfs in $((SECONDS - start)) s"
expect "run on overlayfs" "hello from overlayfs" \
    "$(ctrd run --rm --snapshotter overlayfs "$busybox" ref-hello echo hello from overlayfs)"
for image in multilayer debian; do
    image_manifest overlayfs "$REGISTRY/e2e/$image:1" "$E2E_WORK/$image.overlayfs.manifest"
done
say "reference manifests: $(wc -l <"$E2E_WORK/debian.overlayfs.manifest") entries (Debian)"
# The reference images leave the store: from here on, containerd's content
# store is empty and every pull fetches from the registry.
quietly ctrd images rm --sync "$busybox" "$multilayer" "$debian"
expect "overlayfs snapshots after image removal" "" "$(snapshots overlayfs)"

if [[ $target == lcfs ]]; then
    lcfs_snapshotter_wait
    say "lcfs serves containerd's snapshots API on $LCFS_CONTAINERD_SOCKET"
fi
snap=$target

# --- a. ctr ----------------------------------------------------------------------------
part "a. ctr on $snap: pull, run, write, commit, remove"
start=$SECONDS
quietly ctrd images pull --plain-http --snapshotter "$snap" "$busybox" || die "pulling $busybox ($snap) failed"
say "pulled $busybox in $((SECONDS - start)) s"
expect "ctr run" "hello from $snap" "$(ctrd run --rm --snapshotter "$snap" "$busybox" hello echo hello from "$snap")"
ctrd run --snapshotter "$snap" "$busybox" writer sh -c \
    'echo written > /written && head -c 8388608 /dev/urandom > /big && sha256sum /big > /big.sha256 && rm /etc/group' ||
    fail "the writing container failed"
if [[ $snap == lcfs ]]; then
    # Not `| grep -q`: it may exit before lcfs has printed, which then fails on EPIPE.
    [[ -n $(lcfs_ctl layer ls | grep -v '^NAME') ]] || fail "lcfs lists no layers while containerd holds snapshots"
    # Statistics (docs/statistics.md): the pull through the lcfs differ is
    # timed on the layer it filled, and both containers started from it.
    pulled=$(lcfs_ctl top layers --sort pull-time --limit 1 --json)
    jq -e '.[0].usage.applied_bytes > 100000 and .[0].usage.apply_seconds > 0 and
        .[0].usage.clones >= 2' <<<"$pulled" >/dev/null ||
        fail "the pulled busybox layer's statistics: $(jq -c '.[0].usage' <<<"$pulled")"
    # Images, named through containerd's images API; a running task counts
    # as a running container.
    quietly ctrd run -d --snapshotter lcfs "$busybox" stats-sleeper sleep 600 ||
        fail "starting a long-running task failed"
    image_rows=$(lcfs_ctl top images --json)
    expect "top images: named by containerd" "$busybox containerd" \
        "$(jq -r --arg i "$busybox" '.[] | select(.name == $i) | "\(.name) \(.owner)"' <<<"$image_rows")"
    jq -e --arg i "$busybox" '.[] | select(.name == $i) | .starts >= 3 and .running == 1 and
        .containers >= 2 and .pull_seconds > 0' <<<"$image_rows" >/dev/null ||
        fail "$busybox's image row: $(jq -c --arg i "$busybox" '.[] | select(.name == $i)' <<<"$image_rows")
$(lcfs_ctl layer ls --json | jq -c '.[] | [.name, .parent, .cold, .frozen, .usage.clones]')"
    quietly ctrd tasks kill -s KILL stats-sleeper || true
    for _ in $(seq 50); do
        ctrd tasks ls -q | grep -qx stats-sleeper || break
        sleep 0.1
    done
    quietly ctrd tasks rm -f stats-sleeper || true
    quietly ctrd containers rm stats-sleeper || fail "removing the long-running container failed"
fi
quietly ctrd snapshots --snapshotter "$snap" commit writer-committed writer || fail "ctr snapshots commit failed"
expect "committed snapshot kind" "Committed" "$(ctrd snapshots --snapshotter "$snap" info writer-committed |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["Kind"])')"
quietly ctrd snapshots --snapshotter "$snap" prepare check writer-committed || fail "ctr snapshots prepare failed"
mount_snapshot "$snap" check "$E2E_WORK/check"
expect "the committed writes, seen from a child snapshot" "written|/big: OK|no group" "$(cd "$E2E_WORK/check" && {
    cat written
    sed 's# /big# big#' big.sha256 | sha256sum -c | sed 's#^big#/big#'
    test -e etc/group || echo no group
} | paste -sd '|')"
echo "child write" >"$E2E_WORK/check/child" || fail "the child snapshot is not writable"
umount "$E2E_WORK/check"
computed_before=$(lcfs_computed)
expect "diff of the committed snapshot" "big|big.sha256|etc/|etc/.wh.group|run/|written" \
    "$(ctrd snapshots --snapshotter "$snap" diff --media-type application/vnd.oci.image.layer.v1.tar writer-committed | tar -t | LC_ALL=C sort | paste -sd '|')"
if [[ $snap == lcfs ]]; then
    expect "the lcfs differ computed that diff" 1 $(($(lcfs_computed) - computed_before))
fi
quietly ctrd snapshots --snapshotter "$snap" rm check || fail "removing the child snapshot failed"
quietly ctrd snapshots --snapshotter "$snap" rm writer-committed || fail "removing the committed snapshot failed"
quietly ctrd containers rm writer || fail "removing the container failed"
chain=$(snapshots "$snap")
expect "snapshots left: the image's one committed layer" "1 Committed" "$(echo "$chain" | awk '{ print $2 }' | uniq -c | awk '{ print $1, $2 }')"
ctrd snapshots --snapshotter "$snap" ls
quietly ctrd images rm --sync "$busybox" || fail "ctr images rm failed"
expect "no snapshots after image removal" "" "$(snapshots "$snap")"
if [[ $snap == lcfs ]]; then
    expect "no lcfs layers after image removal" "" "$(lcfs_layers_left)"
fi

# --- b. docker 26 ---------------------------------------------------------------------------
part "b. docker 26 on the containerd image store in $snap: pull, run, commit, exec, build, rm"
docker26_start c "$snap"
d() { docker26 c "$@"; }
say "$(d version --format 'dockerd {{.Server.Version}}'), storage driver $(d info --format '{{.Driver}} {{.DriverStatus}}')"
expect "docker info: the storage driver is the snapshotter" "$snap" "$(d info --format '{{.Driver}}')"
quietly d pull "$busybox" || die "docker pull $busybox failed"
expect "docker run" "hello from docker" "$(d run --rm --network none "$busybox" echo hello from docker)"
d run --network none --name writer "$busybox" sh -c \
    'echo docker wrote > /written && head -c 8388608 /dev/urandom > /big && sha256sum /big > /big.sha256 && rm /etc/group' ||
    fail "the writing container failed"
expect "docker diff" "A /big|A /big.sha256|A /written|C /etc|D /etc/group" "$(d diff writer | LC_ALL=C sort | paste -sd '|')"
quietly d commit writer e2e/committed:1 || fail "docker commit failed"
expect "run the committed image" "docker wrote|/big: OK|no group" "$(d run --rm --network none e2e/committed:1 sh -c \
    'cat /written; cd / && sha256sum -c /big.sha256; test -e /etc/group || echo no group' | paste -sd '|')"
expect "committed image: two layers" 2 "$(d image inspect e2e/committed:1 --format '{{len .RootFS.Layers}}')"
quietly d rm writer || fail "docker rm failed"
quietly d run -d --network none --name exec-target "$busybox" sleep 600 || fail "starting a container to exec into failed"
d exec exec-target sh -c 'echo written through exec > /exec-file' || fail "docker exec (write) failed"
expect "docker exec: write, then read back" "written through exec" "$(d exec exec-target cat /exec-file)"
quietly d rm -f exec-target || fail "docker rm -f failed"
build="$E2E_WORK/build"
mkdir -p "$build"
echo "copied by the build" >"$build/copied.txt"
cat >"$build/Dockerfile" <<EOF
FROM $busybox
RUN --network=none head -c 67108864 /dev/urandom > /big && sha256sum /big > /big.sha256 && \\
    mkdir /small && i=0 && while [ \$i -lt 32 ]; do echo "small \$i" > /small/f\$i; i=\$((i + 1)); done
COPY copied.txt /copied.txt
EOF
start=$SECONDS
computed_before=$(lcfs_computed)
# RUN --network is BuildKit's: the legacy builder refuses this Dockerfile.
quietly d build -t e2e/built:1 "$build" || fail "docker build (BuildKit) failed"
say "built with BuildKit in $((SECONDS - start)) s"
if [[ $snap == lcfs ]]; then
    # The RUN and COPY layers, from the engine's record of what changed.
    computed=$(($(lcfs_computed) - computed_before))
    ((computed >= 2)) || fail "the lcfs differ computed $computed of the build's layer diffs, not 2"
fi
expect "run the built image" "/big: OK|32|small 7|copied by the build" "$(d run --rm --network none e2e/built:1 sh -c \
    'cd / && sha256sum -c /big.sha256; ls /small | wc -l; cat /small/f7 /copied.txt' | paste -sd '|')"
expect "built image: three layers" 3 "$(d image inspect e2e/built:1 --format '{{len .RootFS.Layers}}')"
quietly d image rm e2e/committed:1 e2e/built:1 "$busybox" || fail "docker image rm failed"
quietly d builder prune -af || fail "docker builder prune failed"
expect "docker images after rm" "" "$(d images -q)"
dockerd_stop c
# The dockerd's namespace in containerd holds nothing once its images are gone.
leftover=$(CTRD_NAMESPACE=docker-c snapshots "$snap")
expect "no snapshots left by docker" "" "$leftover"

# --- c. byte for byte ---------------------------------------------------------------------------
part "c. byte for byte: $snap against overlayfs"
# `ctr images import` of the uncompressed `docker save` archive: with lcfs,
# containerd's unpacker applies each layer through the lcfs differ (proxy
# plugin lcfs-diff), which logs one line per layer; the walking differ
# would have untarred through the mount and left no such line.
start=$SECONDS
applied_before=$(lcfs_applied)
quietly ctrd images import --snapshotter "$snap" "$E2E_WORK/multilayer.tar" || die "ctr images import multilayer.tar ($snap) failed"
imported=$(tar -xOf "$E2E_WORK/multilayer.tar" manifest.json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["RepoTags"][0])')
[[ $imported == */* ]] || imported="library/$imported"
[[ $imported == *.*/* ]] || imported="docker.io/$imported"
if [[ $snap == lcfs ]]; then
    expect "import: the lcfs differ applied the image's 3 layers" 3 $(($(lcfs_applied) - applied_before))
fi
image_manifest "$snap" "$imported" "$E2E_WORK/multilayer-import.$snap.manifest"
if cmp -s "$E2E_WORK/multilayer.overlayfs.manifest" "$E2E_WORK/multilayer-import.$snap.manifest"; then
    say "ok: multilayer imported: all $(wc -l <"$E2E_WORK/multilayer-import.$snap.manifest") entries equal on $snap and overlayfs ($((SECONDS - start)) s)"
else
    diff -u "$E2E_WORK/multilayer.overlayfs.manifest" "$E2E_WORK/multilayer-import.$snap.manifest" | head -n 20 >&2
    fail "multilayer imported on $snap differs from overlayfs"
fi
# Removed, so the pull below unpacks its (gzip) layers afresh.
quietly ctrd images rm --sync "$imported" || fail "ctr images rm $imported failed"
expect "no snapshots after the imported image's removal" "" "$(snapshots "$snap")"
for image in multilayer debian; do
    applied_before=$(lcfs_applied)
    start=$SECONDS
    quietly ctrd images pull --plain-http --snapshotter "$snap" "$REGISTRY/e2e/$image:1" ||
        die "pulling $image ($snap) failed"
    if [[ $snap == lcfs ]] && [[ $(lcfs_applied) -le $applied_before ]]; then
        fail "pulling $image: the lcfs differ applied no layer (containerd used its walking differ)"
    fi
    image_manifest "$snap" "$REGISTRY/e2e/$image:1" "$E2E_WORK/$image.$snap.manifest"
    entries=$(wc -l <"$E2E_WORK/$image.$snap.manifest")
    if diff -u "$E2E_WORK/$image.overlayfs.manifest" "$E2E_WORK/$image.$snap.manifest" >"$E2E_WORK/$image.diff"; then
        say "ok: $image: all $entries entries equal on $snap and overlayfs ($((SECONDS - start)) s)"
        if [[ $snap == lcfs ]]; then
            expect "$image: lcfs layer digest equals layer-root.py over overlayfs's unpack" \
                "$(cat "$E2E_WORK/$image.overlayfs.manifest.root")" "$(cat "$E2E_WORK/$image.$snap.manifest.lcfs-root")"
            expect "$image: layer-root.py over lcfs's view agrees" \
                "$(cat "$E2E_WORK/$image.$snap.manifest.root")" "$(cat "$E2E_WORK/$image.$snap.manifest.lcfs-root")"
        fi
    else
        keep_artifacts "$E2E_WORK/$image.diff" "$E2E_WORK/$image.$snap.manifest" "$E2E_WORK/$image.overlayfs.manifest"
        head -n 20 "$E2E_WORK/$image.diff" >&2
        fail "$image on $snap differs from overlayfs ($(grep -c '^[-+][^-+]' "$E2E_WORK/$image.diff") lines)"
    fi
done
expect "inside a container: the multi-layer image" "$("${images[@]}" expect-multilayer)" \
    "$(ctrd run --rm --snapshotter "$snap" "$multilayer" find-data sh -c 'find /data | sort')"
expect "inside a container: Debian" "12" \
    "$(ctrd run --rm --snapshotter "$snap" "$debian" deb cut -d. -f1 /etc/debian_version)"

if [[ $target == lcfs ]]; then
    # --- d. kill -9 ---------------------------------------------------------------------------
    part "d. kill -9 of the lcfs daemon under a running container"
    committed_before=$(snapshots lcfs | grep ' Committed$')
    ctrd run -d --snapshotter lcfs "$debian" busy sh -c \
        'i=0; while :; do i=$((i+1)); head -c 65536 /dev/urandom > /tmp/f$((i % 64)); done' >/dev/null ||
        die "starting the busy container failed"
    sleep 2
    lcfs_kill9
    lcfs_start
    lcfs_snapshotter_wait
    expect "after kill -9: containerd lists the same committed snapshots" "$committed_before" \
        "$(snapshots lcfs | grep ' Committed$')"
    timeout 30 "$CTR_BIN" --address "$CONTAINERD_ADDRESS" -n "$CTRD_NAMESPACE" tasks kill -a -s KILL busy >/dev/null 2>&1
    timeout 30 "$CTR_BIN" --address "$CONTAINERD_ADDRESS" -n "$CTRD_NAMESPACE" tasks delete -f busy >/dev/null 2>&1
    quietly ctrd containers rm busy || fail "removing the container that ran through the crash failed"
    expect "after kill -9: run the images" "12|$("${images[@]}" expect-multilayer | paste -sd '|')" "$( {
        ctrd run --rm --snapshotter lcfs "$debian" after-deb cut -d. -f1 /etc/debian_version
        ctrd run --rm --snapshotter lcfs "$multilayer" after-ml sh -c 'find /data | sort'
    } | paste -sd '|')"
    image_manifest lcfs "$debian" "$E2E_WORK/debian.after-crash.manifest"
    if cmp -s "$E2E_WORK/debian.overlayfs.manifest" "$E2E_WORK/debian.after-crash.manifest"; then
        say "ok: after kill -9: the Debian image on lcfs still equals overlayfs's, file by file"
    else
        fail "after kill -9 the Debian image on lcfs differs from overlayfs"
    fi
    quietly lcfs_ctl fsck --online || fail "fsck after kill -9 found problems"

    # The same during an unpack: of the lcfs daemon, then of containerd.
    unpack_then_kill lcfs
    unpack_then_kill containerd

    # --- e. both front ends ---------------------------------------------------------------------
    part "e. dockerd 20.10 (graphdriver plugin) and containerd (snapshotter) on one lcfs daemon"
    dockerd_start g "$LCFS_PLUGIN"
    "${images[@]}" busybox "$E2E_WORK/busybox-rootfs.tar"
    quietly docker_cli g import "$E2E_WORK/busybox-rootfs.tar" busybox:graphdriver || die "docker import (20.10) failed"
    quietly ctrd images pull --plain-http --snapshotter lcfs "$busybox" || die "pulling $busybox (lcfs) failed"
    writes='for i in $(seq 200); do head -c 65536 /dev/urandom > /f; sha256sum /f > /f.sum; sha256sum -c -s /f.sum || exit 1; done; echo ok'
    docker_cli g run --rm --network none busybox:graphdriver sh -c "$writes" >"$E2E_WORK/both.docker" 2>&1 &
    docker_pid=$!
    ctrd run --rm --snapshotter lcfs "$busybox" both sh -c "$writes" >"$E2E_WORK/both.ctr" 2>&1 &
    ctr_pid=$!
    wait "$docker_pid" || fail "the dockerd 20.10 container failed: $(tail -n 3 "$E2E_WORK/both.docker")"
    wait "$ctr_pid" || fail "the containerd container failed: $(tail -n 3 "$E2E_WORK/both.ctr")"
    expect "both front ends wrote and read back at the same time" "ok|ok" \
        "$(cat "$E2E_WORK/both.docker" "$E2E_WORK/both.ctr" | paste -sd '|')"
    layers=$(lcfs_ctl layer ls | grep -vc '^NAME' || true)
    say "lcfs layers with both front ends' images: $layers"
    # The same layer tar through both front ends: both layers record its
    # digest as their DiffID, and they have one root (docs/integrity.md).
    diff_id="sha256:$(sha256sum <"$E2E_WORK/busybox-rootfs.tar" | cut -d' ' -f1)"
    roots=()
    for layer in $(lcfs_ctl layer ls --json | jq -r '.[].name'); do
        [[ $(lcfs_ctl layer stat "$layer" --json | jq -r .diff_id) == "$diff_id" ]] || continue
        roots+=("$(lcfs_ctl layer digest "$layer" --json | jq -r .root)")
    done
    expect "layers with busybox's DiffID (one through each front end)" 2 "${#roots[@]}"
    expect "busybox through dockerd 20.10 and containerd: one layer root" "${roots[0]:-}" "${roots[1]:-none}"
    # Sealed now (the sealer waits for an idle engine): every frozen layer
    # checks against its seal, and containerd's snapshot of the layer
    # (named by its chain id, here its DiffID) carries the root as a label.
    quietly lcfs_ctl verify --all || fail "lcfs verify --all failed"
    expect "containerd's busybox snapshot labels its layer root (lcfs.io/layer.root)" "${roots[0]:-}" \
        "$(ctrd snapshots --snapshotter lcfs info "$diff_id" | jq -r '.Labels["lcfs.io/layer.root"]')"
    quietly docker_cli g rmi busybox:graphdriver || fail "docker rmi (20.10) failed"
    dockerd_stop g
    # The images go through lcfs's garbage collector, which removes them
    # through containerd's images API (docs/gc.md): everything unused must
    # go, busybox under both its names. lcfs is killed (-9) as the pass
    # logs its first removal; after a restart the next pass removes the
    # rest, and containerd and lcfs agree on what is left: nothing.
    quietly ctrd images tag "$busybox" "$REGISTRY/e2e/busybox:alias" || fail "ctr images tag failed"
    # Unused for a second: removed whatever the space (the pass after the
    # restart may find the device already under the watermark, once the
    # layers the killed pass removed are freed).
    printf 'enabled = false\nmin_age_seconds = 0\nmax_unused_age_seconds = 1\nhigh_watermark_percent = 1\nlow_watermark_percent = 0\n' >"$gc_policy"
    quietly lcfs_ctl gc --reload || fail "lcfs gc --reload failed"
    plan=$(lcfs_ctl gc --dry-run --json) || fail "lcfs gc --dry-run failed"
    expect "lcfs gc plans to remove the containerd images" "$(printf '%s\n' "$busybox" "$debian" "$multilayer" | sort | paste -sd' ')" \
        "$(jq -r '[.remove[] | select(.owner == "containerd") | .image] | sort | join(" ")' <<<"$plan")"
    lcfs_gc_kill9_mid_pass
    say "killed the pass after: $GC_REMOVED_BEFORE_KILL"
    lcfs_start
    lcfs_snapshotter_wait
    report=$(lcfs_ctl gc --json) || fail "lcfs gc after the restart failed"
    jq -e '[.remove[] | select(.outcome != "removed" and .outcome != "gone")] | length == 0' <<<"$report" >/dev/null ||
        fail "the pass after kill -9 did not complete: $report"
    expect "containerd lists none of the images" "" "$(ctrd images ls -q)"
    lcfs_agrees "after a gc pass killed and the next one"
    expect "no snapshots left" "" "$(snapshots lcfs)"
    expect "no lcfs layers left" "" "$(lcfs_layers_left)"
    quietly lcfs_ctl fsck --online || fail "fsck after the killed gc pass found problems"
    # --- f. cooperative pull ----------------------------------------------------------------
    part "f. cooperative pull: four lcfs mirrors of the registry, containerd through hosts.toml"
    mirror_part
    part "g. an image converted to eStargz (lcfs estargz convert), imported and run"
    estargz_part
else
    quietly ctrd images rm --sync "$multilayer" "$debian" || fail "ctr images rm failed"
    say "parts d to g need lcfs: not run on $target"
fi

part "shutdown"
containerd_stop
registry_stop
target_finish
part_report
# The summary names the snapshotter under test.
# shellcheck disable=SC2034
E2E_TARGET=$target
e2e_finish "containerd $("$CONTAINERD_BIN" --version | cut -d' ' -f3) and dockerd $("$DOCKERD26_BIN" --version | cut -d' ' -f3 | tr -d ,) on $target"
