//! A Docker commit (Diff of the container against its init layer, then
//! Create + ApplyDiff of exactly that tar onto the image top) makes the new
//! image layer from the container's blocks instead of writing the content
//! again; the result equals a plain extraction, the container keeps
//! writing without changing the image, removing the container keeps the
//! image, and a tar that differs from the container's content is written
//! as usual.

mod common;

use common::{Plugin, TarMaker};
use lcfs_engine::{Engine, ROOT_INODE};
use serde_json::json;

fn read(e: &Engine, layer: &str, name: &[u8]) -> Vec<u8> {
    let id = e.layer_id(layer).unwrap();
    let a = e.lookup(id, ROOT_INODE, name).unwrap();
    e.read(id, a.inode, 0, a.size as usize).unwrap()
}

fn promoted(p: &Plugin) -> u64 {
    p.engine.stats().engine.promoted_bytes
}

/// image <- c-init <- c, as `docker run` makes them; c writes `big`.
fn container(p: &Plugin, big: &[u8]) {
    p.create("image", "");
    let r = p.apply(
        "image",
        "",
        &TarMaker::new().file("etc", 0o644, b"x").finish(),
        false,
    );
    assert!(r.get("Err").is_none(), "{r}");
    assert!(p
        .call(
            "GraphDriver.CreateReadWrite",
            &json!({"ID": "c-init", "Parent": "image"}).to_string()
        )
        .get("Err")
        .is_none());
    assert!(p
        .call(
            "GraphDriver.CreateReadWrite",
            &json!({"ID": "c", "Parent": "c-init"}).to_string()
        )
        .get("Err")
        .is_none());
    let c = p.engine.layer_id("c").unwrap();
    let ino = p
        .engine
        .create(c, ROOT_INODE, b"big", 0o644, 0, 0)
        .unwrap()
        .inode;
    p.engine.write(c, ino, 0, big).unwrap();
}

fn big() -> Vec<u8> {
    (0..(3 << 20) + 123)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

#[test]
fn commit_promotes_the_container_blocks() {
    let p = Plugin::start();
    let data = big();
    container(&p, &data);
    let (status, tar) = p.diff("c", "c-init");
    assert_eq!(status, 200);
    p.create("committed", "image");
    let written = p.engine.stats().engine.user_write_bytes;
    let r = p.apply("committed", "image", &tar, true);
    assert!(r.get("Err").is_none(), "{r}");
    assert_eq!(r["Size"].as_u64().unwrap(), data.len() as u64);
    assert_eq!(read(&p.engine, "committed", b"big"), data);
    assert!(promoted(&p) >= (3 << 20), "promoted {}", promoted(&p));
    assert!(
        p.engine.stats().engine.user_write_bytes - written < 64 << 10,
        "the commit wrote the content again"
    );
    // The container goes on writing; the image layer does not change.
    let c = p.engine.layer_id("c").unwrap();
    let ino = p.engine.lookup(c, ROOT_INODE, b"big").unwrap().inode;
    p.engine.write(c, ino, 4096, &[0xEE; 8192]).unwrap();
    assert_eq!(read(&p.engine, "committed", b"big"), data);
    // Its Diff is the same tar (docker save rebuilds it from the mount).
    let (_, again) = p.diff("committed", "image");
    assert_eq!(again, tar);
    // docker rm of the container, as a build does after each step.
    for id in ["c", "c-init"] {
        let r = p.call("GraphDriver.Remove", &json!({ "ID": id }).to_string());
        assert!(r.get("Err").is_none(), "{r}");
    }
    assert_eq!(read(&p.engine, "committed", b"big"), data);
    let report = p.engine.fsck(true).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

#[test]
fn a_different_tar_is_written_not_promoted() {
    let p = Plugin::start();
    let data = big();
    container(&p, &data);
    let (status, _) = p.diff("c", "c-init");
    assert_eq!(status, 200);
    let mut other = data.clone();
    other[(2 << 20) + 5] ^= 0xFF;
    p.create("committed", "image");
    let tar = TarMaker::new().file("big", 0o644, &other).finish();
    let r = p.apply("committed", "image", &tar, false);
    assert!(r.get("Err").is_none(), "{r}");
    assert_eq!(read(&p.engine, "committed", b"big"), other);
    // Only the 1 MiB chunk holding the changed byte was written.
    assert!(
        promoted(&p) >= 2 << 20 && promoted(&p) < 3 << 20,
        "{}",
        promoted(&p)
    );
    let report = p.engine.fsck(true).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}
