#!/usr/bin/env bash
# Installs everything scripts/test.sh needs on Debian 12. Idempotent: when
# everything is present it prints nothing and returns in about a second, so
# test.sh runs it every time and a fresh machine (CI) sets itself up.
# Works without a terminal; needs root only when something is missing.
set -euo pipefail

# Pinned so every machine fuzzes with the same tool; 0.13.2 builds with
# `--locked` on Rust 1.95. Bump deliberately.
CARGO_FUZZ_VERSION=0.13.2
# The FUSE conformance tools (scripts/fuse-conformance.sh), pinned for the
# same reason: the baseline numbers in docs/fuse-conformance.md are theirs.
PJDFSTEST_VERSION=0.2.2
FSX_VERSION=0.3.2

# fio: I/O baselines; fuse3: the FUSE front; util-linux: losetup; fuse-overlayfs: the FUSE peer in benchmarks;
# e2fsprogs/btrfs-progs: reference filesystems in loop images; debootstrap:
# test images; kmod: modprobe; docker.io: graphdriver tests (installed, never
# started here); g++: libfuzzer-sys compiles libFuzzer (C++); python3: the
# e2e checks' tree manifests (scripts/e2e/tree.py); busybox-static: the small
# image the Docker checks build (scripts/e2e/images.py); fonts-dejavu-core: the
# benchmark charts' text (lcfs-bench-report).
APT_PACKAGES=(
    fio fuse3 util-linux e2fsprogs btrfs-progs debootstrap kmod docker.io fuse-overlayfs
    jq curl ca-certificates g++ python3 busybox-static fonts-dejavu-core
)

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

# --- Rust toolchain ------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 ||
    die "cargo not found: install Rust with rustup (https://rustup.rs) first"
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
