//! B+trees over the page cache: u128 keys, fixed-size values per tree.
//!
//! Pages are edited in place in the cache; the journal (not shadowing) makes
//! the edits atomic. Inserts split full nodes (a root split grows the tree);
//! removes free empty nodes and collapse a root with one child, but do not
//! rebalance underfull nodes. Internal keys are lower bounds of their
//! child's subtree, kept so by lowering key 0 on the way down when an insert
//! goes below every key.

use super::imp::{tree_id, tree_index, Meta, Role};
use super::Tree;
use crate::dev::BlockDev;
use crate::error::{Error, Result};
use crate::format::{node, TreeRoot};

/// Entry size of internal nodes (key + child).
const IESZ: usize = 24;

/// Internal nodes from the root down to (not including) the leaf, each with
/// the index of the child taken.
type Path = Vec<(u64, usize)>;

fn node_role(tree: Tree, level: u32) -> Role {
    Role::Node { tree, level }
}

impl<D: BlockDev> Meta<D> {
    fn root(&self, t: Tree) -> TreeRoot {
        self.st.roots[tree_index(t)]
    }

    fn set_root(&mut self, t: Tree, r: TreeRoot) {
        self.st.roots[tree_index(t)] = r;
        self.state_dirty = true;
    }

    fn tree_err(t: Tree, block: u64, reason: &str) -> Error {
        Error::CorruptTree {
            tree: t.name(),
            block,
            key_lo: 0,
            key_hi: u128::MAX,
            reason: reason.into(),
        }
    }

    /// Descend from the root towards `key`. Returns the internal path and the
    /// leaf block. With `lower_key0`, an insert below every key lowers the
    /// first key of each node on the way (keeps keys as lower bounds).
    fn descend(&mut self, t: Tree, key: u128, lower_key0: bool) -> Result<(Path, u64)> {
        let r = self.root(t);
        let mut path = Path::with_capacity(r.height as usize);
        let mut b = r.block;
        let mut level = r.height - 1;
        while level > 0 {
            if !self.layout.in_area(b) {
                return Err(Self::tree_err(
                    t,
                    b,
                    "child pointer outside the allocation area",
                ));
            }
            let p = &self.page(b, node_role(t, level))?.buf;
            let n = node::count(p);
            if n == 0 {
                return Err(Self::tree_err(t, b, "empty internal node"));
            }
            let i = node::child_index(p, n, key);
            let child = node::child_at(&p[..], i);
            if lower_key0 && i == 0 && key < node::key_at(&p[..], 0, IESZ) {
                node::set_key(self.page_mut(b, node_role(t, level))?, 0, IESZ, key);
            }
            path.push((b, i));
            b = child;
            level -= 1;
        }
        if !self.layout.in_area(b) {
            return Err(Self::tree_err(
                t,
                b,
                "leaf pointer outside the allocation area",
            ));
        }
        Ok((path, b))
    }

    fn leaf_esz(t: Tree) -> usize {
        node::entry_size(0, t.value_size())
    }

    pub(super) fn tree_get(&mut self, t: Tree, key: u128) -> Result<Option<Vec<u8>>> {
        let (_, leaf) = self.descend(t, key, false)?;
        let esz = Self::leaf_esz(t);
        let p = &self.page(leaf, node_role(t, 0))?.buf;
        let n = node::count(p);
        Ok(node::search(p, n, esz, key)
            .ok()
            .map(|i| node::value_at(p, i, esz).to_vec()))
    }

