//! Exhaustive crash states of short scripted workloads (after ALICE and
//! CrashMonkey).
//!
//! Each workload runs some setup, then *records* every write and flush of
//! the calls under test, on every device, in global order. The crash
//! points are: just before each recorded flush (on any device), and the end
//! of the recording. A crash between two writes of one flush epoch is not a
//! separate point: its states are the subsets of the longer epoch that
//! omit the later writes, which the subset enumeration already contains.
//!
//! At each crash point, each device has a durable image (everything up to
//! its last flush) and an epoch (its writes since). Its crash states are:
//!
//! 1. **Subsets and orders.** Every subset of the epoch's writes when the
//!    epoch has at most `Limits::all_subsets` writes; otherwise every subset
//!    of at most two writes, every subset missing at most two, and every
//!    issue-order prefix. Each chosen subset is applied in every order that
//!    matters: writes that do not overlap commute, so only the orders within
//!    each group of mutually overlapping writes are enumerated (all
//!    permutations for groups up to `Limits::perm_group`, else issue order
//!    and its reverse).
//! 2. **Torn writes.** One write torn at 512-byte granularity: for a write
//!    of at most `Limits::full_tear_sectors` sectors, every proper non-empty
//!    subset of its sectors; for a longer one, every prefix and every suffix
//!    of 1..=7 sectors, of every multiple of 8 sectors, and missing the last
//!    or first 1..=7 sectors, plus the even-sector and odd-sector halves.
//!    The torn write is combined with every subset of the epoch's other
//!    writes when the epoch has at most `Limits::torn_with_subsets` writes,
//!    else with none of them and with all of them, applied in issue order.
//!
//! The states of all devices are combined (cross product), and states with
//! identical content on every device are checked once. Each distinct state
//! is booted, and held to the model of "the calls before the crash point
//! completed, the one it interrupted may or may not have happened":
//! versions present, every sector of every version, and `meta::check`.

use crate::harness::{Failure, RunOpts, Stats, World};
use crate::model::{Model, VKey};
use crate::simdev::{mix, Event, EventKind, Image, WriteRec};
use crate::workload::{Config, Generator, Op};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub all_subsets: usize,
    pub perm_group: usize,
    pub full_tear_sectors: usize,
    pub torn_with_subsets: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            all_subsets: 12,
            perm_group: 5,
            full_tear_sectors: 8,
            torn_with_subsets: 6,
        }
    }
}

/// One crash state of one device.
#[derive(Clone)]
pub struct DevState {
    pub img: Image,
    pub hash: u64,
    pub desc: String,
}

/// Subsets of `0..n` to try (see the module comment).
fn subsets(n: usize, lim: &Limits) -> Vec<Vec<bool>> {
    if n <= lim.all_subsets {
        return (0..1u64 << n)
            .map(|m| (0..n).map(|i| m >> i & 1 == 1).collect())
            .collect();
    }
    let mut out: Vec<Vec<bool>> = Vec::new();
    let mut push = |v: Vec<bool>| {
        if !out.contains(&v) {
            out.push(v)
        }
    };
    push(vec![false; n]);
    push(vec![true; n]);
    for i in 0..n {
        for j in i..n {
            let v: Vec<bool> = (0..n).map(|k| k == i || k == j).collect();
            push(v.iter().map(|b| !b).collect());
            push(v);
        }
        push((0..n).map(|k| k < i).collect());
    }
    out
}

fn permutations(items: &[usize]) -> Vec<Vec<usize>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for i in 0..items.len() {
        let mut rest = items.to_vec();
        let x = rest.remove(i);
        for mut p in permutations(&rest) {
            p.insert(0, x);
            out.push(p);
        }
    }
    out
}

/// Groups of mutually overlapping writes among `chosen` (connected
/// components of the overlap graph), each in issue order.
fn overlap_groups(epoch: &[WriteRec], chosen: &[usize]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for &i in chosen {
        let hits: Vec<usize> = groups
            .iter()
            .enumerate()
            .filter(|(_, g)| g.iter().any(|&j| epoch[j].overlaps(&epoch[i])))
            .map(|(gi, _)| gi)
            .collect();
        let mut merged = vec![i];
        for gi in hits.iter().rev() {
            merged.extend(groups.remove(*gi));
        }
        merged.sort_unstable();
        groups.push(merged);
    }
    groups
}

