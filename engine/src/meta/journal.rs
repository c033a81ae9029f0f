//! Physical write-ahead journal (after jbd2): commit, checkpoint, recovery,
//! and format.
//!
//! Lifecycle of a page change:
//! 1. edited in the page cache by the open transaction (`dirty`);
//! 2. `begin_commit` seals an image of every dirty page and lays out the
//!    transaction in the ring: `desc, images.., [desc, images..].., commit`;
//! 3. `CommitBatch::write` (no lock held): flush (data first), write the
//!    ring blocks, flush;
//! 4. `end_commit`: the images become the latest *committed* images, to be
//!    written home by the next checkpoint; chunks freed by the txn are
//!    released to the allocator;
//! 5. checkpoint: write committed images home, flush, write the next
//!    superblock slot with the new journal tail, flush; then the ring space
//!    before the tail is reused.
//!
//! Recovery replays, from the tail, every complete transaction with
//! consecutive sequence numbers, and stops at the first that is not.

use super::imp::{CachePage, Meta};
use super::spacemap::Freed;
use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::{self, node, BlockKind, Layout, Page, Superblock, BLOCK, PAGE_SIZE};
use crate::format::{CommitRec, Descriptor, StateRec, TreeRoot, BITS_PER_PAGE, DESC_SLOTS};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use super::FormatOptions;

/// A transaction whose journal write was begun but not yet ended.
struct Inflight {
    seq: u64,
    start: u64,
    len: u64,
    freed: Vec<Freed>,
    revoked: Vec<u64>,
}

pub(in crate::meta) struct JournalState {
    /// Ring size in blocks.
    n: u64,
    uuid: u64,
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
    deferred: Vec<Freed>,
    /// Pages installed from the journal at open.
    replayed: HashSet<u64>,
    replayed_txns: u64,
    /// Set when replay stopped at a damaged transaction that a later one
    /// follows: that is corruption (commits are written one after another,
    /// each flushed before the next starts), not a torn tail.
    pub(super) damage: Option<Error>,
}

impl JournalState {
    pub(super) fn new(sb: &Superblock) -> Self {
        JournalState {
            n: sb.layout.journal_blocks,
            uuid: sb.uuid,
            head: sb.tail_pos,
            next_seq: sb.tail_seq,
            used: 0,
            inflight: VecDeque::new(),
            ckpt_images: BTreeMap::new(),
            ckpt_outstanding: None,
            revoked_during_ckpt: HashSet::new(),
            deferred: Vec::new(),
            replayed: HashSet::new(),
            replayed_txns: 0,
            damage: None,
        }
    }

