//! Layer tars, the largest outside input lcfs takes (Docker's ApplyDiff and
//! containerd's Diff Apply both unpack through `apply_tar`), built from the
//! fuzz input with hostile names: `..`, absolute paths, symlinks met on a
//! path (to `/`, up and out, in a loop), whiteouts of the parent's files,
//! opaque directories, AUFS metadata, hard links to anything, PAX xattrs,
//! GNU long names; and in one mode the built tar's bytes changed after the
//! fact. Each input applies into a fresh clone of a committed base layer on
//! its own in-memory device. Whatever the apply answers:
//! - the base layer reads exactly as before (paths, kinds, modes, owners,
//!   content, link targets): a tar never writes through to its parent;
//! - `fsck` with data checks finds nothing wrong, failed apply or not;
//! - when the apply succeeds and the tar's last entry is a regular file, the
//!   path it names (resolved as the apply resolves it) holds its bytes, mode
//!   and owner, unless the file replaced a symlink or directory its own path
//!   passes through.
#![no_main]

use lcfs_dockerplugin::{applied_inode, apply_tar, Error};
use lcfs_engine::device::{AlignedBuf, Device, MemDevice};
use lcfs_engine::{Config, Engine, FileKind, FormatOptions, ROOT_INODE};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

const DEVICE_BYTES: u64 = 32 << 20;
const SEGMENT_BYTES: u64 = 256 << 10;
const BLOCK: usize = 4096;

/// Path components the input picks from: plain names, the names of the
/// base layer's symlinks and directories, and every kind of hostile one.
const COMPONENTS: &[&[u8]] = &[
    b"a",
    b"b",
    b"etc",
    b"passwd",
    b"..",
    b".",
    b"",
    b"to-root",
    b"up",
    b"loop",
    b"dir",
    b".wh.a",
    b".wh.etc",
    b".wh..wh..opq",
    b".wh..wh.aufs",
    b".wh.",
    b"\xff\xfe",
    b"sub/../a",
    b"/",
    b"f",
];

/// Entry types the input picks from (tar type flags).
const KINDS: &[u8] = b"0251346L7x";

fn config() -> Config {
    Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        node_cache_bytes: 256 << 10,
        block_cache_bytes: 256 << 10,
        write_behind_segments: 0,
        ..Config::default()
    }
}

/// What a walk sees of one path of a layer.
#[derive(Debug, PartialEq)]
struct Seen {
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    content: Vec<u8>,
}

/// Every path of `layer`, depth first (the base layer is small).
fn walk(engine: &Engine, layer: u64) -> BTreeMap<Vec<u8>, Seen> {
    let mut out = BTreeMap::new();
    let mut todo = vec![(Vec::new(), ROOT_INODE)];
    while let Some((path, ino)) = todo.pop() {
        let attr = engine
            .getattr(layer, ino)
            .expect("getattr of a listed inode");
        let content = match attr.kind {
            FileKind::File => engine.read(layer, ino, 0, 1 << 20).expect("read"),
            FileKind::Symlink => engine.readlink(layer, ino).expect("readlink"),
            _ => Vec::new(),
        };
        if attr.kind == FileKind::Directory {
            for e in engine.list_dir(layer, ino).expect("list_dir") {
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                let mut child = path.clone();
                child.push(b'/');
                child.extend_from_slice(&e.name);
                todo.push((child, e.inode));
            }
        }
        out.insert(
            path,
            Seen {
                kind: attr.kind,
                mode: attr.mode,
                uid: attr.uid,
                gid: attr.gid,
                content,
            },
        );
    }
    out
}

