//! Seeded, weighted operation generator with swarm configurations.
//!
//! Swarm testing (Groce et al., ISSTA 2012): instead of one "balanced" mix,
//! each seed draws its own mix, switching some operation kinds off and
//! weighting the others at random. Bugs that a balanced mix masks (e.g. one
//! that needs many snapshots and no deletes) show up in some swarm member.
//! The configuration is a pure function of the seed, so `run --seed S`
//! replays exactly what `swarm` ran for S.

use crate::model::{Model, VKey};
use crate::simdev::{mix, CrashFates};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt;

/// Operation kinds, for weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Read,
    Write,
    Zero,
    Trim,
    Flush,
    StoreFlush,
    Snapshot,
    SnapshotOfSnapshot,
    Delete,
    Rollback,
    Step,
    Drain,
    Crash,
    PowerCut,
    CleanReopen,
    Eio,
    Latent,
    Corrupt,
    Misdirect,
    VerifyAll,
    Fill,
}

impl Kind {
    pub const ALL: [Kind; 21] = [
        Kind::Read,
        Kind::Write,
        Kind::Zero,
        Kind::Trim,
        Kind::Flush,
        Kind::StoreFlush,
        Kind::Snapshot,
        Kind::SnapshotOfSnapshot,
        Kind::Delete,
        Kind::Rollback,
        Kind::Step,
        Kind::Drain,
        Kind::Crash,
        Kind::PowerCut,
        Kind::CleanReopen,
        Kind::Eio,
        Kind::Latent,
        Kind::Corrupt,
        Kind::Misdirect,
        Kind::VerifyAll,
        Kind::Fill,
    ];

    pub fn name(self) -> String {
        format!("{self:?}").to_lowercase()
    }

    /// Parse a comma-separated list of kind names (case-insensitive).
    pub fn parse_list(s: &str) -> Result<Vec<Kind>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(|x| {
                Kind::ALL
                    .iter()
                    .copied()
                    .find(|k| k.name() == x.to_lowercase())
                    .ok_or_else(|| {
                        let all: Vec<String> = Kind::ALL.iter().map(|k| k.name()).collect();
                        format!("unknown operation kind {x:?}; kinds: {}", all.join(","))
                    })
            })
            .collect()
    }

    /// Default weight (per mille-ish), before swarm perturbation.
    fn base(self) -> u32 {
        match self {
            Kind::Read => 250,
            Kind::Write => 300,
            Kind::Zero => 15,
            Kind::Trim => 10,
            Kind::Flush => 40,
            Kind::StoreFlush => 15,
            Kind::Snapshot => 40,
            Kind::SnapshotOfSnapshot => 20,
            Kind::Delete => 30,
            Kind::Rollback => 12,
            Kind::Step => 80,
            Kind::Drain => 8,
            Kind::Crash => 12,
            Kind::PowerCut => 12,
            Kind::CleanReopen => 4,
            Kind::Eio => 4,
            Kind::Latent => 2,
            Kind::Corrupt => 3,
            Kind::Misdirect => 2,
            Kind::VerifyAll => 4,
            Kind::Fill => 2,
        }
    }

    /// Kinds a swarm member may switch off. Reads and writes stay on: a run
    /// without them checks nothing.
    fn optional(self) -> bool {
        !matches!(self, Kind::Read | Kind::Write)
    }
}

/// The metadata page-cache budgets a seed may run with. `None` leaves the
/// engine's default (32 MiB: nothing is ever evicted here); the others make
/// evictions and misses (re-reads of home blocks) part of the run: 16 KiB
/// is below the engine's floor of 4 clean pages, so it is that floor.
pub const CACHE_BUDGETS: [Option<u64>; 4] = [None, Some(16 << 10), Some(64 << 10), Some(256 << 10)];

/// A cache budget for descriptions: "default" or its size.
pub fn cache_budget_text(budget: Option<u64>) -> String {
    match budget {
        None => "default".into(),
        Some(b) => format!("{} KiB", b >> 10),
    }
}

