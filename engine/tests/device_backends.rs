//! Proves every device backend (memory, pread, io_uring on files and on a real loop device) keeps the `Device` contract, and that FaultyDevice, open_device and detect_signature behave as documented.
//!
//! Randomized tests print their seed; `LCFS_SEED=<n> cargo test ...` replays one.
//! Loop-device tests need root and fail (not skip) without it; CI runs as root.

use lcfs_engine::device::{
    create_sparse_file, detect_signature, open_device, AlignedBuf, Backend, Device, FaultConfig,
    FaultyDevice, IoOp, MemDevice, OpenOptions, SyncDevice, UringDevice, BLOCK_SIZE,
};
use lcfs_engine::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const BS: u64 = BLOCK_SIZE as u64;

// ---------------------------------------------------------------- helpers

fn seed(test: &str) -> u64 {
    let seed = match std::env::var("LCFS_SEED") {
        Ok(s) => s.parse().expect("LCFS_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: LCFS_SEED={seed}");
    seed
}

/// A buffer of `len` bytes filled from `tag`; distinct tags give distinct data.
fn pattern(tag: u64, len: usize) -> AlignedBuf {
    let mut rng = ChaCha8Rng::seed_from_u64(tag);
    let mut buf = AlignedBuf::new(len);
    rng.fill(&mut buf[..]);
    buf
}

fn read(dev: &dyn Device, offset: u64, len: usize) -> AlignedBuf {
    let mut buf = AlignedBuf::new(len);
    dev.read_at(offset, &mut buf).unwrap();
    buf
}

fn is_contract_error<T>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::DeviceContract(_)))
}

fn errno<T>(r: Result<T, Error>) -> i32 {
    match r {
        Err(e) => e.errno(),
        Ok(_) => panic!("expected an error"),
    }
}

fn require_root(why: &str) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root to {why}; run it as root (CI does)"
    );
}

/// A sparse temp file of `size` bytes opened read-write with O_DIRECT.
fn temp_device_file(dir: &tempfile::TempDir, name: &str, size: u64) -> (PathBuf, File) {
    let path = dir.path().join(name);
    create_sparse_file(&path, size).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    (path, file)
}

/// Held while a test runs another program, and while a test checks that a
/// closed device can be reopened exclusively at once. A child process holds a
/// copy of this process's file table from fork to exec (every descriptor,
/// close-on-exec or not), so a device another test thread closes in that window
/// stays open, and exclusively claimed, until the child execs.
static FILE_TABLE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Runs `command` to its end, with no exclusive reopen check in progress.
fn run_program(command: &mut Command) -> std::io::Result<std::process::Output> {
    let _spawning = FILE_TABLE.read().unwrap_or_else(|e| e.into_inner());
    command.output()
}

/// A loop device attached to a file, detached on drop even when the test panics.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(backing: &Path, extra_args: &[&str]) -> LoopDevice {
        require_root("attach a loop device");
        let out = run_program(
            Command::new("losetup")
                .args(["--find", "--show"])
                .args(extra_args)
                .arg(backing),
        )
        .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Build the guard first so the device is detached even if a check below fails.
        let device = LoopDevice {
            path: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        };
        assert!(
            device.path.to_string_lossy().starts_with("/dev/loop"),
            "unexpected losetup output {:?}",
            device.path
        );
        device
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        match run_program(Command::new("losetup").arg("-d").arg(&self.path)) {
            Ok(out) if out.status.success() => {}
            other => eprintln!(
                "warning: could not detach {}: {other:?}",
                self.path.display()
            ),
        }
    }
}

fn open_with(path: &Path, backend: Backend) -> Box<dyn Device> {
    open_device(
        path,
        &OpenOptions {
            backend,
            create_size_bytes: None,
        },
    )
    .unwrap_or_else(|e| panic!("open {} with {backend:?}: {e}", path.display()))
}

// ------------------------------------------------------- the contract check

