//! The public, thread-safe engine.
//!
//! One mutex guards the store (trees, maps, log buffers). Data reads resolve
//! their block addresses under it and then read the device and the shared
//! block cache outside it, so readers run in parallel; a reader holds the
//! `reuse` read lock until it is done, and a segment is only reused under the
//! write lock, so an address resolved under the mutex stays valid.

use crate::cache::BlockCache;
use crate::device::{
    detect_signature, AlignedBuf, Device, DeviceStats, IoOp, TimedDevice, BLOCK_SIZE,
};
use crate::error::{Error, Result};
use crate::format::Timestamp;
use crate::fs::{Attr, DirEntry, LayerInfo, SetAttr, StatFs};
use crate::fsynclog::FsyncPlan;
use crate::histogram::{stats_enabled, Latencies};
use crate::hotfiles::HotFile;
use crate::metacache::{MetaCache, NameHit};
use crate::read::{execute_plan_checked, unchecked, Checked, Expected, KnownBlock};
use crate::store::{Config, Counters, Store, Temperature};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Options for [`Engine::format`].
#[derive(Clone, Debug)]
pub struct FormatOptions {
    /// Segment size in bytes (a multiple of 4096, 64 KiB to 256 MiB).
    pub segment_size_bytes: u64,
    /// Format even if the device carries another filesystem or lcfs.
    pub force: bool,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            segment_size_bytes: 4 << 20,
            force: false,
        }
    }
}

/// A snapshot of the engine's counters.
#[derive(Clone, Debug)]
pub struct Stats {
    pub backend: &'static str,
    pub device: DeviceStats,
    pub engine: Counters,
    pub node_cache_hits: u64,
    pub node_cache_misses: u64,
    pub node_cache_bytes: usize,
    pub node_cache_nodes: usize,
    pub dirty_nodes: usize,
    pub block_cache_hits: u64,
    pub block_cache_misses: u64,
    pub block_cache_blocks: usize,
    /// Lookups and getattrs answered without the store lock, and those
    /// that took it.
    pub metadata_cache_hits: u64,
    pub metadata_cache_misses: u64,
    pub layers: usize,
    /// Layers removed whose space is not all free yet.
    pub removals_pending: usize,
    pub segments: u32,
    pub segments_free: usize,
    pub segment_size_bytes: u64,
    pub live_bytes: u64,
    pub capacity_bytes: u64,
    pub checkpoint_seq: u64,
    /// Verified reads (verified.rs): blocks checked against a seal, and
    /// reads refused because something differed.
    pub verified_blocks: u64,
    pub verify_failures: u64,
    /// Why the engine refuses changes, once it does (see [`Error::Stopped`]).
    pub read_only_reason: Option<String>,
}

impl Stats {
    /// User write calls per device write: how much coalescing bought.
    pub fn coalescing_ratio(&self) -> f64 {
        if self.device.writes == 0 {
            0.0
        } else {
            self.engine.user_write_calls as f64 / self.device.writes as f64
        }
    }
}

/// State shared by the engine handle and its background thread.
struct Shared {
    store: Mutex<Store>,
    dev: Arc<dyn Device>,
    blocks: Arc<BlockCache>,
    meta: Arc<MetaCache>,
    reuse: Arc<RwLock<()>>,
    commit_lock: Mutex<()>,
    /// Files whose fsync waits for the commit lock (see [`Engine::fsync`]).
    fsync_waiting: Mutex<BTreeSet<(u64, u64)>>,
    crashed: AtomicBool,
    /// Filled by `dev` (a [`TimedDevice`]) and the read and apply paths.
    latencies: Arc<Latencies>,
    /// Set (and notified) to wake the background thread early.
    wake: (Mutex<bool>, Condvar),
    /// Verified reads (verified.rs).
    verifier: crate::verified::Verifier,
    /// Digests hashed as files were written, for their seals (streamed.rs).
    streamed: crate::streamed::Streamed,
    /// Changes and front-end reads so far (not a background thread's):
    /// background work that yields to the rest (sealing) watches it.
    activity: AtomicU64,
    /// Fetches absent blocks for reads (absent.rs).
    absent_fetcher: RwLock<Option<crate::absent::AbsentFetcher>>,
}

