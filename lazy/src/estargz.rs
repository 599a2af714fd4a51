//! eStargz (docs/lazy.md, "The format"): a gzip tar layer whose every
//! chunk of file content (4 MiB by default) starts a gzip member of its
//! own, followed by a table of contents (TOC: a tar entry
//! `stargz.index.json` holding JSON that names each entry, its metadata,
//! and each chunk's member offset and SHA-256) and a 51-byte footer that
//! points at the TOC. Any tar+gzip reader reads the layer whole; a reader
//! that knows the format fetches the footer, then the TOC, then only the
//! chunks it needs, with HTTP ranges, and checks each against its digest.
//! The TOC's own SHA-256 (the layer annotation [`TOC_DIGEST_ANNOTATION`])
//! ties the chunks to the image's manifest.
//!
//! Everything read here is outside input: bounded (the TOC at most
//! [`MAX_TOC_BYTES`]), checked (offsets inside the blob and in blob order,
//! chunks contiguous, digests well formed), and refused with the reason.

use flate2::read::{GzDecoder, MultiGzDecoder};
use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read, Seek, SeekFrom, Write};

pub const TOC_TAR_NAME: &str = "stargz.index.json";
pub const FOOTER_SIZE: usize = 51;
/// The footer of stargz, eStargz's predecessor (read, never written).
pub const LEGACY_FOOTER_SIZE: usize = 47;
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// After the files to fetch first, when there are any.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// The first entry, when no file is to be fetched first.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
const LANDMARK_CONTENTS: u8 = 0x0f;
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// The largest TOC JSON read.
pub const MAX_TOC_BYTES: u64 = 64 << 20;
/// The largest chunk read.
pub const MAX_CHUNK_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not an eStargz layer: {0}")]
    Format(String),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Mismatch(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

fn format_err(m: impl Into<String>) -> Error {
    Error::Format(m.into())
}

// ---------------------------------------------------------------- the TOC

/// The TOC JSON (`JTOC` of the reference implementation).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Toc {
    pub version: i64,
    /// `null` in a TOC without entries.
    pub entries: Option<Vec<TocEntry>>,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// One TOC entry; keys and omissions as the reference writes them.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub modtime: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mode: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group_name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub inner_offset: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dev_major: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dev_minor: i64,
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        with = "base64_values"
    )]
    pub xattrs: BTreeMap<String, Vec<u8>>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_offset: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_size: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chunk_digest: String,
}

