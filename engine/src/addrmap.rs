//! The address map: a B+tree from logical block numbers (file data blocks
//! and layer-tree nodes) to physical blocks, with each block's checksum and
//! its count of extra owners. Trees share blocks by logical number, so a
//! block moves (cleaner) by changing its map entry alone.
//!
//! Map nodes are written only by checkpoints, bottom-up
//! ([`Store::write_map_node`]); until then a changed node has a virtual id.

use crate::device::{AlignedBuf, BLOCK_SIZE};
use crate::error::Result;
use crate::format::*;
use crate::store::{Store, Temperature};
use crate::tree::{Tree, PHYS_TAG, VIRT_TAG};

/// Where the map's root is and which numbers it hands out next.
pub(crate) struct AddressMap {
    /// Node id of the root: `PHYS_TAG | block` when on disk, a `VIRT_TAG`
    /// id when changed since, 0 when the map is empty.
    root: u64,
    /// Checksum of the root block on disk (the superblock's record of it).
    root_checksum: u64,
    /// Next logical block number; starts at 1 and only grows.
    next_lbn: u64,
    /// Next virtual id for a map node that exists only in memory.
    next_virtual: u64,
}

impl AddressMap {
    /// An empty map.
    pub fn new() -> AddressMap {
        AddressMap {
            root: 0,
            root_checksum: 0,
            next_lbn: 1,
            next_virtual: 1,
        }
    }

    /// The map a superblock records.
    pub fn recovered(root_block: u64, root_checksum: u64, next_lbn: u64) -> AddressMap {
        AddressMap {
            root: if root_block == 0 {
                0
            } else {
                PHYS_TAG | root_block
            },
            root_checksum,
            next_lbn,
            next_virtual: 1,
        }
    }

    /// Node id of the root (0: empty map).
    pub fn root(&self) -> u64 {
        self.root
    }

    pub fn root_checksum(&self) -> u64 {
        self.root_checksum
    }

    /// The physical block of the root as the superblock records it (0: empty map).
    pub fn root_block(&self) -> u64 {
        if self.root == 0 {
            0
        } else {
            self.root & !PHYS_TAG
        }
    }

    pub fn next_lbn(&self) -> u64 {
        self.next_lbn
    }

    fn alloc_lbn(&mut self) -> u64 {
        let l = self.next_lbn;
        self.next_lbn += 1;
        assert!(l < (1 << 56), "logical block numbers exhausted");
        l
    }

    /// An id for a map node that is not on the device yet.
    pub fn alloc_virtual(&mut self) -> u64 {
        let v = VIRT_TAG | self.next_virtual;
        self.next_virtual += 1;
        v
    }
}

impl Store {
    /// A new logical block number.
    pub fn alloc_lbn(&mut self) -> u64 {
        self.note_mutation();
        self.address_map.alloc_lbn()
    }

    /// Points many logical blocks at new places (any order).
    pub fn map_set_many(&mut self, mut items: Vec<(u64, MapValue)>) -> Result<()> {
        items.sort_unstable_by_key(|(l, _)| *l);
        let entries = items
            .iter()
            .map(|(l, v)| (Key::new(*l, KIND_MAP, 0), v.encode()))
            .collect();
        let mut root = self.address_map.root;
        let olds = self.insert_sorted(Tree::Map, &mut root, entries);
        self.address_map.root = root;
        for old in olds?.into_iter().flatten() {
            self.release_block(MapValue::decode(&old)?.physical_block);
        }
        Ok(())
    }

