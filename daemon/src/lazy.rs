//! The lazy pull's configuration file and its place in the containerd
//! snapshotter (the lazy mount itself is lcfs-lazy's `mount`).

use crate::error::{Error, Result};
use lcfs_lazy::mount::{Config, Lazy};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default = "default_timeout_ms")]
    fetch_timeout_ms: u64,
    #[serde(default = "default_true")]
    background: bool,
    #[serde(default)]
    registries: BTreeMap<String, String>,
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
    for (host, url) in &f.registries {
        let ok = (url.starts_with("http://") || url.starts_with("https://"))
            && !url.contains(char::is_whitespace);
        if !ok || host.is_empty() || host.contains('/') {
            return Err(bad(format!(
                "registries: {host:?} = {url:?} is not a host and an http(s) URL"
            )));
        }
    }
    Ok(Config {
        fetch_timeout: Duration::from_millis(f.fetch_timeout_ms),
        background: f.background,
        registries: f.registries,
    })
}

/// The snapshotter's remote layers: the lazy mount.
pub struct Remote(pub Arc<Lazy>);

impl lcfs_snapshotter::RemoteLayers for Remote {
    fn wants(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.source(labels).is_some()
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
        assert_eq!(c.registries["127.0.0.1:5000"], "http://127.0.0.1:5000");
        for bad in [
            "fetch_timeout_ms = 0\n",
            "[registries]\n\"h\" = \"ftp://h\"\n",
            "[registries]\n\"a/b\" = \"https://h\"\n",
            "peers = []\n",
        ] {
            let e = load_text(bad).unwrap_err().to_string();
            assert!(e.contains("the lazy pull configuration"), "{bad}: {e}");
        }
    }
}
