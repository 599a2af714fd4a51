//! The log: two append streams (hot and cold), each filling one open segment
//! in memory, the hand-off of full segments to the write-behind thread, and
//! the buffers whose blocks are not on the device yet.
//!
//! The log knows nothing of segment accounting: the store picks the segment
//! a stream opens (see [`crate::space::Space`]) and counts the blocks
//! appended. Every error a log operation returns is a device error; the
//! store stops the engine on it.

use crate::device::{AlignedBuf, Device, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::format::{BlockTag, Summary, SUMMARY_ENTRIES};
use crate::store::Geometry;
use crate::writer::{Completion, Inflight, SegmentWriter};
use std::collections::VecDeque;
use std::sync::Arc;

/// Which log a block goes to: hot (writable layers, metadata) or cold (image
/// layers and cleaner output), so long-lived data does not mix with churn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Temperature {
    Hot = 0,
    Cold = 1,
}

/// An open segment being filled in memory, written in large sequential writes.
struct Stream {
    seg: Option<u32>,
    buf: AlignedBuf,
    /// Blocks of `buf` in use (summaries included).
    fill: usize,
    /// Blocks of `buf` already on the device.
    written: usize,
    batch_at: Option<usize>,
    batch: Vec<(BlockTag, u64)>,
}

impl Stream {
    fn new(segment_blocks: u32) -> Stream {
        Stream {
            seg: None,
            buf: AlignedBuf::new(segment_blocks as usize * BLOCK_SIZE),
            fill: 0,
            written: 0,
            batch_at: None,
            batch: Vec::new(),
        }
    }

    /// Whether one more block (and the summary a new batch needs) fits.
    fn has_room(&self, segment_blocks: usize) -> bool {
        self.seg.is_some() && self.fill + usize::from(self.batch_at.is_none()) < segment_blocks
    }
}

/// Where [`Log::push`] put a block.
pub(crate) struct Pushed {
    pub block: u64,
    pub seg: u32,
    /// The stream's segment is full: the caller writes it out or hands it off.
    pub segment_full: bool,
}

pub(crate) struct Log {
    dev: Arc<dyn Device>,
    geo: Geometry,
    streams: [Stream; 2],
    writer: Option<SegmentWriter>,
    /// Full segments that may be in flight while the next one fills.
    write_behind_segments: usize,
    inflight: VecDeque<Inflight>,
    spare_buffers: Vec<AlignedBuf>,
    next_batch_seq: u64,
}

impl Log {
    /// A log with no open segment that writes synchronously.
    pub fn new(dev: Arc<dyn Device>, geo: &Geometry, write_behind_segments: usize) -> Log {
        let sb = geo.segment_blocks;
        Log {
            dev,
            geo: geo.clone(),
            streams: [Stream::new(sb), Stream::new(sb)],
            writer: None,
            write_behind_segments,
            inflight: VecDeque::new(),
            spare_buffers: Vec::new(),
            next_batch_seq: 1,
        }
    }

    /// Starts the write-behind thread (when configured); without it the log
    /// writes synchronously.
    pub fn start_writer(&mut self) {
        if self.write_behind_segments == 0 {
            return;
        }
        match SegmentWriter::new(self.dev.clone(), self.write_behind_segments) {
            Ok(w) => self.writer = Some(w),
            Err(e) => {
                log::warn!("no write-behind thread ({e}); writing segments synchronously")
            }
        }
    }

    /// The sequence number the next closed batch gets.
    pub fn next_batch_seq(&self) -> u64 {
        self.next_batch_seq
    }

    /// Recovery: batches continue from the checkpoint's number.
    pub fn set_next_batch_seq(&mut self, seq: u64) {
        self.next_batch_seq = seq;
    }

    /// Whether a stream is filling `seg`.
    pub fn is_open(&self, seg: u32) -> bool {
        self.streams.iter().any(|s| s.seg == Some(seg))
    }

    /// Blocks still unused in the open segments.
    pub fn open_room_blocks(&self) -> u64 {
        let seg = self.geo.segment_blocks as u64;
        self.streams
            .iter()
            .filter(|s| s.seg.is_some())
            .map(|s| seg - s.fill as u64)
            .sum()
    }

    /// Whether stream `t` can take one more block without a new segment.
    pub fn has_room(&self, t: Temperature) -> bool {
        self.streams[t as usize].has_room(self.geo.segment_blocks as usize)
    }

    /// Points stream `t` (which has no segment) at the empty segment `seg`.
    pub fn start_segment(&mut self, t: Temperature, seg: u32) {
        let st = &mut self.streams[t as usize];
        debug_assert!(st.seg.is_none(), "stream already has a segment");
        st.seg = Some(seg);
        st.fill = 0;
        st.written = 0;
        st.batch_at = None;
        st.batch.clear();
    }

    /// The physical block the next push to stream `t` uses (the stream has room).
    pub fn next_block(&self, t: Temperature) -> u64 {
        let st = &self.streams[t as usize];
        let at = st.fill + usize::from(st.batch_at.is_none());
        self.geo.segment_start(st.seg.expect("open")) + at as u64
    }

