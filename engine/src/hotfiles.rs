//! Hot files: per layer, the files read most, as a bounded top-k.
//!
//! Each layer that serves reads keeps a *space-saving* summary (Metwally,
//! Agrawal and El Abbadi, 2005) of at most [`HOT_FILES_K`] inodes: a read of
//! a listed inode adds to its counts; a read of an unlisted one, when the
//! list is full, takes the place of the entry with the fewest reads and
//! inherits its counts (kept as `error`, the most the new entry may be
//! overcounted). Any file read more than `reads / K` times is in the list,
//! whatever the number of distinct files: memory is K entries a layer,
//! however many paths a container walks.
//!
//! A removed layer's summary is merged into its parent's (as its read
//! counts are folded into the parent's usage), keeping only inodes the
//! parent has: what containers started from an image read stays with the
//! image. Summaries are stored under `(layer id, KIND_HOT_FILES, 0)` in the
//! layer table, written at checkpoints like layer records.

use crate::error::{Error, Result};
use crate::format::Reader;

/// Entries a layer's summary holds.
pub const HOT_FILES_K: usize = 32;
/// Bytes of one encoded entry.
const ENTRY_BYTES: usize = 32;

/// One file of a summary. `reads` and `bytes` may overcount by up to
/// `error` reads (and the bytes those carried) from the entry it replaced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HotFile {
    pub ino: u64,
    pub reads: u64,
    pub bytes: u64,
    pub error: u64,
}

/// A layer's summary: at most [`HOT_FILES_K`] entries, unordered (its
/// encoding is in docs/format.md, "Hot-file summary").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HotFiles {
    entries: Vec<HotFile>,
}

impl HotFiles {
    /// Counts `reads` reads of `bytes` of `ino` (an entry of `error` when
    /// merging another summary).
    pub fn add(&mut self, ino: u64, reads: u64, bytes: u64, error: u64) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.ino == ino) {
            e.reads = e.reads.saturating_add(reads);
            e.bytes = e.bytes.saturating_add(bytes);
            e.error = e.error.saturating_add(error);
        } else if self.entries.len() < HOT_FILES_K {
            self.entries.push(HotFile {
                ino,
                reads,
                bytes,
                error,
            });
        } else {
            let min = self
                .entries
                .iter_mut()
                .min_by_key(|e| e.reads)
                .expect("a full summary has entries");
            *min = HotFile {
                ino,
                reads: min.reads.saturating_add(reads),
                bytes: min.bytes.saturating_add(bytes),
                error: min.reads.saturating_add(error),
            };
        }
    }

    /// Adds another summary's entries that `keep` accepts.
    pub fn merge(&mut self, other: &HotFiles, mut keep: impl FnMut(u64) -> bool) {
        for e in &other.entries {
            if keep(e.ino) {
                self.add(e.ino, e.reads, e.bytes, e.error);
            }
        }
    }

    /// Entries, most read first by the reads each is sure to have had
    /// (`reads - error`): a file that only took over a slot late ranks
    /// below one read steadily.
    pub fn top(&self) -> Vec<HotFile> {
        let mut v = self.entries.clone();
        let sure = |e: &HotFile| e.reads.saturating_sub(e.error);
        v.sort_by(|a, b| sure(b).cmp(&sure(a)).then(b.reads.cmp(&a.reads)));
        v
    }

    /// u32 count, then per entry inode, reads, bytes, error (u64 each,
    /// little-endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + ENTRY_BYTES * self.entries.len());
        v.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            for n in [e.ino, e.reads, e.bytes, e.error] {
                v.extend_from_slice(&n.to_le_bytes());
            }
        }
        v
    }

    pub fn decode(b: &[u8]) -> Result<HotFiles> {
        let mut r = Reader::new(b);
        let n = r.u32()? as usize;
        if n > HOT_FILES_K || r.rest() != n * ENTRY_BYTES {
            return Err(Error::corrupt(0, "hot files summary of a bad length"));
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let e = HotFile {
                ino: r.u64()?,
                reads: r.u64()?,
                bytes: r.u64()?,
                error: r.u64()?,
            };
            if entries.iter().any(|x: &HotFile| x.ino == e.ino) {
                return Err(Error::corrupt(0, "hot files summary lists an inode twice"));
            }
            entries.push(e);
        }
        Ok(HotFiles { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> u64 {
        let seed = std::env::var("LCFS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("LCFS_SEED={seed}");
        seed
    }

    #[test]
    fn heavy_hitters_survive_a_flood_of_distinct_files() {
        let mut rng = seed() | 1;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut h = HotFiles::default();
        // Three hot files among 100,000 read once each, interleaved; each
        // is read more often than a slot's count grows (1/32 of the rest).
        for i in 0..100_000u64 {
            h.add(1_000_000 + i, 1, 4096, 0);
            if next() % 10 == 0 {
                h.add(7, 1, 100, 0);
            }
            if next() % 20 == 0 {
                h.add(8, 1, 100, 0);
            }
            if next() % 25 == 0 {
                h.add(9, 1, 100, 0);
            }
        }
        assert!(h.entries.len() <= HOT_FILES_K);
        let top: Vec<u64> = h.top().iter().take(3).map(|e| e.ino).collect();
        assert_eq!(top, vec![7, 8, 9]);
        let e7 = h.top()[0];
        assert!(e7.reads - e7.error <= 11_000 && e7.reads >= 9_000, "{e7:?}");
        assert_eq!(HotFiles::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn merge_keeps_what_the_filter_accepts_and_decode_checks_lengths() {
        let mut a = HotFiles::default();
        a.add(1, 5, 50, 0);
        let mut b = HotFiles::default();
        b.add(1, 2, 20, 0);
        b.add(2, 9, 90, 0);
        a.merge(&b, |ino| ino == 1);
        assert_eq!(
            a.top(),
            vec![HotFile {
                ino: 1,
                reads: 7,
                bytes: 70,
                error: 0
            }]
        );
        assert!(HotFiles::decode(&[1, 0, 0, 0]).is_err());
        assert!(HotFiles::decode(&[33, 0, 0, 0]).is_err());
        let mut twice = b.encode();
        twice[36..44].copy_from_slice(&1u64.to_le_bytes());
        assert!(HotFiles::decode(&twice).is_err());
        assert_eq!(
            HotFiles::decode(&0u32.to_le_bytes()).unwrap(),
            HotFiles::default()
        );
    }
}
