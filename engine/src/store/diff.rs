//! Changed-block tracking: the byte ranges where two versions of one
//! origin may differ, from the version tree and the exception index alone
//! (no data chunk is read). The algebra (which node ids matter, how a
//! candidate chunk is decided) is `vtree::diff`; this file walks the
//! B+tree with it.
//!
//! The walk goes forward over the origin's exceptions from the first chunk
//! of the range, skipping with `Meta::walk_cached` from one key range of
//! `DiffKeys` to the next and from chunk to chunk, so it never visits a
//! chunk without exceptions and passes over the exceptions of nodes that
//! cannot matter; each candidate chunk is decided as the walk meets it.
//! Each batch of at most `BATCH_STEPS` entries runs under the tree and
//! metadata locks held shared (`Inner::lookup`): writes, reads and block
//! status go on beside it, and a page the cache does not hold ends the
//! batch (or, before anything is decided, is read with no lock held and
//! the batch run again). The keys are derived again for every batch, so a
//! snapshot, delete or cleaner move in between is seen consistently; each
//! chunk is decided within one lock hold.
//!
//! What it sees: every mapping in memory, committed or not. A staged first
//! write to an origin chunk (staging.rs) has already mapped its copy, so
//! the snapshots that shared the chunk read the copy and the origin differs
//! from them there; a write in progress that has not mapped anything yet
//! has not changed any version. A chunk whose difference appears after the
//! walk passed it was written after the call began.

use super::diff_by_node::GATHER_STEPS;
use super::inner::{no_snap, visible, Inner, MetaState, OriginRt};
use super::io::Volume;
use super::records::{exc_key, split_key};
use crate::dev::check_range;
use crate::error::{Error, Result};
use crate::meta::{Tree, Walk};
use crate::store::api::{Diff, DiffExtent, DiffStrategy};
use crate::vtree::diff::{next_step, same_content, Side};
use crate::vtree::{NodeId, VTree, MAX_NODE};

/// Index entries one batch visits under the shared locks (at least the
/// whole first chunk of the batch, so every batch makes progress).
const BATCH_STEPS: usize = 4096;

/// Which versions, and where.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DiffQuery {
    pub from: Option<u64>,
    pub to: Option<u64>,
    pub offset: u64,
    pub len: u64,
    pub max_extents: usize,
}

/// One batch's result: the chunks that differ, and the chunk to go on from
/// (None: the range is done).
type Batch = (Vec<u64>, Option<u64>);

/// Below this many chunks in the range the chunk walk is taken without
/// weighing: it visits at most the range's chunks, and weighing costs a
/// pass over the store's node counters.
const BY_NODE_MIN_CHUNKS: u64 = 1 << 16;
/// What a seek costs, in index steps, when weighing a gather over `ByNode`
/// (one per node that counts) against the chunk walk.
const SEEK_STEPS: u64 = 8;

impl Inner {
    /// Diff two versions of origin `o` (see `Volume::diff_from`), the
    /// cheaper way (see `DiffStrategy`) unless the store was told one.
    pub(crate) fn diff(&self, o: &OriginRt, q: &DiffQuery) -> Result<Diff> {
        self.check_ok()?;
        check_range("diff", q.offset, q.len, o.rec.size)?;
        if q.max_extents == 0 {
            return Err(Error::Invalid("a diff needs room for one extent".into()));
        }
        match self.diff_strategy_for(o, q)? {
            DiffStrategy::ByNode => self.diff_by_node(o, q, GATHER_STEPS, &mut || ()),
            _ => self.diff_in_batches(o, q, BATCH_STEPS),
        }
    }

