//! Layer metadata: set with a layer's creation or later (frozen layers
//! too), replaced whole, bounded in size, durable across a reopen and a
//! power cut after the sync, removed with its layer; fsck stays clean and
//! flags metadata left without a layer.

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
    let dev: Arc<dyn Device> = Arc::new(MemDevice::new(64 << 20));
    Engine::format(
        dev.clone(),
        &FormatOptions {
            segment_size_bytes: 256 << 10,
            force: false,
        },
    )
    .unwrap();
    let e = Engine::open(dev.clone(), quiet()).unwrap();
    (dev, e)
}

fn map(pairs: &[(&str, &str)]) -> LayerMetadata {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn assert_clean(e: &Engine) {
    let report = e.fsck(true).unwrap();
    assert!(report.is_clean(), "fsck: {:?}", report.errors);
}

#[test]
fn metadata_lives_and_dies_with_its_layer() {
    let (dev, e) = fresh();
    let labels = map(&[("key", "default/1/base"), ("containerd.io/gc.root", "x")]);
    e.create_layer_with_metadata("base", None, true, &labels)
        .unwrap();
    assert_eq!(e.layer_metadata("base").unwrap(), labels);
    e.clone_layer("base", "plain").unwrap();
    assert!(e.layer_metadata("plain").unwrap().is_empty());
    // Frozen layers take metadata; a replacement is whole.
    let big: LayerMetadata = (0..400)
        .map(|i| (format!("label/{i:04}"), "v".repeat(100 + i)))
        .collect();
    e.set_layer_metadata("base", &big).unwrap();
    assert_eq!(e.layer_metadata("base").unwrap(), big);
    e.commit_layer_with_metadata("plain", &map(&[("state", "committed")]))
        .unwrap();
    assert!(e.layer_info("plain").unwrap().frozen);
    // Over the bound: refused, nothing changed.
    let huge = map(&[("k", &"x".repeat(MAX_METADATA_BYTES))]);
    assert!(matches!(
        e.set_layer_metadata("base", &huge),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        e.create_layer_with_metadata("other", None, false, &huge),
        Err(Error::Invalid(_))
    ));
    assert!(
        e.layer_info("other").is_err(),
        "a refused create leaves no layer"
    );
    assert!(matches!(e.layer_metadata("missing"), Err(Error::NotFound)));
    assert_clean(&e);
    e.sync().unwrap();
    e.crash();
    drop(e);

    let e = Engine::open(dev.clone(), quiet()).unwrap();
    assert_eq!(e.layer_metadata("base").unwrap(), big);
    assert_eq!(
        e.layer_metadata("plain").unwrap(),
        map(&[("state", "committed")])
    );
    e.remove_layer("plain").unwrap();
    // A new layer with a reused name starts without the old metadata.
    e.clone_layer("base", "plain").unwrap();
    assert!(e.layer_metadata("plain").unwrap().is_empty());
    e.set_layer_metadata("base", &LayerMetadata::new()).unwrap();
    assert!(e.layer_metadata("base").unwrap().is_empty());
    assert_clean(&e);
    e.close().unwrap();
    drop(e);
    let e = Engine::open(dev, quiet()).unwrap();
    assert!(e.layer_metadata("base").unwrap().is_empty());
    assert_clean(&e);
}
