//! Hostile layer tars stay inside the layer or fail: `..` escapes are
//! refused (as Docker's breakout check does), absolute paths are taken from
//! the layer root, symlinks met on a path resolve inside the layer (absolute
//! targets re-rooted), symlink loops stop at the hop limit; a failed import
//! (escape, loop, truncated stream, random garbage) leaves no layer behind,
//! and the parent layer and the engine stay intact.

mod common;

use common::{Plugin, TarMaker};
use lcfs_engine::ROOT_INODE;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn fresh(p: &Plugin, id: &str) {
    p.create(id, "base");
}

fn setup() -> Plugin {
    let p = Plugin::start();
    p.create("base", "");
    let mut t = TarMaker::new();
    t.dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"base passwd");
    assert!(p.apply("base", "", &t.finish(), false).get("Err").is_none());
    p
}

/// The call failed with an Err, the layer is gone, and everything else is
/// as it was.
fn assert_failed_cleanly(p: &Plugin, id: &str, r: &Value) {
    let err = r.get("Err").and_then(|e| e.as_str()).unwrap_or_default();
    assert!(!err.is_empty(), "{id}: expected failure, got {r}");
    assert!(
        !p.layer_names().contains(&id.to_string()),
        "{id} left behind"
    );
    // Docker removes the layer after a failed ApplyDiff: that must succeed.
    assert_eq!(
        p.call("GraphDriver.Remove", &format!(r#"{{"ID":"{id}"}}"#)),
        json!({})
    );
    let b = p.engine.layer_id("base").unwrap();
    let etc = p.engine.lookup(b, ROOT_INODE, b"etc").unwrap().inode;
    let passwd = p.engine.lookup(b, etc, b"passwd").unwrap().inode;
    assert_eq!(p.engine.read(b, passwd, 0, 100).unwrap(), b"base passwd");
    let report = p.engine.fsck(true).unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
}

fn read_path(p: &Plugin, id: &str, path: &[&[u8]]) -> Option<Vec<u8>> {
    let l = p.engine.layer_id(id).unwrap();
    let mut ino = ROOT_INODE;
    for c in path {
        ino = p.engine.lookup(l, ino, c).ok()?.inode;
    }
    p.engine.read(l, ino, 0, 1 << 20).ok()
}

#[test]
fn dot_dot_escapes_are_refused() {
    let p = setup();
    for (i, name) in [&b"../../etc/passwd"[..], b"a/../../x", b"/../etc/passwd"]
        .iter()
        .enumerate()
    {
        let id = format!("dotdot{i}");
        fresh(&p, &id);
        let mut t = TarMaker::new();
        t.file("ok", 0o644, b"fine").raw_file(name, b"owned");
        let r = p.apply(&id, "base", &t.finish(), false);
        assert!(
            r["Err"].as_str().unwrap().contains("above the layer root"),
            "{r}"
        );
        assert_failed_cleanly(&p, &id, &r);
    }
    // A hard link whose target climbs out is refused too.
    fresh(&p, "link");
    let mut t = TarMaker::new();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    {
        let g = h.as_gnu_mut().unwrap();
        g.name[..6].copy_from_slice(b"stolen");
        g.linkname[..16].copy_from_slice(b"../../etc/passwd");
    }
    h.set_cksum();
    t.builder.append(&h, std::io::empty()).unwrap();
    let r = p.apply("link", "base", &t.finish(), false);
    assert_failed_cleanly(&p, "link", &r);
}

#[test]
fn clean_relative_dot_dot_stays_inside() {
    let p = setup();
    fresh(&p, "inside");
    let mut t = TarMaker::new();
    t.raw_file(b"a/b/../c", b"lexically cleaned");
    let r = p.apply("inside", "base", &t.finish(), false);
    assert!(r.get("Err").is_none(), "{r}");
    assert_eq!(
        read_path(&p, "inside", &[b"a", b"c"]).unwrap(),
        b"lexically cleaned"
    );
}

#[test]
fn absolute_paths_are_taken_from_the_layer_root() {
    let p = setup();
    fresh(&p, "abs");
    let mut t = TarMaker::new();
    t.raw_file(b"/abs/path", b"rooted")
        .raw_file(b"/etc/passwd", b"replaced in the layer");
    let r = p.apply("abs", "base", &t.finish(), false);
    assert!(r.get("Err").is_none(), "{r}");
    assert_eq!(read_path(&p, "abs", &[b"abs", b"path"]).unwrap(), b"rooted");
    assert_eq!(
        read_path(&p, "abs", &[b"etc", b"passwd"]).unwrap(),
        b"replaced in the layer"
    );
    assert_eq!(
        read_path(&p, "base", &[b"etc", b"passwd"]).unwrap(),
        b"base passwd"
    );
    assert!(!std::path::Path::new("/abs/path").exists());
}

#[test]
fn symlinks_on_a_path_resolve_inside_the_layer() {
    let p = setup();
    fresh(&p, "sym");
    let mut t = TarMaker::new();
    t.raw_symlink(b"evil", b"/etc")
        .raw_file(b"evil/shadow", b"not the host's")
        .raw_symlink(b"up", b"../../../../..")
        .raw_file(b"up/top", b"at the layer root")
        .raw_symlink(b"nowhere", b"/missing/dir")
        .raw_file(b"nowhere/f", b"made inside");
    let r = p.apply("sym", "base", &t.finish(), false);
    assert!(r.get("Err").is_none(), "{r}");
    assert_eq!(
        read_path(&p, "sym", &[b"etc", b"shadow"]).unwrap(),
        b"not the host's"
    );
    assert_eq!(
        read_path(&p, "sym", &[b"top"]).unwrap(),
        b"at the layer root"
    );
    assert_eq!(
        read_path(&p, "sym", &[b"missing", b"dir", b"f"]).unwrap(),
        b"made inside"
    );
    let host_shadow = std::fs::read("/etc/shadow").unwrap_or_default();
    assert_ne!(host_shadow, b"not the host's");
}

#[test]
fn symlink_loops_fail() {
    let p = setup();
    fresh(&p, "loop");
    let mut t = TarMaker::new();
    t.raw_symlink(b"a", b"b")
        .raw_symlink(b"b", b"a")
        .raw_file(b"a/x", b"never");
    let r = p.apply("loop", "base", &t.finish(), false);
    assert!(r["Err"].as_str().unwrap().contains("symlinks"), "{r}");
    assert_failed_cleanly(&p, "loop", &r);
    fresh(&p, "self");
    let mut t = TarMaker::new();
    t.raw_symlink(b"s", b"/s").raw_file(b"s/x", b"never");
    let r = p.apply("self", "base", &t.finish(), false);
    assert_failed_cleanly(&p, "self", &r);
}

#[test]
fn truncated_streams_fail_and_leave_nothing() {
    let p = setup();
    let mut t = TarMaker::new();
    t.dir("d", 0o755)
        .file("d/big", 0o644, &vec![7u8; 200_000])
        .file("d/after", 0o644, b"x");
    let whole = t.finish();
    // Cut in the middle of the big file's data, and inside a header.
    for (i, cut) in [100_000usize, 512 + 512 + 200_192 + 100].iter().enumerate() {
        let id = format!("cut{i}");
        fresh(&p, &id);
        let r = p.apply(&id, "base", &whole[..*cut], i == 0);
        assert_failed_cleanly(&p, &id, &r);
    }
}

#[test]
fn random_garbage_fails_and_leaves_nothing() {
    let seed: u64 = std::env::var("LCFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("LCFS_SEED={seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let p = setup();
    for i in 0..20 {
        let id = format!("junk{i}");
        fresh(&p, &id);
        let len = rng.gen_range(1..20_000);
        let mut junk = vec![0u8; len];
        rng.fill(&mut junk[..]);
        junk[0] |= 1; // not an all-zero end-of-archive block
        let r = p.apply(&id, "base", &junk, i % 2 == 0);
        assert_failed_cleanly(&p, &id, &r);
    }
    // A valid tar with garbage spliced into its middle.
    let mut t = TarMaker::new();
    t.file("a", 0o644, &[1u8; 3000]).file("b", 0o644, b"b");
    let mut spliced = t.finish();
    for b in &mut spliced[3584..4096] {
        *b = rng.gen();
    }
    fresh(&p, "spliced");
    let r = p.apply("spliced", "base", &spliced, false);
    assert_failed_cleanly(&p, "spliced", &r);
}

#[test]
fn apply_diff_refuses_frozen_and_unknown_layers() {
    let p = setup();
    let r = p.apply("nope", "", &TarMaker::new().finish(), false);
    assert!(r["Err"].as_str().unwrap().contains("does not exist"), "{r}");
    fresh(&p, "child");
    // base now has a child: it is frozen and must not be written or removed.
    let r = p.apply(
        "base",
        "",
        &TarMaker::new().file("x", 0o644, b"x").finish(),
        false,
    );
    assert!(r["Err"].as_str().unwrap().contains("read-only"), "{r}");
    assert!(p.layer_names().contains(&"base".to_string()));
}

/// An empty GNU long name or long link is ignored, as Docker's reader (Go's
/// archive/tar) ignores it: the header's own name and target stand. (The
/// tar crate alone would take the empty name, and the file would silently
/// not be unpacked: found by the tar_apply fuzz target.)
#[test]
fn empty_gnu_long_names_are_ignored_as_docker_does() {
    let p = setup();
    fresh(&p, "long");
    let mut t = TarMaker::new();
    t.gnu_long(tar::EntryType::GNULongName, b"")
        .raw_file(b"x", b"kept")
        .gnu_long(tar::EntryType::GNULongLink, b"\0")
        .raw_symlink(b"s", b"etc");
    let r = p.apply("long", "base", &t.finish(), false);
    assert!(r.get("Err").is_none(), "{r}");
    assert_eq!(
        read_path(&p, "long", &[b"x"]).as_deref(),
        Some(&b"kept"[..])
    );
    let l = p.engine.layer_id("long").unwrap();
    let s = p.engine.lookup(l, ROOT_INODE, b"s").unwrap().inode;
    assert_eq!(p.engine.readlink(l, s).unwrap(), b"etc");
}
