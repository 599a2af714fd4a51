//! Images, as lcfs sees them (docs/statistics.md, "Images"): an image is
//! its top layer, and its containers are the writable layers cloned from
//! it.
//!
//! - Which layers are images: every layer an owner names (dockerd's or
//!   containerd's image list, see owners.rs), and every frozen pulled
//!   (cold) layer that containers were cloned from or that has no pulled
//!   child. A layer an owner does not name is shown by its own name.
//! - A container belongs to the image of its nearest pulled ancestor; its
//!   writable (unfrozen) layer counts as one container, running while it is
//!   in use: Got and not Put by dockerd, or mounted on its own in some
//!   mount namespace (a container's root; containerd's bind mount).
//! - Start-up and reads add up what the image's live containers counted and
//!   what its removed ones left in the records they were folded into.
//!
//! Everything is computed from the layer records when asked: no state of
//! its own beyond the owners' names.

use crate::client::TopSort;
use crate::owners::{containerd_images, docker_images, DockerCache, OwnerImage};
use crate::protocol::{rfc3339, HotFile, Image, Layer};
use lcfs_engine::{Engine, LayerInfo, Timestamp};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the control socket and the HTTP API ask about images.
pub struct Catalog {
    pub engine: Arc<Engine>,
    pub mountpoint: PathBuf,
    /// The Docker plugin, for the layers dockerd has mounted.
    pub plugin: Option<Arc<lcfs_dockerplugin::Driver>>,
    /// dockerd's API socket, asked for image names when it exists.
    pub docker_socket: Option<PathBuf>,
    /// The snapshotter's table and containerd's socket, asked for image
    /// names when the daemon serves containerd.
    pub containerd: Option<(Arc<lcfs_snapshotter::Table>, PathBuf)>,
    /// The registry mirror's counters, when it runs (for /metrics).
    pub mirror: Option<Arc<lcfs_mirror::Counters>>,
    /// The registry mirror's blob cache: the garbage collector evicts from
    /// it before it removes images.
    pub mirror_store: Option<Arc<lcfs_mirror::store::BlobStore>>,
    /// The lazy pull, when it runs (its layers for /v1/lazy).
    pub lazy: Option<Arc<lcfs_lazy::mount::Lazy>>,
    names: Mutex<Names>,
}

/// The owners' names as last asked, and when.
#[derive(Default)]
struct Names {
    docker: DockerCache,
    named: Vec<Named>,
    asked: Option<Instant>,
    /// The layers when they were asked (their number, the newest id, how
    /// many are frozen): a new or committed layer (a pull) asks again at once.
    layers: (usize, u64, usize),
    /// The last failure said, so a down owner is not logged every time.
    last_failure: String,
}

/// How long the owners' names are reused before they are asked again.
const NAMES_FOR: Duration = Duration::from_secs(2);

impl From<OwnerImage> for Named {
    fn from(o: OwnerImage) -> Named {
        Named {
            top_layer: o.top_layer,
            name: o.name,
            owner: o.owner.as_str(),
            id: o.id,
            namespace: o.namespace,
            references: o.references,
        }
    }
}

impl Catalog {
    /// The layers mounted lazily (none without the lazy pull).
    pub fn lazy_layers(&self) -> Vec<lcfs_lazy::mount::LayerReport> {
        self.lazy.as_ref().map(|l| l.report()).unwrap_or_default()
    }

    pub fn new(engine: Arc<Engine>, mountpoint: &Path) -> Catalog {
        Catalog {
            engine,
            mountpoint: mountpoint.to_path_buf(),
            plugin: None,
            mirror: None,
            mirror_store: None,
            lazy: None,
            docker_socket: None,
            containerd: None,
            names: Mutex::new(Names::default()),
        }
    }

