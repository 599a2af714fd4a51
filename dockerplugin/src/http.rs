//! HTTP/1.1 on a unix socket: every call is `POST /<Method>` (Docker's
//! plugin protocol), read and answered by wire.rs. Each connection has its
//! own thread. JSON bodies are read up to [`MAX_JSON_BYTES`]; ApplyDiff's
//! tar body and Diff's tar answer are streamed, never held whole in memory.
//!
//! The socket is root's alone, as the control socket is: it is made 0600 in
//! a directory made 0700, and a peer whose uid is neither root nor the
//! daemon's is refused (SO_PEERCRED), since the plugin hands out mounted
//! layers with their set-user-id binaries and devices. What a client sends
//! is bounded ([`Limits`]): connections at once, the time a request may take
//! to arrive, how long a connection may stay silent or leave its answer
//! unread, and how many Diffs (each streaming a whole layer) run at once.
//!
//! Every call is timed from the moment its head is read until the answer is
//! written (for Diff, the whole tar stream; for ApplyDiff, the whole
//! upload), per method, in [`CallCounters`]: the storage work inside a
//! `docker run` or `docker build`, apart from what runc and dockerd spend.

use crate::driver::Driver;
use crate::socket::{bind_root_only, peer_uid};
use crate::wire::{self, Body, Head, HeadError, StreamAnswer, Timing};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{self, BufReader, Read};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The largest JSON request accepted (Docker's are a few hundred bytes).
pub const MAX_JSON_BYTES: u64 = 1 << 20;
const CONTENT_TYPE_JSON: &str = "application/vnd.docker.plugins.v1+json";
/// How long a refused connection is given to send its request, so that it
/// reads the refusal instead of failing its write.
const REFUSAL_READ_TIME: Duration = Duration::from_secs(2);

/// The bounds of the plugin server.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Diffs streamed at once: each reads a whole layer and holds its
    /// connection until the client has read the tar.
    pub max_diffs: usize,
    /// How long a Diff waits for one of those slots before it is answered
    /// 503 (Docker reports the error; the commit can be retried).
    pub diff_wait: Duration,
    /// A connection silent for this long (between requests, or in the
    /// middle of one) is closed.
    pub idle_timeout: Duration,
    /// The most a request head, or a JSON body, may take to arrive,
    /// however slowly its bytes trickle in.
    pub request_timeout: Duration,
    /// A client that does not read its answer for this long is dropped.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            max_diffs: 4,
            diff_wait: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
        }
    }
}

/// A running plugin server. Dropping it without [`PluginServer::shutdown`]
/// leaves it running.
pub struct PluginServer {
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    socket: PathBuf,
    calls: Arc<CallCounters>,
}

/// What the acceptor and the connection threads share.
struct Shared {
    driver: Arc<Driver>,
    limits: Limits,
    calls: Arc<CallCounters>,
    stop: AtomicBool,
    state: Mutex<State>,
    /// Signalled when a call ends or a Diff slot frees.
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// Open connections, to shut down at the end.
    connections: HashMap<u64, UnixStream>,
    next_connection: u64,
    threads: Vec<JoinHandle<()>>,
    calls_in_hand: usize,
    diffs: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a call in hand, unless the server is stopping.
    fn begin_call(&self) -> Option<CallGuard<'_>> {
        let mut st = self.lock();
        if self.stop.load(Ordering::SeqCst) {
            return None;
        }
        st.calls_in_hand += 1;
        Some(CallGuard(self))
    }

    /// Takes a Diff slot, waiting at most `limits.diff_wait`.
    fn take_diff_slot(&self) -> Option<DiffSlot<'_>> {
        let deadline = Instant::now() + self.limits.diff_wait;
        let mut st = self.lock();
        while st.diffs >= self.limits.max_diffs.max(1) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stop.load(Ordering::SeqCst) {
                return None;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.diffs += 1;
        Some(DiffSlot(self))
    }
}

struct CallGuard<'a>(&'a Shared);

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().calls_in_hand -= 1;
        self.0.changed.notify_all();
    }
}

struct DiffSlot<'a>(&'a Shared);

impl Drop for DiffSlot<'_> {
    fn drop(&mut self) {
        self.0.lock().diffs -= 1;
        self.0.changed.notify_all();
    }
}

impl PluginServer {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The per-method call counters of this server, live.
    pub fn calls(&self) -> Arc<CallCounters> {
        self.calls.clone()
    }

