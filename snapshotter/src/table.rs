//! The snapshot table: containerd snapshots as engine layers.
//!
//! Each snapshot is one layer named `containerd-<n>` (a counter: keys are
//! arbitrary strings and never become paths). Its metadata holds the
//! snapshot's key, kind, labels and times; an index in memory maps keys to
//! layers and is rebuilt from the metadata at start. Every changing call
//! changes the layer and its metadata in one engine change and syncs before
//! it answers, so what containerd was told survives a crash.
//!
//! Invariants (those of containerd's own metastore, `snapshots/storage`):
//! keys and committed names share one namespace; a parent is committed; a
//! snapshot with children is not removed; only an active is committed.

use crate::error::{Error, Result};
use crate::filter::Filters;
use lcfs_engine::{Engine, LayerMetadata, Timestamp};
use lcfs_fsfront::{KernelCache, LayerError, LayerOps};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// The longest snapshot key or committed name accepted, in bytes.
pub const KEY_MAX_BYTES: usize = 4096;
/// containerd's bound on one label: key and value together, in bytes.
pub const LABEL_MAX_BYTES: usize = 4096;
/// Labels per snapshot, and their key and value bytes all together: well
/// inside the engine's bound on one layer's metadata.
pub const LABELS_MAX_COUNT: usize = 1024;
pub const LABELS_MAX_BYTES: usize = 128 << 10;

/// Layer names: this prefix and a counter.
const LAYER_PREFIX: &str = "containerd-";
/// Metadata keys. A layer is a snapshot when it has `META_KIND`.
const META_KEY: &str = "containerd.key";
const META_KIND: &str = "containerd.kind";
const META_CREATED: &str = "containerd.created";
const META_UPDATED: &str = "containerd.updated";
/// Set by Remove: the snapshot is gone, its layer waits to be freed.
const META_REMOVED: &str = "containerd.removed";
const META_LABEL_PREFIX: &str = "containerd.label.";
// The largest metadata a snapshot can have (labels with their prefix and
// the engine's 8 length bytes each, the key, times, kind) fits the engine's
// bound, so a change that passed our checks is never refused by the engine.
const _: () = assert!(
    LABELS_MAX_BYTES + LABELS_MAX_COUNT * (8 + META_LABEL_PREFIX.len()) + KEY_MAX_BYTES + 1024
        < lcfs_engine::MAX_METADATA_BYTES
);
/// The label containerd's unpacker puts on the snapshots it extracts image
/// layers into: their data goes to the cold log.
const LABEL_TARGET_REF: &str = "containerd.io/snapshot.ref";
/// How containerd's unpacker begins the keys of the snapshots it applies
/// layers into (snapshots.UnpackKeyPrefix).
const UNPACK_KEY_PREFIX: &str = "extract-";
/// The most bytes an active snapshot's layer may own, in Docker's size
/// units (`64M`); containerd passes `containerd.io/snapshot/` labels on to
/// the snapshotter (`ctr run --snapshotter-label ...`, CRI).
pub const LABEL_SIZE_LIMIT: &str = "containerd.io/snapshot/lcfs.size";
/// How often removed layers are freed when nobody calls Cleanup (and a
/// layer that was still mounted when it was removed is freed once it is
/// not).
const RECLAIM_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        match s {
            "view" => Some(Kind::View),
            "active" => Some(Kind::Active),
            "committed" => Some(Kind::Committed),
            _ => None,
        }
    }
}

/// What Stat answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    /// The parent's key, empty for none.
    pub parent: String,
    pub kind: Kind,
    pub labels: BTreeMap<String, String>,
    pub created: Timestamp,
    pub updated: Timestamp,
}

/// A bind mount of a snapshot's layer directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub read_only: bool,
}

/// What Usage answers: bytes the layer owns on the device and the inodes
/// it added over its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub size_bytes: u64,
    pub inodes: u64,
}

#[derive(Clone, Debug)]
struct Entry {
    layer: String,
    parent: Option<String>,
    kind: Kind,
    labels: BTreeMap<String, String>,
    created: Timestamp,
    updated: Timestamp,
    children: u32,
}

#[derive(Default)]
struct State {
    by_key: HashMap<String, Entry>,
    /// Layers of removed snapshots not yet freed.
    pending: BTreeSet<String>,
    next_layer: u64,
    /// Layers of actives a Diff Apply is writing into: not committed until
    /// it ends.
    applying: HashSet<String>,
    /// Layers of actives an Apply failed on: they hold part of a tar and
    /// are never committed (containerd removes them; see diff.rs).
    failed_applies: HashSet<String>,
}

pub struct Table {
    /// The engine and the mount's cache, kept right as layers change.
    layers: LayerOps,
    mountpoint: PathBuf,
    state: Mutex<State>,
    stop: Mutex<bool>,
    wake: Condvar,
    /// Mounts image layers lazily (containerd's remote snapshots).
    remote: std::sync::OnceLock<Arc<dyn RemoteLayers>>,
}

