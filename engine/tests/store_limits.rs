//! Limits beyond dm-snap-mv: no version table (10,000 snapshots of one
//! origin), many origins on one COW device (256), and ENOSPC that refuses
//! the write and leaves everything intact.

use snapmv_engine::store::{self, Dev, FormatOptions, Store};
use snapmv_engine::{BlockDev, Error, MemDev};
use std::sync::Arc;
use std::time::Instant;

fn fmt(cow: Arc<MemDev>, cs: u32) -> Store {
    Store::format(
        cow,
        &FormatOptions {
            chunk_size: cs,
            force: false,
        },
    )
    .unwrap()
}

fn read(s: &Store, id: &str, tag: Option<u64>, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    s.volume(id, tag).unwrap().read(off, &mut b).unwrap();
    b
}

#[test]
fn ten_thousand_snapshots_of_one_origin() {
    const N: u64 = 10_000;
    const CS: u64 = 4096;
    let cow = Arc::new(MemDev::new(512 << 20));
    let origin = Arc::new(MemDev::new(64 * CS));
    let s = fmt(cow.clone(), CS as u32);
    s.bind("o", "/dev/o", origin.clone(), 0).unwrap();
    let vol = s.volume("o", None).unwrap();
    let t = Instant::now();
    let mut worst = std::time::Duration::ZERO;
    for i in 0..N {
        // Chunk i%64 gets a new value before every snapshot, so snapshot k
        // sees value k at chunk k%64: each snapshot has a distinct view.
        vol.write((i % 64) * CS, &i.to_le_bytes(), false).unwrap();
        let t0 = Instant::now();
        let tag = s.snapshot("o", None, "", i as i64).unwrap();
        worst = worst.max(t0.elapsed());
        assert_eq!(tag, i + 1);
    }
    println!(
        "{N} snapshots in {:?}; slowest snapshot call {:?}",
        t.elapsed(),
        worst
    );
    let check = |s: &Store| {
        for tag in (1..=N).step_by(97).chain([1, N]) {
            let i = tag - 1;
            let got = read(s, "o", Some(tag), (i % 64) * CS, 8);
            assert_eq!(
                u64::from_le_bytes(got.try_into().unwrap()),
                i,
                "snapshot {tag}"
            );
        }
    };
    check(&s);
    // One more origin write touches every chunk once: one copy each, not one per snapshot.
    let before = s.status_without_usage().chunks_used;
    for c in 0..64 {
        vol.write(c * CS, &[0xEE; 8], false).unwrap();
    }
    let copies = s.status_without_usage().chunks_used - before;
    assert!(copies <= 64 + 4, "64 first writes made {copies} copies");
    check(&s);
    assert_eq!(
        s.status_without_usage().origins[0].snapshots.len() as u64,
        N
    );
    s.close().unwrap();
    let s = Store::open(cow.clone(), &mut |_, _| Ok(origin.clone() as Dev)).unwrap();
    check(&s);
    let r = store::check(cow.clone()).unwrap();
    assert!(
        r.errors.is_empty(),
        "{:?}",
        &r.errors[..r.errors.len().min(5)]
    );
}

/// Deletes among thousands of snapshots: `cleaning()` (O(origins)) says
/// what the status says at every step; a store closed mid-cleaning rebuilds
/// the cleaner's flagged nodes from the records at open and finishes; the
/// snapshots left keep their data and the checker is clean.
#[test]
fn deletes_among_thousands_of_snapshots_finish_across_a_reopen() {
    const N: u64 = 3_000;
    const CS: u64 = 4096;
    let cow = Arc::new(MemDev::new(256 << 20));
    let origin = Arc::new(MemDev::new(64 * CS));
    let s = fmt(cow.clone(), CS as u32);
    s.bind("o", "/dev/o", origin.clone(), 0).unwrap();
    assert_eq!(s.origin_ids(), ["o"]);
    let vol = s.volume("o", None).unwrap();
    for i in 0..N {
        vol.write((i % 64) * CS, &i.to_le_bytes(), false).unwrap();
        s.snapshot("o", None, "", 0).unwrap();
    }
    let agree = |s: &Store| {
        let cleaning = s.cleaning();
        assert_eq!(cleaning, s.status_without_usage().cleaning);
        cleaning
    };
    assert!(!agree(&s));
    // Every other snapshot, and a run of neighbours (a dead stretch of spine).
    let deleted = |tag: u64| tag.is_multiple_of(2) || (1000..1500).contains(&tag);
    for tag in (1..=N).filter(|t| deleted(*t)) {
        s.delete("o", tag).unwrap();
    }
    assert!(agree(&s));
    for _ in 0..4 {
        s.step_background(16).unwrap();
        assert!(agree(&s));
    }
    s.close().unwrap();
    let s = Store::open(cow.clone(), &mut |_, _| Ok(origin.clone() as Dev)).unwrap();
    assert!(agree(&s));
    while s.step_background(64).unwrap().more {
        agree(&s);
    }
    assert!(!agree(&s));
    for tag in (1..=N).filter(|t| !deleted(*t)) {
        let i = tag - 1;
        let got = read(&s, "o", Some(tag), (i % 64) * CS, 8);
        assert_eq!(
            u64::from_le_bytes(got.try_into().unwrap()),
            i,
            "snapshot {tag}"
        );
    }
    s.close().unwrap();
    let r = store::check(cow).unwrap();
    assert!(
        r.errors.is_empty(),
        "{:?}",
        &r.errors[..r.errors.len().min(5)]
    );
}

