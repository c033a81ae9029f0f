//! Write-back copy-on-write: the first write to an origin chunk after a
//! snapshot copies the old chunk to the COW device and maps it in the open
//! transaction, then *stages* the chunk's new content here and returns,
//! without waiting for a commit. The in-place origin write (*destaging*)
//! happens only once a commit has made the copy and its mapping durable
//! (DESIGN.md's ordering rule); group commit then pays one pair of flushes
//! for every first write staged by then.
//!
//! Invariants:
//! - An entry holds the byte ranges written to the chunk since its copy
//!   (the rest of the chunk is the old data, still in place), and the
//!   metadata generation whose durability allows its destaging. So staging
//!   costs what was written (4 KiB for a 4 KiB write), not whole chunks,
//!   and destaging writes only those bytes.
//! - Every read of the origin chunk lays the entry over what it reads in
//!   place (`overlay_for`, taken before the in-place read); an entry leaves
//!   (`remove`) only after its ranges are in place.
//! - Entries change only under the chunk's exclusive lock: a writer merges
//!   into its chunk's entry (`merge`), the destager writes and removes it;
//!   so what a destager writes is the entry's content.
//! - The staged bytes stay within the budget, except that a write in
//!   progress may finish staging its chunks (bounded by one sub-operation);
//!   a writer that finds the budget used drains first (back-pressure).

use crate::sync::{self, AtomicUsize, Mutex, Ordering};
use std::collections::HashMap;

/// The default staging budget.
pub const DEFAULT_STAGING_BUDGET: u64 = 64 << 20;

/// What is staged, and what staging has done since the open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StagingStats {
    pub budget: u64,
    pub chunks: u64,
    pub bytes: u64,
    /// Chunks staged and destaged since the open.
    pub staged: u64,
    pub destaged: u64,
}

/// One staged chunk: the byte ranges written since its copy, sorted,
/// disjoint and not adjacent. The rest of the chunk is the old data, still
/// in place (and in the copy).
struct Entry {
    ranges: Vec<(usize, Vec<u8>)>,
    gen: u64,
}

impl Entry {
    fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.1.len() as u64).sum()
    }

    /// Write `piece` at `at`: it replaces what it overlaps, and joins the
    /// ranges it overlaps or touches into one.
    fn write(&mut self, at: usize, piece: &[u8]) {
        let end = at + piece.len();
        let touching = |r: &(usize, Vec<u8>)| r.0 <= end && at <= r.0 + r.1.len();
        let Some(first) = self.ranges.iter().position(touching) else {
            let i = self.ranges.partition_point(|r| r.0 < at);
            self.ranges.insert(i, (at, piece.to_vec()));
            return;
        };
        let last = first
            + self.ranges[first..]
                .iter()
                .take_while(|r| touching(r))
                .count();
        let start = at.min(self.ranges[first].0);
        let stop = end.max(self.ranges[last - 1].0 + self.ranges[last - 1].1.len());
        let mut joined = vec![0u8; stop - start];
        for (off, data) in self.ranges.drain(first..last) {
            joined[off - start..off - start + data.len()].copy_from_slice(&data);
        }
        joined[at - start..end - start].copy_from_slice(piece);
        self.ranges.insert(first, (start, joined));
    }

    /// Copy the staged bytes that fall in `[at, at + out.len())` over `out`.
    fn overlay(&self, at: usize, out: &mut [u8]) {
        let end = at + out.len();
        for (off, data) in &self.ranges {
            let (lo, hi) = ((*off).max(at), (off + data.len()).min(end));
            if lo < hi {
                out[lo - at..hi - at].copy_from_slice(&data[lo - off..hi - off]);
            }
        }
    }
}

#[derive(Default)]
struct State {
    entries: HashMap<(u32, u64), Entry>,
    stats: StagingStats,
}

pub struct Staging {
    state: Mutex<State>,
    /// `entries.len()`, so that reads of a store with nothing staged skip
    /// the mutex.
    count: AtomicUsize,
}

impl Staging {
    pub fn new() -> Self {
        let state = State {
            entries: HashMap::new(),
            stats: StagingStats {
                budget: DEFAULT_STAGING_BUDGET,
                ..StagingStats::default()
            },
        };
        Staging {
            state: Mutex::new(state),
            count: AtomicUsize::new(0),
        }
    }

    pub fn set_budget(&self, bytes: u64) {
        sync::lock(&self.state).stats.budget = bytes;
    }

    pub fn stats(&self) -> StagingStats {
        sync::lock(&self.state).stats
    }

    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Whether staging has passed half its budget: the driver commits at
    /// once instead of waiting out its delay.
    pub fn pressing(&self) -> bool {
        let st = sync::lock(&self.state);
        st.stats.bytes >= st.stats.budget / 2 && st.stats.chunks > 0
    }

    /// Whether the budget is used up: writers drain before staging more.
    pub fn full(&self) -> bool {
        let st = sync::lock(&self.state);
        st.stats.bytes >= st.stats.budget && st.stats.chunks > 0
    }

