//! containerd's images as lcfs layers, for per-image statistics: each
//! image's top layer is the committed snapshot its unpacker made for the
//! image's last layer.
//!
//! From containerd's API socket: the images of each namespace (images
//! service), then for each image its target blob from the content service:
//! an index (OCI index, Docker manifest list) picks the manifest for this
//! machine's platform, the manifest names the config, the config's
//! `rootfs.diff_ids` give the top chain id. containerd's unpacker commits
//! each layer's snapshot under its chain id, and its metadata store names
//! it in the backend `<namespace>/<n>/<chain id>`, which
//! [`Table::committed_layer_for`] finds.
//!
//! Removal ([`remove_image`], for the image garbage collector): containerd's
//! Images.Delete with `sync`, so that containerd's garbage collection, and
//! with it the snapshotter's Remove of the image's now-unused snapshots,
//! has run when it answers.
//!
//! Enrichment only: an image whose blobs are missing (another platform,
//! a partial pull), unreadable or not what they should be is skipped with
//! a log line; only a containerd that cannot be reached or cannot list its
//! namespaces fails the whole call. Every call has a time limit, every
//! blob a size limit, and the images and namespaces looked at are bounded.

use crate::api::content::content_client::ContentClient;
use crate::api::content::ReadContentRequest;
use crate::api::images::images_client::ImagesClient;
use crate::api::images::{DeleteImageRequest, ListImagesRequest};
use crate::api::namespaces::namespaces_client::NamespacesClient;
use crate::api::namespaces::ListNamespacesRequest;
use crate::diff::{clip, connect, hex, NAMESPACE_HEADER, NAMESPACE_MAX_BYTES};
use crate::error::{Error, Result};
use crate::table::Table;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// Each call to containerd (a list, one blob's read) must answer within
/// this time.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// All the blob reads of one call together; images left when it runs out
/// are skipped (logged).
const TOTAL_TIMEOUT: Duration = Duration::from_secs(60);
/// A removal of an image, which containerd answers after its garbage
/// collection (sync), that is after the snapshotter's Remove of each
/// snapshot no other image uses and its Cleanup: long for a large image.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(120);
/// Indexes, manifests and configs are small; anything larger is skipped.
const BLOB_MAX_BYTES: usize = 4 << 20;
/// Images looked at, over all namespaces.
const IMAGES_MAX: usize = 10_000;
/// Namespaces looked at.
const NAMESPACES_MAX: usize = 256;
/// Image names (references) longer than this are skipped.
const NAME_MAX_BYTES: usize = 1024;
/// Indexes of indexes followed before giving up on an image.
const INDEX_DEPTH_MAX: usize = 4;

const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// One containerd image and the chain id of its top layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageTop {
    pub namespace: String,
    /// containerd's name for it, a reference (`docker.io/library/busybox:1`).
    pub name: String,
    /// The digest of its target (index or manifest).
    pub target_digest: String,
    /// `sha256:...` of all its layers: the name of its top snapshot.
    pub chain_id: String,
    /// When containerd created the image record, unix seconds.
    pub created: Option<i64>,
}

/// An image and the lcfs layer of its top snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageLayer {
    pub image: ImageTop,
    pub layer: String,
}

/// The images of `namespaces` (every namespace when empty) in the
/// containerd at `address`, with the top chain id of each for this
/// machine's platform. Images that cannot be resolved are left out.
pub async fn image_tops(address: &Path, namespaces: &[String]) -> Result<Vec<ImageTop>> {
    let channel = timed("connecting to containerd", connect(address)).await?;
    let namespaces = if namespaces.is_empty() {
        list_namespaces(channel.clone()).await?
    } else {
        namespaces.to_vec()
    };
    let deadline = Instant::now() + TOTAL_TIMEOUT;
    let mut tops = Vec::new();
    let mut looked_at = 0usize;
    for namespace in namespaces.iter().take(NAMESPACES_MAX) {
        if namespace.is_empty() || namespace.len() > NAMESPACE_MAX_BYTES {
            log::warn!("containerd images: namespace {:?} skipped", clip(namespace));
            continue;
        }
        let images = match list_images(channel.clone(), namespace).await {
            Ok(images) => images,
            Err(e) => {
                log::warn!("containerd images in namespace {namespace:?}: {e}");
                continue;
            }
        };
        for image in images {
            if looked_at == IMAGES_MAX {
                log::warn!("containerd images: only the first {IMAGES_MAX} are looked at");
                return Ok(tops);
            }
            looked_at += 1;
            if Instant::now() >= deadline {
                log::warn!(
                    "containerd images: out of time ({} s); the rest are left out",
                    TOTAL_TIMEOUT.as_secs()
                );
                return Ok(tops);
            }
            let Some(target) = image.target else {
                continue;
            };
            if image.name.is_empty() || image.name.len() > NAME_MAX_BYTES {
                log::debug!("containerd image {:?}: name skipped", clip(&image.name));
                continue;
            }
            let read = |digest: String| read_blob(channel.clone(), namespace, digest);
            match top_chain_id(&target.media_type, &target.digest, read).await {
                Ok(Some(chain_id)) => tops.push(ImageTop {
                    namespace: namespace.clone(),
                    name: image.name,
                    target_digest: target.digest,
                    chain_id,
                    created: image.created_at.map(|t| t.seconds),
                }),
                Ok(None) => log::debug!(
                    "containerd image {:?} ({namespace}): blobs for {}/{} not present; skipped",
                    image.name,
                    std::env::consts::OS,
                    oci_architecture()
                ),
                Err(e) => log::warn!(
                    "containerd image {:?} ({namespace}): {e}; skipped",
                    image.name
                ),
            }
        }
    }
    Ok(tops)
}