/// Layers mounted from a registry before their content is local (lazy
/// pull, docs/lazy.md): containerd's remote-snapshot protocol. When the
/// unpacker prepares the snapshot of an image layer (the label
/// `containerd.io/snapshot.ref` names the chain ID it will commit), a
/// `RemoteLayers` that wants the layer fills the new snapshot's layer with
/// the layer's tree (content absent, fetched on first read), the snapshot
/// is committed under the chain ID at once and Prepare answers
/// AlreadyExists: containerd then skips the download and the unpack.
pub trait RemoteLayers: Send + Sync {
    /// Whether the labels name a layer this may mount lazily (no I/O).
    fn wants(&self, labels: &BTreeMap<String, String>) -> bool;
    /// Builds the layer's tree in writable engine layer `layer`; an error
    /// (the layer is not seekable, the registry cannot be reached) means a
    /// normal pull, and the layer is discarded.
    fn populate(
        &self,
        layer: &str,
        labels: &BTreeMap<String, String>,
    ) -> std::result::Result<(), String>;
}

fn encode_time(t: Timestamp) -> String {
    format!("{}.{:09}", t.seconds, t.nanoseconds)
}

fn decode_time(s: Option<&String>) -> Timestamp {
    let parsed = s.and_then(|s| {
        let (secs, nanos) = s.split_once('.')?;
        Some(Timestamp {
            seconds: secs.parse().ok()?,
            nanoseconds: nanos.parse().ok().filter(|n| *n < 1_000_000_000)?,
        })
    });
    parsed.unwrap_or_default()
}