    /// Stage a write of `piece` at `in_off` of chunk `key`, whose copy
    /// this write just made (caller holds the chunk's exclusive lock); it
    /// may go in place once generation `gen` is durable. True when the
    /// driver should be woken: staging was empty (start the commit delay)
    /// or has just passed half its budget (commit now).
    #[must_use]
    pub fn stage(&self, key: (u32, u64), in_off: usize, piece: &[u8], gen: u64) -> bool {
        let mut st = sync::lock(&self.state);
        let len = piece.len() as u64;
        let half = st.stats.budget / 2;
        let wake = st.entries.is_empty() || (st.stats.bytes < half && st.stats.bytes + len >= half);
        let entry = Entry {
            ranges: vec![(in_off, piece.to_vec())],
            gen,
        };
        let old = st.entries.insert(key, entry);
        assert!(old.is_none(), "chunk {key:?} staged twice");
        st.stats.chunks += 1;
        st.stats.bytes += len;
        st.stats.staged += 1;
        self.count.store(st.entries.len(), Ordering::Release);
        wake
    }

    /// Write `piece` at `in_off` into chunk `key`'s entry, if it has one
    /// (caller holds the chunk's exclusive lock). False: not staged.
    pub fn merge(&self, key: (u32, u64), in_off: usize, piece: &[u8]) -> bool {
        if self.is_empty() {
            return false;
        }
        let mut st = sync::lock(&self.state);
        let State { entries, stats } = &mut *st;
        let Some(e) = entries.get_mut(&key) else {
            return false;
        };
        let before = e.bytes();
        e.write(in_off, piece);
        stats.bytes = stats.bytes - before + e.bytes();
        true
    }

    /// The staged bytes of chunk `key` within `[in_off, in_off + len)`, to
    /// lay over a read of that range. Take it *before* reading the chunk
    /// in place: a destage in between writes the same bytes in place, so
    /// the result is right either way.
    pub fn overlay_for(&self, key: (u32, u64), in_off: usize, len: usize) -> Option<Overlay> {
        if self.is_empty() {
            return None;
        }
        let st = sync::lock(&self.state);
        let e = st.entries.get(&key)?;
        let mut part = Entry {
            ranges: Vec::new(),
            gen: e.gen,
        };
        for (off, data) in &e.ranges {
            let (lo, hi) = ((*off).max(in_off), (off + data.len()).min(in_off + len));
            if lo < hi {
                part.ranges.push((lo, data[lo - off..hi - off].to_vec()));
            }
        }
        Some(Overlay { part, at: in_off })
    }

    /// The staged chunks whose generation is at most `durable`, in order.
    pub fn due(&self, durable: u64) -> Vec<(u32, u64)> {
        let st = sync::lock(&self.state);
        let mut keys: Vec<_> = st
            .entries
            .iter()
            .filter(|(_, e)| e.gen <= durable)
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        keys
    }

    /// Chunk `key`'s staged ranges if it is staged and due (caller holds
    /// the chunk's exclusive lock, so they stay so until `remove`).
    pub fn ranges_if_due(&self, key: (u32, u64), durable: u64) -> Option<Vec<(usize, Vec<u8>)>> {
        let st = sync::lock(&self.state);
        st.entries
            .get(&key)
            .filter(|e| e.gen <= durable)
            .map(|e| e.ranges.clone())
    }

    /// Chunk `key`'s content is in place: the entry goes.
    pub fn remove(&self, key: (u32, u64)) {
        let mut st = sync::lock(&self.state);
        let e = st.entries.remove(&key);
        let e = e.unwrap_or_else(|| panic!("destaged chunk {key:?} was not staged"));
        st.stats.chunks -= 1;
        st.stats.bytes -= e.bytes();
        st.stats.destaged += 1;
        self.count.store(st.entries.len(), Ordering::Release);
    }
}

/// Staged bytes to lay over a read of part of a chunk (`Staging::overlay_for`).
pub struct Overlay {
    part: Entry,
    at: usize,
}

impl Overlay {
    pub fn apply(&self, out: &mut [u8]) {
        self.part.overlay(self.at, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ranges against a byte model of the chunk: random writes, then
    /// the invariants and an overlay of a random window.
    #[test]
    fn writes_join_and_overlay_like_a_chunk() {
        let mut rng = 0x1234_5678_u64;
        let mut next = |n: u64| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) % n
        };
        for _ in 0..500 {
            let mut model = vec![None::<u8>; 256];
            let mut e = Entry {
                ranges: Vec::new(),
                gen: 0,
            };
            for w in 0..8u8 {
                let at = next(250) as usize;
                let len = 1 + next(40.min(256 - at as u64)) as usize;
                e.write(at, &vec![w + 1; len]);
                model[at..at + len]
                    .iter_mut()
                    .for_each(|m| *m = Some(w + 1));
                // Sorted, disjoint, not touching; exactly the written bytes.
                assert!(e.ranges.windows(2).all(|p| p[0].0 + p[0].1.len() < p[1].0));
                let staged = model.iter().filter(|m| m.is_some()).count() as u64;
                assert_eq!(e.bytes(), staged);
            }
            let at = next(200) as usize;
            let mut out = vec![0u8; 56];
            e.overlay(at, &mut out);
            for (i, b) in out.iter().enumerate() {
                assert_eq!(*b, model[at + i].unwrap_or(0), "byte {}", at + i);
            }
        }
    }
}