/// Everything a seed decides before the first operation.
#[derive(Clone, Debug)]
pub struct Config {
    pub origins: usize,
    /// Size of each origin, in 512-byte sectors.
    pub origin_sectors: Vec<u64>,
    pub cow_bytes: u64,
    pub chunk_size: u32,
    pub weights: Vec<(Kind, u32)>,
    /// Probability that a write is FUA.
    pub p_fua: f64,
    pub fates: CrashFates,
    /// Largest background step budget.
    pub max_budget: usize,
    /// Cap on live snapshots per origin (keeps the model small).
    pub max_snapshots: usize,
    /// The metadata page-cache budget set after every format and open
    /// (`None`: the engine's default, and no call at all).
    pub cache_budget: Option<u64>,
}

impl Config {
    /// The default mix, used by the exhaustive mode and `run --no-swarm`.
    pub fn standard() -> Self {
        Config {
            origins: 2,
            origin_sectors: vec![2048, 1024],
            cow_bytes: 16 << 20,
            chunk_size: 16 << 10,
            weights: Kind::ALL.iter().map(|k| (*k, k.base())).collect(),
            p_fua: 0.1,
            fates: CrashFates::default(),
            max_budget: 4,
            max_snapshots: 12,
            cache_budget: None,
        }
    }

    /// The swarm member for `seed`.
    pub fn swarm(seed: u64) -> Self {
        let mut r = ChaCha8Rng::seed_from_u64(mix(seed ^ 0x5741_524d));
        let origins = match r.gen_range(0..10) {
            0..=3 => 1,
            4..=7 => 2,
            _ => r.gen_range(3..=5),
        };
        let chunk_size: u32 = match r.gen_range(0..10) {
            0..=1 => 4 << 10,
            2..=4 => 8 << 10,
            5..=8 => 16 << 10,
            _ => 64 << 10,
        };
        let origin_sectors = (0..origins)
            .map(|_| {
                // 64 KiB .. 1 MiB, a whole number of chunks or not: the
                // last partial chunk is an edge case worth hitting.
                let kib: u64 = [64, 128, 256, 512, 1024][r.gen_range(0..5)];
                let ragged = if r.gen_bool(0.2) {
                    r.gen_range(1..8u64)
                } else {
                    0
                };
                kib * 2 - ragged
            })
            .collect();
        // Small COW devices make ENOSPC reachable; larger ones make long
        // histories possible without it.
        let cow_bytes: u64 = if r.gen_bool(0.3) {
            r.gen_range(3..=6) << 20
        } else {
            r.gen_range(8..=32) << 20
        };
        let weights = Kind::ALL
            .iter()
            .map(|k| {
                let w = if k.optional() && r.gen_bool(0.25) {
                    0
                } else {
                    let f = [0.25, 0.5, 1.0, 1.0, 2.0, 4.0][r.gen_range(0..6)];
                    ((k.base() as f64) * f).ceil() as u32
                };
                (*k, w)
            })
            .collect();
        let keep = r.gen_range(0.1..0.8);
        let torn = r.gen_range(0.0..0.4) * (1.0 - keep);
        Config {
            origins,
            origin_sectors,
            cow_bytes,
            chunk_size,
            weights,
            p_fua: [0.0, 0.05, 0.2, 0.5][r.gen_range(0..4)],
            fates: CrashFates {
                keep,
                drop: 1.0 - keep - torn,
                torn,
            },
            max_budget: [1, 2, 4, 16][r.gen_range(0..4)],
            max_snapshots: [3, 8, 16, 32][r.gen_range(0..4)],
            // Drawn last, so every earlier choice of a seed is what it was
            // before budgets existed.
            cache_budget: CACHE_BUDGETS[r.gen_range(0..CACHE_BUDGETS.len())],
        }
    }

