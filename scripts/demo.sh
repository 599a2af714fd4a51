#!/usr/bin/env bash
# The main job: installs what lcfs needs, builds it, makes a sparse device
# file, starts the lcfs daemon on it (one FUSE mount, a directory per layer,
# the Docker graphdriver plugin and containerd's snapshots API), then:
#   docker      a private dockerd 20.10 whose storage driver is that plugin
#               imports a small image built here (busybox-static), runs
#               containers, commits one (its data is promoted, not copied)
#   containerd  a private containerd 1.7 with lcfs as its proxy snapshotter
#               imports the same image, runs a container on it, commits the
#               container's snapshot and shows its layers
# and prints the lcfs layers and counters, stops every daemon cleanly and
# checks the device offline. Both parts run by default; name one to run
# only it: `bash scripts/demo.sh containerd`. Everything lives under
# ${LCFS_DEMO_DIR:-/var/tmp/lcfs-demo}; nothing else on the machine is
# touched (a system dockerd or containerd, if any, keeps running). Run as
# root.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "demo.sh: run as root (it mounts a FUSE filesystem): sudo bash scripts/demo.sh" >&2
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi

parts=()
for arg in "$@"; do
    case $arg in
        docker | containerd) parts+=("$arg") ;;
        *)
            echo "demo.sh: unknown part '$arg' (expected docker and/or containerd)" >&2
            exit 2
            ;;
    esac
