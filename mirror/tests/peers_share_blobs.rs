//! The mirror (docs/mirror.md) against a fake upstream registry, with
//! several hosts (each an engine on an in-memory device and a mirror on a
//! local port): hosts pulling the same blobs at once get them whole and
//! the upstream serves each blob once; a peer that is down, stalls or sends
//! other bytes costs a fallback, never wrong content in the cache; a
//! cached blob that no longer hashes to its digest is fetched again; bad
//! requests get OCI errors; the cache survives a restart and stays under
//! its limit.

use lcfs_engine::device::{Device, MemDevice};
use lcfs_engine::{Config as EngineConfig, Engine, FormatOptions};
use lcfs_mirror::{serve, Config, MirrorServer};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn hex(data: &[u8]) -> String {
    lcfs_engine::digest::hex(&Sha256::digest(data))
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) as u8)
        .collect()
}

/// A registry serving blobs by digest (and one manifest by tag and
/// digest), with Range, slowly enough that pulls overlap; counts what it
/// served.
struct Upstream {
    address: SocketAddr,
    gets: Arc<Mutex<BTreeMap<String, usize>>>,
    bytes: Arc<Mutex<u64>>,
    /// Every request's path and Authorization header.
    seen: Seen,
}

type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

const MANIFEST: &[u8] = br#"{"schemaVersion":2,"layers":[]}"#;
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

impl Upstream {
    fn start(blobs: Vec<Vec<u8>>, behaviour: Behaviour) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let blobs: Arc<HashMap<String, Vec<u8>>> =
            Arc::new(blobs.into_iter().map(|b| (hex(&b), b)).collect());
        let gets = Arc::new(Mutex::new(BTreeMap::new()));
        let bytes = Arc::new(Mutex::new(0));
        let seen: Seen = Arc::default();
        let (b, g, n, w) = (blobs.clone(), gets.clone(), bytes.clone(), seen.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (b, g, n, w) = (b.clone(), g.clone(), n.clone(), w.clone());
                std::thread::spawn(move || serve_one(stream, &b, &g, &n, &w, behaviour));
            }
        });
        Upstream {
            address,
            gets,
            bytes,
            seen,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Right bytes, 64 KiB at a time with a pause.
    Slow,
    /// Accepts, then never answers.
    Stall,
    /// The right length of other bytes.
    Wrong,
    /// The right bytes, cut off halfway (a peer killed mid-blob).
    Truncate,
    /// A registry behind the token flow (user `puller`, password
    /// `pw-right`, realm `/token`) whose blob GETs redirect to
    /// `localhost` (another origin, no credentials needed there).
    Auth,
}

const TOKEN: &str = "tok-1";

