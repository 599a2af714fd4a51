//! FUSE passthrough of shared files (Linux 6.9+, `lcfs daemon
//! --passthrough`): a read-only open of a file that a layer has not changed
//! since a frozen layer (`Engine::shared_copy`) is answered with
//! FOPEN_PASSTHROUGH to that frozen layer's copy in the copies mount
//! (copies.rs). read(2) and mmap of it then go to the copy without a round
//! trip, and every layer reading it shares the copy's page cache: twenty
//! containers holding an image's file open cost one copy, not twenty.
//!
//! The kernel's rules for one inode (measured, docs/fuse.md): once a file of
//! it is open in passthrough, every other open must name the same backing
//! file (a cached open fails with EIO), and the other way round. So this
//! module tracks, per kernel node, whether its open files are cached or
//! passed through, and while any is passed through:
//! - a read-only open whose layer still shares the copy is passed through;
//! - a writable open, or any open once the layer changed the file, is
//!   answered FOPEN_DIRECT_IO with the same backing file: its read(2) and
//!   write(2) reach the daemon (the layer's own copy), its mmap maps the
//!   frozen copy (a shared writable mapping fails with ENODEV).
//!
//! What that costs: a file already open read-only in passthrough keeps
//! reading the frozen copy after another process of the same container
//! writes the file, until it is reopened (kernel overlayfs has the same gap
//! for mapped files only). Other layers and the image never see the write.
//! The kernel refuses passthrough on a connection with the writeback cache,
//! so the mount runs without it.

use crate::copies::Copies;
use fuser::{BackingId, ReplyOpen};
use lcfs_engine::Engine;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// A frozen copy registered with the kernel as a backing file.
pub(crate) struct Backing {
    /// The frozen layer whose copy this is.
    layer: u64,
    pub(crate) id: BackingId,
    _file: File,
}

enum NodeFiles {
    /// Open files of the node that use its own page cache.
    Cached(u32),
    /// Open files passed through to `backing`.
    Passed { files: u32, backing: Arc<Backing> },
}

#[derive(Default)]
struct State {
    nodes: HashMap<u64, NodeFiles>,
    /// Backing files by (frozen layer, inode), while any node uses them.
    copies: HashMap<(u64, u64), Weak<Backing>>,
    /// File handle -> node, for passed-through files.
    handles: HashMap<u64, u64>,
    /// Nodes written through a direct open while passed through: the next
    /// cached open drops whatever pages the node kept from before.
    refresh: HashSet<u64>,
    next_fh: u64,
}

/// How to answer an open.
pub(crate) enum OpenAs {
    Cached,
    /// A cached open that drops the node's old pages (no FOPEN_KEEP_CACHE).
    CachedFresh,
    Passthrough {
        fh: u64,
        /// read(2)/write(2) through the daemon, mmap through the backing.
        direct: bool,
        backing: Arc<Backing>,
    },
}

/// Counters for `lcfs stats`.
#[derive(Default)]
pub(crate) struct Counters {
    opens: AtomicU64,
    direct_opens: AtomicU64,
}

/// What passthrough did since the mount (see [`crate::Mount::passthrough_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassthroughStats {
    /// False once the kernel refused passthrough (files are then served
    /// through the daemon).
    pub active: bool,
    /// Opens answered with passthrough to a frozen copy.
    pub opens: u64,
    /// Of those, opens with read(2)/write(2) through the daemon (writable,
    /// or the layer changed the file while it was passed through).
    pub direct_opens: u64,
}

pub(crate) struct Passthrough {
    engine: Arc<Engine>,
    enabled: AtomicBool,
    /// Holds the backing files, which are open in the copies mount: dropped
    /// before `copies`, so the copies mount is idle when it unmounts.
    state: Mutex<State>,
    counters: Counters,
    copies: Copies,
}

impl Passthrough {
    pub(crate) fn new(engine: Arc<Engine>, copies: Copies) -> Passthrough {
        Passthrough {
            engine,
            enabled: AtomicBool::new(true),
            state: Mutex::default(),
            counters: Counters::default(),
            copies,
        }
    }

