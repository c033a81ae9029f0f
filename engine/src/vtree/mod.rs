//! The version tree and the versioned-pointer algebra. Pure: no I/O.
//!
//! Each origin owns one [`VTree`]. User-visible versions are always leaves;
//! interior nodes are frozen. The origin is the implicit root (id
//! [`ORIGIN`]), and its snapshots hang off a *spine* of frozen origin
//! states whose ids carry [`SPINE_BIT`] and grow with time, so the nearest
//! spine ancestor holding an exception is one ordered seek (see
//! ARCHITECTURE.md). Exception lookups go through [`ExcView`], which the
//! store backs with the B+tree and the tests back with a `BTreeMap`.

pub mod diff;
pub mod model;
pub mod usage;

use crate::error::{Error, Result};
use crate::planted::{self, Bug};
use std::collections::{BTreeSet, HashMap};

pub type NodeId = u64;

/// The origin itself: the root. It never owns exceptions (its data is in place).
pub const ORIGIN: NodeId = 0;
/// Spine (frozen origin state) ids have this bit set; ids are < 2^48.
pub const SPINE_BIT: u64 = 1 << 47;
pub const MAX_NODE: NodeId = (1 << 48) - 1;
/// A key in the exception index that marks "rollback already copied this
/// chunk". Below SPINE_BIT so spine seeks never see it; never a real node.
pub const RB_MARK: NodeId = SPINE_BIT - 1;
/// Largest plain (non-spine) node id a counter may hand out.
pub const MAX_PLAIN: u64 = RB_MARK - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Spine,
    Ghost,
    Leaf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub id: NodeId,
    pub parent: NodeId,
    pub kind: Kind,
    /// The user tag of a leaf (0 for interior nodes).
    pub tag: u64,
    /// A leaf the user deleted. It stays until the cleaner has removed its exceptions.
    pub deleted: bool,
    /// An internal leaf (a rollback's frozen source): never listed or exported.
    pub hidden: bool,
    /// Set once the node is dead or merging; `flag_gen` is the cleaner
    /// generation current at that moment.
    pub flagged: bool,
    pub flag_gen: u64,
    /// Listing data of a leaf.
    pub parent_tag: Option<u64>,
    pub created: i64,
    pub memo: String,
    /// Exceptions keyed by this node (maintained by the store).
    pub own_chunks: u64,
    /// In memory only: children and how many are live.
    pub children: Vec<NodeId>,
    pub live_children: u32,
}

impl Node {
    pub fn new(id: NodeId, parent: NodeId, kind: Kind) -> Node {
        Node {
            id,
            parent,
            kind,
            tag: 0,
            deleted: false,
            hidden: false,
            flagged: false,
            flag_gen: 0,
            parent_tag: None,
            created: 0,
            memo: String::new(),
            own_chunks: 0,
            children: Vec::new(),
            live_children: 0,
        }
    }

    pub fn is_spine(&self) -> bool {
        self.kind == Kind::Spine
    }
}

pub fn is_spine_id(id: NodeId) -> bool {
    id & SPINE_BIT != 0 && id != RB_MARK
}

/// Read access to one origin's exceptions at one chunk.
pub trait ExcView {
    /// The exception keyed by (chunk, node), if any.
    fn get(&mut self, chunk: u64, node: NodeId) -> Result<Option<u64>>;
    /// The first spine exception at `chunk` with node id >= `from`.
    fn seek_spine(&mut self, chunk: u64, from: NodeId) -> Result<Option<(NodeId, u64)>>;
}

/// Where a version's data for one chunk comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// An exception: (node that owns it, data chunk or ZERO).
    Exc(NodeId, u64),
    /// The origin device, in place.
    Origin,
}