    /// Switch `kinds` off (weight 0), e.g. while an engine bug they
    /// trigger is open.
    pub fn switch_off(&mut self, kinds: &[Kind]) {
        for (k, w) in &mut self.weights {
            if kinds.contains(k) {
                *w = 0;
            }
        }
    }

    pub fn weight(&self, k: Kind) -> u32 {
        self.weights
            .iter()
            .find(|(x, _)| *x == k)
            .map(|(_, w)| *w)
            .unwrap_or(0)
    }

    /// A short description for `--verbose` and failure reports.
    pub fn summary(&self) -> String {
        let off: Vec<String> = self
            .weights
            .iter()
            .filter(|(_, w)| *w == 0)
            .map(|(k, _)| format!("{k:?}"))
            .collect();
        format!(
            "{} origin(s) {:?} sectors, cow {} MiB, chunk {} KiB, fua {:.2}, fates keep {:.2} drop {:.2} torn {:.2}, budget<={}, snaps<={}, page cache {}, off: [{}]",
            self.origins,
            self.origin_sectors,
            self.cow_bytes >> 20,
            self.chunk_size >> 10,
            self.p_fua,
            self.fates.keep,
            self.fates.drop,
            self.fates.torn,
            self.max_budget,
            self.max_snapshots,
            cache_budget_text(self.cache_budget),
            off.join(" ")
        )
    }
}

/// Which device an injected I/O fault targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevSel {
    Cow,
    Origin(usize),
}

/// One operation of a run. `Debug` output is folded into the trace hash,
/// so it must be deterministic (it is: no addresses, no maps).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Read {
        v: VKey,
        lba: u64,
        n: u64,
    },
    Write {
        v: VKey,
        lba: u64,
        n: u64,
        fua: bool,
    },
    Zero {
        v: VKey,
        lba: u64,
        n: u64,
        fua: bool,
    },
    Trim {
        v: VKey,
        lba: u64,
        n: u64,
    },
    Flush {
        v: VKey,
    },
    StoreFlush,
    Snapshot {
        origin: usize,
        of: Option<u64>,
    },
    Delete {
        origin: usize,
        tag: u64,
    },
    Rollback {
        origin: usize,
        tag: u64,
    },
    Step {
        budget: usize,
    },
    /// Run background work to completion.
    Drain,
    /// Crash now (between two calls) and reopen.
    Crash,
    /// Lose power at the n-th write/flush from now: inside a later call.
    PowerCut {
        after: u64,
    },
    /// Close cleanly and reopen.
    CleanReopen,
    /// Arm an EIO on the nth next read or write of a device.
    Eio {
        dev: DevSel,
        read: bool,
        nth: u64,
    },
    /// Arm a latent sector error on the nth next read of a device.
    Latent {
        dev: DevSel,
        nth: u64,
    },
    /// At the next crash, flip a bit in a metadata block of the COW device.
    Corrupt,
    /// At the next crash, land a copy of one metadata block on another.
    Misdirect,
    /// Read every live version in full.
    VerifyAll,
    /// Start a fill-until-ENOSPC phase of up to n big writes.
    Fill {
        n: u32,
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Read { v, lba, n } => write!(f, "read {v} lba {lba} +{n}"),
            Op::Write { v, lba, n, fua } => {
                write!(
                    f,
                    "write {v} lba {lba} +{n}{}",
                    if *fua { " FUA" } else { "" }
                )
            }
            Op::Zero { v, lba, n, fua } => {
                write!(
                    f,
                    "write_zeroes {v} lba {lba} +{n}{}",
                    if *fua { " FUA" } else { "" }
                )
            }
            Op::Trim { v, lba, n } => write!(f, "trim {v} lba {lba} +{n}"),
            Op::Flush { v } => write!(f, "flush {v}"),
            Op::StoreFlush => write!(f, "store flush"),
            Op::Snapshot { origin, of: None } => write!(f, "snapshot o{origin}"),
            Op::Snapshot {
                origin,
                of: Some(t),
            } => write!(f, "snapshot o{origin}@{t}"),
            Op::Delete { origin, tag } => write!(f, "delete o{origin}@{tag}"),
            Op::Rollback { origin, tag } => write!(f, "rollback o{origin}@{tag} onto o{origin}"),
            Op::Step { budget } => write!(f, "step_background({budget})"),
            Op::Drain => write!(f, "drain background"),
            Op::Crash => write!(f, "crash + reopen"),
            Op::PowerCut { after } => write!(f, "power cut after {after} I/Os"),
            Op::CleanReopen => write!(f, "close + reopen"),
            Op::Eio { dev, read, nth } => write!(
                f,
                "arm EIO on {dev:?} {} #{nth}",
                if *read { "read" } else { "write" }
            ),
            Op::Latent { dev, nth } => write!(f, "arm latent error on {dev:?} read #{nth}"),
            Op::Corrupt => write!(f, "corrupt a metadata block at next crash"),
            Op::Misdirect => write!(f, "misdirect a metadata block at next crash"),
            Op::VerifyAll => write!(f, "verify all versions"),
            Op::Fill { n } => write!(f, "fill phase ({n} writes)"),
        }
    }
}