/// [`image_tops`], each with the layer of its top snapshot in `table`;
/// images whose top is not an lcfs snapshot (another snapshotter, not
/// unpacked) are left out.
pub async fn image_layers(
    table: Arc<Table>,
    address: &Path,
    namespaces: &[String],
) -> Result<Vec<ImageLayer>> {
    let tops = image_tops(address, namespaces).await?;
    // The table's lock may wait for engine calls: not on a runtime thread.
    let layers = tokio::task::spawn_blocking(move || table.committed_layers())
        .await
        .map_err(|e| Error::io("reading the snapshot table", std::io::Error::other(e)))?;
    Ok(tops
        .into_iter()
        .filter_map(|image| {
            let key = (image.namespace.clone(), image.chain_id.clone());
            let layer = layers.get(&key)?.clone();
            Some(ImageLayer { image, layer })
        })
        .collect())
}

/// Asks the containerd at `address` to remove the image `name` of
/// `namespace`, synchronously: containerd answers after its garbage
/// collection, so the snapshots only this image used have gone through
/// the snapshotter's Remove (and Cleanup) by then. Ok(false) when
/// containerd has no such image. Waits up to 120 s for the answer.
pub async fn remove_image(address: &Path, namespace: &str, name: &str) -> Result<bool> {
    if namespace.is_empty() || namespace.len() > NAMESPACE_MAX_BYTES {
        return Err(Error::InvalidArgument(format!(
            "bad namespace {:?}",
            clip(namespace)
        )));
    }
    if name.is_empty() || name.len() > NAME_MAX_BYTES {
        return Err(Error::InvalidArgument(format!(
            "bad image name {:?}",
            clip(name)
        )));
    }
    let channel = timed("connecting to containerd", connect(address)).await?;
    let mut client = ImagesClient::new(channel);
    let request = in_namespace(
        DeleteImageRequest {
            name: name.to_string(),
            sync: true,
        },
        namespace,
    )?;
    let what = format!("removing containerd image {:?} ({namespace})", clip(name));
    let call = client.delete(request);
    match tokio::time::timeout(REMOVE_TIMEOUT, call).await {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(status)) if status.code() == Code::NotFound => Ok(false),
        Ok(Err(status)) => Err(Error::Containerd { what, status }),
        Err(_) => Err(Error::Unavailable(format!(
            "{what}: no answer within {} s",
            REMOVE_TIMEOUT.as_secs()
        ))),
    }
}

