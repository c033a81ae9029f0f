//! Unit tests of the simulated disk, the crash-state enumerator, the
//! content pattern, seeds and the model. These need no engine.

use snapmv_engine::BlockDev;
use snapmv_sim::exhaustive::{enumerate_device, tear_patterns, Limits};
use snapmv_sim::model::{Model, VKey};
use snapmv_sim::pattern::{self, Decoded};
use snapmv_sim::simdev::{CrashFates, EventKind, Fault, Image, IoKind, WriteRec};
use snapmv_sim::{parse_seed, Domain, SimDev};
use std::sync::Arc;

const S: usize = 512;

fn dev(seed: u64) -> (Domain, SimDev) {
    let d = Domain::new();
    let s = SimDev::new(&d, 0, "t", 64 * 1024, seed);
    (d, s)
}

fn fill(b: u8, sectors: usize) -> Vec<u8> {
    vec![b; sectors * S]
}

fn sector(img: &Image, s: u64) -> u8 {
    let mut b = [0u8; S];
    img.read(s * S as u64, &mut b);
    assert!(b.iter().all(|&x| x == b[0]), "sector {s} is not uniform");
    b[0]
}

#[test]
fn reads_see_writes_and_flush_makes_durable() {
    let (_d, s) = dev(1);
    s.write_at(4096, &fill(7, 2)).unwrap();
    let mut b = vec![0u8; 2 * S];
    s.read_at(4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 7));
    assert_eq!(sector(&s.durable(), 8), 0, "not durable before flush");
    assert_eq!(s.epoch().len(), 1);
    s.flush().unwrap();
    assert_eq!(sector(&s.durable(), 8), 7);
    assert!(s.epoch().is_empty());
    assert!(
        s.read_at(64 * 1024 - 10, &mut [0u8; 11]).is_err(),
        "out of range is an error"
    );
}

#[test]
fn crash_keep_drop_and_tear() {
    for seed in 0..50u64 {
        println!("seed {seed}");
        let (_d, s) = dev(seed);
        s.write_at(0, &fill(1, 4)).unwrap();
        s.flush().unwrap();
        s.write_at(0, &fill(2, 4)).unwrap();

        s.set_crash_fates(CrashFates {
            keep: 1.0,
            drop: 0.0,
            torn: 0.0,
        });
        let k = s.crash();
        assert!((0..4).all(|i| sector(&k, i) == 2), "keep applies all");

        let (_d, s) = dev(seed);
        s.write_at(0, &fill(1, 4)).unwrap();
        s.flush().unwrap();
        s.write_at(0, &fill(2, 4)).unwrap();
        s.set_crash_fates(CrashFates {
            keep: 0.0,
            drop: 1.0,
            torn: 0.0,
        });
        let d = s.crash();
        assert!(
            (0..4).all(|i| sector(&d, i) == 1),
            "drop keeps the durable value"
        );

        let (_d, s) = dev(seed);
        s.write_at(0, &fill(1, 4)).unwrap();
        s.flush().unwrap();
        s.write_at(0, &fill(2, 4)).unwrap();
        s.set_crash_fates(CrashFates {
            keep: 0.0,
            drop: 0.0,
            torn: 1.0,
        });
        let t = s.crash();
        let v: Vec<u8> = (0..4).map(|i| sector(&t, i)).collect();
        assert!(
            v.iter().all(|&x| x == 1 || x == 2),
            "torn sectors hold old or new: {v:?}"
        );
        assert!(
            v.contains(&1) && v.contains(&2),
            "a tear is neither all nor none: {v:?}"
        );
    }
}

#[test]
fn crash_orders_overlapping_writes_both_ways() {
    let mut saw = [false; 2];
    for seed in 0..64u64 {
        let (_d, s) = dev(seed);
        s.set_crash_fates(CrashFates {
            keep: 1.0,
            drop: 0.0,
            torn: 0.0,
        });
        s.write_at(0, &fill(1, 1)).unwrap();
        s.write_at(0, &fill(2, 1)).unwrap();
        let img = s.crash();
        saw[(sector(&img, 0) - 1) as usize] = true;
    }
    assert_eq!(saw, [true, true], "either overlapping write may land last");
}

