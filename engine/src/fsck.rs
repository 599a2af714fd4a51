//! Whole-structure verification: checksums (every node is decoded and checked
//! on load), tree invariants, the address map, space accounting against the
//! segment table, the layer table, and each layer's filesystem semantics.

use crate::device::BLOCK_SIZE;
use crate::error::Result;
use crate::format::*;
use crate::fs::ROOT_INODE;
use crate::store::{Store, Tree, PHYS_TAG, VIRT_TAG};
use std::collections::HashMap;

/// What fsck found. `errors` empty means clean.
#[derive(Clone, Debug, Default)]
pub struct FsckReport {
    pub layers: usize,
    pub map_entries: u64,
    pub map_nodes: u64,
    pub tree_nodes: u64,
    pub inodes: u64,
    pub extents: u64,
    pub data_blocks_verified: u64,
    /// File blocks not fetched yet (a lazily pulled layer's, absent.rs).
    pub absent_blocks: u64,
    pub errors: Vec<String>,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
    fn error(&mut self, e: String) {
        if self.errors.len() < 1000 {
            self.errors.push(e);
        }
    }
}

struct Bitmap(Vec<u64>);

impl Bitmap {
    fn new(bits: u64) -> Bitmap {
        Bitmap(vec![0; bits.div_ceil(64) as usize + 1])
    }
    /// Sets a bit; returns whether it was already set.
    fn set(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        if w >= self.0.len() {
            return true;
        }
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        was
    }
    fn get(&self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        w < self.0.len() && self.0[w] & (1 << b) != 0
    }
}