    /// The owners' names for image top layers (see owners.rs), asked at
    /// most every [`NAMES_FOR`] while the layers stay the same and every
    /// owner answered; an owner that does not answer names nothing (a
    /// warning says why, once).
    fn named(&self, layers: &[LayerInfo]) -> Vec<Named> {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let now_layers = (
            layers.len(),
            layers.iter().map(|l| l.id).max().unwrap_or(0),
            layers.iter().filter(|l| l.frozen).count(),
        );
        if names.asked.is_some_and(|t| t.elapsed() < NAMES_FOR) && names.layers == now_layers {
            return names.named.clone();
        }
        names.layers = now_layers;
        let mut named = Vec::new();
        let mut failures = Vec::new();
        // An owner whose socket is not there (not started yet) or that
        // failed is asked again next time: only a full answer is kept.
        let mut complete = true;
        if let Some(socket) = self.docker_socket.as_deref() {
            if !socket.exists() {
                complete = false;
            } else {
                match docker_images(socket, &mut names.docker) {
                    Ok(images) => named.extend(images.into_iter().map(Named::from)),
                    Err(e) => failures.push(format!("dockerd at {}: {e}", socket.display())),
                }
            }
        }
        if let Some((table, address)) = self.containerd.as_ref() {
            if !address.exists() {
                complete = false;
            } else {
                match block_on(containerd_images(table.clone(), address, &[])) {
                    Ok(images) => named.extend(images.into_iter().map(Named::from)),
                    Err(e) => failures.push(format!("containerd at {}: {e}", address.display())),
                }
            }
        }
        let failure = failures.join("; ");
        if !failure.is_empty() && failure != names.last_failure {
            log::warn!("image names unknown (images show by layer): {failure}");
        }
        complete &= failure.is_empty();
        names.last_failure = failure;
        names.named = named.clone();
        names.asked = complete.then(Instant::now);
        named
    }

    /// Every image, sorted by `by`.
    pub fn images(&self, by: TopSort) -> Vec<Image> {
        let layers = self.engine.list_layers();
        self.images_of(&layers, by)
    }

    /// Every layer, each with the images it belongs to.
    pub fn layers(&self) -> Vec<Layer> {
        self.images_and_layers(TopSort::Clones).1
    }

    fn images_of(&self, layers: &[LayerInfo], by: TopSort) -> Vec<Image> {
        let mut mounted = mounted_layers(&self.mountpoint, layers);
        if let Some(plugin) = &self.plugin {
            for (layer, since) in plugin.mounted() {
                let since = since
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| Timestamp {
                        seconds: d.as_secs() as i64,
                        nanoseconds: d.subsec_nanos(),
                    })
                    .unwrap_or_default();
                mounted.insert(layer, since);
            }
        }
        let mut images = catalog(layers, &self.named(layers), &mounted, Timestamp::now());
        sort_images(&mut images, by);
        images
    }

    /// Every image, sorted by `by`, and every layer with the images it
    /// belongs to (the layers of an image's chain and its containers'
    /// layers), from one listing.
    pub fn images_and_layers(&self, by: TopSort) -> (Vec<Image>, Vec<Layer>) {
        let infos = self.engine.list_layers();
        let images = self.images_of(&infos, by);
        let chains = Chains::new(&infos);
        let mut of: HashMap<&str, Vec<String>> = HashMap::new();
        for image in &images {
            if let Some(top) = chains.by_name.get(image.top_layer.as_str()) {
                for l in chains.chain(top) {
                    of.entry(l.name.as_str())
                        .or_default()
                        .push(image.name.clone());
                }
            }
        }
        for l in infos.iter().filter(|l| !l.cold) {
            if let Some(top) = chains.image_of(l) {
                let names: Vec<String> = images
                    .iter()
                    .filter(|i| i.top_layer == top.name)
                    .map(|i| i.name.clone())
                    .collect();
                of.entry(l.name.as_str()).or_default().extend(names);
            }
        }
        let layers = infos
            .iter()
            .map(|info| {
                let mut layer = Layer::from_info(info, &self.mountpoint);
                layer.images = of.remove(info.name.as_str()).unwrap_or_default();
                layer
            })
            .collect();
        (images, layers)
    }

    /// The hot files of the image `key` names, or of every image (most read
    /// first across them) when `key` is None.
    pub fn files(&self, key: Option<&str>) -> Result<Vec<HotFile>, String> {
        let layers = self.engine.list_layers();
        let images = self.images_of(&layers, TopSort::Clones);
        let chosen: Vec<&Image> = match key {
            None => images.iter().collect(),
            Some(k) => {
                let found: Vec<&Image> = images.iter().filter(|i| matches(i, k)).collect();
                if found.is_empty() {
                    return Err(format!("no image {k:?}"));
                }
                found
            }
        };
        let mut rows: Vec<HotFile> = chosen
            .into_iter()
            .flat_map(|i| hot_files(&self.engine, &layers, i))
            .collect();
        crate::client::sort_files(&mut rows);
        Ok(rows)
    }
}

