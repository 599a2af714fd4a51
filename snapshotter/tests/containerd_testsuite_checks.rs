//! A port of the core of containerd's snapshotter test suite
//! (`snapshots/testsuite`): Basic, StatActive, StatCommitted, Transitivity,
//! PrepareView, Update, Remove, RemoveIntermediateSnapshot,
//! DeletedFilesInChildSnapshot, MoveFileFromLowerLayer, Chown,
//! DirectoryPermissionOnCommit, ViewReadonly and StatInWalk, plus usage
//! across a commit. The snapshotter serves a real engine through a real
//! FUSE mount, and every Mounts answer is mounted as containerd does
//! (bind, then a read-only remount for views). Needs root and /dev/fuse.

mod common;

use common::*;
use lcfs_engine::Engine;
use lcfs_fsfront::{Mount as FuseMount, MountOptions, SharedMount};
use lcfs_snapshotter::api::snapshots::Kind;
use lcfs_snapshotter::api::types::Mount;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

fn require_root_and_fuse() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "mounts FUSE and bind mounts: must run as root"
    );
    assert!(Path::new("/dev/fuse").exists(), "needs /dev/fuse");
}

/// An engine, its FUSE mount, the snapshotter, a client and a work area.
struct Env {
    served: Served,
    fuse: Arc<RwLock<Option<FuseMount>>>,
    engine: Arc<Engine>,
    c: Client,
    work: PathBuf,
    dir: tempfile::TempDir,
}

impl Env {
    async fn new() -> Env {
        require_root_and_fuse();
        let dir = tempfile::tempdir().unwrap();
        let (_dev, engine) = mem_engine();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let m = lcfs_fsfront::mount(engine.clone(), &mnt, &MountOptions::default()).unwrap();
        let fuse = Arc::new(RwLock::new(Some(m)));
        let served = serve_in(
            dir.path(),
            engine.clone(),
            &mnt,
            Arc::new(SharedMount(fuse.clone())),
        );
        let c = connect(&served.socket).await;
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        Env {
            served,
            fuse,
            engine,
            c,
            work,
            dir,
        }
    }

    fn path(&self, name: &str) -> String {
        self.work.join(name).to_string_lossy().into_owned()
    }

    /// Mounts `m` at a new directory `work/<target>`, as containerd's mount.All does.
    fn mount(&self, m: &[Mount], target: &str) -> BindMount {
        let t = self.work.join(format!("mnt-{target}"));
        std::fs::create_dir_all(&t).unwrap();
        BindMount::new(m, &t)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.served.shutdown();
        if let Some(m) = self.fuse.write().unwrap().take() {
            m.unmount().unwrap();
        }
        assert_eq!(self.engine.fsck(true).unwrap().errors, Vec::<String>::new());
        let _ = &self.dir;
    }
}

/// A bind mount made from a Mounts answer; unmounted on drop.
struct BindMount(PathBuf);

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

impl BindMount {
    fn new(m: &[Mount], target: &Path) -> BindMount {
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].r#type, "bind");
        let mut flags = libc::MS_BIND;
        if m[0].options.iter().any(|o| o == "rbind") {
            flags |= libc::MS_REC;
        }
        let (src, dst) = (cstr(Path::new(&m[0].source)), cstr(target));
        let none = CString::new("none").unwrap();
        // SAFETY: valid NUL-terminated strings; a null data pointer is allowed.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                none.as_ptr(),
                flags,
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "bind mount: {}", std::io::Error::last_os_error());
        if m[0].options.iter().any(|o| o == "ro") {
            // SAFETY: as above; remounting the bind mount just made.
            let r = unsafe {
                libc::mount(
                    std::ptr::null(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    flags | libc::MS_REMOUNT | libc::MS_RDONLY,
                    std::ptr::null(),
                )
            };
            assert_eq!(
                r,
                0,
                "read-only remount: {}",
                std::io::Error::last_os_error()
            );
        }
        BindMount(target.to_path_buf())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let t = cstr(&self.0);
        // SAFETY: a valid path; lazy unmount of the bind mount made in new().
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    }
}

