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
    /// Worker threads for data reads over 32 KiB and fsyncs (the threads
    /// reading /dev/fuse answer everything else themselves; see docs/fuse.md).
    pub threads: usize,
    /// Threads reading /dev/fuse and answering requests, each on its own
    /// cloned descriptor when more than one. One is the default: on the
    /// 2-vCPU machines measured, more made every round trip slower (the
    /// wake-ups between vCPUs dominate, docs/fuse.md).
    pub fuse_threads: usize,
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
    /// Let the kernel cache writes (FUSE's writeback cache) and send them
    /// in large pieces later, at the latest on close, fsync, or
    /// [`Mount::write_back`], which everything that clones, freezes or diffs
    /// a layer calls first. Off: every write(2) is a round trip that
    /// reaches the engine before it returns. See docs/fuse.md.
    pub writeback_cache: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            threads: 4,
            fuse_threads: 1,
            allow_other: true,
            entry_timeout: Duration::from_secs(60),
            attr_timeout: Duration::from_secs(60),
            frozen_layer_timeout: Duration::from_secs(24 * 3600),
            fsname: "lcfs".into(),
            writeback_cache: true,
        }
    }
}

/// A mounted lcfs. Dropping it unmounts.
pub struct Mount {
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
    writeback_cache: bool,
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

    /// Makes every write the kernel still caches reach the engine: with the
    /// writeback cache on, data written to files that are still open (or
    /// mapped) may sit in the page cache until the kernel writes it back.
    /// Call it before cloning, freezing, diffing or checkpointing a layer.
    /// Returns when the kernel has written everything back (syncfs(2) on the
    /// mount: the kernel's part of it sends the cached writes to this
    /// daemon). Must not be called from a thread that serves the mount or
    /// holds a lock its requests need.
    pub fn write_back(&self) -> io::Result<()> {
        if !self.writeback_cache || self.session.is_none() {
            return Ok(());
        }
        let root = std::fs::File::open(&self.mountpoint)?;
        // SAFETY: syncfs only reads the descriptor, which `root` keeps open.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&root)) } != 0 {
            // The kernel reports, once, a write-back that failed since the
            // last report (a write into a layer frozen while the file was
            // open, or a full device). The data of that write is gone, and
            // its writer is told at fsync or close; the caller's operation
            // has nothing to do with it, so it goes on.
            log::warn!(
                "a cached write could not be written back to its layer (its writer \
                 is told at fsync or close): {}",
                io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Unmounts and waits for the worker threads. Cached writes are written
    /// back first (the kernel would do it during the unmount too, but a
    /// busy mount falls back to a lazy unmount, which would lose them).
    pub fn unmount(mut self) -> io::Result<()> {
        if let Err(e) = self.write_back() {
            log::warn!("writing cached writes back before unmounting: {e}");
        }
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
        writeback_cache: options.writeback_cache,
    })
}

mod fs;
