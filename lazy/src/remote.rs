//! An eStargz layer read where it lies, in a registry (docs/lazy.md,
//! "Reading a layer remotely"): the blob's size from a HEAD, the footer and
//! the TOC with two ranged GETs, the TOC checked against the layer's TOC
//! digest, then a file's chunks (their gzip members lie one after another)
//! with one ranged GET, each chunk checked against its digest. What was
//! fetched is counted: a file costs its chunks, not the layer. This is the
//! fetch a lazily mounted layer does on a first read.
//!
//! Access: HTTP or HTTPS (the system's roots and the CA certificates
//! given); a 401 is answered once, with Basic credentials or the bearer
//! token flow (realm, service, scope), and the authorization kept for the
//! requests after it. Credentials go to the registry's origin and its
//! token realm only, never to a redirect's other origin nor to an
//! `http://` realm of an `https://` registry. Redirects: up to 5.
//!
//! Other places first ([`Alternate`]: the cooperative pull's home peer,
//! the mirrors of containerd's hosts configuration): every request goes
//! to them in turn (each with its own headers and CAs, never the
//! registry's credentials), and to the registry when they fail, are slow,
//! or send bytes that fail their digest (then that place is left alone
//! for [`PEER_PENALTY`]).

use crate::estargz::{parse_footer, Error, Index, Result, FOOTER_SIZE};
use base64::Engine as _;
use lcfs_mirror::upstream::{parse_challenge, percent_encode, Credentials};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a registry is reached: credentials, extra CA certificates and
/// headers.
#[derive(Clone, Default, PartialEq)]
pub struct Access {
    pub credentials: Option<Credentials>,
    /// PEM certificates trusted beside the system's roots.
    pub ca_certificates: Vec<Vec<u8>>,
    /// Sent with every request to the registry's origin (containerd's
    /// hosts configuration's `[header]`), never to another.
    pub headers: Vec<(String, String)>,
}

impl std::fmt::Debug for Access {
    /// Header values (an `Authorization` among them) are not shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Access")
            .field("credentials", &self.credentials)
            .field("ca_certificates", &self.ca_certificates.len())
            .field("headers", &headers)
            .finish()
    }
}

/// A blob at a URL, read by ranges.
struct Blob {
    url: String,
    agent: ureq::Agent,
    /// Sent with every request to the blob's origin.
    headers: Vec<(String, String)>,
    credentials: Option<Credentials>,
    /// The `Authorization` a 401 led to, sent from then on.
    authorization: Mutex<Option<String>>,
    /// Bytes fetched so far.
    fetched: AtomicU64,
}

/// A layer blob at `url` (`http(s)://host/v2/NAME/blobs/sha256:...`).
pub struct RemoteLayer {
    blob: Blob,
    alternates: Vec<Tried>,
    pub index: Index,
}

/// How long a place that failed is left alone: as long as the mirror
/// leaves a failed peer out of the homes.
pub use lcfs_mirror::PEER_PENALTY;

/// A place to read the blob from before the registry.
pub struct Alternate {
    /// The blob's URL there.
    pub url: String,
    pub access: Access,
    /// How long it may take to answer (the registry's timeout if longer).
    pub timeout: Duration,
    /// The cooperative pull's peers, when this is the home peer: told when
    /// it fails.
    pub peers: Option<(lcfs_mirror::Peers, String)>,
}

impl Alternate {
    /// The cooperative pull's home peer of a blob.
    pub fn peer(route: lcfs_mirror::PeerRoute, peers: lcfs_mirror::Peers) -> Alternate {
        Alternate {
            url: route.url,
            access: Access {
                headers: route.headers,
                ..Access::default()
            },
            timeout: route.timeout,
            peers: Some((peers, route.peer)),
        }
    }
}

struct Tried {
    blob: Blob,
    peers: Option<(lcfs_mirror::Peers, String)>,
    /// Until when it is left alone after it failed.
    down_until: Mutex<Option<std::time::Instant>>,
}

impl Tried {
    fn usable(&self) -> bool {
        let down = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        down.is_none_or(|t| std::time::Instant::now() >= t)
    }

    fn failed(&self, why: &str) {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::Instant::now() + PEER_PENALTY);
        match &self.peers {
            Some((peers, peer)) => peers.failed(peer, why),
            None => log::warn!("{}: {why}; reading from the next source", self.blob.url),
        }
    }
}

