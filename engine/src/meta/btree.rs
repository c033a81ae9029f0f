//! B+trees over the page cache: u128 keys, fixed-size values per tree.
//!
//! Pages are edited in place in the cache; the journal (not shadowing) makes
//! the edits atomic. Inserts split full nodes (a root split grows the tree);
//! removes free empty nodes and collapse a root with one child, but do not
//! rebalance underfull nodes. Internal keys are lower bounds of their
//! child's subtree, kept so by lowering key 0 on the way down when an insert
//! goes below every key.
//!
//! `Roots` owns the three roots (part of the state page); a `BTree` borrows
//! one tree's root, the page cache and the space map (tree pages are
//! allocated from and freed to it) for one operation.

use super::page_cache::{PageCache, Role};
use super::space_map::SpaceMap;
use super::types::Tree;
use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::{self, node, Layout, Page, TreeRoot, TREES};

/// Entry size of internal nodes (key + child).
const IESZ: usize = 24;

/// Internal nodes from the root down to (not including) the leaf, each with
/// the index of the child taken.
type Path = Vec<(u64, usize)>;

/// What a walk (`Meta::walk_cached`) does after visiting an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    /// Go on to the next entry.
    Next,
    /// Skip to the first entry whose key is >= this one (which must be
    /// greater than the key just visited).
    Seek(u128),
    Stop,
}

/// The roots of the trees, kept in the state page.
pub(super) struct Roots {
    roots: [TreeRoot; TREES],
    /// A root changed since the state page was last encoded.
    changed: bool,
}

impl Roots {
    pub(super) fn new(roots: [TreeRoot; TREES]) -> Self {
        Roots {
            roots,
            changed: false,
        }
    }

    pub(super) fn get(&self, t: Tree) -> TreeRoot {
        self.roots[t.index()]
    }

    /// The root of a tree an operation is about to use: it must exist
    /// (the store asks `Meta::has_tree` before it touches `ByNode`).
    pub(super) fn existing(&self, t: Tree) -> TreeRoot {
        let r = self.roots[t.index()];
        assert!(r.exists(), "operation on the absent {} tree", t.name());
        r
    }

    /// All of them, in state page order.
    pub(super) fn all(&self) -> [TreeRoot; TREES] {
        self.roots
    }

    fn set(&mut self, t: Tree, r: TreeRoot) {
        self.roots[t.index()] = r;
        self.changed = true;
    }

    /// Whether the state page must be encoded again for the roots.
    pub(super) fn changed(&self) -> bool {
        self.changed
    }

    /// The state page was encoded with the current roots.
    pub(super) fn state_encoded(&mut self) {
        self.changed = false;
    }
}

/// One tree, borrowed for one operation.
pub(super) struct BTree<'a, D: BlockDev> {
    tree: Tree,
    layout: &'a Layout,
    roots: &'a mut Roots,
    cache: &'a mut PageCache<D>,
    space: &'a mut SpaceMap,
}

impl<'a, D: BlockDev> BTree<'a, D> {
    pub(super) fn new(
        tree: Tree,
        layout: &'a Layout,
        roots: &'a mut Roots,
        cache: &'a mut PageCache<D>,
        space: &'a mut SpaceMap,
    ) -> Self {
        BTree {
            tree,
            layout,
            roots,
            cache,
            space,
        }
    }
}

// ---- lookups ----

/// Where a lookup gets its pages: the cache under exclusive access (a miss
/// loads), or under shared access (`Shared`: a miss is `Error::NotCached`).
pub(super) trait PageSource {
    fn page(&mut self, block: u64, role: Role) -> Result<&Page>;
}

impl<D: BlockDev> PageSource for PageCache<D> {
    fn page(&mut self, block: u64, role: Role) -> Result<&Page> {
        PageCache::page(self, block, role)
    }
}

/// The cache under shared access.
pub(super) struct Shared<'a, D: BlockDev>(pub(super) &'a PageCache<D>);

