//! The concurrent crash simulator: the real engine's threads under a seeded,
//! deterministic scheduler (shuttle), a power cut at a step the seed
//! chooses, then a single-threaded reopen checked against the contract.
//!
//! The other modes check the engine in halves: the sequential simulator
//! crashes it on one thread, loom runs tiny models on many threads, the
//! stress test runs many threads and never crashes. The real server is
//! both at once, and that quadrant is this module's.
//!
//! One execution (one seed):
//! 1. Format a COW device and bind a small origin, both `SimDev`s behind a
//!    `YieldDev` (every I/O is a scheduling point, as a real disk's latency
//!    is). Fill the origin and take a snapshot and a snapshot of it, durably.
//! 2. Arm a power cut at the n-th write or flush, n drawn from the seed.
//! 3. Run `CLIENTS` client threads (origin and snapshot writes, FUA, FLUSH,
//!    write-zeroes, trim, reads, snapshots of the origin and of snapshots,
//!    delete, rollback) and one background driver (the cleaner and the
//!    rollback copier, plus periodic flushes), all under shuttle's random or
//!    PCT scheduler seeded from the seed. The group commit runs on whichever
//!    thread needs durability, as in production. Every operation's start and
//!    end go into one log, whose order is the execution's order.
//! 4. Cut the power (if the armed cut did not fire): each device keeps,
//!    drops, tears or reorders its unflushed writes (`SimDev::crash`).
//! 5. Reopen single-threaded and check: `check` clean before and after the
//!    reopen (zero leaks, counters exact), the right snapshots exist, and
//!    every sector of every version passes the oracle below.
//!
//! The oracle (`Oracle`) keeps, per version and sector, every *candidate*
//! value with the interval of the log in which it took effect. A sector may
//! hold a candidate unless a *sure* candidate (one that is certainly in the
//! durable content) started after it ended. A write is sure when it is
//! durable by contract 3 with NBD's reply rule: FUA and completed, or
//! completed before a completed FLUSH (on any thread: the FLUSH covers every
//! write that completed before the FLUSH did), or completed before a
//! completed snapshot of its version began. A snapshot inherits its
//! parent's candidates that began before it returned; those that completed
//! before it began are sure in it (contract 2). A completed rollback
//! replaces the origin's candidates by the snapshot's at that time.
//!
//! Every random choice comes from the seed (ChaCha8 per thread, shuttle's
//! scheduler seeded with it), so a seed replays bit-identically; the run's
//! trace hash shows it.
//!
//! The seed also picks the metadata page-cache budget (`cache_budget`),
//! set after every format and open. The origin's metadata is a handful of
//! pages, within the cache's floor of 4 clean pages, so a budget alone
//! would evict nothing: a seed with a budget also binds a *ballast* origin
//! whose snapshot is zeroed whole (a few exception-tree leaves, no data),
//! closes and reopens the store before the threads start (every page
//! homed, the cache cold), and its background driver walks every
//! exception now and then (`status`, what `snapmv list` does while
//! serving). With a budget of a few pages the threads then miss (re-read
//! home blocks) and evict while they race, which is where a page-cache
//! miss handled outside the metadata lock would go wrong. Seeds with the
//! default budget run as before.

use crate::pattern::{self, Decoded, SECTOR};
use crate::simdev::{mix, Domain, Image, SimDev};
use crate::workload::CACHE_BUDGETS;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shuttle::scheduler::{PctScheduler, RandomScheduler};
use shuttle::{Config, FailurePersistence, Runner};
use snapmv_engine::dev::BlockDev;
use snapmv_engine::store::{self, Dev, FormatOptions, Store};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

const CHUNK: u32 = 4096;
/// Sectors of the origin (16 chunks of 4 KiB: small, so threads collide).
const SECTORS: u64 = 128;
const COW_SIZE: u64 = 6 << 20;
/// The stamp of the origin's initial content (0 is reserved for zeros),
/// written with FUA in the setup and logged like any write.
const INIT: u64 = 1;
/// Never completed, or not yet.
const OPEN: u64 = u64::MAX;
/// Chunks of the ballast origin: its snapshot's zero exceptions fill a few
/// exception-tree leaves (168 records at most each) no client touches.
const BALLAST_CHUNKS: u64 = 512;

/// The size of one execution.
#[derive(Clone, Copy, Debug)]
pub struct Opts {
    pub clients: usize,
    pub ops_per_client: usize,
    /// The power cut falls at a write or flush drawn from `0..cut_range`.
    pub cut_range: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            clients: 3,
            ops_per_client: 24,
            cut_range: 300,
        }
    }
}

