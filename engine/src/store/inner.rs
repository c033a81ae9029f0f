//! Shared state of one open store, open/format, and the admin operations.
//!
//! Lock order, outermost first (never taken in another order):
//! `admin` -> origin `gate` -> chunk locks -> origin `tree` -> `md`.
//! The `md` (metadata) mutex is never held across a commit's I/O.

use super::commit::GroupCommit;
use super::locks::ChunkLocks;
use super::records::*;
use super::staging::Staging;
use crate::error::{Error, Result};
use crate::meta::{FormatOptions, Geometry, Meta, Reserved, Tree, ZERO_CHUNK};
use crate::planted::{self, Bug};
use crate::store::api::*;
use crate::sync::{self, Arc, AtomicBool, AtomicU64, Mutex, Ordering, RwLock};
use crate::vtree::{self, Node, NodeId, VTree, SPINE_BIT};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Commit early once a transaction dirties this many pages, so one
/// transaction always fits the journal.
pub const DIRTY_LIMIT: usize = 256;

pub struct OriginRt {
    pub num: u32,
    pub rec: OriginRec,
    /// Private so that every use goes through `dev()`: an absent origin
    /// (lenient read-only open) is never read or written, only refused.
    dev: OriginDev,
    /// Data ops hold it shared; snapshot/delete/rollback-start exclusive.
    pub gate: RwLock<()>,
    pub tree: RwLock<VTree>,
    /// In-place writes completed, and of those, how many a completed
    /// flush covers (see `flush_written`).
    written: AtomicU64,
    flushed: AtomicU64,
    /// A completed write that the next commit's metadata vouches for (a
    /// rollback copy and its mark or cursor; a snapshot's source): the
    /// commit flushes the origin before its journal write. Other in-place
    /// writes wait for a FLUSH, FUA or the periodic flush, as on a disk.
    ordered: AtomicBool,
    pub bound: AtomicBool,
    /// A rollback onto this origin is running (fast path for origin reads).
    pub rb_active: AtomicBool,
}

impl OriginRt {
    pub fn chunks(&self, chunk_size: u64) -> u64 {
        self.rec.size.div_ceil(chunk_size)
    }

    /// An in-place write (or a change a flush must order, such as a
    /// rollback's start) completed on this origin.
    pub fn note_written(&self) {
        self.written.fetch_add(1, Ordering::AcqRel);
    }

    /// As `note_written`, for a write the next commit must not get ahead
    /// of (see `ordered`).
    pub fn note_ordered_write(&self) {
        self.note_written();
        self.ordered.store(true, Ordering::Release);
    }

    /// In a commit, before its journal write (commits run one at a time):
    /// flush if an ordered write is pending.
    pub fn flush_ordered(&self) -> Result<()> {
        match self.ordered.swap(false, Ordering::AcqRel) {
            true => self.flush_written(),
            false => Ok(()),
        }
    }

    /// Make every write completed so far durable. Any thread may call it
    /// (committers, destagers, FLUSHes): it returns only once a flush that
    /// began after those writes has completed, its own or another's. (A
    /// "dirty" flag cleared before flushing would let a second caller
    /// return while the first one's flush is still running.)
    pub fn flush_written(&self) -> Result<()> {
        let written = self.written.load(Ordering::Acquire);
        if self.flushed.load(Ordering::Acquire) >= written {
            return Ok(());
        }
        self.dev()?.flush()?;
        self.flushed.fetch_max(written, Ordering::AcqRel);
        Ok(())
    }

    /// Bytes of chunk `c` inside the origin (the last one may be short).
    pub fn chunk_len(&self, c: u64, chunk_size: u64) -> usize {
        (self.rec.size - c * chunk_size).min(chunk_size) as usize
    }

    /// The origin's device, or `OriginAbsent` if the store was opened without it.
    pub fn dev(&self) -> Result<&Dev> {
        match &self.dev {
            OriginDev::Present(d) => Ok(d),
            OriginDev::Absent(reason) => Err(absent_err(&self.rec, reason)),
        }
    }

    /// Why the device is not open, if it is not.
    pub fn absent(&self) -> Option<&str> {
        match &self.dev {
            OriginDev::Present(_) => None,
            OriginDev::Absent(reason) => Some(reason),
        }
    }
}

fn absent_err(rec: &OriginRec, reason: &str) -> Error {
    Error::OriginAbsent {
        origin: rec.id.clone(),
        path: rec.path.clone(),
        reason: reason.to_string(),
    }
}

