//! The simulated machine: one COW device and its origins on `SimDev`s, the
//! engine's `Store` on top, and the model beside it. Every engine call's
//! result is checked against the model (the contract) as it happens, and
//! every reboot is checked sector by sector across every live version.

use crate::model::{Cands, Maybe, Mismatch, Model, Stamp, VKey};
use crate::pattern::{self, Decoded, SECTOR};
use crate::simdev::{mix, Domain, Fault, Image, IoKind, SimDev, PAGE};
use crate::workload::{Config, DevSel, Generator, Op};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use snapmv_engine::store::{Dev, FormatOptions, Store, Volume};
use snapmv_engine::Error;
use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;

/// The contract clause a failure breaks (DESIGN.md, "Contract"), plus the
/// two checks that are not clauses of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clause {
    Isolation,
    Atomicity,
    Durability,
    CrashStates,
    Detection,
    Space,
    /// `meta::check` found damage on a cleanly reopened device.
    Checker,
    /// The engine panicked (never acceptable, whatever the input).
    Panic,
    /// An error with no injected fault to explain it.
    UnexpectedError,
}

impl fmt::Display for Clause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Clause::Isolation => "clause 1 (isolation)",
            Clause::Atomicity => "clause 2 (snapshot atomicity)",
            Clause::Durability => "clause 3 (durability)",
            Clause::CrashStates => "clause 4 (crash states)",
            Clause::Detection => "clause 5 (detected, never silent)",
            Clause::Space => "clause 6 (space)",
            Clause::Checker => "clause 4/5 (meta::check must pass after a clean reopen)",
            Clause::Panic => "panic (engine must return errors, never panic)",
            Clause::UnexpectedError => "unexpected error (no injected fault explains it)",
        })
    }
}

#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    /// Index of the operation that exposed the failure (0-based).
    pub op: u64,
    pub clause: Clause,
    pub what: String,
    /// The last operations before it, oldest first.
    pub recent: Vec<String>,
}

impl Failure {
    pub fn replay_command(&self, ops_flag: &str) -> String {
        format!(
            "cargo run --release -p snapmv-sim -- run --seed {} --ops {} {ops_flag}--verbose",
            self.seed,
            self.op + 1
        )
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "FAILURE seed {} op {}: {}",
            self.seed, self.op, self.clause
        )?;
        writeln!(f, "  {}", self.what)?;
        if !self.recent.is_empty() {
            writeln!(f, "  last operations:")?;
            for r in &self.recent {
                writeln!(f, "    {r}")?;
            }
        }
        Ok(())
    }
}

/// Counters for a run (and summed over a campaign).
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    pub snapshots: u64,
    pub deletes: u64,
    pub rollbacks: u64,
    pub steps: u64,
    pub crashes: u64,
    pub clean_reopens: u64,
    pub power_cuts_fired: u64,
    pub nospace: u64,
    pub refused: u64,
    pub faults_surfaced: u64,
    pub damage_injected: u64,
    pub damage_detected: u64,
    pub damage_unread: u64,
    pub sectors_verified: u64,
    pub checker_runs: u64,
    /// Metadata page-cache misses (home-block reads) and evictions, summed
    /// over every store the run opened: zero unless the seed's cache
    /// budget is small.
    pub cache_misses: u64,
    pub cache_evictions: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.ops += o.ops;
        self.reads += o.reads;
        self.writes += o.writes;
        self.snapshots += o.snapshots;
        self.deletes += o.deletes;
        self.rollbacks += o.rollbacks;
        self.steps += o.steps;
        self.crashes += o.crashes;
        self.clean_reopens += o.clean_reopens;
        self.power_cuts_fired += o.power_cuts_fired;
        self.nospace += o.nospace;
        self.refused += o.refused;
        self.faults_surfaced += o.faults_surfaced;
        self.damage_injected += o.damage_injected;
        self.damage_detected += o.damage_detected;
        self.damage_unread += o.damage_unread;
        self.sectors_verified += o.sectors_verified;
        self.checker_runs += o.checker_runs;
        self.cache_misses += o.cache_misses;
        self.cache_evictions += o.cache_evictions;
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ops {} (reads {} writes {} snapshots {} deletes {} rollbacks {} steps {}), \
             reboots: crash {} clean {} power-cut {}, ENOSPC {}, refused {}, faults surfaced {}, \
             metadata damage: injected {} detected {} never-read {}, sectors verified {}, checker runs {}, \
             page cache: misses {} evictions {}",
            self.ops,
            self.reads,
            self.writes,
            self.snapshots,
            self.deletes,
            self.rollbacks,
            self.steps,
            self.crashes,
            self.clean_reopens,
            self.power_cuts_fired,
            self.nospace,
            self.refused,
            self.faults_surfaced,
            self.damage_injected,
            self.damage_detected,
            self.damage_unread,
            self.sectors_verified,
            self.checker_runs,
            self.cache_misses,
            self.cache_evictions
        )
    }
}

/// How an engine call ended, as far as the oracle cares.
enum Res<T> {
    Ok(T),
    NoSpace,
    /// A refusal the contract allows (busy, invalid for this engine).
    Refused(String),
    /// An error explained by an injected I/O fault.
    Faulted(String),
    /// Power was lost inside the call.
    PowerLost,
}

/// Metadata damage to apply at the next crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DamageKind {
    BitFlip,
    Misdirect,
}

/// Decides which 4 KiB blocks of a COW image hold metadata, so damage is
/// aimed where contract 5 applies (a flipped data chunk is undetectable by
/// design: there are no data checksums). Returns (candidate blocks, blocks
/// whose damage must be *reported* if read: the superblock slots and the
/// journal are excluded, since falling back to the other slot or ending
/// replay at a bad record is their designed behaviour).
pub type MetaClassifier = fn(&Image) -> (Vec<u64>, BTreeSet<u64>);

/// Options of a run that are not part of the seed's configuration.
#[derive(Clone, Debug)]
pub struct RunOpts {
    pub verbose: bool,
    /// Use `Config::standard()` instead of the seed's swarm member.
    pub no_swarm: bool,
    pub classifier: Option<MetaClassifier>,
    /// Operation kinds switched off on top of the seed's configuration.
    pub off: Vec<crate::workload::Kind>,
}

