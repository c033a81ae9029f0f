//! `check`: the metadata checker (`meta::check`: pages, checksums, order,
//! space map rebuilt and compared) plus the store's own invariants: every
//! node record decodes, each origin's tree rebuilds, every exception names
//! a bound origin and an existing node of it, and each node's own-chunk
//! counter equals the exceptions keyed by it.

use super::api::Dev;
use super::inner::{scan, val_u64};
use super::records::{decode_app, decode_node, decode_origin, node_id_from_key, split_key};
use crate::error::Result;
use crate::meta::{self, CheckReport, Meta, Tree, ZERO_CHUNK};
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
            report
                .errors
                .push(format!("cannot open for the semantic check: {e}"));
            return Ok(report);
        }
    };
    if let Err(e) = semantic(&mut m, &mut report.errors) {
        report.errors.push(format!("semantic check stopped: {e}"));
    }
    Ok(report)
}

fn semantic(m: &mut Meta<Dev>, errors: &mut Vec<String>) -> Result<()> {
    if let Err(e) = decode_app(m.app_state()) {
        errors.push(format!("app state: {e}"));
    }
    let mut origins = BTreeMap::new();
    for (k, v) in scan(m, Tree::Origins)? {
        match decode_origin(&v) {
            Ok(o) if u128::from(o.num) == k => {
                origins.insert(o.num, o);
            }
            Ok(o) => errors.push(format!(
                "origins tree: key {k} holds origin number {}",
                o.num
            )),
            Err(e) => errors.push(format!("origins tree: key {k}: {e}")),
        }
    }
    let mut per_origin: BTreeMap<u32, Vec<Node>> = BTreeMap::new();
    let mut own_rec: HashMap<NodeId, u64> = HashMap::new();
    for (k, v) in scan(m, Tree::Nodes)? {
        match node_id_from_key(k).and_then(|id| decode_node(id, &v)) {
            Ok((o, n, own)) => {
                own_rec.insert(n.id, own);
                per_origin.entry(o).or_default().push(n);
            }
            Err(e) => errors.push(format!("nodes tree: key {k:#x}: {e}")),
        }
    }
    let mut trees: BTreeMap<u32, VTree> = BTreeMap::new();
    for (o, nodes) in per_origin {
        if !origins.contains_key(&o) {
            errors.push(format!(
                "nodes tree: {} node(s) of unbound origin number {o}",
                nodes.len()
            ));
            continue;
        }
        match VTree::from_records(nodes) {
            Ok(t) => {
                trees.insert(o, t);
            }
            Err(e) => errors.push(format!("version tree of origin number {o}: {e}")),
        }
    }
    let mut own_seen: HashMap<NodeId, u64> = HashMap::new();
    for (k, v) in scan(m, Tree::Exceptions)? {
        let (o, c, n) = split_key(k);
        let val = val_u64(&v)?;
        let Some(rec) = origins.get(&o) else {
            errors.push(format!(
                "exception (origin {o}, chunk {c}, node {n:#x}): origin not bound"
            ));
            continue;
        };
        if c >= rec.size.div_ceil(u64::from(m.geometry().chunk_size)) {
            errors.push(format!(
                "exception (origin {}, chunk {c}): past the origin's end",
                rec.id
            ));
        }
        if n == RB_MARK {
            continue;
        }
        match trees.get(&o) {
            Some(t) if t.nodes.contains_key(&n) => *own_seen.entry(n).or_insert(0) += 1,
            _ => errors.push(format!(
                "exception (origin {}, chunk {c}, node {n:#x}) -> {}: no such node",
                rec.id,
                if val == ZERO_CHUNK {
                    "zero".to_string()
                } else {
                    val.to_string()
                }
            )),
        }
    }
    for (id, rec) in &own_rec {
        let seen = own_seen.get(id).copied().unwrap_or(0);
        if seen != *rec {
            errors.push(format!(
                "node {id:#x}: record says {rec} own chunks, index holds {seen}"
            ));
        }
    }
    Ok(())
}