impl<D: BlockDev> PageSource for Shared<'_, D> {
    fn page(&mut self, block: u64, role: Role) -> Result<&Page> {
        self.0.cached_page(block, role)
    }
}

/// Read-only walks of one tree, over either page source.
pub(super) struct TreeReader<'a, P: PageSource> {
    tree: Tree,
    layout: &'a Layout,
    root: TreeRoot,
    pages: &'a mut P,
}

impl<'a, P: PageSource> TreeReader<'a, P> {
    pub(super) fn new(tree: Tree, layout: &'a Layout, root: TreeRoot, pages: &'a mut P) -> Self {
        TreeReader {
            tree,
            layout,
            root,
            pages,
        }
    }

    fn role(&self, level: u32) -> Role {
        node_role(self.tree, level)
    }

    fn err(&self, block: u64, reason: &str) -> Error {
        tree_error(self.tree, block, reason)
    }

    /// A pointer read from a page must lie in the allocation area.
    fn check_pointer(&self, b: u64, what: &str) -> Result<()> {
        if !self.layout.in_area(b) {
            return Err(self.err(b, &format!("{what} pointer outside the allocation area")));
        }
        Ok(())
    }

    fn leaf_esz(&self) -> usize {
        leaf_entry_size(self.tree)
    }

    /// Descend from the root towards `key`. Returns the internal path and
    /// the leaf block (not read yet).
    pub(super) fn descend(&mut self, key: u128) -> Result<(Path, u64)> {
        let r = self.root;
        let mut path = Path::with_capacity(r.height as usize);
        let mut b = r.block;
        let mut level = r.height - 1;
        while level > 0 {
            self.check_pointer(b, "child")?;
            let role = self.role(level);
            let p = self.pages.page(b, role)?;
            let n = node::count(p);
            if n == 0 {
                return Err(self.err(b, "empty internal node"));
            }
            let i = node::child_index(p, n, key);
            path.push((b, i));
            b = node::child_at(&p[..], i);
            level -= 1;
        }
        self.check_pointer(b, "leaf")?;
        Ok((path, b))
    }

    pub(super) fn get(&mut self, key: u128) -> Result<Option<Vec<u8>>> {
        let (_, leaf) = self.descend(key)?;
        let esz = self.leaf_esz();
        let p = self.pages.page(leaf, self.role(0))?;
        let n = node::count(p);
        Ok(node::search(p, n, esz, key)
            .ok()
            .map(|i| node::value_at(p, i, esz).to_vec()))
    }

    /// Entries with lo <= key <= hi, ascending, at most `limit`. Visits only
    /// the leaves that hold them (plus one step past an exhausted leaf):
    /// a walk that never skips.
    pub(super) fn range(
        &mut self,
        lo: u128,
        hi: u128,
        limit: usize,
    ) -> Result<Vec<(u128, Vec<u8>)>> {
        let mut out = Vec::new();
        if lo > hi || limit == 0 {
            return Ok(out);
        }
        self.walk(lo, hi, &mut |k, v| {
            out.push((k, v.to_vec()));
            Ok(match out.len() >= limit {
                true => Walk::Stop,
                false => Walk::Next,
            })
        })?;
        Ok(out)
    }