    /// Stops taking connections and calls, waits for the calls in hand to
    /// be answered, closes the connections and removes the socket.
    pub fn shutdown(mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let threads = {
            let mut st = self.shared.lock();
            while st.calls_in_hand > 0 {
                st = self
                    .shared
                    .changed
                    .wait(st)
                    .unwrap_or_else(|p| p.into_inner());
            }
            for c in st.connections.values() {
                let _ = c.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut st.threads)
        };
        for t in threads {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Serves `driver` on a unix socket at `socket` within `limits`. A stale
/// socket file nobody listens on is replaced; a live one is refused.
pub fn serve(driver: Arc<Driver>, socket: &Path, limits: Limits) -> io::Result<PluginServer> {
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
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
    let listener = bind_root_only(socket)?;
    listener.set_nonblocking(true)?;
    let calls = Arc::new(CallCounters::default());
    let shared = Arc::new(Shared {
        driver,
        limits,
        calls: calls.clone(),
        stop: AtomicBool::new(false),
        state: Mutex::new(State::default()),
        changed: Condvar::new(),
    });
    let for_acceptor = shared.clone();
    let acceptor = std::thread::Builder::new()
        .name("lcfs-plugin-accept".into())
        .spawn(move || accept(&listener, &for_acceptor))?;
    log::info!(
        "docker graphdriver plugin listening on {}",
        socket.display()
    );
    Ok(PluginServer {
        shared,
        acceptor: Some(acceptor),
        socket: socket.to_path_buf(),
        calls,
    })
}

/// Accepts connections until the server stops, each on its own thread.
fn accept(listener: &UnixListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let mut fds = [libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: fds is a live array of one initialised pollfd; the length matches.
        // A timeout, so the stop flag is seen within 100 ms.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 100) };
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("accept on the docker plugin socket: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let mut st = shared.lock();
        st.threads.retain(|t| !t.is_finished());
        let admitted = st.connections.len() < shared.limits.max_connections.max(1);
        let id = st.next_connection;
        st.next_connection += 1;
        if admitted {
            match stream.try_clone() {
                Ok(clone) => {
                    st.connections.insert(id, clone);
                }
                Err(e) => {
                    log::warn!("docker plugin connection: {e}");
                    continue;
                }
            }
        }
        let for_thread = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("lcfs-plugin".into())
            .spawn(move || {
                if let Err(e) = connection(stream, admitted, &for_thread) {
                    log::debug!("docker plugin connection: {e}");
                }
                for_thread.lock().connections.remove(&id);
            });
        match spawned {
            Ok(t) => st.threads.push(t),
            Err(e) => {
                st.connections.remove(&id);
                log::warn!("cannot start a docker plugin connection thread: {e}");
            }
        }
    }
}

/// Answers a connection that will not be served: reads its request head
/// briefly (so the client reads the answer rather than failing its write),
/// answers `status` with `message` and closes.
fn refuse(
    mut stream: UnixStream,
    reader: &mut BufReader<UnixStream>,
    status: u16,
    message: &str,
) -> io::Result<()> {
    let _ = wire::read_head(reader, REFUSAL_READ_TIME, REFUSAL_READ_TIME);
    let body = json!({ "Err": message }).to_string();
    wire::write_answer(
        &mut stream,
        status,
        CONTENT_TYPE_JSON,
        body.as_bytes(),
        true,
    )
}

/// Serves one connection: requests in order until the client closes, asks
/// to close, stays silent past the idle timeout, or breaks a bound.
fn connection(mut stream: UnixStream, admitted: bool, shared: &Shared) -> io::Result<()> {
    let limits = &shared.limits;
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(limits.write_timeout))?;
    let mut reader = BufReader::with_capacity(64 << 10, stream.try_clone()?);
    if !admitted {
        let message = format!(
            "too many connections to the lcfs plugin (at most {})",
            limits.max_connections
        );
        return refuse(stream, &mut reader, 503, &message);
    }
    let uid = peer_uid(&stream)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    if uid != 0 && uid != own {
        log::warn!("refused a docker plugin connection from uid {uid}");
        let message = format!("uid {uid} may not use the lcfs plugin: its socket is root-only");
        return refuse(stream, &mut reader, 403, &message);
    }
    loop {
        let head = match wire::read_head(&mut reader, limits.idle_timeout, limits.request_timeout) {
            Ok(h) => h,
            Err(HeadError::Gone) => return Ok(()),
            Err(HeadError::Bad(message)) => {
                let body = json!({ "Err": message }).to_string();
                return wire::write_answer(
                    &mut stream,
                    400,
                    CONTENT_TYPE_JSON,
                    body.as_bytes(),
                    true,
                );
            }
            Err(HeadError::Io(e)) => {
                if wire::timed_out(&e) {
                    log::warn!("docker plugin: a request head did not arrive in time; closing");
                }
                return Err(e);
            }
        };
        let Some(_call) = shared.begin_call() else {
            let body = json!({ "Err": "the lcfs daemon is shutting down" }).to_string();
            return wire::write_answer(&mut stream, 503, CONTENT_TYPE_JSON, body.as_bytes(), true);
        };
        let method = method_of(&head.target);
        let started = shared.calls.start();
        log::debug!("docker plugin call {method}");
        let keep = handle(shared, &head, &mut reader, &mut stream);
        let elapsed = shared.calls.finish(&method, started);
        log::debug!(
            "docker plugin call {method} done in {} us",
            elapsed.as_micros()
        );
        match keep {
            Ok(true) if !head.wants_close() => {}
            Ok(_) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Answers one request. Ok(true): the connection may carry another.
fn handle(
    shared: &Shared,
    head: &Head,
    reader: &mut BufReader<UnixStream>,
    out: &mut UnixStream,
) -> io::Result<bool> {
    let driver = &shared.driver;
    let limits = &shared.limits;
    let (path, query) = head.target.split_once('?').unwrap_or((&head.target, ""));
    let method = path.trim_start_matches('/');
    let json_timing = Timing {
        idle: limits.idle_timeout,
        deadline: Some(Instant::now() + limits.request_timeout),
    };
    let answer = |out: &mut UnixStream, status: u16, value: &Value, finished: bool| {
        let close = !finished || head.wants_close();
        wire::write_answer(
            out,
            status,
            CONTENT_TYPE_JSON,
            value.to_string().as_bytes(),
            close,
        )
        .map(|_| !close)
    };
    // A tar of any size: only each read is timed. JSON: all of it by a deadline.
    let timing = if method == "GraphDriver.ApplyDiff" {
        Timing {
            idle: limits.idle_timeout,
            deadline: None,
        }
    } else {
        json_timing
    };
    let mut body = match Body::new(head, reader, timing) {
        Ok(b) => b,
        Err(e) => return answer(out, 400, &json!({ "Err": e }), false),
    };
    if head.method != "POST" {
        let value = json!({ "Err": format!("{} {path}: plugin calls are POST", head.method) });
        return answer(out, 405, &value, false);
    }
    match method {
        "GraphDriver.ApplyDiff" => {
            let id = query_value(query, "id").unwrap_or_default();
            let parent = query_value(query, "parent").unwrap_or_default();
            let value = driver.apply_diff(&id, &parent, &mut body);
            let finished = body.finished();
            answer(out, 200, &value, finished)
        }
        "GraphDriver.Diff" => {
            let request = match read_json_body(&mut body) {
                Ok(b) => b,
                Err(e) => return text_answer(out, 400, &e),
            };
            let Some(_slot) = shared.take_diff_slot() else {
                let message = format!(
                    "too many Diffs in progress (at most {} at once, waited {} s); try again",
                    limits.max_diffs,
                    limits.diff_wait.as_secs()
                );
                log::warn!("GraphDriver.Diff: {message}");
                return text_answer(out, 503, &message);
            };
            let plan = match driver.prepare_diff(&request) {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("GraphDriver.Diff: {e}");
                    return text_answer(out, 500, &e.to_string());
                }
            };
            let mut stream = StreamAnswer::start(out, "application/x-tar", head.http11)?;
            if let Err(e) = driver.write_diff(&plan, &mut stream) {
                // Unterminated: the client sees a broken answer, not a short tar.
                log::warn!("GraphDriver.Diff: {e}");
                return Ok(false);
            }
            stream.finish()?;
            Ok(head.http11)
        }
        _ => {
            let value = match read_json_body(&mut body) {
                Ok(request) => driver.call(method, &request),
                Err(e) => json!({ "Err": e }),
            };
            let finished = body.finished();
            answer(out, 200, &value, finished)
        }
    }
}

/// Answers with plain text (Diff's only way to fail is its status), and
/// closes: the request body may not have been read to its end.
fn text_answer(out: &mut UnixStream, status: u16, message: &str) -> io::Result<bool> {
    wire::write_answer(out, status, "text/plain", message.as_bytes(), true).map(|_| false)
}

fn read_json_body(body: &mut Body<'_>) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    body.take(MAX_JSON_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the request body: {e}"))?;
    if bytes.len() as u64 > MAX_JSON_BYTES {
        return Err(format!(
            "request body larger than {MAX_JSON_BYTES} bytes; plugin calls carry small JSON"
        ));
    }
    Ok(bytes)
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
}
