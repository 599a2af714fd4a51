//! Seals: a frozen layer's digests kept on the device (docs/integrity.md;
//! the bytes in docs/format.md, "Seal"). A seal is a tree of the layer's
//! own, rooted in its record, that holds what the layer root is made of:
//! the manifest (every entry's record), each regular file's fs-verity
//! digest and path, and the hash of every 4 KiB block of it (the Merkle
//! tree's level 0). `lcfs verify` checks a layer against it, and verified
//! reads (verified.rs) check every block served against it.
//!
//! Sealing reads the layer once, off the store lock, and writes the seal
//! in batches; the header goes last, so a seal without one is partial, and
//! sealing again goes on from the files already in it (after a crash too).
//! The seal's nodes are the layer's: removal frees them, fsck walks them.

use crate::digest::{self, Sha256Digest, ROOT_DOMAIN};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::format::keys::{KIND_SEAL_FILE, KIND_SEAL_HASHES, KIND_SEAL_HEAD, KIND_SEAL_MANIFEST};
use crate::format::{Key, Timestamp};
use crate::fs::Attr;
use crate::store::Store;
use crate::tree::Tree;
use std::sync::Mutex;

/// The seal layout's version, in its header.
const SEAL_VERSION: u32 = 1;
/// Bytes of one manifest chunk: two values fill a tree node.
const CHUNK_BYTES: usize = 1984;
/// Block hashes in one run (one value).
pub(crate) const HASHES_PER_RUN: usize = CHUNK_BYTES / 32;
/// Bytes of a path a file entry keeps (for messages only).
const PATH_MAX_KEPT: usize = 1024;
/// Seal values written per hold of the store lock, about.
const BATCH_BYTES: usize = 2 << 20;

/// One sealing at a time per process: two would write the same entries.
static SEALING: Mutex<()> = Mutex::new(());

/// A complete seal's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealInfo {
    /// The layer root (docs/format.md, "Layer digests").
    pub root: Sha256Digest,
    pub entries: u64,
    pub files: u64,
    pub file_bytes: u64,
    /// Length of the manifest the seal holds.
    pub manifest_bytes: u64,
    pub sealed_at: Timestamp,
}

impl SealInfo {
    const BYTES: usize = 8 + 32 + 4 * 8 + 16;

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::BYTES);
        v.extend_from_slice(&SEAL_VERSION.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&self.root);
        for n in [
            self.entries,
            self.files,
            self.file_bytes,
            self.manifest_bytes,
        ] {
            v.extend_from_slice(&n.to_le_bytes());
        }
        v.extend_from_slice(&self.sealed_at.seconds.to_le_bytes());
        v.extend_from_slice(&self.sealed_at.nanoseconds.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v
    }

    fn decode(b: &[u8]) -> Result<SealInfo> {
        let bad = |what: &str| Error::corrupt(0, format!("seal header: {what}"));
        if b.len() < Self::BYTES {
            return Err(bad("too short"));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let version = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
        if version != SEAL_VERSION {
            return Err(bad(&format!("unknown version {version}")));
        }
        Ok(SealInfo {
            root: b[8..40].try_into().expect("32 bytes"),
            entries: u64_at(40),
            files: u64_at(48),
            file_bytes: u64_at(56),
            manifest_bytes: u64_at(64),
            sealed_at: Timestamp {
                seconds: u64_at(72) as i64,
                nanoseconds: u32::from_le_bytes(b[80..84].try_into().expect("4 bytes")),
            },
        })
    }
}

/// What a seal holds for one regular file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedFile {
    pub digest: Sha256Digest,
    pub size: u64,
    /// One of its paths (at most 1 KiB of it).
    pub path: Vec<u8>,
}

impl SealedFile {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(40 + self.path.len());
        v.extend_from_slice(&self.digest);
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.path[..self.path.len().min(PATH_MAX_KEPT)]);
        v
    }

    fn decode(b: &[u8]) -> Result<SealedFile> {
        if b.len() < 40 || b.len() > 40 + PATH_MAX_KEPT {
            return Err(Error::corrupt(0, "seal file entry of a bad length"));
        }
        Ok(SealedFile {
            digest: b[..32].try_into().expect("32 bytes"),
            size: u64::from_le_bytes(b[32..40].try_into().expect("8 bytes")),
            path: b[40..].to_vec(),
        })
    }

    /// Number of 4 KiB blocks (and of block hashes).
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(4096)
    }
}

/// Where a layer's seal stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SealState {
    /// The layer has no seal (it is writable, or not sealed yet).
    None,
    /// Sealing began and has not finished.
    Partial,
    Sealed(SealInfo),
    /// The seal's header cannot be read (why).
    Unreadable(String),
}

fn head_key() -> Key {
    Key::new(0, KIND_SEAL_HEAD, 0)
}

impl Store {
    fn seal_root(&self, layer: u64) -> Result<u64> {
        Ok(self.layer(layer)?.seal)
    }

