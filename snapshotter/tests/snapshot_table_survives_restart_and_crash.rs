//! The snapshot table lives in the engine's layer metadata and every
//! changing call syncs before it answers: after a crash that keeps only
//! what reached the device (a kill -9), and after a clean restart, the
//! snapshotter answers exactly as before; removed snapshots stay removed
//! and are freed later; new layers never reuse a name.

mod common;

use common::*;
use lcfs_engine::device::{Device, FaultConfig, FaultyDevice, MemDevice};
use lcfs_engine::{Engine, FormatOptions, ROOT_INODE};
use lcfs_snapshotter::api::snapshots::{Info, Kind};
use std::sync::Arc;

async fn everything(c: &mut Client) -> Vec<(Info, i64, i64)> {
    let mut out = Vec::new();
    for i in list(c, &[]).await.unwrap() {
        let u = usage(c, &i.name).await.unwrap();
        out.push((i, u.size, u.inodes));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_survives_a_crash_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Arc::new(FaultyDevice::new(256 << 20, FaultConfig::default()));
    let dev: Arc<dyn Device> = faulty.clone();
    Engine::format(dev.clone(), &FormatOptions::default()).unwrap();
    // No background checkpoints: only the snapshotter's syncs make anything durable.
    let e = Engine::open(dev, quiet()).unwrap();
    let mut served = serve_mem(dir.path(), e.clone());
    let mut c = connect(&served.socket).await;

    let m = prepare_with(&mut c, "ns/1/base", "", labels(&[("a", "1")]))
        .await
        .unwrap();
    let base_layer = layer_of(&bind_source(&m, false));
    let id = e.layer_id(&base_layer).unwrap();
    let f = e.create(id, ROOT_INODE, b"file", 0o644, 0, 0).unwrap();
    e.write(id, f.inode, 0, &[7u8; 10000]).unwrap();
    commit_with(&mut c, "ns/2/committed", "ns/1/base", labels(&[("b", "2")]))
        .await
        .unwrap();
    prepare(&mut c, "ns/3/active", "ns/2/committed")
        .await
        .unwrap();
    view(&mut c, "ns/4/view", "ns/2/committed").await.unwrap();
    prepare(&mut c, "ns/5/gone", "ns/2/committed")
        .await
        .unwrap();
    remove(&mut c, "ns/5/gone").await.unwrap();
    let mut i = stat(&mut c, "ns/3/active").await.unwrap();
    i.labels = labels(&[("containerd.io/gc.root", "now"), ("x", "y")]);
    update(&mut c, i, &[]).await.unwrap();
    let before = everything(&mut c).await;
    assert_eq!(before.len(), 3);
    let layers_before = e.list_layers().len();

    // kill -9: nothing more reaches the device; keep what was flushed.
    served.shutdown();
    e.crash();
    drop(e);
    let image = faulty.crash_image();
    let dev: Arc<dyn Device> = Arc::new(MemDevice::from_bytes(image.snapshot()));
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    assert_eq!(
        e.list_layers().len(),
        layers_before,
        "the removed layer awaits freeing"
    );
    let mut served = serve_mem(dir.path(), e.clone());
    let mut c = connect(&served.socket).await;
    assert_eq!(
        everything(&mut c).await,
        before,
        "same table after the crash"
    );
    assert_eq!(
        served.server.as_ref().unwrap().table().pending_removals(),
        1
    );
    assert_eq!(kind(&stat(&mut c, "ns/4/view").await.unwrap()), Kind::View);
    assert_code(
        remove(&mut c, "ns/2/committed").await,
        tonic::Code::FailedPrecondition,
    );
    // A new snapshot gets a layer name no layer on the device has (even
    // the removed one not yet freed).
    let m = prepare(&mut c, "ns/6/new", "").await.unwrap();
    let new_layer = layer_of(&bind_source(&m, false));
    let number = |l: &str| l.trim_start_matches("containerd-").parse::<u64>().unwrap();
    assert_eq!(number(&new_layer), number(&base_layer) + 4);
    cleanup(&mut c).await.unwrap();
    assert_eq!(
        served.server.as_ref().unwrap().table().pending_removals(),
        0
    );
    let after = everything(&mut c).await;

    // A clean restart too.
    served.shutdown();
    drop(c);
    e.close().unwrap();
    drop(served);
    drop(e);
    let e = Engine::open(dev, quiet()).unwrap();
    let served = serve_mem(dir.path(), e.clone());
    let mut c = connect(&served.socket).await;
    assert_eq!(everything(&mut c).await, after);
    assert_eq!(e.fsck(true).unwrap().errors, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_left_writable_by_a_crash_is_frozen_at_start() {
    // The one two-step change: a view's layer is created, then frozen. A
    // crash between the two leaves a writable layer marked as a view.
    let dir = tempfile::tempdir().unwrap();
    let (dev, e) = mem_engine();
    let meta: lcfs_engine::LayerMetadata = [
        ("containerd.key", "half-made view"),
        ("containerd.kind", "view"),
        ("containerd.created", "1.000000000"),
        ("containerd.updated", "1.000000000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    e.create_layer_with_metadata("containerd-7", None, false, &meta)
        .unwrap();
    e.close().unwrap();
    drop(e);
    let e = Engine::open(dev, quiet()).unwrap();
    let served = serve_mem(dir.path(), e.clone());
    assert!(e.layer_info("containerd-7").unwrap().frozen);
    let mut c = connect(&served.socket).await;
    let i = stat(&mut c, "half-made view").await.unwrap();
    assert_eq!(kind(&i), Kind::View);
    assert_eq!(i.created_at.unwrap().seconds, 1);
    // And the counter continues past the existing layer.
    let m = prepare(&mut c, "next", "").await.unwrap();
    assert_eq!(layer_of(&bind_source(&m, false)), "containerd-8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_that_are_not_snapshots_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, e) = mem_engine();
    // The Docker plugin's layers, and one someone named like ours.
    e.create_layer("0123abcd", true).unwrap();
    e.clone_layer("0123abcd", "0123abcd-init").unwrap();
    e.create_layer("containerd-1", false).unwrap();
    let served = serve_mem(dir.path(), e.clone());
    let mut c = connect(&served.socket).await;
    assert!(list(&mut c, &[]).await.unwrap().is_empty());
    let m = prepare(&mut c, "k", "").await.unwrap();
    assert_eq!(layer_of(&bind_source(&m, false)), "containerd-2");
    remove(&mut c, "k").await.unwrap();
    cleanup(&mut c).await.unwrap();
    for l in ["0123abcd", "0123abcd-init", "containerd-1"] {
        assert!(e.layer_info(l).is_ok(), "{l} untouched");
    }
}
