//! Kernel inode numbers: which (layer, inode) a FUSE node id names.
//!
//! A node id is `slot << SLOT_SHIFT | inode`, where a *slot* is a small
//! number standing for a layer while the mount serves it. Layer ids grow
//! forever (they are never reused), so they cannot go into the node id
//! themselves: 24 bits of layer id ran out after 2^24 layers and node ids
//! of different layers collided. Slots are handed out fresh first, and only
//! once all are used are the slots of removed layers reused, oldest freed
//! first, each time with the slot's generation bumped: the kernel sees the
//! new generation in every entry reply and treats a node it still holds
//! under that id as stale (fuse_iget replaces it), so an old inode is never
//! taken for a new one. Slot 0 is never handed out, so no node id of a layer
//! equals the mount root's (1).
//!
//! The engine's inode numbers within a layer must fit in SLOT_SHIFT bits;
//! one that does not is refused (EOVERFLOW) rather than wrapped.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::RwLock;

/// Kernel node id of the mount root, the directory of layers.
pub(crate) const MOUNT_ROOT: u64 = 1;
const SLOT_SHIFT: u32 = 40;
const INODE_MASK: u64 = (1 << SLOT_SHIFT) - 1;
/// Slots 1..=MAX_SLOTS: the layers the mount can serve at once.
const MAX_SLOTS: u32 = (1 << (64 - SLOT_SHIFT)) - 1;

/// Why a (layer, inode) has no node id.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NoNodeId {
    /// Every slot belongs to a live layer.
    SlotsExhausted,
    /// The engine's inode number does not fit below the slot bits.
    InodeTooLarge,
}

impl NoNodeId {
    pub(crate) fn errno(&self) -> i32 {
        match self {
            NoNodeId::SlotsExhausted => libc::ENFILE,
            NoNodeId::InodeTooLarge => libc::EOVERFLOW,
        }
    }
}

/// The slot table: layer id <-> slot, and each slot's generation.
pub(crate) struct Inodes {
    table: RwLock<Table>,
}

struct Table {
    /// layer id -> slot.
    slot_of: HashMap<u64, u32>,
    /// slot -> (layer id, generation); index 0 unused.
    layers: Vec<Option<(u64, u64)>>,
    /// Generation the next holder of a freed slot gets.
    next_generation: HashMap<u32, u64>,
    /// Freed slots, oldest first.
    free: VecDeque<u32>,
    /// How many slots may exist (MAX_SLOTS, smaller in unit tests).
    capacity: u32,
}

impl Inodes {
    pub(crate) fn new() -> Inodes {
        Inodes::with_capacity(MAX_SLOTS)
    }

    fn with_capacity(capacity: u32) -> Inodes {
        Inodes {
            table: RwLock::new(Table {
                slot_of: HashMap::new(),
                layers: vec![None],
                next_generation: HashMap::new(),
                free: VecDeque::new(),
                capacity: capacity.min(MAX_SLOTS),
            }),
        }
    }

    /// The (layer, inode) a node id names; None for the mount root, slot 0,
    /// inode 0, and slots no layer holds.
    pub(crate) fn split(&self, node_id: u64) -> Option<(u64, u64)> {
        let slot = (node_id >> SLOT_SHIFT) as usize;
        let inode = node_id & INODE_MASK;
        if inode == 0 || slot == 0 {
            return None;
        }
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        let (layer, _) = (*t.layers.get(slot)?)?;
        Some((layer, inode))
    }

    /// The node id and generation of `inode` in `layer`, giving the layer a
    /// slot if it has none. `live` lists the layers that exist; it is
    /// called only when every slot is taken, to free those of removed layers.
    pub(crate) fn join(
        &self,
        layer: u64,
        inode: u64,
        live: impl FnOnce() -> HashSet<u64>,
    ) -> Result<(u64, u64), NoNodeId> {
        if inode > INODE_MASK {
            return Err(NoNodeId::InodeTooLarge);
        }
        let (slot, generation) = self.slot(layer, live)?;
        Ok(((slot as u64) << SLOT_SHIFT | inode, generation))
    }