/// Exercises the whole written contract on `dev` (at least 16 MiB, any contents).
fn check_contract(dev: &dyn Device, seed: u64) {
    let size = dev.size_bytes();
    assert!(size >= 16 * MIB && size % BS == 0, "size {size}");
    assert!(
        matches!(dev.logical_block_size(), 512 | 4096),
        "lbs {}",
        dev.logical_block_size()
    );
    let before = dev.stats();

    // Written: a completed write is what later reads see.
    let a = pattern(seed, 8192);
    dev.write_at(BS, &a).unwrap();
    assert_eq!(&read(dev, BS, 8192)[..], &a[..]);
    // The last block of the device is reachable.
    let last = pattern(seed ^ 1, BLOCK_SIZE);
    dev.write_at(size - BS, &last).unwrap();
    assert_eq!(&read(dev, size - BS, BLOCK_SIZE)[..], &last[..]);

    // Misaligned or out-of-range I/O is refused and changes nothing.
    let mut buf = AlignedBuf::new(2 * BLOCK_SIZE);
    assert!(is_contract_error(dev.read_at(512, &mut buf[..BLOCK_SIZE])));
    assert!(is_contract_error(dev.read_at(BS, &mut buf[..1000])));
    assert!(
        is_contract_error(dev.read_at(BS, &mut buf[512..512 + BLOCK_SIZE])),
        "misaligned buffer"
    );
    assert!(is_contract_error(
        dev.write_at(BS + 100, &buf[..BLOCK_SIZE])
    ));
    assert!(is_contract_error(dev.write_at(BS, &buf[..4000])));
    assert!(is_contract_error(
        dev.write_at(BS, &buf[512..512 + BLOCK_SIZE])
    ));
    assert!(
        is_contract_error(dev.read_at(size, &mut buf[..BLOCK_SIZE])),
        "beyond the end"
    );
    assert!(
        is_contract_error(dev.write_at(size - BS, &buf[..2 * BLOCK_SIZE])),
        "crossing the end"
    );
    assert!(
        is_contract_error(dev.read_at(u64::MAX - BS + 1, &mut buf[..BLOCK_SIZE])),
        "offset overflow"
    );
    let zeros = AlignedBuf::new(BLOCK_SIZE);
    let mut bad_batch = [
        IoOp::Write {
            offset: BS,
            buf: &zeros,
        },
        IoOp::Write {
            offset: 3 * BS + 512,
            buf: &zeros,
        },
    ];
    assert!(is_contract_error(dev.submit(&mut bad_batch)));
    assert_eq!(
        &read(dev, BS, 8192)[..],
        &a[..],
        "a refused batch must not run any op"
    );

    // Ops larger than one io_uring pool buffer (256 KiB) are split and rejoined.
    let big = pattern(seed ^ 2, MIB as usize + BLOCK_SIZE);
    dev.write_at(4 * MIB, &big).unwrap();
    assert_eq!(&read(dev, 4 * MIB, big.len())[..], &big[..]);

    // A batch of many mixed reads and writes (no overlaps) round-trips.
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 3);
    let slot_bytes = 64 * 1024u64;
    let slots = 150u64;
    let base = 8 * MIB;
    assert!(base + slots * slot_bytes <= size);
    let lens: Vec<usize> = (0..slots)
        .map(|_| rng.gen_range(1..=16) * BLOCK_SIZE)
        .collect();
    let first: Vec<AlignedBuf> = (0..slots)
        .map(|i| pattern(seed ^ (100 + i), lens[i as usize]))
        .collect();
    let mut ops: Vec<IoOp> = first
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(i, b)| IoOp::Write {
            offset: base + i as u64 * slot_bytes,
            buf: b,
        })
        .collect();
    dev.submit(&mut ops).unwrap();
    // Second batch: read back the even slots while writing the odd ones.
    let mut readback: Vec<AlignedBuf> = (0..slots)
        .map(|i| AlignedBuf::new(lens[i as usize]))
        .collect();
    let mut ops: Vec<IoOp> = Vec::new();
    for (i, rb) in readback.iter_mut().enumerate() {
        let offset = base + i as u64 * slot_bytes;
        if i % 2 == 0 {
            ops.push(IoOp::Read { offset, buf: rb });
        } else {
            ops.push(IoOp::Write {
                offset,
                buf: &first[i],
            });
        }
    }
    let mixed_ops = ops.len();
    dev.submit(&mut ops).unwrap();
    drop(ops);
    for i in (0..slots as usize).step_by(2) {
        assert_eq!(&readback[i][..], &first[i][..], "slot {i} (seed {seed})");
    }
    for i in (1..slots as usize).step_by(2) {
        assert_eq!(
            &read(dev, base + i as u64 * slot_bytes, lens[i])[..],
            &first[i][..],
            "slot {i}"
        );
    }
    dev.submit(&mut []).unwrap();

    // Durable: flush succeeds and is counted.
    dev.flush().unwrap();

    // Stats count exactly the ops that ran (refused ops do not count).
    let after = dev.stats();
    let even_bytes: u64 = (0..slots as usize).step_by(2).map(|i| lens[i] as u64).sum();
    let odd_bytes: u64 = (1..slots as usize).step_by(2).map(|i| lens[i] as u64).sum();
    let writes = 2 + 1 + slots;
    let reads = 4 + slots;
    assert_eq!(after.writes - before.writes, writes);
    assert_eq!(after.reads - before.reads, reads);
    assert_eq!(
        after.write_bytes - before.write_bytes,
        8192 + BS + big.len() as u64 + even_bytes + odd_bytes
    );
    assert_eq!(
        after.read_bytes - before.read_bytes,
        8192 * 2 + BS + big.len() as u64 + even_bytes + odd_bytes
    );
    assert_eq!(after.flushes - before.flushes, 1);
    assert_eq!(after.batches - before.batches, 3);
    assert_eq!(
        after.batched_ops - before.batched_ops,
        slots / 2 + mixed_ops as u64
    );
}

