//! Image garbage collection by policy (docs/gc.md): keeps the device below
//! its watermarks by removing unused images, least recently used first,
//! through their owner's API (dockerd's `DELETE /images/{id}`, containerd's
//! images service), never behind the owner's back.
//!
//! - [`Policy`]: one TOML file, every key optional; a bad file is refused
//!   with the key named, and a running daemon keeps its old policy.
//! - [`plan`]: a pure function from the images, the device's use and the
//!   policy to what a pass would remove and why (what `--dry-run` prints).
//! - [`Collector::pass`]: carries a plan out one image at a time, measuring
//!   the device after each removal and stopping once it is below the low
//!   watermark; one pass at a time (the periodic one and `lcfs gc`).

use crate::images::Catalog;
use crate::protocol::Image;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the daemon reads its policy unless told otherwise.
pub const DEFAULT_POLICY: &str = "/etc/lcfs/gc.toml";
/// The largest policy file read.
const POLICY_MAX_BYTES: u64 = 64 << 10;
/// The most `keep` patterns, and the longest.
const KEEP_MAX: usize = 1024;
const PATTERN_MAX_BYTES: usize = 512;

/// The garbage collector's policy (docs/gc.md, "Policy").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Run passes inside the daemon (every `interval_seconds`, and as soon
    /// as the device is above the high watermark).
    pub enabled: bool,
    pub interval_seconds: u64,
    /// Above `high_watermark_percent` of the device in use, remove unused
    /// images until below `low_watermark_percent`.
    pub high_watermark_percent: u8,
    pub low_watermark_percent: u8,
    /// An image younger than this is never removed.
    pub min_age_seconds: u64,
    /// An image unused this long is removed whatever the space (0: never).
    pub max_unused_age_seconds: u64,
    /// Image names never removed: `*` matches any run of characters, `?`
    /// any one (`docker.io/library/*`, `busybox:*`).
    pub keep: Vec<String>,
    /// Remove layers no owner references (orphans) once older than
    /// `orphan_grace_seconds`; otherwise they are only reported.
    pub remove_orphans: bool,
    pub orphan_grace_seconds: u64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            enabled: true,
            interval_seconds: 300,
            high_watermark_percent: 85,
            low_watermark_percent: 80,
            min_age_seconds: 120,
            max_unused_age_seconds: 0,
            keep: Vec::new(),
            remove_orphans: false,
            orphan_grace_seconds: 3600,
        }
    }
}

impl Policy {
    /// Reads a policy file; a missing file is the default policy.
    pub fn load(path: &Path) -> Result<Policy, String> {
        use std::io::Read;
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Policy::default()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let mut text = String::new();
        file.take(POLICY_MAX_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if text.len() as u64 > POLICY_MAX_BYTES {
            return Err(format!(
                "{}: larger than {} KiB",
                path.display(),
                POLICY_MAX_BYTES >> 10
            ));
        }
        Policy::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks a policy.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let p: Policy = toml::from_str(text).map_err(|e| where_in(text, &e))?;
        p.check()?;
        Ok(p)
    }

    fn check(&self) -> Result<(), String> {
        let (high, low) = (self.high_watermark_percent, self.low_watermark_percent);
        if !(1..=100).contains(&high) {
            return Err(format!(
                "high_watermark_percent = {high}: expected 1 to 100"
            ));
        }
        if low >= high {
            return Err(format!(
                "low_watermark_percent = {low} is not below high_watermark_percent = {high}"
            ));
        }
        if self.enabled && self.interval_seconds == 0 {
            return Err("interval_seconds = 0: expected at least 1".into());
        }
        if self.keep.len() > KEEP_MAX {
            return Err(format!("keep: more than {KEEP_MAX} patterns"));
        }
        if let Some(p) = self
            .keep
            .iter()
            .find(|p| p.is_empty() || p.len() > PATTERN_MAX_BYTES)
        {
            return Err(format!(
                "keep: pattern {p:?} is empty or longer than {PATTERN_MAX_BYTES} bytes"
            ));
        }
        Ok(())
    }

    fn kept(&self, image: &Image) -> bool {
        self.keep.iter().any(|p| {
            std::iter::once(&image.name)
                .chain(&image.names)
                .any(|n| glob(p, n))
        })
    }
}

/// A TOML error with the line and the key it is about: `line 3, key
/// min_age_seconds: invalid value: integer `-5`, expected u64`.
fn where_in(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    match line.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() => {
            format!("line {line_no}, key {}: {}", key.trim(), e.message())
        }
        _ => format!("line {line_no}: {}", e.message()),
    }
}

