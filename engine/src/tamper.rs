//! Testing hooks that do what someone who can write the device could do:
//! change a file's data block or a tree value in place and fix the
//! checksums that cover it, so that block checksums and fsck see nothing
//! wrong. Tests of content digests use them (docs/integrity.md).

use crate::device::{AlignedBuf, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::format::*;
use crate::store::{Store, Tree};

/// Which value of a file [`Store::tamper_value`] changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tampered {
    /// Its inode (mode, owner, size, ...).
    Inode,
    /// The extent of its block `n` (where that block's data is).
    Extent(u64),
    /// Its symlink target.
    Symlink,
    /// Its first xattr group.
    Xattr,
}

impl Store {
    /// Changes the value `what` of file `ino` in `layer`'s tree in the node
    /// where it lies (no copy on write: every layer sharing that node sees
    /// it); returns the value before.
    pub(crate) fn tamper_value(
        &mut self,
        layer: u64,
        ino: u64,
        what: Tampered,
        f: &mut dyn FnMut(&mut Vec<u8>),
    ) -> Result<Vec<u8>> {
        let root = self.layer(layer)?.root;
        let (kind, lo, hi) = match what {
            Tampered::Inode => (KIND_INODE, 0, 0),
            Tampered::Extent(n) => (KIND_EXTENT, n, n),
            Tampered::Symlink => (KIND_SYMLINK, 0, 0),
            Tampered::Xattr => (KIND_XATTR, 0, u64::MAX),
        };
        let mut key = None;
        self.scan(
            Tree::Layer(layer),
            root,
            Key::new(ino, kind, lo),
            Key::new(ino, kind, hi),
            &mut |k, _| {
                key = Some(*k);
                false
            },
        )?;
        let key = key.ok_or(Error::NotFound)?;
        // Down to the leaf holding it.
        let mut id = root;
        loop {
            let n = self.node(Tree::Layer(layer), id, 0)?;
            if n.level == 0 {
                break;
            }
            id = n.children[Self::child_index(&n.keys, &key)].address;
        }
        let n = self.nodes.get_mut(id).expect("just loaded");
        let i = n.keys.binary_search(&key).map_err(|_| Error::NotFound)?;
        let old = n.values[i].clone();
        f(&mut n.values[i]);
        self.meta.clear();
        self.bump();
        Ok(old)
    }

    /// Changes block `index` of file `ino` in `layer` on the device, in
    /// place, and the checksum its map entry records; returns the bytes
    /// before. The block must be on the device (sync first).
    pub(crate) fn tamper_block(
        &mut self,
        layer: u64,
        ino: u64,
        index: u64,
        f: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Vec<u8>> {
        let extent = self
            .lget(layer, Key::new(ino, KIND_EXTENT, index))?
            .ok_or(Error::NotFound)?;
        let lbn = ExtentValue::decode(&extent)?.lbn;
        let at = self.map_get(lbn)?.ok_or(Error::NotFound)?;
        let mut b = AlignedBuf::new(BLOCK_SIZE);
        let offset = at.physical_block * BLOCK_SIZE as u64;
        self.dev.read_at(offset, &mut b)?;
        let old = b.to_vec();
        f(&mut b);
        self.dev.write_at(offset, &b)?;
        // The open segment's buffer still holds it (reads look there first).
        let in_flight = self.buffered_block(at.physical_block).is_some();
        match self.log.open_segment_block_mut(at.physical_block) {
            Some(buffered) => buffered.copy_from_slice(&b),
            None if in_flight => {
                return Err(Error::Invalid("the block is still being written".into()));
            }
            None => {}
        }
        self.map_set(
            lbn,
            MapValue {
                checksum: data_checksum(&b),
                ..at
            },
        )?;
        self.blocks
            .invalidate_range(at.physical_block, at.physical_block + 1);
        self.bump();
        Ok(old)
    }
}
