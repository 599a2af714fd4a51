#!/usr/bin/env bash
# Data integrity under random I/O: fsx (the Rust port) on files in one layer
# of a fresh lcfs mount (or E2E_TARGET=ext4|overlay). fsx keeps a model of
# the file in memory and checks every read against it.
#   - FSX_OPS (default 100,000) operations for each of three fixed seeds,
#     without mmap: pread/pwrite, truncate, fsync, fdatasync, fallocate,
#     punch hole, sendfile, fadvise, copy_file_range, close/reopen;
#   - FSX_OPS operations with mmap reads and writes (and msync) for one seed.
# The mmap run goes in the background beside the plain ones: it is the
# longest, and two writers exercise the daemon's threads. fsx's mmap read
# path never unmaps, so keep one mmap run at 100k operations or fewer.
#
# Replay a failure: the log names the seed; the configurations and logs are
# kept in /var/tmp/lcfs-e2e-artifacts/fsx/. Run (-v for every operation)
#   fsx -f fsx-plain.toml -N OPS -S SEED FILE
E2E_NAME=fsx
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ops=${FSX_OPS:-100000}
plain_seeds=(1001 2002 3003)
mmap_seed=1001
[[ $ops =~ ^[1-9][0-9]*$ ]] || die "FSX_OPS must be a positive integer, got '$ops'"

require_commands fsx
e2e_init

# Operation weights: every operation fsx has (copy_file_range falls back to
# the kernel's read/write copy when the daemon does not implement it). flen 1 MiB
# spans several engine blocks and leaves room for holes. opsize.min = 1:
# fsx 0.3.2 otherwise issues posix_fallocate with length 0, which Linux
# rejects with EINVAL (seed 2002 fails on ext4 at operation 34413).
plain_config="$E2E_WORK/fsx-plain.toml"
cat >"$plain_config" <<'EOF'
flen = 1048576

[opsize]
min = 1

[weights]
close_open = 1
read = 10
write = 10
mapread = 0
mapwrite = 0
invalidate = 0
truncate = 2
fsync = 1
fdatasync = 1
posix_fallocate = 1
punch_hole = 1
sendfile = 1
posix_fadvise = 1
copy_file_range = 1
EOF
mmap_config="$E2E_WORK/fsx-mmap.toml"
sed -e 's/^mapread = 0/mapread = 10/' -e 's/^mapwrite = 0/mapwrite = 10/' \
    -e 's/^invalidate = 0/invalidate = 1/' "$plain_config" >"$mmap_config"

target_start
target_dir fsx
dir=$TARGET_PATH
mkdir -p "$E2E_WORK/fsx-artifacts"

# run_fsx LABEL CONFIG SEED: one fsx process; its log is $E2E_WORK/LABEL.log.
run_fsx() {
    local label=$1 config=$2 seed=$3 start=$SECONDS status=0
    fsx -f "$config" -N "$ops" -S "$seed" -P "$E2E_WORK/fsx-artifacts" \
        "$dir/$label" >"$E2E_WORK/$label.log" 2>&1 || status=$?
    if [[ $status -eq 0 ]] && grep -q 'All operations completed A-OK' "$E2E_WORK/$label.log"; then
        echo "$label: seed $seed, $ops operations OK ($((SECONDS - start)) s)"
        return 0
    fi
    echo "$label: seed $seed FAILED (exit $status) after $((SECONDS - start)) s; last lines:"
    tail -n 25 "$E2E_WORK/$label.log" | sed 's/^/    /'
    return 1
}

say "$ops operations per run in $dir; plain seeds ${plain_seeds[*]}, mmap seed $mmap_seed"
run_fsx "mmap-$mmap_seed" "$mmap_config" "$mmap_seed" >"$E2E_WORK/mmap.result" &
mmap_pid=$!
runs_failed=0
for seed in "${plain_seeds[@]}"; do
    if run_fsx "plain-$seed" "$plain_config" "$seed" >"$E2E_WORK/plain.result"; then
        say "$(cat "$E2E_WORK/plain.result")"
    else
        sed "s/^/$E2E_NAME: /" "$E2E_WORK/plain.result"
        runs_failed=$((runs_failed + 1))
        fail "fsx plain seed $seed: replay with fsx -f fsx-plain.toml -N $ops -S $seed FILE"
    fi
done
if wait "$mmap_pid"; then
    say "$(cat "$E2E_WORK/mmap.result")"
else
    sed "s/^/$E2E_NAME: /" "$E2E_WORK/mmap.result"
    runs_failed=$((runs_failed + 1))
    fail "fsx mmap seed $mmap_seed: replay with fsx -f fsx-mmap.toml -N $ops -S $mmap_seed FILE"
fi
target_finish

if [[ $E2E_FAILURES -ne 0 ]]; then
    keep_artifacts "$plain_config" "$mmap_config" "$E2E_WORK"/*.log "$E2E_WORK/fsx-artifacts"
fi
e2e_finish "$((${#plain_seeds[@]} + 1 - runs_failed)) of $((${#plain_seeds[@]} + 1)) fsx runs passed ($ops operations each)"
