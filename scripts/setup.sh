#!/usr/bin/env bash
# Installs everything scripts/test.sh needs on Debian 12. Idempotent: when
# everything is present it prints nothing and returns in about a second, so
# test.sh runs it every time and a fresh machine (CI) sets itself up.
# Works without a terminal; needs root only when something is missing.
#
#   setup.sh          everything the tests use
#   setup.sh --demo [docker] [containerd]
#                     only what scripts/demo.sh uses for those parts (both by
#                     default): a few apt packages, Docker 20.10 for the
#                     docker part, containerd 1.7 for the containerd part (no
#                     Rust tools, no Docker 26, no registry)
#   setup.sh --deb-dir PACKAGE
#                     prints where the pinned Debian 13 PACKAGE is unpacked
#                     (fails if it is not); installs nothing
#
# Besides Debian 12's own packages, the containerd checks use a few Debian 13
# (trixie) packages: containerd 1.7 (Debian 12 has 1.6), docker.io and
# docker-cli 26.1 (Docker's containerd image store; Debian 12 has 20.10),
# docker-buildx 0.13 (the CLI plugin docker 26 builds with BuildKit through)
# and docker-registry 2.8 (a local registry to pull from). They are downloaded
# with apt against a private trixie sources list and state directory, checked
# against the SHA-256 sums pinned below and unpacked with `dpkg-deb -x` under
# $LCFS_DEB_CACHE (default /var/cache/lcfs/debs/<package>-<version>/). They
# are never installed: dpkg and the system's Docker 20.10 stay as they are.
# scripts/e2e/lib-containerd.sh puts them first in PATH for the private
# daemons it starts. Their remaining run-time needs (runc, tini, iptables)
# are met by Debian 12's packages, which docker.io 20.10 pulls in.
set -euo pipefail

