//! `check`: the metadata checker (`meta::check`: pages, checksums, order,
//! space map rebuilt and compared) plus the store's own invariants: every
//! node record decodes, each origin's tree rebuilds, every exception names
//! a bound origin and an existing node of it, each node's own-chunk
//! counter equals the exceptions keyed by it, and the index by node holds
//! exactly the exceptions' keys transposed.

use super::api::Dev;
use super::inner::{scan, val_u64};
use super::records::{by_node_key, split_by_node_key};
use super::records::{decode_app, decode_node, decode_origin, node_id_from_key, split_key, OWN_AT};
use crate::error::Result;
use crate::meta::{self, CheckReport, Damage, DamageKind, KeyRange, Meta, Place, Tree, ZERO_CHUNK};
use crate::vtree::{Node, NodeId, VTree, RB_MARK};
use std::collections::{BTreeMap, HashMap};

pub fn check(cow: Dev) -> Result<CheckReport> {
    let mut report = meta::check(cow.clone())?;
    // Structural damage makes the semantic walk meaningless (and it would
    // only repeat the same errors).
    if !report.errors.is_empty() {
        return Ok(report);
    }
    let mut m = match Meta::open_read_only(cow) {
        Ok(m) => m,
        Err(e) => {
            report.push(incomplete(format!(
                "cannot open for the semantic check: {e}"
            )));
            return Ok(report);
        }
    };
    let mut fixes = Fixes::default();
    if let Err(e) = semantic(&mut m, &mut report, &mut fixes) {
        report.push(incomplete(format!("semantic check stopped: {e}")));
    }
    for fix in &fixes.by_node {
        report.push(fix.damage());
    }
    for &(id, recorded, found) in &fixes.own {
        let kind = DamageKind::OwnChunksMismatch { recorded, found };
        let detail = format!("record says {recorded} own chunks, index holds {found}");
        report.push(node_damage(id, kind, detail));
    }
    Ok(report)
}

/// A pass that could not run or finish: what it did not reach is unchecked.
fn incomplete(detail: String) -> Damage {
    Damage::new(Place::Store, DamageKind::Incomplete, detail)
}

/// Damage to the record of node `id`.
fn node_damage(id: NodeId, kind: DamageKind, detail: String) -> Damage {
    Damage::new(Place::Tree(Tree::Nodes), kind, detail).with_keys(KeyRange::key(u128::from(id)))
}

/// What `repair` did: the metadata layer's space repair, plus the node
/// records' own-chunk counters, and the check that followed.
#[derive(Debug, Default, Clone)]
pub struct RepairReport {
    /// What the check before repair found.
    pub found: Vec<String>,
    /// Damage repair will not touch; when not empty, nothing was written.
    pub refused: Vec<String>,
    /// What was rewritten, one line each.
    pub fixed: Vec<String>,
    /// The check after repair.
    pub after: CheckReport,
}

/// Repair what can be repaired safely (offline): leaked and missing space
/// map bits, the state page's counters, and the node records' own-chunk
/// counters, all from what the trees reference. Anything else is refused
/// before a byte is written: repair never drops a mapping or changes any
/// version's content.
pub fn repair(cow: Dev) -> Result<RepairReport> {
    let before = meta::check(cow.clone())?;
    let mut report = RepairReport {
        found: before.errors.clone(),
        ..RepairReport::default()
    };
    let mut semantic_damage = CheckReport::default();
    let mut fixes = Fixes::default();
    {
        let mut m = Meta::open_read_only(cow.clone())?;
        if let Err(e) = semantic(&mut m, &mut semantic_damage, &mut fixes) {
            semantic_damage.push(incomplete(format!("cannot walk the store's records: {e}")));
        }
    }
    report.found.extend(semantic_damage.errors.iter().cloned());
    report.refused = semantic_damage.errors;
    if !report.refused.is_empty() {
        return Ok(report);
    }
    let space = meta::repair(cow.clone())?;
    if !space.refused.is_empty() {
        report.refused = space.refused;
        return Ok(report);
    }
    if space.bitmap_words > 0 {
        report.fixed.push(format!(
            "space map: {} bitmap word(s) rewritten to what the trees reference",
            space.bitmap_words
        ));
    }
    report
        .fixed
        .extend(space.counters.iter().map(|c| format!("state page: {c}")));
    fix_own_counters(cow.clone(), &fixes.own, &mut report.fixed)?;
    fix_by_node(cow.clone(), &fixes.by_node, &mut report.fixed)?;
    report.after = check(cow)?;
    Ok(report)
}

