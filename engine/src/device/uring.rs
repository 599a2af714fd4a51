//! The io_uring backend: one I/O thread owns the ring; callers hand it batches.
//!
//! Callers (any number of threads) send a batch of ops over a bounded channel and
//! block until every op of it has completed. The I/O thread takes every batch
//! waiting in the channel before each `submit_and_wait`, so concurrent callers
//! share one submission and the device sees a real queue depth.
//!
//! The file is registered with the ring (ops name it as `Fixed(0)`) and so is a
//! pool of aligned buffers: data goes through `ReadFixed`/`WriteFixed` on a pool
//! buffer, copied in from or out to the caller's buffer, so the kernel does not pin
//! caller pages on every op. Ops larger than a pool buffer are split into
//! pool-sized chunks in the same submission. When the pool is exhausted a chunk
//! falls back to plain `Read`/`Write` on the caller's own (aligned) buffer rather
//! than wait.
//!
//! The ring is created on the I/O thread itself, single-issuer with deferred task
//! work where the kernel has it (6.1+), so completions are processed only when
//! that thread waits for them.
//!
//! Reads skip the I/O thread: a batch of reads runs on a small ring of the
//! calling thread's own (created on its first read, kept for the thread's life),
//! straight into the caller's aligned buffers. Handing a read to the I/O thread
//! and back costs two thread wake-ups, which on a VM with halted vCPUs take about
//! as long as a 4 KiB read from the disk; a read on the caller's ring costs none.
//! Anything unusual there (a short read, an error, no ring on this thread) sends
//! the batch the usual way, which retries and reports errors. Writes and flushes
//! always go through the I/O thread, whose one submission orders them.

use super::mem::{check_batch, StatsCounters};
use super::{check_io, AlignedBuf, Device, DeviceStats, IoOp};
use crate::error::{Error, Result};
use io_uring::{opcode, types, IoUring, Probe};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::Duration;

/// Submission queue size; also the most ops in flight at once.
const RING_ENTRIES: u32 = 128;
/// Entries of each thread's read ring; read batches with more ops go to the I/O
/// thread.
const LOCAL_RING_ENTRIES: u32 = 16;
/// Registered buffers, and the size of each (the largest chunk one SQE carries).
const POOL_BUFFERS: usize = 64;
const POOL_BUFFER_BYTES: usize = 256 * 1024;
/// Batches that may wait in the channel before callers block on sending.
const CHANNEL_BATCHES: usize = 256;
/// Batches taken from the channel per round, so one round stays bounded.
const MAX_BATCHES_PER_ROUND: usize = 1024;
/// How often one chunk is resubmitted after -EAGAIN / -EINTR before failing.
const MAX_RETRIES: u32 = 64;
/// The one registered file.
const FILE: types::Fixed = types::Fixed(0);

/// A [`Device`] whose data path runs entirely through io_uring.
pub struct UringDevice {
    size_bytes: u64,
    logical_block_size: u32,
    /// `None` only while dropping: closing the channel tells the thread to stop.
    sender: Option<SyncSender<Batch>>,
    thread: Option<JoinHandle<()>>,
    /// The device file (a second descriptor of it) for reads on callers' rings.
    read_file: File,
    stats: StatsCounters,
}

thread_local! {
    /// This thread's ring for reads (see the module comment).
    static LOCAL_RING: RefCell<LocalRing> = const { RefCell::new(LocalRing::Untried) };
}

enum LocalRing {
    Untried,
    /// Setting one up failed (the I/O thread's ring works, so this is rare:
    /// RLIMIT_MEMLOCK on old kernels, or a ring left with ops it could not reap).
    Unavailable,
    Ready(Box<IoUring>),
}

