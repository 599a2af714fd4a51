//! Byte-level encodings of every on-disk structure (see docs/format.md), one
//! module per record: [`superblock`], [`node`] (B+tree nodes), [`summary`]
//! (batch summaries), [`segtable`] (the segment table), [`keys`] (tree keys,
//! key kinds, name lists and directory entries), [`values`] (tree values),
//! [`fsynclog`] (fsync records).
//!
//! Everything is little-endian and fixed-layout. Every block carries a checksum
//! (xxh3-64 of the block with the checksum field zeroed), its own address and a
//! sequence number, and decoders check all three: a block read from the wrong
//! place, a stale block, or a torn block is an error, never data.

use crate::device::BLOCK_SIZE;
use crate::error::{Error, Result};
use xxhash_rust::xxh3::xxh3_64;

pub mod fsynclog;
pub mod keys;
pub mod node;
pub mod segtable;
pub mod summary;
pub mod superblock;
pub mod values;

/// A layer's hot-file summary, as stored in the layer table.
pub use crate::hotfiles::HotFiles;
pub use fsynclog::*;
pub use keys::*;
pub use node::*;
pub use segtable::*;
pub use summary::*;
pub use superblock::*;
pub use values::*;

pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"LCFSSB01";
pub const NODE_MAGIC: u32 = u32::from_le_bytes(*b"LCND");
pub const SUMMARY_MAGIC: u32 = u32::from_le_bytes(*b"LCSU");
pub const SEGTABLE_MAGIC: u32 = u32::from_le_bytes(*b"LCST");
pub const FORMAT_VERSION: u32 = 1;

/// Superblock slots live at blocks 0 and 1.
pub const SUPERBLOCK_SLOTS: u64 = 2;

/// Offset of the checksum field in every block kind that has one at a fixed place.
const SB_CHECKSUM_AT: usize = BLOCK_SIZE - 8;

fn checksum_with_hole(block: &[u8], at: usize) -> u64 {
    // The checksum covers the block with its own 8-byte field taken as zero.
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&block[..at]);
    h.update(&[0u8; 8]);
    h.update(&block[at + 8..]);
    h.digest()
}

/// Checksum of a data block (stored in the map entry that points at it).
pub fn data_checksum(block: &[u8]) -> u64 {
    xxh3_64(block)
}

pub(crate) struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl<'a> Writer<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, at: 0 }
    }
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.bytes(&v.to_le_bytes());
    }
}

