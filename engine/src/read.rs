//! The read path's second half: a [`ReadPlan`] says where each block of a
//! read comes from (resolved under the store lock by the filesystem layer),
//! and [`execute_plan`] fetches those blocks without the lock: from the shared
//! block cache, else from the device in contiguous runs, verified against
//! their checksums.

use crate::cache::{BlockCache, CachedBlock};
use crate::device::{AlignedBuf, Device, IoOp, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::format::data_checksum;
use std::sync::Arc;

/// Where each block of a read comes from (resolved under the lock, read after).
#[derive(Clone)]
pub(crate) enum BlockSource {
    Hole,
    Buffered(Vec<u8>),
    Device { physical_block: u64, checksum: u64 },
}

/// A device block's bytes as read (and verified) without the store lock.
pub(crate) struct KnownBlock {
    pub physical_block: u64,
    pub checksum: u64,
    pub bytes: Vec<u8>,
}

impl KnownBlock {
    /// Whether these are the bytes `src` names (the same device block with
    /// the same checksum: it was not rewritten since).
    pub fn is(&self, src: &BlockSource) -> bool {
        matches!(src, BlockSource::Device { physical_block, checksum }
            if *physical_block == self.physical_block && *checksum == self.checksum)
    }

    /// Reads a plan of device blocks (as made by
    /// `Store::partial_blocks_on_device`) into one KnownBlock each.
    pub fn read_all(
        dev: &dyn Device,
        cache: &BlockCache,
        plan: ReadPlan,
    ) -> Result<Vec<KnownBlock>> {
        let ids: Vec<(u64, u64)> = plan
            .blocks
            .iter()
            .filter_map(|b| match b {
                BlockSource::Device {
                    physical_block,
                    checksum,
                } => Some((*physical_block, *checksum)),
                _ => None,
            })
            .collect();
        debug_assert_eq!(ids.len(), plan.blocks.len(), "device blocks only");
        let bytes = execute_plan(dev, cache, plan)?;
        Ok(ids
            .into_iter()
            .zip(bytes.chunks(BLOCK_SIZE))
            .map(|((physical_block, checksum), b)| KnownBlock {
                physical_block,
                checksum,
                bytes: b.to_vec(),
            })
            .collect())
    }
}

pub(crate) struct ReadPlan {
    /// Offset of the read within its first block.
    pub skip: usize,
    pub len: usize,
    pub blocks: Vec<BlockSource>,
}

/// Reads a plan's blocks: holes as zeros, buffered ones as given, the rest from
/// the shared cache or the device (contiguous runs in one batch), verified.
pub(crate) fn execute_plan(
    dev: &dyn Device,
    cache: &BlockCache,
    plan: ReadPlan,
) -> Result<Vec<u8>> {
    execute_plan_keeping(dev, cache, plan, true)
}

/// [`execute_plan`]; `keep` false leaves the blocks read from the device
/// out of the cache (for a caller that caches the bytes itself).
pub(crate) fn execute_plan_keeping(
    dev: &dyn Device,
    cache: &BlockCache,
    plan: ReadPlan,
    keep: bool,
) -> Result<Vec<u8>> {
    // Device blocks come from the cache, or are read in runs of physically
    // contiguous blocks (up to 1 MiB each), verified and cached.
    let device_blocks = plan.blocks.iter().filter_map(|b| match b {
        BlockSource::Device { physical_block, .. } => Some(*physical_block),
        _ => None,
    });
    let mut cached = cache.get_many(device_blocks).into_iter();
    let mut hits: Vec<Option<CachedBlock>> = Vec::with_capacity(plan.blocks.len());
    let mut misses: Vec<(u64, u64)> = Vec::new();
    for src in &plan.blocks {
        let hit = match src {
            BlockSource::Device {
                physical_block,
                checksum,
            } => {
                let hit = cached.next().flatten();
                if hit.is_none() {
                    misses.push((*physical_block, *checksum));
                }
                hit
            }
            _ => None,
        };
        hits.push(hit);
    }
    misses.sort_unstable_by_key(|m| m.0);
    misses.dedup_by_key(|m| m.0);
    let mut runs: Vec<(u64, Vec<u64>)> = Vec::new();
    for (p, c) in misses {
        match runs.last_mut() {
            Some((start, v)) if *start + v.len() as u64 == p && v.len() < 256 => v.push(c),
            _ => runs.push((p, vec![c])),
        }
    }
    let mut bufs: Vec<AlignedBuf> = runs
        .iter()
        .map(|(_, v)| AlignedBuf::new(v.len() * BLOCK_SIZE))
        .collect();
    if !runs.is_empty() {
        let mut ops: Vec<IoOp<'_>> = runs
            .iter()
            .zip(bufs.iter_mut())
            .map(|((p, _), b)| IoOp::Read {
                offset: p * BLOCK_SIZE as u64,
                buf: &mut b[..],
            })
            .collect();
        dev.submit(&mut ops)?;
    }
    for ((p, checksums), b) in runs.iter().zip(bufs.iter()) {
        for (j, csum) in checksums.iter().enumerate() {
            if data_checksum(&b[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE]) != *csum {
                return Err(Error::corrupt(
                    (p + j as u64) * BLOCK_SIZE as u64,
                    "data block checksum mismatch",
                ));
            }
        }
        if keep {
            cache.insert_many(checksums.iter().enumerate().map(|(j, _)| {
                let block: CachedBlock = Arc::new(b[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE].to_vec());
                (p + j as u64, block)
            }));
        }
    }
    // The bytes of a block read just now, from its run's buffer.
    let fetched = |physical_block: u64| -> &[u8] {
        let r = runs.partition_point(|(start, v)| start + v.len() as u64 <= physical_block);
        let at = (physical_block - runs[r].0) as usize * BLOCK_SIZE;
        &bufs[r][at..at + BLOCK_SIZE]
    };
    // Only the asked-for bytes are assembled: [skip, skip + len) of the blocks.
    let total = plan.blocks.len() * BLOCK_SIZE;
    let end = (plan.skip + plan.len).min(total);
    let start = plan.skip.min(end);
    let mut out = Vec::with_capacity(end - start);
    for (i, (src, hit)) in plan.blocks.iter().zip(&hits).enumerate() {
        let block_start = i * BLOCK_SIZE;
        let from = start.max(block_start);
        let to = end.min(block_start + BLOCK_SIZE);
        if from >= to {
            continue;
        }
        let range = from - block_start..to - block_start;
        match (src, hit) {
            (BlockSource::Hole, _) => out.resize(out.len() + range.len(), 0),
            (BlockSource::Buffered(d), _) => out.extend_from_slice(&d[range]),
            (_, Some(d)) => out.extend_from_slice(&d[range]),
            (BlockSource::Device { physical_block, .. }, None) => {
                out.extend_from_slice(&fetched(*physical_block)[range])
            }
        }
    }
    Ok(out)
}
