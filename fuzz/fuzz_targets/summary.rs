//! Fuzzes `Summary::decode`: hostile bytes never panic; an accepted batch
//! summary names the block it was read from, describes at most 253 blocks,
//! round-trips through `encode` (canonically, at the offsets docs/format.md
//! gives, map-node tags with bit 63 set), and any one flipped byte or another
//! block address makes it fail.
//!
//! Input: control byte (bit 0: write the magic, bit 1: repair the checksum,
//! bit 2: read it at the block it names instead), the block address (u64 LE),
//! then the block.
#![no_main]

#[allow(dead_code)]
#[path = "block_common.rs"]
mod common;

use common::*;
use lcfs_engine::format::{BlockTag, Summary, SUMMARY_MAGIC};
use libfuzzer_sys::fuzz_target;

const CHECKSUM_AT: usize = 32;
const HEADER_BYTES: usize = 40;
/// (4096 - 40) / 16.
const ENTRIES: usize = 253;
/// Block addresses whose byte offset fits in a u64: the decoder's contract
/// (the engine passes the block it read, which always does).
const MAX_BLOCK: u64 = u64::MAX / BLOCK_BYTES as u64;

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let ctl = data[0];
    let mut at_block = u64_at(data, 1);
    let mut block = block_of(&data[9..]);
    if ctl & FIX_MAGIC != 0 {
        block[..4].copy_from_slice(&SUMMARY_MAGIC.to_le_bytes());
    }
    if ctl & OWN_ADDRESS != 0 {
        at_block = u64_at(&block, 8);
    }
    at_block %= MAX_BLOCK;
    if ctl & FIX_CHECKSUM != 0 {
        fix_checksum(&mut block, CHECKSUM_AT);
    }
    assert!(Summary::decode(&block[..BLOCK_BYTES - 1], at_block).is_err());
    let Ok(summary) = Summary::decode(&block, at_block) else {
        return;
    };
    assert_eq!(u32_at(&block, 0), SUMMARY_MAGIC);
    assert_checksum(&block, CHECKSUM_AT);
    assert_eq!(summary.self_block, at_block);
    assert!(summary.entries.len() <= ENTRIES);
    assert_eq!(summary.entries.len(), u32_at(&block, 4) as usize);
    for (tag, _) in &summary.entries {
        match *tag {
            BlockTag::Logical(lbn) => assert_eq!(lbn >> 63, 0),
            BlockTag::MapNode { level, .. } => assert!(level < 128),
        }
    }

    let mut enc = vec![0u8; BLOCK_BYTES];
    summary.encode(&mut enc);
    let again = Summary::decode(&enc, at_block).expect("re-encoded summary decodes");
    assert_eq!(again, summary);
    let mut enc2 = vec![0u8; BLOCK_BYTES];
    again.encode(&mut enc2);
    assert_eq!(enc, enc2, "summary encoding is not canonical");

    // Layout: header, then (tag, checksum) pairs.
    assert_eq!(u64_at(&enc, 8), summary.self_block);
    assert_eq!(u64_at(&enc, 16), summary.seq);
    assert_eq!(u64_at(&enc, 24), 0);
    for (i, (tag, csum)) in summary.entries.iter().enumerate() {
        let at = HEADER_BYTES + 16 * i;
        let raw = u64_at(&enc, at);
        match *tag {
            BlockTag::Logical(lbn) => assert_eq!(raw, lbn),
            BlockTag::MapNode {
                first_object,
                level,
            } => {
                assert_eq!(raw >> 63, 1);
                assert_eq!((raw >> 56) & 0x7f, level as u64);
                assert_eq!(raw & ((1 << 56) - 1), first_object);
            }
        }
        assert_eq!(u64_at(&enc, at + 8), *csum);
    }
    let used = HEADER_BYTES + 16 * summary.entries.len();
    assert!(enc[used..].iter().all(|&b| b == 0));

    assert!(Summary::decode(&enc, (at_block + 1) % MAX_BLOCK).is_err());
    for (at, mask) in flips(&block, CHECKSUM_AT) {
        for image in [&block[..], &enc[..]] {
            let mut c = image.to_vec();
            c[at] ^= mask;
            assert!(
                Summary::decode(&c, at_block).is_err(),
                "flip of byte {at} by {mask:#x} not caught"
            );
        }
    }
});
