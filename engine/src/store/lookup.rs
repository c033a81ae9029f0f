//! Metadata lookups that do not serialise: the data path resolves chunks
//! under the metadata lock held *shared*, so reads and write plans of
//! different chunks run side by side, and no lookup reads the device under
//! that lock.
//!
//! A lookup runs against the page cache as it is (`Meta::get_cached`). If
//! it needs a page the cache does not hold it fails with
//! `Error::NotCached`; `Inner::lookup` then drops every lock, reads the
//! page (`PageFetcher`), offers it to the cache under the write lock for an
//! instant (`Meta::insert_fetched`, which drops it if a checkpoint or a
//! free raced with the read), and runs the lookup again. A lookup is pure,
//! so running it again is always safe.
//!
//! Progress: each round either completes or brings one more page in. Only
//! a cache budget far below the concurrent working set can make rounds
//! evict each other's pages; after `SHARED_ROUNDS` the lookup completes
//! under the write lock, loading what it misses and keeping it until the
//! lookup is done (`Meta::load_unevicted`, `CacheStats::locked_misses`).

use super::inner::{val_u64, Inner, MetaState, OriginRt};
use super::records::{exc_key, split_key, RollbackState};
use crate::error::{Error, Result};
use crate::meta::{Reserved, Tree};
use crate::sync;
use crate::vtree::{self, ExcView, NodeId, VTree, RB_MARK, SPINE_BIT};

/// Rounds of fetch-and-retry before a lookup falls back to loading under
/// the write lock.
const SHARED_ROUNDS: usize = 16;

/// An `ExcView` over one origin's exceptions, under the shared lock.
pub struct CachedExcView<'a> {
    md: &'a MetaState,
    origin: u32,
}

impl ExcView for CachedExcView<'_> {
    fn get(&mut self, chunk: u64, node: NodeId) -> Result<Option<u64>> {
        self.md.get_exc_cached(self.origin, chunk, node)
    }

    fn seek_spine(&mut self, chunk: u64, from: NodeId) -> Result<Option<(NodeId, u64)>> {
        let lo = exc_key(self.origin, chunk, from.max(SPINE_BIT));
        let hi = exc_key(self.origin, chunk, vtree::MAX_NODE);
        match self.md.meta.seek_cached(Tree::Exceptions, lo, hi)? {
            Some((k, v)) => {
                let val = self.md.checked(k, val_u64(&v)?)?;
                Ok(Some((split_key(k).2, val)))
            }
            None => Ok(None),
        }
    }
}

impl MetaState {
    pub fn cached_view(&self, origin: u32) -> CachedExcView<'_> {
        CachedExcView { md: self, origin }
    }

    pub fn get_exc_cached(&self, o: u32, c: u64, n: NodeId) -> Result<Option<u64>> {
        let key = exc_key(o, c, n);
        match self.meta.get_u64_cached(Tree::Exceptions, key)? {
            Some(v) => Ok(Some(self.checked(key, v)?)),
            None => Ok(None),
        }
    }

    /// Whether chunk `c` of origin `o` still waits for the rollback copier.
    pub fn rollback_pending(&self, o: u32, c: u64) -> Result<Option<RollbackState>> {
        match self.app.rollback {
            Some(rb) if rb.origin == o && c >= rb.cursor => {
                Ok(match self.get_exc_cached(o, c, RB_MARK)? {
                    Some(_) => None,
                    None => Some(rb),
                })
            }
            _ => Ok(None),
        }
    }
}

impl Inner {
    /// Reserve `n` chunks or none: on ENOSPC, give back what was taken.
    /// Reservations change nothing a commit writes; each becomes an
    /// allocation only with its mapping (`MetaState::map_fresh`), so a
    /// commit by another thread while this operation does its I/O cannot
    /// make the allocation durable alone.
    pub fn reserve(&self, n: usize) -> Result<Vec<Reserved>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut md = sync::write(&self.md);
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            match md.meta.reserve_chunk() {
                Ok(r) => got.push(r),
                Err(e) => {
                    md.release_all(got)?;
                    return Err(e);
                }
            }
        }
        Ok(got)
    }

    /// Run the pure lookup `f` over origin `o`'s version tree and the
    /// metadata, both under shared locks, reading missed pages with no
    /// lock held (see the module docs).
    pub fn lookup<T>(
        &self,
        o: &OriginRt,
        mut f: impl FnMut(&VTree, &MetaState) -> Result<T>,
    ) -> Result<T> {
        // Lock order everywhere: the version tree, then the metadata.
        self.lookup_under(|| sync::read(&o.tree), |tree, md| f(tree, md))
    }

    /// `lookup` over the metadata alone.
    pub fn lookup_meta<T>(&self, mut f: impl FnMut(&MetaState) -> Result<T>) -> Result<T> {
        self.lookup_under(|| (), |_, md| f(md))
    }

    /// The fetch-and-retry loop, with `outer` (a guard taken before the
    /// metadata lock, and dropped with it before any fetch) passed to `f`.
    fn lookup_under<G, T>(
        &self,
        outer: impl Fn() -> G,
        mut f: impl FnMut(&G, &MetaState) -> Result<T>,
    ) -> Result<T> {
        for _ in 0..SHARED_ROUNDS {
            let (miss, fetcher) = {
                let guard = outer();
                let md = sync::read(&self.md);
                match f(&guard, &md) {
                    Err(Error::NotCached(miss)) => (miss, md.meta.fetcher()),
                    r => return r,
                }
            };
            let page = fetcher.fetch(miss);
            sync::write(&self.md).meta.insert_fetched(page)?;
        }
        let guard = outer();
        let mut md = sync::write(&self.md);
        let r = loop {
            match f(&guard, &md) {
                Err(Error::NotCached(miss)) => {
                    if let Err(e) = md.meta.load_unevicted(miss) {
                        break Err(e);
                    }
                }
                r => break r,
            }
        };
        md.meta.trim_cache();
        r
    }
}
