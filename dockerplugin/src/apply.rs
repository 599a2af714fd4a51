//! ApplyDiff: unpack a layer tar straight into an engine layer.
//!
//! Follows Docker's `archive.UnpackLayer` (moby v20.10): whiteouts
//! `.wh.<name>` remove `<name>` (which may come from the parent layer),
//! `.wh..wh..opq` empties its directory of everything this tar did not
//! itself unpack, an existing path is replaced unless both old and new are
//! directories, missing parent directories are made 0755, AUFS metadata at
//! the root (`.wh..wh.*`) is skipped, directory attributes are set last.
//! Paths stay inside the layer: see [`crate::tree`].
//!
//! Regular file content is streamed in [`CHUNK_BYTES`] pieces; all-zero
//! 4 KiB blocks are not written (they read back as zeros), which keeps GNU
//! sparse entries, and any other runs of zeros, sparse.

use crate::error::{Error, Result};
use crate::tree::{self, clean, remove_all, resolve_dir, show};
use lcfs_engine::{Engine, FileKind, SetAttr, TimeSet, Timestamp};
use std::collections::HashSet;
use std::io::Read;
use tar::EntryType;

const CHUNK_BYTES: usize = 1 << 20;
const BLOCK_BYTES: usize = 4096;
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// Attributes read from one entry's header and PAX records.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timestamp,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Unpacks `stream` into `layer`. Returns the bytes of file content the tar
/// carried (Docker's ApplyDiff size). On error the layer holds part of the
/// tar: the caller discards it.
///
/// `source`, when given, is a layer whose files may already hold the
/// content (the container a Docker commit just diffed): a regular file at
/// the same path with the same size lends its blocks wherever they hold
/// exactly the incoming bytes, so the content is not written again
/// (see `Engine::share_blocks` and docs/docker.md).
pub(crate) fn apply(
    engine: &Engine,
    layer: u64,
    source: Option<u64>,
    stream: impl Read,
) -> Result<u64> {
    if !engine.streamed_hashes_wanted() {
        return apply_entries(engine, layer, source, stream, None);
    }
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(HASH_QUEUE);
        let hashing = std::thread::Builder::new()
            .name("lcfs-apply-hash".into())
            .spawn_scoped(scope, move || hash_pieces(engine, layer, rx));
        if let Err(e) = &hashing {
            // Sealing reads the files back instead.
            log::warn!("no thread to hash the apply's files for the seal: {e}");
        }
        let hashes = hashing.is_ok().then_some(tx);
        apply_entries(engine, layer, source, stream, hashes.as_ref())
    })
}

/// Pieces of file content queued for the hashing thread, at most (of
/// CHUNK_BYTES each).
const HASH_QUEUE: usize = 8;

/// What the apply sends its hashing thread: a file's content in order,
/// then the file's inode once it is complete.
enum Piece {
    Data(Vec<u8>),
    End(u64),
}

/// Hashes each file's content for the layer's seal (the engine's
/// streamed.rs) on a thread of its own: the apply does not wait for
/// SHA-256, only copies each piece into the queue.
fn hash_pieces(engine: &Engine, layer: u64, pieces: std::sync::mpsc::Receiver<Piece>) {
    let mut hasher = lcfs_engine::StreamHasher::new();
    for piece in pieces {
        match piece {
            Piece::Data(data) => hasher.update(&data),
            Piece::End(ino) => engine.streamed_file(layer, ino, std::mem::take(&mut hasher)),
        }
    }
}

