//! Byte-level encodings of every on-disk structure (see docs/format.md).
//!
//! Everything is little-endian and fixed-layout. Every block carries a checksum
//! (xxh3-64 of the block with the checksum field zeroed), its own address and a
//! sequence number, and decoders check all three: a block read from the wrong
//! place, a stale block, or a torn block is an error, never data.

use crate::device::BLOCK_SIZE;
use crate::error::{Error, Result};
use xxhash_rust::xxh3::xxh3_64;

pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"LCFSSB01";
pub const NODE_MAGIC: u32 = u32::from_le_bytes(*b"LCND");
pub const SUMMARY_MAGIC: u32 = u32::from_le_bytes(*b"LCSU");
pub const SEGTABLE_MAGIC: u32 = u32::from_le_bytes(*b"LCST");
pub const FORMAT_VERSION: u32 = 1;

/// Superblock slots live at blocks 0 and 1.
pub const SUPERBLOCK_SLOTS: u64 = 2;

/// Offset of the checksum field in every block kind that has one at a fixed place.
const SB_CHECKSUM_AT: usize = BLOCK_SIZE - 8;

fn checksum_with_hole(block: &[u8], at: usize) -> u64 {
    // The checksum covers the block with its own 8-byte field taken as zero.
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&block[..at]);
    h.update(&[0u8; 8]);
    h.update(&block[at + 8..]);
    h.digest()
}

/// Checksum of a data block (stored in the map entry that points at it).
pub fn data_checksum(block: &[u8]) -> u64 {
    xxh3_64(block)
}

struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl<'a> Writer<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, at: 0 }
    }
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.bytes(&v.to_le_bytes());
    }
}

/// A bounds-checked little-endian reader: decoding hostile bytes never panics.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, at: 0 }
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| Error::corrupt(0, "record truncated"))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.bytes(2)?.try_into().unwrap()))
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()))
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }
    pub(crate) fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }
    pub(crate) fn rest(&self) -> usize {
        self.buf.len() - self.at
    }
}

// ---------------------------------------------------------------- superblock

/// The root of all durable state, written to one of two slots per checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub uuid: [u8; 16],
    pub device_blocks: u64,
    pub segment_blocks: u32,
    pub segment_count: u32,
    /// First block of segment 0.
    pub data_start_block: u64,
    /// First block of the segment table region (two copies of each table block).
    pub segtable_start_block: u64,
    pub segtable_blocks: u32,
    /// Checkpoint sequence number; the valid slot with the highest one wins.
    pub checkpoint_seq: u64,
    /// Next summary (batch) sequence number.
    pub next_batch_seq: u64,
    /// Physical block and checksum of the address-map tree root (0 = empty map).
    pub map_root_block: u64,
    pub map_root_checksum: u64,
    /// Logical block number of the layer-table tree root (0 = empty).
    pub layer_table_root: u64,
    pub next_lbn: u64,
    pub next_layer_id: u64,
    /// xxh3 over the encoded entries of the whole segment table.
    pub segtable_checksum: u64,
    pub created_unix_ns: u64,
}

impl Superblock {
    pub fn encode(&self, block: &mut [u8]) {
        assert_eq!(block.len(), BLOCK_SIZE);
        block.fill(0);
        let mut w = Writer::new(block);
        w.bytes(&SUPERBLOCK_MAGIC);
        w.u32(self.version);
        w.u32(BLOCK_SIZE as u32);
        w.bytes(&self.uuid);
        w.u64(self.device_blocks);
        w.u32(self.segment_blocks);
        w.u32(self.segment_count);
        w.u64(self.data_start_block);
        w.u64(self.segtable_start_block);
        w.u32(self.segtable_blocks);
        w.u32(0);
        w.u64(self.checkpoint_seq);
        w.u64(self.next_batch_seq);
        w.u64(self.map_root_block);
        w.u64(self.map_root_checksum);
        w.u64(self.layer_table_root);
        w.u64(self.next_lbn);
        w.u64(self.next_layer_id);
        w.u64(self.segtable_checksum);
        w.u64(self.created_unix_ns);
        let c = checksum_with_hole(block, SB_CHECKSUM_AT);
        block[SB_CHECKSUM_AT..].copy_from_slice(&c.to_le_bytes());
    }

