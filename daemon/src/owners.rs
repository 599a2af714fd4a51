//! The owners of images, for per-image statistics: lcfs knows layers, and
//! dockerd (through the graphdriver plugin) or containerd (through the
//! snapshotter) knows which layer is the top of which image.
//!
//! Enrichment only, never a dependency: callers log a failure as a warning
//! and go on without image names. Everything read from the owners is
//! bounded (answer sizes, image counts, name lengths, time).
//!
//! Docker: a small HTTP/1.0 client on dockerd's unix socket lists the
//! images (`GET /images/json`) and inspects each new one
//! (`GET /images/{id}/json`): for an image whose top layer lcfs's plugin
//! holds, dockerd answers the plugin's GetMetadata map as
//! `GraphDriver.Data`, whose `Layer` is the lcfs layer name (see
//! lcfs-dockerplugin's driver.rs). Image ids are content addressed, so the
//! id to layer mapping is cached for as long as the image is listed.
//!
//! containerd: lcfs-snapshotter's `image_layers` (its images.rs).
//!
//! For the image garbage collector: [`docker_containers`] lists every
//! container with its image and read-write layer, whole or not at all
//! (a partial list would make images look unused), and
//! [`docker_remove_image`] asks dockerd to remove an image without force,
//! telling removed, already gone and in use (409) apart.

// Called by the statistics (REST and command line) once they show images;
// until then (and in the tests) parts are unused.

use lcfs_lazy::time::unix_seconds;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where dockerd serves its API unless told otherwise.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// Each read or write on dockerd's socket.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// One request from connect to the last byte of the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A removal of an image: dockerd answers once it has removed the image's
/// now-unused layers through the graphdriver, which may take a while for
/// a large image.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(120);
/// Inspections of new images in one call; those left are looked at by the
/// next call (the cache keeps what was learnt).
const INSPECT_BUDGET: Duration = Duration::from_secs(30);
/// The largest answer read (the image list of a large host is a few MiB).
const RESPONSE_MAX_BYTES: usize = 16 << 20;
/// The status line and headers together.
const HEAD_MAX_BYTES: usize = 64 << 10;
const HEADERS_MAX: usize = 128;
/// A chunk-size line of a chunked body, or a trailer line.
const CHUNK_LINE_MAX_BYTES: usize = 1024;
/// Images looked at per call.
const IMAGES_MAX: usize = 10_000;
/// Containers per call: a host with more gets an error, not a partial list.
const CONTAINERS_MAX: usize = 10_000;
/// The inspections of all containers of one call (a few ms each).
const CONTAINERS_BUDGET: Duration = Duration::from_secs(60);
/// Image names (tags, digests) longer than this are not used.
const NAME_MAX_BYTES: usize = 512;
/// Image ids (`sha256:` and 64 hex digits) and lcfs layer names.
const ID_MAX_BYTES: usize = 256;
/// Bytes of an error answer's body kept for the message.
const EXCERPT_MAX_CHARS: usize = 200;

#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    /// The answer is not HTTP as this client reads it.
    #[error("bad HTTP answer: {0}")]
    Http(String),
    #[error("answer over {limit_bytes} bytes")]
    TooLarge { limit_bytes: usize },
    /// A status other than 2xx.
    #[error("{path}: HTTP {status}: {excerpt}")]
    Status {
        path: String,
        status: u16,
        excerpt: String,
    },
    #[error("{path}: unexpected JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{0}")]
    Containerd(lcfs_snapshotter::Error),
    /// An image or container id that is not one dockerd makes.
    #[error("bad id {0:?}")]
    InvalidId(String),
    /// What was asked for could not be learnt whole.
    #[error("incomplete: {0}")]
    Incomplete(String),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> OwnerError {
    let context = context.into();
    move |source| OwnerError::Io { context, source }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Docker,
    Containerd,
}

impl Owner {
    pub fn as_str(self) -> &'static str {
        match self {
            Owner::Docker => "docker",
            Owner::Containerd => "containerd",
        }
    }
}

/// An image and the lcfs layer of its top layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerImage {
    pub owner: Owner,
    /// containerd's namespace; None for Docker.
    pub namespace: Option<String>,
    /// Docker: the first tag ("busybox:latest"), else the first digest
    /// reference, else the short id. containerd: the image's name.
    pub name: String,
    /// Docker's image id ("sha256:..."); containerd's target digest.
    pub id: String,
    /// The lcfs layer name of the image's top layer.
    pub top_layer: String,
    /// Docker: every tag and digest reference of the image (a tag of a
    /// repository elsewhere keeps an image by a `keep` pattern, and each is
    /// removed before an image tagged in several repositories goes).
    /// containerd: empty (each name is an image record of its own).
    pub references: Vec<String>,
    /// When the image was created, unix seconds, when known (Docker: the
    /// image config's time; containerd: when the image record was made).
    pub created: Option<i64>,
}

/// What [`docker_images`] learnt of image ids: the lcfs layer of each
/// one's top layer, or None for images of another driver. Kept between
/// calls; entries of images no longer listed are dropped.
#[derive(Debug, Default)]
pub struct DockerCache {
    tops: HashMap<String, Option<String>>,
}

#[cfg(test)]
impl DockerCache {
    pub fn len(&self) -> usize {
        self.tops.len()
    }
}

/// A status and a body.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    body: Vec<u8>,
}

/// A reader that fails with TimedOut once `deadline` has passed (each read
/// is also bounded by the socket's read timeout).
struct Deadline<R> {
    inner: R,
    deadline: Instant,
}

impl<R: Read> Read for Deadline<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if Instant::now() >= self.deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the answer took too long",
            ));
        }
        self.inner.read(buf)
    }
}

