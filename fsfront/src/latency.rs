//! How long each kind of FUSE request takes to answer, in one latency
//! histogram per [`Operation`] (docs/statistics.md, "Latency histograms").
//!
//! Timed from the handler's entry to its reply; for a request a worker
//! thread answers (large reads, fsync), to the worker's reply. The time a
//! request spent in the kernel's queue and in /dev/fuse is not in it.
//!
//! The histograms are process-wide ([`operation_latencies`]) rather than
//! the mount's or the engine's: a daemon serves one mount, the exporter
//! reaches them without a handle to the mount, and FUSE operation kinds
//! stay out of the engine. Like the engine's, they are observed only while
//! [`lcfs_engine::stats_enabled`].

use lcfs_engine::{Histogram, Stopwatch};

/// The kinds of FUSE request timed apart; all others count as `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    Lookup,
    Getattr,
    Read,
    Write,
    /// readdir and readdirplus.
    Readdir,
    Open,
    Create,
    Unlink,
    Mkdir,
    Setattr,
    /// fsync and fsyncdir.
    Fsync,
    Flush,
    Release,
    Other,
}

impl Operation {
    pub const ALL: [Operation; 14] = [
        Operation::Lookup,
        Operation::Getattr,
        Operation::Read,
        Operation::Write,
        Operation::Readdir,
        Operation::Open,
        Operation::Create,
        Operation::Unlink,
        Operation::Mkdir,
        Operation::Setattr,
        Operation::Fsync,
        Operation::Flush,
        Operation::Release,
        Operation::Other,
    ];

    /// The lower-case name, as in the metrics' `op` label.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Lookup => "lookup",
            Operation::Getattr => "getattr",
            Operation::Read => "read",
            Operation::Write => "write",
            Operation::Readdir => "readdir",
            Operation::Open => "open",
            Operation::Create => "create",
            Operation::Unlink => "unlink",
            Operation::Mkdir => "mkdir",
            Operation::Setattr => "setattr",
            Operation::Fsync => "fsync",
            Operation::Flush => "flush",
            Operation::Release => "release",
            Operation::Other => "other",
        }
    }
}

/// One latency histogram per [`Operation`].
pub struct OperationLatencies {
    histograms: [Histogram; Operation::ALL.len()],
}

impl OperationLatencies {
    const fn new() -> OperationLatencies {
        OperationLatencies {
            histograms: [const { Histogram::new() }; Operation::ALL.len()],
        }
    }

    /// The histogram of `operation` (its `Operation::ALL` index is its
    /// discriminant).
    pub fn get(&self, operation: Operation) -> &Histogram {
        &self.histograms[operation as usize]
    }
}

static OPERATION_LATENCIES: OperationLatencies = OperationLatencies::new();

/// This process's FUSE request latencies, over every mount it serves.
pub fn operation_latencies() -> &'static OperationLatencies {
    &OPERATION_LATENCIES
}

/// Times one request until it is dropped: at the end of the handler, or of
/// the worker's job it was moved into.
pub(crate) struct OperationTimer {
    operation: Operation,
    clock: Stopwatch,
}

impl OperationTimer {
    pub(crate) fn start(operation: Operation) -> OperationTimer {
        OperationTimer {
            operation,
            clock: Stopwatch::start(),
        }
    }
}

impl Drop for OperationTimer {
    fn drop(&mut self) {
        self.clock.record(OPERATION_LATENCIES.get(self.operation));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_operation_has_its_histogram_and_name() {
        let mut names: Vec<_> = Operation::ALL.iter().map(|o| o.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Operation::ALL.len());
        for (i, op) in Operation::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i, "{op:?}");
        }
        let before = operation_latencies().get(Operation::Mkdir).snapshot().count;
        drop(OperationTimer::start(Operation::Mkdir));
        let after = operation_latencies().get(Operation::Mkdir).snapshot().count;
        // Other tests of this process may time mkdirs as well.
        assert!(after > before);
    }
}