async fn timed<T>(what: &str, call: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r,
        Err(_) => Err(Error::Unavailable(format!(
            "{what}: no answer within {} s",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

fn in_namespace<T>(message: T, namespace: &str) -> Result<Request<T>> {
    let mut request = Request::new(message);
    let value = namespace
        .parse()
        .map_err(|_| Error::InvalidArgument(format!("bad namespace {:?}", clip(namespace))))?;
    request.metadata_mut().insert(NAMESPACE_HEADER, value);
    Ok(request)
}

async fn list_namespaces(channel: Channel) -> Result<Vec<String>> {
    let mut client = NamespacesClient::new(channel);
    let call = async move {
        client
            .list(ListNamespacesRequest::default())
            .await
            .map_err(|status| Error::Containerd {
                what: "listing containerd's namespaces".into(),
                status,
            })
    };
    let answer = timed("listing containerd's namespaces", call).await?;
    let mut names: Vec<String> = answer
        .into_inner()
        .namespaces
        .into_iter()
        .map(|n| n.name)
        .collect();
    if names.len() > NAMESPACES_MAX {
        log::warn!(
            "containerd has {} namespaces; only the first {NAMESPACES_MAX} are looked at",
            names.len()
        );
        names.truncate(NAMESPACES_MAX);
    }
    Ok(names)
}

async fn list_images(channel: Channel, namespace: &str) -> Result<Vec<crate::api::images::Image>> {
    let mut client = ImagesClient::new(channel);
    let request = in_namespace(ListImagesRequest::default(), namespace)?;
    let call = async move {
        client
            .list(request)
            .await
            .map_err(|status| Error::Containerd {
                what: "listing containerd's images".into(),
                status,
            })
    };
    Ok(timed("listing containerd's images", call)
        .await?
        .into_inner()
        .images)
}

/// The blob `digest` from the content service; None when the store does not
/// have it.
async fn read_blob(channel: Channel, namespace: &str, digest: String) -> Result<Option<Vec<u8>>> {
    let mut client = ContentClient::new(channel);
    let request = in_namespace(
        ReadContentRequest {
            digest: digest.clone(),
            offset: 0,
            // One byte more than taken, to see a blob that is too large.
            size: BLOB_MAX_BYTES as i64 + 1,
        },
        namespace,
    )?;
    let what = format!("reading {}", clip(&digest));
    let call = async move {
        let mut stream = match client.read(request).await {
            Ok(r) => r.into_inner(),
            Err(status) if status.code() == Code::NotFound => return Ok(None),
            Err(status) => return Err(Error::Content(status)),
        };
        let mut blob = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    if blob.len() + m.data.len() > BLOB_MAX_BYTES {
                        return Err(Error::BadBlob(format!(
                            "blob {} is over {} MiB",
                            clip(&digest),
                            BLOB_MAX_BYTES >> 20
                        )));
                    }
                    blob.extend_from_slice(&m.data);
                }
                Ok(None) => return Ok(Some(blob)),
                Err(status) if status.code() == Code::NotFound => return Ok(None),
                Err(status) => return Err(Error::Content(status)),
            }
        }
    };
    timed(&what, call).await
}

/// This machine's architecture as OCI platforms name it (Go's GOARCH).
fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        other => other,
    }
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    platform: Option<Platform>,
}

/// An index, a manifest or neither: the fields this module reads.
#[derive(Deserialize)]
struct Document {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
}

#[derive(Deserialize)]
struct Config {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// What an index or manifest leads to.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// A manifest (or an index) chosen from an index: (media type, digest).
    Manifest(String, String),
    /// The config blob of a manifest.
    Config(String),
}

/// The step after the blob of a target of media type `media_type` (the
/// descriptor's; the blob's own `mediaType` when the descriptor has none
/// this module knows, as in old Docker schema 2 images).
fn next(media_type: &str, blob: &[u8], architecture: &str) -> Result<Next> {
    let doc: Document = serde_json::from_slice(blob)
        .map_err(|e| Error::BadBlob(format!("not an image index or manifest: {e}")))?;
    let kind = match media_type {
        MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST | MEDIA_OCI_MANIFEST | MEDIA_DOCKER_MANIFEST => {
            media_type
        }
        _ => doc.media_type.as_str(),
    };
    let is_index = match kind {
        MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST => true,
        MEDIA_OCI_MANIFEST | MEDIA_DOCKER_MANIFEST => false,
        // An OCI document may leave out its media type: by its fields.
        _ if doc.manifests.is_some() => true,
        _ if doc.config.is_some() => false,
        _ => {
            return Err(Error::BadBlob(format!(
                "media type {:?} is neither an image index nor a manifest",
                clip(kind)
            )))
        }
    };
    if is_index {
        let manifests = doc.manifests.unwrap_or_default();
        let chosen = manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == architecture)
            })
            // Attestations (BuildKit's, platform unknown/unknown) are no
            // fallback.
            .or_else(|| {
                manifests.iter().find(|m| {
                    m.platform
                        .as_ref()
                        .is_none_or(|p| p.os != "unknown" && p.architecture != "unknown")
                })
            })
            .ok_or_else(|| Error::BadBlob("an image index without manifests".into()))?;
        Ok(Next::Manifest(
            chosen.media_type.clone(),
            chosen.digest.clone(),
        ))
    } else {
        let config = doc
            .config
            .ok_or_else(|| Error::BadBlob("a manifest without a config".into()))?;
        Ok(Next::Config(config.digest))
    }
}

