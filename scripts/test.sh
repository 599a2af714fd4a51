#!/usr/bin/env bash
# The one command that runs every check CI runs (.ci/run calls exactly this).
# Installs what it needs (scripts/setup.sh), then runs each step in order and
# stops at the first failure. The last line is always the summary:
#   test.sh: N passed, M failed
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

if [[ $(id -u) -ne 0 ]]; then
    echo "test.sh: must run as root: the tests attach loop devices and setup installs packages." >&2
    echo "test.sh: run: sudo bash scripts/test.sh" >&2
    exit 1
fi

if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi

# Every step builds with debug assertions and overflow checks on: the
# engine's model and crash tests are too slow in debug, but its asserts must
# stay on. Set here, for CI only: `cargo build --release` and `cargo bench`
# outside it (the demo, the benchmarks) are a real release.
export CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true
export CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true
# Without the release profile's whole-program optimization (Cargo.toml): it
# would link every test binary through one LTO unit, far past CI's time.
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
export CARGO_PROFILE_BENCH_LTO=false CARGO_PROFILE_BENCH_CODEGEN_UNITS=16
# The end-to-end steps run the binaries the tests step built (cargo builds
# every binary of the workspace for the integration tests) instead of
# building them again: `cargo build -p lcfs` alone resolves features
# differently (the tests turn on the engine's test hooks, which the daemon
# never calls) and rebuilt about twenty crates, 3 to 6 minutes of each run.
export LCFS_BIN=${LCFS_BIN:-$PWD/target/release/lcfs}
export LCFS_STRESS_BIN=${LCFS_STRESS_BIN:-$PWD/target/release/lcfs-stress}

# The FUSE checks, then those that read image layers and restart the daemon
# again with passthrough on (docs/fuse.md, "Passthrough").
run_conformance() {
    bash scripts/fuse-conformance.sh &&
        LCFS_DAEMON_ARGS=--passthrough bash scripts/fuse-conformance.sh clone-semantics kill9
}

steps=(
    "setup|bash scripts/setup.sh"
    "format|cargo fmt --all --check"
    "clippy|cargo clippy --workspace --all-targets -- -D warnings"
    "tests|cargo test --workspace --release"
    "benches build|cargo bench --workspace --no-run"
    "fuzz smoke|bash scripts/fuzz-smoke.sh"
    "fuse conformance|run_conformance"
    "docker end to end|bash scripts/e2e/docker.sh"
    "stress crash-verify|bash scripts/e2e/stress-crash.sh"
    "containerd end to end|bash scripts/e2e/containerd.sh"
    "statistics end to end|bash scripts/e2e/prometheus.sh"
    "garbage collection end to end|bash scripts/e2e/gc.sh"
    "estargz against the reference|bash scripts/e2e/estargz.sh"
    "lazy pull end to end|bash scripts/e2e/lazy.sh"
)

passed=0
failed=0
total_start=$SECONDS
for index in "${!steps[@]}"; do
    name=${steps[$index]%%|*}
    command=${steps[$index]#*|}
    printf '\n==== test.sh [%d/%d] %s: %s ====\n' "$((index + 1))" "${#steps[@]}" "$name" "$command"
    start=$SECONDS
    status=0
    # Word splitting of $command is intended: each step is a plain command line.
    # shellcheck disable=SC2086
    $command || status=$?
    elapsed=$((SECONDS - start))
    if [[ $status -eq 0 ]]; then
        passed=$((passed + 1))
        printf '==== test.sh: %s passed in %ds ====\n' "$name" "$elapsed"
    else
        failed=$((failed + 1))
        printf '==== test.sh: %s FAILED (exit %d) after %ds ====\n' "$name" "$status" "$elapsed"
        not_run=$((${#steps[@]} - index - 1))
        [[ $not_run -eq 0 ]] || echo "test.sh: $not_run later step(s) not run"
        break
    fi
done

echo "test.sh: total $((SECONDS - total_start))s"
echo "test.sh: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