/// `a` before `b` when it has more (or later) of `by`; ties by name.
pub fn rank_images(by: TopSort, a: &Image, b: &Image) -> std::cmp::Ordering {
    let order = match by {
        TopSort::Clones => b.starts.cmp(&a.starts),
        TopSort::LastStart => b.last_start.cmp(&a.last_start),
        TopSort::Reads => b.bytes_read.cmp(&a.bytes_read),
        TopSort::Size => b.size_bytes.cmp(&a.size_bytes),
        TopSort::PullTime => b.pull_seconds.total_cmp(&a.pull_seconds),
        TopSort::StartupTime => {
            let mean = |i: &Image| i.mean_startup_seconds.unwrap_or(-1.0);
            mean(b).total_cmp(&mean(a))
        }
        TopSort::Created => b.created.cmp(&a.created),
    };
    order.then_with(|| a.name.cmp(&b.name))
}

pub fn sort_images(images: &mut [Image], by: TopSort) {
    images.sort_by(|a, b| rank_images(by, a, b));
}

/// Runs an async call to an owner from a thread outside any runtime (the
/// control socket's, the HTTP API's blocking pool, the collector's).
pub(crate) fn block_on<T, E: std::fmt::Display>(
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(call)
        .map_err(|e| e.to_string())
}

/// An owner's name for the image whose top layer is `top_layer`.
#[derive(Clone, Debug, PartialEq)]
pub struct Named {
    pub top_layer: String,
    pub name: String,
    pub owner: &'static str,
    pub id: String,
    /// containerd's namespace.
    pub namespace: Option<String>,
    /// Docker: every tag and digest reference of the image.
    pub references: Vec<String>,
}

/// Layers in use now (mounted), with when each came into use.
pub type Mounted = HashMap<String, Timestamp>;

/// The layer records by name, and each layer's image.
struct Chains<'a> {
    by_name: HashMap<&'a str, &'a LayerInfo>,
}

impl<'a> Chains<'a> {
    fn new(layers: &'a [LayerInfo]) -> Chains<'a> {
        Chains {
            by_name: layers.iter().map(|l| (l.name.as_str(), l)).collect(),
        }
    }

    fn parent(&self, l: &LayerInfo) -> Option<&'a LayerInfo> {
        l.parent
            .as_deref()
            .and_then(|p| self.by_name.get(p).copied())
    }

    /// The nearest frozen pulled ancestor of a container layer (or of any
    /// layer not pulled itself). Bounded by the number of layers.
    fn image_of(&self, l: &LayerInfo) -> Option<&'a LayerInfo> {
        let mut at = self.parent(l);
        for _ in 0..self.by_name.len() {
            let p = at?;
            if p.cold && p.frozen {
                return Some(p);
            }
            at = self.parent(p);
        }
        None
    }

    /// `top` and its ancestors.
    fn chain(&self, top: &'a LayerInfo) -> Vec<&'a LayerInfo> {
        let mut v = vec![top];
        while let Some(p) = self.parent(v[v.len() - 1]) {
            if v.len() > self.by_name.len() {
                break;
            }
            v.push(p);
        }
        v
    }
}

fn seconds(t: Timestamp) -> f64 {
    t.seconds as f64 + t.nanoseconds as f64 / 1e9
}