fn serve_one(
    stream: TcpStream,
    blobs: &HashMap<String, Vec<u8>>,
    gets: &Mutex<BTreeMap<String, usize>>,
    bytes: &Mutex<u64>,
    seen: &Mutex<Vec<(String, Option<String>)>>,
    behaviour: Behaviour,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut range: Option<(u64, Option<u64>)> = None;
        let mut authorization = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("range: bytes=") {
                let (a, b) = v.trim().split_once('-').unwrap_or((v.trim(), ""));
                range = a.parse().ok().map(|a| (a, b.parse().ok()));
            }
            if lower.starts_with("authorization:") {
                authorization = Some(h[14..].trim().to_string());
            }
        }
        seen.lock()
            .unwrap()
            .push((path.clone(), authorization.clone()));
        let mut path = path;
        if behaviour == Behaviour::Auth {
            let port = stream.local_addr().unwrap().port();
            let answer = |status: &str, extra: String, body: &str| {
                format!(
                    "HTTP/1.1 {status}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            };
            let reply = if path.starts_with("/token") {
                // Basic base64("puller:pw-right").
                Some(
                    if authorization.as_deref() == Some("Basic cHVsbGVyOnB3LXJpZ2h0") {
                        answer(
                            "200 OK",
                            String::new(),
                            &format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#),
                        )
                    } else {
                        answer("401 Unauthorized", String::new(), "{}")
                    },
                )
            } else if let Some(h) = path.strip_prefix("/storage/") {
                path = format!("/v2/x/blobs/sha256:{h}");
                None
            } else if authorization.as_deref() != Some(&format!("Bearer {TOKEN}")) {
                let name = path
                    .trim_start_matches("/v2/")
                    .split("/blobs/")
                    .next()
                    .unwrap_or("")
                    .split("/manifests/")
                    .next()
                    .unwrap_or("")
                    .to_string();
                Some(answer(
                    "401 Unauthorized",
                    format!(
                        "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"reg.test\",scope=\"repository:{name}:pull\"\r\n"
                    ),
                    r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
                ))
            } else if let Some((_, h)) = path
                .split('?')
                .next()
                .unwrap_or("")
                .rsplit_once("/blobs/sha256:")
            {
                Some(answer(
                    "307 Temporary Redirect",
                    format!("Location: http://localhost:{port}/storage/{h}\r\n"),
                    "",
                ))
            } else {
                None
            };
            if let Some(reply) = reply {
                if stream
                    .try_clone()
                    .unwrap()
                    .write_all(reply.as_bytes())
                    .is_err()
                {
                    return;
                }
                continue;
            }
        }
        if behaviour == Behaviour::Stall {
            std::thread::sleep(Duration::from_secs(30));
            return;
        }
        let mut out = stream.try_clone().unwrap();
        let path = path.split('?').next().unwrap_or("").to_string();
        let (status, ctype, body): (&str, &str, Vec<u8>) =
            if let Some(h) = path.rsplit_once("/blobs/sha256:").map(|(_, h)| h) {
                match blobs.get(h) {
                    Some(b) => {
                        if method == "GET" {
                            *gets.lock().unwrap().entry(h.to_string()).or_default() += 1;
                        }
                        let mut b = b.clone();
                        if behaviour == Behaviour::Wrong {
                            b.iter_mut().for_each(|x| *x ^= 0x5a);
                        }
                        ("200 OK", "application/octet-stream", b)
                    }
                    None => ("404 Not Found", "application/json", b"{}".to_vec()),
                }
            } else if path.ends_with("/manifests/1")
                || path.ends_with(&format!("/manifests/sha256:{}", hex(MANIFEST)))
            {
                ("200 OK", MANIFEST_TYPE, MANIFEST.to_vec())
            } else {
                ("404 Not Found", "application/json", b"{}".to_vec())
            };
        let (status, body, content_range) = match range {
            Some((first, last)) if status.starts_with("200") && ctype.ends_with("octet-stream") => {
                let size = body.len();
                let first = (first as usize).min(size);
                let end = last.map_or(size, |l| (l as usize + 1).min(size));
                let span = format!(
                    "Content-Range: bytes {first}-{}/{size}\r\n",
                    end.max(first + 1) - 1
                );
                ("206 Partial Content", body[first..end].to_vec(), span)
            }
            _ => (status, body, String::new()),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n{content_range}Content-Length: {}\r\n\r\n",
            body.len()
        );
        if out.write_all(head.as_bytes()).is_err() {
            return;
        }
        if method == "GET" && behaviour == Behaviour::Truncate {
            let _ = out.write_all(&body[..body.len() / 2]);
            let _ = out.shutdown(std::net::Shutdown::Both);
            return;
        }
        if method == "GET" {
            for chunk in body.chunks(64 << 10) {
                if out.write_all(chunk).is_err() {
                    return;
                }
                *bytes.lock().unwrap() += chunk.len() as u64;
                std::thread::sleep(Duration::from_millis(3));
            }
        }
    }
}

/// A free local port (bound and let go).
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Host {
    engine: Arc<Engine>,
    dev: Arc<MemDevice>,
    mirror: Option<MirrorServer>,
    config: Config,
}

fn engine_on(dev: &Arc<MemDevice>, format: bool) -> Arc<Engine> {
    let d: Arc<dyn Device> = dev.clone();
    if format {
        Engine::format(
            d.clone(),
            &FormatOptions {
                segment_size_bytes: 256 << 10,
                force: false,
            },
        )
        .unwrap();
    }
    let quiet = EngineConfig {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..EngineConfig::default()
    };
    Engine::open(d, quiet).unwrap()
}

