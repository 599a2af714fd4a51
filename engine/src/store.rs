//! The store: all mutable engine state, held as components with their own
//! modules and private state: the log streams (logstream.rs), segment accounting
//! (space.rs), the address map (addrmap.rs), the layer table (layers.rs)
//! and the node cache (cache.rs) under the copy-on-write B+tree (tree.rs).
//! Checkpoints are in checkpoint.rs, the cleaner in cleaner.rs.
//!
//! This file keeps the device geometry, opening and formatting (recovery is
//! loading the newest checkpoint), and what ties the components together:
//! appends (the log fills a segment, space counts its blocks), the
//! engine-wide failure and mutation state, and the caches shared with code
//! outside the lock (blocks, metadata answers). Everything here runs under
//! the engine lock.

use crate::addrmap::AddressMap;
use crate::cache::{BlockCache, NodeCache};
use crate::device::{AlignedBuf, Device, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::format::*;
use crate::fsynclog::FsyncLog;
use crate::hotfiles::{HotFile, HotFiles};
use crate::layers::LayerTable;
use crate::logstream::Log;
pub(crate) use crate::logstream::Temperature;
use crate::metacache::MetaCache;
use crate::space::Space;
pub(crate) use crate::tree::{Tree, PHYS_TAG, VIRT_TAG};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};

/// Device geometry, fixed at format time.
#[derive(Clone, Debug)]
pub(crate) struct Geometry {
    pub device_blocks: u64,
    pub segment_blocks: u32,
    pub segment_count: u32,
    pub data_start_block: u64,
    pub segtable_start_block: u64,
    pub segtable_blocks: u32,
    pub uuid: [u8; 16],
    pub created_unix_ns: u64,
}

impl Geometry {
    pub fn for_device(device_blocks: u64, segment_blocks: u32) -> Result<Geometry> {
        let seg = segment_blocks as u64;
        // Solve for the segment count: table blocks depend on it.
        let mut count = device_blocks / seg;
        // The fsync log region: 1/64 of the device, at most 4 MiB.
        let fsync_log = (device_blocks / 64).min(FSYNC_LOG_BLOCKS);
        loop {
            let table = count.div_ceil(SEGTABLE_ENTRIES as u64).max(1);
            let data_start = (SUPERBLOCK_SLOTS + 2 * table + fsync_log).div_ceil(seg) * seg;
            if data_start + count * seg <= device_blocks || count == 0 {
                if count < 8 {
                    return Err(Error::Invalid(format!(
                        "device too small: {} KiB gives {count} segments of {} KiB, need 8",
                        device_blocks * 4,
                        seg * 4
                    )));
                }
                let mut uuid = [0u8; 16];
                uuid[..8].copy_from_slice(&rand::random::<u64>().to_le_bytes());
                uuid[8..].copy_from_slice(&rand::random::<u64>().to_le_bytes());
                return Ok(Geometry {
                    device_blocks,
                    segment_blocks,
                    segment_count: count.min(u32::MAX as u64) as u32,
                    data_start_block: data_start,
                    segtable_start_block: SUPERBLOCK_SLOTS,
                    segtable_blocks: table as u32,
                    uuid,
                    created_unix_ns: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0),
                });
            }
            count -= 1;
        }
    }

    /// The fsync log region (first block, blocks): whatever lies between
    /// the segment table's copies and segment 0. Filesystems formatted
    /// before the region was reserved may have none (fewer blocks than a
    /// record needs): their fsyncs checkpoint.
    pub fn fsync_log_region(&self) -> (u64, u64) {
        let start = self.segtable_start_block + 2 * self.segtable_blocks as u64;
        (start, self.data_start_block.saturating_sub(start))
    }

    pub fn segment_start(&self, seg: u32) -> u64 {
        self.data_start_block + seg as u64 * self.segment_blocks as u64
    }

    pub fn segment_of(&self, block: u64) -> Option<u32> {
        if block < self.data_start_block {
            return None;
        }
        let s = (block - self.data_start_block) / self.segment_blocks as u64;
        (s < self.segment_count as u64).then_some(s as u32)
    }
}

