//! A registry for the tests: one blob served at /v2/t/blobs/x, HEAD and
//! GET with one range, in a way the test can change while it runs.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[allow(dead_code)]
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Serve {
    Ranges,
    /// Ranges, each answered after 100 ms.
    SlowRanges,
    /// Every range answered with the whole blob, 200.
    Whole,
    /// Ranges of flipped bytes.
    Flipped,
    /// Ranges, the bytes before this offset flipped (the TOC and footer
    /// right, the chunks wrong).
    FlippedBefore(usize),
    /// Connections closed at once (a registry away).
    Down,
}

/// Credentials the registry asks for.
#[allow(dead_code)]
#[derive(Clone, Debug)]
pub enum Auth {
    /// `Authorization: Basic` with this `user:password`.
    Basic(String),
    /// The token flow: /token gives `token` for Basic `user:password`.
    Bearer {
        user_password: String,
        token: String,
    },
}

fn basic(user_password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_password)
    )
}

pub struct Registry {
    pub url: String,
    pub how: Arc<Mutex<Serve>>,
    pub auth: Arc<Mutex<Option<Auth>>>,
    /// Body bytes sent so far.
    pub served: Arc<AtomicU64>,
    /// The ranges asked for, `[start, end)`, in order.
    #[allow(dead_code)] // not every test binary asks
    pub ranges: Arc<Mutex<Vec<(usize, usize)>>>,
}

#[allow(dead_code)]
impl Registry {
    /// `host:port`.
    pub fn host(&self) -> &str {
        let rest = self.url.trim_start_matches("http://");
        &rest[..rest.find('/').unwrap_or(rest.len())]
    }
    pub fn require(&self, auth: Auth) {
        *self.auth.lock().unwrap() = Some(auth);
    }
    pub fn set(&self, how: Serve) {
        *self.how.lock().unwrap() = how;
    }
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }
}

pub fn registry(blob: Arc<Vec<u8>>, how: Serve) -> Registry {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v2/t/blobs/x", l.local_addr().unwrap());
    let origin = format!("http://{}", l.local_addr().unwrap());
    let how = Arc::new(Mutex::new(how));
    let auth: Arc<Mutex<Option<Auth>>> = Arc::new(Mutex::new(None));
    let served = Arc::new(AtomicU64::new(0));
    let ranges: Arc<Mutex<Vec<(usize, usize)>>> = Arc::default();
    let (h, sv, au, rg) = (how.clone(), served.clone(), auth.clone(), ranges.clone());
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (blob, how, served, auth) = (blob.clone(), h.clone(), sv.clone(), au.clone());
            let asked = rg.clone();
            let origin = origin.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut out = s;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let head = line.starts_with("HEAD");
                    let path = line.split(' ').nth(1).unwrap_or("").to_string();
                    let mut range = None;
                    let mut authorization = String::new();
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h
                            .strip_prefix("Authorization: ")
                            .or_else(|| h.strip_prefix("authorization: "))
                        {
                            authorization = v.trim().to_string();
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                            let (a, b) = v.trim().split_once('-').unwrap();
                            range = Some((
                                a.parse::<usize>().unwrap(),
                                b.parse::<usize>().unwrap() + 1,
                            ));
                        }
                    }
                    if let (Some(r), false) = (range, head) {
                        asked.lock().unwrap().push(r);
                    }
                    let auth = auth.lock().unwrap().clone();
                    let refuse = |out: &mut std::net::TcpStream, challenge: String| {
                        let _ = write!(
                            out,
                            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: {challenge}\r\nContent-Length: 0\r\n\r\n"
                        );
                    };
                    match (&auth, path.starts_with("/token")) {
                        (
                            Some(Auth::Bearer {
                                user_password,
                                token,
                            }),
                            true,
                        ) => {
                            if authorization == basic(user_password) {
                                let body = format!("{{\"token\": \"{token}\"}}");
                                let _ = write!(
                                    out,
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                    body.len()
                                );
                            } else {
                                refuse(&mut out, "Basic realm=\"token\"".into());
                            }
                            continue;
                        }
                        (Some(Auth::Basic(user_password)), false)
                            if authorization != basic(user_password) =>
                        {
                            refuse(&mut out, "Basic realm=\"registry\"".into());
                            continue;
                        }
                        (Some(Auth::Bearer { token, .. }), false)
                            if authorization != format!("Bearer {token}") =>
                        {
                            refuse(
                                &mut out,
                                format!("Bearer realm=\"{origin}/token\",service=\"t\",scope=\"repository:t:pull\""),
                            );
                            continue;
                        }
                        _ => {}
                    }
                    let how = *how.lock().unwrap();
                    let (status, body): (&str, Vec<u8>) = match (range, how) {
                        (_, Serve::Down) => return,
                        (Some((a, b)), Serve::Ranges) => {
                            ("206 Partial Content", blob[a..b].to_vec())
                        }
                        (Some((a, b)), Serve::SlowRanges) => {
                            std::thread::sleep(std::time::Duration::from_millis(100));
                            ("206 Partial Content", blob[a..b].to_vec())
                        }
                        (Some((a, b)), Serve::Flipped) => (
                            "206 Partial Content",
                            blob[a..b].iter().map(|x| x ^ 1).collect(),
                        ),
                        (Some((a, b)), Serve::FlippedBefore(end)) => (
                            "206 Partial Content",
                            (a..b)
                                .map(|i| if i < end { blob[i] ^ 1 } else { blob[i] })
                                .collect(),
                        ),
                        _ => ("200 OK", blob.to_vec()),
                    };
                    let span = match range {
                        Some((a, b)) if status.starts_with("206") => {
                            format!("Content-Range: bytes {a}-{}/{}\r\n", b - 1, blob.len())
                        }
                        _ => String::new(),
                    };
                    let _ = write!(
                        out,
                        "HTTP/1.1 {status}\r\n{span}Content-Length: {}\r\n\r\n",
                        body.len()
                    );
                    if !head {
                        served.fetch_add(body.len() as u64, Ordering::SeqCst);
                        let _ = out.write_all(&body);
                    }
                }
            });
        }
    });
    Registry {
        url,
        how,
        auth,
        served,
        ranges,
    }
}
