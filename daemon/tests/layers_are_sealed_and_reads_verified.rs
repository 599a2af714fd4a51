//! Seals and verified reads on a real daemon (docs/integrity.md): a frozen
//! layer is sealed in the background, its root shows in `lcfs layer stat`,
//! `lcfs top layers --json` and the statistics API, and `lcfs verify`
//! checks it against the seal (one layer, or `--all`). A data block then
//! rewritten offline with its checksum fixed (the device edit block
//! checksums cannot see) is found by `lcfs verify` with its path, and with
//! verified reads on (the daemon option, or the layer's flag) every read of
//! that file, in the image layer and in a container's clone of it, is EIO,
//! counted and logged, while every other file reads back whole. With
//! trusted roots kept apart from the device, only layers whose seal has a
//! listed root are served.

mod common;

use common::Harness;
use lcfs_engine::device::{open_device, OpenOptions};
use lcfs_engine::{Config, Engine, ROOT_INODE};
use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 9) as u8)
        .collect()
}

const FILES: [(&str, u32, usize); 4] = [
    ("bin/tool", 1, 300_000),
    ("lib/libc.so", 2, 1 << 20),
    ("etc/conf", 3, 100),
    ("empty", 4, 0),
];

/// Layer `img` with FILES, committed, and its clone `run`.
fn image(h: &Harness) {
    h.ok(&["layer", "create", "img"]);
    let dir = h.mountpoint.join("img");
    for d in ["bin", "lib", "etc"] {
        fs::create_dir(dir.join(d)).unwrap();
    }
    for (path, seed, len) in FILES {
        fs::write(dir.join(path), pattern(seed, len)).unwrap();
    }
    h.ok(&["layer", "commit", "img"]);
    h.ok(&["layer", "clone", "img", "run"]);
}

fn stat(h: &Harness, name: &str) -> Value {
    serde_json::from_str(&h.ok(&["layer", "stat", name, "--json"])).unwrap()
}

/// Waits (at most 60 s) for the background sealer to seal `name`.
fn sealed(h: &Harness, name: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = stat(h, name);
        if l["seal"] == "sealed" {
            return l["root"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "not sealed in 60 s: {l}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn get(socket: &std::path::Path, target: &str) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: lcfs\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer.split_once("\r\n\r\n").unwrap().1.to_string()
}

#[test]
fn frozen_layers_are_sealed_in_the_background_and_verified_against_the_seal() {
    let h = Harness::started();
    image(&h);
    assert_eq!(stat(&h, "run")["seal"], "writable");
    let root = sealed(&h, "img");
    let digest: Value = serde_json::from_str(&h.ok(&["layer", "digest", "img", "--json"])).unwrap();
    assert_eq!(
        digest["root"],
        root.as_str(),
        "the seal holds the layer root"
    );
    assert!(
        h.log_text().contains("sealed layer img"),
        "{}",
        h.log_text()
    );
    let text = h.ok(&["layer", "stat", "img"]);
    assert!(text.contains(&format!("sealed, root {root}")), "{text}");

    // Against the seal: one layer, every layer, and the root expected.
    let out = h.ok(&["verify", "img", "--expect", &root]);
    assert!(out.contains("img: 0 entries differ from its seal"), "{out}");
    let all: Value = serde_json::from_str(&h.ok(&["verify", "--all", "--json"])).unwrap();
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 1, "run is writable: {all:?}");
    assert_eq!(all[0]["against"], "seal");
    let other = format!("sha256:{}", "0".repeat(64));
    let err = h.fails(&["verify", "img", "--expect", &other]);
    assert!(err.contains("not the expected"), "{err}");
    let err = h.fails(&["verify", "run"]);
    assert!(err.contains("writable"), "{err}");
    let err = h.fails(&["verify", "nope"]);
    assert!(err.contains("no such"), "{err}");
    let err = h.fails(&["verify", "img", "--expect", "sha256:12"]);
    assert!(err.contains("is not a SHA-256 digest"), "{err}");

    // The root where orchestration reads it.
    let top: Value = serde_json::from_str(&h.ok(&["top", "layers", "--json"])).unwrap();
    let row = top
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "img")
        .unwrap()
        .clone();
    assert_eq!(row["root"], root.as_str());
    let stats_socket = h.socket.parent().unwrap().join("stats.sock");
    let rest: Value = serde_json::from_str(&get(&stats_socket, "/v1/layers/img")).unwrap();
    assert_eq!(rest["root"], root.as_str());
    assert_eq!(rest["seal"], "sealed");
}

