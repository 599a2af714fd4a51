//! A layer's root (docs/format.md, "Layer digests") depends on its content
//! and metadata only: the same tree built on two devices, in another order,
//! in other write sizes, with files created and deleted on the way, gives
//! the same root, and so does a clone; every change of content, mode,
//! owner, xattr, link target or name gives another; times do not count.
//! Each regular file's digest is the fs-verity digest of its bytes.

use lcfs_engine::digest::{file_digest, layer_digest, Sha256Digest};
use lcfs_engine::*;
use std::collections::BTreeMap;

mod common;
use common::fresh;

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// The test tree: (path, contents) of regular files, in `order`; `chunk`
/// is the write size.
fn build(e: &Engine, name: &str, reverse: bool, chunk: usize) -> u64 {
    let l = e.create_layer(name, false).unwrap();
    let etc = e.mkdir(l, ROOT_INODE, b"etc", 0o755, 0, 0).unwrap().inode;
    let bin = e.mkdir(l, ROOT_INODE, b"bin", 0o755, 0, 0).unwrap().inode;
    let mut files: Vec<(u64, &[u8], u32, usize)> = vec![
        (etc, b"hosts", 1, 300),
        (etc, b"passwd", 2, 4096),
        (bin, b"sh", 3, 600_000),
        (bin, b"empty", 4, 0),
        (ROOT_INODE, b"a-b", 5, 9000),
    ];
    if reverse {
        files.reverse();
        // A file made and deleted on the way changes nothing.
        let t = e.create(l, ROOT_INODE, b"tmp", 0o600, 0, 0).unwrap();
        e.write(l, t.inode, 0, b"gone").unwrap();
        e.unlink(l, ROOT_INODE, b"tmp").unwrap();
    }
    for (dir, fname, seed, len) in files {
        let f = e.create(l, dir, fname, 0o644, 0, 0).unwrap();
        let data = pattern(seed, len);
        for (i, c) in data.chunks(chunk).enumerate() {
            e.write(l, f.inode, (i * chunk) as u64, c).unwrap();
        }
    }
    let sh = e.lookup(l, bin, b"sh").unwrap().inode;
    e.setattr(
        l,
        sh,
        &SetAttr {
            mode: Some(0o755),
            ..Default::default()
        },
    )
    .unwrap();
    e.setxattr(l, sh, b"user.role", b"shell", 0).unwrap();
    e.symlink(l, bin, b"bash", b"sh", 0, 0).unwrap();
    e.link(l, sh, ROOT_INODE, b"sh-link").unwrap();
    l
}

fn root(e: &Engine, name: &str) -> Sha256Digest {
    layer_digest(e, name, |_| {}).unwrap().root
}

#[test]
fn the_same_tree_gives_the_same_root_wherever_and_however_it_was_written() {
    let (_, a) = fresh(64 << 20);
    let (_, b) = fresh(128 << 20);
    build(&a, "x", false, 1 << 20);
    build(&b, "y", true, 4096 - 7);
    let da = layer_digest(&a, "x", |_| {}).unwrap();
    let db = layer_digest(&b, "y", |_| {}).unwrap();
    assert_eq!(da, db);
    assert_eq!(da.files, 5, "the hard link is hashed once");
    assert_eq!(
        da.entries, 10,
        "root, 2 directories, 5 files, a symlink, a link"
    );
    // A clone shows the same tree; freezing changes nothing.
    a.commit_layer("x").unwrap();
    a.clone_layer("x", "x2").unwrap();
    assert_eq!(root(&a, "x2"), da.root);
    assert_eq!(root(&a, "x"), da.root);
}

#[test]
fn every_file_digest_is_the_fs_verity_digest_of_its_bytes() {
    let (_, e) = fresh(64 << 20);
    let l = build(&e, "x", false, 65536);
    let mut seen = BTreeMap::new();
    layer_digest(&e, "x", |entry| {
        if entry.attr.kind == FileKind::File {
            let r = entry.record;
            seen.insert(r.path.clone(), (entry.attr.inode, r.digest));
        }
    })
    .unwrap();
    assert_eq!(seen.len(), 6, "sh and sh-link both listed");
    for (path, (ino, d)) in seen {
        let bytes = e.read(l, ino, 0, 1 << 20).unwrap();
        let want = file_digest(bytes.len() as u64, |off, len| {
            Ok(bytes[off as usize..off as usize + len].to_vec())
        })
        .unwrap();
        assert_eq!(d, want, "{}", String::from_utf8_lossy(&path));
    }
}

#[test]
fn content_and_metadata_change_the_root_and_times_do_not() {
    let (_, e) = fresh(256 << 20);
    build(&e, "base", false, 1 << 20);
    e.commit_layer("base").unwrap();
    let base = root(&e, "base");
    let mut roots = vec![base];
    // Each change in its own clone of the same tree.
    type Change = fn(&Engine, u64);
    let changes: Vec<(&str, Change)> = vec![
        ("one byte", |e, l| {
            let f = e.lookup(l, ROOT_INODE, b"a-b").unwrap().inode;
            e.write(l, f, 4000, b"!").unwrap();
        }),
        ("a mode bit", |e, l| {
            let f = e.lookup(l, ROOT_INODE, b"a-b").unwrap().inode;
            let set = SetAttr {
                mode: Some(0o640),
                ..Default::default()
            };
            e.setattr(l, f, &set).unwrap();
        }),
        ("the owner", |e, l| {
            let f = e.lookup(l, ROOT_INODE, b"a-b").unwrap().inode;
            let set = SetAttr {
                uid: Some(1000),
                ..Default::default()
            };
            e.setattr(l, f, &set).unwrap();
        }),
        ("an xattr", |e, l| {
            let f = e.lookup(l, ROOT_INODE, b"a-b").unwrap().inode;
            e.setxattr(l, f, b"user.x", b"1", 0).unwrap();
        }),
        ("a link target", |e, l| {
            let bin = e.lookup(l, ROOT_INODE, b"bin").unwrap().inode;
            e.unlink(l, bin, b"bash").unwrap();
            e.symlink(l, bin, b"bash", b"sh2", 0, 0).unwrap();
        }),
        ("a name", |e, l| {
            e.rename(l, ROOT_INODE, b"a-b", ROOT_INODE, b"a-c", 0)
                .unwrap();
        }),
        ("the size (a hole at the end)", |e, l| {
            let f = e.lookup(l, ROOT_INODE, b"a-b").unwrap().inode;
            let set = SetAttr {
                size: Some(9001),
                ..Default::default()
            };
            e.setattr(l, f, &set).unwrap();
        }),
    ];
    for (i, (what, change)) in changes.iter().enumerate() {
        let name = format!("c{i}");
        let l = e.clone_layer("base", &name).unwrap();
        change(&e, l);
        let r = root(&e, &name);
        assert!(!roots.contains(&r), "{what}: the root did not change");
        roots.push(r);
    }
    // Times alone change nothing.
    let l = e.clone_layer("base", "times").unwrap();
    let f = e.lookup(l, ROOT_INODE, b"a-b").unwrap().inode;
    let set = SetAttr {
        mtime: Some(TimeSet::At(Timestamp {
            seconds: 1,
            nanoseconds: 0,
        })),
        atime: Some(TimeSet::Now),
        ..Default::default()
    };
    e.setattr(l, f, &set).unwrap();
    assert_eq!(root(&e, "times"), base);
    assert!(matches!(
        layer_digest(&e, "no-such-layer", |_| {}),
        Err(Error::NotFound)
    ));
}
