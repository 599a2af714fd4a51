//! The registry mirror's blob cache under the garbage collector
//! (docs/mirror.md, docs/gc.md): a daemon whose device is above the high
//! watermark because of cached blobs evicts the least recently used blobs
//! first, until use is under the low watermark; the blobs used last stay
//! and are served from the cache, an evicted one is fetched again.

mod common;

use common::Harness;
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BLOBS: usize = 14;
const BLOB: usize = 8 << 20;

fn hex(data: &[u8]) -> String {
    lcfs_engine::digest::hex(&Sha256::digest(data))
}

/// A registry serving `blobs` by digest; counts the GETs per blob.
fn upstream(blobs: Arc<Vec<Vec<u8>>>) -> (String, Arc<Mutex<Vec<usize>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let gets = Arc::new(Mutex::new(vec![0; blobs.len()]));
    let g = gets.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (blobs, g) = (blobs.clone(), g.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap_or(0);
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let found = blobs
                    .iter()
                    .position(|b| path.ends_with(&format!("/blobs/sha256:{}", hex(b))));
                let mut out = stream;
                match found {
                    Some(i) => {
                        g.lock().unwrap()[i] += 1;
                        let _ = write!(
                            out,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            blobs[i].len()
                        );
                        let _ = out.write_all(&blobs[i]);
                    }
                    None => {
                        let _ = out.write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        );
                    }
                }
            });
        }
    });
    (address, gets)
}

fn pull(mirror: &str, blob: &[u8]) {
    let mut s = TcpStream::connect(mirror).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET /v2/t/blobs/sha256:{}?ns=reg.test HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
        hex(blob)
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&raw[..split])
    );
    assert!(
        raw[split + 4..] == *blob,
        "the blob came back whole and right"
    );
}

#[test]
fn cached_blobs_go_first_and_least_recently_used_first_when_the_device_is_full() {
    common::require_root_and_fuse();
    let blobs: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..BLOBS)
            .map(|i| {
                (0..BLOB)
                    .map(|j| ((j as u64 * 2654435761 + i as u64 * 97) >> 11) as u8)
                    .collect()
            })
            .collect(),
    );
    let (registry, gets) = upstream(blobs.clone());
    let mut h = Harness::new();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mirror = format!("127.0.0.1:{port}");
    let config = h.dir.path().join("mirror.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{mirror}\"\ncache_mib = 1024\n[upstreams]\n\"reg.test\" = \"http://{registry}\"\n"
        ),
    )
    .unwrap();
    // 14 blobs of 8 MiB are 11% of the 1 GiB device.
    let policy = h.dir.path().join("gc.toml");
    std::fs::write(
        &policy,
        "enabled = false\nhigh_watermark_percent = 8\nlow_watermark_percent = 5\n",
    )
    .unwrap();
    h.daemon_args = vec![
        "--mirror-config".into(),
        config.display().to_string(),
        "--gc-config".into(),
        policy.display().to_string(),
        "--no-containerd".into(),
        "--no-seal".into(),
    ];
    h.mkfs();
    h.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(&mirror).is_err() {
        assert!(Instant::now() < deadline, "the mirror did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    for b in blobs.iter() {
        pull(&mirror, b);
    }
    let report: serde_json::Value = serde_json::from_str(&h.ok(&["gc", "--json"])).unwrap();
    eprintln!(
        "gc: {:.1}% -> {:.1}%, {} blobs evicted",
        report["used_percent_before"], report["used_percent_after"], report["mirror_blobs_evicted"]
    );
    assert!(
        report["used_percent_before"].as_f64().unwrap() > 8.0,
        "{report}"
    );
    assert!(
        report["used_percent_after"].as_f64().unwrap() <= 5.0,
        "{report}"
    );
    let evicted = report["mirror_blobs_evicted"].as_u64().unwrap() as usize;
    assert!((1..BLOBS).contains(&evicted), "{report}");
    assert_eq!(
        report["mirror_bytes_evicted"].as_u64().unwrap(),
        (evicted * BLOB) as u64
    );
    let text = h.ok(&["gc"]);
    assert!(text.contains("device use"), "{text}");
    // The most recently used blob is still cached; the oldest is fetched
    // again.
    let before = gets.lock().unwrap().clone();
    pull(&mirror, &blobs[BLOBS - 1]);
    pull(&mirror, &blobs[0]);
    let after = gets.lock().unwrap().clone();
    assert_eq!(after[BLOBS - 1], before[BLOBS - 1], "served from the cache");
    assert_eq!(after[0], before[0] + 1, "evicted, fetched again");
    let fsck = h.ok(&["fsck", "--online", "--verify-data"]);
    assert!(fsck.contains("clean"), "{fsck}");
}
