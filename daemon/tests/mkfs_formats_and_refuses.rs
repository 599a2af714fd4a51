//! Proves that `lcfs mkfs` creates a sparse device file, refuses a device carrying another filesystem or an lcfs (even one it cannot open) unless --force, and that `lcfs fsck` checks the result offline with exit code 0.

mod common;

use common::Harness;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};

#[test]
fn creates_a_sparse_file_and_refuses_signatures() {
    let h = Harness::new();
    let dev = h.device_str();

    let e = h.fails(&["mkfs", dev]);
    assert!(e.contains("--size"), "{e}");
    assert!(!h.device.exists());

    let out = h.ok(&["mkfs", dev, "--size", "2G", "--segment-size", "1M"]);
    assert!(out.contains("formatted"), "{out}");
    let m = fs::metadata(&h.device).unwrap();
    assert_eq!(m.len(), 2 << 30);
    assert!(m.blocks() * 512 < 64 << 20, "the file is sparse");
    let report = h.ok(&["fsck", dev]);
    assert!(report.contains(": clean"), "{report}");

    let e = h.fails(&["mkfs", dev]);
    assert!(
        e.contains("already holds an lcfs") && e.contains("--force"),
        "{e}"
    );
    h.ok(&["mkfs", dev, "--force"]);

    // An lcfs whose both superblocks are corrupt is still an lcfs: refused.
    let f = fs::OpenOptions::new().write(true).open(&h.device).unwrap();
    for slot in 0..2u64 {
        f.write_all_at(&[0xA5; 16], slot * 4096 + 64).unwrap();
    }
    drop(f);
    let e = h.fails(&["mkfs", dev]);
    assert!(
        e.contains("cannot be opened") && e.contains("--force"),
        "{e}"
    );
    h.ok(&["mkfs", dev, "--force"]);

    // An ext4 superblock magic (0xEF53 at byte 1080) marks another filesystem.
    let other = h.dir.path().join("ext4.img");
    let f = fs::File::create(&other).unwrap();
    f.set_len(256 << 20).unwrap();
    f.write_all_at(&[0x53, 0xEF], 0x438).unwrap();
    f.write_all_at(&0x40u32.to_le_bytes(), 0x460).unwrap();
    drop(f);
    let other = other.to_str().unwrap();
    let e = h.fails(&["mkfs", other]);
    assert!(e.starts_with("lcfs: ") && e.contains("ext4"), "{e}");
    h.ok(&["mkfs", other, "--force"]);

    let e = h.fails(&["mkfs", dev, "--segment-size", "3K", "--force"]);
    assert!(e.contains("segment size"), "{e}");
    let e = h.fails(&["fsck", h.dir.path().join("missing.img").to_str().unwrap()]);
    assert!(e.contains("lcfs mkfs"), "{e}");
}

#[test]
fn every_command_explains_itself() {
    let h = Harness::new();
    let top = h.ok(&["--help"]);
    for command in ["mkfs", "daemon", "layer", "sync", "stats", "fsck"] {
        assert!(top.contains(command), "{command} missing from --help");
        let help = h.ok(&[command, "--help"]);
        assert!(help.len() > 100, "{command} --help is too short:\n{help}");
    }
    for command in ["create", "clone", "commit", "rm", "ls", "stat"] {
        h.ok(&["layer", command, "--help"]);
    }
}
