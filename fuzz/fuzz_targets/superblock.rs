//! Fuzzes `Superblock::decode`: hostile bytes never panic; input that is not
//! exactly one block is refused; an accepted slot has consistent geometry,
//! round-trips through `encode` to an equal value, is laid out at the offsets
//! docs/format.md gives, and stops decoding when any one byte is flipped.
//!
//! Input: the 4096-byte slot, then an optional control byte (bit 0: write the
//! magic, bit 1: repair the checksum), so mutations get past the checksum.
#![no_main]

#[allow(dead_code)]
#[path = "block_common.rs"]
mod common;

use common::*;
use lcfs_engine::format::{Superblock, FORMAT_VERSION, SUPERBLOCK_MAGIC};
use libfuzzer_sys::fuzz_target;

const CHECKSUM_AT: usize = BLOCK_BYTES - 8;
/// Entries per segment-table block: (4096 - 32) / 16.
const SEGTABLE_ENTRIES: u64 = 254;

fuzz_target!(|data: &[u8]| {
    if let Ok(sb) = Superblock::decode(data, 0) {
        assert_eq!(data.len(), BLOCK_BYTES, "decoded a slot of the wrong size");
        check_accepted(data, &sb);
    }
    let mut block = block_of(data);
    let ctl = data.get(BLOCK_BYTES).copied().unwrap_or(0);
    if ctl & FIX_MAGIC != 0 {
        block[..8].copy_from_slice(&SUPERBLOCK_MAGIC);
    }
    if ctl & FIX_CHECKSUM != 0 {
        fix_checksum(&mut block, CHECKSUM_AT);
    }
    assert!(Superblock::decode(&block[..BLOCK_BYTES - 1], 0).is_err());
    if let Ok(sb) = Superblock::decode(&block, 4096) {
        check_accepted(&block, &sb);
    }
});

fn check_accepted(block: &[u8], sb: &Superblock) {
    assert_eq!(&block[..8], &SUPERBLOCK_MAGIC);
    assert_checksum(block, CHECKSUM_AT);
    assert_eq!(sb.version, FORMAT_VERSION);
    assert_eq!(u32_at(block, 12) as usize, BLOCK_BYTES);
    // The geometry the engine relies on when it opens the device.
    let seg = sb.segment_blocks as u64;
    assert!((16..=65536).contains(&seg));
    assert_eq!(sb.segtable_start_block, 2);
    assert!(sb.segtable_start_block + 2 * sb.segtable_blocks as u64 <= sb.data_start_block);
    assert!(sb.segtable_blocks as u64 * SEGTABLE_ENTRIES >= sb.segment_count as u64);
    let end = sb
        .data_start_block
        .checked_add(seg * sb.segment_count as u64)
        .expect("data area end overflows");
    assert!(end <= sb.device_blocks);

    // Round trip, and the encoding is canonical.
    let mut enc = vec![0u8; BLOCK_BYTES];
    sb.encode(&mut enc);
    let again = Superblock::decode(&enc, 0).expect("re-encoded superblock decodes");
    assert_eq!(&again, sb);
    let mut enc2 = vec![0u8; BLOCK_BYTES];
    again.encode(&mut enc2);
    assert_eq!(enc, enc2, "superblock encoding is not canonical");
    check_layout(&enc, sb);

    // Any one flipped byte makes the slot invalid, in the accepted input and
    // in the canonical encoding alike.
    for (at, mask) in flips(block, CHECKSUM_AT) {
        for image in [block, &enc[..]] {
            let mut c = image.to_vec();
            c[at] ^= mask;
            assert!(
                Superblock::decode(&c, 0).is_err(),
                "flip of byte {at} by {mask:#x} not caught"
            );
        }
    }
}

/// The field table of docs/format.md, checked against `encode`.
fn check_layout(enc: &[u8], sb: &Superblock) {
    assert_eq!(u32_at(enc, 8), sb.version);
    assert_eq!(&enc[16..32], &sb.uuid);
    assert_eq!(u64_at(enc, 32), sb.device_blocks);
    assert_eq!(u32_at(enc, 40), sb.segment_blocks);
    assert_eq!(u32_at(enc, 44), sb.segment_count);
    assert_eq!(u64_at(enc, 48), sb.data_start_block);
    assert_eq!(u64_at(enc, 56), sb.segtable_start_block);
    assert_eq!(u32_at(enc, 64), sb.segtable_blocks);
    assert_eq!(u32_at(enc, 68), 0);
    assert_eq!(u64_at(enc, 72), sb.checkpoint_seq);
    assert_eq!(u64_at(enc, 80), sb.next_batch_seq);
    assert_eq!(u64_at(enc, 88), sb.map_root_block);
    assert_eq!(u64_at(enc, 96), sb.map_root_checksum);
    assert_eq!(u64_at(enc, 104), sb.layer_table_root);
    assert_eq!(u64_at(enc, 112), sb.next_lbn);
    assert_eq!(u64_at(enc, 120), sb.next_layer_id);
    assert_eq!(u64_at(enc, 128), sb.segtable_checksum);
    assert_eq!(u64_at(enc, 136), sb.created_unix_ns);
    assert!(enc[144..CHECKSUM_AT].iter().all(|&b| b == 0));
}
