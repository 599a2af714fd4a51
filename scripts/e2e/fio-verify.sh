#!/usr/bin/env bash
# Data integrity under fio: files in one layer of a fresh lcfs mount (or
# E2E_TARGET=ext4|overlay) written with verify=xxhash headers, then read back
# and checked, buffered (psync) and O_DIRECT (libaio, queue depth 16), with
# mixed block sizes in random order. Each mode is checked twice: inline,
# right after writing, and again by a verify-only run after the page cache
# is dropped, so the second read really comes from the daemon.
# The negative check proves verification works at all: a file written with
# headers, one 4 KiB block overwritten through the mount with dd, and the
# verify-only run must fail.
#
# Last, the buffered file is read through a clone of its layer, a quarter
# of it is overwritten in the clone, and both clone and parent are checked.
#
#   FIO_SIZE_MIB (default 256) is the size of each of the two data files.
E2E_NAME=fio-verify
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

size_mib=${FIO_SIZE_MIB:-256}
[[ $size_mib =~ ^[1-9][0-9]*$ ]] || die "FIO_SIZE_MIB must be a positive integer, got '$size_mib'"
size="${size_mib}M"
require_commands fio dd
e2e_init
target_start
target_dir fio
dir=$TARGET_PATH

# Options shared by every run. randrepeat (fio's default) makes a
# verify-only run regenerate the same offsets as the run that wrote them.
# '$jobname' is fio's own placeholder: one file per job, named after it.
# shellcheck disable=SC2016
common=(--filename_format='$jobname' --directory="$dir" --verify=xxhash
    --verify_fatal=1 --verify_state_save=0 --randrepeat=1 --group_reporting)
modes=(
    "buffered|--ioengine=psync --direct=0 --rw=randwrite --bssplit=4k/40:64k/40:1m/20"
    "direct|--ioengine=libaio --direct=1 --iodepth=16 --rw=randwrite --bssplit=4k/40:64k/40:1m/20"
)

drop_page_cache() {
    echo 1 >/proc/sys/vm/drop_caches
}

# run_fio LOG ARGS...: runs fio; its output goes to $E2E_WORK/LOG.
run_fio() {
    local log="$E2E_WORK/$1"
    shift
    fio "${common[@]}" "$@" >"$log" 2>&1
}

show_fio_errors() {
    grep -iE 'verify|error|bad|fail' "$E2E_WORK/$1" | head -n 15 | sed 's/^/    /' >&2 || true
}

for mode in "${modes[@]}"; do
    name=${mode%%|*}
    # Word splitting of the mode's options is intended.
    # shellcheck disable=SC2206
    options=(${mode#*|})
    start=$SECONDS
    if ! run_fio "$name-write.log" --name="$name" --size="$size" "${options[@]}" \
        --do_verify=1 --end_fsync=1; then
        show_fio_errors "$name-write.log"
        fail "$name: fio write + inline verify of $size failed (log: $name-write.log)"
        continue
    fi
    drop_page_cache
    if ! run_fio "$name-verify.log" --name="$name" --size="$size" "${options[@]}" --verify_only; then
        show_fio_errors "$name-verify.log"
        fail "$name: fio verify-only of $size after dropping the page cache failed"
        continue
    fi
    say "$name: $size written and verified twice, 0 verify errors ($((SECONDS - start)) s)"
done

# Negative check: sequential 4 KiB blocks, so block 1000 is one fio block.
negative=(--name=negative --size=16M --ioengine=psync --rw=write --bs=4k)
run_fio negative-write.log "${negative[@]}" --do_verify=0 --end_fsync=1 ||
    die "negative check: fio could not write its file (see negative-write.log)"
run_fio negative-control.log "${negative[@]}" --verify_only || {
    show_fio_errors negative-control.log
    die "negative check: the untouched file already fails verification"
}
dd if=/dev/urandom of="$dir/negative" bs=4k seek=1000 count=1 conv=notrunc,fsync status=none ||
    die "negative check: dd could not overwrite block 1000"
drop_page_cache
if run_fio negative-verify.log "${negative[@]}" --verify_only; then
    fail "negative check: fio verify-only PASSED on a file with a corrupted block: verification catches nothing"
elif ! grep -qiE 'verify.*(fail|bad)|bad.*(magic|header)' "$E2E_WORK/negative-verify.log"; then
    show_fio_errors negative-verify.log
    fail "negative check: fio failed, but not with a verify error"
else
    say "negative check: the corrupted block was caught: $(grep -m 1 -iE 'verify|bad' "$E2E_WORK/negative-verify.log")"
fi

# Clones: the buffered file read through a clone (blocks shared with the
# parent), a quarter of it overwritten in the clone with O_DIRECT and another
# seed, then both versions checked: the clone's new blocks by fio, the
# parent's whole file by its checksum from before the clone was written.
start=$SECONDS
[[ $E2E_TARGET != lcfs ]] || quietly lcfs_ctl layer commit fio || die "lcfs layer commit fio failed"
target_clone fio fio-clone
clone_dir=$TARGET_PATH
buffered=(--name=buffered --size="$size" --ioengine=psync --direct=0 --rw=randwrite
    --bssplit=4k/40:64k/40:1m/20)
overwrite=(--name=buffered --size="$size" --io_size="$((size_mib / 4))M" --randseed=4242
    --ioengine=libaio --direct=1 --iodepth=16 --rw=randwrite --bssplit=4k/40:64k/40:1m/20)
drop_page_cache
parent_sum=$(sha256sum <"$dir/buffered")
if ! run_fio clone-read.log --directory="$clone_dir" "${buffered[@]}" --verify_only; then
    show_fio_errors clone-read.log
    fail "clone: the parent's file read through the clone fails verification"
elif ! run_fio clone-overwrite.log --directory="$clone_dir" "${overwrite[@]}" --do_verify=1 --end_fsync=1; then
    show_fio_errors clone-overwrite.log
    fail "clone: overwriting a quarter of the file in the clone fails verification"
else
    drop_page_cache
    if ! run_fio clone-overwrite-verify.log --directory="$clone_dir" "${overwrite[@]}" --verify_only; then
        show_fio_errors clone-overwrite-verify.log
        fail "clone: the clone's overwritten blocks fail verification after dropping the page cache"
    # By checksum: fio's verify-only run of a write job opens the file
    # read-write, which a frozen parent refuses (EROFS), and --readonly
    # refuses write jobs.
    elif [[ $(sha256sum <"$dir/buffered") != "$parent_sum" ]]; then
        fail "clone: the parent's file changed when its clone was overwritten"
    elif [[ $(sha256sum <"$clone_dir/buffered") == "$parent_sum" ]]; then
        fail "clone: the clone's file still equals the parent's after fio overwrote a quarter of it"
    else
        say "clone: read through, $((size_mib / 4))M overwritten with O_DIRECT, clone and parent verified ($((SECONDS - start)) s)"
    fi
fi
target_finish

[[ $E2E_FAILURES -eq 0 ]] || keep_artifacts "$E2E_WORK"/*.log
e2e_finish "$size buffered and O_DIRECT verify, corruption detection, clone isolation"
