//! containerd's diff service (`containerd.services.diff.v1.Diff`) for image
//! layers unpacked into lcfs snapshots: Apply reads the layer blob from
//! containerd's content store and writes the tar straight into the
//! snapshot's engine layer, instead of containerd's walking differ untarring
//! it through the FUSE mount.
//!
//! containerd reaches it as a proxy plugin of type `diff` and tries it
//! before its own differ (`[plugins."io.containerd.service.v1.diff-service"]
//! default = ["lcfs", "walking"]`). Its diff service moves on to the next
//! differ on Unimplemented, which is what every call this one does not take
//! gets: mounts that are not one read-write bind mount of an active lcfs
//! snapshot's directory (overlayfs and every other snapshotter), media
//! types and digests other than those below, stream processor payloads
//! (encrypted layers). Diff, comparing two mounts, is in crate::compare.
//!
//! Media types, as containerd's walking differ reads them
//! (`images.DiffCompression`): the OCI layer tar as is; the OCI `+gzip` and
//! `+zstd` layers and the Docker layer types (`.tar`, `.tar.gzip`, foreign
//! or not) decompressed by their first bytes (gzip, zstd, or none), as
//! containerd's `compression.DecompressStream` does.
//!
//! Checks: the blob is read from the content store in the caller's
//! namespace and must have exactly the descriptor's size and sha256 digest;
//! the applied descriptor containerd gets back is the sha256 and size of
//! the whole uncompressed stream (containerd compares it with the image's
//! diff ids). The tar goes through the Docker plugin's applier, with its
//! containment rules and bounds.
//!
//! A failed Apply leaves part of the tar in the snapshot's layer. The
//! snapshot is still active: Commit refuses it from then on, and containerd
//! removes it after a failed apply (its unpacker does), so the partial
//! content never becomes a committed layer.

use crate::api::content::content_client::ContentClient;
use crate::api::content::{ReadContentRequest, ReadContentResponse};
use crate::api::diff::diff_server::Diff;
use crate::api::diff::{ApplyRequest, ApplyResponse, DiffRequest, DiffResponse};
use crate::api::types::{Descriptor, Mount};
use crate::error::{Error, Result};
use crate::table::Table;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

/// The media type of what Apply returns: the uncompressed layer tar.
pub const MEDIA_TYPE_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// containerd passes the caller's namespace in this gRPC header.
pub(crate) const NAMESPACE_HEADER: &str = "containerd-namespace";
/// containerd's bound on a namespace name is 76 bytes; ours is looser.
pub(crate) const NAMESPACE_MAX_BYTES: usize = 256;
/// Media types (with parameters) longer than this are nothing we take.
const MEDIA_TYPE_MAX_BYTES: usize = 256;
/// What may follow the tar's end-of-archive marker (record padding; the
/// same bound as the Docker plugin's ApplyDiff).
const TRAILING_MAX_BYTES: u64 = 64 << 20;
/// Blob messages (about 1 MiB each from containerd) read ahead of the
/// applier.
const CHUNKS_AHEAD: usize = 16;
/// One message of the content stream must come within this time.
pub(crate) const CONTENT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Connecting to containerd's socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 flow control windows for the blob stream: containerd sends this
/// far ahead of the applier (read in a blocking thread), so reading and
/// unpacking overlap. HTTP/2's default, 64 KiB, made every 1 MiB message of
/// containerd's wait for window updates. Bounds the memory one Apply holds.
const STREAM_WINDOW_BYTES: u32 = 8 << 20;

/// How the blob's bytes become the tar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    /// The OCI layer tar: read as is.
    None,
    /// By the first bytes: gzip, zstd, or none.
    Detect,
}

/// The compression a layer media type allows, or None for media types this
/// differ leaves to the next one.
fn compression_of(media_type: &str) -> Option<Compression> {
    const DOCKER: [&str; 4] = [
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ];
    const OCI: [&str; 2] = [
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
    ];
    if DOCKER.contains(&media_type) {
        return Some(Compression::Detect);
    }
    match media_type.split_once('+') {
        None if OCI.contains(&media_type) => Some(Compression::None),
        Some((base, "gzip" | "zstd")) if OCI.contains(&base) => Some(Compression::Detect),
        _ => None,
    }
}

