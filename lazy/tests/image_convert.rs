//! A `docker save` archive converted to an OCI layout of eStargz layers
//! (docs/lazy.md, "Images"): every blob is where its digest says, each
//! layer verifies against the TOC digest its annotation carries and holds
//! the input layer's files, the config's DiffIDs are the new layers', the
//! index names the image; an archive entry leaving the archive and an
//! existing output are refused.

use lcfs_lazy::estargz::{
    sha256_digest, BuildOptions, Index, TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION,
};
use lcfs_lazy::image::convert;
use std::io::{Cursor, Read};
use std::path::Path;

fn layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn archive(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn read(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn a_saved_image_becomes_an_oci_layout_of_estargz_layers() {
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let l1 = layer(&[("bin/sh", b"#!/bin/sh\n"), ("etc/os-release", b"ID=test\n")]);
    let l2 = layer(&[("srv/big", &big), ("etc/.wh.os-release", b"")]);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&l1), sha256_digest(&l2)]},
    });
    let saved = archive(&[
        ("l1/layer.tar", l1.clone()),
        ("l2/layer.tar", l2.clone()),
        ("config.json", serde_json::to_vec(&config).unwrap()),
        (
            "manifest.json",
            serde_json::to_vec(&serde_json::json!([{
                "Config": "config.json", "RepoTags": ["e2e/lazy:1"], "Layers": ["l1/layer.tar", "l2/layer.tar"]
            }]))
            .unwrap(),
        ),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("saved.tar");
    std::fs::write(&input, &saved).unwrap();
    let out = dir.path().join("layout");
    let options = BuildOptions {
        chunk_size: 65536,
        ..BuildOptions::default()
    };
    let c = convert(&input, &out, None, &options).unwrap();
    assert_eq!(c.name.as_deref(), Some("e2e/lazy:1"));
    // Every blob is named by its digest.
    for e in std::fs::read_dir(out.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let data = std::fs::read(e.path()).unwrap();
        assert_eq!(
            sha256_digest(&data),
            format!("sha256:{}", e.file_name().to_str().unwrap())
        );
    }
    let index = read(&out.join("index.json"));
    assert_eq!(
        index["manifests"][0]["annotations"]["io.containerd.image.name"],
        "e2e/lazy:1"
    );
    assert_eq!(index["manifests"][0]["digest"], c.manifest_digest);
    let blob = |d: &serde_json::Value| {
        out.join("blobs/sha256")
            .join(d.as_str().unwrap().trim_start_matches("sha256:"))
    };
    let manifest = read(&blob(&index["manifests"][0]["digest"]));
    let new_config = read(&blob(&manifest["config"]["digest"]));
    assert_eq!(new_config["config"]["Cmd"][0], "/bin/sh");
    for (i, (l, input_layer)) in manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip([&l1, &l2])
        .enumerate()
    {
        let data = std::fs::read(blob(&l["digest"])).unwrap();
        assert_eq!(l["size"], data.len());
        let toc = l["annotations"][TOC_DIGEST_ANNOTATION].as_str().unwrap();
        let ix = Index::open(&mut Cursor::new(&data)).unwrap();
        ix.verify_toc(toc).unwrap();
        ix.verify_all(&mut Cursor::new(&data)).unwrap();
        // The DiffID the config lists is the layer's uncompressed digest.
        let mut plain = Vec::new();
        flate2::read::MultiGzDecoder::new(&data[..])
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(new_config["rootfs"]["diff_ids"][i], sha256_digest(&plain));
        assert_eq!(
            l["annotations"][UNCOMPRESSED_SIZE_ANNOTATION],
            plain.len().to_string()
        );
        // Every input file is there with its content.
        let mut a = tar::Archive::new(&input_layer[..]);
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_str().unwrap().to_string();
            let mut content = Vec::new();
            e.read_to_end(&mut content).unwrap();
            let entry = &ix.entries[ix.by_name[&name]];
            assert_eq!(entry.digest, sha256_digest(&content), "{name}");
        }
    }
    // The output is never written over.
    let e = convert(&input, &out, None, &options).unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");
}

#[test]
fn an_archive_entry_leaving_the_archive_is_refused() {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    // The tar crate refuses to write `..` through set_path; write the name raw.
    h.as_old_mut().name[..9].copy_from_slice(b"../escape");
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.tar");
    std::fs::write(&input, b.into_inner().unwrap()).unwrap();
    let e = convert(
        &input,
        &dir.path().join("out"),
        None,
        &BuildOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("leaves the archive"), "{e}");
    assert!(!dir.path().join("escape").exists());
    assert!(!dir.path().join("out").exists());
}
