//! Proves the daemon's life cycle: it refuses an unformatted device and a device another daemon holds, SIGTERM and SIGINT shut it down cleanly (exit 0, mount and socket gone, device fsck clean), a dead mount left by kill -9 is cleared at the next start, and a layer removal cut short by kill -9 is freed to the end after the restart.

mod common;

use common::{require_root_and_fuse, Harness};
use std::fs;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn refuses_an_unformatted_device() {
    require_root_and_fuse();
    let h = Harness::new();
    fs::File::create(&h.device)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let out = h
        .daemon_command(&h.device, &h.mountpoint, &h.socket)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("lcfs mkfs"), "{stderr}");
    assert!(!Harness::is_mounted(&h.mountpoint));
}

#[test]
fn sigterm_shuts_down_cleanly_and_the_device_is_exclusive() {
    let mut h = Harness::started();
    assert!(Harness::is_mounted(&h.mountpoint));
    h.ok(&["layer", "create", "data"]);
    fs::write(h.mountpoint.join("data/file"), vec![7u8; 100_000]).unwrap();

    // A second daemon on the same device is refused, even with its own
    // mountpoint and socket.
    let other_mount = h.dir.path().join("mnt2");
    let out = h
        .daemon_command(&h.device, &other_mount, &h.dir.path().join("other.sock"))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    assert!(!Harness::is_mounted(&other_mount));

    // Offline tools keep off a device the daemon holds.
    let e = h.fails(&["fsck", h.device_str()]);
    assert!(e.contains("in use") && e.contains("--online"), "{e}");
    let e = h.fails(&["mkfs", h.device_str(), "--force"]);
    assert!(e.contains("in use"), "{e}");

    let status = h.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}\n{}", h.log_text());
    assert!(!Harness::is_mounted(&h.mountpoint), "the mount is gone");
    assert!(!h.socket.exists(), "the socket is gone");
    let e = h.fails(&["layer", "ls"]);
    assert!(
        e.contains(&format!(
            "is `lcfs daemon` running? (no socket at {})",
            h.socket.display()
        )),
        "{e}"
    );
    let report = h.ok(&["fsck", h.device_str(), "--verify-data"]);
    assert!(report.contains(": clean"), "{report}");

    // SIGINT too, and the data written before SIGTERM is there.
    h.start();
    assert_eq!(
        fs::read(h.mountpoint.join("data/file")).unwrap(),
        vec![7u8; 100_000]
    );
    let status = h.stop_with(libc::SIGINT);
    assert!(status.success(), "{status}\n{}", h.log_text());
    assert!(!Harness::is_mounted(&h.mountpoint));
}

#[test]
fn a_dead_mount_from_kill_9_is_cleared_at_start() {
    let mut h = Harness::started();
    h.ok(&["layer", "create", "kept"]);
    h.ok(&["sync"]);
    let status = h.stop_with(libc::SIGKILL);
    assert!(!status.success());
    let stale = fs::metadata(&h.mountpoint).unwrap_err();
    assert_eq!(
        stale.raw_os_error(),
        Some(libc::ENOTCONN),
        "a dead FUSE mount is left"
    );
    assert!(h.socket.exists(), "a stale socket is left");

    h.start();
    assert!(h.log_text().contains("dead FUSE mount"), "{}", h.log_text());
    assert!(
        h.mountpoint.join("kept").is_dir(),
        "the synced layer survived"
    );
    let status = h.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}\n{}", h.log_text());
    let report = h.ok(&["fsck", h.device_str()]);
    assert!(report.contains(": clean"), "{report}");
}

/// `live_bytes` and `removals_pending` of `lcfs stats --json`.
fn space(h: &Harness) -> (u64, u64) {
    let s: serde_json::Value = serde_json::from_str(&h.ok(&["stats", "--json"])).unwrap();
    (
        s["live_bytes"].as_u64().unwrap(),
        s["removals_pending"].as_u64().unwrap(),
    )
}

#[test]
fn a_removal_cut_short_by_kill_9_goes_on_after_the_restart() {
    let mut h = Harness::started();
    h.ok(&["layer", "create", "kept"]);
    fs::write(h.mountpoint.join("kept/file"), b"kept").unwrap();
    h.ok(&["sync"]);
    let (baseline, _) = space(&h);
    h.ok(&["layer", "create", "big"]);
    for d in 0..20 {
        let dir = h.mountpoint.join(format!("big/d{d}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..500 {
            fs::write(dir.join(format!("f{f}")), vec![d as u8; 4096 + f]).unwrap();
        }
    }
    h.ok(&["sync"]);
    let (full, _) = space(&h);
    assert!(
        full > baseline + (60 << 20),
        "{full} live, {baseline} before"
    );

    // A restart empties the daemon's caches: the freeing then reads the
    // layer's tree from the device, long enough for the sync below to
    // land midway (the engine's tests crash midway deterministically).
    assert!(h.stop_with(libc::SIGTERM).success());
    h.start();
    // The removal answers before the space is free; a sync records what is
    // left to free, and kill -9 cuts the freeing short.
    h.ok(&["layer", "rm", "big"]);
    h.ok(&["sync"]);
    let status = h.stop_with(libc::SIGKILL);
    assert!(!status.success());

    h.start();
    eprintln!(
        "{}",
        h.log_text()
            .lines()
            .find(|l| l.contains("opened lcfs"))
            .unwrap_or("")
    );
    assert!(
        !h.mountpoint.join("big").exists(),
        "the removal was durable"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (live, pending) = space(&h);
        if pending == 0 && live < baseline + (4 << 20) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 60 s: {live} bytes live ({baseline} before the big layer), {pending} removal(s) pending"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fs::read(h.mountpoint.join("kept/file")).unwrap(), b"kept");
    let status = h.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}\n{}", h.log_text());
    let report = h.ok(&["fsck", h.device_str()]);
    assert!(report.contains(": clean"), "{report}");
}