/// `sha256:<64 lowercase hex>`; Ok(None) for another algorithm (left to
/// the next differ).
fn parse_digest(digest: &str) -> Result<Option<[u8; 32]>> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err(Error::InvalidArgument(format!(
            "digest {:?} has no algorithm",
            clip(digest)
        )));
    };
    if algorithm != "sha256" {
        return Ok(None);
    }
    let bad = || Error::InvalidArgument(format!("bad sha256 digest {:?}", clip(digest)));
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(text, 16).map_err(|_| bad())?;
    }
    Ok(Some(out))
}

pub(crate) use lcfs_engine::digest::hex;

/// At most 128 characters of something from outside, for messages.
pub(crate) fn clip(s: &str) -> String {
    s.chars().take(128).collect()
}

pub struct DiffService {
    pub(crate) table: Arc<Table>,
    /// containerd's socket, for its content service.
    pub(crate) containerd_address: PathBuf,
}

/// What one Apply was asked to do, checked.
struct Job {
    layer: String,
    key: String,
    media_type: String,
    digest: String,
    expected: [u8; 32],
    size: u64,
    compression: Compression,
    sync: bool,
}

/// An Apply this differ takes: the descriptor, how to decompress, the
/// expected sha256, the mount's directory.
type Accepted = (Descriptor, Compression, [u8; 32], PathBuf);

/// Decides whether this differ takes the call: Ok(None) means
/// Unimplemented (the next differ takes it).
fn accept(r: &ApplyRequest) -> Result<Option<Accepted>> {
    let Some(desc) = &r.diff else {
        return Err(Error::InvalidArgument("apply without a descriptor".into()));
    };
    if desc.media_type.len() > MEDIA_TYPE_MAX_BYTES {
        return Ok(None);
    }
    let Some(compression) = compression_of(&desc.media_type) else {
        return Ok(None);
    };
    if !r.payloads.is_empty() {
        // Stream processor payloads (decryption keys): containerd's
        // processors, not ours.
        return Ok(None);
    }
    let Some(expected) = parse_digest(&desc.digest)? else {
        return Ok(None);
    };
    if desc.size < 0 {
        return Err(Error::InvalidArgument(format!(
            "negative blob size {}",
            desc.size
        )));
    }
    let [mount] = r.mounts.as_slice() else {
        return Ok(None);
    };
    let Some(source) = bind_source(mount) else {
        return Ok(None);
    };
    Ok(Some((desc.clone(), compression, expected, source)))
}

/// The directory of a read-write bind mount (what our Prepare answers).
fn bind_source(m: &Mount) -> Option<PathBuf> {
    if m.r#type != "bind" || m.options.iter().any(|o| o == "ro") {
        return None;
    }
    let source = Path::new(&m.source);
    source.is_absolute().then(|| source.to_path_buf())
}

