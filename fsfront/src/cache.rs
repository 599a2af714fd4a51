//! What the kernel may cache, and for how long: names and attributes (a
//! timeout per layer), and file pages (kept or dropped).
//!
//! Names and attributes of a writable layer are kept for the mount's entry
//! and attribute timeouts: every change to it comes through this mount (the
//! kernel updates its own copy) or beside it through `LayerOps`, which makes
//! the kernel forget the layer's entry. A frozen layer never changes: its
//! names and attributes are kept for the frozen-layer timeout (a day).
//!
//! Every open keeps the file's cached pages (FOPEN_KEEP_CACHE): frozen
//! layers never change and every change to a writable layer comes through
//! the mount, so cached pages stay valid. But the kernel keys its page
//! cache by inode, and each layer's copy of a shared file is another inode:
//! twenty containers reading one image file would hold twenty copies. So at
//! most one *closed* copy of a shared file is kept; opening a copy drops the
//! closed copies of other layers, and the last close of a copy drops it when
//! another copy is cached too. The engine's block cache serves the rest, one
//! copy for every layer. (mmap holds the file open, so mapped pages are
//! never dropped under a user.)
//!
//! Drops are sent from their own thread: a notification written from inside
//! a request handler could wait on that very request.

use crate::MountOptions;
use fuser::{FopenFlags, INodeNo};
use lcfs_engine::{Engine, LayerShape};
use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// How many drops may wait for the dropping thread; more are skipped (a
/// skipped drop only leaves an extra copy cached).
const PENDING_DROPS: usize = 4096;

/// The open flags every open and create answers with.
pub(crate) fn open_flags() -> FopenFlags {
    FopenFlags::FOPEN_KEEP_CACHE
}

/// A file whose data other layers may share, by its origin: the layer that
/// created the inode, and the inode number.
pub(crate) type Origin = (u64, u64);

/// The timeouts and page decisions of one mount.
pub(crate) struct CachePolicy {
    engine: Arc<Engine>,
    entry_ttl: Duration,
    attr_ttl: Duration,
    /// Names and attributes of frozen layers: they never change.
    frozen_ttl: Duration,
    /// The shapes of frozen layers (they never change).
    frozen: Mutex<HashMap<u64, LayerShape>>,
    pages: Arc<PageCache>,
}

impl CachePolicy {
    pub(crate) fn new(
        engine: Arc<Engine>,
        options: &MountOptions,
        pages: Arc<PageCache>,
    ) -> CachePolicy {
        CachePolicy {
            engine,
            entry_ttl: options.entry_timeout,
            attr_ttl: options.attr_timeout,
            frozen_ttl: options.frozen_layer_timeout,
            frozen: Mutex::new(HashMap::new()),
            pages,
        }
    }

    /// How long the kernel may keep a name in `layer`: long for a frozen
    /// layer (known frozen once `note_layer` or an open has seen it so),
    /// else the mount's entry timeout.
    pub(crate) fn entry_ttl(&self, layer: u64) -> Duration {
        if self.known_frozen(layer) {
            self.frozen_ttl
        } else {
            self.entry_ttl
        }
    }

    pub(crate) fn attr_ttl(&self, layer: u64) -> Duration {
        if self.known_frozen(layer) {
            self.frozen_ttl
        } else {
            self.attr_ttl
        }
    }

    /// For names in the mount root (layers come and go).
    pub(crate) fn mount_entry_ttl(&self) -> Duration {
        self.entry_ttl
    }

    /// For the mount root's own attributes.
    pub(crate) fn mount_attr_ttl(&self) -> Duration {
        self.attr_ttl
    }

    /// Notes whether `layer` is frozen (for its timeouts).
    pub(crate) fn note_layer(&self, layer: u64) {
        let _ = self.layer_shape(layer);
    }

