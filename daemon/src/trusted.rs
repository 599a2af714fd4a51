//! `lcfs daemon --trusted-roots FILE` (docs/integrity.md, "Trusted roots"):
//! layer roots kept apart from the device. A seal on the device proves
//! nothing to someone who could rewrite the device and seal it again; a
//! root recorded next to an image's signature does. With the file, a layer
//! under verified reads is served only when its seal's root is listed.
//!
//! The file: one root per line (`sha256:` and 64 hex digits, or the bare
//! digits), optionally followed by blanks and any text (which image and
//! layer it is); blank lines and lines starting with `#` are skipped. It
//! must be root's (or the daemon's user's) and writable by its owner only.
//! The daemon reads it at start (a bad file stops the start, with the line
//! named) and again whenever it changes; a bad or missing file then keeps
//! the roots in force, and says why in the log.

use lcfs_engine::digest::{self, Sha256Digest};
use lcfs_engine::Engine;
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Largest file read: 64 MiB, about 900,000 roots.
const FILE_MAX: u64 = 64 << 20;
/// How often the file is looked at for a change.
const POLL: Duration = Duration::from_secs(1);

/// The roots `path` lists.
pub fn load(path: &Path) -> Result<HashSet<Sha256Digest>, String> {
    let text = crate::rest::read_owned_text(path, 0o022, FILE_MAX, |_| {
        "must be a file of root's that only root can write (it says which layers are served)".into()
    })
    .map_err(|e| e.to_string())?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The roots a file's text lists; Err names the first bad line.
pub fn parse(text: &str) -> Result<HashSet<Sha256Digest>, String> {
    let mut roots = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let word = line.split_whitespace().next().unwrap_or_default();
        let root = digest::parse_digest(word).map_err(|e| format!("line {}: {e}", n + 1))?;
        roots.insert(root);
    }
    Ok(roots)
}

/// What tells a changed file: its inode, size and modification time.
fn signature(path: &Path) -> Option<(u64, u64, SystemTime)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

/// The file as the daemon first read it: checked before the device is
/// opened, put in force by [`start`].
pub struct Initial {
    path: PathBuf,
    seen: Option<(u64, u64, SystemTime)>,
    roots: HashSet<Sha256Digest>,
}

/// Reads the roots `path` lists (Err: a bad file).
pub fn read_initial(path: &Path) -> Result<Initial, String> {
    let seen = signature(path);
    let roots = load(path)?;
    Ok(Initial {
        path: path.to_path_buf(),
        seen,
        roots,
    })
}

/// Puts the roots first read in force and reads them again whenever the
/// file changes, for the life of the process.
pub fn start(engine: Arc<Engine>, first: Initial) -> Result<(), String> {
    let Initial {
        path,
        mut seen,
        roots,
    } = first;
    log::info!("trusted roots: {} from {}", roots.len(), path.display());
    engine.set_trusted_roots(Some(roots));
    std::thread::Builder::new()
        .name("lcfs-trusted".into())
        .spawn(move || loop {
            std::thread::sleep(POLL);
            let now = signature(&path);
            if now == seen {
                continue;
            }
            seen = now;
            match load(&path) {
                Ok(roots) => {
                    log::info!("trusted roots: {} from {}", roots.len(), path.display());
                    engine.set_trusted_roots(Some(roots));
                }
                Err(e) => log::error!("trusted roots not read again, those in force stay: {e}"),
            }
        })
        .map_err(|e| format!("starting the trusted roots thread: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_read_one_a_line_and_a_bad_line_is_named() {
        let a = format!("sha256:{}", "ab".repeat(32));
        let b = "cd".repeat(32);
        let text = format!("# signed roots\n\n{a}  debian:12 layer 1\n  {b}\n{a}\n");
        let roots = parse(&text).unwrap();
        assert_eq!(roots.len(), 2);
        assert!(roots.contains(&digest::parse_digest(&b).unwrap()));
        for (bad, line) in [
            (format!("{a}\nsha256:{}\n", "ab".repeat(31)), "line 2"),
            ("md5:00\n".to_string(), "line 1"),
            (format!("# x\n{a}\nsha256:{}\n", "zz".repeat(32)), "line 3"),
        ] {
            let e = parse(&bad).unwrap_err();
            assert!(e.starts_with(line), "{e}");
        }
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn a_file_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("roots");
        std::fs::write(&p, format!("{}\n", "ab".repeat(32))).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load(&p).unwrap().len(), 1);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(load(&p).unwrap_err().contains("only root can write"));
        assert!(load(dir.path()).is_err());
        assert!(load(&dir.path().join("none")).is_err());
    }
}
