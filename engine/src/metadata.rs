//! Layer metadata: a small string map kept with each layer in the layer
//! table, for front ends that need to remember something about a layer
//! across restarts (containerd's snapshot key and labels, a size limit).
//!
//! The map is encoded as one byte string and cut into chunks stored under
//! `(layer id, KIND_LAYER_META, chunk index)`. Every update rewrites the whole
//! map: maps are small (bounded by [`MAX_METADATA_BYTES`]) and updated rarely,
//! so this keeps the encoding trivial. A layer without metadata has no keys.

use crate::error::{Error, Result};
use crate::format::{Key, Reader, KIND_LAYER_META, MAX_VALUE_BYTES};
use crate::store::{Store, Tree};
use std::collections::BTreeMap;

/// A layer's metadata: keys and values are UTF-8 strings.
pub type LayerMetadata = BTreeMap<String, String>;

/// The most bytes one layer's encoded metadata may take.
pub const MAX_METADATA_BYTES: usize = 256 << 10;
/// Bytes per stored chunk: well under one tree value, so a leaf holds a few.
const CHUNK_BYTES: usize = 1024;
const _: () = assert!(CHUNK_BYTES <= MAX_VALUE_BYTES);

/// Encodes a map: u32 count, then per entry u32 key length, key, u32 value
/// length, value (little-endian).
pub(crate) fn encode(map: &LayerMetadata) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    v.extend_from_slice(&(map.len() as u32).to_le_bytes());
    for (k, val) in map {
        for s in [k, val] {
            v.extend_from_slice(&(s.len() as u32).to_le_bytes());
            v.extend_from_slice(s.as_bytes());
        }
        if v.len() > MAX_METADATA_BYTES {
            return Err(Error::Invalid(format!(
                "layer metadata over {} KiB",
                MAX_METADATA_BYTES >> 10
            )));
        }
    }
    Ok(v)
}

pub(crate) fn decode(b: &[u8]) -> Result<LayerMetadata> {
    let mut r = Reader::new(b);
    let n = r.u32()? as usize;
    let mut map = LayerMetadata::new();
    for _ in 0..n {
        let mut pair = [String::new(), String::new()];
        for s in &mut pair {
            let len = r.u32()? as usize;
            *s = String::from_utf8(r.bytes(len)?.to_vec())
                .map_err(|_| Error::corrupt(0, "layer metadata is not UTF-8"))?;
        }
        let [k, v] = pair;
        map.insert(k, v);
    }
    if r.rest() != 0 {
        return Err(Error::corrupt(0, "trailing bytes after layer metadata"));
    }
    Ok(map)
}

fn chunk_key(layer: u64, index: u64) -> Key {
    Key::new(layer, KIND_LAYER_META, index)
}

impl Store {
    /// The chunks of a layer's metadata as stored, in order.
    fn metadata_chunks(&mut self, layer: u64) -> Result<Vec<(Key, Vec<u8>)>> {
        let mut chunks = Vec::new();
        let root = self.layers.root();
        self.scan(
            Tree::Layer(0),
            root,
            chunk_key(layer, 0),
            chunk_key(layer, u64::MAX),
            &mut |k, v| {
                chunks.push((*k, v.to_vec()));
                true
            },
        )?;
        Ok(chunks)
    }

    pub(crate) fn layer_metadata(&mut self, layer: u64) -> Result<LayerMetadata> {
        self.layer(layer)?;
        let chunks = self.metadata_chunks(layer)?;
        if chunks.is_empty() {
            return Ok(LayerMetadata::new());
        }
        let mut bytes = Vec::new();
        for (i, (k, v)) in chunks.into_iter().enumerate() {
            if k.offset != i as u64 {
                return Err(Error::corrupt(
                    0,
                    format!("layer {layer} metadata chunk {i} missing"),
                ));
            }
            bytes.extend_from_slice(&v);
        }
        decode(&bytes)
    }

    /// Replaces a layer's metadata (frozen layers too: it is not content).
    /// The map is checked before anything changes.
    pub(crate) fn set_layer_metadata(&mut self, layer: u64, map: &LayerMetadata) -> Result<()> {
        self.check_writable()?;
        self.layer(layer)?;
        let bytes = encode(map)?;
        self.ensure_space(0, false)?;
        self.remove_layer_metadata(layer)?;
        if !map.is_empty() {
            let items = bytes
                .chunks(CHUNK_BYTES)
                .enumerate()
                .map(|(i, c)| (chunk_key(layer, i as u64), c.to_vec()))
                .collect();
            let mut root = self.layers.root();
            let r = self.insert_sorted(Tree::Layer(0), &mut root, items);
            self.layers.set_root(root);
            r?;
        }
        self.bump();
        Ok(())
    }

    /// Deletes every metadata chunk of a layer.
    pub(crate) fn remove_layer_metadata(&mut self, layer: u64) -> Result<()> {
        let chunks = self.metadata_chunks(layer)?;
        let mut root = self.layers.root();
        for (k, _) in chunks {
            if let Err(e) = self.remove(Tree::Layer(0), &mut root, &k) {
                self.layers.set_root(root);
                return Err(e);
            }
        }
        self.layers.set_root(root);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let mut m = LayerMetadata::new();
        m.insert(
            "containerd.io/snapshot/key".into(),
            "k8s.io/1/sha256:ab".into(),
        );
        m.insert("".into(), "ünïcode".into());
        assert_eq!(decode(&encode(&m).unwrap()).unwrap(), m);
        assert!(decode(&[1, 0, 0, 0, 9]).is_err());
        let mut big = LayerMetadata::new();
        big.insert("k".into(), "x".repeat(MAX_METADATA_BYTES));
        assert!(matches!(encode(&big), Err(Error::Invalid(_))));
    }
}
