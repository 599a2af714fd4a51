//! `lcfs-stress`: an fio-style load generator and data verifier for any path
//! (the lcfs FUSE mount, ext4, overlayfs, ...) or for the lcfs engine itself
//! (`--engine DEVICE`, no FUSE), with fio's flag names, a small job file
//! format, queue depth through io_uring, HDR-histogram latency percentiles,
//! a verify mode with self-describing block headers, and a crash-verify mode
//! whose acknowledged state survives a kill -9 of the daemon under test.
//! Usage and formats: docs/stress.md.

mod block;
mod queue;
mod report;
mod run;
mod schedule;
mod spec;
mod state;

use clap::Parser;
use run::{RunOptions, INTERRUPTED};
use spec::{parse_job_file, parse_size, JobSpec};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

/// fio-compatible flags: `--key=value` or `--key value`. Job options given
/// here are the defaults of every job in a job file (its [global] and
/// sections override them).
#[derive(Parser, Debug, Default)]
#[command(
    name = "lcfs-stress",
    version,
    about = "fio-style I/O load and data verification on any path or on the lcfs engine",
    after_help = "Sizes take k/m/g/t suffixes (binary). Durations are seconds unless suffixed \
                  (ms, s, m, h). Exit status: 0 clean, 1 verify or I/O errors, 2 bad usage. \
                  See docs/stress.md."
)]
pub struct Cli {
    /// Job file (ini: [global] and [jobname] sections with the same keys as the flags).
    pub job_file: Option<PathBuf>,

    /// Job name (default "job" without a job file).
    #[arg(long)]
    pub name: Option<String>,
    /// File to run on; numjobs copies share it, each on its own size-byte region.
    #[arg(long)]
    pub filename: Option<String>,
    /// Directory for per-job files <name>.<copy>.0 (when no filename).
    #[arg(long)]
    pub directory: Option<String>,
    /// read, write, randread, randwrite, randrw or readwrite.
    #[arg(long, alias = "readwrite")]
    pub rw: Option<String>,
    /// Percentage of reads in randrw/readwrite (default 50).
    #[arg(long)]
    pub rwmixread: Option<String>,
    /// Block size (default 4k).
    #[arg(long, alias = "blocksize")]
    pub bs: Option<String>,
    /// Block size range MIN-MAX (sizes are multiples of MIN).
    #[arg(long, alias = "blocksize_range")]
    pub bsrange: Option<String>,
    /// Bytes of I/O per job, and the size of its region of the file.
    #[arg(long)]
    pub size: Option<String>,
    /// Start of the job's region in the file.
    #[arg(long)]
    pub offset: Option<String>,
    /// Requests in flight per job (io_uring; engine: concurrent calls).
    #[arg(long)]
    pub iodepth: Option<String>,
    /// Copies of each job, run in parallel.
    #[arg(long)]
    pub numjobs: Option<String>,
    /// Stop after this long (seconds, or with a unit).
    #[arg(long)]
    pub runtime: Option<String>,
    /// Run for the whole runtime, wrapping around the region.
    #[arg(long = "time_based", alias = "time-based", num_args = 0..=1, default_missing_value = "1")]
    pub time_based: Option<String>,
    /// O_DIRECT (1) or buffered (0, default).
    #[arg(long, num_args = 0..=1, default_missing_value = "1")]
    pub direct: Option<String>,
    /// io_uring (default with direct=1) or psync (default when buffered).
    #[arg(long)]
    pub ioengine: Option<String>,
    /// fsync after every N writes.
    #[arg(long)]
    pub fsync: Option<String>,
    /// Write verify headers and check them (only xxh3).
    #[arg(long)]
    pub verify: Option<String>,

