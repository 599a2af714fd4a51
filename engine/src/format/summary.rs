//! Batch summaries: what each logged block is, for the cleaner and fsck.

use super::*;

/// What a logged block is, as recorded in its batch summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockTag {
    /// A block addressed by a logical block number (file data or a layer-tree node).
    Logical(u64),
    /// An address-map node whose first key's object is given (to find it again).
    MapNode { first_object: u64, level: u8 },
}

const TAG_MAP_BIT: u64 = 1 << 63;

impl BlockTag {
    fn encode(self) -> u64 {
        match self {
            BlockTag::Logical(lbn) => {
                assert!(lbn & TAG_MAP_BIT == 0);
                lbn
            }
            BlockTag::MapNode {
                first_object,
                level,
            } => TAG_MAP_BIT | ((level as u64) << 56) | (first_object & ((1 << 56) - 1)),
        }
    }
    fn decode(v: u64) -> BlockTag {
        if v & TAG_MAP_BIT != 0 {
            BlockTag::MapNode {
                first_object: v & ((1 << 56) - 1),
                level: ((v >> 56) & 0x7f) as u8,
            }
        } else {
            BlockTag::Logical(v)
        }
    }
}

pub const SUMMARY_HEADER_BYTES: usize = 40;
/// Blocks one batch summary can describe.
pub const SUMMARY_ENTRIES: usize = (BLOCK_SIZE - SUMMARY_HEADER_BYTES) / 16;
const SUMMARY_CHECKSUM_AT: usize = 32;

/// The first block of every batch written to the log: who the following blocks
/// are, their checksums, the batch sequence number and the summary's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub self_block: u64,
    pub seq: u64,
    pub entries: Vec<(BlockTag, u64)>,
}

impl Summary {
    pub fn encode(&self, block: &mut [u8]) {
        assert!(self.entries.len() <= SUMMARY_ENTRIES);
        block.fill(0);
        let mut w = Writer::new(block);
        w.u32(SUMMARY_MAGIC);
        w.u32(self.entries.len() as u32);
        w.u64(self.self_block);
        w.u64(self.seq);
        w.u64(0);
        w.u64(0); // checksum at 32
        for (tag, csum) in &self.entries {
            w.u64(tag.encode());
            w.u64(*csum);
        }
        let c = checksum_with_hole(block, SUMMARY_CHECKSUM_AT);
        block[SUMMARY_CHECKSUM_AT..SUMMARY_CHECKSUM_AT + 8].copy_from_slice(&c.to_le_bytes());
    }

    pub fn decode(block: &[u8], self_block: u64) -> Result<Summary> {
        let offset = self_block.saturating_mul(BLOCK_SIZE as u64);
        if block.len() != BLOCK_SIZE {
            return Err(Error::corrupt(offset, "summary has wrong size"));
        }
        let mut r = Reader::new(block);
        if r.u32()? != SUMMARY_MAGIC {
            return Err(Error::corrupt(offset, "no summary magic"));
        }
        let stored = u64::from_le_bytes(
            block[SUMMARY_CHECKSUM_AT..SUMMARY_CHECKSUM_AT + 8]
                .try_into()
                .unwrap(),
        );
        if stored != checksum_with_hole(block, SUMMARY_CHECKSUM_AT) {
            return Err(Error::corrupt(offset, "summary checksum mismatch"));
        }
        let count = r.u32()? as usize;
        if count > SUMMARY_ENTRIES {
            return Err(Error::corrupt(offset, "summary entry count out of range"));
        }
        let at = r.u64()?;
        if at != self_block {
            return Err(Error::corrupt(
                offset,
                format!("summary claims block {at:#x}"),
            ));
        }
        let seq = r.u64()?;
        let mut r = Reader::new(&block[SUMMARY_HEADER_BYTES..]);
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            entries.push((BlockTag::decode(r.u64()?), r.u64()?));
        }
        Ok(Summary {
            self_block,
            seq,
            entries,
        })
    }
}
