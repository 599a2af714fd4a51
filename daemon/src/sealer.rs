//! The sealer: seals frozen layers in the background (docs/integrity.md),
//! so a commit or the end of an unpack stays O(1). It works when the engine
//! has been idle for [`QUIET`] and stops (keeping the files it hashed
//! whole) as soon as anything else happens; a layer left unsealed for
//! [`FORCE_AFTER`] on a host that is never idle is sealed regardless.
//! `lcfs verify` seals a layer at once when it has no seal yet.
//!
//! Which layers: image layers (cold), base layers, and frozen layers that
//! hold at least [`OWN_BYTES`] of their own (a committed build step). A
//! frozen clone that changed next to nothing (a container's init layer, a
//! containerd view) shows its parent's content, whose seal covers it: it is
//! sealed only when asked.

use lcfs_engine::{digest, Engine, Error, LayerInfo, SealState};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the engine must have been idle before sealing starts.
const QUIET: Duration = Duration::from_secs(2);
/// How long a layer waits for an idle engine at most.
const FORCE_AFTER: Duration = Duration::from_secs(600);
/// How long a layer whose sealing failed waits before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(60);
const TICK: Duration = Duration::from_millis(250);
/// How often the layers are listed while the engine is busy.
const BUSY_LISTING: Duration = Duration::from_secs(10);
/// Bytes a frozen clone must own to be sealed unasked.
const OWN_BYTES: u64 = 1 << 20;

/// Whether the sealer seals layer `l` unasked (and it is not sealed).
fn wanted(l: &LayerInfo) -> bool {
    let worth = l.cold || l.parent.is_none() || l.owned_bytes >= OWN_BYTES;
    l.frozen
        && match l.seal {
            SealState::None => worth,
            SealState::Partial => true,
            SealState::Sealed(_) | SealState::Unreadable(_) => false,
        }
}

pub struct Sealer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sealer {
    pub fn start(engine: Arc<Engine>) -> std::io::Result<Sealer> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("lcfs-sealer".into())
            .spawn(move || run(&engine, &flag))?;
        Ok(Sealer {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops it (a sealing under way stops within a MiB read) and waits.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(engine: &Engine, stop: &AtomicBool) {
    let mut mark = engine.activity();
    let mut quiet_since = Instant::now();
    let mut waiting: HashMap<String, Instant> = HashMap::new();
    let mut failed: HashMap<String, Instant> = HashMap::new();
    let mut listed = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        let now = engine.activity();
        if now != mark {
            mark = now;
            quiet_since = Instant::now();
        }
        let idle = quiet_since.elapsed() >= QUIET;
        // While the engine is busy, the layers are listed now and then
        // only, to see which waited long enough.
        if !idle && listed.elapsed() < BUSY_LISTING {
            continue;
        }
        listed = Instant::now();
        if engine.stats().read_only_reason.is_some() {
            continue;
        }
        let unsealed: Vec<String> = engine
            .list_layers()
            .into_iter()
            .filter(wanted)
            .map(|l| l.name)
            .collect();
        waiting.retain(|name, _| unsealed.contains(name));
        failed.retain(|_, at| at.elapsed() < RETRY_AFTER);
        let next = unsealed.into_iter().find_map(|name| {
            if failed.contains_key(&name) {
                return None;
            }
            let since = *waiting.entry(name.clone()).or_insert_with(Instant::now);
            let forced = since.elapsed() >= FORCE_AFTER;
            (idle || forced).then_some((name, forced))
        });
        let Some((name, forced)) = next else {
            continue;
        };
        let began = Instant::now();
        let start_mark = engine.activity();
        let yield_to_others =
            || stop.load(Ordering::Relaxed) || (!forced && engine.activity() != start_mark);
        match engine.seal_layer(&name, &yield_to_others, &mut |_| {}) {
            Ok(info) => log::info!(
                "sealed layer {name}: root {} ({} files, {} bytes) in {:.2} s",
                digest::digest_string(&info.root),
                info.files,
                info.file_bytes,
                began.elapsed().as_secs_f64()
            ),
            Err(Error::Busy(_)) => {
                log::debug!("sealing of layer {name} paused: the engine is busy");
                mark = engine.activity();
                quiet_since = Instant::now();
            }
            // Removed meanwhile.
            Err(Error::NotFound) => {}
            // A lazily pulled layer: sealed once its content is all here.
            Err(Error::Absent(_)) => {
                log::debug!("layer {name} waits for its content before it is sealed");
                failed.insert(name, Instant::now());
            }
            Err(e) => {
                log::warn!("sealing layer {name}: {e} (tried again in a minute)");
                failed.insert(name, Instant::now());
            }
        }
    }
}
