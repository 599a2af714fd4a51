//! The GraphDriver methods, independent of HTTP: each takes the request
//! body Docker sent and answers with the JSON Docker 20.10 expects
//! (moby `daemon/graphdriver/proxy.go`). Docker ids are engine layer names.
//!
//! Layer mapping:
//! - Create(ID, Parent) clones Parent into a cold layer (image layers are
//!   written once); without Parent it makes an empty cold layer. Create'd
//!   layers stay writable until they have children (ApplyDiff and BuildKit
//!   write into them); a clone freezes its parent, Docker's invariant too.
//! - CreateReadWrite does the same in the hot log (container layers).
//! - Create, CreateReadWrite and Remove are durable when they answer.
//! - Remove is idempotent, like overlay2's: an id that does not exist is
//!   already removed (Docker calls Remove after a failed ApplyDiff, which
//!   has already discarded the layer).

use crate::error::{Error, Result};
use crate::export::{self, kind_code, layer_error};
use lcfs_engine::Engine;
use lcfs_fsfront::{KernelCache, LayerError, LayerOps};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The state of the graphdriver: the engine, where its layers are mounted,
/// and the Get/Put reference counts.
pub struct Driver {
    /// The engine, and the mount's cache kept right as layers change.
    layers: LayerOps,
    mountpoint: PathBuf,
    /// Per layer: Gets not yet Put, and when the first of them came.
    references: Mutex<HashMap<String, (u32, SystemTime)>>,
    busy: Mutex<HashSet<String>>,
    /// The layers Diff was last asked for, newest first: the candidates to
    /// lend their blocks to the ApplyDiff of a commit (docs/docker.md).
    recent_diffs: Mutex<VecDeque<String>>,
    /// The size limit of container layers created without one of their own
    /// (`dockerd --storage-opt size=...`, given at Init).
    default_size_limit: Mutex<Option<u64>>,
}

/// How many recently diffed layers ApplyDiff considers as lenders.
const RECENT_DIFFS: usize = 8;

#[derive(Deserialize, Default)]
#[serde(default)]
struct IdRequest {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Parent")]
    parent: String,
    #[serde(rename = "MountLabel")]
    #[allow(dead_code)]
    mount_label: String,
    #[serde(rename = "StorageOpt")]
    storage_opt: Option<HashMap<String, String>>,
}

/// Docker's idtools.IDMap: its JSON keys are snake_case (the plugin docs
/// show CamelCase; the Go struct tags win).
#[derive(Deserialize, Debug, PartialEq, Eq)]
struct IdMap {
    container_id: i64,
    host_id: i64,
    size: i64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct InitRequest {
    #[serde(rename = "Home")]
    home: String,
    #[serde(rename = "Opts")]
    opts: Option<Vec<String>>,
    #[serde(rename = "UIDMaps")]
    uid_maps: Option<Vec<IdMap>>,
    #[serde(rename = "GIDMaps")]
    gid_maps: Option<Vec<IdMap>>,
}

/// Marks an id busy for the length of one mutating call.
struct BusyGuard<'a> {
    busy: &'a Mutex<HashSet<String>>,
    id: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

fn parse<T: for<'de> Deserialize<'de> + Default>(method: &str, body: &[u8]) -> Result<T> {
    // Docker sends `null` (or nothing) for methods without arguments.
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() || trimmed == b"null" {
        return Ok(T::default());
    }
    serde_json::from_slice(trimmed).map_err(|e| Error::BadRequest {
        method: method.to_string(),
        detail: e.to_string(),
    })
}

/// Checks an id can name a layer directory (Docker sends 64 hex digits,
/// possibly with "-init").
fn check_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 255
        || id.contains('/')
        || id.contains('\0')
        || id == "."
        || id == ".."
    {
        return Err(Error::InvalidId(id.to_string()));
    }
    Ok(())
}

impl Driver {
    /// A driver over `engine`, whose layers are mounted at `mountpoint`
    /// (`<mountpoint>/<id>` is what Get returns).
    pub fn new(engine: Arc<Engine>, mountpoint: &Path, kernel: Arc<dyn KernelCache>) -> Driver {
        Driver {
            layers: LayerOps::new(engine, kernel),
            mountpoint: mountpoint.to_path_buf(),
            references: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashSet::new()),
            recent_diffs: Mutex::new(VecDeque::new()),
            default_size_limit: Mutex::new(None),
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        self.layers.engine()
    }

