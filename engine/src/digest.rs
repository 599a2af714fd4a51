//! Content digests of a layer (docs/format.md, "Layer digests"): every
//! regular file's fs-verity digest (SHA-256 over 4 KiB blocks, no salt: the
//! digest `fsverity digest` prints and composefs records), and a layer root
//! over every entry the layer shows, in a fixed order. Neither depends on
//! where blocks lie on the device or on timestamps, so two hosts holding
//! the same content get the same root.

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::fs::{Attr, FileKind, ROOT_INODE};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// fs-verity's data and tree block size (log_blocksize 12).
const BLOCK: usize = 4096;
/// How much of a file one engine read asks for.
const READ_BYTES: usize = 1 << 20;
/// What the layer root hashes first: the construction and its version.
const ROOT_DOMAIN: &[u8] = b"lcfs layer root v1\0";
/// Directory depth walked at most (the kernel's path limit allows 2048).
const MAX_DEPTH: usize = 4096;

/// A SHA-256 digest.
pub type Sha256Digest = [u8; 32];

/// What [`layer_digest`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerDigest {
    pub root: Sha256Digest,
    /// Entries hashed (the root directory included).
    pub entries: u64,
    pub files: u64,
    /// Bytes of regular files read (each hard-linked file once).
    pub file_bytes: u64,
}

/// One entry as [`layer_digest`] hashes it, for a caller that reports per
/// file: its path (no leading slash; empty for the root), attributes and,
/// for a regular file, its fs-verity digest.
pub struct Entry<'a> {
    pub path: &'a [u8],
    pub attr: &'a Attr,
    pub file_digest: Option<&'a Sha256Digest>,
}

/// The fs-verity digest of `size` bytes that `read(offset, len)` returns
/// (short reads past the end are an error).
pub fn file_digest(
    size: u64,
    mut read: impl FnMut(u64, usize) -> Result<Vec<u8>>,
) -> Result<Sha256Digest> {
    let mut tree = MerkleTree::default();
    let mut offset = 0u64;
    while offset < size {
        let want = (size - offset).min(READ_BYTES as u64) as usize;
        let data = read(offset, want)?;
        if data.len() != want {
            return Err(Error::Invalid(format!(
                "a read at {offset} gave {} of {want} bytes",
                data.len()
            )));
        }
        for block in data.chunks(BLOCK) {
            tree.push_data(block);
        }
        offset += want as u64;
    }
    Ok(fsverity_digest(size, &tree.root()))
}

/// fs-verity's file digest: SHA-256 of its 256-byte descriptor (version 1,
/// SHA-256, 4 KiB blocks, no salt, the data size and the tree's root hash).
fn fsverity_digest(size: u64, root_hash: &Sha256Digest) -> Sha256Digest {
    let mut d = [0u8; 256];
    d[0] = 1; // version
    d[1] = 1; // FS_VERITY_HASH_ALG_SHA256
    d[2] = 12; // log2 of the block size
    d[8..16].copy_from_slice(&size.to_le_bytes());
    d[16..48].copy_from_slice(root_hash);
    Sha256::digest(d).into()
}

/// fs-verity's Merkle tree, built as data arrives: level 0 holds the data
/// blocks' hashes (a short last block zero-padded), each next level the
/// hashes of the one below packed 128 to a zero-padded 4 KiB block, up to
/// a level of one hash, the root hash (all zeros for an empty file).
#[derive(Default)]
struct MerkleTree {
    /// Per level: hashes not yet packed into a block of the next level.
    pending: Vec<Vec<u8>>,
    /// Per level: hashes pushed in all.
    counts: Vec<u64>,
}

impl MerkleTree {
    fn push_data(&mut self, block: &[u8]) {
        let mut h = Sha256::new();
        h.update(block);
        if block.len() < BLOCK {
            h.update(&[0u8; BLOCK][block.len()..]);
        }
        self.push(0, h.finalize().into());
    }

    fn push(&mut self, level: usize, hash: Sha256Digest) {
        if self.pending.len() <= level {
            self.pending.resize(level + 1, Vec::new());
            self.counts.resize(level + 1, 0);
        }
        self.pending[level].extend_from_slice(&hash);
        self.counts[level] += 1;
        if self.pending[level].len() == BLOCK {
            let up = Sha256::digest(&self.pending[level]).into();
            self.pending[level].clear();
            self.push(level + 1, up);
        }
    }

    fn root(mut self) -> Sha256Digest {
        let mut level = 0;
        loop {
            let Some(&count) = self.counts.get(level) else {
                return [0; 32]; // no data
            };
            let above = self.counts.get(level + 1).copied().unwrap_or(0);
            if count == 1 && above == 0 {
                let mut root = [0; 32];
                root.copy_from_slice(&self.pending[level][..32]);
                return root;
            }
            if !self.pending[level].is_empty() {
                let mut block = std::mem::take(&mut self.pending[level]);
                block.resize(BLOCK, 0);
                self.push(level + 1, Sha256::digest(&block).into());
            }
            level += 1;
        }
    }
}

