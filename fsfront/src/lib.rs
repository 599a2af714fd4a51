//! lcfs FUSE front: serves every engine layer as a directory of one mount,
//! `<mountpoint>/<layer-name>/`. See docs/fuse.md for the caching policy.

mod attr;
mod cache;
mod copies;
mod fs;
mod inodes;
mod kernel;
mod latency;
mod layers;
mod mount;
mod passthrough;
mod socket;
mod workers;

pub use kernel::{WakeHere, WAKE_HERE_PARAMETER};
pub use latency::{operation_latencies, Operation, OperationLatencies};
pub use layers::{parse_size_limit, KernelCache, LayerError, LayerOps, NoMount};
pub use mount::{
    copies_path, lazy_unmount, mount, prepare_mountpoint, Mount, MountOptions, SharedMount,
};
pub use passthrough::PassthroughStats;
pub use socket::{bind_private_socket, claim_socket_path, ClaimError};
