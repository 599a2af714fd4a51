//! An apply hashes each file as it streams in, and sealing the layer after
//! its commit takes those hashes instead of reading the files back, once
//! the device confirms each block still holds what was hashed. The seal's
//! root is the one an independent reader of the layer computes, also when
//! a file changed between the apply and the commit (that file is read).

mod common;

use common::{Plugin, TarMaker};
use lcfs_dockerplugin::{applied_inode, apply_tar};
use lcfs_engine::digest;

fn image_tar() -> (Vec<u8>, u64) {
    let block = 4096;
    let mut sparse = vec![0u8; 3 * block];
    sparse[..5].copy_from_slice(b"start");
    sparse[2 * block + 7] = 1;
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("etc/small", b"hello".to_vec()),
        (
            "usr/bin/tool",
            (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect(),
        ),
        ("usr/lib/aligned", vec![9u8; 2 * block]),
        ("usr/lib/sparse", sparse),
        ("usr/lib/zeros", vec![0u8; block + 10]),
        ("empty", Vec::new()),
    ];
    let mut t = TarMaker::new();
    t.dir("etc", 0o755)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .dir("usr/lib", 0o755);
    let mut bytes = 0;
    for (path, data) in &files {
        t.file(path, 0o644, data);
        bytes += data.len() as u64;
    }
    t.hardlink("usr/bin/tool-link", "usr/bin/tool");
    (t.finish(), bytes)
}

fn independent_root(p: &Plugin, name: &str) -> [u8; 32] {
    digest::layer_digest(&p.engine, name, |_| {}).unwrap().root
}

#[test]
fn a_sealed_apply_is_not_read_back() {
    let p = Plugin::start();
    let (tar, file_bytes) = image_tar();
    let id = p.engine.create_layer("image", true).unwrap();
    apply_tar(&p.engine, id, &tar[..]).unwrap();
    p.engine.commit_layer("image").unwrap();
    let before = p.engine.sealed_from_stream_bytes();
    let seal = p
        .engine
        .seal_layer("image", &|| false, &mut |_| {})
        .unwrap();
    assert_eq!(p.engine.sealed_from_stream_bytes() - before, file_bytes);
    assert_eq!(seal.file_bytes, file_bytes);
    assert_eq!(seal.root, independent_root(&p, "image"));
}

#[test]
fn a_file_changed_after_its_apply_is_read_and_hashed() {
    let p = Plugin::start();
    let (tar, file_bytes) = image_tar();
    let id = p.engine.create_layer("image", true).unwrap();
    apply_tar(&p.engine, id, &tar[..]).unwrap();
    // Changed in place, then a hole filled in another file: neither may
    // keep the hashes of what the apply wrote.
    let tool = applied_inode(&p.engine, id, b"usr/bin/tool").unwrap();
    p.engine.write(id, tool, 4096, b"changed").unwrap();
    let sparse = applied_inode(&p.engine, id, b"usr/lib/sparse").unwrap();
    p.engine.write(id, sparse, 4096 + 3, b"x").unwrap();
    p.engine.commit_layer("image").unwrap();
    let before = p.engine.sealed_from_stream_bytes();
    let seal = p
        .engine
        .seal_layer("image", &|| false, &mut |_| {})
        .unwrap();
    let read = 300_000 + 3 * 4096;
    assert_eq!(
        p.engine.sealed_from_stream_bytes() - before,
        file_bytes - read
    );
    assert_eq!(seal.root, independent_root(&p, "image"));

    // The same tar applied and left alone has another root.
    let id = p.engine.create_layer("again", true).unwrap();
    apply_tar(&p.engine, id, &tar[..]).unwrap();
    p.engine.commit_layer("again").unwrap();
    let again = p
        .engine
        .seal_layer("again", &|| false, &mut |_| {})
        .unwrap();
    assert_ne!(again.root, seal.root);
    assert_eq!(again.root, independent_root(&p, "again"));
}
