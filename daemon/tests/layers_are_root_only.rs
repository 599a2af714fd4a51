//! Host users other than root cannot reach the layers: the mount root and
//! the mountpoint's parent are root's alone, so an unprivileged user can
//! neither list a layer, stat its files, run its set-user-id binaries nor
//! open its device nodes; a bind mount of a layer (what a container gets)
//! still runs set-user-id binaries. Needs root and /dev/fuse; runs commands
//! as nobody (uid 65534) with setpriv.

mod common;

use common::{require_root_and_fuse, Harness};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

/// Runs `sh -c script` as nobody, with no supplementary groups.
fn as_nobody(script: &str) -> Output {
    common::as_nobody(&["sh", "-c", script])
}

fn refused(script: &str) {
    let out = as_nobody(script);
    assert!(
        !out.status.success(),
        "nobody could run {script:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

#[test]
fn unprivileged_users_cannot_reach_layers() {
    require_root_and_fuse();
    let mut h = Harness::new();
    // Everything above the mountpoint's parent is open to all, as
    // /var/lib is: only lcfs's own directories may keep others out.
    std::fs::set_permissions(h.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let parent = h.dir.path().join("lcfs");
    std::fs::create_dir(&parent).unwrap();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
    h.mountpoint = parent.join("mnt");
    h.mkfs();
    h.start();
    h.ok(&["layer", "create", "c1"]);

    let layer = h.mountpoint.join("c1");
    std::fs::write(layer.join("file"), b"secret\n").unwrap();
    std::fs::set_permissions(layer.join("file"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::copy("/usr/bin/id", layer.join("suid-id")).unwrap();
    std::fs::set_permissions(
        layer.join("suid-id"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    let status = Command::new("mknod")
        .arg(layer.join("null"))
        .args(["c", "1", "3"])
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::set_permissions(layer.join("null"), std::fs::Permissions::from_mode(0o666)).unwrap();

    assert_eq!(mode(&h.mountpoint), 0o700, "the mount root");
    assert_eq!(mode(&parent) & 0o067, 0, "the mountpoint's parent");
    assert_eq!(mode(&layer), 0o755, "the layer itself keeps its mode");

    let l = layer.display();
    refused(&format!("ls '{l}'"));
    refused(&format!("stat '{l}/file'"));
    refused(&format!("cat '{l}/file'"));
    refused(&format!("'{l}/suid-id'"));
    refused(&format!("echo x > '{l}/null'"));
    // Not through the mount root either, even with the parent open.
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
    refused(&format!("ls '{l}'"));
    refused(&format!("stat '{l}/file'"));
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700)).unwrap();

    // What a container gets: its layer bind-mounted (runc then pivots into
    // it). Set-user-id binaries and devices still work there.
    let bind = h.dir.path().join("rootfs");
    std::fs::create_dir(&bind).unwrap();
    let status = Command::new("mount")
        .arg("--bind")
        .arg(&layer)
        .arg(&bind)
        .status()
        .unwrap();
    assert!(status.success());
    let out = as_nobody(&format!("'{}/suid-id' -u", bind.display()));
    let euid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let null_ok = as_nobody(&format!("echo x > '{}/null'", bind.display()));
    let _ = Command::new("umount").arg(&bind).status();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(euid, "0", "set-user-id still works inside a layer");
    assert!(null_ok.status.success(), "{null_ok:?}");

    let status = h.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}\n{}", h.log_text());
}
