//! Mount handling: the mount options, making and guarding the mountpoint,
//! mounting, writing back and unmounting.
//!
//! Who may enter: the mount carries suid and dev (containers need their
//! set-user-id binaries and device nodes) and allow_other (containers run
//! as many uids), so a host user who could walk into a layer could run a
//! container's set-user-id binaries or open its devices. The mount root is
//! therefore root's alone ([`ROOT_MODE`]), and [`prepare_mountpoint`] makes
//! the directory above it root's alone too, as Docker does with its own
//! directories. Containers reach their layer through a bind mount or
//! pivot_root of the layer directory, which does not pass through either.

use crate::copies::Copies;
use crate::fs;
use crate::inodes::MOUNT_ROOT;
use crate::passthrough::{Passthrough, PassthroughStats};
use fuser::{Config, MountOption, SessionACL};
use lcfs_engine::Engine;
use std::collections::HashSet;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Mode of the mount root, the directory of layers: root only.
pub(crate) const ROOT_MODE: u16 = 0o700;
/// The most a mountpoint's parent may grant others: group search, as
/// Docker's 0710 directories do.
const PARENT_MODE_MAX: u32 = 0o710;

/// The readahead window, in requests of the size set at init: the kernel caps it
/// by the mount's backing device info, 128 KiB by default, which
/// `set_read_ahead` raises to this. Four requests in flight keep the I/O
/// workers reading in parallel (a cold 1 GiB read took about 40% less
/// time with a 1 MiB window than with 128 KiB, and about 10% less again
/// with 4 MiB).
const READ_AHEAD_WINDOW_BYTES: u32 = 4 << 20;

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
    /// Docker plugin (which make the kernel forget the layer's entry), so
    /// this only bounds how long a change made some other way could stay
    /// unseen.
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
    /// Serve read-only opens of files a layer shares with a frozen layer by
    /// FUSE passthrough to one copy per frozen file (Linux 6.9+): layers
    /// reading one image file at once share one page-cache copy. Turns the
    /// writeback cache off (the kernel allows one or the other). See
    /// docs/fuse.md, "Passthrough".
    pub passthrough: bool,
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
            passthrough: false,
        }
    }
}

/// A mounted lcfs. Dropping it unmounts.
pub struct Mount {
    mountpoint: PathBuf,
    /// Names of removed layers whose entries a thread of their own makes
    /// the kernel forget (see [`Mount::forget_removed_layer`]). Dropped
    /// before `session`: the thread ends by itself.
    forgets: std::sync::mpsc::Sender<String>,
    session: Option<fuser::BackgroundSession>,
    writeback_cache: bool,
    /// Dropped after `session`: the copies mount outlives the main one.
    passthrough: Option<Arc<Passthrough>>,
    /// The mount's device (`major:minor`), which bind mounts of its layer
    /// directories share; None when mountinfo did not show the mount.
    device: Option<String>,
}

impl Mount {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Makes the kernel forget its entry for layer directory `name` (after
    /// a layer was created, removed, frozen or filled beside the mount).
    pub fn forget_layer_entry(&self, name: &str) {
        if let Some(s) = &self.session {
            forget_entry(&s.notifier(), name);
        }
    }

    /// [`Mount::forget_layer_entry`] for a removed layer that nobody looks
    /// up through the mount any more, without waiting: the kernel drops
    /// every cached entry below the layer's directory, which takes about
    /// 3 us per file.
    pub fn forget_removed_layer(&self, name: &str) {
        if self.forgets.send(name.to_string()).is_err() {
            self.forget_layer_entry(name);
        }
    }

    /// The layers whose directory (or a directory below it) is mounted
    /// somewhere else in this process's mount namespace: a container's
    /// rootfs, or a snapshot mounted by containerd or dockerd.
    pub fn layers_mounted(&self) -> HashSet<String> {
        let mountinfo = std::fs::read_to_string(MOUNTINFO);
        match (&self.device, mountinfo) {
            (Some(device), Ok(mountinfo)) => layers_mounted(&mountinfo, device),
            (None, _) => HashSet::new(),
            (_, Err(e)) => {
                log::warn!("reading {MOUNTINFO}: {e}");
                HashSet::new()
            }
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
            // has nothing to do with it, so it goes on. ENOENT: the file's
            // layer was removed, which discards its writes, as it should.
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENOENT) {
                log::debug!("cached writes to a removed layer were dropped");
            } else {
                log::warn!(
                    "a cached write could not be written back to its layer (its writer \
                     is told at fsync or close): {err}"
                );
            }
        }
        Ok(())
    }

