//! The unix socket: a directory created 0700, a socket bound 0600, and a
//! peer credential check on every connection (root, or the daemon's own
//! user), then tonic's HTTP/2 server on a small tokio runtime of its own,
//! so the daemon around it stays synchronous.

use crate::api::diff::diff_server::DiffServer;
use crate::api::snapshots::snapshots_server::SnapshotsServer;
use crate::diff::DiffService;
use crate::error::{Error, Result};
use crate::service::Service;
use crate::table::Table;
use lcfs_engine::Engine;
use lcfs_fsfront::KernelCache;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long shutdown waits for calls in progress before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Calls served at once on one connection; more wait.
const CALLS_PER_CONNECTION: usize = 64;
/// Threads for engine calls (they block): bounds the calls in progress.
const BLOCKING_THREADS: usize = 16;

/// A running snapshotter; [`SnapshotterServer::shutdown`] stops it.
pub struct SnapshotterServer {
    table: Arc<Table>,
    socket: PathBuf,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
    reclaimer: Option<JoinHandle<()>>,
}

impl SnapshotterServer {
    pub fn table(&self) -> &Arc<Table> {
        &self.table
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops accepting, lets calls in progress answer (at most a few
    /// seconds), stops the background pass and removes the socket.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        let _ = self.stop.send(true);
        if let Some(h) = self.server.take() {
            let _ = h.join();
        }
        self.table.stop_background();
        if let Some(h) = self.reclaimer.take() {
            let _ = h.join();
        }
        if let Err(e) = std::fs::remove_file(&self.socket) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("removing {}: {e}", self.socket.display());
            }
        }
    }
}

impl Drop for SnapshotterServer {
    fn drop(&mut self) {
        if self.server.is_some() {
            self.stop_all();
        }
    }
}

/// Makes `path` bindable (see [`lcfs_fsfront::claim_socket_path`]).
fn prepare_socket(path: &Path) -> Result<()> {
    use lcfs_fsfront::ClaimError;
    lcfs_fsfront::claim_socket_path(path).map_err(|e| match e {
        ClaimError::NotASocket => {
            Error::InvalidArgument(format!("{} exists and is not a socket", path.display()))
        }
        ClaimError::Live => Error::AlreadyExists(format!(
            "{} (another snapshotter serves it)",
            path.display()
        )),
        ClaimError::Io(what, e) => Error::io(what, e),
    })
}

/// Binds with mode 0600, never reachable by others (see
/// [`lcfs_fsfront::bind_private_socket`]).
fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    let listener = lcfs_fsfront::bind_private_socket(path)
        .map_err(|e| Error::io(format!("binding {}", path.display()), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io(format!("{}", path.display()), e))?;
    Ok(listener)
}

/// Root may connect, and the user the daemon runs as (the same when it runs
/// as root, as it does in production).
fn peer_allowed(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

/// What [`serve_with`] takes beyond the engine, the mount and the socket.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// containerd's socket: the diff service reads layer blobs from its
    /// content service (connecting at each Apply, so containerd may start
    /// after the daemon).
    pub containerd_address: PathBuf,
}

impl Default for ServeOptions {
    fn default() -> ServeOptions {
        ServeOptions {
            containerd_address: PathBuf::from(crate::DEFAULT_CONTAINERD_ADDRESS),
        }
    }
}

/// [`serve_with`] with the default options.
pub fn serve(
    engine: Arc<Engine>,
    mountpoint: &Path,
    kernel: Arc<dyn KernelCache>,
    socket: &Path,
) -> Result<SnapshotterServer> {
    serve_with(engine, mountpoint, kernel, socket, &ServeOptions::default())
}

/// Serves the snapshots API for the layers of `engine`, mounted at
/// `mountpoint`, and the diff API that applies image layers into them, on
/// the unix socket `socket`. Returns once the socket is bound and the table
/// loaded.
pub fn serve_with(
    engine: Arc<Engine>,
    mountpoint: &Path,
    kernel: Arc<dyn KernelCache>,
    socket: &Path,
    options: &ServeOptions,
) -> Result<SnapshotterServer> {
    prepare_socket(socket)?;
    let table = Arc::new(Table::open(engine, mountpoint, kernel)?);
    let listener = bind(socket)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(BLOCKING_THREADS)
        .thread_name("lcfs-snapshotter")
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the snapshotter runtime", e))?;
    let (stop, stopped) = watch::channel(false);
    let service = Service {
        table: table.clone(),
    };
    let differ = DiffService {
        table: table.clone(),
        containerd_address: options.containerd_address.clone(),
    };
    let socket_name = socket.display().to_string();
    let server = std::thread::Builder::new()
        .name("lcfs-snapshotter".into())
        .spawn(move || {
            runtime.block_on(run(listener, service, differ, stopped, socket_name));
            runtime.shutdown_timeout(SHUTDOWN_GRACE);
        })
        .map_err(|e| Error::io("starting the snapshotter thread", e))?;
    let background = table.clone();
    let reclaimer = std::thread::Builder::new()
        .name("lcfs-snapshot-reclaim".into())
        .spawn(move || background.background())
        .map_err(|e| Error::io("starting the snapshot reclaimer", e));
    let reclaimer = match reclaimer {
        Ok(h) => h,
        Err(e) => {
            let _ = stop.send(true);
            let _ = server.join();
            return Err(e);
        }
    };
    log::info!(
        "containerd snapshotter {:?} and differ {:?} serving {} (blobs from containerd at {})",
        crate::PLUGIN_NAME,
        crate::DIFF_PLUGIN_NAME,
        socket.display(),
        options.containerd_address.display()
    );
    Ok(SnapshotterServer {
        table,
        socket: socket.to_path_buf(),
        stop,
        server: Some(server),
        reclaimer: Some(reclaimer),
    })
}

async fn run(
    listener: std::os::unix::net::UnixListener,
    service: Service,
    differ: DiffService,
    mut stopped: watch::Receiver<bool>,
    socket_name: String,
) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("snapshotter socket {socket_name}: {e}");
            return;
        }
    };
    let (accepted, incoming) = mpsc::channel::<io::Result<tokio::net::UnixStream>>(16);
    let mut accept_stop = stopped.clone();
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                _ = accept_stop.changed() => return,
                conn = listener.accept() => conn,
            };
            match conn {
                Ok((stream, _)) => match stream.peer_cred() {
                    Ok(cred) if peer_allowed(cred.uid()) => {
                        if accepted.send(Ok(stream)).await.is_err() {
                            return;
                        }
                    }
                    Ok(cred) => log::warn!(
                        "snapshotter: refused a connection from uid {} (root only)",
                        cred.uid()
                    ),
                    Err(e) => log::warn!("snapshotter: peer credentials: {e}"),
                },
                Err(e) => {
                    // EMFILE and the like: wait a little instead of spinning.
                    log::warn!("snapshotter: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    let mut stop_signal = stopped.clone();
    let serve = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(CALLS_PER_CONNECTION)
        .add_service(SnapshotsServer::new(service))
        .add_service(DiffServer::new(differ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(incoming),
            async move {
                let _ = stop_signal.changed().await;
            },
        );
    // Graceful shutdown waits for connections to go away; containerd keeps
    // its connection open, so it is cut after a grace period.
    let grace = async move {
        let _ = stopped.changed().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        r = serve => if let Err(e) = r {
            log::error!("snapshotter on {socket_name}: {e}");
        },
        _ = grace => log::warn!("snapshotter: calls still running at shutdown were cut"),
    }
}
