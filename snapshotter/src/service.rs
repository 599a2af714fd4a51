//! The gRPC service: decodes each call, runs it on the table in a blocking
//! thread (engine calls take locks and may wait for the device), encodes
//! the answer or the error code containerd expects.

use crate::api::snapshots::snapshots_server::Snapshots;
use crate::api::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info, Kind as ApiKind, ListSnapshotsRequest,
    ListSnapshotsResponse, MountsRequest, MountsResponse, PrepareSnapshotRequest,
    PrepareSnapshotResponse, RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse,
    UpdateSnapshotRequest, UpdateSnapshotResponse, UsageRequest, UsageResponse,
    ViewSnapshotRequest, ViewSnapshotResponse,
};
use crate::api::types::Mount;
use crate::error::{Error, Result};
use crate::filter::Filters;
use crate::table::{BindMount, Kind, SnapshotInfo, Table};
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// List answers in messages of about this many bytes (at least one snapshot
/// each), well under gRPC's default 4 MiB message bound.
const LIST_BATCH_BYTES: usize = 512 << 10;

pub struct Service {
    pub(crate) table: Arc<Table>,
}

/// Runs snapshotter call `call` on the blocking pool; its duration is
/// logged at debug level.
async fn blocking<T: Send + 'static>(
    call: &'static str,
    table: &Arc<Table>,
    f: impl FnOnce(&Table) -> Result<T> + Send + 'static,
) -> std::result::Result<T, Status> {
    let table = table.clone();
    let start = std::time::Instant::now();
    let r = tokio::task::spawn_blocking(move || f(&table)).await;
    log::debug!(
        "snapshotter {call}: {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            log::debug!("snapshotter {call} failed: {e}");
            Err(e.into())
        }
        Err(e) => Err(Status::internal(format!("snapshotter task failed: {e}"))),
    }
}

fn labels(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn mounts(m: BindMount) -> Vec<Mount> {
    vec![Mount {
        r#type: "bind".into(),
        source: m.source.to_string_lossy().into_owned(),
        target: String::new(),
        options: vec!["rbind".into(), if m.read_only { "ro" } else { "rw" }.into()],
    }]
}

fn timestamp(t: lcfs_engine::Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.seconds,
        nanos: t.nanoseconds as i32,
    }
}

fn info(i: SnapshotInfo) -> Info {
    Info {
        name: i.name,
        parent: i.parent,
        kind: match i.kind {
            Kind::View => ApiKind::View,
            Kind::Active => ApiKind::Active,
            Kind::Committed => ApiKind::Committed,
        } as i32,
        created_at: Some(timestamp(i.created)),
        updated_at: Some(timestamp(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

type ListStream = Pin<
    Box<dyn tokio_stream::Stream<Item = std::result::Result<ListSnapshotsResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<PrepareSnapshotRequest>,
    ) -> std::result::Result<Response<PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let m = blocking("Prepare", &self.table, move |t| {
            t.create(Kind::Active, &r.key, &r.parent, labels(r.labels))
        })
        .await?;
        Ok(Response::new(PrepareSnapshotResponse { mounts: mounts(m) }))
    }

    async fn view(
        &self,
        request: Request<ViewSnapshotRequest>,
    ) -> std::result::Result<Response<ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let m = blocking("View", &self.table, move |t| {
            t.create(Kind::View, &r.key, &r.parent, labels(r.labels))
        })
        .await?;
        Ok(Response::new(ViewSnapshotResponse { mounts: mounts(m) }))
    }

    async fn mounts(
        &self,
        request: Request<MountsRequest>,
    ) -> std::result::Result<Response<MountsResponse>, Status> {
        let r = request.into_inner();
        let m = blocking("Mounts", &self.table, move |t| t.mounts(&r.key)).await?;
        Ok(Response::new(MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(
        &self,
        request: Request<CommitSnapshotRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let r = request.into_inner();
        blocking("Commit", &self.table, move |t| {
            // containerd 2.1's commit onto another parent (rebase) is not
            // offered; naming the active's own parent is harmless.
            if !r.parent.is_empty() && t.stat(&r.key).map(|i| i.parent)? != r.parent {
                return Err(Error::Unimplemented(
                    "committing onto another parent (rebase) is not supported".into(),
                ));
            }
            t.commit(&r.name, &r.key, labels(r.labels))
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<RemoveSnapshotRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let r = request.into_inner();
        blocking("Remove", &self.table, move |t| t.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<StatSnapshotRequest>,
    ) -> std::result::Result<Response<StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let i = blocking("Stat", &self.table, move |t| t.stat(&r.key)).await?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    async fn update(
        &self,
        request: Request<UpdateSnapshotRequest>,
    ) -> std::result::Result<Response<UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let Some(i) = r.info else {
            return Err(Error::InvalidArgument("update without info".into()).into());
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.len() > crate::table::LABELS_MAX_COUNT + 1 {
            return Err(Error::InvalidArgument("too many update paths".into()).into());
        }
        let updated = blocking("Update", &self.table, move |t| {
            t.update(&i.name, labels(i.labels), &paths)
        })
        .await?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(info(updated)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> std::result::Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let all = blocking("List", &self.table, move |t| {
            let filters = Filters::parse(&r.filters)?;
            Ok(t.list(&filters))
        })
        .await?;
        let mut batches = Vec::new();
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        for i in all {
            let size = i.name.len()
                + i.parent.len()
                + i.labels
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 8)
                    .sum::<usize>()
                + 64;
            if !batch.is_empty() && bytes + size > LIST_BATCH_BYTES {
                batches.push(Ok(ListSnapshotsResponse {
                    info: std::mem::take(&mut batch),
                }));
                bytes = 0;
            }
            bytes += size;
            batch.push(info(i));
        }
        if !batch.is_empty() {
            batches.push(Ok(ListSnapshotsResponse { info: batch }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<UsageRequest>,
    ) -> std::result::Result<Response<UsageResponse>, Status> {
        let r = request.into_inner();
        let u = blocking("Usage", &self.table, move |t| t.usage(&r.key)).await?;
        Ok(Response::new(UsageResponse {
            size: i64::try_from(u.size_bytes).unwrap_or(i64::MAX),
            inodes: i64::try_from(u.inodes).unwrap_or(i64::MAX),
        }))
    }

    async fn cleanup(
        &self,
        _request: Request<CleanupRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let freed = blocking("Cleanup", &self.table, |t| t.cleanup()).await?;
        if freed > 0 {
            log::info!("cleanup freed {freed} removed snapshot layer(s)");
        }
        Ok(Response::new(()))
    }
}
