//! One job's parameters, in fio's vocabulary, and the job file format.
//!
//! Every key reaches a [`JobSpec`] through [`JobSpec::set`], whether it came
//! from the command line or from a job file, so both accept the same values.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Bounds the job file parser: more jobs than this is a mistake, not a load.
pub const MAX_JOBS: usize = 1024;

/// fio's `--rw`. The variants keep fio's names (hence `RandRw`).
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    Read,
    Write,
    RandRead,
    RandWrite,
    RandRw,
    ReadWrite,
}

impl Rw {
    pub fn parse(text: &str) -> Result<Rw, String> {
        Ok(match text {
            "read" => Rw::Read,
            "write" => Rw::Write,
            "randread" => Rw::RandRead,
            "randwrite" => Rw::RandWrite,
            "randrw" => Rw::RandRw,
            "readwrite" | "rw" => Rw::ReadWrite,
            other => {
                return Err(format!(
                    "rw={other:?}: expected read, write, randread, randwrite, randrw or readwrite"
                ))
            }
        })
    }

    /// fio's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::RandRead => "randread",
            Rw::RandWrite => "randwrite",
            Rw::RandRw => "randrw",
            Rw::ReadWrite => "readwrite",
        }
    }

    pub fn is_random(self) -> bool {
        matches!(self, Rw::RandRead | Rw::RandWrite | Rw::RandRw)
    }

    pub fn reads(self) -> bool {
        !matches!(self, Rw::Write | Rw::RandWrite)
    }

    pub fn writes(self) -> bool {
        !matches!(self, Rw::Read | Rw::RandRead)
    }

    /// Percentage of operations that are reads.
    pub fn read_percent(self, rwmixread: u32) -> u32 {
        match self {
            Rw::Read | Rw::RandRead => 100,
            Rw::Write | Rw::RandWrite => 0,
            Rw::RandRw | Rw::ReadWrite => rwmixread,
        }
    }
}

/// fio's `--ioengine`, restricted to the two this tool implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoEngine {
    /// io_uring with `iodepth` requests in flight per job.
    IoUring,
    /// pread/pwrite, one request at a time per job.
    Psync,
}

/// The parameters of one job section (before `numjobs` clones it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub filename: Option<PathBuf>,
    pub directory: Option<PathBuf>,
    pub rw: Rw,
    pub rwmixread: u32,
    pub block_size_min_bytes: u64,
    pub block_size_max_bytes: u64,
    /// Bytes of I/O per job, and the size of its region of the file.
    pub size_bytes: Option<u64>,
    pub offset_bytes: u64,
    pub iodepth: u32,
    pub numjobs: u32,
    pub runtime_ms: Option<u64>,
    pub time_based: bool,
    pub direct: bool,
    /// fsync after every this many writes (0: never).
    pub fsync_every_writes: u64,
    pub verify: bool,
    /// None: io_uring for direct I/O, psync for buffered (see [`JobSpec::io_engine`]).
    pub ioengine: Option<IoEngine>,
}

impl JobSpec {
    pub fn new(name: &str) -> JobSpec {
        JobSpec {
            name: name.to_string(),
            filename: None,
            directory: None,
            rw: Rw::Read,
            rwmixread: 50,
            block_size_min_bytes: 4096,
            block_size_max_bytes: 4096,
            size_bytes: None,
            offset_bytes: 0,
            iodepth: 1,
            numjobs: 1,
            runtime_ms: None,
            time_based: false,
            direct: false,
            fsync_every_writes: 0,
            verify: false,
            ioengine: None,
        }
    }

