//! The statistics API over HTTP (docs/statistics.md, "HTTP API"): JSON at
//! `/v1/layers` and `/v1/layers/<name>` (the control protocol's layer
//! objects, sorted as `lcfs top layers` sorts), and Prometheus metrics at
//! `/metrics` (OpenMetrics text, by the prometheus-client crate).
//!
//! Who may ask: on the unix socket (always served), root only: the socket
//! is 0600 in a 0700 directory, as the control socket is. On TCP (only when
//! configured), anyone who can reach the address and sends `Authorization:
//! Bearer <token>` with the token read at start from a file that must be
//! root's and unreadable by others; anything else is answered 401.
//!
//! What a client may send is bounded: GET and HEAD only, a request head
//! must arrive within [`HEAD_TIMEOUT`], a target is at most
//! [`MAX_TARGET_BYTES`], at most [`MAX_CONNECTIONS`] connections are served
//! at once (more are closed at accept), and `/metrics` carries per-layer
//! series for the `top_layers` most cloned layers only, whatever the number
//! of layers. Errors are JSON: `{"error": {"status": 404, "message": ...}}`.

use crate::client::{rank, sort_top, TopSort};
use crate::images::Catalog;
use crate::protocol::Layer;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use lcfs_engine::Engine;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// The longest request target (path and query) accepted.
pub const MAX_TARGET_BYTES: usize = 4096;
/// How long a request head may take to arrive (and a kept-alive connection
/// may stay silent before its next one).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The most rows `/v1/layers?limit=` returns.
pub const MAX_LIMIT: usize = 100_000;
/// The longest token accepted in a token file.
const MAX_TOKEN_BYTES: u64 = 4096;

/// Where and how the API is served.
#[derive(Clone, Debug)]
pub struct RestOptions {
    /// The unix socket (root-only).
    pub socket: PathBuf,
    /// A TCP address as well, for Prometheus and other hosts; needs `token_file`.
    pub listen: Option<SocketAddr>,
    /// A root-only file holding the bearer token TCP clients must send.
    pub token_file: Option<PathBuf>,
    /// Layers given per-layer series in `/metrics` (the most cloned).
    pub top_layers: usize,
    /// Images given per-image series in `/metrics` (the most started).
    pub top_images: usize,
}

/// The running API; [`RestServer::shutdown`] stops it.
pub struct RestServer {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
    /// The TCP address actually bound (port 0 picks one).
    pub tcp_address: Option<SocketAddr>,
}

impl RestServer {
    pub fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct State {
    engine: Arc<Engine>,
    mountpoint: PathBuf,
    catalog: Arc<Catalog>,
    top_layers: usize,
    top_images: usize,
}

/// Reads a file holding a secret (a token, a password, registry
/// credentials): it must be a regular file owned by root (or the daemon's
/// user) that neither group nor others may read or write, of at most 1 MiB.
pub fn read_secret_file(path: &Path, what: &str) -> io::Result<String> {
    read_owned_text(path, 0o077, 1 << 20, |meta| {
        use std::os::unix::fs::MetadataExt;
        format!(
            "the {what} must be a regular file of root's with mode 0600 or 0400 (it is {:o}, uid {})",
            meta.mode() & 0o7777,
            meta.uid()
        )
    })
}

/// The UTF-8 text of `path`, of at most `max` bytes, if it is a regular
/// file owned by root (or the daemon's user) with none of the `forbidden`
/// mode bits set; else PermissionDenied with `refused`'s words (given the
/// file's metadata) after the path. The checks are made on the opened file.
pub fn read_owned_text(
    path: &Path,
    forbidden: u32,
    max: u64,
    refused: impl FnOnce(&std::fs::Metadata) -> String,
) -> io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let context = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(context)?;
    let meta = file.metadata().map_err(context)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.is_file() || (meta.uid() != 0 && meta.uid() != me) || meta.mode() & forbidden != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{}: {}", path.display(), refused(&meta)),
        ));
    }
    String::from_utf8(read_at_most(file, path, max)?).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not UTF-8 text", path.display()),
        )
    })
}