/// Tear patterns of a write of `k` pieces (see the module comment).
pub fn tear_patterns(k: usize, lim: &Limits) -> Vec<(Vec<bool>, String)> {
    let mut out: Vec<(Vec<bool>, String)> = Vec::new();
    if k < 2 {
        return out;
    }
    if k <= lim.full_tear_sectors {
        for m in 1..(1u64 << k) - 1 {
            let v: Vec<bool> = (0..k).map(|i| m >> i & 1 == 1).collect();
            out.push((v, format!("sectors {m:0k$b}")));
        }
        return out;
    }
    let mut lens: Vec<usize> = (1..=7).collect();
    lens.extend((8..k).step_by(8));
    lens.extend(k.saturating_sub(7)..k);
    lens.sort_unstable();
    lens.dedup();
    for p in lens.into_iter().filter(|&p| p >= 1 && p < k) {
        out.push(((0..k).map(|i| i < p).collect(), format!("first {p}/{k}")));
        out.push((
            (0..k).map(|i| i >= k - p).collect(),
            format!("last {p}/{k}"),
        ));
    }
    out.push(((0..k).map(|i| i % 2 == 0).collect(), format!("even/{k}")));
    out.push(((0..k).map(|i| i % 2 == 1).collect(), format!("odd/{k}")));
    out
}

fn describe(epoch: &[WriteRec], order: &[usize], torn: Option<(usize, &str)>) -> String {
    let mut s: Vec<String> = order
        .iter()
        .map(|&i| match torn {
            Some((t, d)) if t == i => format!("w{i} torn[{d}]"),
            _ => format!("w{i}"),
        })
        .collect();
    if s.is_empty() {
        s.push("none".into());
    }
    let _ = epoch;
    format!("applied: {}", s.join(" then "))
}

/// Every crash state of one device (deduplicated by content), and the
/// number of raw states enumerated before deduplication.
pub fn enumerate_device(durable: &Image, epoch: &[WriteRec], lim: &Limits) -> (Vec<DevState>, u64) {
    let n = epoch.len();
    let mut out: Vec<DevState> = Vec::new();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut raw = 0u64;
    let mut emit = |img: Image, desc: String, out: &mut Vec<DevState>| {
        raw += 1;
        let h = img.content_hash();
        if seen.insert(h) {
            out.push(DevState { img, hash: h, desc });
        }
    };
    // 1. Subsets, in every order that matters.
    for sub in subsets(n, lim) {
        let chosen: Vec<usize> = (0..n).filter(|&i| sub[i]).collect();
        let groups = overlap_groups(epoch, &chosen);
        let per_group: Vec<Vec<Vec<usize>>> = groups
            .iter()
            .map(|g| {
                if g.len() <= lim.perm_group {
                    permutations(g)
                } else {
                    let mut r = g.clone();
                    r.reverse();
                    vec![g.clone(), r]
                }
            })
            .collect();
        // Cross product of the groups' orders.
        let mut orders: Vec<Vec<usize>> = vec![Vec::new()];
        for opts in &per_group {
            let mut next = Vec::new();
            for o in &orders {
                for p in opts {
                    let mut x = o.clone();
                    x.extend(p);
                    next.push(x);
                }
            }
            orders = next;
        }
        for order in orders {
            let mut img = durable.clone();
            for &i in &order {
                epoch[i].apply(&mut img, None);
            }
            emit(img, describe(epoch, &order, None), &mut out);
        }
    }
    // 2. One torn write, with some or all of the others.
    for t in 0..n {
        let k = epoch[t].pieces().len();
        let others: Vec<Vec<bool>> = if n <= lim.torn_with_subsets {
            (0..1u64 << n)
                .filter(|m| m >> t & 1 == 0)
                .map(|m| (0..n).map(|i| m >> i & 1 == 1).collect())
                .collect()
        } else {
            vec![vec![false; n], (0..n).map(|i| i != t).collect()]
        };
        for (pat, pdesc) in tear_patterns(k, lim) {
            for o in &others {
                let mut img = durable.clone();
                let mut order = Vec::new();
                for i in 0..n {
                    if i == t {
                        epoch[i].apply(&mut img, Some(&pat));
                        order.push(i);
                    } else if o[i] {
                        epoch[i].apply(&mut img, None);
                        order.push(i);
                    }
                }
                emit(img, describe(epoch, &order, Some((t, &pdesc))), &mut out);
            }
        }
    }
    (out, raw)
}