pub(crate) fn run(s: &mut Store, verify_data: bool) -> Result<FsckReport> {
    let mut r = FsckReport {
        layers: s.layers.len(),
        ..Default::default()
    };
    let mut physical = Bitmap::new(s.geo.device_blocks);
    let mut mapped = Bitmap::new(s.address_map.next_lbn());
    let mut live = vec![0u32; s.geo.segment_count as usize];
    let mut map: Vec<(u64, MapValue)> = Vec::new();
    // Blocks with several owners (promotion): logical block -> (extra owners
    // the map records, owning extents found in the trees).
    let mut shared_owners: HashMap<u64, (u32, u32)> = HashMap::new();

    // 1. The address map.
    if s.address_map.root() != 0 {
        let root = s.address_map.root();
        let csum = s.address_map.root_checksum();
        walk_map(
            s,
            &mut r,
            root,
            csum,
            None,
            Key::MIN,
            Key::MAX,
            &mut physical,
            &mut live,
            &mut map,
        )?;
    }
    for (lbn, v) in &map {
        r.map_entries += 1;
        if *lbn >= s.address_map.next_lbn() {
            r.error(format!(
                "map entry for logical block {lbn} beyond next_lbn {}",
                s.address_map.next_lbn()
            ));
        }
        mapped.set(*lbn);
        if v.extra_owners > 0 {
            shared_owners.insert(*lbn, (v.extra_owners, 0));
        }
        if v.physical_block == crate::absent::ABSENT {
            r.absent_blocks += 1;
            continue;
        }
        match s.geo.segment_of(v.physical_block) {
            Some(seg) => live[seg as usize] += 1,
            None => r.error(format!("logical block {lbn} maps outside the data area")),
        }
        if physical.set(v.physical_block) {
            r.error(format!(
                "physical block {:#x} referenced twice",
                v.physical_block
            ));
        }
    }
    drop(map);

    // 2. Trees: structure once per node, ownership, references.
    let mut referenced = Bitmap::new(s.address_map.next_lbn());
    let mut visited = Bitmap::new(s.address_map.next_lbn());
    let mut trees: Vec<(u64, u64)> = vec![(0, s.layers.root())];
    let mut ids: Vec<u64> = s.layers.ids().collect();
    ids.sort_unstable();
    trees.extend(
        ids.iter()
            .map(|id| (*id, s.layers.get(*id).expect("listed").root)),
    );
    // Seal trees (seal.rs): every node the layer's own.
    trees.extend(ids.iter().filter_map(|id| {
        let seal = s.layers.get(*id).expect("listed").seal;
        (seal != 0).then_some((*id, seal))
    }));
    let ancestors: HashMap<u64, Vec<u64>> = ids
        .iter()
        .map(|&id| {
            let mut chain = vec![id];
            let mut cur = s.layers.get(id).expect("listed").parent;
            while cur != 0 && chain.len() < 100_000 {
                chain.push(cur);
                cur = s.layers.get(cur).map_or(0, |l| l.parent);
            }
            (id, chain)
        })
        .collect();
    let mut owned_count: HashMap<u64, u64> = HashMap::new();
    for &(layer, root) in &trees {
        if root == 0 {
            if layer != 0 {
                r.error(format!("layer {layer} has no tree"));
            }
            continue;
        }
        let allowed = ancestors.get(&layer).cloned().unwrap_or_else(|| vec![0]);
        let mut stack = vec![(root, None::<u8>, Key::MIN, Key::MAX)];
        while let Some((id, want_level, lo, hi)) = stack.pop() {
            referenced.set(id);
            if !s.nodes.is_dirty(id) && !mapped.get(id) {
                r.error(format!("tree node {id} of layer {layer} has no map entry"));
                continue;
            }
            let first_visit = !visited.set(id);
            let n = match s.node(Tree::Layer(layer), id, 0) {
                Ok(n) => n.clone(),
                Err(e) => {
                    r.error(format!("layer {layer} node {id}: {e}"));
                    continue;
                }
            };
            if !first_visit {
                continue; // shared with an ancestor's tree, already checked
            }
            r.tree_nodes += 1;
            if !allowed.contains(&n.owner) {
                r.error(format!(
                    "node {id} in layer {layer}'s tree is owned by layer {}, not an ancestor",
                    n.owner
                ));
            }
            if n.owner != 0 {
                *owned_count.entry(n.owner).or_default() += 1;
            }
            check_node_shape(
                &mut r,
                &n,
                want_level,
                lo,
                hi,
                &format!("layer {layer} node {id}"),
            );
            if n.level == 0 {
                for (k, v) in n.keys.iter().zip(&n.values) {
                    if k.kind != KIND_EXTENT || layer == 0 {
                        continue;
                    }
                    let Some(e) = extent(&mut r, k, v, (layer, false), &mapped, &mut referenced)
                    else {
                        continue;
                    };
                    if !ancestors
                        .get(&layer)
                        .is_some_and(|a| a.contains(&e.birth_layer))
                    {
                        r.error(format!(
                            "extent {k:?} born in layer {}, not an ancestor",
                            e.birth_layer
                        ));
                    }
                    // Ownership sits in the birth layer's own leaf; copies
                    // in descendants' leaves are references.
                    if e.birth_layer == n.owner {
                        *owned_count.entry(e.birth_layer).or_default() += 1;
                        if let Some((_, owners)) = shared_owners.get_mut(&e.lbn) {
                            *owners += 1;
                        }
                    }
                }
            } else {
                for (i, c) in n.children.iter().enumerate() {
                    let clo = n.keys[i];
                    let chi = n.keys.get(i + 1).copied().unwrap_or(hi);
                    stack.push((c.address, Some(n.level - 1), clo, chi));
                }
            }
        }
    }
    // Layers being removed: what is left on each list, and what the
    // removed layer owns below it, is live; nodes owned by an ancestor
    // belong to that ancestor's tree.
    let removing: Vec<(u64, Vec<u64>)> = s
        .removing
        .iter()
        .map(|(l, list)| (*l, list.clone()))
        .collect();
    for (layer, list) in removing {
        if s.layers.contains(layer) {
            r.error(format!("layer {layer} is both live and being removed"));
        }
        let mut stack = list;
        while let Some(id) = stack.pop() {
            referenced.set(id);
            if !s.nodes.is_dirty(id) && !mapped.get(id) {
                r.error(format!(
                    "node {id} left to free of removed layer {layer} has no map entry"
                ));
                continue;
            }
            let n = match s.node(Tree::Layer(layer), id, 0) {
                Ok(n) => n.clone(),
                Err(e) => {
                    r.error(format!("removed layer {layer} node {id}: {e}"));
                    continue;
                }
            };
            if n.owner != layer {
                continue;
            }
            if visited.set(id) {
                r.error(format!("node {id} of removed layer {layer} reached twice"));
                continue;
            }
            r.tree_nodes += 1;
            check_node_shape(
                &mut r,
                &n,
                None,
                Key::MIN,
                Key::MAX,
                &format!("removed layer {layer} node {id}"),
            );
            if n.level > 0 {
                stack.extend(n.children.iter().map(|c| c.address));
                continue;
            }
            for (k, v) in n.keys.iter().zip(&n.values) {
                if k.kind != KIND_EXTENT {
                    continue;
                }
                if let Some(e) = extent(&mut r, k, v, (layer, true), &mapped, &mut referenced) {
                    if e.birth_layer == layer {
                        if let Some((_, owners)) = shared_owners.get_mut(&e.lbn) {
                            *owners += 1;
                        }
                    }
                }
            }
        }
    }
    let mut shared: Vec<_> = shared_owners.into_iter().collect();
    shared.sort_unstable();
    for (lbn, (extra, owners)) in shared {
        if owners != extra + 1 {
            r.error(format!(
                "logical block {lbn} has {owners} owning extents, its map entry counts {}",
                extra + 1
            ));
        }
    }
    for lbn in 1..s.address_map.next_lbn() {
        if mapped.get(lbn) && !referenced.get(lbn) {
            r.error(format!(
                "logical block {lbn} is mapped but referenced by no tree (leak)"
            ));
        }
    }

    // 3. Space accounting.
    for (seg, (&counted, usage)) in live.iter().zip(s.space.usages()).enumerate() {
        if counted != usage.live_blocks {
            r.error(format!(
                "segment {seg}: segment table says {} live blocks, structure has {counted}",
                usage.live_blocks
            ));
        }
        if counted > 0 && s.space.is_free(seg as u32) {
            r.error(format!(
                "segment {seg} is on the free list but holds {counted} live blocks"
            ));
        }
    }

    // 4. Layer table: records, and metadata and hot files only for layers
    //    that exist.
    let mut metadata_owners = std::collections::BTreeSet::new();
    let mut hot_files = Vec::new();
    let mut removal_lists = std::collections::BTreeSet::new();
    let table_root = s.layers.root();
    s.scan(
        Tree::Layer(0),
        table_root,
        Key::MIN,
        Key::MAX,
        &mut |k, v| {
            if k.kind == KIND_LAYER_META {
                metadata_owners.insert(k.object);
            } else if k.kind == KIND_HOT_FILES {
                hot_files.push((k.object, crate::hotfiles::HotFiles::decode(v).err()));
            } else if k.kind == KIND_REMOVAL {
                removal_lists.insert(k.object);
            }
            true
        },
    )?;
    for id in removal_lists {
        if s.layers.contains(id) {
            r.error(format!("removal list of layer {id}, which exists"));
        }
    }
    for (id, bad) in hot_files {
        if !s.layers.contains(id) {
            r.error(format!("hot files of layer {id}, which does not exist"));
        }
        if let Some(e) = bad {
            r.error(format!("layer {id} hot files: {e}"));
        }
    }
    for id in metadata_owners {
        if !s.layers.contains(id) {
            r.error(format!("metadata of layer {id}, which does not exist"));
        } else if let Err(e) = s.layer_metadata(id) {
            r.error(format!("layer {id} metadata: {e}"));
        }
    }
    let mut children: HashMap<u64, u32> = HashMap::new();
    for l in s.layers.records() {
        if l.parent != 0 {
            if !s.layers.contains(l.parent) {
                r.error(format!("layer {} has missing parent {}", l.id, l.parent));
            }
            *children.entry(l.parent).or_default() += 1;
        }
        if s.layers.id_by_name(&l.name) != Some(l.id) {
            r.error(format!("layer {} name index is wrong", l.id));
        }
    }
    let mut recs: Vec<LayerRecord> = s.layers.records().cloned().collect();
    recs.sort_by_key(|l| l.id);
    for l in &recs {
        let c = children.get(&l.id).copied().unwrap_or(0);
        if c != l.children {
            r.error(format!(
                "layer {} records {} children, has {c}",
                l.id, l.children
            ));
        }
        if c > 0 && !l.frozen {
            r.error(format!("layer {} has children but is not frozen", l.id));
        }
        let owned = owned_count.get(&l.id).copied().unwrap_or(0);
        if owned != l.owned_blocks {
            r.error(format!(
                "layer {} records {} owned blocks, owns {owned}",
                l.id, l.owned_blocks
            ));
        }
    }

    // 5. Filesystem semantics of each layer's view.
    for l in &recs {
        check_layer_semantics(s, &mut r, l)?;
    }

    // 6. Data.
    if verify_data {
        let mut seen = Bitmap::new(s.address_map.next_lbn());
        for l in &recs {
            let mut lbns = Vec::new();
            s.scan(
                Tree::Layer(l.id),
                l.root,
                Key::MIN,
                Key::MAX,
                &mut |k, v| {
                    if k.kind == KIND_EXTENT {
                        if let Ok(e) = ExtentValue::decode(v) {
                            lbns.push(e.lbn);
                        }
                    }
                    true
                },
            )?;
            for lbn in lbns {
                if seen.set(lbn) {
                    continue;
                }
                let Some(m) = s.map_get(lbn)? else { continue };
                if m.physical_block == crate::absent::ABSENT {
                    continue;
                }
                match s.read_block(m.physical_block) {
                    Ok(b) if data_checksum(&b) == m.checksum => r.data_blocks_verified += 1,
                    Ok(_) => r.error(format!(
                        "data block {lbn} at {:#x}: checksum mismatch",
                        m.physical_block
                    )),
                    Err(e) => r.error(format!("data block {lbn}: {e}")),
                }
            }
        }
    }
    if !r.is_clean() {
        log::warn!(
            "fsck found {} problems; first: {}",
            r.errors.len(),
            r.errors[0]
        );
    }
    Ok(r)
}