#[test]
fn crashed_device_refuses_io() {
    let (_d, s) = dev(3);
    s.write_at(0, &fill(1, 1)).unwrap();
    let _ = s.crash();
    assert!(s.write_at(0, &fill(1, 1)).is_err());
    assert!(s.read_at(0, &mut [0u8; 512]).is_err());
}

#[test]
fn transient_eio_fails_once_and_writes_nothing() {
    let (_d, s) = dev(4);
    s.arm(IoKind::Write, 1, Fault::Eio);
    s.write_at(0, &fill(1, 1)).unwrap();
    assert!(s.write_at(512, &fill(2, 1)).is_err());
    s.write_at(1024, &fill(3, 1)).unwrap();
    let c = s.current();
    assert_eq!((sector(&c, 0), sector(&c, 1), sector(&c, 2)), (1, 0, 3));
    assert_eq!(s.stats().faults_fired, 1);
    s.arm(IoKind::Read, 0, Fault::Eio);
    assert!(s.read_at(0, &mut [0u8; 512]).is_err());
    s.read_at(0, &mut [0u8; 512]).unwrap();
}

#[test]
fn latent_sector_fails_until_rewritten() {
    let (_d, s) = dev(5);
    s.write_at(0, &fill(9, 8)).unwrap();
    s.add_latent(3);
    assert!(
        s.read_at(0, &mut [0u8; 4096]).is_err(),
        "a read covering it fails"
    );
    assert!(s.read_at(1536, &mut [0u8; 512]).is_err(), "again");
    s.read_at(0, &mut [0u8; 1536]).unwrap();
    s.read_at(2048, &mut [0u8; 512]).unwrap();
    // A partial rewrite of the sector does not remap it; a whole one does.
    s.write_at(1536, &[1u8; 100]).unwrap();
    assert!(s.read_at(1536, &mut [0u8; 512]).is_err());
    s.write_at(1536, &fill(4, 1)).unwrap();
    let mut b = [0u8; 512];
    s.read_at(1536, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 4));
    // Latent on read: the chosen read fails, and so do later reads of the
    // sector it picked.
    s.arm(IoKind::Read, 0, Fault::Latent);
    assert!(s.read_at(4096, &mut [0u8; 512]).is_err());
    assert!(s.read_at(4096, &mut [0u8; 512]).is_err());
    assert!(s.current().latent.contains(&8));
    s.heal();
    s.read_at(4096, &mut [0u8; 512]).unwrap();
}

#[test]
fn latent_write_fault_leaves_sectors_unreadable() {
    let (_d, s) = dev(6);
    s.arm(IoKind::Write, 0, Fault::Latent);
    assert!(s.write_at(8192, &fill(1, 2)).is_err());
    assert!(s.read_at(8192, &mut [0u8; 512]).is_err());
    assert!(s.read_at(8704, &mut [0u8; 512]).is_err());
    s.read_at(9216, &mut [0u8; 512]).unwrap();
}

#[test]
fn misdirected_write_lands_elsewhere() {
    let (_d, s) = dev(7);
    s.arm(IoKind::Write, 0, Fault::Misdirect { delta: 8192 });
    s.write_at(4096, &fill(5, 8)).unwrap();
    let c = s.current();
    assert_eq!(sector(&c, 8), 0, "the aimed-at block is untouched");
    assert_eq!(sector(&c, 24), 5, "the data landed 8 KiB further");
    assert_eq!(s.epoch()[0].offset, 12288);
    // Clamped at the device end.
    s.arm(IoKind::Write, 0, Fault::Misdirect { delta: 1 << 40 });
    s.write_at(0, &fill(6, 1)).unwrap();
    assert_eq!(sector(&s.current(), 127), 6);
}