/// One line (up to `\n`) of at most `max` bytes besides its line end
/// (`\r\n` or `\n`), without it.
/// None at EOF before any byte.
fn read_line<R: BufRead>(reader: &mut R, max: usize) -> Result<Option<Vec<u8>>, OwnerError> {
    let mut line = Vec::new();
    reader
        .take(max as u64 + 2)
        .read_until(b'\n', &mut line)
        .map_err(io_error("reading the answer"))?;
    if line.is_empty() {
        return Ok(None);
    }
    let ended = line.last() == Some(&b'\n');
    if ended {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    if line.len() > max {
        return Err(OwnerError::Http(format!("a line over {max} bytes")));
    }
    if !ended {
        return Err(OwnerError::Http("the answer ends inside a line".into()));
    }
    Ok(Some(line))
}

/// Reads an HTTP/1.x answer: the body by Content-Length, chunked
/// transfer-encoding, or up to EOF; at most `limit` body bytes.
fn read_response<R: Read>(reader: R, limit: usize) -> Result<Response, OwnerError> {
    let mut reader = BufReader::new(reader);
    let mut head_left = HEAD_MAX_BYTES;
    let mut head_line = |reader: &mut BufReader<R>| -> Result<Vec<u8>, OwnerError> {
        let line = read_line(reader, head_left)?
            .ok_or_else(|| OwnerError::Http("the answer ends in its head".into()))?;
        head_left = head_left.saturating_sub(line.len() + 2);
        Ok(line)
    };
    let status_line = head_line(&mut reader)?;
    let status_line = String::from_utf8_lossy(&status_line).into_owned();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(OwnerError::Http(format!(
            "status line {:?}",
            clip(&status_line, 64)
        )));
    }
    let status: u16 = code
        .parse()
        .map_err(|_| OwnerError::Http(format!("status {:?}", clip(code, 8))))?;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut other_encoding = false;
    let mut headers = 0;
    loop {
        let line = head_line(&mut reader)?;
        if line.is_empty() {
            break;
        }
        headers += 1;
        if headers > HEADERS_MAX {
            return Err(OwnerError::Http(format!("over {HEADERS_MAX} headers")));
        }
        let line = String::from_utf8_lossy(&line);
        let Some((name, value)) = line.split_once(':') else {
            return Err(OwnerError::Http(format!("header {:?}", clip(&line, 64))));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value
                .parse()
                .map_err(|_| OwnerError::Http(format!("Content-Length {:?}", clip(value, 32))))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(OwnerError::Http("two different Content-Length".into()));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value.rsplit(',').next().unwrap_or("").trim();
            chunked = last.eq_ignore_ascii_case("chunked");
            other_encoding = !chunked;
        }
    }
    // No body: 1xx, 204, 304.
    if status < 200 || status == 204 || status == 304 {
        return Ok(Response {
            status,
            body: Vec::new(),
        });
    }
    let too_large = OwnerError::TooLarge { limit_bytes: limit };
    let mut body = Vec::new();
    if chunked {
        loop {
            let line = read_line(&mut reader, CHUNK_LINE_MAX_BYTES)?
                .ok_or_else(|| OwnerError::Http("the answer ends before its last chunk".into()))?;
            let line = String::from_utf8_lossy(&line);
            let size = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size, 16)
                .map_err(|_| OwnerError::Http(format!("chunk size {:?}", clip(size, 32))))?;
            if size == 0 {
                // Trailers, up to an empty line (or EOF), bounded.
                for _ in 0..=HEADERS_MAX {
                    match read_line(&mut reader, CHUNK_LINE_MAX_BYTES)? {
                        Some(l) if !l.is_empty() => continue,
                        _ => return Ok(Response { status, body }),
                    }
                }
                return Err(OwnerError::Http(format!("over {HEADERS_MAX} trailers")));
            }
            if size > (limit - body.len()) as u64 {
                return Err(too_large);
            }
            read_exact_into(&mut reader, size, &mut body)?;
            match read_line(&mut reader, 0)? {
                Some(l) if l.is_empty() => {}
                _ => return Err(OwnerError::Http("no line end after a chunk".into())),
            }
        }
    }
    match content_length {
        Some(n) if !other_encoding => {
            if n > limit as u64 {
                return Err(too_large);
            }
            read_exact_into(&mut reader, n, &mut body)?;
        }
        _ => {
            reader
                .take(limit as u64 + 1)
                .read_to_end(&mut body)
                .map_err(io_error("reading the answer"))?;
            if body.len() > limit {
                return Err(too_large);
            }
        }
    }
    Ok(Response { status, body })
}

/// Appends exactly `n` bytes from `reader` to `body`.
fn read_exact_into<R: Read>(reader: &mut R, n: u64, body: &mut Vec<u8>) -> Result<(), OwnerError> {
    let before = body.len();
    reader
        .take(n)
        .read_to_end(body)
        .map_err(io_error("reading the answer"))?;
    if ((body.len() - before) as u64) < n {
        return Err(OwnerError::Http(format!(
            "the answer ends after {} of {n} body bytes",
            body.len() - before
        )));
    }
    Ok(())
}

/// At most `max` characters of something from outside, for messages.
fn clip(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// The methods this client sends, each with its time limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Get,
    Delete,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Delete => "DELETE",
        }
    }

    /// Each read or write on the socket.
    fn io_timeout(self) -> Duration {
        match self {
            Method::Get => IO_TIMEOUT,
            // dockerd answers once the image and its layers are removed.
            Method::Delete => REMOVE_TIMEOUT,
        }
    }

    /// From connect to the last byte of the answer.
    fn request_timeout(self) -> Duration {
        match self {
            Method::Get => REQUEST_TIMEOUT,
            Method::Delete => REMOVE_TIMEOUT,
        }
    }
}