/// A device's durable image and epoch at the start of a recording.
#[derive(Clone)]
struct Base {
    durable: Image,
    epoch: Vec<WriteRec>,
}

/// The durable image and epoch of each device just before event `upto`.
fn state_at(bases: &[Base], events: &[Event], upto: usize) -> Vec<(Image, Vec<WriteRec>)> {
    let mut st: Vec<(Image, Vec<WriteRec>)> = bases
        .iter()
        .map(|b| (b.durable.clone(), b.epoch.clone()))
        .collect();
    for e in &events[..upto] {
        let (img, ep) = &mut st[e.dev];
        match &e.kind {
            EventKind::Write(w) => ep.push(w.clone()),
            EventKind::Flush => {
                for w in ep.drain(..) {
                    w.apply(img, None);
                }
            }
        }
    }
    st
}

/// Report for one workload.
#[derive(Clone, Debug, Default)]
pub struct WorkloadReport {
    pub name: String,
    pub recorded_ios: usize,
    pub crash_points: usize,
    /// States enumerated before deduplication (sum over crash points of the
    /// product of the devices' raw state counts).
    pub raw_states: u64,
    /// Distinct states, each booted and checked.
    pub checked: u64,
    pub failures: Vec<(String, Failure)>,
    pub secs: f64,
    pub stats: Stats,
    pub note: String,
}

/// A scripted workload: `setup` runs on a fresh world and returns the
/// operations to record.
pub struct Script {
    pub name: &'static str,
    pub about: &'static str,
    pub setup: fn(&mut World, &mut Generator) -> Result<Vec<Op>, Failure>,
    /// The machine (default: one 128 KiB origin, 16 KiB chunks, 4 MiB COW).
    pub config: fn() -> Config,
    /// Adjust the enumeration limits for this workload (default: as given).
    pub limits: fn(Limits) -> Limits,
}

fn same(l: Limits) -> Limits {
    l
}

fn small_config() -> Config {
    let mut c = Config::standard();
    c.origins = 1;
    c.origin_sectors = vec![256]; // 128 KiB: 8 chunks of 16 KiB
    c.chunk_size = 16 << 10;
    c.cow_bytes = 4 << 20;
    c
}

const CS: u64 = 32; // sectors per 16 KiB chunk

/// Sectors per 64 KiB chunk (the `reuse-after-free` machine).
const FCS: u64 = 128;

/// A COW device smaller than the origin, so it can be filled; 64 KiB
/// chunks so the allocator's reserve (64 blocks) is only 4 chunks.
fn full_config() -> Config {
    let mut c = small_config();
    c.chunk_size = 64 << 10;
    c.origin_sectors = vec![32 * FCS]; // 2 MiB
    c.cow_bytes = 3 << 20;
    c
}

fn o0() -> VKey {
    VKey {
        origin: 0,
        tag: None,
    }
}

fn snap(t: u64) -> VKey {
    VKey {
        origin: 0,
        tag: Some(t),
    }
}

fn last_tag(w: &World) -> u64 {
    w.model.snapshots_of(0).into_iter().max().unwrap_or(0)
}

fn run(w: &mut World, g: &mut Generator, ops: &[Op]) -> Result<(), Failure> {
    for op in ops {
        w.exec(op.clone(), g)?;
        w.op += 1;
    }
    Ok(())
}

fn wr(v: VKey, lba: u64, n: u64) -> Op {
    Op::Write {
        v,
        lba,
        n,
        fua: false,
    }
}