/// One step of an fstest-style applier.
#[derive(Clone)]
enum Op {
    File(&'static str, &'static [u8], u32),
    Dir(&'static str, u32),
    RemoveAll(&'static str),
    Link(&'static str, &'static str),
    Chown(&'static str, u32, u32),
}

fn apply(root: &Path, ops: &[Op]) {
    for op in ops {
        match op {
            Op::File(p, data, mode) => {
                let p = root.join(p.trim_start_matches('/'));
                std::fs::write(&p, data).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
            }
            Op::Dir(p, mode) => {
                let p = root.join(p.trim_start_matches('/'));
                std::fs::create_dir(&p).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
            }
            Op::RemoveAll(p) => {
                let p = root.join(p.trim_start_matches('/'));
                if p.is_dir() {
                    std::fs::remove_dir_all(&p).unwrap();
                } else {
                    std::fs::remove_file(&p).unwrap();
                }
            }
            Op::Link(old, new) => {
                std::fs::hard_link(
                    root.join(old.trim_start_matches('/')),
                    root.join(new.trim_start_matches('/')),
                )
                .unwrap();
            }
            Op::Chown(p, uid, gid) => {
                std::os::unix::fs::lchown(
                    root.join(p.trim_start_matches('/')),
                    Some(*uid),
                    Some(*gid),
                )
                .unwrap();
            }
        }
    }
}

/// Path -> (mode, uid, gid, contents or None for a directory), the root's
/// own entry left out.
type Tree = BTreeMap<PathBuf, (u32, u32, u32, Option<Vec<u8>>)>;

fn tree(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let data = if m.is_dir() {
                stack.push(p.clone());
                None
            } else {
                Some(std::fs::read(&p).unwrap())
            };
            out.insert(
                p.strip_prefix(root).unwrap().to_path_buf(),
                (m.mode(), m.uid(), m.gid(), data),
            );
        }
    }
    out
}

/// Like fstest.CheckDirectoryEqualWithApplier: `dir` holds what the
/// appliers make in an empty directory.
fn check_equal(dir: &Path, appliers: &[&[Op]], scratch: &Path) {
    std::fs::create_dir_all(scratch).unwrap();
    for ops in appliers {
        apply(scratch, ops);
    }
    assert_eq!(tree(dir), tree(scratch), "{} differs", dir.display());
}

const INITIAL: &[Op] = &[
    Op::File("/foo", b"foo\n", 0o777),
    Op::Dir("/a", 0o755),
    Op::Dir("/a/b", 0o755),
    Op::Dir("/a/b/c", 0o755),
];
const DIFF: &[Op] = &[
    Op::File("/bar", b"bar\n", 0o777),
    Op::File("/foo", b"bar\n", 0o777),
    Op::RemoveAll("/a/b"),
];

fn gc_root() -> std::collections::HashMap<String, String> {
    labels(&[("containerd.io/gc.root", "2026-01-01T00:00:00Z")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_basic() {
    let mut env = Env::new().await;
    let preparing = env.path("preparing");
    let m = prepare_with(&mut env.c, &preparing, "", gc_root())
        .await
        .unwrap();
    let bm = env.mount(&m, "preparing");
    apply(&bm.0, INITIAL);
    let committed = env.path("committed");
    commit_with(&mut env.c, &committed, &preparing, gc_root())
        .await
        .unwrap();
    drop(bm);
    let si = stat(&mut env.c, &committed).await.unwrap();
    assert_eq!((si.parent.as_str(), kind(&si)), ("", Kind::Committed));
    assert!(stat(&mut env.c, &preparing).await.is_err());

    let next = env.path("nextlayer");
    let m = prepare_with(&mut env.c, &next, &committed, gc_root())
        .await
        .unwrap();
    let bm = env.mount(&m, "next");
    check_equal(&bm.0, &[INITIAL], &env.work.join("expect-1"));
    apply(&bm.0, DIFF);
    let ni = stat(&mut env.c, &next).await.unwrap();
    assert_eq!(
        (ni.parent.as_str(), kind(&ni)),
        (committed.as_str(), Kind::Active)
    );
    let next_committed = env.path("committed-next");
    commit_with(&mut env.c, &next_committed, &next, gc_root())
        .await
        .unwrap();
    drop(bm);
    let si2 = stat(&mut env.c, &next_committed).await.unwrap();
    assert_eq!(
        (si2.parent.as_str(), kind(&si2)),
        (committed.as_str(), Kind::Committed)
    );
    assert!(stat(&mut env.c, &next).await.is_err());
    let walked = list(&mut env.c, &[]).await.unwrap();
    assert!(walked.contains(&si) && walked.contains(&si2));

    let nextnext = env.path("nextnextlayer");
    let m = view(&mut env.c, &nextnext, &next_committed).await.unwrap();
    let bm = env.mount(&m, "nextnext");
    check_equal(&bm.0, &[INITIAL, DIFF], &env.work.join("expect-2"));
    drop(bm);
    remove(&mut env.c, &nextnext).await.unwrap();
    let err = remove(&mut env.c, &committed).await.unwrap_err();
    assert!(err.message().contains("remove"), "{}", err.message());
    remove(&mut env.c, &next_committed).await.unwrap();
    remove(&mut env.c, &committed).await.unwrap();
    cleanup(&mut env.c).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_stat_active_and_committed_and_usage_across_commit() {
    let mut env = Env::new().await;
    let preparing = env.path("preparing");
    let m = prepare_with(&mut env.c, &preparing, "", gc_root())
        .await
        .unwrap();
    let bm = env.mount(&m, "preparing");
    std::fs::write(bm.0.join("foo"), vec![b'f'; 100_000]).unwrap();
    let si = stat(&mut env.c, &preparing).await.unwrap();
    assert_eq!(
        (si.name.as_str(), kind(&si), si.parent.as_str()),
        (preparing.as_str(), Kind::Active, "")
    );
    let committed = env.path("committed");
    commit_with(&mut env.c, &committed, &preparing, gc_root())
        .await
        .unwrap();
    drop(bm);
    let si = stat(&mut env.c, &committed).await.unwrap();
    assert_eq!(
        (si.name.as_str(), kind(&si), si.parent.as_str()),
        (committed.as_str(), Kind::Committed, "")
    );
    // Commit wrote back what the kernel cached: usage counts it all.
    let u = usage(&mut env.c, &committed).await.unwrap();
    assert!(u.size >= 100_000, "{u:?}");
    assert_eq!(u.inodes, 2, "root and foo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_transitivity() {
    let mut env = Env::new().await;
    let preparing = env.path("preparing");
    let m = prepare_with(&mut env.c, &preparing, "", gc_root())
        .await
        .unwrap();
    let bm = env.mount(&m, "preparing");
    std::fs::write(bm.0.join("foo"), b"foo\n").unwrap();
    let snap_a = env.path("snapA");
    commit_with(&mut env.c, &snap_a, &preparing, gc_root())
        .await
        .unwrap();
    let next = env.path("next");
    let m = prepare_with(&mut env.c, &next, &snap_a, gc_root())
        .await
        .unwrap();
    let bm2 = env.mount(&m, "next");
    std::fs::write(bm2.0.join("foo"), b"foo bar\n").unwrap();
    let snap_b = env.path("snapB");
    commit_with(&mut env.c, &snap_b, &next, gc_root())
        .await
        .unwrap();
    let si_a = stat(&mut env.c, &snap_a).await.unwrap();
    let si_b = stat(&mut env.c, &snap_b).await.unwrap();
    let si_parent_b = stat(&mut env.c, &si_b.parent).await.unwrap();
    assert_eq!(si_a.parent, "");
    assert_eq!(si_b.parent, snap_a);
    assert_eq!(si_parent_b.parent, "");
    drop((bm, bm2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prepare_view_with_the_same_key_fails() {
    let mut env = Env::new().await;
    let preparing = env.path("preparing");
    prepare_with(&mut env.c, &preparing, "", gc_root())
        .await
        .unwrap();
    let snap_a = env.path("snapA");
    commit_with(&mut env.c, &snap_a, &preparing, gc_root())
        .await
        .unwrap();
    let new_layer = env.path("newlayer");
    prepare_with(&mut env.c, &new_layer, &snap_a, gc_root())
        .await
        .unwrap();
    assert!(view(&mut env.c, &new_layer, &snap_a).await.is_err());
    let prep = env.path("prepLayer");
    prepare_with(&mut env.c, &prep, &snap_a, gc_root())
        .await
        .unwrap();
    assert!(prepare_with(&mut env.c, &prep, &snap_a, gc_root())
        .await
        .is_err());
    let v = env.path("viewLayer");
    view(&mut env.c, &v, &snap_a).await.unwrap();
    assert!(view(&mut env.c, &v, &snap_a).await.is_err());
}

/// containerd's baseTestSnapshots: c1 <- c2 <- a1, a2, v1 on c2, v2.
async fn base_snapshots(c: &mut Client) {
    prepare_with(c, "c1-a", "", gc_root()).await.unwrap();
    commit_with(c, "c1", "c1-a", gc_root()).await.unwrap();
    prepare_with(c, "c2-a", "c1", gc_root()).await.unwrap();
    commit_with(c, "c2", "c2-a", gc_root()).await.unwrap();
    prepare_with(c, "a1", "c2", gc_root()).await.unwrap();
    prepare_with(c, "a2", "", gc_root()).await.unwrap();
    view(c, "v1", "c2").await.unwrap();
    view(c, "v2", "").await.unwrap();
}

fn nanos(t: Option<prost_types::Timestamp>) -> i128 {
    let t = t.unwrap();
    t.seconds as i128 * 1_000_000_000 + t.nanos as i128
}

fn now_nanos() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_update() {
    let mut env = Env::new().await;
    let t1 = now_nanos();
    base_snapshots(&mut env.c).await;
    let t2 = now_nanos();
    let cases = [
        ("c1", Kind::Committed, ""),
        ("c2", Kind::Committed, "c1"),
        ("a1", Kind::Active, "c2"),
        ("a2", Kind::Active, ""),
        ("v1", Kind::View, "c2"),
        ("v2", Kind::View, ""),
    ];
    for (name, k, parent) in cases {
        let st = stat(&mut env.c, name).await.unwrap();
        let created = nanos(st.created_at);
        assert!(
            t1 <= created && created <= t2,
            "{name}: created in the window"
        );
        assert_eq!(st.created_at, st.updated_at, "{name}");
        assert_eq!(
            (kind(&st), st.parent.as_str(), st.name.as_str()),
            (k, parent, name)
        );

        let expected = labels(&[
            ("l1", "v1"),
            ("l2", "v2"),
            ("l3", "v3"),
            ("containerd.io/gc.root", "r"),
        ]);
        let mut st2 = st.clone();
        st2.parent = "doesnotexist".into();
        st2.labels = expected.clone();
        let u1 = now_nanos();
        let st2 = update(&mut env.c, st2, &[]).await.unwrap();
        let u2 = now_nanos();
        assert_eq!(st2.created_at, st.created_at);
        let updated = nanos(st2.updated_at);
        assert!(
            u1 <= updated && updated <= u2,
            "{name}: updated in the window"
        );
        assert_eq!(
            (kind(&st2), st2.parent.as_str(), st2.name.as_str()),
            (k, parent, name)
        );
        assert_eq!(st2.labels, expected);

        let mut st3 = st2.clone();
        st3.labels = labels(&[("l1", "updated"), ("l4", "v4")]);
        let st3 = update(&mut env.c, st3, &["labels.l1", "labels.l2"])
            .await
            .unwrap();
        assert_eq!(
            st3.labels,
            labels(&[
                ("l1", "updated"),
                ("l3", "v3"),
                ("containerd.io/gc.root", "r")
            ])
        );
        let mut st4 = st3.clone();
        st4.labels = labels(&[("l4", "v4"), ("containerd.io/gc.root", "r")]);
        let st4 = update(&mut env.c, st4.clone(), &["labels"]).await.unwrap();
        assert_eq!(
            st4.labels,
            labels(&[("l4", "v4"), ("containerd.io/gc.root", "r")])
        );

        let mut st5 = st4;
        st5.parent = "doesnotexist".into();
        assert_code(
            update(&mut env.c, st5, &["parent"]).await,
            tonic::Code::InvalidArgument,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_remove_and_reuse_keys() {
    let mut env = Env::new().await;
    let c = &mut env.c;
    prepare_with(c, "committed-a", "", gc_root()).await.unwrap();
    commit_with(c, "committed-1", "committed-a", gc_root())
        .await
        .unwrap();
    prepare_with(c, "reuse-1", "committed-1", gc_root())
        .await
        .unwrap();
    remove(c, "reuse-1").await.unwrap();
    view(c, "reuse-1", "committed-1").await.unwrap();
    remove(c, "reuse-1").await.unwrap();
    prepare_with(c, "reuse-1", "", gc_root()).await.unwrap();
    remove(c, "committed-1").await.unwrap();
    commit_with(c, "committed-1", "reuse-1", gc_root())
        .await
        .unwrap();
    cleanup(c).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_remove_intermediate_snapshot() {
    let mut env = Env::new().await;
    let base = env.path("base");
    let m = prepare_with(&mut env.c, &base, "", gc_root())
        .await
        .unwrap();
    let bm = env.mount(&m, "base");
    let committed_base = env.path("committed-base");
    commit_with(&mut env.c, &committed_base, &base, gc_root())
        .await
        .unwrap();
    let inter = env.path("intermediate");
    prepare_with(&mut env.c, &inter, &committed_base, gc_root())
        .await
        .unwrap();
    let committed_inter = env.path("committed-inter");
    commit_with(&mut env.c, &committed_inter, &inter, gc_root())
        .await
        .unwrap();
    let top = env.path("toplayer");
    prepare_with(&mut env.c, &top, &committed_inter, gc_root())
        .await
        .unwrap();
    assert_code(
        remove(&mut env.c, &committed_inter).await,
        tonic::Code::FailedPrecondition,
    );
    remove(&mut env.c, &top).await.unwrap();
    remove(&mut env.c, &committed_inter).await.unwrap();
    drop(bm);
    remove(&mut env.c, &committed_base).await.unwrap();
    cleanup(&mut env.c).await.unwrap();
    assert_eq!(
        env.served
            .server
            .as_ref()
            .unwrap()
            .table()
            .pending_removals(),
        0
    );
}

/// containerd's checkSnapshots: each applier in a child of the previous
/// commit, checked against the appliers so far; then a view of the last.
async fn check_snapshots(env: &mut Env, appliers: &[&[Op]]) {
    let mut parent = String::new();
    for (n, ops) in appliers.iter().enumerate() {
        let key = env.path(&format!("preparing-{n}"));
        let m = prepare_with(&mut env.c, &key, &parent, gc_root())
            .await
            .unwrap();
        let bm = env.mount(&m, &format!("p{n}"));
        apply(&bm.0, ops);
        check_equal(
            &bm.0,
            &appliers[..=n],
            &env.work.join(format!("expect-{n}")),
        );
        let name = env.path(&format!("committed-{n}"));
        commit_with(&mut env.c, &name, &key, gc_root())
            .await
            .unwrap();
        drop(bm);
        parent = name;
    }
    let key = env.path("final-view");
    let m = view(&mut env.c, &key, &parent).await.unwrap();
    let bm = env.mount(&m, "final");
    check_equal(&bm.0, appliers, &env.work.join("expect-final"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_deleted_files_moved_files_chown_and_directory_modes() {
    let mut env = Env::new().await;
    // DeletedFilesInChildSnapshot
    check_snapshots(
        &mut env,
        &[
            &[
                Op::File("/foo", b"foo\n", 0o777),
                Op::File("/foobar", b"foobar\n", 0o777),
            ],
            &[Op::RemoveAll("/foobar")],
            &[],
        ],
    )
    .await;
    let mut env = Env::new().await;
    // MoveFileFromLowerLayer (with a hard link)
    check_snapshots(
        &mut env,
        &[
            &[
                Op::Dir("/dir1", 0o700),
                Op::File("/dir1/f1", b"Hello", 0o644),
                Op::Dir("/dir2", 0o700),
                Op::File("/dir2/f2", b"...", 0o644),
            ],
            &[
                Op::Dir("/dir3", 0o700),
                Op::File("/dir3/f1", b"Hello", 0o644),
                Op::RemoveAll("/dir1"),
                Op::Link("/dir2/f2", "/dir3/f2"),
                Op::RemoveAll("/dir2/f2"),
            ],
        ],
    )
    .await;
    let mut env = Env::new().await;
    // Chown and DirectoryPermissionOnCommit
    check_snapshots(
        &mut env,
        &[
            &[
                Op::Dir("/opt", 0o711),
                Op::Dir("/opt/a", 0o700),
                Op::File("/opt/a/f", b"x", 0o600),
                Op::Chown("/opt/a", 100, 100),
                Op::Chown("/opt/a/f", 100, 100),
            ],
            &[
                Op::Dir("/opt/b", 0o777),
                Op::Chown("/opt", 1, 2),
                Op::Chown("/opt/b", 101, 101),
            ],
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_view_is_read_only() {
    let mut env = Env::new().await;
    let preparing = env.path("preparing");
    prepare_with(&mut env.c, &preparing, "", gc_root())
        .await
        .unwrap();
    let committed = env.path("committed");
    commit_with(&mut env.c, &committed, &preparing, gc_root())
        .await
        .unwrap();
    let v = env.path("view");
    let m = view(&mut env.c, &v, &committed).await.unwrap();
    let bm = env.mount(&m, "view");
    let err = std::fs::write(bm.0.join("testfile"), b"testcontent").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    // The layer refuses writes itself, even without the read-only bind.
    let direct = Path::new(&m[0].source).join("testfile");
    let err = std::fs::write(direct, b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    drop(bm);
    remove(&mut env.c, &v).await.unwrap();
    remove(&mut env.c, &committed).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_stat_in_walk() {
    let mut env = Env::new().await;
    base_snapshots(&mut env.c).await;
    let walked = list(&mut env.c, &[]).await.unwrap();
    assert_eq!(walked.len(), 6);
    for i in walked {
        assert_eq!(i, stat(&mut env.c, &i.name).await.unwrap());
    }
}
