//! `lcfs daemon --mirror-config FILE`: the cooperative-pull mirror
//! (lcfs-mirror, docs/mirror.md) configured from a TOML file:
//!
//! ```toml
//! listen = "0.0.0.0:5050"          # where containerd (hosts.toml) and peers connect
//! cache_mib = 10240                # blob cache on the lcfs device, least recently used go
//! self = "10.0.0.1:5050"           # this host as peers list it
//! peers = ["10.0.0.1:5050", "10.0.0.2:5050"]
//! peers_dns = "lcfs-mirror.lcfs.svc.cluster.local:5050"   # and/or: every address it resolves to
//! token_file = "/etc/lcfs/mirror.token"                  # every request must carry it
//! peer_timeout_ms = 2000
//! upstream_timeout_ms = 30000
//! default_upstream = "registry.example:5000"
//! [upstreams]
//! "registry.example:5000" = "http://registry.example:5000"
//! ```

use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: std::net::SocketAddr,
    #[serde(default = "default_cache_mib")]
    cache_mib: u64,
    #[serde(default, rename = "self")]
    self_address: Option<String>,
    #[serde(default)]
    peers: Vec<String>,
    #[serde(default)]
    peers_dns: Option<String>,
    #[serde(default)]
    token_file: Option<std::path::PathBuf>,
    #[serde(default = "default_peer_timeout_ms")]
    peer_timeout_ms: u64,
    #[serde(default = "default_upstream_timeout_ms")]
    upstream_timeout_ms: u64,
    #[serde(default)]
    default_upstream: Option<String>,
    #[serde(default)]
    upstreams: BTreeMap<String, String>,
}

fn default_cache_mib() -> u64 {
    10 << 10
}

fn default_peer_timeout_ms() -> u64 {
    2000
}

fn default_upstream_timeout_ms() -> u64 {
    30_000
}

/// Reads and checks the mirror's configuration file.
pub fn load(path: &Path) -> Result<lcfs_mirror::Config> {
    let bad = |m: String| Error::Usage(format!("the mirror configuration {}: {m}", path.display()));
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let f: File = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    for (name, url) in &f.upstreams {
        if !url.starts_with("http://") {
            return Err(bad(format!(
                "upstream {name}: {url:?} is not an http:// URL (https upstreams are not served yet)"
            )));
        }
    }
    if let Some(d) = &f.default_upstream {
        if !f.upstreams.contains_key(d) {
            return Err(bad(format!("default_upstream {d:?} is not in [upstreams]")));
        }
    }
    if !f.peers.is_empty() || f.peers_dns.is_some() {
        match &f.self_address {
            Some(s) if f.peers_dns.is_some() || f.peers.contains(s) => {}
            _ => {
                return Err(bad(
                    "with peers, `self` must be this host's entry in `peers`".into(),
                ))
            }
        }
    }
    if f.cache_mib == 0 {
        return Err(bad("cache_mib must be above 0".into()));
    }
    let token = match &f.token_file {
        Some(p) => Some(crate::rest::read_token(p).map_err(|e| bad(e.to_string()))?),
        None => None,
    };
    Ok(lcfs_mirror::Config {
        listen: f.listen,
        cache_bytes: f.cache_mib << 20,
        upstreams: f.upstreams,
        default_upstream: f.default_upstream,
        peers: f.peers,
        peers_dns: f.peers_dns,
        self_address: f.self_address,
        token,
        peer_timeout: Duration::from_millis(f.peer_timeout_ms.max(1)),
        upstream_timeout: Duration::from_millis(f.upstream_timeout_ms.max(1)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<lcfs_mirror::Config> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mirror.toml");
        std::fs::write(&p, text).unwrap();
        load(&p)
    }

    #[test]
    fn a_good_file_loads_and_bad_ones_are_refused_with_the_reason() {
        let c = load_text(
            r#"
listen = "127.0.0.1:5050"
self = "127.0.0.1:5050"
peers = ["127.0.0.1:5050", "127.0.0.2:5050"]
default_upstream = "reg:5000"
[upstreams]
"reg:5000" = "http://reg:5000"
"#,
        )
        .unwrap();
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.cache_bytes, 10 << 30);
        for (bad, why) in [
            ("listen = 5", "listen"),
            ("listen = \"127.0.0.1:1\"\nbogus = 1", "bogus"),
            (
                "listen = \"127.0.0.1:1\"\n[upstreams]\n\"r\" = \"https://r\"",
                "not an http",
            ),
            (
                "listen = \"127.0.0.1:1\"\ndefault_upstream = \"x\"",
                "not in [upstreams]",
            ),
            ("listen = \"127.0.0.1:1\"\npeers = [\"a:1\"]", "`self`"),
            ("listen = \"127.0.0.1:1\"\ncache_mib = 0", "cache_mib"),
        ] {
            let e = load_text(bad).err().unwrap().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