// ------------------------------------------------------------ each backend

#[test]
fn memory_device_keeps_the_contract() {
    let dev = MemDevice::new(8 << 30); // sparse: 8 GiB costs only the pages written
    assert_eq!(dev.backend(), "memory");
    check_contract(&dev, seed("memory_device_keeps_the_contract"));
    let copy = MemDevice::from_bytes(MemDevice::new(MIB).snapshot());
    assert_eq!(copy.size_bytes(), MIB);
}

#[test]
fn pread_device_on_a_file_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let (_, file) = temp_device_file(&dir, "dev", 64 * MIB);
    let dev = SyncDevice::from_file(file, 64 * MIB, 512);
    assert_eq!(dev.backend(), "pread");
    check_contract(&dev, seed("pread_device_on_a_file_keeps_the_contract"));
}

#[test]
fn uring_device_on_a_file_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let (_, file) = temp_device_file(&dir, "dev", 64 * MIB);
    let dev = UringDevice::from_file(file, 64 * MIB, 512).expect("io_uring is enabled on CI hosts");
    assert_eq!(dev.backend(), "io_uring");
    check_contract(&dev, seed("uring_device_on_a_file_keeps_the_contract"));
}

#[test]
fn uring_writes_reach_the_file_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (path, file) = temp_device_file(&dir, "dev", 16 * MIB);
    let data = pattern(
        seed("uring_writes_reach_the_file_and_survive_reopen"),
        512 * 1024,
    );
    {
        let dev = UringDevice::from_file(file, 16 * MIB, 512).unwrap();
        dev.write_at(3 * MIB, &data).unwrap();
        dev.flush().unwrap();
    } // dropping stops the I/O thread
    let dev = open_with(&path, Backend::Pread);
    assert_eq!(&read(&*dev, 3 * MIB, data.len())[..], &data[..]);
}

#[test]
fn uring_batch_larger_than_ring_and_buffer_pool_round_trips() {
    // 160 chunks of 256 KiB: more than the 64 registered buffers (plain READ/WRITE
    // fallback) and more than the 128 ring entries (queued until slots free up).
    let dir = tempfile::tempdir().unwrap();
    let (_, file) = temp_device_file(&dir, "dev", 48 * MIB);
    let dev = UringDevice::from_file(file, 48 * MIB, 512).unwrap();
    let s = seed("uring_batch_larger_than_ring_and_buffer_pool_round_trips");
    let chunk = 256 * 1024;
    let bufs: Vec<AlignedBuf> = (0..160).map(|i| pattern(s ^ i, chunk)).collect();
    let mut ops: Vec<IoOp> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| IoOp::Write {
            offset: (i * chunk) as u64,
            buf: b,
        })
        .collect();
    dev.submit(&mut ops).unwrap();
    let mut back: Vec<AlignedBuf> = (0..160).map(|_| AlignedBuf::new(chunk)).collect();
    let mut ops: Vec<IoOp> = back
        .iter_mut()
        .enumerate()
        .map(|(i, b)| IoOp::Read {
            offset: (i * chunk) as u64,
            buf: b,
        })
        .collect();
    dev.submit(&mut ops).unwrap();
    drop(ops);
    for i in 0..160 {
        assert_eq!(&back[i][..], &bufs[i][..], "chunk {i}");
    }
    // One 40 MiB op is split into 160 chunks in a single submission.
    let whole = read(&dev, 0, 160 * chunk);
    for i in 0..160 {
        assert_eq!(
            &whole[i * chunk..(i + 1) * chunk],
            &bufs[i][..],
            "chunk {i} of the big read"
        );
    }
}