/// A bounds-checked little-endian reader: decoding hostile bytes never panics.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, at: 0 }
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| Error::corrupt(0, "record truncated"))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.bytes(2)?.try_into().unwrap()))
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()))
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }
    pub(crate) fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }
    pub(crate) fn rest(&self) -> usize {
        self.buf.len() - self.at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trip_and_corruption() {
        let sb = Superblock {
            version: FORMAT_VERSION,
            uuid: [7; 16],
            device_blocks: 1 << 20,
            segment_blocks: 1024,
            segment_count: 1000,
            data_start_block: 1024,
            segtable_start_block: 2,
            segtable_blocks: 4,
            checkpoint_seq: 9,
            next_batch_seq: 10,
            map_root_block: 5000,
            map_root_checksum: 1,
            layer_table_root: 3,
            next_lbn: 77,
            next_layer_id: 4,
            segtable_checksum: 99,
            created_unix_ns: 5,
        };
        let mut b = vec![0u8; BLOCK_SIZE];
        sb.encode(&mut b);
        assert_eq!(Superblock::decode(&b, 0).unwrap(), sb);
        for at in [0, 20, 100, BLOCK_SIZE - 1] {
            let mut c = b.clone();
            c[at] ^= 1;
            assert!(
                Superblock::decode(&c, 0).is_err(),
                "flip at {at} not caught"
            );
        }
    }

    #[test]
    fn node_round_trip_checks_address_and_order() {
        let node = NodeImage {
            tree: TreeKind::Layer,
            level: 0,
            self_address: 42,
            seq: 3,
            owner: 2,
            keys: vec![Key::new(1, 1, 0), Key::new(1, 2, 5)],
            values: vec![vec![1, 2, 3], vec![]],
            children: vec![],
        };
        let mut b = vec![0u8; BLOCK_SIZE];
        node.encode(&mut b);
        assert_eq!(NodeImage::decode(&b, 0, TreeKind::Layer, 42).unwrap(), node);
        assert!(NodeImage::decode(&b, 0, TreeKind::Layer, 43).is_err());
        assert!(NodeImage::decode(&b, 0, TreeKind::Map, 42).is_err());
        let mut c = b.clone();
        c[NODE_HEADER_BYTES + 3] ^= 0x10;
        assert!(NodeImage::decode(&c, 0, TreeKind::Layer, 42).is_err());
    }

    #[test]
    fn summary_and_segtable_round_trip() {
        let s = Summary {
            self_block: 2048,
            seq: 17,
            entries: vec![
                (BlockTag::Logical(5), 11),
                (
                    BlockTag::MapNode {
                        first_object: 99,
                        level: 2,
                    },
                    12,
                ),
            ],
        };
        let mut b = vec![0u8; BLOCK_SIZE];
        s.encode(&mut b);
        assert_eq!(Summary::decode(&b, 2048).unwrap(), s);
        assert!(Summary::decode(&b, 2049).is_err());
        let t = SegtableBlock {
            index: 3,
            checkpoint_seq: 8,
            entries: vec![
                SegmentUsage {
                    live_blocks: 5,
                    open_seq: 6
                };
                SEGTABLE_ENTRIES
            ],
        };
        t.encode(&mut b);
        assert_eq!(SegtableBlock::decode(&b, 0, 3).unwrap(), t);
        assert!(SegtableBlock::decode(&b, 0, 4).is_err());
    }

    #[test]
    fn values_round_trip() {
        let i = InodeValue {
            mode: 0o100644,
            nlink: 2,
            size: 1 << 40,
            atime: Timestamp {
                seconds: -5,
                nanoseconds: 999_999_999,
            },
            ..Default::default()
        };
        assert_eq!(InodeValue::decode(&i.encode()).unwrap(), i);
        let l = LayerRecord {
            id: 3,
            name: b"abc-init".to_vec(),
            parent: 2,
            root: 10,
            frozen: true,
            cold: false,
            children: 1,
            created: Timestamp::now(),
            frozen_at: Timestamp::default(),
            next_inode: 5,
            inode_count: 4,
            owned_blocks: 8,
            quota_bytes: 0,
            usage: LayerUsage::default(),
            seal: 0,
        };
        assert_eq!(LayerRecord::decode(&l.encode()).unwrap(), l);
        // A size limit follows the name; records without one keep 88 + n bytes.
        assert_eq!(l.encode().len(), 88 + 8);
        let limited = LayerRecord {
            quota_bytes: 64 << 20,
            ..l.clone()
        };
        assert_eq!(limited.encode().len(), 88 + 8 + 8);
        assert_eq!(LayerRecord::decode(&limited.encode()).unwrap(), limited);
        // Usage follows the size limit (written as 0 when there is none).
        let used = LayerRecord {
            usage: LayerUsage {
                clones: 7,
                last_clone: Timestamp::now(),
                reads: 3,
                bytes_read: 12288,
                clone_reads: 40,
                clone_bytes_read: 1 << 30,
                applied_bytes: 5 << 20,
                apply_ns: 123_456_789,
                first_read: Timestamp::now(),
                early_reads: 9,
                early_bytes_read: 36_864,
                clone_starts: 2,
                clone_start_ns: 80_000_000,
                clone_early_reads: 18,
                clone_early_bytes_read: 73_728,
                early_files: 12,
                clone_early_files: 30,
            },
            ..l.clone()
        };
        assert_eq!(used.encode().len(), 88 + 8 + 8 + LayerUsage::ENCODED_BYTES);
        assert_eq!(LayerRecord::decode(&used.encode()).unwrap(), used);
        let both = LayerRecord {
            quota_bytes: 1 << 20,
            ..used.clone()
        };
        assert_eq!(LayerRecord::decode(&both.encode()).unwrap(), both);
        // A seal root follows usage (written as zeros when unused).
        let sealed = LayerRecord {
            seal: 77,
            ..l.clone()
        };
        assert_eq!(
            sealed.encode().len(),
            88 + 8 + 8 + LayerUsage::ENCODED_BYTES + 8
        );
        assert_eq!(LayerRecord::decode(&sealed.encode()).unwrap(), sealed);
        assert_eq!(LayerRecord::decode(&used.encode()).unwrap().seal, 0);
        // A record written before usage existed reads as unused.
        assert_eq!(
            LayerRecord::decode(&limited.encode()).unwrap().usage,
            LayerUsage::default()
        );
        let named = vec![(b"a".to_vec(), vec![1, 2]), (b"bb".to_vec(), vec![])];
        assert_eq!(decode_named(&encode_named(&named)).unwrap(), named);
        assert!(decode_named(&[5, 0, 1]).is_err());
    }
}
