//! `SimDev`: a simulated block device that knows exactly which writes are
//! durable, and can lose, tear, reorder, misdirect, corrupt or fail them.
//!
//! Model of a disk with a volatile write cache:
//! - `durable` is the media content as of the last completed `flush`;
//! - `epoch` is the ordered list of writes completed since then (the cache);
//! - `cur` is what reads see: `durable` with the epoch applied in order.
//!
//! A crash keeps each epoch write, drops it, or tears it (a subset of its
//! 512-byte sectors reaches the media), and applies the survivors in a random
//! order. That covers "any order among overlapping writes": a drive may write
//! back its cache in any order, and CrashMonkey/ALICE treat it the same way.
//!
//! Devices of one simulated machine share a [`Domain`]: a global event
//! sequence (so the exhaustive enumerator can place a crash between any two
//! I/Os of different devices), a power switch (a crash at the N-th I/O from
//! now, i.e. inside an engine call), and an optional recording of every
//! write and flush.
//!
//! Every random choice comes from a `ChaCha8Rng` seeded from one u64, and
//! the simulator is single-threaded, so a seed replays bit-identically.
//! The `Mutex`es are there only because `BlockDev` must be `Send + Sync`.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use snapmv_engine::dev::{check_range, BlockDev, SECTOR};
use snapmv_engine::{Error, Result};
use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// Granularity of the sparse image. A page is only a storage unit: tearing
/// and faults work on 512-byte sectors.
pub const PAGE: usize = 4096;
const SECTORS_PER_PAGE: u64 = PAGE as u64 / SECTOR;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic inside the engine while a SimDev lock is held must not turn
    // every later check into a poison error: the harness reports the panic.
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A device's content: sparse copy-on-write pages, so cloning an image (for
/// every crash state) costs a pointer per page, not a copy of the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    size: u64,
    pages: Vec<Option<Arc<[u8; PAGE]>>>,
    /// Sectors that fail every read until they are rewritten (latent
    /// sector errors are a property of the media, so they survive a crash).
    pub latent: BTreeSet<u64>,
}

