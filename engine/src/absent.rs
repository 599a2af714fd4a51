//! Absent blocks: file blocks whose content is not on the device yet, for
//! lazily pulled layers (docs/lazy.md).
//!
//! A lazily mounted layer is built with every file's tree, metadata and
//! size at once; each block of its regular files gets a logical block
//! number whose map entry points at physical block 0 ([`ABSENT`], the
//! superblock's, never file data). Reading such a block is
//! [`Error::Absent`], never zeros. Filling it ([`Engine::fill_absent`])
//! appends the data to the log and points the map entry at it: a change
//! to the address map alone, so every layer that shares the block (the
//! frozen layer's clones, by logical number) sees it, and no frozen tree
//! changes. A fill is durable with the next checkpoint like any write; a
//! crash before it leaves the block absent, to be fetched again.
//!
//! A front end that can fetch registers an [`AbsentFetcher`]: the engine's
//! reads and partial writes call it, off the store lock, for an absent
//! block they meet and then try again; without one, or when it fails, the
//! caller gets the error (EIO).

use crate::device::BLOCK_SIZE;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::format::*;
use crate::fs::{FileKind, MAX_FILE_BYTES};
use crate::store::{Store, Temperature, Tree};
use std::sync::Arc;

/// The physical block an absent block's map entry points at.
pub const ABSENT: u64 = 0;

/// Fetches the content of absent logical block `lbn` (and whatever else it
/// chooses) into the engine with [`Engine::fill_absent`], within its own
/// time bound; an error is returned to the reader.
pub type AbsentFetcher = Arc<dyn Fn(u64) -> Result<()> + Send + Sync>;

/// How many absent blocks one read or write fetches before it gives up
/// (each fetch fills at least the block asked for; a bound against a
/// fetcher that does not).
const FETCH_ROUNDS: usize = 4096;

/// Address map entries [`Engine::absent_among`] reads per hold of the store
/// lock (16 MiB of a file).
const ABSENT_SCAN_BLOCKS: u64 = 4096;

impl Store {
    /// Checks that `ino` of `layer` may get absent blocks; their count
    /// for `size` bytes.
    fn absent_blocks_for(&mut self, layer: u64, ino: u64, size: u64) -> Result<u64> {
        self.writable_layer(layer)?;
        let i = self.inode(layer, ino)?;
        if FileKind::from_mode(i.mode) != Some(FileKind::File) {
            return Err(Error::Invalid(
                "only a regular file has absent blocks".into(),
            ));
        }
        if i.size != 0 || i.blocks != 0 {
            return Err(Error::Invalid(
                "absent blocks go into an empty file only".into(),
            ));
        }
        if size > MAX_FILE_BYTES {
            return Err(Error::FileTooLarge);
        }
        Ok(size.div_ceil(BLOCK_SIZE as u64))
    }

