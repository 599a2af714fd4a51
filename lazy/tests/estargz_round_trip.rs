//! eStargz written by `estargz::build` and read back (docs/lazy.md): the
//! blob is an ordinary tar+gzip layer holding the input's entries; every
//! chunk starts a gzip member and hashes to its TOC digest; the TOC digest,
//! DiffID and sizes are what the blob holds; the files to fetch first lead;
//! a changed byte, a wrong TOC digest and hostile TOCs are refused with the
//! reason. Random trees: LCFS_SEED prints and replays.

use flate2::read::{GzDecoder, MultiGzDecoder};
use lcfs_lazy::estargz::{self, build, sha256_digest, BuildOptions, Error, Index, Toc, TocEntry};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::io::{Cursor, Read, Seek, SeekFrom, Write};

#[derive(Clone, Debug, PartialEq)]
struct File {
    kind: u8,
    data: Vec<u8>,
    link: String,
    mode: u32,
    uid: u64,
    mtime: u64,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn file(data: &[u8]) -> File {
    File {
        kind: b'0',
        data: data.to_vec(),
        link: String::new(),
        mode: 0o644,
        uid: 0,
        mtime: 1_600_000_000,
        xattrs: BTreeMap::new(),
    }
}

fn dir() -> File {
    File {
        kind: b'5',
        mode: 0o755,
        ..file(b"")
    }
}

/// A tar of `entries` in order (GNU long names, PAX xattrs, as tar does).
fn tar_of(entries: &[(String, File)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, f) in entries {
        if !f.xattrs.is_empty() {
            let pax: Vec<(String, Vec<u8>)> = f
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.clone()))
                .collect();
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::new(f.kind));
        h.set_mode(f.mode);
        h.set_uid(f.uid);
        h.set_gid(f.uid);
        h.set_mtime(f.mtime);
        h.set_size(f.data.len() as u64);
        match f.kind {
            b'2' | b'1' => b.append_link(&mut h, name, &f.link).unwrap(),
            _ => b.append_data(&mut h, name, &f.data[..]).unwrap(),
        }
    }
    b.into_inner().unwrap()
}

/// The entries of an uncompressed tar: name -> file (later wins).
fn entries_of(tar_bytes: &[u8]) -> BTreeMap<String, File> {
    let mut out = BTreeMap::new();
    let mut a = tar::Archive::new(tar_bytes);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        let h = e.header().clone();
        let mut xattrs = BTreeMap::new();
        if let Ok(Some(pax)) = e.pax_extensions() {
            for x in pax.flatten() {
                if let Some(k) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(k.to_string(), x.value_bytes().to_vec());
                }
            }
        }
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8(l.into_owned()).unwrap())
            .unwrap_or_default();
        out.insert(
            name,
            File {
                kind: h.entry_type().as_byte(),
                data,
                link,
                mode: h.mode().unwrap(),
                uid: h.uid().unwrap(),
                mtime: h.mtime().unwrap(),
                xattrs,
            },
        );
    }
    out
}