/// Rewrite the own-chunk counter of each node record in `fixes`.
fn fix_own_counters(cow: Dev, fixes: &[(NodeId, u64, u64)], out: &mut Vec<String>) -> Result<()> {
    if fixes.is_empty() {
        return Ok(());
    }
    let mut m = Meta::open(cow)?;
    for &(id, recorded, seen) in fixes {
        if let Some(mut rec) = m.get(Tree::Nodes, u128::from(id))? {
            rec[OWN_AT..OWN_AT + 8].copy_from_slice(&seen.to_le_bytes());
            m.insert(Tree::Nodes, u128::from(id), &rec)?;
            out.push(format!("node {id:#x}: own chunks {recorded} -> {seen}"));
        }
    }
    m.checkpoint()
}

/// Exceptions read per batch: the walk keeps one batch in memory, so its
/// memory does not grow with the index (10 M exceptions held at once took
/// ~0.75 GiB).
const SCAN_BATCH: usize = 4096;

/// Every exception names a bound origin, a chunk inside it and an existing
/// node of its tree. Streams the index in key order; returns the
/// exceptions seen per node.
fn check_exceptions(
    m: &mut Meta<Dev>,
    origins: &BTreeMap<u32, super::records::OriginRec>,
    trees: &BTreeMap<u32, VTree>,
    report: &mut CheckReport,
    by_node_fixes: &mut Vec<ByNodeFix>,
) -> Result<HashMap<NodeId, u64>> {
    let chunk_size = u64::from(m.geometry().chunk_size);
    let mut own_seen: HashMap<NodeId, u64> = HashMap::new();
    let mut prints = Prints::default();
    let mut lo = 0u128;
    loop {
        let batch = m.range(Tree::Exceptions, lo, u128::MAX, SCAN_BATCH)?;
        for (k, v) in &batch {
            let (o, c, n) = split_key(*k);
            prints.add(o, n, c);
            let why = match origins.get(&o) {
                None => Some((
                    DamageKind::UnboundOrigin,
                    format!("origin number {o} (chunk {c}, node {n:#x}) is not bound"),
                )),
                Some(rec) if c >= rec.size.div_ceil(chunk_size) => Some((
                    DamageKind::PastOriginEnd,
                    format!("chunk {c} is past the end of origin {}", rec.id),
                )),
                Some(_) if n == RB_MARK => None,
                Some(rec) => match trees.get(&o) {
                    Some(t) if t.nodes().contains_key(&n) => {
                        *own_seen.entry(n).or_insert(0) += 1;
                        None
                    }
                    _ => Some((
                        DamageKind::NoSuchNode,
                        format!(
                            "origin {} has no node {n:#x} (chunk {c}, mapped to {})",
                            rec.id,
                            describe_val(val_u64(v)?)
                        ),
                    )),
                },
            };
            if let Some((kind, detail)) = why {
                let d = Damage::new(Place::Tree(Tree::Exceptions), kind, detail);
                report.push(d.with_keys(KeyRange::key(*k)));
            }
        }
        match (batch.len() == SCAN_BATCH, batch.last()) {
            (true, Some((k, _))) => match k.checked_add(1) {
                Some(next) => lo = next,
                None => break,
            },
            _ => break,
        }
    }
    if m.has_tree(Tree::ByNode) {
        *by_node_fixes = check_by_node(m, &prints)?;
    }
    Ok(own_seen)
}

/// Each (origin, node)'s chunks in one index, summed up in bounded memory:
/// how many, and a sum of a mix of each (so another set of chunks of the
/// same size shows, short of a 2^-64 coincidence).
#[derive(Default, PartialEq, Eq)]
struct Prints(HashMap<(u32, NodeId), (u64, u64)>);

