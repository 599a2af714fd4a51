//! image_tops and image_layers against fakes of containerd's namespaces,
//! images and content services on a unix socket: every namespace is listed
//! when none is named, each image's index, manifest and config are read in
//! its namespace, the top chain id finds the newest committed lcfs snapshot
//! of that name, and images that cannot be resolved (this platform not
//! pulled, a blob over the bound, garbage) are left out without failing the
//! rest; an unreachable containerd is an error. remove_image asks for a
//! synchronous Delete in the image's namespace and tells a removed image
//! from one containerd does not have.

mod common;

use common::*;
use lcfs_snapshotter::api::content::content_server::{Content, ContentServer};
use lcfs_snapshotter::api::content::*;
use lcfs_snapshotter::api::images::images_server::{Images, ImagesServer};
use lcfs_snapshotter::api::images::{
    CreateImageRequest, CreateImageResponse, DeleteImageRequest, GetImageRequest, GetImageResponse,
    Image, ListImagesRequest, ListImagesResponse, UpdateImageRequest, UpdateImageResponse,
};
use lcfs_snapshotter::api::namespaces::namespaces_server::{Namespaces, NamespacesServer};
use lcfs_snapshotter::api::namespaces::{
    CreateNamespaceRequest, CreateNamespaceResponse, DeleteNamespaceRequest, GetNamespaceRequest,
    GetNamespaceResponse, ListNamespacesRequest, ListNamespacesResponse, Namespace,
    UpdateNamespaceRequest, UpdateNamespaceResponse,
};
use lcfs_snapshotter::api::types::Descriptor;
use lcfs_snapshotter::{image_layers, image_tops, remove_image, ImageTop, Kind};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// Blobs by (namespace, digest).
type Blobs = HashMap<(String, String), Vec<u8>>;

/// A Delete asked of the fake: (namespace, name, sync).
type Deletion = (String, String, bool);

/// Blobs by (namespace, digest), images by namespace, the Deletes asked.
#[derive(Clone, Default)]
struct FakeContainerd {
    blobs: Arc<Mutex<Blobs>>,
    images: Arc<Mutex<BTreeMap<String, Vec<Image>>>>,
    deletions: Arc<Mutex<Vec<Deletion>>>,
}

fn namespace_of<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get("containerd-namespace")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

impl FakeContainerd {
    fn add_blob(&self, namespace: &str, blob: Vec<u8>) -> String {
        let digest = sha256(&blob);
        self.blobs
            .lock()
            .unwrap()
            .insert((namespace.into(), digest.clone()), blob);
        digest
    }

    fn add_image(&self, namespace: &str, name: &str, media_type: &str, digest: &str) {
        self.images
            .lock()
            .unwrap()
            .entry(namespace.into())
            .or_default()
            .push(Image {
                name: name.into(),
                target: Some(Descriptor {
                    media_type: media_type.into(),
                    digest: digest.into(),
                    size: 1,
                    annotations: HashMap::new(),
                }),
                created_at: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                }),
                ..Image::default()
            });
    }
}

#[tonic::async_trait]
impl Namespaces for FakeContainerd {
    async fn get(
        &self,
        _: Request<GetNamespaceRequest>,
    ) -> Result<Response<GetNamespaceResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list(
        &self,
        _: Request<ListNamespacesRequest>,
    ) -> Result<Response<ListNamespacesResponse>, Status> {
        let namespaces = self
            .images
            .lock()
            .unwrap()
            .keys()
            .map(|name| Namespace {
                name: name.clone(),
                labels: HashMap::new(),
            })
            .collect();
        Ok(Response::new(ListNamespacesResponse { namespaces }))
    }
    async fn create(
        &self,
        _: Request<CreateNamespaceRequest>,
    ) -> Result<Response<CreateNamespaceResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn update(
        &self,
        _: Request<UpdateNamespaceRequest>,
    ) -> Result<Response<UpdateNamespaceResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn delete(&self, _: Request<DeleteNamespaceRequest>) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

#[tonic::async_trait]
impl Images for FakeContainerd {
    async fn get(&self, _: Request<GetImageRequest>) -> Result<Response<GetImageResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let namespace = namespace_of(&request);
        if namespace.is_empty() {
            return Err(Status::failed_precondition("namespace is required"));
        }
        let images = self
            .images
            .lock()
            .unwrap()
            .get(&namespace)
            .cloned()
            .unwrap_or_default();
        Ok(Response::new(ListImagesResponse { images }))
    }
    async fn create(
        &self,
        _: Request<CreateImageRequest>,
    ) -> Result<Response<CreateImageResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn update(
        &self,
        _: Request<UpdateImageRequest>,
    ) -> Result<Response<UpdateImageResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    /// As containerd: NotFound for a name the namespace does not have.
    async fn delete(&self, request: Request<DeleteImageRequest>) -> Result<Response<()>, Status> {
        let namespace = namespace_of(&request);
        if namespace.is_empty() {
            return Err(Status::failed_precondition("namespace is required"));
        }
        let r = request.into_inner();
        self.deletions
            .lock()
            .unwrap()
            .push((namespace.clone(), r.name.clone(), r.sync));
        let mut images = self.images.lock().unwrap();
        let list = images.get_mut(&namespace);
        match list.and_then(|l| l.iter().position(|i| i.name == r.name).map(|at| (l, at))) {
            Some((list, at)) => {
                list.remove(at);
                Ok(Response::new(()))
            }
            None => Err(Status::not_found(format!("image {:?}: not found", r.name))),
        }
    }
}