/// Sends `method path` to the HTTP server on the unix socket `socket`; its
/// answer, whatever its status.
fn request(socket: &Path, method: Method, path: &str) -> Result<Response, OwnerError> {
    let started = Instant::now();
    let at = || format!("{} {} {path}", socket.display(), method.as_str());
    let mut stream = UnixStream::connect(socket)
        .map_err(io_error(format!("connecting to {}", socket.display())))?;
    stream
        .set_read_timeout(Some(method.io_timeout()))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(io_error(at()))?;
    let request = format!(
        "{} {path} HTTP/1.0\r\nHost: docker\r\nConnection: close\r\nAccept: application/json\r\n\r\n",
        method.as_str()
    );
    stream
        .write_all(request.as_bytes())
        .map_err(io_error(at()))?;
    let reader = Deadline {
        inner: stream,
        deadline: started + method.request_timeout(),
    };
    read_response(reader, RESPONSE_MAX_BYTES)
}

/// The error for an answer of status `response.status` to `path`.
fn status_error(path: &str, response: &Response) -> OwnerError {
    let text = String::from_utf8_lossy(&response.body);
    OwnerError::Status {
        path: path.to_string(),
        status: response.status,
        excerpt: clip(text.trim(), EXCERPT_MAX_CHARS),
    }
}

/// GET `path` from the HTTP server on the unix socket `socket`; the body of
/// a 2xx answer.
fn get(socket: &Path, path: &str) -> Result<Vec<u8>, OwnerError> {
    let response = request(socket, Method::Get, path)?;
    if !(200..300).contains(&response.status) {
        return Err(status_error(path, &response));
    }
    Ok(response.body)
}

fn get_json<T: for<'a> Deserialize<'a>>(socket: &Path, path: &str) -> Result<T, OwnerError> {
    let body = get(socket, path)?;
    serde_json::from_slice(&body).map_err(|source| OwnerError::Json {
        path: path.to_string(),
        source,
    })
}

/// An entry of `GET /images/json` (the fields read).
#[derive(Deserialize)]
struct ListedImage {
    #[serde(rename = "Id")]
    id: String,
    // null for untagged images in some API versions, `<none>:<none>` in
    // older ones.
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "RepoDigests", default)]
    repo_digests: Option<Vec<String>>,
    #[serde(rename = "Created", default)]
    created: Option<i64>,
}

/// `GET /images/{id}/json` (the fields read).
#[derive(Deserialize)]
struct InspectedImage {
    #[serde(rename = "GraphDriver", default)]
    graph_driver: Option<GraphDriver>,
}

#[derive(Deserialize)]
struct GraphDriver {
    #[serde(rename = "Data", default)]
    data: Option<HashMap<String, serde_json::Value>>,
}

/// Image ids as dockerd makes them (`sha256:<hex>`): safe in a path.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= ID_MAX_BYTES
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b':')
}

/// The name an image is shown by: the first tag, else the first digest
/// reference, else the short id.
fn image_name(image: &ListedImage) -> String {
    let usable = |s: &&String| {
        !s.is_empty() && s.len() <= NAME_MAX_BYTES && !s.starts_with("<none>") && !s.contains('\n')
    };
    let first = |list: &Option<Vec<String>>| list.iter().flatten().find(usable).cloned();
    first(&image.repo_tags)
        .or_else(|| first(&image.repo_digests))
        .unwrap_or_else(|| {
            let hex = image
                .id
                .split_once(':')
                .map_or(image.id.as_str(), |(_, h)| h);
            hex.chars().take(12).collect()
        })
}

/// Every tag, then every digest reference, of a listed image that is a
/// reference dockerd could have made: at most [`REFERENCES_MAX`].
fn image_references(image: &ListedImage) -> Vec<String> {
    image
        .repo_tags
        .iter()
        .flatten()
        .chain(image.repo_digests.iter().flatten())
        .filter(|r| valid_reference(r))
        .take(REFERENCES_MAX)
        .cloned()
        .collect()
}

/// The most references of one image looked at.
const REFERENCES_MAX: usize = 64;

/// A reference as dockerd spells one (`registry:5000/repo/name:tag`,
/// `name@sha256:...`), safe to put in a request path as it is.
fn valid_reference(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= NAME_MAX_BYTES
        && !r.starts_with("<none>")
        && !r.starts_with('/')
        && !r.contains("..")
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
}

/// The lcfs layer `GraphDriver.Data.Layer` names (what lcfs's plugin
/// answers to GetMetadata); None for another driver.
fn lcfs_layer(graph_driver: Option<GraphDriver>) -> Option<String> {
    graph_driver
        .and_then(|g| g.data)
        .and_then(|mut d| d.remove("Layer"))
        .and_then(|v| v.as_str().map(str::to_string))
        .filter(|l| !l.is_empty() && l.len() <= ID_MAX_BYTES)
}

/// The lcfs layer of image `id`'s top layer (None for another driver), and
/// whether the answer may be kept: an image without driver data (dockerd
/// answers so while it cannot reach the plugin, after a restart of either)
/// is asked again next time.
fn inspect_top(socket: &Path, id: &str) -> Result<(Option<String>, bool), OwnerError> {
    let image: InspectedImage = get_json(socket, &format!("/images/{id}/json"))?;
    let has_data = image
        .graph_driver
        .as_ref()
        .and_then(|g| g.data.as_ref())
        .is_some_and(|d| !d.is_empty());
    let layer = lcfs_layer(image.graph_driver);
    let keep = layer.is_some() || has_data;
    Ok((layer, keep))
}

