//! The layer table in memory: every layer's record (root, parent, counts),
//! names, which records the next checkpoint writes or deletes, open file
//! handles and unlinked-but-open inodes.
//!
//! Records are few, so all of them stay in memory; on disk they live in the
//! layer-table tree (`Tree::Layer(0)`, rooted at [`LayerTable::root`]) with
//! each layer's metadata chunks. A change to a record must be marked with
//! `Store::mark_layer_dirty`, which counts it as a mutation.

use crate::format::LayerRecord;
use std::collections::{BTreeSet, HashMap, HashSet};

pub(crate) struct LayerTable {
    records: HashMap<u64, LayerRecord>,
    by_name: HashMap<Vec<u8>, u64>,
    /// Records the next checkpoint writes.
    dirty: BTreeSet<u64>,
    /// Records the next checkpoint deletes.
    removed: BTreeSet<u64>,
    /// Per (layer, inode): open handles, so unlinked open files live on.
    open_counts: HashMap<(u64, u64), u32>,
    orphans: HashSet<(u64, u64)>,
    next_id: u64,
    /// Root of the layer-table tree.
    root: u64,
}

impl LayerTable {
    /// A table with no layers.
    pub fn new() -> LayerTable {
        LayerTable::recovered(0, 1)
    }

    /// The table a superblock records, before its records are loaded.
    pub fn recovered(root: u64, next_id: u64) -> LayerTable {
        LayerTable {
            records: HashMap::new(),
            by_name: HashMap::new(),
            dirty: BTreeSet::new(),
            removed: BTreeSet::new(),
            open_counts: HashMap::new(),
            orphans: HashSet::new(),
            next_id,
            root,
        }
    }

    // ------------------------------------------------------------ records

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn get(&self, id: u64) -> Option<&LayerRecord> {
        self.records.get(&id)
    }

    /// A record to change; the caller marks it dirty.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut LayerRecord> {
        self.records.get_mut(&id)
    }

    pub fn contains(&self, id: u64) -> bool {
        self.records.contains_key(&id)
    }

    /// Layer ids, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.records.keys().copied()
    }

    /// Records, in no particular order.
    pub fn records(&self) -> impl Iterator<Item = &LayerRecord> + '_ {
        self.records.values()
    }

    pub fn id_by_name(&self, name: &[u8]) -> Option<u64> {
        self.by_name.get(name).copied()
    }

    /// Adds a record (loaded, or created: then the caller marks it dirty).
    pub fn insert(&mut self, rec: LayerRecord) {
        self.by_name.insert(rec.name.clone(), rec.id);
        self.records.insert(rec.id, rec);
    }

    /// Drops a layer: its record goes from the layer table at the next
    /// checkpoint, and its orphans with it.
    pub fn remove(&mut self, id: u64) {
        if let Some(rec) = self.records.remove(&id) {
            self.by_name.remove(&rec.name);
        }
        self.dirty.remove(&id);
        self.removed.insert(id);
        self.orphans.retain(|(l, _)| *l != id);
    }

    pub fn mark_dirty(&mut self, id: u64) {
        self.dirty.insert(id);
    }

    /// Checkpoint: the records to write, in id order.
    pub fn take_dirty(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.dirty)
    }

    /// Checkpoint: the records to delete, in id order.
    pub fn take_removed(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.removed)
    }

    // ------------------------------------------------------------ ids and root

    /// The id the next layer gets.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    pub fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Makes the next id at least `id`.
    #[cfg(any(test, feature = "testing"))]
    pub fn raise_next_id(&mut self, id: u64) {
        self.next_id = self.next_id.max(id);
    }

    /// Root of the layer-table tree (records and layer metadata).
    pub fn root(&self) -> u64 {
        self.root
    }

    pub fn set_root(&mut self, root: u64) {
        self.root = root;
    }

    // ------------------------------------------------------------ open files

    pub fn open(&mut self, layer: u64, ino: u64) {
        *self.open_counts.entry((layer, ino)).or_insert(0) += 1;
    }

    /// Drops one handle; true when it was the last one.
    pub fn close(&mut self, layer: u64, ino: u64) -> bool {
        let Some(c) = self.open_counts.get_mut(&(layer, ino)) else {
            return false;
        };
        *c -= 1;
        if *c > 0 {
            return false;
        }
        self.open_counts.remove(&(layer, ino));
        true
    }

    pub fn is_open(&self, layer: u64, ino: u64) -> bool {
        self.open_counts.get(&(layer, ino)).copied().unwrap_or(0) > 0
    }

    /// Whether any file of `layer` is open.
    pub fn has_open_files(&self, layer: u64) -> bool {
        self.open_counts.keys().any(|(l, _)| *l == layer)
    }

    /// Records an unlinked inode that lives on while open.
    pub fn add_orphan(&mut self, layer: u64, ino: u64) {
        self.orphans.insert((layer, ino));
    }

    /// Forgets an orphan; true when it was one.
    pub fn remove_orphan(&mut self, layer: u64, ino: u64) -> bool {
        self.orphans.remove(&(layer, ino))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Timestamp;

    fn record(id: u64, name: &str) -> LayerRecord {
        LayerRecord {
            id,
            name: name.as_bytes().to_vec(),
            parent: 0,
            root: 0,
            frozen: false,
            cold: false,
            children: 0,
            created: Timestamp::default(),
            frozen_at: Timestamp::default(),
            next_inode: 2,
            inode_count: 0,
            owned_blocks: 0,
            quota_bytes: 0,
            usage: Default::default(),
            seal: 0,
        }
    }

    #[test]
    fn a_removed_layer_leaves_no_name_orphan_or_pending_write() {
        let mut t = LayerTable::new();
        let id = t.alloc_id();
        assert_eq!(t.next_id(), id + 1);
        t.insert(record(id, "a"));
        t.mark_dirty(id);
        t.add_orphan(id, 9);
        assert_eq!(t.id_by_name(b"a"), Some(id));
        t.remove(id);
        assert!(!t.contains(id));
        assert_eq!(t.id_by_name(b"a"), None);
        assert!(!t.remove_orphan(id, 9));
        assert!(t.take_dirty().is_empty());
        assert_eq!(t.take_removed().into_iter().collect::<Vec<_>>(), vec![id]);
    }

    #[test]
    fn the_last_close_is_reported_once() {
        let mut t = LayerTable::new();
        t.open(1, 5);
        t.open(1, 5);
        assert!(t.is_open(1, 5));
        assert!(t.has_open_files(1));
        assert!(!t.close(1, 5));
        assert!(t.close(1, 5));
        assert!(!t.is_open(1, 5));
        assert!(!t.has_open_files(1));
        assert!(!t.close(1, 5), "closing what is not open is a no-op");
    }
}
