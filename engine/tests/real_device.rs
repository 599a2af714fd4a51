//! The engine on real storage: a sparse file and a loop device, through
//! io_uring with O_DIRECT (and the pread fallback), restart persistence,
//! and format refusing a device that carries a filesystem. Needs root.

use lcfs_engine::device::{create_sparse_file, open_device, Backend, Device, OpenOptions};
use lcfs_engine::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (loop devices); CI runs it as root"
    );
}

struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp_file(tag: &str, size: u64) -> TempFile {
    let p = std::env::temp_dir().join(format!("lcfs-{tag}-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&p);
    create_sparse_file(&p, size).unwrap();
    TempFile(p)
}

fn open(path: &Path, backend: Backend) -> Arc<dyn Device> {
    Arc::from(
        open_device(
            path,
            &OpenOptions {
                backend,
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

fn exercise(path: &Path, backend: Backend, want: &str) {
    let dev = open(path, backend);
    assert_eq!(dev.backend(), want);
    Engine::format(
        dev.clone(),
        &FormatOptions {
            force: true,
            ..Default::default()
        },
    )
    .unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    {
        let e = Engine::open(dev.clone(), Config::default()).unwrap();
        let l = e.create_layer("img", true).unwrap();
        let d = e.mkdir(l, ROOT_INODE, b"usr", 0o755, 0, 0).unwrap();
        for i in 0..500 {
            let f = e
                .create(l, d.inode, format!("f{i}").as_bytes(), 0o644, 0, 0)
                .unwrap();
            e.write(l, f.inode, 0, format!("file {i}").as_bytes())
                .unwrap();
        }
        let big = e.create(l, ROOT_INODE, b"big", 0o644, 0, 0).unwrap();
        for (i, chunk) in data.chunks(128 << 10).enumerate() {
            e.write(l, big.inode, (i * (128 << 10)) as u64, chunk)
                .unwrap();
        }
        e.clone_layer("img", "ctr").unwrap();
        e.close().unwrap();
        let st = e.stats();
        assert!(
            st.device.writes > 0 && st.coalescing_ratio() > 1.0,
            "writes were coalesced: {st:?}"
        );
    }
    drop(dev);
    let dev = open(path, backend);
    let e = Engine::open(dev, Config::default()).unwrap();
    let c = e.layer_id("ctr").unwrap();
    let big = e.lookup(c, ROOT_INODE, b"big").unwrap();
    assert_eq!(e.read(c, big.inode, 0, data.len()).unwrap(), data);
    let d = e.lookup(c, ROOT_INODE, b"usr").unwrap();
    let f = e.lookup(c, d.inode, b"f321").unwrap();
    assert_eq!(e.read(c, f.inode, 0, 100).unwrap(), b"file 321");
    assert!(e.layer_info("img").unwrap().frozen);
    assert!(e.fsck(true).unwrap().is_clean());
}

#[test]
fn engine_on_a_sparse_file_with_io_uring_and_pread() {
    let f = temp_file("file", 256 << 20);
    exercise(&f.0, Backend::IoUring, "io_uring");
    exercise(&f.0, Backend::Pread, "pread");
}

#[test]
fn engine_on_a_loop_device_and_format_refuses_signatures() {
    require_root();
    let f = temp_file("loop", 256 << 20);
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&f.0)
        .status()
        .expect("mkfs.ext4 (e2fsprogs) is installed by scripts/setup.sh");
    assert!(ok.success());
    let lo = Loop::attach(&f.0);
    {
        let dev = open(Path::new(&lo.0), Backend::Auto);
        match Engine::format(dev.clone(), &FormatOptions::default()) {
            Err(Error::Signature(s)) => assert!(s.contains("ext"), "{s}"),
            other => panic!("format over ext4 must be refused, got {other:?}"),
        }
    }
    exercise(Path::new(&lo.0), Backend::IoUring, "io_uring");
    // An lcfs is a signature too.
    let dev = open(Path::new(&lo.0), Backend::Auto);
    assert!(matches!(
        Engine::format(dev, &FormatOptions::default()),
        Err(Error::Signature(_))
    ));
}