#[tonic::async_trait]
impl Diff for DiffService {
    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> std::result::Result<Response<ApplyResponse>, Status> {
        let header = request
            .metadata()
            .get(NAMESPACE_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|n| !n.is_empty() && n.len() <= NAMESPACE_MAX_BYTES)
            .map(str::to_string);
        if header.is_none() {
            log::debug!(
                "diff Apply without a {NAMESPACE_HEADER} header (headers: {:?})",
                request.metadata().keys().collect::<Vec<_>>()
            );
        }
        let r = request.into_inner();
        let Some((desc, compression, expected, source)) = accept(&r)? else {
            return Err(Status::unimplemented(
                "lcfs applies only layer tars (OCI, Docker; plain, gzip, zstd) to its own \
                 snapshots",
            ));
        };
        let table = self.table.clone();
        // The claim is taken in a blocking thread (the table's lock is held
        // by engine calls) and travels with the apply.
        let claim = tokio::task::spawn_blocking(move || table.claim_for_apply(&source))
            .await
            .map_err(|e| Status::internal(format!("diff task failed: {e}")))??;
        let Some(mut claim) = claim else {
            return Err(Status::unimplemented(
                "not a mount of an active lcfs snapshot",
            ));
        };
        let job = Job {
            layer: claim.layer.clone(),
            key: claim.key.clone(),
            media_type: desc.media_type.clone(),
            digest: desc.digest.clone(),
            expected,
            size: desc.size as u64,
            compression,
            sync: r.sync_fs,
        };
        // containerd 1.7.24 does not pass the caller's namespace on to a
        // diff proxy (seen in the e2e check); its snapshot keys carry it
        // (`<namespace>/<id>/<key>`, metadata/snapshot.go), and namespaces
        // never hold a '/'.
        let namespace = header.or_else(|| {
            job.key
                .split_once('/')
                .map(|(ns, _)| ns.to_string())
                .filter(|ns| !ns.is_empty() && ns.len() <= NAMESPACE_MAX_BYTES)
        });
        let started = Instant::now();
        let stream = match self.open_blob(&job, namespace).await {
            Ok(s) => s,
            Err(e) => {
                // Nothing was written: the snapshot stays usable.
                log::warn!("containerd diff for snapshot {:?}: {e}", job.key);
                return Err(e.into());
            }
        };
        let table = self.table.clone();
        // The stream is read, checked and hashed by a task of its own,
        // ahead of the applier (bounded by CHUNKS_AHEAD messages).
        let (chunks, received) = tokio::sync::mpsc::channel(CHUNKS_AHEAD);
        tokio::spawn(pump(stream, chunks, job.expected, job.size));
        let applied = tokio::task::spawn_blocking(move || {
            let result = apply_blob(&table, &job, received);
            // The layer's directory entry in the mount is stale either way.
            table.filled(&job.layer);
            match result {
                Ok((digest, size)) => {
                    log::info!(
                        "containerd diff: applied {} ({}, {} bytes) to snapshot {:?} (layer \
                         {}) in {:.2} s",
                        job.digest,
                        job.media_type,
                        job.size,
                        job.key,
                        job.layer,
                        started.elapsed().as_secs_f64()
                    );
                    Ok((digest, size))
                }
                Err(e) => {
                    claim.failed();
                    log::warn!(
                        "containerd diff: applying {} to snapshot {:?} (layer {}) failed: {e}",
                        job.digest,
                        job.key,
                        job.layer
                    );
                    Err(e)
                }
            }
        })
        .await
        .map_err(|e| Status::internal(format!("diff task failed: {e}")))??;
        let (digest, size) = applied;
        Ok(Response::new(ApplyResponse {
            applied: Some(Descriptor {
                media_type: MEDIA_TYPE_LAYER_TAR.into(),
                digest: format!("sha256:{}", hex(&digest)),
                size: i64::try_from(size).unwrap_or(i64::MAX),
                annotations: Default::default(),
            }),
        }))
    }

    async fn diff(
        &self,
        request: Request<DiffRequest>,
    ) -> std::result::Result<Response<DiffResponse>, Status> {
        Ok(Response::new(self.compare(request.into_inner()).await?))
    }
}

impl DiffService {
    /// A connection to containerd's API socket.
    pub(crate) async fn connect(&self) -> Result<tonic::transport::Channel> {
        connect(&self.containerd_address).await
    }

    /// Opens the blob's stream on containerd's content service.
    async fn open_blob(
        &self,
        job: &Job,
        namespace: Option<String>,
    ) -> Result<tonic::Streaming<ReadContentResponse>> {
        let mut client = ContentClient::new(self.connect().await?);
        let mut request = Request::new(ReadContentRequest {
            digest: job.digest.clone(),
            offset: 0,
            size: 0,
        });
        if let Some(ns) = namespace {
            let value = ns
                .parse()
                .map_err(|_| Error::InvalidArgument("bad namespace header".into()))?;
            request.metadata_mut().insert(NAMESPACE_HEADER, value);
        }
        match client.read(request).await {
            Ok(r) => Ok(r.into_inner()),
            Err(status) => Err(Error::Content(status)),
        }
    }
}

