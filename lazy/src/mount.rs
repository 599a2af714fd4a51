//! The lazy mount (docs/lazy.md): image layers in eStargz
//! mounted from their TOC through containerd's remote-snapshot protocol,
//! their content fetched on first read and in the background.
//!
//! Prepare of an image layer's snapshot carries the image reference and
//! the layer's digest (`containerd.io/snapshot/cri.*`, which Docker's
//! containerd image store and the CRI plugin add) and, for an eStargz
//! layer, its TOC digest (the layer annotation, which containerd passes
//! on). The layer's footer and TOC are fetched (two ranged GETs) and the
//! TOC checked against that digest; the layer's tree goes into the
//! snapshot's engine layer through the layer applier with every regular
//! file empty, then each file gets absent blocks (engine absent.rs), all
//! numbered in a row. The layer is committed under the chain ID and Prepare
//! answers AlreadyExists: containerd skips the download and the unpack.
//!
//! A read that meets an absent block calls [`Lazy::fetch`]: the chunks
//! covering the block and up to [`READ_AHEAD`] after it are fetched with
//! one ranged GET, each checked against its TOC digest, and written into
//! the device; the read then goes on from the device. A read waits for the
//! registry at most `fetch_timeout_ms` and then fails with EIO; it works
//! again once the registry is back. Reads that want one chunk at once
//! fetch it once (chunks are claimed by the fetch under way). A
//! background thread per layer fetches the rest: first the files of the
//! layer's startup profile (what its containers read most, from the
//! engine's hot-file summaries), then in TOC order (an eStargz layer's
//! prefetch files lead), files grouped into ranges of up to
//! [`BACKGROUND_RANGE`], out of the way of readers' fetches (it waits
//! while one runs and [`READERS_QUIET`] after); once no block is absent
//! the layer is complete (`lcfs.lazy.done`) and the sealer seals it like
//! any layer.
//!
//! Where a layer is read from: the blob's home peer of the cooperative
//! pull (when the daemon has a mirror), the registry's mirrors of
//! containerd's hosts configuration (hosts.rs), then the registry's
//! server; each passed over for a while when it fails (remote.rs).
//!
//! What a lazy layer needs across restarts is in its metadata: the blob's
//! URL and reference (registry host, repository, digest), the TOC digest
//! and its first block number. On start the daemon
//! takes up every layer not complete; the TOC is fetched again when first
//! needed (a restart without the registry leaves the fetched files
//! readable and the others EIO until it is back).

use crate::estargz::TOC_DIGEST_ANNOTATION;
use crate::hosts::Endpoint;
use crate::remote::{Access, Alternate, RemoteLayer};
use crate::skeleton;
use lcfs_engine::{Engine, Error as EngineError};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

/// Labels Docker's containerd image store and containerd's CRI plugin put
/// on an image layer's Prepare.
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// Layer metadata of a lazily mounted layer.
const META_BLOB: &str = "lcfs.lazy.blob";
const META_TOC: &str = "lcfs.lazy.toc";
const META_BLOCKS: &str = "lcfs.lazy.blocks";
const META_DONE: &str = "lcfs.lazy.done";
/// `HOST/NAME@DIGEST`: the registry host as the image reference names it.
const META_REF: &str = "lcfs.lazy.ref";
/// What a read fetches beyond the block it needs: whole chunks, of its
/// file and of the files after it while they are absent.
const READ_AHEAD: u64 = 1 << 20;
/// The most compressed bytes one background GET asks for (a bigger chunk
/// is one GET of its own).
const BACKGROUND_RANGE: u64 = 4 << 20;
const BLOCK: u64 = 4096;

/// The lazy pull's configuration (`lcfs daemon --lazy-config FILE`).
#[derive(Clone, Debug)]
pub struct Config {
    /// How long a read waits for a fetch before it fails with EIO.
    pub fetch_timeout: Duration,
    /// Fetch the rest of each layer in the background.
    pub background: bool,
    /// Registry host (as in image references) to its base URL and access;
    /// any other host as `hosts_dir` says, else at `https://HOST` without
    /// credentials.
    pub registries: BTreeMap<String, Registry>,
    /// containerd's hosts directory (hosts.rs), for registries not in
    /// `registries`.
    pub hosts_dir: Option<std::path::PathBuf>,
    /// The cooperative pull's home peers, when this daemon has a mirror:
    /// each blob is read through its home first.
    pub peers: Option<lcfs_mirror::Peers>,
}

