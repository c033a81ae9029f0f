//! An executor of the algebra over in-memory exceptions (`Algebra`) and a
//! naive model that keeps every version as a full array (`Naive`). The
//! exhaustive and property tests run the same operations through both and
//! compare every version after every step. Chunk contents are two halves so
//! a half-chunk write exercises the merge with inherited data.
//!
//! The naive model also knows, without any version tree, which *physical
//! copy* each version reads per chunk (as `tests/store_usage.rs` models the
//! store): the origin's data in place; a zeroed chunk; or a numbered copy
//! on the COW device. An origin write gives every version that still reads
//! the origin there one new copy, shared by all of them; a snapshot write
//! gives the snapshot a new copy unless it alone reads the one it has; a
//! snapshot shares every copy of its source; a rollback writes the origin
//! wherever the snapshot does not read it. From that, each snapshot's own
//! and shared chunks, which the algebra's accounting (`vtree::usage`) must
//! match.

use super::diff::{next_step, same_content, DiffKeys, Side, Step};
use super::usage::{account_chunk, LeafUsage};
use super::*;
use crate::meta::ZERO_CHUNK;
use std::collections::{BTreeMap, BTreeSet, HashMap};

pub type Content = [u64; 2];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write half `h` of chunk `c` of the origin.
    WriteOrigin {
        c: u64,
        h: usize,
    },
    /// Write half `h` of chunk `c` of the k-th live snapshot (by tag order).
    WriteSnap {
        k: usize,
        c: u64,
        h: usize,
    },
    /// Trim a whole chunk of the k-th snapshot to zeros.
    ZeroSnap {
        k: usize,
        c: u64,
    },
    SnapOrigin,
    SnapOf {
        k: usize,
    },
    Delete {
        k: usize,
    },
    /// Advance the cleaner by one chunk (or finish its pass).
    CleanStep,
    Rollback {
        k: usize,
    },
}

/// In-memory exception index at one origin.
#[derive(Clone, Debug, Default)]
pub struct MemExc {
    pub map: BTreeMap<(u64, NodeId), u64>,
}

impl ExcView for MemExc {
    fn get(&mut self, chunk: u64, node: NodeId) -> Result<Option<u64>> {
        Ok(self.map.get(&(chunk, node)).copied())
    }
    fn seek_spine(&mut self, chunk: u64, from: NodeId) -> Result<Option<(NodeId, u64)>> {
        Ok(self
            .map
            .range((chunk, from)..=(chunk, MAX_NODE))
            .find(|((_, n), _)| is_spine_id(*n))
            .map(|((_, n), v)| (*n, *v)))
    }
}

#[derive(Clone, Debug)]
pub struct Algebra {
    pub chunks: u64,
    pub tree: VTree,
    pub exc: MemExc,
    pub data: BTreeMap<u64, Content>,
    pub origin: Vec<Content>,
    next_id: u64,
    next_tag: u64,
    next_data: u64,
    next_val: u64,
    gen: u64,
    pass: Option<(u64, u64)>,
    /// Copies made by the last origin write (the O(1) target).
    pub last_copies: usize,
}

/// What a version reads at one chunk, physically.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Physical {
    /// The origin device, in place.
    Origin,
    /// Zeros, with no chunk behind them.
    Zero,
    /// A copy on the COW device, by identity.
    Copy(u64),
}

/// One chunk of one version in the naive model: what it reads, and where from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NaiveChunk {
    pub content: Content,
    pub copy: Physical,
}

/// What `Algebra::check_diff` saw: pairs of versions compared, chunks
/// reported, and of those the ones whose content is equal all the same
/// (physically different copies: zeros on both sides, or other content,
/// which only a rollback makes in this model).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiffTally {
    pub pairs: u64,
    pub reported: u64,
    pub unchanged_zero: u64,
    pub unchanged_other: u64,
}

