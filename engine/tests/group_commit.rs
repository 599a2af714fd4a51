//! fsync is group-committed: many threads calling fsync at once on a real
//! file share checkpoints (fewer checkpoints than fsync calls), and every
//! write an fsync acknowledged survives a power cut right after it.

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

/// Each thread appends records to its own file and fsyncs after each one.
fn run(e: &Engine, l: u64) -> Vec<u64> {
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
                    e.sync().unwrap();
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

#[test]
fn concurrent_fsyncs_share_checkpoints() {
    let path = std::env::temp_dir().join(format!("lcfs-group-commit-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    create_sparse_file(&path, 256 << 20).unwrap();
    let dev: Arc<dyn Device> = Arc::from(open_device(&path, &OpenOptions::default()).unwrap());
    Engine::format(dev.clone(), &FormatOptions::default()).unwrap();
    let e = Engine::open(dev, quiet()).unwrap();
    let l = e.create_layer("l", false).unwrap();
    let before = e.stats().engine.checkpoints;
    run(&e, l);
    let checkpoints = e.stats().engine.checkpoints - before - 1;
    let fsyncs = (THREADS * ROUNDS) as u64;
    println!("{fsyncs} fsyncs from {THREADS} threads took {checkpoints} checkpoints");
    drop(e);
    let _ = std::fs::remove_file(&path);
    // Eight fsyncs of the same writes need one checkpoint, not eight.
    assert!(
        checkpoints <= 2 * ROUNDS as u64,
        "little sharing: {checkpoints} checkpoints for {fsyncs} fsyncs"
    );
}

#[test]
fn acknowledged_fsyncs_survive_a_power_cut() {
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
    let inodes = run(&e, l);
    let image = dev.crash_image();
    e.crash();
    drop(e);
    let d: Arc<dyn Device> = Arc::new(FaultyDevice::from_image(image, FaultConfig::default()));
    let e = Engine::open(d, quiet()).unwrap();
    for (t, ino) in inodes.iter().enumerate() {
        let want: String = (0..ROUNDS).map(|r| record(t, r)).collect();
        assert!(
            e.read(l, *ino, 0, want.len() + 10).unwrap() == want.as_bytes(),
            "thread {t}'s records"
        );
    }
    assert!(e.fsck(true).unwrap().is_clean());
}
