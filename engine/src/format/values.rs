//! Tree values: address-map entries, extents, inodes, layer records.

use super::*;

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

    /// The UTC calendar date and time of day: (year, month, day, hour,
    /// minute, second), Howard Hinnant's civil_from_days.
    pub fn civil(&self) -> (i64, i64, i64, i64, i64, i64) {
        let days = self.seconds.div_euclid(86_400);
        let second_of_day = self.seconds.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let day_of_era = z.rem_euclid(146_097);
        let year_of_era =
            (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let mp = (5 * day_of_year + 2) / 153;
        let day = day_of_year - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = year_of_era + era * 400 + i64::from(month <= 2);
        (
            year,
            month,
            day,
            second_of_day / 3600,
            second_of_day / 60 % 60,
            second_of_day % 60,
        )
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

/// Encoded bytes of an [`InodeValue`].
pub const INODE_VALUE_BYTES: usize = 112;

impl InodeValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![0u8; INODE_VALUE_BYTES];
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
    /// Most bytes the layer may own (0: no limit). Written after the name
    /// only when set or when usage follows, so records without either keep
    /// their old layout.
    pub quota_bytes: u64,
    /// How the layer has been used (written after `quota_bytes` only when
    /// not all zero, or when `seal` follows).
    pub usage: LayerUsage,
    /// Logical block of the root of the layer's seal tree (docs/format.md,
    /// "Seal"), 0 when it has none. Written after `usage` only when set.
    pub seal: u64,
}

/// A layer's lifetime usage counters, kept in its record: what the
/// statistics (`lcfs top`) report about layers and images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerUsage {
    /// Writable (not cold) layers ever cloned from this one (containers
    /// started from an image's top layer), including those removed since;
    /// pulled layers stacked on it do not count.
    pub clones: u64,
    /// When the last of them was cloned (zero: never).
    pub last_clone: Timestamp,
    /// Read requests the FUSE front served from this layer's directory, and
    /// their bytes (reads the kernel's page cache answered never arrive).
    pub reads: u64,
    pub bytes_read: u64,
    /// The same counters of removed clones of this layer, folded in when
    /// each was removed: what containers started from an image read.
    pub clone_reads: u64,
    pub clone_bytes_read: u64,
    /// A pulled layer: the uncompressed bytes applied into it (Docker's
    /// ApplyDiff, containerd's Diff Apply) and the time that took.
    pub applied_bytes: u64,
    pub apply_ns: u64,
    /// The first read served from this layer (zero: none yet): for a
    /// container, the end of its start-up as storage sees it.
    pub first_read: Timestamp,
    /// Reads in the first [`EARLY_READ_SECONDS`] after the layer was made:
    /// what a container reads to start.
    pub early_reads: u64,
    pub early_bytes_read: u64,
    /// Removed clones that had a first read, the sum of their times from
    /// creation to first read, and their early reads: folded in at removal
    /// like `clone_reads`.
    pub clone_starts: u64,
    pub clone_start_ns: u64,
    pub clone_early_reads: u64,
    pub clone_early_bytes_read: u64,
    /// Distinct files read in the start-up window (at most
    /// `EARLY_FILES_MAX`), and the same of removed clones.
    pub early_files: u64,
    pub clone_early_files: u64,
}

/// The start-up window of [`LayerUsage::early_reads`].
pub const EARLY_READ_SECONDS: i64 = 10;

impl LayerUsage {
    pub const ENCODED_BYTES: usize = 152;

    pub fn is_zero(&self) -> bool {
        *self == LayerUsage::default()
    }

    /// Nanoseconds from `created` to the first read, if there was one.
    pub fn startup_ns(&self, created: Timestamp) -> Option<u64> {
        (self.first_read != Timestamp::default()).then(|| {
            let ns = |t: Timestamp| t.seconds as i128 * 1_000_000_000 + t.nanoseconds as i128;
            (ns(self.first_read) - ns(created)).clamp(0, u64::MAX as i128) as u64
        })
    }
}

impl LayerRecord {
    pub fn encode(&self) -> Vec<u8> {
        let seal = if self.seal != 0 { 8 } else { 0 };
        let usage = if self.usage.is_zero() && seal == 0 {
            0
        } else {
            LayerUsage::ENCODED_BYTES
        };
        let quota = if self.quota_bytes > 0 || usage > 0 {
            8
        } else {
            0
        };
        let mut v = vec![0u8; 88 + self.name.len() + quota + usage + seal];
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
        if quota > 0 {
            w.u64(self.quota_bytes);
        }
        if usage > 0 {
            let u = &self.usage;
            let time = |w: &mut Writer, t: Timestamp| {
                w.i64(t.seconds);
                w.u32(t.nanoseconds);
                w.u32(0);
            };
            w.u64(u.clones);
            time(&mut w, u.last_clone);
            for n in [
                u.reads,
                u.bytes_read,
                u.clone_reads,
                u.clone_bytes_read,
                u.applied_bytes,
                u.apply_ns,
            ] {
                w.u64(n);
            }
            time(&mut w, u.first_read);
            for n in [
                u.early_reads,
                u.early_bytes_read,
                u.clone_starts,
                u.clone_start_ns,
                u.clone_early_reads,
                u.clone_early_bytes_read,
                u.early_files,
                u.clone_early_files,
            ] {
                w.u64(n);
            }
        }
        if seal > 0 {
            w.u64(self.seal);
        }
        debug_assert_eq!(w.at, 88 + self.name.len() + quota + usage + seal);
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
        let next_inode = r.u64()?;
        let inode_count = r.u64()?;
        let owned_blocks = r.u64()?;
        let name = r.bytes(name_len)?.to_vec();
        let quota_bytes = if r.rest() >= 8 { r.u64()? } else { 0 };
        let mut usage = LayerUsage::default();
        let mut seal = 0;
        if r.rest() >= LayerUsage::ENCODED_BYTES {
            let time = |r: &mut Reader| -> Result<Timestamp> {
                let t = Timestamp {
                    seconds: r.i64()?,
                    nanoseconds: r.u32()?,
                };
                r.u32()?;
                Ok(t)
            };
            let u = &mut usage;
            u.clones = r.u64()?;
            u.last_clone = time(&mut r)?;
            for n in [
                &mut u.reads,
                &mut u.bytes_read,
                &mut u.clone_reads,
                &mut u.clone_bytes_read,
                &mut u.applied_bytes,
                &mut u.apply_ns,
            ] {
                *n = r.u64()?;
            }
            u.first_read = time(&mut r)?;
            for n in [
                &mut u.early_reads,
                &mut u.early_bytes_read,
                &mut u.clone_starts,
                &mut u.clone_start_ns,
                &mut u.clone_early_reads,
                &mut u.clone_early_bytes_read,
                &mut u.early_files,
                &mut u.clone_early_files,
            ] {
                *n = r.u64()?;
            }
            if r.rest() >= 8 {
                seal = r.u64()?;
            }
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
            next_inode,
            inode_count,
            owned_blocks,
            name,
            quota_bytes,
            usage,
            seal,
        })
    }
}