    /// Visit the entries with lo <= key <= hi in ascending order; after
    /// each, `visit` says whether to go on to the next, stop, or skip ahead
    /// to the first key >= its target. A skip that stays within the
    /// current leaf is a binary search there; only a longer one descends
    /// from the root again. So a walk that jumps over most of the entries
    /// (the diff's, which looks only at a few nodes of each chunk) costs
    /// the entries it lands on, not the ones it passes.
    pub(super) fn walk(
        &mut self,
        lo: u128,
        hi: u128,
        visit: &mut dyn FnMut(u128, &[u8]) -> Result<Walk>,
    ) -> Result<()> {
        let esz = self.leaf_esz();
        let mut target = lo;
        'descend: while target <= hi {
            let (mut path, mut leaf) = self.descend(target)?;
            let mut i = {
                let p = self.pages.page(leaf, self.role(0))?;
                node::search(p, node::count(p), esz, target).unwrap_or_else(|i| i)
            };
            loop {
                let p = self.pages.page(leaf, self.role(0))?;
                let n = node::count(p);
                while i < n {
                    let k = node::key_at(&p[..], i, esz);
                    if k > hi {
                        return Ok(());
                    }
                    match visit(k, node::value_at(p, i, esz))? {
                        Walk::Next => i += 1,
                        Walk::Stop => return Ok(()),
                        Walk::Seek(t) if t <= k => {
                            return Err(Error::Invalid(format!(
                                "a walk may only skip forward ({t:#x} after {k:#x})"
                            )))
                        }
                        Walk::Seek(t) if t <= node::key_at(&p[..], n - 1, esz) => {
                            // Within this leaf: past i, at or before the last entry.
                            i = match node::search(p, n, esz, t) {
                                Ok(j) | Err(j) => j,
                            };
                        }
                        Walk::Seek(t) => {
                            target = t;
                            continue 'descend;
                        }
                    }
                }
                match self.next_leaf(&mut path, hi)? {
                    Some(b) => {
                        leaf = b;
                        i = 0;
                    }
                    None => return Ok(()),
                }
            }
        }
        Ok(())
    }

    /// Advance `path` to the next leaf to the right. None at the end of the
    /// tree, or when the next subtree's lower bound is already past `hi`.
    fn next_leaf(&mut self, path: &mut Path, hi: u128) -> Result<Option<u64>> {
        let height = self.root.height;
        while let Some((pb, pi)) = path.pop() {
            let level = height - 1 - path.len() as u32;
            let p = self.pages.page(pb, self.role(level))?;
            if pi + 1 >= node::count(p) {
                continue;
            }
            if node::key_at(&p[..], pi + 1, IESZ) > hi {
                return Ok(None);
            }
            let mut b = node::child_at(&p[..], pi + 1);
            path.push((pb, pi + 1));
            let mut l = level - 1;
            while l > 0 {
                self.check_pointer(b, "child")?;
                let p = self.pages.page(b, self.role(l))?;
                if node::count(p) == 0 {
                    return Err(self.err(b, "empty internal node"));
                }
                path.push((b, 0));
                b = node::child_at(&p[..], 0);
                l -= 1;
            }
            self.check_pointer(b, "leaf")?;
            return Ok(Some(b));
        }
        Ok(None)
    }
}

/// What a node of `tree` at `level` is validated as.
fn node_role(tree: Tree, level: u32) -> Role {
    Role::Node { tree, level }
}

fn leaf_entry_size(tree: Tree) -> usize {
    node::entry_size(0, tree.value_size())
}

fn tree_error(tree: Tree, block: u64, reason: &str) -> Error {
    Error::CorruptTree {
        tree: tree.name(),
        block,
        key_lo: 0,
        key_hi: u128::MAX,
        reason: reason.into(),
    }
}

impl<D: BlockDev> BTree<'_, D> {
    fn root(&self) -> TreeRoot {
        self.roots.existing(self.tree)
    }

    fn role(&self, level: u32) -> Role {
        node_role(self.tree, level)
    }

    fn err(&self, block: u64, reason: &str) -> Error {
        tree_error(self.tree, block, reason)
    }

    fn leaf_esz(&self) -> usize {
        leaf_entry_size(self.tree)
    }

    fn reader(&mut self) -> TreeReader<'_, PageCache<D>> {
        TreeReader::new(self.tree, self.layout, self.root(), self.cache)
    }

    /// Descend towards `key` for an insert: an insert below every key
    /// lowers the first key of each node on the way (keys stay lower
    /// bounds). The path is read first, so a failed read changes nothing.
    fn descend_lowering(&mut self, key: u128) -> Result<(Path, u64)> {
        let (path, leaf) = self.reader().descend(key)?;
        let height = self.root().height;
        for (depth, &(b, i)) in path.iter().enumerate() {
            let role = self.role(height - 1 - depth as u32);
            if i == 0 && key < node::key_at(&self.cache.page(b, role)?[..], 0, IESZ) {
                node::set_key(self.cache.page_mut(b, role)?, 0, IESZ, key);
            }
        }
        Ok((path, leaf))
    }

    pub(super) fn get(&mut self, key: u128) -> Result<Option<Vec<u8>>> {
        self.reader().get(key)
    }

    pub(super) fn range(
        &mut self,
        lo: u128,
        hi: u128,
        limit: usize,
    ) -> Result<Vec<(u128, Vec<u8>)>> {
        self.reader().range(lo, hi, limit)
    }
}

