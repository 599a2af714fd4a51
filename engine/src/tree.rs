//! The copy-on-write B+tree shared by the address map, the layer table and
//! every layer's filesystem tree, over the node cache.
//!
//! A layer tree shares nodes with its parent's until it changes them: a
//! node whose owner is not the layer being changed is copied first
//! ([`Store::writable`]). Layer-tree nodes are named by logical block and
//! found through the address map; map nodes are named by physical block
//! (`PHYS_TAG`) or, until the next checkpoint writes them, by a virtual id
//! (`VIRT_TAG`). The node cache (cache.rs) holds decoded nodes and knows
//! which are dirty.

use crate::device::BLOCK_SIZE;
use crate::error::{Error, Result};
use crate::format::*;
use crate::store::Store;

/// Most entries `insert_sorted` puts into one leaf before splitting it.
const MAX_RUN_PER_LEAF: usize = 256;
/// Node ids of address-map nodes that are on the device: physical block | tag.
pub(crate) const PHYS_TAG: u64 = 1 << 62;
/// Node ids of address-map nodes that exist only in memory so far.
pub(crate) const VIRT_TAG: u64 = 1 << 61;

/// Which tree an operation works on. Layer(0) is the layer table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tree {
    Map,
    Layer(u64),
}

impl Tree {
    pub(crate) fn kind(self) -> TreeKind {
        match self {
            Tree::Map => TreeKind::Map,
            Tree::Layer(_) => TreeKind::Layer,
        }
    }
}

impl Store {
    /// Makes sure node `id` is in the cache. `checksum` is the parent's record
    /// of it (map tree only; layer-tree nodes are verified through the map).
    fn load(&mut self, tree: Tree, id: u64, checksum: u64) -> Result<()> {
        if self.nodes.contains(id) {
            return Ok(());
        }
        self.nodes.misses += 1;
        let (phys, want, address) = match tree {
            Tree::Map => {
                if id & PHYS_TAG == 0 {
                    return Err(Error::corrupt(
                        0,
                        format!("map node {id:#x} is neither cached nor on disk"),
                    ));
                }
                let p = id & !PHYS_TAG;
                (p, checksum, p)
            }
            Tree::Layer(_) => {
                let m = self.map_get(id)?.ok_or_else(|| {
                    Error::corrupt(0, format!("tree node at logical block {id} has no address"))
                })?;
                (m.physical_block, m.checksum, id)
            }
        };
        if self.geo.segment_of(phys).is_none() {
            return Err(Error::corrupt(
                phys * BLOCK_SIZE as u64,
                "node address outside the data area",
            ));
        }
        let b = self.read_block(phys)?;
        self.install_node(tree, id, phys, want, address, &b)
    }

    /// Decodes block `phys`, read as `b`, as node `id` of `tree`, checks it
    /// against checksum `want` and caches it clean.
    pub(crate) fn install_node(
        &mut self,
        tree: Tree,
        id: u64,
        phys: u64,
        want: u64,
        address: u64,
        b: &[u8],
    ) -> Result<()> {
        let off = phys * BLOCK_SIZE as u64;
        let mut node = NodeImage::decode(b, off, tree.kind(), address)?;
        if NodeImage::block_checksum(b) != want {
            return Err(Error::corrupt(
                off,
                "node does not match the checksum its pointer records",
            ));
        }
        if tree == Tree::Map {
            // On disk map children are physical blocks; in memory they are ids.
            for c in &mut node.children {
                if self.geo.segment_of(c.address).is_none() {
                    return Err(Error::corrupt(off, "map child outside the data area"));
                }
                c.address |= PHYS_TAG;
            }
        } else if let Some(c) = node
            .children
            .iter()
            .find(|c| c.address == 0 || c.address >= 1 << 56)
        {
            return Err(Error::corrupt(
                off,
                format!("child pointer {:#x} out of range", c.address),
            ));
        }
        self.nodes.insert(id, node, false);
        Ok(())
    }

    pub(crate) fn node(&mut self, tree: Tree, id: u64, checksum: u64) -> Result<&NodeImage> {
        self.load(tree, id, checksum)?;
        Ok(self.nodes.get(id).expect("just loaded"))
    }

    fn new_node(&mut self, tree: Tree, level: u8) -> u64 {
        let (id, owner) = match tree {
            Tree::Map => {
                let v = self.address_map.alloc_virtual();
                (v, 0)
            }
            Tree::Layer(owner) => {
                let l = self.alloc_lbn();
                self.charge_layer(owner, 1);
                (l, owner)
            }
        };
        let node = NodeImage {
            tree: tree.kind(),
            level,
            self_address: id,
            seq: 0,
            owner,
            keys: Vec::new(),
            values: Vec::new(),
            children: Vec::new(),
        };
        self.nodes.insert(id, node, true);
        id
    }