/// Computes the root of layer `name` as docs/format.md ("Layer digests")
/// defines it, calling `each` with every entry in the order hashed.
pub fn layer_digest(
    engine: &Engine,
    name: &str,
    mut each: impl FnMut(&Entry<'_>),
) -> Result<LayerDigest> {
    let layer = engine.layer_id(name)?;
    let mut root = Sha256::new();
    root.update(ROOT_DOMAIN);
    let mut out = LayerDigest {
        root: [0; 32],
        entries: 0,
        files: 0,
        file_bytes: 0,
    };
    // Hard links: one digest per inode.
    let mut digests: HashMap<u64, Sha256Digest> = HashMap::new();
    // Depth-first, pre-order, each directory's entries sorted by name.
    let mut stack: Vec<(Vec<u8>, u64)> = vec![(Vec::new(), ROOT_INODE)];
    while let Some((path, ino)) = stack.pop() {
        let attr = engine.getattr(layer, ino)?;
        let file_digest = if attr.kind == FileKind::File {
            if let Some(d) = digests.get(&ino) {
                Some(*d)
            } else {
                let d = file_digest(attr.size, |off, len| engine.read(layer, ino, off, len))?;
                out.files += 1;
                out.file_bytes += attr.size;
                digests.insert(ino, d);
                Some(d)
            }
        } else {
            None
        };
        let target = if attr.kind == FileKind::Symlink {
            engine.readlink(layer, ino)?
        } else {
            Vec::new()
        };
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for x in engine.listxattr(layer, ino)? {
            let v = engine.getxattr(layer, ino, &x)?;
            xattrs.push((x, v));
        }
        xattrs.sort();
        hash_entry(
            &mut root,
            &path,
            &attr,
            &xattrs,
            &target,
            file_digest.as_ref(),
        );
        out.entries += 1;
        each(&Entry {
            path: &path,
            attr: &attr,
            file_digest: file_digest.as_ref(),
        });
        if attr.kind == FileKind::Directory {
            let depth = path.iter().filter(|&&b| b == b'/').count() + 1;
            if depth > MAX_DEPTH {
                return Err(Error::Invalid(format!(
                    "directories nested deeper than {MAX_DEPTH}"
                )));
            }
            let mut children = Vec::new();
            let mut cookie = 0;
            loop {
                let batch = engine.readdir(layer, ino, cookie, 1024)?;
                let Some(last) = batch.last() else { break };
                cookie = last.cookie;
                children.extend(
                    batch
                        .into_iter()
                        .filter(|e| e.name != b"." && e.name != b".."),
                );
            }
            // Pushed in reverse so that the smallest name comes off first.
            children.sort_by(|a, b| b.name.cmp(&a.name));
            for c in children {
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&c.name);
                stack.push((p, c.inode));
            }
        }
    }
    out.root = root.finalize().into();
    Ok(out)
}

/// One entry's bytes in the layer root (docs/format.md, "Layer digests").
fn hash_entry(
    h: &mut Sha256,
    path: &[u8],
    attr: &Attr,
    xattrs: &[(Vec<u8>, Vec<u8>)],
    target: &[u8],
    file_digest: Option<&Sha256Digest>,
) {
    let kind: u8 = match attr.kind {
        FileKind::File => 1,
        FileKind::Directory => 2,
        FileKind::Symlink => 3,
        FileKind::CharDevice => 4,
        FileKind::BlockDevice => 5,
        FileKind::Fifo => 6,
        FileKind::Socket => 7,
    };
    let device = matches!(attr.kind, FileKind::CharDevice | FileKind::BlockDevice);
    let bytes = |h: &mut Sha256, b: &[u8]| {
        h.update((b.len() as u32).to_le_bytes());
        h.update(b);
    };
    bytes(h, path);
    h.update([kind]);
    h.update((attr.mode & 0o7777).to_le_bytes());
    h.update(attr.uid.to_le_bytes());
    h.update(attr.gid.to_le_bytes());
    h.update((if device { attr.rdev } else { 0 }).to_le_bytes());
    h.update((xattrs.len() as u32).to_le_bytes());
    for (name, value) in xattrs {
        bytes(h, name);
        bytes(h, value);
    }
    bytes(h, target);
    h.update(file_digest.copied().unwrap_or([0; 32]));
}

/// Lower-case hex of a digest, as `sha256:<hex>`.
pub fn digest_string(d: &Sha256Digest) -> String {
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Parses `sha256:<64 hex digits>` (or the bare 64 digits).
pub fn parse_digest(s: &str) -> Result<Sha256Digest> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    let bad = || {
        Error::Invalid(format!(
            "{s:?} is not a SHA-256 digest (sha256: and 64 hex digits)"
        ))
    };
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut d = [0u8; 32];
    for (i, byte) in d.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(data: &[u8]) -> String {
        let d = file_digest(data.len() as u64, |off, len| {
            Ok(data[off as usize..off as usize + len].to_vec())
        })
        .unwrap();
        digest_string(&d)
    }

    /// Figures from fsverity-utils 1.5 (`fsverity digest`).
    #[test]
    fn file_digests_match_fsverity_utils() {
        assert_eq!(
            digest_of(b""),
            "sha256:3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"
        );
        assert_eq!(
            digest_of(b"a"),
            "sha256:bce75948b9e7510293f8f2720412af9697c1479281323f3f220623fb8e94b557"
        );
        assert_eq!(
            digest_of(&[0u8; 4096]),
            "sha256:babc284ee4ffe7f449377fbf6692715b43aec7bc39c094a95878904d34bac97e"
        );
        // 130 blocks and 17 bytes: two tree levels.
        let pattern: Vec<u8> = (0..4096 * 130 + 17)
            .map(|i: u32| ((i as u64 * 31 + 7) % 251) as u8)
            .collect();
        assert_eq!(
            digest_of(&pattern),
            "sha256:415e9092d7da0a21e99a7d5eb81887b038d8ae9db49688a8c1e03f11c0577715"
        );
    }

    #[test]
    fn digests_parse_back_and_bad_ones_are_refused() {
        let d = [0xabu8; 32];
        assert_eq!(parse_digest(&digest_string(&d)).unwrap(), d);
        for bad in [
            "",
            "sha256:",
            "sha256:xyz",
            &"a".repeat(63),
            &"g".repeat(64),
        ] {
            assert!(parse_digest(bad).is_err(), "{bad:?}");
        }
    }
}