pub fn scripts() -> Vec<Script> {
    vec![
        Script {
            name: "snapshot-during-writes",
            about: "unflushed origin writes, then a snapshot, then origin writes over the same chunks",
            config: small_config,
            limits: same,
            setup: |w, g| {
                run(w, g, &[wr(o0(), 0, 8), Op::StoreFlush, wr(o0(), 3, 40), Op::Write { v: o0(), lba: 100, n: 4, fua: true }])?;
                Ok(vec![Op::Snapshot { origin: 0, of: None }, wr(o0(), 4, 8)])
            },
        },
        Script {
            name: "first-origin-write-after-snapshot",
            about: "the first write to chunks a snapshot shares: copy, durable copy + mapping, then overwrite",
            config: small_config,
            limits: same,
            setup: |w, g| {
                run(w, g, &[wr(o0(), 0, 64), Op::Snapshot { origin: 0, of: None }, Op::StoreFlush])?;
                Ok(vec![wr(o0(), CS - 2, 4), Op::Write { v: o0(), lba: 2 * CS + 5, n: 3, fua: true }])
            },
        },
        Script {
            name: "snapshot-write-with-children",
            about: "a write to a snapshot whose child still shares the chunk",
            config: small_config,
            limits: same,
            setup: |w, g| {
                run(w, g, &[Op::Snapshot { origin: 0, of: None }])?;
                let t1 = last_tag(w);
                run(w, g, &[wr(snap(t1), CS, 8), Op::Snapshot { origin: 0, of: Some(t1) }, Op::StoreFlush])?;
                let t2 = last_tag(w);
                Ok(vec![wr(snap(t1), CS + 4, 8), wr(snap(t2), CS + 6, 2), Op::Flush { v: snap(t1) }])
            },
        },
        Script {
            name: "delete-with-cleaner",
            about: "delete a snapshot, step the cleaner, and allocate while it runs",
            config: small_config,
            limits: same,
            setup: |w, g| {
                run(w, g, &[Op::Snapshot { origin: 0, of: None }])?;
                let t1 = last_tag(w);
                run(w, g, &[wr(snap(t1), 0, CS), wr(snap(t1), 2 * CS, CS), Op::Snapshot { origin: 0, of: None }])?;
                let t2 = last_tag(w);
                run(w, g, &[wr(o0(), 4 * CS, 4), Op::StoreFlush])?;
                Ok(vec![
                    Op::Delete { origin: 0, tag: t1 },
                    Op::Step { budget: 1 },
                    wr(snap(t2), 5 * CS, CS),
                    Op::Step { budget: 1 },
                    wr(snap(t2), 6 * CS, 8),
                    Op::Step { budget: 64 },
                    Op::StoreFlush,
                ])
            },
        },
        Script {
            name: "rollback-midway",
            about: "rollback, a copier step, an origin write to a chunk not yet copied, more steps",
            config: small_config,
            limits: same,
            setup: |w, g| {
                run(w, g, &[wr(o0(), 0, 8 * CS), Op::StoreFlush, Op::Snapshot { origin: 0, of: None }])?;
                let t1 = last_tag(w);
                run(w, g, &[wr(o0(), CS, CS), wr(o0(), 4 * CS + 3, 9), wr(snap(t1), 6 * CS, 4), Op::StoreFlush])?;
                Ok(vec![
                    Op::Rollback { origin: 0, tag: t1 },
                    Op::Step { budget: 1 },
                    wr(o0(), 6 * CS + 1, 2),
                    Op::Step { budget: 2 },
                    Op::Step { budget: 64 },
                ])
            },
        },
        Script {
            name: "rollback-twice",
            about: "rollback T to completion, write T across two chunks, rollback T again",
            config: small_config,
            limits: same,
            setup: |w, g| {
                run(w, g, &[wr(o0(), 0, 8 * CS), Op::StoreFlush, Op::Snapshot { origin: 0, of: None }])?;
                let t1 = last_tag(w);
                run(w, g, &[wr(snap(t1), CS + 1, 2 * CS), wr(o0(), 0, 4 * CS), Op::StoreFlush])?;
                run(w, g, &[Op::Rollback { origin: 0, tag: t1 }, Op::Step { budget: 64 }])?;
                Ok(vec![
                    wr(snap(t1), CS, 2 * CS),
                    Op::Rollback { origin: 0, tag: t1 },
                    Op::Step { budget: 1 },
                    Op::Step { budget: 64 },
                ])
            },
        },
        Script {
            name: "write-snapshot-during-rollback",
            about: "rollback T, then writes to T and to the origin before the copier reaches them",
            config: small_config,
            limits: same,
            setup: |w, g| {
                run(w, g, &[wr(o0(), 0, 8 * CS), Op::StoreFlush, Op::Snapshot { origin: 0, of: None }])?;
                let t1 = last_tag(w);
                run(w, g, &[wr(o0(), 2 * CS, 4 * CS), Op::StoreFlush])?;
                Ok(vec![
                    Op::Rollback { origin: 0, tag: t1 },
                    wr(snap(t1), 3 * CS - 4, 8),
                    wr(o0(), 5 * CS + 2, 4),
                    Op::Step { budget: 3 },
                    Op::StoreFlush,
                    Op::Step { budget: 64 },
                ])
            },
        },
        Script {
            name: "delete-parent-of-snapshot",
            about: "delete a snapshot that has a child (merge), with the cleaner moving chunks",
            config: small_config,
            limits: same,
            setup: |w, g| {
                run(w, g, &[Op::Snapshot { origin: 0, of: None }])?;
                let t1 = last_tag(w);
                run(w, g, &[wr(snap(t1), 0, 2 * CS), Op::Snapshot { origin: 0, of: Some(t1) }])?;
                let t2 = last_tag(w);
                run(w, g, &[wr(snap(t1), CS, 4), wr(o0(), 3 * CS, 4), Op::StoreFlush])?;
                Ok(vec![
                    Op::Delete { origin: 0, tag: t1 },
                    Op::Step { budget: 2 },
                    wr(snap(t2), 8, 4),
                    Op::Step { budget: 64 },
                    Op::StoreFlush,
                ])
            },
        },
        Script {
            name: "reuse-after-free",
            about: "full device: write_zeroes frees chunks a live snapshot still durably maps; then allocations",
            config: full_config,
            // Five one-chunk writes per epoch: a torn one is combined with
            // none or all of the others (not every subset).
            limits: |l| Limits {
                torn_with_subsets: 1,
                ..l
            },
            setup: |w, g| {
                run(w, g, &[Op::Snapshot { origin: 0, of: None }])?;
                let t1 = last_tag(w);
                run(w, g, &[Op::Snapshot { origin: 0, of: None }])?;
                let t2 = last_tag(w);
                // Fill the device through t1, one fresh chunk at a time,
                // until the allocator refuses (it keeps a reserve back).
                let mut c = 0;
                while c < 32 && w.stats.nospace == 0 {
                    run(w, g, &[wr(snap(t1), c * FCS, FCS)])?;
                    c += 1;
                }
                run(w, g, &[Op::StoreFlush])?;
                // Free five of t1's chunks, then allocate five: the free
                // chunks past the allocation cursor (the reserve) run out,
                // and the allocator wraps to the chunks just freed, which
                // it may only reuse once their free has committed.
                let mut ops = vec![Op::Zero { v: snap(t1), lba: 0, n: 5 * FCS, fua: false }];
                for i in 0..5 {
                    ops.push(wr(snap(t2), (20 + i) * FCS, FCS));
                }
                ops.push(Op::StoreFlush);
                Ok(ops)
            },
        },
        Script {
            name: "metadata-commit",
            about: "snapshot writes that allocate, then the commit that makes their mappings durable",
            config: small_config,
            limits: same,
            setup: |w, g| {
                run(w, g, &[Op::Snapshot { origin: 0, of: None }, Op::StoreFlush])?;
                let t1 = last_tag(w);
                Ok(vec![
                    wr(snap(t1), 0, 4),
                    wr(snap(t1), 3 * CS, CS),
                    Op::Zero { v: snap(t1), lba: 5 * CS, n: 8, fua: false },
                    Op::StoreFlush,
                ])
            },
        },
    ]
}