    /// The strategy this diff takes: the one set (`Store::set_diff_strategy`),
    /// where the device has what it needs, else the cheaper by estimate.
    /// The chunk walk costs up to the range's chunks; the gather, the
    /// exceptions of the nodes that count (their own-chunk counters, over
    /// the whole origin: an overestimate for part of it) and a seek each.
    fn diff_strategy_for(&self, o: &OriginRt, q: &DiffQuery) -> Result<DiffStrategy> {
        let has_by_node = self.lookup_meta(|md| Ok(md.meta.has_tree(Tree::ByNode)))?;
        let chunks = q.len.div_ceil(self.chunk_size());
        match self.diff_strategy() {
            _ if !has_by_node || q.len == 0 => return Ok(DiffStrategy::ByChunk),
            DiffStrategy::Auto if chunks < BY_NODE_MIN_CHUNKS => return Ok(DiffStrategy::ByChunk),
            DiffStrategy::Auto => {}
            forced => return Ok(forced),
        }
        let gather_steps = self.lookup(o, |tree, md| {
            let sides = Sides::new(tree, md, o, q)?;
            let keys = tree.diff_keys(sides.from, sides.to, sides.rb_src)?;
            let mut steps = 0u64;
            for (_, own) in md.own.iter().filter(|(n, _)| keys.contains(**n)) {
                steps = steps.saturating_add(own + SEEK_STEPS);
                if steps >= chunks {
                    break; // the walk is no dearer: no need to count on
                }
            }
            Ok(steps)
        })?;
        Ok(if gather_steps < chunks {
            DiffStrategy::ByNode
        } else {
            DiffStrategy::ByChunk
        })
    }

    /// `diff` through `ByNode` (`diff_by_node.rs`): gather the candidates,
    /// then decide them in batches; the chunk walk if the gather kept
    /// being disturbed. `between` runs between gather batches (tests).
    pub(super) fn diff_by_node(
        &self,
        o: &OriginRt,
        q: &DiffQuery,
        steps: usize,
        between: &mut dyn FnMut(),
    ) -> Result<Diff> {
        let mut out = Extents::new(q.offset, q.offset + q.len, self.chunk_size());
        if q.len == 0 {
            return Ok(out.finish());
        }
        let (start, last) = (
            q.offset / self.chunk_size(),
            (q.offset + q.len - 1) / self.chunk_size(),
        );
        let Some((cands, bound)) = self.gather_by_node(o, q, (start, last), steps, between)? else {
            return self.diff_in_batches(o, q, BATCH_STEPS);
        };
        let mut at = 0;
        while at < cands.len() {
            let (differ, done) = self.decide(o, q, &cands[at..])?;
            at += done;
            for c in differ {
                if !out.push(c, q.max_extents) {
                    return Ok(out.finish());
                }
            }
        }
        if bound < last {
            out.stop_at((bound + 1) * self.chunk_size());
        }
        Ok(out.finish())
    }

    /// `diff` by the chunk walk, with batches of `steps` index entries
    /// (tests use tiny ones).
    fn diff_in_batches(&self, o: &OriginRt, q: &DiffQuery, steps: usize) -> Result<Diff> {
        let mut out = Extents::new(q.offset, q.offset + q.len, self.chunk_size());
        if q.len == 0 {
            return Ok(out.finish());
        }
        let last = (q.offset + q.len - 1) / self.chunk_size();
        let mut at = Some(q.offset / self.chunk_size());
        while let Some(start) = at {
            let batch =
                |tree: &VTree, md: &MetaState| diff_batch(tree, md, o, q, (start, last), steps);
            let (changed, next) = self.lookup(o, batch)?;
            for c in changed {
                if !out.push(c, q.max_extents) {
                    return Ok(out.finish());
                }
            }
            at = next;
        }
        Ok(out.finish())
    }
}

/// The side a tag names: the origin, or a snapshot the user can see.
fn side(tree: &VTree, o: &OriginRt, tag: Option<u64>) -> Result<Side> {
    match tag {
        None => Ok(Side::Origin),
        Some(t) if visible(tree, t) => tree
            .leaf_of(t)
            .map(Side::Leaf)
            .ok_or_else(|| no_snap(&o.rec.id, t)),
        Some(t) => Err(no_snap(&o.rec.id, t)),
    }
}

