//! `engine-vs-fio`: the engine's write throughput beside fio's on the same loop
//! device, in one run, interleaved, so the ratios survive a noisy machine.
//!
//! As root: creates a sparse backing file, attaches it with
//! `losetup --find --show --direct-io=on`, then for each round runs
//! (a) fio, 1 MiB sequential writes, io_uring, O_DIRECT, queue depth 16,
//!     ending with an fsync (end_fsync=1);
//! (b) the engine, one file written in 1 MiB calls, then `sync`;
//! (c) the engine, 4 KiB writes at random 4 KiB-aligned offsets (each block of
//!     the file once, in a seeded random order), then `sync`;
//! (d) fio, 4 KiB random reads, psync (queue depth 1), O_DIRECT, 32 MiB in all;
//! (e) the engine, reopened (cold cache) on (c)'s device, 4 KiB reads of the
//!     same number of distinct random blocks of that file, one at a time.
//! Each engine run formats the device afresh and uses the io_uring backend.
//! The loop device is detached and the file deleted on every exit path that
//! runs destructors (success, error, panic, SIGINT/SIGTERM).
//! Results and the exact command are in docs/benchmarks.md.

// mimalloc: the engine allocates small values per block; glibc malloc
// showed up as the largest single cost in write profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use lcfs_engine::device::{create_sparse_file, open_device, Backend, Device, OpenOptions};
use lcfs_engine::{Config, Engine, FormatOptions, Stats, ROOT_INODE};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

const MIB: u64 = 1 << 20;
const SEQUENTIAL_CALL_BYTES: usize = 1 << 20;
const RANDOM_CALL_BYTES: usize = 4096;
/// Bytes the random-read runs (d) and (e) read, in 4 KiB reads.
const RANDOM_READ_BYTES: u64 = 32 << 20;

const USAGE: &str = "\
usage: engine-vs-fio [options]   (as root)

Writes S bytes to a loop device with fio (1 MiB sequential, io_uring, direct,
iodepth 16, end_fsync) and with the lcfs engine (1 MiB sequential calls; 4 KiB
random calls; each run ends with sync), interleaved for N rounds, then 32 MiB
of 4 KiB random reads at queue depth 1 by the reopened engine and by fio, and
reports bandwidths, medians and ratios.

options:
  --size-bytes N     bytes written per run (S)             [default 1GiB]
  --device-bytes N   size of the sparse backing file       [default 4GiB]
  --rounds N         rounds of fio / engine seq / engine rand4k  [default 3]
  --file PATH        backing file (must not exist, or be empty)
                                                   [default /var/tmp/lcfs-bench.img]
  --seed N           seed of the random write order        [default 1]
  --json             print a machine-readable summary on stdout (the
                     human-readable report goes to stderr)
  -h, --help         this text
Sizes take an optional K, M, G or T suffix (binary: 1G = 2^30) and optional iB.";

/// Set by SIGINT/SIGTERM; checked between and inside runs so the guard still
/// detaches the loop device.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn check_interrupted() -> Result<(), String> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

struct Options {
    size_bytes: u64,
    device_bytes: u64,
    rounds: usize,
    file: PathBuf,
    seed: u64,
    json: bool,
}

fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("bad size {text:?}"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {text:?} overflows"))
}

fn parse_args() -> Result<Option<Options>, String> {
    let mut o = Options {
        size_bytes: 1 << 30,
        device_bytes: 4 << 30,
        rounds: 3,
        file: PathBuf::from("/var/tmp/lcfs-bench.img"),
        seed: 1,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--size-bytes" => o.size_bytes = parse_size(&value()?)?,
            "--device-bytes" => o.device_bytes = parse_size(&value()?)?,
            "--rounds" => {
                o.rounds = value()?
                    .parse()
                    .map_err(|_| "--rounds takes a number".to_string())?
            }
            "--file" => o.file = PathBuf::from(value()?),
            "--seed" => {
                o.seed = value()?
                    .parse()
                    .map_err(|_| "--seed takes a number".to_string())?
            }
            "--json" => o.json = true,
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    if o.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    if o.size_bytes == 0 || o.size_bytes % RANDOM_CALL_BYTES as u64 != 0 {
        return Err("--size-bytes must be a positive multiple of 4096".into());
    }
    // The engine needs room beside the data: its space reserve, metadata, and
    // segments still waiting to be reused.
    if o.size_bytes > o.device_bytes / 2 {
        return Err(format!(
            "--size-bytes {} is more than half of --device-bytes {}: leave the engine headroom",
            o.size_bytes, o.device_bytes
        ));
    }
    Ok(Some(o))
}

/// Detaches the loop device and deletes the backing file when dropped, so every
/// way out of `run` (including a panic) cleans up.
struct LoopGuard {
    file: PathBuf,
    loop_device: Option<String>,
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        if let Some(dev) = self.loop_device.take() {
            match Command::new("losetup").arg("-d").arg(&dev).status() {
                Ok(s) if s.success() => {}
                Ok(s) => eprintln!("warning: losetup -d {dev} exited with {s}; detach it by hand"),
                Err(e) => eprintln!("warning: losetup -d {dev}: {e}; detach it by hand"),
            }
        }
        if let Err(e) = std::fs::remove_file(&self.file) {
            if e.kind() != ErrorKind::NotFound {
                eprintln!("warning: removing {}: {e}", self.file.display());
            }
        }
    }
}

