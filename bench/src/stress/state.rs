//! The crash-verify state file: what every job had acknowledged (written
//! before its last completed fsync), saved on another filesystem after each
//! fsync, so a verify pass after a crash knows what must have survived.
//!
//! The file holds no block map. It holds each job's parameters, the run's
//! seed and the number of writes the job had issued when its last fsync
//! completed; the verify pass replays the job's schedule (see
//! `schedule.rs`) to that count to know each block's acknowledged
//! generation. That keeps the file a few hundred bytes, so writing it after
//! every fsync costs one small write, fsync and rename.

use super::spec::JobSpec;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const STATE_FORMAT: u32 = 1;
/// The most acknowledged writes per job a state file may claim (about 12
/// hours at 100,000 writes a second): a bound on the verify pass's replay.
pub const MAX_ACKNOWLEDGED_WRITES: u64 = 1 << 32;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    /// The job's section (numjobs included; `clone` says which of them).
    pub spec: JobSpec,
    pub index: u32,
    pub clone: u32,
    /// The file: a path, or a name in the engine layer's root directory.
    pub file: PathBuf,
    pub region_start_bytes: u64,
    pub region_length_bytes: u64,
    /// Writes issued before the last completed fsync (all of them completed).
    pub acknowledged_writes: u64,
    pub completed_fsyncs: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    pub format: u32,
    pub seed: u64,
    /// The engine device when the run bypassed FUSE.
    pub engine: Option<PathBuf>,
    pub engine_layer: String,
    pub jobs: Vec<JobState>,
}

impl StateFile {
    pub fn load(path: &Path) -> Result<StateFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the state file {}: {e}", path.display()))?;
        let state: StateFile = serde_json::from_str(&text)
            .map_err(|e| format!("parsing the state file {}: {e}", path.display()))?;
        if state.format != STATE_FORMAT {
            return Err(format!(
                "state file {} has format {}, this lcfs-stress reads {STATE_FORMAT}",
                path.display(),
                state.format
            ));
        }
        for (i, job) in state.jobs.iter().enumerate() {
            if job.index as usize != i {
                return Err(format!(
                    "state file {}: job {i} has index {}",
                    path.display(),
                    job.index
                ));
            }
            job.spec.validate()?;
            // The verify pass replays the schedule from these numbers: refuse
            // what no run of this tool writes rather than assert or loop on it.
            let (lo, hi) = (job.spec.block_size_min_bytes, job.spec.block_size_max_bytes);
            if job.region_length_bytes % lo != 0
                || job.region_length_bytes < hi
                || job.region_start_bytes % lo != 0
                || job
                    .region_start_bytes
                    .checked_add(job.region_length_bytes)
                    .is_none()
            {
                return Err(format!(
                    "state file {}: job {i}: region {}+{} does not fit block sizes {lo}-{hi}",
                    path.display(),
                    job.region_start_bytes,
                    job.region_length_bytes
                ));
            }
            if job.acknowledged_writes > MAX_ACKNOWLEDGED_WRITES {
                return Err(format!(
                    "state file {}: job {i}: {} acknowledged writes is more than the {} a verify pass replays",
                    path.display(),
                    job.acknowledged_writes,
                    MAX_ACKNOWLEDGED_WRITES
                ));
            }
        }
        Ok(state)
    }

    /// Replaces `path` atomically: a temporary file beside it, fsync, rename,
    /// fsync of the directory. A crash leaves the old or the new state.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).expect("state serialises");
        let tmp = path.with_extension("tmp");
        let fail = |what: &str, e: std::io::Error| format!("{what} {}: {e}", tmp.display());
        let mut file = File::create(&tmp).map_err(|e| fail("creating", e))?;
        file.write_all(text.as_bytes())
            .map_err(|e| fail("writing", e))?;
        file.sync_all().map_err(|e| fail("fsync of", e))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| format!("renaming {} to {}: {e}", tmp.display(), path.display()))?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("fsync of {}: {e}", dir.display()))
    }
}

/// Shared by the job threads: each acknowledgement updates one job and
/// rewrites the file.
pub struct StateWriter {
    path: PathBuf,
    state: Mutex<StateFile>,
}

impl StateWriter {
    pub fn create(path: &Path, state: StateFile) -> Result<StateWriter, String> {
        state.save(path)?;
        Ok(StateWriter {
            path: path.to_path_buf(),
            state: Mutex::new(state),
        })
    }

    pub fn acknowledge(&self, job: u32, writes: u64, fsyncs: u64) -> Result<(), String> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let entry = &mut state.jobs[job as usize];
        assert!(
            writes >= entry.acknowledged_writes,
            "acknowledged writes only grow"
        );
        entry.acknowledged_writes = writes;
        entry.completed_fsyncs = fsyncs;
        state.save(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut spec = JobSpec::new("crash");
        spec.set("rw", Some("randwrite")).unwrap();
        spec.set("size", Some("1m")).unwrap();
        let state = StateFile {
            format: STATE_FORMAT,
            seed: 99,
            engine: None,
            engine_layer: "stress".into(),
            jobs: vec![JobState {
                spec,
                index: 0,
                clone: 0,
                file: PathBuf::from("/x/crash.0.0"),
                region_start_bytes: 0,
                region_length_bytes: 1 << 20,
                acknowledged_writes: 0,
                completed_fsyncs: 0,
            }],
        };
        let writer = StateWriter::create(&path, state.clone()).unwrap();
        writer.acknowledge(0, 128, 4).unwrap();
        let loaded = StateFile::load(&path).unwrap();
        assert_eq!(loaded.jobs[0].acknowledged_writes, 128);
        assert_eq!(loaded.jobs[0].completed_fsyncs, 4);
        assert_eq!(loaded.seed, 99);
        assert!(!path.with_extension("tmp").exists());
    }

    #[test]
    fn state_that_no_run_writes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut spec = JobSpec::new("crash");
        spec.set("rw", Some("randwrite")).unwrap();
        let good = JobState {
            spec,
            index: 0,
            clone: 0,
            file: PathBuf::from("/x"),
            region_start_bytes: 0,
            region_length_bytes: 1 << 20,
            acknowledged_writes: 5,
            completed_fsyncs: 1,
        };
        let state = |job: JobState| StateFile {
            format: STATE_FORMAT,
            seed: 1,
            engine: None,
            engine_layer: "stress".into(),
            jobs: vec![job],
        };
        for bad in [
            JobState {
                region_length_bytes: 1000,
                ..good.clone()
            },
            JobState {
                region_start_bytes: 3,
                ..good.clone()
            },
            JobState {
                acknowledged_writes: u64::MAX,
                ..good.clone()
            },
            JobState {
                index: 1,
                ..good.clone()
            },
        ] {
            state(bad).save(&path).unwrap();
            assert!(StateFile::load(&path).is_err());
        }
        state(good).save(&path).unwrap();
        StateFile::load(&path).unwrap();
        std::fs::write(&path, "{not json").unwrap();
        assert!(StateFile::load(&path).is_err());
    }
}
