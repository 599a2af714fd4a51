//! lcfs-bench-report: turns the raw outputs bench/compare.sh collects into
//! docs/benchmarks-summary.md (machine, commands, one table per comparison
//! with medians, spreads and the ratio of lcfs to the best peer) and PNG
//! charts of the container lifecycle.

mod chart;
mod inputs;
mod machine;
mod stats;
mod table;

pub use chart::{lifecycle_charts, mirror_chart};
pub use inputs::{
    parse_containerd_tsv, parse_docker_tsv, parse_engine_json, parse_fuse_tsv, parse_stages,
    EngineResults, Samples, Stage,
};
pub use stats::{best_peer, ratio_to_best_peer, Better, Summary};
pub use table::{Row, Table};

use inputs::flag_value;
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug)]
#[non_exhaustive]
pub enum ReportError {
    Io(PathBuf, std::io::Error),
    Parse {
        file: String,
        line: usize,
        what: String,
    },
    Chart(String),
}

impl fmt::Display for ReportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReportError::Io(path, e) => write!(f, "{}: {e}", path.display()),
            ReportError::Parse { file, line, what } => write!(f, "{file} line {line}: {what}"),
            ReportError::Chart(what) => write!(f, "chart: {what}"),
        }
    }
}

impl std::error::Error for ReportError {}

/// What the report is made from and where it goes.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    pub input_dir: PathBuf,
    pub output: PathBuf,
    pub charts_dir: PathBuf,
    /// `quick` or `full`.
    pub mode: String,
    pub command: String,
    pub total_seconds: Option<u64>,
}

/// The command line as the summary shows it: the scratch directory given to
/// `--out-dir` is a path on the measuring host, not in the repository, so it
/// is shown as `DIR`.
fn shown_command(command: &str) -> String {
    let mut shown = Vec::new();
    let mut words = command.split_whitespace();
    while let Some(word) = words.next() {
        if word == "--out-dir" {
            shown.push(word.to_string());
            if words.next().is_some() {
                shown.push("DIR".to_string());
            }
        } else {
            shown.push(word.to_string());
        }
    }
    shown.join(" ")
}

fn read_optional(path: &Path) -> Result<Option<String>, ReportError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ReportError::Io(path.to_path_buf(), e)),
    }
}

const FUSE_PEERS: &[&str] = &["lcfs", "overlay", "fuse-overlayfs"];
const DOCKER_PEERS: &[&str] = &["lcfs", "overlay2", "fuse-overlayfs", "btrfs"];
const CONTAINERD_PEERS: &[&str] = &["lcfs", "overlayfs"];

/// fuse-compare.sh's metrics that make rows: (metric, label, unit, better).
fn fuse_rows(readers: &str) -> Vec<(String, String, &'static str, Better)> {
    let mut rows: Vec<(String, String, &'static str, Better)> = [
        (
            "untar_s",
            "metadata: untar the rootfs into the container",
            "s",
            Better::Lower,
        ),
        (
            "find_cold_s",
            "metadata: find over the container, cold",
            "s",
            Better::Lower,
        ),
        (
            "find_warm_s",
            "metadata: find over the container, warm",
            "s",
            Better::Lower,
        ),
        (
            "stat_cold_s",
            "metadata: lstat every path, cold",
            "s",
            Better::Lower,
        ),
        (
            "stat_warm_s",
            "metadata: lstat every path, warm",
            "s",
            Better::Lower,
        ),
        (
            "rm_s",
            "metadata: rm -rf the untarred tree",
            "s",
            Better::Lower,
        ),
        (
            "seq_cold_mibs",
            "sequential read 1 MiB (dd), cold",
            "MiB/s",
            Better::Higher,
        ),
        (
            "seq_cached_mibs",
            "sequential read 1 MiB (dd), cached",
            "MiB/s",
            Better::Higher,
        ),
        (
            "seqwrite_mibs",
            "sequential write 1 MiB + fsync (fio)",
            "MiB/s",
            Better::Higher,
        ),
        (
            "randread_mibs",
            "random read 4 KiB, cold (fio)",
            "MiB/s",
            Better::Higher,
        ),
        (
            "randwrite_mibs",
            "random write 4 KiB + fsync (fio)",
            "MiB/s",
            Better::Higher,
        ),
    ]
    .into_iter()
    .map(|(m, l, u, b)| (m.to_string(), l.to_string(), u, b))
    .collect();
    for (mode, who) in [
        ("single", "1 clone reads the file".to_string()),
        (
            "sequential",
            format!("{readers} clones read it one after another"),
        ),
        ("parallel", format!("{readers} clones read it at once")),
    ] {
        rows.push((
            format!("{mode}_attributed_mib"),
            format!("memory, {who}: page cache of the files + daemon RSS"),
            "MiB",
            Better::Lower,
        ));
    }
    rows.push((
        "parallel_peak_mib".into(),
        format!("memory, {readers} clones at once: peak of meminfo Cached + daemon RSS"),
        "MiB",
        Better::Lower,
    ));
    rows
}

