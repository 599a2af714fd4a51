//! The superblock: the root of all durable state (two slots).

use super::*;

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
