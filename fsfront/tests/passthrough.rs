//! FUSE passthrough of shared files (`MountOptions::passthrough`): clones
//! reading one image file at once, by read(2) and by mmap, hold one
//! page-cache copy (the frozen copy's, in the copies mount); a write beside
//! passthrough readers stays in its layer; a binary runs from a clone; only
//! root reaches the copies mount. Needs root, /dev/fuse and Linux 6.9+.

mod common;

use common::{as_nobody, engine_of, require_root};
use lcfs_engine::{Engine, ROOT_INODE};
use lcfs_fsfront::{copies_path, mount, Mount, MountOptions};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const SIZE: usize = 32 << 20;

fn data() -> Vec<u8> {
    (0..SIZE)
        .map(|i| (i / 4096 % 251) as u8 ^ (i % 7) as u8)
        .collect()
}

/// An image layer `img` holding `blob` (SIZE bytes) and `clones` clones of
/// it, mounted with passthrough under a fresh directory.
struct Setup {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
    engine: Arc<Engine>,
    mount: Option<Mount>,
    img: u64,
    blob: u64,
}

impl Setup {
    fn new(clones: usize) -> Setup {
        require_root();
        let engine = engine_of(512 << 20);
        let img = engine.create_layer("img", false).unwrap();
        let blob = engine
            .create(img, ROOT_INODE, b"blob", 0o644, 0, 0)
            .unwrap()
            .inode;
        engine.write(img, blob, 0, &data()).unwrap();
        for i in 0..clones {
            engine.clone_layer("img", &format!("c{i}")).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let options = MountOptions {
            passthrough: true,
            ..MountOptions::default()
        };
        let mount = mount(engine.clone(), &mnt, &options).unwrap();
        Setup {
            _dir: dir,
            mnt,
            engine,
            mount: Some(mount),
            img,
            blob,
        }
    }

    fn path(&self, layer: &str, name: &str) -> PathBuf {
        self.mnt.join(layer).join(name)
    }

    /// The frozen copy of `blob` in the copies mount.
    fn copy(&self) -> File {
        File::open(copies_path(&self.mnt).join(format!("{}-{}", self.img, self.blob))).unwrap()
    }

    fn mount(&self) -> &Mount {
        self.mount.as_ref().unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            m.unmount().unwrap();
        }
    }
}

#[repr(C)]
#[derive(Default)]
struct CacheStat {
    cache: u64,
    dirty: u64,
    writeback: u64,
    evicted: u64,
    recently_evicted: u64,
}

/// Pages of `file`'s own page cache (cachestat(2), Linux 6.5+).
fn cached_pages(file: &File) -> u64 {
    let range = [0u64, 0u64];
    let mut st = CacheStat::default();
    // SAFETY: cachestat reads `range` and writes `st`, both live and sized
    // as struct cachestat_range and struct cachestat.
    let rc = unsafe {
        libc::syscall(
            451,
            file.as_raw_fd(),
            range.as_ptr(),
            &mut st as *mut CacheStat,
            0,
        )
    };
    assert_eq!(rc, 0, "cachestat: {}", std::io::Error::last_os_error());
    st.cache
}

/// A shared mapping of the first `len` bytes of `f`, unmapped on drop.
struct Mapping(*mut libc::c_void, usize);

