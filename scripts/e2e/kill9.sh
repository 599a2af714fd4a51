#!/usr/bin/env bash
# Crash durability: what was made durable survives kill -9 of the daemon.
# Three rounds on one lcfs device; each round writes, makes durable, starts
# unsynced writes, kills the daemon with SIGKILL in the middle of them,
# restarts it and checks every durable layer and file against its manifest
# (tree.py: content hashes, modes, sizes, link counts, xattrs):
#   round 1: layer `synced` filled with fsync'd files, a 64 MiB dd
#            conv=fsync, a hardlink and xattrs, then `lcfs sync`; committed
#            and cloned into `child`, whose changes are also `lcfs sync`ed.
#   round 2: layer `fsynced` (created, then `lcfs sync`) gets files made
#            durable by fsync(2) of each file and its directory only, no
#            `lcfs sync`, and a file rewritten in place with fsync after
#            each write (the engine's fsync log): fsync alone must be
#            durable.
#   round 3: a clone of `child` made and changed and `lcfs sync`ed, while
#            `child`'s sibling layer gets unsynced writes.
# Each kill comes while a writer streams unsynced data into a scratch layer:
# whatever of it survives must be readable, nothing more is required.
# After the last kill, `lcfs fsck --verify-data` runs on the crashed device
# (opening replays the log), and again after a clean restart and shutdown.
# `sync -f` (syncfs) does not reach a FUSE daemon, so only fsync and the
# control socket's sync are used to make data durable.
E2E_NAME=kill9
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $E2E_TARGET == lcfs ]] || die "kill9 tests the lcfs daemon only (E2E_TARGET=$E2E_TARGET)"
require_commands dd jq python3
e2e_init
lcfs_build
lcfs_mkfs
# No periodic checkpoint: what survives is what was made durable, and the
# fsync records of round 2 are still the way to it when the kill comes.
LCFS_DAEMON_ARGS="--checkpoint-interval-ms 0"
lcfs_start
tree=("python3" "$E2E_DIR/tree.py")
mnt=$LCFS_MOUNT
checked=()

# remember LAYER: records LAYER's manifest as what must survive.
remember() {
    "${tree[@]}" manifest "$mnt/$1" >"$E2E_WORK/expected-$1.txt" ||
        die "could not read layer $1 to record its manifest"
    [[ " ${checked[*]} " == *" $1 "* ]] || checked+=("$1")
}

# unsynced_writer LAYER: streams data into LAYER until killed (or until the
# daemon dies under it); never fsyncs.
unsynced_writer() {
    local dir="$mnt/$1" i=0
    while [[ -d $dir ]]; do
        dd if=/dev/urandom of="$dir/stream-$i" bs=64k count=64 status=none 2>/dev/null || break
        cp -r "$mnt/synced/data/dir00" "$dir/copy-$i" 2>/dev/null || break
        i=$((i + 1))
    done
}

# crash_and_check ROUND [COMMAND]: kill -9 the daemon while a writer is busy
# (after COMMAND, if given), restart, check.
crash_and_check() {
    local round=$1 before_kill=${2:-} writer_pid
    quietly lcfs_ctl layer create "unsynced-$round" || die "lcfs layer create unsynced-$round failed"
    unsynced_writer "unsynced-$round" &
    writer_pid=$!
    sleep 2
    [[ -z $before_kill ]] || "$before_kill"
    lcfs_kill9
    wait "$writer_pid" 2>/dev/null || true
    if [[ $round == 3 ]]; then
        # The crashed device as the kill left it: opening replays the log.
        if quietly "$LCFS_BIN" fsck --verify-data "$LCFS_DEVICE"; then
            say "round $round: fsck --verify-data of the crashed device: clean"
        else
            fail "round $round: lcfs fsck --verify-data of the device right after kill -9 found problems"
        fi
    fi
    lcfs_start
    check_layers "round $round"
}

# check_layers LABEL: every remembered layer exists and matches its manifest;
# the unsynced layers that survived can be read through.
check_layers() {
    local label=$1 layer listing failures_before=$E2E_FAILURES
    listing=$(lcfs_ctl layer ls) || die "$label: lcfs layer ls failed after the restart"
    for layer in "${checked[@]}"; do
        if [[ ! -d $mnt/$layer ]] || ! grep -qw -- "$layer" <<<"$listing"; then
            fail "$label: synced layer $layer is gone after kill -9"
            continue
        fi
        if ! "${tree[@]}" manifest "$mnt/$layer" >"$E2E_WORK/actual-$layer.txt" 2>"$E2E_WORK/actual-$layer.err"; then
            tail -n 3 "$E2E_WORK/actual-$layer.err" | sed 's/^/    /' >&2
            fail "$label: layer $layer cannot be read after kill -9"
        elif ! cmp -s "$E2E_WORK/expected-$layer.txt" "$E2E_WORK/actual-$layer.txt"; then
            { diff -u "$E2E_WORK/expected-$layer.txt" "$E2E_WORK/actual-$layer.txt" || true; } |
                sed -n '3,22p' | cut -c1-250 | sed 's/^/    /' >&2
            keep_artifacts "$E2E_WORK/expected-$layer.txt" "$E2E_WORK/actual-$layer.txt"
            fail "$label: layer $layer differs from what was synced (- synced, + after kill -9)"
        fi
    done
    for layer in "$mnt"/unsynced-*; do
        [[ -d $layer ]] || continue
        if ! find "$layer" -type f -exec cat {} + >/dev/null 2>"$E2E_WORK/unsynced.err"; then
            fail "$label: the partly written $(basename "$layer") is not readable: $(head -n 1 "$E2E_WORK/unsynced.err")"
        fi
    done
    [[ $E2E_FAILURES -ne $failures_before ]] ||
        say "$label: ${#checked[@]} durable layer(s) intact after kill -9 and restart: ${checked[*]}"
}

