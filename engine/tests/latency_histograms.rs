//! The engine's latency histograms (`Engine::latencies`): device reads,
//! writes and flushes are timed on the in-memory device too, a layer's
//! first read (and only that) observes its start-up, `record_apply` a
//! pull, and nothing is observed while statistics are off. One test: the
//! off switch is process-wide.

use lcfs_engine::device::{Device, MemDevice};
use lcfs_engine::*;
use std::sync::Arc;
use std::time::Duration;

#[test]
fn device_requests_startups_and_pulls_fill_their_histograms() {
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(64 << 20));
    Engine::format(
        dev.clone(),
        &FormatOptions {
            segment_size_bytes: 256 << 10,
            force: false,
        },
    )
    .unwrap();
    let config = Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        // Every data read goes to the device.
        block_cache_bytes: 0,
        ..Config::default()
    };
    let e = Engine::open(dev.clone(), config).unwrap();
    let l = e.latencies();
    // Opening read the superblocks and trees.
    assert!(l.device_read.snapshot().count > 0);

    let image = e.create_layer("image", true).unwrap();
    let f = e
        .create(image, ROOT_INODE, b"app", 0o644, 0, 0)
        .unwrap()
        .inode;
    // Past a few segments, so the first blocks are on the device, not in
    // the log buffer.
    e.write(image, f, 0, &vec![7u8; 2 << 20]).unwrap();
    e.record_apply(image, 64 << 10, Duration::from_millis(3))
        .unwrap();
    let apply = l.apply.snapshot();
    assert_eq!(apply.count, 1);
    assert_eq!(apply.sum_seconds, 0.003);
    let writes = l.device_write.snapshot().count;
    let flushes = l.device_flush.snapshot().count;
    e.sync().unwrap();
    assert!(l.device_write.snapshot().count > writes);
    assert!(l.device_flush.snapshot().count > flushes);

    // A container's first read is its start-up; later reads are not.
    let c = e.clone_layer("image", "c").unwrap();
    assert_eq!(l.startup.snapshot().count, 0);
    let reads = l.device_read.snapshot().count;
    assert_eq!(e.read_counted(c, f, 0, 4096).unwrap(), vec![7u8; 4096]);
    assert_eq!(l.startup.snapshot().count, 1);
    assert!(l.device_read.snapshot().count > reads);
    e.read_counted(c, f, 4096, 4096).unwrap();
    assert_eq!(l.startup.snapshot().count, 1);
    // The bucket counts add up to the count; the last is +Inf.
    let s = l.device_read.snapshot();
    assert_eq!(s.counts.iter().sum::<u64>(), s.count);
    assert_eq!(*s.bounds_seconds.last().unwrap(), f64::INFINITY);
    assert_eq!(s.bounds_seconds.len(), HISTOGRAM_BUCKETS);

    // Off: reads, start-ups and pulls go unobserved.
    set_stats_enabled(false);
    assert!(!stats_enabled());
    let before = (
        l.device_read.snapshot().count,
        l.startup.snapshot().count,
        l.apply.snapshot().count,
    );
    let d = e.clone_layer("image", "d").unwrap();
    e.read_counted(d, f, 8192, 4096).unwrap();
    e.record_apply(image, 1, Duration::from_millis(1)).unwrap();
    let after = (
        l.device_read.snapshot().count,
        l.startup.snapshot().count,
        l.apply.snapshot().count,
    );
    set_stats_enabled(true);
    assert_eq!(after, before);
    e.read_counted(d, f, 12288, 4096).unwrap();
    assert!(l.device_read.snapshot().count > before.0);
}
