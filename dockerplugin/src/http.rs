//! HTTP/1.1 on a unix socket: every call is `POST /<Method>` (Docker's
//! plugin protocol). tiny_http parses requests (Content-Length and chunked
//! bodies, `Expect: 100-continue`); a fixed pool of workers answers them.
//! JSON bodies are read up to [`MAX_JSON_BYTES`]; ApplyDiff's tar body and
//! Diff's tar response are streamed, never held whole in memory.
//!
//! Every call is timed from the moment a worker takes the request until the
//! answer is written (for Diff, the whole tar stream; for ApplyDiff, the
//! whole upload), per method, in [`CallCounters`]: the storage work inside a
//! `docker run` or `docker build`, apart from what runc and dockerd spend.

use crate::driver::Driver;
use serde_json::{json, Value};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The largest JSON request accepted (Docker's are a few hundred bytes).
pub const MAX_JSON_BYTES: u64 = 1 << 20;
/// Tar bytes buffered between the Diff writer thread and the socket.
const PIPE_CHUNKS: usize = 8;
const PIPE_CHUNK_BYTES: usize = 256 << 10;
const CONTENT_TYPE_JSON: &str = "application/vnd.docker.plugins.v1+json";

/// A running plugin server. Dropping it without [`PluginServer::shutdown`]
/// leaves the workers running.
pub struct PluginServer {
    server: Arc<tiny_http::Server>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    socket: PathBuf,
    calls: Arc<CallCounters>,
}

impl PluginServer {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The per-method call counters of this server, live.
    pub fn calls(&self) -> Arc<CallCounters> {
        self.calls.clone()
    }

    /// Stops taking requests, waits for the workers to finish the calls in
    /// hand, and removes the socket.
    pub fn shutdown(self) {
        self.stop.store(true, Ordering::SeqCst);
        for _ in &self.workers {
            self.server.unblock();
        }
        for w in self.workers {
            let _ = w.join();
        }
        drop(self.server);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Serves `driver` on a unix socket at `socket` with `workers` threads
/// (calls beyond that wait their turn). A stale socket file nobody listens
/// on is replaced; a live one is refused.
pub fn serve(driver: Arc<Driver>, socket: &Path, workers: usize) -> io::Result<PluginServer> {
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use by another process; stop it or choose another socket",
                    socket.display()
                ),
            ));
        }
        std::fs::remove_file(socket)?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let server = tiny_http::Server::http_unix(socket).map_err(io::Error::other)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))?;
    }
    let server = Arc::new(server);
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(CallCounters::default());
    let mut handles = Vec::new();
    for i in 0..workers.max(1) {
        let server = server.clone();
        let stop = stop.clone();
        let driver = driver.clone();
        let calls = calls.clone();
        let handle = std::thread::Builder::new()
            .name(format!("lcfs-plugin-{i}"))
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match server.recv() {
                        Ok(request) => {
                            let started = calls.start();
                            let method = method_of(request.url());
                            handle(&driver, request);
                            let elapsed = calls.finish(&method, started);
                            log::debug!(
                                "docker plugin call {method} done in {} us",
                                elapsed.as_micros()
                            );
                        }
                        Err(e) => {
                            if !stop.load(Ordering::SeqCst) {
                                log::warn!("docker plugin socket: {e}");
                            }
                        }
                    }
                }
            })?;
        handles.push(handle);
    }
    log::info!(
        "docker graphdriver plugin listening on {}",
        socket.display()
    );
    Ok(PluginServer {
        server,
        stop,
        workers: handles,
        socket: socket.to_path_buf(),
        calls,
    })
}

/// The methods Docker 20.10's graphdriver proxy calls, each counted on its
/// own; anything else (unknown methods, wrong HTTP verbs) is counted as
/// [`OTHER_METHOD`], so what a client sends cannot grow the table.
pub const PLUGIN_METHODS: &[&str] = &[
    "Plugin.Activate",
    "GraphDriver.Init",
    "GraphDriver.Create",
    "GraphDriver.CreateReadWrite",
    "GraphDriver.Remove",
    "GraphDriver.Get",
    "GraphDriver.Put",
    "GraphDriver.Exists",
    "GraphDriver.Status",
    "GraphDriver.GetMetadata",
    "GraphDriver.Cleanup",
    "GraphDriver.Diff",
    "GraphDriver.Changes",
    "GraphDriver.ApplyDiff",
    "GraphDriver.DiffSize",
    "GraphDriver.Capabilities",
];
/// The name unknown methods are counted under.
pub const OTHER_METHOD: &str = "other";

/// Calls and time per plugin method since the server started. Time is wall
/// time per call; calls on different workers overlap, so the per-method sums
/// can exceed the elapsed time, while `busy` counts the time during which at
/// least one call was in hand.
#[derive(Default)]
pub struct CallCounters {
    state: Mutex<CallState>,
}

#[derive(Default)]
struct CallState {
    in_flight: u64,
    busy_since: Option<Instant>,
    busy: Duration,
    /// Indexed like PLUGIN_METHODS, plus one slot for OTHER_METHOD.
    methods: [MethodTimes; PLUGIN_METHODS.len() + 1],
}