/// A connection to containerd's API socket at `address`.
pub(crate) async fn connect(address: &Path) -> Result<tonic::transport::Channel> {
    let path = address.to_path_buf();
    tonic::transport::Endpoint::from_static("http://[::]:0")
        .connect_timeout(CONNECT_TIMEOUT)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(STREAM_WINDOW_BYTES)
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| {
            Error::Unavailable(format!(
                "containerd at {} (lcfs daemon --containerd-address): {e}",
                address.display()
            ))
        })
}

/// Reads the blob, unpacks it into the claimed layer; returns the sha256 and
/// size of the uncompressed stream.
fn apply_blob(
    table: &Table,
    job: &Job,
    received: tokio::sync::mpsc::Receiver<Result<Vec<u8>>>,
) -> Result<([u8; 32], u64)> {
    let started = std::time::Instant::now();
    let engine = table.engine();
    let layer = engine
        .layer_id(&job.layer)
        .map_err(|e| Error::engine(format!("layer {}", job.layer), e))?;
    let failure = Arc::new(Mutex::new(None));
    let mut blob = BlobReader {
        received,
        chunk: Vec::new(),
        at: 0,
        failure: failure.clone(),
    };
    // The failure the blob reader saw is the cause, whatever the tar
    // applier made of the read error it got.
    let blob_failure = |e: Error| -> Error {
        failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or(e)
    };
    // Up to 4 bytes say which compression it is.
    let mut magic = Vec::with_capacity(4);
    (&mut blob)
        .take(4)
        .read_to_end(&mut magic)
        .map_err(|e| blob_failure(Error::io("reading the blob", e)))?;
    let (hasher, count) = {
        let raw = io::Cursor::new(magic.clone()).chain(&mut blob);
        let decoded: Box<dyn Read + '_> = match job.compression {
            Compression::Detect if magic.starts_with(&[0x1f, 0x8b, 0x08]) => {
                Box::new(flate2::read::MultiGzDecoder::new(raw))
            }
            Compression::Detect if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) => Box::new(
                zstd::stream::read::Decoder::new(raw)
                    .map_err(|e| Error::InvalidArgument(format!("starting zstd: {e}")))?,
            ),
            _ => Box::new(raw),
        };
        let compressed = !magic_is_plain(job.compression, &magic);
        let mut tar = CountingReader {
            inner: decoded,
            // Uncompressed, the tar is the blob: its digest is checked already.
            hasher: compressed.then(Sha256::new),
            count: 0,
        };
        lcfs_dockerplugin::apply_tar(engine, layer, &mut tar)
            .map_err(|e| blob_failure(Error::Apply(e)))?;
        let trailing = io::copy(
            &mut (&mut tar).take(TRAILING_MAX_BYTES + 1),
            &mut io::sink(),
        )
        .map_err(|e| blob_failure(Error::io("reading after the end of the archive", e)))?;
        if trailing > TRAILING_MAX_BYTES {
            return Err(Error::InvalidArgument(format!(
                "more than {} MiB follow the end of the archive",
                TRAILING_MAX_BYTES >> 20
            )));
        }
        Ok((tar.hasher.take(), tar.count))
    }?;
    // Whatever the decompressor left unread must still be checked.
    io::copy(&mut blob, &mut io::sink())
        .map_err(|e| blob_failure(Error::io("reading the blob", e)))?;
    let digest = match hasher {
        Some(h) => h.finalize().into(),
        None => job.expected,
    };
    // The pull's share of the statistics (docs/statistics.md).
    engine
        .record_apply(layer, count, started.elapsed())
        .map_err(|e| Error::engine("recording the apply", e))?;
    lcfs_dockerplugin::record_diff_id(engine, &job.layer, &digest)
        .map_err(|e| Error::engine("recording the DiffID", e))?;
    if job.sync {
        engine
            .sync()
            .map_err(|e| Error::engine("syncing the applied layer", e))?;
    }
    Ok((digest, count))
}

/// Whether the blob goes to the tar applier as it is.
fn magic_is_plain(compression: Compression, magic: &[u8]) -> bool {
    compression == Compression::None
        || !(magic.starts_with(&[0x1f, 0x8b, 0x08]) || magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]))
}