/// xattr values: base64 strings in JSON (Go's encoding of `[]byte`).
mod base64_values {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<String, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(
            m.iter()
                .map(|(k, v)| (k, base64::engine::general_purpose::STANDARD.encode(v))),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        let raw: Option<BTreeMap<String, String>> = Option::deserialize(d)?;
        raw.unwrap_or_default()
            .into_iter()
            .map(|(k, v)| {
                base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map(|v| (k, v))
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

/// `sha256:` and 64 lower-case hex digits (what the reference accepts).
pub fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    digest_of(Sha256::new_with_prefix(data))
}

fn digest_of(h: Sha256) -> String {
    lcfs_engine::digest::digest_string(&h.finalize().into())
}

/// A TOC name as readers see it: `/`-separated, no `.` or empty parts,
/// `..` clamped at the root (lexical cleaning from the root, as Go's
/// `path.Clean("/"+name)`), without the leading `/`; the root is "".
pub fn clean_name(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in name.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

// ---------------------------------------------------------------- footer

/// The 51-byte footer: an empty gzip member whose extra field (subfield
/// `SG`) holds the TOC's offset as 16 hex digits and `STARGZ`.
pub fn footer(toc_offset: u64) -> [u8; FOOTER_SIZE] {
    let mut f = [0u8; FOOTER_SIZE];
    f[..10].copy_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff]);
    f[10..12].copy_from_slice(&26u16.to_le_bytes());
    f[12..14].copy_from_slice(b"SG");
    f[14..16].copy_from_slice(&22u16.to_le_bytes());
    f[16..38].copy_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    f[38..43].copy_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    f
}

/// The TOC's offset and the footer's size, from the blob's last bytes
/// (at least [`FOOTER_SIZE`] of them, or the whole blob if shorter):
/// an eStargz footer, or else a legacy stargz one.
pub fn parse_footer(tail: &[u8]) -> Result<(u64, usize)> {
    const EMPTY: [u8; 13] = [0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];
    let hex = |b: &[u8]| -> Option<u64> {
        let s = std::str::from_utf8(b).ok()?;
        if s.len() != 16 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(s, 16).ok()
    };
    let head_ok =
        |f: &[u8], xlen: u16| f[..4] == [0x1f, 0x8b, 0x08, 0x04] && f[10..12] == xlen.to_le_bytes();
    if tail.len() >= FOOTER_SIZE {
        let f = &tail[tail.len() - FOOTER_SIZE..];
        if head_ok(f, 26)
            && &f[12..14] == b"SG"
            && f[14..16] == 22u16.to_le_bytes()
            && &f[32..38] == b"STARGZ"
            && f[38..] == EMPTY
        {
            if let Some(off) = hex(&f[16..32]) {
                return Ok((off, FOOTER_SIZE));
            }
        }
    }
    if tail.len() >= LEGACY_FOOTER_SIZE {
        let f = &tail[tail.len() - LEGACY_FOOTER_SIZE..];
        if head_ok(f, 22) && &f[28..34] == b"STARGZ" && f[34..] == EMPTY {
            if let Some(off) = hex(&f[12..28]) {
                return Ok((off, LEGACY_FOOTER_SIZE));
            }
        }
    }
    Err(format_err(
        "its last bytes are not an eStargz (or stargz) footer",
    ))
}

// ---------------------------------------------------------------- reading

/// A data entry's chunk, as read: where its gzip member starts and ends in
/// the blob, and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    /// Index of the file's entry in [`Index::entries`].
    pub entry: usize,
    /// Where the member(s) holding it start and end in the blob.
    pub start: u64,
    pub end: u64,
    /// Uncompressed bytes to skip after `start` (`innerOffset`).
    pub inner: u64,
    /// Offset in the file and length.
    pub file_offset: u64,
    pub size: u64,
    pub digest: String,
}

/// A read and checked TOC.
#[derive(Debug)]
pub struct Index {
    /// Entries other than chunks, names cleaned, in TOC order.
    pub entries: Vec<TocEntry>,
    /// By cleaned name.
    pub by_name: HashMap<String, usize>,
    /// Every chunk of every regular file, in blob order.
    pub chunks: Vec<Chunk>,
    /// The SHA-256 of the TOC JSON, `sha256:…`.
    pub toc_digest: String,
    pub toc_offset: u64,
    pub blob_size: u64,
}

impl Index {
    /// The footer and TOC of a blob on hand.
    pub fn open<R: Read + Seek>(blob: &mut R) -> Result<Index> {
        let size = blob.seek(SeekFrom::End(0))?;
        let tail_len = size.min(FOOTER_SIZE as u64);
        let mut tail = vec![0u8; tail_len as usize];
        blob.seek(SeekFrom::Start(size - tail_len))?;
        blob.read_exact(&mut tail)?;
        let (toc_offset, footer_size) = parse_footer(&tail)?;
        let toc_end = size - footer_size as u64;
        if toc_offset >= toc_end {
            return Err(format_err(format!(
                "the footer puts the TOC at {toc_offset}, past its end {toc_end}"
            )));
        }
        blob.seek(SeekFrom::Start(toc_offset))?;
        let member = blob.take(toc_end - toc_offset);
        Index::from_toc_member(member, toc_offset, size)
    }

    /// The TOC from its gzip member (the bytes from the footer's offset to
    /// the footer).
    pub fn from_toc_member<R: Read>(member: R, toc_offset: u64, blob_size: u64) -> Result<Index> {
        let mut archive = tar::Archive::new(GzDecoder::new(member));
        let mut entries = archive
            .entries()
            .map_err(|e| format_err(format!("the TOC member: {e}")))?;
        let mut first = entries
            .next()
            .ok_or_else(|| format_err("the TOC member holds no tar entry"))?
            .map_err(|e| format_err(format!("the TOC member: {e}")))?;
        let name = String::from_utf8_lossy(&first.path_bytes()).into_owned();
        if name != TOC_TAR_NAME {
            return Err(format_err(format!(
                "the TOC tar entry is named {name:?}, not {TOC_TAR_NAME:?}"
            )));
        }
        if first.size() > MAX_TOC_BYTES {
            return Err(format_err(format!(
                "a TOC of {} bytes (at most {MAX_TOC_BYTES} are read)",
                first.size()
            )));
        }
        let mut json = Vec::with_capacity(first.size() as usize);
        first
            .read_to_end(&mut json)
            .map_err(|e| format_err(format!("reading the TOC: {e}")))?;
        let mut h = Sha256::new();
        h.update(&json);
        let toc: Toc =
            serde_json::from_slice(&json).map_err(|e| format_err(format!("the TOC JSON: {e}")))?;
        Index::from_toc(toc, digest_of(h), toc_offset, blob_size)
    }

