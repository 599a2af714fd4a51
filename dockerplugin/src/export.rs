//! Diff, Changes and DiffSize, from what the engine knows a layer changed
//! ([`Engine::layer_changes`]: O(changes), and it survives restarts because
//! it is computed from the trees).
//!
//! The Diff tar follows Docker's `archive.ExportChanges`: a changed path is
//! written with its metadata (mode, owner, mtime in whole seconds, xattrs as
//! PAX `SCHILY.xattr.*`), a deleted one as an empty `.wh.<name>`, a second
//! name of an inode already written as a hard link. A directory that
//! replaced another one (a different inode at the same path) gets an opaque
//! marker `.wh..wh..opq`, because the engine lists only the new directory's
//! own entries, not each name the old one had.

use crate::error::{Error, Result};
use crate::tree::{clean, list_dir, lookup_exact};
use lcfs_engine::{Attr, Change, ChangeKind, Engine, FileKind};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const READ_CHUNK_BYTES: usize = 1 << 20;

/// What a layer's changes are taken against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Against {
    /// The layer's own parent: the engine's record of what the layer changed.
    Parent,
    /// Nothing (an empty parent in the request for a layer that has one):
    /// everything the layer shows, its ancestors' files included, as
    /// Docker's naive diff driver gives.
    Nothing,
}

/// A layer's changes against `parent`: its own parent in the engine (fast:
/// from what the engine recorded), or "" (everything it shows). Any other
/// layer is refused: the engine records changes against the parent only.
pub(crate) fn changes(engine: &Engine, id: &str, parent: &str) -> Result<(Vec<Change>, Against)> {
    let info = engine.layer_info(id).map_err(|e| layer_error(id, e))?;
    let actual = info.parent.as_deref().unwrap_or("");
    if actual == parent {
        let changes = engine
            .layer_changes(id)
            .map_err(|e| Error::engine(format!("computing the changes of layer {id:?}"), e))?;
        return Ok((with_ancestors(changes), Against::Parent));
    }
    if parent.is_empty() {
        return Ok((everything(engine, info.id)?, Against::Nothing));
    }
    Err(Error::Unsupported(format!(
        "layer {id:?} was created from {actual:?}, not {parent:?}: lcfs computes \
         changes against a layer's own parent or against nothing (\"\")"
    )))
}

/// Deepest directory nesting a full export walks (the kernel's PATH_MAX
/// allows at most 2048 levels of one-byte names).
const MAX_DEPTH: usize = 4096;

/// Every entry a layer shows, as added, in path order (parents first).
fn everything(engine: &Engine, layer: u64) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    // (directory inode, its path, its depth)
    let mut pending = vec![(lcfs_engine::ROOT_INODE, Vec::new(), 0usize)];
    while let Some((dir, path, depth)) = pending.pop() {
        if depth >= MAX_DEPTH {
            return Err(Error::Unsupported(format!(
                "a full export of layer {layer} goes deeper than {MAX_DEPTH} directories"
            )));
        }
        for entry in list_dir(engine, layer, dir)? {
            // Absolute, as the engine reports its own changes.
            let mut child = path.clone();
            child.push(b'/');
            child.extend_from_slice(&entry.name);
            if entry.kind == FileKind::Directory {
                pending.push((entry.inode, child.clone(), depth + 1));
            }
            out.push(Change {
                path: child,
                kind: ChangeKind::Added,
            });
        }
    }
    out.sort();
    Ok(out)
}

/// Adds the directories above every change (not the root) as modified, as
/// Docker's own change walker does: a layer tar then carries the mode,
/// owner and times of the directories it changes things in, so extracting
/// it on any driver reproduces them instead of making them up (an
/// extractor creates a missing parent with the current time).
fn with_ancestors(changes: Vec<Change>) -> Vec<Change> {
    let mut paths: std::collections::HashSet<Vec<u8>> =
        changes.iter().map(|c| c.path.clone()).collect();
    let mut out = changes;
    let mut added = Vec::new();
    for change in &out {
        let mut path = change.path.as_slice();
        while let Some(slash) = path.iter().rposition(|&b| b == b'/') {
            path = &path[..slash];
            if path.is_empty() || !paths.insert(path.to_vec()) {
                break;
            }
            added.push(Change {
                path: path.to_vec(),
                kind: ChangeKind::Modified,
            });
        }
    }
    out.extend(added);
    out.sort();
    out
}