/// The images among `layers` (unordered), named by `named` where an owner
/// knows them.
pub fn catalog(
    layers: &[LayerInfo],
    named: &[Named],
    mounted: &Mounted,
    now: Timestamp,
) -> Vec<Image> {
    let chains = Chains::new(layers);
    let mut pulled_children: HashSet<&str> = HashSet::new();
    for l in layers {
        if let (true, Some(p)) = (l.cold, chains.parent(l)) {
            pulled_children.insert(p.name.as_str());
        }
    }
    let mut tops: Vec<&LayerInfo> = layers
        .iter()
        .filter(|l| {
            l.cold && l.frozen && (l.usage.clones > 0 || !pulled_children.contains(l.name.as_str()))
        })
        .collect();
    for n in named {
        if let Some(l) = chains.by_name.get(n.top_layer.as_str()) {
            if !tops.iter().any(|t| t.name == l.name) {
                tops.push(l);
            }
        }
    }
    let mut images: HashMap<&str, Image> = HashMap::new();
    for top in tops {
        let chain = chains.chain(top);
        let u = &top.usage;
        let mut names: Vec<&Named> = named.iter().filter(|n| n.top_layer == top.name).collect();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        let first = names.first();
        let image = Image {
            name: first.map_or_else(|| top.name.clone(), |n| n.name.clone()),
            names: {
                let mut all: Vec<String> = names
                    .iter()
                    .flat_map(|n| std::iter::once(&n.name).chain(&n.references))
                    .cloned()
                    .collect();
                all.sort();
                all.dedup();
                all
            },
            records: names.iter().map(|n| (*n).clone()).collect(),
            owner: first.map(|n| n.owner.to_string()),
            id: first.map(|n| n.id.clone()),
            namespace: first.and_then(|n| n.namespace.clone()),
            top_layer: top.name.clone(),
            layers: chain.len() as u32,
            size_bytes: chain.iter().map(|l| l.owned_bytes).sum(),
            files: top.inode_count,
            created: rfc3339(top.created),
            created_seconds: top.created.seconds,
            starts: u.clones,
            last_start: (u.clones > 0).then(|| rfc3339(u.last_clone)),
            last_start_seconds: u.last_clone.seconds,
            pull_bytes: chain.iter().map(|l| l.usage.applied_bytes).sum(),
            pull_seconds: chain.iter().map(|l| l.usage.apply_ns).sum::<u64>() as f64 / 1e9,
            ..Image::default()
        };
        images.insert(top.name.as_str(), image);
        // What its removed containers left in its own record.
        add_usage(
            images.get_mut(top.name.as_str()).expect("inserted"),
            top,
            false,
        );
    }
    let mut startup_ns: HashMap<&str, u64> = HashMap::new();
    let mut newest: HashMap<&str, Timestamp> = HashMap::new();
    for l in layers.iter().filter(|l| !l.cold) {
        let Some(top) = chains.image_of(l) else {
            continue;
        };
        let Some(image) = images.get_mut(top.name.as_str()) else {
            continue;
        };
        add_usage(image, l, true);
        if let Some(ns) = l.usage.startup_ns(l.created) {
            *startup_ns.entry(top.name.as_str()).or_default() += ns;
        }
        if l.frozen {
            continue;
        }
        image.containers += 1;
        if let Some(since) = mounted.get(&l.name) {
            image.running += 1;
            let n = newest.entry(top.name.as_str()).or_insert(*since);
            *n = (*n).max(*since);
        }
    }
    for (top, image) in images.iter_mut() {
        let l = chains.by_name[top];
        let ns = l.usage.clone_start_ns + startup_ns.get(top).copied().unwrap_or(0);
        image.mean_startup_seconds =
            (image.startups > 0).then(|| ns as f64 / 1e9 / image.startups as f64);
        image.uptime_seconds = newest
            .get(top)
            .map(|since| (seconds(now) - seconds(*since)).max(0.0));
    }
    images.into_values().collect()
}

