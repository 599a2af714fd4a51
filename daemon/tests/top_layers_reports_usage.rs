//! Proves `lcfs top layers` through a real daemon and FUSE mount: clones of
//! two image layers and reads through their containers' directories are
//! counted (image X started five times ranks above image Y started twice;
//! `--sort reads` ranks by bytes read), a removed container's reads move to
//! its image, the counts survive a kill -9 once a checkpoint has passed,
//! and bad arguments are refused with a clear message. The same for
//! `lcfs top images` (x above y, with its containers' reads and start-ups)
//! and `lcfs top files` (the file they read).

mod common;

use common::{require_root_and_fuse, Harness};
use serde_json::Value;
use std::fs;
use std::time::Duration;

fn top(h: &Harness, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["top", "layers", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&h.ok(&all)).expect("JSON rows")
}

fn json_rows(h: &Harness, args: &[&str]) -> Vec<Value> {
    serde_json::from_str(&h.ok(args)).expect("JSON rows")
}

fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no row {name} in {rows:?}"))
}

#[test]
fn top_layers_ranks_images_by_starts_and_reads_and_keeps_counts() {
    require_root_and_fuse();
    let mut h = Harness::new();
    h.daemon_args = vec!["--checkpoint-interval-ms".into(), "200".into()];
    h.mkfs();
    h.start();
    for (image, size) in [("x", 64 << 10), ("y", 256 << 10)] {
        h.ok(&["layer", "create", "--cold", image]);
        fs::write(h.mountpoint.join(image).join("app"), vec![7u8; size]).unwrap();
        h.ok(&["layer", "commit", image]);
    }
    for i in 0..5 {
        h.ok(&["layer", "clone", "x", &format!("x{i}")]);
    }
    for i in 0..2 {
        h.ok(&["layer", "clone", "y", &format!("y{i}")]);
    }
    // Each container reads the image's file once through its own directory
    // (its own inode: every read reaches the daemon).
    for c in ["x0", "x1", "x2", "x3", "x4", "y0", "y1"] {
        let data = fs::read(h.mountpoint.join(c).join("app")).unwrap();
        assert!(data.iter().all(|&b| b == 7));
    }

    let rows = top(&h, &[]);
    assert_eq!(rows[0]["name"], "x", "{rows:?}");
    assert_eq!(rows[1]["name"], "y", "{rows:?}");
    assert_eq!(rows[0]["usage"]["clones"], 5);
    assert_eq!(rows[1]["usage"]["clones"], 2);
    assert!(rows[0]["usage"]["last_clone"].is_string());
    assert_eq!(row(&rows, "x0")["usage"]["clones"], 0);
    assert!(row(&rows, "x0")["usage"]["last_clone"].is_null());
    for c in ["x0", "x4"] {
        assert_eq!(row(&rows, c)["usage"]["bytes_read"], 64 << 10);
        assert!(row(&rows, c)["usage"]["reads"].as_u64().unwrap() >= 1);
    }
    assert_eq!(row(&rows, "y1")["usage"]["bytes_read"], 256 << 10);

    // By bytes read, y's containers come first; --limit cuts.
    let by_reads = top(&h, &["--sort", "reads", "--limit", "2"]);
    assert_eq!(by_reads.len(), 2);
    assert_eq!(by_reads[0]["name"], "y0");
    assert_eq!(by_reads[1]["name"], "y1");
    let latest = top(&h, &["--sort", "last-start", "--limit", "1"]);
    assert_eq!(latest[0]["name"], "y", "y was cloned last");

    // Each container's start-up: from its creation to its first read.
    let x0 = row(&rows, "x0")["usage"].clone();
    assert!(x0["first_read"].is_string(), "{x0}");
    let startup = x0["startup_seconds"].as_f64().unwrap();
    assert!(startup > 0.0 && startup < 60.0, "{x0}");
    assert_eq!(x0["early_bytes_read"], 64 << 10);
    assert!(row(&rows, "x")["usage"]["startup_seconds"].is_null());

    // A removed container's reads and start-up stay with its image.
    h.ok(&["layer", "rm", "x0"]);
    let rows = top(&h, &[]);
    let x = &row(&rows, "x")["usage"];
    assert_eq!(x["clone_bytes_read"], 64 << 10);
    assert_eq!(x["clones"], 5);
    assert_eq!(x["clone_starts"], 1);
    assert!(
        (x["clone_startup_seconds"].as_f64().unwrap() - startup).abs() < 1e-6,
        "{x}"
    );
    assert_eq!(x["clone_early_bytes_read"], 64 << 10);
    let by_startup = top(&h, &["--sort", "startup-time", "--limit", "1"]);
    assert_eq!(by_startup[0]["name"], "x");

    // The table a person reads.
    let table = h.ok(&["top", "layers", "--limit", "3"]);
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    for column in [
        "NAME",
        "CLONES",
        "LAST START",
        "READ",
        "CLONES READ",
        "STARTUP",
        "PULL",
        "OWNED",
    ] {
        assert!(header.contains(column), "{table}");
    }
    assert!(lines.next().unwrap().starts_with("x "), "{table}");
    let stat = h.ok(&["layer", "stat", "x"]);
    assert!(stat.contains("clones:    5"), "{stat}");

    // Images: x started five times, y twice; what their containers read.
    let images = json_rows(&h, &["top", "images", "--json"]);
    assert_eq!(images[0]["name"], "x", "{images:?}");
    assert_eq!(images[0]["starts"], 5);
    assert_eq!(images[0]["containers"], 4, "x0 was removed");
    assert_eq!(images[1]["name"], "y");
    assert_eq!(images[1]["starts"], 2);
    assert_eq!(images[0]["bytes_read"], 5 * (64 << 10));
    assert_eq!(images[0]["startups"], 5);
    assert_eq!(images[0]["startup_files"], 5);
    let only_y = json_rows(&h, &["top", "images", "--image", "y", "--json"]);
    assert_eq!(only_y.len(), 1);
    // An image's layers: its chain and its containers'.
    let of_x = top(&h, &["--image", "x"]);
    let mut names: Vec<&str> = of_x.iter().map(|l| l["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["x", "x1", "x2", "x3", "x4"]);
    assert_eq!(of_x[0]["images"], serde_json::json!(["x"]));
    let table = h.ok(&["top", "images"]);
    assert!(table.lines().nth(1).unwrap().starts_with("x "), "{table}");
    // Hot files: the one file, with every read of x's containers.
    let files = json_rows(&h, &["top", "files", "--image", "x", "--json"]);
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0]["path"], "/app");
    assert_eq!(files[0]["bytes"], 5 * (64 << 10));
    let all = json_rows(&h, &["top", "files", "--json"]);
    assert_eq!(all.len(), 2, "{all:?}");
    let table = h.ok(&["top", "files"]);
    assert!(table.contains("/app"), "{table}");

    // kill -9 after a checkpoint interval has passed: the counts survive.
    fs::read(h.mountpoint.join("x1/app")).ok();
    std::thread::sleep(Duration::from_millis(1500));
    let before = top(&h, &[]);
    let images_before = json_rows(&h, &["top", "images", "--json"]);
    let files_before = json_rows(&h, &["top", "files", "--json"]);
    h.stop_with(libc::SIGKILL);
    h.start();
    let after = top(&h, &[]);
    for name in ["x", "y", "x1", "y0"] {
        assert_eq!(
            row(&after, name)["usage"],
            row(&before, name)["usage"],
            "{name} after kill -9\n{}",
            h.log_text()
        );
    }
    assert_eq!(json_rows(&h, &["top", "images", "--json"]), images_before);
    assert_eq!(json_rows(&h, &["top", "files", "--json"]), files_before);

    // Bad arguments: a clear refusal, nothing printed on stdout.
    let out = h.lcfs(&["top", "layers", "--sort", "popularity"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("popularity") && stderr.contains("clones"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    let out = h.lcfs(&["top", "files", "--image", "nosuch"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch"));
    h.stop_with(libc::SIGTERM);
}
