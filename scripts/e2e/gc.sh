#!/usr/bin/env bash
# Image garbage collection by policy with a real dockerd 20.10 on the lcfs
# graphdriver plugin (docs/gc.md). Ten images of 8 MiB each of their own
# (busybox plus a random file) on a small device; one runs a container, one
# has a stopped container, two are kept by a pattern (one by its second
# tag), two were started recently; the watermarks are set just under the measured use. Checks:
#   a bad policy (unknown key, low above high, a negative age) is refused
#   with the key named and the policy in force stays; the dry run plans the
#   least recently used unused images first and keeps the others for the
#   right reason; the pass removes them through dockerd until use is below
#   the low watermark, fsck is clean, and the running and stopped containers
#   still read their files byte for byte; kill -9 of lcfs during a pass,
#   then a restart: nothing in use is lost and the next pass completes,
#   an image with tags in two repositories included;
#   a container fills the device: ENOSPC, the daemon stays up, the periodic
#   pass removes unused images and writes succeed again without a restart;
#   an orphan layer (made behind dockerd's back, as a crashed pull leaves)
#   is listed, kept within its grace period and removed after it.
E2E_NAME="gc"
: "${LCFS_DEVICE_SIZE:=1G}"
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

images=("python3" "$E2E_DIR/images.py")
run=(run --rm --network none)

require_commands dockerd busybox tar python3 jq
e2e_init
lcfs_build
lcfs_mkfs
lcfs_plugin_name
policy="$E2E_WORK/gc.toml"
# Off while the images are made: passes run only when asked.
printf 'enabled = false\nmin_age_seconds = 0\n' >"$policy"
LCFS_DAEMON_ARGS="--docker-socket $E2E_WORK/d-lcfs/docker.sock --gc-config $policy"
lcfs_start
dockerd_start lcfs "$LCFS_PLUGIN"
d() { docker_cli lcfs "$@"; }

use_percent() { lcfs_ctl stats --json | jq -r '.live_bytes * 100 / .capacity_bytes | floor'; }

# make_image TAG MIB: imports busybox plus MIB MiB of random bytes of its
# own (/data/blob; its sha256 in $E2E_WORK/TAG.sha256) as TAG.
make_image() {
    local tag=$1 mib=$2 dir="$E2E_WORK/blob"
    mkdir -p "$dir/data"
    cp "$E2E_WORK/busybox.tar" "$E2E_WORK/image.tar"
    head -c $((mib << 20)) /dev/urandom >"$dir/data/blob"
    sha256sum "$dir/data/blob" | cut -d' ' -f1 >"$E2E_WORK/$tag.sha256"
    tar -rf "$E2E_WORK/image.tar" -C "$dir" data/blob
    quietly d import "$E2E_WORK/image.tar" "$tag" || die "docker import of $tag failed"
}

# --- ten images, each with 8 MiB of its own ---------------------------------------------
"${images[@]}" busybox "$E2E_WORK/busybox.tar"
for i in 0 1 2 3 4 5 6 7 8 9; do
    tag=gc$i:1
    [[ $i != 2 ]] || tag=gc-keep:1
    make_image "$tag" 8
    sleep 1.1 # distinct creation times: the order of never-used images
done
# 0 runs a container, 1 has a stopped one, 2 is kept; 3 and 4 started
# recently (4 last); 5..9 never ran: they go first, oldest first.
d run -d --network none --name running gc0:1 sleep 1000 >/dev/null || die "starting a container of gc0 failed"
d create --network none --name stopped gc1:1 sha256sum /data/blob >/dev/null || die "creating a container of gc1 failed"
quietly d "${run[@]}" gc3:1 true || die "running gc3 failed"
sleep 1.1
quietly d "${run[@]}" gc4:1 true || die "running gc4 failed"
# gc4 is kept by a pattern matching its second tag.
quietly d tag gc4:1 gc-keep:four || die "docker tag failed"
lcfs_ctl sync >/dev/null
used=$(use_percent)
say "ten images loaded; device use ${used}%"
[[ $used -ge 6 ]] || die "device use is only ${used}% after ten images; the test needs more"

# --- a bad policy: refused, the key named, the old policy kept ----------------------------
for bad in 'hihg_watermark_percent = 50' 'low_watermark_percent = 90' 'min_age_seconds = -5'; do
    printf '%s\n' "$bad" >"$policy"
    key=${bad%% =*}
    [[ $key != min_age_seconds ]] || key="key min_age_seconds"
    out=$(lcfs_ctl gc --reload 2>&1) && fail "a policy with '$bad' was accepted"
    [[ $out == *"$key"* ]] || fail "the refusal of '$bad' does not name ${key}: $out"
done
expect "the policy in force after refusals" "false 0" \
    "$(lcfs_ctl gc --dry-run --json | jq -r '.policy | "\(.enabled) \(.min_age_seconds)"')"

