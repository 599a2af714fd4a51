//! Layer operations and the per-layer filesystem API, on top of the store.
//!
//! A layer's tree holds, per inode: its record (INODE), directory entries
//! hashed by name (DIRENT), extended attributes hashed by name (XATTR), one
//! extent per 4 KiB file block (EXTENT), and short symlink targets (SYMLINK).
//! A clone shares its parent's tree root; the first change to any node copies
//! it (the copy is owned by the clone), so clone and freeze are O(1).

use crate::device::BLOCK_SIZE;
use crate::error::{Error, Result};
use crate::format::*;
use crate::fsynclog::FsyncLog;
use crate::read::{BlockSource, KnownBlock, ReadPlan};
use crate::store::{Store, Temperature, Tree};
use xxhash_rust::xxh3::xxh3_64_with_seed;

pub const ROOT_INODE: u64 = 1;
/// Longest file name, as on every Linux filesystem.
pub const NAME_MAX: usize = 255;
/// Symlink targets longer than this are stored in data blocks.
const INLINE_SYMLINK_MAX: usize = 1024;
/// Hard link limit per inode.
pub const LINK_MAX: u32 = 65000;
/// Largest file size (2^63 - 1 bytes would overflow block math; stay at 2^60).
pub const MAX_FILE_BYTES: u64 = 1 << 60;

pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;
pub const XATTR_CREATE: u32 = 1;
pub const XATTR_REPLACE: u32 = 2;
pub const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
pub const FALLOC_FL_ZERO_RANGE: u32 = 0x10;

const S_IFMT: u32 = 0o170000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFBLK: u32 = 0o060000;
pub const S_IFIFO: u32 = 0o010000;
pub const S_IFSOCK: u32 = 0o140000;
const S_ISGID: u32 = 0o2000;

/// File types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl FileKind {
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & S_IFMT {
            S_IFREG => FileKind::File,
            S_IFDIR => FileKind::Directory,
            S_IFLNK => FileKind::Symlink,
            S_IFCHR => FileKind::CharDevice,
            S_IFBLK => FileKind::BlockDevice,
            S_IFIFO => FileKind::Fifo,
            S_IFSOCK => FileKind::Socket,
            _ => return None,
        })
    }
    fn code(self) -> u8 {
        self as u8
    }
    fn from_code(c: u8) -> Result<FileKind> {
        [
            FileKind::File,
            FileKind::Directory,
            FileKind::Symlink,
            FileKind::CharDevice,
            FileKind::BlockDevice,
            FileKind::Fifo,
            FileKind::Socket,
        ]
        .get(c as usize)
        .copied()
        .ok_or_else(|| Error::corrupt(0, "bad file kind in directory entry"))
    }
}

/// Attributes of an inode, as stat reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub inode: u64,
    pub kind: FileKind,
    /// Type and permission bits, as st_mode.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// In 512-byte units, as st_blocks.
    pub blocks_512: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub rdev: u64,
}

/// How to set a timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(Timestamp),
}

/// Attribute changes; None leaves a field alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Timestamp>,
}

/// One directory entry. `cookie` resumes a listing after this entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub inode: u64,
    pub kind: FileKind,
    pub cookie: u64,
}

/// Filesystem space figures for statfs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    pub block_size: u32,
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_available: u64,
    pub files: u64,
    pub files_free: u64,
    pub name_max: u32,
}

/// The few facts about a layer a mount needs on every open: where its
/// inodes come from. [`crate::Engine::layer_shape`] gives them without
/// building a whole [`LayerInfo`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerShape {
    /// The parent layer's id (None for a base layer).
    pub parent: Option<u64>,
    /// Inodes below this number were inherited or made by the layer; those
    /// at or above it do not exist yet.
    pub next_inode: u64,
    pub frozen: bool,
}

/// What a layer looks like from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    pub id: u64,
    pub name: String,
    pub parent: Option<String>,
    pub frozen: bool,
    pub cold: bool,
    pub children: u32,
    pub created: Timestamp,
    pub frozen_at: Option<Timestamp>,
    pub owned_bytes: u64,
    pub inode_count: u64,
    /// Inode numbers below this existed when the layer was cloned (or are
    /// the layer's own, for a base layer); new inodes get numbers from here.
    pub next_inode: u64,
    /// Most bytes the layer may own (its size limit), if it has one.
    pub quota_bytes: Option<u64>,
    /// How it has been used: clones, reads (reads not yet in the record
    /// included).
    pub usage: LayerUsage,
    /// Its seal (seal.rs): sealed with a root, partial, or none.
    pub seal: crate::SealState,
}

fn name_hash(name: &[u8]) -> u64 {
    // 8 low bits index collisions inside one key; keep cookies above 0x100
    // so front ends can use small cookies for "." and "..".
    let h = xxh3_64_with_seed(name, 0x6c63_6673) & 0x7fff_ffff_ffff_ff00;
    h.max(0x100)
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Error::Invalid("bad file name".into()));
    }
    if name.len() > NAME_MAX {
        return Err(Error::NameTooLong);
    }
    Ok(())
}

fn is_dir(i: &InodeValue) -> bool {
    i.mode & S_IFMT == S_IFDIR
}

fn attr_of(ino: u64, i: &InodeValue) -> Result<Attr> {
    let kind = FileKind::from_mode(i.mode).ok_or_else(|| Error::corrupt(0, "bad inode mode"))?;
    Ok(Attr {
        inode: ino,
        kind,
        mode: i.mode,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        size: i.size,
        blocks_512: i.blocks * (BLOCK_SIZE as u64 / 512),
        atime: i.atime,
        mtime: i.mtime,
        ctime: i.ctime,
        rdev: i.rdev,
    })
}

fn encode_dirent(ino: u64, kind: FileKind) -> Vec<u8> {
    crate::format::encode_dirent(ino, kind.code())
}

fn decode_dirent(v: &[u8]) -> Result<(u64, FileKind)> {
    let (ino, code) = crate::format::decode_dirent(v)?;
    Ok((ino, FileKind::from_code(code)?))
}

impl Store {
    // ------------------------------------------------------------ layer helpers

    pub(crate) fn layer(&self, layer: u64) -> Result<&LayerRecord> {
        self.layers.get(layer).ok_or(Error::NotFound)
    }

    pub(crate) fn layer_id(&self, name: &str) -> Result<u64> {
        self.layers
            .id_by_name(name.as_bytes())
            .ok_or(Error::NotFound)
    }

