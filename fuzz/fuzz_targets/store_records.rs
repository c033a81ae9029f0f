//! Store record decoders (`snapmv_engine::store::records`): `decode_node`,
//! `decode_origin`, `decode_app`, the exception key split, and what the
//! store builds from decoded node records: `VTree::from_records` followed by
//! the operations the store runs on a loaded tree (reads, snapshot, delete,
//! cleaner decisions, pass completion). None may panic on any input; what
//! decodes must re-encode to the same record.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use snapmv_engine::meta::{NODE_REC_SIZE, ORIGIN_REC_SIZE, ZERO_CHUNK};
use snapmv_engine::store::records::{self, AppState, OriginRec};
use snapmv_engine::vtree::{self, ExcView, Kind, Node, NodeId, VTree, ORIGIN, SPINE_BIT};
use snapmv_engine::Result;
use std::collections::BTreeMap;

/// Small id space so records refer to each other: plain ids 1..16, spine
/// ids SPINE_BIT|1..16, and the special values.
fn node_id(sel: u8) -> NodeId {
    match sel % 36 {
        0 => ORIGIN,
        1 => vtree::RB_MARK,
        2 => vtree::MAX_NODE,
        3 => vtree::MAX_PLAIN,
        s @ 4..=19 => u64::from(s - 3),
        s => SPINE_BIT | u64::from(s - 19),
    }
}

/// A value of the store's next_node counter when it hands out ids: read
/// from the (possibly damaged) app state, so anything up to MAX_PLAIN,
/// including 0 (the next_node() check only bounds it from above).
fn counter_id(sel: u8) -> NodeId {
    match sel % 20 {
        18 => vtree::MAX_PLAIN - 1,
        19 => 0,
        s => u64::from(s),
    }
}

#[derive(Arbitrary, Debug)]
struct Rec {
    id: u8,
    parent: u8,
    kind: u8,
    flags: u8,
    tag: u8,
    flag_gen: u8,
    parent_tag: u8,
    origin: u8,
    /// Raw record bytes to splice over the encoded record (damage).
    splice: Option<(u8, Vec<u8>)>,
}

#[derive(Arbitrary, Debug)]
enum TreeOp {
    Resolve { tag: u8, chunk: u8 },
    /// Ids as the store draws them: `a` from the (possibly damaged)
    /// next_node counter, the spine `SPINE_BIT | a`, the leaf `a + 1`.
    SnapOrigin { a: u8, tag: u8 },
    /// Continuation leaf `a`, new leaf `a + 1`, as the store does.
    SnapOf { of: u8, a: u8, tag: u8 },
    Delete { tag: u8, gen: u8 },
    Clean { chunk: u8, gen: u8 },
    FinishPass { gen: u8 },
}

#[derive(Arbitrary, Debug)]
struct TreeInput {
    recs: Vec<Rec>,
    /// Exceptions (chunk, node) -> value visible to resolve / the cleaner.
    exc: Vec<(u8, u8, u8)>,
    ops: Vec<TreeOp>,
}

struct Exc<'a>(&'a BTreeMap<(u64, NodeId), u64>);

impl ExcView for Exc<'_> {
    fn get(&mut self, chunk: u64, node: NodeId) -> Result<Option<u64>> {
        Ok(self.0.get(&(chunk, node)).copied())
    }
    fn seek_spine(&mut self, chunk: u64, from: NodeId) -> Result<Option<(NodeId, u64)>> {
        Ok(self
            .0
            .range((chunk, from.max(SPINE_BIT))..=(chunk, vtree::MAX_NODE))
            .next()
            .map(|((_, n), v)| (*n, *v)))
    }
}

fn node_from(r: &Rec) -> Option<(u32, Node, u64)> {
    let kind = match r.kind % 3 {
        0 => Kind::Spine,
        1 => Kind::Ghost,
        _ => Kind::Leaf,
    };
    let id = node_id(r.id);
    let mut n = Node::new(id, node_id(r.parent), kind);
    n.deleted = r.flags & 1 != 0;
    n.flagged = r.flags & 2 != 0;
    n.hidden = r.flags & 4 != 0;
    n.tag = u64::from(r.tag % 8);
    n.flag_gen = u64::from(r.flag_gen % 4);
    n.parent_tag = Some(u64::from(r.parent_tag % 8)).filter(|t| *t != 0);
    let mut b = records::encode_node(u32::from(r.origin % 2), &n, u64::from(r.flags >> 4));
    if let Some((at, bytes)) = &r.splice {
        let at = *at as usize % NODE_REC_SIZE;
        let n = bytes.len().min(NODE_REC_SIZE - at);
        b[at..at + n].copy_from_slice(&bytes[..n]);
    }
    records::decode_node(id, &b).ok()
}