    /// See [`Engine::make_absent_many`]: every file is checked and the
    /// numbers are taken, in a row, before anything changes (the tree
    /// changes that follow take numbers for their nodes).
    fn make_absent(&mut self, layer: u64, files: &[(u64, u64)]) -> Result<(u64, u64)> {
        let mut counts = Vec::with_capacity(files.len());
        let mut seen = std::collections::HashSet::new();
        for &(ino, size) in files {
            if !seen.insert(ino) {
                return Err(Error::Invalid(format!("file {ino} given twice")));
            }
            counts.push(self.absent_blocks_for(layer, ino, size)?);
        }
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Ok((0, 0));
        }
        let first = self.alloc_lbn();
        for _ in 1..total {
            self.alloc_lbn();
        }
        let mut next = first;
        for (&(ino, size), &n) in files.iter().zip(&counts) {
            if n > 0 {
                self.absent_file(layer, ino, size, next, n)?;
                next += n;
            }
        }
        Ok((first, total))
    }

    /// Points file `ino`'s `n` blocks at absent logical blocks `first..`.
    fn absent_file(&mut self, layer: u64, ino: u64, size: u64, first: u64, n: u64) -> Result<()> {
        let mut i = self.inode(layer, ino)?;
        let map = (0..n)
            .map(|b| {
                let v = MapValue {
                    physical_block: ABSENT,
                    checksum: 0,
                    extra_owners: 0,
                };
                (first + b, v)
            })
            .collect();
        self.map_set_many(map)?;
        let extents = (0..n)
            .map(|b| {
                let e = ExtentValue {
                    lbn: first + b,
                    birth_layer: layer,
                    shared: false,
                };
                (Key::new(ino, KIND_EXTENT, b), e.encode())
            })
            .collect();
        let mut root = self.layer(layer)?.root;
        let r = self.insert_sorted(Tree::Layer(layer), &mut root, extents);
        self.set_root(layer, root);
        r?;
        self.charge_layer(layer, n as i64);
        i.size = size;
        i.blocks = n;
        self.put_inode(layer, ino, &i)?;
        self.bump();
        Ok(())
    }

    /// See [`Engine::fill_absent`].
    fn fill_absent(&mut self, lbn: u64, data: &[u8]) -> Result<bool> {
        self.check_writable()?;
        let Some(m) = self.map_get(lbn)? else {
            return Ok(false);
        };
        if m.physical_block != ABSENT {
            return Ok(false);
        }
        self.ensure_space(1, false)?;
        let checksum = data_checksum(data);
        let phys = self.append(Temperature::Cold, BlockTag::Logical(lbn), data, checksum)?;
        self.map_set(
            lbn,
            MapValue {
                physical_block: phys,
                checksum,
                ..m
            },
        )?;
        self.bump();
        Ok(true)
    }
}

impl Engine {
    /// Gives regular files `(ino, size)` of writable `layer` (empty, just
    /// created) `size` bytes of absent blocks each, numbered in a row in
    /// the order given; returns the first number and the count. The files
    /// read as [`Error::Absent`] until their blocks are filled.
    pub fn make_absent_many(&self, layer: u64, files: &[(u64, u64)]) -> Result<(u64, u64)> {
        self.op_then_upkeep(|s| s.make_absent(layer, files))
    }

    /// [`Engine::make_absent_many`] for one file.
    pub fn make_absent(&self, layer: u64, ino: u64, size: u64) -> Result<(u64, u64)> {
        self.make_absent_many(layer, &[(ino, size)])
    }

    /// Fills absent block `lbn` with `data` (a whole block: a file's last
    /// block is padded with zeros). Returns false, changing nothing, when
    /// the block is not absent (filled already, or gone with its layer).
    pub fn fill_absent(&self, lbn: u64, data: &[u8]) -> Result<bool> {
        if data.len() != BLOCK_SIZE {
            return Err(Error::Invalid(format!(
                "an absent block is filled with {BLOCK_SIZE} bytes, not {}",
                data.len()
            )));
        }
        self.op_then_upkeep(|s| s.fill_absent(lbn, data))
    }

    /// Whether logical block `lbn` is absent.
    pub fn is_absent(&self, lbn: u64) -> Result<bool> {
        Ok(self
            .lock()
            .map_get(lbn)?
            .is_some_and(|m| m.physical_block == ABSENT))
    }

    /// Of the blocks `first..first + count`, those still absent. The store
    /// lock is held for 4,096 of them at a time, so a scan of a
    /// whole layer (`lcfs lazy`, the check that a layer is complete) does
    /// not hold up every read and write while it walks the address map.
    pub fn absent_among(&self, first: u64, count: u64) -> Result<Vec<u64>> {
        let end = first.saturating_add(count);
        let mut out = Vec::new();
        let mut at = first;
        while at < end {
            let to = end.min(at.saturating_add(ABSENT_SCAN_BLOCKS));
            let mut s = self.lock();
            for lbn in at..to {
                if s.map_get(lbn)?.is_some_and(|m| m.physical_block == ABSENT) {
                    out.push(lbn);
                }
            }
            drop(s);
            at = to;
        }
        Ok(out)
    }

    /// Sets (or, with None, clears) the fetcher reads call for absent blocks.
    pub fn set_absent_fetcher(&self, f: Option<AbsentFetcher>) {
        *self
            .absent_fetcher()
            .write()
            .unwrap_or_else(|p| p.into_inner()) = f;
    }

