//! `Journal`: the physical write-ahead journal (after jbd2): the ring,
//! commit and checkpoint planning and writing, and what recovery found.
//!
//! Lifecycle of a page change:
//! 1. edited in the page cache by the open transaction (dirty);
//! 2. `plan_commit` seals an image of every dirty page, takes the open
//!    transaction's frees from the space map, and lays the transaction out
//!    in the ring: `desc, images.., [desc, images..].., commit`;
//! 3. `CommitBatch::write` (no lock held): flush (data first), write the
//!    ring blocks, flush;
//! 4. `finish_commit`: the images become the latest *committed* images, to
//!    be written home by the next checkpoint; the space the transaction
//!    freed leaves the space map's quarantine;
//! 5. checkpoint: write committed images home, flush, write the next
//!    superblock slot with the new journal tail, flush; then the ring space
//!    before the tail is reused.
//!
//! Recovery (`recovery`) replays, from the tail, every complete
//! transaction with consecutive sequence numbers, and stops at the first
//! that is not.

use super::page_cache::PageCache;
use super::recovery::Replay;
use super::space_map::{Freed, SpaceMap};
use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::{self, Layout, Page, Superblock, BLOCK, PAGE_SIZE};
use crate::format::{CommitRec, Descriptor, DESC_SLOTS};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

/// A transaction whose journal write was begun but not yet ended.
struct Inflight {
    seq: u64,
    start: u64,
    len: u64,
    freed: Vec<Freed>,
    revoked: Vec<u64>,
}

pub(super) struct Journal {
    layout: Layout,
    read_only: bool,
    /// The superblock of the last checkpoint: it records the tail.
    sb: Superblock,
    /// Ring size in blocks.
    ring_blocks: u64,
    /// Next ring position and sequence number to write.
    head: u64,
    next_seq: u64,
    /// Ring blocks between the tail and the head.
    used: u64,
    inflight: VecDeque<Inflight>,
    /// Latest committed image of every page changed since the last
    /// checkpoint began: exactly what the next checkpoint writes home.
    ckpt_images: BTreeMap<u64, Arc<Page>>,
    /// Superblock sequence of the checkpoint being written, if any.
    ckpt_outstanding: Option<u64>,
    /// Tree pages freed (and committed) while a checkpoint was outstanding:
    /// an aborted checkpoint must not queue their old images again.
    revoked_during_ckpt: HashSet<u64>,
    /// Frees whose release waits for the outstanding checkpoint, which may
    /// still write an old image over the block.
    deferred_frees: Vec<Freed>,
    /// Transactions replayed at open.
    replayed_txns: u64,
    /// Replay stopped at damage that a later transaction follows (see
    /// `Replay::damage`).
    damage: Option<Error>,
}

/// Everything a commit writes, laid out at `begin_commit`.
pub(super) struct CommitPlan {
    seq: u64,
    /// (byte offset, bytes): one run, or two when the txn wraps the ring.
    ring: Vec<(u64, Vec<u8>)>,
    images: Vec<(u64, Arc<Page>)>,
}

pub(super) struct CheckpointPlan {
    images: Vec<(u64, Arc<Page>)>,
    sb: Superblock,
    sb_page: Box<Page>,
    reclaim: u64,
}

/// One closed transaction, ready to be written without the meta lock.
pub struct CommitBatch {
    dev: Arc<dyn BlockDev>,
    plan: CommitPlan,
}

/// One checkpoint, ready to be written without the meta lock.
pub struct CheckpointBatch {
    dev: Arc<dyn BlockDev>,
    plan: CheckpointPlan,
}

impl CommitBatch {
    pub(super) fn new(dev: Arc<dyn BlockDev>, plan: CommitPlan) -> Self {
        CommitBatch { dev, plan }
    }
    pub(super) fn into_plan(self) -> CommitPlan {
        self.plan
    }
    /// Flush data, write journal records, flush. Call without the meta lock.
    pub fn write(&self) -> Result<()> {
        write_commit(&*self.dev, &self.plan)
    }
    /// Journal sequence number of this transaction.
    pub fn seq(&self) -> u64 {
        self.plan.seq
    }
    /// Pages this transaction carries.
    pub fn pages(&self) -> usize {
        self.plan.images.len()
    }
}

