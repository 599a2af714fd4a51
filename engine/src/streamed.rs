//! Digests of files hashed as a writer streams them in: an image layer's
//! apply sees every byte of every file, in order, so it hashes each 4 KiB
//! block as it writes it ([`StreamHasher`]) and hands the hashes to the
//! engine ([`Engine::streamed_file`]). Sealing the layer after its commit
//! takes them instead of reading the file back from the device
//! (docs/integrity.md, "Seal").
//!
//! Nothing is trusted that the device does not confirm: next to each
//! block's SHA-256 the hasher keeps the block's checksum as the engine
//! stores it (xxh3 of the 4 KiB block), and the sealer takes the hashes
//! only when the file's size and every block's stored checksum (a hole for
//! an all-zero block) still match, from metadata alone. A file changed
//! after its apply (a write through the mount before the commit) no longer
//! matches and is read and hashed as before. Kept in memory only, bounded
//! by [`STREAMED_BYTES_MAX`]: past it, or after a restart, files are read.

use crate::device::BLOCK_SIZE as BLOCK;
use crate::digest::{self, Sha256Digest};
use crate::engine::Engine;
use crate::error::Result;
use crate::format::data_checksum;
use crate::fs::Attr;
use crate::read::BlockSource;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// The most memory streamed digests may take, in bytes (40 a block: about
/// 1% of the file data waiting for its seal).
pub(crate) const STREAMED_BYTES_MAX: usize = 64 << 20;
/// Memory one block's record takes.
const BLOCK_RECORD_BYTES: usize = 32 + 8;
/// Blocks of a file checked per hold of the store lock (16 MiB of file).
const CONFIRM_BLOCKS: usize = 4096;

/// Hashes a file's content as it is written from offset 0 to its end, in
/// pieces of any size.
#[derive(Default)]
pub struct StreamHasher {
    hashes: Vec<Sha256Digest>,
    /// Each block's stored checksum; None for an all-zero block (which a
    /// writer may leave as a hole).
    checksums: Vec<Option<u64>>,
    size: u64,
    /// The start of a block not complete yet.
    partial: Vec<u8>,
    /// The file's record would pass [`STREAMED_BYTES_MAX`] alone: nothing
    /// is kept of it (it is read back when sealed).
    too_big: bool,
}

impl StreamHasher {
    pub fn new() -> StreamHasher {
        StreamHasher::default()
    }

    /// The next `data` of the file.
    pub fn update(&mut self, mut data: &[u8]) {
        self.size += data.len() as u64;
        if !self.partial.is_empty() {
            let take = (BLOCK - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() < BLOCK {
                return;
            }
            let block = std::mem::take(&mut self.partial);
            self.block(&block);
        }
        let whole = data.len() / BLOCK * BLOCK;
        for block in data[..whole].chunks(BLOCK) {
            self.block(block);
        }
        self.partial.extend_from_slice(&data[whole..]);
    }

    fn block(&mut self, block: &[u8]) {
        if self.too_big {
            return;
        }
        if (self.hashes.len() + 1) * BLOCK_RECORD_BYTES > STREAMED_BYTES_MAX {
            self.too_big = true;
            self.hashes = Vec::new();
            self.checksums = Vec::new();
            return;
        }
        self.hashes.push(digest::block_hash(block));
        let zero = block.iter().all(|b| *b == 0);
        self.checksums.push((!zero).then(|| stored_checksum(block)));
    }

    /// Bytes hashed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn finish(mut self) -> Option<StreamedFile> {
        if !self.partial.is_empty() {
            let block = std::mem::take(&mut self.partial);
            self.block(&block);
        }
        (!self.too_big).then_some(StreamedFile {
            size: self.size,
            hashes: self.hashes,
            checksums: self.checksums,
        })
    }
}

/// A file's digests as its writer hashed them.
pub(crate) struct StreamedFile {
    size: u64,
    hashes: Vec<Sha256Digest>,
    checksums: Vec<Option<u64>>,
}

impl StreamedFile {
    fn bytes(&self) -> usize {
        self.hashes.len() * BLOCK_RECORD_BYTES
    }

    /// Whether `blocks`, the read plan of the file's blocks from block
    /// `first` on, still hold exactly the bytes hashed there.
    fn matches(&self, first: usize, blocks: &[BlockSource]) -> bool {
        let Some(wanted) = self.checksums.get(first..first + blocks.len()) else {
            return false;
        };
        let zero = data_checksum(&[0u8; BLOCK]);
        blocks
            .iter()
            .zip(wanted)
            .all(|(source, want)| match (source, want) {
                (BlockSource::Hole, None) => true,
                (BlockSource::Hole, Some(_)) => false,
                (BlockSource::Device { checksum, .. }, want) => *checksum == want.unwrap_or(zero),
                (BlockSource::Buffered(bytes), want) => {
                    stored_checksum(bytes) == want.unwrap_or(zero)
                }
            })
    }
}

