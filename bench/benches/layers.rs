//! Layer operations on an in-memory device, so they measure the engine and not
//! the disk: clone and commit latency by layer size and chain depth, and lookup
//! latency by chain depth. The goals: the largest clone/commit case
//! within 1.5x of the smallest, and a lookup at depth 1,000 within 1.3x of
//! depth 1. Results and the exact command are in docs/benchmarks.md.
//!
//! Vocabulary: a layer at "chain depth d" has d - 1 ancestors. Depth 1 is a
//! base layer; depth 1,000 is the tip of base + 999 clones, each of which made
//! a small change (one 4 KiB write into the same file, so the tree keeps its
//! size and only ownership is spread over the chain).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lcfs_engine::device::{Device, MemDevice};
use lcfs_engine::{Config, Engine, FormatOptions, ROOT_INODE};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sizes of the layer being cloned, in files.
const LAYER_SIZES_FILES: [usize; 2] = [1, 100_000];
/// Chain depths measured (see the module docs).
const CHAIN_DEPTHS: [usize; 2] = [1, 1_000];
/// Files per directory when building a large layer (and in the lookup directory).
const FILES_PER_DIRECTORY: usize = 1_000;

/// Timers off: nothing runs in the background while we measure.
fn quiet_config() -> Config {
    Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..Config::default()
    }
}

fn fresh_engine(device_bytes: u64) -> Arc<Engine> {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(device_bytes));
    Engine::format(dev.clone(), &FormatOptions::default()).expect("format");
    Engine::open(dev, quiet_config()).expect("open")
}

/// Creates `files` empty files in `layer`, in directories of
/// [`FILES_PER_DIRECTORY`] (a single file goes in the root), plus a `state`
/// file that the chain's clones write into. Returns the state file's inode.
fn populate(engine: &Engine, layer: u64, files: usize) -> u64 {
    if files <= 1 {
        for i in 0..files {
            engine
                .create(layer, ROOT_INODE, format!("f{i}").as_bytes(), 0o644, 0, 0)
                .expect("create");
        }
    } else {
        let directories = files.div_ceil(FILES_PER_DIRECTORY);
        let mut made = 0;
        for d in 0..directories {
            let dir = engine
                .mkdir(layer, ROOT_INODE, format!("d{d}").as_bytes(), 0o755, 0, 0)
                .expect("mkdir");
            while made < files && made < (d + 1) * FILES_PER_DIRECTORY {
                engine
                    .create(layer, dir.inode, format!("f{made}").as_bytes(), 0o644, 0, 0)
                    .expect("create");
                made += 1;
            }
        }
    }
    let state = engine
        .create(layer, ROOT_INODE, b"state", 0o644, 0, 0)
        .expect("create state");
    engine
        .write(layer, state.inode, 0, &[0u8; 4096])
        .expect("write state");
    state.inode
}

/// Builds a chain of `depth` layers on the base layer `base` (depth 1: the base
/// itself) and returns the tip's name. Each clone makes a 4 KiB write.
fn build_chain(engine: &Engine, base: &str, depth: usize, state_inode: u64) -> String {
    let mut tip = base.to_string();
    let block = [0xA5u8; 4096];
    for i in 1..depth {
        let name = format!("{base}-c{i}");
        let id = engine.clone_layer(&tip, &name).expect("clone");
        engine
            .write(id, state_inode, (i as u64 % 16) * 4096, &block)
            .expect("write");
        tip = name;
    }
    tip
}

struct Tip {
    files: usize,
    depth: usize,
    name: String,
}

/// One engine holding the four (size, depth) tips, so every case runs under the
/// same engine state. Everything is made durable before measuring, so no
/// pending checkpoint lands in a timed section.
fn clone_fixture() -> (Arc<Engine>, Vec<Tip>) {
    let started = Instant::now();
    let engine = fresh_engine(4 << 30);
    let mut tips = Vec::new();
    for files in LAYER_SIZES_FILES {
        for depth in CHAIN_DEPTHS {
            let base = format!("base-{files}-{depth}");
            let id = engine.create_layer(&base, false).expect("create layer");
            let state = populate(&engine, id, files);
            let name = build_chain(&engine, &base, depth, state);
            assert_depth(&engine, &name, depth);
            // Files plus the root, the state file and the directories.
            assert!(engine.layer_info(&name).expect("tip").inode_count as usize > files);
            engine.sync().expect("sync");
            tips.push(Tip { files, depth, name });
        }
    }
    eprintln!("clone/commit fixture built in {:.1?}", started.elapsed());
    (engine, tips)
}

