//! Promotion (the Docker commit path): a layer on another branch takes a
//! container layer's file blocks without copying them, only when they hold
//! exactly the incoming bytes (a forged checksum collision is refused); afterwards each side copies on write, removing
//! either side first leaves the other intact, the last owner frees the
//! blocks (no leak, no double free: fsck clean at every step), blocks born
//! in a common ancestor are simply inherited, and all of it survives a
//! reopen and a power cut after any device op of the commit path.

use lcfs_engine::device::{Device, MemDevice};
use lcfs_engine::*;
use rand::{RngCore, SeedableRng};
use std::sync::Arc;

mod common;
use common::{format, quiet};

const BLOCK: usize = 4096;

fn fresh() -> (Arc<dyn Device>, Arc<Engine>) {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(128 << 20));
    format(dev.clone());
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    (dev, e)
}

/// Offers `data` (from offset 0) of file `src` in `src_layer` to file `ino`.
fn share(e: &Engine, layer: u64, ino: u64, src_layer: u64, src: u64, data: &[u8]) -> bool {
    e.share_blocks(layer, ino, src_layer, src, 0, data).unwrap()
}

fn read_all(e: &Engine, layer: u64, ino: u64) -> Vec<u8> {
    let size = e.getattr(layer, ino).unwrap().size;
    e.read(layer, ino, 0, size as usize).unwrap()
}

