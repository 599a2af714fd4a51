//! lcfs benchmarks and comparison tools.

pub mod report;
pub mod stress;
