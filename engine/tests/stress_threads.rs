//! Multi-threaded stress oracle: real threads against a `MemDev` store for a
//! bounded time, with an exact model and a linearizability check of the
//! snapshot events.
//!
//! - N workers (8 by default) each own a disjoint byte range (neighbours
//!   share the chunk at the boundary, so chunk-level races happen). In every
//!   version (the origin and each snapshot) only the owner writes its range,
//!   so each worker's model of its range is exact: every read must equal it.
//!   Workers write the origin and live snapshots (some with FUA), read and
//!   check them, and flush.
//! - A coordinator takes snapshots of the origin and of snapshots, deletes
//!   some, now and then rolls a snapshot back onto the origin, and runs
//!   `step_background` (cleaner and rollback copier) throughout.
//! - Linearizability of snapshots (contract 2): every operation is stamped
//!   with a shared `AtomicU64` clock before it starts and after it returns.
//!   For a snapshot call stamped [b, r] of version V, each worker's range in
//!   the new snapshot must equal its model of V after some prefix of its
//!   writes to V: every write that completed before b (end < b), none that
//!   started after r (start > r), and any prefix of those in between. The
//!   worker checks this on its first look at the snapshot (it is the only
//!   writer of its range there, so that content is still the snapshot's
//!   initial content), then adopts the matching state as its model.
//! - Rollback is taken with the workers quiesced between operations (so the
//!   origin's new content is known exactly); the rollback copier then races
//!   the workers' later writes.
//! - At the end: background work runs dry, every version is checked in
//!   full, the checker must be clean and the lock table empty; then the
//!   store is closed, reopened, and checked in full again.
//!
//! - The metadata page cache's budget comes from the seed: the default, or
//!   so small (the floor of a few clean pages, or 64 KiB) that lookups keep
//!   missing, so the shared-lock lookups fetch pages with no lock held
//!   while writers commit, checkpoint and free pages (store/lookup.rs).
//!   With a small budget the run must show such fetches.
//!
//! Knobs: SNAPMV_STRESS_SECS (default 12), SNAPMV_STRESS_SEED (replays a
//! workload; thread timing still differs), SNAPMV_STRESS_THREADS (default 8),
//! SNAPMV_STRESS_CACHE (the cache budget in bytes, instead of the seed's).
#![cfg(not(loom))]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use snapmv_engine::store::{self, Dev, FormatOptions, Store, Volume};
use snapmv_engine::BlockDev;
use snapmv_engine::{Error, MemDev};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

const CS: u64 = 4096;
/// Each worker's byte range: 24.375 chunks, so neighbouring ranges share a
/// chunk. The model stays exact (the bytes are disjoint), while two workers
/// race on the same chunk: the first copy of a chunk after a snapshot, and a
/// snapshot read of a chunk against an origin write to it.
const RANGE: usize = 24 * CS as usize + 3 * SECTOR;
const COW_SIZE: u64 = 256 << 20;
const SECTOR: usize = 512;
const MAX_LIVE: usize = 8;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
    })
}

/// Content of a write, derived from its id (so the log keeps no data).
fn fill(id: u64, buf: &mut [u8]) {
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = x.to_le_bytes();
        b.copy_from_slice(&w[..b.len()]);
    }
}

/// Run-length summary of where two buffers differ, for failure messages.
fn diff(got: &[u8], want: &[u8]) -> String {
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    let last = got.iter().zip(want).rposition(|(a, b)| a != b);
    match (first, last) {
        (Some(f), Some(l)) => format!("differs in bytes {f}..={l} of {}", got.len()),
        _ => "equal".into(),
    }
}

// ------------------------------------------------------------ shared state

#[derive(Clone, Copy, Debug)]
struct SnapEvent {
    tag: u64,
    /// None: of the origin.
    source: Option<u64>,
    /// Clock stamps taken just before the call and just after it returned.
    began: u64,
    returned: u64,
}

#[derive(Default)]
struct Registry {
    snaps: Vec<SnapEvent>,
    deleted: Vec<u64>,
}

struct Shared {
    store: Store,
    clock: AtomicU64,
    /// While a snapshot call is in flight: a clock value not after its
    /// `began` stamp (workers keep every write that ended at or after it).
    horizon: AtomicU64,
    registry: Mutex<Registry>,
    /// Workers hold it shared for each operation; the coordinator takes it
    /// exclusively to quiesce them (for rollback).
    quiesce: RwLock<()>,
    stop: AtomicBool,
    seed: u64,
}