    pub fn map_get(&mut self, lbn: u64) -> Result<Option<MapValue>> {
        let root = self.address_map.root;
        match self.get(Tree::Map, root, &Key::new(lbn, KIND_MAP, 0))? {
            Some(v) => Ok(Some(MapValue::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Points `lbn` at a new physical block (the old block stops being
    /// live), or, with the same physical block, records a new owner count.
    pub fn map_set(&mut self, lbn: u64, v: MapValue) -> Result<()> {
        let mut root = self.address_map.root;
        let old = self.insert(Tree::Map, &mut root, Key::new(lbn, KIND_MAP, 0), v.encode());
        self.address_map.root = root;
        if let Some(old) = old? {
            let old = MapValue::decode(&old)?.physical_block;
            if old != v.physical_block {
                self.release_block(old);
            }
        }
        Ok(())
    }

    /// Drops one owner's hold on `lbn`: frees it when that was the last
    /// owner, otherwise counts one owner less.
    pub fn free_lbn(&mut self, lbn: u64) -> Result<()> {
        let mut root = self.address_map.root;
        let old = self.remove(Tree::Map, &mut root, &Key::new(lbn, KIND_MAP, 0));
        self.address_map.root = root;
        if let Some(old) = old? {
            let old = MapValue::decode(&old)?;
            if old.extra_owners > 0 {
                return self.map_set(
                    lbn,
                    MapValue {
                        extra_owners: old.extra_owners - 1,
                        ..old
                    },
                );
            }
            self.release_block(old.physical_block);
        }
        Ok(())
    }

    /// Makes the map node at physical `phys` (found through `first_object` at
    /// `level`) dirty so the next checkpoint rewrites it elsewhere. Returns
    /// false when that node is no longer part of the map.
    pub fn map_relocate_node(&mut self, first_object: u64, level: u8, phys: u64) -> Result<bool> {
        let key = Key::new(first_object, KIND_MAP, 0);
        let mut id = self.address_map.root;
        let mut csum = self.address_map.root_checksum;
        if id == 0 {
            return Ok(false);
        }
        loop {
            let n = self.node(Tree::Map, id, csum)?;
            if n.level == level {
                break;
            }
            if n.level < level {
                return Ok(false);
            }
            let c = n.children[Self::child_index(&n.keys, &key)];
            id = c.address;
            csum = c.checksum;
        }
        if id != PHYS_TAG | phys {
            return Ok(false);
        }
        // Re-insert the node's first entry along the path: that copies every
        // node from the root down to it.
        let mut root = self.address_map.root;
        let mut cur = self.writable(Tree::Map, root, self.address_map.root_checksum)?;
        root = cur;
        loop {
            let n = self.nodes.get(cur).expect("cached");
            if n.level == level {
                break;
            }
            let i = Self::child_index(&n.keys, &key);
            let c = n.children[i];
            let w = self.writable(Tree::Map, c.address, c.checksum)?;
            self.nodes.get_mut(cur).expect("cached").children[i] = ChildRef {
                address: w,
                checksum: 0,
            };
            cur = w;
        }
        self.address_map.root = root;
        Ok(true)
    }

    /// Writes a map node and (first) its dirty children; returns its pointer.
    pub(crate) fn write_map_node(&mut self, id: u64) -> Result<ChildRef> {
        let kids: Vec<(usize, u64)> = {
            let n = self.nodes.get(id).expect("dirty map node cached");
            n.children
                .iter()
                .enumerate()
                .filter(|(_, c)| c.address & VIRT_TAG != 0)
                .map(|(i, c)| (i, c.address))
                .collect()
        };
        for (i, kid) in kids {
            let r = self.write_map_node(kid)?;
            self.nodes.get_mut(id).expect("cached").children[i] = r;
        }
        // Children are addressed physically on disk.
        let mut img = self.nodes.get(id).expect("cached").clone();
        for c in &mut img.children {
            debug_assert!(c.address & PHYS_TAG != 0);
            c.address &= !PHYS_TAG;
        }
        let target_block = self.peek_next_block(Temperature::Hot)?;
        img.self_address = target_block;
        img.seq = self.checkpoint_seq + 1;
        let mut b = AlignedBuf::new(BLOCK_SIZE);
        img.encode(&mut b);
        let csum = NodeImage::block_checksum(&b);
        let first_object = img.keys.first().map(|k| k.object).unwrap_or(0);
        let phys = self.append(
            Temperature::Hot,
            BlockTag::MapNode {
                first_object,
                level: img.level,
            },
            &b,
            csum,
        )?;
        assert_eq!(phys, target_block, "map node landed where it was addressed");
        // Re-key: children pointers inside the cached node become PHYS ids.
        let mut cached = self.nodes.remove(id).expect("cached").node;
        cached.self_address = phys;
        cached.seq = img.seq;
        for c in &mut cached.children {
            c.address |= PHYS_TAG;
        }
        self.nodes.insert(PHYS_TAG | phys, cached, false);
        Ok(ChildRef {
            address: PHYS_TAG | phys,
            checksum: csum,
        })
    }

    /// Writes the map's changed nodes (checkpoint step 3), bottom-up.
    pub(crate) fn write_address_map(&mut self) -> Result<()> {
        if self.address_map.root & VIRT_TAG != 0 {
            let r = self.write_map_node(self.address_map.root)?;
            self.address_map.root = r.address;
            self.address_map.root_checksum = r.checksum;
        }
        Ok(())
    }
}
