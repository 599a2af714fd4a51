//! Cooperative pull (docs/mirror.md): a read-only OCI distribution endpoint
//! (`GET`/`HEAD` of `/v2/`, manifests and blobs, Range on blobs) that a
//! host's containerd uses as its registry mirror. A blob comes from the
//! local cache (on the lcfs device, store.rs), else from its *home* peer,
//! else from the upstream registry; it streams to the client as it arrives
//! and lands in the cache once its bytes hash to its digest.
//!
//! The home of a blob is the live peer with the highest rendezvous score
//! for its digest (SHA-256 of peer and digest), this host included: every
//! host computes the same home, so the home alone fetches the blob from
//! upstream and the others fetch it from the home, also while the home is
//! still downloading it. A peer's request (header [`PEER_HEADER`]) is
//! answered from the cache, a download under way, or the upstream: never
//! from another peer, so requests cannot loop. A bounded range of a blob
//! not here yet (a lazy reader's, docs/lazy.md) is fetched as a range
//! from the next source and passed on uncached, while the whole blob is
//! fetched for the cache ([`Peers`] routes this host's lazy reads to the
//! home).
//!
//! Integrity: the last byte of a blob reaches a client only once the whole
//! blob hashed to its digest; a source that sends other bytes fails the
//! download (the clients see the connection cut before the end, never a
//! whole wrong blob), is counted and, for a peer, skipped for a while; a
//! cached blob is hashed again before it is served whole.

pub mod store;
pub mod upstream;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RANGE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lcfs_engine::Engine;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use store::{Blob, BlobStore, Partial};
use tokio::sync::{mpsc, watch};
pub use upstream::{Credentials, Upstream};

/// The header a peer's request carries.
pub const PEER_HEADER: &str = "x-lcfs-mirror-peer";
/// Bytes read from the cache per chunk sent.
const CHUNK: usize = 1 << 20;
/// Bytes of a download written to the cache at once.
const WRITE_BATCH: usize = 256 << 10;
/// The largest manifest served (OCI registries commonly cap at 4 MiB).
const MANIFEST_MAX: usize = 4 << 20;
/// How long a peer that failed is left out of the homes.
pub const PEER_PENALTY: Duration = Duration::from_secs(30);
/// Connections served at once at most; more wait to be accepted.
const MAX_CONNECTIONS: usize = 1024;
/// How often `peers_dns` is resolved.
pub const DNS_REFRESH: Duration = Duration::from_secs(30);

/// What the mirror serves and where it fetches from.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Most bytes the blob cache keeps.
    pub cache_bytes: u64,
    /// Upstream registries by the host name containerd passes as `ns`
    /// (`registry.example:5000`).
    pub upstreams: BTreeMap<String, Upstream>,
    /// PEM certificates trusted for HTTPS upstreams besides the system's.
    pub ca_certificates: Vec<Vec<u8>>,
    /// The upstream of requests without `ns`.
    pub default_upstream: Option<String>,
    /// Every peer's address (`host:port` of its mirror), this host's too.
    pub peers: Vec<String>,
    /// A name resolving to every peer (a Kubernetes headless service),
    /// `name:port`: its addresses join `peers`, resolved again every
    /// [`DNS_REFRESH`].
    pub peers_dns: Option<String>,
    /// This host's address as it is in `peers`.
    pub self_address: Option<String>,
    /// The bearer token every request must carry, when set.
    pub token: Option<String>,
    /// How long a peer may take to answer, or between two chunks.
    pub peer_timeout: Duration,
    /// The same for the upstream.
    pub upstream_timeout: Duration,
}

/// What the mirror counted.
#[derive(Default, Debug)]
pub struct Counters {
    pub requests: AtomicU64,
    /// Blobs served whole from the cache, and fetched from a peer or the
    /// upstream.
    pub blobs_from_cache: AtomicU64,
    pub blobs_from_peers: AtomicU64,
    pub blobs_from_upstream: AtomicU64,
    pub bytes_from_peers: AtomicU64,
    pub bytes_from_upstream: AtomicU64,
    /// Blob requests of this host's clients (not peers) answered.
    pub served_to_clients: AtomicU64,
    /// Blob requests of other peers answered, and their bytes.
    pub served_to_peers: AtomicU64,
    pub bytes_to_peers: AtomicU64,
    /// Bytes that did not hash to their digest (from a source or the cache).
    pub digest_mismatches: AtomicU64,
    /// A source that failed (down, slow, cut short), and the next was tried.
    pub fallbacks: AtomicU64,
    /// Ranges of a blob not here yet, fetched from the next source and
    /// passed on uncached.
    pub ranges_passed: AtomicU64,
}

/// A snapshot of [`Counters`].
pub type CounterValues = BTreeMap<&'static str, u64>;

impl Counters {
    /// The counter of bytes received from `source`.
    fn received_from(&self, source: &Source) -> &AtomicU64 {
        match source {
            Source::Peer(_) => &self.bytes_from_peers,
            Source::Upstream(_) => &self.bytes_from_upstream,
        }
    }

    pub fn values(&self) -> CounterValues {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BTreeMap::from([
            ("requests", v(&self.requests)),
            ("blobs_from_cache", v(&self.blobs_from_cache)),
            ("blobs_from_peers", v(&self.blobs_from_peers)),
            ("blobs_from_upstream", v(&self.blobs_from_upstream)),
            ("bytes_from_peers", v(&self.bytes_from_peers)),
            ("bytes_from_upstream", v(&self.bytes_from_upstream)),
            ("served_to_clients", v(&self.served_to_clients)),
            ("served_to_peers", v(&self.served_to_peers)),
            ("bytes_to_peers", v(&self.bytes_to_peers)),
            ("digest_mismatches", v(&self.digest_mismatches)),
            ("fallbacks", v(&self.fallbacks)),
            ("ranges_passed", v(&self.ranges_passed)),
        ])
    }
}