/// Adds a layer's counters to its image: its removed clones' always, its
/// own when it is one of the image's containers (`own`).
fn add_usage(image: &mut Image, l: &LayerInfo, own: bool) {
    let u = &l.usage;
    let started = own && u.startup_ns(l.created).is_some();
    let own = own as u64;
    image.reads += u.clone_reads + own * u.reads;
    image.bytes_read += u.clone_bytes_read + own * u.bytes_read;
    image.startups += u.clone_starts + started as u64;
    image.startup_reads += u.clone_early_reads + own * u.early_reads;
    image.startup_bytes += u.clone_early_bytes_read + own * u.early_bytes_read;
    image.startup_files += u.clone_early_files + own * u.early_files;
}

/// Whether `image` is what `key` names: a name, the owner's id (or a
/// prefix of its hex of at least 12 digits), or its top layer.
pub fn matches(image: &Image, key: &str) -> bool {
    let hex = |id: &str| id.split_once(':').map_or(id, |(_, h)| h).to_string();
    image.name == key
        || image.names.iter().any(|n| n == key)
        || image.top_layer == key
        || image
            .id
            .as_deref()
            .is_some_and(|id| id == key || (key.len() >= 12 && hex(id).starts_with(&hex(key))))
}

/// The files `image`'s containers read most: its own summary (removed
/// containers') and its live containers', added up by path (unordered).
/// Files a container made itself have no path in the image and are left
/// out only when they have none in the container either.
pub fn hot_files(engine: &Engine, layers: &[LayerInfo], image: &Image) -> Vec<HotFile> {
    let chains = Chains::new(layers);
    let Some(top) = chains.by_name.get(image.top_layer.as_str()).copied() else {
        return Vec::new();
    };
    let mut sources = vec![top];
    sources.extend(
        layers
            .iter()
            .filter(|l| !l.cold && chains.image_of(l).is_some_and(|t| t.name == top.name)),
    );
    let mut by_path: HashMap<String, HotFile> = HashMap::new();
    for l in sources {
        let rows = match engine.hot_files(l.id) {
            Ok(rows) => rows,
            // Removed since the listing: its files moved to its parent.
            Err(_) => continue,
        };
        for (f, path) in rows {
            let Some(path) = path else { continue };
            let path = String::from_utf8_lossy(&path).into_owned();
            let row = by_path.entry(path.clone()).or_insert_with(|| HotFile {
                image: image.name.clone(),
                path,
                ..HotFile::default()
            });
            row.reads += f.reads;
            row.bytes += f.bytes;
            row.error += f.error;
        }
    }
    by_path.into_values().collect()
}

/// Layers of the lcfs mount at `mountpoint` that some mount namespace
/// mounts on their own: a container's root file system (in its own
/// namespace, and where containerd's shim mounts it). Read from the
/// mountinfo of one process of each mount namespace (at most
/// [`MAX_NAMESPACES`]): entries on the mount's device whose root is a
/// layer's directory. Stamped with each layer's creation, as mountinfo
/// keeps no time.
pub fn mounted_layers(mountpoint: &Path, layers: &[LayerInfo]) -> Mounted {
    let mut out = Mounted::new();
    let Ok(own) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return out;
    };
    let at = mountpoint.to_string_lossy();
    // Fields: id, parent, major:minor, root, mount point, ...
    let Some(device) = own
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.len() > 4 && f[4] == at && f[3] == "/")
        .map(|f| f[2].to_string())
    else {
        return out;
    };
    let made: HashMap<&str, Timestamp> = layers
        .iter()
        .map(|l| (l.name.as_str(), l.created))
        .collect();
    let mut scan = |info: &str| {
        for f in info.lines().map(|l| l.split(' ').collect::<Vec<_>>()) {
            if f.len() > 4 && f[2] == device && f[3] != "/" {
                let layer = f[3].trim_start_matches('/').split('/').next().unwrap_or("");
                if let Some(t) = made.get(layer) {
                    out.insert(layer.to_string(), *t);
                }
            }
        }
    };
    scan(&own);
    let mut seen = HashSet::new();
    if let Ok(own_ns) = std::fs::read_link("/proc/self/ns/mnt") {
        seen.insert(own_ns);
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        if seen.len() >= MAX_NAMESPACES {
            break;
        }
        let name = p.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(ns) = std::fs::read_link(p.path().join("ns/mnt")) else {
            continue;
        };
        if seen.insert(ns) {
            if let Ok(info) = std::fs::read_to_string(p.path().join("mountinfo")) {
                scan(&info);
            }
        }
    }
    out
}

