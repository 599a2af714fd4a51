//! `fsync-latency`: what an fsync of one file costs with the engine's fsync
//! log, beside the same engine making every fsync a checkpoint
//! (`Config::fsync_log = false`, what every fsync was before the log), in
//! one run on one device file (sparse, O_DIRECT, io_uring).
//!
//! A "database" thread, on a file that existed at the last checkpoint,
//! repeats for D seconds: write 4 KiB at a random aligned offset of a 64 MiB
//! file, fsync. Meanwhile N "neighbour" threads, each in a layer of its
//! own, create 4 KiB files and never sync (other containers' unsynced
//! work, which a checkpoint must write and a record need not). Reports
//! fsyncs per second and fsync latency (p50, p99, max), per mode and
//! neighbour count, rounds interleaved; then the medians and the ratio
//! log / checkpoint. Each round also runs fio's same loop (4 KiB random
//! write, fsync, psync) on a 64 MiB file beside the device file, on the
//! host filesystem holding it: the native peer.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use hdrhistogram::Histogram;
use lcfs_engine::device::{open_device, Backend, Device, OpenOptions};
use lcfs_engine::{Config, Engine, FormatOptions, ROOT_INODE};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: fsync-latency [--file PATH] [--seconds N] [--rounds N] [--neighbours 0,2]

One thread writes 4 KiB and fsyncs, beside N threads creating files in
layers of their own, with the fsync log and with every fsync a checkpoint.

  --file PATH        device file (created sparse, removed at the end)
                                     [default /var/tmp/lcfs-fsync-latency.img]
  --seconds N        seconds per measurement   [default 5]
  --rounds N         rounds, each measures every case once [default 3]
  --neighbours LIST  neighbour thread counts   [default 0,2]";

const FILE_BYTES: u64 = 64 << 20;
const DEVICE_BYTES: u64 = 4 << 30;