fn apply_entries(
    engine: &Engine,
    layer: u64,
    source: Option<u64>,
    stream: impl Read,
    hashes: Option<&std::sync::mpsc::SyncSender<Piece>>,
) -> Result<u64> {
    let mut archive = tar::Archive::new(stream);
    let mut entries = archive
        .entries()
        .map_err(|e| bad_tar(0, format!("reading the stream: {e}")))?;
    let mut deferred_dirs: Vec<(u64, Meta)> = Vec::new();
    let mut unpacked: HashSet<Vec<u8>> = HashSet::new();
    let mut size = 0u64;
    let mut index = 0u64;
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        index += 1;
        let mut entry = match entries.next() {
            None => break,
            Some(Ok(e)) => e,
            Some(Err(e)) => return Err(bad_tar(index, format!("reading the header: {e}"))),
        };
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader) {
            continue;
        }
        let raw_path = entry_path(&mut entry);
        let components = clean(&raw_path).map_err(|d| bad_tar(index, d))?;
        let meta = read_meta(&mut entry).map_err(|d| bad_tar(index, d))?;
        let Some((name, parents)) = components.split_last() else {
            // The layer root itself: only its attributes can change.
            if kind.is_dir() {
                deferred_dirs.push((lcfs_engine::ROOT_INODE, meta));
            }
            continue;
        };
        if components[0].starts_with(WHITEOUT_META_PREFIX)
            && !(components.len() == 1 && name.as_slice() == WHITEOUT_OPAQUE)
        {
            log::debug!("skipping AUFS metadata entry {}", show(&raw_path));
            continue;
        }
        let dir = resolve_dir(engine, layer, parents, true)?;
        let joined = components.join(&b'/');

        if name.as_slice() == WHITEOUT_OPAQUE {
            let parent_path = parents.join(&b'/');
            make_opaque(engine, layer, dir, &parent_path, &unpacked)?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(bad_tar(index, format!("bad whiteout {}", show(&raw_path))));
            }
            remove_all(engine, layer, dir, hidden)?;
            continue;
        }

        // Resolve a hard link's target before anything at this path goes.
        let link_target = if kind == EntryType::Link {
            let target = entry_link(&mut entry)
                .ok_or_else(|| bad_tar(index, "hard link without a target".into()))?;
            let tc = clean(&target).map_err(|d| bad_tar(index, d))?;
            let Some((tname, tparents)) = tc.split_last() else {
                return Err(bad_tar(index, "hard link to the layer root".into()));
            };
            let tdir = resolve_dir(engine, layer, tparents, false)?;
            let attr = engine
                .lookup(layer, tdir, tname)
                .map_err(|e| Error::engine(format!("hard link target {}", show(&target)), e))?;
            if attr.kind == FileKind::Directory {
                return Err(bad_tar(index, "hard link to a directory".into()));
            }
            Some(attr.inode)
        } else {
            None
        };

        let existing = match engine.lookup(layer, dir, name) {
            Ok(a) => Some(a),
            Err(lcfs_engine::Error::NotFound) => None,
            Err(e) => return Err(Error::engine(format!("looking up {}", show(&joined)), e)),
        };
        let keep_dir =
            kind.is_dir() && existing.as_ref().map(|a| a.kind) == Some(FileKind::Directory);
        if existing.is_some() && !keep_dir && link_target != existing.as_ref().map(|a| a.inode) {
            remove_all(engine, layer, dir, name)?;
        }
        let ctx = |what: &str| format!("{what} {}", show(&joined));
        let ino = match kind {
            EntryType::Directory => match (&existing, keep_dir) {
                (Some(a), true) => a.inode,
                _ => {
                    engine
                        .mkdir(layer, dir, name, meta.mode, meta.uid, meta.gid)
                        .map_err(|e| Error::engine(ctx("creating directory"), e))?
                        .inode
                }
            },
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let ino = engine
                    .create(layer, dir, name, meta.mode, meta.uid, meta.gid)
                    .map_err(|e| Error::engine(ctx("creating file"), e))?
                    .inode;
                let expected = entry.size();
                let lender = match source {
                    Some(src) if expected > 0 => tree::lookup_exact(engine, src, &components)?
                        .filter(|a| a.kind == FileKind::File && a.size == expected)
                        .map(|a| (src, a.inode)),
                    _ => None,
                };
                let written =
                    copy_content(engine, layer, ino, lender, &mut entry, &mut buf, hashes)
                        .map_err(|e| match e {
                            Error::Io { source, .. } => {
                                bad_tar(index, format!("{}: {source}", ctx("reading content of")))
                            }
                            other => other,
                        })?;
                if written != expected {
                    return Err(bad_tar(
                        index,
                        format!(
                            "{} is truncated: {written} of {expected} bytes",
                            show(&joined)
                        ),
                    ));
                }
                size += written;
                ino
            }
            EntryType::Symlink => {
                let target = entry_link(&mut entry)
                    .ok_or_else(|| bad_tar(index, "symlink without a target".into()))?;
                engine
                    .symlink(layer, dir, name, &target, meta.uid, meta.gid)
                    .map_err(|e| Error::engine(ctx("creating symlink"), e))?
                    .inode
            }
            EntryType::Link => {
                let target = link_target.expect("resolved above");
                if existing.as_ref().map(|a| a.inode) != Some(target) {
                    engine
                        .link(layer, target, dir, name)
                        .map_err(|e| Error::engine(ctx("creating hard link"), e))?;
                }
                unpacked.insert(joined);
                continue; // a hard link shares its target's attributes
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let type_bits = match kind {
                    EntryType::Char => lcfs_engine::S_IFCHR,
                    EntryType::Block => lcfs_engine::S_IFBLK,
                    _ => lcfs_engine::S_IFIFO,
                };
                let header = entry.header();
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let rdev = if kind == EntryType::Fifo {
                    0
                } else {
                    libc::makedev(major, minor)
                };
                engine
                    .mknod(
                        layer,
                        dir,
                        name,
                        type_bits | meta.mode,
                        rdev,
                        meta.uid,
                        meta.gid,
                    )
                    .map_err(|e| Error::engine(ctx("creating device node"), e))?
                    .inode
            }
            other => {
                return Err(bad_tar(
                    index,
                    format!(
                        "unsupported entry type {:?} for {}",
                        other.as_byte() as char,
                        show(&joined)
                    ),
                ))
            }
        };
        unpacked.insert(joined.clone());
        set_xattrs(engine, layer, ino, &meta, &joined)?;
        if kind.is_dir() {
            deferred_dirs.push((ino, meta));
        } else {
            set_attrs(engine, layer, ino, &meta, kind != EntryType::Symlink)
                .map_err(|e| Error::engine(ctx("setting attributes of"), e))?;
        }
    }
    // Directories last: unpacking their children changed their mtimes.
    for (ino, meta) in deferred_dirs.iter().rev() {
        match set_attrs(engine, layer, *ino, meta, true) {
            Ok(()) | Err(lcfs_engine::Error::NotFound) => {}
            Err(e) => return Err(Error::engine("setting directory attributes", e)),
        }
    }
    Ok(size)
}

