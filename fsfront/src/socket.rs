//! Claiming a unix socket path for a daemon's listener (the control socket,
//! the Docker plugin's, the containerd snapshotter's): one rule for all.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Why a socket path cannot be claimed.
#[derive(Debug)]
pub enum ClaimError {
    /// Something that is not a socket is there.
    NotASocket,
    /// A listener answers there (another daemon).
    Live,
    /// Creating the directory, reading or removing the path failed.
    Io(String, io::Error),
}

impl std::fmt::Display for ClaimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClaimError::NotASocket => write!(f, "exists and is not a socket"),
            ClaimError::Live => write!(f, "another daemon is serving it"),
            ClaimError::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

/// Makes sure `path` can be bound: creates its directory (0700, root's
/// alone) when missing and removes a socket left by a daemon that died, but
/// refuses a path where a listener answers or that is not a socket.
pub fn claim_socket_path(path: &Path) -> Result<(), ClaimError> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| ClaimError::Io(format!("creating {}", dir.display()), e))?;
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ClaimError::Io(path.display().to_string(), e)),
        Ok(m) if !m.file_type().is_socket() => Err(ClaimError::NotASocket),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(ClaimError::Live),
            Err(_) => {
                log::warn!("removing stale socket {}", path.display());
                std::fs::remove_file(path)
                    .map_err(|e| ClaimError::Io(format!("removing {}", path.display()), e))
            }
        },
    }
}
