//! Which chunks may differ between two versions of one origin, from the
//! version tree and the exception index alone (no data is read). Pure: the
//! store walks its B+tree with it (`store/diff.rs`), the model tests a
//! `BTreeMap` (`model.rs`).
//!
//! **Where to look.** A read of version v at chunk c takes the first
//! exception along v's *chain*: v's non-spine ancestors, then every spine
//! node from v's spine ancestor up (one seek), else the origin in place
//! (`VTree::resolve`). Two chains meet at their lowest common ancestor and
//! share everything above it. So if chunk c holds no exception keyed by a
//! node strictly below that ancestor on either side, both versions read the
//! same place (the first exception above it, or the origin in place) and
//! cannot differ. Those nodes are [`DiffKeys`]: the non-spine nodes of both
//! chains below the meeting point, plus at most one run of spine ids. Spine
//! ids grow towards the origin (the invariant `resolve`'s spine seek rests
//! on), so when the versions hang off different spine nodes `F_a < F_b`,
//! the chains meet at `F_b` and the spine nodes between are exactly the ids
//! in `[F_a, F_b)`. The origin reads in place: its chain is empty, it meets
//! a snapshot's at the root, and the snapshot's whole chain counts (the
//! spine run is `[F_a, MAX_NODE]`).
//!
//! **Candidates.** Only chunks holding an exception keyed in `DiffKeys` can
//! differ. The exception index is keyed by (chunk, node), so a forward walk
//! finds them by skipping: inside a chunk, from one key range to the next;
//! past the last, to the next chunk's first range ([`next_step`]). A chunk
//! with no exception at all is never visited, and one with thousands (a
//! chunk the origin rewrote after every snapshot) costs a seek or two. The
//! work is the chunks that hold exceptions in the range, not the device's
//! size, and not every exception there.
//!
//! **Decision.** Each candidate is resolved exactly on both sides (an
//! exception below the meeting point on one side still has to be compared
//! with what the other side reads above it: two zero exceptions read the
//! same). Two sources hold the same content when they are the same data
//! chunk, both zero, or both the origin in place ([`same_content`]): a data
//! chunk is written only through the one leaf that alone reads it, and the
//! cleaner moves exceptions without changing their chunk. Anything else is
//! reported, so a differing chunk is never missed, and an unchanged chunk
//! is reported only where the metadata cannot tell: different physical
//! copies that happen to hold the same bytes (a write of equal data; zeros
//! against data that is zero; an origin rolled back to a snapshot, which
//! then reads in place what the snapshot reads from its copy).
//!
//! **The origin during a rollback.** A chunk the copier has not reached yet
//! reads through the rollback's frozen source leaf; the caller passes that
//! leaf as `pending` to [`VTree::diff_source`], and [`VTree::diff_keys`]
//! adds the source's chain to the keys when one side is the origin.

use super::{ExcView, NodeId, Source, VTree, MAX_NODE, ORIGIN, SPINE_BIT};
use crate::error::{Error, Result};

/// One side of a diff: the origin, or a leaf (a snapshot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Origin,
    Leaf(NodeId),
}

/// The node ids whose exceptions can make two versions differ: sorted,
/// disjoint, inclusive ranges (single non-spine nodes, then at most a run
/// of spine ids, which sort above them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiffKeys {
    ranges: Vec<(NodeId, NodeId)>,
}

/// Where a walk over one origin's exceptions goes after seeing the
/// exception keyed (chunk, node).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The chunk holds an exception keyed in `DiffKeys`: resolve it; the
    /// walk goes on at the next chunk's first key range.
    Candidate,
    /// Skip to this node id within the same chunk (the next key range).
    SeekNode(NodeId),
    /// Nothing more of this chunk can matter: on to the next chunk.
    NextChunk,
}

impl DiffKeys {
    fn from_parts(mut points: Vec<NodeId>, spine: Option<(NodeId, NodeId)>) -> DiffKeys {
        points.sort_unstable();
        points.dedup();
        assert!(
            points.iter().all(|p| *p != ORIGIN && *p < SPINE_BIT),
            "non-spine keys below the spine bit"
        );
        let mut ranges: Vec<(NodeId, NodeId)> = points.into_iter().map(|p| (p, p)).collect();
        if let Some((lo, hi)) = spine {
            assert!(SPINE_BIT <= lo && lo <= hi && hi <= MAX_NODE, "a spine run");
            ranges.push((lo, hi));
        }
        DiffKeys { ranges }
    }