/// A registry the lazy mount reads layers from.
#[derive(Clone, Debug)]
pub struct Registry {
    /// `http(s)://host[:port]`.
    pub url: String,
    pub access: Access,
}

impl Registry {
    /// A registry without credentials.
    pub fn plain(url: impl Into<String>) -> Registry {
        Registry {
            url: url.into(),
            access: Access::default(),
        }
    }
}

/// The registry host and repository of an image reference
/// (`host[:port]/name[:tag][@digest]`; Docker Hub's short forms too).
pub fn split_reference(image: &str) -> Option<(String, String)> {
    let image = image.split('@').next()?;
    let (first, rest) = image.split_once('/').unwrap_or(("", image));
    let (host, name) = if !first.is_empty()
        && (first.contains('.') || first.contains(':') || first == "localhost")
    {
        (first.to_string(), rest)
    } else {
        ("docker.io".to_string(), image)
    };
    // A tag follows the last `/`'s part after a `:`.
    let name = match name.rsplit_once('/') {
        Some((dir, last)) => format!("{dir}/{}", last.split(':').next()?),
        None => name.split(':').next()?.to_string(),
    };
    let name = if host == "docker.io" && !name.contains('/') {
        format!("library/{name}")
    } else {
        name
    };
    let valid = !name.is_empty()
        && name.len() <= 255
        && name.split('/').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c))
        });
    valid.then_some((host, name))
}

fn valid_digest(d: &str) -> bool {
    crate::estargz::valid_digest(d)
}

/// A layer's blob: its registry host (as image references name it),
/// repository and digest.
#[derive(Clone, Debug, PartialEq)]
pub struct BlobRef {
    pub host: String,
    pub name: String,
    pub digest: String,
}

impl BlobRef {
    fn encode(&self) -> String {
        format!("{}/{}@{}", self.host, self.name, self.digest)
    }

    fn decode(s: &str) -> Option<BlobRef> {
        let (rest, digest) = s.rsplit_once('@')?;
        let (host, name) = rest.split_once('/')?;
        (valid_digest(digest) && !host.is_empty() && !name.is_empty()).then(|| BlobRef {
            host: host.into(),
            name: name.into(),
            digest: digest.into(),
        })
    }
}

/// Where a layer that `labels` name is read from.
pub struct Source {
    pub blob: BlobRef,
    /// The blob's URL at the registry's server.
    pub url: String,
    pub toc_digest: String,
    /// How its registry is reached.
    resolved: Resolved,
}

/// How a registry host is reached: its server, and mirrors to try first.
struct Resolved {
    server: Endpoint,
    mirrors: Vec<Endpoint>,
}

/// A lazily mounted layer.
struct LazyLayer {
    /// The engine layer's name.
    name: String,
    url: String,
    /// None for a layer of an older daemon: read from `url` alone.
    blob: Option<BlobRef>,
    toc_digest: String,
    /// Its absent blocks' numbers: `first..first + count`.
    first: u64,
    count: u64,
    /// The TOC read and the files' blocks, once fetched.
    opened: Mutex<Option<Arc<Opened>>>,
    fetched_bytes: AtomicU64,
    fetch_errors: AtomicU64,
    done: AtomicBool,
    /// Chunks being fetched now: a read of a block in one waits for that
    /// fetch instead of fetching the chunk again (FUSE reads a file in
    /// several requests at once).
    in_flight: Mutex<BTreeSet<usize>>,
    landed: Condvar,
}

/// Chunks one fetch claimed; given back (and the waiters woken) on drop.
struct Claim<'a> {
    layer: &'a LazyLayer,
    chunks: Range<usize>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut set = self
            .layer
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for c in self.chunks.clone() {
            set.remove(&c);
        }
        self.layer.landed.notify_all();
    }
}

impl LazyLayer {
    /// Claims chunks `r` for a fetch, cut short before the first chunk
    /// another fetch has. When that other fetch has `r`'s first chunk,
    /// waits (until `deadline`) for it to end and returns None: the caller
    /// looks again at what is absent.
    fn claim(&self, r: Range<usize>, deadline: Instant) -> Option<Claim<'_>> {
        let mut set = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if set.contains(&r.start) {
            while set.contains(&r.start) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                set = self
                    .landed
                    .wait_timeout(set, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            return None;
        }
        let end = set.range(r.clone()).next().copied().unwrap_or(r.end);
        set.extend(r.start..end);
        Some(Claim {
            layer: self,
            chunks: r.start..end,
        })
    }

