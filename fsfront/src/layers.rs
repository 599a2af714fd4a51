//! Layer operations done beside the mount (by the control socket, the
//! Docker plugin and the containerd snapshotter), written once: each keeps the kernel's view of the mount
//! right. A layer is cloned, frozen or read only after the kernel has
//! written back what it caches of writes (the writeback cache), and the
//! kernel forgets its entry for a layer that was created, removed, frozen
//! or filled, so the next lookup sees the change.

use lcfs_engine::{Engine, LayerMetadata};
use std::collections::HashSet;
use std::fmt;
use std::io;
use std::sync::Arc;

/// What the kernel caches, through the FUSE mount, of layers changed
/// beside it.
pub trait KernelCache: Send + Sync {
    /// Layer `layer` was created, removed, frozen or filled beside the
    /// mount: the kernel forgets its cached entry for the layer's directory
    /// (its name in the mount root, and with it the directory's attributes).
    fn forget_layer_entry(&self, layer: &str);
    /// [`KernelCache::forget_layer_entry`] for a removed layer nobody looks
    /// up through the mount any more; it may happen after the call returns.
    fn forget_removed_layer(&self, layer: &str) {
        self.forget_layer_entry(layer);
    }
    /// The layers whose directory (or a directory below it) is mounted
    /// somewhere else in the daemon's mount namespace.
    fn layers_mounted(&self) -> HashSet<String> {
        HashSet::new()
    }
    /// Writes the kernel still holds (the mount's writeback cache) reach the
    /// engine.
    fn write_back(&self) -> io::Result<()>;
}

/// No mount: nothing cached (tools and tests that use the engine alone).
pub struct NoMount;

impl KernelCache for NoMount {
    fn forget_layer_entry(&self, _layer: &str) {}
    fn write_back(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a layer operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum LayerError {
    /// The kernel's cached writes could not be written back.
    WriteBack(io::Error),
    /// The engine refused or failed.
    Engine(lcfs_engine::Error),
}

impl LayerError {
    /// The errno to report.
    pub fn errno(&self) -> i32 {
        match self {
            LayerError::WriteBack(e) => e.raw_os_error().unwrap_or(libc::EIO),
            LayerError::Engine(e) => e.errno(),
        }
    }
}

impl fmt::Display for LayerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerError::WriteBack(e) => {
                write!(
                    f,
                    "writing the mount's cached writes back to the layers: {e}"
                )
            }
            LayerError::Engine(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for LayerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LayerError::WriteBack(e) => Some(e),
            LayerError::Engine(e) => Some(e),
        }
    }
}

/// The engine and the mount's cache, for operations on whole layers.
pub struct LayerOps {
    engine: Arc<Engine>,
    kernel: Arc<dyn KernelCache>,
}

