//! Space: the segment usage table (live blocks and open sequence of every
//! segment), its two on-disk copies per table block, and the free and
//! pending-free sets.
//!
//! A segment is free when no block in it is live and a checkpoint has
//! landed since its last block died; until then it is pending. Which
//! segments the log streams are filling is the log's to say, so the calls
//! that depend on it take that answer from the caller. The cleaner's policy
//! (cleaner.rs) reads the table through this API.

use crate::device::{AlignedBuf, Device, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::format::{SegmentUsage, SegtableBlock, SEGTABLE_ENTRIES};
use crate::store::Geometry;
use std::collections::BTreeSet;

pub(crate) struct Space {
    geo: Geometry,
    segs: Vec<SegmentUsage>,
    /// For each segment table block, the checkpoint seq held by copy 0 and copy 1.
    segtable_copies: Vec<[u64; 2]>,
    /// Segment table blocks the next checkpoint writes.
    segtable_dirty: BTreeSet<u32>,
    free: BTreeSet<u32>,
    pending_free: BTreeSet<u32>,
    /// Online fscks reading a checkpoint: while any does, segments a newer
    /// checkpoint frees are held in `held_free` instead of being reused.
    pins: usize,
    held_free: BTreeSet<u32>,
    /// Free segments kept out of use while the fsync log is replayed.
    withheld: BTreeSet<u32>,
}

pub(crate) fn seg_table_checksum(segs: &[SegmentUsage]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&SegtableBlock::entries_bytes(segs))
}

impl Space {
    /// An empty device: every segment free, every table block to be written.
    pub fn new(geo: &Geometry) -> Space {
        let n = geo.segment_count as usize;
        let tb = geo.segtable_blocks as usize;
        Space {
            geo: geo.clone(),
            segs: vec![SegmentUsage::default(); n],
            segtable_copies: vec![[0, 0]; tb],
            segtable_dirty: (0..tb as u32).collect(),
            free: (0..geo.segment_count).collect(),
            pending_free: BTreeSet::new(),
            pins: 0,
            held_free: BTreeSet::new(),
            withheld: BTreeSet::new(),
        }
    }

    /// Reads the segment table checkpoint `seq` wrote (its checksum in the
    /// superblock is `expect`). Segments without live blocks are free.
    pub fn load(dev: &dyn Device, geo: &Geometry, seq: u64, expect: u64) -> Result<Space> {
        let mut s = Space::new(geo);
        let stale = s.load_segtable(dev, seq, expect)?;
        s.segtable_dirty = stale.into_iter().collect();
        s.free = (0..geo.segment_count)
            .filter(|&i| s.segs[i as usize].live_blocks == 0)
            .collect();
        Ok(s)
    }

    /// Loads the segment table; returns blocks that must be rewritten.
    fn load_segtable(&mut self, dev: &dyn Device, seq: u64, expect: u64) -> Result<Vec<u32>> {
        let n = self.geo.segtable_blocks as usize;
        let mut buf = AlignedBuf::new(2 * n * BLOCK_SIZE);
        let start = self.geo.segtable_start_block * BLOCK_SIZE as u64;
        dev.read_at(start, &mut buf)?;
        let mut stale = Vec::new();
        for i in 0..n {
            let mut chosen: Option<SegtableBlock> = None;
            for copy in 0..2 {
                let at = (2 * i + copy) * BLOCK_SIZE;
                let off = start + at as u64;
                if let Ok(b) = SegtableBlock::decode(&buf[at..at + BLOCK_SIZE], off, i as u32) {
                    if b.checkpoint_seq > seq {
                        // Written by a checkpoint that never landed. The next
                        // checkpoint reuses its sequence number, so this copy
                        // must be overwritten before then: count it as empty
                        // (the write target) and rewrite the block.
                        self.segtable_copies[i][copy] = 0;
                        stale.push(i as u32);
                        continue;
                    }
                    self.segtable_copies[i][copy] = b.checkpoint_seq;
                    if b.checkpoint_seq <= seq
                        && chosen
                            .as_ref()
                            .is_none_or(|c| b.checkpoint_seq > c.checkpoint_seq)
                    {
                        chosen = Some(b);
                    }
                }
            }
            let b = chosen.ok_or_else(|| {
                Error::corrupt(
                    start + (2 * i * BLOCK_SIZE) as u64,
                    "no valid copy of a segment table block",
                )
            })?;
            let first = i * SEGTABLE_ENTRIES;
            for (j, e) in b.entries.iter().enumerate() {
                if let Some(slot) = self.segs.get_mut(first + j) {
                    *slot = *e;
                }
            }
        }
        if seg_table_checksum(&self.segs) != expect {
            return Err(Error::corrupt(
                start,
                "segment table does not match the superblock checksum",
            ));
        }
        Ok(stale)
    }

