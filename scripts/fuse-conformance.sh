#!/usr/bin/env bash
# FUSE conformance and integrity checks of lcfs, against a real mount on a
# loop-mounted ext4 (see docs/fuse-conformance.md): pjdfstest, fsx, fio
# verify, clone semantics, kill -9 durability. Runs them in that order, each
# to its end even when an earlier one failed, and prints each one's time.
# The last line is always the summary:
#   fuse-conformance: N passed, M failed
#
#   sudo bash scripts/fuse-conformance.sh                 # all five
#   sudo bash scripts/fuse-conformance.sh fsx kill9       # some of them
#   sudo E2E_TARGET=ext4 bash scripts/fuse-conformance.sh # baseline run
# With E2E_TARGET=ext4 or overlay the checks run on that file system instead
# (kill9, which needs the daemon, is then skipped).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
all_checks=(pjdfstest fsx fio-verify clone-semantics kill9)
checks=("$@")
[[ ${#checks[@]} -gt 0 ]] || checks=("${all_checks[@]}")

for check in "${checks[@]}"; do
    if [[ ! -f scripts/e2e/$check.sh ]]; then
        echo "fuse-conformance: no such check '$check' (checks: ${all_checks[*]})" >&2
        exit 2
    fi
done
if [[ $(id -u) -ne 0 ]]; then
    echo "fuse-conformance: must run as root (loop devices, mounts, FUSE allow_other)" >&2
    echo "fuse-conformance: 0 passed, ${#checks[@]} failed"
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
export PATH="$PATH:$HOME/.cargo/bin"

target=${E2E_TARGET:-lcfs}
# Built once here, so a broken build fails in one place, not five.
if [[ $target == lcfs && -z ${LCFS_BIN:-} ]]; then
    echo "fuse-conformance: building lcfs (cargo build --release -p lcfs)"
    if ! cargo build --release -p lcfs; then
        echo "fuse-conformance: lcfs does not build" >&2
        echo "fuse-conformance: 0 passed, ${#checks[@]} failed"
        exit 1
    fi
    export LCFS_BIN="$PWD/target/release/lcfs"
fi

passed=0
failed=0
skipped=0
results=()
total_start=$SECONDS
for index in "${!checks[@]}"; do
    check=${checks[$index]}
    if [[ $check == kill9 && $target != lcfs ]]; then
        results+=("$(printf '%-16s %-7s %5s' "$check" skipped -)")
        skipped=$((skipped + 1))
        continue
    fi
    printf '\n==== fuse-conformance [%d/%d] %s (%s) ====\n' "$((index + 1))" "${#checks[@]}" "$check" "$target"
    start=$SECONDS
    status=0
    bash "scripts/e2e/$check.sh" || status=$?
    elapsed=$((SECONDS - start))
    if [[ $status -eq 0 ]]; then
        passed=$((passed + 1))
        results+=("$(printf '%-16s %-7s %4ss' "$check" passed "$elapsed")")
    else
        failed=$((failed + 1))
        results+=("$(printf '%-16s %-7s %4ss  (exit %d)' "$check" FAILED "$elapsed" "$status")")
    fi
done

printf '\n==== fuse-conformance on %s: results ====\n' "$target"
printf '  %s\n' "${results[@]}"
echo "  total $((SECONDS - total_start))s"
if [[ $skipped -gt 0 ]]; then
    echo "fuse-conformance: $passed passed, $failed failed, $skipped skipped"
else
    echo "fuse-conformance: $passed passed, $failed failed"
fi
[[ $failed -eq 0 ]]