/// One tar entry to write, its fields as raw as the input gives them.
struct Entry {
    kind: u8,
    name: Vec<u8>,
    link: Vec<u8>,
    mode: u32,
    uid: u64,
    gid: u64,
    data: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Writes `e` as GNU tar headers: a PAX header first for xattrs, GNU long
/// name and long link entries for fields past 100 bytes. No checks on the
/// names: `..` and `/` go in as given.
fn write_entry(out: &mut Vec<u8>, e: &Entry) {
    if matches!(e.kind, b'L' | b'x') {
        // A bare meta entry, empty: what it would carry for itself (a long
        // name, xattrs) would go to the entry after it.
        raw(out, e.kind, &e.name, &e.link, e.mode, e.uid, e.gid, &[]);
        return;
    }
    if !e.xattrs.is_empty() {
        let mut records = Vec::new();
        for (k, v) in &e.xattrs {
            let body = [b"SCHILY.xattr." as &[u8], k, b"=", v, b"\n"].concat();
            // "<len> <body>" where len counts itself.
            let mut len = body.len() + 2;
            while len.to_string().len() + 1 + body.len() != len {
                len += 1;
            }
            records.extend_from_slice(format!("{len} ").as_bytes());
            records.extend_from_slice(&body);
        }
        raw(out, b'x', b"pax", b"", 0o644, 0, 0, &records);
    }
    if e.name.len() >= 100 {
        raw(
            out,
            b'L',
            b"././@LongLink",
            b"",
            0,
            0,
            0,
            &[&e.name[..], b"\0"].concat(),
        );
    }
    if e.link.len() >= 100 {
        raw(
            out,
            b'K',
            b"././@LongLink",
            b"",
            0,
            0,
            0,
            &[&e.link[..], b"\0"].concat(),
        );
    }
    let data: &[u8] = if matches!(e.kind, b'0' | b'7') {
        &e.data
    } else {
        &[]
    };
    raw(out, e.kind, &e.name, &e.link, e.mode, e.uid, e.gid, data);
}

#[allow(clippy::too_many_arguments)]
fn raw(
    out: &mut Vec<u8>,
    kind: u8,
    name: &[u8],
    link: &[u8],
    mode: u32,
    uid: u64,
    gid: u64,
    data: &[u8],
) {
    let mut h = tar::Header::new_gnu();
    {
        let old = h.as_old_mut();
        let n = name.len().min(100);
        old.name[..n].copy_from_slice(&name[..n]);
        let l = link.len().min(100);
        old.linkname[..l].copy_from_slice(&link[..l]);
    }
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    h.set_entry_type(tar::EntryType::new(kind));
    if matches!(kind, b'3' | b'4') {
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
    }
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
}

fn finish(out: &mut Vec<u8>) {
    out.resize(out.len() + 1024, 0);
}

/// The base layer the fuzzed tars apply over, and a formatted device
/// holding it, committed: the non-zero blocks of that device, made once.
struct Base {
    blocks: Vec<(u64, Vec<u8>)>,
    seen: BTreeMap<Vec<u8>, Seen>,
}

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        let dev = Arc::new(MemDevice::new(DEVICE_BYTES));
        let d: Arc<dyn Device> = dev.clone();
        Engine::format(
            d.clone(),
            &FormatOptions {
                segment_size_bytes: SEGMENT_BYTES,
                force: false,
            },
        )
        .expect("format");
        let engine = Engine::open(d, config()).expect("open");
        let layer = engine.create_layer("base", false).expect("create base");
        let mut tar = Vec::new();
        let entry = |kind: u8, name: &[u8], link: &[u8], mode: u32, data: &[u8]| Entry {
            kind,
            name: name.to_vec(),
            link: link.to_vec(),
            mode,
            uid: 0,
            gid: 0,
            data: data.to_vec(),
            xattrs: Vec::new(),
        };
        for e in [
            entry(b'5', b"etc", b"", 0o755, b""),
            entry(
                b'0',
                b"etc/passwd",
                b"",
                0o644,
                b"root:x:0:0::/root:/bin/sh\n",
            ),
            entry(b'5', b"dir", b"", 0o750, b""),
            entry(b'0', b"dir/f", b"", 0o600, &[7u8; 2 * BLOCK + 5]),
            entry(b'1', b"dir/hard", b"dir/f", 0o600, b""),
            entry(b'2', b"to-root", b"/", 0o777, b""),
            entry(b'2', b"up", b"../..", 0o777, b""),
            entry(b'2', b"loop", b"loop", 0o777, b""),
            entry(b'2', b"a", b"etc", 0o777, b""),
        ] {
            write_entry(&mut tar, &e);
        }
        finish(&mut tar);
        apply_tar(&engine, layer, &tar[..]).expect("apply the base tar");
        engine.commit_layer("base").expect("commit base");
        let seen = walk(&engine, layer);
        engine.close().expect("close");
        let blocks = dev
            .snapshot()
            .chunks_exact(BLOCK)
            .enumerate()
            .filter(|(_, b)| b.iter().any(|&x| x != 0))
            .map(|(i, b)| ((i * BLOCK) as u64, b.to_vec()))
            .collect();
        Base { blocks, seen }
    })
}

/// Reads the input a byte at a time; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
    fn path(&mut self) -> Vec<u8> {
        let n = self.byte() % 5;
        let mut parts: Vec<Vec<u8>> = Vec::new();
        for _ in 0..n {
            let c = self.byte() as usize;
            parts.push(if c == 255 {
                vec![b'n'; 120] // a name for a GNU long name entry
            } else {
                COMPONENTS[c % COMPONENTS.len()].to_vec()
            });
        }
        parts.join(&b'/')
    }
}

