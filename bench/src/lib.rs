//! lcfs benchmarks and comparison tools.
