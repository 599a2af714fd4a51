//! Promotion: one layer's file blocks become another layer's without
//! copying data. A Docker commit sends the plugin a tar of what a container
//! changed, to be extracted into a new image layer on another branch of
//! the layer tree (a sibling of the container). Instead of writing that
//! content again, the new layer takes the container's blocks, once a byte
//! comparison proves they hold exactly the bytes the tar carries.
//!
//! Ownership (see [`ExtentValue`]): a block born in an ancestor of the
//! destination is simply inherited, as a clone would. A block from another
//! branch gains an owner: its map entry counts `extra_owners`, and both
//! layers' extents are marked shared, so neither overwrites it in place and
//! whichever drops it last frees it. Removing the container after the
//! commit (what a build does) leaves the image layer as the block's one
//! owner.

use crate::device::BLOCK_SIZE;
use crate::error::{Error, Result};
use crate::format::*;
use crate::fs::FileKind;
use crate::store::{Store, Tree};
use std::collections::HashSet;

/// What a promotion would take: the lender's extents over the range, with
/// the address-map entry each pointed at when they were looked up. Taken
/// twice, before and after the lender's bytes are compared outside the store
/// lock; equal plans mean the lender did not change in between (a write gets
/// a new address, so a changed block never shows the same entry again).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct SharePlan {
    blocks: Vec<(u64, ExtentValue, MapValue)>,
}

impl Store {
    /// Checks that blocks `first_block..first_block + count` of file `ino`
    /// in `layer` can take the blocks of file `src_ino` in `src_layer`: both
    /// regular files, the destination range all holes, the source at least
    /// `end_bytes` long. Returns the source's extents over the range, or
    /// None when promotion does not apply (the caller writes instead).
    /// Changes nothing.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn share_plan(
        &mut self,
        layer: u64,
        ino: u64,
        src_layer: u64,
        src_ino: u64,
        first_block: u64,
        count: u64,
        end_bytes: u64,
    ) -> Result<Option<SharePlan>> {
        self.writable_layer(layer)?;
        if count == 0 || src_layer == layer {
            return Ok(None);
        }
        let last_block = first_block
            .checked_add(count - 1)
            .ok_or(Error::FileTooLarge)?;
        let bs = BLOCK_SIZE as u64;
        if end_bytes > (last_block + 1) * bs || end_bytes <= last_block * bs {
            return Err(Error::Invalid(
                "share_blocks: end outside the last block".into(),
            ));
        }
        let inode = self.inode(layer, ino)?;
        let src = self.inode(src_layer, src_ino)?;
        if FileKind::from_mode(inode.mode) != Some(FileKind::File)
            || FileKind::from_mode(src.mode) != Some(FileKind::File)
        {
            return Ok(None);
        }
        if src.size < end_bytes {
            return Ok(None);
        }
        let mut source = Vec::new();
        self.lscan(
            src_layer,
            Key::new(src_ino, KIND_EXTENT, first_block),
            Key::new(src_ino, KIND_EXTENT, last_block),
            &mut |k, v| {
                source.push((k.offset, v.to_vec()));
                true
            },
        )?;
        let mut blocks = Vec::with_capacity(source.len());
        for (block, value) in &source {
            let e = ExtentValue::decode(value)?;
            let m = self
                .map_get(e.lbn)?
                .ok_or_else(|| Error::corrupt(0, format!("file block {} has no address", e.lbn)))?;
            blocks.push((*block, e, m));
        }
        let mut occupied = false;
        self.lscan(
            layer,
            Key::new(ino, KIND_EXTENT, first_block),
            Key::new(ino, KIND_EXTENT, last_block),
            &mut |_, _| {
                occupied = true;
                false
            },
        )?;
        if occupied {
            return Ok(None);
        }
        Ok(Some(SharePlan { blocks }))
    }

    /// Makes the planned blocks of `src_ino` in `src_layer` blocks of file
    /// `ino` in `layer` (holes stay holes), growing its size to `end_bytes`.
    /// The plan must have been taken under this same lock hold, and the
    /// caller must have proved the lender's bytes equal the incoming ones.
    pub(crate) fn share_apply(
        &mut self,
        layer: u64,
        ino: u64,
        src_layer: u64,
        src_ino: u64,
        plan: SharePlan,
        end_bytes: u64,
    ) -> Result<()> {
        let bs = BLOCK_SIZE as u64;
        let blocks = plan.blocks;
        let mut inode = self.inode(layer, ino)?;
        self.ensure_space(0, false)?;
        let mut ancestors = HashSet::new();
        let mut at = self.layer(layer)?.parent;
        while at != 0 {
            ancestors.insert(at);
            at = self.layer(at)?.parent;
        }
        let src_writable = !self.layer(src_layer)?.frozen;
        let mut mine = Vec::with_capacity(blocks.len());
        let mut theirs = Vec::new();
        for (block, e, m) in &blocks {
            let key = Key::new(ino, KIND_EXTENT, *block);
            if ancestors.contains(&e.birth_layer) {
                // Ours already, by inheritance: a clone would see it too.
                mine.push((key, e.encode()));
                continue;
            }
            self.map_set(
                e.lbn,
                MapValue {
                    extra_owners: m
                        .extra_owners
                        .checked_add(1)
                        .ok_or_else(|| Error::Invalid("block shared too often".into()))?,
                    ..*m
                },
            )?;
            self.charge_layer(layer, 1);
            mine.push((
                key,
                ExtentValue {
                    lbn: e.lbn,
                    birth_layer: layer,
                    shared: true,
                }
                .encode(),
            ));
            // The source may still write (a running container): from now
            // on it copies on write instead of overwriting in place. A
            // block born above the source is frozen there already.
            if e.birth_layer == src_layer && src_writable && !e.shared {
                theirs.push((
                    Key::new(src_ino, KIND_EXTENT, *block),
                    ExtentValue { shared: true, ..*e }.encode(),
                ));
            }
        }
        let shared_blocks = mine.len() as u64;
        for (tree_layer, items) in [(layer, mine), (src_layer, theirs)] {
            if items.is_empty() {
                continue;
            }
            let mut root = self.layer(tree_layer)?.root;
            let r = self.insert_sorted(Tree::Layer(tree_layer), &mut root, items);
            self.set_root(tree_layer, root);
            r?;
        }
        inode.blocks += shared_blocks;
        inode.size = inode.size.max(end_bytes);
        self.put_inode(layer, ino, &inode)?;
        self.counters.promoted_bytes += shared_blocks * bs;
        self.bump();
        Ok(())
    }
}
