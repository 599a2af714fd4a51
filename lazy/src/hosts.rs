//! containerd's registry hosts configuration (docs/lazy.md, "containerd's
//! hosts configuration"): the `hosts.toml` of a registry host in a hosts
//! directory (what containerd's CRI `config_path` and `ctr --hosts-dir`
//! name, commonly /etc/containerd/certs.d), read as containerd reads it,
//! so that the lazy mount reaches a registry where and how containerd
//! does: its `server`, its mirrors (`[host."URL"]` with the `pull`
//! capability, in the file's order), their CA certificates (`ca`) and
//! headers (`[header]`, an `Authorization` among them).
//!
//! The file is looked for in `DIR/HOST_PORT_/` (a host with a port),
//! `DIR/HOST/`, then `DIR/_default/`. It directs where pulls go and may
//! hold credentials: it must be root's and writable by root only.
//! `skip_verify` and client certificates are refused, with the reason.

use crate::remote::Access;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One place a registry's blobs are fetched from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Endpoint {
    /// Blob URLs are `{base}/{name}/blobs/{digest}`: `URL/v2`, or the
    /// URL itself with `override_path`.
    pub base: String,
    pub access: Access,
    /// A mirror: its requests carry `?ns=HOST`, as containerd's do.
    pub mirror: bool,
}

impl Endpoint {
    /// Where blob `digest` of repository `name` of registry `host` is.
    pub fn blob_url(&self, host: &str, name: &str, digest: &str) -> String {
        let url = format!("{}/{name}/blobs/{digest}", self.base);
        if self.mirror {
            format!("{url}?ns={}", lcfs_mirror::upstream::percent_encode(host))
        } else {
            url
        }
    }
}

/// A registry host's configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Hosts {
    /// The mirrors with the pull capability, in the file's order.
    pub mirrors: Vec<Endpoint>,
    pub server: Endpoint,
    /// The file read.
    pub file: PathBuf,
}

/// The most bytes of a hosts.toml (or a CA file) read.
const FILE_MAX: u64 = 1 << 20;

/// The default server of a registry host, as containerd has it.
pub fn default_server(host: &str) -> String {
    if host == "docker.io" {
        "https://registry-1.docker.io".into()
    } else {
        format!("https://{host}")
    }
}

/// The configuration of registry `host` in hosts directory `dir`; None
/// when the directory has none for it.
pub fn lookup(dir: &Path, host: &str) -> Result<Option<Hosts>, String> {
    if host.is_empty() || host.contains(['/', '\\']) || host.starts_with('.') {
        return Err(format!("{host:?} is not a registry host"));
    }
    let mut dirs = Vec::new();
    if let Some((name, port)) = host.rsplit_once(':') {
        dirs.push(dir.join(format!("{name}_{port}_")));
    }
    dirs.push(dir.join(host));
    dirs.push(dir.join("_default"));
    for d in dirs {
        let file = d.join("hosts.toml");
        match std::fs::symlink_metadata(&file) {
            Ok(_) => return read(&d, &file, host).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{}: {e}", file.display())),
        }
    }
    Ok(None)
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    f.take(FILE_MAX + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if out.len() as u64 > FILE_MAX {
        return Err(format!("{}: larger than {FILE_MAX} bytes", path.display()));
    }
    Ok(out)
}

fn read(dir: &Path, file: &Path, host: &str) -> Result<Hosts, String> {
    let meta = std::fs::metadata(file).map_err(|e| format!("{}: {e}", file.display()))?;
    if !meta.is_file() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{}: must be a file of root's that only root can write (it says where pulls go)",
            file.display()
        ));
    }
    let text = String::from_utf8(read_bounded(file)?)
        .map_err(|_| format!("{}: not UTF-8", file.display()))?;
    let t: toml::Table = text
        .parse()
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let bad = |m: String| format!("{}: {m}", file.display());
    let server = match t.get("server") {
        None => default_server(host),
        Some(toml::Value::String(s)) => s.clone(),
        Some(_) => return Err(bad("`server` must be a URL".into())),
    };
    let server = endpoint(dir, &server, &t, false).map_err(|m| bad(format!("server: {m}")))?;
    let mut mirrors = Vec::new();
    match t.get("host") {
        None => {}
        Some(toml::Value::Table(hosts)) => {
            for (url, entry) in hosts {
                let toml::Value::Table(entry) = entry else {
                    return Err(bad(format!("host {url:?} must be a table")));
                };
                let pulls = match entry.get("capabilities") {
                    None => true,
                    Some(toml::Value::Array(c)) => c.iter().any(|c| c.as_str() == Some("pull")),
                    Some(_) => {
                        return Err(bad(format!("host {url:?}: capabilities must be a list")))
                    }
                };
                if pulls {
                    mirrors.push(
                        endpoint(dir, url, entry, true)
                            .map_err(|m| bad(format!("host {url:?}: {m}")))?,
                    );
                }
            }
        }
        Some(_) => return Err(bad("`host` must be a table of hosts".into())),
    }
    Ok(Hosts {
        mirrors,
        server,
        file: file.to_path_buf(),
    })
}

