#!/usr/bin/env bash
# The main job: installs what lcfs needs, builds it, makes a sparse device
# file, starts the lcfs daemon on it (one FUSE mount, a directory per layer),
# builds an image layer from a host directory through the mount, starts
# "containers" as O(1) clones, changes one and commits it, then stops the
# daemon cleanly and checks the device offline. Prints what happened.
# Everything lives under ${LCFS_DEMO_DIR:-/var/tmp/lcfs-demo}; run as root.
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
cargo build --release -p lcfs -p lcfs-engine --examples --bins

lcfs=$PWD/target/release/lcfs
demo_dir=${LCFS_DEMO_DIR:-/var/tmp/lcfs-demo}
device=$demo_dir/device.img
mnt=$demo_dir/mnt
sock=$demo_dir/control.sock
source_dir=${LCFS_DEMO_SOURCE:-/usr/share/doc}
mkdir -p "$demo_dir"
daemon_pid=

cleanup() {
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

step "1. a fresh 4 GiB sparse device file"
rm -f "$device"
"$lcfs" mkfs "$device" --size 4G
ls -ls "$device"

step "2. the daemon: $mnt, control socket $sock"
RUST_LOG=${RUST_LOG:-warn} "$lcfs" daemon --device "$device" --mount "$mnt" --control-socket "$sock" &
daemon_pid=$!
for _ in $(seq 100); do
    ctl layer ls >/dev/null 2>&1 && break
    sleep 0.1
done
ctl layer ls >/dev/null

step "3. an image layer built from $source_dir through the mount"
ctl layer create image --cold
start=$(now_ns)
cp -a "$source_dir/." "$mnt/image/"
echo "the image: $(du -sh "$mnt/image" | cut -f1), $(find "$mnt/image" | wc -l) entries, copied in $(since_ms "$start")"

step "4. ten containers, each an O(1) clone of the image"
start=$(now_ns)
for i in $(seq 0 9); do ctl layer clone image "c$i"; done
echo "10 clones in $(since_ms "$start") (10 CLI processes and round trips included)"
ls "$mnt"

step "5. container c0 changes files; the image and c1 do not see it"
victim=$(find "$mnt/c0" -mindepth 1 -maxdepth 2 -type f -print -quit)
rm -f "$victim" && echo "removed ${victim#"$mnt"/} in c0; still in c1: $(test -e "$mnt/c1/${victim#"$mnt"/c0/}" && echo yes)"
echo "written in c0" > "$mnt/c0/hello.txt"
python3 -c 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)' "$mnt/c0/hello.txt"
cat "$mnt/c0/hello.txt"
if [[ -e $mnt/c1/hello.txt || -e $mnt/image/hello.txt ]]; then echo "isolation broken" >&2; exit 1; fi
echo "c1 and image: no hello.txt; $(find "$mnt/c1" | wc -l) entries in c1 as in the image"
if touch "$mnt/image/x" 2>/dev/null; then echo "the frozen image took a write" >&2; exit 1; fi
echo "writing into the frozen image: refused (read-only)"

step "6. commit c0 and start a container from it"
ctl layer commit c0
ctl layer clone c0 c0-next
cat "$mnt/c0-next/hello.txt"
ctl sync

step "7. layers and engine counters"
ctl layer ls
ctl stats

step "8. clean shutdown (SIGTERM), then an offline fsck"
kill -TERM "$daemon_pid"
wait "$daemon_pid" || true
daemon_pid=
"$lcfs" fsck "$device" --verify-data
echo
echo "demo.sh: done; device left at $device"
