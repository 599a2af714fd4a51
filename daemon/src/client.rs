//! The command line's side of the control protocol: connect to the daemon,
//! send one request, read one answer, print it for people or as JSON.

use crate::error::{Error, Result};
use crate::protocol::{FsckReport, HotFile, Image, Layer, Stats, MAX_LINE_BYTES};
use crate::size::human_bytes;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default path of the daemon's control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/lcfs/control.sock";

/// How long to wait for an answer. fsck waits as long as it takes: it
/// walks the whole filesystem.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

pub struct Client {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(socket: &Path) -> Result<Client> {
        let stream = UnixStream::connect(socket).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => Error::NoDaemon {
                socket: socket.to_path_buf(),
                why: "no socket",
            },
            Some(libc::ECONNREFUSED) => Error::NoDaemon {
                socket: socket.to_path_buf(),
                why: "nothing listening on the socket",
            },
            Some(libc::EACCES) | Some(libc::EPERM) => Error::Usage(format!(
                "{}: permission denied (the control socket is root-only)",
                socket.display()
            )),
            _ => Error::io(format!("connecting to {}", socket.display()), e),
        })?;
        let writer = stream
            .try_clone()
            .map_err(|e| Error::io("control socket", e))?;
        Ok(Client {
            socket: socket.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends one request; returns its `result`, or the daemon's error.
    pub fn call(&mut self, request: Value, timeout: Option<Duration>) -> Result<Value> {
        let context = |e: io::Error| {
            let what = if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                "no answer in time from"
            } else {
                "talking to"
            };
            Error::io(format!("{what} the daemon at {}", self.socket.display()), e)
        };
        let mut line = serde_json::to_vec(&request).map_err(|e| Error::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(context)?;
        self.reader
            .get_ref()
            .set_read_timeout(timeout)
            .map_err(context)?;
        let mut answer = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE_BYTES as u64 * 64)
            .read_until(b'\n', &mut answer)
            .map_err(context)?;
        if n == 0 {
            return Err(Error::Protocol(
                "the daemon closed the connection without answering".into(),
            ));
        }
        let answer: Value =
            serde_json::from_slice(&answer).map_err(|e| Error::Protocol(e.to_string()))?;
        match answer.get("ok") {
            Some(Value::Bool(true)) => Ok(answer.get("result").cloned().unwrap_or(Value::Null)),
            Some(Value::Bool(false)) => {
                let error = &answer["error"];
                Err(Error::Daemon {
                    errno: error["errno"].as_i64().unwrap_or(0) as i32,
                    message: error["message"]
                        .as_str()
                        .unwrap_or("unknown error")
                        .to_string(),
                })
            }
            _ => Err(Error::Protocol(format!("no \"ok\" in {answer}"))),
        }
    }
}

/// Connects, sends one request and decodes its result.
fn request<T: DeserializeOwned>(
    socket: &Path,
    request: Value,
    timeout: Option<Duration>,
) -> Result<T> {
    let result = Client::connect(socket)?.call(request, timeout)?;
    serde_json::from_value(result).map_err(|e| Error::Protocol(e.to_string()))
}

pub fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Protocol(e.to_string()))?;
    println!("{text}");
    Ok(())
}

pub fn layer_create(socket: &Path, name: &str, parent: Option<&str>, cold: bool) -> Result<()> {
    let layer: Layer = request(
        socket,
        json!({"op": "layer.create", "name": name, "parent": parent, "cold": cold}),
        Some(ANSWER_TIMEOUT),
    )?;
    match &layer.parent {
        Some(parent) => println!("cloned {parent} into {} at {}", layer.name, layer.path),
        None => println!("created {} at {}", layer.name, layer.path),
    }
    Ok(())
}

pub fn layer_commit(socket: &Path, name: &str) -> Result<()> {
    let layer: Layer = request(
        socket,
        json!({"op": "layer.commit", "name": name}),
        Some(ANSWER_TIMEOUT),
    )?;
    println!("committed {} (now read-only)", layer.name);
    Ok(())
}

