//! The fsync log: an fsync of one file made durable by one record in the
//! fsync log region (the file's blocks and inode as they are now) and one
//! flush, instead of a checkpoint of everything changed in every layer.
//!
//! What it tracks, per checkpoint: for each file, the blocks written and
//! the smallest size truncated to since the checkpoint began (or since the
//! file's last record). Only writes and setattr are tracked; any other
//! change to an inode (a new file, a link, a rename, an xattr, fallocate,
//! promotion) makes that file "unloggable" and its fsync checkpoints, as
//! does every fsync in a layer created since the checkpoint. The log is
//! bounded: a record spans at most [`FSYNC_MAX_RECORD_BLOCKS`], the region
//! holds what it holds, and the data blocks logged per checkpoint are
//! capped so that replaying them never needs a checkpoint midway (which
//! would end the records' validity half-applied). Past any bound, fsync
//! checkpoints; a checkpoint starts the region over.
//!
//! Ordering: records are written holding the engine's commit lock, so no
//! checkpoint is in flight and records follow one another. A record is
//! built under the store lock (the changes it names are then in the log
//! stream); the stream tails and the record are written, in any order, then
//! one flush.
//! The blocks it names cannot be reused before the next checkpoint (freed
//! segments are reusable only after one), and after that checkpoint the
//! record is stale anyway.
//!
//! Recovery ([`Store::replay_fsync_log`]) reads the records of the newest
//! checkpoint in order, keeps the segments holding their blocks out of use,
//! verifies each record's data, applies it through the normal write path,
//! and checkpoints. A crash during replay leaves the checkpoint and the
//! records as they were: the next open replays again.