    /// Checks and normalizes a parsed TOC.
    pub fn from_toc(
        toc: Toc,
        toc_digest: String,
        toc_offset: u64,
        blob_size: u64,
    ) -> Result<Index> {
        let bad = |i: usize, m: String| format_err(format!("TOC entry {i}: {m}"));
        let raw = toc.entries.unwrap_or_default();
        let mut entries: Vec<TocEntry> = Vec::new();
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut last_offset: Option<u64> = None;
        // The file whose chunks are being listed: its index, the next
        // chunk's offset in it, and its size.
        let mut open_file: Option<(usize, u64, u64)> = None;
        for (i, mut e) in raw.into_iter().enumerate() {
            for v in [
                e.size,
                e.offset,
                e.inner_offset,
                e.chunk_offset,
                e.chunk_size,
                e.uid,
                e.gid,
                e.mode,
            ] {
                if v < 0 {
                    return Err(bad(i, "a negative number".into()));
                }
            }
            let kind = e.kind.as_str();
            if !matches!(
                kind,
                "dir" | "reg" | "symlink" | "hardlink" | "char" | "block" | "fifo" | "chunk"
            ) {
                return Err(bad(i, format!("unknown type {kind:?}")));
            }
            if kind == "chunk" {
                let Some((file, next, _)) = open_file else {
                    return Err(bad(i, "a chunk that follows no regular file".into()));
                };
                e.name = entries[file].name.clone();
                if e.chunk_offset as u64 != next {
                    return Err(bad(
                        i,
                        format!("a chunk at {} where {next} was due", e.chunk_offset),
                    ));
                }
            } else {
                if let Some((file, next, size)) = open_file.take() {
                    if next != size {
                        return Err(format_err(format!(
                            "{:?}: chunks cover {next} of its {size} bytes",
                            entries[file].name
                        )));
                    }
                }
                e.name = clean_name(&e.name);
            }
            let data = kind == "chunk" || (kind == "reg" && e.size > 0);
            if kind == "reg" && !e.digest.is_empty() && !valid_digest(&e.digest) {
                return Err(bad(
                    i,
                    format!(
                        "the digest {:?} is not sha256:<64 lower-case hex>",
                        e.digest
                    ),
                ));
            }
            if !data {
                if kind != "chunk" {
                    entries.push(e);
                }
                continue;
            }
            let (file, at, size) = match open_file {
                Some(f) if kind == "chunk" => f,
                _ => (entries.len(), 0, e.size as u64),
            };
            let offset = e.offset as u64;
            if offset >= toc_offset {
                return Err(bad(
                    i,
                    format!("data at {offset}, not before the TOC at {toc_offset}"),
                ));
            }
            match last_offset {
                Some(l) if offset < l || (offset == l && e.inner_offset == 0) => {
                    return Err(bad(
                        i,
                        format!("offset {offset} is not after the one before ({l})"),
                    ));
                }
                _ => {}
            }
            last_offset = Some(offset);
            let remain = size - at;
            let chunk_size = match e.chunk_size as u64 {
                0 => remain,
                n => n.min(remain),
            };
            if chunk_size == 0 || chunk_size > MAX_CHUNK_BYTES {
                return Err(bad(i, format!("a chunk of {chunk_size} bytes")));
            }
            let digest = if !e.chunk_digest.is_empty() {
                e.chunk_digest.clone()
            } else if chunk_size == size && kind == "reg" {
                // Legacy stargz: the file's digest covers its only chunk.
                e.digest.clone()
            } else {
                String::new()
            };
            if !valid_digest(&digest) {
                return Err(bad(
                    i,
                    format!("no well-formed chunk digest ({:?})", e.chunk_digest),
                ));
            }
            chunks.push(Chunk {
                entry: file,
                start: offset,
                end: toc_offset,
                inner: e.inner_offset as u64,
                file_offset: at,
                size: chunk_size,
                digest,
            });
            open_file = Some((file, at + chunk_size, size));
            if kind != "chunk" {
                entries.push(e);
            }
        }
        if let Some((file, next, size)) = open_file {
            if next != size {
                return Err(format_err(format!(
                    "{:?}: chunks cover {next} of its {size} bytes",
                    entries[file].name
                )));
            }
        }
        // A chunk's member ends where the next chunk's begins.
        for i in 0..chunks.len() {
            let next = chunks[i + 1..]
                .iter()
                .find(|c| c.inner == 0)
                .map(|c| c.start)
                .unwrap_or(toc_offset);
            chunks[i].end = next;
        }
        let mut by_name = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            by_name.insert(e.name.clone(), i);
        }
        for e in &entries {
            if e.kind == "hardlink" && !by_name.contains_key(&clean_name(&e.link_name)) {
                return Err(format_err(format!(
                    "{:?} is a hard link to {:?}, which the TOC does not hold",
                    e.name, e.link_name
                )));
            }
        }
        Ok(Index {
            entries,
            by_name,
            chunks,
            toc_digest,
            toc_offset,
            blob_size,
        })
    }

    /// Refuses a TOC whose digest is not `expected` (the layer's
    /// [`TOC_DIGEST_ANNOTATION`]).
    pub fn verify_toc(&self, expected: &str) -> Result<()> {
        if !valid_digest(expected) {
            return Err(Error::Input(format!(
                "{expected:?} is not a TOC digest (sha256:<64 lower-case hex>)"
            )));
        }
        if self.toc_digest != expected {
            return Err(Error::Mismatch(format!(
                "the TOC hashes to {}, not {expected}",
                self.toc_digest
            )));
        }
        Ok(())
    }

