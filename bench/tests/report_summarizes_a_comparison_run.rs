//! lcfs-bench-report turns a comparison run's raw outputs (fixtures in
//! tests/fixtures/compare-run: engine, mount, Docker and containerd) into tables with medians, spreads and ratios
//! to the best peer, and into PNG charts of the container lifecycle.

use lcfs_bench::report::{write_report, ReportOptions};
use std::path::Path;

fn row<'a>(md: &'a str, label: &str) -> &'a str {
    md.lines()
        .find(|l| l.starts_with(&format!("| {label} |")))
        .unwrap_or_else(|| panic!("no row '{label}' in:\n{md}"))
}

#[test]
fn report_summarizes_a_comparison_run() {
    let out = tempfile::tempdir().unwrap();
    let options = ReportOptions {
        input_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/compare-run"),
        output: out.path().join("benchmarks-summary.md"),
        charts_dir: out.path().join("charts"),
        mode: "quick".into(),
        command: "bench/compare.sh --quick".into(),
        total_seconds: Some(615),
    };
    write_report(&options).unwrap();
    let md = std::fs::read_to_string(&options.output).unwrap();

    assert!(md.contains("**This is a `--quick` run on a shared, noisy machine**"));
    assert!(md.contains("| fuse | `bash bench/fuse-compare.sh --quick --readers 10 --out fuse-compare.tsv` | 189 | 0 |"));
    // Engine: medians 1300 and 1600 MiB/s; fio is the only peer.
    assert!(row(
        &md,
        "sequential write 1 MiB, then sync (fio: the same, end_fsync)"
    )
    .ends_with("| fio | **0.81** |"));
    assert!(row(
        &md,
        "random read 4 KiB, queue depth 1, cold (fio: the same)"
    )
    .ends_with("| fio | **0.80** |"));
    // Mount: the best peer of a time is the fastest; two rounds average.
    let untar = row(&md, "metadata: untar the rootfs into the container");
    assert!(
        untar.contains("| 3.20 (3.00-3.40, spread 12%) | 1.10 (1.00-1.20, spread 18%) |"),
        "{untar}"
    );
    assert!(untar.ends_with("| overlay | **2.91** |"), "{untar}");
    // A bandwidth's best peer is the highest; one run says so.
    let randread = row(&md, "random read 4 KiB, cold (fio)");
    assert!(randread.ends_with("| overlay | **0.20** |"), "{randread}");
    assert!(randread.contains("40.0 (1 run)"));
    // Counters and load averages are not rows.
    assert!(!md.contains("cold_block_cache") && !md.contains("load1"));
    // Docker: one row per phase per container count, four drivers.
    let launch = row(
        &md,
        "launch 20 containers (docker run -d, one after another)",
    );
    assert!(launch.ends_with("| overlay2 | **1.24** |"), "{launch}");
    assert!(md.contains("| btrfs: median (min-max, spread) | best peer | lcfs / best peer |"));
    assert!(row(&md, "launch + tear down 40").ends_with("| overlay2 | **1.22** |"));
    assert!(row(&md, "classic build (DOCKER_BUILDKIT=0)").ends_with("| overlay2 | **1.60** |"));

    // containerd: one row per measured row, labels from the stage's flags.
    let import = row(&md, "`ctr images import` of the ~200 MB Debian image");
    assert!(import.ends_with("| overlayfs | **1.27** |"), "{import}");
    assert!(
        row(&md, "20 x prepare + mount + umount + remove").ends_with("| overlayfs | **0.91** |")
    );
    assert!(row(&md, "10 x `ctr run --rm ... true`").ends_with("| overlayfs | **0.90** |"));
    assert!(
        !md.contains("BuildKit build"),
        "rows not measured are not shown"
    );

    for name in [
        "docker-launch.png",
        "docker-teardown.png",
        "docker-lifecycle.png",
    ] {
        assert!(
            md.contains(&format!("](charts/{name})")),
            "{name} is not linked"
        );
        let png = std::fs::read(options.charts_dir.join(name)).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{name} is not a PNG");
        assert!(png.len() > 10_000, "{name} is nearly empty");
    }
}

#[test]
fn a_missing_part_is_reported_as_not_run() {
    let input = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/compare-run/fuse-compare.tsv"),
        input.path().join("fuse-compare.tsv"),
    )
    .unwrap();
    let options = ReportOptions {
        input_dir: input.path().to_path_buf(),
        output: input.path().join("summary.md"),
        charts_dir: input.path().join("charts"),
        mode: "full".into(),
        command: "bench/compare.sh --only fuse".into(),
        total_seconds: None,
    };
    write_report(&options).unwrap();
    let md = std::fs::read_to_string(&options.output).unwrap();
    assert!(!md.contains("--quick"));
    assert_eq!(md.matches("Not run, or it failed").count(), 3, "{md}");
    assert!(!input.path().join("charts").exists());
}
