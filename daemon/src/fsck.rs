//! `lcfs fsck`: checks a device offline (no daemon may hold it), or asks the
//! running daemon to check its live engine (`--online`).

use crate::device;
use crate::error::{Error, Result};
use crate::protocol::FsckReport;
use lcfs_engine::Config;
use std::path::Path;

/// Checks `path` offline. Opening replays the log past the last checkpoint,
/// like any open; nothing else is written.
pub fn offline(path: &Path, verify_data: bool) -> Result<FsckReport> {
    if !path.exists() {
        return Err(device::no_device(path));
    }
    let _lock = device::lock(path).map_err(|e| match e {
        Error::Usage(m) => Error::Usage(format!(
            "{m}; stop the daemon first, or check the live filesystem with `lcfs fsck --online`"
        )),
        e => e,
    })?;
    let dev = device::open(path)?;
    let config = Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..Config::default()
    };
    let engine = device::open_engine(path, dev, config)?;
    let report = engine
        .fsck(verify_data)
        .map_err(|e| Error::engine(format!("checking {}", path.display()), e))?;
    engine
        .close()
        .map_err(|e| Error::engine(format!("closing {}", path.display()), e))?;
    Ok(FsckReport::from(&report))
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
