//! Space accounting at one chunk, pure: which live leaves read each data
//! exception, and what that makes of each leaf's *own* chunks (deleting the
//! leaf would free them) and *shared* chunks (read from the COW device
//! together with at least one other version).
//!
//! An exception is not owned by the node it is keyed by: an origin write
//! copies into the newest spine node, and every older snapshot of the
//! origin that has no copy of its own reads it there. So every live leaf
//! (the tree's tags, hidden ones included: a rollback's frozen source is a
//! reader too) is resolved through [`VTree::resolve`], and the readers of
//! each exception are counted. The origin is no reader: it reads in place,
//! and during a rollback through the hidden leaf, which is counted instead.
//! Zero exceptions hold no chunk, and an exception no leaf reads (waiting
//! for the cleaner) counts for nobody.
//!
//! The store feeds this from the B+tree in batches (`store/usage.rs`); the
//! exhaustive vtree test checks it against a model of physical copies.

use super::{ExcView, NodeId, Source, VTree, SPINE_BIT};
use crate::error::Result;
use crate::meta::ZERO_CHUNK;
use std::collections::HashMap;

/// Own and shared chunks of one leaf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeafUsage {
    pub own: u64,
    pub shared: u64,
}

/// The exceptions of one chunk, as an `ExcView` for `VTree::resolve`.
pub struct ChunkView<'a> {
    pub chunk: u64,
    /// (node, value), ascending by node.
    pub exc: &'a [(NodeId, u64)],
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

/// Every (exception node, leaf) pair where a live leaf reads a data
/// exception at `chunk`, sorted, so each exception's readers are one run.
/// `exc` is the chunk's exceptions, (node, value) ascending by node.
pub fn chunk_readers(
    tree: &VTree,
    chunk: u64,
    exc: &[(NodeId, u64)],
) -> Result<Vec<(NodeId, NodeId)>> {
    let mut readers = Vec::new();
    for &leaf in tree.tags.values() {
        let mut view = ChunkView { chunk, exc };
        if let Source::Exc(node, val) = tree.resolve(leaf, chunk, &mut view)? {
            if val != ZERO_CHUNK {
                readers.push((node, leaf));
            }
        }
    }
    readers.sort_unstable();
    Ok(readers)
}

/// Add one chunk's accounting to `out` (keyed by leaf): a data exception
/// read by one leaf is that leaf's own, one read by several is shared by
/// each of them.
pub fn account_chunk(
    tree: &VTree,
    chunk: u64,
    exc: &[(NodeId, u64)],
    out: &mut HashMap<NodeId, LeafUsage>,
) -> Result<()> {
    let readers = chunk_readers(tree, chunk, exc)?;
    for run in readers.chunk_by(|a, b| a.0 == b.0) {
        for &(_, leaf) in run {
            let usage = out.entry(leaf).or_default();
            match run.len() {
                1 => usage.own += 1,
                _ => usage.shared += 1,
            }
        }
    }
    Ok(())
}