impl Shared {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, SeqCst)
    }
}

// ------------------------------------------------------------ worker model

struct Logged {
    start: u64,
    end: u64,
    off: usize,
    /// The bytes the write replaced (to step back to earlier states).
    old: Vec<u8>,
}

struct VModel {
    vol: Volume,
    cur: Vec<u8>,
    /// Writes not yet folded into history, oldest first.
    log: Vec<Logged>,
    /// The store said the snapshot is gone; dropped once the deletion is seen.
    dead: bool,
}

impl VModel {
    /// The states this version's range may have had at a snapshot stamped
    /// [began, returned]: after every write that ended before `began`, plus
    /// any prefix of the writes that overlap the call. Newest first.
    fn candidates(&self, began: u64, returned: u64) -> Vec<Vec<u8>> {
        let lo = self.log.partition_point(|w| w.end < began);
        let hi = self.log.partition_point(|w| w.start < returned);
        let mut st = self.cur.clone();
        for w in self.log[hi..].iter().rev() {
            st[w.off..w.off + w.old.len()].copy_from_slice(&w.old);
        }
        let mut out = vec![st.clone()];
        for w in self.log[lo..hi].iter().rev() {
            st[w.off..w.off + w.old.len()].copy_from_slice(&w.old);
            out.push(st.clone());
        }
        out
    }
}

/// One worker's exact model of its range in every version it knows.
struct Model {
    t: usize,
    base: u64,
    /// None = the origin.
    versions: BTreeMap<Option<u64>, VModel>,
    /// Snapshots this worker saw deleted (possibly before it could look).
    gone: HashSet<u64>,
    seen_snaps: usize,
    seen_deleted: usize,
    checked_snapshots: u64,
    ambiguous: u64,
    /// Snapshots of a snapshot that was deleted before this worker took it
    /// in: adopted without the window check.
    unchecked: u64,
}

impl Model {
    fn read_range(&self, vol: &Volume) -> snapmv_engine::Result<Vec<u8>> {
        let mut buf = vec![0u8; RANGE];
        vol.read(self.base, &mut buf)?;
        Ok(buf)
    }

    /// Take in new snapshots (checking each one's content against the
    /// linearizability window) and deletions; then trim the logs.
    fn sync(&mut self, sh: &Shared) -> Result<(), String> {
        // Read the trim bound before the registry (see `horizon`).
        let now = sh.clock.load(SeqCst);
        let horizon = sh.horizon.load(SeqCst);
        let (snaps, deleted) = {
            let r = sh.registry.lock().unwrap();
            (
                r.snaps[self.seen_snaps..].to_vec(),
                r.deleted[self.seen_deleted..].to_vec(),
            )
        };
        self.seen_snaps += snaps.len();
        self.seen_deleted += deleted.len();
        for ev in snaps {
            self.adopt(sh, ev)?;
        }
        for tag in deleted {
            self.versions.remove(&Some(tag));
            self.gone.insert(tag);
        }
        let cut = now.min(horizon);
        for v in self.versions.values_mut() {
            let n = v.log.partition_point(|w| w.end < cut);
            v.log.drain(..n);
        }
        Ok(())
    }

    fn adopt(&mut self, sh: &Shared, ev: SnapEvent) -> Result<(), String> {
        let cands = match self.versions.get(&ev.source) {
            Some(src) => Some(src.candidates(ev.began, ev.returned)),
            None if ev.source.is_some_and(|t| self.gone.contains(&t)) => None,
            None => {
                return Err(format!(
                    "worker {}: snapshot {} of {:?}: source unknown to the model",
                    self.t, ev.tag, ev.source
                ))
            }
        };
        let gone = |m: &mut Model| {
            m.gone.insert(ev.tag);
            Ok(())
        };
        let vol = match sh.store.volume("o", Some(ev.tag)) {
            Ok(v) => v,
            // Already deleted again: nothing to check.
            Err(Error::NoSuchSnapshot { .. }) => return gone(self),
            Err(e) => return Err(format!("volume {}: {e}", ev.tag)),
        };
        let got = match self.read_range(&vol) {
            Ok(g) => g,
            Err(Error::NoSuchSnapshot { .. }) => return gone(self),
            Err(e) => return Err(format!("read snapshot {}: {e}", ev.tag)),
        };
        let Some(cands) = cands else {
            self.unchecked += 1;
            self.versions.insert(
                Some(ev.tag),
                VModel {
                    vol,
                    cur: got,
                    log: Vec::new(),
                    dead: false,
                },
            );
            return Ok(());
        };
        if !cands.contains(&got) {
            return Err(format!(
                "worker {}: snapshot {} of {:?} (clock [{}, {}]) matches none of the {} \
                 states of the source allowed by the call's window; vs. newest allowed: {}; \
                 vs. oldest allowed: {}",
                self.t,
                ev.tag,
                ev.source,
                ev.began,
                ev.returned,
                cands.len(),
                diff(&got, &cands[0]),
                diff(&got, &cands[cands.len() - 1]),
            ));
        }
        self.checked_snapshots += 1;
        if cands.len() > 1 {
            self.ambiguous += 1;
        }
        self.versions.insert(
            Some(ev.tag),
            VModel {
                vol,
                cur: got,
                log: Vec::new(),
                dead: false,
            },
        );
        Ok(())
    }
}