impl RunOpts {
    /// The flags that reproduce these options on the command line.
    pub fn flags(&self) -> String {
        let mut f = String::new();
        if self.no_swarm {
            f.push_str("--no-swarm ");
        }
        if !self.off.is_empty() {
            let names: Vec<String> = self.off.iter().map(|k| k.name()).collect();
            f.push_str(&format!("--off {} ", names.join(",")));
        }
        f
    }
}

impl Default for RunOpts {
    fn default() -> Self {
        RunOpts {
            verbose: false,
            no_swarm: false,
            classifier: Some(crate::metaclass::classify),
            off: Vec::new(),
        }
    }
}

pub struct World {
    pub seed: u64,
    pub cfg: Config,
    rng: ChaCha8Rng,
    pub domain: Domain,
    pub cow: SimDev,
    pub origins: Vec<SimDev>,
    pub store: Option<Store>,
    pub model: Model,
    pub op: u64,
    trace: u32,
    pub stats: Stats,
    generation: u64,
    /// An injected fault has surfaced since the last reboot, so errors
    /// (including the engine's own poisoning) are expected until then.
    faulted: bool,
    pending_damage: Option<DamageKind>,
    recent: VecDeque<String>,
    verbose: bool,
    classifier: Option<MetaClassifier>,
    used_tags: BTreeSet<u64>,
    pub now: i64,
    /// Arm a power cut at random after deletes and rollbacks (off in the
    /// exhaustive mode, which places every crash itself).
    pub auto_power_cuts: bool,
}

const RECENT: usize = 12;

impl World {
    /// Build the machine for `seed`: devices, initial origin content, a
    /// freshly formatted COW device with every origin bound.
    pub fn new(seed: u64, cfg: Config, opts: &RunOpts) -> Result<World, Failure> {
        let domain = Domain::new();
        let cow = SimDev::new(&domain, 0, "cow", cfg.cow_bytes, mix(seed));
        cow.set_crash_fates(cfg.fates);
        let mut model = Model::new();
        let mut origins = Vec::new();
        for (i, &sectors) in cfg.origin_sectors.iter().enumerate() {
            let d = SimDev::new(
                &domain,
                i + 1,
                &format!("o{i}"),
                sectors * SECTOR as u64,
                mix(seed),
            );
            d.set_crash_fates(cfg.fates);
            // Each origin starts with its own recognisable content, so data
            // leaking between origins is caught.
            let init: Stamp = 1 + i as u64;
            let stamps = vec![init; sectors as usize];
            d.poke(0, &pattern::gen_run(&stamps, 0));
            model.add_origin(&format!("o{i}"), sectors, init);
            origins.push(d);
        }
        let mut w = World::bare(seed, cfg, opts, domain, cow, origins, model);
        let fo = FormatOptions {
            chunk_size: w.cfg.chunk_size,
            force: false,
        };
        let cow_dev: Dev = Arc::new(w.cow.clone());
        let store = Store::format(cow_dev, &fo)
            .map_err(|e| w.fail(Clause::UnexpectedError, format!("format: {e}")))?;
        w.set_cache_budget(&store);
        for i in 0..w.origins.len() {
            let id = w.model.origins[i].id.clone();
            let d: Dev = Arc::new(w.origins[i].clone());
            store
                .bind(&id, &format!("sim://{id}"), d, w.now)
                .map_err(|e| w.fail(Clause::UnexpectedError, format!("bind {id}: {e}")))?;
        }
        w.store = Some(store);
        Ok(w)
    }

    fn bare(
        seed: u64,
        cfg: Config,
        opts: &RunOpts,
        domain: Domain,
        cow: SimDev,
        origins: Vec<SimDev>,
        model: Model,
    ) -> World {
        World {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            cfg,
            domain,
            cow,
            origins,
            store: None,
            model,
            op: 0,
            trace: 0,
            stats: Stats::default(),
            generation: 0,
            faulted: false,
            pending_damage: None,
            recent: VecDeque::new(),
            verbose: opts.verbose,
            classifier: opts.classifier,
            used_tags: BTreeSet::new(),
            now: 1_700_000_000,
            auto_power_cuts: true,
        }
    }

    /// Check one crash state: boot a machine from `images` and hold it to
    /// `model` (contract 3/4, versions, checker), without touching `self`.
    /// Used by the exhaustive enumerator.
    pub fn check_state(
        &self,
        model: &Model,
        used_tags: &BTreeSet<u64>,
        images: Vec<Image>,
    ) -> Result<Stats, Failure> {
        let opts = RunOpts {
            verbose: false,
            no_swarm: true,
            classifier: None,
            off: Vec::new(),
        };
        let mut w = World::bare(
            self.seed,
            self.cfg.clone(),
            &opts,
            Domain::new(),
            self.cow.clone(),
            self.origins.clone(),
            model.clone(),
        );
        w.op = self.op;
        w.used_tags = used_tags.clone();
        w.recent = self.recent.clone();
        w.generation = self.generation + 1;
        w.boot(images)?;
        w.verify_after_reboot()?;
        w.run_checker()?;
        if let Some(s) = w.store.take() {
            w.domain.power_off();
            drop(s);
        }
        Ok(w.stats)
    }

    /// The model as it must be after a crash inside `op`: the operation
    /// may or may not have happened (metadata operations atomically, data
    /// writes sector by sector). Call before executing `op`.
    pub fn interrupted_model(&self, op: &Op) -> Model {
        let mut m = self.model.clone();
        match *op {
            Op::Write { v, lba, n, .. } => {
                let s = m.new_stamp(self.op, v);
                m.write_unknown(v, lba, &vec![s; n as usize]);
            }
            Op::Zero { v, lba, n, .. } => m.write_unknown(v, lba, &vec![0; n as usize]),
            Op::Trim { v, lba, n } => m.trim(v, lba, n),
            Op::Snapshot { origin, of } => {
                let content = m.content_of(VKey { origin, tag: of });
                m.maybe.push(Maybe::Snapshot {
                    origin,
                    parent: of,
                    content,
                });
            }
            Op::Delete { origin, tag } => m.maybe.push(Maybe::Delete {
                key: VKey {
                    origin,
                    tag: Some(tag),
                },
            }),
            Op::Rollback { origin, tag } => {
                let content = m.content_of(VKey {
                    origin,
                    tag: Some(tag),
                });
                m.maybe.push(Maybe::Rollback {
                    origin,
                    tag,
                    content,
                });
            }
            _ => {}
        }
        m
    }

    pub fn used_tags(&self) -> &BTreeSet<u64> {
        &self.used_tags
    }