/// Unpacks the layer tar `stream` into the writable engine layer `layer`,
/// with the rules of the module comment (whiteouts, opaque directories,
/// hard links, PAX xattrs, device nodes; every path kept inside the layer).
/// Returns the bytes of file content the tar carried. Stops at the tar's
/// end-of-archive marker: what follows is the caller's to read.
///
/// On error the layer holds part of the tar; the caller discards the layer
/// or keeps it from ever becoming a valid one. This is the applier the
/// containerd differ (lcfs-snapshotter) shares with ApplyDiff.
pub fn apply_tar(engine: &Engine, layer: u64, stream: impl Read) -> Result<u64> {
    apply(engine, layer, None, stream)
}

/// The inode at which [`apply_tar`] put tar path `path` in `layer`: its
/// directories resolved as the apply resolved them (symlinks inside the
/// layer followed), the last component not followed.
pub fn applied_inode(engine: &Engine, layer: u64, path: &[u8]) -> Result<u64> {
    let components =
        clean(path).map_err(|why| Error::engine("a path", lcfs_engine::Error::Invalid(why)))?;
    let Some((name, parents)) = components.split_last() else {
        return Ok(lcfs_engine::ROOT_INODE);
    };
    let dir = resolve_dir(engine, layer, parents, false)?;
    engine
        .lookup(layer, dir, name)
        .map(|a| a.inode)
        .map_err(|e| Error::engine(format!("looking up {}", show(name)), e))
}

/// The layer metadata key holding the SHA-256 of the uncompressed tar
/// applied to an image layer (its DiffID), as `sha256:<hex>`.
pub const DIFF_ID_KEY: &str = "lcfs.diff_id";

/// Reads through `inner`, hashing what it reads (SHA-256).
pub struct Sha256Reader<R> {
    inner: R,
    hash: sha2::Sha256,
}

impl<R: Read> Sha256Reader<R> {
    pub fn new(inner: R) -> Sha256Reader<R> {
        Sha256Reader {
            inner,
            hash: sha2::Digest::new(),
        }
    }

    /// The digest of everything read so far.
    pub fn digest(&self) -> [u8; 32] {
        sha2::Digest::finalize(self.hash.clone()).into()
    }
}

impl<R: Read> Read for Sha256Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        sha2::Digest::update(&mut self.hash, &buf[..n]);
        Ok(n)
    }
}

/// Records `diff_id` (the SHA-256 of the uncompressed tar applied) in layer
/// `name`'s metadata under [`DIFF_ID_KEY`], its other keys kept.
pub fn record_diff_id(engine: &Engine, name: &str, diff_id: &[u8; 32]) -> lcfs_engine::Result<()> {
    let mut m = engine.layer_metadata(name)?;
    m.insert(
        DIFF_ID_KEY.into(),
        lcfs_engine::digest::digest_string(diff_id),
    );
    engine.set_layer_metadata(name, &m)
}

fn bad_tar(entry: u64, detail: String) -> Error {
    Error::BadTar { entry, detail }
}