/// Everything under the metadata lock (an `RwLock`: lookups share it,
/// see lookup.rs; changes hold it exclusively, for in-memory work and
/// bounded page misses).
pub struct MetaState {
    pub meta: Meta<Dev>,
    pub own: HashMap<NodeId, u64>,
    pub own_dirty: HashSet<NodeId>,
    /// Bumped by every change; group commit waits on it.
    pub gen: u64,
    /// Exceptions removed (deleted, or moved by the cleaner) since open.
    /// Only a removal can hide, from a reader that spans several lock
    /// holds, an exception that was there when it began: such a reader
    /// (a diff's gather over `ByNode`) compares it.
    removals: u64,
    /// Stopped when a metadata update fails half-way.
    pub gc: Arc<GroupCommit>,
    pub app: AppState,
}

pub struct Inner {
    pub cow: Dev,
    pub geo: Geometry,
    pub md: RwLock<MetaState>,
    pub origins: RwLock<BTreeMap<u32, Arc<OriginRt>>>,
    pub locks: ChunkLocks,
    pub gc: Arc<GroupCommit>,
    pub read_only: bool,
    /// Serialises admin operations store-wide (ids, tags, rollback checks).
    pub admin: Mutex<()>,
    /// `gc.changes()` when `maybe_commit` last looked at the dirty pages.
    pub last_look: AtomicU64,
    /// Origin chunks written but not yet in place (staging.rs).
    pub staging: Staging,
    /// Called when there is work for the caller's driver thread (staged
    /// writes, a delete or rollback for the background steps); see
    /// `Store::set_waker`. The engine itself starts no threads.
    waker: Mutex<Option<Waker>>,
    /// `DiffStrategy::code` of the strategy diffs take. A std atomic: a
    /// setting read once per diff, not engine state the models explore.
    diff_strategy: std::sync::atomic::AtomicU8,
    /// Called after every background step; see `Store::set_progress_waker`.
    /// A std mutex, not one of `sync`'s: it guards the caller's hook only,
    /// not engine state, so the models need not explore it.
    progress_waker: std::sync::Mutex<Option<Waker>>,
}

/// See `Store::set_waker`.
// std's Arc: loom's cannot hold an unsized closure, and a waker is no
// synchronisation of the engine's own.
pub type Waker = std::sync::Arc<dyn Fn() + Send + Sync>;

pub fn val_u64(v: &[u8]) -> Result<u64> {
    let a: [u8; 8] = v.try_into().map_err(|_| Error::Corrupt {
        block: 0,
        kind: "exception",
        reason: format!("value of {} bytes", v.len()),
    })?;
    Ok(u64::from_le_bytes(a))
}

