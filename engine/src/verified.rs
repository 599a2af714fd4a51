//! Verified reads (docs/integrity.md): a read a front end serves
//! ([`Engine::read_counted`], [`Engine::read_uncached`]) of content that
//! comes from a sealed layer is checked, block by block, against that
//! layer's seal before a byte of it is returned. A block that differs, or
//! a file whose metadata or digest differs from the seal, is EIO, counted
//! and logged with its path; every other file is served.
//!
//! Which layer's seal: [`Engine::shared_copy`], the frozen layer whose copy
//! of the file the reader's layer sees, so a container's reads of its
//! image's files are checked against the image layer that holds them, and
//! a file the container changed is not (it is its own). Verification is on
//! for every sealed layer ([`Engine::set_verify_reads`], the daemon option)
//! or for the layers flagged ([`Engine::set_layer_verify_reads`]).
//!
//! Trust runs from the layer root down: the first verified read of a
//! sealed layer walks its metadata (no data) and hashes it with the file
//! digests the seal holds; when that is not the sealed root, the seal's
//! manifest names the entries that differ, and those files fail. A file's
//! block hashes are checked against its sealed digest when first loaded,
//! then kept (bounded); each block read is checked against its hash.

use crate::digest::{self, Sha256Digest};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::fs::Attr;
use crate::seal::SealState;
use crate::LayerMetadata;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The layer metadata key of the per-layer flag.
pub const VERIFY_READS_KEY: &str = "lcfs.verify_reads";
/// Bytes of block hashes kept in memory at most (64 MiB: 8 GiB of files).
const HASH_CACHE_BYTES: usize = 64 << 20;
const BLOCK: u64 = 4096;

/// A file's block hashes, checked against its sealed digest.
pub(crate) struct FileCheck {
    hashes: Vec<Sha256Digest>,
    size: u64,
    path: Vec<u8>,
}

/// A sealed layer as its first verified read found it.
struct Armed {
    /// The whole seal is unusable (why).
    whole: Option<String>,
    /// Inodes whose entry differs from the seal, and what differs.
    bad: HashMap<u64, String>,
}

#[derive(Default)]
pub(crate) struct Verifier {
    all: AtomicBool,
    flagged: Mutex<HashSet<u64>>,
    armed: Mutex<HashMap<u64, Arc<OnceLock<Armed>>>>,
    files: Mutex<FileCache>,
    /// Blocks checked and found right, and reads refused.
    pub(crate) blocks_verified: AtomicU64,
    pub(crate) failures: AtomicU64,
    /// (layer, inode) already logged: one line per bad file.
    logged: Mutex<HashSet<(u64, u64)>>,
    /// The roots a verified layer's seal must have, when set
    /// ([`Engine::set_trusted_roots`]).
    trusted: Mutex<Option<Arc<HashSet<Sha256Digest>>>>,
}

#[derive(Default)]
struct FileCache {
    map: HashMap<(u64, u64), Arc<FileCheck>>,
    order: VecDeque<(u64, u64)>,
    bytes: usize,
}

impl FileCache {
    fn insert(&mut self, key: (u64, u64), f: Arc<FileCheck>) {
        self.bytes += f.hashes.len() * 32;
        if self.map.insert(key, f).is_none() {
            self.order.push_back(key);
        }
        while self.bytes > HASH_CACHE_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(f) = self.map.remove(&old) {
                self.bytes -= f.hashes.len() * 32;
            }
        }
    }
}

impl Verifier {
    fn enabled_for(&self, layer: u64) -> bool {
        self.all.load(Ordering::Relaxed)
            || self
                .flagged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&layer)
    }

    fn any_enabled(&self) -> bool {
        self.all.load(Ordering::Relaxed)
            || !self
                .flagged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
    }

    fn trusted(&self) -> Option<Arc<HashSet<Sha256Digest>>> {
        self.trusted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forgets what it knew of every layer (the trusted roots changed).
    fn forget_all(&self) {
        self.armed.lock().unwrap_or_else(|p| p.into_inner()).clear();
        *self.files.lock().unwrap_or_else(|p| p.into_inner()) = FileCache::default();
    }

    /// Forgets what it knew of a layer (removed, or its flag changed).
    pub(crate) fn forget(&self, layer: u64) {
        self.armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&layer);
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let keys: Vec<(u64, u64)> = files.map.keys().filter(|k| k.0 == layer).copied().collect();
        for k in keys {
            if let Some(f) = files.map.remove(&k) {
                files.bytes -= f.hashes.len() * 32;
            }
        }
        files.order.retain(|k| k.0 != layer);
    }
}

