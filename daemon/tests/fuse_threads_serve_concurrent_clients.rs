//! Proves that with several threads reading /dev/fuse (`--fuse-threads 4`, each on a cloned descriptor), concurrent clients creating, writing, reading, renaming and removing files in one layer all see their own data, a clone then shows exactly what they left, and online fsck is clean.

mod common;

use common::{require_root_and_fuse, Harness};
use std::fs;
use std::path::Path;

const CLIENTS: usize = 8;
const FILES: usize = 150;

/// The content of file `j` of client `i`: its size and bytes depend on both.
fn content(i: usize, j: usize) -> Vec<u8> {
    let size = (i * 7919 + j * 104_729) % 70_000;
    (0..size).map(|k| (k * 31 + i * 17 + j) as u8).collect()
}

/// Where file `j` of client `i` ends up: odd files are renamed, every
/// tenth is removed (None).
fn final_name(j: usize) -> Option<String> {
    match j {
        j if j % 10 == 0 => None,
        j if j % 2 == 1 => Some(format!("renamed-{j}")),
        j => Some(format!("f-{j}")),
    }
}

fn client(root: &Path, i: usize) {
    let dir = root.join(format!("client-{i}"));
    fs::create_dir(&dir).unwrap();
    for j in 0..FILES {
        let path = dir.join(format!("f-{j}"));
        let data = content(i, j);
        fs::write(&path, &data).unwrap();
        assert!(fs::read(&path).unwrap() == data, "client {i} file {j}");
        match final_name(j) {
            None => fs::remove_file(&path).unwrap(),
            Some(name) if name != format!("f-{j}") => fs::rename(&path, dir.join(name)).unwrap(),
            Some(_) => {}
        }
    }
}

#[test]
fn several_fuse_threads_serve_concurrent_clients() {
    require_root_and_fuse();
    let mut h = Harness::new();
    h.daemon_args = vec!["--fuse-threads".into(), "4".into()];
    h.mkfs();
    h.start();
    assert!(
        h.log_text().contains("4 thread(s) reading /dev/fuse"),
        "{}",
        h.log_text()
    );
    let mnt = h.mountpoint.clone();
    h.ok(&["layer", "create", "base"]);
    let root = mnt.join("base");
    std::thread::scope(|s| {
        for i in 0..CLIENTS {
            let root = &root;
            s.spawn(move || client(root, i));
        }
    });
    h.ok(&["layer", "clone", "base", "copy"]);
    for layer in ["base", "copy"] {
        for i in 0..CLIENTS {
            let dir = mnt.join(layer).join(format!("client-{i}"));
            let mut names: Vec<String> = fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            let mut want: Vec<String> = (0..FILES).filter_map(final_name).collect();
            want.sort();
            assert_eq!(names, want, "{layer}: client {i}'s directory");
            for j in 0..FILES {
                if let Some(name) = final_name(j) {
                    assert!(
                        fs::read(dir.join(&name)).unwrap() == content(i, j),
                        "{layer}: client {i} file {name}"
                    );
                }
            }
        }
    }
    let report = h.ok(&["fsck", "--online", "--verify-data"]);
    assert!(report.contains("clean"), "{report}");
}
