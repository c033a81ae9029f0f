//! A damaged COW device. A few small stores are built once (OnceLock) on
//! MemDev: origins bound, snapshots of origins and of snapshots, writes on
//! every side, a delete the cleaner has not finished, a rollback in
//! progress, a journal holding committed but not checkpointed transactions.
//! Each input picks one image and applies byte mutations (to metadata
//! blocks, or anywhere), optionally "reseals" the damaged blocks (fresh
//! crc32c, and fresh journal commit crcs) so the damage reaches the
//! structural checks behind the checksums, then:
//!
//! - `store::check` (the offline checker) on the damaged image;
//! - `store::repair` on a copy: afterwards the image checks clean, or the
//!   repair was refused and wrote nothing;
//! - `Store::open_read_only`, read every version end to end;
//! - `Store::open`, read every version, write to each, run the cleaner and
//!   the rollback copier, take and delete a snapshot, flush, close.
//!
//! Errors are expected everywhere; a panic (or a hang) is a finding.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use snapmv_engine::format::{self, BlockKind, PAGE_SIZE};
use snapmv_engine::store::{self, Dev, Store};
use snapmv_engine::store::Volume;
use snapmv_engine::MemDev;
use snapmv_fuzz::*;
use std::sync::{Arc, OnceLock};

const COW_SIZE: u64 = 3 << 20;
const ORIGINS: [(&str, usize); 3] = [("sda", 16 * 4096), ("sdb", 9 * 4096 + 512), ("sdc", 4096)];

struct Base {
    name: &'static str,
    cow: Vec<u8>,
    origins: Vec<(String, Vec<u8>)>,
    /// 4 KiB blocks holding metadata.
    meta: Vec<usize>,
}

fn read_all(v: &Volume) {
    let size = v.size().min(1 << 20);
    let mut buf = vec![0u8; 4096];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(4096) as usize;
        let _ = v.read(off, &mut buf[..n]);
        off += n as u64;
    }
    let _ = v.block_status(0, size);
}

fn snapshot_image(
    name: &'static str,
    cow: &MemDev,
    origins: &[(String, Arc<MemDev>)],
) -> Base {
    let img = image_of(cow);
    Base {
        name,
        meta: metadata_blocks(&img),
        origins: origins
            .iter()
            .map(|(id, d)| (id.clone(), image_of(&**d)))
            .collect(),
        cow: img,
    }
}

/// Build the base images. Everything here must succeed: it is the
/// undamaged starting point.
fn build() -> Vec<Base> {
    let mut out = Vec::new();
    let (cow, s) = fresh_store(COW_SIZE);
    let origins: Vec<(String, Arc<MemDev>)> = ORIGINS
        .iter()
        .enumerate()
        .map(|(i, (id, size))| (id.to_string(), origin_dev(*size, i as u8)))
        .collect();
    for (id, d) in &origins {
        s.bind(id, &format!("/dev/{id}"), d.clone(), 1_700_000_000)
            .unwrap();
    }
    let w = |s: &Store, id: &str, tag: Option<u64>, off: u64, salt: u8| {
        s.volume(id, tag)
            .unwrap()
            .write(off, &pattern(6000, salt), false)
            .unwrap();
    };
    let t1 = s.snapshot("sda", None, "first", 1).unwrap();
    w(&s, "sda", None, 0, 1);
    w(&s, "sda", None, 20000, 2);
    let t2 = s.snapshot("sda", None, "second", 2).unwrap();
    w(&s, "sda", None, 4000, 3);
    let t3 = s.snapshot("sda", Some(t1), "of-first", 3).unwrap();
    w(&s, "sda", Some(t1), 8192, 4);
    w(&s, "sda", Some(t3), 30000, 5);
    s.volume("sda", Some(t3))
        .unwrap()
        .write_zeroes(0, 8192, false)
        .unwrap();
    let tb = s.snapshot("sdb", None, "b", 4).unwrap();
    w(&s, "sdb", None, 100, 6);
    w(&s, "sdb", Some(tb), 9000, 7);
    s.snapshot("sdc", None, "c", 5).unwrap();
    s.volume("sdc", None).unwrap().write(0, &[9; 512], true).unwrap();
    s.delete("sda", t2).unwrap();
    s.flush().unwrap();
    // 1: committed, journal not checkpointed, a deletion not yet cleaned.
    out.push(snapshot_image("journal+dirty-clean", &cow, &origins));
    s.rollback("sdb", tb).unwrap();
    s.step_background(1).unwrap();
    s.flush().unwrap();
    // 2: a rollback half done.
    out.push(snapshot_image("rollback-running", &cow, &origins));
    while s.step_background(64).unwrap().more {}
    // Many snapshots and exceptions: multi-level trees (internal pages).
    for i in 0..24u64 {
        let tag = s.snapshot("sda", None, &format!("many-{i}"), 10 + i as i64).unwrap();
        w(&s, "sda", None, (i * 4096 * 3) % (15 * 4096), i as u8);
        if i % 3 == 0 {
            w(&s, "sda", Some(tag), (i * 4096) % (15 * 4096), 0x40 ^ i as u8);
        }
        if i % 5 == 0 {
            s.snapshot("sda", Some(tag), "nested", 99).unwrap();
        }
    }
    s.close().unwrap();
    // 3: clean close.
    out.push(snapshot_image("closed", &cow, &origins));
    // 4: everything checkpointed home, the journal empty.
    {
        let mut m = snapmv_engine::meta::Meta::open(cow.clone() as Dev).unwrap();
        m.checkpoint().unwrap();
    }
    out.push(snapshot_image("checkpointed", &cow, &origins));
    for b in &out {
        let rep = store::check(dev_from_image(&b.cow) as Dev).unwrap();
        assert!(rep.errors.is_empty(), "base image {} not clean: {:?}", b.name, rep.errors);
    }
    out
}

