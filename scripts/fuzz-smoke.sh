#!/usr/bin/env bash
# Fuzz smoke run: builds every target in fuzz/ once, then runs each one for
# LCFS_FUZZ_SECONDS (default 20), LCFS_FUZZ_JOBS (default 2) at a time. Any
# crash, leak or timeout found fails the script. Seeds in
# fuzz/seeds/<target>/ are copied into the corpus first.
# Runs on the stable toolchain: RUSTC_BOOTSTRAP=1 unlocks the -Z flags
# cargo-fuzz passes (sanitizer, coverage instrumentation).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi

export RUSTC_BOOTSTRAP=1
positive() { # NAME VALUE: VALUE, or exit 2 unless it is a positive integer
    if ! [[ $2 =~ ^[1-9][0-9]*$ ]]; then
        echo "fuzz-smoke.sh: $1 must be a positive integer, got '$2'" >&2
        exit 2
    fi
    echo "$2"
}
seconds=$(positive LCFS_FUZZ_SECONDS "${LCFS_FUZZ_SECONDS:-20}") || exit 2
jobs=$(positive LCFS_FUZZ_JOBS "${LCFS_FUZZ_JOBS:-2}") || exit 2

cargo fuzz --version >/dev/null 2>&1 ||
    { echo "fuzz-smoke.sh: cargo-fuzz is missing; run scripts/setup.sh" >&2; exit 1; }

# Captured first (not read through a pipe) so a failing `cargo fuzz list` fails here.
listing=$(cargo fuzz list)
mapfile -t targets <<<"$listing"
if [[ -z $listing ]]; then
    echo "fuzz-smoke.sh: cargo fuzz list found no targets in fuzz/" >&2
    exit 1
fi

echo "fuzz-smoke.sh: building ${#targets[@]} target(s): ${targets[*]}"
cargo fuzz build

# Targets run LCFS_FUZZ_JOBS at a time (2: one per core of the machines CI
# runs on), each into its own log, printed when it ends.
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
run_target() {
    local target=$1 corpus="corpus/$1"
    mkdir -p "$corpus"
    if [[ -d "seeds/$target" ]]; then
        cp -R "seeds/$target/." "$corpus/"
    fi
    cargo fuzz run "$target" "$corpus" -- -max_total_time="$seconds" >"$logs/$target" 2>&1
}
declare -A running=()
failed=()
# Waits for one running target; prints its log and notes a failure.
reap() {
    local pid status=0 target
    wait -n -p pid "${!running[@]}" || status=$?
    target=${running[$pid]}
    unset "running[$pid]"
    cat "$logs/$target"
    if [[ $status -ne 0 ]]; then
        echo "fuzz-smoke.sh: $target FAILED; the crashing input is in fuzz/artifacts/$target/" >&2
        failed+=("$target")
    else
        echo "fuzz-smoke.sh: $target ran ${seconds}s without a crash"
    fi
}
for target in "${targets[@]}"; do
    while [[ ${#running[@]} -ge $jobs ]]; do reap; done
    echo "fuzz-smoke.sh: running $target for ${seconds}s"
    run_target "$target" &
    running[$!]=$target
done
while [[ ${#running[@]} -gt 0 ]]; do reap; done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz-smoke.sh: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz-smoke.sh: ${#targets[@]} target(s) ran ${seconds}s each without a crash"