fn sample() -> Vec<(String, File)> {
    let big: Vec<u8> = (0..25_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut x = file(b"with an xattr");
    x.xattrs.insert("user.k".into(), b"v\0binary".to_vec());
    let long = format!("dir/{}/end.txt", "d".repeat(120));
    vec![
        ("dir/".into(), dir()),
        ("dir/a.txt".into(), file(b"hello")),
        ("dir/empty".into(), file(b"")),
        ("big.bin".into(), file(&big)),
        ("dir/x".into(), x),
        (long, file(b"a long name")),
        (
            "link".into(),
            File {
                kind: b'2',
                link: "dir/a.txt".into(),
                ..file(b"")
            },
        ),
        (
            "hard".into(),
            File {
                kind: b'1',
                link: "dir/a.txt".into(),
                ..file(b"")
            },
        ),
        ("dir/a.txt".into(), file(b"replaced: the later entry stays")),
        ("ünïcode".into(), file(b"utf-8 name")),
    ]
}

fn built(entries: &[(String, File)], options: &BuildOptions) -> (Vec<u8>, estargz::Built) {
    let mut blob = Vec::new();
    let b = build(Cursor::new(tar_of(entries)), &mut blob, options).unwrap();
    (blob, b)
}

#[test]
fn a_built_layer_holds_its_input_and_every_chunk_starts_a_member() {
    let input = sample();
    let options = BuildOptions {
        chunk_size: 10_000,
        ..BuildOptions::default()
    };
    let (blob, b) = built(&input, &options);
    // An ordinary tar+gzip layer: the input's entries, the landmark and
    // the TOC entry.
    let mut plain = Vec::new();
    MultiGzDecoder::new(&blob[..])
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(b.diff_id, sha256_digest(&plain));
    assert_eq!(b.uncompressed_size, plain.len() as u64);
    assert_eq!(b.blob_digest, sha256_digest(&blob));
    assert_eq!(b.blob_size, blob.len() as u64);
    let mut got = entries_of(&plain);
    assert_eq!(got.remove(".no.prefetch.landmark").unwrap().data, [0x0f]);
    assert!(got.remove("stargz.index.json").is_some());
    let mut want = entries_of(&tar_of(&input));
    // The tar crate reads a hard link's name as written.
    for (name, f) in want.iter_mut() {
        let g = &got[name];
        assert_eq!(g, f, "{name}");
    }
    want.retain(|n, _| !got.contains_key(n));
    assert!(want.is_empty(), "missing: {want:?}");

    let index = Index::open(&mut Cursor::new(&blob)).unwrap();
    assert_eq!(index.toc_digest, b.toc_digest);
    index.verify_toc(&b.toc_digest).unwrap();
    let report = index.verify_all(&mut Cursor::new(&blob)).unwrap();
    assert_eq!(report.chunks, index.chunks.len());
    // big.bin: three chunks of 10000, 10000, 5000.
    let big = index.by_name["big.bin"];
    let sizes: Vec<u64> = index
        .chunks
        .iter()
        .filter(|c| c.entry == big)
        .map(|c| c.size)
        .collect();
    assert_eq!(sizes, [10_000, 10_000, 5_000]);
    // Each chunk starts a gzip member: one member from there holds it.
    for c in &index.chunks {
        let mut one = Vec::new();
        GzDecoder::new(&blob[c.start as usize..c.end as usize])
            .read_to_end(&mut one)
            .unwrap();
        assert!(one.len() as u64 >= c.size);
        assert_eq!(sha256_digest(&one[..c.size as usize]), c.digest);
    }
    // Every file read chunk by chunk equals the input.
    for (name, f) in entries_of(&tar_of(&input)) {
        let i = index.by_name[name.trim_end_matches('/')];
        let mut content = Vec::new();
        for (n, c) in index
            .chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.entry == i)
        {
            content.extend(
                index
                    .read_chunk(n, &blob[c.start as usize..c.end as usize])
                    .unwrap(),
            );
        }
        if f.kind == b'0' {
            assert_eq!(content, f.data, "{name}");
            assert_eq!(index.entries[i].digest, sha256_digest(&f.data));
        }
    }
    assert_eq!(
        index.entries[index.by_name["dir/x"]].xattrs["user.k"],
        b"v\0binary"
    );
    assert_eq!(index.entries[index.by_name["link"]].link_name, "dir/a.txt");
    assert_eq!(
        index.entries[index.by_name["dir/a.txt"]].modtime,
        "2020-09-13T12:26:40Z"
    );
    assert!(index.prefetch().is_empty());
    // From a file, plain (read in place) or gzip: the same blob.
    for gzip in [false, true] {
        let mut f = tempfile::tempfile().unwrap();
        if gzip {
            let mut gz = flate2::write::GzEncoder::new(&mut f, flate2::Compression::fast());
            gz.write_all(&tar_of(&input)).unwrap();
            gz.finish().unwrap();
        } else {
            f.write_all(&tar_of(&input)).unwrap();
        }
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut again = Vec::new();
        let b2 = estargz::build_file(f, &mut again, &options).unwrap();
        assert!(
            again == blob && b2 == b,
            "gzip {gzip}: build_file differs from build"
        );
    }
}

