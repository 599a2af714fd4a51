//! The blob cache: blobs kept on the lcfs device, as the files
//! `blobs/<hex digest>` of an internal writable layer ([`LAYER`]). A blob
//! is written to `blobs/partial-<n>` as it arrives and renamed to its
//! digest only once its bytes hash to it, so a name is a verified blob and
//! a crash leaves at most partial files, which the next start deletes. The
//! total is bounded: past [`BlobStore::limit`] the least recently used
//! blobs go.

use lcfs_engine::{Engine, Error, Result, ROOT_INODE};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The layer that holds the cache.
pub const LAYER: &str = "lcfs-mirror";
const BLOBS: &[u8] = b"blobs";
const PARTIAL: &str = "partial-";

/// A cached blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blob {
    pub ino: u64,
    pub size: u64,
    /// Hashed to its digest by this process: written here, or checked
    /// since the cache was opened (what an earlier run left is checked
    /// once, when first served whole).
    pub verified: bool,
}

/// A blob being written.
pub struct Partial {
    pub ino: u64,
    name: String,
}

pub struct BlobStore {
    engine: Arc<Engine>,
    layer: u64,
    dir: u64,
    /// Most bytes kept.
    pub limit: u64,
    index: Mutex<Index>,
    next_partial: AtomicU64,
}

#[derive(Default)]
struct Index {
    /// By hex digest: the blob and when it was last used (a counter).
    blobs: HashMap<String, (Blob, u64)>,
    bytes: u64,
    clock: u64,
}

impl Index {
    /// Takes the least recently used blob (other than `except`) out of the
    /// index: its name and size.
    fn pop_oldest(&mut self, except: Option<&str>) -> Option<(String, u64)> {
        let oldest = self
            .blobs
            .iter()
            .filter(|(h, _)| Some(h.as_str()) != except)
            .min_by_key(|(_, (_, used))| *used)
            .map(|(h, _)| h.clone())?;
        let (b, _) = self.blobs.remove(&oldest).expect("listed");
        self.bytes -= b.size;
        Some((oldest, b.size))
    }
}

