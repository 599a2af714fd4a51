#!/usr/bin/env bash
# POSIX conformance: runs pjdfstest (the Rust port) with one configuration on
# a fresh ext4 (the baseline) and on the target (by default a layer directory
# of a fresh lcfs mount), in the same run. Every test that passes on ext4
# must pass on the target, except those listed with a reason in
# scripts/e2e/pjdfstest-deviations.txt (and justified in
# docs/fuse-conformance.md). Prints every difference and the failure
# messages of the regressions.
#
#   sudo bash scripts/e2e/pjdfstest.sh                 # lcfs
#   sudo E2E_TARGET=overlay bash scripts/e2e/pjdfstest.sh
#   sudo bash scripts/e2e/pjdfstest.sh chmod rename    # only tests matching
E2E_NAME=pjdfstest
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

patterns=("$@")
deviations_file="$E2E_DIR/pjdfstest-deviations.txt"

require_commands pjdfstest
id tests >/dev/null 2>&1 || die "user 'tests' is missing (useradd --system --user-group tests); run scripts/setup.sh"
if ! id nobody >/dev/null 2>&1 || ! getent group nogroup >/dev/null; then
    die "user nobody or group nogroup is missing"
fi
e2e_init

# The configuration the baseline numbers in docs/fuse-conformance.md use.
# naptime 0.01: 0.001 gives false timestamp failures on this kind of VM.
# The 13 erofs tests skip: they need allow_remount, which remounts the file
# system under test read-only.
config="$E2E_WORK/pjdfstest.toml"
cat >"$config" <<'EOF'
[features]
posix_fallocate = {}
rename_ctime = {}
utime_now = {}
utimensat = {}

[settings]
naptime = 0.01
allow_remount = false

[dummy_auth]
entries = [["nobody", "nogroup"], ["tests", "tests"]]
EOF
# The EXDEV tests need a second, distinct file system.
tmpfs_mount "$E2E_WORK/secondary" 16m

# run_pjdfstest LABEL DIR: runs the suite in DIR, output in $E2E_WORK/LABEL.out.
run_pjdfstest() {
    local label=$1 dir=$2 start=$SECONDS status=0
    # NO_COLOR and no backtraces: plain, parseable output.
    (cd "$dir" && NO_COLOR=1 RUST_BACKTRACE=0 pjdfstest -c "$config" \
        -s "$E2E_WORK/secondary" -p "$dir" "${patterns[@]}") \
        >"$E2E_WORK/$label.out" 2>&1 || status=$?
    local summary
    summary=$(grep -E '^Summary:' "$E2E_WORK/$label.out" | tail -n 1 || true)
    [[ -n $summary ]] || {
        tail -n 20 "$E2E_WORK/$label.out" >&2
        die "pjdfstest on $label ($dir) did not finish (exit $status)"
    }
    say "$label: ${summary#Summary: } ($((SECONDS - start)) s)"
}

baseline_dir="$E2E_SCRATCH/base"
mkdir "$baseline_dir"
run_pjdfstest ext4 "$baseline_dir"

target_start
target_dir pjd
if [[ $E2E_TARGET == lcfs ]]; then
    # Only root may pass through the lcfs mount root; the suite switches to
    # other users, so it runs in a bind mount of the layer, as a container
    # sees its layer.
    mkdir "$E2E_WORK/pjd"
    mount --bind "$TARGET_PATH" "$E2E_WORK/pjd" || die "bind-mounting $TARGET_PATH failed"
    E2E_MOUNTS+=("$E2E_WORK/pjd")
    TARGET_PATH="$E2E_WORK/pjd"
fi
run_pjdfstest "$E2E_TARGET" "$TARGET_PATH"

# link::link_count_max skips on every FUSE (and overlay) mount: glibc's
# pathconf(_PC_LINK_MAX) maps statfs f_type to a limit and answers 127
# ("unknown") for FUSE, which pjdfstest refuses. The same check is done here
# with lcfs's limit (LINK_MAX in engine/src/fs.rs, 65000 like ext4): link a
# file up to LINK_MAX names, then one more link must fail with EMLINK.
link_max=${E2E_LINK_MAX:-65000}
if grep -qE '^link::link_count_max +skipped' "$E2E_WORK/$E2E_TARGET.out"; then
    mkdir "$TARGET_PATH/link-count-max"
    start=$SECONDS
    if python3 - "$TARGET_PATH/link-count-max" "$link_max" <<'PYTHON'; then
