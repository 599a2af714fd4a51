# shellcheck shell=bash
# Variables such as TARGET_PATH are set here for the scripts that source it.
# shellcheck disable=SC2034
# Shared helpers for the end-to-end checks in scripts/e2e/. Source it from a
# check script after setting E2E_NAME; it turns on `set -euo pipefail`.
#
# Every resource a check creates (a work directory, loop devices, mounts, the
# lcfs daemon) is recorded here and released by one EXIT trap, in reverse
# order: the trap kills only the daemon pid we started, lazily unmounts only
# our mounts, detaches only our loop devices, and removes our work directory.
#
# Scratch space is a fresh ext4 file system in a loop image, never /tmp:
# /tmp on these machines is ext4 without a journal, slow and noisy for file
# creation. The lcfs device file lives on that scratch ext4.
#
# Targets. E2E_TARGET selects what the generic checks (pjdfstest, fsx, fio)
# run on, so the checks can be proven on kernel file systems first:
#   lcfs    (default) a layer directory of an lcfs mount
#   ext4    a directory on the scratch ext4
#   overlay a kernel overlayfs mount whose layers live on the scratch ext4
# Environment:
#   LCFS_BIN            use this lcfs binary instead of building one
#   E2E_KEEP=1          keep the work directory (logs, images) after the run
#   E2E_WORK_BASE       parent of the work directory (default /var/tmp)
#   E2E_SCRATCH_SIZE    size of the scratch ext4 image (default 8G, sparse)
#   LCFS_DEVICE_SIZE    size of the lcfs device file (default 4G, sparse)
#   E2E_ARTIFACTS       where failing checks copy their evidence (logs, fsx
#                       files) to outlive the work directory
#                       (default /var/tmp/lcfs-e2e-artifacts/<check>)
set -euo pipefail

: "${E2E_NAME:=$(basename "$0" .sh)}"
E2E_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
E2E_DIR="$E2E_REPO/scripts/e2e"
E2E_TARGET=${E2E_TARGET:-lcfs}
E2E_KEEP=${E2E_KEEP:-0}
E2E_WORK_BASE=${E2E_WORK_BASE:-/var/tmp}
E2E_SCRATCH_SIZE=${E2E_SCRATCH_SIZE:-8G}
E2E_ARTIFACTS=${E2E_ARTIFACTS:-/var/tmp/lcfs-e2e-artifacts/$E2E_NAME}
LCFS_DEVICE_SIZE=${LCFS_DEVICE_SIZE:-4G}
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
[[ -d "$HOME/.cargo/bin" ]] && export PATH="$PATH:$HOME/.cargo/bin"

# Resources to release, in creation order (released in reverse).
E2E_WORK=""
E2E_LOOPS=()
E2E_MOUNTS=()
# overlay mountpoint -> the lowerdir list a clone of it stacks on
declare -A E2E_OVERLAY_LAYERS=()
LCFS_PID=""
E2E_FAILURES=0
# Private dockerds we started: name -> pid, name -> work directory.
declare -A DOCKERD_PIDS=()
declare -A DOCKERD_DIRS=()
# The name dockerd knows the lcfs plugin by (its socket in /run/docker/plugins);
# set by lcfs_plugin_name, empty when the daemon serves no plugin.
LCFS_PLUGIN=""
# The socket the next lcfs_start serves containerd's snapshots API on
# (lcfs daemon --containerd-socket); empty: none (--no-containerd, so checks
# running side by side never meet on the daemon's default socket).
LCFS_CONTAINERD_SOCKET=""
# Functions e2e_cleanup calls after stopping the dockerds and before the lcfs
# daemon (lib-containerd.sh adds containerd and the registry).
E2E_CLEANUP_HOOKS=()

say() { echo "$E2E_NAME: $*"; }
# die MESSAGE: the check failed (or could not run); the trap cleans up.
die() {
    echo "$E2E_NAME: FAIL: $*" >&2
    exit 1
}
# fail MESSAGE: records a failure and goes on, for checks that report every
# problem they find; e2e_finish turns the count into the exit status.
fail() {
    echo "$E2E_NAME: FAIL: $*" >&2
    E2E_FAILURES=$((E2E_FAILURES + 1))
}

# expect WHAT WANT GOT: says "ok: WHAT" when GOT is WANT, else fails.
expect() {
    if [[ $2 == "$3" ]]; then
        say "ok: $1"
    else
        fail "$1: expected [$2], got [$3]"
    fi
}

