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

/// A daemon on a fresh device, its snapshotter socket, and a client of it.
async fn started() -> (Harness, PathBuf, SnapshotsClient<Channel>) {
    require_root_and_fuse();
    let mut h = Harness::new();
    h.mkfs();
    h.start();
    let socket = h.socket.parent().unwrap().join("snapshotter.sock");
    let c = connect(&socket).await;
    (h, socket, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_live_in_the_mount_and_survive_kill_9() {
    let (mut h, socket, mut c) = started().await;
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

/// A snapshot removed while a mount made outside containerd still shows it
/// (containerd's garbage collector removes the parent view Docker mounts
/// for `docker diff`, as it does not know about that mount) reads and
/// lists as before through that mount, and its layer is freed once the
/// mount is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_snapshot_reads_through_its_mount_until_unmounted() {
    use lcfs_snapshotter::api::snapshots::{
        CleanupRequest, RemoveSnapshotRequest, ViewSnapshotRequest,
    };
    let (mut h, _socket, mut c) = started().await;
    let base = prepare(&mut c, "default/1/extract", "").await;
    // More entries than one readdir batch of the engine or the kernel.
    std::fs::create_dir(base.join("bin")).unwrap();
    for i in 0..400 {
        std::fs::write(base.join(format!("bin/tool{i:03}")), format!("tool {i}")).unwrap();
    }
    c.commit(CommitSnapshotRequest {
        snapshotter: "lcfs".into(),
        name: "default/2/layer".into(),
        key: "default/1/extract".into(),
        labels: Default::default(),
        parent: String::new(),
    })
    .await
    .unwrap();
    let mounts = c
        .view(ViewSnapshotRequest {
            snapshotter: "lcfs".into(),
            key: "default/3/parent-view".into(),
            parent: "default/2/layer".into(),
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let view = PathBuf::from(&mounts[0].source);
    let layer = view.file_name().unwrap().to_owned();
    let target = h.dir.path().join("view");
    std::fs::create_dir(&target).unwrap();
    let mount = |args: &[&std::ffi::OsStr]| {
        let status = std::process::Command::new(args[0])
            .args(&args[1..])
            .status()
            .unwrap();
        assert!(status.success(), "{args:?}");
    };
    mount(&[
        "mount".as_ref(),
        "--bind".as_ref(),
        view.as_os_str(),
        target.as_os_str(),
    ]);
    // Unmounted (lazily) if the test fails before its own umount.
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0)
                .status();
        }
    }
    let _unmount = Unmount(&target);
    // Half a walk, as a diff is when the collector runs.
    let first = std::fs::read_dir(target.join("bin"))
        .unwrap()
        .take(100)
        .count();
    assert_eq!(first, 100);

    c.remove(RemoveSnapshotRequest {
        snapshotter: "lcfs".into(),
        key: "default/3/parent-view".into(),
    })
    .await
    .unwrap();
    c.cleanup(CleanupRequest {
        snapshotter: "lcfs".into(),
    })
    .await
    .unwrap();
    let names: std::collections::BTreeSet<String> = std::fs::read_dir(target.join("bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names.len(),
        400,
        "the mount lists every file after the removal"
    );
    for i in 0..400 {
        let file = target.join(format!("bin/tool{i:03}"));
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            format!("tool {i}"),
            "{file:?}"
        );
    }
    let in_mount = || {
        std::fs::read_dir(&h.mountpoint)
            .unwrap()
            .any(|e| e.unwrap().file_name() == layer)
    };
    assert!(
        in_mount(),
        "the removed snapshot's layer waits for its mount"
    );

    mount(&["umount".as_ref(), target.as_os_str()]);
    // The next pass frees the layer (Cleanup, or the background pass).
    let mut freed = false;
    for _ in 0..20 {
        c.cleanup(CleanupRequest {
            snapshotter: "lcfs".into(),
        })
        .await
        .unwrap();
        if !in_mount() {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(freed, "the layer is freed once its mount is gone");
    drop(c);
    assert!(h.stop_with(libc::SIGTERM).success());
}