/// How to perform a write to a leaf at one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafPlan {
    /// The leaf owns a data chunk: write it in place.
    InPlace(u64),
    /// Allocate a chunk, fill it with `base` merged with the write, map it.
    /// `replaces` is true when it replaces a zero exception.
    Fresh { base: Base, replaces: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base {
    Zero,
    From(Source),
}

/// One cleaner decision for one exception at one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CleanAction {
    /// Drop the exception keyed by `node`; free `val` unless it is ZERO.
    Free { node: NodeId, val: u64 },
    /// Re-key the exception from `from` to its heir `to`.
    Move { from: NodeId, to: NodeId, val: u64 },
}

/// Records the store must rewrite (`updated`) or delete (`removed`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub updated: Vec<NodeId>,
    pub removed: Vec<NodeId>,
}

#[derive(Clone, Debug, Default)]
pub struct VTree {
    /// Private so that `flagged` and `flag_gen` change only through the
    /// methods that keep `flag_index` (read with [`VTree::nodes`]).
    nodes: HashMap<NodeId, Node>,
    /// The newest spine node: the origin's only child.
    pub spine_top: Option<NodeId>,
    /// Live tags -> leaf.
    pub tags: HashMap<u64, NodeId>,
    /// Every flagged node as (flag_gen, id): exactly the nodes with
    /// `flagged` set, ordered by generation, so the cleaner's questions
    /// ("anything flagged before this pass?", "which nodes may a finished
    /// pass remove?") cost the flagged nodes, not the whole tree (100,000
    /// snapshots are ~200,000 nodes). Derived from the records at open.
    flag_index: BTreeSet<(u64, NodeId)>,
    /// Counts the changes to the tree's shape (snapshot, delete, a
    /// cleaner pass): a reader that spans several lock holds and must see
    /// one shape (a diff's gather over `ByNode`) compares it.
    shape: u64,
}

fn corrupt(reason: String) -> Error {
    Error::Corrupt {
        block: 0,
        kind: "version tree",
        reason,
    }
}

impl VTree {
    /// Rebuild a tree from its stored node records (children, live counts
    /// and the tag map are derived). Refuses inconsistent input.
    pub fn from_records(records: Vec<Node>) -> Result<VTree> {
        let mut t = VTree::default();
        for mut n in records {
            n.children.clear();
            n.live_children = 0;
            if t.nodes.insert(n.id, n).is_some() {
                return Err(corrupt("duplicate node id".into()));
            }
        }
        let ids: Vec<NodeId> = t.nodes.keys().copied().collect();
        for id in &ids {
            let (parent, kind) = (t.nodes[id].parent, t.nodes[id].kind);
            if parent == ORIGIN {
                if kind != Kind::Spine {
                    return Err(corrupt(format!(
                        "node {id:#x} under the origin is not a spine node"
                    )));
                }
                if t.spine_top.replace(*id).is_some() {
                    return Err(corrupt("two spine tops".into()));
                }
                continue;
            }
            match t.nodes.get_mut(&parent) {
                Some(p) if p.kind != Kind::Leaf => p.children.push(*id),
                _ => {
                    return Err(corrupt(format!(
                        "node {id:#x} has a missing or leaf parent {parent:#x}"
                    )))
                }
            }
        }
        for id in &ids {
            let n = &t.nodes[id];
            if n.kind == Kind::Leaf && !n.deleted {
                if n.flagged || n.tag == 0 {
                    return Err(corrupt(format!(
                        "live leaf {id:#x} is flagged or has tag 0"
                    )));
                }
                if t.tags.insert(n.tag, *id).is_some() {
                    return Err(corrupt(format!("tag {} on two leaves", n.tag)));
                }
            }
        }
        // Live counts bottom-up: a bounded walk from every live leaf.
        let live_leaves: Vec<NodeId> = t.tags.values().copied().collect();
        for leaf in live_leaves {
            t.add_live_path(leaf)?;
        }
        t.check_acyclic()?;
        t.flag_index = t.scan_flagged();
        Ok(t)
    }