/// Flips one byte of block 1 of file `path` of layer `img` on the device
/// (the daemon stopped) and fixes the checksum its map entry records.
fn tamper(h: &Harness, path: &str) {
    let dev = open_device(&h.device, &OpenOptions::default()).unwrap();
    let quiet = Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..Config::default()
    };
    let e = Engine::open(Arc::from(dev), quiet).unwrap();
    let l = e.layer_id("img").unwrap();
    let mut ino = ROOT_INODE;
    for part in path.split('/') {
        ino = e.lookup(l, ino, part.as_bytes()).unwrap().inode;
    }
    e.tamper_block(l, ino, 1, |b| b[17] ^= 0x40).unwrap();
    e.sync().unwrap();
    e.close().unwrap();
}

fn read(h: &Harness, layer: &str, path: &str) -> std::io::Result<Vec<u8>> {
    fs::read(h.mountpoint.join(layer).join(path))
}

#[test]
fn verified_reads_refuse_a_tampered_file_and_serve_every_other() {
    let mut h = Harness::started();
    image(&h);
    sealed(&h, "img");
    h.ok(&["sync"]);
    assert!(h.stop_with(libc::SIGTERM).success());
    tamper(&h, "lib/libc.so");

    // Block checksums and fsck see nothing; verify finds the file.
    let report = h.ok(&["fsck", h.device_str(), "--verify-data"]);
    assert!(report.contains(": clean"), "{report}");
    let out = h.lcfs(&["verify", "img", "--device", h.device_str()]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("lib/libc.so: content"), "{text}");
    assert!(text.contains("1 entries differ from its seal"), "{text}");

    // A truncated copy of the device: a clear error, the original untouched.
    let copy = h.dir.path().join("truncated.img");
    fs::copy(&h.device, &copy).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&copy)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let err = h.fails(&["verify", "img", "--device", copy.to_str().unwrap()]);
    assert!(!err.is_empty() && !err.contains("panicked"), "{err}");

    // The daemon option.
    h.daemon_args = vec!["--verify-reads".into()];
    h.start();
    for layer in ["img", "run"] {
        let e = read(&h, layer, "lib/libc.so").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{layer}: {e}");
        for (path, seed, len) in FILES {
            if path != "lib/libc.so" {
                assert_eq!(read(&h, layer, path).unwrap(), pattern(seed, len), "{path}");
            }
        }
    }
    let stats: Value = serde_json::from_str(&h.ok(&["stats", "--json"])).unwrap();
    assert!(stats["verify_failures"].as_u64().unwrap() >= 2, "{stats}");
    assert!(stats["verified_blocks"].as_u64().unwrap() > 70, "{stats}");
    let log = h.log_text();
    assert!(
        log.contains("verified read refused: layer img, /lib/libc.so: block 1 does not match"),
        "{log}"
    );
    let out = h.lcfs(&["verify", "img"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("lib/libc.so: content"));
    assert_eq!(stat(&h, "img")["verified_reads"], true);
    assert!(h.stop_with(libc::SIGTERM).success());

    // Without it, the tampered bytes are served; the layer's flag (kept
    // with the layer) turns the check on for that layer alone.
    h.daemon_args.clear();
    h.start();
    assert_eq!(stat(&h, "img")["verified_reads"], false);
    h.ok(&["layer", "verify-reads", "img", "on"]);
    h.ok(&["sync"]);
    assert!(h.stop_with(libc::SIGTERM).success());
    h.start();
    assert_eq!(stat(&h, "img")["verified_reads"], true);
    let e = read(&h, "run", "lib/libc.so").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert_eq!(read(&h, "run", "bin/tool").unwrap(), pattern(1, 300_000));
    h.ok(&["layer", "verify-reads", "img", "off"]);
    assert_eq!(stat(&h, "img")["verified_reads"], false);
}