/// The leaf origin chunks not yet copied by a rollback read through, if a
/// rollback onto `o` is in progress.
fn rollback_source(tree: &VTree, md: &MetaState, o: &OriginRt) -> Result<Option<NodeId>> {
    match md.app.rollback {
        Some(rb) if rb.origin == o.num => tree
            .leaf_of(rb.src)
            .map(Some)
            .ok_or_else(|| no_snap(&o.rec.id, rb.src)),
        _ => Ok(None),
    }
}

/// The two sides of a diff as the tree stands now, and the rollback
/// source the origin's pending chunks read through.
pub(super) struct Sides {
    pub from: Side,
    pub to: Side,
    pub rb_src: Option<NodeId>,
}

impl Sides {
    pub(super) fn new(tree: &VTree, md: &MetaState, o: &OriginRt, q: &DiffQuery) -> Result<Sides> {
        Ok(Sides {
            from: side(tree, o, q.from)?,
            to: side(tree, o, q.to)?,
            rb_src: rollback_source(tree, md, o)?,
        })
    }

    /// Whether chunk `c` may differ, resolved exactly on both sides.
    pub(super) fn differ(&self, tree: &VTree, md: &MetaState, o: u32, c: u64) -> Result<bool> {
        // Only the origin reads through the rollback's source, and only
        // where the copier has not been yet.
        let origin_side = self.from == Side::Origin || self.to == Side::Origin;
        let pending = match self.rb_src {
            Some(src) if origin_side => md.rollback_pending(o, c)?.map(|_| src),
            _ => None,
        };
        let mut view = md.cached_view(o);
        let a = tree.diff_source(self.from, c, &mut view, pending)?;
        let b = tree.diff_source(self.to, c, &mut view, pending)?;
        Ok(!same_content(a, b))
    }
}

/// One batch from chunk `start`, under the shared locks: a walk over the
/// exceptions that skips by `vtree::diff::next_step` and decides each
/// candidate chunk as it meets it. It ends after `budget` entries (between
/// chunks, never in the first one: progress), or at a page the cache does
/// not hold once a chunk is decided: the next batch starts there, and the
/// lookup fetches the page for it. Only a miss before anything is decided
/// fails the batch (the lookup then fetches the page and runs it again),
/// so a cold walk reads each page once and never redoes decided work.
fn diff_batch(
    tree: &VTree,
    md: &MetaState,
    o: &OriginRt,
    q: &DiffQuery,
    (start, last): (u64, u64),
    budget: usize,
) -> Result<Batch> {
    let sides = Sides::new(tree, md, o, q)?;
    let keys = tree.diff_keys(sides.from, sides.to, sides.rb_src)?;
    let Some(first) = keys.first() else {
        return Ok((Vec::new(), None)); // one version on both sides
    };
    let (mut changed, mut steps) = (Vec::new(), 0usize);
    // Every chunk below `decided` is decided; `resume` is set by the budget.
    let (mut decided, mut resume) = (start, None);
    let (lo, hi) = (exc_key(o.num, start, first), exc_key(o.num, last, MAX_NODE));
    let walked = md
        .meta
        .walk_cached(Tree::Exceptions, lo, hi, &mut |key, _| {
            let (_, c, n) = split_key(key);
            steps += 1;
            if steps > budget && c > start {
                resume = Some(c);
                return Ok(Walk::Stop);
            }
            decided = c; // the walk only moves forward, and skips no key that counts
            let (candidate, next) = next_step(&keys, c, n, last);
            if candidate {
                if sides.differ(tree, md, o.num, c)? {
                    changed.push(c);
                }
                decided = c + 1;
            }
            Ok(next.map_or(Walk::Stop, |(c, n)| Walk::Seek(exc_key(o.num, c, n))))
        });
    assert!(changed.windows(2).all(|w| w[0] < w[1]), "chunks ascend");
    match walked {
        Ok(()) => Ok((changed, resume)),
        Err(Error::NotCached(_)) if decided > start => {
            Ok((changed, (decided <= last).then_some(decided)))
        }
        Err(e) => Err(e),
    }
}