    /// A lazy layer not complete yet, its TOC read when `opened` is given.
    fn new(
        name: &str,
        url: &str,
        blob: Option<BlobRef>,
        toc_digest: &str,
        first: u64,
        count: u64,
        opened: Option<Opened>,
    ) -> Arc<LazyLayer> {
        Arc::new(LazyLayer {
            name: name.to_string(),
            url: url.to_string(),
            blob,
            toc_digest: toc_digest.to_string(),
            first,
            count,
            fetched_bytes: AtomicU64::new(opened.as_ref().map_or(0, |o| o.remote.fetched())),
            opened: Mutex::new(opened.map(Arc::new)),
            fetch_errors: AtomicU64::new(0),
            done: AtomicBool::new(false),
            in_flight: Mutex::new(BTreeSet::new()),
            landed: Condvar::new(),
        })
    }
}

/// A lazy layer's TOC and where its files' blocks are.
struct Opened {
    remote: RemoteLayer,
    /// In block order: the file's entry, its first block, its size and its
    /// chunks.
    files: Vec<LazyFile>,
    /// Entry index to its place in `files`.
    by_entry: HashMap<usize, usize>,
}

struct LazyFile {
    entry: usize,
    first: u64,
    size: u64,
    chunks: Range<usize>,
}

impl LazyFile {
    fn blocks(&self) -> u64 {
        self.size.div_ceil(BLOCK)
    }
}

impl Opened {
    fn new(remote: RemoteLayer, first: u64, count: u64) -> std::result::Result<Opened, String> {
        let ix = &remote.index;
        let ranges = skeleton::chunk_ranges(ix);
        let mut files = Vec::new();
        let mut next = first;
        for i in skeleton::lazy_files(ix) {
            let size = ix.entries[i].size as u64;
            let chunks = ranges.get(&i).cloned().unwrap_or(0..0);
            let f = LazyFile {
                entry: i,
                first: next,
                size,
                chunks,
            };
            next += f.blocks();
            files.push(f);
        }
        if next - first != count {
            return Err(format!(
                "the TOC has {} blocks of files, the layer {count}",
                next - first
            ));
        }
        let by_entry = files
            .iter()
            .enumerate()
            .map(|(n, f)| (f.entry, n))
            .collect();
        Ok(Opened {
            remote,
            files,
            by_entry,
        })
    }

    fn file_of(&self, lbn: u64) -> Option<&LazyFile> {
        let i = self
            .files
            .partition_point(|f| f.first <= lbn)
            .checked_sub(1)?;
        let f = &self.files[i];
        (lbn < f.first + f.blocks()).then_some(f)
    }

    fn file_of_entry(&self, entry: usize) -> Option<&LazyFile> {
        self.by_entry.get(&entry).map(|&n| &self.files[n])
    }

    fn name(&self, f: &LazyFile) -> &str {
        &self.remote.index.entries[f.entry].name
    }
}

/// One lazy layer as `lcfs lazy` shows it.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct LayerReport {
    pub layer: String,
    pub blob: String,
    pub blocks: u64,
    pub absent_blocks: u64,
    pub fetched_bytes: u64,
    /// Of `fetched_bytes`, those a cooperative-pull peer sent (since this
    /// daemon started).
    #[serde(default)]
    pub peer_bytes: u64,
    pub fetch_errors: u64,
    pub complete: bool,
}

/// The lazy pull: its layers and their fetches.
pub struct Lazy {
    engine: Arc<Engine>,
    config: Config,
    /// By first block number.
    layers: Mutex<BTreeMap<u64, Arc<LazyLayer>>>,
    stop: Arc<AtomicBool>,
    /// Reads fetching now, and when the last one ended: the background
    /// fetch waits for them (a reader's fetch goes first).
    readers: AtomicU64,
    last_read: Mutex<Instant>,
    me: Weak<Lazy>,
}

/// How often the background fetch looks at the startup profile again.
const PROFILE_REFRESH: Duration = Duration::from_secs(2);

/// How long the background fetch stays out of the way after a reader's
/// fetch ended.
const READERS_QUIET: Duration = Duration::from_millis(100);

