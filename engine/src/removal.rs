//! Removing a layer: one change takes its record, name and metadata away;
//! what it owned (tree nodes and the blocks its extents own) is freed
//! afterwards, in steps, by the background thread, by a caller that wants
//! the space now, or by an operation short of room.
//!
//! Each removal is a list of tree nodes left to walk, seeded with the
//! layer's root: a step pops a node, and if the removed layer owns it,
//! frees it with the blocks its extents own and pushes its children (nodes
//! owned by an ancestor are left alone: nothing below them is the layer's).
//! The list is part of every checkpoint (layer-table keys
//! [`KIND_REMOVAL`]), so a checkpoint taken between steps records a
//! consistent state: the nodes on the list and what they own are live,
//! what was freed is free. After a crash the walk goes on from the list of
//! the last checkpoint.
//!
//! Order: the highest layer id is freed first. A clone's id is higher than
//! its parent's, so when a layer and an ancestor are both being removed,
//! the descendant, whose list may hold the ancestor's nodes, finishes
//! before the ancestor frees any of them.

use crate::device::{AlignedBuf, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::format::*;
use crate::store::{Store, Tree};

/// Node ids per layer-table value of a persisted list (1 KiB).
const IDS_PER_CHUNK: usize = 128;

/// A tree node of a removed layer to read without the store lock, and
/// where the map said it was when the read was planned.
pub(crate) struct NodeRead {
    layer: u64,
    id: u64,
    at: MapValue,
}

impl NodeRead {
    /// Byte offset of the block on the device.
    pub fn offset(&self) -> u64 {
        self.at.physical_block * BLOCK_SIZE as u64
    }
}

impl Store {
    /// Removes a childless layer's record, name and metadata at once; what
    /// it owns is freed by [`Store::remove_step`].
    pub(crate) fn begin_remove_layer(&mut self, layer: u64) -> Result<()> {
        self.check_writable()?;
        let l = self.layer(layer)?;
        if l.children > 0 {
            return Err(Error::HasChildren {
                layer: String::from_utf8_lossy(&l.name).into_owned(),
                children: l.children,
            });
        }
        if self.layers.has_open_files(layer) {
            return Err(Error::Busy("layer has open files".into()));
        }
        let root = l.root;
        let seal = l.seal;
        let parent = l.parent;
        self.ensure_space(0, true)?;
        self.remove_layer_metadata(layer)?;
        self.fold_hot_files(layer, parent)?;
        self.meta.layer_changed(layer);
        // What the layer read stays counted, as its parent's clones' reads.
        let (mut used, created) = self
            .layers
            .get(layer)
            .map(|l| (l.usage, l.created))
            .unwrap_or_default();
        if let Some(pending) = self.pending_reads.remove(&layer) {
            pending.add_to(&mut used);
        }
        self.layers.remove(layer);
        if let Some(p) = self.layers.get_mut(parent) {
            p.children -= 1;
            let u = &mut p.usage;
            let add = |to: &mut u64, a: u64, b: u64| *to = to.saturating_add(a).saturating_add(b);
            add(&mut u.clone_reads, used.reads, used.clone_reads);
            add(
                &mut u.clone_bytes_read,
                used.bytes_read,
                used.clone_bytes_read,
            );
            add(
                &mut u.clone_early_reads,
                used.early_reads,
                used.clone_early_reads,
            );
            add(
                &mut u.clone_early_bytes_read,
                used.early_bytes_read,
                used.clone_early_bytes_read,
            );
            add(
                &mut u.clone_early_files,
                used.early_files,
                used.clone_early_files,
            );
            let own_start = used.startup_ns(created);
            add(
                &mut u.clone_starts,
                own_start.is_some() as u64,
                used.clone_starts,
            );
            add(
                &mut u.clone_start_ns,
                own_start.unwrap_or(0),
                used.clone_start_ns,
            );
            self.mark_layer_dirty(parent);
        }
        // The seal's nodes are all the layer's own.
        let list: Vec<u64> = [root, seal].into_iter().filter(|&n| n != 0).collect();
        if !list.is_empty() {
            self.removing.insert(layer, list);
            self.removing_dirty.insert(layer);
        }
        self.bump();
        Ok(())
    }

    /// Layers removed whose nodes and blocks are not all freed yet.
    pub(crate) fn removals_pending(&self) -> usize {
        self.removing.len()
    }

    /// Frees up to `budget` tree nodes (and the blocks their extents own)
    /// of the removal with the highest layer id; true once no removal is
    /// left.
    pub(crate) fn remove_step(&mut self, budget: usize) -> Result<bool> {
        let Some(layer) = self.removing.keys().next_back().copied() else {
            return Ok(true);
        };
        self.check_writable()?;
        let mut stack = self.removing.remove(&layer).unwrap_or_default();
        self.removing_dirty.insert(layer);
        let mut done = 0;
        while done < budget {
            let Some(id) = stack.pop() else {
                break;
            };
            if let Err(e) = self.free_owned_node(layer, id, &mut stack) {
                // The node stays listed: nothing of it was freed.
                stack.push(id);
                self.removing.insert(layer, stack);
                return Err(e);
            }
            done += 1;
        }
        if !stack.is_empty() {
            self.removing.insert(layer, stack);
        }
        self.bump();
        Ok(self.removing.is_empty())
    }

    /// Frees what the layers being removed still own, to the end.
    pub(crate) fn finish_removals(&mut self) -> Result<()> {
        while !self.remove_step(usize::MAX)? {}
        Ok(())
    }

    /// Frees tree node `id` of `layer` when the layer owns it, with the
    /// blocks its extents own; pushes its children onto `stack`.
    fn free_owned_node(&mut self, layer: u64, id: u64, stack: &mut Vec<u64>) -> Result<()> {
        // Loading goes through the map; the node is read once.
        let mut owned = false;
        let mut kids = Vec::new();
        let mut extents = Vec::new();
        self.with_layer_node(layer, id, &mut |n| {
            owned = n.owner == layer;
            if !owned {
                return;
            }
            if n.level == 0 {
                for (k, v) in n.keys.iter().zip(&n.values) {
                    if k.kind == KIND_EXTENT {
                        extents.push(v.clone());
                    }
                }
            } else {
                kids.extend(n.children.iter().map(|c| c.address));
            }
        })?;
        if !owned {
            return Ok(());
        }
        // Decode them all before freeing any: a bad extent frees nothing.
        let extents = extents
            .iter()
            .map(|e| ExtentValue::decode(e))
            .collect::<Result<Vec<_>>>()?;
        for e in extents {
            if e.birth_layer == layer {
                self.free_lbn(e.lbn)?;
            }
        }
        stack.extend(kids);
        self.nodes.remove(id);
        self.free_lbn(id)?;
        Ok(())
    }

    /// The next nodes the current removal's steps will load that are
    /// neither cached nor in a log buffer (those in a buffer are cached
    /// now), at most `max`: to read without the store lock.
    pub(crate) fn removal_reads(&mut self, max: usize) -> Result<Vec<NodeRead>> {
        let Some((&layer, stack)) = self.removing.iter().next_back() else {
            return Ok(Vec::new());
        };
        let next: Vec<u64> = stack.iter().rev().take(max).copied().collect();
        let mut reads = Vec::new();
        for id in next {
            if self.nodes.contains(id) {
                continue;
            }
            let Some(at) = self.map_get(id)? else {
                continue; // the step reports it
            };
            if self.geo.segment_of(at.physical_block).is_none() {
                continue;
            }
            if let Some(b) = self.buffered_block(at.physical_block) {
                let b = b.to_vec();
                let _ = self.install_node(
                    Tree::Layer(layer),
                    id,
                    at.physical_block,
                    at.checksum,
                    id,
                    &b,
                );
                continue;
            }
            reads.push(NodeRead { layer, id, at });
        }
        Ok(reads)
    }

    /// Caches the nodes [`Store::removal_reads`] planned and the caller
    /// read, those the map still places where they were read and whose
    /// bytes match their checksum; the others the steps load themselves.
    pub(crate) fn install_removal_reads(&mut self, read: Vec<(NodeRead, AlignedBuf)>) {
        for (r, b) in read {
            if self.nodes.contains(r.id) || !self.removing.contains_key(&r.layer) {
                continue;
            }
            if !matches!(self.map_get(r.id), Ok(Some(now)) if now == r.at) {
                continue;
            }
            let _ = self.install_node(
                Tree::Layer(r.layer),
                r.id,
                r.at.physical_block,
                r.at.checksum,
                r.id,
                &b,
            );
        }
    }

    /// Checkpoint: the lists of removals that changed since the last one
    /// into the layer table rooted at `root` (a finished removal's list
    /// deleted).
    pub(crate) fn write_removals(&mut self, root: &mut u64) -> Result<()> {
        for layer in std::mem::take(&mut self.removing_dirty) {
            let mut old = Vec::new();
            self.scan(
                Tree::Layer(0),
                *root,
                Key::new(layer, KIND_REMOVAL, 0),
                Key::new(layer, KIND_REMOVAL, u64::MAX),
                &mut |k, _| {
                    old.push(*k);
                    true
                },
            )?;
            for k in old {
                self.remove(Tree::Layer(0), root, &k)?;
            }
            let Some(stack) = self.removing.get(&layer) else {
                continue;
            };
            let chunks: Vec<Vec<u8>> = stack
                .chunks(IDS_PER_CHUNK)
                .map(|c| c.iter().flat_map(|id| id.to_le_bytes()).collect())
                .collect();
            for (i, v) in chunks.into_iter().enumerate() {
                self.insert(
                    Tree::Layer(0),
                    root,
                    Key::new(layer, KIND_REMOVAL, i as u64),
                    v,
                )?;
            }
        }
        Ok(())
    }

    /// Open: the removals the checkpoint recorded, from the layer table's
    /// [`KIND_REMOVAL`] keys (chunk by chunk, in key order).
    pub(crate) fn load_removal(&mut self, layer: u64, chunk: &[u8]) -> Result<()> {
        if chunk.is_empty() || chunk.len() % 8 != 0 || chunk.len() > IDS_PER_CHUNK * 8 {
            return Err(Error::corrupt(
                0,
                format!(
                    "removal list of layer {layer}: a chunk of {} bytes",
                    chunk.len()
                ),
            ));
        }
        let list = self.removing.entry(layer).or_default();
        list.extend(
            chunk
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))),
        );
        Ok(())
    }
}