pub(crate) fn layer_error(id: &str, e: lcfs_engine::Error) -> Error {
    match e {
        lcfs_engine::Error::NotFound => Error::UnknownLayer(id.to_string()),
        e => Error::engine(format!("layer {id:?}"), e),
    }
}

/// Docker's Kind codes: 0 modify, 1 add, 2 delete.
pub(crate) fn kind_code(kind: ChangeKind) -> u8 {
    match kind {
        ChangeKind::Modified => 0,
        ChangeKind::Added => 1,
        ChangeKind::Deleted => 2,
    }
}

/// Bytes of regular file content in the changes, each inode once (Docker's
/// `archive.ChangesSize`).
pub(crate) fn diff_size(engine: &Engine, id: &str, changes: &[Change]) -> Result<u64> {
    let layer = engine.layer_id(id).map_err(|e| layer_error(id, e))?;
    let mut seen = std::collections::HashSet::new();
    let mut size = 0;
    for c in changes.iter().filter(|c| c.kind != ChangeKind::Deleted) {
        let components = clean(&c.path).unwrap_or_default();
        if let Some(attr) = lookup_exact(engine, layer, &components)? {
            if attr.kind == FileKind::File && seen.insert(attr.inode) {
                size += attr.size;
            }
        }
    }
    Ok(size)
}

/// Writes the layer tar of `changes` (in path order, parents first).
/// Against nothing, there is nothing to white out or to make opaque.
pub(crate) fn write_diff(
    engine: &Engine,
    id: &str,
    (changes, against): (&[Change], Against),
    out: impl Write,
) -> Result<()> {
    let info = engine.layer_info(id).map_err(|e| layer_error(id, e))?;
    let layer = info.id;
    let parent_layer = match (&info.parent, against) {
        (Some(p), Against::Parent) => Some(engine.layer_id(p).map_err(|e| layer_error(p, e))?),
        _ => None,
    };
    let io = |e: std::io::Error| Error::io(format!("writing the diff of layer {id:?}"), e);
    let mut builder = tar::Builder::new(out);
    let mut first_names: HashMap<u64, Vec<u8>> = HashMap::new();
    for change in changes {
        let components = clean(&change.path).unwrap_or_default();
        let Some((name, parents)) = components.split_last() else {
            continue;
        };
        let relative = components.join(&b'/');
        if change.kind == ChangeKind::Deleted {
            let mut whiteout = parents.join(&b'/');
            if !whiteout.is_empty() {
                whiteout.push(b'/');
            }
            whiteout.extend_from_slice(b".wh.");
            whiteout.extend_from_slice(name);
            let mut h = marker_header();
            builder
                .append_data(&mut h, as_path(&whiteout), std::io::empty())
                .map_err(io)?;
            continue;
        }
        // Gone since the change list was made (a concurrent removal): skip.
        let Some(attr) = lookup_exact(engine, layer, &components)? else {
            continue;
        };
        if attr.kind == FileKind::Socket {
            continue; // tar has no sockets; Docker skips them too
        }
        write_xattrs(engine, layer, &attr, &mut builder).map_err(io)?;
        let mut h = header_for(&attr);
        let path = as_path(&relative);
        match attr.kind {
            FileKind::File if attr.nlink > 1 && first_names.contains_key(&attr.inode) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                builder
                    .append_link(&mut h, path, as_path(&first_names[&attr.inode]))
                    .map_err(io)?;
            }
            FileKind::File => {
                if attr.nlink > 1 {
                    first_names.insert(attr.inode, relative.clone());
                }
                h.set_size(attr.size);
                let content = FileReader {
                    engine,
                    layer,
                    inode: attr.inode,
                    offset: 0,
                    size: attr.size,
                    chunk: Vec::new(),
                    position: 0,
                };
                builder.append_data(&mut h, path, content).map_err(io)?;
            }
            FileKind::Symlink => {
                let target = engine
                    .readlink(layer, attr.inode)
                    .map_err(|e| Error::engine("reading a symlink", e))?;
                builder
                    .append_link(&mut h, path, as_path(&target))
                    .map_err(io)?;
            }
            FileKind::Directory => {
                // With a trailing slash, as Docker's and containerd's own
                // layer tars name directories.
                let mut dir = relative.clone();
                dir.push(b'/');
                builder
                    .append_data(&mut h, as_path(&dir), std::io::empty())
                    .map_err(io)?;
                let replaced = match parent_layer {
                    Some(p) => lookup_exact(engine, p, &components)?
                        .is_some_and(|old| old.inode != attr.inode),
                    None => false,
                };
                if replaced {
                    let mut opaque = relative.clone();
                    opaque.extend_from_slice(b"/.wh..wh..opq");
                    let mut o = marker_header();
                    builder
                        .append_data(&mut o, as_path(&opaque), std::io::empty())
                        .map_err(io)?;
                }
            }
            _ => {
                builder
                    .append_data(&mut h, path, std::io::empty())
                    .map_err(io)?;
            }
        }
    }
    builder.finish().map_err(io)?;
    Ok(())
}