/// `*` and `?` matching (iterative, with one backtrack point: linear in
/// practice, bounded by the pattern and name lengths).
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// Why a pass removes an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// The device is above the high watermark: least recently used first.
    Space,
    /// Unused for longer than `max_unused_age_seconds`.
    Unused,
}

/// Why a pass leaves an image alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Keep {
    /// A container (running or stopped) uses it.
    InUse,
    /// A `keep` pattern names it.
    Kept,
    /// Younger than `min_age_seconds`.
    TooYoung,
    /// No owner named it: nothing to remove it through.
    NoOwner,
    /// Not needed: the device is below its watermark and it is not too old.
    NotNeeded,
}

/// One image in a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub image: String,
    pub owner: Option<String>,
    pub id: Option<String>,
    /// RFC 3339: its last container start, else its creation.
    pub last_used: String,
    /// Bytes its removal should give back: its layers no other image or
    /// container shares.
    pub bytes: u64,
    /// Set for images to remove.
    pub reason: Option<Reason>,
    /// Set for images left alone.
    pub keep: Option<Keep>,
    /// After a pass: `removed`, `gone` (already), `in-use` (the owner
    /// refused) or the error.
    #[serde(default)]
    pub outcome: Option<String>,
}

/// What a pass would do (`--dry-run`) or did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub dry_run: bool,
    pub policy: Option<Policy>,
    /// Device use when the pass began and ended, in percent of capacity.
    pub used_percent_before: f64,
    pub used_percent_after: f64,
    pub capacity_bytes: u64,
    /// Bytes in use that the pass gave back (measured, not estimated).
    pub freed_bytes: u64,
    pub seconds: f64,
    /// Images to remove, in order, then the ones left alone.
    pub remove: Vec<Entry>,
    pub keep: Vec<Entry>,
    /// Layers no owner references (when asked for, or when the policy
    /// removes them), and why they could not be listed.
    #[serde(default)]
    pub orphans: Vec<Orphan>,
    #[serde(default)]
    pub orphans_unknown: Option<String>,
    /// Registry mirror blobs evicted for space (before any image), and
    /// their bytes.
    #[serde(default)]
    pub mirror_blobs_evicted: usize,
    #[serde(default)]
    pub mirror_bytes_evicted: u64,
}

/// The images to remove, least recently used first, and those left alone.
/// `layer_bytes` is, for each layer, its owned bytes and the images it
/// belongs to (to tell the bytes an image alone holds). Space removals stop
/// once the estimate is at the low watermark; a pass measures instead.
pub fn plan(
    images: &[Image],
    layer_bytes: &[(u64, Vec<String>)],
    used: u64,
    capacity: u64,
    policy: &Policy,
    now: i64,
) -> (Vec<Entry>, Vec<Entry>) {
    let last_used = |i: &Image| {
        if i.starts > 0 {
            i.last_start_seconds
        } else {
            i.created_seconds
        }
    };
    let alone = |i: &Image| -> u64 {
        layer_bytes
            .iter()
            .filter(|(_, owners)| owners.len() == 1 && owners[0] == i.name)
            .map(|(bytes, _)| *bytes)
            .sum()
    };
    let entry = |i: &Image| Entry {
        image: i.name.clone(),
        owner: i.owner.clone(),
        id: i.id.clone(),
        last_used: if i.starts > 0 {
            i.last_start.clone().unwrap_or_default()
        } else {
            i.created.clone()
        },
        bytes: alone(i),
        reason: None,
        keep: None,
        outcome: None,
    };
    let mut candidates: Vec<&Image> = Vec::new();
    let mut keep = Vec::new();
    for i in images {
        let why = if i.owner.is_none() {
            Some(Keep::NoOwner)
        } else if i.containers > 0 {
            Some(Keep::InUse)
        } else if policy.kept(i) {
            Some(Keep::Kept)
        } else if now - i.created_seconds < policy.min_age_seconds as i64 {
            Some(Keep::TooYoung)
        } else {
            None
        };
        match why {
            Some(k) => keep.push(Entry {
                keep: Some(k),
                ..entry(i)
            }),
            None => candidates.push(i),
        }
    }
    candidates.sort_by(|a, b| {
        last_used(a)
            .cmp(&last_used(b))
            .then_with(|| a.name.cmp(&b.name))
    });
    let high = capacity / 100 * policy.high_watermark_percent as u64;
    let low = capacity / 100 * policy.low_watermark_percent as u64;
    let mut left = used;
    let mut remove = Vec::new();
    let over = used > high;
    for i in candidates {
        let unused = policy.max_unused_age_seconds > 0
            && now - last_used(i) >= policy.max_unused_age_seconds as i64;
        let reason = if over && left > low {
            Some(Reason::Space)
        } else if unused {
            Some(Reason::Unused)
        } else {
            None
        };
        let e = entry(i);
        match reason {
            Some(r) => {
                left = left.saturating_sub(e.bytes);
                remove.push(Entry {
                    reason: Some(r),
                    ..e
                });
            }
            None => keep.push(Entry {
                keep: Some(Keep::NotNeeded),
                ..e
            }),
        }
    }
    (remove, keep)
}

