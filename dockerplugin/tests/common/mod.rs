//! Shared by the integration tests: an engine on a MemDevice, the plugin
//! served on a temporary unix socket, and a minimal HTTP/1.1 client.

#![allow(dead_code)]

use lcfs_dockerplugin::{serve, Driver, KernelCache, Limits, PluginServer};
use lcfs_engine::device::{Device, MemDevice};
use lcfs_engine::{Config, Engine, FormatOptions};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub const MOUNT: &str = "/var/lib/lcfs/mnt";

/// Stands in for the FUSE mount: records what the plugin tells it.
#[derive(Default)]
pub struct Recorder {
    pub forgotten_entries: Mutex<Vec<String>>,
    write_backs: AtomicUsize,
}

impl Recorder {
    /// How many times the plugin asked for cached writes to be written back.
    pub fn write_backs(&self) -> usize {
        self.write_backs.load(Ordering::SeqCst)
    }
}

impl KernelCache for Recorder {
    fn forget_layer_entry(&self, layer: &str) {
        self.forgotten_entries
            .lock()
            .unwrap()
            .push(layer.to_string());
    }

    fn write_back(&self) -> std::io::Result<()> {
        self.write_backs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

pub struct Plugin {
    pub engine: Arc<Engine>,
    pub driver: Arc<Driver>,
    pub socket: PathBuf,
    pub kernel: Arc<Recorder>,
    server: Option<PluginServer>,
    _dir: tempfile::TempDir,
}

impl Plugin {
    pub fn start() -> Plugin {
        let dev: Arc<dyn Device> = Arc::new(MemDevice::new(256 << 20));
        Engine::format(
            dev.clone(),
            &FormatOptions {
                segment_size_bytes: 256 << 10,
                force: false,
            },
        )
        .unwrap();
        let engine = Engine::open(
            dev,
            Config {
                flush_interval_ms: 0,
                checkpoint_interval_ms: 0,
                ..Config::default()
            },
        )
        .unwrap();
        let kernel = Arc::new(Recorder::default());
        let driver = Arc::new(Driver::new(
            engine.clone(),
            std::path::Path::new(MOUNT),
            kernel.clone(),
        ));
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("plugins").join("lcfs.sock");
        let server = serve(driver.clone(), &socket, Limits::default()).unwrap();
        Plugin {
            engine,
            driver,
            socket,
            kernel,
            server: Some(server),
            _dir: dir,
        }
    }

    /// Sends raw bytes, returns (status, headers lowercased, body decoded).
    pub fn raw(&self, request: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        s.write_all(request).unwrap();
        read_response(&mut s)
    }

    /// POST /<method> with a JSON body; the answer parsed as JSON.
    pub fn call(&self, method: &str, body: &str) -> Value {
        let (status, _, body) = self.post(method, body.as_bytes(), false);
        assert_eq!(status, 200, "{method}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "{method}: not JSON ({e}): {:?}",
                String::from_utf8_lossy(&body)
            )
        })
    }

    pub fn post(
        &self,
        path: &str,
        body: &[u8],
        chunked: bool,
    ) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut req = Vec::new();
        write!(
            req,
            "POST /{path} HTTP/1.1\r\nHost: plugin\r\nConnection: close\r\n"
        )
        .unwrap();
        if chunked {
            req.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            for piece in body.chunks(7919) {
                write!(req, "{:x}\r\n", piece.len()).unwrap();
                req.extend_from_slice(piece);
                req.extend_from_slice(b"\r\n");
            }
            req.extend_from_slice(b"0\r\n\r\n");
        } else {
            write!(req, "Content-Length: {}\r\n\r\n", body.len()).unwrap();
            req.extend_from_slice(body);
        }
        self.raw(&req)
    }

    pub fn create(&self, id: &str, parent: &str) {
        let r = self.call(
            "GraphDriver.Create",
            &format!(r#"{{"ID":"{id}","Parent":"{parent}","MountLabel":"","StorageOpt":null}}"#),
        );
        assert_eq!(r, serde_json::json!({}), "Create {id}");
    }

    pub fn apply(&self, id: &str, parent: &str, tar: &[u8], chunked: bool) -> Value {
        let (status, _, body) = self.post(
            &format!("GraphDriver.ApplyDiff?id={id}&parent={parent}"),
            tar,
            chunked,
        );
        assert_eq!(status, 200);
        serde_json::from_slice(&body).unwrap()
    }

    pub fn diff(&self, id: &str, parent: &str) -> (u16, Vec<u8>) {
        let (status, _, body) = self.post(
            "GraphDriver.Diff",
            format!(r#"{{"ID":"{id}","Parent":"{parent}"}}"#).as_bytes(),
            false,
        );
        (status, body)
    }

    pub fn layer_names(&self) -> Vec<String> {
        self.engine
            .list_layers()
            .into_iter()
            .map(|l| l.name)
            .collect()
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

fn read_response(s: &mut UnixStream) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("bad status line {line:?}"))
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let header = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n];
            r.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk);
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).unwrap();
        }
    } else if let Some(n) = header("content-length") {
        body.resize(n.parse().unwrap(), 0);
        r.read_exact(&mut body).unwrap();
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    (status, headers, body)
}

