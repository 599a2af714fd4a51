//! The snapshotter's errors and the gRPC codes containerd's errdefs turns
//! back into its own (`errdefs/grpc.go`: NotFound, AlreadyExists,
//! FailedPrecondition, InvalidArgument, Unimplemented; anything else is
//! unknown to it).

use tonic::{Code, Status};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {0:?}: not found")]
    NotFound(String),
    #[error("snapshot {0:?}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{what}: {source}")]
    Engine {
        what: String,
        source: lcfs_engine::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// A diff Apply could not unpack the layer tar (lcfs-dockerplugin's
    /// applier: a bad or hostile tar, or the engine refusing a change).
    #[error("applying the diff: {0}")]
    Apply(lcfs_dockerplugin::Error),
    /// A diff blob that is not what its descriptor says (size, digest) or
    /// not readable as one (bad compression, bytes after the archive).
    #[error("{0}")]
    BadBlob(String),
    /// containerd's content service failed; its code is passed on.
    #[error("reading the blob from containerd's content store: {}", .0.message())]
    Content(Status),
    /// containerd's content service cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// containerd's content or leases service refused a write of a diff.
    #[error("writing the diff to containerd's content store: {}", .0.message())]
    ContentWrite(Status),
    /// containerd's images or namespaces service failed (per-image
    /// statistics; see images.rs).
    #[error("{what}: {}", .status.message())]
    Containerd { what: String, status: Status },
    /// The layer tar of a Diff could not be made.
    #[error("computing the diff: {0}")]
    Export(lcfs_dockerplugin::Error),
}

impl Error {
    pub(crate) fn engine(what: impl Into<String>, source: lcfs_engine::Error) -> Error {
        Error::Engine {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// The gRPC code containerd maps back to the matching errdefs error.
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Engine { source, .. } => match source {
                lcfs_engine::Error::NotFound => Code::NotFound,
                lcfs_engine::Error::Exists => Code::AlreadyExists,
                lcfs_engine::Error::Invalid(_) | lcfs_engine::Error::NameTooLong => {
                    Code::InvalidArgument
                }
                lcfs_engine::Error::Busy(_) | lcfs_engine::Error::HasChildren { .. } => {
                    Code::FailedPrecondition
                }
                lcfs_engine::Error::NoSpace => Code::ResourceExhausted,
                _ => Code::Internal,
            },
            Error::Io { .. } => Code::Internal,
            Error::Apply(e) => match e {
                lcfs_dockerplugin::Error::BadTar { .. }
                | lcfs_dockerplugin::Error::BadRequest { .. } => Code::InvalidArgument,
                lcfs_dockerplugin::Error::Engine { source, .. } => match source {
                    lcfs_engine::Error::NoSpace => Code::ResourceExhausted,
                    // A hard link to a missing target, a name over 255
                    // bytes, a path through a non-directory: the tar's fault.
                    lcfs_engine::Error::NotFound
                    | lcfs_engine::Error::Invalid(_)
                    | lcfs_engine::Error::NameTooLong
                    | lcfs_engine::Error::NotDirectory
                    | lcfs_engine::Error::IsDirectory => Code::InvalidArgument,
                    lcfs_engine::Error::ReadOnly => Code::FailedPrecondition,
                    _ => Code::Internal,
                },
                _ => Code::Internal,
            },
            // containerd's own content store answers a digest mismatch
            // with FailedPrecondition ("unexpected commit digest").
            Error::BadBlob(_) => Code::FailedPrecondition,
            Error::Content(status) | Error::ContentWrite(status) => status.code(),
            Error::Containerd { status, .. } => status.code(),
            Error::Export(lcfs_dockerplugin::Error::Unsupported(_)) => Code::Unimplemented,
            Error::Export(_) => Code::Internal,
            Error::Unavailable(_) => Code::Unavailable,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_errdefs_codes() {
        let cases = [
            (lcfs_engine::Error::NotFound, Code::NotFound),
            (lcfs_engine::Error::Exists, Code::AlreadyExists),
            (
                lcfs_engine::Error::Invalid("x".into()),
                Code::InvalidArgument,
            ),
            (
                lcfs_engine::Error::Busy("x".into()),
                Code::FailedPrecondition,
            ),
            (lcfs_engine::Error::ReadOnly, Code::Internal),
        ];
        for (source, code) in cases {
            assert_eq!(Error::engine("op", source).code(), code);
        }
        let status: Status = Error::NotFound("k".into()).into();
        assert_eq!(status.code(), Code::NotFound);
    }
}