#[derive(Default, Debug, Clone, Copy)]
struct WStats {
    writes: u64,
    snap_writes: u64,
    reads: u64,
    flushes: u64,
    gone: u64,
}

fn is_gone(e: &Error) -> bool {
    matches!(e, Error::NoSuchSnapshot { .. })
}

fn worker_op(
    sh: &Shared,
    m: &mut Model,
    rng: &mut ChaCha8Rng,
    st: &mut WStats,
) -> Result<(), String> {
    m.sync(sh)?;
    let t = m.t;
    let live: Vec<Option<u64>> = m
        .versions
        .iter()
        .filter(|(_, v)| !v.dead)
        .map(|(k, _)| *k)
        .collect();
    let which = if rng.gen_bool(0.65) || live.len() == 1 {
        None
    } else {
        live[rng.gen_range(1..live.len())]
    };
    let kind = rng.gen_range(0..100);
    let sectors = RANGE / SECTOR;
    let off_s = rng.gen_range(0..sectors);
    let len_s = rng.gen_range(1..=(sectors - off_s).min(3 * CS as usize / SECTOR));
    let (off, len) = (off_s * SECTOR, len_s * SECTOR);
    let base = m.base;
    let v = m.versions.get_mut(&which).expect("live version");
    if kind < 70 {
        let id = ((t as u64) << 48) | (st.writes + 1);
        let mut data = vec![0u8; len];
        fill(id ^ sh.seed, &mut data);
        let fua = rng.gen_ratio(1, 20);
        let start = sh.tick();
        let r = v.vol.write(base + off as u64, &data, fua);
        let end = sh.tick();
        match r {
            Ok(()) => {}
            Err(e) if which.is_some() && is_gone(&e) => {
                v.dead = true;
                st.gone += 1;
                return Ok(());
            }
            Err(e) => return Err(format!("worker {t}: write {which:?} +{off} len {len}: {e}")),
        }
        let old = v.cur[off..off + len].to_vec();
        v.cur[off..off + len].copy_from_slice(&data);
        v.log.push(Logged {
            start,
            end,
            off,
            old,
        });
        st.writes += 1;
        if which.is_some() {
            st.snap_writes += 1;
        }
    } else if kind < 97 {
        let mut buf = vec![0u8; len];
        match v.vol.read(base + off as u64, &mut buf) {
            Ok(()) => {}
            Err(e) if which.is_some() && is_gone(&e) => {
                v.dead = true;
                st.gone += 1;
                return Ok(());
            }
            Err(e) => return Err(format!("worker {t}: read {which:?}: {e}")),
        }
        if buf[..] != v.cur[off..off + len] {
            return Err(format!(
                "worker {t}: read of {which:?} at +{off} len {len}: {}",
                diff(&buf, &v.cur[off..off + len])
            ));
        }
        st.reads += 1;
    } else {
        v.vol
            .flush()
            .map_err(|e| format!("worker {t}: flush: {e}"))?;
        st.flushes += 1;
    }
    Ok(())
}

fn worker(sh: Arc<Shared>, m: Arc<Mutex<Model>>) -> Result<WStats, String> {
    let t = m.lock().unwrap().t;
    let mut rng = ChaCha8Rng::seed_from_u64(sh.seed ^ (0x5157_0000 + t as u64));
    let mut st = WStats::default();
    while !sh.stop.load(SeqCst) {
        let _q = sh.quiesce.read().unwrap();
        let mut m = m.lock().unwrap();
        if let Err(e) = worker_op(&sh, &mut m, &mut rng, &mut st) {
            sh.stop.store(true, SeqCst);
            return Err(e);
        }
    }
    Ok(st)
}

// ------------------------------------------------------------ coordinator