/// The special workload: commit until a commit also checkpoints the journal
/// (writes a superblock), and enumerate that commit.
fn checkpoint_script() -> &'static str {
    "checkpoint"
}

/// Run one workload: setup, record, enumerate, check.
pub fn run_script(s: &Script, lim: &Limits, verbose: bool, stop_at_first: bool) -> WorkloadReport {
    let start = Instant::now();
    let mut rep = WorkloadReport {
        name: s.name.to_string(),
        ..Default::default()
    };
    crate::harness::install_panic_hook();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), Failure> {
        let opts = RunOpts {
            verbose,
            no_swarm: true,
            classifier: None,
            off: Vec::new(),
        };
        let seed = mix(s.name.len() as u64 ^ 0xe4au64);
        let cfg = (s.config)();
        let mut w = World::new(seed, cfg.clone(), &opts)?;
        w.auto_power_cuts = false;
        let mut g = Generator::new(cfg);
        let ops = (s.setup)(&mut w, &mut g)?;
        let lim = (s.limits)(*lim);
        record_and_check(&mut w, &mut g, &ops, &lim, stop_at_first, &mut rep)
    }));
    match res {
        Ok(Ok(())) => {}
        Ok(Err(f)) => rep.failures.push(("setup/recording".into(), f)),
        Err(_) => rep.failures.push((
            "setup/recording".into(),
            Failure {
                seed: 0,
                op: 0,
                clause: crate::harness::Clause::Panic,
                what: "engine panicked during setup or recording".into(),
                recent: vec![],
            },
        )),
    }
    rep.secs = start.elapsed().as_secs_f64();
    rep
}