    /// Largest transaction accepted: nearly the whole ring. One that does
    /// not fit behind what is already there gets room from a synchronous
    /// checkpoint in `make_room` (commits are written one at a time, so
    /// nothing else holds ring space then).
    fn max_txn_blocks(&self) -> u64 {
        self.n - 1
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

    pub(super) fn is_replayed(&self, block: u64) -> bool {
        self.replayed.contains(&block)
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

/// The newest valid superblock of the two slots.
pub(super) fn read_superblock(dev: &dyn BlockDev) -> Result<Superblock> {
    if dev.size() < 2 * BLOCK {
        return Err(Error::NotFormatted(format!(
            "device of {} bytes cannot hold a superblock",
            dev.size()
        )));
    }
    let mut best: Option<Superblock> = None;
    let mut errs = Vec::new();
    let mut any_magic = false;
    for slot in 0..2u64 {
        let mut buf = format::new_page();
        dev.read_at(slot * BLOCK, &mut buf[..])?;
        any_magic |= format::has_magic(&buf[..]);
        match format::decode_superblock(&buf[..], slot) {
            Ok(sb) if best.is_none_or(|b| sb.seq > b.seq) => best = Some(sb),
            Ok(_) => {}
            Err(e) => errs.push(e),
        }
    }
    if let Some(sb) = best {
        return Ok(sb);
    }
    if let Some(i) = errs
        .iter()
        .position(|e| matches!(e, Error::UnsupportedVersion { .. }))
    {
        return Err(errs.swap_remove(i));
    }
    if !any_magic {
        return Err(Error::NotFormatted(
            "no snapmv superblock in block 0 or 1".into(),
        ));
    }
    Err(errs.swap_remove(0))
}

/// A parsed, verified transaction.
struct Txn {
    len: u64,
    images: Vec<(u64, Box<Page>)>,
    revokes: Vec<u64>,
}

impl<D: BlockDev> Meta<D> {
    fn ring_read(&self, pos: u64) -> Result<Box<Page>> {
        self.read_block(self.layout.ring_block(pos))
    }

    /// Parse the transaction at ring position `pos` that must carry `seq`.
    /// Ok(None) when there is none (end of the log, torn or stale records);
    /// Err only for I/O errors or a committed image that is damaged.
    fn read_txn(&self, pos: u64, seq: u64, max_len: u64) -> Result<Option<Txn>> {
        let uuid = self.jn.uuid;
        let mut k = 0u64;
        let mut crc = format::JOURNAL_DATA_SALT;
        let mut images = Vec::new();
        let mut revokes = Vec::new();
        loop {
            if k >= max_len {
                return Ok(None);
            }
            let buf = self.ring_read(pos + k)?;
            let Ok(d) = format::decode_descriptor(&buf[..], self.layout.ring_block(pos + k)) else {
                return Ok(None);
            };
            if d.seq != seq || d.uuid != uuid || k + d.homes.len() as u64 + 1 > max_len {
                return Ok(None);
            }
            crc = crc32c::crc32c_append(crc, &buf[..]);
            k += 1;
            for home in d.homes {
                let img = self.ring_read(pos + k)?;
                crc = crc32c::crc32c_append(crc, &img[..]);
                images.push((home, img));
                k += 1;
            }
            revokes.extend(d.revokes);
            if d.last {
                break;
            }
        }
        if k >= max_len {
            return Ok(None);
        }
        let buf = self.ring_read(pos + k)?;
        let Ok(c) = format::decode_commit(&buf[..], self.layout.ring_block(pos + k)) else {
            return Ok(None);
        };
        if c.seq != seq || c.uuid != uuid || u64::from(c.blocks) != k + 1 || c.data_crc != crc {
            return Ok(None);
        }
        for (home, img) in &images {
            self.check_replay_image(*home, img)?;
        }
        Ok(Some(Txn {
            len: k + 1,
            images,
            revokes,
        }))
    }

    /// A committed image must be a valid page for its home block: the commit
    /// crc matched, so anything else is damage, not a torn write.
    fn check_replay_image(&self, home: u64, img: &Page) -> Result<()> {
        let l = &self.layout;
        let kinds: &[BlockKind] = if home == l.state_block {
            &[BlockKind::State]
        } else if l.in_bitmap(home) {
            &[BlockKind::Bitmap]
        } else if l.in_area(home) {
            &[BlockKind::Leaf, BlockKind::Internal]
        } else {
            return Err(Error::Corrupt {
                block: home,
                kind: "journal",
                reason: format!("journalled image for block {home}, which is no page home"),
            });
        };
        format::check_header(&img[..], home, kinds).map(|_| ())
    }

    /// Replay committed transactions from the tail into the page cache.
    pub(super) fn replay(&mut self) -> Result<()> {
        let n = self.jn.n;
        let (mut pos, mut seq, mut scanned) = (self.jn.head, self.jn.next_seq, 0u64);
        let mut map: BTreeMap<u64, Arc<Page>> = BTreeMap::new();
        while let Some(txn) = self.read_txn(pos, seq, n - scanned)? {
            for r in &txn.revokes {
                map.remove(r);
            }
            for (home, img) in txn.images {
                map.insert(home, Arc::from(img));
            }
            pos = (pos + txn.len) % n;
            scanned += txn.len;
            seq += 1;
            self.jn.replayed_txns += 1;
        }
        tracing::debug!(
            txns = self.jn.replayed_txns,
            pages = map.len(),
            "journal replayed"
        );
        self.jn.damage = self.find_later_txn(pos, seq)?;
        self.jn.head = pos;
        self.jn.next_seq = seq;
        self.jn.used = scanned;
        for (home, img) in &map {
            let buf = Box::new(**img);
            self.cache.insert(
                *home,
                CachePage {
                    buf,
                    checked: false,
                },
            );
            self.jn.replayed.insert(*home);
        }
        self.jn.ckpt_images = map;
        Ok(())
    }

    /// Look through the whole ring (bounded by the journal, not the device)
    /// for a descriptor of this format newer than `seq`, the transaction
    /// replay could not read at `pos`.
    fn find_later_txn(&self, pos: u64, seq: u64) -> Result<Option<Error>> {
        const BATCH: u64 = 256;
        let l = &self.layout;
        let mut buf = vec![0u8; BATCH as usize * PAGE_SIZE];
        let mut at = 0;
        while at < l.journal_blocks {
            let k = BATCH.min(l.journal_blocks - at);
            let bytes = &mut buf[..k as usize * PAGE_SIZE];
            self.dev.read_at((l.journal_start + at) * BLOCK, bytes)?;
            for (i, blk) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
                let block = l.journal_start + at + i as u64;
                // Cheap pre-filter on the raw fields before the crc.
                if format::rd_u32(blk, 0) != BlockKind::JournalDesc as u32
                    || format::rd_u64(blk, 16) <= seq
                    || format::rd_u64(blk, 24) != self.jn.uuid
                {
                    continue;
                }
                if let Ok(d) = format::decode_descriptor(blk, block) {
                    return Ok(Some(Error::Corrupt {
                        block: l.ring_block(pos),
                        kind: "journal",
                        reason: format!(
                            "transaction {seq} at ring position {pos} is damaged, yet transaction {} \
                             follows at block {block}: committed metadata was lost",
                            d.seq
                        ),
                    }));
                }
            }
            at += k;
        }
        Ok(None)
    }

    /// After a read-write open replayed the journal: put the replayed state
    /// home and start a fresh log. The sequence number skips one so records
    /// of a torn transaction left in the ring can never match again.
    pub(super) fn recovery_checkpoint(&mut self) -> Result<()> {
        self.jn.next_seq += 1;
        if let Some(plan) = self.plan_checkpoint(true)? {
            self.run_checkpoint(plan)?;
        }
        Ok(())
    }

    /// Close the open transaction and lay it out in the ring.
    pub(super) fn plan_commit(&mut self) -> Result<Option<CommitPlan>> {
        if self.read_only {
            return Ok(None);
        }
        if let Some(t) = self.jn.inflight.front() {
            // Commits are written one at a time: a second one laid out
            // behind an unfinished (perhaps failed) one would be lost at
            // replay, which stops at the first incomplete transaction.
            return Err(Error::Busy(format!(
                "commit of transaction {} is still outstanding: end_commit or abort_commit it first",
                t.seq
            )));
        }
        if self.state_dirty {
            let b = self.layout.state_block;
            let buf = format::encode_state(&self.st, b);
            self.cache.insert(b, CachePage { buf, checked: true });
            self.dirty.insert(b);
            self.state_dirty = false;
        }
        if self.dirty.is_empty() && self.sm.open_revoked.is_empty() && self.sm.open_freed.is_empty()
        {
            return Ok(None);
        }
        let homes: Vec<u64> = self.dirty.iter().copied().collect();
        let revokes = self.sm.open_revoked.clone();
        let n_desc = (homes.len() + revokes.len()).div_ceil(DESC_SLOTS).max(1);
        let len = (n_desc + homes.len() + 1) as u64;
        if len > self.jn.max_txn_blocks() {
            return Err(Error::Invalid(format!(
                "transaction of {} pages does not fit the journal (at most {} blocks); \
                 commit whenever dirty_pages() nears max_dirty_pages() = {}",
                homes.len(),
                self.jn.max_txn_blocks(),
                self.jn.max_txn_pages()
            )));
        }
        if self.jn.used + len > self.jn.n {
            self.make_room(len)?;
        }
        let images = self.capture_images(&homes)?;
        let plan = self.layout_txn(&images, &revokes, n_desc, len);
        self.jn.inflight.push_back(Inflight {
            seq: plan.seq,
            start: self.jn.head,
            len,
            freed: std::mem::take(&mut self.sm.open_freed),
            revoked: std::mem::take(&mut self.sm.open_revoked),
        });
        self.jn.head = (self.jn.head + len) % self.jn.n;
        self.jn.used += len;
        self.jn.next_seq += 1;
        self.dirty.clear();
        Ok(Some(plan))
    }

    /// Seal every dirty page in the cache and take an immutable copy.
    fn capture_images(&mut self, homes: &[u64]) -> Result<Vec<(u64, Arc<Page>)>> {
        let mut images = Vec::with_capacity(homes.len());
        for &h in homes {
            let Some(p) = self.cache.get_mut(&h) else {
                return Err(Error::Corrupt {
                    block: h,
                    kind: "page cache",
                    reason: "dirty page missing from the cache".into(),
                });
            };
            format::seal(&mut p.buf);
            images.push((h, Arc::new(*p.buf)));
        }
        Ok(images)
    }

    fn layout_txn(
        &self,
        images: &[(u64, Arc<Page>)],
        revokes: &[u64],
        n_desc: usize,
        len: u64,
    ) -> CommitPlan {
        let (seq, start, uuid) = (self.jn.next_seq, self.jn.head, self.jn.uuid);
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
        // Split at the end of the ring.
        let first = (self.jn.n - start).min(len) as usize * PAGE_SIZE;
        let base = self.layout.journal_start * BLOCK;
        let mut ring = vec![(base + start * BLOCK, bytes[..first].to_vec())];
        if first < bytes.len() {
            ring.push((base, bytes[first..].to_vec()));
        }
        CommitPlan {
            seq,
            ring,
            images: images.to_vec(),
        }
    }

    /// The ring cannot take `len` more blocks: checkpoint synchronously if
    /// nothing is in flight (rare: the store normally checkpoints after
    /// commits, which keeps the ring under half full).
    fn make_room(&mut self, len: u64) -> Result<()> {
        if self.jn.inflight.is_empty() && self.jn.ckpt_outstanding.is_none() {
            if let Some(plan) = self.plan_checkpoint(true)? {
                self.run_checkpoint(plan)?;
            }
        }
        if self.jn.used + len > self.jn.n {
            return Err(Error::Busy(format!(
                "journal full ({} of {} blocks in use by unfinished commits/checkpoint); \
                 end outstanding commits and checkpoint first",
                self.jn.used, self.jn.n
            )));
        }
        Ok(())
    }

    pub(super) fn finish_commit(&mut self, plan: CommitPlan) -> Result<()> {
        if self.jn.inflight.front().map(|t| t.seq) != Some(plan.seq) {
            return Err(Error::Invalid(format!(
                "end_commit of transaction {} out of order",
                plan.seq
            )));
        }
        let Some(t) = self.jn.inflight.pop_front() else {
            return Ok(());
        };
        // Revokes first, as replay does: an image in this txn wins.
        for r in &t.revoked {
            self.jn.ckpt_images.remove(r);
            if self.jn.ckpt_outstanding.is_some() {
                self.jn.revoked_during_ckpt.insert(*r);
            }
        }
        for (h, img) in plan.images {
            self.jn.ckpt_images.insert(h, img);
        }
        if self.jn.ckpt_outstanding.is_some() {
            self.jn.deferred.extend(t.freed);
        } else {
            self.sm.release(&t.freed);
        }
        Ok(())
    }

    /// Undo the newest `plan_commit` whose write failed.
    pub(super) fn unplan_commit(&mut self, plan: CommitPlan) -> Result<()> {
        if self.jn.inflight.back().map(|t| t.seq) != Some(plan.seq) {
            return Err(Error::Invalid(format!(
                "abort_commit of transaction {} which is not the newest",
                plan.seq
            )));
        }
        let Some(t) = self.jn.inflight.pop_back() else {
            return Ok(());
        };
        self.jn.head = t.start;
        self.jn.used -= t.len;
        self.jn.next_seq = t.seq;
        for (h, _) in &plan.images {
            // A page freed since is gone from the cache (and revoked).
            if self.cache.contains_key(h) {
                self.dirty.insert(*h);
            }
        }
        self.sm.open_freed.splice(0..0, t.freed);
        self.sm.open_revoked.splice(0..0, t.revoked);
        self.state_dirty = true;
        Ok(())
    }

    /// Lay out a checkpoint of every committed page not yet home. `force`
    /// ignores the half-full threshold.
    pub(super) fn plan_checkpoint(&mut self, force: bool) -> Result<Option<CheckpointPlan>> {
        let jn = &self.jn;
        if self.read_only || jn.ckpt_outstanding.is_some() {
            return Ok(None);
        }
        let reclaim = jn.reclaimable();
        if reclaim == 0 || (!force && jn.used < jn.n / 2) {
            return Ok(None);
        }
        let (tail_pos, tail_seq) = jn
            .inflight
            .front()
            .map_or((jn.head, jn.next_seq), |t| (t.start, t.seq));
        let sb = Superblock {
            seq: self.sb.seq + 1,
            tail_pos,
            tail_seq,
            ..self.sb
        };
        let sb_page = format::encode_superblock(&sb, sb.seq % 2);
        let images: Vec<_> = std::mem::take(&mut self.jn.ckpt_images)
            .into_iter()
            .collect();
        self.jn.ckpt_outstanding = Some(sb.seq);
        Ok(Some(CheckpointPlan {
            images,
            sb,
            sb_page,
            reclaim,
        }))
    }

    pub(super) fn run_checkpoint(&mut self, plan: CheckpointPlan) -> Result<()> {
        if let Err(e) = write_checkpoint(&*self.dev, &plan) {
            self.unplan_checkpoint(plan)?;
            return Err(e);
        }
        self.finish_checkpoint(plan)
    }

    fn take_outstanding(&mut self, plan: &CheckpointPlan) -> Result<()> {
        if self.jn.ckpt_outstanding != Some(plan.sb.seq) {
            return Err(Error::Invalid(
                "checkpoint batch does not match the outstanding checkpoint".into(),
            ));
        }
        self.jn.ckpt_outstanding = None;
        self.jn.revoked_during_ckpt.clear();
        let deferred = std::mem::take(&mut self.jn.deferred);
        self.sm.release(&deferred);
        Ok(())
    }

    pub(super) fn finish_checkpoint(&mut self, plan: CheckpointPlan) -> Result<()> {
        self.take_outstanding(&plan)?;
        self.jn.used -= plan.reclaim;
        self.sb = plan.sb;
        self.jn.replayed.clear();
        Ok(())
    }

    pub(super) fn unplan_checkpoint(&mut self, mut plan: CheckpointPlan) -> Result<()> {
        let revoked = std::mem::take(&mut self.jn.revoked_during_ckpt);
        for (h, img) in std::mem::take(&mut plan.images) {
            if !revoked.contains(&h) {
                // A newer committed image, if any, wins.
                self.jn.ckpt_images.entry(h).or_insert(img);
            }
        }
        self.take_outstanding(&plan)
    }
}

// ---- format ----

fn mix64(mut x: u64) -> u64 {
    // splitmix64 finaliser: spreads the format inputs into an id.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Highest journal sequence number found in the ring (any format's), so a
/// new format starts above it and stale records can never be replayed.
fn scan_ring_max_seq(dev: &dyn BlockDev, l: &Layout) -> Result<u64> {
    const BATCH: u64 = 256;
    let mut max = 0u64;
    let mut buf = vec![0u8; BATCH as usize * PAGE_SIZE];
    let mut pos = 0;
    while pos < l.journal_blocks {
        let k = BATCH.min(l.journal_blocks - pos);
        let bytes = &mut buf[..k as usize * PAGE_SIZE];
        dev.read_at((l.journal_start + pos) * BLOCK, bytes)?;
        for (i, blk) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
            let kinds = [BlockKind::JournalDesc, BlockKind::JournalCommit];
            if let Ok(h) = format::check_header(blk, l.journal_start + pos + i as u64, &kinds) {
                max = max.max(h.seq);
            }
        }
        pos += k;
    }
    Ok(max)
}

/// Bitmap word for blocks `wb..wb+64` of a fresh device: fixed areas, the
/// three root leaves, and blocks past the last whole chunk are in use.
fn fresh_bitmap_word(l: &Layout, wb: u64) -> u64 {
    let low = l.alloc_start + 3;
    let mut w = 0u64;
    if wb + 64 <= low {
        w = u64::MAX;
    } else if wb < low {
        w |= (1u64 << (low - wb)) - 1;
    }
    if wb >= l.area_end {
        w = u64::MAX;
    } else if wb + 64 > l.area_end {
        w |= !((1u64 << (l.area_end - wb)) - 1);
    }
    w
}

fn write_fresh_bitmap(dev: &dyn BlockDev, l: &Layout) -> Result<()> {
    const BATCH: u64 = 64;
    let mut p = 0;
    while p < l.bitmap_blocks {
        let k = BATCH.min(l.bitmap_blocks - p);
        let mut bytes = Vec::with_capacity(k as usize * PAGE_SIZE);
        for q in p..p + k {
            let mut page = format::new_page();
            format::init_bitmap(&mut page, l.bitmap_start + q);
            for i in 0..format::BITMAP_WORDS {
                let wb = q * BITS_PER_PAGE + i as u64 * 64;
                format::bitmap::set_word(&mut page, i, fresh_bitmap_word(l, wb));
            }
            format::seal(&mut page);
            bytes.extend_from_slice(&page[..]);
        }
        dev.write_at((l.bitmap_start + p) * BLOCK, &bytes)?;
        p += k;
    }
    Ok(())
}

fn fresh_state(l: &Layout) -> StateRec {
    let roots = [0u64, 1, 2].map(|i| TreeRoot {
        block: l.alloc_start + i,
        height: 1,
    });
    let meta_chunks = (l.alloc_start + 2) / l.bpc - l.alloc_start / l.bpc + 1;
    StateRec {
        roots,
        data_chunks: 0,
        meta_blocks: 3,
        free_blocks: l.area_blocks() - 3,
        meta_chunks,
        data_cursor: l.first_chunk + l.chunks_total() / 32,
        meta_cursor: l.alloc_start + 3,
        app_state: Vec::new(),
    }
}

/// Write an empty store onto `dev`.
pub(super) fn format_device(dev: &dyn BlockDev, opts: &FormatOptions) -> Result<()> {
    let l = Layout::new(dev.size(), opts.chunk_size)?;
    let mut old_id = 0u64;
    let mut formatted = false;
    for slot in 0..2u64 {
        let mut buf = format::new_page();
        dev.read_at(slot * BLOCK, &mut buf[..])?;
        match format::decode_superblock(&buf[..], slot) {
            Ok(sb) => {
                formatted = true;
                old_id ^= mix64(sb.uuid ^ sb.seq);
            }
            Err(Error::UnsupportedVersion { .. }) => formatted = true,
            Err(_) => {}
        }
    }
    if formatted && !opts.force {
        return Err(Error::AlreadyFormatted);
    }
    let start_seq = scan_ring_max_seq(dev, &l)? + 1;
    let uuid = mix64(l.device_size ^ mix64(u64::from(l.chunk_size) ^ mix64(start_seq ^ old_id)));
    // Invalidate old superblocks first: a crash mid-format must not leave
    // an old superblock pointing at half-overwritten metadata.
    let zero = format::new_page();
    dev.write_at(0, &zero[..])?;
    dev.write_at(BLOCK, &zero[..])?;
    dev.flush()?;
    write_fresh_bitmap(dev, &l)?;
    for (i, t) in super::Tree::ALL.iter().enumerate() {
        let b = l.alloc_start + i as u64;
        let mut p = format::new_page();
        node::init_node(&mut p, b, super::imp::tree_id(*t), 0, t.value_size());
        format::seal(&mut p);
        dev.write_at(b * BLOCK, &p[..])?;
    }
    let st = fresh_state(&l);
    dev.write_at(
        l.state_block * BLOCK,
        &format::encode_state(&st, l.state_block)[..],
    )?;
    dev.flush()?;
    for seq in [1u64, 2] {
        let sb = Superblock {
            seq,
            uuid,
            layout: l,
            tail_pos: 0,
            tail_seq: start_seq,
        };
        dev.write_at(
            (seq % 2) * BLOCK,
            &format::encode_superblock(&sb, seq % 2)[..],
        )?;
    }
    dev.flush()?;
    tracing::info!(
        size = l.device_size,
        chunk = l.chunk_size,
        "formatted snapmv COW device"
    );
    Ok(())
}