impl Engine {
    /// Verified reads for every sealed layer (the daemon option), or only
    /// for the layers flagged.
    pub fn set_verify_reads(&self, on: bool) {
        self.verifier().all.store(on, Ordering::Relaxed);
    }

    pub fn verify_reads(&self) -> bool {
        self.verifier().all.load(Ordering::Relaxed)
    }

    /// Whether reads of content layer id `layer` holds are verified (the
    /// daemon option, or the layer's flag).
    pub fn reads_verified(&self, layer: u64) -> bool {
        self.verifier().enabled_for(layer)
    }

    /// Turns verified reads of layer `name`'s content on or off, durably
    /// (its metadata key `lcfs.verify_reads`).
    pub fn set_layer_verify_reads(&self, name: &str, on: bool) -> Result<()> {
        let mut m = self.layer_metadata(name)?;
        if on {
            m.insert(VERIFY_READS_KEY.into(), "true".into());
        } else {
            m.remove(VERIFY_READS_KEY);
        }
        self.set_layer_metadata(name, &m)?;
        let id = self.layer_id(name)?;
        self.note_layer_flag(id, &m);
        Ok(())
    }

    /// Keeps the verifier's set of flagged layers in step with a layer's
    /// metadata.
    pub(crate) fn note_layer_flag(&self, layer: u64, m: &LayerMetadata) {
        let on = flagged(m);
        let mut f = self
            .verifier()
            .flagged
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // What an earlier check learnt of the (frozen) layer stays true.
        if on {
            f.insert(layer);
        } else {
            f.remove(&layer);
        }
    }

    /// Roots kept apart from the device (`lcfs daemon --trusted-roots`):
    /// with a set, a layer under verified reads is served only when its
    /// seal's root is in it, and a frozen layer not sealed yet is sealed
    /// first (the read waits). Without one, the seal on the device is
    /// trusted as it is. Every layer is checked again under the new set.
    pub fn set_trusted_roots(&self, roots: Option<HashSet<Sha256Digest>>) {
        let v = self.verifier();
        *v.trusted.lock().unwrap_or_else(|p| p.into_inner()) = roots.map(Arc::new);
        v.forget_all();
    }

    /// The trusted roots in force, if any.
    pub fn trusted_roots(&self) -> Option<Vec<Sha256Digest>> {
        self.verifier().trusted().map(|t| {
            let mut v: Vec<Sha256Digest> = t.iter().copied().collect();
            v.sort_unstable();
            v
        })
    }

    /// Blocks checked by verified reads, and reads refused.
    pub fn verify_counts(&self) -> (u64, u64) {
        let v = self.verifier();
        (
            v.blocks_verified.load(Ordering::Relaxed),
            v.failures.load(Ordering::Relaxed),
        )
    }

    /// The check a read of `ino` in `layer` gets: None when its content
    /// does not come from a sealed layer under verification.
    fn verification(&self, layer: u64, ino: u64) -> Result<Option<(u64, Arc<FileCheck>)>> {
        let v = self.verifier();
        if !v.any_enabled() {
            return Ok(None);
        }
        let Some(source) = self.shared_copy(layer, ino)? else {
            return Ok(None);
        };
        if !v.enabled_for(source) {
            return Ok(None);
        }
        let cached = v
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .get(&(source, ino))
            .cloned();
        if let Some(f) = cached {
            return Ok(Some((source, f)));
        }
        if !matches!(self.seal_state_by_id(source)?, SealState::Sealed(_)) {
            if v.trusted().is_none() {
                return Ok(None);
            }
            // Under trusted roots nothing is served unchecked: the layer
            // is sealed now (or its background sealing awaited), and the
            // root that gives is checked below like any other.
            let name = self.layer_info_by_id(source)?.name;
            if let Err(e) = self.seal_layer(&name, &|| false, &mut |_| {}) {
                let why = format!("it is not sealed and sealing it failed: {e}");
                return Err(self.refuse(source, ino, None, &why));
            }
        }
        let once = v
            .armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(source)
            .or_default()
            .clone();
        let armed = once.get_or_init(|| self.arm(source));
        if let Some(why) = &armed.whole {
            return Err(self.refuse(source, ino, None, why));
        }
        if let Some(why) = armed.bad.get(&ino) {
            return Err(self.refuse(source, ino, None, why));
        }
        let f = match self.load_file(source, ino) {
            Ok(f) => Arc::new(f),
            Err(why) => return Err(self.refuse(source, ino, None, &why)),
        };
        // Kept only while what armed it still stands (the trusted roots or
        // the layer's flag may have changed meanwhile).
        let armed_now = v.armed.lock().unwrap_or_else(|p| p.into_inner());
        if armed_now
            .get(&source)
            .is_some_and(|a| Arc::ptr_eq(a, &once))
        {
            v.files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((source, ino), f.clone());
        }
        Ok(Some((source, f)))
    }

