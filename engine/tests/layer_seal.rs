//! Seals (engine/src/seal.rs): sealing a frozen layer records its root, its
//! manifest and every file's block hashes in a tree of the layer's own; the
//! seal survives a reopen, a sealing cut short goes on after a crash from
//! what it had written, a removal frees it, and fsck walks it throughout.

use lcfs_engine::device::{Device, MemDevice};
use lcfs_engine::digest::{layer_digest, layer_manifest};
use lcfs_engine::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod common;
use common::{assert_clean, fresh, quiet};

/// A layer of `files` files of 96 KiB (and a directory, a symlink), frozen.
fn image(e: &Engine, name: &str, files: u32) -> Vec<u64> {
    let l = e.create_layer(name, true).unwrap();
    let d = e.mkdir(l, ROOT_INODE, b"usr", 0o755, 0, 0).unwrap().inode;
    let mut inodes = Vec::new();
    for i in 0..files {
        let f = e
            .create(l, d, format!("f{i:03}").as_bytes(), 0o644, 0, 0)
            .unwrap();
        let data: Vec<u8> = (0..96 * 1024u32)
            .map(|j| j.wrapping_mul(2654435761).wrapping_add(i) as u8)
            .collect();
        e.write(l, f.inode, 0, &data).unwrap();
        inodes.push(f.inode);
    }
    e.symlink(l, ROOT_INODE, b"link", b"usr/f000", 0, 0)
        .unwrap();
    e.commit_layer(name).unwrap();
    inodes
}

fn reopen(dev: &Arc<MemDevice>) -> Arc<Engine> {
    let d: Arc<dyn Device> = dev.clone();
    Engine::open(d, quiet()).unwrap()
}

#[test]
fn a_seal_holds_the_layer_root_and_every_block_hash_and_outlives_a_reopen() {
    let (dev, e) = fresh(128 << 20);
    let inodes = image(&e, "img", 12);
    assert_eq!(e.seal_state("img").unwrap(), SealState::None);
    let want = layer_digest(&e, "img", |_| {}).unwrap();
    let mut seen = 0;
    let info = e.seal_layer("img", &|| false, &mut |b| seen = b).unwrap();
    assert_eq!(seen, 12 * 96 * 1024, "progress ends at every file byte");
    assert_eq!(info.root, want.root);
    assert_eq!((info.entries, info.files), (want.entries, want.files));
    assert_eq!(
        e.seal_state("img").unwrap(),
        SealState::Sealed(info.clone())
    );
    let (_, manifest) = layer_manifest(&e, "img").unwrap();
    assert_eq!(e.sealed_manifest("img").unwrap(), (info.clone(), manifest));
    let l = e.layer_id("img").unwrap();
    for &ino in &inodes {
        let f = e.sealed_file(l, ino).unwrap().unwrap();
        assert_eq!(f.size, 96 * 1024);
        assert!(f.path.starts_with(b"usr/f"));
    }
    // Sealing again changes nothing; a clone has no seal of its own; a
    // writable layer is refused.
    assert_eq!(e.seal_layer("img", &|| false, &mut |_| {}).unwrap(), info);
    e.clone_layer("img", "run").unwrap();
    assert_eq!(e.seal_state("run").unwrap(), SealState::None);
    assert!(matches!(
        e.seal_layer("run", &|| false, &mut |_| {}),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        e.seal_layer("nope", &|| false, &mut |_| {}),
        Err(Error::NotFound)
    ));
    assert_clean(&e);
    e.sync().unwrap();
    e.close().unwrap();
    drop(e);
    let e = reopen(&dev);
    assert_eq!(e.seal_state("img").unwrap(), SealState::Sealed(info));
    assert_clean(&e);
}

#[test]
fn a_sealing_cut_short_goes_on_after_a_crash_from_what_it_wrote() {
    let (dev, e) = fresh(256 << 20);
    image(&e, "img", 40);
    let want = layer_digest(&e, "img", |_| {}).unwrap().root;
    e.sync().unwrap();
    let cancel = AtomicBool::new(false);
    let stop = || cancel.load(Ordering::Relaxed);
    let r = e.seal_layer("img", &stop, &mut |b| {
        if b >= 10 * 96 * 1024 {
            cancel.store(true, Ordering::Relaxed);
        }
    });
    assert!(matches!(r, Err(Error::Busy(_))), "{r:?}");
    assert_eq!(e.seal_state("img").unwrap(), SealState::Partial);
    assert_clean(&e);
    e.sync().unwrap();
    e.crash();
    drop(e);
    let e = reopen(&dev);
    assert_eq!(e.seal_state("img").unwrap(), SealState::Partial);
    assert_clean(&e);
    let before = e.stats().device.read_bytes;
    let info = e.seal_layer("img", &|| false, &mut |_| {}).unwrap();
    let read = e.stats().device.read_bytes - before;
    assert_eq!(info.root, want);
    assert!(
        read < 35 * 96 * 1024,
        "the files sealed before the crash are not read again ({read} bytes read)"
    );
    // Every file's hashes give its digest.
    let l = e.layer_id("img").unwrap();
    layer_digest(&e, "img", |entry| {
        if entry.attr.kind == FileKind::File {
            let f = e.sealed_file(l, entry.attr.inode).unwrap().unwrap();
            assert_eq!(f.digest, entry.record.digest);
        }
    })
    .unwrap();
    assert_clean(&e);
}

