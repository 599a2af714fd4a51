//! `lcfs fsck`: checks a device offline (no daemon may hold it), or asks the
//! running daemon to check its live engine (`--online`); and `lcfs layer
//! digest`, which reads a device offline the same way or asks the daemon.

use crate::device;
use crate::error::{Error, Result};
use crate::protocol::{Difference, FsckReport, LayerDigest, Verification, VERIFY_LISTED_MAX};
use crate::size::human_bytes;
use lcfs_engine::digest::{digest_string, parse_digest};
use lcfs_engine::{Config, Engine};
use std::path::Path;

/// Runs `f` on an engine opened on `path` with no daemon holding it
/// (`online`: what to use instead). Opening replays the log past the last
/// checkpoint, like any open; nothing else is written.
fn with_device<T>(path: &Path, online: &str, f: impl FnOnce(&Engine) -> Result<T>) -> Result<T> {
    if !path.exists() {
        return Err(device::no_device(path));
    }
    let _lock = device::lock(path).map_err(|e| match e {
        Error::Usage(m) => Error::Usage(format!("{m}; stop the daemon first, or {online}")),
        e => e,
    })?;
    let dev = device::open(path)?;
    let config = Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..Config::default()
    };
    let engine = device::open_engine(path, dev, config)?;
    let result = f(&engine)?;
    engine
        .close()
        .map_err(|e| Error::engine(format!("closing {}", path.display()), e))?;
    Ok(result)
}

/// Checks `path` offline.
pub fn offline(path: &Path, verify_data: bool) -> Result<FsckReport> {
    let online = "check the live filesystem with `lcfs fsck --online`";
    with_device(path, online, |engine| {
        let report = engine
            .fsck(verify_data)
            .map_err(|e| Error::engine(format!("checking {}", path.display()), e))?;
        Ok(FsckReport::from(&report))
    })
}

/// `--expect DIGEST`, checked before anything is read, as
/// `sha256:<lower-case hex>`.
fn expected(expect: Option<&str>) -> Result<Option<String>> {
    expect
        .map(|e| {
            parse_digest(e)
                .map(|d| digest_string(&d))
                .map_err(|e| Error::Usage(format!("--expect: {e}")))
        })
        .transpose()
}

/// Most bytes of a manifest read.
const MANIFEST_MAX_BYTES: u64 = 1 << 30;

/// A manifest path the daemon opens must be absolute (its working
/// directory is not the caller's).
fn absolute(path: &Path) -> Result<()> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "the manifest path {} must be absolute",
            path.display()
        )))
    }
}