    /// Chunk `i`'s bytes from `member` (the blob's bytes from
    /// `chunks[i].start` on; what follows the chunk is not read), checked
    /// against its digest.
    pub fn read_chunk<R: Read>(&self, i: usize, member: R) -> Result<Vec<u8>> {
        let c = &self.chunks[i];
        let mut d = MultiGzDecoder::new(member);
        if c.inner > 0 {
            io::copy(&mut (&mut d).take(c.inner), &mut io::sink())?;
        }
        let mut out = Vec::with_capacity(c.size as usize);
        (&mut d).take(c.size).read_to_end(&mut out)?;
        let name = &self.entries[c.entry].name;
        if out.len() as u64 != c.size {
            return Err(Error::Mismatch(format!(
                "{name:?}: the chunk at {} holds {} of its {} bytes",
                c.file_offset,
                out.len(),
                c.size
            )));
        }
        let got = digest_of(Sha256::new_with_prefix(&out));
        if got != c.digest {
            return Err(Error::Mismatch(format!(
                "{name:?}: the chunk at {} hashes to {got}, not {}",
                c.file_offset, c.digest
            )));
        }
        Ok(out)
    }

    /// Every chunk of a blob on hand checked, and every regular file's
    /// content against its digest; what was read.
    pub fn verify_all<R: Read + Seek>(&self, blob: &mut R) -> Result<VerifyReport> {
        let mut files: HashMap<usize, Sha256> = HashMap::new();
        let mut bytes = 0;
        for (i, c) in self.chunks.iter().enumerate() {
            blob.seek(SeekFrom::Start(c.start))?;
            let data = self.read_chunk(i, (&mut *blob).take(c.end - c.start))?;
            bytes += data.len() as u64;
            files.entry(c.entry).or_default().update(&data);
        }
        let mut checked = 0;
        for (i, h) in files {
            let e = &self.entries[i];
            if !e.digest.is_empty() {
                let got = digest_of(h);
                if got != e.digest {
                    return Err(Error::Mismatch(format!(
                        "{:?} hashes to {got}, not {}",
                        e.name, e.digest
                    )));
                }
                checked += 1;
            }
        }
        Ok(VerifyReport {
            chunks: self.chunks.len(),
            files: checked,
            bytes,
        })
    }

    /// The regular file entry `i` holds content of: itself, or for a hard
    /// link the file it names.
    pub fn regular(&self, i: usize) -> Option<usize> {
        let e = &self.entries[i];
        let target = match e.kind.as_str() {
            "reg" => i,
            "hardlink" => *self.by_name.get(&clean_name(&e.link_name))?,
            _ => return None,
        };
        (self.entries[target].kind == "reg").then_some(target)
    }

    /// Whether the layer names files to fetch first: the entries before
    /// [`PREFETCH_LANDMARK`] (none with [`NO_PREFETCH_LANDMARK`] or
    /// without a landmark).
    pub fn prefetch(&self) -> &[TocEntry] {
        match self.by_name.get(PREFETCH_LANDMARK) {
            Some(&i) => &self.entries[..i],
            None => &[],
        }
    }
}

/// What [`Index::verify_all`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyReport {
    pub chunks: usize,
    /// Regular files checked against their whole-file digest.
    pub files: usize,
    pub bytes: u64,
}

// ---------------------------------------------------------------- writing

/// How [`build`] writes.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub chunk_size: u64,
    /// Files fetched first (cleaned names), in order: they lead the layer,
    /// after their parent directories, followed by [`PREFETCH_LANDMARK`].
    pub prioritized: Vec<String>,
    pub level: u32,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            prioritized: Vec::new(),
            level: 6,
        }
    }
}

/// What [`build`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Built {
    /// The TOC's SHA-256: the layer's [`TOC_DIGEST_ANNOTATION`].
    pub toc_digest: String,
    /// The SHA-256 of the layer uncompressed (the image config's DiffID).
    pub diff_id: String,
    /// Its size: [`UNCOMPRESSED_SIZE_ANNOTATION`].
    pub uncompressed_size: u64,
    /// The blob's SHA-256 and size (the manifest's layer digest and size).
    pub blob_digest: String,
    pub blob_size: u64,
    pub entries: usize,
}

/// One input entry.
struct Meta {
    name: String,
    kind: &'static str,
    size: u64,
    mode: u32,
    uid: u64,
    gid: u64,
    user: String,
    group: String,
    mtime: u64,
    link: String,
    dev_major: u32,
    dev_minor: u32,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// Where its content starts in the uncompressed input.
    data_at: u64,
}

