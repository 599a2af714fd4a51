//! An eStargz layer read where it lies, in a registry (docs/lazy.md,
//! "Reading a layer remotely"): the blob's size from a HEAD, the footer and
//! the TOC with two ranged GETs, the TOC checked against the layer's TOC
//! digest, then a file's chunks each with a ranged GET of its gzip member
//! and checked against its digest. What was fetched is counted: a file
//! costs its chunks, not the layer. This is the fetch a lazily mounted
//! layer does on a first read.

use crate::estargz::{parse_footer, Error, Index, Result, FOOTER_SIZE};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A layer blob at `url` (`http(s)://host/v2/NAME/blobs/sha256:...`).
pub struct RemoteLayer {
    url: String,
    agent: ureq::Agent,
    pub index: Index,
    /// Bytes fetched so far (the footer and TOC included).
    pub fetched: AtomicU64,
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
        let mut layer = RemoteLayer {
            url: url.to_string(),
            agent,
            index: Index {
                entries: Vec::new(),
                by_name: Default::default(),
                chunks: Vec::new(),
                toc_digest: String::new(),
                toc_offset: 0,
                blob_size: size,
            },
            fetched: AtomicU64::new(0),
        };
        let tail_len = size.min(FOOTER_SIZE as u64);
        let tail = layer.range(size - tail_len, size)?;
        let (toc_offset, footer_size) = parse_footer(&tail)?;
        let toc_end = size - footer_size as u64;
        if toc_offset >= toc_end {
            return Err(Error::Format(format!(
                "the footer puts the TOC at {toc_offset}, past its end {toc_end}"
            )));
        }
        let toc = layer.range(toc_offset, toc_end)?;
        let index = Index::from_toc_member(&toc[..], toc_offset, size)?;
        index.verify_toc(toc_digest)?;
        layer.index = index;
        Ok(layer)
    }

    /// Bytes `[start, end)` of the blob.
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

    /// File `name`'s content (a hard link's target's), fetched chunk by
    /// chunk, each checked against its digest.
    pub fn read_file(&self, name: &str) -> Result<Vec<u8>> {
        let clean = crate::estargz::clean_name(name);
        let mut i = *self
            .index
            .by_name
            .get(&clean)
            .ok_or_else(|| Error::Input(format!("the layer has no {name:?}")))?;
        if self.index.entries[i].kind == "hardlink" {
            let target = crate::estargz::clean_name(&self.index.entries[i].link_name);
            i = self.index.by_name[&target];
        }
        let e = &self.index.entries[i];
        if e.kind != "reg" {
            return Err(Error::Input(format!(
                "{name:?} is a {}, not a regular file",
                e.kind
            )));
        }
        let mut out = Vec::with_capacity(e.size as usize);
        for (n, c) in self
            .index
            .chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.entry == i)
        {
            let member = self.range(c.start, c.end)?;
            out.extend(self.index.read_chunk(n, &member[..])?);
        }
        Ok(out)
    }
}
