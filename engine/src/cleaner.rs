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
            if !self.pending_free.is_empty() {
                self.checkpoint()?;
                continue;
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
        let free = self.free.len() + self.pending_free.len();
        free * 8 < self.geo.segment_count as usize
    }

    /// Cleans up to `max` segments; returns how many became free. Greedy
    /// (fewest live blocks) when `urgent`, otherwise cost-benefit:
    /// (1 - u) * age / (1 + u).
    pub(crate) fn clean(&mut self, urgent: bool, max: usize) -> Result<usize> {
        self.self_contained(|s| s.clean_segments(urgent, max))
    }

    fn clean_segments(&mut self, urgent: bool, max: usize) -> Result<usize> {
        self.check_writable()?;
        // Victims are read from the device: nothing may still be in flight.
        self.wait_inflight()?;
        let seg_blocks = self.geo.segment_blocks as u64;
        let now = self.next_batch_seq;
        let open: Vec<u32> = self.streams.iter().filter_map(|s| s.seg).collect();
        let mut cands: Vec<(f64, u32)> = (0..self.geo.segment_count)
            .filter(|s| {
                !self.free.contains(s) && !self.pending_free.contains(s) && !open.contains(s)
            })
            .filter(|&s| (self.segs[s as usize].live_blocks as u64) < seg_blocks * 95 / 100)
            .map(|s| {
                let u = self.segs[s as usize].live_blocks as f64 / seg_blocks as f64;
                let age = (now - self.segs[s as usize].open_seq.min(now)) as f64 + 1.0;
                let score = if urgent {
                    1.0 - u
                } else {
                    (1.0 - u) * age / (1.0 + u)
                };
                (score, s)
            })
            .collect();
        cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut cleaned = Vec::new();
        for (_, seg) in cands.into_iter().take(max) {
            let live = self.segs[seg as usize].live_blocks as u64;
            // Moving it must fit without touching the checkpoint reserve's half.
            if self.available_blocks()
                < live + self.metadata_estimate(live) + self.reserve_blocks() / 2
            {
                continue;
            }
            self.clean_segment(seg)?;
            cleaned.push(seg);
        }
        if cleaned.is_empty() {
            return Ok(0);
        }
        self.checkpoint()?;
        let freed = cleaned.iter().filter(|s| self.free.contains(s)).count();
        self.counters.segments_cleaned += freed as u64;
        Ok(freed)
    }

    fn clean_segment(&mut self, seg: u32) -> Result<()> {
        let start = self.geo.segment_start(seg);
        let n = self.geo.segment_blocks as usize;
        let mut buf = AlignedBuf::new(n * BLOCK_SIZE);
        self.dev.read_at(start * BLOCK_SIZE as u64, &mut buf)?;
        let open_seq = self.segs[seg as usize].open_seq;
        let mut at = 0usize;
        while at < n && self.segs[seg as usize].live_blocks > 0 {
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
        let left = self.segs[seg as usize].live_blocks;
        if left != 0 {
            log::warn!("segment {seg}: {left} live blocks not found by the cleaner; left in place");
        }
        Ok(())
    }
}
