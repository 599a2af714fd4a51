//! A seeded fault-injecting [`Device`] for tests: a disk with a volatile cache.
//!
//! Like redb's crash backend it keeps the *live* bytes (what reads see) apart from
//! the *durable* bytes (what a power cut keeps), plus the list of writes issued
//! since the last flush. [`FaultyDevice::crash_image`] rebuilds what a crash would
//! leave: each unflushed write dropped, applied whole, or torn at 512-byte sector
//! granularity. Every random choice comes from one seed, so a failing run replays.

use super::mem::{check_batch, StatsCounters};
use super::{check_io, Device, DeviceStats, IoOp, MemDevice, BLOCK_SIZE};
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::{Mutex, MutexGuard};

/// The unit a power cut may tear a write into (see the device contract).
const SECTOR_SIZE: usize = 512;

/// Which faults a [`FaultyDevice`] injects. `Default` injects none.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultConfig {
    /// Seeds every random choice (misdirection, bit flips, crash images).
    pub seed: u64,
    /// Ops are numbered from 1; every op numbered above `n` fails with EIO and does
    /// nothing, as if the power had been cut after op `n`.
    pub crash_after_ops: Option<u64>,
    /// Op number `n` (from 1) fails with EIO and does nothing; later ops work.
    pub fail_op: Option<u64>,
    /// Lets [`FaultyDevice::crash_image`] apply a random subset of an unflushed
    /// write's sectors, not only all or none.
    pub tear_writes: bool,
    /// Chance that a write lands at another (random, aligned) offset while reporting
    /// success.
    pub misdirect_probability: f64,
    /// Chance that a read returns its data with one bit flipped (storage stays intact).
    pub bitflip_on_read_probability: f64,
}

/// A write that returned `Ok` but has not been covered by a flush yet.
struct UnflushedWrite {
    offset: u64,
    data: Vec<u8>,
}

struct State {
    live: MemDevice,
    durable: MemDevice,
    unflushed: Vec<UnflushedWrite>,
    ops: u64,
    crash_after_ops: Option<u64>,
    fail_op: Option<u64>,
    crashed: bool,
    rng: ChaCha8Rng,
}

/// A [`Device`] that injects the faults its [`FaultConfig`] asks for.
pub struct FaultyDevice {
    size_bytes: u64,
    config: FaultConfig,
    state: Mutex<State>,
    stats: StatsCounters,
}

/// ChaCha stream used by ops; crash images use streams above it (see `crash_image`).
const OP_STREAM: u64 = 0;

impl FaultyDevice {
    /// A zero-filled device of `size_bytes` (rounded down to a multiple of 4096).
    pub fn new(size_bytes: u64, config: FaultConfig) -> FaultyDevice {
        FaultyDevice::from_image(MemDevice::new(size_bytes), config)
    }

    /// A device whose live and durable contents both start as `image` (for example
    /// the [`crash_image`](Self::crash_image) of an earlier run).
    pub fn from_image(image: MemDevice, mut config: FaultConfig) -> FaultyDevice {
        config.misdirect_probability = clamp_probability(config.misdirect_probability);
        config.bitflip_on_read_probability = clamp_probability(config.bitflip_on_read_probability);
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(OP_STREAM);
        FaultyDevice {
            size_bytes: image.size_bytes(),
            state: Mutex::new(State {
                live: image.duplicate(),
                durable: image,
                unflushed: Vec::new(),
                ops: 0,
                crash_after_ops: config.crash_after_ops,
                fail_op: config.fail_op,
                crashed: false,
                rng,
            }),
            config,
            stats: StatsCounters::default(),
        }
    }

    /// What a power cut now would leave on the medium: the durable bytes plus, for
    /// each unflushed write in issue order, nothing, all of it, or (with
    /// `tear_writes`) a random subset of its 512-byte sectors. The choice depends
    /// only on the seed and the number of ops so far, so it is repeatable.
    pub fn crash_image(&self) -> MemDevice {
        let state = self.lock();
        let image = state.durable.duplicate();
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        // A stream of its own, so asking for an image does not perturb later ops.
        rng.set_stream(OP_STREAM + 1 + state.ops);
        let choices = if self.config.tear_writes { 3 } else { 2 };
        for write in &state.unflushed {
            match rng.gen_range(0..choices) {
                0 => {} // dropped: still in the volatile cache when the power went
                1 => image.write_raw(write.offset, &write.data),
                _ => {
                    for (i, sector) in write.data.chunks(SECTOR_SIZE).enumerate() {
                        if rng.gen_bool(0.5) {
                            image.write_raw(write.offset + (i * SECTOR_SIZE) as u64, sector);
                        }
                    }
                }
            }
        }
        image
    }

    /// XORs the stored byte at `offset` with `xor_mask`, in both the live and the
    /// durable image (silent media corruption). Offsets past the end are ignored.
    pub fn corrupt(&self, offset: u64, xor_mask: u8) {
        if offset >= self.size_bytes {
            return;
        }
        let state = self.lock();
        state.live.xor_byte(offset, xor_mask);
        state.durable.xor_byte(offset, xor_mask);
    }

    /// Ops attempted so far (reads, writes, flushes; each op of a batch counts).
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Changes the crash point. It cannot revive a device that already crashed.
    pub fn set_crash_after_ops(&self, crash_after_ops: Option<u64>) {
        self.lock().crash_after_ops = crash_after_ops;
    }