type Body_ = BoxBody<Bytes, io::Error>;

/// A blob being fetched: its bytes land in a partial file of the cache.
struct Download {
    progress: watch::Sender<Progress>,
    ino: u64,
}

#[derive(Clone, Debug, Default)]
struct Progress {
    /// Bytes in the partial file.
    written: u64,
    /// The blob's size, once a source said.
    size: Option<u64>,
    /// The end: the cached blob, or why it failed.
    done: Option<Result<Blob, String>>,
}

/// Where a blob is fetched from.
#[derive(Clone, Debug, PartialEq)]
enum Source {
    Peer(String),
    /// By its key in [`Config::upstreams`].
    Upstream(String),
}

struct Mirror {
    config: Config,
    store: Arc<BlobStore>,
    client: upstream::HttpClient,
    /// Authorizations the upstreams' challenges gave.
    auth: Mutex<upstream::AuthCache>,
    downloads: Mutex<HashMap<String, Arc<Download>>>,
    /// Peers that failed, and when.
    penalized: Mutex<HashMap<String, Instant>>,
    /// The addresses `peers_dns` resolved to last.
    resolved: Mutex<Vec<String>>,
    counters: Arc<Counters>,
}

/// The running mirror; [`MirrorServer::shutdown`] stops it.
pub struct MirrorServer {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    /// The address bound (port 0 picks one).
    pub address: SocketAddr,
    pub counters: Arc<Counters>,
    /// The blob cache (the garbage collector evicts from it).
    pub store: Arc<BlobStore>,
    mirror: Arc<Mirror>,
}

/// Where a blob's home peer serves it, for a reader of ranges on this
/// host (the lazy mount): its URL there and the headers a peer's request
/// carries (the peers' token, never the upstream's credentials).
#[derive(Clone, Debug)]
pub struct PeerRoute {
    pub peer: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    /// How long the peer may take to answer.
    pub timeout: Duration,
}

/// The mirror's choice of home peers, for the lazy mount of this host.
#[derive(Clone)]
pub struct Peers(Arc<Mirror>);

impl Peers {
    /// The home of blob `sha256:hex` of repository `name` of registry
    /// `ns`, when the mirror has peers (this host may be the home: its own
    /// mirror then fetches the blob for the cluster).
    pub fn route(&self, ns: &str, name: &str, hex: &str) -> Option<PeerRoute> {
        let m = &self.0;
        let home = m.home(hex)?;
        let mut headers = vec![(PEER_HEADER.to_string(), "1".to_string())];
        if let Some(t) = &m.config.token {
            headers.push(("Authorization".to_string(), format!("Bearer {t}")));
        }
        Some(PeerRoute {
            url: format!(
                "http://{home}/v2/{name}/blobs/sha256:{hex}?ns={}",
                upstream::percent_encode(ns)
            ),
            peer: home,
            headers,
            timeout: m.config.peer_timeout,
        })
    }

    /// A peer failed a reader: left out of the homes for a while.
    pub fn failed(&self, peer: &str, why: &str) {
        self.0.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
        log::warn!("mirror: peer {peer}: {why}; reading from the next source");
        self.0.penalize(peer);
    }
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("peers", &self.0.config.peers)
            .field("self", &self.0.config.self_address)
            .finish()
    }
}

impl MirrorServer {
    /// The mirror's home peers, for the lazy mount.
    pub fn peers(&self) -> Peers {
        Peers(self.mirror.clone())
    }

