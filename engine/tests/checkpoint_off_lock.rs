//! Device I/O without the store lock: while a sync waits on a slow flush,
//! the cleaner on a slow read of its victim segment, or an online fsck on
//! its reads, other layers are read, written and looked up; the sync still
//! makes exactly what it covered durable, the cleaner still moves every live
//! block, and the fsck (which checks a checkpoint while the engine goes on)
//! finds no problem that is not there, however much changes meanwhile.

use lcfs_engine::device::{Device, DeviceStats, IoOp, MemDevice};
use lcfs_engine::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

fn quiet() -> Config {
    Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..Config::default()
    }
}

/// A device whose flushes (or reads of at least `gate_reads_from` bytes)
/// wait while the gate is closed.
struct GatedFlush {
    inner: Arc<MemDevice>,
    /// (closed, calls waiting)
    gate: Mutex<(bool, u32)>,
    cv: Condvar,
    gate_reads_from: usize,
    /// Only reads by the thread of this name, after its first `.1` reads.
    only: Option<(&'static str, usize)>,
    reads: AtomicUsize,
}

impl GatedFlush {
    fn new(inner: Arc<MemDevice>, gate_reads_from: usize) -> GatedFlush {
        GatedFlush {
            inner,
            gate: Mutex::new((false, 0)),
            cv: Condvar::new(),
            gate_reads_from,
            only: None,
            reads: AtomicUsize::new(0),
        }
    }
    /// Gates the reads of one thread only, once it has made `after` reads.
    fn reads_of_thread(inner: Arc<MemDevice>, name: &'static str, after: usize) -> GatedFlush {
        GatedFlush {
            only: Some((name, after)),
            ..GatedFlush::new(inner, 0)
        }
    }
    fn gates_read(&self, len: usize) -> bool {
        match self.only {
            Some((name, after)) => {
                std::thread::current().name() == Some(name)
                    && self.reads.fetch_add(1, Ordering::SeqCst) >= after
            }
            None => len >= self.gate_reads_from,
        }
    }
    fn pass(&self, gated: bool) {
        let mut g = self.gate.lock().unwrap();
        if gated && g.0 {
            g.1 += 1;
            self.cv.notify_all();
            while g.0 {
                g = self.cv.wait(g).unwrap();
            }
            g.1 -= 1;
        }
    }
    fn set_closed(&self, closed: bool) {
        self.gate.lock().unwrap().0 = closed;
        self.cv.notify_all();
    }
    fn wait_for_a_blocked_flush(&self) {
        let mut g = self.gate.lock().unwrap();
        while g.1 == 0 {
            g = self.cv.wait(g).unwrap();
        }
    }
}

impl Device for GatedFlush {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn logical_block_size(&self) -> u32 {
        self.inner.logical_block_size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.pass(self.gates_read(buf.len()));
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.inner.write_at(offset, buf)
    }
    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<()> {
        if self.only.is_some() && ops.iter().any(|o| matches!(o, IoOp::Read { .. })) {
            self.pass(self.gates_read(0));
        }
        self.inner.submit(ops)
    }
    fn flush(&self) -> Result<()> {
        self.pass(self.gate_reads_from == usize::MAX);
        self.inner.flush()
    }
    fn backend(&self) -> &'static str {
        "gated"
    }
    fn stats(&self) -> DeviceStats {
        self.inner.stats()
    }
}

const SEGMENT: u64 = 1 << 20;

/// A memory device of `bytes`, formatted with SEGMENT-byte segments.
fn formatted(bytes: u64) -> Arc<MemDevice> {
    let mem = Arc::new(MemDevice::new(bytes));
    Engine::format(
        mem.clone(),
        &FormatOptions {
            segment_size_bytes: SEGMENT,
            ..FormatOptions::default()
        },
    )
    .unwrap();
    mem
}