pub fn layer_remove(socket: &Path, name: &str) -> Result<()> {
    let _: Value = request(
        socket,
        json!({"op": "layer.remove", "name": name}),
        Some(ANSWER_TIMEOUT),
    )?;
    println!("removed {name}");
    Ok(())
}

pub fn layer_list(socket: &Path, as_json: bool) -> Result<()> {
    let layers: Vec<Layer> = request(socket, json!({"op": "layer.list"}), Some(ANSWER_TIMEOUT))?;
    if as_json {
        return print_json(&layers);
    }
    let width = name_width(layers.iter().map(|l| l.name.as_str()));
    let parent_width = layers
        .iter()
        .filter_map(|l| l.parent.as_ref().map(String::len))
        .chain([6])
        .max()
        .unwrap_or(6);
    println!(
        "{:<width$}  {:<parent_width$}  {:<8}  {:>8}  {:>10}  {:>8}  CREATED",
        "NAME", "PARENT", "STATE", "CHILDREN", "OWNED", "INODES"
    );
    for l in &layers {
        println!(
            "{:<width$}  {:<parent_width$}  {:<8}  {:>8}  {:>10}  {:>8}  {}",
            l.name,
            l.parent.as_deref().unwrap_or("-"),
            state(l),
            l.children,
            human_bytes(l.owned_bytes),
            l.inode_count,
            seconds(&l.created),
        );
    }
    Ok(())
}

pub fn layer_stat(socket: &Path, name: &str, as_json: bool) -> Result<()> {
    let l: Layer = request(
        socket,
        json!({"op": "layer.stat", "name": name}),
        Some(ANSWER_TIMEOUT),
    )?;
    if as_json {
        return print_json(&l);
    }
    println!("name:      {}", l.name);
    println!("id:        {}", l.id);
    println!("parent:    {}", l.parent.as_deref().unwrap_or("-"));
    println!("state:     {}", state(&l));
    println!("log:       {}", if l.cold { "cold" } else { "hot" });
    println!("children:  {}", l.children);
    println!(
        "owned:     {} ({} bytes)",
        human_bytes(l.owned_bytes),
        l.owned_bytes
    );
    match l.quota_bytes {
        Some(q) => println!("limit:     {} ({q} bytes)", human_bytes(q)),
        None => println!("limit:     -"),
    }
    println!("inodes:    {}", l.inode_count);
    if let Some(d) = &l.diff_id {
        println!("diff id:   {d}");
    }
    match &l.root {
        Some(root) => println!("seal:      sealed, root {root}"),
        None => println!(
            "seal:      {}",
            match l.seal.as_str() {
                "sealing" => "sealing (begun, not finished)",
                "unsealed" => "not yet (`lcfs verify` seals it now; docs/integrity.md says which layers the daemon seals unasked)",
                "writable" => "none (a writable layer is sealed once frozen)",
                other => other,
            }
        ),
    }
    println!(
        "verified reads: {}",
        if l.verified_reads { "on" } else { "off" }
    );
    let u = &l.usage;
    println!(
        "clones:    {} (last {})",
        u.clones,
        u.last_clone.as_deref().unwrap_or("-")
    );
    println!(
        "read:      {} in {} reads; its removed clones {} in {}",
        human_bytes(u.bytes_read),
        u.reads,
        human_bytes(u.clone_bytes_read),
        u.clone_reads
    );
    println!(
        "start-up:  {} to its first read ({} in its first 10 s); its removed clones' mean {} over {}",
        duration(u.startup_seconds),
        human_bytes(u.early_bytes_read),
        duration(u.mean_clone_startup()),
        u.clone_starts
    );
    if u.applied_bytes > 0 {
        println!(
            "pulled:    {} applied in {}",
            human_bytes(u.applied_bytes),
            duration(Some(u.apply_seconds))
        );
    }
    println!("created:   {}", l.created);
    println!("frozen at: {}", l.frozen_at.as_deref().unwrap_or("-"));
    println!("path:      {}", l.path);
    Ok(())
}

