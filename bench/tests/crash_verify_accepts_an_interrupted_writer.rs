//! The crash-verify state holds up when the writer dies mid-run: lcfs-stress
//! killed with SIGKILL while writing random blocks (fsync every 8 writes)
//! leaves a state file that --verify_only accepts on the surviving file
//! (acknowledged blocks, or later generations the schedule wrote). The same
//! on the lcfs engine (--engine on a device file), where "surviving" means
//! what the engine reopens after the process died without closing it.

use std::process::{Command, Stdio};
use std::time::Duration;

const STRESS: &str = env!("CARGO_BIN_EXE_lcfs-stress");

fn killed_writer_then_verify(target: &[String], dir: &std::path::Path) {
    let state = dir.join("state.json").display().to_string();
    let seed = std::env::var("LCFS_SEED").unwrap_or_else(|_| "4242".into());
    eprintln!("seed {seed} (LCFS_SEED=... replays)");
    let mut child = Command::new(STRESS)
        .args(target)
        .args([
            "--name=crash",
            "--rw=randwrite",
            "--bsrange=4k-32k",
            "--size=8m",
            "--iodepth=4",
            "--fsync=8",
            "--verify=xxh3",
            "--time_based",
            "--runtime=30",
            &format!("--verify_state={state}"),
            &format!("--seed={seed}"),
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    child.wait().unwrap();
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(
        !saved.contains("\"acknowledged_writes\": 0,"),
        "the writer acknowledged nothing in 1.5 s: {saved}"
    );
    let out = Command::new(STRESS)
        .args(["--verify_only", &format!("--verify_state={state}")])
        .output()
        .unwrap();
    eprintln!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "verify after the kill found errors");
}

#[test]
fn killed_writer_on_a_file_verifies() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = dir.path().join("data").display().to_string();
    killed_writer_then_verify(
        &[format!("--filename={file}"), "--direct=1".into()],
        dir.path(),
    );
}

#[test]
fn killed_writer_on_the_engine_verifies() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let device = dir.path().join("device.img").display().to_string();
    killed_writer_then_verify(
        &[format!("--engine={device}"), "--engine_size=1g".into()],
        dir.path(),
    );
}
