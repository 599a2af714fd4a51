//! A lazily mounted layer's tree, from its TOC alone (docs/lazy.md, "The
//! lazy mount"): a tar of every entry with the regular files empty, which
//! the layer applier (its containment rules, whiteouts, hard links, PAX
//! xattrs) writes into the layer; then the files that get absent blocks,
//! in the order their blocks are numbered, and which chunks hold each.

use crate::estargz::{Error, Index, Result};
use std::collections::HashMap;
use std::ops::Range;

/// The tar of `ix`'s entries, regular files with no content.
pub fn skeleton_tar(ix: &Index) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in &ix.entries {
        if e.name.is_empty() {
            continue; // the layer's root
        }
        let bad = |what: &str| Error::Format(format!("{:?}: {what}", e.name));
        if !e.xattrs.is_empty() {
            let named: Vec<(String, &[u8])> = e
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                .collect();
            b.append_pax_extensions(named.iter().map(|(k, v)| (k.as_str(), *v)))?;
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode((e.mode & 0o7777) as u32);
        h.set_uid(u64::try_from(e.uid).map_err(|_| bad("negative uid"))?);
        h.set_gid(u64::try_from(e.gid).map_err(|_| bad("negative gid"))?);
        let mtime = crate::time::unix_seconds(&e.modtime).unwrap_or(0);
        h.set_mtime(mtime.max(0) as u64);
        let _ = h.set_username(&e.user_name);
        let _ = h.set_groupname(&e.group_name);
        h.set_size(0);
        let empty: &[u8] = &[];
        match e.kind.as_str() {
            "dir" => {
                h.set_entry_type(tar::EntryType::Directory);
                b.append_data(&mut h, format!("{}/", e.name), empty)?;
            }
            "reg" => {
                h.set_entry_type(tar::EntryType::Regular);
                b.append_data(&mut h, &e.name, empty)?;
            }
            "symlink" | "hardlink" => {
                h.set_entry_type(if e.kind == "symlink" {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                b.append_link(&mut h, &e.name, &e.link_name)?;
            }
            "char" | "block" | "fifo" => {
                h.set_entry_type(match e.kind.as_str() {
                    "char" => tar::EntryType::Char,
                    "block" => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                });
                let major = u32::try_from(e.dev_major).map_err(|_| bad("bad device major"))?;
                let minor = u32::try_from(e.dev_minor).map_err(|_| bad("bad device minor"))?;
                h.set_device_major(major)?;
                h.set_device_minor(minor)?;
                b.append_data(&mut h, &e.name, empty)?;
            }
            other => return Err(bad(&format!("entry type {other:?}"))),
        }
    }
    Ok(b.into_inner()?)
}

/// The regular files of `ix` that get absent blocks, as entry indexes in
/// TOC order: those with content that the layer keeps (a later entry of
/// the same name replaces an earlier one; whiteouts hold nothing).
pub fn lazy_files(ix: &Index) -> Vec<usize> {
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, e) in ix.entries.iter().enumerate() {
        last.insert(e.name.as_str(), i);
    }
    (0..ix.entries.len())
        .filter(|&i| {
            let e = &ix.entries[i];
            let base = e.name.rsplit('/').next().unwrap_or("");
            e.kind == "reg" && e.size > 0 && last[e.name.as_str()] == i && !base.starts_with(".wh.")
        })
        .collect()
}

/// For each regular file entry, the range of its chunks in
/// [`Index::chunks`] (a file's chunks are consecutive there).
pub fn chunk_ranges(ix: &Index) -> HashMap<usize, Range<usize>> {
    let mut out: HashMap<usize, Range<usize>> = HashMap::new();
    for (n, c) in ix.chunks.iter().enumerate() {
        out.entry(c.entry)
            .and_modify(|r| r.end = n + 1)
            .or_insert(n..n + 1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estargz::{build, BuildOptions};
    use std::io::{Cursor, Read};

    #[test]
    fn the_skeleton_holds_every_entry_and_no_content() {
        let mut t = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_size(0);
        t.append_data(&mut dir, "etc/", &[][..]).unwrap();
        for (name, data) in [
            ("etc/a", &b"hello"[..]),
            ("etc/.wh.gone", &b""[..]),
            ("etc/b", &[7u8; 9000][..]),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o640);
            h.set_uid(5);
            h.set_mtime(1_700_000_000);
            h.set_size(data.len() as u64);
            t.append_data(&mut h, name, data).unwrap();
        }
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_size(0);
        t.append_link(&mut l, "etc/s", "a").unwrap();
        let layer = t.into_inner().unwrap();
        let mut blob = Vec::new();
        build(&layer[..], &mut blob, &BuildOptions::default()).unwrap();
        let ix = Index::open(&mut Cursor::new(&blob)).unwrap();

        let files: Vec<&str> = lazy_files(&ix)
            .iter()
            .map(|&i| ix.entries[i].name.as_str())
            .collect();
        // The landmark is a file of the layer, as a full pull extracts it.
        assert_eq!(files, [".no.prefetch.landmark", "etc/a", "etc/b"]);
        let ranges = chunk_ranges(&ix);
        assert_eq!(ranges[&lazy_files(&ix)[2]].len(), 1);

        let skeleton = skeleton_tar(&ix).unwrap();
        let mut seen = Vec::new();
        for e in tar::Archive::new(&skeleton[..]).entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let (mode, uid, mtime) = (
                e.header().mode().unwrap(),
                e.header().uid().unwrap(),
                e.header().mtime().unwrap(),
            );
            let mut body = Vec::new();
            e.read_to_end(&mut body).unwrap();
            assert!(body.is_empty(), "{path} has content");
            seen.push((path, mode, uid, mtime));
        }
        let names: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
        assert!(
            names.contains(&"etc/") && names.contains(&"etc/s") && names.contains(&"etc/.wh.gone")
        );
        let a = seen.iter().find(|s| s.0 == "etc/a").unwrap();
        assert_eq!((a.1, a.2, a.3), (0o640, 5, 1_700_000_000));
    }
}
