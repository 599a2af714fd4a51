//! Fuzzes `FsyncRecord::decode` and `FsyncRecord::claimed_blocks` (the
//! fsync log region is read from the device at every open): hostile bytes
//! never panic; an accepted record spans the blocks its header claims,
//! carries a valid checksum, round-trips through `encode` (canonically),
//! and any one flipped byte of an encoded record makes it fail.
//!
//! Input: control byte (bit 0: write the magic and a block count that
//! matches, bit 1: repair the checksum), a byte choosing 1 to 3 blocks, then
//! the record's bytes (zero-padded).
#![no_main]

#[allow(dead_code)]
#[path = "block_common.rs"]
mod common;

use common::*;
use lcfs_engine::format::{FsyncRecord, FSYNC_MAGIC};
use libfuzzer_sys::fuzz_target;

const CHECKSUM_AT: usize = 48;
const BLOCKS_AT: usize = 40;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let ctl = data[0];
    let blocks = 1 + data[1] as usize % 3;
    let mut rec = vec![0u8; blocks * BLOCK_BYTES];
    let n = (data.len() - 2).min(rec.len());
    rec[..n].copy_from_slice(&data[2..2 + n]);
    if ctl & FIX_MAGIC != 0 {
        rec[..8].copy_from_slice(&FSYNC_MAGIC);
        rec[BLOCKS_AT..BLOCKS_AT + 4].copy_from_slice(&(blocks as u32).to_le_bytes());
    }
    if ctl & FIX_CHECKSUM != 0 {
        fix_checksum(&mut rec, CHECKSUM_AT);
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&rec[8..24]);
    let claimed = FsyncRecord::claimed_blocks(&rec, &uuid);
    assert!(FsyncRecord::decode(&rec[..rec.len() - 1], 0).is_err());
    let Ok(record) = FsyncRecord::decode(&rec, 0) else {
        return;
    };
    assert_eq!(claimed, Some(blocks));
    assert_checksum(&rec, CHECKSUM_AT);
    assert_eq!(record.uuid, uuid);
    // The encoder uses as few blocks as the entries need.
    assert!(record.blocks() <= blocks);

    let mut enc = vec![0u8; record.blocks() * BLOCK_BYTES];
    record.encode(&mut enc);
    let again = FsyncRecord::decode(&enc, 0).expect("re-encoded record decodes");
    assert_eq!(again, record);
    let mut enc2 = vec![0u8; enc.len()];
    again.encode(&mut enc2);
    assert_eq!(enc, enc2, "fsync record encoding is not canonical");
    assert_eq!(
        FsyncRecord::claimed_blocks(&enc, &record.uuid),
        Some(record.blocks())
    );
    for (at, mask) in flips(&enc, CHECKSUM_AT) {
        let mut c = enc.clone();
        c[at] ^= mask;
        assert!(
            FsyncRecord::decode(&c, 0).is_err(),
            "flip of byte {at} by {mask:#x} not caught"
        );
    }
});
