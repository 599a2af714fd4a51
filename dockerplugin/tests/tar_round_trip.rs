//! ApplyDiff of a tar holding every entry kind (dirs, files with xattrs and
//! setuid modes, symlinks, hard links, char and block devices, fifos, long
//! names and link targets, zero-filled runs kept sparse) plus whiteouts and
//! opaque directories lands in the engine exactly; Diff of that layer gives
//! the same entries back (compared entry by entry), Changes lists them, and
//! applying the Diff to another clone of the parent rebuilds the same tree.
//! A directory that replaced another one is exported with an opaque marker.

mod common;

use common::{read_tar, Entry, Plugin, TarMaker};
use lcfs_engine::{Engine, FileKind, ROOT_INODE};
use serde_json::json;
use sha2::Digest;
use std::collections::BTreeMap;

fn base_tar() -> Vec<u8> {
    let mut t = TarMaker::new();
    t.dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n")
        .file("etc/gone", 0o644, b"to be whited out")
        .dir("olddir", 0o755)
        .file("olddir/a", 0o644, b"a")
        .dir("olddir/sub", 0o700)
        .file("olddir/sub/b", 0o600, b"b")
        .dir("replaced", 0o755)
        .file("replaced/inherited", 0o644, b"old")
        .dir("replaced/keepme", 0o755)
        .file("replaced/keepme/old", 0o644, b"old too");
    t.finish()
}

fn long_name() -> String {
    format!("deep/{}/{}.txt", "d".repeat(120), "n".repeat(140))
}

fn top_tar() -> Vec<u8> {
    let mut t = TarMaker::new();
    let mut sparse = vec![0u8; 8 << 20];
    sparse[4 << 20..(4 << 20) + 4096].fill(0xab);
    t.dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .xattrs(&[
            ("security.capability", b"\x01\x00\x00\x02\x00\x20\x00\x00"),
            ("user.note", b"hello"),
        ])
        .file("usr/bin/tool", 0o4755, b"#!/bin/sh\necho tool\n")
        .symlink("usr/link", "bin/tool")
        .hardlink("usr/hard", "usr/bin/tool")
        .dir("dev", 0o755)
        .device("dev/null", tar::EntryType::Char, 1, 3)
        .device("dev/sda", tar::EntryType::Block, 8, 0)
        .dir("run", 0o755)
        .device("run/fifo", tar::EntryType::Fifo, 0, 0)
        .file(&long_name(), 0o640, b"long")
        .symlink("usr/longlink", &format!("/{}", "t".repeat(180)))
        .file("usr/sparse", 0o644, &sparse)
        .file("etc/passwd", 0o600, b"root:x:0:0::/root:/bin/bash\n")
        .file("etc/.wh.gone", 0o644, b"")
        .file(".wh.olddir", 0o644, b"")
        .dir("replaced", 0o750)
        .file("replaced/.wh..wh..opq", 0o644, b"")
        .file("replaced/new", 0o644, b"new")
        .dir("replaced/keepme", 0o755)
        .file("replaced/keepme/fresh", 0o644, b"fresh");
    t.finish()
}

