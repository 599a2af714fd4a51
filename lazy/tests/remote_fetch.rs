//! One file of an eStargz layer read from a registry (a small HTTP server
//! that serves ranges): only the footer, the TOC and that file's chunks
//! are fetched; a registry sending other bytes, or ignoring ranges, is
//! refused with the reason; a wrong TOC digest is refused before any file.

mod common;

use common::{registry, Serve};
use lcfs_lazy::estargz::{build, BuildOptions};
use lcfs_lazy::remote::RemoteLayer;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

fn layer() -> (Vec<u8>, String, Vec<u8>) {
    let big: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let small = b"#!/bin/sh\necho hello\n".to_vec();
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [("srv/big", &big), ("bin/hello", &small)] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    let mut blob = Vec::new();
    let built = build(
        Cursor::new(b.into_inner().unwrap()),
        &mut blob,
        &BuildOptions {
            chunk_size: 256 << 10,
            ..BuildOptions::default()
        },
    )
    .unwrap();
    (blob, built.toc_digest, big)
}

#[test]
fn a_file_costs_its_chunks_not_the_layer() {
    let (blob, toc, big) = layer();
    let blob = Arc::new(blob);
    let url = registry(blob.clone(), Serve::Ranges).url;
    let l = RemoteLayer::open(&url, &toc, Duration::from_secs(10)).unwrap();
    let toc_cost = l.fetched();
    assert_eq!(
        l.read_file("bin/hello").unwrap(),
        b"#!/bin/sh\necho hello\n"
    );
    let small_cost = l.fetched() - toc_cost;
    eprintln!(
        "blob {} bytes: footer and TOC {toc_cost}, bin/hello {small_cost}",
        blob.len()
    );
    assert!(toc_cost + small_cost < blob.len() as u64 / 10);
    assert_eq!(l.read_file("./srv/big").unwrap(), big);
    assert!(l.read_file("srv").is_err());
    assert!(l
        .read_file("nope")
        .unwrap_err()
        .to_string()
        .contains("no \"nope\""));
}

#[test]
fn wrong_bytes_a_wrong_toc_digest_and_no_ranges_are_refused() {
    let (blob, toc, _) = layer();
    let blob = Arc::new(blob);
    let e = RemoteLayer::open(
        &registry(blob.clone(), Serve::Ranges).url,
        &format!("sha256:{}", "0".repeat(64)),
        Duration::from_secs(10),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("the TOC hashes to"), "{e}");
    let e = RemoteLayer::open(
        &registry(blob.clone(), Serve::Whole).url,
        &toc,
        Duration::from_secs(10),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("must serve ranges"), "{e}");
    assert!(RemoteLayer::open(
        &registry(blob.clone(), Serve::Flipped).url,
        &toc,
        Duration::from_secs(10)
    )
    .is_err());
    let e = RemoteLayer::open(
        "http://127.0.0.1:9/v2/t/blobs/x",
        &toc,
        Duration::from_secs(2),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("127.0.0.1:9"), "{e}");
}

#[test]
fn a_registry_asking_for_basic_or_a_bearer_token_is_read_with_credentials() {
    use common::Auth;
    use lcfs_lazy::remote::Access;
    use lcfs_mirror::upstream::Credentials;
    let (blob, toc, _) = layer();
    let blob = Arc::new(blob);
    let access = |user: &str, password: &str| Access {
        credentials: Some(Credentials {
            username: user.into(),
            password: password.into(),
        }),
        ..Access::default()
    };
    let t = Duration::from_secs(10);

    let basic = Auth::Basic("puller:pw".into());
    let bearer = Auth::Bearer {
        user_password: "puller:pw".into(),
        token: "t0k3n".into(),
    };
    // What a refusal says: without credentials, and with a wrong password.
    for (auth, without, wrong) in [
        (basic, "none are configured", "401"),
        (bearer, "token service", "token service"),
    ] {
        let r = registry(blob.clone(), Serve::Ranges);
        r.require(auth.clone());
        let e = RemoteLayer::open(&r.url, &toc, t).err().unwrap();
        assert!(e.to_string().contains(without), "{auth:?}: {e}");
        let l = RemoteLayer::open_with(&r.url, &toc, t, &access("puller", "pw")).unwrap();
        assert_eq!(
            l.read_file("bin/hello").unwrap(),
            b"#!/bin/sh\necho hello\n"
        );
        let e = RemoteLayer::open_with(&r.url, &toc, t, &access("puller", "wrong"))
            .err()
            .unwrap();
        assert!(e.to_string().contains(wrong), "{auth:?}: {e}");
    }
}