    /// Frees a node that left its tree.
    fn free_node(&mut self, tree: Tree, id: u64) -> Result<()> {
        self.nodes.remove(id);
        match tree {
            Tree::Map => {
                if id & PHYS_TAG != 0 {
                    self.release_block(id & !PHYS_TAG);
                }
            }
            Tree::Layer(owner) => {
                self.free_lbn(id)?;
                self.charge_layer(owner, -1);
            }
        }
        Ok(())
    }

    /// Returns a node id of `tree` that may be modified in place, copying the
    /// node if it is shared (layer trees) or already on disk (map tree).
    pub(crate) fn writable(&mut self, tree: Tree, id: u64, checksum: u64) -> Result<u64> {
        self.load(tree, id, checksum)?;
        match tree {
            Tree::Map => {
                if id & VIRT_TAG != 0 {
                    return Ok(id);
                }
                let mut copy = self.nodes.get(id).expect("loaded").clone();
                let v = self.address_map.alloc_virtual();
                copy.self_address = v;
                self.nodes.remove(id);
                self.nodes.insert(v, copy, true);
                // The on-disk copy is dead once the next checkpoint lands.
                self.release_block(id & !PHYS_TAG);
                Ok(v)
            }
            Tree::Layer(owner) => {
                // Every change to a layer's tree starts here, at its root.
                self.meta.layer_changed(owner);
                let n = self.nodes.get(id).expect("loaded");
                if n.owner == owner {
                    self.nodes.mark_dirty(id);
                    return Ok(id);
                }
                let mut copy = n.clone();
                let l = self.alloc_lbn();
                copy.owner = owner;
                copy.self_address = l;
                self.nodes.insert(l, copy, true);
                self.charge_layer(owner, 1);
                Ok(l)
            }
        }
    }

    // ------------------------------------------------------------ tree ops

    /// Makes child `i` of the writable node `id` writable (copying it if
    /// shared or on disk) and points `id` at the result, which it returns.
    fn writable_child(&mut self, tree: Tree, id: u64, i: usize) -> Result<u64> {
        let c = self.nodes.get(id).expect("cached").children[i];
        let w = self.writable(tree, c.address, c.checksum)?;
        self.nodes.get_mut(id).expect("cached").children[i] = ChildRef {
            address: w,
            checksum: 0,
        };
        Ok(w)
    }

    pub(crate) fn child_index(keys: &[Key], key: &Key) -> usize {
        match keys.binary_search(key) {
            Ok(i) => i,
            Err(0) => 0,
            Err(i) => i - 1,
        }
    }

    fn root_checksum(&self, tree: Tree) -> u64 {
        if tree == Tree::Map {
            self.address_map.root_checksum()
        } else {
            0
        }
    }

    /// Looks a key up.
    pub fn get(&mut self, tree: Tree, root: u64, key: &Key) -> Result<Option<Vec<u8>>> {
        if root == 0 {
            return Ok(None);
        }
        let mut id = root;
        let mut csum = self.root_checksum(tree);
        loop {
            let n = self.node(tree, id, csum)?;
            if n.level == 0 {
                return Ok(n.keys.binary_search(key).ok().map(|i| n.values[i].clone()));
            }
            let i = Self::child_index(&n.keys, key);
            let c = n.children[i];
            id = c.address;
            csum = c.checksum;
        }
    }

    /// Inserts or replaces; returns the old value (a sorted run of one).
    pub fn insert(
        &mut self,
        tree: Tree,
        root: &mut u64,
        key: Key,
        value: Vec<u8>,
    ) -> Result<Option<Vec<u8>>> {
        Ok(self
            .insert_sorted(tree, root, vec![(key, value)])?
            .pop()
            .flatten())
    }