done
[[ ${#parts[@]} -gt 0 ]] || parts=(docker containerd)
wants() { [[ " ${parts[*]} " == *" $1 "* ]]; }

bash scripts/setup.sh --demo "${parts[@]}"
# LCFS_BIN: use this lcfs binary instead of building one (as the e2e checks).
if [[ -n ${LCFS_BIN:-} ]]; then
    lcfs=$LCFS_BIN
else
    echo "demo.sh: building lcfs (release)"
    cargo build --release -p lcfs
    lcfs=$PWD/target/release/lcfs
fi
demo_dir=${LCFS_DEMO_DIR:-/var/tmp/lcfs-demo}
device=$demo_dir/device.img
mnt=$demo_dir/mnt
sock=$demo_dir/control.sock
plugin=lcfs-demo
plugin_sock=/run/docker/plugins/$plugin.sock
docker_sock=$demo_dir/docker.sock
snapshotter_sock=$demo_dir/snapshotter.sock
containerd_sock=$demo_dir/containerd.sock
mkdir -p "$demo_dir" /run/docker/plugins
daemon_pid=
dockerd_pid=
containerd_pid=

# The containerd part needs a daemon that serves containerd's snapshots API.
containerd_service=yes
if wants containerd && [[ $("$lcfs" daemon --help) != *--containerd-socket* ]]; then
    echo "demo.sh: this lcfs does not serve containerd's snapshots API yet (no --containerd-socket); the containerd part is skipped" >&2
    containerd_service=no
fi

cleanup() {
    if [[ -n $dockerd_pid ]] && kill -0 "$dockerd_pid" 2>/dev/null; then
        kill -TERM "$dockerd_pid" 2>/dev/null || true
        wait "$dockerd_pid" 2>/dev/null || true
    fi
    if [[ -n $containerd_pid ]] && kill -0 "$containerd_pid" 2>/dev/null; then
        containerd_remove_tasks
        kill -TERM "$containerd_pid" 2>/dev/null || true
        wait "$containerd_pid" 2>/dev/null || true
    fi
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    if mountpoint -q "$mnt" 2>/dev/null; then umount -l "$mnt" || true; fi
}
trap cleanup EXIT

step_number=0
step() {
    step_number=$((step_number + 1))
    printf '\n== %d. %s\n' "$step_number" "$*"
}
now_ns() { date +%s%N; }
since_ms() { echo "$(( ($(now_ns) - $1) / 1000000 )) ms"; }
ctl() { "$lcfs" --control-socket "$sock" "$@"; }
d() { /usr/bin/docker -H "unix://$docker_sock" "$@"; }
ctrd() { "$ctr" --address "$containerd_sock" --namespace demo "$@"; }
# Removes what containerd still runs, so no shim or container outlives the demo.
containerd_remove_tasks() {
    local id
    for id in $(ctrd tasks ls -q 2>/dev/null); do
        ctrd tasks kill -a -s KILL "$id" >/dev/null 2>&1 || true
        ctrd tasks delete -f "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctrd containers ls -q 2>/dev/null); do
        ctrd containers delete "$id" >/dev/null 2>&1 || true
    done
}

step "a fresh 4 GiB sparse device file"
rm -f "$device"
"$lcfs" mkfs "$device" --size 4G
ls -ls "$device"

daemon_args=(--device "$device" --mount "$mnt" --control-socket "$sock")
serves=""
if wants docker; then
    # dockerd's API too, for image names in `lcfs top images`.
    daemon_args+=(--docker-plugin-socket "$plugin_sock" --docker-socket "$docker_sock")
    serves+=", Docker plugin $plugin_sock"
fi
if wants containerd && [[ $containerd_service == yes ]]; then
    rm -f "$snapshotter_sock"
    daemon_args+=(--containerd-socket "$snapshotter_sock")
    serves+=", containerd snapshotter $snapshotter_sock"
fi
step "the lcfs daemon: FUSE mount $mnt, control socket $sock$serves"
RUST_LOG=${RUST_LOG:-warn} "$lcfs" daemon "${daemon_args[@]}" &
daemon_pid=$!
for _ in $(seq 100); do
    ctl layer ls >/dev/null 2>&1 && break
    sleep 0.1
done
ctl layer ls >/dev/null

if wants docker; then
    step "a private dockerd ($(dockerd --version | cut -d, -f1)) with storage driver $plugin"
    rm -rf "$demo_dir/docker" "$demo_dir/exec"
    dockerd --experimental -s "$plugin" --data-root "$demo_dir/docker" --exec-root "$demo_dir/exec" \
        -H "unix://$docker_sock" -p "$demo_dir/docker.pid" \
        --iptables=false --ip6tables=false --bridge=none >"$demo_dir/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 300); do
        d version >/dev/null 2>&1 && break
        kill -0 "$dockerd_pid" || { tail "$demo_dir/dockerd.log" >&2; exit 1; }
        sleep 0.1
    done
    d info --format 'storage driver: {{.Driver}} {{.DriverStatus}}'

    step "an image built here: busybox-static, docker import"
    python3 scripts/e2e/images.py busybox "$demo_dir/busybox.tar"
    d import "$demo_dir/busybox.tar" demo/busybox:1
    d images

    step "run a container"
    start=$(now_ns)
    d run --rm --network none demo/busybox:1 sh -c \
        'echo "hello from a container on lcfs"; echo "its root: $(df -h / | tail -1)"'
    echo "(docker run --rm took $(since_ms "$start"))"

    step "a container writes 32 MiB; docker commit promotes it (no second copy)"
    d run --network none --name writer demo/busybox:1 sh -c \
        'head -c 33554432 /dev/urandom > /data.bin && sha256sum /data.bin > /data.sha256'
    d commit writer demo/committed:1 >/dev/null
    d rm writer >/dev/null
    d run --rm --network none demo/committed:1 sha256sum -c /data.sha256
    d images

    step "the layers Docker made, as lcfs layers"
    ctl layer ls
fi

if wants containerd && [[ $containerd_service == yes ]]; then
    containerd_deb=$(bash scripts/setup.sh --deb-dir containerd)
    ctr=$containerd_deb/usr/bin/ctr
    step "a private containerd ($("$containerd_deb/usr/bin/containerd" --version | cut -d' ' -f3)) with lcfs as its proxy snapshotter"
    rm -rf "$demo_dir/containerd"
    mkdir -p "$demo_dir/containerd"
    printf '%s\n' 'version = 2' \
        "root = \"$demo_dir/containerd/root\"" \
        "state = \"$demo_dir/containerd/state\"" \
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]' \
        '[grpc]' "  address = \"$containerd_sock\"" \
        '[ttrpc]' "  address = \"$containerd_sock.ttrpc\"" \
        '[plugins."io.containerd.internal.v1.opt"]' "  path = \"$demo_dir/containerd/opt\"" \
        '[proxy_plugins.lcfs]' '  type = "snapshot"' "  address = \"$snapshotter_sock\"" \
        >"$demo_dir/containerd/config.toml"
    sed 's/^/    /' "$demo_dir/containerd/config.toml"
    # Its own shim first in PATH: the system's may be another version.
    PATH="$containerd_deb/usr/bin:$PATH" "$containerd_deb/usr/bin/containerd" \
        --config "$demo_dir/containerd/config.toml" >"$demo_dir/containerd.log" 2>&1 &
    containerd_pid=$!
    for _ in $(seq 300); do
        "$ctr" --address "$containerd_sock" version >/dev/null 2>&1 && break
        kill -0 "$containerd_pid" || { tail "$demo_dir/containerd.log" >&2; exit 1; }
        sleep 0.1
    done
    for _ in $(seq 100); do
        [[ -S $snapshotter_sock ]] && break
        sleep 0.1
    done
    ctrd plugins ls | awk 'NR == 1 || $2 == "lcfs"'

    step "the busybox image, imported into containerd and unpacked by lcfs"
    python3 scripts/e2e/images.py busybox-image "$demo_dir/busybox-image.tar" demo/busybox:1
    ctrd images import --snapshotter lcfs "$demo_dir/busybox-image.tar"
    ctrd images ls -q

    step "run a container through containerd on lcfs"
    start=$(now_ns)
    ctrd run --rm --snapshotter lcfs docker.io/demo/busybox:1 hello sh -c \
        'echo "hello from a containerd container on lcfs"; echo "its root: $(df -h / | tail -1)"'
    echo "(ctr run --rm took $(since_ms "$start"))"

    step "a container writes 32 MiB; its snapshot is committed (a layer freeze, no copy)"
    ctrd run --snapshotter lcfs docker.io/demo/busybox:1 writer sh -c \
        'head -c 33554432 /dev/urandom > /data.bin && sha256sum /data.bin > /data.sha256'
    start=$(now_ns)
    ctrd snapshots --snapshotter lcfs commit writer-committed writer
    echo "(ctr snapshots commit took $(since_ms "$start"))"
    ctrd containers rm writer 2>/dev/null || true
    ctrd snapshots --snapshotter lcfs tree

    step "containerd's snapshots, as lcfs layers"
    ctl layer ls
fi

step "the images containers started from, and the files they read (lcfs top images, lcfs top files)"
ctl top images
ctl top files --limit 5

step "lcfs counters (see 'promotion')"
ctl stats

step "clean shutdown of the container daemons and lcfs (SIGTERM), then an offline fsck"
if [[ -n $dockerd_pid ]]; then
    kill -TERM "$dockerd_pid"
    wait "$dockerd_pid" || true
    dockerd_pid=
fi
if [[ -n $containerd_pid ]]; then
    containerd_remove_tasks
    kill -TERM "$containerd_pid"
    wait "$containerd_pid" || true
    containerd_pid=
fi
kill -TERM "$daemon_pid"
wait "$daemon_pid" || true
daemon_pid=
"$lcfs" fsck "$device" --verify-data
echo
echo "demo.sh: done; device left at $device, daemon logs in $demo_dir"
