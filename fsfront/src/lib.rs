//! lcfs FUSE front: serves every engine layer as a directory of one mount,
//! `<mountpoint>/<layer-name>/`. See docs/fuse.md for the caching policy.

use lcfs_engine::Engine;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How the filesystem is mounted.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Worker threads for data reads and fsyncs (one thread reads /dev/fuse
    /// and answers everything else itself; see docs/fuse.md).
    pub threads: usize,
    /// Let every user in (containers run as many uids); permission checks
    /// are the kernel's (default_permissions).
    pub allow_other: bool,
    /// How long the kernel may cache names and attributes of writable
    /// layers. Every change to a writable layer comes through this mount
    /// (the kernel updates its own copy) or from the control socket and the
    /// Docker plugin (which invalidate the layer), so this only bounds how
    /// long a change made some other way could stay unseen.
    pub entry_timeout: Duration,
    pub attr_timeout: Duration,
    /// The same for frozen layers, which never change.
    pub frozen_layer_timeout: Duration,
    /// Shown as the mount's source in /proc/mounts.
    pub fsname: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            threads: 4,
            allow_other: true,
            entry_timeout: Duration::from_secs(60),
            attr_timeout: Duration::from_secs(60),
            frozen_layer_timeout: Duration::from_secs(24 * 3600),
            fsname: "lcfs".into(),
        }
    }
}

/// A mounted lcfs. Dropping it unmounts.
pub struct Mount {
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl Mount {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Tells the kernel a layer directory appeared or went away (after
    /// creating or removing a layer outside the mount).
    pub fn invalidate_layer(&self, name: &str) {
        if let Some(s) = &self.session {
            let _ = s
                .notifier()
                .inval_entry(fuser::INodeNo(fs::MOUNT_ROOT), std::ffi::OsStr::new(name));
        }
    }

    /// Unmounts and waits for the worker threads.
    pub fn unmount(mut self) -> io::Result<()> {
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

/// Mounts `engine` at `mountpoint`.
pub fn mount(engine: Arc<Engine>, mountpoint: &Path, options: &MountOptions) -> io::Result<Mount> {
    let session = fs::spawn(engine, mountpoint, options)?;
    Ok(Mount {
        mountpoint: mountpoint.to_path_buf(),
        session: Some(session),
    })
}

mod fs;