    /// Decodes and verifies a slot read from `offset` (for error messages).
    pub fn decode(block: &[u8], offset: u64) -> Result<Superblock> {
        if block.len() != BLOCK_SIZE {
            return Err(Error::corrupt(offset, "superblock has wrong size"));
        }
        if block[..8] != SUPERBLOCK_MAGIC {
            return Err(Error::corrupt(offset, "no superblock magic"));
        }
        let stored = u64::from_le_bytes(block[SB_CHECKSUM_AT..].try_into().unwrap());
        if stored != checksum_with_hole(block, SB_CHECKSUM_AT) {
            return Err(Error::corrupt(offset, "superblock checksum mismatch"));
        }
        let mut r = Reader::new(&block[8..]);
        let version = r.u32()?;
        let block_size = r.u32()?;
        if version != FORMAT_VERSION || block_size as usize != BLOCK_SIZE {
            return Err(Error::corrupt(
                offset,
                format!("unsupported format version {version} / block size {block_size}"),
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(r.bytes(16)?);
        let sb = Superblock {
            version,
            uuid,
            device_blocks: r.u64()?,
            segment_blocks: r.u32()?,
            segment_count: r.u32()?,
            data_start_block: r.u64()?,
            segtable_start_block: r.u64()?,
            segtable_blocks: {
                let v = r.u32()?;
                r.u32()?;
                v
            },
            checkpoint_seq: r.u64()?,
            next_batch_seq: r.u64()?,
            map_root_block: r.u64()?,
            map_root_checksum: r.u64()?,
            layer_table_root: r.u64()?,
            next_lbn: r.u64()?,
            next_layer_id: r.u64()?,
            segtable_checksum: r.u64()?,
            created_unix_ns: r.u64()?,
        };
        sb.check_geometry(offset)?;
        Ok(sb)
    }

    fn check_geometry(&self, offset: u64) -> Result<()> {
        let seg = self.segment_blocks as u64;
        let ok = (16..=65536).contains(&seg)
            && self.segtable_start_block == SUPERBLOCK_SLOTS
            && self.segtable_start_block + 2 * self.segtable_blocks as u64 <= self.data_start_block
            && (self.segtable_blocks as u64) * SEGTABLE_ENTRIES as u64 >= self.segment_count as u64
            && self
                .data_start_block
                .checked_add(seg * self.segment_count as u64)
                .is_some_and(|end| end <= self.device_blocks);
        if ok {
            Ok(())
        } else {
            Err(Error::corrupt(
                offset,
                "superblock geometry is inconsistent",
            ))
        }
    }
}

// ---------------------------------------------------------------- tree keys

/// A B+tree key: (object, kind, offset-or-hash). Ordered field by field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Key {
    pub object: u64,
    pub kind: u8,
    pub offset: u64,
}

pub const KEY_BYTES: usize = 17;

impl Key {
    pub const MIN: Key = Key {
        object: 0,
        kind: 0,
        offset: 0,
    };
    pub const MAX: Key = Key {
        object: u64::MAX,
        kind: u8::MAX,
        offset: u64::MAX,
    };
    pub const fn new(object: u64, kind: u8, offset: u64) -> Key {
        Key {
            object,
            kind,
            offset,
        }
    }
    fn encode(&self, w: &mut Writer<'_>) {
        w.u64(self.object);
        w.u8(self.kind);
        w.u64(self.offset);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Key> {
        Ok(Key {
            object: r.u64()?,
            kind: r.u8()?,
            offset: r.u64()?,
        })
    }
}

// ---------------------------------------------------------------- tree nodes

/// Bytes of header at the start of every node block.
pub const NODE_HEADER_BYTES: usize = 64;
/// Bytes available for entries.
pub const NODE_CAPACITY: usize = BLOCK_SIZE - NODE_HEADER_BYTES;
/// Leaf entry overhead: key + value length.
pub const LEAF_ENTRY_OVERHEAD: usize = KEY_BYTES + 2;
/// Internal entry: key + child address + child checksum.
pub const INTERNAL_ENTRY_BYTES: usize = KEY_BYTES + 16;
/// Largest value a leaf can hold (a node must fit at least one entry).
pub const MAX_VALUE_BYTES: usize = NODE_CAPACITY - LEAF_ENTRY_OVERHEAD;
const NODE_CHECKSUM_AT: usize = 32;

/// Which tree a node belongs to (recorded in the node, checked on read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TreeKind {
    /// The address map (logical block -> physical block), physically addressed.
    Map = 1,
    /// A layer's filesystem tree or the layer table, addressed by logical block.
    Layer = 2,
}

/// A child pointer in an internal node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChildRef {
    /// Logical block (layer trees) or physical block (map tree).
    pub address: u64,
    /// Checksum of the child block for physical pointers; 0 for logical ones
    /// (their checksum lives in the map entry).
    pub checksum: u64,
}

/// A decoded node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeImage {
    pub tree: TreeKind,
    pub level: u8,
    /// The block's own address (logical for layer trees, physical for the map).
    pub self_address: u64,
    pub seq: u64,
    /// Layer that wrote (owns) the node.
    pub owner: u64,
    pub keys: Vec<Key>,
    /// Leaf values (empty for internal nodes).
    pub values: Vec<Vec<u8>>,
    /// Children (empty for leaves).
    pub children: Vec<ChildRef>,
}