    /// Runs `op` until it meets no absent block, fetching each one it
    /// meets (bounded); without a fetcher the error is returned.
    pub(crate) fn fetching<T>(&self, mut op: impl FnMut() -> Result<T>) -> Result<T> {
        for _ in 0..FETCH_ROUNDS {
            match op() {
                Err(Error::Absent(lbn)) => {
                    let f = self
                        .absent_fetcher()
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    let Some(f) = f else {
                        return Err(Error::Absent(lbn));
                    };
                    f(lbn)?;
                    if self.is_absent(lbn)? {
                        return Err(Error::Absent(lbn));
                    }
                }
                r => return r,
            }
        }
        op()
    }
}

#[cfg(test)]
mod tests {
    use crate::device::MemDevice;
    use crate::{Config, Engine, Error, FormatOptions};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn engine() -> (Arc<MemDevice>, Arc<Engine>) {
        let dev = Arc::new(MemDevice::new(64 << 20));
        Engine::format(dev.clone(), &FormatOptions::default()).unwrap();
        let e = Engine::open(dev.clone(), Config::default()).unwrap();
        (dev, e)
    }

    fn content(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// A frozen layer "base" holding /f: 10,000 bytes of absent blocks.
    fn lazy_file(e: &Engine) -> (u64, u64, u64) {
        let l = e.create_layer("base", true).unwrap();
        let a = e
            .create(l, crate::fs::ROOT_INODE, b"f", 0o644, 0, 0)
            .unwrap();
        let (first, n) = e.make_absent(l, a.inode, 10_000).unwrap();
        assert_eq!(n, 3);
        e.commit_layer("base").unwrap();
        (l, a.inode, first)
    }

    fn fill_all(e: &Engine, first: u64, data: &[u8]) {
        for (b, chunk) in data.chunks(4096).enumerate() {
            let mut block = chunk.to_vec();
            block.resize(4096, 0);
            assert!(e.fill_absent(first + b as u64, &block).unwrap());
        }
    }

    #[test]
    fn absent_blocks_are_an_error_until_filled_and_clones_see_the_fill() {
        let (_, e) = engine();
        let (l, ino, first) = lazy_file(&e);
        assert_eq!(e.getattr(l, ino).unwrap().size, 10_000);
        assert!(matches!(e.read(l, ino, 0, 100), Err(Error::Absent(b)) if b == first));
        let c = e.clone_layer("base", "container").unwrap();
        // A partial write in the clone needs the block it merges with.
        assert!(matches!(e.write(c, ino, 10, b"x"), Err(Error::Absent(_))));
        let data = content(10_000);
        fill_all(&e, first, &data);
        assert!(!e.fill_absent(first, &[0; 4096]).unwrap(), "filled once");
        assert_eq!(e.read(l, ino, 0, 20_000).unwrap(), data);
        assert_eq!(e.read(c, ino, 0, 20_000).unwrap(), data);
        e.write(c, ino, 10, b"x").unwrap();
        assert_eq!(
            e.read(l, ino, 0, 20_000).unwrap(),
            data,
            "the image is unchanged"
        );
        let report = e.fsck(true).unwrap();
        assert!(report.is_clean(), "{report:?}");
    }

    /// A scan longer than one hold of the lock finds every absent block,
    /// on both sides of each hold's bound.
    #[test]
    fn absent_among_scans_a_large_file_in_pieces() {
        let (_, e) = engine();
        let l = e.create_layer("big", true).unwrap();
        let a = e
            .create(l, crate::fs::ROOT_INODE, b"f", 0o644, 0, 0)
            .unwrap();
        let n = 2 * super::ABSENT_SCAN_BLOCKS + 10;
        let (first, count) = e.make_absent(l, a.inode, n * 4096).unwrap();
        assert_eq!(count, n);
        let filled = [
            0,
            super::ABSENT_SCAN_BLOCKS - 1,
            super::ABSENT_SCAN_BLOCKS,
            n - 1,
        ];
        for b in filled {
            assert!(e.fill_absent(first + b, &[7; 4096]).unwrap());
        }
        let absent = e.absent_among(first, count).unwrap();
        let want: Vec<u64> = (0..n)
            .filter(|b| !filled.contains(b))
            .map(|b| first + b)
            .collect();
        assert_eq!(absent, want);
        assert_eq!(e.absent_among(first + 1, 0).unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn a_truncation_or_zeroing_of_an_absent_block_changes_nothing_and_is_fetched_first() {
        let (_, e) = engine();
        let (_, ino, first) = lazy_file(&e);
        let c = e.clone_layer("base", "container").unwrap();
        let cut = crate::SetAttr {
            size: Some(100),
            ..Default::default()
        };
        assert!(matches!(e.setattr(c, ino, &cut), Err(Error::Absent(_))));
        let zero = libc::FALLOC_FL_ZERO_RANGE as u32;
        let r = e.fallocate(c, ino, zero, 10, 5000);
        assert!(matches!(r, Err(Error::Absent(_))), "{r:?}");
        assert!(
            e.stats().read_only_reason.is_none(),
            "the engine still writes"
        );
        assert_eq!(e.getattr(c, ino).unwrap().size, 10_000, "nothing changed");
        let data = content(10_000);
        fill_all(&e, first, &data);
        e.setattr(c, ino, &cut).unwrap();
        assert_eq!(e.read(c, ino, 0, 1000).unwrap(), data[..100]);
        assert!(e.fsck(true).unwrap().is_clean());
    }

    #[test]
    fn a_fill_lasts_with_a_checkpoint_and_is_absent_again_after_a_crash_before_one() {
        let (dev, e) = engine();
        let (l, ino, first) = lazy_file(&e);
        e.sync().unwrap();
        let data = content(10_000);
        fill_all(&e, first, &data[..4096]);
        e.crash();
        drop(e);
        let e = Engine::open(dev.clone(), Config::default()).unwrap();
        assert!(
            e.is_absent(first).unwrap(),
            "the fill did not reach a checkpoint"
        );
        assert!(matches!(e.read(l, ino, 0, 10), Err(Error::Absent(_))));
        fill_all(&e, first, &data);
        e.sync().unwrap();
        e.crash();
        drop(e);
        let e = Engine::open(dev, Config::default()).unwrap();
        assert_eq!(e.read(l, ino, 0, 20_000).unwrap(), data);
        assert!(e.fsck(true).unwrap().is_clean());
    }

    #[test]
    fn reads_call_the_fetcher_and_a_failing_fetcher_fails_the_read() {
        let (_, e) = engine();
        let (l, ino, first) = lazy_file(&e);
        let data = content(10_000);
        let calls = Arc::new(AtomicUsize::new(0));
        let weak = Arc::downgrade(&e);
        let (d, c) = (data.clone(), calls.clone());
        e.set_absent_fetcher(Some(Arc::new(move |lbn| {
            c.fetch_add(1, Ordering::SeqCst);
            let e = weak.upgrade().unwrap();
            let b = (lbn - first) as usize * 4096;
            let mut block = d[b..(b + 4096).min(d.len())].to_vec();
            block.resize(4096, 0);
            e.fill_absent(lbn, &block).map(|_| ())
        })));
        assert_eq!(e.read_counted(l, ino, 0, 20_000).unwrap(), data);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "one fetch per absent block"
        );
        let usage = e.layer_info("base").unwrap().usage;
        assert_eq!((usage.reads, usage.bytes_read), (1, 10_000), "counted once");
        assert_eq!(e.read_counted(l, ino, 0, 20_000).unwrap(), data);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "filled blocks are not fetched again"
        );

        let (_, e) = engine();
        let (l, ino, _) = lazy_file(&e);
        e.set_absent_fetcher(Some(Arc::new(|_| Err(Error::Busy("registry away".into())))));
        assert!(matches!(e.read_counted(l, ino, 0, 10), Err(Error::Busy(_))));
    }

    #[test]
    fn removing_a_lazy_layer_frees_its_filled_and_absent_blocks() {
        let (_, e) = engine();
        let before = e.stats().live_bytes;
        let (_, _, first) = lazy_file(&e);
        fill_all(&e, first, &content(4096));
        e.remove_layer("base").unwrap();
        e.reclaim_removed().unwrap();
        e.sync().unwrap();
        assert!(e.fsck(true).unwrap().is_clean());
        assert!(e.stats().live_bytes <= before + 8192);
    }
}
