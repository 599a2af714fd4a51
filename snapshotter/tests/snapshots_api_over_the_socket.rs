//! The snapshots gRPC API over the unix socket against a real engine (in
//! memory): the lifecycle containerd drives, the error code of every
//! refusal, hostile keys and labels, List filters and batching, Usage from
//! the engine's counters, deferred freeing in Cleanup, the socket's modes.

mod common;

use common::*;
use lcfs_engine::{Engine, ROOT_INODE};
use lcfs_snapshotter::api::snapshots::Kind;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use tonic::Code;

fn write_file(e: &Engine, layer: &str, name: &str, bytes: usize) {
    let id = e.layer_id(layer).unwrap();
    let a = e
        .create(id, ROOT_INODE, name.as_bytes(), 0o644, 0, 0)
        .unwrap();
    e.write(id, a.inode, 0, &vec![0x5a; bytes]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_prepare_write_commit_child_view_remove_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, e) = mem_engine();
    let served = serve_mem(dir.path(), e.clone());
    let mut c = connect(&served.socket).await;

    // Prepare a base active snapshot, as containerd's unpacker does.
    let key = "k8s.io/1/extract-1 sha256:aaa";
    let m = prepare_with(
        &mut c,
        key,
        "",
        labels(&[("containerd.io/snapshot.ref", "sha256:aaa")]),
    )
    .await
    .unwrap();
    let src = bind_source(&m, false);
    assert_eq!(src.parent().unwrap(), served.mountpoint);
    let base_layer = layer_of(&src);
    assert!(base_layer.starts_with("containerd-"));
    assert!(
        e.layer_info(&base_layer).unwrap().cold,
        "unpack targets go cold"
    );
    assert_eq!(mounts(&mut c, key).await.unwrap(), m);
    let i = stat(&mut c, key).await.unwrap();
    assert_eq!(
        (i.name.as_str(), kind(&i), i.parent.as_str()),
        (key, Kind::Active, "")
    );
    assert_eq!(i.created_at, i.updated_at);

    // Write, commit: the same layer, frozen.
    write_file(&e, &base_layer, "foo", 3 * 4096);
    let u = usage(&mut c, key).await.unwrap();
    assert!(u.size >= 3 * 4096, "usage counts written data: {u:?}");
    assert_eq!(u.inodes, 2, "root and foo");
    let name = "k8s.io/2/sha256:aaa";
    commit_with(&mut c, name, key, labels(&[("containerd.io/gc.root", "x")]))
        .await
        .unwrap();
    assert!(e.layer_info(&base_layer).unwrap().frozen);
    assert_code(stat(&mut c, key).await, Code::NotFound);
    let ci = stat(&mut c, name).await.unwrap();
    assert_eq!(kind(&ci), Kind::Committed);
    assert_eq!(
        ci.labels,
        labels(&[("containerd.io/gc.root", "x")]),
        "labels replaced"
    );
    assert_eq!(usage(&mut c, name).await.unwrap(), u, "commit keeps usage");
    assert_code(mounts(&mut c, name).await, Code::FailedPrecondition);

    // A child: an O(1) clone of the committed layer, seeing its files.
    let child = "k8s.io/3/container-1";
    let m = prepare(&mut c, child, name).await.unwrap();
    let child_layer = layer_of(&bind_source(&m, false));
    let info = e.layer_info(&child_layer).unwrap();
    assert_eq!(info.parent.as_deref(), Some(base_layer.as_str()));
    assert!(!info.frozen && !info.cold);
    let cid = e.layer_id(&child_layer).unwrap();
    assert_eq!(e.lookup(cid, ROOT_INODE, b"foo").unwrap().size, 3 * 4096);
    assert_eq!(
        usage(&mut c, child).await.unwrap().size,
        0,
        "a clone owns nothing"
    );
    assert_eq!(stat(&mut c, child).await.unwrap().parent, name);

    // A view: read-only mount of a frozen clone.
    let v = view(&mut c, "k8s.io/4/view", name).await.unwrap();
    let view_layer = layer_of(&bind_source(&v, true));
    assert!(e.layer_info(&view_layer).unwrap().frozen);
    assert_eq!(mounts(&mut c, "k8s.io/4/view").await.unwrap(), v);
    assert_eq!(
        kind(&stat(&mut c, "k8s.io/4/view").await.unwrap()),
        Kind::View
    );

    // List sees all three.
    let all = list(&mut c, &[]).await.unwrap();
    let names: Vec<&str> = all.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "k8s.io/2/sha256:aaa",
            "k8s.io/3/container-1",
            "k8s.io/4/view"
        ]
    );
    for i in &all {
        assert_eq!(
            i,
            &stat(&mut c, &i.name).await.unwrap(),
            "walk and stat agree"
        );
    }

    // Remove order: the parent only after its children.
    assert_code(remove(&mut c, name).await, Code::FailedPrecondition);
    remove(&mut c, child).await.unwrap();
    assert_code(remove(&mut c, name).await, Code::FailedPrecondition);
    remove(&mut c, "k8s.io/4/view").await.unwrap();
    remove(&mut c, name).await.unwrap();
    assert!(list(&mut c, &[]).await.unwrap().is_empty());
    // Removal is deferred: the layers are still there until Cleanup.
    assert!(e.layer_info(&base_layer).is_ok());
    assert_eq!(
        served.server.as_ref().unwrap().table().pending_removals(),
        3
    );
    cleanup(&mut c).await.unwrap();
    assert_eq!(
        served.server.as_ref().unwrap().table().pending_removals(),
        0
    );
    for l in [&base_layer, &child_layer, &view_layer] {
        assert!(e.layer_info(l).is_err(), "{l} freed");
    }
    // Keys can be used again after removal.
    prepare(&mut c, key, "").await.unwrap();
    commit(&mut c, name, key).await.unwrap();
    assert_eq!(e.fsck(true).unwrap().errors, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_the_errdefs_code() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, e) = mem_engine();
    let served = serve_mem(dir.path(), e.clone());
    let mut c = connect(&served.socket).await;

    prepare(&mut c, "a", "").await.unwrap();
    // Same key again (Prepare and View): AlreadyExists.
    assert_code(prepare(&mut c, "a", "").await, Code::AlreadyExists);
    assert_code(view(&mut c, "a", "").await, Code::AlreadyExists);
    // Parent missing: NotFound. Parent not committed: InvalidArgument.
    assert_code(prepare(&mut c, "b", "missing").await, Code::NotFound);
    assert_code(prepare(&mut c, "b", "a").await, Code::InvalidArgument);
    assert_code(view(&mut c, "b", "a").await, Code::InvalidArgument);
    // Unknown keys: NotFound everywhere.
    assert_code(stat(&mut c, "nope").await, Code::NotFound);
    assert_code(mounts(&mut c, "nope").await, Code::NotFound);
    assert_code(usage(&mut c, "nope").await, Code::NotFound);
    assert_code(remove(&mut c, "nope").await, Code::NotFound);
    assert_code(commit(&mut c, "x", "nope").await, Code::NotFound);
    let mut ghost = stat(&mut c, "a").await.unwrap();
    ghost.name = "nope".into();
    assert_code(update(&mut c, ghost, &[]).await, Code::NotFound);
    // Commit: to a name that exists (a key or a committed name):
    // AlreadyExists, checked first as containerd's metastore does.
    prepare(&mut c, "c", "").await.unwrap();
    assert_code(commit(&mut c, "c", "a").await, Code::AlreadyExists);
    commit(&mut c, "committed", "a").await.unwrap();
    assert_code(commit(&mut c, "committed", "c").await, Code::AlreadyExists);
    assert_code(
        commit(&mut c, "committed", "nope").await,
        Code::AlreadyExists,
    );
    // Commit of a view or of a committed snapshot: FailedPrecondition.
    view(&mut c, "v", "committed").await.unwrap();
    assert_code(
        commit(&mut c, "from-view", "v").await,
        Code::FailedPrecondition,
    );
    assert_code(
        commit(&mut c, "again", "committed").await,
        Code::FailedPrecondition,
    );
    // Prepare of a name that is committed: same namespace.
    assert_code(prepare(&mut c, "committed", "").await, Code::AlreadyExists);
    // Remove with children: FailedPrecondition.
    assert_code(remove(&mut c, "committed").await, Code::FailedPrecondition);
    // Mounts of a committed snapshot: FailedPrecondition.
    assert_code(mounts(&mut c, "committed").await, Code::FailedPrecondition);
    // Update of an immutable field: InvalidArgument.
    let i = stat(&mut c, "c").await.unwrap();
    for path in ["parent", "name", "kind", "created_at", "labelsx"] {
        assert_code(
            update(&mut c, i.clone(), &[path]).await,
            Code::InvalidArgument,
        );
    }
    // Empty key, name: InvalidArgument.
    assert_code(prepare(&mut c, "", "").await, Code::InvalidArgument);
    assert_code(commit(&mut c, "", "c").await, Code::InvalidArgument);
    // A bad filter: InvalidArgument.
    assert_code(
        list(&mut c, &["labels.\"open"]).await,
        Code::InvalidArgument,
    );
    // Commit onto another parent (containerd 2.1 rebase): Unimplemented.
    let r = c
        .commit(lcfs_snapshotter::api::snapshots::CommitSnapshotRequest {
            snapshotter: "lcfs".into(),
            name: "rebased".into(),
            key: "c".into(),
            labels: Default::default(),
            parent: "committed".into(),
        })
        .await;
    assert_code(r, Code::Unimplemented);
    // Nothing refused changed anything.
    let names: Vec<String> = list(&mut c, &[])
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, vec!["c", "committed", "v"]);
    assert_eq!(e.fsck(false).unwrap().errors, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_and_labels_are_bounded_and_never_paths() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, e) = mem_engine();
    let served = serve_mem(dir.path(), e.clone());
    let mut c = connect(&served.socket).await;

    let long = "k".repeat(lcfs_snapshotter::KEY_MAX_BYTES);
    let hostile = [
        "..",
        ".",
        "/",
        "../../etc",
        "/etc/passwd",
        "a/../../b",
        "nul\0inside",
        "new\nline",
        "ключ/鍵",
        long.as_str(),
    ];
    for (n, key) in hostile.iter().enumerate() {
        let m = prepare(&mut c, key, "").await.unwrap();
        let src = bind_source(&m, false);
        assert_eq!(
            src.parent().unwrap(),
            served.mountpoint,
            "{key:?} stays in the mount"
        );
        assert!(layer_of(&src).starts_with("containerd-"));
        let name = if key.len() < 100 {
            format!("committed {n} {key}")
        } else {
            format!("committed {n}")
        };
        commit(&mut c, &name, key).await.unwrap();
        assert_eq!(stat(&mut c, &name).await.unwrap().name, name);
    }
    let too_long = "k".repeat(lcfs_snapshotter::KEY_MAX_BYTES + 1);
    assert_code(prepare(&mut c, &too_long, "").await, Code::InvalidArgument);
    assert_code(commit(&mut c, &too_long, "x").await, Code::InvalidArgument);

    // Labels: 4096 bytes per key and value together, like containerd.
    let ok = labels(&[("k", &"v".repeat(4095))]);
    prepare_with(&mut c, "labelled", "", ok).await.unwrap();
    let over = labels(&[("k", &"v".repeat(4096))]);
    assert_code(
        prepare_with(&mut c, "over", "", over.clone()).await,
        Code::InvalidArgument,
    );
    let mut i = stat(&mut c, "labelled").await.unwrap();
    i.labels = over;
    assert_code(update(&mut c, i.clone(), &[]).await, Code::InvalidArgument);
    // Too many, too much altogether.
    let many: std::collections::HashMap<String, String> = (0..=lcfs_snapshotter::LABELS_MAX_COUNT)
        .map(|n| (format!("l{n}"), "v".into()))
        .collect();
    assert_code(
        prepare_with(&mut c, "many", "", many).await,
        Code::InvalidArgument,
    );
    let big: std::collections::HashMap<String, String> = (0..40)
        .map(|n| (format!("l{n}"), "v".repeat(4000)))
        .collect();
    assert_code(
        prepare_with(&mut c, "big", "", big).await,
        Code::InvalidArgument,
    );
    i.labels = Default::default();
    assert_code(
        update(&mut c, i, &["labels.x"; 1100]).await,
        Code::InvalidArgument,
    );
    assert_code(stat(&mut c, "over").await, Code::NotFound);
    assert_eq!(e.fsck(false).unwrap().errors, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_list_filters_and_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, e) = mem_engine();
    let served = serve_mem(dir.path(), e.clone());
    let mut c = connect(&served.socket).await;

    prepare_with(&mut c, "a", "", labels(&[("keep", "1"), ("drop", "2")]))
        .await
        .unwrap();
    let before = stat(&mut c, "a").await.unwrap();
    let mut i = before.clone();
    i.labels = labels(&[("keep", "changed"), ("new", "3")]);
    i.parent = "ignored".into();
    let u = update(&mut c, i.clone(), &["labels.keep", "labels.drop"])
        .await
        .unwrap();
    assert_eq!(
        u.labels,
        labels(&[("keep", "changed")]),
        "set one, removed one, ignored new"
    );
    assert_eq!(u.parent, "");
    assert_eq!(u.created_at, before.created_at);
    let t = |i: &lcfs_snapshotter::api::snapshots::Info| {
        let t = i.updated_at.unwrap();
        (t.seconds, t.nanos)
    };
    assert!(t(&u) > t(&before));
    let u = update(&mut c, i.clone(), &["labels"]).await.unwrap();
    assert_eq!(u.labels, labels(&[("keep", "changed"), ("new", "3")]));
    i.labels = labels(&[("only", "this")]);
    let u = update(&mut c, i, &[]).await.unwrap();
    assert_eq!(u.labels, labels(&[("only", "this")]));
    assert_eq!(stat(&mut c, "a").await.unwrap(), u);

    commit(&mut c, "c", "a").await.unwrap();
    prepare_with(
        &mut c,
        "x/1",
        "c",
        labels(&[("containerd.io/gc.root", "t")]),
    )
    .await
    .unwrap();
    view(&mut c, "x/2", "c").await.unwrap();
    let names = |v: Vec<lcfs_snapshotter::api::snapshots::Info>| {
        v.into_iter().map(|i| i.name).collect::<Vec<_>>()
    };
    assert_eq!(names(list(&mut c, &["kind==view"]).await.unwrap()), ["x/2"]);
    assert_eq!(
        names(
            list(&mut c, &["kind==view", "kind==committed"])
                .await
                .unwrap()
        ),
        ["c", "x/2"]
    );
    assert_eq!(
        names(
            list(&mut c, &[r#"labels."containerd.io/gc.root"==t"#])
                .await
                .unwrap()
        ),
        ["x/1"]
    );
    assert_eq!(
        names(list(&mut c, &["parent==c,name~=^x/"]).await.unwrap()),
        ["x/1", "x/2"]
    );

    // Many snapshots with big labels: List streams several messages, and
    // misses none.
    let value = "v".repeat(4000);
    for n in 0..300 {
        prepare_with(
            &mut c,
            &format!("bulk/{n:03}"),
            "c",
            labels(&[("big", &value)]),
        )
        .await
        .unwrap();
    }
    let all = list(&mut c, &["name~=^bulk/"]).await.unwrap();
    assert_eq!(all.len(), 300);
    assert!(all.iter().all(|i| i.labels["big"] == value));
    drop(e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_private_and_a_second_server_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, e) = mem_engine();
    let mut served = serve_mem(dir.path(), e.clone());
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&served.socket), 0o600);
    assert_eq!(mode(served.socket.parent().unwrap()), 0o700);
    // A live socket is not taken over.
    let again = lcfs_snapshotter::serve(
        e.clone(),
        &served.mountpoint,
        Arc::new(lcfs_fsfront::NoMount),
        &served.socket,
    );
    assert!(again.is_err());
    let mut c = connect(&served.socket).await;
    prepare(&mut c, "a", "").await.unwrap();
    // Shutdown removes the socket; a stale socket file is replaced.
    served.shutdown();
    assert!(!served.socket.exists());
    drop(std::os::unix::net::UnixListener::bind(&served.socket).unwrap());
    let served = serve_mem(dir.path(), e.clone());
    let mut c = connect(&served.socket).await;
    assert_eq!(kind(&stat(&mut c, "a").await.unwrap()), Kind::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_users_are_refused_even_when_the_socket_is_opened_up() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "switches to another user: run as root"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_dev, e) = mem_engine();
    let served = serve_mem(dir.path(), e);
    // Open the directory and the socket to everyone: the peer check alone
    // must refuse the connection (closed before any HTTP/2 frame).
    std::fs::set_permissions(
        served.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&served.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    let probe = |uid: u32| {
        use std::os::unix::process::CommandExt;
        let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
    data = s.recv(64)
except (BrokenPipeError, ConnectionResetError):
    data = b""
print("served" if data else "closed")
"#;
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&served.socket)
            .uid(uid)
            .gid(uid)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(probe(65534), "closed", "nobody is refused");
    assert_eq!(probe(0), "served", "root is served");
}

