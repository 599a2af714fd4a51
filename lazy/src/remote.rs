//! An eStargz layer read where it lies, in a registry (docs/lazy.md,
//! "Reading a layer remotely"): the blob's size from a HEAD, the footer and
//! the TOC with two ranged GETs, the TOC checked against the layer's TOC
//! digest, then a file's chunks (their gzip members lie one after another)
//! with one ranged GET, each chunk checked against its digest. What was
//! fetched is counted: a file costs its chunks, not the layer. This is the
//! fetch a lazily mounted layer does on a first read.

use crate::estargz::{parse_footer, Error, Index, Result, FOOTER_SIZE};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A blob at a URL, read by ranges.
struct Blob {
    url: String,
    agent: ureq::Agent,
    /// Bytes fetched so far.
    fetched: AtomicU64,
}

/// A layer blob at `url` (`http(s)://host/v2/NAME/blobs/sha256:...`).
pub struct RemoteLayer {
    blob: Blob,
    pub index: Index,
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

impl Blob {
    /// Bytes `[start, end)`.
    fn range(&self, start: u64, end: u64) -> Result<Vec<u8>> {
        let r = self
            .agent
            .get(&self.url)
            .set("Range", &format!("bytes={start}-{}", end - 1))
            .call()
            .map_err(|e| http_err(&self.url, e))?;
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

impl RemoteLayer {
    /// Opens the layer: its footer and TOC, the TOC checked against
    /// `toc_digest`.
    pub fn open(url: &str, toc_digest: &str, timeout: Duration) -> Result<RemoteLayer> {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(timeout)
            .timeout_read(timeout)
            .redirects(5)
            .build();
        let head = agent.head(url).call().map_err(|e| http_err(url, e))?;
        let size: u64 = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                Error::Input(format!("{url}: no Content-Length in the answer to HEAD"))
            })?;
        let blob = Blob {
            url: url.to_string(),
            agent,
            fetched: AtomicU64::new(0),
        };
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
        Ok(RemoteLayer { blob, index })
    }

    /// Bytes of the blob fetched so far (the footer and TOC included).
    pub fn fetched(&self) -> u64 {
        self.blob.fetched.load(Ordering::Relaxed)
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
        let members = self.blob.range(base, ix.chunks[last].end)?;
        let mut out = Vec::with_capacity(last - first + 1);
        for n in first..=last {
            let c = &ix.chunks[n];
            out.push(ix.read_chunk(
                n,
                &members[(c.start - base) as usize..(c.end - base) as usize],
            )?);
        }
        Ok(out)
    }
}
