//! Answers for lookup and getattr that need no store lock: attributes by
//! (layer, inode) and directory entries by (layer, directory, name), each
//! tagged with the version its layer had when the answer was computed.
//!
//! Invariant: every change to a layer's tree or record bumps the layer's
//! version under the store lock before the change returns (the B+tree's
//! copy-on-write entry point, `writable`, and `mark_layer_dirty` do it), and
//! an answer is computed and stored under the store lock with the version
//! read under that same lock. An answer whose version is still current is
//! therefore what the store would say now; one that is not is ignored. A
//! layer's answers depend on its own tree only (ancestors are frozen and
//! share nodes copy-on-write), so writers on other layers do not disturb
//! them. Versions live in a fixed table indexed by layer id: two layers that
//! share a slot only invalidate each other more often.
//!
//! Bounded: each shard holds at most a fixed number of answers; a full shard
//! drops its stale answers, then all of them.
//!
//! Kept only while a layer holds still: an answer is stored when the
//! previous answer computed for its layer had the same version. A layer
//! being filled (an untar changes it between every two requests) would
//! otherwise pay for storing answers that are stale before anyone asks.

use crate::fs::Attr;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

const VERSION_SLOTS: usize = 4096;
const SHARDS: usize = 16;

struct NameAnswer {
    layer: u64,
    dir: u64,
    name: Box<[u8]>,
    version: u64,
    /// None: the directory has no such name.
    inode: Option<u64>,
}

#[derive(Default)]
struct Shard {
    attrs: HashMap<(u64, u64), (u64, Attr)>,
    /// By a hash of (layer, dir, name); the answer holds the full key.
    names: HashMap<u64, NameAnswer>,
}

pub(crate) struct MetaCache {
    versions: Box<[AtomicU64]>,
    /// Per version slot: the version the last answer was computed at.
    answered_at: Box<[AtomicU64]>,
    shards: Box<[RwLock<Shard>]>,
    max_per_shard: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// What a name lookup found without the lock.
pub(crate) enum NameHit {
    Found(Attr),
    Missing,
}

impl MetaCache {
    /// At most `max_answers` attributes and as many names.
    pub fn new(max_answers: usize) -> MetaCache {
        MetaCache {
            versions: (0..VERSION_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            answered_at: (0..VERSION_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            max_per_shard: (max_answers / SHARDS).max(16),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn slot_index(layer: u64) -> usize {
        (layer % VERSION_SLOTS as u64) as usize
    }

    fn slot(&self, layer: u64) -> &AtomicU64 {
        &self.versions[Self::slot_index(layer)]
    }

    /// The layer's current version. Read it under the store lock to tag an
    /// answer computed under that lock.
    pub fn version(&self, layer: u64) -> u64 {
        self.slot(layer).load(Ordering::Acquire)
    }

    /// Invalidates every answer about `layer`. Called under the store lock
    /// by every change to the layer.
    pub fn layer_changed(&self, layer: u64) {
        self.slot(layer).fetch_add(1, Ordering::AcqRel);
    }

    /// Whether an answer about `layer` computed at `version` is worth
    /// keeping: the layer had that version at its previous answer too.
    fn holds_still(&self, layer: u64, version: u64) -> bool {
        self.answered_at[Self::slot_index(layer)].swap(version, Ordering::Relaxed) == version
    }

    fn shard_of(&self, h: u64) -> &RwLock<Shard> {
        &self.shards[(h % SHARDS as u64) as usize]
    }

    fn read(&self, h: u64) -> std::sync::RwLockReadGuard<'_, Shard> {
        self.shard_of(h).read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, h: u64) -> std::sync::RwLockWriteGuard<'_, Shard> {
        self.shard_of(h).write().unwrap_or_else(|p| p.into_inner())
    }

    fn attr_hash(layer: u64, ino: u64) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (layer, ino).hash(&mut h);
        h.finish()
    }

    fn name_hash(layer: u64, dir: u64, name: &[u8]) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (layer, dir, name).hash(&mut h);
        h.finish()
    }