    /// The flagged set by a walk over every node: what `flag_index` must
    /// always equal.
    fn scan_flagged(&self) -> BTreeSet<(u64, NodeId)> {
        let flagged = self.nodes.values().filter(|n| n.flagged);
        flagged.map(|n| (n.flag_gen, n.id)).collect()
    }

    /// Compare the flagged index with a walk over every node (O(nodes):
    /// for tests and checkers, never on a hot path).
    pub fn verify_flag_index(&self) -> std::result::Result<(), String> {
        let scanned = self.scan_flagged();
        if scanned == self.flag_index {
            return Ok(());
        }
        let missing: Vec<_> = scanned.difference(&self.flag_index).take(4).collect();
        let extra: Vec<_> = self.flag_index.difference(&scanned).take(4).collect();
        Err(format!(
            "flag index holds {} nodes, a scan finds {}: missing (gen, id) {missing:x?}, \
             extra {extra:x?}",
            self.flag_index.len(),
            scanned.len()
        ))
    }

    /// Count `leaf` as live in every ancestor whose live count it starts.
    fn add_live_path(&mut self, leaf: NodeId) -> Result<()> {
        let mut child = leaf;
        for _ in 0..=self.nodes.len() {
            let parent = self.nodes[&child].parent;
            if parent == ORIGIN {
                return Ok(());
            }
            let p = self
                .nodes
                .get_mut(&parent)
                .ok_or_else(|| corrupt("dangling parent".into()))?;
            p.live_children += 1;
            if p.live_children > 1 {
                return Ok(()); // the rest of the path is already counted
            }
            child = parent;
        }
        Err(corrupt("cycle in version tree".into()))
    }

    /// Every node reaches the origin. Memoised, so O(n) even for a spine
    /// 10,000 snapshots deep.
    fn check_acyclic(&self) -> Result<()> {
        let mut good: std::collections::HashSet<NodeId> = std::collections::HashSet::new();
        good.insert(ORIGIN);
        for id in self.nodes.keys() {
            let mut path = Vec::new();
            let mut cur = *id;
            while !good.contains(&cur) {
                if path.len() > self.nodes.len() {
                    return Err(corrupt(format!("cycle through node {id:#x}")));
                }
                path.push(cur);
                cur = self
                    .nodes
                    .get(&cur)
                    .map(|n| n.parent)
                    .ok_or_else(|| corrupt("dangling parent".into()))?;
            }
            good.extend(path);
        }
        Ok(())
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[&id]
    }

    /// Every node, by id (read-only: flags change only through the tree).
    pub fn nodes(&self) -> &HashMap<NodeId, Node> {
        &self.nodes
    }

    /// Set a new leaf's listing data (creation time, memo) and whether it
    /// is an internal one. Fields no invariant of the tree depends on.
    pub fn describe_leaf(&mut self, leaf: NodeId, created: i64, memo: &str, hidden: bool) {
        if let Some(n) = self.nodes.get_mut(&leaf) {
            assert_eq!(n.kind, Kind::Leaf, "only a leaf is described");
            n.created = created;
            n.memo = memo.to_string();
            n.hidden = hidden;
        }
    }

