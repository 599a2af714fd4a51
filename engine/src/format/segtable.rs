//! The segment table: live blocks and open sequence of every segment.

use super::*;

pub const SEGTABLE_HEADER_BYTES: usize = 32;
/// Segment entries per table block.
pub const SEGTABLE_ENTRIES: usize = (BLOCK_SIZE - SEGTABLE_HEADER_BYTES) / 16;
const SEGTABLE_CHECKSUM_AT: usize = 24;

/// Usage of one segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentUsage {
    /// Blocks still referenced by the durable state (data, nodes, summaries excluded).
    pub live_blocks: u32,
    /// Batch sequence number when the segment was last opened for writing; a
    /// summary with a lower sequence inside it is left over from an older life.
    pub open_seq: u64,
}

/// One block of the segment table (two copies on disk; see docs/format.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegtableBlock {
    pub index: u32,
    pub checkpoint_seq: u64,
    pub entries: Vec<SegmentUsage>,
}

impl SegtableBlock {
    pub fn encode(&self, block: &mut [u8]) {
        assert!(self.entries.len() <= SEGTABLE_ENTRIES);
        block.fill(0);
        let mut w = Writer::new(block);
        w.u32(SEGTABLE_MAGIC);
        w.u32(self.index);
        w.u64(self.checkpoint_seq);
        w.u32(self.entries.len() as u32);
        w.u32(0);
        w.u64(0); // checksum at 24
        for e in &self.entries {
            w.u32(e.live_blocks);
            w.u32(0);
            w.u64(e.open_seq);
        }
        let c = checksum_with_hole(block, SEGTABLE_CHECKSUM_AT);
        block[SEGTABLE_CHECKSUM_AT..SEGTABLE_CHECKSUM_AT + 8].copy_from_slice(&c.to_le_bytes());
    }

    pub fn decode(block: &[u8], offset: u64, index: u32) -> Result<SegtableBlock> {
        if block.len() != BLOCK_SIZE {
            return Err(Error::corrupt(offset, "segment table block has wrong size"));
        }
        let mut r = Reader::new(block);
        if r.u32()? != SEGTABLE_MAGIC {
            return Err(Error::corrupt(offset, "no segment table magic"));
        }
        let stored = u64::from_le_bytes(
            block[SEGTABLE_CHECKSUM_AT..SEGTABLE_CHECKSUM_AT + 8]
                .try_into()
                .unwrap(),
        );
        if stored != checksum_with_hole(block, SEGTABLE_CHECKSUM_AT) {
            return Err(Error::corrupt(offset, "segment table checksum mismatch"));
        }
        if r.u32()? != index {
            return Err(Error::corrupt(
                offset,
                "segment table block has wrong index",
            ));
        }
        let checkpoint_seq = r.u64()?;
        let count = r.u32()? as usize;
        if count > SEGTABLE_ENTRIES {
            return Err(Error::corrupt(
                offset,
                "segment table entry count out of range",
            ));
        }
        let mut r = Reader::new(&block[SEGTABLE_HEADER_BYTES..]);
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let live_blocks = r.u32()?;
            r.u32()?;
            entries.push(SegmentUsage {
                live_blocks,
                open_seq: r.u64()?,
            });
        }
        Ok(SegtableBlock {
            index,
            checkpoint_seq,
            entries,
        })
    }

    /// Hash input for the superblock's whole-table checksum.
    pub fn entries_bytes(entries: &[SegmentUsage]) -> Vec<u8> {
        let mut v = Vec::with_capacity(entries.len() * 12);
        for e in entries {
            v.extend_from_slice(&e.live_blocks.to_le_bytes());
            v.extend_from_slice(&e.open_seq.to_le_bytes());
        }
        v
    }
}