impl Prints {
    fn add(&mut self, origin: u32, node: NodeId, chunk: u64) {
        // splitmix64's finaliser: a chunk's mix shares no bits' pattern with
        // its neighbour's, so sums of different sets do not meet.
        let mut x = chunk.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let e = self.0.entry((origin, node)).or_insert((0, 0));
        e.0 += 1;
        e.1 = e.1.wrapping_add(x ^ (x >> 31));
    }
}

/// Derived records that disagree with the index: what `check` reports as
/// damage and `repair` rewrites.
#[derive(Default)]
struct Fixes {
    /// (node, recorded, seen) own-chunk counters.
    own: Vec<(NodeId, u64, u64)>,
    by_node: Vec<ByNodeFix>,
}

/// One (origin, node) whose chunks in the index by node are not its
/// exceptions' chunks.
struct ByNodeFix {
    origin: u32,
    node: NodeId,
    detail: String,
}

impl ByNodeFix {
    fn damage(&self) -> Damage {
        let keys = KeyRange {
            from: by_node_key(self.origin, self.node, 0),
            to: Some(by_node_key(self.origin, self.node, MAX_CHUNK)),
        };
        let d = Damage::new(
            Place::Tree(Tree::ByNode),
            DamageKind::IndexMismatch,
            &*self.detail,
        );
        d.with_keys(keys)
    }
}

/// The last chunk number a key can hold (48 bits).
const MAX_CHUNK: u64 = (1 << 48) - 1;

/// The index by node against the exception index's prints: every
/// (origin, node) whose chunks differ between the two.
fn check_by_node(m: &mut Meta<Dev>, want: &Prints) -> Result<Vec<ByNodeFix>> {
    let mut got = Prints::default();
    let mut lo = 0u128;
    loop {
        let batch = m.range(Tree::ByNode, lo, u128::MAX, SCAN_BATCH)?;
        for (k, _) in &batch {
            let (o, n, c) = split_by_node_key(*k);
            got.add(o, n, c);
        }
        match (
            batch.len() == SCAN_BATCH,
            batch.last().and_then(|(k, _)| k.checked_add(1)),
        ) {
            (true, Some(next)) => lo = next,
            _ => break,
        }
    }
    let mut nodes: Vec<_> = want.0.keys().chain(got.0.keys()).copied().collect();
    nodes.sort_unstable();
    nodes.dedup();
    let mut out = Vec::new();
    for (origin, node) in nodes {
        let (a, b) = (want.0.get(&(origin, node)), got.0.get(&(origin, node)));
        if a == b {
            continue;
        }
        let count = |p: Option<&(u64, u64)>| p.map_or(0, |p| p.0);
        let detail = format!(
            "origin number {origin} node {node:#x}: the exception index holds {} chunk(s), the index by node {}{}",
            count(a),
            count(b),
            if count(a) == count(b) { " (other chunks)" } else { "" }
        );
        out.push(ByNodeFix {
            origin,
            node,
            detail,
        });
    }
    Ok(out)
}

/// Rewrite the index by node for each node in `fixes` from the exception
/// index (one pass over it), committing as transactions fill.
fn fix_by_node(cow: Dev, fixes: &[ByNodeFix], out: &mut Vec<String>) -> Result<()> {
    if fixes.is_empty() {
        return Ok(());
    }
    let mut m = Meta::open(cow)?;
    let nodes: std::collections::HashSet<(u32, NodeId)> =
        fixes.iter().map(|f| (f.origin, f.node)).collect();
    for &(o, n) in &nodes {
        let (lo, hi) = (by_node_key(o, n, 0), by_node_key(o, n, MAX_CHUNK));
        loop {
            let stale = m.range(Tree::ByNode, lo, hi, SCAN_BATCH)?;
            if stale.is_empty() {
                break;
            }
            for (k, _) in stale {
                m.remove(Tree::ByNode, k)?;
                commit_if_full(&mut m)?;
            }
        }
    }
    let mut lo = 0u128;
    loop {
        let batch = m.range(Tree::Exceptions, lo, u128::MAX, SCAN_BATCH)?;
        for (k, _) in &batch {
            let (o, c, n) = split_key(*k);
            if nodes.contains(&(o, n)) {
                m.insert(Tree::ByNode, by_node_key(o, n, c), &[])?;
                commit_if_full(&mut m)?;
            }
        }
        match (
            batch.len() == SCAN_BATCH,
            batch.last().and_then(|(k, _)| k.checked_add(1)),
        ) {
            (true, Some(next)) => lo = next,
            _ => break,
        }
    }
    out.extend(
        fixes
            .iter()
            .map(|f| format!("index by node rebuilt: {}", f.detail)),
    );
    m.checkpoint()
}

