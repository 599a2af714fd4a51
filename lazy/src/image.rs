//! Whole images to eStargz (docs/lazy.md, "Images"): a `docker save`
//! archive or an OCI image layout (a directory or its tar) in, an OCI
//! image layout directory out, every layer rewritten by
//! [`crate::estargz::build`] with its TOC digest and uncompressed size in
//! the layer's annotations and its new DiffID in the config. The result
//! is an ordinary image (`ctr images import`, `skopeo copy oci:DIR ...`);
//! a lazy pull reads its layers from their TOCs.

use crate::estargz::{self, BuildOptions, Error, Result};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// The largest manifest, index or config read.
const MAX_JSON: u64 = 16 << 20;

/// What [`convert`] wrote.
#[derive(Debug, Clone)]
pub struct Converted {
    pub manifest_digest: String,
    pub manifest_size: u64,
    pub name: Option<String>,
    pub layers: Vec<estargz::Built>,
}

fn input_err(m: impl Into<String>) -> Error {
    Error::Input(m.into())
}

/// Converts image `input` into a new OCI layout directory `output`
/// (which must not exist). `name` (else the archive's first tag) names
/// the image in the layout's index.
pub fn convert(
    input: &Path,
    output: &Path,
    name: Option<&str>,
    options: &BuildOptions,
) -> Result<Converted> {
    let unpacked;
    let root = if input.is_dir() {
        input.to_path_buf()
    } else {
        unpacked = tempfile::tempdir()?;
        unpack(input, unpacked.path())?;
        unpacked.path().to_path_buf()
    };
    let (config, layers, tag) = read_image(&root)?;
    std::fs::create_dir(output).map_err(|e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("creating {}: {e}", output.display()),
        ))
    })?;
    let done = write_layout(
        output,
        config,
        &layers,
        name.map(str::to_string).or(tag),
        options,
    );
    if done.is_err() {
        let _ = std::fs::remove_dir_all(output);
    }
    done
}

/// Unpacks the regular files of an image archive (names only below the
/// archive's root; anything else is refused).
fn unpack(archive: &Path, into: &Path) -> Result<()> {
    let f = std::fs::File::open(archive)?;
    let mut a = tar::Archive::new(f);
    for e in a
        .entries()
        .map_err(|e| input_err(format!("{}: {e}", archive.display())))?
    {
        let mut e = e.map_err(|e| input_err(format!("{}: {e}", archive.display())))?;
        let path = e.path().map_err(|e| input_err(e.to_string()))?.into_owned();
        if !path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(input_err(format!(
                "{}: the entry {} leaves the archive",
                archive.display(),
                path.display()
            )));
        }
        match e.header().entry_type() {
            tar::EntryType::Directory => std::fs::create_dir_all(into.join(&path))?,
            tar::EntryType::Regular => {
                let to = into.join(&path);
                if let Some(p) = to.parent() {
                    std::fs::create_dir_all(p)?;
                }
                let mut out = std::fs::File::create(&to)?;
                std::io::copy(&mut e, &mut out)?;
            }
            // docker save links identical layers; neither kind is needed
            // by a well-formed archive otherwise.
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = e
                    .link_name()
                    .map_err(|e| input_err(e.to_string()))?
                    .ok_or_else(|| input_err("a link without a target"))?
                    .into_owned();
                let base = path.parent().unwrap_or(Path::new(""));
                let resolved = if e.header().entry_type() == tar::EntryType::Link {
                    target.clone()
                } else {
                    base.join(&target)
                };
                let clean = lexical(&resolved).ok_or_else(|| {
                    input_err(format!("the link {} leaves the archive", path.display()))
                })?;
                let to = into.join(&path);
                if let Some(p) = to.parent() {
                    std::fs::create_dir_all(p)?;
                }
                std::fs::copy(into.join(clean), &to)?;
            }
            other => {
                return Err(input_err(format!(
                    "{}: an entry of type {other:?} in an image archive",
                    path.display()
                )))
            }
        }
    }
    Ok(())
}

/// A relative path with `..` resolved, if it stays below the root.
fn lexical(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            _ => return None,
        }
    }
    Some(out)
}

/// `rel` below `root`, refused if it leaves it.
fn inside(root: &Path, rel: &str) -> Result<PathBuf> {
    lexical(Path::new(rel))
        .map(|p| root.join(p))
        .ok_or_else(|| input_err(format!("{rel:?} leaves the image")))
}

fn read_json(root: &Path, rel: &str) -> Result<Value> {
    let f = std::fs::File::open(inside(root, rel)?)
        .map_err(|e| input_err(format!("the image has no {rel}: {e}")))?;
    let mut text = Vec::new();
    f.take(MAX_JSON + 1).read_to_end(&mut text)?;
    if text.len() as u64 > MAX_JSON {
        return Err(input_err(format!("{rel} is larger than {MAX_JSON} bytes")));
    }
    serde_json::from_slice(&text).map_err(|e| input_err(format!("{rel}: {e}")))
}

fn blob_path(digest: &str) -> Result<String> {
    match digest.strip_prefix("sha256:") {
        Some(h) if estargz::valid_digest(digest) => Ok(format!("blobs/sha256/{h}")),
        _ => Err(input_err(format!("{digest:?} is not a sha256 digest"))),
    }
}

