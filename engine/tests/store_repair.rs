//! `store::repair`: leaked and missing space map bits, wrong counters and
//! wrong own-chunk counters are repaired to a clean check with every
//! version's content unchanged; structural damage is refused with nothing
//! written.

use snapmv_engine::meta::{Meta, Tree};
use snapmv_engine::store::records::OWN_AT;
use snapmv_engine::store::{self, Dev, FormatOptions, Store};
use snapmv_engine::{BlockDev, MemDev};
use std::sync::Arc;

const CS: u64 = 4096;
const CHUNKS: u64 = 16;

/// Every version's full content, by tag (None = the origin).
type Views = Vec<(Option<u64>, Vec<u8>)>;

struct Rig {
    cow: Arc<MemDev>,
    origin: Arc<MemDev>,
}

impl Rig {
    /// A store with three snapshots, origin and snapshot writes, one
    /// snapshot deleted and cleaned; closed cleanly.
    fn new() -> Rig {
        let rig = Rig {
            cow: Arc::new(MemDev::new(8 << 20)),
            origin: Arc::new(MemDev::new(CHUNKS * CS)),
        };
        let fo = FormatOptions {
            chunk_size: CS as u32,
            force: false,
        };
        let s = Store::format(rig.cow.clone() as Dev, &fo).unwrap();
        s.bind("o", "/dev/o", rig.origin.clone() as Dev, 0).unwrap();
        let v = s.volume("o", None).unwrap();
        for i in 0..3u8 {
            v.write(u64::from(i) * 3 * CS, &[i + 1; 3 * CS as usize], false)
                .unwrap();
            let t = s.snapshot("o", None, "s", 0).unwrap();
            s.volume("o", Some(t))
                .unwrap()
                .write(CS / 2, &[0xF0 | i; 100], false)
                .unwrap();
        }
        s.delete("o", 2).unwrap();
        while s.step_background(64).unwrap().more {}
        s.close().unwrap();
        rig
    }

    fn store(&self) -> Store {
        let o = self.origin.clone();
        let mut resolve = move |_: &str, _: &str| -> snapmv_engine::Result<Dev> { Ok(o.clone()) };
        Store::open(self.cow.clone() as Dev, &mut resolve).unwrap()
    }

    fn views(&self) -> Views {
        let s = self.store();
        let mut out = Vec::new();
        for vid in s.versions() {
            let mut b = vec![0u8; (CHUNKS * CS) as usize];
            s.volume("o", vid.tag).unwrap().read(0, &mut b).unwrap();
            out.push((vid.tag, b));
        }
        s.close().unwrap();
        out
    }

    fn meta(&self) -> Meta<Dev> {
        Meta::open(self.cow.clone() as Dev).unwrap()
    }

    fn errors(&self) -> Vec<String> {
        store::check(self.cow.clone() as Dev).unwrap().errors
    }

    /// Repair must fix everything `check` found, keep every version's
    /// content, and leave a clean check.
    fn repair_clean(&self, expect_in_report: &str) {
        let before = self.views();
        let found = self.errors();
        assert!(
            found.iter().any(|e| e.contains(expect_in_report)),
            "check should report {expect_in_report:?}: {found:?}"
        );
        let r = store::repair(self.cow.clone() as Dev).unwrap();
        assert!(r.refused.is_empty(), "refused: {:?}", r.refused);
        assert!(!r.fixed.is_empty(), "nothing fixed for {found:?}");
        assert!(
            r.after.errors.is_empty(),
            "after repair: {:?}",
            r.after.errors
        );
        assert!(self.errors().is_empty());
        assert_eq!(self.views(), before, "repair changed a version's content");
    }
}

#[test]
fn a_leaked_chunk_is_reclaimed() {
    let rig = Rig::new();
    let mut m = rig.meta();
    m.alloc_chunk().unwrap();
    m.alloc_chunk().unwrap();
    m.checkpoint().unwrap();
    drop(m);
    rig.repair_clean("leaked");
    // The reclaimed space is usable again: the counters say so.
    let r = store::repair(rig.cow.clone() as Dev).unwrap();
    assert!(
        r.fixed.is_empty(),
        "a second repair found work: {:?}",
        r.fixed
    );
}

#[test]
fn a_referenced_chunk_marked_free_is_marked_used() {
    let rig = Rig::new();
    let mut m = rig.meta();
    let (_, v) = m
        .range(Tree::Exceptions, 0, u128::MAX, 1)
        .unwrap()
        .pop()
        .unwrap();
    let chunk = u64::from_le_bytes(v[..8].try_into().unwrap());
    m.free_chunk(chunk).unwrap();
    m.checkpoint().unwrap();
    drop(m);
    rig.repair_clean("marked free");
}

