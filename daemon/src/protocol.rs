//! The control protocol's wire types, shared by the daemon (which writes them)
//! and the command line (which reads them). docs/control-protocol.md is the
//! reference; keep the two in step.
//!
//! Newline-delimited JSON over a unix socket: one request object per line,
//! one response object per line, in order.

use lcfs_engine::SealState;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Longest request line the daemon reads, without its newline. A longer line
/// is answered with `EMSGSIZE` and the connection is closed, since where the
/// next request starts cannot be known without reading the rest.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Every op the daemon knows, as spelled on the wire.
pub const OPS: &[&str] = &[
    "layer.create",
    "layer.commit",
    "layer.remove",
    "layer.list",
    "layer.stat",
    "layer.digest",
    "layer.verify",
    "layer.verify_progress",
    "layer.verify_reads",
    "image.list",
    "image.files",
    "statistics",
    "gc.run",
    "gc.reload",
    "sync",
    "stats",
    "fsck",
    "ping",
];

/// `{"ok": true, "result": ...}`.
pub fn success(result: Value) -> Value {
    json!({ "ok": true, "result": result })
}

/// `{"ok": false, "error": {"errno": ..., "message": ...}}`.
pub fn failure(errno: i32, message: impl Into<String>) -> Value {
    json!({ "ok": false, "error": { "errno": errno, "message": message.into() } })
}

/// One layer, as `layer.create`, `layer.commit`, `layer.stat` and `layer.list` return it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Layer {
    pub id: u64,
    pub name: String,
    pub parent: Option<String>,
    /// Committed: read-only, may have children.
    pub frozen: bool,
    /// Data goes to the cold log (image layers).
    pub cold: bool,
    pub children: u32,
    /// RFC 3339, UTC, nanoseconds.
    pub created: String,
    pub frozen_at: Option<String>,
    /// Bytes this layer alone owns (what removing it frees).
    pub owned_bytes: u64,
    /// Most bytes the layer may own (Docker's `--storage-opt size=`), if set.
    #[serde(default)]
    pub quota_bytes: Option<u64>,
    pub inode_count: u64,
    /// The layer's directory in the daemon's mount.
    pub path: String,
    /// How the layer has been used (clones, reads); zeros from a daemon
    /// that does not count.
    #[serde(default)]
    pub usage: Usage,
    /// The images it belongs to (in their chain, or one of their
    /// containers), by name; empty in results other than lists.
    #[serde(default)]
    pub images: Vec<String>,
    /// The SHA-256 of the uncompressed tar applied to it (an image layer's
    /// DiffID, `sha256:<hex>`), when one was; in `layer.stat` only.
    #[serde(default)]
    pub diff_id: Option<String>,
    /// Its seal (docs/integrity.md): "sealed", "sealing" (begun, not
    /// finished), "unsealed" (frozen, not sealed yet), "writable" or
    /// "unreadable".
    #[serde(default)]
    pub seal: String,
    /// The layer root its seal holds (`sha256:<hex>`), once sealed: what a
    /// signer records next to an image signature.
    #[serde(default)]
    pub root: Option<String>,
    /// Whether reads of its content are verified against its seal; in
    /// `layer.stat` only.
    #[serde(default)]
    pub verified_reads: bool,
}

/// A layer's usage counters (the engine's `LayerUsage`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Layers ever cloned from it (containers started from it), removed
    /// ones included.
    pub clones: u64,
    /// RFC 3339 time of the last clone; null when never cloned.
    pub last_clone: Option<String>,
    /// Read requests served from the layer's directory, and their bytes.
    pub reads: u64,
    pub bytes_read: u64,
    /// The same for its removed clones (and theirs), folded in at removal.
    pub clone_reads: u64,
    pub clone_bytes_read: u64,
    /// A pulled layer: uncompressed bytes applied into it, and how long
    /// that took.
    #[serde(default)]
    pub applied_bytes: u64,
    #[serde(default)]
    pub apply_seconds: f64,
    /// RFC 3339 time of the first read served from it (null: none yet),
    /// and the seconds from its creation to then (a container's start-up).
    #[serde(default)]
    pub first_read: Option<String>,
    #[serde(default)]
    pub startup_seconds: Option<f64>,
    /// Reads in its first 10 seconds, and their bytes.
    #[serde(default)]
    pub early_reads: u64,
    #[serde(default)]
    pub early_bytes_read: u64,
    /// Its removed clones that read anything, the sum of their start-up
    /// seconds, and their reads in their first 10 seconds.
    #[serde(default)]
    pub clone_starts: u64,
    #[serde(default)]
    pub clone_startup_seconds: f64,
    #[serde(default)]
    pub clone_early_reads: u64,
    #[serde(default)]
    pub clone_early_bytes_read: u64,
    /// Distinct files read in its first 10 seconds, and the same of its
    /// removed clones.
    #[serde(default)]
    pub early_files: u64,
    #[serde(default)]
    pub clone_early_files: u64,
}

