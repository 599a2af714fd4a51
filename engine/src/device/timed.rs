//! A [`Device`] that times every request of the engine's into its
//! [`Latencies`]: what the engine waited for, whatever the backend
//! (io_uring, pread, memory, faulty). [`crate::Engine::open`] puts one
//! around the device it is given.
//!
//! One observation per call: a `read_at` or `write_at`, from the call to
//! its return, and a `submit` batch from the call until its last op
//! completed (the batch's ops run together; timing each alone would need
//! each backend to time its completions). A batch is a read when all its
//! ops are reads, else a write; the engine never mixes them in one batch.
//! Failed requests are timed too.

use super::{Device, DeviceStats, IoOp};
use crate::error::Result;
use crate::histogram::{Latencies, Stopwatch};
use std::sync::Arc;

pub(crate) struct TimedDevice {
    inner: Arc<dyn Device>,
    latencies: Arc<Latencies>,
}

impl TimedDevice {
    pub(crate) fn new(inner: Arc<dyn Device>, latencies: Arc<Latencies>) -> TimedDevice {
        TimedDevice { inner, latencies }
    }
}

impl Device for TimedDevice {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn logical_block_size(&self) -> u32 {
        self.inner.logical_block_size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let clock = Stopwatch::start();
        let r = self.inner.read_at(offset, buf);
        clock.record(&self.latencies.device_read);
        r
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let clock = Stopwatch::start();
        let r = self.inner.write_at(offset, buf);
        clock.record(&self.latencies.device_write);
        r
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<()> {
        if ops.is_empty() {
            return self.inner.submit(ops);
        }
        let clock = Stopwatch::start();
        let r = self.inner.submit(ops);
        let reads = ops.iter().all(|op| matches!(op, IoOp::Read { .. }));
        clock.record(if reads {
            &self.latencies.device_read
        } else {
            &self.latencies.device_write
        });
        r
    }

    fn flush(&self) -> Result<()> {
        let clock = Stopwatch::start();
        let r = self.inner.flush();
        clock.record(&self.latencies.device_flush);
        r
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn stats(&self) -> DeviceStats {
        self.inner.stats()
    }
}
