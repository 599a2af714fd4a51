//! `lcfs fsck`: checks a device offline (no daemon may hold it), or asks the
//! running daemon to check its live engine (`--online`); and `lcfs layer
//! digest`, which reads a device offline the same way or asks the daemon.

use crate::device;
use crate::error::{Error, Result};
use crate::protocol::{Difference, FsckReport, LayerDigest, Verification, VERIFY_LISTED_MAX};
use crate::size::human_bytes;
use lcfs_engine::digest::{digest_string, parse_digest};
use lcfs_engine::{Config, Engine};
use std::path::{Path, PathBuf};

/// Runs `f` on an engine opened on `path` with no daemon holding it
/// (`online`: what to use instead). Opening replays the log past the last
/// checkpoint, like any open; nothing else is written.
fn with_device<T>(path: &Path, online: &str, f: impl FnOnce(&Engine) -> Result<T>) -> Result<T> {
    if !path.exists() {
        return Err(device::no_device(path));
    }
    let _lock = device::lock(path).map_err(|e| match e {
        Error::Usage(m) => Error::Usage(format!("{m}; stop the daemon first, or {online}")),
        e => e,
    })?;
    let dev = device::open(path)?;
    let config = Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..Config::default()
    };
    let engine = device::open_engine(path, dev, config)?;
    let result = f(&engine)?;
    engine
        .close()
        .map_err(|e| Error::engine(format!("closing {}", path.display()), e))?;
    Ok(result)
}

/// Checks `path` offline.
pub fn offline(path: &Path, verify_data: bool) -> Result<FsckReport> {
    let online = "check the live filesystem with `lcfs fsck --online`";
    with_device(path, online, |engine| {
        let report = engine
            .fsck(verify_data)
            .map_err(|e| Error::engine(format!("checking {}", path.display()), e))?;
        Ok(FsckReport::from(&report))
    })
}

/// `--expect DIGEST`, checked before anything is read, as
/// `sha256:<lower-case hex>`.
fn expected(expect: Option<&str>) -> Result<Option<String>> {
    expect
        .map(|e| {
            parse_digest(e)
                .map(|d| digest_string(&d))
                .map_err(|e| Error::Usage(format!("--expect: {e}")))
        })
        .transpose()
}

/// Most bytes of a manifest read.
const MANIFEST_MAX_BYTES: u64 = 1 << 30;

/// A manifest path the daemon opens must be absolute (its working
/// directory is not the caller's).
fn absolute(path: &Path) -> Result<()> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "the manifest path {} must be absolute",
            path.display()
        )))
    }
}

