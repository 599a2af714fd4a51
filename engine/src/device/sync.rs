//! The plain pread/pwrite backend, for hosts where io_uring is disabled
//! (sysctl `kernel.io_uring_disabled`, seccomp profiles).

use super::mem::{check_batch, run_one_by_one, StatsCounters};
use super::{check_io, Device, DeviceStats, IoOp, BLOCK_SIZE};
use crate::error::Result;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// A [`Device`] over a file or block device opened with O_DIRECT, one syscall per op.
pub struct SyncDevice {
    file: File,
    size_bytes: u64,
    logical_block_size: u32,
    stats: StatsCounters,
}

impl SyncDevice {
    /// Wraps `file`, which the caller opened read-write (with O_DIRECT for real
    /// devices). `size_bytes` is rounded down to a multiple of 4096.
    pub fn from_file(file: File, size_bytes: u64, logical_block_size: u32) -> SyncDevice {
        SyncDevice {
            file,
            size_bytes: size_bytes - size_bytes % BLOCK_SIZE as u64,
            logical_block_size,
            stats: StatsCounters::default(),
        }
    }
}

impl Device for SyncDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_io(offset, buf.len(), buf.as_ptr(), self.size_bytes)?;
        // read_exact_at retries EINTR and short reads; a read past the end of the
        // file is UnexpectedEof.
        self.file.read_exact_at(buf, offset)?;
        self.stats.read(buf.len());
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        check_io(offset, buf.len(), buf.as_ptr(), self.size_bytes)?;
        self.file.write_all_at(buf, offset)?;
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
        self.file.sync_data()?;
        self.stats.flush();
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "pread"
    }

    fn stats(&self) -> DeviceStats {
        self.stats.snapshot()
    }
}
