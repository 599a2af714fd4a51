//! The plugin server counts every call per method, with its time, as it
//! answers them over the real socket: JSON calls, a streamed ApplyDiff and
//! Diff, and unknown methods (counted apart, so clients cannot grow the table).

mod common;

use common::{Plugin, TarMaker};
use lcfs_dockerplugin::{serve, Limits, OTHER_METHOD};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// POST /<path> with `Connection: close`; the status and the raw body.
fn post(socket: &Path, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let head = format!(
        "POST /{path} HTTP/1.1\r\nHost: plugin\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete HTTP head");
    let status = String::from_utf8_lossy(&answer[..split])
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, answer[split + 4..].to_vec())
}

#[test]
fn calls_are_counted_per_method() {
    let p = Plugin::start();
    // A second server on the same driver, whose counters this test reads
    // (the shared harness keeps its server to itself).
    let socket = p.socket.with_file_name("counted.sock");
    let server = serve(p.driver.clone(), &socket, Limits::default()).unwrap();
    let calls = server.calls();

    assert_eq!(post(&socket, "Plugin.Activate", b"").0, 200);
    let create = br#"{"ID":"base","Parent":"","MountLabel":"","StorageOpt":null}"#;
    let (status, body) = post(&socket, "GraphDriver.Create", create);
    assert_eq!((status, body.as_slice()), (200, &b"{}"[..]));
    let mut tar = TarMaker::new();
    tar.dir("etc", 0o755).file("etc/hostname", 0o644, b"lcfs\n");
    let (status, body) = post(
        &socket,
        "GraphDriver.ApplyDiff?id=base&parent=",
        &tar.finish(),
    );
    assert_eq!(status, 200);
    assert!(!String::from_utf8_lossy(&body).contains("Err"), "{body:?}");
    assert_eq!(
        post(&socket, "GraphDriver.Diff", br#"{"ID":"base","Parent":""}"#).0,
        200
    );
    for _ in 0..2 {
        let (status, body) = post(&socket, "GraphDriver.Bogus", b"{}");
        assert_eq!(status, 200);
        assert!(String::from_utf8_lossy(&body).contains("Err"));
    }

    // A call is counted once its answer is fully written, which can be just
    // after the client has read that answer: wait for the last one to land.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut s = calls.snapshot();
    while s.in_flight > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
        s = calls.snapshot();
    }
    let count = |name: &str| s.methods.iter().find(|m| m.method == name).map(|m| m.calls);
    assert_eq!(count("Plugin.Activate"), Some(1), "{s:?}");
    assert_eq!(count("GraphDriver.Create"), Some(1), "{s:?}");
    assert_eq!(count("GraphDriver.ApplyDiff"), Some(1), "{s:?}");
    assert_eq!(count("GraphDriver.Diff"), Some(1), "{s:?}");
    assert_eq!(count(OTHER_METHOD), Some(2), "{s:?}");
    assert_eq!(
        count("GraphDriver.Get"),
        None,
        "never called, so not listed"
    );
    assert_eq!(s.calls, 6);
    assert_eq!(s.in_flight, 0);
    assert!(s.total_us > 0 && s.busy_us > 0, "{s:?}");
    // One call at a time: busy time is the sum (up to rounding).
    assert!(s.busy_us <= s.total_us + 6, "{s:?}");
    assert!(s.methods.iter().all(|m| m.max_us <= m.total_us), "{s:?}");
    server.shutdown();
}