fn config(listen: SocketAddr, upstream: &Upstream, peers: &[SocketAddr]) -> Config {
    Config {
        listen,
        cache_bytes: 1 << 30,
        upstreams: BTreeMap::from([(
            "reg.test:5000".to_string(),
            lcfs_mirror::Upstream::plain(upstream.url()),
        )]),
        ca_certificates: Vec::new(),
        default_upstream: Some("reg.test:5000".into()),
        peers: peers.iter().map(|p| p.to_string()).collect(),
        peers_dns: None,
        self_address: Some(listen.to_string()),
        token: None,
        peer_timeout: Duration::from_secs(2),
        upstream_timeout: Duration::from_secs(10),
    }
}

impl Host {
    fn start(config: Config) -> Host {
        let dev = Arc::new(MemDevice::new(256 << 20));
        let engine = engine_on(&dev, true);
        let mirror = serve(engine.clone(), config.clone()).unwrap();
        Host {
            engine,
            dev,
            mirror: Some(mirror),
            config,
        }
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.mirror.as_ref().unwrap().counters.values()
    }

    fn restart(&mut self) {
        self.mirror.take().unwrap().shutdown();
        self.engine.sync().unwrap();
        self.engine.close().unwrap();
        self.engine = engine_on(&self.dev, false);
        self.mirror = Some(serve(self.engine.clone(), self.config.clone()).unwrap());
    }
}

/// One HTTP/1.1 exchange: status, headers (lower-case names), body, and
/// whether the body was whole (as long as Content-Length says).
fn get(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
) -> (u16, HashMap<String, String>, Vec<u8>, bool) {
    let mut s = TcpStream::connect(address).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    let whole = match headers.get("content-length") {
        Some(n) => n.parse::<usize>().unwrap() == body.len(),
        None => true,
    };
    (status, headers, body, whole)
}

fn blob_path(data: &[u8]) -> String {
    format!(
        "/v2/e2e/multilayer/blobs/sha256:{}?ns=reg.test:5000",
        hex(data)
    )
}

#[test]
fn four_hosts_pulling_at_once_get_every_blob_and_the_upstream_serves_each_once() {
    let blobs: Vec<Vec<u8>> = (0..8)
        .map(|i| {
            pattern(
                i,
                [3 << 20, 1 << 20, 10_000, 1, 700_000, 2 << 20, 4096, 5 << 20][i as usize],
            )
        })
        .collect();
    let total: usize = blobs.iter().map(Vec::len).sum();
    let upstream = Upstream::start(blobs.clone(), Behaviour::Slow);
    let addresses: Vec<SocketAddr> = (0..4).map(|_| free_port()).collect();
    let hosts: Vec<Host> = addresses
        .iter()
        .map(|a| Host::start(config(*a, &upstream, &addresses)))
        .collect();
    std::thread::scope(|scope| {
        for a in &addresses {
            for b in &blobs {
                scope.spawn(move || {
                    let (status, headers, body, whole) = get(*a, "GET", &blob_path(b), &[]);
                    assert_eq!(status, 200);
                    assert!(whole && body == *b, "host {a}: blob of {} bytes", b.len());
                    assert_eq!(
                        headers["docker-content-digest"],
                        format!("sha256:{}", hex(b))
                    );
                });
            }
        }
    });
    let gets = upstream.gets.lock().unwrap().clone();
    let sent = *upstream.bytes.lock().unwrap();
    eprintln!(
        "upstream GETs per blob: {gets:?}; bytes {sent} of {total} ({:.2}x)",
        sent as f64 / total as f64
    );
    assert_eq!(gets.len(), blobs.len());
    assert!(gets.values().all(|&n| n == 1), "{gets:?}");
    assert!(sent as f64 <= 1.25 * total as f64);
    let from_peers: u64 = hosts.iter().map(|h| h.counters()["blobs_from_peers"]).sum();
    let from_upstream: u64 = hosts
        .iter()
        .map(|h| h.counters()["blobs_from_upstream"])
        .sum();
    assert_eq!(from_upstream, blobs.len() as u64);
    assert!(from_peers > 0);
    // Again: every host now answers from its cache.
    let cached_before: u64 = hosts.iter().map(|h| h.counters()["blobs_from_cache"]).sum();
    for a in &addresses {
        for b in &blobs {
            assert_eq!(get(*a, "GET", &blob_path(b), &[]).2, *b);
        }
    }
    assert_eq!(upstream.gets.lock().unwrap().clone(), gets);
    let cached: u64 = hosts.iter().map(|h| h.counters()["blobs_from_cache"]).sum();
    assert_eq!(cached - cached_before, 4 * blobs.len() as u64);
    // A manifest: by tag from the upstream, by digest checked.
    let (status, headers, body, _) = get(
        addresses[1],
        "GET",
        "/v2/e2e/multilayer/manifests/1?ns=reg.test:5000",
        &["Accept: application/vnd.oci.image.manifest.v1+json"],
    );
    assert_eq!((status, body.as_slice()), (200, MANIFEST));
    assert_eq!(headers["content-type"], MANIFEST_TYPE);
    let by_digest = format!("/v2/e2e/multilayer/manifests/sha256:{}", hex(MANIFEST));
    assert_eq!(get(addresses[2], "GET", &by_digest, &[]).2, MANIFEST);
    for h in hosts {
        h.mirror.unwrap().shutdown();
    }
}