    /// Changes which op (numbered from 1, as [`FaultyDevice::ops`] counts)
    /// fails with EIO; `None` fails none.
    pub fn set_fail_op(&self, fail_op: Option<u64>) {
        self.lock().fail_op = fail_op;
    }

    /// Whether the device has been powered off by `crash_after_ops`.
    pub fn is_crashed(&self) -> bool {
        self.lock().crashed
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts one op and decides whether it fails.
    fn begin_op(&self, state: &mut State, what: &str) -> Result<()> {
        state.ops += 1;
        let n = state.ops;
        if !state.crashed && state.crash_after_ops.is_some_and(|limit| n > limit) {
            log::debug!("faulty device: powered off at op {n} ({what})");
            state.crashed = true;
        }
        if state.crashed {
            return Err(eio());
        }
        if state.fail_op == Some(n) {
            log::debug!("faulty device: failing op {n} ({what})");
            return Err(eio());
        }
        Ok(())
    }

    fn read_locked(&self, state: &mut State, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.begin_op(state, "read")?;
        state.live.read_raw(offset, buf);
        let p = self.config.bitflip_on_read_probability;
        if p > 0.0 && !buf.is_empty() && state.rng.gen_bool(p) {
            let bit = state.rng.gen_range(0..buf.len() * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
        }
        self.stats.read(buf.len());
        Ok(())
    }

    fn write_locked(&self, state: &mut State, offset: u64, buf: &[u8]) -> Result<()> {
        self.begin_op(state, "write")?;
        let mut target = offset;
        let p = self.config.misdirect_probability;
        if p > 0.0 && state.rng.gen_bool(p) {
            target = misdirected_offset(&mut state.rng, offset, buf.len(), self.size_bytes);
        }
        state.live.write_raw(target, buf);
        state.unflushed.push(UnflushedWrite {
            offset: target,
            data: buf.to_vec(),
        });
        self.stats.write(buf.len());
        Ok(())
    }
}

/// A random block-aligned offset where `len` bytes fit, other than `offset` when
/// the device has room for another position.
fn misdirected_offset(rng: &mut ChaCha8Rng, offset: u64, len: usize, size_bytes: u64) -> u64 {
    let bs = BLOCK_SIZE as u64;
    let positions = (size_bytes - len as u64) / bs + 1;
    if positions < 2 {
        return offset;
    }
    let own = offset / bs;
    let mut pick = rng.gen_range(0..positions - 1);
    if pick >= own {
        pick += 1;
    }
    pick * bs
}

fn clamp_probability(p: f64) -> f64 {
    if p.is_nan() {
        0.0
    } else {
        p.clamp(0.0, 1.0)
    }
}

fn eio() -> Error {
    Error::Io(std::io::Error::from_raw_os_error(libc::EIO))
}

impl Device for FaultyDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn logical_block_size(&self) -> u32 {
        SECTOR_SIZE as u32
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_io(offset, buf.len(), buf.as_ptr(), self.size_bytes)?;
        self.read_locked(&mut self.lock(), offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        check_io(offset, buf.len(), buf.as_ptr(), self.size_bytes)?;
        self.write_locked(&mut self.lock(), offset, buf)
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<()> {
        check_batch(ops, self.size_bytes)?;
        // One lock for the whole batch keeps the op numbering of a batch contiguous,
        // so `fail_op` / `crash_after_ops` replay exactly.
        let mut state = self.lock();
        for op in ops.iter_mut() {
            match op {
                IoOp::Read { offset, buf } => self.read_locked(&mut state, *offset, buf)?,
                IoOp::Write { offset, buf } => self.write_locked(&mut state, *offset, buf)?,
            }
        }
        self.stats.batch(ops.len());
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let mut state = self.lock();
        self.begin_op(&mut state, "flush")?;
        let unflushed = std::mem::take(&mut state.unflushed);
        for write in &unflushed {
            state.durable.write_raw(write.offset, &write.data);
        }
        self.stats.flush();
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "faulty"
    }

    fn stats(&self) -> DeviceStats {
        self.stats.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::AlignedBuf;

    #[test]
    fn misdirected_offset_is_aligned_in_range_and_elsewhere() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..1000 {
            let off = misdirected_offset(&mut rng, 8192, 8192, 64 * 1024);
            assert_eq!(off % 4096, 0);
            assert!(off + 8192 <= 64 * 1024);
            assert_ne!(off, 8192);
        }
        // Only one position exists: the write stays put.
        assert_eq!(misdirected_offset(&mut rng, 0, 4096, 4096), 0);
    }

    #[test]
    fn crash_image_does_not_change_later_ops() {
        let cfg = FaultConfig {
            seed: 3,
            bitflip_on_read_probability: 0.5,
            ..Default::default()
        };
        let run = |take_image: bool| {
            let dev = FaultyDevice::new(1 << 20, cfg.clone());
            let buf = AlignedBuf::from_slice(&[1u8; 4096]);
            dev.write_at(0, &buf).unwrap();
            if take_image {
                let _ = dev.crash_image();
            }
            let mut out = Vec::new();
            for _ in 0..20 {
                let mut b = AlignedBuf::new(4096);
                dev.read_at(0, &mut b).unwrap();
                out.push(b.to_vec());
            }
            out
        };
        assert_eq!(run(false), run(true));
    }
}
