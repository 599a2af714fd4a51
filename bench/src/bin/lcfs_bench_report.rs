//! `lcfs-bench-report`: the report of bench/compare.sh. Reads the raw
//! outputs of engine-vs-fio, bench/fuse-compare.sh and
//! bench/docker-compare.sh from one directory and writes the Markdown summary
//! and the container lifecycle charts (docs/benchmarks.md says how to run it).

use clap::Parser;
use lcfs_bench::report::{write_report, ReportOptions};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(about = "Summary and charts of one bench/compare.sh run")]
struct Arguments {
    /// The directory bench/compare.sh wrote: engine-vs-fio.json,
    /// fuse-compare.tsv, docker-compare.tsv, stages.tsv (any may be missing).
    #[arg(long)]
    input_dir: PathBuf,
    /// The Markdown summary to write.
    #[arg(long)]
    output: PathBuf,
    /// Where the PNG charts go; the summary links them by this directory's
    /// name, so keep it beside the summary.
    #[arg(long)]
    charts_dir: PathBuf,
    /// quick or full: a quick run's summary says so at the top.
    #[arg(long, default_value = "full", value_parser = ["quick", "full"])]
    mode: String,
    /// The command line the summary names.
    #[arg(long, default_value = "bench/compare.sh")]
    command: String,
    /// Wall-clock seconds of the whole run.
    #[arg(long)]
    total_seconds: Option<u64>,
}

fn main() -> ExitCode {
    let a = Arguments::parse();
    let options = ReportOptions {
        input_dir: a.input_dir,
        output: a.output,
        charts_dir: a.charts_dir,
        mode: a.mode,
        command: a.command,
        total_seconds: a.total_seconds,
    };
    match write_report(&options) {
        Ok(()) => {
            eprintln!("lcfs-bench-report: wrote {}", options.output.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lcfs-bench-report: {e}");
            ExitCode::FAILURE
        }
    }
}
