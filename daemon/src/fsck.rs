//! `lcfs fsck`: checks a device offline (no daemon may hold it), or asks the
//! running daemon to check its live engine (`--online`); and `lcfs layer
//! digest`, which reads a device offline the same way or asks the daemon.

use crate::device;
use crate::error::{Error, Result};
use crate::protocol::{FsckReport, LayerDigest};
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

/// `lcfs layer digest`: layer `name`'s root from the daemon, or read from
/// `device` offline; an error (exit status 1) when `expect` is given and
/// differs. A malformed `expect` is refused before anything is read.
pub fn layer_digest(
    socket: &Path,
    name: &str,
    expect: Option<&str>,
    device: Option<&Path>,
    json: bool,
) -> Result<()> {
    let want = expect
        .map(|e| parse_digest(e).map_err(|e| Error::Usage(format!("--expect: {e}"))))
        .transpose()?;
    let d = match device {
        Some(path) => with_device(path, "leave out --device to ask the daemon", |engine| {
            let d = lcfs_engine::digest::layer_digest(engine, name, |_| {})
                .map_err(|e| Error::engine(format!("digest of layer {name:?}"), e))?;
            Ok(LayerDigest::new(name, &d))
        })?,
        None => crate::client::layer_digest(socket, name)?,
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
    match want.map(|w| digest_string(&w)) {
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
