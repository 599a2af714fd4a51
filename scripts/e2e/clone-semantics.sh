#!/usr/bin/env bash
# Clone semantics through the mount. A Debian bookworm minbase rootfs (made
# once with debootstrap and cached as a tarball under /var/cache/lcfs-test/),
# plus a small tree of odd cases (hardlink groups, xattrs incl.
# security.capability, device nodes, a fifo, a sparse file, a 255-byte name),
# is untarred into a base layer; the base is committed and cloned; the clone
# is modified (content, metadata, xattrs), has files, a symlink, a hardlink
# name and a tree deleted, has files and a directory renamed, and gets new
# entries; then a clone of the clone gets a second round of changes.
#
# Every tree is compared with a reference made the same way on ext4, by a
# manifest of every entry (path, type, mode, owner, size, mtime, link count,
# device numbers, symlink target, SHA-256, xattrs, hardlink group; see
# tree.py):
#   - the base equals the pristine reference, before and after the clones
#     were changed (read again after dropping the kernel caches);
#   - each clone equals the reference with exactly the same changes applied;
#   - on lcfs, a committed (frozen) layer rejects writes with EROFS, all of
#     it still holds after a clean daemon restart, and removing the
#     grandchild and then the clone leaves their parents intact.
#
# E2E_TARGET=ext4 (clone = cp -a) and overlay (clone = overlayfs with the
# parent as lower layer) run the same steps, to prove the checking logic.
E2E_NAME="clone-semantics"
# shellcheck source=scripts/e2e/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

tarball=$DEBIAN_TARBALL
tree=("python3" "$E2E_DIR/tree.py")
# GNU tar: posix format keeps nanosecond mtimes and xattrs; '*' takes every
# xattr namespace (the default skips security.* and trusted.* on extraction).
tar_options=(--numeric-owner --xattrs --xattrs-include='*' --format=posix)

require_commands debootstrap tar
e2e_init

# extract DIR: the rootfs and the extras into DIR, as a container runtime
# would. Adding the extras changed DIR's mtime after tar set it, so it is set
# again to a fixed time.
extract() {
    tar "${tar_options[@]}" -p -C "$1" -xf "$tarball" || die "untar of the rootfs into $1 failed"
    tar "${tar_options[@]}" -p -C "$1" -xf "$E2E_WORK/extras.tar" || die "untar of the extras into $1 failed"
    touch -d @1700000000 "$1"
}

# changed_lines A B: how many manifest lines differ between A and B.
changed_lines() {
    { diff "$1" "$2" || true; } | grep -c '^[<>]' || true
}

# check_tree LABEL DIR EXPECTED_MANIFEST: DIR's manifest must equal the file.
check_tree() {
    local label=$1 dir=$2 expected=$3 actual="$E2E_WORK/manifest-$1.txt"
    if ! "${tree[@]}" manifest "$dir" >"$actual" 2>"$E2E_WORK/manifest-$1.err"; then
        sed 's/^/    /' "$E2E_WORK/manifest-$1.err" | tail -n 5 >&2
        fail "$label: could not read the whole tree $dir"
        return
    fi
    if cmp -s "$actual" "$expected"; then
        say "$label: identical to the reference ($(wc -l <"$actual") entries)"
        return
    fi
    echo "$E2E_NAME: $label differs from the reference (- expected, + actual; first 30 lines):" >&2
    # diff exits 1 on a difference: not an error here (pipefail, errexit).
    { diff -u "$expected" "$actual" || true; } | sed -n '3,32p' | cut -c1-300 | sed 's/^/    /' >&2
    keep_artifacts "$expected" "$actual"
    fail "$label: $(changed_lines "$expected" "$actual") manifest line(s) differ"
}

drop_kernel_caches() {
    echo 3 >/proc/sys/vm/drop_caches
}

# expect_erofs DIR: a write into a frozen layer fails with EROFS.
expect_erofs() {
    local dir=$1 output
    if output=$(touch "$dir/should-not-exist" 2>&1); then
        fail "creating a file in frozen layer $dir succeeded (expected EROFS)"
    elif [[ $output != *"Read-only file system"* ]]; then
        fail "creating a file in frozen layer $dir failed, but not with EROFS: $output"
    fi
    if output=$( (echo x >>"$dir/etc/debian_version") 2>&1); then
        fail "appending to a file in frozen layer $dir succeeded (expected EROFS)"
    elif [[ $output != *"Read-only file system"* ]]; then
        fail "writing a file in frozen layer $dir failed, but not with EROFS: $output"
    fi
}

phase() {
    say "$1 ($((SECONDS - phase_start)) s)"
    phase_start=$SECONDS
}

