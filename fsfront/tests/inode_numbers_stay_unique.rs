//! Kernel inode numbers of files in different layers never collide and stay
//! stable, however large layer ids grow: layers with ids on both sides of
//! 2^24 and 2^40 are served side by side. Needs root and /dev/fuse.

use lcfs_engine::device::{Device, MemDevice};
use lcfs_engine::{Config, Engine, FormatOptions};
use lcfs_fsfront::{mount, MountOptions};
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

#[test]
fn layers_past_two_to_the_24_keep_distinct_inode_numbers() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "needs root for a FUSE mount");
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(256 << 20));
    Engine::format(dev.clone(), &FormatOptions::default()).unwrap();
    let e = Engine::open(dev, Config::default()).unwrap();
    let mut names = vec!["low".to_string()];
    e.create_layer("low", false).unwrap();
    for (i, id) in [(1u64 << 24) - 1, 1 << 24, (1 << 24) + 1, (1 << 40) + 1]
        .into_iter()
        .enumerate()
    {
        e.set_next_layer_id(id);
        let name = format!("high{i}");
        e.create_layer(&name, false).unwrap();
        assert_eq!(e.layer_info(&name).unwrap().id, id);
        names.push(name);
    }
    let dir = tempfile::tempdir().unwrap();
    let m = mount(e.clone(), dir.path(), &MountOptions::default()).unwrap();
    for name in &names {
        let layer = dir.path().join(name);
        fs::create_dir(layer.join("d")).unwrap();
        fs::write(layer.join("d/f"), name.as_bytes()).unwrap();
    }
    let root_ino = fs::metadata(dir.path()).unwrap().ino();
    let mut seen: HashMap<u64, String> = HashMap::new();
    let mut first = Vec::new();
    for name in &names {
        for path in ["", "d", "d/f"] {
            let p = dir.path().join(name).join(path);
            let ino = fs::metadata(&p).unwrap().ino();
            assert_ne!(ino, root_ino, "{}", p.display());
            if let Some(other) = seen.insert(ino, p.display().to_string()) {
                panic!("{} and {other} share inode number {ino:#x}", p.display());
            }
            first.push((p, ino));
        }
        assert_eq!(
            fs::read(dir.path().join(name).join("d/f")).unwrap(),
            name.as_bytes(),
            "each layer reads its own file"
        );
    }
    // Stable: the same numbers again, also after the kernel forgot them.
    let _ = fs::write("/proc/sys/vm/drop_caches", "2");
    for (p, ino) in &first {
        assert_eq!(fs::metadata(p).unwrap().ino(), *ino, "{}", p.display());
    }
    m.unmount().unwrap();
}