    /// How many Gets of `id` are not yet Put.
    pub fn references(&self, id: &str) -> u32 {
        self.lock_references().get(id).map_or(0, |r| r.0)
    }

    /// The layers Got and not yet Put (containers running, for Docker),
    /// each with the time of its first outstanding Get.
    pub fn mounted(&self) -> Vec<(String, SystemTime)> {
        self.lock_references()
            .iter()
            .map(|(id, r)| (id.clone(), r.1))
            .collect()
    }

    fn lock_references(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u32, SystemTime)>> {
        self.references.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn claim(&self, id: &str) -> Result<BusyGuard<'_>> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(id.to_string()) {
            return Err(Error::Busy(id.to_string()));
        }
        Ok(BusyGuard {
            busy: &self.busy,
            id: id.to_string(),
        })
    }

    fn dir(&self, id: &str) -> String {
        self.mountpoint.join(id).to_string_lossy().into_owned()
    }

    /// Answers one JSON method (`Plugin.Activate` or `GraphDriver.*` except
    /// Diff and ApplyDiff, which stream). Errors become `{"Err": ...}`.
    pub fn call(&self, method: &str, body: &[u8]) -> Value {
        match self.dispatch(method, body) {
            Ok(v) => v,
            Err(e) => {
                log::warn!("{method}: {e}");
                json!({ "Err": e.to_string() })
            }
        }
    }

    fn dispatch(&self, method: &str, body: &[u8]) -> Result<Value> {
        let e = self.engine();
        match method {
            "Plugin.Activate" => Ok(json!({ "Implements": ["GraphDriver"] })),
            "GraphDriver.Init" => {
                let r: InitRequest = parse(method, body)?;
                let identity = |m: &Option<Vec<IdMap>>| m.as_deref().unwrap_or_default().is_empty();
                if !identity(&r.uid_maps) || !identity(&r.gid_maps) {
                    return Err(Error::Unsupported(
                        "lcfs does not support user namespace remapping; start dockerd \
                         without --userns-remap"
                            .into(),
                    ));
                }
                let opts = r.opts.unwrap_or_default();
                let mut default_size = None;
                for opt in &opts {
                    let (key, value) = opt.split_once('=').unwrap_or((opt, ""));
                    match key.trim().to_ascii_lowercase().as_str() {
                        "size" | "lcfs.size" => default_size = size_limit(value)?,
                        other => {
                            return Err(Error::BadOption(format!(
                                "unknown storage option {other:?} (lcfs knows size=)"
                            )))
                        }
                    }
                }
                *self
                    .default_size_limit
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = default_size;
                log::info!("GraphDriver.Init home {:?} options {opts:?}", r.home);
                Ok(json!({}))
            }
            "GraphDriver.Create" | "GraphDriver.CreateReadWrite" => {
                let r: IdRequest = parse(method, body)?;
                check_id(&r.id)?;
                let cold = method == "GraphDriver.Create";
                let mut limit = None;
                for (key, value) in r.storage_opt.iter().flatten() {
                    match key.trim().to_ascii_lowercase().as_str() {
                        "size" => limit = size_limit(value)?,
                        other => {
                            return Err(Error::BadOption(format!(
                                "unknown storage option {other:?} (lcfs knows size=)"
                            )))
                        }
                    }
                }
                let explicit = r
                    .storage_opt
                    .as_ref()
                    .is_some_and(|o| o.keys().any(|k| k.trim().eq_ignore_ascii_case("size")));
                if !explicit && !cold {
                    limit = *self
                        .default_size_limit
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                }
                let _guard = self.claim(&r.id)?;
                let parent = Some(r.parent.as_str()).filter(|p| !p.is_empty());
                self.layers
                    .create(&r.id, parent, cold)
                    .map_err(|err| match err {
                        LayerError::Engine(lcfs_engine::Error::NotFound) => {
                            Error::UnknownLayer(r.parent.clone())
                        }
                        LayerError::Engine(lcfs_engine::Error::Exists) => Error::engine(
                            format!("creating layer {:?}", r.id),
                            lcfs_engine::Error::Exists,
                        ),
                        err => layer_op_error(
                            format!("creating layer {:?} from {:?}", r.id, r.parent),
                            err,
                        ),
                    })?;
                if let Some(bytes) = limit {
                    if let Err(e) = self.engine().set_layer_quota(&r.id, Some(bytes)) {
                        if let Err(e) = self.layers.remove(&r.id) {
                            log::error!(
                                "removing layer {:?} after its size limit failed: {e}",
                                r.id
                            );
                        }
                        return Err(Error::engine(
                            format!("setting the size limit of layer {:?}", r.id),
                            e,
                        ));
                    }
                }
                self.make_durable(&r.id)?;
                Ok(json!({}))
            }
            "GraphDriver.Remove" => {
                let r: IdRequest = parse(method, body)?;
                check_id(&r.id)?;
                let _guard = self.claim(&r.id)?;
                self.remove(&r.id)?;
                self.make_durable(&r.id)?;
                Ok(json!({}))
            }
            "GraphDriver.Get" => {
                let r: IdRequest = parse(method, body)?;
                check_id(&r.id)?;
                let mut refs = self.lock_references();
                e.layer_id(&r.id).map_err(|err| layer_error(&r.id, err))?;
                refs.entry(r.id.clone()).or_insert((0, SystemTime::now())).0 += 1;
                Ok(json!({ "Dir": self.dir(&r.id) }))
            }
            "GraphDriver.Put" => {
                let r: IdRequest = parse(method, body)?;
                check_id(&r.id)?;
                let mut refs = self.lock_references();
                match refs.get_mut(&r.id) {
                    Some((n, _)) if *n > 1 => *n -= 1,
                    Some(_) => {
                        refs.remove(&r.id);
                    }
                    None => {
                        // Docker Puts what it got before a plugin restart:
                        // nothing to release, but the layer must exist.
                        e.layer_id(&r.id).map_err(|err| layer_error(&r.id, err))?;
                        log::debug!("Put of {:?} without a Get", r.id);
                    }
                }
                Ok(json!({}))
            }
            "GraphDriver.Exists" => {
                let r: IdRequest = parse(method, body)?;
                Ok(json!({ "Exists": check_id(&r.id).is_ok() && e.layer_id(&r.id).is_ok() }))
            }
            "GraphDriver.Status" => {
                let s = e.stats();
                let pairs = [
                    ("Backing Filesystem", "lcfs".to_string()),
                    ("Mount", self.mountpoint.display().to_string()),
                    ("Layers", s.layers.to_string()),
                    ("Capacity Bytes", s.capacity_bytes.to_string()),
                    ("Live Bytes", s.live_bytes.to_string()),
                    ("I/O Backend", s.backend.to_string()),
                ];
                Ok(
                    json!({ "Status": pairs.iter().map(|(k, v)| [*k, v.as_str()]).collect::<Vec<_>>() }),
                )
            }
            "GraphDriver.GetMetadata" => {
                let r: IdRequest = parse(method, body)?;
                check_id(&r.id)?;
                let info = e.layer_info(&r.id).map_err(|err| layer_error(&r.id, err))?;
                Ok(json!({ "Metadata": {
                    "Dir": self.dir(&r.id),
                    "Layer": info.name,
                    "Parent": info.parent.unwrap_or_default(),
                    "Frozen": info.frozen.to_string(),
                    "Cold": info.cold.to_string(),
                    "Children": info.children.to_string(),
                    "OwnedBytes": info.owned_bytes.to_string(),
                    "SizeLimit": info.quota_bytes.map(|q| q.to_string()).unwrap_or_default(),
                    "Inodes": info.inode_count.to_string(),
                }}))
            }
            "GraphDriver.Cleanup" => {
                self.layers
                    .sync()
                    .map_err(|err| layer_op_error("syncing at Cleanup", err))?;
                Ok(json!({}))
            }
            "GraphDriver.Capabilities" => {
                // Nested, as moby's proxy decodes it (the docs show it flat).
                Ok(json!({ "Capabilities": { "ReproducesExactDiffs": false } }))
            }
            "GraphDriver.Changes" => {
                let r: IdRequest = parse(method, body)?;
                check_id(&r.id)?;
                self.write_back()?;
                let (changes, _) = export::changes(e, &r.id, &r.parent)?;
                let list: Vec<Value> = changes
                    .iter()
                    .map(|c| {
                        json!({
                            "Path": String::from_utf8_lossy(&c.path),
                            "Kind": kind_code(c.kind),
                        })
                    })
                    .collect();
                Ok(json!({ "Changes": list }))
            }
            "GraphDriver.DiffSize" => {
                let r: IdRequest = parse(method, body)?;
                check_id(&r.id)?;
                self.write_back()?;
                let (changes, _) = export::changes(e, &r.id, &r.parent)?;
                Ok(json!({ "Size": export::diff_size(e, &r.id, &changes)? }))
            }
            other => Err(Error::UnknownMethod(other.to_string())),
        }
    }

    /// Brings what the kernel caches of writes into the engine (see
    /// [`KernelCache::write_back`]).
    fn write_back(&self) -> Result<()> {
        self.layers
            .write_back()
            .map_err(|e| layer_op_error("before reading the layers", e))
    }

    /// Docker records a Create, CreateReadWrite or Remove as soon as it is
    /// answered, so the change is made durable first (one group-committed
    /// checkpoint): a layer lost to a kill -9 breaks the container Docker
    /// still has, and a removed layer that comes back is a child Docker
    /// cannot see, which keeps its parent from ever being removed.
    fn make_durable(&self, id: &str) -> Result<()> {
        self.engine()
            .sync()
            .map_err(|e| Error::engine(format!("making the change to layer {id:?} durable"), e))
    }

    fn remove(&self, id: &str) -> Result<()> {
        let held = self.lock_references().remove(id);
        if let Some((n, _)) = held {
            log::warn!("removing layer {id:?} while {n} Get(s) are not Put");
        }
        match self.layers.remove_unseen(id) {
            Ok(()) => Ok(()),
            Err(LayerError::Engine(lcfs_engine::Error::NotFound)) => {
                log::debug!("Remove of {id:?}: no such layer (already removed)");
                Ok(())
            }
            Err(LayerError::Engine(e @ lcfs_engine::Error::HasChildren { .. })) => {
                Err(Error::engine(
                    format!("removing layer {id:?} (remove the layers made from it first)"),
                    e,
                ))
            }
            Err(e) => Err(layer_op_error(format!("removing layer {id:?}"), e)),
        }
    }

    /// GraphDriver.Diff, part one: checks the request and lists the changes.
    /// Errors here are answered with a non-200 status (Diff's only way).
    pub fn prepare_diff(&self, body: &[u8]) -> Result<DiffPlan> {
        let r: IdRequest = parse("GraphDriver.Diff", body)?;
        check_id(&r.id)?;
        self.write_back()?;
        let (changes, against) = export::changes(self.engine(), &r.id, &r.parent)?;
        let mut recent = self.recent_diffs.lock().unwrap_or_else(|p| p.into_inner());
        recent.retain(|id| *id != r.id);
        recent.push_front(r.id.clone());
        recent.truncate(RECENT_DIFFS);
        drop(recent);
        Ok(DiffPlan {
            id: r.id,
            changes,
            against,
        })
    }

    /// GraphDriver.Diff, part two: streams the tar.
    pub fn write_diff(&self, plan: &DiffPlan, out: impl Write) -> Result<()> {
        export::write_diff(self.engine(), &plan.id, (&plan.changes, plan.against), out)
    }

    /// GraphDriver.ApplyDiff: unpacks `stream` into layer `id` (made by
    /// Create). On failure the layer is removed, so no half-made layer is
    /// left (the engine cannot rename layers, so there is no staging layer
    /// to swap in; Docker removes the layer after a failed ApplyDiff anyway,
    /// and Remove of a missing id succeeds).
    pub fn apply_diff(&self, id: &str, parent: &str, stream: impl Read) -> Value {
        match self.try_apply_diff(id, parent, stream) {
            Ok(size) => json!({ "Size": size }),
            Err(e) => {
                log::warn!("GraphDriver.ApplyDiff {id:?}: {e}");
                json!({ "Err": e.to_string() })
            }
        }
    }

    fn try_apply_diff(&self, id: &str, parent: &str, stream: impl Read) -> Result<u64> {
        check_id(id)?;
        let _guard = self.claim(id)?;
        let engine = self.engine();
        let info = engine.layer_info(id).map_err(|e| layer_error(id, e))?;
        if info.frozen || info.children > 0 {
            return Err(Error::engine(
                format!("applying a diff to layer {id:?}"),
                lcfs_engine::Error::ReadOnly,
            ));
        }
        if !parent.is_empty() && info.parent.as_deref() != Some(parent) {
            return Err(Error::Unsupported(format!(
                "ApplyDiff names parent {parent:?} but layer {id:?} was created from {:?}",
                info.parent.unwrap_or_default()
            )));
        }
        let lender = self.lender(parent);
        let mut stream = crate::apply::Sha256Reader::new(stream);
        let started = std::time::Instant::now();
        let result = crate::apply::apply(engine, info.id, lender, &mut stream)
            .and_then(|size| drain_trailing(&mut stream).map(|_| size))
            // What Docker calls the layer's DiffID: the tar as applied.
            .and_then(|size| {
                crate::apply::record_diff_id(engine, id, &stream.digest())
                    .map_err(|e| Error::engine(format!("recording the DiffID of {id:?}"), e))
                    .map(|_| size)
            })
            // The pull's share of the statistics (docs/statistics.md).
            .and_then(|size| {
                engine
                    .record_apply(info.id, size, started.elapsed())
                    .map_err(|e| Error::engine(format!("recording the apply of {id:?}"), e))
                    .map(|_| size)
            })
            // Docker records the layer as soon as we answer: it must
            // survive a crash from then on (one group-committed checkpoint).
            .and_then(|size| {
                engine
                    .sync()
                    .map_err(|e| Error::engine(format!("syncing layer {id:?}"), e))
                    .map(|_| size)
            });
        if result.is_err() {
            self.lock_references().remove(id);
            if let Err(e) = engine.remove_layer(id) {
                log::error!("discarding half-applied layer {id:?}: {e}");
            }
        }
        self.layers.filled(id);
        result
    }
}

