//! `lcfs-stress`: fio-style load and data verification on any path or on the
//! lcfs engine directly. See docs/stress.md.

// mimalloc, as in engine-vs-fio: the engine allocates small values per block.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    lcfs_bench::stress::main()
}