/// Reads the content service's stream and sends its data on, checking as
/// it goes that the blob is exactly what the descriptor says: offsets in
/// order, never more than the size, and at the end the size and sha256 (a
/// mismatch is sent as an error before the end, so the applier never sees
/// a clean end of a bad blob). Stops when the applier stops listening.
async fn pump(
    mut stream: tonic::Streaming<ReadContentResponse>,
    chunks: tokio::sync::mpsc::Sender<Result<Vec<u8>>>,
    expected: [u8; 32],
    size: u64,
) {
    let mut hasher = Sha256::new();
    let mut read = 0u64;
    let failed = loop {
        let message = tokio::time::timeout(CONTENT_MESSAGE_TIMEOUT, stream.message()).await;
        let m = match message {
            Err(_) => {
                break Error::Unavailable(format!(
                    "containerd's content service sent nothing for {} s",
                    CONTENT_MESSAGE_TIMEOUT.as_secs()
                ))
            }
            Ok(Err(status)) => break Error::Content(status),
            Ok(Ok(None)) => {
                if read != size {
                    break Error::BadBlob(format!(
                        "the blob has {read} bytes, its descriptor says {size}"
                    ));
                }
                let got: [u8; 32] = std::mem::take(&mut hasher).finalize().into();
                if got != expected {
                    break Error::BadBlob(format!(
                        "the blob's digest is sha256:{}, its descriptor says sha256:{}",
                        hex(&got),
                        hex(&expected)
                    ));
                }
                return; // dropping the sender is the clean end
            }
            Ok(Ok(Some(m))) => m,
        };
        if u64::try_from(m.offset).ok() != Some(read) {
            break Error::BadBlob(format!(
                "the content service sent offset {} where {read} was due",
                m.offset
            ));
        }
        let len = m.data.len() as u64;
        if read + len > size {
            break Error::BadBlob(format!(
                "the blob is longer than its descriptor's {size} bytes"
            ));
        }
        read += len;
        hasher.update(&m.data);
        if m.data.is_empty() {
            continue;
        }
        if chunks.send(Ok(m.data)).await.is_err() {
            return; // the applier gave up
        }
    };
    let _ = chunks.send(Err(failed)).await;
}

/// The checked blob's bytes as a reader, for the blocking applier.
struct BlobReader {
    received: tokio::sync::mpsc::Receiver<Result<Vec<u8>>>,
    chunk: Vec<u8>,
    at: usize,
    failure: Arc<Mutex<Option<Error>>>,
}

impl BlobReader {
    fn next_chunk(&mut self) -> io::Result<bool> {
        match self.received.blocking_recv() {
            None => Ok(false),
            Some(Ok(data)) => {
                self.chunk = data;
                self.at = 0;
                Ok(true)
            }
            Some(Err(e)) => {
                let message = e.to_string();
                *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                Err(io::Error::new(io::ErrorKind::InvalidData, message))
            }
        }
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at >= self.chunk.len() {
            if !self.next_chunk()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Counts (and, when asked, hashes) what the tar applier reads.
struct CountingReader<R> {
    inner: R,
    hasher: Option<Sha256>,
    count: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_as_containerd_reads_them() {
        let cases = [
            (
                "application/vnd.oci.image.layer.v1.tar",
                Some(Compression::None),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                Some(Compression::Detect),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Some(Compression::Detect),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar",
                Some(Compression::Detect),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Some(Compression::Detect),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
                None,
            ),
            ("application/vnd.oci.image.layer.v1.tar+encrypted", None),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip+encrypted",
                None,
            ),
            ("application/json", None),
            ("", None),
        ];
        for (media_type, want) in cases {
            assert_eq!(compression_of(media_type), want, "{media_type}");
        }
    }

    #[test]
    fn digests_are_sha256_or_left_to_the_next_differ() {
        let hex64 = "ab".repeat(32);
        assert_eq!(
            parse_digest(&format!("sha256:{hex64}")).unwrap(),
            Some([0xab; 32])
        );
        assert_eq!(parse_digest(&format!("sha512:{hex64}")).unwrap(), None);
        for bad in [
            "sha256:ab",
            "nocolon",
            &format!("sha256:{}", "AB".repeat(32)),
        ] {
            assert!(parse_digest(bad).is_err(), "{bad}");
        }
    }
}
