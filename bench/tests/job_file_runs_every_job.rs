//! A job file's [global] options reach every section, each section runs as
//! its own job (numjobs copies included), and the JSON report carries fio's
//! field names with each job's bytes.

use serde_json::Value;
use std::process::Command;

const STRESS: &str = env!("CARGO_BIN_EXE_lcfs-stress");

#[test]
fn job_file_sections_run_with_global_defaults() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let jobs = dir.path().join("jobs.ini");
    std::fs::write(
        &jobs,
        format!(
            "; two jobs\n[global]\ndirectory={}\nsize=1m\nbs=4k\n\n[writer]\nrw=write\nverify=xxh3\nfsync=32\n\n\
             [reader]\nrw=randread\nbsrange=4k-16k\nnumjobs=2\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(STRESS)
        .arg(&jobs)
        .args(["--output-format=json", "--seed=7"])
        .output()
        .unwrap();
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["seed"], 7);
    let jobs = report["jobs"].as_array().unwrap();
    let names: Vec<&str> = jobs
        .iter()
        .map(|j| j["jobname"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["writer", "reader", "reader"]);
    assert_eq!(jobs[0]["write"]["io_bytes"], 1 << 20);
    assert_eq!(jobs[0]["read"]["io_bytes"], 0);
    assert_eq!(jobs[0]["verify"]["bad_blocks_total"], 0);
    assert!(jobs[0]["sync"]["total_ios"].as_u64().unwrap() >= 8);
    for j in &jobs[1..] {
        assert!(j["read"]["io_bytes"].as_u64().unwrap() >= 1 << 20);
        assert!(j["read"]["bw_bytes"].as_u64().unwrap() > 0);
        assert!(
            j["read"]["lat_ns"]["percentile"]["99.000000"]
                .as_u64()
                .unwrap()
                > 0
        );
    }
    // Each reader copy has its own file, laid out before it ran.
    for copy in 0..2 {
        let f = dir.path().join(format!("reader.{copy}.0"));
        assert_eq!(std::fs::metadata(f).unwrap().len(), 1 << 20);
    }
}
