//! Proves the statistics API of a real daemon (docs/statistics.md, "HTTP
//! API"): on the root-only unix socket, `/v1/layers` ranks image X (five
//! containers) above image Y (two), `/v1/layers/<name>` answers one layer
//! and `/metrics` carries the engine's counters, per-layer series for
//! the most cloned layers only and the latency histograms (buckets, count
//! and sum; the device read count grows with a read); bad paths, queries and methods get 4xx with
//! a JSON error; on TCP, a request without the bearer token (or with a
//! wrong one) gets 401 and one with it 200; nobody (uid 65534) cannot
//! connect to the socket; a token file others may read is refused at start.

mod common;

use common::{as_nobody, require_root_and_fuse, Harness};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;

/// One HTTP/1.1 exchange; returns the status and the body.
fn exchange(mut stream: impl Read + Write, request: &str) -> (u16, String) {
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

fn get(socket: &Path, target: &str) -> (u16, String) {
    exchange(
        UnixStream::connect(socket).unwrap(),
        &format!("GET {target} HTTP/1.1\r\nHost: lcfs\r\nConnection: close\r\n\r\n"),
    )
}

fn get_tcp(addr: SocketAddr, target: &str, token: Option<&str>) -> (u16, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    exchange(
        TcpStream::connect(addr).unwrap(),
        &format!("GET {target} HTTP/1.1\r\nHost: lcfs\r\n{auth}Connection: close\r\n\r\n"),
    )
}

/// The value of the sample whose name and labels are `series` (`name` or
/// `name{labels}`) in OpenMetrics text.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{series} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

fn json_error(status: u16, body: &str, want: u16) {
    assert_eq!(status, want, "{body}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["error"]["status"], want);
    assert!(v["error"]["message"].as_str().unwrap().len() > 5, "{body}");
}

#[test]
fn the_stats_api_answers_on_its_socket_and_with_a_token_on_tcp() {
    require_root_and_fuse();
    let mut h = Harness::new();
    // Directories open to all above the socket, as /run is: only the
    // socket itself may keep others out.
    std::fs::set_permissions(h.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The mountpoint's parent is made root's alone at start; keep it apart.
    let parent = h.dir.path().join("lcfs");
    std::fs::create_dir(&parent).unwrap();
    h.mountpoint = parent.join("mnt");
    let token_file = h.dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token-of-a-test-0123456789\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    h.daemon_args = vec![
        "--stats-listen".into(),
        "127.0.0.1:0".into(),
        "--stats-token-file".into(),
        token_file.display().to_string(),
        "--metrics-top-layers".into(),
        "3".into(),
    ];
    h.mkfs();

    // A token file others may read: refused, with the reason.
    let out = h
        .daemon_command(&h.device, &h.mountpoint, &h.socket)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("token file") && stderr.contains("644"),
        "{stderr}"
    );
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    h.start();
    std::fs::set_permissions(
        h.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let socket = h.socket.parent().unwrap().join("stats.sock");
    for (image, n) in [("x", 5), ("y", 2)] {
        h.ok(&["layer", "create", "--cold", image]);
        std::fs::write(h.mountpoint.join(image).join("app"), vec![1u8; 8192]).unwrap();
        for i in 0..n {
            h.ok(&["layer", "clone", image, &format!("{image}{i}")]);
            std::fs::read(h.mountpoint.join(format!("{image}{i}/app"))).unwrap();
        }
    }

    let (status, body) = get(&socket, "/v1/layers?sort=clones&limit=2");
    assert_eq!(status, 200, "{body}");
    let rows: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (
            rows[0]["name"].as_str(),
            rows[0]["usage"]["clones"].as_u64()
        ),
        (Some("x"), Some(5))
    );
    assert_eq!(
        (
            rows[1]["name"].as_str(),
            rows[1]["usage"]["clones"].as_u64()
        ),
        (Some("y"), Some(2))
    );
    let (status, body) = get(&socket, "/v1/layers/x3");
    assert_eq!(status, 200, "{body}");
    let x3: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(x3["usage"]["bytes_read"], 8192);
    assert_eq!(x3["parent"], "x");

    let (status, metrics) = get(&socket, "/metrics");
    assert_eq!(status, 200, "{metrics}");
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    for line in [
        "lcfs_layer_clones_total{layer=\"x\",parent=\"\"} 5",
        "lcfs_layer_clones_total{layer=\"y\",parent=\"\"} 2",
        "lcfs_layers 9",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    assert!(
        metrics.contains("lcfs_device_write_bytes_total "),
        "{metrics}"
    );
    // Images and their hot files.
    let (status, body) = get(&socket, "/v1/images?sort=starts");
    assert_eq!(status, 200, "{body}");
    let images: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(images.len(), 2, "{body}");
    assert_eq!(
        (images[0]["name"].as_str(), images[0]["starts"].as_u64()),
        (Some("x"), Some(5))
    );
    let (status, body) = get(&socket, "/v1/files?image=y&limit=5");
    assert_eq!(status, 200, "{body}");
    let files: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (files[0]["path"].as_str(), files[0]["bytes"].as_u64()),
        (Some("/app"), Some(2 * 8192))
    );
    let (s, b) = get(&socket, "/v1/files?image=nosuch");
    json_error(s, &b, 404);
    for bad in [
        "/v1/files?image=",
        "/v1/files?what=1",
        "/v1/images?sort=x",
        "/v1/files?image=%zz",
    ] {
        let (s, b) = get(&socket, bad);
        json_error(s, &b, 400);
    }
    assert!(
        metrics
            .lines()
            .any(|l| l == "lcfs_image_starts_total{image=\"x\",layer=\"x\"} 5"),
        "{metrics}"
    );

    // Three layers get series (--metrics-top-layers 3), not nine.
    let series = metrics
        .lines()
        .filter(|l| l.starts_with("lcfs_layer_clones_total{"))
        .count();
    assert_eq!(series, 3, "{metrics}");

    // Latency histograms: buckets, count and sum of each family; the FUSE
    // reads above were timed. A family's +Inf bucket is its count.
    for (name, labels) in [
        ("lcfs_device_read_seconds", ""),
        ("lcfs_device_write_seconds", ""),
        ("lcfs_pull_seconds", ""),
        ("lcfs_startup_seconds", ""),
        ("lcfs_fuse_op_seconds", "op=\"read\""),
    ] {
        let series = |suffix: &str, le: Option<&str>| {
            // prometheus-client puts `le` before a family's labels.
            let labels: Vec<String> = le
                .map(|le| format!("le=\"{le}\""))
                .into_iter()
                .chain((!labels.is_empty()).then(|| labels.to_string()))
                .collect();
            match labels.is_empty() {
                true => format!("{name}_{suffix}"),
                false => format!("{name}_{suffix}{{{}}}", labels.join(",")),
            }
        };
        let count = sample(&metrics, &series("count", None));
        sample(&metrics, &series("sum", None));
        sample(&metrics, &series("bucket", Some("0.000001024")));
        assert_eq!(sample(&metrics, &series("bucket", Some("+Inf"))), count);
    }
    assert!(sample(&metrics, "lcfs_fuse_op_seconds_count{op=\"read\"}") > 0.0);
    assert!(sample(&metrics, "lcfs_startup_seconds_count") >= 7.0);
    // An online fsck reads the checkpoint from the device: the device read
    // histogram grows (FUSE reads may all come from the caches and the log).
    let reads = sample(&metrics, "lcfs_device_read_seconds_count");
    h.ok(&["fsck", "--online", "--verify-data"]);
    let (_, metrics) = get(&socket, "/metrics");
    assert!(
        sample(&metrics, "lcfs_device_read_seconds_count") > reads,
        "{metrics}"
    );

    // Bad requests: a JSON error each, the daemon unharmed.
    let (s, b) = get(&socket, "/v1/nothing");
    json_error(s, &b, 404);
    let (s, b) = get(&socket, "/v1/layers/no-such-layer");
    json_error(s, &b, 404);
    for bad in [
        "sort=popularity",
        "limit=0",
        "limit=99999999999",
        "limit=1&limit=2",
        "x=1",
    ] {
        let (s, b) = get(&socket, &format!("/v1/layers?{bad}"));
        json_error(s, &b, 400);
    }
    let (s, b) = get(&socket, "/v1/layers/%zz");
    json_error(s, &b, 400);
    let (s, b) = get(&socket, &format!("/v1/layers?{}", "a".repeat(5000)));
    json_error(s, &b, 414);
    let (s, b) = exchange(
        UnixStream::connect(&socket).unwrap(),
        "DELETE /v1/layers/x HTTP/1.1\r\nHost: lcfs\r\nConnection: close\r\n\r\n",
    );
    json_error(s, &b, 405);
    let (s, _) = exchange(UnixStream::connect(&socket).unwrap(), "NONSENSE\r\n\r\n");
    assert_eq!(s, 400);
    assert!(h.lcfs(&["layer", "stat", "x"]).status.success());

    // TCP: the token or nothing.
    let log = h.log_text();
    let addr: SocketAddr = log
        .split("statistics on ")
        .nth(1)
        .and_then(|rest| rest.split(" and on ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no TCP address in the log:\n{log}"));
    let (s, b) = get_tcp(addr, "/metrics", None);
    json_error(s, &b, 401);
    let (s, b) = get_tcp(addr, "/metrics", Some("s3cret-token-of-a-test-012345678X"));
    json_error(s, &b, 401);
    let (s, b) = get_tcp(
        addr,
        "/v1/layers?limit=1",
        Some("s3cret-token-of-a-test-0123456789"),
    );
    assert_eq!(s, 200, "{b}");
    assert!(b.contains("\"name\":\"x\""), "{b}");

    // nobody cannot even connect to the socket.
    let script = format!(
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect({:?})",
        socket.display().to_string()
    );
    let out = as_nobody(&["/usr/bin/python3", "-c", &script]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("PermissionError"),
        "{stderr}"
    );

    let status = h.stop_with(libc::SIGTERM);
    assert!(status.success(), "{}", h.log_text());
    assert!(!socket.exists(), "the stats socket is removed at exit");
}
