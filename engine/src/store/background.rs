//! Background work, advanced only by explicit calls (the engine starts no
//! threads): the rollback copier and the cleaner. Each unit of work is one
//! chunk, done under that chunk's lock, and its progress (cursor) is in the
//! app state, so any step may be the last before a crash.

use super::inner::{Inner, OriginRt};
use super::io::Volume;
use super::records::{exc_key, split_key};
use crate::error::{Error, Result};
use crate::meta::Tree;
use crate::planted::{self, Bug};
use crate::store::api::StepReport;
use crate::sync::{self, Arc, Ordering};
use crate::vtree::{CleanAction, NodeId, MAX_NODE, RB_MARK};

/// Chunks the cleaner handles under one lock set and one commit.
const CLEAN_BATCH: usize = 64;

/// Chunks the rollback copier brings up to date under one lock set.
const RB_BATCH: u64 = 64;

impl Inner {
    /// `me` is the `Arc` holding `self` (an `&Arc<Self>` receiver does not
    /// compile with loom's `Arc`).
    pub fn step_background(&self, me: &Arc<Self>, budget: usize) -> Result<StepReport> {
        if self.read_only {
            return Ok(StepReport::default());
        }
        self.check_ok()?;
        let mut work = self.rollback_steps(me, budget)?;
        if work < budget {
            work += self.clean_steps(budget - work)?;
        }
        self.maybe_commit()?;
        let more = {
            let md = sync::read(&self.md);
            md.app.rollback.is_some() || md.app.clean_pass.is_some()
        } || self.any_flagged();
        Ok(StepReport { work, more })
    }

    /// Whether a node of any origin waits for the cleaner. O(origins).
    pub(super) fn any_flagged(&self) -> bool {
        sync::read(&self.origins)
            .values()
            .any(|o| sync::read(&o.tree).has_flagged())
    }

    fn rollback_steps(&self, me: &Arc<Self>, budget: usize) -> Result<usize> {
        let Some(rb) = sync::read(&self.md).app.rollback else {
            return Ok(0);
        };
        let o = self
            .origin_by_num(rb.origin)
            .ok_or_else(|| Error::Corrupt {
                block: 0,
                kind: "app state",
                reason: format!("rollback onto unbound origin number {}", rb.origin),
            })?;
        let vol = Volume {
            inner: me.clone(),
            o: o.clone(),
            tag: None,
        };
        let mut done = 0;
        while done < budget {
            let Some(rb) = sync::read(&self.md).app.rollback else {
                break;
            };
            if rb.cursor >= rb.total {
                self.finish_rollback(&o)?;
                break;
            }
            let _g = sync::read(&o.gate);
            // A batch of chunks under one set of locks: their copies share
            // one group commit instead of one commit per chunk.
            let first = rb.cursor;
            let last = (first + RB_BATCH.min((budget - done) as u64)).min(rb.total) - 1;
            let _locks = (!planted::on(Bug::NoRbLock))
                .then(|| self.locks.exclusive_range(o.num, first, last));
            let pending = self.lookup(&o, |_, md| {
                let mut v = Vec::new();
                for c in first..=last {
                    if md.rollback_pending(o.num, c)?.is_some() {
                        v.push(c);
                    }
                }
                Ok(v)
            })?;
            vol.copy_rollback_chunks(&pending)?;
            let mut md = sync::write(&self.md);
            for c in first..=last {
                md.del_exc(o.num, c, RB_MARK)?;
            }
            if let Some(r) = md.app.rollback.as_mut() {
                r.cursor = last + 1;
            }
            md.save_app()?;
            done += (last + 1 - first) as usize;
        }
        Ok(done)
    }

    /// The copy is done: drop the frozen source; the cleaner reclaims what
    /// only it held. That can kill spine nodes, which changes where origin
    /// writes copy to, so it takes the origin's gate exclusively, as delete
    /// does: no write is between planning a copy into a node and mapping
    /// it. (Under the shared gate, a write could map its copy into a node
    /// this had just killed, after the cleaner's pass had passed that
    /// chunk; the pass then removed the node and left the exception
    /// dangling and its chunk leaked. Found by the concurrent crash
    /// simulator.)
    fn finish_rollback(&self, o: &OriginRt) -> Result<()> {
        let _g = sync::write(&o.gate);
        let mut tree = sync::write(&o.tree);
        let mut md = sync::write(&self.md);
        let Some(rb) = md.app.rollback else {
            return Ok(());
        };
        assert!(rb.cursor >= rb.total, "rollback finished early");
        let ch = tree.delete(rb.src, md.app.clean_gen)?;
        md.apply_changes(o.num, &tree, &ch)?;
        md.app.rollback = None;
        md.save_app()?;
        o.rb_active.store(false, Ordering::Release);
        Ok(())
    }