impl Usage {
    /// The mean start-up of its removed clones, if any started.
    pub fn mean_clone_startup(&self) -> Option<f64> {
        (self.clone_starts > 0).then(|| self.clone_startup_seconds / self.clone_starts as f64)
    }
}

impl Layer {
    pub fn from_info(info: &lcfs_engine::LayerInfo, mountpoint: &std::path::Path) -> Layer {
        let startup = info.usage.startup_ns(info.created);
        Layer {
            id: info.id,
            name: info.name.clone(),
            parent: info.parent.clone(),
            frozen: info.frozen,
            cold: info.cold,
            children: info.children,
            created: rfc3339(info.created),
            frozen_at: info.frozen_at.map(rfc3339),
            owned_bytes: info.owned_bytes,
            quota_bytes: info.quota_bytes,
            inode_count: info.inode_count,
            path: mountpoint.join(&info.name).display().to_string(),
            images: Vec::new(),
            diff_id: None,
            seal: match &info.seal {
                SealState::Sealed(_) => "sealed",
                SealState::Partial => "sealing",
                SealState::None if info.frozen => "unsealed",
                SealState::None => "writable",
                SealState::Unreadable(_) => "unreadable",
            }
            .into(),
            root: match &info.seal {
                SealState::Sealed(s) => Some(lcfs_engine::digest::digest_string(&s.root)),
                _ => None,
            },
            verified_reads: false,
            usage: Usage {
                clones: info.usage.clones,
                last_clone: (info.usage.clones > 0).then(|| rfc3339(info.usage.last_clone)),
                reads: info.usage.reads,
                bytes_read: info.usage.bytes_read,
                clone_reads: info.usage.clone_reads,
                clone_bytes_read: info.usage.clone_bytes_read,
                applied_bytes: info.usage.applied_bytes,
                apply_seconds: info.usage.apply_ns as f64 / 1e9,
                first_read: startup.map(|_| rfc3339(info.usage.first_read)),
                startup_seconds: startup.map(|ns| ns as f64 / 1e9),
                early_reads: info.usage.early_reads,
                early_bytes_read: info.usage.early_bytes_read,
                clone_starts: info.usage.clone_starts,
                clone_startup_seconds: info.usage.clone_start_ns as f64 / 1e9,
                clone_early_reads: info.usage.clone_early_reads,
                clone_early_bytes_read: info.usage.clone_early_bytes_read,
                early_files: info.usage.early_files,
                clone_early_files: info.usage.clone_early_files,
            },
        }
    }
}

/// One image, as `image.list` and `/v1/images` return it: an image top
/// layer with what lcfs saw of the containers started from it
/// (docs/statistics.md).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Image {
    /// The owner's name for it (a tag), else its top layer's name.
    pub name: String,
    /// Every name the owners give it (Docker: every tag and digest
    /// reference).
    #[serde(default)]
    pub names: Vec<String>,
    /// The owners' records of it, for the garbage collector to remove
    /// every one (an image by two containerd names, two Docker ids).
    #[serde(skip)]
    pub records: Vec<crate::images::Named>,
    /// `docker` or `containerd` when an owner named it; null otherwise.
    pub owner: Option<String>,
    /// The owner's id (Docker's image id, containerd's target digest).
    pub id: Option<String>,
    /// containerd's namespace of it.
    #[serde(default)]
    pub namespace: Option<String>,
    pub top_layer: String,
    /// Layers in its chain, their owned bytes, and the files its top sees.
    pub layers: u32,
    pub size_bytes: u64,
    pub files: u64,
    /// RFC 3339: when its top layer was made.
    pub created: String,
    /// Containers started from it, ever, and the last start (RFC 3339).
    pub starts: u64,
    pub last_start: Option<String>,
    /// `last_start` and `created` in seconds since the epoch (0: never),
    /// for metrics and the garbage collector.
    #[serde(skip)]
    pub last_start_seconds: i64,
    #[serde(skip)]
    pub created_seconds: i64,
    /// Its containers' writable layers now, and those in use (mounted).
    pub containers: u64,
    pub running: u64,
    /// Seconds since the most recent of the running ones started.
    pub uptime_seconds: Option<f64>,
    /// Pulling it: uncompressed bytes applied into its layers, and the time.
    pub pull_bytes: u64,
    pub pull_seconds: f64,
    /// Read requests its containers made, and their bytes.
    pub reads: u64,
    pub bytes_read: u64,
    /// Containers with a measured start-up (creation to first read), the
    /// mean of it, and what they read in their first 10 seconds (totals).
    pub startups: u64,
    pub mean_startup_seconds: Option<f64>,
    pub startup_reads: u64,
    pub startup_bytes: u64,
    pub startup_files: u64,
}