fn http_err(url: &str, e: ureq::Error) -> Error {
    match e {
        ureq::Error::Status(code, r) => Error::Input(format!(
            "{url}: the registry answered {code} {}",
            r.status_text()
        )),
        ureq::Error::Transport(t) => Error::Input(format!("{url}: {t}")),
    }
}

/// `scheme://host[:port]` of a URL.
pub(crate) fn origin(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    let end = url[after..].find('/').map_or(url.len(), |i| after + i);
    &url[..end]
}

/// The most bytes of a token answer read.
const TOKEN_ANSWER_MAX: u64 = 64 << 10;
const REDIRECTS_MAX: usize = 5;

impl Blob {
    /// A blob at `url`, reached with `access`.
    fn new(url: &str, access: &Access, timeout: Duration) -> Result<Blob> {
        let tls = lcfs_mirror::upstream::tls_config(&access.ca_certificates)
            .map_err(|e| Error::Input(format!("TLS for {url}: {e}")))?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(timeout)
            .timeout_read(timeout)
            .redirects(0)
            .tls_config(Arc::new(tls))
            .build();
        Ok(Blob {
            url: url.to_string(),
            agent,
            headers: access.headers.clone(),
            credentials: access.credentials.clone(),
            authorization: Mutex::new(None),
            fetched: AtomicU64::new(0),
        })
    }

    /// One request, following redirects (the authorization only to the
    /// blob's origin) and answering one 401.
    fn send(&self, method: &str, range: Option<(u64, u64)>) -> Result<ureq::Response> {
        let mut answered = false;
        'again: loop {
            let mut url = self.url.clone();
            for _ in 0..=REDIRECTS_MAX {
                let mut req = self.agent.request(method, &url);
                if let Some((start, end)) = range {
                    req = req.set("Range", &format!("bytes={start}-{}", end - 1));
                }
                let home = origin(&url) == origin(&self.url);
                if home {
                    for (k, v) in &self.headers {
                        req = req.set(k, v);
                    }
                    let auth = self
                        .authorization
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    if let Some(a) = auth {
                        req = req.set("Authorization", &a);
                    }
                }
                match req.call() {
                    Ok(r) if (300..400).contains(&r.status()) => {
                        let to = r.header("location").unwrap_or("").to_string();
                        url = if to.starts_with("http://") || to.starts_with("https://") {
                            to
                        } else if to.starts_with('/') {
                            format!("{}{to}", origin(&url))
                        } else {
                            return Err(Error::Input(format!("{url}: a redirect to {to:?}")));
                        };
                    }
                    Ok(r) => return Ok(r),
                    Err(ureq::Error::Status(401, r)) if home && !answered => {
                        let challenge = r.header("www-authenticate").unwrap_or("").to_string();
                        self.authorize(&challenge)?;
                        answered = true;
                        continue 'again;
                    }
                    Err(e) => return Err(http_err(&url, e)),
                }
            }
            return Err(Error::Input(format!(
                "{}: more than {REDIRECTS_MAX} redirects",
                self.url
            )));
        }
    }

    fn basic(&self) -> Option<String> {
        self.credentials.as_ref().map(|c| {
            let raw = format!("{}:{}", c.username, c.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        })
    }

    /// Answers a 401's challenge: the authorization to send from now on.
    fn authorize(&self, challenge: &str) -> Result<()> {
        let refused = |why: String| Error::Input(format!("{}: {why}", self.url));
        let (scheme, params) = parse_challenge(challenge)
            .ok_or_else(|| refused(format!("401 with a challenge {challenge:?} not understood")))?;
        let auth = match scheme.as_str() {
            "basic" => self.basic().ok_or_else(|| {
                refused("the registry asks for credentials (Basic) and none are configured".into())
            })?,
            "bearer" => {
                let realm = params
                    .get("realm")
                    .ok_or_else(|| refused("a bearer challenge without a realm".into()))?;
                let secure = realm.starts_with("https://");
                if !secure && !realm.starts_with("http://") {
                    return Err(refused(format!(
                        "a token realm {realm:?} that is not http(s)"
                    )));
                }
                let mut query = Vec::new();
                if let Some(service) = params.get("service") {
                    query.push(format!("service={}", percent_encode(service)));
                }
                let scope = match params.get("scope") {
                    Some(s) => s.clone(),
                    None => scope_of(&self.url),
                };
                if !scope.is_empty() {
                    query.push(format!("scope={}", percent_encode(&scope)));
                }
                let url = if query.is_empty() {
                    realm.clone()
                } else {
                    format!(
                        "{realm}{}{}",
                        if realm.contains('?') { '&' } else { '?' },
                        query.join("&")
                    )
                };
                let mut req = self.agent.get(&url);
                // Credentials go to an https realm, or to an http one only
                // when the registry is plain http itself.
                if secure || self.url.starts_with("http://") {
                    if let Some(b) = self.basic() {
                        req = req.set("Authorization", &b);
                    }
                }
                let r = req.call().map_err(|e| match e {
                    ureq::Error::Status(code, _) => refused(format!(
                        "the token service {realm} answered {code} (wrong or missing credentials?)"
                    )),
                    e => http_err(realm, e),
                })?;
                let mut body = Vec::new();
                r.into_reader()
                    .take(TOKEN_ANSWER_MAX)
                    .read_to_end(&mut body)?;
                #[derive(serde::Deserialize)]
                struct Token {
                    #[serde(default)]
                    token: String,
                    #[serde(default)]
                    access_token: String,
                }
                let t: Token = serde_json::from_slice(&body)
                    .map_err(|e| refused(format!("the token service's answer: {e}")))?;
                let token = if t.token.is_empty() {
                    t.access_token
                } else {
                    t.token
                };
                if token.is_empty() || token.contains(['\r', '\n']) {
                    return Err(refused("the token service gave no token".into()));
                }
                format!("Bearer {token}")
            }
            other => return Err(refused(format!("401 asking for {other:?} authentication"))),
        };
        *self.authorization.lock().unwrap_or_else(|p| p.into_inner()) = Some(auth);
        Ok(())
    }

    /// Bytes `[start, end)`.
    fn range(&self, start: u64, end: u64) -> Result<Vec<u8>> {
        let r = self.send("GET", Some((start, end)))?;
        if r.status() != 206 {
            return Err(Error::Input(format!(
                "{}: a range was answered with {} (the registry must serve ranges)",
                self.url,
                r.status()
            )));
        }
        let want = end - start;
        let mut out = Vec::with_capacity(want as usize);
        r.into_reader().take(want + 1).read_to_end(&mut out)?;
        self.fetched.fetch_add(out.len() as u64, Ordering::Relaxed);
        if out.len() as u64 != want {
            return Err(Error::Input(format!(
                "{}: {} bytes for a range of {want}",
                self.url,
                out.len()
            )));
        }
        Ok(out)
    }
}