#[derive(Default, Debug)]
struct CStats {
    snaps_of_origin: u64,
    snaps_of_snaps: u64,
    deletes: u64,
    rollbacks: u64,
    busy: u64,
    bg_steps: u64,
    bg_work: u64,
}

fn coordinator(
    sh: &Shared,
    models: &[Arc<Mutex<Model>>],
    deadline: Instant,
) -> Result<CStats, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(sh.seed ^ 0xC00D);
    let mut cs = CStats::default();
    let mut live: Vec<u64> = Vec::new();
    let mut now_t = 1_000i64;
    while Instant::now() < deadline && !sh.stop.load(SeqCst) {
        std::thread::sleep(Duration::from_micros(rng.gen_range(200..3000)));
        let k = rng.gen_range(0..100);
        if k < 40 {
            let r = sh.store.step_background(rng.gen_range(1..32));
            let r = r.map_err(|e| format!("step_background: {e}"))?;
            cs.bg_steps += 1;
            cs.bg_work += r.work as u64;
        } else if k < 70 && live.len() < MAX_LIVE {
            let source = if live.is_empty() || rng.gen_bool(0.6) {
                None
            } else {
                Some(live[rng.gen_range(0..live.len())])
            };
            now_t += 1;
            sh.horizon.store(sh.clock.load(SeqCst), SeqCst);
            let began = sh.tick();
            let res = sh.store.snapshot("o", source, "stress", now_t);
            let returned = sh.tick();
            match res {
                Ok(tag) => {
                    sh.registry.lock().unwrap().snaps.push(SnapEvent {
                        tag,
                        source,
                        began,
                        returned,
                    });
                    live.push(tag);
                    match source {
                        None => cs.snaps_of_origin += 1,
                        Some(_) => cs.snaps_of_snaps += 1,
                    }
                }
                Err(Error::Busy(_)) => cs.busy += 1,
                Err(e) => return Err(format!("snapshot of {source:?}: {e}")),
            }
            sh.horizon.store(u64::MAX, SeqCst);
        } else if k < 92 && live.len() > 2 {
            let tag = live.swap_remove(rng.gen_range(0..live.len()));
            match sh.store.delete("o", tag) {
                Ok(()) => {
                    sh.registry.lock().unwrap().deleted.push(tag);
                    cs.deletes += 1;
                }
                Err(Error::Busy(_)) => {
                    live.push(tag);
                    cs.busy += 1;
                }
                Err(e) => return Err(format!("delete {tag}: {e}")),
            }
        } else if k < 95 && !live.is_empty() && sh.store.status().rollback.is_none() {
            let tag = live[rng.gen_range(0..live.len())];
            // Quiesce the workers between operations so that the origin's
            // new content (the snapshot's) is known exactly.
            let _q = sh.quiesce.write().unwrap();
            let mut ms: Vec<_> = models.iter().map(|m| m.lock().unwrap()).collect();
            for m in ms.iter_mut() {
                m.sync(sh)?;
            }
            match sh.store.rollback("o", tag) {
                Ok(()) => {
                    for m in ms.iter_mut() {
                        let content = match m.versions.get(&Some(tag)) {
                            Some(v) => v.cur.clone(),
                            None => {
                                return Err(format!(
                                    "worker {}: rollback source {tag} unknown to the model",
                                    m.t
                                ))
                            }
                        };
                        let o = m.versions.get_mut(&None).expect("origin model");
                        o.cur = content;
                        o.log.clear();
                    }
                    cs.rollbacks += 1;
                }
                Err(Error::Busy(_)) => cs.busy += 1,
                Err(e) => return Err(format!("rollback {tag}: {e}")),
            }
        } else {
            sh.store.flush().map_err(|e| format!("store flush: {e}"))?;
        }
    }
    Ok(cs)
}

// ------------------------------------------------------------ checks

fn run_background_dry(s: &Store) {
    for _ in 0..100_000 {
        if !s.step_background(256).expect("step_background").more {
            return;
        }
    }
    panic!("background work does not finish");
}

/// Every version every worker knows, in full, against its model.
fn verify_all(store: &Store, models: &[Arc<Mutex<Model>>], when: &str) -> u64 {
    let mut n = 0;
    for m in models {
        let m = m.lock().unwrap();
        for (which, v) in &m.versions {
            if v.dead {
                continue;
            }
            let vol = store
                .volume("o", *which)
                .unwrap_or_else(|e| panic!("{when}: worker {}: volume {which:?}: {e}", m.t));
            let got = m
                .read_range(&vol)
                .unwrap_or_else(|e| panic!("{when}: worker {}: read {which:?}: {e}", m.t));
            assert!(
                got == v.cur,
                "{when}: worker {} version {which:?}: {}",
                m.t,
                diff(&got, &v.cur)
            );
            n += 1;
        }
    }
    n
}

