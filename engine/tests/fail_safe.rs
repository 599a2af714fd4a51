//! Fail safe: an operation that fails after it began changing the
//! filesystem (a device read error half-way), or panics, or a lock left
//! poisoned by a panic, stops the engine: every later change and sync is
//! refused with `Error::Stopped` (EROFS), `Stats::read_only_reason` says
//! why, reads go on, and nothing half-applied is ever checkpointed: after a
//! reopen the device holds exactly the last synced state, fsck clean. An
//! operation that fails before changing anything leaves the engine
//! writable. Replay with LCFS_SEED=<seed>; LCFS_FAIL_SAFE_ROUNDS sets the
//! number of rounds (default 300).

use lcfs_engine::device::{Device, FaultConfig, FaultyDevice, MemDevice};
use lcfs_engine::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::Arc;

mod common;
use common::format;

fn config() -> Config {
    Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        write_behind_segments: 0,
        // Small caches: operations load nodes and blocks from the device.
        node_cache_bytes: 1 << 20,
        block_cache_bytes: 0,
        ..Config::default()
    }
}

/// What a layer shows: path -> (mode, nlink, content or target).
type View = BTreeMap<String, (u32, u32, Vec<u8>)>;

fn walk(e: &Engine, layer: u64, dir: u64, prefix: &str, out: &mut View) -> Result<()> {
    let mut cookie = 0;
    loop {
        let entries = e.readdir(layer, dir, cookie, 64)?;
        let Some(last) = entries.last() else {
            return Ok(());
        };
        cookie = last.cookie;
        for entry in entries {
            let path = format!("{prefix}/{}", String::from_utf8_lossy(&entry.name));
            let a = e.getattr(layer, entry.inode)?;
            let content = match a.kind {
                FileKind::File => e.read(layer, a.inode, 0, a.size as usize)?,
                FileKind::Symlink => e.readlink(layer, a.inode)?,
                _ => Vec::new(),
            };
            out.insert(path.clone(), (a.mode, a.nlink, content));
            if a.kind == FileKind::Directory {
                walk(e, layer, a.inode, &path, out)?;
            }
        }
    }
}

fn view(e: &Engine) -> View {
    let layer = e.layer_id("l").unwrap();
    let mut v = View::new();
    walk(e, layer, ROOT_INODE, "", &mut v).unwrap();
    v
}

fn lookup_path(e: &Engine, layer: u64, path: &str) -> Result<u64> {
    let mut ino = ROOT_INODE;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        ino = e.lookup(layer, ino, part.as_bytes())?.inode;
    }
    Ok(ino)
}

/// Fills the layer with enough directories and files that an operation
/// touches several tree nodes.
fn populate(e: &Engine, rng: &mut ChaCha8Rng) {
    let layer = e.layer_id("l").unwrap();
    for d in 0..6 {
        let dir = e
            .mkdir(layer, ROOT_INODE, format!("d{d}").as_bytes(), 0o755, 0, 0)
            .unwrap()
            .inode;
        for f in 0..40 {
            let a = e
                .create(layer, dir, format!("f{f}").as_bytes(), 0o644, 0, 0)
                .unwrap();
            let len = rng.gen_range(0..20_000);
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            e.write(layer, a.inode, 0, &data).unwrap();
        }
    }
}

/// One random change, which may fail.
fn random_change(e: &Engine, rng: &mut ChaCha8Rng, n: u32) -> Result<()> {
    let layer = e.layer_id("l")?;
    let d = rng.gen_range(0..6);
    let f = rng.gen_range(0..40);
    let path = format!("/d{d}/f{f}");
    match rng.gen_range(0..6) {
        0 => {
            let to = lookup_path(e, layer, &format!("/d{}", rng.gen_range(0..6)))?;
            let from = lookup_path(e, layer, &format!("/d{d}"))?;
            e.rename(
                layer,
                from,
                format!("f{f}").as_bytes(),
                to,
                format!("r{n}").as_bytes(),
                0,
            )
        }
        1 => {
            let dir = lookup_path(e, layer, &format!("/d{d}"))?;
            e.unlink(layer, dir, format!("f{f}").as_bytes())
        }
        2 => {
            let dir = lookup_path(e, layer, &format!("/d{d}"))?;
            let a = e.create(layer, dir, format!("n{n}").as_bytes(), 0o600, 1, 1)?;
            e.write(layer, a.inode, 100, b"new file").map(|_| ())
        }
        3 => {
            // A partial-block write in the middle: read-modify-write.
            let ino = lookup_path(e, layer, &path)?;
            e.write(layer, ino, rng.gen_range(0..30_000), &[n as u8; 5000])
                .map(|_| ())
        }
        4 => {
            let ino = lookup_path(e, layer, &path)?;
            let size = SetAttr {
                size: Some(rng.gen_range(0..10_000)),
                ..SetAttr::default()
            };
            e.setattr(layer, ino, &size).map(|_| ())
        }
        _ => {
            let ino = lookup_path(e, layer, &path)?;
            let dir = lookup_path(e, layer, &format!("/d{}", rng.gen_range(0..6)))?;
            e.link(layer, ino, dir, format!("h{n}").as_bytes())
                .map(|_| ())
        }
    }
}

