//! The plugin's error type. Handlers return it; the HTTP layer maps it to
//! `{"Err": "<Display>"}` (or a non-200 status for Diff), so every message
//! must say what failed and, where it can, what to do about it.

/// Everything a plugin call can fail with.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request body that is not the JSON the method takes.
    #[error("malformed request to {method}: {detail}")]
    BadRequest { method: String, detail: String },
    /// A storage option (`--storage-opt`) the plugin does not know, or a
    /// bad value.
    #[error("{0}")]
    BadOption(String),
    /// A method this plugin does not implement.
    #[error("unknown method {0:?}; this plugin implements Plugin.Activate and GraphDriver.*")]
    UnknownMethod(String),
    /// A layer id Docker passed that the engine does not know.
    #[error("layer {0:?} does not exist")]
    UnknownLayer(String),
    /// A layer id that cannot be a layer name.
    #[error("invalid layer id {0:?}: ids must be 1-255 bytes without '/' or NUL")]
    InvalidId(String),
    /// Another mutating call on the same id is in flight.
    #[error("layer {0:?} is busy with another call (create, remove or apply); retry")]
    Busy(String),
    /// The tar stream given to ApplyDiff is unusable or hostile.
    #[error("bad layer tar at entry {entry}: {detail}")]
    BadTar { entry: u64, detail: String },
    /// Something Docker asked for that lcfs does not do.
    #[error("{0}")]
    Unsupported(String),
    /// An engine failure, with what the plugin was doing.
    #[error("{context}: {source}")]
    Engine {
        context: String,
        #[source]
        source: lcfs_engine::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn engine(context: impl Into<String>, source: lcfs_engine::Error) -> Error {
        Error::Engine {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