impl NodeImage {
    /// Serialized entry bytes (without header).
    pub fn entry_bytes(&self) -> usize {
        if self.level == 0 {
            self.values
                .iter()
                .map(|v| LEAF_ENTRY_OVERHEAD + v.len())
                .sum()
        } else {
            self.children.len() * INTERNAL_ENTRY_BYTES
        }
    }

    /// Encodes into a 4096-byte block. Panics if the node does not fit: callers
    /// split first, and a node that does not fit would corrupt the format.
    pub fn encode(&self, block: &mut [u8]) {
        assert_eq!(block.len(), BLOCK_SIZE);
        assert!(
            self.entry_bytes() <= NODE_CAPACITY,
            "node overflows its block"
        );
        if self.level == 0 {
            assert_eq!(self.keys.len(), self.values.len());
        } else {
            assert_eq!(self.keys.len(), self.children.len());
        }
        block.fill(0);
        let mut w = Writer::new(block);
        w.u32(NODE_MAGIC);
        w.u8(self.tree as u8);
        w.u8(self.level);
        w.u16(self.keys.len() as u16);
        w.u64(self.self_address);
        w.u64(self.seq);
        w.u64(self.owner);
        w.u64(0); // checksum at 32
        w.at = NODE_HEADER_BYTES;
        for (i, k) in self.keys.iter().enumerate() {
            k.encode(&mut w);
            if self.level == 0 {
                w.u16(self.values[i].len() as u16);
                w.bytes(&self.values[i]);
            } else {
                w.u64(self.children[i].address);
                w.u64(self.children[i].checksum);
            }
        }
        let c = checksum_with_hole(block, NODE_CHECKSUM_AT);
        block[NODE_CHECKSUM_AT..NODE_CHECKSUM_AT + 8].copy_from_slice(&c.to_le_bytes());
    }

    /// Checksum of an encoded node block (what a pointer to it records).
    pub fn block_checksum(block: &[u8]) -> u64 {
        u64::from_le_bytes(
            block[NODE_CHECKSUM_AT..NODE_CHECKSUM_AT + 8]
                .try_into()
                .unwrap(),
        )
    }