/// The `containerd.io/snapshot/lcfs.size` label limits an active snapshot's
/// layer (ENOSPC past it); a bad value is InvalidArgument and makes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_label_limits_an_active_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (_dev, e) = mem_engine();
    let served = serve_mem(dir.path(), e.clone());
    let mut c = connect(&served.socket).await;
    let label = lcfs_snapshotter::LABEL_SIZE_LIMIT;
    let m = prepare_with(&mut c, "ns/1/limited", "", labels(&[(label, "1M")]))
        .await
        .unwrap();
    let layer = layer_of(&bind_source(&m, false));
    assert_eq!(e.layer_info(&layer).unwrap().quota_bytes, Some(1 << 20));
    let id = e.layer_id(&layer).unwrap();
    let f = e.create(id, ROOT_INODE, b"f", 0o644, 0, 0).unwrap();
    let err = e.write(id, f.inode, 0, &vec![1u8; 2 << 20]).unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC);
    e.write(id, f.inode, 0, &vec![1u8; 512 << 10]).unwrap();

    let before = e.list_layers().len();
    assert_code(
        prepare_with(&mut c, "ns/2/bad", "", labels(&[(label, "lots")])).await,
        Code::InvalidArgument,
    );
    assert_eq!(e.list_layers().len(), before);
}