    /// Applies one `key=value` (`value` is None for a bare key such as
    /// `time_based`). Unknown keys are errors, so a typo never runs silently.
    pub fn set(&mut self, key: &str, value: Option<&str>) -> Result<(), String> {
        let key = key.trim().replace('-', "_");
        let need = || value.ok_or_else(|| format!("{key} needs a value ({key}=...)"));
        match key.as_str() {
            "name" => self.name = need()?.to_string(),
            "filename" => self.filename = Some(PathBuf::from(need()?)),
            "directory" => self.directory = Some(PathBuf::from(need()?)),
            "rw" | "readwrite" => self.rw = Rw::parse(need()?)?,
            "rwmixread" => self.rwmixread = parse_percent(&key, need()?)?,
            "rwmixwrite" => self.rwmixread = 100 - parse_percent(&key, need()?)?,
            "bs" | "blocksize" => {
                let v = parse_size(need()?)?;
                self.block_size_min_bytes = v;
                self.block_size_max_bytes = v;
            }
            "bsrange" | "blocksize_range" => {
                let text = need()?;
                let (lo, hi) = text
                    .split_once('-')
                    .ok_or_else(|| format!("bsrange={text:?}: expected MIN-MAX, e.g. 4k-64k"))?;
                self.block_size_min_bytes = parse_size(lo)?;
                self.block_size_max_bytes = parse_size(hi)?;
            }
            "size" => self.size_bytes = Some(parse_size(need()?)?),
            "offset" => self.offset_bytes = parse_size(need()?)?,
            "iodepth" => self.iodepth = parse_count(&key, need()?)? as u32,
            "numjobs" => self.numjobs = parse_count(&key, need()?)? as u32,
            "runtime" => self.runtime_ms = Some(parse_duration_ms(need()?)?),
            "time_based" => self.time_based = parse_bool(&key, value)?,
            "direct" => self.direct = parse_bool(&key, value)?,
            "buffered" => self.direct = !parse_bool(&key, value)?,
            "fsync" => {
                self.fsync_every_writes = need()?
                    .parse()
                    .map_err(|_| format!("fsync={:?}: expected a number of writes", value))?
            }
            "verify" => {
                self.verify = match need()? {
                    "xxh3" | "xxhash" | "1" => true,
                    "0" | "none" => false,
                    other => return Err(format!("verify={other:?}: only xxh3 is implemented")),
                }
            }
            "ioengine" => {
                self.ioengine = Some(match need()? {
                    "io_uring" => IoEngine::IoUring,
                    "psync" | "sync" => IoEngine::Psync,
                    other => return Err(format!("ioengine={other:?}: expected io_uring or psync")),
                })
            }
            _ => return Err(format!("unknown job option {key:?}")),
        }
        Ok(())
    }

    /// io_uring for direct I/O (a real queue depth), psync for buffered, unless
    /// `ioengine` says otherwise.
    pub fn io_engine(&self) -> IoEngine {
        self.ioengine.unwrap_or(if self.direct {
            IoEngine::IoUring
        } else {
            IoEngine::Psync
        })
    }

    pub fn runtime(&self) -> Option<Duration> {
        self.runtime_ms.map(Duration::from_millis)
    }

    /// Checks what `set` cannot see key by key.
    pub fn validate(&self) -> Result<(), String> {
        let (lo, hi) = (self.block_size_min_bytes, self.block_size_max_bytes);
        let job = &self.name;
        if lo == 0 || lo % 512 != 0 {
            return Err(format!(
                "{job}: block size {lo} must be a positive multiple of 512"
            ));
        }
        if hi < lo || hi % lo != 0 {
            return Err(format!(
                "{job}: bsrange {lo}-{hi}: the largest block size must be a multiple of the smallest"
            ));
        }
        if hi > 64 << 20 {
            return Err(format!("{job}: block size {hi} is over the 64 MiB limit"));
        }
        if self.rwmixread > 100 {
            return Err(format!("{job}: rwmixread must be 0..=100"));
        }
        if self.iodepth == 0 || self.iodepth > 4096 {
            return Err(format!("{job}: iodepth must be 1..=4096"));
        }
        if self.numjobs == 0 || self.numjobs > MAX_JOBS as u32 {
            return Err(format!("{job}: numjobs must be 1..={MAX_JOBS}"));
        }
        if let Some(size) = self.size_bytes {
            if size < lo || size % lo != 0 {
                return Err(format!(
                    "{job}: size {size} must be a positive multiple of the smallest block size {lo}"
                ));
            }
            if size < hi {
                return Err(format!(
                    "{job}: size {size} is smaller than the block size {hi}"
                ));
            }
        }
        if self.offset_bytes % lo != 0 {
            return Err(format!(
                "{job}: offset must be a multiple of the block size {lo}"
            ));
        }
        if self.time_based && self.runtime_ms.is_none() {
            return Err(format!("{job}: time_based needs runtime"));
        }
        if self.verify && lo < super::block::HEADER_BYTES as u64 {
            return Err(format!("{job}: verify needs blocks of at least 512 bytes"));
        }
        Ok(())
    }
}