    pub(crate) fn seal_state(&mut self, layer: u64) -> Result<SealState> {
        let root = self.seal_root(layer)?;
        if root == 0 {
            return Ok(SealState::None);
        }
        match self.get(Tree::Layer(layer), root, &head_key())? {
            None => Ok(SealState::Partial),
            Some(b) => Ok(SealState::Sealed(SealInfo::decode(&b)?)),
        }
    }

    pub(crate) fn sealed_file(&mut self, layer: u64, ino: u64) -> Result<Option<SealedFile>> {
        let root = self.seal_root(layer)?;
        match self.get(Tree::Layer(layer), root, &Key::new(ino, KIND_SEAL_FILE, 0))? {
            None => Ok(None),
            Some(b) => SealedFile::decode(&b).map(Some),
        }
    }

    /// The block hashes of file `ino`: exactly `count` of them, or an error.
    pub(crate) fn sealed_hashes(
        &mut self,
        layer: u64,
        ino: u64,
        count: u64,
    ) -> Result<Vec<Sha256Digest>> {
        let root = self.seal_root(layer)?;
        let mut out: Vec<Sha256Digest> = Vec::with_capacity(count.min(1 << 24) as usize);
        let mut bad = None;
        self.scan(
            Tree::Layer(layer),
            root,
            Key::new(ino, KIND_SEAL_HASHES, 0),
            Key::new(ino, KIND_SEAL_HASHES, u64::MAX),
            &mut |k, v| {
                if k.offset * HASHES_PER_RUN as u64 != out.len() as u64 || v.len() % 32 != 0 {
                    bad = Some("a run of block hashes out of place");
                    return false;
                }
                out.extend(
                    v.chunks(32)
                        .map(|c| <Sha256Digest>::try_from(c).expect("32")),
                );
                out.len() as u64 <= count
            },
        )?;
        if bad.is_none() && out.len() as u64 != count {
            bad = Some("a file's block hashes are not all there");
        }
        match bad {
            Some(what) => Err(Error::corrupt(0, format!("seal of layer {layer}: {what}"))),
            None => Ok(out),
        }
    }

    pub(crate) fn sealed_manifest(&mut self, layer: u64) -> Result<Vec<u8>> {
        let root = self.seal_root(layer)?;
        let mut bytes = Vec::new();
        let mut bad = false;
        self.scan(
            Tree::Layer(layer),
            root,
            Key::new(0, KIND_SEAL_MANIFEST, 0),
            Key::new(0, KIND_SEAL_MANIFEST, u64::MAX),
            &mut |k, v| {
                bad = k.offset * CHUNK_BYTES as u64 != bytes.len() as u64;
                bytes.extend_from_slice(v);
                !bad
            },
        )?;
        if bad {
            return Err(Error::corrupt(0, "a seal's manifest has a chunk missing"));
        }
        Ok(bytes)
    }

    /// Adds entries (in key order) to frozen layer `layer`'s seal.
    fn seal_put(&mut self, layer: u64, items: Vec<(Key, Vec<u8>)>) -> Result<()> {
        self.check_writable()?;
        let l = self.layer(layer)?;
        if !l.frozen {
            return Err(Error::Invalid("only a frozen layer is sealed".into()));
        }
        let mut root = l.seal;
        let bytes: usize = items.iter().map(|(_, v)| v.len() + 19).sum();
        self.ensure_space((bytes / 2000) as u64 + 4, false)?;
        let r = self.insert_sorted(Tree::Layer(layer), &mut root, items);
        if self.layers.get(layer).is_some_and(|l| l.seal != root) {
            self.layers.get_mut(layer).expect("exists").seal = root;
            self.mark_layer_dirty(layer);
        }
        r?;
        self.bump();
        Ok(())
    }
}

/// Seal entries gathered off the lock, written in batches.
struct Batch {
    layer: u64,
    items: Vec<(Key, Vec<u8>)>,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, key: Key, value: Vec<u8>) {
        self.bytes += value.len();
        self.items.push((key, value));
    }

    fn flush(&mut self, engine: &Engine) -> Result<()> {
        if self.items.is_empty() {
            return Ok(());
        }
        let mut items = std::mem::take(&mut self.items);
        self.bytes = 0;
        items.sort_by_key(|a| a.0);
        items.dedup_by(|a, b| a.0 == b.0);
        let layer = self.layer;
        engine.store_op(move |s| s.seal_put(layer, items.clone()))
    }
}

impl Engine {
    /// Where layer `name`'s seal stands.
    pub fn seal_state(&self, name: &str) -> Result<SealState> {
        let mut s = self.store();
        let id = s.layer_id(name)?;
        s.seal_state(id)
    }

    /// [`Engine::seal_state`] by layer id.
    pub fn seal_state_by_id(&self, layer: u64) -> Result<SealState> {
        self.store().seal_state(layer)
    }