impl CheckpointBatch {
    pub(super) fn new(dev: Arc<dyn BlockDev>, plan: CheckpointPlan) -> Self {
        CheckpointBatch { dev, plan }
    }
    pub(super) fn into_plan(self) -> CheckpointPlan {
        self.plan
    }
    /// Write committed images home, flush, write the superblock, flush.
    pub fn write(&self) -> Result<()> {
        write_checkpoint(&*self.dev, &self.plan)
    }
}

pub(super) fn write_commit(dev: &dyn BlockDev, plan: &CommitPlan) -> Result<()> {
    // Data chunks written for the new mappings must be durable before the
    // mappings can be.
    dev.flush()?;
    for (off, bytes) in &plan.ring {
        dev.write_at(*off, bytes)?;
    }
    dev.flush()
}

fn write_checkpoint(dev: &dyn BlockDev, plan: &CheckpointPlan) -> Result<()> {
    // Coalesce runs of consecutive home blocks into single writes.
    let mut i = 0;
    while i < plan.images.len() {
        let first = plan.images[i].0;
        let mut j = i + 1;
        while j < plan.images.len() && plan.images[j].0 == first + (j - i) as u64 {
            j += 1;
        }
        let mut buf = Vec::with_capacity((j - i) * PAGE_SIZE);
        for (_, img) in &plan.images[i..j] {
            buf.extend_from_slice(&img[..]);
        }
        dev.write_at(first * BLOCK, &buf)?;
        i = j;
    }
    dev.flush()?;
    dev.write_at((plan.sb.seq % 2) * BLOCK, &plan.sb_page[..])?;
    dev.flush()
}

// ---- state ----

impl Journal {
    /// The journal after recovery found `replay` behind superblock `sb`.
    /// The replayed images enter the cache: they are the committed content
    /// of their pages, newer than home until the next checkpoint.
    pub(super) fn open<D: BlockDev>(
        sb: Superblock,
        read_only: bool,
        replay: Replay,
        cache: &mut PageCache<D>,
    ) -> Self {
        for (home, img) in &replay.images {
            cache.install_replayed(*home, Box::new(**img));
        }
        Journal {
            layout: sb.layout,
            read_only,
            sb,
            ring_blocks: sb.layout.journal_blocks,
            head: replay.head,
            next_seq: replay.next_seq,
            used: replay.used,
            inflight: VecDeque::new(),
            ckpt_images: replay.images,
            ckpt_outstanding: None,
            revoked_during_ckpt: HashSet::new(),
            deferred_frees: Vec::new(),
            replayed_txns: replay.txns,
            damage: replay.damage,
        }
    }

    /// Damage recovery found behind a later transaction (taken once).
    pub(super) fn take_damage(&mut self) -> Option<Error> {
        self.damage.take()
    }

    /// Largest transaction accepted: nearly the whole ring. One that does
    /// not fit behind what is already there gets room from a synchronous
    /// checkpoint in `make_room` (commits are written one at a time, so
    /// nothing else holds ring space then).
    fn max_txn_blocks(&self) -> u64 {
        self.ring_blocks - 1
    }

    pub(super) fn max_txn_pages(&self) -> usize {
        let b = self.max_txn_blocks();
        // Descriptors (with room for as many revokes as images) + commit.
        (b - 2 - 2 * b.div_ceil(DESC_SLOTS as u64)) as usize
    }

    /// A split-API commit or checkpoint is outstanding.
    pub(super) fn busy(&self) -> bool {
        !self.inflight.is_empty() || self.ckpt_outstanding.is_some()
    }

    pub(super) fn used_blocks(&self) -> u64 {
        self.used
    }

    pub(super) fn needs_recovery_checkpoint(&self) -> bool {
        self.replayed_txns > 0
    }

