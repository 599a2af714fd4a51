//! An apply hashes each file as it streams in, and sealing the layer after
//! its commit takes those hashes instead of reading the files back, once
//! the device confirms each block still holds what was hashed. The seal's
//! root is the one an independent reader of the layer computes, also when
//! a file changed between the apply and the commit (that file is read).

mod common;

use common::{Plugin, TarMaker};
use lcfs_dockerplugin::{applied_inode, apply_tar};
use lcfs_engine::{digest, SealInfo};

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
        // Over the 16 MiB the sealer checks per hold of the store lock.
        (
            "usr/lib/large",
            (0..(17 << 20) + 5000u32).map(|i| (i % 241) as u8).collect(),
        ),
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

/// Applies `tar` into new cold layer `name`; returns the layer's id.
fn applied(p: &Plugin, name: &str, tar: &[u8]) -> u64 {
    let id = p.engine.create_layer(name, true).unwrap();
    apply_tar(&p.engine, id, tar).unwrap();
    id
}

/// Commits and seals layer `name`: its seal, and the file bytes sealed
/// from streamed hashes.
fn sealed(p: &Plugin, name: &str) -> (SealInfo, u64) {
    p.engine.commit_layer(name).unwrap();
    let before = p.engine.sealed_from_stream_bytes();
    let seal = p.engine.seal_layer(name, &|| false, &mut |_| {}).unwrap();
    assert_eq!(seal.root, independent_root(p, name));
    (seal, p.engine.sealed_from_stream_bytes() - before)
}

#[test]
fn a_sealed_apply_is_not_read_back() {
    let p = Plugin::start();
    let (tar, file_bytes) = image_tar();
    applied(&p, "image", &tar);
    let (seal, streamed) = sealed(&p, "image");
    assert_eq!(streamed, file_bytes);
    assert_eq!(seal.file_bytes, file_bytes);
}

#[test]
fn a_file_changed_after_its_apply_is_read_and_hashed() {
    let p = Plugin::start();
    let (tar, file_bytes) = image_tar();
    let id = applied(&p, "image", &tar);
    // Changed in place, then a hole filled in another file: neither may
    // keep the hashes of what the apply wrote.
    let tool = applied_inode(&p.engine, id, b"usr/bin/tool").unwrap();
    p.engine.write(id, tool, 4096, b"changed").unwrap();
    let sparse = applied_inode(&p.engine, id, b"usr/lib/sparse").unwrap();
    p.engine.write(id, sparse, 4096 + 3, b"x").unwrap();
    let (seal, streamed) = sealed(&p, "image");
    assert_eq!(streamed, file_bytes - (300_000 + 3 * 4096));

    // The same tar applied and left alone has another root.
    applied(&p, "again", &tar);
    let (again, _) = sealed(&p, "again");
    assert_ne!(again.root, seal.root);
}

#[test]
fn with_hashing_off_the_apply_hashes_nothing() {
    let p = Plugin::start();
    p.engine.set_streamed_hashes(false);
    let (tar, _) = image_tar();
    applied(&p, "image", &tar);
    let (_, streamed) = sealed(&p, "image");
    assert_eq!(streamed, 0, "every file is read back");
}
