//! containerd's diff service over the snapshotter's socket: Apply reads the
//! layer blob from a content service (a fake of containerd's, on its own
//! socket), unpacks plain, gzip and zstd tars into the snapshot's engine
//! layer and answers the uncompressed stream's digest; a blob that is not
//! what its descriptor says, a hostile tar or a missing blob fail with the
//! right code and the snapshot can no longer be committed; mounts and media
//! types that are not ours answer Unimplemented (containerd then uses its
//! walking differ). Diff writes the layer tar between two lcfs snapshots
//! (a clone against its parent, everything, or nothing) into the content
//! store under a lease of its own, in the upper snapshot's namespace.

mod common;

use common::*;
use lcfs_engine::{Engine, FileKind, ROOT_INODE};
use lcfs_snapshotter::api::content::content_server::{Content, ContentServer};
use lcfs_snapshotter::api::content::*;
use lcfs_snapshotter::api::diff::diff_client::DiffClient;
use lcfs_snapshotter::api::diff::{ApplyRequest, DiffRequest};
use lcfs_snapshotter::api::leases::leases_server::{Leases, LeasesServer};
use lcfs_snapshotter::api::leases::{
    AddResourceRequest, CreateRequest, CreateResponse, DeleteRequest, DeleteResourceRequest, Lease,
    ListRequest, ListResourcesRequest, ListResourcesResponse, ListResponse,
};
use lcfs_snapshotter::api::types::{Descriptor, Mount};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

const OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const NAMESPACE: &str = "test-ns";

// --- a fake of containerd's content service --------------------------------

/// Blobs by (namespace, digest).
type Blobs = HashMap<(String, String), Vec<u8>>;

/// Blobs by (namespace, digest); Read streams them in small messages.
#[derive(Clone, Default)]
struct FakeContent {
    blobs: Arc<Mutex<Blobs>>,
    reads: Arc<Mutex<u32>>,
    writes: Arc<Mutex<Vec<Written>>>,
    leases: Arc<Mutex<Vec<Created>>>,
}

/// A lease created: (namespace, id, labels).
type Created = (String, String, HashMap<String, String>);

