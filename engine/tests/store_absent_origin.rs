//! A lenient read-only open (`Store::open_read_only_lenient`, what `list`
//! and `check` use) goes on without an origin whose device is absent: the
//! origin and its snapshots are still listed, and every I/O on their
//! volumes is a typed `OriginAbsent` error, never a read of a placeholder
//! and never a panic. Nothing is written to the COW device.

use snapmv_engine::store::{self, Dev, FormatOptions, OriginDev, Store};
use snapmv_engine::{BlockDev, Error, MemDev};
use std::sync::Arc;

const CS: u64 = 16 << 10;

/// A store with origins "a" (snapshot 1 of it holds an own chunk, snapshot
/// 2 is of snapshot 1, and a rollback of 1 is pending) and "b" (snapshot 3).
fn build(cow: &Arc<MemDev>, a: &Arc<MemDev>, b: &Arc<MemDev>) {
    let fo = FormatOptions {
        chunk_size: CS as u32,
        force: false,
    };
    let s = Store::format(cow.clone() as Dev, &fo).unwrap();
    s.bind("a", "/dev/a", a.clone(), 1).unwrap();
    s.bind("b", "/dev/b", b.clone(), 1).unwrap();
    let va = s.volume("a", None).unwrap();
    va.write(0, &[0xaa; 4096], false).unwrap();
    assert_eq!(s.snapshot("a", None, "a1", 2).unwrap(), 1);
    // The origin moves on: snapshot 1's chunk 0 is now on the COW device.
    va.write(0, &[0xbb; 4096], false).unwrap();
    assert_eq!(s.snapshot("a", Some(1), "a2", 3).unwrap(), 2);
    s.volume("b", None)
        .unwrap()
        .write(CS, &[0xcc; 4096], false)
        .unwrap();
    assert_eq!(s.snapshot("b", None, "b1", 4).unwrap(), 3);
    s.rollback("a", 1).unwrap();
    s.close().unwrap();
}

fn contents(d: &MemDev) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(0, &mut v).unwrap();
    v
}

#[track_caller]
fn assert_absent<T: std::fmt::Debug>(r: snapmv_engine::Result<T>) {
    match r {
        Err(Error::OriginAbsent {
            origin,
            path,
            reason,
        }) => {
            assert_eq!((origin.as_str(), path.as_str()), ("a", "/dev/a"));
            assert_eq!(reason, "gone");
        }
        other => panic!("expected OriginAbsent, got {other:?}"),
    }
}

#[test]
fn an_absent_origin_is_listed_and_its_volumes_refuse_io() {
    let cow = Arc::new(MemDev::new(16 << 20));
    let a = Arc::new(MemDev::new(8 * CS));
    let b = Arc::new(MemDev::new(8 * CS));
    build(&cow, &a, &b);
    let before = contents(&cow);

    let mut asked = Vec::new();
    let mut resolve = |id: &str, path: &str| {
        asked.push((id.to_string(), path.to_string()));
        Ok(match id {
            "a" => OriginDev::Absent("gone".into()),
            _ => OriginDev::Present(b.clone() as Dev),
        })
    };
    let s = Store::open_read_only_lenient(cow.clone() as Dev, &mut resolve).unwrap();
    assert_eq!(asked.len(), 2, "{asked:?}");

    // Listed in full, the absent origin marked.
    let st = s.status();
    let oa = st.origins.iter().find(|o| o.id == "a").unwrap();
    let ob = st.origins.iter().find(|o| o.id == "b").unwrap();
    assert_eq!(oa.absent.as_deref(), Some("gone"));
    assert_eq!(ob.absent, None);
    let tags: Vec<u64> = oa.snapshots.iter().map(|s| s.tag).collect();
    assert_eq!(tags, [1, 2]);
    assert_eq!(ob.snapshots.len(), 1);
    assert_eq!(
        st.rollback.as_ref().map(|r| (r.origin.as_str(), r.tag)),
        Some(("a", 1))
    );
    assert_eq!(s.versions().len(), 5);

    // Every I/O on the absent origin's versions is the typed error, even a
    // snapshot chunk that lies on the COW device.
    let mut buf = vec![0u8; 4096];
    for tag in [None, Some(1), Some(2)] {
        let v = s.volume("a", tag).unwrap();
        assert_absent(v.read(0, &mut buf));
        assert_absent(v.read(CS, &mut buf));
        assert_absent(v.write(0, &buf, false));
        assert_absent(v.block_status(0, CS));
        assert_absent(v.trim(0, CS));
        assert_absent(v.write_zeroes(0, CS, false));
    }
    let msg = s
        .volume("a", None)
        .unwrap()
        .read(0, &mut buf)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("origin a") && msg.contains("/dev/a") && msg.contains("gone"),
        "{msg}"
    );

    // The present origin reads as usual, and stays read-only.
    let vb = s.volume("b", None).unwrap();
    vb.read(CS, &mut buf).unwrap();
    assert_eq!(buf, [0xcc; 4096]);
    s.volume("b", Some(3)).unwrap().read(CS, &mut buf).unwrap();
    assert_eq!(buf, [0xcc; 4096]);
    assert!(matches!(vb.write(0, &buf, false), Err(Error::ReadOnly)));
    assert!(matches!(s.snapshot("b", None, "", 5), Err(Error::ReadOnly)));
    assert_eq!(s.step_background(64).unwrap().work, 0);
    s.close().unwrap();
    assert!(
        before == contents(&cow),
        "a lenient open wrote to the COW device"
    );

    // With both devices back, nothing was lost: the rollback resumes.
    let mut both = |id: &str, _: &str| -> snapmv_engine::Result<Dev> {
        Ok(if id == "a" { a.clone() } else { b.clone() })
    };
    let s = Store::open(cow.clone() as Dev, &mut both).unwrap();
    while s.step_background(64).unwrap().more {}
    s.volume("a", None).unwrap().read(0, &mut buf).unwrap();
    assert_eq!(buf, [0xaa; 4096], "snapshot 1 rolled back onto a");
    s.close().unwrap();
    assert!(store::check(cow as Dev).unwrap().errors.is_empty());
}

#[test]
fn the_strict_opens_still_need_every_origin() {
    let cow = Arc::new(MemDev::new(16 << 20));
    let a = Arc::new(MemDev::new(8 * CS));
    let b = Arc::new(MemDev::new(8 * CS));
    build(&cow, &a, &b);
    let mut only_b = |id: &str, path: &str| -> snapmv_engine::Result<Dev> {
        match id {
            "b" => Ok(b.clone()),
            _ => Err(Error::Invalid(format!("{id} at {path}: gone"))),
        }
    };
    assert!(matches!(
        Store::open(cow.clone() as Dev, &mut only_b),
        Err(Error::Invalid(m)) if m.contains("/dev/a")
    ));
    assert!(Store::open_read_only(cow.clone() as Dev, &mut only_b).is_err());
    // A resolver error (not an absence) fails the lenient open too.
    let mut failing = |_: &str, _: &str| -> snapmv_engine::Result<OriginDev> {
        Err(Error::Invalid("resolver failed".into()))
    };
    assert!(Store::open_read_only_lenient(cow as Dev, &mut failing).is_err());
}