phase_start=$SECONDS
ensure_rootfs_tarball
mkdir "$E2E_SCRATCH/extras-src"
"${tree[@]}" extras "$E2E_SCRATCH/extras-src"
tar "${tar_options[@]}" -C "$E2E_SCRATCH/extras-src" -cpf "$E2E_WORK/extras.tar" ./lcfs-test

# References on ext4: the pristine tree, after round 1, after round 2.
mkdir "$E2E_SCRATCH/reference"
extract "$E2E_SCRATCH/reference"
"${tree[@]}" manifest "$E2E_SCRATCH/reference" >"$E2E_WORK/expected-base.txt"
"${tree[@]}" mutate "$E2E_SCRATCH/reference" 1
"${tree[@]}" manifest "$E2E_SCRATCH/reference" >"$E2E_WORK/expected-clone.txt"
"${tree[@]}" mutate "$E2E_SCRATCH/reference" 2
"${tree[@]}" manifest "$E2E_SCRATCH/reference" >"$E2E_WORK/expected-grandchild.txt"
phase "reference trees on ext4: $(wc -l <"$E2E_WORK/expected-base.txt") entries; round 1 changes $(changed_lines "$E2E_WORK/expected-base.txt" "$E2E_WORK/expected-clone.txt") manifest lines, round 2 $(changed_lines "$E2E_WORK/expected-clone.txt" "$E2E_WORK/expected-grandchild.txt")"

target_start
target_dir base
base=$TARGET_PATH
extract "$base"
phase "untarred the rootfs into the base layer $base"
[[ $E2E_TARGET != lcfs ]] || quietly lcfs_ctl layer commit base || fail "lcfs layer commit base failed"
check_tree base "$base" "$E2E_WORK/expected-base.txt"
[[ $E2E_TARGET != lcfs ]] || expect_erofs "$base"

target_clone base clone
clone=$TARGET_PATH
check_tree "clone-before-changes" "$clone" "$E2E_WORK/expected-base.txt"
"${tree[@]}" mutate "$clone" 1 || fail "round 1 changes in the clone failed"
check_tree clone "$clone" "$E2E_WORK/expected-clone.txt"
drop_kernel_caches
check_tree "base-after-clone-changes" "$base" "$E2E_WORK/expected-base.txt"
phase "cloned and changed the clone"

[[ $E2E_TARGET != lcfs ]] || quietly lcfs_ctl layer commit clone || fail "lcfs layer commit clone failed"
target_clone clone grandchild
grandchild=$TARGET_PATH
"${tree[@]}" mutate "$grandchild" 2 || fail "round 2 changes in the grandchild failed"
check_tree grandchild "$grandchild" "$E2E_WORK/expected-grandchild.txt"
drop_kernel_caches
check_tree "clone-after-grandchild-changes" "$clone" "$E2E_WORK/expected-clone.txt"
check_tree "base-after-grandchild-changes" "$base" "$E2E_WORK/expected-base.txt"
[[ $E2E_TARGET != lcfs ]] || expect_erofs "$clone"
phase "cloned the clone and changed it"

if [[ $E2E_TARGET == lcfs ]]; then
    lcfs_stop
    lcfs_start
    check_tree "base-after-restart" "$base" "$E2E_WORK/expected-base.txt"
    check_tree "clone-after-restart" "$clone" "$E2E_WORK/expected-clone.txt"
    check_tree "grandchild-after-restart" "$grandchild" "$E2E_WORK/expected-grandchild.txt"
    phase "restarted the daemon and checked the three layers again"
    # With LCFS_DAEMON_ARGS=--passthrough the reads above were passed
    # through to the frozen copies (docs/fuse.md, "Passthrough"): say so,
    # and fail if none were.
    if lcfs_passthrough; then
        passed=$(lcfs_ctl stats --json | jq -er '.passthrough.opens') || fail "lcfs stats has no passthrough counters"
        ((${passed:-0} > 0)) || fail "--passthrough: no open was passed through"
        say "passthrough: $passed opens after the restart passed through to frozen copies"
    fi
    # Removing children frees their blocks; the parents must not notice.
    quietly lcfs_ctl layer rm grandchild || fail "lcfs layer rm grandchild failed"
    [[ ! -e $grandchild ]] || fail "layer grandchild was removed but $grandchild still exists"
    drop_kernel_caches
    check_tree "clone-after-grandchild-removed" "$clone" "$E2E_WORK/expected-clone.txt"
    quietly lcfs_ctl layer rm clone || fail "lcfs layer rm clone failed"
    drop_kernel_caches
    check_tree "base-after-clones-removed" "$base" "$E2E_WORK/expected-base.txt"
    phase "removed the grandchild, then the clone"
fi
target_finish

e2e_finish "base, clone and grandchild compared with their ext4 references, entry by entry"
