//! The verify block: a 64-byte header at the start of every verify unit (the
//! job's smallest block size), then a body derived from the header, so a
//! reader can tell a good block from a torn, stale, misplaced or foreign one.
//!
//! Layout, little-endian (also in docs/stress.md):
//!
//! ```text
//!  0  magic       8  b"LCFSSTR1"
//!  8  offset      8  byte offset of this unit in its file
//! 16  generation  8  the job's write sequence number that wrote it (from 1)
//! 24  seed        8  the run's seed
//! 32  job         4  the job's index in the run
//! 36  length      4  unit length in bytes
//! 40  checksum    8  xxh3-64 of the whole unit with this field read as zero
//! 48  reserved   16  zero
//! 64  body           SplitMix64 stream seeded by xxh3 of bytes 0..40
//! ```

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

pub const HEADER_BYTES: usize = 64;
pub const MAGIC: [u8; 8] = *b"LCFSSTR1";
const CHECKSUM_AT: usize = 40;

/// What a verify unit claims about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub offset: u64,
    pub generation: u64,
    pub seed: u64,
    pub job: u32,
    pub length: u32,
}

/// What reading one unit found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Every byte zero: never written (a hole, or a lost write).
    Zero,
    /// Intact: header, checksum and body agree.
    Valid(Header),
    /// Anything else, with the reason.
    Bad(String),
}

/// Fills `unit` (its whole length) with the header and body for `header`.
pub fn encode(unit: &mut [u8], header: &Header) {
    assert_eq!(unit.len(), header.length as usize, "unit length");
    assert!(unit.len() >= HEADER_BYTES);
    unit[0..8].copy_from_slice(&MAGIC);
    unit[8..16].copy_from_slice(&header.offset.to_le_bytes());
    unit[16..24].copy_from_slice(&header.generation.to_le_bytes());
    unit[24..32].copy_from_slice(&header.seed.to_le_bytes());
    unit[32..36].copy_from_slice(&header.job.to_le_bytes());
    unit[36..40].copy_from_slice(&header.length.to_le_bytes());
    unit[40..HEADER_BYTES].fill(0);
    let seed = body_seed(unit);
    fill_body(&mut unit[HEADER_BYTES..], seed);
    let checksum = checksum(unit);
    unit[CHECKSUM_AT..CHECKSUM_AT + 8].copy_from_slice(&checksum.to_le_bytes());
    debug_assert_eq!(decode(unit, header.offset), Decoded::Valid(*header));
}