    /// Decodes and verifies a node read from physical `offset`, expecting it to
    /// belong to `tree` at `expected_address`.
    pub fn decode(
        block: &[u8],
        offset: u64,
        tree: TreeKind,
        expected_address: u64,
    ) -> Result<NodeImage> {
        if block.len() != BLOCK_SIZE {
            return Err(Error::corrupt(offset, "node has wrong size"));
        }
        let mut r = Reader::new(block);
        if r.u32()? != NODE_MAGIC {
            return Err(Error::corrupt(offset, "no node magic"));
        }
        let stored = u64::from_le_bytes(
            block[NODE_CHECKSUM_AT..NODE_CHECKSUM_AT + 8]
                .try_into()
                .unwrap(),
        );
        if stored != checksum_with_hole(block, NODE_CHECKSUM_AT) {
            return Err(Error::corrupt(offset, "node checksum mismatch"));
        }
        let tree_byte = r.u8()?;
        if tree_byte != tree as u8 {
            return Err(Error::corrupt(
                offset,
                format!("node of tree kind {tree_byte}, expected {}", tree as u8),
            ));
        }
        let level = r.u8()?;
        let count = r.u16()? as usize;
        let self_address = r.u64()?;
        if self_address != expected_address {
            return Err(Error::corrupt(
                offset,
                format!("node claims address {self_address:#x}, expected {expected_address:#x}"),
            ));
        }
        let seq = r.u64()?;
        let owner = r.u64()?;
        if level > 32 {
            return Err(Error::corrupt(offset, "node level out of range"));
        }
        let mut r = Reader::new(&block[NODE_HEADER_BYTES..]);
        let mut node = NodeImage {
            tree,
            level,
            self_address,
            seq,
            owner,
            keys: Vec::with_capacity(count),
            values: Vec::new(),
            children: Vec::new(),
        };
        for _ in 0..count {
            let k = Key::decode(&mut r)?;
            if node.keys.last().is_some_and(|last| *last >= k) {
                return Err(Error::corrupt(offset, "node keys out of order"));
            }
            node.keys.push(k);
            if level == 0 {
                let len = r.u16()? as usize;
                node.values.push(r.bytes(len)?.to_vec());
            } else {
                node.children.push(ChildRef {
                    address: r.u64()?,
                    checksum: r.u64()?,
                });
            }
        }
        Ok(node)
    }
}

// ---------------------------------------------------------------- summaries

/// What a logged block is, as recorded in its batch summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockTag {
    /// A block addressed by a logical block number (file data or a layer-tree node).
    Logical(u64),
    /// An address-map node whose first key's object is given (to find it again).
    MapNode { first_object: u64, level: u8 },
}

const TAG_MAP_BIT: u64 = 1 << 63;

impl BlockTag {
    fn encode(self) -> u64 {
        match self {
            BlockTag::Logical(lbn) => {
                assert!(lbn & TAG_MAP_BIT == 0);
                lbn
            }
            BlockTag::MapNode {
                first_object,
                level,
            } => TAG_MAP_BIT | ((level as u64) << 56) | (first_object & ((1 << 56) - 1)),
        }
    }
    fn decode(v: u64) -> BlockTag {
        if v & TAG_MAP_BIT != 0 {
            BlockTag::MapNode {
                first_object: v & ((1 << 56) - 1),
                level: ((v >> 56) & 0x7f) as u8,
            }
        } else {
            BlockTag::Logical(v)
        }
    }
}

pub const SUMMARY_HEADER_BYTES: usize = 40;
/// Blocks one batch summary can describe.
pub const SUMMARY_ENTRIES: usize = (BLOCK_SIZE - SUMMARY_HEADER_BYTES) / 16;
const SUMMARY_CHECKSUM_AT: usize = 32;

/// The first block of every batch written to the log: who the following blocks
/// are, their checksums, the batch sequence number and the summary's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub self_block: u64,
    pub seq: u64,
    pub entries: Vec<(BlockTag, u64)>,
}

impl Summary {
    pub fn encode(&self, block: &mut [u8]) {
        assert!(self.entries.len() <= SUMMARY_ENTRIES);
        block.fill(0);
        let mut w = Writer::new(block);
        w.u32(SUMMARY_MAGIC);
        w.u32(self.entries.len() as u32);
        w.u64(self.self_block);
        w.u64(self.seq);
        w.u64(0);
        w.u64(0); // checksum at 32
        for (tag, csum) in &self.entries {
            w.u64(tag.encode());
            w.u64(*csum);
        }
        let c = checksum_with_hole(block, SUMMARY_CHECKSUM_AT);
        block[SUMMARY_CHECKSUM_AT..SUMMARY_CHECKSUM_AT + 8].copy_from_slice(&c.to_le_bytes());
    }