    /// Appends one block to stream `t`, which has room.
    pub fn push(&mut self, t: Temperature, tag: BlockTag, data: &[u8], checksum: u64) -> Pushed {
        debug_assert_eq!(data.len(), BLOCK_SIZE);
        let seg_blocks = self.geo.segment_blocks as usize;
        let st = &mut self.streams[t as usize];
        debug_assert!(st.has_room(seg_blocks), "push without room");
        if st.batch_at.is_none() {
            st.batch_at = Some(st.fill);
            st.fill += 1;
        }
        let at = st.fill;
        st.buf[at * BLOCK_SIZE..(at + 1) * BLOCK_SIZE].copy_from_slice(data);
        st.batch.push((tag, checksum));
        st.fill += 1;
        let seg = st.seg.expect("stream has a segment");
        let full_batch = st.batch.len() == SUMMARY_ENTRIES;
        let segment_full = st.fill == seg_blocks;
        if full_batch {
            self.close_batch(t);
        }
        Pushed {
            block: self.geo.segment_start(seg) + at as u64,
            seg,
            segment_full,
        }
    }

    fn close_batch(&mut self, t: Temperature) {
        let seq = self.next_batch_seq;
        let st = &mut self.streams[t as usize];
        let (Some(at), Some(seg)) = (st.batch_at, st.seg) else {
            return;
        };
        let self_block = self.geo.segment_start(seg) + at as u64;
        let s = Summary {
            self_block,
            seq,
            entries: std::mem::take(&mut st.batch),
        };
        s.encode(&mut st.buf[at * BLOCK_SIZE..(at + 1) * BLOCK_SIZE]);
        st.batch_at = None;
        self.next_batch_seq += 1;
    }

    /// Writes the unwritten part of a stream's segment in one device write
    /// (or hands a copy of it to the writer thread).
    pub fn write_out(&mut self, t: Temperature) -> Result<()> {
        self.close_batch(t);
        let st = &self.streams[t as usize];
        let Some(seg) = st.seg else { return Ok(()) };
        if st.written == st.fill {
            return Ok(());
        }
        if self.writer.is_some() {
            // Writes done give their buffers back first, for the copy below.
            self.reap_finished()?;
        }
        let st = &self.streams[t as usize];
        let start_block = self.geo.segment_start(seg) + st.written as u64;
        let tail = &st.buf[st.written * BLOCK_SIZE..st.fill * BLOCK_SIZE];
        if let Some(writer) = &self.writer {
            // The writer thread writes a copy, so the store lock is not held
            // across device I/O; the copy serves reads until it is written.
            // It goes into a spare segment buffer when there is one: a fresh
            // allocation per timer flush costs page faults and zeroing every
            // time. Without one, a copy of the tail's size: timer flushes
            // between two reaps must not hold a whole segment buffer each.
            let mut buf = match self.spare_buffers.pop() {
                Some(b) => b,
                None => AlignedBuf::new(tail.len()),
            };
            buf[..tail.len()].copy_from_slice(tail);
            let valid_blocks = tail.len() / BLOCK_SIZE;
            let buf = Arc::new(buf);
            let done = writer.submit(start_block, buf.clone(), 0, valid_blocks);
            self.inflight.push_back(Inflight {
                start_block,
                valid_blocks,
                buf,
                done,
            });
        } else {
            self.dev.write_at(start_block * BLOCK_SIZE as u64, tail)?;
        }
        let st = &mut self.streams[t as usize];
        st.written = st.fill;
        Ok(())
    }

    /// Detaches stream `t` from its segment (written out first by the caller).
    pub fn detach(&mut self, t: Temperature) -> Option<u32> {
        self.streams[t as usize].seg.take()
    }

    /// Whether full segments go to the writer thread.
    pub fn writes_behind(&self) -> bool {
        self.writer.is_some()
    }

    /// Gives stream `t`'s full segment to the writer thread, detaches it and
    /// returns it. The caller then reaps ([`Log::reap_to_limit`]).
    pub fn hand_off(&mut self, t: Temperature) -> u32 {
        self.close_batch(t);
        let seg_bytes = self.geo.segment_blocks as usize * BLOCK_SIZE;
        let fresh = self
            .spare_buffers
            .pop()
            .unwrap_or_else(|| AlignedBuf::new(seg_bytes));
        let st = &mut self.streams[t as usize];
        let seg = st.seg.take().expect("full stream has a segment");
        let (from, to) = (st.written, st.fill);
        let buf = Arc::new(std::mem::replace(&mut st.buf, fresh));
        st.fill = 0;
        st.written = 0;
        st.batch_at = None;
        let start_block = self.geo.segment_start(seg);
        if from < to {
            let writer = self.writer.as_ref().expect("write-behind on");
            let done = writer.submit(start_block, buf.clone(), from, to);
            self.inflight.push_back(Inflight {
                start_block,
                valid_blocks: to,
                buf,
                done,
            });
        }
        seg
    }

