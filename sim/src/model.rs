//! The oracle's model: for every live version, for every 512-byte sector,
//! what a read may return now (`cur`) and what a crash may leave (`crash`).
//!
//! Contract 3/4 in model terms: `crash` is the last durable value plus every
//! value written after it. A durability point (flush, FUA, snapshot of the
//! version, rollback from it, close) collapses `crash` to `cur`. A read or a
//! post-crash check collapses the candidates to the value observed, so the
//! sets stay small.
//!
//! The model knows nothing of chunks, exceptions or the version tree: it is
//! the contract, nothing more.

use crate::pattern::{decode, Decoded, SECTOR};
use std::collections::BTreeMap;
use std::fmt;

pub type Stamp = u64;

/// A version in the model: origin index, and tag for a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VKey {
    pub origin: usize,
    pub tag: Option<u64>,
}

impl fmt::Display for VKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.tag {
            None => write!(f, "o{}", self.origin),
            Some(t) => write!(f, "o{}@{}", self.origin, t),
        }
    }
}

/// A small set of possible stamps. `One` is by far the common case, and
/// costs no allocation, which matters when a snapshot clones every sector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cands {
    One(Stamp),
    Many(Vec<Stamp>),
}

impl Cands {
    pub fn contains(&self, s: Stamp) -> bool {
        match self {
            Cands::One(x) => *x == s,
            Cands::Many(v) => v.contains(&s),
        }
    }

    pub fn add(&mut self, s: Stamp) {
        match self {
            Cands::One(x) if *x == s => {}
            Cands::One(x) => *self = Cands::Many(vec![*x, s]),
            Cands::Many(v) => {
                if !v.contains(&s) {
                    v.push(s)
                }
            }
        }
    }

