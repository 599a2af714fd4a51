//! `Engine::shared_copy`: the frozen layer whose copy of a file another
//! layer sees unchanged (what the mount shares one page-cache copy of).
//! Exact answers on a chain of image layers and clones; then, on random
//! layer trees and changes, every answer names a frozen ancestor (or the
//! layer) holding the same inode, bytes and xattrs.
//!
//! LCFS_SEED=<n> replays one random run; LCFS_SHARED_RUNS (default 20) sets
//! how many run.

use lcfs_engine::device::{Device, MemDevice};
use lcfs_engine::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::Arc;

fn quiet() -> Config {
    Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..Config::default()
    }
}

fn fresh(bytes: u64) -> (Arc<dyn Device>, Arc<Engine>) {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(bytes));
    Engine::format(
        dev.clone(),
        &FormatOptions {
            segment_size_bytes: 256 << 10,
            force: false,
        },
    )
    .unwrap();
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    (dev, e)
}

#[test]
fn unchanged_files_resolve_to_the_layer_that_last_changed_them() {
    let (dev, e) = fresh(128 << 20);
    let b = e.create_layer("base", true).unwrap();
    let lib = e
        .create(b, ROOT_INODE, b"libc.so", 0o755, 0, 0)
        .unwrap()
        .inode;
    e.write(b, lib, 0, &vec![7u8; 2 << 20]).unwrap();
    // Files between the two keep their keys in other tree leaves.
    let usr = e.mkdir(b, ROOT_INODE, b"usr", 0o755, 0, 0).unwrap().inode;
    for i in 0..2000 {
        e.create(b, usr, format!("f{i:04}").as_bytes(), 0o644, 0, 0)
            .unwrap();
    }
    let conf = e
        .create(b, ROOT_INODE, b"app.conf", 0o644, 0, 0)
        .unwrap()
        .inode;
    e.write(b, conf, 0, b"v1").unwrap();

    // An image layer on top changes app.conf only.
    let img = e.clone_layer("base", "img").unwrap();
    e.write(img, conf, 0, b"v2").unwrap();
    let c1 = e.clone_layer("img", "c1").unwrap();
    let c2 = e.clone_layer("img", "c2").unwrap();

    assert_eq!(
        e.shared_copy(b, lib).unwrap(),
        Some(b),
        "a frozen layer's own file"
    );
    assert_eq!(
        e.shared_copy(img, lib).unwrap(),
        Some(b),
        "unchanged by img"
    );
    assert_eq!(
        e.shared_copy(img, conf).unwrap(),
        Some(img),
        "img changed it"
    );
    for c in [c1, c2] {
        assert_eq!(e.shared_copy(c, lib).unwrap(), Some(b));
        assert_eq!(e.shared_copy(c, conf).unwrap(), Some(img));
    }

    // A container's write makes the file its own; its sibling still shares.
    e.write(c1, lib, 4096, b"patched").unwrap();
    assert_eq!(e.shared_copy(c1, lib).unwrap(), None);
    assert_eq!(e.shared_copy(c2, lib).unwrap(), Some(b));
    // So do attribute and xattr changes, and a file the container created.
    e.setattr(
        c2,
        conf,
        &SetAttr {
            mode: Some(0o600),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(e.shared_copy(c2, conf).unwrap(), None);
    let new = e.create(c2, ROOT_INODE, b"new", 0o644, 0, 0).unwrap().inode;
    assert_eq!(e.shared_copy(c2, new).unwrap(), None);
    e.setxattr(c2, lib, b"user.k", b"v", 0).unwrap();
    assert_eq!(e.shared_copy(c2, lib).unwrap(), None);
    // A writable base layer shares nothing.
    let w = e.create_layer("scratch", false).unwrap();
    let f = e.create(w, ROOT_INODE, b"f", 0o644, 0, 0).unwrap().inode;
    assert_eq!(e.shared_copy(w, f).unwrap(), None);
    assert!(matches!(e.shared_copy(999_999, lib), Err(Error::NotFound)));

    // The answers come from the trees: the same after a reopen.
    e.close().unwrap();
    drop(e);
    let e = Engine::open(dev, quiet()).unwrap();
    assert_eq!(e.shared_copy(c1, lib).unwrap(), None);
    assert_eq!(e.shared_copy(c1, conf).unwrap(), Some(img));
    assert_eq!(e.shared_copy(c2, lib).unwrap(), None);
    let c3 = e.clone_layer("img", "c3").unwrap();
    assert_eq!(e.shared_copy(c3, lib).unwrap(), Some(b));
}

/// What a layer shows of one file: attributes, bytes, xattrs.
type View = (Attr, Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>);

fn view(e: &Engine, layer: u64, ino: u64) -> Option<View> {
    let a = e.getattr(layer, ino).ok()?;
    let bytes = e.read(layer, ino, 0, a.size as usize).unwrap();
    let xattrs = e
        .listxattr(layer, ino)
        .unwrap()
        .into_iter()
        .map(|n| {
            let v = e.getxattr(layer, ino, &n).unwrap();
            (n, v)
        })
        .collect();
    Some((a, bytes, xattrs))
}

/// Returns how many (layer, file) pairs shared an ancestor's copy.
fn one_run(seed: u64) -> usize {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (_dev, e) = fresh(256 << 20);
    let base = e.create_layer("l0", true).unwrap();
    let mut files = Vec::new();
    for i in 0..rng.gen_range(20..300) {
        let ino = e
            .create(base, ROOT_INODE, format!("f{i}").as_bytes(), 0o644, 0, 0)
            .unwrap()
            .inode;
        let len = rng.gen_range(0..40_000);
        e.write(base, ino, 0, &vec![rng.gen::<u8>(); len]).unwrap();
        files.push(ino);
    }
    // name -> (id, writable); writable layers take changes, any layer may
    // be cloned (which freezes it).
    let mut layers: Vec<(String, u64)> = vec![("l0".into(), base)];
    let mut frozen = std::collections::HashSet::new();
    for step in 0..rng.gen_range(10..120) {
        let (name, id) = layers[rng.gen_range(0..layers.len())].clone();
        if frozen.contains(&id) || rng.gen_ratio(1, 5) {
            let child = format!("l{}", layers.len());
            let cid = e.clone_layer(&name, &child).unwrap();
            frozen.insert(id);
            layers.push((child, cid));
            continue;
        }
        let ino = files[rng.gen_range(0..files.len())];
        if e.getattr(id, ino).is_err() {
            continue;
        }
        match rng.gen_range(0..6) {
            0 | 1 => {
                let off = rng.gen_range(0..50_000);
                let len = rng.gen_range(1..9000);
                e.write(id, ino, off, &vec![rng.gen::<u8>(); len]).unwrap();
            }
            2 => {
                let size = rng.gen_range(0..60_000);
                e.setattr(
                    id,
                    ino,
                    &SetAttr {
                        size: Some(size),
                        ..Default::default()
                    },
                )
                .unwrap();
            }
            3 => {
                e.setattr(
                    id,
                    ino,
                    &SetAttr {
                        mode: Some(0o600 | rng.gen_range(0..8)),
                        ..Default::default()
                    },
                )
                .unwrap();
            }
            4 => {
                let v = [rng.gen::<u8>()];
                e.setxattr(id, ino, b"user.s", &v, 0).unwrap();
            }
            _ => {
                let new = e
                    .create(id, ROOT_INODE, format!("n{step}").as_bytes(), 0o644, 0, 0)
                    .unwrap()
                    .inode;
                e.write(id, new, 0, b"new").unwrap();
                files.push(new);
            }
        }
    }

    let parent_of: BTreeMap<u64, Option<u64>> = e
        .list_layers()
        .into_iter()
        .map(|l| {
            let id = e.layer_id(&l.name).unwrap();
            (id, l.parent.map(|p| e.layer_id(&p).unwrap()))
        })
        .collect();
    let mut shared_from_ancestor = 0;
    for (_, id) in &layers {
        for &ino in &files {
            let Some(mine) = view(&e, *id, ino) else {
                continue;
            };
            let Some(f) = e.shared_copy(*id, ino).unwrap() else {
                assert!(
                    !frozen.contains(id),
                    "seed {seed}: frozen layer {id} shares no copy of {ino}"
                );
                continue;
            };
            assert!(frozen.contains(&f), "seed {seed}: answer {f} is not frozen");
            let mut at = Some(*id);
            while at.is_some() && at != Some(f) {
                at = parent_of[&at.unwrap()];
            }
            assert_eq!(at, Some(f), "seed {seed}: {f} is not {id} or its ancestor");
            let theirs = view(&e, f, ino).expect("the copy exists there");
            assert!(
                mine == theirs,
                "seed {seed}: layer {id} and {f} differ on inode {ino}"
            );
            if f != *id {
                shared_from_ancestor += 1;
            }
        }
    }
    shared_from_ancestor
}

#[test]
fn random_layer_trees_share_only_identical_copies() {
    let runs: u64 = std::env::var("LCFS_SHARED_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seeds: Vec<u64> = match std::env::var("LCFS_SEED") {
        Ok(s) => vec![s.parse().expect("LCFS_SEED is a number")],
        Err(_) => {
            let first: u64 = rand::random();
            (0..runs).map(|i| first.wrapping_add(i)).collect()
        }
    };
    let mut shared = 0;
    for seed in &seeds {
        eprintln!("shared_copy: seed {seed} (LCFS_SEED={seed} replays it)");
        shared += one_run(*seed);
    }
    // The property is not vacuous: clones did share their ancestors' copies
    // (one replayed seed may happen to share none).
    assert!(
        shared > 0 || seeds.len() == 1,
        "no file shared from an ancestor in {} runs",
        seeds.len()
    );
}

#[test]
fn uncached_reads_use_the_block_cache_but_do_not_fill_it() {
    let (dev, e) = fresh(64 << 20);
    let b = e.create_layer("img", false).unwrap();
    let f = e.create(b, ROOT_INODE, b"f", 0o644, 0, 0).unwrap().inode;
    let bytes: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8).collect();
    e.write(b, f, 0, &bytes).unwrap();
    e.close().unwrap();
    drop(e);
    let e = Engine::open(dev, quiet()).unwrap();
    let before = e.stats().block_cache_blocks;
    assert!(e.read_uncached(b, f, 0, bytes.len()).unwrap() == bytes);
    assert_eq!(
        e.stats().block_cache_blocks,
        before,
        "uncached reads added blocks"
    );
    // A cached read fills it; an uncached read then hits it.
    assert!(e.read(b, f, 0, 1 << 20).unwrap() == bytes[..1 << 20]);
    let filled = e.stats().block_cache_blocks;
    assert!(filled >= before + 256, "{filled} after a 1 MiB cached read");
    let hits = e.stats().block_cache_hits;
    assert!(e.read_uncached(b, f, 0, 1 << 20).unwrap() == bytes[..1 << 20]);
    assert!(e.stats().block_cache_hits >= hits + 256);
    assert_eq!(e.stats().block_cache_blocks, filled);
}
