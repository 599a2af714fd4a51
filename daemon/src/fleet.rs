//! `lcfs top layers|images|files --hosts A,B,C`: the same tables over
//! several hosts, for sites without Prometheus. Asks each host's statistics
//! API on TCP (`GET /v1/layers`, `/v1/images`, `/v1/files`, with the bearer
//! token of `--token-file`), then adds up each layer's, image's or file's
//! counters by name over the hosts that answered.

use crate::client::{rank, Ranked, Top, TopSort};
use crate::error::{Error, Result};
use crate::protocol::{HotFile, Image, Layer, Usage};
use crate::size::human_bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

/// The port `--stats-listen` examples use, taken when a host names none.
pub const DEFAULT_PORT: u16 = 9477;
/// The most one host's answer may take.
const MAX_ANSWER_BYTES: u64 = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// One layer name over the hosts that have it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FleetLayer {
    pub name: String,
    /// Hosts that have a layer of this name.
    pub hosts: u64,
    /// Counters added up over them (`last_clone`: the latest).
    pub usage: Usage,
    pub owned_bytes: u64,
}

/// Adds up `answers` (one list per host) by layer name.
pub fn merge(answers: &[Vec<Layer>]) -> Vec<FleetLayer> {
    let mut by_name: BTreeMap<String, FleetLayer> = BTreeMap::new();
    for layers in answers {
        for l in layers {
            let f = by_name.entry(l.name.clone()).or_insert_with(|| FleetLayer {
                name: l.name.clone(),
                ..FleetLayer::default()
            });
            f.hosts += 1;
            let (u, v) = (&mut f.usage, &l.usage);
            u.clones = u.clones.saturating_add(v.clones);
            u.reads = u.reads.saturating_add(v.reads);
            u.bytes_read = u.bytes_read.saturating_add(v.bytes_read);
            u.clone_reads = u.clone_reads.saturating_add(v.clone_reads);
            u.clone_bytes_read = u.clone_bytes_read.saturating_add(v.clone_bytes_read);
            if v.last_clone > u.last_clone {
                u.last_clone = v.last_clone.clone();
            }
            u.applied_bytes = u.applied_bytes.saturating_add(v.applied_bytes);
            u.apply_seconds += v.apply_seconds;
            u.early_reads = u.early_reads.saturating_add(v.early_reads);
            u.early_bytes_read = u.early_bytes_read.saturating_add(v.early_bytes_read);
            u.clone_starts = u.clone_starts.saturating_add(v.clone_starts);
            u.clone_startup_seconds += v.clone_startup_seconds;
            u.clone_early_reads = u.clone_early_reads.saturating_add(v.clone_early_reads);
            u.clone_early_bytes_read = u
                .clone_early_bytes_read
                .saturating_add(v.clone_early_bytes_read);
            f.owned_bytes = f.owned_bytes.saturating_add(l.owned_bytes);
        }
    }
    by_name.into_values().collect()
}

/// Sorts merged rows as `lcfs top layers` sorts one host's (`created`
/// means nothing over hosts: those ties go by name).
pub fn sort_fleet(rows: &mut [FleetLayer], by: TopSort) {
    fn ranked(r: &FleetLayer) -> Ranked<'_> {
        Ranked {
            name: &r.name,
            usage: &r.usage,
            owned_bytes: r.owned_bytes,
            created: "",
        }
    }
    rows.sort_by(|a, b| rank(by, &ranked(a), &ranked(b)));
}

/// `host` or `host:port`.
fn address(host: &str) -> String {
    if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host.to_string()
    } else {
        format!("{host}:{DEFAULT_PORT}")
    }
}

/// Asks one host's statistics API for `target`, a JSON list.
fn ask<T: DeserializeOwned>(
    host: &str,
    token: &str,
    target: &str,
) -> std::result::Result<T, String> {
    let addr = address(host);
    let socket = addr
        .to_socket_addrs()
        .map_err(|e| format!("resolving {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))?;
    let mut stream = TcpStream::connect_timeout(&socket, CONNECT_TIMEOUT)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).ok();
    stream.set_write_timeout(Some(IO_TIMEOUT)).ok();
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("asking {addr}: {e}"))?;
    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER_BYTES + 1)
        .read_to_end(&mut answer)
        .map_err(|e| format!("reading {addr}'s answer: {e}"))?;
    if answer.len() as u64 > MAX_ANSWER_BYTES {
        return Err(format!(
            "{addr} answered more than {} MiB",
            MAX_ANSWER_BYTES >> 20
        ));
    }
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{addr} did not answer HTTP"))?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let body = &answer[split + 4..];
    if head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    }) {
        return Err(format!(
            "{addr} answered in chunks, which this client does not read"
        ));
    }
    let status = head.split(' ').nth(1).unwrap_or("?");
    if status != "200" {
        let why = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
        return Err(format!("{addr} answered {status}: {why}"));
    }
    serde_json::from_slice(body)
        .map_err(|e| format!("{addr}'s answer to {target} is not what it should be: {e}"))
}

