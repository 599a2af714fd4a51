//! `passthrough-probe`: what FUSE passthrough (Linux 6.9+) would give the
//! mount's read path, measured before the mount is built around it.
//!
//! Two small FUSE servers run in this process. The *outer* one serves N
//! files (N layers' copies of one image file: N kernel inodes) of S MiB
//! each; the *inner* one serves a single S MiB file (what an internal
//! "content" mount would serve once per shared file). Every read a server
//! answers comes from one buffer in memory. Outer modes:
//! - `fuse`: the outer server answers reads itself (the mount today);
//! - `inner`: every outer file is opened in passthrough to the inner file;
//! - `host`: every outer file is opened in passthrough to a file of S MiB on
//!   the filesystem holding `--dir` (a materialised copy of the content).
//!
//! Per mode: page-cache growth (cachestat(2) of every outer file and of the
//! backing file) with 1 reader, then N readers that each hold their file
//! open (read, then mmap), cold and cached read speed of one file, beside
//! the cached read speed of the host file itself (the kernel's speed). Then
//! the io-mode rules the kernel enforces for one inode, which decide how
//! writes can coexist with passthrough readers.

use fuser::{
    BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

const USAGE: &str = "\
usage: passthrough-probe [--dir DIR] [--mib S] [--readers N] [--rounds R]

Page-cache growth and read speed of N FUSE inodes of one S MiB file, read
through the FUSE server, in passthrough to an inner FUSE file, and in
passthrough to a host file; then the kernel's io-mode rules for one inode.

  --dir DIR      work directory (two mount points, the host file) [default /var/tmp/lcfs-passthrough-probe]
  --mib S        file size in MiB             [default 256]
  --readers N    inodes read at once          [default 20]
  --rounds R     rounds of every mode         [default 3]";

const TTL: Duration = Duration::from_secs(3600);
const MIB: usize = 1 << 20;
/// Outer inode numbers: files 2..2+N are the readers' copies; these two
/// are the io-mode checks (see `OuterFs::open`).
const RW_CACHED: u64 = 1_000_000;
const RW_DIRECT: u64 = 1_000_001;

struct Args {
    dir: PathBuf,
    mib: usize,
    readers: usize,
    rounds: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        dir: PathBuf::from("/var/tmp/lcfs-passthrough-probe"),
        mib: 256,
        readers: 20,
        rounds: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=4096).contains(n))
                .ok_or(format!("{flag}: '{value}' is not a number in 1..4096"))
        };
        match flag.as_str() {
            "--dir" => a.dir = PathBuf::from(&value),
            "--mib" => a.mib = number()?,
            "--readers" => a.readers = number()?,
            "--rounds" => a.rounds = number()?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

fn attr(ino: u64, size: u64, kind: FileType) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm: if kind == FileType::Directory {
            0o755
        } else {
            0o644
        },
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

fn serve_read(data: &[u8], offset: u64, size: u32, reply: ReplyData) {
    let start = (offset as usize).min(data.len());
    let end = (start + size as usize).min(data.len());
    reply.data(&data[start..end]);
}

/// The inner server: one file, `content` (inode 2).
struct InnerFs {
    data: Arc<Vec<u8>>,
}

impl Filesystem for InnerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == "content" {
            let a = attr(2, self.data.len() as u64, FileType::RegularFile);
            reply.entry(&TTL, &a, fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino.0 {
            1 => reply.attr(&TTL, &attr(1, 0, FileType::Directory)),
            2 => reply.attr(
                &TTL,
                &attr(2, self.data.len() as u64, FileType::RegularFile),
            ),
            _ => reply.error(Errno::ENOENT),
        }
    }

    /// A writable open (the kernel opens the backing file with the flags of
    /// the outer open) is direct I/O: the shared pages are never written
    /// and a shared writable mapping fails (no FUSE_DIRECT_IO_ALLOW_MMAP).
    fn open(&self, _req: &Request, _ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        } else {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        serve_read(&self.data, offset, size, reply);
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Fuse,
    Inner,
    /// Every open is direct I/O naming the backing file: read() and write()
    /// reach the server, mmap maps the backing file.
    InnerDio,
    Host,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Fuse => "fuse",
            Mode::Inner => "inner",
            Mode::InnerDio => "inner-dio",
            Mode::Host => "host",
        }
    }
}