/// Whether `s` is 64 lower-case hex digits.
pub fn is_hex_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl BlobStore {
    /// Opens the cache (making its layer the first time), deletes partial
    /// files a crash left and indexes the blobs.
    pub fn open(engine: Arc<Engine>, limit: u64) -> Result<BlobStore> {
        let layer = match engine.layer_id(LAYER) {
            Ok(id) => id,
            Err(Error::NotFound) => engine.create_layer(LAYER, true)?,
            Err(e) => return Err(e),
        };
        let dir = match engine.lookup(layer, ROOT_INODE, BLOBS) {
            Ok(a) => a.inode,
            Err(Error::NotFound) => engine.mkdir(layer, ROOT_INODE, BLOBS, 0o700, 0, 0)?.inode,
            Err(e) => return Err(e),
        };
        let mut index = Index::default();
        for entry in engine.list_dir(layer, dir)? {
            let name = String::from_utf8_lossy(&entry.name).into_owned();
            if name.starts_with(PARTIAL) || !is_hex_digest(&name) {
                engine.unlink(layer, dir, &entry.name)?;
                continue;
            }
            let size = engine.getattr(layer, entry.inode)?.size;
            index.bytes += size;
            index.blobs.insert(
                name,
                (
                    Blob {
                        ino: entry.inode,
                        size,
                        verified: false,
                    },
                    0,
                ),
            );
        }
        Ok(BlobStore {
            engine,
            layer,
            dir,
            limit,
            index: Mutex::new(index),
            next_partial: AtomicU64::new(0),
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The blob `hex`, if cached; counts as a use.
    pub fn get(&self, hex: &str) -> Option<Blob> {
        let mut ix = self.index();
        ix.clock += 1;
        let now = ix.clock;
        ix.blobs.get_mut(hex).map(|(b, used)| {
            *used = now;
            *b
        })
    }

    /// Notes that blob `hex` hashed to its digest.
    pub fn mark_verified(&self, hex: &str) {
        if let Some((b, _)) = self.index().blobs.get_mut(hex) {
            b.verified = true;
        }
    }

    /// Blobs and bytes cached.
    pub fn usage(&self) -> (usize, u64) {
        let ix = self.index();
        (ix.blobs.len(), ix.bytes)
    }

    pub fn begin(&self) -> Result<Partial> {
        let n = self.next_partial.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PARTIAL}{}-{n}", std::process::id());
        let ino = self
            .engine
            .create(self.layer, self.dir, name.as_bytes(), 0o600, 0, 0)?
            .inode;
        Ok(Partial { ino, name })
    }

    /// Writes into partial file `ino` (a [`Partial::ino`]).
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<()> {
        let mut done = 0;
        while done < data.len() {
            done += self
                .engine
                .write(self.layer, ino, offset + done as u64, &data[done..])?;
        }
        Ok(())
    }

    /// Makes a partial file a blob: renamed to its digest (replacing any
    /// copy), indexed; then the least recently used blobs go while the
    /// cache is over its limit.
    pub fn commit(&self, p: Partial, hex: &str, size: u64) -> Result<Blob> {
        self.engine.rename(
            self.layer,
            self.dir,
            p.name.as_bytes(),
            self.dir,
            hex.as_bytes(),
            0,
        )?;
        let blob = Blob {
            ino: p.ino,
            size,
            verified: true,
        };
        let mut ix = self.index();
        ix.clock += 1;
        let now = ix.clock;
        if let Some((old, _)) = ix.blobs.insert(hex.to_string(), (blob, now)) {
            ix.bytes -= old.size;
        }
        ix.bytes += size;
        let mut victims = Vec::new();
        while ix.bytes > self.limit {
            match ix.pop_oldest(Some(hex)) {
                Some(v) => victims.push(v),
                None => break,
            }
        }
        drop(ix);
        for (v, _) in victims {
            self.unlink_evicted(&v);
        }
        Ok(blob)
    }

    /// Evicts the least recently used blobs until at least `bytes` went
    /// (the garbage collector's call when the device is above its high
    /// watermark: a blob can be fetched again, an image costs a pull).
    /// Blobs and bytes evicted.
    pub fn evict(&self, bytes: u64) -> (usize, u64) {
        let (mut n, mut freed) = (0, 0);
        while freed < bytes {
            let Some((v, size)) = self.index().pop_oldest(None) else {
                break;
            };
            self.unlink_evicted(&v);
            n += 1;
            freed += size;
        }
        if n > 0 {
            log::info!("mirror: evicted {n} blob(s), {freed} bytes, for space");
        }
        (n, freed)
    }

    fn unlink_evicted(&self, hex: &str) {
        // A reader holding it open keeps its bytes until it is done.
        if let Err(e) = self.engine.unlink(self.layer, self.dir, hex.as_bytes()) {
            log::warn!("mirror: evicting blob {hex}: {e}");
        }
    }

    /// Deletes a partial file.
    pub fn discard(&self, p: Partial) {
        if let Err(e) = self.engine.unlink(self.layer, self.dir, p.name.as_bytes()) {
            log::warn!("mirror: deleting a partial blob: {e}");
        }
    }

    /// Drops blob `hex` (its bytes do not hash to its name).
    pub fn remove(&self, hex: &str) {
        let mut ix = self.index();
        if let Some((b, _)) = ix.blobs.remove(hex) {
            ix.bytes -= b.size;
            drop(ix);
            let _ = self.engine.unlink(self.layer, self.dir, hex.as_bytes());
        }
    }

    /// Holds `ino` open (its bytes stay readable if it is evicted meanwhile).
    pub fn hold(self: &Arc<Self>, ino: u64) -> Result<Hold> {
        self.engine.open_inode(self.layer, ino)?;
        Ok(Hold {
            store: self.clone(),
            ino,
        })
    }

    pub fn read(&self, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.engine.read(self.layer, ino, offset, len)
    }
}

/// An open blob file; released when dropped.
pub struct Hold {
    store: Arc<BlobStore>,
    ino: u64,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let _ = self.store.engine.release_inode(self.store.layer, self.ino);
    }
}