#[test]
fn the_files_to_fetch_first_lead_after_their_directories() {
    let mut input = sample();
    input.insert(0, ("b/".into(), dir()));
    input.insert(1, ("b/c/".into(), dir()));
    input.push(("b/c/start.sh".into(), file(b"#!/bin/sh\necho up\n")));
    let options = BuildOptions {
        chunk_size: 10_000,
        prioritized: vec!["b/c/start.sh".into(), "hard".into()],
        ..BuildOptions::default()
    };
    let (blob, _) = built(&input, &options);
    let index = Index::open(&mut Cursor::new(&blob)).unwrap();
    let first: Vec<&str> = index.prefetch().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        first,
        ["b", "b/c", "b/c/start.sh", "dir", "dir/a.txt", "hard"]
    );
    let e = build(
        Cursor::new(tar_of(&input)),
        Vec::new(),
        &BuildOptions {
            prioritized: vec!["no/such".into()],
            ..BuildOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("\"no/such\" is not in the layer"),
        "{e}"
    );
}

#[test]
fn a_changed_byte_or_a_wrong_toc_digest_is_refused() {
    let (blob, b) = built(&sample(), &BuildOptions::default());
    let index = Index::open(&mut Cursor::new(&blob)).unwrap();
    let e = index
        .verify_toc(&format!("sha256:{}", "0".repeat(64)))
        .unwrap_err();
    assert!(matches!(e, Error::Mismatch(_)), "{e}");
    let e = index.verify_toc("sha256:XYZ").unwrap_err();
    assert!(matches!(e, Error::Input(_)), "{e}");
    // A byte of the last chunk's member changed, at every position: an
    // error or the right bytes (a change past the chunk's own data, in the
    // headers the member goes on with, does not touch them), never others.
    let last = index.chunks.len() - 1;
    let c = &index.chunks[last];
    let right = index
        .read_chunk(last, &blob[c.start as usize..c.end as usize])
        .unwrap();
    let mut refused = 0;
    for at in c.start..c.end {
        let mut bad = blob.clone();
        bad[at as usize] ^= 0x40;
        match index.read_chunk(last, &bad[c.start as usize..c.end as usize]) {
            Err(_) => refused += 1,
            Ok(data) => assert_eq!(data, right, "a change at {at} read as other bytes"),
        }
    }
    assert!(refused > 0);
    // A TOC that is not what the footer points at.
    let mut bad = blob.clone();
    let n = bad.len();
    bad[n - 30] = b'f';
    assert!(Index::open(&mut Cursor::new(&bad)).is_err());
    assert!(Index::open(&mut Cursor::new(&blob[..blob.len() - 1])).is_err());
    assert!(Index::open(&mut Cursor::new(b"not a layer".to_vec())).is_err());
    let _ = b;
}

fn entry(kind: &str, name: &str, size: i64, offset: i64) -> TocEntry {
    TocEntry {
        name: name.into(),
        kind: kind.into(),
        size,
        offset,
        chunk_digest: format!("sha256:{}", "a".repeat(64)),
        ..TocEntry::default()
    }
}

