//! Layers and files through the engine API on an in-memory device: create,
//! clone, commit, remove; file operations; persistence across reopen; fsck.

use lcfs_engine::*;

mod common;
use common::{assert_clean, fresh, quiet};

#[test]
fn files_dirs_links_and_reopen() {
    let (dev, e) = fresh(64 << 20);
    let l = e.create_layer("base", true).unwrap();
    let d = e.mkdir(l, ROOT_INODE, b"etc", 0o755, 0, 0).unwrap();
    let f = e.create(l, d.inode, b"hosts", 0o644, 1, 2).unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(e.write(l, f.inode, 10, &data).unwrap(), data.len());
    assert_eq!(e.read(l, f.inode, 10, data.len()).unwrap(), data);
    assert_eq!(e.read(l, f.inode, 0, 10).unwrap(), vec![0u8; 10]);
    e.link(l, f.inode, ROOT_INODE, b"hosts-link").unwrap();
    assert_eq!(e.getattr(l, f.inode).unwrap().nlink, 2);
    e.symlink(l, ROOT_INODE, b"sl", b"/etc/hosts", 0, 0)
        .unwrap();
    e.setxattr(l, f.inode, b"user.a", b"1", 0).unwrap();
    e.sync().unwrap();
    assert_clean(&e);
    drop(e);
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    let l = e.layer_id("base").unwrap();
    let d = e.lookup(l, ROOT_INODE, b"etc").unwrap();
    let f = e.lookup(l, d.inode, b"hosts").unwrap();
    assert_eq!(f.size, 100_010);
    assert_eq!(f.nlink, 2);
    assert_eq!(e.read(l, f.inode, 10, data.len()).unwrap(), data);
    let s = e.lookup(l, ROOT_INODE, b"sl").unwrap();
    assert_eq!(e.readlink(l, s.inode).unwrap(), b"/etc/hosts");
    assert_eq!(e.getxattr(l, f.inode, b"user.a").unwrap(), b"1");
    assert_clean(&e);
}

#[test]
fn clone_isolates_changes_and_remove_frees() {
    let (_dev, e) = fresh(64 << 20);
    let base = e.create_layer("base", true).unwrap();
    let f = e.create(base, ROOT_INODE, b"a", 0o644, 0, 0).unwrap();
    e.write(base, f.inode, 0, &[1u8; 50_000]).unwrap();
    for i in 0..300 {
        e.create(base, ROOT_INODE, format!("f{i}").as_bytes(), 0o644, 0, 0)
            .unwrap();
    }
    let c = e.clone_layer("base", "c1").unwrap();
    assert!(e.layer_info("base").unwrap().frozen);
    assert_eq!(
        e.write(base, f.inode, 0, b"x").unwrap_err().errno(),
        libc::EROFS
    );
    e.write(c, f.inode, 100, &[2u8; 10]).unwrap();
    e.unlink(c, ROOT_INODE, b"f7").unwrap();
    e.rename(c, ROOT_INODE, b"f8", ROOT_INODE, b"g8", 0)
        .unwrap();
    assert_eq!(e.read(base, f.inode, 100, 10).unwrap(), vec![1u8; 10]);
    assert_eq!(e.read(c, f.inode, 100, 10).unwrap(), vec![2u8; 10]);
    assert!(e.lookup(base, ROOT_INODE, b"f7").is_ok());
    assert!(e.lookup(c, ROOT_INODE, b"f7").is_err());
    assert!(e.lookup(c, ROOT_INODE, b"g8").is_ok());
    assert_clean(&e);
    assert_eq!(e.remove_layer("base").unwrap_err().errno(), libc::EBUSY);
    assert!(e.layer_info("c1").unwrap().owned_bytes > 0);
    e.sync().unwrap();
    let before = e.stats().live_bytes;
    e.remove_layer("c1").unwrap();
    e.sync().unwrap();
    assert!(e.stats().live_bytes < before);
    e.remove_layer("base").unwrap();
    e.sync().unwrap();
    assert_clean(&e);
    assert!(e.list_layers().is_empty());
}

#[test]
fn a_write_back_keeps_the_times_its_writer_set() {
    let (_dev, e) = fresh(64 << 20);
    let l = e.create_layer("base", false).unwrap();
    let f = e.create(l, ROOT_INODE, b"cached", 0o644, 0, 0).unwrap();
    let set = Timestamp {
        seconds: 1_700_000_000,
        nanoseconds: 123,
    };
    let s = SetAttr {
        mtime: Some(TimeSet::At(set)),
        ctime: Some(set),
        ..SetAttr::default()
    };
    e.setattr(l, f.inode, &s).unwrap();
    assert_eq!(e.write_keeping_times(l, f.inode, 4096, b"late").unwrap(), 4);
    let a = e.getattr(l, f.inode).unwrap();
    assert_eq!((a.mtime, a.ctime), (set, set), "a write-back moves no time");
    assert_eq!(a.size, 4100, "but grows the file");
    assert_eq!(e.read(l, f.inode, 4096, 4).unwrap(), b"late");
    e.write(l, f.inode, 0, b"now").unwrap();
    let a = e.getattr(l, f.inode).unwrap();
    assert!(a.mtime != set && a.ctime != set, "a plain write sets both");
    assert_clean(&e);
}
