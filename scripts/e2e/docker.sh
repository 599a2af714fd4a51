#!/usr/bin/env bash
# Real Docker containers on lcfs: a private dockerd 20.10 (`--experimental -s
# <plugin>`) whose every image and container layer is an lcfs layer, served
# by the graphdriver plugin of the lcfs daemon under test. Images are built
# here (scripts/e2e/images.py: busybox-static; the cached Debian minbase
# rootfs). Checks, in order:
#   import (busybox, Debian) and load (three layers with whiteouts, an opaque
#   directory, hardlinks, a fifo, a PAX xattr, a long name) and run, with the
#   output checked; the statistics of those runs (lcfs top layers, the HTTP
#   API, /metrics: starts per image, what containers read); exec; cp in and out; diff; inspect; commit of a running
#   container; a classic build (RUN steps that add, modify and delete files,
#   a COPY of a directory, one step writing 64 MiB) whose `docker save` loads
#   into a second dockerd on overlay2 with every file's content, mode, owner,
#   mtime and xattrs equal to what the lcfs mount shows (tree.py manifests);
#   the commit promoted container data instead of writing it again (lcfs
#   stats); dockerd restart with containers and images intact; kill -9 of the
#   lcfs daemon, then restart of both: images intact and runnable, fsck
#   clean; rm and rmi give the space back.
E2E_NAME="docker"
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

tree=("python3" "$E2E_DIR/tree.py")
images=("python3" "$E2E_DIR/images.py")
run=(run --rm --network none)

require_commands dockerd busybox tar python3 jq curl
e2e_init
ensure_rootfs_tarball
lcfs_build
lcfs_mkfs
lcfs_plugin_name
# The daemon asks this dockerd for image names (lcfs top images).
LCFS_DAEMON_ARGS="--docker-socket $E2E_WORK/d-lcfs/docker.sock"
lcfs_start
say "lcfs daemon $LCFS_PID serves plugin $LCFS_PLUGIN"
dockerd_start lcfs "$LCFS_PLUGIN"
d() { docker_cli lcfs "$@"; }

# lcfs_stat FILTER: one value of `lcfs stats --json` (a jq path).
lcfs_stat() {
    lcfs_ctl stats --json | jq -er "$1"
}

driver=$(d info --format '{{.Driver}}')
expect "dockerd uses the lcfs plugin" "$LCFS_PLUGIN" "$driver"
baseline=$(lcfs_stat .live_bytes)

# --- import, load, run -----------------------------------------------------------
"${images[@]}" busybox "$E2E_WORK/busybox.tar"
"${images[@]}" multilayer "$E2E_WORK/multilayer.tar"
quietly d import "$E2E_WORK/busybox.tar" busybox:e2e || die "docker import of busybox failed"
expect "run busybox" "hello from lcfs" "$(d "${run[@]}" busybox:e2e echo hello from lcfs)"

start=$SECONDS
quietly d import -c 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' "$DEBIAN_TARBALL" debian:e2e ||
    die "docker import of the Debian rootfs failed"
say "imported the Debian rootfs ($(du -h "$DEBIAN_TARBALL" | cut -f1)) in $((SECONDS - start)) s"
expect "run Debian" "12" "$(d "${run[@]}" debian:e2e sh -c 'cut -d. -f1 /etc/debian_version')"
packages=$(d "${run[@]}" debian:e2e sh -c 'dpkg-query -W | wc -l')
[[ $packages -gt 50 ]] || fail "dpkg in the Debian container lists $packages packages"

quietly d load -i "$E2E_WORK/multilayer.tar" || die "docker load of the multi-layer image failed"
expect "three layers loaded" 3 "$(d image inspect multilayer:1 --format '{{len .RootFS.Layers}}')"
expect "whiteouts, opaque dir, layers merged" "$("${images[@]}" expect-multilayer)" \
    "$(d "${run[@]}" multilayer:1 sh -c 'find /data | sort')"
expect "hardlinks" "2 2 2 2 1" "$(d "${run[@]}" multilayer:1 sh -c \
    'stat -c %h /data/keep /data/keep-link /data/pair /data/pair-link /data/replaced | tr "\n" " " | sed "s/ $//"')"
expect "replaced file: content, mode, owner" "new content 640 1001:1002" "$(d "${run[@]}" multilayer:1 sh -c \
    'printf "%s %s" "$(cat /data/replaced)" "$(stat -c "%a %u:%g" /data/replaced)"')"
