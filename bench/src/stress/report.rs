//! The report: fio-like text, or JSON whose job fields carry fio's names
//! (`jobs[i].read.bw_bytes`, `iops`, `runtime`, `lat_ns.percentile`), so
//! tools that read fio's JSON read this too; and the live progress line.

use super::run::{DirectionStats, JobResult, Progress, RunResult};
use super::spec::JobSpec;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Bad blocks listed per job in the text report.
const TEXT_BAD_BLOCKS: usize = 20;
const MIB: f64 = (1u64 << 20) as f64;
const PERCENTILES: [(f64, &str); 3] = [
    (50.0, "50.000000"),
    (99.0, "99.000000"),
    (99.9, "99.900000"),
];

/// Updates one line on the terminal until every job is done.
pub fn show_progress(progress: &Progress, jobs: usize, specs: &[JobSpec]) {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("template"),
    );
    let longest = specs.iter().filter_map(|s| s.runtime()).max();
    let start = Instant::now();
    let (mut last_read, mut last_write, mut last_time) = (0u64, 0u64, start);
    while progress.jobs_done.load(Ordering::SeqCst) < jobs {
        std::thread::sleep(Duration::from_millis(250));
        let (read, write) = (
            progress.read_bytes.load(Ordering::Relaxed),
            progress.write_bytes.load(Ordering::Relaxed),
        );
        let now = Instant::now();
        let seconds = now.duration_since(last_time).as_secs_f64().max(1e-3);
        let eta = longest
            .map(|r| {
                format!(
                    ", eta {:.0}s",
                    r.saturating_sub(start.elapsed()).as_secs_f64()
                )
            })
            .unwrap_or_default();
        bar.set_message(format!(
            "jobs {}/{jobs} done; read {:.1} MiB/s, write {:.1} MiB/s{eta}",
            progress.jobs_done.load(Ordering::SeqCst),
            (read - last_read) as f64 / MIB / seconds,
            (write - last_write) as f64 / MIB / seconds,
        ));
        bar.tick();
        (last_read, last_write, last_time) = (read, write, now);
    }
    bar.finish_and_clear();
}

fn bandwidth(stats: &DirectionStats, runtime: Duration) -> f64 {
    let s = runtime.as_secs_f64();
    if s > 0.0 {
        stats.bytes as f64 / s
    } else {
        0.0
    }
}

fn direction_json(stats: &DirectionStats, runtime: Duration) -> Value {
    let h = &stats.latency_ns;
    let mut percentiles = Map::new();
    let empty = stats.ios == 0;
    for (q, key) in PERCENTILES {
        let v = if empty { 0 } else { h.value_at_percentile(q) };
        percentiles.insert(key.to_string(), json!(v));
    }
    let bw = bandwidth(stats, runtime);
    let seconds = runtime.as_secs_f64();
    json!({
        "io_bytes": stats.bytes,
        "total_ios": stats.ios,
        "bw_bytes": bw.round() as u64,
        "bw": (bw / 1024.0).round() as u64,
        "iops": if seconds > 0.0 { stats.ios as f64 / seconds } else { 0.0 },
        "runtime": runtime.as_millis() as u64,
        "lat_ns": {
            "min": if empty { 0 } else { h.min() },
            "max": if empty { 0 } else { h.max() },
            "mean": if empty { 0.0 } else { h.mean() },
            "percentile": percentiles,
        },
    })
}

fn job_json(j: &JobResult) -> Value {
    let verify = j.verify.as_ref().map(|v| {
        json!({
            "blocks_checked": v.units_checked,
            "bad_blocks_total": v.bad_count,
            "bad_blocks": v.bad_blocks.iter().map(|b| json!({
                "file": b.file.display().to_string(),
                "offset": b.offset_bytes,
                "length": b.length_bytes,
                "reason": b.reason,
            })).collect::<Vec<_>>(),
        })
    });
    json!({
        "jobname": j.instance.spec.name,
        "jobnum": j.instance.clone,
        "index": j.instance.index,
        "filename": j.instance.file.display().to_string(),
        "rw": j.instance.spec.rw,
        "error": j.error.as_deref().unwrap_or(""),
        "read": direction_json(&j.read, j.runtime),
        "write": direction_json(&j.write, j.runtime),
        "sync": direction_json(&j.fsync, j.runtime),
        "verify": verify,
    })
}

struct Totals {
    read: DirectionStats,
    write: DirectionStats,
    runtime: Duration,
}

fn totals(r: &RunResult) -> Option<Totals> {
    let mut it = r.jobs.iter();
    let first = it.next()?;
    let mut t = Totals {
        read: first.read.clone(),
        write: first.write.clone(),
        runtime: first.runtime,
    };
    for j in it {
        t.read.merge(&j.read);
        t.write.merge(&j.write);
        t.runtime = t.runtime.max(j.runtime);
    }
    Some(t)
}