#[test]
fn uring_serves_concurrent_callers() {
    let dir = tempfile::tempdir().unwrap();
    let (_, file) = temp_device_file(&dir, "dev", 64 * MIB);
    let dev = Arc::new(UringDevice::from_file(file, 64 * MIB, 512).unwrap());
    let s = seed("uring_serves_concurrent_callers");
    let threads = 6u64;
    let rounds = 200u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(s ^ t);
                let region = t * 8 * MIB;
                for r in 0..rounds {
                    let blocks = rng.gen_range(1..=32u64);
                    let offset = region + rng.gen_range(0..(8 * MIB / BS - blocks)) * BS;
                    let data = pattern(s ^ (t << 32) ^ r, (blocks * BS) as usize);
                    dev.write_at(offset, &data).unwrap();
                    let mut back = AlignedBuf::new(data.len());
                    let mut ops = [IoOp::Read {
                        offset,
                        buf: &mut back,
                    }];
                    dev.submit(&mut ops).unwrap();
                    assert_eq!(&back[..], &data[..], "thread {t} round {r} (seed {s})");
                    if r % 50 == 0 {
                        dev.flush().unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("caller thread");
    }
    let stats = dev.stats();
    assert_eq!(stats.writes, threads * rounds);
    assert_eq!(stats.reads, threads * rounds);
    assert_eq!(stats.batches, threads * rounds);
    assert_eq!(stats.flushes, threads * 4);
}

#[test]
fn uring_reads_on_callers_rings_follow_each_device() {
    // Reads run on a ring of the calling thread's own, which outlives any one
    // device: two devices read alternately from the same threads, one of them
    // dropped halfway, short-lived threads each making a ring of their own.
    let dir = tempfile::tempdir().unwrap();
    let (_, file_a) = temp_device_file(&dir, "a", 8 * MIB);
    let (_, file_b) = temp_device_file(&dir, "b", 8 * MIB);
    let a = UringDevice::from_file(file_a, 8 * MIB, 512).unwrap();
    let b = Arc::new(UringDevice::from_file(file_b, 8 * MIB, 512).unwrap());
    let s = seed("uring_reads_on_callers_rings_follow_each_device");
    let blocks = 8 * MIB / BS;
    let data_a = pattern(s, (8 * MIB) as usize);
    let data_b = pattern(s ^ 1, (8 * MIB) as usize);
    a.write_at(0, &data_a).unwrap();
    b.write_at(0, &data_b).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(s);
    for r in 0..400 {
        let block = rng.gen_range(0..blocks);
        let at = (block * BS) as usize;
        let from_b = read(&*b, block * BS, BS as usize);
        assert_eq!(
            &from_b[..],
            &data_b[at..at + BS as usize],
            "b, read {r} (seed {s})"
        );
        let from_a = read(&a, block * BS, BS as usize);
        assert_eq!(
            &from_a[..],
            &data_a[at..at + BS as usize],
            "a, read {r} (seed {s})"
        );
    }
    drop(a);
    for t in 0..8u64 {
        let b = Arc::clone(&b);
        let data_b = data_b.clone();
        std::thread::spawn(move || {
            let mut rng = ChaCha8Rng::seed_from_u64(s ^ t);
            // Up to 16 ops run on the thread's ring; more go to the I/O thread.
            for n in [1usize, 3, 16, 17] {
                let picks: Vec<u64> = (0..n).map(|_| rng.gen_range(0..blocks)).collect();
                let mut back: Vec<AlignedBuf> =
                    (0..n).map(|_| AlignedBuf::new(BS as usize)).collect();
                let mut ops: Vec<IoOp> = back
                    .iter_mut()
                    .zip(&picks)
                    .map(|(buf, &block)| IoOp::Read {
                        offset: block * BS,
                        buf,
                    })
                    .collect();
                b.submit(&mut ops).unwrap();
                drop(ops);
                for (buf, &block) in back.iter().zip(&picks) {
                    let at = (block * BS) as usize;
                    assert_eq!(
                        &buf[..],
                        &data_b[at..at + BS as usize],
                        "thread {t}, {n} ops (seed {s})"
                    );
                }
            }
        })
        .join()
        .expect("reader thread");
    }
    let stats = b.stats();
    assert_eq!(stats.reads, 400 + 8 * (1 + 3 + 16 + 17));
}

#[test]
fn loop_device_keeps_the_contract_with_both_backends() {
    require_root("attach a loop device");
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    create_sparse_file(&backing, 64 * MIB).unwrap();
    let lo = LoopDevice::attach(&backing, &[]);
    let s = seed("loop_device_keeps_the_contract_with_both_backends");
    let marker = pattern(s ^ 0xdead, BLOCK_SIZE);
    let reopen_guard;
    {
        let dev = open_with(&lo.path, Backend::Pread);
        assert_eq!(dev.backend(), "pread");
        assert_eq!(dev.size_bytes(), 64 * MIB);
        assert_eq!(dev.logical_block_size(), 512);
        // O_EXCL: a second opener of the same block device is refused.
        match open_device(
            &lo.path,
            &OpenOptions {
                backend: Backend::Pread,
                create_size_bytes: None,
            },
        ) {
            Err(Error::Busy(msg)) => assert!(msg.contains("in use"), "{msg}"),
            Err(e) => panic!("expected Busy, got {e}"),
            Ok(_) => panic!("expected Busy, the device opened twice"),
        }
        check_contract(&*dev, s);
        dev.write_at(60 * MIB, &marker).unwrap();
        dev.flush().unwrap();
        // No child may be forked (holding a copy of this exclusive open)
        // between this close and the reopen below.
        reopen_guard = FILE_TABLE.write().unwrap_or_else(|e| e.into_inner());
    }
    let dev = open_with(&lo.path, Backend::IoUring);
    drop(reopen_guard);
    assert_eq!(dev.backend(), "io_uring");
    assert_eq!(
        &read(&*dev, 60 * MIB, BLOCK_SIZE)[..],
        &marker[..],
        "pread's write seen by io_uring"
    );
    check_contract(&*dev, s ^ 7);
    // Dropping an io_uring device releases the exclusive open at once, so the
    // device can be reopened straight away (unmount, then mount again).
    let _no_children = FILE_TABLE.write().unwrap_or_else(|e| e.into_inner());
    drop(dev);
    for round in 0..20 {
        let opts = OpenOptions {
            backend: Backend::IoUring,
            create_size_bytes: None,
        };
        let dev = open_device(&lo.path, &opts)
            .unwrap_or_else(|e| panic!("reopen {round} right after close: {e}"));
        assert_eq!(&read(&*dev, 60 * MIB, BLOCK_SIZE)[..], &marker[..]);
    }
}

#[test]
fn loop_device_with_4k_sectors_reports_its_block_size() {
    require_root("attach a loop device");
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    create_sparse_file(&backing, 32 * MIB).unwrap();
    let lo = LoopDevice::attach(&backing, &["--sector-size", "4096"]);
    let dev = open_with(&lo.path, Backend::IoUring);
    assert_eq!(dev.logical_block_size(), 4096);
    let data = pattern(
        seed("loop_device_with_4k_sectors_reports_its_block_size"),
        64 * 1024,
    );
    dev.write_at(MIB, &data).unwrap();
    dev.flush().unwrap();
    assert_eq!(&read(&*dev, MIB, data.len())[..], &data[..]);
}

// ------------------------------------------------------------ FaultyDevice

#[test]
fn faulty_device_keeps_the_contract_when_no_fault_is_set() {
    let dev = FaultyDevice::new(32 * MIB, FaultConfig::default());
    assert_eq!(dev.backend(), "faulty");
    check_contract(
        &dev,
        seed("faulty_device_keeps_the_contract_when_no_fault_is_set"),
    );
}

#[test]
fn crash_image_keeps_flushed_data() {
    let s = seed("crash_image_keeps_flushed_data");
    for seed in s..s + 32 {
        let dev = FaultyDevice::new(
            MIB,
            FaultConfig {
                seed,
                tear_writes: true,
                ..Default::default()
            },
        );
        let durable = pattern(seed, 16 * BLOCK_SIZE);
        dev.write_at(0, &durable).unwrap();
        dev.flush().unwrap();
        dev.write_at(64 * BS, &pattern(seed ^ 1, 8 * BLOCK_SIZE))
            .unwrap(); // never flushed
        let image = dev.crash_image();
        assert_eq!(
            &read(&image, 0, durable.len())[..],
            &durable[..],
            "seed {seed}"
        );
    }
}

/// Writes 16 unflushed 4 KiB blocks (each sector distinct) and classifies what the
/// crash image kept of each: (dropped, whole, torn).
fn crash_outcomes(seed: u64, tear_writes: bool) -> ((u32, u32, u32), Vec<u8>) {
    let dev = FaultyDevice::new(
        MIB,
        FaultConfig {
            seed,
            tear_writes,
            ..Default::default()
        },
    );
    let blocks: Vec<AlignedBuf> = (0..16)
        .map(|i| pattern(seed ^ (i + 1), BLOCK_SIZE))
        .collect();
    for (i, b) in blocks.iter().enumerate() {
        dev.write_at(i as u64 * BS, b).unwrap();
    }
    let image = dev.crash_image();
    assert_eq!(
        image.snapshot(),
        dev.crash_image().snapshot(),
        "crash_image is repeatable"
    );
    let mut outcome = (0, 0, 0);
    for (i, b) in blocks.iter().enumerate() {
        let got = read(&image, i as u64 * BS, BLOCK_SIZE);
        let mut new = 0;
        for (sector, (g, w)) in got.chunks(512).zip(b.chunks(512)).enumerate() {
            if g == w {
                new += 1;
            } else {
                assert!(
                    g.iter().all(|&x| x == 0),
                    "block {i} sector {sector} is neither old nor new"
                );
            }
        }
        match new {
            0 => outcome.0 += 1,
            8 => outcome.1 += 1,
            _ => outcome.2 += 1,
        }
    }
    (outcome, image.snapshot())
}

#[test]
fn crash_image_drops_or_tears_unflushed_writes_deterministically() {
    let s = seed("crash_image_drops_or_tears_unflushed_writes_deterministically");
    let mut total = (0, 0, 0);
    for seed in s..s + 16 {
        let (outcome, image) = crash_outcomes(seed, true);
        let (again, image_again) = crash_outcomes(seed, true);
        assert_eq!(outcome, again, "seed {seed}");
        assert!(
            image == image_again,
            "same seed, same ops, different crash image (seed {seed})"
        );
        total = (
            total.0 + outcome.0,
            total.1 + outcome.1,
            total.2 + outcome.2,
        );
        let (untorn, _) = crash_outcomes(seed, false);
        assert_eq!(untorn.2, 0, "tear_writes off must not tear (seed {seed})");
    }
    assert!(
        total.0 > 0 && total.1 > 0 && total.2 > 0,
        "all outcomes expected over 256 writes: {total:?}"
    );
    // Different seeds give different images.
    assert!(crash_outcomes(s, true).1 != crash_outcomes(s.wrapping_add(1000), true).1);
}

#[test]
fn fail_op_fails_exactly_that_op() {
    let dev = FaultyDevice::new(
        MIB,
        FaultConfig {
            fail_op: Some(3),
            ..Default::default()
        },
    );
    let a = pattern(1, BLOCK_SIZE);
    dev.write_at(0, &a).unwrap(); // op 1
    dev.flush().unwrap(); // op 2
    assert_eq!(errno(dev.write_at(BS, &a)), libc::EIO); // op 3: fails, writes nothing
    assert_eq!(dev.ops(), 3);
    assert!(!dev.is_crashed());
    assert!(
        read(&dev, BS, BLOCK_SIZE).iter().all(|&b| b == 0),
        "failed write must not land"
    ); // op 4
    let mut back = AlignedBuf::new(BLOCK_SIZE);
    let mut ops = [
        IoOp::Write {
            offset: 2 * BS,
            buf: &a,
        },
        IoOp::Read {
            offset: 0,
            buf: &mut back,
        },
    ];
    dev.submit(&mut ops).unwrap(); // ops 5 and 6
    assert_eq!(&back[..], &a[..]);
    assert_eq!(dev.ops(), 6);
}

#[test]
fn crash_after_ops_powers_the_device_off() {
    let dev = FaultyDevice::new(
        MIB,
        FaultConfig {
            crash_after_ops: Some(4),
            ..Default::default()
        },
    );
    let a = pattern(2, BLOCK_SIZE);
    let b = pattern(3, BLOCK_SIZE);
    dev.write_at(0, &a).unwrap(); // 1
    dev.flush().unwrap(); // 2
    let mut ops = [
        IoOp::Write {
            offset: BS,
            buf: &b,
        },
        IoOp::Write {
            offset: 2 * BS,
            buf: &b,
        },
    ];
    dev.submit(&mut ops).unwrap(); // 3, 4
    assert!(!dev.is_crashed());
    let mut ops = [IoOp::Write {
        offset: 3 * BS,
        buf: &b,
    }];
    assert_eq!(errno(dev.submit(&mut ops)), libc::EIO); // 5: power off
    assert!(dev.is_crashed());
    let mut buf = AlignedBuf::new(BLOCK_SIZE);
    assert_eq!(errno(dev.read_at(0, &mut buf)), libc::EIO);
    assert_eq!(errno(dev.flush()), libc::EIO);
    dev.set_crash_after_ops(None);
    assert_eq!(
        errno(dev.write_at(0, &b)),
        libc::EIO,
        "a crashed device stays off"
    );
    assert_eq!(dev.ops(), 8);
    // What survives: the flushed write always, never the refused one.
    let image = dev.crash_image();
    assert_eq!(&read(&image, 0, BLOCK_SIZE)[..], &a[..]);
    assert!(read(&image, 3 * BS, BLOCK_SIZE).iter().all(|&x| x == 0));
    // The image boots a fresh device.
    let reborn = FaultyDevice::from_image(image, FaultConfig::default());
    assert_eq!(&read(&reborn, 0, BLOCK_SIZE)[..], &a[..]);
    // Some(0): the very first op already fails.
    let dead = FaultyDevice::new(
        MIB,
        FaultConfig {
            crash_after_ops: Some(0),
            ..Default::default()
        },
    );
    assert_eq!(errno(dead.flush()), libc::EIO);
}

#[test]
fn misdirected_write_lands_elsewhere() {
    let s = seed("misdirected_write_lands_elsewhere");
    let size = MIB;
    let dev = FaultyDevice::new(
        size,
        FaultConfig {
            seed: s,
            misdirect_probability: 1.0,
            ..Default::default()
        },
    );
    let data = pattern(s, 2 * BLOCK_SIZE);
    let target = 100 * BS;
    dev.write_at(target, &data).unwrap(); // reported as success
    let all = read(&dev, 0, size as usize);
    assert!(
        all[target as usize..target as usize + data.len()]
            .iter()
            .all(|&b| b == 0),
        "seed {s}"
    );
    let landed = (0..size as usize - data.len())
        .step_by(BLOCK_SIZE)
        .find(|&o| all[o..o + data.len()] == data[..])
        .unwrap_or_else(|| panic!("misdirected data not found anywhere (seed {s})"));
    assert_ne!(landed as u64, target);
}

#[test]
fn bitflip_on_read_flips_one_bit_and_keeps_the_stored_data() {
    let s = seed("bitflip_on_read_flips_one_bit_and_keeps_the_stored_data");
    let dev = FaultyDevice::new(
        MIB,
        FaultConfig {
            seed: s,
            bitflip_on_read_probability: 1.0,
            ..Default::default()
        },
    );
    let data = pattern(s, 4 * BLOCK_SIZE);
    dev.write_at(0, &data).unwrap();
    dev.flush().unwrap();
    for _ in 0..10 {
        let got = read(&dev, 0, data.len());
        let flipped: u32 = got
            .iter()
            .zip(data.iter())
            .map(|(g, d)| (g ^ d).count_ones())
            .sum();
        assert_eq!(flipped, 1, "seed {s}");
    }
    let clean = FaultyDevice::from_image(dev.crash_image(), FaultConfig::default());
    assert_eq!(
        &read(&clean, 0, data.len())[..],
        &data[..],
        "storage must stay intact"
    );
}

#[test]
fn corrupt_is_seen_by_reads_and_survives_a_crash() {
    let dev = FaultyDevice::new(MIB, FaultConfig::default());
    let data = pattern(9, BLOCK_SIZE);
    dev.write_at(8 * BS, &data).unwrap();
    dev.flush().unwrap();
    dev.corrupt(8 * BS + 10, 0x81);
    let got = read(&dev, 8 * BS, BLOCK_SIZE);
    assert_eq!(got[10], data[10] ^ 0x81);
    assert_eq!(&got[..10], &data[..10]);
    assert_eq!(&got[11..], &data[11..]);
    assert_eq!(
        read(&dev.crash_image(), 8 * BS, BLOCK_SIZE)[10],
        data[10] ^ 0x81
    );
}

// ---------------------------------------------- open_device and signatures

#[test]
fn detect_signature_finds_ext4_and_nothing_on_a_zeroed_device() {
    let zeroed = MemDevice::new(64 * MIB);
    assert_eq!(detect_signature(&zeroed).unwrap(), None);
    let tiny = MemDevice::new(BS);
    assert_eq!(detect_signature(&tiny).unwrap(), None);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ext4.img");
    create_sparse_file(&path, 64 * MIB).unwrap();
    let dev = open_with(&path, Backend::Pread);
    assert_eq!(
        detect_signature(&*dev).unwrap(),
        None,
        "a fresh sparse file has no signature"
    );
    drop(dev);
    let status = match run_program(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&path)) {
        Ok(out) => out.status,
        Err(e) => {
            eprintln!("SKIPPED the ext4 half of this test: mkfs.ext4 cannot run ({e})");
            return;
        }
    };
    assert!(status.success(), "mkfs.ext4 failed: {status}");
    let dev = open_with(&path, Backend::IoUring);
    assert_eq!(detect_signature(&*dev).unwrap().as_deref(), Some("ext4"));
}

