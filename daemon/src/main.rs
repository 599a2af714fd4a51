//! `lcfs`: the daemon that serves an lcfs device through one FUSE mount, and
//! the command line that formats devices and manages layers through it.

mod client;
mod control;
mod daemon;
mod device;
mod error;
mod estargz;
mod fleet;
mod fsck;
mod gc;
mod images;
mod lazy;
mod mirror;
mod mkfs;
mod owners;
mod protocol;
mod rest;
mod sealer;
mod server;
mod size;
mod trusted;

// mimalloc: the engine allocates small values per block; glibc malloc
// showed up as the largest single cost in write profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Args, Parser, Subcommand};
use error::Result;
use std::path::{Path, PathBuf};

const ABOUT: &str = "lcfs: a layer cloning filesystem for container hosts";

const LONG_ABOUT: &str = "\
lcfs: a layer cloning filesystem for container hosts.

One daemon owns one device (a block device, or a sparse file) and serves
every layer on it as a directory of one FUSE mount: <mount>/<layer>/.
Cloning a layer and committing one are constant-time.

Typical use:
  lcfs mkfs /var/lib/lcfs/device.img --size 10G   # once
  lcfs daemon                                    # as root, or via lcfs.service
  lcfs layer create base                          # then fill /var/lib/lcfs/mnt/base/
  lcfs layer clone base container-1               # freezes base, O(1)
  lcfs layer ls

`layer`, `sync` and `stats` talk to the running daemon over its control
socket (root-only); `mkfs` and `fsck` work on a device no daemon holds.";

#[derive(Parser)]
#[command(name = "lcfs", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    /// The daemon's control socket (the daemon listens there, the other
    /// commands connect there).
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        default_value = client::DEFAULT_CONTROL_SOCKET
    )]
    control_socket: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write an empty lcfs onto a device (or a new sparse file)
    #[command(long_about = "\
Write an empty lcfs onto DEVICE: a block device, or a regular file. With
--size, a missing file is created sparse (it only takes space as data is
written). Refuses a device that already carries a filesystem, partition table
or lcfs unless --force is given. Refuses a device that a daemon holds.")]
    Mkfs(MkfsArgs),

    /// Run the daemon: mount the device's layers and serve the control socket
    #[command(long_about = "\
Run the daemon in the foreground: open DEVICE, mount every layer on it as a
directory of one FUSE mount at DIR, and serve management requests on the
control socket (root-only, newline-delimited JSON, see
docs/control-protocol.md). SIGTERM or SIGINT unmounts, checkpoints and exits
0. A dead FUSE mount left at DIR by a killed daemon is cleared at start.
Only root may enter the mount: its root is mode 0700, and the directory
above DIR is made root's alone (created 0700, or narrowed to at most 0710;
one owned by another user, or shared like /tmp, is refused; docs/fuse.md).
The log level comes from RUST_LOG (default: info).")]
    Daemon(Box<DaemonArgs>),

    /// Create, clone, commit, remove and list layers (through the daemon)
    #[command(subcommand)]
    Layer(LayerCommand),

    /// Show the most used layers (through the daemon)
    #[command(subcommand)]
    Top(TopCommand),

    /// Make every change so far durable (through the daemon)
    Sync,

    /// Remove unused images by policy now, or show what would go
    #[command(long_about = "\
Run a garbage collection pass now (the daemon also runs them on its own):
above the policy's high watermark of device use, remove unused images,
least recently used first, through dockerd's or containerd's API, until
below the low watermark; and images unused longer than the policy's
maximum. Images a container uses (running or stopped), kept images and
young ones stay. --dry-run only prints the plan. --orphans also lists the
layers no owner references (removed only when the policy says so). The
policy is /etc/lcfs/gc.toml (docs/gc.md); --reload reads it again.")]
    Gc {
        /// Print what a pass would do; remove nothing
        #[arg(long)]
        dry_run: bool,
        /// Also list layers no owner references
        #[arg(long)]
        orphans: bool,
        /// Read the policy file again (a bad one leaves the policy as it was)
        #[arg(long, conflicts_with_all = ["dry_run", "orphans"])]
        reload: bool,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },

    /// Turn statistics counting on or off (or say whether it is on)
    #[command(long_about = "\