/// What `lcfs top layers` and `lcfs top images` sort by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TopSort {
    /// Layers cloned from it, ever (for an image: containers started).
    #[value(alias = "starts")]
    Clones,
    /// The last clone (container start).
    LastStart,
    /// Bytes read through it and its removed clones.
    Reads,
    /// Bytes it owns.
    Size,
    /// How long applying it took (pulled layers).
    PullTime,
    /// The mean start-up (creation to first read) of its removed clones.
    StartupTime,
    /// Creation time.
    Created,
}

/// What `lcfs top layers` ranks a row by.
pub struct Ranked<'a> {
    pub name: &'a str,
    pub usage: &'a crate::protocol::Usage,
    pub owned_bytes: u64,
    /// RFC 3339; empty where it means nothing (rows over several hosts).
    pub created: &'a str,
}

/// `a` before `b` when it has more (or later) of `by`; ties by name.
pub fn rank(by: TopSort, a: &Ranked, b: &Ranked) -> std::cmp::Ordering {
    let read = |r: &Ranked| r.usage.bytes_read.saturating_add(r.usage.clone_bytes_read);
    let order = match by {
        TopSort::Clones => b.usage.clones.cmp(&a.usage.clones),
        // RFC 3339 UTC with fixed nanoseconds sorts as text; never cloned
        // (null) sorts last.
        TopSort::LastStart => b.usage.last_clone.cmp(&a.usage.last_clone),
        TopSort::Reads => read(b).cmp(&read(a)),
        TopSort::Size => b.owned_bytes.cmp(&a.owned_bytes),
        TopSort::PullTime => b.usage.apply_seconds.total_cmp(&a.usage.apply_seconds),
        TopSort::StartupTime => {
            let mean = |r: &Ranked| r.usage.mean_clone_startup().unwrap_or(-1.0);
            mean(b).total_cmp(&mean(a))
        }
        TopSort::Created => b.created.cmp(a.created),
    };
    order.then_with(|| a.name.cmp(b.name))
}

impl<'a> From<&'a Layer> for Ranked<'a> {
    fn from(l: &'a Layer) -> Ranked<'a> {
        Ranked {
            name: &l.name,
            usage: &l.usage,
            owned_bytes: l.owned_bytes,
            created: &l.created,
        }
    }
}

/// Sorts `layers` for `lcfs top layers`: most (or latest) first.
pub fn sort_top(layers: &mut [Layer], by: TopSort) {
    layers.sort_by(|a, b| rank(by, &a.into(), &b.into()));
}

/// The width of a table's NAME column: the longest name, at least "NAME".
pub fn name_width<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    names.map(str::len).chain([4]).max().unwrap_or(4)
}

/// What `lcfs top layers|images` shows.
pub struct Top {
    pub sort: TopSort,
    pub limit: usize,
    /// Only this image's rows.
    pub image: Option<String>,
    pub json: bool,
}

/// Keeps the layers `image` names (when given): its chain and containers.
pub fn only_image(layers: &mut Vec<Layer>, image: Option<&str>) {
    if let Some(i) = image {
        layers.retain(|l| l.images.iter().any(|n| n == i));
    }
}