impl DiffTally {
    pub fn add(&mut self, o: DiffTally) {
        self.pairs += o.pairs;
        self.reported += o.reported;
        self.unchanged_zero += o.unchanged_zero;
        self.unchanged_other += o.unchanged_other;
    }
}

/// Each user-visible snapshot's (tag, own, shared), ascending by tag.
pub type UsageByTag = Vec<(u64, u64, u64)>;

#[derive(Clone, Debug)]
pub struct Naive {
    pub versions: BTreeMap<u64, Vec<NaiveChunk>>,
    pub origin: Vec<Content>,
    next_tag: u64,
    next_val: u64,
    next_copy: u64,
}

impl Naive {
    pub fn new(chunks: u64) -> Naive {
        Naive {
            versions: BTreeMap::new(),
            origin: vec![[0, 0]; chunks as usize],
            next_tag: 1,
            next_val: 1,
            next_copy: 0,
        }
    }

    fn tag(&self, k: usize) -> Option<u64> {
        self.versions.keys().nth(k).copied()
    }

    fn new_copy(&mut self) -> Physical {
        self.next_copy += 1;
        Physical::Copy(self.next_copy)
    }

    fn readers(&self, c: usize, copy: Physical) -> usize {
        self.versions.values().filter(|v| v[c].copy == copy).count()
    }

    /// Before the origin overwrites chunk `c`: the versions that read it
    /// there get one copy of the old data, all the same one.
    fn copy_before_origin_write(&mut self, c: usize) {
        if self.readers(c, Physical::Origin) == 0 {
            return;
        }
        let copy = self.new_copy();
        for v in self.versions.values_mut() {
            if v[c].copy == Physical::Origin {
                v[c].copy = copy;
            }
        }
    }

    /// A partial write of `tag` at `c`: in place when the snapshot alone
    /// reads a copy, else onto a new copy of its own.
    fn copy_before_snapshot_write(&mut self, tag: u64, c: usize) {
        let current = self.versions[&tag][c].copy;
        let alone = matches!(current, Physical::Copy(_)) && self.readers(c, current) == 1;
        if !alone {
            let copy = self.new_copy();
            self.versions.get_mut(&tag).expect("live tag")[c].copy = copy;
        }
    }

    /// What version `tag` (None: the origin) reads at chunk `c`: its
    /// content and the physical copy behind it (the origin reads in place).
    pub fn chunk(&self, tag: Option<u64>, c: usize) -> NaiveChunk {
        match tag {
            None => NaiveChunk {
                content: self.origin[c],
                copy: Physical::Origin,
            },
            Some(t) => self.versions[&t][c],
        }
    }

    /// Each snapshot's own chunks (copies no other version reads) and
    /// shared chunks (copies read by two or more); the origin in place and
    /// zeros are neither, and the origin itself reads no copy.
    pub fn usage(&self) -> UsageByTag {
        let mut out = UsageByTag::with_capacity(self.versions.len());
        for (tag, v) in &self.versions {
            let (mut own, mut shared) = (0, 0);
            for (c, chunk) in v.iter().enumerate() {
                if let Physical::Copy(_) = chunk.copy {
                    match self.readers(c, chunk.copy) {
                        1 => own += 1,
                        _ => shared += 1,
                    }
                }
            }
            out.push((*tag, own, shared));
        }
        out
    }