    /// Blocks a regular checkpoint may reclaim: everything not owned by a
    /// transaction still being written.
    fn reclaimable(&self) -> u64 {
        self.used - self.inflight.iter().map(|t| t.len).sum::<u64>()
    }
}

// ---- commit ----

impl Journal {
    /// Whether a commit may be laid out now: false on a read-only open
    /// (nothing is ever written), `Busy` while an earlier one is outstanding.
    pub(super) fn may_commit(&self) -> Result<bool> {
        if self.read_only {
            return Ok(false);
        }
        if let Some(t) = self.inflight.front() {
            // Commits are written one at a time: a second one laid out
            // behind an unfinished (perhaps failed) one would be lost at
            // replay, which stops at the first incomplete transaction.
            return Err(Error::Busy(format!(
                "commit of transaction {} is still outstanding: end_commit or abort_commit it first",
                t.seq
            )));
        }
        Ok(true)
    }

    /// Close the open transaction (its dirty pages and its frees) and lay
    /// it out in the ring. None if it changed nothing.
    pub(super) fn plan_commit<D: BlockDev>(
        &mut self,
        dev: &dyn BlockDev,
        cache: &mut PageCache<D>,
        space: &mut SpaceMap,
    ) -> Result<Option<CommitPlan>> {
        if !self.may_commit()? || (cache.dirty_count() == 0 && !space.has_open_frees()) {
            return Ok(None);
        }
        let pages = cache.dirty_count();
        let n_desc = (pages + space.open_revokes()).div_ceil(DESC_SLOTS).max(1);
        let len = (n_desc + pages + 1) as u64;
        if len > self.max_txn_blocks() {
            return Err(Error::Invalid(format!(
                "transaction of {pages} pages does not fit the journal (at most {} blocks); \
                 commit whenever dirty_pages() nears max_dirty_pages() = {}",
                self.max_txn_blocks(),
                self.max_txn_pages()
            )));
        }
        if self.used + len > self.ring_blocks {
            self.make_room(dev, len, cache, space)?;
        }
        let images = cache.seal_dirty();
        let (freed, revoked) = space.take_open_frees();
        let plan = self.layout_txn(images, &revoked, n_desc, len);
        self.inflight.push_back(Inflight {
            seq: plan.seq,
            start: self.head,
            len,
            freed,
            revoked,
        });
        self.head = (self.head + len) % self.ring_blocks;
        self.used += len;
        self.next_seq += 1;
        Ok(Some(plan))
    }

    /// Encode the transaction's descriptors, images and commit block at the
    /// head of the ring.
    fn layout_txn(
        &self,
        images: Vec<(u64, Arc<Page>)>,
        revokes: &[u64],
        n_desc: usize,
        len: u64,
    ) -> CommitPlan {
        let (seq, start, uuid) = (self.next_seq, self.head, self.sb.uuid);
        let mut bytes = Vec::with_capacity(len as usize * PAGE_SIZE);
        let mut crc = format::JOURNAL_DATA_SALT;
        let (mut hi, mut ri, mut pos) = (0usize, 0usize, start);
        for d in 0..n_desc {
            let take_h = DESC_SLOTS.min(images.len() - hi);
            let take_r = (DESC_SLOTS - take_h).min(revokes.len() - ri);
            let desc = Descriptor {
                seq,
                uuid,
                last: d + 1 == n_desc,
                homes: images[hi..hi + take_h].iter().map(|(h, _)| *h).collect(),
                revokes: revokes[ri..ri + take_r].to_vec(),
            };
            let enc = format::encode_descriptor(&desc, self.layout.ring_block(pos));
            crc = crc32c::crc32c_append(crc, &enc[..]);
            bytes.extend_from_slice(&enc[..]);
            pos += 1;
            for (_, img) in &images[hi..hi + take_h] {
                crc = crc32c::crc32c_append(crc, &img[..]);
                bytes.extend_from_slice(&img[..]);
                pos += 1;
            }
            hi += take_h;
            ri += take_r;
        }
        assert!(hi == images.len() && ri == revokes.len());
        let commit = CommitRec {
            seq,
            uuid,
            blocks: len as u32,
            data_crc: crc,
        };
        bytes.extend_from_slice(&format::encode_commit(&commit, self.layout.ring_block(pos))[..]);
        assert_eq!(bytes.len() as u64, len * BLOCK);
        CommitPlan {
            seq,
            ring: self.split_at_ring_end(start, bytes),
            images,
        }
    }