/// The entry's path as Docker's reader (Go's archive/tar) takes it: an
/// empty GNU long name is ignored there, so the PAX path or the header's
/// own name stands, where the tar crate would take the empty name (and
/// the entry would silently become the layer root).
pub fn entry_path<R: Read>(entry: &mut tar::Entry<'_, R>) -> Vec<u8> {
    let path = entry.path_bytes().into_owned();
    if !path.is_empty() {
        return path;
    }
    pax_value(entry, "path").unwrap_or_else(|| entry.header().path_bytes().into_owned())
}

/// The entry's link target, with an empty GNU long link ignored as
/// [`entry_path`] ignores an empty long name.
pub fn entry_link<R: Read>(entry: &mut tar::Entry<'_, R>) -> Option<Vec<u8>> {
    let link = entry.link_name_bytes()?.into_owned();
    if !link.is_empty() {
        return Some(link);
    }
    pax_value(entry, "linkpath").or_else(|| Some(entry.header().link_name_bytes()?.into_owned()))
}

fn pax_value<R: Read>(entry: &mut tar::Entry<'_, R>, key: &str) -> Option<Vec<u8>> {
    entry
        .pax_extensions()
        .ok()
        .flatten()?
        .filter_map(|r| r.ok())
        .find(|r| r.key() == Ok(key))
        .map(|r| r.value_bytes().to_vec())
}

fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> std::result::Result<Meta, String> {
    let h = entry.header();
    let mode = h.mode().map_err(|e| format!("bad mode: {e}"))? & 0o7777;
    let uid = h.uid().map_err(|e| format!("bad uid: {e}"))?;
    let gid = h.gid().map_err(|e| format!("bad gid: {e}"))?;
    let seconds = h.mtime().map_err(|e| format!("bad mtime: {e}"))?;
    let mut meta = Meta {
        mode,
        uid: u32::try_from(uid).map_err(|_| format!("uid {uid} out of range"))?,
        gid: u32::try_from(gid).map_err(|_| format!("gid {gid} out of range"))?,
        mtime: Timestamp {
            seconds: i64::try_from(seconds).unwrap_or(i64::MAX),
            nanoseconds: 0,
        },
        xattrs: Vec::new(),
    };
    if let Some(pax) = entry
        .pax_extensions()
        .map_err(|e| format!("bad PAX header: {e}"))?
    {
        for record in pax {
            let record = record.map_err(|e| format!("bad PAX record: {e}"))?;
            let key = record.key().map_err(|e| format!("bad PAX key: {e}"))?;
            let value = record.value_bytes();
            if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                meta.xattrs.push((name.as_bytes().to_vec(), value.to_vec()));
                continue;
            }
            let text = std::str::from_utf8(value).unwrap_or("");
            match key {
                "uid" => meta.uid = text.parse().map_err(|_| format!("bad PAX uid {text:?}"))?,
                "gid" => meta.gid = text.parse().map_err(|_| format!("bad PAX gid {text:?}"))?,
                "mtime" => meta.mtime = parse_pax_time(text)?,
                _ => {}
            }
        }
    }
    Ok(meta)
}

/// A PAX time: seconds with an optional fraction ("1700000000.123456789").
fn parse_pax_time(text: &str) -> std::result::Result<Timestamp, String> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let seconds: i64 = whole
        .parse()
        .map_err(|_| format!("bad PAX mtime {text:?}"))?;
    let digits: String = fraction.chars().take(9).collect();
    let mut nanoseconds: u32 = if digits.is_empty() {
        0
    } else {
        digits
            .parse()
            .map_err(|_| format!("bad PAX mtime {text:?}"))?
    };
    for _ in digits.len()..9 {
        nanoseconds *= 10;
    }
    if seconds < 0 && nanoseconds > 0 {
        // "-1.5" is 1.5 s before the epoch: -2 s + 0.5 s.
        return Ok(Timestamp {
            seconds: seconds - 1,
            nanoseconds: 1_000_000_000 - nanoseconds,
        });
    }
    Ok(Timestamp {
        seconds,
        nanoseconds,
    })
}