    /// Passthrough's counters; None for a mount without it.
    pub fn passthrough_stats(&self) -> Option<PassthroughStats> {
        self.passthrough.as_ref().map(|p| p.stats())
    }

    /// Unmounts and waits for the worker threads. Cached writes are written
    /// back first (the kernel would do it during the unmount too, but a
    /// busy mount falls back to a lazy unmount, which would lose them).
    pub fn unmount(mut self) -> io::Result<()> {
        if let Err(e) = self.write_back() {
            log::warn!("writing cached writes back before unmounting: {e}");
        }
        if self.passthrough.is_some() {
            wait_until_idle(&self.mountpoint);
        }
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

/// Mounts `engine` at `mountpoint` (and, with `options.passthrough`, the
/// copies mount beside it: [`copies_path`]).
pub fn mount(engine: Arc<Engine>, mountpoint: &Path, options: &MountOptions) -> io::Result<Mount> {
    // The kernel allows passthrough or the writeback cache, not both.
    let options = &MountOptions {
        writeback_cache: options.writeback_cache && !options.passthrough,
        ..options.clone()
    };
    let passthrough = if options.passthrough {
        let path = copies_path(mountpoint);
        let copies = Copies::mount(engine.clone(), &path).map_err(|e| {
            io::Error::new(e.kind(), format!("copies mount {}: {e}", path.display()))
        })?;
        set_read_ahead(&path, READ_AHEAD_WINDOW_BYTES);
        Some(Arc::new(Passthrough::new(engine.clone(), copies)))
    } else {
        None
    };
    let (fs, pages) = fs::LcfsFs::new(engine, options, passthrough.clone())?;
    let session = fuser::spawn_mount(fs, mountpoint, &fuser_config(options))?;
    pages.set_notifier(session.notifier());
    set_read_ahead(mountpoint, READ_AHEAD_WINDOW_BYTES);
    let device = mount_device(mountpoint);
    let (forgets, names) = std::sync::mpsc::channel::<String>();
    let notifier = session.notifier();
    std::thread::Builder::new()
        .name("lcfs-forget".into())
        .spawn(move || {
            for name in names {
                forget_entry(&notifier, &name);
            }
        })?;
    Ok(Mount {
        mountpoint: mountpoint.to_path_buf(),
        forgets,
        session: Some(session),
        writeback_cache: options.writeback_cache,
        passthrough,
        device,
    })
}

/// Where the copies mount of a passthrough mount at `mountpoint` goes:
/// `.<name>-copies` beside it, under the same root-only parent.
pub fn copies_path(mountpoint: &Path) -> PathBuf {
    let name = mountpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lcfs".into());
    mountpoint.with_file_name(format!(".{name}-copies"))
}

fn fuser_config(options: &MountOptions) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(options.fsname.clone()),
        MountOption::Subtype("lcfs".into()),
        MountOption::DefaultPermissions,
        MountOption::Dev,
        MountOption::Suid,
        MountOption::RW,
    ];
    config.acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let fuse_threads = options.fuse_threads.max(1);
    config.n_threads = Some(fuse_threads);
    // Each reader its own descriptor: no shared file position or lock.
    config.clone_fd = fuse_threads > 1;
    config
}