fn assert_stopped(e: &Engine) -> String {
    let reason = e
        .stats()
        .read_only_reason
        .expect("the engine says why it is read-only");
    let layer = e.layer_id("l").unwrap();
    let refused = e.create(layer, ROOT_INODE, b"after-stop", 0o644, 0, 0);
    assert!(
        matches!(refused, Err(Error::Stopped(_))),
        "a change after the stop: {refused:?}"
    );
    assert_eq!(refused.unwrap_err().errno(), libc::EROFS);
    assert!(matches!(e.sync(), Err(Error::Stopped(_))));
    reason
}

fn seed() -> u64 {
    let seed = common::seed();
    println!("fail_safe: LCFS_SEED={seed}");
    seed
}

#[test]
fn a_change_that_fails_half_way_is_never_checkpointed() {
    let seed = seed();
    let rounds: u32 = common::env_or("LCFS_FAIL_SAFE_ROUNDS", 300);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut stops = 0;
    let mut clean_refusals = 0;
    for round in 0..rounds {
        let fdev = Arc::new(FaultyDevice::new(
            64 << 20,
            FaultConfig {
                seed: seed ^ u64::from(round),
                ..FaultConfig::default()
            },
        ));
        let dev: Arc<dyn Device> = fdev.clone();
        format(dev.clone());
        let e = Engine::open(dev, config()).unwrap();
        e.create_layer("l", false).unwrap();
        populate(&e, &mut rng);
        e.sync().unwrap();
        let mut durable = view(&e);
        let mut stopped = false;
        for n in 0..8 {
            let before = view(&e);
            e.drop_caches();
            fdev.set_fail_op(Some(fdev.ops() + rng.gen_range(1..12)));
            let r = random_change(&e, &mut rng, n);
            fdev.set_fail_op(None);
            if r.is_err() {
                if e.stats().read_only_reason.is_some() {
                    assert_stopped(&e);
                    stopped = true;
                    stops += 1;
                    break;
                }
                // Failed before changing anything: nothing changed.
                assert_eq!(
                    view(&e),
                    before,
                    "round {round}: a refused change left a trace"
                );
                clean_refusals += 1;
            }
            if rng.gen_bool(0.3) {
                e.sync().unwrap();
                durable = view(&e);
            }
        }
        if !stopped {
            e.sync().unwrap();
            durable = view(&e);
        }
        e.crash();
        drop(e);
        let image: Arc<dyn Device> = Arc::new(fdev.crash_image());
        let e = Engine::open(image, config()).unwrap();
        assert_eq!(
            view(&e),
            durable,
            "round {round}: reopened state is not the last sync"
        );
        let report = e.fsck(true).unwrap();
        assert!(report.is_clean(), "round {round}: fsck {:?}", report.errors);
    }
    println!("fail_safe: {rounds} rounds, {stops} stops, {clean_refusals} clean refusals");
    assert!(
        stops > 0,
        "no round failed half-way: the test proves nothing"
    );
}

fn engine_with_content() -> (Arc<dyn Device>, Arc<Engine>, View) {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(64 << 20));
    format(dev.clone());
    let e = Engine::open(dev.clone(), config()).unwrap();
    e.create_layer("l", false).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    populate(&e, &mut rng);
    e.sync().unwrap();
    let v = view(&e);
    (dev, e, v)
}

#[test]
fn a_panic_in_a_change_stops_the_engine() {
    let (dev, e, durable) = engine_with_content();
    let layer = e.layer_id("l").unwrap();
    e.inject_panic_in_next_change();
    let r = e.create(layer, ROOT_INODE, b"doomed", 0o644, 0, 0);
    assert!(matches!(r, Err(Error::Stopped(_))), "{r:?}");
    let reason = assert_stopped(&e);
    assert!(reason.contains("panicked"), "{reason}");
    // Reads go on.
    assert!(e.lookup(layer, ROOT_INODE, b"d0").is_ok());
    drop(e); // no final checkpoint of the half-applied change
    let e = Engine::open(dev, config()).unwrap();
    assert_eq!(view(&e), durable);
    assert!(e.stats().read_only_reason.is_none());
    assert!(e.fsck(true).unwrap().is_clean());
}

#[test]
fn a_poisoned_lock_stops_the_engine() {
    let (dev, e, durable) = engine_with_content();
    e.poison_lock();
    let reason = assert_stopped(&e);
    assert!(reason.contains("panicked"), "{reason}");
    drop(e);
    let e = Engine::open(dev, config()).unwrap();
    assert_eq!(view(&e), durable);
}
