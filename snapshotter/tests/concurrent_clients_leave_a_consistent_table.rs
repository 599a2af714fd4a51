//! Many tokio tasks, each on its own connection to one snapshotter over the
//! real unix socket, run seeded Prepare/View/Commit/Remove/Stat/Mounts/List
//! sequences at once (on their own keys, on shared committed bases, and
//! racing on a few shared keys); afterwards List is exactly what the tasks
//! believe exists, every snapshot's layer and its parent are right, removing
//! everything and Cleanup frees every layer, and fsck is clean. Replay with
//! LCFS_SEED=<seed> (the interleaving itself is not replayed).

mod common;

use common::*;
use lcfs_snapshotter::api::snapshots::Kind;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use tonic::Code;

const TASKS: u64 = 16;
const OPS: usize = 50;
const BASES: usize = 3;
const SHARED: usize = 4;

#[derive(Clone, Debug, PartialEq)]
struct Snap {
    kind: Kind,
    parent: String,
    /// The engine layer behind it, from its Mounts answer.
    layer: String,
}

/// What one task believes: its own snapshots, and how many of its Prepares
/// and Removes of each shared key succeeded.
#[derive(Default)]
struct Belief {
    own: BTreeMap<String, Snap>,
    removed: Vec<String>,
    shared_prepared: [u64; SHARED],
    shared_removed: [u64; SHARED],
}