/// Streams an entry's content into `ino`, leaving all-zero blocks as holes,
/// and sends it to `hashes` on the way (see [`hash_pieces`]).
fn copy_content(
    engine: &Engine,
    layer: u64,
    ino: u64,
    lender: Option<(u64, u64)>,
    from: &mut impl Read,
    buf: &mut [u8],
    hashes: Option<&std::sync::mpsc::SyncSender<Piece>>,
) -> Result<u64> {
    let mut offset = 0u64;
    // A hashing thread gone (it never fails by itself) leaves the file to
    // be read back when sealed.
    let mut hashes = hashes;
    loop {
        // Fill the buffer fully (short reads are normal) so block alignment
        // in the buffer matches block alignment in the file.
        let mut filled = 0;
        while filled < buf.len() {
            match from.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("reading the tar stream", e)),
            }
        }
        if filled == 0 {
            break;
        }
        let data = &buf[..filled];
        if hashes.is_some_and(|h| h.send(Piece::Data(data.to_vec())).is_err()) {
            hashes = None;
        }
        if let Some((src_layer, src_ino)) = lender {
            if try_share_lender_blocks(engine, layer, ino, src_layer, src_ino, offset, data) {
                offset += filled as u64;
                if filled < buf.len() {
                    break;
                }
                continue;
            }
        }
        let mut start = 0;
        while start < data.len() {
            // Skip zero blocks, then write the next run of non-zero ones.
            let end = (start + BLOCK_BYTES).min(data.len());
            if data[start..end].iter().all(|b| *b == 0) {
                start = end;
                continue;
            }
            let mut run_end = end;
            while run_end < data.len() {
                let next = (run_end + BLOCK_BYTES).min(data.len());
                if data[run_end..next].iter().all(|b| *b == 0) {
                    break;
                }
                run_end = next;
            }
            engine
                .write(layer, ino, offset + start as u64, &data[start..run_end])
                .map_err(|e| Error::engine("writing file content", e))?;
            start = run_end;
        }
        offset += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    // Trailing holes still count in the size.
    engine
        .setattr(
            layer,
            ino,
            &SetAttr {
                size: Some(offset),
                ..SetAttr::default()
            },
        )
        .map_err(|e| Error::engine("setting file size", e))?;
    if let Some(h) = hashes {
        let _ = h.send(Piece::End(ino));
    }
    Ok(offset)
}

/// Tries to take `data` (file bytes at `offset`, block aligned) from the
/// lender's blocks. False when they differ or the lender is gone: the
/// caller writes the bytes.
fn try_share_lender_blocks(
    engine: &Engine,
    layer: u64,
    ino: u64,
    src_layer: u64,
    src_ino: u64,
    offset: u64,
    data: &[u8],
) -> bool {
    match engine.share_blocks(layer, ino, src_layer, src_ino, offset, data) {
        Ok(shared) => shared,
        Err(e) => {
            log::debug!("promotion from layer {src_layer} inode {src_ino} failed, writing: {e}");
            false
        }
    }
}

fn set_xattrs(engine: &Engine, layer: u64, ino: u64, meta: &Meta, path: &[u8]) -> Result<()> {
    for (name, value) in &meta.xattrs {
        match engine.setxattr(layer, ino, name, value, 0) {
            Ok(()) => {}
            // As Docker: xattrs the filesystem will not take are skipped.
            Err(lcfs_engine::Error::Unsupported(_)) | Err(lcfs_engine::Error::NotPermitted) => {
                log::warn!(
                    "xattr {} on {} not supported; skipped",
                    show(name),
                    show(path)
                );
            }
            Err(e) => {
                return Err(Error::engine(
                    format!("setting xattr {} on {}", show(name), show(path)),
                    e,
                ))
            }
        }
    }
    Ok(())
}

fn set_attrs(
    engine: &Engine,
    layer: u64,
    ino: u64,
    meta: &Meta,
    with_mode: bool,
) -> lcfs_engine::Result<()> {
    engine
        .setattr(
            layer,
            ino,
            &SetAttr {
                mode: with_mode.then_some(meta.mode),
                uid: Some(meta.uid),
                gid: Some(meta.gid),
                atime: Some(TimeSet::At(meta.mtime)),
                mtime: Some(TimeSet::At(meta.mtime)),
                ..SetAttr::default()
            },
        )
        .map(|_| ())
}

/// Removes from directory `dir` (at `dir_path`) everything below it that
/// this tar did not unpack, descending into kept directories, as Docker's
/// walk does.
fn make_opaque(
    engine: &Engine,
    layer: u64,
    dir: u64,
    dir_path: &[u8],
    unpacked: &HashSet<Vec<u8>>,
) -> Result<()> {
    let mut stack = vec![(dir, dir_path.to_vec())];
    while let Some((ino, path)) = stack.pop() {
        for e in tree::list_dir(engine, layer, ino)? {
            let mut child = path.clone();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(&e.name);
            if !unpacked.contains(&child) {
                remove_all(engine, layer, ino, &e.name)?;
            } else if e.kind == FileKind::Directory {
                stack.push((e.inode, child));
            }
        }
    }
    Ok(())
}
