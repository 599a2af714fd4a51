//! Shared by the integration tests: a temporary device, mountpoint and control
//! socket, the built `lcfs` binary, and a daemon that is always killed and
//! lazily unmounted when the test ends, pass or fail.

#![allow(dead_code)] // Each test file uses a different part.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const LCFS: &str = env!("CARGO_BIN_EXE_lcfs");

/// These tests mount FUSE: they need root and /dev/fuse. Say so loudly
/// instead of skipping (run them through .ci/run, as root).
pub fn require_root_and_fuse() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test mounts FUSE and must run as root (euid is {euid})"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "this test mounts FUSE and needs /dev/fuse"
    );
}

/// Runs `command` as nobody (uid and gid 65534, no supplementary groups),
/// with setpriv.
pub fn as_nobody(command: &[&str]) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(command)
        .output()
        .expect("run setpriv (util-linux)")
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub device: PathBuf,
    pub mountpoint: PathBuf,
    pub socket: PathBuf,
    pub daemon: Option<Child>,
    pub log: PathBuf,
    /// More `lcfs daemon` arguments, after the harness's own.
    pub daemon_args: Vec<String>,
}

impl Harness {
    pub fn new() -> Harness {
        let dir = tempfile::Builder::new()
            .prefix("lcfs-test-")
            .tempdir()
            .expect("temporary directory");
        let root = dir.path().to_path_buf();
        Harness {
            device: root.join("device.img"),
            mountpoint: root.join("mnt"),
            socket: root.join("run").join("control.sock"),
            log: root.join("daemon.log"),
            daemon: None,
            daemon_args: Vec::new(),
            dir,
        }
    }

    /// A fresh device with a daemon started on it (root and FUSE required).
    pub fn started() -> Harness {
        require_root_and_fuse();
        let mut h = Harness::new();
        h.mkfs();
        h.start();
        h
    }

    /// Runs `lcfs ARGS --control-socket SOCKET` and returns its output.
    pub fn lcfs(&self, args: &[&str]) -> Output {
        Command::new(LCFS)
            .args(args)
            .arg("--control-socket")
            .arg(&self.socket)
            .stdin(Stdio::null())
            .output()
            .expect("run lcfs")
    }

    /// The running daemon's pid.
    pub fn pid(&self) -> u32 {
        self.daemon.as_ref().expect("a running daemon").id()
    }

    /// Like [`Harness::lcfs`], asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.lcfs(args);
        assert!(
            out.status.success(),
            "lcfs {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Like [`Harness::lcfs`], asserting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.lcfs(args);
        assert!(
            !out.status.success(),
            "lcfs {args:?} should have failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).expect("utf-8 output")
    }

    pub fn device_str(&self) -> &str {
        self.device.to_str().expect("utf-8 path")
    }

    pub fn mkfs(&self) {
        self.ok(&["mkfs", self.device_str(), "--size", "1G"]);
    }

    /// The daemon command line for this harness.
    pub fn daemon_command(&self, device: &Path, mountpoint: &Path, socket: &Path) -> Command {
        let mut c = Command::new(LCFS);
        c.arg("daemon")
            .arg("--device")
            .arg(device)
            .arg("--mount")
            .arg(mountpoint)
            .arg("--control-socket")
            .arg(socket)
            .arg("--threads")
            .arg("2")
            .arg("--block-cache-mib")
            .arg("16")
            .args(&self.daemon_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        c
    }

    /// Starts the daemon and waits until it answers `ping`.
    pub fn start(&mut self) {
        assert!(self.daemon.is_none(), "a daemon is already running");
        let log = std::fs::File::create(&self.log).expect("daemon log");
        let child = self
            .daemon_command(&self.device, &self.mountpoint, &self.socket)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn lcfs daemon");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .daemon
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.daemon = None;
                panic!(
                    "the daemon exited at start ({status}):\n{}",
                    self.log_text()
                );
            }
            if let Ok(mut s) = UnixStream::connect(&self.socket) {
                if request(&mut s, r#"{"op":"ping"}"#)["ok"] == true {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not answer ping in 30 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` to the daemon and waits (at most 60 s) for it to exit.
    pub fn stop_with(&mut self, signal: libc::c_int) -> ExitStatus {
        let mut child = self.daemon.take().expect("a running daemon");
        // SAFETY: kill with a pid we spawned and still own (not yet waited for).
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait for daemon") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the daemon did not exit in 60 s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether `path` appears as a mountpoint in /proc/self/mounts.
    pub fn is_mounted(path: &Path) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mounts").expect("/proc/self/mounts");
        let wanted = path.to_str().expect("utf-8 path");
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(wanted))
    }

    pub fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.socket).expect("connect to the control socket");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in [self.mountpoint.clone(), self.dir.path().join("mnt2")] {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&dir)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Sends one request line on `stream` and reads one answer line.
pub fn request(stream: &mut UnixStream, line: &str) -> serde_json::Value {
    stream
        .write_all(format!("{line}\n").as_bytes())
        .expect("send request");
    read_answer(stream)
}

pub fn read_answer(stream: &UnixStream) -> serde_json::Value {
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .expect("read answer");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("answer {answer:?} is not JSON: {e}"))
}
