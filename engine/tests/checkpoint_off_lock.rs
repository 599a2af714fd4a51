//! Device I/O without the store lock: while a sync waits on a slow flush,
//! or the cleaner on a slow read of its victim segment, other layers are
//! read, written and looked up; the sync still makes exactly what it covered
//! durable, and the cleaner still moves every live block.

use lcfs_engine::device::{Device, DeviceStats, IoOp, MemDevice};
use lcfs_engine::*;
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
}

impl GatedFlush {
    fn new(inner: Arc<MemDevice>, gate_reads_from: usize) -> GatedFlush {
        GatedFlush {
            inner,
            gate: Mutex::new((false, 0)),
            cv: Condvar::new(),
            gate_reads_from,
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
        self.pass(buf.len() >= self.gate_reads_from);
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.inner.write_at(offset, buf)
    }
    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<()> {
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
    const SEGMENT: u64 = 1 << 20;
    let mem = Arc::new(MemDevice::new(128 << 20));
    Engine::format(
        mem.clone(),
        &FormatOptions {
            segment_size_bytes: SEGMENT,
            ..FormatOptions::default()
        },
    )
    .unwrap();
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
