//! Worker threads for the requests that may wait for the device.
//!
//! One thread reads /dev/fuse and answers everything that only needs the
//! store (its mutex serializes those anyway): on 2 vCPUs several reader
//! threads made each round trip slower (untar took about twice as long with
//! four). Requests that may wait for the device (data reads, fsync) go to
//! these workers, so reads run in parallel and keep the device busy while
//! the FUSE thread goes on.

use std::io;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

/// Reads of at most this many bytes are done on the FUSE thread itself.
/// Small reads are random reads, one at a time, where handing the request
/// to a worker costs a thread wake-up, about as long as the device read
/// (on the 2-vCPU VMs measured, 4 KiB random reads went from 47 to 71
/// MiB/s); large ones are readahead, which the workers read in parallel.
pub(crate) const INLINE_READ_MAX: usize = 32 * 1024;
/// Jobs waiting for a worker; more run on the FUSE thread.
const QUEUED_JOBS: usize = 1024;

/// Work the FUSE thread hands to a worker: it may wait for the device.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct Workers {
    work: SyncSender<Job>,
}

impl Workers {
    /// Starts `threads` workers (at least one). They end when this is dropped.
    pub(crate) fn start(threads: usize) -> io::Result<Workers> {
        let (work, jobs) = sync_channel::<Job>(QUEUED_JOBS);
        let jobs = Arc::new(Mutex::new(jobs));
        for i in 0..threads.max(1) {
            let jobs = jobs.clone();
            std::thread::Builder::new()
                .name(format!("lcfs-io-{i}"))
                .spawn(move || loop {
                    let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })?;
        }
        Ok(Workers { work })
    }

    /// Hands `job` to a worker; runs it here when the queue is full (the
    /// queue is bounded, and the FUSE thread never waits for room).
    pub(crate) fn run(&self, job: Job) {
        if let Err(e) = self.work.try_send(job) {
            let (TrySendError::Full(job) | TrySendError::Disconnected(job)) = e;
            job();
        }
    }
}