    /// Byte runs to write `bytes` at ring position `start`: one, or two
    /// when they wrap past the end of the ring.
    fn split_at_ring_end(&self, start: u64, bytes: Vec<u8>) -> Vec<(u64, Vec<u8>)> {
        let len = bytes.len() as u64 / BLOCK;
        let first = (self.ring_blocks - start).min(len) as usize * PAGE_SIZE;
        let base = self.layout.journal_start * BLOCK;
        let mut ring = vec![(base + start * BLOCK, bytes[..first].to_vec())];
        if first < bytes.len() {
            ring.push((base, bytes[first..].to_vec()));
        }
        ring
    }

    /// The ring cannot take `len` more blocks: checkpoint synchronously if
    /// nothing is in flight (rare: the store normally checkpoints after
    /// commits, which keeps the ring under half full).
    fn make_room<D: BlockDev>(
        &mut self,
        dev: &dyn BlockDev,
        len: u64,
        cache: &mut PageCache<D>,
        space: &mut SpaceMap,
    ) -> Result<()> {
        if self.inflight.is_empty() && self.ckpt_outstanding.is_none() {
            if let Some(plan) = self.plan_checkpoint(true) {
                self.run_checkpoint(dev, plan, cache, space)?;
            }
        }
        if self.used + len > self.ring_blocks {
            return Err(Error::Busy(format!(
                "journal full ({} of {} blocks in use by unfinished commits/checkpoint); \
                 end outstanding commits and checkpoint first",
                self.used, self.ring_blocks
            )));
        }
        Ok(())
    }

    /// The commit's write is done: its images are committed (the next
    /// checkpoint writes them home) and its frees are durable.
    pub(super) fn finish_commit(&mut self, plan: CommitPlan, space: &mut SpaceMap) -> Result<()> {
        if self.inflight.front().map(|t| t.seq) != Some(plan.seq) {
            return Err(Error::Invalid(format!(
                "end_commit of transaction {} out of order",
                plan.seq
            )));
        }
        let Some(t) = self.inflight.pop_front() else {
            return Ok(());
        };
        // Revokes first, as replay does: an image in this txn wins.
        for r in &t.revoked {
            self.ckpt_images.remove(r);
            if self.ckpt_outstanding.is_some() {
                self.revoked_during_ckpt.insert(*r);
            }
        }
        for (h, img) in plan.images {
            self.ckpt_images.insert(h, img);
        }
        if self.ckpt_outstanding.is_some() {
            self.deferred_frees.extend(t.freed);
        } else {
            space.release_quarantine(&t.freed);
        }
        Ok(())
    }

    /// Undo the newest `plan_commit` whose write failed: its pages and
    /// frees rejoin the open transaction.
    pub(super) fn unplan_commit<D: BlockDev>(
        &mut self,
        plan: CommitPlan,
        cache: &mut PageCache<D>,
        space: &mut SpaceMap,
    ) -> Result<()> {
        if self.inflight.back().map(|t| t.seq) != Some(plan.seq) {
            return Err(Error::Invalid(format!(
                "abort_commit of transaction {} which is not the newest",
                plan.seq
            )));
        }
        let Some(t) = self.inflight.pop_back() else {
            return Ok(());
        };
        self.head = t.start;
        self.used -= t.len;
        self.next_seq = t.seq;
        for (h, _) in &plan.images {
            cache.redirty(*h);
        }
        space.restore_open_frees(t.freed, t.revoked);
        Ok(())
    }
}

