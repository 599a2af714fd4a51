//! The fsync log: an fsync of one file is made durable by a record and a
//! flush, not a checkpoint, and survives a crash; changes a record cannot
//! carry fall back to a checkpoint; power cuts anywhere (unflushed writes
//! dropped, kept or torn, during the ops and during replay) leave every
//! file as it was at its last acknowledged fsync or later, fsck clean.
//! Replay with LCFS_SEED=<seed>; LCFS_FSYNC_CRASHES sets the number of
//! power cuts (default 300).

use lcfs_engine::device::{Device, FaultConfig, FaultyDevice, MemDevice};
use lcfs_engine::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

mod common;
use common::format;

fn quiet() -> Config {
    with_write_behind(0)
}

/// `segments` > 0: stream tails are written by the writer thread, beside
/// the fsync record, in either order.
fn with_write_behind(segments: usize) -> Config {
    Config {
        write_behind_segments: segments,
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        node_cache_bytes: 4 << 20,
        block_cache_bytes: 1 << 20,
        ..Config::default()
    }
}

fn read_all(e: &Engine, layer: u64, ino: u64) -> Vec<u8> {
    let size = e.getattr(layer, ino).unwrap().size;
    e.read(layer, ino, 0, size as usize).unwrap()
}

fn chmod(mode: u32) -> SetAttr {
    SetAttr {
        mode: Some(mode),
        ..Default::default()
    }
}

fn truncate(size: u64) -> SetAttr {
    SetAttr {
        size: Some(size),
        ..Default::default()
    }
}

/// Applies a write to the model of a file's bytes.
fn model_write(data: &mut Vec<u8>, offset: usize, bytes: &[u8]) {
    if data.len() < offset + bytes.len() {
        data.resize(offset + bytes.len(), 0);
    }
    data[offset..offset + bytes.len()].copy_from_slice(bytes);
}

#[test]
fn fsynced_writes_survive_a_crash_without_a_checkpoint() {
    let mem = Arc::new(MemDevice::new(64 << 20));
    let dev: Arc<dyn Device> = mem.clone();
    format(dev.clone());
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    let l = e.create_layer("c", false).unwrap();
    let f = e.create(l, ROOT_INODE, b"db", 0o644, 0, 0).unwrap().inode;
    let g = e
        .create(l, ROOT_INODE, b"other", 0o644, 0, 0)
        .unwrap()
        .inode;
    e.write(l, g, 0, b"not synced, written before the sync")
        .unwrap();
    e.sync().unwrap();
    let seq = e.checkpoint_seq();

    let mut model = Vec::new();
    let a: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    e.write(l, f, 0, &a).unwrap();
    model_write(&mut model, 0, &a);
    e.setattr(l, f, &chmod(0o600)).unwrap();
    e.fsync(l, f).unwrap();
    // Overwrite inside, extend past the end.
    let b = vec![7u8; 15_000];
    e.write(l, f, 5_000, &b).unwrap();
    model_write(&mut model, 5_000, &b);
    e.fsync(l, f).unwrap();
    // Shrink, then write past the end, leaving a hole that must read zero.
    e.setattr(l, f, &truncate(3_000)).unwrap();
    model.truncate(3_000);
    e.write(l, f, 8_000, b"after the hole").unwrap();
    model_write(&mut model, 8_000, b"after the hole");
    e.fsync(l, f).unwrap();
    // Unchanged since: nothing to do.
    e.fsync(l, f).unwrap();
    let attr = e.getattr(l, f).unwrap();
    let st = e.stats();
    assert_eq!(e.checkpoint_seq(), seq, "no fsync took a checkpoint");
    assert_eq!(st.engine.fsync_records, 3);
    assert_eq!(st.engine.fsync_checkpoints, 0);
    // Not fsynced: may be lost, must not break anything.
    e.write(l, g, 0, b"lost").unwrap();
    e.write(l, f, 0, b"lost too").unwrap();
    e.crash();
    drop(e);

    let e = Engine::open(dev.clone(), quiet()).unwrap();
    assert_eq!(e.stats().engine.fsync_records_replayed, 3);
    assert_eq!(read_all(&e, l, f), model);
    let after = e.getattr(l, f).unwrap();
    assert_eq!(after.mode & 0o7777, 0o600);
    assert_eq!(after.size, attr.size);
    assert_eq!(after.mtime, attr.mtime);
    assert_eq!(read_all(&e, l, g), b"not synced, written before the sync");
    let report = e.fsck(true).unwrap();
    assert!(report.is_clean(), "{:#?}", report.errors);
    // Replayed once: the records are stale after the checkpoint replay took.
    e.crash();
    drop(e);
    let e = Engine::open(dev, quiet()).unwrap();
    assert_eq!(e.stats().engine.fsync_records_replayed, 0);
    assert_eq!(read_all(&e, l, f), model);
}