fn devs(w: &World) -> Vec<crate::simdev::SimDev> {
    std::iter::once(w.cow.clone())
        .chain(w.origins.iter().cloned())
        .collect()
}

fn record_and_check(
    w: &mut World,
    g: &mut Generator,
    ops: &[Op],
    lim: &Limits,
    stop_at_first: bool,
    rep: &mut WorkloadReport,
) -> Result<(), Failure> {
    let bases: Vec<Base> = devs(w)
        .iter()
        .map(|d| Base {
            durable: d.durable(),
            epoch: d.epoch(),
        })
        .collect();
    // The model for a crash inside call i: calls before i done, call i
    // maybe. `starts[i]` is the index of call i's first event.
    let mut models: Vec<(Model, BTreeSet<u64>)> = Vec::new();
    let mut starts: Vec<usize> = Vec::new();
    let base_seq = w.domain.seq();
    w.domain.start_recording();
    for op in ops {
        models.push((w.interrupted_model(op), w.used_tags().clone()));
        starts.push((w.domain.seq() - base_seq) as usize);
        w.exec(op.clone(), g)?;
        w.op += 1;
    }
    let events = w.domain.stop_recording();
    let final_model = (w.model.clone(), w.used_tags().clone());
    check_events(
        w,
        &bases,
        &events,
        &models,
        &starts,
        &final_model,
        lim,
        stop_at_first,
        rep,
    )
}

#[allow(clippy::too_many_arguments)]
fn check_events(
    w: &World,
    bases: &[Base],
    events: &[Event],
    models: &[(Model, BTreeSet<u64>)],
    starts: &[usize],
    final_model: &(Model, BTreeSet<u64>),
    lim: &Limits,
    stop_at_first: bool,
    rep: &mut WorkloadReport,
) -> Result<(), Failure> {
    rep.recorded_ios += events.len();
    let mut points: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.kind, EventKind::Flush))
        .map(|(i, _)| i)
        .collect();
    points.push(events.len());
    rep.crash_points += points.len();
    let mut seen: HashSet<u64> = HashSet::new();
    for &p in &points {
        // Which call was running at this point: the last one started at or
        // before event p; at the very end, all calls are done.
        let (model, tags) = if p == events.len() {
            final_model
        } else {
            let i = starts.iter().rposition(|&s| s <= p).unwrap_or(0);
            &models[i]
        };
        let st = state_at(bases, events, p);
        let per_dev: Vec<(Vec<DevState>, u64)> = st
            .iter()
            .map(|(img, ep)| enumerate_device(img, ep, lim))
            .collect();
        rep.raw_states += per_dev.iter().map(|(_, r)| *r).product::<u64>();
        // Cross product over devices.
        let mut idx = vec![0usize; per_dev.len()];
        'outer: loop {
            let mut h = 0u64;
            for (d, &i) in idx.iter().enumerate() {
                h = mix(h ^ per_dev[d].0[i].hash ^ (d as u64) << 56);
            }
            if seen.insert(h) {
                let images: Vec<Image> = idx
                    .iter()
                    .enumerate()
                    .map(|(d, &i)| per_dev[d].0[i].img.clone())
                    .collect();
                rep.checked += 1;
                match w.check_state(model, tags, images) {
                    Ok(s) => rep.stats.add(&s),
                    Err(f) => {
                        let desc: Vec<String> = idx
                            .iter()
                            .enumerate()
                            .map(|(d, &i)| format!("dev{d} {}", per_dev[d].0[i].desc))
                            .collect();
                        let at = format!(
                            "crash point before event {p} of {}; {}",
                            events.len(),
                            desc.join("; ")
                        );
                        rep.failures.push((at, f));
                        if stop_at_first {
                            return Ok(());
                        }
                    }
                }
            }
            // Next combination.
            let mut d = 0;
            loop {
                if d == idx.len() {
                    break 'outer;
                }
                idx[d] += 1;
                if idx[d] < per_dev[d].0.len() {
                    break;
                }
                idx[d] = 0;
                d += 1;
            }
        }
    }
    Ok(())
}

