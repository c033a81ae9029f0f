//! `Volume`: one version's data path.
//!
//! A request is cut into chunk pieces. Writes lock all their chunks
//! exclusively (ascending), plan under the tree and metadata locks,
//! allocate every chunk they need up front (so ENOSPC changes nothing),
//! do the data I/O with no global lock held, then map the new chunks.
//! An origin write that had to copy waits for the copy and its mapping to
//! be durable (group commit) before it overwrites the origin in place.

use super::inner::{no_snap, FlushHold, Inner, OriginRt};
use super::records::RollbackState;
use crate::dev::check_range;
use crate::error::{Error, Result};
use crate::meta::{Reserved, ZERO_CHUNK};
use crate::planted::{self, Bug};
use crate::store::api::*;
use crate::sync::{self, Arc, Ordering};
use crate::vtree::{Base, LeafPlan, NodeId, Source, VTree, RB_MARK};

/// Most chunks one write sub-operation touches.
const OP_CHUNKS: u64 = 256;

/// One version of one origin. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct Volume {
    pub(crate) inner: Arc<Inner>,
    pub(crate) o: Arc<OriginRt>,
    pub(crate) tag: Option<u64>,
}

/// The part of a request that falls in one chunk.
#[derive(Clone, Copy, Debug)]
struct Piece {
    chunk: u64,
    in_off: usize,
    len: usize,
    buf_off: usize,
}

fn pieces(offset: u64, len: usize, cs: u64) -> Vec<Piece> {
    let mut out = Vec::with_capacity(len / cs as usize + 2);
    let mut done = 0usize;
    while done < len {
        let pos = offset + done as u64;
        let in_off = (pos % cs) as usize;
        let n = (cs as usize - in_off).min(len - done);
        out.push(Piece {
            chunk: pos / cs,
            in_off,
            len: n,
            buf_off: done,
        });
        done += n;
    }
    out
}

/// Chunks `block_status` resolves per shared-lock hold.
const STATUS_BATCH: u64 = 256;

/// An origin piece's plan.
struct OPlan {
    /// Spine node that must receive a copy of the old origin chunk.
    copy_to: Option<NodeId>,
    /// Rollback not yet done here: the rolled-back snapshot's source.
    rb_src: Option<Source>,
}

impl Volume {
    pub fn id(&self) -> VersionId {
        VersionId {
            origin: self.o.rec.id.clone(),
            tag: self.tag,
        }
    }

    pub fn size(&self) -> u64 {
        self.o.rec.size
    }

    pub fn memo(&self) -> String {
        match self.tag {
            None => "ORIGIN".into(),
            Some(t) => {
                let tree = sync::read(&self.o.tree);
                tree.leaf_of(t)
                    .map(|l| tree.node(l).memo.clone())
                    .unwrap_or_default()
            }
        }
    }

    pub fn is_live(&self) -> bool {
        self.o.bound.load(Ordering::Acquire)
            && match self.tag {
                None => true,
                Some(t) => super::inner::visible(&sync::read(&self.o.tree), t),
            }
    }

    fn cs(&self) -> u64 {
        self.inner.chunk_size()
    }

    fn leaf(&self, tree: &VTree) -> Result<NodeId> {
        let t = self
            .tag
            .ok_or_else(|| Error::Invalid("the origin has no leaf".into()))?;
        tree.leaf_of(t).ok_or_else(|| no_snap(&self.o.rec.id, t))
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.check_ok()?;
        if !self.o.bound.load(Ordering::Acquire) {
            return Err(Error::NoSuchOrigin(self.o.rec.id.clone()));
        }
        // An absent origin's versions fail every request, even one whose
        // chunks all lie on the COW device: serving part of a version
        // would be worse than a clear error.
        self.o.dev()?;
        check_range("volume", offset, len, self.size())
    }

