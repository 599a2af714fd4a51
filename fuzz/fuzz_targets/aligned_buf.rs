//! Fuzzes `AlignedBuf::from_slice`: the buffer holds an exact copy of the
//! input followed by zero padding, starts 4096-aligned, and its length is a
//! whole number of 4096-byte blocks (what O_DIRECT needs).
#![no_main]

use lcfs_engine::device::AlignedBuf;
use libfuzzer_sys::fuzz_target;

// Spelled out rather than taken from `BLOCK_SIZE`, so a change to the
// constant is caught here instead of silently followed.
const BLOCK_BYTES: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let buf = AlignedBuf::from_slice(data);
    assert!(buf.len() >= data.len());
    assert_eq!(&buf[..data.len()], data);
    assert!(buf[data.len()..].iter().all(|&byte| byte == 0));
    assert_eq!(buf.len() % BLOCK_BYTES, 0);
    assert_eq!(buf.as_ptr() as usize % BLOCK_BYTES, 0);
});