    fn clean_steps(&self, budget: usize) -> Result<usize> {
        let mut done = 0;
        // Bounded: every iteration either does one unit of work or skips a
        // whole origin (at most once per origin per call).
        for _ in 0..budget.saturating_mul(2) + 64 {
            if done >= budget {
                break;
            }
            let pass = sync::read(&self.md).app.clean_pass;
            let Some((pass_gen, cursor)) = pass else {
                if !self.any_flagged() {
                    break;
                }
                let mut md = sync::write(&self.md);
                md.app.clean_gen += 1;
                md.app.clean_pass = Some((md.app.clean_gen, 0));
                md.save_app()?;
                done += 1;
                continue;
            };
            let next =
                self.lookup_meta(|md| md.meta.seek_cached(Tree::Exceptions, cursor, u128::MAX))?;
            let Some((key, _)) = next else {
                self.finish_pass(pass_gen)?;
                done += 1;
                continue;
            };
            let (onum, chunk, _) = split_key(key);
            let o = self.origin_by_num(onum);
            let wanted = o
                .as_ref()
                .is_some_and(|o| sync::read(&o.tree).has_flagged_before(pass_gen));
            match (wanted, o) {
                (true, Some(o)) => done += self.clean_batch(&o, chunk, pass_gen, budget - done)?,
                // Nothing to clean in this origin: skip all of it.
                _ => {
                    let next = match onum.checked_add(1) {
                        Some(n) => exc_key(n, 0, 0),
                        None => u128::MAX,
                    };
                    let mut md = sync::write(&self.md);
                    md.app.clean_pass = Some((pass_gen, next));
                    md.save_app()?;
                }
            }
        }
        Ok(done)
    }

    /// Clean a run of chunks of one origin, from `first`, holding each
    /// chunk's lock until the batch is durable. A moved exception becomes
    /// its heir's own chunk, which the heir then writes in place; were the
    /// move not durable first, a crash could undo it under that in-place
    /// data, and the node it came from would read another version's write.
    fn clean_batch(&self, o: &OriginRt, first: u64, pass_gen: u64, max: usize) -> Result<usize> {
        let _g = sync::read(&o.gate);
        let mut locks: Vec<super::locks::ExclusiveGuard<'_>> = Vec::new();
        let (mut c, mut n) = (first, 0usize);
        loop {
            if !planted::on(Bug::NoCleanLock) {
                locks.push(self.locks.exclusive(o.num, c));
            }
            self.clean_chunk(o, c, pass_gen)?;
            n += 1;
            {
                let mut md = sync::write(&self.md);
                md.app.clean_pass = Some((pass_gen, exc_key(o.num, c + 1, 0)));
                md.save_app()?;
            }
            let lo = exc_key(o.num, c + 1, 0);
            let hi = exc_key(o.num, (1 << 48) - 1, MAX_NODE);
            match self.lookup_meta(|md| md.meta.seek_cached(Tree::Exceptions, lo, hi))? {
                Some((k, _)) if n < max.min(CLEAN_BATCH) => c = split_key(k).1,
                _ => break,
            }
        }
        let gen = sync::read(&self.md).gen;
        self.sync_gen(gen)?;
        drop(locks);
        Ok(n)
    }

    /// Apply the cleaner's decisions at one chunk (its lock is held).
    fn clean_chunk(&self, o: &OriginRt, c: u64, pass_gen: u64) -> Result<()> {
        // The chunk's exceptions, looked up under the shared locks; the
        // chunk's lock (held) keeps them as they are until the changes.
        let lo = exc_key(o.num, c, 0);
        let hi = exc_key(o.num, c, MAX_NODE);
        let exc = self.lookup_meta(|md| {
            let mut exc: Vec<(NodeId, u64)> = Vec::new();
            for (k, v) in md.meta.range_cached(Tree::Exceptions, lo, hi, usize::MAX)? {
                let node = split_key(k).2;
                if node != RB_MARK {
                    exc.push((node, md.checked(k, super::inner::val_u64(&v)?)?));
                }
            }
            Ok(exc)
        })?;
        let tree = sync::read(&o.tree);
        let mut md = sync::write(&self.md);
        for a in tree.clean_chunk(&exc, pass_gen) {
            match a {
                // The unmapping and the free join one transaction: the md
                // lock is held across both, and commits capture under it.
                CleanAction::Free { node, val } => {
                    if planted::on(Bug::CleanFreeEarly) {
                        // Planted bug: the free may be committed before the
                        // unmapping (another thread's commit runs between).
                        md.free_val(val)?;
                        drop(md);
                        md = sync::write(&self.md);
                        md.del_exc(o.num, c, node)?;
                    } else {
                        md.del_exc(o.num, c, node)?;
                        md.free_val(val)?;
                    }
                }
                CleanAction::Move { from, to, val } => {
                    md.del_exc(o.num, c, from)?;
                    if md.put_exc(o.num, c, to, val)?.is_some() {
                        return Err(Error::Corrupt {
                            block: 0,
                            kind: "exception index",
                            reason: format!(
                                "cleaner moved chunk {c} onto an existing exception of {to:#x}"
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// End pass `pass_gen`: remove the nodes it emptied. The gate is taken
    /// exclusively (no write between planning a copy into a node and
    /// mapping it), but only on origins with nodes flagged before the pass,
    /// and for work that grows with those nodes, not with the tree. None
    /// can appear meanwhile: a delete during the pass flags with the pass's
    /// own generation.
    fn finish_pass(&self, pass_gen: u64) -> Result<()> {
        let origins: Vec<Arc<OriginRt>> = sync::read(&self.origins).values().cloned().collect();
        for o in origins {
            if !sync::read(&o.tree).has_flagged_before(pass_gen) {
                continue;
            }
            let _g = sync::write(&o.gate);
            let mut tree = sync::write(&o.tree);
            let ch = tree.finish_pass(pass_gen);
            sync::write(&self.md).apply_changes(o.num, &tree, &ch)?;
        }
        let mut md = sync::write(&self.md);
        md.app.clean_pass = None;
        md.save_app()
    }
}