/// What one seed did, and whether it broke the contract.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub seed: u64,
    /// A hash of the whole execution: same seed, same hash.
    pub trace_hash: u64,
    pub ops: u64,
    pub writes_ok: u64,
    pub flushes_ok: u64,
    /// Writes the oracle required to be durable after the cut.
    pub sure_writes: u64,
    /// Whether the armed power cut fired during the run.
    pub cut_mid_run: bool,
    /// The seed's page-cache budget (`None`: the engine's default).
    pub cache_budget: Option<u64>,
    /// Page-cache misses and evictions while the threads ran, and fetches
    /// dropped because a checkpoint or a free raced them (the race a miss
    /// read with no lock held must survive).
    pub cache_misses: u64,
    pub cache_evictions: u64,
    pub cache_stale_fetches: u64,
    pub failure: Option<String>,
}

impl Outcome {
    /// The one command that replays this seed.
    pub fn replay_command(&self) -> String {
        format!(
            "cargo run --release -p snapmv-sim --features shuttle --bin snapmv-sim-concurrent -- run --seed {}",
            self.seed
        )
    }
}

/// The page-cache budget of `seed`, from a stream of its own, so the
/// seed's other choices (cut point, clients, schedule) are what they were
/// before budgets existed.
pub fn cache_budget(seed: u64) -> Option<u64> {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed ^ 0xcac4_e0b0));
    CACHE_BUDGETS[rng.gen_range(0..CACHE_BUDGETS.len())]
}

/// Set `budget` on a store just formatted or opened; the default is not
/// set at all, so those seeds run exactly as before.
fn set_cache_budget(store: &Store, budget: Option<u64>) {
    if let Some(bytes) = budget {
        store.set_cache_budget(bytes);
    }
}

/// A `SimDev` whose every I/O is a scheduling point.
pub struct YieldDev(pub SimDev);

impl BlockDev for YieldDev {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> snapmv_engine::Result<()> {
        shuttle::thread::yield_now();
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> snapmv_engine::Result<()> {
        shuttle::thread::yield_now();
        self.0.write_at(offset, buf)
    }
    fn flush(&self) -> snapmv_engine::Result<()> {
        shuttle::thread::yield_now();
        self.0.flush()
    }
}

/// What an operation was. Tags: 0 is the origin.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Op {
    /// `stamp` 0 is write-zeroes.
    Write {
        tag: u64,
        lba: u64,
        n: u64,
        stamp: u64,
        fua: bool,
    },
    Trim {
        tag: u64,
        lba: u64,
        n: u64,
    },
    Flush,
    Snapshot {
        of: u64,
    },
    Delete {
        tag: u64,
    },
    Rollback {
        tag: u64,
    },
    /// A read; what it saw is in `Rec::seen`.
    Read {
        tag: u64,
        lba: u64,
        n: u64,
    },
}

/// One operation with its place in the log: started at `s`, ended at `e`
/// (`OPEN` if it never ended), successfully or not; a snapshot's new tag.
#[derive(Clone, Debug)]
struct Rec {
    op: Op,
    s: u64,
    e: u64,
    ok: bool,
    tag: Option<u64>,
    /// A read's stamps, one per sector.
    seen: Vec<u64>,
}

impl Rec {
    fn done(&self) -> bool {
        self.ok && self.e != OPEN
    }
}

/// The execution's log: a logical clock and every operation.
#[derive(Default)]
struct Log {
    clock: u64,
    recs: Vec<Rec>,
    /// Contract violations seen online (a read of garbage).
    online: Vec<String>,
}