fn lock_ignoring_poison<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Takes the store lock. A thread that panicked while holding it may
    /// have left a change half-applied: the engine stops changing anything
    /// (see [`Error::Stopped`]) rather than use that state as if it were
    /// whole.
    fn lock(&self) -> MutexGuard<'_, Store> {
        match self.store.lock() {
            Ok(g) => g,
            Err(poisoned) => {
                let mut g = poisoned.into_inner();
                self.store.clear_poison();
                g.stop("a thread panicked while it held the engine lock".into());
                g
            }
        }
    }

    /// The cleaner, reading its victim segments without the store lock
    /// (moving their live blocks and the checkpoint that frees them still
    /// need it, the checkpoint only for its first and last phase). Returns
    /// the segments freed.
    fn clean_unlocked(&self, urgent: bool, max: usize) -> Result<usize> {
        let victims = self.lock().victims_to_read(urgent, max)?;
        if victims.is_empty() {
            return Ok(0);
        }
        let mut read = Vec::with_capacity(victims.len());
        for v in victims {
            let mut buf = AlignedBuf::new(v.bytes);
            self.dev.read_at(v.offset, &mut buf)?;
            read.push((v, buf));
        }
        // One victim per hold of the lock: moving a segment's live blocks
        // appends (and may write out) megabytes, and reads of other layers
        // wait meanwhile.
        let mut cleaned = Vec::new();
        for one in read {
            cleaned.extend(self.lock().clean_victims(vec![one])?);
        }
        if cleaned.is_empty() {
            return Ok(0);
        }
        let _c = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.checkpoint_unlocked()?;
        Ok(self.lock().count_cleaned(&cleaned))
    }

    /// Runs operation `f` under the store lock, then bounded upkeep (a
    /// checkpoint past the dirty limit, eviction). An operation that fails
    /// after it began to change what a checkpoint writes, or panics, stops
    /// the engine: its half-applied change is never checkpointed. The
    /// result is the operation's own: upkeep that fails has stopped the
    /// engine (and logged why), which the next change reports.
    fn op_then_upkeep<T>(&self, mut f: impl FnMut(&mut Store) -> Result<T>) -> Result<T> {
        // Room made by the cleaner off the lock: an operation that finds
        // the device short of free segments before it changed anything
        // returns NeedsRoom; the cleaner then reads its victims without the
        // store lock and the operation runs again. The last try cleans
        // under the lock, as ensure_space always could.
        let mut tries_left = ROOM_TRIES;
        loop {
            let mut s = self.lock();
            let before = s.mutation_mark();
            s.room_mark = (tries_left > 0).then_some(before);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut s)));
            s.room_mark = None;
            let r = match r {
                Ok(r) => r,
                Err(payload) => {
                    let reason = format!("an operation panicked: {}", panic_message(&*payload));
                    s.stop(reason.clone());
                    return Err(Error::Stopped(reason));
                }
            };
            if matches!(r, Err(Error::NeedsRoom)) && s.mutation_mark() == before {
                let removals = s.removals_pending() > 0;
                drop(s);
                tries_left -= 1;
                // Removed layers' space first, then the cleaner's.
                if removals {
                    self.free_removals(None)?;
                } else if !matches!(self.clean_unlocked(true, 4), Ok(n) if n > 0) {
                    tries_left = 0;
                }
                continue;
            }
            if s.mutation_mark() != before && !BACKGROUND.get() {
                self.activity.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = &r {
                if s.mutation_mark() != before {
                    s.stop(format!(
                        "an operation failed after it had begun to change the filesystem: {e}"
                    ));
                }
            }
            if let Err(e) = s.maintain() {
                log::warn!("upkeep after an operation: {e}");
            }
            return r;
        }
    }

    /// Frees what removed layers own, in steps of [`REMOVE_STEP_NODES`]
    /// nodes each under its own hold of the store lock, the nodes a step
    /// will load read beforehand without the lock, in one batch. Stops
    /// when none is left (true) or at `until` (false).
    fn free_removals(&self, until: Option<Instant>) -> Result<bool> {
        loop {
            self.read_removal_nodes();
            if self.op_then_upkeep(|s| s.remove_step(REMOVE_STEP_NODES))? {
                return Ok(true);
            }
            if until.is_some_and(|t| Instant::now() >= t) {
                return Ok(false);
            }
        }
    }

    /// Reads the nodes the next removal step will load, without the store
    /// lock, and caches them. Best effort: what fails to read here, the
    /// step reads (and reports) itself.
    fn read_removal_nodes(&self) {
        let (plan, guard) = {
            let mut s = self.lock();
            match s.removal_reads(REMOVE_STEP_NODES) {
                Ok(plan) if !plan.is_empty() => (plan, self.reuse.read()),
                _ => return,
            }
        };
        let mut bufs: Vec<AlignedBuf> = plan.iter().map(|_| AlignedBuf::new(BLOCK_SIZE)).collect();
        let mut ops: Vec<IoOp<'_>> = plan
            .iter()
            .zip(bufs.iter_mut())
            .map(|(r, b)| IoOp::Read {
                offset: r.offset(),
                buf: &mut b[..],
            })
            .collect();
        let ok = self.dev.submit(&mut ops).is_ok();
        drop(ops);
        drop(guard);
        if ok {
            self.lock()
                .install_removal_reads(plan.into_iter().zip(bufs).collect());
        }
    }

    /// Wakes the background thread before its next tick.
    fn wake_background(&self) {
        *lock_ignoring_poison(&self.wake.0) = true;
        self.wake.1.notify_all();
    }

    /// The background thread's sleep: one tick, or less when woken.
    fn sleep(&self, tick: Duration) {
        let woken = lock_ignoring_poison(&self.wake.0);
        let mut woken = self
            .wake
            .1
            .wait_timeout_while(woken, tick, |w| !*w)
            .unwrap_or_else(|p| p.into_inner())
            .0;
        *woken = false;
    }

    /// A checkpoint whose device writes and flushes run without the store
    /// lock (see crate::checkpoint). The caller holds `commit_lock`.
    fn checkpoint_unlocked(&self) -> Result<()> {
        let write = self.lock().checkpoint_begin()?;
        // The result reaches checkpoint_finish through the completion.
        let _ = write.run();
        self.lock().checkpoint_finish()
    }
}