# --- plan: watermarks just under the use, so some images must go --------------------------
high=$((used - 1))
low=$((used - 3))
printf 'enabled = false\nmin_age_seconds = 0\nhigh_watermark_percent = %s\nlow_watermark_percent = %s\nkeep = ["gc-keep:*"]\n' \
    "$high" "$low" >"$policy"
quietly lcfs_ctl gc --reload || die "lcfs gc --reload refused a good policy"
plan=$(lcfs_ctl gc --dry-run --json)
lcfs_ctl gc --dry-run | sed 's/^/    /'
first=$(jq -r '[.remove[].image] | .[0:2] | join(" ")' <<<"$plan")
expect "least recently used unused images first" "gc5:1 gc6:1" "$first"
expect "kept, in use, stopped" "kept in-use in-use" "$(jq -r '[.keep[] | select(.image == "gc0:1" or .image == "gc1:1" or .image == "gc-keep:1")] |
    sort_by(.image) | map(.keep) | join(" ")' <<<"$plan")"
expect "kept by its second tag" "kept" \
    "$(jq -r '.keep[] | select(.image == "gc4:1" or .image == "gc-keep:four") | .keep' <<<"$plan")"
[[ $(d images -q | sort -u | wc -l) -eq 10 ]] || fail "a dry run removed images"

# --- the pass --------------------------------------------------------------------------------
report=$(lcfs_ctl gc --json)
removed=$(jq -r '[.remove[] | select(.outcome == "removed") | .image] | join(" ")' <<<"$report")
say "removed: $removed; use $(jq -r '.used_percent_before | floor' <<<"$report")% -> $(jq -r '.used_percent_after | floor' <<<"$report")%"
[[ -n $removed ]] || fail "the pass removed nothing: $report"
[[ $removed == "gc5:1"* ]] || fail "the pass did not begin with the least recently used: $removed"
jq -e --argjson low "$low" '.used_percent_after < $low' <<<"$report" >/dev/null ||
    fail "device use ended at $(jq .used_percent_after <<<"$report")%, not below $low%"
for image in $removed; do
    d image inspect "$image" >/dev/null 2>&1 && fail "$image is still in dockerd after its removal"
done
for image in gc0:1 gc1:1 gc-keep:1 gc4:1; do
    d image inspect "$image" >/dev/null 2>&1 || fail "$image was removed"
done
expect "the running container reads its file" "$(cat "$E2E_WORK/gc0:1.sha256")" \
    "$(d exec running sha256sum /data/blob | cut -d' ' -f1)"
expect "the stopped container reads its file" "$(cat "$E2E_WORK/gc1:1.sha256")" \
    "$(d start -a stopped | cut -d' ' -f1)"
fsck=$(lcfs_ctl fsck --online 2>&1) || fail "fsck after the pass: $fsck"

# --- kill -9 during a pass -------------------------------------------------------------
# Everything unused must go now (high 1%): the pass is killed once it has
# removed an image; after a restart nothing in use is lost and the next
# pass completes. Five more images make the pass long enough to be cut.
for i in 13 14 15 16 17; do
    make_image "gc$i:1" 8
done
# An image tagged three times, in two repositories: dockerd refuses to
# remove it by id without force; the pass removes each tag, then it.
quietly d tag gc13:1 gc13:extra && quietly d tag gc13:1 other/gc13:1 || die "docker tag failed"
printf 'enabled = false\nmin_age_seconds = 0\nhigh_watermark_percent = 1\nlow_watermark_percent = 0\nkeep = ["gc-keep:*"]\n' >"$policy"
quietly lcfs_ctl gc --reload || die "lcfs gc --reload refused a good policy"
lcfs_gc_kill9_mid_pass
say "killed the pass after: $GC_REMOVED_BEFORE_KILL"
dockerd_stop lcfs
lcfs_start
dockerd_start lcfs "$LCFS_PLUGIN"
d start running >/dev/null 2>&1 || true
expect "after restarts: images named by dockerd at once" "docker" \
    "$(lcfs_ctl top images --json | jq -r '.[] | select(.name == "gc0:1") | .owner')"
report=$(lcfs_ctl gc --json)
say "the pass after kill -9: removed $(jq -c '[.remove[] | "\(.image) \(.outcome)"]' <<<"$report"); kept $(jq -c '[.keep[] | "\(.image) \(.keep)"]' <<<"$report")"
jq -e '[.remove[] | select(.outcome != "removed" and .outcome != "gone")] | length == 0' <<<"$report" >/dev/null ||
    fail "the pass after kill -9 did not complete: $report"
expect "images left: in use, stopped, kept" "gc-keep:1 gc-keep:four gc0:1 gc1:1 gc4:1" \
    "$(d images --format '{{.Repository}}:{{.Tag}}' | sort | paste -sd' ')"
