//! Which frozen layer holds the same copy of a file as another layer: the
//! identity under which the mount serves one copy of a file's pages to every
//! layer that has not changed it (FUSE passthrough to one backing file).
//!
//! A clone starts with its parent's tree and copies a node before changing
//! it (it becomes the node's owner). So when no node of a layer's tree that
//! holds keys of file `ino` is the layer's own, the layer sees exactly what
//! its (frozen) parent sees for that file: inode, data and xattrs. Going up
//! the chain while that holds gives the oldest frozen layer with the same
//! copy. The test is by node, not by key: a node the layer copied for a
//! neighbouring file counts as a change (the answer is then the layer
//! itself, or None), never the other way round.

use crate::error::{Error, Result};
use crate::format::Key;
use crate::store::{Store, Tree};

impl Store {
    /// The oldest frozen layer whose copy of file `ino` is the one `layer`
    /// sees: `layer` itself when it is frozen and changed the file, an
    /// ancestor when the file is unchanged since then, None when `layer` is
    /// writable and changed the file (or created it).
    pub(crate) fn shared_copy(&mut self, layer: u64, ino: u64) -> Result<Option<u64>> {
        let mut at = layer;
        let mut found = None;
        // Bounded by the chain's length (parents always exist and are older).
        for _ in 0..=self.layers.len() {
            let rec = self.layers.get(at).ok_or(Error::NotFound)?;
            let (frozen, parent, root) = (rec.frozen, rec.parent, rec.root);
            if frozen {
                found = Some(at);
            }
            if parent == 0 || self.owns_keys_of(at, root, ino)? {
                return Ok(found);
            }
            at = parent;
        }
        Err(Error::corrupt(0, "layer parent chain has a cycle"))
    }

    /// Whether any node of `layer`'s tree that may hold keys of object `ino`
    /// is the layer's own (copied or created by it).
    fn owns_keys_of(&mut self, layer: u64, root: u64, ino: u64) -> Result<bool> {
        let lo = Key::new(ino, 0, 0);
        let hi = Key::new(ino, u8::MAX, u64::MAX);
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            if id == 0 {
                continue;
            }
            let n = self.node(Tree::Layer(layer), id, 0)?;
            if n.owner != layer {
                // A subtree the parent has too: all of it is the parent's.
                continue;
            }
            if n.level == 0 {
                return Ok(true);
            }
            // Children whose key range meets [lo, hi]: child i covers
            // [keys[i], keys[i+1]) (the first from the node's own low end).
            let first = Self::child_index(&n.keys, &lo);
            for (j, k) in n.keys[first..].iter().enumerate() {
                if j > 0 && *k > hi {
                    break;
                }
                stack.push(n.children[first + j].address);
            }
        }
        Ok(false)
    }
}
