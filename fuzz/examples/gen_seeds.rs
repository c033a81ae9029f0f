//! Writes the seed inputs under `fuzz/seeds/<target>/`: valid on-disk
//! blocks taken from a real store, valid records, valid NBD sessions and
//! control-socket lines. Run from `fuzz/`:
//!
//! ```text
//! cargo +nightly run --release --example gen_seeds
//! ```
//!
//! Seeds for the structured targets (`damaged_cow`, `meta_model`) are a few
//! byte strings whose `arbitrary` decoding exercises each base image and
//! operation family; libFuzzer grows them from there.

use snapmv_engine::format::{self, BlockKind, PAGE_SIZE};
use snapmv_engine::store::records::{self, AppState, OriginRec, RollbackState};
use snapmv_engine::vtree::{Kind, Node, SPINE_BIT};
use snapmv_fuzz::*;
use snapmv_nbd::nbd::proto::*;
use std::fs;
use std::path::Path;

fn put(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new("seeds").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), data).unwrap();
}

fn with_head(sel: u8, blk: u64, body: &[u8]) -> Vec<u8> {
    let mut v = vec![sel];
    v.extend_from_slice(&blk.to_le_bytes());
    v.extend_from_slice(body);
    v
}

fn format_seeds() {
    // A real store: every block type appears in its image.
    let (cow, s) = fresh_store(3 << 20);
    let o = origin_dev(8 * 4096, 1);
    s.bind("o", "/dev/o", o, 1).unwrap();
    let t = s.snapshot("o", None, "seed", 2).unwrap();
    s.volume("o", None).unwrap().write(0, &pattern(9000, 2), false).unwrap();
    s.snapshot("o", Some(t), "seed2", 3).unwrap();
    s.flush().unwrap();
    let img = image_of(&*cow);
    let mut seen = std::collections::BTreeSet::new();
    for b in metadata_blocks(&img) {
        let page = &img[b * PAGE_SIZE..(b + 1) * PAGE_SIZE];
        let kind = BlockKind::from_u32(format::rd_u32(page, 0)).unwrap();
        let which = match kind {
            BlockKind::Superblock => 0,
            BlockKind::JournalDesc => 1,
            BlockKind::JournalCommit => 2,
            BlockKind::Leaf | BlockKind::Internal => 3,
            BlockKind::Bitmap => 4,
            BlockKind::State => 5,
        };
        if !seen.insert((which, kind as u32)) {
            continue;
        }
        // Raw mode (the block as it is on disk) and sealed mode.
        put("format_decode", &format!("{}-raw", kind.name().replace(' ', "_")), &with_head(which, b as u64, page));
        put("format_decode", &format!("{}-sealed", kind.name().replace(' ', "_")), &with_head(which | 0x10, b as u64, page));
        put("format_decode", &format!("{}-any", kind.name().replace(' ', "_")), &with_head(8, b as u64, page));
    }
    // Layout from geometry.
    let mut g = (64u64 << 20).to_le_bytes().to_vec();
    g.extend_from_slice(&65536u32.to_le_bytes());
    put("format_decode", "layout", &with_head(7, 0, &g));
}

fn records_seeds() {
    let mut n = Node::new(5, SPINE_BIT | 2, Kind::Leaf);
    n.tag = 3;
    n.memo = "memo".into();
    n.parent_tag = Some(1);
    let rec = records::encode_node(1, &n, 4);
    let mut v = vec![0u8];
    v.extend_from_slice(&5u64.to_le_bytes());
    v.extend_from_slice(&rec);
    put("store_records", "node", &v);
    let o = OriginRec {
        num: 1,
        size: 1 << 20,
        created: 1_700_000_000,
        id: "sda".into(),
        path: "/dev/sda".into(),
    };
    let mut v = vec![1u8];
    v.extend(records::encode_origin(&o));
    put("store_records", "origin", &v);
    let a = AppState {
        next_node: 9,
        next_tag: 4,
        next_origin: 2,
        clean_gen: 1,
        clean_pass: Some((1, 77)),
        rollback: Some(RollbackState {
            origin: 1,
            tag: 2,
            src: 6,
            cursor: 1,
            total: 3,
        }),
    };
    let mut v = vec![2u8];
    v.extend(records::encode_app(&a));
    put("store_records", "app", &v);
    let mut v = vec![3u8];
    v.extend_from_slice(&records::exc_key(1, 5, SPINE_BIT | 3).to_le_bytes());
    put("store_records", "key", &v);
    put("store_records", "tree", &[4, 3, 20, 4, 0, 2, 0, 0, 0, 0, 0, 21, 0, 2, 0, 1, 0, 0, 0, 0, 9, 8, 2, 3, 1, 0]);
}