/// The pull scope of the repository a blob URL names
/// (`.../v2/NAME/blobs/...`).
fn scope_of(url: &str) -> String {
    let path = &url[origin(url).len()..];
    path.strip_prefix("/v2/")
        .and_then(|p| p.rsplit_once("/blobs/"))
        .map(|(name, _)| format!("repository:{name}:pull"))
        .unwrap_or_default()
}

/// `what` done with the first usable alternate that does it right, else
/// with the registry.
fn from_sources<T>(
    alternates: &[Tried],
    registry: &Blob,
    what: impl Fn(&Blob) -> Result<T>,
) -> Result<T> {
    for a in alternates.iter().filter(|a| a.usable()) {
        match what(&a.blob) {
            Ok(v) => return Ok(v),
            Err(e) => a.failed(&e.to_string()),
        }
    }
    what(registry)
}

/// The blob's size (a HEAD), footer and TOC (two ranges), the TOC checked
/// against `toc_digest`.
fn open_index(blob: &Blob, toc_digest: &str) -> Result<Index> {
    let url = &blob.url;
    let head = blob.send("HEAD", None)?;
    let size: u64 = head
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Input(format!("{url}: no Content-Length in the answer to HEAD")))?;
    let tail_len = size.min(FOOTER_SIZE as u64);
    let tail = blob.range(size - tail_len, size)?;
    let (toc_offset, footer_size) = parse_footer(&tail)?;
    let toc_end = size - footer_size as u64;
    if toc_offset >= toc_end {
        return Err(Error::Format(format!(
            "the footer puts the TOC at {toc_offset}, past its end {toc_end}"
        )));
    }
    // The TOC's gzip member is read whole: bounded as the TOC is (a
    // compressed TOC is smaller than the TOC).
    if toc_end - toc_offset > crate::estargz::MAX_TOC_BYTES {
        return Err(Error::Format(format!(
            "a TOC member of {} bytes (at most {} are read)",
            toc_end - toc_offset,
            crate::estargz::MAX_TOC_BYTES
        )));
    }
    let toc = blob.range(toc_offset, toc_end)?;
    let index = Index::from_toc_member(&toc[..], toc_offset, size)?;
    index.verify_toc(toc_digest)?;
    Ok(index)
}