#[test]
fn a_peer_down_stalled_or_wrong_costs_a_fallback_and_never_caches_wrong_bytes() {
    let blobs: Vec<Vec<u8>> = (0..12).map(|i| pattern(100 + i, 200_000)).collect();
    let upstream = Upstream::start(blobs.clone(), Behaviour::Slow);
    let stalled = Upstream::start(Vec::new(), Behaviour::Stall);
    let wrong = Upstream::start(blobs.clone(), Behaviour::Wrong);
    let down = free_port();
    let me = free_port();
    let peers = [me, down, stalled.address, wrong.address];
    let host = Host::start(config(me, &upstream, &peers));
    let mut failed = 0;
    for b in &blobs {
        let (status, _, body, whole) = get(me, "GET", &blob_path(b), &[]);
        if status == 200 && whole && body == *b {
            continue;
        }
        // Only the wrong peer's bytes may fail a request, and never whole.
        assert!(!(whole && status == 200), "wrong bytes served whole");
        failed += 1;
        let (status, _, body, whole) = get(me, "GET", &blob_path(b), &[]);
        assert!(
            status == 200 && whole && body == *b,
            "the retry gets the blob"
        );
    }
    let c = host.counters();
    eprintln!("counters: {c:?}; requests failed once: {failed}");
    assert!(c["fallbacks"] >= 2, "{c:?}");
    assert_eq!(c["digest_mismatches"], failed);
    assert!(
        failed <= 1,
        "the wrong peer is skipped after its first wrong blob"
    );
    // Every blob cached is right: served again from the cache.
    let gets_before = upstream.gets.lock().unwrap().clone();
    for b in &blobs {
        assert_eq!(get(me, "GET", &blob_path(b), &[]).2, *b);
    }
    assert_eq!(*upstream.gets.lock().unwrap(), gets_before);
    host.mirror.unwrap().shutdown();
}