    pub fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens the blob cache on `engine`, binds `config.listen` and serves on a
/// thread of its own.
pub fn serve(engine: Arc<Engine>, config: Config) -> io::Result<MirrorServer> {
    let store = BlobStore::open(engine, config.cache_bytes)
        .map_err(|e| io::Error::other(format!("opening the blob cache: {e}")))?;
    let listener = std::net::TcpListener::bind(config.listen)
        .map_err(|e| io::Error::new(e.kind(), format!("binding {}: {e}", config.listen)))?;
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?;
    let counters = Arc::new(Counters::default());
    let (stop, mut stopped) = watch::channel(false);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("lcfs-mirror")
        .enable_all()
        .build()?;
    let client = upstream::client(&config.ca_certificates)?;
    let store = Arc::new(store);
    let mirror = Arc::new(Mirror {
        config,
        store: store.clone(),
        client,
        auth: Mutex::new(Default::default()),
        downloads: Mutex::new(HashMap::new()),
        penalized: Mutex::new(HashMap::new()),
        resolved: Mutex::new(Vec::new()),
        counters: counters.clone(),
    });
    let served = mirror.clone();
    let thread = std::thread::Builder::new()
        .name("lcfs-mirror".into())
        .spawn(move || {
            runtime.block_on(async move {
                if let Some(name) = mirror.config.peers_dns.clone() {
                    let m = mirror.clone();
                    tokio::spawn(async move {
                        loop {
                            match tokio::net::lookup_host(name.as_str()).await {
                                Ok(addrs) => {
                                    let mut found: Vec<String> =
                                        addrs.map(|a| a.to_string()).collect();
                                    found.sort();
                                    *m.resolved.lock().unwrap_or_else(|p| p.into_inner()) = found;
                                }
                                Err(e) => log::warn!("mirror: resolving {name}: {e}"),
                            }
                            tokio::time::sleep(DNS_REFRESH).await;
                        }
                    });
                }
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        log::error!("mirror: {e}");
                        return;
                    }
                };
                let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
                loop {
                    let Ok(slot) = slots.clone().acquire_owned().await else {
                        break;
                    };
                    tokio::select! {
                        _ = stopped.changed() => break,
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => {
                                let m = mirror.clone();
                                tokio::spawn(async move {
                                    let _slot = slot;
                                    let svc = hyper::service::service_fn(move |req| {
                                        let m = m.clone();
                                        async move { Ok::<_, std::convert::Infallible>(handle(m, req).await) }
                                    });
                                    let _ = hyper::server::conn::http1::Builder::new()
                                        .serve_connection(TokioIo::new(stream), svc)
                                        .await;
                                });
                            }
                            Err(e) => {
                                log::warn!("mirror: accept: {e}");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(2));
        })?;
    Ok(MirrorServer {
        stop,
        thread: Some(thread),
        address,
        counters,
        store,
        mirror: served,
    })
}

// ---------------------------------------------------------------- requests

/// What a request asks for.
#[derive(Debug, PartialEq)]
pub enum Route {
    Base,
    Manifest { name: String, reference: String },
    Blob { name: String, hex: String },
}

/// Parses `/v2/...`; Err is the (status, OCI error code, message) to answer.
pub fn route(path: &str) -> Result<Route, (StatusCode, &'static str, String)> {
    let bad_name = |what: &str| (StatusCode::BAD_REQUEST, "NAME_INVALID", what.to_string());
    if path == "/v2/" || path == "/v2" {
        return Ok(Route::Base);
    }
    let rest = path.strip_prefix("/v2/").ok_or((
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        format!("no such path {path:?}"),
    ))?;
    let (name, kind, last) = {
        let mut parts = rest.rsplitn(3, '/');
        let last = parts.next().unwrap_or("");
        let kind = parts.next().unwrap_or("");
        let name = parts.next().unwrap_or("");
        (name, kind, last)
    };
    if !valid_name(name) {
        return Err(bad_name("the repository name is not an OCI name"));
    }
    match kind {
        "blobs" => match parse_digest(last) {
            Some(hex) => Ok(Route::Blob {
                name: name.into(),
                hex,
            }),
            None => Err((
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                format!("{last:?} is not a sha256 digest"),
            )),
        },
        "manifests" if parse_digest(last).is_some() || valid_tag(last) => Ok(Route::Manifest {
            name: name.into(),
            reference: last.into(),
        }),
        "manifests" => Err((
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
            format!("{last:?} is neither a tag nor a sha256 digest"),
        )),
        _ => Err((
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("no such path {path:?}"),
        )),
    }
}

/// An OCI repository name: components of `[a-z0-9]` joined by `.`, `_`,
/// `__` or `-`s, separated by `/`; at most 255 bytes.
fn valid_name(name: &str) -> bool {
    let component = |c: &str| {
        let b = c.as_bytes();
        !b.is_empty()
            && b.iter()
                .all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || b"._-".contains(&x))
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && !c.contains("..")
            && !c.contains("___")
    };
    !name.is_empty() && name.len() <= 255 && name.split('/').all(component)
}

/// An OCI tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || b"._-".contains(&x))
}

/// The hex of `sha256:<64 lower-case hex>`.
fn parse_digest(s: &str) -> Option<String> {
    s.strip_prefix("sha256:")
        .filter(|h| store::is_hex_digest(h))
        .map(str::to_string)
}

/// A `Range: bytes=a-b` (or `a-`) header: (first, last inclusive).
pub fn parse_range(v: &str) -> Option<(u64, Option<u64>)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let first: u64 = a.trim().parse().ok()?;
    let last = match b.trim() {
        "" => None,
        b => Some(b.parse::<u64>().ok().filter(|&l| l >= first)?),
    };
    Some((first, last))
}

/// The `ns` query parameter (containerd's name of the registry a mirror
/// request is for), percent-decoded.
fn query_ns(query: Option<&str>) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "ns").then(|| percent_decode(v)).flatten()
    })
}

/// `%XX` escapes decoded (and `+` as a space); None for a bad escape or
/// bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body_> {
    let body: Bytes = body.into();
    let length = body.len() as u64;
    let mut r = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    // Kept when a HEAD drops the body.
    r.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(length));
    r
}

fn oci_error(status: StatusCode, code: &str, message: &str) -> Response<Body_> {
    let body = format!(
        "{{\"errors\":[{{\"code\":\"{code}\",\"message\":{}}}]}}",
        json_string(message)
    );
    let mut r = full(status, body);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

async fn handle(m: Arc<Mirror>, req: Request<Incoming>) -> Response<Body_> {
    m.counters.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(token) = &m.config.token {
        let sent = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !sent.is_some_and(|s| lcfs_engine::digest::same_secret(s.as_bytes(), token.as_bytes())) {
            return oci_error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "a bearer token is required",
            );
        }
    }
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            return oci_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "this mirror serves GET and HEAD only",
            )
        }
    };
    let from_peer = req.headers().contains_key(PEER_HEADER);
    let ns = query_ns(req.uri().query());
    let range = match req
        .headers()
        .get(RANGE)
        .map(|v| v.to_str().map(parse_range))
    {
        None => None,
        Some(Ok(Some(r))) => Some(r),
        Some(_) => {
            return oci_error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "RANGE_INVALID",
                "only one range, bytes=FIRST-[LAST], is served",
            )
        }
    };
    let accept = req.headers().get(hyper::header::ACCEPT).cloned();
    let route = match route(req.uri().path()) {
        Ok(r) => r,
        Err((status, code, message)) => return oci_error(status, code, &message),
    };
    let mut response = match route {
        Route::Base => full(StatusCode::OK, "{}"),
        Route::Manifest { name, reference } => {
            manifest(&m, &name, &reference, ns.as_deref(), accept, from_peer).await
        }
        Route::Blob { name, hex } => {
            blob(&m, &name, &hex, ns.as_deref(), range, head, from_peer).await
        }
    };
    response.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    if head {
        // The headers a GET would have, no body.
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, Empty::new().map_err(|never| match never {}).boxed());
    }
    response
}