#[test]
fn stress_threads() {
    let secs = env_u64("SNAPMV_STRESS_SECS").unwrap_or(12);
    let threads = env_u64("SNAPMV_STRESS_THREADS").unwrap_or(8) as usize;
    let seed = env_u64("SNAPMV_STRESS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let budget = env_u64("SNAPMV_STRESS_CACHE").unwrap_or(match seed % 3 {
        0 => snapmv_engine::meta::DEFAULT_CACHE_BUDGET,
        1 => 0,
        _ => 64 << 10,
    });
    println!(
        "stress_threads: seed {seed}, {threads} workers, {secs}s, cache budget {budget} \
         (replay the workload: SNAPMV_STRESS_SEED={seed} cargo test -p snapmv-engine \
         --test stress_threads -- --nocapture)"
    );
    let origin_size = threads as u64 * RANGE as u64;
    let cow = Arc::new(MemDev::new(COW_SIZE));
    let origin = Arc::new(MemDev::new(origin_size));
    // A recognisable initial origin.
    let mut init = vec![0u8; origin_size as usize];
    fill(seed ^ 0x0123, &mut init);
    origin.write_at(0, &init).expect("initial origin content");
    let store = Store::format(
        cow.clone(),
        &FormatOptions {
            chunk_size: CS as u32,
            force: false,
        },
    )
    .expect("format");
    store.bind("o", "mem:o", origin.clone(), 0).expect("bind");
    store.set_cache_budget(budget);

    let sh = Arc::new(Shared {
        store: store.clone(),
        clock: AtomicU64::new(1),
        horizon: AtomicU64::new(u64::MAX),
        registry: Mutex::new(Registry::default()),
        quiesce: RwLock::new(()),
        stop: AtomicBool::new(false),
        seed,
    });
    let models: Vec<Arc<Mutex<Model>>> = (0..threads)
        .map(|t| {
            let base = t as u64 * RANGE as u64;
            let mut versions = BTreeMap::new();
            versions.insert(
                None,
                VModel {
                    vol: store.volume("o", None).unwrap(),
                    cur: init[base as usize..base as usize + RANGE].to_vec(),
                    log: Vec::new(),
                    dead: false,
                },
            );
            Arc::new(Mutex::new(Model {
                t,
                base,
                versions,
                gone: HashSet::new(),
                seen_snaps: 0,
                seen_deleted: 0,
                checked_snapshots: 0,
                ambiguous: 0,
                unchecked: 0,
            }))
        })
        .collect();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let handles: Vec<_> = models
        .iter()
        .map(|m| {
            let (sh, m) = (sh.clone(), m.clone());
            std::thread::spawn(move || worker(sh, m))
        })
        .collect();
    let coord = coordinator(&sh, &models, deadline);
    sh.stop.store(true, SeqCst);
    let mut totals = WStats::default();
    let mut errors = Vec::new();
    for h in handles {
        match h.join().expect("worker panicked") {
            Ok(s) => {
                totals.writes += s.writes;
                totals.snap_writes += s.snap_writes;
                totals.reads += s.reads;
                totals.flushes += s.flushes;
                totals.gone += s.gone;
            }
            Err(e) => errors.push(e),
        }
    }
    if let Err(e) = &coord {
        errors.push(format!("coordinator: {e}"));
    }
    assert!(errors.is_empty(), "seed {seed}: {}", errors.join("\n"));
    let cs = coord.unwrap();
    let run = started.elapsed();

    // Final: take in the last events, let background work finish, check all.
    for m in &models {
        m.lock()
            .unwrap()
            .sync(&sh)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
    run_background_dry(&store);
    assert!(store.status().rollback.is_none());
    let versions_checked = verify_all(&store, &models, "after the run");
    assert_eq!(
        store.lock_entries(),
        0,
        "chunk lock table not empty when idle"
    );
    store.flush().expect("flush");
    let r = store::check(cow.clone() as Dev).expect("check");
    assert!(r.errors.is_empty(), "seed {seed}: checker: {:?}", r.errors);
    let status = store.status();
    let cache = store.cache_stats();
    println!("stress_threads: seed {seed}: page cache {cache:?}");
    if budget < 1 << 20 {
        // A small budget must have driven lookups through the fetch path.
        assert!(
            cache.misses > cache.locked_misses && cache.evictions > 0,
            "seed {seed}: a budget of {budget} bytes fetched no page: {cache:?}"
        );
    }
    drop(sh);
    store.close().expect("close");

    // Reopen: everything is still there.
    let o2 = origin.clone();
    let reopened = Store::open(cow.clone(), &mut |_, _| Ok(o2.clone() as Dev)).expect("reopen");
    for m in &models {
        for v in m.lock().unwrap().versions.values_mut() {
            v.vol = reopened
                .volume("o", v.vol.id().tag)
                .unwrap_or_else(|e| panic!("seed {seed}: after reopen: {e}"));
        }
    }
    verify_all(&reopened, &models, "after close and reopen");
    let r = store::check(cow.clone() as Dev).expect("check");
    assert!(
        r.errors.is_empty(),
        "seed {seed}: checker after reopen: {:?}",
        r.errors
    );

    let (checked, ambiguous, unchecked) = models.iter().fold((0, 0, 0), |a, m| {
        let m = m.lock().unwrap();
        (
            a.0 + m.checked_snapshots,
            a.1 + m.ambiguous,
            a.2 + m.unchecked,
        )
    });
    println!(
        "stress_threads: seed {seed}: {:.1}s, {} writes ({} to snapshots), {} reads, {} flushes, \
         {} ops on deleted snapshots refused; {} snapshots of the origin, {} of snapshots, \
         {} deletes, {} rollbacks, {} busy refusals, {} background steps ({} units); \
         {} per-worker snapshot checks ({} with an overlapping write, {} unchecked); final: {} live snapshots, \
         {} versions x workers checked, {} of {} chunks used",
        run.as_secs_f64(),
        totals.writes,
        totals.snap_writes,
        totals.reads,
        totals.flushes,
        totals.gone,
        cs.snaps_of_origin,
        cs.snaps_of_snaps,
        cs.deletes,
        cs.rollbacks,
        cs.busy,
        cs.bg_steps,
        cs.bg_work,
        checked,
        ambiguous,
        unchecked,
        status.origins[0].snapshots.len(),
        versions_checked,
        status.chunks_used,
        status.chunks_total,
    );
    assert!(totals.writes > 0 && checked > 0, "the run did no work");
}

