//! An in-memory [`Device`], sparse in 4 KiB pages, for tests and tools.
//!
//! Also holds the small helpers every backend shares (atomic stats counters and
//! the batch contract check), because `device/mod.rs` is kept to the trait itself.

use super::{check_io, Device, DeviceStats, IoOp, BLOCK_SIZE};
use crate::error::Result;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Page index (offset / 4096) -> page contents. A missing page reads as zeroes.
type Pages = HashMap<u64, Box<[u8; BLOCK_SIZE]>>;

/// A device kept in RAM. Only pages that were written take memory, so a test can
/// create an 8 GiB device cheaply. Writes are durable at once (there is no cache).
pub struct MemDevice {
    size_bytes: u64,
    pages: Mutex<Pages>,
    stats: StatsCounters,
}

impl MemDevice {
    /// A zero-filled device of `size_bytes`, rounded down to a multiple of 4096.
    pub fn new(size_bytes: u64) -> MemDevice {
        MemDevice {
            size_bytes: size_bytes - size_bytes % BLOCK_SIZE as u64,
            pages: Mutex::new(HashMap::new()),
            stats: StatsCounters::default(),
        }
    }

    /// A device holding `bytes` (its length rounded down to a multiple of 4096).
    /// All-zero pages are not stored.
    pub fn from_bytes(bytes: Vec<u8>) -> MemDevice {
        let dev = MemDevice::new(bytes.len() as u64);
        {
            let mut pages = dev.lock();
            for (index, chunk) in bytes.chunks_exact(BLOCK_SIZE).enumerate() {
                if chunk.iter().any(|&b| b != 0) {
                    let mut page = Box::new([0u8; BLOCK_SIZE]);
                    page.copy_from_slice(chunk);
                    pages.insert(index as u64, page);
                }
            }
        }
        dev
    }

    /// The whole device as one byte vector (allocates `size_bytes`; meant for small
    /// test devices).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.size_bytes as usize];
        for (&index, page) in self.lock().iter() {
            let start = index as usize * BLOCK_SIZE;
            out[start..start + BLOCK_SIZE].copy_from_slice(&page[..]);
        }
        out
    }

    /// A deep copy of the contents (stats start at zero).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn duplicate(&self) -> MemDevice {
        MemDevice {
            size_bytes: self.size_bytes,
            pages: Mutex::new(self.lock().clone()),
            stats: StatsCounters::default(),
        }
    }

    /// Copies stored bytes at any byte offset, without contract checks or stats.
    /// The caller keeps `offset + buf.len()` within the device.
    pub(crate) fn read_raw(&self, offset: u64, buf: &mut [u8]) {
        let pages = self.lock();
        for_each_page(offset, buf.len(), |index, in_page, at, len| {
            let dst = &mut buf[at..at + len];
            match pages.get(&index) {
                Some(page) => dst.copy_from_slice(&page[in_page..in_page + len]),
                None => dst.fill(0),
            }
        });
    }

    /// Stores bytes at any byte offset, without contract checks or stats.
    /// The caller keeps `offset + data.len()` within the device.
    pub(crate) fn write_raw(&self, offset: u64, data: &[u8]) {
        let mut pages = self.lock();
        for_each_page(offset, data.len(), |index, in_page, at, len| {
            let src = &data[at..at + len];
            match pages.get_mut(&index) {
                Some(page) => page[in_page..in_page + len].copy_from_slice(src),
                // Keep the device sparse: writing zeroes to an absent page is a no-op.
                None if src.iter().all(|&b| b == 0) => {}
                None => {
                    let mut page = Box::new([0u8; BLOCK_SIZE]);
                    page[in_page..in_page + len].copy_from_slice(src);
                    pages.insert(index, page);
                }
            }
        });
    }

    /// XORs one stored byte with `mask`.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn xor_byte(&self, offset: u64, mask: u8) {
        let mut byte = [0u8];
        self.read_raw(offset, &mut byte);
        byte[0] ^= mask;
        self.write_raw(offset, &byte);
    }

    fn lock(&self) -> MutexGuard<'_, Pages> {
        // A panic elsewhere while holding the lock cannot leave a page half-copied in
        // a way that matters to a test device; keep going rather than propagate it.
        self.pages
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Calls `f(page_index, offset_in_page, offset_in_buffer, length)` for each page
/// touched by `[offset, offset + len)`.
fn for_each_page(offset: u64, len: usize, mut f: impl FnMut(u64, usize, usize, usize)) {
    let mut at = 0usize;
    while at < len {
        let absolute = offset + at as u64;
        let index = absolute / BLOCK_SIZE as u64;
        let in_page = (absolute % BLOCK_SIZE as u64) as usize;
        let n = (BLOCK_SIZE - in_page).min(len - at);
        f(index, in_page, at, n);
        at += n;
    }
}