impl MetaState {
    /// A metadata update that failed half-way leaves the open transaction
    /// in an unknown state. Stop the store, as jbd2 aborts its journal: the
    /// durable state is the last commit, and a reopen recovers it.
    pub fn guard<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if !matches!(e, Error::NoSpace) {
                self.gc
                    .stop(format!("a metadata update failed ({e}); reopen to recover"));
            }
        }
        r
    }

    /// See the field.
    pub fn removals(&self) -> u64 {
        self.removals
    }

    pub fn bump(&mut self) -> u64 {
        self.gc.note_change();
        self.gen += 1;
        self.gen
    }

    pub fn get_exc(&mut self, o: u32, c: u64, n: NodeId) -> Result<Option<u64>> {
        let key = exc_key(o, c, n);
        match self.meta.get_u64(Tree::Exceptions, key)? {
            Some(v) => Ok(Some(self.checked(key, v)?)),
            None => Ok(None),
        }
    }

    /// An exception value must name a chunk of the allocation area (or be
    /// the zero marker). A page can pass its checksum and still carry a bad
    /// value (written by a bug, or crafted): never follow it.
    pub fn checked(&self, key: u128, val: u64) -> Result<u64> {
        if val == ZERO_CHUNK || self.meta.chunk_in_area(val) {
            return Ok(val);
        }
        let (o, c, n) = split_key(key);
        Err(Error::CorruptTree {
            tree: "exceptions",
            block: 0,
            key_lo: key,
            key_hi: key,
            reason: format!(
                "origin {o} chunk {c} node {n:#x} maps to chunk {val}, outside the allocation area"
            ),
        })
    }

    /// Map (o, c, n) -> val; returns the value it replaced.
    pub fn put_exc(&mut self, o: u32, c: u64, n: NodeId, val: u64) -> Result<Option<u64>> {
        let prev = self.get_exc(o, c, n)?;
        // A new key goes into `ByNode` first: if the device is full there,
        // nothing changed; if it is full for the exception, the key is
        // taken out again (a removal allocates nothing).
        if prev.is_none() {
            self.index_by_node(o, c, n, true)?;
        }
        let r = self
            .meta
            .insert(Tree::Exceptions, exc_key(o, c, n), &val.to_le_bytes());
        if r.is_err() && prev.is_none() {
            self.index_by_node(o, c, n, false)?;
        }
        self.guard(r)?;
        if prev.is_none() && n != vtree::RB_MARK {
            *self.own.entry(n).or_insert(0) += 1;
            self.own_dirty.insert(n);
        }
        self.bump();
        Ok(prev)
    }

    pub fn del_exc(&mut self, o: u32, c: u64, n: NodeId) -> Result<Option<u64>> {
        let prev = self.get_exc(o, c, n)?;
        if prev.is_some() {
            let r = self.meta.remove(Tree::Exceptions, exc_key(o, c, n));
            self.guard(r)?;
            self.index_by_node(o, c, n, false)?;
            self.removals += 1;
            if n != vtree::RB_MARK {
                let e = self.own.entry(n).or_insert(0);
                *e = e.saturating_sub(1);
                self.own_dirty.insert(n);
            }
            self.bump();
        }
        Ok(prev)
    }

    /// Keep `ByNode` the exact transposition of the exception index: add
    /// or remove the key of exception (o, c, n), which was just added to
    /// or removed from it. A format-1 device has no `ByNode`.
    fn index_by_node(&mut self, o: u32, c: u64, n: NodeId, present: bool) -> Result<()> {
        if !self.meta.has_tree(Tree::ByNode) {
            return Ok(());
        }
        let key = by_node_key(o, n, c);
        if present {
            let r = self.meta.insert(Tree::ByNode, key, &[]);
            return self.guard(r);
        }
        let r = match self.meta.remove(Tree::ByNode, key) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::CorruptTree {
                tree: Tree::ByNode.name(),
                block: 0,
                key_lo: key,
                key_hi: key,
                reason: format!("no key for the exception of origin {o} chunk {c} node {n:#x}"),
            }),
            Err(e) => Err(e),
        };
        self.guard(r)
    }

    /// Map (o, c, n) to a reserved chunk: the allocation and the mapping
    /// join the open transaction together. (o, c, n) must have had no data
    /// chunk (none, or a zero exception): the caller planned it so under the
    /// chunk's lock, and a data chunk replaced here would leak.
    pub fn map_fresh(&mut self, o: u32, c: u64, n: NodeId, r: Reserved) -> Result<()> {
        let claimed = self.meta.claim_chunk(r);
        let val = self.guard(claimed)?;
        let prev = self.put_exc(o, c, n, val)?;
        assert!(
            matches!(prev, None | Some(ZERO_CHUNK)),
            "fresh chunk mapped over a data exception: origin {o} chunk {c} node {n:#x}"
        );
        Ok(())
    }

    /// Give back reservations whose operation failed before mapping them.
    pub fn release_all(&mut self, rs: Vec<Reserved>) -> Result<()> {
        for r in rs {
            let released = self.meta.release_chunk(r);
            self.guard(released)?;
        }
        Ok(())
    }

    pub fn free_val(&mut self, val: u64) -> Result<()> {
        if val != ZERO_CHUNK {
            let r = self.meta.free_chunk(val);
            self.guard(r)?;
        }
        Ok(())
    }

    pub fn save_app(&mut self) -> Result<()> {
        let b = encode_app(&self.app);
        let r = self.meta.set_app_state(&b);
        self.guard(r)?;
        self.bump();
        Ok(())
    }

    pub fn put_node(&mut self, origin: u32, n: &Node) -> Result<()> {
        let own = self.own.get(&n.id).copied().unwrap_or(0);
        let r = self
            .meta
            .insert(Tree::Nodes, u128::from(n.id), &encode_node(origin, n, own));
        self.guard(r)?;
        self.own_dirty.remove(&n.id);
        self.bump();
        Ok(())
    }

    pub fn apply_changes(&mut self, origin: u32, tree: &VTree, ch: &vtree::Changes) -> Result<()> {
        for id in &ch.removed {
            let r = self.meta.remove(Tree::Nodes, u128::from(*id));
            self.guard(r)?;
            self.own.remove(id);
            self.own_dirty.remove(id);
        }
        for id in &ch.updated {
            if let Some(n) = tree.nodes().get(id) {
                self.put_node(origin, n)?;
            }
        }
        self.bump();
        Ok(())
    }

    /// Write the own-chunk counters changed since the last commit into
    /// their node records.
    fn flush_own(&mut self) -> Result<()> {
        let ids: Vec<NodeId> = self.own_dirty.drain().collect();
        for id in ids {
            // The dirty set is already drained: a failure here must stop the store.
            let r = self.meta.get(Tree::Nodes, u128::from(id));
            if let Some(mut rec) = self.guard(r)? {
                let own = self.own.get(&id).copied().unwrap_or(0);
                rec[OWN_AT..OWN_AT + 8].copy_from_slice(&own.to_le_bytes());
                let r = self.meta.insert(Tree::Nodes, u128::from(id), &rec);
                self.guard(r)?;
            }
        }
        Ok(())
    }

    fn next_node(&mut self) -> Result<u64> {
        let id = self.app.next_node;
        if id > vtree::MAX_PLAIN {
            return Err(Error::Invalid("node ids exhausted".into()));
        }
        self.app.next_node += 1;
        Ok(id)
    }
}