/// Writes `input` (a tar, plain or gzip) as an eStargz layer to `output`.
/// Entries keep their order, but for the prioritized files and the
/// landmark that lead; of two entries of one name the later one stays.
pub fn build<R: Read, W: Write>(input: R, output: W, options: &BuildOptions) -> Result<Built> {
    check_options(options)?;
    // The input uncompressed, in a file: read once to list it, again for
    // each file's content in the order written.
    let mut plain = tempfile::tempfile()?;
    let mut input = io::BufReader::new(input);
    let gzip = {
        use io::BufRead;
        input.fill_buf()?.starts_with(&[0x1f, 0x8b])
    };
    if gzip {
        io::copy(&mut MultiGzDecoder::new(input), &mut plain)?;
    } else {
        io::copy(&mut input, &mut plain)?;
    }
    plain.seek(SeekFrom::Start(0))?;
    build_plain(plain, output, options)
}

/// [`build`] of a file: a plain tar is read where it is, not copied first.
pub fn build_file<W: Write>(
    mut input: std::fs::File,
    output: W,
    options: &BuildOptions,
) -> Result<Built> {
    check_options(options)?;
    let mut magic = Vec::with_capacity(2);
    (&mut input).take(2).read_to_end(&mut magic)?;
    input.seek(SeekFrom::Start(0))?;
    if magic == [0x1f, 0x8b] {
        return build(input, output, options);
    }
    build_plain(input, output, options)
}

fn check_options(options: &BuildOptions) -> Result<()> {
    if options.chunk_size == 0 || options.chunk_size > MAX_CHUNK_BYTES {
        return Err(Error::Input(format!(
            "a chunk size of {} (1 to {MAX_CHUNK_BYTES} bytes)",
            options.chunk_size
        )));
    }
    Ok(())
}

/// [`build`] of a plain tar in a file, read twice: listed, then each
/// file's content in the order written.
fn build_plain<W: Write>(
    mut plain: std::fs::File,
    output: W,
    options: &BuildOptions,
) -> Result<Built> {
    let metas = list(&mut plain)?;
    let order = ordered(&metas, &options.prioritized)?;
    let mut w = MemberWriter::new(output, options.level);
    let mut toc = Vec::new();
    for item in order {
        match item {
            Item::Landmark(name) => {
                let m = Meta {
                    name: name.into(),
                    kind: "reg",
                    size: 1,
                    mode: 0,
                    uid: 0,
                    gid: 0,
                    user: String::new(),
                    group: String::new(),
                    mtime: 0,
                    link: String::new(),
                    dev_major: 0,
                    dev_minor: 0,
                    xattrs: BTreeMap::new(),
                    data_at: 0,
                };
                write_entry(
                    &mut w,
                    &m,
                    &mut io::Cursor::new([LANDMARK_CONTENTS]),
                    options.chunk_size,
                    &mut toc,
                )?;
            }
            Item::Entry(i) => {
                let m = &metas[i];
                plain.seek(SeekFrom::Start(m.data_at))?;
                write_entry(&mut w, m, &mut plain, options.chunk_size, &mut toc)?;
            }
        }
    }
    let entries = toc.len();
    let json = serde_json::to_vec_pretty(&Toc {
        version: 1,
        entries: Some(toc),
    })
    .map_err(|e| Error::Input(format!("the TOC: {e}")))?;
    let toc_digest = digest_of(Sha256::new_with_prefix(&json));
    // The TOC: a member of its own, a tar of one entry and the end.
    w.close()?;
    let toc_offset = w.offset();
    w.open();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.as_old_mut().name[..TOC_TAR_NAME.len()].copy_from_slice(TOC_TAR_NAME.as_bytes());
    h.set_size(json.len() as u64);
    h.set_mode(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    w.write(h.as_bytes())?;
    w.write(&json)?;
    w.write(&vec![0u8; padding(json.len() as u64) + 1024])?;
    w.close()?;
    let (diff_id, uncompressed_size) = w.uncompressed();
    let (blob_digest, blob_size) = w.finish(&footer(toc_offset))?;
    Ok(Built {
        toc_digest,
        diff_id,
        uncompressed_size,
        blob_digest,
        blob_size,
        entries,
    })
}

fn padding(size: u64) -> usize {
    ((512 - size % 512) % 512) as usize
}

/// Lists the entries of a plain tar.
fn list(plain: &mut std::fs::File) -> Result<Vec<Meta>> {
    let mut archive = tar::Archive::new(&mut *plain);
    let mut out: Vec<Meta> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    let bad = |m: String| Error::Input(format!("the input tar: {m}"));
    for entry in archive.entries().map_err(|e| bad(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let h = entry.header().clone();
        use tar::EntryType as T;
        let kind = match h.entry_type() {
            T::Regular | T::Continuous => "reg",
            T::Directory => "dir",
            T::Symlink => "symlink",
            T::Link => "hardlink",
            T::Char => "char",
            T::Block => "block",
            T::Fifo => "fifo",
            T::XGlobalHeader => continue,
            other => {
                return Err(bad(format!(
                    "an entry of type {other:?}, which eStargz cannot hold"
                )))
            }
        };
        // Names as Go's archive/tar reads them (an empty GNU long name or
        // link is ignored), as the layer's unpackers do.
        let name = String::from_utf8(lcfs_dockerplugin::entry_path(&mut entry))
            .map_err(|_| bad("a name that is not UTF-8".into()))?;
        let link = match lcfs_dockerplugin::entry_link(&mut entry) {
            Some(l) => String::from_utf8(l)
                .map_err(|_| bad(format!("{name}: a link target that is not UTF-8")))?,
            None => String::new(),
        };
        let mut m = Meta {
            kind,
            size: if kind == "reg" { entry.size() } else { 0 },
            mode: h.mode().unwrap_or(0),
            uid: h.uid().unwrap_or(0),
            gid: h.gid().unwrap_or(0),
            user: String::from_utf8_lossy(h.username_bytes().unwrap_or_default()).into_owned(),
            group: String::from_utf8_lossy(h.groupname_bytes().unwrap_or_default()).into_owned(),
            mtime: h.mtime().unwrap_or(0),
            link,
            dev_major: h.device_major().ok().flatten().unwrap_or(0),
            dev_minor: h.device_minor().ok().flatten().unwrap_or(0),
            xattrs: BTreeMap::new(),
            data_at: entry.raw_file_position(),
            name,
        };
        if let Ok(Some(pax)) = entry.pax_extensions() {
            for ext in pax.flatten() {
                let (Ok(k), v) = (ext.key(), ext.value_bytes()) else {
                    continue;
                };
                let num = || {
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.split('.').next()?.parse::<u64>().ok())
                };
                match k {
                    "uid" => m.uid = num().unwrap_or(m.uid),
                    "gid" => m.gid = num().unwrap_or(m.gid),
                    "mtime" => m.mtime = num().unwrap_or(m.mtime),
                    "uname" => m.user = String::from_utf8_lossy(v).into_owned(),
                    "gname" => m.group = String::from_utf8_lossy(v).into_owned(),
                    _ => {
                        if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
                            m.xattrs.insert(x.to_string(), v.to_vec());
                        }
                    }
                }
            }
        }
        // Skip the content without reading it (the file is read again
        // from data_at when written).
        drop(entry);
        let key = clean_name(&m.name);
        if key == clean_name(TOC_TAR_NAME)
            || key == PREFETCH_LANDMARK
            || key == NO_PREFETCH_LANDMARK
        {
            continue;
        }
        if let Some(old) = at.insert(key, out.len()) {
            // The later entry replaces it, at the later place.
            out[old].kind = "";
        }
        out.push(m);
    }
    Ok(out)
}