#[test]
fn a_cached_blob_that_no_longer_matches_is_fetched_again_and_the_cache_outlives_a_restart() {
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| pattern(200 + i, 300_000)).collect();
    let upstream = Upstream::start(blobs.clone(), Behaviour::Slow);
    let me = free_port();
    let mut host = Host::start(config(me, &upstream, &[me]));
    for b in &blobs {
        assert_eq!(get(me, "GET", &blob_path(b), &[]).2, *b);
    }
    host.restart();
    assert_eq!(get(me, "GET", &blob_path(&blobs[0]), &[]).2, blobs[0]);
    assert_eq!(
        upstream.gets.lock().unwrap()[&hex(&blobs[0])],
        1,
        "served from the cache"
    );
    // A byte of a cached blob changed on the device.
    let layer = host.engine.layer_id(lcfs_mirror::store::LAYER).unwrap();
    let dir = host
        .engine
        .lookup(layer, lcfs_engine::ROOT_INODE, b"blobs")
        .unwrap()
        .inode;
    let file = host
        .engine
        .lookup(layer, dir, hex(&blobs[1]).as_bytes())
        .unwrap()
        .inode;
    host.engine.write(layer, file, 1000, b"!").unwrap();
    let (status, _, body, whole) = get(me, "GET", &blob_path(&blobs[1]), &[]);
    assert!(status == 200 && whole && body == blobs[1]);
    assert_eq!(
        upstream.gets.lock().unwrap()[&hex(&blobs[1])],
        2,
        "fetched again"
    );
    assert_eq!(host.counters()["digest_mismatches"], 1);
    // Ranges, from the cache and of a blob not cached yet.
    let (status, headers, body, _) = get(
        me,
        "GET",
        &blob_path(&blobs[2]),
        &["Range: bytes=1000-1999"],
    );
    assert_eq!((status, body.as_slice()), (206, &blobs[2][1000..2000]));
    assert_eq!(
        headers["content-range"],
        format!("bytes 1000-1999/{}", blobs[2].len())
    );
    host.mirror.take().unwrap().shutdown();
}

