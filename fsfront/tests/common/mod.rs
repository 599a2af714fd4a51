//! What the mount tests share: the root check, an engine on a memory
//! device, and running a shell line as an unprivileged user.

use lcfs_engine::device::{Device, MemDevice};
use lcfs_engine::{Config, Engine, FormatOptions};
use std::sync::Arc;

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "needs root for a FUSE mount; CI runs as root"
    );
    assert!(
        std::path::Path::new("/dev/fuse").exists(),
        "needs /dev/fuse"
    );
}

/// A fresh engine on a memory device of `bytes`.
pub fn engine_of(bytes: u64) -> Arc<Engine> {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(bytes));
    Engine::format(dev.clone(), &FormatOptions::default()).unwrap();
    Engine::open(dev, Config::default()).unwrap()
}

/// Runs `sh -c script` as the user nobody (65534); whether it succeeded.
pub fn as_nobody(script: &str) -> bool {
    use std::os::unix::process::CommandExt;
    std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .uid(65534)
        .gid(65534)
        .status()
        .unwrap()
        .success()
}