fn as_path(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

/// An empty regular file marking a whiteout or an opaque directory. Its
/// time is fixed (Docker uses "now"), so the same layer gives the same tar.
fn marker_header() -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(0);
    h.set_mode(0o600);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

fn header_for(attr: &Attr) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(match attr.kind {
        FileKind::File => tar::EntryType::Regular,
        FileKind::Directory => tar::EntryType::Directory,
        FileKind::Symlink => tar::EntryType::Symlink,
        FileKind::CharDevice => tar::EntryType::Char,
        FileKind::BlockDevice => tar::EntryType::Block,
        FileKind::Fifo | FileKind::Socket => tar::EntryType::Fifo,
    });
    h.set_mode(attr.mode & 0o7777);
    h.set_uid(attr.uid.into());
    h.set_gid(attr.gid.into());
    h.set_mtime(attr.mtime.seconds.max(0) as u64);
    h.set_size(0);
    if matches!(attr.kind, FileKind::CharDevice | FileKind::BlockDevice) {
        let rdev = attr.rdev as libc::dev_t;
        let _ = h.set_device_major(libc::major(rdev));
        let _ = h.set_device_minor(libc::minor(rdev));
    }
    h
}

/// Writes a PAX header with the inode's xattrs (before its entry).
fn write_xattrs<W: Write>(
    engine: &Engine,
    layer: u64,
    attr: &Attr,
    builder: &mut tar::Builder<W>,
) -> std::io::Result<()> {
    let names = match engine.listxattr(layer, attr.inode) {
        Ok(n) => n,
        Err(e) => return Err(std::io::Error::other(e.to_string())),
    };
    if names.is_empty() {
        return Ok(());
    }
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
    for name in names {
        let Ok(text) = std::str::from_utf8(&name) else {
            log::warn!("xattr name {name:?} is not UTF-8; not exported");
            continue;
        };
        match engine.getxattr(layer, attr.inode, &name) {
            Ok(value) => records.push((format!("SCHILY.xattr.{text}"), value)),
            Err(lcfs_engine::Error::NoAttribute) => {}
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
    }
    builder.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
}

/// Reads a file's content from the engine in chunks.
struct FileReader<'a> {
    engine: &'a Engine,
    layer: u64,
    inode: u64,
    offset: u64,
    size: u64,
    chunk: Vec<u8>,
    position: usize,
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.position == self.chunk.len() {
            if self.offset >= self.size {
                return Ok(0);
            }
            let want = (self.size - self.offset).min(READ_CHUNK_BYTES as u64) as usize;
            self.chunk = self
                .engine
                .read(self.layer, self.inode, self.offset, want)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            if self.chunk.is_empty() {
                // The file shrank under us: the tar header promised more.
                return Err(std::io::Error::other("file shrank while being exported"));
            }
            self.position = 0;
            self.offset += self.chunk.len() as u64;
        }
        let n = buf.len().min(self.chunk.len() - self.position);
        buf[..n].copy_from_slice(&self.chunk[self.position..self.position + n]);
        self.position += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(path: &str, kind: ChangeKind) -> Change {
        Change {
            path: path.as_bytes().to_vec(),
            kind,
        }
    }

    #[test]
    fn ancestors_of_changes_are_listed_as_modified() {
        let got = with_ancestors(vec![
            change("/usr/share", ChangeKind::Modified),
            change("/usr/share/doc", ChangeKind::Deleted),
            change("/a/b/c/file", ChangeKind::Added),
            change("/top", ChangeKind::Added),
        ]);
        let want = vec![
            change("/a", ChangeKind::Modified),
            change("/a/b", ChangeKind::Modified),
            change("/a/b/c", ChangeKind::Modified),
            change("/a/b/c/file", ChangeKind::Added),
            change("/top", ChangeKind::Added),
            change("/usr", ChangeKind::Modified),
            change("/usr/share", ChangeKind::Modified),
            change("/usr/share/doc", ChangeKind::Deleted),
        ];
        assert_eq!(got, want);
    }
}
