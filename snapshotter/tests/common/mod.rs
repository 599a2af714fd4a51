//! Shared by the snapshotter tests: an engine over an in-memory device, the
//! snapshotter serving it on a socket in a temporary directory, and a real
//! tonic client connected over that socket.

#![allow(dead_code)] // Each test file uses a different part.

use hyper_util::rt::TokioIo;
use lcfs_engine::device::{Device, MemDevice};
use lcfs_engine::{Config, Engine, FormatOptions};
use lcfs_fsfront::{KernelCache, NoMount};
use lcfs_snapshotter::api::snapshots::snapshots_client::SnapshotsClient;
use lcfs_snapshotter::api::snapshots::{
    CommitSnapshotRequest, Info, Kind, ListSnapshotsRequest, MountsRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, StatSnapshotRequest, UpdateSnapshotRequest, UsageRequest, UsageResponse,
    ViewSnapshotRequest,
};
use lcfs_snapshotter::api::types::Mount;
use lcfs_snapshotter::SnapshotterServer;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::transport::Channel;
use tonic::Code;

pub type Client = SnapshotsClient<Channel>;

pub fn quiet() -> Config {
    Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..Config::default()
    }
}

pub fn mem_engine() -> (Arc<dyn Device>, Arc<Engine>) {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(256 << 20));
    Engine::format(dev.clone(), &FormatOptions::default()).unwrap();
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    (dev, e)
}

/// A snapshotter on a socket in `dir/run/`.
pub struct Served {
    pub server: Option<SnapshotterServer>,
    pub socket: PathBuf,
    pub mountpoint: PathBuf,
}

pub fn serve_in(
    dir: &Path,
    engine: Arc<Engine>,
    mountpoint: &Path,
    kernel: Arc<dyn KernelCache>,
) -> Served {
    let socket = dir.join("run").join("snapshotter.sock");
    let server = lcfs_snapshotter::serve(engine, mountpoint, kernel, &socket).expect("serve");
    Served {
        server: Some(server),
        socket,
        mountpoint: mountpoint.to_path_buf(),
    }
}

/// The in-memory variant: mounts point into a directory nobody mounted.
pub fn serve_mem(dir: &Path, engine: Arc<Engine>) -> Served {
    serve_in(dir, engine, &dir.join("mnt"), Arc::new(NoMount))
}

impl Served {
    pub fn shutdown(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub async fn connect(socket: &Path) -> Client {
    SnapshotsClient::new(channel(socket).await)
}

/// A connection to the socket; every service on it can share it.
pub async fn channel(socket: &Path) -> Channel {
    let path = socket.to_path_buf();
    tonic::transport::Endpoint::try_from("http://[::]:0")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .expect("connect to the snapshotter")
}

pub fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub async fn prepare(c: &mut Client, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
    prepare_with(c, key, parent, HashMap::new()).await
}

pub async fn prepare_with(
    c: &mut Client,
    key: &str,
    parent: &str,
    labels: HashMap<String, String>,
) -> Result<Vec<Mount>, tonic::Status> {
    c.prepare(PrepareSnapshotRequest {
        snapshotter: "lcfs".into(),
        key: key.into(),
        parent: parent.into(),
        labels,
    })
    .await
    .map(|r| r.into_inner().mounts)
}

pub async fn view(c: &mut Client, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
    c.view(ViewSnapshotRequest {
        snapshotter: "lcfs".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    })
    .await
    .map(|r| r.into_inner().mounts)
}

pub async fn mounts(c: &mut Client, key: &str) -> Result<Vec<Mount>, tonic::Status> {
    c.mounts(MountsRequest {
        snapshotter: "lcfs".into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner().mounts)
}

pub async fn commit(c: &mut Client, name: &str, key: &str) -> Result<(), tonic::Status> {
    commit_with(c, name, key, HashMap::new()).await
}

pub async fn commit_with(
    c: &mut Client,
    name: &str,
    key: &str,
    labels: HashMap<String, String>,
) -> Result<(), tonic::Status> {
    c.commit(CommitSnapshotRequest {
        snapshotter: "lcfs".into(),
        name: name.into(),
        key: key.into(),
        labels,
        parent: String::new(),
    })
    .await
    .map(|_| ())
}

pub async fn remove(c: &mut Client, key: &str) -> Result<(), tonic::Status> {
    c.remove(RemoveSnapshotRequest {
        snapshotter: "lcfs".into(),
        key: key.into(),
    })
    .await
    .map(|_| ())
}

pub async fn stat(c: &mut Client, key: &str) -> Result<Info, tonic::Status> {
    c.stat(StatSnapshotRequest {
        snapshotter: "lcfs".into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner().info.expect("info"))
}

pub async fn usage(c: &mut Client, key: &str) -> Result<UsageResponse, tonic::Status> {
    c.usage(UsageRequest {
        snapshotter: "lcfs".into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner())
}

pub async fn update(c: &mut Client, info: Info, paths: &[&str]) -> Result<Info, tonic::Status> {
    c.update(UpdateSnapshotRequest {
        snapshotter: "lcfs".into(),
        info: Some(info),
        update_mask: (!paths.is_empty()).then(|| prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
    })
    .await
    .map(|r| r.into_inner().info.expect("info"))
}

pub async fn list(c: &mut Client, filters: &[&str]) -> Result<Vec<Info>, tonic::Status> {
    let mut stream = c
        .list(ListSnapshotsRequest {
            snapshotter: "lcfs".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut all = Vec::new();
    while let Some(batch) = stream.message().await? {
        all.extend(batch.info);
    }
    Ok(all)
}

pub async fn cleanup(c: &mut Client) -> Result<(), tonic::Status> {
    c.cleanup(lcfs_snapshotter::api::snapshots::CleanupRequest {
        snapshotter: "lcfs".into(),
    })
    .await
    .map(|_| ())
}

/// Asserts a call failed with `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code) {
    match r {
        Ok(v) => panic!("expected {code:?}, got success {v:?}"),
        Err(s) => assert_eq!(s.code(), code, "wrong code for {:?}", s.message()),
    }
}

pub fn kind(i: &Info) -> Kind {
    Kind::try_from(i.kind).expect("known kind")
}

/// The one bind mount a call answered; checks its shape.
#[track_caller]
pub fn bind_source(m: &[Mount], read_only: bool) -> PathBuf {
    assert_eq!(m.len(), 1, "one mount: {m:?}");
    assert_eq!(m[0].r#type, "bind");
    let mode = if read_only { "ro" } else { "rw" };
    assert_eq!(m[0].options, vec!["rbind".to_string(), mode.to_string()]);
    PathBuf::from(&m[0].source)
}

/// The layer name a mount source points at (its last component).
pub fn layer_of(source: &Path) -> String {
    source.file_name().unwrap().to_string_lossy().into_owned()
}