/// An extent of a layer's tree (`removed`: a layer being removed): counted,
/// its block referenced and checked to be mapped; None (reported) when it
/// does not decode.
fn extent(
    r: &mut FsckReport,
    k: &Key,
    v: &[u8],
    (layer, removed): (u64, bool),
    mapped: &Bitmap,
    referenced: &mut Bitmap,
) -> Option<ExtentValue> {
    let what = || format!("{}layer {layer}", if removed { "removed " } else { "" });
    match ExtentValue::decode(v) {
        Ok(e) => {
            r.extents += 1;
            referenced.set(e.lbn);
            if !mapped.get(e.lbn) {
                r.error(format!(
                    "extent {k:?} of {} points at unmapped block {}",
                    what(),
                    e.lbn
                ));
            }
            Some(e)
        }
        Err(e) => {
            r.error(format!("bad extent {k:?} of {}: {e}", what()));
            None
        }
    }
}

fn check_node_shape(
    r: &mut FsckReport,
    n: &NodeImage,
    want_level: Option<u8>,
    lo: Key,
    hi: Key,
    what: &str,
) {
    if let Some(l) = want_level {
        if n.level != l {
            r.error(format!("{what}: level {} where {l} expected", n.level));
        }
    }
    if n.keys.is_empty() {
        r.error(format!("{what}: empty node"));
    }
    if n.keys.windows(2).any(|w| w[0] >= w[1]) {
        r.error(format!("{what}: keys out of order"));
    }
    if n.keys.first().is_some_and(|k| *k < lo)
        || (hi != Key::MAX && n.keys.last().is_some_and(|k| *k >= hi))
    {
        r.error(format!("{what}: keys outside the range its parent gives"));
    }
    if n.entry_bytes() > NODE_CAPACITY {
        r.error(format!("{what}: overfull"));
    }
}

