//! Space accounting per snapshot (what `list` shows, after `dms list` and
//! ZFS's `used`): *own* chunks, which deleting the snapshot would free, and
//! *shared* chunks, which it reads from the COW device together with at
//! least one other version.
//!
//! An exception is not owned by the node it is keyed by: an origin write
//! copies into the newest spine node, and every older snapshot of the
//! origin that has no copy of its own reads it there. So the accounting
//! resolves, chunk by chunk, every live leaf (hidden ones included: a
//! rollback's frozen source is a reader too) through the version tree's own
//! `resolve`, and counts the readers of each exception. Exceptions no leaf
//! reads (waiting for the cleaner) count for nobody.
//!
//! Cost: one pass over the origin's exceptions, in batches under the tree
//! and metadata locks (released between batches, so serving goes on).

use super::inner::{val_u64, Inner, OriginRt};
use super::records::{exc_key, split_key};
use crate::error::Result;
use crate::meta::{Tree, ZERO_CHUNK};
use crate::sync;
use crate::vtree::{ExcView, NodeId, Source, VTree, MAX_NODE, SPINE_BIT};
use std::collections::HashMap;

/// Exceptions read per batch (under the locks).
const BATCH: usize = 4096;

/// Own and shared chunks of one leaf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeafUsage {
    pub own: u64,
    pub shared: u64,
}

/// The exceptions of one chunk, as an `ExcView` for `VTree::resolve`.
struct ChunkView<'a> {
    chunk: u64,
    /// (node, value), ascending by node.
    exc: &'a [(NodeId, u64)],
}

impl ExcView for ChunkView<'_> {
    fn get(&mut self, chunk: u64, node: NodeId) -> Result<Option<u64>> {
        assert_eq!(chunk, self.chunk, "a chunk view answers for its chunk only");
        Ok(self
            .exc
            .binary_search_by_key(&node, |e| e.0)
            .ok()
            .map(|i| self.exc[i].1))
    }

    fn seek_spine(&mut self, chunk: u64, from: NodeId) -> Result<Option<(NodeId, u64)>> {
        assert_eq!(chunk, self.chunk, "a chunk view answers for its chunk only");
        let from = from.max(SPINE_BIT);
        Ok(self.exc.iter().find(|e| e.0 >= from).copied())
    }
}

/// Add one chunk's accounting to `out`: resolve every leaf, count each
/// data exception's readers.
fn account_chunk(
    tree: &VTree,
    chunk: u64,
    exc: &[(NodeId, u64)],
    out: &mut HashMap<NodeId, LeafUsage>,
) -> Result<()> {
    let mut readers: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    for &leaf in tree.tags.values() {
        let mut view = ChunkView { chunk, exc };
        if let Source::Exc(node, val) = tree.resolve(leaf, chunk, &mut view)? {
            if val != ZERO_CHUNK {
                readers.entry(node).or_default().push(leaf);
            }
        }
    }
    for leaves in readers.values() {
        for leaf in leaves {
            let u = out.entry(*leaf).or_default();
            match leaves.len() {
                1 => u.own += 1,
                _ => u.shared += 1,
            }
        }
    }
    Ok(())
}

impl Inner {
    /// Own and shared chunks of every leaf of origin `o`.
    pub fn leaf_usage(&self, o: &OriginRt) -> Result<HashMap<NodeId, LeafUsage>> {
        let mut out = HashMap::new();
        let hi = exc_key(o.num, (1 << 48) - 1, MAX_NODE);
        let mut lo = exc_key(o.num, 0, 0);
        loop {
            let tree = sync::read(&o.tree);
            let mut md = sync::lock(&self.md);
            let batch = md.meta.range(Tree::Exceptions, lo, hi, BATCH)?;
            let full = batch.len() == BATCH;
            let mut groups = group_by_chunk(&batch)?;
            if full && groups.len() > 1 {
                // The last chunk may go on past the batch: redo it next time.
                let (c, _) = groups.pop().expect("more than one group");
                lo = exc_key(o.num, c, 0);
            } else if full {
                // One chunk with more exceptions than a batch: take it whole.
                let c = groups[0].0;
                let all = md.meta.range(
                    Tree::Exceptions,
                    exc_key(o.num, c, 0),
                    exc_key(o.num, c, MAX_NODE),
                    usize::MAX,
                )?;
                groups = group_by_chunk(&all)?;
                lo = exc_key(o.num, c + 1, 0);
            }
            drop(md);
            for (c, exc) in &groups {
                account_chunk(&tree, *c, exc, &mut out)?;
            }
            if !full {
                return Ok(out);
            }
        }
    }
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