fn entry(input: &mut Input) -> Entry {
    let kind = KINDS[input.byte() as usize % KINDS.len()];
    let name = input.path();
    let link = input.path();
    let mode = u32::from_le_bytes([input.byte(), input.byte() & 0x0f, 0, 0]);
    let (uid, gid) = (input.byte() as u64, input.byte() as u64);
    let size = input.byte() as usize * 97;
    let fill = input.byte();
    let data = (0..size)
        .map(|i| {
            if fill == 0 || i < BLOCK {
                0
            } else {
                fill ^ i as u8
            }
        })
        .collect();
    let mut xattrs = Vec::new();
    for _ in 0..input.byte() % 3 {
        let k: &[u8] = match input.byte() % 4 {
            0 => b"user.k",
            1 => b"security.capability",
            2 => b"trusted.overlay.opaque",
            _ => b"user.\xff",
        };
        xattrs.push((k.to_vec(), vec![input.byte(); input.byte() as usize % 40]));
    }
    Entry {
        kind,
        name,
        link,
        mode,
        uid,
        gid,
        data,
        xattrs,
    }
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let mut input = Input(data);
    let flags = input.byte();
    let mut tar = Vec::new();
    let mut last: Option<Entry> = None;
    for _ in 0..12 {
        if input.done() {
            break;
        }
        // A bare GNU long-name entry (kind L) is empty: the entry after it
        // keeps its own name, as Docker's reader has it (an empty PAX
        // header, kind x, changes nothing either).
        let e = entry(&mut input);
        write_entry(&mut tar, &e);
        last = Some(e);
    }
    if flags & 1 == 0 {
        finish(&mut tar);
    }
    if flags & 2 != 0 && !tar.is_empty() {
        // The built tar changed after the fact: the rest of the input is
        // (position, value) pairs.
        while !input.done() {
            let at = u16::from_le_bytes([input.byte(), input.byte()]) as usize % tar.len();
            tar[at] = input.byte();
        }
        last = None;
    }

    let mem = MemDevice::new(DEVICE_BYTES);
    for (offset, block) in &base.blocks {
        mem.write_at(*offset, &AlignedBuf::from_slice(block))
            .expect("write the base image");
    }
    let dev: Arc<dyn Device> = Arc::new(mem);
    let engine = Engine::open(dev, config()).expect("open the base image");
    let base_id = engine.layer_id("base").unwrap();
    let layer = engine.clone_layer("base", "c").expect("clone base");

    let applied = apply_tar(&engine, layer, &tar[..]);

    assert!(
        walk(&engine, base_id) == base.seen,
        "the base layer changed: {applied:?}"
    );
    let report = engine.fsck(true).expect("fsck runs");
    assert!(
        report.errors.is_empty(),
        "fsck after {applied:?}: {:?}",
        report.errors
    );

    if let (Ok(_), Some(e)) = (&applied, &last) {
        // The path as the apply cleans it (it succeeded: nothing climbed).
        let mut parts: Vec<&[u8]> = Vec::new();
        for c in e.name.split(|&b| b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => drop(parts.pop()),
                _ => parts.push(c),
            }
        }
        let hidden = parts.last().is_some_and(|c| c.starts_with(b".wh."));
        let aufs = parts.first().is_some_and(|c| c.starts_with(b".wh..wh."));
        if matches!(e.kind, b'0' | b'7') && !hidden && !aufs {
            match applied_inode(&engine, layer, &e.name) {
                Ok(ino) if ino != ROOT_INODE => {
                    let attr = engine.getattr(layer, ino).unwrap();
                    assert_eq!(attr.kind, FileKind::File);
                    assert_eq!(attr.mode & 0o7777, e.mode & 0o7777, "mode of {:?}", e.name);
                    assert_eq!((attr.uid, attr.gid), (e.uid as u32, e.gid as u32));
                    let content = engine.read(layer, ino, 0, 1 << 20).unwrap();
                    assert!(content == e.data, "content of {:?}", e.name);
                }
                Ok(_) => {} // the layer root: only its attributes change
                // The file replaced a symlink or directory its own path
                // passes through ("up/up" when "up" is a symlink to the
                // root): the path no longer resolves, as in Docker.
                Err(Error::Engine {
                    source: lcfs_engine::Error::NotDirectory,
                    ..
                }) => {}
                Err(err) => panic!(
                    "the last file {:?} is not where the apply put it: {err}",
                    e.name
                ),
            }
        }
    }
    engine.close().expect("close");
});