pub fn top_layers(socket: &Path, top: &Top) -> Result<()> {
    let mut layers: Vec<Layer> =
        request(socket, json!({"op": "layer.list"}), Some(ANSWER_TIMEOUT))?;
    only_image(&mut layers, top.image.as_deref());
    sort_top(&mut layers, top.sort);
    layers.truncate(top.limit);
    if top.json {
        return print_json(&layers);
    }
    let width = name_width(layers.iter().map(|l| l.name.as_str()));
    println!(
        "{:<width$}  {:<8}  {:>6}  {:<19}  {:>8}  {:>10}  {:>11}  {:>8}  {:>7}  {:>10}",
        "NAME",
        "STATE",
        "CLONES",
        "LAST START",
        "READS",
        "READ",
        "CLONES READ",
        "STARTUP",
        "PULL",
        "OWNED"
    );
    for l in &layers {
        let u = &l.usage;
        println!(
            "{:<width$}  {:<8}  {:>6}  {:<19}  {:>8}  {:>10}  {:>11}  {:>8}  {:>7}  {:>10}",
            l.name,
            state(l),
            u.clones,
            u.last_clone
                .as_deref()
                .map(seconds)
                .unwrap_or_else(|| "-".into()),
            u.reads,
            human_bytes(u.bytes_read),
            human_bytes(u.clone_bytes_read),
            duration(u.mean_clone_startup()),
            duration((u.applied_bytes > 0).then_some(u.apply_seconds)),
            human_bytes(l.owned_bytes),
        );
    }
    Ok(())
}

/// `1.23 s`, `56 ms` or `-`.
pub fn duration(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s >= 1.0 => format!("{s:.2} s"),
        Some(s) => format!("{:.0} ms", s * 1000.0),
    }
}

fn state(l: &Layer) -> &'static str {
    if l.frozen {
        "frozen"
    } else {
        "writable"
    }
}

/// `2026-11-01T12:34:56.123456789Z` -> `2026-11-01 12:34:56`.
fn seconds(rfc3339: &str) -> String {
    rfc3339.get(..19).unwrap_or(rfc3339).replacen('T', " ", 1)
}

/// A time to the second, or `-` for none.
pub fn short_time(rfc3339: Option<&str>) -> String {
    rfc3339.map(seconds).unwrap_or_else(|| "-".into())
}

pub fn top_images(socket: &Path, top: &Top) -> Result<()> {
    let images: Vec<Image> = request(socket, json!({"op": "image.list"}), Some(ANSWER_TIMEOUT))?;
    print_images(&pick_images(images, top), top.json)
}

/// Sorts, filters by `--image` and cuts.
pub fn pick_images(mut images: Vec<Image>, top: &Top) -> Vec<Image> {
    if let Some(k) = &top.image {
        images.retain(|i| crate::images::matches(i, k));
    }
    crate::images::sort_images(&mut images, top.sort);
    images.truncate(top.limit);
    images
}

/// The `lcfs top images` table (or JSON).
pub fn print_images(images: &[Image], as_json: bool) -> Result<()> {
    if as_json {
        return print_json(&images);
    }
    let width = name_width(images.iter().map(|i| i.name.as_str()));
    let per_start = |i: &Image, n: u64| (i.startups > 0).then(|| n / i.startups);
    println!(
        "{:<width$}  {:>6}  {:<19}  {:>7}  {:>8}  {:>8}  {:>10}  {:>8}  {:>13}  {:>10}  {:>10}",
        "IMAGE",
        "STARTS",
        "LAST START",
        "RUNNING",
        "UPTIME",
        "STARTUP",
        "START READ",
        "PULL",
        "PULLED",
        "READ",
        "SIZE"
    );
    for i in images {
        println!(
            "{:<width$}  {:>6}  {:<19}  {:>7}  {:>8}  {:>8}  {:>10}  {:>8}  {:>13}  {:>10}  {:>10}",
            i.name,
            i.starts,
            short_time(i.last_start.as_deref()),
            format!("{}/{}", i.running, i.containers),
            duration(i.uptime_seconds),
            duration(i.mean_startup_seconds),
            per_start(i, i.startup_bytes)
                .map(|b| format!(
                    "{} {}f",
                    human_bytes(b),
                    per_start(i, i.startup_files).unwrap_or(0)
                ))
                .unwrap_or_else(|| "-".into()),
            duration((i.pull_bytes > 0).then_some(i.pull_seconds)),
            human_bytes(i.pull_bytes),
            human_bytes(i.bytes_read),
            human_bytes(i.size_bytes),
        );
    }
    Ok(())
}

