//! `engine-concurrency`: how the engine scales with threads working on
//! separate layers, and how long a read waits while a checkpoint or the
//! cleaner runs. On a sparse file with O_DIRECT and io_uring.
//!
//! Scaling: for each thread count T, T threads, each on its own writable
//! layer and file, for D seconds repeat: write 64 KiB at a random aligned
//! offset of a 64 MiB file, read 64 KiB at another, and every 64 writes
//! `sync` (each sync is a checkpoint, so checkpoints run throughout).
//! Reports MiB/s written and read and operations per second, summed over the
//! threads.
//!
//! Metadata: for each thread count T, T threads, each in its own clone of a
//! frozen image layer of 1000 files, look a random file up and get its
//! attributes, while one more thread writes and syncs on a layer of its own.
//! Reports lookups + getattrs per second and the writer's MiB/s.
//!
//! Read latency: one thread reads 4 KiB of a cached file in a loop and
//! records each read's latency (p50, p99, p99.9, max), (a) alone, (b) while another thread writes
//! and syncs in a loop, (c) while another thread runs the cleaner over a
//! device full of dead blocks, (d) while another thread runs online fscks
//! that verify every data block.
//!
//! Method, results and the before/after comparison: docs/benchmarks.md and
//! bench/concurrency.sh.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use hdrhistogram::Histogram;
use lcfs_engine::device::{open_device, Backend, Device, OpenOptions};
use lcfs_engine::{Config, Engine, FormatOptions, ROOT_INODE};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: engine-concurrency [--file PATH] [--seconds N] [--threads 1,2,4,8] [--seed N]

Runs the engine with 1, 2, 4 and 8 threads on separate layers (64 KiB writes
and reads, a sync every 64 writes), then 1, 2, 4 and 8 threads of lookups and
getattrs beside a writer, then measures 4 KiB read latency alone, during
checkpoints, during cleaning and during online fscks. Prints one JSON object
per result.

  --file PATH     device file (created sparse, removed at the end)
                                       [default /var/tmp/lcfs-concurrency.img]
  --seconds N     seconds per measurement   [default 5]
  --threads LIST  thread counts             [default 1,2,4,8]
  --seed N        seed of the random offsets [default 1]";

const FILE_BYTES: u64 = 64 << 20;
const IO_BYTES: usize = 64 << 10;
const DEVICE_BYTES: u64 = 4 << 30;