#[test]
fn two_hundred_fifty_six_origins_share_one_cow() {
    const CS: u64 = 4096;
    let cow = Arc::new(MemDev::new(64 << 20));
    let s = fmt(cow.clone(), CS as u32);
    let mut devs = Vec::new();
    for i in 0..256u32 {
        let d = Arc::new(MemDev::new(8 * CS));
        d.write_at(0, &[i as u8; 4096]).unwrap();
        s.bind(&format!("o{i}"), &format!("/dev/o{i}"), d.clone(), 0)
            .unwrap();
        devs.push(d);
    }
    for i in 0..256u32 {
        let id = format!("o{i}");
        let tag = s.snapshot(&id, None, &id, 0).unwrap();
        s.volume(&id, None)
            .unwrap()
            .write(0, &[!(i as u8); 4096], false)
            .unwrap();
        s.volume(&id, Some(tag))
            .unwrap()
            .write(CS, &[i as u8 ^ 0x5a; 100], false)
            .unwrap();
    }
    s.close().unwrap();
    let s = Store::open(cow.clone(), &mut |id, _| {
        let i: usize = id[1..]
            .parse()
            .map_err(|_| Error::NoSuchOrigin(id.into()))?;
        Ok(devs[i].clone() as Dev)
    })
    .unwrap();
    assert_eq!(s.status_without_usage().origins.len(), 256);
    for o in s.status_without_usage().origins.iter() {
        let tag = o.snapshots[0].tag;
        let i = o.id[1..].parse::<u32>().unwrap();
        assert_eq!(read(&s, &o.id, None, 0, 4096), vec![!(i as u8); 4096]);
        assert_eq!(
            read(&s, &o.id, Some(tag), 0, 4096),
            vec![i as u8; 4096],
            "snapshot keeps the old data"
        );
        assert_eq!(
            read(&s, &o.id, Some(tag), CS, 100),
            vec![i as u8 ^ 0x5a; 100]
        );
        assert_eq!(
            read(&s, &o.id, None, CS, 100),
            vec![0; 100],
            "snapshot write stays in the snapshot"
        );
    }
    let r = store::check(cow).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

#[test]
fn full_cow_device_refuses_writes_with_enospc_and_loses_nothing() {
    const CS: u64 = 4096;
    let cow = Arc::new(MemDev::new(2 << 20));
    let origin = Arc::new(MemDev::new(4 << 20));
    let pattern: Vec<u8> = (0..4 << 20).map(|i: u64| (i / 4096) as u8).collect();
    origin.write_at(0, &pattern).unwrap();
    let s = fmt(cow.clone(), CS as u32);
    s.bind("o", "/dev/o", origin.clone(), 0).unwrap();
    let snap = s.snapshot("o", None, "keep", 0).unwrap();
    let vol = s.volume("o", None).unwrap();
    let mut written = 0u64;
    let err = loop {
        match vol.write(written * CS, &[0xAB; 4096], false) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 1024, "a 2 MiB COW device never filled");
    };
    assert!(matches!(err, Error::NoSpace), "got {err}");
    assert_eq!(err.errno(), libc_enospc());
    println!(
        "COW full after {written} first writes: {:?}",
        s.status_without_usage().chunks_used
    );
    // The refused write changed nothing, on the origin or anywhere else.
    assert_eq!(
        read(&s, "o", None, written * CS, 4096),
        pattern[(written * CS) as usize..][..4096]
    );
    assert_eq!(
        read(&s, "o", Some(snap), 0, 4 << 20),
        pattern,
        "the snapshot is intact"
    );
    // Writes that need no new space still work: already-copied chunks.
    vol.write(0, &[1; 4096], true).unwrap();
    let st = s.status();
    // Status shows it full, but for the reserve kept back so metadata commits
    // never fail (64 blocks on a device this small).
    assert!(
        st.chunks_used + 64 + 2 >= st.chunks_total,
        "status shows it full: {st:?}"
    );
    // A multi-chunk write that needs space is refused whole.
    let before = read(&s, "o", None, 0, 8 * 4096);
    assert!(matches!(
        vol.write(4096 * (written - 1), &[7; 3 * 4096], false),
        Err(Error::NoSpace)
    ));
    assert_eq!(read(&s, "o", None, 0, 8 * 4096), before);
    // Deleting the snapshot and cleaning gives the space back.
    s.delete("o", snap).unwrap();
    while s.step_background(64).unwrap().more {}
    s.flush().unwrap();
    vol.write(written * CS, &[0xCD; 4096], false).unwrap();
    s.close().unwrap();
    let r = store::check(cow).unwrap();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

fn libc_enospc() -> i32 {
    28
}