impl UringDevice {
    /// Sets up a ring over `file` (opened read-write with O_DIRECT), registers the
    /// file and the buffer pool, and starts the I/O thread. Fails, without
    /// panicking, where io_uring is unavailable (ENOSYS under seccomp, EPERM with
    /// `kernel.io_uring_disabled`, a kernel lacking an opcode), so the caller can
    /// fall back to [`SyncDevice`](super::SyncDevice). `size_bytes` is rounded down
    /// to a multiple of 4096.
    pub fn from_file(file: File, size_bytes: u64, logical_block_size: u32) -> Result<UringDevice> {
        let read_file = file.try_clone()?;
        let (sender, receiver) = sync_channel(CHANNEL_BATCHES);
        let (setup_sender, setup_result) = sync_channel::<Result<()>>(1);
        // The ring is created on the thread that uses it, which lets it be set up
        // single-issuer with deferred task work (completion work runs only when
        // that thread asks for completions, not as interrupts to it).
        let thread = std::thread::Builder::new()
            .name("lcfs-uring".into())
            .spawn(move || match Worker::new(file, receiver) {
                Ok(worker) => {
                    let _ = setup_sender.send(Ok(()));
                    worker.run();
                }
                Err(e) => {
                    let _ = setup_sender.send(Err(e));
                }
            })?;
        match setup_result.recv() {
            Ok(Ok(())) => Ok(UringDevice {
                size_bytes: size_bytes - size_bytes % super::BLOCK_SIZE as u64,
                logical_block_size,
                sender: Some(sender),
                thread: Some(thread),
                read_file,
                stats: StatsCounters::default(),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(thread_gone())
            }
        }
    }

    /// Hands `ops` to the I/O thread and waits until all of them completed.
    ///
    /// The ops carry raw pointers into buffers the caller borrows for the duration
    /// of this call. That is sound because this function does not return before
    /// the I/O thread has replied (or dropped the batch), and it does either only
    /// after the last SQE using those buffers has completed.
    fn run(&self, ops: Vec<RawOp>) -> Result<()> {
        if self.read_here(&ops) {
            return Ok(());
        }
        let sender = self.sender.as_ref().ok_or_else(thread_gone)?;
        let (reply, answer) = sync_channel(1);
        sender
            .send(Batch { ops, reply })
            .map_err(|_| thread_gone())?;
        answer.recv().map_err(|_| thread_gone())?
    }
}

impl UringDevice {
    /// Runs `ops` on this thread's own ring if they are all reads and fit it.
    /// True when every op read all its bytes; false when the caller must run
    /// the batch through the I/O thread (which then reads it again, retrying
    /// and reporting errors as for any batch).
    fn read_here(&self, ops: &[RawOp]) -> bool {
        if ops.is_empty()
            || ops.len() > LOCAL_RING_ENTRIES as usize
            || ops
                .iter()
                .any(|op| !matches!(op.kind, Kind::Read) || op.len > u32::MAX as usize)
        {
            return false;
        }
        LOCAL_RING.with(|cell| {
            let Ok(mut state) = cell.try_borrow_mut() else {
                return false;
            };
            if let LocalRing::Untried = *state {
                *state = match new_ring(LOCAL_RING_ENTRIES) {
                    Ok(ring) => LocalRing::Ready(Box::new(ring)),
                    Err(e) => {
                        log::debug!("io_uring: no read ring on this thread ({e}); reads go to the I/O thread");
                        LocalRing::Unavailable
                    }
                };
            }
            let LocalRing::Ready(ring) = &mut *state else {
                return false;
            };
            match read_on(ring, types::Fd(self.read_file.as_raw_fd()), ops) {
                Ok(all_read) => all_read,
                Err(e) => {
                    // Nothing of this batch is with the kernel any more; a ring
                    // whose enter fails is not used again.
                    log::warn!("io_uring: read ring of this thread failed ({e}); reads go to the I/O thread");
                    *state = LocalRing::Unavailable;
                    false
                }
            }
        })
    }
}

/// Reads `ops` through `ring`, an empty ring of at least `ops.len()` entries.
/// Ok(true) when every op read all its bytes, Ok(false) when some did not (the
/// caller reads the batch again another way). Returns only when no op of the
/// batch is with the kernel any more: Err only when entering the ring failed
/// while nothing was in flight (ops pushed but never submitted stay in the
/// ring, which the caller then drops unused).
fn read_on(ring: &mut IoUring, fd: types::Fd, ops: &[RawOp]) -> io::Result<bool> {
    let mut pushed = 0;
    for (i, op) in ops.iter().enumerate() {
        let sqe = opcode::Read::new(fd, op.ptr.0, op.len as u32)
            .offset(op.offset)
            .build()
            .user_data(i as u64);
        // SAFETY: the buffer belongs to the caller of `UringDevice::run`, which
        // does not touch it and does not return before this function does; this
        // function returns only after every SQE it submitted has completed.
        if unsafe { ring.submission().push(&sqe) }.is_err() {
            break;
        }
        pushed += 1;
    }
    let mut all_read = pushed == ops.len();
    let (mut submitted, mut completed, mut enter_errors) = (0usize, 0usize, 0u64);
    while completed < pushed {
        match ring.submit_and_wait(1) {
            Ok(n) => submitted += n,
            Err(e) if completed == submitted && e.raw_os_error() != Some(libc::EINTR) => {
                return Err(e);
            }
            Err(e) => {
                // Ops are in flight: their buffers may not be given back before
                // they complete, so wait on, as the I/O thread does.
                enter_errors += 1;
                on_enter_error(&e, enter_errors);
            }
        }
        for cqe in ring.completion() {
            completed += 1;
            let op = ops.get(cqe.user_data() as usize);
            if op.is_none_or(|op| usize::try_from(cqe.result()).ok() != Some(op.len)) {
                all_read = false;
            }
        }
    }
    Ok(all_read)
}

impl Drop for UringDevice {
    fn drop(&mut self) {
        // Closing the channel makes the thread finish what is in flight and exit.
        drop(self.sender.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("io_uring I/O thread panicked");
            }
        }
    }
}