Turn the daemon's statistics counting on or off, or print whether it is on.
Off, reads are not counted per layer or file and the latency histograms
are not fed (what is recorded stays); for measuring what counting costs.
Until the daemon restarts (`lcfs daemon --no-stats` starts with it off).")]
    Statistics {
        #[arg(value_parser = ["on", "off"])]
        state: Option<String>,
    },

    /// Show the engine's counters (through the daemon)
    #[command(long_about = "\
Show the running engine's counters: device writes and bytes, how many user
writes each device write carried (coalescing ratio), node and block cache
hits and misses, layers, free segments and space.")]
    Stats {
        /// Print the counters as JSON (the `stats` result of the control protocol)
        #[arg(long)]
        json: bool,
    },

    /// Show the layers mounted lazily (docs/lazy.md)
    #[command(long_about = "\
Show the layers the daemon mounted lazily (--lazy-config): each one's blob,
its blocks and how many are still absent (not fetched), the bytes fetched
and the fetch errors since the daemon started, and whether it is complete.")]
    Lazy {
        /// Print them as JSON (the `lazy` result of the control protocol)
        #[arg(long)]
        json: bool,
    },

    /// Check a layer against its seal (or a manifest): every entry whose
    /// content or metadata differs (exit 1 when any does)
    #[command(long_about = "\
Check layer NAME (or, with --all, every frozen layer) against its seal: the
digests lcfs recorded when the layer was sealed (docs/integrity.md). Reads
every file again, prints each entry whose content, type, mode, owner, device
number, xattrs or link target differs, or that is missing or added, and exits
1 when any is. A layer not sealed yet is sealed now (there is then nothing to
compare). With --manifest, checks against MANIFEST (written earlier by `lcfs
layer digest NAME --manifest MANIFEST`) instead. With --expect, also exits 1
unless the seal's (or manifest's) root is DIGEST: a root kept apart from the
device, next to an image signature, proves the seal is that layer's. A
progress bar goes to the terminal, when stderr is one.")]
    Verify {
        /// The layer (or --all)
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Every frozen layer
        #[arg(long, conflicts_with_all = ["manifest", "expect"])]
        all: bool,
        /// Check against this manifest instead of the seal
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// The root the seal or manifest must have (sha256:<64 hex digits>)
        #[arg(long, value_name = "DIGEST")]
        expect: Option<String>,
        /// Read DEVICE directly instead of asking the daemon (no daemon may
        /// hold it)
        #[arg(long, value_name = "DEVICE")]
        device: Option<PathBuf>,
        /// Print the result as JSON (the `layer.verify` result; a list with
        /// --all)
        #[arg(long)]
        json: bool,
    },

    /// eStargz layers, the seekable format lazy pulls read: make and check
    /// them offline
    #[command(subcommand)]
    Estargz(EstargzCommand),

    /// Check a device's structure offline (exit 1 when it finds problems)
    #[command(long_about = "\
Check that every structure on DEVICE is consistent: superblocks, the address
map, every layer's tree, extents and (with --verify-data) every data block's
checksum. Works offline on a device no daemon holds; with --online it asks the
running daemon to check its live filesystem instead. Prints the report and
exits 0 when clean, 1 when it finds problems.")]
    Fsck(FsckArgs),
}

#[derive(Args)]
struct MkfsArgs {
    /// Block device or file to format
    #[arg(value_name = "DEVICE", default_value = device::DEFAULT_DEVICE)]
    device: PathBuf,

    /// Create DEVICE as a sparse file of this size if it does not exist (e.g. 10G)
    #[arg(long, value_name = "SIZE", value_parser = size::parse_size)]
    size: Option<u64>,