    /// Entries with lo <= key <= hi, ascending, at most `limit`. Visits only
    /// the leaves that hold them (plus one step past an exhausted leaf).
    pub(super) fn tree_range(
        &mut self,
        t: Tree,
        lo: u128,
        hi: u128,
        limit: usize,
    ) -> Result<Vec<(u128, Vec<u8>)>> {
        let mut out = Vec::new();
        if lo > hi || limit == 0 {
            return Ok(out);
        }
        let esz = Self::leaf_esz(t);
        let (mut path, mut leaf) = self.descend(t, lo, false)?;
        let mut i = {
            let p = &self.page(leaf, node_role(t, 0))?.buf;
            node::search(p, node::count(p), esz, lo).unwrap_or_else(|i| i)
        };
        loop {
            let p = &self.page(leaf, node_role(t, 0))?.buf;
            let n = node::count(p);
            while i < n {
                let k = node::key_at(&p[..], i, esz);
                if k > hi {
                    return Ok(out);
                }
                out.push((k, node::value_at(p, i, esz).to_vec()));
                if out.len() >= limit {
                    return Ok(out);
                }
                i += 1;
            }
            match self.next_leaf(t, &mut path, hi)? {
                Some(b) => {
                    leaf = b;
                    i = 0;
                }
                None => return Ok(out),
            }
        }
    }