expect "symlink, fifo" "keep in layer 1 p" "$(d "${run[@]}" multilayer:1 sh -c \
    'printf "%s %s" "$(cat /data/link)" "$(stat -c %A /data/fifo | cut -c1)"')"
layer_dir=$(d image inspect multilayer:1 --format '{{.GraphDriver.Data.Dir}}')
expect "PAX xattr on the lcfs layer" "test-value" \
    "$(python3 -c 'import os,sys; print(os.getxattr(sys.argv[1], "user.lcfs").decode())' "$layer_dir/data/xattr")"

# --- statistics: which images containers start from, what they read -------------------
# busybox:e2e started once above and five times here, debian:e2e twice and
# twice more; each busybox container reads the whole busybox binary through
# its own layer (docs/statistics.md). The image's top layer counts the
# starts (each container's -init layer is a clone of it); the removed
# containers' reads end up in its clone reads.
for _ in 1 2 3 4 5; do
    quietly d "${run[@]}" busybox:e2e cat /bin/busybox || fail "a busybox container failed"
done
for _ in 1 2; do
    quietly d "${run[@]}" debian:e2e cat /etc/debian_version || fail "a Debian container failed"
done
busybox_layer=$(d image inspect busybox:e2e --format '{{.GraphDriver.Data.Layer}}')
debian_layer=$(d image inspect debian:e2e --format '{{.GraphDriver.Data.Layer}}')
busybox_bytes=$(stat -c %s "$(d image inspect busybox:e2e --format '{{.GraphDriver.Data.Dir}}')/bin/busybox")
top=$(lcfs_ctl top layers --json)
expect "busybox:e2e started 6 times" 6 "$(jq --arg l "$busybox_layer" '.[] | select(.name == $l) | .usage.clones' <<<"$top")"
expect "debian:e2e started 4 times" 4 "$(jq --arg l "$debian_layer" '.[] | select(.name == $l) | .usage.clones' <<<"$top")"
expect "the most started layer is busybox:e2e's" "$busybox_layer" "$(jq -r '.[0].name' <<<"$top")"
# The layer keeps the digest of the tar dockerd applied: the image's DiffID.
expect "busybox:e2e's layer keeps its DiffID" "$(d image inspect -f '{{index .RootFS.Layers 0}}' busybox:e2e)" \
    "$(lcfs_ctl layer stat "$busybox_layer" --json | jq -r .diff_id)"
read_back=$(jq --arg l "$busybox_layer" '.[] | select(.name == $l) | .usage.clone_bytes_read' <<<"$top")
[[ $read_back -ge $((5 * busybox_bytes)) ]] ||
    fail "busybox:e2e's removed containers read $read_back bytes, expected at least 5 x $busybox_bytes"
# Every busybox container read, so each counts a start-up; the pull (docker
# import, through ApplyDiff) is timed on the image's layer.
expect "busybox:e2e's containers that started" 6 \
    "$(jq --arg l "$busybox_layer" '.[] | select(.name == $l) | .usage.clone_starts' <<<"$top")"
jq -e --arg l "$busybox_layer" '.[] | select(.name == $l) | .usage |
    .clone_startup_seconds > 0 and .clone_early_bytes_read >= .clone_bytes_read / 2 and
    .applied_bytes > 1000000 and .apply_seconds > 0' <<<"$top" >/dev/null ||
    fail "busybox:e2e's start-up or pull is not recorded: $(jq -c --arg l "$busybox_layer" '.[] | select(.name == $l) | .usage' <<<"$top")"
stats_socket="$(dirname "$LCFS_SOCKET")/stats.sock"
expect "REST: the most started layer" "$busybox_layer 6" "$(curl -sf --unix-socket "$stats_socket" \
    'http://lcfs/v1/layers?sort=clones&limit=1' | jq -r '.[0].name + " " + (.[0].usage.clones | tostring)')"
expect "metrics: busybox:e2e's starts" 1 "$(curl -sf --unix-socket "$stats_socket" http://lcfs/metrics |
    grep -c "^lcfs_layer_clones_total{layer=\"$busybox_layer\",parent=\"\"} 6\$")"