impl Driver {
    /// The layer that may lend its blocks to an ApplyDiff onto `parent`:
    /// the most recently diffed layer descending from `parent` (a commit
    /// diffs container C, whose chain is C, C-init, image top, then applies
    /// that tar onto a new layer whose parent is the image top). Content is
    /// still checked block by block; this only picks where to look.
    fn lender(&self, parent: &str) -> Option<u64> {
        if parent.is_empty() {
            return None;
        }
        let recent: Vec<String> = self
            .recent_diffs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        recent.into_iter().find_map(|candidate| {
            let info = self.engine().layer_info(&candidate).ok()?;
            let mut at = info.parent.clone();
            // Docker's chains are container -> init -> image: a few hops.
            for _ in 0..16 {
                let name = at?;
                if name == parent {
                    return Some(info.id);
                }
                at = self.engine().layer_info(&name).ok()?.parent;
            }
            None
        })
    }
}

/// The most ApplyDiff reads after the tar's end-of-archive marker. Tar pads
/// its last record with zeros (10 KiB by default, up to a few MiB with a
/// large blocking factor); anything beyond this is not a tar.
const MAX_TRAILING_BYTES: u64 = 64 << 20;

/// Reads the rest of an ApplyDiff body after the tar's end-of-archive
/// marker. Docker records the stream it sends as it goes (tar-split) and
/// rebuilds every later `docker save` of the layer from that record; the
/// plugin proxy stops feeding it once the plugin answers, so bytes left
/// unread (the record padding) are missing from the record and the saved
/// layer fails Docker's digest check ("could not verify layer data").
fn drain_trailing(stream: &mut impl Read) -> Result<u64> {
    let drained = std::io::copy(
        &mut stream.take(MAX_TRAILING_BYTES + 1),
        &mut std::io::sink(),
    )
    .map_err(|e| Error::BadRequest {
        method: "GraphDriver.ApplyDiff".into(),
        detail: format!("reading the stream after the end of the archive: {e}"),
    })?;
    if drained > MAX_TRAILING_BYTES {
        return Err(Error::BadRequest {
            method: "GraphDriver.ApplyDiff".into(),
            detail: format!(
                "more than {} MiB follow the end of the archive",
                MAX_TRAILING_BYTES >> 20
            ),
        });
    }
    Ok(drained)
}

/// What a Diff will write, decided before the 200 status goes out.
pub struct DiffPlan {
    id: String,
    changes: Vec<lcfs_engine::Change>,
    against: export::Against,
}

/// A `size` storage option (see [`lcfs_fsfront::parse_size_limit`]).
fn size_limit(text: &str) -> Result<Option<u64>> {
    lcfs_fsfront::parse_size_limit(text).map_err(Error::BadOption)
}

/// A failed layer operation as a plugin error.
fn layer_op_error(context: impl Into<String>, e: LayerError) -> Error {
    match e {
        LayerError::Engine(e) => Error::engine(context, e),
        LayerError::WriteBack(e) => Error::io(
            format!(
                "{}: writing the mount's cached writes back to the layers",
                context.into()
            ),
            e,
        ),
        e => Error::io(context, std::io::Error::other(e)),
    }
}