impl RemoteLayer {
    /// Opens the layer: its footer and TOC, the TOC checked against
    /// `toc_digest`.
    pub fn open(url: &str, toc_digest: &str, timeout: Duration) -> Result<RemoteLayer> {
        RemoteLayer::open_with(url, toc_digest, timeout, &Access::default())
    }

    /// [`RemoteLayer::open`] with credentials or CA certificates.
    pub fn open_with(
        url: &str,
        toc_digest: &str,
        timeout: Duration,
        access: &Access,
    ) -> Result<RemoteLayer> {
        RemoteLayer::open_from(url, toc_digest, timeout, access, Vec::new())
    }

    /// [`RemoteLayer::open_with`] trying `alternates` first, in order.
    pub fn open_from(
        url: &str,
        toc_digest: &str,
        timeout: Duration,
        access: &Access,
        alternates: Vec<Alternate>,
    ) -> Result<RemoteLayer> {
        let blob = Blob::new(url, access, timeout)?;
        let alternates = alternates
            .into_iter()
            .map(|a| {
                Ok(Tried {
                    blob: Blob::new(&a.url, &a.access, a.timeout.min(timeout))?,
                    peers: a.peers,
                    down_until: Mutex::new(None),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let index = from_sources(&alternates, &blob, |b| open_index(b, toc_digest))?;
        Ok(RemoteLayer {
            blob,
            alternates,
            index,
        })
    }

    /// Bytes of the blob fetched so far (the footer and TOC included).
    pub fn fetched(&self) -> u64 {
        self.blob.fetched.load(Ordering::Relaxed)
            + self
                .alternates
                .iter()
                .map(|a| a.blob.fetched.load(Ordering::Relaxed))
                .sum::<u64>()
    }

    /// Of [`RemoteLayer::fetched`], the bytes a cooperative-pull peer
    /// sent.
    pub fn fetched_from_peer(&self) -> u64 {
        self.alternates
            .iter()
            .filter(|a| a.peers.is_some())
            .map(|a| a.blob.fetched.load(Ordering::Relaxed))
            .sum()
    }

    /// File `name`'s content (a hard link's target's): its chunks fetched
    /// with one range, each checked against its digest.
    pub fn read_file(&self, name: &str) -> Result<Vec<u8>> {
        let ix = &self.index;
        let named = *ix
            .by_name
            .get(&crate::estargz::clean_name(name))
            .ok_or_else(|| Error::Input(format!("the layer has no {name:?}")))?;
        let i = ix.regular(named).ok_or_else(|| {
            Error::Input(format!(
                "{name:?} is a {}, not a regular file",
                ix.entries[named].kind
            ))
        })?;
        let chunks: Vec<usize> = (0..ix.chunks.len())
            .filter(|&n| ix.chunks[n].entry == i)
            .collect();
        match (chunks.first(), chunks.last()) {
            (Some(&first), Some(&last)) => Ok(self.read_chunks(first, last)?.concat()),
            _ => Ok(Vec::new()),
        }
    }

    /// Chunks `first..=last` (consecutive in the blob) with one range,
    /// each checked against its digest: their contents.
    pub fn read_chunks(&self, first: usize, last: usize) -> Result<Vec<Vec<u8>>> {
        let ix = &self.index;
        if first > last || last >= ix.chunks.len() {
            return Err(Error::Input(format!(
                "chunks {first}..={last} of {}",
                ix.chunks.len()
            )));
        }
        let base = ix.chunks[first].start;
        from_sources(&self.alternates, &self.blob, |b| {
            let members = b.range(base, ix.chunks[last].end)?;
            let mut out = Vec::with_capacity(last - first + 1);
            for n in first..=last {
                let c = &ix.chunks[n];
                out.push(ix.read_chunk(
                    n,
                    &members[(c.start - base) as usize..(c.end - base) as usize],
                )?);
            }
            Ok(out)
        })
    }
}