fn bases() -> &'static [Base] {
    static B: OnceLock<Vec<Base>> = OnceLock::new();
    B.get_or_init(build)
}

#[derive(Arbitrary, Debug)]
enum Mutation {
    /// One byte of a metadata block (`sel` picks the block).
    Byte { sel: u16, off: u16, val: u8 },
    /// One aligned u64 field of a metadata block: counts, pointers, keys.
    Word { sel: u16, field: u16, val: u64 },
    /// A small value added to a u64 field (off-by-one pointers, counts).
    Nudge { sel: u16, field: u16, delta: i8 },
    /// A metadata block overwritten by another (misdirected/stale write).
    Copy { from: u16, to: u16 },
    /// A metadata block lost (zeroed).
    Zero { sel: u16 },
    /// Any byte of the device.
    Raw { off: u32, val: u8 },
    /// Structure-aware: the value of entry `entry` of an exceptions-tree
    /// leaf (a data chunk number) replaced by an interesting chunk number.
    ExcValue { sel: u16, entry: u8, val: ChunkVal },
    /// Structure-aware: a B+tree entry's key (leaf or internal) or an
    /// internal node's child pointer replaced.
    TreeField { sel: u16, entry: u8, child: bool, val: u64 },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum ChunkVal {
    /// Fixed area: superblocks, state page, journal, bitmap.
    Fixed(u8),
    /// Somewhere in the allocation area (may hold tree pages).
    Area(u16),
    /// Just past the end of the device, or far past it.
    PastEnd(u8),
    Raw(u64),
}

fn chunk_val(v: ChunkVal, dev_chunks: u64) -> u64 {
    match v {
        ChunkVal::Fixed(c) => u64::from(c) % 8,
        ChunkVal::Area(c) => u64::from(c) % dev_chunks,
        ChunkVal::PastEnd(c) => dev_chunks + u64::from(c),
        ChunkVal::Raw(c) => c,
    }
}

/// The B+tree pages among `meta`: (block, tree id, level, count, value size).
fn tree_pages(img: &[u8], meta: &[usize]) -> Vec<(usize, u32, u32, usize, usize)> {
    meta.iter()
        .filter_map(|&b| {
            let p = &img[b * PAGE_SIZE..(b + 1) * PAGE_SIZE];
            let kind = format::rd_u32(p, 0);
            (kind == BlockKind::Leaf as u32 || kind == BlockKind::Internal as u32).then(|| {
                let count = (format::rd_u32(p, 32) as usize).min(255);
                (b, format::rd_u32(p, 24), format::rd_u32(p, 28), count, format::rd_u32(p, 36) as usize)
            })
        })
        .collect()
}

#[derive(Arbitrary, Debug)]
struct Input {
    base: u8,
    reseal: bool,
    fix_journal: bool,
    fallback_origin: bool,
    muts: Vec<Mutation>,
    /// Work on the read-write open.
    writes: u8,
}

fn apply(img: &mut [u8], meta: &[usize], m: &Mutation) {
    let pick = |sel: u16| meta[sel as usize % meta.len()] * PAGE_SIZE;
    match *m {
        Mutation::Byte { sel, off, val } => img[pick(sel) + off as usize % PAGE_SIZE] = val,
        Mutation::Word { sel, field, val } => {
            let at = pick(sel) + (field as usize % (PAGE_SIZE / 8)) * 8;
            img[at..at + 8].copy_from_slice(&val.to_le_bytes());
        }
        Mutation::Nudge { sel, field, delta } => {
            let at = pick(sel) + (field as usize % (PAGE_SIZE / 8)) * 8;
            let v = u64::from_le_bytes(img[at..at + 8].try_into().unwrap());
            let v = v.wrapping_add(delta as i64 as u64);
            img[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        Mutation::Copy { from, to } => {
            let (f, t) = (pick(from), pick(to));
            if f != t {
                img.copy_within(f..f + PAGE_SIZE, t);
            }
        }
        Mutation::Zero { sel } => {
            let at = pick(sel);
            img[at..at + PAGE_SIZE].fill(0);
        }
        Mutation::Raw { off, val } => {
            let n = img.len();
            img[off as usize % n] = val;
        }
        Mutation::ExcValue { sel, entry, val } => {
            let leaves: Vec<_> = tree_pages(img, meta)
                .into_iter()
                .filter(|t| t.1 == 0 && t.2 == 0 && t.3 > 0 && t.4 == 8)
                .collect();
            if let Some(&(b, _, _, count, _)) = leaves.get(sel as usize % leaves.len().max(1)) {
                let at = b * PAGE_SIZE + 64 + 24 * (entry as usize % count) + 16;
                let v = chunk_val(val, (img.len() / CHUNK as usize) as u64);
                img[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        Mutation::TreeField { sel, entry, child, val } => {
            let pages: Vec<_> = tree_pages(img, meta).into_iter().filter(|t| t.3 > 0).collect();
            if let Some(&(b, _, level, count, vs)) = pages.get(sel as usize % pages.len().max(1)) {
                let esz = 16 + if level == 0 { vs.clamp(1, 4000) } else { 8 };
                let e = b * PAGE_SIZE + 64 + esz * (entry as usize % count);
                let at = if child && level > 0 { e + 16 } else { e + if val & 1 == 0 { 0 } else { 8 } };
                if at + 8 <= (b + 1) * PAGE_SIZE {
                    img[at..at + 8].copy_from_slice(&val.to_le_bytes());
                }
            }
        }
    }
}

fn exercise(s: &Store, writes: u8, rw: bool) {
    let versions = s.versions();
    let _ = s.status();
    for v in &versions {
        if let Ok(vol) = s.volume(&v.origin, v.tag) {
            let _ = vol.memo();
            let _ = vol.is_live();
            read_all(&vol);
        }
    }
    if !rw {
        return;
    }
    for (i, v) in versions.iter().enumerate().take(writes as usize % 8) {
        if let Ok(vol) = s.volume(&v.origin, v.tag) {
            let off = (i as u64 * 5000) % vol.size().max(1);
            let len = 4096.min(vol.size().saturating_sub(off)) as usize;
            let _ = vol.write(off, &pattern(len, i as u8), i % 2 == 0);
            let _ = vol.trim(0, 4096.min(vol.size()));
        }
    }
    for _ in 0..8 {
        match s.step_background(16) {
            Ok(r) if r.more => {}
            _ => break,
        }
    }
    // Admin operations on the damaged trees and counters.
    let snaps: Vec<_> = versions.iter().filter(|v| v.tag.is_some()).collect();
    if writes & 0x80 != 0 {
        if let Some(v) = versions.first() {
            if let Ok(t) = s.snapshot(&v.origin, v.tag, "fuzz", 7) {
                let _ = s.delete(&v.origin, t);
            }
        }
    }
    if writes & 0x40 != 0 {
        if let Some(v) = snaps.first() {
            if let Ok(t) = s.snapshot(&v.origin, v.tag, "fuzz-ss", 8) {
                if let Ok(vol) = s.volume(&v.origin, Some(t)) {
                    read_all(&vol);
                    let _ = vol.write(0, &pattern(4096.min(vol.size() as usize), 3), false);
                }
            }
        }
    }
    if writes & 0x20 != 0 {
        if let Some(v) = snaps.get(1) {
            let _ = s.delete(&v.origin, v.tag.unwrap_or(0));
        }
    }
    if writes & 0x10 != 0 {
        if let Some(v) = snaps.last() {
            let _ = s.rollback(&v.origin, v.tag.unwrap_or(0));
        }
    }
    for _ in 0..8 {
        match s.step_background(16) {
            Ok(r) if r.more => {}
            _ => break,
        }
    }
    for v in s.versions() {
        if let Ok(vol) = s.volume(&v.origin, v.tag) {
            read_all(&vol);
        }
    }
    let _ = s.flush();
}

fn one(data: &[u8]) {
    let u = Unstructured::new(data);
    let Ok(input) = Input::arbitrary_take_rest(u) else {
        return;
    };
    if std::env::var_os("SNAPMV_FUZZ_DEBUG").is_some() {
        eprintln!("{input:#?}");
    }
    let bases = bases();
    let b = &bases[input.base as usize % bases.len()];
    let mut img = b.cow.clone();
    for m in input.muts.iter().take(16) {
        apply(&mut img, &b.meta, m);
    }
    if input.reseal {
        reseal_all(&mut img);
    }
    if input.fix_journal {
        fix_journal(&mut img);
    }
    let origins = || -> Vec<(String, Arc<MemDev>)> {
        b.origins
            .iter()
            .map(|(id, d)| (id.clone(), dev_from_image(d)))
            .collect()
    };

    // Offline checker.
    let _ = store::check(dev_from_image(&img) as Dev);

    // Offline repair: it fixes space accounting or refuses, writing nothing.
    {
        let cow = dev_from_image(&img);
        if let Ok(r) = store::repair(cow.clone() as Dev) {
            match r.refused.is_empty() {
                true => assert!(
                    r.after.errors.is_empty(),
                    "repair of {} left damage: {:?} (found {:?}, fixed {:?})",
                    b.name,
                    r.after.errors,
                    r.found,
                    r.fixed
                ),
                false => assert!(
                    image_of(&*cow) == img,
                    "a refused repair of {} wrote to the device",
                    b.name
                ),
            }
        }
    }

    // Read-only open: nothing may be written.
    {
        let cow = dev_from_image(&img);
        let o = origins();
        let mut r = resolver(&o, input.fallback_origin);
        if let Ok(s) = Store::open_read_only(cow.clone() as Dev, &mut r) {
            exercise(&s, 0, false);
            let _ = s.close();
            assert!(
                image_of(&*cow) == img,
                "read-only open of {} changed the COW device",
                b.name
            );
        }
    }

    // Read-write open, through a guard that refuses anything but valid
    // superblocks and state pages on blocks 0..3.
    let cow = dev_from_image(&img);
    let guarded: Dev = Arc::new(GuardDev(cow.clone()));
    let o = origins();
    let mut r = resolver(&o, input.fallback_origin);
    if let Ok(s) = Store::open(guarded.clone(), &mut r) {
        exercise(&s, input.writes, true);
        let _ = s.close();
        // Reopen after our own writes on a damaged device: still no panic.
        let mut r = resolver(&o, input.fallback_origin);
        if let Ok(s) = Store::open(guarded.clone(), &mut r) {
            exercise(&s, 0, false);
        }
        let _ = store::check(guarded);
    }
}

fuzz_target!(|data: &[u8]| {
    run_ignoring_known(|| one(data));
});
