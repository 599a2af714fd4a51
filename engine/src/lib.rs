//! lcfs storage engine: a log-structured layer store on a raw block device.
//!
//! Layers are first class: [`Engine::clone_layer`] and [`Engine::commit_layer`]
//! are O(1) metadata changes whatever the layer's size or chain depth. All
//! data and metadata go to an append-only log in large sequential writes
//! (io_uring + O_DIRECT on real devices); durability comes from checkpoints
//! with redundant, checksummed superblocks. See docs/format.md.

mod absent;
mod addrmap;
mod cache;
mod checkpoint;
mod cleaner;
pub mod device;
mod diff;
pub mod digest;
mod engine;
mod error;
pub mod format;
mod fs;
mod fsck;
mod fsynclog;
mod histogram;
mod hotfiles;
mod layers;
mod logstream;
mod metacache;
mod metadata;
mod promote;
mod read;
mod removal;
mod seal;
mod sharing;
mod space;
mod store;
mod streamed;
#[cfg(any(test, feature = "testing"))]
mod tamper;
mod tree;
mod verified;
mod writer;

pub use absent::{AbsentFetcher, ABSENT};
pub use diff::{Change, ChangeKind};
pub use engine::{Engine, FormatOptions, Stats};
pub use error::{Error, Result};
/// The checksum the engine keeps for every 4 KiB data block (xxh3-64).
pub use format::data_checksum as block_checksum;
pub use format::{LayerUsage, Timestamp};
pub use fs::{
    Attr, DirEntry, FileKind, LayerInfo, LayerShape, SetAttr, StatFs, TimeSet, FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, LINK_MAX, NAME_MAX, RENAME_EXCHANGE,
    RENAME_NOREPLACE, ROOT_INODE, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG, S_IFSOCK,
    XATTR_CREATE, XATTR_REPLACE,
};
pub use fsck::FsckReport;
pub use histogram::{
    set_stats_enabled, stats_enabled, Histogram, HistogramSnapshot, Latencies, Stopwatch,
    HISTOGRAM_BUCKETS,
};
pub use hotfiles::{HotFile, HOT_FILES_K};
pub use metadata::{LayerMetadata, MAX_METADATA_BYTES};
pub use seal::{SealInfo, SealState, SealedFile};
pub use store::{Config, Counters, EARLY_FILES_MAX};
pub use streamed::StreamHasher;
#[cfg(any(test, feature = "testing"))]
pub use tamper::Tampered;
pub use verified::VERIFY_READS_KEY;
