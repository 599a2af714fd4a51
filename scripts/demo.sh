#!/usr/bin/env bash
# The main job: builds lcfs in release and runs the engine demo on a fresh
# 1 GiB sparse device file under ${LCFS_DEMO_DIR:-/var/tmp/lcfs-demo}.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi

# Checked first so a missing demo fails in a second, not after a full build.
if [[ ! -f engine/examples/demo.rs ]]; then
    echo "demo.sh: the demo is not built yet (engine/examples/demo.rs does not exist)" >&2
    exit 1
fi

demo_dir=${LCFS_DEMO_DIR:-/var/tmp/lcfs-demo}
device="$demo_dir/device.img"

bash scripts/setup.sh
echo "demo.sh: building the workspace (release)"
cargo build --workspace --release

# A fresh sparse file each run, so the demo always starts from an empty device.
mkdir -p "$demo_dir"
rm -f "$device"
truncate -s 1G "$device"
echo "demo.sh: device file $device (1 GiB, sparse)"

cargo run --release -p lcfs-engine --example demo -- "$device"
