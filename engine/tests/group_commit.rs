//! Durability requests are group-committed: many threads calling sync at
//! once on a real file share checkpoints (fewer checkpoints than calls),
//! many threads calling fsync on their own files share fsync records and
//! flushes, and every write either acknowledged survives a power cut right
//! after it.

use lcfs_engine::device::{
    create_sparse_file, open_device, Device, FaultConfig, FaultyDevice, OpenOptions,
};
use lcfs_engine::*;
use std::sync::Arc;

const THREADS: usize = 8;
const ROUNDS: usize = 40;

fn quiet() -> Config {
    Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..Config::default()
    }
}

fn record(t: usize, r: usize) -> String {
    format!("{t}:{r};")
}

/// Each thread appends records to its own file and makes it durable after
/// each one: by an fsync of the file (`per_file`) or by a sync.
fn run(e: &Engine, l: u64, per_file: bool) -> Vec<u64> {
    let inodes: Vec<u64> = (0..THREADS)
        .map(|t| {
            e.create(l, ROOT_INODE, format!("t{t}").as_bytes(), 0o644, 0, 0)
                .unwrap()
                .inode
        })
        .collect();
    e.sync().unwrap();
    // Each round every thread writes, then all fsync at once.
    let barrier = std::sync::Barrier::new(THREADS);
    std::thread::scope(|s| {
        for (t, ino) in inodes.iter().enumerate() {
            let barrier = &barrier;
            s.spawn(move || {
                let mut at = 0u64;
                for r in 0..ROUNDS {
                    let rec = record(t, r);
                    e.write(l, *ino, at, rec.as_bytes()).unwrap();
                    at += rec.len() as u64;
                    barrier.wait();
                    if per_file {
                        e.fsync(l, *ino).unwrap();
                    } else {
                        e.sync().unwrap();
                    }
                    // Nobody writes the next record before every fsync of
                    // this round returned: the round's fsyncs cover the same
                    // writes, so however threads are scheduled they share.
                    barrier.wait();
                }
            });
        }
    });
    inodes
}

/// An engine on a real sparse file (real flushes take real time).
fn on_a_real_file(name: &str, f: impl FnOnce(&Engine)) {
    let path = std::env::temp_dir().join(format!("lcfs-{name}-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    create_sparse_file(&path, 256 << 20).unwrap();
    let dev: Arc<dyn Device> = Arc::from(open_device(&path, &OpenOptions::default()).unwrap());
    Engine::format(dev.clone(), &FormatOptions::default()).unwrap();
    let e = Engine::open(dev, quiet()).unwrap();
    f(&e);
    drop(e);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn concurrent_syncs_share_checkpoints() {
    on_a_real_file("group-commit", |e| {
        let l = e.create_layer("l", false).unwrap();
        let before = e.stats().engine.checkpoints;
        run(e, l, false);
        let checkpoints = e.stats().engine.checkpoints - before - 1;
        let syncs = (THREADS * ROUNDS) as u64;
        println!("{syncs} syncs from {THREADS} threads took {checkpoints} checkpoints");
        // Eight syncs of the same writes need one checkpoint, not eight.
        assert!(
            checkpoints <= 2 * ROUNDS as u64,
            "little sharing: {checkpoints} checkpoints for {syncs} syncs"
        );
    });
}

#[test]
fn concurrent_fsyncs_share_records() {
    on_a_real_file("fsync-group-commit", |e| {
        let l = e.create_layer("l", false).unwrap();
        let before = e.stats().engine;
        run(e, l, true);
        let after = e.stats().engine;
        let records = after.fsync_records - before.fsync_records;
        let fsyncs = (THREADS * ROUNDS) as u64;
        println!("{fsyncs} fsyncs of {THREADS} files at once took {records} fsync records");
        // Only the sync that made the files durable checkpointed.
        assert_eq!(after.checkpoints - before.checkpoints, 1);
        assert_eq!(after.fsync_checkpoints, 0);
        // Eight fsyncs at once need far fewer than eight records.
        assert!(
            records <= 3 * ROUNDS as u64,
            "little sharing: {records} records for {fsyncs} fsyncs"
        );
    });
}

#[test]
fn acknowledged_syncs_and_fsyncs_survive_a_power_cut() {
    for per_file in [false, true] {
        power_cut_after_acknowledged(per_file);
    }
}

fn power_cut_after_acknowledged(per_file: bool) {
    let dev = Arc::new(FaultyDevice::new(128 << 20, FaultConfig::default()));
    let d: Arc<dyn Device> = dev.clone();
    Engine::format(
        d.clone(),
        &FormatOptions {
            segment_size_bytes: 1 << 20,
            force: false,
        },
    )
    .unwrap();
    let e = Engine::open(d, quiet()).unwrap();
    let l = e.create_layer("l", false).unwrap();
    let inodes = run(&e, l, per_file);
    let image = dev.crash_image();
    e.crash();
    drop(e);
    let d: Arc<dyn Device> = Arc::new(FaultyDevice::from_image(image, FaultConfig::default()));
    let e = Engine::open(d, quiet()).unwrap();
    for (t, ino) in inodes.iter().enumerate() {
        let want: String = (0..ROUNDS).map(|r| record(t, r)).collect();
        assert!(
            e.read(l, *ino, 0, want.len() + 10).unwrap() == want.as_bytes(),
            "thread {t}'s records (per file: {per_file})"
        );
    }
    assert!(e.fsck(true).unwrap().is_clean());
}
