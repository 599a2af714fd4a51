//! image_tops against a real containerd whose images were pulled with the
//! lcfs snapshotter: every chain id it computes is a committed snapshot
//! containerd knows (Stat through containerd's own snapshots service), and
//! the lcfs snapshotter holds it under containerd's `<namespace>/<n>/<chain
//! id>` name, which Table::committed_layer_for relies on.
//!
//! Needs a running containerd and lcfs daemon (root): ignored by a plain
//! `cargo test`. Not yet part of scripts/e2e/containerd.sh; there it fits
//! after part a's `ctr images pull --snapshotter lcfs`, as
//!
//! ```text
//! LCFS_E2E_CONTAINERD_ADDRESS=$CONTAINERD_ADDRESS \
//! LCFS_E2E_SNAPSHOTTER_SOCKET=$LCFS_CONTAINERD_SOCKET \
//! LCFS_E2E_NAMESPACE=$CTRD_NAMESPACE \
//!     cargo test -p lcfs-snapshotter \
//!     --test containerd_images_against_a_real_containerd -- --ignored
//! ```
//!
//! LCFS_E2E_NAMESPACE is optional (every namespace when unset); the
//! snapshotter name containerd knows lcfs by is LCFS_E2E_SNAPSHOTTER
//! (default "lcfs").

mod common;

use lcfs_snapshotter::api::snapshots::snapshots_client::SnapshotsClient;
use lcfs_snapshotter::api::snapshots::{Kind, StatSnapshotRequest};
use lcfs_snapshotter::image_tops;
use std::path::PathBuf;
use tonic::Request;

fn required(name: &str) -> PathBuf {
    match std::env::var_os(name) {
        Some(v) => PathBuf::from(v),
        None => panic!("{name} is not set (see this file's first lines)"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real containerd and lcfs daemon: see the file's doc"]
async fn chain_ids_are_the_committed_lcfs_snapshots_of_each_image() {
    let containerd = required("LCFS_E2E_CONTAINERD_ADDRESS");
    let snapshotter_socket = required("LCFS_E2E_SNAPSHOTTER_SOCKET");
    let namespaces: Vec<String> = std::env::var("LCFS_E2E_NAMESPACE").into_iter().collect();
    let snapshotter = std::env::var("LCFS_E2E_SNAPSHOTTER").unwrap_or_else(|_| "lcfs".into());

    let tops = image_tops(&containerd, &namespaces)
        .await
        .expect("image_tops");
    assert!(
        !tops.is_empty(),
        "containerd lists no image this platform has pulled"
    );
    let mut through_containerd = SnapshotsClient::new(common::channel(&containerd).await);
    let mut lcfs = common::connect(&snapshotter_socket).await;
    let keys: Vec<String> = common::list(&mut lcfs, &[])
        .await
        .expect("listing lcfs's snapshots")
        .into_iter()
        .filter(|i| i.kind == Kind::Committed as i32)
        .map(|i| i.name)
        .collect();
    let mut matched = 0;
    for top in &tops {
        let mut stat = Request::new(StatSnapshotRequest {
            snapshotter: snapshotter.clone(),
            key: top.chain_id.clone(),
        });
        stat.metadata_mut()
            .insert("containerd-namespace", top.namespace.parse().unwrap());
        match through_containerd.stat(stat).await {
            Ok(info) => {
                let info = info.into_inner().info.expect("info");
                assert_eq!(info.kind, Kind::Committed as i32, "{top:?}");
            }
            // Pulled with another snapshotter (the e2e run's overlayfs
            // references): not ours.
            Err(status) if status.code() == tonic::Code::NotFound => {
                eprintln!(
                    "not an {snapshotter} image: {} ({})",
                    top.name, top.namespace
                );
                continue;
            }
            Err(status) => panic!("stat {top:?}: {status}"),
        }
        let prefix = format!("{}/", top.namespace);
        let suffix = format!("/{}", top.chain_id);
        let held = keys.iter().any(|k| {
            k.strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix(&suffix))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        });
        assert!(
            held,
            "{top:?}: no lcfs snapshot named {prefix}<n>{suffix} among {keys:?}"
        );
        eprintln!("{} ({}): {}", top.name, top.namespace, top.chain_id);
        matched += 1;
    }
    assert!(
        matched > 0,
        "no image of {tops:?} is an {snapshotter} image"
    );
}
