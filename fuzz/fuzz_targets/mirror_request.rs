//! The registry mirror's request parsing (docs/mirror.md) on hostile
//! input: a path and a Range header. Nothing panics; a path accepted names
//! a repository of at most 255 bytes and a 64-digit digest or a tag; a
//! range accepted has first <= last, and its span in any blob lies inside
//! the blob. The third line is an upstream's WWW-Authenticate challenge:
//! read without panic, its scheme one token.
#![no_main]

use lcfs_mirror::{parse_range, route, span, Route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (path, rest) = text.split_once('\n').unwrap_or((&text, ""));
    let (range, challenge) = rest.split_once('\n').unwrap_or((rest, ""));
    if let Some((scheme, _)) = lcfs_mirror::upstream::parse_challenge(challenge) {
        assert!(!scheme.is_empty() && !scheme.contains(' '));
    }
    match route(path) {
        Ok(Route::Base) => assert!(path == "/v2/" || path == "/v2"),
        Ok(Route::Blob { name, hex }) => {
            assert!(name.len() <= 255 && !name.is_empty());
            assert!(!name.contains("..") && !name.starts_with('/'));
            assert_eq!(hex.len(), 64);
            assert!(path.ends_with(&format!("/blobs/sha256:{hex}")));
        }
        Ok(Route::Manifest { name, reference }) => {
            assert!(name.len() <= 255 && !name.contains(".."));
            assert!(!reference.is_empty() && !reference.contains('/'));
        }
        Err((status, code, _)) => assert!(status.is_client_error() && !code.is_empty()),
    }
    if let Some((first, last)) = parse_range(range) {
        assert!(last.is_none_or(|l| l >= first));
        for size in [0u64, 1, first, first.saturating_add(1), u64::MAX] {
            if let Some((a, b)) = span(Some((first, last)), size) {
                assert!(a < b && b <= size);
            }
        }
    }
});
