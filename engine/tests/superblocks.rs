//! Superblock slots: opening falls back to the second slot when the first
//! cannot be read, and format refuses a device that holds an lcfs it cannot
//! open (corrupt or unreadable superblocks) unless forced.

use lcfs_engine::device::{AlignedBuf, Device, DeviceStats, IoOp, MemDevice, BLOCK_SIZE};
use lcfs_engine::*;
use std::sync::Arc;

fn quiet() -> Config {
    Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..Config::default()
    }
}

fn opts(force: bool) -> FormatOptions {
    FormatOptions {
        force,
        ..FormatOptions::default()
    }
}

/// A device whose reads of one block range fail with EIO, as a bad sector does.
struct BadSectors {
    inner: Arc<MemDevice>,
    bad: std::ops::Range<u64>,
}

impl BadSectors {
    fn check(&self, offset: u64, len: usize) -> Result<()> {
        let end = offset + len as u64;
        if offset < self.bad.end && self.bad.start < end {
            return Err(Error::Io(std::io::Error::from_raw_os_error(libc::EIO)));
        }
        Ok(())
    }
}

impl Device for BadSectors {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn logical_block_size(&self) -> u32 {
        self.inner.logical_block_size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.inner.write_at(offset, buf)
    }
    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<()> {
        for op in ops.iter() {
            if let IoOp::Read { offset, buf } = op {
                self.check(*offset, buf.len())?;
            }
        }
        self.inner.submit(ops)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn backend(&self) -> &'static str {
        "bad-sectors"
    }
    fn stats(&self) -> DeviceStats {
        self.inner.stats()
    }
}

/// A formatted device holding one layer with one file, checkpointed.
fn populated() -> Arc<MemDevice> {
    let mem = Arc::new(MemDevice::new(64 << 20));
    Engine::format(mem.clone(), &opts(false)).unwrap();
    let e = Engine::open(mem.clone(), quiet()).unwrap();
    let l = e.create_layer("base", true).unwrap();
    let f = e.create(l, ROOT_INODE, b"kept", 0o644, 0, 0).unwrap();
    e.write(l, f.inode, 0, b"survives a bad superblock")
        .unwrap();
    e.sync().unwrap();
    e.close().unwrap();
    mem
}

#[test]
fn open_uses_the_second_slot_when_the_first_cannot_be_read() {
    let mem = populated();
    let slot0 = 0..BLOCK_SIZE as u64;
    let dev = Arc::new(BadSectors {
        inner: mem.clone(),
        bad: slot0,
    });
    // Before the fix the read error of slot 0 aborted the open.
    let e = Engine::open(dev.clone(), quiet()).expect("slot 1 holds a valid checkpoint");
    let l = e.layer_id("base").unwrap();
    let f = e.lookup(l, ROOT_INODE, b"kept").unwrap();
    assert_eq!(
        e.read(l, f.inode, 0, 100).unwrap(),
        b"survives a bad superblock"
    );
    e.close().unwrap();

    // Both slots unreadable: an lcfs that cannot be opened, never "blank".
    let dev = Arc::new(BadSectors {
        inner: mem,
        bad: 0..2 * BLOCK_SIZE as u64,
    });
    match Engine::open(dev.clone(), quiet()) {
        Err(Error::Unopenable(why)) => assert!(why.contains("unreadable"), "{why}"),
        other => panic!("expected Unopenable, got {:?}", other.map(|_| ())),
    }
    // Format refuses too: the signature scan cannot read the device start.
    match Engine::format(dev, &opts(false)) {
        Err(Error::Signature(s)) => assert!(s.starts_with("lcfs"), "{s}"),
        Err(Error::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EIO)),
        other => panic!("format must refuse, got {other:?}"),
    }
}

#[test]
fn format_refuses_an_lcfs_whose_superblocks_are_corrupt_unless_forced() {
    let mem = populated();
    // Flip one byte inside each superblock's checksummed body.
    for slot in 0..2u64 {
        let mut b = AlignedBuf::new(BLOCK_SIZE);
        mem.read_at(slot * BLOCK_SIZE as u64, &mut b).unwrap();
        b[64] ^= 0xff;
        mem.write_at(slot * BLOCK_SIZE as u64, &b).unwrap();
    }
    assert!(matches!(
        Engine::open(mem.clone(), quiet()),
        Err(Error::Unopenable(_))
    ));
    // Before the fix format logged "unreadable" and went ahead.
    match Engine::format(mem.clone(), &opts(false)) {
        Err(Error::Signature(s)) => {
            assert!(s.starts_with("lcfs that cannot be opened"), "{s}")
        }
        other => panic!("format must refuse, got {other:?}"),
    }
    Engine::format(mem.clone(), &opts(true)).unwrap();
    let e = Engine::open(mem, quiet()).unwrap();
    assert!(e.list_layers().is_empty());
    e.close().unwrap();

    // A blank device still formats without force.
    let blank = Arc::new(MemDevice::new(64 << 20));
    Engine::format(blank, &opts(false)).unwrap();
}