import errno
import os
import sys

directory, link_max = sys.argv[1], int(sys.argv[2])
target = os.path.join(directory, "file")
open(target, "w").close()
for i in range(1, link_max):
    os.link(target, os.path.join(directory, "link%05d" % i))
nlink = os.stat(target).st_nlink
if nlink != link_max:
    sys.exit("st_nlink is %d after %d links, expected %d" % (nlink, link_max - 1, link_max))
try:
    os.link(target, os.path.join(directory, "one-too-many"))
except OSError as error:
    if error.errno != errno.EMLINK:
        sys.exit("link number %d failed with %s, expected EMLINK" % (link_max, errno.errorcode[error.errno]))
else:
    sys.exit("link number %d succeeded, expected EMLINK" % link_max)
PYTHON
        say "link::link_count_max (skipped by pjdfstest) checked here: $link_max links, then EMLINK ($((SECONDS - start)) s)"
    else
        fail "link count check: $link_max links then EMLINK does not hold on $E2E_TARGET"
    fi
fi
if [[ $E2E_TARGET == lcfs ]]; then
    umount "$E2E_WORK/pjd" || die "unmounting the bind mount $E2E_WORK/pjd failed"
fi
target_finish

# Compare. Results are "name status" lines; status is ok, FAILED, skipped,
# "failed as expected" or "PASSED UNEXPECTEDLY" (we set no expected failures).
python3 - "$E2E_WORK/ext4.out" "$E2E_WORK/$E2E_TARGET.out" "$deviations_file" "$E2E_TARGET" \
    >"$E2E_WORK/compare.out" <<'EOF' || E2E_FAILURES=$((E2E_FAILURES + 1))
import re
import sys

baseline_path, target_path, deviations_path, target = sys.argv[1:]
line_re = re.compile(r"^(\S+)\s+(ok|FAILED|skipped|failed as expected|PASSED UNEXPECTEDLY)\s*$")


def parse(path):
    results, messages, current = {}, {}, None
    with open(path, errors="replace") as f:
        for line in f:
            line = re.sub(r"\x1b\[[0-9;]*m", "", line.rstrip("\n"))
            match = line_re.match(line)
            if match:
                current = match.group(1)
                results[current] = match.group(2)
                messages[current] = []
            elif current and line.startswith("\t"):
                messages[current].append(line.strip())
    return results, messages


def counts(results):
    values = list(results.values())
    return "%d passed, %d failed, %d skipped" % (
        values.count("ok"), values.count("FAILED"), values.count("skipped"))


allowed = {}
try:
    with open(deviations_path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, reason = line.partition(" ")
                allowed[name] = reason.strip()
except FileNotFoundError:
    pass

base, _ = parse(baseline_path)
tgt, tgt_messages = parse(target_path)
print("ext4:   " + counts(base))
print("%-7s %s" % (target + ":", counts(tgt)))

regressions, allowed_hits = [], []
for name in sorted(base):
    if base[name] != "ok":
        continue
    status = tgt.get(name, "missing")
    if status == "ok":
        continue
    (allowed_hits if name in allowed else regressions).append((name, status))

for name, status in allowed_hits:
    print("allowed deviation: %s: %s (%s)" % (name, status, allowed[name]))
for name in sorted(allowed):
    if name in tgt and tgt[name] == "ok":
        print("stale deviation (now passes, remove it from the list): %s" % name)
for name in sorted(tgt):
    if tgt[name] == "ok" and base.get(name) != "ok":
        print("passes on %s but not on ext4 (%s): %s" % (target, base.get(name, "missing"), name))
for name, status in regressions:
    print("REGRESSION: %s: ext4 ok, %s %s" % (name, target, status))
    for message in tgt_messages.get(name, [])[:6]:
        print("    " + message)
print("%d regression(s), %d allowed deviation(s)" % (len(regressions), len(allowed_hits)))
sys.exit(1 if regressions else 0)
EOF
sed "s/^/$E2E_NAME: /" "$E2E_WORK/compare.out"
[[ $E2E_FAILURES -eq 0 ]] ||
    say "full outputs: $E2E_WORK/ext4.out and $E2E_WORK/$E2E_TARGET.out (kept with E2E_KEEP=1)"
e2e_finish "$(tail -n 1 "$E2E_WORK/compare.out"); $(sed -n 2p "$E2E_WORK/compare.out")"
