//! The plugin socket is guarded like the control socket: root-only file
//! mode, and peers other than root refused (SO_PEERCRED) even when the file
//! mode would let them in; a client that never finishes its request is cut
//! off; Diffs beyond the bound wait, then get a clear 503. The first test
//! runs curl as nobody (uid 65534) with setpriv, so it needs root.

mod common;

use common::{Plugin, TarMaker};
use lcfs_dockerplugin::{serve, Limits, PluginServer};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A second server on the plugin's driver with `limits`, in a directory
/// of its own.
fn server_with(p: &Plugin, limits: Limits) -> (PluginServer, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run").join("guarded.sock");
    let server = serve(p.driver.clone(), &socket, limits).unwrap();
    (server, socket, dir)
}

/// curl as nobody: (exit success, stdout).
fn curl_as_nobody(socket: &Path) -> (bool, String) {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "curl"])
        .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(socket)
        .args(["-X", "POST", "-d", "{}", "http://plugin/Plugin.Activate"])
        .output()
        .expect("run setpriv and curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn unprivileged_users_are_refused() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "runs curl as nobody: needs root"
    );
    let p = Plugin::start();
    let (server, socket, dir) = server_with(&p, Limits::default());
    let mode = |path: &Path| std::fs::metadata(path).unwrap().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600, "the socket");
    assert_eq!(mode(socket.parent().unwrap()), 0o700, "its directory");

    // The file modes keep nobody out...
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (connected, _) = curl_as_nobody(&socket);
    assert!(!connected, "nobody connected through a root-only directory");
    // ...and with them opened, the peer check does.
    std::fs::set_permissions(
        socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (_, answer) = curl_as_nobody(&socket);
    assert!(answer.ends_with("\n403"), "{answer}");
    assert!(answer.contains("root-only"), "{answer}");
    assert_eq!(p.driver.engine().list_layers().len(), 0);

    // Root still gets in.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(b"POST /Plugin.Activate HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    server.shutdown();
}

#[test]
fn slow_clients_are_cut_off() {
    let p = Plugin::start();
    let limits = Limits {
        idle_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let (server, socket, _dir) = server_with(&p, limits);

    // A head trickling in, a byte every 200 ms (never idle long enough to
    // time out a single read): closed once the request deadline passes.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut writer = s.try_clone().unwrap();
    let started = Instant::now();
    let trickle = std::thread::spawn(move || {
        let _ = writer.write_all(b"POST /Plugin.Activate HTTP/1.1\r\n");
        for _ in 0..100 {
            if writer.write_all(b"X").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let cut_after = started.elapsed();
    assert!(
        cut_after < Duration::from_secs(5),
        "cut off after {cut_after:?}"
    );
    trickle.join().unwrap();

    // A body that stops short: closed after the idle timeout.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"POST /GraphDriver.Exists HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"ID\":")
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        !String::from_utf8_lossy(&rest).contains("\"Exists\""),
        "answered a request that never arrived: {}",
        String::from_utf8_lossy(&rest)
    );

    // An idle connection between requests: closed after the idle timeout.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = Instant::now();
    assert_eq!(s.read(&mut [0u8; 16]).unwrap(), 0);
    assert!(started.elapsed() < Duration::from_secs(5));

    // A head larger than the bound: 400, closed.
    let mut s = UnixStream::connect(&socket).unwrap();
    let mut head = b"POST /Plugin.Activate HTTP/1.1\r\nX-Big: ".to_vec();
    head.extend(vec![b'a'; 100 << 10]);
    let writer = {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = w.write_all(&head);
        })
    };
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    writer.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // The server still answers.
    let r = p.call("Plugin.Activate", "");
    assert_eq!(r["Implements"][0], "GraphDriver");
    server.shutdown();
}

/// Starts a Diff of `id` and reads only its status line.
fn start_diff(socket: &Path, id: &str) -> (u16, BufReader<UnixStream>) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = format!(r#"{{"ID":"{id}","Parent":""}}"#);
    let request = format!(
        "POST /GraphDriver.Diff HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    (status, r)
}

#[test]
fn concurrent_diffs_are_bounded() {
    let p = Plugin::start();
    // A layer whose tar is far larger than what the socket buffers, so a
    // Diff whose client does not read stays in progress.
    p.create("big", "");
    let mut data = vec![0u8; 16 << 20];
    let mut x = 0x9e37_79b9_u32;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let mut tar = TarMaker::new();
    tar.file("blob", 0o644, &data);
    let r = p.apply("big", "", &tar.finish(), false);
    assert!(r.get("Err").is_none(), "{r}");

    let limits = Limits {
        max_diffs: 2,
        diff_wait: Duration::from_secs(1),
        ..Limits::default()
    };
    let (server, socket, _dir) = server_with(&p, limits);
    let (first, first_stream) = start_diff(&socket, "big");
    let (second, second_stream) = start_diff(&socket, "big");
    assert_eq!((first, second), (200, 200));

    // A third waits for a slot, then gets a clear 503.
    let started = Instant::now();
    let (third, mut third_stream) = start_diff(&socket, "big");
    let waited = started.elapsed();
    let mut message = Vec::new();
    let _ = third_stream.read_to_end(&mut message);
    let message = String::from_utf8_lossy(&message[..message.len().min(400)]);
    assert_eq!(third, 503, "{message}");
    assert!(message.contains("too many Diffs"), "{message}");
    assert!(waited >= Duration::from_millis(900), "waited {waited:?}");

    // One finishes (its client goes away): the next Diff runs, whole.
    drop(first_stream);
    let (fourth, mut fourth_stream) = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, stream) = start_diff(&socket, "big");
            if status == 200 || Instant::now() > deadline {
                break (status, stream);
            }
        }
    };
    assert_eq!(fourth, 200);
    let mut rest = Vec::new();
    fourth_stream.read_to_end(&mut rest).unwrap();
    assert!(
        rest.len() > 16 << 20,
        "the whole tar, chunked: {}",
        rest.len()
    );
    drop(second_stream);
    server.shutdown();
}