    pub fn fail(&self, clause: Clause, what: impl Into<String>) -> Failure {
        Failure {
            seed: self.seed,
            op: self.op,
            clause,
            what: what.into(),
            recent: self.recent.iter().cloned().collect(),
        }
    }

    pub fn trace_hash(&self) -> u32 {
        self.trace
    }

    fn fold(&mut self, bytes: &[u8]) {
        self.trace = crc32c::crc32c_append(self.trace, bytes);
    }

    fn note(&mut self, s: String) {
        if self.verbose {
            println!("[{:>6}] {s}", self.op);
        }
        self.fold(s.as_bytes());
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(format!("op {}: {s}", self.op));
    }

    /// The seed's page-cache budget, on a store just formatted or opened.
    /// The default is not set at all, so those seeds run as they did
    /// before budgets existed.
    fn set_cache_budget(&self, store: &Store) {
        if let Some(bytes) = self.cfg.cache_budget {
            store.set_cache_budget(bytes);
        }
    }

    /// Add the open store's page-cache counters to the run's, before the
    /// store goes (its counters go with it).
    fn count_cache(&mut self) {
        if let Some(s) = &self.store {
            let c = s.cache_stats();
            self.stats.cache_misses += c.misses;
            self.stats.cache_evictions += c.evictions;
        }
    }

    pub fn store(&self) -> Result<&Store, Failure> {
        self.store
            .as_ref()
            .ok_or_else(|| self.fail(Clause::UnexpectedError, "no open store (harness bug)"))
    }

    fn faults_fired(&self) -> u64 {
        self.cow.stats().faults_fired
            + self
                .origins
                .iter()
                .map(|d| d.stats().faults_fired)
                .sum::<u64>()
    }

    pub fn id_of(&self, origin: usize) -> String {
        self.model.origins[origin].id.clone()
    }

    fn volume(&self, key: VKey) -> Result<Volume, Error> {
        let s = self
            .store
            .as_ref()
            .ok_or_else(|| Error::Invalid("no open store".into()))?;
        s.volume(&self.model.origins[key.origin].id, key.tag)
    }

    /// Sort an engine result into the cases the oracle distinguishes.
    fn classify<T>(
        &mut self,
        r: Result<T, Error>,
        fired_before: u64,
        what: &str,
    ) -> Result<Res<T>, Failure> {
        let e = match r {
            Ok(v) => return Ok(Res::Ok(v)),
            Err(e) => e,
        };
        if self.domain.is_dead() {
            return Ok(Res::PowerLost);
        }
        if self.faults_fired() > fired_before || self.faulted {
            self.faulted = true;
            self.stats.faults_surfaced += 1;
            return Ok(Res::Faulted(e.to_string()));
        }
        match e {
            Error::NoSpace => Ok(Res::NoSpace),
            Error::Busy(m) => Ok(Res::Refused(m)),
            e => Err(self.fail(Clause::UnexpectedError, format!("{what}: {e}"))),
        }
    }

    /// Draw and execute one operation.
    pub fn step(&mut self, gen: &mut Generator) -> Result<(), Failure> {
        let op = gen.next(&mut self.rng, &self.model);
        self.exec(op, gen)?;
        self.op += 1;
        self.stats.ops += 1;
        Ok(())
    }

    fn stamps_for(&mut self, v: VKey, n: u64, zero: bool) -> Vec<Stamp> {
        let s = if zero {
            0
        } else {
            self.model.new_stamp(self.op, v)
        };
        vec![s; n as usize]
    }

    /// After a fault surfaced in a data operation: reboot now, or carry on
    /// (the engine must keep serving correct data, or fail cleanly).
    fn after_fault(&mut self) -> Result<(), Failure> {
        let failed = self
            .store
            .as_ref()
            .map(|s| s.status().status.starts_with("failed"))
            .unwrap_or(true);
        if failed || self.rng.gen_bool(0.5) {
            self.reboot(true)?;
        }
        Ok(())
    }