#[test]
fn changes_a_record_cannot_carry_checkpoint() {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(64 << 20));
    format(dev.clone());
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    let l = e.create_layer("c", false).unwrap();
    e.sync().unwrap();
    let checkpoints = |e: &Engine| e.stats().engine.fsync_checkpoints;

    // A file created since the checkpoint is not in it.
    let f = e.create(l, ROOT_INODE, b"new", 0o644, 0, 0).unwrap().inode;
    e.write(l, f, 0, b"x").unwrap();
    e.fsync(l, f).unwrap();
    assert_eq!(checkpoints(&e), 1);
    // Now it is: a write is logged.
    e.write(l, f, 0, b"y").unwrap();
    e.fsync(l, f).unwrap();
    assert_eq!(checkpoints(&e), 1);
    assert_eq!(e.stats().engine.fsync_records, 1);
    // An xattr, a link, a rename: checkpoint.
    e.setxattr(l, f, b"user.a", b"1", 0).unwrap();
    e.fsync(l, f).unwrap();
    assert_eq!(checkpoints(&e), 2);
    e.link(l, f, ROOT_INODE, b"second").unwrap();
    e.fsync(l, f).unwrap();
    assert_eq!(checkpoints(&e), 3);
    e.rename(l, ROOT_INODE, b"second", ROOT_INODE, b"third", 0)
        .unwrap();
    e.fsync(l, f).unwrap();
    assert_eq!(checkpoints(&e), 4);
    // A layer cloned since the checkpoint is not in it (the clone freezes
    // its parent).
    let c = e.clone_layer("c", "child").unwrap();
    e.write(c, f, 0, b"z").unwrap();
    e.fsync(c, f).unwrap();
    assert_eq!(checkpoints(&e), 5);
    drop(e);

    // With the log off every fsync checkpoints.
    let e = Engine::open(
        dev,
        Config {
            fsync_log: false,
            ..quiet()
        },
    )
    .unwrap();
    let seq = e.checkpoint_seq();
    e.write(c, f, 0, b"w").unwrap();
    e.fsync(c, f).unwrap();
    assert_eq!(e.checkpoint_seq(), seq + 1);
    assert_eq!(e.stats().engine.fsync_records, 0);
}

/// One file of the power-cut test: its states since it was last durable
/// (any of them may be what a crash leaves).
struct MFile {
    layer: u64,
    ino: u64,
    data: Vec<u8>,
    mode: u32,
    candidates: Vec<(Vec<u8>, u32)>,
}

impl MFile {
    fn state(&self) -> (Vec<u8>, u32) {
        (self.data.clone(), self.mode)
    }
    fn durable(&mut self) {
        self.candidates = vec![self.state()];
    }
}

#[test]
fn power_cuts_keep_every_acknowledged_fsync() {
    power_cuts(0);
}

/// The same with the writer thread: thread timing changes the order of
/// device operations, so a seed replays the operations but not always the
/// exact crash points.
#[test]
fn power_cuts_keep_every_acknowledged_fsync_with_write_behind() {
    power_cuts(2);
}