    /// Apply; returns false if the op does not apply (no such snapshot).
    pub fn apply(&mut self, op: Op) -> bool {
        match op {
            Op::WriteOrigin { c, h } => {
                self.copy_before_origin_write(c as usize);
                self.origin[c as usize][h] = self.next_val;
                self.next_val += 1;
            }
            Op::WriteSnap { k, c, h } => {
                let Some(t) = self.tag(k) else { return false };
                self.copy_before_snapshot_write(t, c as usize);
                let v = self.next_val;
                self.next_val += 1;
                self.versions.get_mut(&t).expect("live tag")[c as usize].content[h] = v;
            }
            Op::ZeroSnap { k, c } => {
                let Some(t) = self.tag(k) else { return false };
                self.versions.get_mut(&t).expect("live tag")[c as usize] = NaiveChunk {
                    content: [0, 0],
                    copy: Physical::Zero,
                };
            }
            Op::SnapOrigin => {
                let chunks = self.origin.iter().map(|&content| NaiveChunk {
                    content,
                    copy: Physical::Origin,
                });
                self.versions.insert(self.next_tag, chunks.collect());
                self.next_tag += 1;
            }
            Op::SnapOf { k } => {
                let Some(t) = self.tag(k) else { return false };
                let copy = self.versions[&t].clone();
                self.versions.insert(self.next_tag, copy);
                self.next_tag += 1;
            }
            Op::Delete { k } => {
                let Some(t) = self.tag(k) else { return false };
                self.versions.remove(&t);
            }
            Op::CleanStep => {}
            Op::Rollback { k } => {
                let Some(t) = self.tag(k) else { return false };
                // The origin is written wherever the snapshot reads elsewhere.
                for c in 0..self.origin.len() {
                    if self.versions[&t][c].copy != Physical::Origin {
                        self.copy_before_origin_write(c);
                    }
                }
                self.origin = self.versions[&t].iter().map(|x| x.content).collect();
            }
        }
        true
    }
}

impl Algebra {
    pub fn new(chunks: u64) -> Algebra {
        Algebra {
            chunks,
            tree: VTree::default(),
            exc: MemExc::default(),
            data: BTreeMap::new(),
            origin: vec![[0, 0]; chunks as usize],
            next_id: 1,
            next_tag: 1,
            next_data: 1,
            next_val: 1,
            gen: 0,
            pass: None,
            last_copies: 0,
        }
    }

