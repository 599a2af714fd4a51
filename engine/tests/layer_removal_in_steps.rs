//! A layer's removal frees what it owned in steps, the store lock let go
//! between them: other layers are read and written meanwhile, the name is
//! free at once, a checkpoint in between finishes the removal first (none
//! is ever recorded half freed), and a crash between steps leaves the last
//! checkpoint whole.

use lcfs_engine::device::MemDevice;
use lcfs_engine::*;
use std::sync::Arc;

mod common;
use common::{assert_clean, fresh, quiet};

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 251) as u8)
        .collect()
}

/// A layer of `files` files of 256 KiB each; their inodes.
fn filled(e: &Engine, name: &str, files: u32) -> (u64, Vec<u64>) {
    let l = e.create_layer(name, true).unwrap();
    let inodes = (0..files)
        .map(|i| {
            let f = e
                .create(l, ROOT_INODE, format!("f{i}").as_bytes(), 0o644, 0, 0)
                .unwrap();
            e.write(l, f.inode, 0, &pattern(i, 256 << 10)).unwrap();
            f.inode
        })
        .collect();
    (l, inodes)
}

/// File `name` in the root of layer `l` holds `pattern(seed, len)`.
fn holds(e: &Engine, l: u64, name: &[u8], seed: u32, len: usize) {
    let f = e.lookup(l, ROOT_INODE, name).unwrap();
    assert_eq!(e.read(l, f.inode, 0, len).unwrap(), pattern(seed, len));
}

/// The engine on `dev` opened again, fsck clean, and its layer `other`
/// still holding `files`.
fn reopened(dev: Arc<MemDevice>, files: &[u64]) -> (Arc<Engine>, u64) {
    let e = Engine::open(dev, quiet()).unwrap();
    assert_clean(&e);
    let other = e.layer_id("other").unwrap();
    reads_back(&e, other, files);
    (e, other)
}

fn reads_back(e: &Engine, l: u64, inodes: &[u64]) {
    for (i, ino) in inodes.iter().enumerate() {
        assert_eq!(
            e.read(l, *ino, 0, 256 << 10).unwrap(),
            pattern(i as u32, 256 << 10),
            "file f{i} of layer {l}"
        );
    }
}

#[test]
fn other_layers_go_on_between_steps_and_a_checkpoint_finishes_the_removal() {
    let (dev, e) = fresh(256 << 20);
    let (other, other_files) = filled(&e, "other", 4);
    e.sync().unwrap();
    let live_before = e.stats().live_bytes;
    filled(&e, "big", 64);
    e.sync().unwrap();
    assert!(e.stats().live_bytes >= live_before + (16 << 20));

    e.begin_remove_layer("big").unwrap();
    assert!(e.layer_id("big").is_err(), "the name is gone at once");
    assert!(
        !e.remove_steps(3).unwrap(),
        "a 16 MiB layer takes more than 3 steps"
    );
    // Between steps: reads and writes of another layer, and the name made
    // again.
    reads_back(&e, other, &other_files);
    let again = e.create_layer("big", false).unwrap();
    let f = e.create(again, ROOT_INODE, b"new", 0o644, 0, 0).unwrap();
    e.write(again, f.inode, 0, &pattern(99, 8192)).unwrap();
    let g = e.create(other, ROOT_INODE, b"late", 0o644, 0, 0).unwrap();
    e.write(other, g.inode, 0, &pattern(7, 65536)).unwrap();
    // The checkpoint finishes the removal before it records anything.
    e.sync().unwrap();
    assert!(
        e.remove_steps(1).unwrap(),
        "nothing left to free after a checkpoint"
    );
    assert_clean(&e);
    let live = e.stats().live_bytes;
    assert!(
        live < live_before + (1 << 20),
        "{live} bytes live, {live_before} before the big layer: its 16 MiB are not all freed"
    );
    drop(e);

    let (e, other) = reopened(dev, &other_files);
    holds(&e, other, b"late", 7, 65536);
    holds(&e, e.layer_id("big").unwrap(), b"new", 99, 8192);
}

#[test]
fn a_crash_between_steps_leaves_the_last_checkpoint_whole() {
    let (dev, e) = fresh(256 << 20);
    let (other, other_files) = filled(&e, "other", 2);
    let (_, big_files) = filled(&e, "big", 32);
    e.sync().unwrap();

    e.begin_remove_layer("big").unwrap();
    assert!(!e.remove_steps(4).unwrap());
    // An fsync of another layer's file between steps: durable whether it
    // logs a record or checkpoints (which finishes the removal).
    let g = e.create(other, ROOT_INODE, b"synced", 0o644, 0, 0).unwrap();
    e.write(other, g.inode, 0, &pattern(5, 20000)).unwrap();
    e.fsync(other, g.inode).unwrap();
    e.crash();
    drop(e);

    let (e, other) = reopened(dev, &other_files);
    holds(&e, other, b"synced", 5, 20000);
    // The removal was not durable, or was finished whole.
    if let Ok(big) = e.layer_id("big") {
        reads_back(&e, big, &big_files);
    }
    e.remove_layer("big").ok();
    e.sync().unwrap();
    assert_clean(&e);
    assert!(e.layer_id("big").is_err());
}