/// Differing chunks gathered into byte extents within `[offset, end)`.
struct Extents {
    offset: u64,
    end: u64,
    chunk_size: u64,
    extents: Vec<DiffExtent>,
    /// Where the description stops (`Diff::end`), once `push` refused.
    cut: Option<u64>,
}

impl Extents {
    fn new(offset: u64, end: u64, chunk_size: u64) -> Extents {
        Extents {
            offset,
            end,
            chunk_size,
            extents: Vec::new(),
            cut: None,
        }
    }

    /// Add chunk `c` (ascending). False when it would start extent
    /// `max + 1`: the description then stops where that extent begins.
    fn push(&mut self, c: u64, max: usize) -> bool {
        let start = c.saturating_mul(self.chunk_size);
        let (lo, hi) = (
            start.max(self.offset),
            start.saturating_add(self.chunk_size).min(self.end),
        );
        assert!(lo < hi, "a differing chunk outside the range: {c}");
        match self.extents.last_mut() {
            Some(e) if e.offset + e.len == lo => e.len += hi - lo,
            Some(e) => {
                assert!(e.offset + e.len < lo, "chunks ascend");
                if self.extents.len() >= max {
                    self.cut = Some(lo);
                    return false;
                }
                self.extents.push(DiffExtent {
                    offset: lo,
                    len: hi - lo,
                });
            }
            None => self.extents.push(DiffExtent {
                offset: lo,
                len: hi - lo,
            }),
        }
        true
    }

    /// The description ends at byte `at` (inside the range, after every
    /// extent): what lies beyond was not decided.
    fn stop_at(&mut self, at: u64) {
        assert!(at < self.end && self.extents.last().is_none_or(|e| e.offset + e.len <= at));
        self.cut = Some(self.cut.map_or(at, |c| c.min(at)));
    }

    fn finish(self) -> Diff {
        Diff {
            extents: self.extents,
            end: self.cut.unwrap_or(self.end),
        }
    }
}

