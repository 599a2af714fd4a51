//! lcfs Docker graphdriver plugin: serves Docker's GraphDriver protocol
//! (moby 20.10, `daemon/graphdriver/proxy.go`) on a unix socket, with every
//! image and container layer an lcfs engine layer mounted at
//! `<mount>/<id>/`.
//!
//! ```no_run
//! # fn demo(engine: std::sync::Arc<lcfs_engine::Engine>) -> std::io::Result<()> {
//! use std::path::Path;
//! use std::sync::Arc;
//! let mount = Path::new("/var/lib/lcfs/mnt");
//! let driver = lcfs_dockerplugin::Driver::new(engine, mount, Arc::new(lcfs_dockerplugin::NoMount));
//! let server = lcfs_dockerplugin::serve(
//!     Arc::new(driver),
//!     Path::new(lcfs_dockerplugin::DEFAULT_SOCKET),
//!     lcfs_dockerplugin::Limits::default(),
//! )?;
//! server.shutdown();
//! # Ok(())
//! # }
//! ```

mod apply;
mod driver;
mod error;
mod export;
mod http;
mod socket;
mod tree;
mod wire;

pub use apply::{
    applied_inode, apply_tar, entry_link, entry_path, record_diff_id, Sha256Reader, DIFF_ID_KEY,
};

/// Writes the layer tar (Docker's and OCI's whiteouts, hard links, xattrs)
/// of what layer `id` changed against `parent`: its own parent in the
/// engine, or "" for everything it shows. Any other parent is refused
/// ([`Error::Unsupported`]). What the plugin's Diff streams; the containerd
/// differ's Diff too.
pub fn export_diff(
    engine: &lcfs_engine::Engine,
    id: &str,
    parent: &str,
    out: impl std::io::Write,
) -> Result<()> {
    let (changes, against) = export::changes(engine, id, parent)?;
    export::write_diff(engine, id, (&changes, against), out)
}
pub use driver::{DiffPlan, Driver};
pub use error::{Error, Result};
pub use http::{
    serve, CallCounters, CallStats, Limits, MethodStats, PluginServer, MAX_JSON_BYTES,
    OTHER_METHOD, PLUGIN_METHODS,
};
pub use lcfs_fsfront::{KernelCache, NoMount};
pub use socket::{bind_root_only, peer_uid};

/// Where Docker looks for a plugin named `lcfs` (`dockerd -s lcfs`).
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/lcfs.sock";