/// The checksum the engine stores for a block holding `bytes`: a short
/// block (a file's last) is stored zero-padded to 4 KiB.
fn stored_checksum(bytes: &[u8]) -> u64 {
    if bytes.len() == BLOCK {
        return data_checksum(bytes);
    }
    let mut padded = bytes.to_vec();
    padded.resize(BLOCK, 0);
    data_checksum(&padded)
}

/// The streamed digests waiting for their layer's seal.
#[derive(Default)]
pub(crate) struct Streamed {
    files: Mutex<StreamedFiles>,
    /// File bytes sealed from streamed digests, not read back.
    pub(crate) taken_bytes: AtomicU64,
    /// Writers are asked not to hash (nothing seals in the background).
    off: AtomicBool,
}

#[derive(Default)]
struct StreamedFiles {
    by_file: HashMap<(u64, u64), StreamedFile>,
    bytes: usize,
}

impl Streamed {
    fn files(&self) -> std::sync::MutexGuard<'_, StreamedFiles> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put(&self, layer: u64, ino: u64, file: StreamedFile) {
        let mut f = self.files();
        if let Some(old) = f.by_file.remove(&(layer, ino)) {
            f.bytes -= old.bytes();
        }
        if f.bytes + file.bytes() > STREAMED_BYTES_MAX {
            return;
        }
        f.bytes += file.bytes();
        f.by_file.insert((layer, ino), file);
    }

    fn take(&self, layer: u64, ino: u64) -> Option<StreamedFile> {
        let mut f = self.files();
        let file = f.by_file.remove(&(layer, ino))?;
        f.bytes -= file.bytes();
        Some(file)
    }

    /// Drops what is kept of layer `layer` (removed, or sealed).
    pub(crate) fn forget_layer(&self, layer: u64) {
        let mut f = self.files();
        let mut freed = 0;
        f.by_file.retain(|(l, _), file| {
            let keep = *l != layer;
            if !keep {
                freed += file.bytes();
            }
            keep
        });
        f.bytes -= freed;
    }
}

impl Engine {
    /// Records the digests of file `ino` of layer `layer` that `hasher`
    /// computed from every byte written to it, in order from offset 0, for
    /// the layer's seal (see the module comment).
    pub fn streamed_file(&self, layer: u64, ino: u64, hasher: StreamHasher) {
        if let Some(file) = hasher.finish() {
            self.streamed().put(layer, ino, file);
        }
    }

    /// Whether writers should hash files for their layers' seals (on
    /// unless [`Engine::set_streamed_hashes`] turned it off).
    pub fn streamed_hashes_wanted(&self) -> bool {
        !self.streamed().off.load(Ordering::Relaxed)
    }

    /// Turns hashing for seals on or off, for a daemon that seals no layer
    /// in the background; off drops what is kept.
    pub fn set_streamed_hashes(&self, on: bool) {
        let s = self.streamed();
        s.off.store(!on, Ordering::Relaxed);
        if !on {
            let mut f = s.files();
            f.by_file.clear();
            f.bytes = 0;
        }
    }

    /// File bytes sealed from digests hashed as they were written, without
    /// reading them back.
    pub fn sealed_from_stream_bytes(&self) -> u64 {
        self.streamed().taken_bytes.load(Ordering::Relaxed)
    }