struct Args {
    file: PathBuf,
    seconds: u64,
    rounds: usize,
    neighbours: Vec<usize>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        file: PathBuf::from("/var/tmp/lcfs-fsync-latency.img"),
        seconds: 5,
        rounds: 3,
        neighbours: vec![0, 2],
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--file" => a.file = PathBuf::from(v()?),
            "--seconds" => a.seconds = v()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--rounds" => a.rounds = v()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--neighbours" => {
                a.neighbours = v()?
                    .split(',')
                    .map(|s| s.parse().map_err(|e| format!("--neighbours: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    Ok(a)
}

struct Sample {
    fsyncs_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
}

fn measure(a: &Args, log: bool, neighbours: usize, seed: u64) -> Result<Sample, String> {
    let _ = std::fs::remove_file(&a.file);
    lcfs_engine::device::create_sparse_file(&a.file, DEVICE_BYTES).map_err(|e| e.to_string())?;
    let opts = OpenOptions {
        backend: Backend::IoUring,
        ..OpenOptions::default()
    };
    let dev: Arc<dyn Device> = Arc::from(open_device(&a.file, &opts).map_err(|e| e.to_string())?);
    Engine::format(dev.clone(), &FormatOptions::default()).map_err(|e| e.to_string())?;
    let config = Config {
        fsync_log: log,
        ..Config::default()
    };
    let e = Engine::open(dev, config).map_err(|e| e.to_string())?;
    let db = e.create_layer("db", false).map_err(|e| e.to_string())?;
    let f = e
        .create(db, ROOT_INODE, b"data", 0o644, 0, 0)
        .map_err(|e| e.to_string())?
        .inode;
    let chunk = vec![0x5au8; 1 << 20];
    for off in (0..FILE_BYTES).step_by(chunk.len()) {
        e.write(db, f, off, &chunk).map_err(|e| e.to_string())?;
    }
    let layers: Vec<u64> = (0..neighbours)
        .map(|n| e.create_layer(&format!("n{n}"), false))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    e.sync().map_err(|e| e.to_string())?;
    let stop = AtomicBool::new(false);
    let deadline = Duration::from_secs(a.seconds);
    // Microseconds, up to a minute.
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut fsyncs = 0u64;
    std::thread::scope(|s| -> Result<(), String> {
        for &l in &layers {
            let (e, stop) = (&e, &stop);
            s.spawn(move || {
                let block = vec![1u8; 4096];
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("f{i}");
                    if let Ok(a) = e.create(l, ROOT_INODE, name.as_bytes(), 0o644, 0, 0) {
                        let _ = e.write(l, a.inode, 0, &block);
                    }
                    i += 1;
                }
            });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let block = vec![0xa5u8; 4096];
        let start = Instant::now();
        let r = (|| {
            while start.elapsed() < deadline {
                let off = rng.gen_range(0..FILE_BYTES / 4096) * 4096;
                e.write(db, f, off, &block).map_err(|e| e.to_string())?;
                let t = Instant::now();
                e.fsync(db, f).map_err(|e| e.to_string())?;
                hist.saturating_record(t.elapsed().as_micros() as u64);
                fsyncs += 1;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        r
    })?;
    let st = e.stats().engine;
    if log && st.fsync_records == 0 {
        return Err("no fsync went to the fsync log".into());
    }
    drop(e);
    let _ = std::fs::remove_file(&a.file);
    Ok(Sample {
        fsyncs_per_s: fsyncs as f64 / a.seconds as f64,
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
    })
}

/// fio's 4 KiB random write + fsync loop on a file beside the device file.
fn fio_peer(a: &Args) -> Result<Sample, String> {
    let file = a.file.with_extension("fio");
    let out = Command::new("fio")
        .args([
            "--name=fsync",
            &format!("--filename={}", file.display()),
            &format!("--size={FILE_BYTES}"),
            "--rw=randwrite",
            "--bs=4k",
            "--fsync=1",
            "--ioengine=psync",
            "--time_based",
            &format!("--runtime={}", a.seconds),
            "--output-format=json",
        ])
        .output()
        .map_err(|e| format!("running fio: {e}"))?;
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        return Err(format!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let j: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("fio's json: {e}"))?;
    let job = &j["jobs"][0];
    let pct = |p: &str| job["sync"]["lat_ns"]["percentile"][p].as_u64().unwrap_or(0) / 1000;
    Ok(Sample {
        fsyncs_per_s: job["write"]["iops"].as_f64().unwrap_or(0.0),
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        max_us: job["sync"]["lat_ns"]["max"].as_u64().unwrap_or(0) / 1000,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(m) => {
            if !m.is_empty() {
                eprintln!("fsync-latency: {m}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    // (neighbours, mode) -> samples
    let mut all: BTreeMap<(usize, &str), Vec<Sample>> = BTreeMap::new();
    for round in 0..a.rounds {
        match fio_peer(&a) {
            Ok(s) => {
                println!(
                    "round {} fio on the host filesystem: {:8.0} fsyncs/s  p50 {:6} us  p99 {:6} us  max {:7} us",
                    round + 1,
                    s.fsyncs_per_s,
                    s.p50_us,
                    s.p99_us,
                    s.max_us
                );
                all.entry((0, "fio")).or_default().push(s);
            }
            Err(m) => {
                eprintln!("fsync-latency: {m}");
                return ExitCode::FAILURE;
            }
        }
        for &n in &a.neighbours {
            for (mode, log) in [("log", true), ("checkpoint", false)] {
                match measure(&a, log, n, round as u64 + 1) {
                    Ok(s) => {
                        println!(
                            "round {} neighbours {n} {mode:>10}: {:8.0} fsyncs/s  p50 {:6} us  p99 {:6} us  max {:7} us",
                            round + 1,
                            s.fsyncs_per_s,
                            s.p50_us,
                            s.p99_us,
                            s.max_us
                        );
                        all.entry((n, mode)).or_default().push(s);
                    }
                    Err(m) => {
                        eprintln!("fsync-latency: {m}");
                        let _ = std::fs::remove_file(&a.file);
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
    }
    println!("medians over {} rounds (ratio: log / checkpoint)", a.rounds);
    for &n in &a.neighbours {
        let get = |mode: &str, f: &dyn Fn(&Sample) -> f64| {
            let mut v: Vec<f64> = all[&(n, mode)].iter().map(f).collect();
            median(&mut v)
        };
        let rate = |s: &Sample| s.fsyncs_per_s;
        let p50 = |s: &Sample| s.p50_us as f64;
        let p99 = |s: &Sample| s.p99_us as f64;
        println!(
            "neighbours {n}: fsyncs/s {:.0} vs {:.0} ({:.2}x); p50 {:.0} vs {:.0} us ({:.2}); p99 {:.0} vs {:.0} us ({:.2})",
            get("log", &rate),
            get("checkpoint", &rate),
            get("log", &rate) / get("checkpoint", &rate),
            get("log", &p50),
            get("checkpoint", &p50),
            get("log", &p50) / get("checkpoint", &p50),
            get("log", &p99),
            get("checkpoint", &p99),
            get("log", &p99) / get("checkpoint", &p99),
        );
    }
    let rate = |mode: &str| {
        let mut v: Vec<f64> = all[&(0, mode)].iter().map(|s| s.fsyncs_per_s).collect();
        median(&mut v)
    };
    if a.neighbours.contains(&0) {
        println!(
            "alone against fio on the host filesystem: fsyncs/s {:.0} (log) {:.0} (checkpoint) vs {:.0}: {:.2} / {:.2}",
            rate("log"),
            rate("checkpoint"),
            rate("fio"),
            rate("log") / rate("fio"),
            rate("checkpoint") / rate("fio"),
        );
    }
    ExitCode::SUCCESS
}