/// dockerd's images (at most 10,000) whose top layer is an lcfs layer, from
/// its API on `socket`. `cache` keeps each image id's top layer between
/// calls; new images are inspected (for at most about 30 s a call; the
/// rest wait for the next call). Blocking: from async code, run it in a
/// blocking thread.
pub fn docker_images(
    socket: &Path,
    cache: &mut DockerCache,
) -> Result<Vec<OwnerImage>, OwnerError> {
    let mut listed: Vec<ListedImage> = get_json(socket, "/images/json")?;
    if listed.len() > IMAGES_MAX {
        log::warn!(
            "dockerd lists {} images; only the first {IMAGES_MAX} are looked at",
            listed.len()
        );
        listed.truncate(IMAGES_MAX);
    }
    listed.retain(|i| valid_id(&i.id));
    let ids: HashSet<&str> = listed.iter().map(|i| i.id.as_str()).collect();
    cache.tops.retain(|id, _| ids.contains(id.as_str()));
    let deadline = Instant::now() + INSPECT_BUDGET;
    let mut postponed = 0usize;
    let mut images = Vec::new();
    for image in &listed {
        let top = match cache.tops.get(&image.id) {
            Some(top) => top.clone(),
            None if Instant::now() >= deadline => {
                postponed += 1;
                continue;
            }
            None => match inspect_top(socket, &image.id) {
                Ok((top, keep)) => {
                    if keep {
                        cache.tops.insert(image.id.clone(), top.clone());
                    }
                    top
                }
                // Removed since the list.
                Err(OwnerError::Status { status: 404, .. }) => continue,
                Err(e) => {
                    log::warn!("inspecting docker image {}: {e}", image.id);
                    continue;
                }
            },
        };
        let Some(top_layer) = top else {
            continue;
        };
        images.push(OwnerImage {
            owner: Owner::Docker,
            namespace: None,
            name: image_name(image),
            id: image.id.clone(),
            top_layer,
            references: image_references(image),
            created: image.created,
        });
    }
    if postponed > 0 {
        log::info!("{postponed} new docker image(s) left for the next look (out of time)");
    }
    Ok(images)
}

/// What became of an image [`docker_remove_image`] was asked to remove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removal {
    /// dockerd removed it, and with it its layers no other image uses.
    Removed,
    /// dockerd does not have it (removed meanwhile).
    Gone,
    /// dockerd refused (409): a container, running or stopped, uses it, or
    /// it is tagged in several repositories. dockerd's message, clipped.
    InUse(String),
}

/// The `message` of dockerd's JSON error body, else the body's text;
/// clipped.
fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        message: String,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => clip(e.message.trim(), EXCERPT_MAX_CHARS),
        Err(_) => clip(String::from_utf8_lossy(body).trim(), EXCERPT_MAX_CHARS),
    }
}

/// Asks dockerd (its API on `socket`) to remove the image `id`, without
/// force: dockerd refuses while a container uses it, and otherwise removes
/// it with the layers no other image uses (through lcfs's graphdriver). An
/// image several repositories name goes by its `references` one by one.
/// Blocking, for up to about 120 s per request: from async code, run it in
/// a blocking thread.
pub fn docker_remove_image(
    socket: &Path,
    id: &str,
    references: &[String],
) -> Result<Removal, OwnerError> {
    if !valid_id(id) {
        return Err(OwnerError::InvalidId(clip(id, 80)));
    }
    let removal = delete_image(socket, id)?;
    let Removal::InUse(why) = &removal else {
        return Ok(removal);
    };
    // Tagged in several repositories (dockerd asks for force before it
    // checks the containers): when no container, running or stopped, uses
    // the image, each reference is removed in turn (dockerd refuses the
    // last one while a container uses the image), then the image.
    if !why.contains("multiple repositories") || references.is_empty() {
        return Ok(removal);
    }
    let listed: Vec<ListedContainer> = get_json(socket, "/containers/json?all=1")?;
    if listed.iter().any(|c| c.image_id == id) {
        return Ok(removal);
    }
    for r in references.iter().filter(|r| valid_reference(r)) {
        if let refused @ Removal::InUse(_) = delete_image(socket, r)? {
            return Ok(refused);
        }
    }
    // Gone with its last reference, or removed now.
    match delete_image(socket, id)? {
        Removal::Gone => Ok(Removal::Removed),
        other => Ok(other),
    }
}

/// `DELETE /images/{what}`: an image id or one of its references.
fn delete_image(socket: &Path, what: &str) -> Result<Removal, OwnerError> {
    // force=false spelled out: dockerd's default, and the one thing this
    // call must never do.
    let path = format!("/images/{what}?force=false");
    let response = request(socket, Method::Delete, &path)?;
    match response.status {
        200..=299 => Ok(Removal::Removed),
        404 => Ok(Removal::Gone),
        409 => Ok(Removal::InUse(error_message(&response.body))),
        _ => Err(status_error(&path, &response)),
    }
}

/// A container of dockerd's, running or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerContainer {
    pub id: String,
    /// The id of its image ("sha256:...").
    pub image_id: String,
    /// dockerd's `State.Running`: true while it runs, also when paused or
    /// restarting.
    pub running: bool,
    /// The lcfs layer of its read-write layer; None for another driver.
    pub layer: Option<String>,
    /// When it was last started, unix seconds; None if it never was.
    pub started_at: Option<i64>,
}

/// An entry of `GET /containers/json?all=1` (the fields read).
#[derive(Deserialize)]
struct ListedContainer {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "ImageID", default)]
    image_id: String,
    /// "running", "paused", "exited", ...: used when inspection says
    /// nothing of it.
    #[serde(rename = "State", default)]
    state: String,
}

/// `GET /containers/{id}/json` (the fields read).
#[derive(Deserialize)]
struct InspectedContainer {
    /// The image id.
    #[serde(rename = "Image", default)]
    image: String,
    #[serde(rename = "State", default)]
    state: Option<ContainerState>,
    #[serde(rename = "GraphDriver", default)]
    graph_driver: Option<GraphDriver>,
}

#[derive(Deserialize)]
struct ContainerState {
    #[serde(rename = "Running", default)]
    running: Option<bool>,
    #[serde(rename = "StartedAt", default)]
    started_at: Option<String>,
}