/// Serialises the tests that use `Backend::Auto`, which reads `LCFS_IO_BACKEND`.
static ENVIRONMENT: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn lcfs_io_backend_env_overrides_auto() {
    let _env = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev");
    let auto = OpenOptions {
        backend: Backend::Auto,
        create_size_bytes: Some(16 * MIB),
    };
    std::env::remove_var("LCFS_IO_BACKEND");
    assert_eq!(
        open_device(&path, &auto).unwrap().backend(),
        "io_uring",
        "io_uring is enabled here"
    );
    std::env::set_var("LCFS_IO_BACKEND", "pread");
    assert_eq!(open_device(&path, &auto).unwrap().backend(), "pread");
    // An explicit backend wins over the environment.
    assert_eq!(open_with(&path, Backend::IoUring).backend(), "io_uring");
    std::env::set_var("LCFS_IO_BACKEND", "io_uring");
    assert_eq!(open_device(&path, &auto).unwrap().backend(), "io_uring");
    std::env::set_var("LCFS_IO_BACKEND", "bogus");
    assert!(matches!(open_device(&path, &auto), Err(Error::Invalid(_))));
    std::env::remove_var("LCFS_IO_BACKEND");
}

#[test]
fn open_device_refuses_what_is_not_a_device() {
    let dir = tempfile::tempdir().unwrap();
    let opts = OpenOptions {
        backend: Backend::Pread,
        create_size_bytes: None,
    };
    assert!(
        matches!(open_device(dir.path(), &opts), Err(Error::Invalid(_))),
        "directory"
    );
    assert!(
        matches!(
            open_device(Path::new("/dev/null"), &opts),
            Err(Error::Invalid(_))
        ),
        "char device"
    );
    let empty = dir.path().join("empty");
    File::create(&empty).unwrap();
    assert!(
        matches!(open_device(&empty, &opts), Err(Error::Invalid(_))),
        "zero-size file"
    );
    let small = dir.path().join("small");
    std::fs::write(&small, [1u8; 1000]).unwrap();
    assert!(
        matches!(open_device(&small, &opts), Err(Error::Invalid(_))),
        "smaller than a block"
    );
    let missing = dir.path().join("missing");
    assert_eq!(errno(open_device(&missing, &opts)), libc::ENOENT);

    // create_size_bytes creates a sparse file, rounded down to 4096 in use.
    let created = dir.path().join("created");
    let opts = OpenOptions {
        backend: Backend::Pread,
        create_size_bytes: Some(10 * MIB + 100),
    };
    let dev = open_device(&created, &opts).unwrap();
    assert_eq!(dev.size_bytes(), 10 * MIB);
    assert_eq!(std::fs::metadata(&created).unwrap().len(), 10 * MIB + 100);
}