    fn known_frozen(&self, layer: u64) -> bool {
        self.frozen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&layer)
    }

    /// An open of `inode` in `layer`, kernel node id `node`.
    pub(crate) fn opened(&self, node: u64, layer: u64, inode: u64) {
        self.pages.opened(node, self.shared_origin(layer, inode));
    }

    /// A close of `inode` in `layer`, kernel node id `node`.
    pub(crate) fn released(&self, node: u64, layer: u64, inode: u64) {
        self.pages
            .released(node, || self.shared_origin(layer, inode));
    }

    /// Parent, next inode number and frozen state of a layer (cached once
    /// frozen).
    fn layer_shape(&self, layer: u64) -> Option<LayerShape> {
        if let Some(l) = self
            .frozen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&layer)
        {
            return Some(*l);
        }
        let l = self.engine.layer_shape(layer).ok()?;
        if l.frozen {
            self.frozen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(layer, l);
        }
        Some(l)
    }

    /// The origin (creating layer, inode) of a file whose data other layers
    /// may share: any file of a frozen layer, and inodes a clone inherited.
    /// None for a file only its own writable layer can see.
    fn shared_origin(&self, layer: u64, inode: u64) -> Option<Origin> {
        let own = self.layer_shape(layer)?;
        let mut parent = own.parent;
        let mut origin = layer;
        let mut inherited = false;
        for _ in 0..100_000 {
            let Some(p) = parent else { break };
            let shape = self.layer_shape(p)?;
            if inode >= shape.next_inode {
                break;
            }
            inherited = true;
            origin = p;
            parent = shape.parent;
        }
        (own.frozen || inherited).then_some((origin, inode))
    }
}

/// Which kernel node ids are open, and which may hold pages of each shared
/// file.
pub(crate) struct PageCache {
    state: Arc<Mutex<State>>,
    drops: SyncSender<u64>,
    notifier: Arc<OnceLock<fuser::Notifier>>,
}

#[derive(Default)]
struct State {
    open: HashMap<u64, u32>,
    cached: HashMap<Origin, Vec<u64>>,
}

impl PageCache {
    /// Starts the thread that drops pages.
    pub(crate) fn start() -> std::io::Result<PageCache> {
        let (drops, rx) = sync_channel::<u64>(PENDING_DROPS);
        let notifier: Arc<OnceLock<fuser::Notifier>> = Arc::new(OnceLock::new());
        let state: Arc<Mutex<State>> = Arc::default();
        let (for_thread, state_for_thread) = (notifier.clone(), state.clone());
        std::thread::Builder::new()
            .name("lcfs-drop-pages".into())
            .spawn(move || {
                for node in rx {
                    // Opened again meanwhile: its pages are in use.
                    if lock(&state_for_thread).open.contains_key(&node) {
                        continue;
                    }
                    if let Some(n) = for_thread.get() {
                        if let Err(e) = n.inval_inode(INodeNo(node), 0, 0) {
                            log::debug!("dropping pages of node {node:#x}: {e}");
                        }
                    }
                }
            })?;
        Ok(PageCache {
            state,
            drops,
            notifier,
        })
    }

    /// Where drops are sent, once the session exists.
    pub(crate) fn set_notifier(&self, notifier: fuser::Notifier) {
        let _ = self.notifier.set(notifier);
    }

    /// An open of `node`; `origin` is Some for a shared file. Drops the
    /// pages other layers keep of it while they are closed.
    pub(crate) fn opened(&self, node: u64, origin: Option<Origin>) {
        let mut st = lock(&self.state);
        *st.open.entry(node).or_insert(0) += 1;
        let Some(key) = origin else { return };
        let copies = std::mem::take(st.cached.entry(key).or_default());
        let mut kept = Vec::with_capacity(copies.len() + 1);
        for k in copies {
            if k != node && !st.open.contains_key(&k) {
                let _ = self.drops.try_send(k);
            } else {
                kept.push(k);
            }
        }
        if !kept.contains(&node) {
            kept.push(node);
        }
        st.cached.insert(key, kept);
    }

    /// A close of `node`. On the last one, `origin` is asked whether the
    /// file is shared; if another layer may hold a copy too, this one's
    /// pages go (a single copy stays, so re-reads stay fast).
    pub(crate) fn released(&self, node: u64, origin: impl FnOnce() -> Option<Origin>) {
        {
            let mut st = lock(&self.state);
            match st.open.get_mut(&node) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    return;
                }
                Some(_) => {
                    st.open.remove(&node);
                }
                None => return,
            }
        }
        // Asked outside the lock: it may read the engine.
        let Some(key) = origin() else {
            return;
        };
        let mut st = lock(&self.state);
        let copies = st.cached.entry(key).or_default();
        if copies.len() > 1 {
            copies.retain(|k| *k != node);
            let _ = self.drops.try_send(node);
        }
        if copies.is_empty() {
            st.cached.remove(&key);
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}