#[derive(Debug, PartialEq)]
struct Node {
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Option<i64>,
    size: u64,
    rdev: u64,
    content: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Every path of a layer with what it holds (directory mtimes left out:
/// unpacking below a directory the tar does not name changes them).
/// GraphDriver.Changes of `id` against `parent`: (path, Docker's kind code).
fn changes(p: &Plugin, id: &str, parent: &str) -> Vec<(String, u64)> {
    let answer = p.call(
        "GraphDriver.Changes",
        &format!(r#"{{"ID":"{id}","Parent":"{parent}"}}"#),
    );
    answer["Changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["Path"].as_str().unwrap().to_string(),
                c["Kind"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn walk(e: &Engine, layer: &str) -> BTreeMap<String, Node> {
    let l = e.layer_id(layer).unwrap();
    let mut out = BTreeMap::new();
    let mut stack = vec![(String::new(), ROOT_INODE)];
    while let Some((prefix, dir)) = stack.pop() {
        let mut cookie = 0;
        loop {
            let batch = e.readdir(l, dir, cookie, 100).unwrap();
            let Some(last) = batch.last() else { break };
            cookie = last.cookie;
            for d in batch {
                let path = format!("{prefix}/{}", String::from_utf8(d.name).unwrap());
                let a = e.getattr(l, d.inode).unwrap();
                let content = match a.kind {
                    FileKind::File => e.read(l, d.inode, 0, a.size as usize).unwrap(),
                    FileKind::Symlink => e.readlink(l, d.inode).unwrap(),
                    _ => Vec::new(),
                };
                let mut xattrs: Vec<_> = e
                    .listxattr(l, d.inode)
                    .unwrap()
                    .into_iter()
                    .map(|n| {
                        let v = e.getxattr(l, d.inode, &n).unwrap();
                        (n, v)
                    })
                    .collect();
                xattrs.sort();
                if a.kind == FileKind::Directory {
                    stack.push((path.clone(), d.inode));
                }
                out.insert(
                    path,
                    Node {
                        kind: a.kind,
                        mode: a.mode,
                        uid: a.uid,
                        gid: a.gid,
                        mtime: (a.kind != FileKind::Directory).then_some(a.mtime.seconds),
                        size: a.size,
                        rdev: a.rdev,
                        content,
                        xattrs,
                    },
                );
            }
        }
    }
    out
}

#[test]
fn every_entry_kind_round_trips() {
    let p = Plugin::start();
    p.create("base", "");
    let r = p.apply("base", "", &base_tar(), false);
    assert!(r.get("Err").is_none(), "{r}");
    p.create("top", "base");
    // Chunked upload, as Go's client sends a body of unknown length.
    let input = top_tar();
    let r = p.apply("top", "base", &input, true);
    assert!(r.get("Err").is_none(), "{r}");
    assert!(r["Size"].as_u64().unwrap() >= 8 << 20, "{r}");

    let tree = walk(&p.engine, "top");
    let tool = &tree["/usr/bin/tool"];
    assert_eq!(tool.mode, lcfs_engine::S_IFREG | 0o4755);
    assert_eq!(
        (tool.uid, tool.gid, tool.mtime),
        (1000, 100, Some(1_600_000_000))
    );
    assert_eq!(tool.xattrs.len(), 2);
    assert_eq!(tree["/usr/hard"], *tool);
    assert_eq!(tree["/usr/link"].content, b"bin/tool");
    assert_eq!(tree["/dev/null"].kind, FileKind::CharDevice);
    assert_eq!(tree["/dev/null"].rdev, libc::makedev(1, 3));
    assert_eq!(tree["/dev/sda"].kind, FileKind::BlockDevice);
    assert_eq!(tree["/run/fifo"].kind, FileKind::Fifo);
    assert_eq!(tree[&format!("/{}", long_name())].content, b"long");
    assert_eq!(
        tree["/etc/passwd"].content,
        b"root:x:0:0::/root:/bin/bash\n"
    );
    assert!(!tree.contains_key("/etc/gone"));
    assert!(!tree.keys().any(|k| k.starts_with("/olddir")));
    assert!(!tree.contains_key("/replaced/inherited"));
    assert!(
        !tree.contains_key("/replaced/keepme/old"),
        "opaque walks down"
    );
    assert!(tree.contains_key("/replaced/keepme/fresh"));
    assert_eq!(tree["/replaced"].mode, lcfs_engine::S_IFDIR | 0o750);
    // The 8 MiB file with one 4 KiB block of data stays sparse.
    let top = p.engine.layer_id("top").unwrap();
    let sparse = p
        .engine
        .lookup(
            top,
            p.engine.lookup(top, ROOT_INODE, b"usr").unwrap().inode,
            b"sparse",
        )
        .unwrap();
    assert_eq!(sparse.size, 8 << 20);
    assert!(sparse.blocks_512 <= 64, "{} blocks", sparse.blocks_512);
    assert_eq!(tree["/usr/sparse"].content[4 << 20], 0xab);

    // Changes, in Docker's codes.
    let list: BTreeMap<String, u64> = changes(&p, "top", "base").into_iter().collect();
    assert_eq!(list["/etc/gone"], 2);
    assert_eq!(list["/olddir"], 2);
    assert_eq!(list["/etc/passwd"], 0);
    assert_eq!(list["/usr/bin/tool"], 1);
    assert_eq!(list["/dev/sda"], 1);
    assert!(
        !list.contains_key("/olddir/a"),
        "a deleted dir stands for its contents"
    );

    // Diff: every non-whiteout input entry comes back identical.
    let (status, diff) = p.diff("top", "base");
    assert_eq!(status, 200);
    let out = read_tar(&diff);
    let by_path: BTreeMap<&str, &Entry> = out.iter().map(|e| (e.path.as_str(), e)).collect();
    for want in read_tar(&input) {
        let name = want.path.rsplit('/').next().unwrap();
        if name.starts_with(".wh.") {
            continue;
        }
        let got = by_path
            .get(want.path.as_str())
            .unwrap_or_else(|| panic!("{} missing from the diff", want.path));
        if want.kind == b'1' {
            // Hard links carry their target's attributes (as Docker writes them).
            assert_eq!(
                (got.kind, &got.link),
                (want.kind, &want.link),
                "{}",
                want.path
            );
        } else if want.kind == b'5' {
            // Directories: same kind and owner; mode for those the tar set.
            assert_eq!(
                (got.kind, got.mode, got.uid, got.gid),
                (want.kind, want.mode, want.uid, want.gid),
                "{}",
                want.path
            );
        } else {
            assert_eq!(**got, want, "{}", want.path);
        }
    }
    for whiteout in ["etc/.wh.gone", ".wh.olddir", "replaced/.wh.inherited"] {
        assert!(
            by_path.contains_key(whiteout),
            "{whiteout} missing: {:?}",
            by_path.keys()
        );
    }
    // DiffSize counts each inode's content once (tool and hard share one).
    let size = p.call("GraphDriver.DiffSize", r#"{"ID":"top","Parent":"base"}"#);
    let expected: u64 = [
        "/usr/bin/tool",
        "/usr/sparse",
        "/etc/passwd",
        "/replaced/new",
        "/replaced/keepme/fresh",
    ]
    .iter()
    .map(|k| tree[*k].size)
    .sum::<u64>()
        + 4;
    assert_eq!(size, json!({"Size": expected}));

    // Applying the Diff to another clone of base rebuilds the same tree.
    p.create("again", "base");
    let r = p.apply("again", "base", &diff, false);
    assert!(r.get("Err").is_none(), "{r}");
    assert_eq!(walk(&p.engine, "again"), tree);
    // And it still works after a restart-like reopen of the change list:
    // Diff is computed from the trees, so asking twice gives the same tar.
    assert_eq!(p.diff("top", "base").1, diff);
}

/// In the graphdriver contract an empty parent means "against nothing":
/// Diff, Changes and DiffSize of a layer that has a parent, asked against
/// "", give everything the layer shows (its ancestors' files too, no
/// whiteouts), consistent with each other; applied to an empty layer that
/// tar rebuilds the same tree.
#[test]
fn diff_against_nothing_is_the_whole_layer() {
    let p = Plugin::start();
    p.create("base", "");
    let r = p.apply("base", "", &base_tar(), false);
    assert!(r.get("Err").is_none(), "{r}");
    p.create("top", "base");
    let r = p.apply("top", "base", &top_tar(), false);
    assert!(r.get("Err").is_none(), "{r}");
    let tree = walk(&p.engine, "top");

    let (status, diff) = p.diff("top", "");
    assert_eq!(status, 200);
    let entries = read_tar(&diff);
    assert!(
        !entries
            .iter()
            .any(|e| e.path.rsplit('/').next().unwrap().starts_with(".wh.")),
        "nothing to white out against nothing"
    );
    p.create("copy", "");
    let r = p.apply("copy", "", &diff, false);
    assert!(r.get("Err").is_none(), "{r}");
    assert_eq!(walk(&p.engine, "copy"), tree);

    // Changes: every path the layer shows, as added.
    let listed = changes(&p, "top", "");
    let shown: Vec<String> = tree.keys().filter(|k| *k != "/").cloned().collect();
    assert_eq!(
        listed.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
        shown
    );
    assert!(listed.iter().all(|(_, kind)| *kind == 1));
    // DiffSize: the regular-file bytes of the Diff stream, each inode once.
    let size = p.call("GraphDriver.DiffSize", r#"{"ID":"top","Parent":""}"#);
    let in_stream: u64 = entries
        .iter()
        .filter(|e| e.kind == b'0')
        .map(|e| e.content.len() as u64)
        .sum();
    assert_eq!(size, json!({"Size": in_stream}));
    // Against the real parent it is still the layer's own changes.
    let (_, own) = p.diff("top", "base");
    assert!(read_tar(&own).iter().any(|e| e.path.contains(".wh.")));
    // Any other layer is refused.
    let r = p.call("GraphDriver.Changes", r#"{"ID":"top","Parent":"copy"}"#);
    assert!(
        r["Err"]
            .as_str()
            .unwrap()
            .contains("own parent or against nothing"),
        "{r}"
    );
}

#[test]
fn replaced_directory_exports_an_opaque_marker() {
    let p = Plugin::start();
    p.create("base", "");
    assert!(p.apply("base", "", &base_tar(), false).get("Err").is_none());
    p.create("c", "base");
    let e = &p.engine;
    let l = e.layer_id("c").unwrap();
    // rm -rf replaced && mkdir replaced && touch replaced/x
    let old = e.lookup(l, ROOT_INODE, b"replaced").unwrap().inode;
    e.unlink(l, old, b"inherited").unwrap();
    let keep = e.lookup(l, old, b"keepme").unwrap().inode;
    e.unlink(l, keep, b"old").unwrap();
    e.rmdir(l, old, b"keepme").unwrap();
    e.rmdir(l, ROOT_INODE, b"replaced").unwrap();
    let new = e
        .mkdir(l, ROOT_INODE, b"replaced", 0o755, 0, 0)
        .unwrap()
        .inode;
    e.create(l, new, b"x", 0o644, 0, 0).unwrap();
    let (status, diff) = p.diff("c", "base");
    assert_eq!(status, 200);
    let paths: Vec<String> = read_tar(&diff).into_iter().map(|e| e.path).collect();
    assert!(
        paths.contains(&"replaced/.wh..wh..opq".to_string()),
        "{paths:?}"
    );
    assert!(paths.contains(&"replaced/x".to_string()), "{paths:?}");
    // Applied elsewhere, the opaque marker hides the inherited entries.
    p.create("d", "base");
    assert!(p.apply("d", "base", &diff, false).get("Err").is_none());
    let tree = walk(&p.engine, "d");
    assert!(tree.contains_key("/replaced/x"));
    assert!(!tree.contains_key("/replaced/inherited"));
    assert!(!tree.contains_key("/replaced/keepme"));
}

/// Docker records the ApplyDiff stream as the plugin reads it and rebuilds
/// `docker save` tars from that record, so ApplyDiff must read the record
/// padding after the end-of-archive marker too, to the end of the body; the
/// layer's DiffID is the digest of all of it.
#[test]
fn apply_diff_reads_the_padding_after_the_archive() {
    let p = Plugin::start();
    p.create("padded", "");
    let mut body = base_tar();
    body.extend_from_slice(&[0u8; 10240]);
    let mut stream = std::io::Cursor::new(body);
    let answer = p.driver.apply_diff("padded", "", &mut stream);
    assert!(answer.get("Err").is_none(), "{answer}");
    assert_eq!(stream.position(), stream.get_ref().len() as u64);
    // The DiffID recorded is the SHA-256 of the whole stream, padding
    // included, as Docker computes it.
    let want = lcfs_engine::digest::digest_string(&sha2::Sha256::digest(stream.get_ref()).into());
    let meta = p.engine.layer_metadata("padded").unwrap();
    assert_eq!(meta.get(lcfs_dockerplugin::DIFF_ID_KEY), Some(&want));
}