    /// Bytes of chunk `c` that lie inside the origin (the last may be short).
    fn chunk_len(&self, c: u64) -> usize {
        self.o.chunk_len(c, self.cs())
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _stop = self.inner.gc.panic_stop();
        self.check(offset, buf.len() as u64)?;
        let _g = sync::read(&self.o.gate);
        let leaf = match self.tag {
            Some(_) => Some(self.leaf(&sync::read(&self.o.tree))?),
            None => None,
        };
        for p in pieces(offset, buf.len(), self.cs()) {
            let out = &mut buf[p.buf_off..p.buf_off + p.len];
            match leaf {
                Some(l) => self.read_leaf_piece(l, p, out)?,
                None => self.read_origin_piece(p, out)?,
            }
        }
        Ok(())
    }

    fn read_origin_piece(&self, p: Piece, out: &mut [u8]) -> Result<()> {
        let at = p.chunk * self.cs() + p.in_off as u64;
        if !self.o.rb_active.load(Ordering::Acquire) {
            // Staged bytes (taken first: see `Staging::overlay_for`) over
            // what is in place.
            let staged = self
                .inner
                .staging
                .overlay_for((self.o.num, p.chunk), p.in_off, out.len());
            self.o.dev()?.read_at(at, out)?;
            if let Some(s) = staged {
                s.apply(out);
            }
            return Ok(());
        }
        // Mid-rollback: chunks the copier has not reached read through the snapshot.
        let _l = self.inner.locks.shared(self.o.num, p.chunk);
        let src = self.inner.lookup(&self.o, |tree, md| {
            match md.rollback_pending(self.o.num, p.chunk)? {
                None => Ok(Source::Origin),
                Some(rb) => {
                    let leaf = tree
                        .leaf_of(rb.src)
                        .ok_or_else(|| no_snap(&self.o.rec.id, rb.src))?;
                    tree.resolve(leaf, p.chunk, &mut md.cached_view(self.o.num))
                }
            }
        })?;
        self.read_source(src, p.chunk, p.in_off, out)
    }

    fn read_leaf_piece(&self, leaf: NodeId, p: Piece, out: &mut [u8]) -> Result<()> {
        // Shared lock: an origin overwrite or a cleaner move of this chunk
        // cannot happen while we read what the resolution pointed at.
        let _l =
            (!planted::on(Bug::NoChunkLock)).then(|| self.inner.locks.shared(self.o.num, p.chunk));
        let src = self.inner.lookup(&self.o, |tree, md| {
            tree.resolve(leaf, p.chunk, &mut md.cached_view(self.o.num))
        })?;
        self.read_source(src, p.chunk, p.in_off, out)
    }

    fn read_source(&self, src: Source, c: u64, in_off: usize, out: &mut [u8]) -> Result<()> {
        match src {
            Source::Exc(_, ZERO_CHUNK) => {
                out.fill(0);
                Ok(())
            }
            Source::Exc(_, val) => self
                .inner
                .cow
                .read_at(self.inner.geo.chunk_offset(val) + in_off as u64, out),
            Source::Origin => self.o.dev()?.read_at(c * self.cs() + in_off as u64, out),
        }
    }

