//! The fuser filesystem over the engine.
//!
//! Kernel inode numbers encode (layer, inode): `layer_id << 40 | inode`.
//! Layer ids start at 1, so the mount root (kernel inode 1) never collides
//! with a layer's root directory (`layer_id << 40 | 1`). Layer and inode
//! numbers are never reused, so no lookup counting is needed and the
//! generation is always 0.

use crate::MountOptions;
use fuser::{
    AccessFlags, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode,
    OpenFlags, PollEvents, PollFlags, PollNotifier, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyPoll, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};
use lcfs_engine::{Attr, Engine, Error, FileKind, SetAttr, TimeSet, Timestamp, ROOT_INODE};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The most the kernel reads ahead in one request.
const READ_AHEAD_REQUEST_BYTES: u32 = 1 << 20;
/// The readahead window, in requests of the size above: the kernel caps it
/// by the mount's backing device info, 128 KiB by default, which
/// `set_read_ahead` raises to this. Four requests in flight keep the I/O
/// workers reading in parallel (a cold 1 GiB read took about 40% less
/// time with a 1 MiB window than with 128 KiB, and about 10% less again
/// with 4 MiB).
const READ_AHEAD_WINDOW_BYTES: u32 = 4 << 20;

/// Kernel inode of the mount root, the directory of layers.
pub(crate) const MOUNT_ROOT: u64 = 1;
const LAYER_SHIFT: u32 = 40;
const INODE_MASK: u64 = (1 << LAYER_SHIFT) - 1;
/// readdir offsets of "." and ".." (engine cookies start at 0x101).
const DOT: u64 = 1;
const DOTDOT: u64 = 2;

struct LcfsFs {
    engine: Arc<Engine>,
    entry_ttl: Duration,
    attr_ttl: Duration,
    /// Names and attributes of frozen layers: they never change.
    frozen_ttl: Duration,
    started: SystemTime,
    /// Open handles and cached copies (see `PageState`).
    pages: Arc<Mutex<PageState>>,
    /// Kernel inodes whose page cache is to be dropped.
    drop_pages: SyncSender<u64>,
    /// Parent id and next inode number of frozen layers (they never change).
    frozen: Mutex<HashMap<u64, (Option<u64>, u64)>>,
    /// Data reads larger than `INLINE_READ_MAX` and fsyncs, done by the
    /// worker threads (see `spawn`).
    work: SyncSender<Job>,
    /// Ask for the kernel's writeback cache at init.
    writeback_cache: bool,
}

/// Work the FUSE thread hands to a worker: it may wait for the device.
type Job = Box<dyn FnOnce() + Send>;

/// Reads of at most this many bytes are done on the FUSE thread itself.
/// Small reads are random reads, one at a time, where handing the request
/// to a worker costs a thread wake-up, about as long as the device read
/// (on the 2-vCPU VMs measured, 4 KiB random reads went from 47 to 71
/// MiB/s); large ones are readahead, which the workers read in parallel.
const INLINE_READ_MAX: usize = 32 * 1024;

/// Which kernel inodes are open, and which may hold pages of a file whose
/// data is shared between layers (keyed by the file's origin: the layer
/// that created the inode, and the inode number).
#[derive(Default)]
struct PageState {
    open: HashMap<u64, u32>,
    cached: HashMap<(u64, u64), Vec<u64>>,
}

fn split(ino: INodeNo) -> Option<(u64, u64)> {
    let v = ino.0;
    let layer = v >> LAYER_SHIFT;
    let inode = v & INODE_MASK;
    (layer != 0 && inode != 0).then_some((layer, inode))
}

fn join(layer: u64, inode: u64) -> INodeNo {
    INodeNo(layer << LAYER_SHIFT | inode)
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

fn system_time(t: Timestamp) -> SystemTime {
    if t.seconds >= 0 {
        UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanoseconds)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.seconds.unsigned_abs())
            + Duration::from_nanos(t.nanoseconds as u64)
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            seconds: d.as_secs() as i64,
            nanoseconds: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut seconds = -(d.as_secs() as i64);
            let mut nanoseconds = 0;
            if d.subsec_nanos() > 0 {
                seconds -= 1;
                nanoseconds = 1_000_000_000 - d.subsec_nanos();
            }
            Timestamp {
                seconds,
                nanoseconds,
            }
        }
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