/// Mount namespaces [`mounted_layers`] reads at most.
pub const MAX_NAMESPACES: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;
    use lcfs_engine::LayerUsage;

    fn layer(name: &str, parent: Option<&str>, cold: bool, frozen: bool) -> LayerInfo {
        LayerInfo {
            id: 0,
            name: name.into(),
            parent: parent.map(Into::into),
            frozen,
            cold,
            children: 0,
            created: Timestamp {
                seconds: 1000,
                nanoseconds: 0,
            },
            frozen_at: None,
            owned_bytes: 100,
            inode_count: 10,
            next_inode: 11,
            quota_bytes: None,
            usage: LayerUsage::default(),
            seal: lcfs_engine::SealState::None,
        }
    }

    #[test]
    fn images_gather_their_containers_through_init_layers() {
        let mut base = layer("base", None, true, true);
        base.usage.applied_bytes = 1000;
        base.usage.apply_ns = 2_000_000_000;
        let mut top = layer("top", Some("base"), true, true);
        top.usage.clones = 3;
        top.usage.last_clone = Timestamp {
            seconds: 2000,
            nanoseconds: 0,
        };
        top.usage.apply_ns = 1_000_000_000;
        // One removed container, folded in.
        top.usage.clone_starts = 1;
        top.usage.clone_start_ns = 3_000_000_000;
        top.usage.clone_early_files = 5;
        let init = layer("c1-init", Some("top"), false, true);
        let mut c1 = layer("c1", Some("c1-init"), false, false);
        c1.usage.first_read = Timestamp {
            seconds: 1001,
            nanoseconds: 0,
        };
        c1.usage.early_files = 7;
        c1.usage.reads = 4;
        let c2 = layer("c2", Some("top"), false, false);
        // An image built on `top`: `top` has a pulled child but was cloned.
        let other = layer("other", Some("top"), true, true);
        let layers = vec![base, top, init, c1, c2, other];
        let mounted: Mounted = [(
            "c1".to_string(),
            Timestamp {
                seconds: 3000,
                nanoseconds: 0,
            },
        )]
        .into();
        let named = vec![Named {
            top_layer: "top".into(),
            name: "app:1".into(),
            owner: "docker",
            id: "sha256:0123456789abcdef".into(),
            namespace: None,
            references: vec!["app:1".into(), "app:latest".into()],
        }];
        let now = Timestamp {
            seconds: 3010,
            nanoseconds: 0,
        };
        let mut images = catalog(&layers, &named, &mounted, now);
        images.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(images.len(), 2);
        let app = &images[0];
        assert_eq!(
            (app.name.as_str(), app.top_layer.as_str()),
            ("app:1", "top")
        );
        assert_eq!(app.names, ["app:1", "app:latest"]);
        assert_eq!(app.records, named);
        assert_eq!((app.layers, app.size_bytes, app.starts), (2, 200, 3));
        assert_eq!((app.containers, app.running), (2, 1));
        assert_eq!(app.uptime_seconds, Some(10.0));
        assert_eq!(app.pull_seconds, 3.0);
        assert_eq!((app.startups, app.startup_files, app.reads), (2, 12, 4));
        assert_eq!(app.mean_startup_seconds, Some(2.0));
        assert!(matches(app, "0123456789ab") && matches(app, "top") && !matches(app, "0123"));
        assert_eq!(images[1].name, "other");
        assert_eq!(images[1].owner, None);
    }
}
