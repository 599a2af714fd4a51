//! Model test driven by the fuzzer: the input is a program of layer and file
//! operations, run against the engine on a FaultyDevice and against a plain
//! in-memory model (a BTreeMap of paths per layer). After every operation
//! the engine's answer must agree with the model's (success, or the same
//! error kind). "crash" cuts the power (unflushed writes dropped, torn or
//! kept) and reopens; "cut" arms a power cut a few device operations into
//! the next operation (so checkpoints tear). After every crash the reopened
//! engine must equal the model's state at the last durability point (a
//! successful sync, or a checkpoint the engine took inside an operation,
//! seen as a change of `checkpoint_seq`) and `fsck(true)` must be clean. At
//! the end the live engine must equal the model, and must again after a
//! final sync and crash.
//!
//! Two devices: 16 MiB in 256 KiB segments, where a run's at most 4 MiB of
//! data always fits and running out of space is a failure; and 2 MiB in
//! 64 KiB segments, where the cleaner has to work and an operation may fail
//! with "no space" (it must then change nothing; sync must never fail).
//!
//! Input: one seed byte (bit 0 picks the small device, bit 1 turns on
//! write-behind; the byte seeds the fault injection), then operations (an opcode byte and its argument bytes;
//! missing bytes read as zero), at most 64.
//! `LCFS_FUZZ_TRACE=1 cargo fuzz run ops_model <file>` prints what ran.
#![no_main]

use lcfs_engine::device::{AlignedBuf, Device, FaultConfig, FaultyDevice, MemDevice};
use lcfs_engine::{
    Config, Engine, Error, FileKind, FormatOptions, SetAttr, RENAME_EXCHANGE, RENAME_NOREPLACE,
    ROOT_INODE, XATTR_CREATE, XATTR_REPLACE,
};
use libfuzzer_sys::fuzz_target;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};

/// Device size and segment size, in bytes.
const ROOMY: (u64, u64) = (16 << 20, 256 << 10);
const SMALL: (u64, u64) = (2 << 20, 64 << 10);
const BLOCK_BYTES: usize = 4096;
const MAX_OPS: usize = 64;
/// Writes start below this and carry at most MAX_WRITE_BYTES, so a run adds
/// at most 4 MiB of live data: on the roomy device (a 15.75 MiB log) running
/// out of space would be an engine problem, not the input's.
const MAX_OFFSET: u64 = 192 << 10;
const MAX_WRITE_BYTES: usize = 64 << 10;
/// Largest leaf value (4096 - 64 header - 19 entry overhead).
const MAX_VALUE_BYTES: usize = 4013;
/// Longest valid name.
const NAME_MAX: usize = 255;

const LAYER_NAMES: [&str; 5] = ["l0", "l1", "l2", "l3", "l4"];
const XATTR_NAMES: [&str; 4] = ["user.a", "user.b", "user.long-attribute-name", "trusted.t"];

/// File names: mostly one of six valid ones, sometimes an invalid one or
/// one too long.
fn file_name(i: u8) -> String {
    match i % 16 {
        14 => "..".to_string(),
        15 => "x".repeat(NAME_MAX + 1),
        n => ((b'a' + n % 6) as char).to_string(),
    }
}

/// Engine configuration: no background thread, small caches so nodes are
/// evicted and read back from the device. Write-behind (a writer thread for
/// full segments) makes the order of device operations, and so the crash
/// images, vary between runs of one input; it is on for half the inputs.
fn config(write_behind: bool) -> Config {
    Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        node_cache_bytes: 256 << 10,
        block_cache_bytes: 256 << 10,
        write_behind_segments: if write_behind { 2 } else { 0 },
        ..Config::default()
    }
}

/// (byte offset, contents) of each non-zero block of a device image.
type Image = Vec<(u64, Vec<u8>)>;

/// Non-zero blocks of a freshly formatted device, made once per geometry so
/// every run starts from the same image (format picks a random uuid).
fn formatted_blocks(small: bool) -> &'static [(u64, Vec<u8>)] {
    static BLOCKS: [OnceLock<Image>; 2] = [OnceLock::new(), OnceLock::new()];
    BLOCKS[small as usize].get_or_init(|| {
        let (device_bytes, segment_bytes) = if small { SMALL } else { ROOMY };
        let dev = Arc::new(MemDevice::new(device_bytes));
        let d: Arc<dyn Device> = dev.clone();
        Engine::format(
            d,
            &FormatOptions {
                segment_size_bytes: segment_bytes,
                force: false,
            },
        )
        .expect("format a fresh device");
        dev.snapshot()
            .chunks_exact(BLOCK_BYTES)
            .enumerate()
            .filter(|(_, b)| b.iter().any(|&x| x != 0))
            .map(|(i, b)| ((i * BLOCK_BYTES) as u64, b.to_vec()))
            .collect()
    })
}

// ------------------------------------------------------------------ input

struct Input<'a> {
    data: &'a [u8],
    at: usize,
}

impl Input<'_> {
    fn done(&self) -> bool {
        self.at >= self.data.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.u8() as usize % items.len()].clone()
    }
}