    /// The manifest a complete seal holds, checked against its root.
    pub fn sealed_manifest(&self, name: &str) -> Result<(SealInfo, Vec<u8>)> {
        let mut s = self.store();
        let id = s.layer_id(name)?;
        let SealState::Sealed(info) = s.seal_state(id)? else {
            return Err(Error::Invalid(format!("layer {name} is not sealed")));
        };
        let bytes = s.sealed_manifest(id)?;
        drop(s);
        let (root, _) = digest::read_manifest(&bytes)?;
        if root != info.root || bytes.len() as u64 != info.manifest_bytes {
            return Err(Error::corrupt(
                0,
                format!("the seal of layer {name} holds a manifest that is not its root's"),
            ));
        }
        Ok((info, bytes))
    }

    /// What the seal of layer id `layer` holds for file `ino`.
    pub fn sealed_file(&self, layer: u64, ino: u64) -> Result<Option<SealedFile>> {
        self.store().sealed_file(layer, ino)
    }

    /// What a seal holds for file `ino` as layer id `layer` shows it: its
    /// own seal's entry, else that of the older frozen layer whose copy of
    /// the file it shows ([`Engine::shared_copy`]).
    pub fn sealed_digest(&self, layer: u64, ino: u64) -> Result<Option<SealedFile>> {
        if let Some(f) = self.sealed_file(layer, ino)? {
            return Ok(Some(f));
        }
        match self.shared_copy(layer, ino)? {
            Some(source) if source != layer => self.sealed_file(source, ino),
            _ => Ok(None),
        }
    }

    /// Seals frozen layer `name` (docs/integrity.md): reads it, off the
    /// store lock, and writes its manifest, file digests and block hashes
    /// into its seal; a partial seal goes on from the files it holds.
    /// Its calls do not count in [`Engine::activity`].
    /// `progress` gets the file bytes hashed so far; `stop` is asked every
    /// MiB read and, when true, sealing stops (Error::Busy) with the files
    /// hashed whole kept (the seal stays partial). A sealed layer returns
    /// its seal at once.
    pub fn seal_layer(
        &self,
        name: &str,
        stop: &dyn Fn() -> bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<SealInfo> {
        let _one = SEALING.lock().unwrap_or_else(|p| p.into_inner());
        let _background = crate::engine::BackgroundWork::begin();
        let layer = self.layer_id(name)?;
        match self.seal_state_by_id(layer)? {
            SealState::Sealed(info) => return Ok(info),
            _ if !self.layer_info_by_id(layer)?.frozen => {
                return Err(Error::Invalid(format!(
                    "layer {name} is writable: only a frozen layer is sealed"
                )))
            }
            _ => {}
        }
        let mut batch = Batch {
            layer,
            items: Vec::new(),
            bytes: 0,
        };
        let mut manifest = ROOT_DOMAIN.to_vec();
        let mut hashed = 0u64;
        let mut file = |a: &Attr, path: &[u8]| -> Result<Sha256Digest> {
            // Hashed already: by a sealing cut short, or, for a file this
            // layer shows unchanged from an older frozen layer, in that
            // layer's seal (verified reads look there too).
            if let Some(f) = self.sealed_digest(layer, a.inode)? {
                if f.size == a.size {
                    hashed += a.size;
                    progress(hashed);
                    return Ok(f.digest);
                }
            }
            // Hashed as its apply wrote it, and still what the device
            // holds (streamed.rs); else read and hashed here.
            let hashed_file = match self.take_streamed(layer, a)? {
                Some(h) => Ok(h),
                None => digest::file_tree(
                    a.size,
                    |off, len| {
                        if stop() {
                            return Err(Error::Busy("sealing stopped".into()));
                        }
                        progress(hashed + off);
                        self.read_local(layer, a.inode, off, len, true, false)
                    },
                    true,
                ),
            };
            let (d, hashes) = match hashed_file {
                Ok(h) => h,
                Err(e) => {
                    // What was hashed whole is kept: sealing again goes on
                    // from it.
                    if matches!(e, Error::Busy(_)) {
                        batch.flush(self)?;
                    }
                    return Err(e);
                }
            };
            for (i, run) in hashes.chunks(HASHES_PER_RUN).enumerate() {
                batch.push(Key::new(a.inode, KIND_SEAL_HASHES, i as u64), run.concat());
            }
            let entry = SealedFile {
                digest: d,
                size: a.size,
                path: path.to_vec(),
            };
            batch.push(Key::new(a.inode, KIND_SEAL_FILE, 0), entry.encode());
            if batch.bytes >= BATCH_BYTES {
                batch.flush(self)?;
            }
            hashed += a.size;
            progress(hashed);
            Ok(d)
        };
        let d = digest::layer_digest_with(self, layer, &mut file, |e| {
            manifest.extend_from_slice(e.bytes)
        })?;
        for (i, chunk) in manifest.chunks(CHUNK_BYTES).enumerate() {
            batch.push(Key::new(0, KIND_SEAL_MANIFEST, i as u64), chunk.to_vec());
        }
        let info = SealInfo {
            root: d.root,
            entries: d.entries,
            files: d.files,
            file_bytes: d.file_bytes,
            manifest_bytes: manifest.len() as u64,
            sealed_at: Timestamp::now(),
        };
        batch.push(head_key(), info.encode());
        batch.flush(self)?;
        self.streamed().forget_layer(layer);
        Ok(info)
    }
}