#[tonic::async_trait]
impl Content for FakeContainerd {
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
    /// As containerd: `size` bounds what is sent; messages of 1 MiB.
    async fn read(
        &self,
        request: Request<ReadContentRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let namespace = namespace_of(&request);
        let r = request.into_inner();
        let blob = self
            .blobs
            .lock()
            .unwrap()
            .get(&(namespace, r.digest.clone()))
            .cloned()
            .ok_or_else(|| Status::not_found(format!("content digest {}: not found", r.digest)))?;
        let end = if r.size > 0 {
            blob.len().min(r.size as usize)
        } else {
            blob.len()
        };
        let messages: Vec<Result<ReadContentResponse, Status>> = blob[..end]
            .chunks(1 << 20)
            .enumerate()
            .map(|(i, data)| {
                Ok(ReadContentResponse {
                    offset: (i << 20) as i64,
                    data: data.to_vec(),
                })
            })
            .collect();
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
    async fn write(
        &self,
        _: Request<tonic::Streaming<WriteContentRequest>>,
    ) -> Result<Response<Self::WriteStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn abort(&self, _: Request<AbortRequest>) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

fn serve_fake(fake: FakeContainerd, socket: &Path) {
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(ContentServer::new(fake.clone()))
            .add_service(ImagesServer::new(fake.clone()))
            .add_service(NamespacesServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
}

fn json(value: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&value).unwrap()
}

fn config(diff_ids: &[&str]) -> Vec<u8> {
    json(serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
}

fn manifest(media_type: &str, config: &str) -> Vec<u8> {
    json(serde_json::json!({
        "schemaVersion": 2, "mediaType": media_type,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config, "size": 1 },
        "layers": [],
    }))
}

fn index(entries: &[(&str, &str)]) -> Vec<u8> {
    let manifests: Vec<serde_json::Value> = entries
        .iter()
        .map(|(digest, arch)| {
            serde_json::json!({ "mediaType": OCI_MANIFEST, "digest": digest, "size": 1,
                                "platform": { "os": "linux", "architecture": arch } })
        })
        .collect();
    json(serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests }))
}

/// This machine's architecture as OCI names it (what image_tops picks).
fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