// ---------------------------------------------------------------- sources

impl Mirror {
    /// The key of the upstream of `ns`.
    fn upstream(&self, ns: Option<&str>) -> Option<String> {
        let key = ns
            .map(str::to_string)
            .or_else(|| self.config.default_upstream.clone())?;
        self.config.upstreams.contains_key(&key).then_some(key)
    }

    /// The live peer with the highest rendezvous score for `hex`.
    fn home(&self, hex: &str) -> Option<String> {
        let now = Instant::now();
        let mut penalized = self.penalized.lock().unwrap_or_else(|p| p.into_inner());
        penalized.retain(|_, at| now.duration_since(*at) < PEER_PENALTY);
        let resolved = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        self.config
            .peers
            .iter()
            .chain(resolved.iter())
            .filter(|p| !penalized.contains_key(*p))
            .max_by_key(|p| score(p, hex))
            .cloned()
    }

    /// How long `source` may take to answer, or between two chunks.
    fn timeout(&self, source: &Source) -> Duration {
        match source {
            Source::Peer(_) => self.config.peer_timeout,
            Source::Upstream(_) => self.config.upstream_timeout,
        }
    }

    fn penalize(&self, peer: &str) {
        self.penalized
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer.to_string(), Instant::now());
    }

    /// Where to fetch `hex` from, in order.
    fn sources(&self, hex: &str, ns: Option<&str>, from_peer: bool) -> Vec<Source> {
        let mut out = Vec::new();
        if !from_peer {
            if let Some(home) = self.home(hex) {
                if Some(&home) != self.config.self_address.as_ref() {
                    out.push(Source::Peer(home));
                }
            }
        }
        if let Some(u) = self.upstream(ns) {
            out.push(Source::Upstream(u));
        }
        out
    }

    fn url(&self, source: &Source, path: &str, ns: Option<&str>) -> String {
        let ns = ns.map(|n| format!("?ns={n}")).unwrap_or_default();
        match source {
            Source::Peer(p) => format!("http://{p}{path}{ns}"),
            Source::Upstream(key) => match self.config.upstreams.get(key) {
                Some(u) => format!("{}{path}", u.url.trim_end_matches('/')),
                None => String::new(),
            },
        }
    }

    /// A GET (or HEAD) of `url` from `source`, with a time limit for the
    /// answer's head; the upstream's challenges answered (upstream.rs).
    async fn fetch(
        &self,
        source: &Source,
        url: &str,
        method: Method,
        headers: &[(hyper::header::HeaderName, HeaderValue)],
    ) -> Result<Response<Incoming>, String> {
        match source {
            Source::Peer(_) => {
                let mut h = headers.to_vec();
                h.push((
                    hyper::header::HeaderName::from_static(PEER_HEADER),
                    HeaderValue::from_static("1"),
                ));
                if let Some(t) = &self.config.token {
                    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {t}")) {
                        h.push((AUTHORIZATION, v));
                    }
                }
                self.send(url, &method, &h, self.config.peer_timeout).await
            }
            Source::Upstream(key) => self.fetch_upstream(key, url, method, headers).await,
        }
    }
}

