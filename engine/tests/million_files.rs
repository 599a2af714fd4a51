//! A layer of 1,000,000 files, reopened with a 64 MiB metadata cache, is read
//! completely (every directory listed, every inode's attributes, every file
//! with data read) while the process stays under 256 MiB of peak RSS.
//! LCFS_MILLION_FILES changes the count (for quick local runs).

use lcfs_engine::device::{create_sparse_file, open_device, Backend, Device, OpenOptions};
use lcfs_engine::*;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn open(path: &Path) -> Arc<dyn Device> {
    Arc::from(
        open_device(
            path,
            &OpenOptions {
                backend: Backend::Auto,
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

#[test]
fn million_file_layer_reads_in_bounded_memory() {
    let files: u64 = std::env::var("LCFS_MILLION_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let per_dir = 1000u64;
    let path = std::env::temp_dir().join(format!("lcfs-million-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    create_sparse_file(&path, 4 << 30).unwrap();
    struct Cleanup<'a>(&'a Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _cleanup = Cleanup(&path);
    let cache = Config {
        node_cache_bytes: 64 << 20,
        block_cache_bytes: 16 << 20,
        ..Config::default()
    };
    let t = Instant::now();
    {
        let dev = open(&path);
        Engine::format(dev.clone(), &FormatOptions::default()).unwrap();
        let e = Engine::open(dev, cache.clone()).unwrap();
        let l = e.create_layer("big", true).unwrap();
        let mut dir = 0;
        for i in 0..files {
            if i % per_dir == 0 {
                dir = e
                    .mkdir(
                        l,
                        ROOT_INODE,
                        format!("d{}", i / per_dir).as_bytes(),
                        0o755,
                        0,
                        0,
                    )
                    .unwrap()
                    .inode;
            }
            let f = e
                .create(l, dir, format!("file-{i:08}").as_bytes(), 0o644, 0, 0)
                .unwrap();
            if i % 100 == 0 {
                e.write(l, f.inode, 0, format!("content of {i}").as_bytes())
                    .unwrap();
            }
        }
        e.close().unwrap();
        println!(
            "created {files} files in {:?}; peak RSS while creating {} MiB",
            t.elapsed(),
            status_kib("VmHWM") / 1024
        );
    }
    // Reset the peak-RSS mark, then read everything back.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let base = status_kib("VmHWM");
    let t = Instant::now();
    let e = Engine::open(open(&path), cache).unwrap();
    let l = e.layer_id("big").unwrap();
    assert_eq!(
        e.layer_info("big").unwrap().inode_count,
        files + files.div_ceil(per_dir) + 1
    );
    let mut seen = 0u64;
    let mut with_data = 0u64;
    let dirs = e.readdir_plus(l, ROOT_INODE, 0, usize::MAX).unwrap();
    assert_eq!(dirs.len() as u64, files.div_ceil(per_dir));
    for (d, _) in dirs {
        let mut cookie = 0;
        loop {
            let batch = e.readdir_plus(l, d.inode, cookie, 256).unwrap();
            if batch.is_empty() {
                break;
            }
            for (ent, attr) in batch {
                cookie = ent.cookie;
                seen += 1;
                if attr.size > 0 {
                    let want_index: u64 = std::str::from_utf8(&ent.name).unwrap()[5..]
                        .parse()
                        .unwrap();
                    let got = e.read(l, ent.inode, 0, 64).unwrap();
                    assert_eq!(got, format!("content of {want_index}").as_bytes());
                    with_data += 1;
                }
            }
        }
    }
    assert_eq!(seen, files);
    assert_eq!(with_data, files.div_ceil(100));
    let peak = status_kib("VmHWM");
    let st = e.stats();
    println!(
        "read {seen} files in {:?}: peak RSS {} MiB (at open {} MiB); node cache {} MiB in {} nodes, {} misses",
        t.elapsed(),
        peak / 1024,
        base / 1024,
        st.node_cache_bytes >> 20,
        st.node_cache_nodes,
        st.node_cache_misses
    );
    assert!(
        peak < 256 * 1024,
        "peak RSS {} MiB exceeds 256 MiB",
        peak / 1024
    );
}
