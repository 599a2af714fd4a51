//! Layer usage (`LayerInfo::usage`): clones of a layer are counted with the
//! clone itself, reads counted by `read_counted` (and `read_uncached`) reach
//! the layer record at the next checkpoint, a removed clone's reads move to
//! its parent, and a crash loses at most the reads since the last
//! checkpoint. Internal reads (`read`) are not counted.

use lcfs_engine::device::{Device, MemDevice};
use lcfs_engine::*;
use std::sync::Arc;

fn quiet() -> Config {
    Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..Config::default()
    }
}

fn fresh() -> (Arc<dyn Device>, Arc<Engine>) {
    fresh_with(quiet())
}

fn fresh_with(config: Config) -> (Arc<dyn Device>, Arc<Engine>) {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(64 << 20));
    Engine::format(
        dev.clone(),
        &FormatOptions {
            segment_size_bytes: 256 << 10,
            force: false,
        },
    )
    .unwrap();
    let e = Engine::open(dev.clone(), config).unwrap();
    (dev, e)
}

fn usage(e: &Engine, layer: &str) -> LayerUsage {
    e.layer_info(layer).unwrap().usage
}

#[test]
fn clones_and_reads_are_counted_durably_and_survive_their_layers() {
    let (dev, e) = fresh();
    let b = e.create_layer("image", true).unwrap();
    let f = e.create(b, ROOT_INODE, b"app", 0o755, 0, 0).unwrap().inode;
    e.write(b, f, 0, &vec![1u8; 10_000]).unwrap();
    assert_eq!(usage(&e, "image"), LayerUsage::default());

    let before = Timestamp::now();
    let c1 = e.clone_layer("image", "c1").unwrap();
    let c2 = e.clone_layer("image", "c2").unwrap();
    let u = usage(&e, "image");
    assert_eq!(u.clones, 2);
    assert!(
        u.last_clone >= before,
        "{:?} before {before:?}",
        u.last_clone
    );

    // Reads through a container count against it: requests, and the bytes
    // served (short at the end of the file).
    for _ in 0..3 {
        e.read_counted(c1, f, 0, 4096).unwrap();
    }
    e.read_counted(c1, f, 8192, 4096).unwrap(); // 1,808 bytes
    e.read_counted(c2, f, 0, 100).unwrap();
    // Internal reads do not count.
    e.read(c1, f, 0, 4096).unwrap();
    let u1 = usage(&e, "c1");
    assert_eq!((u1.reads, u1.bytes_read), (4, 3 * 4096 + 1808));
    assert_eq!(
        (usage(&e, "c2").reads, usage(&e, "c2").bytes_read),
        (1, 100)
    );

    // Durable at a checkpoint.
    e.sync().unwrap();
    e.close().unwrap();
    drop(e);
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    assert_eq!(usage(&e, "c1"), u1);
    assert_eq!(usage(&e, "image").clones, 2);

    // A removed clone's reads become its parent's clone reads; a clone of
    // a clone folds through its parent when that goes too.
    let c1 = e.layer_info("c1").unwrap().id;
    e.read_counted(c1, f, 0, 10).unwrap(); // not checkpointed yet
    e.clone_layer("c2", "c2-child").unwrap();
    let gc = e.layer_info("c2-child").unwrap().id;
    e.read_counted(gc, f, 0, 1000).unwrap();
    e.remove_layer("c1").unwrap();
    let u = usage(&e, "image");
    assert_eq!(
        (u.clone_reads, u.clone_bytes_read),
        (5, 3 * 4096 + 1808 + 10)
    );
    e.remove_layer("c2-child").unwrap();
    assert_eq!(usage(&e, "c2").clone_reads, 1);
    e.remove_layer("c2").unwrap();
    let u = usage(&e, "image");
    assert_eq!(u.clone_reads, 5 + 1 + 1);
    assert_eq!(u.clone_bytes_read, 3 * 4096 + 1808 + 10 + 100 + 1000);
    assert_eq!(
        u.clones, 2,
        "clones of clones count against their own parent"
    );
    assert_eq!((u.reads, u.bytes_read), (0, 0));
    e.sync().unwrap();
    drop(e);
    let e = Engine::open(dev, quiet()).unwrap();
    assert_eq!(usage(&e, "image"), u);
    assert!(e.fsck(false).unwrap().is_clean());
}

#[test]
fn a_crash_loses_only_the_reads_since_the_last_checkpoint() {
    let (dev, e) = fresh();
    let b = e.create_layer("image", true).unwrap();
    let f = e.create(b, ROOT_INODE, b"f", 0o644, 0, 0).unwrap().inode;
    e.write(b, f, 0, &[7u8; 4096]).unwrap();
    let c = e.clone_layer("image", "c").unwrap();
    e.read_counted(c, f, 0, 4096).unwrap();
    e.sync().unwrap();
    e.read_counted(c, f, 0, 4096).unwrap();
    e.crash();
    drop(e);
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    let u = usage(&e, "c");
    assert_eq!((u.reads, u.bytes_read), (1, 4096));
    assert_eq!(usage(&e, "image").clones, 1);
    // A clone is counted in the same change as the clone: never one
    // without the other.
    e.clone_layer("image", "d").unwrap();
    e.crash();
    drop(e);
    let e = Engine::open(dev, quiet()).unwrap();
    let has_d = e.layer_info("d").is_ok();
    assert_eq!(usage(&e, "image").clones, 1 + has_d as u64);
}

