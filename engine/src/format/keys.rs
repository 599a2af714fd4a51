//! The keys of every tree, their kinds, and the codecs of the values that
//! several modules read: hashed name lists (directory entries, xattrs) and
//! directory entries. One place says what each key kind holds:
//!
//! | kind | object | offset | value |
//! |---|---|---|---|
//! | INODE | inode | 0 | [`InodeValue`] |
//! | DIRENT | directory inode | name hash | named list of [`encode_dirent`] |
//! | XATTR | inode | name hash | named list of attribute values |
//! | EXTENT | inode | file block | [`ExtentValue`] |
//! | SYMLINK | inode | 0 | the target, when short |
//! | ORPHAN | 0 | inode | empty: unlinked while open |
//! | LAYER | layer id | 0 | [`LayerRecord`] (layer table) |
//! | LAYER_META | layer id | chunk | layer metadata (layer table) |
//! | MAP | logical block | 0 | [`MapValue`] (address map) |

use super::*;

/// A B+tree key: (object, kind, offset-or-hash). Ordered field by field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Key {
    pub object: u64,
    pub kind: u8,
    pub offset: u64,
}

pub const KEY_BYTES: usize = 17;

impl Key {
    pub const MIN: Key = Key {
        object: 0,
        kind: 0,
        offset: 0,
    };
    pub const MAX: Key = Key {
        object: u64::MAX,
        kind: u8::MAX,
        offset: u64::MAX,
    };
    pub const fn new(object: u64, kind: u8, offset: u64) -> Key {
        Key {
            object,
            kind,
            offset,
        }
    }
    pub(crate) fn encode(&self, w: &mut Writer<'_>) {
        w.u64(self.object);
        w.u8(self.kind);
        w.u64(self.offset);
    }
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Key> {
        Ok(Key {
            object: r.u64()?,
            kind: r.u8()?,
            offset: r.u64()?,
        })
    }
}

/// An inode record.
pub(crate) const KIND_INODE: u8 = 1;
/// Directory entries whose names share one hash.
pub(crate) const KIND_DIRENT: u8 = 2;
/// Extended attributes whose names share one hash.
pub(crate) const KIND_XATTR: u8 = 3;
/// One file block's extent.
pub(crate) const KIND_EXTENT: u8 = 4;
/// A short symlink target.
pub(crate) const KIND_SYMLINK: u8 = 5;
/// An inode unlinked while open, to reclaim at the next open of the store.
pub(crate) const KIND_ORPHAN: u8 = 6;
/// A layer record, in the layer table.
pub(crate) const KIND_LAYER: u8 = 0x10;
/// A chunk of a layer's metadata, in the layer table.
pub(crate) const KIND_LAYER_META: u8 = 0x11;
/// A layer's hot-file summary, in the layer table.
pub(crate) const KIND_HOT_FILES: u8 = 0x12;
/// Part of the list of tree nodes left to free of a layer being removed,
/// in the layer table: `object` is the removed layer's id, `offset` the
/// chunk's index (see engine/src/removal.rs).
pub(crate) const KIND_REMOVAL: u8 = 0x13;
/// An address-map entry.
pub(crate) const KIND_MAP: u8 = 0x20;
/// In a layer's seal tree (engine/src/seal.rs): the seal's header, at
/// object 0, written last.
pub(crate) const KIND_SEAL_HEAD: u8 = 0x30;
/// In a seal tree: a chunk of the layer's manifest, object 0, `offset` the
/// chunk's index.
pub(crate) const KIND_SEAL_MANIFEST: u8 = 0x31;
/// In a seal tree: a file's digest, size and path, `object` its inode.
pub(crate) const KIND_SEAL_FILE: u8 = 0x32;
/// In a seal tree: a run of a file's block hashes, `object` its inode,
/// `offset` the run's index.
pub(crate) const KIND_SEAL_HASHES: u8 = 0x33;

/// Encodes a list of (name, payload) pairs (directory entries or xattrs that
/// share one hash key).
pub fn encode_named(items: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(items.len() as u16).to_le_bytes());
    for (name, payload) in items {
        v.extend_from_slice(&(name.len() as u16).to_le_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        v.extend_from_slice(payload);
    }
    v
}

pub fn decode_named(b: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut r = Reader::new(b);
    let n = r.u16()? as usize;
    let mut out = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let l = r.u16()? as usize;
        let name = r.bytes(l)?.to_vec();
        let l = r.u16()? as usize;
        out.push((name, r.bytes(l)?.to_vec()));
    }
    if r.rest() != 0 {
        return Err(Error::corrupt(0, "trailing bytes after named list"));
    }
    Ok(out)
}

/// Bytes of a directory entry's payload: inode number and file kind code.
const DIRENT_BYTES: usize = 9;

/// A directory entry's payload: the inode and its file kind code.
pub(crate) fn encode_dirent(ino: u64, kind_code: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(DIRENT_BYTES);
    v.extend_from_slice(&ino.to_le_bytes());
    v.push(kind_code);
    v
}

/// Decodes a directory entry's payload into (inode, file kind code).
pub(crate) fn decode_dirent(v: &[u8]) -> Result<(u64, u8)> {
    if v.len() != DIRENT_BYTES {
        return Err(Error::corrupt(0, "bad directory entry"));
    }
    let mut ino = [0u8; 8];
    ino.copy_from_slice(&v[..8]);
    Ok((u64::from_le_bytes(ino), v[8]))
}

/// Decodes one DIRENT value into its (name, inode, file kind code) entries.
pub(crate) fn decode_dirents(v: &[u8]) -> Result<Vec<(Vec<u8>, u64, u8)>> {
    decode_named(v)?
        .into_iter()
        .map(|(name, payload)| decode_dirent(&payload).map(|(ino, kind)| (name, ino, kind)))
        .collect()
}