/// The garbage collector of one daemon: its policy, and the lock one pass
/// at a time holds.
pub struct Collector {
    pub catalog: Arc<Catalog>,
    /// For removing orphan layers as the control socket does (the mount's
    /// cache kept right).
    layers: lcfs_fsfront::LayerOps,
    /// Where the policy was read from (`lcfs gc --reload` reads it again).
    pub policy_path: PathBuf,
    policy: Mutex<Policy>,
    pass: Mutex<()>,
}

impl Collector {
    pub fn new(
        catalog: Arc<Catalog>,
        layers: lcfs_fsfront::LayerOps,
        policy_path: &Path,
        policy: Policy,
    ) -> Collector {
        Collector {
            catalog,
            layers,
            policy_path: policy_path.to_path_buf(),
            policy: Mutex::new(policy),
            pass: Mutex::new(()),
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the policy file again; on any error the old policy stays.
    pub fn reload(&self) -> Result<Policy, String> {
        let p = Policy::load(&self.policy_path)?;
        *self.policy.lock().unwrap_or_else(|p| p.into_inner()) = p.clone();
        log::info!("gc: policy reloaded from {}", self.policy_path.display());
        Ok(p)
    }

    fn used(&self) -> (u64, u64) {
        let s = self.catalog.engine.stats();
        (s.live_bytes, s.capacity_bytes)
    }

    /// Plans a pass and, unless `dry_run`, carries it out; with
    /// `orphans` (or when the policy removes them) lists orphan layers too.
    pub fn pass(&self, dry_run: bool, orphans: bool) -> Report {
        let _one = self.pass.lock().unwrap_or_else(|p| p.into_inner());
        let started = Instant::now();
        let policy = self.policy();
        // Freed blocks count once a checkpoint has passed.
        let _ = self.catalog.engine.sync();
        let (used, capacity) = self.used();
        let (images, layers) = self
            .catalog
            .images_and_layers(crate::client::TopSort::Clones);
        let layer_bytes: Vec<(u64, Vec<String>)> = layers
            .iter()
            .map(|l| (l.owned_bytes, l.images.clone()))
            .collect();
        let now = lcfs_engine::Timestamp::now().seconds;
        let (mut remove, keep) = plan(&images, &layer_bytes, used, capacity, &policy, now);
        let percent = |b: u64| {
            if capacity == 0 {
                0.0
            } else {
                b as f64 * 100.0 / capacity as f64
            }
        };
        let low = capacity / 100 * policy.low_watermark_percent as u64;
        let high = capacity / 100 * policy.high_watermark_percent as u64;
        let mut now_used = used;
        let (mut blobs_evicted, mut bytes_evicted) = (0, 0);
        if !dry_run && used > high {
            // The mirror's blobs go first: each can be fetched again.
            if let Some(store) = &self.catalog.mirror_store {
                while now_used > low {
                    let (n, bytes) = store.evict(now_used - low);
                    if n == 0 {
                        break;
                    }
                    blobs_evicted += n;
                    bytes_evicted += bytes;
                    let _ = self.catalog.engine.sync();
                    now_used = self.used().0;
                }
            }
        }
        if !dry_run {
            for e in &mut remove {
                if e.reason == Some(Reason::Space) && now_used <= low {
                    e.outcome = Some("not needed: below the low watermark".into());
                    continue;
                }
                let image = images.iter().find(|i| i.name == e.image).expect("planned");
                e.outcome = Some(self.remove(image));
                let _ = self.catalog.engine.sync();
                now_used = self.used().0;
            }
            let removed = remove
                .iter()
                .filter(|e| e.outcome.as_deref() == Some("removed"))
                .count();
            if removed > 0 {
                log::info!(
                    "gc: removed {removed} image(s); device use {:.1}% -> {:.1}%",
                    percent(used),
                    percent(now_used)
                );
            }
        }
        let (mut orphan_list, mut orphans_unknown) = (Vec::new(), None);
        if orphans || policy.remove_orphans {
            match self.orphans() {
                Ok(list) => orphan_list = list,
                Err(why) => orphans_unknown = Some(why),
            }
            if !dry_run && policy.remove_orphans {
                self.remove_orphans(&mut orphan_list);
                now_used = self.used().0;
            }
        }
        Report {
            orphans: orphan_list,
            orphans_unknown,
            dry_run,
            policy: Some(policy),
            used_percent_before: percent(used),
            used_percent_after: percent(now_used),
            capacity_bytes: capacity,
            freed_bytes: used.saturating_sub(now_used),
            seconds: started.elapsed().as_secs_f64(),
            remove,
            keep,
            mirror_blobs_evicted: blobs_evicted,
            mirror_bytes_evicted: bytes_evicted,
        }
    }

    /// Removes one image through its owner, every record of it (an image
    /// two containerd names or two Docker ids share); what happened, in a
    /// word or the first error.
    fn remove(&self, image: &Image) -> String {
        // An image no owner named has no record: nothing removes it.
        let mut outcome = if image.records.is_empty() {
            "error: no owner".to_string()
        } else {
            "gone".to_string()
        };
        for record in &image.records {
            let one = self.remove_record(record);
            if one == "removed" && outcome == "gone" {
                outcome = one;
            } else if one != "removed" && one != "gone" {
                outcome = one;
                break;
            }
        }
        if outcome == "removed" {
            log::info!("gc: removed image {}", image.name);
        } else {
            log::warn!("gc: image {}: {outcome}", image.name);
        }
        outcome
    }

    fn remove_record(&self, record: &crate::images::Named) -> String {
        match record.owner {
            "docker" => match self.catalog.docker_socket.as_deref() {
                Some(socket) => {
                    match crate::owners::docker_remove_image(socket, &record.id, &record.references)
                    {
                        Ok(crate::owners::Removal::Removed) => "removed".into(),
                        Ok(crate::owners::Removal::Gone) => "gone".into(),
                        Ok(crate::owners::Removal::InUse(why)) => format!("in-use: {why}"),
                        Err(e) => format!("error: {e}"),
                    }
                }
                None => "error: no dockerd socket".into(),
            },
            "containerd" => match &self.catalog.containerd {
                Some((_, address)) => {
                    let ns = record.namespace.clone().unwrap_or_default();
                    match crate::images::block_on(lcfs_snapshotter::remove_image(
                        address,
                        &ns,
                        &record.name,
                    )) {
                        Ok(true) => "removed".into(),
                        Ok(false) => "gone".into(),
                        Err(e) => format!("error: {e}"),
                    }
                }
                None => "error: no containerd".into(),
            },
            _ => "error: no owner".into(),
        }
    }

    /// The periodic passes: checks the device every few seconds and runs a
    /// pass when it is above the high watermark or the interval has passed.
    pub fn run_periodically(self: Arc<Self>, stop: std::sync::mpsc::Receiver<()>) {
        let mut last = Instant::now();
        loop {
            match stop.recv_timeout(POLL) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let policy = self.policy();
            if !policy.enabled {
                continue;
            }
            let (used, capacity) = self.used();
            let over = capacity > 0 && used > capacity / 100 * policy.high_watermark_percent as u64;
            let due = last.elapsed() >= Duration::from_secs(policy.interval_seconds);
            if over || due {
                last = Instant::now();
                let report = self.pass(false, false);
                if over && report.used_percent_after >= policy.high_watermark_percent as f64 {
                    log::warn!(
                        "gc: device use is {:.1}%, above the high watermark {}%, and nothing more may be removed",
                        report.used_percent_after,
                        policy.high_watermark_percent
                    );
                }
            }
        }
    }
}

/// A layer no owner references.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Orphan {
    pub layer: String,
    pub created: String,
    pub owned_bytes: u64,
    /// Older than `orphan_grace_seconds`: removed by a pass when
    /// `remove_orphans` is set.
    pub past_grace: bool,
    /// After a pass that removed orphans: `removed` or the error.
    #[serde(default)]
    pub outcome: Option<String>,
}

impl Collector {
    /// The layers no owner references (docs/gc.md, "Orphans"): not in the
    /// chain of an image or container dockerd lists, nor held by the
    /// containerd snapshotter's table. Refused when an owner the daemon
    /// serves cannot be asked, or when it serves none (every layer is then
    /// the control socket's, made on purpose).
    pub fn orphans(&self) -> Result<Vec<Orphan>, String> {
        let catalog = &self.catalog;
        let layers = catalog.engine.list_layers();
        let mut referenced: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut owners = 0;
        if catalog.plugin.is_some() {
            owners += 1;
            let socket = catalog
                .docker_socket
                .as_deref()
                .filter(|s| s.exists())
                .ok_or("dockerd's API socket is not there (--docker-socket): orphans unknown")?;
            let mut cache = crate::owners::DockerCache::default();
            let images = crate::owners::docker_images(socket, &mut cache)
                .map_err(|e| format!("asking dockerd for its images: {e}"))?;
            referenced.extend(images.into_iter().map(|i| i.top_layer));
            let containers = crate::owners::docker_containers(socket)
                .map_err(|e| format!("asking dockerd for its containers: {e}"))?;
            referenced.extend(containers.into_iter().filter_map(|c| c.layer));
        }
        if let Some((table, _)) = &catalog.containerd {
            owners += 1;
            referenced.extend(table.layer_names());
        }
        if owners == 0 {
            return Err("this daemon serves neither dockerd nor containerd: every layer is the control socket's".into());
        }
        // The registry mirror's blob cache is the daemon's own.
        referenced.insert(lcfs_mirror::store::LAYER.to_string());
        // What is referenced keeps its ancestors.
        let parent: std::collections::HashMap<&str, &str> = layers
            .iter()
            .filter_map(|l| l.parent.as_deref().map(|p| (l.name.as_str(), p)))
            .collect();
        let mut keep: std::collections::HashSet<&str> = std::collections::HashSet::new();
        for name in &referenced {
            let mut at = Some(name.as_str());
            let mut steps = 0;
            while let (Some(n), true) = (at, steps <= layers.len()) {
                if !keep.insert(n) {
                    break;
                }
                at = parent.get(n).copied();
                steps += 1;
            }
        }
        let now = lcfs_engine::Timestamp::now().seconds;
        let grace = self.policy().orphan_grace_seconds as i64;
        Ok(layers
            .iter()
            .filter(|l| !keep.contains(l.name.as_str()))
            .map(|l| Orphan {
                layer: l.name.clone(),
                created: crate::protocol::rfc3339(l.created),
                owned_bytes: l.owned_bytes,
                past_grace: now - l.created.seconds >= grace,
                outcome: None,
            })
            .collect())
    }