require_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (loop devices, mounts, FUSE allow_other)"
}

require_commands() {
    local command
    for command in "$@"; do
        command -v "$command" >/dev/null 2>&1 ||
            die "'$command' is not installed; run scripts/setup.sh"
    done
}

# Runs a command with its output in a log; shows the tail only on failure.
quietly() {
    local log status=0
    log=$(mktemp "$E2E_WORK/quietly.XXXXXX")
    "$@" >"$log" 2>&1 || status=$?
    if [[ $status -ne 0 ]]; then
        tail -n 40 "$log" >&2
        echo "$E2E_NAME: command failed (exit $status): $*" >&2
    fi
    rm -f "$log"
    return "$status"
}

# keep_artifacts FILE...: copies evidence of a failure where it outlives the
# run, and says where.
keep_artifacts() {
    mkdir -p "$E2E_ARTIFACTS"
    cp -a "$@" "$E2E_ARTIFACTS/" 2>/dev/null || true
    say "evidence kept in $E2E_ARTIFACTS"
}

# --- setup and teardown ----------------------------------------------------

# stop_pid PID: SIGTERM to a process we started, SIGKILL after 10 s; waits.
stop_pid() {
    kill -TERM "$1" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$1" 2>/dev/null
    wait "$1" 2>/dev/null
}