thread_local! {
    /// Set while this thread does background work (sealing): its calls do
    /// not count in [`Engine::activity`].
    static BACKGROUND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calls this thread makes, while it lives, as background work.
pub(crate) struct BackgroundWork(bool);

impl BackgroundWork {
    pub(crate) fn begin() -> BackgroundWork {
        BackgroundWork(BACKGROUND.replace(true))
    }
}

impl Drop for BackgroundWork {
    fn drop(&mut self) {
        BACKGROUND.set(self.0);
    }
}

/// A layer's info with its seal's state (a read of the seal's header).
fn info_with_seal(s: &mut Store, id: u64) -> Result<LayerInfo> {
    let mut info = s.layer_info(id)?;
    info.seal = s
        .seal_state(id)
        .unwrap_or_else(|e| crate::SealState::Unreadable(e.to_string()));
    Ok(info)
}

/// The text of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The layer store. Cheap to share: wrap it in an `Arc`. Dropping the last
/// handle stops the background thread, checkpoints and closes the device
/// before `drop` returns.
pub struct Engine {
    s: Arc<Shared>,
    stop: Arc<AtomicBool>,
    background: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Writes an empty lcfs onto `dev`. Refuses a device that carries a
    /// filesystem signature (or an lcfs) unless `force`.
    pub fn format(dev: Arc<dyn Device>, opts: &FormatOptions) -> Result<()> {
        let seg = opts.segment_size_bytes;
        if seg % BLOCK_SIZE as u64 != 0 || !(64 << 10..=256 << 20).contains(&seg) {
            return Err(Error::Invalid(format!(
                "segment size {seg} must be a multiple of 4096 in 64 KiB..256 MiB"
            )));
        }
        if !opts.force {
            if let Some(sig) = detect_signature(&*dev)? {
                return Err(Error::Signature(sig));
            }
            // Anything but "no lcfs here" refuses: an lcfs that cannot be
            // opened (both superblocks corrupt or unreadable, a tree that
            // fails to load) may still be recoverable, and formatting it
            // would lose that.
            match Store::open(dev.clone(), Config::default()) {
                Ok(_) => return Err(Error::Signature("lcfs".into())),
                Err(Error::NotFormatted) => {}
                Err(e) => {
                    return Err(Error::Signature(format!(
                        "lcfs that cannot be opened ({e})"
                    )))
                }
            }
        }
        let cfg = Config {
            block_cache_bytes: 0,
            ..Config::default()
        };
        Store::format(dev, (seg / BLOCK_SIZE as u64) as u32, cfg)?;
        Ok(())
    }

    /// Opens the newest checkpoint on `dev` and starts the background thread.
    pub fn open(dev: Arc<dyn Device>, config: Config) -> Result<Arc<Engine>> {
        let latencies = Arc::new(Latencies::default());
        let dev: Arc<dyn Device> = Arc::new(TimedDevice::new(dev, latencies.clone()));
        let mut store = Store::open(dev.clone(), config.clone())?;
        let replayed = store.replay_fsync_log()?;
        if replayed > 0 {
            log::info!("applied {replayed} fsync records written after the last checkpoint");
        }
        store.purge_orphans()?;
        log::info!(
            "opened lcfs: {} segments of {} KiB, {} layers ({} removed, being freed), \
             checkpoint {}, backend {}",
            store.geo.segment_count,
            store.geo.segment_blocks * 4,
            store.layers.len(),
            store.removals_pending(),
            store.checkpoint_seq,
            dev.backend()
        );
        let shared = Arc::new(Shared {
            blocks: store.blocks.clone(),
            meta: store.meta.clone(),
            reuse: store.reuse.clone(),
            store: Mutex::new(store),
            dev,
            commit_lock: Mutex::new(()),
            fsync_waiting: Mutex::new(BTreeSet::new()),
            crashed: AtomicBool::new(false),
            latencies,
            wake: (Mutex::new(false), Condvar::new()),
            verifier: Default::default(),
            streamed: Default::default(),
            activity: AtomicU64::new(0),
            absent_fetcher: RwLock::new(None),
        });
        let engine = Arc::new(Engine {
            s: shared.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            background: Mutex::new(None),
        });
        for l in engine.list_layers() {
            if let Ok(m) = engine.layer_metadata(&l.name) {
                engine.note_layer_flag(l.id, &m);
            }
        }
        if config.flush_interval_ms > 0 || config.checkpoint_interval_ms > 0 {
            let stop = engine.stop.clone();
            let h = std::thread::Builder::new()
                .name("lcfs-background".into())
                .spawn(move || background(shared, stop, config))
                .map_err(Error::Io)?;
            *engine.background.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        }
        Ok(engine)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Store> {
        self.s.lock()
    }

    pub(crate) fn absent_fetcher(&self) -> &RwLock<Option<crate::absent::AbsentFetcher>> {
        &self.s.absent_fetcher
    }

    pub(crate) fn verifier(&self) -> &crate::verified::Verifier {
        &self.s.verifier
    }

    pub(crate) fn streamed(&self) -> &crate::streamed::Streamed {
        &self.s.streamed
    }

    /// The store, under its lock (for the engine's own modules).
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        self.s.lock()
    }

    /// A change run as [`Shared::op_then_upkeep`] runs it (for the engine's
    /// own modules).
    pub(crate) fn store_op<T>(&self, f: impl FnMut(&mut Store) -> Result<T>) -> Result<T> {
        self.s.op_then_upkeep(f)
    }

    /// Changes and front-end reads ([`Engine::read_counted`]) so far, not
    /// counting background work (sealing): unchanged over a while, the
    /// engine is idle. Queries of metadata do not count.
    pub fn activity(&self) -> u64 {
        self.s.activity.load(Ordering::Relaxed)
    }

    /// See [`Shared::op_then_upkeep`].
    pub(crate) fn op_then_upkeep<T>(&self, f: impl FnMut(&mut Store) -> Result<T>) -> Result<T> {
        self.s.op_then_upkeep(f)
    }

    // ------------------------------------------------------------ layers

    /// Creates an empty base layer (`cold`: data goes to the cold log, for image layers).
    pub fn create_layer(&self, name: &str, cold: bool) -> Result<u64> {
        self.op_then_upkeep(|s| s.create_layer(name, None, cold))
    }

    /// Clones `parent` into a new writable layer `name`; freezes the parent. O(1).
    pub fn clone_layer(&self, parent: &str, name: &str) -> Result<u64> {
        self.op_then_upkeep(|s| s.create_layer(name, Some(parent), false))
    }

    /// Like [`Engine::clone_layer`] with a choice of log temperature.
    pub fn clone_layer_with(&self, parent: &str, name: &str, cold: bool) -> Result<u64> {
        self.op_then_upkeep(|s| s.create_layer(name, Some(parent), cold))
    }

    /// Creates a layer (a clone of `parent`, or an empty base layer) with
    /// its metadata, in one change: no checkpoint can hold one without the
    /// other.
    pub fn create_layer_with_metadata(
        &self,
        name: &str,
        parent: Option<&str>,
        cold: bool,
        metadata: &crate::LayerMetadata,
    ) -> Result<u64> {
        crate::metadata::encode(metadata)?;
        let id = self.op_then_upkeep(|s| {
            let id = s.create_layer(name, parent, cold)?;
            s.set_layer_metadata(id, metadata)?;
            Ok(id)
        })?;
        self.note_layer_flag(id, metadata);
        Ok(id)
    }

    /// Sets (Some) or clears (None) the most bytes layer `name` may own:
    /// data and tree nodes it wrote, as `LayerInfo::owned_bytes` counts
    /// them. Writes past it fail with ENOSPC; deleting files gives the room
    /// back. A limit below what the layer owns already is refused. Durable
    /// with the next checkpoint, like every change.
    pub fn set_layer_quota(&self, name: &str, quota_bytes: Option<u64>) -> Result<()> {
        self.op_then_upkeep(|s| {
            let id = s.layer_id(name)?;
            s.set_layer_quota(id, quota_bytes.unwrap_or(0))
        })
    }

    /// A layer's metadata (empty when none was set).
    pub fn layer_metadata(&self, name: &str) -> Result<crate::LayerMetadata> {
        self.op_then_upkeep(|s| {
            let id = s.layer_id(name)?;
            s.layer_metadata(id)
        })
    }

    /// Replaces a layer's metadata; frozen layers accept it too.
    pub fn set_layer_metadata(&self, name: &str, metadata: &crate::LayerMetadata) -> Result<()> {
        let id = self.op_then_upkeep(|s| {
            let id = s.layer_id(name)?;
            s.set_layer_metadata(id, metadata).map(|_| id)
        })?;
        self.note_layer_flag(id, metadata);
        Ok(())
    }

    /// Freezes a layer and replaces its metadata, in one change.
    pub fn commit_layer_with_metadata(
        &self,
        name: &str,
        metadata: &crate::LayerMetadata,
    ) -> Result<()> {
        crate::metadata::encode(metadata)?;
        let id = self.op_then_upkeep(|s| {
            let id = s.layer_id(name)?;
            s.freeze_layer(id)?;
            s.set_layer_metadata(id, metadata).map(|_| id)
        })?;
        self.note_layer_flag(id, metadata);
        Ok(())
    }

    /// Freezes a layer (commit). O(1); durable at the next sync.
    pub fn commit_layer(&self, name: &str) -> Result<()> {
        self.op_then_upkeep(|s| {
            let id = s.layer_id(name)?;
            s.freeze_layer(id)
        })
    }

    /// Removes a childless layer and frees what it alone owns.
    pub fn remove_layer(&self, name: &str) -> Result<()> {
        self.begin_removal(name)?;
        // What it owned is freed in steps, the store lock let go between
        // them: by the background thread when there is one (the caller
        // does not wait for it), else here.
        let background = lock_ignoring_poison(&self.background).is_some();
        if background {
            self.s.wake_background();
            Ok(())
        } else {
            self.s.free_removals(None).map(|_| ())
        }
    }

    /// Frees now, in steps, what removed layers still own (the background
    /// thread does it too, a bounded time per tick): for a caller that
    /// wants the space back before it goes on.
    pub fn reclaim_removed(&self) -> Result<()> {
        self.s.free_removals(None).map(|_| ())
    }

    /// Layers removed whose space is not all free yet.
    pub fn removals_pending(&self) -> usize {
        self.lock().removals_pending()
    }

    /// The first part of [`Engine::remove_layer`]: the layer is gone by
    /// name, what it owned is not freed yet (the steps free it).
    fn begin_removal(&self, name: &str) -> Result<()> {
        let id = self.op_then_upkeep(|s| {
            let id = s.layer_id(name)?;
            s.begin_remove_layer(id).map(|_| id)
        })?;
        self.note_layer_flag(id, &Default::default());
        self.verifier().forget(id);
        self.streamed().forget_layer(id);
        Ok(())
    }

    /// What a layer changed against its parent (everything, for a base
    /// layer), computed from the nodes the layer owns: O(changes).
    pub fn layer_changes(&self, name: &str) -> Result<Vec<crate::diff::Change>> {
        self.op_then_upkeep(|s| {
            let id = s.layer_id(name)?;
            s.layer_changes(id)
        })
    }

    /// The oldest frozen layer whose copy of file `ino` is the one `layer`
    /// sees (None when `layer` is writable and changed or created the file):
    /// layers that get the same answer for `ino` read the same inode, data
    /// and xattrs there. O(tree depth) per layer of the chain walked.
    pub fn shared_copy(&self, layer: u64, ino: u64) -> Result<Option<u64>> {
        self.lock().shared_copy(layer, ino)
    }

    pub fn layer_id(&self, name: &str) -> Result<u64> {
        self.lock().layer_id(name)
    }

    pub fn layer_info(&self, name: &str) -> Result<LayerInfo> {
        let mut s = self.lock();
        let id = s.layer_id(name)?;
        info_with_seal(&mut s, id)
    }

    pub fn layer_info_by_id(&self, id: u64) -> Result<LayerInfo> {
        info_with_seal(&mut self.lock(), id)
    }

    /// A layer's parent, next inode number and whether it is frozen: what
    /// a mount asks on every open, far cheaper than
    /// [`Engine::layer_info_by_id`] (no names, no seal).
    pub fn layer_shape(&self, id: u64) -> Result<crate::LayerShape> {
        self.lock().layer_shape(id)
    }

    /// Every layer, ordered by id.
    pub fn list_layers(&self) -> Vec<LayerInfo> {
        let mut s = self.lock();
        let mut ids: Vec<u64> = s.layers.ids().collect();
        ids.sort_unstable();
        ids.into_iter()
            .filter_map(|id| info_with_seal(&mut s, id).ok())
            .collect()
    }

    // ------------------------------------------------------------ files

    /// Answers a repeated lookup of an unchanged layer without the store
    /// lock (see the metadata cache in `metacache.rs`).
    pub fn lookup(&self, layer: u64, dir: u64, name: &[u8]) -> Result<Attr> {
        if name.len() <= crate::fs::NAME_MAX {
            match self.s.meta.lookup(layer, dir, name) {
                Some(NameHit::Found(a)) => return Ok(a),
                Some(NameHit::Missing) => return Err(Error::NotFound),
                None => {}
            }
        }
        self.op_then_upkeep(|s| s.lookup(layer, dir, name))
    }

    /// Answers a repeated getattr of an unchanged layer without the store lock.
    pub fn getattr(&self, layer: u64, ino: u64) -> Result<Attr> {
        if let Some(a) = self.s.meta.attr(layer, ino) {
            return Ok(a);
        }
        self.op_then_upkeep(|s| s.getattr_kept(layer, ino))
    }

    pub fn setattr(&self, layer: u64, ino: u64, attr: &SetAttr) -> Result<Attr> {
        // A truncation inside a block keeps the block's head: fetched
        // first when absent.
        self.fetching(|| self.op_then_upkeep(|s| s.setattr(layer, ino, attr)))
    }

    /// Creates a regular file.
    pub fn create(
        &self,
        layer: u64,
        dir: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        self.op_then_upkeep(|s| {
            s.make_node(
                layer,
                dir,
                name,
                crate::fs::S_IFREG | (mode & 0o7777),
                0,
                uid,
                gid,
                None,
            )
        })
    }

    /// Creates any kind of node but a symlink: `mode` carries the type bits.
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        layer: u64,
        dir: u64,
        name: &[u8],
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        if crate::fs::FileKind::from_mode(mode) == Some(crate::fs::FileKind::Symlink) {
            return Err(Error::Invalid("use symlink".into()));
        }
        self.op_then_upkeep(|s| s.make_node(layer, dir, name, mode, rdev, uid, gid, None))
    }

    pub fn mkdir(
        &self,
        layer: u64,
        dir: u64,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        self.op_then_upkeep(|s| {
            s.make_node(
                layer,
                dir,
                name,
                crate::fs::S_IFDIR | (mode & 0o7777),
                0,
                uid,
                gid,
                None,
            )
        })
    }

    pub fn symlink(
        &self,
        layer: u64,
        dir: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        self.op_then_upkeep(|s| {
            s.make_node(
                layer,
                dir,
                name,
                crate::fs::S_IFLNK | 0o777,
                0,
                uid,
                gid,
                Some(target),
            )
        })
    }

    pub fn readlink(&self, layer: u64, ino: u64) -> Result<Vec<u8>> {
        self.op_then_upkeep(|s| s.readlink(layer, ino))
    }

    pub fn unlink(&self, layer: u64, dir: u64, name: &[u8]) -> Result<()> {
        self.op_then_upkeep(|s| s.unlink(layer, dir, name, false))
    }

    pub fn rmdir(&self, layer: u64, dir: u64, name: &[u8]) -> Result<()> {
        self.op_then_upkeep(|s| s.unlink(layer, dir, name, true))
    }

    /// Renames within one layer; `flags` takes RENAME_NOREPLACE or RENAME_EXCHANGE.
    pub fn rename(
        &self,
        layer: u64,
        from_dir: u64,
        from: &[u8],
        to_dir: u64,
        to: &[u8],
        flags: u32,
    ) -> Result<()> {
        self.op_then_upkeep(|s| s.rename(layer, from_dir, from, to_dir, to, flags))
    }

    /// Adds a hard link.
    pub fn link(&self, layer: u64, ino: u64, dir: u64, name: &[u8]) -> Result<Attr> {
        self.op_then_upkeep(|s| s.link(layer, ino, dir, name))
    }

    /// Reads up to `len` bytes at `offset` (short at end of file).
    pub fn read(&self, layer: u64, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.read_keeping(layer, ino, offset, len, true, false)
    }

    /// [`Engine::read`] for a front end serving a reader of `layer`'s
    /// directory: the read also counts in the layer's usage
    /// ([`LayerUsage`](crate::LayerUsage) `reads` and `bytes_read`, made
    /// durable with the next checkpoint). Internal reads (exports, diffs)
    /// use [`Engine::read`] and are not counted.
    /// Content from a sealed layer under verified reads (verified.rs) is
    /// checked against its seal first.
    pub fn read_counted(&self, layer: u64, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.read_checked(layer, ino, offset, len, true)
    }

    /// Records that `bytes` of a layer tar were applied into `layer` (a
    /// pulled image layer) in `elapsed` (see `LayerUsage::applied_bytes`).
    pub fn record_apply(&self, layer: u64, bytes: u64, elapsed: std::time::Duration) -> Result<()> {
        let ns = elapsed.as_nanos().min(u64::MAX as u128) as u64;
        if stats_enabled() {
            self.s.latencies.apply.observe_ns(ns);
        }
        self.op_then_upkeep(|s| s.record_apply(layer, bytes, ns))
    }

    /// The files read most from `layer` (and from its removed clones), most
    /// read first, each with its path in the layer when it still has one
    /// (see hotfiles.rs: at most [`crate::HOT_FILES_K`]).
    pub fn hot_files(&self, layer: u64) -> Result<Vec<(HotFile, Option<Vec<u8>>)>> {
        let mut s = self.lock();
        s.layer(layer)?;
        let mut memo = std::collections::HashMap::new();
        let mut out = Vec::new();
        for f in s.hot_files(layer) {
            let path = s.path_of(layer, f.ino, &mut memo)?;
            out.push((
                f,
                path.map(|p| if p.is_empty() { b"/".to_vec() } else { p }),
            ));
        }
        Ok(out)
    }

    /// [`Engine::read`] for a caller that caches the bytes itself (the FUSE
    /// copies mount, whose page cache every layer shares): blocks in the
    /// block cache are used, blocks read from the device are not added to
    /// it, so the bytes are not held twice. It counts like
    /// [`Engine::read_counted`].
    pub fn read_uncached(&self, layer: u64, ino: u64, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.read_checked(layer, ino, offset, len, false)
    }

    /// A read, into the block cache when `keep`, counted in the layer's
    /// usage when `count` (a front end's), never checked against a seal.
    /// Absent blocks are fetched (absent.rs).
    pub(crate) fn read_keeping(
        &self,
        layer: u64,
        ino: u64,
        offset: u64,
        len: usize,
        keep: bool,
        count: bool,
    ) -> Result<Vec<u8>> {
        // A try that meets an absent block fails at its plan, before the
        // read is counted: each try may count, one does.
        self.fetching(|| self.read_local(layer, ino, offset, len, keep, count))
    }

    /// [`Engine::read_keeping`] that does not fetch: an absent block is
    /// [`Error::Absent`] (sealing waits for a lazily pulled layer's content
    /// rather than pull it).
    pub(crate) fn read_local(
        &self,
        layer: u64,
        ino: u64,
        offset: u64,
        len: usize,
        keep: bool,
        count: bool,
    ) -> Result<Vec<u8>> {
        unchecked(self.read_local_checked(layer, ino, offset, len, keep, count, None)?)
    }

    /// [`Engine::read_local`], each block checked against `expect` when
    /// given (see [`execute_plan_checked`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn read_local_checked(
        &self,
        layer: u64,
        ino: u64,
        offset: u64,
        len: usize,
        keep: bool,
        count: bool,
        expect: Option<Expected<'_>>,
    ) -> Result<Checked> {
        let len = len.min(64 << 20);
        if count {
            self.s.activity.fetch_add(1, Ordering::Relaxed);
        }
        let reuse = self.s.reuse.clone();
        let (plan, _guard) = {
            let mut s = self.lock();
            let plan = s.read_plan(layer, ino, offset, len);
            if let (true, Ok(plan)) = (count, &plan) {
                let startup_ns = s.count_read(layer, ino, plan.len as u64);
                if let (Some(ns), true) = (startup_ns, stats_enabled()) {
                    self.s.latencies.startup.observe_ns(ns);
                }
            }
            let guard = reuse.read().unwrap_or_else(|p| p.into_inner());
            let _ = s.maintain();
            (plan?, guard)
        };
        execute_plan_checked(&*self.s.dev, &self.s.blocks, plan, keep, expect)
    }

    pub fn write(&self, layer: u64, ino: u64, offset: u64, data: &[u8]) -> Result<usize> {
        self.write_with(layer, ino, offset, data, true)
    }

    /// A write whose edges cover part of a block merges with the block's
    /// current bytes: those on the device are read first, without the store
    /// lock (a failed read fails the write before it changed anything).
    fn write_with(
        &self,
        layer: u64,
        ino: u64,
        offset: u64,
        data: &[u8],
        touch: bool,
    ) -> Result<usize> {
        self.fetching(|| self.write_once(layer, ino, offset, data, touch))
    }

    /// One try of [`Engine::write_with`]: [`Error::Absent`] when a partial
    /// block it merges with is absent.
    fn write_once(
        &self,
        layer: u64,
        ino: u64,
        offset: u64,
        data: &[u8],
        touch: bool,
    ) -> Result<usize> {
        let bs = BLOCK_SIZE as u64;
        let end = offset.saturating_add(data.len() as u64);
        let mut known = Vec::new();
        if !data.is_empty() && (offset % bs != 0 || end % bs != 0) {
            let reuse = self.s.reuse.clone();
            let found = {
                let mut s = self.lock();
                s.partial_blocks_on_device(layer, ino, offset, data.len())?
                    .map(|plan| (plan, reuse.read().unwrap_or_else(|p| p.into_inner())))
            };
            if let Some((plan, _guard)) = found {
                known = KnownBlock::read_all(&*self.s.dev, &self.s.blocks, plan)?;
            }
        }
        self.op_then_upkeep(|s| s.write(layer, ino, offset, data, touch, &known))
    }

    /// [`Engine::write`] that leaves mtime and ctime alone: for data a
    /// writeback cache held (FUSE's), whose owner keeps the file's times and
    /// sets them itself, as they were when the data was written rather than
    /// when it arrives here.
    pub fn write_keeping_times(
        &self,
        layer: u64,
        ino: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<usize> {
        self.write_with(layer, ino, offset, data, false)
    }

    /// Promotion: makes bytes `offset..offset + data.len()` of file `ino` in
    /// `layer` (a range of holes, `offset` block aligned) the same blocks as
    /// in file `src_ino` of `src_layer`, without writing data, if the source
    /// holds exactly `data` there (compared byte for byte: a checksum match
    /// could be forged by whoever writes the source). Returns false, changing
    /// nothing, when any byte differs or the source changed meanwhile; the
    /// caller writes instead. Grows the file to the range's end. The source
    /// is read outside the store lock. See docs/docker.md.
    pub fn share_blocks(
        &self,
        layer: u64,
        ino: u64,
        src_layer: u64,
        src_ino: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<bool> {
        let bs = crate::device::BLOCK_SIZE as u64;
        if offset % bs != 0 || data.is_empty() {
            return Err(Error::Invalid(
                "share_blocks: offset must be block aligned and the range not empty".into(),
            ));
        }
        let len = data.len() as u64;
        let end = offset.checked_add(len).ok_or(Error::FileTooLarge)?;
        let (first, count) = (offset / bs, len.div_ceil(bs));
        let plan = |s: &mut Store| s.share_plan(layer, ino, src_layer, src_ino, first, count, end);
        let Some(before) = self.op_then_upkeep(plan)? else {
            return Ok(false);
        };
        if self.read(src_layer, src_ino, offset, data.len())? != data {
            return Ok(false);
        }
        self.op_then_upkeep(|s| match plan(s)? {
            Some(now) if now == before => {
                s.share_apply(layer, ino, src_layer, src_ino, now, end)?;
                Ok(true)
            }
            _ => Ok(false),
        })
    }

    pub fn fallocate(&self, layer: u64, ino: u64, mode: u32, offset: u64, len: u64) -> Result<()> {
        self.fetching(|| self.op_then_upkeep(|s| s.fallocate(layer, ino, mode, offset, len)))
    }

    /// Up to `limit` entries after `cookie` (0 starts). "." and ".." are not listed.
    pub fn readdir(
        &self,
        layer: u64,
        dir: u64,
        cookie: u64,
        limit: usize,
    ) -> Result<Vec<DirEntry>> {
        self.op_then_upkeep(|s| s.readdir(layer, dir, cookie, limit))
    }

    /// Every entry of directory `dir`, in readdir order (batches of 256,
    /// each under its own hold of the store lock).
    pub fn list_dir(&self, layer: u64, dir: u64) -> Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        let mut cookie = 0;
        loop {
            let batch = self.readdir(layer, dir, cookie, 256)?;
            let Some(last) = batch.last() else {
                return Ok(out);
            };
            cookie = last.cookie;
            out.extend(batch);
        }
    }

    /// Like readdir, with each entry's attributes.
    pub fn readdir_plus(
        &self,
        layer: u64,
        dir: u64,
        cookie: u64,
        limit: usize,
    ) -> Result<Vec<(DirEntry, Attr)>> {
        self.op_then_upkeep(|s| {
            let entries = s.readdir(layer, dir, cookie, limit)?;
            entries
                .into_iter()
                .map(|e| {
                    let a = s.getattr(layer, e.inode)?;
                    Ok((e, a))
                })
                .collect()
        })
    }

    pub fn getxattr(&self, layer: u64, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        self.op_then_upkeep(|s| s.getxattr(layer, ino, name))
    }

    /// `flags`: XATTR_CREATE or XATTR_REPLACE.
    pub fn setxattr(
        &self,
        layer: u64,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: u32,
    ) -> Result<()> {
        self.op_then_upkeep(|s| s.setxattr(layer, ino, name, value, flags))
    }

    pub fn listxattr(&self, layer: u64, ino: u64) -> Result<Vec<Vec<u8>>> {
        self.op_then_upkeep(|s| s.listxattr(layer, ino))
    }

    pub fn removexattr(&self, layer: u64, ino: u64, name: &[u8]) -> Result<()> {
        self.op_then_upkeep(|s| s.removexattr(layer, ino, name))
    }

    pub fn statfs(&self, layer: u64) -> Result<StatFs> {
        self.op_then_upkeep(|s| s.statfs(layer))
    }

    /// Notes an open handle: an unlinked file lives until its last release.
    pub fn open_inode(&self, layer: u64, ino: u64) -> Result<()> {
        self.op_then_upkeep(|s| s.open_inode(layer, ino))
    }

    pub fn release_inode(&self, layer: u64, ino: u64) -> Result<()> {
        self.op_then_upkeep(|s| s.release_inode(layer, ino))
    }

    /// Makes the data and attributes of file `ino` in `layer` durable: by a
    /// record in the fsync log and one flush when its changes since the
    /// last checkpoint were writes and setattrs only, otherwise by a
    /// checkpoint (see crate::fsynclog). Does nothing when nothing of the
    /// file changed since it was last made durable.
    /// Concurrent fsyncs share one record and one flush (group commit):
    /// whoever holds the commit lock logs every file waiting for it.
    pub fn fsync(&self, layer: u64, ino: u64) -> Result<()> {
        lock_ignoring_poison(&self.s.fsync_waiting).insert((layer, ino));
        let _c = lock_ignoring_poison(&self.s.commit_lock);
        let mut files: Vec<(u64, u64)> =
            std::mem::take(&mut *lock_ignoring_poison(&self.s.fsync_waiting))
                .into_iter()
                .collect();
        if !files.contains(&(layer, ino)) {
            // Logged by an earlier holder of the commit lock (then it has
            // no changes now), or changed again since.
            files.push((layer, ino));
        }
        let plan = self.lock().fsync_plan(&files)?;
        match plan {
            FsyncPlan::Durable => Ok(()),
            FsyncPlan::Checkpoint(why) => {
                log::trace!("fsync of inode {ino} in layer {layer} checkpoints: {why}");
                self.lock().counters.fsync_checkpoints += 1;
                self.s.checkpoint_unlocked()
            }
            FsyncPlan::Write(w) => match w.run() {
                Ok(()) => Ok(()),
                Err(e) => {
                    // A record that may be torn ends the log until a
                    // checkpoint; this one covers the file.
                    log::warn!("fsync record write failed ({e}); checkpointing instead");
                    let mut s = self.lock();
                    s.fsync_log.broken();
                    s.counters.fsync_checkpoints += 1;
                    drop(s);
                    self.s.checkpoint_unlocked()
                }
            },
        }
    }

    /// Makes every change made before the call durable, in every layer, by
    /// a checkpoint. Concurrent callers share checkpoints (group commit).
    pub fn sync(&self) -> Result<()> {
        let target = {
            let mut s = self.lock();
            s.fold_reads();
            s.generation
        };
        let _c = self.s.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        {
            let s = self.lock();
            if s.durable_generation >= target && s.failed.is_none() {
                return Ok(());
            }
        }
        self.s.checkpoint_unlocked()
    }

    /// Runs the cleaner now (`urgent`: greedy). Returns segments freed.
    pub fn clean(&self, urgent: bool, max_segments: usize) -> Result<usize> {
        self.s.clean_unlocked(urgent, max_segments)
    }

    /// Latency histograms of the device, pulls and start-ups since open
    /// (see [`Latencies`]); observed while [`crate::stats_enabled`].
    pub fn latencies(&self) -> &Latencies {
        &self.s.latencies
    }

    pub fn stats(&self) -> Stats {
        let s = self.lock();
        let seg = s.geo.segment_blocks as u64 * BLOCK_SIZE as u64;
        Stats {
            backend: self.s.dev.backend(),
            device: self.s.dev.stats(),
            engine: s.counters,
            node_cache_hits: s.nodes.hits,
            node_cache_misses: s.nodes.misses,
            node_cache_bytes: s.nodes.bytes(),
            node_cache_nodes: s.nodes.len(),
            dirty_nodes: s.nodes.dirty_count(),
            block_cache_hits: self.s.blocks.hits(),
            block_cache_misses: self.s.blocks.misses(),
            block_cache_blocks: self.s.blocks.len(),
            metadata_cache_hits: self.s.meta.hits_and_misses().0,
            metadata_cache_misses: self.s.meta.hits_and_misses().1,
            layers: s.layers.len(),
            removals_pending: s.removals_pending(),
            segments: s.geo.segment_count,
            segments_free: s.space.free_count(),
            segment_size_bytes: seg,
            live_bytes: s.live_blocks_total() * BLOCK_SIZE as u64,
            capacity_bytes: s.geo.segment_count as u64 * seg,
            checkpoint_seq: s.checkpoint_seq,
            verified_blocks: self.verify_counts().0,
            verify_failures: self.verify_counts().1,
            read_only_reason: s.failed.clone(),
        }
    }

    /// Verifies the whole structure (see [`crate::FsckReport`]) as of a
    /// checkpoint taken now, without the store lock: the check reads that
    /// checkpoint from the device through a private read-only store while
    /// the engine goes on, and the segments it may read are not reused
    /// until it is done. When no checkpoint can be taken (a stopped engine,
    /// a full device) the engine's memory is checked instead, under the lock.
    pub fn fsck(&self, verify_data: bool) -> Result<crate::fsck::FsckReport> {
        if let Err(e) = self.sync() {
            log::info!("fsck: no checkpoint to check ({e}); checking memory under the lock");
            let mut s = self.lock();
            return crate::fsck::run(&mut s, verify_data);
        }
        let _pin = SegmentPin::new(self);
        let mut snapshot = self.open_checkpoint()?;
        crate::fsck::run(&mut snapshot, verify_data)
    }

    /// A read-only store of the newest checkpoint on the device, opened
    /// while no checkpoint was written (one that lands meanwhile could
    /// overwrite the segment table being read: then try again).
    fn open_checkpoint(&self) -> Result<Store> {
        let config = Config {
            node_cache_bytes: 16 << 20,
            block_cache_bytes: 0,
            write_behind_segments: 0,
            ..Config::default()
        };
        let quiet = || {
            let s = self.lock();
            (s.checkpoint_in_flight.is_none()).then_some(s.checkpoints_begun)
        };
        for _ in 0..1000 {
            if let Some(before) = quiet() {
                let snapshot = Store::open(self.s.dev.clone(), config.clone());
                if quiet() == Some(before) {
                    return snapshot;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // Checkpoints without pause: open it under the lock (a few reads).
        let _s = self.lock();
        Store::open(self.s.dev.clone(), config)
    }

    /// Drops clean cached nodes and data blocks (for cold-cache measurements).
    pub fn drop_caches(&self) {
        let mut s = self.lock();
        s.nodes.drop_clean();
        self.s.blocks.clear();
        self.s.meta.clear();
    }

    /// Checkpoints and stops the background thread.
    pub fn close(&self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = h.join();
        }
        self.sync()
    }

    /// Simulates a crash: the engine writes nothing more, not even at drop.
    #[cfg(any(test, feature = "testing"))]
    pub fn crash(&self) {
        self.s.crashed.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        self.lock().failed = Some("simulated crash".into());
    }

    /// Changes the value `what` of file `ino` in `layer`'s tree where it
    /// lies, as an edit of the device that fixes the node's checksum would
    /// (see tamper.rs); returns the value before.
    #[cfg(any(test, feature = "testing"))]
    pub fn tamper_value(
        &self,
        layer: u64,
        ino: u64,
        what: crate::Tampered,
        mut f: impl FnMut(&mut Vec<u8>),
    ) -> Result<Vec<u8>> {
        let r = self.lock().tamper_value(layer, ino, what, &mut f);
        // What verified reads learnt of the layer goes, as at a restart.
        self.verifier().forget(layer);
        r
    }

    /// Changes block `index` of file `ino` in `layer` on the device in
    /// place and fixes its checksum (see tamper.rs); returns the bytes
    /// before.
    #[cfg(any(test, feature = "testing"))]
    pub fn tamper_block(
        &self,
        layer: u64,
        ino: u64,
        index: u64,
        mut f: impl FnMut(&mut [u8]),
    ) -> Result<Vec<u8>> {
        let r = self.lock().tamper_block(layer, ino, index, &mut f);
        self.verifier().forget(layer);
        r
    }

    /// Makes the next layer created get id `id` (at least the next one it
    /// would get): tests use it to reach large layer ids without creating
    /// every layer in between.
    #[cfg(any(test, feature = "testing"))]
    pub fn set_next_layer_id(&self, id: u64) {
        let mut s = self.lock();
        s.layers.raise_next_id(id);
        s.bump();
    }

    /// [`Engine::remove_layer`] without its steps: what the layer owned is
    /// freed by [`Engine::remove_steps`] or [`Engine::reclaim_removed`].
    #[cfg(any(test, feature = "testing"))]
    pub fn begin_remove_layer(&self, name: &str) -> Result<()> {
        self.begin_removal(name)
    }

    /// Runs `steps` steps of the removals begun, each freeing at most one
    /// tree node; true once none is left.
    #[cfg(any(test, feature = "testing"))]
    pub fn remove_steps(&self, steps: usize) -> Result<bool> {
        for _ in 0..steps {
            if self.op_then_upkeep(|s| s.remove_step(1))? {
                return Ok(true);
            }
        }
        Ok(self.lock().removing.is_empty())
    }

    /// Makes the next change panic after it has changed something, as a bug
    /// would, to test that the engine then stops instead of checkpointing it.
    #[cfg(any(test, feature = "testing"))]
    pub fn inject_panic_in_next_change(&self) {
        self.lock().panic_in_next_change = true;
    }

    /// Panics on another thread while it holds the store lock, leaving the
    /// lock poisoned, as a bug outside a change would.
    #[cfg(any(test, feature = "testing"))]
    pub fn poison_lock(&self) {
        let shared = self.s.clone();
        let _ = std::thread::spawn(move || {
            let _guard = shared.store.lock();
            panic!("injected panic while holding the engine lock");
        })
        .join();
    }

    /// When the last checkpoint was taken (for tests and stats).
    pub fn checkpoint_seq(&self) -> u64 {
        self.lock().checkpoint_seq
    }

    /// Timestamp helper for callers building SetAttr.
    pub fn now() -> Timestamp {
        Timestamp::now()
    }
}

/// Holds segments freed by new checkpoints while an online fsck reads an
/// older one; dropping it makes them reusable.
struct SegmentPin<'a>(&'a Engine);

impl<'a> SegmentPin<'a> {
    fn new(e: &'a Engine) -> SegmentPin<'a> {
        e.lock().pin_segments();
        SegmentPin(e)
    }
}

impl Drop for SegmentPin<'_> {
    fn drop(&mut self) {
        self.0.lock().unpin_segments();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.s.wake_background();
        if let Some(h) = self
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = h.join();
        }
        if self.s.crashed.load(Ordering::SeqCst) {
            return;
        }
        let mut s = self.lock();
        s.fold_reads();
        if s.failed.is_none() && s.generation != s.durable_generation {
            if let Err(e) = s.checkpoint() {
                log::error!("final checkpoint failed: {e}");
            }
        }
    }
}

