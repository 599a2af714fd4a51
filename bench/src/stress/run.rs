//! Running jobs: opening their files (on any filesystem, or in an lcfs engine
//! layer), issuing each job's schedule through its queue, measuring, and
//! the verify pass.

use super::block::{self, Decoded, Header};
use super::queue::{EngineFile, EngineQueue, IoBuf, PsyncQueue, Queue, UringQueue};
use super::schedule::{Direction, Op, Region, Schedule};
use super::spec::{IoEngine, JobSpec};
use super::state::{JobState, StateFile, StateWriter, STATE_FORMAT};
use hdrhistogram::Histogram;
use lcfs_engine::device::{open_device, Backend, OpenOptions};
use lcfs_engine::{Config, Engine, Error as EngineError, FormatOptions, ROOT_INODE};
use std::fs::{File, OpenOptions as FileOpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes read per call by the verify pass and written per call by layout.
const PASS_CHUNK_BYTES: u64 = 1 << 20;
/// A verify pass replays at most this many writes of one job beyond the
/// acknowledged ones (a bound on work driven by generations read from disk).
const MAX_REPLAY_WRITES: u64 = 1 << 28;
/// Bad blocks kept per job for the report (all are counted).
const MAX_BAD_BLOCKS_LISTED: usize = 1000;
/// Latencies are recorded in nanoseconds up to an hour, 3 significant digits.
const LATENCY_MAX_NS: u64 = 3_600_000_000_000;

/// Set by SIGINT/SIGTERM: jobs stop issuing and report what they did.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// What the whole run does beyond the jobs themselves.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub seed: u64,
    pub engine: Option<PathBuf>,
    pub engine_size_bytes: u64,
    pub engine_format: bool,
    pub engine_layer: String,
    pub verify_state: Option<PathBuf>,
    pub verify_only: bool,
    pub progress: bool,
}

/// One running copy of a job section (`numjobs` makes several).
#[derive(Clone, Debug)]
pub struct Instance {
    pub spec: JobSpec,
    pub index: u32,
    pub clone: u32,
    pub file: PathBuf,
    pub region: Region,
    pub acknowledged_writes: u64,
}

#[derive(Clone)]
enum Handle {
    File { file: Arc<File>, path: PathBuf },
    Engine(EngineFile),
}

impl Handle {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, String> {
        match self {
            Handle::File { file, path } => {
                let mut done = 0;
                while done < buf.len() {
                    match file.read_at(&mut buf[done..], offset + done as u64) {
                        Ok(0) => break,
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(format!(
                                "reading {} at {}: {e}",
                                path.display(),
                                offset + done as u64
                            ))
                        }
                    }
                }
                Ok(done)
            }
            Handle::Engine(f) => f.read_at(offset, buf),
        }
    }

    fn length(&self) -> Result<u64, String> {
        match self {
            Handle::File { file, path } => file
                .metadata()
                .map(|m| m.len())
                .map_err(|e| format!("stat {}: {e}", path.display())),
            Handle::Engine(f) => f
                .engine
                .getattr(f.layer, f.inode)
                .map(|a| a.size)
                .map_err(|e| format!("engine getattr: {e}")),
        }
    }

    /// Empties the file (verify runs start from nothing, so every block the
    /// verify pass meets was written by this run or reads as zeros).
    fn truncate(&self) -> Result<(), String> {
        match self {
            Handle::File { file, path } => file
                .set_len(0)
                .map_err(|e| format!("truncating {}: {e}", path.display())),
            Handle::Engine(f) => f
                .engine
                .setattr(
                    f.layer,
                    f.inode,
                    &lcfs_engine::SetAttr {
                        mode: None,
                        uid: None,
                        gid: None,
                        size: Some(0),
                        atime: None,
                        mtime: None,
                        ctime: None,
                    },
                )
                .map(|_| ())
                .map_err(|e| format!("engine truncate: {e}")),
        }
    }

    fn queue(&self, spec: &JobSpec) -> Result<Box<dyn Queue>, String> {
        let depth = spec.iodepth as usize;
        Ok(match self {
            Handle::File { file, .. } => match spec.io_engine() {
                IoEngine::IoUring => Box::new(UringQueue::new(file.clone(), depth)?),
                IoEngine::Psync => Box::new(PsyncQueue::new(file.clone())),
            },
            Handle::Engine(f) => Box::new(EngineQueue::new(f.clone(), depth)?),
        })
    }
}