/// dockerd's containers (all of them, running or not, at most 10,000),
/// from its API on `socket`, each inspected for its read-write layer and
/// when it last started. A container removed between the list and its
/// inspection is left out; any other failure, more containers than the
/// bound, or inspections over about 60 s fail the whole call: a partial
/// list would make a container's image and layer look unused. Containers
/// created after the list are not in it. Blocking: from async code, run
/// it in a blocking thread.
pub fn docker_containers(socket: &Path) -> Result<Vec<OwnerContainer>, OwnerError> {
    let listed: Vec<ListedContainer> = get_json(socket, "/containers/json?all=1")?;
    if listed.len() > CONTAINERS_MAX {
        return Err(OwnerError::Incomplete(format!(
            "dockerd lists {} containers, over the {CONTAINERS_MAX} looked at",
            listed.len()
        )));
    }
    let deadline = Instant::now() + CONTAINERS_BUDGET;
    let mut containers = Vec::with_capacity(listed.len());
    for (done, container) in listed.into_iter().enumerate() {
        if !valid_id(&container.id) {
            return Err(OwnerError::InvalidId(clip(&container.id, 80)));
        }
        if Instant::now() >= deadline {
            return Err(OwnerError::Incomplete(format!(
                "{done} containers inspected in {} s; the rest were not",
                CONTAINERS_BUDGET.as_secs()
            )));
        }
        let path = format!("/containers/{}/json", container.id);
        let inspected: InspectedContainer = match get_json(socket, &path) {
            Ok(i) => i,
            // Removed since the list: its layer went with it.
            Err(OwnerError::Status { status: 404, .. }) => continue,
            Err(e) => return Err(e),
        };
        let state = inspected.state;
        let listed_running = matches!(
            container.state.as_str(),
            "running" | "paused" | "restarting"
        );
        let running = state
            .as_ref()
            .and_then(|s| s.running)
            .unwrap_or(listed_running);
        let started_at = state
            .and_then(|s| s.started_at)
            .as_deref()
            .and_then(unix_seconds);
        let image_id = if container.image_id.is_empty() {
            inspected.image
        } else {
            container.image_id
        };
        containers.push(OwnerContainer {
            id: container.id,
            image_id,
            running,
            layer: lcfs_layer(inspected.graph_driver),
            started_at,
        });
    }
    Ok(containers)
}