pub fn top_files(socket: &Path, image: Option<&str>, limit: usize, as_json: bool) -> Result<()> {
    let mut rows: Vec<HotFile> = request(
        socket,
        json!({"op": "image.files", "image": image}),
        Some(ANSWER_TIMEOUT),
    )?;
    sort_files(&mut rows);
    rows.truncate(limit);
    print_files(&rows, as_json)
}

/// Most read first, by the reads each is sure to have had.
pub fn sort_files(rows: &mut [HotFile]) {
    let sure = |r: &HotFile| r.reads.saturating_sub(r.error);
    rows.sort_by(|a, b| {
        sure(b)
            .cmp(&sure(a))
            .then_with(|| a.image.cmp(&b.image))
            .then_with(|| a.path.cmp(&b.path))
    });
}

/// The `lcfs top files` table (or JSON).
pub fn print_files(rows: &[HotFile], as_json: bool) -> Result<()> {
    if as_json {
        return print_json(&rows);
    }
    let width = name_width(rows.iter().map(|r| r.image.as_str())).max(5);
    println!(
        "{:<width$}  {:>8}  {:>10}  {:>6}  PATH",
        "IMAGE", "READS", "READ", "ERROR"
    );
    for r in rows {
        println!(
            "{:<width$}  {:>8}  {:>10}  {:>6}  {}",
            r.image,
            r.reads,
            human_bytes(r.bytes),
            r.error,
            r.path
        );
    }
    Ok(())
}

/// How long a garbage collection pass may take to answer (removals go
/// through dockerd or containerd, whose own garbage collection runs).
const GC_TIMEOUT: Duration = Duration::from_secs(3600);

/// `lcfs gc [--dry-run] [--orphans] [--json]`.
pub fn gc(socket: &Path, dry_run: bool, orphans: bool, as_json: bool) -> Result<()> {
    let report: crate::gc::Report = request(
        socket,
        json!({"op": "gc.run", "dry_run": dry_run, "orphans": orphans}),
        Some(GC_TIMEOUT),
    )?;
    if as_json {
        return print_json(&report);
    }
    let policy = report.policy.clone().unwrap_or_default();
    println!(
        "device use {:.1}% of {} (high watermark {}%, low {}%){}",
        report.used_percent_before,
        human_bytes(report.capacity_bytes),
        policy.high_watermark_percent,
        policy.low_watermark_percent,
        if report.dry_run {
            "; dry run: nothing removed"
        } else {
            ""
        }
    );
    if report.mirror_blobs_evicted > 0 {
        println!(
            "registry mirror: {} blob(s) evicted from the cache ({})",
            report.mirror_blobs_evicted,
            human_bytes(report.mirror_bytes_evicted)
        );
    }
    let width = name_width(
        report
            .remove
            .iter()
            .chain(&report.keep)
            .map(|e| e.image.as_str()),
    );
    println!(
        "{:<width$}  {:<10}  {:<19}  {:>10}  WHY",
        "IMAGE", "ACTION", "LAST USED", "ALONE"
    );
    for e in report.remove.iter().chain(&report.keep) {
        let action = match (&e.reason, &e.outcome) {
            (Some(_), None) => "remove".to_string(),
            (Some(_), Some(o)) => o.split(':').next().unwrap_or(o).to_string(),
            (None, _) => "keep".to_string(),
        };
        let why = match (e.reason, e.keep) {
            (Some(r), _) => serde_json::to_value(r)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string)),
            (_, Some(k)) => serde_json::to_value(k)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string)),
            _ => None,
        }
        .unwrap_or_default();
        let detail = e
            .outcome
            .as_deref()
            .and_then(|o| o.split_once(": ").map(|(_, d)| format!(" ({d})")))
            .unwrap_or_default();
        println!(
            "{:<width$}  {:<10}  {:<19}  {:>10}  {why}{detail}",
            e.image,
            action,
            seconds(&e.last_used),
            human_bytes(e.bytes),
        );
    }
    if let Some(why) = &report.orphans_unknown {
        println!("orphans: unknown: {why}");
    }
    for o in &report.orphans {
        println!(
            "orphan layer {} ({}, made {}){}{}",
            o.layer,
            human_bytes(o.owned_bytes),
            seconds(&o.created),
            if o.past_grace {
                ""
            } else {
                ", within its grace period"
            },
            o.outcome
                .as_deref()
                .map(|x| format!(": {x}"))
                .unwrap_or_default()
        );
    }
    if !report.dry_run {
        println!(
            "device use now {:.1}%: {} given back in {:.1} s",
            report.used_percent_after,
            human_bytes(report.freed_bytes),
            report.seconds
        );
    }
    Ok(())
}