#[derive(Clone, Default)]
struct Shared {
    log: Arc<Mutex<Log>>,
    /// Snapshot tags the clients may use.
    live: Arc<Mutex<Vec<u64>>>,
    next_stamp: Arc<Mutex<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Shared {
    fn start(&self, op: Op) -> usize {
        let mut l = lock(&self.log);
        l.clock += 1;
        let s = l.clock;
        l.recs.push(Rec {
            op,
            s,
            e: OPEN,
            ok: false,
            tag: None,
            seen: Vec::new(),
        });
        l.recs.len() - 1
    }

    fn end(&self, i: usize, ok: bool, tag: Option<u64>) {
        let mut l = lock(&self.log);
        l.clock += 1;
        let e = l.clock;
        let r = &mut l.recs[i];
        (r.e, r.ok, r.tag) = (e, ok, tag);
    }

    fn end_read(&self, i: usize, seen: Vec<u64>) {
        self.end(i, true, None);
        lock(&self.log).recs[i].seen = seen;
    }

    fn stamp(&self) -> u64 {
        let mut s = lock(&self.next_stamp);
        *s += 1;
        *s
    }

    fn pick_live(&self, rng: &mut ChaCha8Rng) -> Option<u64> {
        let l = lock(&self.live);
        (!l.is_empty()).then(|| l[rng.gen_range(0..l.len())])
    }
}

/// Run one seed under shuttle. A panic or deadlock in any thread is a
/// failure of the seed, like a contract violation.
pub fn run_seed(seed: u64, opts: &Opts) -> Outcome {
    let slot: Arc<Mutex<Option<Outcome>>> = Arc::default();
    let (slot2, opts2) = (slot.clone(), *opts);
    let mut config = Config::new();
    config.failure_persistence = FailurePersistence::None;
    config.stack_size = 1 << 20;
    config.silence_warnings = true;
    let body = move || {
        let o = execute(seed, &opts2);
        *lock(&slot2) = Some(o);
    };
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Alternate the two schedulers: uniform random preemption, and PCT
        // (a few priority changes: finds bugs of small depth with a bound).
        if seed.is_multiple_of(2) {
            Runner::new(RandomScheduler::new_from_seed(seed, 1), config).run(body);
        } else {
            Runner::new(PctScheduler::new_from_seed(seed, 3, 1), config).run(body);
        }
    }));
    let taken = lock(&slot).take();
    match (ran, taken) {
        (Ok(()), Some(o)) => o,
        (r, o) => {
            let why = match r {
                Err(p) => panic_text(&p),
                Ok(()) => "the execution produced no outcome".into(),
            };
            let mut o = o.unwrap_or_default();
            o.seed = seed;
            o.failure = Some(format!("panic or deadlock under the scheduler: {why}"));
            o
        }
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic)".into())
}

struct Machine {
    domain: Domain,
    cow: SimDev,
    origin: SimDev,
    store: Store,
    /// Whether the ballast origin is bound (the seed has a cache budget).
    ballast: bool,
}

/// Format, bind, fill the origin, and take snapshot 1 of it and 2 of 1,
/// all durable before the threads start (logged like any operation).
fn setup(seed: u64, sh: &Shared) -> Result<Machine, String> {
    let domain = Domain::new();
    let cow = SimDev::new(&domain, 0, "cow", COW_SIZE, mix(seed ^ 0xc0));
    let origin = SimDev::new(&domain, 1, "o", SECTORS * SECTOR as u64, mix(seed ^ 0x0d));
    let fo = FormatOptions {
        chunk_size: CHUNK,
        force: false,
    };
    let e = |e: snapmv_engine::Error| format!("setup: {e}");
    let store = Store::format(Arc::new(YieldDev(cow.clone())), &fo).map_err(e)?;
    set_cache_budget(&store, cache_budget(seed));
    let odev: Dev = Arc::new(YieldDev(origin.clone()));
    store.bind("o", "sim://o", odev, 0).map_err(e)?;
    let i = sh.start(Op::Write {
        tag: 0,
        lba: 0,
        n: SECTORS,
        stamp: INIT,
        fua: true,
    });
    let data = pattern::gen_run(&vec![INIT; SECTORS as usize], 0);
    let v = store.volume("o", None).map_err(e)?;
    v.write(0, &data, true).map_err(e)?;
    sh.end(i, true, None);
    for of in [0, 1] {
        let i = sh.start(Op::Snapshot { of });
        let t = store
            .snapshot("o", (of != 0).then_some(of), "", 0)
            .map_err(e)?;
        sh.end(i, true, Some(t));
        lock(&sh.live).push(t);
    }
    let mut m = Machine {
        domain,
        cow,
        origin,
        store,
        ballast: false,
    };
    if let Some(bytes) = cache_budget(seed) {
        m = add_ballast(m, seed)?;
        m.store.set_cache_budget(bytes);
    }
    Ok(m)
}

/// A fresh device for the ballast origin (its content is never read).
fn ballast_dev(domain: &Domain, seed: u64) -> SimDev {
    let size = BALLAST_CHUNKS * u64::from(CHUNK);
    SimDev::new(domain, 2, "b", size, mix(seed ^ 0xba))
}