struct Args {
    file: PathBuf,
    seconds: u64,
    threads: Vec<usize>,
    seed: u64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        file: PathBuf::from("/var/tmp/lcfs-concurrency.img"),
        seconds: 5,
        threads: vec![1, 2, 4, 8],
        seed: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--file" => a.file = PathBuf::from(value()?),
            "--seconds" => a.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--seed" => a.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--threads" => {
                a.threads = value()?
                    .split(',')
                    .map(|t| t.parse().map_err(|e| format!("--threads: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    Ok(a)
}

/// A freshly formatted engine on the device file (removed on drop).
struct Fresh {
    engine: Arc<Engine>,
    path: PathBuf,
}

impl Drop for Fresh {
    fn drop(&mut self) {
        let _ = self.engine.close();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn fresh(path: &PathBuf) -> Result<Fresh, String> {
    let _ = std::fs::remove_file(path);
    let opts = OpenOptions {
        backend: Backend::IoUring,
        create_size_bytes: Some(DEVICE_BYTES),
    };
    let dev: Arc<dyn Device> = Arc::from(open_device(path, &opts).map_err(|e| e.to_string())?);
    Engine::format(dev.clone(), &FormatOptions::default()).map_err(|e| e.to_string())?;
    let engine = Engine::open(dev, Config::default()).map_err(|e| e.to_string())?;
    Ok(Fresh {
        engine,
        path: path.clone(),
    })
}

/// A layer holding one FILE_BYTES file of pattern data; returns (layer, inode).
fn layer_with_file(e: &Engine, name: &str) -> Result<(u64, u64), String> {
    let l = e.create_layer(name, false).map_err(|e| e.to_string())?;
    let f = e
        .create(l, ROOT_INODE, b"data", 0o644, 0, 0)
        .map_err(|e| e.to_string())?;
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..FILE_BYTES / (1 << 20) {
        e.write(l, f.inode, i << 20, &chunk)
            .map_err(|e| e.to_string())?;
    }
    Ok((l, f.inode))
}

fn scaling(a: &Args, threads: usize) -> Result<(), String> {
    let fx = fresh(&a.file)?;
    let e = &fx.engine;
    let mut files = Vec::new();
    for t in 0..threads {
        files.push(layer_with_file(e, &format!("layer{t}"))?);
    }
    e.sync().map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let read = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = files
        .into_iter()
        .enumerate()
        .map(|(t, (layer, ino))| {
            let (e, stop) = (e.clone(), stop.clone());
            let (written, read, ops) = (written.clone(), read.clone(), ops.clone());
            let seed = a.seed.wrapping_add(t as u64);
            std::thread::spawn(move || -> Result<(), String> {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let data = vec![t as u8; IO_BYTES];
                let slots = FILE_BYTES / IO_BYTES as u64;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let at = rng.gen_range(0..slots) * IO_BYTES as u64;
                    e.write(layer, ino, at, &data).map_err(|e| e.to_string())?;
                    let at = rng.gen_range(0..slots) * IO_BYTES as u64;
                    let got = e
                        .read(layer, ino, at, IO_BYTES)
                        .map_err(|e| e.to_string())?;
                    written.fetch_add(IO_BYTES as u64, Ordering::Relaxed);
                    read.fetch_add(got.len() as u64, Ordering::Relaxed);
                    n += 1;
                    if n % 64 == 0 {
                        e.sync().map_err(|e| e.to_string())?;
                    }
                    ops.fetch_add(2, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(a.seconds));
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        h.join().map_err(|_| "a worker panicked".to_string())??;
    }
    let secs = start.elapsed().as_secs_f64();
    let mib = |b: &AtomicU64| b.load(Ordering::Relaxed) as f64 / (1 << 20) as f64 / secs;
    println!(
        "{{\"test\":\"scaling\",\"threads\":{threads},\"write_mib_s\":{:.1},\"read_mib_s\":{:.1},\"ops_s\":{:.0}}}",
        mib(&written),
        mib(&read),
        ops.load(Ordering::Relaxed) as f64 / secs
    );
    Ok(())
}

fn metadata(a: &Args, threads: usize) -> Result<(), String> {
    const FILES: u64 = 1000;
    let fx = fresh(&a.file)?;
    let e = &fx.engine;
    let image = e.create_layer("image", false).map_err(|e| e.to_string())?;
    for i in 0..FILES {
        let f = e
            .create(image, ROOT_INODE, format!("f{i}").as_bytes(), 0o644, 0, 0)
            .map_err(|e| e.to_string())?;
        e.write(image, f.inode, 0, &[1u8; 100])
            .map_err(|e| e.to_string())?;
    }
    e.commit_layer("image").map_err(|e| e.to_string())?;
    let mut clones = Vec::new();
    for t in 0..threads {
        let name = format!("container{t}");
        clones.push(e.clone_layer("image", &name).map_err(|e| e.to_string())?);
    }
    let (wl, wi) = layer_with_file(e, "writer")?;
    e.sync().map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let writer = {
        let (e, stop, written) = (e.clone(), stop.clone(), written.clone());
        let seed = a.seed;
        std::thread::spawn(move || -> Result<(), String> {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let data = vec![2u8; IO_BYTES];
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let at = rng.gen_range(0..FILE_BYTES / IO_BYTES as u64) * IO_BYTES as u64;
                e.write(wl, wi, at, &data).map_err(|e| e.to_string())?;
                written.fetch_add(IO_BYTES as u64, Ordering::Relaxed);
                n += 1;
                if n % 64 == 0 {
                    e.sync().map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        })
    };
    let readers: Vec<_> = clones
        .into_iter()
        .enumerate()
        .map(|(t, layer)| {
            let (e, stop, ops) = (e.clone(), stop.clone(), ops.clone());
            let seed = a.seed.wrapping_add(100 + t as u64);
            std::thread::spawn(move || -> Result<(), String> {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("f{}", rng.gen_range(0..FILES));
                    let found = e
                        .lookup(layer, ROOT_INODE, name.as_bytes())
                        .map_err(|e| e.to_string())?;
                    e.getattr(layer, found.inode).map_err(|e| e.to_string())?;
                    ops.fetch_add(2, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(a.seconds));
    stop.store(true, Ordering::SeqCst);
    for h in readers {
        h.join().map_err(|_| "a reader panicked".to_string())??;
    }
    writer
        .join()
        .map_err(|_| "the writer panicked".to_string())??;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"test\":\"metadata\",\"threads\":{threads},\"ops_s\":{:.0},\"writer_mib_s\":{:.1}}}",
        ops.load(Ordering::Relaxed) as f64 / secs,
        written.load(Ordering::Relaxed) as f64 / (1 << 20) as f64 / secs
    );
    Ok(())
}

fn latency(a: &Args, during: &str) -> Result<(), String> {
    let fx = fresh(&a.file)?;
    let e = &fx.engine;
    let (rl, ri) = layer_with_file(e, "reader")?;
    let (wl, wi) = layer_with_file(e, "writer")?;
    if during == "cleaning" {
        // Dead blocks everywhere: overwrite the writer's file a few times.
        let chunk = vec![0xa5u8; 1 << 20];
        for round in 0..6u64 {
            for i in 0..FILE_BYTES / (1 << 20) {
                e.write(wl, wi, i << 20, &chunk[..(1 << 20) - round as usize])
                    .map_err(|e| e.to_string())?;
            }
            e.sync().map_err(|e| e.to_string())?;
        }
    }
    e.sync().map_err(|e| e.to_string())?;
    // Warm the reader's blocks.
    e.read(rl, ri, 0, 4 << 20).map_err(|e| e.to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let (e, stop, during) = (e.clone(), stop.clone(), during.to_string());
        let seed = a.seed;
        std::thread::spawn(move || -> Result<u64, String> {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let data = vec![1u8; IO_BYTES];
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match during.as_str() {
                    "checkpoints" => {
                        for _ in 0..16 {
                            let at = rng.gen_range(0..FILE_BYTES / IO_BYTES as u64);
                            e.write(wl, wi, at * IO_BYTES as u64, &data)
                                .map_err(|e| e.to_string())?;
                        }
                        e.sync().map_err(|e| e.to_string())?;
                    }
                    "cleaning" => {
                        if e.clean(true, 1).map_err(|e| e.to_string())? == 0 {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    "fsck" => {
                        let report = e.fsck(true).map_err(|e| e.to_string())?;
                        if !report.is_clean() {
                            return Err(format!("fsck: {:?}", report.errors));
                        }
                    }
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
                rounds += 1;
            }
            Ok(rounds)
        })
    };
    let mut h = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed ^ 0xabc);
    let until = Instant::now() + Duration::from_secs(a.seconds);
    while Instant::now() < until {
        let at = rng.gen_range(0..(4u64 << 20) / 4096) * 4096;
        let t0 = Instant::now();
        e.read(rl, ri, at, 4096).map_err(|e| e.to_string())?;
        h.record(t0.elapsed().as_nanos() as u64)
            .map_err(|e| e.to_string())?;
    }
    stop.store(true, Ordering::SeqCst);
    let rounds = background
        .join()
        .map_err(|_| "the background thread panicked".to_string())??;
    println!(
        "{{\"test\":\"read_latency\",\"during\":\"{during}\",\"reads\":{},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1},\"background_rounds\":{rounds}}}",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.value_at_quantile(0.999) as f64 / 1e3,
        h.max() as f64 / 1e3
    );
    Ok(())
}

fn run() -> Result<(), String> {
    let a = parse()?;
    eprintln!("engine-concurrency: seed {}", a.seed);
    for &t in &a.threads {
        scaling(&a, t)?;
    }
    for &t in &a.threads {
        metadata(&a, t)?;
    }
    for during in ["idle", "checkpoints", "cleaning", "fsck"] {
        latency(&a, during)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("engine-concurrency: {e}");
            ExitCode::FAILURE
        }
    }
}