/// containerd's images (of `namespaces`, every namespace when empty) whose
/// top snapshot is an lcfs layer of `table`, from containerd at `address`.
pub async fn containerd_images(
    table: Arc<lcfs_snapshotter::Table>,
    address: &Path,
    namespaces: &[String],
) -> Result<Vec<OwnerImage>, OwnerError> {
    let layers = lcfs_snapshotter::image_layers(table, address, namespaces)
        .await
        .map_err(OwnerError::Containerd)?;
    Ok(layers
        .into_iter()
        .map(|l| OwnerImage {
            owner: Owner::Containerd,
            namespace: Some(l.image.namespace),
            name: l.image.name,
            id: l.image.target_digest,
            top_layer: l.layer,
            references: Vec::new(),
            created: l.image.created,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::Mutex;

    fn parse(raw: &[u8]) -> Result<Response, OwnerError> {
        read_response(raw, 64)
    }

    #[test]
    fn bodies_by_length_chunks_and_eof() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA").unwrap();
        assert_eq!(
            r,
            Response {
                status: 200,
                body: b"hello".to_vec()
            }
        );
        let r = parse(
            b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n\
              3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            r,
            Response {
                status: 201,
                body: b"abc0123456789".to_vec()
            }
        );
        // Chunked wins over a Content-Length.
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n").unwrap();
        assert_eq!(r.body, b"ok");
        let r = parse(b"HTTP/1.0 200 OK\nServer: x\n\n[1,2]").unwrap();
        assert_eq!(
            r,
            Response {
                status: 200,
                body: b"[1,2]".to_vec()
            }
        );
        let r = parse(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert_eq!(
            r,
            Response {
                status: 204,
                body: vec![]
            }
        );
    }

    #[test]
    fn oversized_truncated_and_garbage_answers_are_errors() {
        let too_large = |r| matches!(r, Err(OwnerError::TooLarge { limit_bytes: 64 }));
        assert!(too_large(parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 65\r\n\r\n"
        )));
        let big = [b"HTTP/1.1 200 OK\r\n\r\n".as_slice(), &[b'x'; 65]].concat();
        assert!(too_large(parse(&big)));
        assert_eq!(parse(&big[..big.len() - 1]).unwrap().body.len(), 64);
        let chunks = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n";
        let mut chunked = chunks.to_vec();
        chunked.extend_from_slice(&[b'y'; 64]);
        chunked.extend_from_slice(b"\r\n1\r\nz\r\n0\r\n\r\n");
        assert!(too_large(parse(&chunked)));
        let bad: [&[u8]; 12] = [
            b"",
            b"garbage",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
        ];
        for raw in bad {
            assert!(parse(raw).is_err(), "{:?}", String::from_utf8_lossy(raw));
        }
        // A head without end.
        let mut endless = b"HTTP/1.1 200 OK\r\n".to_vec();
        endless.extend(std::iter::repeat_n(b'h', HEAD_MAX_BYTES + 10));
        assert!(matches!(parse(&endless), Err(OwnerError::Http(_))));
    }

    #[test]
    fn names_prefer_tags_then_digests_then_the_short_id() {
        let image = |tags: Option<Vec<&str>>, digests: Option<Vec<&str>>| ListedImage {
            id: format!("sha256:{}", "0123456789ab".repeat(5)),
            repo_tags: tags.map(|v| v.into_iter().map(String::from).collect()),
            repo_digests: digests.map(|v| v.into_iter().map(String::from).collect()),
            created: None,
        };
        let digest = "busybox@sha256:aaaa";
        assert_eq!(
            image_name(&image(Some(vec!["busybox:latest", "b:1"]), None)),
            "busybox:latest"
        );
        assert_eq!(
            image_name(&image(Some(vec!["<none>:<none>"]), Some(vec![digest]))),
            digest
        );
        assert_eq!(
            image_name(&image(None, Some(vec!["<none>@<none>"]))),
            "0123456789ab"
        );
        assert_eq!(image_name(&image(Some(vec![]), None)), "0123456789ab");
        let long = "x".repeat(NAME_MAX_BYTES + 1);
        assert_eq!(image_name(&image(Some(vec![&long, "ok:1"]), None)), "ok:1");
        assert!(valid_id("sha256:abc"));
        assert!(!valid_id("../../containers/json?"));
        assert!(!valid_id(""));
    }

    /// Canned answers of a fake dockerd: a GET of a path in `bodies` gets
    /// 200 and that body (chunked, in two chunks); a request whose
    /// "METHOD path" is in `replies` gets that status and body; anything
    /// else 404.
    #[derive(Default)]
    struct Answers {
        bodies: HashMap<String, String>,
        replies: HashMap<String, (u16, String)>,
        /// Replies to a request asked before, in place of `replies`'.
        again: HashMap<String, (u16, String)>,
    }

    /// A fake dockerd answering from `answers`, recording each request as
    /// "METHOD path"; one connection per request, as the client makes.
    fn fake_dockerd(
        dir: &Path,
        answers: Arc<Mutex<Answers>>,
        asked: Arc<Mutex<Vec<String>>>,
    ) -> std::path::PathBuf {
        let socket = dir.join("docker.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut head = Vec::new();
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push(line);
                }
                let mut words = head[0].split(' ');
                let method = words.next().unwrap_or("").to_string();
                let path = words.next().unwrap_or("").to_string();
                assert!(head.iter().any(|h| h == "Host: docker\r\n"));
                let request = format!("{method} {path}");
                let mut asked = asked.lock().unwrap();
                let again = asked.contains(&request);
                asked.push(request.clone());
                drop(asked);
                let answers = answers.lock().unwrap();
                let body = answers.bodies.get(&path).filter(|_| method == "GET");
                let reply = answers.again.get(&request).filter(|_| again);
                let reply = match (body, reply.or_else(|| answers.replies.get(&request))) {
                    (Some(body), _) => {
                        let (a, b) = body.split_at(body.len() / 2);
                        format!(
                            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                            a.len(),
                            b.len()
                        )
                    }
                    (None, Some((status, body))) => format!(
                        "HTTP/1.1 {status} Whatever\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    ),
                    (None, None) => "HTTP/1.1 404 Not Found\r\nContent-Length: 31\r\n\r\n{\"message\":\"No such image: x\"}\n".to_string(),
                };
                drop(answers);
                let _ = conn.write_all(reply.as_bytes());
            }
        });
        socket
    }

    #[test]
    fn docker_images_map_tags_to_lcfs_layers_with_a_cache() {
        let dir = tempfile::tempdir().unwrap();
        let answers = Arc::new(Mutex::new(Answers::default()));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let socket = fake_dockerd(dir.path(), answers.clone(), asked.clone());
        let (a, b, c) = ("sha256:aaaa", "sha256:bbbb", "sha256:cccc");
        {
            let m = &mut answers.lock().unwrap().bodies;
            m.insert(
                "/images/json".into(),
                serde_json::json!([
                    {"Id": a, "RepoTags": ["busybox:latest", "<none>:<none>", "reg:5000/b/x:1", "bad?force=true"],
                     "RepoDigests": ["busybox@sha256:0a"], "Created": 17},
                    {"Id": b, "RepoTags": null, "RepoDigests": null, "Created": 18},
                    {"Id": c, "RepoTags": ["other:1"]},
                    {"Id": "bad/id", "RepoTags": ["x:1"]},
                ])
                .to_string(),
            );
            m.insert(
                format!("/images/{a}/json"),
                serde_json::json!({"Id": a, "GraphDriver": {"Name": "lcfs",
                    "Data": {"Layer": "layer-a", "Dir": "/x", "Parent": ""}}})
                .to_string(),
            );
            m.insert(
                format!("/images/{b}/json"),
                serde_json::json!({"GraphDriver": {"Name": "lcfs", "Data": {"Layer": "layer-b"}}})
                    .to_string(),
            );
            m.insert(
                format!("/images/{c}/json"),
                serde_json::json!({"GraphDriver": {"Name": "overlay2",
                    "Data": {"UpperDir": "/u", "MergedDir": "/m"}}})
                .to_string(),
            );
        }
        let mut cache = DockerCache::default();
        let images = docker_images(&socket, &mut cache).unwrap();
        let expected = vec![
            OwnerImage {
                owner: Owner::Docker,
                namespace: None,
                name: "busybox:latest".into(),
                id: a.into(),
                top_layer: "layer-a".into(),
                references: vec![
                    "busybox:latest".into(),
                    "reg:5000/b/x:1".into(),
                    "busybox@sha256:0a".into(),
                ],
                created: Some(17),
            },
            OwnerImage {
                owner: Owner::Docker,
                namespace: None,
                name: "bbbb".into(),
                id: b.into(),
                top_layer: "layer-b".into(),
                references: Vec::new(),
                created: Some(18),
            },
        ];
        assert_eq!(images, expected);
        assert_eq!(cache.len(), 3);
        assert_eq!(asked.lock().unwrap().len(), 4);
        // Again: only the list is asked for.
        asked.lock().unwrap().clear();
        assert_eq!(docker_images(&socket, &mut cache).unwrap(), expected);
        assert_eq!(*asked.lock().unwrap(), vec!["GET /images/json".to_string()]);
        // b removed: pruned from the cache. c's inspection fails now, but
        // it is cached already.
        answers.lock().unwrap().bodies.insert(
            "/images/json".into(),
            serde_json::json!([{"Id": a, "RepoTags": ["busybox:latest"]}, {"Id": c}]).to_string(),
        );
        answers
            .lock()
            .unwrap()
            .bodies
            .remove(&format!("/images/{c}/json"));
        let images = docker_images(&socket, &mut cache).unwrap();
        assert_eq!(images.len(), 1);
        assert_eq!(cache.len(), 2);
        // An error answer to the list is an error with its status.
        answers.lock().unwrap().bodies.remove("/images/json");
        match docker_images(&socket, &mut cache) {
            Err(OwnerError::Status {
                status: 404,
                excerpt,
                ..
            }) => {
                assert!(excerpt.contains("No such image"), "{excerpt}")
            }
            other => panic!("{other:?}"),
        }
        // Nobody listening: an error, not a panic.
        assert!(docker_images(&dir.path().join("none.sock"), &mut cache).is_err());
    }

    #[test]
    fn removals_tell_removed_gone_and_in_use_apart() {
        let dir = tempfile::tempdir().unwrap();
        let answers = Arc::new(Mutex::new(Answers::default()));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let socket = fake_dockerd(dir.path(), answers.clone(), asked.clone());
        let (removed, gone, used, tagged, broken) = (
            "sha256:aaaa",
            "sha256:bbbb",
            "sha256:cccc",
            "sha256:dddd",
            "sha256:eeee",
        );
        {
            let replies = &mut answers.lock().unwrap().replies;
            let delete = |id: &str| format!("DELETE /images/{id}?force=false");
            replies.insert(
                delete(removed),
                (
                    200,
                    serde_json::json!([{"Untagged": "busybox:latest"}, {"Deleted": removed}])
                        .to_string(),
                ),
            );
            replies.insert(
                delete(used),
                (
                    409,
                    serde_json::json!({"message": "conflict: unable to delete cccc (must be forced) - image is being used by stopped container 0123"})
                        .to_string(),
                ),
            );
            // Not JSON: the text is the message.
            replies.insert(
                delete(tagged),
                (
                    409,
                    "unable to delete dddd (must be forced) - image is referenced in multiple repositories\n"
                        .to_string(),
                ),
            );
            replies.insert(
                delete(broken),
                (500, r#"{"message":"driver failed"}"#.to_string()),
            );
        }
        // A GET answer for the same path must not answer a DELETE.
        answers
            .lock()
            .unwrap()
            .bodies
            .insert(format!("/images/{gone}?force=false"), "[]".into());
        assert_eq!(
            docker_remove_image(&socket, removed, &[]).unwrap(),
            Removal::Removed
        );
        assert_eq!(
            docker_remove_image(&socket, gone, &[]).unwrap(),
            Removal::Gone
        );
        match docker_remove_image(&socket, used, &[]).unwrap() {
            Removal::InUse(message) => assert!(
                message.starts_with("conflict: unable to delete cccc") && message.len() <= 200,
                "{message}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            docker_remove_image(&socket, tagged, &[]).unwrap(),
            Removal::InUse(
                "unable to delete dddd (must be forced) - image is referenced in multiple repositories"
                    .into()
            )
        );
        match docker_remove_image(&socket, broken, &[]) {
            Err(OwnerError::Status {
                status: 500,
                excerpt,
                ..
            }) => assert!(excerpt.contains("driver failed"), "{excerpt}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            *asked.lock().unwrap(),
            [removed, gone, used, tagged, broken]
                .iter()
                .map(|id| format!("DELETE /images/{id}?force=false"))
                .collect::<Vec<_>>()
        );
        // Ids that would leave the path are refused before any request.
        asked.lock().unwrap().clear();
        for bad in ["", "../containers/x", "sha256:a?force=true", "a b"] {
            assert!(
                matches!(
                    docker_remove_image(&socket, bad, &[]),
                    Err(OwnerError::InvalidId(_))
                ),
                "{bad:?}"
            );
        }
        assert!(asked.lock().unwrap().is_empty());
        assert!(docker_remove_image(&dir.path().join("none.sock"), removed, &[]).is_err());

        // Tagged in several repositories, no container uses it: each
        // reference goes (the last takes the image), then the id is gone.
        let references = ["a:1".to_string(), "b/c:2".into(), "<none>:<none>".into()];
        {
            let mut answers = answers.lock().unwrap();
            answers
                .bodies
                .insert("/containers/json?all=1".into(), "[]".into());
            let delete = |r: &str| format!("DELETE /images/{r}?force=false");
            answers.replies.insert(delete("a:1"), (200, "[]".into()));
            answers.replies.insert(delete("b/c:2"), (200, "[]".into()));
            answers.again.insert(delete(tagged), (404, "{}".into()));
        }
        asked.lock().unwrap().clear();
        assert_eq!(
            docker_remove_image(&socket, tagged, &references).unwrap(),
            Removal::Removed
        );
        assert_eq!(
            *asked.lock().unwrap(),
            [
                format!("DELETE /images/{tagged}?force=false"),
                "GET /containers/json?all=1".into(),
                "DELETE /images/a:1?force=false".into(),
                "DELETE /images/b/c:2?force=false".into(),
                format!("DELETE /images/{tagged}?force=false"),
            ]
        );
        // ... but while a container uses it, no reference is touched.
        answers.lock().unwrap().bodies.insert(
            "/containers/json?all=1".into(),
            serde_json::json!([{"Id": "c1", "ImageID": tagged, "State": "exited"}]).to_string(),
        );
        asked.lock().unwrap().clear();
        assert!(matches!(
            docker_remove_image(&socket, tagged, &references).unwrap(),
            Removal::InUse(_)
        ));
        assert!(!asked.lock().unwrap().iter().any(|r| r.contains("a:1")));
    }

    #[test]
    fn containers_running_or_stopped_with_their_layers() {
        let dir = tempfile::tempdir().unwrap();
        let answers = Arc::new(Mutex::new(Answers::default()));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let socket = fake_dockerd(dir.path(), answers.clone(), asked.clone());
        let (up, down, fresh, vanished, other) = ("c1up", "c2down", "c3fresh", "c4gone", "c5ovl");
        {
            let bodies = &mut answers.lock().unwrap().bodies;
            bodies.insert(
                "/containers/json?all=1".into(),
                serde_json::json!([
                    {"Id": up, "Image": "busybox", "ImageID": "sha256:aaaa", "State": "running"},
                    {"Id": down, "Image": "sha256:aaaa", "ImageID": "sha256:aaaa", "State": "exited"},
                    {"Id": fresh, "Image": "alpine:3", "ImageID": "sha256:bbbb", "State": "created"},
                    {"Id": vanished, "Image": "x", "ImageID": "sha256:cccc", "State": "exited"},
                    {"Id": other, "Image": "y", "State": "paused"},
                ])
                .to_string(),
            );
            let inspected = |running: bool, started: &str, driver: serde_json::Value| {
                serde_json::json!({
                    "Image": "sha256:ffff",
                    "State": {"Status": "x", "Running": running, "StartedAt": started},
                    "GraphDriver": driver,
                })
                .to_string()
            };
            let lcfs = |layer: &str| serde_json::json!({"Name": "lcfs", "Data": {"Layer": layer}});
            bodies.insert(
                format!("/containers/{up}/json"),
                inspected(true, "2023-11-14T22:13:20.123456789Z", lcfs("layer-up")),
            );
            bodies.insert(
                format!("/containers/{down}/json"),
                inspected(false, "2023-11-14T23:13:20+01:00", lcfs("layer-down")),
            );
            bodies.insert(
                format!("/containers/{fresh}/json"),
                inspected(false, "0001-01-01T00:00:00Z", lcfs("layer-fresh")),
            );
            // No State in the inspection: the list's "paused" says running.
            bodies.insert(
                format!("/containers/{other}/json"),
                serde_json::json!({"Image": "sha256:dddd",
                    "GraphDriver": {"Name": "overlay2", "Data": {"UpperDir": "/u"}}})
                .to_string(),
            );
        }
        let container =
            |id: &str, image: &str, running, layer: Option<&str>, started| OwnerContainer {
                id: id.into(),
                image_id: image.into(),
                running,
                layer: layer.map(String::from),
                started_at: started,
            };
        assert_eq!(
            docker_containers(&socket).unwrap(),
            vec![
                container(
                    up,
                    "sha256:aaaa",
                    true,
                    Some("layer-up"),
                    Some(1_700_000_000)
                ),
                container(
                    down,
                    "sha256:aaaa",
                    false,
                    Some("layer-down"),
                    Some(1_700_000_000)
                ),
                container(fresh, "sha256:bbbb", false, Some("layer-fresh"), None),
                container(other, "sha256:dddd", true, None, None),
            ]
        );
        assert_eq!(asked.lock().unwrap().len(), 6);
        // Any failure but a vanished container fails the whole call: a
        // partial list would make images and layers look unused.
        answers.lock().unwrap().replies.insert(
            format!("GET /containers/{vanished}/json"),
            (500, r#"{"message":"boom"}"#.into()),
        );
        assert!(matches!(
            docker_containers(&socket),
            Err(OwnerError::Status { status: 500, .. })
        ));
        answers.lock().unwrap().bodies.insert(
            "/containers/json?all=1".into(),
            serde_json::json!([{"Id": "../images/x", "ImageID": "sha256:aaaa"}]).to_string(),
        );
        assert!(matches!(
            docker_containers(&socket),
            Err(OwnerError::InvalidId(_))
        ));
        answers
            .lock()
            .unwrap()
            .bodies
            .insert("/containers/json?all=1".into(), "[]".into());
        assert_eq!(docker_containers(&socket).unwrap(), vec![]);
        answers
            .lock()
            .unwrap()
            .bodies
            .insert("/containers/json?all=1".into(), "{}".into());
        assert!(matches!(
            docker_containers(&socket),
            Err(OwnerError::Json { .. })
        ));
    }

    #[test]
    fn rfc3339_times_read_as_unix_seconds() {
        use lcfs_engine::Timestamp;
        assert_eq!(unix_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(unix_seconds("2000-02-29T00:00:00.5Z"), Some(951_782_400));
        assert_eq!(unix_seconds("2000-02-29T01:30:00+01:30"), Some(951_782_400));
        assert_eq!(unix_seconds("2000-02-28T22:00:00-02:00"), Some(951_782_400));
        assert_eq!(unix_seconds("1969-12-31T23:59:59Z"), Some(-1));
        // Go's zero time: never started.
        assert_eq!(unix_seconds("0001-01-01T00:00:00Z"), None);
        for bad in [
            "",
            "2023-11-14",
            "2023-11-14T22:13:20",
            "2023-11-14T22:13:20.Z",
            "2023-13-14T22:13:20Z",
            "2023-11-14T24:13:20Z",
            "2023-11-14T22:13:20+0100",
            "2023-11-14T22:13:20+01:00 ",
            "2023-11-14T22:13:2xZ",
            "+023-11-14T22:13:20Z",
            "2023-11-14T22:13:20\u{e9}Z",
        ] {
            assert_eq!(unix_seconds(bad), None, "{bad:?}");
        }
        // The inverse of protocol.rs's formatting, over four centuries.
        let mut seconds = -2_208_988_800; // 1900
        while seconds < 10_413_792_000 {
            // 2300
            let text = crate::protocol::rfc3339(Timestamp {
                seconds,
                nanoseconds: 7,
            });
            assert_eq!(unix_seconds(&text), Some(seconds), "{text}");
            seconds += 86_400 * 7 + 3_601;
        }
    }
}
