//! Root-only unix sockets: made so that no one else can connect, and the
//! peer's uid for the check that follows every accept (the daemon's control
//! socket uses these too).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Binds a socket at `path` with mode 0600, creating its directory (0700)
/// if missing; an existing directory keeps its mode (it may be shared, as
/// Docker's plugin directory is). The socket is never reachable by others,
/// not even for a moment (see [`lcfs_fsfront::bind_private_socket`]).
pub fn bind_root_only(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
    }
    lcfs_fsfront::bind_private_socket(path)
}

/// The uid of the process at the other end (SO_PEERCRED).
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: credentials is a live ucred and len holds its exact size, as
    // SO_PEERCRED requires; the kernel writes at most len bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut credentials as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(credentials.uid)
}