#[test]
fn the_background_thread_makes_reads_durable_on_its_own() {
    let (dev, e) = fresh_with(Config {
        flush_interval_ms: 10,
        checkpoint_interval_ms: 50,
        ..Config::default()
    });
    let b = e.create_layer("image", true).unwrap();
    let f = e.create(b, ROOT_INODE, b"f", 0o644, 0, 0).unwrap().inode;
    e.write(b, f, 0, &[7u8; 4096]).unwrap();
    e.sync().unwrap();
    let c = e.clone_layer("image", "c").unwrap();
    e.sync().unwrap();
    e.read_counted(c, f, 0, 4096).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let seq = e.checkpoint_seq();
    while e.checkpoint_seq() < seq + 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint wrote the read"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    e.crash();
    drop(e);
    let e = Engine::open(dev, quiet()).unwrap();
    assert_eq!(usage(&e, "c").reads, 1);
}

#[test]
fn start_up_and_pull_are_recorded_and_fold_through_init_layers() {
    let (dev, e) = fresh();
    let image = e.create_layer("image", true).unwrap();
    let f = e
        .create(image, ROOT_INODE, b"bin", 0o755, 0, 0)
        .unwrap()
        .inode;
    e.write(image, f, 0, &[3u8; 8192]).unwrap();
    e.record_apply(image, 8192, std::time::Duration::from_millis(5))
        .unwrap();
    let u = usage(&e, "image");
    assert_eq!((u.applied_bytes, u.apply_ns), (8192, 5_000_000));

    // Docker's chain: the image, a container's -init layer, the container.
    e.clone_layer("image", "c-init").unwrap();
    let c = e.clone_layer("c-init", "c").unwrap();
    let created = e.layer_info("c").unwrap().created;
    std::thread::sleep(std::time::Duration::from_millis(20));
    e.read_counted(c, f, 0, 4096).unwrap();
    e.read_counted(c, f, 4096, 4096).unwrap();
    let u = usage(&e, "c");
    assert!(u.first_read > created);
    let startup = u.startup_ns(created).unwrap();
    assert!(startup >= 20_000_000, "{startup} ns");
    assert_eq!((u.early_reads, u.early_bytes_read), (2, 8192));
    // The first read stays the first once folded and reopened.
    e.sync().unwrap();
    e.read_counted(c, f, 0, 10).unwrap();
    assert_eq!(usage(&e, "c").first_read, u.first_read);
    assert_eq!(usage(&e, "image").startup_ns(created), None);

    e.remove_layer("c").unwrap();
    e.remove_layer("c-init").unwrap();
    let u = usage(&e, "image");
    assert_eq!(u.clone_starts, 1);
    assert_eq!(u.clone_start_ns, startup);
    assert_eq!((u.clone_early_reads, u.clone_early_bytes_read), (3, 8202));
    assert_eq!(u.clone_bytes_read, 8202);
    // A container that never read counts no start.
    e.clone_layer("image", "idle").unwrap();
    e.remove_layer("idle").unwrap();
    assert_eq!(usage(&e, "image").clone_starts, 1);
    e.sync().unwrap();
    drop(e);
    let e = Engine::open(dev, quiet()).unwrap();
    assert_eq!(usage(&e, "image").clone_start_ns, startup);
    assert_eq!(usage(&e, "image").applied_bytes, 8192);
}

#[test]
fn hot_files_name_what_clones_read_and_survive_removal_and_reopen() {
    let (dev, e) = fresh();
    let b = e.create_layer("image", true).unwrap();
    let bin = e.mkdir(b, ROOT_INODE, b"bin", 0o755, 0, 0).unwrap().inode;
    let sh = e.create(b, bin, b"sh", 0o755, 0, 0).unwrap().inode;
    e.write(b, sh, 0, &vec![7u8; 8192]).unwrap();
    let libc = e
        .create(b, ROOT_INODE, b"libc.so", 0o644, 0, 0)
        .unwrap()
        .inode;
    e.write(b, libc, 0, &vec![8u8; 4096]).unwrap();
    e.commit_layer("image").unwrap();

    let c = e.clone_layer("image", "c").unwrap();
    let mine = e.create(c, ROOT_INODE, b"mine", 0o644, 0, 0).unwrap().inode;
    e.write(c, mine, 0, b"private").unwrap();
    for _ in 0..5 {
        e.read_counted(c, sh, 0, 4096).unwrap();
    }
    e.read_counted(c, libc, 0, 4096).unwrap();
    e.read_counted(c, mine, 0, 100).unwrap();
    let hot = e.hot_files(c).unwrap();
    let rows: Vec<(Option<&[u8]>, u64, u64)> = hot
        .iter()
        .map(|(f, p)| (p.as_deref(), f.reads, f.bytes))
        .collect();
    assert_eq!(
        rows,
        vec![
            (Some(&b"/bin/sh"[..]), 5, 5 * 4096),
            (Some(&b"/libc.so"[..]), 1, 4096),
            (Some(&b"/mine"[..]), 1, 7),
        ]
    );
    // Three distinct files read in the start-up window.
    e.sync().unwrap();
    assert_eq!(usage(&e, "c").early_files, 3);

    // Removed, the clone's reads of the image's files stay with the image;
    // its own file does not.
    e.remove_layer("c").unwrap();
    assert_eq!(usage(&e, "image").clone_early_files, 3);
    e.sync().unwrap();
    e.close().unwrap();
    drop(e);
    let e = Engine::open(dev, quiet()).unwrap();
    let hot: Vec<(Vec<u8>, u64)> = e
        .hot_files(e.layer_id("image").unwrap())
        .unwrap()
        .into_iter()
        .map(|(f, p)| (p.unwrap(), f.reads))
        .collect();
    assert_eq!(
        hot,
        vec![(b"/bin/sh".to_vec(), 5), (b"/libc.so".to_vec(), 1)]
    );
    assert!(e.fsck(false).unwrap().is_clean());
}
