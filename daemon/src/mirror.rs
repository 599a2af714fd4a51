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
//! [upstreams."private.example"]        # or a table, for HTTPS and credentials
//! url = "https://private.example"
//! ca_file = "/etc/lcfs/private-ca.pem"   # trusted besides the system's roots
//! username = "puller"                   # with password_file (mode 0600, root's),
//! password_file = "/etc/lcfs/private.password"
//! docker_config = "/root/.docker/config.json"  # or the `auths` entry of a docker config
//! ```

use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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
    upstreams: BTreeMap<String, UpstreamEntry>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum UpstreamEntry {
    Url(String),
    Table(UpstreamTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamTable {
    url: String,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    docker_config: Option<PathBuf>,
}

/// The most a CA file or docker config may hold.
const MAX_FILE: u64 = 1 << 20;

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
    let mut upstreams = BTreeMap::new();
    let mut ca_certificates = Vec::new();
    for (name, entry) in f.upstreams {
        let (upstream, ca) =
            upstream(&name, entry).map_err(|e| bad(format!("upstream {name:?}: {e}")))?;
        ca_certificates.extend(ca);
        upstreams.insert(name, upstream);
    }
    if let Some(d) = &f.default_upstream {
        if !upstreams.contains_key(d) {
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
        upstreams,
        ca_certificates,
        default_upstream: f.default_upstream,
        peers: f.peers,
        peers_dns: f.peers_dns,
        self_address: f.self_address,
        token,
        peer_timeout: Duration::from_millis(f.peer_timeout_ms.max(1)),
        upstream_timeout: Duration::from_millis(f.upstream_timeout_ms.max(1)),
    })
}

/// One `[upstreams]` entry: the upstream, and its CA file's bytes.
pub(crate) fn upstream(
    name: &str,
    entry: UpstreamEntry,
) -> std::result::Result<(lcfs_mirror::Upstream, Option<Vec<u8>>), String> {
    let t = match entry {
        UpstreamEntry::Url(url) => UpstreamTable {
            url,
            ca_file: None,
            username: None,
            password_file: None,
            docker_config: None,
        },
        UpstreamEntry::Table(t) => t,
    };
    let rest = t
        .url
        .strip_prefix("https://")
        .or_else(|| t.url.strip_prefix("http://"))
        .ok_or_else(|| format!("{:?} is not an http:// or https:// URL", t.url))?;
    if rest.trim_end_matches('/').is_empty()
        || rest.trim_end_matches('/').contains(['/', '?', '#', '@'])
    {
        return Err(format!(
            "{:?} is not a registry's base URL (scheme://host[:port])",
            t.url
        ));
    }
    let ca = match &t.ca_file {
        Some(p) => Some(read_small(p)?),
        None => None,
    };
    let credentials = match (&t.username, &t.password_file, &t.docker_config) {
        (None, None, None) => None,
        (Some(username), Some(p), None) => {
            let password =
                crate::rest::read_secret(p, "password file").map_err(|e| e.to_string())?;
            Some(lcfs_mirror::Credentials {
                username: username.clone(),
                password,
            })
        }
        (None, None, Some(p)) => Some(docker_credentials(name, p)?),
        _ => {
            return Err(
                "give username with password_file, or docker_config, not both nor one half".into(),
            )
        }
    };
    Ok((
        lcfs_mirror::Upstream {
            url: t.url,
            credentials,
        },
        ca,
    ))
}

fn read_small(p: &Path) -> std::result::Result<Vec<u8>, String> {
    let f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
    crate::rest::read_at_most(f, p, MAX_FILE).map_err(|e| e.to_string())
}

/// The credentials a docker config.json (`auths`, as `docker login`
/// writes them) holds for registry `name`.
fn docker_credentials(
    name: &str,
    p: &Path,
) -> std::result::Result<lcfs_mirror::Credentials, String> {
    use base64::Engine as _;
    let text = crate::rest::read_secret_file(p, "docker config").map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
    let auths = v.get("auths").and_then(|a| a.as_object());
    let mut keys = vec![
        name.to_string(),
        format!("https://{name}"),
        format!("http://{name}"),
    ];
    if name == "docker.io" || name == "registry-1.docker.io" {
        keys.push("https://index.docker.io/v1/".into());
    }
    let entry = keys
        .iter()
        .find_map(|k| auths.and_then(|a| a.get(k).or_else(|| a.get(&format!("{k}/")))))
        .ok_or_else(|| {
            format!(
                "{} has no `auths` entry for {name} (credential helpers are not read)",
                p.display()
            )
        })?;
    if let (Some(u), Some(pw)) = (
        entry.get("username").and_then(|x| x.as_str()),
        entry.get("password").and_then(|x| x.as_str()),
    ) {
        return Ok(lcfs_mirror::Credentials {
            username: u.into(),
            password: pw.into(),
        });
    }
    let auth = entry
        .get("auth")
        .and_then(|x| x.as_str())
        .ok_or_else(|| format!("{}: the entry for {name} has no `auth`", p.display()))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(auth)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            format!(
                "{}: the `auth` of {name} is not base64 of user:password",
                p.display()
            )
        })?;
    let (u, pw) = raw
        .split_once(':')
        .ok_or_else(|| format!("{}: the `auth` of {name} is not user:password", p.display()))?;
    Ok(lcfs_mirror::Credentials {
        username: u.into(),
        password: pw.into(),
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
                "listen = \"127.0.0.1:1\"\n[upstreams]\n\"r\" = \"ftp://r\"",
                "not an http",
            ),
            (
                "listen = \"127.0.0.1:1\"\n[upstreams]\n\"r\" = \"https://r/v2/\"",
                "base URL",
            ),
            (
                "listen = \"127.0.0.1:1\"\n[upstreams.r]\nurl = \"https://r\"\nusername = \"u\"",
                "not both nor one half",
            ),
            (
                "listen = \"127.0.0.1:1\"\n[upstreams.r]\nurl = \"https://r\"\nca_file = \"/nonexistent/ca.pem\"",
                "/nonexistent/ca.pem",
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

    #[test]
    fn credentials_come_from_a_password_file_or_a_docker_config_and_stay_hidden() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = |name: &str, text: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p.display().to_string()
        };
        let password = secret("password", "s3cret pass\n", 0o600);
        // `docker login` writes base64 of user:password.
        let docker = secret(
            "config.json",
            r#"{"auths": {"https://reg.example:5000": {"auth": "cHVsbGVyOnRvcDpzZWNyZXQ="}}}"#,
            0o600,
        );
        let open = secret("open", "x\n", 0o644);
        let c = load_text(&format!(
            r#"
listen = "127.0.0.1:5050"
[upstreams."a.example"]
url = "https://a.example"
username = "alice"
password_file = "{password}"
[upstreams."reg.example:5000"]
url = "https://reg.example:5000"
docker_config = "{docker}"
[upstreams.plain]
url = "http://plain:5000"
"#
        ))
        .unwrap();
        let a = c.upstreams["a.example"].credentials.as_ref().unwrap();
        assert_eq!(
            (a.username.as_str(), a.password.as_str()),
            ("alice", "s3cret pass")
        );
        let r = c.upstreams["reg.example:5000"]
            .credentials
            .as_ref()
            .unwrap();
        assert_eq!(
            (r.username.as_str(), r.password.as_str()),
            ("puller", "top:secret")
        );
        assert!(c.upstreams["plain"].credentials.is_none());
        assert!(!format!("{c:?}").contains("s3cret"));
        for (text, why) in [
            (
                format!("[upstreams.a]\nurl = \"https://a\"\nusername = \"u\"\npassword_file = \"{open}\""),
                "mode 0600",
            ),
            (
                format!("[upstreams.other]\nurl = \"https://other\"\ndocker_config = \"{docker}\""),
                "no `auths` entry for other",
            ),
        ] {
            let e = load_text(&format!("listen = \"127.0.0.1:1\"\n{text}"))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
    }
}