/// Engine counters (device-level counters come from the device itself).
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Logical bytes accepted by write calls.
    pub user_write_bytes: u64,
    pub user_write_calls: u64,
    pub log_blocks_appended: u64,
    pub checkpoints: u64,
    pub segments_cleaned: u64,
    pub blocks_relocated: u64,
    /// File bytes a layer took from another layer's blocks instead of
    /// having them written (commit promotion).
    pub promoted_bytes: u64,
    /// Fsyncs made durable by a record in the fsync log, its blocks, and
    /// fsyncs that took a checkpoint instead.
    pub fsync_records: u64,
    pub fsync_record_blocks: u64,
    pub fsync_checkpoints: u64,
    /// Records applied when the engine was opened.
    pub fsync_records_replayed: u64,
}

/// Tunables.
#[derive(Clone, Debug)]
pub struct Config {
    /// Bytes of decoded tree nodes kept in memory.
    pub node_cache_bytes: usize,
    /// Bytes of data blocks cached (shared by all layers).
    pub block_cache_bytes: usize,
    /// Checkpoint when dirty nodes exceed this share of the node cache.
    pub dirty_limit_percent: u8,
    /// Write partially filled segment buffers after this long (0: never on a timer).
    pub flush_interval_ms: u64,
    /// Checkpoint at least this often when something changed (0: only on demand).
    pub checkpoint_interval_ms: u64,
    /// Full segments that may be in flight to the device while the engine
    /// fills the next (0: write synchronously, deterministic for tests).
    pub write_behind_segments: usize,
    /// Make an fsync of one file durable with a record in the fsync log
    /// when possible (false: every fsync checkpoints).
    pub fsync_log: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            node_cache_bytes: 64 << 20,
            block_cache_bytes: 256 << 20,
            dirty_limit_percent: 50,
            flush_interval_ms: 100,
            checkpoint_interval_ms: 5000,
            write_behind_segments: 4,
            fsync_log: true,
        }
    }
}

/// All mutable engine state. One lock guards it (see Engine).
pub(crate) struct Store {
    pub dev: Arc<dyn Device>,
    pub geo: Geometry,
    pub config: Config,
    pub checkpoint_seq: u64,
    pub(crate) space: Space,
    pub(crate) address_map: AddressMap,
    pub(crate) log: Log,
    pub nodes: NodeCache,
    pub blocks: Arc<BlockCache>,
    /// Lookup and getattr answers served without this lock; every change
    /// to a layer invalidates that layer's (see [`MetaCache`]).
    pub(crate) meta: Arc<MetaCache>,
    pub reuse: Arc<RwLock<()>>,
    pub counters: Counters,
    /// Set after a device write failed: the in-memory state may be ahead of
    /// what can be written, so further changes are refused.
    pub failed: Option<String>,
    /// Layer records (few; their trees are paged through `nodes`).
    pub(crate) layers: LayerTable,
    /// Bumped by every change; `durable_generation` is the one last checkpointed.
    pub generation: u64,
    /// See [`Store::mutation_mark`].
    mutations: u64,
    /// Tests: the next change panics once it has changed something.
    #[cfg(any(test, feature = "testing"))]
    pub panic_in_next_change: bool,
    pub durable_generation: u64,
    /// A checkpoint whose device writes run outside the store lock.
    pub(crate) checkpoint_in_flight: Option<crate::checkpoint::CheckpointInFlight>,
    /// Checkpoints begun since open (an online fsck checks that none began
    /// while it read the checkpoint it checks).
    pub(crate) checkpoints_begun: u64,
    /// Changes an fsync can log instead of checkpointing (see crate::fsynclog).
    pub(crate) fsync_log: FsyncLog,
    /// Replaying the fsync log: a checkpoint now would end the records'
    /// validity half-applied, so none may begin.
    pub(crate) replaying: bool,
    /// Reads counted since they were last folded into the layer records:
    /// one entry per layer read, removed by [`Store::fold_reads`] (see
    /// `LayerUsage`).
    pub(crate) pending_reads: HashMap<u64, PendingReads>,
    /// Layers being removed: detached (no record, no name), what they own
    /// freed in steps ([`Store::remove_step`]); for each, the tree nodes
    /// left to walk (see removal.rs). Checkpoints record them.
    pub(crate) removing: BTreeMap<u64, Vec<u64>>,
    /// Removals whose list the next checkpoint writes (or deletes).
    pub(crate) removing_dirty: BTreeSet<u64>,
    /// Set while an operation that may run again is running: its mutation
    /// mark at the start. [`Store::ensure_space`] then answers NeedsRoom
    /// instead of cleaning under the lock, as long as nothing changed.
    pub(crate) room_mark: Option<u64>,
    /// Hot-file summaries of layers that served reads (see hotfiles.rs),
    /// and the ones the next checkpoint writes.
    pub(crate) hot: HashMap<u64, HotFiles>,
    pub(crate) hot_dirty: BTreeSet<u64>,
    /// Layers in their first [`EARLY_READ_SECONDS`]: the distinct inodes
    /// they read so far, at most [`EARLY_FILES_MAX`] each.
    early_inodes: HashMap<u64, HashSet<u64>>,
}