/// Makes `mountpoint` ready for [`mount`]: creates it if missing, clears a
/// dead FUSE mount that a killed daemon left there (stat answers
/// ENOTCONN), refuses a live mount, and makes its parent root's alone (see
/// the module comment): a missing parent is made 0700; an existing one that
/// grants others more than group search is narrowed to at most 0710 if it
/// belongs to root, and refused if it belongs to someone else or is a shared
/// sticky directory such as /tmp.
pub fn prepare_mountpoint(mountpoint: &Path) -> io::Result<()> {
    let context = |what: String, e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    if let Some(parent) = mountpoint.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| context(format!("creating {}", parent.display()), e))?;
        guard_parent(parent)?;
    }
    let metadata = match std::fs::metadata(mountpoint) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(mountpoint)
                .map_err(|e| context(format!("creating {}", mountpoint.display()), e))?;
            return Ok(());
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            log::warn!(
                "{} holds a dead FUSE mount (a daemon was killed); unmounting it: containers \
                 started before keep a root that answers ENOTCONN until they are restarted",
                mountpoint.display()
            );
            lazy_unmount(mountpoint);
            std::fs::metadata(mountpoint).map_err(|e| {
                context(
                    format!("{} after unmounting the dead mount", mountpoint.display()),
                    e,
                )
            })?
        }
        Err(e) => return Err(context(mountpoint.display().to_string(), e)),
    };
    if !metadata.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory", mountpoint.display()),
        ));
    }
    // A daemon killed a moment after its mount root was looked at leaves a
    // dead mount whose root attributes the kernel still has cached, so the
    // stat above succeeded. statfs always reaches the daemon: ENOTCONN says
    // nobody serves the mount any more.
    if is_mount_point(mountpoint)? && statfs_errno(mountpoint) == Some(libc::ENOTCONN) {
        log::warn!(
            "{} holds a dead FUSE mount (a daemon was killed); unmounting it: containers \
                 started before keep a root that answers ENOTCONN until they are restarted",
            mountpoint.display()
        );
        lazy_unmount(mountpoint);
    }
    if is_mount_point(mountpoint)? {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} is already a mount point; unmount it or choose another mountpoint",
                mountpoint.display()
            ),
        ));
    }
    Ok(())
}

/// The error statfs(2) gives for `path`, if any.
fn statfs_errno(path: &Path) -> Option<i32> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path and `buf` a writable statfs.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; statfs writes only into `buf`.
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } == 0 {
        None
    } else {
        io::Error::last_os_error().raw_os_error()
    }
}

/// Narrows the mountpoint's parent to root's alone, or refuses it.
fn guard_parent(parent: &Path) -> io::Result<()> {
    let m = std::fs::metadata(parent)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", parent.display())))?;
    let mode = m.mode() & 0o7777;
    if mode & 0o777 & !PARENT_MODE_MAX == 0 {
        return Ok(());
    }
    let refuse = |why: &str| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} (mode {mode:o}) {why}; other users could reach the layers' \
                 set-user-id binaries and devices through it: choose a mountpoint \
                 in a directory of root's own, such as /var/lib/lcfs/mnt",
                parent.display()
            ),
        ))
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    if m.uid() != own {
        return refuse(&format!("belongs to uid {}, not to this daemon", m.uid()));
    }
    if mode & libc::S_ISVTX != 0 || parent.parent().is_none() {
        return refuse("is a directory shared with other users");
    }
    let narrowed = mode & !0o777 | mode & PARENT_MODE_MAX;
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(narrowed))
        .map_err(|e| io::Error::new(e.kind(), format!("chmod {}: {e}", parent.display())))?;
    log::warn!(
        "narrowed {} from mode {mode:o} to {narrowed:o}: host users other than root \
         must not reach the layers below it",
        parent.display()
    );
    Ok(())
}

/// Whether `path` is the root of a mount: its device differs from its parent's.
fn is_mount_point(path: &Path) -> io::Result<bool> {
    let Some(parent) = path.parent() else {
        return Ok(true);
    };
    let own = std::fs::metadata(path)?;
    let above = std::fs::metadata(parent)?;
    Ok(own.dev() != above.dev() || own.ino() == above.ino())
}

