//! Proves that through the `lcfs` CLI and a running daemon, layers are created, cloned, committed, listed, stat'ed and removed, and that files written in `<mnt>/<layer>/` read back there and in clones while the parent stays unchanged.

mod common;

use common::{require_root_and_fuse, Harness};
use serde_json::Value;
use std::fs;

#[test]
fn layer_commands_and_files_through_the_mount() {
    require_root_and_fuse();
    let mut h = Harness::new();
    h.mkfs();
    h.start();
    let mnt = h.mountpoint.clone();

    let out = h.ok(&["layer", "create", "base", "--cold"]);
    assert!(out.contains("created base"), "{out}");
    assert!(
        mnt.join("base").is_dir(),
        "the new layer is a directory of the mount"
    );
    fs::create_dir(mnt.join("base/etc")).unwrap();
    fs::write(mnt.join("base/etc/hostname"), b"lcfs-test\n").unwrap();
    assert_eq!(
        fs::read(mnt.join("base/etc/hostname")).unwrap(),
        b"lcfs-test\n"
    );

    let out = h.ok(&["layer", "clone", "base", "c1"]);
    assert!(out.contains("cloned base into c1"), "{out}");
    h.ok(&["layer", "create", "c2", "--parent", "base"]);
    assert_eq!(
        fs::read(mnt.join("c1/etc/hostname")).unwrap(),
        b"lcfs-test\n",
        "a clone sees its parent's files"
    );
    fs::write(mnt.join("c1/etc/hostname"), b"changed\n").unwrap();
    fs::write(mnt.join("c1/new-file"), b"only in c1").unwrap();
    assert_eq!(
        fs::read(mnt.join("base/etc/hostname")).unwrap(),
        b"lcfs-test\n"
    );
    assert_eq!(
        fs::read(mnt.join("c2/etc/hostname")).unwrap(),
        b"lcfs-test\n"
    );
    assert!(!mnt.join("c2/new-file").exists());
    let refused = fs::write(mnt.join("base/etc/hostname"), b"x").unwrap_err();
    assert_eq!(
        refused.raw_os_error(),
        Some(libc::EROFS),
        "a cloned (frozen) parent rejects writes"
    );

    let stat: Value = serde_json::from_str(&h.ok(&["layer", "stat", "base", "--json"])).unwrap();
    assert_eq!(stat["frozen"], true);
    assert_eq!(stat["children"], 2);
    assert_eq!(stat["cold"], true);
    assert_eq!(stat["path"], mnt.join("base").to_str().unwrap());
    let text = h.ok(&["layer", "stat", "c1"]);
    assert!(text.contains("parent:    base"), "{text}");
    assert!(text.contains("writable"), "{text}");

    h.ok(&["layer", "commit", "c1"]);
    let list: Vec<Value> = serde_json::from_str(&h.ok(&["layer", "ls", "--json"])).unwrap();
    let names: Vec<&str> = list.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["base", "c1", "c2"]);
    assert_eq!(list[1]["frozen"], true, "c1 was committed");
    let table = h.ok(&["layer", "ls"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");

    let e = h.fails(&["layer", "rm", "base"]);
    assert!(e.starts_with("lcfs: "), "{e}");
    let e = h.fails(&["layer", "create", "c1"]);
    assert!(e.contains("already exists"), "{e}");
    let e = h.fails(&["layer", "stat", "nope"]);
    assert!(e.contains("nope"), "{e}");

    h.ok(&["layer", "rm", "c2"]);
    assert!(
        !mnt.join("c2").exists(),
        "a removed layer's directory goes away"
    );
    h.ok(&["sync"]);
    let stats: Value = serde_json::from_str(&h.ok(&["stats", "--json"])).unwrap();
    assert_eq!(stats["layers"], 2);
    assert!(
        stats["device_io"]["writes"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(
        stats["engine"]["user_write_calls"].as_u64().unwrap() >= 2,
        "{stats}"
    );
    assert!(stats["coalescing_ratio"].is_number());
    let text = h.ok(&["stats"]);
    for line in [
        "coalescing:",
        "node cache:",
        "block cache:",
        "space:",
        "layers:",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    let report = h.ok(&["fsck", "--online", "--verify-data"]);
    assert!(report.contains("clean"), "{report}");

    let status = h.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}\n{}", h.log_text());
    h.start();
    assert_eq!(
        fs::read(mnt.join("c1/etc/hostname")).unwrap(),
        b"changed\n",
        "files survive a restart"
    );
    assert_eq!(fs::read(mnt.join("c1/new-file")).unwrap(), b"only in c1");
}