#[test]
fn changes_and_reads_go_on_while_a_checkpoint_flushes() {
    let mem = Arc::new(MemDevice::new(128 << 20));
    Engine::format(mem.clone(), &FormatOptions::default()).unwrap();
    let dev = Arc::new(GatedFlush::new(mem.clone(), usize::MAX));
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    let a = e.create_layer("a", false).unwrap();
    let b = e.create_layer("b", false).unwrap();
    let fa = e.create(a, ROOT_INODE, b"synced", 0o644, 0, 0).unwrap();
    e.write(a, fa.inode, 0, &[7u8; 100_000]).unwrap();
    let fb = e.create(b, ROOT_INODE, b"other", 0o644, 0, 0).unwrap();
    e.write(b, fb.inode, 0, b"before").unwrap();

    dev.set_closed(true);
    let syncer = {
        let e = e.clone();
        std::thread::spawn(move || e.sync())
    };
    dev.wait_for_a_blocked_flush();

    // The checkpoint is now inside its flush. Before checkpoints ran their
    // device I/O outside the store lock, every call below waited for it.
    let (tx, rx) = mpsc::channel();
    let worker = {
        let e = e.clone();
        std::thread::spawn(move || {
            let f = e.lookup(b, ROOT_INODE, b"other").unwrap();
            assert_eq!(e.read(b, f.inode, 0, 6).unwrap(), b"before");
            e.write(b, f.inode, 0, b"during").unwrap();
            let g = e.create(b, ROOT_INODE, b"new", 0o644, 0, 0).unwrap();
            e.write(b, g.inode, 0, &[9u8; 50_000]).unwrap();
            assert_eq!(e.getattr(a, fa.inode).unwrap().size, 100_000);
            tx.send(()).unwrap();
        })
    };
    let went_on = rx.recv_timeout(Duration::from_secs(30));
    dev.set_closed(false);
    worker.join().unwrap();
    syncer.join().unwrap().unwrap();
    assert!(
        went_on.is_ok(),
        "changes waited for the checkpoint's flush: device I/O under the store lock"
    );

    // What the sync covered is durable; what came during it is not yet.
    let image = Arc::new(MemDevice::from_bytes(mem.snapshot()));
    let r = Engine::open(image, quiet()).unwrap();
    let ra = r.layer_id("a").unwrap();
    let f = r.lookup(ra, ROOT_INODE, b"synced").unwrap();
    assert_eq!(r.read(ra, f.inode, 0, 100_000).unwrap(), vec![7u8; 100_000]);
    let rb = r.layer_id("b").unwrap();
    let f = r.lookup(rb, ROOT_INODE, b"other").unwrap();
    assert_eq!(r.read(rb, f.inode, 0, 6).unwrap(), b"before");
    assert!(r.fsck(true).unwrap().is_clean());
    drop(r);

    // A second sync makes the rest durable.
    e.sync().unwrap();
    let image = Arc::new(MemDevice::from_bytes(mem.snapshot()));
    let r = Engine::open(image, quiet()).unwrap();
    let rb = r.layer_id("b").unwrap();
    let f = r.lookup(rb, ROOT_INODE, b"other").unwrap();
    assert_eq!(r.read(rb, f.inode, 0, 6).unwrap(), b"during");
    let g = r.lookup(rb, ROOT_INODE, b"new").unwrap();
    assert_eq!(r.read(rb, g.inode, 0, 50_000).unwrap(), vec![9u8; 50_000]);
    assert!(r.fsck(true).unwrap().is_clean());
}