fn setup_loop_device(file: &Path, device_bytes: u64) -> Result<LoopGuard, String> {
    create_sparse_file(file, device_bytes).map_err(|e| {
        format!(
            "creating {}: {e} (an existing non-empty file is never overwritten; pass --file)",
            file.display()
        )
    })?;
    let mut guard = LoopGuard {
        file: file.to_path_buf(),
        loop_device: None,
    };
    let out = Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(file)
        .output()
        .map_err(|e| format!("running losetup: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "losetup --find --show --direct-io=on failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !dev.starts_with("/dev/") {
        return Err(format!("losetup printed {dev:?}, expected a /dev path"));
    }
    guard.loop_device = Some(dev);
    Ok(guard)
}

fn fio_available() -> Result<String, String> {
    match Command::new("fio").arg("--version").output() {
        Ok(out) if out.status.success() => {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
        Ok(out) => Err(format!(
            "fio --version failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(String::new()),
        Err(e) => Err(format!("running fio: {e}")),
    }
}

/// One fio run of 1 MiB sequential writes, ending with an fsync (the
/// device's cache flush) inside fio's timed part, as the engine's runs end
/// with `sync`; returns bytes per second.
fn run_fio(device: &str, size_bytes: u64) -> Result<f64, String> {
    let job = [
        "--ioengine=io_uring",
        "--rw=write",
        "--bs=1m",
        "--iodepth=16",
        "--end_fsync=1",
        "--name=seq",
    ];
    run_fio_job(device, size_bytes, &job, "write", size_bytes)
}

/// One fio run of 4 KiB random reads at queue depth 1 over the first
/// `size_bytes` of the device, RANDOM_READ_BYTES in all.
fn run_fio_random_reads(device: &str, size_bytes: u64) -> Result<f64, String> {
    let io_size = format!("--io_size={RANDOM_READ_BYTES}");
    let job = [
        "--ioengine=psync",
        "--rw=randread",
        "--bs=4k",
        &io_size,
        "--name=randread",
    ];
    run_fio_job(device, size_bytes, &job, "read", RANDOM_READ_BYTES)
}

/// Runs fio with `job` (plus O_DIRECT, the size and the device) and returns
/// the bytes per second of `direction` ("read" or "write") from its JSON
/// report, which must show at least `expected_bytes` moved.
fn run_fio_job(
    device: &str,
    size_bytes: u64,
    job: &[&str],
    direction: &str,
    expected_bytes: u64,
) -> Result<f64, String> {
    let out = Command::new("fio")
        .args(job)
        .args([
            "--direct=1",
            &format!("--size={size_bytes}"),
            &format!("--filename={device}"),
            "--output-format=json",
        ])
        .output()
        .map_err(|e| format!("running fio: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "fio failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let start = text.find('{').ok_or("fio printed no JSON")?;
    let report: Value =
        serde_json::from_str(&text[start..]).map_err(|e| format!("parsing fio JSON: {e}"))?;
    let result = &report["jobs"][0][direction];
    let bytes = result["io_bytes"]
        .as_f64()
        .ok_or_else(|| format!("fio JSON: no jobs[0].{direction}.io_bytes"))?;
    let runtime_ms = result["runtime"]
        .as_f64()
        .ok_or_else(|| format!("fio JSON: no jobs[0].{direction}.runtime"))?;
    if bytes < expected_bytes as f64 || runtime_ms <= 0.0 {
        return Err(format!(
            "fio moved {bytes} bytes ({direction}) in {runtime_ms} ms, expected {expected_bytes} bytes"
        ));
    }
    result["bw_bytes"]
        .as_f64()
        .filter(|bw| *bw > 0.0)
        .map_or_else(|| Ok(bytes / (runtime_ms / 1000.0)), Ok)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    Sequential,
    Random4k,
}

struct EngineRun {
    bytes_per_second: f64,
    /// Counters over the timed part only (writes, sync), not the format.
    device_writes: u64,
    device_write_bytes: u64,
    device_flushes: u64,
    user_write_calls: u64,
    checkpoints: u64,
    coalescing_ratio: f64,
    backend: &'static str,
    /// Random4k only: run (e), 4 KiB random reads after reopening.
    random_reads: Option<RandomReads>,
}

fn engine_error(what: &str) -> impl Fn(lcfs_engine::Error) -> String + '_ {
    move |e| format!("engine {what}: {e}")
}

/// Formats `device`, opens it with io_uring, writes one file of `size_bytes`
/// and syncs. Only the writes and the sync are timed.
fn run_engine(
    device: &str,
    size_bytes: u64,
    pattern: Pattern,
    seed: u64,
) -> Result<EngineRun, String> {
    let opts = OpenOptions {
        backend: Backend::IoUring,
        create_size_bytes: None,
    };
    let dev: Arc<dyn Device> =
        Arc::from(open_device(Path::new(device), &opts).map_err(engine_error("open_device"))?);
    Engine::format(
        dev.clone(),
        &FormatOptions {
            force: true,
            ..FormatOptions::default()
        },
    )
    .map_err(engine_error("format"))?;
    let engine = Engine::open(dev, Config::default()).map_err(engine_error("open"))?;
    let layer = engine
        .create_layer("bench", false)
        .map_err(engine_error("create_layer"))?;
    let file = engine
        .create(layer, ROOT_INODE, b"data", 0o644, 0, 0)
        .map_err(engine_error("create"))?;
    engine.sync().map_err(engine_error("sync"))?;

    // Offsets are computed before the clock starts.
    let offsets: Vec<u64> = match pattern {
        Pattern::Sequential => (0..size_bytes.div_ceil(SEQUENTIAL_CALL_BYTES as u64))
            .map(|i| i * SEQUENTIAL_CALL_BYTES as u64)
            .collect(),
        Pattern::Random4k => {
            let mut v: Vec<u64> = (0..size_bytes / RANDOM_CALL_BYTES as u64)
                .map(|i| i * RANDOM_CALL_BYTES as u64)
                .collect();
            v.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
            v
        }
    };
    let call_bytes = if pattern == Pattern::Sequential {
        SEQUENTIAL_CALL_BYTES
    } else {
        RANDOM_CALL_BYTES
    };
    // Non-zero, varied content, so nothing could shortcut zero blocks.
    let buffer: Vec<u8> = (0..call_bytes).map(|i| (i % 251) as u8 + 1).collect();

    let before = engine.stats();
    let start = Instant::now();
    for (n, &offset) in offsets.iter().enumerate() {
        let len = (size_bytes - offset).min(call_bytes as u64) as usize;
        engine
            .write(layer, file.inode, offset, &buffer[..len])
            .map_err(engine_error("write"))?;
        if n % 1024 == 0 {
            check_interrupted()?;
        }
    }
    engine.sync().map_err(engine_error("sync"))?;
    let elapsed = start.elapsed().as_secs_f64();
    let after = engine.stats();
    let size = engine
        .getattr(layer, file.inode)
        .map_err(engine_error("getattr"))?
        .size;
    if size != size_bytes {
        return Err(format!(
            "engine file is {size} bytes after the run, expected {size_bytes}"
        ));
    }
    engine.close().map_err(engine_error("close"))?;
    drop(engine);
    let mut run = engine_run(size_bytes as f64 / elapsed, &before, &after);
    if pattern == Pattern::Random4k {
        run.random_reads = Some(run_engine_random_reads(
            device, size_bytes, layer, file.inode, seed,
        )?);
    }
    Ok(run)
}

/// Reopens the engine on `device` (its block cache starts empty) and reads
/// RANDOM_READ_BYTES of the file in 4 KiB reads of distinct random blocks,
/// one at a time, as fio's psync job does; returns bytes per second.
fn run_engine_random_reads(
    device: &str,
    size_bytes: u64,
    layer: u64,
    inode: u64,
    seed: u64,
) -> Result<RandomReads, String> {
    let opts = OpenOptions {
        backend: Backend::IoUring,
        create_size_bytes: None,
    };
    let dev: Arc<dyn Device> =
        Arc::from(open_device(Path::new(device), &opts).map_err(engine_error("open_device"))?);
    let engine = Engine::open(dev, Config::default()).map_err(engine_error("reopen"))?;
    let mut offsets: Vec<u64> = (0..size_bytes / RANDOM_CALL_BYTES as u64)
        .map(|i| i * RANDOM_CALL_BYTES as u64)
        .collect();
    offsets.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5eed));
    offsets.truncate((RANDOM_READ_BYTES / RANDOM_CALL_BYTES as u64) as usize);
    let before = engine.stats();
    let start = Instant::now();
    for (n, &offset) in offsets.iter().enumerate() {
        let data = engine
            .read(layer, inode, offset, RANDOM_CALL_BYTES)
            .map_err(engine_error("read"))?;
        if data.len() != RANDOM_CALL_BYTES {
            return Err(format!(
                "engine read {} bytes at {offset}, expected {RANDOM_CALL_BYTES}",
                data.len()
            ));
        }
        if n % 1024 == 0 {
            check_interrupted()?;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = engine.stats();
    engine.close().map_err(engine_error("close"))?;
    let per_read = |n: u64| n as f64 / offsets.len() as f64;
    Ok(RandomReads {
        bytes_per_second: (offsets.len() * RANDOM_CALL_BYTES) as f64 / elapsed,
        device_reads_per_read: per_read(after.device.reads - before.device.reads),
        node_misses_per_read: per_read(after.node_cache_misses - before.node_cache_misses),
    })
}

/// What the engine's random reads of one run cost.
struct RandomReads {
    bytes_per_second: f64,
    /// Device reads per 4 KiB read: the data block plus the tree nodes that
    /// were not cached (the cache starts empty).
    device_reads_per_read: f64,
    node_misses_per_read: f64,
}

fn engine_run(bytes_per_second: f64, before: &Stats, after: &Stats) -> EngineRun {
    let device_writes = after.device.writes - before.device.writes;
    let user_write_calls = after.engine.user_write_calls - before.engine.user_write_calls;
    EngineRun {
        bytes_per_second,
        device_writes,
        device_write_bytes: after.device.write_bytes - before.device.write_bytes,
        device_flushes: after.device.flushes - before.device.flushes,
        user_write_calls,
        checkpoints: after.engine.checkpoints - before.engine.checkpoints,
        coalescing_ratio: if device_writes == 0 {
            0.0
        } else {
            user_write_calls as f64 / device_writes as f64
        },
        backend: after.backend,
        random_reads: None,
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn mib_per_second(bytes_per_second: f64) -> f64 {
    bytes_per_second / MIB as f64
}

fn summary(name: &str, values: &[f64]) -> Value {
    let mibs: Vec<f64> = values.iter().map(|&b| mib_per_second(b)).collect();
    let min = mibs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = mibs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({ "name": name, "mib_per_second": mibs, "median_mib_per_second": median(&mibs),
            "min_mib_per_second": min, "max_mib_per_second": max })
}

fn run(o: &Options) -> Result<Value, String> {
    // The human-readable report goes to stdout, or to stderr under --json.
    let say = |line: String| {
        if o.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    let fio_version = fio_available().map_err(|e| {
        if e.is_empty() {
            "fio is not installed: run `bash scripts/setup.sh` (as root) first".to_string()
        } else {
            e
        }
    })?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("engine-vs-fio needs root (losetup, O_DIRECT on a loop device)".into());
    }
    install_signal_handlers();
    let guard = setup_loop_device(&o.file, o.device_bytes)?;
    let device = guard.loop_device.clone().expect("attached");
    say(format!(
        "{fio_version}; {device} over {} ({} MiB sparse, direct-io=on); {} MiB per run; {} rounds; seed {}",
        o.file.display(),
        o.device_bytes / MIB,
        o.size_bytes / MIB,
        o.rounds,
        o.seed
    ));

    let (mut fio, mut seq, mut rand) = (Vec::new(), Vec::new(), Vec::new());
    let (mut fio_random_read, mut engine_random_read) = (Vec::new(), Vec::new());
    let mut engine_runs = Vec::new();
    for round in 1..=o.rounds {
        check_interrupted()?;
        let f = run_fio(&device, o.size_bytes)?;
        say(format!(
            "round {round}: fio seq 1m qd16        {:8.1} MiB/s",
            mib_per_second(f)
        ));
        fio.push(f);
        for (pattern, label, out) in [
            (Pattern::Sequential, "engine seq 1m", &mut seq),
            (Pattern::Random4k, "engine rand 4k", &mut rand),
        ] {
            check_interrupted()?;
            let r = run_engine(
                &device,
                o.size_bytes,
                pattern,
                o.seed.wrapping_add(round as u64),
            )?;
            say(format!(
                "round {round}: {label:<22}{:8.1} MiB/s  (backend {}, device writes {}, write bytes {}, flushes {}, \
                 user write calls {}, checkpoints {}, coalescing ratio {:.1})",
                mib_per_second(r.bytes_per_second),
                r.backend,
                r.device_writes,
                r.device_write_bytes,
                r.device_flushes,
                r.user_write_calls,
                r.checkpoints,
                r.coalescing_ratio
            ));
            out.push(r.bytes_per_second);
            engine_runs.push(json!({
                "round": round, "workload": label, "mib_per_second": mib_per_second(r.bytes_per_second),
                "backend": r.backend, "device_writes": r.device_writes, "device_write_bytes": r.device_write_bytes,
                "device_flushes": r.device_flushes, "user_write_calls": r.user_write_calls,
                "checkpoints": r.checkpoints, "coalescing_ratio": r.coalescing_ratio,
            }));
            if let Some(reads) = &r.random_reads {
                say(format!(
                    "round {round}: engine randread 4k qd1 {:8.1} MiB/s  (reopened, cold cache; \
                     per read: {:.2} device reads, {:.2} node cache misses)",
                    mib_per_second(reads.bytes_per_second),
                    reads.device_reads_per_read,
                    reads.node_misses_per_read
                ));
                engine_random_read.push(reads.bytes_per_second);
            }
        }
        check_interrupted()?;
        let f = run_fio_random_reads(&device, o.size_bytes)?;
        say(format!(
            "round {round}: fio randread 4k qd1    {:8.1} MiB/s",
            mib_per_second(f)
        ));
        fio_random_read.push(f);
    }
    let ratios_seq: Vec<f64> = seq.iter().zip(&fio).map(|(e, f)| e / f).collect();
    let ratios_rand: Vec<f64> = rand.iter().zip(&fio).map(|(e, f)| e / f).collect();
    let (m_fio, m_seq, m_rand) = (median(&fio), median(&seq), median(&rand));
    for (label, values) in [
        ("fio seq 1m qd16", &fio),
        ("engine seq 1m", &seq),
        ("engine rand 4k", &rand),
        ("fio randread 4k qd1", &fio_random_read),
        ("engine randread 4k qd1", &engine_random_read),
    ] {
        let mibs: Vec<String> = values
            .iter()
            .map(|&b| format!("{:.1}", mib_per_second(b)))
            .collect();
        say(format!(
            "median {label:<22}{:8.1} MiB/s  (rounds: {})",
            mib_per_second(median(values)),
            mibs.join(", ")
        ));
    }
    let per_round = |r: &[f64]| {
        r.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    say(format!(
        "ratio engine_seq/fio_seq    {:.2} (median/median; per round: {})",
        m_seq / m_fio,
        per_round(&ratios_seq)
    ));
    say(format!(
        "ratio engine_rand4k/fio_seq {:.2} (median/median; per round: {})",
        m_rand / m_fio,
        per_round(&ratios_rand)
    ));
    drop(guard);
    Ok(json!({
        "fio_version": fio_version,
        "size_bytes": o.size_bytes,
        "device_bytes": o.device_bytes,
        "rounds": o.rounds,
        "seed": o.seed,
        "results": [summary("fio_seq_1m_qd16", &fio), summary("engine_seq_1m", &seq), summary("engine_rand_4k", &rand),
                    summary("fio_randread_4k_qd1", &fio_random_read),
                    summary("engine_randread_4k_qd1", &engine_random_read)],
        "ratio_engine_seq_to_fio_seq": m_seq / m_fio,
        "ratio_engine_rand4k_to_fio_seq": m_rand / m_fio,
        "ratio_engine_seq_to_fio_seq_per_round": ratios_seq,
        "ratio_engine_rand4k_to_fio_seq_per_round": ratios_rand,
        "engine_runs": engine_runs,
    }))
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("engine-vs-fio: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(summary) => {
            if options.json {
                println!("{summary:#}");
            }
            ExitCode::SUCCESS
        }
        Err(e) if e.starts_with("fio is not installed") => {
            eprintln!("engine-vs-fio: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("engine-vs-fio: {e}");
            ExitCode::FAILURE
        }
    }
}