#[test]
fn removing_a_sealed_layer_frees_its_seal() {
    let (_, e) = fresh(128 << 20);
    let live_before = e.stats().live_bytes;
    image(&e, "img", 20);
    e.seal_layer("img", &|| false, &mut |_| {}).unwrap();
    assert!(e.layer_info("img").unwrap().owned_bytes > 20 * 96 * 1024);
    e.sync().unwrap();
    e.remove_layer("img").unwrap();
    e.reclaim_removed().unwrap();
    e.sync().unwrap();
    assert_clean(&e);
    assert_eq!(e.removals_pending(), 0);
    assert!(e.stats().live_bytes <= live_before + (64 << 10));
}

#[test]
fn a_clone_is_sealed_from_its_parents_seal_and_its_own_changes() {
    let (_, e) = fresh(128 << 20);
    let inodes = image(&e, "img", 12);
    e.seal_layer("img", &|| false, &mut |_| {}).unwrap();
    let step = e.clone_layer("img", "step").unwrap();
    e.write(step, inodes[0], 0, b"changed").unwrap();
    e.commit_layer("step").unwrap();
    e.sync().unwrap();
    e.drop_caches();
    let before = e.stats().device.read_bytes;
    let info = e.seal_layer("step", &|| false, &mut |_| {}).unwrap();
    let read = e.stats().device.read_bytes - before;
    assert!(
        read < 4 * 96 * 1024,
        "only the changed file is read ({read} bytes read)"
    );
    assert_eq!(info.root, layer_digest(&e, "step", |_| {}).unwrap().root);
    assert!(e.sealed_file(step, inodes[0]).unwrap().is_some());
    // (A file whose keys share a tree node with the changed one counts as
    // changed too: the test is by node.)
    assert!(e.sealed_file(step, inodes[11]).unwrap().is_none());
    // Reads in a clone of it: the unchanged file checked against img's
    // seal, the changed one against step's.
    e.set_verify_reads(true);
    let run = e.clone_layer("step", "run").unwrap();
    let (checked, _) = e.verify_counts();
    assert_eq!(e.read_counted(run, inodes[0], 0, 7).unwrap(), b"changed");
    assert_eq!(
        e.read_counted(run, inodes[1], 0, 96 * 1024).unwrap().len(),
        96 * 1024
    );
    assert_eq!(e.verify_counts(), (checked + 1 + 24, 0));
    assert_clean(&e);
}

/// With trusted roots, a layer under verified reads is served only when
/// its seal's root is trusted; one not sealed yet is sealed by its first
/// read; a new set is applied to layers already checked.
#[test]
fn trusted_roots_decide_which_sealed_layers_are_served() {
    let (_, e) = fresh(128 << 20);
    let a = image(&e, "a", 2);
    let b = image(&e, "b", 3);
    let root_a = e.seal_layer("a", &|| false, &mut |_| {}).unwrap().root;
    let root_b = layer_digest(&e, "b", |_| {}).unwrap().root;
    let (la, lb) = (e.layer_id("a").unwrap(), e.layer_id("b").unwrap());
    e.set_verify_reads(true);
    // Without a set, the seal on the device is trusted; an unsealed layer
    // is read unchecked.
    assert_eq!(e.read_counted(la, a[0], 0, 4096).unwrap().len(), 4096);
    assert_eq!(e.read_counted(lb, b[0], 0, 4096).unwrap().len(), 4096);
    assert_eq!(e.seal_state("b").unwrap(), SealState::None);

    e.set_trusted_roots(Some([root_a].into()));
    assert_eq!(e.read_counted(la, a[1], 0, 8192).unwrap().len(), 8192);
    // b is sealed by its first read, and its root is not trusted.
    let err = e.read_counted(lb, b[0], 0, 4096).unwrap_err();
    assert!(
        err.to_string().contains("not among the trusted roots"),
        "{err}"
    );
    assert!(matches!(e.seal_state("b").unwrap(), SealState::Sealed(s) if s.root == root_b));
    e.set_trusted_roots(Some([root_a, root_b].into()));
    assert_eq!(e.read_counted(lb, b[2], 0, 4096).unwrap().len(), 4096);
    // a, read before, is checked again under a set without it.
    e.set_trusted_roots(Some([root_b].into()));
    assert!(e.read_counted(la, a[1], 0, 8192).is_err());
    assert_eq!(e.trusted_roots(), Some(vec![root_b]));
    e.set_trusted_roots(None);
    assert_eq!(e.read_counted(la, a[1], 0, 8192).unwrap().len(), 8192);
}