/// The checkpoint workload: repeat (snapshot write, commit) and record
/// each round, until a round writes a superblock slot (blocks 0 and 1 of
/// the COW device); enumerate that round.
pub fn run_checkpoint(lim: &Limits, verbose: bool, stop_at_first: bool) -> WorkloadReport {
    let start = Instant::now();
    let mut rep = WorkloadReport {
        name: checkpoint_script().to_string(),
        ..Default::default()
    };
    crate::harness::install_panic_hook();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), Failure> {
        let opts = RunOpts {
            verbose,
            no_swarm: true,
            classifier: None,
            off: Vec::new(),
        };
        let cfg = small_config();
        let mut w = World::new(0xc4ec, cfg.clone(), &opts)?;
        w.auto_power_cuts = false;
        let mut g = Generator::new(cfg);
        for round in 0..400u64 {
            // Every round commits metadata (a delete, a snapshot, and the
            // copy the origin write then needs), so the journal fills.
            let mut ops = Vec::new();
            if let Some(t) = w.model.snapshots_of(0).into_iter().max() {
                ops.push(Op::Delete { origin: 0, tag: t });
            }
            ops.push(Op::Snapshot {
                origin: 0,
                of: None,
            });
            ops.push(wr(o0(), (round * 8) % 256, 8));
            let bases: Vec<Base> = devs(&w)
                .iter()
                .map(|d| Base {
                    durable: d.durable(),
                    epoch: d.epoch(),
                })
                .collect();
            let mut models = Vec::new();
            let mut starts = Vec::new();
            let base_seq = w.domain.seq();
            w.domain.start_recording();
            for op in &ops {
                models.push((w.interrupted_model(op), w.used_tags().clone()));
                starts.push((w.domain.seq() - base_seq) as usize);
                w.exec(op.clone(), &mut g)?;
                w.op += 1;
            }
            let events = w.domain.stop_recording();
            let sb = events.iter().any(|e| {
                e.dev == 0 && matches!(&e.kind, EventKind::Write(wr) if wr.offset < 2 * crate::simdev::PAGE as u64)
            });
            if sb || round == 399 {
                rep.note = if sb {
                    format!("checkpoint reached at round {round}")
                } else {
                    "no superblock write seen in 400 commits; enumerated the last".into()
                };
                let fm = (w.model.clone(), w.used_tags().clone());
                return check_events(
                    &w,
                    &bases,
                    &events,
                    &models,
                    &starts,
                    &fm,
                    lim,
                    stop_at_first,
                    &mut rep,
                );
            }
        }
        Ok(())
    }));
    match res {
        Ok(Ok(())) => {}
        Ok(Err(f)) => rep.failures.push(("setup/recording".into(), f)),
        Err(_) => rep.failures.push((
            "setup/recording".into(),
            Failure {
                seed: 0,
                op: 0,
                clause: crate::harness::Clause::Panic,
                what: "engine panicked during setup or recording".into(),
                recent: vec![],
            },
        )),
    }
    rep.secs = start.elapsed().as_secs_f64();
    rep
}

/// Names of every workload, in run order.
pub fn names() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = scripts().iter().map(|s| s.name).collect();
    v.push(checkpoint_script());
    v
}