e2e_cleanup() {
    local status=$? index name
    set +e
    # dockerds first: their containers run on the lcfs mount.
    for name in "${!DOCKERD_PIDS[@]}"; do
        dockerd_stop "$name"
    done
    for ((index = ${#E2E_CLEANUP_HOOKS[@]} - 1; index >= 0; index--)); do
        "${E2E_CLEANUP_HOOKS[$index]}"
    done
    [[ -z $LCFS_PID ]] || stop_pid "$LCFS_PID"
    [[ -z $LCFS_PLUGIN ]] || rm -f "/run/docker/plugins/$LCFS_PLUGIN.sock"
    for ((index = ${#E2E_MOUNTS[@]} - 1; index >= 0; index--)); do
        if mountpoint -q "${E2E_MOUNTS[$index]}" 2>/dev/null ||
            grep -qF " ${E2E_MOUNTS[$index]} " /proc/self/mounts; then
            umount -l "${E2E_MOUNTS[$index]}" 2>/dev/null
        fi
    done
    for ((index = ${#E2E_LOOPS[@]} - 1; index >= 0; index--)); do
        losetup -d "${E2E_LOOPS[$index]}" 2>/dev/null
    done
    if [[ -n $E2E_WORK && -d $E2E_WORK ]]; then
        # A failed run keeps the daemon's log: it is the first thing to read.
        [[ $status -eq 0 || ! -f ${LCFS_LOG:-} ]] || keep_artifacts "$LCFS_LOG"
        if [[ $E2E_KEEP == 1 ]]; then
            echo "$E2E_NAME: kept work directory $E2E_WORK" >&2
        else
            rm -rf "$E2E_WORK"
        fi
    fi
    exit "$status"
}

# e2e_init: checks the environment, makes the work directory and the scratch
# ext4 ($E2E_SCRATCH), installs the cleanup trap.
e2e_init() {
    require_root
    require_commands losetup mkfs.ext4 mount umount findmnt python3
    case $E2E_TARGET in
        lcfs | ext4 | overlay) ;;
        *) die "E2E_TARGET must be lcfs, ext4 or overlay, not '$E2E_TARGET'" ;;
    esac
    mkdir -p "$E2E_WORK_BASE"
    E2E_WORK=$(mktemp -d "$E2E_WORK_BASE/e2e.XXXXXX")
    # Short on purpose: pjdfstest binds unix sockets below it, and a socket
    # path must fit in 108 bytes. Searchable by the unprivileged users some
    # tests switch to.
    chmod 755 "$E2E_WORK"
    trap e2e_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    E2E_SCRATCH="$E2E_WORK/scratch"
    ext4_mount "$E2E_WORK/scratch.img" "$E2E_SCRATCH" "$E2E_SCRATCH_SIZE"
}

# ext4_mount IMAGE MOUNTPOINT SIZE: a fresh ext4 in a sparse loop image.
ext4_mount() {
    local image=$1 mountpoint=$2 size=$3 loop
    rm -f "$image"
    truncate -s "$size" "$image"
    loop=$(losetup --find --show "$image") || die "losetup failed for $image"
    E2E_LOOPS+=("$loop")
    # lazy_itable_init=0: no background zeroing thread competing with the test.
    quietly mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0,nodiscard "$loop" ||
        die "mkfs.ext4 failed on $loop"
    mkdir -p "$mountpoint"
    mount -t ext4 "$loop" "$mountpoint" || die "mounting ext4 $loop on $mountpoint failed"
    E2E_MOUNTS+=("$mountpoint")
}

# tmpfs_mount MOUNTPOINT SIZE
tmpfs_mount() {
    mkdir -p "$1"
    mount -t tmpfs -o "size=$2" tmpfs "$1" || die "mounting tmpfs on $1 failed"
    E2E_MOUNTS+=("$1")
}

# overlay_mount LOWER MOUNTPOINT: an overlayfs with LOWER (a directory, or
# a colon-separated list of them) read-only and a fresh upper and work
# directory on the scratch ext4.
overlay_mount() {
    local lower=$1 mountpoint=$2 state
    state="$E2E_SCRATCH/.overlay-$(basename "$mountpoint")"
    mkdir -p "$state/upper" "$state/work" "$mountpoint"
    mount -t overlay overlay -o "lowerdir=$lower,upperdir=$state/upper,workdir=$state/work" \
        "$mountpoint" || die "mounting overlayfs on $mountpoint failed"
    E2E_MOUNTS+=("$mountpoint")
    E2E_OVERLAY_LAYERS[$mountpoint]="$state/upper:$lower"
}

# e2e_finish SUMMARY: prints the summary line and exits 1 if fail was called.
e2e_finish() {
    if [[ $E2E_FAILURES -eq 0 ]]; then
        say "PASS ($E2E_TARGET): $*"
        exit 0
    fi
    say "FAILED ($E2E_TARGET): $E2E_FAILURES problem(s); $*"
    exit 1
}

# --- test images -------------------------------------------------------------

# A Debian bookworm minbase rootfs, made once with debootstrap and cached
# between runs (GNU tar, posix format: nanosecond mtimes and xattrs).
DEBIAN_TARBALL="${LCFS_TEST_CACHE:-/var/cache/lcfs-test}/debian-bookworm-minbase.tar"

# The mirror apt uses (deb822 or one-line sources), Debian's by default.
debian_mirror() {
    local uri
    uri=$(grep -hsE '^\s*(URIs:|deb\s)' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources | grep -v -- '-security' |
        grep -oE 'https?://[^ ]*/debian/?' | head -n 1 || true)
    echo "${LCFS_TEST_MIRROR:-${uri:-http://deb.debian.org/debian}}"
}

# Builds the cached rootfs tarball when it is missing (a few minutes; the
# download comes from the Debian mirror).
ensure_rootfs_tarball() {
    [[ -s $DEBIAN_TARBALL ]] && return 0
    local mirror rootfs="$E2E_SCRATCH/debootstrap" start=$SECONDS
    mirror=$(debian_mirror)
    say "building $DEBIAN_TARBALL: debootstrap --variant=minbase bookworm from $mirror (cached for later runs)"
    mkdir -p "$(dirname "$DEBIAN_TARBALL")"
    quietly debootstrap --variant=minbase bookworm "$rootfs" "$mirror" ||
        die "debootstrap failed (is $mirror reachable?)"
    tar --numeric-owner --xattrs --xattrs-include='*' --format=posix -C "$rootfs" -cpf "$DEBIAN_TARBALL.tmp.$$" . ||
        die "could not write $DEBIAN_TARBALL"
    mv "$DEBIAN_TARBALL.tmp.$$" "$DEBIAN_TARBALL"
    rm -rf "$rootfs"
    say "rootfs tarball ready: $(du -h "$DEBIAN_TARBALL" | cut -f1) in $((SECONDS - start)) s"
}

# --- lcfs --------------------------------------------------------------------

# lcfs_build: sets LCFS_BIN, building target/release/lcfs unless LCFS_BIN is
# given. cargo is a no-op in a second or two when the binary is up to date.
lcfs_build() {
    if [[ -n ${LCFS_BIN:-} ]]; then
        [[ -x $LCFS_BIN ]] || die "LCFS_BIN=$LCFS_BIN is not an executable"
        return
    fi
    require_commands cargo
    say "building lcfs (cargo build --release -p lcfs)"
    (cd "$E2E_REPO" && quietly cargo build --release -p lcfs) ||
        die "lcfs does not build; fix the build (see the cargo output above)"
    LCFS_BIN="$E2E_REPO/target/release/lcfs"
    [[ -x $LCFS_BIN ]] || die "cargo built, but $LCFS_BIN is missing"
}

# lcfs_mkfs: makes a fresh lcfs device file on the scratch ext4.
lcfs_mkfs() {
    LCFS_DEVICE="$E2E_SCRATCH/lcfs.device"
    # The mountpoint's parent is root's alone (the daemon insists: other
    # users must not reach the layers); see docs/fuse.md.
    LCFS_MOUNT="$E2E_WORK/lcfs/mnt"
    LCFS_SOCKET="$E2E_WORK/control.sock"
    LCFS_LOG="$E2E_WORK/daemon.log"
    rm -f "$LCFS_DEVICE"
    quietly "$LCFS_BIN" mkfs "$LCFS_DEVICE" --size "$LCFS_DEVICE_SIZE" ||
        die "lcfs mkfs $LCFS_DEVICE --size $LCFS_DEVICE_SIZE failed"
    install -d -m 0700 "$E2E_WORK/lcfs"
    mkdir -p "$LCFS_MOUNT"
}

# lcfs_passthrough: whether LCFS_DAEMON_ARGS asks for --passthrough.
lcfs_passthrough() {
    [[ " ${LCFS_DAEMON_ARGS:-} " == *" --passthrough "* ]]
}

# fuse_wake_here: the kernel's fuse.wake_here for a benchmark's summary
# (docs/fuse.md, "Wake-ups"): "fuse.wake_here Y", "... N" or "no fuse.wake_here".
fuse_wake_here() {
    local p=/sys/module/fuse/parameters/wake_here
    if [[ -r $p ]]; then echo "fuse.wake_here $(cat "$p")"; else echo "no fuse.wake_here"; fi
}

# lcfs_copies_path: where a daemon run with --passthrough mounts its copies
# mount (fsfront's copies_path: `.<name>-copies` beside $LCFS_MOUNT).
lcfs_copies_path() {
    echo "$(dirname "$LCFS_MOUNT")/.$(basename "$LCFS_MOUNT")-copies"
}

# lcfs_start: starts the daemon in the background (log in $LCFS_LOG, pid in
# $LCFS_PID) and waits until the FUSE mount and the control socket answer.
lcfs_start() {
    [[ -z $LCFS_PID ]] || die "internal: lcfs_start with a daemon already running ($LCFS_PID)"
    echo "--- lcfs daemon start $(date -Is)" >>"$LCFS_LOG"
    local plugin=() containerd=()
    [[ -z $LCFS_PLUGIN ]] || plugin=(--docker-plugin-socket "/run/docker/plugins/$LCFS_PLUGIN.sock")
    if [[ -n $LCFS_CONTAINERD_SOCKET ]]; then
        # A daemon without the service would refuse the flag and exit;
        # lcfs_snapshotter_wait says what is missing instead.
        ! lcfs_has_containerd || containerd=(--containerd-socket "$LCFS_CONTAINERD_SOCKET")
        # Where the daemon's differ reads layer blobs: the private
        # containerd's socket (lib-containerd.sh sets it).
        if [[ -n ${LCFS_CONTAINERD_ADDRESS:-} ]] && lcfs_has_containerd_diff; then
            containerd+=(--containerd-address "$LCFS_CONTAINERD_ADDRESS")
        fi
    elif lcfs_has_containerd; then
        containerd=(--no-containerd)
    fi
    # LCFS_DAEMON_ARGS: more daemon options, split on spaces.
    local extra=()
    read -r -a extra <<<"${LCFS_DAEMON_ARGS:-}"
    RUST_LOG=${RUST_LOG:-info} "$LCFS_BIN" daemon --device "$LCFS_DEVICE" \
        --mount "$LCFS_MOUNT" --control-socket "$LCFS_SOCKET" "${plugin[@]}" "${containerd[@]}" \
        "${extra[@]}" >>"$LCFS_LOG" 2>&1 &
    LCFS_PID=$!
    # Recorded at once: from here the trap owns the mount, even half made.
    [[ " ${E2E_MOUNTS[*]} " == *" $LCFS_MOUNT "* ]] || E2E_MOUNTS+=("$LCFS_MOUNT")
    # --passthrough mounts the copies beside it.
    local copies
    copies=$(lcfs_copies_path)
    if lcfs_passthrough && [[ " ${E2E_MOUNTS[*]} " != *" $copies "* ]]; then
        E2E_MOUNTS+=("$copies")
    fi
    local waited=0
    until [[ $(findmnt -n -o FSTYPE --mountpoint "$LCFS_MOUNT" 2>/dev/null) == fuse* ]] &&
        [[ -S $LCFS_SOCKET ]] && lcfs_ctl layer ls >/dev/null 2>&1; do
        if ! kill -0 "$LCFS_PID" 2>/dev/null; then
            local status=0
            wait "$LCFS_PID" || status=$?
            LCFS_PID=""
            lcfs_log_tail
            die "lcfs daemon exited with status $status before mounting"
        fi
        waited=$((waited + 1))
        if [[ $waited -gt 300 ]]; then
            lcfs_log_tail
            die "lcfs daemon did not mount $LCFS_MOUNT and answer on $LCFS_SOCKET within 30 s"
        fi
        sleep 0.1
    done
}

# lcfs_has_containerd: whether this lcfs daemon can serve containerd's
# snapshots API (it knows --containerd-socket).
LCFS_HAS_CONTAINERD=""
# lcfs_has_containerd_diff: whether the daemon serves containerd's diff
# service (it takes --containerd-address).
lcfs_has_containerd_diff() {
    "$LCFS_BIN" daemon --help 2>/dev/null | grep -q -- --containerd-address
}

lcfs_has_containerd() {
    if [[ -z $LCFS_HAS_CONTAINERD ]]; then
        local help
        help=$("$LCFS_BIN" daemon --help 2>/dev/null || true)
        LCFS_HAS_CONTAINERD=no
        [[ $help != *--containerd-socket* ]] || LCFS_HAS_CONTAINERD=yes
    fi
    [[ $LCFS_HAS_CONTAINERD == yes ]]
}

# lcfs_stop: clean shutdown (SIGTERM); the daemon must exit 0 and unmount.
lcfs_stop() {
    [[ -n $LCFS_PID ]] || return 0
    kill -TERM "$LCFS_PID" 2>/dev/null || true
    local status=0 waited=0
    while kill -0 "$LCFS_PID" 2>/dev/null; do
        waited=$((waited + 1))
        if [[ $waited -gt 600 ]]; then
            lcfs_log_tail
            die "lcfs daemon did not exit within 60 s of SIGTERM"
        fi
        sleep 0.1
    done
    wait "$LCFS_PID" || status=$?
    LCFS_PID=""
    if [[ $status -ne 0 ]]; then
        lcfs_log_tail
        die "lcfs daemon exited with status $status after SIGTERM (expected 0)"
    fi
    if grep -qF " $LCFS_MOUNT " /proc/self/mounts; then
        die "lcfs daemon exited after SIGTERM but left $LCFS_MOUNT mounted"
    fi
}

# lcfs_kill9: kills the daemon with SIGKILL and removes the dead mount.
lcfs_kill9() {
    [[ -n $LCFS_PID ]] || die "internal: lcfs_kill9 without a daemon"
    kill -KILL "$LCFS_PID"
    wait "$LCFS_PID" 2>/dev/null || true
    LCFS_PID=""
    echo "--- lcfs daemon killed with SIGKILL $(date -Is)" >>"$LCFS_LOG"
    # The dead daemon's mount answers ENOTCONN until it is unmounted.
    if grep -qF " $LCFS_MOUNT " /proc/self/mounts; then
        umount -l "$LCFS_MOUNT" || die "could not unmount the dead lcfs mount $LCFS_MOUNT"
    fi
}

# lcfs_gc_kill9_mid_pass: starts a garbage-collection pass (`lcfs gc`) and
# kills the daemon (-9) as soon as the pass logs its first removal; sets
# GC_REMOVED_BEFORE_KILL to the images it logged removed before it died.
lcfs_gc_kill9_mid_pass() {
    local before pass_pid
    before=$(grep -c "gc: removed image" "$LCFS_LOG" || true)
    lcfs_ctl gc --json >"$E2E_WORK/killed-pass.json" 2>&1 &
    pass_pid=$!
    for _ in $(seq 1000); do
        [[ $(grep -c "gc: removed image" "$LCFS_LOG" || true) -gt $before ]] && break
        sleep 0.01
    done
    lcfs_kill9
    wait "$pass_pid" 2>/dev/null || true
    GC_REMOVED_BEFORE_KILL=$(grep "gc: removed image" "$LCFS_LOG" | tail -n +$((before + 1)) |
        sed 's/.*removed image //' | paste -sd' ')
}

# lcfs_ctl ARGS...: the management CLI against our daemon.
lcfs_ctl() {
    "$LCFS_BIN" --control-socket "$LCFS_SOCKET" "$@"
}

lcfs_log_tail() {
    [[ -f ${LCFS_LOG:-} ]] || return 0
    echo "$E2E_NAME: last lines of the daemon log ($LCFS_LOG):" >&2
    tail -n 30 "$LCFS_LOG" | sed 's/^/    /' >&2
}

# lcfs_check_log: a panic in the daemon is a failure even if every check
# passed (the kernel saw an errno, the user would see a dead thread).
lcfs_check_log() {
    [[ -f ${LCFS_LOG:-} ]] || return 0
    if grep -q 'panicked' "$LCFS_LOG"; then
        grep -m 5 -A 3 'panicked' "$LCFS_LOG" | sed 's/^/    /' >&2
        keep_artifacts "$LCFS_LOG"
        fail "the lcfs daemon panicked (log: $E2E_ARTIFACTS/$(basename "$LCFS_LOG"))"
    fi
}

# --- targets -------------------------------------------------------------------

# target_start: prepares the target named by E2E_TARGET (lcfs: build, mkfs,
# start the daemon).
target_start() {
    case $E2E_TARGET in
        lcfs)
            lcfs_build
            lcfs_mkfs
            lcfs_start
            say "lcfs daemon $LCFS_PID mounted on $LCFS_MOUNT (device $LCFS_DEVICE)"
            ;;
        ext4 | overlay) ;;
    esac
}

# target_dir NAME: sets TARGET_PATH to a fresh, empty, writable directory on
# the target: a new layer on lcfs, a new overlayfs mount, or a directory on
# ext4. (A variable, not output: a $(...) subshell would lose the mount
# record and turn die into a silent subshell exit.)
target_dir() {
    local name=$1
    case $E2E_TARGET in
        lcfs)
            quietly lcfs_ctl layer create "$name" || die "lcfs layer create $name failed"
            [[ -d $LCFS_MOUNT/$name ]] || die "layer $name was created but $LCFS_MOUNT/$name is not a directory"
            TARGET_PATH="$LCFS_MOUNT/$name"
            ;;
        ext4)
            mkdir "$E2E_SCRATCH/$name"
            TARGET_PATH="$E2E_SCRATCH/$name"
            ;;
        overlay)
            mkdir -p "$E2E_SCRATCH/.lower-$name"
            overlay_mount "$E2E_SCRATCH/.lower-$name" "$E2E_WORK/$name"
            TARGET_PATH="$E2E_WORK/$name"
            ;;
    esac
}

# target_clone PARENT NAME: sets TARGET_PATH to a directory that starts as a copy of the
# target directory PARENT. On lcfs a layer clone (the parent becomes frozen);
# on overlay an overlayfs stacked on PARENT's layers (as Docker stacks them:
# overlayfs cannot use another overlayfs mount as a lower layer at this
# stacking depth); on ext4 `cp -a`, which only proves the checking logic.
target_clone() {
    local parent=$1 name=$2
    case $E2E_TARGET in
        lcfs)
            quietly lcfs_ctl layer clone "$parent" "$name" || die "lcfs layer clone $parent $name failed"
            [[ -d $LCFS_MOUNT/$name ]] || die "layer $name was cloned but $LCFS_MOUNT/$name is not a directory"
            TARGET_PATH="$LCFS_MOUNT/$name"
            ;;
        ext4)
            cp -a "$E2E_SCRATCH/$parent" "$E2E_SCRATCH/$name"
            TARGET_PATH="$E2E_SCRATCH/$name"
            ;;
        overlay)
            [[ -n ${E2E_OVERLAY_LAYERS[$E2E_WORK/$parent]:-} ]] ||
                die "internal: $E2E_WORK/$parent is not an overlay made by target_dir or target_clone"
            overlay_mount "${E2E_OVERLAY_LAYERS[$E2E_WORK/$parent]}" "$E2E_WORK/$name"
            TARGET_PATH="$E2E_WORK/$name"
            ;;
    esac
}