impl Device for UringDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_io(offset, buf.len(), buf.as_ptr(), self.size_bytes)?;
        let op = RawOp {
            kind: Kind::Read,
            offset,
            ptr: CallerPtr(buf.as_mut_ptr()),
            len: buf.len(),
        };
        self.run(vec![op])?;
        self.stats.read(buf.len());
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        check_io(offset, buf.len(), buf.as_ptr(), self.size_bytes)?;
        // The I/O thread only ever reads through a write's pointer.
        let ptr = CallerPtr(buf.as_ptr().cast_mut());
        self.run(vec![RawOp {
            kind: Kind::Write,
            offset,
            ptr,
            len: buf.len(),
        }])?;
        self.stats.write(buf.len());
        Ok(())
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<()> {
        check_batch(ops, self.size_bytes)?;
        let raw = ops
            .iter_mut()
            .map(|op| match op {
                IoOp::Read { offset, buf } => RawOp {
                    kind: Kind::Read,
                    offset: *offset,
                    ptr: CallerPtr(buf.as_mut_ptr()),
                    len: buf.len(),
                },
                IoOp::Write { offset, buf } => RawOp {
                    kind: Kind::Write,
                    offset: *offset,
                    ptr: CallerPtr(buf.as_ptr().cast_mut()),
                    len: buf.len(),
                },
            })
            .collect();
        self.run(raw)?;
        for op in ops.iter() {
            match op {
                IoOp::Read { buf, .. } => self.stats.read(buf.len()),
                IoOp::Write { buf, .. } => self.stats.write(buf.len()),
            }
        }
        self.stats.batch(ops.len());
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        // Every write that returned Ok has already completed (its CQE was reaped
        // before its caller got the reply), so an FSYNC submitted now covers it.
        let op = RawOp {
            kind: Kind::Flush,
            offset: 0,
            ptr: CallerPtr(std::ptr::null_mut()),
            len: 0,
        };
        self.run(vec![op])?;
        self.stats.flush();
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "io_uring"
    }

    fn stats(&self) -> DeviceStats {
        self.stats.snapshot()
    }
}

fn thread_gone() -> Error {
    Error::Io(io::Error::other("io_uring I/O thread has stopped"))
}