/// The rendezvous score of `peer` for blob `hex`.
fn score(peer: &str, hex: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(peer.as_bytes());
    h.update([0]);
    h.update(hex.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

// ---------------------------------------------------------------- manifests

async fn manifest(
    m: &Arc<Mirror>,
    name: &str,
    reference: &str,
    ns: Option<&str>,
    accept: Option<HeaderValue>,
    from_peer: bool,
) -> Response<Body_> {
    let by_digest = parse_digest(reference);
    // Tags move: always the upstream's answer. By digest, peers may answer.
    let sources: Vec<Source> = match &by_digest {
        Some(hex) => m.sources(hex, ns, from_peer),
        None => m.upstream(ns).map(Source::Upstream).into_iter().collect(),
    };
    if sources.is_empty() {
        return oci_error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "no upstream is configured for this registry",
        );
    }
    let path = format!("/v2/{name}/manifests/{reference}");
    let headers: Vec<_> = accept
        .into_iter()
        .map(|a| (hyper::header::ACCEPT, a))
        .collect();
    let mut last = (StatusCode::BAD_GATEWAY, String::from("no source answered"));
    for source in sources {
        let url = m.url(&source, &path, ns);
        let r = match m.fetch(&source, &url, Method::GET, &headers).await {
            Ok(r) => r,
            Err(e) => {
                fail_source(m, &source, &e);
                last = (StatusCode::BAD_GATEWAY, e);
                continue;
            }
        };
        let status = r.status();
        let content_type = r.headers().get(CONTENT_TYPE).cloned();
        if status != StatusCode::OK {
            last = (status, format!("{url} answered {status}"));
            if let Source::Peer(_) = source {
                continue;
            }
            break;
        }
        let body = match Limited::collect(r.into_body(), MANIFEST_MAX).await {
            Ok(b) => b,
            Err(e) => {
                fail_source(m, &source, &e);
                last = (StatusCode::BAD_GATEWAY, e);
                continue;
            }
        };
        let hex = lcfs_engine::digest::hex(&Sha256::digest(&body));
        if let Some(want) = &by_digest {
            if &hex != want {
                m.counters.digest_mismatches.fetch_add(1, Ordering::Relaxed);
                fail_source(m, &source, "a manifest that does not match its digest");
                last = (StatusCode::BAD_GATEWAY, format!("{url}: wrong digest"));
                continue;
            }
        }
        let mut resp = full(StatusCode::OK, body);
        if let Some(ct) = content_type {
            resp.headers_mut().insert(CONTENT_TYPE, ct);
        }
        if let Ok(v) = HeaderValue::from_str(&format!("sha256:{hex}")) {
            resp.headers_mut().insert("docker-content-digest", v);
        }
        return resp;
    }
    let code = if last.0 == StatusCode::NOT_FOUND {
        "MANIFEST_UNKNOWN"
    } else {
        "UNAVAILABLE"
    };
    oci_error(last.0, code, &last.1)
}

/// A source failed: counted; a peer is left out of the homes for a while.
fn fail_source(m: &Mirror, source: &Source, why: &str) {
    m.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
    log::warn!("mirror: {source:?}: {why}; trying the next source");
    if let Source::Peer(p) = source {
        m.penalize(p);
    }
}

/// A body read whole, at most `max` bytes.
pub(crate) struct Limited;

impl Limited {
    pub(crate) async fn collect(mut body: Incoming, max: usize) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Some(d) = frame.data_ref() {
                if out.len() + d.len() > max {
                    return Err(format!("larger than {max} bytes"));
                }
                out.extend_from_slice(d);
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------- blobs

#[allow(clippy::too_many_arguments)]
async fn blob(
    m: &Arc<Mirror>,
    name: &str,
    hex: &str,
    ns: Option<&str>,
    range: Option<(u64, Option<u64>)>,
    head: bool,
    from_peer: bool,
) -> Response<Body_> {
    if !from_peer && !head {
        m.counters.served_to_clients.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(b) = m.store.get(hex) {
        // Served whole only once it hashed right since the cache was
        // opened; a range as it is.
        let ok = b.verified || range.is_some() || head || verify_cached(m, hex, b).await;
        if ok {
            if !head && range.is_none() {
                m.counters.blobs_from_cache.fetch_add(1, Ordering::Relaxed);
            }
            if from_peer && !head {
                m.counters.served_to_peers.fetch_add(1, Ordering::Relaxed);
            }
            return stream_cached(m, hex, b, range, from_peer);
        }
    }
    // A bounded range not here yet (a lazy reader's) is not kept waiting
    // for the download to reach it: it is fetched from the next source and
    // passed on, while the blob is fetched for the cache.
    if let (Some((first, Some(last))), false) = (range, head) {
        let here = m
            .downloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(hex)
            .is_some_and(|d| d.progress.borrow().written > last);
        if !here {
            if let Err((_, _, why)) = join_or_start(m, name, hex, ns, from_peer) {
                log::debug!("mirror: sha256:{hex} not cached: {why}");
            }
            return pass_range(m, name, hex, ns, (first, last), from_peer).await;
        }
    }
    let download = match join_or_start(m, name, hex, ns, from_peer) {
        Ok(d) => d,
        Err((status, code, message)) => return oci_error(status, code, &message),
    };
    if from_peer && !head {
        m.counters.served_to_peers.fetch_add(1, Ordering::Relaxed);
    }
    stream_download(m, hex, download, range, from_peer).await
}

/// Bytes `first..=last` of blob `hex` from the sources in turn, passed on
/// as they arrive and not cached. They cannot be checked against the
/// blob's digest: the reader checks them (the lazy mount against its TOC's
/// chunk digests).
async fn pass_range(
    m: &Arc<Mirror>,
    name: &str,
    hex: &str,
    ns: Option<&str>,
    (first, last): (u64, u64),
    from_peer: bool,
) -> Response<Body_> {
    let path = format!("/v2/{name}/blobs/sha256:{hex}");
    let Ok(asked) = HeaderValue::from_str(&format!("bytes={first}-{last}")) else {
        return range_past_the_end();
    };
    let mut why = String::from("no upstream is configured for this registry");
    for source in m.sources(hex, ns, from_peer) {
        let url = m.url(&source, &path, ns);
        let r = match m
            .fetch(&source, &url, Method::GET, &[(RANGE, asked.clone())])
            .await
        {
            Ok(r) => r,
            Err(e) => {
                fail_source(m, &source, &e);
                why = e;
                continue;
            }
        };
        let got = r
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_content_range);
        let (start, end, size) = match (r.status(), got) {
            (StatusCode::PARTIAL_CONTENT, Some((s, e, n))) if s == first && e <= last => (s, e, n),
            (StatusCode::RANGE_NOT_SATISFIABLE, _) => return range_past_the_end(),
            (status, _) => {
                why = format!("{url} answered {status} to a range {first}-{last}");
                if status == StatusCode::NOT_FOUND && matches!(source, Source::Upstream(_)) {
                    return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", &why);
                }
                fail_source(m, &source, &why);
                continue;
            }
        };
        m.counters.ranges_passed.fetch_add(1, Ordering::Relaxed);
        let length = end - start + 1;
        let timeout = m.timeout(&source);
        let counters = m.counters.clone();
        let (tx, rx) = mpsc::channel(4);
        let mut body = r.into_body();
        tokio::spawn(async move {
            let mut left = length;
            while left > 0 {
                let frame = match tokio::time::timeout(timeout, body.frame()).await {
                    Ok(Some(Ok(f))) => f,
                    Ok(Some(Err(e))) => {
                        let _ = tx.send(Err(io::Error::other(e))).await;
                        return;
                    }
                    Ok(None) | Err(_) => {
                        let why = format!("{source:?} stopped sending");
                        let _ = tx.send(Err(io::Error::other(why))).await;
                        return;
                    }
                };
                let Ok(mut data) = frame.into_data() else {
                    continue;
                };
                data.truncate(left.min(usize::MAX as u64) as usize);
                left -= data.len() as u64;
                let n = data.len() as u64;
                counters
                    .received_from(&source)
                    .fetch_add(n, Ordering::Relaxed);
                if from_peer {
                    counters.bytes_to_peers.fetch_add(n, Ordering::Relaxed);
                }
                if tx.send(Ok(data)).await.is_err() {
                    return;
                }
            }
        });
        let mut resp = Response::new(BoxBody::new(ChannelBody { rx }));
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        let total = size.map_or("*".to_string(), |n| n.to_string());
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{total}")) {
            resp.headers_mut().insert("content-range", v);
        }
        blob_headers(&mut resp, hex, Some(length));
        return resp;
    }
    oci_error(StatusCode::BAD_GATEWAY, "UNAVAILABLE", &why)
}

/// `bytes FIRST-LAST/SIZE` (SIZE may be `*`).
pub fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let (span, size) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
    let size = match size {
        "*" => None,
        n => Some(n.parse().ok()?),
    };
    (a <= b && size.is_none_or(|n| b < n)).then_some((a, b, size))
}

/// Hashes cached blob `hex` again; drops it when it does not match.
async fn verify_cached(m: &Arc<Mirror>, hex: &str, b: Blob) -> bool {
    let store = m.store.clone();
    let want = hex.to_string();
    let ok = tokio::task::spawn_blocking(move || -> bool {
        let Ok(_hold) = store.hold(b.ino) else {
            return false;
        };
        let mut h = Sha256::new();
        let mut off = 0;
        while off < b.size {
            match store.read(b.ino, off, CHUNK) {
                Ok(d) if !d.is_empty() => {
                    off += d.len() as u64;
                    h.update(&d);
                }
                _ => return false,
            }
        }
        lcfs_engine::digest::hex(&h.finalize()) == want
    })
    .await
    .unwrap_or(false);
    if ok {
        m.store.mark_verified(hex);
    } else {
        m.counters.digest_mismatches.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "mirror: cached blob sha256:{hex} does not hash to its digest; fetching it again"
        );
        m.store.remove(hex);
    }
    ok
}