/// Layer `name`'s digest; with `manifest`, its manifest written there too
/// (an absolute path; the file is made, never replaced).
pub fn digest_with_manifest(
    engine: &Engine,
    name: &str,
    manifest: Option<&Path>,
) -> Result<LayerDigest> {
    let context = || format!("digest of layer {name:?}");
    let Some(path) = manifest else {
        let d = lcfs_engine::digest::layer_digest(engine, name, |_| {})
            .map_err(|e| Error::engine(context(), e))?;
        return Ok(LayerDigest::new(name, &d));
    };
    absolute(path)?;
    let (d, bytes) = lcfs_engine::digest::layer_manifest(engine, name)
        .map_err(|e| Error::engine(context(), e))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    std::io::Write::write_all(&mut f, &bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok(LayerDigest::new(name, &d))
}

/// Layer `name` against the manifest at `path`.
pub fn verify(engine: &Engine, name: &str, path: &Path) -> Result<Verification> {
    absolute(path)?;
    let read = || -> std::io::Result<Vec<u8>> {
        let f = std::fs::File::open(path)?;
        if f.metadata()?.len() > MANIFEST_MAX_BYTES {
            return Err(std::io::Error::other("larger than 1 GiB"));
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(f, MANIFEST_MAX_BYTES), &mut bytes)?;
        Ok(bytes)
    };
    let bytes =
        read().map_err(|e| Error::io(format!("reading the manifest {}", path.display()), e))?;
    let v = lcfs_engine::digest::verify_against(engine, name, &bytes).map_err(|e| {
        Error::engine(
            format!("verifying layer {name:?} against {}", path.display()),
            e,
        )
    })?;
    Ok(Verification {
        name: name.to_string(),
        root: digest_string(&v.digest.root),
        manifest_root: digest_string(&v.manifest_root),
        differences_total: v.differences.len() as u64,
        differences: v
            .differences
            .into_iter()
            .take(VERIFY_LISTED_MAX)
            .map(|(p, w)| Difference {
                path: String::from_utf8_lossy(&p).into_owned(),
                what: w.into_iter().map(String::from).collect(),
            })
            .collect(),
    })
}

/// `lcfs verify`: layer `name` against a manifest, from the daemon or
/// read from `device` offline; prints each difference; an error (exit
/// status 1) on any, or when `expect` is given and the manifest's root is
/// another. A malformed `expect` is refused before anything is read.
pub fn verify_command(
    socket: &Path,
    name: &str,
    manifest: &Path,
    expect: Option<&str>,
    device: Option<&Path>,
    json: bool,
) -> Result<()> {
    let want = expected(expect)?;
    let manifest = std::path::absolute(manifest)
        .map_err(|e| Error::io(format!("the path {}", manifest.display()), e))?;
    let v = match device {
        Some(path) => with_device(path, "leave out --device to ask the daemon", |engine| {
            verify(engine, name, &manifest)
        })?,
        None => crate::client::layer_verify(socket, name, &manifest)?,
    };
    if json {
        crate::client::print_json(&v)?;
    } else {
        for d in &v.differences {
            println!("{}: {}", d.path, d.what.join(", "));
        }
        if v.differences_total > v.differences.len() as u64 {
            println!(
                "... and {} more",
                v.differences_total - v.differences.len() as u64
            );
        }
        println!(
            "{}: {} entries differ from the manifest (root {}, now {})",
            v.name, v.differences_total, v.manifest_root, v.root
        );
    }
    if let Some(w) = want {
        if w != v.manifest_root {
            return Err(Error::Problems(format!(
                "the manifest's root is {}, not the expected {w}: it is not the manifest of that layer",
                v.manifest_root
            )));
        }
    }
    if v.differences_total > 0 {
        return Err(Error::Problems(format!(
            "layer {name:?}: {} entries differ from the manifest",
            v.differences_total
        )));
    }
    Ok(())
}

/// `lcfs layer digest`: layer `name`'s root from the daemon, or read from
/// `device` offline; an error (exit status 1) when `expect` is given and
/// differs. A malformed `expect` is refused before anything is read.
pub fn layer_digest(
    socket: &Path,
    name: &str,
    expect: Option<&str>,
    manifest: Option<&Path>,
    device: Option<&Path>,
    json: bool,
) -> Result<()> {
    let want = expected(expect)?;
    let manifest = manifest
        .map(|m| {
            std::path::absolute(m).map_err(|e| Error::io(format!("the path {}", m.display()), e))
        })
        .transpose()?;
    let d = match device {
        Some(path) => with_device(path, "leave out --device to ask the daemon", |engine| {
            digest_with_manifest(engine, name, manifest.as_deref())
        })?,
        None => crate::client::layer_digest(socket, name, manifest.as_deref())?,
    };
    if json {
        crate::client::print_json(&d)?;
    } else {
        println!("{}  {}", d.root, d.name);
        println!(
            "  {} entries, {} regular files, {} of file data",
            d.entries,
            d.files,
            human_bytes(d.file_bytes)
        );
    }
    match want {
        Some(w) if w != d.root => Err(Error::Problems(format!(
            "layer {name:?} has root {}, not the expected {w}",
            d.root
        ))),
        _ => Ok(()),
    }
}

/// Prints a report; an error when it found problems (so the exit code is 1).
pub fn print(what: &str, report: &FsckReport) -> Result<()> {
    println!(
        "{what}: {}",
        if report.clean {
            "clean".to_string()
        } else {
            format!("{} problems", report.errors.len())
        }
    );
    println!(
        "  {} layers, {} inodes, {} extents, {} tree nodes, {} map nodes ({} entries), {} data blocks verified",
        report.layers,
        report.inodes,
        report.extents,
        report.tree_nodes,
        report.map_nodes,
        report.map_entries,
        report.data_blocks_verified
    );
    for e in &report.errors {
        println!("  problem: {e}");
    }
    if report.clean {
        Ok(())
    } else {
        Err(Error::Problems(format!(
            "{what}: fsck found {} problems",
            report.errors.len()
        )))
    }
}