fn now_ok(created: i64) -> i64 {
    created.max(0)
}

impl Inner {
    pub fn diff_strategy(&self) -> DiffStrategy {
        DiffStrategy::from_code(
            self.diff_strategy
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    pub fn set_diff_strategy(&self, strategy: DiffStrategy) {
        let code = strategy.code();
        self.diff_strategy
            .store(code, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Inner {
    pub fn chunk_size(&self) -> u64 {
        u64::from(self.geo.chunk_size)
    }

    pub fn check_ok(&self) -> Result<()> {
        if !self.gc.is_stopped() {
            return Ok(());
        }
        match self.gc.failed() {
            Some(f) => Err(Error::Poisoned(f)),
            None => Ok(()),
        }
    }

    pub fn check_writable(&self) -> Result<()> {
        self.check_ok()?;
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// One commit: own counters into records, origin data flushed, then the
    /// journal (which flushes the COW device first). Returns the generation
    /// it covers.
    pub fn commit_once(&self) -> Result<u64> {
        let (batch, gen) = {
            let mut md = sync::write(&self.md);
            md.flush_own()?;
            let gen = md.gen;
            (md.meta.begin_commit()?, gen)
        };
        // Origin data written before its metadata (rollback marks and
        // cursors) must be durable before that metadata is.
        for o in sync::read(&self.origins).values() {
            o.flush_ordered()?;
        }
        match batch {
            Some(b) => {
                b.write()?;
                sync::write(&self.md).meta.end_commit(b)?;
            }
            None => self.cow.flush()?,
        }
        let cp = sync::write(&self.md).meta.begin_checkpoint()?;
        if let Some(cp) = cp {
            cp.write()?;
            sync::write(&self.md).meta.end_checkpoint(cp)?;
        }
        Ok(gen)
    }

    /// Make generation `want` durable (group commit).
    pub fn sync_gen(&self, want: u64) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.gc.sync(want, || self.commit_once())
    }

    /// Make everything completed so far durable, devices included: the
    /// commit, then every staged chunk in place, then the origins flushed.
    pub fn sync_all(&self) -> Result<()> {
        self.check_ok()?;
        let want = sync::write(&self.md).bump();
        self.sync_gen(want)?;
        if self.read_only {
            return Ok(());
        }
        if !self.staging.is_empty() {
            self.destage(want)?;
        }
        self.flush_dirty_origins()
    }

    fn flush_dirty_origins(&self) -> Result<()> {
        for o in sync::read(&self.origins).values() {
            o.flush_written()?;
        }
        Ok(())
    }

    /// Write in place every staged chunk whose copy is durable by
    /// generation `durable` (DESIGN.md's ordering rule), one chunk lock at
    /// a time. A chunk another thread destaged meanwhile is skipped. A
    /// failed in-place write stops the store: acknowledged data could not
    /// be kept.
    pub fn destage(&self, durable: u64) -> Result<()> {
        // Planted bug: the in-place write need not wait for the commit.
        let durable = match planted::on(Bug::DestageEarly) {
            true => u64::MAX,
            false => durable.min(self.gc.durable()),
        };
        for (num, chunk) in self.staging.due(durable) {
            let Some(o) = self.origin_by_num(num) else {
                continue;
            };
            let _l = self.locks.exclusive(num, chunk);
            let Some(ranges) = self.staging.ranges_if_due((num, chunk), durable) else {
                continue;
            };
            let base = chunk * self.chunk_size();
            let written = o.dev().and_then(|d| {
                ranges
                    .iter()
                    .try_for_each(|(off, data)| d.write_at(base + *off as u64, data))
            });
            if let Err(e) = written {
                self.gc.stop(format!(
                    "writing a staged origin chunk in place failed: {e}"
                ));
                return Err(e);
            }
            o.note_written();
            self.staging.remove((num, chunk));
        }
        Ok(())
    }

    pub fn set_waker(&self, waker: Waker) {
        *sync::lock(&self.waker) = Some(waker);
    }

    pub fn set_progress_waker(&self, waker: Waker) {
        let mut slot = self
            .progress_waker
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *slot = Some(waker);
    }

    /// Tell whoever follows the background work that a step was taken
    /// (with no engine lock held).
    pub fn wake_progress(&self) {
        let slot = self
            .progress_waker
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let waker = slot.clone();
        drop(slot);
        if let Some(w) = waker {
            w();
        }
    }

    /// Tell the driver there is work (outside every engine lock but the
    /// caller's own).
    pub fn wake(&self) {
        let waker = sync::lock(&self.waker).clone();
        if let Some(w) = waker {
            w();
        }
    }

    /// Before an admin operation on an origin (gate held exclusively, so
    /// nothing is being staged): everything staged goes in place, durably.
    /// A snapshot must not share a chunk whose new content is only staged,
    /// and contract 2 wants completed writes durable before it anyway.
    fn drain_staging(&self) -> Result<()> {
        match self.staging.is_empty() {
            true => Ok(()),
            false => self.sync_all(),
        }
    }

    /// Commit, then destage everything staged: the driver's step, and what
    /// a writer does when staging is full.
    pub fn commit_staged(&self) -> Result<()> {
        self.check_writable()?;
        let want = sync::write(&self.md).bump();
        self.sync_gen(want)?;
        self.destage(want)
    }

    /// A write (or write-zeroes, or trim) has completed: if a FLUSH is open,
    /// its reply may go out after this write's, so make this write durable
    /// before it returns (see commit.rs, "Flush cover").
    pub fn write_completed(&self) -> Result<()> {
        if self.gc.flush_open() {
            self.sync_all()?;
        }
        Ok(())
    }

    /// A FLUSH: everything completed so far is durable when it returns, and
    /// writes completing until the hold is dropped make themselves durable.
    pub fn flush_hold(me: &Arc<Inner>) -> Result<FlushHold> {
        me.gc.open_flush();
        let hold = FlushHold { inner: me.clone() };
        me.sync_all()?;
        Ok(hold)
    }

    /// Whether chunks freed by a not-yet-durable transaction wait for a commit.
    pub fn space_pending(&self) -> bool {
        sync::read(&self.md).meta.quarantined_blocks() > 0
    }

    /// Commit early if the open transaction grew large.
    pub fn maybe_commit(&self) -> Result<()> {
        // Lock-free pre-check: fewer than 16 changes since the last look
        // cannot have dirtied enough pages to matter.
        let now = self.gc.changes();
        if now.saturating_sub(self.last_look.load(Ordering::Relaxed)) < 16 {
            return Ok(());
        }
        self.last_look.store(now, Ordering::Relaxed);
        let want = {
            let md = sync::read(&self.md);
            let limit = DIRTY_LIMIT.min(md.meta.max_dirty_pages() / 2);
            (md.meta.dirty_pages() > limit).then_some(md.gen)
        };
        match want {
            Some(w) => self.sync_gen(w),
            None => Ok(()),
        }
    }

    pub fn origin_by_id(&self, id: &str) -> Result<Arc<OriginRt>> {
        sync::read(&self.origins)
            .values()
            .find(|o| o.rec.id == id)
            .cloned()
            .ok_or_else(|| Error::NoSuchOrigin(id.to_string()))
    }

    pub fn origin_by_num(&self, num: u32) -> Option<Arc<OriginRt>> {
        sync::read(&self.origins).get(&num).cloned()
    }

    pub fn format(cow: Dev, opts: &FormatOptions) -> Result<Inner> {
        let mut meta = Meta::format(cow.clone(), opts)?;
        let app = decode_app(&[])?;
        meta.set_app_state(&encode_app(&app))?;
        meta.commit()?;
        Ok(Self::assemble(
            cow,
            meta,
            app,
            HashMap::new(),
            BTreeMap::new(),
            false,
        ))
    }

    fn assemble(
        cow: Dev,
        meta: Meta<Dev>,
        app: AppState,
        own: HashMap<NodeId, u64>,
        origins: BTreeMap<u32, Arc<OriginRt>>,
        read_only: bool,
    ) -> Inner {
        let geo = meta.geometry();
        let gc = Arc::new(GroupCommit::default());
        Inner {
            cow,
            geo,
            gc: gc.clone(),
            md: RwLock::new(MetaState {
                gc,
                meta,
                own,
                own_dirty: HashSet::new(),
                gen: 0,
                removals: 0,
                app,
            }),
            origins: RwLock::new(origins),
            locks: ChunkLocks::default(),
            read_only,
            admin: Mutex::new(()),
            last_look: AtomicU64::new(0),
            staging: Staging::new(),
            waker: Mutex::new(None),
            progress_waker: std::sync::Mutex::new(None),
            diff_strategy: std::sync::atomic::AtomicU8::new(DiffStrategy::Auto.code()),
        }
    }

    /// Open the store on `cow`. `resolve` may report an origin absent only
    /// when `read_only`: a writable store must be able to copy out of and
    /// write to every origin.
    pub fn open(cow: Dev, resolve: LenientResolver<'_>, read_only: bool) -> Result<Inner> {
        let mut meta = if read_only {
            Meta::open_read_only(cow.clone())?
        } else {
            Meta::open(cow.clone())?
        };
        let app = decode_app(meta.app_state())?;
        let mut per_origin: BTreeMap<u32, Vec<Node>> = BTreeMap::new();
        let mut own = HashMap::new();
        for (k, v) in scan(&mut meta, Tree::Nodes)? {
            let id = node_id_from_key(k)?;
            let (o, n, c) = decode_node(id, &v)?;
            own.insert(id, c);
            per_origin.entry(o).or_default().push(n);
        }
        let geo = meta.geometry();
        let mut origins = BTreeMap::new();
        for (_, v) in scan(&mut meta, Tree::Origins)? {
            let rec = decode_origin(&v)?;
            let dev = resolve_origin(&rec, &mut *resolve, read_only)?;
            let tree = VTree::from_records(per_origin.remove(&rec.num).unwrap_or_default())?;
            origins.insert(rec.num, Arc::new(new_origin(rec, dev, tree)));
        }
        if let Some((num, _)) = per_origin.into_iter().next() {
            return Err(Error::Corrupt {
                block: 0,
                kind: "node record",
                reason: format!("nodes of origin number {num}, which is not bound"),
            });
        }
        let _ = geo;
        if let Some(rb) = app.rollback {
            match origins.get(&rb.origin) {
                Some(o) => o.rb_active.store(true, Ordering::Release),
                None => {
                    return Err(Error::Corrupt {
                        block: 0,
                        kind: "app state",
                        reason: format!(
                            "rollback onto origin number {}, which is not bound",
                            rb.origin
                        ),
                    })
                }
            }
        }
        Ok(Self::assemble(cow, meta, app, own, origins, read_only))
    }

    pub fn bind(&self, id: &str, path: &str, dev: Dev, now: i64) -> Result<()> {
        self.check_writable()?;
        validate_id(id)?;
        if path.len() > PATH_MAX {
            return Err(Error::Invalid(format!(
                "origin path longer than {PATH_MAX} bytes: {path}"
            )));
        }
        let size = dev.size();
        if size == 0 || size.div_ceil(self.chunk_size()) >= 1 << 48 {
            return Err(Error::Invalid(format!(
                "origin {id} ({path}) has unusable size {size}"
            )));
        }
        let _a = sync::lock(&self.admin);
        if self.origin_by_id(id).is_ok() {
            return Err(Error::OriginExists(id.to_string()));
        }
        let gen = {
            let mut md = sync::write(&self.md);
            let num = md.app.next_origin;
            md.app.next_origin = num
                .checked_add(1)
                .ok_or_else(|| Error::Invalid("origin numbers exhausted".into()))?;
            let rec = OriginRec {
                num,
                size,
                created: now_ok(now),
                id: id.to_string(),
                path: path.to_string(),
            };
            let r = md
                .meta
                .insert(Tree::Origins, u128::from(num), &encode_origin(&rec));
            md.guard(r)?;
            md.save_app()?;
            sync::write(&self.origins).insert(
                num,
                Arc::new(new_origin(rec, OriginDev::Present(dev), VTree::default())),
            );
            md.gen
        };
        self.sync_gen(gen)
    }

    pub fn unbind(&self, id: &str) -> Result<()> {
        self.check_writable()?;
        let _a = sync::lock(&self.admin);
        let o = self.origin_by_id(id)?;
        let _g = sync::write(&o.gate);
        self.drain_staging()?;
        let count = sync::read(&o.tree).tags.len() as u64; // hidden leaves count too
        if count > 0 {
            return Err(Error::HasSnapshots {
                origin: id.to_string(),
                count,
            });
        }
        if !sync::read(&o.tree).nodes().is_empty() {
            return Err(Error::Busy(format!(
                "origin {id}: deleted snapshots are still being cleaned; try again later"
            )));
        }
        let gen = {
            let mut md = sync::write(&self.md);
            let r = md.meta.remove(Tree::Origins, u128::from(o.num));
            md.guard(r)?;
            o.bound.store(false, Ordering::Release);
            sync::write(&self.origins).remove(&o.num);
            md.bump()
        };
        self.sync_gen(gen)
    }

    pub fn snapshot(&self, id: &str, of: Option<u64>, memo: &str, now: i64) -> Result<u64> {
        self.check_writable()?;
        if memo.len() > MEMO_MAX {
            return Err(Error::Invalid(format!("memo longer than {MEMO_MAX} bytes")));
        }
        let _a = sync::lock(&self.admin);
        let o = self.origin_by_id(id)?;
        let _g = sync::write(&o.gate);
        self.drain_staging()?;
        if let Some(rb) = sync::read(&self.md).app.rollback {
            if rb.origin == o.num && of.is_none() {
                return Err(Error::Busy(format!(
                    "origin {id}: rollback of snapshot {} in progress",
                    rb.tag
                )));
            }
        }
        let mut tree = sync::write(&o.tree);
        if let Some(t) = of {
            if !visible(&tree, t) {
                return Err(no_snap(id, t));
            }
        }
        let mut md = sync::write(&self.md);
        let tag = md.app.next_tag;
        md.app.next_tag += 1;
        let (a, b) = (md.next_node()?, md.next_node()?);
        let ch = match of {
            None => tree.snapshot_origin(SPINE_BIT | a, b, tag)?,
            Some(t) => tree.snapshot_of(t, a, b, tag)?,
        };
        tree.describe_leaf(b, now_ok(now), memo, false);
        md.apply_changes(o.num, &tree, &ch)?;
        md.save_app()?;
        let gen = md.gen;
        drop(md);
        drop(tree);
        // An ordered write makes the commit flush the origin: every write
        // that completed before the snapshot is durable when it returns.
        o.note_ordered_write();
        self.sync_gen(gen)?;
        Ok(tag)
    }

    /// Run an admin operation on snapshot `tag` of origin `id` with the
    /// admin lock, the origin's gate (exclusive: no I/O in flight) and its
    /// tree held, after checking the tag names a visible snapshot. `f`
    /// returns the metadata generation to make durable before returning.
    fn on_snapshot(
        &self,
        id: &str,
        tag: u64,
        f: impl FnOnce(&OriginRt, &mut VTree) -> Result<u64>,
    ) -> Result<()> {
        self.check_writable()?;
        let _a = sync::lock(&self.admin);
        let o = self.origin_by_id(id)?;
        let _g = sync::write(&o.gate);
        self.drain_staging()?;
        let gen = {
            let mut tree = sync::write(&o.tree);
            if !visible(&tree, tag) {
                return Err(no_snap(id, tag));
            }
            f(&o, &mut tree)?
        };
        self.sync_gen(gen)?;
        // A delete leaves cleaning, a rollback copying: background work.
        self.wake();
        Ok(())
    }

    pub fn delete(&self, id: &str, tag: u64) -> Result<()> {
        self.on_snapshot(id, tag, |o, tree| {
            let mut md = sync::write(&self.md);
            let ch = tree.delete(tag, md.app.clean_gen)?;
            md.apply_changes(o.num, tree, &ch)?;
            Ok(md.gen)
        })
    }

    pub fn rollback(&self, id: &str, tag: u64) -> Result<()> {
        self.on_snapshot(id, tag, |o, tree| {
            let mut md = sync::write(&self.md);
            if let Some(rb) = md.app.rollback {
                return Err(Error::Busy(format!(
                    "a rollback (snapshot {}) is already in progress",
                    rb.tag
                )));
            }
            // Freeze the snapshot's content now: an internal snapshot of it is
            // the copier's source, so later writes to `tag` stay out of the origin.
            let src = md.app.next_tag;
            md.app.next_tag += 1;
            let (a, b) = (md.next_node()?, md.next_node()?);
            let ch = tree.snapshot_of(tag, a, b, src)?;
            tree.describe_leaf(b, 0, &format!("rollback source of {tag}"), true);
            md.apply_changes(o.num, tree, &ch)?;
            md.app.rollback = Some(RollbackState {
                origin: o.num,
                tag,
                src,
                cursor: 0,
                total: o.chunks(self.chunk_size()),
            });
            md.save_app()?;
            o.rb_active.store(true, Ordering::Release);
            o.note_ordered_write();
            Ok(md.gen)
        })
    }

    /// The status, with the space accounting when `accounting`.
    pub fn status(&self, accounting: bool) -> Status {
        let md = sync::read(&self.md);
        let usage = md.meta.usage();
        let rollback = md.app.rollback;
        let clean_pass = md.app.clean_pass.is_some();
        drop(md);
        let origins = sync::read(&self.origins);
        let mut cleaning = clean_pass;
        let mut out = Vec::new();
        let mut usage_error = None;
        for o in origins.values() {
            let per_leaf = match accounting {
                true => self.leaf_usage(o).unwrap_or_else(|e| {
                    usage_error = Some(format!("space accounting of origin {}: {e}", o.rec.id));
                    HashMap::new()
                }),
                false => HashMap::new(),
            };
            let tree = sync::read(&o.tree);
            cleaning |= tree.has_flagged();
            let mut snaps: Vec<SnapshotStatus> = tree
                .tags
                .iter()
                .filter(|(_, leaf)| !tree.node(**leaf).hidden)
                .map(|(tag, leaf)| {
                    let n = tree.node(*leaf);
                    let u = per_leaf.get(leaf).copied().unwrap_or_default();
                    SnapshotStatus {
                        tag: *tag,
                        parent: n.parent_tag,
                        created: n.created,
                        memo: n.memo.clone(),
                        own_chunks: u.own,
                        shared_chunks: u.shared,
                    }
                })
                .collect();
            snaps.sort_by_key(|s| s.tag);
            out.push(OriginStatus {
                id: o.rec.id.clone(),
                path: o.rec.path.clone(),
                size: o.rec.size,
                created: o.rec.created,
                snapshots: snaps,
                absent: o.absent().map(str::to_string),
            });
        }
        let rollback = rollback.and_then(|rb| {
            origins.get(&rb.origin).map(|o| RollbackStatus {
                origin: o.rec.id.clone(),
                tag: rb.tag,
                done_chunks: rb.cursor,
                total_chunks: rb.total,
            })
        });
        Status {
            chunk_size: self.geo.chunk_size,
            chunks_total: self.geo.chunks_total,
            chunks_used: self.geo.chunks_total.saturating_sub(usage.free_chunks),
            status: match (self.gc.failed(), usage_error) {
                (Some(f), _) => format!("failed: {f}"),
                (None, Some(e)) => format!("valid, but {e}"),
                (None, None) => "valid".into(),
            },
            cleaning,
            rollback,
            origins: out,
        }
    }

    /// Flush and checkpoint so the journal is empty and the origins hold
    /// exactly their content.
    pub fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.sync_all()?;
        for o in sync::read(&self.origins).values() {
            o.dev()?.flush()?;
        }
        // A full checkpoint empties the journal: after a clean close nothing
        // depends on the ring, so damage there cannot pass for a torn tail.
        self.gc.exclusive(|| {
            let cp = sync::write(&self.md).meta.begin_checkpoint_all()?;
            if let Some(cp) = cp {
                cp.write()?;
                sync::write(&self.md).meta.end_checkpoint(cp)?;
            }
            Ok(())
        })
    }
}

/// An open FLUSH (see commit.rs, "Flush cover"). Keep it until the FLUSH's
/// reply is sent: until then every write that completes is made durable
/// before it returns, so the reply covers every write replied before it.
#[must_use = "the flush is covered only while the hold lives"]
pub struct FlushHold {
    inner: Arc<Inner>,
}

impl Drop for FlushHold {
    fn drop(&mut self) {
        self.inner.gc.close_flush();
    }
}

/// Resolve a bound origin's device at open and check it still holds the
/// bound size.
fn resolve_origin(
    rec: &OriginRec,
    resolve: LenientResolver<'_>,
    read_only: bool,
) -> Result<OriginDev> {
    let dev = match resolve(&rec.id, &rec.path)? {
        OriginDev::Absent(reason) if !read_only => return Err(absent_err(rec, &reason)),
        OriginDev::Absent(reason) => return Ok(OriginDev::Absent(reason)),
        OriginDev::Present(dev) => dev,
    };
    if dev.size() < rec.size {
        return Err(Error::Invalid(format!(
            "origin {} ({}) is {} bytes, smaller than the {} bound",
            rec.id,
            rec.path,
            dev.size(),
            rec.size
        )));
    }
    Ok(OriginDev::Present(dev))
}

fn new_origin(rec: OriginRec, dev: OriginDev, tree: VTree) -> OriginRt {
    OriginRt {
        num: rec.num,
        rec,
        dev,
        gate: RwLock::new(()),
        tree: RwLock::new(tree),
        written: AtomicU64::new(0),
        flushed: AtomicU64::new(0),
        ordered: AtomicBool::new(false),
        bound: AtomicBool::new(true),
        rb_active: AtomicBool::new(false),
    }
}

/// Whether `tag` is a user-visible live snapshot (not an internal leaf).
pub fn visible(tree: &VTree, tag: u64) -> bool {
    tree.leaf_of(tag).is_some_and(|l| !tree.node(l).hidden)
}

pub fn no_snap(id: &str, tag: u64) -> Error {
    Error::NoSuchSnapshot {
        origin: id.to_string(),
        tag,
    }
}

/// Every entry of a tree, in key order, read in bounded batches.
pub fn scan(meta: &mut Meta<Dev>, t: Tree) -> Result<Vec<(u128, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut lo = 0u128;
    loop {
        let batch = meta.range(t, lo, u128::MAX, 4096)?;
        let Some((last, _)) = batch.last() else { break };
        let next = last.checked_add(1);
        let full = batch.len() == 4096;
        out.extend(batch);
        match next {
            Some(n) if full => lo = n,
            _ => break,
        }
    }
    Ok(out)
}