/// Verify errors plus job errors: the run failed when this is non-zero.
pub fn failures(r: &RunResult) -> u64 {
    r.jobs
        .iter()
        .map(|j| j.verify.as_ref().map_or(0, |v| v.bad_count) + u64::from(j.error.is_some()))
        .sum()
}

pub fn to_json(r: &RunResult) -> Value {
    let total = totals(r).map(|t| {
        json!({
            "read": direction_json(&t.read, t.runtime),
            "write": direction_json(&t.write, t.runtime),
        })
    });
    json!({
        "lcfs-stress version": env!("CARGO_PKG_VERSION"),
        "seed": r.seed,
        "verify_only": r.verify_only,
        "elapsed_ms": r.elapsed.as_millis() as u64,
        "jobs": r.jobs.iter().map(job_json).collect::<Vec<_>>(),
        "total": total,
        "verify_errors": r.jobs.iter().map(|j| j.verify.as_ref().map_or(0, |v| v.bad_count)).sum::<u64>(),
        "job_errors": r.jobs.iter().filter(|j| j.error.is_some()).count(),
    })
}

fn latency_line(stats: &DirectionStats) -> String {
    let h = &stats.latency_ns;
    let us = |ns: u64| ns as f64 / 1000.0;
    format!(
        "lat (usec): p50={:.1}, p99={:.1}, p99.9={:.1}, max={:.1}",
        us(h.value_at_percentile(50.0)),
        us(h.value_at_percentile(99.0)),
        us(h.value_at_percentile(99.9)),
        us(h.max())
    )
}

fn direction_text(label: &str, stats: &DirectionStats, runtime: Duration) -> String {
    let seconds = runtime.as_secs_f64();
    let iops = if seconds > 0.0 {
        stats.ios as f64 / seconds
    } else {
        0.0
    };
    format!(
        "  {label}: IOPS={iops:.0}, BW={:.1}MiB/s ({:.1}MiB/{}msec)\n    {}\n",
        bandwidth(stats, runtime) / MIB,
        stats.bytes as f64 / MIB,
        runtime.as_millis(),
        latency_line(stats)
    )
}

pub fn to_text(r: &RunResult) -> String {
    let mut out = String::new();
    for j in &r.jobs {
        let s = &j.instance.spec;
        out += &format!(
            "{}: (job {}, copy {}): file={} rw={} bs={}-{} iodepth={} direct={}: err={}\n",
            s.name,
            j.instance.index,
            j.instance.clone,
            j.instance.file.display(),
            s.rw.as_str(),
            s.block_size_min_bytes,
            s.block_size_max_bytes,
            s.iodepth,
            u8::from(s.direct),
            j.error.as_deref().unwrap_or("0")
        );
        if j.read.ios > 0 {
            out += &direction_text("read", &j.read, j.runtime);
        }
        if j.write.ios > 0 {
            out += &direction_text("write", &j.write, j.runtime);
        }
        if j.fsync.ios > 0 {
            out += &format!(
                "  fsync: {} calls\n    {}\n",
                j.fsync.ios,
                latency_line(&j.fsync)
            );
        }
        if let Some(v) = &j.verify {
            out += &format!(
                "  verify: {} blocks checked, {} bad\n",
                v.units_checked, v.bad_count
            );
            for b in v.bad_blocks.iter().take(TEXT_BAD_BLOCKS) {
                out += &format!(
                    "    BAD BLOCK {} offset {} ({} bytes): {}\n",
                    b.file.display(),
                    b.offset_bytes,
                    b.length_bytes,
                    b.reason
                );
            }
            let listed = v.bad_blocks.len().min(TEXT_BAD_BLOCKS) as u64;
            if v.bad_count > listed {
                out += &format!(
                    "    ... and {} more (--output-format=json lists up to 1000)\n",
                    v.bad_count - listed
                );
            }
        }
    }
    if let Some(t) = totals(r) {
        if !r.verify_only {
            out += &format!(
                "\nRun status: READ: bw={:.1}MiB/s io={:.1}MiB; WRITE: bw={:.1}MiB/s io={:.1}MiB; run={}msec\n",
                bandwidth(&t.read, t.runtime) / MIB,
                t.read.bytes as f64 / MIB,
                bandwidth(&t.write, t.runtime) / MIB,
                t.write.bytes as f64 / MIB,
                t.runtime.as_millis()
            );
        }
    }
    let f = failures(r);
    out += &format!(
        "seed {} (replay: --seed={} or LCFS_SEED={}); {}\n",
        r.seed,
        r.seed,
        r.seed,
        if f == 0 {
            "no errors".to_string()
        } else {
            format!("{f} error(s)")
        }
    );
    out
}