/// The chain id of all the layers of an image config (its `rootfs.diff_ids`):
/// chain(1) = diff(1), chain(n) = sha256 of "chain(n-1) diff(n)".
fn top_chain_id_of_config(blob: &[u8]) -> Result<String> {
    let config: Config = serde_json::from_slice(blob)
        .map_err(|e| Error::BadBlob(format!("not an image config: {e}")))?;
    chain_id(&config.rootfs.diff_ids)
}

fn chain_id(diff_ids: &[String]) -> Result<String> {
    let mut ids = diff_ids.iter();
    let first = ids
        .next()
        .ok_or_else(|| Error::BadBlob("an image config without layers".into()))?;
    check_digest(first)?;
    let mut chain = first.clone();
    for diff in ids {
        check_digest(diff)?;
        let digest = Sha256::digest(format!("{chain} {diff}").as_bytes());
        chain = format!("sha256:{}", hex(&digest));
    }
    Ok(chain)
}

/// `algorithm:hex`, bounded: what goes into a chain id and a Read call.
fn check_digest(digest: &str) -> Result<()> {
    let ok = digest.len() <= 160
        && digest.split_once(':').is_some_and(|(algorithm, hex)| {
            !algorithm.is_empty()
                && algorithm
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b))
                && !hex.is_empty()
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
        });
    if ok {
        Ok(())
    } else {
        Err(Error::BadBlob(format!("bad digest {:?}", clip(digest))))
    }
}

