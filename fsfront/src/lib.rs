//! lcfs fsfront: not yet implemented; see the project issues.