/// One hot file of an image, as `image.files` and `/v1/files` return it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HotFile {
    pub image: String,
    pub path: String,
    /// Read requests and bytes; each may overcount by up to `error` reads
    /// (a bounded top-k, docs/statistics.md).
    pub reads: u64,
    pub bytes: u64,
    pub error: u64,
}

/// What `layer.digest` returns (docs/format.md, "Layer digests").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerDigest {
    pub name: String,
    /// `sha256:<hex>`.
    pub root: String,
    pub entries: u64,
    pub files: u64,
    pub file_bytes: u64,
}

impl LayerDigest {
    pub fn new(name: &str, d: &lcfs_engine::digest::LayerDigest) -> LayerDigest {
        LayerDigest {
            name: name.to_string(),
            root: lcfs_engine::digest::digest_string(&d.root),
            entries: d.entries,
            files: d.files,
            file_bytes: d.file_bytes,
        }
    }
}

/// What `layer.verify` returns: the layer against its seal or a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub name: String,
    /// "seal" or "manifest".
    #[serde(default)]
    pub against: String,
    /// The layer had no complete seal: it was sealed now, from what the
    /// device holds, and there was nothing to compare.
    #[serde(default)]
    pub sealed_now: bool,
    /// The layer's root now.
    pub root: String,
    /// The root the seal or manifest holds (the layer's when it was sealed
    /// or the manifest written).
    pub manifest_root: String,
    /// Entries that differ, in path order, at most [`VERIFY_LISTED_MAX`].
    pub differences: Vec<Difference>,
    /// How many differ in all.
    pub differences_total: u64,
}

/// One entry that differs from the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    /// Its path in the layer (lossy UTF-8).
    pub path: String,
    /// "missing", "added", or what differs: "type", "content", "mode",
    /// "owner", "device", "xattrs", "link target".
    pub what: Vec<String>,
}

/// Differences a verification lists at most (it counts them all).
pub const VERIFY_LISTED_MAX: usize = 10_000;

/// What `stats` returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub device: String,
    pub mountpoint: String,
    /// `io_uring` or `pread`.
    pub backend: String,
    pub device_io: DeviceIo,
    pub engine: EngineCounters,
    /// User write calls per device write.
    pub coalescing_ratio: f64,
    pub node_cache: NodeCache,
    pub block_cache: BlockCache,
    /// Lookups and getattrs answered without the engine's store lock.
    #[serde(default)]
    pub metadata_cache: MetadataCache,
    pub layers: u64,
    /// Layers removed whose space the background thread is still freeing.
    #[serde(default)]
    pub removals_pending: u64,
    /// Verified reads (docs/integrity.md): 4 KiB blocks checked against a
    /// seal, and reads refused because something differed from it.
    #[serde(default)]
    pub verified_blocks: u64,
    #[serde(default)]
    pub verify_failures: u64,
    pub segments: u64,
    pub segments_free: u64,
    pub segment_size_bytes: u64,
    pub live_bytes: u64,
    pub capacity_bytes: u64,
    pub checkpoint_seq: u64,
    /// Why the engine stopped writing (it serves reads only until it is
    /// restarted and recovers from its last checkpoint); null while it writes.
    #[serde(default)]
    pub read_only_reason: Option<String>,
    /// The Docker graphdriver plugin's calls; null when the daemon serves
    /// no plugin.
    #[serde(default)]
    pub plugin: Option<PluginCalls>,
    /// FUSE passthrough of shared files; null when the mount runs without
    /// it (`lcfs daemon --passthrough`).
    #[serde(default)]
    pub passthrough: Option<Passthrough>,
    /// The registry mirror's counters (docs/mirror.md); null when it does
    /// not run.
    #[serde(default)]
    pub mirror: Option<std::collections::BTreeMap<String, u64>>,
}

