//! Every GraphDriver endpoint answers the exact JSON Docker 20.10 expects
//! over a real unix socket (nested Capabilities, snake_case IDMaps), errors
//! come back as {"Err"} with status 200, malformed JSON and unknown methods
//! and ids are errors (never a crash or a hang), Get returns the same Dir
//! every time and is refcounted with Put, and concurrent calls on one id
//! are safe.

mod common;

use common::{Plugin, MOUNT};
use serde_json::{json, Value};
use std::sync::Arc;

fn err_of(v: &Value) -> String {
    v.get("Err")
        .and_then(|e| e.as_str())
        .unwrap_or_else(|| panic!("expected an Err, got {v}"))
        .to_string()
}

#[test]
fn activate_init_capabilities_status() {
    let p = Plugin::start();
    assert_eq!(
        p.call("Plugin.Activate", ""),
        json!({"Implements": ["GraphDriver"]})
    );
    assert_eq!(
        p.call(
            "GraphDriver.Init",
            r#"{"Home":"/var/lib/docker/plugins/lcfs","Opts":null,"UIDMaps":null,"GIDMaps":null}"#
        ),
        json!({})
    );
    // snake_case IDMap keys, as idtools.IDMap's struct tags spell them.
    let r = p.call(
        "GraphDriver.Init",
        r#"{"Home":"/h","Opts":[],"UIDMaps":[{"container_id":0,"host_id":100000,"size":65536}],"GIDMaps":[]}"#,
    );
    assert!(err_of(&r).contains("userns-remap"), "{r}");
    assert_eq!(
        p.call("GraphDriver.Capabilities", "null"),
        json!({"Capabilities": {"ReproducesExactDiffs": false}})
    );
    let s = p.call("GraphDriver.Status", "null");
    let pairs = s["Status"].as_array().unwrap();
    assert!(pairs
        .iter()
        .all(|kv| kv.as_array().unwrap().len() == 2 && kv[0].is_string() && kv[1].is_string()));
    assert_eq!(pairs[0], json!(["Backing Filesystem", "lcfs"]));
    assert_eq!(p.call("GraphDriver.Cleanup", "null"), json!({}));
}

