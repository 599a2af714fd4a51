//! Lookup and getattr of an unchanged layer are answered without the store
//! lock, and never stale: after random changes to several layers (create,
//! write, truncate, chmod, link, unlink, rename, clone, commit, remove), every
//! answer equals the one computed afresh with every cache dropped; with
//! readers racing a writer, a reader that starts after a change returns sees
//! it. Replay with LCFS_SEED=<seed>.

use lcfs_engine::device::{Device, MemDevice};
use lcfs_engine::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

fn engine() -> Arc<Engine> {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(64 << 20));
    Engine::format(dev.clone(), &FormatOptions::default()).unwrap();
    Engine::open(
        dev,
        Config {
            flush_interval_ms: 0,
            checkpoint_interval_ms: 0,
            ..Config::default()
        },
    )
    .unwrap()
}

fn seed() -> u64 {
    let seed = std::env::var("LCFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("LCFS_SEED={seed}");
    seed
}

const NAMES: [&[u8]; 6] = [b"a", b"b", b"c", b"d", b"e", b"f"];

/// Every answer for every name in the root and in dir "d" of `layer`.
fn answers(e: &Engine, layer: u64) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![ROOT_INODE];
    if let Ok(a) = e.lookup(layer, ROOT_INODE, b"d") {
        if a.kind == FileKind::Directory {
            dirs.push(a.inode);
        }
    }
    for dir in dirs {
        for n in NAMES {
            let r = e.lookup(layer, dir, n);
            out.push(format!("{dir}/{}: {r:?}", String::from_utf8_lossy(n)));
            if let Ok(a) = r {
                out.push(format!("  getattr {:?}", e.getattr(layer, a.inode)));
            }
        }
    }
    out
}

#[test]
fn cached_answers_equal_fresh_ones_after_random_changes() {
    let seed = seed();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let e = engine();
    let mut layers: Vec<(String, u64)> = vec![("l0".into(), e.create_layer("l0", false).unwrap())];
    let mut next = 1;
    let mut ok = [0u32; 11];
    for step in 0..20_000 {
        // Mostly a writable layer (a clone freezes its parent).
        let writable: Vec<usize> = (0..layers.len())
            .filter(|&i| !e.layer_info(&layers[i].0).unwrap().frozen)
            .collect();
        let i = match writable.is_empty() || rng.gen_bool(0.1) {
            true => rng.gen_range(0..layers.len()),
            false => writable[rng.gen_range(0..writable.len())],
        };
        let (name, layer) = layers[i].clone();
        let dir = match (rng.gen_bool(0.5), e.lookup(layer, ROOT_INODE, b"d")) {
            (true, Ok(a)) if a.kind == FileKind::Directory => a.inode,
            _ => ROOT_INODE,
        };
        let n = NAMES[rng.gen_range(0..NAMES.len())];
        let m = NAMES[rng.gen_range(0..NAMES.len())];
        // Errors (a frozen layer, a name that exists or not) are answers too.
        // Layer operations are rare, so most layers stay writable a while.
        let op = match rng.gen_range(0..60) {
            x @ 0..=6 => x,
            x if x < 50 => x % 7,
            50 => 7,
            51 if rng.gen_bool(0.2) => 8,
            52 => 9,
            _ => 10,
        };
        let r = match op {
            0 => e.create(layer, dir, n, 0o644, 0, 0).map(|_| ()),
            1 => e.mkdir(layer, ROOT_INODE, b"d", 0o755, 0, 0).map(|_| ()),
            2 => e.lookup(layer, dir, n).and_then(|a| {
                e.write(layer, a.inode, rng.gen_range(0..9000), &[1; 700])
                    .map(|_| ())
            }),
            3 => e.lookup(layer, dir, n).and_then(|a| {
                let attr = SetAttr {
                    size: Some(rng.gen_range(0..5000)),
                    mode: Some(rng.gen_range(0..0o777)),
                    ..SetAttr::default()
                };
                e.setattr(layer, a.inode, &attr).map(|_| ())
            }),
            4 => e
                .lookup(layer, dir, n)
                .and_then(|a| e.link(layer, a.inode, ROOT_INODE, m).map(|_| ())),
            5 => e.unlink(layer, dir, n),
            6 => e.rename(layer, dir, n, ROOT_INODE, m, 0),
            7 if layers.len() < 6 => {
                let child = format!("l{next}");
                next += 1;
                e.clone_layer(&name, &child)
                    .map(|id| layers.push((child, id)))
            }
            8 => e.commit_layer(&name),
            9 if layers.len() > 1 => e.remove_layer(&name).map(|_| {
                layers.remove(i);
            }),
            _ => e.rmdir(layer, ROOT_INODE, b"d"),
        };
        if r.is_ok() {
            ok[op] += 1;
        }
        if step % 7 == 0 {
            let all: Vec<(String, u64)> = layers.clone();
            for (_, l) in &all {
                let cached = answers(&e, *l);
                // Twice: the second time from the answers just kept.
                assert_eq!(cached, answers(&e, *l), "seed {seed} step {step}");
                e.drop_caches();
                assert_eq!(cached, answers(&e, *l), "seed {seed} step {step}: stale");
            }
        }
    }
    println!("changes that succeeded, by kind: {ok:?}");
    let s = e.stats();
    assert!(
        s.metadata_cache_hits > 0,
        "some answers came without the lock"
    );
}

#[test]
fn a_reader_that_starts_after_a_change_sees_it() {
    let e = engine();
    let layer = e.create_layer("l", false).unwrap();
    let f = e
        .create(layer, ROOT_INODE, b"f", 0o644, 0, 0)
        .unwrap()
        .inode;
    // The writer grows the file one byte per step and publishes the step
    // after the write returned; readers check they never see less.
    let published = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (e, published, stop) = (e.clone(), published.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut checks = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let at_least = published.load(Ordering::Acquire);
                    let by_name = e.lookup(layer, ROOT_INODE, b"f").unwrap();
                    let by_inode = e.getattr(layer, f).unwrap();
                    assert!(by_name.size >= at_least && by_inode.size >= at_least);
                    checks += 1;
                }
                checks
            })
        })
        .collect();
    for size in 1..=2000u64 {
        e.write(layer, f, size - 1, &[7]).unwrap();
        published.store(size, Ordering::Release);
    }
    stop.store(true, Ordering::Release);
    let checks: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(checks > 0);
    assert_eq!(e.getattr(layer, f).unwrap().size, 2000);
}