// ------------------------------------------------------------------ model

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    kind: Kind,
    /// File contents or symlink target.
    data: Vec<u8>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Node {
    fn new(kind: Kind, data: Vec<u8>) -> Rc<Node> {
        Rc::new(Node {
            kind,
            data,
            xattrs: BTreeMap::new(),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Layer {
    parent: Option<String>,
    frozen: bool,
    children: u32,
    /// Every name, "/" included, to a node id (hard links share one).
    paths: BTreeMap<String, u64>,
    nodes: BTreeMap<u64, Rc<Node>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Model {
    layers: BTreeMap<String, Layer>,
    next_id: u64,
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// `path` is `ancestor` or lies below it.
fn is_below(path: &str, ancestor: &str) -> bool {
    path == ancestor
        || ancestor == "/"
        || (path.starts_with(ancestor) && path.as_bytes().get(ancestor.len()) == Some(&b'/'))
}

fn name_error(name: &str) -> Option<Fail> {
    if name.len() > NAME_MAX {
        Some(Fail::NameTooLong)
    } else if name == "." || name == ".." {
        Some(Fail::Invalid)
    } else {
        None
    }
}

impl Layer {
    fn kind(&self, path: &str) -> Option<Kind> {
        self.paths.get(path).map(|id| self.nodes[id].kind)
    }
    fn has_children(&self, dir: &str) -> bool {
        let prefix = if dir == "/" {
            "/".to_string()
        } else {
            format!("{dir}/")
        };
        self.paths
            .keys()
            .any(|p| p != "/" && p.starts_with(&prefix) && p != dir)
    }
    fn node_mut(&mut self, path: &str) -> &mut Node {
        let id = self.paths[path];
        Rc::make_mut(self.nodes.get_mut(&id).expect("node of a path"))
    }
    /// Drops one name; the node goes with its last name.
    fn remove_name(&mut self, path: &str) {
        if let Some(id) = self.paths.remove(path) {
            if !self.paths.values().any(|&i| i == id) {
                self.nodes.remove(&id);
            }
        }
    }
    /// The names at or below `path`, with `path` cut off the front.
    fn take_subtree(&mut self, path: &str) -> Vec<(String, u64)> {
        let inside: Vec<String> = self
            .paths
            .keys()
            .filter(|p| is_below(p, path) && *p != "/")
            .cloned()
            .collect();
        inside
            .into_iter()
            .map(|p| {
                let id = self.paths.remove(&p).expect("listed");
                (p[path.len()..].to_string(), id)
            })
            .collect()
    }
    fn put_subtree(&mut self, path: &str, names: Vec<(String, u64)>) {
        for (rest, id) in names {
            self.paths.insert(format!("{path}{rest}"), id);
        }
    }
}

/// Error kinds the model predicts (the engine's error mapped down).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fail {
    NotFound,
    Exists,
    NotEmpty,
    NotDirectory,
    IsDirectory,
    Invalid,
    ReadOnly,
    Busy,
    NameTooLong,
    NoAttribute,
    NotPermitted,
    NoSpace,
    Other,
}

fn fail_of(e: &Error) -> Fail {
    match e {
        Error::NotFound => Fail::NotFound,
        Error::Exists => Fail::Exists,
        Error::NotEmpty => Fail::NotEmpty,
        Error::NotDirectory => Fail::NotDirectory,
        Error::IsDirectory => Fail::IsDirectory,
        Error::Invalid(_) => Fail::Invalid,
        Error::ReadOnly => Fail::ReadOnly,
        Error::Busy(_) | Error::HasChildren { .. } => Fail::Busy,
        Error::NameTooLong => Fail::NameTooLong,
        Error::NoAttribute => Fail::NoAttribute,
        Error::NotPermitted => Fail::NotPermitted,
        Error::NoSpace => Fail::NoSpace,
        _ => Fail::Other,
    }
}

type Expect = Result<(), Fail>;

fn new_layer(model: &mut Model, parent: Option<String>) -> Layer {
    let root = model.next_id;
    model.next_id += 1;
    Layer {
        parent,
        frozen: false,
        children: 0,
        paths: BTreeMap::from([("/".to_string(), root)]),
        nodes: BTreeMap::from([(root, Node::new(Kind::Dir, Vec::new()))]),
    }
}

// ------------------------------------------------------------------ engine view

fn resolve(e: &Engine, layer: u64, path: &str) -> lcfs_engine::Result<u64> {
    let mut ino = ROOT_INODE;
    for part in path.split('/').filter(|s| !s.is_empty()) {
        ino = e.lookup(layer, ino, part.as_bytes())?.inode;
    }
    Ok(ino)
}

struct Seen {
    node: Node,
    nlink: u32,
}

/// A layer as read back: every name to its inode, and each inode once.
type LayerView = (BTreeMap<String, u64>, BTreeMap<u64, Seen>);

/// Reads one layer back through the public API: every name (readdir in
/// pages of 3 to exercise cookies, cross-checked with lookup), every node.
fn read_layer(e: &Engine, layer: u64) -> Result<LayerView, String> {
    let err = |what: &str, e: Error| format!("{what}: {e}");
    let mut paths = BTreeMap::from([("/".to_string(), ROOT_INODE)]);
    let mut nodes = BTreeMap::new();
    let root = e
        .getattr(layer, ROOT_INODE)
        .map_err(|x| err("getattr /", x))?;
    if root.kind != FileKind::Directory {
        return Err("root is not a directory".into());
    }
    nodes.insert(ROOT_INODE, read_node(e, layer, ROOT_INODE, "/")?);
    let mut stack = vec![("/".to_string(), ROOT_INODE)];
    while let Some((dir, dino)) = stack.pop() {
        let mut cookie = 0;
        let mut names = BTreeSet::new();
        for _ in 0..10_000 {
            let entries = e
                .readdir(layer, dino, cookie, 3)
                .map_err(|x| err(&format!("readdir {dir}"), x))?;
            if entries.is_empty() {
                break;
            }
            for ent in entries {
                if ent.cookie <= cookie {
                    return Err(format!(
                        "{dir}: readdir cookie {} after {cookie}",
                        ent.cookie
                    ));
                }
                cookie = ent.cookie;
                let name = String::from_utf8(ent.name.clone()).map_err(|_| "non-utf8 name")?;
                if !names.insert(name.clone()) {
                    return Err(format!("{dir}: {name} listed twice"));
                }
                let path = join(&dir, &name);
                let found = e
                    .lookup(layer, dino, &ent.name)
                    .map_err(|x| err(&format!("lookup {path}"), x))?;
                if found.inode != ent.inode || found.kind != ent.kind {
                    return Err(format!("{path}: readdir and lookup disagree"));
                }
                paths.insert(path.clone(), ent.inode);
                if nodes.contains_key(&ent.inode) {
                    if ent.kind == FileKind::Directory {
                        return Err(format!("{path}: directory with two names"));
                    }
                    continue;
                }
                nodes.insert(ent.inode, read_node(e, layer, ent.inode, &path)?);
                if ent.kind == FileKind::Directory {
                    stack.push((path, ent.inode));
                }
            }
        }
    }
    Ok((paths, nodes))
}

fn read_node(e: &Engine, layer: u64, ino: u64, path: &str) -> Result<Seen, String> {
    let err = |what: &str, x: Error| format!("{what} {path}: {x}");
    let a = e.getattr(layer, ino).map_err(|x| err("getattr", x))?;
    let (kind, data) = match a.kind {
        FileKind::Directory => (Kind::Dir, Vec::new()),
        FileKind::Symlink => {
            let t = e.readlink(layer, ino).map_err(|x| err("readlink", x))?;
            if t.len() as u64 != a.size {
                return Err(format!(
                    "{path}: symlink size {} for a {}-byte target",
                    a.size,
                    t.len()
                ));
            }
            (Kind::Symlink, t)
        }
        FileKind::File => {
            let d = e
                .read(layer, ino, 0, a.size as usize + 10)
                .map_err(|x| err("read", x))?;
            if d.len() as u64 != a.size {
                return Err(format!(
                    "{path}: read {} bytes of a {}-byte file",
                    d.len(),
                    a.size
                ));
            }
            (Kind::File, d)
        }
        k => return Err(format!("{path}: unexpected kind {k:?}")),
    };
    let mut xattrs = BTreeMap::new();
    for name in e.listxattr(layer, ino).map_err(|x| err("listxattr", x))? {
        let v = e
            .getxattr(layer, ino, &name)
            .map_err(|x| err("getxattr", x))?;
        if xattrs.insert(name, v).is_some() {
            return Err(format!("{path}: xattr listed twice"));
        }
    }
    Ok(Seen {
        node: Node { kind, data, xattrs },
        nlink: a.nlink,
    })
}

/// The engine's state equals the model's: layers, names, link structure,
/// contents, xattrs, nlink and inode counts.
fn compare(e: &Engine, m: &Model) -> Result<(), String> {
    let infos = e.list_layers();
    let got: Vec<String> = infos
        .iter()
        .map(|i| i.name.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let want: Vec<String> = m.layers.keys().cloned().collect();
    if got != want || infos.len() != got.len() {
        return Err(format!("layers: engine {got:?}, model {want:?}"));
    }
    for info in &infos {
        let ml = &m.layers[&info.name];
        if info.frozen != ml.frozen || info.parent != ml.parent || info.children != ml.children {
            return Err(format!(
                "layer {}: engine frozen={} parent={:?} children={}, model frozen={} parent={:?} children={}",
                info.name, info.frozen, info.parent, info.children, ml.frozen, ml.parent, ml.children
            ));
        }
        let (paths, nodes) =
            read_layer(e, info.id).map_err(|x| format!("layer {}: {x}", info.name))?;
        let names: Vec<&String> = paths.keys().collect();
        let model_names: Vec<&String> = ml.paths.keys().collect();
        if names != model_names {
            return Err(format!(
                "layer {}: names\n engine {names:?}\n model  {model_names:?}",
                info.name
            ));
        }
        // Link structure: the first name of each node, engine vs model.
        let first = |p: &BTreeMap<String, u64>| -> BTreeMap<String, String> {
            let mut by_id: BTreeMap<u64, String> = BTreeMap::new();
            for (path, id) in p {
                by_id.entry(*id).or_insert_with(|| path.clone());
            }
            p.iter()
                .map(|(path, id)| (path.clone(), by_id[id].clone()))
                .collect()
        };
        if first(&paths) != first(&ml.paths) {
            return Err(format!("layer {}: hard link structure differs", info.name));
        }
        for (path, ino) in &paths {
            let seen = &nodes[ino];
            let want = &ml.nodes[&ml.paths[path]];
            if seen.node != **want {
                return Err(format!(
                    "layer {} {path}: engine {:?} {} bytes xattrs {:?}, model {:?} {} bytes xattrs {:?}",
                    info.name,
                    seen.node.kind,
                    seen.node.data.len(),
                    seen.node.xattrs.keys().collect::<Vec<_>>(),
                    want.kind,
                    want.data.len(),
                    want.xattrs.keys().collect::<Vec<_>>()
                ));
            }
            let nlink = if want.kind == Kind::Dir {
                2 + ml
                    .paths
                    .keys()
                    .filter(|p| {
                        *p != "/"
                            && ml.kind(p) == Some(Kind::Dir)
                            && p.rfind('/').map(|i| if i == 0 { "/" } else { &p[..i] })
                                == Some(path.as_str())
                    })
                    .count() as u32
            } else {
                ml.paths.values().filter(|&&i| i == ml.paths[path]).count() as u32
            };
            if seen.nlink != nlink {
                return Err(format!(
                    "layer {} {path}: nlink {}, expected {nlink}",
                    info.name, seen.nlink
                ));
            }
        }
        if info.inode_count != ml.nodes.len() as u64 {
            return Err(format!(
                "layer {}: inode_count {}, model has {} inodes",
                info.name,
                info.inode_count,
                ml.nodes.len()
            ));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ harness

fn fault_config(seed: u64, device: u64) -> FaultConfig {
    FaultConfig {
        seed: seed.wrapping_mul(1_000_003).wrapping_add(device),
        tear_writes: true,
        ..Default::default()
    }
}

fn open(dev: &Arc<FaultyDevice>, write_behind: bool) -> lcfs_engine::Result<Arc<Engine>> {
    let d: Arc<dyn Device> = dev.clone();
    Engine::open(d, config(write_behind))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 3) as u8).wrapping_mul(31) ^ (i >> 8) as u8)
        .collect()
}

struct Harness {
    dev: Arc<FaultyDevice>,
    engine: Arc<Engine>,
    model: Model,
    /// States a crash now may recover to, newest last.
    durable: Vec<Model>,
    seed: u64,
    devices: u64,
    /// On the small device "no space" is a legitimate answer to any change.
    small: bool,
    write_behind: bool,
    /// What ran so far, for failure messages.
    log: Vec<String>,
}

/// One operation's prediction, taken before the engine runs it.
struct Pending {
    what: String,
    before: Model,
    seq_before: u64,
    expect: Expect,
    /// The model after the operation, when `expect` is Ok.
    next: Model,
}

impl Harness {
    fn new(seed: u8) -> Harness {
        let small = seed & 1 == 1;
        let write_behind = seed & 2 == 2;
        let seed = seed as u64;
        let mem = MemDevice::new(if small { SMALL.0 } else { ROOMY.0 });
        for (offset, block) in formatted_blocks(small) {
            mem.write_at(*offset, &AlignedBuf::from_slice(block))
                .expect("write the formatted image");
        }
        let dev = Arc::new(FaultyDevice::from_image(mem, fault_config(seed, 0)));
        let engine = open(&dev, write_behind).expect("open a freshly formatted device");
        Harness {
            dev,
            engine,
            model: Model::default(),
            durable: vec![Model::default()],
            seed,
            devices: 0,
            small,
            write_behind,
            log: Vec::new(),
        }
    }

    fn fail(&self, msg: String) -> ! {
        panic!("{msg}\noperations so far:\n  {}", self.log.join("\n  "));
    }

    /// Predicts an operation: `f` mutates a copy of the model and returns
    /// the expected result.
    fn predict(&self, what: String, f: impl FnOnce(&mut Model) -> Expect) -> Pending {
        let before = self.model.clone();
        let mut next = before.clone();
        let expect = f(&mut next);
        Pending {
            what,
            before,
            seq_before: self.engine.checkpoint_seq(),
            expect,
            next,
        }
    }

    /// Checks the engine's answer against the prediction and moves the model
    /// on. Returns false when the power went during the operation (the
    /// harness has recovered onto a new device since).
    fn settle(&mut self, p: Pending, got: lcfs_engine::Result<()>) -> bool {
        let shown = match &got {
            Ok(()) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        self.log.push(format!("{} -> {shown}", p.what));
        if self.dev.is_crashed() {
            // The operation may have reached any point: the state before it,
            // and after it when it would have succeeded, may be durable.
            self.durable.push(p.before);
            if p.expect.is_ok() {
                self.durable.push(p.next);
            }
            self.recover("power cut inside an operation");
            return false;
        }
        match (&p.expect, &got) {
            (Ok(()), Ok(())) => self.model = p.next,
            (Err(f), Err(e)) if fail_of(e) == *f => {}
            // The model does not track space; the engine admits a change
            // before making it, so a refused one must have changed nothing.
            (_, Err(Error::NoSpace)) if self.small && p.what != "sync" => {}
            _ => self.fail(format!(
                "{}: model expects {:?}, engine returned {got:?}",
                p.what, p.expect
            )),
        }
        if self.engine.checkpoint_seq() != p.seq_before {
            // A checkpoint ran inside the operation: before its change (space
            // admission) or after it (upkeep).
            self.durable = vec![p.before, self.model.clone()];
            if p.what != "sync" {
                self.log.push("   (checkpoint inside the operation)".into());
            }
        }
        true
    }

    /// Cuts the power, reopens what the device kept, and checks it against
    /// the durable candidates.
    fn recover(&mut self, why: &str) {
        self.engine.crash();
        let image = self.dev.crash_image();
        self.devices += 1;
        let dev = Arc::new(FaultyDevice::from_image(
            image,
            fault_config(self.seed, self.devices),
        ));
        let engine = match open(&dev, self.write_behind) {
            Ok(e) => e,
            Err(e) => self.fail(format!("reopen after {why} failed: {e}")),
        };
        self.dev = dev;
        self.engine = engine;
        let report = match self.engine.fsck(true) {
            Ok(r) => r,
            Err(e) => self.fail(format!("fsck after {why} failed: {e}")),
        };
        if !report.is_clean() {
            self.fail(format!(
                "fsck after {why}: {:#?}",
                &report.errors[..report.errors.len().min(10)]
            ));
        }
        let mut why_not = Vec::new();
        let mut found = None;
        for (i, cand) in self.durable.iter().enumerate().rev() {
            match compare(&self.engine, cand) {
                Ok(()) => {
                    found = Some(i);
                    break;
                }
                Err(w) => why_not.push(w),
            }
        }
        let Some(i) = found else {
            self.fail(format!(
                "after {why} the engine matches none of {} durable states:\n{}",
                self.durable.len(),
                why_not.join("\n")
            ));
        };
        let m = self.durable[i].clone();
        self.log.push(format!(
            "== {why}: recovered state {} of {}",
            i + 1,
            self.durable.len()
        ));
        self.model = m.clone();
        self.durable = vec![m];
    }

    /// Full comparison of the live engine with the model.
    fn check(&mut self, why: &str) {
        let seq = self.engine.checkpoint_seq();
        if let Err(w) = compare(&self.engine, &self.model) {
            self.fail(format!("{why}: engine differs from the model: {w}"));
        }
        if self.engine.checkpoint_seq() != seq {
            self.durable = vec![self.model.clone()];
        }
    }

    fn op(&mut self, code: u8, input: &mut Input) {
        match code {
            0 => self.create_layer(input),
            1 => self.clone_layer(input),
            2 => self.commit_layer(input),
            3 => self.remove_layer(input),
            4..=7 => self.make(code, input),
            8..=10 => self.write(input),
            11 => self.truncate(input),
            12 => self.unlink(input, false),
            13 => self.unlink(input, true),
            14 | 15 => self.rename(input),
            16 => self.link(input),
            17 => self.setxattr(input),
            18 => self.removexattr(input),
            19 | 20 => self.sync(),
            21 => {
                self.log.push("crash".into());
                self.recover("crash");
            }
            22 => {
                let n = 1 + input.u8() as u64 % 8;
                self.dev.set_crash_after_ops(Some(self.dev.ops() + n));
                self.log
                    .push(format!("power cut armed {n} device ops ahead"));
                let code = input.u8() % 21;
                self.op(code, input);
                self.dev.set_crash_after_ops(None);
            }
            _ => self.check("check"),
        }
    }

    fn sync(&mut self) {
        let p = self.predict("sync".into(), |_| Ok(()));
        let got = self.engine.sync();
        if self.settle(p, got) {
            self.durable = vec![self.model.clone()];
        }
    }

    // -------------------------------------------------------------- layers

    fn create_layer(&mut self, input: &mut Input) {
        let name = input.pick(&LAYER_NAMES).to_string();
        let cold = input.u8() & 1 == 1;
        let p = self.predict(format!("create_layer {name} cold={cold}"), |m| {
            if m.layers.contains_key(&name) {
                return Err(Fail::Exists);
            }
            let l = new_layer(m, None);
            m.layers.insert(name.clone(), l);
            Ok(())
        });
        let got = self.engine.create_layer(&name, cold).map(drop);
        self.settle(p, got);
    }

    fn clone_layer(&mut self, input: &mut Input) {
        let parent = input.pick(&LAYER_NAMES).to_string();
        let name = input.pick(&LAYER_NAMES).to_string();
        let p = self.predict(format!("clone_layer {parent} -> {name}"), |m| {
            if m.layers.contains_key(&name) {
                return Err(Fail::Exists);
            }
            let Some(pl) = m.layers.get_mut(&parent) else {
                return Err(Fail::NotFound);
            };
            pl.frozen = true;
            pl.children += 1;
            let mut child = pl.clone();
            child.parent = Some(parent.clone());
            child.frozen = false;
            child.children = 0;
            m.layers.insert(name.clone(), child);
            Ok(())
        });
        let got = self.engine.clone_layer(&parent, &name).map(drop);
        self.settle(p, got);
    }

    fn commit_layer(&mut self, input: &mut Input) {
        let name = input.pick(&LAYER_NAMES).to_string();
        let p = self.predict(format!("commit_layer {name}"), |m| {
            let l = m.layers.get_mut(&name).ok_or(Fail::NotFound)?;
            l.frozen = true;
            Ok(())
        });
        let got = self.engine.commit_layer(&name);
        self.settle(p, got);
    }

    fn remove_layer(&mut self, input: &mut Input) {
        let name = input.pick(&LAYER_NAMES).to_string();
        let p = self.predict(format!("remove_layer {name}"), |m| {
            let l = m.layers.get(&name).ok_or(Fail::NotFound)?;
            if l.children > 0 {
                return Err(Fail::Busy);
            }
            let l = m.layers.remove(&name).expect("present");
            if let Some(parent) = l.parent {
                m.layers
                    .get_mut(&parent)
                    .expect("parent of a layer")
                    .children -= 1;
            }
            Ok(())
        });
        let got = self.engine.remove_layer(&name);
        self.settle(p, got);
    }

    // -------------------------------------------------------------- files

    /// A model layer for a file operation, with the engine's id for it.
    fn fs_layer(&mut self, input: &mut Input) -> Option<(String, u64)> {
        let names: Vec<String> = self.model.layers.keys().cloned().collect();
        if names.is_empty() {
            return None;
        }
        let name = input.pick(&names);
        match self.engine.layer_id(&name) {
            Ok(id) => Some((name, id)),
            Err(e) => self.fail(format!("model layer {name} unknown to the engine: {e}")),
        }
    }

    fn any_path(&self, layer: &str, input: &mut Input) -> String {
        let paths: Vec<String> = self.model.layers[layer].paths.keys().cloned().collect();
        input.pick(&paths)
    }

    fn make(&mut self, code: u8, input: &mut Input) {
        let Some((lname, lid)) = self.fs_layer(input) else {
            return self.create_layer(input);
        };
        let dir = self.any_path(&lname, input);
        let name = file_name(input.u8());
        let kind = match code {
            4 | 5 => Kind::File,
            6 => Kind::Dir,
            _ => Kind::Symlink,
        };
        let target = if kind == Kind::Symlink {
            let sel = input.u8();
            let len = match sel % 4 {
                0 => 0,
                1 => 1 + sel as usize / 4,
                2 => 1025 + input.u16() as usize % 2000,
                _ => 4096,
            };
            (0..len)
                .map(|i| b'a' + ((i + sel as usize) % 26) as u8)
                .collect()
        } else {
            Vec::new()
        };
        let path = join(&dir, &name);
        let what = format!("{kind:?} {lname}:{path} target {} bytes", target.len());
        let p = self.predict(what, |m| {
            let id = m.next_id;
            m.next_id += 1;
            let l = m.layers.get_mut(&lname).expect("picked");
            if l.frozen {
                return Err(Fail::ReadOnly);
            }
            if let Some(f) = name_error(&name) {
                return Err(f);
            }
            if l.kind(&dir) != Some(Kind::Dir) {
                return Err(Fail::NotDirectory);
            }
            if l.paths.contains_key(&path) {
                return Err(Fail::Exists);
            }
            if kind == Kind::Symlink && target.is_empty() {
                return Err(Fail::NotFound);
            }
            if kind == Kind::Symlink && target.len() >= 4096 {
                return Err(Fail::NameTooLong);
            }
            l.paths.insert(path.clone(), id);
            l.nodes.insert(id, Node::new(kind, target.clone()));
            Ok(())
        });
        let e = &self.engine;
        let got = (|| {
            let d = resolve(e, lid, &dir)?;
            let n = name.as_bytes();
            match kind {
                Kind::File => e.create(lid, d, n, 0o644, 0, 0),
                Kind::Dir => e.mkdir(lid, d, n, 0o755, 0, 0),
                Kind::Symlink => e.symlink(lid, d, n, &target, 0, 0),
            }
            .map(drop)
        })();
        self.settle(p, got);
    }

    fn write(&mut self, input: &mut Input) {
        let Some((lname, lid)) = self.fs_layer(input) else {
            return self.create_layer(input);
        };
        let path = self.any_path(&lname, input);
        let offset = input.u16() as u64 * 3 % MAX_OFFSET;
        let len = input.u16() as usize % (MAX_WRITE_BYTES + 1);
        let data = pattern(len, input.u8());
        let p = self.predict(format!("write {lname}:{path} at {offset} len {len}"), |m| {
            let l = m.layers.get_mut(&lname).expect("picked");
            if l.frozen {
                return Err(Fail::ReadOnly);
            }
            match l.kind(&path).expect("picked") {
                Kind::Dir => return Err(Fail::IsDirectory),
                Kind::Symlink => return Err(Fail::Invalid),
                Kind::File => {}
            }
            if len > 0 {
                let n = l.node_mut(&path);
                let end = offset as usize + len;
                if n.data.len() < end {
                    n.data.resize(end, 0);
                }
                n.data[offset as usize..end].copy_from_slice(&data);
            }
            Ok(())
        });
        let e = &self.engine;
        let got = (|| {
            let ino = resolve(e, lid, &path)?;
            let n = e.write(lid, ino, offset, &data)?;
            if n != len {
                return Err(Error::Invalid(format!("short write: {n} of {len} bytes")));
            }
            Ok(())
        })();
        self.settle(p, got);
    }

    fn truncate(&mut self, input: &mut Input) {
        let Some((lname, lid)) = self.fs_layer(input) else {
            return self.create_layer(input);
        };
        let path = self.any_path(&lname, input);
        let size = input.u16() as u64 * 4;
        let p = self.predict(format!("truncate {lname}:{path} to {size}"), |m| {
            let l = m.layers.get_mut(&lname).expect("picked");
            if l.frozen {
                return Err(Fail::ReadOnly);
            }
            match l.kind(&path).expect("picked") {
                Kind::Dir => return Err(Fail::IsDirectory),
                Kind::Symlink => return Err(Fail::Invalid),
                Kind::File => {}
            }
            l.node_mut(&path).data.resize(size as usize, 0);
            Ok(())
        });
        let e = &self.engine;
        let got = (|| {
            let ino = resolve(e, lid, &path)?;
            let set = SetAttr {
                size: Some(size),
                ..Default::default()
            };
            e.setattr(lid, ino, &set).map(drop)
        })();
        self.settle(p, got);
    }

    fn unlink(&mut self, input: &mut Input, want_dir: bool) {
        let Some((lname, lid)) = self.fs_layer(input) else {
            return self.create_layer(input);
        };
        let dir = self.any_path(&lname, input);
        let name = file_name(input.u8());
        let path = join(&dir, &name);
        let what = format!(
            "{} {lname}:{path}",
            if want_dir { "rmdir" } else { "unlink" }
        );
        let p = self.predict(what, |m| {
            let l = m.layers.get_mut(&lname).expect("picked");
            if l.frozen {
                return Err(Fail::ReadOnly);
            }
            if name.len() > NAME_MAX {
                return Err(Fail::NameTooLong);
            }
            if l.kind(&dir) != Some(Kind::Dir) {
                return Err(Fail::NotDirectory);
            }
            let kind = l.kind(&path).ok_or(Fail::NotFound)?;
            if want_dir {
                if kind != Kind::Dir {
                    return Err(Fail::NotDirectory);
                }
                if l.has_children(&path) {
                    return Err(Fail::NotEmpty);
                }
            } else if kind == Kind::Dir {
                return Err(Fail::IsDirectory);
            }
            l.remove_name(&path);
            Ok(())
        });
        let e = &self.engine;
        let got = (|| {
            let d = resolve(e, lid, &dir)?;
            if want_dir {
                e.rmdir(lid, d, name.as_bytes())
            } else {
                e.unlink(lid, d, name.as_bytes())
            }
        })();
        self.settle(p, got);
    }

    fn rename(&mut self, input: &mut Input) {
        let Some((lname, lid)) = self.fs_layer(input) else {
            return self.create_layer(input);
        };
        let from_dir = self.any_path(&lname, input);
        let from = file_name(input.u8());
        let to_dir = self.any_path(&lname, input);
        let to = file_name(input.u8());
        let flags = [0, RENAME_NOREPLACE, RENAME_EXCHANGE, 3][input.u8() as usize % 4];
        let src = join(&from_dir, &from);
        let dst = join(&to_dir, &to);
        let p = self.predict(
            format!("rename {lname}:{src} -> {dst} flags {flags}"),
            |m| {
                let l = m.layers.get_mut(&lname).expect("picked");
                if l.frozen {
                    return Err(Fail::ReadOnly);
                }
                if flags == 3 {
                    return Err(Fail::Invalid);
                }
                if from.len() > NAME_MAX || to.len() > NAME_MAX {
                    return Err(Fail::NameTooLong);
                }
                if let Some(f) = name_error(&to) {
                    return Err(f);
                }
                if l.kind(&from_dir) != Some(Kind::Dir) || l.kind(&to_dir) != Some(Kind::Dir) {
                    return Err(Fail::NotDirectory);
                }
                let src_kind = l.kind(&src).ok_or(Fail::NotFound)?;
                let src_dir = src_kind == Kind::Dir;
                let dst_kind = l.kind(&dst);
                let moves_dir_below_itself =
                    src_dir && from_dir != to_dir && is_below(&to_dir, &src);
                if flags == RENAME_EXCHANGE {
                    let dst_dir = dst_kind.ok_or(Fail::NotFound)? == Kind::Dir;
                    if moves_dir_below_itself
                        || (dst_dir && from_dir != to_dir && is_below(&from_dir, &dst))
                    {
                        return Err(Fail::Invalid);
                    }
                    if src != dst {
                        let a = l.take_subtree(&src);
                        let b = l.take_subtree(&dst);
                        l.put_subtree(&dst, a);
                        l.put_subtree(&src, b);
                    }
                    return Ok(());
                }
                if let Some(dk) = dst_kind {
                    if flags == RENAME_NOREPLACE {
                        return Err(Fail::Exists);
                    }
                    if l.paths[&dst] == l.paths[&src] {
                        return Ok(()); // two names of one node: nothing happens
                    }
                    let dst_dir = dk == Kind::Dir;
                    if src_dir && !dst_dir {
                        return Err(Fail::NotDirectory);
                    }
                    if !src_dir && dst_dir {
                        return Err(Fail::IsDirectory);
                    }
                    if dst_dir && l.has_children(&dst) {
                        return Err(Fail::NotEmpty);
                    }
                }
                if moves_dir_below_itself {
                    return Err(Fail::Invalid);
                }
                if dst_kind.is_some() {
                    l.remove_name(&dst);
                }
                let a = l.take_subtree(&src);
                l.put_subtree(&dst, a);
                Ok(())
            },
        );
        let e = &self.engine;
        let got = (|| {
            let fd = resolve(e, lid, &from_dir)?;
            let td = resolve(e, lid, &to_dir)?;
            e.rename(lid, fd, from.as_bytes(), td, to.as_bytes(), flags)
        })();
        self.settle(p, got);
    }

    fn link(&mut self, input: &mut Input) {
        let Some((lname, lid)) = self.fs_layer(input) else {
            return self.create_layer(input);
        };
        let src = self.any_path(&lname, input);
        let dir = self.any_path(&lname, input);
        let name = file_name(input.u8());
        let path = join(&dir, &name);
        let p = self.predict(format!("link {lname}:{src} as {path}"), |m| {
            let l = m.layers.get_mut(&lname).expect("picked");
            if l.frozen {
                return Err(Fail::ReadOnly);
            }
            if let Some(f) = name_error(&name) {
                return Err(f);
            }
            if l.kind(&src) == Some(Kind::Dir) {
                return Err(Fail::NotPermitted);
            }
            if l.kind(&dir) != Some(Kind::Dir) {
                return Err(Fail::NotDirectory);
            }
            if l.paths.contains_key(&path) {
                return Err(Fail::Exists);
            }
            let id = l.paths[&src];
            l.paths.insert(path.clone(), id);
            Ok(())
        });
        let e = &self.engine;
        let got = (|| {
            let ino = resolve(e, lid, &src)?;
            let d = resolve(e, lid, &dir)?;
            e.link(lid, ino, d, name.as_bytes()).map(drop)
        })();
        self.settle(p, got);
    }

    fn setxattr(&mut self, input: &mut Input) {
        let Some((lname, lid)) = self.fs_layer(input) else {
            return self.create_layer(input);
        };
        let path = self.any_path(&lname, input);
        let name = input.pick(&XATTR_NAMES).as_bytes().to_vec();
        let flags = [0, XATTR_CREATE, XATTR_REPLACE, 3][input.u8() as usize % 4];
        let sel = input.u8();
        let len = if sel < 200 {
            sel as usize
        } else {
            3900 + input.u16() as usize % 200
        };
        let value = pattern(len, sel);
        let what = format!(
            "setxattr {lname}:{path} {} len {len} flags {flags}",
            String::from_utf8_lossy(&name)
        );
        let p = self.predict(what, |m| {
            let l = m.layers.get_mut(&lname).expect("picked");
            if l.frozen {
                return Err(Fail::ReadOnly);
            }
            let n = l.node_mut(&path);
            let exists = n.xattrs.contains_key(&name);
            if exists && flags == XATTR_CREATE {
                return Err(Fail::Exists);
            }
            if !exists && flags == XATTR_REPLACE {
                return Err(Fail::NoAttribute);
            }
            // One name per hash key: count, name length, name, value length, value.
            if 2 + 2 + name.len() + 2 + len > MAX_VALUE_BYTES {
                return Err(Fail::NoSpace);
            }
            n.xattrs.insert(name.clone(), value.clone());
            Ok(())
        });
        let e = &self.engine;
        let got = (|| {
            let ino = resolve(e, lid, &path)?;
            e.setxattr(lid, ino, &name, &value, flags)
        })();
        self.settle(p, got);
    }

    fn removexattr(&mut self, input: &mut Input) {
        let Some((lname, lid)) = self.fs_layer(input) else {
            return self.create_layer(input);
        };
        let path = self.any_path(&lname, input);
        let name = input.pick(&XATTR_NAMES).as_bytes().to_vec();
        let what = format!(
            "removexattr {lname}:{path} {}",
            String::from_utf8_lossy(&name)
        );
        let p = self.predict(what, |m| {
            let l = m.layers.get_mut(&lname).expect("picked");
            if l.frozen {
                return Err(Fail::ReadOnly);
            }
            l.node_mut(&path)
                .xattrs
                .remove(&name)
                .map(drop)
                .ok_or(Fail::NoAttribute)
        });
        let e = &self.engine;
        let got = (|| {
            let ino = resolve(e, lid, &path)?;
            e.removexattr(lid, ino, &name)
        })();
        self.settle(p, got);
    }

    /// End of input: the live state, then a sync, fsck, and a crash.
    fn finish(&mut self) {
        self.check("end of input");
        self.sync();
        match self.engine.fsck(true) {
            Ok(r) if r.is_clean() => {}
            Ok(r) => self.fail(format!(
                "fsck after the final sync: {:#?}",
                &r.errors[..r.errors.len().min(10)]
            )),
            Err(e) => self.fail(format!("fsck after the final sync failed: {e}")),
        }
        self.recover("final crash");
        if std::env::var_os("LCFS_FUZZ_TRACE").is_some() {
            eprintln!("{}", self.log.join("\n"));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input { data, at: 0 };
    let mut h = Harness::new(input.u8());
    let mut ops = 0;
    while !input.done() && ops < MAX_OPS {
        ops += 1;
        let code = input.u8() % 24;
        h.op(code, &mut input);
    }
    h.finish();
});
