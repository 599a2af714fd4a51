//! HTTP/1.1 as Docker's plugin client speaks it, on one unix stream: request
//! heads, bodies (Content-Length or chunked, `Expect: 100-continue`),
//! answers with a length, and chunked answers for streams. Bounded where
//! the client decides: head size, line length, and time (a deadline for the
//! head and for JSON bodies, an idle timeout for every read).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The largest request head (request line and headers) accepted.
pub(crate) const MAX_HEAD_BYTES: usize = 64 << 10;
/// The longest chunk-size or trailer line accepted.
const MAX_CHUNK_LINE_BYTES: usize = 4 << 10;
/// Bytes per chunk of a streamed answer.
const CHUNK_BYTES: usize = 256 << 10;

/// The time allowed for reading: each read waits at most `idle`, and all
/// of them together end by `deadline`, if any.
#[derive(Clone, Copy)]
pub(crate) struct Timing {
    pub idle: Duration,
    pub deadline: Option<Instant>,
}

impl Timing {
    /// Sets the socket's read timeout for the next read; TimedOut once the
    /// deadline has passed.
    fn arm(&self, stream: &UnixStream) -> io::Result<()> {
        let mut wait = self.idle;
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the request took too long to arrive",
                ));
            }
            wait = wait.min(left);
        }
        stream.set_read_timeout(Some(wait.max(Duration::from_millis(1))))
    }
}

/// Whether an I/O error is a timeout (a read timeout shows as WouldBlock).
pub(crate) fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A parsed request head.
pub(crate) struct Head {
    pub method: String,
    /// The request target: `/Method?query`.
    pub target: String,
    /// HTTP/1.1 (else 1.0: no chunked answers, close after).
    pub http11: bool,
    headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the client asked to close after this request.
    pub fn wants_close(&self) -> bool {
        match self.header("Connection") {
            Some(v) if v.eq_ignore_ascii_case("close") => true,
            Some(v) if v.eq_ignore_ascii_case("keep-alive") => false,
            _ => !self.http11,
        }
    }
}

/// Why no request head was read.
pub(crate) enum HeadError {
    /// The client closed the connection, or sent nothing for the idle
    /// timeout, between requests: nothing to answer.
    Gone,
    /// Not HTTP, or over a bound: answered 400 (or 431), then closed.
    Bad(String),
    /// The head did not arrive in time, or the socket failed.
    Io(io::Error),
}

/// Reads one line (up to and without CRLF or LF) of at most `max` bytes;
/// None at end of stream before any byte.
fn read_line(
    reader: &mut BufReader<UnixStream>,
    max: usize,
    timing: Timing,
) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        timing.arm(reader.get_ref())?;
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            if line.is_empty() {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let (taken, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..taken]);
        reader.consume(taken);
        if line.len() > max + 2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a line longer than {max} bytes"),
            ));
        }
        if done {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Some(line));
        }
    }
}

/// Reads a request head. Waits `idle` for its first byte, then at most
/// `head_time` for the whole head.
pub(crate) fn read_head(
    reader: &mut BufReader<UnixStream>,
    idle: Duration,
    head_time: Duration,
) -> Result<Head, HeadError> {
    // The first byte: an idle connection between requests may just go.
    let first = Timing {
        idle,
        deadline: None,
    };
    if let Err(e) = first.arm(reader.get_ref()) {
        return Err(HeadError::Io(e));
    }
    match reader.fill_buf() {
        Ok([]) => return Err(HeadError::Gone),
        Ok(_) => {}
        Err(e) if timed_out(&e) => return Err(HeadError::Gone),
        Err(e) => return Err(HeadError::Io(e)),
    }
    let timing = Timing {
        idle,
        deadline: Some(Instant::now() + head_time),
    };
    let mut total = 0;
    let mut lines = Vec::new();
    loop {
        let line = match read_line(reader, MAX_HEAD_BYTES, timing) {
            Ok(Some(l)) => l,
            Ok(None) => return Err(HeadError::Gone),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(HeadError::Bad(format!("request head: {e}")))
            }
            Err(e) => return Err(HeadError::Io(e)),
        };
        total += line.len() + 2;
        if total > MAX_HEAD_BYTES {
            return Err(HeadError::Bad(format!(
                "request head larger than {MAX_HEAD_BYTES} bytes"
            )));
        }
        if line.is_empty() {
            if lines.is_empty() {
                continue; // Stray CRLF between requests (RFC 9112 2.2).
            }
            break;
        }
        lines.push(line);
    }
    parse_head(&lines).map_err(HeadError::Bad)
}

fn parse_head(lines: &[Vec<u8>]) -> Result<Head, String> {
    let text = |l: &[u8]| {
        std::str::from_utf8(l)
            .map(str::to_string)
            .map_err(|_| "request head is not text".to_string())
    };
    let request_line = text(&lines[0])?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed request line {request_line:?}"));
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(format!("not HTTP/1.x: {request_line:?}")),
    };
    if method.is_empty() || !target.starts_with('/') {
        return Err(format!("malformed request line {request_line:?}"));
    }
    let mut headers = Vec::with_capacity(lines.len() - 1);
    for line in &lines[1..] {
        let line = text(line)?;
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("malformed header {line:?}"));
        };
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        http11,
        headers,
    })
}