    pub fn exec(&mut self, op: Op, gen: &mut Generator) -> Result<(), Failure> {
        self.now += 1;
        let fired = self.faults_fired();
        match op.clone() {
            Op::Read { v, lba, n } => {
                self.stats.reads += 1;
                let mut buf = vec![0u8; n as usize * SECTOR];
                let r = self
                    .volume(v)
                    .and_then(|vol| vol.read(lba * SECTOR as u64, &mut buf));
                match self.classify(r, fired, &format!("{op}"))? {
                    Res::Ok(()) => {
                        self.note(format!("{op} -> ok crc {:08x}", crc32c::crc32c(&buf)));
                        self.model
                            .check_read(v, lba, &buf)
                            .map_err(|m| self.mismatch_online(&m))?;
                    }
                    r => self.data_op_error(&op, r)?,
                }
            }
            Op::Write { v, lba, n, fua } | Op::Zero { v, lba, n, fua } => {
                self.stats.writes += 1;
                let zero = matches!(op, Op::Zero { .. });
                let stamps = self.stamps_for(v, n, zero);
                let off = lba * SECTOR as u64;
                let r = self.volume(v).and_then(|vol| {
                    if zero {
                        vol.write_zeroes(off, n * SECTOR as u64, fua)
                    } else {
                        vol.write(off, &pattern::gen_run(&stamps, lba), fua)
                    }
                });
                match self.classify(r, fired, &format!("{op}"))? {
                    Res::Ok(()) => {
                        self.note(format!("{op} -> ok"));
                        self.model.write_ok(v, lba, &stamps, fua);
                    }
                    Res::NoSpace => {
                        self.note(format!("{op} -> ENOSPC"));
                        gen.fill_left = 0;
                        self.check_nospace(v, lba, n)?;
                    }
                    r => {
                        self.model.write_unknown(v, lba, &stamps);
                        self.data_op_error(&op, r)?;
                    }
                }
            }
            Op::Trim { v, lba, n } => {
                let r = self
                    .volume(v)
                    .and_then(|vol| vol.trim(lba * SECTOR as u64, n * SECTOR as u64));
                // The content is unspecified either way; the model accepts
                // the old content or zeros from now on.
                self.model.trim(v, lba, n);
                match self.classify(r, fired, &format!("{op}"))? {
                    Res::Ok(()) => self.note(format!("{op} -> ok")),
                    r => self.data_op_error(&op, r)?,
                }
            }
            Op::Flush { v } => {
                let r = self.volume(v).and_then(|vol| vol.flush());
                match self.classify(r, fired, &format!("{op}"))? {
                    Res::Ok(()) => {
                        self.note(format!("{op} -> ok"));
                        self.model.make_durable(v);
                    }
                    r => self.data_op_error(&op, r)?,
                }
            }
            Op::StoreFlush => {
                let r = self.store()?.flush();
                match self.classify(r, fired, "store flush")? {
                    Res::Ok(()) => {
                        self.note(format!("{op} -> ok"));
                        self.model.make_all_durable();
                    }
                    r => self.data_op_error(&op, r)?,
                }
            }
            Op::Snapshot { origin, of } => self.do_snapshot(origin, of, fired)?,
            Op::Delete { origin, tag } => self.do_delete(origin, tag, fired)?,
            Op::Rollback { origin, tag } => self.do_rollback(origin, tag, fired)?,
            Op::Step { budget } => {
                self.stats.steps += 1;
                // The driver's work: background steps, and a commit that
                // destages staged first writes (a commit, not a FLUSH).
                let store = self.store()?;
                let r = store
                    .step_background(budget)
                    .and_then(|rep| store.commit_staged().map(|()| rep));
                match self.classify(r, fired, &format!("{op}"))? {
                    Res::Ok(rep) => {
                        self.note(format!("{op} -> work {} more {}", rep.work, rep.more))
                    }
                    Res::NoSpace => self.note(format!("{op} -> ENOSPC")),
                    r => self.data_op_error(&op, r)?,
                }
            }
            Op::Drain => self.drain()?,
            Op::Crash => {
                self.note(format!("{op}"));
                self.reboot(true)?;
            }
            Op::PowerCut { after } => {
                self.note(format!("{op}"));
                self.domain.cut_power_after(after);
            }
            Op::CleanReopen => {
                self.count_cache();
                let r = match self.store.take() {
                    Some(s) => s.close(),
                    None => Ok(()),
                };
                match self.classify(r, fired, "close")? {
                    Res::Ok(()) => {
                        self.note(format!("{op} -> ok"));
                        self.model.make_all_durable();
                        self.reboot(false)?;
                    }
                    // A failed close is a crash.
                    _ => {
                        self.note(format!("{op} -> close failed"));
                        self.reboot(true)?;
                    }
                }
            }
            Op::Eio { dev, read, nth } => {
                self.note(format!("{op}"));
                let kind = if read { IoKind::Read } else { IoKind::Write };
                self.dev(dev).arm(kind, nth, Fault::Eio);
            }
            Op::Latent { dev, nth } => {
                self.note(format!("{op}"));
                self.dev(dev).arm(IoKind::Read, nth, Fault::Latent);
            }
            Op::Corrupt => {
                self.note(format!("{op}"));
                self.pending_damage = Some(DamageKind::BitFlip);
            }
            Op::Misdirect => {
                self.note(format!("{op}"));
                self.pending_damage = Some(DamageKind::Misdirect);
            }
            Op::VerifyAll => {
                self.note(format!("{op}"));
                self.verify_online()?;
            }
            Op::Fill { n } => {
                self.note(format!("{op}"));
                gen.fill_left = n;
            }
        }
        // A power cut that fired inside this call: the machine is down.
        if self.domain.is_dead() {
            self.stats.power_cuts_fired += 1;
            self.reboot(true)?;
        }
        Ok(())
    }

    fn dev(&self, d: DevSel) -> &SimDev {
        match d {
            DevSel::Cow => &self.cow,
            DevSel::Origin(i) => self.origins.get(i).unwrap_or(&self.cow),
        }
    }

    /// The common handling of an error from a data-path call.
    fn data_op_error<T>(&mut self, op: &Op, r: Res<T>) -> Result<(), Failure> {
        match r {
            Res::Ok(_) => Ok(()),
            Res::PowerLost => {
                self.note(format!("{op} -> power lost"));
                Ok(()) // exec() reboots
            }
            Res::Faulted(e) => {
                self.note(format!("{op} -> fault surfaced: {e}"));
                self.after_fault()
            }
            Res::NoSpace => Err(self.fail(
                Clause::UnexpectedError,
                format!("{op}: ENOSPC from an operation that allocates nothing"),
            )),
            Res::Refused(e) => {
                Err(self.fail(Clause::UnexpectedError, format!("{op}: refused: {e}")))
            }
        }
    }

    fn mismatch_online(&self, m: &Mismatch) -> Failure {
        self.fail(
            Clause::Isolation,
            format!("read returned wrong data: {}", self.model.explain(m)),
        )
    }

    /// ENOSPC: the failed write must have changed nothing, and the device
    /// must really be (nearly) full.
    fn check_nospace(&mut self, v: VKey, lba: u64, n: u64) -> Result<(), Failure> {
        self.stats.nospace += 1;
        let mut buf = vec![0u8; n as usize * SECTOR];
        let fired = self.faults_fired();
        let r = self
            .volume(v)
            .and_then(|vol| vol.read(lba * SECTOR as u64, &mut buf));
        if self.faults_fired() > fired {
            // An armed fault fired in this read-back: nothing to conclude.
            self.faulted = true;
            return Ok(());
        }
        match r {
            Ok(()) => {
                if let Err(m) = self.model.check_read(v, lba, &buf) {
                    return Err(self.fail(
                        Clause::Space,
                        format!(
                            "a write that failed with ENOSPC changed data: {}",
                            self.model.explain(&m)
                        ),
                    ));
                }
            }
            Err(e) if !self.faulted => {
                return Err(self.fail(Clause::Space, format!("read after ENOSPC failed: {e}")));
            }
            Err(_) => {}
        }
        let st = self.store()?.status();
        if !self.faulted && st.chunks_used * 2 < st.chunks_total {
            return Err(self.fail(
                Clause::Space,
                format!(
                    "ENOSPC with the COW device only {}/{} chunks used",
                    st.chunks_used, st.chunks_total
                ),
            ));
        }
        Ok(())
    }

