//! `lcfs daemon`: owns one device, serves its layers through one FUSE mount
//! and takes management requests on the control socket until SIGTERM/SIGINT.
//!
//! Start-up order: lock and open the device, open the engine, check the
//! control socket is free, mount, then bind the socket, so a client that can
//! connect finds the mount ready. Shutdown runs the other way: stop
//! accepting, let running requests answer, unmount, checkpoint, remove the
//! socket.

use crate::control::Control;
use crate::device;
use crate::error::{Error, Result};
use crate::server::{self, Gate};
use lcfs_engine::Config;
use lcfs_fsfront::{KernelCache, LayerOps, Mount, MountOptions, SharedMount};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

pub const DEFAULT_MOUNTPOINT: &str = "/var/lib/lcfs/mnt";

pub struct DaemonOptions {
    pub device: PathBuf,
    pub mountpoint: PathBuf,
    pub control_socket: PathBuf,
    pub threads: usize,
    /// Threads reading /dev/fuse (`MountOptions::fuse_threads`).
    pub fuse_threads: usize,
    pub node_cache_mib: usize,
    pub block_cache_mib: usize,
    /// Checkpoint at least this often when something changed (0: only when
    /// asked or forced).
    pub checkpoint_interval_ms: u64,
    /// The mount's writeback cache (see `MountOptions::writeback_cache`).
    pub writeback_cache: bool,
    /// Passthrough of shared files (see `MountOptions::passthrough`).
    pub passthrough: bool,
    /// Seal frozen layers in the background (crate::sealer).
    pub seal: bool,
    /// The registry mirror's configuration file (crate::mirror).
    pub mirror: Option<PathBuf>,
    /// The lazy pull's configuration file (crate::lazy).
    pub lazy: Option<PathBuf>,
    /// Verified reads for every sealed layer (docs/integrity.md).
    pub verify_reads: bool,
    /// The roots a verified layer's seal must have (crate::trusted).
    pub trusted_roots: Option<PathBuf>,
    /// Serve the Docker graphdriver plugin here too (see lcfs-dockerplugin).
    pub docker_plugin_socket: Option<PathBuf>,
    /// Serve the containerd snapshotter here too (see lcfs-snapshotter).
    pub containerd_socket: Option<PathBuf>,
    /// containerd's socket, where the snapshotter's differ reads blobs.
    pub containerd_address: PathBuf,
    /// dockerd's API, asked for image names when it exists.
    pub docker_socket: PathBuf,
    /// Count statistics from the start (`lcfs statistics` turns it later).
    pub statistics: bool,
    /// The garbage collector's policy file (see crate::gc).
    pub gc_policy: PathBuf,
    /// The statistics API (see crate::rest).
    pub stats: crate::rest::RestOptions,
}