/// The top chain id of the image whose target is (`media_type`, `digest`),
/// reading blobs with `read` (None: not in the store, so the image is not
/// here for this platform: Ok(None)).
async fn top_chain_id<F, Fut>(media_type: &str, digest: &str, mut read: F) -> Result<Option<String>>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<Option<Vec<u8>>>>,
{
    let architecture = oci_architecture();
    let mut media_type = media_type.to_string();
    let mut digest = digest.to_string();
    for _ in 0..INDEX_DEPTH_MAX {
        check_digest(&digest)?;
        let Some(blob) = read(digest.clone()).await? else {
            return Ok(None);
        };
        match next(&media_type, &blob, architecture)? {
            Next::Manifest(m, d) => (media_type, digest) = (m, d),
            Next::Config(config) => {
                check_digest(&config)?;
                let Some(blob) = read(config).await? else {
                    return Ok(None);
                };
                return top_chain_id_of_config(&blob).map(Some);
            }
        }
    }
    Err(Error::BadBlob(format!(
        "indexes nested more than {INDEX_DEPTH_MAX} deep"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    // sha256 of "a", "b" and "c"; the chain ids computed with sha256sum:
    // printf '%s %s' "$d1" "$d2" | sha256sum, and so on.
    const D1: &str = "sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb";
    const D2: &str = "sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d";
    const D3: &str = "sha256:2e7d2c03a9507ae265ecf5b5356885a53393a2029d241394997265a1a25aefc6";
    const C2: &str = "sha256:51c0c8ace48498d6f5fee6b0592cc06f2da0f3cbe09c5a34a97dce85c3889676";
    const C3: &str = "sha256:2fce7f8ce91bcf0a1428b36e1024639fdbd9469eea762dba98aa749631885106";

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn chain_ids_match_a_hand_computed_vector() {
        let ids = |n: usize| {
            [D1, D2, D3][..n]
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(chain_id(&ids(1)).unwrap(), D1);
        assert_eq!(chain_id(&ids(2)).unwrap(), C2);
        assert_eq!(chain_id(&ids(3)).unwrap(), C3);
        assert!(chain_id(&[]).is_err());
        assert!(chain_id(&["sha256:xyz".to_string()]).is_err());
        assert!(chain_id(&[D1.to_string(), "nodigest".to_string()]).is_err());
    }

    fn index(media_type: &str, entries: &[(&str, &str, &str)]) -> Vec<u8> {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(digest, os, arch)| {
                serde_json::json!({
                    "mediaType": MEDIA_OCI_MANIFEST,
                    "digest": digest,
                    "size": 100,
                    "platform": { "os": os, "architecture": arch },
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": manifests,
        }))
        .unwrap()
    }

    fn manifest(config: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_DOCKER_MANIFEST,
            "config": { "mediaType": "application/vnd.docker.container.image.v1+json",
                        "digest": config, "size": 10 },
            "layers": [],
        }))
        .unwrap()
    }

    fn config(diff_ids: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        }))
        .unwrap()
    }

    #[test]
    fn an_index_picks_this_platform_else_the_first_real_one() {
        let (a, b, c) = (digest('a'), digest('b'), digest('c'));
        let blob = index(
            MEDIA_OCI_INDEX,
            &[
                (&a, "unknown", "unknown"),
                (&b, "linux", "arm64"),
                (&c, "linux", "amd64"),
            ],
        );
        let picked = |arch| next(MEDIA_OCI_INDEX, &blob, arch).unwrap();
        assert_eq!(
            picked("amd64"),
            Next::Manifest(MEDIA_OCI_MANIFEST.into(), c.clone())
        );
        assert_eq!(
            picked("arm64"),
            Next::Manifest(MEDIA_OCI_MANIFEST.into(), b.clone())
        );
        // No match: the first that is not an attestation.
        assert_eq!(
            picked("s390x"),
            Next::Manifest(MEDIA_OCI_MANIFEST.into(), b.clone())
        );
        // A Docker manifest list, known by its own mediaType only.
        let list = index(MEDIA_DOCKER_LIST, &[(&a, "linux", "riscv64")]);
        assert_eq!(
            next("", &list, "amd64").unwrap(),
            Next::Manifest(MEDIA_OCI_MANIFEST.into(), a.clone())
        );
        assert!(next(MEDIA_OCI_INDEX, &index(MEDIA_OCI_INDEX, &[]), "amd64").is_err());
    }

    #[test]
    fn a_manifest_leads_to_its_config_and_garbage_is_an_error() {
        let d = digest('d');
        assert_eq!(
            next(MEDIA_DOCKER_MANIFEST, &manifest(&d), "amd64").unwrap(),
            Next::Config(d.clone())
        );
        // An OCI manifest without its mediaType, known by its config.
        let bare = format!(r#"{{"schemaVersion":2,"config":{{"digest":"{d}"}},"layers":[]}}"#);
        assert_eq!(next("", bare.as_bytes(), "amd64").unwrap(), Next::Config(d));
        assert!(next(MEDIA_DOCKER_MANIFEST, b"not json", "amd64").is_err());
        assert!(next("", br#"{"schemaVersion":2}"#, "amd64").is_err());
        assert!(next(MEDIA_OCI_MANIFEST, br#"{"layers":[]}"#, "amd64").is_err());
        assert!(top_chain_id_of_config(br#"{"rootfs":{}}"#).is_err());
        assert_eq!(top_chain_id_of_config(&config(&[D1, D2, D3])).unwrap(), C3);
    }

    fn run<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn an_image_resolves_from_index_to_chain_id_and_missing_blobs_skip_it() {
        let arch = oci_architecture();
        let (idx, man, cfg, other) = (digest('1'), digest('2'), digest('3'), digest('4'));
        let mut blobs: HashMap<String, Vec<u8>> = HashMap::new();
        blobs.insert(
            idx.clone(),
            index(
                MEDIA_OCI_INDEX,
                &[(&other, "linux", "sparc"), (&man, "linux", arch)],
            ),
        );
        blobs.insert(man.clone(), manifest(&cfg));
        blobs.insert(cfg.clone(), config(&[D1, D2]));
        let resolve = |blobs: &HashMap<String, Vec<u8>>, media: &str, target: &str| {
            let blobs = blobs.clone();
            run(top_chain_id(media, target, move |d: String| {
                let blob = blobs.get(&d).cloned();
                async move { Ok(blob) }
            }))
        };
        assert_eq!(
            resolve(&blobs, MEDIA_OCI_INDEX, &idx).unwrap(),
            Some(C2.to_string())
        );
        assert_eq!(
            resolve(&blobs, MEDIA_DOCKER_MANIFEST, &man).unwrap(),
            Some(C2.to_string())
        );
        // This platform's config not pulled: the image is skipped, no error.
        let mut partial = blobs.clone();
        partial.remove(&cfg);
        assert_eq!(resolve(&partial, MEDIA_OCI_INDEX, &idx).unwrap(), None);
        assert_eq!(
            resolve(&blobs, MEDIA_OCI_INDEX, &digest('9')).unwrap(),
            None
        );
        // An index naming itself ends at the depth bound.
        let mut looping = blobs.clone();
        looping.insert(
            idx.clone(),
            index(MEDIA_OCI_INDEX, &[(&idx, "linux", arch)]),
        );
        let mut entry: serde_json::Value = serde_json::from_slice(&looping[&idx]).unwrap();
        entry["manifests"][0]["mediaType"] = MEDIA_OCI_INDEX.into();
        looping.insert(idx.clone(), serde_json::to_vec(&entry).unwrap());
        assert!(resolve(&looping, MEDIA_OCI_INDEX, &idx).is_err());
        assert!(resolve(&blobs, MEDIA_OCI_INDEX, "../etc/passwd").is_err());
    }
}