    fn do_snapshot(&mut self, origin: usize, of: Option<u64>, fired: u64) -> Result<(), Failure> {
        let id = self.id_of(origin);
        let src = VKey { origin, tag: of };
        let memo = format!("op {}", self.op);
        let r = self.store()?.snapshot(&id, of, &memo, self.now);
        let what = format!("snapshot {src}");
        match self.classify(r, fired, &what)? {
            Res::Ok(tag) => {
                self.stats.snapshots += 1;
                self.note(format!("{what} -> tag {tag}"));
                if !self.used_tags.insert(tag) {
                    return Err(self.fail(Clause::Isolation, format!("{what} returned tag {tag}, which was used before (tags are never reused)")));
                }
                self.model.snapshot(src, tag);
            }
            Res::NoSpace => {
                self.stats.nospace += 1;
                self.note(format!("{what} -> ENOSPC"));
            }
            Res::Refused(e) => {
                self.stats.refused += 1;
                self.note(format!("{what} -> refused: {e}"));
            }
            Res::Faulted(_) | Res::PowerLost => {
                self.note(format!("{what} -> interrupted"));
                let content = self.model.content_of(src);
                self.model.maybe.push(Maybe::Snapshot {
                    origin,
                    parent: of,
                    content,
                });
                self.reboot(true)?;
            }
        }
        Ok(())
    }

    fn do_delete(&mut self, origin: usize, tag: u64, fired: u64) -> Result<(), Failure> {
        let id = self.id_of(origin);
        let key = VKey {
            origin,
            tag: Some(tag),
        };
        // A handle taken before the delete, to check it is refused after.
        let stale = self.volume(key).ok();
        let r = self.store()?.delete(&id, tag);
        let what = format!("delete {key}");
        match self.classify(r, fired, &what)? {
            Res::Ok(()) => {
                self.stats.deletes += 1;
                self.note(format!("{what} -> ok"));
                self.model.delete(key);
                // The volume must be gone at once.
                if let Ok(v) = self.volume(key) {
                    if v.is_live() {
                        return Err(self.fail(
                            Clause::Isolation,
                            format!("{key} is still live after delete returned"),
                        ));
                    }
                }
                // A stale handle must refuse I/O: a write accepted there
                // could land in a chunk the cleaner frees and reuses for
                // another version. (The data written is garbage to the
                // model, so an accepted write would also show up later.)
                if let Some(v) = stale {
                    let mut b = [0u8; SECTOR];
                    let fired = self.faults_fired();
                    let w = v.write(0, &[0xEE; SECTOR], false);
                    let rd = v.read(0, &mut b);
                    if self.faults_fired() == fired && (w.is_ok() || rd.is_ok()) {
                        return Err(self.fail(
                            Clause::Isolation,
                            format!(
                                "a handle to {key} still {} after delete returned",
                                if w.is_ok() {
                                    "accepts writes"
                                } else {
                                    "serves reads"
                                }
                            ),
                        ));
                    }
                }
                if self.auto_power_cuts && self.rng.gen_bool(0.2) {
                    // Crash soon, while the cleaner has work.
                    let after = self.rng.gen_range(0..12);
                    self.note(format!("power cut after {after} I/Os (cleaner running)"));
                    self.domain.cut_power_after(after);
                }
            }
            Res::NoSpace => {
                self.stats.nospace += 1;
                self.note(format!("{what} -> ENOSPC"));
            }
            Res::Refused(e) => {
                self.stats.refused += 1;
                self.note(format!("{what} -> refused: {e}"));
            }
            Res::Faulted(_) | Res::PowerLost => {
                self.note(format!("{what} -> interrupted"));
                self.model.maybe.push(Maybe::Delete { key });
                self.reboot(true)?;
            }
        }
        Ok(())
    }

    fn do_rollback(&mut self, origin: usize, tag: u64, fired: u64) -> Result<(), Failure> {
        let id = self.id_of(origin);
        let key = VKey {
            origin,
            tag: Some(tag),
        };
        let content = self.model.content_of(key);
        let r = self.store()?.rollback(&id, tag);
        let what = format!("rollback {key} onto o{origin}");
        match self.classify(r, fired, &what)? {
            Res::Ok(()) => {
                self.stats.rollbacks += 1;
                self.note(format!("{what} -> ok"));
                self.model.rollback(origin, tag);
                if self.auto_power_cuts && self.rng.gen_bool(0.3) {
                    // Crash while the copier runs.
                    let after = self.rng.gen_range(0..24);
                    self.note(format!("power cut after {after} I/Os (rollback running)"));
                    self.domain.cut_power_after(after);
                }
            }
            Res::NoSpace => {
                self.stats.nospace += 1;
                self.note(format!("{what} -> ENOSPC"));
            }
            Res::Refused(e) => {
                self.stats.refused += 1;
                self.note(format!("{what} -> refused: {e}"));
            }
            Res::Faulted(_) | Res::PowerLost => {
                self.note(format!("{what} -> interrupted"));
                self.model.maybe.push(Maybe::Rollback {
                    origin,
                    tag,
                    content,
                });
                self.reboot(true)?;
            }
        }
        Ok(())
    }

    /// Run background work until there is none (bounded: work that never
    /// ends is a bug too).
    fn drain(&mut self) -> Result<(), Failure> {
        for i in 0..100_000u32 {
            let fired = self.faults_fired();
            let r = self.store()?.step_background(64);
            self.stats.steps += 1;
            match self.classify(r, fired, "step_background(64)")? {
                Res::Ok(rep) if !rep.more => {
                    self.note(format!("drain -> done after {} steps", i + 1));
                    return Ok(());
                }
                Res::Ok(_) => {}
                Res::NoSpace => {
                    self.note("drain -> ENOSPC".into());
                    return Ok(());
                }
                r => return self.data_op_error(&Op::Drain, r),
            }
            if self.domain.is_dead() {
                return Ok(());
            }
        }
        Err(self.fail(
            Clause::UnexpectedError,
            "background work still reports more after 100000 steps",
        ))
    }

    /// Read every live version in full and check it against `cur`.
    pub fn verify_online(&mut self) -> Result<(), Failure> {
        let keys: Vec<VKey> = self.model.live().copied().collect();
        for k in keys {
            let sectors = self.model.sectors(k.origin);
            let mut lba = 0;
            while lba < sectors {
                let n = (sectors - lba).min(256);
                let mut buf = vec![0u8; n as usize * SECTOR];
                let fired = self.faults_fired();
                let r = self
                    .volume(k)
                    .and_then(|v| v.read(lba * SECTOR as u64, &mut buf));
                match self.classify(r, fired, &format!("verify read {k} lba {lba}"))? {
                    Res::Ok(()) => {
                        self.fold(&crc32c::crc32c(&buf).to_le_bytes());
                        self.model
                            .check_read(k, lba, &buf)
                            .map_err(|m| self.mismatch_online(&m))?;
                        self.stats.sectors_verified += n;
                    }
                    r => return self.data_op_error(&Op::VerifyAll, r),
                }
                lba += n;
            }
        }
        Ok(())
    }