/// Contract 2 for a write larger than the engine's 256-chunk sub-operation
/// (`OP_CHUNKS` in store/io.rs): one thread rewrites 300 chunks with a new
/// fill byte each time while snapshots are taken; each snapshot must hold one
/// fill byte throughout. (It failed while `Volume::write` took the origin
/// gate per sub-operation, letting a snapshot land between two of them.)
#[test]
fn large_write_vs_snapshot() {
    const N: u64 = 300;
    let cow = Arc::new(MemDev::new(256 << 20));
    let origin = Arc::new(MemDev::new(N * CS));
    let store = Store::format(
        cow,
        &FormatOptions {
            chunk_size: CS as u32,
            force: false,
        },
    )
    .expect("format");
    store.bind("o", "o", origin, 0).expect("bind");
    let vol = store.volume("o", None).expect("origin");
    let stop = Arc::new(AtomicBool::new(false));
    let (v2, s2) = (vol.clone(), stop.clone());
    let writer = std::thread::spawn(move || {
        let mut k = 1u8;
        while !s2.load(SeqCst) {
            v2.write(0, &vec![k; (N * CS) as usize], false)
                .expect("write");
            k = k.wrapping_add(1).max(1);
        }
    });
    let mut split = Vec::new();
    for i in 0..100 {
        let tag = store.snapshot("o", None, "", i).expect("snapshot");
        let mut buf = vec![0u8; (N * CS) as usize];
        store
            .volume("o", Some(tag))
            .expect("snapshot volume")
            .read(0, &mut buf)
            .expect("read");
        if let Some(p) = buf.iter().position(|&b| b != buf[0]) {
            split.push(format!(
                "snapshot {tag}: chunk 0 = {}, chunk {} = {}",
                buf[0],
                p as u64 / CS,
                buf[p]
            ));
        }
        store.delete("o", tag).expect("delete");
        run_background_dry(&store);
    }
    stop.store(true, SeqCst);
    writer.join().expect("writer");
    assert!(
        split.is_empty(),
        "{} of 100 snapshots hold part of a write: {:?}",
        split.len(),
        &split[..split.len().min(3)]
    );
}