/// The content of `file` (opened from `path`), refused past `max` bytes.
pub fn read_at_most(file: std::fs::File, path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    if out.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: larger than {max} bytes", path.display()),
        ));
    }
    Ok(out)
}

/// A one-line secret (a password) from a file [`read_secret_file`] accepts.
pub fn read_secret(path: &Path, what: &str) -> io::Result<String> {
    let text = read_secret_file(path, what)?;
    let line = text.strip_suffix('\n').unwrap_or(&text);
    if line.is_empty() || line.len() as u64 > MAX_TOKEN_BYTES || line.chars().any(char::is_control)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: the secret must be one line of 1 to {MAX_TOKEN_BYTES} characters",
                path.display()
            ),
        ));
    }
    Ok(line.to_string())
}

/// Reads the bearer token (a file [`read_secret_file`] accepts).
pub fn read_token(path: &Path) -> io::Result<String> {
    let token = read_secret_file(path, "token file")?.trim().to_string();
    if token.len() as u64 > MAX_TOKEN_BYTES
        || token.len() < 16
        || token.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: the token must be one line of 16 to {MAX_TOKEN_BYTES} printable characters without spaces",
                path.display()
            ),
        ));
    }
    Ok(token)
}

/// Binds the unix socket (and the TCP address, if any) and serves them on a
/// thread of their own.
pub fn serve(catalog: Arc<Catalog>, options: &RestOptions) -> io::Result<RestServer> {
    let token = match (&options.listen, &options.token_file) {
        (Some(_), Some(file)) => Some(read_token(file)?),
        (Some(_), None) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "serving statistics on TCP needs a token file (--stats-token-file)",
            ))
        }
        (None, _) => None,
    };
    lcfs_fsfront::claim_socket_path(&options.socket)
        .map_err(|e| io::Error::other(format!("{}: {e}", options.socket.display())))?;
    let unix = lcfs_fsfront::bind_private_socket(&options.socket)?;
    unix.set_nonblocking(true)?;
    let tcp = match options.listen {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    let tcp_address = tcp.as_ref().map(|l| l.local_addr()).transpose()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(4)
        .thread_name("lcfs-stats")
        .enable_all()
        .build()?;
    let state = Arc::new(State {
        engine: catalog.engine.clone(),
        mountpoint: catalog.mountpoint.clone(),
        catalog,
        top_layers: options.top_layers,
        top_images: options.top_images,
    });
    let (stop, stopped) = watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("lcfs-stats".into())
        .spawn(move || {
            runtime.block_on(async move {
                let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
                let unix = tokio::net::UnixListener::from_std(unix).expect("in a runtime");
                let mut tasks = vec![tokio::spawn(accept_loop(
                    unix,
                    "socket",
                    state.clone(),
                    slots.clone(),
                    stopped.clone(),
                    None,
                ))];
                if let Some(tcp) = tcp {
                    let tcp = tokio::net::TcpListener::from_std(tcp).expect("in a runtime");
                    let token: Arc<str> = token.expect("checked above").into();
                    tasks.push(tokio::spawn(accept_loop(
                        tcp,
                        "address",
                        state,
                        slots,
                        stopped.clone(),
                        Some(token),
                    )));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(2));
        })?;
    Ok(RestServer {
        stop,
        thread: Some(thread),
        tcp_address,
    })
}

/// A listener the accept loop takes connections from.
trait Accept: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn next(&self) -> impl std::future::Future<Output = io::Result<Self::Stream>> + Send;
}

impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Takes connections until told to stop; `token`: the bearer token each
/// request must carry (TCP), or none (the root-only socket).
async fn accept_loop<L: Accept>(
    listener: L,
    what: &'static str,
    state: Arc<State>,
    slots: Arc<Semaphore>,
    mut stopped: watch::Receiver<bool>,
    token: Option<Arc<str>>,
) {
    loop {
        let stream = tokio::select! {
            _ = stopped.changed() => return,
            r = listener.next() => match r {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("statistics {what}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        connection(stream, state.clone(), &slots, token.clone());
    }
}

/// Serves one connection, if a slot is free (else closes it at once).
fn connection<S>(stream: S, state: Arc<State>, slots: &Arc<Semaphore>, token: Option<Arc<str>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Ok(slot) = slots.clone().try_acquire_owned() else {
        return; // dropping the stream closes it
    };
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            let token = token.clone();
            async move { Ok::<_, std::convert::Infallible>(answer(state, token.as_deref(), req).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .max_buf_size(16 << 10)
            .serve_connection(TokioIo::new(stream), service)
            .await;
        drop(slot);
    });
}

type Answer = Response<Full<Bytes>>;

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    let body = json!({"error": {"status": status.as_u16(), "message": message.into()}});
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn ok(content_type: &'static str, body: String) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn answer(state: Arc<State>, token: Option<&str>, req: Request<Incoming>) -> Answer {
    if let Some(token) = token {
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        if !given.is_some_and(|g| lcfs_engine::digest::same_secret(g, token.as_bytes())) {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "a bearer token is required (Authorization: Bearer <token>)",
            );
            r.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} is not served; use GET", req.method()),
        );
    }
    let target = req.uri().to_string();
    if target.len() > MAX_TARGET_BYTES {
        return error(
            StatusCode::URI_TOO_LONG,
            format!("request target over {MAX_TARGET_BYTES} bytes"),
        );
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let result = tokio::task::spawn_blocking(move || route(&state, &path, &query)).await;
    match result {
        Ok(answer) => answer,
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the request failed: {e}"),
        ),
    }
}

fn route(state: &State, path: &str, query: &str) -> Answer {
    match path {
        "/metrics" => {
            if !query.is_empty() {
                return error(StatusCode::BAD_REQUEST, "/metrics takes no query");
            }
            match metrics(state) {
                Ok(text) => ok(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        "/v1/images" => match parse_layers_query(query) {
            Ok((sort, limit)) => {
                let mut images = state.catalog.images(sort);
                images.truncate(limit);
                json_ok(&images)
            }
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        "/v1/lazy" => {
            if !query.is_empty() {
                return error(StatusCode::BAD_REQUEST, "/v1/lazy takes no query");
            }
            json_ok(&state.catalog.lazy_layers())
        }
        "/v1/files" => match parse_files_query(query) {
            Ok((image, limit)) => match state.catalog.files(image.as_deref()) {
                Ok(mut rows) => {
                    rows.truncate(limit);
                    json_ok(&rows)
                }
                Err(e) => error(StatusCode::NOT_FOUND, e),
            },
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        "/v1/layers" => match parse_layers_query(query) {
            Ok((sort, limit)) => {
                let mut layers = layers(state);
                sort_top(&mut layers, sort);
                layers.truncate(limit);
                ok(
                    "application/json",
                    serde_json::to_string(&layers).expect("serializable"),
                )
            }
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        _ => match path.strip_prefix("/v1/layers/") {
            Some(name) if !name.is_empty() && !name.contains('/') => {
                if !query.is_empty() {
                    return error(StatusCode::BAD_REQUEST, "a layer takes no query");
                }
                let name = match percent_decode(name) {
                    Ok(n) => n,
                    Err(e) => return error(StatusCode::BAD_REQUEST, e),
                };
                match state.engine.layer_info(&name) {
                    Ok(info) => ok(
                        "application/json",
                        serde_json::to_string(&Layer::from_info(&info, &state.mountpoint))
                            .expect("serializable"),
                    ),
                    Err(_) => error(StatusCode::NOT_FOUND, format!("no layer {name:?}")),
                }
            }
            _ => error(
                StatusCode::NOT_FOUND,
                format!(
                    "no such resource {path:?}: see /v1/images, /v1/files, /v1/layers, \
                     /v1/layers/<name>, /metrics"
                ),
            ),
        },
    }
}

fn layers(state: &State) -> Vec<Layer> {
    state.catalog.layers()
}

fn json_ok<T: serde::Serialize>(value: &T) -> Answer {
    ok(
        "application/json",
        serde_json::to_string(value).expect("serializable"),
    )
}

/// `limit=N`: 1 to [`MAX_LIMIT`].
fn parse_limit(value: &str) -> Result<usize, String> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_LIMIT).contains(n))
        .ok_or_else(|| format!("limit={value:?}: expected 1 to {MAX_LIMIT}"))
}

/// `sort=starts|clones|last-start|reads|size|pull-time|startup-time|created`
/// and `limit=N`, each at most once.
pub fn parse_layers_query(query: &str) -> Result<(TopSort, usize), String> {
    let (mut sort, mut limit) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sort" if sort.is_none() => {
                sort = Some(match value {
                    "starts" | "clones" => TopSort::Clones,
                    "last-start" => TopSort::LastStart,
                    "reads" => TopSort::Reads,
                    "size" => TopSort::Size,
                    "pull-time" => TopSort::PullTime,
                    "startup-time" => TopSort::StartupTime,
                    "created" => TopSort::Created,
                    _ => {
                        return Err(format!(
                            "sort={value:?}: expected starts, last-start, reads, size, \
                             pull-time, startup-time or created"
                        ))
                    }
                })
            }
            "limit" if limit.is_none() => limit = Some(parse_limit(value)?),
            "sort" | "limit" => return Err(format!("{key} given twice")),
            _ => return Err(format!("unknown parameter {key:?} (sort, limit)")),
        }
    }
    Ok((sort.unwrap_or(TopSort::Clones), limit.unwrap_or(100)))
}

/// `image=NAME` (percent-encoded) and `limit=N`, each at most once.
pub fn parse_files_query(query: &str) -> Result<(Option<String>, usize), String> {
    let (mut image, mut limit) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "image" if image.is_none() && !value.is_empty() => image = Some(percent_decode(value)?),
            "limit" if limit.is_none() => limit = Some(parse_limit(value)?),
            "image" if image.is_none() => return Err("image= names no image".into()),
            "image" | "limit" => return Err(format!("{key} given twice")),
            _ => return Err(format!("unknown parameter {key:?} (image, limit)")),
        }
    }
    Ok((image, limit.unwrap_or(100)))
}