#[test]
fn changes_and_reads_go_on_while_the_cleaner_reads_a_victim() {
    let mem = formatted(128 << 20);
    // Only whole-segment reads wait: the cleaner's.
    let dev = Arc::new(GatedFlush::new(mem.clone(), SEGMENT as usize));
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    let a = e.create_layer("a", false).unwrap();
    let f = e.create(a, ROOT_INODE, b"churn", 0o644, 0, 0).unwrap();
    // Half of every segment dies: a file written twice over, every other
    // MiB rewritten.
    let mib = vec![3u8; SEGMENT as usize];
    for i in 0..16u64 {
        e.write(a, f.inode, i * SEGMENT, &mib).unwrap();
    }
    e.sync().unwrap();
    let newer = vec![4u8; 512 << 10];
    for i in 0..16u64 {
        e.write(a, f.inode, i * SEGMENT, &newer).unwrap();
    }
    e.sync().unwrap();
    let b = e.create_layer("b", false).unwrap();
    let g = e.create(b, ROOT_INODE, b"other", 0o644, 0, 0).unwrap();
    e.write(b, g.inode, 0, b"before").unwrap();

    dev.set_closed(true);
    let cleaner = {
        let e = e.clone();
        std::thread::spawn(move || e.clean(false, 4))
    };
    dev.wait_for_a_blocked_flush();
    let (tx, rx) = mpsc::channel();
    let worker = {
        let e = e.clone();
        std::thread::spawn(move || {
            assert_eq!(e.read(b, g.inode, 0, 6).unwrap(), b"before");
            e.write(b, g.inode, 0, b"during").unwrap();
            e.create(b, ROOT_INODE, b"new", 0o644, 0, 0).unwrap();
            tx.send(()).unwrap();
        })
    };
    let went_on = rx.recv_timeout(Duration::from_secs(30));
    dev.set_closed(false);
    worker.join().unwrap();
    let freed = cleaner.join().unwrap().unwrap();
    assert!(
        went_on.is_ok(),
        "changes waited for the cleaner's read: device I/O under the store lock"
    );
    assert!(freed > 0, "the cleaner freed nothing");
    assert!(e.stats().engine.blocks_relocated > 0);
    // Every byte is where it was.
    let data = e.read(a, f.inode, 0, (16 * SEGMENT) as usize).unwrap();
    for i in 0..16usize {
        let at = i * SEGMENT as usize;
        assert!(
            data[at..at + (512 << 10)].iter().all(|&x| x == 4),
            "MiB {i}"
        );
        assert!(data[at + (512 << 10)..at + SEGMENT as usize]
            .iter()
            .all(|&x| x == 3));
    }
    assert_eq!(e.read(b, g.inode, 0, 6).unwrap(), b"during");
    assert!(e.fsck(true).unwrap().is_clean());
}

/// An online fsck reads the checkpoint it checks without the store lock:
/// while it waits on a read, other layers are read, written, synced and
/// cleaned; segments the newer checkpoints free are not reused before the
/// fsck is done (it would read someone else's blocks in them and report
/// corruption that is not there), and are reusable after.
#[test]
fn changes_go_on_while_an_online_fsck_reads_and_it_sees_no_false_problems() {
    let mem = formatted(48 << 20);
    // The fsck thread's reads wait once it has opened the checkpoint.
    let dev = Arc::new(GatedFlush::reads_of_thread(mem.clone(), "fsck", 16));
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    let a = e.create_layer("a", false).unwrap();
    let f = e.create(a, ROOT_INODE, b"data", 0o644, 0, 0).unwrap();
    let first: Vec<u8> = (0..8 << 20).map(|i: u32| ((i * 7) >> 9) as u8).collect();
    e.write(a, f.inode, 0, &first).unwrap();
    e.sync().unwrap();

    dev.set_closed(true);
    let fsck = {
        let e = e.clone();
        std::thread::Builder::new()
            .name("fsck".into())
            .spawn(move || e.fsck(true))
            .unwrap()
    };
    dev.wait_for_a_blocked_flush();
    let (tx, rx) = mpsc::channel();
    let worker = {
        let e = e.clone();
        std::thread::spawn(move || {
            // Every block of the checked checkpoint's file dies, twice over,
            // and the cleaner frees what it can.
            for round in 1..=2u8 {
                e.write(a, f.inode, 0, &vec![round; 8 << 20]).unwrap();
                e.sync().unwrap();
                e.clean(true, 64).unwrap();
                e.sync().unwrap();
            }
            let g = e.create(a, ROOT_INODE, b"during", 0o644, 0, 0).unwrap();
            assert_eq!(e.getattr(a, g.inode).unwrap().size, 0);
            tx.send(()).unwrap();
        })
    };
    let went_on = rx.recv_timeout(Duration::from_secs(60));
    dev.set_closed(false);
    worker.join().unwrap();
    let report = fsck.join().unwrap().unwrap();
    assert!(
        went_on.is_ok(),
        "changes waited for the online fsck: device I/O under the store lock"
    );
    assert!(report.is_clean(), "{:?}", report.errors);
    assert!(report.data_blocks_verified >= 2048);
    // The held segments are reusable now: the device takes the churn again.
    for round in 3..=8u8 {
        e.write(a, f.inode, 0, &vec![round; 8 << 20]).unwrap();
        e.sync().unwrap();
    }
    assert_eq!(e.read(a, f.inode, 0, 8 << 20).unwrap(), vec![8u8; 8 << 20]);
    assert!(e.fsck(true).unwrap().is_clean());
}