/// Bind the ballast origin, zero its snapshot whole, then close and reopen
/// the store: the close checkpoints, so every page is homed and the
/// threads start from a cold cache. Snapshot tags 1 and 2 are taken
/// before, so the ballast snapshot is tag 3 and never in `Shared::live`.
fn add_ballast(m: Machine, seed: u64) -> Result<Machine, String> {
    let e = |e: snapmv_engine::Error| format!("setup (ballast): {e}");
    let ballast = ballast_dev(&m.domain, seed);
    let bdev: Dev = Arc::new(YieldDev(ballast.clone()));
    m.store.bind("b", "sim://b", bdev, 0).map_err(e)?;
    let t = m.store.snapshot("b", None, "ballast", 0).map_err(e)?;
    let size = BALLAST_CHUNKS * u64::from(CHUNK);
    let v = m.store.volume("b", Some(t)).map_err(e)?;
    v.write_zeroes(0, size, false).map_err(e)?;
    drop(v);
    m.store.close().map_err(e)?;
    let (o, b) = (m.origin.clone(), ballast);
    let mut resolve = |id: &str, _: &str| -> snapmv_engine::Result<Dev> {
        let dev = if id == "b" { b.clone() } else { o.clone() };
        Ok(Arc::new(YieldDev(dev)))
    };
    let store = Store::open(Arc::new(YieldDev(m.cow.clone())), &mut resolve).map_err(e)?;
    Ok(Machine {
        store,
        ballast: true,
        ..m
    })
}