/// Unique names for the layers made while measuring.
struct Names(u64);

impl Names {
    fn next(&mut self) -> String {
        self.0 += 1;
        format!("m{}", self.0)
    }
}

/// Every removed layer is remembered until the next checkpoint; millions of
/// iterations would otherwise pile them up. A daemon checkpoints every few
/// seconds, so this keeps the engine in a realistic state. Not timed.
fn checkpoint_now_and_then(engine: &Engine, iteration: u64) {
    if iteration % 4096 == 4095 {
        engine.sync().expect("sync");
    }
}

/// Checks a fixture is what it claims: `depth` layers from tip to base.
fn assert_depth(engine: &Engine, tip: &str, depth: usize) {
    let mut seen = 1;
    let mut info = engine.layer_info(tip).expect("tip");
    while let Some(parent) = info.parent {
        seen += 1;
        info = engine.layer_info(&parent).expect("parent");
    }
    assert_eq!(seen, depth, "chain depth of {tip}");
}

fn clone_and_commit(c: &mut Criterion) {
    let (engine, tips) = clone_fixture();
    let mut names = Names(0);

    let mut group = c.benchmark_group("clone_layer");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for tip in &tips {
        let id = BenchmarkId::new(
            format!("files_{}", tip.files),
            format!("depth_{}", tip.depth),
        );
        group.bench_function(id, |b| {
            b.iter_custom(|iterations| {
                let mut timed = Duration::ZERO;
                for i in 0..iterations {
                    let name = names.next();
                    let start = Instant::now();
                    black_box(engine.clone_layer(&tip.name, &name).expect("clone"));
                    timed += start.elapsed();
                    engine.remove_layer(&name).expect("remove");
                    checkpoint_now_and_then(&engine, i);
                }
                timed
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("commit_layer");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for tip in &tips {
        let id = BenchmarkId::new(
            format!("files_{}", tip.files),
            format!("depth_{}", tip.depth),
        );
        group.bench_function(id, |b| {
            b.iter_custom(|iterations| {
                let mut timed = Duration::ZERO;
                for i in 0..iterations {
                    let name = names.next();
                    engine.clone_layer(&tip.name, &name).expect("clone");
                    let start = Instant::now();
                    engine.commit_layer(&name).expect("commit");
                    timed += start.elapsed();
                    engine.remove_layer(&name).expect("remove");
                    checkpoint_now_and_then(&engine, i);
                }
                timed
            })
        });
    }
    group.finish();
}

fn lookup(c: &mut Criterion) {
    let started = Instant::now();
    let engine = fresh_engine(1 << 30);
    let mut group = c.benchmark_group("lookup");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let mut cases = Vec::new();
    for depth in CHAIN_DEPTHS {
        let base = format!("lookup-{depth}");
        let id = engine.create_layer(&base, false).expect("create layer");
        let dir = engine
            .mkdir(id, ROOT_INODE, b"dir", 0o755, 0, 0)
            .expect("mkdir");
        let names: Vec<Vec<u8>> = (0..FILES_PER_DIRECTORY)
            .map(|i| format!("file-{i:04}").into_bytes())
            .collect();
        for name in &names {
            engine
                .create(id, dir.inode, name, 0o644, 0, 0)
                .expect("create");
        }
        let state = engine
            .create(id, ROOT_INODE, b"state", 0o644, 0, 0)
            .expect("create state");
        let tip = build_chain(&engine, &base, depth, state.inode);
        assert_depth(&engine, &tip, depth);
        let tip_id = engine.layer_id(&tip).expect("tip");
        cases.push((depth, tip_id, dir.inode, names));
    }
    engine.sync().expect("sync");
    eprintln!("lookup fixture built in {:.1?}", started.elapsed());
    for (depth, layer, dir, names) in &cases {
        // Warm: every name once before measuring.
        for name in names {
            engine.lookup(*layer, *dir, name).expect("warm lookup");
        }
        let mut next = 0usize;
        group.bench_function(
            BenchmarkId::new("dir_1000_files", format!("depth_{depth}")),
            |b| {
                b.iter(|| {
                    // A fixed stride visits every name in a scattered order.
                    next = (next + 617) % names.len();
                    black_box(engine.lookup(*layer, *dir, &names[next]).expect("lookup"))
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, clone_and_commit, lookup);
criterion_main!(benches);