#[test]
fn layer_lifecycle_as_docker_drives_it() {
    let p = Plugin::start();
    let image = "a".repeat(64);
    let init = format!("{}-init", "c".repeat(64));
    let container = "c".repeat(64);
    p.create(&image, "");
    assert_eq!(
        p.call("GraphDriver.Exists", &format!(r#"{{"ID":"{image}"}}"#)),
        json!({"Exists": true})
    );
    assert_eq!(
        p.call("GraphDriver.Exists", r#"{"ID":"nope"}"#),
        json!({"Exists": false})
    );
    let write_backs = p.kernel.write_backs();
    for (id, parent) in [(&init, &image), (&container, &init)] {
        let r = p.call(
            "GraphDriver.CreateReadWrite",
            &format!(r#"{{"ID":"{id}","Parent":"{parent}","MountLabel":"","StorageOpt":{{}}}}"#),
        );
        assert_eq!(r, json!({}));
    }
    assert_eq!(
        p.kernel.write_backs(),
        write_backs + 2,
        "cached writes to a parent are written back before the clone freezes it"
    );
    assert!(
        p.engine.layer_info(&image).unwrap().frozen,
        "a parent freezes"
    );
    assert!(
        !p.engine.layer_info(&container).unwrap().cold,
        "containers are hot"
    );
    assert!(p.engine.layer_info(&image).unwrap().cold, "images are cold");

    // Get: same absolute Dir every time, refcounted by Put.
    let get = format!(r#"{{"ID":"{container}","MountLabel":""}}"#);
    let dir = json!({"Dir": format!("{MOUNT}/{container}")});
    assert_eq!(p.call("GraphDriver.Get", &get), dir);
    assert_eq!(p.call("GraphDriver.Get", &get), dir);
    assert_eq!(p.driver.references(&container), 2);
    let put = format!(r#"{{"ID":"{container}"}}"#);
    assert_eq!(p.call("GraphDriver.Put", &put), json!({}));
    assert_eq!(p.driver.references(&container), 1);
    assert_eq!(p.call("GraphDriver.Put", &put), json!({}));
    assert_eq!(p.driver.references(&container), 0);

    let m = p.call(
        "GraphDriver.GetMetadata",
        &format!(r#"{{"ID":"{container}"}}"#),
    );
    assert_eq!(m["Metadata"]["Parent"], json!(init));
    assert_eq!(m["Metadata"]["Dir"], json!(format!("{MOUNT}/{container}")));
    assert!(m["Metadata"]
        .as_object()
        .unwrap()
        .values()
        .all(|v| v.is_string()));

    // Changes / DiffSize of a container with a file written into it.
    let layer = p.engine.layer_id(&container).unwrap();
    let f = p
        .engine
        .create(layer, lcfs_engine::ROOT_INODE, b"hello", 0o644, 0, 0)
        .unwrap();
    p.engine.write(layer, f.inode, 0, b"hello world").unwrap();
    let req = format!(r#"{{"ID":"{container}","Parent":"{init}"}}"#);
    // Each reads the layer's changes, so each first has the mount write back
    // what the kernel caches of writes to it.
    let write_backs = p.kernel.write_backs();
    assert_eq!(
        p.call("GraphDriver.Changes", &req),
        json!({"Changes": [{"Path": "/hello", "Kind": 1}]})
    );
    assert_eq!(p.call("GraphDriver.DiffSize", &req), json!({"Size": 11}));
    assert_eq!(p.kernel.write_backs(), write_backs + 2);
    // Diffing against anything but the layer's own parent is refused.
    let wrong = format!(r#"{{"ID":"{container}","Parent":"{image}"}}"#);
    assert!(err_of(&p.call("GraphDriver.Changes", &wrong)).contains("own parent"));

    // Remove: children first; then idempotent like overlay2.
    let r = p.call("GraphDriver.Remove", &format!(r#"{{"ID":"{init}"}}"#));
    assert!(!err_of(&r).is_empty());
    for id in [&container, &init, &image] {
        assert_eq!(
            p.call("GraphDriver.Remove", &format!(r#"{{"ID":"{id}"}}"#)),
            json!({})
        );
    }
    assert_eq!(
        p.call("GraphDriver.Remove", &format!(r#"{{"ID":"{image}"}}"#)),
        json!({})
    );
    assert!(p.layer_names().is_empty());
    let seen = p.kernel.forgotten_entries.lock().unwrap().clone();
    assert!(seen.contains(&container) && seen.contains(&image));
}

#[test]
fn errors_are_err_json_never_crashes() {
    let p = Plugin::start();
    // Unknown ids.
    for m in [
        "GraphDriver.Get",
        "GraphDriver.Put",
        "GraphDriver.GetMetadata",
        "GraphDriver.Changes",
        "GraphDriver.DiffSize",
    ] {
        let r = p.call(m, r#"{"ID":"missing"}"#);
        assert!(err_of(&r).contains("does not exist"), "{m}: {r}");
    }
    let r = p.call("GraphDriver.Create", r#"{"ID":"x","Parent":"missing"}"#);
    assert!(err_of(&r).contains("missing"), "{r}");
    // Bad ids.
    for id in ["", "../etc", "a/b", ".."] {
        let r = p.call("GraphDriver.Create", &format!(r#"{{"ID":"{id}"}}"#));
        assert!(err_of(&r).contains("invalid layer id"), "{id}: {r}");
    }
    // Malformed JSON, wrong types, unknown methods.
    for body in [
        "{",
        "[1,2]",
        r#"{"ID":5}"#,
        "\u{0}garbage",
        r#"{"ID":"x","StorageOpt":"no"}"#,
    ] {
        let r = p.call("GraphDriver.Create", body);
        assert!(err_of(&r).contains("malformed request"), "{body}: {r}");
    }
    assert!(err_of(&p.call("GraphDriver.Frobnicate", "{}")).contains("unknown method"));
    assert!(err_of(&p.call("Nope", "")).contains("unknown method"));
    // Storage options: size only, in Docker's units; nothing is made on a
    // bad one.
    for (opts, says) in [
        (r#"{"size":"abc"}"#, "invalid size \"abc\""),
        (r#"{"size":"-1"}"#, "invalid size \"-1\""),
        (r#"{"quota":"1G"}"#, "unknown storage option \"quota\""),
    ] {
        let body = format!(r#"{{"ID":"bad-opt","StorageOpt":{opts}}}"#);
        let r = p.call("GraphDriver.CreateReadWrite", &body);
        assert!(err_of(&r).contains(says), "{opts}: {r}");
        assert!(p.engine.layer_id("bad-opt").is_err());
    }
    assert!(
        err_of(&p.call("GraphDriver.Init", r#"{"Home":"/x","Opts":["frob=1"]}"#))
            .contains("unknown storage option \"frob\"")
    );
    // Duplicate create.
    p.create("dup", "");
    assert!(!err_of(&p.call("GraphDriver.Create", r#"{"ID":"dup"}"#)).is_empty());
    // Diff fails only by status.
    let (status, _) = p.diff("missing", "");
    assert_eq!(status, 500);
    // Not POST.
    let (status, _, _) = p.raw(b"GET /Plugin.Activate HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 405);
    // A JSON body that is too big is refused, not buffered.
    let big = vec![b' '; (lcfs_dockerplugin::MAX_JSON_BYTES + 10) as usize];
    let (_, _, body) = p.post("GraphDriver.Exists", &big, true);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(err_of(&v).contains("larger than"));
    // Garbage on the wire: the server survives and still answers.
    let _ = p.raw(b"\x00\x01\x02 not http at all\r\n\r\n");
    assert_eq!(
        p.call("Plugin.Activate", ""),
        json!({"Implements": ["GraphDriver"]})
    );
}

#[test]
fn chunked_json_request_bodies_are_read() {
    let p = Plugin::start();
    let (status, headers, body) = p.post("GraphDriver.Create", br#"{"ID":"chunky"}"#, true);
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v == "application/vnd.docker.plugins.v1+json"));
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), json!({}));
    assert!(p.engine.layer_id("chunky").is_ok());
}

#[test]
fn concurrent_calls_on_one_id_are_safe() {
    let p = Arc::new(Plugin::start());
    p.create("base", "");
    let mut threads = Vec::new();
    for t in 0..8 {
        let p = p.clone();
        threads.push(std::thread::spawn(move || {
            let mut ok_creates = 0;
            for i in 0..20 {
                let r = p.call(
                    "GraphDriver.CreateReadWrite",
                    r#"{"ID":"same","Parent":"base"}"#,
                );
                if r == json!({}) {
                    ok_creates += 1;
                } else {
                    assert!(!err_of(&r).is_empty());
                }
                let g = p.call("GraphDriver.Get", r#"{"ID":"same"}"#);
                if g.get("Dir").is_some() {
                    assert_eq!(g["Dir"], json!(format!("{MOUNT}/same")));
                    p.call("GraphDriver.Put", r#"{"ID":"same"}"#);
                }
                if (t + i) % 3 == 0 {
                    let r = p.call("GraphDriver.Remove", r#"{"ID":"same"}"#);
                    assert!(r == json!({}) || !err_of(&r).is_empty());
                }
                p.call("GraphDriver.Exists", r#"{"ID":"same"}"#);
            }
            ok_creates
        }));
    }
    let creates: i32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(creates >= 1);
    // The server still answers, and the engine is consistent.
    assert_eq!(
        p.call("Plugin.Activate", "null")["Implements"],
        json!(["GraphDriver"])
    );
    let report = p.engine.fsck(true).unwrap();
    assert!(report.errors.is_empty(), "{report:?}");
}

/// `--storage-opt size=` limits a container layer: the limit is the
/// layer's, shown by GetMetadata; `dockerd --storage-opt size=` (given at
/// Init) is the default for container layers that set none; image layers
/// get none.
#[test]
fn size_storage_option_limits_the_layer() {
    let p = Plugin::start();
    p.create("image", "");
    let r = p.call(
        "GraphDriver.CreateReadWrite",
        r#"{"ID":"c1","Parent":"image","StorageOpt":{"size":"64M"}}"#,
    );
    assert!(r.get("Err").is_none(), "{r}");
    assert_eq!(
        p.engine.layer_info("c1").unwrap().quota_bytes,
        Some(64 << 20)
    );
    let c1 = p.engine.layer_id("c1").unwrap();
    let f = p
        .engine
        .create(c1, lcfs_engine::ROOT_INODE, b"big", 0o644, 0, 0)
        .unwrap();
    let err = p
        .engine
        .write(c1, f.inode, 0, &vec![1u8; 65 << 20])
        .unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC);
    let meta = p.call("GraphDriver.GetMetadata", r#"{"ID":"c1"}"#);
    assert_eq!(
        meta["Metadata"]["SizeLimit"],
        json!((64u64 << 20).to_string())
    );

    let r = p.call("GraphDriver.Init", r#"{"Home":"/x","Opts":["size=1G"]}"#);
    assert!(r.get("Err").is_none(), "{r}");
    let r = p.call(
        "GraphDriver.CreateReadWrite",
        r#"{"ID":"c2","Parent":"image"}"#,
    );
    assert!(r.get("Err").is_none(), "{r}");
    assert_eq!(
        p.engine.layer_info("c2").unwrap().quota_bytes,
        Some(1 << 30)
    );
    // An explicit size wins; size=0 is no limit.
    let r = p.call(
        "GraphDriver.CreateReadWrite",
        r#"{"ID":"c3","Parent":"image","StorageOpt":{"size":"0"}}"#,
    );
    assert!(r.get("Err").is_none(), "{r}");
    assert_eq!(p.engine.layer_info("c3").unwrap().quota_bytes, None);
    p.create("layer2", "image");
    assert_eq!(p.engine.layer_info("layer2").unwrap().quota_bytes, None);
}
