//! The fuser filesystem over the engine: each FUSE operation turns the
//! kernel's node ids into (layer, inode) (inodes.rs), calls the engine and
//! answers, converting attributes (attr.rs). How long the kernel keeps
//! names, attributes and pages is cache.rs's; which requests go to worker
//! threads, workers.rs's; how the filesystem is mounted, mount.rs's. Every
//! handler times itself (latency.rs) until its reply.

use crate::attr::{errno, file_attr, file_type, mode_without_set_id, time_set, timestamp};
use crate::cache::{self, CachePolicy, PageCache};
use crate::inodes::{Inodes, MOUNT_ROOT};
use crate::latency::{Operation, OperationTimer};
use crate::mount::ROOT_MODE;
use crate::passthrough::{OpenAs, Passthrough};
use crate::workers::{self, Workers};
use crate::MountOptions;
use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, PollEvents,
    PollFlags, PollNotifier, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyPoll, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use lcfs_engine::{Attr, Engine, SetAttr, ROOT_INODE};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The most the kernel reads ahead in one request.
const READ_AHEAD_REQUEST_BYTES: u32 = 1 << 20;
/// readdir offsets of "." and ".." (engine cookies start at 0x101).
const DOT: u64 = 1;
const DOTDOT: u64 = 2;

pub(crate) struct LcfsFs {
    engine: Arc<Engine>,
    started: SystemTime,
    /// Kernel node ids <-> (layer, inode).
    inodes: Inodes,
    /// How long the kernel keeps names and attributes, and which pages.
    cache: CachePolicy,
    /// Data reads larger than `INLINE_READ_MAX` and fsyncs.
    workers: Workers,
    /// Ask for the kernel's writeback cache at init.
    writeback_cache: bool,
    /// Passthrough of shared files to the copies mount (passthrough.rs).
    passthrough: Option<Arc<Passthrough>>,
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
            perm: ROOT_MODE,
            nlink: 2 + layers,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// An open of `inode` in `layer`, for the page-cache policy.
    fn note_open(&self, layer: u64, inode: u64) {
        if let Ok((node, _)) = self.node(layer, inode) {
            self.cache.opened(node.0, layer, inode);
        }
    }

    /// The (layer, inode) kernel node id `ino` names.
    fn split(&self, ino: INodeNo) -> Option<(u64, u64)> {
        self.inodes.split(ino.0)
    }

    /// The kernel node id and generation of `inode` in `layer`.
    fn node(&self, layer: u64, inode: u64) -> Result<(INodeNo, Generation), Errno> {
        let live = || self.engine.list_layers().iter().map(|l| l.id).collect();
        match self.inodes.join(layer, inode, live) {
            Ok((node, generation)) => Ok((INodeNo(node), Generation(generation))),
            Err(e) => {
                log::warn!("no kernel node id for inode {inode} of layer {layer}: {e:?}");
                Err(Errno::from_i32(e.errno()))
            }
        }
    }

    /// The attributes the kernel sees of `a`, an inode of `layer`.
    fn file_attr(&self, layer: u64, a: &Attr) -> Result<(FileAttr, Generation), Errno> {
        let (ino, generation) = self.node(layer, a.inode)?;
        Ok((file_attr(ino, a), generation))
    }

    fn entry(&self, layer: u64, r: lcfs_engine::Result<Attr>, reply: ReplyEntry) {
        match r
            .map_err(|e| errno(&e))
            .and_then(|a| self.file_attr(layer, &a))
        {
            Ok((fa, generation)) => reply.entry(&self.cache.entry_ttl(layer), &fa, generation),
            Err(e) => reply.error(e),
        }
    }

    fn attr(&self, layer: u64, r: lcfs_engine::Result<Attr>, reply: ReplyAttr) {
        match r
            .map_err(|e| errno(&e))
            .and_then(|a| self.file_attr(layer, &a))
        {
            Ok((fa, _)) => reply.attr(&self.cache.attr_ttl(layer), &fa),
            Err(e) => reply.error(e),
        }
    }

