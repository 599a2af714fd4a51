//! Opening the device for a command: the exclusive lock that keeps two lcfs
//! processes off one device file, and errors that tell the user what to do.

use crate::error::{Error, Result};
use lcfs_engine::device::{open_device, Device, OpenOptions};
use lcfs_engine::{Config, Engine};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

/// Default device file of `lcfs mkfs`, `lcfs daemon` and `lcfs fsck`.
pub const DEFAULT_DEVICE: &str = "/var/lib/lcfs/device.img";

/// An exclusive `flock` on a regular-file device, held while the value lives.
/// Block devices need none: the engine opens them with O_EXCL, which the
/// kernel enforces between processes.
pub struct DeviceLock {
    _file: Option<File>,
}

/// Locks `path` for this process, or says who holds it.
pub fn lock(path: &Path) -> Result<DeviceLock> {
    let metadata = std::fs::metadata(path).map_err(|e| Error::io(path.display().to_string(), e))?;
    if !metadata.is_file() {
        return Ok(DeviceLock { _file: None });
    }
    let file = File::open(path).map_err(|e| Error::io(path.display().to_string(), e))?;
    // SAFETY: flock takes a descriptor we own and plain flags; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            in_use_error(path)
        } else {
            Error::io(format!("{}: locking", path.display()), e)
        });
    }
    Ok(DeviceLock { _file: Some(file) })
}

fn in_use_error(path: &Path) -> Error {
    Error::Usage(format!(
        "{} is in use by another lcfs process (a running `lcfs daemon`?)",
        path.display()
    ))
}

/// Opens a locked device with the engine's default backend choice.
pub fn open(path: &Path) -> Result<Arc<dyn Device>> {
    match open_device(path, &OpenOptions::default()) {
        Ok(dev) => Ok(Arc::from(dev)),
        Err(lcfs_engine::Error::Busy(_)) => Err(in_use_error(path)),
        Err(lcfs_engine::Error::Io(e)) if e.kind() == io::ErrorKind::NotFound => {
            Err(no_device(path))
        }
        Err(e) => Err(Error::engine(path.display().to_string(), e)),
    }
}

/// The error for a device path that does not exist.
pub fn no_device(path: &Path) -> Error {
    Error::Usage(format!(
        "no device at {}: create one with `lcfs mkfs {} --size 10G`",
        path.display(),
        path.display()
    ))
}

/// Opens the engine on a device, turning "not formatted" into advice.
pub fn open_engine(path: &Path, dev: Arc<dyn Device>, config: Config) -> Result<Arc<Engine>> {
    Engine::open(dev, config).map_err(|e| match e {
        lcfs_engine::Error::NotFormatted => Error::Usage(format!(
            "{} has no lcfs filesystem: run `lcfs mkfs {}` first",
            path.display(),
            path.display()
        )),
        e => Error::engine(format!("opening lcfs on {}", path.display()), e),
    })
}