#[test]
fn bad_requests_get_oci_errors() {
    let blob = pattern(300, 5000);
    let upstream = Upstream::start(vec![blob.clone()], Behaviour::Slow);
    let me = free_port();
    let mut cfg = config(me, &upstream, &[me]);
    cfg.token = Some("a-token-of-sixteen-or-more".into());
    let host = Host::start(cfg);
    let auth = "Authorization: Bearer a-token-of-sixteen-or-more";
    let code = |status: u16, body: &[u8]| -> (u16, String) {
        let v = String::from_utf8_lossy(body).into_owned();
        let code = v
            .split("\"code\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("")
            .to_string();
        (status, code)
    };
    let (s, _, b, _) = get(me, "GET", &blob_path(&blob), &[]);
    assert_eq!(code(s, &b), (401, "UNAUTHORIZED".into()));
    let (s, _, b, _) = get(
        me,
        "GET",
        &blob_path(&blob),
        &["Authorization: Bearer wrong"],
    );
    assert_eq!(code(s, &b), (401, "UNAUTHORIZED".into()));
    for (path, want) in [
        ("/v2/e2e/x/blobs/sha256:zz", (400, "DIGEST_INVALID")),
        ("/v2/E2E/x/blobs/sha256:00", (400, "NAME_INVALID")),
        ("/v2/e2e/../x/manifests/1", (400, "NAME_INVALID")),
        ("/v2/e2e/x/manifests/-1", (400, "MANIFEST_INVALID")),
        ("/v2/e2e/x/tags/list", (404, "NOT_FOUND")),
    ] {
        let (s, _, b, _) = get(me, "GET", path, &[auth]);
        assert_eq!(code(s, &b), (want.0, want.1.to_string()), "{path}");
    }
    let unknown = format!("/v2/e2e/x/blobs/sha256:{}", "0".repeat(64));
    let (s, _, b, _) = get(me, "GET", &unknown, &[auth]);
    assert_eq!(s, 502, "{}", String::from_utf8_lossy(&b));
    for range in [
        "Range: bytes=9-1",
        "Range: bytes=1-2,5-6",
        "Range: lines=1-",
    ] {
        let (s, _, b, _) = get(me, "GET", &blob_path(&blob), &[auth, range]);
        assert_eq!(code(s, &b), (416, "RANGE_INVALID".into()), "{range}");
    }
    let (s, _, b, _) = get(me, "GET", &blob_path(&blob), &[auth, "Range: bytes=99999-"]);
    assert_eq!(code(s, &b), (416, "RANGE_INVALID".into()));
    let (s, _, _, _) = get(me, "DELETE", &blob_path(&blob), &[auth]);
    assert_eq!(s, 405);
    let (s, h, b, _) = get(me, "HEAD", &blob_path(&blob), &[auth]);
    assert_eq!((s, b.len()), (200, 0));
    assert_eq!(h["content-length"], "5000");
    assert_eq!(get(me, "GET", "/v2/", &[auth]).0, 200);
    host.mirror.unwrap().shutdown();
}

#[test]
fn a_home_cut_off_mid_blob_is_followed_by_the_upstream_from_where_it_stopped() {
    let blobs: Vec<Vec<u8>> = (0..10).map(|i| pattern(400 + i, 600_000)).collect();
    let upstream = Upstream::start(blobs.clone(), Behaviour::Slow);
    let cut = Upstream::start(blobs.clone(), Behaviour::Truncate);
    let me = free_port();
    let host = Host::start(config(me, &upstream, &[me, cut.address]));
    for b in &blobs {
        let (status, _, body, whole) = get(me, "GET", &blob_path(b), &[]);
        assert!(status == 200 && whole && body == *b, "no request fails");
    }
    let c = host.counters();
    eprintln!("counters: {c:?}");
    assert!(c["fallbacks"] >= 1, "{c:?}");
    assert_eq!(c["digest_mismatches"], 0);
    // The upstream sent only what the cut peer had not: less than every
    // blob whole for the blobs homed at the peer.
    let sent = *upstream.bytes.lock().unwrap();
    let total: u64 = blobs.iter().map(|b| b.len() as u64).sum();
    assert!(
        sent < total,
        "resumed with a range: {sent} of {total} bytes"
    );
    host.mirror.unwrap().shutdown();
}

/// The rendezvous score the mirror gives `peer` for blob `hex` (docs/mirror.md).
fn score(peer: &str, hex_digest: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(peer.as_bytes());
    h.update([0]);
    h.update(hex_digest.as_bytes());
    u64::from_be_bytes(h.finalize()[..8].try_into().unwrap())
}

#[test]
fn an_upstream_behind_the_token_flow_is_pulled_with_this_hosts_credentials_only() {
    // A peer that has nothing: it records what it is asked, with which
    // headers.
    let peer = Upstream::start(Vec::new(), Behaviour::Slow);
    let me = free_port();
    let peer_name = peer.address.to_string();
    // Blobs homed at the peer and at this host, two of each.
    let (mut at_peer, mut at_me) = (Vec::new(), Vec::new());
    for seed in 300.. {
        let b = pattern(seed, 150_000);
        let h = hex(&b);
        if score(&peer_name, &h) > score(&me.to_string(), &h) {
            if at_peer.len() < 2 {
                at_peer.push(b);
            }
        } else if at_me.len() < 2 {
            at_me.push(b);
        }
        if at_peer.len() == 2 && at_me.len() == 2 {
            break;
        }
    }
    let blobs: Vec<Vec<u8>> = at_peer.iter().chain(&at_me).cloned().collect();
    let upstream = Upstream::start(blobs.clone(), Behaviour::Auth);
    let mut c = config(me, &upstream, &[me, peer.address]);
    c.token = Some("peer-token-0123456789".into());
    c.upstreams.get_mut("reg.test:5000").unwrap().credentials = Some(lcfs_mirror::Credentials {
        username: "puller".into(),
        password: "pw-right".into(),
    });
    let host = Host::start(c.clone());
    for b in &blobs {
        let (status, _, body, whole) = get(
            me,
            "GET",
            &blob_path(b),
            &["Authorization: Bearer peer-token-0123456789"],
        );
        assert!(status == 200 && whole && body == *b, "status {status}");
    }
    let (status, _, body, _) = get(
        me,
        "GET",
        "/v2/e2e/multilayer/manifests/1?ns=reg.test:5000",
        &["Authorization: Bearer peer-token-0123456789"],
    );
    assert_eq!((status, body.as_slice()), (200, MANIFEST));
    let seen = upstream.seen.lock().unwrap().clone();
    eprintln!("the upstream saw: {seen:?}");
    let tokens = seen.iter().filter(|(p, _)| p.starts_with("/token")).count();
    assert_eq!(tokens, 1, "one token for the repository, kept: {seen:?}");
    for (path, auth) in &seen {
        if path.starts_with("/storage/") {
            assert_eq!(auth, &None, "credentials sent to a redirect's other origin");
        }
    }
    // The peer was asked (without this host's credentials: only the
    // peers' token) and answered 404; the upstream served.
    let asked = peer.seen.lock().unwrap().clone();
    assert!(!asked.is_empty(), "the peer was never asked");
    for (path, auth) in &asked {
        assert_eq!(
            auth.as_deref(),
            Some("Bearer peer-token-0123456789"),
            "{path}"
        );
    }
    host.mirror.unwrap().shutdown();

    // Wrong or no credentials: a clear error, nothing cached.
    for creds in [
        Some(lcfs_mirror::Credentials {
            username: "puller".into(),
            password: "pw-wrong".into(),
        }),
        None,
    ] {
        let me = free_port();
        let mut c = config(me, &upstream, &[]);
        c.upstreams.get_mut("reg.test:5000").unwrap().credentials = creds.clone();
        let host = Host::start(c);
        let fresh = pattern(999, 1000);
        let (status, _, body, _) = get(me, "GET", &blob_path(&blobs[0]), &[]);
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("asks for authorization"), "{body}");
        assert!(body.contains("token realm") || creds.is_none(), "{body}");
        assert_eq!(get(me, "GET", &blob_path(&fresh), &[]).0, 502);
        assert_eq!(host.counters()["blobs_from_upstream"], 0);
        host.mirror.unwrap().shutdown();
    }
}