#[allow(clippy::too_many_arguments)]
fn walk_map(
    s: &mut Store,
    r: &mut FsckReport,
    id: u64,
    csum: u64,
    want_level: Option<u8>,
    lo: Key,
    hi: Key,
    physical: &mut Bitmap,
    live: &mut [u32],
    out: &mut Vec<(u64, MapValue)>,
) -> Result<()> {
    let n = match s.node(Tree::Map, id, csum) {
        Ok(n) => n.clone(),
        Err(e) => {
            r.error(format!("map node {id:#x}: {e}"));
            return Ok(());
        }
    };
    r.map_nodes += 1;
    if id & PHYS_TAG != 0 {
        let p = id & !PHYS_TAG;
        if physical.set(p) {
            r.error(format!("map node block {p:#x} referenced twice"));
        }
        match s.geo.segment_of(p) {
            Some(seg) => live[seg as usize] += 1,
            None => r.error(format!("map node {p:#x} outside the data area")),
        }
    } else if id & VIRT_TAG == 0 {
        r.error(format!(
            "map node id {id:#x} is neither on disk nor in memory"
        ));
    }
    check_node_shape(r, &n, want_level, lo, hi, &format!("map node {id:#x}"));
    if n.level == 0 {
        for (k, v) in n.keys.iter().zip(&n.values) {
            if k.kind != KIND_MAP {
                r.error(format!("map key {k:?} has the wrong kind"));
                continue;
            }
            match MapValue::decode(v) {
                Ok(m) => out.push((k.object, m)),
                Err(e) => r.error(format!("map value for {k:?}: {e}")),
            }
        }
    } else {
        for (i, c) in n.children.iter().enumerate() {
            let clo = n.keys[i];
            let chi = n.keys.get(i + 1).copied().unwrap_or(hi);
            walk_map(
                s,
                r,
                c.address,
                c.checksum,
                Some(n.level - 1),
                clo,
                chi,
                physical,
                live,
                out,
            )?;
        }
    }
    Ok(())
}