#[derive(Clone, Copy, Default)]
struct MethodTimes {
    calls: u64,
    total: Duration,
    max: Duration,
}

/// A snapshot of [`CallCounters`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Calls finished.
    pub calls: u64,
    /// Calls taken but not answered yet.
    pub in_flight: u64,
    /// Time during which at least one call was in hand (finished or not).
    pub busy_us: u64,
    /// The sum of every finished call's time.
    pub total_us: u64,
    /// Methods called at least once, in [`PLUGIN_METHODS`] order, then
    /// [`OTHER_METHOD`].
    pub methods: Vec<MethodStats>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MethodStats {
    pub method: String,
    pub calls: u64,
    pub total_us: u64,
    pub max_us: u64,
}

impl CallCounters {
    /// A call was taken: from now on the plugin is busy.
    fn start(&self) -> Instant {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.in_flight == 0 {
            s.busy_since = Some(now);
        }
        s.in_flight += 1;
        now
    }

    /// The call taken at `started` was answered; returns its time.
    fn finish(&self, method: &str, started: Instant) -> Duration {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(started);
        let slot = PLUGIN_METHODS
            .iter()
            .position(|m| *m == method)
            .unwrap_or(PLUGIN_METHODS.len());
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let times = &mut s.methods[slot];
        times.calls += 1;
        times.total += elapsed;
        times.max = times.max.max(elapsed);
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 {
            if let Some(since) = s.busy_since.take() {
                s.busy += now.saturating_duration_since(since);
            }
        }
        elapsed
    }

    pub fn snapshot(&self) -> CallStats {
        let now = Instant::now();
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let running = s
            .busy_since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
        let names = PLUGIN_METHODS.iter().copied().chain([OTHER_METHOD]);
        let methods: Vec<MethodStats> = names
            .zip(s.methods.iter())
            .filter(|(_, t)| t.calls > 0)
            .map(|(name, t)| MethodStats {
                method: name.to_string(),
                calls: t.calls,
                total_us: micros(t.total),
                max_us: micros(t.max),
            })
            .collect();
        CallStats {
            calls: methods.iter().map(|m| m.calls).sum(),
            in_flight: s.in_flight,
            busy_us: micros(s.busy + running),
            total_us: methods.iter().map(|m| m.total_us).sum(),
            methods,
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The method a request URL names: `/GraphDriver.ApplyDiff?id=...` ->
/// `GraphDriver.ApplyDiff`.
fn method_of(url: &str) -> String {
    let path = url.split_once('?').map_or(url, |(path, _)| path);
    path.trim_start_matches('/').to_string()
}

fn json_response(value: &Value, status: u16) -> tiny_http::Response<io::Cursor<Vec<u8>>> {
    let header = tiny_http::Header::from_bytes("Content-Type", CONTENT_TYPE_JSON)
        .expect("static header is valid");
    tiny_http::Response::from_data(value.to_string().into_bytes())
        .with_status_code(status)
        .with_header(header)
}

fn respond<R: Read>(request: tiny_http::Request, response: tiny_http::Response<R>) {
    if let Err(e) = request.respond(response) {
        log::debug!("docker plugin: answering: {e}");
    }
}

fn handle(driver: &Arc<Driver>, mut request: tiny_http::Request) {
    let url = request.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let method = path.trim_start_matches('/').to_string();
    if *request.method() != tiny_http::Method::Post {
        let body = json!({ "Err": format!("{} {path}: plugin calls are POST", request.method()) });
        return respond(request, json_response(&body, 405));
    }
    log::debug!("docker plugin call {method}");
    match method.as_str() {
        "GraphDriver.ApplyDiff" => {
            let id = query_value(query, "id").unwrap_or_default();
            let parent = query_value(query, "parent").unwrap_or_default();
            let answer = driver.apply_diff(&id, &parent, request.as_reader());
            respond(request, json_response(&answer, 200));
        }
        "GraphDriver.Diff" => {
            let body = match read_json_body(&mut request) {
                Ok(b) => b,
                Err(e) => return respond(request, text_response(&e, 400)),
            };
            let plan = match driver.prepare_diff(&body) {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("GraphDriver.Diff: {e}");
                    return respond(request, text_response(&e.to_string(), 500));
                }
            };
            let (writer, reader) = pipe();
            let producer = driver.clone();
            let spawned = std::thread::Builder::new()
                .name("lcfs-plugin-diff".into())
                .spawn(move || {
                    let mut writer = writer;
                    if let Err(e) = producer.write_diff(&plan, &mut writer) {
                        log::warn!("GraphDriver.Diff: {e}");
                        writer.fail(e.to_string());
                    }
                });
            if let Err(e) = spawned {
                return respond(request, text_response(&e.to_string(), 500));
            }
            let header = tiny_http::Header::from_bytes("Content-Type", "application/x-tar")
                .expect("static header is valid");
            let response = tiny_http::Response::new(
                tiny_http::StatusCode(200),
                vec![header],
                reader,
                None,
                None,
            );
            respond(request, response);
        }
        _ => {
            let answer = match read_json_body(&mut request) {
                Ok(body) => driver.call(&method, &body),
                Err(e) => json!({ "Err": e }),
            };
            respond(request, json_response(&answer, 200));
        }
    }
}

fn text_response(message: &str, status: u16) -> tiny_http::Response<io::Cursor<Vec<u8>>> {
    tiny_http::Response::from_string(message).with_status_code(status)
}

fn read_json_body(request: &mut tiny_http::Request) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_JSON_BYTES + 1)
        .read_to_end(&mut body)
        .map_err(|e| format!("reading the request body: {e}"))?;
    if body.len() as u64 > MAX_JSON_BYTES {
        return Err(format!(
            "request body larger than {MAX_JSON_BYTES} bytes; plugin calls carry small JSON"
        ));
    }
    Ok(body)
}

