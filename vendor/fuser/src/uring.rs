//! FUSE over io_uring (Linux 6.14 and later, with `fuse.enable_uring=1`).
//!
//! Once the filesystem asked for `FUSE_OVER_IO_URING` in `init` and the
//! kernel agreed, every possible CPU gets a queue: an io_uring instance
//! whose entries each hold one request at a time. An entry is registered
//! once with two buffers (a 288-byte header and a payload as large as the
//! largest request); the kernel completes the entry's command when it puts
//! a request in those buffers, and the reply goes back in the same buffers
//! with a COMMIT_AND_FETCH command, which also makes the entry wait for the
//! next request. One system call per request in place of a `read` and a
//! `writev` on /dev/fuse, and the request is answered by the thread of the
//! CPU that made it. The kernel sends a request to the queue of the CPU its
//! caller runs on, so it needs every possible CPU's queue registered before
//! it uses any; until then, and for FORGET, INTERRUPT and notifications
//! always, /dev/fuse carries the traffic as before.

use std::cell::UnsafeCell;
use std::io;
use std::io::IoSlice;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::error;
use log::warn;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::channel::ChannelSender;
use crate::reply::ReplySender;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// `fuse_uring_req_header`: the in/out header area, the per-opcode header
/// area, then `fuse_uring_ent_in_out`.
const IN_OUT_SIZE: usize = 128;
const OP_IN_SIZE: usize = 128;
const ENT_IN_OUT: usize = IN_OUT_SIZE + OP_IN_SIZE;
const HEADER_SIZE: usize = ENT_IN_OUT + 32;
/// `fuse_uring_ent_in_out`: flags, commit_id, payload_sz.
const COMMIT_ID_AT: usize = ENT_IN_OUT + 8;
const PAYLOAD_SZ_AT: usize = ENT_IN_OUT + 16;
const IN_HEADER_SIZE: usize = 40;
const OUT_HEADER_SIZE: usize = 16;
/// The kernel's smallest payload buffer (`FUSE_MIN_READ_BUFFER`).
const MIN_PAYLOAD: usize = 8192;
/// `enum fuse_uring_cmd`.
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// Requests one queue holds at once. Each entry's payload buffer is as
/// large as the largest request (1 MiB with a 1 MiB max_write), touched
/// only as far as requests fill it.
pub(crate) const QUEUE_DEPTH: usize = 8;
/// How long a queue's thread sleeps before it looks whether the session
/// ended; the kernel normally ends every entry itself at unmount.
const WAIT_SECONDS: u64 = 1;

/// Requests served and replies committed through the rings of this
/// process, for whoever wants to see that the transport is in use.
pub(crate) static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// The payload size the kernel requires of every entry's payload buffer.
pub(crate) fn payload_size(max_write: u32, max_pages: u16) -> usize {
    let page = page_size::get();
    MIN_PAYLOAD
        .max(max_write as usize)
        .max(max_pages as usize * page)
}

/// The number of queues the kernel expects: one per possible CPU
/// (`/sys/devices/system/cpu/possible`, such as `0-7` or `0,2-3`).
pub(crate) fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut highest = None;
    for part in text.trim().split(',') {
        let last = part.rsplit('-').next().unwrap_or(part);
        let n: usize = last
            .parse()
            .map_err(|_| io::Error::other(format!("possible CPUs: {text:?}")))?;
        highest = highest.max(Some(n));
    }
    highest
        .map(|n| n + 1)
        .ok_or_else(|| io::Error::other("no possible CPUs"))
}

struct Slot {
    header: UnsafeCell<Box<[u8]>>,
    payload: UnsafeCell<Box<[u8]>>,
    /// The two buffers, as REGISTER passes them.
    iov: [libc::iovec; 2],
}

/// One CPU's queue. The kernel writes a request into a slot's buffers
/// before it completes that slot's command, and reads the reply only after
/// the next COMMIT_AND_FETCH: in between the slot belongs to the one
/// request it holds, and to the one reply of that request.
pub(crate) struct Queue {
    // Dropped first: closing the ring ends every command before the
    // buffers go.
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    /// Serializes pushes to the submission queue (replies come from any
    /// thread).
    submit: Mutex<()>,
    /// The thread that runs the queue (`run`).
    owner: Mutex<std::thread::ThreadId>,
    fd: RawFd,
    qid: u16,
    slots: Vec<Slot>,
    /// Keeps /dev/fuse open while the ring refers to it, and opens
    /// passthrough backing files.
    dev: ChannelSender,
}

// SAFETY: a slot's buffers are touched by one party at a time (see
// `Queue`), and the submission queue only under `submit`.
unsafe impl Send for Queue {}
unsafe impl Sync for Queue {}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Queue({})", self.qid)
    }
}