impl LayerOps {
    pub fn new(engine: Arc<Engine>, kernel: Arc<dyn KernelCache>) -> LayerOps {
        LayerOps { engine, kernel }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Makes the engine hold every write made through the mount before
    /// this call. Every operation that reads a layer's contents or sizes
    /// (diff, changes, stat, fsck) calls it first.
    pub fn write_back(&self) -> Result<(), LayerError> {
        self.kernel.write_back().map_err(LayerError::WriteBack)
    }

    /// Creates layer `name`: empty, or a clone of `parent` (which freezes
    /// the parent, so what the kernel caches of writes to it goes in first).
    /// `cold`: in the cold log (image layers).
    pub fn create(&self, name: &str, parent: Option<&str>, cold: bool) -> Result<(), LayerError> {
        self.create_with_metadata(name, parent, cold, None)
    }

    /// [`LayerOps::create`], with the layer's metadata set in the same
    /// change when given.
    pub fn create_with_metadata(
        &self,
        name: &str,
        parent: Option<&str>,
        cold: bool,
        metadata: Option<&LayerMetadata>,
    ) -> Result<(), LayerError> {
        if let Some(parent) = parent {
            // A frozen parent takes no writes: nothing cached to write back.
            let frozen = self.engine.layer_info(parent).is_ok_and(|p| p.frozen);
            if !frozen {
                self.write_back()?;
            }
        }
        let result = match metadata {
            Some(m) => self
                .engine
                .create_layer_with_metadata(name, parent, cold, m)
                .map(|_| ()),
            None => match parent {
                None => self.engine.create_layer(name, cold).map(|_| ()),
                Some(parent) => self.engine.clone_layer_with(parent, name, cold).map(|_| ()),
            },
        };
        result.map_err(LayerError::Engine)?;
        self.kernel.forget_layer_entry(name);
        Ok(())
    }

    /// Freezes layer `name` after writing back what the kernel caches.
    pub fn commit(&self, name: &str) -> Result<(), LayerError> {
        self.write_back()?;
        self.freeze(name, None)
    }

    /// Freezes layer `name` (replacing its metadata when given) without
    /// writing back: for a layer nothing can be cached of (a view made just
    /// now), or after the caller's own [`LayerOps::write_back`] (done before
    /// it takes a lock of its own, as the write-back may take long).
    pub fn freeze(&self, name: &str, metadata: Option<&LayerMetadata>) -> Result<(), LayerError> {
        match metadata {
            Some(m) => self.engine.commit_layer_with_metadata(name, m),
            None => self.engine.commit_layer(name),
        }
        .map_err(LayerError::Engine)?;
        // The layer directory's attributes change (it becomes read-only).
        self.kernel.forget_layer_entry(name);
        Ok(())
    }

    /// Removes layer `name`.
    pub fn remove(&self, name: &str) -> Result<(), LayerError> {
        self.engine.remove_layer(name).map_err(LayerError::Engine)?;
        self.kernel.forget_layer_entry(name);
        Ok(())
    }

    /// [`LayerOps::remove`] of a layer nobody looks up through the mount
    /// any more (its containerd snapshot is gone): the call does not wait
    /// for the kernel to drop what it cached below the layer's directory.
    pub fn remove_unseen(&self, name: &str) -> Result<(), LayerError> {
        self.engine.remove_layer(name).map_err(LayerError::Engine)?;
        self.kernel.forget_removed_layer(name);
        Ok(())
    }

    /// The layers whose directory (or a directory below it) is mounted
    /// somewhere else in the daemon's mount namespace (a container's
    /// rootfs, a snapshot mounted by containerd or dockerd). Freeing one
    /// would make every lookup through that mount fail.
    pub fn layers_mounted(&self) -> HashSet<String> {
        self.kernel.layers_mounted()
    }

    /// Layer `name` was filled (or emptied) beside the mount.
    pub fn filled(&self, name: &str) {
        self.kernel.forget_layer_entry(name);
    }

    /// Makes every write made before the call durable, those the kernel
    /// still caches included.
    pub fn sync(&self) -> Result<(), LayerError> {
        self.write_back()?;
        self.engine.sync().map_err(LayerError::Engine)
    }
}

/// A layer size limit as Docker writes one (`--storage-opt size=`, go-units'
/// RAMInBytes): a decimal number, an optional space, an optional k, m, g,
/// t or p in either case, an optional i and an optional b; binary
/// multiples: `64M`, `1.5g`, `512KiB`, `2048`. `0` means no limit. The
/// Docker plugin and the containerd snapshotter both read limits with it.
pub fn parse_size_limit(text: &str) -> Result<Option<u64>, String> {
    let bad = || format!("invalid size {text:?} (for example size=64M)");
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.strip_prefix(' ').unwrap_or(unit).to_ascii_lowercase();
    let mut prefix = unit.as_str();
    prefix = prefix.strip_suffix('b').unwrap_or(prefix);
    prefix = prefix.strip_suffix('i').unwrap_or(prefix);
    let shift = match prefix {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return Err(bad()),
    };
    if number.is_empty() || number.split('.').any(str::is_empty) {
        return Err(bad());
    }
    let bytes = number.parse::<f64>().map_err(|_| bad())? * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok((bytes as u64 > 0).then_some(bytes as u64))
}

#[cfg(test)]
mod size_tests {
    use super::parse_size_limit as size_limit;

    #[test]
    fn sizes_read_as_docker_reads_them() {
        for (text, bytes) in [
            ("64M", Some(64 << 20)),
            ("64m", Some(64 << 20)),
            ("64MiB", Some(64 << 20)),
            ("64 MB", Some(64 << 20)),
            ("1.5g", Some(3 << 29)),
            ("2048", Some(2048)),
            ("512k", Some(512 << 10)),
            ("0", None),
        ] {
            assert_eq!(size_limit(text).unwrap(), bytes, "{text}");
        }
        for text in [
            "abc", "-1", "", "M", "1.", ".5G", "10X", "1.2.3G", "64MBB", "1e3",
        ] {
            let err = size_limit(text).unwrap_err();
            assert!(err.contains("invalid size"), "{text}: {err}");
        }
    }
}