fn present<'a>(samples: &Samples, peers: &[&'a str]) -> Vec<&'a str> {
    let mut present: Vec<&str> = peers
        .iter()
        .copied()
        .filter(|p| samples.has_peer(p))
        .collect();
    // The subject first, for the ratio; it is first in every list above.
    present.sort_by_key(|p| peers.iter().position(|q| q == p));
    present
}

fn samples_table(
    samples: &Samples,
    peers: &[&str],
    rows: Vec<(String, String, &'static str, Better, Option<u32>)>,
) -> Table {
    Table {
        columns: peers.iter().map(|p| p.to_string()).collect(),
        rows: rows
            .into_iter()
            .map(|(metric, label, unit, better, count)| Row {
                label,
                unit,
                better,
                values: peers
                    .iter()
                    .map(|p| samples.values(&metric, p, count))
                    .collect(),
            })
            .collect(),
    }
}

fn engine_table(engine: &EngineResults) -> Table {
    let fio = engine.values("fio_seq_1m_qd16");
    Table {
        columns: vec!["engine".into(), "fio".into()],
        rows: vec![
            Row {
                label: "sequential write 1 MiB, then sync (fio: the same, end_fsync)".into(),
                unit: "MiB/s",
                better: Better::Higher,
                values: vec![engine.values("engine_seq_1m"), fio.clone()],
            },
            Row {
                label: "random write 4 KiB (fio: sequential 1 MiB, the device's pace)".into(),
                unit: "MiB/s",
                better: Better::Higher,
                values: vec![engine.values("engine_rand_4k"), fio],
            },
            Row {
                label: "random read 4 KiB, queue depth 1, cold (fio: the same)".into(),
                unit: "MiB/s",
                better: Better::Higher,
                values: vec![
                    engine.values("engine_randread_4k_qd1"),
                    engine.values("fio_randread_4k_qd1"),
                ],
            },
        ],
    }
}

/// Reads the inputs, writes the summary and the charts.
pub fn write_report(options: &ReportOptions) -> Result<(), ReportError> {
    let dir = &options.input_dir;
    let stages = read_optional(&dir.join("stages.tsv"))?
        .map(|t| parse_stages(&t))
        .transpose()?
        .unwrap_or_default();
    let engine = read_optional(&dir.join("engine-vs-fio.json"))?
        .filter(|t| !t.trim().is_empty())
        .map(|t| parse_engine_json(&t))
        .transpose()?;
    let fuse = read_optional(&dir.join("fuse-compare.tsv"))?
        .map(|t| parse_fuse_tsv(&t))
        .transpose()?;
    let docker = read_optional(&dir.join("docker-compare.tsv"))?
        .map(|t| parse_docker_tsv(&t))
        .transpose()?;
    let containerd = read_optional(&dir.join("containerd-compare.tsv"))?
        .map(|t| parse_containerd_tsv(&t))
        .transpose()?;
    let stage_command = |name: &str| {
        stages
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.command.clone())
    };

    let mut md = String::new();
    md.push_str("# Benchmarks: every comparison in one run\n\n");
    md.push_str(&format!(
        "Generated by `target/release/lcfs-bench-report` from one run of `sudo bash {}`; do not edit by hand: \
         run the command again (see [benchmarks.md](benchmarks.md), \"Every comparison in one command\").\n\n",
        shown_command(&options.command)
    ));
    if options.mode == "quick" {
        md.push_str(
            "**This is a `--quick` run on a shared, noisy machine** (2-3 rounds, smaller files and \
             counts, other engineers' builds and tests running beside it). Only the ratios within \
             this run mean anything, and with so few rounds even those are an indication, not a \
             measurement.\n\n",
        );
    }
    md.push_str("## Machine\n\n");
    md.push_str(&machine::describe());
    md.push_str("\n## Commands and times\n\n| part | command | seconds | exit status |\n|---|---|---|---|\n");
    for stage in &stages {
        md.push_str(&format!(
            "| {} | `{}` | {} | {} |\n",
            stage.name,
            stage
                .command
                .replace(&format!("{}/", options.input_dir.display()), ""),
            stage.seconds,
            stage.status
        ));
    }
    if let Some(total) = options.total_seconds {
        md.push_str(&format!(
            "| all | `{}` | {total} | |\n",
            shown_command(&options.command)
        ));
    }
    md.push_str(
        "\nHow to read the tables. Each tool runs every peer once per round, in an order that rotates \
         from round to round, so drift hits every peer alike. A cell is the median of the rounds \
         (hdrhistogram's 50th percentile; with an even number of rounds, the mean of the two middle ones), the \
         fastest and slowest round, and the spread, (max - min) / median. \"better\" says which way \
         the row improves; \"best peer\" is the best median among the other columns, and the last \
         column is the subject's median over it: for a time below 1 means the subject is faster, \
         for a bandwidth above 1 does.\n\n",
    );

    md.push_str("## 1. Engine vs fio on one loop device\n\n");
    match &engine {
        Some(e) => {
            md.push_str(&format!(
                "`engine-vs-fio` (docs/benchmarks.md section 2): {} MiB per run, {}, O_DIRECT loop device; \
                 each round runs fio, the engine's sequential writes, its random writes, its random reads of that file after a reopen, and fio's random reads.\n\n",
                e.size_bytes >> 20,
                e.fio_version
            ));
            md.push_str(&engine_table(e).to_markdown());
        }
        None => md.push_str("Not run, or it failed (see engine.log in the output directory).\n"),
    }

    md.push_str("\n## 2. The mount: lcfs vs kernel overlayfs vs fuse-overlayfs\n\n");
    match &fuse {
        Some(samples) => {
            let readers = stage_command("fuse")
                .and_then(|c| flag_value(&c, "--readers").map(str::to_string))
                .unwrap_or_else(|| "20".to_string());
            md.push_str(
                "`bench/fuse-compare.sh` (docs/benchmarks.md section 3): one backing ext4, the same rootfs \
                 and data files in every peer's lower layer, every measurement in a fresh container's merged view.\n\n",
            );
            let peers = present(samples, FUSE_PEERS);
            let rows = fuse_rows(&readers)
                .into_iter()
                .map(|(m, l, u, b)| (m, l, u, b, None))
                .collect();
            md.push_str(&samples_table(samples, &peers, rows).to_markdown());
        }
        None => md.push_str("Not run, or it failed (see fuse.log in the output directory).\n"),
    }

    md.push_str("\n## 3. Docker: lcfs vs overlay2 vs fuse-overlayfs vs btrfs\n\n");
    match &docker {
        Some(samples) => {
            md.push_str(
                "`bench/docker-compare.sh` (docs/benchmarks.md section 4): dockerd 20.10, one private dockerd \
                 per driver, started and stopped by the script; btrfs on a loop device. Seconds.\n\n",
            );
            let peers = present(samples, DOCKER_PEERS);
            let mut rows = Vec::new();
            for n in samples.counts() {
                rows.push((
                    "launch_s".into(),
                    format!("launch {n} containers (docker run -d, one after another)"),
                    "s",
                    Better::Lower,
                    Some(n),
                ));
                rows.push((
                    "teardown_s".into(),
                    format!("tear down {n} containers (docker rm -f)"),
                    "s",
                    Better::Lower,
                    Some(n),
                ));
                rows.push((
                    "total_s".into(),
                    format!("launch + tear down {n}"),
                    "s",
                    Better::Lower,
                    Some(n),
                ));
            }
            for (metric, label) in [
                ("build_s", "classic build (DOCKER_BUILDKIT=0)"),
                ("build_sync_s", "classic build + sync"),
                ("load_s", "docker load"),
                ("load_sync_s", "docker load + sync"),
            ] {
                rows.push((metric.into(), label.into(), "s", Better::Lower, None));
            }
            md.push_str(&samples_table(samples, &peers, rows).to_markdown());
            let charts = lifecycle_charts(samples, &peers, &options.charts_dir)?;
            if !charts.is_empty() {
                md.push_str("\nThe container lifecycle against N, every driver (median; bars: fastest to slowest round):\n\n");
                let link = options
                    .charts_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| ".".into());
                for path in charts {
                    let name = path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    md.push_str(&format!("![{name}]({link}/{name})\n\n"));
                }
            }
        }
        None => md.push_str("Not run, or it failed (see docker.log in the output directory).\n"),
    }

    md.push_str("\n## 4. containerd: the lcfs snapshotter vs overlayfs\n\n");
    match &containerd {
        Some(samples) => {
            let flag = |name: &str, default: &str| {
                stage_command("containerd")
                    .and_then(|c| flag_value(&c, name).map(str::to_string))
                    .unwrap_or_else(|| default.to_string())
            };
            md.push_str(
                "`bench/containerd-compare.sh` (docs/benchmarks.md section 7): one private containerd 1.7 \
                 with both snapshotters, a private registry, docker 26 for the docker rows. Seconds.\n\n",
            );
            let peers = present(samples, CONTAINERD_PEERS);
            let (prepares, writers, files, runs) = (
                flag("--prepares", "50"),
                flag("--writers", "10"),
                flag("--files", "5000"),
                flag("--runs", "30"),
            );
            let rows = [
                (
                    "import",
                    "`ctr images import` of the ~200 MB Debian image".to_string(),
                ),
                ("import+sync", "the same + sync".to_string()),
                (
                    "prepare",
                    format!("{prepares} x prepare + mount + umount + remove"),
                ),
                (
                    "ctr",
                    format!("its ctr cost: {prepares} x two `ctr snapshots info`"),
                ),
                (
                    "remove",
                    format!(
                        "remove {writers} snapshots of {files} small files each, until reclaimed"
                    ),
                ),
                ("run", format!("{runs} x `ctr run --rm ... true`")),
                (
                    "docker",
                    format!("{runs} x docker 26 `docker run --rm ... true`"),
                ),
                ("build", "BuildKit build, 6 steps, no cache".to_string()),
            ]
            .into_iter()
            .filter(|(metric, _)| !samples.values(metric, "lcfs", None).is_empty())
            .map(|(metric, label)| (metric.to_string(), label, "s", Better::Lower, None))
            .collect();
            md.push_str(&samples_table(samples, &peers, rows).to_markdown());
        }
        None => {
            md.push_str("Not run, or it failed (see containerd.log in the output directory).\n")
        }
    }

    if let Some(parent) = options.output.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ReportError::Io(parent.to_path_buf(), e))?;
    }
    std::fs::write(&options.output, md).map_err(|e| ReportError::Io(options.output.clone(), e))
}

#[cfg(test)]
mod tests {
    use super::shown_command;

    #[test]
    fn the_scratch_directory_is_not_shown() {
        assert_eq!(
            shown_command("bench/compare.sh --write-docs --out-dir /var/tmp/run1 --only fuse"),
            "bench/compare.sh --write-docs --out-dir DIR --only fuse"
        );
        assert_eq!(
            shown_command("bench/compare.sh --quick"),
            "bench/compare.sh --quick"
        );
    }
}