/// Decodes %XX escapes; refuses malformed ones and non-UTF-8 results.
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad %-escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

type LayerLabels = Vec<(String, String)>;

/// The metrics, as OpenMetrics text.
fn metrics(state: &State) -> Result<String, String> {
    let stats = state.engine.stats();
    let mut registry = Registry::with_prefix("lcfs");
    let counter = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let c: Counter = Counter::default();
        c.inc_by(value);
        registry.register(name, help, c);
    };
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        let g: Gauge = Gauge::default();
        g.set(value.min(i64::MAX as u64) as i64);
        registry.register(name, help, g);
    };
    let d = &stats.device;
    counter(
        &mut registry,
        "device_reads",
        "Reads from the device",
        d.reads,
    );
    counter(
        &mut registry,
        "device_read_bytes",
        "Bytes read from the device",
        d.read_bytes,
    );
    counter(
        &mut registry,
        "device_writes",
        "Writes to the device",
        d.writes,
    );
    counter(
        &mut registry,
        "device_write_bytes",
        "Bytes written to the device",
        d.write_bytes,
    );
    counter(
        &mut registry,
        "device_flushes",
        "Device cache flushes",
        d.flushes,
    );
    let e = &stats.engine;
    counter(
        &mut registry,
        "user_write_bytes",
        "Bytes accepted by write calls",
        e.user_write_bytes,
    );
    counter(
        &mut registry,
        "checkpoints",
        "Checkpoints written",
        e.checkpoints,
    );
    counter(
        &mut registry,
        "segments_cleaned",
        "Log segments the cleaner freed",
        e.segments_cleaned,
    );
    counter(
        &mut registry,
        "fsync_records",
        "Fsyncs made durable by the fsync log",
        e.fsync_records,
    );
    counter(
        &mut registry,
        "node_cache_hits",
        "Metadata node cache hits",
        stats.node_cache_hits,
    );
    counter(
        &mut registry,
        "node_cache_misses",
        "Metadata node cache misses",
        stats.node_cache_misses,
    );
    counter(
        &mut registry,
        "block_cache_hits",
        "Data block cache hits",
        stats.block_cache_hits,
    );
    counter(
        &mut registry,
        "block_cache_misses",
        "Data block cache misses",
        stats.block_cache_misses,
    );
    gauge(
        &mut registry,
        "layers",
        "Layers on the device",
        stats.layers as u64,
    );
    if let Some(m) = &state.catalog.mirror {
        for (name, value) in m.values() {
            let help = format!(
                "Registry mirror (docs/mirror.md): {}",
                name.replace('_', " ")
            );
            counter(&mut registry, &format!("mirror_{name}"), &help, value);
        }
    }
    gauge(
        &mut registry,
        "removals_pending",
        "Removed layers whose space is still being freed",
        stats.removals_pending as u64,
    );
    counter(
        &mut registry,
        "verified_blocks",
        "4 KiB blocks of reads checked against a layer's seal",
        stats.verified_blocks,
    );
    counter(
        &mut registry,
        "verify_failures",
        "Reads refused (EIO) because they differed from a layer's seal",
        stats.verify_failures,
    );
    gauge(
        &mut registry,
        "live_bytes",
        "Bytes of live data and metadata",
        stats.live_bytes,
    );
    gauge(
        &mut registry,
        "capacity_bytes",
        "Usable bytes of the device",
        stats.capacity_bytes,
    );
    gauge(
        &mut registry,
        "read_only",
        "1 when the engine stopped writing (see lcfs stats)",
        stats.read_only_reason.is_some() as u64,
    );

    // Per-layer series, for the most cloned layers only: bounded
    // cardinality whatever the number of layers.
    // Each with its last clone's time, read off the same listing.
    let mut layers: Vec<(Layer, i64)> = state
        .engine
        .list_layers()
        .iter()
        .map(|info| {
            (
                Layer::from_info(info, &state.mountpoint),
                info.usage.last_clone.seconds,
            )
        })
        .collect();
    layers.sort_by(|a, b| rank(TopSort::Clones, &(&a.0).into(), &(&b.0).into()));
    layers.truncate(state.top_layers);
    let clones = Family::<LayerLabels, Counter>::default();
    let last = Family::<LayerLabels, Gauge>::default();
    let read = Family::<LayerLabels, Counter>::default();
    let owned = Family::<LayerLabels, Gauge>::default();
    let starts = Family::<LayerLabels, Counter>::default();
    let startup = Family::<LayerLabels, Counter<f64, AtomicU64>>::default();
    let applied = Family::<LayerLabels, Gauge>::default();
    let apply = Family::<LayerLabels, Gauge<f64, AtomicU64>>::default();
    for (l, last_seconds) in &layers {
        let labels = vec![
            ("layer".to_string(), l.name.clone()),
            ("parent".to_string(), l.parent.clone().unwrap_or_default()),
        ];
        clones.get_or_create(&labels).inc_by(l.usage.clones);
        last.get_or_create(&labels).set(*last_seconds);
        read.get_or_create(&labels)
            .inc_by(l.usage.bytes_read.saturating_add(l.usage.clone_bytes_read));
        owned
            .get_or_create(&labels)
            .set(l.owned_bytes.min(i64::MAX as u64) as i64);
        starts.get_or_create(&labels).inc_by(l.usage.clone_starts);
        startup
            .get_or_create(&labels)
            .inc_by(l.usage.clone_startup_seconds);
        if l.usage.applied_bytes > 0 {
            applied
                .get_or_create(&labels)
                .set(l.usage.applied_bytes.min(i64::MAX as u64) as i64);
            apply.get_or_create(&labels).set(l.usage.apply_seconds);
        }
    }
    registry.register(
        "layer_clones",
        "Layers cloned from this one (containers started from it), for the most cloned layers",
        clones,
    );
    registry.register(
        "layer_last_clone_timestamp_seconds",
        "When this layer was last cloned (0: never)",
        last,
    );
    registry.register(
        "layer_read_bytes",
        "Bytes read through this layer and its removed clones",
        read,
    );
    registry.register("layer_owned_bytes", "Bytes this layer alone owns", owned);
    registry.register(
        "layer_clone_starts",
        "Removed clones of this layer that read anything (started containers)",
        starts,
    );
    registry.register(
        "layer_clone_startup_seconds",
        "Sum over those clones of the time from creation to first read; divide by layer_clone_starts for the mean",
        startup,
    );
    registry.register(
        "layer_applied_bytes",
        "Uncompressed bytes applied into this layer when it was pulled",
        applied,
    );
    registry.register(
        "layer_apply_seconds",
        "How long applying this layer took when it was pulled",
        apply,
    );
    image_metrics(state, &mut registry);
    register_latency_histograms(&mut registry, &state.engine);
    let mut text = String::new();
    encode(&mut text, &registry).map_err(|e| format!("encoding the metrics: {e}"))?;
    Ok(text)
}