// ---- inserts ----

impl<D: BlockDev> BTree<'_, D> {
    /// A fresh tree page: its block from the space map, its content new in
    /// the cache (never read from home).
    fn alloc_page(&mut self) -> Result<u64> {
        self.space.alloc_tree_block(self.cache)
    }

    pub(super) fn insert(&mut self, key: u128, val: &[u8]) -> Result<()> {
        let t = self.tree;
        if val.len() != t.value_size() {
            return Err(Error::Invalid(format!(
                "{} values are {} bytes, got {}",
                t.name(),
                t.value_size(),
                val.len()
            )));
        }
        // Worst case every level splits and the root grows: check up front
        // so an insert never fails half done for lack of space.
        let height = self.root().height;
        if self.space.available_blocks() < u64::from(height) + 1 {
            return Err(Error::NoSpace);
        }
        let (mut path, leaf) = self.descend_lowering(key)?;
        let esz = self.leaf_esz();
        let p = self.cache.page_mut(leaf, self.role(0))?;
        let n = node::count(p);
        let pos = match node::search(p, n, esz, key) {
            Ok(i) => {
                node::set_value(p, i, esz, val);
                return Ok(());
            }
            Err(i) => i,
        };
        let entry = node::leaf_entry(key, val);
        if n < node::capacity(0, t.value_size()) {
            node::insert_at(p, pos, &entry);
            return Ok(());
        }
        self.split_upwards(&mut path, leaf, pos, entry)
    }

    /// `cur` (at level 0) is full and `entry` belongs at `pos`: split it and
    /// push separators up the path, splitting parents as needed.
    fn split_upwards(
        &mut self,
        path: &mut Path,
        mut cur: u64,
        mut pos: usize,
        mut entry: Vec<u8>,
    ) -> Result<()> {
        let mut level = 0u32;
        loop {
            let (sep, right) = self.split_insert(cur, level, pos, &entry)?;
            level += 1;
            entry = node::internal_entry(sep, right);
            match path.pop() {
                Some((pb, pi)) => {
                    let p = self.cache.page_mut(pb, self.role(level))?;
                    if node::count(p) < node::capacity(level, 8) {
                        node::insert_at(p, pi + 1, &entry);
                        return Ok(());
                    }
                    cur = pb;
                    pos = pi + 1;
                }
                None => return self.grow_root(cur, level, sep, right),
            }
        }
    }

    fn grow_root(&mut self, left: u64, level: u32, sep: u128, right: u64) -> Result<()> {
        let t = self.tree;
        let left_key = {
            let lp = self.cache.page(left, self.role(level - 1))?;
            node::key_at(&lp[..], 0, node::entry_size(level - 1, t.value_size()))
        };
        let nr = self.alloc_page()?;
        let mut p = format::new_page();
        node::init_node(&mut p, nr, t.node_id(), level, 8);
        node::insert_at(&mut p, 0, &node::internal_entry(left_key.min(sep), left));
        node::insert_at(&mut p, 1, &node::internal_entry(sep, right));
        self.cache.install_new(nr, p);
        self.roots.set(
            t,
            TreeRoot {
                block: nr,
                height: level + 1,
            },
        );
        Ok(())
    }

    /// Split full node `cur` while inserting `entry` at `pos`. Returns the
    /// separator (first key of the new right node) and the right node.
    fn split_insert(
        &mut self,
        cur: u64,
        level: u32,
        pos: usize,
        entry: &[u8],
    ) -> Result<(u128, u64)> {
        let t = self.tree;
        let right = self.alloc_page()?;
        let esz = entry.len();
        let vs = if level == 0 { t.value_size() } else { 8 };
        let p = self.cache.page_mut(cur, self.role(level))?;
        let n = node::count(p);
        assert_eq!(n, node::capacity(level, vs));
        let mut all = Vec::with_capacity((n + 1) * esz);
        all.extend_from_slice(node::entries(p, 0, pos, esz));
        all.extend_from_slice(entry);
        all.extend_from_slice(node::entries(p, pos, n, esz));
        // Appends (sequential keys) leave the left node full; otherwise halve.
        let left_n = if pos == n { n } else { n.div_ceil(2) };
        let (l, r) = all.split_at(left_n * esz);
        p.fill(0);
        node::init_node(p, cur, t.node_id(), level, vs);
        node::set_entries(p, l, esz);
        let mut rp = format::new_page();
        node::init_node(&mut rp, right, t.node_id(), level, vs);
        node::set_entries(&mut rp, r, esz);
        let sep = node::key_at(&rp[..], 0, esz);
        self.cache.install_new(right, rp);
        Ok((sep, right))
    }
}