# target_finish: stops lcfs cleanly (a failed shutdown is a failure) and
# checks its log for panics.
target_finish() {
    if [[ $E2E_TARGET == lcfs ]]; then
        lcfs_stop
        lcfs_check_log
    fi
}

# --- docker ------------------------------------------------------------------

# lcfs_plugin_name: makes the next lcfs_start also serve the graphdriver
# plugin, under a name of this run only (dockerd -s "$LCFS_PLUGIN"), so a
# check never meets another lcfs plugin on the machine.
lcfs_plugin_name() {
    LCFS_PLUGIN="lcfs-e2e-$$"
    mkdir -p /run/docker/plugins
}

# The Debian docker client, which matches its dockerd (another docker earlier
# in PATH may be newer and warn about the old API).
DOCKER_CLIENT=/usr/bin/docker
[[ -x $DOCKER_CLIENT ]] || DOCKER_CLIENT=docker

# dockerd_start NAME DRIVER [DOCKERD-ARGS...]: starts a private dockerd with
# storage driver DRIVER, its data root on the scratch ext4 (overlay2 needs a
# real file system under it) and its own exec root, socket and pidfile;
# waits until it answers. Sets nothing global but DOCKERD_PIDS/DOCKERD_DIRS:
# talk to it with `docker_cli NAME ...`.
dockerd_start() {
    local name=$1 driver=$2 dir pid
    shift 2
    require_commands dockerd containerd runc
    [[ -z ${DOCKERD_PIDS[$name]:-} ]] || die "internal: dockerd $name is already running"
    # Short: containerd's sockets live below the exec root (108-byte limit).
    dir="$E2E_WORK/d-$name"
    mkdir -p "$dir/exec" "$E2E_SCRATCH/docker-$name"
    DOCKERD_DIRS[$name]=$dir
    echo "--- dockerd $name start $(date -Is)" >>"$dir/dockerd.log"
    dockerd --experimental -s "$driver" \
        --data-root "$E2E_SCRATCH/docker-$name" --exec-root "$dir/exec" \
        -H "unix://$dir/docker.sock" -p "$dir/docker.pid" \
        --iptables=false --ip6tables=false --bridge=none --ip-forward=false \
        --ip-masq=false --userland-proxy=false "$@" >>"$dir/dockerd.log" 2>&1 &
    pid=$!
    DOCKERD_PIDS[$name]=$pid
    local waited=0
    until docker_cli "$name" version >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            unset "DOCKERD_PIDS[$name]"
            tail -n 30 "$dir/dockerd.log" | sed 's/^/    /' >&2
            die "dockerd $name ($driver) exited before answering"
        fi
        waited=$((waited + 1))
        if [[ $waited -gt 600 ]]; then
            tail -n 30 "$dir/dockerd.log" | sed 's/^/    /' >&2
            die "dockerd $name ($driver) did not answer within 60 s"
        fi
        sleep 0.1
    done
}

