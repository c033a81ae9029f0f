//! Fixed-size encodings of the store's records: version-tree nodes, origins
//! and the app state kept in the state page. Decoding never panics and
//! rejects anything it does not recognise.

use crate::error::{Error, Result};
use crate::meta::{NODE_REC_SIZE, ORIGIN_REC_SIZE};
use crate::vtree::{Kind, Node, NodeId};

pub const MEMO_MAX: usize = NODE_REC_SIZE - 58;
pub const ID_MAX: usize = 128;
pub const PATH_MAX: usize = ORIGIN_REC_SIZE - 156;
const REC_VERSION: u8 = 1;

fn bad(what: &'static str, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        block: 0,
        kind: what,
        reason: reason.into(),
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u16_at(b: &[u8], at: usize) -> usize {
    u16::from_le_bytes([b[at], b[at + 1]]) as usize
}

fn str_at(b: &[u8], at: usize, max: usize, what: &'static str) -> Result<String> {
    let len = u16_at(b, at);
    if len > max {
        return Err(bad(what, format!("string length {len} > {max}")));
    }
    String::from_utf8(b[at + 2..at + 2 + len].to_vec())
        .map_err(|_| bad(what, "string is not UTF-8"))
}

fn put_str(b: &mut [u8], at: usize, s: &str, max: usize) {
    let bytes = s.as_bytes();
    assert!(bytes.len() <= max, "caller validated the length");
    let n = bytes.len().min(max);
    b[at..at + 2].copy_from_slice(&(n as u16).to_le_bytes());
    b[at + 2..at + 2 + n].copy_from_slice(&bytes[..n]);
}

/// Offset of the own-chunks counter, patched in place at commit time.
pub const OWN_AT: usize = 48;

pub fn encode_node(origin: u32, n: &Node, own: u64) -> Vec<u8> {
    let mut b = vec![0u8; NODE_REC_SIZE];
    b[0] = REC_VERSION;
    b[1] = match n.kind {
        Kind::Spine => 1,
        Kind::Ghost => 2,
        Kind::Leaf => 3,
    };
    b[2] = u8::from(n.deleted) | (u8::from(n.flagged) << 1) | (u8::from(n.hidden) << 2);
    b[4..8].copy_from_slice(&origin.to_le_bytes());
    b[8..16].copy_from_slice(&n.parent.to_le_bytes());
    b[16..24].copy_from_slice(&n.tag.to_le_bytes());
    b[24..32].copy_from_slice(&n.flag_gen.to_le_bytes());
    b[32..40].copy_from_slice(&n.parent_tag.unwrap_or(0).to_le_bytes());
    b[40..48].copy_from_slice(&n.created.to_le_bytes());
    b[OWN_AT..OWN_AT + 8].copy_from_slice(&own.to_le_bytes());
    put_str(&mut b, 56, &n.memo, MEMO_MAX);
    b
}

/// A node id read back as a B+tree key: must fit the 48 bits the
/// exception key gives it, and be neither the origin nor the rollback mark.
pub fn node_id_from_key(k: u128) -> Result<NodeId> {
    match u64::try_from(k) {
        Ok(id)
            if id != crate::vtree::ORIGIN
                && id != crate::vtree::RB_MARK
                && id <= crate::vtree::MAX_NODE =>
        {
            Ok(id)
        }
        _ => Err(bad(
            "node record",
            format!("key {k:#x} is not a valid node id"),
        )),
    }
}

/// Returns (origin number, node, own chunks).
pub fn decode_node(id: NodeId, b: &[u8]) -> Result<(u32, Node, u64)> {
    node_id_from_key(u128::from(id))?;
    if b.len() != NODE_REC_SIZE || b[0] != REC_VERSION {
        return Err(bad(
            "node record",
            format!("node {id:#x}: bad length or version"),
        ));
    }
    let kind = match b[1] {
        1 => Kind::Spine,
        2 => Kind::Ghost,
        3 => Kind::Leaf,
        k => {
            return Err(bad(
                "node record",
                format!("node {id:#x}: unknown kind {k}"),
            ))
        }
    };
    let mut n = Node::new(id, u64_at(b, 8), kind);
    n.deleted = b[2] & 1 != 0;
    n.flagged = b[2] & 2 != 0;
    n.hidden = b[2] & 4 != 0;
    n.tag = u64_at(b, 16);
    n.flag_gen = u64_at(b, 24);
    n.parent_tag = Some(u64_at(b, 32)).filter(|t| *t != 0);
    n.created = u64_at(b, 40) as i64;
    n.memo = str_at(b, 56, MEMO_MAX, "node record")?;
    if (kind == crate::vtree::Kind::Spine) != crate::vtree::is_spine_id(id) {
        return Err(bad(
            "node record",
            format!("node {id:#x}: kind does not match its id"),
        ));
    }
    Ok((u32_at(b, 4), n, u64_at(b, OWN_AT)))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginRec {
    pub num: u32,
    pub size: u64,
    pub created: i64,
    pub id: String,
    pub path: String,
}

pub fn encode_origin(o: &OriginRec) -> Vec<u8> {
    let mut b = vec![0u8; ORIGIN_REC_SIZE];
    b[0] = REC_VERSION;
    b[4..8].copy_from_slice(&o.num.to_le_bytes());
    b[8..16].copy_from_slice(&o.size.to_le_bytes());
    b[16..24].copy_from_slice(&o.created.to_le_bytes());
    put_str(&mut b, 24, &o.id, ID_MAX);
    put_str(&mut b, 154, &o.path, PATH_MAX);
    b
}

pub fn decode_origin(b: &[u8]) -> Result<OriginRec> {
    if b.len() != ORIGIN_REC_SIZE || b[0] != REC_VERSION {
        return Err(bad("origin record", "bad length or version"));
    }
    Ok(OriginRec {
        num: u32_at(b, 4),
        size: u64_at(b, 8),
        created: u64_at(b, 16) as i64,
        id: str_at(b, 24, ID_MAX, "origin record")?,
        path: str_at(b, 154, PATH_MAX, "origin record")?,
    })
}

/// Store-wide state, journalled in the state page with every commit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppState {
    pub next_node: u64,
    pub next_tag: u64,
    pub next_origin: u32,
    /// Cleaner generation: bumped when a pass starts.
    pub clean_gen: u64,
    /// A running pass: (its generation, the next exception key to visit).
    pub clean_pass: Option<(u64, u128)>,
    pub rollback: Option<RollbackState>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RollbackState {
    pub origin: u32,
    /// The snapshot the user rolled back (for status).
    pub tag: u64,
    /// The hidden leaf that froze `tag`'s content at rollback start: the
    /// copier's source, so writes to `tag` afterwards do not leak in.
    pub src: u64,
    pub cursor: u64,
    pub total: u64,
}

const APP_MAGIC: u32 = 0x534d_4150; // "SMAP"
const APP_LEN: usize = 96;

pub fn encode_app(a: &AppState) -> Vec<u8> {
    let mut b = vec![0u8; APP_LEN];
    b[0..4].copy_from_slice(&APP_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&a.next_origin.to_le_bytes());
    b[8..16].copy_from_slice(&a.next_node.to_le_bytes());
    b[16..24].copy_from_slice(&a.next_tag.to_le_bytes());
    b[24..32].copy_from_slice(&a.clean_gen.to_le_bytes());
    if let Some((g, k)) = a.clean_pass {
        b[32] = 1;
        b[40..48].copy_from_slice(&g.to_le_bytes());
        b[48..64].copy_from_slice(&k.to_le_bytes());
    }
    if let Some(r) = a.rollback {
        b[33] = 1;
        b[36..40].copy_from_slice(&r.origin.to_le_bytes());
        b[64..72].copy_from_slice(&r.tag.to_le_bytes());
        b[72..80].copy_from_slice(&r.cursor.to_le_bytes());
        b[80..88].copy_from_slice(&r.total.to_le_bytes());
        b[88..96].copy_from_slice(&r.src.to_le_bytes());
    }
    b
}

pub fn decode_app(b: &[u8]) -> Result<AppState> {
    if b.is_empty() {
        // A freshly formatted device: counters start at 1 (tag 0 is the origin).
        return Ok(AppState {
            next_node: 1,
            next_tag: 1,
            next_origin: 1,
            ..AppState::default()
        });
    }
    if b.len() < APP_LEN || u32_at(b, 0) != APP_MAGIC {
        return Err(bad("app state", "bad length or magic"));
    }
    let mut k = [0u8; 16];
    k.copy_from_slice(&b[48..64]);
    Ok(AppState {
        next_origin: u32_at(b, 4),
        next_node: u64_at(b, 8),
        next_tag: u64_at(b, 16),
        clean_gen: u64_at(b, 24),
        clean_pass: (b[32] == 1).then(|| (u64_at(b, 40), u128::from_le_bytes(k))),
        rollback: (b[33] == 1).then(|| RollbackState {
            origin: u32_at(b, 36),
            tag: u64_at(b, 64),
            cursor: u64_at(b, 72),
            total: u64_at(b, 80),
            src: u64_at(b, 88),
        }),
    })
}

/// Exception key: origin (32 bits) | chunk (48 bits) | node (48 bits).
pub fn exc_key(origin: u32, chunk: u64, node: NodeId) -> u128 {
    assert!(chunk < 1 << 48 && node < 1 << 48);
    (u128::from(origin) << 96) | (u128::from(chunk) << 48) | u128::from(node)
}

/// The `ByNode` key of exception (origin, chunk, node): the same three
/// fields with node before chunk, so one node's chunks are one range.
pub fn by_node_key(origin: u32, node: NodeId, chunk: u64) -> u128 {
    assert!(chunk < 1 << 48 && node < 1 << 48);
    (u128::from(origin) << 96) | (u128::from(node) << 48) | u128::from(chunk)
}

/// (origin, node, chunk) of a `ByNode` key.
pub fn split_by_node_key(k: u128) -> (u32, NodeId, u64) {
    let (o, n, c) = split_key(k);
    (o, n, c)
}

pub fn split_key(k: u128) -> (u32, u64, NodeId) {
    (
        (k >> 96) as u32,
        ((k >> 48) as u64) & ((1 << 48) - 1),
        (k as u64) & ((1 << 48) - 1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_roundtrip_and_reject_garbage() {
        let mut n = Node::new(7, crate::vtree::SPINE_BIT | 3, Kind::Leaf);
        n.tag = 9;
        n.memo = "hello".into();
        n.parent_tag = Some(4);
        n.created = 1_700_000_000;
        let b = encode_node(2, &n, 11);
        let (o, back, own) = decode_node(7, &b).unwrap();
        assert_eq!(
            (o, own, back.tag, back.memo.as_str(), back.parent_tag),
            (2, 11, 9, "hello", Some(4))
        );
        assert!(decode_node(7, &b[..10]).is_err());
        let mut bad = b.clone();
        bad[56] = 0xff;
        bad[57] = 0xff;
        assert!(
            decode_node(7, &bad).is_err(),
            "memo length beyond the record"
        );
        let o = OriginRec {
            num: 3,
            size: 1 << 30,
            created: 5,
            id: "sdb1".into(),
            path: "/dev/sdb1".into(),
        };
        assert_eq!(decode_origin(&encode_origin(&o)).unwrap(), o);
        let a = AppState {
            next_node: 5,
            next_tag: 6,
            next_origin: 2,
            clean_gen: 3,
            clean_pass: Some((3, 1 << 100)),
            rollback: Some(RollbackState {
                origin: 1,
                tag: 2,
                src: 9,
                cursor: 3,
                total: 4,
            }),
        };
        assert_eq!(decode_app(&encode_app(&a)).unwrap(), a);
        assert!(decode_app(&[1, 2, 3]).is_err());
        let k = exc_key(5, (1 << 48) - 1, 77);
        assert_eq!(split_key(k), (5, (1 << 48) - 1, 77));
    }
}
