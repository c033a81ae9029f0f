//! Minimal reproductions of engine bugs the simulator found (see
//! sim/FINDINGS.md). Each test names the contract clause it checks. Tests
//! of open bugs are `#[ignore]`d so CI stays green; run them with
//! `cargo test -p snapmv-sim --test findings -- --include-ignored`.
//! When a bug is fixed, drop its `#[ignore]`: the test becomes a
//! regression test.

use snapmv_engine::store::{Dev, FormatOptions, Store};
use snapmv_engine::{Error, MemDev};
use snapmv_sim::simdev::{CrashFates, Fault, Image, IoKind};
use snapmv_sim::{Domain, SimDev};
use std::sync::Arc;

const CHUNK: u32 = 16 << 10;
const CS: usize = CHUNK as usize;

fn read(s: &Store, tag: Option<u64>, off: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.volume("o", tag).unwrap().read(off, &mut b).unwrap();
    b
}

/// First byte value and whether the whole buffer is that value.
fn fill_of(b: &[u8]) -> (u8, bool) {
    (b[0], b.iter().all(|&x| x == b[0]))
}

fn sim_setup(cow: u64, origin: u64) -> (Store, SimDev, SimDev) {
    let d = Domain::new();
    let c = SimDev::new(&d, 0, "cow", cow, 1);
    let od = SimDev::new(&d, 1, "o", origin, 1);
    let fo = FormatOptions {
        chunk_size: CHUNK,
        force: false,
    };
    let s = Store::format(Arc::new(c.clone()), &fo).unwrap();
    s.bind("o", "sim://o", Arc::new(od.clone()), 1).unwrap();
    (s, c, od)
}

/// Boot a store from post-crash images.
fn boot(cow: Image, o: Image) -> Store {
    let d = Domain::new();
    let c = SimDev::from_image(&d, 0, "cow", cow, 1);
    let od = SimDev::from_image(&d, 1, "o", o, 1);
    let mut r = move |_: &str, _: &str| -> snapmv_engine::Result<Dev> { Ok(Arc::new(od.clone())) };
    Store::open(Arc::new(c), &mut r).unwrap()
}

/// Crash keeping every unflushed write (`true`) or none, per device.
fn crash_with(c: &SimDev, o: &SimDev, cow_keep: bool, origin_keep: bool) -> (Image, Image) {
    let f = |k: bool| {
        if k {
            CrashFates {
                keep: 1.0,
                drop: 0.0,
                torn: 0.0,
            }
        } else {
            CrashFates {
                keep: 0.0,
                drop: 1.0,
                torn: 0.0,
            }
        }
    };
    c.set_crash_fates(f(cow_keep));
    o.set_crash_fates(f(origin_keep));
    c.domain().power_off();
    (c.crash(), o.crash())
}

/// Regression (passes): after `rollback(T)`, a write to T must not reach
/// the origin, online.
#[test]
fn rollback_then_write_snapshot_online() {
    let cow: Dev = Arc::new(MemDev::new(8 << 20));
    let o: Dev = Arc::new(MemDev::new(256 << 10));
    let fo = FormatOptions {
        chunk_size: CHUNK,
        force: false,
    };
    let s = Store::format(cow, &fo).unwrap();
    s.bind("o", "mem://o", o, 1).unwrap();
    let ov = s.volume("o", None).unwrap();
    ov.write(0, &[0xAA; 4096], false).unwrap();
    let t = s.snapshot("o", None, "t", 2).unwrap();
    ov.write(0, &[0xBB; 4096], false).unwrap();
    s.rollback("o", t).unwrap();
    s.volume("o", Some(t))
        .unwrap()
        .write(0, &[0xCC; 4096], false)
        .unwrap();
    assert_eq!(fill_of(&read(&s, None, 0, 4096)), (0xAA, true));
    while s.step_background(16).unwrap().more {}
    assert_eq!(fill_of(&read(&s, None, 0, 4096)), (0xAA, true));
}

/// F1 — clause 1/4. `step_background` finishes a rollback (the frozen
/// source is dropped) and the cleaner merges T's frozen node into T's leaf
/// by *moving* its exceptions, all in one uncommitted transaction. A write
/// to T then goes in place into the moved chunk. After a crash the move is
/// undone (the rollback is back in progress, its frozen source maps that
/// chunk again), but the in-place data stays: the origin, which reads
/// through the frozen source, shows T's later write.
/// Swarm: `snapmv-sim run --seed 204 --ops 273 --off eio,latent`.
#[test]
fn f1_in_place_write_into_uncommitted_cleaner_move() {
    let (s, c, od) = sim_setup(8 << 20, 4 * CS as u64);
    let ov = s.volume("o", None).unwrap();
    ov.write(0, &vec![0xAA; 4 * CS], false).unwrap();
    let t = s.snapshot("o", None, "t", 2).unwrap();
    let tv = s.volume("o", Some(t)).unwrap();
    tv.write(CS as u64, &vec![0x11; CS], false).unwrap(); // T owns chunk 1
    ov.write(0, &vec![0xBB; 4 * CS], false).unwrap();
    s.flush().unwrap();
    s.rollback("o", t).unwrap();
    // One call: copier done, source dropped, cleaner merges (uncommitted).
    s.step_background(64).unwrap();
    tv.write(CS as u64, &[0x22; 512], false).unwrap();
    assert_eq!(
        fill_of(&read(&s, None, CS as u64, 512)),
        (0x11, true),
        "online"
    );
    // A legal crash state: the COW device kept its unflushed writes, the
    // origin device lost the copier's unflushed in-place copies.
    let (ci, oi) = crash_with(&c, &od, true, false);
    drop((ov, tv, s));
    let s = boot(ci, oi);
    assert_eq!(
        fill_of(&read(&s, None, CS as u64, 512)),
        (0x11, true),
        "after crash the origin shows a write made to the snapshot after the rollback (0x22)"
    );
}