impl Queue {
    pub(crate) fn new(dev: ChannelSender, qid: u16, payload: usize) -> io::Result<Queue> {
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build((QUEUE_DEPTH * 2) as u32)?;
        let slots = (0..QUEUE_DEPTH)
            .map(|_| {
                let mut header = vec![0u8; HEADER_SIZE].into_boxed_slice();
                let mut payload = vec![0u8; payload].into_boxed_slice();
                let iov = [
                    libc::iovec {
                        iov_base: header.as_mut_ptr().cast(),
                        iov_len: header.len(),
                    },
                    libc::iovec {
                        iov_base: payload.as_mut_ptr().cast(),
                        iov_len: payload.len(),
                    },
                ];
                Slot {
                    header: UnsafeCell::new(header),
                    payload: UnsafeCell::new(payload),
                    iov,
                }
            })
            .collect();
        Ok(Queue {
            ring,
            submit: Mutex::new(()),
            owner: Mutex::new(std::thread::current().id()),
            fd: dev.as_raw_fd(),
            qid,
            slots,
            dev,
        })
    }

    fn command(&self, op: u32, commit_id: u64) -> opcode::UringCmd80 {
        // `fuse_uring_cmd_req`: flags, commit_id, qid.
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        opcode::UringCmd80::new(types::Fd(self.fd), op).cmd(cmd)
    }

    fn register(&self, slot: usize) -> io::Result<()> {
        let entry = self
            .command(CMD_REGISTER, 0)
            .addr(Some(self.slots[slot].iov.as_ptr() as u64))
            .build()
            .user_data(slot as u64);
        // The kernel wants the iovec count in the SQE's `len`, which the
        // opcode builder does not set: an io_uring_sqe has it at byte 24.
        // SAFETY: Entry128 is a repr(C) 128-byte SQE.
        let mut raw: [u8; 128] = unsafe { std::mem::transmute(entry) };
        raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
        let entry: squeue::Entry128 = unsafe { std::mem::transmute(raw) };
        self.push(&entry)
    }

    fn push(&self, entry: &squeue::Entry128) -> io::Result<()> {
        let _guard = self.submit.lock();
        // SAFETY: every push holds `submit`; the ring thread only reads
        // the completion queue.
        unsafe {
            let mut sq = self.ring.submission_shared();
            if sq.push(entry).is_err() {
                return Err(io::Error::other("io_uring submission queue full"));
            }
        }
        if std::thread::current().id() == *self.owner.lock() {
            // The queue's own thread submits on its next wait, in the same
            // system call.
            return Ok(());
        }
        loop {
            match self.ring.submitter().submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
                Ok(_) => return Ok(()),
            }
        }
    }

    /// Sends a reply (a `fuse_out_header` and its data, as `bufs` gives
    /// them) through `slot` and makes the slot wait for the next request.
    fn commit(&self, slot: usize, commit_id: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        // SAFETY: the slot belongs to this reply (see `Queue`).
        let header = unsafe { &mut *self.slots[slot].header.get() };
        let payload = unsafe { &mut *self.slots[slot].payload.get() };
        let result = if total < OUT_HEADER_SIZE || total - OUT_HEADER_SIZE > payload.len() {
            // Never leave the caller waiting: answer EIO instead.
            let unique = u64::from_ne_bytes(header[8..16].try_into().unwrap());
            error!(
                "reply of {total} bytes does not fit the ring's {} (request {unique})",
                payload.len()
            );
            header[..4].copy_from_slice(&(OUT_HEADER_SIZE as u32).to_ne_bytes());
            header[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
            header[PAYLOAD_SZ_AT..PAYLOAD_SZ_AT + 4].copy_from_slice(&0u32.to_ne_bytes());
            Err(io::Error::other("reply too large for the ring"))
        } else {
            let mut at = 0;
            for buf in bufs {
                let mut buf: &[u8] = buf;
                if at < OUT_HEADER_SIZE {
                    let n = buf.len().min(OUT_HEADER_SIZE - at);
                    header[at..at + n].copy_from_slice(&buf[..n]);
                    at += n;
                    buf = &buf[n..];
                }
                let p = at - OUT_HEADER_SIZE;
                payload[p..p + buf.len()].copy_from_slice(buf);
                at += buf.len();
            }
            let size = (total - OUT_HEADER_SIZE) as u32;
            header[PAYLOAD_SZ_AT..PAYLOAD_SZ_AT + 4].copy_from_slice(&size.to_ne_bytes());
            Ok(())
        };
        let entry = self
            .command(CMD_COMMIT_AND_FETCH, commit_id)
            .build()
            .user_data(slot as u64);
        self.push(&entry)?;
        result
    }

    /// Hands the request in `slot` to the filesystem; `buf` is scratch
    /// space, 8-byte aligned, for the request laid out as /dev/fuse gives
    /// it.
    fn dispatch<FS: Filesystem>(
        self: &Arc<Self>,
        slot: usize,
        buf: &mut [u64],
        se: &SessionEventLoop<FS>,
    ) {
        // SAFETY: the kernel completed the slot's command: the request in
        // it is ours until the reply.
        let header = unsafe { &*self.slots[slot].header.get() };
        let payload = unsafe { &*self.slots[slot].payload.get() };
        let word = |at: usize| u32::from_ne_bytes(header[at..at + 4].try_into().unwrap()) as usize;
        let commit_id =
            u64::from_ne_bytes(header[COMMIT_ID_AT..COMMIT_ID_AT + 8].try_into().unwrap());
        let sender = ReplySender::Uring(UringReply {
            queue: self.clone(),
            slot,
            commit_id,
        });
        // The request's length covers its header, the per-opcode header
        // (in the op_in area) and the payload.
        let len = word(0);
        let payload_size = word(PAYLOAD_SZ_AT);
        let op_size = len
            .checked_sub(IN_HEADER_SIZE + payload_size)
            .filter(|&n| n <= OP_IN_SIZE && payload_size <= payload.len());
        let bytes: &mut [u8] = bytemuck_bytes(buf);
        let request = op_size.and_then(|op_size| {
            bytes[..IN_HEADER_SIZE].copy_from_slice(&header[..IN_HEADER_SIZE]);
            bytes[IN_HEADER_SIZE..IN_HEADER_SIZE + op_size]
                .copy_from_slice(&header[IN_OUT_SIZE..IN_OUT_SIZE + op_size]);
            let at = IN_HEADER_SIZE + op_size;
            bytes[at..at + payload_size].copy_from_slice(&payload[..payload_size]);
            RequestWithSender::new(sender.clone(), &bytes[..len])
        });
        REQUESTS.fetch_add(1, Ordering::Relaxed);
        match request {
            Some(request) => request.dispatch(se),
            None => {
                error!(
                    "ring {}: malformed request (length {len}, payload {payload_size})",
                    self.qid
                );
                let mut out = [0u8; OUT_HEADER_SIZE];
                out[..4].copy_from_slice(&(OUT_HEADER_SIZE as u32).to_ne_bytes());
                out[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
                out[8..16].copy_from_slice(&header[8..16]);
                let _ = sender.send(&[IoSlice::new(&out)]);
            }
        }
    }
}

fn bytemuck_bytes(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 has no invalid bit patterns and a stricter alignment.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 8) }
}