pub fn run(o: &DaemonOptions) -> Result<()> {
    // Signals first, so one that arrives during start-up is not lost: each
    // writes a byte that the accept loop sees as soon as it starts.
    let (wake, wake_writer) = UnixStream::pair().map_err(|e| Error::io("signal pipe", e))?;
    wake_writer
        .set_nonblocking(true)
        .map_err(|e| Error::io("signal pipe", e))?;
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let writer = wake_writer
            .try_clone()
            .map_err(|e| Error::io("signal pipe", e))?;
        signal_hook::low_level::pipe::register(signal, writer)
            .map_err(|e| Error::io("installing signal handlers", e))?;
    }

    lcfs_engine::set_stats_enabled(o.statistics);
    // A bad policy stops the start-up, with the key named.
    let gc_policy = crate::gc::Policy::load(&o.gc_policy)
        .map_err(|e| Error::Usage(format!("the garbage collection policy: {e}")))?;
    let mirror_config = o.mirror.as_deref().map(crate::mirror::load).transpose()?;
    let lazy_config = o.lazy.as_deref().map(crate::lazy::load).transpose()?;
    let trusted_roots = o
        .trusted_roots
        .as_deref()
        .map(crate::trusted::read_initial)
        .transpose()
        .map_err(|e| Error::Usage(format!("the trusted roots: {e}")))?;
    let device_path = absolute(&o.device)?;
    let mountpoint = absolute(&o.mountpoint)?;
    if !device_path.exists() {
        return Err(device::no_device(&device_path));
    }
    let lock = device::lock(&device_path)?;
    let dev = device::open(&device_path)?;
    let config = Config {
        node_cache_bytes: o.node_cache_mib << 20,
        block_cache_bytes: o.block_cache_mib << 20,
        checkpoint_interval_ms: o.checkpoint_interval_ms,
        ..Config::default()
    };
    let engine = device::open_engine(&device_path, dev, config)?;
    engine.set_verify_reads(o.verify_reads);
    if let Some(first) = trusted_roots {
        if let Err(e) = crate::trusted::start(engine.clone(), first) {
            let _ = engine.close();
            return Err(Error::Usage(format!("the trusted roots: {e}")));
        }
    }
    let mirror = match mirror_config {
        Some(config) => match lcfs_mirror::serve(engine.clone(), config) {
            Ok(m) => {
                log::info!("registry mirror on {}", m.address);
                Some(m)
            }
            Err(e) => {
                let _ = engine.close();
                return Err(Error::Usage(format!("serving the registry mirror: {e}")));
            }
        },
        None => None,
    };
    server::claim_socket_path(&o.control_socket)?;
    lcfs_fsfront::prepare_mountpoint(&mountpoint)
        .map_err(|e| Error::io("preparing the mountpoint (--mount)", e))?;

    let options = MountOptions {
        threads: o.threads.max(1),
        fuse_threads: o.fuse_threads.max(1),
        writeback_cache: o.writeback_cache,
        passthrough: o.passthrough,
        ..MountOptions::default()
    };
    let mount = lcfs_fsfront::mount(engine.clone(), &mountpoint, &options)
        .map_err(|e| Error::io(format!("mounting at {}", mountpoint.display()), e))?;
    log::info!(
        "mounted {} at {} ({} thread(s) reading /dev/fuse, {} I/O workers)",
        device_path.display(),
        mountpoint.display(),
        options.fuse_threads,
        options.threads
    );
    let wake_here = lcfs_fsfront::WakeHere::read();
    match (&wake_here, wake_here.advice()) {
        (lcfs_fsfront::WakeHere::Off, Some(advice)) => log::warn!("{advice}"),
        (_, Some(advice)) => log::info!("{advice}"),
        (_, None) => {}
    }
    let mount = Arc::new(RwLock::new(Some(mount)));
    let kernel: Arc<dyn KernelCache> = Arc::new(SharedMount(mount.clone()));
    let listener = match server::bind(&o.control_socket) {
        Ok(l) => l,
        Err(e) => {
            unmount(&mount, &mountpoint);
            let _ = engine.close();
            return Err(e);
        }
    };
    let gate = Arc::new(Gate::default());
    let mut catalog = crate::images::Catalog::new(engine.clone(), &mountpoint);
    let plugin = match &o.docker_plugin_socket {
        None => None,
        Some(socket) => {
            let driver = Arc::new(lcfs_dockerplugin::Driver::new(
                engine.clone(),
                &mountpoint,
                kernel.clone(),
            ));
            catalog.plugin = Some(driver.clone());
            match lcfs_dockerplugin::serve(driver, socket, lcfs_dockerplugin::Limits::default()) {
                Ok(server) => Some(server),
                Err(e) => {
                    abandon_start(listener, &o.control_socket, &mount, &mountpoint, &engine);
                    return Err(Error::io(
                        format!("serving the docker plugin on {}", socket.display()),
                        e,
                    ));
                }
            }
        }
    };
    let snapshotter = match &o.containerd_socket {
        None => None,
        Some(socket) => {
            let options = lcfs_snapshotter::ServeOptions {
                containerd_address: o.containerd_address.clone(),
            };
            match lcfs_snapshotter::serve_with(
                engine.clone(),
                &mountpoint,
                kernel.clone(),
                socket,
                &options,
            ) {
                Ok(server) => Some(server),
                Err(e) => {
                    if let Some(server) = plugin {
                        server.shutdown();
                    }
                    abandon_start(listener, &o.control_socket, &mount, &mountpoint, &engine);
                    return Err(Error::Usage(format!(
                        "serving the containerd snapshotter on {}: {e}",
                        socket.display()
                    )));
                }
            }
        }
    };
    let lazy = match (lazy_config, &snapshotter) {
        (Some(mut config), Some(s)) => {
            // Through the cooperative pull's peers, when this daemon has them.
            config.peers = mirror.as_ref().map(|m| m.peers());
            let lazy = lcfs_lazy::mount::Lazy::start(engine.clone(), config);
            s.table()
                .set_remote(Arc::new(crate::lazy::Remote(lazy.clone())));
            Some(lazy)
        }
        (Some(_), None) => {
            log::warn!("--lazy-config without the containerd snapshotter: no lazy mounts");
            None
        }
        _ => None,
    };
    catalog.lazy = lazy.clone();
    catalog.docker_socket = Some(o.docker_socket.clone());
    catalog.mirror = mirror.as_ref().map(|m| m.counters.clone());
    catalog.mirror_store = mirror.as_ref().map(|m| m.store.clone());
    catalog.containerd = snapshotter
        .as_ref()
        .map(|s| (s.table().clone(), o.containerd_address.clone()));
    let catalog = Arc::new(catalog);
    let stats = match crate::rest::serve(catalog.clone(), &o.stats) {
        Ok(server) => server,
        Err(e) => {
            if let Some(server) = snapshotter {
                server.shutdown();
            }
            if let Some(server) = plugin {
                server.shutdown();
            }
            abandon_start(listener, &o.control_socket, &mount, &mountpoint, &engine);
            return Err(Error::Usage(format!(
                "serving statistics on {}: {e}",
                o.stats.socket.display()
            )));
        }
    };
    match stats.tcp_address {
        Some(addr) => log::info!(
            "statistics on {} and on {addr} (bearer token)",
            o.stats.socket.display()
        ),
        None => log::info!("statistics on {}", o.stats.socket.display()),
    }
    let gc = Arc::new(crate::gc::Collector::new(
        catalog.clone(),
        LayerOps::new(engine.clone(), kernel.clone()),
        &o.gc_policy,
        gc_policy,
    ));
    let (gc_stop, gc_stopped) = std::sync::mpsc::channel();
    let gc_thread = {
        let gc = gc.clone();
        std::thread::Builder::new()
            .name("lcfs-gc".into())
            .spawn(move || gc.run_periodically(gc_stopped))
            .map_err(|e| Error::io("starting the garbage collector", e))?
    };
    let sealer = if o.seal {
        Some(
            crate::sealer::Sealer::start(engine.clone())
                .map_err(|e| Error::io("starting the sealer", e))?,
        )
    } else {
        // Nothing would take the hashes an apply computes for a seal.
        engine.set_streamed_hashes(false);
        None
    };
    let control = Arc::new(Control {
        layers: LayerOps::new(engine.clone(), kernel.clone()),
        device: device_path.clone(),
        mountpoint: mountpoint.clone(),
        plugin_calls: plugin.as_ref().map(|server| server.calls()),
        mount: Some(mount.clone()),
        catalog,
        gc: Some(gc),
        verifying: Default::default(),
        mirror: mirror.as_ref().map(|m| m.counters.clone()),
    });
    log::info!(
        "lcfs daemon ready: control socket {}",
        o.control_socket.display()
    );
    let served = server::serve(&listener, &wake, &control, &gate);

    log::info!("shutting down");
    if let Some(l) = &lazy {
        l.stop();
    }
    if let Some(m) = mirror {
        m.shutdown();
    }
    if let Some(s) = sealer {
        s.stop();
    }
    drop(gc_stop);
    let _ = gc_thread.join();
    stats.shutdown();
    if let Err(e) = std::fs::remove_file(&o.stats.socket) {
        log::warn!("removing {}: {e}", o.stats.socket.display());
    }
    if let Some(server) = snapshotter {
        server.shutdown();
    }
    if let Some(server) = plugin {
        server.shutdown();
    }
    drop(listener);
    if let Err(e) = std::fs::remove_file(&o.control_socket) {
        log::warn!("removing {}: {e}", o.control_socket.display());
    }
    gate.close();
    unmount(&mount, &mountpoint);
    let closed = engine
        .close()
        .map_err(|e| Error::engine("final checkpoint", e));
    drop(lock);
    served?;
    closed?;
    log::info!("checkpointed and unmounted; bye");
    Ok(())
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| Error::io(path.display().to_string(), e))
}

/// Undoes the start-up so far when a service after the control socket
/// cannot start: stop listening, unmount, checkpoint.
fn abandon_start(
    listener: std::os::unix::net::UnixListener,
    control_socket: &Path,
    mount: &RwLock<Option<Mount>>,
    mountpoint: &Path,
    engine: &lcfs_engine::Engine,
) {
    drop(listener);
    let _ = std::fs::remove_file(control_socket);
    unmount(mount, mountpoint);
    let _ = engine.close();
}

/// Unmounts, falling back to a lazy unmount when the mount is busy, so the
/// daemon always exits without leaving a dead mount behind it.
fn unmount(mount: &RwLock<Option<Mount>>, mountpoint: &Path) {
    let taken = mount.write().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(m) = taken {
        if let Err(e) = m.unmount() {
            log::warn!(
                "unmounting {}: {e}; detaching it lazily",
                mountpoint.display()
            );
            lcfs_fsfront::lazy_unmount(mountpoint);
        }
    }
}