    /// Flag `id` for the cleaner with generation `gen` (again, if it was:
    /// the newer generation wins), keeping `flag_index` exact.
    fn flag(&mut self, id: NodeId, gen: u64) -> Result<()> {
        let n = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| corrupt(format!("node {id:#x} missing")))?;
        if n.flagged {
            let indexed = self.flag_index.remove(&(n.flag_gen, id));
            assert!(indexed, "flagged node {id:#x} was not in the flag index");
        }
        n.flagged = true;
        n.flag_gen = gen;
        // Planted bug: nodes flagged because a descendant was deleted (the
        // interior ones) never enter the index, so no pass removes them.
        if planted::on(Bug::UnindexedFlag) && n.kind != Kind::Leaf {
            return Ok(());
        }
        self.flag_index.insert((gen, id));
        Ok(())
    }

    pub fn leaf_of(&self, tag: u64) -> Option<NodeId> {
        self.tags.get(&tag).copied()
    }

    pub fn is_live(&self, id: NodeId) -> bool {
        let n = &self.nodes[&id];
        match n.kind {
            Kind::Leaf => !n.deleted,
            _ => n.live_children > 0,
        }
    }

    /// The one live child of a merging node, if it is merging. A spine node
    /// only merges into its spine child; one whose only live child is its
    /// snapshot side stays, since it still serves that side.
    pub fn merge_target(&self, id: NodeId) -> Option<NodeId> {
        let n = &self.nodes[&id];
        if n.kind == Kind::Leaf || n.live_children != 1 {
            return None;
        }
        let live = n.children.iter().copied().find(|c| self.is_live(*c))?;
        if n.kind == Kind::Spine && !self.nodes[&live].is_spine() {
            return None;
        }
        Some(live)
    }

    /// Where the read of `leaf` at `chunk` finds its data.
    pub fn resolve(&self, leaf: NodeId, chunk: u64, v: &mut dyn ExcView) -> Result<Source> {
        Ok(self.resolve_layer(leaf, chunk, v)?.0)
    }

    /// `resolve`, and the layer the data comes from, as an image chain
    /// counts them (qemu's allocation depth): 1 is the leaf's own
    /// exception; each frozen ancestor above it (a ghost: the state a
    /// snapshot-of-snapshot froze, which both its children now read
    /// through, as an overlay reads its backing file) is one layer more;
    /// the origin, in place or through a spine copy of what it held, is
    /// the last layer.
    pub fn resolve_layer(
        &self,
        leaf: NodeId,
        chunk: u64,
        v: &mut dyn ExcView,
    ) -> Result<(Source, u32)> {
        let mut cur = leaf;
        // Non-spine ancestors: one point lookup each (snapshot-of-snapshot depth).
        for layer in 1..=self.nodes.len() as u32 + 1 {
            if cur == ORIGIN {
                return Ok((Source::Origin, layer));
            }
            let n = &self.nodes[&cur];
            if n.is_spine() {
                let source = match v.seek_spine(chunk, cur)? {
                    Some((node, val)) => Source::Exc(node, val),
                    None => Source::Origin,
                };
                return Ok((source, layer));
            }
            if let Some(val) = v.get(chunk, cur)? {
                return Ok((Source::Exc(cur, val), layer));
            }
            cur = n.parent;
        }
        Err(corrupt("cycle in version tree".into()))
    }

    /// The newest spine node that is live and not merging: where an origin
    /// write's copy goes. None when the origin has no live snapshot.
    pub fn copy_target(&self) -> Option<NodeId> {
        let mut cur = self.spine_top?;
        for _ in 0..=self.nodes.len() {
            if !self.is_live(cur) {
                return None;
            }
            match self.merge_target(cur) {
                Some(next) => cur = next,
                None => return Some(cur),
            }
        }
        None
    }

    /// The node that must receive a copy of the old origin data before the
    /// origin overwrites `chunk`, if any. At most one: O(1) copies.
    pub fn origin_write_target(&self, chunk: u64, v: &mut dyn ExcView) -> Result<Option<NodeId>> {
        let Some(target) = self.copy_target() else {
            return Ok(None);
        };
        Ok(match v.seek_spine(chunk, target)? {
            Some(_) => None, // every snapshot already has its own copy
            None => Some(target),
        })
    }

    pub fn leaf_write_plan(
        &self,
        leaf: NodeId,
        chunk: u64,
        v: &mut dyn ExcView,
    ) -> Result<LeafPlan> {
        assert_eq!(self.nodes[&leaf].kind, Kind::Leaf);
        match v.get(chunk, leaf)? {
            Some(crate::meta::ZERO_CHUNK) => Ok(LeafPlan::Fresh {
                base: Base::Zero,
                replaces: true,
            }),
            Some(val) => Ok(LeafPlan::InPlace(val)),
            None => Ok(LeafPlan::Fresh {
                base: Base::From(self.resolve(leaf, chunk, v)?),
                replaces: false,
            }),
        }
    }

    /// The shape counter: equal values mean no snapshot, delete or cleaner
    /// pass came between (see the field).
    pub fn shape(&self) -> u64 {
        self.shape
    }

    /// Snapshot of the origin: a new spine node on top, the new leaf under it.
    pub fn snapshot_origin(
        &mut self,
        spine_id: NodeId,
        leaf_id: NodeId,
        tag: u64,
    ) -> Result<Changes> {
        self.shape += 1;
        self.check_new_ids(spine_id, leaf_id, tag)?;
        let mut spine = Node::new(spine_id, ORIGIN, Kind::Spine);
        let mut ch = Changes::default();
        if let Some(old) = self.spine_top {
            let live = self.is_live(old);
            let o = self
                .nodes
                .get_mut(&old)
                .ok_or_else(|| corrupt("spine top missing".into()))?;
            o.parent = spine_id;
            spine.children.push(old);
            spine.live_children += u32::from(live);
            ch.updated.push(old);
        }
        let mut leaf = Node::new(leaf_id, spine_id, Kind::Leaf);
        leaf.tag = tag;
        spine.children.push(leaf_id);
        spine.live_children += 1;
        self.nodes.insert(spine_id, spine);
        self.nodes.insert(leaf_id, leaf);
        self.spine_top = Some(spine_id);
        self.tags.insert(tag, leaf_id);
        ch.updated.extend([spine_id, leaf_id]);
        Ok(ch)
    }

    /// Snapshot of snapshot `of`: its leaf freezes into a ghost that keeps
    /// every exception; `cont_id` continues `of`, `leaf_id` is the new one.
    pub fn snapshot_of(
        &mut self,
        of: u64,
        cont_id: NodeId,
        leaf_id: NodeId,
        tag: u64,
    ) -> Result<Changes> {
        self.shape += 1;
        self.check_new_ids(cont_id, leaf_id, tag)?;
        let old = self
            .leaf_of(of)
            .ok_or_else(|| Error::Invalid(format!("no snapshot {of}")))?;
        let o = self
            .nodes
            .get_mut(&old)
            .ok_or_else(|| corrupt("leaf missing".into()))?;
        let mut cont = Node::new(cont_id, old, Kind::Leaf);
        cont.tag = of;
        cont.parent_tag = o.parent_tag;
        cont.created = o.created;
        cont.memo = std::mem::take(&mut o.memo);
        o.kind = Kind::Ghost;
        o.tag = 0;
        o.parent_tag = None;
        o.children = vec![cont_id, leaf_id];
        o.live_children = 2;
        let mut leaf = Node::new(leaf_id, old, Kind::Leaf);
        leaf.tag = tag;
        leaf.parent_tag = Some(of);
        self.nodes.insert(cont_id, cont);
        self.nodes.insert(leaf_id, leaf);
        self.tags.insert(of, cont_id);
        self.tags.insert(tag, leaf_id);
        Ok(Changes {
            updated: vec![old, cont_id, leaf_id],
            removed: vec![],
        })
    }

    fn check_new_ids(&self, a: NodeId, b: NodeId, tag: u64) -> Result<()> {
        if a == b || self.nodes.contains_key(&a) || self.nodes.contains_key(&b) {
            return Err(Error::Invalid(format!("node ids {a:#x}/{b:#x} reused")));
        }
        if tag == 0 || self.tags.contains_key(&tag) {
            return Err(Error::Invalid(format!("tag {tag} reused")));
        }
        Ok(())
    }

    /// Delete a snapshot: instant. Flags the leaf and every ancestor whose
    /// state changes (to merging or dead) with generation `gen`.
    pub fn delete(&mut self, tag: u64, gen: u64) -> Result<Changes> {
        self.shape += 1;
        let leaf = self
            .tags
            .remove(&tag)
            .ok_or_else(|| Error::Invalid(format!("no snapshot {tag}")))?;
        let mut ch = Changes::default();
        let n = self
            .nodes
            .get_mut(&leaf)
            .ok_or_else(|| corrupt("leaf missing".into()))?;
        n.deleted = true;
        self.flag(leaf, gen)?;
        ch.updated.push(leaf);
        let mut child = leaf;
        for _ in 0..=self.nodes.len() {
            let parent = self.nodes[&child].parent;
            if parent == ORIGIN {
                break;
            }
            let before = (self.is_live(parent), self.merge_target(parent));
            let p = self
                .nodes
                .get_mut(&parent)
                .ok_or_else(|| corrupt("dangling parent".into()))?;
            assert!(p.live_children > 0, "a live child was not counted");
            p.live_children = p.live_children.saturating_sub(1);
            let after = (self.is_live(parent), self.merge_target(parent));
            if before != after {
                self.flag(parent, gen)?;
                ch.updated.push(parent);
            }
            if after.0 {
                break; // still live: nothing above changes its count
            }
            child = parent;
        }
        Ok(ch)
    }

    /// The cleaner's decisions for one chunk, given every exception there.
    /// Only nodes flagged before `pass_gen` are acted on.
    pub fn clean_chunk(&self, exc: &[(NodeId, u64)], pass_gen: u64) -> Vec<CleanAction> {
        let has = |id: NodeId| exc.iter().any(|(n, _)| *n == id);
        let mut out = Vec::new();
        for &(node, val) in exc {
            let Some(n) = self.nodes.get(&node) else {
                continue; // RB marks and foreign keys are not the cleaner's
            };
            if !n.flagged || n.flag_gen >= pass_gen {
                continue;
            }
            if !self.is_live(node) {
                out.push(CleanAction::Free { node, val });
                continue;
            }
            let Some(mut heir) = self.merge_target(node) else {
                continue;
            };
            // Follow the merge chain to the final heir; any exception on the
            // way shadows this one for everyone who would inherit it.
            let mut shadowed = has(heir);
            for _ in 0..=self.nodes.len() {
                match self.merge_target(heir) {
                    Some(next) => {
                        heir = next;
                        shadowed |= has(heir);
                    }
                    None => break,
                }
            }
            out.push(if shadowed {
                CleanAction::Free { node, val }
            } else {
                CleanAction::Move {
                    from: node,
                    to: heir,
                    val,
                }
            });
        }
        out
    }

    /// Nodes waiting for the cleaner.
    pub fn flagged_count(&self) -> usize {
        self.flag_index.len()
    }

    /// Whether any node still waits for the cleaner.
    pub fn has_flagged(&self) -> bool {
        !self.flag_index.is_empty()
    }

    /// Whether a pass of generation `pass_gen` has work here: a node
    /// flagged before it. O(log flagged).
    pub fn has_flagged_before(&self, pass_gen: u64) -> bool {
        self.flag_index
            .first()
            .is_some_and(|(gen, _)| *gen < pass_gen)
    }

    /// Remove every node a finished pass `pass_gen` has emptied: dead nodes
    /// with no children left, and merging nodes spliced out of the tree.
    /// Visits only the nodes flagged before the pass, and the parents of
    /// those it removes: removing a node changes no node's liveness, only
    /// its parent's children (a spliced node's heir takes its place), so a
    /// parent is the one node that can become removable. The result is the
    /// fixpoint a walk over every node until none is removable reaches.
    pub fn finish_pass(&mut self, pass_gen: u64) -> Changes {
        self.shape += 1;
        let mut ch = Changes::default();
        let mut work: Vec<NodeId> = self
            .flag_index
            .range(..(pass_gen, 0))
            .map(|(_, id)| *id)
            .collect();
        // Bounded: every node enters once from the index, and once more as
        // the parent of each child removed (a removal happens once a node).
        while let Some(id) = work.pop() {
            let Some(n) = self.nodes.get(&id) else {
                continue; // removed already
            };
            if !n.flagged || n.flag_gen >= pass_gen || !self.removable(id) {
                continue;
            }
            let parent = n.parent;
            self.remove_node(id, &mut ch);
            if parent != ORIGIN {
                work.push(parent);
            }
        }
        ch.updated.retain(|id| self.nodes.contains_key(id));
        ch.updated.sort_unstable();
        ch.updated.dedup();
        ch
    }

    fn removable(&self, id: NodeId) -> bool {
        let n = &self.nodes[&id];
        if !self.is_live(id) {
            return n.children.is_empty();
        }
        match self.merge_target(id) {
            Some(heir) => n.children.iter().all(|c| *c == heir),
            None => false,
        }
    }

    fn remove_node(&mut self, id: NodeId, ch: &mut Changes) {
        let Some(n) = self.nodes.remove(&id) else {
            return;
        };
        let indexed = self.flag_index.remove(&(n.flag_gen, id));
        assert_eq!(indexed, n.flagged, "node {id:#x}: flag index disagrees");
        let heir = n.children.first().copied();
        assert!(n.children.len() <= 1);
        if let Some(h) = heir {
            if let Some(hn) = self.nodes.get_mut(&h) {
                hn.parent = n.parent;
                ch.updated.push(h);
            }
        }
        if n.parent == ORIGIN {
            self.spine_top = heir;
        } else if let Some(p) = self.nodes.get_mut(&n.parent) {
            match heir {
                Some(h) => {
                    for c in p.children.iter_mut() {
                        if *c == id {
                            *c = h;
                        }
                    }
                }
                None => p.children.retain(|c| *c != id),
            }
            ch.updated.push(n.parent);
        }
        ch.removed.push(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `snapshots` snapshots of the origin, all deleted with generation 0.
    fn dead_spine(snapshots: u64) -> VTree {
        let mut t = VTree::default();
        for i in 1..=snapshots {
            t.snapshot_origin(SPINE_BIT | (2 * i), 2 * i + 1, i)
                .expect("snapshot");
        }
        for tag in 1..=snapshots {
            t.delete(tag, 0).expect("delete");
        }
        t
    }

    /// A dead spine empties from the bottom up, one node making the next
    /// removable: one pass takes all of it (a walk over every node per
    /// round took one round a spine node).
    #[test]
    fn one_pass_removes_a_whole_dead_spine() {
        let mut t = dead_spine(10_000);
        assert_eq!(t.flagged_count(), 20_000);
        assert_eq!(t.verify_flag_index(), Ok(()));
        let ch = t.finish_pass(1);
        assert_eq!(ch.removed.len(), 20_000);
        assert!(ch.updated.is_empty(), "{:?}", ch.updated);
        assert!(t.nodes().is_empty() && t.spine_top.is_none());
        assert!(!t.has_flagged());
        assert_eq!(t.verify_flag_index(), Ok(()));
    }

    /// A pass acts only on nodes flagged before it; a node flagged again
    /// moves to its newer generation.
    #[test]
    fn a_pass_leaves_nodes_flagged_during_it() {
        let mut t = dead_spine(2);
        t.snapshot_origin(SPINE_BIT | 100, 101, 3)
            .expect("snapshot");
        t.delete(3, 1).expect("delete");
        assert!(t.has_flagged_before(1) && t.has_flagged_before(2));
        let ch = t.finish_pass(1);
        // The first two spine nodes and their leaves go; the third spine
        // node (dead, flagged at 1) and its leaf stay for the next pass.
        assert_eq!(ch.removed.len(), 4);
        assert_eq!(t.flagged_count(), 2);
        assert!(!t.has_flagged_before(1) && t.has_flagged_before(2));
        assert_eq!(t.verify_flag_index(), Ok(()));
        t.finish_pass(2);
        assert!(t.nodes().is_empty() && !t.has_flagged());
        assert_eq!(t.verify_flag_index(), Ok(()));
    }
}
