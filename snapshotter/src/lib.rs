//! lcfs containerd snapshotter: containerd's snapshots gRPC API
//! (`containerd.services.snapshots.v1.Snapshots`) on a root-only unix
//! socket, with every snapshot an lcfs engine layer served through the
//! daemon's FUSE mount. containerd reaches it as a proxy plugin:
//!
//! ```toml
//! [proxy_plugins.lcfs]
//!   type = "snapshot"
//!   address = "/run/lcfs/snapshotter.sock"
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

mod error;
mod filter;
mod server;
mod service;
mod table;

pub use error::{Error, Result};
pub use server::{serve, SnapshotterServer};
pub use table::{
    Kind, SnapshotInfo, Table, KEY_MAX_BYTES, LABELS_MAX_BYTES, LABELS_MAX_COUNT, LABEL_MAX_BYTES,
    LABEL_SIZE_LIMIT,
};

/// Where the daemon serves the snapshotter unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/lcfs/snapshotter.sock";

/// The name containerd knows the snapshotter by (`[proxy_plugins.lcfs]`).
pub const PLUGIN_NAME: &str = "lcfs";

/// The gRPC types and services generated from containerd's .proto files.
pub mod api {
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
    pub use containerd::services::snapshots::v1 as snapshots;
    pub use containerd::types;
}