/// A reader's fetch under way (see [`Lazy::readers`]).
struct Reading<'a>(&'a Lazy);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        *self.0.last_read.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.readers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Lazy {
    /// Takes up the lazy layers on the device and installs the engine's
    /// fetcher.
    pub fn start(engine: Arc<Engine>, config: Config) -> Arc<Lazy> {
        let lazy = Arc::new_cyclic(|me| Lazy {
            engine: engine.clone(),
            config,
            layers: Mutex::new(BTreeMap::new()),
            stop: Arc::new(AtomicBool::new(false)),
            readers: AtomicU64::new(0),
            last_read: Mutex::new(Instant::now()),
            me: me.clone(),
        });
        for info in engine.list_layers() {
            let Ok(meta) = engine.layer_metadata(&info.name) else {
                continue;
            };
            let (Some(url), Some(toc), Some(blocks)) = (
                meta.get(META_BLOB),
                meta.get(META_TOC),
                meta.get(META_BLOCKS),
            ) else {
                continue;
            };
            let Some((first, count)) = blocks
                .split_once(' ')
                .and_then(|(f, c)| Some((f.parse().ok()?, c.parse().ok()?)))
            else {
                log::warn!("layer {}: unreadable {META_BLOCKS} {blocks:?}", info.name);
                continue;
            };
            if !meta.contains_key(META_DONE) {
                log::info!("lazy layer {} taken up ({url})", info.name);
                let blob = meta.get(META_REF).and_then(|r| BlobRef::decode(r));
                lazy.add(LazyLayer::new(
                    &info.name, url, blob, toc, first, count, None,
                ));
            }
        }
        let weak = Arc::downgrade(&lazy);
        engine.set_absent_fetcher(Some(Arc::new(move |lbn| match weak.upgrade() {
            Some(l) => l.fetch(lbn),
            None => Err(EngineError::Absent(lbn)),
        })));
        lazy
    }

    /// How registry `host` is reached: as `registries` says, else as
    /// containerd's hosts directory says, else at `https://HOST`.
    fn resolve(&self, host: &str) -> std::result::Result<Resolved, String> {
        if let Some(r) = self.config.registries.get(host) {
            return Ok(Resolved {
                server: Endpoint {
                    base: format!("{}/v2", r.url.trim_end_matches('/')),
                    access: r.access.clone(),
                    mirror: false,
                },
                mirrors: Vec::new(),
            });
        }
        if let Some(dir) = &self.config.hosts_dir {
            if let Some(h) = crate::hosts::lookup(dir, host)? {
                return Ok(Resolved {
                    server: h.server,
                    mirrors: h.mirrors,
                });
            }
        }
        Ok(Resolved {
            server: Endpoint {
                base: format!("{}/v2", crate::hosts::default_server(host)),
                ..Endpoint::default()
            },
            mirrors: Vec::new(),
        })
    }

    /// Opens the layer at `url`: through the blob's home peer when there
    /// are peers, then the registry's mirrors, then `url`.
    fn open_remote(
        &self,
        url: &str,
        blob: Option<(&BlobRef, &Resolved)>,
        toc: &str,
    ) -> std::result::Result<RemoteLayer, String> {
        let timeout = self.config.fetch_timeout;
        let Some((b, resolved)) = blob else {
            // A layer of a daemon that did not record its blob: the
            // access of the configured registry at its URL's origin.
            use crate::remote::origin;
            let access = self
                .config
                .registries
                .values()
                .find(|r| origin(r.url.trim_end_matches('/')) == origin(url))
                .map(|r| r.access.clone())
                .unwrap_or_default();
            return RemoteLayer::open_with(url, toc, timeout, &access).map_err(|e| e.to_string());
        };
        let mut alternates = Vec::new();
        if let Some(peers) = &self.config.peers {
            let hex = b.digest.trim_start_matches("sha256:");
            if let Some(route) = peers.route(&b.host, &b.name, hex) {
                alternates.push(Alternate::peer(route, peers.clone()));
            }
        }
        for m in &resolved.mirrors {
            alternates.push(Alternate {
                url: m.blob_url(&b.host, &b.name, &b.digest),
                access: m.access.clone(),
                timeout,
                peers: None,
            });
        }
        RemoteLayer::open_from(url, toc, timeout, &resolved.server.access, alternates)
            .map_err(|e| e.to_string())
    }

