//! Fuzzes `SegtableBlock::decode`: hostile bytes never panic; an accepted
//! segment-table block carries the expected index and at most 254 entries,
//! round-trips through `encode` (canonically, at the offsets docs/format.md
//! gives), hashes its entries as 12 bytes each for the superblock's table
//! checksum, and any one flipped byte or another index makes it fail.
//!
//! Input: control byte (bit 0: write the magic, bit 1: repair the checksum,
//! bit 2: expect the index the block names instead), the index (u32 LE),
//! then the block.
#![no_main]

#[allow(dead_code)]
#[path = "block_common.rs"]
mod common;

use common::*;
use lcfs_engine::format::{SegtableBlock, SEGTABLE_MAGIC};
use libfuzzer_sys::fuzz_target;

const CHECKSUM_AT: usize = 24;
const HEADER_BYTES: usize = 32;
/// (4096 - 32) / 16.
const ENTRIES: usize = 254;

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let ctl = data[0];
    let mut index = u32_at(data, 1);
    let mut block = block_of(&data[5..]);
    if ctl & FIX_MAGIC != 0 {
        block[..4].copy_from_slice(&SEGTABLE_MAGIC.to_le_bytes());
    }
    if ctl & OWN_ADDRESS != 0 {
        index = u32_at(&block, 4);
    }
    if ctl & FIX_CHECKSUM != 0 {
        fix_checksum(&mut block, CHECKSUM_AT);
    }
    assert!(SegtableBlock::decode(&block[..BLOCK_BYTES - 1], 0, index).is_err());
    let Ok(table) = SegtableBlock::decode(&block, 0, index) else {
        return;
    };
    assert_eq!(u32_at(&block, 0), SEGTABLE_MAGIC);
    assert_checksum(&block, CHECKSUM_AT);
    assert_eq!(table.index, index);
    assert!(table.entries.len() <= ENTRIES);
    assert_eq!(table.entries.len(), u32_at(&block, 16) as usize);

    let mut enc = vec![0u8; BLOCK_BYTES];
    table.encode(&mut enc);
    let again = SegtableBlock::decode(&enc, 0, index).expect("re-encoded block decodes");
    assert_eq!(again, table);
    let mut enc2 = vec![0u8; BLOCK_BYTES];
    again.encode(&mut enc2);
    assert_eq!(enc, enc2, "segment table encoding is not canonical");

    assert_eq!(u32_at(&enc, 4), table.index);
    assert_eq!(u64_at(&enc, 8), table.checkpoint_seq);
    assert_eq!(u32_at(&enc, 20), 0);
    let hashed = SegtableBlock::entries_bytes(&table.entries);
    assert_eq!(hashed.len(), 12 * table.entries.len());
    for (i, e) in table.entries.iter().enumerate() {
        let at = HEADER_BYTES + 16 * i;
        assert_eq!(u32_at(&enc, at), e.live_blocks);
        assert_eq!(u32_at(&enc, at + 4), 0);
        assert_eq!(u64_at(&enc, at + 8), e.open_seq);
        assert_eq!(u32_at(&hashed, 12 * i), e.live_blocks);
        assert_eq!(u64_at(&hashed, 12 * i + 4), e.open_seq);
    }
    let used = HEADER_BYTES + 16 * table.entries.len();
    assert!(enc[used..].iter().all(|&b| b == 0));

    assert!(SegtableBlock::decode(&enc, 0, index.wrapping_add(1)).is_err());
    for (at, mask) in flips(&block, CHECKSUM_AT) {
        for image in [&block[..], &enc[..]] {
            let mut c = image.to_vec();
            c[at] ^= mask;
            assert!(
                SegtableBlock::decode(&c, 0, index).is_err(),
                "flip of byte {at} by {mask:#x} not caught"
            );
        }
    }
});
