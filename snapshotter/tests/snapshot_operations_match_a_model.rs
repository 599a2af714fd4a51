//! Random Prepare/View/Commit/Remove/Update/Stat/Cleanup sequences over the
//! socket against a model of containerd's snapshot semantics (a BTreeMap):
//! every answer, success or error code, is the model's; crashes that keep
//! only what reached the device are injected, and after each the
//! snapshotter's table is the model's. Replay with LCFS_SEED=<seed>.

mod common;

use common::*;
use lcfs_engine::device::{Device, FaultConfig, FaultyDevice};
use lcfs_engine::{Engine, FormatOptions};
use lcfs_snapshotter::api::snapshots::Kind;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tonic::Code;

#[derive(Clone, Debug, PartialEq)]
struct Snap {
    kind: Kind,
    parent: String,
    labels: HashMap<String, String>,
}

type Model = BTreeMap<String, Snap>;

const KEYS: &[&str] = &[
    "a",
    "b",
    "c",
    "d",
    "ns/1/e",
    "ns/2/f g",
    "..",
    "/etc",
    "x\0y",
    "k8s.io/7/sha256:0123",
];

fn outcome<T>(r: Result<T, tonic::Status>) -> Result<T, Code> {
    r.map_err(|s| s.code())
}

fn expect_create(m: &Model, key: &str, parent: &str) -> Result<(), Code> {
    if !parent.is_empty() {
        match m.get(parent) {
            None => return Err(Code::NotFound),
            Some(p) if p.kind != Kind::Committed => return Err(Code::InvalidArgument),
            _ => {}
        }
    }
    if m.contains_key(key) {
        return Err(Code::AlreadyExists);
    }
    Ok(())
}

async fn check_table(c: &mut Client, m: &Model) {
    let listed = list(c, &[]).await.unwrap();
    let got: Model = listed
        .into_iter()
        .map(|i| {
            let k = kind(&i);
            (
                i.name,
                Snap {
                    kind: k,
                    parent: i.parent,
                    labels: i.labels,
                },
            )
        })
        .collect();
    assert_eq!(&got, m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_operations_match_the_model_across_crashes() {
    let seed: u64 = std::env::var("LCFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("snapshot model: LCFS_SEED={seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut faulty = Arc::new(FaultyDevice::new(128 << 20, FaultConfig::default()));
    let dev: Arc<dyn Device> = faulty.clone();
    Engine::format(dev.clone(), &FormatOptions::default()).unwrap();
    let mut e = Engine::open(dev, quiet()).unwrap();
    let mut served = serve_mem(dir.path(), e.clone());
    let mut c = connect(&served.socket).await;
    let mut m = Model::new();

    for step in 0..2000 {
        let key = KEYS[rng.gen_range(0..KEYS.len())];
        let other = KEYS[rng.gen_range(0..KEYS.len())];
        let op = rng.gen_range(0..100);
        let context = format!("LCFS_SEED={seed} step {step} op {op} key {key:?} other {other:?}");
        match op {
            0..=34 => {
                let parent = if rng.gen_bool(0.3) { "" } else { other };
                let kind = if op < 25 { Kind::Active } else { Kind::View };
                let l = labels(&[("n", &step.to_string())]);
                let want = expect_create(&m, key, parent);
                let got = match kind {
                    Kind::Active => outcome(prepare_with(&mut c, key, parent, l.clone()).await),
                    _ => outcome(
                        c.view(lcfs_snapshotter::api::snapshots::ViewSnapshotRequest {
                            snapshotter: "lcfs".into(),
                            key: key.into(),
                            parent: parent.into(),
                            labels: l.clone(),
                        })
                        .await
                        .map(|r| r.into_inner().mounts),
                    ),
                };
                assert_eq!(got.as_ref().map(|_| ()).map_err(|c| *c), want, "{context}");
                if let Ok(mounts) = got {
                    bind_source(&mounts, kind == Kind::View);
                    m.insert(
                        key.into(),
                        Snap {
                            kind,
                            parent: parent.into(),
                            labels: l,
                        },
                    );
                }
            }
            35..=54 => {
                let l = labels(&[("committed", &step.to_string())]);
                let want = if m.contains_key(other) {
                    Err(Code::AlreadyExists)
                } else {
                    match m.get(key) {
                        None => Err(Code::NotFound),
                        Some(s) if s.kind != Kind::Active => Err(Code::FailedPrecondition),
                        Some(_) => Ok(()),
                    }
                };
                let got = outcome(commit_with(&mut c, other, key, l.clone()).await);
                assert_eq!(got, want, "{context}");
                if got.is_ok() {
                    let mut s = m.remove(key).unwrap();
                    s.kind = Kind::Committed;
                    s.labels = l;
                    m.insert(other.into(), s);
                }
            }
            55..=74 => {
                let want = match m.get(key) {
                    None => Err(Code::NotFound),
                    Some(_) if m.values().any(|s| s.parent == key) => Err(Code::FailedPrecondition),
                    Some(_) => Ok(()),
                };
                let got = outcome(remove(&mut c, key).await);
                assert_eq!(got, want, "{context}");
                if got.is_ok() {
                    m.remove(key);
                }
            }
            75..=84 => {
                let got = outcome(stat(&mut c, key).await);
                match m.get(key) {
                    None => assert_eq!(got.map(|_| ()), Err(Code::NotFound), "{context}"),
                    Some(s) => {
                        let i = got.unwrap();
                        assert_eq!(
                            (kind(&i), &i.parent, &i.labels),
                            (s.kind, &s.parent, &s.labels),
                            "{context}"
                        );
                    }
                }
                let got = outcome(mounts(&mut c, key).await);
                let want = match m.get(key) {
                    None => Err(Code::NotFound),
                    Some(s) if s.kind == Kind::Committed => Err(Code::FailedPrecondition),
                    Some(_) => Ok(()),
                };
                assert_eq!(got.map(|_| ()), want, "{context}");
            }
            85..=94 => {
                let mut info = lcfs_snapshotter::api::snapshots::Info {
                    name: key.into(),
                    ..Default::default()
                };
                info.labels = labels(&[("u", &step.to_string())]);
                let path = if rng.gen_bool(0.5) {
                    "labels"
                } else {
                    "labels.u"
                };
                let got = outcome(update(&mut c, info, &[path]).await);
                match m.get_mut(key) {
                    None => assert_eq!(got.map(|_| ()), Err(Code::NotFound), "{context}"),
                    Some(s) => {
                        if path == "labels" {
                            s.labels = labels(&[("u", &step.to_string())]);
                        } else {
                            s.labels.insert("u".into(), step.to_string());
                        }
                        assert_eq!(got.unwrap().labels, s.labels, "{context}");
                    }
                }
            }
            95..=97 => cleanup(&mut c).await.unwrap(),
            _ => {
                // kill -9 and restart: the table is the model's.
                served.shutdown();
                e.crash();
                drop(e);
                let image = faulty.crash_image();
                faulty = Arc::new(FaultyDevice::from_image(image, FaultConfig::default()));
                let dev: Arc<dyn Device> = faulty.clone();
                e = Engine::open(dev, quiet()).unwrap();
                served = serve_mem(dir.path(), e.clone());
                c = connect(&served.socket).await;
                check_table(&mut c, &m).await;
            }
        }
    }
    check_table(&mut c, &m).await;
    cleanup(&mut c).await.unwrap();
    assert_eq!(
        e.fsck(true).unwrap().errors,
        Vec::<String>::new(),
        "LCFS_SEED={seed}"
    );
}
