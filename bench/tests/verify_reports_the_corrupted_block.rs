//! lcfs-stress --verify_only reports exactly the one block that was corrupted
//! behind its back (garbage, or a torn half block) and exits non-zero; an
//! untouched file verifies clean. Buffered and O_DIRECT, on a plain file.

use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

const STRESS: &str = env!("CARGO_BIN_EXE_lcfs-stress");
const CORRUPT_AT: u64 = 40960;

fn stress(args: &[&str]) -> Output {
    let out = Command::new(STRESS)
        .args(args)
        .output()
        .expect("run lcfs-stress");
    eprintln!(
        "lcfs-stress {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn write_pass(dir: &Path, direct: &str, bs: &str) -> (String, String) {
    let file = dir.join("data").display().to_string();
    let state = dir.join("state.json").display().to_string();
    let out = stress(&[
        "--name=w",
        &format!("--filename={file}"),
        "--rw=write",
        &format!("--bs={bs}"),
        "--size=2m",
        &format!("--direct={direct}"),
        "--iodepth=8",
        "--verify=xxh3",
        &format!("--verify_state={state}"),
        "--seed=1234",
    ]);
    assert!(out.status.success(), "write pass failed");
    (file, state)
}

fn verify_only(state: &str) -> (bool, Value) {
    let out = stress(&[
        "--verify_only",
        &format!("--verify_state={state}"),
        "--output-format=json",
    ]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    (out.status.success(), report)
}

fn bad_blocks(report: &Value) -> Vec<(u64, String)> {
    report["jobs"][0]["verify"]["bad_blocks"]
        .as_array()
        .expect("bad_blocks")
        .iter()
        .map(|b| {
            (
                b["offset"].as_u64().unwrap(),
                b["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn corrupt(file: &str, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

fn scratch() -> tempfile::TempDir {
    // /var/tmp: a journaled filesystem that takes O_DIRECT (tmpfs would not).
    tempfile::tempdir_in("/var/tmp").unwrap()
}

#[test]
fn garbage_in_one_block_is_reported_at_its_offset_buffered() {
    let dir = scratch();
    let (file, state) = write_pass(dir.path(), "0", "4k");
    let (ok, report) = verify_only(&state);
    assert!(ok, "clean file must verify");
    assert_eq!(report["verify_errors"], 0);
    assert_eq!(report["jobs"][0]["verify"]["blocks_checked"], 512);

    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    corrupt(&file, CORRUPT_AT, &garbage);
    let (ok, report) = verify_only(&state);
    assert!(!ok, "a corrupted block must fail the verify pass");
    let bad = bad_blocks(&report);
    assert_eq!(bad.len(), 1, "exactly one bad block: {bad:?}");
    assert_eq!(bad[0].0, CORRUPT_AT);
    assert_eq!(report["verify_errors"], 1);
}

#[test]
fn torn_block_is_reported_at_its_offset_direct() {
    let dir = scratch();
    // 64 KiB writes: the verify unit is still the block size, 64 KiB.
    let (file, state) = write_pass(dir.path(), "1", "64k");
    let torn_at = 3 * 65536;
    // The second half of one block replaced by zeros: a torn write.
    corrupt(&file, torn_at + 32768, &[0u8; 32768]);
    let (ok, report) = verify_only(&state);
    assert!(!ok);
    let bad = bad_blocks(&report);
    assert_eq!(bad.len(), 1, "exactly one bad block: {bad:?}");
    assert_eq!(bad[0].0, torn_at);
    assert!(bad[0].1.contains("torn"), "{}", bad[0].1);
}

#[test]
fn a_block_copied_to_another_offset_is_misplaced() {
    let dir = scratch();
    let (file, state) = write_pass(dir.path(), "0", "4k");
    let f = std::fs::File::open(&file).unwrap();
    let mut block = vec![0u8; 4096];
    f.read_exact_at(&mut block, 0).unwrap();
    corrupt(&file, CORRUPT_AT, &block);
    let (ok, report) = verify_only(&state);
    assert!(!ok);
    let bad = bad_blocks(&report);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].0, CORRUPT_AT);
    assert!(bad[0].1.contains("misplaced"), "{}", bad[0].1);
}
