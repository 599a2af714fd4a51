//! `lcfs mkfs`: writes an empty lcfs onto a block device or a (new, sparse) file.

use crate::device;
use crate::error::{Error, Result};
use crate::size::human_bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lcfs_engine::device::create_sparse_file;
use lcfs_engine::{Config, Engine, FormatOptions};
use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

pub struct MkfsOptions<'a> {
    pub device: &'a Path,
    pub size_bytes: Option<u64>,
    pub segment_size_bytes: u64,
    pub force: bool,
}

/// Steps shown on the progress bar.
const STEPS: u64 = 4;

pub fn run(o: &MkfsOptions<'_>) -> Result<()> {
    let progress = progress_bar();
    progress.set_message("preparing the device");
    let created = create_device_file(o)?;
    let result = format(o, &progress);
    progress.finish_and_clear();
    if result.is_err() && created {
        // Leave nothing behind that the user did not have before.
        let _ = std::fs::remove_file(o.device);
    }
    let (size_bytes, segments, backend) = result?;
    println!(
        "formatted {}: {}, {segments} segments of {}, I/O backend {backend}",
        o.device.display(),
        human_bytes(size_bytes),
        human_bytes(o.segment_size_bytes),
    );
    println!("start it with: lcfs daemon --device {}", o.device.display());
    Ok(())
}

/// A bar on stderr when it is a terminal, nothing otherwise (logs, pipes, CI).
fn progress_bar() -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(STEPS), target);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:20}] {pos}/{len} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// Creates the sparse file when asked to; returns whether it did.
fn create_device_file(o: &MkfsOptions<'_>) -> Result<bool> {
    let path = o.device;
    match (std::fs::symlink_metadata(path), o.size_bytes) {
        (Err(e), Some(size)) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
            }
            create_sparse_file(path, size)
                .map_err(|e| Error::engine(format!("creating {}", path.display()), e))?;
            Ok(true)
        }
        (Err(e), None) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Usage(format!(
            "{} does not exist; give --size (for example --size 10G) to create a sparse file",
            path.display()
        ))),
        (Err(e), _) => Err(Error::io(path.display().to_string(), e)),
        (Ok(m), Some(size)) if m.is_file() && m.len() == 0 => {
            create_sparse_file(path, size)
                .map_err(|e| Error::engine(format!("sizing {}", path.display()), e))?;
            Ok(false)
        }
        (Ok(m), Some(_)) => {
            eprintln!(
                "lcfs: {} exists ({}); --size only applies when creating a file, ignoring it",
                path.display(),
                human_bytes(m.len())
            );
            Ok(false)
        }
        (Ok(_), None) => Ok(false),
    }
}

/// Formats and verifies; returns (device size, segments, backend).
fn format(o: &MkfsOptions<'_>, progress: &ProgressBar) -> Result<(u64, u64, &'static str)> {
    let path = o.device;
    progress.inc(1);
    progress.set_message("opening the device");
    let _lock = device::lock(path)?;
    let dev = device::open(path)?;
    progress.inc(1);
    progress.set_message("writing the superblocks and segment table");
    Engine::format(
        dev.clone(),
        &FormatOptions {
            segment_size_bytes: o.segment_size_bytes,
            force: o.force,
        },
    )
    .map_err(|e| match e {
        lcfs_engine::Error::Signature(sig) if sig == "lcfs" => Error::Usage(format!(
            "{} already holds an lcfs; refusing to format it (use --force to start over, \
             destroying every layer on it)",
            path.display()
        )),
        lcfs_engine::Error::Signature(sig) if sig.starts_with("lcfs") => Error::Usage(format!(
            "{} holds an {sig}; refusing to format it: `lcfs fsck` may recover it (use \
             --force to start over, destroying every layer on it)",
            path.display()
        )),
        lcfs_engine::Error::Signature(sig) => Error::Usage(format!(
            "{}: device carries a {sig} signature; refusing to format it (use --force to \
             overwrite, destroying what is on it)",
            path.display()
        )),
        e => Error::engine(format!("formatting {}", path.display()), e),
    })?;
    progress.inc(1);
    progress.set_message("verifying");
    let config = Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..Config::default()
    };
    let engine = device::open_engine(path, dev.clone(), config)?;
    let report = engine
        .fsck(false)
        .map_err(|e| Error::engine("verifying the new filesystem", e))?;
    if !report.is_clean() {
        return Err(Error::Problems(format!(
            "the new filesystem on {} does not verify: {}",
            path.display(),
            report.errors.join("; ")
        )));
    }
    let stats = engine.stats();
    engine
        .close()
        .map_err(|e| Error::engine("closing the new filesystem", e))?;
    progress.inc(1);
    Ok((dev.size_bytes(), u64::from(stats.segments), stats.backend))
}
