//! What a layer changed against its parent, from the trees themselves.
//!
//! A clone starts with its parent's root and copies every node it changes, so
//! any subtree of the clone that the clone does not own is identical in the
//! parent (which is frozen). The diff therefore visits only the leaves the
//! layer owns, compares their key ranges with the parent's, and turns the
//! differing keys into paths: O(what changed), not a walk of the whole tree.

use crate::error::{Error, Result};
use crate::format::*;
use crate::fs::{FileKind, ROOT_INODE};
use crate::store::{Store, Tree};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// How a path differs from the parent layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChangeKind {
    Modified,
    Added,
    Deleted,
}

/// One changed path (absolute, from the layer root, e.g. `/etc/hosts`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Change {
    pub path: Vec<u8>,
    pub kind: ChangeKind,
}

type Entries = Vec<(Key, Vec<u8>)>;
/// A differing key: (this layer's value, the parent's value).
type Differences = BTreeMap<Key, (Option<Vec<u8>>, Option<Vec<u8>>)>;

fn dirent_map(v: Option<&Vec<u8>>) -> Result<BTreeMap<Vec<u8>, u64>> {
    let mut m = BTreeMap::new();
    if let Some(v) = v {
        for (name, ino, _) in decode_dirents(v)? {
            m.insert(name, ino);
        }
    }
    Ok(m)
}

impl Store {
    /// Leaf key ranges [lo, hi) of the layer's tree that the layer owns.
    fn owned_ranges(&mut self, layer: u64, root: u64) -> Result<Vec<(Key, Option<Key>)>> {
        let mut out = Vec::new();
        let mut stack = vec![(root, Key::MIN, None::<Key>)];
        while let Some((id, lo, hi)) = stack.pop() {
            let n = self.node(Tree::Layer(layer), id, 0)?;
            if n.owner != layer {
                continue;
            }
            if n.level == 0 {
                out.push((lo, hi));
                continue;
            }
            for (i, c) in n.children.iter().enumerate() {
                let clo = if i == 0 { lo } else { n.keys[i] };
                let chi = n.keys.get(i + 1).copied().or(hi);
                stack.push((c.address, clo, chi));
            }
        }
        out.sort();
        Ok(out)
    }

    fn range_entries(
        &mut self,
        layer: u64,
        root: u64,
        lo: Key,
        hi: Option<Key>,
    ) -> Result<Entries> {
        let mut v = Vec::new();
        self.scan(Tree::Layer(layer), root, lo, Key::MAX, &mut |k, val| {
            if hi.is_some_and(|h| *k >= h) {
                return false;
            }
            v.push((*k, val.to_vec()));
            true
        })?;
        Ok(v)
    }

    /// The name of `ino` in directory `dir`, if it has one there.
    fn name_in(&mut self, layer: u64, dir: u64, ino: u64) -> Result<Option<Vec<u8>>> {
        let mut found = None;
        let mut bad = None;
        self.lscan(
            layer,
            Key::new(dir, KIND_DIRENT, 0),
            Key::new(dir, KIND_DIRENT, u64::MAX),
            &mut |_, v| {
                match decode_dirents(v) {
                    Ok(list) => {
                        if let Some((name, _, _)) = list.into_iter().find(|e| e.1 == ino) {
                            found = Some(name);
                            return false;
                        }
                    }
                    Err(e) => bad = Some(e),
                }
                bad.is_none()
            },
        )?;
        match bad {
            Some(e) => Err(e),
            None => Ok(found),
        }
    }

