//! eStargz input from a registry (docs/lazy.md): a footer, a TOC member
//! (gzip of a tar holding the TOC JSON), a TOC's entries, and a chunk's
//! member. Nothing panics or allocates without bound; a footer read gives
//! an offset; a TOC accepted has its chunks inside the blob, in blob order,
//! covering each file exactly; a chunk read is the size its entry says.
//! What a lazy mount makes of an accepted TOC (the tree's tar, the files
//! given absent blocks and their chunks) is made without a panic: the
//! files are regular, each with its own chunks, and the tar reads back.
#![no_main]

use lcfs_lazy::estargz::{parse_footer, Index, Toc};
use lcfs_lazy::skeleton::{chunk_ranges, lazy_files, skeleton_tar};
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let _ = parse_footer(data);
    let blob_size = 1 << 20;
    let toc_offset = 1 << 19;
    // As the TOC JSON, and as the TOC member it would be read from.
    let indexes = [
        serde_json::from_slice::<Toc>(data)
            .ok()
            .and_then(|t| Index::from_toc(t, String::new(), toc_offset, blob_size).ok()),
        Index::from_toc_member(data, toc_offset, blob_size).ok(),
        {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let mut h = tar::Header::new_ustar();
            h.as_old_mut().name[..17].copy_from_slice(b"stargz.index.json");
            h.set_size(data.len() as u64);
            h.set_mode(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            gz.write_all(h.as_bytes()).unwrap();
            gz.write_all(data).unwrap();
            gz.write_all(&vec![0u8; (512 - data.len() % 512) % 512 + 1024]).unwrap();
            Index::from_toc_member(&gz.finish().unwrap()[..], toc_offset, blob_size).ok()
        },
    ];
    for index in indexes.into_iter().flatten() {
        let mut last = 0;
        for (i, c) in index.chunks.iter().enumerate() {
            assert!(c.start >= last && c.start < c.end && c.end <= toc_offset);
            last = c.start;
            let e = &index.entries[c.entry];
            assert!(c.file_offset + c.size <= e.size as u64);
            // A chunk's member: the input itself.
            if let Ok(bytes) = index.read_chunk(i, data) {
                assert_eq!(bytes.len() as u64, c.size);
            }
        }
        let ranges = chunk_ranges(&index);
        for f in lazy_files(&index) {
            assert_eq!(index.entries[f].kind, "reg");
            if let Some(r) = ranges.get(&f) {
                assert!(r.clone().all(|n| index.chunks[n].entry == f));
            }
        }
        if let Ok(tar) = skeleton_tar(&index) {
            let mut archive = tar::Archive::new(&tar[..]);
            for e in archive.entries().unwrap() {
                assert_eq!(e.unwrap().header().size().unwrap(), 0);
            }
        }
    }
});
