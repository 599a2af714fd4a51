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

pub struct Registry {
    pub url: String,
    pub how: Arc<Mutex<Serve>>,
    /// Body bytes sent so far.
    pub served: Arc<AtomicU64>,
}

#[allow(dead_code)]
impl Registry {
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
    let how = Arc::new(Mutex::new(how));
    let served = Arc::new(AtomicU64::new(0));
    let (h, sv) = (how.clone(), served.clone());
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (blob, how, served) = (blob.clone(), h.clone(), sv.clone());
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
                    let how = *how.lock().unwrap();
                    let (status, body): (&str, Vec<u8>) = match (range, how) {
                        (_, Serve::Down) => return,
                        (Some((a, b)), Serve::Ranges) => {
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
                    let _ = write!(
                        out,
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n",
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
    Registry { url, how, served }
}