/// How often an operation waits for the cleaner to make room without the
/// store lock before it cleans under the lock.
const ROOM_TRIES: u32 = 16;

/// Tree nodes a removal frees per hold of the store lock (each with the
/// blocks its extents own: a few hundred microseconds).
const REMOVE_STEP_NODES: usize = 32;

/// How long the background thread frees removed layers per tick at most.
const REMOVAL_SLICE: Duration = Duration::from_millis(250);

fn background(e: Arc<Shared>, stop: Arc<AtomicBool>, config: Config) {
    let tick = Duration::from_millis(config.flush_interval_ms.clamp(10, 1000));
    let mut last_checkpoint = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        e.sleep(tick);
        if stop.load(Ordering::SeqCst) {
            return;
        }
        // Removed layers are freed a bounded time per tick, so timer
        // flushes and checkpoints still come.
        let removals = {
            let s = e.lock();
            s.failed.is_none() && s.removals_pending() > 0
        };
        if removals {
            let until = Instant::now() + REMOVAL_SLICE;
            if let Err(err) = e.free_removals(Some(until)) {
                log::warn!("freeing removed layers: {err}");
            }
        }
        let mut s = e.lock();
        if s.failed.is_some() {
            continue;
        }
        s.fold_reads();
        // Timer flush: partially filled segment buffers go out.
        let _ = s
            .write_out(Temperature::Hot)
            .and_then(|_| s.write_out(Temperature::Cold));
        if s.wants_cleaning() {
            drop(s);
            if let Err(err) = e.clean_unlocked(false, 2) {
                log::warn!("background cleaning: {err}");
            }
            s = e.lock();
        }
        let due = config.checkpoint_interval_ms > 0
            && last_checkpoint.elapsed() >= Duration::from_millis(config.checkpoint_interval_ms);
        if due && s.generation != s.durable_generation {
            drop(s);
            let _c = e.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(err) = e.checkpoint_unlocked() {
                log::warn!("periodic checkpoint: {err}");
            }
            last_checkpoint = Instant::now();
        }
    }
}