/// A ring with the cheapest completion mode the kernel offers: single issuer with
/// deferred task work (Linux 6.1+), else cooperative task work (5.19+), else plain.
/// Errors other than EINVAL (an unknown flag) are final: ENOSYS under seccomp,
/// EPERM with kernel.io_uring_disabled.
fn new_ring(entries: u32) -> Result<IoUring> {
    let unknown_flag = |e: &io::Error| e.raw_os_error() == Some(libc::EINVAL);
    match IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
    {
        Ok(ring) => return Ok(ring),
        Err(e) if unknown_flag(&e) => {}
        Err(e) => return Err(e.into()),
    }
    match IoUring::builder().setup_coop_taskrun().build(entries) {
        Ok(ring) => return Ok(ring),
        Err(e) if unknown_flag(&e) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(IoUring::new(entries)?)
}

/// Allocates and registers the buffer pool, halving it while registration fails
/// (registered buffers count against RLIMIT_MEMLOCK for unprivileged users).
fn register_pool(ring: &IoUring) -> Vec<AlignedBuf> {
    let mut count = POOL_BUFFERS;
    while count > 0 {
        let mut pool: Vec<AlignedBuf> = (0..count)
            .map(|_| AlignedBuf::new(POOL_BUFFER_BYTES))
            .collect();
        let iovecs: Vec<libc::iovec> = pool
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: each iovec describes a live heap allocation owned by an AlignedBuf
        // in `pool`. The allocations never move (moving the Vec moves only the
        // handles), and the Worker drops the ring, which ends the registration,
        // before it drops the pool (field order, and it waits for in-flight ops).
        match unsafe { ring.submitter().register_buffers(&iovecs) } {
            Ok(()) => return pool,
            Err(e) => {
                log::debug!("io_uring: registering {count} buffers failed: {e}");
                count /= 2;
            }
        }
    }
    log::warn!("io_uring: cannot register I/O buffers; using plain READ/WRITE on caller buffers");
    Vec::new()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
}

/// The address of a caller's buffer.
#[derive(Clone, Copy)]
struct CallerPtr(*mut u8);

// SAFETY: the I/O thread dereferences the pointer (itself, or through the kernel)
// only while the owning caller is blocked in `UringDevice::run`, which returns only
// after every SQE naming the buffer has completed; the caller does not touch the
// buffer meanwhile, so there is no concurrent access.
unsafe impl Send for CallerPtr {}

struct RawOp {
    kind: Kind,
    offset: u64,
    ptr: CallerPtr,
    len: usize,
}

/// One caller's ops and the channel its answer goes back on.
struct Batch {
    ops: Vec<RawOp>,
    reply: SyncSender<Result<()>>,
}

/// A batch being worked on: how many chunks are still open and the first error.
struct BatchState {
    open_chunks: usize,
    error: Option<Error>,
    reply: SyncSender<Result<()>>,
}

/// Chunks of at least this many bytes skip the registered buffers.
const DIRECT_THRESHOLD_BYTES: usize = 64 << 10;

/// At most one pool buffer's worth of one op; what one SQE carries.
struct Chunk {
    batch: usize,
    kind: Kind,
    offset: u64,
    ptr: CallerPtr,
    len: usize,
    /// Bytes already transferred (short reads/writes resubmit the rest).
    done: usize,
    /// The pool buffer the data goes through, chosen at first submission.
    buffer: Option<u16>,
    started: bool,
    retries: u32,
}

/// Everything the I/O thread owns.
struct Worker {
    // Drop order is field order: the ring, and with it the buffer and file
    // registrations, goes before the pool memory and the file.
    ring: IoUring,
    pool: Vec<AlignedBuf>,
    free_buffers: Vec<u16>,
    _file: File,
    receiver: Receiver<Batch>,
    batches: Vec<Option<BatchState>>,
    free_batches: Vec<usize>,
    /// Chunks whose SQE the kernel may hold, indexed by user_data.
    in_flight: Vec<Option<Chunk>>,
    free_slots: Vec<usize>,
    in_flight_count: usize,
    /// Chunks waiting for a ring slot.
    queued: VecDeque<Chunk>,
    completions: Vec<(u64, i32)>,
    shutting_down: bool,
}

impl Worker {
    /// Sets up the ring, checks the opcodes we use, registers the file and the
    /// buffer pool. Runs on the I/O thread.
    fn new(file: File, receiver: Receiver<Batch>) -> Result<Worker> {
        let ring = new_ring(RING_ENTRIES)?;
        let submitter = ring.submitter();
        let mut probe = Probe::new();
        submitter.register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::ReadFixed::CODE, "READ_FIXED"),
            (opcode::WriteFixed::CODE, "WRITE_FIXED"),
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Fsync::CODE, "FSYNC"),
        ] {
            if !probe.is_supported(code) {
                return Err(Error::Io(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("kernel io_uring lacks IORING_OP_{name}"),
                )));
            }
        }
        submitter.register_files(&[file.as_raw_fd()])?;
        let pool = register_pool(&ring);
        log::debug!(
            "io_uring: {RING_ENTRIES} entries, {} registered buffers of {} KiB",
            pool.len(),
            POOL_BUFFER_BYTES / 1024
        );
        Ok(Worker {
            ring,
            free_buffers: (0..pool.len() as u16).rev().collect(),
            pool,
            _file: file,
            receiver,
            batches: Vec::new(),
            free_batches: Vec::new(),
            in_flight: (0..RING_ENTRIES).map(|_| None).collect(),
            free_slots: (0..RING_ENTRIES as usize).rev().collect(),
            in_flight_count: 0,
            queued: VecDeque::new(),
            completions: Vec::with_capacity(RING_ENTRIES as usize * 2),
            shutting_down: false,
        })
    }

    fn run(mut self) {
        let mut open = true;
        let mut enter_errors = 0u64;
        loop {
            if open && self.idle() {
                match self.receiver.recv() {
                    Ok(batch) => self.accept(batch),
                    Err(_) => open = false,
                }
            }
            // Take every batch already waiting, so they share this submission.
            for _ in 0..MAX_BATCHES_PER_ROUND {
                if !open {
                    break;
                }
                match self.receiver.try_recv() {
                    Ok(batch) => self.accept(batch),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            self.push_queued();
            if self.in_flight_count == 0 {
                if !open && self.queued.is_empty() {
                    break;
                }
                // Every queued chunk belonged to a failed batch; nothing to wait for.
                continue;
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                enter_errors += 1;
                on_enter_error(&e, enter_errors);
            }
            self.reap();
        }
    }

    fn idle(&self) -> bool {
        self.in_flight_count == 0 && self.queued.is_empty()
    }

    /// Splits a batch into chunks and queues them.
    fn accept(&mut self, batch: Batch) {
        let id = match self.free_batches.pop() {
            Some(id) => id,
            None => {
                self.batches.push(None);
                self.batches.len() - 1
            }
        };
        let mut chunks = 0;
        for op in &batch.ops {
            let chunk = |offset: u64, ptr: CallerPtr, len: usize| Chunk {
                batch: id,
                kind: op.kind,
                offset,
                ptr,
                len,
                done: 0,
                buffer: None,
                started: false,
                retries: 0,
            };
            if op.kind == Kind::Flush {
                self.queued.push_back(chunk(0, op.ptr, 0));
                chunks += 1;
                continue;
            }
            let mut at = 0;
            while at < op.len {
                let len = (op.len - at).min(POOL_BUFFER_BYTES);
                // wrapping_add stays inside the caller's buffer: at < op.len.
                let ptr = CallerPtr(op.ptr.0.wrapping_add(at));
                self.queued
                    .push_back(chunk(op.offset + at as u64, ptr, len));
                chunks += 1;
                at += len;
            }
        }
        if chunks == 0 {
            let _ = batch.reply.send(Ok(()));
            self.free_batches.push(id);
            return;
        }
        self.batches[id] = Some(BatchState {
            open_chunks: chunks,
            error: None,
            reply: batch.reply,
        });
    }

    /// Moves queued chunks into the submission queue while ring slots are free.
    fn push_queued(&mut self) {
        while self.in_flight_count < RING_ENTRIES as usize {
            let Some(mut chunk) = self.queued.pop_front() else {
                break;
            };
            if self.batch_failed(chunk.batch) {
                // Ops after a failed one may be skipped (see Device::submit).
                self.finish_chunk(chunk);
                continue;
            }
            let Some(slot) = self.free_slots.pop() else {
                self.queued.push_front(chunk);
                break;
            };
            if !chunk.started {
                chunk.started = true;
                // Small ops go through registered buffers (no page pinning per
                // op); large ones use the caller's aligned buffer directly, as
                // a copy would cost more than the pinning it saves.
                if chunk.kind != Kind::Flush && chunk.len < DIRECT_THRESHOLD_BYTES {
                    chunk.buffer = self.free_buffers.pop();
                    if let (Kind::Write, Some(index)) = (chunk.kind, chunk.buffer) {
                        let pool_buffer = &mut self.pool[index as usize];
                        // SAFETY: the caller's buffer is valid for chunk.len bytes and
                        // not written while its caller blocks (see CallerPtr); the pool
                        // buffer holds POOL_BUFFER_BYTES >= chunk.len and was free, so
                        // no SQE uses it. The two allocations are distinct.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                chunk.ptr.0,
                                pool_buffer.as_mut_ptr(),
                                chunk.len,
                            )
                        };
                    }
                }
            }
            let entry = self.build_entry(&chunk).user_data(slot as u64);
            // SAFETY: every buffer the entry names stays valid until its CQE is reaped:
            // a pool buffer is owned by the Worker and reserved by this chunk until
            // completion, and the Worker waits for all in-flight SQEs before dropping
            // the pool or the ring; a caller buffer outlives the SQE because its
            // caller blocks until the batch is answered, which happens only after
            // every chunk of the batch has completed.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_err() {
                self.free_slots.push(slot);
                self.queued.push_front(chunk);
                break;
            }
            self.in_flight[slot] = Some(chunk);
            self.in_flight_count += 1;
        }
    }

    fn build_entry(&mut self, chunk: &Chunk) -> io_uring::squeue::Entry {
        let offset = chunk.offset + chunk.done as u64;
        // Chunks are at most POOL_BUFFER_BYTES, so the length fits in u32.
        let len = (chunk.len - chunk.done) as u32;
        match (chunk.kind, chunk.buffer) {
            (Kind::Flush, _) => opcode::Fsync::new(FILE)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            (Kind::Read, Some(index)) => {
                let ptr = self.pool[index as usize]
                    .as_mut_ptr()
                    .wrapping_add(chunk.done);
                opcode::ReadFixed::new(FILE, ptr, len, index)
                    .offset(offset)
                    .build()
            }
            (Kind::Write, Some(index)) => {
                let ptr = self.pool[index as usize].as_ptr().wrapping_add(chunk.done);
                opcode::WriteFixed::new(FILE, ptr, len, index)
                    .offset(offset)
                    .build()
            }
            (Kind::Read, None) => {
                opcode::Read::new(FILE, chunk.ptr.0.wrapping_add(chunk.done), len)
                    .offset(offset)
                    .build()
            }
            (Kind::Write, None) => {
                opcode::Write::new(FILE, chunk.ptr.0.wrapping_add(chunk.done), len)
                    .offset(offset)
                    .build()
            }
        }
    }

    /// Handles every completion the kernel has posted.
    fn reap(&mut self) {
        let mut completions = std::mem::take(&mut self.completions);
        completions.clear();
        completions.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for &(user_data, result) in &completions {
            self.complete(user_data as usize, result);
        }
        self.completions = completions;
    }

    fn complete(&mut self, slot: usize, result: i32) {
        let Some(mut chunk) = self.in_flight.get_mut(slot).and_then(Option::take) else {
            log::error!("io_uring: completion for unknown slot {slot}");
            return;
        };
        self.free_slots.push(slot);
        self.in_flight_count -= 1;

        if result < 0 {
            let errno = -result;
            let transient = errno == libc::EAGAIN || errno == libc::EINTR;
            if transient && chunk.retries < MAX_RETRIES && !self.shutting_down {
                chunk.retries += 1;
                self.queued.push_front(chunk);
            } else {
                self.fail_chunk(chunk, io::Error::from_raw_os_error(errno));
            }
            return;
        }
        if chunk.kind == Kind::Flush {
            self.finish_chunk(chunk);
            return;
        }
        let transferred = result as usize;
        if transferred == 0 {
            let error = match chunk.kind {
                Kind::Read => io::Error::new(io::ErrorKind::UnexpectedEof, "read returned no data"),
                _ => io::Error::new(io::ErrorKind::WriteZero, "write stored no data"),
            };
            self.fail_chunk(chunk, error);
            return;
        }
        chunk.done = (chunk.done + transferred).min(chunk.len);
        if chunk.done < chunk.len {
            if self.shutting_down {
                self.fail_chunk(
                    chunk,
                    io::Error::other("device closing during a short transfer"),
                );
            } else {
                // A short transfer made progress; submit the rest.
                self.queued.push_front(chunk);
            }
            return;
        }
        if let (Kind::Read, Some(index)) = (chunk.kind, chunk.buffer) {
            // SAFETY: the read into the pool buffer has completed, so the kernel no
            // longer writes it; the caller's buffer is valid for chunk.len bytes and
            // untouched while its caller blocks (see CallerPtr).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.pool[index as usize].as_ptr(),
                    chunk.ptr.0,
                    chunk.len,
                )
            };
        }
        self.finish_chunk(chunk);
    }

    fn batch_failed(&self, batch: usize) -> bool {
        matches!(self.batches.get(batch), Some(Some(state)) if state.error.is_some())
    }

    fn fail_chunk(&mut self, chunk: Chunk, error: io::Error) {
        if let Some(Some(state)) = self.batches.get_mut(chunk.batch) {
            if state.error.is_none() {
                state.error = Some(Error::Io(error));
            }
        }
        self.finish_chunk(chunk);
    }

    /// Releases the chunk's buffer and answers its batch when it was the last one.
    fn finish_chunk(&mut self, chunk: Chunk) {
        if let Some(index) = chunk.buffer {
            self.free_buffers.push(index);
        }
        let Some(slot) = self.batches.get_mut(chunk.batch) else {
            return;
        };
        let Some(state) = slot.as_mut() else { return };
        state.open_chunks -= 1;
        if state.open_chunks > 0 {
            return;
        }
        if let Some(state) = slot.take() {
            let answer = match state.error {
                Some(error) => Err(error),
                None => Ok(()),
            };
            // The caller may only be gone if it panicked; nothing to do then.
            let _ = state.reply.send(answer);
            self.free_batches.push(chunk.batch);
        }
    }
}