/// `lcfs gc --reload`.
pub fn gc_reload(socket: &Path, as_json: bool) -> Result<()> {
    let policy: crate::gc::Policy =
        request(socket, json!({"op": "gc.reload"}), Some(ANSWER_TIMEOUT))?;
    if as_json {
        return print_json(&policy);
    }
    println!(
        "policy reloaded: {} (high watermark {}%, low {}%, every {} s)",
        if policy.enabled {
            "enabled"
        } else {
            "disabled"
        },
        policy.high_watermark_percent,
        policy.low_watermark_percent,
        policy.interval_seconds
    );
    Ok(())
}

/// `lcfs statistics [on|off]`.
pub fn statistics(socket: &Path, enabled: Option<bool>) -> Result<()> {
    let state: Value = request(
        socket,
        json!({"op": "statistics", "enabled": enabled}),
        Some(ANSWER_TIMEOUT),
    )?;
    let on = state["enabled"].as_bool().unwrap_or(false);
    println!("statistics {}", if on { "on" } else { "off" });
    Ok(())
}

pub fn sync(socket: &Path) -> Result<()> {
    let _: Value = request(socket, json!({"op": "sync"}), Some(ANSWER_TIMEOUT))?;
    Ok(())
}

pub fn lazy(socket: &Path, as_json: bool) -> Result<()> {
    let layers: Vec<lcfs_lazy::mount::LayerReport> =
        request(socket, json!({"op": "lazy"}), Some(ANSWER_TIMEOUT))?;
    if as_json {
        return print_json(&layers);
    }
    if layers.is_empty() {
        println!("no layer mounted lazily");
        return Ok(());
    }
    println!(
        "{:<20} {:>9} {:>9} {:>10} {:>10} {:>7} {:<9} BLOB",
        "LAYER", "SIZE", "ABSENT", "FETCHED", "VIA PEERS", "ERRORS", "STATE"
    );
    for l in layers {
        println!(
            "{:<20} {:>9} {:>9} {:>10} {:>10} {:>7} {:<9} {}",
            l.layer,
            human_bytes(l.blocks * 4096),
            human_bytes(l.absent_blocks * 4096),
            human_bytes(l.fetched_bytes),
            human_bytes(l.peer_bytes),
            l.fetch_errors,
            if l.complete { "complete" } else { "lazy" },
            l.blob
        );
    }
    Ok(())
}