    fn mark_dirty(&mut self, seg: u32) {
        self.segtable_dirty.insert(seg / SEGTABLE_ENTRIES as u32);
    }

    // ------------------------------------------------------------ queries

    /// Usage of every segment, in segment order.
    pub fn usages(&self) -> &[SegmentUsage] {
        &self.segs
    }

    pub fn live_blocks(&self, seg: u32) -> u32 {
        self.segs[seg as usize].live_blocks
    }

    /// The batch sequence number current when `seg` was last opened.
    pub fn open_seq(&self, seg: u32) -> u64 {
        self.segs[seg as usize].open_seq
    }

    pub fn live_blocks_total(&self) -> u64 {
        self.segs.iter().map(|u| u.live_blocks as u64).sum()
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    pub fn is_free(&self, seg: u32) -> bool {
        self.free.contains(&seg)
    }

    pub fn is_pending_free(&self, seg: u32) -> bool {
        self.pending_free.contains(&seg)
    }

    /// Whether a checkpoint would make segments free.
    pub fn has_pending_free(&self) -> bool {
        !self.pending_free.is_empty()
    }

    /// Blocks of the free segments.
    pub fn free_blocks(&self) -> u64 {
        self.free.len() as u64 * self.geo.segment_blocks as u64
    }

    /// Blocks held back for checkpoints and the cleaner.
    pub fn reserve_blocks(&self) -> u64 {
        let seg = self.geo.segment_blocks as u64;
        (3 * seg).max(self.geo.segment_count as u64 * seg / 50)
    }

    /// Segments that become free at the next checkpoint.
    pub fn pending_free_count(&self) -> usize {
        self.pending_free.len()
    }

    // ------------------------------------------------------------ changes

    /// Takes the lowest free segment for a log stream, recording `open_seq`
    /// (the log's next batch sequence number) as its opening.
    pub fn open_segment(&mut self, open_seq: u64) -> Option<u32> {
        let seg = self.free.pop_first()?;
        self.segs[seg as usize].open_seq = open_seq;
        self.mark_dirty(seg);
        Some(seg)
    }

    /// One more live block in `seg` (a block appended to it).
    pub fn add_live(&mut self, seg: u32) {
        self.segs[seg as usize].live_blocks += 1;
        self.mark_dirty(seg);
    }

    /// One fewer live block in the segment holding `block`. `open` says
    /// whether a log stream is filling that segment.
    pub fn release_block(&mut self, block: u64, open: impl FnOnce(u32) -> bool) {
        let Some(seg) = self.geo.segment_of(block) else {
            debug_assert!(false, "release of block {block:#x} outside the data area");
            return;
        };
        let u = &mut self.segs[seg as usize];
        debug_assert!(u.live_blocks > 0, "segment {seg} live count underflow");
        u.live_blocks = u.live_blocks.saturating_sub(1);
        let empty = u.live_blocks == 0;
        self.mark_dirty(seg);
        if empty && !open(seg) {
            // Reusable only once a checkpoint no longer references it.
            self.pending_free.insert(seg);
        }
    }

    /// A log stream stopped filling `seg`: if nothing in it is live, it is
    /// free after the next checkpoint.
    pub fn closed(&mut self, seg: u32) {
        if self.segs[seg as usize].live_blocks == 0 {
            self.pending_free.insert(seg);
        }
    }

    /// Checkpoint phase 1: the segments the checkpoint will free.
    pub fn take_pending_free(&mut self) -> BTreeSet<u32> {
        std::mem::take(&mut self.pending_free)
    }

    /// Checkpoint phase 3: segments of `freed` still empty and not open
    /// (per `open`) become free, or are held while a pin is held.
    pub fn free_after_checkpoint(&mut self, freed: BTreeSet<u32>, open: impl Fn(u32) -> bool) {
        if self.pins > 0 {
            // An online fsck reads an older checkpoint, which may still
            // use these segments.
            self.held_free.extend(freed);
        } else {
            self.make_free(freed, open);
        }
    }

    /// Segments a landed checkpoint freed become reusable (unless a log
    /// stream has opened one since).
    fn make_free(&mut self, segments: impl IntoIterator<Item = u32>, open: impl Fn(u32) -> bool) {
        for s in segments {
            if self.segs[s as usize].live_blocks == 0 && !open(s) {
                self.free.insert(s);
            }
        }
    }

    /// Keeps free segments out of use (fsync log replay reads them) until
    /// [`Space::release_withheld`].
    pub fn withhold(&mut self, segments: &BTreeSet<u32>) {
        for s in segments {
            if self.free.remove(s) {
                self.withheld.insert(*s);
            }
        }
    }

    /// Withheld segments still empty and not open become free again.
    pub fn release_withheld(&mut self, open: impl Fn(u32) -> bool) {
        let withheld = std::mem::take(&mut self.withheld);
        self.make_free(withheld, open);
    }

    /// An online fsck starts reading a checkpoint.
    pub fn pin(&mut self) {
        self.pins += 1;
    }

    /// An online fsck ended: after the last one, the segments held meanwhile
    /// become reusable (those still empty and not open, per `open`).
    pub fn unpin(&mut self, open: impl Fn(u32) -> bool) {
        self.pins -= 1;
        if self.pins == 0 {
            let held = std::mem::take(&mut self.held_free);
            self.make_free(held, open);
        }
    }

    /// Checkpoint phase 1: the changed segment-table blocks encoded for
    /// checkpoint `seq`, each with the device offset of the copy not holding
    /// the newest valid version.
    pub fn encode_dirty_tables(&mut self, seq: u64) -> Vec<(u64, AlignedBuf)> {
        let dirty_tables: Vec<u32> = std::mem::take(&mut self.segtable_dirty)
            .into_iter()
            .collect();
        let mut segtable = Vec::with_capacity(dirty_tables.len());
        for i in dirty_tables {
            let first = i as usize * SEGTABLE_ENTRIES;
            let last = (first + SEGTABLE_ENTRIES).min(self.segs.len());
            let tb = SegtableBlock {
                index: i,
                checkpoint_seq: seq,
                entries: self.segs[first..last].to_vec(),
            };
            let mut b = AlignedBuf::new(BLOCK_SIZE);
            tb.encode(&mut b);
            let copies = &mut self.segtable_copies[i as usize];
            let copy = if copies[0] <= copies[1] { 0 } else { 1 };
            copies[copy] = seq;
            let block = self.geo.segtable_start_block + 2 * i as u64 + copy as u64;
            segtable.push((block * BLOCK_SIZE as u64, b));
        }
        segtable
    }

    /// The checksum of the whole table, as the superblock records it.
    pub fn checksum(&self) -> u64 {
        seg_table_checksum(&self.segs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> (Geometry, Space) {
        let geo = Geometry::for_device(16 * 64, 64).expect("geometry");
        let s = Space::new(&geo);
        (geo, s)
    }

    #[test]
    fn a_segment_is_free_again_only_after_a_checkpoint() {
        let (geo, mut s) = space();
        let all = s.free_count();
        let seg = s.open_segment(7).expect("free segment");
        assert_eq!(s.open_seq(seg), 7);
        assert_eq!(s.free_count(), all - 1);
        s.add_live(seg);
        s.add_live(seg);
        let block = geo.segment_start(seg);
        // Still open in a stream: not pending when it empties.
        s.release_block(block, |_| true);
        s.release_block(block + 1, |_| true);
        assert_eq!(s.live_blocks(seg), 0);
        assert!(!s.is_pending_free(seg));
        // The stream closes it: pending, then free once a checkpoint lands.
        s.closed(seg);
        assert!(s.is_pending_free(seg));
        let freed = s.take_pending_free();
        assert!(!s.has_pending_free());
        s.free_after_checkpoint(freed, |_| false);
        assert!(s.is_free(seg));
        assert_eq!(s.free_count(), all);
    }

    #[test]
    fn a_segment_that_came_back_to_life_stays_in_use() {
        let (geo, mut s) = space();
        let seg = s.open_segment(1).expect("free segment");
        s.add_live(seg);
        s.release_block(geo.segment_start(seg), |_| false);
        assert!(s.is_pending_free(seg));
        let freed = s.take_pending_free();
        // Reopened before the checkpoint finished: it must not become free.
        s.free_after_checkpoint(freed, |_| true);
        assert!(!s.is_free(seg));
    }

    #[test]
    fn dirty_table_blocks_alternate_between_copies() {
        let (geo, mut s) = space();
        let first = s.encode_dirty_tables(1);
        assert_eq!(first.len(), geo.segtable_blocks as usize);
        let start = geo.segtable_start_block * BLOCK_SIZE as u64;
        assert_eq!(first[0].0, start);
        assert!(s.encode_dirty_tables(2).is_empty(), "nothing changed");
        let seg = s.open_segment(2).expect("free segment");
        let second = s.encode_dirty_tables(3);
        assert_eq!(second.len(), 1);
        let index = seg as u64 / SEGTABLE_ENTRIES as u64;
        assert_eq!(second[0].0, start + (2 * index + 1) * BLOCK_SIZE as u64);
    }
}
