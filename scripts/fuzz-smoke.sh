#!/usr/bin/env bash
# Fuzz smoke run: builds every target in fuzz/ once, then runs each one for
# LCFS_FUZZ_SECONDS (default 20). Any crash, leak or timeout found fails the
# script. Seeds in fuzz/seeds/<target>/ are copied into the corpus first.
# Runs on the stable toolchain: RUSTC_BOOTSTRAP=1 unlocks the -Z flags
# cargo-fuzz passes (sanitizer, coverage instrumentation).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi

export RUSTC_BOOTSTRAP=1
seconds=${LCFS_FUZZ_SECONDS:-20}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
    echo "fuzz-smoke.sh: LCFS_FUZZ_SECONDS must be a positive integer, got '$seconds'" >&2
    exit 2
fi

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

for target in "${targets[@]}"; do
    corpus="corpus/$target"
    mkdir -p "$corpus"
    if [[ -d "seeds/$target" ]]; then
        cp -R "seeds/$target/." "$corpus/"
    fi
    echo "fuzz-smoke.sh: running $target for ${seconds}s"
    if ! cargo fuzz run "$target" "$corpus" -- -max_total_time="$seconds"; then
        echo "fuzz-smoke.sh: $target FAILED; the crashing input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
echo "fuzz-smoke.sh: ${#targets[@]} target(s) ran ${seconds}s each without a crash"