fn check_layer_semantics(s: &mut Store, r: &mut FsckReport, l: &LayerRecord) -> Result<()> {
    let id = l.id;
    let mut inodes: HashMap<u64, InodeValue> = HashMap::new();
    let mut links: HashMap<u64, u32> = HashMap::new();
    let mut subdirs: HashMap<u64, u32> = HashMap::new();
    let mut extents: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut entries: Vec<(u64, u64, u8)> = Vec::new();
    let mut orphans = Vec::new();
    let mut problems = Vec::new();
    s.scan(Tree::Layer(id), l.root, Key::MIN, Key::MAX, &mut |k, v| {
        match k.kind {
            KIND_INODE => match InodeValue::decode(v) {
                Ok(i) => {
                    inodes.insert(k.object, i);
                }
                Err(e) => problems.push(format!("inode {}: {e}", k.object)),
            },
            KIND_DIRENT => match decode_dirents(v) {
                Ok(list) => {
                    for (_, ino, kind) in list {
                        entries.push((k.object, ino, kind));
                    }
                }
                Err(e) => problems.push(format!("directory {}: {e}", k.object)),
            },
            KIND_EXTENT => {
                let e = extents.entry(k.object).or_default();
                e.0 += 1;
                e.1 = e.1.max(k.offset + 1);
            }
            KIND_ORPHAN if k.object == 0 => orphans.push(k.offset),
            KIND_XATTR | KIND_SYMLINK => {}
            _ if k.object == 0 && k.kind == KIND_LAYER => {}
            _ => problems.push(format!("unknown key {k:?}")),
        }
        true
    })?;
    for p in problems {
        r.error(format!("layer {id}: {p}"));
    }
    r.inodes += inodes.len() as u64;
    if inodes.len() as u64 != l.inode_count {
        r.error(format!(
            "layer {id}: records {} inodes, has {}",
            l.inode_count,
            inodes.len()
        ));
    }
    if !inodes.contains_key(&ROOT_INODE) {
        r.error(format!("layer {id}: no root directory"));
    }
    for (dir, child, kind) in entries {
        if inodes
            .get(&dir)
            .is_none_or(|d| d.mode & 0o170000 != 0o040000)
        {
            r.error(format!(
                "layer {id}: entry in {dir}, which is not a directory"
            ));
        }
        match inodes.get(&child) {
            None => r.error(format!(
                "layer {id}: directory {dir} names missing inode {child}"
            )),
            Some(c) => {
                let is_dir = c.mode & 0o170000 == 0o040000;
                if is_dir != (kind == 1) {
                    r.error(format!(
                        "layer {id}: entry type of inode {child} does not match its mode"
                    ));
                }
                if is_dir {
                    *subdirs.entry(dir).or_default() += 1;
                    if c.parent != dir {
                        r.error(format!(
                            "layer {id}: directory {child} records parent {}, listed in {dir}",
                            c.parent
                        ));
                    }
                }
            }
        }
        *links.entry(child).or_default() += 1;
    }
    for (ino, i) in &inodes {
        let n = links.get(ino).copied().unwrap_or(0);
        let is_dir = i.mode & 0o170000 == 0o040000;
        if is_dir {
            let want = 2 + subdirs.get(ino).copied().unwrap_or(0);
            if i.nlink != want {
                r.error(format!(
                    "layer {id}: directory {ino} nlink {} but {want} expected",
                    i.nlink
                ));
            }
            if *ino != ROOT_INODE && n != 1 {
                r.error(format!("layer {id}: directory {ino} has {n} names"));
            }
        } else if i.nlink != n && !(n == 0 && orphans.contains(ino)) {
            r.error(format!(
                "layer {id}: inode {ino} nlink {} but {n} names",
                i.nlink
            ));
        }
        let (count, end) = extents.get(ino).copied().unwrap_or((0, 0));
        if count != i.blocks {
            r.error(format!(
                "layer {id}: inode {ino} records {} blocks, has {count}",
                i.blocks
            ));
        }
        if end * BLOCK_SIZE as u64 > i.size.div_ceil(BLOCK_SIZE as u64) * BLOCK_SIZE as u64 {
            r.error(format!(
                "layer {id}: inode {ino} has blocks past its size {}",
                i.size
            ));
        }
    }
    Ok(())
}
