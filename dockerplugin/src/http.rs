//! HTTP/1.1 on a unix socket: every call is `POST /<Method>` (Docker's
//! plugin protocol). tiny_http parses requests (Content-Length and chunked
//! bodies, `Expect: 100-continue`); a fixed pool of workers answers them.
//! JSON bodies are read up to [`MAX_JSON_BYTES`]; ApplyDiff's tar body and
//! Diff's tar response are streamed, never held whole in memory.

use crate::driver::Driver;
use serde_json::{json, Value};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

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
}

impl PluginServer {
    pub fn socket(&self) -> &Path {
        &self.socket
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
    let mut handles = Vec::new();
    for i in 0..workers.max(1) {
        let server = server.clone();
        let stop = stop.clone();
        let driver = driver.clone();
        let handle = std::thread::Builder::new()
            .name(format!("lcfs-plugin-{i}"))
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match server.recv() {
                        Ok(request) => handle(&driver, request),
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
    })
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