    fn count(&self, hit: bool) {
        let c = if hit { &self.hits } else { &self.misses };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn current_attr(&self, layer: u64, ino: u64) -> Option<Attr> {
        let v = self.version(layer);
        let shard = self.read(Self::attr_hash(layer, ino));
        match shard.attrs.get(&(layer, ino)) {
            Some((at, a)) if *at == v => Some(*a),
            _ => None,
        }
    }

    /// The attributes of `ino` in `layer`, if a current answer is held.
    pub fn attr(&self, layer: u64, ino: u64) -> Option<Attr> {
        let a = self.current_attr(layer, ino);
        self.count(a.is_some());
        a
    }

    /// What looking `name` up in `dir` of `layer` gives, if a current
    /// answer is held (for a found name, its attributes too).
    pub fn lookup(&self, layer: u64, dir: u64, name: &[u8]) -> Option<NameHit> {
        let v = self.version(layer);
        let h = Self::name_hash(layer, dir, name);
        let inode = {
            let shard = self.read(h);
            match shard.names.get(&h) {
                Some(a)
                    if a.version == v && a.layer == layer && a.dir == dir && *a.name == *name =>
                {
                    a.inode
                }
                _ => {
                    self.count(false);
                    return None;
                }
            }
        };
        let hit = match inode {
            None => Some(NameHit::Missing),
            // The attributes must be as current as the name.
            Some(ino) => match self.current_attr(layer, ino) {
                Some(a) if self.version(layer) == v => Some(NameHit::Found(a)),
                _ => None,
            },
        };
        self.count(hit.is_some());
        hit
    }

    /// Keeps `attr` of `ino` in `layer`, computed at `version`.
    pub fn put_attr(&self, layer: u64, ino: u64, version: u64, attr: Attr) {
        if !self.holds_still(layer, version) {
            return;
        }
        let mut shard = self.write(Self::attr_hash(layer, ino));
        if shard.attrs.len() >= self.max_per_shard {
            shard
                .attrs
                .retain(|(l, _), (at, _)| *at == self.version(*l));
            if shard.attrs.len() >= self.max_per_shard {
                shard.attrs.clear();
            }
        }
        shard.attrs.insert((layer, ino), (version, attr));
    }

    /// Keeps what looking `name` up in `dir` of `layer` gave at `version`.
    pub fn put_name(&self, layer: u64, dir: u64, name: &[u8], version: u64, inode: Option<u64>) {
        if !self.holds_still(layer, version) {
            return;
        }
        let h = Self::name_hash(layer, dir, name);
        let mut shard = self.write(h);
        if shard.names.len() >= self.max_per_shard {
            shard
                .names
                .retain(|_, a| a.version == self.version(a.layer));
            if shard.names.len() >= self.max_per_shard {
                shard.names.clear();
            }
        }
        shard.names.insert(
            h,
            NameAnswer {
                layer,
                dir,
                name: name.into(),
                version,
                inode,
            },
        );
    }

    /// Drops every answer (cold-cache measurements).
    pub fn clear(&self) {
        for s in self.shards.iter() {
            let mut s = s.write().unwrap_or_else(|p| p.into_inner());
            s.attrs.clear();
            s.names.clear();
        }
    }

    /// (answers given without the lock, lookups that needed it).
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Timestamp;
    use crate::fs::FileKind;

    fn attr(ino: u64, size: u64) -> Attr {
        Attr {
            inode: ino,
            kind: FileKind::File,
            mode: 0o100644,
            nlink: 1,
            uid: 0,
            gid: 0,
            size,
            blocks_512: 0,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            rdev: 0,
        }
    }

    #[test]
    fn an_answer_lasts_until_its_layer_changes() {
        let c = MetaCache::new(1000);
        let v = c.version(7);
        c.put_attr(7, 2, v, attr(2, 10));
        c.put_name(7, 1, b"f", v, Some(2));
        c.put_name(7, 1, b"g", v, None);
        assert_eq!(c.attr(7, 2), Some(attr(2, 10)));
        assert!(matches!(c.lookup(7, 1, b"f"), Some(NameHit::Found(a)) if a.size == 10));
        assert!(matches!(c.lookup(7, 1, b"g"), Some(NameHit::Missing)));
        assert!(c.lookup(7, 1, b"h").is_none());
        // Another layer's change leaves these alone.
        c.layer_changed(8);
        assert_eq!(c.attr(7, 2), Some(attr(2, 10)));
        c.layer_changed(7);
        assert_eq!(c.attr(7, 2), None);
        assert!(c.lookup(7, 1, b"f").is_none());
        assert!(c.lookup(7, 1, b"g").is_none());
        // An answer tagged with an old version is never given.
        c.put_attr(7, 2, v, attr(2, 99));
        assert_eq!(c.attr(7, 2), None);
    }

    #[test]
    fn a_layer_that_changes_between_answers_keeps_none() {
        let c = MetaCache::new(1000);
        c.layer_changed(3);
        for i in 0..100 {
            // As in an untar: each answer, then a change.
            let v = c.version(3);
            c.put_name(3, 1, format!("f{i}").as_bytes(), v, None);
            c.put_attr(3, 1, v + 1, attr(1, i));
            c.layer_changed(3);
            c.layer_changed(3);
        }
        let held: usize = c.shards.iter().map(|s| s.read().unwrap().names.len()).sum();
        assert_eq!(held, 0);
        // Once it holds still, the second answer at one version is kept.
        let v = c.version(3);
        c.put_attr(3, 2, v, attr(2, 5));
        c.put_attr(3, 2, v, attr(2, 5));
        assert_eq!(c.attr(3, 2), Some(attr(2, 5)));
    }

    #[test]
    fn a_full_shard_is_emptied_not_grown() {
        let c = MetaCache::new(16 * 16);
        let v = c.version(1);
        for ino in 0..10_000 {
            c.put_attr(1, ino, v, attr(ino, 0));
            c.put_name(1, 1, format!("n{ino}").as_bytes(), v, Some(ino));
        }
        for s in c.shards.iter() {
            let s = s.read().unwrap();
            assert!(s.attrs.len() <= 16 && s.names.len() <= 16);
        }
    }
}