/// The outer server: files `f0`.. (inodes 2..), plus `rw-cached` and
/// `rw-direct` for the io-mode checks.
struct OuterFs {
    data: Arc<Vec<u8>>,
    mode: Mode,
    backing_path: Option<PathBuf>,
    /// One backing id for every inode (the kernel allows sharing one id
    /// between inodes; all opens of one inode must use the same id).
    backing: Mutex<Option<Arc<BackingId>>>,
    /// Open failures the kernel reported (`open_backing` errors).
    errors: Arc<Mutex<Vec<String>>>,
    /// The last write (inode, offset, bytes): reads of that range see it.
    written: Mutex<Option<(u64, u64, Vec<u8>)>>,
}

impl OuterFs {
    fn backing(&self, reply: &ReplyOpen) -> std::io::Result<Arc<BackingId>> {
        let mut b = self.backing.lock().unwrap();
        if let Some(id) = &*b {
            return Ok(id.clone());
        }
        let path = self.backing_path.as_ref().expect("passthrough mode");
        let file = File::open(path)?;
        let id = Arc::new(reply.open_backing(&file)?);
        *b = Some(id.clone());
        Ok(id)
    }
}

impl Filesystem for OuterFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if self.mode != Mode::Fuse {
            if let Err(e) = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                self.errors
                    .lock()
                    .unwrap()
                    .push(format!("kernel lacks FUSE_PASSTHROUGH ({e:?})"));
            }
            let _ = config.set_max_stack_depth(1);
            if std::env::var_os("PROBE_WRITEBACK_CACHE").is_some() {
                let _ = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE);
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_string_lossy();
        let ino = match name.as_ref() {
            "rw-cached" => Some(RW_CACHED),
            "rw-direct" => Some(RW_DIRECT),
            n => n
                .strip_prefix('f')
                .and_then(|i| i.parse::<u64>().ok())
                .map(|i| i + 2),
        };
        match ino {
            Some(ino) if parent == INodeNo::ROOT => {
                let a = attr(ino, self.data.len() as u64, FileType::RegularFile);
                reply.entry(&TTL, &a, fuser::Generation(0));
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            reply.attr(&TTL, &attr(1, 0, FileType::Directory));
        } else {
            let a = attr(ino.0, self.data.len() as u64, FileType::RegularFile);
            reply.attr(&TTL, &a);
        }
    }

    /// `fuse` mode: a cached open. Passthrough modes: a read-only open is
    /// passed through; a writable open of `rw-cached` is a cached open (the
    /// kernel must refuse one of the two when they meet on one inode) and
    /// of `rw-direct` a direct-I/O open that names the same backing id (the
    /// combination the kernel allows beside passthrough readers).
    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writable = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        if self.mode == Mode::Fuse || (writable && ino.0 == RW_CACHED) {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
            return;
        }
        let id = match self.backing(&reply) {
            Ok(id) => id,
            Err(e) => {
                self.errors
                    .lock()
                    .unwrap()
                    .push(format!("open_backing: {e}"));
                reply.error(Errno::EIO);
                return;
            }
        };
        let flags = if writable || self.mode == Mode::InnerDio {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        };
        reply.opened_passthrough(FileHandle(0), flags, &id);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let w = self.written.lock().unwrap();
        match &*w {
            Some((i, at, bytes)) if *i == ino.0 && *at == offset => {
                let n = bytes.len().min(size as usize);
                reply.data(&bytes[..n]);
            }
            _ => serve_read(&self.data, offset, size, reply),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        *self.written.lock().unwrap() = Some((ino.0, offset, data.to_vec()));
        reply.written(data.len() as u32);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }
}