/// Where a request that came through a ring sends its reply.
#[derive(Debug, Clone)]
pub(crate) struct UringReply {
    queue: Arc<Queue>,
    slot: usize,
    commit_id: u64,
}

impl UringReply {
    pub(crate) fn send(&self, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        self.queue.commit(self.slot, self.commit_id, bufs)
    }

    pub(crate) fn dev(&self) -> &ChannelSender {
        &self.queue.dev
    }
}

/// Runs `queue` until the kernel ends its entries (unmount) or `stop` is
/// set: registers every slot, then serves requests as they complete.
pub(crate) fn run<FS: Filesystem>(
    queue: Arc<Queue>,
    se: SessionEventLoop<FS>,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    pin_to_cpu(queue.qid as usize);
    *queue.owner.lock() = std::thread::current().id();
    for slot in 0..queue.slots.len() {
        queue.register(slot)?;
    }
    let payload = queue
        .slots
        .first()
        .map(|s| s.iov[1].iov_len)
        .unwrap_or(MIN_PAYLOAD);
    let mut buf = vec![0u64; (IN_HEADER_SIZE + OP_IN_SIZE + payload).div_ceil(8)];
    let mut live = queue.slots.len();
    let timeout = types::Timespec::new().sec(WAIT_SECONDS);
    let args = types::SubmitArgs::new().timespec(&timeout);
    let mut done = Vec::with_capacity(QUEUE_DEPTH);
    while live > 0 && !stop.load(Ordering::Relaxed) {
        match queue.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
        done.clear();
        // SAFETY: only this thread reads the completion queue.
        done.extend(unsafe { queue.ring.completion_shared() }.map(|c| (c.user_data(), c.result())));
        for &(slot, result) in &done {
            let slot = slot as usize;
            if slot >= queue.slots.len() {
                continue;
            }
            match result {
                0 => queue.dispatch(slot, &mut buf, &se),
                r if r == -libc::ENOTCONN || r == -libc::ENODEV || r == -libc::ECANCELED => {
                    live -= 1;
                }
                r if r == -libc::EINTR || r == -libc::EAGAIN => {
                    // The command did not run: the slot holds no request.
                    if let Err(e) = queue.register(slot) {
                        warn!("ring {}: slot {slot} not registered again: {e}", queue.qid);
                        live -= 1;
                    }
                }
                r => {
                    error!(
                        "ring {}: slot {slot}: {}",
                        queue.qid,
                        io::Error::from_raw_os_error(-r)
                    );
                    live -= 1;
                }
            }
        }
    }
    Ok(())
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu < libc::CPU_SETSIZE as usize {
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}
