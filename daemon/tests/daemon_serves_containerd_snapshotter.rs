//! `lcfs daemon` serves the containerd snapshotter next to its control
//! socket: snapshots prepared and committed over gRPC are directories of
//! the daemon's FUSE mount, and the snapshot table survives a kill -9 and a
//! restart. `--no-containerd` turns it off. Needs root and /dev/fuse.

mod common;

use common::*;
use hyper_util::rt::TokioIo;
use lcfs_snapshotter::api::snapshots::snapshots_client::SnapshotsClient;
use lcfs_snapshotter::api::snapshots::{
    CommitSnapshotRequest, Kind, PrepareSnapshotRequest, StatSnapshotRequest,
};
use std::path::{Path, PathBuf};
use tonic::transport::Channel;

async fn connect(socket: &Path) -> SnapshotsClient<Channel> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:0")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .expect("connect to the snapshotter");
    SnapshotsClient::new(channel)
}

async fn prepare(c: &mut SnapshotsClient<Channel>, key: &str, parent: &str) -> PathBuf {
    let m = c
        .prepare(PrepareSnapshotRequest {
            snapshotter: "lcfs".into(),
            key: key.into(),
            parent: parent.into(),
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(m[0].options, ["rbind", "rw"]);
    PathBuf::from(&m[0].source)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_live_in_the_mount_and_survive_kill_9() {
    require_root_and_fuse();
    let mut h = Harness::new();
    h.mkfs();
    h.start();
    let socket = h.socket.parent().unwrap().join("snapshotter.sock");
    let mut c = connect(&socket).await;
    let base = prepare(&mut c, "default/1/extract", "").await;
    assert_eq!(base.parent().unwrap(), h.mountpoint);
    std::fs::write(base.join("hello"), b"from containerd").unwrap();
    c.commit(CommitSnapshotRequest {
        snapshotter: "lcfs".into(),
        name: "default/2/sha256:layer".into(),
        key: "default/1/extract".into(),
        labels: Default::default(),
        parent: String::new(),
    })
    .await
    .unwrap();
    let child = prepare(&mut c, "default/3/container", "default/2/sha256:layer").await;
    assert_eq!(
        std::fs::read(child.join("hello")).unwrap(),
        b"from containerd"
    );
    drop(c);

    let status = h.stop_with(libc::SIGKILL);
    assert!(!status.success());
    // Clear the dead mount here: the kernel may answer stat of the mount
    // root from its attribute cache for a while, and the daemon would take
    // the dead mount for a live one (daemon_lifecycle covers that path).
    let unmounted = std::process::Command::new("umount")
        .arg("-l")
        .arg(&h.mountpoint)
        .status()
        .unwrap();
    assert!(unmounted.success());
    h.start();
    let mut c = connect(&socket).await;
    let stat = |key: &str| StatSnapshotRequest {
        snapshotter: "lcfs".into(),
        key: key.into(),
    };
    let committed = c
        .stat(stat("default/2/sha256:layer"))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(committed.kind, Kind::Committed as i32);
    let active = c
        .stat(stat("default/3/container"))
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(active.kind, Kind::Active as i32);
    assert_eq!(active.parent, "default/2/sha256:layer");
    assert_eq!(
        std::fs::read(child.join("hello")).unwrap(),
        b"from containerd"
    );
    drop(c);
    assert!(h.stop_with(libc::SIGTERM).success());
    assert!(!socket.exists(), "the socket is removed at shutdown");
}

#[test]
fn no_containerd_serves_no_snapshotter() {
    require_root_and_fuse();
    let mut h = Harness::new();
    h.mkfs();
    h.daemon_args.push("--no-containerd".into());
    h.start();
    assert!(!h.socket.parent().unwrap().join("snapshotter.sock").exists());
    assert!(h.stop_with(libc::SIGTERM).success());
}

#[test]
fn containerd_socket_moves_the_snapshotter() {
    require_root_and_fuse();
    let mut h = Harness::new();
    h.mkfs();
    let socket = h.dir.path().join("elsewhere").join("snap.sock");
    h.daemon_args
        .extend(["--containerd-socket".into(), socket.display().to_string()]);
    h.start();
    assert!(socket.exists());
    assert!(!h.socket.parent().unwrap().join("snapshotter.sock").exists());
    assert!(h.stop_with(libc::SIGTERM).success());
}
