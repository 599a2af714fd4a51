//! One file of an eStargz layer read from a registry (a small HTTP server
//! that serves ranges): only the footer, the TOC and that file's chunks
//! are fetched; a registry sending other bytes, or ignoring ranges, is
//! refused with the reason; a wrong TOC digest is refused before any file.

use lcfs_lazy::estargz::{build, BuildOptions};
use lcfs_lazy::remote::RemoteLayer;
use std::io::{BufRead, BufReader, Cursor, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, PartialEq)]
enum Serve {
    Ranges,
    /// Every range answered with the whole blob, 200.
    Whole,
    /// Ranges of flipped bytes.
    Flipped,
}

/// Serves `blob` at /v2/t/blobs/x: HEAD and GET with one range.
fn registry(blob: Arc<Vec<u8>>, how: Serve) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v2/t/blobs/x", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let blob = blob.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut out = s;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let head = line.starts_with("HEAD");
                    let mut range = None;
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                            let (a, b) = v.trim().split_once('-').unwrap();
                            range = Some((
                                a.parse::<usize>().unwrap(),
                                b.parse::<usize>().unwrap() + 1,
                            ));
                        }
                    }
                    let (status, body): (&str, Vec<u8>) = match (range, how) {
                        (Some((a, b)), Serve::Ranges) => {
                            ("206 Partial Content", blob[a..b].to_vec())
                        }
                        (Some((a, b)), Serve::Flipped) => (
                            "206 Partial Content",
                            blob[a..b].iter().map(|x| x ^ 1).collect(),
                        ),
                        _ => ("200 OK", blob.to_vec()),
                    };
                    let _ = write!(
                        out,
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    if !head {
                        let _ = out.write_all(&body);
                    }
                }
            });
        }
    });
    url
}

fn layer() -> (Vec<u8>, String, Vec<u8>) {
    let big: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let small = b"#!/bin/sh\necho hello\n".to_vec();
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [("srv/big", &big), ("bin/hello", &small)] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    let mut blob = Vec::new();
    let built = build(
        Cursor::new(b.into_inner().unwrap()),
        &mut blob,
        &BuildOptions {
            chunk_size: 256 << 10,
            ..BuildOptions::default()
        },
    )
    .unwrap();
    (blob, built.toc_digest, big)
}

#[test]
fn a_file_costs_its_chunks_not_the_layer() {
    let (blob, toc, big) = layer();
    let blob = Arc::new(blob);
    let url = registry(blob.clone(), Serve::Ranges);
    let l = RemoteLayer::open(&url, &toc, Duration::from_secs(10)).unwrap();
    let toc_cost = l.fetched();
    assert_eq!(
        l.read_file("bin/hello").unwrap(),
        b"#!/bin/sh\necho hello\n"
    );
    let small_cost = l.fetched() - toc_cost;
    eprintln!(
        "blob {} bytes: footer and TOC {toc_cost}, bin/hello {small_cost}",
        blob.len()
    );
    assert!(toc_cost + small_cost < blob.len() as u64 / 10);
    assert_eq!(l.read_file("./srv/big").unwrap(), big);
    assert!(l.read_file("srv").is_err());
    assert!(l
        .read_file("nope")
        .unwrap_err()
        .to_string()
        .contains("no \"nope\""));
}

#[test]
fn wrong_bytes_a_wrong_toc_digest_and_no_ranges_are_refused() {
    let (blob, toc, _) = layer();
    let blob = Arc::new(blob);
    let e = RemoteLayer::open(
        &registry(blob.clone(), Serve::Ranges),
        &format!("sha256:{}", "0".repeat(64)),
        Duration::from_secs(10),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("the TOC hashes to"), "{e}");
    let e = RemoteLayer::open(
        &registry(blob.clone(), Serve::Whole),
        &toc,
        Duration::from_secs(10),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("must serve ranges"), "{e}");
    assert!(RemoteLayer::open(
        &registry(blob.clone(), Serve::Flipped),
        &toc,
        Duration::from_secs(10)
    )
    .is_err());
    let e = RemoteLayer::open(
        "http://127.0.0.1:9/v2/t/blobs/x",
        &toc,
        Duration::from_secs(2),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("127.0.0.1:9"), "{e}");
}