fn blob_headers(r: &mut Response<Body_>, hex: &str, length: Option<u64>) {
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("sha256:{hex}")) {
        h.insert("docker-content-digest", v);
    }
    h.insert("accept-ranges", HeaderValue::from_static("bytes"));
    if let Some(n) = length {
        h.insert(CONTENT_LENGTH, HeaderValue::from(n));
    }
}

/// (first, end exclusive) of `range` in a blob of `size`; None: not
/// satisfiable.
pub fn span(range: Option<(u64, Option<u64>)>, size: u64) -> Option<(u64, u64)> {
    match range {
        None => Some((0, size)),
        Some((first, _)) if first >= size => None,
        Some((first, last)) => Some((first, last.map_or(size, |l| l.saturating_add(1).min(size)))),
    }
}

fn range_past_the_end() -> Response<Body_> {
    oci_error(
        StatusCode::RANGE_NOT_SATISFIABLE,
        "RANGE_INVALID",
        "the range starts past the end of the blob",
    )
}

fn stream_cached(
    m: &Arc<Mirror>,
    hex: &str,
    b: Blob,
    range: Option<(u64, Option<u64>)>,
    to_peer: bool,
) -> Response<Body_> {
    let Some((first, end)) = span(range, b.size) else {
        return range_past_the_end();
    };
    let (tx, rx) = mpsc::channel(4);
    let store = m.store.clone();
    let counters = m.counters.clone();
    tokio::task::spawn_blocking(move || {
        let Ok(_hold) = store.hold(b.ino) else {
            let _ = tx.blocking_send(Err(io::Error::other("the blob went away")));
            return;
        };
        let mut off = first;
        while off < end {
            let n = ((end - off) as usize).min(CHUNK);
            match store.read(b.ino, off, n) {
                Ok(d) if d.len() == n => {
                    off += n as u64;
                    if to_peer {
                        counters
                            .bytes_to_peers
                            .fetch_add(n as u64, Ordering::Relaxed);
                    }
                    if tx.blocking_send(Ok(Bytes::from(d))).is_err() {
                        return;
                    }
                }
                _ => {
                    let _ = tx.blocking_send(Err(io::Error::other("reading the cached blob")));
                    return;
                }
            }
        }
    });
    let mut r = Response::new(BoxBody::new(ChannelBody { rx }));
    if range.is_some() {
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {first}-{}/{}", end - 1, b.size)) {
            r.headers_mut().insert("content-range", v);
        }
    }
    blob_headers(&mut r, hex, Some(end - first));
    r
}

/// The download of `hex` under way, or a new one.
fn join_or_start(
    m: &Arc<Mirror>,
    name: &str,
    hex: &str,
    ns: Option<&str>,
    from_peer: bool,
) -> Result<Arc<Download>, (StatusCode, &'static str, String)> {
    let mut downloads = m.downloads.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(d) = downloads.get(hex) {
        return Ok(d.clone());
    }
    let sources = m.sources(hex, ns, from_peer);
    if sources.is_empty() {
        return Err((
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            "not cached here, and no upstream is configured for this registry".into(),
        ));
    }
    let partial = match m.store.begin() {
        Ok(p) => p,
        Err(e) => {
            return Err((
                StatusCode::INSUFFICIENT_STORAGE,
                "UNAVAILABLE",
                format!("the blob cache: {e}"),
            ))
        }
    };
    let (progress, _) = watch::channel(Progress::default());
    let d = Arc::new(Download {
        progress,
        ino: partial.ino,
    });
    downloads.insert(hex.to_string(), d.clone());
    drop(downloads);
    let task = (m.clone(), d.clone(), hex.to_string(), name.to_string());
    let ns = ns.map(str::to_string);
    tokio::spawn(async move {
        let (m, d, hex, name) = task;
        let result = download(&m, &d, partial, &hex, &name, ns.as_deref(), sources).await;
        if let Err(e) = &result {
            log::warn!("mirror: sha256:{hex}: {e}");
        }
        m.downloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&hex);
        d.progress.send_modify(|p| p.done = Some(result));
    });
    Ok(d)
}