    /// Waits until no more than the configured number of segment writes
    /// are in flight, then gives back the buffers of those done.
    pub fn reap_to_limit(&mut self) -> Result<()> {
        while self.inflight.len() > self.write_behind_segments {
            self.reap_one()?;
        }
        self.reap_finished()
    }

    fn reap_one(&mut self) -> Result<()> {
        let Some(f) = self.inflight.pop_front() else {
            return Ok(());
        };
        f.done
            .wait()
            .map_err(|m| Error::Io(std::io::Error::other(m)))?;
        let seg_bytes = self.geo.segment_blocks as usize * BLOCK_SIZE;
        if let Ok(b) = Arc::try_unwrap(f.buf) {
            // Only whole segment buffers are reused (a stream tail written
            // out without a spare is a smaller copy).
            if b.len() == seg_bytes && self.spare_buffers.len() <= self.write_behind_segments {
                self.spare_buffers.push(b);
            }
        }
        Ok(())
    }

    /// Gives back the buffers of log writes that have completed, without
    /// waiting for any.
    pub fn reap_finished(&mut self) -> Result<()> {
        while self.inflight.front().is_some_and(|f| f.done.is_done()) {
            self.reap_one()?;
        }
        Ok(())
    }

    /// Waits for every handed-off segment write.
    pub fn wait_inflight(&mut self) -> Result<()> {
        while !self.inflight.is_empty() {
            self.reap_one()?;
        }
        Ok(())
    }

    /// The completions of every log write handed off so far.
    pub fn pending_writes(&self) -> Vec<Arc<Completion>> {
        self.inflight.iter().map(|f| f.done.clone()).collect()
    }

    /// Whether a write of `seg` is still in the writer's hands (its device
    /// content is not yet what the engine wrote).
    pub fn segment_in_flight(&self, seg: u32) -> bool {
        let start = self.geo.segment_start(seg);
        let end = start + self.geo.segment_blocks as u64;
        self.inflight
            .iter()
            .any(|f| f.start_block < end && start < f.start_block + f.valid_blocks as u64)
    }

    /// The bytes of `block` if it is still in a stream buffer.
    /// The copy of `block` in an open segment's buffer, to change (testing
    /// hooks that edit the device change it too, or reads would not see
    /// their edit).
    #[cfg(any(test, feature = "testing"))]
    pub fn open_segment_block_mut(&mut self, block: u64) -> Option<&mut [u8]> {
        for st in &mut self.streams {
            if let Some(seg) = st.seg {
                let start = self.geo.segment_start(seg);
                if block >= start && block < start + st.fill as u64 {
                    let i = (block - start) as usize;
                    return Some(&mut st.buf[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]);
                }
            }
        }
        None
    }

    pub fn buffered_block(&self, block: u64) -> Option<&[u8]> {
        for f in &self.inflight {
            if block >= f.start_block && block < f.start_block + f.valid_blocks as u64 {
                let i = (block - f.start_block) as usize;
                return Some(&f.buf[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]);
            }
        }
        for st in &self.streams {
            if let Some(seg) = st.seg {
                let start = self.geo.segment_start(seg);
                if block >= start && block < start + st.fill as u64 {
                    let i = (block - start) as usize;
                    return Some(&st.buf[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;

    /// Timer flushes write out a tail each; between two reaps they must
    /// not hold a whole segment buffer apiece, and every block reaches the
    /// device.
    #[test]
    fn timer_flushes_hold_their_tails_not_a_segment_each() {
        let dev: Arc<dyn Device> = Arc::new(MemDevice::new(256 << 20));
        let geo = Geometry::for_device((256 << 20) / BLOCK_SIZE as u64, 1024).unwrap();
        let mut log = Log::new(dev.clone(), &geo, 4);
        log.start_writer();
        assert!(log.writes_behind());
        log.start_segment(Temperature::Hot, 1);
        let seg_bytes = geo.segment_blocks as usize * BLOCK_SIZE;
        let mut pushed = Vec::new();
        for i in 0..300u64 {
            let block = vec![i as u8; BLOCK_SIZE];
            let p = log.push(Temperature::Hot, BlockTag::Logical(i), &block, 0);
            pushed.push((p.block, i as u8));
            log.write_out(Temperature::Hot).unwrap();
            let held: usize = log.inflight.iter().map(|f| f.buf.len()).sum();
            assert!(
                held <= (log.write_behind_segments + 1) * seg_bytes + 2 * 300 * BLOCK_SIZE,
                "{held} bytes held by {} writes in flight",
                log.inflight.len()
            );
        }
        log.wait_inflight().unwrap();
        let mut buf = AlignedBuf::new(BLOCK_SIZE);
        for (block, fill) in pushed {
            dev.read_at(block * BLOCK_SIZE as u64, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == fill), "block {block}");
        }
    }
}
