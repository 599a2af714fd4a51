//! The differ's Diff (containerd's "compare"): the layer tar between two
//! mounts of lcfs snapshots, made from what the engine recorded a layer
//! changed (O(changes)), instead of containerd's walking differ comparing
//! both trees file by file through the FUSE mount. The tar goes to
//! containerd's content store as the walking differ's does. `docker commit`
//! and every BuildKit step on Docker's containerd image store end here.
//!
//! Taken: the upper mount one bind mount of the directory of an lcfs view
//! or active snapshot, the lower none or one such mount; after stepping up
//! from each over layers that changed nothing (a view, an empty active),
//! the upper's layer is a clone of the lower's, or the same layer (an empty
//! tar); media type the OCI layer tar, plain or `+gzip` (empty means
//! `+gzip`, containerd's default); no source date epoch. Anything else is
//! Unimplemented, and containerd's walking differ compares.
//!
//! containerd 1.7 passes a diff proxy neither the caller's namespace nor
//! its lease (seen in the e2e check). The namespace comes from the upper
//! snapshot's key (`<namespace>/<id>/<key>`); the blob is written under a
//! lease of its own that expires after an hour, time for the caller to
//! reference it from an image or its own lease (an unreferenced blob would
//! otherwise be garbage at containerd's next collection).

use crate::api::content::content_client::ContentClient;
use crate::api::content::{AbortRequest, WriteAction, WriteContentRequest};
use crate::api::diff::{DiffRequest, DiffResponse};
use crate::api::leases::leases_client::LeasesClient;
use crate::api::leases::CreateRequest;
use crate::api::types::{Descriptor, Mount};
use crate::diff::{
    clip, hex, DiffService, CONTENT_MESSAGE_TIMEOUT, MEDIA_TYPE_LAYER_TAR, NAMESPACE_HEADER,
    NAMESPACE_MAX_BYTES,
};
use crate::error::{Error, Result};
use crate::table::Table;
use lcfs_engine::Engine;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tonic::Request;

pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The label containerd's differ puts on a compressed layer blob: the
/// digest of the tar inside (the image config's diff id).
const UNCOMPRESSED_LABEL: &str = "containerd.io/uncompressed";
const LEASE_HEADER: &str = "containerd-lease";
const LEASE_EXPIRE_LABEL: &str = "containerd.io/gc.expire";
const LEASE_LIFETIME: Duration = Duration::from_secs(3600);
/// Bytes per content Write message.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks made ahead of the content writes.
const CHUNKS_AHEAD: usize = 8;
/// Layers that changed nothing stepped over at most.
const MAX_EMPTY_STEPS: usize = 64;
/// A ref given by the caller longer than this is not used.
const REF_MAX_BYTES: usize = 256;

/// What a Diff this differ takes will write.
#[derive(Debug, PartialEq, Eq)]
enum Export {
    /// Layer `layer` against `parent` (its parent in the engine, or ""
    /// for everything it shows).
    Changes { layer: String, parent: String },
    /// Both sides hold the same content.
    Empty,
}

struct Plan {
    export: Export,
    gzip: bool,
    media_type: &'static str,
    /// The upper snapshot's key (its namespace is the blob's).
    key: String,
}

/// The tar written, as the content store must see it.
struct Produced {
    digest: [u8; 32],
    size: u64,
    /// The tar's own digest when it was compressed.
    uncompressed: Option<[u8; 32]>,
}