    // ----------------------------------------------------------------
    // Reboot: crash (or clean close), damage, reopen, verify, check.
    // ----------------------------------------------------------------

    /// Take the machine down and bring it back. With `crash`, each device
    /// keeps a random crash state of its unflushed writes; without, only
    /// what is durable (after a clean close, that must be everything).
    pub fn reboot(&mut self, crash: bool) -> Result<(), Failure> {
        // Power off first, so nothing the engine does while being dropped
        // can reach the media.
        self.domain.power_off();
        self.count_cache();
        if let Some(s) = self.store.take() {
            drop(s);
        }
        let mut images: Vec<Image> = Vec::new();
        for d in std::iter::once(&self.cow).chain(self.origins.iter()) {
            let mut img = if crash { d.crash() } else { d.crash_drop_all() };
            // Latent errors are exercised online; a reboot starts healthy
            // so the post-crash check is strict.
            img.latent.clear();
            images.push(img);
        }
        self.note(format!(
            "reboot ({})",
            if crash { "crash" } else { "clean" }
        ));
        if crash {
            self.stats.crashes += 1;
        } else {
            self.stats.clean_reopens += 1;
        }
        self.generation += 1;
        // The damage probe runs after the strict check of the undamaged
        // state, against the model as it was before that check settled it:
        // wrong data in the probe is then the damage's doing, not a crash
        // bug that the strict check would report under its own clause.
        let probe = self.pending_damage.take().map(|k| {
            (
                k,
                images.clone(),
                self.model.clone(),
                self.used_tags.clone(),
            )
        });
        self.boot(images)?;
        self.verify_after_reboot()?;
        self.run_checker()?;
        if let Some((kind, imgs, model, tags)) = probe {
            self.damaged_probe(kind, &imgs, model, tags)?;
        }
        self.model.maybe.clear();
        self.faulted = false;
        Ok(())
    }

