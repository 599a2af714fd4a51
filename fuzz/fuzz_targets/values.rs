//! Fuzzes the tree value decoders on the same arbitrary bytes: `MapValue`,
//! `ExtentValue`, `InodeValue`, `LayerRecord`, `decode_named` and
//! `HotFiles`. None
//! panics; each accepts exactly the inputs long enough for its fixed layout
//! (and valid nanoseconds for inodes); what decodes round-trips, and
//! re-encoding reproduces the input bytes except for reserved fields and
//! flag normalisation, so the layouts in docs/format.md are pinned.
#![no_main]

use lcfs_engine::format::{
    decode_named, encode_named, ExtentValue, HotFiles, InodeValue, LayerRecord, LayerUsage,
    MapValue,
};
use libfuzzer_sys::fuzz_target;

/// Bytes an inode decode reads; the encoding appends 8 reserved zero bytes.
const INODE_READ_BYTES: usize = 104;
const INODE_BYTES: usize = 112;
const LAYER_FIXED_BYTES: usize = 88;

fuzz_target!(|data: &[u8]| {
    pair_value(data);
    inode(data);
    layer_record(data);
    named(data);
    hot_files(data);
});

/// A hot-file summary decodes only at its exact length (4 + 32 per entry,
/// at most 32 entries, inodes distinct) and re-encodes to the same bytes.
fn hot_files(data: &[u8]) {
    if let Ok(h) = HotFiles::decode(data) {
        assert_eq!(h.encode(), data);
        assert!(h.top().len() <= 32);
    }
}

fn pair_value(data: &[u8]) {
    // 16 bytes, or 20 with a count of extra owners (zero is not canonical).
    match MapValue::decode(data) {
        Ok(v) => {
            assert!(data.len() == 16 || data.len() == 20);
            let enc = v.encode();
            assert_eq!(enc.len(), if v.extra_owners == 0 { 16 } else { 20 });
            assert_eq!(enc, &data[..enc.len()]);
            assert_eq!(MapValue::decode(&enc).unwrap(), v);
        }
        Err(_) => assert!(data.len() != 16 && data.len() != 20),
    }
    match ExtentValue::decode(data) {
        Ok(v) => {
            assert!(data.len() >= 16);
            let enc = v.encode();
            assert_eq!(enc, &data[..16]);
            assert_eq!(ExtentValue::decode(&enc).unwrap(), v);
        }
        Err(_) => assert!(data.len() < 16),
    }
}

fn nanos_ok(data: &[u8], at: usize) -> bool {
    u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) < 1_000_000_000
}

fn inode(data: &[u8]) {
    let valid = data.len() >= INODE_READ_BYTES && [40, 56, 72].iter().all(|&at| nanos_ok(data, at));
    match InodeValue::decode(data) {
        Ok(v) => {
            assert!(
                valid,
                "inode decoded from {} bytes / bad nanoseconds",
                data.len()
            );
            let enc = v.encode();
            assert_eq!(enc.len(), INODE_BYTES);
            let mut want = data[..INODE_READ_BYTES].to_vec();
            for pad in [44, 60, 76] {
                want[pad..pad + 4].fill(0);
            }
            want.resize(INODE_BYTES, 0);
            assert_eq!(enc, want);
            assert_eq!(InodeValue::decode(&enc).unwrap(), v);
        }
        Err(_) => assert!(!valid, "valid inode bytes refused"),
    }
}

fn layer_record(data: &[u8]) {
    let name_len = if data.len() >= 28 {
        u16::from_le_bytes([data[26], data[27]]) as usize
    } else {
        usize::MAX
    };
    let valid = name_len != usize::MAX && data.len() >= LAYER_FIXED_BYTES + name_len;
    match LayerRecord::decode(data) {
        Ok(v) => {
            assert!(valid);
            assert_eq!(v.name.len(), name_len);
            let enc = v.encode();
            let mut want = data[..LAYER_FIXED_BYTES + name_len].to_vec();
            // A size limit follows the name when eight more bytes are there,
            // then usage when `LayerUsage::ENCODED_BYTES` more are, then a seal
            // root when eight more are; the limit is written back when not zero
            // or when usage is, usage when not all zero or when a seal is, a
            // seal when not zero.
            let quota_at = LAYER_FIXED_BYTES + name_len;
            let usage_at = quota_at + 8;
            let seal_at = usage_at + LayerUsage::ENCODED_BYTES;
            if let Some(q) = data.get(quota_at..quota_at + 8) {
                assert_eq!(v.quota_bytes, u64::from_le_bytes(q.try_into().unwrap()));
                let seal = data.get(seal_at..seal_at + 8);
                match seal {
                    Some(b) => assert_eq!(v.seal, u64::from_le_bytes(b.try_into().unwrap())),
                    None => assert_eq!(v.seal, 0),
                }
                let usage = data
                    .get(usage_at..usage_at + LayerUsage::ENCODED_BYTES)
                    .filter(|_| !v.usage.is_zero() || v.seal != 0);
                if v.quota_bytes != 0 || usage.is_some() {
                    want.extend_from_slice(q);
                }
                if let Some(u) = usage {
                    assert_eq!(v.usage.clones, u64::from_le_bytes(u[..8].try_into().unwrap()));
                    let mut u = u.to_vec();
                    // The padding after each timestamp's nanoseconds.
                    u[20..24].fill(0);
                    u[84..88].fill(0);
                    want.extend_from_slice(&u);
                }
                if v.seal != 0 {
                    want.extend_from_slice(seal.unwrap());
                }
            } else {
                assert_eq!(v.quota_bytes, 0);
                assert!(v.usage.is_zero());
                assert_eq!(v.seal, 0);
            }
            want[24] = (want[24] != 0) as u8;
            want[25] = (want[25] != 0) as u8;
            for pad in [44, 60] {
                want[pad..pad + 4].fill(0);
            }
            assert_eq!(enc, want);
            assert_eq!(LayerRecord::decode(&enc).unwrap(), v);
        }
        Err(_) => assert!(!valid, "valid layer record refused"),
    }
}

/// An independent reading of the named-list layout: u16 count, then per item
/// u16 name length, name, u16 payload length, payload; nothing after.
fn reference_named(data: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = data.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let u16_of = |s: &[u8]| u16::from_le_bytes([s[0], s[1]]) as usize;
    let count = u16_of(take(2)?);
    let mut out = Vec::new();
    for _ in 0..count {
        let l = u16_of(take(2)?);
        let name = take(l)?.to_vec();
        let l = u16_of(take(2)?);
        out.push((name, take(l)?.to_vec()));
    }
    (at == data.len()).then_some(out)
}

fn named(data: &[u8]) {
    let want = reference_named(data);
    match decode_named(data) {
        Ok(list) => {
            assert_eq!(Some(&list), want.as_ref());
            // Canonical: no slack anywhere, so encoding gives the input back.
            assert_eq!(encode_named(&list), data);
            assert_eq!(decode_named(&encode_named(&list)).unwrap(), list);
        }
        Err(_) => assert!(want.is_none(), "valid named list refused"),
    }
}