    fn slot(
        &self,
        layer: u64,
        live: impl FnOnce() -> HashSet<u64>,
    ) -> Result<(u32, u64), NoNodeId> {
        {
            let t = self.table.read().unwrap_or_else(|p| p.into_inner());
            if let Some(&slot) = t.slot_of.get(&layer) {
                let (_, generation) = t.layers[slot as usize].expect("a mapped slot is held");
                return Ok((slot, generation));
            }
        }
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        if let Some(&slot) = t.slot_of.get(&layer) {
            let (_, generation) = t.layers[slot as usize].expect("a mapped slot is held");
            return Ok((slot, generation));
        }
        if t.layers.len() <= t.capacity as usize {
            let slot = t.layers.len() as u32;
            t.layers.push(Some((layer, 0)));
            t.slot_of.insert(layer, slot);
            return Ok((slot, 0));
        }
        if t.free.is_empty() {
            t.free_removed(&live());
        }
        let slot = t.free.pop_front().ok_or(NoNodeId::SlotsExhausted)?;
        let generation = t.next_generation.remove(&slot).unwrap_or(1);
        t.layers[slot as usize] = Some((layer, generation));
        t.slot_of.insert(layer, slot);
        Ok((slot, generation))
    }

    #[cfg(test)]
    fn slots_in_use(&self) -> usize {
        self.table
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .slot_of
            .len()
    }
}

impl Table {
    fn release(&mut self, layer: u64) {
        if let Some(slot) = self.slot_of.remove(&layer) {
            let (_, generation) = self.layers[slot as usize]
                .take()
                .expect("a mapped slot is held");
            self.next_generation.insert(slot, generation + 1);
            self.free.push_back(slot);
        }
    }

    /// Frees the slots of layers that no longer exist.
    fn free_removed(&mut self, live: &HashSet<u64>) {
        let gone: Vec<u64> = self
            .slot_of
            .keys()
            .filter(|l| !live.contains(l))
            .copied()
            .collect();
        for layer in gone {
            self.release(layer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> HashSet<u64> {
        HashSet::new()
    }

    #[test]
    fn large_layer_ids_get_small_distinct_slots() {
        let inodes = Inodes::new();
        let ids = [1u64, (1 << 24) - 1, 1 << 24, (1 << 24) + 1, u64::MAX];
        let mut seen = HashSet::new();
        for &layer in &ids {
            let (node, generation) = inodes.join(layer, 2, none).unwrap();
            assert_eq!(generation, 0);
            assert_ne!(node, MOUNT_ROOT);
            assert!(
                seen.insert(node),
                "node id {node:#x} of layer {layer} reused"
            );
            assert_eq!(inodes.split(node), Some((layer, 2)));
            assert_eq!(inodes.join(layer, 2, none).unwrap().0, node, "stable");
        }
        assert_eq!(inodes.split(MOUNT_ROOT), None);
        assert_eq!(inodes.split(0), None);
        assert_eq!(
            inodes.join(1, INODE_MASK + 1, none),
            Err(NoNodeId::InodeTooLarge)
        );
    }

    #[test]
    fn slots_of_removed_layers_come_back_with_a_new_generation() {
        let inodes = Inodes::with_capacity(2);
        let (a, _) = inodes.join(10, 1, none).unwrap();
        let (b, _) = inodes.join(11, 1, none).unwrap();
        // Full, and both layers still live: no slot for a third.
        assert_eq!(
            inodes.join(12, 1, || [10, 11].into()),
            Err(NoNodeId::SlotsExhausted)
        );
        // Layer 10 was removed: its slot is found free and reused.
        let (c, generation) = inodes.join(12, 1, || [11, 12].into()).unwrap();
        assert_eq!(c, a, "the freed slot");
        assert_eq!(generation, 1, "bumped on reuse");
        assert_eq!(inodes.split(a), Some((12, 1)));
        assert_eq!(inodes.split(b), Some((11, 1)));
        // Reused again: the generation keeps growing.
        assert_eq!(inodes.join(13, 1, || [11, 13].into()).unwrap(), (a, 2));
        // Layer 11 went too: its slot is the next one reused.
        assert_eq!(inodes.join(14, 1, || [13, 14].into()).unwrap(), (b, 1));
        assert_eq!(inodes.split(b), Some((14, 1)));
        assert_eq!(inodes.slots_in_use(), 2);
    }
}
