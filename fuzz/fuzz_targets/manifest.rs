//! Fuzzes layer manifests (`lcfs verify --manifest FILE` reads one a user
//! gives it): `read_manifest` never panics, accepts only the header followed
//! by whole records, and what it accepts re-encodes to the same bytes, so
//! the record layout in docs/format.md ("Layer digests") is pinned.
#![no_main]

use lcfs_engine::digest::{read_manifest, ROOT_DOMAIN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, records)) = read_manifest(data) {
        let mut again = ROOT_DOMAIN.to_vec();
        for r in &records {
            r.encode(&mut again);
        }
        assert_eq!(again, data);
    }
});