/// What the mount's passthrough did since it started (docs/fuse.md).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Passthrough {
    /// False once the kernel refused it (files are served by the daemon).
    pub active: bool,
    /// Opens answered with passthrough to a frozen layer's copy.
    pub opens: u64,
    /// Of those, with read(2) and write(2) through the daemon (a writer
    /// beside passthrough readers, or a file its layer changed meanwhile).
    pub direct_opens: u64,
}

/// Docker graphdriver plugin calls since the daemon started, timed from
/// taking the request to the end of the answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PluginCalls {
    pub calls: u64,
    pub in_flight: u64,
    /// Time during which at least one call was in hand.
    pub busy_us: u64,
    /// Sum over calls (concurrent calls each count their own time).
    pub total_us: u64,
    /// Methods called at least once, by name (`GraphDriver.Create`, ...).
    pub methods: std::collections::BTreeMap<String, MethodCalls>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MethodCalls {
    pub calls: u64,
    pub total_us: u64,
    pub max_us: u64,
}

impl From<&lcfs_dockerplugin::CallStats> for PluginCalls {
    fn from(s: &lcfs_dockerplugin::CallStats) -> PluginCalls {
        PluginCalls {
            calls: s.calls,
            in_flight: s.in_flight,
            busy_us: s.busy_us,
            total_us: s.total_us,
            methods: s
                .methods
                .iter()
                .map(|m| {
                    let calls = MethodCalls {
                        calls: m.calls,
                        total_us: m.total_us,
                        max_us: m.max_us,
                    };
                    (m.method.clone(), calls)
                })
                .collect(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceIo {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub batches: u64,
    pub batched_ops: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineCounters {
    pub user_write_calls: u64,
    pub user_write_bytes: u64,
    pub log_blocks_appended: u64,
    pub checkpoints: u64,
    pub segments_cleaned: u64,
    pub blocks_relocated: u64,
    /// File bytes image layers took from container layers at a commit
    /// instead of having them written again.
    #[serde(default)]
    pub promoted_bytes: u64,
    /// Fsync records written (concurrent fsyncs share one), and fsyncs
    /// that took a checkpoint instead.
    #[serde(default)]
    pub fsync_records: u64,
    #[serde(default)]
    pub fsync_checkpoints: u64,
    /// Records applied when the engine was opened.
    #[serde(default)]
    pub fsync_records_replayed: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeCache {
    pub hits: u64,
    pub misses: u64,
    pub nodes: u64,
    pub bytes: u64,
    pub dirty_nodes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetadataCache {
    pub hits: u64,
    pub misses: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockCache {
    pub hits: u64,
    pub misses: u64,
    pub blocks: u64,
}

impl Stats {
    pub fn from_engine(
        s: &lcfs_engine::Stats,
        device: &std::path::Path,
        mountpoint: &std::path::Path,
    ) -> Stats {
        Stats {
            device: device.display().to_string(),
            mountpoint: mountpoint.display().to_string(),
            backend: s.backend.to_string(),
            device_io: DeviceIo {
                reads: s.device.reads,
                read_bytes: s.device.read_bytes,
                writes: s.device.writes,
                write_bytes: s.device.write_bytes,
                flushes: s.device.flushes,
                batches: s.device.batches,
                batched_ops: s.device.batched_ops,
            },
            engine: EngineCounters {
                user_write_calls: s.engine.user_write_calls,
                user_write_bytes: s.engine.user_write_bytes,
                log_blocks_appended: s.engine.log_blocks_appended,
                checkpoints: s.engine.checkpoints,
                segments_cleaned: s.engine.segments_cleaned,
                blocks_relocated: s.engine.blocks_relocated,
                promoted_bytes: s.engine.promoted_bytes,
                fsync_records: s.engine.fsync_records,
                fsync_checkpoints: s.engine.fsync_checkpoints,
                fsync_records_replayed: s.engine.fsync_records_replayed,
            },
            coalescing_ratio: s.coalescing_ratio(),
            node_cache: NodeCache {
                hits: s.node_cache_hits,
                misses: s.node_cache_misses,
                nodes: s.node_cache_nodes as u64,
                bytes: s.node_cache_bytes as u64,
                dirty_nodes: s.dirty_nodes as u64,
            },
            block_cache: BlockCache {
                hits: s.block_cache_hits,
                misses: s.block_cache_misses,
                blocks: s.block_cache_blocks as u64,
            },
            metadata_cache: MetadataCache {
                hits: s.metadata_cache_hits,
                misses: s.metadata_cache_misses,
            },
            layers: s.layers as u64,
            removals_pending: s.removals_pending as u64,
            verified_blocks: s.verified_blocks,
            verify_failures: s.verify_failures,
            segments: u64::from(s.segments),
            segments_free: s.segments_free as u64,
            segment_size_bytes: s.segment_size_bytes,
            live_bytes: s.live_bytes,
            capacity_bytes: s.capacity_bytes,
            checkpoint_seq: s.checkpoint_seq,
            read_only_reason: s.read_only_reason.clone(),
            plugin: None,
            passthrough: None,
            mirror: None,
        }
    }
}

/// What `fsck` returns (and what offline `lcfs fsck` prints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FsckReport {
    pub clean: bool,
    pub layers: u64,
    pub inodes: u64,
    pub tree_nodes: u64,
    pub map_nodes: u64,
    pub map_entries: u64,
    pub extents: u64,
    pub data_blocks_verified: u64,
    /// At most 1000, as the engine keeps them.
    pub errors: Vec<String>,
}

impl From<&lcfs_engine::FsckReport> for FsckReport {
    fn from(r: &lcfs_engine::FsckReport) -> FsckReport {
        FsckReport {
            clean: r.is_clean(),
            layers: r.layers as u64,
            inodes: r.inodes,
            tree_nodes: r.tree_nodes,
            map_nodes: r.map_nodes,
            map_entries: r.map_entries,
            extents: r.extents,
            data_blocks_verified: r.data_blocks_verified,
            errors: r.errors.clone(),
        }
    }
}

/// What `ping` returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ping {
    pub version: String,
    pub pid: u32,
    pub device: String,
    pub mountpoint: String,
}

/// `2026-11-01T12:34:56.123456789Z` for a Unix timestamp (proleptic Gregorian, UTC).
pub fn rfc3339(t: lcfs_engine::Timestamp) -> String {
    let (year, month, day, hour, minute, second) = t.civil();
    format!(
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{:09}Z",
        t.nanoseconds.min(999_999_999)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use lcfs_engine::Timestamp;

    #[test]
    fn formats_timestamps() {
        let t = |seconds, nanoseconds| {
            rfc3339(Timestamp {
                seconds,
                nanoseconds,
            })
        };
        assert_eq!(t(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(t(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(t(1_700_000_000, 123), "2023-11-14T22:13:20.000000123Z");
        assert_eq!(t(-1, 0), "1969-12-31T23:59:59.000000000Z");
    }

    #[test]
    fn plugin_calls_by_method_name() {
        let stats = lcfs_dockerplugin::CallStats {
            calls: 3,
            in_flight: 1,
            busy_us: 900,
            total_us: 1000,
            methods: vec![
                lcfs_dockerplugin::MethodStats {
                    method: "GraphDriver.Get".into(),
                    calls: 2,
                    total_us: 400,
                    max_us: 300,
                },
                lcfs_dockerplugin::MethodStats {
                    method: "GraphDriver.ApplyDiff".into(),
                    calls: 1,
                    total_us: 600,
                    max_us: 600,
                },
            ],
        };
        let wire = serde_json::to_value(PluginCalls::from(&stats)).unwrap();
        assert_eq!(
            wire,
            json!({"calls": 3, "in_flight": 1, "busy_us": 900, "total_us": 1000, "methods": {
                "GraphDriver.ApplyDiff": {"calls": 1, "total_us": 600, "max_us": 600},
                "GraphDriver.Get": {"calls": 2, "total_us": 400, "max_us": 300}}})
        );
    }
}