/// One tar entry, as compared across a round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub link: Option<String>,
    pub device: (u32, u32),
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub content: Vec<u8>,
}

pub fn read_tar(bytes: &[u8]) -> Vec<Entry> {
    let mut a = tar::Archive::new(bytes);
    let mut out = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let mut xattrs = Vec::new();
        if let Some(p) = e.pax_extensions().unwrap() {
            for r in p {
                let r = r.unwrap();
                if let Some(n) = r.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.push((n.to_string(), r.value_bytes().to_vec()));
                }
            }
        }
        xattrs.sort();
        let h = e.header().clone();
        let path = String::from_utf8(e.path_bytes().into_owned())
            .unwrap()
            .trim_end_matches('/')
            .to_string();
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8(l.into_owned()).unwrap());
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        let kind = h.entry_type().as_byte();
        let is_device = matches!(kind, b'3' | b'4');
        out.push(Entry {
            path,
            kind,
            mode: h.mode().unwrap() & 0o7777,
            uid: h.uid().unwrap(),
            gid: h.gid().unwrap(),
            mtime: h.mtime().unwrap(),
            link,
            device: if is_device {
                (
                    h.device_major().unwrap().unwrap_or(0),
                    h.device_minor().unwrap().unwrap_or(0),
                )
            } else {
                (0, 0)
            },
            xattrs,
            content,
        });
    }
    out
}

/// A tar builder with terse helpers for each entry kind.
pub struct TarMaker {
    pub builder: tar::Builder<Vec<u8>>,
}

impl Default for TarMaker {
    fn default() -> Self {
        Self::new()
    }
}

impl TarMaker {
    pub fn new() -> TarMaker {
        TarMaker {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(100);
        h.set_mtime(1_600_000_000);
        h.set_size(0);
        h
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, mode);
        self.builder
            .append_data(&mut h, path, std::io::empty())
            .unwrap();
        self
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, mode);
        h.set_size(data.len() as u64);
        self.builder.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn xattrs(&mut self, pairs: &[(&str, &[u8])]) -> &mut Self {
        let records: Vec<(String, &[u8])> = pairs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
            .collect();
        self.builder
            .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
            .unwrap();
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777);
        self.builder.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644);
        self.builder.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn device(
        &mut self,
        path: &str,
        kind: tar::EntryType,
        major: u32,
        minor: u32,
    ) -> &mut Self {
        let mut h = Self::header(kind, 0o660);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.builder
            .append_data(&mut h, path, std::io::empty())
            .unwrap();
        self
    }

    /// An entry whose raw name is written as given (no tar-crate checks).
    pub fn raw_file(&mut self, name: &[u8], data: &[u8]) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644);
        h.set_size(data.len() as u64);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name = [0; 100];
        gnu.name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    pub fn raw_symlink(&mut self, name: &[u8], target: &[u8]) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name = [0; 100];
        gnu.name[..name.len()].copy_from_slice(name);
        gnu.linkname = [0; 100];
        gnu.linkname[..target.len()].copy_from_slice(target);
        h.set_cksum();
        self.builder.append(&h, std::io::empty()).unwrap();
        self
    }

    /// A bare GNU long-name or long-link entry holding `value`, which
    /// names (or links) the entry after it.
    pub fn gnu_long(&mut self, kind: tar::EntryType, value: &[u8]) -> &mut Self {
        let mut h = Self::header(kind, 0o644);
        h.set_size(value.len() as u64);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name = [0; 100];
        gnu.name[..13].copy_from_slice(b"././@LongLink");
        h.set_cksum();
        self.builder.append(&h, value).unwrap();
        self
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}