type ImageLabels = Vec<(String, String)>;

/// Per-image series, for the `top_images` most started images only.
fn image_metrics(state: &State, registry: &mut Registry) {
    let mut images = state.catalog.images(TopSort::Clones);
    images.truncate(state.top_images);
    let starts = Family::<ImageLabels, Counter>::default();
    let running = Family::<ImageLabels, Gauge>::default();
    let last = Family::<ImageLabels, Gauge>::default();
    let read = Family::<ImageLabels, Counter>::default();
    let size = Family::<ImageLabels, Gauge>::default();
    let pull = Family::<ImageLabels, Gauge<f64, AtomicU64>>::default();
    let startups = Family::<ImageLabels, Counter>::default();
    let startup = Family::<ImageLabels, Gauge<f64, AtomicU64>>::default();
    let early = Family::<ImageLabels, Counter>::default();
    let gauge = |n: u64| n.min(i64::MAX as u64) as i64;
    for i in &images {
        let labels = vec![
            ("image".to_string(), i.name.clone()),
            ("layer".to_string(), i.top_layer.clone()),
        ];
        starts.get_or_create(&labels).inc_by(i.starts);
        running.get_or_create(&labels).set(gauge(i.running));
        last.get_or_create(&labels).set(i.last_start_seconds);
        read.get_or_create(&labels).inc_by(i.bytes_read);
        size.get_or_create(&labels).set(gauge(i.size_bytes));
        pull.get_or_create(&labels).set(i.pull_seconds);
        startups.get_or_create(&labels).inc_by(i.startups);
        if let Some(m) = i.mean_startup_seconds {
            startup.get_or_create(&labels).set(m);
        }
        early.get_or_create(&labels).inc_by(i.startup_bytes);
    }
    registry.register(
        "image_starts",
        "Containers started from this image, ever (the most started images)",
        starts,
    );
    registry.register(
        "image_running",
        "Containers of this image in use now",
        running,
    );
    registry.register(
        "image_last_start_timestamp_seconds",
        "When a container of this image last started (0: never)",
        last,
    );
    registry.register(
        "image_read_bytes",
        "Bytes this image's containers read",
        read,
    );
    registry.register("image_size_bytes", "Bytes this image's layers own", size);
    registry.register(
        "image_pull_seconds",
        "How long applying this image's layers took",
        pull,
    );
    registry.register(
        "image_startups",
        "Containers of this image whose start-up (creation to first read) was measured",
        startups,
    );
    registry.register(
        "image_startup_mean_seconds",
        "Mean time from a container's creation to its first read",
        startup,
    );
    registry.register(
        "image_startup_read_bytes",
        "Bytes this image's containers read in their first 10 seconds",
        early,
    );
}