    /// Run on the lcfs engine on this device file or block device, bypassing FUSE.
    #[arg(long)]
    pub engine: Option<PathBuf>,
    /// Size of the device file --engine creates when it is missing.
    #[arg(long = "engine_size", default_value = "4g")]
    pub engine_size: String,
    /// Format the --engine device even if it holds an lcfs.
    #[arg(long = "engine_format")]
    pub engine_format: bool,
    /// Engine layer holding the job files.
    #[arg(long = "engine_layer", default_value = "stress")]
    pub engine_layer: String,
    /// Seed of every random choice (default: LCFS_SEED, else random; always printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// normal or json.
    #[arg(
        long = "output-format",
        alias = "output_format",
        default_value = "normal"
    )]
    pub output_format: String,
    /// Crash-verify state file (on another filesystem): saved after every completed fsync.
    #[arg(long = "verify_state")]
    pub verify_state: Option<PathBuf>,
    /// Do not write: check the file(s) against --verify_state (after a crash or restart).
    #[arg(long = "verify_only")]
    pub verify_only: bool,
}

impl Cli {
    /// The job options given on the command line, in an order where later
    /// keys refine earlier ones (bs before bsrange).
    fn job_options(&self) -> Vec<(&'static str, &str)> {
        let keys: [(&'static str, &Option<String>); 17] = [
            ("name", &self.name),
            ("filename", &self.filename),
            ("directory", &self.directory),
            ("rw", &self.rw),
            ("rwmixread", &self.rwmixread),
            ("bs", &self.bs),
            ("bsrange", &self.bsrange),
            ("size", &self.size),
            ("offset", &self.offset),
            ("iodepth", &self.iodepth),
            ("numjobs", &self.numjobs),
            ("runtime", &self.runtime),
            ("time_based", &self.time_based),
            ("direct", &self.direct),
            ("ioengine", &self.ioengine),
            ("fsync", &self.fsync),
            ("verify", &self.verify),
        ];
        keys.into_iter()
            .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
            .collect()
    }

    /// The jobs to run: the command line's job, or the job file's jobs with
    /// the command line's options as their defaults.
    pub fn jobs(&self) -> Result<Vec<JobSpec>, String> {
        let mut base = JobSpec::new("job");
        for (key, value) in self.job_options() {
            base.set(key, Some(value))?;
        }
        let jobs = match &self.job_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("reading job file {}: {e}", path.display()))?;
                parse_job_file(&text, &base)?
            }
            None => vec![base],
        };
        for j in &jobs {
            j.validate()?;
            if j.verify && !j.rw.writes() && !self.verify_only {
                return Err(format!(
                    "{}: verify on a read-only job needs --verify_only --verify_state=PATH \
                     (the state of the run that wrote the data)",
                    j.name
                ));
            }
            if self.verify_state.is_some() && !self.verify_only && !j.verify {
                return Err(format!("{}: --verify_state needs --verify=xxh3", j.name));
            }
        }
        Ok(jobs)
    }

    fn seed(&self) -> Result<u64, String> {
        if let Some(s) = self.seed {
            return Ok(s);
        }
        if let Ok(text) = std::env::var("LCFS_SEED") {
            return text
                .trim()
                .parse()
                .map_err(|_| format!("LCFS_SEED={text:?} is not a number"));
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(xxhash_rust::xxh3::xxh3_64_with_seed(
            &std::process::id().to_le_bytes(),
            nanos,
        ))
    }

    pub fn run_options(&self) -> Result<RunOptions, String> {
        Ok(RunOptions {
            seed: self.seed()?,
            engine: self.engine.clone(),
            engine_size_bytes: parse_size(&self.engine_size)?,
            engine_format: self.engine_format,
            engine_layer: self.engine_layer.clone(),
            verify_state: self.verify_state.clone(),
            verify_only: self.verify_only,
            progress: std::io::stdout().is_terminal() && std::io::stderr().is_terminal(),
        })
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// The `lcfs-stress` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = match cli.output_format.as_str() {
        "json" => true,
        "normal" => false,
        other => {
            eprintln!("lcfs-stress: --output-format={other:?}: expected normal or json");
            return ExitCode::from(2);
        }
    };
    let prepared = cli.run_options().and_then(|o| {
        let jobs = if cli.verify_only && cli.job_file.is_none() {
            Vec::new()
        } else {
            cli.jobs()?
        };
        Ok((o, jobs))
    });
    let (options, jobs) = match prepared {
        Ok(p) => p,
        Err(e) => {
            eprintln!("lcfs-stress: {e}");
            return ExitCode::from(2);
        }
    };
    if !cli.verify_only {
        eprintln!(
            "lcfs-stress: seed {} (replay with --seed={} or LCFS_SEED={})",
            options.seed, options.seed, options.seed
        );
    }
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    match run::run(&jobs, &options) {
        Ok(result) => {
            if json {
                println!("{:#}", report::to_json(&result));
            } else {
                print!("{}", report::to_text(&result));
            }
            for j in &result.jobs {
                if let Some(e) = &j.error {
                    eprintln!(
                        "lcfs-stress: job {} ({}): {e}",
                        j.instance.index, j.instance.spec.name
                    );
                }
            }
            let failures = report::failures(&result);
            if failures > 0 {
                eprintln!("lcfs-stress: {failures} error(s); seed {}", result.seed);
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("lcfs-stress: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spec::Rw;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("lcfs-stress").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn fio_flags_in_both_forms() {
        let a = parse(&[
            "--name=seq",
            "--filename=/tmp/x",
            "--rw=randrw",
            "--rwmixread=70",
            "--bs=64k",
            "--size=16m",
            "--iodepth=16",
            "--numjobs=2",
            "--runtime=5",
            "--time_based",
            "--direct=1",
            "--fsync=8",
            "--verify=xxh3",
            "--output-format=json",
        ]);
        let b = parse(&[
            "--name",
            "seq",
            "--filename",
            "/tmp/x",
            "--rw",
            "randrw",
            "--rwmixread",
            "70",
            "--bs",
            "64k",
            "--size",
            "16m",
            "--iodepth",
            "16",
            "--numjobs",
            "2",
            "--runtime",
            "5",
            "--time_based",
            "--direct",
            "1",
            "--fsync",
            "8",
            "--verify",
            "xxh3",
            "--output-format",
            "json",
        ]);
        let (ja, jb) = (a.jobs().unwrap(), b.jobs().unwrap());
        assert_eq!(ja, jb);
        let j = &ja[0];
        assert_eq!(j.name, "seq");
        assert_eq!(j.rw, Rw::RandRw);
        assert_eq!(j.rwmixread, 70);
        assert_eq!(j.block_size_min_bytes, 65536);
        assert_eq!(j.size_bytes, Some(16 << 20));
        assert_eq!((j.iodepth, j.numjobs), (16, 2));
        assert_eq!(j.runtime_ms, Some(5000));
        assert!(j.time_based && j.direct && j.verify);
        assert_eq!(j.fsync_every_writes, 8);
        assert_eq!(a.output_format, "json");
    }

    #[test]
    fn bsrange_and_bare_direct() {
        let c = parse(&["--rw=randread", "--bsrange=4k-64k", "--direct", "--size=1m"]);
        let j = &c.jobs().unwrap()[0];
        assert_eq!(
            (j.block_size_min_bytes, j.block_size_max_bytes),
            (4096, 65536)
        );
        assert!(j.direct);
        assert_eq!(j.name, "job");
    }

    #[test]
    fn bad_values_are_usage_errors() {
        assert!(parse(&["--rw=sideways"]).jobs().is_err());
        assert!(parse(&["--bs=4q"]).jobs().is_err());
        assert!(parse(&["--rw=read", "--verify=xxh3", "--size=1m"])
            .jobs()
            .is_err());
        assert!(parse(&["--rw=write", "--size=1m", "--verify_state=/x"])
            .jobs()
            .is_err());
        assert!(Cli::try_parse_from(["lcfs-stress", "--no-such-flag"]).is_err());
    }

    #[test]
    fn seed_flag_wins() {
        let c = parse(&["--seed=17"]);
        assert_eq!(c.run_options().unwrap().seed, 17);
    }
}