/// The engine, when the run bypasses FUSE.
pub struct EngineTarget {
    engine: Arc<Engine>,
    layer: u64,
}

impl EngineTarget {
    /// Opens `device` (creating a sparse file of `size` when missing) and
    /// formats it when it holds no lcfs, or always with `format`.
    pub fn open(opts: &RunOptions, device: &Path) -> Result<EngineTarget, String> {
        let e = |what: &'static str| move |err: EngineError| format!("engine {what}: {err}");
        let dev: Arc<dyn lcfs_engine::device::Device> = Arc::from(
            open_device(
                device,
                &OpenOptions {
                    backend: Backend::Auto,
                    // A verify pass never creates the device it is to check.
                    create_size_bytes: (!opts.verify_only).then_some(opts.engine_size_bytes),
                },
            )
            .map_err(e("open_device"))?,
        );
        let format = |force| {
            Engine::format(
                dev.clone(),
                &FormatOptions {
                    force,
                    ..FormatOptions::default()
                },
            )
            .map_err(e("format"))
        };
        if opts.engine_format {
            format(true)?;
        }
        let engine = match Engine::open(dev.clone(), Config::default()) {
            Ok(engine) => engine,
            Err(EngineError::NotFormatted) if !opts.verify_only => {
                format(false)?;
                Engine::open(dev.clone(), Config::default()).map_err(e("open"))?
            }
            Err(err) => return Err(format!("engine open {}: {err}", device.display())),
        };
        let layer = match engine.layer_id(&opts.engine_layer) {
            Ok(id) => id,
            Err(_) if !opts.verify_only => engine
                .create_layer(&opts.engine_layer, false)
                .map_err(e("create_layer"))?,
            Err(err) => return Err(format!("engine layer {:?}: {err}", opts.engine_layer)),
        };
        Ok(EngineTarget { engine, layer })
    }

    pub fn close(&self) -> Result<(), String> {
        self.engine
            .close()
            .map_err(|e| format!("engine close: {e}"))
    }
}

/// Expands job sections into instances: `numjobs` copies, each with its file
/// and its region. With `filename` the copies share that file, each on its
/// own `size`-byte region (like fio's offset_increment=size); without it each
/// copy has its own file `<directory>/<name>.<copy>.0`.
pub fn instances(specs: &[JobSpec], engine: bool) -> Result<Vec<Instance>, String> {
    let mut out = Vec::new();
    for spec in specs {
        spec.validate()?;
        for clone in 0..spec.numjobs {
            if out.len() >= super::spec::MAX_JOBS {
                return Err(format!("more than {} jobs in all", super::spec::MAX_JOBS));
            }
            let shared = spec.filename.is_some();
            let file = match (&spec.filename, &spec.directory) {
                (Some(f), Some(d)) if f.is_relative() => d.join(f),
                (Some(f), _) => f.clone(),
                (None, d) => d
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("."))
                    .join(format!("{}.{clone}.0", spec.name)),
            };
            let file = if engine {
                PathBuf::from(
                    file.file_name()
                        .ok_or_else(|| format!("{}: no file name", file.display()))?,
                )
            } else {
                file
            };
            let size = match spec.size_bytes {
                Some(s) => s,
                None if !engine => {
                    let length = std::fs::metadata(&file)
                        .map_err(|_| {
                            format!(
                                "{}: size is needed when {} does not exist",
                                spec.name,
                                file.display()
                            )
                        })?
                        .len();
                    let per_job = length.saturating_sub(spec.offset_bytes)
                        / if shared { spec.numjobs as u64 } else { 1 };
                    per_job - per_job % spec.block_size_min_bytes
                }
                None => return Err(format!("{}: size is needed with --engine", spec.name)),
            };
            if size < spec.block_size_max_bytes {
                return Err(format!(
                    "{}: size {size} is smaller than the block size {}",
                    spec.name, spec.block_size_max_bytes
                ));
            }
            let start = spec.offset_bytes + if shared { clone as u64 * size } else { 0 };
            out.push(Instance {
                spec: spec.clone(),
                index: out.len() as u32,
                clone,
                file,
                region: Region {
                    start_bytes: start,
                    length_bytes: size,
                    unit_bytes: spec.block_size_min_bytes,
                },
                acknowledged_writes: 0,
            });
        }
    }
    Ok(out)
}

