//! Fsync records: what an fsync of one file made durable without a
//! checkpoint, written to the fsync log region (see docs/format.md).
//!
//! A record is one or more consecutive blocks of the region. It names the
//! filesystem (uuid), the checkpoint it follows and its index among that
//! checkpoint's records; a checksum covers all its blocks. Recovery reads
//! records from the start of the region and stops at the first one that is
//! not the next of the newest checkpoint: records of older checkpoints,
//! torn records and bytes that were never a record are all that.

use super::*;

pub const FSYNC_MAGIC: [u8; 8] = *b"LCFSFSYN";
/// Bytes before the payload: magic, uuid, checkpoint, index, blocks,
/// entries, checksum.
pub const FSYNC_HEADER_BYTES: usize = 8 + 16 + 8 + 8 + 4 + 4 + 8;
const FSYNC_CHECKSUM_AT: usize = FSYNC_HEADER_BYTES - 8;
/// Blocks `lcfs mkfs` reserves for the fsync log (at most 1/64 of the device).
pub const FSYNC_LOG_BLOCKS: u64 = 1024;
/// The most blocks one record may span.
pub const FSYNC_MAX_RECORD_BLOCKS: usize = 64;
/// Encoded bytes of one logged data block.
pub const FSYNC_BLOCK_ENTRY_BYTES: usize = 24;
/// Encoded bytes of an inode entry before its data blocks.
pub const FSYNC_INODE_ENTRY_BYTES: usize = 8 + 8 + 8 + INODE_VALUE_BYTES + 4;

/// One data block of a file as the fsync found it: file block `block` is
/// stored at `physical_block` with data checksum `checksum`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoggedBlock {
    pub block: u64,
    pub physical_block: u64,
    pub checksum: u64,
}

/// One file's changes since the checkpoint or its previous record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedInode {
    pub layer: u64,
    pub ino: u64,
    /// The smallest size the file was truncated to since (u64::MAX: none).
    pub min_size: u64,
    /// The inode as the fsync found it (size, mode, owner, times).
    pub inode: InodeValue,
    /// Blocks written since, in block order.
    pub blocks: Vec<LoggedBlock>,
}