impl Volume {
    /// The byte ranges of `[offset, offset + len)` where this version and
    /// version `other` (`None`: the origin) of the same origin may differ,
    /// from metadata alone: no data is read, and the origin's device need
    /// not be present. Exact at chunk granularity: a chunk whose content
    /// differs is always reported; one reported may hold equal bytes only
    /// where the two versions read different copies (a write of the same
    /// data, zeros against zero data, the origin after a rollback). At
    /// most `max_extents` extents (at least 1): `Diff::end` says how far
    /// they describe, and a caller (NBD block status) asks again from
    /// there. Cost: the chunks holding exceptions in the range, in batches
    /// under the shared metadata lock, so serving goes on beside it.
    pub fn diff_from(
        &self,
        other: Option<u64>,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Diff> {
        let _stop = self.inner.gc.panic_stop();
        if !self.o.bound.load(crate::sync::Ordering::Acquire) {
            return Err(Error::NoSuchOrigin(self.o.rec.id.clone()));
        }
        let q = DiffQuery {
            from: other,
            to: self.tag,
            offset,
            len,
            max_extents,
        };
        self.inner.diff(&self.o, &q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::MemDev;
    use crate::store::{Dev, FormatOptions, Store};
    use std::sync::Arc;

    /// Batches cut anywhere (one index entry each, a few) give the same
    /// extents as one long batch, over a tree of many leaves, with another
    /// origin's exceptions beside it; so does a cold cache of a few pages,
    /// whose misses end batches (nothing is read under the write lock).
    #[test]
    fn batches_of_any_size_agree() {
        const CS: u64 = 4096;
        const CHUNKS: u64 = 3000;
        let fo = FormatOptions {
            chunk_size: CS as u32,
            force: false,
        };
        let store = Store::format(Arc::new(MemDev::new(64 << 20)) as Dev, &fo).unwrap();
        let mut tags = Vec::new();
        for id in ["a", "b"] {
            let dev = Arc::new(MemDev::new(CHUNKS * CS)) as Dev;
            store.bind(id, id, dev, 0).unwrap();
        }
        for round in 0..4u64 {
            for id in ["a", "b"] {
                tags.push((id, store.snapshot(id, None, "", 0).unwrap()));
                let o = store.volume(id, None).unwrap();
                // Every 7th chunk from an offset: runs of changed chunks.
                for c in (round..CHUNKS).step_by(7) {
                    o.write(c * CS, &[round as u8 + 1; 512], false).unwrap();
                }
                let (_, t) = *tags.last().unwrap();
                let s = store.volume(id, Some(t)).unwrap();
                s.write_zeroes(round * 100 * CS, 300 * CS, false).unwrap();
            }
        }
        let a = store.inner.origin_by_id("a").unwrap();
        let a_tags: Vec<u64> = tags.iter().filter(|t| t.0 == "a").map(|t| t.1).collect();
        let pairs = [
            (Some(a_tags[0]), Some(a_tags[1])),
            (Some(a_tags[1]), None),
            (Some(a_tags[0]), Some(a_tags[3])),
        ];
        let mut wholes = Vec::new();
        for (from, to) in pairs {
            let q = DiffQuery {
                from,
                to,
                offset: 100,
                len: CHUNKS * CS - 200,
                max_extents: usize::MAX,
            };
            let whole = store.inner.diff_in_batches(&a, &q, usize::MAX).unwrap();
            assert!(
                whole.extents.len() > 100,
                "{from:?} {to:?}: {}",
                whole.extents.len()
            );
            for steps in [1, 2, 3, 17] {
                let cut = store.inner.diff_in_batches(&a, &q, steps).unwrap();
                assert_eq!(cut, whole, "{from:?} {to:?} in batches of {steps}");
                let by_node = store.inner.diff_by_node(&a, &q, steps, &mut || ()).unwrap();
                assert_eq!(
                    by_node, whole,
                    "{from:?} {to:?} by node, batches of {steps}"
                );
            }
            // No chunk whose bytes differ is missed.
            let read = |tag| {
                let mut buf = vec![0u8; (CHUNKS * CS) as usize];
                store.volume("a", tag).unwrap().read(0, &mut buf).unwrap();
                buf
            };
            let (x, y) = (read(from), read(to));
            let reported = |c: u64| {
                let (lo, hi) = ((c * CS).max(q.offset), ((c + 1) * CS).min(q.offset + q.len));
                whole
                    .extents
                    .iter()
                    .any(|e| e.offset <= lo && hi <= e.offset + e.len)
            };
            for c in 0..CHUNKS {
                let r = (c * CS) as usize..((c + 1) * CS) as usize;
                assert!(
                    x[r.clone()] == y[r] || reported(c),
                    "{from:?} {to:?}: chunk {c} missed"
                );
            }
            wholes.push((q, whole));
        }
        // Cold: closed (every page home), opened again with a cache of a
        // few pages; its misses end batches, none is read under the lock.
        let devs: Vec<Dev> = ["a", "b"]
            .iter()
            .map(|id| store.inner.origin_by_id(id).unwrap().dev().unwrap().clone())
            .collect();
        let cow = store.inner.cow.clone();
        store.close().unwrap();
        let cold =
            Store::open_read_only(cow, &mut |id, _| Ok(devs[usize::from(id == "b")].clone()))
                .unwrap();
        cold.set_cache_budget(0);
        let a = cold.inner.origin_by_id("a").unwrap();
        for (q, whole) in wholes {
            for way in [DiffStrategy::ByChunk, DiffStrategy::ByNode] {
                cold.set_diff_strategy(way);
                let before = cold.cache_stats();
                assert_eq!(cold.inner.diff(&a, &q).unwrap(), whole, "cold, {way:?}");
                let after = cold.cache_stats();
                assert!(after.misses > before.misses + 10, "{way:?}: {after:?}");
                assert_eq!(
                    after.locked_misses, before.locked_misses,
                    "{way:?}: {after:?}"
                );
            }
        }
    }
}