# docker_cli NAME ARGS...: the docker client against dockerd NAME.
docker_cli() {
    local name=$1
    shift
    "$DOCKER_CLIENT" -H "unix://$E2E_WORK/d-$name/docker.sock" "$@"
}

# dockerd_stop NAME: removes its containers, stops it (SIGTERM, SIGKILL
# after 60 s) and unmounts what it left below its directories.
dockerd_stop() {
    local name=$1 pid dir waited=0
    pid=${DOCKERD_PIDS[$name]:-}
    dir=${DOCKERD_DIRS[$name]:-}
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null && [[ $waited -lt 600 ]]; do
            waited=$((waited + 1))
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    unset "DOCKERD_PIDS[$name]"
    local mount
    for mount in $(awk -v a="$dir/" -v b="$E2E_SCRATCH/docker-$name/" \
        'index($2, a) == 1 || index($2, b) == 1 { print $2 }' /proc/self/mounts | sort -r); do
        umount -l "$mount" 2>/dev/null || true
    done
    return 0
}

# dockerd_log_tail NAME
dockerd_log_tail() {
    local log="$E2E_WORK/d-$1/dockerd.log"
    [[ -f $log ]] || return 0
    echo "$E2E_NAME: last lines of dockerd $1's log:" >&2
    tail -n 30 "$log" | sed 's/^/    /' >&2
}
