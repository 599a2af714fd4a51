//! Helpers shared by the block decoder targets (included with `#[path]`; not a
//! target itself). The layout constants are spelled out rather than taken
//! from the engine, so a change to the on-disk format is caught here and in
//! docs/format.md instead of silently followed.

use lcfs_engine::format::data_checksum;

/// Every on-disk block is 4096 bytes.
pub const BLOCK_BYTES: usize = 4096;

/// Control bits of the framed inputs: repair the magic, repair the checksum,
/// take the expected address / index from the block's own header.
pub const FIX_MAGIC: u8 = 1;
pub const FIX_CHECKSUM: u8 = 2;
pub const OWN_ADDRESS: u8 = 4;

/// The first 4096 bytes of `data`, zero-padded when shorter.
pub fn block_of(data: &[u8]) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK_BYTES];
    let n = data.len().min(BLOCK_BYTES);
    block[..n].copy_from_slice(&data[..n]);
    block
}

/// Little-endian u64 at `at`.
pub fn u64_at(block: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(block[at..at + 8].try_into().unwrap())
}

/// Little-endian u32 at `at`.
pub fn u32_at(block: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(block[at..at + 4].try_into().unwrap())
}

/// Little-endian u16 at `at`.
pub fn u16_at(block: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(block[at..at + 2].try_into().unwrap())
}

/// The checksum every block kind stores: xxh3-64 of the whole block with its
/// own 8-byte checksum field read as zero.
pub fn checksum_with_hole(block: &[u8], at: usize) -> u64 {
    let mut copy = block.to_vec();
    copy[at..at + 8].fill(0);
    data_checksum(&copy)
}

/// Rewrites the checksum field at `at` so the block verifies.
pub fn fix_checksum(block: &mut [u8], at: usize) {
    let c = checksum_with_hole(block, at);
    block[at..at + 8].copy_from_slice(&c.to_le_bytes());
}

/// Asserts that the checksum field at `at` holds what the format says.
pub fn assert_checksum(block: &[u8], at: usize) {
    assert_eq!(
        u64_at(block, at),
        checksum_with_hole(block, at),
        "stored checksum at {at} is not xxh3-64 of the block with the field zeroed"
    );
}

/// A few (position, non-zero xor mask) pairs derived from the input, plus the
/// first byte, the checksum field and the last byte, for single-byte
/// corruption checks.
pub fn flips(data: &[u8], checksum_at: usize) -> Vec<(usize, u8)> {
    // FNV-1a: cheap, deterministic, spreads every input byte.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let mut out = vec![(0, 0x01), (checksum_at, 0x80), (BLOCK_BYTES - 1, 0x40)];
    for k in 0..4 {
        let x = h.rotate_left(16 * k);
        out.push(((x as usize) % BLOCK_BYTES, ((x >> 32) as u8) | 1));
    }
    out
}