/// F2 — checker (clause 4/5 hygiene, clause 6 accounting). A snapshot
/// write that allocates a chunk and then fails on an I/O error leaves the
/// chunk allocated and referenced by nothing; the next commit makes the
/// leak durable and `meta::check` reports it.
/// Swarm: `snapmv-sim run --seed 4 --ops 17`.
#[test]
fn f2_failed_write_leaks_its_allocation() {
    let (s, c, _od) = sim_setup(8 << 20, 4 * CS as u64);
    let t = s.snapshot("o", None, "t", 2).unwrap();
    s.flush().unwrap();
    // The leaf write allocates a fresh chunk, then its data write fails.
    c.arm(IoKind::Write, 0, Fault::Eio);
    let r = s
        .volume("o", Some(t))
        .unwrap()
        .write(0, &[0x33; 512], false);
    assert!(r.is_err());
    // Any later commit makes the allocation durable.
    s.snapshot("o", None, "t2", 3).unwrap();
    s.close().unwrap();
    let copy = SimDev::from_image(&Domain::new(), 0, "copy", c.current(), 0);
    let rep = snapmv_engine::meta::check(copy).unwrap();
    assert!(rep.errors.is_empty(), "{:?}", rep.errors);
}

/// Fill a small COW device through snapshot `t` until ENOSPC; returns how
/// many whole chunks were written.
fn fill(s: &Store, t: u64, max: usize) -> usize {
    let v = s.volume("o", Some(t)).unwrap();
    for i in 0..max {
        match v.write((i * CS) as u64, &vec![0x44; CS], false) {
            Ok(()) => {}
            Err(Error::NoSpace) => return i,
            Err(e) => panic!("fill: {e}"),
        }
    }
    max
}

/// F3 — clause 6 (the failed write changed data). `write_zeroes` over a
/// range with whole and partial chunks turns the whole chunks into zero
/// exceptions first, then fails with ENOSPC on the partial ones: the write
/// that "failed" has zeroed part of its range.
/// Swarm: `snapmv-sim run --seed 106 --ops 369 --off eio,latent`.
#[test]
fn f3_write_zeroes_partially_applied_before_enospc() {
    let origin = 256 * CS as u64;
    let (s, _c, _od) = sim_setup(3 << 20, origin);
    let ov = s.volume("o", None).unwrap();
    ov.write(0, &vec![0x55; 8 * CS], false).unwrap();
    let t = s.snapshot("o", None, "t", 2).unwrap();
    let t2 = s.snapshot("o", None, "t2", 3).unwrap();
    let n = fill(&s, t2, 256);
    assert!(n < 256, "the device must fill up");
    // T still shares everything with the origin: zeroing [half a chunk ..
    // 2.5 chunks] needs one whole chunk (a zero exception, no space) and
    // two partial ones (fresh chunks: ENOSPC).
    let r = s
        .volume("o", Some(t))
        .unwrap()
        .write_zeroes(CS as u64 / 2, 2 * CS as u64, false);
    assert!(matches!(r, Err(Error::NoSpace)), "{r:?}");
    assert_eq!(
        fill_of(&read(&s, Some(t), 0, 3 * CS)),
        (0x55, true),
        "a write_zeroes that failed with ENOSPC zeroed part of its range"
    );
}

/// F4 — clause 6 (spurious ENOSPC). Chunks freed by the cleaner stay in
/// quarantine until their free commits (correct), but a write that finds
/// no other chunk fails with ENOSPC instead of committing to release them,
/// while `status()` already reports them free.
/// Swarm: `snapmv-sim run --seed 221 --ops 819 --off eio,latent`.
#[test]
fn f4_enospc_while_freed_chunks_wait_for_a_commit() {
    let origin = 256 * CS as u64;
    let (s, _c, _od) = sim_setup(3 << 20, origin);
    let t = s.snapshot("o", None, "t", 2).unwrap();
    let n = fill(&s, t, 256);
    assert!(n > 8 && n < 256, "filled {n} chunks");
    let t2 = s.snapshot("o", None, "t2", 3).unwrap();
    s.delete("o", t).unwrap();
    while s.step_background(64).unwrap().more {}
    let st = s.status();
    println!(
        "after delete + clean: {}/{} chunks used",
        st.chunks_used, st.chunks_total
    );
    let r = s
        .volume("o", Some(t2))
        .unwrap()
        .write(0, &vec![0x66; CS], false);
    assert!(
        r.is_ok(),
        "ENOSPC with {}/{} chunks used: {r:?}",
        st.chunks_used,
        st.chunks_total
    );
}
