//! The read path's second half: a [`ReadPlan`] says where each block of a
//! read comes from (resolved under the store lock by the filesystem layer),
//! and [`execute_plan`] fetches those blocks without the lock: from the shared
//! block cache, else from the device in contiguous runs, verified against
//! their checksums (or, for a verified read, their seal's block hashes).

use crate::cache::{Block, BlockCache, CachedBlock};
use crate::device::{AlignedBuf, Device, IoOp, BLOCK_SIZE};
use crate::digest::{block_hash, zero_block_hash, Sha256Digest};
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
    unchecked(execute_plan_checked(dev, cache, plan, keep, None)?)
}

/// The bytes of a read made with no expected hashes (which cannot
/// mismatch).
pub(crate) fn unchecked(c: Checked) -> Result<Vec<u8>> {
    c.map_err(|i| Error::Invalid(format!("block {i} of a read was checked against no hash")))
}

/// What a verified read expects of each block of its plan, in plan order:
/// the block's SHA-256 block hash, or `None` for a block the caller checks
/// itself (a file's partial last block, hashed over the bytes up to the
/// end of the file).
pub(crate) type Expected<'a> = &'a [Option<Sha256Digest>];

/// A plan's bytes, or the index in the plan of the first block whose
/// bytes are not the ones its expected hash names.
pub(crate) type Checked = std::result::Result<Vec<u8>, usize>;

/// [`execute_plan_keeping`], each block checked against `expect` when
/// given. A block read from the device whose hash is the one expected
/// skips its xxh3 checksum (the hash vouches for every byte); one whose
/// hash is not gets the checksum, so damage on the device stays a corrupt
/// block and only bytes that pass it are a mismatch. A cached block keeps
/// its hash, so a verified read of it hashes nothing again.
pub(crate) fn execute_plan_checked(
    dev: &dyn Device,
    cache: &BlockCache,
    plan: ReadPlan,
    keep: bool,
    expect: Option<Expected<'_>>,
) -> Result<Checked> {
    let expected = |i: usize| expect.and_then(|e| e.get(i).copied().flatten());
    // Device blocks come from the cache, or are read in runs of physically
    // contiguous blocks (up to 1 MiB each), verified and cached.
    let device_blocks = plan.blocks.iter().filter_map(|b| match b {
        BlockSource::Device { physical_block, .. } => Some(*physical_block),
        _ => None,
    });
    let mut cached = cache.get_many(device_blocks).into_iter();
    let mut hits: Vec<Option<CachedBlock>> = Vec::with_capacity(plan.blocks.len());
    let mut misses: Vec<(u64, u64, Option<Sha256Digest>)> = Vec::new();
    for (i, src) in plan.blocks.iter().enumerate() {
        let hit = match src {
            BlockSource::Device {
                physical_block,
                checksum,
            } => {
                let hit = cached.next().flatten();
                if hit.is_none() {
                    misses.push((*physical_block, *checksum, expected(i)));
                }
                hit
            }
            _ => None,
        };
        hits.push(hit);
    }
    misses.sort_by_key(|m| m.0);
    misses.dedup_by_key(|m| m.0);
    type Missed = (u64, Option<Sha256Digest>);
    let mut runs: Vec<(u64, Vec<Missed>)> = Vec::new();
    for (p, c, h) in misses {
        match runs.last_mut() {
            Some((start, v)) if *start + v.len() as u64 == p && v.len() < 256 => v.push((c, h)),
            _ => runs.push((p, vec![(c, h)])),
        }
    }
    // Every run into one buffer, run after run: the thread's reused one
    // when it is large enough (a new one is zeroed by the allocator, which
    // a cold sequential read paid for each MiB).
    let missed: usize = runs.iter().map(|(_, v)| v.len() * BLOCK_SIZE).sum();
    let mut buf = ReadBuf::take(missed);
    let mut run_start = Vec::with_capacity(runs.len());
    if !runs.is_empty() {
        let mut rest = &mut buf.bytes_mut()[..missed];
        let mut ops: Vec<IoOp<'_>> = Vec::with_capacity(runs.len());
        let mut at = 0;
        for (p, v) in &runs {
            let (this, more) = std::mem::take(&mut rest).split_at_mut(v.len() * BLOCK_SIZE);
            rest = more;
            run_start.push(at);
            at += this.len();
            ops.push(IoOp::Read {
                offset: p * BLOCK_SIZE as u64,
                buf: this,
            });
        }
        dev.submit(&mut ops)?;
    }
    // The hash of each block read just now that a check asked for, in
    // buffer order (none for an unchecked read).
    let checked_blocks = if expect.is_some() {
        missed / BLOCK_SIZE
    } else {
        0
    };
    let mut read_hashes: Vec<Option<Sha256Digest>> = vec![None; checked_blocks];
    for ((p, blocks), &from) in runs.iter().zip(&run_start) {
        let b = &buf.bytes()[from..from + blocks.len() * BLOCK_SIZE];
        for (j, (csum, want)) in blocks.iter().enumerate() {
            let bytes = &b[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE];
            let hash = want.map(|_| block_hash(bytes));
            if (hash.is_none() || hash != *want) && data_checksum(bytes) != *csum {
                return Err(Error::corrupt(
                    (p + j as u64) * BLOCK_SIZE as u64,
                    "data block checksum mismatch",
                ));
            }
            if let Some(slot) = read_hashes.get_mut(from / BLOCK_SIZE + j) {
                *slot = hash;
            }
        }
        if keep {
            cache.insert_many(blocks.iter().enumerate().map(|(j, _)| {
                let bytes = b[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE].to_vec();
                let block = match read_hashes.get(from / BLOCK_SIZE + j).copied().flatten() {
                    Some(h) => Block::hashed(bytes, h),
                    None => Block::new(bytes),
                };
                (p + j as u64, Arc::new(block))
            }));
        }
    }
    // Where a block read just now lies in the buffer (in blocks).
    let fetched_at = |physical_block: u64| -> usize {
        let r = runs.partition_point(|(start, v)| start + v.len() as u64 <= physical_block);
        run_start[r] / BLOCK_SIZE + (physical_block - runs[r].0) as usize
    };
    let fetched = |physical_block: u64| -> &[u8] {
        let at = fetched_at(physical_block) * BLOCK_SIZE;
        &buf.bytes()[at..at + BLOCK_SIZE]
    };
    // Every block with an expected hash is the one it names.
    if expect.is_some() {
        for (i, (src, hit)) in plan.blocks.iter().zip(&hits).enumerate() {
            let Some(want) = expected(i) else {
                continue;
            };
            let got = match (src, hit) {
                (BlockSource::Hole, _) => zero_block_hash(),
                (BlockSource::Buffered(d), _) => block_hash(d),
                (_, Some(d)) => *d.hash(),
                (BlockSource::Device { physical_block, .. }, None) => {
                    match read_hashes[fetched_at(*physical_block)] {
                        Some(h) => h,
                        None => block_hash(fetched(*physical_block)),
                    }
                }
            };
            if got != want {
                buf.give_back();
                return Ok(Err(i));
            }
        }
    }
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
    buf.give_back();
    Ok(Ok(out))
}

