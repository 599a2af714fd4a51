//! B+tree node blocks.

use super::*;

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