/// Distinct files counted in one layer's start-up window; past this many,
/// `LayerUsage::early_files` stops growing (and says so by equalling it).
pub const EARLY_FILES_MAX: usize = 16_384;

impl Store {
    fn empty(dev: Arc<dyn Device>, geo: Geometry, config: Config) -> Store {
        let mut s = Store::empty_sync(dev, geo, config);
        s.log.start_writer();
        s
    }

    fn empty_sync(dev: Arc<dyn Device>, geo: Geometry, config: Config) -> Store {
        Store {
            log: Log::new(dev.clone(), &geo, config.write_behind_segments),
            dev,
            config: config.clone(),
            checkpoint_seq: 0,
            space: Space::new(&geo),
            address_map: AddressMap::new(),
            nodes: NodeCache::new(config.node_cache_bytes),
            blocks: Arc::new(BlockCache::new(config.block_cache_bytes)),
            meta: Arc::new(MetaCache::new(config.node_cache_bytes / 1024)),
            reuse: Arc::new(RwLock::new(())),
            counters: Counters::default(),
            failed: None,
            layers: LayerTable::new(),
            generation: 0,
            durable_generation: 0,
            checkpoint_in_flight: None,
            checkpoints_begun: 0,
            fsync_log: FsyncLog::new(geo.fsync_log_region(), config.fsync_log),
            replaying: false,
            pending_reads: HashMap::new(),
            removing: BTreeMap::new(),
            removing_dirty: BTreeSet::new(),
            room_mark: None,
            hot: HashMap::new(),
            hot_dirty: BTreeSet::new(),
            early_inodes: HashMap::new(),
            mutations: 0,
            #[cfg(any(test, feature = "testing"))]
            panic_in_next_change: false,
            geo,
        }
    }

    /// Writes a fresh, empty filesystem (no layers) and returns its store.
    pub fn format(dev: Arc<dyn Device>, segment_blocks: u32, config: Config) -> Result<Store> {
        let geo = Geometry::for_device(dev.size_bytes() / BLOCK_SIZE as u64, segment_blocks)?;
        // Invalidate both superblock slots first: a crash mid-format leaves no
        // half-valid filesystem behind.
        let zero = AlignedBuf::new(BLOCK_SIZE * SUPERBLOCK_SLOTS as usize);
        dev.write_at(0, &zero)?;
        dev.flush()?;
        let mut s = Store::empty(dev, geo, config);
        s.checkpoint()?;
        // Both slots valid from the start.
        s.checkpoint()?;
        Ok(s)
    }