    /// A file's sealed block hashes, checked against its sealed digest and
    /// its size now; Err says what is wrong.
    fn load_file(&self, layer: u64, ino: u64) -> std::result::Result<FileCheck, String> {
        let attr = self.getattr(layer, ino).map_err(|e| e.to_string())?;
        let mut s = self.store();
        let sealed = s
            .sealed_file(layer, ino)
            .map_err(|e| e.to_string())?
            .ok_or("the seal has no entry for it")?;
        if sealed.size != attr.size {
            return Err(format!(
                "its size is {}, the seal's {}",
                attr.size, sealed.size
            ));
        }
        let hashes = s
            .sealed_hashes(layer, ino, sealed.blocks())
            .map_err(|e| e.to_string())?;
        drop(s);
        if digest::digest_of_hashes(sealed.size, &hashes) != sealed.digest {
            return Err("its block hashes do not give its sealed digest".into());
        }
        Ok(FileCheck {
            hashes,
            size: sealed.size,
            path: sealed.path,
        })
    }

    /// Walks sealed layer `layer`'s metadata with the sealed file digests
    /// and finds which entries differ from the seal.
    fn arm(&self, layer: u64) -> Armed {
        let mut out = Armed {
            whole: None,
            bad: HashMap::new(),
        };
        let SealState::Sealed(info) = self.seal_state_by_id(layer).unwrap_or(SealState::None)
        else {
            out.whole = Some("the layer's seal is gone".into());
            return out;
        };
        if let Some(trusted) = self.verifier().trusted() {
            if !trusted.contains(&info.root) {
                out.whole = Some(format!(
                    "its root {} is not among the trusted roots",
                    digest::digest_string(&info.root)
                ));
                return out;
            }
        }
        let mut missing: HashMap<u64, &'static str> = HashMap::new();
        let mut file = |a: &Attr, _: &[u8]| -> Result<Sha256Digest> {
            Ok(match self.sealed_digest(layer, a.inode)? {
                Some(f) => f.digest,
                None => {
                    missing.insert(a.inode, "the seal has no entry for it");
                    [0; 32]
                }
            })
        };
        let mut now: Vec<(digest::Record, u64)> = Vec::new();
        let walked = digest::layer_digest_with(self, layer, &mut file, |e| {
            now.push((e.record.clone(), e.attr.inode));
        });
        let walked = match walked {
            Ok(d) => d,
            Err(e) => {
                out.whole = Some(format!("its metadata cannot be read: {e}"));
                return out;
            }
        };
        for (ino, why) in missing {
            out.bad.insert(ino, why.into());
        }
        if walked.root == info.root {
            return out;
        }
        let name = self
            .layer_info_by_id(layer)
            .map(|l| l.name)
            .unwrap_or_default();
        let manifest = match self.sealed_manifest(&name) {
            Ok((_, m)) => m,
            Err(e) => {
                out.whole = Some(format!("its seal is unusable: {e}"));
                return out;
            }
        };
        let sealed = match digest::read_manifest(&manifest) {
            Ok((_, r)) => r,
            Err(e) => {
                out.whole = Some(format!("its seal is unusable: {e}"));
                return out;
            }
        };
        let records: Vec<digest::Record> = now.iter().map(|(r, _)| r.clone()).collect();
        let by_path: HashMap<&[u8], u64> =
            now.iter().map(|(r, i)| (r.path.as_slice(), *i)).collect();
        for (path, what) in digest::compare(&sealed, &records) {
            if let Some(&ino) = by_path.get(path.as_slice()) {
                out.bad.insert(
                    ino,
                    format!("its {} differs from the seal", what.join(", ")),
                );
            }
        }
        if out.bad.is_empty() {
            out.whole = Some("its metadata does not hash to the sealed root".into());
        }
        out
    }