/// Fetches `hex` into `partial` from the sources in turn (a source cut
/// short is followed by the next from where it stopped); the blob once it
/// hashed to its digest.
async fn download(
    m: &Arc<Mirror>,
    d: &Download,
    partial: Partial,
    hex: &str,
    name: &str,
    ns: Option<&str>,
    sources: Vec<Source>,
) -> Result<Blob, String> {
    let path = format!("/v2/{name}/blobs/sha256:{hex}");
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut why = String::from("no source");
    for source in sources {
        let url = m.url(&source, &path, ns);
        let mut headers = Vec::new();
        if written > 0 {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes={written}-")) {
                headers.push((RANGE, v));
            }
        }
        let r = match m.fetch(&source, &url, Method::GET, &headers).await {
            Ok(r) => r,
            Err(e) => {
                fail_source(m, &source, &e);
                why = e;
                continue;
            }
        };
        // What of the body to skip: a server that ignored the range sends
        // the blob from its start.
        let mut skip = match (r.status(), written) {
            (StatusCode::OK, w) => w,
            (StatusCode::PARTIAL_CONTENT, w) if w > 0 => 0,
            (status, _) => {
                why = format!("{url} answered {status}");
                if status == StatusCode::NOT_FOUND && matches!(source, Source::Upstream(_)) {
                    break;
                }
                fail_source(m, &source, &why);
                continue;
            }
        };
        let length = r
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(n) = length {
            let size = if r.status() == StatusCode::PARTIAL_CONTENT {
                n + written
            } else {
                n
            };
            d.progress.send_modify(|p| p.size = Some(size));
        }
        let timeout = m.timeout(&source);
        let mut body = r.into_body();
        // Bytes received and not yet written: written to the cache
        // WRITE_BATCH at a time (one engine write per batch, not per
        // frame), and whatever is left when the body ends or is cut.
        let mut pending: Vec<u8> = Vec::with_capacity(WRITE_BATCH);
        let cut = loop {
            let frame = match tokio::time::timeout(timeout, body.frame()).await {
                Err(_) => break Some(format!("{url}: no data for {timeout:?}")),
                Ok(None) => break None,
                Ok(Some(Err(e))) => break Some(format!("{url}: {e}")),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            if skip > 0 {
                let n = (skip as usize).min(data.len());
                skip -= n as u64;
                data = data.slice(n..);
            }
            if data.is_empty() {
                continue;
            }
            hasher.update(&data);
            pending.extend_from_slice(&data);
            if pending.len() >= WRITE_BATCH {
                let batch = std::mem::replace(&mut pending, Vec::with_capacity(WRITE_BATCH));
                if let Err(e) = write_batch(m, d, &partial, &source, &mut written, batch).await {
                    m.store.discard(partial);
                    return Err(e);
                }
            }
        };
        if !pending.is_empty() {
            if let Err(e) = write_batch(m, d, &partial, &source, &mut written, pending).await {
                m.store.discard(partial);
                return Err(e);
            }
        }
        if let Some(e) = cut {
            fail_source(m, &source, &e);
            why = e;
            continue;
        }
        let size = d.progress.borrow().size;
        if size.is_some_and(|s| s != written) {
            why = format!("{url} sent {written} of {} bytes", size.unwrap_or(0));
            fail_source(m, &source, &why);
            continue;
        }
        let got = lcfs_engine::digest::hex(&hasher.clone().finalize());
        if got != hex {
            m.counters.digest_mismatches.fetch_add(1, Ordering::Relaxed);
            fail_source(m, &source, "bytes that do not hash to the digest asked for");
            m.store.discard(partial);
            return Err(format!("{url} sent bytes that hash to sha256:{got}"));
        }
        match source {
            Source::Peer(_) => &m.counters.blobs_from_peers,
            Source::Upstream(_) => &m.counters.blobs_from_upstream,
        }
        .fetch_add(1, Ordering::Relaxed);
        return m
            .store
            .commit(partial, hex, written)
            .map_err(|e| format!("caching the blob: {e}"));
    }
    m.store.discard(partial);
    Err(why)
}

/// Writes `batch` into the partial file at `written`; counts it and tells
/// the requests following the download.
async fn write_batch(
    m: &Arc<Mirror>,
    d: &Download,
    partial: &Partial,
    source: &Source,
    written: &mut u64,
    batch: Vec<u8>,
) -> Result<(), String> {
    let store = m.store.clone();
    let (ino, at, len) = (partial.ino, *written, batch.len() as u64);
    let wrote = tokio::task::spawn_blocking(move || store.write(ino, at, &batch)).await;
    if !matches!(wrote, Ok(Ok(()))) {
        return Err("writing to the blob cache failed".into());
    }
    *written += len;
    m.counters
        .received_from(source)
        .fetch_add(len, Ordering::Relaxed);
    d.progress.send_modify(|p| p.written = *written);
    Ok(())
}