fn fsck_clean(e: &Engine, when: &str) {
    let report = e.fsck(true).unwrap();
    assert!(report.errors.is_empty(), "fsck {when}: {:?}", report.errors);
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// image <- init <- container, and a new image layer beside init: what a
/// Docker commit sees. Returns (image, container, file in container, data).
fn container_with_file(e: &Engine, len: usize) -> (u64, u64, u64, Vec<u8>) {
    let image = e.create_layer("image", true).unwrap();
    e.mkdir(image, ROOT_INODE, b"etc", 0o755, 0, 0).unwrap();
    e.clone_layer("image", "init").unwrap();
    let container = e.clone_layer_with("init", "container", false).unwrap();
    let ino = e
        .create(container, ROOT_INODE, b"big", 0o644, 0, 0)
        .unwrap()
        .inode;
    // Data with a hole in the middle (a sparse container file).
    let mut data = random(7, len);
    data[BLOCK * 3..BLOCK * 5].fill(0);
    e.write(container, ino, 0, &data[..BLOCK * 3]).unwrap();
    e.write(container, ino, (BLOCK * 5) as u64, &data[BLOCK * 5..])
        .unwrap();
    (image, container, ino, data)
}

fn promote(e: &Engine, container: u64, src: u64, data: &[u8]) -> (u64, u64) {
    let committed = e.clone_layer_with("image", "committed", true).unwrap();
    let ino = e
        .create(committed, ROOT_INODE, b"big", 0o644, 0, 0)
        .unwrap()
        .inode;
    let shared = share(e, committed, ino, container, src, data);
    assert!(shared, "identical content must be shared");
    (committed, ino)
}

#[test]
fn promoted_blocks_are_shared_then_copied_on_write() {
    let (_dev, e) = fresh();
    let len = 64 * BLOCK + 100;
    let (_, container, src, data) = container_with_file(&e, len);
    let written_before = e.stats().engine.user_write_bytes;
    let (committed, ino) = promote(&e, container, src, &data);
    assert_eq!(e.stats().engine.user_write_bytes, written_before);
    assert!(
        e.stats().engine.promoted_bytes
            >= (len as u64 / BLOCK as u64) * BLOCK as u64 - 2 * BLOCK as u64
    );
    assert_eq!(read_all(&e, committed, ino), data);
    assert_eq!(e.getattr(committed, ino).unwrap().size, len as u64);
    fsck_clean(&e, "after promotion");

    // The container writes on (a running container after docker commit):
    // the image layer keeps what it was given.
    e.write(container, src, 0, &[0xAB; 10]).unwrap();
    e.write(container, src, (BLOCK * 10) as u64, &[0xCD; BLOCK])
        .unwrap();
    assert_eq!(read_all(&e, committed, ino), data);
    let now = read_all(&e, container, src);
    assert_eq!(&now[..10], &[0xAB; 10]);
    assert_eq!(&now[BLOCK * 10..BLOCK * 11], &[0xCD; BLOCK]);
    fsck_clean(&e, "after the container wrote");

    // And the image layer's children see it; writes there copy on write.
    let child = e.clone_layer_with("committed", "child", false).unwrap();
    e.write(child, ino, 5, b"child").unwrap();
    assert_eq!(read_all(&e, committed, ino), data);
    e.remove_layer("child").unwrap();
    fsck_clean(&e, "after the child came and went");
}

#[test]
fn mismatched_content_is_not_shared() {
    let (_dev, e) = fresh();
    let (_, container, src, data) = container_with_file(&e, 16 * BLOCK);
    let committed = e.clone_layer_with("image", "committed", true).unwrap();
    let ino = e
        .create(committed, ROOT_INODE, b"big", 0o644, 0, 0)
        .unwrap()
        .inode;
    let mut other = data.clone();
    other[BLOCK * 9 + 17] ^= 1;
    let shared = share(&e, committed, ino, container, src, &other);
    assert!(!shared);
    assert_eq!(e.getattr(committed, ino).unwrap().size, 0);
    assert_eq!(e.stats().engine.promoted_bytes, 0);
    // A range that is not holes in the destination is refused too.
    e.write(committed, ino, 0, b"x").unwrap();
    let shared = share(&e, committed, ino, container, src, &data);
    assert!(!shared);
    // Bad arguments are errors, not panics.
    assert!(e
        .share_blocks(committed, ino, container, src, 100, &[0; 10])
        .is_err());
    assert!(e
        .share_blocks(committed, ino, container, src, 0, &[])
        .is_err());
    fsck_clean(&e, "after refused promotions");
}

/// Two different 4 KiB blocks with the same xxh3-64, the engine's block
/// checksum: XXH3 adds each 8-byte input lane to a neighbouring accumulator
/// and multiplies the two 32-bit halves of (lane ^ secret) into its own.
/// With the low half of (lane ^ secret) zero the product is zero whatever
/// the high half, so raising one lane's high half by one and lowering
/// another lane's (same position, next stripe) by one leaves every
/// accumulator as it was. A container can write such a block.
fn xxh3_collision() -> (Vec<u8>, Vec<u8>) {
    // The low halves of XXH3's default secret words 0 and 1 (little endian).
    const SECRET_LO: [u32; 2] = [0x396c_feb8, 0x2c81_017c];
    let mut a = random(11, BLOCK);
    for (stripe, lo) in SECRET_LO.iter().enumerate() {
        let at = stripe * 64; // lane 0 of stripes 0 and 1
        let word = u64::from(*lo) | (0x1000u64 << 32);
        a[at..at + 8].copy_from_slice(&word.to_le_bytes());
    }
    let mut b = a.clone();
    let lane = |v: &[u8], at: usize| u64::from_le_bytes(v[at..at + 8].try_into().unwrap());
    b[0..8].copy_from_slice(&(lane(&a, 0) + (1 << 32)).to_le_bytes());
    b[64..72].copy_from_slice(&(lane(&a, 64) - (1 << 32)).to_le_bytes());
    (a, b)
}

#[test]
fn a_forged_checksum_never_stands_in_for_content() {
    let (a, b) = xxh3_collision();
    assert_ne!(a, b);
    assert_eq!(
        block_checksum(&a),
        block_checksum(&b),
        "the collision construction must hold for the engine's checksum"
    );
    let (_dev, e) = fresh();
    e.create_layer("image", true).unwrap();
    e.clone_layer("image", "init").unwrap();
    let container = e.clone_layer_with("init", "container", false).unwrap();
    let src = e
        .create(container, ROOT_INODE, b"bin", 0o755, 0, 0)
        .unwrap()
        .inode;
    // The container holds the forged block; the pulled or committed content
    // is `a`. Matching on checksums would give the new layer `b`.
    e.write(container, src, 0, &b).unwrap();
    let committed = e.clone_layer_with("image", "committed", true).unwrap();
    let ino = e
        .create(committed, ROOT_INODE, b"bin", 0o755, 0, 0)
        .unwrap()
        .inode;
    assert!(!share(&e, committed, ino, container, src, &a));
    assert_eq!(e.stats().engine.promoted_bytes, 0);
    // The caller writes instead, and the layer holds the real content.
    e.write(committed, ino, 0, &a).unwrap();
    assert_eq!(read_all(&e, committed, ino), a);
    fsck_clean(&e, "after a refused forgery");
}

#[test]
fn either_owner_can_go_first_and_the_last_frees() {
    for container_first in [true, false] {
        let (dev, e) = fresh();
        let base_live = {
            e.create_layer("empty", true).unwrap();
            e.sync().unwrap();
            e.stats().live_bytes
        };
        let (_, container, src, data) = container_with_file(&e, 256 * BLOCK);
        let (committed, ino) = promote(&e, container, src, &data);
        e.write(container, src, 0, &[1; BLOCK]).unwrap();
        if container_first {
            e.remove_layer("container").unwrap();
            e.remove_layer("init").unwrap();
            fsck_clean(&e, "after removing the container");
            assert_eq!(read_all(&e, committed, ino), data);
            // The image layer now owns the blocks alone: it may write in
            // place or copy, either way its reads stay right.
            e.write(committed, ino, 0, b"mine").unwrap();
            assert_eq!(&read_all(&e, committed, ino)[..4], b"mine");
            e.remove_layer("committed").unwrap();
        } else {
            e.remove_layer("committed").unwrap();
            fsck_clean(&e, "after removing the committed layer");
            let now = read_all(&e, container, src);
            assert_eq!(&now[..BLOCK], &[1; BLOCK]);
            assert_eq!(&now[BLOCK..], &data[BLOCK..]);
            e.remove_layer("container").unwrap();
            e.remove_layer("init").unwrap();
        }
        e.remove_layer("image").unwrap();
        fsck_clean(&e, "after removing everything");
        e.sync().unwrap();
        let live = e.stats().live_bytes;
        // Everything but the empty layer's few nodes is free again.
        assert!(
            live <= base_live + 64 * 1024,
            "container_first={container_first}: {live} live bytes, {base_live} at the start"
        );
        e.close().unwrap();
        let e = Engine::open(dev, quiet()).unwrap();
        fsck_clean(&e, "after reopening");
    }
}

#[test]
fn blocks_of_a_common_ancestor_are_inherited() {
    let (_dev, e) = fresh();
    let image = e.create_layer("image", true).unwrap();
    let ino = e
        .create(image, ROOT_INODE, b"lib", 0o644, 0, 0)
        .unwrap()
        .inode;
    let data = random(3, 32 * BLOCK);
    e.write(image, ino, 0, &data).unwrap();
    e.clone_layer("image", "init").unwrap();
    let container = e.clone_layer_with("init", "container", false).unwrap();
    // chmod only: Docker's tar carries the whole file again.
    e.setattr(
        container,
        ino,
        &SetAttr {
            mode: Some(0o600),
            ..SetAttr::default()
        },
    )
    .unwrap();
    let committed = e.clone_layer_with("image", "committed", true).unwrap();
    let copy = e
        .create(committed, ROOT_INODE, b"lib2", 0o600, 0, 0)
        .unwrap()
        .inode;
    assert!(share(&e, committed, copy, container, ino, &data));
    assert_eq!(read_all(&e, committed, copy), data);
    e.remove_layer("container").unwrap();
    e.remove_layer("init").unwrap();
    fsck_clean(&e, "inherited blocks");
    assert_eq!(read_all(&e, committed, copy), data);
}

#[test]
fn promotion_survives_a_reopen() {
    let (dev, e) = fresh();
    let (_, container, src, data) = container_with_file(&e, 40 * BLOCK);
    let (committed, ino) = promote(&e, container, src, &data);
    e.sync().unwrap();
    e.crash();
    let e = Engine::open(dev, quiet()).unwrap();
    fsck_clean(&e, "after a crash and reopen");
    assert_eq!(read_all(&e, committed, ino), data);
    e.write(container, src, 0, &[9; 100]).unwrap();
    assert_eq!(read_all(&e, committed, ino), data);
    e.remove_layer("container").unwrap();
    e.remove_layer("init").unwrap();
    assert_eq!(read_all(&e, committed, ino), data);
    fsck_clean(&e, "after the container went");
}

/// The commit path through power cuts: every crash point of a promotion,
/// the container's copy on write, the container's removal and the image
/// layer's own write and removal recovers to a state fsck finds clean, in
/// which whatever exists of either file holds exactly what was written.
/// `LCFS_SEED` replays a run.
#[test]
fn promotion_is_crash_safe() {
    use lcfs_engine::device::{FaultConfig, FaultyDevice};
    let seed = common::seed();
    println!("promotion crash test: LCFS_SEED={seed}");
    let faulty = Arc::new(FaultyDevice::new(48 << 20, FaultConfig::default()));
    let d: Arc<dyn Device> = faulty.clone();
    format(d.clone());
    let e = Engine::open(d, quiet()).unwrap();
    let (_, container, src, data) = container_with_file(&e, 48 * BLOCK + 7);
    e.sync().unwrap();
    e.crash();
    drop(e);
    // Every run starts from a copy of this (a crash image of a device with
    // nothing unflushed is an exact copy).
    let prepared = FaultyDevice::from_image(faulty.crash_image(), FaultConfig::default());

    // The scenario; returns how far it got.
    let scenario = |e: &Engine| -> std::result::Result<(), Error> {
        let committed = e.clone_layer_with("image", "committed", true)?;
        let ino = e.create(committed, ROOT_INODE, b"big", 0o644, 0, 0)?.inode;
        e.share_blocks(committed, ino, container, src, 0, &data)?;
        e.sync()?;
        e.write(container, src, 0, &[0xAB; BLOCK])?;
        e.sync()?;
        e.remove_layer("container")?;
        e.remove_layer("init")?;
        e.sync()?;
        e.write(committed, ino, 0, b"mine")?;
        e.sync()?;
        e.remove_layer("committed")?;
        e.sync()
    };
    // How many device ops the whole scenario takes.
    let (open_ops, total) = {
        let dev = Arc::new(FaultyDevice::from_image(
            prepared.crash_image(),
            FaultConfig::default(),
        ));
        let d: Arc<dyn Device> = dev.clone();
        let e = Engine::open(d, quiet()).unwrap();
        let before = dev.ops();
        scenario(&e).unwrap();
        let ops = dev.ops() - before;
        e.crash();
        (before, ops)
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // The scenario is a few dozen device ops: crash after every one of them,
    // three times each with different torn writes.
    let runs: Vec<u64> = (1..=total).flat_map(|op| [op; 3]).collect();
    let points = runs.len();
    for op in runs {
        let crash_at = open_ops + op;
        let dev = Arc::new(FaultyDevice::from_image(
            prepared.crash_image(),
            FaultConfig {
                seed: rand::Rng::gen(&mut rng),
                crash_after_ops: Some(crash_at),
                tear_writes: true,
                ..Default::default()
            },
        ));
        let d: Arc<dyn Device> = dev.clone();
        let e = Engine::open(d, quiet()).unwrap();
        let result = scenario(&e);
        assert!(
            result.is_ok() || dev.is_crashed(),
            "seed {seed} crash_at {crash_at}: failed without a crash: {result:?}"
        );
        e.crash();
        drop(e);
        let check = Arc::new(FaultyDevice::from_image(
            dev.crash_image(),
            FaultConfig::default(),
        ));
        let d: Arc<dyn Device> = check.clone();
        let e = Engine::open(d, quiet())
            .unwrap_or_else(|err| panic!("seed {seed} crash_at {crash_at}: reopen: {err}"));
        let report = e.fsck(true).unwrap();
        assert!(
            report.errors.is_empty(),
            "seed {seed} crash_at {crash_at}: fsck: {:?}",
            report.errors
        );
        if let Ok(layer) = e.layer_id("committed") {
            if let Ok(a) = e.lookup(layer, ROOT_INODE, b"big") {
                let got = read_all(&e, layer, a.inode);
                if !got.is_empty() {
                    assert_eq!(got.len(), data.len(), "seed {seed} crash_at {crash_at}");
                    assert_eq!(&got[4..], &data[4..], "seed {seed} crash_at {crash_at}");
                    assert!(&got[..4] == b"mine" || got[..4] == data[..4]);
                }
            }
        }
        if let Ok(layer) = e.layer_id("container") {
            let got = read_all(&e, layer, src);
            assert_eq!(
                &got[BLOCK..],
                &data[BLOCK..],
                "seed {seed} crash_at {crash_at}"
            );
        }
        e.crash();
    }
    println!("promotion crash test: {points} crashes over {total} device ops");
}
