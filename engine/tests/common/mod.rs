//! What the engine's integration tests share: a configuration without
//! timers, a fresh engine on an in-memory device, seeds and sizes from the
//! environment, and fsck must be clean.
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

/// The seed of a randomized test: `LCFS_SEED` when set, else a random one
/// (the caller prints it, so a failure can be replayed).
pub fn seed() -> u64 {
    env_or("LCFS_SEED", rand::random())
}

/// Environment variable `name` as a number, else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
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