// ---- checkpoint ----

impl Journal {
    /// After a read-write open replayed the journal: put the replayed state
    /// home and start a fresh log. The sequence number skips one so records
    /// of a torn transaction left in the ring can never match again.
    pub(super) fn recovery_checkpoint<D: BlockDev>(
        &mut self,
        dev: &dyn BlockDev,
        cache: &mut PageCache<D>,
        space: &mut SpaceMap,
    ) -> Result<()> {
        self.next_seq += 1;
        if let Some(plan) = self.plan_checkpoint(true) {
            self.run_checkpoint(dev, plan, cache, space)?;
        }
        Ok(())
    }

    /// Lay out a checkpoint of every committed page not yet home. `force`
    /// ignores the half-full threshold.
    pub(super) fn plan_checkpoint(&mut self, force: bool) -> Option<CheckpointPlan> {
        if self.read_only || self.ckpt_outstanding.is_some() {
            return None;
        }
        let reclaim = self.reclaimable();
        if reclaim == 0 || (!force && self.used < self.ring_blocks / 2) {
            return None;
        }
        let (tail_pos, tail_seq) = self
            .inflight
            .front()
            .map_or((self.head, self.next_seq), |t| (t.start, t.seq));
        let sb = Superblock {
            seq: self.sb.seq + 1,
            tail_pos,
            tail_seq,
            ..self.sb
        };
        let sb_page = format::encode_superblock(&sb, sb.seq % 2);
        let images: Vec<_> = std::mem::take(&mut self.ckpt_images).into_iter().collect();
        self.ckpt_outstanding = Some(sb.seq);
        Some(CheckpointPlan {
            images,
            sb,
            sb_page,
            reclaim,
        })
    }

    /// Write a checkpoint under `&mut` (no split API), ending or undoing it.
    pub(super) fn run_checkpoint<D: BlockDev>(
        &mut self,
        dev: &dyn BlockDev,
        plan: CheckpointPlan,
        cache: &mut PageCache<D>,
        space: &mut SpaceMap,
    ) -> Result<()> {
        if let Err(e) = write_checkpoint(dev, &plan) {
            self.unplan_checkpoint(plan, space)?;
            return Err(e);
        }
        self.finish_checkpoint(plan, cache, space)
    }

    fn take_outstanding(&mut self, plan: &CheckpointPlan, space: &mut SpaceMap) -> Result<()> {
        if self.ckpt_outstanding != Some(plan.sb.seq) {
            return Err(Error::Invalid(
                "checkpoint batch does not match the outstanding checkpoint".into(),
            ));
        }
        self.ckpt_outstanding = None;
        self.revoked_during_ckpt.clear();
        let deferred = std::mem::take(&mut self.deferred_frees);
        space.release_quarantine(&deferred);
        Ok(())
    }

    /// The checkpoint is written: the tail moves, and pages whose cached
    /// bytes are what went home are homed in the cache.
    pub(super) fn finish_checkpoint<D: BlockDev>(
        &mut self,
        plan: CheckpointPlan,
        cache: &mut PageCache<D>,
        space: &mut SpaceMap,
    ) -> Result<()> {
        self.take_outstanding(&plan, space)?;
        self.used -= plan.reclaim;
        self.sb = plan.sb;
        for (h, img) in &plan.images {
            cache.note_written_home(*h, img);
        }
        Ok(())
    }

    /// Undo `plan_checkpoint` after its write failed: its pages stay
    /// pending for the next checkpoint and the tail does not move.
    pub(super) fn unplan_checkpoint(
        &mut self,
        mut plan: CheckpointPlan,
        space: &mut SpaceMap,
    ) -> Result<()> {
        let revoked = std::mem::take(&mut self.revoked_during_ckpt);
        for (h, img) in std::mem::take(&mut plan.images) {
            if !revoked.contains(&h) {
                // A newer committed image, if any, wins.
                self.ckpt_images.entry(h).or_insert(img);
            }
        }
        self.take_outstanding(&plan, space)
    }
}