#[test]
fn bit_flip_changes_one_bit_durably() {
    let (_d, s) = dev(8);
    s.write_at(0, &fill(0, 8)).unwrap();
    s.flush().unwrap();
    s.flip_bit(100, 3);
    let mut b = [0u8; 512];
    s.read_at(0, &mut b).unwrap();
    assert_eq!(b[100], 8);
    assert_eq!(b.iter().filter(|&&x| x != 0).count(), 1);
    let mut d = [0u8; 512];
    s.durable().read(0, &mut d);
    assert_eq!(d[100], 8);
}

#[test]
fn power_cut_stops_every_device_of_the_domain() {
    let d = Domain::new();
    let a = SimDev::new(&d, 0, "a", 8192, 1);
    let b = SimDev::new(&d, 1, "b", 8192, 1);
    d.cut_power_after(2);
    a.write_at(0, &fill(1, 1)).unwrap();
    b.flush().unwrap();
    assert!(
        a.write_at(0, &fill(1, 1)).is_err(),
        "third I/O: power is gone"
    );
    assert!(d.is_dead());
    assert!(b.read_at(0, &mut [0u8; 512]).is_err());
}

#[test]
fn recording_orders_events_across_devices() {
    let d = Domain::new();
    let a = SimDev::new(&d, 0, "a", 8192, 1);
    let b = SimDev::new(&d, 1, "b", 8192, 1);
    a.write_at(0, &fill(1, 1)).unwrap();
    d.start_recording();
    b.write_at(512, &fill(2, 1)).unwrap();
    a.flush().unwrap();
    b.flush().unwrap();
    let ev = d.stop_recording();
    assert_eq!(ev.len(), 3);
    assert_eq!((ev[0].dev, ev[1].dev, ev[2].dev), (1, 0, 1));
    assert!(matches!(ev[0].kind, EventKind::Write(_)));
    assert!(ev[0].seq < ev[1].seq && ev[1].seq < ev[2].seq);
}

#[test]
fn image_hash_ignores_allocation() {
    let mut a = Image::zeroed(16384);
    let b = Image::zeroed(16384);
    a.write(4096, &[0u8; 512]);
    assert_eq!(a.content_hash(), b.content_hash());
    a.write(4096, &[1u8; 1]);
    assert_ne!(a.content_hash(), b.content_hash());
}

fn wrec(off: u64, b: u8, sectors: usize) -> WriteRec {
    WriteRec {
        offset: off,
        data: Arc::from(fill(b, sectors)),
    }
}

#[test]
fn enumerator_counts() {
    let lim = Limits::default();
    let base = Image::zeroed(65536);
    // Two disjoint one-sector writes: 4 subsets, no tears of one sector.
    let (st, raw) = enumerate_device(&base, &[wrec(0, 1, 1), wrec(512, 2, 1)], &lim);
    assert_eq!((st.len(), raw), (4, 4));
    // Two writes to one sector: nothing, a, b, a-then-b (=b), b-then-a (=a).
    let (st, raw) = enumerate_device(&base, &[wrec(0, 1, 1), wrec(0, 2, 1)], &lim);
    assert_eq!((st.len(), raw), (3, 5));
    // One 2-sector write: none, all, and the 2 tears.
    let (st, _) = enumerate_device(&base, &[wrec(0, 1, 2)], &lim);
    assert_eq!(st.len(), 4);
    // Every state of a 3-sector write over old data: 2^3 sector choices.
    let (st, _) = enumerate_device(&base, &[wrec(0, 1, 3)], &lim);
    assert_eq!(st.len(), 8);
    assert_eq!(tear_patterns(8, &lim).len(), 254);
    // 128 sectors: prefixes and suffixes of 1..=7, 8,16..120, 121..127, plus even/odd.
    let lens = 7 + 15 + 7;
    assert_eq!(tear_patterns(128, &lim).len(), 2 * lens + 2);
}