    /// Fresh devices from images, and open the store on them.
    fn boot(&mut self, images: Vec<Image>) -> Result<(), Failure> {
        match self.try_boot(images)? {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(
                Clause::Durability,
                format!("reopen refused after a crash with no damage injected: {e}"),
            )),
        }
    }

    fn try_boot(&mut self, images: Vec<Image>) -> Result<Result<(), Error>, Failure> {
        let domain = Domain::new();
        let seed = mix(self.seed ^ self.generation.wrapping_mul(0x1000_0001));
        let mut it = images.into_iter();
        let cow_img = it
            .next()
            .ok_or_else(|| self.fail(Clause::UnexpectedError, "no cow image"))?;
        let cow = SimDev::from_image(&domain, 0, "cow", cow_img, seed);
        cow.set_crash_fates(self.cfg.fates);
        let mut origins = Vec::new();
        for (i, img) in it.enumerate() {
            let d = SimDev::from_image(&domain, i + 1, &format!("o{i}"), img, seed);
            d.set_crash_fates(self.cfg.fates);
            origins.push(d);
        }
        self.domain = domain;
        self.cow = cow;
        self.origins = origins;
        self.store = None;
        let ids: Vec<String> = self.model.origins.iter().map(|o| o.id.clone()).collect();
        let devs = self.origins.clone();
        let mut resolver = |id: &str, _path: &str| -> Result<Dev, Error> {
            match ids.iter().position(|x| x == id) {
                Some(i) => Ok(Arc::new(devs[i].clone()) as Dev),
                None => Err(Error::NoSuchOrigin(id.to_string())),
            }
        };
        let cow_dev: Dev = Arc::new(self.cow.clone());
        match Store::open(cow_dev, &mut resolver) {
            Ok(s) => {
                self.set_cache_budget(&s);
                self.store = Some(s);
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(e)),
        }
    }

    /// The engine's versions, as model keys.
    fn listed_versions(&self) -> Result<BTreeSet<VKey>, Failure> {
        let mut out = BTreeSet::new();
        for v in self.store()?.versions() {
            let origin = self
                .model
                .origins
                .iter()
                .position(|o| o.id == v.origin)
                .ok_or_else(|| {
                    self.fail(
                        Clause::Isolation,
                        format!("engine lists unknown origin {:?}", v.origin),
                    )
                })?;
            out.insert(VKey { origin, tag: v.tag });
        }
        Ok(out)
    }

    /// Contract 3 + 4 after a reboot: the versions are exactly the durable
    /// ones (give or take an interrupted metadata operation), and every
    /// sector of every version holds its last durable value or a later one.
    fn verify_after_reboot(&mut self) -> Result<(), Failure> {
        let listed = self.listed_versions()?;
        let known: BTreeSet<VKey> = self.model.live().copied().collect();
        let maybe = self.model.maybe.clone();
        for k in known.difference(&listed) {
            if maybe
                .iter()
                .any(|m| matches!(m, Maybe::Delete { key } if key == k))
            {
                self.model.delete(*k);
                continue;
            }
            return Err(self.fail(Clause::Durability, format!("{k} is missing after reopen, but its creation had returned (metadata operations are durable when they return)")));
        }
        let mut adopted = false;
        for k in listed.difference(&known) {
            let fit = maybe.iter().find_map(|m| match m {
                Maybe::Snapshot {
                    origin,
                    parent,
                    content,
                } if *origin == k.origin && !adopted => Some((*parent, content.clone())),
                _ => None,
            });
            match (fit, k.tag) {
                (Some((parent, content)), Some(tag)) if !self.used_tags.contains(&tag) => {
                    self.note(format!("interrupted snapshot exists after reopen as {k}"));
                    self.used_tags.insert(tag);
                    self.model.adopt(*k, parent, &content);
                    adopted = true;
                }
                _ => {
                    return Err(self.fail(
                        Clause::Durability,
                        format!("{k} exists after reopen, but the model has no such version (deleted durably, or never created)"),
                    ))
                }
            }
        }
        let keys: Vec<VKey> = self.model.live().copied().collect();
        for k in keys {
            let data = self.read_version(k)?;
            let sectors = self.model.sectors(k.origin) as usize;
            let crash: Vec<Cands> = self.model.versions[&k]
                .secs
                .iter()
                .map(|s| s.crash.clone())
                .collect();
            let refs: Vec<&Cands> = crash.iter().collect();
            let mut res = Model::check_after_crash(k, 0, &data, &refs);
            let mut alt_err: Option<Mismatch> = None;
            if res.is_err() && k.tag.is_none() {
                // An interrupted rollback onto this origin may have happened.
                for m in &maybe {
                    if let Maybe::Rollback {
                        origin, content, ..
                    } = m
                    {
                        if *origin == k.origin {
                            let refs: Vec<&Cands> = content.iter().collect();
                            match Model::check_after_crash(k, 0, &data, &refs) {
                                Ok(seen) => {
                                    self.note(format!("interrupted rollback onto {k} took effect"));
                                    res = Ok(seen);
                                }
                                Err(m2) => alt_err = Some(m2),
                            }
                        }
                    }
                }
            }
            match res {
                Ok(seen) => {
                    debug_assert_eq!(seen.len(), sectors);
                    self.model.settle(k, &seen);
                    self.stats.sectors_verified += sectors as u64;
                    for s in &seen {
                        self.fold(&s.to_le_bytes());
                    }
                }
                Err(m) => {
                    let clause = self.crash_clause(&m);
                    let mut what = format!("after reopen: {}", self.model.explain(&m));
                    if let Some(m2) = alt_err {
                        what.push_str(&format!(
                            "; nor does it match the interrupted rollback's content: {}",
                            self.model.explain(&m2)
                        ));
                    }
                    if let Some(st) = self.store.as_ref().map(|s| s.status()) {
                        what.push_str(&format!(
                            " [engine after reopen: rollback {:?}, cleaning {}]",
                            st.rollback, st.cleaning
                        ));
                    }
                    return Err(self.fail(clause, what));
                }
            }
        }
        Ok(())
    }

    /// Which clause a wrong post-crash sector breaks: an older value of
    /// the same version is a lost durable write (3); anything else (another
    /// version's data, garbage, misplaced data) is an impossible crash
    /// state (4).
    fn crash_clause(&self, m: &Mismatch) -> Clause {
        match m.observed {
            Decoded::Stamp(s) => {
                let older = m.expected.iter().all(|&e| s < e);
                let own = self
                    .model
                    .stamp_info(s)
                    .map(|i| i.key == m.key)
                    .unwrap_or(false);
                if older && own {
                    Clause::Durability
                } else {
                    Clause::CrashStates
                }
            }
            _ => Clause::CrashStates,
        }
    }

    fn read_version(&mut self, k: VKey) -> Result<Vec<u8>, Failure> {
        let sectors = self.model.sectors(k.origin);
        let mut data = vec![0u8; sectors as usize * SECTOR];
        let vol = self.volume(k).map_err(|e| {
            self.fail(
                Clause::Durability,
                format!("open volume {k} after reopen: {e}"),
            )
        })?;
        let step = 256 * SECTOR;
        for (i, c) in data.chunks_mut(step).enumerate() {
            vol.read((i * step) as u64, c).map_err(|e| {
                self.fail(
                    Clause::Durability,
                    format!("read of {k} at byte {} after reopen: {e}", i * step),
                )
            })?;
        }
        Ok(data)
    }

    fn run_checker(&mut self) -> Result<(), Failure> {
        // Check a copy of what is on the device now, so the checker's reads
        // cannot disturb the live store's device.
        let copy = SimDev::from_image(&Domain::new(), 0, "cow-copy", self.cow.current(), 0);
        self.stats.checker_runs += 1;
        match snapmv_engine::meta::check(copy) {
            Ok(rep) if rep.errors.is_empty() => Ok(()),
            Ok(rep) => Err(self.fail(
                Clause::Checker,
                format!(
                    "meta::check reports {} error(s): {}",
                    rep.errors.len(),
                    rep.errors.join("; ")
                ),
            )),
            Err(e) => Err(self.fail(Clause::Checker, format!("meta::check failed: {e}"))),
        }
    }

    /// Contract 5: damage one metadata block in a copy of the post-crash
    /// images and open that copy. Refusing to open, or an I/O error on a
    /// read, is correct; wrong data, a wrong set of versions, a panic, or
    /// a damaged block that the engine read and accepted are failures.
    /// The probe runs on a copy: the real reboot then proceeds undamaged.
    fn damaged_probe(
        &mut self,
        kind: DamageKind,
        images: &[Image],
        model: Model,
        used_tags: BTreeSet<u64>,
    ) -> Result<(), Failure> {
        let Some(classify) = self.classifier else {
            return Ok(());
        };
        let (cands, must_report) = classify(&images[0]);
        if cands.is_empty() {
            return Ok(());
        }
        let block = cands[self.rng.gen_range(0..cands.len())];
        let mut bad = images[0].clone();
        let what = match kind {
            DamageKind::BitFlip => {
                let byte = self.rng.gen_range(0..PAGE as u64);
                let bit = self.rng.gen_range(0..8u8);
                bad.flip_bit(block * PAGE as u64 + byte, bit);
                format!("bit {bit} of byte {byte} in metadata block {block} flipped")
            }
            DamageKind::Misdirect => {
                let others: Vec<u64> = cands.iter().copied().filter(|&b| b != block).collect();
                if others.is_empty() {
                    return Ok(());
                }
                let src = others[self.rng.gen_range(0..others.len())];
                let mut page = vec![0u8; PAGE];
                images[0].read(src * PAGE as u64, &mut page);
                bad.write(block * PAGE as u64, &page);
                format!("metadata block {src} misdirected onto block {block}")
            }
        };
        if bad == images[0] {
            return Ok(());
        }
        self.stats.damage_injected += 1;
        self.note(format!("damage probe: {what}"));
        let mut imgs = images.to_vec();
        imgs[0] = bad;
        let mut bad_page = vec![0u8; PAGE];
        imgs[0].read(block * PAGE as u64, &mut bad_page);
        // A separate machine, so the live store is untouched.
        let opts = RunOpts {
            verbose: self.verbose,
            no_swarm: true,
            classifier: None,
            off: Vec::new(),
        };
        let mut pw = World::bare(
            self.seed,
            self.cfg.clone(),
            &opts,
            Domain::new(),
            self.cow.clone(),
            self.origins.clone(),
            model,
        );
        pw.op = self.op;
        pw.used_tags = used_tags;
        pw.recent = self.recent.clone();
        pw.generation = self.generation + 1000;
        let outcome = pw.probe_inner(imgs, block, &bad_page, &what, must_report.contains(&block));
        pw.domain.power_off();
        pw.store = None;
        self.stats.damage_detected += pw.stats.damage_detected;
        self.stats.damage_unread += pw.stats.damage_unread;
        let t = pw.trace;
        self.fold(&t.to_le_bytes());
        outcome
    }

    fn probe_inner(
        &mut self,
        imgs: Vec<Image>,
        block: u64,
        bad_page: &[u8],
        what: &str,
        must_report: bool,
    ) -> Result<(), Failure> {
        if let Err(e) = self.try_boot(imgs)? {
            self.stats.damage_detected += 1;
            self.note(format!("damage probe: open refused: {e}"));
            return Ok(());
        }
        let mut detected = false;
        let listed = self.listed_versions()?;
        let known: BTreeSet<VKey> = self.model.live().copied().collect();
        let maybe_ok = |k: &VKey| {
            self.model.maybe.iter().any(|m| match m {
                Maybe::Delete { key } => key == k,
                Maybe::Snapshot { origin, .. } => *origin == k.origin,
                Maybe::Rollback { .. } => false,
            })
        };
        for k in listed.symmetric_difference(&known) {
            if !maybe_ok(k) {
                return Err(self.fail(
                    Clause::Detection,
                    format!("{what}: the engine opened without error but lists a different set of versions ({k} differs)"),
                ));
            }
        }
        for k in known.intersection(&listed).copied().collect::<Vec<_>>() {
            let sectors = self.model.sectors(k.origin);
            let vol = match self.volume(k) {
                Ok(v) => v,
                Err(_) => {
                    detected = true;
                    continue;
                }
            };
            let mut buf = vec![0u8; sectors as usize * SECTOR];
            if vol.read(0, &mut buf).is_err() {
                detected = true;
                continue;
            }
            let crash: Vec<Cands> = self.model.versions[&k]
                .secs
                .iter()
                .map(|s| s.crash.clone())
                .collect();
            let mut refs: Vec<&Cands> = crash.iter().collect();
            let alt: Vec<Cands>;
            if let Err(m) = Model::check_after_crash(k, 0, &buf, &refs) {
                let mut ok = false;
                for mb in &self.model.maybe {
                    if let Maybe::Rollback {
                        origin, content, ..
                    } = mb
                    {
                        if *origin == k.origin && k.tag.is_none() {
                            alt = content.clone();
                            refs = alt.iter().collect();
                            ok = Model::check_after_crash(k, 0, &buf, &refs).is_ok();
                            break;
                        }
                    }
                }
                if !ok {
                    return Err(self.fail(
                        Clause::Detection,
                        format!(
                            "{what}: corrupt metadata was read as valid: {}",
                            self.model.explain(&m)
                        ),
                    ));
                }
            }
        }
        let copy = SimDev::from_image(&Domain::new(), 0, "cow-copy", self.cow.current(), 0);
        let check_found = match snapmv_engine::meta::check(copy.clone()) {
            Ok(rep) => !rep.errors.is_empty(),
            Err(_) => true,
        };
        detected |= check_found;
        // "Read and accepted" only counts while the block still holds the
        // damage: journal replay may legitimately rewrite it from a newer
        // image before anything reads it.
        let mut now = vec![0u8; PAGE];
        self.cow.peek(block * PAGE as u64, &mut now);
        let read = (self.cow.take_reads().contains(&block) || copy.take_reads().contains(&block))
            && now == bad_page;
        if detected {
            self.stats.damage_detected += 1;
        } else if !read {
            self.stats.damage_unread += 1;
        } else if must_report {
            return Err(self.fail(
                Clause::Detection,
                format!("{what}: the engine and meta::check read the damaged block and reported nothing"),
            ));
        }
        let _ = self.store.take();
        Ok(())
    }
}