impl Image {
    pub fn zeroed(size: u64) -> Self {
        assert!(
            size.is_multiple_of(SECTOR),
            "device size must be a multiple of 512"
        );
        let n = (size as usize).div_ceil(PAGE);
        Image {
            size,
            pages: vec![None; n],
            latent: BTreeSet::new(),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset as usize + done;
            let (p, o) = (pos / PAGE, pos % PAGE);
            let n = (PAGE - o).min(buf.len() - done);
            match &self.pages[p] {
                Some(pg) => buf[done..done + n].copy_from_slice(&pg[o..o + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset as usize + done;
            let (p, o) = (pos / PAGE, pos % PAGE);
            let n = (PAGE - o).min(data.len() - done);
            let pg = self.pages[p].get_or_insert_with(|| Arc::new([0u8; PAGE]));
            Arc::make_mut(pg)[o..o + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    pub fn flip_bit(&mut self, byte: u64, bit: u8) {
        let (p, o) = (byte as usize / PAGE, byte as usize % PAGE);
        let pg = self.pages[p].get_or_insert_with(|| Arc::new([0u8; PAGE]));
        Arc::make_mut(pg)[o] ^= 1 << (bit & 7);
    }

    /// Pages that were ever written (a superset of the non-zero pages).
    pub fn written_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_some())
            .map(|(i, _)| i as u64)
    }

    /// Content hash, used to deduplicate crash states. Equal content gives
    /// equal hashes whether a page is allocated or not.
    pub fn content_hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (i, p) in self.pages.iter().enumerate() {
            if let Some(pg) = p {
                if pg.iter().all(|&b| b == 0) {
                    continue;
                }
                let c = crc32c::crc32c(&pg[..]) as u64;
                h = mix(h ^ ((i as u64) << 32 | c));
            }
        }
        for s in &self.latent {
            h = mix(h ^ s.wrapping_mul(0x9e37_79b9));
        }
        h
    }
}

/// splitmix64 finaliser: cheap, well-mixed, deterministic.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One completed write that is not yet durable. `offset` is where the data
/// actually landed (after a misdirect, that is not where it was aimed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteRec {
    pub offset: u64,
    pub data: Arc<[u8]>,
}

impl WriteRec {
    /// The sector-aligned pieces of this write: (byte offset, byte range in
    /// `data`). Tearing keeps or drops whole pieces.
    pub fn pieces(&self) -> Vec<(u64, std::ops::Range<usize>)> {
        let mut v = Vec::new();
        let mut done = 0usize;
        while done < self.data.len() {
            let pos = self.offset + done as u64;
            let n = ((SECTOR - pos % SECTOR) as usize).min(self.data.len() - done);
            v.push((pos, done..done + n));
            done += n;
        }
        v
    }

    pub fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }

    pub fn overlaps(&self, o: &WriteRec) -> bool {
        self.offset < o.end() && o.offset < self.end()
    }

    /// Apply the pieces selected by `keep` (None = all).
    pub fn apply(&self, img: &mut Image, keep: Option<&[bool]>) {
        match keep {
            None => img.write(self.offset, &self.data),
            Some(k) => {
                for (i, (pos, r)) in self.pieces().into_iter().enumerate() {
                    if k.get(i).copied().unwrap_or(false) {
                        img.write(pos, &self.data[r]);
                    }
                }
            }
        }
        // Rewriting a sector remaps it: the latent error is gone.
        clear_latent(&mut img.latent, self.offset, self.data.len() as u64);
    }
}

fn clear_latent(latent: &mut BTreeSet<u64>, offset: u64, len: u64) {
    if latent.is_empty() || len == 0 {
        return;
    }
    let (a, b) = (offset / SECTOR, (offset + len - 1) / SECTOR);
    let hit: Vec<u64> = latent.range(a..=b).copied().collect();
    for s in hit {
        // Only a sector that is wholly rewritten is remapped.
        if s * SECTOR >= offset && (s + 1) * SECTOR <= offset + len {
            latent.remove(&s);
        }
    }
}

/// One event of a recording (see [`Domain::start_recording`]).
#[derive(Clone, Debug)]
pub struct Event {
    pub seq: u64,
    pub dev: usize,
    pub kind: EventKind,
}

#[derive(Clone, Debug)]
pub enum EventKind {
    Write(WriteRec),
    Flush,
}

/// Probabilities of each fate of an epoch write at a random crash.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrashFates {
    pub keep: f64,
    pub drop: f64,
    /// The rest of the mass is "torn".
    pub torn: f64,
}

impl Default for CrashFates {
    fn default() -> Self {
        CrashFates {
            keep: 0.45,
            drop: 0.35,
            torn: 0.20,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Flush,
}

/// A fault armed to fire on the `nth` next I/O of `kind` on one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// EIO once; the I/O is not performed.
    Eio,
    /// The sectors touched become latent: this read (or write) fails, and
    /// every later read of them fails until they are rewritten. For a
    /// write, nothing is written.
    Latent,
    /// A write lands at `offset + delta` (clamped into the device) instead
    /// of where it was aimed; it reports success.
    Misdirect { delta: i64 },
}

#[derive(Clone, Copy, Debug)]
struct Armed {
    kind: IoKind,
    countdown: u64,
    fault: Fault,
}

/// Counters, for the harness (was a fault fired during this call?) and for
/// the throughput report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub bytes_written: u64,
    pub faults_fired: u64,
}

struct DomainState {
    seq: u64,
    /// Power fails at the I/O whose sequence number reaches this.
    cut_at: Option<u64>,
    dead: bool,
    recording: Option<Vec<Event>>,
}

/// The machine a set of devices belongs to. Cheap to clone.
#[derive(Clone)]
pub struct Domain {
    st: Arc<Mutex<DomainState>>,
}

impl Default for Domain {
    fn default() -> Self {
        Self::new()
    }
}

impl Domain {
    pub fn new() -> Self {
        Domain {
            st: Arc::new(Mutex::new(DomainState {
                seq: 0,
                cut_at: None,
                dead: false,
                recording: None,
            })),
        }
    }

    /// Lose power at the `n`-th write or flush from now (0 = the next one):
    /// that I/O and everything after it fails with EIO on every device of
    /// the domain. The harness then calls [`SimDev::crash`].
    pub fn cut_power_after(&self, n: u64) {
        let mut s = lock(&self.st);
        s.cut_at = Some(s.seq + n);
    }