use crate::device::{AlignedBuf, Device, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::format::*;
use crate::fs::FileKind;
use crate::store::Store;
use crate::writer::Completion;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

/// Data blocks logged per checkpoint at most (128 MiB): replay of that
/// much dirties far fewer tree nodes than the dirty limit.
const MAX_LOGGED_BLOCKS: u64 = 32 << 10;
/// Files tracked per checkpoint at most; past it every fsync checkpoints.
const MAX_TRACKED_FILES: usize = 1 << 17;

#[derive(Default)]
struct FileChanges {
    blocks: BTreeSet<u64>,
    min_size: Option<u64>,
    /// Changed in a way a record cannot carry.
    unloggable: bool,
}

/// What an fsync of one file needs.
pub(crate) enum FsyncPlan {
    /// Nothing changed since the file was last made durable.
    Durable,
    /// Only a checkpoint will do.
    Checkpoint(&'static str),
    /// Write this record (see [`FsyncWrite::run`]).
    Write(FsyncWrite),
}

/// A record's device writes, run without the store lock.
pub(crate) struct FsyncWrite {
    dev: Arc<dyn Device>,
    log_writes: Vec<Arc<Completion>>,
    offset: u64,
    record: AlignedBuf,
}

impl FsyncWrite {
    /// The record is written while the writer thread writes the stream
    /// tails: nothing orders them but the flush after both (a record that
    /// lands without its data fails replay's checksums, and its fsync had
    /// not returned).
    pub(crate) fn run(self) -> Result<()> {
        self.dev.write_at(self.offset, &self.record)?;
        for w in &self.log_writes {
            w.wait()
                .map_err(|m| Error::Io(std::io::Error::other(format!("log write: {m}"))))?;
        }
        self.dev.flush()
    }
}

/// Per-checkpoint tracking and the region's fill.
pub(crate) struct FsyncLog {
    /// First block and blocks of the region in use (0 blocks: none).
    start: u64,
    len: u64,
    next_slot: u64,
    next_index: u64,
    logged_blocks: u64,
    files: HashMap<(u64, u64), FileChanges>,
    /// Layers created since the checkpoint began: not in it.
    born_layers: HashSet<u64>,
    /// Too many files to track, or a record write failed: checkpoint.
    overflow: bool,
    /// The write or setattr in progress: its inode changes are tracked.
    scope: Option<(u64, u64)>,
    /// Off (`Config::fsync_log`): every fsync checkpoints.
    enabled: bool,
}

impl FsyncLog {
    pub fn new((start, len): (u64, u64), enabled: bool) -> FsyncLog {
        FsyncLog {
            start,
            len: len.min(FSYNC_LOG_BLOCKS),
            next_slot: 0,
            next_index: 0,
            logged_blocks: 0,
            files: HashMap::new(),
            born_layers: HashSet::new(),
            overflow: false,
            scope: None,
            enabled,
        }
    }

    /// The region (first block, blocks) records are written to and read from.
    pub fn region(&self) -> (u64, u64) {
        (self.start, self.len)
    }

    fn entry(&mut self, layer: u64, ino: u64) -> Option<&mut FileChanges> {
        // A layer created since the checkpoint checkpoints on fsync anyway
        // (an image layer being unpacked needs no tracking).
        if self.overflow || self.born_layers.contains(&layer) {
            return None;
        }
        if self.files.len() >= MAX_TRACKED_FILES && !self.files.contains_key(&(layer, ino)) {
            self.overflow = true;
            self.files.clear();
            return None;
        }
        Some(self.files.entry((layer, ino)).or_default())
    }

    /// Runs `f` as a tracked change of file `ino` (a write or setattr).
    pub fn scoped<T>(s: &mut Store, layer: u64, ino: u64, f: impl FnOnce(&mut Store) -> T) -> T {
        let outer = s.fsync_log.scope.replace((layer, ino));
        let r = f(s);
        s.fsync_log.scope = outer;
        r
    }

    /// An inode was stored: tracked if it is the scoped change's, otherwise
    /// its fsync must checkpoint.
    pub fn inode_changed(&mut self, layer: u64, ino: u64) {
        let tracked = self.scope == Some((layer, ino));
        if let Some(e) = self.entry(layer, ino) {
            e.unloggable |= !tracked;
        }
    }

    /// File blocks `first..=last` were written.
    pub fn wrote(&mut self, layer: u64, ino: u64, first: u64, last: u64) {
        if let Some(e) = self.entry(layer, ino) {
            if e.unloggable {
                return;
            }
            if last - first >= MAX_LOGGED_BLOCKS || e.blocks.len() as u64 > MAX_LOGGED_BLOCKS {
                e.unloggable = true;
                e.blocks.clear();
                return;
            }
            e.blocks.extend(first..=last);
        }
    }

    /// The file was truncated to `size`.
    pub fn truncated(&mut self, layer: u64, ino: u64, size: u64) {
        if let Some(e) = self.entry(layer, ino) {
            e.min_size = Some(e.min_size.map_or(size, |m| m.min(size)));
            let keep = size.div_ceil(BLOCK_SIZE as u64);
            e.blocks.split_off(&keep);
        }
    }

    pub fn layer_born(&mut self, layer: u64) {
        self.born_layers.insert(layer);
    }

    /// Checkpoint phase 1: changes from now on belong to the next one.
    pub fn checkpoint_began(&mut self) {
        self.files.clear();
        self.born_layers.clear();
        self.overflow = false;
    }

    /// Checkpoint phase 3: the region starts over.
    pub fn checkpoint_landed(&mut self) {
        self.next_slot = 0;
        self.next_index = 0;
        self.logged_blocks = 0;
    }

    /// A record write failed: nothing may follow it until a checkpoint.
    pub fn broken(&mut self) {
        self.overflow = true;
        self.files.clear();
        self.next_slot = self.len;
    }
}

impl Store {
    /// What an fsync of `files` ((layer, inode) pairs; concurrent fsyncs
    /// share one record and one flush) needs. The caller holds the commit
    /// lock (no checkpoint in flight); a record to write is built here, and
    /// the changes it carries then count as logged.
    pub(crate) fn fsync_plan(&mut self, files: &[(u64, u64)]) -> Result<FsyncPlan> {
        self.checkpoint_finish()?;
        self.check_writable()?;
        let log = &self.fsync_log;
        if !log.enabled || log.len == 0 {
            return Ok(FsyncPlan::Checkpoint("no fsync log region"));
        }
        if log.overflow {
            return Ok(FsyncPlan::Checkpoint("fsync log full"));
        }
        let mut inodes = Vec::new();
        let mut n = 0u64;
        for &(layer, ino) in files {
            let log = &self.fsync_log;
            if log.born_layers.contains(&layer) {
                return Ok(FsyncPlan::Checkpoint("layer created since the checkpoint"));
            }
            let Some(changes) = log.files.get(&(layer, ino)) else {
                continue;
            };
            if changes.unloggable {
                return Ok(FsyncPlan::Checkpoint(
                    "file changed beyond writes and setattr",
                ));
            }
            n += changes.blocks.len() as u64;
            if log.logged_blocks + n > MAX_LOGGED_BLOCKS {
                return Ok(FsyncPlan::Checkpoint("fsync log data budget spent"));
            }
            let wanted: Vec<u64> = changes.blocks.iter().copied().collect();
            let min_size = changes.min_size.unwrap_or(u64::MAX);
            let inode = self.inode(layer, ino)?;
            let mut blocks = Vec::with_capacity(wanted.len());
            for b in wanted {
                let Some(v) = self.lget(layer, Key::new(ino, KIND_EXTENT, b))? else {
                    return Ok(FsyncPlan::Checkpoint("a written block is gone"));
                };
                let lbn = ExtentValue::decode(&v)?.lbn;
                let m = self
                    .map_get(lbn)?
                    .ok_or_else(|| Error::corrupt(0, format!("file block {lbn} has no address")))?;
                blocks.push(LoggedBlock {
                    block: b,
                    physical_block: m.physical_block,
                    checksum: m.checksum,
                });
            }
            inodes.push(LoggedInode {
                layer,
                ino,
                min_size,
                inode,
                blocks,
            });
        }
        if inodes.is_empty() {
            return Ok(FsyncPlan::Durable);
        }
        let record = FsyncRecord {
            uuid: self.geo.uuid,
            checkpoint_seq: self.checkpoint_seq,
            index: self.fsync_log.next_index,
            inodes,
        };
        let rb = record.blocks();
        let log = &self.fsync_log;
        if rb > FSYNC_MAX_RECORD_BLOCKS || log.next_slot + rb as u64 > log.len {
            return Ok(FsyncPlan::Checkpoint("fsync log region full"));
        }
        // The blocks named go to the device before the record.
        self.write_out(crate::store::Temperature::Hot)?;
        self.write_out(crate::store::Temperature::Cold)?;
        let log_writes = self.log.pending_writes();
        let mut buf = AlignedBuf::new(rb * BLOCK_SIZE);
        record.encode(&mut buf);
        let log = &mut self.fsync_log;
        let offset = (log.start + log.next_slot) * BLOCK_SIZE as u64;
        log.next_slot += rb as u64;
        log.next_index += 1;
        log.logged_blocks += n;
        for i in &record.inodes {
            log.files.remove(&(i.layer, i.ino));
        }
        self.counters.fsync_records += 1;
        self.counters.fsync_record_blocks += rb as u64;
        Ok(FsyncPlan::Write(FsyncWrite {
            dev: self.dev.clone(),
            log_writes,
            offset,
            record: buf,
        }))
    }

    /// Reads the fsync records of the checkpoint just opened, applies them
    /// and checkpoints. Returns how many were applied. Call before anything
    /// else changes the store.
    pub(crate) fn replay_fsync_log(&mut self) -> Result<usize> {
        let records = self.read_fsync_records()?;
        if records.is_empty() {
            return Ok(0);
        }
        // Keep the segments holding logged blocks out of use until the
        // checkpoint that ends the records' validity has landed.
        let withheld: BTreeSet<u32> = records
            .iter()
            .flat_map(|r| &r.inodes)
            .flat_map(|i| &i.blocks)
            .filter_map(|b| self.geo.segment_of(b.physical_block))
            .collect();
        self.space.withhold(&withheld);
        self.replaying = true;
        let r = self.apply_fsync_records(&records);
        self.replaying = false;
        let applied = r?;
        self.checkpoint()?;
        let log = &self.log;
        self.space.release_withheld(|s| log.is_open(s));
        Ok(applied)
    }

    fn read_fsync_records(&mut self) -> Result<Vec<FsyncRecord>> {
        let (start, len) = self.fsync_log.region();
        let mut records = Vec::new();
        if len == 0 {
            return Ok(records);
        }
        let mut buf = AlignedBuf::new(len as usize * BLOCK_SIZE);
        self.dev.read_at(start * BLOCK_SIZE as u64, &mut buf)?;
        let mut slot = 0usize;
        while slot < len as usize {
            let at = &buf[slot * BLOCK_SIZE..];
            let Some(n) = FsyncRecord::claimed_blocks(at, &self.geo.uuid) else {
                break;
            };
            if slot + n > len as usize {
                break;
            }
            let offset = (start + slot as u64) * BLOCK_SIZE as u64;
            let Ok(r) = FsyncRecord::decode(&at[..n * BLOCK_SIZE], offset) else {
                break;
            };
            if r.checkpoint_seq != self.checkpoint_seq || r.index != records.len() as u64 {
                break;
            }
            records.push(r);
            slot += n;
        }
        Ok(records)
    }

    fn apply_fsync_records(&mut self, records: &[FsyncRecord]) -> Result<usize> {
        for (n, r) in records.iter().enumerate() {
            // A record whose data did not all reach the device was never
            // acknowledged (its flush did not return), nor was any after it.
            let mut data = Vec::new();
            for i in &r.inodes {
                let mut d = Vec::with_capacity(i.blocks.len());
                for b in &i.blocks {
                    let mut buf = AlignedBuf::new(BLOCK_SIZE);
                    self.dev
                        .read_at(b.physical_block * BLOCK_SIZE as u64, &mut buf)?;
                    if data_checksum(&buf) != b.checksum {
                        log::warn!(
                            "fsync record {} after checkpoint {}: its data did not reach \
                             the device; it and any after it were never acknowledged",
                            r.index,
                            r.checkpoint_seq
                        );
                        return Ok(n);
                    }
                    d.push(buf);
                }
                data.push(d);
            }
            for (i, d) in r.inodes.iter().zip(&data) {
                self.replay_inode(i, d)?;
            }
            self.counters.fsync_records_replayed += 1;
        }
        Ok(records.len())
    }

    fn replay_inode(&mut self, e: &LoggedInode, data: &[AlignedBuf]) -> Result<()> {
        let skip = |why: &str| {
            log::warn!(
                "fsync record for inode {} of layer {} not applied: {why}",
                e.ino,
                e.layer
            );
            Ok(())
        };
        match self.layers.get(e.layer) {
            Some(l) if !l.frozen => {}
            Some(_) => return skip("the layer is read-only"),
            None => return skip("no such layer"),
        }
        let cur = match self.inode(e.layer, e.ino) {
            Ok(i) => i,
            Err(Error::NotFound) => return skip("no such inode"),
            Err(err) => return Err(err),
        };
        if cur.generation != e.inode.generation
            || FileKind::from_mode(cur.mode) != Some(FileKind::File)
        {
            return skip("another file has that inode number");
        }
        let bs = BLOCK_SIZE as u64;
        self.ensure_space(data.len() as u64, false)?;
        if e.min_size < cur.size {
            self.replay_truncate(e.layer, e.ino, e.min_size)?;
        }
        let mut added = 0;
        for (b, d) in e.blocks.iter().zip(data) {
            added += self.replay_block(e.layer, e.ino, b.block * bs, d)?;
        }
        let mut i = self.inode(e.layer, e.ino)?;
        i.blocks += added;
        self.put_inode(e.layer, e.ino, &i)?;
        // Blocks written past the logged size (the tail of its last block
        // is as logged) go; then the logged attributes.
        self.replay_drop_past(e.layer, e.ino, e.inode.size.div_ceil(bs))?;
        let mut i = self.inode(e.layer, e.ino)?;
        i.size = e.inode.size;
        i.mode = e.inode.mode;
        i.uid = e.inode.uid;
        i.gid = e.inode.gid;
        i.atime = e.inode.atime;
        i.mtime = e.inode.mtime;
        i.ctime = e.inode.ctime;
        self.put_inode(e.layer, e.ino, &i)?;
        self.bump();
        Ok(())
    }
}
