//! Write-behind for full segments: a filled segment buffer goes to a writer
//! thread and the engine starts filling the next one while the device writes,
//! so CPU work and device I/O overlap. Blocks of a segment in flight are read
//! from its buffer; a checkpoint waits for every write before its flush.

use crate::device::{AlignedBuf, Device, IoOp, BLOCK_SIZE};

/// Size of the device writes a segment is cut into.
const OP_BYTES: usize = 1 << 20;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

#[derive(Default)]
pub(crate) struct Completion {
    state: Mutex<Option<Result<(), String>>>,
    cv: Condvar,
}

impl Completion {
    pub fn finish(&self, r: Result<(), String>) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        self.cv.notify_all();
    }
    pub fn is_done(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
    pub fn wait(&self) -> Result<(), String> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A segment whose write has been handed off.
pub(crate) struct Inflight {
    pub start_block: u64,
    /// Blocks [0, valid_blocks) of `buf` hold the segment's content.
    pub valid_blocks: usize,
    pub buf: Arc<AlignedBuf>,
    pub done: Arc<Completion>,
}

struct Job {
    offset: u64,
    buf: Arc<AlignedBuf>,
    from: usize,
    to: usize,
    done: Arc<Completion>,
}

/// The writer thread.
pub(crate) struct SegmentWriter {
    tx: Option<SyncSender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl SegmentWriter {
    pub fn new(dev: Arc<dyn Device>, depth: usize) -> std::io::Result<SegmentWriter> {
        let (tx, rx) = sync_channel::<Job>(depth.max(1));
        let handle = std::thread::Builder::new()
            .name("lcfs-segment-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Everything queued goes out in one submission, in 1 MiB
                    // ops, so the device sees a real queue depth.
                    let mut jobs = vec![first];
                    while let Ok(j) = rx.try_recv() {
                        jobs.push(j);
                    }
                    let r = {
                        let mut ops = Vec::new();
                        for job in &jobs {
                            let bytes = &job.buf[job.from * BLOCK_SIZE..job.to * BLOCK_SIZE];
                            for (i, chunk) in bytes.chunks(OP_BYTES).enumerate() {
                                let offset = job.offset + (i * OP_BYTES) as u64;
                                ops.push(IoOp::Write { offset, buf: chunk });
                            }
                        }
                        dev.submit(&mut ops).map_err(|e| e.to_string())
                    };
                    for job in jobs {
                        drop(job.buf);
                        job.done.finish(r.clone());
                    }
                }
            })?;
        Ok(SegmentWriter {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    /// Queues blocks [from, to) of `buf`, which belongs at `start_block`.
    pub fn submit(
        &self,
        start_block: u64,
        buf: Arc<AlignedBuf>,
        from: usize,
        to: usize,
    ) -> Arc<Completion> {
        let done = Arc::new(Completion::default());
        let job = Job {
            offset: (start_block + from as u64) * BLOCK_SIZE as u64,
            buf,
            from,
            to,
            done: done.clone(),
        };
        match self.tx.as_ref().map(|tx| tx.send(job)) {
            Some(Ok(())) => {}
            _ => done.finish(Err("segment writer has stopped".into())),
        }
        done
    }
}

impl Drop for SegmentWriter {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