impl Mapping {
    fn new(f: &File, len: usize, writable: bool) -> std::io::Result<Mapping> {
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a fresh shared mapping of an open file; the pointer is
        // only used through `bytes` and unmapped once, on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping(p, len))
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is self.1 bytes long and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.0 as *const u8, self.1) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

fn read_all(f: &File) -> Vec<u8> {
    let mut out = vec![0u8; SIZE];
    f.read_exact_at(&mut out, 0).unwrap();
    out
}

#[test]
fn clones_holding_a_shared_file_open_share_one_page_cache_copy() {
    let s = Setup::new(4);
    let want = data();
    let files: Vec<File> = (0..4)
        .map(|i| File::open(s.path(&format!("c{i}"), "blob")).unwrap())
        .collect();
    for f in &files {
        assert!(read_all(f) == want, "a clone read other bytes");
    }
    let copy_pages = cached_pages(&s.copy());
    let own: u64 = files.iter().map(cached_pages).sum();
    println!("read: the frozen copy caches {copy_pages} pages, the clones' own inodes {own}");
    assert_eq!(
        own, 0,
        "passthrough reads must not fill the clones' own page caches"
    );
    assert!(
        copy_pages >= (SIZE / 4096) as u64 * 9 / 10,
        "the frozen copy holds the pages: {copy_pages}"
    );

    // mmap: every clone maps its own file; the pages are the copy's.
    for f in &files {
        let m = Mapping::new(f, SIZE, false).unwrap();
        assert!(m.bytes() == &want[..], "a mapping shows other bytes");
    }
    let own: u64 = files.iter().map(cached_pages).sum();
    assert_eq!(own, 0, "mappings use the frozen copy's pages");
    let st = s.mount().passthrough_stats().unwrap();
    assert!(st.active, "passthrough was refused: {st:?}");
    assert_eq!((st.opens, st.direct_opens), (4, 0), "{st:?}");
}

#[test]
fn a_write_beside_passthrough_readers_stays_in_its_layer() {
    let s = Setup::new(2);
    let want = data();
    // First a cached open (writable, nothing written) that leaves the
    // image's bytes in the clone's own page cache.
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(s.path("c0", "blob"))
            .unwrap();
        assert!(read_all(&f) == want);
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    let reader = File::open(s.path("c0", "blob")).unwrap();
    assert!(read_all(&reader) == want);

    // A writer in the same clone while the reader is passed through: the
    // kernel requires the same backing file, so it is a direct-I/O open.
    let mut writer = OpenOptions::new()
        .read(true)
        .write(true)
        .open(s.path("c0", "blob"))
        .unwrap();
    writer.write_all(b"changed").unwrap();
    let mut back = [0u8; 7];
    writer.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(&back, b"changed", "the writer reads its write");
    // A shared writable mapping would write the frozen copy: refused.
    let refused = Mapping::new(&writer, 4096, true).err();
    assert_eq!(
        refused.and_then(|e| e.raw_os_error()),
        Some(libc::ENODEV),
        "a shared writable mapping beside passthrough readers must fail with ENODEV"
    );

    // A new reader in that clone sees the write (read(2) through the daemon).
    let late = File::open(s.path("c0", "blob")).unwrap();
    let mut head = [0u8; 7];
    late.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"changed");
    // The documented gap: the reader opened before the write still reads
    // the frozen copy until it reopens.
    reader.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head[..], &want[..7]);
    // The other clone and the image never see it.
    let other = fs::read(s.path("c1", "blob")).unwrap();
    assert!(other == want, "the write leaked into another clone");
    assert!(s.engine.read(s.img, s.blob, 0, 7).unwrap() == want[..7]);
    let st = s.mount().passthrough_stats().unwrap();
    assert!(
        st.direct_opens >= 2,
        "the writer and the late reader: {st:?}"
    );
    drop((reader, writer, late));

    // Once every file is closed, the clone's file is its own: cached opens,
    // and shared writable mappings work again.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(s.path("c0", "blob"))
        .unwrap();
    let m = Mapping::new(&f, 4096, true).unwrap();
    let first = m.bytes()[..7].to_vec();
    assert_eq!(&first, b"changed", "the clone's old cached pages came back");
    drop((m, f));
    let again = File::open(s.path("c0", "blob")).unwrap();
    let mut head = [0u8; 7];
    again.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"changed", "a read-only open reads the clone's copy");
}

#[test]
fn a_binary_runs_from_a_clone_through_passthrough() {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "needs busybox-static (scripts/setup.sh installs it)"
    );
    let s = Setup::new(0);
    // A binary in the image, then a container of it.
    let bin = s
        .engine
        .create(s.img, ROOT_INODE, b"busybox", 0o755, 0, 0)
        .unwrap()
        .inode;
    s.engine
        .write(s.img, bin, 0, &fs::read(busybox).unwrap())
        .unwrap();
    s.engine.clone_layer("img", "ctr").unwrap();
    let out = std::process::Command::new(s.path("ctr", "busybox"))
        .args(["echo", "ran"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"ran\n");
    let st = s.mount().passthrough_stats().unwrap();
    assert!(
        st.opens >= 1,
        "exec opened the binary in passthrough: {st:?}"
    );
}

#[test]
fn only_root_reaches_the_copies_mount() {
    let s = Setup::new(1);
    // Open the layer directories to others, so only the copies mount's own
    // protection stands in the way.
    fs::set_permissions(s._dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let copies = copies_path(&s.mnt);
    let copy = copies.join(format!("{}-{}", s.img, s.blob));
    let _ = s.copy(); // root gets in
    for script in [
        format!("ls '{}'", copies.display()),
        format!("cat '{}' > /dev/null", copy.display()),
    ] {
        assert!(!as_nobody(&script), "nobody could run: {script}");
    }
    // A container's user is not root: through a bind mount of its layer
    // (as a container's root is), nobody reads the file in passthrough.
    let view = s._dir.path().join("view");
    fs::create_dir(&view).unwrap();
    let bound = std::process::Command::new("mount")
        .args(["--bind"])
        .arg(s.mnt.join("c0"))
        .arg(&view)
        .status()
        .unwrap();
    assert!(bound.success(), "mount --bind failed");
    let before = s.mount().passthrough_stats().unwrap().opens;
    let read = as_nobody(&format!(
        "cat '{}' > /dev/null || {{ ls -la '{}' '{}' >&2; exit 1; }}",
        view.join("blob").display(),
        s._dir.path().display(),
        view.display()
    ));
    let after = s.mount().passthrough_stats().unwrap().opens;
    let _ = std::process::Command::new("umount").arg(&view).status();
    assert!(read, "nobody could not read its container's file");
    assert!(after > before, "nobody's open was not passed through");
    // A writable layer's files are not served there.
    let w = s.engine.create_layer("scratch", false).unwrap();
    let f = s
        .engine
        .create(w, ROOT_INODE, b"f", 0o644, 0, 0)
        .unwrap()
        .inode;
    assert!(File::open(copies.join(format!("{w}-{f}"))).is_err());
}
