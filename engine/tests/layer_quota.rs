//! A layer's size limit: writes that would take the layer past it fail
//! with ENOSPC before they change anything, the engine goes on, overwriting
//! what the layer owns still works, deleting files gives the room back, the
//! limit survives a reopen, and a limit below what the layer holds is
//! refused.

use lcfs_engine::device::{Device, MemDevice};
use lcfs_engine::*;
use std::sync::Arc;

fn quiet() -> Config {
    Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..Config::default()
    }
}

const MIB: usize = 1 << 20;

#[test]
fn writes_stop_at_the_limit_and_room_comes_back() {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(128 << 20));
    Engine::format(dev.clone(), &FormatOptions::default()).unwrap();
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    e.create_layer("image", false).unwrap();
    let image = e.layer_id("image").unwrap();
    let shared = e.create(image, ROOT_INODE, b"shared", 0o644, 0, 0).unwrap();
    e.write(image, shared.inode, 0, &vec![1u8; 2 * MIB])
        .unwrap();
    let c = e.clone_layer("image", "container").unwrap();
    e.set_layer_quota("container", Some(4 * MIB as u64))
        .unwrap();
    assert_eq!(
        e.layer_info("container").unwrap().quota_bytes,
        Some(4 << 20)
    );
    assert_eq!(e.layer_info("image").unwrap().quota_bytes, None);

    let f = e.create(c, ROOT_INODE, b"f", 0o644, 0, 0).unwrap();
    e.write(c, f.inode, 0, &vec![2u8; 3 * MIB]).unwrap();
    // 3 MiB owned (and a few tree nodes): 1 MiB more does not fit.
    let err = e
        .write(c, f.inode, 3 * MIB as u64, &vec![3u8; MIB])
        .unwrap_err();
    assert!(matches!(err, Error::QuotaExceeded { limit_bytes } if limit_bytes == 4 << 20));
    assert_eq!(err.errno(), libc::ENOSPC);
    assert_eq!(e.stats().read_only_reason, None, "the engine goes on");
    assert_eq!(
        e.getattr(c, f.inode).unwrap().size,
        3 * MIB as u64,
        "nothing written"
    );
    // Overwriting blocks the layer owns adds nothing.
    e.write(c, f.inode, 0, &vec![4u8; MIB]).unwrap();
    // Copying up the image's file would add 2 MiB: refused too.
    let err = e
        .write(c, shared.inode, 0, &vec![5u8; 2 * MIB])
        .unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC);
    assert_eq!(e.read(c, shared.inode, 0, 16).unwrap(), vec![1u8; 16]);
    // fallocate checks the limit as well.
    let g = e.create(c, ROOT_INODE, b"g", 0o644, 0, 0).unwrap();
    let err = e.fallocate(c, g.inode, 0, 0, 2 * MIB as u64).unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC);

    // Deleting a file gives its room back.
    e.unlink(c, ROOT_INODE, b"f").unwrap();
    e.write(c, g.inode, 0, &vec![6u8; 3 * MIB]).unwrap();
    // A limit below what the layer holds is refused; a higher one is fine.
    assert!(matches!(
        e.set_layer_quota("container", Some(MIB as u64)),
        Err(Error::Invalid(_))
    ));
    e.set_layer_quota("container", Some(8 * MIB as u64))
        .unwrap();
    e.write(c, g.inode, 3 * MIB as u64, &vec![7u8; 2 * MIB])
        .unwrap();

    // The limit is part of the layer record: it survives a reopen.
    e.close().unwrap();
    drop(e);
    let e = Engine::open(dev, quiet()).unwrap();
    assert_eq!(
        e.layer_info("container").unwrap().quota_bytes,
        Some(8 << 20)
    );
    let c = e.layer_id("container").unwrap();
    let g = e.lookup(c, ROOT_INODE, b"g").unwrap();
    let err = e
        .write(c, g.inode, 5 * MIB as u64, &vec![8u8; 4 * MIB])
        .unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC);
    // No limit: anything that fits the device.
    e.set_layer_quota("container", None).unwrap();
    e.write(c, g.inode, 5 * MIB as u64, &vec![8u8; 4 * MIB])
        .unwrap();
    assert!(e.fsck(true).unwrap().is_clean());
}
