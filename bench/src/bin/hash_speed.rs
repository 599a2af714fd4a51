//! What checking a 4 KiB block costs one core: the engine's block hash (the
//! SHA-256 of the layer seal, what verified reads compute for every block
//! they read) against BLAKE3 of the same block, the other hash the
//! integrity design could have used (docs/integrity.md). Prints GB/s per
//! hash and round over a 256 MiB buffer hashed block by block.
//!
//! ```text
//! ./target/release/hash-speed [--rounds N]
//! ```

use std::time::Instant;

const BLOCK: usize = 4096;
const BYTES: usize = 256 << 20;

fn main() {
    let mut rounds = 3;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().map(|v| v.parse::<usize>())) {
            ("--rounds", Some(Ok(n))) if n > 0 => rounds = n,
            _ => {
                eprintln!("usage: hash-speed [--rounds N]");
                std::process::exit(2);
            }
        }
    }
    let data: Vec<u8> = (0..BYTES).map(|i| ((i * 31) ^ (i >> 9)) as u8).collect();
    let gbps = |f: &dyn Fn(&[u8]) -> u8| {
        let start = Instant::now();
        let mut fold = 0u8;
        for block in data.chunks(BLOCK) {
            fold ^= f(block);
        }
        std::hint::black_box(fold);
        BYTES as f64 / start.elapsed().as_secs_f64() / 1e9
    };
    for round in 1..=rounds {
        let sha = gbps(&|b| lcfs_engine::digest::block_hash(b)[0]);
        let b3 = gbps(&|b| blake3::hash(b).as_bytes()[0]);
        println!(
            "round {round}: 4 KiB blocks on one core: block_hash (SHA-256) {sha:.2} GB/s, BLAKE3 {b3:.2} GB/s, BLAKE3 / SHA-256 {:.2}",
            b3 / sha
        );
    }
}