/// Instances as the state file recorded them.
pub fn instances_from_state(state: &StateFile) -> Vec<Instance> {
    state
        .jobs
        .iter()
        .map(|j| Instance {
            spec: j.spec.clone(),
            index: j.index,
            clone: j.clone,
            file: j.file.clone(),
            region: Region {
                start_bytes: j.region_start_bytes,
                length_bytes: j.region_length_bytes,
                unit_bytes: j.spec.block_size_min_bytes,
            },
            acknowledged_writes: j.acknowledged_writes,
        })
        .collect()
}

fn open_handle(
    instance: &Instance,
    engine: Option<&EngineTarget>,
    create: bool,
) -> Result<Handle, String> {
    let name = &instance.file;
    if let Some(t) = engine {
        let bytes = name.as_os_str().as_encoded_bytes();
        let inode = match t.engine.lookup(t.layer, ROOT_INODE, bytes) {
            Ok(a) => a.inode,
            Err(_) if create => {
                t.engine
                    .create(t.layer, ROOT_INODE, bytes, 0o644, 0, 0)
                    .map_err(|e| format!("engine create {}: {e}", name.display()))?
                    .inode
            }
            Err(e) => return Err(format!("engine lookup {}: {e}", name.display())),
        };
        return Ok(Handle::Engine(EngineFile {
            engine: t.engine.clone(),
            layer: t.layer,
            inode,
        }));
    }
    let mut o = FileOpenOptions::new();
    o.read(true).write(create).create(create);
    if instance.spec.direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let file = o
        .open(name)
        .map_err(|e| format!("opening {}: {e}", name.display()))?;
    Ok(Handle::File {
        file: Arc::new(file),
        path: name.clone(),
    })
}

/// Makes sure a job that reads finds data: extends the file to its region's
/// end, like fio's "laying out IO file". Not timed. With verify the layout is
/// zeros, which the verify pass reads as "never written".
fn lay_out(instance: &Instance, handle: &Handle) -> Result<(), String> {
    let end = instance.region.end_bytes();
    let length = handle.length()?;
    if length >= end {
        return Ok(());
    }
    let mut buf = IoBuf::new(PASS_CHUNK_BYTES as usize)?;
    if !instance.spec.verify {
        block::fill_filler(&mut buf, instance.index as u64 + 1);
    }
    // Starts at a 4096 boundary at or below the current end, so O_DIRECT
    // handles take the writes.
    let mut offset = length - length % 4096;
    while offset < end {
        let n = (end - offset).min(PASS_CHUNK_BYTES) as usize;
        let data = &buf[..n];
        match handle {
            Handle::File { file, path } => file
                .write_all_at(data, offset)
                .map_err(|e| format!("laying out {}: {e}", path.display()))?,
            Handle::Engine(f) => f.write_at(offset, data)?,
        }
        offset += n as u64;
    }
    match handle {
        Handle::File { file, path } => file
            .sync_all()
            .map_err(|e| format!("fsync {}: {e}", path.display())),
        Handle::Engine(f) => f.fsync(),
    }
}

/// Latencies and totals of one direction (or of fsyncs).
#[derive(Clone)]
pub struct DirectionStats {
    pub ios: u64,
    pub bytes: u64,
    pub latency_ns: Histogram<u64>,
}