/// Commit once the open transaction nears what the journal takes.
fn commit_if_full(m: &mut Meta<Dev>) -> Result<()> {
    if m.dirty_pages() + 8 >= m.max_dirty_pages() {
        m.commit()?;
    }
    Ok(())
}

fn describe_val(val: u64) -> String {
    match val {
        ZERO_CHUNK => "zero".to_string(),
        v => v.to_string(),
    }
}

/// The store's invariants. Own-chunk counters that disagree with the index
/// go to `fixes.own` (node, recorded, seen), and nodes whose chunks differ
/// between the index by node and the exception index to `fixes.by_node`,
/// for the caller to report or
/// repair.
fn semantic(m: &mut Meta<Dev>, report: &mut CheckReport, fixes: &mut Fixes) -> Result<()> {
    if let Err(e) = decode_app(m.app_state()) {
        report.push(Damage::new(
            Place::AppState,
            DamageKind::Corrupt,
            e.to_string(),
        ));
    }
    let origins = check_origins(m, report)?;
    let mut per_origin: BTreeMap<u32, Vec<Node>> = BTreeMap::new();
    let mut own_rec: HashMap<NodeId, u64> = HashMap::new();
    for (k, v) in scan(m, Tree::Nodes)? {
        match node_id_from_key(k).and_then(|id| decode_node(id, &v)) {
            Ok((o, n, own)) => {
                own_rec.insert(n.id, own);
                per_origin.entry(o).or_default().push(n);
            }
            Err(e) => report.push(
                Damage::new(Place::Tree(Tree::Nodes), DamageKind::Corrupt, e.to_string())
                    .with_keys(KeyRange::key(k)),
            ),
        }
    }
    let mut trees: BTreeMap<u32, VTree> = BTreeMap::new();
    for (o, nodes) in per_origin {
        if !origins.contains_key(&o) {
            let detail = format!("{} node(s) of unbound origin number {o}", nodes.len());
            report.push(Damage::new(
                Place::Tree(Tree::Nodes),
                DamageKind::UnboundOrigin,
                detail,
            ));
            continue;
        }
        match VTree::from_records(nodes) {
            Ok(t) => {
                trees.insert(o, t);
            }
            Err(e) => report.push(Damage::new(
                Place::Store,
                DamageKind::BrokenVersionTree,
                format!("version tree of origin number {o}: {e}"),
            )),
        }
    }
    let own_seen = check_exceptions(m, &origins, &trees, report, &mut fixes.by_node)?;
    for (id, rec) in &own_rec {
        let seen = own_seen.get(id).copied().unwrap_or(0);
        if seen != *rec {
            fixes.own.push((*id, *rec, seen));
        }
    }
    Ok(())
}

/// The origin records, by number; those that do not decode, or sit under
/// another number's key, are reported instead.
fn check_origins(
    m: &mut Meta<Dev>,
    report: &mut CheckReport,
) -> Result<BTreeMap<u32, super::records::OriginRec>> {
    let mut origins = BTreeMap::new();
    for (k, v) in scan(m, Tree::Origins)? {
        let detail = match decode_origin(&v) {
            Ok(o) if u128::from(o.num) == k => {
                origins.insert(o.num, o);
                continue;
            }
            Ok(o) => format!("holds origin number {}", o.num),
            Err(e) => e.to_string(),
        };
        let d = Damage::new(Place::Tree(Tree::Origins), DamageKind::Corrupt, detail);
        report.push(d.with_keys(KeyRange::key(k)));
    }
    Ok(origins)
}