# Images, named through dockerd's API: busybox:e2e above debian:e2e, one
# container running while it runs, and what busybox containers read.
d run -d --network none --name stats-running busybox:e2e sh -c 'cat /bin/busybox >/dev/null; sleep 1000' >/dev/null
sleep 1
image_rows=$(lcfs_ctl top images --json)
expect "top images: the most started" "busybox:e2e 7 $busybox_layer docker" \
    "$(jq -r '.[0] | "\(.name) \(.starts) \(.top_layer) \(.owner)"' <<<"$image_rows")"
expect "top images: debian:e2e" "4" "$(jq '.[] | select(.name == "debian:e2e") | .starts' <<<"$image_rows")"
expect "top images: busybox:e2e running now" "1" "$(jq '.[0].running' <<<"$image_rows")"
jq -e '.[0] | .uptime_seconds >= 0 and .uptime_seconds < 120 and .pull_seconds > 0 and
    .pull_bytes > 1000000 and .startups >= 6 and .mean_startup_seconds > 0 and
    .startup_files >= 6 and .bytes_read > 0' <<<"$image_rows" >/dev/null ||
    fail "busybox:e2e's image row is incomplete: $(jq -c '.[0]' <<<"$image_rows")"
files=$(lcfs_ctl top files --image busybox:e2e --json)
expect "top files: busybox:e2e's most read" "/bin/busybox" "$(jq -r '.[0].path' <<<"$files")"
[[ $(jq '.[0].bytes' <<<"$files") -ge $((6 * busybox_bytes)) ]] ||
    fail "hot files of busybox:e2e: $(jq -c '.[0]' <<<"$files")"
lcfs_ctl top images --limit 3
lcfs_ctl top files --limit 3
expect "REST: images" "busybox:e2e" "$(curl -sf --unix-socket "$stats_socket" \
    'http://lcfs/v1/images?sort=starts&limit=1' | jq -r '.[0].name')"
expect "metrics: busybox:e2e's image series" 1 "$(curl -sf --unix-socket "$stats_socket" http://lcfs/metrics |
    grep -c "^lcfs_image_starts_total{image=\"busybox:e2e\",layer=\"$busybox_layer\"} 7\$")"
quietly d rm -f stats-running
expect "top images: none running once it is removed" "0" \
    "$(lcfs_ctl top images --json | jq '.[] | select(.name == "busybox:e2e") | .running')"
say "statistics: busybox:e2e started 6 times, its containers read $((read_back >> 10)) KiB; debian:e2e 4 times"

# --- exec, cp, diff, inspect, commit ---------------------------------------------------
cid=$(d run -d --network none --name long busybox:e2e sh -c 'echo started > /tmp/state; rm /etc/group; sleep 1000')
sleep 0.5
expect "exec" "started" "$(d exec long cat /tmp/state)"
echo "copied in" >"$E2E_WORK/in.txt"
d cp "$E2E_WORK/in.txt" long:/root/in.txt || fail "docker cp into the container failed"
expect "cp in" "copied in" "$(d exec long cat /root/in.txt)"
d cp long:/tmp/state "$E2E_WORK/out.txt" || fail "docker cp out of the container failed"
expect "cp out" "started" "$(cat "$E2E_WORK/out.txt")"
expect "diff" "A /root/in.txt|A /tmp/state|C /etc|C /root|C /tmp|D /etc/group" \
    "$(d diff long | LC_ALL=C sort | paste -sd '|')"
expect "inspect: driver" "$LCFS_PLUGIN" "$(d inspect long --format '{{.GraphDriver.Name}}')"
container_dir=$(d inspect long --format '{{.GraphDriver.Data.Dir}}')
expect "inspect: the container layer is an lcfs layer directory" "started" "$(cat "$container_dir/tmp/state")"
quietly d commit long committed:e2e || fail "docker commit failed"
expect "run the committed image" "started|copied in|no group" "$(d "${run[@]}" committed:e2e sh -c \
    'cat /tmp/state /root/in.txt; test -e /etc/group || echo no group' | paste -sd '|')"
d exec long sh -c 'echo after commit > /tmp/state' || fail "the container does not write after its commit"
expect "the committed image did not change" "started" "$(d "${run[@]}" committed:e2e cat /tmp/state)"
quietly d rm -f long