fn power_cuts(write_behind: usize) {
    let seed = common::seed();
    let crashes: usize = common::env_or("LCFS_FSYNC_CRASHES", 300);
    println!(
        "fsync log power cuts: LCFS_SEED={seed} LCFS_FSYNC_CRASHES={crashes} \
         write_behind={write_behind}"
    );
    let quiet = || with_write_behind(write_behind);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut records_replayed = 0;
    let mut cycle = 0;
    while cycle < crashes {
        // A fresh device with two layers of four files, all durable.
        let faulty = Arc::new(FaultyDevice::new(48 << 20, FaultConfig::default()));
        let dev: Arc<dyn Device> = faulty.clone();
        format(dev.clone());
        let e = Engine::open(dev, quiet()).unwrap();
        let mut files = Vec::new();
        for name in ["a", "b"] {
            let l = e.create_layer(name, false).unwrap();
            for i in 0..4u8 {
                let ino = e
                    .create(l, ROOT_INODE, &[b'f', b'0' + i], 0o644, 0, 0)
                    .unwrap()
                    .inode;
                let mut f = MFile {
                    layer: l,
                    ino,
                    data: Vec::new(),
                    mode: 0o644,
                    candidates: Vec::new(),
                };
                f.durable();
                files.push(f);
            }
        }
        e.sync().unwrap();
        drop(e);
        let mut image = faulty.crash_image();
        for _ in 0..10 {
            cycle += 1;
            let dev = Arc::new(FaultyDevice::from_image(
                image,
                FaultConfig {
                    seed: rng.gen(),
                    tear_writes: true,
                    ..Default::default()
                },
            ));
            let d: Arc<dyn Device> = dev.clone();
            let e = Engine::open(d, quiet())
                .unwrap_or_else(|err| panic!("seed {seed} cycle {cycle}: open: {err}"));
            dev.set_crash_after_ops(Some(dev.ops() + rng.gen_range(1..300u64)));
            for _ in 0..200 {
                let k = rng.gen_range(0..files.len());
                let seq = e.checkpoint_seq();
                let before = files[k].state();
                let (l, ino) = (files[k].layer, files[k].ino);
                let what = rng.gen_range(0..100);
                let r = if what < 50 {
                    let offset = rng.gen_range(0..48 << 10);
                    let len = rng.gen_range(1..20 << 10);
                    let byte: u8 = rng.gen();
                    let bytes = vec![byte; len];
                    model_write(&mut files[k].data, offset, &bytes);
                    e.write(l, ino, offset as u64, &bytes).map(|_| ())
                } else if what < 60 {
                    let size = rng.gen_range(0..48 << 10);
                    files[k].data.resize(size, 0);
                    e.setattr(l, ino, &truncate(size as u64)).map(|_| ())
                } else if what < 65 {
                    let mode = 0o600 | rng.gen_range(0..0o100);
                    files[k].mode = mode;
                    e.setattr(l, ino, &chmod(mode)).map(|_| ())
                } else if what < 98 {
                    e.fsync(l, ino)
                } else {
                    e.sync()
                };
                let after = files[k].state();
                if r.is_err() {
                    assert!(dev.is_crashed(), "seed {seed} cycle {cycle}: {r:?}");
                    // Half done: before and after are both possible.
                    files[k].candidates.push(after);
                    break;
                }
                if after != before {
                    files[k].candidates.push(after);
                }
                if e.checkpoint_seq() != seq {
                    // A checkpoint ran in the op (a sync, an fsync falling
                    // back, upkeep): everything before the op is durable,
                    // and this file may be durable as it was before it.
                    for (i, f) in files.iter_mut().enumerate() {
                        if i != k {
                            f.durable();
                        }
                    }
                    if what >= 65 {
                        files[k].durable();
                    } else {
                        files[k].candidates = vec![before, files[k].state()];
                    }
                } else if (65..98).contains(&what) {
                    files[k].durable();
                }
                if dev.is_crashed() {
                    break;
                }
            }
            e.crash();
            drop(e);
            image = dev.crash_image();
            // Power cuts during replay too: then the records must still
            // be there for the next open.
            for _ in 0..2 {
                let dev = Arc::new(FaultyDevice::from_image(
                    image,
                    FaultConfig {
                        seed: rng.gen(),
                        tear_writes: true,
                        crash_after_ops: Some(rng.gen_range(1..400u64)),
                        ..Default::default()
                    },
                ));
                let d: Arc<dyn Device> = dev.clone();
                match Engine::open(d, quiet()) {
                    Ok(e) => {
                        e.crash();
                        drop(e);
                        image = dev.crash_image();
                        break;
                    }
                    Err(err) => {
                        assert!(dev.is_crashed(), "seed {seed} cycle {cycle}: open: {err}");
                        image = dev.crash_image();
                    }
                }
            }
            let check = Arc::new(FaultyDevice::from_image(image, FaultConfig::default()));
            let d: Arc<dyn Device> = check.clone();
            let e = Engine::open(d, quiet())
                .unwrap_or_else(|err| panic!("seed {seed} cycle {cycle}: reopen: {err}"));
            records_replayed += e.stats().engine.fsync_records_replayed;
            for f in &mut files {
                let data = read_all(&e, f.layer, f.ino);
                let mode = e.getattr(f.layer, f.ino).unwrap().mode & 0o7777;
                let found = (data, mode);
                assert!(
                    f.candidates.contains(&found),
                    "seed {seed} cycle {cycle}: file {} of layer {}: {} bytes mode {:o} \
                     is none of the {} states since its last durable one",
                    f.ino,
                    f.layer,
                    found.0.len(),
                    found.1,
                    f.candidates.len()
                );
                f.data = found.0;
                f.mode = found.1;
                f.durable();
            }
            let report = e.fsck(true).unwrap();
            assert!(
                report.is_clean(),
                "seed {seed} cycle {cycle}: fsck: {:#?}",
                &report.errors[..report.errors.len().min(10)]
            );
            e.crash();
            drop(e);
            image = check.crash_image();
        }
    }
    println!("fsync log power cuts: {crashes} crashes, {records_replayed} records replayed");
}
