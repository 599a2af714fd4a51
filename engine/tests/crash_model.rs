//! Random layer and file operations run against the engine and a simple
//! in-memory model, with power cuts injected through FaultyDevice at random
//! device operations (unflushed writes dropped, torn or kept). After each
//! crash the engine is reopened; its state must equal the model's last
//! durable state (or the one a sync in flight was making durable), and fsck
//! must be clean. Replay with LCFS_SEED=<seed>; LCFS_CRASH_POINTS sets the
//! number of crashes (default 2000).

use lcfs_engine::device::{Device, FaultConfig, FaultyDevice};
use lcfs_engine::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Eq)]
enum MKind {
    File,
    Dir,
    Symlink,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MNode {
    kind: MKind,
    data: Vec<u8>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MLayer {
    parent: Option<String>,
    frozen: bool,
    children: u32,
    paths: BTreeMap<String, u64>,
    nodes: BTreeMap<u64, Rc<MNode>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Model {
    layers: BTreeMap<String, MLayer>,
    next: u64,
    next_layer: u64,
}

fn parent_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => "/",
    }
}

fn base_name(path: &str) -> &str {
    &path[path.rfind('/').map_or(0, |i| i + 1)..]
}

impl MLayer {
    fn dirs(&self) -> Vec<String> {
        let mut v = vec!["/".to_string()];
        v.extend(
            self.paths
                .iter()
                .filter(|(_, i)| self.nodes[*i].kind == MKind::Dir)
                .map(|(p, _)| p.clone()),
        );
        v
    }
    fn files(&self) -> Vec<String> {
        self.paths
            .iter()
            .filter(|(_, i)| self.nodes[*i].kind == MKind::File)
            .map(|(p, _)| p.clone())
            .collect()
    }
    fn non_dirs(&self) -> Vec<String> {
        self.paths
            .iter()
            .filter(|(_, i)| self.nodes[*i].kind != MKind::Dir)
            .map(|(p, _)| p.clone())
            .collect()
    }
    fn children_of(&self, dir: &str) -> usize {
        self.paths
            .keys()
            .filter(|p| parent_of(p) == dir && p.as_str() != dir)
            .count()
    }
    fn join(dir: &str, name: &str) -> String {
        if dir == "/" {
            format!("/{name}")
        } else {
            format!("{dir}/{name}")
        }
    }
    fn remove_path(&mut self, p: &str) {
        if let Some(ino) = self.paths.remove(p) {
            if !self.paths.values().any(|i| *i == ino) {
                self.nodes.remove(&ino);
            }
        }
    }
}

fn resolve(e: &Engine, layer: u64, path: &str) -> Result<u64> {
    let mut ino = ROOT_INODE;
    for part in path.split('/').filter(|s| !s.is_empty()) {
        ino = e.lookup(layer, ino, part.as_bytes())?.inode;
    }
    Ok(ino)
}

/// The engine's view of one layer, in model terms (inode numbers remapped by
/// first appearance so hard link structure compares).
fn snapshot_layer(
    e: &Engine,
    layer: u64,
) -> Result<(BTreeMap<String, usize>, BTreeMap<usize, MNode>)> {
    let mut paths = BTreeMap::new();
    let mut nodes = BTreeMap::new();
    let mut seen: HashMap<u64, usize> = HashMap::new();
    let mut nlinks: HashMap<usize, u32> = HashMap::new();
    let mut stack = vec![("/".to_string(), ROOT_INODE)];
    while let Some((dir, dino)) = stack.pop() {
        let mut cookie = 0;
        loop {
            let entries = e.readdir(layer, dino, cookie, 64)?;
            if entries.is_empty() {
                break;
            }
            for ent in &entries {
                cookie = ent.cookie;
                let name = String::from_utf8(ent.name.clone()).unwrap();
                let path = MLayer::join(&dir, &name);
                let a = e.getattr(layer, ent.inode)?;
                let fresh = !seen.contains_key(&ent.inode);
                let n = seen.len();
                let id = *seen.entry(ent.inode).or_insert(n);
                paths.insert(path.clone(), id);
                if !fresh {
                    continue;
                }
                let mut xattrs = BTreeMap::new();
                for x in e.listxattr(layer, ent.inode)? {
                    let v = e.getxattr(layer, ent.inode, &x)?;
                    xattrs.insert(x, v);
                }
                let (kind, data) = match a.kind {
                    FileKind::Directory => {
                        stack.push((path.clone(), ent.inode));
                        (MKind::Dir, Vec::new())
                    }
                    FileKind::Symlink => (MKind::Symlink, e.readlink(layer, ent.inode)?),
                    _ => (
                        MKind::File,
                        e.read(layer, ent.inode, 0, a.size as usize + 10)?,
                    ),
                };
                if kind == MKind::File {
                    assert_eq!(
                        data.len() as u64,
                        a.size,
                        "{path}: read length differs from size"
                    );
                }
                nlinks.insert(id, a.nlink);
                nodes.insert(id, MNode { kind, data, xattrs });
            }
        }
    }
    // nlink must equal the number of names for files.
    for (id, n) in nlinks {
        if nodes[&id].kind != MKind::Dir {
            let names = paths.values().filter(|v| **v == id).count() as u32;
            assert_eq!(n, names, "nlink of inode {id} is {n}, it has {names} names");
        }
    }
    Ok((paths, nodes))
}

/// Normalises a model layer the same way as `snapshot_layer`.
fn normalise(l: &MLayer) -> (BTreeMap<String, usize>, BTreeMap<usize, MNode>) {
    // Assign ids in the order the engine walk would see them is not knowable;
    // compare through a canonical renumbering by smallest path instead.
    canonical(
        &l.paths
            .iter()
            .map(|(p, i)| (p.clone(), *i as usize))
            .collect(),
        &l.nodes
            .iter()
            .map(|(i, n)| (*i as usize, (**n).clone()))
            .collect(),
    )
}

fn canonical(
    paths: &BTreeMap<String, usize>,
    nodes: &BTreeMap<usize, MNode>,
) -> (BTreeMap<String, usize>, BTreeMap<usize, MNode>) {
    let mut order: HashMap<usize, usize> = HashMap::new();
    for id in paths.values() {
        let n = order.len();
        order.entry(*id).or_insert(n);
    }
    let p = paths.iter().map(|(k, v)| (k.clone(), order[v])).collect();
    let n = nodes
        .iter()
        .filter(|(k, _)| order.contains_key(k))
        .map(|(k, v)| (order[k], v.clone()))
        .collect();
    (p, n)
}

fn engine_matches(e: &Engine, m: &Model) -> std::result::Result<(), String> {
    let infos = e.list_layers();
    let names: Vec<String> = infos.iter().map(|i| i.name.clone()).collect();
    let want: Vec<String> = m.layers.keys().cloned().collect();
    let mut got = names.clone();
    got.sort();
    if got != want {
        return Err(format!("layers differ: engine {got:?}, model {want:?}"));
    }
    for info in infos {
        let ml = &m.layers[&info.name];
        if info.frozen != ml.frozen || info.parent != ml.parent || info.children != ml.children {
            return Err(format!(
                "layer {} differs: engine frozen={} parent={:?} children={}, model frozen={} parent={:?} children={}",
                info.name, info.frozen, info.parent, info.children, ml.frozen, ml.parent, ml.children
            ));
        }
        let (p, n) = snapshot_layer(e, info.id)
            .map_err(|err| format!("reading layer {}: {err}", info.name))?;
        let (p, n) = canonical(&p, &n);
        let (mp, mn) = normalise(ml);
        if p != mp {
            let a: Vec<_> = p.keys().collect();
            let b: Vec<_> = mp.keys().collect();
            return Err(format!(
                "layer {} paths differ:\n engine {a:?}\n model  {b:?}",
                info.name
            ));
        }
        if n != mn {
            for (id, node) in &n {
                if mn.get(id) != Some(node) {
                    let path = p.iter().find(|(_, v)| *v == id).map(|(k, _)| k.clone());
                    return Err(format!(
                        "layer {} content of {path:?} differs (engine len {}, model len {:?})",
                        info.name,
                        node.data.len(),
                        mn.get(id).map(|x| x.data.len())
                    ));
                }
            }
            return Err(format!("layer {} inode sets differ", info.name));
        }
    }
    Ok(())
}

enum Outcome {
    Done,
    /// The op changed nothing the model tracks.
    Skip,
}

/// Applies one random operation to engine and model. An engine error is
/// returned as Err (the caller decides whether the device had crashed).
fn step(
    e: &Engine,
    m: &mut Model,
    rng: &mut ChaCha8Rng,
) -> std::result::Result<Outcome, (String, Error)> {
    let writable: Vec<String> = m
        .layers
        .iter()
        .filter(|(_, l)| !l.frozen)
        .map(|(k, _)| k.clone())
        .collect();
    let op = rng.gen_range(0..100);
    let ctx = |what: &str| what.to_string();
    macro_rules! go {
        ($what:expr, $e:expr) => {
            $e.map_err(|err| (ctx($what), err))?
        };
    }
    if op < 3 || m.layers.is_empty() {
        if m.layers.len() >= 8 {
            return Ok(Outcome::Skip);
        }
        let name = format!("base{}", m.next_layer);
        m.next_layer += 1;
        go!("create_layer", e.create_layer(&name, rng.gen_bool(0.5)));
        let mut l = MLayer {
            parent: None,
            frozen: false,
            children: 0,
            paths: BTreeMap::new(),
            nodes: BTreeMap::new(),
        };
        l.nodes.clear();
        m.layers.insert(name, l);
        return Ok(Outcome::Done);
    }
    if op < 7 {
        if m.layers.len() >= 10 {
            return Ok(Outcome::Skip);
        }
        let keys: Vec<String> = m.layers.keys().cloned().collect();
        let parent = keys[rng.gen_range(0..keys.len())].clone();
        let name = format!("c{}", m.next_layer);
        m.next_layer += 1;
        go!("clone", e.clone_layer(&parent, &name));
        let p = m.layers.get_mut(&parent).unwrap();
        p.frozen = true;
        p.children += 1;
        let mut c = p.clone();
        c.parent = Some(parent);
        c.frozen = false;
        c.children = 0;
        m.layers.insert(name, c);
        return Ok(Outcome::Done);
    }
    if op < 8 && !writable.is_empty() {
        let name = &writable[rng.gen_range(0..writable.len())];
        go!("commit", e.commit_layer(name));
        m.layers.get_mut(name).unwrap().frozen = true;
        return Ok(Outcome::Done);
    }
    if op < 11 {
        let childless: Vec<String> = m
            .layers
            .iter()
            .filter(|(_, l)| l.children == 0)
            .map(|(k, _)| k.clone())
            .collect();
        if childless.is_empty() || m.layers.len() < 3 {
            return Ok(Outcome::Skip);
        }
        let name = childless[rng.gen_range(0..childless.len())].clone();
        if rng.gen_bool(0.5) {
            // A few steps now; the rest is freed by a later removal or an
            // operation short of room, checkpoints and crashes in between.
            go!("begin_remove_layer", e.begin_remove_layer(&name));
            go!("remove_steps", e.remove_steps(rng.gen_range(0..4)));
        } else {
            go!("remove_layer", e.remove_layer(&name));
        }
        let l = m.layers.remove(&name).unwrap();
        if let Some(p) = l.parent {
            m.layers.get_mut(&p).unwrap().children -= 1;
        }
        return Ok(Outcome::Done);
    }
    if writable.is_empty() {
        return Ok(Outcome::Skip);
    }
    let lname = writable[rng.gen_range(0..writable.len())].clone();
    let lid = go!("layer_id", e.layer_id(&lname));
    let l = m.layers.get_mut(&lname).unwrap();
    let pick = |v: &Vec<String>, rng: &mut ChaCha8Rng| v[rng.gen_range(0..v.len())].clone();
    let fresh_name = |rng: &mut ChaCha8Rng| format!("n{}", rng.gen_range(0..40));
    match op {
        11..=24 => {
            // create a file, dir or symlink
            let dir = pick(&l.dirs(), rng);
            let name = fresh_name(rng);
            let path = MLayer::join(&dir, &name);
            if l.paths.contains_key(&path) || l.paths.len() > 60 {
                return Ok(Outcome::Skip);
            }
            let dino = go!("resolve", resolve(e, lid, &dir));
            let kind = rng.gen_range(0..10);
            let node = if kind < 6 {
                go!("create", e.create(lid, dino, name.as_bytes(), 0o644, 0, 0));
                MNode {
                    kind: MKind::File,
                    data: Vec::new(),
                    xattrs: BTreeMap::new(),
                }
            } else if kind < 9 {
                go!("mkdir", e.mkdir(lid, dino, name.as_bytes(), 0o755, 0, 0));
                MNode {
                    kind: MKind::Dir,
                    data: Vec::new(),
                    xattrs: BTreeMap::new(),
                }
            } else {
                let len = if rng.gen_bool(0.2) {
                    rng.gen_range(1025..3000)
                } else {
                    rng.gen_range(1..100)
                };
                let target: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
                go!(
                    "symlink",
                    e.symlink(lid, dino, name.as_bytes(), &target, 0, 0)
                );
                MNode {
                    kind: MKind::Symlink,
                    data: target,
                    xattrs: BTreeMap::new(),
                }
            };
            m.next += 1;
            let ino = m.next;
            let l = m.layers.get_mut(&lname).unwrap();
            l.nodes.insert(ino, Rc::new(node));
            l.paths.insert(path, ino);
        }
        25..=49 => {
            let files = l.files();
            if files.is_empty() {
                return Ok(Outcome::Skip);
            }
            let path = pick(&files, rng);
            let ino = go!("resolve", resolve(e, lid, &path));
            let off = if rng.gen_bool(0.3) {
                rng.gen_range(0..8192)
            } else {
                rng.gen_range(0..400_000)
            };
            let len = if rng.gen_bool(0.7) {
                rng.gen_range(1..6000)
            } else {
                rng.gen_range(1..200_000)
            };
            let byte = rng.gen::<u8>();
            let data: Vec<u8> = (0..len)
                .map(|i| byte.wrapping_add((i % 253) as u8))
                .collect();
            go!("write", e.write(lid, ino, off, &data));
            let n = Rc::make_mut(l.nodes.get_mut(&l.paths[&path]).unwrap());
            let end = off as usize + len;
            if n.data.len() < end {
                n.data.resize(end, 0);
            }
            n.data[off as usize..end].copy_from_slice(&data);
        }
        50..=54 => {
            let files = l.files();
            if files.is_empty() {
                return Ok(Outcome::Skip);
            }
            let path = pick(&files, rng);
            let ino = go!("resolve", resolve(e, lid, &path));
            let size = rng.gen_range(0..300_000u64);
            go!(
                "truncate",
                e.setattr(
                    lid,
                    ino,
                    &SetAttr {
                        size: Some(size),
                        ..Default::default()
                    }
                )
            );
            Rc::make_mut(l.nodes.get_mut(&l.paths[&path]).unwrap())
                .data
                .resize(size as usize, 0);
        }
        55..=58 => {
            let files = l.files();
            if files.is_empty() {
                return Ok(Outcome::Skip);
            }
            let path = pick(&files, rng);
            let ino = go!("resolve", resolve(e, lid, &path));
            let n = Rc::make_mut(l.nodes.get_mut(&l.paths[&path]).unwrap());
            let size = n.data.len() as u64;
            let off = rng.gen_range(0..size + 10_000);
            let len = rng.gen_range(1..50_000u64);
            go!(
                "punch",
                e.fallocate(
                    lid,
                    ino,
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    off,
                    len
                )
            );
            let end = (off + len).min(size);
            if off < end {
                n.data[off as usize..end as usize].fill(0);
            }
        }
        59..=66 => {
            let nd = l.non_dirs();
            let dirs: Vec<String> = l
                .dirs()
                .into_iter()
                .filter(|d| d != "/" && l.children_of(d) == 0)
                .collect();
            if rng.gen_bool(0.3) && !dirs.is_empty() {
                let path = pick(&dirs, rng);
                let dino = go!("resolve", resolve(e, lid, parent_of(&path)));
                go!("rmdir", e.rmdir(lid, dino, base_name(&path).as_bytes()));
                l.remove_path(&path);
            } else if !nd.is_empty() {
                let path = pick(&nd, rng);
                let dino = go!("resolve", resolve(e, lid, parent_of(&path)));
                go!("unlink", e.unlink(lid, dino, base_name(&path).as_bytes()));
                l.remove_path(&path);
            } else {
                return Ok(Outcome::Skip);
            }
        }
        67..=74 => {
            // rename a non-directory (possibly over another non-directory)
            let nd = l.non_dirs();
            if nd.is_empty() {
                return Ok(Outcome::Skip);
            }
            let from = pick(&nd, rng);
            let to_dir = pick(&l.dirs(), rng);
            let to = MLayer::join(&to_dir, &fresh_name(rng));
            if let Some(t) = l.paths.get(&to) {
                if l.nodes[t].kind == MKind::Dir {
                    return Ok(Outcome::Skip);
                }
            }
            let exchange = l.paths.contains_key(&to) && rng.gen_bool(0.3);
            let fd = go!("resolve", resolve(e, lid, parent_of(&from)));
            let td = go!("resolve", resolve(e, lid, &to_dir));
            let flags = if exchange { RENAME_EXCHANGE } else { 0 };
            go!(
                "rename",
                e.rename(
                    lid,
                    fd,
                    base_name(&from).as_bytes(),
                    td,
                    base_name(&to).as_bytes(),
                    flags
                )
            );
            if from == to {
                return Ok(Outcome::Done);
            }
            let a = l.paths[&from];
            if exchange {
                let b = l.paths[&to];
                l.paths.insert(from, b);
                l.paths.insert(to, a);
            } else if l.paths.get(&to) == Some(&a) {
                // two names of one file: nothing happens
            } else {
                l.remove_path(&to);
                l.paths.remove(&from);
                l.paths.insert(to, a);
            }
        }
        75..=80 => {
            let files = l.files();
            let dir = pick(&l.dirs(), rng);
            let to = MLayer::join(&dir, &fresh_name(rng));
            if files.is_empty() || l.paths.contains_key(&to) {
                return Ok(Outcome::Skip);
            }
            let from = pick(&files, rng);
            let ino = go!("resolve", resolve(e, lid, &from));
            let dino = go!("resolve", resolve(e, lid, &dir));
            go!("link", e.link(lid, ino, dino, base_name(&to).as_bytes()));
            let i = l.paths[&from];
            l.paths.insert(to, i);
        }
        81..=89 => {
            let all: Vec<String> = l.paths.keys().cloned().collect();
            if all.is_empty() {
                return Ok(Outcome::Skip);
            }
            let path = pick(&all, rng);
            let ino = go!("resolve", resolve(e, lid, &path));
            let name = format!("user.x{}", rng.gen_range(0..4)).into_bytes();
            let n = Rc::make_mut(l.nodes.get_mut(&l.paths[&path]).unwrap());
            if rng.gen_bool(0.7) {
                let len = rng.gen_range(0..300);
                let v: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                go!("setxattr", e.setxattr(lid, ino, &name, &v, 0));
                n.xattrs.insert(name, v);
            } else if n.xattrs.contains_key(&name) {
                go!("removexattr", e.removexattr(lid, ino, &name));
                n.xattrs.remove(&name);
            } else {
                return Ok(Outcome::Skip);
            }
        }
        _ => {
            go!("sync", e.sync());
            return Ok(Outcome::Done);
        }
    }
    Ok(Outcome::Done)
}

fn quiet(write_behind_segments: usize) -> Config {
    Config {
        write_behind_segments,
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        node_cache_bytes: 1 << 20,
        block_cache_bytes: 1 << 20,
        ..Config::default()
    }
}

#[test]
fn crash_anywhere_recovers_last_durable_state() {
    run(crash_points(), 0);
}

/// The same with full segments written behind by a thread. Thread timing
/// changes the order of device operations, so a seed replays the operations
/// but not always the exact crash points.
#[test]
fn crash_anywhere_with_write_behind() {
    run(crash_points() / 4, 2);
}

fn crash_points() -> usize {
    std::env::var("LCFS_CRASH_POINTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

fn run(points: usize, write_behind: usize) {
    let seed: u64 = std::env::var("LCFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!(
        "crash model: LCFS_SEED={seed} LCFS_CRASH_POINTS={points} write_behind={write_behind}"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let cycles_per_device = 50;
    let mut done = 0;
    let mut ops_total = 0u64;
    let mut syncs_seen = 0u64;
    while done < points {
        let dev_size = 48 << 20;
        // Re-format on a FaultyDevice so the first cycle starts from its image.
        let faulty = Arc::new(FaultyDevice::new(
            dev_size,
            FaultConfig {
                seed: rng.gen(),
                ..Default::default()
            },
        ));
        let d: Arc<dyn Device> = faulty.clone();
        Engine::format(
            d,
            &FormatOptions {
                segment_size_bytes: 256 << 10,
                force: false,
            },
        )
        .unwrap();
        let mut image = faulty.crash_image();
        let mut model = Model::default();
        for cycle in 0..cycles_per_device {
            if done >= points {
                break;
            }
            let crash_at = rng.gen_range(1..400u64);
            let cfg = FaultConfig {
                seed: rng.gen(),
                crash_after_ops: Some(crash_at),
                tear_writes: true,
                ..Default::default()
            };
            let dev = Arc::new(FaultyDevice::from_image(image, cfg));
            let d: Arc<dyn Device> = dev.clone();
            let e = match Engine::open(d, quiet(write_behind)) {
                Ok(e) => e,
                Err(err) if dev.is_crashed() => {
                    // Crashed while recovering (orphan purge writes nothing
                    // durable): the state is still the model's.
                    image = dev.crash_image();
                    done += 1;
                    let _ = err;
                    continue;
                }
                Err(err) => panic!("seed {seed} cycle {cycle}: open failed: {err}"),
            };
            let mut durable = vec![model.clone()];
            let mut crashed_in = None;
            for _ in 0..300 {
                let before = model.clone();
                let seq_before = e.checkpoint_seq();
                match step(&e, &mut model, &mut rng) {
                    Ok(_) => {
                        ops_total += 1;
                        if e.checkpoint_seq() != seq_before {
                            syncs_seen += 1;
                            // A checkpoint ran inside the op: before it (space
                            // admission) or after it (upkeep).
                            durable = vec![before, model.clone()];
                        }
                    }
                    Err((what, err)) => {
                        if !dev.is_crashed() {
                            panic!("seed {seed}: {what} failed without a crash: {err}");
                        }
                        crashed_in = Some(what);
                        // The op may have reached any point; states before it
                        // and (if it finished before a checkpoint) after it
                        // may be durable.
                        durable.push(before);
                        durable.push(model.clone());
                        break;
                    }
                }
                if dev.is_crashed() {
                    break;
                }
            }
            let _ = crashed_in;
            e.crash();
            drop(e);
            image = dev.crash_image();
            let check = Arc::new(FaultyDevice::from_image(image, FaultConfig::default()));
            let d: Arc<dyn Device> = check.clone();
            let e = Engine::open(d, quiet(write_behind))
                .unwrap_or_else(|err| panic!("seed {seed} cycle {cycle}: reopen failed: {err}"));
            let report = e.fsck(true).unwrap();
            assert!(
                report.is_clean(),
                "seed {seed} cycle {cycle}: fsck after crash: {:#?}",
                &report.errors[..report.errors.len().min(10)]
            );
            let mut matched = None;
            let mut why = Vec::new();
            for (i, cand) in durable.iter().enumerate().rev() {
                match engine_matches(&e, cand) {
                    Ok(()) => {
                        matched = Some(i);
                        break;
                    }
                    Err(w) => why.push(w),
                }
            }
            let Some(i) = matched else {
                panic!("seed {seed} cycle {cycle}: recovered state matches no durable model state:\n{}", why.join("\n"));
            };
            model = durable[i].clone();
            e.crash();
            drop(e);
            image = check.crash_image();
            done += 1;
        }
    }
    println!("crash model: {done} crash points, {ops_total} operations, {syncs_seen} checkpoints inside operations");
}