mode=tests
case ${1:-} in
    "") ;;
    --demo)
        mode=demo
        shift
        demo_parts=("$@")
        [[ ${#demo_parts[@]} -gt 0 ]] || demo_parts=(docker containerd)
        for part in "${demo_parts[@]}"; do
            [[ $part == docker || $part == containerd ]] || {
                echo "setup.sh: unknown demo part '$part' (expected docker and/or containerd)" >&2
                exit 2
            }
        done
        ;;
    --deb-dir) mode=deb-dir ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "setup.sh: unknown argument '$1' (expected nothing or --demo)" >&2
        exit 2
        ;;
esac

# Pinned so every machine fuzzes with the same tool; 0.13.2 builds with
# `--locked` on Rust 1.95. Bump deliberately.
CARGO_FUZZ_VERSION=0.13.2
# The FUSE conformance tools (scripts/fuse-conformance.sh), pinned for the
# same reason: the baseline numbers in docs/fuse-conformance.md are theirs.
PJDFSTEST_VERSION=0.2.2
FSX_VERSION=0.3.2

# The Debian 13 packages: name, exact version, SHA-256 of the .deb. A point
# release of Debian 13 replaces a version on the mirrors; then the download
# fails with a message saying so: bump the version and sum here (the new
# ones: `apt-cache policy`/`apt-cache show` against trixie, as
# trixie_apt below does), or point LCFS_TRIXIE_MIRROR at a mirror that
# still has them.
TRIXIE_DEBS=(
    "containerd 1.7.24~ds1-6+deb13u1 ed708deb96fe476a3bce4efa5c0538dfbcf717ab9a7c7944ba7260342c25899c"
    "docker.io 26.1.5+dfsg1-9+deb13u1+b1 53ae1a99f15113f0a0d2226808ec0d24ee31b3b87b87ab8ec35be09a1a2ee13b"
    "docker-cli 26.1.5+dfsg1-9+deb13u1+b1 596647bc4ffaaaf2e2321116b8a10f6a6086ada797c17a7117798cb391a72776"
    "docker-buildx 0.13.1+ds1-3 fcf8c48204d1603c8f209451d7827eb91bf30759578baf7704e9e1a87e5f1d7f"
    "docker-registry 2.8.3+ds1-2+b8 f0577a2581fbf090716d8bd57f14d0b25a25eba6c87c3a8c252ddbf1a6bd0470"
)
# Debian 12 packages unpacked the same way (not installed: this one depends
# on most of containerd's Go sources, and only its estargz package is built).
BOOKWORM_DEBS=(
    "golang-github-containerd-stargz-snapshotter-dev 0.12.0-2 7d202748ee2bd4d9d852cea6e11e8a1054acf00faa22cbedde22123eb84946c3 bookworm"
)
DEMO_TRIXIE_DEBS=()
[[ $mode != demo || " ${demo_parts[*]} " != *" containerd "* ]] || DEMO_TRIXIE_DEBS=(containerd)
LCFS_DEB_CACHE=${LCFS_DEB_CACHE:-/var/cache/lcfs/debs}

if [[ $mode == deb-dir ]]; then
    for entry in "${TRIXIE_DEBS[@]}" "${BOOKWORM_DEBS[@]}"; do
        read -r name version sum _ <<<"$entry"
        [[ $name == "${2:-}" ]] || continue
        dir="$LCFS_DEB_CACHE/$name-$version"
        if [[ -f $dir/.lcfs-unpacked && $(cat "$dir/.lcfs-unpacked") == "$sum" ]]; then
            echo "$dir"
            exit 0
        fi
        echo "setup.sh: $name $version is not unpacked in $dir; run scripts/setup.sh" >&2
        exit 1
    done
    echo "setup.sh: no Debian package '${2:-}' is pinned here" >&2
    exit 2
fi

# fio: I/O baselines; fuse3: the FUSE front; util-linux: losetup; fuse-overlayfs: the FUSE peer in benchmarks;
# e2fsprogs/btrfs-progs: reference filesystems in loop images; debootstrap:
# test images; kmod: modprobe; docker.io: graphdriver tests (installed, never
# started here), and with it runc and tini, which the Debian 13 containerd
# and dockerd use too; g++: libfuzzer-sys compiles libFuzzer (C++); python3: the
# e2e checks' tree manifests (scripts/e2e/tree.py); busybox-static: the small
# image the Docker checks build (scripts/e2e/images.py); fonts-dejavu-core: the
# benchmark charts' text (lcfs-bench-report); prometheus: the server that
# scrapes three daemons in scripts/e2e/prometheus.sh (installed, its service
# never started here); fsverity: the independent file digests that layer
# digests are checked against; openssl: the CA and certificate of the HTTPS
# registry the mirrors pull from (scripts/e2e/containerd.sh, part f);
# golang-go and four Go sources: the build of the eStargz reference
# implementation that lcfs's eStargz layers are checked against
# (scripts/e2e/estargz.sh; its own source is in BOOKWORM_DEBS below).
APT_PACKAGES=(
    fio fuse3 util-linux e2fsprogs btrfs-progs debootstrap kmod docker.io runc tini fuse-overlayfs
    jq curl ca-certificates g++ python3 busybox-static fonts-dejavu-core prometheus fsverity openssl
    golang-go golang-github-opencontainers-go-digest-dev golang-github-vbatts-tar-split-dev
    golang-github-klauspost-compress-dev golang-golang-x-sync-dev
)
# What scripts/demo.sh uses: the FUSE front, runc, the image builder
# (python3, busybox-static), and for its docker part Docker 20.10.
DEMO_APT_PACKAGES=(fuse3 util-linux runc python3 busybox-static ca-certificates)
if [[ $mode == demo ]]; then
    APT_PACKAGES=("${DEMO_APT_PACKAGES[@]}")
    [[ " ${demo_parts[*]} " != *" docker "* ]] || APT_PACKAGES+=(docker.io)
fi

export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

say() { echo "setup.sh: $*"; }
die() {
    echo "setup.sh: error: $*" >&2
    exit 1
}

# Runs a command with its output captured; shows the output only on failure.
quietly() {
    local log status=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || status=$?
    if [[ $status -ne 0 ]]; then
        cat "$log" >&2
        echo "setup.sh: failed (exit $status): $*" >&2
    fi
    rm -f "$log"
    return "$status"
}

is_root() { [[ $(id -u) -eq 0 ]]; }

# --- apt packages ---------------------------------------------------------
missing=()
for package in "${APT_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
    [[ $status == installed ]] || missing+=("$package")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    is_root || die "missing packages (${missing[*]}); run as root to install them"
    say "installing apt packages: ${missing[*]}"
    # Keep services (dockerd, containerd) from starting during the install;
    # policy-rc.d is Debian's switch for that. Only ours if none exists.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt_options=(-q -y -o DPkg::Lock::Timeout=300
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    quietly apt-get "${apt_options[@]}" update
    quietly apt-get "${apt_options[@]}" install --no-install-recommends "${missing[@]}"
fi

# --- Debian 13 packages, unpacked, never installed -------------------------

# The mirror the system's apt uses (deb822 or one-line sources), Debian's by
# default; LCFS_TRIXIE_MIRROR overrides it.
trixie_mirror() {
    local uri
    uri=$(grep -hsE '^\s*(URIs:|deb\s)' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources | grep -v -- '-security' |
        grep -oE 'https?://[^ ]*/debian/?' | head -n 1 || true)
    echo "${LCFS_TRIXIE_MIRROR:-${uri:-http://deb.debian.org/debian}}"
}

# trixie_apt ARGS...: apt-get with a private configuration that sees only
# Debian 13 main: its own sources list, package lists, archive cache and an
# empty dpkg status, so the system's apt state is neither read nor changed.
trixie_apt_dir="$LCFS_DEB_CACHE/apt"
trixie_apt_options=(
    -q -o "Dir::Etc::sourcelist=$trixie_apt_dir/sources.list" -o "Dir::Etc::sourceparts=$trixie_apt_dir/sources.list.d"
    -o "Dir::Etc::preferences=$trixie_apt_dir/preferences" -o "Dir::Etc::preferencesparts=$trixie_apt_dir/preferences.d"
    -o "Dir::State::Lists=$trixie_apt_dir/lists" -o "Dir::State::status=$trixie_apt_dir/status"
    -o "Dir::Cache=$trixie_apt_dir/cache" -o "Dir::Cache::archives=$trixie_apt_dir/archives"
    -o APT::Architecture=amd64 -o APT::Sandbox::User=root
)
trixie_apt() { apt-get "${trixie_apt_options[@]}" "$@"; }

trixie_apt_ready=0
trixie_apt_update() {
    [[ $trixie_apt_ready == 1 ]] && return 0
    mkdir -p "$trixie_apt_dir"/{sources.list.d,preferences.d,lists/partial,cache,archives/partial}
    : >"$trixie_apt_dir/status"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(trixie_mirror) trixie main" \
        >"$trixie_apt_dir/sources.list"
    quietly trixie_apt update || die "apt-get update against trixie failed (mirror $(trixie_mirror))"
    trixie_apt_ready=1
}

# A package is ready when its directory holds the stamp written after the
# checksum was verified and the unpack finished; then nothing runs.
wanted_debs=()
for entry in "${TRIXIE_DEBS[@]}" "${BOOKWORM_DEBS[@]}"; do
    read -r name version sum _ <<<"$entry"
    if [[ $mode == demo && " ${DEMO_TRIXIE_DEBS[*]} " != *" $name "* ]]; then
        continue
    fi
    dir="$LCFS_DEB_CACHE/$name-$version"
    [[ -f $dir/.lcfs-unpacked && $(cat "$dir/.lcfs-unpacked") == "$sum" ]] || wanted_debs+=("$entry")
done
if [[ ${#wanted_debs[@]} -gt 0 ]]; then
    is_root || die "pinned Debian packages are not unpacked in $LCFS_DEB_CACHE; run as root"
    mkdir -p "$LCFS_DEB_CACHE"
    # One setup at a time fills the cache; a second one waits, then finds
    # the packages ready.
    exec {deb_cache_lock}>"$LCFS_DEB_CACHE/.lock"
    flock "$deb_cache_lock"
fi
for entry in "${wanted_debs[@]}"; do
    read -r name version sum suite <<<"$entry"
    dir="$LCFS_DEB_CACHE/$name-$version"
    [[ -f $dir/.lcfs-unpacked && $(cat "$dir/.lcfs-unpacked") == "$sum" ]] && continue
    deb="$LCFS_DEB_CACHE/archives/${name}_${version}_amd64.deb"
    [[ $suite != bookworm ]] || deb="$LCFS_DEB_CACHE/archives/${name}_${version}_all.deb"
    mkdir -p "$LCFS_DEB_CACHE/archives"
    if [[ ! -f $deb ]] || ! echo "$sum  $deb" | sha256sum --check --status; then
        rm -f "$deb"
        if [[ $suite == bookworm ]]; then
            say "downloading Debian 12 $name $version"
            (cd "$LCFS_DEB_CACHE/archives" && quietly apt-get download "$name=$version") ||
                die "could not download $name $version; update BOOKWORM_DEBS in scripts/setup.sh"
        else
            say "downloading Debian 13 $name $version"
            trixie_apt_update
            available=$(apt-cache "${trixie_apt_options[@]}" policy "$name" 2>/dev/null |
                awk '/Candidate:/ { print $2 }' || true)
            (cd "$LCFS_DEB_CACHE/archives" && quietly trixie_apt download "$name=$version") ||
                die "could not download $name $version from trixie (the mirror has ${available:-no version}); update TRIXIE_DEBS in scripts/setup.sh"
        fi
        # apt names the file after the version with ':' escaped; there is no epoch here.
        [[ -f $deb ]] || die "apt-get download of $name $version did not write $deb"
    fi
    echo "$sum  $deb" | sha256sum --check --status ||
        die "SHA-256 of $deb is $(sha256sum "$deb" | cut -d' ' -f1), expected $sum (pinned in scripts/setup.sh)"
    rm -rf "$dir" "$dir.tmp"
    mkdir -p "$dir.tmp"
    dpkg-deb -x "$deb" "$dir.tmp" || die "dpkg-deb -x $deb failed"
    echo "$sum" >"$dir.tmp/.lcfs-unpacked"
    mv "$dir.tmp" "$dir"
    say "unpacked $name $version in $dir"
done

# --- kernel: FUSE wake-ups (demo and tests) -------------------------------
# Where the kernel has fuse.wake_here, turn it on: a FUSE request and its
# answer then run on the caller's CPU instead of waking a halted one each
# round trip (docs/fuse.md, "Wake-ups"; untar into a layer about 3x faster).
# Host-wide, for every FUSE filesystem, and not kept across a reboot
# (packaging/lcfs-fuse-wakeup.conf keeps it).
wake_here=/sys/module/fuse/parameters/wake_here
if [[ -w $wake_here && $(cat "$wake_here") != Y ]]; then
    echo Y >"$wake_here" && say "turned on fuse.wake_here ($wake_here; docs/fuse.md, \"Wake-ups\")"
fi

# --- Rust toolchain ------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 ||
    die "cargo not found: install Rust with rustup (https://rustup.rs) first"
# The demo only builds lcfs; the rest is for the checks.
[[ $mode == demo ]] && exit 0

for component in rustfmt clippy; do
    # `cargo fmt` / `cargo clippy` exist exactly when the component does.
    subcommand=${component/rustfmt/fmt}
    if ! cargo "$subcommand" --version >/dev/null 2>&1; then
        command -v rustup >/dev/null 2>&1 || die "cargo $subcommand missing and no rustup to add $component"
        say "adding rustup component $component"
        quietly rustup component add "$component"
    fi
done

if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz $CARGO_FUZZ_VERSION (a few minutes)"
    quietly cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

# pjdfstest and fsx, each only when missing (cargo puts them in ~/.cargo/bin).
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
for tool in "pjdfstest $PJDFSTEST_VERSION" "fsx $FSX_VERSION"; do
    name=${tool% *}
    version=${tool#* }
    if [[ ! -x $cargo_bin/$name ]] && ! command -v "$name" >/dev/null 2>&1; then
        say "installing $name $version (a minute or two)"
        quietly cargo install "$name" --version "$version" --locked
    fi
done

# --- users ---------------------------------------------------------------
# pjdfstest switches to the users nobody and tests for its permission tests.
if ! id tests >/dev/null 2>&1; then
    is_root || die "user 'tests' is missing (pjdfstest needs it); run as root to create it"
    say "creating the system user 'tests' for pjdfstest"
    quietly useradd --system --user-group tests
fi

# --- kernel --------------------------------------------------------------
if [[ ! -e /dev/loop-control ]]; then
    is_root || die "/dev/loop-control is missing; run as root to load the loop module"
    say "loading the loop module"
    quietly modprobe loop
    [[ -e /dev/loop-control ]] || die "modprobe loop succeeded but /dev/loop-control is still missing"
fi