/// The config, the layers' files and the first tag: from `manifest.json`
/// (docker save), else from `index.json` (an OCI layout).
fn read_image(root: &Path) -> Result<(Value, Vec<PathBuf>, Option<String>)> {
    if root.join("manifest.json").exists() {
        let m = read_json(root, "manifest.json")?;
        let first = m
            .as_array()
            .and_then(|a| a.first())
            .ok_or_else(|| input_err("manifest.json names no image"))?;
        if m.as_array().map(Vec::len) != Some(1) {
            return Err(input_err("the archive holds more than one image; save one"));
        }
        let config = read_json(
            root,
            first["Config"]
                .as_str()
                .ok_or_else(|| input_err("manifest.json: no Config"))?,
        )?;
        let layers = first["Layers"]
            .as_array()
            .ok_or_else(|| input_err("manifest.json: no Layers"))?
            .iter()
            .map(|l| inside(root, l.as_str().unwrap_or("")))
            .collect::<Result<Vec<_>>>()?;
        let tag = first["RepoTags"]
            .as_array()
            .and_then(|t| t.first())
            .and_then(|t| t.as_str())
            .map(str::to_string);
        return Ok((config, layers, tag));
    }
    let index = read_json(root, "index.json")?;
    let mut desc = index["manifests"]
        .as_array()
        .and_then(|a| a.first())
        .cloned()
        .ok_or_else(|| input_err("index.json names no manifest"))?;
    let tag = desc["annotations"]["io.containerd.image.name"]
        .as_str()
        .or(desc["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .map(str::to_string);
    for _ in 0..4 {
        let m = read_json(root, &blob_path(desc["digest"].as_str().unwrap_or(""))?)?;
        if let Some(list) = m["manifests"].as_array() {
            // An index: its linux/amd64 image.
            desc = list
                .iter()
                .find(|d| {
                    d["platform"]["os"] == "linux" && d["platform"]["architecture"] == "amd64"
                })
                .or(list.first())
                .cloned()
                .ok_or_else(|| input_err("an empty image index"))?;
            continue;
        }
        let config = read_json(
            root,
            &blob_path(m["config"]["digest"].as_str().unwrap_or(""))?,
        )?;
        let layers = m["layers"]
            .as_array()
            .ok_or_else(|| input_err("the manifest has no layers"))?
            .iter()
            .map(|l| inside(root, &blob_path(l["digest"].as_str().unwrap_or(""))?))
            .collect::<Result<Vec<_>>>()?;
        return Ok((config, layers, tag));
    }
    Err(input_err("image indexes nested too deep"))
}

/// Writes `data` as a blob of the layout; its digest.
fn put_blob(out: &Path, data: &[u8]) -> Result<String> {
    let digest = estargz::sha256_digest(data);
    std::fs::write(out.join(blob_path(&digest)?), data)?;
    Ok(digest)
}

fn write_layout(
    out: &Path,
    mut config: Value,
    layers: &[PathBuf],
    name: Option<String>,
    options: &BuildOptions,
) -> Result<Converted> {
    std::fs::create_dir_all(out.join("blobs/sha256"))?;
    std::fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut built = Vec::new();
    let mut descriptors = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let input = std::fs::File::open(layer)
            .map_err(|e| input_err(format!("layer {i} ({}): {e}", layer.display())))?;
        let tmp = out.join(format!("blobs/sha256/.layer-{i}"));
        let w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let b = estargz::build_file(input, w, options)
            .map_err(|e| input_err(format!("layer {i}: {e}")))?;
        let hex = b.blob_digest.trim_start_matches("sha256:");
        std::fs::rename(&tmp, out.join("blobs/sha256").join(hex))?;
        descriptors.push(json!({
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": b.blob_digest,
            "size": b.blob_size,
            "annotations": {
                estargz::TOC_DIGEST_ANNOTATION: b.toc_digest,
                estargz::UNCOMPRESSED_SIZE_ANNOTATION: b.uncompressed_size.to_string(),
            },
        }));
        built.push(b);
    }
    let diff_ids: Vec<Value> = built.iter().map(|b| json!(b.diff_id)).collect();
    match config.get_mut("rootfs") {
        Some(rootfs) if rootfs.is_object() => rootfs["diff_ids"] = Value::Array(diff_ids),
        _ => return Err(input_err("the image config has no rootfs")),
    }
    let config_bytes = serde_json::to_vec(&config).map_err(|e| input_err(e.to_string()))?;
    let config_digest = put_blob(out, &config_bytes)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config_bytes.len()},
        "layers": descriptors,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| input_err(e.to_string()))?;
    let manifest_digest = put_blob(out, &manifest_bytes)?;
    let mut desc = json!({
        "mediaType": MANIFEST_MEDIA_TYPE,
        "digest": manifest_digest,
        "size": manifest_bytes.len(),
    });
    if let Some(n) = &name {
        let tag = n
            .rsplit_once(':')
            .filter(|(_, t)| !t.contains('/'))
            .map(|(_, t)| t)
            .unwrap_or("latest");
        desc["annotations"] = json!({
            "io.containerd.image.name": n,
            "org.opencontainers.image.ref.name": tag,
        });
    }
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [desc]});
    let mut f = std::fs::File::create(out.join("index.json"))?;
    f.write_all(&serde_json::to_vec(&index).map_err(|e| input_err(e.to_string()))?)?;
    Ok(Converted {
        manifest_digest,
        manifest_size: manifest_bytes.len() as u64,
        name,
        layers: built,
    })
}