/// Result of one seed.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub seed: u64,
    pub ops: u64,
    pub trace_hash: u32,
    pub stats: Stats,
    pub failure: Option<Failure>,
    pub config: String,
}

thread_local! {
    static PANIC_MSG: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Install (once) a panic hook that records the message for the failure
/// report instead of printing it in the middle of a progress bar.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = format!("{info}");
            let mine = PANIC_MSG.with(|m| {
                let mut m = m.borrow_mut();
                if m.is_some() {
                    *m = Some(msg.clone());
                    true
                } else {
                    false
                }
            });
            if !mine {
                prev(info);
            }
        }));
    });
}

/// Run one seed for `ops` operations. A panic anywhere is caught and
/// reported as a failure, never excused.
/// The configuration a seed runs with under `opts`.
pub fn config_for(seed: u64, opts: &RunOpts) -> Config {
    let mut cfg = if opts.no_swarm {
        Config::standard()
    } else {
        Config::swarm(seed)
    };
    cfg.switch_off(&opts.off);
    cfg
}

/// Draw the next operation without executing it (for the exhaustive
/// mode's "enumerate the crash states of this seed's op N").
pub fn next_op(w: &mut World, gen: &mut Generator) -> Op {
    gen.next(&mut w.rng, &w.model)
}

pub fn run_seed(seed: u64, ops: u64, opts: &RunOpts) -> RunResult {
    install_panic_hook();
    let cfg = config_for(seed, opts);
    let config = cfg.summary();
    if opts.verbose {
        println!("seed {seed}: {config}");
    }
    PANIC_MSG.with(|m| *m.borrow_mut() = Some(String::new()));
    let mut world: Option<World> = None;
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), Failure> {
            let w = world.insert(World::new(seed, cfg.clone(), opts)?);
            let mut gen = Generator::new(cfg.clone());
            while w.op < ops {
                w.step(&mut gen)?;
            }
            // End with a clean close, reopen and full check, so every run
            // exercises the checker at least once.
            let mut g2 = Generator::new(cfg.clone());
            w.exec(Op::CleanReopen, &mut g2)?;
            w.count_cache();
            Ok(())
        }));
    let panic_msg = PANIC_MSG
        .with(|m| m.borrow_mut().take())
        .unwrap_or_default();
    let (op, trace, stats, recent) = match &world {
        Some(w) => (
            w.op,
            w.trace,
            w.stats.clone(),
            w.recent.iter().cloned().collect(),
        ),
        None => (0, 0, Stats::default(), Vec::new()),
    };
    let failure = match result {
        Ok(Ok(())) => None,
        Ok(Err(f)) => Some(f),
        Err(_) => Some(Failure {
            seed,
            op,
            clause: Clause::Panic,
            what: format!("engine panicked: {}", panic_msg.trim()),
            recent,
        }),
    };
    RunResult {
        seed,
        ops: op,
        trace_hash: trace,
        stats,
        failure,
        config,
    }
}
