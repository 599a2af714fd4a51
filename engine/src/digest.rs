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
/// What the layer root hashes first (and a manifest starts with): the
/// construction and its version.
pub const ROOT_DOMAIN: &[u8] = b"lcfs layer root v1\0";
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

/// One entry as [`layer_digest`] hashes it: its attributes, its record
/// (path, no leading slash, empty for the root; for a regular file its
/// fs-verity digest) and the record's bytes, what the root hashes for it
/// (a manifest is these bytes, after [`ROOT_DOMAIN`]).
pub struct Entry<'a> {
    pub attr: &'a Attr,
    pub record: &'a Record,
    pub bytes: &'a [u8],
}

/// One entry's record in the layer root (docs/format.md, "Layer digests").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub path: Vec<u8>,
    /// 1 file, 2 directory, 3 symlink, 4 character device, 5 block
    /// device, 6 fifo, 7 socket.
    pub kind: u8,
    /// Permission and set-id bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    /// Sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub target: Vec<u8>,
    /// The file digest of a regular file, else zeros.
    pub digest: Sha256Digest,
}

/// Largest string a record decodes (paths, names, values, targets).
const RECORD_STRING_MAX: usize = 1 << 20;
/// Most xattrs a record decodes.
const RECORD_XATTRS_MAX: usize = 1 << 16;

impl Record {
    /// Appends the record's bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let string = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        };
        string(out, &self.path);
        out.push(self.kind);
        out.extend_from_slice(&self.mode.to_le_bytes());
        out.extend_from_slice(&self.uid.to_le_bytes());
        out.extend_from_slice(&self.gid.to_le_bytes());
        out.extend_from_slice(&self.rdev.to_le_bytes());
        out.extend_from_slice(&(self.xattrs.len() as u32).to_le_bytes());
        for (name, value) in &self.xattrs {
            string(out, name);
            string(out, value);
        }
        string(out, &self.target);
        out.extend_from_slice(&self.digest);
    }

    /// The record at the start of `b` and its length in bytes.
    pub fn decode(b: &[u8]) -> Result<(Record, usize)> {
        let mut c = Cursor { b, at: 0 };
        let path = c.string()?;
        let kind = c.take(1)?[0];
        if !(1..=7).contains(&kind) {
            return Err(Cursor::bad("an unknown entry type"));
        }
        let mode = c.u32()?;
        let uid = c.u32()?;
        let gid = c.u32()?;
        let rdev = u64::from_le_bytes(c.take(8)?.try_into().expect("8 bytes"));
        let count = c.u32()? as usize;
        if count > RECORD_XATTRS_MAX {
            return Err(Cursor::bad("too many xattrs"));
        }
        let mut xattrs = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            let name = c.string()?;
            let value = c.string()?;
            xattrs.push((name, value));
        }
        let target = c.string()?;
        let digest: Sha256Digest = c.take(32)?.try_into().expect("32 bytes");
        let r = Record {
            path,
            kind,
            mode,
            uid,
            gid,
            rdev,
            xattrs,
            target,
            digest,
        };
        Ok((r, c.at))
    }

    /// What differs from `other` (the same path): "type", "content",
    /// "mode", "owner", "device", "xattrs", "link target".
    pub fn differences(&self, other: &Record) -> Vec<&'static str> {
        let mut d = Vec::new();
        if self.kind != other.kind {
            d.push("type");
        }
        if self.digest != other.digest {
            d.push("content");
        }
        if self.mode != other.mode {
            d.push("mode");
        }
        if (self.uid, self.gid) != (other.uid, other.gid) {
            d.push("owner");
        }
        if self.rdev != other.rdev {
            d.push("device");
        }
        if self.xattrs != other.xattrs {
            d.push("xattrs");
        }
        if self.target != other.target {
            d.push("link target");
        }
        d
    }
}

