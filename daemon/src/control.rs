//! Executes control requests on the engine: one JSON line in, one JSON
//! response out. No I/O here (the socket side is server.rs), so every request
//! shape can be tested on an in-memory engine.

use crate::protocol::{self, failure, success, FsckReport, Layer, Ping, Stats, OPS};
use lcfs_engine::Engine;
use lcfs_fsfront::{LayerError, LayerOps, Mount};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

/// What a request is executed against.
pub struct Control {
    /// The engine, and the FUSE mount's cache kept right as layers change
    /// (the same operations the Docker plugin uses).
    pub layers: LayerOps,
    pub device: PathBuf,
    pub mountpoint: PathBuf,
    /// The Docker plugin's call counters, when the daemon serves it.
    pub plugin_calls: Option<Arc<lcfs_dockerplugin::CallCounters>>,
    /// The FUSE mount, for its passthrough counters (None in tests).
    pub mount: Option<Arc<RwLock<Option<Mount>>>>,
    /// Images and their hot files.
    pub catalog: Arc<crate::images::Catalog>,
    /// The image garbage collector (None in tests).
    pub gc: Option<Arc<crate::gc::Collector>>,
    /// Verifications running: file bytes read, and of how many when known
    /// (`layer.verify_progress`).
    pub verifying: Mutex<HashMap<String, (u64, Option<u64>)>>,
    /// The registry mirror's counters, when it runs.
    pub mirror: Option<Arc<lcfs_mirror::Counters>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GcArgs {
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    orphans: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatisticsArgs {
    #[serde(default)]
    enabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilesArgs {
    #[serde(default)]
    image: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateArgs {
    name: String,
    #[serde(default)]
    parent: Option<String>,
    #[serde(default)]
    cold: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameArgs {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DigestArgs {
    name: String,
    /// Where to write the layer's manifest (an absolute path), if wanted.
    #[serde(default)]
    manifest: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyArgs {
    name: String,
    /// A manifest `layer.digest` wrote (an absolute path); without one, the
    /// layer is checked against its seal.
    #[serde(default)]
    manifest: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyReadsArgs {
    name: String,
    on: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FsckArgs {
    #[serde(default)]
    verify_data: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

/// A request that cannot be executed, with the errno to answer.
struct Refusal {
    errno: i32,
    message: String,
}

impl Refusal {
    fn invalid(message: impl Into<String>) -> Refusal {
        Refusal {
            errno: libc::EINVAL,
            message: message.into(),
        }
    }

    /// A command's error: the engine's errno, EINVAL for the rest.
    fn from_error(e: crate::error::Error) -> Refusal {
        let errno = match &e {
            crate::error::Error::Engine { source, .. } => source.errno(),
            crate::error::Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EINVAL,
        };
        Refusal {
            errno,
            message: e.to_string(),
        }
    }

    fn engine(context: &str, e: lcfs_engine::Error) -> Refusal {
        Refusal {
            errno: e.errno(),
            message: format!("{context}: {e}"),
        }
    }

    fn layer(context: &str, e: LayerError) -> Refusal {
        Refusal {
            errno: e.errno(),
            message: format!("{context}: {e}"),
        }
    }
}

fn args<T: DeserializeOwned>(op: &str, rest: Map<String, Value>) -> Result<T, Refusal> {
    serde_json::from_value(Value::Object(rest)).map_err(|e| Refusal::invalid(format!("{op}: {e}")))
}

impl Control {
    /// Answers one request line (without its newline). Never panics on input.
    pub fn handle_line(&self, line: &[u8]) -> Value {
        match self.execute(line) {
            Ok(result) => success(result),
            Err(r) => failure(r.errno, r.message),
        }
    }

    fn execute(&self, line: &[u8]) -> Result<Value, Refusal> {
        let request: Value = serde_json::from_slice(line)
            .map_err(|e| Refusal::invalid(format!("malformed JSON: {e}")))?;
        let Value::Object(mut fields) = request else {
            return Err(Refusal::invalid("a request must be a JSON object"));
        };
        let op = match fields.remove("op") {
            Some(Value::String(op)) => op,
            Some(_) => return Err(Refusal::invalid("\"op\" must be a string")),
            None => return Err(Refusal::invalid("missing field `op`")),
        };
        log::debug!("control request {op}");
        match op.as_str() {
            "layer.create" => {
                let a: CreateArgs = args(&op, fields)?;
                let context = match &a.parent {
                    None => format!("create layer {:?}", a.name),
                    Some(parent) => format!("clone layer {parent:?} into {:?}", a.name),
                };
                self.layers
                    .create(&a.name, a.parent.as_deref(), a.cold)
                    .map_err(|e| Refusal::layer(&context, e))?;
                log::info!("{context}");
                self.layer(&a.name)
            }
            "layer.commit" => {
                let a: NameArgs = args(&op, fields)?;
                let context = format!("commit layer {:?}", a.name);
                self.layers
                    .commit(&a.name)
                    .map_err(|e| Refusal::layer(&context, e))?;
                log::info!("{context}");
                self.layer(&a.name)
            }
            "layer.remove" => {
                let a: NameArgs = args(&op, fields)?;
                let context = format!("remove layer {:?}", a.name);
                self.layers
                    .remove(&a.name)
                    .map_err(|e| Refusal::layer(&context, e))?;
                log::info!("{context}");
                Ok(Value::Null)
            }
            "layer.list" => {
                let _: NoArgs = args(&op, fields)?;
                to_value(&self.catalog.layers())
            }
            "gc.run" => {
                let a: GcArgs = args(&op, fields)?;
                let gc = self
                    .gc
                    .as_ref()
                    .ok_or_else(|| Refusal::invalid("this daemon runs no garbage collector"))?;
                to_value(&gc.pass(a.dry_run, a.orphans))
            }
            "gc.reload" => {
                let _: NoArgs = args(&op, fields)?;
                let gc = self
                    .gc
                    .as_ref()
                    .ok_or_else(|| Refusal::invalid("this daemon runs no garbage collector"))?;
                let policy = gc.reload().map_err(|e| {
                    Refusal::invalid(format!("{e} (the policy in force is unchanged)"))
                })?;
                to_value(&policy)
            }
            "statistics" => {
                let a: StatisticsArgs = args(&op, fields)?;
                if let Some(on) = a.enabled {
                    lcfs_engine::set_stats_enabled(on);
                    log::info!("statistics {}", if on { "on" } else { "off" });
                }
                Ok(serde_json::json!({ "enabled": lcfs_engine::stats_enabled() }))
            }
            "image.list" => {
                let _: NoArgs = args(&op, fields)?;
                to_value(&self.catalog.images(crate::client::TopSort::Clones))
            }
            "image.files" => {
                let a: FilesArgs = args(&op, fields)?;
                let rows = self
                    .catalog
                    .files(a.image.as_deref())
                    .map_err(|message| Refusal {
                        errno: libc::ENOENT,
                        message,
                    })?;
                to_value(&rows)
            }
            "layer.stat" => {
                let a: NameArgs = args(&op, fields)?;
                // Its sizes count what the kernel still caches.
                self.write_back()?;
                self.layer(&a.name)
            }
            "layer.digest" => {
                let a: DigestArgs = args(&op, fields)?;
                // The digest covers what the kernel still caches.
                self.write_back()?;
                let d = crate::fsck::digest_with_manifest(
                    self.engine(),
                    &a.name,
                    a.manifest.as_deref().map(std::path::Path::new),
                )
                .map_err(Refusal::from_error)?;
                to_value(&d)
            }
            "layer.verify" => {
                let a: VerifyArgs = args(&op, fields)?;
                self.write_back()?;
                let v = match &a.manifest {
                    Some(m) => crate::fsck::verify(self.engine(), &a.name, std::path::Path::new(m)),
                    None => {
                        let set = |p| {
                            self.verifying
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(a.name.clone(), p);
                        };
                        let v = crate::fsck::verify_sealed(self.engine(), &a.name, &mut |b, t| {
                            set((b, t))
                        });
                        self.verifying
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&a.name);
                        v
                    }
                };
                to_value(&v.map_err(Refusal::from_error)?)
            }
            "layer.verify_progress" => {
                let a: NameArgs = args(&op, fields)?;
                let p = self
                    .verifying
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&a.name)
                    .copied();
                Ok(match p {
                    Some((done, total)) => json!({"done_bytes": done, "total_bytes": total}),
                    None => Value::Null,
                })
            }
            "layer.verify_reads" => {
                let a: VerifyReadsArgs = args(&op, fields)?;
                self.engine()
                    .set_layer_verify_reads(&a.name, a.on)
                    .map_err(|e| Refusal::engine(&format!("layer {:?}", a.name), e))?;
                self.layer(&a.name)
            }
            "sync" => {
                let _: NoArgs = args(&op, fields)?;
                self.layers.sync().map_err(|e| Refusal::layer("sync", e))?;
                Ok(Value::Null)
            }
            "lazy" => {
                let _: NoArgs = args(&op, fields)?;
                Ok(serde_json::to_value(self.catalog.lazy_layers()).expect("serializable"))
            }
            "stats" => {
                let _: NoArgs = args(&op, fields)?;
                let mut stats =
                    Stats::from_engine(&self.engine().stats(), &self.device, &self.mountpoint);
                stats.plugin = self
                    .plugin_calls
                    .as_ref()
                    .map(|calls| protocol::PluginCalls::from(&calls.snapshot()));
                stats.passthrough = self
                    .mount
                    .as_ref()
                    .and_then(|m| {
                        let m = m.read().unwrap_or_else(|p| p.into_inner());
                        m.as_ref().and_then(|m| m.passthrough_stats())
                    })
                    .map(|p| protocol::Passthrough {
                        active: p.active,
                        opens: p.opens,
                        direct_opens: p.direct_opens,
                    });
                stats.mirror = self.mirror.as_ref().map(|c| {
                    c.values()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect()
                });
                to_value(&stats)
            }
            "fsck" => {
                let a: FsckArgs = args(&op, fields)?;
                self.write_back()?;
                let report = self
                    .engine()
                    .fsck(a.verify_data)
                    .map_err(|e| Refusal::engine("fsck", e))?;
                if !report.is_clean() {
                    log::warn!("fsck found {} problems", report.errors.len());
                }
                to_value(&FsckReport::from(&report))
            }
            "ping" => {
                let _: NoArgs = args(&op, fields)?;
                to_value(&Ping {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    pid: std::process::id(),
                    device: self.device.display().to_string(),
                    mountpoint: self.mountpoint.display().to_string(),
                })
            }
            _ => Err(Refusal {
                errno: libc::ENOSYS,
                message: format!("unknown op {op:?} (known: {})", OPS.join(", ")),
            }),
        }
    }

    /// Has the mount write back what the kernel caches of writes, so the
    /// engine holds every write made before this request.
    fn write_back(&self) -> Result<(), Refusal> {
        self.layers
            .write_back()
            .map_err(|e| Refusal::layer("before reading the layers", e))
    }

    fn engine(&self) -> &Arc<Engine> {
        self.layers.engine()
    }

    fn layer(&self, name: &str) -> Result<Value, Refusal> {
        let info = self
            .engine()
            .layer_info(name)
            .map_err(|e| Refusal::engine(&format!("layer {name:?}"), e))?;
        let mut layer = Layer::from_info(&info, &self.mountpoint);
        layer.diff_id = self
            .engine()
            .layer_metadata(name)
            .map_err(|e| Refusal::engine(&format!("metadata of layer {name:?}"), e))?
            .remove(lcfs_dockerplugin::DIFF_ID_KEY);
        layer.verified_reads = self.engine().reads_verified(info.id);
        to_value(&layer)
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, Refusal> {
    serde_json::to_value(v).map_err(|e| Refusal {
        errno: libc::EIO,
        message: format!("encoding the answer: {e}"),
    })
}

/// The refusal for a line longer than [`protocol::MAX_LINE_BYTES`].
pub fn oversized() -> Value {
    failure(
        libc::EMSGSIZE,
        format!(
            "request line longer than {} bytes; closing the connection",
            protocol::MAX_LINE_BYTES
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use lcfs_engine::device::MemDevice;
    use lcfs_engine::{Config, FormatOptions};
    use lcfs_fsfront::KernelCache;
    use std::sync::Mutex;

    fn control() -> (Control, Arc<Recorder>) {
        let dev: Arc<dyn lcfs_engine::device::Device> = Arc::new(MemDevice::new(64 << 20));
        Engine::format(
            dev.clone(),
            &FormatOptions {
                segment_size_bytes: 256 << 10,
                force: false,
            },
        )
        .unwrap();
        let engine = Engine::open(
            dev,
            Config {
                flush_interval_ms: 0,
                checkpoint_interval_ms: 0,
                ..Config::default()
            },
        )
        .unwrap();
        let kernel = Arc::new(Recorder::default());
        let control = Control {
            catalog: Arc::new(crate::images::Catalog::new(
                engine.clone(),
                "/mnt/lcfs".as_ref(),
            )),
            layers: LayerOps::new(engine, kernel.clone()),
            device: "/dev/test".into(),
            mountpoint: "/mnt/lcfs".into(),
            plugin_calls: None,
            mount: None,
            gc: None,
            verifying: Default::default(),
            mirror: None,
        };
        (control, kernel)
    }

    /// Stands in for the FUSE mount: what the control told it, in order.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl KernelCache for Recorder {
        fn forget_layer_entry(&self, layer: &str) {
            self.0.lock().unwrap().push(format!("forget {layer}"));
        }

        fn write_back(&self) -> std::io::Result<()> {
            self.0.lock().unwrap().push("write back".into());
            Ok(())
        }
    }

    fn call(c: &Control, request: &str) -> Value {
        c.handle_line(request.as_bytes())
    }

    fn errno(v: &Value) -> i64 {
        assert_eq!(v["ok"], false, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        v["error"]["errno"].as_i64().unwrap()
    }

    #[test]
    fn layer_lifecycle() {
        let (c, kernel) = control();
        let r = call(&c, r#"{"op":"layer.create","name":"base","cold":true}"#);
        assert_eq!(r["ok"], true, "{r}");
        let base: Layer = serde_json::from_value(r["result"].clone()).unwrap();
        assert_eq!(base.name, "base");
        assert!(base.cold && !base.frozen);
        assert_eq!(base.path, "/mnt/lcfs/base");

        let r = call(&c, r#"{"op":"layer.create","name":"c1","parent":"base"}"#);
        let c1: Layer = serde_json::from_value(r["result"].clone()).unwrap();
        assert_eq!(c1.parent.as_deref(), Some("base"));
        let r = call(&c, r#"{"op":"layer.stat","name":"base"}"#);
        assert_eq!(r["result"]["frozen"], true, "a parent is frozen by cloning");
        assert_eq!(r["result"]["children"], 1);

        let r = call(&c, r#"{"op":"layer.commit","name":"c1"}"#);
        assert_eq!(r["result"]["frozen"], true);
        assert!(r["result"]["frozen_at"].is_string());
        let r = call(&c, r#"{"op":"layer.list"}"#);
        let names: Vec<&str> = r["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["base", "c1"]);

        assert_eq!(
            errno(&call(&c, r#"{"op":"layer.remove","name":"base"}"#)),
            libc::EBUSY as i64
        );
        let r = call(&c, r#"{"op":"layer.remove","name":"c1"}"#);
        assert_eq!(r, serde_json::json!({"ok": true, "result": null}));
        assert_eq!(
            errno(&call(&c, r#"{"op":"layer.stat","name":"c1"}"#)),
            libc::ENOENT as i64
        );
        assert_eq!(
            errno(&call(&c, r#"{"op":"layer.create","name":"base"}"#)),
            libc::EEXIST as i64
        );
        assert_eq!(
            *kernel.0.lock().unwrap(),
            [
                "forget base",
                "write back",
                "forget c1",
                "write back",
                "write back",
                "forget c1",
                "forget c1",
                "write back",
            ],
            "create, clone, commit and remove make the kernel forget the layer's entry; \
             clone, commit and stat first write back what the kernel caches"
        );
    }

    #[test]
    fn sync_stats_fsck_ping() {
        let (c, _) = control();
        call(&c, r#"{"op":"layer.create","name":"a"}"#);
        assert_eq!(call(&c, r#"{"op":"sync"}"#)["ok"], true);
        let r = call(&c, r#"{"op":"stats"}"#);
        let stats: Stats = serde_json::from_value(r["result"].clone()).unwrap();
        assert_eq!(stats.layers, 1);
        assert!(stats.device_io.writes > 0);
        let r = call(&c, r#"{"op":"fsck","verify_data":true}"#);
        let report: FsckReport = serde_json::from_value(r["result"].clone()).unwrap();
        assert!(report.clean, "{report:?}");
        let r = call(&c, r#"{"op":"ping"}"#);
        assert_eq!(r["result"]["pid"], std::process::id());
        assert_eq!(stats.plugin, None, "no plugin served, no plugin section");
    }

    #[test]
    fn stats_carry_the_plugin_calls() {
        let (mut c, _) = control();
        c.plugin_calls = Some(Arc::new(lcfs_dockerplugin::CallCounters::default()));
        let r = call(&c, r#"{"op":"stats"}"#);
        assert_eq!(
            r["result"]["plugin"],
            serde_json::json!({"calls": 0, "in_flight": 0, "busy_us": 0, "total_us": 0, "methods": {}})
        );
        let stats: Stats = serde_json::from_value(r["result"].clone()).unwrap();
        assert_eq!(stats.plugin, Some(protocol::PluginCalls::default()));
    }

    #[test]
    fn bad_requests_get_errors() {
        let (c, _) = control();
        let einval = libc::EINVAL as i64;
        for bad in [
            "",
            "{",
            "not json",
            "[1,2]",
            "null",
            r#"{"name":"x"}"#,
            r#"{"op":7}"#,
            r#"{"op":"layer.create"}"#,
            r#"{"op":"layer.create","name":5}"#,
            r#"{"op":"layer.create","name":"x","parnet":"y"}"#,
            r#"{"op":"layer.create","name":""}"#,
            r#"{"op":"layer.create","name":"a/b"}"#,
            r#"{"op":"sync","extra":1}"#,
            r#"{"op":"fsck","verify_data":"yes"}"#,
        ] {
            assert_eq!(errno(&c.handle_line(bad.as_bytes())), einval, "{bad}");
        }
        assert_eq!(errno(&c.handle_line(b"\xff\xfe")), einval);
        assert_eq!(
            errno(&call(&c, r#"{"op":"layer.explode"}"#)),
            libc::ENOSYS as i64
        );
        assert_eq!(
            errno(&call(&c, r#"{"op":"layer.clone","name":"x"}"#)),
            libc::ENOSYS as i64
        );
        assert_eq!(
            errno(&call(
                &c,
                r#"{"op":"layer.create","name":"x","parent":"nope"}"#
            )),
            libc::ENOENT as i64
        );
        // Deeply nested input is refused by the parser's recursion limit, not a stack overflow.
        let deep = "[".repeat(100_000);
        assert_eq!(errno(&c.handle_line(deep.as_bytes())), einval);
        assert_eq!(errno(&oversized()), libc::EMSGSIZE as i64);
    }
}