    /// The union of two sets.
    fn union(self, other: DiffKeys) -> DiffKeys {
        let mut all = self.ranges;
        all.extend(other.ranges);
        all.sort_unstable();
        let mut out: Vec<(NodeId, NodeId)> = Vec::with_capacity(all.len());
        for (lo, hi) in all {
            match out.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        DiffKeys { ranges: out }
    }

    /// No exception can make the two versions differ (they are one).
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The lowest node id in the set: where a walk enters each chunk.
    pub fn first(&self) -> Option<NodeId> {
        self.ranges.first().map(|r| r.0)
    }

    pub fn contains(&self, node: NodeId) -> bool {
        matches!(self.step(node), Step::Candidate)
    }

    /// The inclusive node-id ranges, ascending.
    pub fn ranges(&self) -> &[(NodeId, NodeId)] {
        &self.ranges
    }

    /// What an exception keyed by `node` means for its chunk.
    pub fn step(&self, node: NodeId) -> Step {
        let i = self.ranges.partition_point(|r| r.1 < node);
        match self.ranges.get(i) {
            None => Step::NextChunk,
            Some(&(lo, _)) if lo <= node => Step::Candidate,
            Some(&(lo, _)) => Step::SeekNode(lo),
        }
    }
}

/// Whether two sources hold the same content as far as the metadata can
/// tell: the same data chunk, both zero, or both the origin in place.
pub fn same_content(a: Source, b: Source) -> bool {
    match (a, b) {
        (Source::Origin, Source::Origin) => true,
        // A data chunk is mapped once (one node), so equal values are one
        // physical chunk; ZERO_CHUNK on both sides reads zeros on both.
        (Source::Exc(_, x), Source::Exc(_, y)) => x == y,
        _ => false,
    }
}

/// A chain split at its spine ancestor: the non-spine nodes from the leaf
/// up, and the first spine node above them.
struct Chain {
    own: Vec<NodeId>,
    spine: NodeId,
}

fn corrupt(reason: String) -> Error {
    Error::Corrupt {
        block: 0,
        kind: "version tree",
        reason,
    }
}

impl VTree {
    fn chain(&self, leaf: NodeId) -> Result<Chain> {
        let mut own = Vec::new();
        let mut cur = leaf;
        for _ in 0..=self.nodes.len() {
            let n = self
                .nodes
                .get(&cur)
                .ok_or_else(|| corrupt(format!("node {cur:#x} is missing")))?;
            // The keys' order (plain ids below spine ids) rests on the kinds
            // matching the ids; a record that breaks it is damage, not a panic.
            if n.is_spine() != super::is_spine_id(cur) || cur == ORIGIN {
                return Err(corrupt(format!("node {cur:#x}: its id and kind disagree")));
            }
            if n.is_spine() {
                return Ok(Chain { own, spine: cur });
            }
            own.push(cur);
            if n.parent == ORIGIN {
                return Err(corrupt(format!("node {cur:#x} hangs off no spine node")));
            }
            cur = n.parent;
        }
        Err(corrupt("cycle in version tree".into()))
    }

    /// The node ids whose exceptions can make `from` and `to` differ (see
    /// the module docs). `rollback_src` is the leaf an origin chunk not yet
    /// copied by a rollback reads through, if a rollback onto this origin
    /// is in progress.
    pub fn diff_keys(
        &self,
        from: Side,
        to: Side,
        rollback_src: Option<NodeId>,
    ) -> Result<DiffKeys> {
        match (from, to) {
            (Side::Origin, Side::Origin) => Ok(DiffKeys::default()),
            (Side::Leaf(a), Side::Leaf(b)) => self.keys_between(a, b),
            (Side::Leaf(leaf), Side::Origin) | (Side::Origin, Side::Leaf(leaf)) => {
                let keys = self.keys_to_origin(leaf)?;
                match rollback_src {
                    // A pending origin chunk reads what the source reads.
                    Some(src) => Ok(keys.union(self.keys_to_origin(src)?)),
                    None => Ok(keys),
                }
            }
        }
    }

    /// A leaf's whole chain: the origin's chain is empty.
    fn keys_to_origin(&self, leaf: NodeId) -> Result<DiffKeys> {
        let c = self.chain(leaf)?;
        Ok(DiffKeys::from_parts(c.own, Some((c.spine, MAX_NODE))))
    }