expect "after kill -9: the stopped container reads its file" "$(cat "$E2E_WORK/gc1:1.sha256")" \
    "$(d start -a stopped | cut -d' ' -f1)"
expect "after kill -9: a new container of gc0 reads its file" "$(cat "$E2E_WORK/gc0:1.sha256")" \
    "$(d "${run[@]}" gc0:1 sha256sum /data/blob | cut -d' ' -f1)"

# --- a full device ----------------------------------------------------------------------
# Three unused images (64 MiB each), then a container writes until the
# device is full:
# the write fails with ENOSPC, the daemon stays up, its periodic pass
# (enabled now, triggered by the watermark within seconds) removes the
# unused images through dockerd, and writes succeed again, no restart.
for i in 10 11 12; do
    make_image "gc$i:1" 64
done
# With the mount's writeback cache a write lands in the page cache and the
# device's ENOSPC comes back at fsync (or close), as on other writeback
# file systems without reservations: dd syncs.
out=$(d run --network none --name filler gc0:1 \
    dd if=/dev/urandom of=/fill bs=1048576 count=4000 conv=fsync 2>&1) || true
[[ $out == *"No space left on device"* ]] || fail "filling the device did not end in ENOSPC: $out"
lcfs_alive_or_die() { kill -0 "$LCFS_PID" 2>/dev/null || die "the lcfs daemon died on a full device"; }
lcfs_alive_or_die
say "device full: $(use_percent)% in use"
# The collector is turned on once the writer has stopped (else it would
# fill what the pass frees); a pass follows within seconds, the device
# being above the high watermark.
printf 'enabled = true\ninterval_seconds = 3600\nmin_age_seconds = 0\nhigh_watermark_percent = 90\nlow_watermark_percent = 70\nkeep = ["gc-keep:*"]\n' >"$policy"
quietly lcfs_ctl gc --reload || die "lcfs gc --reload refused a good policy"
for _ in $(seq 60); do
    d image inspect gc12:1 >/dev/null 2>&1 || break
    sleep 0.5
done
for i in 10 11 12; do
    d image inspect "gc$i:1" >/dev/null 2>&1 && fail "the periodic pass did not remove gc$i:1 from the full device"
done
expect "writes succeed again once the pass gave space back" "ok" \
    "$(d "${run[@]}" gc0:1 sh -c 'head -c 8388608 /dev/urandom > /again && echo ok')"
expect "the running container still reads its file" "$(cat "$E2E_WORK/gc0:1.sha256")" \
    "$(d exec running sha256sum /data/blob | cut -d' ' -f1)"
quietly d rm -f filler || fail "removing the filling container failed"
printf 'enabled = false\n' >"$policy"
quietly lcfs_ctl gc --reload || die "lcfs gc --reload refused a good policy"

# --- orphans -----------------------------------------------------------------------------
printf 'enabled = false\nremove_orphans = true\norphan_grace_seconds = 3\nhigh_watermark_percent = 99\nlow_watermark_percent = 98\n' >"$policy"
quietly lcfs_ctl gc --reload || die "lcfs gc --reload refused a good policy"
quietly lcfs_ctl layer create --cold stray || die "lcfs layer create stray failed"
listed=$(lcfs_ctl gc --orphans --dry-run --json)
expect "an orphan within its grace period" "stray false" \
    "$(jq -r '.orphans[] | select(.layer == "stray") | "\(.layer) \(.past_grace)"' <<<"$listed")"
# Any other orphan is what the pass killed above left (dockerd forgot an
# image whose layers lcfs still held): past its grace period.
jq -e '[.orphans[] | select(.layer != "stray" and .past_grace == false)] | length == 0' <<<"$listed" >/dev/null ||
    fail "orphans other than the stray layer within their grace period: $listed"
say "orphans: $(jq -r '[.orphans[].layer] | join(" ")' <<<"$listed")"
report=$(lcfs_ctl gc --json)
[[ $(jq -r '.orphans[] | select(.layer == "stray") | .outcome' <<<"$report") == null ]] ||
    fail "an orphan within its grace period was touched: $report"
sleep 3.5
report=$(lcfs_ctl gc --json)
expect "the orphan past its grace period" "removed" \
    "$(jq -r '.orphans[] | select(.layer == "stray") | .outcome' <<<"$report")"
lcfs_ctl layer stat stray >/dev/null 2>&1 && fail "the orphan layer is still there"
expect "no orphans left" "0" "$(lcfs_ctl gc --orphans --dry-run --json | jq '.orphans | length')"
expect "a container still starts after the orphan pass" "ok" "$(d "${run[@]}" gc0:1 echo ok)"

e2e_finish "image garbage collection through dockerd on lcfs"