/// Asks every host at once; says which did not answer. Fails when none did.
fn ask_all<T: DeserializeOwned + Send>(
    hosts: &[String],
    token_file: &Path,
    target: &str,
) -> Result<Vec<T>> {
    let token = crate::rest::read_token(token_file)
        .map_err(|e| Error::Usage(format!("reading the token (--token-file): {e}")))?;
    let answers: Vec<(String, std::result::Result<T, String>)> = std::thread::scope(|s| {
        let asks: Vec<_> = hosts
            .iter()
            .map(|h| (h.clone(), s.spawn(|| ask(h, &token, target))))
            .collect();
        asks.into_iter()
            .map(|(h, t)| {
                (
                    h,
                    t.join()
                        .unwrap_or_else(|_| Err("the request panicked".into())),
                )
            })
            .collect()
    });
    let mut lists = Vec::new();
    for (host, answer) in answers {
        match answer {
            Ok(list) => lists.push(list),
            Err(why) => eprintln!("lcfs: {host}: {why}"),
        }
    }
    if lists.is_empty() {
        return Err(Error::Usage(format!(
            "none of the {} hosts answered",
            hosts.len()
        )));
    }
    Ok(lists)
}

/// `lcfs top layers --hosts`.
pub fn top_layers(hosts: &[String], token_file: &Path, top: &Top) -> Result<()> {
    let mut lists: Vec<Vec<Layer>> = ask_all(hosts, token_file, "/v1/layers?limit=100000")?;
    for l in &mut lists {
        crate::client::only_image(l, top.image.as_deref());
    }
    let mut rows = merge(&lists);
    sort_fleet(&mut rows, top.sort);
    rows.truncate(top.limit);
    if top.json {
        return crate::client::print_json(&rows);
    }
    println!("{} of {} hosts answered", lists.len(), hosts.len());
    let width = crate::client::name_width(rows.iter().map(|r| r.name.as_str()));
    println!(
        "{:<width$}  {:>5}  {:>6}  {:<19}  {:>8}  {:>10}  {:>11}  {:>8}  {:>10}",
        "NAME", "HOSTS", "CLONES", "LAST START", "READS", "READ", "CLONES READ", "STARTUP", "OWNED"
    );
    for r in &rows {
        let u = &r.usage;
        println!(
            "{:<width$}  {:>5}  {:>6}  {:<19}  {:>8}  {:>10}  {:>11}  {:>8}  {:>10}",
            r.name,
            r.hosts,
            u.clones,
            crate::client::short_time(u.last_clone.as_deref()),
            u.reads,
            human_bytes(u.bytes_read),
            human_bytes(u.clone_bytes_read),
            crate::client::duration(u.mean_clone_startup()),
            human_bytes(r.owned_bytes),
        );
    }
    Ok(())
}

/// Adds up images by name over hosts: counts add, the last start is the
/// latest, the uptime the shortest, the mean start-up weighted by starts.
pub fn merge_images(answers: &[Vec<Image>]) -> Vec<Image> {
    let mut by_name: BTreeMap<String, (Image, f64)> = BTreeMap::new();
    for images in answers {
        for i in images {
            let (m, startup_sum) = by_name.entry(i.name.clone()).or_insert_with(|| {
                (
                    Image {
                        name: i.name.clone(),
                        names: i.names.clone(),
                        owner: i.owner.clone(),
                        id: i.id.clone(),
                        top_layer: i.top_layer.clone(),
                        created: i.created.clone(),
                        ..Image::default()
                    },
                    0.0,
                )
            });
            m.layers = m.layers.max(i.layers);
            m.files = m.files.max(i.files);
            m.size_bytes = m.size_bytes.saturating_add(i.size_bytes);
            m.starts = m.starts.saturating_add(i.starts);
            if i.last_start > m.last_start {
                m.last_start = i.last_start.clone();
            }
            m.containers += i.containers;
            m.running += i.running;
            m.uptime_seconds = match (m.uptime_seconds, i.uptime_seconds) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            m.pull_bytes = m.pull_bytes.saturating_add(i.pull_bytes);
            m.pull_seconds += i.pull_seconds;
            m.reads = m.reads.saturating_add(i.reads);
            m.bytes_read = m.bytes_read.saturating_add(i.bytes_read);
            m.startups += i.startups;
            *startup_sum += i.mean_startup_seconds.unwrap_or(0.0) * i.startups as f64;
            m.startup_reads = m.startup_reads.saturating_add(i.startup_reads);
            m.startup_bytes = m.startup_bytes.saturating_add(i.startup_bytes);
            m.startup_files = m.startup_files.saturating_add(i.startup_files);
        }
    }
    by_name
        .into_values()
        .map(|(mut m, sum)| {
            m.mean_startup_seconds = (m.startups > 0).then(|| sum / m.startups as f64);
            m
        })
        .collect()
}

/// `lcfs top images --hosts`.
pub fn top_images(hosts: &[String], token_file: &Path, top: &Top) -> Result<()> {
    let lists: Vec<Vec<Image>> = ask_all(hosts, token_file, "/v1/images?limit=100000")?;
    let rows = crate::client::pick_images(merge_images(&lists), top);
    if !top.json {
        println!("{} of {} hosts answered", lists.len(), hosts.len());
    }
    crate::client::print_images(&rows, top.json)
}