#[test]
fn enumerator_reorders_overlapping_only() {
    let lim = Limits::default();
    let base = Image::zeroed(65536);
    // a overlaps b, c is apart: orders of {a,b} matter, c commutes.
    let ep = [wrec(0, 1, 2), wrec(512, 2, 2), wrec(8192, 3, 1)];
    let (st, _) = enumerate_device(&base, &ep, &lim);
    for s in &st {
        let v: Vec<u8> = (0..3).map(|i| sector(&s.img, i)).collect();
        assert!(v[0] == 0 || v[0] == 1);
        assert!(v[2] == 0 || v[2] == 2);
    }
    // Sector 1 may end as a's or b's value when both applied.
    assert!(st
        .iter()
        .any(|s| sector(&s.img, 0) == 1 && sector(&s.img, 1) == 1 && sector(&s.img, 2) == 2));
    assert!(st
        .iter()
        .any(|s| sector(&s.img, 0) == 1 && sector(&s.img, 1) == 2));
}

#[test]
fn pattern_roundtrip_and_decode() {
    let run = pattern::gen_run(&[5, 5, 0, 9], 10);
    assert_eq!(pattern::decode(&run[0..512], 10), Decoded::Stamp(5));
    assert_eq!(pattern::decode(&run[512..1024], 11), Decoded::Stamp(5));
    assert_eq!(pattern::decode(&run[1024..1536], 12), Decoded::Stamp(0));
    assert_eq!(
        pattern::decode(&run[0..512], 99),
        Decoded::Misplaced { stamp: 5, lba: 10 }
    );
    let mut bad = run[1536..2048].to_vec();
    bad[300] ^= 1;
    assert_eq!(pattern::decode(&bad, 13), Decoded::Garbage);
}

#[test]
fn seeds_parse() {
    assert_eq!(parse_seed("42").unwrap(), 42);
    assert_eq!(parse_seed("0x10").unwrap(), 16);
    let c = "0f41bfd9e1c5a7b3c2d4e6f8a0b1c2d3e4f5a6b7";
    let a = parse_seed(c).unwrap();
    assert_eq!(
        a,
        parse_seed(c).unwrap(),
        "commit ids hash deterministically"
    );
    assert_ne!(
        a,
        parse_seed("1f41bfd9e1c5a7b3c2d4e6f8a0b1c2d3e4f5a6b7").unwrap()
    );
    assert!(parse_seed("nope").is_err());
}

#[test]
fn model_durability_rules() {
    let mut m = Model::new();
    let o = m.add_origin("o0", 8, 1);
    let k = VKey {
        origin: o,
        tag: None,
    };
    let s1 = m.new_stamp(1, k);
    m.write_ok(k, 0, &[s1, s1], false);
    let v = &m.versions[&k].secs[0];
    assert!(v.cur.contains(s1) && !v.cur.contains(1));
    assert!(
        v.crash.contains(s1) && v.crash.contains(1),
        "unflushed: old or new after a crash"
    );
    // Snapshot makes the source durable and copies it.
    m.snapshot(k, 7);
    let snap = VKey {
        origin: o,
        tag: Some(7),
    };
    assert_eq!(m.versions[&k].secs[0].crash.to_vec(), vec![s1]);
    assert_eq!(m.versions[&snap].secs[1].cur.to_vec(), vec![s1]);
    // A FUA write is durable at once.
    let s2 = m.new_stamp(2, snap);
    m.write_ok(snap, 0, &[s2], true);
    assert_eq!(m.versions[&snap].secs[0].crash.to_vec(), vec![s2]);
    assert_eq!(m.versions[&k].secs[0].cur.to_vec(), vec![s1], "isolation");
    // Rollback: origin shows the snapshot, durably.
    m.rollback(o, 7);
    assert_eq!(m.versions[&k].secs[0].crash.to_vec(), vec![s2]);
    // Read checks collapse candidates, and catch foreign data.
    let good = pattern::gen_run(&[s2], 0);
    m.check_read(k, 0, &good).unwrap();
    let foreign = pattern::gen_run(&[s2], 2);
    let e = m.check_read(k, 2, &foreign).unwrap_err();
    assert!(m.explain(&e).contains("to o0@7"), "{}", m.explain(&e));
    assert!(
        m.explain(&e).contains("initial content of o0"),
        "{}",
        m.explain(&e)
    );
}