/// A gRPC header of a request to the fake ("" when absent).
fn header<T>(request: &Request<T>, name: &str) -> String {
    request
        .metadata()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// A committed content write.
#[derive(Clone, Debug)]
struct Written {
    reference: String,
    lease: String,
    digest: String,
    labels: HashMap<String, String>,
}

#[tonic::async_trait]
impl Leases for FakeContent {
    async fn create(
        &self,
        request: Request<CreateRequest>,
    ) -> Result<Response<CreateResponse>, Status> {
        let namespace = header(&request, "containerd-namespace");
        let r = request.into_inner();
        self.leases
            .lock()
            .unwrap()
            .push((namespace, r.id.clone(), r.labels.clone()));
        Ok(Response::new(CreateResponse {
            lease: Some(Lease {
                id: r.id,
                created_at: None,
                labels: r.labels,
            }),
        }))
    }
    async fn delete(&self, _: Request<DeleteRequest>) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn add_resource(&self, _: Request<AddResourceRequest>) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn delete_resource(
        &self,
        _: Request<DeleteResourceRequest>,
    ) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_resources(
        &self,
        _: Request<ListResourcesRequest>,
    ) -> Result<Response<ListResourcesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Content for FakeContent {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn update(&self, _: Request<UpdateRequest>) -> Result<Response<UpdateResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type ListStream = Stream<ListContentResponse>;
    async fn list(
        &self,
        _: Request<ListContentRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn delete(&self, _: Request<DeleteContentRequest>) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type ReadStream = Stream<ReadContentResponse>;
    async fn read(
        &self,
        request: Request<ReadContentRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let namespace = header(&request, "containerd-namespace");
        let r = request.into_inner();
        *self.reads.lock().unwrap() += 1;
        let blob = self
            .blobs
            .lock()
            .unwrap()
            .get(&(namespace.clone(), r.digest.clone()))
            .cloned()
            .ok_or_else(|| {
                Status::not_found(format!(
                    "content digest {}: not found in {namespace:?}",
                    r.digest
                ))
            })?;
        // Uneven small messages, so readers meet every boundary.
        let mut messages = Vec::new();
        let mut offset = 0usize;
        let mut step = 1usize;
        while offset < blob.len() {
            let n = step.min(blob.len() - offset);
            messages.push(Ok(ReadContentResponse {
                offset: offset as i64,
                data: blob[offset..offset + n].to_vec(),
            }));
            offset += n;
            step = (step * 7 + 13) % 70_000 + 1;
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(messages))))
    }
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_statuses(
        &self,
        _: Request<ListStatusesRequest>,
    ) -> Result<Response<ListStatusesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type WriteStream = Stream<WriteContentResponse>;
    /// containerd's protocol, strictly: the first message names the ref,
    /// each message gets an answer, writes come at the current offset, a
    /// commit names the digest and size of what was written.
    async fn write(
        &self,
        request: Request<tonic::Streaming<WriteContentRequest>>,
    ) -> Result<Response<Self::WriteStream>, Status> {
        let namespace = header(&request, "containerd-namespace");
        let lease = header(&request, "containerd-lease");
        let mut stream = request.into_inner();
        let blobs = self.blobs.clone();
        let writes = self.writes.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut data = Vec::new();
            let mut reference = None;
            while let Ok(Some(m)) = stream.message().await {
                let answer = (|| {
                    if reference.is_none() {
                        if m.r#ref.is_empty() {
                            return Err(Status::invalid_argument("first message has no ref"));
                        }
                        reference = Some(m.r#ref.clone());
                    }
                    let action = WriteAction::try_from(m.action).unwrap();
                    if action == WriteAction::Write {
                        if m.offset != data.len() as i64 {
                            return Err(Status::out_of_range("write not at the end"));
                        }
                        data.extend_from_slice(&m.data);
                    }
                    let mut r = WriteContentResponse {
                        action: m.action,
                        offset: data.len() as i64,
                        ..Default::default()
                    };
                    if action == WriteAction::Commit {
                        if m.total != data.len() as i64 || m.expected != sha256(&data) {
                            return Err(Status::failed_precondition("unexpected commit digest"));
                        }
                        r.digest = m.expected.clone();
                        blobs
                            .lock()
                            .unwrap()
                            .insert((namespace.clone(), m.expected.clone()), data.clone());
                        writes.lock().unwrap().push(Written {
                            reference: reference.clone().unwrap(),
                            lease: lease.clone(),
                            digest: m.expected.clone(),
                            labels: m.labels.clone(),
                        });
                    }
                    Ok(r)
                })();
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
    async fn abort(&self, _: Request<AbortRequest>) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

impl FakeContent {
    /// Stores `blob` under its own digest; returns the digest.
    fn add(&self, blob: &[u8]) -> String {
        let digest = sha256(blob);
        self.add_as(&digest, blob);
        digest
    }

    fn add_as(&self, digest: &str, blob: &[u8]) {
        self.blobs
            .lock()
            .unwrap()
            .insert((NAMESPACE.into(), digest.into()), blob.to_vec());
    }
}

fn serve_content(socket: &Path, fake: FakeContent) {
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(ContentServer::new(fake.clone()))
            .add_service(LeasesServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
}

// --- the setup: snapshotter + differ on a socket, fake containerd ----------

struct Setup {
    _dir: tempfile::TempDir,
    engine: Arc<Engine>,
    _served: Served,
    snapshots: Client,
    diff: DiffClient<Channel>,
    content: FakeContent,
    mountpoint: PathBuf,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, engine) = mem_engine();
    let content = FakeContent::default();
    let containerd = dir.path().join("containerd.sock");
    serve_content(&containerd, content.clone());
    let socket = dir.path().join("run").join("snapshotter.sock");
    let mountpoint = dir.path().join("mnt");
    let server = lcfs_snapshotter::serve_with(
        engine.clone(),
        &mountpoint,
        Arc::new(lcfs_fsfront::NoMount),
        &socket,
        &lcfs_snapshotter::ServeOptions {
            containerd_address: containerd,
        },
    )
    .unwrap();
    let served = Served {
        server: Some(server),
        socket: socket.clone(),
        mountpoint: mountpoint.clone(),
    };
    // One connection for both services, as containerd shares one per socket.
    let shared = channel(&socket).await;
    let snapshots =
        lcfs_snapshotter::api::snapshots::snapshots_client::SnapshotsClient::new(shared.clone());
    let diff = DiffClient::new(shared);
    Setup {
        _dir: dir,
        engine,
        _served: served,
        snapshots,
        diff,
        content,
        mountpoint,
    }
}

fn sha256(bytes: &[u8]) -> String {
    let digest: [u8; 32] = Sha256::digest(bytes).into();
    format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

async fn apply(
    s: &mut Setup,
    mounts: Vec<Mount>,
    media_type: &str,
    digest: &str,
    size: usize,
) -> Result<Descriptor, Status> {
    let mut request = Request::new(ApplyRequest {
        diff: Some(Descriptor {
            media_type: media_type.into(),
            digest: digest.into(),
            size: size as i64,
            annotations: HashMap::new(),
        }),
        mounts,
        payloads: HashMap::new(),
        sync_fs: false,
    });
    request
        .metadata_mut()
        .insert("containerd-namespace", NAMESPACE.parse().unwrap());
    s.diff
        .apply(request)
        .await
        .map(|r| r.into_inner().applied.expect("applied descriptor"))
}

/// Stores `blob` and applies it to `mounts`.
async fn apply_blob(
    s: &mut Setup,
    mounts: Vec<Mount>,
    media_type: &str,
    blob: &[u8],
) -> Result<Descriptor, Status> {
    let digest = s.content.add(blob);
    apply(s, mounts, media_type, &digest, blob.len()).await
}

// --- tars -------------------------------------------------------------------

enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    Link(&'a str, &'a str),
}

/// A tar of `entries`, with names written raw (no checks: hostile ones too).
fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        let (name, data): (&str, &[u8]) = match e {
            Entry::Dir(n) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                (n, &[])
            }
            Entry::File(n, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                (n, d)
            }
            Entry::Symlink(n, t) | Entry::Link(n, t) => {
                h.set_entry_type(if matches!(e, Entry::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.set_mode(0o777);
                h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
                (n, &[])
            }
        };
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    g.write_all(bytes).unwrap();
    g.finish().unwrap()
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(bytes, 3).unwrap()
}

/// Follows `path` from the layer root without following symlinks.
fn lookup(e: &Engine, layer: &str, path: &str) -> Option<lcfs_engine::Attr> {
    let id = e.layer_id(layer).unwrap();
    let mut at = e.getattr(id, ROOT_INODE).unwrap();
    for c in path.split('/').filter(|c| !c.is_empty()) {
        at = e.lookup(id, at.inode, c.as_bytes()).ok()?;
    }
    Some(at)
}

fn read_file(e: &Engine, layer: &str, path: &str) -> Vec<u8> {
    let a = lookup(e, layer, path).unwrap_or_else(|| panic!("{path} missing"));
    let id = e.layer_id(layer).unwrap();
    e.read(id, a.inode, 0, a.size as usize).unwrap()
}

fn snapshot_mounts(m: Vec<Mount>) -> (Vec<Mount>, String) {
    let layer = layer_of(&bind_source(&m, false));
    (m, layer)
}

// --- the tests --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_gzip_and_zstd_layers_are_applied_with_their_diff_digests() {
    let mut s = setup().await;
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let base = tar_of(&[
        Entry::Dir("etc"),
        Entry::File("etc/hostname", b"lcfs\n"),
        Entry::File("etc/group", b"root:x:0:\n"),
        Entry::File("bin/big", &big),
        Entry::Link("bin/big-link", "bin/big"),
        Entry::Symlink("bin/sh", "big"),
    ]);
    let (m, base_layer) = snapshot_mounts(
        prepare(&mut s.snapshots, "ns/1/extract base", "")
            .await
            .unwrap(),
    );
    let applied = apply_blob(&mut s, m, OCI_TAR, &base).await.unwrap();
    assert_eq!(applied.media_type, OCI_TAR);
    assert_eq!(applied.digest, sha256(&base));
    assert_eq!(applied.size, base.len() as i64);
    assert_eq!(read_file(&s.engine, &base_layer, "etc/hostname"), b"lcfs\n");
    assert_eq!(read_file(&s.engine, &base_layer, "bin/big"), big);
    let (a, b) = (
        lookup(&s.engine, &base_layer, "bin/big").unwrap(),
        lookup(&s.engine, &base_layer, "bin/big-link").unwrap(),
    );
    assert_eq!((a.inode, a.nlink), (b.inode, 2), "a hard link");
    let sh = lookup(&s.engine, &base_layer, "bin/sh").unwrap();
    assert_eq!(sh.kind, FileKind::Symlink);
    commit(&mut s.snapshots, "base", "ns/1/extract base")
        .await
        .unwrap();

    // A gzip Docker layer on top: a whiteout, a changed file.
    let second = tar_of(&[
        Entry::File("etc/.wh.group", b""),
        Entry::File("etc/hostname", b"changed\n"),
    ]);
    let (m, second_layer) = snapshot_mounts(
        prepare(&mut s.snapshots, "ns/2/extract second", "base")
            .await
            .unwrap(),
    );
    let applied = apply_blob(&mut s, m, DOCKER_GZIP, &gzip(&second))
        .await
        .unwrap();
    assert_eq!(
        (applied.digest.as_str(), applied.size),
        (sha256(&second).as_str(), second.len() as i64),
        "the digest of the uncompressed tar"
    );
    assert!(lookup(&s.engine, &second_layer, "etc/group").is_none());
    assert_eq!(
        read_file(&s.engine, &second_layer, "etc/hostname"),
        b"changed\n"
    );
    assert_eq!(read_file(&s.engine, &second_layer, "bin/big"), big);
    assert!(
        lookup(&s.engine, &base_layer, "etc/group").is_some(),
        "the parent is untouched"
    );
    commit(&mut s.snapshots, "second", "ns/2/extract second")
        .await
        .unwrap();
    // Each layer keeps its DiffID (the uncompressed tar's digest) through
    // the Commit that rewrote its metadata.
    for (layer, tar) in [(&base_layer, &base), (&second_layer, &second)] {
        let meta = s.engine.layer_metadata(layer).unwrap();
        assert_eq!(
            meta.get(lcfs_dockerplugin::DIFF_ID_KEY),
            Some(&sha256(tar)),
            "layer {layer}"
        );
    }

    // zstd, and a gzip stream under a media type that says plain Docker tar
    // (containerd detects compression by its first bytes for those).
    let third = tar_of(&[Entry::File("zstd.txt", b"from zstd")]);
    let (m, third_layer) = snapshot_mounts(
        prepare(&mut s.snapshots, "ns/3/extract third", "second")
            .await
            .unwrap(),
    );
    let applied = apply_blob(&mut s, m, OCI_ZSTD, &zstd(&third))
        .await
        .unwrap();
    assert_eq!(applied.digest, sha256(&third));
    assert_eq!(read_file(&s.engine, &third_layer, "zstd.txt"), b"from zstd");
    commit(&mut s.snapshots, "third", "ns/3/extract third")
        .await
        .unwrap();
    let fourth = tar_of(&[Entry::File("detected.txt", b"gzip, said tar")]);
    let (m, fourth_layer) = snapshot_mounts(
        prepare(&mut s.snapshots, "ns/4/extract fourth", "third")
            .await
            .unwrap(),
    );
    let applied = apply_blob(
        &mut s,
        m,
        "application/vnd.docker.image.rootfs.diff.tar",
        &gzip(&fourth),
    )
    .await
    .unwrap();
    assert_eq!(applied.digest, sha256(&fourth));
    assert_eq!(
        read_file(&s.engine, &fourth_layer, "detected.txt"),
        b"gzip, said tar"
    );
    assert_eq!(
        read_file(&s.engine, &fourth_layer, "zstd.txt"),
        b"from zstd"
    );
    commit(&mut s.snapshots, "fourth", "ns/4/extract fourth")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_unlike_its_descriptor_fails_and_its_snapshot_is_never_committed() {
    let mut s = setup().await;
    let layer = tar_of(&[Entry::File("a.txt", b"aaaa")]);
    let compressed = gzip(&layer);

    // The content store holds other bytes under the digest.
    let wrong = sha256(b"something else");
    s.content.add_as(&wrong, &compressed);
    let m = prepare(&mut s.snapshots, "wrong-digest", "").await.unwrap();
    let r = apply(&mut s, m, DOCKER_GZIP, &wrong, compressed.len()).await;
    assert_code(r.clone(), Code::FailedPrecondition);
    assert!(
        r.unwrap_err().message().contains("digest"),
        "the message says what is wrong"
    );
    assert_code(
        commit(&mut s.snapshots, "wrong-digest-c", "wrong-digest").await,
        Code::FailedPrecondition,
    );
    // containerd removes the snapshot after a failed apply.
    remove(&mut s.snapshots, "wrong-digest").await.unwrap();

    // The right digest, the wrong size (longer and shorter).
    for (key, size) in [
        ("short", compressed.len() + 1),
        ("long", compressed.len() - 1),
    ] {
        let digest = s.content.add(&compressed);
        let m = prepare(&mut s.snapshots, key, "").await.unwrap();
        assert_code(
            apply(&mut s, m.clone(), DOCKER_GZIP, &digest, size).await,
            Code::FailedPrecondition,
        );
        // A second apply on the failed snapshot is refused too.
        assert_code(
            apply(&mut s, m, DOCKER_GZIP, &digest, compressed.len()).await,
            Code::FailedPrecondition,
        );
        remove(&mut s.snapshots, key).await.unwrap();
    }

    // Not in the content store: containerd's NotFound is passed on, and
    // the snapshot (nothing written) stays usable.
    let m = prepare(&mut s.snapshots, "missing", "").await.unwrap();
    assert_code(
        apply(&mut s, m.clone(), OCI_TAR, &sha256(b"absent"), 6).await,
        Code::NotFound,
    );
    apply_blob(&mut s, m, OCI_TAR, &layer).await.unwrap();
    commit(&mut s.snapshots, "missing-c", "missing")
        .await
        .unwrap();

    // Corrupt gzip and a non-tar: InvalidArgument.
    let mut corrupt = compressed.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    corrupt.truncate(corrupt.len() - 4);
    for (key, blob) in [("corrupt", corrupt), ("not-tar", vec![0x42; 1536])] {
        let m = prepare(&mut s.snapshots, key, "").await.unwrap();
        assert_code(
            apply_blob(&mut s, m, DOCKER_GZIP, &blob).await,
            Code::InvalidArgument,
        );
        remove(&mut s.snapshots, key).await.unwrap();
    }
    cleanup(&mut s.snapshots).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tars_fail_or_stay_inside_the_layer() {
    let mut s = setup().await;
    // `..` above the root, and a hard link to a path above it: refused.
    for (key, tar) in [
        ("dotdot", tar_of(&[Entry::File("a/../../escape", b"x")])),
        (
            "link-out",
            tar_of(&[Entry::Link("passwd", "../../etc/passwd")]),
        ),
    ] {
        let m = prepare(&mut s.snapshots, key, "").await.unwrap();
        let r = apply_blob(&mut s, m, OCI_TAR, &tar).await;
        assert_code(r, Code::InvalidArgument);
        assert_code(
            commit(&mut s.snapshots, &format!("{key}-c"), key).await,
            Code::FailedPrecondition,
        );
        remove(&mut s.snapshots, key).await.unwrap();
    }
    // Absolute paths and paths through a symlink pointing out of the layer
    // are taken inside it, as containerd's walking differ and Docker do.
    let tar = tar_of(&[
        Entry::File("/abs.txt", b"absolute"),
        Entry::Symlink("out", "/tmp/../.."),
        Entry::File("out/through-link.txt", b"re-rooted"),
        Entry::Symlink("up", "../../../"),
        Entry::File("up/etc/shadow-test", b"inside"),
    ]);
    let (m, layer) = snapshot_mounts(prepare(&mut s.snapshots, "contained", "").await.unwrap());
    apply_blob(&mut s, m, OCI_TAR, &tar).await.unwrap();
    assert_eq!(read_file(&s.engine, &layer, "abs.txt"), b"absolute");
    assert_eq!(
        read_file(&s.engine, &layer, "through-link.txt"),
        b"re-rooted"
    );
    assert_eq!(read_file(&s.engine, &layer, "etc/shadow-test"), b"inside");
    assert!(
        !Path::new("/etc/shadow-test").exists() && !Path::new("/through-link.txt").exists(),
        "nothing is written outside the layer"
    );
    commit(&mut s.snapshots, "contained-c", "contained")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_and_media_types_not_ours_are_left_to_the_walking_differ() {
    let mut s = setup().await;
    let tar = tar_of(&[Entry::File("a", b"a")]);
    let digest = s.content.add(&tar);
    let m = prepare(&mut s.snapshots, "ours", "").await.unwrap();
    let committed = prepare(&mut s.snapshots, "to-commit", "").await.unwrap();
    commit(&mut s.snapshots, "committed", "to-commit")
        .await
        .unwrap();
    let view = view(&mut s.snapshots, "view", "committed").await.unwrap();
    let bind = |source: &Path, options: &[&str]| Mount {
        r#type: "bind".into(),
        source: source.to_string_lossy().into_owned(),
        target: String::new(),
        options: options.iter().map(|o| o.to_string()).collect(),
    };
    let foreign_mounts: Vec<(&str, Vec<Mount>)> = vec![
        (
            "overlay",
            vec![Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec!["lowerdir=/a:/b".into()],
            }],
        ),
        (
            "another snapshotter's bind mount",
            vec![bind(
                Path::new("/var/lib/containerd/snapshots/1/fs"),
                &["rbind", "rw"],
            )],
        ),
        ("a view (read-only)", view),
        ("a committed snapshot's directory", committed),
        (
            "a directory of our mount that is no snapshot",
            vec![bind(&s.mountpoint.join("docker-layer"), &["rbind", "rw"])],
        ),
        (
            "below a snapshot's directory",
            vec![bind(
                &PathBuf::from(&m[0].source).join("etc"),
                &["rbind", "rw"],
            )],
        ),
        ("two mounts", vec![m[0].clone(), m[0].clone()]),
        ("no mount", vec![]),
    ];
    for (what, mounts) in foreign_mounts {
        let r = apply(&mut s, mounts, OCI_TAR, &digest, tar.len()).await;
        match r {
            Err(status) => assert_eq!(status.code(), Code::Unimplemented, "{what}: {status:?}"),
            Ok(d) => panic!("{what}: applied {d:?}"),
        }
    }
    for media_type in [
        "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
        "application/vnd.oci.image.layer.v1.tar+bzip2",
        "application/vnd.in-toto+json",
    ] {
        assert_code(
            apply(&mut s, m.clone(), media_type, &digest, tar.len()).await,
            Code::Unimplemented,
        );
    }
    assert_code(
        apply(
            &mut s,
            m.clone(),
            OCI_TAR,
            &format!("sha512:{}", "a".repeat(128)),
            1,
        )
        .await,
        Code::Unimplemented,
    );
    // Decryption payloads are containerd's stream processors' business.
    let mut payloads = HashMap::new();
    payloads.insert(
        "io.containerd.ocicrypt.decoder.v1.tar".to_string(),
        Default::default(),
    );
    let mut request = Request::new(ApplyRequest {
        diff: Some(Descriptor {
            media_type: OCI_TAR.into(),
            digest: digest.clone(),
            size: tar.len() as i64,
            annotations: HashMap::new(),
        }),
        mounts: m.clone(),
        payloads,
        sync_fs: false,
    });
    request
        .metadata_mut()
        .insert("containerd-namespace", NAMESPACE.parse().unwrap());
    assert_code(s.diff.apply(request).await, Code::Unimplemented);
    assert_eq!(*s.content.reads.lock().unwrap(), 0, "no blob was read");
    // After all that, ours still applies.
    apply(&mut s, m, OCI_TAR, &digest, tar.len()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_containerd_is_unavailable_and_the_snapshot_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, engine) = mem_engine();
    let socket = dir.path().join("run").join("snapshotter.sock");
    let server = lcfs_snapshotter::serve_with(
        engine,
        &dir.path().join("mnt"),
        Arc::new(lcfs_fsfront::NoMount),
        &socket,
        &lcfs_snapshotter::ServeOptions {
            containerd_address: dir.path().join("nobody.sock"),
        },
    )
    .unwrap();
    let mut c = connect(&socket).await;
    let mut diff = DiffClient::new(channel(&socket).await);
    let m = prepare(&mut c, "k", "").await.unwrap();
    let r = diff
        .apply(ApplyRequest {
            diff: Some(Descriptor {
                media_type: OCI_TAR.into(),
                digest: sha256(b"x"),
                size: 1,
                annotations: HashMap::new(),
            }),
            mounts: m,
            payloads: HashMap::new(),
            sync_fs: false,
        })
        .await;
    assert_code(r, Code::Unavailable);
    commit(&mut c, "k-c", "k").await.unwrap();
    server.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_namespace_header_the_snapshot_key_names_the_namespace() {
    let mut s = setup().await;
    let tar = tar_of(&[Entry::File("ns.txt", b"namespaced")]);
    let digest = s.content.add(&tar);
    // containerd's metadata store names snapshots `<namespace>/<id>/<key>`.
    let (m, layer) = snapshot_mounts(
        prepare(&mut s.snapshots, &format!("{NAMESPACE}/7/extract x"), "")
            .await
            .unwrap(),
    );
    let applied = s
        .diff
        .apply(ApplyRequest {
            diff: Some(Descriptor {
                media_type: OCI_TAR.into(),
                digest: digest.clone(),
                size: tar.len() as i64,
                annotations: HashMap::new(),
            }),
            mounts: m,
            payloads: HashMap::new(),
            sync_fs: true,
        })
        .await
        .unwrap()
        .into_inner()
        .applied
        .unwrap();
    assert_eq!(applied.digest, digest);
    assert_eq!(read_file(&s.engine, &layer, "ns.txt"), b"namespaced");
}

// --- Diff: comparing two mounts ---------------------------------------------

async fn compare(
    s: &mut Setup,
    left: Vec<Mount>,
    right: Vec<Mount>,
    media_type: &str,
) -> Result<Descriptor, Status> {
    s.diff
        .diff(DiffRequest {
            left,
            right,
            media_type: media_type.into(),
            r#ref: String::new(),
            labels: HashMap::new(),
            source_date_epoch: None,
        })
        .await
        .map(|r| r.into_inner().diff.expect("diff descriptor"))
}

/// The blob `d` names, as the fake content store holds it.
fn blob(s: &Setup, d: &Descriptor) -> Vec<u8> {
    s.content
        .blobs
        .lock()
        .unwrap()
        .get(&(NAMESPACE.to_string(), d.digest.clone()))
        .cloned()
        .unwrap_or_else(|| panic!("{} not in the content store", d.digest))
}

/// Entry names of a tar, in order, directories with their slash.
fn names(tar_bytes: &[u8]) -> Vec<String> {
    let mut a = tar::Archive::new(tar_bytes);
    a.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            String::from_utf8_lossy(&e.path_bytes()).into_owned()
        })
        .collect()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_of_two_snapshots_is_written_to_the_content_store() {
    let mut s = setup().await;
    // An image layer (applied), a container on it that changes things,
    // committed, and a view of each, as BuildKit and docker commit ask.
    let key = |k: &str| format!("{NAMESPACE}/1/{k}");
    let (m, base_layer) =
        snapshot_mounts(prepare(&mut s.snapshots, &key("base"), "").await.unwrap());
    let base = tar_of(&[
        Entry::Dir("etc"),
        Entry::File("etc/group", b"root:x:0:\n"),
        Entry::File("etc/hostname", b"lcfs\n"),
    ]);
    apply_blob(&mut s, m, OCI_TAR, &base).await.unwrap();
    commit(&mut s.snapshots, &key("base-c"), &key("base"))
        .await
        .unwrap();
    let (_, child_layer) = snapshot_mounts(
        prepare(&mut s.snapshots, &key("child"), &key("base-c"))
            .await
            .unwrap(),
    );
    let e = s.engine.clone();
    let id = e.layer_id(&child_layer).unwrap();
    let etc = lookup(&e, &child_layer, "etc").unwrap().inode;
    e.unlink(id, etc, b"group").unwrap();
    let f = e.create(id, ROOT_INODE, b"written", 0o644, 0, 0).unwrap();
    e.write(id, f.inode, 0, b"by the container\n").unwrap();
    e.mkdir(id, ROOT_INODE, b"newdir", 0o755, 0, 0).unwrap();
    commit(&mut s.snapshots, &key("child-c"), &key("child"))
        .await
        .unwrap();
    let v_base = view(&mut s.snapshots, &key("v-base"), &key("base-c"))
        .await
        .unwrap();
    let v_child = view(&mut s.snapshots, &key("v-child"), &key("child-c"))
        .await
        .unwrap();

    // The child against its parent, gzip (the default media type).
    let d = compare(&mut s, v_base.clone(), v_child.clone(), "")
        .await
        .unwrap();
    assert_eq!(d.media_type, "application/vnd.oci.image.layer.v1.tar+gzip");
    let gz = blob(&s, &d);
    assert_eq!(d.size as usize, gz.len());
    let tar = gunzip(&gz);
    assert_eq!(
        names(&tar),
        ["etc/", "etc/.wh.group", "newdir/", "written"],
        "the changed directory, a whiteout, the new directory and file"
    );
    let written = s.content.writes.lock().unwrap().last().cloned().unwrap();
    assert_eq!(written.digest, d.digest);
    assert_eq!(
        written.labels.get("containerd.io/uncompressed"),
        Some(&sha256(&tar)),
        "the diff id is labelled on the blob"
    );
    // Under a lease of its own, made in the snapshot's namespace, that
    // expires.
    let leases = s.content.leases.lock().unwrap().clone();
    let (ns, id, labels) = leases.last().unwrap();
    assert_eq!(
        (ns.as_str(), id.as_str()),
        (NAMESPACE, written.lease.as_str())
    );
    assert!(labels["containerd.io/gc.expire"].ends_with('Z'));
    assert!(!written.reference.is_empty());

    // Against nothing: everything the lower snapshot shows, plain tar.
    let d = compare(&mut s, vec![], v_base.clone(), OCI_TAR)
        .await
        .unwrap();
    assert_eq!(d.media_type, OCI_TAR);
    assert_eq!(names(&blob(&s, &d)), ["etc/", "etc/group", "etc/hostname"]);

    // An active snapshot nobody wrote to holds its parent's content: empty.
    let fresh = prepare(&mut s.snapshots, &key("fresh"), &key("base-c"))
        .await
        .unwrap();
    let d = compare(&mut s, v_base.clone(), fresh, OCI_TAR)
        .await
        .unwrap();
    assert!(names(&blob(&s, &d)).is_empty());

    // The other way round is no clone of its parent: the walking differ's.
    assert_code(
        compare(&mut s, v_child.clone(), v_base.clone(), OCI_TAR).await,
        Code::Unimplemented,
    );
    // Not ours: an overlay mount, a media type, a source date epoch.
    let overlay = vec![Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options: vec!["lowerdir=/a:/b".into()],
    }];
    assert_code(
        compare(&mut s, v_base.clone(), overlay, OCI_TAR).await,
        Code::Unimplemented,
    );
    assert_code(
        compare(&mut s, v_base.clone(), v_child.clone(), OCI_ZSTD).await,
        Code::Unimplemented,
    );
    assert_code(
        s.diff
            .diff(DiffRequest {
                left: v_base,
                right: v_child,
                media_type: OCI_TAR.into(),
                r#ref: String::new(),
                labels: HashMap::new(),
                source_date_epoch: Some(Default::default()),
            })
            .await,
        Code::Unimplemented,
    );
    assert!(lookup(&s.engine, &base_layer, "etc/group").is_some());
}