/// `lcfs top files --hosts`: each (image, path)'s reads added up.
pub fn top_files(
    hosts: &[String],
    token_file: &Path,
    image: Option<&str>,
    limit: usize,
    as_json: bool,
) -> Result<()> {
    let target = match image {
        Some(i) => format!(
            "/v1/files?limit=100000&image={}",
            lcfs_mirror::upstream::percent_encode(i)
        ),
        None => "/v1/files?limit=100000".to_string(),
    };
    let lists: Vec<Vec<HotFile>> = ask_all(hosts, token_file, &target)?;
    let mut by_path: BTreeMap<(String, String), HotFile> = BTreeMap::new();
    for f in lists.iter().flatten() {
        let m = by_path
            .entry((f.image.clone(), f.path.clone()))
            .or_insert_with(|| HotFile {
                image: f.image.clone(),
                path: f.path.clone(),
                ..HotFile::default()
            });
        m.reads = m.reads.saturating_add(f.reads);
        m.bytes = m.bytes.saturating_add(f.bytes);
        m.error = m.error.saturating_add(f.error);
    }
    let mut rows: Vec<HotFile> = by_path.into_values().collect();
    crate::client::sort_files(&mut rows);
    rows.truncate(limit);
    if !as_json {
        println!("{} of {} hosts answered", lists.len(), hosts.len());
    }
    crate::client::print_files(&rows, as_json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_add_up_over_hosts() {
        let image = |starts, last: &str, startups, mean, uptime| Image {
            name: "web".into(),
            starts,
            last_start: Some(last.into()),
            startups,
            mean_startup_seconds: Some(mean),
            uptime_seconds: uptime,
            running: 1,
            bytes_read: 100,
            ..Image::default()
        };
        let merged = merge_images(&[
            vec![image(
                5,
                "2026-01-01T00:00:02.000000000Z",
                5,
                1.0,
                Some(30.0),
            )],
            vec![
                image(3, "2026-01-01T00:00:09.000000000Z", 1, 3.0, None),
                Image {
                    name: "db".into(),
                    ..Image::default()
                },
            ],
        ]);
        assert_eq!(merged.len(), 2);
        let web = merged.iter().find(|i| i.name == "web").unwrap();
        assert_eq!(
            (web.starts, web.running, web.bytes_read, web.startups),
            (8, 2, 200, 6)
        );
        assert_eq!(
            web.last_start.as_deref(),
            Some("2026-01-01T00:00:09.000000000Z")
        );
        assert_eq!(web.uptime_seconds, Some(30.0));
        assert!((web.mean_startup_seconds.unwrap() - 8.0 / 6.0).abs() < 1e-9);
    }

    fn layer(name: &str, clones: u64, last: Option<&str>, read: u64) -> Layer {
        Layer {
            id: 1,
            name: name.into(),
            parent: None,
            frozen: true,
            cold: false,
            children: 0,
            created: "2026-01-01T00:00:00.000000000Z".into(),
            frozen_at: None,
            owned_bytes: 10,
            quota_bytes: None,
            inode_count: 1,
            path: String::new(),
            images: Vec::new(),
            diff_id: None,
            seal: "sealed".into(),
            root: None,
            verified_reads: false,
            usage: Usage {
                clones,
                last_clone: last.map(str::to_string),
                reads: 1,
                bytes_read: read,
                clone_starts: clones,
                clone_startup_seconds: 0.5 * clones as f64,
                ..Usage::default()
            },
        }
    }

    #[test]
    fn hosts_add_up_by_layer_name() {
        let a = vec![
            layer("web", 5, Some("2026-01-02T00:00:00.000000000Z"), 100),
            layer("db", 2, None, 7),
        ];
        let b = vec![layer("web", 3, Some("2026-01-03T00:00:00.000000000Z"), 1)];
        let c = vec![layer("db", 4, Some("2026-01-01T00:00:00.000000000Z"), 0)];
        let mut rows = merge(&[a, b, c]);
        sort_fleet(&mut rows, TopSort::Clones);
        assert_eq!(rows[0].name, "web");
        assert_eq!(
            (
                rows[0].hosts,
                rows[0].usage.clones,
                rows[0].usage.bytes_read
            ),
            (2, 8, 101)
        );
        assert_eq!(
            rows[0].usage.last_clone.as_deref(),
            Some("2026-01-03T00:00:00.000000000Z")
        );
        assert_eq!(
            (
                rows[1].name.as_str(),
                rows[1].usage.clones,
                rows[1].owned_bytes
            ),
            ("db", 6, 20)
        );
        sort_fleet(&mut rows, TopSort::LastStart);
        assert_eq!(rows[0].name, "web");
        assert_eq!(rows[0].usage.mean_clone_startup(), Some(0.5));
        assert_eq!(address("h"), "h:9477");
        assert_eq!(address("h:80"), "h:80");
        assert_eq!(address("[::1]:80"), "[::1]:80");
    }
}
