//! The control socket: a root-only unix socket where each connection gets
//! its own thread and sends newline-delimited JSON requests (see
//! docs/control-protocol.md). Bounded everywhere input comes from outside:
//! line length, idle time, number of connections.

use crate::control::{self, Control};
use crate::error::{Error, Result};
use crate::protocol::{failure, MAX_LINE_BYTES};
use serde_json::Value;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// A connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A client that does not read its answers for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of an oversized request is read and thrown away before closing.
const DRAIN_BYTES: u64 = 64 << 20;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once; more are answered EBUSY and closed.
const MAX_CONNECTIONS: usize = 64;

/// Makes sure the control socket's path can be bound (see
/// [`lcfs_fsfront::claim_socket_path`]).
pub fn claim_socket_path(path: &Path) -> Result<()> {
    use lcfs_fsfront::ClaimError;
    lcfs_fsfront::claim_socket_path(path).map_err(|e| match e {
        ClaimError::NotASocket => Error::Usage(format!(
            "{} exists and is not a socket; choose another --control-socket",
            path.display()
        )),
        ClaimError::Live => Error::Usage(format!(
            "another lcfs daemon is serving the control socket {}",
            path.display()
        )),
        ClaimError::Io(what, e) => Error::io(what, e),
    })
}

/// Binds the socket with mode 0600 (see [`lcfs_dockerplugin::bind_root_only`]).
pub fn bind(path: &Path) -> Result<UnixListener> {
    lcfs_dockerplugin::bind_root_only(path).map_err(|e| Error::io("control socket", e))
}

/// Lets shutdown wait for requests being executed, and refuse new ones.
#[derive(Default)]
pub struct Gate {
    closing: AtomicBool,
    in_flight: RwLock<()>,
}

impl Gate {
    fn run(&self, f: impl FnOnce() -> Value) -> Value {
        let _running = self.in_flight.read().unwrap_or_else(|p| p.into_inner());
        if self.closing.load(Ordering::SeqCst) {
            return failure(libc::ESHUTDOWN, "the daemon is shutting down");
        }
        f()
    }

    /// Refuses new requests and waits until those running have answered.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        drop(self.in_flight.write().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Accepts connections until `wake` becomes readable (a signal arrived).
pub fn serve(
    listener: &UnixListener,
    wake: &UnixStream,
    control: &Arc<Control>,
    gate: &Arc<Gate>,
) -> Result<()> {
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("control socket", e))?;
    let connections = Arc::new(AtomicUsize::new(0));
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a live array of two initialised pollfd; the length passed matches.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("poll on the control socket", e));
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        if fds[0].revents == 0 {
            continue;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log::warn!("accept on the control socket: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let slot = ConnectionSlot::take(&connections);
        let (control, gate) = (control.clone(), gate.clone());
        let spawned = std::thread::Builder::new()
            .name("lcfs-control".into())
            .spawn(move || {
                // The slot is held until the connection ends.
                if let Err(e) = connection(stream, slot.admitted, &control, &gate) {
                    log::debug!("control connection: {e}");
                }
                drop(slot);
            });
        if let Err(e) = spawned {
            log::warn!("cannot start a control connection thread: {e}");
        }
    }
}

/// Counts a connection for as long as it lives.
struct ConnectionSlot {
    count: Arc<AtomicUsize>,
    admitted: bool,
}

impl ConnectionSlot {
    fn take(count: &Arc<AtomicUsize>) -> ConnectionSlot {
        let before = count.fetch_add(1, Ordering::SeqCst);
        ConnectionSlot {
            count: count.clone(),
            admitted: before < MAX_CONNECTIONS,
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

fn send(stream: &mut UnixStream, answer: &Value) -> io::Result<()> {
    let mut line = answer.to_string().into_bytes();
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.flush()
}

/// Discards what a client is still sending after its oversized line (at most
/// [`DRAIN_BYTES`], for at most [`DRAIN_TIMEOUT`] of silence), so it can finish
/// writing and read the error instead of failing with EPIPE.
fn drain(reader: BufReader<UnixStream>) {
    if reader
        .get_ref()
        .set_read_timeout(Some(DRAIN_TIMEOUT))
        .is_err()
    {
        return;
    }
    let _ = io::copy(&mut reader.take(DRAIN_BYTES), &mut io::sink());
}

/// Answers a connection that will not be served: waits briefly for its first
/// request (so the client is reading when the answer comes, rather than
/// failing its write with EPIPE), answers it with `answer` and closes.
fn refuse(mut stream: UnixStream, reader: BufReader<UnixStream>, answer: &Value) -> io::Result<()> {
    stream.set_read_timeout(Some(DRAIN_TIMEOUT))?;
    let mut first = Vec::new();
    let _ = reader
        .take(MAX_LINE_BYTES as u64 + 1)
        .read_until(b'\n', &mut first);
    send(&mut stream, answer)
}

/// Serves one connection: requests in order, one answer each, until EOF,
/// an idle timeout, an oversized line or a write error.
fn connection(
    mut stream: UnixStream,
    admitted: bool,
    control: &Control,
    gate: &Gate,
) -> io::Result<()> {
    // Accepted sockets do not inherit O_NONBLOCK on Linux; make sure anyway.
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    if !admitted {
        let answer = failure(
            libc::EBUSY,
            format!("too many control connections (at most {MAX_CONNECTIONS})"),
        );
        return refuse(stream, reader, &answer);
    }
    let uid = lcfs_dockerplugin::peer_uid(&stream)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    if uid != 0 && uid != own {
        log::warn!("refused a control connection from uid {uid}");
        let answer = failure(
            libc::EACCES,
            format!("uid {uid} may not control lcfs: the control socket is root-only"),
        );
        return refuse(stream, reader, &answer);
    }
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line);
        match read {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        let complete = line.last() == Some(&b'\n');
        if complete {
            line.pop();
        }
        if line.len() > MAX_LINE_BYTES {
            log::warn!("control request line over {MAX_LINE_BYTES} bytes; closing");
            send(&mut stream, &control::oversized())?;
            stream.shutdown(Shutdown::Write)?;
            drain(reader);
            return Ok(());
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            if !complete {
                return Ok(());
            }
            continue;
        }
        let answer = gate.run(|| control.handle_line(&line));
        send(&mut stream, &answer)?;
        if !complete {
            // The client ended the stream in the middle of a line; that was its last.
            return Ok(());
        }
    }
}