fn shared_key(i: usize) -> String {
    format!("shared/{i}")
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, v: &'a [T]) -> Option<&'a T> {
    (!v.is_empty()).then(|| &v[rng.gen_range(0..v.len())])
}

/// One task's sequence. Only this task touches keys under `t<id>/`, so every
/// answer about them is known in advance; shared keys race.
async fn run_task(
    id: u64,
    seed: u64,
    socket: std::path::PathBuf,
    bases: BTreeMap<String, Snap>,
) -> Belief {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (id + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut c = connect(&socket).await;
    let mut b = Belief::default();
    let mut fresh = 0u32;
    for step in 0..OPS {
        let op = rng.gen_range(0..100);
        let ctx = format!("LCFS_SEED={seed} task {id} step {step} op {op}");
        let committed: Vec<String> = b
            .own
            .iter()
            .filter(|(_, s)| s.kind == Kind::Committed)
            .map(|(k, _)| k.clone())
            .chain(bases.keys().cloned())
            .collect();
        let actives: Vec<String> = b
            .own
            .iter()
            .filter(|(_, s)| s.kind == Kind::Active)
            .map(|(k, _)| k.clone())
            .collect();
        let own: Vec<String> = b.own.keys().cloned().collect();
        let has_children = |b: &Belief, k: &str| b.own.values().any(|s| s.parent == k);
        match op {
            // Prepare or View on "", a base, or one of ours.
            0..=29 => {
                fresh += 1;
                let key = format!("t{id}/s{fresh}");
                let parent = if rng.gen_bool(0.2) {
                    String::new()
                } else {
                    pick(&mut rng, &committed).cloned().unwrap_or_default()
                };
                let is_view = !parent.is_empty() && op >= 22;
                let m = if is_view {
                    view(&mut c, &key, &parent).await
                } else {
                    prepare(&mut c, &key, &parent).await
                }
                .unwrap_or_else(|s| panic!("{ctx}: create {key:?} on {parent:?}: {s:?}"));
                let layer = layer_of(&bind_source(&m, is_view));
                let kind = if is_view { Kind::View } else { Kind::Active };
                b.own.insert(
                    key,
                    Snap {
                        kind,
                        parent,
                        layer,
                    },
                );
                // The same key again is refused, whatever else runs.
                let again = prepare(&mut c, &format!("t{id}/s{fresh}"), "").await;
                assert_code(again, Code::AlreadyExists);
            }
            30..=44 => {
                let Some(key) = pick(&mut rng, &actives).cloned() else {
                    continue;
                };
                fresh += 1;
                let name = format!("t{id}/c{fresh}");
                commit(&mut c, &name, &key)
                    .await
                    .unwrap_or_else(|s| panic!("{ctx}: commit {key:?} as {name:?}: {s:?}"));
                let mut s = b.own.remove(&key).unwrap();
                s.kind = Kind::Committed;
                b.own.insert(name, s);
                b.removed.push(key);
            }
            45..=59 => {
                let Some(key) = pick(&mut rng, &own).cloned() else {
                    continue;
                };
                let got = remove(&mut c, &key).await;
                if has_children(&b, &key) {
                    assert_code(got, Code::FailedPrecondition);
                } else {
                    got.unwrap_or_else(|s| panic!("{ctx}: remove {key:?}: {s:?}"));
                    b.own.remove(&key);
                    b.removed.push(key);
                }
            }
            60..=69 => {
                if let Some(key) = pick(&mut rng, &own).cloned() {
                    let s = &b.own[&key];
                    let i = stat(&mut c, &key)
                        .await
                        .unwrap_or_else(|e| panic!("{ctx}: stat {key:?}: {e:?}"));
                    assert_eq!((kind(&i), &i.parent), (s.kind, &s.parent), "{ctx} {key:?}");
                    let m = mounts(&mut c, &key).await;
                    if s.kind == Kind::Committed {
                        assert_code(m, Code::FailedPrecondition);
                    } else {
                        let m = m.unwrap_or_else(|e| panic!("{ctx}: mounts {key:?}: {e:?}"));
                        assert_eq!(layer_of(&bind_source(&m, s.kind == Kind::View)), s.layer);
                    }
                }
                if let Some(key) = pick(&mut rng, &b.removed).cloned() {
                    assert_code(stat(&mut c, &key).await, Code::NotFound);
                }
            }
            70..=79 => {
                let all: BTreeMap<String, (Kind, String)> = list(&mut c, &[])
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: list: {e:?}"))
                    .into_iter()
                    .map(|i| (i.name.clone(), (kind(&i), i.parent)))
                    .collect();
                for (k, s) in &b.own {
                    assert_eq!(all.get(k), Some(&(s.kind, s.parent.clone())), "{ctx} {k:?}");
                }
                for k in &b.removed {
                    assert!(!all.contains_key(k), "{ctx}: removed {k:?} listed");
                }
                for k in bases.keys() {
                    assert_eq!(all.get(k).map(|v| v.0), Some(Kind::Committed), "{ctx}");
                }
            }
            // Races on the shared keys: exactly one of concurrent Prepares
            // wins, and a Remove finds it or not.
            _ => {
                let i = rng.gen_range(0..SHARED);
                let key = shared_key(i);
                if rng.gen_bool(0.5) {
                    match prepare(&mut c, &key, "").await {
                        Ok(m) => {
                            bind_source(&m, false);
                            b.shared_prepared[i] += 1;
                        }
                        Err(s) => assert_eq!(s.code(), Code::AlreadyExists, "{ctx}: {s:?}"),
                    }
                } else {
                    match remove(&mut c, &key).await {
                        Ok(()) => b.shared_removed[i] += 1,
                        Err(s) => assert_eq!(s.code(), Code::NotFound, "{ctx}: {s:?}"),
                    }
                }
            }
        }
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_leave_a_consistent_table() {
    let seed: u64 = std::env::var("LCFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("concurrent clients: LCFS_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let (_dev, e) = mem_engine();
    let layers_before: BTreeSet<String> = e.list_layers().into_iter().map(|l| l.name).collect();
    let served = serve_mem(dir.path(), e.clone());
    let mut c = connect(&served.socket).await;

    // Committed bases every task builds on.
    let mut bases = BTreeMap::new();
    for i in 0..BASES {
        let key = format!("base/{i}-active");
        let m = prepare(&mut c, &key, "").await.unwrap();
        let layer = layer_of(&bind_source(&m, false));
        let name = format!("base/{i}");
        commit(&mut c, &name, &key).await.unwrap();
        bases.insert(
            name,
            Snap {
                kind: Kind::Committed,
                parent: String::new(),
                layer,
            },
        );
    }

    let tasks: Vec<_> = (0..TASKS)
        .map(|id| tokio::spawn(run_task(id, seed, served.socket.clone(), bases.clone())))
        .collect();
    let mut beliefs = Vec::new();
    for t in tasks {
        match t.await {
            Ok(b) => beliefs.push(b),
            Err(err) => panic!("LCFS_SEED={seed}: a task failed: {err}"),
        }
    }

    // What the tasks believe exists, and what List says.
    let mut want: BTreeMap<String, Snap> = bases.clone();
    for b in &beliefs {
        for (k, s) in &b.own {
            assert!(want.insert(k.clone(), s.clone()).is_none(), "{k:?} twice");
        }
    }
    let mut shared_left = BTreeSet::new();
    for i in 0..SHARED {
        let prepared: u64 = beliefs.iter().map(|b| b.shared_prepared[i]).sum();
        let removed: u64 = beliefs.iter().map(|b| b.shared_removed[i]).sum();
        // Prepares and Removes of one key alternate: never two lives at once.
        assert!(
            prepared == removed || prepared == removed + 1,
            "LCFS_SEED={seed}: {} prepared {prepared} times, removed {removed}",
            shared_key(i)
        );
        if prepared > removed {
            shared_left.insert(shared_key(i));
        }
    }
    let listed: BTreeMap<String, (Kind, String)> = list(&mut c, &[])
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.name.clone(), (kind(&i), i.parent)))
        .collect();
    let mut expected: BTreeMap<String, (Kind, String)> = want
        .iter()
        .map(|(k, s)| (k.clone(), (s.kind, s.parent.clone())))
        .collect();
    for k in &shared_left {
        expected.insert(k.clone(), (Kind::Active, String::new()));
        let m = mounts(&mut c, k).await.unwrap();
        let layer = layer_of(&bind_source(&m, false));
        want.insert(
            k.clone(),
            Snap {
                kind: Kind::Active,
                parent: String::new(),
                layer,
            },
        );
    }
    assert_eq!(listed, expected, "LCFS_SEED={seed}");
    let won: u64 = beliefs
        .iter()
        .map(|b| b.shared_prepared.iter().sum::<u64>())
        .sum();
    println!(
        "{} snapshots left by {TASKS} tasks; {won} racing Prepares of {SHARED} shared keys won",
        listed.len()
    );

    // Each snapshot has its own layer, frozen unless active, whose parent is
    // its parent snapshot's layer; after Cleanup no other snapshot layer is
    // left.
    cleanup(&mut c).await.unwrap();
    let layers: BTreeMap<String, lcfs_engine::LayerInfo> = e
        .list_layers()
        .into_iter()
        .map(|l| (l.name.clone(), l))
        .collect();
    let mut seen = BTreeSet::new();
    for (k, s) in &want {
        assert!(
            seen.insert(s.layer.clone()),
            "{k:?}: layer {} shared",
            s.layer
        );
        let l = layers
            .get(&s.layer)
            .unwrap_or_else(|| panic!("LCFS_SEED={seed}: {k:?}: no layer {}", s.layer));
        assert_eq!(l.frozen, s.kind != Kind::Active, "LCFS_SEED={seed}: {k:?}");
        let parent_layer = (!s.parent.is_empty()).then(|| want[&s.parent].layer.clone());
        assert_eq!(l.parent, parent_layer, "LCFS_SEED={seed}: {k:?}");
    }
    let snapshot_layers: BTreeSet<String> = layers
        .keys()
        .filter(|n| !layers_before.contains(*n))
        .cloned()
        .collect();
    assert_eq!(snapshot_layers, seen, "LCFS_SEED={seed}: leaked layers");

    // Remove everything, children first, then Cleanup: no layer is left.
    while !want.is_empty() {
        let leaves: Vec<String> = want
            .keys()
            .filter(|k| !want.values().any(|s| &s.parent == *k))
            .cloned()
            .collect();
        assert!(!leaves.is_empty());
        for k in leaves {
            remove(&mut c, &k).await.unwrap();
            want.remove(&k);
        }
    }
    assert_eq!(list(&mut c, &[]).await.unwrap(), vec![]);
    cleanup(&mut c).await.unwrap();
    let layers_after: BTreeSet<String> = e.list_layers().into_iter().map(|l| l.name).collect();
    assert_eq!(
        layers_after, layers_before,
        "LCFS_SEED={seed}: leaked layers"
    );
    assert_eq!(
        e.fsck(true).unwrap().errors,
        Vec::<String>::new(),
        "LCFS_SEED={seed}"
    );
}
