//! Tampering that keeps every block checksum valid (a data block rewritten
//! with its checksum fixed, two files' extents swapped, an inode's mode bit,
//! owner or size changed, a link target or an xattr changed, each in place
//! in the tree node that holds it) goes unseen by fsck and changes the
//! layer root: a seeded random campaign (`LCFS_SEED` replays it,
//! `LCFS_TAMPER_CASES` sets its size, 1,000 by default) must detect every
//! case, and undoing each case gives the root back. With verified reads on,
//! every read of an altered file (in the image layer and in a container's
//! clone of it) is EIO, and every other file reads back whole.

use lcfs_engine::digest::{layer_digest, layer_manifest, verify_against, Sha256Digest};
use lcfs_engine::format::values::InodeValue;
use lcfs_engine::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::{assert_clean, env_or, fresh, seed};

struct File {
    inode: u64,
    len: u64,
    name: String,
}

fn root(e: &Engine) -> Sha256Digest {
    layer_digest(e, "img", |_| {}).unwrap().root
}

#[test]
fn every_tampering_that_keeps_checksums_valid_changes_the_root() {
    let seed = seed();
    let cases: usize = env_or("LCFS_TAMPER_CASES", 1000);
    eprintln!("tamper campaign: LCFS_SEED={seed} LCFS_TAMPER_CASES={cases}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);

    let (_, e) = fresh(128 << 20);
    let l = e.create_layer("img", true).unwrap();
    let mut files = Vec::new();
    for i in 0..24u32 {
        let len = [1usize, 100, 4096, 4097, 20_000, 70_000][i as usize % 6];
        let f = e
            .create(l, ROOT_INODE, format!("f{i}").as_bytes(), 0o644, 0, 0)
            .unwrap();
        let data: Vec<u8> = (0..len)
            .map(|j| (j as u32).wrapping_mul(2654435761).wrapping_add(i) as u8)
            .collect();
        e.write(l, f.inode, 0, &data).unwrap();
        e.setxattr(l, f.inode, b"user.tag", format!("file {i}").as_bytes(), 0)
            .unwrap();
        files.push(File {
            inode: f.inode,
            len: len as u64,
            name: format!("f{i}"),
        });
    }
    let links: Vec<u64> = (0..6)
        .map(|i| {
            e.symlink(
                l,
                ROOT_INODE,
                format!("s{i}").as_bytes(),
                format!("f{i}").as_bytes(),
                0,
                0,
            )
            .unwrap()
            .inode
        })
        .collect();
    e.commit_layer("img").unwrap();
    let run = e.clone_layer("img", "run").unwrap();
    e.sync().unwrap();
    let clean = root(&e);
    let (_, manifest) = layer_manifest(&e, "img").unwrap();
    let sealed = e.seal_layer("img", &|| false, &mut |_| {}).unwrap();
    assert_eq!(sealed.root, clean);
    assert_eq!(e.sealed_manifest("img").unwrap().1, manifest);
    e.set_verify_reads(true);
    let contents: Vec<Vec<u8>> = files
        .iter()
        .map(|f| e.read(l, f.inode, 0, f.len as usize).unwrap())
        .collect();
    let mut refused = 0;

    let mut detected = [0usize; 6];
    let mut tried = [0usize; 6];
    let mut located = 0;
    for case in 0..cases {
        let kind = rng.gen_range(0..6);
        let f = &files[rng.gen_range(0..files.len())];
        // What verify must report: (path, what differs).
        let mut want: Vec<(String, Vec<&str>)> = Vec::new();
        let undo: Box<dyn Fn(&Engine)> = match kind {
            0 => {
                // One byte of a data block, its checksum fixed (within the
                // file: what lies past its end is not content).
                let block = rng.gen_range(0..f.len.div_ceil(4096));
                let at = rng.gen_range(0..(f.len - block * 4096).min(4096)) as usize;
                let bit = 1u8 << rng.gen_range(0..8);
                let old = e.tamper_block(l, f.inode, block, |b| b[at] ^= bit).unwrap();
                want.push((f.name.clone(), vec!["content"]));
                let ino = f.inode;
                Box::new(move |e| {
                    e.tamper_block(l, ino, block, |b| b.copy_from_slice(&old))
                        .unwrap();
                })
            }
            1 => {
                // Two files' first extents swapped.
                let g = loop {
                    let g = &files[rng.gen_range(0..files.len())];
                    if g.inode != f.inode {
                        break g;
                    }
                };
                let (a, b) = (f.inode, g.inode);
                let ea = e.tamper_value(l, a, Tampered::Extent(0), |_| {}).unwrap();
                let eb = e
                    .tamper_value(l, b, Tampered::Extent(0), |v| *v = ea.clone())
                    .unwrap();
                e.tamper_value(l, a, Tampered::Extent(0), |v| *v = eb.clone())
                    .unwrap();
                want.push((f.name.clone(), vec!["content"]));
                want.push((g.name.clone(), vec!["content"]));
                Box::new(move |e| {
                    e.tamper_value(l, a, Tampered::Extent(0), |v| *v = ea.clone())
                        .unwrap();
                    e.tamper_value(l, b, Tampered::Extent(0), |v| *v = eb.clone())
                        .unwrap();
                })
            }
            2..=4 => {
                // A mode bit, the owner, or the size.
                let which = kind;
                let r: u32 = rng.gen();
                let old = e
                    .tamper_value(l, f.inode, Tampered::Inode, |v| {
                        let mut i = InodeValue::decode(v).unwrap();
                        match which {
                            2 => i.mode ^= 1 << (r % 12),
                            3 => i.uid = i.uid.wrapping_add(1 + r % 1000),
                            _ => i.size += 1 + u64::from(r % 4000),
                        }
                        *v = i.encode();
                    })
                    .unwrap();
                let what = ["mode", "owner", "content"][which - 2];
                want.push((f.name.clone(), vec![what]));
                let ino = f.inode;
                Box::new(move |e| {
                    e.tamper_value(l, ino, Tampered::Inode, |v| *v = old.clone())
                        .unwrap();
                })
            }
            _ => {
                // A symlink's target or a file's xattr: one byte.
                let (ino, what) = if rng.gen_bool(0.5) {
                    let i = rng.gen_range(0..links.len());
                    want.push((format!("s{i}"), vec!["link target"]));
                    (links[i], Tampered::Symlink)
                } else {
                    want.push((f.name.clone(), vec!["xattrs"]));
                    (f.inode, Tampered::Xattr)
                };
                let bit = 1u8 << rng.gen_range(0..7);
                let old = e
                    .tamper_value(l, ino, what, |v| {
                        let at = v.len() - 1;
                        v[at] ^= bit;
                    })
                    .unwrap();
                Box::new(move |e| {
                    e.tamper_value(l, ino, what, |v| *v = old.clone()).unwrap();
                })
            }
        };
        tried[kind] += 1;
        if tried[kind] == 1 {
            // The block checksums and the trees stay valid: fsck (data
            // verified) sees nothing.
            assert_clean(&e);
        }
        let tampered = root(&e);
        if tampered != clean {
            detected[kind] += 1;
        } else {
            eprintln!("case {case} (kind {kind}) not detected");
        }
        // Against the manifest taken before: the right paths, and what.
        let v = verify_against(&e, "img", &manifest).unwrap();
        assert_eq!(v.manifest_root, clean);
        let got: Vec<(String, Vec<&str>)> = v
            .differences
            .iter()
            .map(|(p, w)| (String::from_utf8_lossy(p).into_owned(), w.clone()))
            .collect();
        want.sort();
        if got == want {
            located += 1;
        } else {
            eprintln!("case {case} (kind {kind}): verify reported {got:?}, not {want:?}");
        }
        // Verified reads: EIO for the altered files, the rest whole, in
        // the image layer and in its clone.
        for layer in [l, run] {
            for (f, data) in files.iter().zip(&contents) {
                let altered = want.iter().any(|(p, _)| *p == f.name);
                match e.read_counted(layer, f.inode, 0, f.len as usize) {
                    Err(Error::Corrupt { .. }) if altered => refused += 1,
                    Ok(got) if !altered => {
                        assert!(got == *data, "case {case}: {} read back wrong", f.name)
                    }
                    r => panic!(
                        "case {case} (kind {kind}, LCFS_SEED={seed}): a verified read of {} \
                         (altered: {altered}) gave {:?}",
                        f.name,
                        r.map(|d| d.len())
                    ),
                }
            }
        }
        undo(&e);
        assert_eq!(
            root(&e),
            clean,
            "case {case} (kind {kind}): undone, the root is back"
        );
    }
    eprintln!(
        "tamper campaign: {} of {cases} detected; per kind (data, extents, mode, owner, size, link or xattr): tried {tried:?}, detected {detected:?}",
        detected.iter().sum::<usize>()
    );
    eprintln!("tamper campaign: {located} of {cases} located by verify (path and what)");
    eprintln!(
        "tamper campaign: {refused} verified reads of altered files refused, {} in all",
        e.stats().verify_failures
    );
    assert_eq!(detected, tried, "LCFS_SEED={seed}");
    assert_eq!(located, cases, "LCFS_SEED={seed}");
}