    fn tag(&self, k: usize) -> Option<u64> {
        let tags: BTreeSet<u64> = self.tree.tags.keys().copied().collect();
        tags.into_iter().nth(k)
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn new_data(&mut self, c: Content) -> u64 {
        let d = self.next_data;
        self.next_data += 1;
        self.data.insert(d, c);
        d
    }

    fn content(&self, val: u64) -> Content {
        if val == ZERO_CHUNK {
            [0, 0]
        } else {
            self.data[&val]
        }
    }

    fn source_content(&self, s: Source, c: u64) -> Content {
        match s {
            Source::Exc(_, val) => self.content(val),
            Source::Origin => self.origin[c as usize],
        }
    }

    pub fn read(&mut self, tag: Option<u64>, c: u64) -> Result<Content> {
        let Some(tag) = tag else {
            return Ok(self.origin[c as usize]);
        };
        let leaf = self
            .tree
            .leaf_of(tag)
            .ok_or_else(|| Error::Invalid("no tag".into()))?;
        let s = self.tree.resolve(leaf, c, &mut self.exc)?;
        Ok(self.source_content(s, c))
    }

    fn origin_write(&mut self, c: u64, content: Content) -> Result<()> {
        self.last_copies = 0;
        if let Some(t) = self.tree.origin_write_target(c, &mut self.exc)? {
            let d = self.new_data(self.origin[c as usize]);
            self.exc.map.insert((c, t), d);
            if let Some(n) = self.tree.nodes.get_mut(&t) {
                n.own_chunks += 1;
            }
            self.last_copies = 1;
        }
        self.origin[c as usize] = content;
        Ok(())
    }

    fn leaf_write(
        &mut self,
        leaf: NodeId,
        c: u64,
        f: impl FnOnce(Content) -> Content,
    ) -> Result<()> {
        match self.tree.leaf_write_plan(leaf, c, &mut self.exc)? {
            LeafPlan::InPlace(d) => {
                let old = self.data[&d];
                self.data.insert(d, f(old));
            }
            LeafPlan::Fresh { base, replaces } => {
                let old = match base {
                    Base::Zero => [0, 0],
                    Base::From(s) => self.source_content(s, c),
                };
                let d = self.new_data(f(old));
                self.exc.map.insert((c, leaf), d);
                if !replaces {
                    if let Some(n) = self.tree.nodes.get_mut(&leaf) {
                        n.own_chunks += 1;
                    }
                }
            }
        }
        Ok(())
    }

    pub fn apply(&mut self, op: Op) -> Result<bool> {
        match op {
            Op::WriteOrigin { c, h } => {
                let mut content = self.origin[c as usize];
                content[h] = self.next_val;
                self.next_val += 1;
                self.origin_write(c, content)?;
            }
            Op::WriteSnap { k, c, h } => {
                let Some(t) = self.tag(k) else {
                    return Ok(false);
                };
                let leaf = self.tree.tags[&t];
                let v = self.next_val;
                self.next_val += 1;
                self.leaf_write(leaf, c, |mut old| {
                    old[h] = v;
                    old
                })?;
            }
            Op::ZeroSnap { k, c } => {
                let Some(t) = self.tag(k) else {
                    return Ok(false);
                };
                let leaf = self.tree.tags[&t];
                match self.exc.map.insert((c, leaf), ZERO_CHUNK) {
                    Some(ZERO_CHUNK) => {}
                    Some(d) => {
                        self.data.remove(&d);
                    }
                    None => {
                        if let Some(n) = self.tree.nodes.get_mut(&leaf) {
                            n.own_chunks += 1;
                        }
                    }
                }
            }
            Op::SnapOrigin => {
                let (s, l) = (SPINE_BIT | self.id(), self.id());
                let tag = self.next_tag;
                self.next_tag += 1;
                self.tree.snapshot_origin(s, l, tag)?;
            }
            Op::SnapOf { k } => {
                let Some(t) = self.tag(k) else {
                    return Ok(false);
                };
                let (a, b) = (self.id(), self.id());
                let tag = self.next_tag;
                self.next_tag += 1;
                self.tree.snapshot_of(t, a, b, tag)?;
            }
            Op::Delete { k } => {
                let Some(t) = self.tag(k) else {
                    return Ok(false);
                };
                self.tree.delete(t, self.gen)?;
            }
            Op::CleanStep => self.clean_step()?,
            Op::Rollback { k } => {
                let Some(t) = self.tag(k) else {
                    return Ok(false);
                };
                let leaf = self.tree.tags[&t];
                for c in 0..self.chunks {
                    let s = self.tree.resolve(leaf, c, &mut self.exc)?;
                    if s != Source::Origin {
                        let content = self.source_content(s, c);
                        self.origin_write(c, content)?;
                    }
                }
            }
        }
        Ok(true)
    }

    pub fn clean_step(&mut self) -> Result<()> {
        let Some((pass_gen, cursor)) = self.pass else {
            if self.tree.has_flagged() {
                self.gen += 1;
                self.pass = Some((self.gen, 0));
            }
            return Ok(());
        };
        if cursor >= self.chunks {
            let mut reference = self.tree.clone();
            let want = finish_pass_by_scan(&mut reference, pass_gen);
            let got = self.tree.finish_pass(pass_gen);
            same_finish(&self.tree, got, &reference, want).map_err(Error::Invalid)?;
            self.pass = None;
            return Ok(());
        }
        let c = cursor;
        let exc: Vec<(NodeId, u64)> = self
            .exc
            .map
            .range((c, 0)..=(c, MAX_NODE))
            .map(|((_, n), v)| (*n, *v))
            .collect();
        for a in self.tree.clean_chunk(&exc, pass_gen) {
            match a {
                CleanAction::Free { node, val } => {
                    self.exc.map.remove(&(c, node));
                    if val != ZERO_CHUNK {
                        self.data.remove(&val);
                    }
                }
                CleanAction::Move { from, to, val } => {
                    self.exc.map.remove(&(c, from));
                    let prev = self.exc.map.insert((c, to), val);
                    if prev.is_some() {
                        return Err(Error::Invalid(format!(
                            "move onto an existing exception at {c}"
                        )));
                    }
                }
            }
        }
        self.pass = Some((pass_gen, cursor + 1));
        Ok(())
    }

    /// Run the cleaner until it has nothing left to do.
    pub fn clean_all(&mut self) -> Result<()> {
        for _ in 0..(self.chunks + 2) * 8 {
            self.clean_step()?;
            if self.pass.is_none() && !self.tree.has_flagged() {
                return Ok(());
            }
        }
        Err(Error::Invalid("cleaner did not finish".into()))
    }

    fn side(&self, tag: Option<u64>) -> Result<Side> {
        match tag {
            None => Ok(Side::Origin),
            Some(t) => self
                .tree
                .leaf_of(t)
                .map(Side::Leaf)
                .ok_or_else(|| Error::Invalid(format!("no tag {t}"))),
        }
    }

    /// The chunks where versions `from` and `to` (None: the origin) may
    /// differ, found as the store finds them (`store/diff.rs`): a forward
    /// walk over the exception index that skips by `next_step`, then each
    /// candidate resolved on both sides.
    pub fn diff(&mut self, from: Option<u64>, to: Option<u64>) -> Result<Vec<u64>> {
        let by_node = self.by_node();
        self.diff_with(from, to, &by_node)
    }

    /// The exception index transposed to (node, chunk), as `ByNode` keeps it.
    fn by_node(&self) -> BTreeSet<(NodeId, u64)> {
        self.exc.map.keys().map(|&(c, n)| (n, c)).collect()
    }

    /// `diff`, with the transposed index made once for many diffs.
    fn diff_with(
        &mut self,
        from: Option<u64>,
        to: Option<u64>,
        by_node: &BTreeSet<(NodeId, u64)>,
    ) -> Result<Vec<u64>> {
        let (a, b) = (self.side(from)?, self.side(to)?);
        let keys = self.tree.diff_keys(a, b, None)?;
        let (Some(first), Some(last)) = (keys.first(), self.chunks.checked_sub(1)) else {
            return Ok(Vec::new());
        };
        let mut candidates = Vec::new();
        let mut at = Some((0, first));
        while let Some(key) = at {
            let Some((&(c, n), _)) = self.exc.map.range(key..).next() else {
                break;
            };
            if c > last {
                break;
            }
            let (candidate, next) = next_step(&keys, c, n, last);
            if candidate {
                candidates.push(c);
            }
            at = next;
        }
        let gathered = candidates_by_node(by_node, &keys, last);
        if gathered != candidates {
            return Err(Error::Invalid(format!(
                "diff {from:?} {to:?}: the walk by chunk finds {candidates:?}, by node {gathered:?}"
            )));
        }
        let mut out = Vec::new();
        for c in candidates {
            let x = self.tree.diff_source(a, c, &mut self.exc, None)?;
            let y = self.tree.diff_source(b, c, &mut self.exc, None)?;
            if !same_content(x, y) {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// `diff` of every pair of versions against the naive model: it
    /// reports a chunk exactly when the two versions read different
    /// physical copies. So a chunk whose content differs is never missed
    /// (one copy holds one content), and one reported with equal content
    /// is one the metadata cannot tell: two copies that happen to hold the
    /// same bytes. Values written here are unique, so that happens only
    /// with zeros (a zeroed snapshot chunk against an origin or copy still
    /// holding the initial zeros) and after a rollback (the origin rewritten
    /// in place with what the snapshot reads from its copy). Every case
    /// where both read one copy, both zeros, or both the origin in place
    /// must report nothing.
    pub fn check_diff(&mut self, naive: &Naive) -> std::result::Result<DiffTally, String> {
        let mut versions: Vec<Option<u64>> = vec![None];
        versions.extend(naive.versions.keys().map(|t| Some(*t)));
        let mut tally = DiffTally::default();
        let by_node = self.by_node();
        for (i, &from) in versions.iter().enumerate() {
            for &to in &versions[i..] {
                let got = self
                    .diff_with(from, to, &by_node)
                    .map_err(|e| e.to_string())?;
                tally.pairs += 1;
                for c in 0..self.chunks as usize {
                    let (x, y) = (naive.chunk(from, c), naive.chunk(to, c));
                    let reported = got.binary_search(&(c as u64)).is_ok();
                    if reported != (x.copy != y.copy) {
                        return Err(format!(
                            "diff {from:?} {to:?} chunk {c}: reported {reported}, but the model reads {:?} and {:?}",
                            x.copy, y.copy
                        ));
                    }
                    if x.content != y.content && !reported {
                        return Err(format!("diff {from:?} {to:?} missed chunk {c}"));
                    }
                    tally.reported += u64::from(reported);
                    if reported && x.content == y.content {
                        match x.content == [0, 0] {
                            true => tally.unchanged_zero += 1,
                            false => tally.unchanged_other += 1,
                        }
                    }
                }
            }
        }
        Ok(tally)
    }

    /// Compare with the naive model and check the structural invariants.
    pub fn check(&mut self, naive: &Naive) -> std::result::Result<(), String> {
        let live: BTreeSet<u64> = self.tree.tags.keys().copied().collect();
        let want: BTreeSet<u64> = naive.versions.keys().copied().collect();
        if live != want {
            return Err(format!("live tags {live:?}, model {want:?}"));
        }
        for c in 0..self.chunks {
            let got = self.read(None, c).map_err(|e| e.to_string())?;
            if got != naive.origin[c as usize] {
                return Err(format!(
                    "origin chunk {c}: {got:?} want {:?}",
                    naive.origin[c as usize]
                ));
            }
            for (t, arr) in &naive.versions {
                let got = self.read(Some(*t), c).map_err(|e| e.to_string())?;
                if got != arr[c as usize].content {
                    return Err(format!(
                        "tag {t} chunk {c}: {got:?} want {:?}",
                        arr[c as usize].content
                    ));
                }
            }
        }
        self.check_usage(naive)?;
        self.check_structure()
    }

    /// Each user-visible snapshot's (own, shared) chunks, by the tree's
    /// accounting (`vtree::usage`, as the store's `status` computes them).
    pub fn usage(&self) -> Result<UsageByTag> {
        let mut per_leaf: HashMap<NodeId, LeafUsage> = HashMap::new();
        let mut exc = Vec::new();
        for c in 0..self.chunks {
            exc.clear();
            let at_chunk = self.exc.map.range((c, 0)..=(c, MAX_NODE));
            exc.extend(at_chunk.map(|((_, node), val)| (*node, *val)));
            account_chunk(&self.tree, c, &exc, &mut per_leaf)?;
        }
        let visible = self
            .tree
            .tags
            .iter()
            .filter(|(_, leaf)| !self.tree.nodes[*leaf].hidden);
        let mut out: UsageByTag = visible
            .map(|(tag, leaf)| {
                let u = per_leaf.get(leaf).copied().unwrap_or_default();
                (*tag, u.own, u.shared)
            })
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    fn check_usage(&self, naive: &Naive) -> std::result::Result<(), String> {
        let got = self.usage().map_err(|e| e.to_string())?;
        let want = naive.usage();
        if got != want {
            return Err(format!(
                "(tag, own, shared): {got:?}, model of copies {want:?}"
            ));
        }
        Ok(())
    }

    fn check_structure(&self) -> std::result::Result<(), String> {
        let mut seen = BTreeSet::new();
        for (&(c, node), &val) in &self.exc.map {
            if node == ORIGIN || !self.tree.nodes.contains_key(&node) {
                return Err(format!(
                    "exception at chunk {c} keyed by missing node {node:#x}"
                ));
            }
            if val != ZERO_CHUNK && !seen.insert(val) {
                return Err(format!("data chunk {val} mapped twice"));
            }
        }
        if seen.len() != self.data.len() {
            return Err(format!(
                "{} data chunks allocated, {} referenced",
                self.data.len(),
                seen.len()
            ));
        }
        if self.last_copies > 1 {
            return Err("an origin write made more than one copy".into());
        }
        if self.pass.is_none() && !self.tree.has_flagged() {
            for &(c, node) in self.exc.map.keys() {
                if !self.tree.is_live(node) || self.tree.merge_target(node).is_some() {
                    return Err(format!(
                        "cleaned tree keeps an exception of {node:#x} at {c}"
                    ));
                }
            }
        }
        let rebuilt = VTree::from_records(self.tree.nodes.values().cloned().collect())
            .map_err(|e| format!("records do not rebuild: {e}"))?;
        for (id, n) in &self.tree.nodes {
            let r = &rebuilt.nodes[id];
            if r.live_children != n.live_children {
                return Err(format!(
                    "node {id:#x}: live count {} rebuilt as {}",
                    n.live_children, r.live_children
                ));
            }
        }
        // The flag index is exact after every operation, and the one an
        // open rebuilds from the records is the same.
        self.tree.verify_flag_index()?;
        if rebuilt.flag_index != self.tree.flag_index {
            return Err("the flag index differs after rebuild".into());
        }
        if rebuilt.spine_top != self.tree.spine_top {
            return Err("spine top differs after rebuild".into());
        }
        Ok(())
    }
}

/// `VTree::finish_pass` as it was before the flag index: walk every node
/// until none flagged before the pass is removable. The indexed one must
/// reach the same tree and report the same changes.
fn finish_pass_by_scan(tree: &mut VTree, pass_gen: u64) -> Changes {
    let mut ch = Changes::default();
    loop {
        let ready: Vec<NodeId> = tree
            .nodes
            .values()
            .filter(|n| n.flagged && n.flag_gen < pass_gen)
            .map(|n| n.id)
            .filter(|id| tree.removable(*id))
            .collect();
        if ready.is_empty() {
            break;
        }
        for id in ready {
            if tree.nodes.contains_key(&id) && tree.removable(id) {
                tree.remove_node(id, &mut ch);
            }
        }
    }
    ch.updated.retain(|id| tree.nodes.contains_key(id));
    ch.updated.sort_unstable();
    ch.updated.dedup();
    ch
}

fn same_finish(
    got_tree: &VTree,
    mut got: Changes,
    want_tree: &VTree,
    mut want: Changes,
) -> std::result::Result<(), String> {
    got.removed.sort_unstable();
    want.removed.sort_unstable();
    if got != want {
        return Err(format!(
            "finish_pass changed {got:x?}, a walk over every node {want:x?}"
        ));
    }
    if got_tree.nodes != want_tree.nodes || got_tree.spine_top != want_tree.spine_top {
        return Err("finish_pass left another tree than a walk over every node".into());
    }
    Ok(())
}

/// The candidates found as the store's gather over `ByNode` finds them
/// (`store/diff_by_node.rs`): the transposed index walked node range by
/// node range with `DiffKeys::step`'s seeks; ascending and distinct.
fn candidates_by_node(by_node: &BTreeSet<(NodeId, u64)>, keys: &DiffKeys, last: u64) -> Vec<u64> {
    let mut found = BTreeSet::new();
    let mut at = keys.first().map(|n| (n, 0));
    while let Some(key) = at {
        let Some(&(n, c)) = by_node.range(key..).next() else {
            break;
        };
        at = match keys.step(n) {
            Step::NextChunk => None,
            Step::SeekNode(lo) => Some((lo, 0)),
            Step::Candidate if c > last => n.checked_add(1).map(|n| (n, 0)),
            Step::Candidate => {
                found.insert(c);
                Some((n, c + 1))
            }
        };
    }
    found.into_iter().collect()
}
