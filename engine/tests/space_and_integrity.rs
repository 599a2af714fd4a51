//! Space and integrity: corruption is an error never data, a full device
//! returns ENOSPC and keeps earlier data, the cleaner lets several times the
//! device's capacity be written and deleted, sparse and >4 GiB files work, and
//! clones reading one file share one cached copy.

use lcfs_engine::device::{Device, FaultConfig, FaultyDevice, MemDevice};
use lcfs_engine::*;
use std::sync::Arc;

fn quiet() -> Config {
    Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..Config::default()
    }
}

fn format(dev: Arc<dyn Device>, segment: u64) {
    Engine::format(
        dev,
        &FormatOptions {
            segment_size_bytes: segment,
            force: false,
        },
    )
    .unwrap();
}

fn assert_clean(e: &Engine) {
    let r = e.fsck(true).unwrap();
    assert!(
        r.is_clean(),
        "fsck: {:#?}",
        &r.errors[..r.errors.len().min(20)]
    );
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn flipped_data_byte_reads_as_eio() {
    let dev = Arc::new(FaultyDevice::new(32 << 20, FaultConfig::default()));
    format(dev.clone(), 256 << 10);
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    let l = e.create_layer("l", false).unwrap();
    let f = e.create(l, ROOT_INODE, b"f", 0o644, 0, 0).unwrap();
    let data = pattern(7, 3 * 4096);
    e.write(l, f.inode, 0, &data).unwrap();
    e.sync().unwrap();
    e.close().unwrap();
    drop(e);
    let image = dev.crash_image().snapshot();
    let at = find(&image, &data[4096..4096 + 64]).expect("block on device") as u64;
    dev.corrupt(at + 100, 0x40);
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    let l = e.layer_id("l").unwrap();
    match e.read(l, f.inode, 0, data.len()) {
        Err(err) => assert_eq!(err.errno(), libc::EIO, "{err}"),
        Ok(_) => panic!("a corrupt block was returned as data"),
    }
    // The blocks around it still read.
    assert_eq!(e.read(l, f.inode, 0, 4096).unwrap(), data[..4096]);
    assert_eq!(e.read(l, f.inode, 8192, 4096).unwrap(), data[8192..]);
    let r = e.fsck(true).unwrap();
    assert!(
        r.errors.iter().any(|m| m.contains("checksum")),
        "fsck must see it: {:?}",
        r.errors
    );
}

/// A write that covers part of a block merges with the block's bytes, read
/// before the write changes anything (and without the store lock): a corrupt
/// block fails that write with EIO, and the engine goes on (a read in the
/// middle of the write would have left it half applied, stopping the engine).
#[test]
fn a_partial_write_onto_a_corrupt_block_fails_alone() {
    let dev = Arc::new(FaultyDevice::new(32 << 20, FaultConfig::default()));
    format(dev.clone(), 256 << 10);
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    let l = e.create_layer("l", false).unwrap();
    let f = e.create(l, ROOT_INODE, b"f", 0o644, 0, 0).unwrap();
    let data = pattern(9, 3 * 4096);
    e.write(l, f.inode, 0, &data).unwrap();
    e.close().unwrap();
    drop(e);
    let image = dev.crash_image().snapshot();
    let at = find(&image, &data[8192..8192 + 64]).expect("block on device") as u64;
    dev.corrupt(at + 100, 0x40);
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    let l = e.layer_id("l").unwrap();
    // Whole first block, partial last: the last block is read first.
    match e.write(l, f.inode, 0, &[5u8; 4096 + 4096 + 10]) {
        Err(err) => assert_eq!(err.errno(), libc::EIO, "{err}"),
        Ok(_) => panic!("merged with a corrupt block"),
    }
    assert_eq!(e.stats().read_only_reason, None);
    assert_eq!(
        e.read(l, f.inode, 0, 8192).unwrap(),
        data[..8192],
        "unchanged"
    );
    // Partial writes onto sound blocks, at both edges, still work.
    e.write(l, f.inode, 100, &[6u8; 4096]).unwrap();
    let mut want = data[..8192].to_vec();
    want[100..4196].fill(6);
    assert_eq!(e.read(l, f.inode, 0, 8192).unwrap(), want);
    e.sync().unwrap();
}

#[test]
fn corrupt_metadata_is_detected_and_superblock_falls_back() {
    let dev = Arc::new(FaultyDevice::new(32 << 20, FaultConfig::default()));
    format(dev.clone(), 256 << 10);
    {
        let e = Engine::open(dev.clone(), quiet()).unwrap();
        let l = e.create_layer("l", false).unwrap();
        for i in 0..200 {
            e.create(l, ROOT_INODE, format!("file-{i}").as_bytes(), 0o644, 0, 0)
                .unwrap();
        }
        e.close().unwrap();
    }
    // A torn newest superblock: the other slot takes over.
    let image = dev.crash_image().snapshot();
    let slot0 = u64::from_le_bytes(image[0x50..0x58].try_into().unwrap());
    let slot1 = u64::from_le_bytes(image[4096 + 0x50..4096 + 0x58].try_into().unwrap());
    let newest = if slot0 > slot1 { 0 } else { 4096 };
    let _ = (slot0, slot1);
    dev.corrupt(newest + 200, 0xff);
    let e = Engine::open(dev.clone(), quiet()).expect("falls back to the older slot");
    drop(e);
    dev.corrupt(newest + 200, 0xff); // restore
                                     // Corrupt every tree node: opening or reading must fail with an error.
    let image = dev.crash_image().snapshot();
    let mut nodes = 0;
    for b in (0..image.len()).step_by(4096) {
        if &image[b..b + 4] == b"LCND" {
            dev.corrupt(b as u64 + 3000, 0x01);
            nodes += 1;
        }
    }
    assert!(nodes > 0);
    match Engine::open(dev.clone(), quiet()) {
        Err(err) => assert_eq!(err.errno(), libc::EIO, "{err}"),
        Ok(e) => {
            let l = e.layer_id("l").unwrap();
            assert!(e.lookup(l, ROOT_INODE, b"file-5").is_err());
            assert!(!e.fsck(false).unwrap().is_clean());
        }
    }
    // Both superblocks corrupt: an lcfs that cannot be opened (never taken
    // for a blank device, which format would overwrite without --force).
    dev.corrupt(10, 0xff);
    dev.corrupt(4096 + 10, 0xff);
    assert!(matches!(
        Engine::open(dev.clone(), quiet()),
        Err(Error::Unopenable(_))
    ));
    // Magic gone too: not an lcfs device.
    dev.corrupt(0, 0xff);
    dev.corrupt(4096, 0xff);
    assert!(matches!(
        Engine::open(dev.clone(), quiet()),
        Err(Error::NotFormatted)
    ));
}

#[test]
fn full_device_gives_enospc_keeps_data_and_recovers_after_delete() {
    let dev = Arc::new(MemDevice::new(24 << 20));
    format(dev.clone(), 256 << 10);
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    let l = e.create_layer("l", false).unwrap();
    let mut files = Vec::new();
    let chunk = 256 << 10;
    let mut full = false;
    for i in 0..1000u32 {
        let f = e.create(l, ROOT_INODE, format!("f{i}").as_bytes(), 0o644, 0, 0);
        let f = match f {
            Ok(f) => f,
            Err(err) => {
                assert_eq!(err.errno(), libc::ENOSPC, "{err}");
                full = true;
                break;
            }
        };
        match e.write(l, f.inode, 0, &pattern(i, chunk)) {
            Ok(_) => files.push((i, f.inode)),
            Err(err) => {
                assert_eq!(err.errno(), libc::ENOSPC, "{err}");
                full = true;
                break;
            }
        }
    }
    assert!(full, "device never filled");
    assert!(files.len() > 40, "only {} files fit", files.len());
    for (i, ino) in &files {
        assert_eq!(
            e.read(l, *ino, 0, chunk).unwrap(),
            pattern(*i, chunk),
            "file {i} damaged by ENOSPC"
        );
    }
    e.sync().unwrap();
    assert_clean(&e);
    for (i, _) in files.iter().take(files.len() / 2) {
        e.unlink(l, ROOT_INODE, format!("f{i}").as_bytes()).unwrap();
    }
    e.sync().unwrap();
    let f = e.create(l, ROOT_INODE, b"after", 0o644, 0, 0).unwrap();
    e.write(l, f.inode, 0, &pattern(99, chunk * 4)).unwrap();
    e.close().unwrap();
    drop(e);
    let e = Engine::open(dev, quiet()).unwrap();
    let l = e.layer_id("l").unwrap();
    for (i, ino) in files.iter().skip(files.len() / 2) {
        assert_eq!(e.read(l, *ino, 0, chunk).unwrap(), pattern(*i, chunk));
    }
    let a = e.lookup(l, ROOT_INODE, b"after").unwrap();
    assert_eq!(
        e.read(l, a.inode, 0, chunk * 4).unwrap(),
        pattern(99, chunk * 4)
    );
    assert_clean(&e);
}

#[test]
fn writes_and_deletes_many_times_the_capacity() {
    let size = 32u64 << 20;
    let dev = Arc::new(MemDevice::new(size));
    format(dev.clone(), 256 << 10);
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    let base = e.create_layer("base", true).unwrap();
    let keep = e.create(base, ROOT_INODE, b"keep", 0o644, 0, 0).unwrap();
    e.write(base, keep.inode, 0, &pattern(1, 2 << 20)).unwrap();
    e.clone_layer("base", "c").unwrap();
    let c = e.layer_id("c").unwrap();
    // A file over a third of the device, overwritten at random: every
    // segment ends up partly live, so only the cleaner can make room.
    let big = e.create(c, ROOT_INODE, b"big", 0o644, 0, 0).unwrap();
    let big_len = size / 3;
    let mut shadow = pattern(2, big_len as usize);
    e.write(c, big.inode, 0, &shadow).unwrap();
    let mut written = big_len;
    let mut x = 12345u64;
    let mut round = 0u32;
    while written < 6 * size {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = 4096 * (1 + (x >> 60) as usize);
        let off = ((x >> 20) % (big_len - len as u64)) & !4095;
        let d = pattern(round, len);
        e.write(c, big.inode, off, &d)
            .unwrap_or_else(|err| panic!("after {written} bytes: {err}"));
        shadow[off as usize..off as usize + len].copy_from_slice(&d);
        written += len as u64;
        if round % 50 == 0 {
            // Small files come and go as well.
            let name = format!("s{}", round % 7);
            let _ = e.unlink(c, ROOT_INODE, name.as_bytes());
            let f = e
                .create(c, ROOT_INODE, name.as_bytes(), 0o644, 0, 0)
                .unwrap();
            e.write(c, f.inode, 0, &pattern(round, 100_000)).unwrap();
            written += 100_000;
            e.write(
                c,
                keep.inode,
                (round as u64 % 8) * 65536,
                &pattern(round, 65536),
            )
            .unwrap();
        }
        round += 1;
    }
    assert!(
        e.read(c, big.inode, 0, big_len as usize).unwrap() == shadow,
        "big file content"
    );
    e.sync().unwrap();
    let st = e.stats();
    assert!(
        st.engine.segments_cleaned > 0,
        "the cleaner never ran: {st:?}"
    );
    assert_eq!(
        e.read(base, keep.inode, 0, 2 << 20).unwrap(),
        pattern(1, 2 << 20),
        "parent changed"
    );
    assert_clean(&e);
    println!(
        "wrote {written} bytes on a {size}-byte device; {} segments cleaned, {} blocks moved",
        st.engine.segments_cleaned, st.engine.blocks_relocated
    );
}

#[test]
fn sparse_and_large_files() {
    let dev = Arc::new(MemDevice::new(64 << 20));
    format(dev.clone(), 256 << 10);
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    let l = e.create_layer("l", false).unwrap();
    let f = e.create(l, ROOT_INODE, b"big", 0o644, 0, 0).unwrap();
    let far = 5u64 << 30; // past 4 GiB
    e.write(l, f.inode, far, b"tail").unwrap();
    e.write(l, f.inode, 4096 * 3 + 10, b"head").unwrap();
    let a = e.getattr(l, f.inode).unwrap();
    assert_eq!(a.size, far + 4);
    assert_eq!(a.blocks_512, 2 * 8, "two 4 KiB blocks allocated");
    assert_eq!(e.read(l, f.inode, far - 2, 10).unwrap(), b"\0\0tail");
    assert_eq!(e.read(l, f.inode, 1 << 30, 8192).unwrap(), vec![0; 8192]);
    let mut want = vec![0u8; 4096];
    want[10..14].copy_from_slice(b"head");
    assert_eq!(e.read(l, f.inode, 4096 * 3, 4096).unwrap(), want);
    // Truncate down past the tail, then extend: the old bytes are gone.
    e.setattr(
        l,
        f.inode,
        &SetAttr {
            size: Some(4096 * 3 + 12),
            ..Default::default()
        },
    )
    .unwrap();
    e.setattr(
        l,
        f.inode,
        &SetAttr {
            size: Some(far + 4),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(e.read(l, f.inode, far, 4).unwrap(), vec![0; 4]);
    assert_eq!(e.read(l, f.inode, 4096 * 3 + 10, 4).unwrap(), b"he\0\0");
    // Punch a hole in the middle of data.
    let g = e.create(l, ROOT_INODE, b"g", 0o644, 0, 0).unwrap();
    e.write(l, g.inode, 0, &[9u8; 5 * 4096]).unwrap();
    e.fallocate(
        l,
        g.inode,
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
        100,
        3 * 4096,
    )
    .unwrap();
    let got = e.read(l, g.inode, 0, 5 * 4096).unwrap();
    assert!(got[..100].iter().all(|b| *b == 9) && got[100..100 + 3 * 4096].iter().all(|b| *b == 0));
    assert!(got[100 + 3 * 4096..].iter().all(|b| *b == 9));
    assert_eq!(e.getattr(l, g.inode).unwrap().blocks_512, 3 * 8);
    e.sync().unwrap();
    assert_clean(&e);
}

#[test]
fn clones_reading_one_file_share_one_cached_copy() {
    let dev = Arc::new(MemDevice::new(64 << 20));
    format(dev.clone(), 1 << 20);
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    let base = e.create_layer("base", true).unwrap();
    let f = e.create(base, ROOT_INODE, b"shared", 0o644, 0, 0).unwrap();
    let data = pattern(3, 1 << 20);
    e.write(base, f.inode, 0, &data).unwrap();
    e.close().unwrap();
    drop(e);
    // Reopen so every block comes from the device, not a log buffer.
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    let s0 = e.stats();
    for i in 0..10 {
        let c = e.clone_layer("base", &format!("c{i}")).unwrap();
        assert_eq!(e.read(c, f.inode, 0, data.len()).unwrap(), data);
    }
    let s1 = e.stats();
    let misses = s1.block_cache_misses - s0.block_cache_misses;
    let hits = s1.block_cache_hits - s0.block_cache_hits;
    assert_eq!(misses, 256, "only the first clone reads the device");
    assert_eq!(hits, 9 * 256);
    assert_eq!(s1.block_cache_blocks, 256, "one cached copy");
}