    pub(crate) fn writable_layer(&self, layer: u64) -> Result<()> {
        self.check_writable()?;
        if self.layer(layer)?.frozen {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    fn temperature(&self, layer: u64) -> Temperature {
        match self.layers.get(layer) {
            Some(l) if l.cold => Temperature::Cold,
            _ => Temperature::Hot,
        }
    }

    pub(crate) fn lget(&mut self, layer: u64, key: Key) -> Result<Option<Vec<u8>>> {
        let root = self.layer(layer)?.root;
        self.get(Tree::Layer(layer), root, &key)
    }

    pub(crate) fn set_root(&mut self, layer: u64, root: u64) {
        let l = self.layers.get_mut(layer).expect("layer exists");
        if l.root != root {
            l.root = root;
            self.mark_layer_dirty(layer);
        }
    }

    fn lput(&mut self, layer: u64, key: Key, value: Vec<u8>) -> Result<Option<Vec<u8>>> {
        let mut root = self.layer(layer)?.root;
        let r = self.insert(Tree::Layer(layer), &mut root, key, value);
        self.set_root(layer, root);
        r
    }

    fn ldel(&mut self, layer: u64, key: Key) -> Result<Option<Vec<u8>>> {
        let mut root = self.layer(layer)?.root;
        let r = self.remove(Tree::Layer(layer), &mut root, &key);
        self.set_root(layer, root);
        r
    }

    pub(crate) fn lscan(
        &mut self,
        layer: u64,
        lo: Key,
        hi: Key,
        f: &mut dyn FnMut(&Key, &[u8]) -> bool,
    ) -> Result<()> {
        let root = self.layer(layer)?.root;
        self.scan(Tree::Layer(layer), root, lo, hi, f)
    }

    pub(crate) fn inode(&mut self, layer: u64, ino: u64) -> Result<InodeValue> {
        match self.lget(layer, Key::new(ino, KIND_INODE, 0))? {
            Some(v) => InodeValue::decode(&v),
            None => Err(Error::NotFound),
        }
    }

    pub(crate) fn put_inode(&mut self, layer: u64, ino: u64, i: &InodeValue) -> Result<()> {
        self.fsync_log.inode_changed(layer, ino);
        self.lput(layer, Key::new(ino, KIND_INODE, 0), i.encode())?;
        Ok(())
    }

    fn dir_inode(&mut self, layer: u64, ino: u64) -> Result<InodeValue> {
        let i = self.inode(layer, ino)?;
        if !is_dir(&i) {
            return Err(Error::NotDirectory);
        }
        Ok(i)
    }

    fn dirent_list(&mut self, layer: u64, dir: u64, h: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        match self.lget(layer, Key::new(dir, KIND_DIRENT, h))? {
            Some(v) => decode_named(&v),
            None => Ok(Vec::new()),
        }
    }

    pub(crate) fn dirent_get(
        &mut self,
        layer: u64,
        dir: u64,
        name: &[u8],
    ) -> Result<Option<(u64, FileKind)>> {
        let list = self.dirent_list(layer, dir, name_hash(name))?;
        match list.iter().find(|(n, _)| n == name) {
            Some((_, v)) => Ok(Some(decode_dirent(v)?)),
            None => Ok(None),
        }
    }

    fn dirent_put(
        &mut self,
        layer: u64,
        dir: u64,
        name: &[u8],
        ino: u64,
        kind: FileKind,
    ) -> Result<()> {
        let h = name_hash(name);
        let mut list = self.dirent_list(layer, dir, h)?;
        match list.iter_mut().find(|(n, _)| n == name) {
            Some(e) => e.1 = encode_dirent(ino, kind),
            None => {
                if list.len() >= 255 {
                    return Err(Error::NoSpace);
                }
                list.push((name.to_vec(), encode_dirent(ino, kind)))
            }
        }
        self.lput(layer, Key::new(dir, KIND_DIRENT, h), encode_named(&list))?;
        Ok(())
    }

    fn dirent_del(&mut self, layer: u64, dir: u64, name: &[u8]) -> Result<()> {
        let h = name_hash(name);
        let mut list = self.dirent_list(layer, dir, h)?;
        list.retain(|(n, _)| n != name);
        let key = Key::new(dir, KIND_DIRENT, h);
        if list.is_empty() {
            self.ldel(layer, key)?;
        } else {
            self.lput(layer, key, encode_named(&list))?;
        }
        Ok(())
    }

    fn dir_is_empty(&mut self, layer: u64, dir: u64) -> Result<bool> {
        let mut empty = true;
        self.lscan(
            layer,
            Key::new(dir, KIND_DIRENT, 0),
            Key::new(dir, KIND_DIRENT, u64::MAX),
            &mut |_, _| {
                empty = false;
                false
            },
        )?;
        Ok(empty)
    }

    /// Ends a change: one more generation to make durable.
    pub(crate) fn bump(&mut self) {
        #[cfg(any(test, feature = "testing"))]
        if std::mem::take(&mut self.panic_in_next_change) {
            panic!("injected panic in the middle of a change");
        }
        self.generation += 1;
    }

    // ------------------------------------------------------------ layers

    pub(crate) fn create_layer(
        &mut self,
        name: &str,
        parent: Option<&str>,
        cold: bool,
    ) -> Result<u64> {
        self.check_writable()?;
        if name.is_empty()
            || name.len() > NAME_MAX
            || name.contains('/')
            || name.contains('\0')
            || name == "."
            || name == ".."
        {
            return Err(Error::Invalid(format!("bad layer name {name:?}")));
        }
        if self.layers.id_by_name(name.as_bytes()).is_some() {
            return Err(Error::Exists);
        }
        self.ensure_space(0, false)?;
        let now = Timestamp::now();
        let id = self.layers.alloc_id();
        self.fsync_log.layer_born(id);
        let mut rec = LayerRecord {
            id,
            name: name.as_bytes().to_vec(),
            parent: 0,
            root: 0,
            frozen: false,
            cold,
            children: 0,
            created: now,
            frozen_at: Timestamp::default(),
            next_inode: ROOT_INODE + 1,
            inode_count: 0,
            owned_blocks: 0,
            quota_bytes: 0,
            usage: LayerUsage::default(),
            seal: 0,
        };
        if let Some(p) = parent {
            let pid = self.layer_id(p)?;
            let pr = self.layers.get_mut(pid).expect("named layer exists");
            // Clone: share the parent's root; freeze the parent. O(1).
            if !pr.frozen {
                pr.frozen = true;
                pr.frozen_at = now;
            }
            pr.children += 1;
            // A container (or an init layer) started from it; a pulled
            // layer stacked on it is not a start.
            if !cold {
                pr.usage.clones += 1;
                pr.usage.last_clone = now;
            }
            rec.parent = pid;
            rec.root = pr.root;
            rec.next_inode = pr.next_inode;
            rec.inode_count = pr.inode_count;
            self.mark_layer_dirty(pid);
        }
        self.layers.insert(rec);
        self.mark_layer_dirty(id);
        if parent.is_none() {
            let root = InodeValue {
                mode: S_IFDIR | 0o755,
                nlink: 2,
                atime: now,
                mtime: now,
                ctime: now,
                parent: ROOT_INODE,
                ..Default::default()
            };
            self.put_inode(id, ROOT_INODE, &root)?;
            self.layers.get_mut(id).expect("inserted").inode_count = 1;
        }
        self.bump();
        Ok(id)
    }

    pub(crate) fn freeze_layer(&mut self, layer: u64) -> Result<()> {
        self.check_writable()?;
        let l = self.layers.get_mut(layer).ok_or(Error::NotFound)?;
        if !l.frozen {
            l.frozen = true;
            l.frozen_at = Timestamp::now();
            self.mark_layer_dirty(layer);
            self.bump();
        }
        Ok(())
    }

    pub(crate) fn layer_shape(&self, layer: u64) -> Result<LayerShape> {
        let l = self.layer(layer)?;
        Ok(LayerShape {
            parent: (l.parent != 0).then_some(l.parent),
            next_inode: l.next_inode,
            frozen: l.frozen,
        })
    }

    pub(crate) fn layer_info(&self, layer: u64) -> Result<LayerInfo> {
        let l = self.layer(layer)?;
        Ok(LayerInfo {
            id: l.id,
            name: String::from_utf8_lossy(&l.name).into_owned(),
            parent: self
                .layers
                .get(l.parent)
                .map(|p| String::from_utf8_lossy(&p.name).into_owned()),
            frozen: l.frozen,
            cold: l.cold,
            children: l.children,
            created: l.created,
            frozen_at: l.frozen.then_some(l.frozen_at),
            owned_bytes: l.owned_blocks * BLOCK_SIZE as u64,
            inode_count: l.inode_count,
            next_inode: l.next_inode,
            quota_bytes: (l.quota_bytes > 0).then_some(l.quota_bytes),
            usage: {
                let mut u = l.usage;
                if let Some(pending) = self.pending_reads.get(&layer) {
                    pending.add_to(&mut u);
                }
                u
            },
            // Filled in by the engine, which may read the seal's header.
            seal: crate::SealState::None,
        })
    }

    /// Sets layer `layer`'s size limit (0: none). A limit below what the
    /// layer owns already is refused.
    pub(crate) fn set_layer_quota(&mut self, layer: u64, quota_bytes: u64) -> Result<()> {
        let l = self.layer(layer)?;
        let owned = l.owned_blocks * BLOCK_SIZE as u64;
        if quota_bytes > 0 && quota_bytes < owned {
            return Err(Error::Invalid(format!(
                "a size limit of {quota_bytes} bytes is below the {owned} bytes the layer holds"
            )));
        }
        self.layers.get_mut(layer).expect("exists").quota_bytes = quota_bytes;
        self.mark_layer_dirty(layer);
        Ok(())
    }

    /// Refuses a write of `len` bytes at `offset` that would take the layer
    /// past its size limit. It adds the blocks of the range the layer does
    /// not own yet (holes, and blocks an ancestor wrote or it shares).
    fn check_quota(&mut self, layer: u64, ino: u64, offset: u64, len: u64) -> Result<()> {
        let l = self.layer(layer)?;
        let (limit_bytes, owned) = (l.quota_bytes, l.owned_blocks);
        if limit_bytes == 0 || len == 0 {
            return Ok(());
        }
        let bs = BLOCK_SIZE as u64;
        let (first, last) = (offset / bs, (offset + len - 1) / bs);
        let mut own = 0u64;
        self.lscan(
            layer,
            Key::new(ino, KIND_EXTENT, first),
            Key::new(ino, KIND_EXTENT, last),
            &mut |_, v| {
                if ExtentValue::decode(v).is_ok_and(|e| e.birth_layer == layer && !e.shared) {
                    own += 1;
                }
                true
            },
        )?;
        let adds = (last - first + 1).saturating_sub(own);
        if (owned + adds) * bs > limit_bytes {
            return Err(Error::QuotaExceeded { limit_bytes });
        }
        Ok(())
    }

    // ------------------------------------------------------------ lookups

    pub(crate) fn getattr(&mut self, layer: u64, ino: u64) -> Result<Attr> {
        let i = self.inode(layer, ino)?;
        attr_of(ino, &i)
    }

    /// [`Store::getattr`], keeping the answer for lock-free repeats.
    pub(crate) fn getattr_kept(&mut self, layer: u64, ino: u64) -> Result<Attr> {
        let version = self.meta.version(layer);
        let a = self.getattr(layer, ino)?;
        self.meta.put_attr(layer, ino, version, a);
        Ok(a)
    }

    /// Looks `name` up in `dir`, keeping the answer (a missing name too)
    /// for lock-free repeats.
    pub(crate) fn lookup(&mut self, layer: u64, dir: u64, name: &[u8]) -> Result<Attr> {
        if name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        let version = self.meta.version(layer);
        self.dir_inode(layer, dir)?;
        match self.dirent_get(layer, dir, name)? {
            Some((ino, _)) => {
                let a = self.getattr(layer, ino)?;
                self.meta.put_attr(layer, ino, version, a);
                self.meta.put_name(layer, dir, name, version, Some(ino));
                Ok(a)
            }
            None => {
                self.meta.put_name(layer, dir, name, version, None);
                Err(Error::NotFound)
            }
        }
    }

    pub(crate) fn readdir(
        &mut self,
        layer: u64,
        dir: u64,
        cookie: u64,
        limit: usize,
    ) -> Result<Vec<DirEntry>> {
        self.dir_inode(layer, dir)?;
        let start_hash = cookie & !0xff;
        let mut out = Vec::new();
        let mut bad = None;
        self.lscan(
            layer,
            Key::new(dir, KIND_DIRENT, start_hash),
            Key::new(dir, KIND_DIRENT, u64::MAX),
            &mut |k, v| {
                match decode_named(v) {
                    Ok(list) => {
                        for (j, (name, payload)) in list.into_iter().enumerate() {
                            let c = k.offset + j as u64 + 1;
                            if c <= cookie {
                                continue;
                            }
                            match decode_dirent(&payload) {
                                Ok((inode, kind)) => out.push(DirEntry {
                                    name,
                                    inode,
                                    kind,
                                    cookie: c,
                                }),
                                Err(e) => bad = Some(e),
                            }
                        }
                    }
                    Err(e) => bad = Some(e),
                }
                bad.is_none() && out.len() < limit
            },
        )?;
        if let Some(e) = bad {
            return Err(e);
        }
        out.truncate(limit);
        Ok(out)
    }

    pub(crate) fn readlink(&mut self, layer: u64, ino: u64) -> Result<Vec<u8>> {
        let i = self.inode(layer, ino)?;
        if i.mode & S_IFMT != S_IFLNK {
            return Err(Error::Invalid("not a symlink".into()));
        }
        match self.lget(layer, Key::new(ino, KIND_SYMLINK, 0))? {
            Some(t) => Ok(t),
            None => {
                let plan = self.read_plan(layer, ino, 0, i.size as usize)?;
                self.read_now(plan)
            }
        }
    }

    // ------------------------------------------------------------ creation

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn make_node(
        &mut self,
        layer: u64,
        dir: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
        symlink: Option<&[u8]>,
    ) -> Result<Attr> {
        self.writable_layer(layer)?;
        check_name(name)?;
        let kind =
            FileKind::from_mode(mode).ok_or_else(|| Error::Invalid("bad file type".into()))?;
        let mut parent = self.dir_inode(layer, dir)?;
        if parent.nlink == 0 {
            return Err(Error::NotFound);
        }
        if self.dirent_get(layer, dir, name)?.is_some() {
            return Err(Error::Exists);
        }
        if let Some(t) = symlink {
            if t.is_empty() || t.len() >= 4096 {
                return Err(if t.is_empty() {
                    Error::NotFound
                } else {
                    Error::NameTooLong
                });
            }
        }
        let extra = symlink.map_or(0, |t| if t.len() > INLINE_SYMLINK_MAX { 1 } else { 0 });
        self.ensure_space(extra, false)?;
        let now = Timestamp::now();
        let l = self.layers.get_mut(layer).expect("checked");
        let ino = l.next_inode;
        l.next_inode += 1;
        l.inode_count += 1;
        self.mark_layer_dirty(layer);
        let mut gid = gid;
        let mut mode = mode;
        if parent.mode & S_ISGID != 0 {
            gid = parent.gid;
            if kind == FileKind::Directory {
                mode |= S_ISGID;
            }
        }
        let mut inode = InodeValue {
            mode,
            uid,
            gid,
            nlink: if kind == FileKind::Directory { 2 } else { 1 },
            size: 0,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            rdev: if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) {
                rdev
            } else {
                0
            },
            // Directories: the parent. Other files: the directory of their
            // first name (kept through renames), to name them in layer diffs.
            parent: dir,
            generation: self.generation,
        };
        if let Some(t) = symlink {
            inode.size = t.len() as u64;
        }
        self.put_inode(layer, ino, &inode)?;
        if let Some(t) = symlink {
            if t.len() <= INLINE_SYMLINK_MAX {
                self.lput(layer, Key::new(ino, KIND_SYMLINK, 0), t.to_vec())?;
            } else {
                let i = self.inode(layer, ino)?;
                self.write_data((layer, ino, i), 0, t, false, &[])?;
            }
        }
        self.dirent_put(layer, dir, name, ino, kind)?;
        if kind == FileKind::Directory {
            parent.nlink += 1;
        }
        parent.mtime = now;
        parent.ctime = now;
        self.put_inode(layer, dir, &parent)?;
        self.bump();
        self.getattr(layer, ino)
    }

    pub(crate) fn link(&mut self, layer: u64, ino: u64, dir: u64, name: &[u8]) -> Result<Attr> {
        self.writable_layer(layer)?;
        check_name(name)?;
        let mut i = self.inode(layer, ino)?;
        if is_dir(&i) {
            return Err(Error::NotPermitted);
        }
        if i.nlink >= LINK_MAX {
            return Err(Error::TooManyLinks);
        }
        let mut parent = self.dir_inode(layer, dir)?;
        if parent.nlink == 0 {
            return Err(Error::NotFound);
        }
        if self.dirent_get(layer, dir, name)?.is_some() {
            return Err(Error::Exists);
        }
        self.ensure_space(0, false)?;
        let now = Timestamp::now();
        let kind = FileKind::from_mode(i.mode).ok_or_else(|| Error::corrupt(0, "bad mode"))?;
        self.dirent_put(layer, dir, name, ino, kind)?;
        i.nlink += 1;
        i.ctime = now;
        self.put_inode(layer, ino, &i)?;
        parent.mtime = now;
        parent.ctime = now;
        self.put_inode(layer, dir, &parent)?;
        if self.layers.remove_orphan(layer, ino) {
            self.ldel(layer, Key::new(0, KIND_ORPHAN, ino))?;
        }
        self.bump();
        attr_of(ino, &i)
    }

    // ------------------------------------------------------------ removal

    /// Drops one link; deletes the inode when none remain and it is not open.
    fn drop_link(&mut self, layer: u64, ino: u64, now: Timestamp) -> Result<()> {
        let mut i = self.inode(layer, ino)?;
        if is_dir(&i) {
            i.nlink = 0;
        } else {
            i.nlink = i.nlink.saturating_sub(1);
        }
        i.ctime = now;
        if i.nlink > 0 {
            return self.put_inode(layer, ino, &i);
        }
        if self.layers.is_open(layer, ino) {
            self.put_inode(layer, ino, &i)?;
            self.layers.add_orphan(layer, ino);
            self.lput(layer, Key::new(0, KIND_ORPHAN, ino), Vec::new())?;
            return Ok(());
        }
        self.delete_inode(layer, ino)
    }

    pub(crate) fn delete_inode(&mut self, layer: u64, ino: u64) -> Result<()> {
        let mut keys = Vec::new();
        self.lscan(
            layer,
            Key::new(ino, 0, 0),
            Key::new(ino, u8::MAX, u64::MAX),
            &mut |k, v| {
                keys.push((*k, (k.kind == KIND_EXTENT).then(|| v.to_vec())));
                true
            },
        )?;
        for (k, v) in keys {
            if let Some(v) = v {
                let e = ExtentValue::decode(&v)?;
                if e.birth_layer == layer {
                    self.free_lbn(e.lbn)?;
                    self.charge_layer(layer, -1);
                }
            }
            self.ldel(layer, k)?;
        }
        let l = self.layers.get_mut(layer).expect("exists");
        l.inode_count = l.inode_count.saturating_sub(1);
        self.mark_layer_dirty(layer);
        Ok(())
    }

    pub(crate) fn unlink(
        &mut self,
        layer: u64,
        dir: u64,
        name: &[u8],
        want_dir: bool,
    ) -> Result<()> {
        self.writable_layer(layer)?;
        if name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        let mut parent = self.dir_inode(layer, dir)?;
        let (ino, kind) = self.dirent_get(layer, dir, name)?.ok_or(Error::NotFound)?;
        if want_dir {
            if kind != FileKind::Directory {
                return Err(Error::NotDirectory);
            }
            if !self.dir_is_empty(layer, ino)? {
                return Err(Error::NotEmpty);
            }
        } else if kind == FileKind::Directory {
            return Err(Error::IsDirectory);
        }
        self.ensure_space(0, true)?;
        let now = Timestamp::now();
        self.dirent_del(layer, dir, name)?;
        self.drop_link(layer, ino, now)?;
        if want_dir {
            parent.nlink -= 1;
        }
        parent.mtime = now;
        parent.ctime = now;
        self.put_inode(layer, dir, &parent)?;
        self.bump();
        Ok(())
    }

    /// True when `dir` is `ancestor` or lies below it.
    fn is_below(&mut self, layer: u64, mut dir: u64, ancestor: u64) -> Result<bool> {
        for _ in 0..100_000 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INODE {
                return Ok(false);
            }
            dir = self.inode(layer, dir)?.parent;
        }
        Err(Error::corrupt(
            0,
            "directory parent chain does not reach the root",
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rename(
        &mut self,
        layer: u64,
        from_dir: u64,
        from: &[u8],
        to_dir: u64,
        to: &[u8],
        flags: u32,
    ) -> Result<()> {
        self.writable_layer(layer)?;
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
            || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
        {
            return Err(Error::Invalid("bad rename flags".into()));
        }
        if from.len() > NAME_MAX || to.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        check_name(to)?;
        self.dir_inode(layer, from_dir)?;
        self.dir_inode(layer, to_dir)?;
        let (src, src_kind) = self
            .dirent_get(layer, from_dir, from)?
            .ok_or(Error::NotFound)?;
        let dst = self.dirent_get(layer, to_dir, to)?;
        self.ensure_space(0, true)?;
        let now = Timestamp::now();
        let src_dir = src_kind == FileKind::Directory;
        if flags & RENAME_EXCHANGE != 0 {
            let (dino, dkind) = dst.ok_or(Error::NotFound)?;
            let dst_dir = dkind == FileKind::Directory;
            if src_dir && from_dir != to_dir && self.is_below(layer, to_dir, src)? {
                return Err(Error::Invalid(
                    "cannot move a directory below itself".into(),
                ));
            }
            if dst_dir && from_dir != to_dir && self.is_below(layer, from_dir, dino)? {
                return Err(Error::Invalid(
                    "cannot move a directory below itself".into(),
                ));
            }
            self.dirent_put(layer, from_dir, from, dino, dkind)?;
            self.dirent_put(layer, to_dir, to, src, src_kind)?;
            for (ino, new_parent, is_d) in [(src, to_dir, src_dir), (dino, from_dir, dst_dir)] {
                let mut i = self.inode(layer, ino)?;
                i.ctime = now;
                let _ = is_d;
                i.parent = new_parent;
                self.put_inode(layer, ino, &i)?;
            }
            if src_dir != dst_dir && from_dir != to_dir {
                let (gain, lose) = if src_dir {
                    (to_dir, from_dir)
                } else {
                    (from_dir, to_dir)
                };
                let mut g = self.inode(layer, gain)?;
                g.nlink += 1;
                self.put_inode(layer, gain, &g)?;
                let mut l = self.inode(layer, lose)?;
                l.nlink -= 1;
                self.put_inode(layer, lose, &l)?;
            }
            self.touch_dirs(layer, from_dir, to_dir, now)?;
            self.bump();
            return Ok(());
        }
        if let Some((dino, dkind)) = dst {
            if flags & RENAME_NOREPLACE != 0 {
                return Err(Error::Exists);
            }
            if dino == src {
                return Ok(()); // two links to one file: nothing to do
            }
            let dst_dir = dkind == FileKind::Directory;
            if src_dir && !dst_dir {
                return Err(Error::NotDirectory);
            }
            if !src_dir && dst_dir {
                return Err(Error::IsDirectory);
            }
            if dst_dir && !self.dir_is_empty(layer, dino)? {
                return Err(Error::NotEmpty);
            }
        }
        if src_dir && from_dir != to_dir && self.is_below(layer, to_dir, src)? {
            return Err(Error::Invalid(
                "cannot move a directory below itself".into(),
            ));
        }
        if let Some((dino, dkind)) = dst {
            self.drop_link(layer, dino, now)?;
            if dkind == FileKind::Directory {
                let mut t = self.inode(layer, to_dir)?;
                t.nlink -= 1;
                self.put_inode(layer, to_dir, &t)?;
            }
        }
        self.dirent_del(layer, from_dir, from)?;
        self.dirent_put(layer, to_dir, to, src, src_kind)?;
        let mut i = self.inode(layer, src)?;
        i.ctime = now;
        if !src_dir {
            i.parent = to_dir;
        }
        if src_dir && from_dir != to_dir {
            i.parent = to_dir;
            let mut f = self.inode(layer, from_dir)?;
            f.nlink -= 1;
            self.put_inode(layer, from_dir, &f)?;
            let mut t = self.inode(layer, to_dir)?;
            t.nlink += 1;
            self.put_inode(layer, to_dir, &t)?;
        }
        self.put_inode(layer, src, &i)?;
        self.touch_dirs(layer, from_dir, to_dir, now)?;
        self.bump();
        Ok(())
    }

    fn touch_dirs(&mut self, layer: u64, a: u64, b: u64, now: Timestamp) -> Result<()> {
        for d in if a == b { vec![a] } else { vec![a, b] } {
            let mut i = self.inode(layer, d)?;
            i.mtime = now;
            i.ctime = now;
            self.put_inode(layer, d, &i)?;
        }
        Ok(())
    }

    // ------------------------------------------------------------ attributes

    pub(crate) fn setattr(&mut self, layer: u64, ino: u64, s: &SetAttr) -> Result<Attr> {
        FsyncLog::scoped(self, layer, ino, |st| st.setattr_tracked(layer, ino, s))
    }

    fn setattr_tracked(&mut self, layer: u64, ino: u64, s: &SetAttr) -> Result<Attr> {
        self.writable_layer(layer)?;
        let mut i = self.inode(layer, ino)?;
        let bs = BLOCK_SIZE as u64;
        if let Some(size) = s.size.filter(|&n| n < i.size && n % bs != 0) {
            self.no_absent_among(layer, ino, &[size / bs])?;
        }
        self.ensure_space(0, s.size.is_some_and(|n| n < i.size))?;
        let now = Timestamp::now();
        if let Some(m) = s.mode {
            i.mode = (i.mode & S_IFMT) | (m & 0o7777);
        }
        if let Some(u) = s.uid {
            i.uid = u;
        }
        if let Some(g) = s.gid {
            i.gid = g;
        }
        if let Some(size) = s.size {
            match FileKind::from_mode(i.mode) {
                Some(FileKind::File) => {}
                Some(FileKind::Directory) => return Err(Error::IsDirectory),
                _ => return Err(Error::Invalid("size of a special file".into())),
            }
            if size > MAX_FILE_BYTES {
                return Err(Error::FileTooLarge);
            }
            self.put_inode(layer, ino, &i)?;
            self.truncate(layer, ino, size)?;
            if size < i.size {
                self.fsync_log.truncated(layer, ino, size);
            }
            i = self.inode(layer, ino)?;
            i.mtime = now;
        }
        match s.atime {
            Some(TimeSet::Now) => i.atime = now,
            Some(TimeSet::At(t)) => i.atime = t,
            None => {}
        }
        match s.mtime {
            Some(TimeSet::Now) => i.mtime = now,
            Some(TimeSet::At(t)) => i.mtime = t,
            None => {}
        }
        i.ctime = s.ctime.unwrap_or(now);
        self.put_inode(layer, ino, &i)?;
        self.bump();
        attr_of(ino, &i)
    }

    /// [`Error::Absent`] when one of `blocks` of the file is absent: for
    /// a change that zeroes part of a block, asked before it changes
    /// anything (its caller fetches and tries again; failing halfway would
    /// stop the engine).
    fn no_absent_among(&mut self, layer: u64, ino: u64, blocks: &[u64]) -> Result<()> {
        for &b in blocks {
            if let Some(v) = self.lget(layer, Key::new(ino, KIND_EXTENT, b))? {
                self.block_source(ExtentValue::decode(&v)?.lbn)?;
            }
        }
        Ok(())
    }

    /// Sets the size; frees whole blocks past it and zeroes the tail of the last.
    fn truncate(&mut self, layer: u64, ino: u64, size: u64) -> Result<()> {
        let i = self.inode(layer, ino)?;
        if size < i.size {
            let bs = BLOCK_SIZE as u64;
            if size % bs != 0 {
                self.no_absent_among(layer, ino, &[size / bs])?;
            }
            let keep_blocks = size.div_ceil(bs);
            self.drop_extents(layer, ino, keep_blocks, u64::MAX)?;
            if size % bs != 0 {
                self.zero_in_block(layer, ino, size / bs, (size % bs) as usize, BLOCK_SIZE)?;
            }
        }
        let mut i = self.inode(layer, ino)?;
        i.size = size;
        self.put_inode(layer, ino, &i)
    }

    /// Removes extents for blocks [first, last).
    fn drop_extents(&mut self, layer: u64, ino: u64, first: u64, last: u64) -> Result<()> {
        if first >= last {
            return Ok(());
        }
        let mut found = Vec::new();
        self.lscan(
            layer,
            Key::new(ino, KIND_EXTENT, first),
            Key::new(ino, KIND_EXTENT, last - 1),
            &mut |k, v| {
                found.push((*k, v.to_vec()));
                true
            },
        )?;
        let n = found.len() as u64;
        for (k, v) in found {
            let e = ExtentValue::decode(&v)?;
            if e.birth_layer == layer {
                self.free_lbn(e.lbn)?;
                self.charge_layer(layer, -1);
            }
            self.ldel(layer, k)?;
        }
        if n > 0 {
            let mut i = self.inode(layer, ino)?;
            i.blocks = i.blocks.saturating_sub(n);
            self.put_inode(layer, ino, &i)?;
        }
        Ok(())
    }

    /// Zeroes bytes [from, to) of file block `block` if it exists.
    fn zero_in_block(
        &mut self,
        layer: u64,
        ino: u64,
        block: u64,
        from: usize,
        to: usize,
    ) -> Result<()> {
        if self
            .lget(layer, Key::new(ino, KIND_EXTENT, block))?
            .is_none()
        {
            return Ok(());
        }
        let zeros = vec![0u8; to - from];
        let added = self.write_blocks(
            layer,
            ino,
            block * BLOCK_SIZE as u64 + from as u64,
            &zeros,
            &[],
        )?;
        debug_assert_eq!(added, 0, "the block existed");
        Ok(())
    }

    pub(crate) fn fallocate(
        &mut self,
        layer: u64,
        ino: u64,
        mode: u32,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        self.writable_layer(layer)?;
        let i = self.inode(layer, ino)?;
        if FileKind::from_mode(i.mode) != Some(FileKind::File) {
            return Err(if is_dir(&i) {
                Error::IsDirectory
            } else {
                Error::Invalid("not a regular file".into())
            });
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= MAX_FILE_BYTES)
            .ok_or(Error::FileTooLarge)?;
        if len == 0 {
            return Err(Error::Invalid("zero length".into()));
        }
        let supported = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
        if mode & !supported != 0 {
            return Err(Error::Unsupported(format!("fallocate mode {mode:#x}")));
        }
        if mode & FALLOC_FL_PUNCH_HOLE != 0 && mode & FALLOC_FL_KEEP_SIZE == 0 {
            return Err(Error::Unsupported("punch hole without keep size".into()));
        }
        let now = Timestamp::now();
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 {
            let bs = BLOCK_SIZE as u64;
            let zero_end = end.min(i.size);
            if offset < zero_end {
                self.no_absent_among(layer, ino, &[offset / bs, zero_end / bs])?;
            }
            self.ensure_space(2, true)?;
            if offset < zero_end {
                let first_full = offset.div_ceil(bs);
                let last_full = zero_end / bs;
                if first_full < last_full {
                    self.drop_extents(layer, ino, first_full, last_full)?;
                    if offset % bs != 0 {
                        self.zero_in_block(
                            layer,
                            ino,
                            offset / bs,
                            (offset % bs) as usize,
                            BLOCK_SIZE,
                        )?;
                    }
                    if zero_end % bs != 0 {
                        self.zero_in_block(layer, ino, zero_end / bs, 0, (zero_end % bs) as usize)?;
                    }
                } else {
                    // Inside one or two blocks.
                    let mut at = offset;
                    while at < zero_end {
                        let b = at / bs;
                        let to = zero_end.min((b + 1) * bs);
                        self.zero_in_block(
                            layer,
                            ino,
                            b,
                            (at % bs) as usize,
                            (to - b * bs) as usize,
                        )?;
                        at = to;
                    }
                }
            }
        } else {
            // A log-structured store cannot reserve blocks in place; check the
            // space is there now, and extend the size.
            let blocks = len.div_ceil(BLOCK_SIZE as u64);
            self.check_quota(layer, ino, offset, len)?;
            self.ensure_space(blocks, false)?;
        }
        let mut i = self.inode(layer, ino)?;
        if mode & FALLOC_FL_KEEP_SIZE == 0 && end > i.size {
            i.size = end;
        }
        i.ctime = now;
        i.mtime = now;
        self.put_inode(layer, ino, &i)?;
        self.bump();
        Ok(())
    }

    // ------------------------------------------------------------ data

    /// Public write entry: checks, space, then the block loop. `touch` sets
    /// mtime and ctime to now.
    pub(crate) fn write(
        &mut self,
        layer: u64,
        ino: u64,
        offset: u64,
        data: &[u8],
        touch: bool,
        known: &[KnownBlock],
    ) -> Result<usize> {
        self.writable_layer(layer)?;
        let i = self.inode(layer, ino)?;
        match FileKind::from_mode(i.mode) {
            Some(FileKind::File) => {}
            Some(FileKind::Directory) => return Err(Error::IsDirectory),
            _ => return Err(Error::Invalid("not a regular file".into())),
        }
        self.check_quota(layer, ino, offset, data.len() as u64)?;
        FsyncLog::scoped(self, layer, ino, |s| {
            s.write_data((layer, ino, i), offset, data, touch, known)
        })?;
        Ok(data.len())
    }

    /// Where the partial blocks at the edges of a write of `len` bytes at
    /// `offset` are on the device, if any are (holes and blocks still in
    /// the log buffer need no read). The caller reads them without the
    /// lock and hands them to [`Store::write`] as [`KnownBlock`]s.
    pub(crate) fn partial_blocks_on_device(
        &mut self,
        layer: u64,
        ino: u64,
        offset: u64,
        len: usize,
    ) -> Result<Option<ReadPlan>> {
        let bs = BLOCK_SIZE as u64;
        let Some(end) = offset.checked_add(len as u64).filter(|_| len > 0) else {
            return Ok(None);
        };
        let (first, last) = (offset / bs, (end - 1) / bs);
        let mut edges = Vec::new();
        if offset % bs != 0 || (first == last && end % bs != 0) {
            edges.push(first);
        }
        if end % bs != 0 && last != first {
            edges.push(last);
        }
        let mut blocks = Vec::new();
        for b in edges {
            if let Some(v) = self.lget(layer, Key::new(ino, KIND_EXTENT, b))? {
                let e = ExtentValue::decode(&v)?;
                if let src @ BlockSource::Device { .. } = self.block_source(e.lbn)? {
                    blocks.push(src);
                }
            }
        }
        Ok((!blocks.is_empty()).then(|| ReadPlan {
            skip: 0,
            len: blocks.len() * BLOCK_SIZE,
            blocks,
        }))
    }

    /// Writes data and updates the inode `i` (read by the caller) once.
    /// `touch`: set mtime and ctime; `known`: see [`Store::write_blocks`].
    fn write_data(
        &mut self,
        (layer, ino, mut i): (u64, u64, InodeValue),
        offset: u64,
        data: &[u8],
        touch: bool,
        known: &[KnownBlock],
    ) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= MAX_FILE_BYTES)
            .ok_or(Error::FileTooLarge)?;
        let bs = BLOCK_SIZE as u64;
        let blocks = end.div_ceil(bs) - offset / bs;
        self.ensure_space(blocks, false)?;
        i.blocks += self.write_blocks(layer, ino, offset, data, known)?;
        self.fsync_log
            .wrote(layer, ino, offset / bs, (end - 1) / bs);
        if end > i.size {
            i.size = end;
        }
        if touch {
            let now = Timestamp::now();
            i.mtime = now;
            i.ctime = now;
        }
        self.put_inode(layer, ino, &i)?;
        self.counters.user_write_bytes += data.len() as u64;
        self.counters.user_write_calls += 1;
        self.bump();
        Ok(())
    }

    /// Writes bytes into file blocks (read-modify-write at the edges). Does not
    /// change the size. Space must have been ensured by the caller. The map
    /// and extent updates of the whole call go in as sorted runs.
    /// Returns how many blocks were added (were holes before).
    /// A partial block's current bytes in `known` (read before the lock was
    /// taken) stand in for a device read when the block is still there.
    fn write_blocks(
        &mut self,
        layer: u64,
        ino: u64,
        offset: u64,
        data: &[u8],
        known: &[KnownBlock],
    ) -> Result<u64> {
        let bs = BLOCK_SIZE as u64;
        let temp = self.temperature(layer);
        let mut buf = crate::device::AlignedBuf::new(BLOCK_SIZE);
        let mut pos = 0usize;
        let mut added_blocks = 0u64;
        // One scan finds every existing block the write covers.
        let first = offset / bs;
        let last = (offset + data.len() as u64 - 1) / bs;
        let mut existing = Vec::new();
        self.lscan(
            layer,
            Key::new(ino, KIND_EXTENT, first),
            Key::new(ino, KIND_EXTENT, last),
            &mut |k, v| {
                existing.push((k.offset, v.to_vec()));
                true
            },
        )?;
        let mut existing = existing.into_iter().peekable();
        let blocks = (last - first + 1) as usize;
        let mut map_items = Vec::with_capacity(blocks);
        let mut extent_items = Vec::with_capacity(blocks);
        while pos < data.len() {
            let at = offset + pos as u64;
            let block = at / bs;
            let in_block = (at % bs) as usize;
            let n = (BLOCK_SIZE - in_block).min(data.len() - pos);
            let old = match existing.next_if(|(b, _)| *b == block) {
                Some((_, v)) => Some(ExtentValue::decode(&v)?),
                None => None,
            };
            // Whole blocks go from the caller's data straight into the log
            // buffer; partial ones are merged with what is there first.
            let block_data: &[u8] = if n == BLOCK_SIZE {
                &data[pos..pos + n]
            } else {
                match old {
                    Some(e) => {
                        let src = self.block_source(e.lbn)?;
                        match known.iter().find(|k| k.is(&src)) {
                            Some(k) => buf.copy_from_slice(&k.bytes),
                            None => {
                                let plan = ReadPlan {
                                    skip: 0,
                                    len: BLOCK_SIZE,
                                    blocks: vec![src],
                                };
                                let cur = self.read_now(plan)?;
                                buf.copy_from_slice(&cur);
                            }
                        }
                    }
                    None => buf.fill(0),
                }
                buf[in_block..in_block + n].copy_from_slice(&data[pos..pos + n]);
                &buf
            };
            let csum = data_checksum(block_data);
            let lbn = match old {
                // Our own block keeps its logical number and moves in the map.
                Some(e) if e.birth_layer == layer && !e.shared => e.lbn,
                _ => {
                    let lbn = self.alloc_lbn();
                    extent_items.push((
                        Key::new(ino, KIND_EXTENT, block),
                        ExtentValue {
                            lbn,
                            birth_layer: layer,
                            shared: false,
                        }
                        .encode(),
                    ));
                    match old {
                        // A block we own with other layers: copy on write,
                        // and drop our hold on the old one.
                        Some(e) if e.birth_layer == layer => self.free_lbn(e.lbn)?,
                        _ => self.charge_layer(layer, 1),
                    }
                    if old.is_none() {
                        added_blocks += 1;
                    }
                    lbn
                }
            };
            let phys = self.append(temp, BlockTag::Logical(lbn), block_data, csum)?;
            map_items.push((
                lbn,
                MapValue {
                    physical_block: phys,
                    checksum: csum,
                    extra_owners: 0,
                },
            ));
            pos += n;
        }
        self.map_set_many(map_items)?;
        if !extent_items.is_empty() {
            let mut root = self.layer(layer)?.root;
            let r = self.insert_sorted(Tree::Layer(layer), &mut root, extent_items);
            self.set_root(layer, root);
            r?;
        }
        Ok(added_blocks)
    }

    /// Fsync log replay: truncation as a setattr does it.
    pub(crate) fn replay_truncate(&mut self, layer: u64, ino: u64, size: u64) -> Result<()> {
        self.truncate(layer, ino, size)
    }

    /// Fsync log replay: one whole block at `offset`; returns whether it
    /// was a hole.
    pub(crate) fn replay_block(
        &mut self,
        layer: u64,
        ino: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<u64> {
        self.write_blocks(layer, ino, offset, data, &[])
    }

    /// Fsync log replay: blocks from `first` on go.
    pub(crate) fn replay_drop_past(&mut self, layer: u64, ino: u64, first: u64) -> Result<()> {
        self.drop_extents(layer, ino, first, u64::MAX)
    }

    fn block_source(&mut self, lbn: u64) -> Result<BlockSource> {
        let m = self
            .map_get(lbn)?
            .ok_or_else(|| Error::corrupt(0, format!("file block {lbn} has no address")))?;
        if m.physical_block == crate::absent::ABSENT {
            return Err(Error::Absent(lbn));
        }
        if let Some(d) = self.buffered_block(m.physical_block) {
            if data_checksum(d) != m.checksum {
                return Err(Error::corrupt(
                    m.physical_block * BLOCK_SIZE as u64,
                    "buffered block checksum mismatch",
                ));
            }
            return Ok(BlockSource::Buffered(d.to_vec()));
        }
        Ok(BlockSource::Device {
            physical_block: m.physical_block,
            checksum: m.checksum,
        })
    }

    /// Resolves a read to block sources (under the lock).
    pub(crate) fn read_plan(
        &mut self,
        layer: u64,
        ino: u64,
        offset: u64,
        len: usize,
    ) -> Result<ReadPlan> {
        let i = self.inode(layer, ino)?;
        if is_dir(&i) {
            return Err(Error::IsDirectory);
        }
        if offset >= i.size || len == 0 {
            return Ok(ReadPlan {
                skip: 0,
                len: 0,
                blocks: Vec::new(),
            });
        }
        let len = (len as u64).min(i.size - offset) as usize;
        let bs = BLOCK_SIZE as u64;
        let first = offset / bs;
        let last = (offset + len as u64 - 1) / bs;
        let mut extents = Vec::new();
        self.lscan(
            layer,
            Key::new(ino, KIND_EXTENT, first),
            Key::new(ino, KIND_EXTENT, last),
            &mut |k, v| {
                extents.push((k.offset, v.to_vec()));
                true
            },
        )?;
        let mut blocks = Vec::with_capacity((last - first + 1) as usize);
        let mut it = extents.into_iter().peekable();
        for b in first..=last {
            match it.peek() {
                Some((kb, _)) if *kb == b => {
                    let (_, v) = it.next().expect("peeked");
                    let e = ExtentValue::decode(&v)?;
                    blocks.push(self.block_source(e.lbn)?);
                }
                _ => blocks.push(BlockSource::Hole),
            }
        }
        Ok(ReadPlan {
            skip: (offset % bs) as usize,
            len,
            blocks,
        })
    }

    /// Executes a plan synchronously (used under the lock for small reads).
    pub(crate) fn read_now(&self, plan: ReadPlan) -> Result<Vec<u8>> {
        crate::read::execute_plan(&*self.dev, &self.blocks, plan)
    }

    // ------------------------------------------------------------ xattrs

    fn xattr_list_at(&mut self, layer: u64, ino: u64, h: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        match self.lget(layer, Key::new(ino, KIND_XATTR, h))? {
            Some(v) => decode_named(&v),
            None => Ok(Vec::new()),
        }
    }

    pub(crate) fn getxattr(&mut self, layer: u64, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        self.inode(layer, ino)?;
        let list = self.xattr_list_at(layer, ino, name_hash(name))?;
        list.into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or(Error::NoAttribute)
    }

    pub(crate) fn setxattr(
        &mut self,
        layer: u64,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: u32,
    ) -> Result<()> {
        self.writable_layer(layer)?;
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(Error::Range);
        }
        let mut i = self.inode(layer, ino)?;
        let h = name_hash(name);
        let mut list = self.xattr_list_at(layer, ino, h)?;
        let pos = list.iter().position(|(n, _)| n == name);
        match (pos, flags & (XATTR_CREATE | XATTR_REPLACE)) {
            (Some(_), XATTR_CREATE) => return Err(Error::Exists),
            (None, XATTR_REPLACE) => return Err(Error::NoAttribute),
            _ => {}
        }
        match pos {
            Some(p) => list[p].1 = value.to_vec(),
            None => list.push((name.to_vec(), value.to_vec())),
        }
        let enc = encode_named(&list);
        if enc.len() > MAX_VALUE_BYTES {
            // As on ext4 without large xattr inodes: the value does not fit.
            return Err(Error::NoSpace);
        }
        self.ensure_space(0, false)?;
        self.lput(layer, Key::new(ino, KIND_XATTR, h), enc)?;
        i.ctime = Timestamp::now();
        self.put_inode(layer, ino, &i)?;
        self.bump();
        Ok(())
    }

    pub(crate) fn listxattr(&mut self, layer: u64, ino: u64) -> Result<Vec<Vec<u8>>> {
        self.inode(layer, ino)?;
        let mut out = Vec::new();
        let mut bad = None;
        self.lscan(
            layer,
            Key::new(ino, KIND_XATTR, 0),
            Key::new(ino, KIND_XATTR, u64::MAX),
            &mut |_, v| {
                match decode_named(v) {
                    Ok(l) => out.extend(l.into_iter().map(|(n, _)| n)),
                    Err(e) => bad = Some(e),
                }
                bad.is_none()
            },
        )?;
        match bad {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    pub(crate) fn removexattr(&mut self, layer: u64, ino: u64, name: &[u8]) -> Result<()> {
        self.writable_layer(layer)?;
        let mut i = self.inode(layer, ino)?;
        let h = name_hash(name);
        let mut list = self.xattr_list_at(layer, ino, h)?;
        let before = list.len();
        list.retain(|(n, _)| n != name);
        if list.len() == before {
            return Err(Error::NoAttribute);
        }
        self.ensure_space(0, true)?;
        let key = Key::new(ino, KIND_XATTR, h);
        if list.is_empty() {
            self.ldel(layer, key)?;
        } else {
            self.lput(layer, key, encode_named(&list))?;
        }
        i.ctime = Timestamp::now();
        self.put_inode(layer, ino, &i)?;
        self.bump();
        Ok(())
    }

    // ------------------------------------------------------------ open files

    pub(crate) fn open_inode(&mut self, layer: u64, ino: u64) -> Result<()> {
        self.inode(layer, ino)?;
        self.layers.open(layer, ino);
        Ok(())
    }

    pub(crate) fn release_inode(&mut self, layer: u64, ino: u64) -> Result<()> {
        if !self.layers.close(layer, ino) {
            return Ok(());
        }
        if self.layers.remove_orphan(layer, ino)
            && self.layers.get(layer).is_some_and(|l| !l.frozen)
        {
            self.ldel(layer, Key::new(0, KIND_ORPHAN, ino))?;
            self.delete_inode(layer, ino)?;
            self.bump();
        }
        Ok(())
    }

    /// Deletes inodes left unlinked-but-open by a previous run.
    pub(crate) fn purge_orphans(&mut self) -> Result<()> {
        let ids: Vec<u64> = self
            .layers
            .records()
            .filter(|l| !l.frozen)
            .map(|l| l.id)
            .collect();
        for layer in ids {
            let mut found = Vec::new();
            self.lscan(
                layer,
                Key::new(0, KIND_ORPHAN, 0),
                Key::new(0, KIND_ORPHAN, u64::MAX),
                &mut |k, _| {
                    found.push(k.offset);
                    true
                },
            )?;
            for ino in found {
                self.ldel(layer, Key::new(0, KIND_ORPHAN, ino))?;
                if self.inode(layer, ino).is_ok() {
                    self.delete_inode(layer, ino)?;
                }
                self.bump();
            }
        }
        Ok(())
    }

    pub(crate) fn statfs(&mut self, layer: u64) -> Result<StatFs> {
        let l = self.layer(layer)?;
        let total = self.geo.segment_count as u64 * self.geo.segment_blocks as u64;
        let used = self.live_blocks_total();
        let free = total.saturating_sub(used);
        let avail = free.saturating_sub(self.reserve_blocks());
        Ok(StatFs {
            block_size: BLOCK_SIZE as u32,
            blocks: total,
            blocks_free: free,
            blocks_available: avail,
            files: l.inode_count + avail,
            files_free: avail,
            name_max: NAME_MAX as u32,
        })
    }

    /// Runs `f` on a layer-tree node (loading it through the map).
    pub(crate) fn with_layer_node(
        &mut self,
        layer: u64,
        id: u64,
        f: &mut dyn FnMut(&NodeImage),
    ) -> Result<()> {
        let n = self.node(Tree::Layer(layer), id, 0)?;
        f(n);
        Ok(())
    }
}