    pub fn decode(block: &[u8], self_block: u64) -> Result<Summary> {
        let offset = self_block.saturating_mul(BLOCK_SIZE as u64);
        if block.len() != BLOCK_SIZE {
            return Err(Error::corrupt(offset, "summary has wrong size"));
        }
        let mut r = Reader::new(block);
        if r.u32()? != SUMMARY_MAGIC {
            return Err(Error::corrupt(offset, "no summary magic"));
        }
        let stored = u64::from_le_bytes(
            block[SUMMARY_CHECKSUM_AT..SUMMARY_CHECKSUM_AT + 8]
                .try_into()
                .unwrap(),
        );
        if stored != checksum_with_hole(block, SUMMARY_CHECKSUM_AT) {
            return Err(Error::corrupt(offset, "summary checksum mismatch"));
        }
        let count = r.u32()? as usize;
        if count > SUMMARY_ENTRIES {
            return Err(Error::corrupt(offset, "summary entry count out of range"));
        }
        let at = r.u64()?;
        if at != self_block {
            return Err(Error::corrupt(
                offset,
                format!("summary claims block {at:#x}"),
            ));
        }
        let seq = r.u64()?;
        let mut r = Reader::new(&block[SUMMARY_HEADER_BYTES..]);
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            entries.push((BlockTag::decode(r.u64()?), r.u64()?));
        }
        Ok(Summary {
            self_block,
            seq,
            entries,
        })
    }
}

// ---------------------------------------------------------------- segment table

pub const SEGTABLE_HEADER_BYTES: usize = 32;
/// Segment entries per table block.
pub const SEGTABLE_ENTRIES: usize = (BLOCK_SIZE - SEGTABLE_HEADER_BYTES) / 16;
const SEGTABLE_CHECKSUM_AT: usize = 24;

/// Usage of one segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentUsage {
    /// Blocks still referenced by the durable state (data, nodes, summaries excluded).
    pub live_blocks: u32,
    /// Batch sequence number when the segment was last opened for writing; a
    /// summary with a lower sequence inside it is left over from an older life.
    pub open_seq: u64,
}

/// One block of the segment table (two copies on disk; see docs/format.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegtableBlock {
    pub index: u32,
    pub checkpoint_seq: u64,
    pub entries: Vec<SegmentUsage>,
}

impl SegtableBlock {
    pub fn encode(&self, block: &mut [u8]) {
        assert!(self.entries.len() <= SEGTABLE_ENTRIES);
        block.fill(0);
        let mut w = Writer::new(block);
        w.u32(SEGTABLE_MAGIC);
        w.u32(self.index);
        w.u64(self.checkpoint_seq);
        w.u32(self.entries.len() as u32);
        w.u32(0);
        w.u64(0); // checksum at 24
        for e in &self.entries {
            w.u32(e.live_blocks);
            w.u32(0);
            w.u64(e.open_seq);
        }
        let c = checksum_with_hole(block, SEGTABLE_CHECKSUM_AT);
        block[SEGTABLE_CHECKSUM_AT..SEGTABLE_CHECKSUM_AT + 8].copy_from_slice(&c.to_le_bytes());
    }

    pub fn decode(block: &[u8], offset: u64, index: u32) -> Result<SegtableBlock> {
        if block.len() != BLOCK_SIZE {
            return Err(Error::corrupt(offset, "segment table block has wrong size"));
        }
        let mut r = Reader::new(block);
        if r.u32()? != SEGTABLE_MAGIC {
            return Err(Error::corrupt(offset, "no segment table magic"));
        }
        let stored = u64::from_le_bytes(
            block[SEGTABLE_CHECKSUM_AT..SEGTABLE_CHECKSUM_AT + 8]
                .try_into()
                .unwrap(),
        );
        if stored != checksum_with_hole(block, SEGTABLE_CHECKSUM_AT) {
            return Err(Error::corrupt(offset, "segment table checksum mismatch"));
        }
        if r.u32()? != index {
            return Err(Error::corrupt(
                offset,
                "segment table block has wrong index",
            ));
        }
        let checkpoint_seq = r.u64()?;
        let count = r.u32()? as usize;
        if count > SEGTABLE_ENTRIES {
            return Err(Error::corrupt(
                offset,
                "segment table entry count out of range",
            ));
        }
        let mut r = Reader::new(&block[SEGTABLE_HEADER_BYTES..]);
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let live_blocks = r.u32()?;
            r.u32()?;
            entries.push(SegmentUsage {
                live_blocks,
                open_seq: r.u64()?,
            });
        }
        Ok(SegtableBlock {
            index,
            checkpoint_seq,
            entries,
        })
    }

    /// Hash input for the superblock's whole-table checksum.
    pub fn entries_bytes(entries: &[SegmentUsage]) -> Vec<u8> {
        let mut v = Vec::with_capacity(entries.len() * 12);
        for e in entries {
            v.extend_from_slice(&e.live_blocks.to_le_bytes());
            v.extend_from_slice(&e.open_seq.to_le_bytes());
        }
        v
    }
}