#[test]
fn hostile_tocs_are_refused_with_the_reason() {
    let ok = |entries: Vec<TocEntry>| {
        Index::from_toc(
            Toc {
                version: 1,
                entries: Some(entries),
            },
            String::new(),
            1000,
            1051,
        )
    };
    assert!(ok(vec![entry("reg", "a", 10, 10), entry("reg", "b", 10, 20)]).is_ok());
    assert!(ok(vec![]).is_ok());
    for (entries, why) in [
        (
            vec![entry("reg", "a", 10, 10), entry("reg", "b", 10, 10)],
            "not after",
        ),
        (
            vec![entry("reg", "a", 10, 20), entry("reg", "b", 10, 10)],
            "not after",
        ),
        (vec![entry("reg", "a", 10, 2000)], "not before the TOC"),
        (vec![entry("socket", "a", 0, 0)], "unknown type"),
        (vec![entry("chunk", "a", 0, 10)], "follows no regular file"),
        (vec![entry("reg", "a", -1, 10)], "negative"),
        (
            vec![TocEntry {
                chunk_size: 4,
                ..entry("reg", "a", 10, 10)
            }],
            "chunks cover 4 of its 10",
        ),
        (
            vec![TocEntry {
                chunk_digest: "md5:x".into(),
                ..entry("reg", "a", 10, 10)
            }],
            "chunk digest",
        ),
        (
            vec![TocEntry {
                link_name: "nowhere".into(),
                ..entry("hardlink", "h", 0, 0)
            }],
            "hard link",
        ),
    ] {
        let e = ok(entries).unwrap_err().to_string();
        assert!(e.contains(why), "{why}: {e}");
    }
}

#[test]
fn random_trees_round_trip() {
    let seed: u64 = std::env::var("LCFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("estargz random trees: LCFS_SEED={seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for round in 0..40 {
        let mut entries: Vec<(String, File)> = Vec::new();
        let dirs = ["", "a/", "a/b/", "c/"];
        for d in &dirs[1..] {
            entries.push((d.to_string(), dir()));
        }
        for i in 0..rng.gen_range(0..30) {
            let len = match rng.gen_range(0..4) {
                0 => 0,
                1 => rng.gen_range(1..100),
                2 => rng.gen_range(100..5000),
                _ => rng.gen_range(5000..40_000),
            };
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let name = format!("{}f{i}", dirs[rng.gen_range(0..dirs.len())]);
            entries.push((name, file(&data)));
        }
        let options = BuildOptions {
            chunk_size: rng.gen_range(1..9000),
            level: rng.gen_range(0..10),
            ..BuildOptions::default()
        };
        let (blob, b) = built(&entries, &options);
        let index = Index::open(&mut Cursor::new(&blob)).unwrap();
        index.verify_toc(&b.toc_digest).unwrap();
        index
            .verify_all(&mut Cursor::new(&blob))
            .unwrap_or_else(|e| panic!("round {round} (LCFS_SEED={seed}): {e}"));
        let mut plain = Vec::new();
        MultiGzDecoder::new(&blob[..])
            .read_to_end(&mut plain)
            .unwrap();
        let got = entries_of(&plain);
        for (name, f) in entries_of(&tar_of(&entries)) {
            assert_eq!(got[&name], f, "round {round} (LCFS_SEED={seed}): {name}");
        }
    }
}

/// An empty GNU long name is ignored, as Go's archive/tar (the reference
/// builder's reader) ignores it: the entry keeps its header's own name
/// instead of becoming "".
#[test]
fn an_empty_gnu_long_name_leaves_the_header_name() {
    let mut b = tar::Builder::new(Vec::new());
    for kind in [tar::EntryType::GNULongName, tar::EntryType::GNULongLink] {
        let mut long = tar::Header::new_gnu();
        long.set_entry_type(kind);
        long.set_path("././@LongLink").unwrap();
        long.set_size(0);
        long.set_mode(0o644);
        long.set_cksum();
        b.append(&long, &[][..]).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_path("link").unwrap();
    h.set_link_name("target").unwrap();
    h.set_size(0);
    h.set_mode(0o777);
    h.set_cksum();
    b.append(&h, &[][..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_path("a.txt").unwrap();
    h.set_size(5);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &b"hello"[..]).unwrap();
    let mut blob = Vec::new();
    build(
        Cursor::new(b.into_inner().unwrap()),
        &mut blob,
        &BuildOptions::default(),
    )
    .unwrap();
    let index = Index::open(&mut Cursor::new(&blob)).unwrap();
    assert!(!index.by_name.contains_key(""), "{:?}", index.by_name);
    assert!(index.by_name.contains_key("a.txt"), "{:?}", index.by_name);
    let link = &index.entries[index.by_name["link"]];
    assert_eq!(link.link_name, "target");
}