impl DirectionStats {
    fn new() -> DirectionStats {
        DirectionStats {
            ios: 0,
            bytes: 0,
            latency_ns: Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3).expect("valid bounds"),
        }
    }
    fn record(&mut self, bytes: u64, latency_ns: u64) {
        self.ios += 1;
        self.bytes += bytes;
        self.latency_ns.saturating_record(latency_ns.max(1));
    }
    pub fn merge(&mut self, other: &DirectionStats) {
        self.ios += other.ios;
        self.bytes += other.bytes;
        self.latency_ns
            .add(&other.latency_ns)
            .expect("same histogram bounds");
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadBlock {
    pub file: PathBuf,
    pub offset_bytes: u64,
    pub length_bytes: u64,
    pub reason: String,
}

#[derive(Clone, Debug, Default)]
pub struct VerifyResult {
    pub units_checked: u64,
    pub bad_count: u64,
    pub bad_blocks: Vec<BadBlock>,
}

pub struct JobResult {
    pub instance: Instance,
    pub read: DirectionStats,
    pub write: DirectionStats,
    pub fsync: DirectionStats,
    pub runtime: Duration,
    pub error: Option<String>,
    pub verify: Option<VerifyResult>,
}

/// Bytes moved so far, for the progress line.
#[derive(Default)]
pub struct Progress {
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub jobs_done: AtomicUsize,
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn fill_write(buf: &mut [u8], op: &Op, instance: &Instance, seed: u64) {
    let unit = instance.region.unit_bytes;
    for (i, chunk) in buf[..op.length_bytes as usize]
        .chunks_mut(unit as usize)
        .enumerate()
    {
        block::encode(
            chunk,
            &Header {
                offset: op.offset_bytes + i as u64 * unit,
                generation: op.generation,
                seed,
                job: instance.index,
                length: unit as u32,
            },
        );
    }
}

/// One job: layout if it reads, the timed workload, then the verify pass.
fn run_job(
    instance: Instance,
    handle: Handle,
    seed: u64,
    state: Option<&StateWriter>,
    progress: &Progress,
) -> JobResult {
    let mut result = JobResult {
        instance: instance.clone(),
        read: DirectionStats::new(),
        write: DirectionStats::new(),
        fsync: DirectionStats::new(),
        runtime: Duration::ZERO,
        error: None,
        verify: None,
    };
    let spec = &instance.spec;
    if spec.rw.reads() {
        if let Err(e) = lay_out(&instance, &handle) {
            result.error = Some(e);
            return result;
        }
    }
    let mut queue = match handle.queue(spec) {
        Ok(q) => q,
        Err(e) => {
            result.error = Some(e);
            return result;
        }
    };
    let mut schedule = Schedule::new(spec, instance.region, seed, instance.index);
    let pool: Result<Vec<IoBuf>, String> = (0..queue.capacity())
        .map(|i| {
            let mut b = IoBuf::new(spec.block_size_max_bytes as usize)?;
            block::fill_filler(&mut b, seed ^ (i as u64) << 32 ^ instance.index as u64);
            Ok(b)
        })
        .collect();
    let mut pool = match pool {
        Ok(p) => p,
        Err(e) => {
            result.error = Some(e);
            return result;
        }
    };
    let byte_limit = if spec.time_based {
        u64::MAX
    } else {
        instance.region.length_bytes
    };
    let start = Instant::now();
    let deadline = spec.runtime().map(|d| start + d);
    let mut issued_bytes = 0u64;
    let mut writes_since_fsync = 0u64;
    let mut fsyncs = 0u64;
    let mut stopping = false;
    let mut last_completion = start;
    // With verify, a write never overlaps a request in flight: two writes to
    // one block completing out of order would leave the older generation.
    // An op that would overlap waits here until the overlap has completed.
    let mut waiting: Option<Op> = None;
    let mut in_flight: Vec<Op> = Vec::with_capacity(queue.capacity());
    loop {
        while !stopping && queue.in_flight() < queue.capacity() {
            let op = match waiting.take() {
                Some(op) => op,
                None => {
                    if issued_bytes >= byte_limit
                        || deadline.is_some_and(|d| Instant::now() >= d)
                        || interrupted()
                    {
                        stopping = true;
                        break;
                    }
                    schedule.next_op()
                }
            };
            if spec.verify && in_flight.iter().any(|o| overlaps(o, &op)) {
                waiting = Some(op);
                break;
            }
            if spec.verify {
                in_flight.push(op);
            }
            let mut buf = pool.pop().expect("a free buffer per free queue slot");
            if op.direction == Direction::Write {
                if spec.verify {
                    fill_write(&mut buf, &op, &instance, seed);
                }
                writes_since_fsync += 1;
            }
            if let Err(e) = queue.submit(op, buf) {
                result.error = Some(e);
                stopping = true;
                break;
            }
            issued_bytes += op.length_bytes;
            if spec.fsync_every_writes > 0 && writes_since_fsync >= spec.fsync_every_writes {
                break;
            }
        }
        let fsync_due = spec.fsync_every_writes > 0
            && writes_since_fsync >= spec.fsync_every_writes
            && result.error.is_none();
        let want = if fsync_due || stopping {
            queue.in_flight()
        } else {
            1
        };
        match queue.reap(want) {
            Ok(done) => {
                for c in done {
                    if let Some(i) = in_flight.iter().position(|o| *o == c.op) {
                        in_flight.swap_remove(i);
                    }
                    last_completion = Instant::now();
                    pool.push(c.buf);
                    if let Err(e) = c.result {
                        result.error.get_or_insert(e);
                        stopping = true;
                        continue;
                    }
                    let stats = match c.op.direction {
                        Direction::Read => {
                            progress
                                .read_bytes
                                .fetch_add(c.op.length_bytes, Ordering::Relaxed);
                            &mut result.read
                        }
                        Direction::Write => {
                            progress
                                .write_bytes
                                .fetch_add(c.op.length_bytes, Ordering::Relaxed);
                            &mut result.write
                        }
                    };
                    stats.record(c.op.length_bytes, c.latency_ns);
                }
            }
            Err(e) => {
                result.error.get_or_insert(e);
                break;
            }
        }
        if fsync_due && result.error.is_none() && queue.in_flight() == 0 {
            if let Err(e) = fsync_and_acknowledge(
                &mut *queue,
                &mut result,
                &mut fsyncs,
                schedule.writes(),
                state,
            ) {
                result.error.get_or_insert(e);
                stopping = true;
            }
            writes_since_fsync = 0;
            last_completion = Instant::now();
        }
        if stopping && queue.in_flight() == 0 {
            break;
        }
    }
    result.runtime = last_completion.duration_since(start);
    // With a state file, the end of the run is acknowledged too, so a later
    // --verify_only expects every write.
    if result.error.is_none() && state.is_some() && schedule.writes() > 0 {
        if let Err(e) = fsync_and_acknowledge(
            &mut *queue,
            &mut result,
            &mut fsyncs,
            schedule.writes(),
            state,
        ) {
            result.error = Some(e);
        }
    }
    drop(queue);
    if spec.verify && spec.rw.writes() && result.error.is_none() && !interrupted() {
        let mut checked = instance.clone();
        checked.acknowledged_writes = schedule.writes();
        match verify_region(&checked, &handle, seed, false) {
            Ok(v) => result.verify = Some(v),
            Err(e) => result.error = Some(e),
        }
    }
    result
}

fn overlaps(a: &Op, b: &Op) -> bool {
    a.offset_bytes < b.offset_bytes + b.length_bytes
        && b.offset_bytes < a.offset_bytes + a.length_bytes
}

fn fsync_and_acknowledge(
    queue: &mut dyn Queue,
    result: &mut JobResult,
    fsyncs: &mut u64,
    writes: u64,
    state: Option<&StateWriter>,
) -> Result<(), String> {
    let t = Instant::now();
    queue.fsync()?;
    result.fsync.record(0, t.elapsed().as_nanos() as u64);
    *fsyncs += 1;
    match state {
        Some(s) => s.acknowledge(result.instance.index, writes, *fsyncs),
        None => Ok(()),
    }
}

/// What a verify pass found in one unit before judging it.
enum Observed {
    Zero,
    Generation(u64),
    Bad(String),
}

/// Reads the instance's region and checks every verify unit.
///
/// `after_crash` false (the verify pass right after the workload): every
/// unit must hold exactly the last generation written to it, or be zero if
/// never written. `after_crash` true (--verify_only): every unit must hold
/// its acknowledged generation (the last write to it among the first
/// `acknowledged_writes` of the schedule) or a later one that the schedule
/// did write to that unit; zero only if nothing acknowledged it. Torn, foreign
/// or misplaced units are errors in both modes.
fn verify_region(
    instance: &Instance,
    handle: &Handle,
    seed: u64,
    after_crash: bool,
) -> Result<VerifyResult, String> {
    let region = instance.region;
    let unit = region.unit_bytes;
    let units = region.units() as usize;
    let mut observed: Vec<Observed> = Vec::with_capacity(units);
    let chunk = (PASS_CHUNK_BYTES - PASS_CHUNK_BYTES % unit).max(unit);
    let mut buf = IoBuf::new(chunk as usize)?;
    let mut offset = region.start_bytes;
    let mut max_generation = 0u64;
    while offset < region.end_bytes() {
        let n = (region.end_bytes() - offset).min(chunk) as usize;
        buf[..n].fill(0);
        // A file shorter than the region reads as zeros past its end.
        handle.read_at(offset, &mut buf[..n])?;
        for (i, u) in buf[..n].chunks(unit as usize).enumerate() {
            let at = offset + i as u64 * unit;
            observed.push(match block::decode(u, at) {
                Decoded::Zero => Observed::Zero,
                Decoded::Bad(reason) => Observed::Bad(reason),
                Decoded::Valid(h) if h.seed != seed || h.job != instance.index => Observed::Bad(
                    format!(
                        "written by another run or job (seed {}, job {}; expected seed {seed}, job {})",
                        h.seed, h.job, instance.index
                    ),
                ),
                Decoded::Valid(h) => {
                    max_generation = max_generation.max(h.generation);
                    Observed::Generation(h.generation)
                }
            });
        }
        offset += n as u64;
    }

    // Replay the schedule: the acknowledged generation of every unit, and
    // which later generations really were aimed at it.
    let acknowledged = instance.acknowledged_writes;
    let replay_to = if after_crash {
        max_generation
            .max(acknowledged)
            .min(acknowledged.saturating_add(MAX_REPLAY_WRITES))
    } else {
        acknowledged
    };
    let mut expected = vec![0u64; units];
    let mut later_ok = vec![false; units];
    let mut schedule = Schedule::new(&instance.spec, region, seed, instance.index);
    while schedule.writes() < replay_to {
        let op = schedule.next_op();
        if op.direction != Direction::Write {
            continue;
        }
        let first = ((op.offset_bytes - region.start_bytes) / unit) as usize;
        let count = (op.length_bytes / unit) as usize;
        for u in first..first + count {
            if op.generation <= acknowledged {
                expected[u] = op.generation;
            } else if matches!(observed[u], Observed::Generation(g) if g == op.generation) {
                later_ok[u] = true;
            }
        }
    }

    let mut result = VerifyResult {
        units_checked: units as u64,
        ..VerifyResult::default()
    };
    let what = if after_crash {
        "acknowledged"
    } else {
        "written"
    };
    for (u, seen) in observed.into_iter().enumerate() {
        let e = expected[u];
        let reason = match seen {
            Observed::Bad(reason) => Some(reason),
            Observed::Zero if e == 0 => None,
            Observed::Zero => Some(format!(
                "reads as zeros, but generation {e} was {what} (a lost write)"
            )),
            Observed::Generation(g) if g == e => None,
            Observed::Generation(g) if g < e => Some(format!(
                "stale: generation {g}, but generation {e} was {what} (a lost write)"
            )),
            Observed::Generation(_) if later_ok[u] => None,
            Observed::Generation(g) => Some(format!(
                "generation {g} never wrote this block (expected generation {e})"
            )),
        };
        if let Some(reason) = reason {
            result.bad_count += 1;
            if result.bad_blocks.len() < MAX_BAD_BLOCKS_LISTED {
                result.bad_blocks.push(BadBlock {
                    file: instance.file.clone(),
                    offset_bytes: region.start_bytes + u as u64 * unit,
                    length_bytes: unit,
                    reason,
                });
            }
        }
    }
    Ok(result)
}

/// The whole run's outcome.
pub struct RunResult {
    pub seed: u64,
    pub jobs: Vec<JobResult>,
    pub elapsed: Duration,
    pub verify_only: bool,
}

/// Runs `specs` (or, with `verify_only`, checks what the state file's run
/// acknowledged) and returns every job's result.
pub fn run(specs: &[JobSpec], opts: &RunOptions) -> Result<RunResult, String> {
    let state_in = if opts.verify_only {
        let path = opts.verify_state.as_ref().ok_or(
            "--verify_only needs --verify_state=PATH (the state file of the run that wrote)",
        )?;
        Some(StateFile::load(path)?)
    } else {
        None
    };
    let seed = state_in.as_ref().map_or(opts.seed, |s| s.seed);
    let engine_path = opts
        .engine
        .clone()
        .or_else(|| state_in.as_ref().and_then(|s| s.engine.clone()));
    let mut opts = opts.clone();
    if let Some(s) = &state_in {
        opts.engine_layer = s.engine_layer.clone();
    }
    let engine = match &engine_path {
        Some(p) => Some(EngineTarget::open(&opts, p)?),
        None => None,
    };
    let instances = match &state_in {
        Some(s) => instances_from_state(s),
        None => instances(specs, engine.is_some())?,
    };
    let mut handles = Vec::with_capacity(instances.len());
    for i in &instances {
        let create = !opts.verify_only;
        handles.push(open_handle(i, engine.as_ref(), create)?);
    }
    if !opts.verify_only {
        let mut truncated = std::collections::HashSet::new();
        for (i, h) in instances.iter().zip(&handles) {
            if i.spec.verify && i.spec.rw.writes() && truncated.insert(i.file.clone()) {
                h.truncate()?;
            }
        }
    }
    let start = Instant::now();

    if opts.verify_only {
        let mut jobs = Vec::new();
        for (instance, handle) in instances.into_iter().zip(handles) {
            let verify = verify_region(&instance, &handle, seed, true);
            let (verify, error) = match verify {
                Ok(v) => (Some(v), None),
                Err(e) => (None, Some(e)),
            };
            jobs.push(JobResult {
                instance,
                read: DirectionStats::new(),
                write: DirectionStats::new(),
                fsync: DirectionStats::new(),
                runtime: start.elapsed(),
                error,
                verify,
            });
        }
        if let Some(e) = &engine {
            e.close()?;
        }
        return Ok(RunResult {
            seed,
            jobs,
            elapsed: start.elapsed(),
            verify_only: true,
        });
    }

    let state = match &opts.verify_state {
        Some(path) => Some(StateWriter::create(
            path,
            StateFile {
                format: STATE_FORMAT,
                seed,
                engine: engine_path.clone(),
                engine_layer: opts.engine_layer.clone(),
                jobs: instances
                    .iter()
                    .map(|i| JobState {
                        spec: i.spec.clone(),
                        index: i.index,
                        clone: i.clone,
                        file: i.file.clone(),
                        region_start_bytes: i.region.start_bytes,
                        region_length_bytes: i.region.length_bytes,
                        acknowledged_writes: 0,
                        completed_fsyncs: 0,
                    })
                    .collect(),
            },
        )?),
        None => None,
    };
    let progress = Progress::default();
    let total = instances.len();
    let jobs = std::thread::scope(|scope| {
        let mut threads = Vec::new();
        for (instance, handle) in instances.into_iter().zip(handles) {
            let state = state.as_ref();
            let progress = &progress;
            let name = format!("stress-{}", instance.index);
            threads.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn_scoped(scope, move || {
                        let r = run_job(instance, handle, seed, state, progress);
                        progress.jobs_done.fetch_add(1, Ordering::SeqCst);
                        r
                    })
                    .map_err(|e| format!("spawning a job thread: {e}")),
            );
        }
        if opts.progress {
            super::report::show_progress(&progress, total, specs);
        }
        threads
            .into_iter()
            .map(|t| t.and_then(|t| t.join().map_err(|_| "a job thread panicked".to_string())))
            .collect::<Result<Vec<_>, String>>()
    })?;
    if let Some(e) = &engine {
        e.close()?;
    }
    Ok(RunResult {
        seed,
        jobs,
        elapsed: start.elapsed(),
        verify_only: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIT: u64 = 4096;

    /// A sequential 4 KiB write job over 16 blocks: generations 1-16 fill
    /// blocks 0-15, generation 17 + i rewrites block i.
    fn instance(acknowledged_writes: u64) -> Instance {
        let mut spec = JobSpec::new("t");
        spec.set("rw", Some("write")).unwrap();
        spec.set("size", Some("64k")).unwrap();
        spec.set("verify", Some("xxh3")).unwrap();
        Instance {
            spec,
            index: 0,
            clone: 0,
            file: PathBuf::from("t"),
            region: Region {
                start_bytes: 0,
                length_bytes: 16 * UNIT,
                unit_bytes: UNIT,
            },
            acknowledged_writes,
        }
    }

    fn put(file: &File, block: u64, generation: u64) {
        let mut unit = vec![0u8; UNIT as usize];
        block::encode(
            &mut unit,
            &Header {
                offset: block * UNIT,
                generation,
                seed: 5,
                job: 0,
                length: UNIT as u32,
            },
        );
        file.write_all_at(&unit, block * UNIT).unwrap();
    }

    /// The file as the first `writes` writes of the schedule leave it.
    fn setup(writes: u64) -> (tempfile::TempDir, Handle, Arc<File>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let file = Arc::new(
            FileOpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap(),
        );
        for generation in 1..=writes {
            put(&file, (generation - 1) % 16, generation);
        }
        let handle = Handle::File {
            file: file.clone(),
            path,
        };
        (dir, handle, file)
    }

    fn reasons(instance: &Instance, handle: &Handle, after_crash: bool) -> Vec<(u64, String)> {
        verify_region(instance, handle, 5, after_crash)
            .unwrap()
            .bad_blocks
            .into_iter()
            .map(|b| (b.offset_bytes / UNIT, b.reason))
            .collect()
    }

    #[test]
    fn exact_pass_accepts_the_last_write_and_flags_a_stale_block() {
        let (_dir, handle, file) = setup(20);
        assert_eq!(reasons(&instance(20), &handle, false), vec![]);
        put(&file, 2, 3);
        let bad = reasons(&instance(20), &handle, false);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(bad[0].0, 2);
        assert!(bad[0].1.contains("stale"), "{}", bad[0].1);
    }

    #[test]
    fn after_a_crash_later_scheduled_generations_are_accepted() {
        // 18 writes acknowledged, 20 landed: blocks 2 and 3 are newer.
        let (_dir, handle, _file) = setup(20);
        assert_eq!(reasons(&instance(18), &handle, true), vec![]);
    }

    #[test]
    fn after_a_crash_lost_and_foreign_generations_are_errors() {
        let (_dir, handle, file) = setup(18);
        // Block 1's acknowledged generation 18 lost (back to 2).
        put(&file, 1, 2);
        // Block 5 holds generation 19, which the schedule aimed at block 2.
        put(&file, 5, 19);
        // Block 9 reads as zeros.
        file.write_all_at(&[0u8; UNIT as usize], 9 * UNIT).unwrap();
        let bad = reasons(&instance(18), &handle, true);
        let blocks: Vec<u64> = bad.iter().map(|b| b.0).collect();
        assert_eq!(blocks, vec![1, 5, 9], "{bad:?}");
        assert!(bad[0].1.contains("stale"));
        assert!(bad[1].1.contains("never wrote"));
        assert!(bad[2].1.contains("zeros"));
    }

    #[test]
    fn nothing_acknowledged_allows_zeros_and_a_short_file() {
        let (_dir, handle, _file) = setup(0);
        assert_eq!(reasons(&instance(0), &handle, true), vec![]);
        let (_dir, handle, _file) = setup(3);
        assert_eq!(reasons(&instance(0), &handle, true), vec![]);
    }
}
