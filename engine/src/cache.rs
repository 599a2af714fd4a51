//! Bounded caches: tree nodes (by node id, dirty nodes pinned) and data blocks
//! (by physical address, shared by every layer).

use crate::digest::{block_hash, Sha256Digest};
use crate::format::NodeImage;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// Node ids are logical block numbers or tagged physical addresses: already
/// well spread integers, so a multiply-shift hash beats SipHash by far on
/// this hot path (hash flooding is not a concern: ids are ours, not input).
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ (v >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        self.0 ^= self.0 >> 32;
    }
}

pub(crate) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Estimated heap bytes of a decoded node, for the cache budget.
fn node_bytes(n: &NodeImage) -> usize {
    let per_key = std::mem::size_of::<crate::format::Key>();
    let values: usize = n.values.iter().map(|v| v.capacity() + 24 + 16).sum();
    256 + n.keys.capacity() * per_key + values + n.children.capacity() * 16
}

pub(crate) struct CachedNode {
    pub node: NodeImage,
    pub dirty: bool,
    tick: u64,
    bytes: usize,
}

/// Node cache. Clean nodes are evicted least-recently-used first, in batches:
/// an access only stamps a tick, and when the cache is over budget the
/// oldest quarter of the clean nodes goes at once (cheap on the hot path,
/// amortised on eviction). Dirty nodes stay until a checkpoint writes them
/// (the engine checkpoints when the dirty share passes its limit).
pub(crate) struct NodeCache {
    map: IdMap<CachedNode>,
    tick: u64,
    bytes: usize,
    dirty_bytes: usize,
    dirty_count: usize,
    pub capacity_bytes: usize,
    pub hits: u64,
    pub misses: u64,
    /// Changes to node content or dirtiness (see `Store::mutation_mark`).
    mutations: u64,
}

impl NodeCache {
    pub fn new(capacity_bytes: usize) -> NodeCache {
        NodeCache {
            map: IdMap::default(),
            tick: 0,
            bytes: 0,
            dirty_bytes: 0,
            dirty_count: 0,
            capacity_bytes,
            hits: 0,
            misses: 0,
            mutations: 0,
        }
    }

    pub fn mutations(&self) -> u64 {
        self.mutations
    }

    pub fn contains(&self, id: u64) -> bool {
        self.map.contains_key(&id)
    }

    pub fn get(&mut self, id: u64) -> Option<&NodeImage> {
        self.tick += 1;
        let t = self.tick;
        match self.map.get_mut(&id) {
            Some(e) => {
                self.hits += 1;
                e.tick = t;
                Some(&e.node)
            }
            None => None,
        }
    }

    /// Mutable access marks the node dirty (pinned until written).
    pub fn get_mut(&mut self, id: u64) -> Option<&mut NodeImage> {
        self.mutations = self.mutations.wrapping_add(1);
        self.mark_dirty(id);
        self.map.get_mut(&id).map(|e| &mut e.node)
    }

    pub fn is_dirty(&self, id: u64) -> bool {
        self.map.get(&id).is_some_and(|e| e.dirty)
    }

    pub fn mark_dirty(&mut self, id: u64) {
        self.mutations = self.mutations.wrapping_add(1);
        if let Some(e) = self.map.get_mut(&id) {
            if !e.dirty {
                e.dirty = true;
                self.dirty_count += 1;
                self.dirty_bytes += e.bytes;
            }
        }
    }

    pub fn insert(&mut self, id: u64, node: NodeImage, dirty: bool) {
        self.remove(id);
        self.tick += 1;
        let bytes = node_bytes(&node);
        self.bytes += bytes;
        if dirty {
            self.mutations = self.mutations.wrapping_add(1);
            self.dirty_count += 1;
            self.dirty_bytes += bytes;
        }
        self.map.insert(
            id,
            CachedNode {
                node,
                dirty,
                tick: self.tick,
                bytes,
            },
        );
    }

    pub fn remove(&mut self, id: u64) -> Option<CachedNode> {
        let e = self.map.remove(&id)?;
        self.bytes -= e.bytes;
        if e.dirty {
            self.mutations = self.mutations.wrapping_add(1);
            self.dirty_count -= 1;
            self.dirty_bytes -= e.bytes;
        }
        Some(e)
    }

    /// Marks a dirty node clean (after it was written) and re-measures it.
    pub fn mark_clean(&mut self, id: u64) {
        if let Some(e) = self.map.get_mut(&id) {
            let new_bytes = node_bytes(&e.node);
            self.bytes = self.bytes - e.bytes + new_bytes;
            if e.dirty {
                self.dirty_count -= 1;
                self.dirty_bytes -= e.bytes;
                e.dirty = false;
            }
            e.bytes = new_bytes;
        }
    }

    /// Re-measures a node after an in-place change (dirty nodes only change).
    pub fn remeasure(&mut self, id: u64) {
        if let Some(e) = self.map.get_mut(&id) {
            let new_bytes = node_bytes(&e.node);
            self.bytes = self.bytes - e.bytes + new_bytes;
            if e.dirty {
                self.dirty_bytes = self.dirty_bytes - e.bytes + new_bytes;
            }
            e.bytes = new_bytes;
        }
    }

    pub fn dirty_ids(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }

