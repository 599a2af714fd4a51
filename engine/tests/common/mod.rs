//! What the engine's integration tests share: a configuration without
//! timers, a fresh engine on an in-memory device, and fsck must be clean.
#![allow(dead_code)] // each test binary uses part of it

use lcfs_engine::device::{Device, MemDevice};
use lcfs_engine::*;
use std::sync::Arc;

/// No timer flushes or checkpoints: the test decides when they happen.
pub fn quiet() -> Config {
    Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..Config::default()
    }
}

/// Formats `dev` with 256 KiB segments (small devices get many).
pub fn format(dev: Arc<dyn Device>) {
    Engine::format(
        dev,
        &FormatOptions {
            segment_size_bytes: 256 << 10,
            force: false,
        },
    )
    .unwrap();
}

/// A formatted in-memory device of `size` bytes (256 KiB segments) and an
/// engine on it.
pub fn fresh(size: u64) -> (Arc<MemDevice>, Arc<Engine>) {
    let dev = Arc::new(MemDevice::new(size));
    let d: Arc<dyn Device> = dev.clone();
    format(d.clone());
    (dev, Engine::open(d, quiet()).unwrap())
}

/// fsck (with data verification) finds nothing.
pub fn assert_clean(e: &Engine) {
    let r = e.fsck(true).unwrap();
    assert!(
        r.is_clean(),
        "fsck: {:#?}",
        &r.errors[..r.errors.len().min(20)]
    );
}