impl Device for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn logical_block_size(&self) -> u32 {
        BLOCK_SIZE as u32
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_io(offset, buf.len(), buf.as_ptr(), self.size_bytes)?;
        self.read_raw(offset, buf);
        self.stats.read(buf.len());
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        check_io(offset, buf.len(), buf.as_ptr(), self.size_bytes)?;
        self.write_raw(offset, buf);
        self.stats.write(buf.len());
        Ok(())
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<()> {
        check_batch(ops, self.size_bytes)?;
        run_one_by_one(self, ops)?;
        self.stats.batch(ops.len());
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.stats.flush();
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "memory"
    }

    fn stats(&self) -> DeviceStats {
        self.stats.snapshot()
    }
}

impl std::fmt::Debug for MemDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MemDevice({} bytes, {} pages stored)",
            self.size_bytes,
            self.lock().len()
        )
    }
}

/// Checks every op of a batch before any runs, so a contract violation does nothing.
pub(super) fn check_batch(ops: &[IoOp<'_>], size_bytes: u64) -> Result<()> {
    for op in ops {
        match op {
            IoOp::Read { offset, buf } => check_io(*offset, buf.len(), buf.as_ptr(), size_bytes)?,
            IoOp::Write { offset, buf } => check_io(*offset, buf.len(), buf.as_ptr(), size_bytes)?,
        }
    }
    Ok(())
}

/// Runs a batch through `read_at`/`write_at`, stopping at the first error.
pub(super) fn run_one_by_one(dev: &dyn Device, ops: &mut [IoOp<'_>]) -> Result<()> {
    for op in ops.iter_mut() {
        match op {
            IoOp::Read { offset, buf } => dev.read_at(*offset, buf)?,
            IoOp::Write { offset, buf } => dev.write_at(*offset, buf)?,
        }
    }
    Ok(())
}

/// Lock-free [`DeviceStats`] counters shared by every backend.
#[derive(Default)]
pub(super) struct StatsCounters {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    write_bytes: AtomicU64,
    flushes: AtomicU64,
    batches: AtomicU64,
    batched_ops: AtomicU64,
}

impl StatsCounters {
    pub(super) fn read(&self, bytes: usize) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.read_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(super) fn write(&self, bytes: usize) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.write_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(super) fn flush(&self) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn batch(&self, ops: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batched_ops.fetch_add(ops as u64, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> DeviceStats {
        DeviceStats {
            reads: self.reads.load(Ordering::Relaxed),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            batched_ops: self.batched_ops.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::AlignedBuf;

    #[test]
    fn sparse_device_reads_zero_and_round_trips() {
        let dev = MemDevice::new(8 << 30);
        let mut buf = AlignedBuf::new(8192);
        dev.read_at(4 << 30, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        buf.fill(0xA5);
        dev.write_at(4 << 30, &buf).unwrap();
        let mut back = AlignedBuf::new(8192);
        dev.read_at(4 << 30, &mut back).unwrap();
        assert_eq!(&back[..], &buf[..]);
        assert_eq!(dev.lock().len(), 2);
    }

    #[test]
    fn raw_access_crosses_pages() {
        let dev = MemDevice::new(3 * BLOCK_SIZE as u64);
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 + 1).collect();
        dev.write_raw(1000, &data);
        let mut back = vec![0u8; 5000];
        dev.read_raw(1000, &mut back);
        assert_eq!(back, data);
        let copy = MemDevice::from_bytes(dev.snapshot());
        assert_eq!(copy.snapshot(), dev.snapshot());
        dev.xor_byte(1000, 0xFF);
        let mut one = [0u8];
        dev.read_raw(1000, &mut one);
        assert_eq!(one[0], data[0] ^ 0xFF);
    }
}
