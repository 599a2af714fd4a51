//! The engine's one error type, with the POSIX errno each variant maps to.

use std::fmt;

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the engine can fail with. Front ends map it with [`Error::errno`].
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A block failed verification: bad checksum, wrong address, wrong sequence.
    #[error("corrupt block at device offset {offset:#x}: {what}")]
    Corrupt { offset: u64, what: String },
    #[error("no space left on device")]
    NoSpace,
    /// A write would take a layer past its size limit (ENOSPC, as overlay2
    /// on xfs project quotas and devicemapper report it).
    #[error("no space left in the layer: its size limit is {limit_bytes} bytes")]
    QuotaExceeded { limit_bytes: u64 },
    #[error("no such file, directory or layer")]
    NotFound,
    #[error("already exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("not a directory")]
    NotDirectory,
    #[error("is a directory")]
    IsDirectory,
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Writes to a frozen layer.
    #[error("layer is read-only (frozen)")]
    ReadOnly,
    /// A file block whose content is not on the device yet (a lazily
    /// pulled layer's, absent.rs) and could not be fetched.
    #[error("file content not fetched yet (logical block {0})")]
    Absent(u64),
    #[error("busy: {0}")]
    Busy(String),
    /// The device is short of free segments and the operation changed
    /// nothing yet: the engine makes room without the store lock and runs
    /// it again. Never returned by the engine's public calls.
    #[error("no space left on device (room is being made)")]
    NeedsRoom,
    /// A layer cannot be removed while layers made from it remain.
    #[error("busy: layer {layer} has {children} children")]
    HasChildren { layer: String, children: u32 },
    #[error("name too long")]
    NameTooLong,
    /// A link or rename across layers.
    #[error("operation crosses layers")]
    CrossLayer,
    #[error("no such extended attribute")]
    NoAttribute,
    #[error("buffer too small")]
    Range,
    #[error("file too large")]
    FileTooLarge,
    #[error("too many links")]
    TooManyLinks,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("device carries a {0} signature; refusing to format without force")]
    Signature(String),
    #[error("operation not supported: {0}")]
    Unsupported(String),
    /// The device holds lcfs superblocks (or slots that cannot be read) but
    /// no valid one: it is an lcfs that cannot be opened, not a blank device.
    #[error("lcfs superblocks found but none is valid: {0}")]
    Unopenable(String),
    #[error("not an lcfs device (no valid superblock)")]
    NotFormatted,
    /// A misuse of the device contract (misaligned offset, out of range).
    #[error("device contract violated: {0}")]
    DeviceContract(String),
    /// The engine can no longer guarantee consistency (a device write
    /// failed, or a change failed or panicked half-way): it refuses every
    /// change and checkpoint from then on, so the device keeps the last
    /// consistent checkpoint. Reopening recovers it.
    #[error("lcfs is read-only after an error: {0}")]
    Stopped(String),
}

impl Error {
    /// The POSIX errno a front end should answer with.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::Corrupt { .. } => libc::EIO,
            Error::NoSpace | Error::NeedsRoom | Error::QuotaExceeded { .. } => libc::ENOSPC,
            Error::NotFound => libc::ENOENT,
            Error::Exists => libc::EEXIST,
            Error::NotEmpty => libc::ENOTEMPTY,
            Error::NotDirectory => libc::ENOTDIR,
            Error::IsDirectory => libc::EISDIR,
            Error::Invalid(_) => libc::EINVAL,
            Error::ReadOnly => libc::EROFS,
            Error::Absent(_) => libc::EIO,
            Error::Busy(_) | Error::HasChildren { .. } => libc::EBUSY,
            Error::NameTooLong => libc::ENAMETOOLONG,
            Error::CrossLayer => libc::EXDEV,
            Error::NoAttribute => libc::ENODATA,
            Error::Range => libc::ERANGE,
            Error::FileTooLarge => libc::EFBIG,
            Error::TooManyLinks => libc::EMLINK,
            Error::NotPermitted => libc::EPERM,
            Error::Unsupported(_) => libc::EOPNOTSUPP,
            Error::Stopped(_) => libc::EROFS,
            Error::Unopenable(_) => libc::EIO,
            Error::Signature(_) | Error::NotFormatted | Error::DeviceContract(_) => libc::EINVAL,
        }
    }

    pub(crate) fn corrupt(offset: u64, what: impl fmt::Display) -> Error {
        Error::Corrupt {
            offset,
            what: what.to_string(),
        }
    }
}