    pub fn disarm_power_cut(&self) {
        lock(&self.st).cut_at = None;
    }

    /// Power is off now (a cut fired, or [`Domain::power_off`]).
    pub fn is_dead(&self) -> bool {
        lock(&self.st).dead
    }

    /// Lose power now: every later I/O fails.
    pub fn power_off(&self) {
        lock(&self.st).dead = true;
    }

    /// Number of writes and flushes issued so far, on all devices.
    pub fn seq(&self) -> u64 {
        lock(&self.st).seq
    }

    pub fn start_recording(&self) {
        lock(&self.st).recording = Some(Vec::new());
    }

    pub fn stop_recording(&self) -> Vec<Event> {
        lock(&self.st).recording.take().unwrap_or_default()
    }

    /// Account one write/flush; Err if power is (now) off.
    fn tick(&self) -> std::result::Result<u64, ()> {
        let mut s = lock(&self.st);
        if s.dead {
            return Err(());
        }
        if let Some(c) = s.cut_at {
            if s.seq >= c {
                s.dead = true;
                s.cut_at = None;
                return Err(());
            }
        }
        let q = s.seq;
        s.seq += 1;
        Ok(q)
    }

    fn record(&self, seq: u64, dev: usize, kind: EventKind) {
        if let Some(r) = lock(&self.st).recording.as_mut() {
            r.push(Event { seq, dev, kind });
        }
    }
}

struct DevState {
    cur: Image,
    durable: Image,
    epoch: Vec<WriteRec>,
    armed: Vec<Armed>,
    stats: DevStats,
    rng: ChaCha8Rng,
    fates: CrashFates,
    /// 4 KiB blocks read since `take_reads` (for the corruption oracle:
    /// "was the flipped block ever read?").
    reads_seen: BTreeSet<u64>,
    crashed: bool,
}

/// A simulated device. Clones share the device (the harness keeps one, the
/// store another).
#[derive(Clone)]
pub struct SimDev {
    st: Arc<Mutex<DevState>>,
    domain: Domain,
    index: usize,
    size: u64,
    name: Arc<str>,
}

impl SimDev {
    /// A zero-filled device. `index` identifies it in recordings; `seed`
    /// drives its crash choices.
    pub fn new(domain: &Domain, index: usize, name: &str, size: u64, seed: u64) -> Self {
        Self::from_image(domain, index, name, Image::zeroed(size), seed)
    }

