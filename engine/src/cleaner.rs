//! Space: the admission check every change passes, and the segment cleaner.
//!
//! A segment is reused only when no block in it is live and a checkpoint has
//! landed since its last block died. The cleaner makes segments empty by
//! copying their live blocks to the cold log: logical blocks move by updating
//! the address map (the trees that share them are untouched); map nodes move
//! by being rewritten at the next checkpoint.

use crate::device::{AlignedBuf, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::format::*;
use crate::store::{Store, Temperature};

/// A segment the cleaner reads without the store lock.
pub(crate) struct Victim {
    seg: u32,
    open_seq: u64,
    pub offset: u64,
    pub bytes: usize,
}

impl Store {
    /// Admits a change that will append `data_blocks` blocks. Deletions may use
    /// half of the reserve, so a full device can still be emptied.
    pub(crate) fn ensure_space(&mut self, data_blocks: u64, for_delete: bool) -> Result<()> {
        let reserve = if for_delete {
            self.reserve_blocks() / 2
        } else {
            self.reserve_blocks()
        };
        for _ in 0..16 {
            let need = data_blocks + self.metadata_estimate(data_blocks) + reserve;
            if self.available_blocks() >= need {
                return Ok(());
            }
            if self.removals_pending() > 0 {
                if self.room_mark == Some(self.mutation_mark()) {
                    // The caller frees them in steps, then runs again.
                    return Err(Error::NeedsRoom);
                }
                self.self_contained(|s| s.finish_removals())?;
                continue;
            }
            if self.space.has_pending_free() {
                self.checkpoint()?;
                continue;
            }
            if self.room_mark == Some(self.mutation_mark()) {
                // The caller makes room without the lock, then runs again.
                return Err(Error::NeedsRoom);
            }
            if self.clean(true, 4)? == 0 {
                break;
            }
        }
        let need = data_blocks + self.metadata_estimate(data_blocks) + reserve;
        if self.available_blocks() >= need {
            Ok(())
        } else {
            Err(Error::NoSpace)
        }
    }

    /// Share of free segments below which background cleaning starts.
    pub(crate) fn wants_cleaning(&self) -> bool {
        let free = self.space.free_count() + self.space.pending_free_count();
        free * 8 < self.geo.segment_count as usize
    }

    /// Cleans up to `max` segments; returns how many became free. Greedy
    /// (fewest live blocks) when `urgent`, otherwise cost-benefit:
    /// (1 - u) * age / (1 + u).
    pub(crate) fn clean(&mut self, urgent: bool, max: usize) -> Result<usize> {
        self.self_contained(|s| s.clean_segments(urgent, max))
    }

    /// Segments worth cleaning, best first: neither free, pending, open nor
    /// nearly full. Greedy (fewest live blocks) when `urgent`, otherwise
    /// cost-benefit.
    fn victims(&self, urgent: bool) -> Vec<u32> {
        let seg_blocks = self.geo.segment_blocks as u64;
        let now = self.log.next_batch_seq();
        let mut cands: Vec<(f64, u32)> = (0..self.geo.segment_count)
            .filter(|&s| self.may_clean(s))
            .filter(|&s| (self.space.live_blocks(s) as u64) < seg_blocks * 95 / 100)
            .map(|s| {
                let u = self.space.live_blocks(s) as f64 / seg_blocks as f64;
                let age = (now - self.space.open_seq(s).min(now)) as f64 + 1.0;
                let score = if urgent {
                    1.0 - u
                } else {
                    (1.0 - u) * age / (1.0 + u)
                };
                (score, s)
            })
            .collect();
        cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        cands.into_iter().map(|(_, s)| s).collect()
    }

    /// Whether `seg` holds blocks that can be moved: not free, not waiting to
    /// be free, not being filled by a log stream.
    fn may_clean(&self, seg: u32) -> bool {
        !self.space.is_free(seg) && !self.space.is_pending_free(seg) && !self.log.is_open(seg)
    }

    /// Moving a segment with `live` blocks must fit without touching the
    /// checkpoint reserve's half.
    fn room_to_move(&self, live: u64) -> bool {
        self.available_blocks() >= live + self.metadata_estimate(live) + self.reserve_blocks() / 2
    }

    fn clean_segments(&mut self, urgent: bool, max: usize) -> Result<usize> {
        self.check_writable()?;
        // Victims are read from the device: nothing may still be in flight.
        self.wait_inflight()?;
        let mut cleaned = Vec::new();
        for seg in self.victims(urgent).into_iter().take(max) {
            if !self.room_to_move(self.space.live_blocks(seg) as u64) {
                continue;
            }
            let buf = self.read_segment(seg)?;
            self.clean_segment(seg, &buf)?;
            cleaned.push(seg);
        }
        if cleaned.is_empty() {
            return Ok(0);
        }
        self.checkpoint()?;
        Ok(self.count_cleaned(&cleaned))
    }

    /// Segments of `cleaned` that are free now, counted as cleaned.
    pub(crate) fn count_cleaned(&mut self, cleaned: &[u32]) -> usize {
        let freed = cleaned.iter().filter(|&&s| self.space.is_free(s)).count();
        self.counters.segments_cleaned += freed as u64;
        freed
    }

    fn read_segment(&self, seg: u32) -> Result<AlignedBuf> {
        let mut buf = AlignedBuf::new(self.geo.segment_blocks as usize * BLOCK_SIZE);
        let start = self.geo.segment_start(seg);
        self.dev.read_at(start * BLOCK_SIZE as u64, &mut buf)?;
        Ok(buf)
    }

    /// The cleaner without device reads under the store lock, part 1: up to
    /// `max` victims whose segments the caller may read without the lock,
    /// each with its device offset and the open sequence it had.
    pub(crate) fn victims_to_read(&mut self, urgent: bool, max: usize) -> Result<Vec<Victim>> {
        self.check_writable()?;
        self.reap_finished()?;
        Ok(self
            .victims(urgent)
            .into_iter()
            .filter(|&seg| !self.log.segment_in_flight(seg))
            .take(max)
            .map(|seg| Victim {
                seg,
                open_seq: self.space.open_seq(seg),
                offset: self.geo.segment_start(seg) * BLOCK_SIZE as u64,
                bytes: self.geo.segment_blocks as usize * BLOCK_SIZE,
            })
            .collect())
    }

    /// Part 2, under the lock again: moves the live blocks of each victim
    /// read meanwhile. A segment that changed while it was read (cleaned by
    /// someone else, freed, reused: its open sequence moved) is skipped; a
    /// closed segment's content never changes otherwise. Returns the
    /// segments cleaned; a checkpoint must land before they are free.
    pub(crate) fn clean_victims(&mut self, read: Vec<(Victim, AlignedBuf)>) -> Result<Vec<u32>> {
        self.self_contained(|s| {
            s.check_writable()?;
            let mut cleaned = Vec::new();
            for (v, buf) in read {
                let unchanged = s.may_clean(v.seg)
                    && s.space.open_seq(v.seg) == v.open_seq
                    && !s.log.segment_in_flight(v.seg);
                if !unchanged || !s.room_to_move(s.space.live_blocks(v.seg) as u64) {
                    continue;
                }
                s.clean_segment(v.seg, &buf)?;
                cleaned.push(v.seg);
            }
            Ok(cleaned)
        })
    }

    /// Moves the live blocks of `seg`, whose content is `buf`, to the cold log.
    fn clean_segment(&mut self, seg: u32, buf: &[u8]) -> Result<()> {
        let start = self.geo.segment_start(seg);
        let n = self.geo.segment_blocks as usize;
        let open_seq = self.space.open_seq(seg);
        let mut at = 0usize;
        while at < n && self.space.live_blocks(seg) > 0 {
            let Ok(summary) = Summary::decode(
                &buf[at * BLOCK_SIZE..(at + 1) * BLOCK_SIZE],
                start + at as u64,
            ) else {
                break;
            };
            if summary.seq < open_seq || at + 1 + summary.entries.len() > n {
                break;
            }
            for (i, (tag, csum)) in summary.entries.iter().enumerate() {
                let phys = start + (at + 1 + i) as u64;
                match *tag {
                    BlockTag::Logical(lbn) => {
                        let Some(m) = self.map_get(lbn)? else {
                            continue;
                        };
                        if m.physical_block != phys || self.nodes.is_dirty(lbn) {
                            continue;
                        }
                        let b = at + 1 + i;
                        let data = buf[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE].to_vec();
                        let new =
                            self.append(Temperature::Cold, BlockTag::Logical(lbn), &data, *csum)?;
                        self.map_set(
                            lbn,
                            MapValue {
                                physical_block: new,
                                ..m
                            },
                        )?;
                        self.counters.blocks_relocated += 1;
                    }
                    BlockTag::MapNode {
                        first_object,
                        level,
                    } => {
                        if self.map_relocate_node(first_object, level, phys)? {
                            self.counters.blocks_relocated += 1;
                        }
                    }
                }
            }
            at += 1 + summary.entries.len();
        }
        let left = self.space.live_blocks(seg);
        if left != 0 {
            log::warn!("segment {seg}: {left} live blocks not found by the cleaner; left in place");
        }
        Ok(())
    }
}