fn check_key(what: &str, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is empty")));
    }
    if key.len() > KEY_MAX_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{what} is {} bytes, over {KEY_MAX_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

/// Checks labels against containerd's bound and ours; drops empty values
/// (containerd's stores treat an empty value as no label).
fn check_labels(labels: BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    let mut total = 0usize;
    for (k, v) in &labels {
        let len = k.len() + v.len();
        if len > LABEL_MAX_BYTES {
            return Err(Error::InvalidArgument(format!(
                "label key and value length ({len} bytes) greater than maximum size \
                 ({LABEL_MAX_BYTES} bytes), key: {}",
                k.chars().take(64).collect::<String>()
            )));
        }
        total += len;
    }
    let labels: BTreeMap<String, String> =
        labels.into_iter().filter(|(_, v)| !v.is_empty()).collect();
    if labels.len() > LABELS_MAX_COUNT {
        return Err(Error::InvalidArgument(format!(
            "{} labels, over {LABELS_MAX_COUNT}",
            labels.len()
        )));
    }
    if total > LABELS_MAX_BYTES {
        return Err(Error::InvalidArgument(format!(
            "labels take {total} bytes, over {LABELS_MAX_BYTES}"
        )));
    }
    Ok(labels)
}

/// Metadata keys that are lcfs's own (a DiffID), kept when the snapshot's
/// metadata is written again.
const LCFS_KEYS_PREFIX: &str = "lcfs.";

/// The label a committed snapshot carries once its layer is sealed: the
/// layer root (`sha256:<hex>`, docs/integrity.md), for a signer to record
/// next to an image signature.
pub const ROOT_LABEL: &str = "lcfs.io/layer.root";

fn metadata_of(key: &str, e: &Entry) -> LayerMetadata {
    let mut m = LayerMetadata::new();
    m.insert(META_KEY.into(), key.into());
    m.insert(META_KIND.into(), e.kind.as_str().into());
    m.insert(META_CREATED.into(), encode_time(e.created));
    m.insert(META_UPDATED.into(), encode_time(e.updated));
    for (k, v) in &e.labels {
        m.insert(format!("{META_LABEL_PREFIX}{k}"), v.clone());
    }
    m
}

impl Entry {
    fn info(&self, key: &str) -> SnapshotInfo {
        SnapshotInfo {
            name: key.to_string(),
            parent: self.parent.clone().unwrap_or_default(),
            kind: self.kind,
            labels: self.labels.clone(),
            created: self.created,
            updated: self.updated,
        }
    }
}

/// containerd's metadata store names each snapshot in the backend
/// snapshotter `<namespace>/<n>/<name>` (`metadata/snapshot.go`: n from a
/// sequence per namespace and snapshotter, so a later snapshot of the same
/// name has a larger n; namespaces hold no '/'). Split into the three; None
/// for keys made some other way (`ctr snapshots` on the proxy directly).
fn split_containerd_key(key: &str) -> Option<(&str, u64, &str)> {
    let (namespace, rest) = key.split_once('/')?;
    let (n, name) = rest.split_once('/')?;
    if namespace.is_empty() || name.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((namespace, n.parse().ok()?, name))
}

/// A failed layer operation as the snapshotter reports it.
fn layer_error(what: String, e: LayerError) -> Error {
    match e {
        LayerError::Engine(e) => Error::engine(what, e),
        LayerError::WriteBack(e) => Error::io(format!("{what}: writing back cached writes"), e),
        other => Error::io(what, std::io::Error::other(other.to_string())),
    }
}

impl Table {
    /// Rebuilds the table from the layers' metadata. Layers without
    /// snapshot metadata (the Docker plugin's, the command line's) are not
    /// snapshots and are left alone.
    pub fn open(
        engine: Arc<Engine>,
        mountpoint: &Path,
        kernel: Arc<dyn KernelCache>,
    ) -> Result<Table> {
        let mut state = State {
            next_layer: 1,
            ..State::default()
        };
        let layers = engine.list_layers();
        let mut key_of_layer: HashMap<String, String> = HashMap::new();
        let mut found: Vec<(String, Entry)> = Vec::new();
        for info in &layers {
            if let Some(n) = info
                .name
                .strip_prefix(LAYER_PREFIX)
                .and_then(|n| n.parse::<u64>().ok())
            {
                state.next_layer = state.next_layer.max(n.saturating_add(1));
            }
            let meta = engine
                .layer_metadata(&info.name)
                .map_err(|e| Error::engine(format!("reading layer {:?}", info.name), e))?;
            let Some(kind) = meta.get(META_KIND) else {
                continue;
            };
            let Some(kind) = Kind::parse(kind) else {
                log::warn!(
                    "layer {:?}: unknown snapshot kind {kind:?}; skipped",
                    info.name
                );
                continue;
            };
            if meta.contains_key(META_REMOVED) {
                state.pending.insert(info.name.clone());
                continue;
            }
            let Some(key) = meta.get(META_KEY) else {
                log::warn!("layer {:?}: snapshot without a key; skipped", info.name);
                continue;
            };
            // A crash between creating a view and freezing it leaves it
            // writable: finish the job.
            if kind != Kind::Active && !info.frozen {
                engine
                    .commit_layer(&info.name)
                    .map_err(|e| Error::engine(format!("freezing view {:?}", info.name), e))?;
            }
            let labels = meta
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix(META_LABEL_PREFIX)
                        .map(|k| (k.to_string(), v.clone()))
                })
                .collect();
            key_of_layer.insert(info.name.clone(), key.clone());
            found.push((
                key.clone(),
                Entry {
                    layer: info.name.clone(),
                    parent: info.parent.clone(), // a layer name until resolved below
                    kind,
                    labels,
                    created: decode_time(meta.get(META_CREATED)),
                    updated: decode_time(meta.get(META_UPDATED)),
                    children: 0,
                },
            ));
        }
        for (key, mut entry) in found {
            entry.parent = entry
                .parent
                .as_ref()
                .and_then(|layer| key_of_layer.get(layer).cloned());
            if state.by_key.insert(key.clone(), entry).is_some() {
                log::error!("two layers hold snapshot {key:?}; keeping the later one");
            }
        }
        let parents: Vec<String> = state
            .by_key
            .values()
            .filter_map(|e| e.parent.clone())
            .collect();
        for p in parents {
            if let Some(e) = state.by_key.get_mut(&p) {
                e.children += 1;
            }
        }
        log::info!(
            "containerd snapshots: {} ({} removed, waiting to be freed)",
            state.by_key.len(),
            state.pending.len()
        );
        Ok(Table {
            layers: LayerOps::new(engine, kernel),
            mountpoint: mountpoint.to_path_buf(),
            state: Mutex::new(state),
            stop: Mutex::new(false),
            wake: Condvar::new(),
            remote: std::sync::OnceLock::new(),
        })
    }

    /// Mounts image layers lazily from now on through `remote`.
    pub fn set_remote(&self, remote: Arc<dyn RemoteLayers>) {
        let _ = self.remote.set(remote);
    }

    /// A lazy mount of the layer Prepare `key` is for (see [`RemoteLayers`]):
    /// Some(Err(AlreadyExists)) when the target is committed now, None for
    /// a normal Prepare.
    fn prepare_remote(
        &self,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<Error> {
        let remote = self.remote.get()?.clone();
        let target = labels.get(LABEL_TARGET_REF)?.clone();
        if !remote.wants(labels) || check_key("name", &target).is_err() {
            return None;
        }
        if self.state().by_key.contains_key(&target) {
            return Some(Error::AlreadyExists(target));
        }
        let layer = match self.create_plain(Kind::Active, key, parent, labels.clone()) {
            Ok(_) => self.state().by_key.get(key)?.layer.clone(),
            Err(e) => return Some(e),
        };
        let done = remote.populate(&layer, labels).and_then(|()| {
            self.commit(&target, key, labels.clone())
                .map_err(|e| e.to_string())
        });
        match done {
            Ok(()) => {
                log::info!("snapshot {target:?} mounted lazily (layer {layer})");
                Some(Error::AlreadyExists(target))
            }
            Err(why) => {
                log::info!("snapshot {target:?}: no lazy mount ({why}); a normal pull");
                if let Err(e) = self.remove(key) {
                    return Some(e);
                }
                None
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`metadata_of`] for a snapshot whose layer exists, with the keys
    /// lcfs keeps in it (the DiffID an apply recorded).
    fn metadata_again(&self, key: &str, e: &Entry) -> Result<LayerMetadata> {
        let mut m = metadata_of(key, e);
        let old = self
            .engine()
            .layer_metadata(&e.layer)
            .map_err(|err| Error::engine(format!("metadata of {key:?}"), err))?;
        m.extend(
            old.into_iter()
                .filter(|(k, _)| k.starts_with(LCFS_KEYS_PREFIX)),
        );
        Ok(m)
    }

    fn sync(&self, what: &str) -> Result<()> {
        self.engine()
            .sync()
            .map_err(|e| Error::engine(format!("making {what} durable"), e))
    }

    fn mount_of(&self, e: &Entry) -> BindMount {
        BindMount {
            source: self.mountpoint.join(&e.layer),
            read_only: e.kind != Kind::Active,
        }
    }

    /// Prepare (`kind` Active) or View (`kind` View) `key` on `parent`.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<BindMount> {
        if kind == Kind::Active {
            check_key("key", key)?;
            if let Some(e) = self.prepare_remote(key, parent, &labels) {
                return Err(e);
            }
        }
        self.create_plain(kind, key, parent, labels)
    }

    fn create_plain(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<BindMount> {
        check_key("key", key)?;
        if !parent.is_empty() {
            check_key("parent", parent)?;
        }
        if kind == Kind::Committed {
            return Err(Error::InvalidArgument(
                "only active and view snapshots can be created".into(),
            ));
        }
        let labels = check_labels(labels)?;
        let mut st = self.state();
        let parent_layer = if parent.is_empty() {
            None
        } else {
            let p = st
                .by_key
                .get(parent)
                .ok_or_else(|| Error::NotFound(parent.to_string()))?;
            if p.kind != Kind::Committed {
                return Err(Error::InvalidArgument(format!(
                    "parent {parent:?} is not a committed snapshot"
                )));
            }
            Some(p.layer.clone())
        };
        if st.by_key.contains_key(key) {
            return Err(Error::AlreadyExists(key.to_string()));
        }
        let size_limit = match labels.get(LABEL_SIZE_LIMIT) {
            Some(text) => lcfs_fsfront::parse_size_limit(text)
                .map_err(|e| Error::InvalidArgument(format!("label {LABEL_SIZE_LIMIT}: {e}")))?,
            None => None,
        };
        let now = Timestamp::now();
        // An image layer: the target of a pull (the remote-snapshot label),
        // or containerd's unpack, whose keys are `extract-<unique> <chain id>`
        // (snapshots.UnpackKeyFormat): cold, and not a container start.
        let cold = labels.contains_key(LABEL_TARGET_REF)
            || split_containerd_key(key)
                .is_some_and(|(_, _, name)| name.starts_with(UNPACK_KEY_PREFIX));
        let mut entry = Entry {
            layer: String::new(),
            parent: (!parent.is_empty()).then(|| parent.to_string()),
            kind,
            labels,
            created: now,
            updated: now,
            children: 0,
        };
        // A layer someone else named like ours is skipped (bounded).
        let mut tries = 0;
        loop {
            entry.layer = format!("{LAYER_PREFIX}{}", st.next_layer);
            st.next_layer += 1;
            let made = self.layers.create_with_metadata(
                &entry.layer,
                parent_layer.as_deref(),
                cold,
                Some(&metadata_of(key, &entry)),
            );
            match made {
                Ok(()) => break,
                Err(LayerError::Engine(lcfs_engine::Error::Exists)) if tries < 64 => tries += 1,
                Err(e) => return Err(layer_error(format!("creating snapshot {key:?}"), e)),
            }
        }
        if let Some(bytes) = size_limit.filter(|_| kind == Kind::Active) {
            if let Err(e) = self.engine().set_layer_quota(&entry.layer, Some(bytes)) {
                if let Err(e) = self.layers.remove(&entry.layer) {
                    log::warn!(
                        "discarding layer {:?} without its size limit: {e}",
                        entry.layer
                    );
                }
                return Err(Error::engine(format!("size limit of {key:?}"), e));
            }
        }
        if kind == Kind::View {
            // Views are read-only in the layer itself, not only in the
            // mount options: a frozen layer refuses every write.
            if let Err(e) = self.layers.freeze(&entry.layer, None) {
                if let Err(e) = self.layers.remove(&entry.layer) {
                    log::warn!("discarding unfrozen view layer {:?}: {e}", entry.layer);
                }
                return Err(layer_error(format!("freezing view {key:?}"), e));
            }
        }
        if let Some(p) = &entry.parent {
            if let Some(p) = st.by_key.get_mut(p) {
                p.children += 1;
            }
        }
        let mount = self.mount_of(&entry);
        st.by_key.insert(key.to_string(), entry);
        drop(st);
        self.sync(&format!("snapshot {key:?}"))?;
        Ok(mount)
    }

    pub fn mounts(&self, key: &str) -> Result<BindMount> {
        let st = self.state();
        let e = st
            .by_key
            .get(key)
            .ok_or_else(|| Error::NotFound(key.to_string()))?;
        if e.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed: it has no mounts (prepare or view it)"
            )));
        }
        Ok(self.mount_of(e))
    }

    /// Commits active `key` as `name`: freezes its layer (O(1)); the labels
    /// replace the active's.
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        check_key("name", name)?;
        check_key("key", key)?;
        let labels = check_labels(labels)?;
        // Writes the kernel still caches for the layer reach it before it
        // freezes: written back before the table's lock is taken, since a
        // write-back of the whole mount may take long.
        self.layers
            .write_back()
            .map_err(|e| layer_error(format!("committing {key:?} as {name:?}"), e))?;
        let mut st = self.state();
        if st.by_key.contains_key(name) {
            return Err(Error::AlreadyExists(name.to_string()));
        }
        let e = st
            .by_key
            .get(key)
            .ok_or_else(|| Error::NotFound(key.to_string()))?;
        if e.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        if st.applying.contains(&e.layer) {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?}: a diff is being applied to it"
            )));
        }
        if st.failed_applies.contains(&e.layer) {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} holds a diff whose apply failed: remove it"
            )));
        }
        let now = Timestamp::now();
        let mut committed = e.clone();
        committed.kind = Kind::Committed;
        committed.labels = labels;
        committed.created = now;
        committed.updated = now;
        let meta = self.metadata_again(name, &committed)?;
        self.layers
            .freeze(&committed.layer, Some(&meta))
            .map_err(|err| layer_error(format!("committing {key:?} as {name:?}"), err))?;
        st.by_key.remove(key);
        st.by_key.insert(name.to_string(), committed);
        drop(st);
        self.sync(&format!("commit of {name:?}"))
    }

    /// Removes `key` at once for containerd; its layer is freed later (by
    /// Cleanup or the background pass).
    pub fn remove(&self, key: &str) -> Result<()> {
        let mut st = self.state();
        let e = st
            .by_key
            .get(key)
            .ok_or_else(|| Error::NotFound(key.to_string()))?;
        if e.children > 0 {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key:?} with {} child(ren)",
                e.children
            )));
        }
        let mut meta = self.metadata_again(key, e)?;
        meta.insert(META_REMOVED.into(), encode_time(Timestamp::now()));
        let layer = e.layer.clone();
        let parent = e.parent.clone();
        self.engine()
            .set_layer_metadata(&layer, &meta)
            .map_err(|err| Error::engine(format!("removing {key:?}"), err))?;
        st.by_key.remove(key);
        st.failed_applies.remove(&layer);
        if let Some(p) = parent.and_then(|p| st.by_key.get_mut(&p)) {
            p.children = p.children.saturating_sub(1);
        }
        st.pending.insert(layer);
        drop(st);
        self.sync(&format!("removal of {key:?}"))
    }

    pub fn stat(&self, key: &str) -> Result<SnapshotInfo> {
        let st = self.state();
        let (mut info, layer) = st
            .by_key
            .get(key)
            .map(|e| (e.info(key), e.layer.clone()))
            .ok_or_else(|| Error::NotFound(key.to_string()))?;
        drop(st);
        self.label_root(&mut info, &layer);
        Ok(info)
    }

    /// Adds [`ROOT_LABEL`] to a committed snapshot's labels once its layer
    /// is sealed (docs/integrity.md).
    fn label_root(&self, info: &mut SnapshotInfo, layer: &str) {
        if info.kind != Kind::Committed {
            return;
        }
        if let Ok(lcfs_engine::SealState::Sealed(seal)) = self.engine().seal_state(layer) {
            info.labels.insert(
                ROOT_LABEL.into(),
                lcfs_engine::digest::digest_string(&seal.root),
            );
        }
    }

    /// Updates the labels of `name` as `paths` say: `labels` replaces them
    /// all, `labels.<key>` sets (or, with no value, removes) one; no paths
    /// means `labels`. Every other field is immutable: InvalidArgument.
    pub fn update(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<SnapshotInfo> {
        let mut st = self.state();
        let e = st
            .by_key
            .get(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        let mut updated = e.labels.clone();
        if paths.is_empty() {
            updated = labels;
        } else {
            for path in paths {
                if let Some(k) = path.strip_prefix("labels.") {
                    match labels.get(k) {
                        Some(v) if !v.is_empty() => updated.insert(k.to_string(), v.clone()),
                        _ => updated.remove(k),
                    };
                } else if path == "labels" {
                    updated = labels.clone();
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update {path:?} field on snapshot {name:?}"
                    )));
                }
            }
        }
        let mut entry = e.clone();
        entry.labels = check_labels(updated)?;
        entry.updated = Timestamp::now();
        let meta = self.metadata_again(name, &entry)?;
        self.engine()
            .set_layer_metadata(&entry.layer, &meta)
            .map_err(|err| Error::engine(format!("updating {name:?}"), err))?;
        let info = entry.info(name);
        st.by_key.insert(name.to_string(), entry);
        drop(st);
        self.sync(&format!("update of {name:?}"))?;
        Ok(info)
    }

    /// From the engine's per-layer counters: O(1), no tree walk. Writes the
    /// kernel still caches (writeback) are not counted yet: CRI calls this
    /// every few seconds for every container, too often to write back the
    /// whole mount each time (docs/containerd.md).
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let layer = {
            let st = self.state();
            st.by_key
                .get(key)
                .map(|e| e.layer.clone())
                .ok_or_else(|| Error::NotFound(key.to_string()))?
        };
        let info = self
            .engine()
            .layer_info(&layer)
            .map_err(|e| Error::engine(format!("usage of {key:?}"), e))?;
        let inherited = match &info.parent {
            Some(p) => self
                .engine()
                .layer_info(p)
                .map(|p| p.inode_count)
                .unwrap_or(0),
            None => 0,
        };
        Ok(Usage {
            size_bytes: info.owned_bytes,
            inodes: info.inode_count.saturating_sub(inherited),
        })
    }

    /// Every snapshot matching `filters`, ordered by key.
    pub fn list(&self, filters: &Filters) -> Vec<SnapshotInfo> {
        let st = self.state();
        let rows: Vec<(SnapshotInfo, String)> = st
            .by_key
            .iter()
            .map(|(k, e)| (e.info(k), e.layer.clone()))
            .collect();
        drop(st);
        let mut all: Vec<SnapshotInfo> = rows
            .into_iter()
            .map(|(mut info, layer)| {
                self.label_root(&mut info, &layer);
                info
            })
            .filter(|i| filters.matches(i))
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The layer of the committed snapshot containerd knows as `name` in
    /// `namespace` (key `<namespace>/<n>/<name>`; for an unpacked image
    /// layer the name is its chain id). Of several (a re-pull while the old
    /// one waits for containerd's garbage collector), the newest.
    pub fn committed_layer_for(&self, namespace: &str, name: &str) -> Option<String> {
        let st = self.state();
        st.by_key
            .iter()
            .filter(|(_, e)| e.kind == Kind::Committed)
            .filter_map(|(key, e)| {
                let (ns, n, rest) = split_containerd_key(key)?;
                (ns == namespace && rest == name).then_some(((n, e.created), &e.layer))
            })
            .max_by_key(|(order, _)| *order)
            .map(|(_, layer)| layer.clone())
    }

    /// [`Table::committed_layer_for`] for every committed snapshot at once:
    /// (namespace, name) to layer, in one pass over the table.
    pub fn committed_layers(&self) -> HashMap<(String, String), String> {
        let st = self.state();
        let mut newest: HashMap<(String, String), ((u64, Timestamp), String)> = HashMap::new();
        for (key, e) in &st.by_key {
            if e.kind != Kind::Committed {
                continue;
            }
            let Some((ns, n, name)) = split_containerd_key(key) else {
                continue;
            };
            let order = (n, e.created);
            let slot = newest.entry((ns.to_string(), name.to_string()));
            match slot {
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    if o.get().0 < order {
                        o.insert((order, e.layer.clone()));
                    }
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert((order, e.layer.clone()));
                }
            }
        }
        newest
            .into_iter()
            .map(|(k, (_, layer))| (k, layer))
            .collect()
    }

    /// Every layer the table holds: its snapshots' and the removed ones'
    /// not yet freed (what containerd references, for lcfs's orphan check).
    pub fn layer_names(&self) -> std::collections::HashSet<String> {
        let st = self.state();
        st.by_key
            .values()
            .map(|e| e.layer.clone())
            .chain(st.pending.iter().cloned())
            .collect()
    }

    /// How many removed snapshots still hold their layer.
    pub fn pending_removals(&self) -> usize {
        self.state().pending.len()
    }

    /// Frees the layers of removed snapshots, children before parents, and
    /// makes that durable. Layers still in use wait for a later pass: those
    /// with open files, and those still mounted (containerd's garbage
    /// collector removes snapshots it does not know to be mounted, such as
    /// the parent view dockerd mounts for `docker diff`; as with overlayfs,
    /// such a mount reads the snapshot as before until it is unmounted).
    /// Returns how many were freed.
    pub fn cleanup(&self) -> Result<usize> {
        let freed = self.reclaim();
        self.sync("cleanup")?;
        Ok(freed)
    }

    fn reclaim(&self) -> usize {
        let mut left: Vec<String> = self.state().pending.iter().cloned().collect();
        if left.is_empty() {
            return 0;
        }
        let mounted = self.layers.layers_mounted();
        left.retain(|layer| {
            let keep = !mounted.contains(layer);
            if !keep {
                log::debug!(
                    "removed snapshot layer {layer:?} is still mounted: freed once it is not"
                );
            }
            keep
        });
        let mut freed = Vec::new();
        // Each pass frees at least one layer or stops: bounded by the count.
        loop {
            let before = left.len();
            left.retain(|layer| match self.layers.remove_unseen(layer) {
                Ok(()) | Err(LayerError::Engine(lcfs_engine::Error::NotFound)) => {
                    freed.push(layer.clone());
                    false
                }
                // Open files; a child still held (freed in a later pass).
                Err(LayerError::Engine(
                    lcfs_engine::Error::Busy(_) | lcfs_engine::Error::HasChildren { .. },
                )) => true,
                Err(e) => {
                    log::warn!("freeing removed snapshot layer {layer:?}: {e}");
                    true
                }
            });
            if left.is_empty() || left.len() == before {
                break;
            }
        }
        let mut st = self.state();
        for layer in &freed {
            st.pending.remove(layer);
        }
        freed.len()
    }

    /// Frees removed layers every few seconds until [`Table::stop_background`].
    pub(crate) fn background(&self) {
        loop {
            let mut stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
            if !*stop {
                stop = self
                    .wake
                    .wait_timeout(stop, RECLAIM_INTERVAL)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if *stop {
                return;
            }
            drop(stop);
            if self.pending_removals() > 0 {
                let n = self.reclaim();
                if n > 0 {
                    log::info!("freed {n} removed snapshot layer(s)");
                }
            }
        }
    }

    pub(crate) fn stop_background(&self) {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.notify_all();
    }

    pub fn engine(&self) -> &Arc<Engine> {
        self.layers.engine()
    }

    /// For a Diff Apply onto the directory `source`: when it is the layer
    /// directory of an active snapshot (`<mount>/<layer>`), claims that
    /// layer until the returned claim is dropped (Commit waits, a second
    /// Apply is refused). None: not one of our snapshots' directories.
    pub(crate) fn claim_for_apply(self: &Arc<Self>, source: &Path) -> Result<Option<ApplyClaim>> {
        if source.parent() != Some(self.mountpoint.as_path()) {
            return Ok(None);
        }
        let Some(layer) = source.file_name().and_then(|n| n.to_str()) else {
            return Ok(None);
        };
        let mut st = self.state();
        let Some((key, _)) = st
            .by_key
            .iter()
            .find(|(_, e)| e.layer == layer && e.kind == Kind::Active)
        else {
            return Ok(None);
        };
        let key = key.clone();
        if st.failed_applies.contains(layer) {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} holds a diff whose apply failed: remove it"
            )));
        }
        if !st.applying.insert(layer.to_string()) {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?}: another diff is being applied to it"
            )));
        }
        Ok(Some(ApplyClaim {
            table: self.clone(),
            key,
            layer: layer.to_string(),
            failed: false,
        }))
    }

    /// The snapshot (view or active) whose layer directory `source` is, as
    /// (layer, key, active), for a Diff comparing mounts; None for anything
    /// else.
    pub(crate) fn snapshot_at(&self, source: &Path) -> Option<(String, String, bool)> {
        if source.parent() != Some(self.mountpoint.as_path()) {
            return None;
        }
        let layer = source.file_name()?.to_str()?;
        let st = self.state();
        let (key, e) = st
            .by_key
            .iter()
            .find(|(_, e)| e.layer == layer && e.kind != Kind::Committed)?;
        Some((layer.to_string(), key.clone(), e.kind == Kind::Active))
    }

    /// Brings writes the kernel caches for the mount into the engine.
    pub(crate) fn write_back(&self) -> Result<()> {
        self.layers
            .write_back()
            .map_err(|e| layer_error("before reading a snapshot's layer".into(), e))
    }

    /// The layer's directory entry in the mount is stale after an apply
    /// beside the mount.
    pub(crate) fn filled(&self, layer: &str) {
        self.layers.filled(layer);
    }
}