impl LoggedInode {
    pub fn encoded_len(&self) -> usize {
        FSYNC_INODE_ENTRY_BYTES + self.blocks.len() * FSYNC_BLOCK_ENTRY_BYTES
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsyncRecord {
    pub uuid: [u8; 16],
    /// The checkpoint whose state the record's changes apply to.
    pub checkpoint_seq: u64,
    /// 0 for the first record after that checkpoint, then 1, 2, ...
    pub index: u64,
    pub inodes: Vec<LoggedInode>,
}

impl FsyncRecord {
    /// Blocks the encoded record spans.
    pub fn blocks(&self) -> usize {
        let bytes: usize =
            FSYNC_HEADER_BYTES + self.inodes.iter().map(|i| i.encoded_len()).sum::<usize>();
        bytes.div_ceil(BLOCK_SIZE)
    }

    /// Encodes into `buf`, which must be exactly `self.blocks()` blocks.
    pub fn encode(&self, buf: &mut [u8]) {
        let blocks = self.blocks();
        assert!(blocks <= FSYNC_MAX_RECORD_BLOCKS, "record too large");
        assert_eq!(buf.len(), blocks * BLOCK_SIZE);
        buf.fill(0);
        let mut w = Writer::new(buf);
        w.bytes(&FSYNC_MAGIC);
        w.bytes(&self.uuid);
        w.u64(self.checkpoint_seq);
        w.u64(self.index);
        w.u32(blocks as u32);
        w.u32(self.inodes.len() as u32);
        w.u64(0); // checksum
        for i in &self.inodes {
            w.u64(i.layer);
            w.u64(i.ino);
            w.u64(i.min_size);
            w.bytes(&i.inode.encode());
            w.u32(i.blocks.len() as u32);
            for b in &i.blocks {
                w.u64(b.block);
                w.u64(b.physical_block);
                w.u64(b.checksum);
            }
        }
        let c = checksum_with_hole(buf, FSYNC_CHECKSUM_AT);
        buf[FSYNC_CHECKSUM_AT..FSYNC_CHECKSUM_AT + 8].copy_from_slice(&c.to_le_bytes());
    }

    /// How many blocks the record starting at `buf` claims to span, if `buf`
    /// starts with a record header of filesystem `uuid` (the caller then
    /// decodes that many blocks).
    pub fn claimed_blocks(buf: &[u8], uuid: &[u8; 16]) -> Option<usize> {
        if buf.len() < FSYNC_HEADER_BYTES || buf[..8] != FSYNC_MAGIC || buf[8..24] != uuid[..] {
            return None;
        }
        let n = u32::from_le_bytes(buf[40..44].try_into().unwrap()) as usize;
        (1..=FSYNC_MAX_RECORD_BLOCKS).contains(&n).then_some(n)
    }

    /// Decodes and verifies a whole record (`buf` is exactly its blocks;
    /// `offset` is where it was read, for error messages).
    pub fn decode(buf: &[u8], offset: u64) -> Result<FsyncRecord> {
        if buf.len() % BLOCK_SIZE != 0 || buf.len() < FSYNC_HEADER_BYTES {
            return Err(Error::corrupt(offset, "fsync record has wrong size"));
        }
        if buf[..8] != FSYNC_MAGIC {
            return Err(Error::corrupt(offset, "no fsync record magic"));
        }
        let stored = u64::from_le_bytes(
            buf[FSYNC_CHECKSUM_AT..FSYNC_CHECKSUM_AT + 8]
                .try_into()
                .unwrap(),
        );
        if stored != checksum_with_hole(buf, FSYNC_CHECKSUM_AT) {
            return Err(Error::corrupt(offset, "fsync record checksum mismatch"));
        }
        let mut r = Reader::new(&buf[8..]);
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(r.bytes(16)?);
        let checkpoint_seq = r.u64()?;
        let index = r.u64()?;
        let blocks = r.u32()? as usize;
        if blocks * BLOCK_SIZE != buf.len() {
            return Err(Error::corrupt(offset, "fsync record length disagrees"));
        }
        let count = r.u32()? as usize;
        r.u64()?;
        if count > r.rest() / FSYNC_INODE_ENTRY_BYTES {
            return Err(Error::corrupt(
                offset,
                "fsync record inode count out of range",
            ));
        }
        let mut inodes = Vec::with_capacity(count);
        for _ in 0..count {
            let layer = r.u64()?;
            let ino = r.u64()?;
            let min_size = r.u64()?;
            let inode = InodeValue::decode(r.bytes(INODE_VALUE_BYTES)?)?;
            let n = r.u32()? as usize;
            if n > r.rest() / FSYNC_BLOCK_ENTRY_BYTES {
                return Err(Error::corrupt(
                    offset,
                    "fsync record block count out of range",
                ));
            }
            let mut blocks = Vec::with_capacity(n);
            for _ in 0..n {
                blocks.push(LoggedBlock {
                    block: r.u64()?,
                    physical_block: r.u64()?,
                    checksum: r.u64()?,
                });
            }
            inodes.push(LoggedInode {
                layer,
                ino,
                min_size,
                inode,
                blocks,
            });
        }
        Ok(FsyncRecord {
            uuid,
            checkpoint_seq,
            index,
            inodes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(blocks: usize) -> FsyncRecord {
        FsyncRecord {
            uuid: [3; 16],
            checkpoint_seq: 7,
            index: 2,
            inodes: vec![LoggedInode {
                layer: 4,
                ino: 99,
                min_size: u64::MAX,
                inode: InodeValue {
                    mode: 0o100644,
                    size: 12345,
                    nlink: 1,
                    ..Default::default()
                },
                blocks: (0..blocks as u64)
                    .map(|b| LoggedBlock {
                        block: b,
                        physical_block: 1000 + b,
                        checksum: b * 31,
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn round_trip_across_blocks_and_corruption() {
        for n in [0, 1, 160, 400] {
            let r = record(n);
            let mut buf = vec![0u8; r.blocks() * BLOCK_SIZE];
            r.encode(&mut buf);
            assert_eq!(
                FsyncRecord::claimed_blocks(&buf, &[3; 16]),
                Some(r.blocks())
            );
            assert_eq!(FsyncRecord::claimed_blocks(&buf, &[4; 16]), None);
            assert_eq!(FsyncRecord::decode(&buf, 0).unwrap(), r);
            let last = buf.len() - 1;
            buf[last] ^= 1;
            assert!(FsyncRecord::decode(&buf, 0).is_err());
        }
        assert!(FsyncRecord::decode(&[0u8; BLOCK_SIZE], 0).is_err());
    }
}