#[test]
fn create_sparse_file_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, b"data").unwrap();
    assert!(matches!(create_sparse_file(&path, MIB), Err(Error::Exists)));
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
    let empty = dir.path().join("empty");
    File::create(&empty).unwrap();
    create_sparse_file(&empty, MIB).unwrap();
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), MIB);
    assert!(matches!(
        create_sparse_file(dir.path(), MIB),
        Err(Error::Invalid(_))
    ));
    let fresh = dir.path().join("fresh");
    create_sparse_file(&fresh, 1 << 30).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        std::fs::metadata(&fresh).unwrap().blocks() < 64,
        "the file must be sparse"
    );
}

/// Makes io_uring_setup fail with ENOSYS in the calling thread and the threads it
/// starts, as Docker's default seccomp profile does.
fn block_io_uring_in_this_thread() {
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    let nr = libc::SYS_io_uring_setup as u32;
    let filter = [
        // A = seccomp_data.nr; if A == io_uring_setup return ENOSYS else allow.
        libc::sock_filter {
            code: 0x20,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: 0x15,
            jt: 0,
            jf: 1,
            k: nr,
        },
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
        libc::sock_filter {
            code: 0x06,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: plain prctl calls; `program` points at `filter`, both live across the
    // call, and the kernel copies the filter. Without SECCOMP_FILTER_FLAG_TSYNC the
    // filter binds only this thread (and threads it spawns later).
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog
            ),
            0,
            "install seccomp filter: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn auto_falls_back_to_pread_where_io_uring_is_blocked() {
    let _env = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
    std::env::remove_var("LCFS_IO_BACKEND");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev");
    create_sparse_file(&path, 16 * MIB).unwrap();
    // A thread of its own, so the filter never reaches other tests.
    let path_in_thread = path.clone();
    std::thread::spawn(move || {
        block_io_uring_in_this_thread();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path_in_thread)
            .unwrap();
        let err = UringDevice::from_file(file, 16 * MIB, 512)
            .err()
            .expect("io_uring must be refused");
        assert_eq!(err.errno(), libc::ENOSYS, "{err}");
        let explicit = OpenOptions {
            backend: Backend::IoUring,
            create_size_bytes: None,
        };
        assert!(
            open_device(&path_in_thread, &explicit).is_err(),
            "explicit io_uring does not fall back"
        );
        let dev = open_device(&path_in_thread, &OpenOptions::default()).expect("Auto falls back");
        assert_eq!(dev.backend(), "pread");
        let data = pattern(5, BLOCK_SIZE);
        dev.write_at(0, &data).unwrap();
        assert_eq!(&read(&*dev, 0, BLOCK_SIZE)[..], &data[..]);
    })
    .join()
    .expect("the seccomp-restricted thread failed");
}
