//! Space accounting per snapshot (what `list` shows, after `dms list` and
//! ZFS's `used`): *own* chunks, which deleting the snapshot would free, and
//! *shared* chunks, which it reads from the COW device together with at
//! least one other version.
//!
//! The counting at one chunk (every live leaf resolved, the readers of
//! each exception counted) is `vtree::usage`; this file feeds it the
//! origin's exceptions from the B+tree.
//!
//! Cost: one pass over the origin's exceptions, in batches under the tree
//! and metadata locks held shared (`Inner::lookup`: serving goes on beside
//! it, and pages it misses are read with no lock held).

use super::inner::{val_u64, Inner, MetaState, OriginRt};
use super::records::{exc_key, split_key};
use crate::error::Result;
use crate::meta::Tree;
use crate::vtree::usage::{account_chunk, LeafUsage};
use crate::vtree::{NodeId, MAX_NODE};
use std::collections::HashMap;

/// Exceptions read per batch (under the locks).
const BATCH: usize = 4096;

impl Inner {
    /// Own and shared chunks of every leaf of origin `o`.
    pub fn leaf_usage(&self, o: &OriginRt) -> Result<HashMap<NodeId, LeafUsage>> {
        let mut out = HashMap::new();
        let hi = exc_key(o.num, (1 << 48) - 1, MAX_NODE);
        let mut lo = exc_key(o.num, 0, 0);
        loop {
            // One batch, read and counted under the shared locks (a retry
            // after a page fetch counts it again from scratch).
            let (counts, next) = self.lookup(o, |tree, md| {
                let (groups, next) = batch_at(md, o.num, lo, hi)?;
                let mut counts = HashMap::new();
                for (c, exc) in &groups {
                    account_chunk(tree, *c, exc, &mut counts)?;
                }
                Ok((counts, next))
            })?;
            for (leaf, u) in counts {
                let total: &mut LeafUsage = out.entry(leaf).or_default();
                total.own += u.own;
                total.shared += u.shared;
            }
            match next {
                Some(n) => lo = n,
                None => return Ok(out),
            }
        }
    }
}

/// The exceptions of origin `o` from `lo`, grouped by chunk, a batch of
/// whole chunks; and where the next batch starts (None: this was the last).
fn batch_at(md: &MetaState, o: u32, lo: u128, hi: u128) -> Result<(Vec<ChunkGroup>, Option<u128>)> {
    let batch = md.meta.range_cached(Tree::Exceptions, lo, hi, BATCH)?;
    if batch.len() < BATCH {
        return Ok((group_by_chunk(&batch)?, None));
    }
    let mut groups = group_by_chunk(&batch)?;
    if groups.len() > 1 {
        // The last chunk may go on past the batch: redo it next time.
        let (c, _) = groups.pop().expect("more than one group");
        return Ok((groups, Some(exc_key(o, c, 0))));
    }
    // One chunk with more exceptions than a batch: take it whole.
    let c = groups[0].0;
    let all = md.meta.range_cached(
        Tree::Exceptions,
        exc_key(o, c, 0),
        exc_key(o, c, MAX_NODE),
        usize::MAX,
    )?;
    Ok((group_by_chunk(&all)?, Some(exc_key(o, c + 1, 0))))
}

/// One chunk's exceptions: the chunk, and (node, value) ascending by node.
type ChunkGroup = (u64, Vec<(NodeId, u64)>);

/// Split exceptions (ascending keys of one origin) into per-chunk groups,
/// skipping rollback marks.
fn group_by_chunk(batch: &[(u128, Vec<u8>)]) -> Result<Vec<ChunkGroup>> {
    let mut out: Vec<ChunkGroup> = Vec::new();
    for (k, v) in batch {
        let (_, c, n) = split_key(*k);
        if n == crate::vtree::RB_MARK {
            continue;
        }
        let val = val_u64(v)?;
        match out.last_mut() {
            Some((lc, list)) if *lc == c => list.push((n, val)),
            _ => out.push((c, vec![(n, val)])),
        }
    }
    Ok(out)
}