// ---- removes ----

impl<D: BlockDev> BTree<'_, D> {
    /// Free a tree page: its block goes back to the space map (revoked in
    /// the journal), its page leaves the cache.
    fn free_page(&mut self, b: u64) -> Result<()> {
        self.space.free_tree_block(self.cache, b)?;
        self.cache.discard(b);
        Ok(())
    }

    pub(super) fn remove(&mut self, key: u128) -> Result<bool> {
        let (mut path, leaf) = self.reader().descend(key)?;
        let esz = self.leaf_esz();
        let i = {
            let p = self.cache.page(leaf, self.role(0))?;
            match node::search(p, node::count(p), esz, key) {
                Ok(i) => i,
                Err(_) => return Ok(false),
            }
        };
        let p = self.cache.page_mut(leaf, self.role(0))?;
        node::remove_at(p, i, esz);
        if node::count(p) == 0 && !path.is_empty() {
            self.free_page(leaf)?;
            self.unlink_upwards(&mut path)?;
        }
        self.collapse_root()?;
        Ok(true)
    }

    /// The child at the end of `path` was freed: drop its entry from the
    /// parent, freeing parents that become empty.
    fn unlink_upwards(&mut self, path: &mut Path) -> Result<()> {
        let t = self.tree;
        let height = self.root().height;
        while let Some((pb, pi)) = path.pop() {
            let level = height - 1 - path.len() as u32;
            let p = self.cache.page_mut(pb, self.role(level))?;
            node::remove_at(p, pi, IESZ);
            if node::count(p) > 0 {
                return Ok(());
            }
            if path.is_empty() {
                // The root lost its last child: it becomes an empty leaf.
                node::init_node(p, pb, t.node_id(), 0, t.value_size());
                self.roots.set(
                    t,
                    TreeRoot {
                        block: pb,
                        height: 1,
                    },
                );
                return Ok(());
            }
            self.free_page(pb)?;
        }
        Ok(())
    }

    fn collapse_root(&mut self) -> Result<()> {
        loop {
            let r = self.root();
            if r.height <= 1 {
                return Ok(());
            }
            let p = self.cache.page(r.block, self.role(r.height - 1))?;
            if node::count(p) != 1 {
                return Ok(());
            }
            let child = node::child_at(&p[..], 0);
            if !self.layout.in_area(child) {
                return Err(self.err(r.block, "child pointer outside the allocation area"));
            }
            self.free_page(r.block)?;
            self.roots.set(
                self.tree,
                TreeRoot {
                    block: child,
                    height: r.height - 1,
                },
            );
        }
    }
}