/// The latency histograms (docs/statistics.md, "Latency histograms"): the
/// engine's device requests, pulls and start-ups, and this process's FUSE
/// requests per operation, each encoded from a snapshot of its buckets.
fn register_latency_histograms(registry: &mut Registry, engine: &Engine) {
    use lcfs_engine::HistogramSnapshot;
    use lcfs_fsfront::{operation_latencies, Operation};
    use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
    use prometheus_client::metrics::MetricType;

    /// Histograms already counted, one per label set (an unlabelled
    /// histogram has one, with no labels).
    #[derive(Debug)]
    struct Snapshots(Vec<(Vec<(&'static str, &'static str)>, HistogramSnapshot)>);

    impl EncodeMetric for Snapshots {
        fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
            for (labels, s) in &self.0 {
                let buckets: Vec<(f64, u64)> = s
                    .bounds_seconds
                    .iter()
                    .copied()
                    .zip(s.counts.iter().copied())
                    .collect();
                if labels.is_empty() {
                    encoder.encode_histogram::<NoLabelSet>(
                        s.sum_seconds,
                        s.count,
                        &buckets,
                        None,
                    )?;
                } else {
                    encoder
                        .encode_family(labels)?
                        .encode_histogram::<NoLabelSet>(s.sum_seconds, s.count, &buckets, None)?;
                }
            }
            Ok(())
        }

        fn metric_type(&self) -> MetricType {
            MetricType::Histogram
        }
    }

    let l = engine.latencies();
    for (name, help, histogram) in [
        (
            "device_read_seconds",
            "Device read requests, from the engine's call to their completion (a batch counts once)",
            &l.device_read,
        ),
        (
            "device_write_seconds",
            "Device write requests, from the engine's call to their completion (a batch counts once)",
            &l.device_write,
        ),
        (
            "device_flush_seconds",
            "Device cache flushes",
            &l.device_flush,
        ),
        (
            "pull_seconds",
            "Applying one pulled image layer",
            &l.apply,
        ),
        (
            "startup_seconds",
            "From a layer's creation to its first read (a container's start-up)",
            &l.startup,
        ),
    ] {
        registry.register(name, help, Snapshots(vec![(vec![], histogram.snapshot())]));
    }
    let operations = Operation::ALL
        .iter()
        .map(|&op| {
            let snapshot = operation_latencies().get(op).snapshot();
            (vec![("op", op.name())], snapshot)
        })
        .collect();
    registry.register(
        "fuse_op_seconds",
        "FUSE requests by operation, from the handler's entry to its reply",
        Snapshots(operations),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_queries_parse_or_say_why_not() {
        assert_eq!(parse_layers_query("").unwrap(), (TopSort::Clones, 100));
        assert_eq!(
            parse_layers_query("sort=reads&limit=3").unwrap(),
            (TopSort::Reads, 3)
        );
        for bad in [
            "sort=popular",
            "limit=0",
            "limit=-1",
            "limit=100001",
            "limit=ten",
            "sort=reads&sort=size",
            "colour=blue",
        ] {
            assert!(parse_layers_query(bad).is_err(), "{bad}");
        }
        assert_eq!(percent_decode("a%20b").unwrap(), "a b");
        assert!(percent_decode("a%2").is_err());
        assert!(percent_decode("%ff").is_err());
    }
}
