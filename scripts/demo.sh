#!/usr/bin/env bash
# The main job: installs what lcfs needs, builds it, makes a sparse device
# file, starts the lcfs daemon on it (one FUSE mount, a directory per layer,
# and the Docker graphdriver plugin), starts a private dockerd whose storage
# driver is that plugin, imports a small image built here (busybox-static),
# runs containers, commits one (its data is promoted, not copied), prints
# what happened and the lcfs counters, then stops both daemons cleanly and
# checks the device offline. Everything lives under
# ${LCFS_DEMO_DIR:-/var/tmp/lcfs-demo}; nothing else on the machine is
# touched (the system dockerd, if any, keeps running). Run as root.
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

bash scripts/setup.sh
echo "demo.sh: building lcfs (release)"
cargo build --release -p lcfs

lcfs=$PWD/target/release/lcfs
demo_dir=${LCFS_DEMO_DIR:-/var/tmp/lcfs-demo}
device=$demo_dir/device.img
mnt=$demo_dir/mnt
sock=$demo_dir/control.sock
plugin=lcfs-demo
plugin_sock=/run/docker/plugins/$plugin.sock
docker_sock=$demo_dir/docker.sock
mkdir -p "$demo_dir" /run/docker/plugins
daemon_pid=
dockerd_pid=

cleanup() {
    if [[ -n $dockerd_pid ]] && kill -0 "$dockerd_pid" 2>/dev/null; then
        kill -TERM "$dockerd_pid" 2>/dev/null || true
        wait "$dockerd_pid" 2>/dev/null || true
    fi
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    if mountpoint -q "$mnt" 2>/dev/null; then umount -l "$mnt" || true; fi
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }
now_ns() { date +%s%N; }
since_ms() { echo "$(( ($(now_ns) - $1) / 1000000 )) ms"; }
ctl() { "$lcfs" --control-socket "$sock" "$@"; }
d() { /usr/bin/docker -H "unix://$docker_sock" "$@"; }

step "1. a fresh 4 GiB sparse device file"
rm -f "$device"
"$lcfs" mkfs "$device" --size 4G
ls -ls "$device"

step "2. the lcfs daemon: FUSE mount $mnt, control socket $sock, Docker plugin $plugin_sock"
RUST_LOG=${RUST_LOG:-warn} "$lcfs" daemon --device "$device" --mount "$mnt" \
    --control-socket "$sock" --docker-plugin-socket "$plugin_sock" &
daemon_pid=$!
for _ in $(seq 100); do
    ctl layer ls >/dev/null 2>&1 && break
    sleep 0.1
done
ctl layer ls >/dev/null

step "3. a private dockerd ($(dockerd --version | cut -d, -f1)) with storage driver $plugin"
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

step "4. an image built here: busybox-static, docker import"
python3 scripts/e2e/images.py busybox "$demo_dir/busybox.tar"
d import "$demo_dir/busybox.tar" demo/busybox:1
d images

step "5. run a container"
start=$(now_ns)
d run --rm --network none demo/busybox:1 sh -c \
    'echo "hello from a container on lcfs"; echo "its root: $(df -h / | tail -1)"'
echo "(docker run --rm took $(since_ms "$start"))"

step "6. a container writes 32 MiB; docker commit promotes it (no second copy)"
d run --network none --name writer demo/busybox:1 sh -c \
    'head -c 33554432 /dev/urandom > /data.bin && sha256sum /data.bin > /data.sha256'
d commit writer demo/committed:1 >/dev/null
d rm writer >/dev/null
d run --rm --network none demo/committed:1 sha256sum -c /data.sha256
d images

step "7. the layers Docker made, as lcfs layers"
ctl layer ls

step "8. lcfs counters (see 'promotion')"
ctl stats

step "9. clean shutdown of dockerd and lcfs (SIGTERM), then an offline fsck"
kill -TERM "$dockerd_pid"
wait "$dockerd_pid" || true
dockerd_pid=
kill -TERM "$daemon_pid"
wait "$daemon_pid" || true
daemon_pid=
"$lcfs" fsck "$device" --verify-data
echo
echo "demo.sh: done; device left at $device, dockerd log at $demo_dir/dockerd.log"