#[test]
fn a_range_not_here_yet_is_passed_on_through_the_home_and_the_blob_cached_for_later() {
    let big = pattern(77, 6 << 20);
    let size = big.len();
    let upstream = Upstream::start(vec![big.clone()], Behaviour::Slow);
    let addresses = [free_port(), free_port()];
    let hosts: Vec<Host> = addresses
        .iter()
        .map(|a| Host::start(config(*a, &upstream, &addresses)))
        .collect();
    let home = (0..2)
        .max_by_key(|&i| score(&addresses[i].to_string(), &hex(&big)))
        .unwrap();
    let other = 1 - home;
    // The blob's tail, as a lazy reader asks for it, from the host that is
    // not its home: passed on from the upstream through the home, without
    // waiting for the home's download to reach it.
    let range = |first: usize, last: usize| format!("Range: bytes={first}-{last}");
    let (status, headers, body, whole) = get(
        addresses[other],
        "GET",
        &blob_path(&big),
        &[&range(size - 100, size - 1)],
    );
    assert_eq!(status, 206);
    assert!(whole && body == big[size - 100..]);
    assert_eq!(
        headers["content-range"],
        format!("bytes {}-{}/{size}", size - 100, size - 1)
    );
    assert!(hosts[home].counters()["ranges_passed"] >= 1);
    // Meanwhile both hosts cache the blob, the upstream sending it once.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while hosts
        .iter()
        .any(|h| h.counters()["blobs_from_upstream"] + h.counters()["blobs_from_peers"] == 0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the blob was not cached"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(hosts[home].counters()["blobs_from_upstream"], 1);
    assert_eq!(hosts[other].counters()["blobs_from_peers"], 1);
    // A range now comes from the cache: nothing more passed on or fetched.
    let passed: u64 = hosts.iter().map(|h| h.counters()["ranges_passed"]).sum();
    let gets = upstream.gets.lock().unwrap().clone();
    for h in [home, other] {
        let (status, _, body, _) = get(
            addresses[h],
            "GET",
            &blob_path(&big),
            &[&range(1000, 70_000)],
        );
        assert_eq!((status, body.as_slice()), (206, &big[1000..=70_000]));
    }
    assert_eq!(
        hosts
            .iter()
            .map(|h| h.counters()["ranges_passed"])
            .sum::<u64>(),
        passed
    );
    assert_eq!(upstream.gets.lock().unwrap().clone(), gets);
    // Whole blob GETs plus the one range: the upstream saw two GETs.
    assert_eq!(gets.values().sum::<usize>(), 2, "{gets:?}");
    for h in hosts {
        h.mirror.unwrap().shutdown();
    }
}