/// Strings of a value that is a string or a list of them.
fn strings(v: &toml::Value, what: &str) -> Result<Vec<String>, String> {
    match v {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{what} must be strings"))
            })
            .collect(),
        _ => Err(format!("{what} must be a string or a list of them")),
    }
}

fn endpoint(dir: &Path, url: &str, t: &toml::Table, mirror: bool) -> Result<Endpoint, String> {
    let url = url.trim_end_matches('/');
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{url:?} is not an http(s) URL"))?;
    if rest.is_empty() || rest.starts_with('/') || url.contains(['?', '#', ' ']) {
        return Err(format!("{url:?} is not an http(s) URL"));
    }
    if t.get("skip_verify").and_then(toml::Value::as_bool) == Some(true) {
        return Err("skip_verify is not supported: give the registry's CA with `ca`".into());
    }
    if t.contains_key("client") {
        return Err("client certificates are not supported".into());
    }
    let override_path = t.get("override_path").and_then(toml::Value::as_bool) == Some(true);
    let base = if override_path {
        url.to_string()
    } else {
        format!("{url}/v2")
    };
    let mut access = Access::default();
    if let Some(ca) = t.get("ca") {
        for path in strings(ca, "ca")? {
            let p = dir.join(&path);
            access.ca_certificates.push(read_bounded(&p)?);
        }
    }
    match t.get("header") {
        None => {}
        Some(toml::Value::Table(h)) => {
            for (name, v) in h {
                let values = strings(v, &format!("header {name:?}"))?;
                let value = values.join(", ");
                let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
                if name.is_empty() || !name.chars().all(token) {
                    return Err(format!("header name {name:?}"));
                }
                if value.chars().any(|c| c.is_control()) {
                    return Err(format!("header {name:?}: a control character in its value"));
                }
                access.headers.push((name.clone(), value));
            }
        }
        Some(_) => return Err("`header` must be a table".into()),
    }
    Ok(Endpoint {
        base,
        access,
        mirror,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(path: &Path, text: &str, mode: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn hosts_files_are_read_as_containerd_reads_them() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        write(&root.join("reg.example_5000_/ca.pem"), "PEM", 0o644);
        write(
            &root.join("reg.example_5000_/hosts.toml"),
            r#"server = "https://reg.example:5000"
ca = "ca.pem"
[header]
Authorization = "Basic dTpw"
X-Two = ["a", "b"]

[host."http://mirror-b.example:5050"]
  capabilities = ["pull", "resolve"]
  [host."http://mirror-b.example:5050".header]
    Authorization = "Bearer peers"

[host."https://push-only.example"]
  capabilities = ["push"]

[host."https://mirror-a.example/custom/v2"]
  override_path = true
"#,
            0o600,
        );
        let h = lookup(root, "reg.example:5000").unwrap().unwrap();
        assert_eq!(h.server.base, "https://reg.example:5000/v2");
        assert_eq!(h.server.access.ca_certificates, vec![b"PEM".to_vec()]);
        assert_eq!(
            h.server.access.headers,
            vec![
                ("Authorization".to_string(), "Basic dTpw".to_string()),
                ("X-Two".to_string(), "a, b".to_string())
            ]
        );
        // The file's order; the push-only host left out.
        let bases: Vec<&str> = h.mirrors.iter().map(|m| m.base.as_str()).collect();
        assert_eq!(
            bases,
            [
                "http://mirror-b.example:5050/v2",
                "https://mirror-a.example/custom/v2"
            ]
        );
        assert_eq!(
            h.mirrors[0].blob_url("reg.example:5000", "a/b", "sha256:00"),
            "http://mirror-b.example:5050/v2/a/b/blobs/sha256:00?ns=reg.example%3A5000"
        );
        assert_eq!(
            h.server.blob_url("reg.example:5000", "a/b", "sha256:00"),
            "https://reg.example:5000/v2/a/b/blobs/sha256:00"
        );
        // No file for the host: `_default`, then nothing.
        assert_eq!(lookup(root, "other.example").unwrap(), None);
        write(&root.join("_default/hosts.toml"), "", 0o644);
        let h = lookup(root, "other.example").unwrap().unwrap();
        assert_eq!(h.server.base, "https://other.example/v2");
        assert!(h.mirrors.is_empty());
        assert_eq!(
            lookup(root, "docker.io").unwrap().unwrap().server.base,
            "https://registry-1.docker.io/v2"
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_with_the_reason() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for (text, mode, why) in [
            ("skip_verify = true\n", 0o644, "skip_verify"),
            (
                "client = [[\"c.pem\", \"k.pem\"]]\n",
                0o644,
                "client certificates",
            ),
            ("server = \"ftp://x\"\n", 0o644, "not an http(s) URL"),
            ("ca = \"missing.pem\"\n", 0o644, "missing.pem"),
            ("[header]\n\"Bad Name\" = \"v\"\n", 0o644, "header name"),
            (
                "[header]\nA = \"v\\r\\nB: w\"\n",
                0o644,
                "control character",
            ),
            ("server = \"https://x\"\n", 0o666, "only root can write"),
            ("server = [\n", 0o644, "hosts.toml"),
        ] {
            write(&root.join("h.example/hosts.toml"), text, mode);
            let e = lookup(root, "h.example").unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        assert!(lookup(root, "../etc").is_err());
    }
}