    /// Stops the background fetches (they end within one range).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.engine.set_absent_fetcher(None);
    }

    fn add(&self, layer: Arc<LazyLayer>) {
        self.layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(layer.first, layer.clone());
        if self.config.background {
            let me = self.me.clone();
            let spawned = std::thread::Builder::new()
                .name("lcfs-lazy".into())
                .spawn(move || {
                    if let Some(l) = me.upgrade() {
                        l.background(&layer);
                    }
                });
            if let Err(e) = spawned {
                log::warn!("no background fetch: {e}");
            }
        }
    }

    fn layer_of(&self, lbn: u64) -> Option<Arc<LazyLayer>> {
        let layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        let (_, l) = layers.range(..=lbn).next_back()?;
        (lbn < l.first + l.count).then(|| l.clone())
    }

    /// Where the layer `labels` name is, when they name one this mounts
    /// lazily.
    pub fn source(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> std::result::Result<Option<Source>, String> {
        let (Some(image), Some(digest), Some(toc)) = (
            labels.get(LABEL_IMAGE_REF),
            labels.get(LABEL_LAYER_DIGEST),
            labels.get(TOC_DIGEST_ANNOTATION),
        ) else {
            return Ok(None);
        };
        if !valid_digest(digest) || !valid_digest(toc) {
            return Ok(None);
        }
        let Some((host, name)) = split_reference(image) else {
            return Ok(None);
        };
        let resolved = self.resolve(&host)?;
        let blob = BlobRef {
            host,
            name,
            digest: digest.clone(),
        };
        Ok(Some(Source {
            url: resolved
                .server
                .blob_url(&blob.host, &blob.name, &blob.digest),
            blob,
            toc_digest: toc.clone(),
            resolved,
        }))
    }

    /// The TOC of `layer`, fetched when not yet (bounded by the timeout).
    fn opened(&self, layer: &LazyLayer) -> std::result::Result<Arc<Opened>, String> {
        let mut slot = layer.opened.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = &*slot {
            return Ok(o.clone());
        }
        let resolved = match &layer.blob {
            Some(b) => Some(self.resolve(&b.host)?),
            None => None,
        };
        let blob = layer.blob.as_ref().zip(resolved.as_ref());
        let remote = self.open_remote(&layer.url, blob, &layer.toc_digest)?;
        layer
            .fetched_bytes
            .fetch_add(remote.fetched(), Ordering::Relaxed);
        let o = Arc::new(Opened::new(remote, layer.first, layer.count)?);
        *slot = Some(o.clone());
        Ok(o)
    }

    /// Fetches chunks `r` (consecutive in the blob, of any files) with one
    /// ranged GET, each checked against its digest, and fills every absent
    /// block they cover whole (a file's last block padded).
    fn fill_chunks(
        &self,
        layer: &LazyLayer,
        o: &Opened,
        r: Range<usize>,
    ) -> std::result::Result<(), String> {
        if r.is_empty() {
            return Ok(());
        }
        let ix = &o.remote.index;
        let compressed = ix.chunks[r.end - 1].end - ix.chunks[r.start].start;
        let t = Instant::now();
        let parts = o
            .remote
            .read_chunks(r.start, r.end - 1)
            .map_err(|e| e.to_string())?;
        let fetched_in = t.elapsed();
        layer.fetched_bytes.fetch_add(compressed, Ordering::Relaxed);
        // Each file's run of chunks, as one piece of its content.
        let mut i = 0;
        while i < parts.len() {
            let entry = ix.chunks[r.start + i].entry;
            let mut j = i + 1;
            while j < parts.len() && ix.chunks[r.start + j].entry == entry {
                j += 1;
            }
            if let Some(f) = o.file_of_entry(entry) {
                let start = ix.chunks[r.start + i].file_offset;
                self.fill_blocks(o, f, start, &parts[i..j].concat())?;
            }
            i = j;
        }
        log::debug!(
            "layer {}: chunks {}..{} ({compressed} bytes) fetched in {:?}, written in {:?}",
            layer.name,
            r.start,
            r.end,
            fetched_in,
            t.elapsed() - fetched_in
        );
        Ok(())
    }

    /// Fills the blocks of `f` that bytes `data`, from `start` in the
    /// file, cover whole.
    fn fill_blocks(
        &self,
        o: &Opened,
        f: &LazyFile,
        start: u64,
        data: &[u8],
    ) -> std::result::Result<(), String> {
        let end = start + data.len() as u64;
        let mut block = start.div_ceil(BLOCK);
        while block * BLOCK < end {
            let (lo, hi) = (block * BLOCK, ((block + 1) * BLOCK).min(f.size));
            if hi > end {
                break; // the rest of this block is in the next chunk
            }
            let mut bytes = data[(lo - start) as usize..(hi - start) as usize].to_vec();
            bytes.resize(BLOCK as usize, 0);
            self.engine
                .fill_absent(f.first + block, &bytes)
                .map_err(|e| format!("writing {:?}: {e}", o.name(f)))?;
            block += 1;
        }
        Ok(())
    }

    /// The chunks to fetch for the absent block of `f` at byte `lo`: those
    /// holding that block, then, while the compressed range stays within
    /// `window`, the chunks after them in the blob (of this file or the
    /// next ones: files stored together are mostly read together) whose
    /// first block is still absent.
    fn plan(&self, o: &Opened, f: &LazyFile, lo: u64, window: u64) -> Range<usize> {
        let c = &o.remote.index.chunks;
        let need = (lo + BLOCK).min(f.size);
        let mut r = f.chunks.clone();
        while r.start < r.end && c[r.start].file_offset + c[r.start].size <= lo {
            r.start += 1;
        }
        let mut end = r.start;
        while end < r.end && c[end].file_offset < need {
            end += 1;
        }
        let base = c.get(r.start).map_or(0, |x| x.start);
        while end < c.len() && c[end].end - base <= window {
            let wanted = o.file_of_entry(c[end].entry).is_some_and(|g| {
                let b = g.first + c[end].file_offset / BLOCK;
                self.engine.is_absent(b).unwrap_or(false)
            });
            if !wanted {
                break;
            }
            end += 1;
        }
        r.start..end
    }

    /// The engine's fetcher: absent block `lbn`, read by a reader now.
    fn fetch(&self, lbn: u64) -> lcfs_engine::Result<()> {
        let Some(layer) = self.layer_of(lbn) else {
            return Err(EngineError::Absent(lbn));
        };
        self.readers.fetch_add(1, Ordering::SeqCst);
        let _reading = Reading(self);
        let deadline = Instant::now() + self.config.fetch_timeout;
        let mut pause = Duration::from_millis(100);
        loop {
            let tried = self.opened(&layer).and_then(|o| {
                let f = o
                    .file_of(lbn)
                    .ok_or_else(|| format!("block {lbn} is in no file of the TOC"))?;
                if !self.engine.is_absent(lbn).map_err(|e| e.to_string())? {
                    return Ok(()); // another read's fetch filled it
                }
                let r = self.plan(&o, f, (lbn - f.first) * BLOCK, READ_AHEAD);
                match layer.claim(r, deadline) {
                    Some(claim) => self.fill_chunks(&layer, &o, claim.chunks.clone()),
                    // Another fetch had the chunk and ended: look again.
                    None if Instant::now() < deadline => Ok(()),
                    None => Err("another read's fetch of the block did not end".into()),
                }
            });
            match tried {
                // Filled, by this fetch or the one waited for (which may
                // have failed: then this one tries).
                Ok(()) => match self.engine.is_absent(lbn) {
                    Ok(true) if Instant::now() < deadline => continue,
                    _ => return Ok(()),
                },
                Err(why) => {
                    layer.fetch_errors.fetch_add(1, Ordering::Relaxed);
                    if Instant::now() + pause >= deadline {
                        log::warn!(
                            "lazy layer {}: block {lbn} not fetched within {} ms: {why}",
                            layer.name,
                            self.config.fetch_timeout.as_millis()
                        );
                        return Err(EngineError::Absent(lbn));
                    }
                    log::debug!(
                        "lazy layer {}: block {lbn}: {why} (trying again)",
                        layer.name
                    );
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Fetches what `layer` still lacks, in TOC order, until it is
    /// complete, removed, or the daemon stops.
    fn background(&self, layer: &LazyLayer) {
        let mut pause = Duration::from_secs(1);
        while !self.stop.load(Ordering::Relaxed) {
            if self.engine.layer_id(&layer.name).is_err() {
                self.forget(layer);
                return;
            }
            match self.fetch_rest(layer) {
                Ok(()) => {
                    self.complete(layer);
                    return;
                }
                Err(why) => {
                    log::debug!("lazy layer {}: background fetch: {why}", layer.name);
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    fn fetch_rest(&self, layer: &LazyLayer) -> std::result::Result<(), String> {
        let o = self.opened(layer)?;
        // Files in TOC order from `i`; before them, the files of the
        // startup profile not complete yet, looked at again every
        // PROFILE_REFRESH.
        let mut i = 0;
        let mut profile: Vec<usize> = Vec::new();
        let mut profiled: Option<Instant> = None;
        loop {
            if self.stop.load(Ordering::Relaxed) || self.engine.layer_id(&layer.name).is_err() {
                return Err("stopped".into());
            }
            if self.readers.load(Ordering::SeqCst) > 0
                || self
                    .last_read
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .elapsed()
                    < READERS_QUIET
            {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            if profiled.is_none_or(|t| t.elapsed() >= PROFILE_REFRESH) {
                profile = self.profile(layer, &o);
                profile.reverse(); // popped from the end: the most read first
                profiled = Some(Instant::now());
            }
            let absent_of = |f: &LazyFile| {
                self.engine
                    .absent_among(f.first, f.blocks())
                    .map_err(|e| e.to_string())
            };
            let (f, absent) = match profile.last() {
                Some(&n) => {
                    let absent = absent_of(&o.files[n])?;
                    if absent.is_empty() {
                        profile.pop();
                        continue;
                    }
                    (&o.files[n], absent)
                }
                None if i < o.files.len() => {
                    let absent = absent_of(&o.files[i])?;
                    if absent.is_empty() {
                        i += 1;
                        continue;
                    }
                    (&o.files[i], absent)
                }
                None => return Ok(()),
            };
            let r = self.plan(&o, f, (absent[0] - f.first) * BLOCK, BACKGROUND_RANGE);
            let far = Instant::now() + Duration::from_secs(60);
            let Some(claim) = layer.claim(r, far) else {
                continue; // a reader fetched it: look again
            };
            self.fill_chunks(layer, &o, claim.chunks.clone())?;
            drop(claim);
            if self
                .engine
                .is_absent(absent[0])
                .map_err(|e| e.to_string())?
            {
                return Err(format!("{:?}: block {} not filled", o.name(f), absent[0]));
            }
        }
    }

    /// The layer's startup profile: the files of it that the containers
    /// started from it read most (the hot files of the layer and of the
    /// layers made from it, engine hotfiles.rs), most read first, as
    /// places in `o.files`.
    fn profile(&self, layer: &LazyLayer, o: &Opened) -> Vec<usize> {
        let layers = self.engine.list_layers();
        let mut family = vec![layer.name.clone()];
        let mut k = 0;
        while k < family.len() {
            for l in &layers {
                if l.parent.as_deref() == Some(family[k].as_str()) {
                    family.push(l.name.clone());
                }
            }
            k += 1;
        }
        let ix = &o.remote.index;
        let mut reads: HashMap<usize, u64> = HashMap::new();
        for name in &family {
            let Ok(id) = self.engine.layer_id(name) else {
                continue;
            };
            for (hot, path) in self.engine.hot_files(id).unwrap_or_default() {
                let Some(path) = path else { continue };
                let name = crate::estargz::clean_name(&String::from_utf8_lossy(&path));
                let Some(n) = ix
                    .by_name
                    .get(&name)
                    .and_then(|&e| ix.regular(e))
                    .and_then(|e| o.by_entry.get(&e))
                else {
                    continue;
                };
                *reads.entry(*n).or_default() += hot.reads;
            }
        }
        let mut out: Vec<(usize, u64)> = reads.into_iter().collect();
        out.sort_by_key(|&(n, r)| (std::cmp::Reverse(r), n));
        out.into_iter().map(|(n, _)| n).collect()
    }

    /// Marks `layer` complete: no block absent (checked), recorded in its
    /// metadata and made durable.
    fn complete(&self, layer: &LazyLayer) {
        match self.engine.absent_among(layer.first, layer.count) {
            Ok(a) if a.is_empty() => {}
            _ => return,
        }
        let recorded = self.engine.layer_metadata(&layer.name).and_then(|mut m| {
            mark_done(&mut m);
            self.engine.set_layer_metadata(&layer.name, &m)?;
            self.engine.sync()
        });
        match recorded {
            Ok(()) => {
                layer.done.store(true, Ordering::Relaxed);
                log::info!(
                    "lazy layer {} complete: {} bytes fetched",
                    layer.name,
                    layer.fetched_bytes.load(Ordering::Relaxed)
                );
            }
            Err(e) => log::warn!("lazy layer {}: recording it complete: {e}", layer.name),
        }
    }

    fn forget(&self, layer: &LazyLayer) {
        self.layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&layer.first);
    }

    /// Every lazy layer this daemon took up, complete or not.
    pub fn report(&self) -> Vec<LayerReport> {
        let layers: Vec<Arc<LazyLayer>> = self
            .layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        layers
            .iter()
            .filter(|l| self.engine.layer_id(&l.name).is_ok())
            .map(|l| LayerReport {
                layer: l.name.clone(),
                blob: l.url.clone(),
                blocks: l.count,
                absent_blocks: self
                    .engine
                    .absent_among(l.first, l.count)
                    .map(|a| a.len() as u64)
                    .unwrap_or(l.count),
                fetched_bytes: l.fetched_bytes.load(Ordering::Relaxed),
                // Held only while the TOC is fetched: nothing fetched yet.
                peer_bytes: l.opened.try_lock().ok().map_or(0, |o| {
                    o.as_ref().map_or(0, |o| o.remote.fetched_from_peer())
                }),
                fetch_errors: l.fetch_errors.load(Ordering::Relaxed),
                complete: l.done.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Builds the layer's tree in writable engine layer `name` (see the
    /// module); an error leaves the layer to be discarded.
    pub fn populate(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> std::result::Result<(), String> {
        let began = Instant::now();
        let Source {
            blob,
            url,
            toc_digest: toc,
            resolved,
        } = self.source(labels)?.ok_or("no eStargz layer named")?;
        let remote = self.open_remote(&url, Some((&blob, &resolved)), &toc)?;
        let id = self.engine.layer_id(name).map_err(|e| e.to_string())?;
        let tar = skeleton::skeleton_tar(&remote.index).map_err(|e| e.to_string())?;
        lcfs_dockerplugin::apply_tar(&self.engine, id, &tar[..]).map_err(|e| e.to_string())?;
        let mut files = Vec::new();
        for i in skeleton::lazy_files(&remote.index) {
            let e = &remote.index.entries[i];
            let ino = lcfs_dockerplugin::applied_inode(&self.engine, id, e.name.as_bytes())
                .map_err(|err| format!("{:?} after the tree was written: {err}", e.name))?;
            files.push((ino, e.size as u64));
        }
        let (first, count) = self
            .engine
            .make_absent_many(id, &files)
            .map_err(|e| e.to_string())?;
        let mut meta = self
            .engine
            .layer_metadata(name)
            .map_err(|e| e.to_string())?;
        meta.insert(META_BLOB.into(), url.clone());
        meta.insert(META_TOC.into(), toc.clone());
        meta.insert(META_REF.into(), blob.encode());
        meta.insert(META_BLOCKS.into(), format!("{first} {count}"));
        if count == 0 {
            mark_done(&mut meta);
        }
        self.engine
            .set_layer_metadata(name, &meta)
            .map_err(|e| e.to_string())?;
        let fetched = remote.fetched();
        let opened = Opened::new(remote, first, count)?;
        let layer = LazyLayer::new(name, &url, Some(blob), &toc, first, count, Some(opened));
        log::info!(
            "layer {name} mounted lazily in {} ms: {} files, {count} blocks absent, {fetched} bytes of TOC fetched",
            began.elapsed().as_millis(),
            files.len()
        );
        if count > 0 {
            self.add(layer);
        }
        Ok(())
    }
}

/// Records in a lazy layer's metadata that no block of it is absent.
fn mark_done(meta: &mut lcfs_engine::LayerMetadata) {
    meta.insert(META_DONE.into(), Engine::now().seconds.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_name_their_registry_and_repository() {
        let s = |r: &str| split_reference(r).map(|(h, n)| format!("{h} {n}"));
        assert_eq!(
            s("127.0.0.1:5000/lazy/app:1").as_deref(),
            Some("127.0.0.1:5000 lazy/app")
        );
        assert_eq!(s("busybox").as_deref(), Some("docker.io library/busybox"));
        assert_eq!(
            s("docker.io/library/debian:12").as_deref(),
            Some("docker.io library/debian")
        );
        assert_eq!(
            s("localhost/a/b@sha256:0123").as_deref(),
            Some("localhost a/b")
        );
        assert_eq!(s("host.example/UPPER:1"), None);
        assert_eq!(s("host.example/a//b"), None);
    }
}
