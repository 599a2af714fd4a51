//! Checkpoints, in three phases so that the store lock is never held across
//! the device writes and flushes that make a checkpoint durable.
//!
//! 1. [`Store::checkpoint_begin`], under the store lock: layer records into
//!    the layer table, dirty tree nodes and the address map appended to the
//!    log, stream tails handed to the segment writer, the changed
//!    segment-table blocks and the superblock encoded. Everything the
//!    checkpoint will say is fixed here; later changes belong to the next one.
//! 2. [`CheckpointWrite::run`], without the store lock: wait for every log
//!    write the checkpoint covers, write the segment-table blocks, flush, write
//!    the superblock, flush. Readers and writers go on meanwhile.
//! 3. [`Store::checkpoint_finish`], under the store lock: the new sequence
//!    number, and the segments freed before phase 1 become reusable.
//!
//! Only one checkpoint is in flight (callers of phase 2 hold the engine's
//! commit lock). A checkpoint taken under the store lock while one is in
//! flight (space admission, the dirty-node limit, the cleaner) first waits
//! for the one in flight and finishes it itself: phase 2 never takes the store
//! lock, so that wait cannot deadlock.

use crate::device::{AlignedBuf, Device, IoOp, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::format::*;
use crate::store::{Store, Temperature, Tree, PHYS_TAG, VIRT_TAG};
use crate::writer::Completion;
use std::collections::BTreeSet;
use std::sync::Arc;

/// What phase 3 needs of a checkpoint whose phase 2 runs elsewhere.
pub(crate) struct CheckpointInFlight {
    seq: u64,
    /// Segments whose last block died before phase 1.
    freed: BTreeSet<u32>,
    /// The change generation phase 1 captured.
    generation: u64,
    done: Arc<Completion>,
}

/// Phase 2 of a checkpoint: device writes only, no store state.
pub(crate) struct CheckpointWrite {
    dev: Arc<dyn Device>,
    /// Log writes (segment hand-offs, stream tails) the checkpoint covers.
    log_writes: Vec<Arc<Completion>>,
    segtable: Vec<(u64, AlignedBuf)>,
    superblock_offset: u64,
    superblock: AlignedBuf,
    done: Arc<Completion>,
}

impl CheckpointWrite {
    /// Makes the checkpoint durable. The result also reaches whoever
    /// finishes the checkpoint (phase 3).
    pub(crate) fn run(self) -> Result<()> {
        let r = self.write();
        self.done
            .finish(r.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        r
    }

    fn write(&self) -> Result<()> {
        for w in &self.log_writes {
            w.wait()
                .map_err(|m| Error::Io(std::io::Error::other(format!("log write: {m}"))))?;
        }
        if !self.segtable.is_empty() {
            let mut ops: Vec<IoOp<'_>> = self
                .segtable
                .iter()
                .map(|(offset, b)| IoOp::Write {
                    offset: *offset,
                    buf: &b[..],
                })
                .collect();
            self.dev.submit(&mut ops)?;
        }
        // Barrier, then the superblock, then a barrier.
        self.dev.flush()?;
        self.dev
            .write_at(self.superblock_offset, &self.superblock)?;
        self.dev.flush()?;
        Ok(())
    }
}

impl Store {
    /// Makes everything durable (dirty nodes, map, segment table,
    /// superblock) before returning, holding the store lock throughout. The
    /// engine's `sync` uses the phased form instead.
    pub fn checkpoint(&mut self) -> Result<()> {
        let write = self.checkpoint_begin()?;
        // The result reaches checkpoint_finish through the completion.
        let _ = write.run();
        self.checkpoint_finish()
    }

    /// Phase 1. Returns the device writes to run without the lock. A
    /// checkpoint still in flight is finished first.
    pub(crate) fn checkpoint_begin(&mut self) -> Result<CheckpointWrite> {
        self.checkpoint_finish()?;
        self.check_writable()?;
        if self.replaying {
            return Err(Error::Invalid(
                "replaying the fsync log needs a checkpoint midway (the device is too \
                 full or the node cache too small to apply it in one piece)"
                    .into(),
            ));
        }
        match self.self_contained(|s| s.checkpoint_prepare()) {
            Ok(w) => Ok(w),
            Err(e) => self.fail(e),
        }
    }

    /// Phase 3 of the checkpoint in flight, if any: waits for its device
    /// writes (they never need this lock), then makes its sequence number
    /// current and the segments it freed reusable.
    pub(crate) fn checkpoint_finish(&mut self) -> Result<()> {
        let Some(c) = self.checkpoint_in_flight.take() else {
            return Ok(());
        };
        if let Err(m) = c.done.wait() {
            return self.fail(Error::Io(std::io::Error::other(format!(
                "checkpoint {}: {m}",
                c.seq
            ))));
        }
        self.checkpoint_seq = c.seq;
        self.counters.checkpoints += 1;
        let log = &self.log;
        self.space
            .free_after_checkpoint(c.freed, |s| log.is_open(s));
        self.durable_generation = self.durable_generation.max(c.generation);
        self.fsync_log.checkpoint_landed();
        // Log writes that have completed give back their buffers.
        self.reap_finished()?;
        Ok(())
    }

    fn checkpoint_prepare(&mut self) -> Result<CheckpointWrite> {
        self.checkpoints_begun += 1;
        self.fsync_log.checkpoint_began();
        let seq = self.checkpoint_seq + 1;
        // 1. Layer records into the layer table.
        let dirty: Vec<u64> = self.layers.take_dirty().into_iter().collect();
        let mut root = self.layers.root();
        for id in dirty {
            if let Some(r) = self.layers.get(id) {
                let v = r.encode();
                self.insert(Tree::Layer(0), &mut root, Key::new(id, KIND_LAYER, 0), v)?;
            }
        }
        for id in std::mem::take(&mut self.hot_dirty) {
            if let (true, Some(h)) = (self.layers.contains(id), self.hot.get(&id)) {
                let v = h.encode();
                self.insert(
                    Tree::Layer(0),
                    &mut root,
                    Key::new(id, KIND_HOT_FILES, 0),
                    v,
                )?;
            }
        }
        for id in self.layers.take_removed() {
            self.remove(Tree::Layer(0), &mut root, &Key::new(id, KIND_LAYER, 0))?;
        }
        self.write_removals(&mut root)?;
        self.layers.set_root(root);
        // 2. Layer-tree nodes: append, then point the map at them. Map updates
        //    never dirty layer-tree nodes, so one pass suffices.
        let ids: Vec<u64> = self
            .nodes
            .dirty_ids()
            .into_iter()
            .filter(|id| id & (PHYS_TAG | VIRT_TAG) == 0)
            .collect();
        let mut b = AlignedBuf::new(BLOCK_SIZE);
        for id in ids {
            {
                let n = self.nodes.get_mut(id).expect("dirty");
                n.seq = seq;
                n.self_address = id;
                n.encode(&mut b);
            }
            let csum = NodeImage::block_checksum(&b);
            let phys = self.append(Temperature::Hot, BlockTag::Logical(id), &b, csum)?;
            self.map_set(
                id,
                MapValue {
                    physical_block: phys,
                    checksum: csum,
                    extra_owners: 0,
                },
            )?;
            self.nodes.mark_clean(id);
        }
        // 3. The address map, bottom-up.
        self.write_address_map()?;
        debug_assert_eq!(self.nodes.dirty_count(), 0, "every dirty node written");
        // 4. Stream tails go to the writer; the checkpoint waits for every
        //    log write handed off so far.
        self.write_out(Temperature::Hot)?;
        self.write_out(Temperature::Cold)?;
        let log_writes = self.log.pending_writes();
        // 5. Segment table blocks that changed, each into the copy not holding
        //    the newest valid version.
        let segtable = self.space.encode_dirty_tables(seq);
        // 6. The superblock.
        let sb = Superblock {
            version: FORMAT_VERSION,
            uuid: self.geo.uuid,
            device_blocks: self.geo.device_blocks,
            segment_blocks: self.geo.segment_blocks,
            segment_count: self.geo.segment_count,
            data_start_block: self.geo.data_start_block,
            segtable_start_block: self.geo.segtable_start_block,
            segtable_blocks: self.geo.segtable_blocks,
            checkpoint_seq: seq,
            next_batch_seq: self.log.next_batch_seq(),
            map_root_block: self.address_map.root_block(),
            map_root_checksum: self.address_map.root_checksum(),
            layer_table_root: self.layers.root(),
            next_lbn: self.address_map.next_lbn(),
            next_layer_id: self.layers.next_id(),
            segtable_checksum: self.space.checksum(),
            created_unix_ns: self.geo.created_unix_ns,
        };
        let mut superblock = AlignedBuf::new(BLOCK_SIZE);
        sb.encode(&mut superblock);
        let done = Arc::new(Completion::default());
        self.checkpoint_in_flight = Some(CheckpointInFlight {
            seq,
            freed: self.space.take_pending_free(),
            generation: self.generation,
            done: done.clone(),
        });
        Ok(CheckpointWrite {
            dev: self.dev.clone(),
            log_writes,
            segtable,
            superblock_offset: (seq % SUPERBLOCK_SLOTS) * BLOCK_SIZE as u64,
            superblock,
            done,
        })
    }
}
