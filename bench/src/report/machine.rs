//! The machine the run was on, as a Markdown list: CPU, memory, kernel, the
//! disk under /var/tmp (where every tool keeps its loop images), and the
//! peers' versions.

use std::process::Command;

/// The first line of the program's output that contains `wanted`, with runs
/// of spaces collapsed.
fn line_with(program: &str, args: &[&str], wanted: &str) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .find(|l| !l.is_empty() && l.contains(wanted))
}

fn first_line(program: &str, args: &[&str]) -> Option<String> {
    line_with(program, args, "")
}

fn proc_field(file: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(key)?
            .trim_start()
            .strip_prefix(':')
            .map(|v| v.trim().to_string())
    })
}

pub fn describe() -> String {
    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .map(|t| t.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    let model = proc_field("/proc/cpuinfo", "model name").unwrap_or_else(|| "?".into());
    let memory_gib = proc_field("/proc/meminfo", "MemTotal")
        .and_then(|v| v.trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| format!("{:.1} GiB", kib / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let disk = first_line(
        "findmnt",
        &["-n", "-o", "SOURCE,FSTYPE,SIZE", "--target", "/var/tmp"],
    )
    .unwrap_or_else(|| "?".into());
    let disks = Command::new("lsblk")
        .args(["-d", "-n", "-e", "7", "-o", "NAME,SIZE,ROTA,MODEL"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let version = |program: &str, args: &[&str]| {
        first_line(program, args).unwrap_or_else(|| "not installed".into())
    };
    let commit = first_line("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "?".into());
    let mut out = String::new();
    out.push_str(&format!("- CPU: {cpus} x {model}\n"));
    out.push_str(&format!("- memory: {memory_gib}\n"));
    out.push_str(&format!("- kernel: Linux {kernel}\n"));
    out.push_str(&format!("- /var/tmp (loop images of every tool): {disk}; disks (name size rotational model): {disks}\n"));
    out.push_str(&format!(
        "- load average when the report was written: {load}\n"
    ));
    out.push_str(&format!(
        "- lcfs commit {commit}; {}; {}; {}; {}\n",
        version("fio", &["--version"]),
        version("dockerd", &["--version"]),
        line_with("fuse-overlayfs", &["--version"], "fuse-overlayfs:")
            .map(|l| l.replace("fuse-overlayfs: version", "fuse-overlayfs"))
            .unwrap_or_else(|| "fuse-overlayfs not installed".into()),
        version("mkfs.btrfs", &["--version"]),
    ));
    out
}