enum Item {
    Landmark(&'static str),
    Entry(usize),
}

/// The order written: the prioritized files (each after its parent
/// directories and, for a hard link, its target), the landmark, the rest.
fn ordered(metas: &[Meta], prioritized: &[String]) -> Result<Vec<Item>> {
    let live: HashMap<String, usize> = metas
        .iter()
        .enumerate()
        .filter(|(_, m)| !m.kind.is_empty())
        .map(|(i, m)| (clean_name(&m.name), i))
        .collect();
    let mut out = Vec::new();
    let mut done = HashSet::new();
    fn add(
        name: &str,
        live: &HashMap<String, usize>,
        metas: &[Meta],
        done: &mut HashSet<usize>,
        out: &mut Vec<Item>,
    ) -> bool {
        let Some(&i) = live.get(name) else {
            return false;
        };
        if done.contains(&i) {
            return true;
        }
        if let Some((parent, _)) = name.rsplit_once('/') {
            add(parent, live, metas, done, out);
        }
        if metas[i].kind == "hardlink" {
            add(&clean_name(&metas[i].link), live, metas, done, out);
        }
        done.insert(i);
        out.push(Item::Entry(i));
        true
    }
    for p in prioritized {
        if !add(&clean_name(p), &live, metas, &mut done, &mut out) {
            return Err(Error::Input(format!(
                "the file to fetch first {p:?} is not in the layer"
            )));
        }
    }
    if prioritized.is_empty() {
        out.insert(0, Item::Landmark(NO_PREFETCH_LANDMARK));
    } else {
        out.push(Item::Landmark(PREFETCH_LANDMARK));
    }
    for (i, m) in metas.iter().enumerate() {
        if !m.kind.is_empty() && !done.contains(&i) {
            out.push(Item::Entry(i));
        }
    }
    Ok(out)
}

/// Writes one entry: its tar header (and a PAX header for what ustar
/// cannot hold) into the open member, each chunk of its content in a
/// member of its own; adds its TOC entries.
fn write_entry<W: Write, R: Read>(
    w: &mut MemberWriter<W>,
    m: &Meta,
    content: &mut R,
    chunk_size: u64,
    toc: &mut Vec<TocEntry>,
) -> Result<()> {
    w.write(&tar_header(m)?)?;
    let mut e = TocEntry {
        name: m.name.clone(),
        kind: m.kind.into(),
        size: if m.kind == "reg" { m.size as i64 } else { 0 },
        modtime: modtime(m.mtime),
        link_name: m.link.clone(),
        mode: m.mode as i64,
        uid: m.uid as i64,
        gid: m.gid as i64,
        user_name: m.user.clone(),
        group_name: m.group.clone(),
        dev_major: m.dev_major as i64,
        dev_minor: m.dev_minor as i64,
        xattrs: m.xattrs.clone(),
        ..TocEntry::default()
    };
    if m.kind != "reg" {
        toc.push(e);
        return Ok(());
    }
    let mut whole = Sha256::new();
    let first = toc.len();
    let mut done = 0u64;
    let mut buf = vec![0u8; chunk_size.min(m.size).max(1) as usize];
    while done < m.size {
        let n = chunk_size.min(m.size - done);
        w.close()?;
        let offset = w.offset();
        w.open();
        let data = &mut buf[..n as usize];
        content
            .read_exact(data)
            .map_err(|e| Error::Input(format!("{}: its content: {e}", m.name)))?;
        w.write(data)?;
        whole.update(&*data);
        let chunk_digest = digest_of(Sha256::new_with_prefix(&*data));
        let chunk_size_field = if m.size - done >= chunk_size {
            chunk_size as i64
        } else {
            0
        };
        if done == 0 {
            e.offset = offset as i64;
            e.chunk_size = chunk_size_field;
            e.chunk_digest = chunk_digest;
            toc.push(e.clone());
        } else {
            toc.push(TocEntry {
                name: m.name.clone(),
                kind: "chunk".into(),
                offset: offset as i64,
                chunk_offset: done as i64,
                chunk_size: chunk_size_field,
                chunk_digest,
                ..TocEntry::default()
            });
        }
        done += n;
    }
    if m.size == 0 {
        toc.push(e);
    }
    toc[first].digest = digest_of(whole);
    w.write(&vec![0u8; padding(m.size)])?;
    Ok(())
}

/// RFC 3339 UTC seconds; empty for the epoch (as the reference writes).
fn modtime(seconds: u64) -> String {
    if seconds == 0 {
        return String::new();
    }
    let (y, mo, d, h, mi, s) = lcfs_engine::Timestamp {
        seconds: seconds as i64,
        nanoseconds: 0,
    }
    .civil();
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// A ustar header, after a PAX header when a name, a link target, an id
/// or xattrs do not fit in it.
fn tar_header(m: &Meta) -> Result<Vec<u8>> {
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    let mut h = tar::Header::new_ustar();
    use tar::EntryType as T;
    h.set_entry_type(match m.kind {
        "reg" => T::Regular,
        "dir" => T::Directory,
        "symlink" => T::Symlink,
        "hardlink" => T::Link,
        "char" => T::Char,
        "block" => T::Block,
        _ => T::Fifo,
    });
    let name = m.name.as_bytes();
    let old = h.as_old_mut();
    if name.len() <= 100 {
        old.name[..name.len()].copy_from_slice(name);
    } else {
        old.name.copy_from_slice(&name[..100]);
        pax.push(("path".into(), name.to_vec()));
    }
    let link = m.link.as_bytes();
    if link.len() <= 100 {
        old.linkname[..link.len()].copy_from_slice(link);
    } else {
        old.linkname.copy_from_slice(&link[..100]);
        pax.push(("linkpath".into(), link.to_vec()));
    }
    const MAX_ID: u64 = 0o7777777;
    h.set_mode(m.mode & 0o7777);
    for (key, v) in [("uid", m.uid), ("gid", m.gid)] {
        if v > MAX_ID {
            pax.push((key.into(), v.to_string().into_bytes()));
        }
    }
    h.set_uid(m.uid.min(MAX_ID));
    h.set_gid(m.gid.min(MAX_ID));
    h.set_size(m.size);
    h.set_mtime(m.mtime);
    for (key, v) in [("uname", &m.user), ("gname", &m.group)] {
        if v.len() > 32 {
            pax.push((key.into(), v.as_bytes().to_vec()));
        }
    }
    if m.user.len() <= 32 {
        h.set_username(&m.user).map_err(Error::Io)?;
    }
    if m.group.len() <= 32 {
        h.set_groupname(&m.group).map_err(Error::Io)?;
    }
    if matches!(m.kind, "char" | "block") {
        h.set_device_major(m.dev_major).map_err(Error::Io)?;
        h.set_device_minor(m.dev_minor).map_err(Error::Io)?;
    }
    for (k, v) in &m.xattrs {
        pax.push((format!("SCHILY.xattr.{k}"), v.clone()));
    }
    h.set_cksum();
    let mut out = Vec::new();
    if !pax.is_empty() {
        let mut records = Vec::new();
        for (k, v) in &pax {
            // "LEN KEY=VALUE\n", LEN counting itself.
            let body = k.len() + v.len() + 3;
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            records.extend_from_slice(format!("{len} {k}=").as_bytes());
            records.extend_from_slice(v);
            records.push(b'\n');
        }
        let mut x = tar::Header::new_ustar();
        x.set_entry_type(T::XHeader);
        let xname = b"PaxHeader";
        x.as_old_mut().name[..xname.len()].copy_from_slice(xname);
        x.set_size(records.len() as u64);
        x.set_mode(0o644);
        x.set_cksum();
        out.extend_from_slice(x.as_bytes());
        out.extend_from_slice(&records);
        out.extend(std::iter::repeat_n(0u8, padding(records.len() as u64)));
    }
    out.extend_from_slice(h.as_bytes());
    Ok(out)
}

/// A byte count kept on the way out.
struct Counting<W> {
    inner: W,
    n: u64,
    hash: Sha256,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.n += n as u64;
        self.hash.update(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Gzip members one after another; the uncompressed stream hashed.
struct MemberWriter<W: Write> {
    open: Option<GzEncoder<Counting<W>>>,
    closed: Option<Counting<W>>,
    level: u32,
    plain: Sha256,
    plain_bytes: u64,
}

impl<W: Write> MemberWriter<W> {
    fn new(inner: W, level: u32) -> Self {
        let mut w = MemberWriter {
            open: None,
            closed: Some(Counting {
                inner,
                n: 0,
                hash: Sha256::new(),
            }),
            level: level.min(9),
            plain: Sha256::new(),
            plain_bytes: 0,
        };
        w.open();
        w
    }

    fn open(&mut self) {
        if let Some(c) = self.closed.take() {
            self.open = Some(
                GzBuilder::new()
                    .operating_system(255)
                    .write(c, Compression::new(self.level)),
            );
        }
    }

    fn close(&mut self) -> io::Result<()> {
        if let Some(gz) = self.open.take() {
            self.closed = Some(gz.finish()?);
        }
        Ok(())
    }

    /// Where the next member starts (the member is closed).
    fn offset(&self) -> u64 {
        self.closed.as_ref().map(|c| c.n).unwrap_or(0)
    }

    fn write(&mut self, b: &[u8]) -> io::Result<()> {
        self.plain.update(b);
        self.plain_bytes += b.len() as u64;
        match &mut self.open {
            Some(gz) => gz.write_all(b),
            None => Err(io::Error::other("internal: no gzip member open")),
        }
    }

    fn uncompressed(&self) -> (String, u64) {
        (digest_of(self.plain.clone()), self.plain_bytes)
    }

    /// Writes `tail` (the footer) raw; the blob's digest and size.
    fn finish(mut self, tail: &[u8]) -> io::Result<(String, u64)> {
        self.close()?;
        let mut c = self.closed.take().expect("closed");
        c.write_all(tail)?;
        c.flush()?;
        Ok((digest_of(c.hash), c.n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_footer_is_the_reference_bytes_and_reads_back() {
        // The reference implementation's footer for TOC offset 0x2c7.
        let f = footer(0x2c7);
        assert_eq!(
            &f[..16],
            &[0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 0x1a, 0, b'S', b'G', 0x16, 0]
        );
        assert_eq!(&f[16..38], b"00000000000002c7STARGZ");
        assert_eq!(parse_footer(&f).unwrap(), (0x2c7, FOOTER_SIZE));
        // Decompresses to nothing.
        let mut out = Vec::new();
        GzDecoder::new(&f[..]).read_to_end(&mut out).unwrap();
        assert!(out.is_empty());
        // Legacy: no subfield header.
        let mut legacy = Vec::new();
        legacy.extend_from_slice(&[0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 22, 0]);
        legacy.extend_from_slice(b"0000000000001000STARGZ");
        legacy.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(legacy.len(), LEGACY_FOOTER_SIZE);
        assert_eq!(parse_footer(&legacy).unwrap(), (0x1000, LEGACY_FOOTER_SIZE));
        let mut bad = f;
        bad[20] = b'g';
        assert!(parse_footer(&bad).is_err());
        assert!(parse_footer(&f[1..]).is_err());
        assert!(parse_footer(b"").is_err());
    }

    #[test]
    fn names_are_cleaned_as_readers_clean_them() {
        for (raw, clean) in [
            ("./foo/", "foo"),
            ("/", ""),
            ("a//b/./c", "a/b/c"),
            ("../../etc/x", "etc/x"),
            ("a/../../b", "b"),
        ] {
            assert_eq!(clean_name(raw), clean);
        }
        assert!(valid_digest(&format!("sha256:{}", "a".repeat(64))));
        assert!(!valid_digest(&format!("sha256:{}", "A".repeat(64))));
        assert!(!valid_digest("sha256:abc"));
    }
}
