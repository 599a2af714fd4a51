//! lcfs containerd snapshotter: containerd's snapshots gRPC API
//! (`containerd.services.snapshots.v1.Snapshots`) on a root-only unix
//! socket, with every snapshot an lcfs engine layer served through the
//! daemon's FUSE mount, and on the same socket containerd's diff API
//! (`containerd.services.diff.v1.Diff`), whose Apply unpacks image layers
//! straight into those layers (see diff.rs). containerd reaches both as
//! proxy plugins:
//!
//! ```toml
//! [proxy_plugins.lcfs]
//!   type = "snapshot"
//!   address = "/run/lcfs/snapshotter.sock"
//! [proxy_plugins.lcfs-diff]
//!   type = "diff"
//!   address = "/run/lcfs/snapshotter.sock"
//! [plugins."io.containerd.service.v1.diff-service"]
//!   default = ["lcfs-diff", "walking"]
//! ```
//!
//! Mapping (docs/containerd.md):
//! - an active snapshot is a writable layer, a view a frozen one, a
//!   committed snapshot a frozen layer; Prepare and View on a committed
//!   parent clone it (O(1)); Commit freezes the active's layer (O(1));
//! - Mounts answers a bind mount of the layer's directory in the lcfs mount;
//! - the snapshot table (key, kind, labels, times) lives in each layer's
//!   engine metadata, made durable before each changing call answers;
//! - Remove only marks the layer; Cleanup (and a background pass) frees it.
//!
//! For per-image statistics, [`image_layers`] asks containerd for its images
//! and finds the layer of each one's top snapshot (images.rs).

mod compare;
mod diff;
mod error;
mod filter;
mod images;
mod server;
mod service;
mod table;

pub use diff::MEDIA_TYPE_LAYER_TAR;
pub use error::{Error, Result};
pub use images::{image_layers, image_tops, remove_image, ImageLayer, ImageTop};
pub use server::{serve, serve_with, ServeOptions, SnapshotterServer};
pub use table::{
    Kind, RemoteLayers, SnapshotInfo, Table, KEY_MAX_BYTES, LABELS_MAX_BYTES, LABELS_MAX_COUNT,
    LABEL_MAX_BYTES, LABEL_SIZE_LIMIT,
};

/// Where the daemon serves the snapshotter unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/lcfs/snapshotter.sock";

/// The name containerd knows the snapshotter by (`[proxy_plugins.lcfs]`).
pub const PLUGIN_NAME: &str = "lcfs";

/// The name the configuration in docs/containerd.md gives the differ
/// (`[proxy_plugins.lcfs-diff]`, type "diff").
pub const DIFF_PLUGIN_NAME: &str = "lcfs-diff";

/// Where containerd serves its API (and the content service Apply reads
/// layer blobs from) unless told otherwise.
pub const DEFAULT_CONTAINERD_ADDRESS: &str = "/run/containerd/containerd.sock";

/// The gRPC types and services generated from containerd's .proto files.
pub mod api {
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod content {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.content.v1");
                }
            }
            pub mod diff {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.diff.v1");
                }
            }
            pub mod images {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.images.v1");
                }
            }
            pub mod leases {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.leases.v1");
                }
            }
            pub mod namespaces {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.namespaces.v1");
                }
            }
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
    pub use containerd::services::content::v1 as content;
    pub use containerd::services::diff::v1 as diff;
    pub use containerd::services::images::v1 as images;
    pub use containerd::services::leases::v1 as leases;
    pub use containerd::services::namespaces::v1 as namespaces;
    pub use containerd::services::snapshots::v1 as snapshots;
    pub use containerd::types;
}