    /// A device whose durable content is `img` (e.g. a post-crash image).
    pub fn from_image(domain: &Domain, index: usize, name: &str, img: Image, seed: u64) -> Self {
        let size = img.size();
        SimDev {
            st: Arc::new(Mutex::new(DevState {
                cur: img.clone(),
                durable: img,
                epoch: Vec::new(),
                armed: Vec::new(),
                stats: DevStats::default(),
                rng: ChaCha8Rng::seed_from_u64(mix(seed ^ (index as u64).wrapping_mul(0x51))),
                fates: CrashFates::default(),
                reads_seen: BTreeSet::new(),
                crashed: false,
            })),
            domain: domain.clone(),
            index,
            size,
            name: Arc::from(name),
        }
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    pub fn set_crash_fates(&self, f: CrashFates) {
        lock(&self.st).fates = f;
    }

    pub fn stats(&self) -> DevStats {
        lock(&self.st).stats
    }

    /// What reads see now.
    pub fn current(&self) -> Image {
        lock(&self.st).cur.clone()
    }

    /// Content as of the last flush.
    pub fn durable(&self) -> Image {
        lock(&self.st).durable.clone()
    }

    /// Writes completed since the last flush, in completion order.
    pub fn epoch(&self) -> Vec<WriteRec> {
        lock(&self.st).epoch.clone()
    }

    /// Write straight to the media (durable and current), bypassing faults
    /// and accounting: for setting up initial content.
    pub fn poke(&self, offset: u64, data: &[u8]) {
        let mut s = lock(&self.st);
        s.cur.write(offset, data);
        s.durable.write(offset, data);
    }

    /// Raw read of the current content, bypassing faults and accounting.
    pub fn peek(&self, offset: u64, buf: &mut [u8]) {
        lock(&self.st).cur.read(offset, buf);
    }

    /// Arm `fault` on the `nth` next I/O of `kind` (0 = the next one).
    pub fn arm(&self, kind: IoKind, nth: u64, fault: Fault) {
        lock(&self.st).armed.push(Armed {
            kind,
            countdown: nth,
            fault,
        });
    }

    pub fn disarm_all(&self) {
        lock(&self.st).armed.clear();
    }

    pub fn armed_count(&self) -> usize {
        lock(&self.st).armed.len()
    }

    /// Make a sector fail reads until it is rewritten.
    pub fn add_latent(&self, sector: u64) {
        let mut s = lock(&self.st);
        s.cur.latent.insert(sector);
        s.durable.latent.insert(sector);
    }

    /// Forget every latent error, keeping the content (a successful retry
    /// or a remap by the drive).
    pub fn heal(&self) {
        let mut s = lock(&self.st);
        s.cur.latent.clear();
        s.durable.latent.clear();
        s.armed.clear();
    }

    /// Flip one bit on the media: in the durable content and in what reads
    /// see. Any later write over it (or a crash replaying one) overwrites it.
    pub fn flip_bit(&self, byte: u64, bit: u8) {
        let mut s = lock(&self.st);
        s.cur.flip_bit(byte, bit);
        s.durable.flip_bit(byte, bit);
    }

    /// 4 KiB blocks read since the last call.
    pub fn take_reads(&self) -> BTreeSet<u64> {
        std::mem::take(&mut lock(&self.st).reads_seen)
    }

    /// The post-crash media content, drawn at random: each epoch write is
    /// kept, dropped or torn (each sector kept with probability 1/2, or a
    /// prefix or suffix), and the survivors land in a random order. The
    /// device is dead afterwards (every I/O fails); build a new one from
    /// the image to "reboot".
    pub fn crash(&self) -> Image {
        let mut s = lock(&self.st);
        s.crashed = true;
        let DevState {
            durable,
            epoch,
            rng,
            fates,
            ..
        } = &mut *s;
        let mut order: Vec<usize> = (0..epoch.len()).collect();
        order.shuffle(rng);
        let mut img = durable.clone();
        for i in order {
            let w = &epoch[i];
            let x: f64 = rng.gen();
            if x < fates.keep {
                w.apply(&mut img, None);
            } else if x < fates.keep + fates.drop {
                // dropped
            } else {
                let n = w.pieces().len();
                let keep = random_tear(rng, n);
                w.apply(&mut img, Some(&keep));
            }
        }
        img
    }

    /// The post-crash content when every epoch write is lost.
    pub fn crash_drop_all(&self) -> Image {
        let mut s = lock(&self.st);
        s.crashed = true;
        s.durable.clone()
    }

    fn fail(&self, what: &'static str, offset: u64, msg: &str) -> Error {
        Error::io(
            what,
            offset,
            io::Error::other(format!("{}: {msg}", self.name)),
        )
    }

    /// Take the armed fault that fires on this I/O, if any.
    fn fire(st: &mut DevState, kind: IoKind) -> Option<Fault> {
        let mut fired = None;
        let mut i = 0;
        while i < st.armed.len() {
            if st.armed[i].kind == kind {
                if st.armed[i].countdown == 0 {
                    if fired.is_none() {
                        fired = Some(st.armed.remove(i).fault);
                        continue;
                    }
                } else {
                    st.armed[i].countdown -= 1;
                }
            }
            i += 1;
        }
        if fired.is_some() {
            st.stats.faults_fired += 1;
        }
        fired
    }
}

/// A random tear of `n` pieces: never all, never none (those are keep and
/// drop). Half the time independent sectors, else a prefix or a suffix (the
/// shapes real drives produce most).
pub fn random_tear(rng: &mut ChaCha8Rng, n: usize) -> Vec<bool> {
    if n <= 1 {
        return vec![rng.gen_bool(0.5); n];
    }
    let k = rng.gen_range(1..n);
    match rng.gen_range(0..3) {
        0 => (0..n).map(|i| i < k).collect(),
        1 => (0..n).map(|i| i >= n - k).collect(),
        _ => {
            let mut v: Vec<bool> = (0..n).map(|_| rng.gen_bool(0.5)).collect();
            if v.iter().all(|&b| b) {
                v[rng.gen_range(0..n)] = false;
            } else if v.iter().all(|&b| !b) {
                v[rng.gen_range(0..n)] = true;
            }
            v
        }
    }
}

impl BlockDev for SimDev {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range("simdev read", offset, buf.len() as u64, self.size)?;
        if self.domain.is_dead() {
            return Err(self.fail("simdev read", offset, "power lost"));
        }
        let mut s = lock(&self.st);
        if s.crashed {
            return Err(self.fail("simdev read", offset, "device crashed"));
        }
        s.stats.reads += 1;
        if !buf.is_empty() {
            let (a, b) = (
                offset / PAGE as u64,
                (offset + buf.len() as u64 - 1) / PAGE as u64,
            );
            s.reads_seen.extend(a..=b);
        }
        match Self::fire(&mut s, IoKind::Read) {
            Some(Fault::Latent) if !buf.is_empty() => {
                let first = offset / SECTOR;
                let last = (offset + buf.len() as u64 - 1) / SECTOR;
                let pick = s.rng.gen_range(first..=last);
                s.cur.latent.insert(pick);
                s.durable.latent.insert(pick);
                return Err(self.fail("simdev read", pick * SECTOR, "latent sector error"));
            }
            Some(Fault::Eio) => return Err(self.fail("simdev read", offset, "injected EIO")),
            _ => {}
        }
        if !s.cur.latent.is_empty() && !buf.is_empty() {
            let (a, b) = (offset / SECTOR, (offset + buf.len() as u64 - 1) / SECTOR);
            if let Some(&bad) = s.cur.latent.range(a..=b).next() {
                s.stats.faults_fired += 1;
                return Err(self.fail("simdev read", bad * SECTOR, "latent sector error"));
            }
        }
        s.cur.read(offset, buf);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        check_range("simdev write", offset, buf.len() as u64, self.size)?;
        let seq = self
            .domain
            .tick()
            .map_err(|()| self.fail("simdev write", offset, "power lost"))?;
        let mut s = lock(&self.st);
        if s.crashed {
            return Err(self.fail("simdev write", offset, "device crashed"));
        }
        s.stats.writes += 1;
        let mut at = offset;
        match Self::fire(&mut s, IoKind::Write) {
            Some(Fault::Eio) => return Err(self.fail("simdev write", offset, "injected EIO")),
            Some(Fault::Latent) => {
                if !buf.is_empty() {
                    let (a, b) = (offset / SECTOR, (offset + buf.len() as u64 - 1) / SECTOR);
                    s.cur.latent.extend(a..=b);
                    s.durable.latent.extend(a..=b);
                }
                return Err(self.fail("simdev write", offset, "latent sector error"));
            }
            Some(Fault::Misdirect { delta }) => {
                let max = self.size - buf.len() as u64;
                let t = (offset as i64).saturating_add(delta).clamp(0, max as i64) as u64;
                at = t - t % SECTOR;
            }
            None => {}
        }
        s.stats.bytes_written += buf.len() as u64;
        let w = WriteRec {
            offset: at,
            data: Arc::from(buf),
        };
        w.apply(&mut s.cur, None);
        s.epoch.push(w.clone());
        drop(s);
        self.domain.record(seq, self.index, EventKind::Write(w));
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let seq = self
            .domain
            .tick()
            .map_err(|()| self.fail("simdev flush", 0, "power lost"))?;
        let mut s = lock(&self.st);
        if s.crashed {
            return Err(self.fail("simdev flush", 0, "device crashed"));
        }
        s.stats.flushes += 1;
        if let Some(f) = Self::fire(&mut s, IoKind::Flush) {
            // A failed flush persists nothing; the cache stays volatile.
            let _ = f;
            return Err(self.fail("simdev flush", 0, "injected EIO"));
        }
        s.durable = s.cur.clone();
        s.epoch.clear();
        drop(s);
        self.domain.record(seq, self.index, EventKind::Flush);
        Ok(())
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Sector index helpers used by tests and the enumerator.
pub fn page_of_sector(s: u64) -> u64 {
    s / SECTORS_PER_PAGE
}