/// Run every workload whose name contains `filter`.
pub fn run_all(
    filter: Option<&str>,
    lim: &Limits,
    verbose: bool,
    stop_at_first: bool,
) -> Vec<WorkloadReport> {
    let mut out = Vec::new();
    let want = |n: &str| filter.map(|f| n.contains(f)).unwrap_or(true);
    for s in scripts() {
        if want(s.name) {
            out.push(run_script(&s, lim, verbose, stop_at_first));
        }
    }
    if want(checkpoint_script()) {
        out.push(run_checkpoint(lim, verbose, stop_at_first));
    }
    out
}

/// Summary table lines.
pub fn table(reps: &[WorkloadReport]) -> Vec<String> {
    let mut v = vec![format!(
        "{:<34} {:>6} {:>6} {:>10} {:>9} {:>8} {:>8}",
        "workload", "I/Os", "points", "raw", "checked", "failed", "secs"
    )];
    let mut tot: BTreeMap<&str, u64> = BTreeMap::new();
    for r in reps {
        v.push(format!(
            "{:<34} {:>6} {:>6} {:>10} {:>9} {:>8} {:>8.1}",
            r.name,
            r.recorded_ios,
            r.crash_points,
            r.raw_states,
            r.checked,
            r.failures.len(),
            r.secs
        ));
        *tot.entry("raw").or_default() += r.raw_states;
        *tot.entry("checked").or_default() += r.checked;
    }
    v.push(format!(
        "{:<34} {:>6} {:>6} {:>10} {:>9}",
        "total",
        "",
        "",
        tot.get("raw").copied().unwrap_or(0),
        tot.get("checked").copied().unwrap_or(0)
    ));
    v
}

/// Run `seed` normally for `at` operations, then record the next `window`
/// operations (skipping the ones that crash, reboot or inject faults) and
/// enumerate every crash state inside them. This turns a swarm failure
/// found by one random crash into the full list of crash states that break
/// the contract at that point.
pub fn run_at(
    seed: u64,
    at: u64,
    window: u64,
    opts: &RunOpts,
    lim: &Limits,
    stop_at_first: bool,
) -> WorkloadReport {
    let start = Instant::now();
    let mut rep = WorkloadReport {
        name: format!("seed {seed} ops {at}..+{window}"),
        ..Default::default()
    };
    crate::harness::install_panic_hook();
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), Failure> {
        let cfg = crate::harness::config_for(seed, opts);
        let mut w = World::new(seed, cfg.clone(), opts)?;
        let mut g = Generator::new(cfg);
        while w.op < at {
            w.step(&mut g)?;
        }
        w.domain.disarm_power_cut();
        w.auto_power_cuts = false;
        let mut ops = Vec::new();
        while (ops.len() as u64) < window {
            let op = crate::harness::next_op(&mut w, &mut g);
            if !matches!(
                op,
                Op::Crash
                    | Op::PowerCut { .. }
                    | Op::CleanReopen
                    | Op::Eio { .. }
                    | Op::Latent { .. }
                    | Op::Corrupt
                    | Op::Misdirect
                    | Op::Fill { .. }
            ) {
                ops.push(op);
            }
        }
        if opts.verbose {
            for o in &ops {
                println!("recorded: {o}");
            }
        }
        record_and_check(&mut w, &mut g, &ops, lim, stop_at_first, &mut rep)
    }));
    match res {
        Ok(Ok(())) => {}
        Ok(Err(f)) => rep.failures.push(("setup/recording".into(), f)),
        Err(_) => rep.failures.push((
            "setup/recording".into(),
            Failure {
                seed,
                op: at,
                clause: crate::harness::Clause::Panic,
                what: "engine panicked during setup or recording".into(),
                recent: vec![],
            },
        )),
    }
    rep.secs = start.elapsed().as_secs_f64();
    rep
}

/// Run the workloads in order and stop at the first one that fails (for
/// the planted-bug self-test, where one caught bug is the point and the
/// rest may be slow: a missing flush makes epochs, and so states, explode).
pub fn run_until_failure(lim: &Limits) -> Vec<WorkloadReport> {
    let mut out = Vec::new();
    for s in scripts() {
        let r = run_script(&s, lim, false, true);
        let failed = !r.failures.is_empty();
        out.push(r);
        if failed {
            return out;
        }
    }
    out.push(run_checkpoint(lim, false, true));
    out
}