    /// The path of `ino` in `layer` through its recorded parent, or None when
    /// that name is gone (an extra hard link keeps the inode alive elsewhere).
    pub(crate) fn path_of(
        &mut self,
        layer: u64,
        ino: u64,
        memo: &mut HashMap<(u64, u64), Option<Vec<u8>>>,
    ) -> Result<Option<Vec<u8>>> {
        if ino == ROOT_INODE {
            return Ok(Some(Vec::new()));
        }
        if let Some(p) = memo.get(&(layer, ino)) {
            return Ok(p.clone());
        }
        let parent = match self.inode(layer, ino) {
            Ok(i) => i.parent,
            Err(Error::NotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        let result = if parent == 0 || parent == ino {
            None
        } else {
            match (
                self.name_in(layer, parent, ino)?,
                self.path_of(layer, parent, memo)?,
            ) {
                (Some(name), Some(mut p)) => {
                    p.push(b'/');
                    p.extend_from_slice(&name);
                    Some(p)
                }
                _ => None,
            }
        };
        memo.insert((layer, ino), result.clone());
        Ok(result)
    }

    /// Every path of a layer, as Added (the changes of a base layer).
    fn all_paths(&mut self, layer: u64) -> Result<Vec<Change>> {
        let mut out = Vec::new();
        let mut stack = vec![(Vec::new(), ROOT_INODE)];
        while let Some((prefix, dir)) = stack.pop() {
            let mut cookie = 0;
            loop {
                let batch = self.readdir(layer, dir, cookie, 256)?;
                if batch.is_empty() {
                    break;
                }
                for e in batch {
                    cookie = e.cookie;
                    let mut p = prefix.clone();
                    p.push(b'/');
                    p.extend_from_slice(&e.name);
                    if e.kind == FileKind::Directory {
                        stack.push((p.clone(), e.inode));
                    }
                    out.push(Change {
                        path: p,
                        kind: ChangeKind::Added,
                    });
                }
            }
        }
        out.sort();
        Ok(out)
    }

    pub(crate) fn layer_changes(&mut self, layer: u64) -> Result<Vec<Change>> {
        let rec = self.layers.get(layer).ok_or(Error::NotFound)?.clone();
        if rec.parent == 0 {
            return self.all_paths(layer);
        }
        let parent = rec.parent;
        let proot = self
            .layers
            .get(parent)
            .ok_or_else(|| Error::corrupt(0, "layer parent missing"))?
            .root;
        let mut changed: Differences = BTreeMap::new();
        for (lo, hi) in self.owned_ranges(layer, rec.root)? {
            let mine = self.range_entries(layer, rec.root, lo, hi)?;
            let theirs = self.range_entries(parent, proot, lo, hi)?;
            let mut a = mine.into_iter().peekable();
            let mut b = theirs.into_iter().peekable();
            loop {
                match (a.peek(), b.peek()) {
                    (None, None) => break,
                    (Some((ka, _)), Some((kb, _))) if ka == kb => {
                        let (k, va) = a.next().expect("peeked");
                        let (_, vb) = b.next().expect("peeked");
                        if va != vb {
                            changed.insert(k, (Some(va), Some(vb)));
                        }
                    }
                    (Some((ka, _)), Some((kb, _))) if ka < kb => {
                        let (k, va) = a.next().expect("peeked");
                        changed.insert(k, (Some(va), None));
                    }
                    (Some(_), None) => {
                        let (k, va) = a.next().expect("peeked");
                        changed.insert(k, (Some(va), None));
                    }
                    _ => {
                        let (k, vb) = b.next().expect("peeked");
                        changed.insert(k, (None, Some(vb)));
                    }
                }
            }
        }
        // Names that appeared, went or now point elsewhere; inodes whose
        // content or attributes changed.
        let mut named: Vec<(u64, Vec<u8>, ChangeKind, bool)> = Vec::new(); // (dir, name, kind, in parent's tree)
        let mut touched: BTreeSet<u64> = BTreeSet::new();
        for (k, (mine, theirs)) in &changed {
            match k.kind {
                KIND_DIRENT => {
                    let m = dirent_map(mine.as_ref())?;
                    let t = dirent_map(theirs.as_ref())?;
                    for (name, ino) in &m {
                        match t.get(name) {
                            None => named.push((k.object, name.clone(), ChangeKind::Added, false)),
                            Some(old) if old != ino => {
                                named.push((k.object, name.clone(), ChangeKind::Modified, false))
                            }
                            _ => {}
                        }
                    }
                    for name in t.keys().filter(|n| !m.contains_key(*n)) {
                        named.push((k.object, name.clone(), ChangeKind::Deleted, true));
                    }
                }
                KIND_INODE | KIND_EXTENT | KIND_XATTR | KIND_SYMLINK
                    if mine.is_some() || k.kind != KIND_INODE =>
                {
                    touched.insert(k.object);
                }
                _ => {}
            }
        }
        let mut memo = HashMap::new();
        let mut out: BTreeMap<Vec<u8>, ChangeKind> = BTreeMap::new();
        for (dir, name, kind, in_parent) in named {
            let tree = if in_parent { parent } else { layer };
            let Some(mut p) = self.path_of(tree, dir, &mut memo)? else {
                continue;
            };
            p.push(b'/');
            p.extend_from_slice(&name);
            out.insert(p, kind);
        }
        for ino in touched {
            // Inodes only the parent has were deleted (reported by name).
            if self.inode(layer, ino).is_err() {
                continue;
            }
            let Some(p) = self.path_of(layer, ino, &mut memo)? else {
                continue;
            };
            // The layer root itself is never listed (as in Docker's changes).
            if !p.is_empty() {
                out.entry(p).or_insert(ChangeKind::Modified);
            }
        }
        // A deleted directory stands for everything below it.
        let mut result: Vec<Change> = Vec::new();
        let mut deleted_dirs: Vec<Vec<u8>> = Vec::new();
        for (path, kind) in out {
            if deleted_dirs
                .iter()
                .any(|d| path.starts_with(d) && path.get(d.len()) == Some(&b'/'))
            {
                continue;
            }
            if kind == ChangeKind::Deleted {
                deleted_dirs.push(path.clone());
            }
            result.push(Change { path, kind });
        }
        Ok(result)
    }
}