#[test]
fn wrong_own_chunk_counters_are_rewritten() {
    let rig = Rig::new();
    let mut m = rig.meta();
    let (k, mut rec) = m
        .range(Tree::Nodes, 0, u128::MAX, 1)
        .unwrap()
        .pop()
        .unwrap();
    rec[OWN_AT..OWN_AT + 8].copy_from_slice(&999u64.to_le_bytes());
    m.insert(Tree::Nodes, k, &rec).unwrap();
    m.checkpoint().unwrap();
    drop(m);
    rig.repair_clean("own chunks");
}

/// The index by node missing a key of one node and holding a stray one
/// of another: check names both nodes, repair rebuilds them from the
/// exception index (every version's content unchanged, a clean check).
#[test]
fn a_wrong_index_by_node_is_rebuilt() {
    let rig = Rig::new();
    let mut m = rig.meta();
    assert!(
        m.has_tree(Tree::ByNode),
        "a new device has the index by node"
    );
    let keys = m.range(Tree::ByNode, 0, u128::MAX, usize::MAX).unwrap();
    assert!(keys.len() > 3, "{keys:?}");
    let (first, _) = keys[0];
    m.remove(Tree::ByNode, first).unwrap();
    let (last, _) = *keys.last().unwrap();
    m.insert(Tree::ByNode, last + 1000, &[]).unwrap();
    m.checkpoint().unwrap();
    drop(m);
    let found = rig.errors();
    assert_eq!(
        found.iter().filter(|e| e.contains("index by node")).count(),
        2,
        "{found:?}"
    );
    rig.repair_clean("the index by node");
}

#[test]
fn structural_damage_is_refused_and_nothing_is_written() {
    let rig = Rig::new();
    // Flip a byte inside the exceptions tree's root page (its checksum
    // then fails): that is not space accounting, and repair must not
    // guess.
    let root = {
        let mut m = rig.meta();
        m.alloc_chunk().unwrap(); // a leak too: still nothing may be written
        m.checkpoint().unwrap();
        m.tree_root(Tree::Exceptions).0
    };
    let at = root * 4096 + 100;
    let mut b = [0u8; 1];
    rig.cow.read_at(at, &mut b).unwrap();
    rig.cow.write_at(at, &[b[0] ^ 0x10]).unwrap();
    let mut image = vec![0u8; 8 << 20];
    rig.cow.read_at(0, &mut image).unwrap();
    let r = store::repair(rig.cow.clone() as Dev).unwrap();
    assert!(!r.refused.is_empty(), "repair accepted a damaged tree page");
    assert!(r.fixed.is_empty());
    let mut after = vec![0u8; 8 << 20];
    rig.cow.read_at(0, &mut after).unwrap();
    assert!(image == after, "a refused repair wrote to the device");
}

/// Every entry of the exceptions, nodes and origins trees.
fn trees(dev: Dev) -> Vec<(u128, Vec<u8>)> {
    let mut m = Meta::open_read_only(dev).unwrap();
    let mut out = Vec::new();
    let present: Vec<Tree> = Tree::ALL.into_iter().filter(|t| m.has_tree(*t)).collect();
    for t in present {
        out.extend(m.range(t, 0, u128::MAX, usize::MAX).unwrap());
    }
    out
}

/// The COW device a power cut of a live server left with a leaked chunk
/// (tests/fixtures/powercut-leak.cow.zst, from ../shared/fixtures: 384 MiB
/// sparse, journal not replayed). Repair reclaims the chunk and fixes the
/// counter; every mapping and record is exactly as before.
#[test]
fn the_powercut_fixture_repairs_to_clean() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/powercut-leak.cow.zst"
    );
    let out = match std::process::Command::new("zstd")
        .args(["-dc", path])
        .output()
    {
        Ok(o) if o.status.success() => o.stdout,
        r if std::env::var_os("SNAPMV_CI").is_none() => {
            println!("skipped: zstd not available ({r:?})");
            return;
        }
        r => panic!("zstd is needed (scripts/setup.sh installs it): {r:?}"),
    };
    let cow = Arc::new(MemDev::new(out.len() as u64));
    cow.write_at(0, &out).unwrap();
    let errors = store::check(cow.clone() as Dev).unwrap().errors;
    assert!(
        errors.iter().any(|e| e.contains("(leaked): 43568..43583")),
        "{errors:?}"
    );
    let before = trees(cow.clone() as Dev);
    let r = store::repair(cow.clone() as Dev).unwrap();
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    assert!(
        r.after.errors.is_empty(),
        "{:?} after {:?}",
        r.after.errors,
        r.fixed
    );
    assert!(
        r.fixed
            .iter()
            .any(|f| f.contains("data chunks: 2343 -> 2342")),
        "{:?}",
        r.fixed
    );
    assert_eq!(
        trees(cow as Dev),
        before,
        "repair changed a mapping or record"
    );
}