# --- classic build, save, load into overlay2 -----------------------------------------
context="$E2E_WORK/context"
mkdir -p "$context/tree/sub"
echo "a" >"$context/tree/a"
echo "b" >"$context/tree/sub/b"
chmod 600 "$context/tree/sub/b"
ln -s a "$context/tree/link"
cat >"$context/Dockerfile" <<'EOF'
FROM debian:e2e
RUN mkdir /work && echo one > /work/one && echo two > /work/two && chmod 751 /work/two && chown 12:34 /work/one
RUN rm /work/two && echo changed >> /work/one && rm -rf /usr/share/doc
COPY tree /copied
RUN head -c 67108864 /dev/urandom > /work/big && sha256sum /work/big > /work/big.sha256
RUN ln /work/one /work/one-link && mkfifo /work/fifo
EOF
bytes_before=$(lcfs_stat .device_io.write_bytes)
start=$SECONDS
DOCKER_BUILDKIT=0 quietly d build -t built:e2e "$context" || die "classic build failed"
say "classic build in $((SECONDS - start)) s"
expect "build result" "one|changed|a|b|/work/big: OK|2" "$(d "${run[@]}" built:e2e sh -c \
    'cat /work/one /copied/a /copied/sub/b; cd / && sha256sum -c /work/big.sha256; stat -c %h /work/one; test -e /work/two && echo two is back; test -e /usr/share/doc && echo doc is back' | paste -sd '|')"
promoted=$(lcfs_stat .engine.promoted_bytes)
written=$(($(lcfs_stat .device_io.write_bytes) - bytes_before))
say "build: $((written >> 20)) MiB written to the device, $((promoted >> 20)) MiB promoted from container layers"
[[ $promoted -ge $((64 << 20)) ]] || fail "the build's commits did not promote the 64 MiB the RUN step wrote (promoted $promoted bytes)"

d save -o "$E2E_WORK/built.tar" built:e2e || die "docker save failed"
dockerd_start overlay overlay2
quietly docker_cli overlay load -i "$E2E_WORK/built.tar" || die "loading the saved image into the overlay2 dockerd failed"
expect "the saved image runs on overlay2" "one|changed" "$(docker_cli overlay "${run[@]}" built:e2e cat /work/one | paste -sd '|')"
lcfs_top=$(d image inspect built:e2e --format '{{.GraphDriver.Data.Dir}}')
upper=$(docker_cli overlay image inspect built:e2e --format '{{.GraphDriver.Data.UpperDir}}')
lower=$(docker_cli overlay image inspect built:e2e --format '{{.GraphDriver.Data.LowerDir}}')
mkdir -p "$E2E_WORK/overlay-view"
mount -t overlay overlay -o "ro,lowerdir=$upper:$lower" "$E2E_WORK/overlay-view" ||
    die "mounting the overlay2 image read-only failed"
E2E_MOUNTS+=("$E2E_WORK/overlay-view")
# Left out: the root entry (Docker's view of it comes from the container
# config) and directory link counts (overlayfs answers 1 for merged ones).
comparable() { grep -v $'^\\.\t' | sed -E $'s/^([^\t]*\td\t[^\t]*\t[^\t]*\t)nlink=[0-9]+/\\1/'; }
"${tree[@]}" manifest "$lcfs_top" | comparable >"$E2E_WORK/lcfs.manifest"
"${tree[@]}" manifest "$E2E_WORK/overlay-view" | comparable >"$E2E_WORK/overlay.manifest"
entries=$(wc -l <"$E2E_WORK/lcfs.manifest")
if diff -u "$E2E_WORK/overlay.manifest" "$E2E_WORK/lcfs.manifest" >"$E2E_WORK/manifest.diff"; then
    say "ok: docker save of the lcfs build loads into overlay2 with all $entries entries equal"
else
    keep_artifacts "$E2E_WORK/manifest.diff" "$E2E_WORK/lcfs.manifest" "$E2E_WORK/overlay.manifest"
    head -n 20 "$E2E_WORK/manifest.diff" >&2
    fail "the overlay2 copy of the saved image differs from the lcfs layer ($(grep -c '^[-+][^-+]' "$E2E_WORK/manifest.diff") lines)"
fi
umount "$E2E_WORK/overlay-view"
dockerd_stop overlay

# --- size limits (--storage-opt size=) ----------------------------------------------------
# A container limited to 64 MiB that writes 100 MiB gets ENOSPC (at write or at fsync: the
# mount caches writes) with its layer holding at most 64 MiB, keeps running, and writes
# again once it deleted the file.
d run -d --name limited --network none --storage-opt size=64M busybox:e2e sh -c \
    'dd if=/dev/zero of=/f bs=1M count=100 conv=fsync 2>/dev/null && echo unlimited; echo done; sleep 1000' \
    >/dev/null
