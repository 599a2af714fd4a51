//! `lcfs estargz build|verify`: eStargz layers made and checked offline
//! (docs/lazy.md), the format lazily pulled layers are read in.

use crate::error::{Error, Result};
use lcfs_lazy::estargz::{self, BuildOptions, Index};
use std::path::Path;

fn lazy_err(e: estargz::Error) -> Error {
    Error::Usage(e.to_string())
}

/// `lcfs estargz build IN OUT`: writes tar (or tar+gzip) IN as eStargz OUT
/// (a new file: an existing one is refused).
pub fn build(
    input: &Path,
    output: &Path,
    chunk_size: u64,
    prefetch: Vec<String>,
    json: bool,
) -> Result<()> {
    let f = std::fs::File::open(input)
        .map_err(|e| Error::io(format!("opening {}", input.display()), e))?;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(output)
        .map_err(|e| Error::io(format!("creating {}", output.display()), e))?;
    let options = BuildOptions {
        chunk_size,
        prioritized: prefetch,
        ..BuildOptions::default()
    };
    let built = match estargz::build_file(f, std::io::BufWriter::new(out), &options) {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(output);
            return Err(lazy_err(e));
        }
    };
    if json {
        return crate::client::print_json(&serde_json::json!({
            "blob_digest": built.blob_digest,
            "blob_size": built.blob_size,
            "diff_id": built.diff_id,
            "toc_digest": built.toc_digest,
            "uncompressed_size": built.uncompressed_size,
            "entries": built.entries,
            "annotations": {
                estargz::TOC_DIGEST_ANNOTATION: built.toc_digest,
                estargz::UNCOMPRESSED_SIZE_ANNOTATION: built.uncompressed_size.to_string(),
            },
        }));
    }
    println!(
        "{}: {} bytes, {} entries",
        output.display(),
        built.blob_size,
        built.entries
    );
    println!("blob digest  {}", built.blob_digest);
    println!("diff id      {}", built.diff_id);
    println!(
        "toc digest   {}  ({})",
        built.toc_digest,
        estargz::TOC_DIGEST_ANNOTATION
    );
    println!(
        "uncompressed {} bytes  ({})",
        built.uncompressed_size,
        estargz::UNCOMPRESSED_SIZE_ANNOTATION
    );
    Ok(())
}

/// `lcfs estargz convert IMAGE OUT`: an image's layers rewritten as
/// eStargz into a new OCI layout.
pub fn convert(
    input: &Path,
    output: &Path,
    name: Option<&str>,
    chunk_size: u64,
    json: bool,
) -> Result<()> {
    let options = BuildOptions {
        chunk_size,
        ..BuildOptions::default()
    };
    let c = lcfs_lazy::image::convert(input, output, name, &options).map_err(lazy_err)?;
    if json {
        return crate::client::print_json(&serde_json::json!({
            "manifest_digest": c.manifest_digest,
            "manifest_size": c.manifest_size,
            "name": c.name,
            "layers": c.layers.iter().map(|l| serde_json::json!({
                "digest": l.blob_digest,
                "size": l.blob_size,
                "diff_id": l.diff_id,
                "toc_digest": l.toc_digest,
                "uncompressed_size": l.uncompressed_size,
            })).collect::<Vec<_>>(),
        }));
    }
    println!(
        "{}: {} ({}), {} layer(s)",
        output.display(),
        c.name.as_deref().unwrap_or("unnamed"),
        c.manifest_digest,
        c.layers.len()
    );
    for l in &c.layers {
        println!(
            "  {} {} bytes, toc {}",
            l.blob_digest, l.blob_size, l.toc_digest
        );
    }
    Ok(())
}

/// `lcfs estargz fetch URL PATH`: one file of a layer in a registry,
/// only its chunks fetched.
pub fn fetch(
    url: &str,
    path: &str,
    toc_digest: &str,
    output: Option<&Path>,
    timeout: u64,
) -> Result<()> {
    use std::io::Write;
    let layer = lcfs_lazy::remote::RemoteLayer::open(
        url,
        toc_digest,
        std::time::Duration::from_secs(timeout.max(1)),
    )
    .map_err(lazy_err)?;
    let data = layer.read_file(path).map_err(lazy_err)?;
    match output {
        Some(p) => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p)
                .map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
            f.write_all(&data)
                .map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
        }
        None => std::io::stdout()
            .write_all(&data)
            .map_err(|e| Error::io("writing standard output", e))?,
    }
    eprintln!(
        "{path}: {} bytes; fetched {} of the layer's {} bytes",
        data.len(),
        layer.fetched(),
        layer.index.blob_size
    );
    Ok(())
}

/// `lcfs estargz verify BLOB [--toc-digest D]`: the TOC (against D), every
/// chunk and every file's digest; lists the regular files.
pub fn verify(blob: &Path, toc_digest: Option<&str>, list: bool, json: bool) -> Result<()> {
    let mut f = std::fs::File::open(blob)
        .map_err(|e| Error::io(format!("opening {}", blob.display()), e))?;
    let index = Index::open(&mut f).map_err(lazy_err)?;
    if let Some(d) = toc_digest {
        index.verify_toc(d).map_err(lazy_err)?;
    }
    let report = index.verify_all(&mut f).map_err(lazy_err)?;
    // Regular files, and hard links as the files they name.
    let files: Vec<_> = index
        .entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let target = &index.entries[index.regular(i)?];
            Some((e.name.clone(), target.size, target.digest.clone()))
        })
        .collect();
    if json {
        return crate::client::print_json(&serde_json::json!({
            "toc_digest": index.toc_digest,
            "chunks": report.chunks,
            "files_checked": report.files,
            "bytes": report.bytes,
            "prefetch": index.prefetch().iter().map(|e| e.name.clone()).collect::<Vec<_>>(),
            "files": files.iter().map(|(n, s, d)| serde_json::json!({"name": n, "size": s, "digest": d})).collect::<Vec<_>>(),
        }));
    }
    if list {
        let mut sorted = files.clone();
        sorted.sort();
        for (n, s, d) in sorted {
            println!("{n}\t{s}\t{d}");
        }
        return Ok(());
    }
    println!(
        "{}: ok: toc {}{}, {} chunks ({} bytes), {} files checked",
        blob.display(),
        index.toc_digest,
        if toc_digest.is_some() {
            " (as expected)"
        } else {
            ""
        },
        report.chunks,
        report.bytes,
        report.files
    );
    Ok(())
}
