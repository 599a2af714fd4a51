//! A layer's removal frees what it owned in steps, the store lock let go
//! between them: other layers are read and written meanwhile, the name is
//! free at once, a checkpoint in between records what is left to free (fsck
//! clean there and after a reopen), a crash goes on from the last
//! checkpoint's list, a clone and its parent removed together free the clone
//! first, an operation short of room frees removed layers before it fails,
//! and with a background thread the caller does not wait for the freeing.

use lcfs_engine::device::MemDevice;
use lcfs_engine::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Live bytes are back within 1 MiB of `before`, what they were before the
/// removed layers were written.
fn all_freed(e: &Engine, before: u64) {
    let live = e.stats().live_bytes;
    assert!(
        live < before + (1 << 20),
        "{live} bytes live, {before} before the removed layers: not all freed"
    );
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
fn other_layers_go_on_between_steps_and_a_checkpoint_records_what_is_left() {
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
    // The checkpoint records the half-freed layer's list; fsck accounts
    // for what is left on it.
    e.sync().unwrap();
    assert_eq!(e.removals_pending(), 1);
    assert_clean(&e);
    drop(e);

    // After a reopen the removal goes on from the recorded list.
    let (e, other) = reopened(dev.clone(), &other_files);
    assert_eq!(e.removals_pending(), 1, "the list survives a reopen");
    assert!(!e.remove_steps(2).unwrap());
    assert_clean(&e);
    e.reclaim_removed().unwrap();
    assert_eq!(e.removals_pending(), 0);
    e.sync().unwrap();
    assert_clean(&e);
    all_freed(&e, live_before);
    holds(&e, other, b"late", 7, 65536);
    holds(&e, e.layer_id("big").unwrap(), b"new", 99, 8192);
    drop(e);
    let (e, _) = reopened(dev, &other_files);
    assert_eq!(e.removals_pending(), 0);
}

#[test]
fn a_crash_between_steps_goes_on_from_the_last_checkpoint() {
    let (dev, e) = fresh(256 << 20);
    let (other, other_files) = filled(&e, "other", 2);
    e.sync().unwrap();
    let live_before = e.stats().live_bytes;
    filled(&e, "big", 32);
    e.sync().unwrap();

    e.begin_remove_layer("big").unwrap();
    assert!(!e.remove_steps(4).unwrap());
    e.sync().unwrap();
    // More steps, and an fsync of another layer's file, after the
    // checkpoint: the crash loses the steps, not the fsync.
    assert!(!e.remove_steps(5).unwrap());
    let g = e.create(other, ROOT_INODE, b"synced", 0o644, 0, 0).unwrap();
    e.write(other, g.inode, 0, &pattern(5, 20000)).unwrap();
    e.fsync(other, g.inode).unwrap();
    e.crash();
    drop(e);

    let (e, other) = reopened(dev, &other_files);
    holds(&e, other, b"synced", 5, 20000);
    assert!(e.layer_id("big").is_err(), "the removal was durable");
    e.reclaim_removed().unwrap();
    e.sync().unwrap();
    assert_clean(&e);
    all_freed(&e, live_before);
}

#[test]
fn a_clone_and_its_parent_removed_together_free_the_clone_first() {
    let (dev, e) = fresh(256 << 20);
    let (_, other_files) = filled(&e, "other", 1);
    e.sync().unwrap();
    let live_before = e.stats().live_bytes;
    let (_, parent_files) = filled(&e, "parent", 24);
    e.commit_layer("parent").unwrap();
    let c = e.clone_layer("parent", "child").unwrap();
    // The clone's tree holds nodes it owns over nodes its parent owns.
    for (i, ino) in parent_files.iter().enumerate().step_by(3) {
        e.write(c, *ino, 4096, &pattern(1000 + i as u32, 4096))
            .unwrap();
    }
    for i in 0..40u32 {
        let f = e
            .create(c, ROOT_INODE, format!("c{i}").as_bytes(), 0o644, 0, 0)
            .unwrap();
        e.write(c, f.inode, 0, &pattern(i, 8192)).unwrap();
    }
    e.sync().unwrap();

    e.begin_remove_layer("child").unwrap();
    assert!(!e.remove_steps(1).unwrap());
    e.begin_remove_layer("parent").unwrap();
    assert_eq!(e.removals_pending(), 2);
    // However the steps and checkpoints interleave, the parent frees
    // nothing the child's list still names.
    for round in 0..200 {
        if e.remove_steps(1 + round % 3).unwrap() {
            break;
        }
        if round % 7 == 0 {
            e.sync().unwrap();
            assert_clean(&e);
        }
    }
    e.reclaim_removed().unwrap();
    e.sync().unwrap();
    assert_clean(&e);
    all_freed(&e, live_before);
    drop(e);
    reopened(dev, &other_files);
}

#[test]
fn an_operation_short_of_room_frees_removed_layers_first() {
    let (dev, e) = fresh(64 << 20);
    let (_, other_files) = filled(&e, "other", 1);
    filled(&e, "big", 120); // 30 MiB of a 64 MiB device
    e.sync().unwrap();
    e.begin_remove_layer("big").unwrap();
    assert_eq!(e.removals_pending(), 1);
    // 30 MiB more only fit once the removed layer's space is free.
    let (l, files) = filled(&e, "next", 120);
    assert_eq!(e.removals_pending(), 0);
    reads_back(&e, l, &files);
    e.sync().unwrap();
    assert_clean(&e);
    drop(e);
    reopened(dev, &other_files);
}

#[test]
fn with_a_background_thread_remove_returns_before_the_space_is_free() {
    let dev = Arc::new(MemDevice::new(256 << 20));
    common::format(dev.clone());
    let e = Engine::open(dev.clone(), Config::default()).unwrap();
    let (_, other_files) = filled(&e, "other", 1);
    e.sync().unwrap();
    let live_before = e.stats().live_bytes;
    filled(&e, "big", 64);
    e.sync().unwrap();
    e.remove_layer("big").unwrap();
    assert!(e.layer_id("big").is_err());
    let start = Instant::now();
    while e.removals_pending() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the background thread did not free the removed layer"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    e.sync().unwrap();
    assert_clean(&e);
    all_freed(&e, live_before);
    drop(e);
    reopened(dev, &other_files);
}