/// Streams a download to a client as its bytes land, holding the last byte
/// back until the blob hashed to its digest.
async fn stream_download(
    m: &Arc<Mirror>,
    hex: &str,
    d: Arc<Download>,
    range: Option<(u64, Option<u64>)>,
    to_peer: bool,
) -> Response<Body_> {
    let mut rx = d.progress.subscribe();
    // Answer once the size is known (or the download ended).
    let size = loop {
        let p = rx.borrow_and_update().clone();
        match (&p.done, p.size) {
            (Some(Ok(b)), _) => break b.size,
            (Some(Err(e)), _) => {
                return oci_error(StatusCode::BAD_GATEWAY, "UNAVAILABLE", e);
            }
            (None, Some(s)) => break s,
            (None, None) => {}
        }
        if rx.changed().await.is_err() {
            return oci_error(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                "the download stopped",
            );
        }
    };
    let Some((first, end)) = span(range, size) else {
        return range_past_the_end();
    };
    let (tx, body) = mpsc::channel(4);
    let store = m.store.clone();
    let counters = m.counters.clone();
    let ino = d.ino;
    tokio::spawn(async move {
        let hold = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.hold(ino)).await
        };
        let Ok(Ok(_hold)) = hold else {
            let _ = tx.send(Err(io::Error::other("the blob went away"))).await;
            return;
        };
        let mut sent = first;
        loop {
            let p = rx.borrow_and_update().clone();
            let ready = match &p.done {
                Some(Ok(_)) => end,
                Some(Err(e)) => {
                    let _ = tx.send(Err(io::Error::other(e.clone()))).await;
                    return;
                }
                // The last byte waits for the digest.
                None => p.written.min(size.saturating_sub(1)).min(end),
            };
            if sent < ready {
                let n = ((ready - sent) as usize).min(CHUNK);
                let store = store.clone();
                let at = sent;
                let read = tokio::task::spawn_blocking(move || store.read(ino, at, n)).await;
                match read {
                    Ok(Ok(data)) if data.len() == n => {
                        sent += n as u64;
                        if to_peer {
                            counters
                                .bytes_to_peers
                                .fetch_add(n as u64, Ordering::Relaxed);
                        }
                        if tx.send(Ok(Bytes::from(data))).await.is_err() {
                            return;
                        }
                    }
                    _ => {
                        let _ = tx.send(Err(io::Error::other("reading the blob"))).await;
                        return;
                    }
                }
                continue;
            }
            if sent >= end {
                return;
            }
            if rx.changed().await.is_err() && rx.borrow().done.is_none() {
                let _ = tx.send(Err(io::Error::other("the download stopped"))).await;
                return;
            }
        }
    });
    let mut r = Response::new(BoxBody::new(ChannelBody { rx: body }));
    if range.is_some() {
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {first}-{}/{size}", end - 1)) {
            r.headers_mut().insert("content-range", v);
        }
    }
    blob_headers(&mut r, hex, Some(end - first));
    r
}

/// A response body fed by a channel; an error cuts the connection.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_bad_input() {
        let hex = "a".repeat(64);
        assert_eq!(route("/v2/"), Ok(Route::Base));
        assert_eq!(
            route(&format!("/v2/library/busybox/blobs/sha256:{hex}")),
            Ok(Route::Blob {
                name: "library/busybox".into(),
                hex: hex.clone()
            })
        );
        assert_eq!(
            route("/v2/e2e/multilayer/manifests/1"),
            Ok(Route::Manifest {
                name: "e2e/multilayer".into(),
                reference: "1".into()
            })
        );
        for bad in [
            "/v2/../etc/blobs/sha256:x",
            "/v2/UPPER/blobs/sha256:aa",
            "/v2/a/blobs/sha256:ABC",
            "/v2/a/blobs/md5:00",
            "/v2/a//b/manifests/x",
            "/v2/a/manifests/-bad",
            "/v2/a/tags/list",
            "/etc/passwd",
        ] {
            assert!(route(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_range("bytes=10-"), Some((10, None)));
        assert_eq!(parse_range("bytes=0-99"), Some((0, Some(99))));
        for bad in [
            "bytes=9-1",
            "bytes=-5",
            "bytes=1-2,4-5",
            "items=1-2",
            "bytes=x-",
        ] {
            assert_eq!(parse_range(bad), None, "{bad}");
        }
        assert_eq!(span(Some((10, None)), 5), None);
        assert_eq!(span(Some((1, Some(100))), 5), Some((1, 5)));
        // Found by the fuzz target: the last byte u64::MAX.
        assert_eq!(span(Some((0, Some(u64::MAX))), 5), Some((0, 5)));
        assert_eq!(query_ns(Some("a=b&ns=reg:5000")), Some("reg:5000".into()));
        assert_eq!(
            query_ns(Some("ns=127.0.0.1%3A41483")),
            Some("127.0.0.1:41483".into())
        );
        assert_eq!(query_ns(Some("ns=%zz")), None);
        assert_eq!(query_ns(Some("ns=%4")), None);
    }

    #[test]
    fn every_host_finds_the_same_home_and_homes_spread() {
        let peers: Vec<String> = (1..=4).map(|i| format!("10.0.0.{i}:5050")).collect();
        let mut homes = BTreeMap::<String, usize>::new();
        for i in 0..400u32 {
            let hex = format!("{:064x}", i);
            let home = peers.iter().max_by_key(|p| score(p, &hex)).unwrap();
            *homes.entry(home.clone()).or_default() += 1;
        }
        assert_eq!(homes.len(), 4);
        assert!(
            homes.values().all(|&n| (60..=140).contains(&n)),
            "{homes:?}"
        );
    }
}