    /// Inserts entries given in ascending key order, reaching each leaf with
    /// one descent and filling it with every following key that belongs to
    /// it. Returns the old values, in order.
    pub fn insert_sorted(
        &mut self,
        tree: Tree,
        root: &mut u64,
        items: Vec<(Key, Vec<u8>)>,
    ) -> Result<Vec<Option<Vec<u8>>>> {
        debug_assert!(
            items.windows(2).all(|w| w[0].0 < w[1].0),
            "keys sorted and unique"
        );
        let mut olds = Vec::with_capacity(items.len());
        let mut it = items.into_iter().peekable();
        while let Some((key, value)) = it.next() {
            assert!(value.len() <= MAX_VALUE_BYTES, "tree value too large");
            if *root == 0 {
                let id = self.new_node(tree, 0);
                *root = id;
            }
            let csum = self.root_checksum(tree);
            let mut id = self.writable(tree, *root, csum)?;
            *root = id;
            let mut path: Vec<(u64, usize)> = Vec::new();
            // Keys at or above `upper` belong to a later leaf.
            let mut upper: Option<Key> = None;
            loop {
                let n = self.nodes.get_mut(id).expect("writable node cached");
                if n.level == 0 {
                    break;
                }
                let i = Self::child_index(&n.keys, &key);
                if key < n.keys[i] {
                    n.keys[i] = key;
                }
                if let Some(k) = n.keys.get(i + 1) {
                    upper = Some(upper.map_or(*k, |u| u.min(*k)));
                }
                let w = self.writable_child(tree, id, i)?;
                path.push((id, i));
                id = w;
            }
            let n = self.nodes.get_mut(id).expect("cached");
            let mut from = 0;
            let mut placed = 0;
            let mut next = Some((key, value));
            while let Some((k, v)) = next.take() {
                match n.keys[from..].binary_search(&k) {
                    Ok(j) => {
                        olds.push(Some(std::mem::replace(&mut n.values[from + j], v)));
                        from += j;
                    }
                    Err(j) => {
                        n.keys.insert(from + j, k);
                        n.values.insert(from + j, v);
                        olds.push(None);
                        from += j;
                    }
                }
                placed += 1;
                // Bound the overflow one split has to handle.
                if placed == MAX_RUN_PER_LEAF {
                    break;
                }
                if it
                    .peek()
                    .is_some_and(|(nk, _)| upper.is_none_or(|u| *nk < u))
                {
                    next = it.next();
                }
            }
            self.nodes.remeasure(id);
            self.split_up(tree, root, id, path)?;
        }
        Ok(olds)
    }

    /// Splits an overflowing node and propagates new children up the path.
    fn split_up(
        &mut self,
        tree: Tree,
        root: &mut u64,
        mut id: u64,
        mut path: Vec<(u64, usize)>,
    ) -> Result<()> {
        loop {
            let n = self.nodes.get(id).expect("cached");
            if n.entry_bytes() <= NODE_CAPACITY {
                return Ok(());
            }
            let level = n.level;
            let sizes: Vec<usize> = if level == 0 {
                n.values
                    .iter()
                    .map(|v| LEAF_ENTRY_OVERHEAD + v.len())
                    .collect()
            } else {
                vec![INTERNAL_ENTRY_BYTES; n.keys.len()]
            };
            let total: usize = sizes.iter().sum();
            let parts = total.div_ceil(NODE_CAPACITY).max(2);
            let target = total / parts;
            // Cut points: close a node at ~target bytes, never over capacity.
            let mut cuts = Vec::new();
            let mut acc = 0;
            for (i, s) in sizes.iter().enumerate() {
                if acc > 0 && (acc + s > NODE_CAPACITY || acc >= target) {
                    cuts.push(i);
                    acc = 0;
                }
                acc += s;
            }
            let mut new_ids = Vec::new();
            // Last part first, so each part is simply the tail that remains.
            for &start in cuts.iter().rev() {
                let n = self.nodes.get_mut(id).expect("cached");
                let keys: Vec<Key> = n.keys.drain(start..).collect();
                let (values, children) = if level == 0 {
                    (
                        n.values.drain(start..start + keys.len()).collect(),
                        Vec::new(),
                    )
                } else {
                    (
                        Vec::new(),
                        n.children.drain(start..start + keys.len()).collect(),
                    )
                };
                let nid = self.new_node(tree, level);
                let m = self.nodes.get_mut(nid).expect("new");
                m.keys = keys;
                m.values = values;
                m.children = children;
                self.nodes.remeasure(nid);
                new_ids.push(nid);
            }
            self.nodes.remeasure(id);
            new_ids.reverse();
            let firsts: Vec<(Key, u64)> = new_ids
                .iter()
                .map(|&x| (self.nodes.get(x).expect("new").keys[0], x))
                .collect();
            match path.pop() {
                Some((parent, i)) => {
                    let p = self.nodes.get_mut(parent).expect("cached");
                    for (j, (k, x)) in firsts.into_iter().enumerate() {
                        p.keys.insert(i + 1 + j, k);
                        p.children.insert(
                            i + 1 + j,
                            ChildRef {
                                address: x,
                                checksum: 0,
                            },
                        );
                    }
                    self.nodes.remeasure(parent);
                    id = parent;
                }
                None => {
                    let first = self.nodes.get(id).expect("cached").keys[0];
                    let nr = self.new_node(tree, level + 1);
                    let r = self.nodes.get_mut(nr).expect("new");
                    r.keys.push(first);
                    r.children.push(ChildRef {
                        address: id,
                        checksum: 0,
                    });
                    for (k, x) in firsts {
                        r.keys.push(k);
                        r.children.push(ChildRef {
                            address: x,
                            checksum: 0,
                        });
                    }
                    self.nodes.remeasure(nr);
                    *root = nr;
                    id = nr;
                }
            }
        }
    }