    /// A whole chunk of `src`, `chunk_size` bytes (zero past the origin's end).
    fn read_full(&self, src: Source, c: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.cs() as usize];
        match src {
            Source::Origin => {
                let n = self.chunk_len(c);
                self.read_source(src, c, 0, &mut buf[..n])?;
            }
            _ => self.read_source(src, c, 0, &mut buf)?,
        }
        Ok(buf)
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let _stop = self.inner.gc.panic_stop();
        self.check(offset, data.len() as u64)?;
        if self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        {
            // The gate is held across every sub-operation, so a snapshot sees
            // the whole write or none of it (contract 2).
            let _g = (!planted::on(Bug::NoGate)).then(|| sync::read(&self.o.gate));
            self.write_gated(offset, data)?;
        }
        match fua {
            true => self.inner.sync_all(),
            false => self.inner.write_completed(),
        }
    }

    /// The write, with the origin's gate held by the caller. Bounded
    /// sub-operations: each maps at most OP_CHUNKS chunks, so its metadata
    /// always fits one journal transaction, and the set of chunk locks held
    /// at once stays small.
    fn write_gated(&self, offset: u64, data: &[u8]) -> Result<()> {
        let step = (OP_CHUNKS * self.cs()) as usize;
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let n = (step - (pos % self.cs()) as usize).min(data.len() - done);
            self.write_op(pos, &data[done..done + n])?;
            self.inner.maybe_commit()?;
            done += n;
        }
        Ok(())
    }

    /// One sub-operation. ENOSPC is final only once chunks freed by
    /// not-yet-durable transactions have been released by a commit.
    fn write_op(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_pieces(&pieces(offset, data.len(), self.cs()), data)
    }

    /// Write pieces in ascending chunk order (one per chunk) as one
    /// all-or-nothing operation with respect to space.
    fn write_pieces(&self, ps: &[Piece], data: &[u8]) -> Result<()> {
        // Back-pressure: with the staging budget used up, a writer first
        // waits for a commit and the destaging it allows (no chunk lock is
        // held here).
        if !self.inner.staging.is_empty() && self.inner.staging.full() {
            self.inner.commit_staged()?;
        }
        match self.write_pieces_once(ps, data) {
            Err(Error::NoSpace) if self.inner.space_pending() => {
                self.inner.sync_all()?;
                self.write_pieces_once(ps, data)
            }
            r => r,
        }
    }

    fn write_pieces_once(&self, ps: &[Piece], data: &[u8]) -> Result<()> {
        assert!(ps.windows(2).all(|w| w[0].chunk < w[1].chunk));
        let (first, last) = (ps[0].chunk, ps[ps.len() - 1].chunk);
        let _locks: Vec<_> = match last - first + 1 == ps.len() as u64 {
            _ if planted::on(Bug::NoWriteLock) => Vec::new(),
            true => self.inner.locks.exclusive_range(self.o.num, first, last),
            false => ps
                .iter()
                .map(|p| self.inner.locks.exclusive(self.o.num, p.chunk))
                .collect(),
        };
        match self.tag {
            None => self.write_origin(ps, data),
            Some(_) => self.write_leaf(ps, data),
        }
    }

    /// Plans for an origin write, with one reservation per copy (in piece
    /// order) and the rollback state if one is pending here.
    #[allow(clippy::type_complexity)]
    fn plan_origin(
        &self,
        ps: &[Piece],
    ) -> Result<(Vec<OPlan>, Vec<Reserved>, Option<RollbackState>)> {
        let tree = sync::read(&self.o.tree);
        // No live snapshot and no rollback: nothing to copy, and no need for
        // the metadata lock (the gate keeps both facts stable meanwhile).
        if !self.o.rb_active.load(Ordering::Acquire) && tree.copy_target().is_none() {
            let none = |_: &Piece| OPlan {
                copy_to: None,
                rb_src: None,
            };
            return Ok((ps.iter().map(none).collect(), Vec::new(), None));
        }
        drop(tree);
        // Pure lookups under the shared locks; the chunk locks keep what
        // they found true until the mapping.
        let (plans, rb_seen) = self.inner.lookup(&self.o, |tree, md| {
            let mut plans = Vec::with_capacity(ps.len());
            let mut rb_seen = None;
            for p in ps {
                let rb_src = match md.rollback_pending(self.o.num, p.chunk)? {
                    Some(rb) => {
                        rb_seen = Some(rb);
                        let leaf = tree
                            .leaf_of(rb.src)
                            .ok_or_else(|| no_snap(&self.o.rec.id, rb.src))?;
                        Some(tree.resolve(leaf, p.chunk, &mut md.cached_view(self.o.num))?)
                    }
                    None => None,
                };
                // The copier's empty piece over a chunk the snapshot shares
                // with the origin changes nothing, so it needs no copy either.
                let changes = p.len > 0 || matches!(rb_src, Some(Source::Exc(..)));
                let target = match changes {
                    true => tree.origin_write_target(p.chunk, &mut md.cached_view(self.o.num))?,
                    false => None,
                };
                plans.push(OPlan {
                    copy_to: target,
                    rb_src,
                });
            }
            Ok((plans, rb_seen))
        })?;
        let need = plans.iter().filter(|p| p.copy_to.is_some()).count();
        let reserved = self.inner.reserve(need)?;
        Ok((plans, reserved, rb_seen))
    }

    /// Origin write of `ps` (all chunk locks held). Also the rollback
    /// copier's path, with empty pieces that only bring a chunk up to date.
    fn write_origin(&self, ps: &[Piece], data: &[u8]) -> Result<()> {
        let (plans, reserved, rb) = self.plan_origin(ps)?;
        // Stage first writes (staging.rs), except where a rollback is
        // pending: its marks must follow their data in place.
        let stage = rb.is_none()
            && !self.o.rb_active.load(Ordering::Acquire)
            && !planted::on(Bug::SkipCowFlush);
        // 1. Preserve the old origin data for the snapshots that share it,
        // in reserved chunks (nothing a commit writes has changed yet).
        let r = self.copy_out(ps, &plans, &reserved);
        let mut gen = 0;
        if !reserved.is_empty() {
            gen = {
                let mut md = sync::write(&self.inner.md);
                if r.is_err() {
                    md.release_all(reserved)?;
                    return r;
                }
                // Each copy's allocation and mapping join one transaction.
                let copies = ps.iter().zip(&plans).filter(|(_, pl)| pl.copy_to.is_some());
                for ((p, pl), res) in copies.zip(reserved) {
                    let node = pl.copy_to.expect("filtered on copy_to");
                    md.map_fresh(self.o.num, p.chunk, node, res)?;
                }
                md.gen
            };
            // 2. Ordering rule: the copy and its mapping are durable before
            // the origin is overwritten. Staged, the in-place write waits
            // for that commit (`Inner::destage`); otherwise it waits here.
            // Group commit shares the flush either way.
            if !stage && !planted::on(Bug::SkipCowFlush) {
                self.inner.sync_gen(gen)?;
            }
        }
        r?;
        self.apply_origin(ps, &plans, data, stage.then_some(gen))?;
        // 4. Rollback marks go in after the data they vouch for, so a commit
        // (which flushes origins first) never makes a mark durable before it.
        if let Some(rb) = rb {
            let mut md = sync::write(&self.inner.md);
            for (p, pl) in ps.iter().zip(&plans) {
                if pl.rb_src.is_some() {
                    assert!(p.chunk >= rb.cursor);
                    md.put_exc(self.o.num, p.chunk, RB_MARK, ZERO_CHUNK)?;
                }
            }
        }
        Ok(())
    }

    /// Copy the old content of each chunk planned for a copy into its
    /// reservation.
    fn copy_out(&self, ps: &[Piece], plans: &[OPlan], reserved: &[Reserved]) -> Result<()> {
        let copies = ps.iter().zip(plans).filter(|(_, pl)| pl.copy_to.is_some());
        for ((p, _), r) in copies.zip(reserved) {
            let old = self.read_full(Source::Origin, p.chunk)?;
            self.inner
                .cow
                .write_at(self.inner.geo.chunk_offset(r.chunk()), &old)?;
        }
        Ok(())
    }

    /// Step 3, the new data: staged where this write made the copy
    /// (`staged_gen` is the generation that makes the copies durable),
    /// merged into a chunk already staged, otherwise in place (the whole
    /// chunk where a rollback is still pending).
    fn apply_origin(
        &self,
        ps: &[Piece],
        plans: &[OPlan],
        data: &[u8],
        staged_gen: Option<u64>,
    ) -> Result<()> {
        let (mut wake, mut in_place) = (false, false);
        for (p, pl) in ps.iter().zip(plans) {
            let piece = &data[p.buf_off..p.buf_off + p.len];
            let key = (self.o.num, p.chunk);
            match (pl.rb_src, staged_gen) {
                (Some(src @ Source::Exc(..)), _) => {
                    let mut full = self.read_full(src, p.chunk)?;
                    full[p.in_off..p.in_off + p.len].copy_from_slice(piece);
                    let n = self.chunk_len(p.chunk);
                    self.o.dev()?.write_at(p.chunk * self.cs(), &full[..n])?;
                    in_place = true;
                }
                (_, Some(gen)) if pl.copy_to.is_some() => {
                    wake |= self.inner.staging.stage(key, p.in_off, piece, gen);
                }
                // (A chunk still staged takes the piece into its entry.)
                _ if p.len > 0 && !self.inner.staging.merge(key, p.in_off, piece) => {
                    let at = p.chunk * self.cs() + p.in_off as u64;
                    self.o.dev()?.write_at(at, piece)?;
                    in_place = true;
                }
                _ => {}
            }
        }
        match (in_place, staged_gen) {
            // A rollback's copies: its marks, next, vouch for them.
            (true, None) if plans.iter().any(|pl| pl.rb_src.is_some()) => {
                self.o.note_ordered_write()
            }
            (true, _) => self.o.note_written(),
            (false, _) => {}
        }
        if wake {
            self.inner.wake();
        }
        Ok(())
    }

    fn write_leaf(&self, ps: &[Piece], data: &[u8]) -> Result<()> {
        let leaf = self.leaf(&sync::read(&self.o.tree))?;
        let plans = self.inner.lookup(&self.o, |tree, md| {
            ps.iter()
                .map(|p| tree.leaf_write_plan(leaf, p.chunk, &mut md.cached_view(self.o.num)))
                .collect::<Result<Vec<_>>>()
        })?;
        let need = plans
            .iter()
            .filter(|p| matches!(p, LeafPlan::Fresh { .. }))
            .count();
        let reserved = self.inner.reserve(need)?;
        let r = self.write_leaf_data(ps, &plans, &reserved, data);
        let mut md = sync::write(&self.inner.md);
        if r.is_err() {
            // Nothing was mapped: the reservations go back, and no commit
            // ever saw them.
            md.release_all(reserved)?;
            return r;
        }
        let fresh = ps
            .iter()
            .zip(&plans)
            .filter(|(_, pl)| matches!(pl, LeafPlan::Fresh { .. }));
        for ((p, _), res) in fresh.zip(reserved) {
            md.map_fresh(self.o.num, p.chunk, leaf, res)?;
        }
        Ok(())
    }

    /// The data I/O of a leaf write, with no global lock held: in place
    /// into chunks the leaf owns, or whole chunks into the reservations
    /// (taken in piece order by the `Fresh` plans).
    fn write_leaf_data(
        &self,
        ps: &[Piece],
        plans: &[LeafPlan],
        reserved: &[Reserved],
        data: &[u8],
    ) -> Result<()> {
        let mut fresh = reserved.iter();
        for (p, pl) in ps.iter().zip(plans) {
            let piece = &data[p.buf_off..p.buf_off + p.len];
            match *pl {
                LeafPlan::InPlace(val) => {
                    let at = self.inner.geo.chunk_offset(val) + p.in_off as u64;
                    self.inner.cow.write_at(at, piece)?;
                }
                LeafPlan::Fresh { base, .. } => {
                    let dst = fresh.next().expect("one reservation per fresh plan");
                    let mut full = if p.len as u64 == self.cs() {
                        vec![0u8; self.cs() as usize]
                    } else {
                        match base {
                            Base::Zero => vec![0u8; self.cs() as usize],
                            Base::From(src) => self.read_full(src, p.chunk)?,
                        }
                    };
                    full[p.in_off..p.in_off + p.len].copy_from_slice(piece);
                    self.inner
                        .cow
                        .write_at(self.inner.geo.chunk_offset(dst.chunk()), &full)?;
                }
            }
        }
        assert!(fresh.next().is_none(), "unused reservation");
        Ok(())
    }

    /// Make every write completed so far durable (on every version).
    pub fn flush(&self) -> Result<()> {
        self.flush_hold().map(drop)
    }

    /// As `flush`, for a server: keep the hold until the FLUSH's reply is
    /// sent, so the reply covers every write replied before it, on every
    /// connection (NBD's rule for `NBD_CMD_FLUSH`).
    pub fn flush_hold(&self) -> Result<FlushHold> {
        let _stop = self.inner.gc.panic_stop();
        Inner::flush_hold(&self.inner)
    }

    /// Whole chunks of a snapshot in `[offset, offset+len)` become zero
    /// exceptions (freeing their data); `only_owned` limits that to chunks
    /// the snapshot owns (trim). Returns the partial head and tail ranges.
    fn zero_whole_chunks(&self, offset: u64, len: u64, only_owned: bool) -> Result<()> {
        let cs = self.cs();
        let first = offset.div_ceil(cs);
        let end = (offset + len) / cs; // exclusive
        if first >= end {
            return Ok(());
        }
        // Bounded batches keep the lock set small for huge ranges.
        let mut c = first;
        while c < end {
            let last = (c + OP_CHUNKS).min(end) - 1;
            let _locks = self.inner.locks.exclusive_range(self.o.num, c, last);
            let leaf = self.leaf(&sync::read(&self.o.tree))?;
            let mut md = sync::write(&self.inner.md);
            for chunk in c..=last {
                // A short last chunk of the origin is still a whole chunk here.
                let prev = md.get_exc(self.o.num, chunk, leaf)?;
                if only_owned && !matches!(prev, Some(v) if v != ZERO_CHUNK) {
                    continue;
                }
                if let Some(v) = md.put_exc(self.o.num, chunk, leaf, ZERO_CHUNK)? {
                    md.free_val(v)?;
                }
            }
            drop(md);
            drop(_locks);
            self.inner.maybe_commit()?;
            c = last + 1;
        }
        Ok(())
    }

    pub fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let _stop = self.inner.gc.panic_stop();
        self.check(offset, len)?;
        if self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        // The origin's data is in place and shared; a trim there is a no-op.
        if self.tag.is_some() {
            let _g = sync::read(&self.o.gate);
            self.zero_whole_chunks(offset, len, true)?;
        }
        self.inner.write_completed()
    }

    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let _stop = self.inner.gc.panic_stop();
        self.check(offset, len)?;
        if self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        {
            let _g = sync::read(&self.o.gate);
            self.write_zeroes_gated(offset, len)?;
        }
        match fua {
            true => self.inner.sync_all(),
            false => self.inner.write_completed(),
        }
    }

    fn write_zeroes_gated(&self, offset: u64, len: u64) -> Result<()> {
        let cs = self.cs();
        let end = offset + len;
        let (first, last) = (offset.div_ceil(cs) * cs, end / cs * cs);
        if self.tag.is_some() && first < last {
            // Partial head and tail first, as one operation: if they need
            // space that is not there, nothing has changed. The whole chunks
            // in between become zero exceptions, which need no data chunk.
            let zeros = vec![0u8; cs as usize];
            let mut ps = Vec::new();
            for (a, b) in [(offset, first), (last, end)] {
                if a < b {
                    ps.push(Piece {
                        chunk: a / cs,
                        in_off: (a % cs) as usize,
                        len: (b - a) as usize,
                        buf_off: 0,
                    });
                }
            }
            if !ps.is_empty() {
                self.write_pieces(&ps, &zeros)?;
            }
            self.zero_whole_chunks(offset, len, false)?;
        } else {
            // The origin (in place), or a range inside one chunk.
            const STEP: u64 = 4 << 20;
            let zeros = vec![0u8; STEP.min(len) as usize];
            let mut pos = offset;
            while pos < end {
                let n = (end - pos).min(STEP);
                self.write_gated(pos, &zeros[..n as usize])?;
                pos += n;
            }
        }
        self.inner.maybe_commit()?;
        Ok(())
    }

    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let classify = |source: Source, _| match source {
            Source::Exc(_, ZERO_CHUNK) => ExtentKind::Zero,
            Source::Exc(..) => ExtentKind::Own,
            Source::Origin => ExtentKind::Shared,
        };
        let runs = self.status_runs(offset, len, ExtentKind::Own, classify)?;
        Ok(runs
            .into_iter()
            .map(|(offset, len, kind)| Extent { offset, len, kind })
            .collect())
    }

    /// qemu's allocation depth of each byte range (`Source` layers, see
    /// `VTree::resolve_layer`): 0 reads as zeros with no data behind it;
    /// 1 is this version's own copy (for the origin: all of it); 2 and
    /// more come from the snapshots this one was taken of, the origin
    /// (in place, or as a copy of what it held) last. Bounded like
    /// `block_status`: the caller asks again from the end.
    pub fn allocation_depth(&self, offset: u64, len: u64) -> Result<Vec<DepthExtent>> {
        let classify = |source: Source, layer: u32| match source {
            Source::Exc(_, ZERO_CHUNK) => 0,
            _ => layer,
        };
        let runs = self.status_runs(offset, len, 1, classify)?;
        Ok(runs
            .into_iter()
            .map(|(offset, len, depth)| DepthExtent { offset, len, depth })
            .collect())
    }

    /// Runs of equal `classify(source, layer)` over `[offset, offset+len)`,
    /// resolved chunk by chunk for a snapshot (`origin` for all of the
    /// origin). Bounded: at most 65536 chunks per call (the caller asks
    /// again), looked up in batches, each under the shared locks for a
    /// moment.
    fn status_runs<K: Copy + PartialEq>(
        &self,
        offset: u64,
        len: u64,
        origin: K,
        classify: impl Fn(Source, u32) -> K,
    ) -> Result<Vec<(u64, u64, K)>> {
        let _stop = self.inner.gc.panic_stop();
        self.check(offset, len)?;
        let end = offset + len;
        if len == 0 {
            return Ok(Vec::new());
        }
        let Some(tag) = self.tag else {
            return Ok(vec![(offset, len, origin)]);
        };
        let cs = self.cs();
        let mut out: Vec<(u64, u64, K)> = Vec::new();
        let mut pos = offset;
        let last = (end - 1) / cs;
        let stop = last.min(offset / cs + 65535);
        let mut first = offset / cs;
        while first <= stop {
            let batch_end = stop.min(first + STATUS_BATCH - 1);
            let kinds = self.inner.lookup(&self.o, |tree, md| {
                let leaf = tree
                    .leaf_of(tag)
                    .ok_or_else(|| no_snap(&self.o.rec.id, tag))?;
                let mut view = md.cached_view(self.o.num);
                (first..=batch_end)
                    .map(|c| {
                        let (source, layer) = tree.resolve_layer(leaf, c, &mut view)?;
                        Ok(classify(source, layer))
                    })
                    .collect::<Result<Vec<_>>>()
            })?;
            for kind in kinds {
                let next = ((pos / cs + 1) * cs).min(end);
                match out.last_mut() {
                    Some(run) if run.2 == kind => run.1 += next - pos,
                    _ => out.push((pos, next - pos, kind)),
                }
                pos = next;
            }
            first = batch_end + 1;
        }
        Ok(out)
    }
}

impl Volume {
    /// Bring chunks of the origin up to the rolled-back snapshot's content
    /// (the rollback copier's work). Caller holds their exclusive locks and
    /// the gate. One group commit covers every copy the batch needs.
    pub(crate) fn copy_rollback_chunks(&self, chunks: &[u64]) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let ps: Vec<Piece> = chunks
            .iter()
            .map(|&chunk| Piece {
                chunk,
                in_off: 0,
                len: 0,
                buf_off: 0,
            })
            .collect();
        self.write_origin(&ps, &[])
    }
}