/// A request body, read as it arrives.
pub(crate) struct Body<'a> {
    reader: &'a mut BufReader<UnixStream>,
    kind: BodyKind,
    timing: Timing,
}

enum BodyKind {
    Length(u64),
    /// Bytes left in the current chunk; `done` after the last chunk.
    Chunked {
        left: u64,
        done: bool,
    },
}

impl<'a> Body<'a> {
    /// The body `head` announces. Answers `Expect: 100-continue` first.
    pub fn new(
        head: &Head,
        reader: &'a mut BufReader<UnixStream>,
        timing: Timing,
    ) -> Result<Body<'a>, String> {
        let chunked = head
            .header("Transfer-Encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let kind = if chunked {
            BodyKind::Chunked {
                left: 0,
                done: false,
            }
        } else {
            match head.header("Content-Length") {
                None => BodyKind::Length(0),
                Some(v) => {
                    BodyKind::Length(v.parse().map_err(|_| format!("bad Content-Length {v:?}"))?)
                }
            }
        };
        if head.http11
            && head
                .header("Expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            let mut stream = reader.get_ref();
            stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(|e| format!("answering Expect: {e}"))?;
        }
        Ok(Body {
            reader,
            kind,
            timing,
        })
    }

    /// Whether every byte of the body has been read (the connection can
    /// then carry another request).
    pub fn finished(&self) -> bool {
        matches!(
            self.kind,
            BodyKind::Length(0) | BodyKind::Chunked { done: true, .. }
        )
    }

    fn read_some(&mut self, out: &mut [u8], left: u64) -> io::Result<usize> {
        let n = out.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        self.timing.arm(self.reader.get_ref())?;
        let got = self.reader.read(&mut out[..n])?;
        if got == 0 && n > 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed the connection in the middle of the body",
            ));
        }
        Ok(got)
    }

    fn chunk_line(&mut self) -> io::Result<Vec<u8>> {
        read_line(self.reader, MAX_CHUNK_LINE_BYTES, self.timing)?
            .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
    }
}

impl Read for Body<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        match self.kind {
            BodyKind::Length(left) => {
                if left == 0 {
                    return Ok(0);
                }
                let got = self.read_some(out, left)?;
                self.kind = BodyKind::Length(left - got as u64);
                Ok(got)
            }
            BodyKind::Chunked { done: true, .. } => Ok(0),
            BodyKind::Chunked { left, .. } => {
                let left = if left > 0 {
                    left
                } else {
                    let line = self.chunk_line()?;
                    let size = line.split(|&b| b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(size)
                        .ok()
                        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                        .ok_or_else(|| {
                            io::Error::new(io::ErrorKind::InvalidData, "bad chunk size")
                        })?;
                    if size == 0 {
                        // Trailers, up to the empty line; bounded like a head.
                        let mut total = 0;
                        loop {
                            let line = self.chunk_line()?;
                            total += line.len();
                            if line.is_empty() {
                                break;
                            }
                            if total > MAX_HEAD_BYTES {
                                return Err(io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    "trailers too large",
                                ));
                            }
                        }
                        self.kind = BodyKind::Chunked {
                            left: 0,
                            done: true,
                        };
                        return Ok(0);
                    }
                    size
                };
                let got = self.read_some(out, left)?;
                let left = left - got as u64;
                if left == 0 && !self.chunk_line()?.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "chunk data longer than its size",
                    ));
                }
                self.kind = BodyKind::Chunked { left, done: false };
                Ok(got)
            }
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Writes a whole answer with its length.
pub(crate) fn write_answer(
    out: &mut impl Write,
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
) -> io::Result<()> {
    let mut message = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        reason(status),
        body.len()
    )
    .into_bytes();
    if close {
        message.extend_from_slice(b"Connection: close\r\n");
    }
    message.extend_from_slice(b"\r\n");
    message.extend_from_slice(body);
    out.write_all(&message)?;
    out.flush()
}

/// A streamed answer: chunked for HTTP/1.1, else the raw bytes up to the
/// connection's close. Dropping it without [`StreamAnswer::finish`] leaves
/// the answer unterminated, so the client sees a broken stream rather than
/// a short one that looks complete.
pub(crate) struct StreamAnswer<'a> {
    out: &'a mut UnixStream,
    chunked: bool,
    buf: Vec<u8>,
}

impl<'a> StreamAnswer<'a> {
    pub fn start(
        out: &'a mut UnixStream,
        content_type: &str,
        http11: bool,
    ) -> io::Result<StreamAnswer<'a>> {
        let framing = if http11 {
            "Transfer-Encoding: chunked\r\n"
        } else {
            "Connection: close\r\n"
        };
        let head = format!("HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n{framing}\r\n");
        out.write_all(head.as_bytes())?;
        Ok(StreamAnswer {
            out,
            chunked: http11,
            buf: Vec::with_capacity(CHUNK_BYTES),
        })
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.chunked {
            self.out
                .write_all(format!("{:x}\r\n", self.buf.len()).as_bytes())?;
            self.buf.extend_from_slice(b"\r\n");
        }
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Sends what is buffered and the end of the stream.
    pub fn finish(mut self) -> io::Result<()> {
        self.send()?;
        if self.chunked {
            self.out.write_all(b"0\r\n\r\n")?;
        }
        self.out.flush()
    }
}

impl Write for StreamAnswer<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_BYTES {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()?;
        self.out.flush()
    }
}