/// Writes the trusted roots file at `path` as root's, 0644, in one rename
/// (as an agent that keeps it would).
fn trust(path: &std::path::Path, roots: &[&str]) {
    use std::os::unix::fs::PermissionsExt;
    let text: String = roots.iter().map(|r| format!("{r}  a layer\n")).collect();
    let next = path.with_extension("next");
    fs::write(&next, format!("# roots kept apart from the device\n{text}")).unwrap();
    fs::set_permissions(&next, fs::Permissions::from_mode(0o644)).unwrap();
    fs::rename(&next, path).unwrap();
}

/// Reads `path` of `layer` until `ok` holds for the result (at most 15 s:
/// the daemon looks at the roots file every second), the page cache
/// dropped before each try.
fn read_until(
    h: &Harness,
    layer: &str,
    path: &str,
    ok: impl Fn(&std::io::Result<Vec<u8>>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        let r = read(h, layer, path);
        if ok(&r) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{layer}/{path}: {r:?} after 15 s\n{}",
            h.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// With roots kept apart from the device (`--trusted-roots`), a layer
/// under verified reads is served only when its seal's root is listed:
/// another layer, sealed right on the device (as a layer rewritten and
/// sealed again would be), is EIO until its root is added; a layer not
/// sealed yet is sealed by its first read; a bad file stops the start and,
/// once running, leaves the roots in force.
#[test]
fn trusted_roots_kept_apart_from_the_device_decide_what_is_served() {
    let mut h = Harness::started();
    image(&h);
    let root = sealed(&h, "img");
    h.ok(&["layer", "create", "other"]);
    fs::write(h.mountpoint.join("other/data"), pattern(9, 200_000)).unwrap();
    h.ok(&["layer", "commit", "other"]);
    let other = sealed(&h, "other");
    h.ok(&["sync"]);
    assert!(h.stop_with(libc::SIGTERM).success());

    // A bad file stops the start, with its line named.
    let roots = h.dir.path().join("trusted-roots");
    fs::write(&roots, format!("{root}\nsha256:xyz\n")).unwrap();
    let args = |h: &mut Harness| {
        h.daemon_args = vec![
            "--verify-reads".into(),
            "--trusted-roots".into(),
            roots.to_str().unwrap().into(),
        ];
    };
    args(&mut h);
    let out = h
        .daemon_command(&h.device, &h.mountpoint, &h.socket)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("line 2"), "{err}");

    trust(&roots, &[&root]);
    h.start();
    for layer in ["img", "run"] {
        for (path, seed, len) in FILES {
            assert_eq!(read(&h, layer, path).unwrap(), pattern(seed, len), "{path}");
        }
    }
    let e = read(&h, "other", "data").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let log = h.log_text();
    assert!(
        log.contains(&format!("its root {other} is not among the trusted roots")),
        "{log}"
    );

    // Its root added: served, once the daemon read the file again.
    trust(&roots, &[&root, &other]);
    read_until(&h, "other", "data", |r| {
        r.as_deref().ok() == Some(&pattern(9, 200_000)[..])
    });
    // A bad file now: the roots in force stay.
    fs::write(&roots, "sha256:00\n").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        h.log_text().contains("those in force stay"),
        "{}",
        h.log_text()
    );
    read_until(&h, "other", "data", |r| r.is_ok());
    // Taken out again: EIO.
    trust(&roots, &[&root]);
    read_until(&h, "other", "data", |r| {
        r.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EIO)
    });
    assert_eq!(read(&h, "run", "bin/tool").unwrap(), pattern(1, 300_000));
    assert!(h.stop_with(libc::SIGTERM).success());

    // A layer not sealed yet (no background sealer) is sealed by its
    // first verified read, and served when that root is trusted.
    h.daemon_args.push("--no-seal".into());
    h.start();
    h.ok(&["layer", "create", "late"]);
    fs::write(h.mountpoint.join("late/data"), pattern(5, 100_000)).unwrap();
    h.ok(&["layer", "commit", "late"]);
    assert_eq!(stat(&h, "late")["seal"], "unsealed");
    let v: Value = serde_json::from_str(&h.ok(&["layer", "digest", "late", "--json"])).unwrap();
    let late = v["root"].as_str().unwrap().to_string();
    trust(&roots, &[&root, &late]);
    read_until(&h, "late", "data", |r| {
        r.as_deref().ok() == Some(&pattern(5, 100_000)[..])
    });
    assert_eq!(stat(&h, "late")["seal"], "sealed");
    assert_eq!(stat(&h, "late")["root"], late.as_str());
}