fn file_attr(layer: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: join(layer, a.inode),
        size: a.size,
        blocks: a.blocks_512,
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: system_time(a.ctime),
        kind: file_type(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

/// Whether process `pid` holds CAP_FSETID (bit 4 of CapEff). Unknown
/// counts as not holding it: clearing a set-id bit is the safe side.
fn has_fsetid(pid: u32) -> bool {
    const CAP_FSETID: u32 = 4;
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_FSETID) != 0)
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(s) => TimeSet::At(timestamp(s)),
    }
}

impl LcfsFs {
    fn root_attr(&self) -> FileAttr {
        let layers = self.engine.list_layers().len() as u32;
        FileAttr {
            ino: INodeNo(MOUNT_ROOT),
            size: 4096,
            blocks: 8,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2 + layers,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn entry(&self, layer: u64, r: lcfs_engine::Result<Attr>, reply: ReplyEntry) {
        match r {
            Ok(a) => reply.entry(
                &self.entry_ttl_of(layer),
                &file_attr(layer, &a),
                Generation(0),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// How long the kernel may keep a name in `layer`: long for a frozen
    /// layer (known frozen once `layer_shape` has seen it so), else the
    /// mount's entry timeout.
    fn entry_ttl_of(&self, layer: u64) -> Duration {
        if self.known_frozen(layer) {
            self.frozen_ttl
        } else {
            self.entry_ttl
        }
    }

    fn attr_ttl_of(&self, layer: u64) -> Duration {
        if self.known_frozen(layer) {
            self.frozen_ttl
        } else {
            self.attr_ttl
        }
    }

    fn known_frozen(&self, layer: u64) -> bool {
        self.frozen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&layer)
    }

    /// HANDLE_KILLPRIV_V2 leaves clearing set-user-id and set-group-id to
    /// us, as the kernel would: on chown of a non-directory always, on
    /// truncate and write only when the caller lacks CAP_FSETID (the kernel
    /// flags such a write; for truncate fuser does not pass the flag on, so
    /// `caller`'s capabilities are read from /proc, only for set-id files;
    /// `caller` None clears unconditionally). Set-group-id goes only with
    /// group execute (else it marks mandatory locking). Returns the mode to
    /// set, if any bit goes.
    fn kill_set_id(&self, layer: u64, inode: u64, caller: Option<u32>) -> Option<u32> {
        let a = self.engine.getattr(layer, inode).ok()?;
        if a.kind == FileKind::Directory {
            return None;
        }
        let mut kill = 0;
        if a.mode & libc::S_ISUID != 0 {
            kill |= libc::S_ISUID;
        }
        if a.mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
            kill |= libc::S_ISGID;
        }
        if kill == 0 || caller.is_some_and(has_fsetid) {
            return None;
        }
        Some(a.mode & !kill)
    }

    /// Parent and next inode number of a layer (cached once frozen).
    fn layer_shape(&self, layer: u64) -> Option<(Option<u64>, u64, bool)> {
        if let Some((p, n)) = self
            .frozen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&layer)
        {
            return Some((*p, *n, true));
        }
        let l = self.engine.layer_info_by_id(layer).ok()?;
        let parent = l
            .parent
            .as_deref()
            .and_then(|p| self.engine.layer_id(p).ok());
        if l.frozen {
            self.frozen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(layer, (parent, l.next_inode));
        }
        Some((parent, l.next_inode, l.frozen))
    }

    /// The origin (creating layer, inode) of a file whose data other layers
    /// may share: any file of a frozen layer, and inodes a clone inherited.
    /// None for a file only its own writable layer can see.
    fn shared_origin(&self, layer: u64, inode: u64) -> Option<(u64, u64)> {
        let (mut parent, _, frozen) = self.layer_shape(layer)?;
        let mut origin = layer;
        let mut inherited = false;
        for _ in 0..100_000 {
            let Some(p) = parent else { break };
            let (pp, p_next, _) = self.layer_shape(p)?;
            if inode >= p_next {
                break;
            }
            inherited = true;
            origin = p;
            parent = pp;
        }
        (frozen || inherited).then_some((origin, inode))
    }

    /// An open: counts it and, for a shared file, drops the pages other
    /// layers keep of it while they are closed, so that at most one closed
    /// copy lingers in the page cache.
    fn note_open(&self, layer: u64, inode: u64) {
        let ino = join(layer, inode).0;
        let origin = self.shared_origin(layer, inode);
        let mut st = self.pages.lock().unwrap_or_else(|p| p.into_inner());
        *st.open.entry(ino).or_insert(0) += 1;
        let Some(key) = origin else { return };
        let copies = std::mem::take(st.cached.entry(key).or_default());
        let mut kept = Vec::with_capacity(copies.len() + 1);
        for k in copies {
            if k != ino && !st.open.contains_key(&k) {
                let _ = self.drop_pages.try_send(k);
            } else {
                kept.push(k);
            }
        }
        if !kept.contains(&ino) {
            kept.push(ino);
        }
        st.cached.insert(key, kept);
    }

    /// A close: on the last one of a shared file, its pages go if another
    /// layer may hold a copy too; a single copy stays (re-reads stay fast).
    fn note_release(&self, layer: u64, inode: u64) {
        let ino = join(layer, inode).0;
        {
            let mut st = self.pages.lock().unwrap_or_else(|p| p.into_inner());
            match st.open.get_mut(&ino) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    return;
                }
                Some(_) => {
                    st.open.remove(&ino);
                }
                None => return,
            }
        }
        let Some(key) = self.shared_origin(layer, inode) else {
            return;
        };
        let mut st = self.pages.lock().unwrap_or_else(|p| p.into_inner());
        let copies = st.cached.entry(key).or_default();
        if copies.len() > 1 {
            copies.retain(|k| *k != ino);
            let _ = self.drop_pages.try_send(ino);
        }
        if copies.is_empty() {
            st.cached.remove(&key);
        }
    }