/// Layer `name`'s digest; with `manifest`, its manifest written there too
/// (an absolute path; the file is made, never replaced).
pub fn digest_with_manifest(
    engine: &Engine,
    name: &str,
    manifest: Option<&Path>,
) -> Result<LayerDigest> {
    let context = || format!("digest of layer {name:?}");
    let Some(path) = manifest else {
        let d = lcfs_engine::digest::layer_digest(engine, name, |_| {})
            .map_err(|e| Error::engine(context(), e))?;
        return Ok(LayerDigest::new(name, &d));
    };
    absolute(path)?;
    let (d, bytes) = lcfs_engine::digest::layer_manifest(engine, name)
        .map_err(|e| Error::engine(context(), e))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    std::io::Write::write_all(&mut f, &bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok(LayerDigest::new(name, &d))
}

/// Layer `name` against the manifest at `path`.
pub fn verify(engine: &Engine, name: &str, path: &Path) -> Result<Verification> {
    absolute(path)?;
    let read = || -> std::io::Result<Vec<u8>> {
        let f = std::fs::File::open(path)?;
        if f.metadata()?.len() > MANIFEST_MAX_BYTES {
            return Err(std::io::Error::other("larger than 1 GiB"));
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(f, MANIFEST_MAX_BYTES), &mut bytes)?;
        Ok(bytes)
    };
    let bytes =
        read().map_err(|e| Error::io(format!("reading the manifest {}", path.display()), e))?;
    let v = lcfs_engine::digest::verify_against(engine, name, &bytes).map_err(|e| {
        Error::engine(
            format!("verifying layer {name:?} against {}", path.display()),
            e,
        )
    })?;
    Ok(verification(name, "manifest", v))
}

/// Layer `name` against its seal (docs/integrity.md), sealing it first when
/// it has no complete seal (then there is nothing to compare: the seal is
/// made from what the device holds). `progress` gets the file bytes read
/// so far and, when known, how many there are.
pub fn verify_sealed(
    engine: &Engine,
    name: &str,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<Verification> {
    let context = || format!("verifying layer {name:?} against its seal");
    let state = engine
        .seal_state(name)
        .map_err(|e| Error::engine(context(), e))?;
    if let lcfs_engine::SealState::Sealed(_) = state {
        let (info, manifest) = engine
            .sealed_manifest(name)
            .map_err(|e| Error::engine(context(), e))?;
        let total = Some(info.file_bytes);
        progress(0, total);
        let v = lcfs_engine::digest::verify_against_progress(engine, name, &manifest, &mut |b| {
            progress(b, total)
        })
        .map_err(|e| Error::engine(context(), e))?;
        return Ok(verification(name, "seal", v));
    }
    if let lcfs_engine::SealState::Unreadable(why) = state {
        return Err(Error::Problems(format!(
            "layer {name:?}: its seal cannot be read: {why}"
        )));
    }
    let info = engine
        .seal_layer(name, &|| false, &mut |b| progress(b, None))
        .map_err(|e| Error::engine(format!("sealing layer {name:?}"), e))?;
    let root = digest_string(&info.root);
    Ok(Verification {
        name: name.to_string(),
        against: "seal".into(),
        sealed_now: true,
        root: root.clone(),
        manifest_root: root,
        differences: Vec::new(),
        differences_total: 0,
    })
}

fn verification(name: &str, against: &str, v: lcfs_engine::digest::Verification) -> Verification {
    Verification {
        name: name.to_string(),
        against: against.into(),
        sealed_now: false,
        root: digest_string(&v.digest.root),
        manifest_root: digest_string(&v.manifest_root),
        differences_total: v.differences.len() as u64,
        differences: v
            .differences
            .into_iter()
            .take(VERIFY_LISTED_MAX)
            .map(|(p, w)| Difference {
                path: String::from_utf8_lossy(&p).into_owned(),
                what: w.into_iter().map(String::from).collect(),
            })
            .collect(),
    }
}

/// What `lcfs verify` checks, and how it reports.
pub struct VerifyWhat {
    /// One layer; None: every frozen layer.
    pub name: Option<String>,
    pub manifest: Option<PathBuf>,
    pub expect: Option<String>,
    pub device: Option<PathBuf>,
    pub json: bool,
}

/// `lcfs verify`: a layer (or every frozen layer) against its seal or a
/// manifest, from the daemon or read from a device offline; prints each
/// difference; an error (exit status 1) on any, when a layer cannot be
/// checked, or when `expect` is given and the seal's or manifest's root is
/// another. A malformed `expect` is refused before anything is read.
pub fn verify_command(socket: &Path, w: &VerifyWhat) -> Result<()> {
    let want = expected(w.expect.as_deref())?;
    let manifest = w
        .manifest
        .as_ref()
        .map(|m| {
            std::path::absolute(m).map_err(|e| Error::io(format!("the path {}", m.display()), e))
        })
        .transpose()?;
    let bar = Progress::new(!w.json && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let results: Vec<(String, Result<Verification>)> = match &w.device {
        Some(path) => with_device(path, "leave out --device to ask the daemon", |engine| {
            let names = match &w.name {
                Some(n) => vec![n.clone()],
                None => frozen(engine.list_layers().into_iter().map(|l| (l.name, l.frozen))),
            };
            Ok(names
                .into_iter()
                .map(|name| {
                    let v = match &manifest {
                        Some(m) => verify(engine, &name, m),
                        None => verify_sealed(engine, &name, &mut |b, t| bar.show(&name, b, t)),
                    };
                    (name, v)
                })
                .collect())
        })?,
        None => {
            let names = match &w.name {
                Some(n) => vec![n.clone()],
                None => frozen(
                    crate::client::layers(socket)?
                        .into_iter()
                        .map(|l| (l.name, l.frozen)),
                ),
            };
            names
                .into_iter()
                .map(|name| {
                    let v = verify_through_daemon(socket, &name, manifest.as_deref(), &bar);
                    (name, v)
                })
                .collect()
        }
    };
    bar.0.finish_and_clear();
    let mut failed = Vec::new();
    let mut reported = Vec::new();
    for (name, v) in results {
        match v {
            Ok(v) => reported.push(v),
            Err(e) => {
                eprintln!("lcfs: {e}");
                failed.push(name);
            }
        }
    }
    if w.json {
        if w.name.is_some() {
            if let Some(v) = reported.first() {
                crate::client::print_json(v)?;
            }
        } else {
            crate::client::print_json(&reported)?;
        }
    } else {
        for v in &reported {
            print_verification(v);
        }
    }
    let mut problems = Vec::new();
    if let Some(want) = want {
        for v in &reported {
            if want != v.manifest_root {
                problems.push(format!(
                    "the {}'s root is {}, not the expected {want}: it is not that layer's",
                    v.against, v.manifest_root
                ));
            }
        }
    }
    for v in &reported {
        if v.differences_total > 0 {
            problems.push(format!(
                "layer {:?}: {} entries differ from its {}",
                v.name, v.differences_total, v.against
            ));
        }
    }
    if !failed.is_empty() {
        problems.push(format!("could not check {}", failed.join(", ")));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Problems(problems.join("; ")))
    }
}

/// The names of the frozen layers among (name, frozen).
fn frozen(layers: impl Iterator<Item = (String, bool)>) -> Vec<String> {
    layers.filter(|(_, f)| *f).map(|(n, _)| n).collect()
}

/// One layer checked by the daemon, its progress drawn while it runs
/// (asked for on a second connection) when `bar` is shown.
fn verify_through_daemon(
    socket: &Path,
    name: &str,
    manifest: Option<&Path>,
    bar: &Progress,
) -> Result<Verification> {
    if bar.0.is_hidden() || manifest.is_some() {
        return crate::client::layer_verify(socket, name, manifest);
    }
    std::thread::scope(|scope| {
        let job = scope.spawn(|| crate::client::layer_verify(socket, name, None));
        while !job.is_finished() {
            if let Ok(Some((done, total))) = crate::client::layer_verify_progress(socket, name) {
                bar.show(name, done, total);
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        job.join()
            .unwrap_or_else(|_| Err(Error::Problems("the verify thread panicked".into())))
    })
}

/// `lcfs verify`'s progress bar on stderr (hidden unless it is a
/// terminal): file bytes read of how many, or hashed so far while a layer
/// is sealed (the total is not known then).
struct Progress(indicatif::ProgressBar);

impl Progress {
    fn new(shown: bool) -> Progress {
        let target = if shown {
            indicatif::ProgressDrawTarget::stderr()
        } else {
            indicatif::ProgressDrawTarget::hidden()
        };
        let bar = indicatif::ProgressBar::with_draw_target(None, target);
        bar.set_style(
            indicatif::ProgressStyle::default_spinner()
                .template("")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        Progress(bar)
    }

    fn show(&self, name: &str, done: u64, total: Option<u64>) {
        let template = match total {
            Some(_) => "[{bar:30}] {percent:>3}% {bytes} of {total_bytes}  {msg}",
            None => "{spinner} sealing {msg}: {bytes} hashed",
        };
        if self.0.message() != name || self.0.length() != total {
            self.0.reset();
            match total {
                Some(t) => self.0.set_length(t),
                None => self.0.unset_length(),
            }
            self.0.set_position(done);
            self.0.set_message(name.to_string());
            self.0.set_style(
                indicatif::ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
        }
        self.0.set_position(done);
    }
}

fn print_verification(v: &Verification) {
    for d in &v.differences {
        println!("{}: {}", d.path, d.what.join(", "));
    }
    if v.differences_total > v.differences.len() as u64 {
        println!(
            "... and {} more",
            v.differences_total - v.differences.len() as u64
        );
    }
    if v.sealed_now {
        println!(
            "{}: sealed now, root {} (it had no seal: nothing to compare)",
            v.name, v.root
        );
    } else {
        println!(
            "{}: {} entries differ from its {} (root {}, now {})",
            v.name, v.differences_total, v.against, v.manifest_root, v.root
        );
    }
}

/// `lcfs layer digest`: layer `name`'s root from the daemon, or read from
/// `device` offline; an error (exit status 1) when `expect` is given and
/// differs. A malformed `expect` is refused before anything is read.
pub fn layer_digest(
    socket: &Path,
    name: &str,
    expect: Option<&str>,
    manifest: Option<&Path>,
    device: Option<&Path>,
    json: bool,
) -> Result<()> {
    let want = expected(expect)?;
    let manifest = manifest
        .map(|m| {
            std::path::absolute(m).map_err(|e| Error::io(format!("the path {}", m.display()), e))
        })
        .transpose()?;
    let d = match device {
        Some(path) => with_device(path, "leave out --device to ask the daemon", |engine| {
            digest_with_manifest(engine, name, manifest.as_deref())
        })?,
        None => crate::client::layer_digest(socket, name, manifest.as_deref())?,
    };
    if json {
        crate::client::print_json(&d)?;
    } else {
        println!("{}  {}", d.root, d.name);
        println!(
            "  {} entries, {} regular files, {} of file data",
            d.entries,
            d.files,
            human_bytes(d.file_bytes)
        );
    }
    match want {
        Some(w) if w != d.root => Err(Error::Problems(format!(
            "layer {name:?} has root {}, not the expected {w}",
            d.root
        ))),
        _ => Ok(()),
    }
}

/// Prints a report; an error when it found problems (so the exit code is 1).
pub fn print(what: &str, report: &FsckReport) -> Result<()> {
    println!(
        "{what}: {}",
        if report.clean {
            "clean".to_string()
        } else {
            format!("{} problems", report.errors.len())
        }
    );
    println!(
        "  {} layers, {} inodes, {} extents, {} tree nodes, {} map nodes ({} entries), {} data blocks verified",
        report.layers,
        report.inodes,
        report.extents,
        report.tree_nodes,
        report.map_nodes,
        report.map_entries,
        report.data_blocks_verified
    );
    for e in &report.errors {
        println!("  problem: {e}");
    }
    if report.clean {
        Ok(())
    } else {
        Err(Error::Problems(format!(
            "{what}: fsck found {} problems",
            report.errors.len()
        )))
    }
}
