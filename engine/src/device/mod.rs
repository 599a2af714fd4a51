//! The device layer: everything the engine reads or writes goes through [`Device`].
//!
//! # Contract
//! - **Alignment.** Every offset and length is a multiple of [`BLOCK_SIZE`] (4096),
//!   and every buffer starts at a 4096-byte aligned address (use [`AlignedBuf`]).
//!   This is what O_DIRECT needs on any device with a logical block size of 512 or
//!   4096. Violations return [`Error::DeviceContract`]; they are engine bugs.
//! - **Written.** When `write_at` (or a write in `submit`) returns `Ok`, later reads
//!   through this `Device` return the new bytes. The bytes may still be lost or
//!   torn by a crash.
//! - **Durable.** When `flush` returns `Ok`, every write that returned `Ok` before
//!   `flush` was called survives a crash. Nothing else is promised: a write that
//!   was not followed by a completed flush may be lost entirely, land partially
//!   (torn at 512-byte sector granularity, in any order), or land whole.
//! - **Atomicity.** Only a single 512-byte sector is assumed to be written
//!   atomically. Ordering between unflushed writes is not assumed.
//! - **Independence.** Ops in one `submit` call have no order among themselves;
//!   the engine never puts overlapping ops in one batch.

mod aligned;
#[cfg(any(test, feature = "testing"))]
mod faulty;
mod mem;
mod open;
mod sync;
mod timed;
mod uring;

pub use aligned::AlignedBuf;
#[cfg(any(test, feature = "testing"))]
pub use faulty::{FaultConfig, FaultyDevice};
pub use mem::MemDevice;
pub use open::{create_sparse_file, detect_signature, open_device, Backend, OpenOptions};
pub use sync::SyncDevice;
pub(crate) use timed::TimedDevice;
pub use uring::UringDevice;

use crate::error::Result;

/// The engine's I/O unit and alignment, in bytes.
pub const BLOCK_SIZE: usize = 4096;

/// One operation in a batch handed to [`Device::submit`].
pub enum IoOp<'a> {
    Read { offset: u64, buf: &'a mut [u8] },
    Write { offset: u64, buf: &'a [u8] },
}

/// Counters every device keeps, so coalescing and queue use are observable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    /// Number of `submit` batches and the ops they carried (ops / batches = mean batch size).
    pub batches: u64,
    pub batched_ops: u64,
}

/// A block device or file the engine owns. See the module docs for the contract.
pub trait Device: Send + Sync {
    /// Usable size in bytes (a multiple of [`BLOCK_SIZE`]).
    fn size_bytes(&self) -> u64;
    /// The underlying logical block size (512 or 4096), for information.
    fn logical_block_size(&self) -> u32;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()>;
    /// Runs independent ops together (one io_uring submission where possible).
    /// Returns the first error; ops after a failed one may or may not have run.
    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<()>;
    /// Makes every completed write durable (fdatasync / FLUSH).
    fn flush(&self) -> Result<()>;
    /// Short name of the backend: "io_uring", "pread", "memory" or "faulty".
    fn backend(&self) -> &'static str;
    /// Counters since open.
    fn stats(&self) -> DeviceStats;
}

/// Checks the alignment part of the contract; every backend calls it.
pub(crate) fn check_io(offset: u64, len: usize, ptr: *const u8, size: u64) -> Result<()> {
    use crate::error::Error;
    let bs = BLOCK_SIZE as u64;
    if offset % bs != 0 || len as u64 % bs != 0 || (ptr as usize) % BLOCK_SIZE != 0 {
        return Err(Error::DeviceContract(format!(
            "misaligned I/O: offset {offset:#x} len {len} buffer {ptr:p}"
        )));
    }
    if offset.checked_add(len as u64).is_none_or(|end| end > size) {
        return Err(Error::DeviceContract(format!(
            "I/O beyond device end: offset {offset:#x} len {len} size {size:#x}"
        )));
    }
    Ok(())
}