fn mount_config() -> Config {
    let mut c = Config::default();
    c.mount_options = vec![
        MountOption::FSName("lcfs-probe".into()),
        MountOption::RW,
        MountOption::DefaultPermissions,
    ];
    c.n_threads = Some(2);
    c
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

/// Pages of `file` in the page cache (cachestat(2), Linux 6.5+).
fn cached_pages(file: &File) -> u64 {
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = [0u64, 0u64];
    let mut st = CacheStat::default();
    // SAFETY: cachestat reads `range` and writes `st`, both live, sized as
    // the kernel's struct cachestat_range and struct cachestat.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            range.as_ptr(),
            &mut st as *mut CacheStat,
            0,
        )
    };
    if rc != 0 {
        panic!("cachestat: {}", std::io::Error::last_os_error());
    }
    st.cache
}

fn drop_caches() {
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop_caches (run as root)");
}

/// Reads `file` to its end in 1 MiB reads; MiB/s.
fn read_all(file: &File, bytes: usize) -> f64 {
    let mut buf = vec![0u8; MIB];
    let start = Instant::now();
    let mut at = 0u64;
    loop {
        let n = file.read_at(&mut buf, at).expect("read");
        if n == 0 {
            break;
        }
        at += n as u64;
    }
    assert_eq!(at as usize, bytes, "short file");
    bytes as f64 / MIB as f64 / start.elapsed().as_secs_f64()
}