    /// Opens the newest valid checkpoint.
    pub fn open(dev: Arc<dyn Device>, config: Config) -> Result<Store> {
        let mut best: Option<Superblock> = None;
        let mut errors = Vec::new();
        // Whether any slot looks like lcfs (its magic, or a slot that could
        // not be read at all): then "not formatted" would be a guess.
        let mut maybe_lcfs = false;
        for slot in 0..SUPERBLOCK_SLOTS {
            let mut b = AlignedBuf::new(BLOCK_SIZE);
            // A slot that cannot be read is skipped: the other one may hold
            // a valid checkpoint.
            if let Err(e) = dev.read_at(slot * BLOCK_SIZE as u64, &mut b) {
                errors.push(format!("superblock slot {slot} unreadable: {e}"));
                maybe_lcfs = true;
                continue;
            }
            maybe_lcfs |= b[..SUPERBLOCK_MAGIC.len()] == SUPERBLOCK_MAGIC;
            match Superblock::decode(&b, slot * BLOCK_SIZE as u64) {
                Ok(sb) => {
                    if best
                        .as_ref()
                        .is_none_or(|b| sb.checkpoint_seq > b.checkpoint_seq)
                    {
                        best = Some(sb);
                    }
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let sb = match best {
            Some(sb) => sb,
            None if maybe_lcfs => {
                return Err(Error::Unopenable(errors.join("; ")));
            }
            None => return Err(Error::NotFormatted),
        };
        if !errors.is_empty() {
            log::info!("superblock slot skipped: {}", errors.join("; "));
        }
        if sb.device_blocks > dev.size_bytes() / BLOCK_SIZE as u64 {
            return Err(Error::Invalid(
                "device is smaller than the filesystem on it".into(),
            ));
        }
        let geo = Geometry {
            device_blocks: sb.device_blocks,
            segment_blocks: sb.segment_blocks,
            segment_count: sb.segment_count,
            data_start_block: sb.data_start_block,
            segtable_start_block: sb.segtable_start_block,
            segtable_blocks: sb.segtable_blocks,
            uuid: sb.uuid,
            created_unix_ns: sb.created_unix_ns,
        };
        let mut s = Store::empty(dev, geo, config);
        s.checkpoint_seq = sb.checkpoint_seq;
        s.log.set_next_batch_seq(sb.next_batch_seq);
        s.address_map = AddressMap::recovered(sb.map_root_block, sb.map_root_checksum, sb.next_lbn);
        s.layers = LayerTable::recovered(sb.layer_table_root, sb.next_layer_id);
        s.space = Space::load(&*s.dev, &s.geo, sb.checkpoint_seq, sb.segtable_checksum)?;
        s.load_layers()?;
        s.durable_generation = 0;
        Ok(s)
    }

    fn load_layers(&mut self) -> Result<()> {
        let mut recs = Vec::new();
        let mut hot = Vec::new();
        let mut removals = Vec::new();
        let root = self.layers.root();
        self.scan(
            Tree::Layer(0),
            root,
            Key::new(0, KIND_LAYER, 0),
            Key::MAX,
            &mut |k, v| {
                if k.kind == KIND_LAYER {
                    recs.push(LayerRecord::decode(v));
                } else if k.kind == KIND_HOT_FILES {
                    hot.push((k.object, HotFiles::decode(v)));
                } else if k.kind == KIND_REMOVAL {
                    removals.push((k.object, v.to_vec()));
                }
                true
            },
        )?;
        for r in recs {
            let r = r?;
            self.layers.insert(r);
        }
        for (layer, h) in hot {
            self.hot.insert(layer, h?);
        }
        for (layer, chunk) in removals {
            self.load_removal(layer, &chunk)?;
        }
        Ok(())
    }

    pub fn check_writable(&self) -> Result<()> {
        match &self.failed {
            Some(m) => Err(Error::Stopped(m.clone())),
            None => Ok(()),
        }
    }

    /// Stops the engine from changing anything from now on (see
    /// [`Error::Stopped`]); the first reason given is the one kept.
    pub fn stop(&mut self, reason: String) {
        if self.failed.is_none() {
            log::error!("lcfs is read-only from now on: {reason}");
            self.failed = Some(reason);
        }
    }

    pub(crate) fn fail<T>(&mut self, e: Error) -> Result<T> {
        self.stop(format!("a device write failed: {e}"));
        Err(e)
    }

    /// Counts changes to what a checkpoint writes (tree nodes, layer
    /// records, space, allocators). A change that fails after this moved
    /// has been applied in part.
    pub fn mutation_mark(&self) -> u64 {
        self.mutations.wrapping_add(self.nodes.mutations())
    }

    pub(crate) fn note_mutation(&mut self) {
        self.mutations = self.mutations.wrapping_add(1);
    }

    /// Runs a step that is complete and consistent when it returns (a
    /// checkpoint, cleaning): its own changes are not part of the change
    /// that triggered it, so they leave [`Store::mutation_mark`] alone.
    pub fn self_contained<T>(&mut self, f: impl FnOnce(&mut Store) -> T) -> T {
        let before = self.mutation_mark();
        let r = f(self);
        let added = self.mutation_mark().wrapping_sub(before);
        self.mutations = self.mutations.wrapping_sub(added);
        r
    }

    // ------------------------------------------------------------ space and log

    /// One fewer live block in the segment holding `block`.
    pub fn release_block(&mut self, block: u64) {
        self.note_mutation();
        if block == crate::absent::ABSENT {
            return; // an absent block holds no physical block
        }
        let log = &self.log;
        self.space.release_block(block, |seg| log.is_open(seg));
    }

    /// An online fsck starts reading a checkpoint: segments that newer
    /// checkpoints free are held, not reused, until it ends.
    pub(crate) fn pin_segments(&mut self) {
        self.space.pin();
    }

    /// An online fsck ended; after the last one the held segments are reusable.
    pub(crate) fn unpin_segments(&mut self) {
        let log = &self.log;
        self.space.unpin(|s| log.is_open(s));
    }

    /// Blocks that can still be written before the device is full.
    pub fn available_blocks(&self) -> u64 {
        self.space.free_blocks() + self.log.open_room_blocks()
    }

    /// Blocks held back for checkpoints and the cleaner.
    pub fn reserve_blocks(&self) -> u64 {
        self.space.reserve_blocks()
    }

    /// Blocks the next checkpoint may need beyond what is already dirty.
    pub fn metadata_estimate(&self, data_blocks: u64) -> u64 {
        // Dirty nodes (and the map nodes they will dirty), summaries, and slack
        // for the nodes this operation will touch.
        let dirty = self.nodes.dirty_count() as u64;
        2 * dirty + 64 + data_blocks / 16 + data_blocks / SUMMARY_ENTRIES as u64
    }

    pub fn live_blocks_total(&self) -> u64 {
        self.space.live_blocks_total()
    }

    /// Stops the engine on a log error: every one is a device error, after
    /// which the in-memory log is ahead of the device.
    fn log_result<T>(&mut self, r: Result<T>) -> Result<T> {
        r.or_else(|e| self.fail(e))
    }

    fn open_segment(&mut self, t: Temperature) -> Result<u32> {
        let Some(seg) = self.space.open_segment(self.log.next_batch_seq()) else {
            return Err(Error::NoSpace);
        };
        // Wait for readers that resolved addresses in this segment's old life.
        drop(self.reuse.write().unwrap_or_else(|p| p.into_inner()));
        let start = self.geo.segment_start(seg);
        self.blocks
            .invalidate_range(start, start + self.geo.segment_blocks as u64);
        self.log.start_segment(t, seg);
        Ok(seg)
    }

    /// Writes the unwritten part of a stream's segment in one device write.
    pub fn write_out(&mut self, t: Temperature) -> Result<()> {
        let r = self.log.write_out(t);
        self.log_result(r)
    }

    fn retire_stream(&mut self, t: Temperature) -> Result<()> {
        self.write_out(t)?;
        if let Some(seg) = self.log.detach(t) {
            self.space.closed(seg);
        }
        Ok(())
    }

    /// Makes sure stream `t` can take one more block, retiring its full
    /// segment and opening a new one if needed.
    fn make_room(&mut self, t: Temperature) -> Result<()> {
        if !self.log.has_room(t) {
            self.retire_stream(t)?;
            self.open_segment(t)?;
        }
        Ok(())
    }

    /// Appends one block to a log stream; returns its physical block.
    pub fn append(
        &mut self,
        t: Temperature,
        tag: BlockTag,
        data: &[u8],
        checksum: u64,
    ) -> Result<u64> {
        debug_assert_eq!(data.len(), BLOCK_SIZE);
        self.note_mutation();
        self.make_room(t)?;
        let p = self.log.push(t, tag, data, checksum);
        self.space.add_live(p.seg);
        self.counters.log_blocks_appended += 1;
        if p.segment_full {
            if self.log.writes_behind() {
                self.hand_off(t)?;
            } else {
                self.write_out(t)?;
            }
        }
        Ok(p.block)
    }

    /// The physical block the next append to stream `t` will use, opening a
    /// segment first if needed (a node must name its own address).
    pub(crate) fn peek_next_block(&mut self, t: Temperature) -> Result<u64> {
        self.make_room(t)?;
        Ok(self.log.next_block(t))
    }

    /// Gives a full segment to the writer thread and detaches it from the stream.
    fn hand_off(&mut self, t: Temperature) -> Result<()> {
        let seg = self.log.hand_off(t);
        self.space.closed(seg);
        let r = self.log.reap_to_limit();
        self.log_result(r)
    }

    /// Gives back the buffers of log writes that have completed, without
    /// waiting for any.
    pub(crate) fn reap_finished(&mut self) -> Result<()> {
        let r = self.log.reap_finished();
        self.log_result(r)
    }

    /// Waits for every handed-off segment write.
    pub fn wait_inflight(&mut self) -> Result<()> {
        let r = self.log.wait_inflight();
        self.log_result(r)
    }

    /// The bytes of `block` if it is still in a stream buffer.
    pub fn buffered_block(&self, block: u64) -> Option<&[u8]> {
        self.log.buffered_block(block)
    }

    /// Reads one block (stream buffers first), into a fresh aligned buffer.
    pub fn read_block(&self, block: u64) -> Result<AlignedBuf> {
        let mut b = AlignedBuf::new(BLOCK_SIZE);
        if let Some(d) = self.buffered_block(block) {
            b.copy_from_slice(d);
        } else {
            self.dev.read_at(block * BLOCK_SIZE as u64, &mut b)?;
        }
        Ok(b)
    }

    // ------------------------------------------------------------ layers

    /// Marks a layer record for the next checkpoint.
    pub fn mark_layer_dirty(&mut self, layer: u64) {
        self.note_mutation();
        self.meta.layer_changed(layer);
        self.layers.mark_dirty(layer);
    }

    /// Counts one read of `bytes` of inode `ino` served from `layer`'s
    /// directory (see `LayerUsage::reads` and hotfiles.rs);
    /// [`Store::fold_reads`] makes it part of the layer's record. Returns
    /// the layer's start-up (creation to this read) in nanoseconds when this
    /// is its first read. Counts nothing while statistics are off
    /// (`set_stats_enabled`).
    pub fn count_read(&mut self, layer: u64, ino: u64, bytes: u64) -> Option<u64> {
        if !crate::histogram::stats_enabled() {
            return None;
        }
        let l = self.layers.get(layer)?;
        let (created, first_read) = (l.created, l.usage.first_read);
        let now = Timestamp::now();
        let e = self.pending_reads.entry(layer).or_default();
        e.reads += 1;
        e.bytes += bytes;
        let mut startup_ns = None;
        if first_read == Timestamp::default() && e.first.is_none() {
            e.first = Some(now);
            let usage = LayerUsage {
                first_read: now,
                ..LayerUsage::default()
            };
            startup_ns = usage.startup_ns(created);
        }
        if now.seconds - created.seconds < EARLY_READ_SECONDS {
            e.early_reads += 1;
            e.early_bytes += bytes;
            let seen = self.early_inodes.entry(layer).or_default();
            if seen.len() < EARLY_FILES_MAX && seen.insert(ino) {
                e.early_files += 1;
            }
        }
        self.hot.entry(layer).or_default().add(ino, 1, bytes, 0);
        self.hot_dirty.insert(layer);
        startup_ns
    }

    /// Moves the counted reads into the layer records, for the next
    /// checkpoint to write (with the hot-file summaries read since). Not a
    /// change of the filesystem: it leaves the mutation mark and the
    /// layers' cached lookups alone, and a crash before the checkpoint only
    /// loses the counts. Kept in memory while the engine does not write.
    pub fn fold_reads(&mut self) {
        if self.pending_reads.is_empty() || self.check_writable().is_err() {
            return;
        }
        for (layer, pending) in std::mem::take(&mut self.pending_reads) {
            if let Some(l) = self.layers.get_mut(layer) {
                pending.add_to(&mut l.usage);
                self.layers.mark_dirty(layer);
            }
        }
        let now = Timestamp::now().seconds;
        let layers = &self.layers;
        self.early_inodes.retain(|id, _| {
            layers
                .get(*id)
                .is_some_and(|l| now - l.created.seconds < EARLY_READ_SECONDS)
        });
        self.generation += 1;
    }

    /// A layer's hot files, most read first (see hotfiles.rs).
    pub(crate) fn hot_files(&self, layer: u64) -> Vec<HotFile> {
        self.hot.get(&layer).map(|h| h.top()).unwrap_or_default()
    }

    /// At a layer's removal: merges its hot files into its parent's (those
    /// the parent has too: a file the layer made is not the parent's) and
    /// deletes its stored summary.
    pub(crate) fn fold_hot_files(&mut self, layer: u64, parent: u64) -> Result<()> {
        self.early_inodes.remove(&layer);
        self.hot_dirty.remove(&layer);
        if let Some(h) = self.hot.remove(&layer) {
            if self.layers.contains(parent) {
                let mut present = HashSet::new();
                for e in h.top() {
                    if self.inode(parent, e.ino).is_ok() {
                        present.insert(e.ino);
                    }
                }
                if !present.is_empty() {
                    let to = self.hot.entry(parent).or_default();
                    to.merge(&h, |ino| present.contains(&ino));
                    self.hot_dirty.insert(parent);
                }
            }
        }
        let key = Key::new(layer, KIND_HOT_FILES, 0);
        let mut root = self.layers.root();
        let r = self.remove(Tree::Layer(0), &mut root, &key);
        self.layers.set_root(root);
        r.map(|_| ())
    }

    /// Records that `bytes` were applied into `layer` (a pulled layer) in
    /// `ns` nanoseconds; durable with the next checkpoint, as the layer is.
    pub fn record_apply(&mut self, layer: u64, bytes: u64, ns: u64) -> Result<()> {
        self.check_writable()?;
        let l = self.layers.get_mut(layer).ok_or(Error::NotFound)?;
        l.usage.applied_bytes = l.usage.applied_bytes.saturating_add(bytes);
        l.usage.apply_ns = l.usage.apply_ns.saturating_add(ns);
        self.mark_layer_dirty(layer);
        self.bump();
        Ok(())
    }

    /// Adds `delta` to the blocks a layer owns.
    pub fn charge_layer(&mut self, owner: u64, delta: i64) {
        if owner == 0 {
            return;
        }
        if let Some(l) = self.layers.get_mut(owner) {
            l.owned_blocks = l.owned_blocks.saturating_add_signed(delta);
            self.mark_layer_dirty(owner);
        }
    }

    /// Drops clean nodes over budget; checkpoints when dirty nodes pass their limit.
    pub fn maintain(&mut self) -> Result<()> {
        let limit = self.nodes.capacity_bytes / 100 * self.config.dirty_limit_percent as usize;
        if self.failed.is_none() && self.nodes.dirty_bytes() > limit.max(1 << 20) {
            self.checkpoint()?;
        }
        self.nodes.evict();
        Ok(())
    }
}

/// Reads of one layer counted since the last fold.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PendingReads {
    pub reads: u64,
    pub bytes: u64,
    /// The first of them, when the layer had no first read before.
    pub first: Option<Timestamp>,
    pub early_reads: u64,
    pub early_bytes: u64,
    pub early_files: u64,
}

impl PendingReads {
    pub fn add_to(&self, u: &mut LayerUsage) {
        u.reads = u.reads.saturating_add(self.reads);
        u.bytes_read = u.bytes_read.saturating_add(self.bytes);
        u.early_reads = u.early_reads.saturating_add(self.early_reads);
        u.early_bytes_read = u.early_bytes_read.saturating_add(self.early_bytes);
        u.early_files = u.early_files.saturating_add(self.early_files);
        if let (Some(first), true) = (self.first, u.first_read == Timestamp::default()) {
            u.first_read = first;
        }
    }
}