# Round 1: lcfs sync.
quietly lcfs_ctl layer create synced || die "lcfs layer create synced failed"
"${tree[@]}" fill "$mnt/synced/data" 1 300 || die "writing files into layer synced failed"
dd if=/dev/urandom of="$mnt/synced/big" bs=1M count=64 conv=fsync status=none || die "dd into synced failed"
ln "$mnt/synced/big" "$mnt/synced/big-hardlink"
python3 -c 'import os, sys; os.setxattr(sys.argv[1], "user.kill9", b"round 1")' "$mnt/synced/big"
mkdir "$mnt/synced/empty-dir"
ln -s data/dir01 "$mnt/synced/link"
quietly lcfs_ctl sync || die "lcfs sync failed"
remember synced
quietly lcfs_ctl layer commit synced || die "lcfs layer commit synced failed"
quietly lcfs_ctl layer clone synced child || die "lcfs layer clone synced child failed"
rm -r "$mnt/child/data/dir02"
dd if=/dev/urandom of="$mnt/child/big" bs=4k count=100 seek=1000 conv=notrunc status=none
mv "$mnt/child/data/dir03" "$mnt/child/dir03-moved"
"${tree[@]}" fill "$mnt/child/more" 2 100 || die "writing files into layer child failed"
quietly lcfs_ctl sync || die "lcfs sync failed"
remember child
crash_and_check 1

# Round 2: fsync only. New files (their fsyncs checkpoint), and a file that
# existed at the last checkpoint rewritten in place, shrunk and grown, each
# step made durable by fsync(2) alone: those go to the engine's fsync log,
# replayed when the daemon restarts.
quietly lcfs_ctl layer create fsynced || die "lcfs layer create fsynced failed"
dd if=/dev/urandom of="$mnt/fsynced/db" bs=64k count=16 status=none || die "writing fsynced/db failed"
quietly lcfs_ctl sync || die "lcfs sync failed"
"${tree[@]}" fill "$mnt/fsynced/data" 3 200 || die "writing files into layer fsynced failed"
remember fsynced

# fsync_rewrite: fsynced/db rewritten in place with an fsync after each step,
# just before the kill of round 2 (whose writer it stops first).
# shellcheck disable=SC2317 # called through crash_and_check
fsync_rewrite() {
    local records_before records
    # The busy writer of crash_and_check stops first: the metadata it dirties
    # can start a checkpoint at any moment (the dirty-node limit), which
    # would make the records below obsolete before the kill, and the restart
    # would rightly replay none.
    kill "$writer_pid" 2>/dev/null || true
    wait "$writer_pid" 2>/dev/null || true
    sleep 1
    records_before=$(lcfs_ctl stats --json | jq -er .engine.fsync_records) || die "lcfs stats failed"
    python3 - "$mnt/fsynced/db" <<'PY' || die "rewriting fsynced/db with fsync failed"
import os, random, sys
fd = os.open(sys.argv[1], os.O_RDWR)
rng = random.Random(9)
for i in range(64):
    os.pwrite(fd, os.urandom(rng.randrange(1, 9000)), rng.randrange(0, 1 << 20))
    os.fsync(fd)
os.ftruncate(fd, 300_000)
os.fsync(fd)
os.pwrite(fd, b"after the shrink", 700_000)
os.fchmod(fd, 0o600)
os.fsync(fd)
os.close(fd)
PY
    records=$(($(lcfs_ctl stats --json | jq -er .engine.fsync_records) - records_before))
    ((records > 0)) || fail "no fsync of fsynced/db went to the fsync log"
    say "fsync log: $records records for 66 fsyncs of a file rewritten in place"
    remember fsynced
}
crash_and_check 2 fsync_rewrite
replayed=$(lcfs_ctl stats --json | jq -er .engine.fsync_records_replayed) || die "lcfs stats failed"
((replayed > 0)) || fail "round 2: the restart replayed no fsync records"
say "round 2: $replayed fsync records replayed at the restart"

# Round 3: clone of a clone, beside unsynced work in a sibling.
quietly lcfs_ctl layer commit child || die "lcfs layer commit child failed"
quietly lcfs_ctl layer clone child grandchild || die "lcfs layer clone child grandchild failed"
quietly lcfs_ctl layer clone child sibling || die "lcfs layer clone child sibling failed"
"${tree[@]}" fill "$mnt/grandchild/data" 4 50 || die "writing files into layer grandchild failed"
rm -f "$mnt/grandchild/big-hardlink"
quietly lcfs_ctl sync || die "lcfs sync failed"
remember grandchild
remember child
echo "never synced" >"$mnt/sibling/unsynced-file"
crash_and_check 3

lcfs_stop
lcfs_check_log
if quietly "$LCFS_BIN" fsck --verify-data "$LCFS_DEVICE"; then
    say "fsck --verify-data after a clean shutdown: clean"
else
    fail "lcfs fsck --verify-data found problems after a clean shutdown"
fi
e2e_finish "3 kill -9 rounds, ${#checked[@]} synced layers checked, fsck after the crash and after shutdown"