/// The largest read buffer a thread keeps for its next read: one FUSE
/// read (1 MiB) of blocks that all miss the cache.
const KEPT_READ_BUF: usize = 1 << 20;

thread_local! {
    static KEPT: std::cell::RefCell<Option<AlignedBuf>> = const { std::cell::RefCell::new(None) };
}

/// A buffer for a plan's device reads: none when every block is cached,
/// else the thread's kept one when it is large enough, else a new one.
struct ReadBuf(Option<AlignedBuf>);

impl ReadBuf {
    fn take(len: usize) -> ReadBuf {
        if len == 0 {
            return ReadBuf(None);
        }
        let kept = KEPT.with(|k| k.borrow_mut().take());
        ReadBuf(Some(match kept {
            Some(b) if b.len() >= len => b,
            Some(b) => {
                KEPT.with(|k| *k.borrow_mut() = Some(b));
                AlignedBuf::new(len)
            }
            // Pages a read never touches are never faulted in.
            None => AlignedBuf::new(len.max(KEPT_READ_BUF)),
        }))
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }

    /// Keeps the buffer for the thread's next read (when small enough).
    /// A buffer dropped on an error path is simply freed.
    fn give_back(self) {
        let Some(b) = self.0.filter(|b| b.len() <= KEPT_READ_BUF) else {
            return;
        };
        KEPT.with(|k| {
            let mut k = k.borrow_mut();
            if k.as_ref().is_none_or(|old| old.len() < b.len()) {
                *k = Some(b);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;

    fn block(fill: u8) -> Vec<u8> {
        (0..BLOCK_SIZE).map(|i| fill ^ (i % 251) as u8).collect()
    }

    fn on_device(dev: &MemDevice, physical_block: u64, bytes: &[u8]) -> BlockSource {
        dev.write_at(
            physical_block * BLOCK_SIZE as u64,
            &AlignedBuf::from_slice(bytes),
        )
        .unwrap();
        BlockSource::Device {
            physical_block,
            checksum: data_checksum(bytes),
        }
    }

    /// A thread's kept read buffer holds the bytes of its last read; the
    /// next read (smaller, in several runs, with holes, cached and buffered
    /// blocks between) gets only its own bytes.
    #[test]
    fn reused_read_buffers_give_each_read_its_own_bytes() {
        let dev = MemDevice::new(4 << 20);
        let cache = BlockCache::new(1 << 20);
        let big: Vec<BlockSource> = (0..256u64)
            .map(|b| on_device(&dev, 512 + b, &block(b as u8)))
            .collect();
        let plan = ReadPlan {
            skip: 0,
            len: 256 * BLOCK_SIZE,
            blocks: big,
        };
        let bytes = execute_plan_keeping(&dev, &cache, plan, false).unwrap();
        assert_eq!(&bytes[255 * BLOCK_SIZE..], &block(255)[..]);

        let cached = on_device(&dev, 40, &block(7));
        execute_plan(
            &dev,
            &cache,
            ReadPlan {
                skip: 0,
                len: BLOCK_SIZE,
                blocks: vec![cached.clone()],
            },
        )
        .unwrap();
        let blocks = vec![
            on_device(&dev, 10, &block(1)),
            on_device(&dev, 11, &block(2)),
            BlockSource::Hole,
            on_device(&dev, 20, &block(3)),
            BlockSource::Buffered(block(4)),
            cached,
            on_device(&dev, 30, &block(5)),
        ];
        let want: Vec<u8> = [
            block(1),
            block(2),
            vec![0; BLOCK_SIZE],
            block(3),
            block(4),
            block(7),
            block(5),
        ]
        .concat();
        for skip in [0, 100] {
            let len = want.len() - skip - 3;
            let plan = ReadPlan {
                skip,
                len,
                blocks: blocks.clone(),
            };
            let got = execute_plan_keeping(&dev, &cache, plan, false).unwrap();
            assert!(got == want[skip..skip + len], "read at {skip} differs");
        }
    }

    fn plan(blocks: Vec<BlockSource>) -> ReadPlan {
        ReadPlan {
            skip: 0,
            len: blocks.len() * BLOCK_SIZE,
            blocks,
        }
    }

    /// A verified read gets the bytes its hashes name, from the device and
    /// then from the cache (which keeps each block's hash); bytes that
    /// pass their checksum but not their hash are a mismatch at that
    /// block, cached or not; bytes that pass neither are a corrupt block.
    #[test]
    fn checked_reads_compare_each_block_with_its_hash() {
        let dev = MemDevice::new(1 << 20);
        let cache = BlockCache::new(1 << 20);
        let blocks: Vec<BlockSource> = (0..4u64)
            .map(|b| on_device(&dev, 8 + b, &block(b as u8)))
            .collect();
        let hashes: Vec<Option<Sha256Digest>> =
            (0..4u8).map(|b| Some(block_hash(&block(b)))).collect();
        let want: Vec<u8> = (0..4u8).flat_map(block).collect();
        for _ in 0..2 {
            let got = execute_plan_checked(&dev, &cache, plan(blocks.clone()), true, Some(&hashes));
            assert!(got.unwrap().unwrap() == want);
        }
        for b in 8..12 {
            let hit = cache.get_many([b]).pop().flatten().unwrap();
            assert!(
                hit.hash.get().is_some(),
                "block {b} cached without its hash"
            );
        }
        // The seal names other bytes for block 2: a mismatch there,
        // through the cache and from the device.
        let mut other = hashes.clone();
        other[2] = Some(block_hash(&block(9)));
        let got = execute_plan_checked(&dev, &cache, plan(blocks.clone()), true, Some(&other));
        assert_eq!(got.unwrap(), Err(2));
        cache.clear();
        let got = execute_plan_checked(&dev, &cache, plan(blocks.clone()), false, Some(&other));
        assert_eq!(got.unwrap(), Err(2));
        // A block rewritten with its checksum fixed (a tampered device):
        // a mismatch; an unchecked read serves it.
        let tampered = on_device(&dev, 10, &block(9));
        let mut again = blocks.clone();
        again[2] = tampered;
        let got = execute_plan_checked(&dev, &cache, plan(again.clone()), true, Some(&hashes));
        assert_eq!(got.unwrap(), Err(2));
        let got = execute_plan_keeping(&dev, &cache, plan(again.clone()), false).unwrap();
        assert!(got[2 * BLOCK_SIZE..3 * BLOCK_SIZE] == block(9)[..]);
        // Damaged bytes (checksum and hash both wrong): a corrupt block.
        cache.clear();
        dev.write_at(10 * BLOCK_SIZE as u64, &AlignedBuf::from_slice(&block(3)))
            .unwrap();
        let got = execute_plan_checked(&dev, &cache, plan(again), true, Some(&hashes));
        assert!(matches!(got, Err(Error::Corrupt { .. })), "{:?}", got.err());
        // Holes, buffered blocks and blocks left to the caller.
        let mixed = vec![
            BlockSource::Hole,
            BlockSource::Buffered(block(5)),
            blocks[0].clone(),
        ];
        let expect = [
            Some(block_hash(&[0; BLOCK_SIZE])),
            Some(block_hash(&block(5))),
            None,
        ];
        let got = execute_plan_checked(&dev, &cache, plan(mixed.clone()), true, Some(&expect));
        assert_eq!(got.unwrap().unwrap().len(), 3 * BLOCK_SIZE);
        let wrong = [None, Some(block_hash(&block(6))), None];
        let got = execute_plan_checked(&dev, &cache, plan(mixed), true, Some(&wrong));
        assert_eq!(got.unwrap(), Err(1));
    }
}