// ---------------------------------------------------------------- values

/// A map entry: where a logical block lives and what it must hash to, and
/// how many owners beyond the first share it (blocks promoted from one
/// layer into another, see [`ExtentValue::shared`]). Encoded in 16 bytes,
/// or 20 when `extra_owners` is not zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapValue {
    pub physical_block: u64,
    pub checksum: u64,
    pub extra_owners: u32,
}

impl MapValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(20);
        v.extend_from_slice(&self.physical_block.to_le_bytes());
        v.extend_from_slice(&self.checksum.to_le_bytes());
        if self.extra_owners != 0 {
            v.extend_from_slice(&self.extra_owners.to_le_bytes());
        }
        v
    }
    pub fn decode(b: &[u8]) -> Result<MapValue> {
        let mut r = Reader::new(b);
        let physical_block = r.u64()?;
        let checksum = r.u64()?;
        let extra_owners = if r.rest() > 0 { r.u32()? } else { 0 };
        if r.rest() != 0 {
            return Err(Error::corrupt(0, "map value too long"));
        }
        Ok(MapValue {
            physical_block,
            checksum,
            extra_owners,
        })
    }
}

/// The top bit of an encoded extent's birth layer: [`ExtentValue::shared`].
const EXTENT_SHARED: u64 = 1 << 63;

/// A file block pointer: the logical block and the layer that owns it.
///
/// Ownership: the birth layer frees the block when it drops the extent (or
/// is removed) and may overwrite it in place; its descendants inherit the
/// extent and copy on write. A block promoted into another branch (a
/// container's data becoming an image layer's, see `Store::share_blocks`)
/// has several owners, counted in its [`MapValue::extra_owners`]; their
/// extents are marked `shared`, so every owner copies on write and the
/// last one to drop it frees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentValue {
    pub lbn: u64,
    pub birth_layer: u64,
    pub shared: bool,
}

impl ExtentValue {
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.birth_layer & EXTENT_SHARED == 0, "layer id too large");
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&self.lbn.to_le_bytes());
        let birth = self.birth_layer | if self.shared { EXTENT_SHARED } else { 0 };
        v.extend_from_slice(&birth.to_le_bytes());
        v
    }
    pub fn decode(b: &[u8]) -> Result<ExtentValue> {
        let mut r = Reader::new(b);
        let lbn = r.u64()?;
        let birth = r.u64()?;
        Ok(ExtentValue {
            lbn,
            birth_layer: birth & !EXTENT_SHARED,
            shared: birth & EXTENT_SHARED != 0,
        })
    }
}

/// A timestamp in nanoseconds precision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    pub seconds: i64,
    pub nanoseconds: u32,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: d.as_secs() as i64,
            nanoseconds: d.subsec_nanos(),
        }
    }
}

/// An inode record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InodeValue {
    /// File type and permission bits (as st_mode).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    /// 4 KiB blocks this inode references (shared or owned).
    pub blocks: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub rdev: u64,
    /// Directory: its parent (rename loop checks). Other files: the directory
    /// of the name they were created or last renamed under (to name them in
    /// layer diffs).
    pub parent: u64,
    pub generation: u64,
}

