#!/usr/bin/env bash
# Crash verification with lcfs-stress: what an fsync acknowledged survives
# kill -9 of the lcfs daemon, whole and untorn. Two rounds on one lcfs
# device, each in a fresh layer:
#   buffered: pwrite, 4-64 KiB random blocks, fsync every 16 writes
#   direct:   O_DIRECT through io_uring, queue depth 8, 4-64 KiB, fsync every 32
# lcfs-stress writes with verify headers and saves its acknowledged state
# (the writes issued before its last completed fsync) in a state file on the
# work directory's filesystem, not on lcfs. After a few seconds the daemon is
# killed with SIGKILL, then restarted, and `lcfs-stress --verify_only` checks
# every block: its acknowledged generation, or a later one the writer aimed
# at it; torn, stale, zeroed or foreign blocks fail the check. Last, one
# block is overwritten through the mount and the check must name it alone.
#   LCFS_SEED       seed of the writers (default: random, printed)
#   STRESS_SECONDS  how long each writer runs before the kill (default 3)
E2E_NAME=stress-crash
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $E2E_TARGET == lcfs ]] || die "stress-crash tests the lcfs daemon only (E2E_TARGET=$E2E_TARGET)"
seconds=${STRESS_SECONDS:-3}
[[ $seconds =~ ^[1-9][0-9]*$ ]] || die "STRESS_SECONDS must be a positive integer, got '$seconds'"
seed=${LCFS_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
say "seed $seed (replay: LCFS_SEED=$seed bash scripts/e2e/stress-crash.sh)"

e2e_init
lcfs_build
if [[ -n ${LCFS_STRESS_BIN:-} ]]; then
    [[ -x $LCFS_STRESS_BIN ]] || die "LCFS_STRESS_BIN=$LCFS_STRESS_BIN is not an executable"
else
    say "building lcfs-stress (cargo build --release -p lcfs-bench --bin lcfs-stress)"
    (cd "$E2E_REPO" && quietly cargo build --release -p lcfs-bench --bin lcfs-stress) ||
        die "lcfs-stress does not build"
    LCFS_STRESS_BIN="$E2E_REPO/target/release/lcfs-stress"
fi
lcfs_mkfs
lcfs_start

# round NAME OPTIONS...: one writer, one kill -9, one restart, one verify.
round() {
    local name=$1 writer_pid state="$E2E_WORK/state-$1.json" log="$E2E_WORK/writer-$1.log"
    shift
    quietly lcfs_ctl layer create "$name" || die "lcfs layer create $name failed"
    # The new layer must itself survive the crash: make it durable first.
    quietly lcfs_ctl sync || die "lcfs sync failed"
    "$LCFS_STRESS_BIN" --name="$name" --filename="$LCFS_MOUNT/$name/data" --rw=randwrite \
        --bsrange=4k-64k --size=64m --verify=xxh3 --time_based --runtime=600 \
        --verify_state="$state" --seed="$seed" "$@" >"$log" 2>&1 &
    writer_pid=$!
    sleep "$seconds"
    kill -0 "$writer_pid" 2>/dev/null || {
        sed 's/^/    /' "$log" >&2
        die "$name: the writer exited before the kill"
    }
    lcfs_kill9
    # The writer sees its file system vanish and stops with an I/O error.
    wait "$writer_pid" 2>/dev/null || true
    local acknowledged
    acknowledged=$(python3 -c 'import json, sys; s = json.load(open(sys.argv[1])); print(s["jobs"][0]["acknowledged_writes"], s["jobs"][0]["completed_fsyncs"])' "$state") ||
        die "$name: cannot read the state file $state"
    read -r writes fsyncs <<<"$acknowledged"
    [[ $writes -gt 0 ]] || {
        sed 's/^/    /' "$log" >&2
        die "$name: no fsync completed in ${seconds} s, nothing to check"
    }
    lcfs_start
    if "$LCFS_STRESS_BIN" --verify_only --verify_state="$state" >"$E2E_WORK/verify-$name.log" 2>&1; then
        say "$name: $writes writes acknowledged by $fsyncs fsyncs before kill -9; every block verified after the restart"
    else
        grep -E 'BAD BLOCK|error|verify:' "$E2E_WORK/verify-$name.log" | head -n 25 | sed 's/^/    /' >&2
        keep_artifacts "$state" "$log" "$E2E_WORK/verify-$name.log"
        fail "$name: blocks acknowledged before kill -9 are missing, stale or torn (seed $seed)"
    fi
}

round buffered --direct=0 --fsync=16
round direct --direct=1 --iodepth=8 --fsync=32

# The negative check: one 4 KiB block of the buffered round's file
# overwritten through the mount; the verify pass must fail and name exactly
# that block.
corrupt_at=$((1 << 20))
dd if=/dev/urandom of="$LCFS_MOUNT/buffered/data" bs=4k count=1 seek=$((corrupt_at / 4096)) \
    conv=notrunc,fsync status=none || die "could not overwrite a block of buffered/data"
if "$LCFS_STRESS_BIN" --verify_only --verify_state="$E2E_WORK/state-buffered.json" \
    >"$E2E_WORK/verify-corrupt.log" 2>&1; then
    fail "a block overwritten behind lcfs-stress's back went unnoticed"
else
    bad=$(grep -c 'BAD BLOCK' "$E2E_WORK/verify-corrupt.log" || true)
    if [[ $bad -eq 1 ]] && grep -q "BAD BLOCK .* offset $corrupt_at " "$E2E_WORK/verify-corrupt.log"; then
        say "corrupted block: reported at offset $corrupt_at and nothing else"
    else
        grep 'BAD BLOCK' "$E2E_WORK/verify-corrupt.log" | head -n 5 | sed 's/^/    /' >&2
        fail "the corrupted block at $corrupt_at was not reported alone ($bad bad blocks)"
    fi
fi

lcfs_stop
lcfs_check_log
e2e_finish "2 kill -9 rounds of lcfs-stress crash-verify, 1 corrupted block found (seed $seed)"