/// Reads a record's fields in order, bounded.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn bad(what: &str) -> Error {
        Error::Invalid(format!("manifest record: {what}"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| Self::bad("truncated"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn string(&mut self) -> Result<Vec<u8>> {
        let n = self.u32()? as usize;
        if n > RECORD_STRING_MAX {
            return Err(Self::bad("a string longer than 1 MiB"));
        }
        Ok(self.take(n)?.to_vec())
    }
}

/// A manifest's records and the root they hash to: the bytes after
/// [`ROOT_DOMAIN`] are records, and the root is the SHA-256 of all of it.
pub fn read_manifest(bytes: &[u8]) -> Result<(Sha256Digest, Vec<Record>)> {
    let body = bytes
        .strip_prefix(ROOT_DOMAIN)
        .ok_or_else(|| Error::Invalid("not an lcfs layer manifest (bad header)".into()))?;
    let mut records = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let (r, n) = Record::decode(&body[at..])?;
        records.push(r);
        at += n;
    }
    Ok((Sha256::digest(bytes).into(), records))
}

/// What differs between the `expected` records (a manifest) and the
/// `current` ones: (path, what), in path order; what is "missing" (only in
/// the manifest), "added" (only now) or the fields that differ.
pub fn compare(expected: &[Record], current: &[Record]) -> Vec<(Vec<u8>, Vec<&'static str>)> {
    let want: std::collections::BTreeMap<&[u8], &Record> =
        expected.iter().map(|r| (r.path.as_slice(), r)).collect();
    let have: std::collections::BTreeMap<&[u8], &Record> =
        current.iter().map(|r| (r.path.as_slice(), r)).collect();
    let mut out = Vec::new();
    for (path, w) in &want {
        match have.get(path) {
            None => out.push((path.to_vec(), vec!["missing"])),
            Some(h) => {
                let d = w.differences(h);
                if !d.is_empty() {
                    out.push((path.to_vec(), d));
                }
            }
        }
    }
    for path in have.keys() {
        if !want.contains_key(path) {
            out.push((path.to_vec(), vec!["added"]));
        }
    }
    out.sort();
    out
}

/// The fs-verity digest of `size` bytes that `read(offset, len)` returns
/// (short reads past the end are an error).
pub fn file_digest(
    size: u64,
    read: impl FnMut(u64, usize) -> Result<Vec<u8>>,
) -> Result<Sha256Digest> {
    Ok(file_tree(size, read, false)?.0)
}

/// The fs-verity digest of `size` bytes that `read` returns and, when
/// `keep_hashes`, the hash of every 4 KiB block (the tree's level 0).
pub fn file_tree(
    size: u64,
    mut read: impl FnMut(u64, usize) -> Result<Vec<u8>>,
    keep_hashes: bool,
) -> Result<(Sha256Digest, Vec<Sha256Digest>)> {
    let mut tree = MerkleTree::default();
    let mut hashes = Vec::new();
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
            let h = block_hash(block);
            if keep_hashes {
                hashes.push(h);
            }
            tree.push(0, h);
        }
        offset += want as u64;
    }
    Ok((fsverity_digest(size, &tree.root()), hashes))
}

/// The fs-verity digest of a file of `size` bytes whose 4 KiB blocks hash
/// to `hashes` (what a seal keeps): checks a file's block hashes against
/// its digest without reading its data.
pub fn digest_of_hashes(size: u64, hashes: &[Sha256Digest]) -> Sha256Digest {
    let mut tree = MerkleTree::default();
    for h in hashes {
        tree.push(0, *h);
    }
    fsverity_digest(size, &tree.root())
}

/// The hash of a block of zeros (a hole), computed once.
pub fn zero_block_hash() -> Sha256Digest {
    static ZERO: std::sync::OnceLock<Sha256Digest> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| block_hash(&[0u8; BLOCK]))
}

