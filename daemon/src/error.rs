//! The one error type of the `lcfs` binary. Every command returns it; `main`
//! prints it as `lcfs: <message>` and exits 1.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An engine call failed; `context` says what was being done.
    #[error("{context}: {source}")]
    Engine {
        context: String,
        source: lcfs_engine::Error,
    },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    /// No daemon answers on the control socket.
    #[error("is `lcfs daemon` running? ({why} at {})", socket.display())]
    NoDaemon { socket: PathBuf, why: &'static str },
    /// The daemon answered a request with an error.
    #[error("{message}")]
    Daemon { errno: i32, message: String },
    /// The daemon's answer did not follow docs/control-protocol.md.
    #[error("bad answer from the daemon: {0}")]
    Protocol(String),
    /// Something the user asked for cannot be done as asked.
    #[error("{0}")]
    Usage(String),
    /// fsck found problems (the report has been printed).
    #[error("{0}")]
    Problems(String),
}

impl Error {
    pub fn engine(context: impl Into<String>, source: lcfs_engine::Error) -> Error {
        Error::Engine {
            context: context.into(),
            source,
        }
    }

    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