/// Reads one unit found at file offset `at`. Checks, in order: all zero,
/// magic, length, checksum (torn or corrupt), offset (misplaced), body.
pub fn decode(unit: &[u8], at: u64) -> Decoded {
    if unit.iter().all(|&b| b == 0) {
        return Decoded::Zero;
    }
    if unit.len() < HEADER_BYTES || unit[0..8] != MAGIC {
        return Decoded::Bad(
            "no verify header (overwritten or never written by lcfs-stress)".into(),
        );
    }
    let u64_at = |i: usize| u64::from_le_bytes(unit[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_le_bytes(unit[i..i + 4].try_into().expect("4 bytes"));
    let header = Header {
        offset: u64_at(8),
        generation: u64_at(16),
        seed: u64_at(24),
        job: u32_at(32),
        length: u32_at(36),
    };
    if header.length as usize != unit.len() {
        return Decoded::Bad(format!(
            "header says a {}-byte block, the verify unit is {} bytes",
            header.length,
            unit.len()
        ));
    }
    let stored = u64_at(CHECKSUM_AT);
    let actual = checksum(unit);
    if stored != actual {
        return Decoded::Bad(format!(
            "torn or corrupt: checksum {actual:#018x}, header says {stored:#018x} \
             (generation {} per the header)",
            header.generation
        ));
    }
    if header.offset != at {
        return Decoded::Bad(format!(
            "misplaced: this block was written for offset {}",
            header.offset
        ));
    }
    if unit[48..HEADER_BYTES].iter().any(|&b| b != 0) {
        return Decoded::Bad("reserved header bytes are not zero".into());
    }
    // The checksum already covers the body; regenerating it also catches a
    // block whose checksum was recomputed over the wrong content.
    let mut expected = vec![0u8; unit.len() - HEADER_BYTES];
    fill_body(&mut expected, body_seed(unit));
    if expected != unit[HEADER_BYTES..] {
        return Decoded::Bad("wrong content: the body does not match its header".into());
    }
    Decoded::Valid(header)
}

fn checksum(unit: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&unit[..CHECKSUM_AT]);
    h.update(&[0u8; 8]);
    h.update(&unit[CHECKSUM_AT + 8..]);
    h.digest()
}

fn body_seed(unit: &[u8]) -> u64 {
    xxh3_64(&unit[..CHECKSUM_AT])
}

/// SplitMix64: cheap, and every (header) gives a distinct stream.
fn fill_body(body: &mut [u8], seed: u64) {
    let mut state = seed;
    for chunk in body.chunks_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

/// Fills a buffer of any length with non-zero-looking bytes (writes without
/// verify: nothing may shortcut zero blocks).
pub fn fill_filler(buf: &mut [u8], seed: u64) {
    fill_body(buf, seed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            offset: 8192,
            generation: 7,
            seed: 42,
            job: 3,
            length: 4096,
        }
    }

    #[test]
    fn header_layout_is_fixed() {
        let mut unit = vec![0u8; 4096];
        encode(&mut unit, &header());
        assert_eq!(&unit[0..8], b"LCFSSTR1");
        assert_eq!(u64::from_le_bytes(unit[8..16].try_into().unwrap()), 8192);
        assert_eq!(u64::from_le_bytes(unit[16..24].try_into().unwrap()), 7);
        assert_eq!(u64::from_le_bytes(unit[24..32].try_into().unwrap()), 42);
        assert_eq!(u32::from_le_bytes(unit[32..36].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(unit[36..40].try_into().unwrap()), 4096);
        assert!(unit[48..64].iter().all(|&b| b == 0));
    }

    #[test]
    fn encode_then_decode_round_trips() {
        for length in [512u32, 4096, 65536] {
            let h = Header { length, ..header() };
            let mut unit = vec![0u8; length as usize];
            encode(&mut unit, &h);
            assert_eq!(decode(&unit, 8192), Decoded::Valid(h));
        }
    }

    #[test]
    fn zero_units_decode_as_zero() {
        assert_eq!(decode(&[0u8; 4096], 0), Decoded::Zero);
    }

    #[test]
    fn every_single_byte_flip_is_caught() {
        let mut unit = vec![0u8; 4096];
        encode(&mut unit, &header());
        for i in (0..4096).step_by(37) {
            let mut bad = unit.clone();
            bad[i] ^= 0x40;
            assert!(
                matches!(decode(&bad, 8192), Decoded::Bad(_)),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn torn_unit_is_reported_as_torn() {
        let mut old = vec![0u8; 4096];
        encode(&mut old, &header());
        let mut new = vec![0u8; 4096];
        encode(
            &mut new,
            &Header {
                generation: 8,
                ..header()
            },
        );
        // First half new, second half old: a torn write at 512-byte sectors.
        let mut torn = new.clone();
        torn[2048..].copy_from_slice(&old[2048..]);
        match decode(&torn, 8192) {
            Decoded::Bad(reason) => assert!(reason.contains("torn"), "{reason}"),
            other => panic!("expected torn, got {other:?}"),
        }
    }

    #[test]
    fn misplaced_unit_names_its_offset() {
        let mut unit = vec![0u8; 4096];
        encode(&mut unit, &header());
        match decode(&unit, 4096) {
            Decoded::Bad(reason) => assert!(reason.contains("8192"), "{reason}"),
            other => panic!("expected misplaced, got {other:?}"),
        }
    }
}