/// The directory of a bind mount.
fn bind_dir(m: &Mount) -> Option<PathBuf> {
    let source = Path::new(&m.source);
    (m.r#type == "bind" && source.is_absolute()).then(|| source.to_path_buf())
}

/// Whether the call is one this differ takes, and what it writes.
fn plan(table: &Table, r: &DiffRequest) -> Result<Option<Plan>> {
    if r.source_date_epoch.is_some() {
        return Ok(None);
    }
    let (gzip, media_type) = match r.media_type.as_str() {
        "" | MEDIA_TYPE_LAYER_GZIP => (true, MEDIA_TYPE_LAYER_GZIP),
        MEDIA_TYPE_LAYER_TAR => (false, MEDIA_TYPE_LAYER_TAR),
        _ => return Ok(None),
    };
    let [right] = r.right.as_slice() else {
        return Ok(None);
    };
    let Some((upper, key, active)) = bind_dir(right).and_then(|d| table.snapshot_at(&d)) else {
        return Ok(None);
    };
    let lower = match r.left.as_slice() {
        [] => None,
        [left] => match bind_dir(left).and_then(|d| table.snapshot_at(&d)) {
            Some((layer, _, _)) => Some(layer),
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    if active {
        table.write_back()?;
    }
    let engine = table.engine();
    let upper = content_layer(engine, &upper)?;
    let export = match lower {
        None => Export::Changes {
            layer: upper,
            parent: String::new(),
        },
        Some(lower) => {
            let lower = content_layer(engine, &lower)?;
            let parent = engine
                .layer_info(&upper)
                .map_err(|e| Error::engine(format!("layer {upper}"), e))?
                .parent;
            if lower == upper {
                Export::Empty
            } else if parent.as_deref() == Some(lower.as_str()) {
                Export::Changes {
                    layer: upper,
                    parent: lower,
                }
            } else {
                return Ok(None);
            }
        }
    };
    Ok(Some(Plan {
        export,
        gzip,
        media_type,
        key,
    }))
}

/// The layer holding what `layer` shows: itself, or, while a layer changed
/// nothing against its parent (a view, an active nobody wrote to), that
/// parent.
fn content_layer(engine: &Engine, layer: &str) -> Result<String> {
    let mut name = layer.to_string();
    for _ in 0..MAX_EMPTY_STEPS {
        let info = engine
            .layer_info(&name)
            .map_err(|e| Error::engine(format!("layer {name}"), e))?;
        let Some(parent) = info.parent else { break };
        let changes = engine
            .layer_changes(&name)
            .map_err(|e| Error::engine(format!("the changes of layer {name}"), e))?;
        if !changes.is_empty() {
            break;
        }
        name = parent;
    }
    Ok(name)
}

/// Counts and hashes what passes through.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Sends what is written as chunks of CHUNK_BYTES to the content writer.
struct Chunks {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Chunks {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::other("the content write stopped"))
    }
}

impl Write for Chunks {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&buf[..n]);
        if self.buf.len() == CHUNK_BYTES {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the tar (compressed if asked) into `tx`; returns its digests.
fn produce(
    engine: &Engine,
    export: &Export,
    gzip: bool,
    tx: mpsc::Sender<Vec<u8>>,
) -> Result<Produced> {
    let chunks = Hashing {
        inner: Chunks {
            tx,
            buf: Vec::with_capacity(CHUNK_BYTES),
        },
        hasher: Sha256::new(),
        count: 0,
    };
    let write_tar = |out: &mut dyn Write| -> Result<()> {
        match export {
            Export::Changes { layer, parent } => {
                lcfs_dockerplugin::export_diff(engine, layer, parent, out).map_err(Error::Export)
            }
            Export::Empty => tar::Builder::new(out)
                .finish()
                .map_err(|e| Error::io("writing an empty tar", e)),
        }
    };
    let io = |e| Error::io("writing the diff", e);
    let (mut sink, uncompressed) = if gzip {
        let mut tar = Hashing {
            inner: flate2::write::GzEncoder::new(chunks, flate2::Compression::default()),
            hasher: Sha256::new(),
            count: 0,
        };
        write_tar(&mut tar)?;
        let digest: [u8; 32] = tar.hasher.finalize().into();
        (tar.inner.finish().map_err(io)?, Some(digest))
    } else {
        let mut sink = chunks;
        write_tar(&mut sink)?;
        (sink, None)
    };
    sink.inner.send().map_err(io)?;
    Ok(Produced {
        digest: sink.hasher.finalize().into(),
        size: sink.count,
        uncompressed,
    })
}

/// An id no other call of this process uses.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `t` as RFC 3339 in UTC (whole seconds), as containerd parses
/// `containerd.io/gc.expire`.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Sets the namespace (and lease) headers containerd reads.
fn with_headers<T>(message: T, namespace: &str, lease: Option<&str>) -> Result<Request<T>> {
    let mut r = Request::new(message);
    let bad = |what: &str| Error::InvalidArgument(format!("bad {what} header"));
    r.metadata_mut().insert(
        NAMESPACE_HEADER,
        namespace.parse().map_err(|_| bad("namespace"))?,
    );
    if let Some(lease) = lease {
        r.metadata_mut()
            .insert(LEASE_HEADER, lease.parse().map_err(|_| bad("lease"))?);
    }
    Ok(r)
}

impl DiffService {
    pub(crate) async fn compare(&self, r: DiffRequest) -> Result<DiffResponse> {
        let table = self.table.clone();
        let request = r.clone();
        let plan = tokio::task::spawn_blocking(move || plan(&table, &request))
            .await
            .map_err(|e| Error::io("diff task", io::Error::other(e.to_string())))??;
        let Some(plan) = plan else {
            return Err(Error::Unimplemented(
                "lcfs compares only its own snapshots, a clone against its parent layer, \
                 into an OCI layer tar (plain or gzip)"
                    .into(),
            ));
        };
        let namespace = plan
            .key
            .split_once('/')
            .map(|(ns, _)| ns.to_string())
            .filter(|ns| !ns.is_empty() && ns.len() <= NAMESPACE_MAX_BYTES)
            .ok_or_else(|| {
                Error::Unimplemented(format!(
                    "snapshot {:?} names no namespace to write the diff in",
                    clip(&plan.key)
                ))
            })?;
        let reference = if r.r#ref.is_empty() || r.r#ref.len() > REF_MAX_BYTES {
            unique("lcfs-diff")
        } else {
            r.r#ref.clone()
        };
        let started = Instant::now();
        let channel = self.connect().await?;
        let lease = unique("lcfs-diff");
        let mut labels = HashMap::new();
        labels.insert(
            LEASE_EXPIRE_LABEL.to_string(),
            rfc3339(SystemTime::now() + LEASE_LIFETIME),
        );
        LeasesClient::new(channel.clone())
            .create(with_headers(
                CreateRequest {
                    id: lease.clone(),
                    labels,
                },
                &namespace,
                None,
            )?)
            .await
            .map_err(Error::ContentWrite)?;
        let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
        let engine = self.table.engine().clone();
        let (export, gzip) = (plan.export, plan.gzip);
        let producer = tokio::task::spawn_blocking(move || {
            let r = produce(&engine, &export, gzip, tx);
            (r, export)
        });
        let mut content = ContentClient::new(channel);
        let written =
            write_content(&mut content, &namespace, &lease, &reference, rx, producer).await;
        let (produced, export) = match written {
            Ok(p) => p,
            Err(e) => {
                if let Ok(abort) = with_headers(
                    AbortRequest {
                        r#ref: reference.clone(),
                    },
                    &namespace,
                    Some(&lease),
                ) {
                    let _ = content.abort(abort).await;
                }
                log::warn!("containerd diff of snapshot {:?}: {e}", plan.key);
                return Err(e);
            }
        };
        let digest = format!("sha256:{}", hex(&produced.digest));
        log::info!(
            "containerd diff: computed {digest} ({}, {} bytes) of snapshot {:?} ({}) in {:.2} s",
            plan.media_type,
            produced.size,
            plan.key,
            match &export {
                Export::Changes { layer, parent } if parent.is_empty() =>
                    format!("all of layer {layer}"),
                Export::Changes { layer, parent } => format!("layer {layer} against {parent}"),
                Export::Empty => "no change".into(),
            },
            started.elapsed().as_secs_f64()
        );
        Ok(DiffResponse {
            diff: Some(Descriptor {
                media_type: plan.media_type.into(),
                digest,
                size: i64::try_from(produced.size).unwrap_or(i64::MAX),
                annotations: Default::default(),
            }),
        })
    }
}

type Producer = tokio::task::JoinHandle<(Result<Produced>, Export)>;

/// Streams the chunks into the content store under `reference` and
/// commits them with the digest the producer found.
async fn write_content(
    content: &mut ContentClient<tonic::transport::Channel>,
    namespace: &str,
    lease: &str,
    reference: &str,
    mut chunks: mpsc::Receiver<Vec<u8>>,
    producer: Producer,
) -> Result<(Produced, Export)> {
    let (requests, rx) = mpsc::channel::<WriteContentRequest>(2);
    let message = |action: WriteAction| WriteContentRequest {
        action: action as i32,
        r#ref: reference.to_string(),
        ..Default::default()
    };
    let closed = || Error::Unavailable("containerd closed the content write".into());
    requests
        .send(message(WriteAction::Stat))
        .await
        .map_err(|_| closed())?;
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut responses = content
        .write(with_headers(stream, namespace, Some(lease))?)
        .await
        .map_err(Error::ContentWrite)?
        .into_inner();
    let mut next = async || -> Result<crate::api::content::WriteContentResponse> {
        match tokio::time::timeout(CONTENT_MESSAGE_TIMEOUT, responses.message()).await {
            Err(_) => Err(Error::Unavailable(
                "containerd's content write timed out".into(),
            )),
            Ok(Err(status)) => Err(Error::ContentWrite(status)),
            Ok(Ok(None)) => Err(closed()),
            Ok(Ok(Some(r))) => Ok(r),
        }
    };
    next().await?;
    let mut offset = 0i64;
    while let Some(data) = chunks.recv().await {
        let len = data.len() as i64;
        let mut m = message(WriteAction::Write);
        m.offset = offset;
        m.data = data;
        requests.send(m).await.map_err(|_| closed())?;
        offset += len;
        let r = next().await?;
        if r.offset != offset {
            return Err(Error::Unavailable(format!(
                "containerd's content write is at {} after {offset} bytes",
                r.offset
            )));
        }
    }
    let (produced, export) = producer
        .await
        .map_err(|e| Error::io("diff task", io::Error::other(e.to_string())))?;
    let produced = produced?;
    let mut m = message(WriteAction::Commit);
    m.offset = offset;
    m.total = offset;
    m.expected = format!("sha256:{}", hex(&produced.digest));
    if let Some(u) = produced.uncompressed {
        m.labels
            .insert(UNCOMPRESSED_LABEL.into(), format!("sha256:{}", hex(&u)));
    }
    requests.send(m).await.map_err(|_| closed())?;
    match next().await {
        Ok(_) => {}
        // The same bytes are there already: as good.
        Err(Error::ContentWrite(s)) if s.code() == tonic::Code::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    Ok((produced, export))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_times_read_as_rfc3339() {
        let at = |s: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_796_428_800 + 3_723), "2026-12-05T01:02:03Z");
    }
}