/// An active snapshot a Diff Apply writes into; see
/// [`Table::claim_for_apply`].
pub(crate) struct ApplyClaim {
    table: Arc<Table>,
    pub key: String,
    pub layer: String,
    failed: bool,
}

impl ApplyClaim {
    /// The apply failed: the layer holds part of a tar, and Commit refuses
    /// the snapshot from now on (in memory: after a daemon restart the mark
    /// is gone, like the failed call itself; containerd removes the
    /// snapshot when Apply fails).
    pub fn failed(&mut self) {
        self.failed = true;
    }
}

impl Drop for ApplyClaim {
    fn drop(&mut self) {
        let mut st = self.table.state();
        st.applying.remove(&self.layer);
        if self.failed {
            st.failed_applies.insert(self.layer.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lcfs_engine::device::{Device, MemDevice};
    use lcfs_engine::{Config, FormatOptions};

    fn table() -> Table {
        let dev: Arc<dyn Device> = Arc::new(MemDevice::new(64 << 20));
        Engine::format(dev.clone(), &FormatOptions::default()).unwrap();
        let config = Config {
            flush_interval_ms: 0,
            checkpoint_interval_ms: 0,
            ..Config::default()
        };
        let engine = Engine::open(dev, config).unwrap();
        Table::open(
            engine,
            Path::new("/nonexistent"),
            Arc::new(lcfs_fsfront::NoMount),
        )
        .unwrap()
    }

    /// Prepares `key` on `parent` and commits it as `name`; its layer.
    fn committed(t: &Table, name: &str, parent: &str) -> String {
        let key = format!("{name}-extract");
        t.create(Kind::Active, &key, parent, BTreeMap::new())
            .unwrap();
        t.commit(name, &key, BTreeMap::new()).unwrap();
        t.state().by_key[name].layer.clone()
    }

    #[test]
    fn unpack_snapshots_are_cold_image_layers_and_containers_are_not() {
        let t = table();
        let engine = t.layers.engine().clone();
        let cold = |key: &str, parent: &str| {
            t.create(Kind::Active, key, parent, BTreeMap::new())
                .unwrap();
            let layer = t.state().by_key[key].layer.clone();
            engine.layer_info(&layer).unwrap().cold
        };
        assert!(cold("default/1/extract-12-ab sha256:aa", ""));
        t.commit(
            "default/2/sha256:aa",
            "default/1/extract-12-ab sha256:aa",
            BTreeMap::new(),
        )
        .unwrap();
        assert!(!cold("default/3/web", "default/2/sha256:aa"));
        assert!(!cold("plain-key", ""));
    }

    #[test]
    fn containerd_keys_split_into_namespace_sequence_and_name() {
        assert_eq!(
            split_containerd_key("default/12/sha256:ab"),
            Some(("default", 12, "sha256:ab"))
        );
        assert_eq!(split_containerd_key("ns/3/a/b"), Some(("ns", 3, "a/b")));
        for bad in [
            "", "plain", "ns/12", "ns/x1/n", "/1/n", "ns//n", "ns/1/", "ns/-1/n",
        ] {
            assert_eq!(split_containerd_key(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn committed_layers_are_found_by_namespace_and_name_newest_first() {
        let t = table();
        let chain = "sha256:51c0c8ace48498d6f5fee6b0592cc06f2da0f3cbe09c5a34a97dce85c3889676";
        let old = committed(&t, &format!("ns1/4/{chain}"), "");
        // A re-pull: the same chain id later in the sequence ("4" sorts
        // after "10" as text: the order must be numeric).
        let newer = committed(&t, &format!("ns1/10/{chain}"), "");
        let other_ns = committed(&t, &format!("ns2/5/{chain}"), "");
        // Not a committed snapshot: an active with a matching key.
        t.create(Kind::Active, &format!("ns3/7/{chain}"), "", BTreeMap::new())
            .unwrap();
        // Not containerd's naming.
        committed(&t, chain, "");
        assert_ne!(old, newer);
        assert_eq!(t.committed_layer_for("ns1", chain), Some(newer.clone()));
        assert_eq!(t.committed_layer_for("ns2", chain), Some(other_ns.clone()));
        assert_eq!(t.committed_layer_for("ns3", chain), None);
        assert_eq!(t.committed_layer_for("ns1", "sha256:00"), None);
        assert_eq!(t.committed_layer_for("ns", chain), None);
        let all = t.committed_layers();
        assert_eq!(all.len(), 2);
        assert_eq!(all[&("ns1".to_string(), chain.to_string())], newer);
        assert_eq!(all[&("ns2".to_string(), chain.to_string())], other_ns);
        // Removed: no longer found; the older one is.
        t.remove(&format!("ns1/10/{chain}")).unwrap();
        assert_eq!(t.committed_layer_for("ns1", chain), Some(old));
    }
}