pub fn stats(socket: &Path, as_json: bool) -> Result<()> {
    let s: Stats = request(socket, json!({"op": "stats"}), Some(ANSWER_TIMEOUT))?;
    if as_json {
        return print_json(&s);
    }
    let percent = |part: u64, whole: u64| {
        if whole == 0 {
            0.0
        } else {
            part as f64 * 100.0 / whole as f64
        }
    };
    println!("device:       {} (I/O backend {})", s.device, s.backend);
    println!("mountpoint:   {}", s.mountpoint);
    println!("layers:       {}", s.layers);
    if s.removals_pending > 0 {
        println!(
            "removing:     {} removed layer(s), space being freed",
            s.removals_pending
        );
    }
    if s.verified_blocks > 0 || s.verify_failures > 0 {
        println!(
            "verified:     {} of reads checked against seals, {} refused",
            human_bytes(s.verified_blocks * 4096),
            s.verify_failures
        );
    }
    match &s.read_only_reason {
        None => println!("state:        writing"),
        Some(why) => println!("state:        READ-ONLY: {why} (restart the daemon to recover from the last checkpoint)"),
    }
    println!(
        "space:        {} live of {} ({:.1}%); {} of {} segments free ({} each)",
        human_bytes(s.live_bytes),
        human_bytes(s.capacity_bytes),
        percent(s.live_bytes, s.capacity_bytes),
        s.segments_free,
        s.segments,
        human_bytes(s.segment_size_bytes)
    );
    println!(
        "device I/O:   {} writes ({}), {} reads ({}), {} flushes, {} batches of {:.1} ops",
        s.device_io.writes,
        human_bytes(s.device_io.write_bytes),
        s.device_io.reads,
        human_bytes(s.device_io.read_bytes),
        s.device_io.flushes,
        s.device_io.batches,
        if s.device_io.batches == 0 {
            0.0
        } else {
            s.device_io.batched_ops as f64 / s.device_io.batches as f64
        }
    );
    println!(
        "coalescing:   {:.1} user writes per device write ({} write calls, {})",
        s.coalescing_ratio,
        s.engine.user_write_calls,
        human_bytes(s.engine.user_write_bytes)
    );
    println!(
        "node cache:   {} hits, {} misses ({:.1}% hits); {} nodes, {}, {} dirty",
        s.node_cache.hits,
        s.node_cache.misses,
        percent(s.node_cache.hits, s.node_cache.hits + s.node_cache.misses),
        s.node_cache.nodes,
        human_bytes(s.node_cache.bytes),
        s.node_cache.dirty_nodes
    );
    println!(
        "block cache:  {} hits, {} misses ({:.1}% hits); {} blocks",
        s.block_cache.hits,
        s.block_cache.misses,
        percent(
            s.block_cache.hits,
            s.block_cache.hits + s.block_cache.misses
        ),
        s.block_cache.blocks
    );
    println!(
        "lookups:      {} answered without the store lock, {} with it ({:.1}% without)",
        s.metadata_cache.hits,
        s.metadata_cache.misses,
        percent(
            s.metadata_cache.hits,
            s.metadata_cache.hits + s.metadata_cache.misses
        )
    );
    println!(
        "log:          {} blocks appended, {} checkpoints (sequence {})",
        s.engine.log_blocks_appended, s.engine.checkpoints, s.checkpoint_seq
    );
    println!(
        "fsync log:    {} records written, {} fsyncs checkpointed instead; {} replayed at open",
        s.engine.fsync_records, s.engine.fsync_checkpoints, s.engine.fsync_records_replayed
    );
    if let Some(p) = &s.passthrough {
        println!(
            "passthrough:  {}; {} opens passed through to an image's copy, {} of them with reads and writes through the daemon",
            if p.active { "on" } else { "refused by the kernel" },
            p.opens,
            p.direct_opens
        );
    }
    if let Some(m) = &s.mirror {
        let n = |k: &str| m.get(k).copied().unwrap_or(0);
        println!(
            "mirror:       blobs {} from the cache, {} from peers ({}), {} from upstream ({}); {} served to peers ({}); {} digest mismatches, {} fallbacks, {} ranges passed on",
            n("blobs_from_cache"),
            n("blobs_from_peers"),
            human_bytes(n("bytes_from_peers")),
            n("blobs_from_upstream"),
            human_bytes(n("bytes_from_upstream")),
            n("served_to_peers"),
            human_bytes(n("bytes_to_peers")),
            n("digest_mismatches"),
            n("fallbacks"),
            n("ranges_passed")
        );
    }
    println!(
        "cleaner:      {} segments cleaned, {} blocks relocated",
        s.engine.segments_cleaned, s.engine.blocks_relocated
    );
    println!(
        "promotion:    {} taken from container layers at commits instead of written",
        human_bytes(s.engine.promoted_bytes)
    );
    if let Some(p) = &s.plugin {
        let mut slowest: Vec<_> = p.methods.iter().collect();
        slowest.sort_by_key(|(_, m)| std::cmp::Reverse(m.total_us));
        let top: Vec<String> = slowest
            .iter()
            .take(3)
            .map(|(name, m)| {
                let name = name.strip_prefix("GraphDriver.").unwrap_or(name);
                format!("{name} {:.3} s", m.total_us as f64 / 1e6)
            })
            .collect();
        println!(
            "docker plugin: {} calls, busy {:.3} s (sum {:.3} s){}{}",
            p.calls,
            p.busy_us as f64 / 1e6,
            p.total_us as f64 / 1e6,
            if top.is_empty() { "" } else { "; most time: " },
            top.join(", ")
        );
    }
    Ok(())
}

