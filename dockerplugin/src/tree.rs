//! Path handling inside one layer, done on the engine directly.
//!
//! Containment rules (the same as Docker's chrooted unpack):
//! - a tar path is cleaned lexically: a leading `/` is dropped (absolute
//!   paths are taken relative to the layer root), `.` and empty components
//!   go, and `..` removes the previous component; a `..` that would climb
//!   above the root is refused (Docker's "breakout" error);
//! - directory components are resolved inside the layer: a symlink met on
//!   the way is followed with its target re-rooted at the layer root (an
//!   absolute target starts again at the root, `..` stops at the root), at
//!   most [`MAX_SYMLINK_HOPS`] times, so no path can leave the layer;
//! - the last component is never followed (it is what the entry replaces).

use crate::error::{Error, Result};
use lcfs_engine::{Engine, FileKind, ROOT_INODE};

/// Symlinks followed while resolving one path (Linux's MAXSYMLINKS).
pub(crate) const MAX_SYMLINK_HOPS: usize = 40;

/// Directory entries read per engine call.
const READDIR_BATCH: usize = 256;

/// Splits a tar path into clean components (see the module comment).
pub(crate) fn clean(path: &[u8]) -> std::result::Result<Vec<Vec<u8>>, String> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err(format!(
                        "path {:?} climbs above the layer root",
                        String::from_utf8_lossy(path)
                    ));
                }
            }
            _ => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

/// The inode of the directory `components` names in `layer`, following
/// symlinks inside the layer; missing directories are created (mode 0755,
/// root-owned, as Docker does) when `create` is set.
pub(crate) fn resolve_dir(
    engine: &Engine,
    layer: u64,
    components: &[Vec<u8>],
    create: bool,
) -> Result<u64> {
    // `ancestors` is the chain of directories from the root to where we are,
    // so a `..` inside a symlink target can step back (and stops at the root).
    let mut ancestors: Vec<u64> = vec![ROOT_INODE];
    let mut pending: Vec<Vec<u8>> = components.iter().rev().cloned().collect();
    let mut hops = 0usize;
    while let Some(name) = pending.pop() {
        let here = *ancestors.last().expect("the root is never popped");
        match name.as_slice() {
            b"" | b"." => continue,
            b".." => {
                if ancestors.len() > 1 {
                    ancestors.pop();
                }
                continue;
            }
            _ => {}
        }
        let attr = match engine.lookup(layer, here, &name) {
            Ok(a) => a,
            Err(lcfs_engine::Error::NotFound) if create => engine
                .mkdir(layer, here, &name, 0o755, 0, 0)
                .map_err(|e| Error::engine(format!("creating directory {}", show(&name)), e))?,
            Err(e) => return Err(Error::engine(format!("looking up {}", show(&name)), e)),
        };
        match attr.kind {
            FileKind::Directory => ancestors.push(attr.inode),
            FileKind::Symlink => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(Error::engine(
                        format!("more than {MAX_SYMLINK_HOPS} symlinks resolving a path"),
                        lcfs_engine::Error::Invalid("symlink loop".into()),
                    ));
                }
                let target = engine
                    .readlink(layer, attr.inode)
                    .map_err(|e| Error::engine(format!("reading symlink {}", show(&name)), e))?;
                if target.first() == Some(&b'/') {
                    ancestors.truncate(1);
                }
                for c in target.split(|b| *b == b'/').rev() {
                    pending.push(c.to_vec());
                }
            }
            _ => {
                return Err(Error::engine(
                    format!("{} is used as a directory", show(&name)),
                    lcfs_engine::Error::NotDirectory,
                ))
            }
        }
    }
    Ok(*ancestors.last().expect("the root is never popped"))
}

/// Removes `name` from `dir` and, for a directory, everything below it.
/// A missing name is not an error. Iterative: depth costs heap, not stack.
pub(crate) fn remove_all(engine: &Engine, layer: u64, dir: u64, name: &[u8]) -> Result<()> {
    let context = |what: &str| format!("{what} {}", show(name));
    let attr = match engine.lookup(layer, dir, name) {
        Ok(a) => a,
        Err(lcfs_engine::Error::NotFound) => return Ok(()),
        Err(e) => return Err(Error::engine(context("looking up"), e)),
    };
    if attr.kind != FileKind::Directory {
        return engine
            .unlink(layer, dir, name)
            .map_err(|e| Error::engine(context("removing"), e));
    }
    let mut stack: Vec<(u64, Vec<u8>, u64)> = vec![(dir, name.to_vec(), attr.inode)];
    while let Some((parent, entry_name, ino)) = stack.last().cloned() {
        let entries = engine
            .readdir(layer, ino, 0, READDIR_BATCH)
            .map_err(|e| Error::engine(context("listing"), e))?;
        if entries.is_empty() {
            engine
                .rmdir(layer, parent, &entry_name)
                .map_err(|e| Error::engine(context("removing directory"), e))?;
            stack.pop();
            continue;
        }
        for e in entries {
            if e.kind == FileKind::Directory {
                stack.push((ino, e.name, e.inode));
            } else {
                engine
                    .unlink(layer, ino, &e.name)
                    .map_err(|err| Error::engine(context("removing below"), err))?;
            }
        }
    }
    Ok(())
}

/// Every entry of a directory (name, inode, kind).
pub(crate) fn list_dir(
    engine: &Engine,
    layer: u64,
    dir: u64,
) -> Result<Vec<lcfs_engine::DirEntry>> {
    engine
        .list_dir(layer, dir)
        .map_err(|e| Error::engine("listing a directory", e))
}

/// Looks up a clean path without following any symlink (paths the engine
/// itself reported, e.g. from layer_changes). None when it is gone.
pub(crate) fn lookup_exact(
    engine: &Engine,
    layer: u64,
    components: &[Vec<u8>],
) -> Result<Option<lcfs_engine::Attr>> {
    let mut attr = engine
        .getattr(layer, ROOT_INODE)
        .map_err(|e| Error::engine("reading the layer root", e))?;
    for c in components {
        if attr.kind != FileKind::Directory {
            return Ok(None);
        }
        attr = match engine.lookup(layer, attr.inode, c) {
            Ok(a) => a,
            Err(lcfs_engine::Error::NotFound) | Err(lcfs_engine::Error::NotDirectory) => {
                return Ok(None)
            }
            Err(e) => return Err(Error::engine(format!("looking up {}", show(c)), e)),
        };
    }
    Ok(Some(attr))
}

pub(crate) fn show(name: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(name))
}