    /// The digest and block hashes of file `a` of `layer` from its writer's
    /// streamed digests, when the device still holds what was hashed.
    pub(crate) fn take_streamed(
        &self,
        layer: u64,
        a: &Attr,
    ) -> Result<Option<(Sha256Digest, Vec<Sha256Digest>)>> {
        let Some(file) = self.streamed().take(layer, a.inode) else {
            return Ok(None);
        };
        if file.size != a.size {
            return Ok(None);
        }
        // Checked in pieces, each under its own hold of the store lock.
        let blocks = file.checksums.len();
        let mut first = 0;
        while first < blocks {
            let n = (blocks - first).min(CONFIRM_BLOCKS);
            let plan = self
                .store()
                .read_plan(layer, a.inode, (first * BLOCK) as u64, n * BLOCK)?;
            if plan.blocks.len() != n || !file.matches(first, &plan.blocks) {
                return Ok(None);
            }
            first += n;
        }
        self.streamed()
            .taken_bytes
            .fetch_add(a.size, Ordering::Relaxed);
        Ok(Some((
            digest::digest_of_hashes(a.size, &file.hashes),
            file.hashes,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_of_any_size_hash_as_the_whole() {
        let data: Vec<u8> = (0..3 * BLOCK + 100).map(|i| (i % 251) as u8).collect();
        let mut whole = StreamHasher::new();
        whole.update(&data);
        let mut pieces = StreamHasher::new();
        for piece in data.chunks(777) {
            pieces.update(piece);
        }
        let (a, b) = (whole.finish().unwrap(), pieces.finish().unwrap());
        assert_eq!(a.hashes, b.hashes);
        assert_eq!(a.checksums, b.checksums);
        assert_eq!(a.size, data.len() as u64);
        let (d, hashes) = digest::file_tree(
            data.len() as u64,
            |off, len| Ok(data[off as usize..off as usize + len].to_vec()),
            true,
        )
        .unwrap();
        assert_eq!(a.hashes, hashes);
        assert_eq!(digest::digest_of_hashes(a.size, &a.hashes), d);
    }

    #[test]
    fn only_blocks_that_still_match_confirm() {
        let mut data = vec![7u8; 2 * BLOCK];
        data.extend_from_slice(&[0u8; BLOCK]);
        data.extend_from_slice(b"tail");
        let file = || {
            let mut h = StreamHasher::new();
            h.update(&data);
            Confirm(h.finish().unwrap())
        };
        let mut tail = b"tail".to_vec();
        tail.resize(BLOCK, 0);
        let device = |c: u64| BlockSource::Device {
            physical_block: 9,
            checksum: c,
        };
        let full = data_checksum(&data[..BLOCK]);
        let stored = vec![
            device(full),
            BlockSource::Buffered(data[BLOCK..2 * BLOCK].to_vec()),
            BlockSource::Hole,
            device(data_checksum(&tail)),
        ];
        let size = data.len() as u64;
        assert!(file().confirmed(size, &stored).is_some());
        // An all-zero block written out, not left a hole, matches too.
        let mut written = stored.clone();
        written[2] = device(data_checksum(&[0u8; BLOCK]));
        assert!(file().confirmed(size, &written).is_some());
        // A block rewritten, a hole filled, another size: not confirmed.
        let mut changed = stored.clone();
        changed[1] = device(full ^ 1);
        assert!(file().confirmed(size, &changed).is_none());
        let mut filled = stored.clone();
        filled[0] = BlockSource::Hole;
        assert!(file().confirmed(size, &filled).is_none());
        assert!(file().confirmed(size + 1, &stored).is_none());
        assert!(file().confirmed(size, &stored[..3]).is_none());
        // The sealer checks a file in pieces.
        assert!(file().0.matches(2, &stored[2..]));
        assert!(!file().0.matches(1, &changed[1..3]));
        assert!(!file().0.matches(3, &stored[..2]), "past the file's end");
    }

    /// What the sealer checks: the size, then every block.
    struct Confirm(StreamedFile);

    impl Confirm {
        fn confirmed(&self, size: u64, blocks: &[BlockSource]) -> Option<()> {
            let f = &self.0;
            (f.size == size && blocks.len() == f.checksums.len() && f.matches(0, blocks))
                .then_some(())
        }
    }

    #[test]
    fn a_file_past_the_bound_is_not_kept() {
        let mut h = StreamHasher::new();
        let block = vec![1u8; BLOCK];
        for _ in 0..STREAMED_BYTES_MAX / BLOCK_RECORD_BYTES + 1 {
            h.update(&block);
        }
        assert!(h.hashes.is_empty());
        assert!(h.finish().is_none());
    }

    #[test]
    fn memory_stays_under_the_bound() {
        let s = Streamed::default();
        let blocks = STREAMED_BYTES_MAX / BLOCK_RECORD_BYTES / 2 + 1;
        let big = || StreamedFile {
            size: (blocks * BLOCK) as u64,
            hashes: vec![[0; 32]; blocks],
            checksums: vec![None; blocks],
        };
        s.put(1, 1, big());
        s.put(1, 2, big());
        assert!(s.files().bytes <= STREAMED_BYTES_MAX);
        assert!(s.take(1, 2).is_none(), "past the bound, nothing is kept");
        s.put(2, 1, big());
        assert!(s.take(2, 1).is_none());
        s.forget_layer(1);
        assert_eq!(s.files().bytes, 0);
        s.put(2, 1, big());
        assert!(s.take(2, 1).is_some());
    }
}