fn parse_percent(key: &str, text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(v) if v <= 100 => Ok(v),
        _ => Err(format!("{key}={text:?}: expected 0..=100")),
    }
}

fn parse_count(key: &str, text: &str) -> Result<u64, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("{key}={text:?}: expected a number"))
}

/// fio's booleans: a bare key, or 0/1 (also true/false, yes/no).
fn parse_bool(key: &str, value: Option<&str>) -> Result<bool, String> {
    match value.map(str::trim) {
        None | Some("1" | "true" | "yes" | "on") => Ok(true),
        Some("0" | "false" | "no" | "off") => Ok(false),
        Some(other) => Err(format!("{key}={other:?}: expected 0 or 1")),
    }
}

/// Sizes as fio takes them: a number with an optional k/m/g/t suffix, binary
/// (1k = 1024), optionally followed by `b`, `ib` (`4k`, `4KiB`, `1M`, `512`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("ib")
        .or_else(|| t.strip_suffix('b'))
        .unwrap_or(&t);
    let (digits, shift) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 10),
        Some('m') => (&t[..t.len() - 1], 20),
        Some('g') => (&t[..t.len() - 1], 30),
        Some('t') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("bad size {text:?} (e.g. 4k, 1m, 2g)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {text:?} overflows"))
}

/// Durations as fio takes them: seconds by default, or with a unit
/// (`10`, `10s`, `500ms`, `2m`, `1h`).
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || format!("bad duration {text:?} (e.g. 10, 10s, 500ms, 2m)");
    let (digits, factor) = if let Some(d) = t.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = t.strip_suffix('s') {
        (d, 1000)
    } else if let Some(d) = t.strip_suffix('m') {
        (d, 60_000)
    } else if let Some(d) = t.strip_suffix('h') {
        (d, 3_600_000)
    } else {
        (t, 1000)
    };
    let n: u64 = digits.trim().parse().map_err(|_| bad())?;
    n.checked_mul(factor).ok_or_else(bad)
}