fn opt(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn lp(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

fn req(flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

fn ext_req(flags: u16, cmd: u16, handle: u64, offset: u64, len: u64) -> Vec<u8> {
    let mut v = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// The same session as `requests`, in 32-byte extended headers, plus a
/// flagless WRITE (as qemu sends them) and a payload on BLOCK_STATUS.
fn extended_requests() -> Vec<u8> {
    let mut s = Vec::new();
    s.extend(ext_req(0, CMD_READ, 1, 0, 4096));
    s.extend(ext_req(CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 2, 4000, 600));
    s.extend(pattern(600, 9));
    s.extend(ext_req(0, CMD_WRITE, 3, 9000, 100));
    s.extend(pattern(100, 3));
    s.extend(ext_req(0, CMD_BLOCK_STATUS, 4, 0, 1 << 40));
    s.extend(ext_req(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 5, 0, 8));
    s.extend_from_slice(&[0; 8]);
    s.extend(ext_req(0, CMD_FLUSH, 6, 0, 0));
    s.extend(ext_req(0, CMD_TRIM, 7, 8192, 8192));
    s.extend(ext_req(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 8, 12288, 5000));
    s.extend(ext_req(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 9, 100, 70000));
    s.extend(ext_req(0, CMD_READ, 10, 260_000, 8000));
    s.extend(ext_req(0, CMD_DISC, 11, 0, 0));
    s
}

fn requests() -> Vec<u8> {
    let mut s = Vec::new();
    s.extend(req(0, CMD_READ, 1, 0, 4096));
    s.extend(req(CMD_FLAG_FUA, CMD_WRITE, 2, 4000, 600));
    s.extend(pattern(600, 9));
    s.extend(req(0, CMD_BLOCK_STATUS, 3, 0, 1 << 18));
    s.extend(req(0, CMD_FLUSH, 4, 0, 0));
    s.extend(req(0, CMD_TRIM, 5, 8192, 8192));
    s.extend(req(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 6, 12288, 5000));
    s.extend(req(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 7, 100, 70000));
    s.extend(req(0, CMD_READ, 8, 260_000, 8000));
    s.extend(req(0, CMD_DISC, 9, 0, 0));
    s
}

fn nbd_seeds() {
    // Pure parsers.
    let mut go = lp("o@1");
    go.extend_from_slice(&2u16.to_be_bytes());
    go.extend_from_slice(&INFO_NAME.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    let mut v = vec![0u8];
    v.extend(opt(OPT_GO, &go));
    put("nbd_proto", "opt-go", &v);
    let mut mc = lp("o");
    mc.extend_from_slice(&2u32.to_be_bytes());
    mc.extend(lp("base:allocation"));
    mc.extend(lp("base:"));
    let mut v = vec![1u8, OPT_LIST_META_CONTEXT as u8];
    v.extend_from_slice(&mc);
    put("nbd_proto", "opt-meta", &v);
    // Cx (size, read_only, replies, meta_context, max_request), header.
    for (name, replies) in [("request", 1u8), ("request-extended", 2)] {
        let mut v = vec![2u8 | 0x80];
        v.extend_from_slice(&(1u64 << 20).to_le_bytes());
        v.extend_from_slice(&[0, replies, 1]);
        v.extend_from_slice(&(1u32 << 16).to_le_bytes());
        if replies == 2 {
            v.extend(ext_req(CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 7, 4096, 512));
        } else {
            v.extend(req(CMD_FLAG_FUA, CMD_WRITE, 7, 4096, 512));
        }
        put("nbd_proto", name, &v);
    }
    // Extents (offset, len as u64, req_one, extents); sel 9 = extended.
    let extents = [0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 16, 0, 0, 1];
    for (name, sel) in [("extents", 3u8), ("extents-extended", 9)] {
        let mut v = vec![sel];
        v.extend_from_slice(&extents);
        put("nbd_proto", name, &v);
    }

    // Whole sessions: negotiation by hand, then requests.
    let mut s = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
    s.extend(opt(OPT_LIST, &[]));
    s.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    let mut mc = lp("o");
    mc.extend_from_slice(&1u32.to_be_bytes());
    mc.extend(lp("base:allocation"));
    s.extend(opt(OPT_LIST_META_CONTEXT, &mc));
    s.extend(opt(OPT_SET_META_CONTEXT, &mc));
    let mut info = lp("o@2");
    info.extend_from_slice(&0u16.to_be_bytes());
    s.extend(opt(OPT_INFO, &info));
    let mut go = lp("o");
    go.extend_from_slice(&0u16.to_be_bytes());
    s.extend(opt(OPT_GO, &go));
    s.extend(requests());
    let mut v = vec![0u8];
    v.extend(&s);
    put("nbd_conn", "session-go", &v);
    // Old-style OPT_EXPORT_NAME, simple replies.
    let mut s = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    s.extend(opt(OPT_EXPORT_NAME, b"o@1"));
    s.extend(requests());
    let mut v = vec![0u8];
    v.extend(&s);
    put("nbd_conn", "session-export-name", &v);
    // Negotiation prepended by the target (mode bit 1), export by bits 2-3.
    for (i, name) in ["o", "o@1", "o@2", "default"].iter().enumerate() {
        let mut v = vec![2u8 | (i as u8) << 2];
        v.extend(requests());
        put("nbd_conn", &format!("transmission-{name}"), &v);
    }
    let mut v = vec![3u8];
    v.extend(requests());
    put("nbd_conn", "transmission-read-only", &v);
    // Extended headers (mode bit 4) on the origin.
    let mut v = vec![0x12u8];
    v.extend(extended_requests());
    put("nbd_conn", "transmission-extended-o", &v);
}

fn control_seeds() {
    let lines = [
        r#"{"op":"hello"}"#,
        r#"{"op":"list"}"#,
        r#"{"op":"snapshot","origin":"o","of":null,"memo":"a"}"#,
        r#"{"op":"snapshot","origin":"o","of":1,"memo":"b"}"#,
        r#"{"op":"delete","origin":"o","tag":2}"#,
        r#"{"op":"rollback","origin":"o","tag":1}"#,
        r#"{"op":"list"}"#,
    ];
    let mut v = vec![0u8];
    for l in lines {
        v.extend_from_slice(l.as_bytes());
        v.push(b'\n');
    }
    put("control_msg", "session", &v);
    let mut v = vec![2u8];
    v.extend_from_slice(
        br#"{"reply":"status","cow":"/c","chunk_size":4096,"chunks_total":10,"chunks_used":2,"status":"valid","cleaning":false,"rollback":{"origin":"o","tag":1,"done_chunks":1,"total_chunks":4},"origins":[{"id":"o","path":"/dev/o","size":65536,"created":1,"snapshots":[{"tag":1,"parent":null,"created":-5,"memo":"m","own_chunks":3}]}]}"#,
    );
    put("control_msg", "reply-status", &v);
    put("control_msg", "reply-error", b"\x02{\"reply\":\"error\",\"message\":\"x\"}");
    put("control_msg", "structured", &[1, 2, 0, 0, 1, 3, 0, 1, 1, 2, 1, 1, 4, 0, 1]);
    put("control_msg", "status", &[3, 0, 16, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]);
}

fn structured_seeds() {
    // damaged_cow: base, reseal, fix_journal, fallback, then mutations.
    for base in 0..4u8 {
        put("damaged_cow", &format!("base{base}-clean"), &[base, 0, 0, 0, 0]);
        put("damaged_cow", &format!("base{base}-resealed"), &[base, 1, 1, 1, 1, 3, 0, 9, 0, 0x10, 0, 0x41, 0x85]);
    }
    // meta_model: assorted operation bytes.
    put("meta_model", "ops-a", &[1, 0, 7, 0, 3, 60, 2, 9, 7, 1, 0, 5, 0, 12, 13, 16, 2, 0, 0, 0, 20, 17]);
    put("meta_model", "ops-b", &[7, 3, 0, 20, 1, 2, 1, 9, 0, 40, 0, 1, 15, 12, 4, 1, 0, 3, 0, 17, 14, 16]);
}

fn main() {
    format_seeds();
    records_seeds();
    nbd_seeds();
    control_seeds();
    structured_seeds();
    eprintln!("seeds written under fuzz/seeds/");
}
