//! `check`: the metadata checker (`meta::check`: pages, checksums, order,
//! space map rebuilt and compared) plus the store's own invariants: every
//! node record decodes, each origin's tree rebuilds, every exception names
//! a bound origin and an existing node of it, and each node's own-chunk
//! counter equals the exceptions keyed by it.

use super::api::Dev;
use super::inner::{scan, val_u64};
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
    let mut own_fixes = Vec::new();
    if let Err(e) = semantic(&mut m, &mut report, &mut own_fixes) {
        report.push(incomplete(format!("semantic check stopped: {e}")));
    }
    for &(id, recorded, found) in &own_fixes {
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
    let mut own_fixes = Vec::new();
    {
        let mut m = Meta::open_read_only(cow.clone())?;
        if let Err(e) = semantic(&mut m, &mut semantic_damage, &mut own_fixes) {
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
    fix_own_counters(cow.clone(), &own_fixes, &mut report.fixed)?;
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
) -> Result<HashMap<NodeId, u64>> {
    let chunk_size = u64::from(m.geometry().chunk_size);
    let mut own_seen: HashMap<NodeId, u64> = HashMap::new();
    let mut lo = 0u128;
    loop {
        let batch = m.range(Tree::Exceptions, lo, u128::MAX, SCAN_BATCH)?;
        for (k, v) in &batch {
            let (o, c, n) = split_key(*k);
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
    Ok(own_seen)
}

fn describe_val(val: u64) -> String {
    match val {
        ZERO_CHUNK => "zero".to_string(),
        v => v.to_string(),
    }
}

/// The store's invariants. Own-chunk counters that disagree with the index
/// go to `own_fixes` (node, recorded, seen), for the caller to report or
/// repair.
fn semantic(
    m: &mut Meta<Dev>,
    report: &mut CheckReport,
    own_fixes: &mut Vec<(NodeId, u64, u64)>,
) -> Result<()> {
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
    let own_seen = check_exceptions(m, &origins, &trees, report)?;
    for (id, rec) in &own_rec {
        let seen = own_seen.get(id).copied().unwrap_or(0);
        if seen != *rec {
            own_fixes.push((*id, *rec, seen));
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