    /// Hands `job` to a worker; runs it here when the queue is full (the
    /// queue is bounded, and the FUSE thread never waits for room).
    fn run(&self, job: Job) {
        if let Err(e) = self.work.try_send(job) {
            let (std::sync::mpsc::TrySendError::Full(job)
            | std::sync::mpsc::TrySendError::Disconnected(job)) = e;
            job();
        }
    }

    /// Resolves a directory inode for a change. The mount root takes none.
    fn dir_for_change(&self, parent: INodeNo) -> Result<(u64, u64), Errno> {
        if parent.0 == MOUNT_ROOT {
            // Layers are made through the control socket, never by mkdir.
            return Err(Errno::from_i32(libc::EPERM));
        }
        split(parent).ok_or(Errno::from_i32(libc::ENOENT))
    }
}

impl Filesystem for LcfsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Each flag saves round trips; docs/fuse.md says what each costs.
        // HANDLE_KILLPRIV_V2: the daemon clears set-id bits on chown, on
        // truncate and write by callers without CAP_FSETID (see
        // `kill_set_id`), so the kernel no longer fetches attributes before
        // every chown nor asks for security.capability before every write.
        // NO_OPENDIR_SUPPORT: opendir answers ENOSYS once, and directories
        // are then opened without a round trip (and without releasedir).
        // WRITEBACK_CACHE: the kernel keeps written pages and sends them in
        // large writes (at the latest on close and fsync); whoever clones,
        // freezes or diffs a layer calls `Mount::write_back` first, since
        // those read the engine.
        if self.writeback_cache {
            let _ = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        let _ = config.add_capabilities(
            InitFlags::FUSE_DO_READDIRPLUS
                | InitFlags::FUSE_READDIRPLUS_AUTO
                | InitFlags::FUSE_PARALLEL_DIROPS
                | InitFlags::FUSE_ASYNC_READ
                | InitFlags::FUSE_BIG_WRITES
                | InitFlags::FUSE_MAX_PAGES
                | InitFlags::FUSE_HANDLE_KILLPRIV_V2
                | InitFlags::FUSE_NO_OPENDIR_SUPPORT,
        );
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(READ_AHEAD_REQUEST_BYTES);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let _ = config.set_time_granularity(Duration::from_nanos(1));
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == MOUNT_ROOT {
            let Some(n) = name.to_str() else {
                return reply.error(Errno::from_i32(libc::ENOENT));
            };
            match self.engine.layer_id(n) {
                Ok(id) => {
                    // Notes whether the layer is frozen (for its timeouts).
                    let _ = self.layer_shape(id);
                    self.entry(id, self.engine.getattr(id, ROOT_INODE), reply)
                }
                Err(e) => reply.error(errno(&e)),
            }
            return;
        }
        let Some((layer, dir)) = split(parent) else {
            return reply.error(Errno::from_i32(libc::ENOENT));
        };
        self.entry(
            layer,
            self.engine.lookup(layer, dir, name.as_bytes()),
            reply,
        );
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == MOUNT_ROOT {
            return reply.attr(&self.attr_ttl, &self.root_attr());
        }
        let Some((layer, inode)) = split(ino) else {
            return reply.error(Errno::from_i32(libc::ENOENT));
        };
        match self.engine.getattr(layer, inode) {
            Ok(a) => reply.attr(&self.attr_ttl_of(layer), &file_attr(layer, &a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino.0 == MOUNT_ROOT {
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        let Some((layer, inode)) = split(ino) else {
            return reply.error(Errno::from_i32(libc::ENOENT));
        };
        let mut mode = mode;
        let chown = uid.is_some() || gid.is_some();
        if mode.is_none() && (chown || size.is_some()) {
            // chown clears whoever asks; truncate unless CAP_FSETID.
            let caller = (!chown).then(|| req.pid());
            mode = self.kill_set_id(layer, inode, caller);
        }
        let s = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
            ctime: ctime.map(timestamp),
        };
        match self.engine.setattr(layer, inode, &s) {
            Ok(a) => reply.attr(&self.attr_ttl_of(layer), &file_attr(layer, &a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let Some((layer, inode)) = split(ino) else {
            return reply.error(Errno::from_i32(libc::EINVAL));
        };
        match self.engine.readlink(layer, inode) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (layer, dir) = match self.dir_for_change(parent) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        let mode = mode & !(umask & 0o777);
        let r = self.engine.mknod(
            layer,
            dir,
            name.as_bytes(),
            mode,
            rdev as u64,
            req.uid(),
            req.gid(),
        );
        self.entry(layer, r, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (layer, dir) = match self.dir_for_change(parent) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        let r = self.engine.mkdir(
            layer,
            dir,
            name.as_bytes(),
            mode & !(umask & 0o777),
            req.uid(),
            req.gid(),
        );
        self.entry(layer, r, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (layer, dir) = match self.dir_for_change(parent) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        match self.engine.unlink(layer, dir, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (layer, dir) = match self.dir_for_change(parent) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        match self.engine.rmdir(layer, dir, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (layer, dir) = match self.dir_for_change(parent) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        let r = self.engine.symlink(
            layer,
            dir,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
            req.uid(),
            req.gid(),
        );
        self.entry(layer, r, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (layer, from) = match self.dir_for_change(parent) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        let (to_layer, to) = match self.dir_for_change(newparent) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        if layer != to_layer {
            return reply.error(Errno::from_i32(libc::EXDEV));
        }
        match self.engine.rename(
            layer,
            from,
            name.as_bytes(),
            to,
            newname.as_bytes(),
            flags.bits(),
        ) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let Some((layer, inode)) = split(ino) else {
            return reply.error(Errno::from_i32(libc::EPERM));
        };
        let (to_layer, dir) = match self.dir_for_change(newparent) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        if layer != to_layer {
            return reply.error(Errno::from_i32(libc::EXDEV));
        }
        self.entry(
            layer,
            self.engine.link(layer, inode, dir, newname.as_bytes()),
            reply,
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some((layer, inode)) = split(ino) else {
            return reply.error(Errno::from_i32(libc::EISDIR));
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            match self.engine.layer_info_by_id(layer) {
                Ok(l) if l.frozen => return reply.error(Errno::from_i32(libc::EROFS)),
                Ok(_) => {}
                Err(e) => return reply.error(errno(&e)),
            }
        }
        match self.engine.open_inode(layer, inode) {
            // Frozen layers never change and every change to a writable layer
            // comes through this mount, so cached pages stay valid.
            Ok(()) => {
                self.note_open(layer, inode);
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some((layer, inode)) = split(ino) else {
            return reply.error(Errno::from_i32(libc::EISDIR));
        };
        let engine = self.engine.clone();
        let read = move || match engine.read(layer, inode, offset, size as usize) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        };
        if size as usize <= INLINE_READ_MAX {
            read();
        } else {
            self.run(Box::new(read));
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some((layer, inode)) = split(ino) else {
            return reply.error(Errno::from_i32(libc::EISDIR));
        };
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            // The kernel sets the flag for callers without CAP_FSETID.
            if let Some(mode) = self.kill_set_id(layer, inode, None) {
                let s = SetAttr {
                    mode: Some(mode),
                    ..SetAttr::default()
                };
                if let Err(e) = self.engine.setattr(layer, inode, &s) {
                    return reply.error(errno(&e));
                }
            }
        }
        // A write-back from the page cache: the kernel owns the file's times
        // while it caches writes and sends them itself (setattr), as they
        // were at write(2), so the data's late arrival must not move them.
        let written = if write_flags.contains(WriteFlags::FUSE_WRITE_CACHE) {
            self.engine.write_keeping_times(layer, inode, offset, data)
        } else {
            self.engine.write(layer, inode, offset, data)
        };
        match written {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) is not a durability point; fsync is. ENOSYS once, and the
        // kernel stops sending flush (a round trip on every close).
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some((layer, inode)) = split(ino) {
            if let Err(e) = self.engine.release_inode(layer, inode) {
                log::warn!("release of {layer}/{inode}: {e}");
            }
            // The kernel keys its page cache by inode, and each layer's copy
            // of a shared file is another inode: twenty containers reading
            // one image file would hold twenty copies. At most one closed
            // copy is kept; the engine's block cache serves the rest, one copy
            // for every layer. (mmap holds the file open, so mapped pages are
            // never dropped under a user.)
            self.note_release(layer, inode);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // The engine makes everything durable at once (a checkpoint).
        let _ = ino;
        let engine = self.engine.clone();
        self.run(Box::new(move || match engine.sync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }));
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // With FUSE_NO_OPENDIR_SUPPORT, ENOSYS makes the kernel open
        // directories itself from now on, with FOPEN_KEEP_CACHE and
        // FOPEN_CACHE_DIR (a listing is cached until the directory changes)
        // and no releasedir: two round trips less per directory read. The
        // kernel only opens directories as directories; the handle is
        // unused.
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 == MOUNT_ROOT {
            let layers = self.engine.list_layers();
            let mut entries = vec![
                (INodeNo(MOUNT_ROOT), FileType::Directory, ".".to_string()),
                (INodeNo(MOUNT_ROOT), FileType::Directory, "..".to_string()),
            ];
            entries.extend(
                layers
                    .into_iter()
                    .map(|l| (join(l.id, ROOT_INODE), FileType::Directory, l.name)),
            );
            for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                if reply.add(ino, i as u64 + 1, kind, name) {
                    break;
                }
            }
            return reply.ok();
        }
        let Some((layer, dir)) = split(ino) else {
            return reply.error(Errno::from_i32(libc::ENOENT));
        };
        if offset < DOT && reply.add(ino, DOT, FileType::Directory, ".") {
            return reply.ok();
        }
        if offset < DOTDOT {
            let parent = match self.engine.getattr(layer, dir) {
                Ok(_) if dir == ROOT_INODE => INodeNo(MOUNT_ROOT),
                Ok(_) => ino,
                Err(e) => return reply.error(errno(&e)),
            };
            if reply.add(parent, DOTDOT, FileType::Directory, "..") {
                return reply.ok();
            }
        }
        let mut cookie = if offset > DOTDOT { offset } else { 0 };
        loop {
            let batch = match self.engine.readdir(layer, dir, cookie, 128) {
                Ok(b) => b,
                Err(e) => return reply.error(errno(&e)),
            };
            if batch.is_empty() {
                return reply.ok();
            }
            for e in batch {
                if reply.add(
                    join(layer, e.inode),
                    e.cookie,
                    file_type(e.kind),
                    OsStr::from_bytes(&e.name),
                ) {
                    return reply.ok();
                }
                cookie = e.cookie;
            }
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        if ino.0 == MOUNT_ROOT {
            let root = self.root_attr();
            if offset < 1
                && reply.add(
                    INodeNo(MOUNT_ROOT),
                    1,
                    ".",
                    &self.attr_ttl,
                    &root,
                    Generation(0),
                )
            {
                return reply.ok();
            }
            if offset < 2
                && reply.add(
                    INodeNo(MOUNT_ROOT),
                    2,
                    "..",
                    &self.attr_ttl,
                    &root,
                    Generation(0),
                )
            {
                return reply.ok();
            }
            for (i, l) in self.engine.list_layers().into_iter().enumerate() {
                let off = i as u64 + 3;
                if off <= offset {
                    continue;
                }
                let Ok(a) = self.engine.getattr(l.id, ROOT_INODE) else {
                    continue;
                };
                if reply.add(
                    join(l.id, ROOT_INODE),
                    off,
                    &l.name,
                    &self.entry_ttl,
                    &file_attr(l.id, &a),
                    Generation(0),
                ) {
                    break;
                }
            }
            return reply.ok();
        }
        let Some((layer, dir)) = split(ino) else {
            return reply.error(Errno::from_i32(libc::ENOENT));
        };
        let me = match self.engine.getattr(layer, dir) {
            Ok(a) => file_attr(layer, &a),
            Err(e) => return reply.error(errno(&e)),
        };
        let ttl = self.entry_ttl_of(layer);
        if offset < DOT && reply.add(ino, DOT, ".", &ttl, &me, Generation(0)) {
            return reply.ok();
        }
        if offset < DOTDOT {
            let parent = if dir == ROOT_INODE {
                self.root_attr()
            } else {
                me
            };
            if reply.add(
                parent.ino,
                DOTDOT,
                "..",
                &self.attr_ttl,
                &parent,
                Generation(0),
            ) {
                return reply.ok();
            }
        }
        let mut cookie = if offset > DOTDOT { offset } else { 0 };
        loop {
            let batch = match self.engine.readdir_plus(layer, dir, cookie, 64) {
                Ok(b) => b,
                Err(e) => return reply.error(errno(&e)),
            };
            if batch.is_empty() {
                return reply.ok();
            }
            for (e, a) in batch {
                let fa = file_attr(layer, &a);
                if reply.add(
                    fa.ino,
                    e.cookie,
                    OsStr::from_bytes(&e.name),
                    &ttl,
                    &fa,
                    Generation(0),
                ) {
                    return reply.ok();
                }
                cookie = e.cookie;
            }
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let engine = self.engine.clone();
        self.run(Box::new(move || match engine.sync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }));
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let layer = split(ino)
            .map(|(l, _)| l)
            .or_else(|| self.engine.list_layers().first().map(|l| l.id));
        let r = match layer {
            Some(l) => self.engine.statfs(l),
            None => {
                let s = self.engine.stats();
                let total = s.capacity_bytes / 4096;
                let free = total.saturating_sub(s.live_bytes / 4096);
                return reply.statfs(total, free, free, 0, free, 4096, 255, 4096);
            }
        };
        match r {
            Ok(s) => reply.statfs(
                s.blocks,
                s.blocks_free,
                s.blocks_available,
                s.files,
                s.files_free,
                s.block_size,
                s.name_max,
                s.block_size,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        if position != 0 {
            return reply.error(Errno::from_i32(libc::EINVAL));
        }
        let Some((layer, inode)) = split(ino) else {
            return reply.error(Errno::from_i32(libc::EPERM));
        };
        match self
            .engine
            .setxattr(layer, inode, name.as_bytes(), value, flags as u32)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some((layer, inode)) = split(ino) else {
            return reply.error(Errno::from_i32(libc::ENODATA));
        };
        match self.engine.getxattr(layer, inode, name.as_bytes()) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let names = match split(ino) {
            Some((layer, inode)) => match self.engine.listxattr(layer, inode) {
                Ok(n) => n,
                Err(e) => return reply.error(errno(&e)),
            },
            None => Vec::new(),
        };
        let mut buf = Vec::new();
        for n in names {
            buf.extend_from_slice(&n);
            buf.push(0);
        }
        if size == 0 {
            reply.size(buf.len() as u32)
        } else if buf.len() > size as usize {
            reply.error(Errno::from_i32(libc::ERANGE))
        } else {
            reply.data(&buf)
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some((layer, inode)) = split(ino) else {
            return reply.error(Errno::from_i32(libc::ENODATA));
        };
        match self.engine.removexattr(layer, inode, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks modes itself.
        reply.ok();
    }

    #[allow(clippy::too_many_arguments)]
    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        // Regular files are always ready. ENOSYS makes the kernel stop
        // asking and answer "ready" for every file itself (what it does
        // for any file system without poll); fuser's default says the same
        // but logs a warning each time a container polls its console.
        reply.error(Errno::ENOSYS);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let (layer, dir) = match self.dir_for_change(parent) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        let r = self.engine.create(
            layer,
            dir,
            name.as_bytes(),
            mode & !(umask & 0o777),
            req.uid(),
            req.gid(),
        );
        match r.and_then(|a| self.engine.open_inode(layer, a.inode).map(|_| a)) {
            Ok(a) => {
                self.note_open(layer, a.inode);
                reply.created(
                    &self.entry_ttl_of(layer),
                    &file_attr(layer, &a),
                    Generation(0),
                    FileHandle(0),
                    FopenFlags::FOPEN_KEEP_CACHE,
                )
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctls: the answer a file without them gives.
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        // ENOSYS once makes the kernel do lseek itself (data everywhere).
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // ENOSYS once makes the kernel fall back to read and write.
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some((layer, inode)) = split(ino) else {
            return reply.error(Errno::from_i32(libc::EISDIR));
        };
        match self
            .engine
            .fallocate(layer, inode, mode as u32, offset, length)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

pub(crate) fn spawn(
    engine: Arc<Engine>,
    mountpoint: &Path,
    options: &MountOptions,
) -> io::Result<fuser::BackgroundSession> {
    // Page-cache drops are sent from their own thread: a notification written
    // from inside a request handler could wait on that very request.
    let (tx, rx) = sync_channel::<u64>(4096);
    let notifier: Arc<OnceLock<fuser::Notifier>> = Arc::new(OnceLock::new());
    let for_thread = notifier.clone();
    let pages: Arc<Mutex<PageState>> = Arc::default();
    let pages_for_thread = pages.clone();
    std::thread::Builder::new()
        .name("lcfs-drop-pages".into())
        .spawn(move || {
            for ino in rx {
                // Opened again meanwhile: its pages are in use.
                if pages_for_thread
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .open
                    .contains_key(&ino)
                {
                    continue;
                }
                if let Some(n) = for_thread.get() {
                    if let Err(e) = n.inval_inode(INodeNo(ino), 0, 0) {
                        log::debug!("dropping pages of inode {ino:#x}: {e}");
                    }
                }
            }
        })?;
    // One thread reads /dev/fuse and answers everything that only needs the
    // store (its mutex serializes those anyway): on 2 vCPUs several reader
    // threads made each round trip slower (untar took about twice as long
    // with four). Requests that may wait for the device (data reads, fsync)
    // go to `threads` workers, so reads run in parallel and keep the device
    // busy while the FUSE thread goes on.
    let (work, jobs) = sync_channel::<Job>(1024);
    let jobs = Arc::new(Mutex::new(jobs));
    for i in 0..options.threads.max(1) {
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
    let fs = LcfsFs {
        work,
        pages,
        drop_pages: tx,
        frozen: Mutex::new(HashMap::new()),
        engine,
        entry_ttl: options.entry_timeout,
        attr_ttl: options.attr_timeout,
        frozen_ttl: options.frozen_layer_timeout,
        started: SystemTime::now(),
        writeback_cache: options.writeback_cache,
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(options.fsname.clone()),
        MountOption::Subtype("lcfs".into()),
        MountOption::DefaultPermissions,
        MountOption::Dev,
        MountOption::Suid,
        MountOption::RW,
    ];
    config.acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let fuse_threads = options.fuse_threads.max(1);
    config.n_threads = Some(fuse_threads);
    // Each reader its own descriptor: no shared file position or lock.
    config.clone_fd = fuse_threads > 1;
    let session = fuser::spawn_mount(fs, mountpoint, &config)?;
    let _ = notifier.set(session.notifier());
    set_read_ahead(mountpoint, READ_AHEAD_WINDOW_BYTES);
    Ok(session)
}

/// Raises the readahead window of the mount's backing device info (the
/// kernel starts FUSE mounts at 128 KiB whatever max_readahead says): with
/// 128 KiB a cold sequential read is a round trip and a device read per
/// 128 KiB. Found through /proc/self/mountinfo (a stat of the mountpoint
/// would be a FUSE request). Needs root; without it the default stays.
fn set_read_ahead(mountpoint: &Path, bytes: u32) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let want = mountpoint.as_os_str().as_bytes();
    // Fields: id parent major:minor root mountpoint ...; the last match is
    // the newest mount on that path.
    let device = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 4 && unescape_mountinfo(f[4]) == want).then(|| f[2].to_string())
        })
        .next_back();
    let Some(device) = device else {
        log::debug!("readahead: {} not in mountinfo", mountpoint.display());
        return;
    };
    let path = format!("/sys/class/bdi/{device}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, format!("{}", bytes / 1024)) {
        log::info!("readahead stays at the kernel's default: writing {path}: {e}");
    }
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c));
        if b[i] == b'\\' && octal {
            let value = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}
