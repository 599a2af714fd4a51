//! Talking to upstream registries: HTTPS (the system's roots plus any CA
//! configured), the registry's authentication challenge answered with
//! this host's own credentials (Basic, or the bearer token flow of the
//! distribution spec: a token from the challenge's realm for the
//! repository's pull scope, cached until it expires), and redirects (a
//! registry commonly sends blob GETs to its storage).
//!
//! Credentials are sent only to the upstream's own origin and its token
//! realm, never to a redirect's target on another origin, never over
//! plain HTTP when the upstream is HTTPS, and never to a peer.

use crate::{Limited, Mirror};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, LOCATION, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Redirects followed at most per request.
const MAX_REDIRECTS: usize = 5;
/// The largest token answer read.
const TOKEN_MAX: usize = 64 << 10;
/// A token is used until this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);
/// How long a token lives when its answer does not say (the spec's 60 s).
const TOKEN_DEFAULT_LIFE: u64 = 60;

pub(crate) type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// An upstream registry.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// Its base URL, `http://host[:port]` or `https://host[:port]`.
    pub url: String,
    /// This host's credentials for it, if it needs any.
    pub credentials: Option<Credentials>,
}

impl Upstream {
    /// An upstream without credentials.
    pub fn plain(url: impl Into<String>) -> Upstream {
        Upstream {
            url: url.into(),
            credentials: None,
        }
    }
}

/// A username and password (or identity token).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            out,
            "Credentials {{ username: {:?}, password: <hidden> }}",
            self.username
        )
    }
}

impl Credentials {
    fn basic(&self) -> Option<HeaderValue> {
        let raw = format!("{}:{}", self.username, self.password);
        let mut v = HeaderValue::from_str(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        ))
        .ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}

/// The HTTP(S) client: the system's trusted roots plus the PEM
/// certificates given.
pub(crate) fn client(extra_roots: &[Vec<u8>]) -> io::Result<HttpClient> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(extra_roots)?)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// TLS for a registry client (the lazy mount's too): the system's
/// trusted roots plus the PEM certificates given.
pub fn tls_config(extra_roots: &[Vec<u8>]) -> io::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        log::warn!("mirror: loading the system's trusted certificates: {e}");
    }
    roots.add_parsable_certificates(native.certs);
    for pem in extra_roots {
        let mut any = false;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("a CA certificate: {e}"))
            })?;
            roots.add(cert).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("a CA certificate: {e}"))
            })?;
            any = true;
        }
        if !any {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a CA file holds no PEM certificate",
            ));
        }
    }
    // ring, not aws-lc-rs: no C toolchain beyond cc, and it builds under
    // the fuzzers' sanitizers. rustls marks it deprecated for lacking
    // post-quantum key exchange (docs/mirror.md says so).
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tls)
}

/// Authorizations obtained, by upstream and scope, with their expiry.
pub(crate) type AuthCache = BTreeMap<(String, String), (HeaderValue, Option<Instant>)>;