/// The value of `key` in a query string, percent-decoded.
fn query_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A bounded in-memory pipe: the Diff thread writes, the socket reads.
fn pipe() -> (PipeWriter, PipeReader) {
    let (tx, rx) = sync_channel(PIPE_CHUNKS);
    (
        PipeWriter {
            tx,
            buf: Vec::with_capacity(PIPE_CHUNK_BYTES),
        },
        PipeReader {
            rx,
            chunk: Vec::new(),
            position: 0,
            done: false,
        },
    )
}

type Chunk = Result<Vec<u8>, String>;

struct PipeWriter {
    tx: SyncSender<Chunk>,
    buf: Vec<u8>,
}

impl PipeWriter {
    /// Ends the stream with an error: the reader fails, so the client sees
    /// a broken response rather than a short tar that looks complete.
    fn fail(&mut self, message: String) {
        self.buf.clear();
        let _ = self.tx.send(Err(message));
    }

    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(PIPE_CHUNK_BYTES));
        self.tx
            .send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl Write for PipeWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = PIPE_CHUNK_BYTES - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PIPE_CHUNK_BYTES {
            self.send_buffer()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()
    }
}

impl Drop for PipeWriter {
    fn drop(&mut self) {
        let _ = self.send_buffer();
    }
}

struct PipeReader {
    rx: Receiver<Chunk>,
    chunk: Vec<u8>,
    position: usize,
    done: bool,
}

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.position == self.chunk.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.position = 0;
                }
                Ok(Err(message)) => {
                    self.done = true;
                    return Err(io::Error::other(message));
                }
                // The writer finished (and flushed on drop).
                Err(_) => self.done = true,
            }
        }
        let n = out.len().min(self.chunk.len() - self.position);
        out[..n].copy_from_slice(&self.chunk[self.position..self.position + n]);
        self.position += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_value("id=abc&parent=d%2De", "parent").as_deref(),
            Some("d-e")
        );
        assert_eq!(query_value("id=abc&parent=", "parent").as_deref(), Some(""));
        assert_eq!(query_value("id=abc", "parent"), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn calls_are_counted_per_method() {
        let c = CallCounters::default();
        assert_eq!(c.snapshot(), CallStats::default());
        let a = c.start();
        let b = c.start();
        assert_eq!(c.snapshot().in_flight, 2);
        std::thread::sleep(Duration::from_millis(2));
        c.finish("GraphDriver.Get", a);
        c.finish("GraphDriver.Nonsense", b);
        let d = c.start();
        c.finish("GraphDriver.Get", d);
        let s = c.snapshot();
        assert_eq!(s.calls, 3);
        assert_eq!(s.in_flight, 0);
        let names: Vec<&str> = s.methods.iter().map(|m| m.method.as_str()).collect();
        assert_eq!(names, ["GraphDriver.Get", OTHER_METHOD]);
        assert_eq!(s.methods[0].calls, 2);
        assert!(s.methods[0].max_us >= 2_000, "{s:?}");
        assert!(s.methods[0].max_us <= s.methods[0].total_us);
        assert_eq!(s.total_us, s.methods[0].total_us + s.methods[1].total_us);
        // The two overlapping calls count once in busy time, twice in the sum.
        assert!(s.busy_us >= 2_000 && s.busy_us < s.total_us, "{s:?}");
        assert_eq!(
            method_of("/GraphDriver.ApplyDiff?id=a&parent="),
            "GraphDriver.ApplyDiff"
        );
        assert_eq!(method_of("/Plugin.Activate"), "Plugin.Activate");
    }

    #[test]
    fn pipe_carries_bytes_and_errors() {
        let (mut w, mut r) = pipe();
        let t = std::thread::spawn(move || {
            w.write_all(&vec![7u8; PIPE_CHUNK_BYTES * 3 + 5]).unwrap();
            w.fail("boom".into());
        });
        let mut got = Vec::new();
        let e = r.read_to_end(&mut got).unwrap_err();
        t.join().unwrap();
        assert_eq!(e.to_string(), "boom");
        assert_eq!(got.len(), PIPE_CHUNK_BYTES * 3);
    }
}