    /// Removes the orphans past their grace period, children before
    /// parents (a layer with children left is skipped).
    fn remove_orphans(&self, orphans: &mut [Orphan]) {
        let _ = self.catalog.engine.sync();
        // Deepest first: a child's name sorts nowhere in particular, so go
        // by the number of children left, retrying while any goes.
        loop {
            let mut progressed = false;
            for o in orphans
                .iter_mut()
                .filter(|o| o.past_grace && o.outcome.is_none())
            {
                match self.layers.remove(&o.layer) {
                    Ok(()) => {
                        log::info!("gc: removed orphan layer {}", o.layer);
                        o.outcome = Some("removed".into());
                        progressed = true;
                    }
                    Err(lcfs_fsfront::LayerError::Engine(lcfs_engine::Error::HasChildren {
                        ..
                    })) => {}
                    Err(e) => o.outcome = Some(format!("error: {e}")),
                }
            }
            if !progressed {
                break;
            }
        }
        for o in orphans
            .iter_mut()
            .filter(|o| o.past_grace && o.outcome.is_none())
        {
            o.outcome = Some("kept: it has children".into());
        }
        let _ = self.catalog.engine.sync();
    }
}

/// How often the periodic collector looks at the device's use.
pub const POLL: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, created: i64, last_start: Option<i64>, containers: u64) -> Image {
        Image {
            name: name.into(),
            owner: Some("docker".into()),
            id: Some(format!("sha256:{name}")),
            top_layer: name.into(),
            created: format!("t{created}"),
            created_seconds: created,
            starts: last_start.is_some() as u64,
            last_start: last_start.map(|t| format!("t{t}")),
            last_start_seconds: last_start.unwrap_or(0),
            containers,
            ..Image::default()
        }
    }

    #[test]
    fn policies_parse_or_name_the_bad_key() {
        assert_eq!(Policy::parse("").unwrap(), Policy::default());
        // The example in packaging/ is the defaults, written out.
        assert_eq!(
            Policy::parse(include_str!("../../packaging/gc.toml")).unwrap(),
            Policy::default()
        );
        let p = Policy::parse(
            "high_watermark_percent = 60\nlow_watermark_percent = 40\nkeep = [\"busybox:*\"]\n",
        )
        .unwrap();
        assert_eq!(
            (p.high_watermark_percent, p.low_watermark_percent),
            (60, 40)
        );
        for (text, key) in [
            ("hihg_watermark_percent = 60", "hihg_watermark_percent"),
            ("low_watermark_percent = 90", "low_watermark_percent"),
            ("min_age_seconds = -5", "-5"),
            ("high_watermark_percent = 101", "high_watermark_percent"),
            ("interval_seconds = 0", "interval_seconds"),
            ("keep = [\"\"]", "keep"),
            ("enabled = \"yes\"", "yes"),
        ] {
            let e = Policy::parse(text).unwrap_err();
            assert!(e.contains(key), "{text:?}: {e}");
        }
    }

    #[test]
    fn globs_match_names() {
        assert!(glob("busybox:*", "busybox:1.36"));
        assert!(glob("*", ""));
        assert!(glob("docker.io/*/debian:?2", "docker.io/library/debian:12"));
        assert!(!glob("busybox:*", "debian:12"));
        assert!(!glob("a?c", "abbc"));
        assert!(glob("*a*b*c*", "xxaxxbxxcxx"));
    }

    #[test]
    fn plans_remove_least_recently_used_unused_images_until_below_low() {
        let images = vec![
            image("old", 1000, Some(2000), 0),
            image("older", 1000, Some(1500), 0),
            image("never-run", 1100, None, 0),
            image("in-use", 900, Some(1200), 1),
            image("young", 9990, None, 0),
            image("kept:1", 900, None, 0),
        ];
        let bytes = |n: &str, b: u64| (b, vec![n.to_string()]);
        let layers = vec![
            bytes("old", 10),
            bytes("older", 10),
            bytes("never-run", 10),
            bytes("in-use", 10),
            (50, vec!["old".into(), "older".into()]),
        ];
        let policy = Policy {
            keep: vec!["kept:*".into()],
            min_age_seconds: 100,
            ..Policy::default()
        };
        // 91 of 100 in use: above 85, down to 80 takes two removals.
        let (remove, keep) = plan(&images, &layers, 91, 100, &policy, 10_000);
        let names: Vec<&str> = remove.iter().map(|e| e.image.as_str()).collect();
        assert_eq!(names, ["never-run", "older"], "least recently used first");
        assert!(remove.iter().all(|e| e.reason == Some(Reason::Space)));
        let why = |n: &str| keep.iter().find(|e| e.image == n).unwrap().keep.unwrap();
        assert_eq!(why("in-use"), Keep::InUse);
        assert_eq!(why("young"), Keep::TooYoung);
        assert_eq!(why("kept:1"), Keep::Kept);
        assert_eq!(why("old"), Keep::NotNeeded);
        // Below the high watermark nothing goes, unless unused too long.
        let (remove, _) = plan(&images, &layers, 50, 100, &policy, 10_000);
        assert!(remove.is_empty());
        let unused = Policy {
            max_unused_age_seconds: 8_200,
            ..policy
        };
        let (remove, _) = plan(&images, &layers, 50, 100, &unused, 10_000);
        // Unused for 8,900 s and 8,500 s; "old" only 8,000.
        let names: Vec<&str> = remove.iter().map(|e| e.image.as_str()).collect();
        assert_eq!(names, ["never-run", "older"]);
        assert!(remove.iter().all(|e| e.reason == Some(Reason::Unused)));
    }
}