/// Maps `file` and reads one byte of every page; the mapping stays until
/// the returned guard drops.
struct Mapped(*mut libc::c_void, usize);
// SAFETY: the mapping is only read, then unmapped once, by its owner.
unsafe impl Send for Mapped {}
impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map_and_touch` created.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

fn map_and_touch(file: &File, bytes: usize) -> Mapped {
    // SAFETY: a fresh shared read-only mapping of `bytes` of an open file.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert!(
        p != libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    let mut sum = 0u64;
    for off in (0..bytes).step_by(4096) {
        // SAFETY: `off` is inside the mapping.
        sum =
            sum.wrapping_add(unsafe { std::ptr::read_volatile((p as *const u8).add(off)) } as u64);
    }
    std::hint::black_box(sum);
    Mapped(p, bytes)
}

struct Sample {
    one: f64,
    many: f64,
    many_mmap: f64,
    cold: f64,
    cached: f64,
    host_cached: f64,
}

struct Setup {
    outer: PathBuf,
    backing: Option<PathBuf>,
    host_file: PathBuf,
    bytes: usize,
    readers: usize,
}

impl Setup {
    fn open_reader(&self, i: usize) -> File {
        File::open(self.outer.join(format!("f{i}"))).expect("open outer file")
    }

    /// MiB of page cache held by the outer files and the backing file.
    fn cached_mib(&self, outer: &[File]) -> f64 {
        let mut pages: u64 = outer.iter().map(cached_pages).sum();
        if let Some(b) = &self.backing {
            pages += cached_pages(&File::open(b).expect("open backing"));
        }
        pages as f64 * 4096.0 / MIB as f64
    }

    fn measure(&self) -> Sample {
        drop_caches();
        let f0 = self.open_reader(0);
        read_all(&f0, self.bytes);
        let one = self.cached_mib(std::slice::from_ref(&f0));
        drop(f0);

        drop_caches();
        let files: Vec<File> = (0..self.readers).map(|i| self.open_reader(i)).collect();
        std::thread::scope(|s| {
            for f in &files {
                s.spawn(|| read_all(f, self.bytes));
            }
        });
        let many = self.cached_mib(&files);
        let cached = read_all(&files[0], self.bytes);
        drop(files);

        drop_caches();
        let files: Vec<File> = (0..self.readers).map(|i| self.open_reader(i)).collect();
        let maps: Vec<Mapped> = std::thread::scope(|s| {
            let handles: Vec<_> = files
                .iter()
                .map(|f| s.spawn(|| map_and_touch(f, self.bytes)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let many_mmap = self.cached_mib(&files);
        drop(maps);
        drop(files);

        drop_caches();
        let f0 = self.open_reader(0);
        let cold = read_all(&f0, self.bytes);
        drop(f0);

        let host = File::open(&self.host_file).expect("open host file");
        read_all(&host, self.bytes);
        let host_cached = read_all(&host, self.bytes);
        Sample {
            one,
            many,
            many_mmap,
            cold,
            cached,
            host_cached,
        }
    }
}

/// What the kernel answers when opens of different io modes meet on one
/// inode, in a passthrough mode.
fn io_mode_checks(outer: &Path, bytes: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let res = |r: std::io::Result<()>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("{e}"),
    };
    let rw = |p: &Path| std::fs::OpenOptions::new().read(true).write(true).open(p);
    let cached = outer.join("rw-cached");
    let direct = outer.join("rw-direct");

    // A cached (writable) open first, then a passthrough (read-only) one;
    // then the other way round.
    let both = |first: &dyn Fn() -> std::io::Result<File>,
                second: &dyn Fn() -> std::io::Result<File>| {
        let a = first()?;
        let b = second()?;
        drop((a, b));
        Ok(())
    };
    let ro = || File::open(&cached);
    let wr = || rw(&cached);
    out.push((
        "passthrough open while a cached open is held".into(),
        res(both(&wr, &ro)),
    ));
    out.push((
        "cached open while a passthrough open is held".into(),
        res(both(&ro, &wr)),
    ));

    // A passthrough reader, then a direct-I/O writer naming the same id.
    let r = File::open(&direct).expect("open rw-direct read-only");
    let mut first = vec![0u8; 4096];
    r.read_exact_at(&mut first, 0).expect("read");
    match rw(&direct) {
        Err(e) => out.push((
            "direct-I/O writer beside passthrough readers".into(),
            e.to_string(),
        )),
        Ok(mut w) => {
            out.push((
                "direct-I/O writer beside passthrough readers".into(),
                "ok".into(),
            ));
            let new = vec![0x5au8; 4096];
            let wrote = w.write_all(&new).map(|_| ());
            out.push(("  its write (to the server)".into(), res(wrote)));
            let mut after = vec![0u8; 4096];
            r.read_exact_at(&mut after, 0).expect("read");
            out.push((
                "  the reader then reads".into(),
                if after == first {
                    "the old bytes (the backing file's)".into()
                } else if after == new {
                    "the write".into()
                } else {
                    "other bytes".into()
                },
            ));
            // SAFETY: a shared writable mapping of an open file, unmapped at once.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes.min(4096),
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    w.as_raw_fd(),
                    0,
                )
            };
            let m = if p == libc::MAP_FAILED {
                std::io::Error::last_os_error().to_string()
            } else {
                // SAFETY: unmaps the mapping just made.
                unsafe { libc::munmap(p, 4096) };
                "ok (maps the backing file)".into()
            };
            out.push(("  the writer's shared writable mmap".into(), m));
        }
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("passthrough-probe: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let bytes = args.mib * MIB;
    // Bytes that do not compress or repeat (xorshift).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..bytes / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let data = Arc::new(data);

    let dir = &args.dir;
    let inner_dir = dir.join("inner");
    let outer_dir = dir.join("outer");
    let host_file = dir.join("host.bin");
    for d in [&inner_dir, &outer_dir] {
        std::fs::create_dir_all(d).expect("create mount point");
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&host_file)
        .expect("create host file");
    f.write_all(&data).expect("write host file");
    f.sync_all().expect("sync host file");
    drop(f);

    let inner = fuser::spawn_mount(InnerFs { data: data.clone() }, &inner_dir, &mount_config())
        .expect("mount inner");
    let inner_file = inner_dir.join("content");
    let mut check = vec![0u8; 4096];
    File::open(&inner_file)
        .and_then(|mut f| f.read_exact(&mut check))
        .expect("read inner file");

    println!(
        "passthrough-probe: {} readers of {} MiB, {} rounds, kernel {}",
        args.readers,
        args.mib,
        args.rounds,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let modes = [Mode::Fuse, Mode::Inner, Mode::InnerDio, Mode::Host];
    let mut samples: Vec<Vec<Sample>> = modes.iter().map(|_| Vec::new()).collect();
    let mut checks = Vec::new();
    let mut failed = false;
    for round in 0..args.rounds {
        for (m, &mode) in modes.iter().enumerate() {
            let backing = match mode {
                Mode::Fuse => None,
                Mode::Inner | Mode::InnerDio => Some(inner_file.clone()),
                Mode::Host => Some(host_file.clone()),
            };
            let errors = Arc::new(Mutex::new(Vec::new()));
            let fs = OuterFs {
                data: data.clone(),
                mode,
                backing_path: backing.clone(),
                backing: Mutex::new(None),
                errors: errors.clone(),
                written: Mutex::new(None),
            };
            let session = fuser::spawn_mount(fs, &outer_dir, &mount_config()).expect("mount outer");
            let setup = Setup {
                outer: outer_dir.clone(),
                backing,
                host_file: host_file.clone(),
                bytes,
                readers: args.readers,
            };
            let opened = File::open(outer_dir.join("f0"));
            let e = errors.lock().unwrap().clone();
            if opened.is_err() || !e.is_empty() {
                println!("{}: passthrough unavailable: {opened:?} {e:?}", mode.name());
                failed = true;
            } else {
                drop(opened);
                let s = setup.measure();
                println!(
                    "round {round} {:5}: cache MiB 1 reader {:7.1}, {} at once {:7.1}, {} mapped {:7.1}; read MiB/s cold {:6.0}, cached {:6.0} (host file {:6.0})",
                    mode.name(),
                    s.one,
                    args.readers,
                    s.many,
                    args.readers,
                    s.many_mmap,
                    s.cold,
                    s.cached,
                    s.host_cached
                );
                samples[m].push(s);
                if mode != Mode::Fuse && round == 0 {
                    checks.push((mode, io_mode_checks(&outer_dir, bytes)));
                }
            }
            drop(session);
        }
    }
    drop(inner);

    println!("\nmedians over {} rounds:", args.rounds);
    println!(
        "| mode | page cache / file size: 1 reader | {n} at once | {n} mapped | cold read MiB/s | cached read MiB/s | cached / host file |",
        n = args.readers
    );
    println!("|---|---|---|---|---|---|---|");
    for (m, mode) in modes.iter().enumerate() {
        let s = &samples[m];
        if s.is_empty() {
            continue;
        }
        let size = args.mib as f64;
        let one = median(s.iter().map(|x| x.one / size).collect());
        let many = median(s.iter().map(|x| x.many / size).collect());
        let mapped = median(s.iter().map(|x| x.many_mmap / size).collect());
        let cold = median(s.iter().map(|x| x.cold).collect());
        let cached = median(s.iter().map(|x| x.cached).collect());
        let ratio = median(s.iter().map(|x| x.cached / x.host_cached).collect());
        println!(
            "| {} | {one:.2} | {many:.2} | {mapped:.2} | {cold:.0} | {cached:.0} | {ratio:.2} |",
            mode.name()
        );
    }
    for (mode, c) in checks {
        println!("\nio modes of one inode ({} backing):", mode.name());
        for (what, result) in c {
            println!("  {what}: {result}");
        }
    }
    let _ = std::fs::remove_file(&host_file);
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
