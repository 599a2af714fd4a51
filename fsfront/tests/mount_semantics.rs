//! A real FUSE mount of an engine: files, directories, links, xattrs and
//! renames through std::fs; frozen layers refuse writes with EROFS; the mount
//! root lists the layers and refuses file creation. Needs root and /dev/fuse.

mod common;

use common::{as_nobody, engine_of, require_root};
use lcfs_fsfront::{mount, MountOptions};
use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

fn xattr_get(path: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

fn xattr_set(path: &std::path::Path, name: &str, value: &[u8]) -> i32 {
    let p = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and value slice.
    unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    }
}

#[test]
fn posix_basics_through_the_mount() {
    require_root();
    let e = engine_of(256 << 20);
    e.create_layer("base", true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = mount(e.clone(), dir.path(), &MountOptions::default()).unwrap();
    let base = dir.path().join("base");
    assert!(base.is_dir());
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|d| d.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["base"]);
    let err = fs::write(dir.path().join("x"), b"1").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));

    fs::create_dir_all(base.join("etc/ssl")).unwrap();
    fs::write(base.join("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(base.join("etc/data"))
        .unwrap();
    let chunk: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
    f.write_all(&chunk).unwrap();
    f.seek(SeekFrom::Start(500_000)).unwrap();
    let mut back = vec![0u8; 1000];
    f.read_exact(&mut back).unwrap();
    assert_eq!(back, chunk[500_000..501_000]);
    f.sync_all().unwrap();
    drop(f);
    fs::hard_link(base.join("etc/hosts"), base.join("hosts2")).unwrap();
    assert_eq!(fs::metadata(base.join("etc/hosts")).unwrap().nlink(), 2);
    std::os::unix::fs::symlink("etc/hosts", base.join("link")).unwrap();
    assert_eq!(
        fs::read_link(base.join("link")).unwrap().to_str(),
        Some("etc/hosts")
    );
    assert_eq!(
        fs::read(base.join("link")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    fs::set_permissions(base.join("etc/hosts"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        fs::metadata(base.join("hosts2")).unwrap().mode() & 0o777,
        0o600
    );
    assert_eq!(
        xattr_set(&base.join("etc/hosts"), "user.origin", b"test"),
        0
    );
    assert_eq!(
        xattr_get(&base.join("hosts2"), "user.origin").as_deref(),
        Some(&b"test"[..])
    );
    // A valid VFS_CAP_REVISION_2 value (cap_net_bind_service permitted).
    let mut cap = Vec::new();
    for word in [0x0200_0000u32, 1 << 10, 0, 0, 0] {
        cap.extend_from_slice(&word.to_le_bytes());
    }
    assert_eq!(
        xattr_set(&base.join("etc/hosts"), "security.capability", &cap),
        0
    );
    assert_eq!(
        xattr_get(&base.join("etc/hosts"), "security.capability"),
        Some(cap)
    );
    fs::rename(base.join("etc/ssl"), base.join("ssl")).unwrap();
    assert!(base.join("ssl").is_dir() && !base.join("etc/ssl").exists());
    assert_eq!(
        fs::metadata(base.join("etc/data")).unwrap().blocks(),
        1_000_000u64.div_ceil(4096) * 8
    );

    // Clone: the parent freezes; the clone sees the same files and can change them.
    e.clone_layer("base", "ctr").unwrap();
    m.forget_layer_entry("ctr");
    let ctr = dir.path().join("ctr");
    assert_eq!(
        fs::read(ctr.join("etc/hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    fs::write(ctr.join("etc/hosts"), b"changed\n").unwrap();
    assert_eq!(
        fs::read(base.join("etc/hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    let err = fs::write(base.join("etc/new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let err = fs::OpenOptions::new()
        .write(true)
        .open(base.join("etc/data"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let long = "x".repeat(256);
    assert_eq!(
        fs::metadata(ctr.join(&long)).unwrap_err().raw_os_error(),
        Some(libc::ENAMETOOLONG)
    );
    m.unmount().unwrap();
    assert!(e.fsck(true).unwrap().is_clean());
}

/// How often anyone has written to /proc/sys/vm/drop_caches (page cache).
fn drop_pagecache_count() -> u64 {
    fs::read_to_string("/proc/vmstat")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("drop_pagecache "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn cached_kib() -> u64 {
    let m = fs::read_to_string("/proc/meminfo").unwrap();
    m.lines()
        .find(|l| l.starts_with("Cached:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn clones_reading_a_shared_file_do_not_multiply_the_page_cache() {
    require_root();
    let e = engine_of(256 << 20);
    e.create_layer("img", true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = mount(e.clone(), dir.path(), &MountOptions::default()).unwrap();
    let size = 64usize << 20;
    let data: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8).collect();
    fs::write(dir.path().join("img/blob"), &data).unwrap();
    let readers = 5;
    // /proc/meminfo counts the whole machine's page cache: other work can
    // add to it (measure again, with fresh clones) or drop it (seen in
    // /proc/vmstat's drop_pagecache; measure again). Three tries.
    let mut last = None;
    let mut reader_dir = String::new();
    for attempt in 0..3 {
        for i in 0..readers {
            e.clone_layer("img", &format!("r{attempt}-{i}")).unwrap();
        }
        // Settle, then measure the page cache while each clone reads the
        // file through its own path (its own kernel inode) and closes it.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let drops = drop_pagecache_count();
        let before = cached_kib();
        for i in 0..readers {
            let got = fs::read(dir.path().join(format!("r{attempt}-{i}/blob"))).unwrap();
            assert!(got == data, "reader {i} saw other bytes");
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let grown_mib = cached_kib().saturating_sub(before) / 1024;
        reader_dir = format!("r{attempt}-{}", readers - 1);
        println!(
            "attempt {attempt}: page cache grew {grown_mib} MiB for {readers} readers of a {} MiB shared file",
            size >> 20
        );
        if drop_pagecache_count() != drops {
            println!("attempt {attempt}: another process dropped the page cache; again");
            continue;
        }
        last = Some(grown_mib);
        if grown_mib < 2 * (size as u64 >> 20) {
            break;
        }
    }
    let grown_mib = last.expect("every attempt saw the page cache dropped by someone else");
    assert!(
        grown_mib < 2 * (size as u64 >> 20),
        "page cache grew {grown_mib} MiB: shared pages were not dropped at last close"
    );
    let st = e.stats();
    assert!(
        st.block_cache_hits >= ((readers - 1) * size / 4096) as u64 / 2,
        "later readers hit the shared block cache: {st:?}"
    );
    // The last reader's copy stays: reading it again does not reach the
    // daemon. Nearly: proactive reclaim (DAMON's pageout scheme runs on the
    // machines this is tested on) may page out a few cold pages between the
    // reads; without the copy kept, all 16,384 blocks would come back.
    let touched = st.block_cache_hits + st.block_cache_misses;
    let again = fs::read(dir.path().join(&reader_dir).join("blob")).unwrap();
    assert!(again == data);
    let st = e.stats();
    let reread_blocks = st.block_cache_hits + st.block_cache_misses - touched;
    assert!(
        reread_blocks <= (size / 4096 / 64) as u64,
        "a single reader's re-read is served by the page cache, but {reread_blocks} blocks reached the daemon"
    );
    m.unmount().unwrap();
}

#[test]
fn set_id_bits_are_cleared_as_the_kernel_would() {
    // With HANDLE_KILLPRIV_V2 the daemon, not the kernel, clears them.
    require_root();
    let e = engine_of(256 << 20);
    e.create_layer("base", false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let m = mount(e.clone(), dir.path(), &MountOptions::default()).unwrap();
    let base = dir.path().join("base");
    fs::set_permissions(&base, fs::Permissions::from_mode(0o777)).unwrap();
    let mode = |name: &str| fs::metadata(base.join(name)).unwrap().mode() & 0o7777;
    let make = |name: &str, mode: u32| {
        fs::write(base.join(name), b"data").unwrap();
        fs::set_permissions(base.join(name), fs::Permissions::from_mode(mode)).unwrap();
    };

    // chown clears set-user-id, and set-group-id with group execute, even
    // for root; set-group-id without group execute stays.
    make("chowned", 0o6755);
    std::os::unix::fs::chown(base.join("chowned"), Some(1), Some(1)).unwrap();
    assert_eq!(mode("chowned"), 0o755);
    make("chowned-g", 0o2644);
    std::os::unix::fs::chown(base.join("chowned-g"), Some(1), Some(1)).unwrap();
    assert_eq!(mode("chowned-g"), 0o2644);
    fs::create_dir(base.join("dir")).unwrap();
    fs::set_permissions(base.join("dir"), fs::Permissions::from_mode(0o2755)).unwrap();
    std::os::unix::fs::chown(base.join("dir"), Some(1), Some(1)).unwrap();
    assert_eq!(mode("dir"), 0o2755, "directories keep set-group-id");

    // Root (CAP_FSETID) writes and truncates without clearing.
    make("root-writes", 0o4777);
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(base.join("root-writes"))
        .unwrap();
    f.write_all(b"more").unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::OpenOptions::new()
        .write(true)
        .open(base.join("root-writes"))
        .unwrap()
        .set_len(1)
        .unwrap();
    assert_eq!(mode("root-writes"), 0o4777);

    // Another user's write and truncate clear them. Other users reach the
    // layer only through a bind mount (the mount root is root's alone), as
    // a container does.
    let bind = tempfile::tempdir().unwrap();
    fs::set_permissions(bind.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let bound = std::process::Command::new("mount")
        .arg("--bind")
        .arg(&base)
        .arg(bind.path())
        .status()
        .unwrap();
    assert!(bound.success());
    let unbind = Unbind(bind.path().to_path_buf());
    let base = bind.path().to_path_buf();
    make("written", 0o6777);
    let path = base.join("written");
    assert!(as_nobody(&format!("printf x >> '{}'", path.display())));
    assert_eq!(mode("written"), 0o777);
    make("truncated", 0o4777);
    let path = base.join("truncated");
    assert!(as_nobody(&format!("truncate -s 0 '{}'", path.display())));
    assert_eq!(mode("truncated"), 0o777);
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);

    drop(unbind);
    m.unmount().unwrap();
}

/// Unmounts a bind mount when dropped, pass or fail.
struct Unbind(std::path::PathBuf);

impl Drop for Unbind {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}