fn execute(seed: u64, opts: &Opts) -> Outcome {
    let sh = Shared::default();
    *lock(&sh.next_stamp) = INIT;
    let mut out = Outcome {
        seed,
        cache_budget: cache_budget(seed),
        ..Outcome::default()
    };
    let m = match setup(seed, &sh) {
        Ok(m) => m,
        Err(f) => {
            out.failure = Some(f);
            return out;
        }
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    m.domain.cut_power_after(rng.gen_range(0..opts.cut_range));
    let mut threads = Vec::new();
    for c in 0..opts.clients {
        let (sh, store, domain) = (sh.clone(), m.store.clone(), m.domain.clone());
        let (n, cseed) = (opts.ops_per_client, mix(seed ^ (c as u64 + 1) << 32));
        threads.push(shuttle::thread::spawn(move || {
            client(cseed, n, &sh, &store, &domain)
        }));
    }
    {
        let (sh, store, domain) = (sh.clone(), m.store.clone(), m.domain.clone());
        let (steps, walks) = (opts.ops_per_client * 2, m.ballast);
        threads.push(shuttle::thread::spawn(move || {
            background(steps, walks, &sh, &store, &domain)
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    let cache = m.store.cache_stats();
    out.cache_misses = cache.misses;
    out.cache_evictions = cache.evictions;
    out.cache_stale_fetches = cache.stale_fetches;
    out.cut_mid_run = m.domain.is_dead();
    m.domain.power_off();
    let (cow, origin) = (m.cow.crash(), m.origin.crash());
    drop(m.store);
    let log = std::mem::take(&mut *lock(&sh.log));
    if std::env::var_os("SNAPMV_CONCURRENT_VERBOSE").is_some() {
        for r in &log.recs {
            eprintln!("{r:?}");
        }
    }
    out.ops = log.recs.len() as u64;
    out.writes_ok = log
        .recs
        .iter()
        .filter(|r| matches!(r.op, Op::Write { .. }) && r.done())
        .count() as u64;
    out.flushes_ok = log
        .recs
        .iter()
        .filter(|r| r.op == Op::Flush && r.done())
        .count() as u64;
    out.trace_hash = trace_hash(&log, &cow, &origin, m.domain.seq());
    let verdict = match log.online.first() {
        Some(f) => Err(f.clone()),
        None => verify(&log, cow, origin, &mut out),
    };
    out.failure = verdict.err();
    out
}

fn trace_hash(log: &Log, cow: &Image, origin: &Image, seq: u64) -> u64 {
    let mut h = mix(seq ^ cow.content_hash() ^ origin.content_hash().rotate_left(17));
    for r in &log.recs {
        let text = format!("{:?}", r);
        h = mix(h ^ u64::from(crc32c::crc32c(text.as_bytes())));
    }
    h
}

/// One client: `n` operations drawn from its own RNG, until the power goes.
fn client(seed: u64, n: usize, sh: &Shared, store: &Store, domain: &Domain) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..n {
        if domain.is_dead() {
            return;
        }
        let roll = rng.gen_range(0..100);
        match roll {
            0..=39 => data_op(&mut rng, sh, store),
            40..=54 => {
                let i = sh.start(Op::Flush);
                sh.end(i, store.flush().is_ok(), None);
            }
            55..=66 => read_check(&mut rng, sh, store),
            67..=78 => {
                let of = if rng.gen_bool(0.6) {
                    0
                } else {
                    sh.pick_live(&mut rng).unwrap_or(0)
                };
                let i = sh.start(Op::Snapshot { of });
                let r = store.snapshot("o", (of != 0).then_some(of), "", 0);
                sh.end(i, r.is_ok(), r.as_ref().ok().copied());
                if let Ok(t) = r {
                    lock(&sh.live).push(t);
                }
            }
            79..=90 => {
                let Some(tag) = sh.pick_live(&mut rng) else {
                    continue;
                };
                lock(&sh.live).retain(|t| *t != tag);
                let i = sh.start(Op::Delete { tag });
                sh.end(i, store.delete("o", tag).is_ok(), None);
            }
            _ => {
                let Some(tag) = sh.pick_live(&mut rng) else {
                    continue;
                };
                let i = sh.start(Op::Rollback { tag });
                sh.end(i, store.rollback("o", tag).is_ok(), None);
            }
        }
    }
}

/// A write, write-zeroes or trim of the origin or a live snapshot.
fn data_op(rng: &mut ChaCha8Rng, sh: &Shared, store: &Store) {
    let tag = match rng.gen_bool(0.5) {
        true => 0,
        false => sh.pick_live(rng).unwrap_or(0),
    };
    let Ok(v) = store.volume("o", (tag != 0).then_some(tag)) else {
        return;
    };
    // Often whole chunks (8 sectors), so zeroing and trim free chunks.
    let (lba, n) = match rng.gen_bool(0.3) {
        true => (
            rng.gen_range(0..SECTORS / 8) * 8,
            8 * rng.gen_range(1..=2u64),
        ),
        false => (rng.gen_range(0..SECTORS), rng.gen_range(1..=12u64)),
    };
    let n = n.min(SECTORS - lba);
    let (off, len) = (lba * SECTOR as u64, n * SECTOR as u64);
    let fua = rng.gen_bool(0.2);
    match rng.gen_range(0..10) {
        0..=6 => {
            let stamp = sh.stamp();
            let data = pattern::gen_run(&vec![stamp; n as usize], lba);
            let i = sh.start(Op::Write {
                tag,
                lba,
                n,
                stamp,
                fua,
            });
            sh.end(i, v.write(off, &data, fua).is_ok(), None);
        }
        7 | 8 => {
            let op = Op::Write {
                tag,
                lba,
                n,
                stamp: 0,
                fua,
            };
            let i = sh.start(op);
            sh.end(i, v.write_zeroes(off, len, fua).is_ok(), None);
        }
        // Trim of the origin is a no-op; of a snapshot, zeroes or not.
        _ if tag != 0 => {
            let i = sh.start(Op::Trim { tag, lba, n });
            sh.end(i, v.trim(off, len).is_ok(), None);
        }
        _ => {}
    }
}

/// Read a range of some version online: every sector must be a whole
/// stamp written for that very sector (no garbage, nothing misplaced).
fn read_check(rng: &mut ChaCha8Rng, sh: &Shared, store: &Store) {
    let tag = sh.pick_live(rng).filter(|_| rng.gen_bool(0.6)).unwrap_or(0);
    let Ok(v) = store.volume("o", (tag != 0).then_some(tag)) else {
        return;
    };
    let lba = rng.gen_range(0..SECTORS);
    let n = rng.gen_range(1..=16u64).min(SECTORS - lba);
    let mut buf = vec![0u8; (n * SECTOR as u64) as usize];
    let i = sh.start(Op::Read { tag, lba, n });
    if v.read(lba * SECTOR as u64, &mut buf).is_err() {
        sh.end(i, false, None);
        return;
    }
    let mut seen = Vec::with_capacity(n as usize);
    for (k, s) in buf.chunks(SECTOR).enumerate() {
        let at = lba + k as u64;
        match pattern::decode(s, at) {
            Decoded::Stamp(v) => seen.push(v),
            d => {
                let what = format!("online read of version {tag} sector {at}: {d:?}");
                lock(&sh.log).online.push(what);
                sh.end(i, false, None);
                return;
            }
        }
    }
    // Judged after the run, against what the log says it may see.
    sh.end_read(i, seen);
}

/// The background driver, as `serve` runs it: cleaner and rollback copier
/// steps, commits of staged first writes (which destage them: no
/// durability for the oracle, but the in-place writes race the clients),
/// and a periodic flush (a FLUSH like any other for the oracle); with
/// `walks`, a periodic `status` too.
fn background(steps: usize, walks: bool, sh: &Shared, store: &Store, domain: &Domain) {
    for k in 0..steps {
        if domain.is_dead() {
            return;
        }
        let _ = store.step_background(4);
        let _ = store.commit_staged();
        if k % 4 == 3 {
            let i = sh.start(Op::Flush);
            sh.end(i, store.flush().is_ok(), None);
        }
        if walks && k % 4 == 1 {
            // Reads every exception page: with a small budget, evicts
            // pages the clients use, so their next access misses.
            let _ = store.status();
        }
        shuttle::thread::yield_now();
    }
}

/// Print a COW image's nodes, exceptions and app state (for
/// `SNAPMV_CONCURRENT_VERBOSE`).
fn dump(img: &Image, when: &str) {
    use snapmv_engine::meta::{Meta, Tree};
    use snapmv_engine::store::records::{decode_app, decode_node, node_id_from_key, split_key};
    let dev = SimDev::from_image(&Domain::new(), 0, "cow", img.clone(), 1);
    let Ok(mut m) = Meta::open_read_only(dev) else {
        eprintln!("{when}: cannot open");
        return;
    };
    eprintln!("== {when}: app {:?}", decode_app(m.app_state()));
    for (k, v) in m
        .range(Tree::Nodes, 0, u128::MAX, 10_000)
        .unwrap_or_default()
    {
        let n = node_id_from_key(k).and_then(|id| decode_node(id, &v));
        if let Ok((_, n, own)) = n {
            eprintln!(
                "  node {:#x} parent {:#x} {:?} tag {} del {} hid {} flag {}@{} own {own}",
                n.id, n.parent, n.kind, n.tag, n.deleted, n.hidden, n.flagged, n.flag_gen
            );
        }
    }
    for (k, v) in m
        .range(Tree::Exceptions, 0, u128::MAX, 10_000)
        .unwrap_or_default()
    {
        let (_, c, node) = split_key(k);
        eprintln!("  exc chunk {c} node {node:#x} -> {:?}", &v[..8]);
    }
}

/// Reopen the crash images single-threaded and check everything.
fn verify(log: &Log, cow: Image, origin: Image, out: &mut Outcome) -> Result<(), String> {
    let check = |img: &Image, when: &str| -> Result<(), String> {
        let dev = SimDev::from_image(&Domain::new(), 0, "cow", img.clone(), 1);
        let report = store::check(Arc::new(dev)).map_err(|e| format!("check {when}: {e}"))?;
        match report.errors.is_empty() {
            true => Ok(()),
            false => Err(format!("check {when}: {:?}", report.errors)),
        }
    };
    let verbose = std::env::var_os("SNAPMV_CONCURRENT_VERBOSE").is_some();
    if verbose {
        dump(&cow, "crash image");
    }
    check(&cow, "of the crash image")?;
    let domain = Domain::new();
    let cdev = SimDev::from_image(&domain, 0, "cow", cow, 1);
    let odev = SimDev::from_image(&domain, 1, "o", origin, 1);
    let mut resolve = |id: &str, _: &str| -> snapmv_engine::Result<Dev> {
        match id {
            // The ballast's content is never read: a fresh device of its size.
            "b" => Ok(Arc::new(ballast_dev(&domain, 1))),
            _ => Ok(Arc::new(odev.clone())),
        }
    };
    let store = Store::open(Arc::new(cdev.clone()), &mut resolve)
        .map_err(|e| format!("reopen after the cut: {e}"))?;
    set_cache_budget(&store, out.cache_budget);
    let oracle = Oracle::new(log);
    out.sure_writes = oracle.sure_writes();
    oracle.check_reads()?;
    oracle.check_versions(&store)?;
    // Let the cleaner and copier finish, close, and check again.
    for _ in 0..10_000 {
        let step = store.step_background(1);
        if verbose {
            store.flush().map_err(|e| format!("flush: {e}"))?;
            dump(&cdev.current(), &format!("after a step: {step:?}"));
        }
        match step {
            Ok(r) if !r.more => break,
            Ok(_) => {}
            Err(e) => return Err(format!("background work after reopen: {e}")),
        }
    }
    oracle.check_versions(&store)?;
    store
        .close()
        .map_err(|e| format!("close after reopen: {e}"))?;
    check(&cdev.current(), "after reopen, cleaning and close")
}

/// One candidate value of a sector (see the module docs).
#[derive(Clone, Copy, Debug)]
struct Cand {
    /// The stamp (0: zeros).
    val: u64,
    s: u64,
    e: u64,
    /// Certainly applied (before any later `s`).
    applied: bool,
    /// Certainly in the durable content.
    sure: bool,
}

struct Oracle<'a> {
    recs: &'a [Rec],
    /// Tag -> (parent tag, index of the creating operation).
    snaps: BTreeMap<u64, (u64, usize)>,
}

impl<'a> Oracle<'a> {
    fn new(log: &'a Log) -> Self {
        let mut snaps = BTreeMap::new();
        for (i, r) in log.recs.iter().enumerate() {
            if let (Op::Snapshot { of }, Some(t), true) = (&r.op, r.tag, r.done()) {
                snaps.insert(t, (*of, i));
            }
        }
        Oracle {
            recs: &log.recs,
            snaps,
        }
    }

    /// Whether a completed write of `tag` is durable by contract 3.
    fn durable(&self, w: &Rec, tag: u64) -> bool {
        let Op::Write { fua, .. } = w.op else {
            return false;
        };
        w.done()
            && (fua
                || self.recs.iter().any(|r| match r.op {
                    Op::Flush => r.done() && w.e < r.e,
                    Op::Snapshot { of } => r.done() && of == tag && w.e < r.s,
                    _ => false,
                }))
    }

    fn sure_writes(&self) -> u64 {
        let mut n = 0;
        for w in self.recs {
            if let Op::Write { tag, .. } = w.op {
                n += u64::from(self.durable(w, tag));
            }
        }
        n
    }

    /// Candidates of every sector of version `tag`, counting only
    /// operations that started before `upto`.
    fn cands(&self, tag: u64, upto: u64) -> Vec<Vec<Cand>> {
        let mut out = match tag {
            0 => vec![Vec::new(); SECTORS as usize],
            t => {
                let Some(&(parent, ci)) = self.snaps.get(&t) else {
                    return vec![Vec::new(); SECTORS as usize];
                };
                let c = &self.recs[ci];
                let from = self.cands(parent, c.e.min(upto));
                from.into_iter().map(|v| inherit(v, c.s, c.e)).collect()
            }
        };
        for r in self.recs.iter().filter(|r| r.s < upto) {
            match r.op {
                Op::Write {
                    tag: t,
                    lba,
                    n,
                    stamp,
                    ..
                } if t == tag => {
                    let sure = self.durable(r, tag);
                    let c = Cand {
                        val: stamp,
                        s: r.s,
                        e: if r.ok { r.e } else { OPEN },
                        applied: r.done(),
                        sure,
                    };
                    (lba..lba + n).for_each(|x| out[x as usize].push(c));
                }
                Op::Trim { tag: t, lba, n } if t == tag => {
                    let c = Cand {
                        val: 0,
                        s: r.s,
                        e: if r.ok { r.e } else { OPEN },
                        applied: false,
                        sure: false,
                    };
                    (lba..lba + n).for_each(|x| out[x as usize].push(c));
                }
                Op::Rollback { tag: src } if tag == 0 && self.snaps.contains_key(&src) => {
                    let from = self.cands(src, r.e.min(upto));
                    let replace = r.done() && r.e < upto;
                    for (x, v) in from.into_iter().enumerate() {
                        rolled_back(&mut out[x], v, r, replace);
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Every read made while the threads ran: each sector holds a value
    /// some write there may have left, and none that a write definitely
    /// applied before the read began had overtaken (contracts 1 and 2
    /// online: a snapshot read racing an origin overwrite, a write that
    /// landed on the wrong side of a snapshot).
    fn check_reads(&self) -> Result<(), String> {
        for r in self.recs.iter().filter(|r| r.done()) {
            let Op::Read { tag, lba, .. } = r.op else {
                continue;
            };
            if tag != 0 && !self.snaps.contains_key(&tag) {
                continue;
            }
            let cands = self.cands(tag, r.e);
            for (k, &val) in r.seen.iter().enumerate() {
                let x = (lba + k as u64) as usize;
                let overtaken = |c: &Cand, d: &Cand| d.applied && d.e < r.s && d.s > c.e;
                allowed_by(&cands[x], val, overtaken).map_err(|why| {
                    format!(
                        "online read [{}, {}] of version {tag} sector {x}: {why}",
                        r.s, r.e
                    )
                })?;
            }
        }
        Ok(())
    }

    /// Which snapshots must exist, and every sector of every version.
    fn check_versions(&self, store: &Store) -> Result<(), String> {
        let listed: BTreeSet<u64> = store
            .versions()
            .into_iter()
            .filter(|v| v.origin == "o")
            .filter_map(|v| v.tag)
            .collect();
        for &t in self.snaps.keys() {
            let deletes: Vec<&Rec> = self
                .recs
                .iter()
                .filter(|r| r.op == Op::Delete { tag: t })
                .collect();
            let gone = deletes.iter().any(|r| r.done());
            let maybe = !deletes.is_empty() && !gone;
            match (listed.contains(&t), gone, maybe) {
                (true, true, _) => {
                    return Err(format!("snapshot {t} exists after its delete returned"))
                }
                (false, false, false) => {
                    return Err(format!(
                        "snapshot {t} is gone, though its creation returned"
                    ))
                }
                _ => {}
            }
        }
        for v in std::iter::once(0).chain(listed.iter().copied()) {
            self.check_version(store, v)?;
        }
        Ok(())
    }

    fn check_version(&self, store: &Store, tag: u64) -> Result<(), String> {
        let vol = store
            .volume("o", (tag != 0).then_some(tag))
            .map_err(|e| format!("open version {tag}: {e}"))?;
        let mut buf = vec![0u8; (SECTORS * SECTOR as u64) as usize];
        vol.read(0, &mut buf)
            .map_err(|e| format!("read version {tag} after the cut: {e}"))?;
        // A snapshot whose creation did not return: only "no garbage".
        let cands = self.snaps.contains_key(&tag).then(|| self.cands(tag, OPEN));
        for (x, s) in buf.chunks(SECTOR).enumerate() {
            let val = match pattern::decode(s, x as u64) {
                Decoded::Stamp(v) => v,
                d => return Err(format!("version {tag} sector {x}: {d:?}")),
            };
            if let Some(c) = &cands {
                allowed(&c[x], val).map_err(|why| format!("version {tag} sector {x}: {why}"))?;
            }
        }
        Ok(())
    }
}

/// A snapshot's view of its parent's candidates at creation [cs, ce].
fn inherit(parent: Vec<Cand>, cs: u64, ce: u64) -> Vec<Cand> {
    parent
        .into_iter()
        .filter(|c| c.s < ce)
        .map(|c| {
            let before = c.applied && c.e < cs;
            Cand {
                e: c.e.min(ce),
                applied: before,
                sure: before,
                ..c
            }
        })
        .collect()
}

/// The origin's candidates at one sector after rollback `r` onto a
/// snapshot whose candidates there are `src`.
fn rolled_back(origin: &mut Vec<Cand>, src: Vec<Cand>, r: &Rec, replace: bool) {
    // The snapshot's content when the rollback froze it: candidates not
    // overtaken by an applied one before the rollback began.
    let at_start: Vec<Cand> = src
        .iter()
        .filter(|c| !src.iter().any(|d| d.applied && d.e < r.s && d.s > c.e))
        .copied()
        .collect();
    if replace {
        // What certainly happened before the rollback is gone; writes that
        // overlapped it may have landed on either side.
        origin.retain(|c| c.e >= r.s);
    }
    for c in at_start {
        let sure = replace && c.applied && c.e < r.s;
        origin.push(Cand {
            val: c.val,
            s: r.s,
            e: if r.ok { r.e } else { OPEN },
            applied: sure,
            sure,
        });
    }
}

/// Whether a sector may hold `val` after a crash, given its candidates:
/// not overtaken by a durable write.
fn allowed(cands: &[Cand], val: u64) -> Result<(), String> {
    allowed_by(cands, val, |c, d| d.sure && d.s > c.e)
        .map_err(|why| format!("{why} (lost a durable write)"))
}

/// Whether a sector may hold `val`: some candidate with that value that no
/// other candidate has certainly overtaken (`overtaken(c, d)`).
fn allowed_by(
    cands: &[Cand],
    val: u64,
    overtaken: impl Fn(&Cand, &Cand) -> bool,
) -> Result<(), String> {
    let matching: Vec<&Cand> = cands.iter().filter(|c| c.val == val).collect();
    if matching.is_empty() {
        return Err(format!(
            "holds stamp {val}, which no write there could have left"
        ));
    }
    let newer = |c: &Cand| cands.iter().find(|d| overtaken(c, d)).copied();
    match matching.iter().find(|c| newer(c).is_none()) {
        Some(_) => Ok(()),
        None => Err(format!(
            "holds stamp {val}, older than {:?}",
            newer(matching[0])
        )),
    }
}