    pub fn dirty_count(&self) -> usize {
        self.dirty_count
    }
    pub fn dirty_bytes(&self) -> usize {
        self.dirty_bytes
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Evicts clean nodes, oldest first, until a quarter under capacity.
    pub fn evict(&mut self) {
        if self.bytes <= self.capacity_bytes {
            return;
        }
        let target = self.capacity_bytes - self.capacity_bytes / 4;
        let mut clean: Vec<(u64, u64)> = self
            .map
            .iter()
            .filter(|(_, e)| !e.dirty)
            .map(|(id, e)| (e.tick, *id))
            .collect();
        clean.sort_unstable();
        for (_, id) in clean {
            if self.bytes <= target {
                break;
            }
            self.remove(id);
        }
    }

    /// Drops every clean node (used for cold-cache measurements).
    pub fn drop_clean(&mut self) {
        let ids: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, e)| !e.dirty)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.remove(id);
        }
    }
}

/// One cached data block. The 4 KiB buffer is an allocation of its own:
/// `Arc<[u8]>` would put the reference counts in front of the data, and a
/// 4,112-byte allocation takes a 5 KiB size class (a quarter more memory
/// than the data, 64 MiB for a full 256 MiB cache).
pub type CachedBlock = Arc<Block>;

/// A cached block's bytes and, once a verified read asked for it, their
/// SHA-256 block hash (the bytes never change while cached: a block
/// rewritten or freed leaves the cache first), so a verified read of a
/// cached block compares 32 bytes instead of hashing 4 KiB again.
pub struct Block {
    pub bytes: Vec<u8>,
    pub(crate) hash: OnceLock<Sha256Digest>,
}

impl Block {
    pub fn new(bytes: Vec<u8>) -> Block {
        Block {
            bytes,
            hash: OnceLock::new(),
        }
    }

    /// A block whose hash is known (computed as it was read).
    pub fn hashed(bytes: Vec<u8>, hash: Sha256Digest) -> Block {
        Block {
            bytes,
            hash: OnceLock::from(hash),
        }
    }

    /// [`block_hash`] of the bytes, computed once.
    pub fn hash(&self) -> &Sha256Digest {
        self.hash.get_or_init(|| block_hash(&self.bytes))
    }
}

impl std::ops::Deref for Block {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Shared data block cache keyed by physical block. N layers reading the same
/// block (clones share blocks) hit one copy.
pub struct BlockCache {
    inner: Mutex<BlockCacheInner>,
    capacity_blocks: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

struct BlockCacheInner {
    blocks: BTreeMap<u64, (CachedBlock, u64)>,
    lru: BTreeMap<u64, u64>,
    tick: u64,
}

impl BlockCache {
    /// The cache's state. A panic while it was held may have left the index
    /// and the LRU order out of step: the cache then starts over empty
    /// (it only ever holds copies of verified device blocks).
    fn lock(&self) -> std::sync::MutexGuard<'_, BlockCacheInner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => {
                let mut g = poisoned.into_inner();
                self.inner.clear_poison();
                log::warn!("block cache: a thread panicked while using it; emptying it");
                g.blocks.clear();
                g.lru.clear();
                g
            }
        }
    }

    pub fn new(capacity_bytes: usize) -> BlockCache {
        BlockCache {
            inner: Mutex::new(BlockCacheInner {
                blocks: BTreeMap::new(),
                lru: BTreeMap::new(),
                tick: 0,
            }),
            capacity_blocks: capacity_bytes / crate::device::BLOCK_SIZE,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Looks up several blocks under one lock (a read of many blocks would
    /// otherwise take it once per block, and the I/O workers contend for it).
    pub fn get_many(
        &self,
        physical_blocks: impl IntoIterator<Item = u64>,
    ) -> Vec<Option<CachedBlock>> {
        let mut g = self.lock();
        let g = &mut *g;
        let (mut hits, mut misses) = (0, 0);
        let found = physical_blocks
            .into_iter()
            .map(|physical_block| match g.blocks.get_mut(&physical_block) {
                Some((data, tick)) => {
                    g.tick += 1;
                    g.lru.remove(tick);
                    *tick = g.tick;
                    g.lru.insert(g.tick, physical_block);
                    hits += 1;
                    Some(data.clone())
                }
                None => {
                    misses += 1;
                    None
                }
            })
            .collect();
        self.hits.fetch_add(hits, Ordering::Relaxed);
        self.misses.fetch_add(misses, Ordering::Relaxed);
        found
    }

    /// Inserts several blocks under one lock, evicting the least recently
    /// used beyond the capacity.
    pub fn insert_many(&self, blocks: impl IntoIterator<Item = (u64, CachedBlock)>) {
        if self.capacity_blocks == 0 {
            return;
        }
        let mut g = self.lock();
        let g = &mut *g;
        for (physical_block, data) in blocks {
            g.tick += 1;
            if let Some((_, old)) = g.blocks.insert(physical_block, (data, g.tick)) {
                g.lru.remove(&old);
            }
            g.lru.insert(g.tick, physical_block);
        }
        while g.blocks.len() > self.capacity_blocks {
            let Some((&t, &b)) = g.lru.iter().next() else {
                break;
            };
            g.lru.remove(&t);
            g.blocks.remove(&b);
        }
    }

    /// Forgets every block in [start, end): the range is about to be rewritten.
    pub fn invalidate_range(&self, start: u64, end: u64) {
        let mut g = self.lock();
        let g = &mut *g;
        let keys: Vec<u64> = g.blocks.range(start..end).map(|(k, _)| *k).collect();
        for k in keys {
            if let Some((_, t)) = g.blocks.remove(&k) {
                g.lru.remove(&t);
            }
        }
    }

    pub fn clear(&self) {
        let mut g = self.lock();
        g.blocks.clear();
        g.lru.clear();
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }
    pub fn len(&self) -> usize {
        self.lock().blocks.len()
    }
}
