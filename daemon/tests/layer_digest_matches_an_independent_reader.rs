//! `lcfs layer digest` gives the root docs/format.md defines: the same as
//! scripts/layer-root.py (an implementation of that page alone) over the
//! layer's directory, whose file digests are those of fsverity-utils'
//! `fsverity digest`; the same tree written on another device in another
//! order gives the same root, online and offline (`--device`); `--expect`
//! fails on another root and refuses a malformed one before reading
//! anything; unknown layers and truncated devices get clear errors.

mod common;

use common::Harness;
use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 11) as u8)
        .collect()
}

/// A small image-like tree in `dir`: every entry type the root covers.
fn write_tree(dir: &Path, reverse: bool) {
    let mut files: Vec<(&str, u32, usize)> = vec![
        ("etc/hostname", 1, 9),
        ("etc/empty", 2, 0),
        ("usr/lib/one-block", 3, 4096),
        ("usr/lib/two-levels", 4, 4096 * 130 + 17),
        ("a-b", 5, 5000),
    ];
    if reverse {
        files.reverse();
    }
    for d in ["etc", "usr", "usr/lib", "a"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    for (path, seed, len) in files {
        fs::write(dir.join(path), pattern(seed, len)).unwrap();
    }
    fs::set_permissions(
        dir.join("usr/lib/one-block"),
        fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::os::unix::fs::chown(dir.join("etc/hostname"), Some(100), Some(101)).unwrap();
    xattr(&dir.join("a-b"), "user.origin", b"test");
    symlink("../a-b", dir.join("a/link")).unwrap();
    fs::hard_link(dir.join("a-b"), dir.join("a/hard")).unwrap();
    let fifo = CString::new(dir.join("a/fifo").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
}

fn xattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.to_str().unwrap()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of value.len() bytes.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr {}", path.display());
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn reference_script() -> String {
    format!("{}/../scripts/layer-root.py", env!("CARGO_MANIFEST_DIR"))
}

fn root_of(json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["root"].as_str().unwrap().to_string()
}

#[test]
fn the_root_is_the_independent_readers_and_the_same_on_another_device() {
    let mut a = Harness::started();
    a.ok(&["layer", "create", "img"]);
    write_tree(&a.mountpoint.join("img"), false);
    let root = root_of(&a.ok(&["layer", "digest", "img", "--json"]));

    // The reference implementation over the layer's directory.
    let dir = a.mountpoint.join("img");
    let reference = run(
        "python3",
        &[&reference_script(), "--files", dir.to_str().unwrap()],
    );
    let mut lines: Vec<&str> = reference.lines().collect();
    assert_eq!(lines.pop(), Some(root.as_str()), "{reference}");
    // Its file digests are fsverity-utils'.
    assert_eq!(lines.len(), 6, "{reference}");
    for line in lines {
        let (digest, path) = line.split_once(' ').unwrap();
        let file = dir.join(path);
        let tool = run("fsverity", &["digest", file.to_str().unwrap()]);
        assert_eq!(tool.split_whitespace().next(), Some(digest), "{path}");
    }

    // Another device, the tree written in another order.
    let mut b = Harness::started();
    b.ok(&["layer", "create", "other"]);
    write_tree(&b.mountpoint.join("other"), true);
    b.ok(&["layer", "digest", "other", "--expect", &root]);
    // A change anywhere is another root.
    fs::write(b.mountpoint.join("other/etc/empty"), b"x").unwrap();
    let err = b.fails(&["layer", "digest", "other", "--expect", &root]);
    assert!(err.contains("not the expected"), "{err}");
    assert!(b.stop_with(libc::SIGTERM).success());

    // Offline, once the daemon let go of the device; refused while it runs.
    let err = a.fails(&["layer", "digest", "img", "--device", a.device_str()]);
    assert!(err.contains("stop the daemon first"), "{err}");
    a.ok(&["sync"]);
    assert!(a.stop_with(libc::SIGTERM).success());
    let offline = a.ok(&[
        "layer",
        "digest",
        "img",
        "--device",
        a.device_str(),
        "--json",
    ]);
    assert_eq!(root_of(&offline), root);
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let mut h = Harness::started();
    h.ok(&["layer", "create", "img"]);
    fs::write(h.mountpoint.join("img/f"), b"data").unwrap();
    let err = h.fails(&["layer", "digest", "nope"]);
    assert!(err.contains("\"nope\"") && err.contains("no such"), "{err}");
    for bad in ["sha256:1234", "md5:00", &"z".repeat(64)] {
        let err = h.fails(&["layer", "digest", "img", "--expect", bad]);
        assert!(err.contains("is not a SHA-256 digest"), "{bad}: {err}");
    }
    h.ok(&["sync"]);
    assert!(h.stop_with(libc::SIGTERM).success());

    // A truncated copy of the device.
    let copy = h.dir.path().join("truncated.img");
    fs::copy(&h.device, &copy).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&copy).unwrap();
    f.set_len(1 << 20).unwrap();
    drop(f);
    let err = h.fails(&["layer", "digest", "img", "--device", copy.to_str().unwrap()]);
    assert!(!err.is_empty() && !err.contains("panicked"), "{err}");
    // The original is untouched and still clean.
    let report = h.ok(&["fsck", h.device_str()]);
    assert!(report.contains(": clean"), "{report}");
}

#[test]
fn verify_names_each_entry_that_differs_from_a_manifest() {
    let mut h = Harness::started();
    h.ok(&["layer", "create", "img"]);
    let dir = h.mountpoint.join("img");
    write_tree(&dir, false);
    let manifest = h.dir.path().join("img.manifest");
    let m = manifest.to_str().unwrap();
    let root = root_of(&h.ok(&["layer", "digest", "img", "--manifest", m, "--json"]));
    // The manifest's SHA-256 is the root.
    let sum = run("sha256sum", &[m]);
    assert_eq!(format!("sha256:{}", &sum[..64]), root);
    let out = h.ok(&["verify", "img", "--manifest", m, "--expect", &root]);
    assert!(out.contains("0 entries differ"), "{out}");
    // A second manifest is never written over the first.
    let err = h.fails(&["layer", "digest", "img", "--manifest", m]);
    assert!(err.contains("exists"), "{err}");

    fs::set_permissions(dir.join("etc/hostname"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(dir.join("usr/lib/two-levels"), b"replaced").unwrap();
    fs::write(dir.join("new"), b"added").unwrap();
    fs::remove_file(dir.join("a/fifo")).unwrap();
    let out = h.lcfs(&["verify", "img", "--manifest", m, "--json"]);
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<String> = v["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| format!("{} {}", d["path"].as_str().unwrap(), d["what"]))
        .collect();
    assert_eq!(
        got,
        [
            r#"a/fifo ["missing"]"#,
            r#"etc/hostname ["mode"]"#,
            r#"new ["added"]"#,
            r#"usr/lib/two-levels ["content"]"#,
        ],
        "{v}"
    );
    // A root that is not the manifest's.
    let other = format!("sha256:{}", "0".repeat(64));
    let err = h.fails(&["verify", "img", "--manifest", m, "--expect", &other]);
    assert!(err.contains("not the expected"), "{err}");
    // Not a manifest.
    let junk = h.dir.path().join("junk");
    fs::write(&junk, b"junk").unwrap();
    let err = h.fails(&["verify", "img", "--manifest", junk.to_str().unwrap()]);
    assert!(err.contains("not an lcfs layer manifest"), "{err}");

    // Offline, the same report.
    h.ok(&["sync"]);
    assert!(h.stop_with(libc::SIGTERM).success());
    let out = h.lcfs(&["verify", "img", "--manifest", m, "--device", h.device_str()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && text.contains("4 entries differ"),
        "{text}"
    );
}