fn tree_case(input: TreeInput) {
    if std::env::var_os("SNAPMV_FUZZ_DEBUG").is_some() {
        eprintln!("{input:#?}");
    }
    let mut nodes = Vec::new();
    for r in input.recs.iter().take(64) {
        if let Some((_, n, _)) = node_from(r) {
            nodes.push(n);
        }
    }
    let Ok(mut t) = VTree::from_records(nodes) else {
        return;
    };
    // Structural facts from_records promises.
    for (id, n) in t.nodes() {
        assert_eq!(*id, n.id);
        if n.parent != ORIGIN {
            assert!(
                t.nodes().contains_key(&n.parent),
                "dangling parent accepted"
            );
        }
    }
    for (tag, leaf) in &t.tags {
        assert_eq!(t.node(*leaf).tag, *tag);
    }
    let exc: BTreeMap<(u64, NodeId), u64> = input
        .exc
        .iter()
        .take(64)
        .map(|(c, n, v)| {
            let val = if *v == 0 { ZERO_CHUNK } else { u64::from(*v) };
            ((u64::from(c % 4), node_id(*n)), val)
        })
        .collect();
    let ids: Vec<NodeId> = t.nodes().keys().copied().collect();
    for id in &ids {
        let _ = t.is_live(*id);
        let _ = t.merge_target(*id);
    }
    let _ = t.copy_target();
    let _ = t.has_flagged();
    for op in input.ops.iter().take(32) {
        match *op {
            TreeOp::Resolve { tag, chunk } => {
                let chunk = u64::from(chunk % 4);
                let _ = t.origin_write_target(chunk, &mut Exc(&exc));
                if let Some(leaf) = t.leaf_of(u64::from(tag % 8)) {
                    let _ = t.resolve(leaf, chunk, &mut Exc(&exc));
                    if t.node(leaf).kind == Kind::Leaf {
                        let _ = t.leaf_write_plan(leaf, chunk, &mut Exc(&exc));
                    }
                }
            }
            TreeOp::SnapOrigin { a, tag } => {
                let a = counter_id(a);
                let _ = t.snapshot_origin(SPINE_BIT | a, a + 1, u64::from(tag % 12));
            }
            TreeOp::SnapOf { of, a, tag } => {
                let a = counter_id(a);
                let _ = t.snapshot_of(u64::from(of % 8), a, a + 1, u64::from(tag % 12));
            }
            TreeOp::Delete { tag, gen } => {
                let _ = t.delete(u64::from(tag % 12), u64::from(gen % 4));
            }
            TreeOp::Clean { chunk, gen } => {
                let c = u64::from(chunk % 4);
                let here: Vec<(NodeId, u64)> = exc
                    .range((c, 0)..=(c, u64::MAX))
                    .map(|((_, n), v)| (*n, *v))
                    .collect();
                let _ = t.clean_chunk(&here, u64::from(gen % 5));
            }
            TreeOp::FinishPass { gen } => {
                let _ = t.finish_pass(u64::from(gen % 5));
            }
        }
        if let Err(e) = t.verify_flag_index() {
            panic!("after {op:?}: {e}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 5 {
        0 => {
            if rest.len() < 8 {
                return;
            }
            let id = u64::from_le_bytes(rest[..8].try_into().unwrap());
            let b = &rest[8..];
            // Mostly full-size records, so the decoder gets past the length.
            let mut rec = [0u8; NODE_REC_SIZE];
            let b: &[u8] = if sel & 0x80 != 0 {
                let n = b.len().min(NODE_REC_SIZE);
                rec[..n].copy_from_slice(&b[..n]);
                rec[0] = 1;
                &rec
            } else {
                b
            };
            if let Ok((origin, n, own)) = records::decode_node(id, b) {
                assert_eq!(n.id, id);
                assert!(n.memo.len() <= records::MEMO_MAX);
                let again = records::encode_node(origin, &n, own);
                let (o2, n2, own2) =
                    records::decode_node(id, &again).expect("re-encoded node must decode");
                assert_eq!((o2, &n2, own2), (origin, &n, own), "node record round trip");
            }
        }
        1 => {
            let mut rec = [0u8; ORIGIN_REC_SIZE];
            let b: &[u8] = if sel & 0x80 != 0 {
                let n = rest.len().min(ORIGIN_REC_SIZE);
                rec[..n].copy_from_slice(&rest[..n]);
                rec[0] = 1;
                &rec
            } else {
                rest
            };
            if let Ok(o) = records::decode_origin(b) {
                assert!(o.id.len() <= records::ID_MAX && o.path.len() <= records::PATH_MAX);
                let again = records::encode_origin(&o);
                let back: OriginRec =
                    records::decode_origin(&again).expect("re-encoded origin must decode");
                assert_eq!(back, o, "origin record round trip");
            }
        }
        2 => {
            let mut app = [0u8; 96];
            let b: &[u8] = if sel & 0x80 != 0 {
                let n = rest.len().min(96);
                app[..n].copy_from_slice(&rest[..n]);
                app[..4].copy_from_slice(&0x534d_4150u32.to_le_bytes());
                &app
            } else {
                rest
            };
            if let Ok(a) = records::decode_app(b) {
                let again = records::encode_app(&a);
                let back: AppState =
                    records::decode_app(&again).expect("re-encoded app state must decode");
                assert_eq!(back, a, "app state round trip");
            }
        }
        3 => {
            if rest.len() < 16 {
                return;
            }
            let k = u128::from_le_bytes(rest[..16].try_into().unwrap());
            let (o, c, n) = records::split_key(k);
            assert!(c < 1 << 48 && n < 1 << 48);
            let k2 = records::exc_key(o, c, n);
            assert_eq!(records::split_key(k2), (o, c, n));
            // The layout (origin | chunk | node) must keep key order per
            // origin and chunk: a spine seek relies on it.
            assert_eq!(k2 >> 48, k >> 48);
        }
        _ => {
            let u = Unstructured::new(rest);
            if let Ok(input) = TreeInput::arbitrary_take_rest(u) {
                tree_case(input);
            }
        }
    }
});