    /// Resolves a directory inode for a change. The mount root takes none.
    fn dir_for_change(&self, parent: INodeNo) -> Result<(u64, u64), Errno> {
        if parent.0 == MOUNT_ROOT {
            // Layers are made through the control socket, never by mkdir.
            return Err(Errno::from_i32(libc::EPERM));
        }
        self.split(parent).ok_or(Errno::from_i32(libc::ENOENT))
    }
}

impl Filesystem for LcfsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Each flag saves round trips; docs/fuse.md says what each costs.
        // HANDLE_KILLPRIV_V2: the daemon clears set-id bits on chown, on
        // truncate and write by callers without CAP_FSETID (see
        // `mode_without_set_id`), so the kernel no longer fetches attributes before
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
        // PASSTHROUGH (never with the writeback cache: the kernel refuses
        // the pair): stack depth 1, the copies mount being a plain FUSE mount.
        if let Some(p) = &self.passthrough {
            if let Err(missing) = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                p.disable(&format!("the kernel lacks FUSE_PASSTHROUGH ({missing:?})"));
            } else if let Err(most) = config.set_max_stack_depth(1) {
                p.disable(&format!("the kernel allows a stack depth of {most} only"));
            }
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
        let _timer = OperationTimer::start(Operation::Lookup);
        if parent.0 == MOUNT_ROOT {
            let Some(n) = name.to_str() else {
                return reply.error(Errno::from_i32(libc::ENOENT));
            };
            match self.engine.layer_id(n) {
                Ok(id) => {
                    // Notes whether the layer is frozen (for its timeouts).
                    self.cache.note_layer(id);
                    self.entry(id, self.engine.getattr(id, ROOT_INODE), reply)
                }
                Err(e) => reply.error(errno(&e)),
            }
            return;
        }
        let Some((layer, dir)) = self.split(parent) else {
            return reply.error(Errno::from_i32(libc::ENOENT));
        };
        self.entry(
            layer,
            self.engine.lookup(layer, dir, name.as_bytes()),
            reply,
        );
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timer = OperationTimer::start(Operation::Getattr);
        if ino.0 == MOUNT_ROOT {
            return reply.attr(&self.cache.mount_attr_ttl(), &self.root_attr());
        }
        let Some((layer, inode)) = self.split(ino) else {
            return reply.error(Errno::from_i32(libc::ENOENT));
        };
        self.attr(layer, self.engine.getattr(layer, inode), reply);
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
        let _timer = OperationTimer::start(Operation::Setattr);
        if ino.0 == MOUNT_ROOT {
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        let Some((layer, inode)) = self.split(ino) else {
            return reply.error(Errno::from_i32(libc::ENOENT));
        };
        let mut mode = mode;
        let chown = uid.is_some() || gid.is_some();
        if mode.is_none() && (chown || size.is_some()) {
            // chown clears whoever asks; truncate unless CAP_FSETID.
            let caller = (!chown).then(|| req.pid());
            mode = mode_without_set_id(&self.engine, layer, inode, caller);
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
        self.attr(layer, self.engine.setattr(layer, inode, &s), reply);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timer = OperationTimer::start(Operation::Other);
        let Some((layer, inode)) = self.split(ino) else {
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
        let _timer = OperationTimer::start(Operation::Other);
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
        let _timer = OperationTimer::start(Operation::Mkdir);
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
        let _timer = OperationTimer::start(Operation::Unlink);
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
        let _timer = OperationTimer::start(Operation::Other);
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
        let _timer = OperationTimer::start(Operation::Other);
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
        let _timer = OperationTimer::start(Operation::Other);
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
        let _timer = OperationTimer::start(Operation::Other);
        let Some((layer, inode)) = self.split(ino) else {
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
        let _timer = OperationTimer::start(Operation::Open);
        let Some((layer, inode)) = self.split(ino) else {
            return reply.error(Errno::from_i32(libc::EISDIR));
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            match self.engine.layer_shape(layer) {
                Ok(l) if l.frozen => return reply.error(Errno::from_i32(libc::EROFS)),
                Ok(_) => {}
                Err(e) => return reply.error(errno(&e)),
            }
        }
        if let Err(e) = self.engine.open_inode(layer, inode) {
            return reply.error(errno(&e));
        }
        self.note_open(layer, inode);
        let Some(p) = &self.passthrough else {
            return reply.opened(FileHandle(0), cache::open_flags());
        };
        let writable = flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        match p.open(ino.0, layer, inode, writable, &reply) {
            OpenAs::Cached => reply.opened(FileHandle(0), cache::open_flags()),
            OpenAs::CachedFresh => reply.opened(FileHandle(0), FopenFlags::empty()),
            OpenAs::Passthrough {
                fh,
                direct,
                backing,
            } => {
                let flags = if direct {
                    FopenFlags::FOPEN_DIRECT_IO
                } else {
                    FopenFlags::empty()
                };
                reply.opened_passthrough(FileHandle(fh), flags, &backing.id)
            }
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
        let timer = OperationTimer::start(Operation::Read);
        let Some((layer, inode)) = self.split(ino) else {
            return reply.error(Errno::from_i32(libc::EISDIR));
        };
        let engine = self.engine.clone();
        // The timer goes with the job: a worker's read is timed to its reply.
        let read = move || {
            let _timer = timer;
            match engine.read_counted(layer, inode, offset, size as usize) {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno(&e)),
            }
        };
        if size as usize <= workers::INLINE_READ_MAX {
            read();
        } else {
            self.workers.run(Box::new(read));
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
        let _timer = OperationTimer::start(Operation::Write);
        let Some((layer, inode)) = self.split(ino) else {
            return reply.error(Errno::from_i32(libc::EISDIR));
        };
        if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            // The kernel sets the flag for callers without CAP_FSETID.
            if let Some(mode) = mode_without_set_id(&self.engine, layer, inode, None) {
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
        let _timer = OperationTimer::start(Operation::Flush);
        // close(2) is not a durability point; fsync is. ENOSYS once, and the
        // kernel stops sending flush (a round trip on every close).
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = OperationTimer::start(Operation::Release);
        if let Some(p) = &self.passthrough {
            p.released(ino.0, fh.0);
        }
        if let Some((layer, inode)) = self.split(ino) {
            if let Err(e) = self.engine.release_inode(layer, inode) {
                log::warn!("release of {layer}/{inode}: {e}");
            }
            self.cache.released(ino.0, layer, inode);
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
        // The file's changes go to the engine's fsync log when they can,
        // otherwise a checkpoint makes everything durable (fdatasync the
        // same: the inode travels with the data). The kernel has written
        // the file's dirty pages back before it asks.
        let timer = OperationTimer::start(Operation::Fsync);
        let engine = self.engine.clone();
        let file = self.split(ino);
        self.workers.run(Box::new(move || {
            let _timer = timer;
            let r = match file {
                Some((layer, inode)) => engine.fsync(layer, inode),
                None => engine.sync(),
            };
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        }));
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timer = OperationTimer::start(Operation::Other);
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
        let _timer = OperationTimer::start(Operation::Readdir);
        if ino.0 == MOUNT_ROOT {
            let layers = self.engine.list_layers();
            let mut entries = vec![
                (INodeNo(MOUNT_ROOT), FileType::Directory, ".".to_string()),
                (INodeNo(MOUNT_ROOT), FileType::Directory, "..".to_string()),
            ];
            entries.extend(layers.into_iter().filter_map(|l| {
                let (node, _) = self.node(l.id, ROOT_INODE).ok()?;
                Some((node, FileType::Directory, l.name))
            }));
            for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                if reply.add(ino, i as u64 + 1, kind, name) {
                    break;
                }
            }
            return reply.ok();
        }
        let Some((layer, dir)) = self.split(ino) else {
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
                let node = match self.node(layer, e.inode) {
                    Ok((node, _)) => node,
                    Err(errno) => return reply.error(errno),
                };
                if reply.add(
                    node,
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
        let _timer = OperationTimer::start(Operation::Readdir);
        if ino.0 == MOUNT_ROOT {
            let root = self.root_attr();
            if offset < 1
                && reply.add(
                    INodeNo(MOUNT_ROOT),
                    1,
                    ".",
                    &self.cache.mount_attr_ttl(),
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
                    &self.cache.mount_attr_ttl(),
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
                let Ok((fa, generation)) = self.file_attr(l.id, &a) else {
                    continue;
                };
                if reply.add(
                    fa.ino,
                    off,
                    &l.name,
                    &self.cache.mount_entry_ttl(),
                    &fa,
                    generation,
                ) {
                    break;
                }
            }
            return reply.ok();
        }
        let Some((layer, dir)) = self.split(ino) else {
            return reply.error(Errno::from_i32(libc::ENOENT));
        };
        let (me, my_generation) = match self
            .engine
            .getattr(layer, dir)
            .map_err(|e| errno(&e))
            .and_then(|a| self.file_attr(layer, &a))
        {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        let ttl = self.cache.entry_ttl(layer);
        if offset < DOT && reply.add(ino, DOT, ".", &ttl, &me, my_generation) {
            return reply.ok();
        }
        if offset < DOTDOT {
            let (parent, generation) = if dir == ROOT_INODE {
                (self.root_attr(), Generation(0))
            } else {
                (me, my_generation)
            };
            if reply.add(
                parent.ino,
                DOTDOT,
                "..",
                &self.cache.mount_attr_ttl(),
                &parent,
                generation,
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
                let (fa, generation) = match self.file_attr(layer, &a) {
                    Ok(v) => v,
                    Err(errno) => return reply.error(errno),
                };
                if reply.add(
                    fa.ino,
                    e.cookie,
                    OsStr::from_bytes(&e.name),
                    &ttl,
                    &fa,
                    generation,
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
        let timer = OperationTimer::start(Operation::Fsync);
        let engine = self.engine.clone();
        self.workers.run(Box::new(move || {
            let _timer = timer;
            match engine.sync() {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        }));
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let _timer = OperationTimer::start(Operation::Other);
        let layer = self
            .split(ino)
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
        let _timer = OperationTimer::start(Operation::Other);
        if position != 0 {
            return reply.error(Errno::from_i32(libc::EINVAL));
        }
        let Some((layer, inode)) = self.split(ino) else {
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
        let _timer = OperationTimer::start(Operation::Other);
        let Some((layer, inode)) = self.split(ino) else {
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
        let _timer = OperationTimer::start(Operation::Other);
        let names = match self.split(ino) {
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
        let _timer = OperationTimer::start(Operation::Other);
        let Some((layer, inode)) = self.split(ino) else {
            return reply.error(Errno::from_i32(libc::ENODATA));
        };
        match self.engine.removexattr(layer, inode, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _timer = OperationTimer::start(Operation::Other);
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
        let _timer = OperationTimer::start(Operation::Other);
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
        let _timer = OperationTimer::start(Operation::Create);
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
        let opened = r
            .and_then(|a| self.engine.open_inode(layer, a.inode).map(|_| a))
            .map_err(|e| errno(&e))
            .and_then(|a| Ok((a.inode, self.file_attr(layer, &a)?)));
        match opened {
            Ok((inode, (fa, generation))) => {
                self.note_open(layer, inode);
                if let Some(p) = &self.passthrough {
                    p.created(fa.ino.0);
                }
                reply.created(
                    &self.cache.entry_ttl(layer),
                    &fa,
                    generation,
                    FileHandle(0),
                    cache::open_flags(),
                )
            }
            Err(e) => reply.error(e),
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
        let _timer = OperationTimer::start(Operation::Other);
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
        let _timer = OperationTimer::start(Operation::Other);
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
        let _timer = OperationTimer::start(Operation::Other);
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
        let _timer = OperationTimer::start(Operation::Other);
        let Some((layer, inode)) = self.split(ino) else {
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

impl LcfsFs {
    /// The filesystem over `engine`, with its worker threads started, and
    /// its page cache (which needs the session's notifier once mounted).
    pub(crate) fn new(
        engine: Arc<Engine>,
        options: &MountOptions,
        passthrough: Option<Arc<Passthrough>>,
    ) -> io::Result<(LcfsFs, Arc<PageCache>)> {
        let pages = Arc::new(PageCache::start()?);
        let fs = LcfsFs {
            workers: Workers::start(options.threads)?,
            inodes: Inodes::new(),
            cache: CachePolicy::new(engine.clone(), options, pages.clone()),
            engine,
            started: SystemTime::now(),
            writeback_cache: options.writeback_cache,
            passthrough,
        };
        Ok((fs, pages))
    }
}