/// The SHA-256 of one data block (4 KiB; a short last block zero-padded):
/// an entry of the tree's level 0.
pub fn block_hash(block: &[u8]) -> Sha256Digest {
    let mut h = Sha256::new();
    h.update(block);
    if block.len() < BLOCK {
        h.update(&[0u8; BLOCK][block.len()..]);
    }
    h.finalize().into()
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
    each: impl FnMut(&Entry<'_>),
) -> Result<LayerDigest> {
    let layer = engine.layer_id(name)?;
    let mut read =
        |a: &Attr, _: &[u8]| file_digest(a.size, |off, len| engine.read(layer, a.inode, off, len));
    layer_digest_with(engine, layer, &mut read, each)
}

/// [`layer_digest`] of layer id `layer`, with each regular file's digest
/// from `file` (called once per inode, with the path it is met at first):
/// read from the device, or taken from a seal.
pub(crate) fn layer_digest_with(
    engine: &Engine,
    layer: u64,
    file: &mut dyn FnMut(&Attr, &[u8]) -> Result<Sha256Digest>,
    mut each: impl FnMut(&Entry<'_>),
) -> Result<LayerDigest> {
    let mut root = Sha256::new();
    root.update(ROOT_DOMAIN);
    let mut out = LayerDigest {
        root: [0; 32],
        entries: 0,
        files: 0,
        file_bytes: 0,
    };
    // Files with several links: one digest per inode.
    let mut digests: HashMap<u64, Sha256Digest> = HashMap::new();
    // Depth-first, pre-order, each directory's entries sorted by name.
    let mut stack: Vec<(Vec<u8>, u64)> = vec![(Vec::new(), ROOT_INODE)];
    while let Some((path, ino)) = stack.pop() {
        let attr = engine.getattr(layer, ino)?;
        let file_digest = if attr.kind == FileKind::File {
            if let Some(d) = digests.get(&ino) {
                Some(*d)
            } else {
                let d = file(&attr, &path)?;
                out.files += 1;
                out.file_bytes += attr.size;
                if attr.nlink > 1 {
                    digests.insert(ino, d);
                }
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
        let record = record_of(path, &attr, xattrs, target, file_digest);
        let mut bytes = Vec::new();
        record.encode(&mut bytes);
        root.update(&bytes);
        out.entries += 1;
        each(&Entry {
            attr: &attr,
            record: &record,
            bytes: &bytes,
        });
        if attr.kind == FileKind::Directory {
            let path = record.path;
            let depth = path.iter().filter(|&&b| b == b'/').count() + 1;
            if depth > MAX_DEPTH {
                return Err(Error::Invalid(format!(
                    "directories nested deeper than {MAX_DEPTH}"
                )));
            }
            let mut children = engine.list_dir(layer, ino)?;
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

/// Layer `name`'s manifest: [`ROOT_DOMAIN`], then every entry's record in
/// order; its SHA-256 is the layer root.
pub fn layer_manifest(engine: &Engine, name: &str) -> Result<(LayerDigest, Vec<u8>)> {
    let mut bytes = ROOT_DOMAIN.to_vec();
    let d = layer_digest(engine, name, |e| bytes.extend_from_slice(e.bytes))?;
    Ok((d, bytes))
}

/// Layer `name` checked against `manifest` (what [`layer_manifest`] wrote
/// earlier): the manifest's root, the layer's now, and every difference.
pub struct Verification {
    pub manifest_root: Sha256Digest,
    pub digest: LayerDigest,
    pub differences: Vec<(Vec<u8>, Vec<&'static str>)>,
}

/// Checks layer `name` against the manifest bytes `manifest`.
pub fn verify_against(engine: &Engine, name: &str, manifest: &[u8]) -> Result<Verification> {
    verify_against_progress(engine, name, manifest, &mut |_| {})
}

/// [`verify_against`], telling `progress` the file bytes read so far.
pub fn verify_against_progress(
    engine: &Engine,
    name: &str,
    manifest: &[u8],
    progress: &mut dyn FnMut(u64),
) -> Result<Verification> {
    let (manifest_root, expected) = read_manifest(manifest)?;
    let mut current = Vec::with_capacity(expected.len());
    let layer = engine.layer_id(name)?;
    let mut read = 0u64;
    let mut file = |a: &Attr, _: &[u8]| {
        let d = file_digest(a.size, |off, len| {
            progress(read + off);
            engine.read(layer, a.inode, off, len)
        })?;
        read += a.size;
        progress(read);
        Ok(d)
    };
    let digest = layer_digest_with(engine, layer, &mut file, |e| current.push(e.record.clone()))?;
    Ok(Verification {
        manifest_root,
        differences: compare(&expected, &current),
        digest,
    })
}

/// One entry's record (docs/format.md, "Layer digests").
fn record_of(
    path: Vec<u8>,
    attr: &Attr,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    target: Vec<u8>,
    file_digest: Option<Sha256Digest>,
) -> Record {
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
    Record {
        path,
        kind,
        mode: attr.mode & 0o7777,
        uid: attr.uid,
        gid: attr.gid,
        rdev: if device { attr.rdev } else { 0 },
        xattrs,
        target,
        digest: file_digest.unwrap_or([0; 32]),
    }
}

/// Lower-case hex of a digest, as `sha256:<hex>`.
pub fn digest_string(d: &Sha256Digest) -> String {
    format!("sha256:{}", hex(d))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Whether two secrets (tokens, digests) are equal, in a time that does
/// not depend on where they differ.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
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

    #[test]
    fn the_zero_block_hash_is_a_hole_s_hash() {
        assert_eq!(zero_block_hash(), block_hash(&[0u8; BLOCK]));
        assert_eq!(zero_block_hash(), block_hash(&[]));
        assert_ne!(zero_block_hash(), block_hash(&[1u8; BLOCK]));
    }

    fn digest_of(data: &[u8]) -> String {
        let d = file_digest(data.len() as u64, |off, len| {
            Ok(data[off as usize..off as usize + len].to_vec())
        })
        .unwrap();
        digest_string(&d)
    }

    /// Figures from fsverity-utils 1.5 (`fsverity digest`).
    #[test]
    fn hex_and_secrets() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_eq!(
            digest_string(&[0xff; 32]),
            format!("sha256:{}", "ff".repeat(32))
        );
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
    }

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
    fn records_round_trip_and_bad_manifests_are_refused() {
        let r = Record {
            path: b"etc/passwd".to_vec(),
            kind: 1,
            mode: 0o644,
            uid: 1,
            gid: 2,
            rdev: 0,
            xattrs: vec![(b"user.a".to_vec(), b"1".to_vec())],
            target: Vec::new(),
            digest: [7; 32],
        };
        let mut m = ROOT_DOMAIN.to_vec();
        r.encode(&mut m);
        r.encode(&mut m);
        let (root, records) = read_manifest(&m).unwrap();
        assert_eq!(records, vec![r.clone(), r.clone()]);
        assert_eq!(root, <[u8; 32]>::from(Sha256::digest(&m)));
        // Truncated anywhere, a bad header, an unknown type, a huge string.
        for cut in 1..m.len() - ROOT_DOMAIN.len() {
            if cut != (m.len() - ROOT_DOMAIN.len()) / 2 {
                assert!(read_manifest(&m[..m.len() - cut]).is_err(), "cut {cut}");
            }
        }
        assert!(read_manifest(b"not a manifest").is_err());
        let mut bad = ROOT_DOMAIN.to_vec();
        Record {
            kind: 9,
            ..r.clone()
        }
        .encode(&mut bad);
        assert!(read_manifest(&bad).is_err());
        let mut huge = ROOT_DOMAIN.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_manifest(&huge).is_err());
        // Differences name what changed.
        let other = Record {
            mode: 0o600,
            digest: [8; 32],
            ..r.clone()
        };
        assert_eq!(r.differences(&other), vec!["content", "mode"]);
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
