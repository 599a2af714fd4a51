//! The stream of operations one job issues, derived only from the job's
//! parameters and its seed. Replaying it gives the same offsets, sizes,
//! directions and write generations, which is how a verify pass (even one in
//! another process, after a crash) knows what each block should hold.

use super::spec::JobSpec;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use xxhash_rust::xxh3::xxh3_64_with_seed;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

/// One operation: `length_bytes` at `offset_bytes` of the job's file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    pub direction: Direction,
    pub offset_bytes: u64,
    pub length_bytes: u64,
    /// For writes, the job's write sequence number (1, 2, ...): the verify
    /// header's generation. 0 for reads.
    pub generation: u64,
}

/// The job's region of its file: `[start, start + length)`, in units of the
/// smallest block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start_bytes: u64,
    pub length_bytes: u64,
    pub unit_bytes: u64,
}

impl Region {
    pub fn units(&self) -> u64 {
        self.length_bytes / self.unit_bytes
    }
    pub fn end_bytes(&self) -> u64 {
        self.start_bytes + self.length_bytes
    }
}

/// The seed of job `job` in a run seeded `seed`.
pub fn job_seed(seed: u64, job: u32) -> u64 {
    xxh3_64_with_seed(&job.to_le_bytes(), seed)
}

/// An endless, deterministic stream of operations for one job.
pub struct Schedule {
    rng: ChaCha8Rng,
    region: Region,
    random: bool,
    read_percent: u32,
    max_units: u64,
    cursor_bytes: u64,
    writes: u64,
}

impl Schedule {
    pub fn new(spec: &JobSpec, region: Region, seed: u64, job: u32) -> Schedule {
        assert_eq!(region.unit_bytes, spec.block_size_min_bytes);
        assert!(region.length_bytes >= spec.block_size_max_bytes);
        assert_eq!(region.length_bytes % region.unit_bytes, 0);
        Schedule {
            rng: ChaCha8Rng::seed_from_u64(job_seed(seed, job)),
            region,
            random: spec.rw.is_random(),
            read_percent: spec.rw.read_percent(spec.rwmixread),
            max_units: spec.block_size_max_bytes / spec.block_size_min_bytes,
            cursor_bytes: 0,
            writes: 0,
        }
    }

    /// Write operations produced so far.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    pub fn next_op(&mut self) -> Op {
        let unit = self.region.unit_bytes;
        let units = if self.max_units > 1 {
            self.rng.gen_range(1..=self.max_units)
        } else {
            1
        };
        let direction = match self.read_percent {
            100 => Direction::Read,
            0 => Direction::Write,
            p => {
                if self.rng.gen_range(0..100) < p {
                    Direction::Read
                } else {
                    Direction::Write
                }
            }
        };
        let (offset, length) = if self.random {
            // Offsets are unit-aligned and the block fits the region; blocks
            // may repeat (fio's norandommap).
            let length = units * unit;
            let slots = (self.region.length_bytes - length) / unit;
            (self.rng.gen_range(0..=slots) * unit, length)
        } else {
            // Sequential: the last block of a pass is cut at the region's end;
            // the next pass starts over.
            if self.cursor_bytes >= self.region.length_bytes {
                self.cursor_bytes = 0;
            }
            let length = (units * unit).min(self.region.length_bytes - self.cursor_bytes);
            let offset = self.cursor_bytes;
            self.cursor_bytes += length;
            (offset, length)
        };
        let generation = if direction == Direction::Write {
            self.writes += 1;
            self.writes
        } else {
            0
        };
        Op {
            direction,
            offset_bytes: self.region.start_bytes + offset,
            length_bytes: length,
            generation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stress::spec::Rw;

    fn spec(rw: &str, bs: &str) -> JobSpec {
        let mut s = JobSpec::new("t");
        s.set("rw", Some(rw)).unwrap();
        s.set(if bs.contains('-') { "bsrange" } else { "bs" }, Some(bs))
            .unwrap();
        s
    }

    fn region(length_bytes: u64, unit_bytes: u64) -> Region {
        Region {
            start_bytes: 1 << 20,
            length_bytes,
            unit_bytes,
        }
    }

    #[test]
    fn sequential_covers_the_region_once_per_pass_then_wraps() {
        let s = spec("write", "4k");
        let mut sched = Schedule::new(&s, region(64 << 10, 4096), 1, 0);
        let offsets: Vec<u64> = (0..17).map(|_| sched.next_op().offset_bytes).collect();
        let expected: Vec<u64> = (0..16).map(|i| (1 << 20) + i * 4096).collect();
        assert_eq!(&offsets[..16], &expected[..]);
        assert_eq!(offsets[16], 1 << 20, "wraps to the start");
        assert_eq!(sched.writes(), 17);
    }

    #[test]
    fn sequential_with_a_range_is_contiguous_and_cut_at_the_end() {
        let s = spec("read", "4k-64k");
        let mut sched = Schedule::new(&s, region(1 << 20, 4096), 9, 0);
        let mut next = 1 << 20;
        loop {
            let op = sched.next_op();
            assert_eq!(op.direction, Direction::Read);
            assert_eq!(op.offset_bytes, next);
            assert!(op.length_bytes >= 4096 && op.length_bytes <= 65536);
            assert_eq!(op.length_bytes % 4096, 0);
            next += op.length_bytes;
            if next == 2 << 20 {
                break;
            }
            assert!(next < 2 << 20);
        }
    }

    #[test]
    fn random_ops_stay_aligned_inside_the_region() {
        let s = spec("randwrite", "4k-16k");
        let r = region(256 << 10, 4096);
        let mut sched = Schedule::new(&s, r, 5, 2);
        for _ in 0..10_000 {
            let op = sched.next_op();
            assert_eq!(op.offset_bytes % 4096, 0);
            assert!(op.offset_bytes >= r.start_bytes);
            assert!(op.offset_bytes + op.length_bytes <= r.end_bytes());
        }
    }

    #[test]
    fn same_seed_same_stream_other_seed_or_job_differs() {
        let s = spec("randrw", "4k-64k");
        let r = region(16 << 20, 4096);
        let take = |seed, job| {
            let mut sched = Schedule::new(&s, r, seed, job);
            (0..1000).map(|_| sched.next_op()).collect::<Vec<_>>()
        };
        assert_eq!(take(7, 0), take(7, 0));
        assert_ne!(take(7, 0), take(8, 0));
        assert_ne!(take(7, 0), take(7, 1));
    }

    #[test]
    fn mix_follows_rwmixread_and_generations_count_writes() {
        let mut s = spec("randrw", "4k");
        s.rwmixread = 70;
        assert_eq!(s.rw, Rw::RandRw);
        let mut sched = Schedule::new(&s, region(1 << 20, 4096), 3, 0);
        let mut reads = 0;
        let mut last_generation = 0;
        for _ in 0..10_000 {
            let op = sched.next_op();
            match op.direction {
                Direction::Read => {
                    reads += 1;
                    assert_eq!(op.generation, 0);
                }
                Direction::Write => {
                    assert_eq!(op.generation, last_generation + 1);
                    last_generation = op.generation;
                }
            }
        }
        assert!((6500..7500).contains(&reads), "{reads} reads of 10000");
    }
}