impl InodeValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![0u8; 112];
        let mut w = Writer::new(&mut v);
        w.u32(self.mode);
        w.u32(self.uid);
        w.u32(self.gid);
        w.u32(self.nlink);
        w.u64(self.size);
        w.u64(self.blocks);
        for t in [self.atime, self.mtime, self.ctime] {
            w.i64(t.seconds);
            w.u32(t.nanoseconds);
            w.u32(0);
        }
        w.u64(self.rdev);
        w.u64(self.parent);
        w.u64(self.generation);
        v
    }
    pub fn decode(b: &[u8]) -> Result<InodeValue> {
        let mut r = Reader::new(b);
        let mut i = InodeValue {
            mode: r.u32()?,
            uid: r.u32()?,
            gid: r.u32()?,
            nlink: r.u32()?,
            size: r.u64()?,
            blocks: r.u64()?,
            ..Default::default()
        };
        let mut ts = [Timestamp::default(); 3];
        for t in &mut ts {
            t.seconds = r.i64()?;
            t.nanoseconds = r.u32()?;
            r.u32()?;
            if t.nanoseconds >= 1_000_000_000 {
                return Err(Error::corrupt(0, "timestamp nanoseconds out of range"));
            }
        }
        [i.atime, i.mtime, i.ctime] = ts;
        i.rdev = r.u64()?;
        i.parent = r.u64()?;
        i.generation = r.u64()?;
        Ok(i)
    }
}

/// Encodes a list of (name, payload) pairs (directory entries or xattrs that
/// share one hash key).
pub fn encode_named(items: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(items.len() as u16).to_le_bytes());
    for (name, payload) in items {
        v.extend_from_slice(&(name.len() as u16).to_le_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        v.extend_from_slice(payload);
    }
    v
}

pub fn decode_named(b: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut r = Reader::new(b);
    let n = r.u16()? as usize;
    let mut out = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let l = r.u16()? as usize;
        let name = r.bytes(l)?.to_vec();
        let l = r.u16()? as usize;
        out.push((name, r.bytes(l)?.to_vec()));
    }
    if r.rest() != 0 {
        return Err(Error::corrupt(0, "trailing bytes after named list"));
    }
    Ok(out)
}

/// The persistent record of one layer, kept in the layer table tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRecord {
    pub id: u64,
    pub name: Vec<u8>,
    /// 0 for a base layer.
    pub parent: u64,
    /// Logical block of the layer's tree root.
    pub root: u64,
    pub frozen: bool,
    pub cold: bool,
    pub children: u32,
    pub created: Timestamp,
    pub frozen_at: Timestamp,
    pub next_inode: u64,
    pub inode_count: u64,
    /// Blocks (data and tree nodes) this layer wrote and still owns.
    pub owned_blocks: u64,
}