/// Draws operations from the config and the model's current state.
pub struct Generator {
    pub cfg: Config,
    total: u32,
    /// Big writes left in the current fill phase.
    pub fill_left: u32,
}

impl Generator {
    pub fn new(cfg: Config) -> Self {
        let total = cfg.weights.iter().map(|(_, w)| w).sum();
        Generator {
            cfg,
            total,
            fill_left: 0,
        }
    }

    fn pick_kind(&self, r: &mut ChaCha8Rng) -> Kind {
        let mut x = r.gen_range(0..self.total.max(1));
        for (k, w) in &self.cfg.weights {
            if x < *w {
                return *k;
            }
            x -= w;
        }
        Kind::Read
    }

    fn pick_version(r: &mut ChaCha8Rng, m: &Model) -> VKey {
        let n = m.versions.len();
        // Live versions are never empty: every origin stays bound.
        *m.versions
            .keys()
            .nth(r.gen_range(0..n.max(1)))
            .unwrap_or(&VKey {
                origin: 0,
                tag: None,
            })
    }

    /// Random extent in a version: mostly small, often chunk-sized or
    /// straddling a chunk boundary, sometimes a few chunks.
    fn extent(&self, r: &mut ChaCha8Rng, sectors: u64) -> (u64, u64) {
        let cs = (self.cfg.chunk_size / 512) as u64;
        let n = match r.gen_range(0..20) {
            0..=10 => r.gen_range(1..=8),
            11..=14 => cs,
            15..=16 => r.gen_range(1..=cs * 3),
            _ => r.gen_range(2..=cs.max(2)),
        }
        .min(sectors);
        let lba = match r.gen_range(0..4) {
            // Straddle a chunk boundary.
            0 if sectors > cs => {
                let b = r.gen_range(1..=(sectors - 1) / cs) * cs;
                let k = if n > 1 { r.gen_range(1..n) } else { 0 };
                b.saturating_sub(k).min(sectors - n)
            }
            // Chunk aligned.
            1 => (r.gen_range(0..=(sectors - n)) / cs * cs).min(sectors - n),
            _ => r.gen_range(0..=(sectors - n)),
        };
        (lba, n)
    }