    /// Log segment size: the unit of device writes and cleaning (64K..256M)
    #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = size::parse_size)]
    segment_size: u64,

    /// Format even over an existing filesystem or lcfs, destroying it
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct DaemonArgs {
    /// Block device or file holding the lcfs (see `lcfs mkfs`)
    #[arg(long, value_name = "DEVICE", default_value = device::DEFAULT_DEVICE)]
    device: PathBuf,

    /// Where to mount; each layer is a directory in it (created if missing)
    #[arg(long = "mount", value_name = "DIR", default_value = daemon::DEFAULT_MOUNTPOINT)]
    mountpoint: PathBuf,

    /// Worker threads for FUSE data reads over 32 KiB (readahead) and fsyncs
    #[arg(long, value_name = "N", default_value_t = 4)]
    threads: usize,

    /// Threads reading /dev/fuse (each on a cloned descriptor when more than
    /// one). 1 was fastest on the 2-vCPU machines measured; see docs/fuse.md
    #[arg(long, value_name = "N", default_value_t = 1)]
    fuse_threads: usize,

    /// Memory for cached metadata (tree nodes), in MiB
    #[arg(long, value_name = "N", default_value_t = 64)]
    cache_mib: usize,

    /// Memory for cached data blocks, shared by all layers, in MiB
    #[arg(long, value_name = "N", default_value_t = 256)]
    block_cache_mib: usize,

    /// Checkpoint at least this often while anything changes, in
    /// milliseconds: how much unsynced work a crash may lose (fsync, `lcfs
    /// sync` and Docker's and containerd's layer calls are durable anyway).
    /// 0: only when asked, or when the cache or the device needs one
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    checkpoint_interval_ms: u64,

    /// Send every write(2) to the daemon before it returns, instead of
    /// letting the kernel cache writes and send them in large pieces (at the
    /// latest on close, fsync, and before a layer is cloned, committed or
    /// diffed). Slower; see docs/fuse.md
    #[arg(long)]
    no_writeback_cache: bool,

    /// Serve read-only opens of files a container shares with its image by
    /// FUSE passthrough to one copy per image file (Linux 6.9+): containers
    /// of one image reading a file at once hold one page-cache copy of it,
    /// not one each. Turns the writeback cache off (the kernel allows one
    /// or the other). See docs/fuse.md, "Passthrough"
    #[arg(long)]
    passthrough: bool,

    /// Serve the cooperative-pull registry mirror configured in this TOML
    /// file (docs/mirror.md): blobs cached on the device, fetched from a
    /// home peer or the upstream
    #[arg(long, value_name = "PATH")]
    mirror_config: Option<PathBuf>,

    /// Mount eStargz image layers lazily through the containerd
    /// snapshotter, as configured in this TOML file (docs/lazy.md): content
    /// fetched from the registry on first read and in the background
    #[arg(long, value_name = "PATH")]
    lazy_config: Option<PathBuf>,

    /// Do not seal frozen layers in the background (`lcfs verify` still
    /// seals the layer it checks). See docs/integrity.md
    #[arg(long)]
    no_seal: bool,

    /// Check every read of a sealed layer's content against its seal
    /// (EIO for a block that differs); `lcfs layer verify-reads` turns it
    /// on for one layer. See docs/integrity.md
    #[arg(long)]
    verify_reads: bool,

    /// Serve a layer under verified reads only when its seal's root is
    /// listed in this file (one sha256:<64 hex digits> a line; read again
    /// when it changes). See docs/integrity.md, "Trusted roots"
    #[arg(long, value_name = "PATH")]
    trusted_roots: Option<PathBuf>,

    /// Also serve the Docker graphdriver plugin on this socket (off by
    /// default; Docker looks for /run/docker/plugins/lcfs.sock)
    #[arg(long, value_name = "PATH")]
    docker_plugin_socket: Option<PathBuf>,

    /// Serve the containerd snapshotter (proxy plugin `lcfs`, see
    /// docs/containerd.md) on this socket [default: snapshotter.sock next to
    /// the control socket: /run/lcfs/snapshotter.sock]
    #[arg(long, value_name = "PATH", conflicts_with = "no_containerd")]
    containerd_socket: Option<PathBuf>,

    /// Do not serve the containerd snapshotter
    #[arg(long)]
    no_containerd: bool,

    /// Serve the statistics API (JSON and Prometheus metrics, see
    /// docs/statistics.md) on this root-only socket [default: stats.sock
    /// next to the control socket: /run/lcfs/stats.sock]
    #[arg(long, value_name = "PATH")]
    stats_socket: Option<PathBuf>,

    /// Serve the statistics API on this TCP address too (e.g.
    /// 0.0.0.0:9477, for Prometheus); every request must carry the token of
    /// --stats-token-file
    #[arg(long, value_name = "ADDR:PORT", requires = "stats_token_file")]
    stats_listen: Option<std::net::SocketAddr>,

    /// A file of root's (mode 0600 or 0400) holding the bearer token TCP
    /// clients of the statistics API must send
    #[arg(long, value_name = "PATH")]
    stats_token_file: Option<PathBuf>,

    /// Layers given their own series in /metrics (the most cloned ones)
    #[arg(long, value_name = "N", default_value_t = 20)]
    metrics_top_layers: usize,

    /// dockerd's API socket, asked for image names (`lcfs top images`)
    /// when it exists
    #[arg(long, value_name = "PATH", default_value = owners::DEFAULT_DOCKER_SOCKET)]
    docker_socket: PathBuf,

    /// The image garbage collection policy (TOML; docs/gc.md); a missing
    /// file is the default policy, a bad one stops the start
    #[arg(long, value_name = "PATH", default_value = gc::DEFAULT_POLICY)]
    gc_config: PathBuf,

    /// Start with statistics counting off (see `lcfs statistics`)
    #[arg(long)]
    no_stats: bool,

    /// Images given their own series in /metrics (the most started ones)
    #[arg(long, value_name = "N", default_value_t = 20)]
    metrics_top_images: usize,

    /// containerd's socket: the snapshotter's differ (proxy plugin
    /// `lcfs-diff`) reads the layer blobs it applies from containerd's
    /// content service there
    #[arg(long, value_name = "PATH", default_value = lcfs_snapshotter::DEFAULT_CONTAINERD_ADDRESS)]
    containerd_address: PathBuf,
}

#[derive(Subcommand)]
enum LayerCommand {
    /// Create an empty layer, or a clone of --parent
    #[command(long_about = "\
Create layer NAME, empty, or as a clone of --parent (which freezes the parent:
a layer with children is read-only). The layer appears as <mount>/NAME/.")]
    Create {
        name: String,
        /// Clone this layer instead of starting empty
        #[arg(long, value_name = "PARENT")]
        parent: Option<String>,
        /// Put the layer's data in the cold log (for image layers written once)
        #[arg(long)]
        cold: bool,
    },
    /// Clone PARENT into a new writable layer NAME (freezes PARENT; O(1))
    Clone { parent: String, name: String },
    /// Freeze (commit) a layer: it becomes read-only and can be cloned
    Commit { name: String },
    /// Turn verified reads of a layer's content on or off (kept with the
    /// layer): every read of it is checked against its seal, EIO for a
    /// block that differs (docs/integrity.md)
    VerifyReads {
        name: String,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Remove a layer that has no children
    #[command(alias = "remove")]
    Rm { name: String },
    /// List every layer
    #[command(alias = "list")]
    Ls {
        /// Print the layers as JSON (the `layer.list` result)
        #[arg(long)]
        json: bool,
    },
    /// Show one layer
    Stat {
        name: String,
        /// Print the layer as JSON (the `layer.stat` result)
        #[arg(long)]
        json: bool,
    },
    /// Compute a layer's root digest from its content and metadata
    #[command(long_about = "\
Compute layer NAME's root: SHA-256 over every entry it shows (path, type,
mode, owner, xattrs, link target, and each regular file's fs-verity digest),
in a fixed order (docs/format.md, \"Layer digests\"). The same tree gives the
same root on any device or host; times do not count. It reads every file.
With --expect, exits 1 unless the root is that digest.")]
    Digest {
        name: String,
        /// The root it must have (sha256:<64 hex digits>)
        #[arg(long, value_name = "DIGEST")]
        expect: Option<String>,
        /// Also write the layer's manifest to FILE (a new file): every
        /// entry's record; its SHA-256 is the root; `lcfs verify` checks a
        /// layer against it
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// Read DEVICE directly instead of asking the daemon (no daemon may
        /// hold it)
        #[arg(long, value_name = "DEVICE")]
        device: Option<PathBuf>,
        /// Print the result as JSON (the `layer.digest` result)
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum EstargzCommand {
    /// Write a layer tar (plain or gzip) as an eStargz layer
    #[command(long_about = "\
Write layer tar INPUT (plain or gzip) as an eStargz layer OUTPUT (docs/lazy.md):
a tar+gzip layer any runtime reads, whose every chunk of file content starts a
gzip member of its own, followed by a table of contents (TOC) that a lazy pull
fetches first. Prints the blob's digest and size, its DiffID, and the TOC
digest and uncompressed size to put in the layer's annotations. Files named by
--prefetch lead the layer and are fetched first. OUTPUT must not exist.")]
    Build {
        #[arg(value_name = "INPUT")]
        input: PathBuf,
        #[arg(value_name = "OUTPUT")]
        output: PathBuf,
        /// Bytes of file content per chunk
        #[arg(long, default_value_t = lcfs_lazy::estargz::DEFAULT_CHUNK_SIZE)]
        chunk_size: u64,
        /// A file to fetch first (a path in the layer); repeat for more
        #[arg(long, value_name = "PATH")]
        prefetch: Vec<String>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Convert an image (docker save archive or OCI layout) to eStargz
    #[command(long_about = "\
Convert image IMAGE (a `docker save` archive, or an OCI image layout as a
directory or a tar) into a new OCI image layout directory OUTPUT whose every
layer is eStargz (docs/lazy.md), its TOC digest and uncompressed size in the
layer's annotations and its new DiffID in the config. The result is an
ordinary image: `ctr images import` (after tar -C OUTPUT -cf IMAGE.tar .) or
`skopeo copy oci:OUTPUT docker://...` take it. --prefetch names files to
OUTPUT must not exist.")]
    Convert {
        #[arg(value_name = "IMAGE")]
        input: PathBuf,
        #[arg(value_name = "OUTPUT")]
        output: PathBuf,
        /// The image's name in the layout (default: the archive's first tag)
        #[arg(long, value_name = "REF")]
        name: Option<String>,
        /// Bytes of file content per chunk
        #[arg(long, default_value_t = lcfs_lazy::estargz::DEFAULT_CHUNK_SIZE)]
        chunk_size: u64,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Read one file of an eStargz layer in a registry, fetching only its
    /// chunks
    #[command(long_about = "\
Read file PATH of the eStargz layer at URL (http(s)://REGISTRY/v2/NAME/blobs/
sha256:...) as a lazy pull does (docs/lazy.md): the layer's footer and TOC
with two ranged GETs, the TOC checked against DIGEST (the layer's
containerd.io/snapshot/stargz/toc.digest annotation), then the file's chunks,
each fetched with a ranged GET and checked against its digest. Writes the
content to OUTPUT (a new file) or standard output, and says on stderr how
many bytes of the layer were fetched.")]
    Fetch {
        #[arg(value_name = "URL")]
        url: String,
        #[arg(value_name = "PATH")]
        path: String,
        /// The layer's TOC digest (sha256:<64 hex digits>)
        #[arg(long, value_name = "DIGEST")]
        toc_digest: String,
        /// Write the content here (a new file) instead of standard output
        #[arg(short, long, value_name = "OUTPUT")]
        output: Option<PathBuf>,
        /// Seconds to wait for the registry to connect or send
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Check an eStargz layer: its TOC, every chunk and every file
    #[command(long_about = "\
Read eStargz layer BLOB's footer and TOC, check the TOC against DIGEST (the
layer's containerd.io/snapshot/stargz/toc.digest annotation) when given, and
every chunk and every regular file against the digests the TOC holds. Exits 1,
naming the file, on any difference. --list prints each regular file's name,
size and digest instead (a hard link as the file it names).")]
    Verify {
        #[arg(value_name = "BLOB")]
        blob: PathBuf,
        /// The TOC digest the layer must have (sha256:<64 hex digits>)
        #[arg(long, value_name = "DIGEST")]
        toc_digest: Option<String>,
        /// List the regular files: name, size, digest
        #[arg(long)]
        list: bool,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TopCommand {
    /// Layers by how they are used: clones (containers started from each),
    /// the last start, bytes read, size
    #[command(long_about = "\
Layers by how they are used, most first: CLONES is how many layers were ever
cloned from each (for an image's top layer, the containers started from it),
LAST START when the last was, READ the bytes containers read through the
layer's own directory, and CLONES READ what its removed clones had read.
Reads that the kernel's page cache answered never reach lcfs and are not
counted. Counts are durable at the daemon's next checkpoint (at most
--checkpoint-interval-ms behind).")]
    Layers(TopArgs),
    /// Images by how they are used: starts, running containers, start-up,
    /// pull time, reads, size
    #[command(long_about = "\
Images by how they are used, most first. An image is its top layer, named by
dockerd or containerd when the daemon can ask them (else by the layer's
name). STARTS counts containers ever started from it and LAST START the
latest; RUNNING is containers in use now over those that exist, UPTIME the
age of the newest running one; STARTUP the mean time from a container's
creation to its first read, START READ what a container read in its first
10 seconds (bytes and distinct files, mean); PULL and PULLED the time and
uncompressed bytes applying its layers took; READ what its containers read;
SIZE what its layers own.")]
    Images(TopArgs),
    /// The files containers read most, per image
    #[command(long_about = "\
The files containers read most, per image (or of one image with --image):
read requests and bytes, from a bounded summary of each image (the 32 most
read files of each layer, see docs/statistics.md): ERROR is how many of the
reads may belong to other files that held the slot before.")]
    Files(FilesArgs),
}

#[derive(Args)]
struct FilesArgs {
    /// Only this image (a name, an id or its prefix, or a top layer)
    #[arg(long, value_name = "IMAGE")]
    image: Option<String>,
    /// Show at most this many rows
    #[arg(long, value_name = "N", default_value_t = 100)]
    limit: usize,
    /// Print the rows as JSON
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    fleet: FleetArgs,
}

#[derive(Args)]
struct TopArgs {
    /// What to sort by (largest or latest first)
    #[arg(long, value_enum, default_value_t = client::TopSort::Clones)]
    sort: client::TopSort,
    /// Show at most this many rows
    #[arg(long, value_name = "N", default_value_t = 100)]
    limit: usize,
    /// Only this image (images: a name, an id or its prefix, a top layer),
    /// or its layers and its containers' (layers: an image name)
    #[arg(long, value_name = "IMAGE")]
    image: Option<String>,
    /// Print the rows as JSON (`layer.list` objects, sorted and cut; with
    /// --hosts, each name's counters added up over the hosts)
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    fleet: FleetArgs,
}

/// `--hosts` and its token, for `lcfs top`.
#[derive(Args)]
struct FleetArgs {
    /// Ask these hosts' statistics APIs (HOST[:PORT], comma-separated; port
    /// 9477 when none) instead of the local daemon, and add up each layer's,
    /// image's or file's counters by name over them
    #[arg(
        long,
        value_name = "HOSTS",
        value_delimiter = ',',
        requires = "token_file"
    )]
    hosts: Vec<String>,
    /// The bearer token the hosts' `--stats-token-file` holds (a file of
    /// yours, mode 0600 or 0400)
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
}

impl TopArgs {
    fn top(&self) -> client::Top {
        client::Top {
            sort: self.sort,
            limit: self.limit,
            image: self.image.clone(),
            json: self.json,
        }
    }
}

#[derive(Args)]
struct FsckArgs {
    /// Block device or file to check
    #[arg(value_name = "DEVICE", default_value = device::DEFAULT_DEVICE)]
    device: PathBuf,

    /// Also read every data block and verify its checksum (slower)
    #[arg(long)]
    verify_data: bool,

    /// Ask the running daemon to check its live filesystem (DEVICE is ignored)
    #[arg(long)]
    online: bool,
}

fn main() {
    let cli = Cli::parse();
    // The daemon logs what it does; the other commands only what goes wrong.
    let default_level = if matches!(cli.command, Command::Daemon(_)) {
        "info"
    } else {
        "warn"
    };
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level));
    // fuser logs at error level when the kernel has already given up on a
    // request (the caller was interrupted: a killed process, a container
    // stopping) and the reply finds nobody, which is routine. Silenced
    // unless RUST_LOG says something about fuser itself.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("fuser")) {
        logger.filter_module("fuser::reply", log::LevelFilter::Off);
    }
    logger.init();
    if let Err(e) = run(cli) {
        eprintln!("lcfs: {e}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let socket: &Path = &cli.control_socket;
    match cli.command {
        Command::Mkfs(a) => mkfs::run(&mkfs::MkfsOptions {
            device: &a.device,
            size_bytes: a.size,
            segment_size_bytes: a.segment_size,
            force: a.force,
        }),
        Command::Daemon(a) => {
            let a = *a;
            daemon::run(&daemon::DaemonOptions {
                device: a.device,
                mountpoint: a.mountpoint,
                control_socket: cli.control_socket.clone(),
                threads: a.threads,
                fuse_threads: a.fuse_threads,
                node_cache_mib: a.cache_mib,
                block_cache_mib: a.block_cache_mib,
                checkpoint_interval_ms: a.checkpoint_interval_ms,
                writeback_cache: !a.no_writeback_cache,
                passthrough: a.passthrough,
                seal: !a.no_seal,
                mirror: a.mirror_config,
                lazy: a.lazy_config,
                verify_reads: a.verify_reads,
                trusted_roots: a.trusted_roots,
                docker_plugin_socket: a.docker_plugin_socket,
                containerd_socket: (!a.no_containerd).then(|| {
                    a.containerd_socket.unwrap_or_else(|| {
                        let dir = cli.control_socket.parent().unwrap_or(Path::new("/"));
                        dir.join("snapshotter.sock")
                    })
                }),
                containerd_address: a.containerd_address,
                docker_socket: a.docker_socket,
                statistics: !a.no_stats,
                gc_policy: a.gc_config,
                stats: rest::RestOptions {
                    socket: a.stats_socket.unwrap_or_else(|| {
                        let dir = cli.control_socket.parent().unwrap_or(Path::new("/"));
                        dir.join("stats.sock")
                    }),
                    listen: a.stats_listen,
                    token_file: a.stats_token_file,
                    top_layers: a.metrics_top_layers,
                    top_images: a.metrics_top_images,
                },
            })
        }
        Command::Layer(c) => match c {
            LayerCommand::Create { name, parent, cold } => {
                client::layer_create(socket, &name, parent.as_deref(), cold)
            }
            LayerCommand::Clone { parent, name } => {
                client::layer_create(socket, &name, Some(&parent), false)
            }
            LayerCommand::Commit { name } => client::layer_commit(socket, &name),
            LayerCommand::VerifyReads { name, state } => {
                client::layer_verify_reads(socket, &name, state == "on")
            }
            LayerCommand::Rm { name } => client::layer_remove(socket, &name),
            LayerCommand::Ls { json } => client::layer_list(socket, json),
            LayerCommand::Stat { name, json } => client::layer_stat(socket, &name, json),
            LayerCommand::Digest {
                name,
                expect,
                manifest,
                device,
                json,
            } => fsck::layer_digest(
                socket,
                &name,
                expect.as_deref(),
                manifest.as_deref(),
                device.as_deref(),
                json,
            ),
        },
        Command::Top(TopCommand::Layers(a)) => match &a.fleet.token_file {
            Some(token) if !a.fleet.hosts.is_empty() => {
                fleet::top_layers(&a.fleet.hosts, token, &a.top())
            }
            Some(_) => Err(error::Error::Usage("--token-file goes with --hosts".into())),
            None => client::top_layers(socket, &a.top()),
        },
        Command::Top(TopCommand::Images(a)) => match &a.fleet.token_file {
            Some(token) if !a.fleet.hosts.is_empty() => {
                fleet::top_images(&a.fleet.hosts, token, &a.top())
            }
            Some(_) => Err(error::Error::Usage("--token-file goes with --hosts".into())),
            None => client::top_images(socket, &a.top()),
        },
        Command::Top(TopCommand::Files(a)) => match &a.fleet.token_file {
            Some(token) if !a.fleet.hosts.is_empty() => {
                fleet::top_files(&a.fleet.hosts, token, a.image.as_deref(), a.limit, a.json)
            }
            Some(_) => Err(error::Error::Usage("--token-file goes with --hosts".into())),
            None => client::top_files(socket, a.image.as_deref(), a.limit, a.json),
        },
        Command::Sync => client::sync(socket),
        Command::Gc {
            dry_run,
            orphans,
            reload,
            json,
        } => {
            if reload {
                client::gc_reload(socket, json)
            } else {
                client::gc(socket, dry_run, orphans, json)
            }
        }
        Command::Statistics { state } => {
            client::statistics(socket, state.as_deref().map(|s| s == "on"))
        }
        Command::Stats { json } => client::stats(socket, json),
        Command::Lazy { json } => client::lazy(socket, json),
        Command::Verify {
            name,
            all,
            manifest,
            expect,
            device,
            json,
        } => fsck::verify_command(
            socket,
            &fsck::VerifyWhat {
                name: if all { None } else { name },
                manifest,
                expect,
                device,
                json,
            },
        ),
        Command::Estargz(EstargzCommand::Build {
            input,
            output,
            chunk_size,
            prefetch,
            json,
        }) => estargz::build(&input, &output, chunk_size, prefetch, json),
        Command::Estargz(EstargzCommand::Convert {
            input,
            output,
            name,
            chunk_size,
            json,
        }) => estargz::convert(&input, &output, name.as_deref(), chunk_size, json),
        Command::Estargz(EstargzCommand::Fetch {
            url,
            path,
            toc_digest,
            output,
            timeout,
        }) => estargz::fetch(&url, &path, &toc_digest, output.as_deref(), timeout),
        Command::Estargz(EstargzCommand::Verify {
            blob,
            toc_digest,
            list,
            json,
        }) => estargz::verify(&blob, toc_digest.as_deref(), list, json),
        Command::Fsck(a) => {
            let (what, report) = if a.online {
                (
                    "live filesystem".to_string(),
                    client::fsck_online(socket, a.verify_data)?,
                )
            } else {
                (
                    a.device.display().to_string(),
                    fsck::offline(&a.device, a.verify_data)?,
                )
            };
            fsck::print(&what, &report)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
