//! Docker records a layer (or forgets it) as soon as Create,
//! CreateReadWrite or Remove answers, so each is durable before it does:
//! after a kill -9 that keeps only what reached the device, the layers
//! Docker knows of are there and the ones it removed stay removed (a
//! removed layer coming back is a child Docker cannot see, and its parent
//! can then never be removed).

mod common;

use common::Recorder;
use lcfs_dockerplugin::Driver;
use lcfs_engine::device::{Device, FaultConfig, FaultyDevice, MemDevice};
use lcfs_engine::{Config, Engine, FormatOptions};
use serde_json::{json, Value};
use std::sync::Arc;

fn quiet() -> Config {
    // No background checkpoints: only what the calls make durable is kept.
    Config {
        flush_interval_ms: 0,
        checkpoint_interval_ms: 0,
        ..Config::default()
    }
}

fn call(d: &Driver, method: &str, body: Value) {
    let answer = d.call(method, body.to_string().as_bytes());
    assert!(answer.get("Err").is_none(), "{method}: {answer}");
}

fn layers(e: &Engine) -> Vec<String> {
    let mut names: Vec<String> = e.list_layers().into_iter().map(|l| l.name).collect();
    names.sort();
    names
}

#[test]
fn create_and_remove_are_durable_when_they_answer() {
    let faulty = Arc::new(FaultyDevice::new(128 << 20, FaultConfig::default()));
    let dev: Arc<dyn Device> = faulty.clone();
    Engine::format(dev.clone(), &FormatOptions::default()).unwrap();
    let e = Engine::open(dev, quiet()).unwrap();
    let d = Driver::new(
        e.clone(),
        std::path::Path::new(common::MOUNT),
        Arc::new(Recorder::default()),
    );
    call(
        &d,
        "GraphDriver.Create",
        json!({"ID": "image", "Parent": ""}),
    );
    call(
        &d,
        "GraphDriver.Create",
        json!({"ID": "c1-init", "Parent": "image"}),
    );
    call(
        &d,
        "GraphDriver.CreateReadWrite",
        json!({"ID": "c1", "Parent": "c1-init"}),
    );
    call(
        &d,
        "GraphDriver.Create",
        json!({"ID": "c2-init", "Parent": "image"}),
    );
    call(
        &d,
        "GraphDriver.CreateReadWrite",
        json!({"ID": "c2", "Parent": "c2-init"}),
    );
    call(&d, "GraphDriver.Remove", json!({"ID": "c2"}));
    call(&d, "GraphDriver.Remove", json!({"ID": "c2-init"}));
    assert_eq!(layers(&e), ["c1", "c1-init", "image"]);

    // kill -9: nothing more reaches the device.
    e.crash();
    drop(d);
    drop(e);
    let image = faulty.crash_image();
    let dev: Arc<dyn Device> = Arc::new(MemDevice::from_bytes(image.snapshot()));
    let e = Engine::open(dev, quiet()).unwrap();
    assert_eq!(
        layers(&e),
        ["c1", "c1-init", "image"],
        "the layers Docker knows of, and no other"
    );
    let d = Driver::new(
        e.clone(),
        std::path::Path::new(common::MOUNT),
        Arc::new(Recorder::default()),
    );
    call(&d, "GraphDriver.Remove", json!({"ID": "c1"}));
    call(&d, "GraphDriver.Remove", json!({"ID": "c1-init"}));
    call(&d, "GraphDriver.Remove", json!({"ID": "image"}));
    assert!(layers(&e).is_empty());
}
