//! lcfs benchmarks and comparison tools.

pub mod stress;
