//! The streaming checker's structured damage: over an exceptions tree of
//! height 3, damage to one leaf is reported with the tree, the path of
//! blocks from the root (found here by walking the tree independently),
//! the leaf's key range and the kind; a leak and a counter are space
//! accounting; pages newer in the journal than at home are read from the
//! journal; the tree is read in runs, not page by page; and the store's
//! semantic pass names the exception's key.

use snapmv_engine::dev::BlockDev;
use snapmv_engine::format::{self, node};
use snapmv_engine::meta::{
    self, check, Damage, DamageKind, FormatOptions, KeyRange, Meta, Place, Tree, ZERO_CHUNK,
};
use snapmv_engine::store::{self, records, Dev, Store};
use snapmv_engine::{MemDev, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

type D = Arc<MemDev>;

/// Enough keys for an exceptions tree of height 3 (~170 keys a node).
const KEYS: u128 = 60_000;

fn key(i: u128) -> u128 {
    i * 16 + 3
}

/// Insert `keys` exceptions (zero chunks, so no data space), committing
/// before a transaction outgrows the journal.
fn insert_zeros(m: &mut Meta<D>, keys: impl Iterator<Item = u128>) {
    for k in keys {
        m.insert(Tree::Exceptions, k, &ZERO_CHUNK.to_le_bytes())
            .unwrap();
        if m.dirty_pages() >= m.max_dirty_pages() / 2 {
            m.commit().unwrap();
        }
    }
}

/// A store whose exceptions tree has height 3, checkpointed home.
fn tall_store() -> D {
    let d: D = Arc::new(MemDev::new(32 << 20));
    let opts = FormatOptions {
        chunk_size: 4096,
        force: false,
    };
    let mut m = Meta::format(d.clone(), &opts).unwrap();
    insert_zeros(&mut m, (0..KEYS).map(key));
    m.checkpoint().unwrap();
    assert_eq!(m.tree_root(Tree::Exceptions).1, 3);
    drop(m);
    let rep = check(d.clone()).unwrap();
    assert!(rep.is_clean(), "{:#?}", rep.errors);
    assert_eq!(rep.exceptions, KEYS as u64);
    d
}

fn read_block(d: &D, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    d.read_at(block * 4096, &mut b).unwrap();
    b
}

/// A node's keys and, if interior, its children.
fn node_entries(d: &D, block: u64) -> (Vec<u128>, Vec<u64>) {
    let page = read_block(d, block);
    let info = format::decode_node(&page, block).unwrap();
    let keys = (0..info.count)
        .map(|i| node::key_at(&page, i, info.entry_size()))
        .collect();
    let children = match info.level {
        0 => Vec::new(),
        _ => (0..info.count).map(|i| node::child_at(&page, i)).collect(),
    };
    (keys, children)
}

/// The path root -> child 1 -> its child 1 (a leaf), walked here from the
/// pages themselves, with the key range the parents give the leaf.
fn second_leaf(d: &D) -> (Vec<u64>, KeyRange) {
    let m = Meta::open_read_only(d.clone()).unwrap();
    let (root, height) = m.tree_root(Tree::Exceptions);
    assert_eq!(height, 3);
    let (root_keys, root_children) = node_entries(d, root);
    let mid = root_children[1];
    let mid_hi = root_keys.get(2).copied();
    let (mid_keys, mid_children) = node_entries(d, mid);
    assert!(mid_keys[1] >= root_keys[1]);
    let range = KeyRange {
        from: mid_keys[1],
        to: mid_keys.get(2).copied().or(mid_hi),
    };
    (vec![root, mid, mid_children[1]], range)
}

/// Write `page` back with a valid checksum: damage only a walk can see.
fn write_signed(d: &D, block: u64, mut page: [u8; 4096]) {
    let kind =
        format::BlockKind::from_u32(u32::from_le_bytes(page[0..4].try_into().unwrap())).unwrap();
    let crc = format::block_crc(kind, &page);
    page[4..8].copy_from_slice(&crc.to_le_bytes());
    d.write_at(block * 4096, &page).unwrap();
}

fn only_damage(d: &D) -> Damage {
    let rep = check(d.clone()).unwrap();
    assert_eq!(rep.damage.len(), 1, "{:#?}", rep.errors);
    assert_eq!(rep.errors, vec![rep.damage[0].to_string()]);
    rep.damage[0].clone()
}

#[test]
fn a_corrupt_leaf_is_named_by_tree_path_keys_and_kind() {
    let d = tall_store();
    let (path, range) = second_leaf(&d);
    let leaf = path[2];
    let at = leaf * 4096 + 1000;
    let mut b = [0u8; 1];
    d.read_at(at, &mut b).unwrap();
    d.write_at(at, &[b[0] ^ 0x20]).unwrap();
    let found = only_damage(&d);
    assert_eq!(found.place, Place::Tree(Tree::Exceptions));
    assert_eq!(found.path, path);
    assert_eq!(found.keys, Some(range));
    assert_eq!(found.kind, DamageKind::Corrupt);
    let line = found.to_string();
    let want = format!(
        "exceptions: block {leaf} (path {} -> {} -> {leaf}, keys {range}): ",
        path[0], path[1]
    );
    assert!(line.starts_with(&want), "{line}");
}

#[test]
fn a_key_outside_its_parents_range_is_named_with_the_path() {
    let d = tall_store();
    let (path, range) = second_leaf(&d);
    let leaf = path[2];
    let mut page: [u8; 4096] = read_block(&d, leaf).try_into().unwrap();
    let esz = 16 + 8;
    assert_eq!(node::key_at(&page, 0, esz), range.from);
    // Still below the leaf's second key, so the page itself is in order.
    let stray = range.from - 1;
    node::set_key(&mut page, 0, esz, stray);
    write_signed(&d, leaf, page);
    let found = only_damage(&d);
    assert_eq!(found.place, Place::Tree(Tree::Exceptions));
    assert_eq!(found.path, path);
    assert_eq!(found.keys, Some(range));
    assert_eq!(found.kind, DamageKind::KeyOutOfRange);
    assert!(found.detail.contains(&format!("key {stray:#x}")), "{found}");
}

#[test]
fn a_leaked_chunk_is_space_accounting() {
    let d = tall_store();
    let mut m = Meta::open(d.clone()).unwrap();
    let chunk = m.alloc_chunk().unwrap();
    m.checkpoint().unwrap();
    drop(m);
    let rep = check(d.clone()).unwrap();
    let leak = rep
        .damage
        .iter()
        .find(|x| x.kind == DamageKind::Leaked)
        .unwrap_or_else(|| panic!("{:#?}", rep.errors));
    assert_eq!(leak.place, Place::SpaceMap);
    assert!(leak.path.is_empty() && leak.keys.is_none());
    // 4 KiB chunks: the chunk is one block of the same number.
    assert!(leak.detail.ends_with(&format!(": {chunk}")), "{leak}");
    assert!(rep.damage.iter().any(|x| x.kind
        == DamageKind::CounterMismatch {
            what: "data chunks",
            recorded: 1,
            found: 0,
        }));
    assert!(rep.damage.iter().all(|x| x.kind.is_space_accounting()));
    let r = meta::repair(d.clone()).unwrap();
    assert!(r.refused.is_empty(), "{:?}", r.refused);
    assert!(check(d).unwrap().is_clean());
}

/// Pages committed but not checkpointed exist only in the journal: their
/// home blocks are stale or never written, and the walk must read the
/// replayed images, as `peek_page` does.
#[test]
fn pages_newer_in_the_journal_are_read_from_it() {
    let d = tall_store();
    let mut m = Meta::open(d.clone()).unwrap();
    insert_zeros(&mut m, (KEYS..KEYS + 3000).map(key));
    m.commit().unwrap();
    assert!(m.journal_used() > 0);
    drop(m);
    let rep = check(d.clone()).unwrap();
    assert!(rep.is_clean(), "{:#?}", rep.errors);
    assert_eq!(rep.exceptions, KEYS as u64 + 3000);
}

/// Counts reads, and fails those that cover one block.
#[derive(Clone)]
struct Probe {
    inner: D,
    bad: Option<u64>,
    reads: Arc<AtomicU64>,
}

impl BlockDev for Probe {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let blocks = offset / 4096..(offset + buf.len() as u64).div_ceil(4096);
        match self.bad {
            Some(b) if blocks.contains(&b) => Err(snapmv_engine::Error::io(
                "probe",
                offset,
                std::io::Error::other("injected"),
            )),
            _ => self.inner.read_at(offset, buf),
        }
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
}

#[test]
fn the_tree_is_read_in_runs_and_an_unreadable_leaf_is_named() {
    let d = tall_store();
    let probe = Probe {
        inner: d.clone(),
        bad: None,
        reads: Arc::new(AtomicU64::new(0)),
    };
    let rep = check(probe.clone()).unwrap();
    assert!(rep.is_clean());
    let reads = probe.reads.load(Ordering::Relaxed);
    assert!(
        reads * 8 < rep.pages_checked,
        "{reads} reads for {} pages",
        rep.pages_checked
    );
    // One block failing: its run is read again page by page, so only
    // that leaf is lost.
    let (path, range) = second_leaf(&d);
    let probe = Probe {
        bad: Some(path[2]),
        ..probe
    };
    let rep = check(probe).unwrap();
    assert_eq!(rep.damage.len(), 1, "{:#?}", rep.errors);
    let found = &rep.damage[0];
    assert_eq!(found.kind, DamageKind::Unreadable);
    assert_eq!((&found.path, found.keys), (&path, Some(range)));
}

/// The store's semantic pass: an exception of an origin that is not bound
/// is named by its key.
#[test]
fn an_exception_of_an_unbound_origin_is_named_by_its_key() {
    let cow = Arc::new(MemDev::new(8 << 20));
    let fo = store::FormatOptions {
        chunk_size: 4096,
        force: false,
    };
    Store::format(cow.clone() as Dev, &fo)
        .unwrap()
        .close()
        .unwrap();
    let k = records::exc_key(77, 5, 1);
    let mut m = Meta::open(cow.clone() as Dev).unwrap();
    m.insert(Tree::Exceptions, k, &ZERO_CHUNK.to_le_bytes())
        .unwrap();
    // Its key in the index by node too, as the store would have put it:
    // the one damage is then the unbound origin.
    m.insert(Tree::ByNode, records::by_node_key(77, 1, 5), &[])
        .unwrap();
    m.checkpoint().unwrap();
    drop(m);
    let rep = store::check(cow as Dev).unwrap();
    assert_eq!(rep.damage.len(), 1, "{:#?}", rep.errors);
    let found = &rep.damage[0];
    assert_eq!(found.place, Place::Tree(Tree::Exceptions));
    assert_eq!(found.kind, DamageKind::UnboundOrigin);
    assert_eq!(found.keys, Some(KeyRange::key(k)));
    assert!(
        found
            .to_string()
            .starts_with(&format!("exceptions: key {k:#x}: ")),
        "{found}"
    );
}