    /// Counts and logs (once per file) a refused read; the error to return.
    fn refuse(&self, layer: u64, ino: u64, path: Option<&[u8]>, why: &str) -> Error {
        let v = self.verifier();
        v.failures.fetch_add(1, Ordering::Relaxed);
        let first = v
            .logged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((layer, ino));
        let name = self
            .layer_info_by_id(layer)
            .map(|l| l.name)
            .unwrap_or_else(|_| layer.to_string());
        let path = match path {
            Some(p) => String::from_utf8_lossy(p).into_owned(),
            None => self
                .sealed_file(layer, ino)
                .ok()
                .flatten()
                .map(|f| String::from_utf8_lossy(&f.path).into_owned())
                .unwrap_or_else(|| format!("inode {ino}")),
        };
        if first {
            log::warn!("verified read refused: layer {name}, /{path}: {why}");
        }
        Error::corrupt(0, format!("verified read of layer {name}, /{path}: {why}"))
    }

    /// A front end's read (`keep`: into the block cache), checked against
    /// the seal when verification covers it.
    pub(crate) fn read_checked(
        &self,
        layer: u64,
        ino: u64,
        offset: u64,
        len: usize,
        keep: bool,
    ) -> Result<Vec<u8>> {
        let Some((source, f)) = self.verification(layer, ino)? else {
            return self.read_keeping(layer, ino, offset, len, keep, true);
        };
        let len = len.min(64 << 20);
        if offset >= f.size || len == 0 {
            return Ok(Vec::new());
        }
        let start = offset / BLOCK * BLOCK;
        let end = (offset + len as u64).min(f.size);
        let end_aligned = end.div_ceil(BLOCK).saturating_mul(BLOCK).min(f.size);
        // Each whole block is checked as it is fetched (a cached one by the
        // hash it keeps); the file's partial last block after, over its
        // bytes up to the end of the file.
        let whole = f.size / BLOCK;
        let mut expect = Vec::with_capacity((end_aligned - start).div_ceil(BLOCK) as usize);
        for index in start / BLOCK..end_aligned.div_ceil(BLOCK) {
            match f.hashes.get(index as usize) {
                Some(h) if index < whole => expect.push(Some(*h)),
                Some(_) => expect.push(None),
                None => {
                    let why = format!("block {index} is past the seal's hashes");
                    return Err(self.refuse(source, ino, Some(&f.path), &why));
                }
            }
        }
        let checked = self.fetching(|| {
            self.read_local_checked(
                layer,
                ino,
                start,
                (end_aligned - start) as usize,
                keep,
                true,
                Some(&expect),
            )
        })?;
        let mut data = match checked {
            Ok(data) => data,
            Err(i) => {
                let why = format!("block {} does not match the seal", start / BLOCK + i as u64);
                return Err(self.refuse(source, ino, Some(&f.path), &why));
            }
        };
        if data.len() as u64 != end_aligned - start {
            let why = "the file is shorter than its seal says";
            return Err(self.refuse(source, ino, Some(&f.path), why));
        }
        if end_aligned % BLOCK != 0 {
            let index = end_aligned / BLOCK;
            let tail = &data[(index * BLOCK - start) as usize..];
            if f.hashes.get(index as usize) != Some(&digest::block_hash(tail)) {
                let why = format!("block {index} does not match the seal");
                return Err(self.refuse(source, ino, Some(&f.path), &why));
            }
        }
        self.verifier().blocks_verified.fetch_add(
            data.len().div_ceil(BLOCK as usize) as u64,
            Ordering::Relaxed,
        );
        // The bytes asked for, in place (FUSE reads start on a block: then
        // nothing moves).
        data.truncate((end - start) as usize);
        data.drain(..(offset - start) as usize);
        Ok(data)
    }
}

/// Whether a layer's metadata asks for verified reads.
pub(crate) fn flagged(m: &LayerMetadata) -> bool {
    m.get(VERIFY_READS_KEY).is_some_and(|v| v == "true")
}