for _ in $(seq 100); do
    [[ $(d logs limited 2>&1) == *done* ]] && break
    sleep 0.2
done
expect "size limit: the 100 MiB write failed" "done" "$(d logs limited 2>&1)"
layer=$(d inspect -f '{{.GraphDriver.Data.Layer}}' limited)
held=$(lcfs_ctl layer stat "$layer" --json |
    python3 -c 'import json, sys; l = json.load(sys.stdin); print(l["quota_bytes"], l["owned_bytes"] <= l["quota_bytes"], l["owned_bytes"] >= 56 << 20)')
expect "size limit: lcfs layer stat shows it, and the layer holds 56-64 MiB" "67108864 True True" "$held"
expect "size limit: room back after rm" "written-again" "$(d exec limited sh -c \
    'rm -f /f; dd if=/dev/zero of=/g bs=1M count=32 conv=fsync 2>/dev/null && echo written-again')"
quietly d rm -f limited
expect "no size limit without --storage-opt" "unlimited" "$(d run --rm --network none busybox:e2e \
    sh -c 'dd if=/dev/zero of=/f bs=1M count=100 conv=fsync 2>/dev/null && echo unlimited')"
bad=$(d run --rm --network none --storage-opt size=abc busybox:e2e true 2>&1 || true)
[[ $bad == *'invalid size "abc"'* ]] || fail "--storage-opt size=abc: $bad"
say "ok: --storage-opt size=abc is refused: ${bad##*: }"

# --- restarts ----------------------------------------------------------------------------
d create --network none --name kept busybox:e2e sh -c 'cat /kept; echo again >> /kept' >/dev/null
d cp "$E2E_WORK/in.txt" kept:/kept
dockerd_stop lcfs
dockerd_start lcfs "$LCFS_PLUGIN"
expect "after a dockerd restart: stopped container" "copied in" "$(d start -a kept)"
expect "after a dockerd restart: docker diff" "A /kept" "$(d diff kept)"
expect "after a dockerd restart: image" "one|changed" "$(d "${run[@]}" built:e2e cat /work/one | paste -sd '|')"
d run -d --network none --name running busybox:e2e sleep 1000 >/dev/null

lcfs_kill9
dockerd_stop lcfs
lcfs_start
dockerd_start lcfs "$LCFS_PLUGIN"
expect "after kill -9 of lcfs: images" "hello|12|one|changed" "$( {
    d "${run[@]}" busybox:e2e echo hello
    d "${run[@]}" debian:e2e cut -d. -f1 /etc/debian_version
    d "${run[@]}" built:e2e cat /work/one
} | paste -sd '|')"
expect "after kill -9 of lcfs: multi-layer image" "$("${images[@]}" expect-multilayer)" \
    "$(d "${run[@]}" multilayer:1 sh -c 'find /data | sort')"
# Docker kept the container it made just before the kill: its layers must be there.
expect "after kill -9 of lcfs: the container made just before" "up" \
    "$(d start running >/dev/null && d exec running echo up)"
quietly lcfs_ctl fsck --online || fail "fsck after kill -9 found problems"

# --- rm and rmi give the space back ----------------------------------------------------------
quietly d rm -f kept running
quietly d rmi built:e2e committed:e2e multilayer:1 debian:e2e busybox:e2e
d image prune -f >/dev/null
leftover=$(d images -aq | wc -l)
expect "no images left" 0 "$leftover"
expect "no lcfs layers left" "" "$(lcfs_ctl layer ls | grep -v '^NAME' || true)"
# Removal frees a layer's blocks in the background: wait for it (bounded).
for _ in $(seq 120); do
    [[ $(lcfs_stat .removals_pending) == 0 ]] && break
    sleep 0.5
done
expect "removed layers reclaimed" 0 "$(lcfs_stat .removals_pending)"
after=$(lcfs_stat .live_bytes)
say "live bytes: $baseline before the first image, $after after rm and rmi"
[[ $after -le $((baseline + (4 << 20))) ]] ||
    fail "rm and rmi left $(((after - baseline) >> 10)) KiB live on the device"

dockerd_stop lcfs
target_finish
e2e_finish "dockerd $(dockerd --version | cut -d' ' -f3 | tr -d ,) on lcfs"