    /// Removes a key; returns its value.
    pub fn remove(&mut self, tree: Tree, root: &mut u64, key: &Key) -> Result<Option<Vec<u8>>> {
        if self.get(tree, *root, key)?.is_none() {
            return Ok(None);
        }
        let csum = self.root_checksum(tree);
        let mut id = self.writable(tree, *root, csum)?;
        *root = id;
        let mut path: Vec<(u64, usize)> = Vec::new();
        loop {
            let n = self.nodes.get_mut(id).expect("cached");
            if n.level == 0 {
                break;
            }
            let i = Self::child_index(&n.keys, key);
            let w = self.writable_child(tree, id, i)?;
            path.push((id, i));
            id = w;
        }
        let n = self.nodes.get_mut(id).expect("cached");
        let i = n.keys.binary_search(key).expect("key present");
        n.keys.remove(i);
        let old = n.values.remove(i);
        self.nodes.remeasure(id);
        // Drop empty nodes; collapse single-child roots.
        while self.nodes.get(id).expect("cached").keys.is_empty() {
            let Some((parent, i)) = path.pop() else { break };
            self.free_node(tree, id)?;
            let p = self.nodes.get_mut(parent).expect("cached");
            p.keys.remove(i);
            p.children.remove(i);
            self.nodes.remeasure(parent);
            id = parent;
        }
        loop {
            let r = self.nodes.get(*root).expect("cached");
            if r.level == 0 {
                if r.keys.is_empty() {
                    let old_root = *root;
                    self.free_node(tree, old_root)?;
                    *root = 0;
                }
                break;
            }
            if r.keys.is_empty() {
                let old_root = *root;
                self.free_node(tree, old_root)?;
                *root = 0;
                break;
            }
            if r.children.len() != 1 {
                break;
            }
            let only = r.children[0];
            let old_root = *root;
            let w = self.writable(tree, only.address, only.checksum)?;
            self.free_node(tree, old_root)?;
            *root = w;
        }
        Ok(Some(old))
    }

    /// Calls `f` for each entry with lo <= key <= hi in order until it returns false.
    pub fn scan(
        &mut self,
        tree: Tree,
        root: u64,
        lo: Key,
        hi: Key,
        f: &mut dyn FnMut(&Key, &[u8]) -> bool,
    ) -> Result<()> {
        if root == 0 {
            return Ok(());
        }
        let csum = self.root_checksum(tree);
        self.scan_node(tree, root, csum, &lo, &hi, f).map(|_| ())
    }

    fn scan_node(
        &mut self,
        tree: Tree,
        id: u64,
        csum: u64,
        lo: &Key,
        hi: &Key,
        f: &mut dyn FnMut(&Key, &[u8]) -> bool,
    ) -> Result<bool> {
        let n = self.node(tree, id, csum)?;
        if n.level == 0 {
            let start = n.keys.partition_point(|k| k < lo);
            let items: Vec<(Key, Vec<u8>)> = n.keys[start..]
                .iter()
                .take_while(|k| *k <= hi)
                .zip(n.values[start..].iter())
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            for (k, v) in items {
                if !f(&k, &v) {
                    return Ok(false);
                }
            }
            return Ok(true);
        }
        let first = Self::child_index(&n.keys, lo);
        let kids: Vec<(Key, ChildRef)> = n.keys[first..]
            .iter()
            .copied()
            .zip(n.children[first..].iter().copied())
            .collect();
        for (j, (k, c)) in kids.into_iter().enumerate() {
            if j > 0 && k > *hi {
                break;
            }
            if !self.scan_node(tree, c.address, c.checksum, lo, hi, f)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