impl Drop for Worker {
    /// Runs on normal exit and on unwinding: buffers named by SQEs the kernel holds
    /// (ours, or a blocked caller's) must not be freed before those SQEs complete.
    fn drop(&mut self) {
        self.shutting_down = true;
        while let Some(chunk) = self.queued.pop_front() {
            self.fail_chunk(chunk, io::Error::other("io_uring device is closing"));
        }
        let mut enter_errors = 0u64;
        while self.in_flight_count > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                enter_errors += 1;
                on_enter_error(&e, enter_errors);
            }
            self.reap();
        }
        // Release the ring's reference to the file now, on this thread. Left to the
        // ring's teardown it is dropped later by a kernel worker, and until then an
        // O_EXCL block device stays busy: closing and at once reopening would fail.
        if let Err(e) = self.ring.submitter().unregister_files() {
            log::debug!("io_uring: unregistering the file failed: {e}");
        }
        if !self.pool.is_empty() {
            if let Err(e) = self.ring.submitter().unregister_buffers() {
                log::debug!("io_uring: unregistering buffers failed: {e}");
            }
        }
    }
}

/// io_uring_enter failed. EINTR/EAGAIN/EBUSY are transient (the kernel is short of
/// resources or completions must be reaped first); anything else is logged and
/// retried after a pause, because giving up would free memory the kernel may
/// still be writing.
fn on_enter_error(error: &io::Error, count: u64) {
    let errno = error.raw_os_error().unwrap_or(0);
    if errno == libc::EINTR || errno == libc::EAGAIN || errno == libc::EBUSY {
        return;
    }
    if count == 1 || count % 1000 == 0 {
        log::error!("io_uring_enter failed ({count} times): {error}");
    }
    std::thread::sleep(Duration::from_millis(10));
}