    pub fn union(&mut self, o: &Cands) {
        for s in o.iter() {
            self.add(s);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = Stamp> + '_ {
        let (one, many) = match self {
            Cands::One(x) => (Some(*x), &[][..]),
            Cands::Many(v) => (None, &v[..]),
        };
        one.into_iter().chain(many.iter().copied())
    }

    pub fn to_vec(&self) -> Vec<Stamp> {
        self.iter().collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sec {
    pub cur: Cands,
    pub crash: Cands,
}

impl Sec {
    fn new(s: Stamp) -> Self {
        Sec {
            cur: Cands::One(s),
            crash: Cands::One(s),
        }
    }
}

#[derive(Clone, Debug)]
pub struct VModel {
    pub secs: Vec<Sec>,
    /// For a snapshot: the tag it was taken of (None = of the origin).
    pub parent: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct OriginModel {
    pub id: String,
    pub sectors: u64,
    pub init_stamp: Stamp,
}

/// Where a stamp came from, for explaining a wrong read.
#[derive(Clone, Copy, Debug)]
pub struct StampInfo {
    pub op: u64,
    pub key: VKey,
}

/// A metadata operation that may or may not have happened: it was cut by a
/// crash or failed on an injected fault. Resolved at the next reopen by
/// what the engine lists.
#[derive(Clone, Debug)]
pub enum Maybe {
    Snapshot {
        origin: usize,
        parent: Option<u64>,
        content: Vec<Cands>,
    },
    Delete {
        key: VKey,
    },
    Rollback {
        origin: usize,
        tag: u64,
        content: Vec<Cands>,
    },
}

/// One wrong sector.
#[derive(Clone, Debug)]
pub struct Mismatch {
    pub key: VKey,
    pub lba: u64,
    pub observed: Decoded,
    pub expected: Vec<Stamp>,
}

#[derive(Clone, Debug, Default)]
pub struct Model {
    pub origins: Vec<OriginModel>,
    pub versions: BTreeMap<VKey, VModel>,
    pub maybe: Vec<Maybe>,
    stamps: BTreeMap<Stamp, StampInfo>,
    next_stamp: Stamp,
}

/// First stamp handed to writes; below are origin initial fills.
pub const FIRST_WRITE_STAMP: Stamp = 1 << 20;

impl Model {
    pub fn new() -> Self {
        Model {
            next_stamp: FIRST_WRITE_STAMP,
            ..Default::default()
        }
    }

    /// An origin whose device holds `gen(init_stamp, lba)` in every sector.
    pub fn add_origin(&mut self, id: &str, sectors: u64, init_stamp: Stamp) -> usize {
        let o = self.origins.len();
        self.origins.push(OriginModel {
            id: id.to_string(),
            sectors,
            init_stamp,
        });
        self.versions.insert(
            VKey {
                origin: o,
                tag: None,
            },
            VModel {
                secs: vec![Sec::new(init_stamp); sectors as usize],
                parent: None,
            },
        );
        self.stamps.insert(
            init_stamp,
            StampInfo {
                op: 0,
                key: VKey {
                    origin: o,
                    tag: None,
                },
            },
        );
        o
    }

    pub fn new_stamp(&mut self, op: u64, key: VKey) -> Stamp {
        let s = self.next_stamp;
        self.next_stamp += 1;
        self.stamps.insert(s, StampInfo { op, key });
        s
    }

    pub fn stamp_info(&self, s: Stamp) -> Option<StampInfo> {
        self.stamps.get(&s).copied()
    }

    pub fn live(&self) -> impl Iterator<Item = &VKey> {
        self.versions.keys()
    }

    pub fn snapshots_of(&self, origin: usize) -> Vec<u64> {
        self.versions
            .keys()
            .filter(|k| k.origin == origin)
            .filter_map(|k| k.tag)
            .collect()
    }

    pub fn sectors(&self, origin: usize) -> u64 {
        self.origins[origin].sectors
    }

    fn secs_mut(&mut self, key: VKey) -> &mut Vec<Sec> {
        &mut self
            .versions
            .get_mut(&key)
            .unwrap_or_else(|| panic!("model: no version {key}"))
            .secs
    }

    /// A write of `stamps` at `lba` completed. With `fua` it is durable.
    pub fn write_ok(&mut self, key: VKey, lba: u64, stamps: &[Stamp], fua: bool) {
        let secs = self.secs_mut(key);
        for (i, &s) in stamps.iter().enumerate() {
            let sec = &mut secs[lba as usize + i];
            sec.cur = Cands::One(s);
            if fua {
                sec.crash = Cands::One(s);
            } else {
                sec.crash.add(s);
            }
        }
    }

    /// A write failed (injected fault) or was cut by a crash: each sector
    /// may or may not hold it, now and after a crash.
    pub fn write_unknown(&mut self, key: VKey, lba: u64, stamps: &[Stamp]) {
        let secs = self.secs_mut(key);
        for (i, &s) in stamps.iter().enumerate() {
            let sec = &mut secs[lba as usize + i];
            sec.cur.add(s);
            sec.crash.add(s);
        }
    }

    /// Advisory discard: the content is unspecified but never another
    /// version's data. We accept the old content or zeros.
    pub fn trim(&mut self, key: VKey, lba: u64, n: u64) {
        let secs = self.secs_mut(key);
        for sec in &mut secs[lba as usize..(lba + n) as usize] {
            sec.cur.add(0);
            sec.crash.add(0);
            let c = sec.cur.clone();
            sec.crash.union(&c);
        }
    }

    /// Every completed write to `key` is durable.
    pub fn make_durable(&mut self, key: VKey) {
        for sec in self.secs_mut(key) {
            sec.crash = sec.cur.clone();
        }
    }

    pub fn make_all_durable(&mut self) {
        for v in self.versions.values_mut() {
            for sec in &mut v.secs {
                sec.crash = sec.cur.clone();
            }
        }
    }

    /// A snapshot of `src` returned `tag`.
    pub fn snapshot(&mut self, src: VKey, tag: u64) {
        self.make_durable(src);
        let secs = self.versions[&src].secs.clone();
        let key = VKey {
            origin: src.origin,
            tag: Some(tag),
        };
        self.versions.insert(
            key,
            VModel {
                secs,
                parent: src.tag,
            },
        );
    }

    /// The source's content now, for a snapshot or rollback that may or may
    /// not happen.
    pub fn content_of(&self, key: VKey) -> Vec<Cands> {
        self.versions[&key]
            .secs
            .iter()
            .map(|s| s.cur.clone())
            .collect()
    }

    pub fn delete(&mut self, key: VKey) {
        self.versions.remove(&key);
    }

    /// Rollback of `tag` onto its origin returned: the origin shows the
    /// snapshot's content, durably; the snapshot is made durable first.
    pub fn rollback(&mut self, origin: usize, tag: u64) {
        let t = VKey {
            origin,
            tag: Some(tag),
        };
        self.make_durable(t);
        let secs = self.versions[&t].secs.clone();
        self.secs_mut(VKey { origin, tag: None }).clone_from(&secs);
    }

    /// Check a read of `data` from `key` at `lba` against `cur`, and
    /// collapse the candidates to what was seen.
    pub fn check_read(&mut self, key: VKey, lba: u64, data: &[u8]) -> Result<(), Mismatch> {
        let secs = self.secs_mut(key);
        for (i, buf) in data.chunks(SECTOR).enumerate() {
            let l = lba + i as u64;
            let sec = &mut secs[l as usize];
            let seen = decode(buf, l);
            match seen {
                Decoded::Stamp(s) if sec.cur.contains(s) => sec.cur = Cands::One(s),
                _ => {
                    return Err(Mismatch {
                        key,
                        lba: l,
                        observed: seen,
                        expected: sec.cur.to_vec(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Check a post-crash read against a candidate set (`crash` by default,
    /// or an alternative content for an uncertain rollback); on success
    /// the sector becomes exactly what was seen, durably.
    pub fn check_after_crash(
        key: VKey,
        lba0: u64,
        data: &[u8],
        cands: &[&Cands],
    ) -> Result<Vec<Stamp>, Mismatch> {
        let mut seen_all = Vec::with_capacity(cands.len());
        for (i, buf) in data.chunks(SECTOR).enumerate() {
            let l = lba0 + i as u64;
            let seen = decode(buf, l);
            match seen {
                Decoded::Stamp(s) if cands[i].contains(s) => seen_all.push(s),
                _ => {
                    return Err(Mismatch {
                        key,
                        lba: l,
                        observed: seen,
                        expected: cands[i].to_vec(),
                    })
                }
            }
        }
        Ok(seen_all)
    }

    /// After a verified reopen: the version holds exactly `seen`, durably.
    pub fn settle(&mut self, key: VKey, seen: &[Stamp]) {
        for (sec, &s) in self.secs_mut(key).iter_mut().zip(seen) {
            *sec = Sec::new(s);
        }
    }

    /// Adopt a version the engine lists after an uncertain snapshot.
    pub fn adopt(&mut self, key: VKey, parent: Option<u64>, content: &[Cands]) {
        self.versions.insert(
            key,
            VModel {
                secs: content
                    .iter()
                    .map(|c| Sec {
                        cur: c.clone(),
                        crash: c.clone(),
                    })
                    .collect(),
                parent,
            },
        );
    }

    /// Explain a stamp for a failure report.
    pub fn describe(&self, s: Stamp) -> String {
        if s == 0 {
            return "zeros".into();
        }
        match self.stamps.get(&s) {
            Some(i) if s < FIRST_WRITE_STAMP => format!("initial content of {}", i.key),
            Some(i) => format!("write #{s} (op {}, to {})", i.op, i.key),
            None => format!("unknown stamp {s}"),
        }
    }

    pub fn describe_decoded(&self, d: &Decoded) -> String {
        match d {
            Decoded::Stamp(s) => self.describe(*s),
            Decoded::Misplaced { stamp, lba } => {
                format!(
                    "misplaced data: {} meant for sector {lba}",
                    self.describe(*stamp)
                )
            }
            Decoded::Garbage => "garbage (no valid pattern: torn, flipped or metadata)".into(),
        }
    }

    pub fn explain(&self, m: &Mismatch) -> String {
        let exp: Vec<String> = m.expected.iter().map(|s| self.describe(*s)).collect();
        format!(
            "{} sector {} (byte {}): read {}; expected one of [{}]",
            m.key,
            m.lba,
            m.lba * SECTOR as u64,
            self.describe_decoded(&m.observed),
            exp.join(", ")
        )
    }

    /// Whether the observed value is data written to a different origin,
    /// or to a version of this origin that is not in `key`'s candidates
    /// (for labelling isolation failures).
    pub fn foreign(&self, m: &Mismatch) -> bool {
        match m.observed {
            Decoded::Stamp(s) => match self.stamps.get(&s) {
                Some(i) => i.key != m.key,
                None => false,
            },
            _ => false,
        }
    }
}
