//! The lazy pull's configuration file and its place in the containerd
//! snapshotter (the lazy mount itself is lcfs-lazy's `mount`).

use crate::error::{Error, Result};
use lcfs_lazy::mount::{Config, Lazy, Registry};
use lcfs_lazy::remote::Access;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default = "default_timeout_ms")]
    fetch_timeout_ms: u64,
    #[serde(default = "default_true")]
    background: bool,
    /// As the mirror's `[upstreams]`: a URL, or a table with `url`,
    /// `ca_file`, `username` + `password_file` or `docker_config`.
    #[serde(default)]
    registries: BTreeMap<String, crate::mirror::UpstreamEntry>,
    /// containerd's hosts directory (e.g. /etc/containerd/certs.d), for
    /// registries not in `registries`.
    hosts_dir: Option<PathBuf>,
}

fn default_timeout_ms() -> u64 {
    30_000
}

fn default_true() -> bool {
    true
}

/// Reads and checks the lazy pull's configuration file.
pub fn load(path: &Path) -> Result<Config> {
    let bad = |m: String| {
        Error::Usage(format!(
            "the lazy pull configuration {}: {m}",
            path.display()
        ))
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let f: File = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if !(100..=3_600_000).contains(&f.fetch_timeout_ms) {
        return Err(bad("fetch_timeout_ms must be within 100..3600000".into()));
    }
    let mut registries = BTreeMap::new();
    for (host, entry) in f.registries {
        if host.is_empty() || host.contains(['/', ' ']) {
            return Err(bad(format!("registries: {host:?} is not a registry host")));
        }
        let (upstream, ca) = crate::mirror::upstream(&host, entry)
            .map_err(|e| bad(format!("registries: {host:?}: {e}")))?;
        let access = Access {
            credentials: upstream.credentials,
            ca_certificates: ca.into_iter().collect(),
            headers: Vec::new(),
        };
        let registry = Registry {
            url: upstream.url,
            access,
        };
        registries.insert(host, registry);
    }
    Ok(Config {
        fetch_timeout: Duration::from_millis(f.fetch_timeout_ms),
        background: f.background,
        registries,
        hosts_dir: match f.hosts_dir {
            Some(d) if !d.is_dir() => {
                return Err(bad(format!("hosts_dir {} is not a directory", d.display())))
            }
            d => d,
        },
        peers: None,
    })
}

/// The snapshotter's remote layers: the lazy mount.
pub struct Remote(pub Arc<Lazy>);

impl lcfs_snapshotter::RemoteLayers for Remote {
    fn wants(&self, labels: &BTreeMap<String, String>) -> bool {
        match self.0.source(labels) {
            Ok(s) => s.is_some(),
            Err(e) => {
                log::warn!("no lazy mount: {e}");
                false
            }
        }
    }

    fn populate(
        &self,
        layer: &str,
        labels: &BTreeMap<String, String>,
    ) -> std::result::Result<(), String> {
        self.0.populate(layer, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lazy.toml");
        std::fs::write(&p, text).unwrap();
        load(&p)
    }

    #[test]
    fn the_configuration_is_checked() {
        let c = load_text("fetch_timeout_ms = 5000\n[registries]\n\"127.0.0.1:5000\" = \"http://127.0.0.1:5000\"\n")
            .unwrap();
        assert_eq!(c.fetch_timeout, Duration::from_secs(5));
        assert!(c.background);
        assert_eq!(c.registries["127.0.0.1:5000"].url, "http://127.0.0.1:5000");
        assert!(c.registries["127.0.0.1:5000"].access.credentials.is_none());
        for bad in [
            "fetch_timeout_ms = 0\n",
            "[registries]\n\"h\" = \"ftp://h\"\n",
            "[registries]\n\"a/b\" = \"https://h\"\n",
            "peers = []\n",
            "hosts_dir = \"/nonexistent\"\n",
        ] {
            let e = load_text(bad).unwrap_err().to_string();
            assert!(e.contains("the lazy pull configuration"), "{bad}: {e}");
        }
    }
}
