//! `seal-after-apply`: what sealing an image layer costs when its apply
//! hashed the files as they streamed in, against sealing it by reading the
//! files back (what a restart between the apply and the seal leaves:
//! streamed digests are kept in memory only), in one run, interleaved.
//!
//! Each round formats a sparse file (io_uring, O_DIRECT), applies the tar
//! into a cold layer and commits it (timed: apply, which now hashes), seals
//! it (timed: streamed); applies the tar into a second layer, commits,
//! reopens the engine and seals that one (timed: read back). Both seals
//! must give one root. A third apply, with the engine's hashing for seals
//! off (as under `lcfs daemon --no-seal`), is the apply without it. The
//! file is deleted at the end.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use lcfs_dockerplugin::apply_tar;
use lcfs_engine::device::{open_device, Backend, Device, OpenOptions};
use lcfs_engine::{Config, Engine, FormatOptions};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

const USAGE: &str = "\
usage: seal-after-apply --tar PATH [--rounds N] [--file PATH] [--device-bytes N]

  --tar PATH         an uncompressed layer tar (a rootfs)
  --rounds N         rounds                                [default 3]
  --file PATH        backing file (must not exist)         [default /var/tmp/lcfs-seal-bench.img]
  --device-bytes N   size of the sparse backing file       [default 4GiB]";

struct Args {
    tar: PathBuf,
    rounds: usize,
    file: PathBuf,
    device_bytes: u64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        tar: PathBuf::new(),
        rounds: 3,
        file: PathBuf::from("/var/tmp/lcfs-seal-bench.img"),
        device_bytes: 4 << 30,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--tar" => a.tar = PathBuf::from(value()?),
            "--rounds" => a.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--file" => a.file = PathBuf::from(value()?),
            "--device-bytes" => {
                a.device_bytes = value()?
                    .parse()
                    .map_err(|e| format!("--device-bytes: {e}"))?
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    if a.tar.as_os_str().is_empty() || a.rounds == 0 {
        return Err(USAGE.into());
    }
    Ok(a)
}

/// Deletes the backing file however the run ends.
struct Backing(PathBuf);

impl Drop for Backing {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn open(file: &Path) -> Result<Arc<Engine>, String> {
    let opts = OpenOptions {
        backend: Backend::IoUring,
        create_size_bytes: None,
    };
    let dev: Arc<dyn Device> = Arc::from(open_device(file, &opts).map_err(|e| e.to_string())?);
    Engine::open(dev, Config::default()).map_err(|e| e.to_string())
}

fn format(file: &Path, bytes: u64) -> Result<(), String> {
    let _ = std::fs::remove_file(file);
    let opts = OpenOptions {
        backend: Backend::IoUring,
        create_size_bytes: Some(bytes),
    };
    let dev: Arc<dyn Device> = Arc::from(open_device(file, &opts).map_err(|e| e.to_string())?);
    Engine::format(
        dev,
        &FormatOptions {
            force: true,
            ..FormatOptions::default()
        },
    )
    .map_err(|e| e.to_string())
}

/// Applies `tar` into new cold layer `name`, commits it, and syncs.
fn apply(e: &Engine, name: &str, tar: &[u8]) -> Result<f64, String> {
    let start = Instant::now();
    let id = e.create_layer(name, true).map_err(|e| e.to_string())?;
    apply_tar(e, id, tar).map_err(|e| e.to_string())?;
    e.commit_layer(name).map_err(|e| e.to_string())?;
    e.sync().map_err(|e| e.to_string())?;
    Ok(start.elapsed().as_secs_f64())
}

fn seal(e: &Engine, name: &str) -> Result<(f64, [u8; 32]), String> {
    let start = Instant::now();
    let info = e
        .seal_layer(name, &|| false, &mut |_| {})
        .map_err(|e| e.to_string())?;
    Ok((start.elapsed().as_secs_f64(), info.root))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run(a: &Args) -> Result<(), String> {
    let tar = std::fs::read(&a.tar).map_err(|e| format!("reading {}: {e}", a.tar.display()))?;
    if a.file.exists() {
        return Err(format!("{} exists; pass another --file", a.file.display()));
    }
    let _backing = Backing(a.file.clone());
    let (mut applies, mut streamed, mut reread, mut hashing) = (vec![], vec![], vec![], vec![]);
    let mut file_bytes = 0;
    for round in 1..=a.rounds {
        format(&a.file, a.device_bytes)?;
        let e = open(&a.file)?;
        applies.push(apply(&e, "streamed", &tar)?);
        let before = e.sealed_from_stream_bytes();
        let (s, root) = seal(&e, "streamed")?;
        file_bytes = e.sealed_from_stream_bytes() - before;
        streamed.push(s);
        apply(&e, "read-back", &tar)?;
        drop(e);
        let e = open(&a.file)?;
        let (r, root_again) = seal(&e, "read-back")?;
        if root != root_again || e.sealed_from_stream_bytes() != 0 {
            return Err("the two seals differ, or the reopened engine had streamed digests".into());
        }
        reread.push(r);
        e.set_streamed_hashes(false);
        let h = apply(&e, "unhashed", &tar)?;
        hashing.push(h);
        drop(e);
        eprintln!(
            "round {round}: apply {:.2} s, without hashing {h:.2} s; seal streamed {s:.2} s, read back {r:.2} s",
            applies[round - 1]
        );
    }
    let (ap, st, rr, h) = (
        median(applies),
        median(streamed),
        median(reread),
        median(hashing),
    );
    println!(
        "{} MiB of files in {} MiB of tar, {} rounds, medians:",
        file_bytes >> 20,
        tar.len() >> 20,
        a.rounds
    );
    println!("  apply + commit + sync       {ap:.2} s (without hashing {h:.2} s)");
    println!("  seal, streamed digests      {st:.2} s");
    println!("  seal, files read back       {rr:.2} s");
    println!("  streamed / read back        {:.2}", st / rr);
    Ok(())
}

fn main() -> ExitCode {
    match parse().and_then(|a| run(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("seal-after-apply: {e}");
            ExitCode::FAILURE
        }
    }
}