/// Waits up to 2 s while the mount at `path` is busy. With passthrough, the
/// kernel drops the backing files of closed files (each holds the mount) a
/// moment after close(2) returned, so an unmount right after the last close
/// can find the mount busy. Asks with MNT_EXPIRE, which unmounts nothing on
/// a first call: EBUSY while in use, EAGAIN (and an expiry mark that the
/// next access clears) once not.
pub(crate) fn wait_until_idle(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    for _ in 0..100 {
        // SAFETY: umount2 reads a valid C string.
        let busy = unsafe { libc::umount2(c.as_ptr(), libc::MNT_EXPIRE) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY);
        if !busy {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Detaches the mount at `mountpoint` even while it is busy (umount -l).
pub fn lazy_unmount(mountpoint: &Path) {
    match Command::new("umount").arg("-l").arg(mountpoint).status() {
        Ok(s) if s.success() => {}
        Ok(s) => log::warn!("umount -l {}: {s}", mountpoint.display()),
        Err(e) => log::warn!("umount -l {}: {e}", mountpoint.display()),
    }
}

/// Raises the readahead window of the mount's backing device info (the
/// kernel starts FUSE mounts at 128 KiB whatever max_readahead says): with
/// 128 KiB a cold sequential read is a round trip and a device read per
/// 128 KiB. Found through /proc/self/mountinfo (a stat of the mountpoint
/// would be a FUSE request). Needs root; without it the default stays.
fn set_read_ahead(mountpoint: &Path, bytes: u32) {
    let Some(device) = mount_device(mountpoint) else {
        log::debug!("readahead: {} not in mountinfo", mountpoint.display());
        return;
    };
    let path = format!("/sys/class/bdi/{device}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, format!("{}", bytes / 1024)) {
        log::info!("readahead stays at the kernel's default: writing {path}: {e}");
    }
}

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// The device (`major:minor`) of the newest mount on `mountpoint`.
fn mount_device(mountpoint: &Path) -> Option<String> {
    let mountinfo = std::fs::read_to_string(MOUNTINFO).ok()?;
    let want = mountpoint.as_os_str().as_bytes();
    // Fields: id parent major:minor root mountpoint ...; the last match is
    // the newest mount on that path.
    mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 4 && unescape_mountinfo(f[4]) == want).then(|| f[2].to_string())
        })
        .next_back()
}

/// The layers of which `mountinfo` shows a mount of the filesystem on
/// `device`: a bind mount of the layer's directory, or of a directory below
/// it. The mount of the whole filesystem (root `/`) names no layer.
fn layers_mounted(mountinfo: &str, device: &str) -> HashSet<String> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() < 5 || f[2] != device {
                return None;
            }
            let root = unescape_mountinfo(f[3]);
            let layer = root.strip_prefix(b"/")?.split(|&b| b == b'/').next()?;
            (!layer.is_empty()).then(|| String::from_utf8_lossy(layer).into_owned())
        })
        .collect()
}

/// Makes the kernel forget its entry for layer directory `name`, and the
/// root's cached listing and attributes (its entries changed).
fn forget_entry(notifier: &fuser::Notifier, name: &str) {
    let _ = notifier.inval_entry(fuser::INodeNo(MOUNT_ROOT), std::ffi::OsStr::new(name));
    let _ = notifier.inval_inode(fuser::INodeNo(MOUNT_ROOT), 0, 0);
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c));
        if b[i] == b'\\' && octal {
            let value = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// A mount shared by the daemon's front ends (control socket, Docker plugin,
/// containerd snapshotter) and unmounted at shutdown by whoever holds the
/// write lock: after the unmount there is nothing left to invalidate or write
/// back.
pub struct SharedMount(pub Arc<RwLock<Option<Mount>>>);

impl crate::KernelCache for SharedMount {
    fn forget_layer_entry(&self, layer: &str) {
        if let Some(m) = self.0.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            m.forget_layer_entry(layer);
        }
    }

    fn forget_removed_layer(&self, layer: &str) {
        if let Some(m) = self.0.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            m.forget_removed_layer(layer);
        }
    }

    fn layers_mounted(&self) -> HashSet<String> {
        let mount = self.0.read().unwrap_or_else(|p| p.into_inner());
        mount
            .as_ref()
            .map(Mount::layers_mounted)
            .unwrap_or_default()
    }

    fn write_back(&self) -> io::Result<()> {
        // Under the read lock: the unmount (which takes the write lock)
        // waits until the kernel has written back.
        match self.0.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(m) => m.write_back(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_mounted_are_the_first_component_of_each_bind_mounts_root() {
        let mountinfo = "\
36 27 0:40 / /var/lib/lcfs/mnt rw,nosuid - fuse lcfs rw,user_id=0
49 27 0:40 /containerd-13//deleted /tmp/containerd-mount1 ro,relatime - fuse lcfs rw
50 27 0:40 /layer\\040with\\040space/usr/lib /srv/x rw - fuse lcfs rw
51 27 0:41 /other-mounts-layer /srv/y rw - fuse lcfs rw
52 27 0:40 /container-7 /run/containerd/task/rootfs rw - fuse lcfs rw
short line
";
        let got = layers_mounted(mountinfo, "0:40");
        let want: HashSet<String> = ["containerd-13", "layer with space", "container-7"]
            .map(String::from)
            .into();
        assert_eq!(got, want);
        assert!(layers_mounted(mountinfo, "0:99").is_empty());
    }
}