    fn keys_between(&self, a: NodeId, b: NodeId) -> Result<DiffKeys> {
        if a == b {
            return Ok(DiffKeys::default());
        }
        let (mut ca, mut cb) = (self.chain(a)?, self.chain(b)?);
        if ca.spine == cb.spine {
            // They meet at or below the spine node: drop the common top.
            while let (Some(x), Some(y)) = (ca.own.last(), cb.own.last()) {
                if x != y {
                    break;
                }
                ca.own.pop();
                cb.own.pop();
            }
            ca.own.append(&mut cb.own);
            return Ok(DiffKeys::from_parts(ca.own, None));
        }
        // They meet at the newer spine node; the older side's spine nodes
        // below it (ids in [older, newer)) are the only spine keys that count.
        let (older, newer) = (ca.spine.min(cb.spine), ca.spine.max(cb.spine));
        ca.own.append(&mut cb.own);
        Ok(DiffKeys::from_parts(ca.own, Some((older, newer - 1))))
    }

    /// Where `side` reads chunk `chunk`: a leaf through its chain; the
    /// origin in place, or through `pending` (the rollback source leaf)
    /// when a rollback has not copied this chunk yet.
    pub fn diff_source(
        &self,
        side: Side,
        chunk: u64,
        view: &mut dyn ExcView,
        pending: Option<NodeId>,
    ) -> Result<Source> {
        match (side, pending) {
            (Side::Leaf(leaf), _) | (Side::Origin, Some(leaf)) => self.resolve(leaf, chunk, view),
            (Side::Origin, None) => Ok(Source::Origin),
        }
    }
}

/// Where a forward walk for candidate chunks goes after the exception
/// keyed (chunk, node): `Some((chunk, node))` to seek to, `None` when the
/// walk has passed `last` (the last chunk asked about). `candidate` is set
/// when this chunk holds a key of `keys`.
pub fn next_step(
    keys: &DiffKeys,
    chunk: u64,
    node: NodeId,
    last: u64,
) -> (bool, Option<(u64, NodeId)>) {
    let first = keys.first().expect("a walk over empty keys");
    let next_chunk = || (chunk < last).then(|| (chunk + 1, first));
    match keys.step(node) {
        Step::Candidate => (true, next_chunk()),
        Step::SeekNode(n) => (false, Some((chunk, n))),
        Step::NextChunk => (false, next_chunk()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_step_and_union() {
        let k = DiffKeys::from_parts(vec![7, 3], Some((SPINE_BIT | 2, SPINE_BIT | 5)));
        assert_eq!(k.step(1), Step::SeekNode(3));
        assert_eq!(k.step(3), Step::Candidate);
        assert_eq!(k.step(4), Step::SeekNode(7));
        assert_eq!(k.step(8), Step::SeekNode(SPINE_BIT | 2));
        assert_eq!(k.step(SPINE_BIT | 4), Step::Candidate);
        assert_eq!(k.step(SPINE_BIT | 6), Step::NextChunk);
        let u = k.union(DiffKeys::from_parts(
            vec![4],
            Some((SPINE_BIT | 6, MAX_NODE)),
        ));
        assert_eq!(
            u.ranges(),
            &[(3, 4), (7, 7), (SPINE_BIT | 2, MAX_NODE)],
            "adjacent ranges join"
        );
        assert_eq!(next_step(&u, 9, 5, 9), (false, Some((9, 7))));
        assert_eq!(next_step(&u, 9, 7, 9), (true, None));
        assert_eq!(next_step(&u, 9, 8, 10), (false, Some((9, SPINE_BIT | 2))));
        assert_eq!(next_step(&u, 9, 3, 10), (true, Some((10, 3))));
    }

    #[test]
    fn same_content_by_source() {
        use crate::meta::ZERO_CHUNK;
        assert!(same_content(Source::Origin, Source::Origin));
        assert!(same_content(
            Source::Exc(1, ZERO_CHUNK),
            Source::Exc(2, ZERO_CHUNK)
        ));
        assert!(same_content(Source::Exc(1, 9), Source::Exc(1, 9)));
        assert!(!same_content(Source::Exc(1, 9), Source::Exc(2, 10)));
        assert!(!same_content(Source::Exc(1, ZERO_CHUNK), Source::Origin));
        assert!(!same_content(Source::Origin, Source::Exc(1, 9)));
    }
}
