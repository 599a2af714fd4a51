//! Fuzzes `NodeImage::decode` for both tree kinds: hostile bytes never panic;
//! at most one kind accepts a block; an accepted node names the expected
//! address, has strictly ascending keys, a level of at most 32, entries that
//! fit the block and the shape of its level; it round-trips through `encode`
//! (canonically, header at the offsets docs/format.md gives), and any one
//! flipped byte or another expected address makes it fail.
//!
//! Input: control byte (bit 0: write the magic, bit 1: repair the checksum,
//! bit 2: expect the address the block names instead), the expected address
//! (u64 LE), then the block. Both tree kinds are tried on every block.
#![no_main]

#[allow(dead_code)]
#[path = "block_common.rs"]
mod common;

use common::*;
use lcfs_engine::format::{Key, NodeImage, TreeKind, NODE_MAGIC};
use libfuzzer_sys::fuzz_target;

const CHECKSUM_AT: usize = 32;
const HEADER_BYTES: usize = 64;
const LEAF_ENTRY_OVERHEAD: usize = 17 + 2;
const INTERNAL_ENTRY_BYTES: usize = 17 + 16;

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let ctl = data[0];
    let mut address = u64_at(data, 1);
    let mut block = block_of(&data[9..]);
    if ctl & FIX_MAGIC != 0 {
        block[..4].copy_from_slice(&NODE_MAGIC.to_le_bytes());
    }
    if ctl & OWN_ADDRESS != 0 {
        address = u64_at(&block, 8);
    }
    if ctl & FIX_CHECKSUM != 0 {
        fix_checksum(&mut block, CHECKSUM_AT);
    }
    let mut accepted = 0;
    for tree in [TreeKind::Map, TreeKind::Layer] {
        assert!(NodeImage::decode(&block[..BLOCK_BYTES - 1], 0, tree, address).is_err());
        if let Ok(node) = NodeImage::decode(&block, 0, tree, address) {
            accepted += 1;
            assert_eq!(block[4], tree as u8);
            check_accepted(&block, &node, tree, address);
        }
    }
    assert!(accepted <= 1, "a block decoded as both tree kinds");
});

fn check_accepted(block: &[u8], node: &NodeImage, tree: TreeKind, address: u64) {
    assert_eq!(u32_at(block, 0), NODE_MAGIC);
    assert_checksum(block, CHECKSUM_AT);
    assert_eq!(NodeImage::block_checksum(block), u64_at(block, CHECKSUM_AT));
    assert_eq!(node.tree, tree);
    assert_eq!(node.self_address, address);
    assert!(node.level <= 32);
    assert!(
        node.keys.windows(2).all(|w| w[0] < w[1]),
        "keys not ascending"
    );
    let entry_bytes = if node.level == 0 {
        assert_eq!(node.values.len(), node.keys.len());
        assert!(node.children.is_empty());
        node.values
            .iter()
            .map(|v| LEAF_ENTRY_OVERHEAD + v.len())
            .sum()
    } else {
        assert_eq!(node.children.len(), node.keys.len());
        assert!(node.values.is_empty());
        node.keys.len() * INTERNAL_ENTRY_BYTES
    };
    assert_eq!(entry_bytes, node.entry_bytes());
    assert!(entry_bytes <= BLOCK_BYTES - HEADER_BYTES);

    let mut enc = vec![0u8; BLOCK_BYTES];
    node.encode(&mut enc);
    let again = NodeImage::decode(&enc, 0, tree, address).expect("re-encoded node decodes");
    assert_eq!(&again, node);
    let mut enc2 = vec![0u8; BLOCK_BYTES];
    again.encode(&mut enc2);
    assert_eq!(enc, enc2, "node encoding is not canonical");
    check_layout(&enc, node);

    assert!(NodeImage::decode(&enc, 0, tree, address.wrapping_add(1)).is_err());
    let other = match tree {
        TreeKind::Map => TreeKind::Layer,
        TreeKind::Layer => TreeKind::Map,
    };
    assert!(NodeImage::decode(&enc, 0, other, address).is_err());
    for (at, mask) in flips(block, CHECKSUM_AT) {
        for image in [block, &enc[..]] {
            let mut c = image.to_vec();
            c[at] ^= mask;
            assert!(
                NodeImage::decode(&c, 0, tree, address).is_err(),
                "flip of byte {at} by {mask:#x} not caught"
            );
        }
    }
}

/// Header and entry layout of docs/format.md, checked against `encode`.
fn check_layout(enc: &[u8], node: &NodeImage) {
    assert_eq!(enc[5], node.level);
    assert_eq!(u16_at(enc, 6) as usize, node.keys.len());
    assert_eq!(u64_at(enc, 8), node.self_address);
    assert_eq!(u64_at(enc, 16), node.seq);
    assert_eq!(u64_at(enc, 24), node.owner);
    assert!(enc[40..HEADER_BYTES].iter().all(|&b| b == 0));
    let mut at = HEADER_BYTES;
    let key_at = |at: usize| Key::new(u64_at(enc, at), enc[at + 8], u64_at(enc, at + 9));
    for (i, k) in node.keys.iter().enumerate() {
        assert_eq!(key_at(at), *k);
        at += 17;
        if node.level == 0 {
            let len = u16_at(enc, at) as usize;
            assert_eq!(&enc[at + 2..at + 2 + len], &node.values[i][..]);
            at += 2 + len;
        } else {
            assert_eq!(u64_at(enc, at), node.children[i].address);
            assert_eq!(u64_at(enc, at + 8), node.children[i].checksum);
            at += 16;
        }
    }
    assert!(enc[at..].iter().all(|&b| b == 0));
}