    /// Advance `path` to the next leaf to the right. None at the end of the
    /// tree, or when the next subtree's lower bound is already past `hi`.
    fn next_leaf(&mut self, t: Tree, path: &mut Path, hi: u128) -> Result<Option<u64>> {
        let height = self.root(t).height;
        while let Some((pb, pi)) = path.pop() {
            let level = height - 1 - path.len() as u32;
            let p = &self.page(pb, node_role(t, level))?.buf;
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
                if !self.layout.in_area(b) {
                    return Err(Self::tree_err(
                        t,
                        b,
                        "child pointer outside the allocation area",
                    ));
                }
                let p = &self.page(b, node_role(t, l))?.buf;
                if node::count(p) == 0 {
                    return Err(Self::tree_err(t, b, "empty internal node"));
                }
                path.push((b, 0));
                b = node::child_at(&p[..], 0);
                l -= 1;
            }
            if !self.layout.in_area(b) {
                return Err(Self::tree_err(
                    t,
                    b,
                    "leaf pointer outside the allocation area",
                ));
            }
            return Ok(Some(b));
        }
        Ok(None)
    }

    pub(super) fn tree_insert(&mut self, t: Tree, key: u128, val: &[u8]) -> Result<()> {
        self.writable()?;
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
        let height = self.root(t).height;
        if self.available_blocks() < u64::from(height) + 1 {
            return Err(Error::NoSpace);
        }
        let (mut path, leaf) = self.descend(t, key, true)?;
        let esz = Self::leaf_esz(t);
        let p = self.page_mut(leaf, node_role(t, 0))?;
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
        self.split_upwards(t, &mut path, leaf, pos, entry)
    }

    /// `cur` (at level 0) is full and `entry` belongs at `pos`: split it and
    /// push separators up the path, splitting parents as needed.
    fn split_upwards(
        &mut self,
        t: Tree,
        path: &mut Path,
        mut cur: u64,
        mut pos: usize,
        mut entry: Vec<u8>,
    ) -> Result<()> {
        let mut level = 0u32;
        loop {
            let (sep, right) = self.split_insert(t, cur, level, pos, &entry)?;
            level += 1;
            entry = node::internal_entry(sep, right);
            match path.pop() {
                Some((pb, pi)) => {
                    let p = self.page_mut(pb, node_role(t, level))?;
                    if node::count(p) < node::capacity(level, 8) {
                        node::insert_at(p, pi + 1, &entry);
                        return Ok(());
                    }
                    cur = pb;
                    pos = pi + 1;
                }
                None => return self.grow_root(t, cur, level, sep, right),
            }
        }
    }

    fn grow_root(&mut self, t: Tree, left: u64, level: u32, sep: u128, right: u64) -> Result<()> {
        let left_key = {
            let lp = &self.page(left, node_role(t, level - 1))?.buf;
            node::key_at(&lp[..], 0, node::entry_size(level - 1, t.value_size()))
        };
        let nr = self.alloc_meta_block()?;
        let mut p = crate::format::new_page();
        node::init_node(&mut p, nr, tree_id(t), level, 8);
        node::insert_at(&mut p, 0, &node::internal_entry(left_key.min(sep), left));
        node::insert_at(&mut p, 1, &node::internal_entry(sep, right));
        self.install_new(nr, p);
        self.set_root(
            t,
            TreeRoot {
                block: nr,
                height: level + 1,
            },
        );
        Ok(())
    }

    fn install_new(&mut self, b: u64, buf: Box<crate::format::Page>) {
        self.cache
            .insert(b, super::imp::CachePage { buf, checked: true });
        self.dirty.insert(b);
    }

    /// Split full node `cur` while inserting `entry` at `pos`. Returns the
    /// separator (first key of the new right node) and the right node.
    fn split_insert(
        &mut self,
        t: Tree,
        cur: u64,
        level: u32,
        pos: usize,
        entry: &[u8],
    ) -> Result<(u128, u64)> {
        let right = self.alloc_meta_block()?;
        let esz = entry.len();
        let vs = if level == 0 { t.value_size() } else { 8 };
        let p = self.page_mut(cur, node_role(t, level))?;
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
        node::init_node(p, cur, tree_id(t), level, vs);
        node::set_entries(p, l, esz);
        let mut rp = crate::format::new_page();
        node::init_node(&mut rp, right, tree_id(t), level, vs);
        node::set_entries(&mut rp, r, esz);
        let sep = node::key_at(&rp[..], 0, esz);
        self.install_new(right, rp);
        Ok((sep, right))
    }

    pub(super) fn tree_remove(&mut self, t: Tree, key: u128) -> Result<bool> {
        self.writable()?;
        let (mut path, leaf) = self.descend(t, key, false)?;
        let esz = Self::leaf_esz(t);
        let i = {
            let p = &self.page(leaf, node_role(t, 0))?.buf;
            match node::search(p, node::count(p), esz, key) {
                Ok(i) => i,
                Err(_) => return Ok(false),
            }
        };
        let p = self.page_mut(leaf, node_role(t, 0))?;
        node::remove_at(p, i, esz);
        if node::count(p) == 0 && !path.is_empty() {
            self.free_meta_block(leaf)?;
            self.unlink_upwards(t, &mut path)?;
        }
        self.collapse_root(t)?;
        Ok(true)
    }

    /// The child at the end of `path` was freed: drop its entry from the
    /// parent, freeing parents that become empty.
    fn unlink_upwards(&mut self, t: Tree, path: &mut Path) -> Result<()> {
        let height = self.root(t).height;
        while let Some((pb, pi)) = path.pop() {
            let level = height - 1 - path.len() as u32;
            let p = self.page_mut(pb, node_role(t, level))?;
            node::remove_at(p, pi, IESZ);
            if node::count(p) > 0 {
                return Ok(());
            }
            if path.is_empty() {
                // The root lost its last child: it becomes an empty leaf.
                node::init_node(p, pb, tree_id(t), 0, t.value_size());
                self.set_root(
                    t,
                    TreeRoot {
                        block: pb,
                        height: 1,
                    },
                );
                return Ok(());
            }
            self.free_meta_block(pb)?;
        }
        Ok(())
    }

    fn collapse_root(&mut self, t: Tree) -> Result<()> {
        loop {
            let r = self.root(t);
            if r.height <= 1 {
                return Ok(());
            }
            let p = &self.page(r.block, node_role(t, r.height - 1))?.buf;
            if node::count(p) != 1 {
                return Ok(());
            }
            let child = node::child_at(&p[..], 0);
            if !self.layout.in_area(child) {
                return Err(Self::tree_err(
                    t,
                    r.block,
                    "child pointer outside the allocation area",
                ));
            }
            self.free_meta_block(r.block)?;
            self.set_root(
                t,
                TreeRoot {
                    block: child,
                    height: r.height - 1,
                },
            );
        }
    }
}
