//! The copies mount: a second, internal FUSE mount that serves each frozen
//! layer's copy of a file once, by name `<layer id>-<inode>`, as the backing
//! file of FUSE passthrough (passthrough.rs). Every layer whose copy of a
//! file is that frozen copy (`Engine::shared_copy`) opens its file in
//! passthrough to this one, so the kernel keeps one page-cache copy of it,
//! for read(2) and mmap alike, however many layers read it at once.
//!
//! Read-only by design: frozen layers never change. The kernel opens the
//! backing file with the flags of the passthrough open it serves; a writable
//! open (a writer beside passthrough readers, passthrough.rs) is answered
//! with direct I/O, so the shared pages are never written and a shared
//! writable mapping of it fails (ENODEV) instead of changing a frozen copy.
//! Its writes never arrive (the writer's writes go to the main mount).
//!
//! Who may enter: root. The mount root is 0700 with default_permissions,
//! under the main mountpoint's root-only parent. It is an allow_other
//! mount all the same: the kernel opens a backing file as the process that
//! opened the main mount's file (often not root), and that open must not be
//! refused.

use crate::attr::{errno, file_attr};
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEntry, ReplyOpen, ReplyWrite, Request, SessionACL, WriteFlags,
};
use lcfs_engine::{Engine, FileKind};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

/// Frozen copies never change: the kernel may keep names and attributes.
const TTL: Duration = Duration::from_secs(24 * 3600);
const ROOT: u64 = 1;

/// The name of `inode`'s copy in frozen layer `layer`.
pub(crate) fn copy_name(layer: u64, inode: u64) -> String {
    format!("{layer}-{inode}")
}

fn parse_name(name: &OsStr) -> Option<(u64, u64)> {
    let (l, i) = name.to_str()?.split_once('-')?;
    Some((l.parse().ok()?, i.parse().ok()?))
}

/// Node ids of the copies the kernel holds, with its lookup counts.
#[derive(Default)]
struct Nodes {
    by_copy: HashMap<(u64, u64), u64>,
    by_node: HashMap<u64, ((u64, u64), u64)>,
    next: u64,
}

struct CopiesFs {
    engine: Arc<Engine>,
    nodes: Mutex<Nodes>,
}

impl CopiesFs {
    fn nodes(&self) -> std::sync::MutexGuard<'_, Nodes> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn copy_of(&self, node: INodeNo) -> Option<(u64, u64)> {
        self.nodes().by_node.get(&node.0).map(|(c, _)| *c)
    }
}

fn root_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(ROOT),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0o700,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

impl Filesystem for CopiesFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_READ | InitFlags::FUSE_MAX_PAGES);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some((layer, inode)) = parse_name(name).filter(|_| parent.0 == ROOT) else {
            return reply.error(Errno::ENOENT);
        };
        // Only frozen layers' regular files: what is served never changes.
        match self.engine.layer_shape(layer) {
            Ok(l) if l.frozen => {}
            Ok(_) => return reply.error(Errno::ENOENT),
            Err(e) => return reply.error(errno(&e)),
        }
        let a = match self.engine.getattr(layer, inode) {
            Ok(a) if a.kind == FileKind::File => a,
            Ok(_) => return reply.error(Errno::ENOENT),
            Err(e) => return reply.error(errno(&e)),
        };
        let node = {
            let mut n = self.nodes();
            let node = match n.by_copy.get(&(layer, inode)) {
                Some(&node) => node,
                None => {
                    n.next += 1;
                    let node = ROOT + n.next;
                    n.by_copy.insert((layer, inode), node);
                    node
                }
            };
            n.by_node.entry(node).or_insert(((layer, inode), 0)).1 += 1;
            node
        };
        reply.entry(&TTL, &file_attr(INodeNo(node), &a), fuser::Generation(0));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut n = self.nodes();
        if let Some((copy, count)) = n.by_node.get_mut(&ino.0) {
            *count = count.saturating_sub(nlookup);
            if *count == 0 {
                let copy = *copy;
                n.by_node.remove(&ino.0);
                n.by_copy.remove(&copy);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == ROOT {
            return reply.attr(&TTL, &root_attr());
        }
        let Some((layer, inode)) = self.copy_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match self.engine.getattr(layer, inode) {
            Ok(a) => reply.attr(&TTL, &file_attr(ino, &a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.copy_of(ino).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if flags.acc_mode() == OpenAccMode::O_RDONLY {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
        } else {
            // See the module comment: never through the shared pages.
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
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
        let Some((layer, inode)) = self.copy_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // The kernel caches these pages for every layer: not the engine too.
        match self
            .engine
            .read_uncached(layer, inode, offset, size as usize)
        {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        // Copies are reached by name only; the listing is empty.
        for (i, name) in [".", ".."].iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ROOT), (i + 1) as u64, FileType::Directory, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// The mounted copies filesystem. Dropping it unmounts (once the kernel
/// has let go of the backing files of closed passthrough files).
pub(crate) struct Copies {
    path: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl Drop for Copies {
    fn drop(&mut self) {
        crate::mount::wait_until_idle(&self.path);
        if let Some(s) = self.session.take() {
            if let Err(e) = s.umount_and_join() {
                log::warn!("unmounting the copies mount {}: {e}", self.path.display());
            }
        }
    }
}

impl Copies {
    /// Mounts the copies of `engine` at `path` (made ready as a mountpoint
    /// first, a dead mount of a killed daemon cleared).
    pub(crate) fn mount(engine: Arc<Engine>, path: &Path) -> io::Result<Copies> {
        crate::mount::prepare_mountpoint(path)?;
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("lcfs-copies".into()),
            MountOption::Subtype("lcfs".into()),
            MountOption::RW,
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::DefaultPermissions,
        ];
        // The kernel opens a backing file with the credentials of the
        // process opening the file in the main mount (a container's user),
        // so the server must answer every uid (fuser's Owner ACL would
        // refuse them); the kernel's permission checks keep others out of
        // the root (0700) and its root-only parent.
        config.acl = SessionACL::All;
        config.n_threads = Some(2);
        config.clone_fd = true;
        let fs = CopiesFs {
            engine,
            nodes: Mutex::default(),
        };
        let session = fuser::spawn_mount(fs, path, &config)?;
        Ok(Copies {
            path: path.to_path_buf(),
            session: Some(session),
        })
    }

    /// Where the copy of `inode` in frozen layer `layer` is reached.
    pub(crate) fn path_of(&self, layer: u64, inode: u64) -> PathBuf {
        self.path.join(copy_name(layer, inode))
    }
}