impl LayerRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![0u8; 88 + self.name.len()];
        let mut w = Writer::new(&mut v);
        w.u64(self.id);
        w.u64(self.parent);
        w.u64(self.root);
        w.u8(self.frozen as u8);
        w.u8(self.cold as u8);
        w.u16(self.name.len() as u16);
        w.u32(self.children);
        for t in [self.created, self.frozen_at] {
            w.i64(t.seconds);
            w.u32(t.nanoseconds);
            w.u32(0);
        }
        w.u64(self.next_inode);
        w.u64(self.inode_count);
        w.u64(self.owned_blocks);
        w.bytes(&self.name);
        debug_assert_eq!(w.at, 88 + self.name.len());
        v
    }
    pub fn decode(b: &[u8]) -> Result<LayerRecord> {
        let mut r = Reader::new(b);
        let id = r.u64()?;
        let parent = r.u64()?;
        let root = r.u64()?;
        let frozen = r.u8()? != 0;
        let cold = r.u8()? != 0;
        let name_len = r.u16()? as usize;
        let children = r.u32()?;
        let mut ts = [Timestamp::default(); 2];
        for t in &mut ts {
            t.seconds = r.i64()?;
            t.nanoseconds = r.u32()?;
            r.u32()?;
        }
        Ok(LayerRecord {
            id,
            parent,
            root,
            frozen,
            cold,
            children,
            created: ts[0],
            frozen_at: ts[1],
            next_inode: r.u64()?,
            inode_count: r.u64()?,
            owned_blocks: r.u64()?,
            name: r.bytes(name_len)?.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trip_and_corruption() {
        let sb = Superblock {
            version: FORMAT_VERSION,
            uuid: [7; 16],
            device_blocks: 1 << 20,
            segment_blocks: 1024,
            segment_count: 1000,
            data_start_block: 1024,
            segtable_start_block: 2,
            segtable_blocks: 4,
            checkpoint_seq: 9,
            next_batch_seq: 10,
            map_root_block: 5000,
            map_root_checksum: 1,
            layer_table_root: 3,
            next_lbn: 77,
            next_layer_id: 4,
            segtable_checksum: 99,
            created_unix_ns: 5,
        };
        let mut b = vec![0u8; BLOCK_SIZE];
        sb.encode(&mut b);
        assert_eq!(Superblock::decode(&b, 0).unwrap(), sb);
        for at in [0, 20, 100, BLOCK_SIZE - 1] {
            let mut c = b.clone();
            c[at] ^= 1;
            assert!(
                Superblock::decode(&c, 0).is_err(),
                "flip at {at} not caught"
            );
        }
    }

    #[test]
    fn node_round_trip_checks_address_and_order() {
        let node = NodeImage {
            tree: TreeKind::Layer,
            level: 0,
            self_address: 42,
            seq: 3,
            owner: 2,
            keys: vec![Key::new(1, 1, 0), Key::new(1, 2, 5)],
            values: vec![vec![1, 2, 3], vec![]],
            children: vec![],
        };
        let mut b = vec![0u8; BLOCK_SIZE];
        node.encode(&mut b);
        assert_eq!(NodeImage::decode(&b, 0, TreeKind::Layer, 42).unwrap(), node);
        assert!(NodeImage::decode(&b, 0, TreeKind::Layer, 43).is_err());
        assert!(NodeImage::decode(&b, 0, TreeKind::Map, 42).is_err());
        let mut c = b.clone();
        c[NODE_HEADER_BYTES + 3] ^= 0x10;
        assert!(NodeImage::decode(&c, 0, TreeKind::Layer, 42).is_err());
    }

    #[test]
    fn summary_and_segtable_round_trip() {
        let s = Summary {
            self_block: 2048,
            seq: 17,
            entries: vec![
                (BlockTag::Logical(5), 11),
                (
                    BlockTag::MapNode {
                        first_object: 99,
                        level: 2,
                    },
                    12,
                ),
            ],
        };
        let mut b = vec![0u8; BLOCK_SIZE];
        s.encode(&mut b);
        assert_eq!(Summary::decode(&b, 2048).unwrap(), s);
        assert!(Summary::decode(&b, 2049).is_err());
        let t = SegtableBlock {
            index: 3,
            checkpoint_seq: 8,
            entries: vec![
                SegmentUsage {
                    live_blocks: 5,
                    open_seq: 6
                };
                SEGTABLE_ENTRIES
            ],
        };
        t.encode(&mut b);
        assert_eq!(SegtableBlock::decode(&b, 0, 3).unwrap(), t);
        assert!(SegtableBlock::decode(&b, 0, 4).is_err());
    }

    #[test]
    fn values_round_trip() {
        let i = InodeValue {
            mode: 0o100644,
            nlink: 2,
            size: 1 << 40,
            atime: Timestamp {
                seconds: -5,
                nanoseconds: 999_999_999,
            },
            ..Default::default()
        };
        assert_eq!(InodeValue::decode(&i.encode()).unwrap(), i);
        let l = LayerRecord {
            id: 3,
            name: b"abc-init".to_vec(),
            parent: 2,
            root: 10,
            frozen: true,
            cold: false,
            children: 1,
            created: Timestamp::now(),
            frozen_at: Timestamp::default(),
            next_inode: 5,
            inode_count: 4,
            owned_blocks: 8,
        };
        assert_eq!(LayerRecord::decode(&l.encode()).unwrap(), l);
        let named = vec![(b"a".to_vec(), vec![1, 2]), (b"bb".to_vec(), vec![])];
        assert_eq!(decode_named(&encode_named(&named)).unwrap(), named);
        assert!(decode_named(&[5, 0, 1]).is_err());
    }
}