/// A job file: an ini subset like fio's. `[global]` sets defaults for the
/// sections after it; every other `[name]` is a job of that name. Lines are
/// `key=value` or a bare `key`; `;` and `#` start comment lines. `base`
/// holds the defaults the file starts from (the command line's job options).
pub fn parse_job_file(text: &str, base: &JobSpec) -> Result<Vec<JobSpec>, String> {
    let mut global = base.clone();
    let mut jobs: Vec<JobSpec> = Vec::new();
    // None before the first section; Some(None) in [global]; Some(Some(i)) in job i.
    let mut section: Option<Option<usize>> = None;
    for (number, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let at = |e: String| format!("job file line {}: {e}", number + 1);
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest
                .strip_suffix(']')
                .ok_or_else(|| at(format!("section header {line:?} lacks ']'")))?
                .trim();
            if name.is_empty() {
                return Err(at("empty section name".into()));
            }
            if name == "global" {
                if !jobs.is_empty() {
                    return Err(at(
                        "[global] after a job section is not supported (put it first)".into(),
                    ));
                }
                section = Some(None);
            } else {
                if jobs.len() >= MAX_JOBS {
                    return Err(at(format!("more than {MAX_JOBS} job sections")));
                }
                let mut job = global.clone();
                job.name = name.to_string();
                jobs.push(job);
                section = Some(Some(jobs.len() - 1));
            }
            continue;
        }
        let (key, value) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (line, None),
        };
        match section {
            None => return Err(at(format!("{key:?} before any [section]"))),
            Some(None) => global.set(key, value).map_err(at)?,
            Some(Some(i)) => jobs[i].set(key, value).map_err(at)?,
        }
    }
    if jobs.is_empty() {
        return Err("the job file defines no job (only [global] or nothing)".into());
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_binary_with_optional_suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("1mb").unwrap(), 1 << 20);
        assert!(parse_size("4x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999t").is_err());
    }

    #[test]
    fn durations_default_to_seconds() {
        assert_eq!(parse_duration_ms("10").unwrap(), 10_000);
        assert_eq!(parse_duration_ms("10s").unwrap(), 10_000);
        assert_eq!(parse_duration_ms("250ms").unwrap(), 250);
        assert_eq!(parse_duration_ms("2m").unwrap(), 120_000);
        assert!(parse_duration_ms("fast").is_err());
    }

    #[test]
    fn keys_set_fields_and_unknown_keys_fail() {
        let mut j = JobSpec::new("a");
        j.set("rw", Some("randrw")).unwrap();
        j.set("rwmixread", Some("70")).unwrap();
        j.set("bsrange", Some("4k-64k")).unwrap();
        j.set("size", Some("16m")).unwrap();
        j.set("time_based", None).unwrap();
        j.set("runtime", Some("3")).unwrap();
        j.set("direct", Some("1")).unwrap();
        j.set("fsync", Some("8")).unwrap();
        j.set("verify", Some("xxh3")).unwrap();
        assert_eq!(j.rw, Rw::RandRw);
        assert_eq!(j.rwmixread, 70);
        assert_eq!(
            (j.block_size_min_bytes, j.block_size_max_bytes),
            (4096, 65536)
        );
        assert_eq!(j.size_bytes, Some(16 << 20));
        assert!(j.time_based && j.direct && j.verify);
        assert_eq!(j.fsync_every_writes, 8);
        assert_eq!(j.io_engine(), IoEngine::IoUring);
        j.validate().unwrap();
        assert!(j.set("rww", Some("read")).is_err());
        assert!(j.set("rw", Some("sideways")).is_err());
        assert!(j.set("verify", Some("md5")).is_err());
        assert!(j.set("rwmixread", Some("101")).is_err());
    }

    #[test]
    fn validate_rejects_inconsistent_jobs() {
        let mut j = JobSpec::new("a");
        j.set("bsrange", Some("4k-6k")).unwrap();
        assert!(j.validate().is_err(), "6k is not a multiple of 4k");
        let mut j = JobSpec::new("a");
        j.set("size", Some("6k")).unwrap();
        assert!(j.validate().is_err(), "size not a multiple of bs");
        let mut j = JobSpec::new("a");
        j.set("time_based", None).unwrap();
        assert!(j.validate().is_err(), "time_based without runtime");
        let mut j = JobSpec::new("a");
        j.set("iodepth", Some("0")).unwrap();
        assert!(j.validate().is_err());
    }

    #[test]
    fn job_file_sections_inherit_global_and_base() {
        let mut base = JobSpec::new("cli");
        base.set("directory", Some("/mnt/x")).unwrap();
        let text = "\
; a comment
# another
[global]
bs=64k
size=8m
direct=1

[writer]
rw=write
fsync=4

[reader]
rw=randread
iodepth = 8
time_based
runtime=2s
";
        let jobs = parse_job_file(text, &base).unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].name, "writer");
        assert_eq!(jobs[0].rw, Rw::Write);
        assert_eq!(jobs[0].fsync_every_writes, 4);
        assert_eq!(jobs[0].iodepth, 1);
        assert_eq!(jobs[1].name, "reader");
        assert_eq!(jobs[1].rw, Rw::RandRead);
        assert_eq!(jobs[1].iodepth, 8);
        assert!(jobs[1].time_based);
        assert_eq!(jobs[1].runtime_ms, Some(2000));
        for j in &jobs {
            assert_eq!(j.block_size_min_bytes, 65536);
            assert_eq!(j.size_bytes, Some(8 << 20));
            assert!(j.direct);
            assert_eq!(j.directory, Some(PathBuf::from("/mnt/x")));
        }
    }

    #[test]
    fn job_file_errors_name_the_line() {
        let base = JobSpec::new("cli");
        let e = parse_job_file("[a]\nrw=read\nbogus=1\n", &base).unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        assert!(parse_job_file("rw=read\n[a]\n", &base).is_err());
        assert!(parse_job_file("[global]\nbs=4k\n", &base).is_err());
        assert!(parse_job_file("[a\n", &base).is_err());
        assert!(parse_job_file("[a]\n[global]\n", &base).is_err());
    }
}
