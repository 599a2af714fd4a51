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

/// Binds a unix socket at `path` with mode 0600, never reachable by others:
/// it is bound inside a fresh 0700 directory next to `path`, made 0600
/// there, then renamed into place (the listener keeps serving the renamed
/// socket). Narrowing the umask around bind(2) would do the same with one
/// call less, but the umask is the whole process's: a thread creating a
/// file or directory meanwhile would get the narrowed mode too.
pub fn bind_private_socket(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // A short name: the socket's own path must stay within sun_path.
    let mut private = None;
    for n in 0..64u32 {
        let candidate = dir.join(format!(".s{}.{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&candidate) {
            Ok(()) => {
                private = Some(candidate);
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("creating {}: {e}", candidate.display()),
                ))
            }
        }
    }
    let private = private.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("no free private directory name in {}", dir.display()),
        )
    })?;
    let bound = (|| {
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
        let staged = private.join("s");
        let listener = std::os::unix::net::UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound.map_err(|e: io::Error| {
        io::Error::new(e.kind(), format!("binding {}: {e}", path.display()))
    })
}

#[cfg(test)]
mod bind_tests {
    use super::bind_private_socket;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// The socket is 0600 from the moment it has its name, whatever threads
    /// beside it create meanwhile (they keep the process's umask), and the
    /// staging directory is gone.
    #[test]
    fn the_socket_is_private_and_the_umask_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let umask = current_umask();
        let creator = {
            let (root, stop) = (dir.path().join("others"), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let d = root.join(n.to_string());
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .create(&d)
                        .unwrap();
                    let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
                    assert_eq!(mode, 0o777 & !umask, "a directory made beside bind");
                    n += 1;
                }
            })
        };
        for i in 0..200 {
            let path = dir.path().join(format!("sock{i}"));
            let listener = bind_private_socket(&path).unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
            std::os::unix::net::UnixStream::connect(&path).unwrap();
            drop(listener);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        creator.join().unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".s"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    fn current_umask() -> u32 {
        // Reading the umask means setting it; put the same value back.
        // SAFETY: umask only swaps the process's file mode mask.
        let m = unsafe { libc::umask(0o022) };
        // SAFETY: as above.
        unsafe { libc::umask(m) };
        m
    }
}