/// The running daemon's digest of layer `name` (it reads every file: no
/// time limit).
pub fn layer_digest(
    socket: &Path,
    name: &str,
    manifest: Option<&Path>,
) -> Result<crate::protocol::LayerDigest> {
    request(socket, with_manifest("layer.digest", name, manifest), None)
}

/// The running daemon's check of layer `name` against the manifest at
/// `manifest` (an absolute path the daemon reads), or against its seal.
pub fn layer_verify(
    socket: &Path,
    name: &str,
    manifest: Option<&Path>,
) -> Result<crate::protocol::Verification> {
    request(socket, with_manifest("layer.verify", name, manifest), None)
}

/// Request `op` on layer `name`, with `manifest` when given.
fn with_manifest(op: &str, name: &str, manifest: Option<&Path>) -> Value {
    let mut r = json!({"op": op, "name": name});
    if let Some(m) = manifest {
        r["manifest"] = json!(m.to_string_lossy());
    }
    r
}

/// How far the daemon's check of layer `name` against its seal is: file
/// bytes read and, when known, of how many; None when none runs.
pub fn layer_verify_progress(socket: &Path, name: &str) -> Result<Option<(u64, Option<u64>)>> {
    #[derive(serde::Deserialize)]
    struct Progress {
        done_bytes: u64,
        total_bytes: Option<u64>,
    }
    let p: Option<Progress> = request(
        socket,
        json!({"op": "layer.verify_progress", "name": name}),
        Some(ANSWER_TIMEOUT),
    )?;
    Ok(p.map(|p| (p.done_bytes, p.total_bytes)))
}

/// Every layer the daemon has.
pub fn layers(socket: &Path) -> Result<Vec<Layer>> {
    request(socket, json!({"op": "layer.list"}), Some(ANSWER_TIMEOUT))
}

pub fn layer_verify_reads(socket: &Path, name: &str, on: bool) -> Result<()> {
    let layer: Layer = request(
        socket,
        json!({"op": "layer.verify_reads", "name": name, "on": on}),
        Some(ANSWER_TIMEOUT),
    )?;
    println!(
        "verified reads of {}: {}{}",
        layer.name,
        if layer.verified_reads { "on" } else { "off" },
        match (layer.verified_reads, layer.seal.as_str()) {
            (true, "sealed") => String::new(),
            (true, s) => format!(" (the layer is {s}: reads are checked once it is sealed)"),
            _ => String::new(),
        }
    );
    Ok(())
}

pub fn fsck_online(socket: &Path, verify_data: bool) -> Result<FsckReport> {
    request(
        socket,
        json!({"op": "fsck", "verify_data": verify_data}),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_socket_names_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let e = Client::connect(&path).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "is `lcfs daemon` running? (no socket at {})",
                path.display()
            )
        );
    }

    #[test]
    fn shortens_timestamps() {
        assert_eq!(
            seconds("2026-11-01T12:34:56.123456789Z"),
            "2026-11-01 12:34:56"
        );
        assert_eq!(seconds("short"), "short");
    }
}