// sha256 of "a" and "b", and the chain id of both (see images.rs's test).
const D1: &str = "sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb";
const D2: &str = "sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d";
const C2: &str = "sha256:51c0c8ace48498d6f5fee6b0592cc06f2da0f3cbe09c5a34a97dce85c3889676";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_resolve_to_the_layers_of_their_top_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, engine) = mem_engine();
    let served = serve_mem(dir.path(), engine);
    let table = served.server.as_ref().unwrap().table().clone();
    let socket = dir.path().join("containerd.sock");
    let fake = FakeContainerd::default();

    // default/busybox:1: index -> this platform's manifest -> config (a, b).
    let cfg = fake.add_blob("default", config(&[D1, D2]));
    let man = fake.add_blob("default", manifest(OCI_MANIFEST, &cfg));
    let idx = fake.add_blob(
        "default",
        index(&[("sha256:0000", "sparc"), (&man, arch())]),
    );
    fake.add_image("default", "docker.io/library/busybox:1", OCI_INDEX, &idx);
    // default/partial:1: this platform's manifest was never pulled.
    let idx2 = fake.add_blob("default", index(&[(&sha256(b"absent"), arch())]));
    fake.add_image("default", "docker.io/library/partial:1", OCI_INDEX, &idx2);
    // default/huge:1: a target over the 4 MiB bound.
    let huge = fake.add_blob("default", vec![b' '; (4 << 20) + 1]);
    fake.add_image("default", "huge:1", DOCKER_MANIFEST, &huge);
    // default/garbage:1: not JSON.
    let garbage = fake.add_blob("default", b"\x00\x01".to_vec());
    fake.add_image("default", "garbage:1", OCI_MANIFEST, &garbage);
    // other/one-layer:1: a Docker manifest, one layer (chain id = diff id),
    // whose blobs live in namespace "other" only.
    let cfg1 = fake.add_blob("other", config(&[D1]));
    let man1 = fake.add_blob("other", manifest(DOCKER_MANIFEST, &cfg1));
    fake.add_image("other", "one-layer:1", DOCKER_MANIFEST, &man1);
    // other/unpacked-elsewhere:1: resolves, but no lcfs snapshot holds it.
    let cfg3 = fake.add_blob("other", config(&[D2]));
    let man3 = fake.add_blob("other", manifest(OCI_MANIFEST, &cfg3));
    fake.add_image("other", "unpacked-elsewhere:1", OCI_MANIFEST, &man3);
    serve_fake(fake, &socket);

    // The snapshots containerd's unpacker would have committed: C2 twice in
    // "default" (a re-pull; the newer wins), D1 in "other" on top of a
    // parent, and a D2 in "default" only (not "other").
    let commit = |name: String, parent: &str| {
        let key = format!("{name}-extract");
        table
            .create(Kind::Active, &key, parent, BTreeMap::new())
            .unwrap();
        table.commit(&name, &key, BTreeMap::new()).unwrap();
    };
    commit(format!("default/3/{C2}"), "");
    commit(format!("default/12/{C2}"), "");
    commit("other/1/base".to_string(), "");
    commit(format!("other/2/{D1}"), "other/1/base");
    commit(format!("default/4/{D2}"), "");
    // Layers are named by a counter in a new table (table.rs): the second
    // snapshot made is the newer C2, the fourth the D1 of "other".
    let (newest, one) = ("containerd-2".to_string(), "containerd-4".to_string());
    assert_eq!(
        table.committed_layer_for("default", C2),
        Some(newest.clone())
    );

    let tops = image_tops(&socket, &[]).await.unwrap();
    let names: Vec<(&str, &str, &str)> = tops
        .iter()
        .map(|t| (t.namespace.as_str(), t.name.as_str(), t.chain_id.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("default", "docker.io/library/busybox:1", C2),
            ("other", "one-layer:1", D1),
            ("other", "unpacked-elsewhere:1", D2),
        ]
    );
    assert_eq!(
        tops[0],
        ImageTop {
            namespace: "default".into(),
            name: "docker.io/library/busybox:1".into(),
            target_digest: idx.clone(),
            chain_id: C2.into(),
            created: Some(1_700_000_000),
        }
    );

    let layers = image_layers(table.clone(), &socket, &[]).await.unwrap();
    let found: Vec<(String, String)> = layers
        .iter()
        .map(|l| (l.image.name.clone(), l.layer.clone()))
        .collect();
    assert_eq!(
        found,
        vec![
            ("docker.io/library/busybox:1".to_string(), newest.clone()),
            ("one-layer:1".to_string(), one),
        ]
    );

    // One namespace named: only its images.
    let only = image_layers(table.clone(), &socket, &["default".to_string()])
        .await
        .unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].layer, newest);
    // A namespace containerd does not have: nothing, no error.
    assert!(image_tops(&socket, &["nobody".to_string()])
        .await
        .unwrap()
        .is_empty());
    // No containerd: an error.
    assert!(image_tops(&dir.path().join("none.sock"), &[])
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_removed_synchronously_in_their_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("containerd.sock");
    let fake = FakeContainerd::default();
    for namespace in ["default", "other"] {
        let cfg = fake.add_blob(namespace, config(&[D1]));
        let man = fake.add_blob(namespace, manifest(OCI_MANIFEST, &cfg));
        fake.add_image(namespace, "busybox:1", OCI_MANIFEST, &man);
    }
    serve_fake(fake.clone(), &socket);

    assert!(remove_image(&socket, "default", "busybox:1").await.unwrap());
    // Gone now; and never in "third".
    assert!(!remove_image(&socket, "default", "busybox:1").await.unwrap());
    assert!(!remove_image(&socket, "third", "busybox:1").await.unwrap());
    // Only the namespace asked for lost it.
    let left = image_tops(&socket, &[]).await.unwrap();
    let left: Vec<(&str, &str)> = left
        .iter()
        .map(|t| (t.namespace.as_str(), t.name.as_str()))
        .collect();
    assert_eq!(left, vec![("other", "busybox:1")]);
    let asked = |namespace: &str| (namespace.to_string(), "busybox:1".to_string(), true);
    assert_eq!(
        *fake.deletions.lock().unwrap(),
        vec![asked("default"), asked("default"), asked("third")]
    );
    // Refused before asking: no namespace, no name; no containerd: an error.
    assert!(remove_image(&socket, "", "busybox:1").await.is_err());
    assert!(remove_image(&socket, "default", "").await.is_err());
    assert_eq!(fake.deletions.lock().unwrap().len(), 3);
    assert!(remove_image(&dir.path().join("none.sock"), "default", "x")
        .await
        .is_err());
}
