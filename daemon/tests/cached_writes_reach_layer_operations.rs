//! Proves that with the mount's writeback cache, writes into a file that stays open (never fsynced nor closed) are in the engine before a layer operation reads it: a clone and its frozen parent show them, `layer stat` counts them, `lcfs sync` makes them survive kill -9, and a write into a file left open while its layer froze fails at fsync instead of vanishing silently.
//!
//! The kernel usually writes a FUSE mount's dirty pages back within milliseconds
//! on its own (its per-mount dirty limit starts tiny), so this passes even when
//! nothing asks it to; what makes it certain, the write-back each of those
//! operations requests first, is checked call by call in the control's unit
//! tests (daemon/src/control.rs) and the plugin's (protocol_endpoints.rs).

mod common;

use common::{require_root_and_fuse, Harness};
use serde_json::Value;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

const KIB: usize = 1 << 10;

/// 256 KiB of bytes that differ at every offset of a file.
fn pattern(seed: u8) -> Vec<u8> {
    (0..256 * KIB)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// Creates `path`, writes `data` into it and keeps it open (no fsync, no close).
fn write_and_hold(path: &Path, data: &[u8]) -> File {
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(path)
        .unwrap();
    file.write_all(data).unwrap();
    file
}

#[test]
fn writes_held_by_the_kernel_reach_clone_stat_and_sync() {
    require_root_and_fuse();
    let mut h = Harness::new();
    h.mkfs();
    h.start();
    let mnt = h.mountpoint.clone();

    h.ok(&["layer", "create", "base"]);
    let data = pattern(1);
    let mut open = write_and_hold(&mnt.join("base/held"), &data);

    // `layer stat` writes back first: the bytes are counted.
    let stat: Value = serde_json::from_str(&h.ok(&["layer", "stat", "base", "--json"])).unwrap();
    assert!(
        stat["owned_bytes"].as_u64().unwrap() >= data.len() as u64,
        "layer stat counts the cached writes: {stat}"
    );

    // The clone reads the engine (its inodes are new to the kernel).
    h.ok(&["layer", "clone", "base", "copy"]);
    assert!(
        fs::read(mnt.join("copy/held")).unwrap() == data,
        "the clone sees what the open file held in the page cache"
    );
    assert!(fs::read(mnt.join("base/held")).unwrap() == data);

    // The file is still open for writing in a layer that is now frozen: the
    // kernel takes the write into its cache, writing it back fails, and the
    // writer learns it at fsync (without the writeback cache, write(2) itself
    // fails with EROFS).
    open.write_all(b"too late").unwrap();
    let refused = open
        .sync_all()
        .expect_err("fsync of a write into a frozen layer");
    assert!(
        matches!(refused.raw_os_error(), Some(libc::EIO | libc::EROFS)),
        "{refused}"
    );
    drop(open);
    assert!(
        fs::read(mnt.join("copy/held")).unwrap() == data,
        "the refused write reached neither layer"
    );

    // `lcfs sync` writes back too: after kill -9 the data is there.
    h.ok(&["layer", "create", "synced"]);
    let synced = pattern(2);
    let open = write_and_hold(&mnt.join("synced/held"), &synced);
    h.ok(&["sync"]);
    h.stop_with(libc::SIGKILL);
    drop(open);
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&mnt)
        .status();
    h.start();
    assert!(
        fs::read(mnt.join("synced/held")).unwrap() == synced,
        "lcfs sync made the cached writes durable"
    );
    assert!(fs::read(mnt.join("copy/held")).unwrap() == data);
    let report = h.ok(&["fsck", "--online", "--verify-data"]);
    assert!(report.contains("clean"), "{report}");
}