    pub fn next(&mut self, r: &mut ChaCha8Rng, m: &Model) -> Op {
        if self.fill_left > 0 {
            self.fill_left -= 1;
            return self.fill_op(r, m);
        }
        let k = self.pick_kind(r);
        let v = Self::pick_version(r, m);
        let sectors = m.sectors(v.origin);
        let origin = r.gen_range(0..m.origins.len().max(1));
        let snaps = m.snapshots_of(origin);
        let any_snap = |r: &mut ChaCha8Rng| snaps.get(r.gen_range(0..snaps.len().max(1))).copied();
        let dev = |r: &mut ChaCha8Rng| {
            if r.gen_bool(0.7) {
                DevSel::Cow
            } else {
                DevSel::Origin(r.gen_range(0..m.origins.len().max(1)))
            }
        };
        match k {
            Kind::Read => {
                let (lba, n) = self.extent(r, sectors);
                Op::Read { v, lba, n }
            }
            Kind::Write => {
                let (lba, n) = self.extent(r, sectors);
                let fua = r.gen_bool(self.cfg.p_fua);
                Op::Write { v, lba, n, fua }
            }
            Kind::Zero => {
                let (lba, n) = self.extent(r, sectors);
                let fua = r.gen_bool(self.cfg.p_fua);
                Op::Zero { v, lba, n, fua }
            }
            Kind::Trim => {
                let (lba, n) = self.extent(r, sectors);
                Op::Trim { v, lba, n }
            }
            Kind::Flush => Op::Flush { v },
            Kind::StoreFlush => Op::StoreFlush,
            Kind::Snapshot if snaps.len() < self.cfg.max_snapshots => {
                Op::Snapshot { origin, of: None }
            }
            Kind::SnapshotOfSnapshot
                if snaps.len() < self.cfg.max_snapshots && !snaps.is_empty() =>
            {
                Op::Snapshot {
                    origin,
                    of: any_snap(r),
                }
            }
            Kind::Delete if !snaps.is_empty() => match any_snap(r) {
                Some(tag) => Op::Delete { origin, tag },
                None => Op::StoreFlush,
            },
            Kind::Rollback if !snaps.is_empty() => match any_snap(r) {
                Some(tag) => Op::Rollback { origin, tag },
                None => Op::StoreFlush,
            },
            Kind::Step => Op::Step {
                budget: r.gen_range(1..=self.cfg.max_budget),
            },
            Kind::Drain => Op::Drain,
            Kind::Crash => Op::Crash,
            Kind::PowerCut => Op::PowerCut {
                after: if r.gen_bool(0.5) {
                    r.gen_range(0..8)
                } else {
                    r.gen_range(0..64)
                },
            },
            Kind::CleanReopen => Op::CleanReopen,
            Kind::Eio => Op::Eio {
                dev: dev(r),
                read: r.gen_bool(0.5),
                nth: r.gen_range(0..16),
            },
            Kind::Latent => Op::Latent {
                dev: dev(r),
                nth: r.gen_range(0..16),
            },
            Kind::Corrupt => Op::Corrupt,
            Kind::Misdirect => Op::Misdirect,
            Kind::VerifyAll => Op::VerifyAll,
            Kind::Fill => Op::Fill {
                n: r.gen_range(50..400),
            },
            // A kind whose precondition does not hold (no snapshot to
            // delete, snapshot cap reached): a write instead, so the op
            // count stays meaningful.
            _ => {
                let (lba, n) = self.extent(r, sectors);
                Op::Write {
                    v,
                    lba,
                    n,
                    fua: false,
                }
            }
        }
    }

    /// Fill phase: whole-chunk writes to random versions (each a fresh
    /// exception), with an occasional snapshot so origin writes need copies.
    fn fill_op(&mut self, r: &mut ChaCha8Rng, m: &Model) -> Op {
        let v = Self::pick_version(r, m);
        let sectors = m.sectors(v.origin);
        let cs = (self.cfg.chunk_size / 512) as u64;
        if r.gen_bool(0.05) && m.snapshots_of(v.origin).len() < self.cfg.max_snapshots {
            return Op::Snapshot {
                origin: v.origin,
                of: None,
            };
        }
        let n = (cs * r.gen_range(1..=4)).min(sectors);
        let lba = (r.gen_range(0..=(sectors - n)) / cs * cs).min(sectors - n);
        Op::Write {
            v,
            lba,
            n,
            fua: false,
        }
    }
}