impl Mirror {
    /// One request, with a time limit for the answer's head.
    pub(crate) async fn send(
        &self,
        url: &str,
        method: &Method,
        headers: &[(HeaderName, HeaderValue)],
        timeout: Duration,
    ) -> Result<Response<Incoming>, String> {
        let mut req = Request::builder().method(method.clone()).uri(url);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let req = req.body(Empty::new()).map_err(|e| format!("{url}: {e}"))?;
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Err(_) => Err(format!("no answer from {url} in {timeout:?}")),
            Ok(Err(e)) => Err(format!("{url}: {}", error_chain(&e))),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// A request to the upstream `key`: its challenge answered once,
    /// redirects followed.
    pub(crate) async fn fetch_upstream(
        &self,
        key: &str,
        url: &str,
        method: Method,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<Response<Incoming>, String> {
        let upstream = self
            .config
            .upstreams
            .get(key)
            .ok_or_else(|| format!("no upstream {key:?}"))?;
        let timeout = self.config.upstream_timeout;
        let home =
            origin(&upstream.url).ok_or_else(|| format!("{:?} is not a URL", upstream.url))?;
        let scope = pull_scope(url);
        let mut url = url.to_string();
        let mut challenged = false;
        for _ in 0..=MAX_REDIRECTS {
            let at_home = origin(&url).as_ref() == Some(&home);
            let mut h = headers.to_vec();
            if at_home {
                if let Some(a) = self.cached_auth(key, &scope) {
                    h.push((AUTHORIZATION, a));
                }
            }
            let r = self.send(&url, &method, &h, timeout).await?;
            let status = r.status();
            if status == StatusCode::UNAUTHORIZED && at_home && !challenged {
                challenged = true;
                let challenge = r
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let auth = self
                    .authorize(upstream, &challenge, &scope)
                    .await
                    .map_err(|e| format!("{url} asks for authorization: {e}"))?;
                self.auth
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((key.to_string(), scope.clone()), auth);
                continue;
            }
            if status.is_redirection() {
                if let Some(next) = r
                    .headers()
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|l| resolve(&url, l))
                {
                    if home.starts_with("https:") && next.starts_with("http:") {
                        return Err(format!("{url} redirects from HTTPS to {next}"));
                    }
                    url = next;
                    continue;
                }
            }
            return Ok(r);
        }
        Err(format!("{url}: more than {MAX_REDIRECTS} redirects"))
    }

    fn cached_auth(&self, key: &str, scope: &str) -> Option<HeaderValue> {
        let mut auth = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        let k = (key.to_string(), scope.to_string());
        match auth.get(&k) {
            Some((_, Some(until))) if Instant::now() >= *until => {
                auth.remove(&k);
                None
            }
            Some((v, _)) => Some(v.clone()),
            None => None,
        }
    }

    /// The Authorization answering `challenge`, and until when it holds.
    async fn authorize(
        &self,
        upstream: &Upstream,
        challenge: &str,
        scope: &str,
    ) -> Result<(HeaderValue, Option<Instant>), String> {
        let (scheme, params) = parse_challenge(challenge)
            .ok_or_else(|| format!("a challenge lcfs cannot read: {challenge:?}"))?;
        let basic = || upstream.credentials.as_ref().and_then(Credentials::basic);
        match scheme.as_str() {
            "basic" => match basic() {
                Some(b) => Ok((b, None)),
                None => {
                    Err("a username and password, and none is configured for this upstream".into())
                }
            },
            "bearer" => {
                let realm = params
                    .get("realm")
                    .ok_or("a bearer challenge without a realm")?;
                if !(realm.starts_with("https://") || realm.starts_with("http://")) {
                    return Err(format!(
                        "a token realm that is not an HTTP(S) URL: {realm:?}"
                    ));
                }
                let mut query = Vec::new();
                if let Some(s) = params.get("service") {
                    query.push(format!("service={}", percent_encode(s)));
                }
                let scope = params.get("scope").map(String::as_str).unwrap_or(scope);
                if !scope.is_empty() {
                    query.push(format!("scope={}", percent_encode(scope)));
                }
                let sep = if realm.contains('?') { '&' } else { '?' };
                let token_url = if query.is_empty() {
                    realm.clone()
                } else {
                    format!("{realm}{sep}{}", query.join("&"))
                };
                let mut headers = Vec::new();
                if let Some(b) = basic() {
                    if upstream.url.starts_with("https:") && !token_url.starts_with("https:") {
                        return Err(format!(
                            "the token realm {realm} is not HTTPS: the credentials are not sent there"
                        ));
                    }
                    headers.push((AUTHORIZATION, b));
                }
                let r = self
                    .send(
                        &token_url,
                        &Method::GET,
                        &headers,
                        self.config.upstream_timeout,
                    )
                    .await?;
                let status = r.status();
                if status != StatusCode::OK {
                    return Err(format!("the token realm {realm} answered {status}"));
                }
                let body = Limited::collect(r.into_body(), TOKEN_MAX)
                    .await
                    .map_err(|e| format!("the token realm's answer: {e}"))?;
                let answer: TokenAnswer = serde_json::from_slice(&body)
                    .map_err(|e| format!("the token realm's answer is not a token: {e}"))?;
                let token = answer
                    .token
                    .or(answer.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or("the token realm's answer holds no token")?;
                let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| "the token realm's token is not a header value")?;
                v.set_sensitive(true);
                let life = Duration::from_secs(answer.expires_in.unwrap_or(TOKEN_DEFAULT_LIFE));
                Ok((v, Some(Instant::now() + life.saturating_sub(TOKEN_MARGIN))))
            }
            other => Err(format!("the scheme {other:?}, which lcfs does not speak")),
        }
    }
}

#[derive(serde::Deserialize)]
struct TokenAnswer {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// `scheme://authority` of an absolute URL.
fn origin(url: &str) -> Option<String> {
    let u: Uri = url.parse().ok()?;
    Some(format!("{}://{}", u.scheme_str()?, u.authority()?).to_ascii_lowercase())
}

/// A redirect's target: absolute, or a path on the same origin.
fn resolve(from: &str, location: &str) -> Option<String> {
    if location.starts_with("https://") || location.starts_with("http://") {
        return location.parse::<Uri>().ok().map(|_| location.to_string());
    }
    if location.starts_with('/') && !location.starts_with("//") {
        return Some(format!("{}{location}", origin(from)?));
    }
    None
}

/// `repository:NAME:pull` for a URL of `/v2/NAME/blobs/...` or
/// `/v2/NAME/manifests/...`; empty for others.
fn pull_scope(url: &str) -> String {
    let path = url
        .parse::<Uri>()
        .map(|u| u.path().to_string())
        .unwrap_or_default();
    let name = path.strip_prefix("/v2/").and_then(|rest| {
        ["/blobs/", "/manifests/"]
            .iter()
            .find_map(|k| rest.rsplit_once(k).map(|(n, _)| n.to_string()))
    });
    name.map(|n| format!("repository:{n}:pull"))
        .unwrap_or_default()
}

/// `Scheme k="v", k2=v2` (RFC 7235, one challenge): the scheme in lower
/// case and its parameters.
pub fn parse_challenge(s: &str) -> Option<(String, BTreeMap<String, String>)> {
    let s = s.trim();
    let (scheme, mut rest) = match s.split_once(' ') {
        Some((a, b)) => (a, b.trim_start()),
        None => (s, ""),
    };
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return None;
    }
    let mut params = BTreeMap::new();
    while !rest.is_empty() {
        let (k, after) = rest.split_once('=')?;
        let k = k.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => v.push(chars.next()?.1),
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => v.push(c),
                }
            }
            (v, &q[end?..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.insert(k, v);
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some((scheme.to_ascii_lowercase(), params))
}

/// `s` as a URL query value: every byte but RFC 3986's unreserved ones
/// percent-encoded.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An error and its causes, one line (hyper's client errors say little
/// on their own).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_read_as_registries_send_them() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        )
        .unwrap();
        assert_eq!(s, "bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(
            (s.as_str(), p["realm"].as_str()),
            ("basic", "Registry Realm")
        );
        let (_, p) = parse_challenge(r#"Bearer realm=x, error="a \"q\"""#).unwrap();
        assert_eq!((p["realm"].as_str(), p["error"].as_str()), ("x", "a \"q\""));
        for bad in ["", "Bearer realm=\"open", "Be arer", "Bearer =x"] {
            assert!(
                parse_challenge(bad).is_none_or(|(_, p)| !p.contains_key("realm")),
                "{bad}"
            );
        }
    }

    #[test]
    fn scopes_redirects_and_origins() {
        assert_eq!(
            pull_scope("https://r.example/v2/lib/app/blobs/sha256:ab"),
            "repository:lib/app:pull"
        );
        assert_eq!(pull_scope("https://r.example/v2/"), "");
        assert_eq!(
            resolve("https://r.example:5000/v2/a/blobs/x", "/storage/x?sig=1").as_deref(),
            Some("https://r.example:5000/storage/x?sig=1")
        );
        assert_eq!(
            resolve("https://r.example/v2/", "https://cdn.example/x").as_deref(),
            Some("https://cdn.example/x")
        );
        assert_eq!(resolve("https://r.example/v2/", "//evil/x"), None);
        assert_eq!(resolve("https://r.example/v2/", "relative"), None);
        assert_eq!(
            origin("HTTPS://R.example:443/x").unwrap(),
            "https://r.example:443"
        );
        assert_eq!(
            percent_encode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
        let c = Credentials {
            username: "u".into(),
            password: "secret".into(),
        };
        assert!(!format!("{c:?}").contains("secret"));
        assert_eq!(c.basic().unwrap().to_str().unwrap(), "Basic dTpzZWNyZXQ=");
    }
}