    /// Turns passthrough off for the rest of the mount's life (the kernel
    /// refused it); opens are cached opens from then on.
    pub(crate) fn disable(&self, why: &str) {
        if self.enabled.swap(false, Ordering::SeqCst) {
            log::warn!("passthrough off: {why}; files are served through the daemon");
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    pub(crate) fn stats(&self) -> PassthroughStats {
        PassthroughStats {
            active: self.enabled(),
            opens: self.counters.opens.load(Ordering::Relaxed),
            direct_opens: self.counters.direct_opens.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides how to answer an open of `inode` in `layer`, kernel node
    /// `node`, and records the open file (the caller answers `reply`).
    pub(crate) fn open(
        &self,
        node: u64,
        layer: u64,
        inode: u64,
        writable: bool,
        reply: &ReplyOpen,
    ) -> OpenAs {
        let mut st = self.lock();
        match st.nodes.get_mut(&node) {
            Some(NodeFiles::Cached(n)) => {
                *n += 1;
                return OpenAs::Cached;
            }
            Some(NodeFiles::Passed { files, backing }) => {
                *files += 1;
                let backing = backing.clone();
                if writable {
                    st.refresh.insert(node);
                }
                let shared = !writable
                    && matches!(self.engine.shared_copy(layer, inode), Ok(Some(l)) if l == backing.layer);
                return self.passed(&mut st, node, !shared, backing);
            }
            None => {}
        }
        if !writable && self.enabled() {
            if let Ok(Some(frozen)) = self.engine.shared_copy(layer, inode) {
                match self.backing(&mut st, frozen, inode, reply) {
                    Ok(backing) => {
                        st.nodes.insert(
                            node,
                            NodeFiles::Passed {
                                files: 1,
                                backing: backing.clone(),
                            },
                        );
                        return self.passed(&mut st, node, false, backing);
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                        self.disable(&format!("the kernel refused a backing file: {e}"))
                    }
                    Err(e) => log::warn!(
                        "no backing file for inode {inode} of layer {frozen}: {e}; served \
                         through the daemon"
                    ),
                }
            }
        }
        st.nodes.insert(node, NodeFiles::Cached(1));
        if st.refresh.remove(&node) {
            OpenAs::CachedFresh
        } else {
            OpenAs::Cached
        }
    }

    fn passed(&self, st: &mut State, node: u64, direct: bool, backing: Arc<Backing>) -> OpenAs {
        st.next_fh += 1;
        let fh = st.next_fh;
        st.handles.insert(fh, node);
        self.counters.opens.fetch_add(1, Ordering::Relaxed);
        if direct {
            self.counters.direct_opens.fetch_add(1, Ordering::Relaxed);
        }
        OpenAs::Passthrough {
            fh,
            direct,
            backing,
        }
    }

    /// The backing file of `inode`'s copy in frozen layer `layer`, shared by
    /// every node that uses it.
    fn backing(
        &self,
        st: &mut State,
        layer: u64,
        inode: u64,
        reply: &ReplyOpen,
    ) -> std::io::Result<Arc<Backing>> {
        if let Some(b) = st.copies.get(&(layer, inode)).and_then(Weak::upgrade) {
            return Ok(b);
        }
        let file = File::open(self.copies.path_of(layer, inode))?;
        let id = reply.open_backing(&file)?;
        let b = Arc::new(Backing {
            layer,
            id,
            _file: file,
        });
        st.copies.retain(|_, w| w.strong_count() > 0);
        st.copies.insert((layer, inode), Arc::downgrade(&b));
        Ok(b)
    }

    /// A file `create` opened (a cached open of a new node).
    pub(crate) fn created(&self, node: u64) {
        let mut st = self.lock();
        match st.nodes.get_mut(&node) {
            Some(NodeFiles::Cached(n)) => *n += 1,
            Some(NodeFiles::Passed { .. }) => {}
            None => {
                st.nodes.insert(node, NodeFiles::Cached(1));
            }
        }
    }

    /// A release of file handle `fh` of node `node` (0: a cached open).
    pub(crate) fn released(&self, node: u64, fh: u64) {
        let mut st = self.lock();
        if fh != 0 {
            st.handles.remove(&fh);
        }
        let done = match st.nodes.get_mut(&node) {
            Some(NodeFiles::Cached(n)) if fh == 0 => {
                *n -= 1;
                *n == 0
            }
            Some(NodeFiles::Passed { files, .. }) if fh != 0 => {
                *files -= 1;
                *files == 0
            }
            _ => false,
        };
        if done {
            // The last file of the node: its backing file goes with the
            // last node that uses it.
            st.nodes.remove(&node);
        }
    }
}
