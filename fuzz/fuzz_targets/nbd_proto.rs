//! The NBD frontend's pure protocol functions (`snapmv_nbd::nbd::proto`):
//! option header and option payload parsing, request header parsing
//! (compact and extended) and checking against an arbitrary negotiated
//! context, meta-context query matching, the BLOCK_STATUS descriptor
//! builder and the reply encoders of every style. Never a panic; and the
//! properties the server relies on are asserted:
//! - a request accepted by `check_request` lies inside the export, within
//!   `max_request` for READ/WRITE, and respects read-only;
//! - a header's payload is what framing says (a WRITE's length, or an
//!   extended length flagged `CMD_FLAG_PAYLOAD_LEN`), and a rejected
//!   request drains exactly that payload;
//! - descriptors cover the request from its start without overrunning it,
//!   have no zero lengths, and respect `req_one` / `MAX_DESCRIPTORS`;
//! - every chunk's length field matches the bytes that follow its header.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use snapmv_nbd::nbd::proto::*;

#[derive(Arbitrary, Debug)]
struct Cx {
    size: u64,
    read_only: bool,
    /// 0 simple, 1 structured, 2 (and up) extended headers.
    replies: u8,
    meta_context: bool,
    max_request: u32,
}

fn style(code: u8) -> ReplyStyle {
    match code {
        0 => ReplyStyle::Simple,
        1 => ReplyStyle::Structured,
        _ => ReplyStyle::Extended,
    }
}

#[derive(Arbitrary, Debug)]
struct Extents {
    offset: u64,
    len: u64,
    req_one: bool,
    extents: Vec<(u32, u32, u8)>,
}

/// Framing: what follows a parsed header on the wire.
fn check_framing(h: &RequestHeader, extended: bool) {
    let carries = h.cmd == CMD_WRITE || (extended && h.flags & CMD_FLAG_PAYLOAD_LEN != 0);
    let want = if carries { h.len } else { 0 };
    assert_eq!(u64::from(h.payload), want, "{h:?}");
}

fn request(data: &[u8], cx: &Cx) {
    let replies = style(cx.replies);
    let extended = replies == ReplyStyle::Extended;
    let parsed = if extended {
        parse_extended_request_header(data)
    } else {
        parse_request_header(data)
    };
    let Ok(h) = parsed else {
        return;
    };
    check_framing(&h, extended);
    let cx = TransmissionContext {
        size: cx.size,
        read_only: cx.read_only,
        replies,
        meta_context: cx.meta_context,
        max_request: cx.max_request,
    };
    let end = |o: u64, l: u64| o.checked_add(l).is_some_and(|e| e <= cx.size);
    match check_request(&h, &cx) {
        Ok(Command::Read { offset, len }) => {
            assert!(len <= cx.max_request && end(offset, len.into()));
        }
        Ok(Command::Write { offset, len, .. }) => {
            assert!(!cx.read_only && len <= cx.max_request && end(offset, len.into()));
            assert_eq!(len, h.payload, "a write is its payload");
        }
        Ok(Command::Trim { offset, len, .. }) | Ok(Command::WriteZeroes { offset, len, .. }) => {
            assert!(!cx.read_only && end(offset, len) && h.payload == 0);
        }
        Ok(Command::BlockStatus { offset, len, .. }) => {
            assert!(replies.chunked() && cx.meta_context && len > 0 && end(offset, len));
            assert_eq!(h.payload, 0);
        }
        Ok(Command::Flush) => assert!(h.offset == 0 && h.len == 0),
        Ok(Command::Disconnect) => assert_eq!(h.cmd, CMD_DISC),
        Err(r) => {
            assert_eq!(r.drain, h.payload);
            assert!(r.errno != 0);
            let to = ReplyTo {
                handle: h.handle,
                offset: h.offset,
            };
            let mut out = Vec::new();
            encode_error(&mut out, replies, to, r.errno, r.why);
            check_chunk(&out, replies);
        }
    }
}

/// A chunk's length field must count exactly the bytes after its header.
fn check_chunk(out: &[u8], replies: ReplyStyle) {
    let magic = u32::from_be_bytes(out[..4].try_into().unwrap());
    let (head, len) = match magic {
        SIMPLE_REPLY_MAGIC => return assert_eq!(out.len(), 16),
        STRUCTURED_REPLY_MAGIC => (20, u64::from(u32::from_be_bytes(out[16..20].try_into().unwrap()))),
        EXTENDED_REPLY_MAGIC => (32, u64::from_be_bytes(out[24..32].try_into().unwrap())),
        other => panic!("bad reply magic {other:#x}"),
    };
    assert_eq!(magic == EXTENDED_REPLY_MAGIC, replies == ReplyStyle::Extended);
    assert_eq!((out.len() - head) as u64, len);
}

fn descriptors(e: Extents, replies: ReplyStyle) {
    // The server asks for extents of a request that passed check_request,
    // so offset + len does not overflow.
    if e.offset.checked_add(e.len).is_none() || e.len == 0 {
        return;
    }
    let mut pos = e.offset;
    let ext: Vec<(u64, u64, u32)> = e
        .extents
        .iter()
        .take(2048)
        .map(|(gap, l, f)| {
            let o = pos.saturating_add(u64::from(*gap % 4 == 0) * u64::from(*gap));
            // Some extents past 4 GiB, as the engine gives for an origin.
            let l = u64::from(*l) << (f / 4 % 8 * 4);
            pos = o.saturating_add(l);
            (o, l, u32::from(*f % 4))
        })
        .collect();
    // changed-since: the triples cover [offset, end) exactly, changes kept.
    let end = e.offset + e.len;
    let ranges: Vec<(u64, u64)> = ext.iter().map(|&(o, l, _)| (o, l)).collect();
    let t = changed_triples(e.offset, end, &ranges);
    assert!(t.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0), "gap or overlap");
    assert!(t.first().is_none_or(|f| f.0 == e.offset) && t.last().is_none_or(|l| l.0 + l.1 == end));
    let d = extents_to_descriptors(e.offset, e.len, &ext, e.req_one);
    assert!(!d.is_empty());
    assert!(d.len() <= if e.req_one { 1 } else { MAX_DESCRIPTORS });
    let total = d.iter().try_fold(0u64, |sum, (l, _)| sum.checked_add(*l));
    assert!(total.is_some_and(|t| t <= e.len), "descriptors overrun the request");
    assert!(d.iter().all(|(l, _)| *l > 0), "zero-length descriptor");
    let to = ReplyTo {
        handle: 1,
        offset: e.offset,
    };
    let mut out = Vec::new();
    // A simple connection never gets block status; given one, the
    // encoder writes the compact chunk, which check_chunk accepts.
    encode_block_status(&mut out, replies, to, BASE_ALLOCATION_ID, &d);
    check_chunk(&out, replies);
}

fn encoders(rest: &[u8], replies: ReplyStyle) {
    let mut u = Unstructured::new(rest);
    let (Ok(handle), Ok(offset), Ok(len), Ok(errno)) = (
        u64::arbitrary(&mut u),
        u64::arbitrary(&mut u),
        u32::arbitrary(&mut u),
        u32::arbitrary(&mut u),
    ) else {
        return;
    };
    let message = std::str::from_utf8(u.take_rest()).unwrap_or("not UTF-8");
    let to = ReplyTo { handle, offset };
    let mut out = Vec::new();
    encode_error(&mut out, replies, to, errno, message);
    check_chunk(&out, replies);
    out.clear();
    encode_done(&mut out, replies, to);
    check_chunk(&out, replies);
    out.clear();
    // The `len` bytes of data follow the head, so its length field counts
    // them (saturating in the compact field, as a READ never gets there).
    encode_read_head(&mut out, replies, to, len);
    let data = u64::from(len) + 8;
    match replies {
        ReplyStyle::Simple => assert_eq!(out.len(), 16),
        _ if len == 0 => check_chunk(&out, replies),
        ReplyStyle::Structured => {
            assert_eq!(out.len(), 28);
            let field = u32::from_be_bytes(out[16..20].try_into().unwrap());
            assert_eq!(u64::from(field), data.min(u32::MAX.into()));
        }
        ReplyStyle::Extended => {
            assert_eq!(out.len(), 40);
            assert_eq!(u64::from_be_bytes(out[24..32].try_into().unwrap()), data);
            assert_eq!(out[32..], offset.to_be_bytes());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 6 {
        0 => {
            if let Ok(h) = parse_option_header(rest) {
                let body = &rest[16.min(rest.len())..];
                let n = (h.len as usize).min(body.len());
                if h.len <= MAX_OPTION_LEN {
                    let _ = parse_option(h.option, &body[..n]);
                }
            }
        }
        1 => {
            // Option payload for one of the known options (or any code).
            let Some((&o, payload)) = rest.split_first() else {
                return;
            };
            let option = match o % 12 {
                11 => u32::from(o),
                c => u32::from(c),
            };
            match parse_option(option, payload) {
                Ok(ClientOption::Info { name, requests, .. }) => {
                    assert!(name.len() <= MAX_STRING && !name.contains('\0'));
                    assert!(requests.len() * 2 + 6 + name.len() == payload.len());
                }
                Ok(ClientOption::MetaContext { name, queries, set }) => {
                    assert!(name.len() <= MAX_STRING);
                    for q in &queries {
                        let _ = query_matches_base_allocation(q, !set);
                    }
                }
                Ok(ClientOption::ExportName(n)) => {
                    assert!(n.len() <= MAX_STRING);
                    let _ = snapmv_nbd::exports::parse_export_name(&n);
                }
                Ok(ClientOption::ExtendedHeaders) => assert!(payload.is_empty()),
                _ => {}
            }
        }
        2 => {
            let mut u = Unstructured::new(rest);
            let Ok(cx) = Cx::arbitrary(&mut u) else { return };
            let (len, magic) = match style(cx.replies) {
                ReplyStyle::Extended => (EXTENDED_REQUEST_HEADER_LEN, EXTENDED_REQUEST_MAGIC),
                _ => (REQUEST_HEADER_LEN, REQUEST_MAGIC),
            };
            let hdr = u.bytes(len.min(u.len())).unwrap_or(&[]);
            let mut h = [0u8; EXTENDED_REQUEST_HEADER_LEN];
            h[..hdr.len()].copy_from_slice(hdr);
            if sel & 0x80 != 0 {
                h[..4].copy_from_slice(&magic.to_be_bytes());
                request(&h[..len], &cx);
            } else {
                request(hdr, &cx);
            }
        }
        3 => {
            let u = Unstructured::new(rest);
            if let Ok(e) = Extents::arbitrary_take_rest(u) {
                descriptors(e, style(sel / 6 % 3));
            }
        }
        4 => {
            if let Ok(s) = std::str::from_utf8(rest) {
                let _ = query_matches_base_allocation(s, sel & 0x80 != 0);
                if let Ok(MetaQuery::Exact(c)) = parse_meta_query(s) {
                    // A selectable context's name parses back to itself.
                    assert_eq!(parse_meta_query(&c.name()), Ok(MetaQuery::Exact(c)));
                }
                let _ = snapmv_nbd::exports::parse_export_name(s);
                let cut = truncate_str(s, (sel as usize) % 8);
                assert!(cut.len() <= (sel as usize) % 8 && s.starts_with(cut));
                let _ = info_string(INFO_DESCRIPTION, s);
            }
        }
        _ => {
            if rest.len() >= 12 {
                let size = u64::from_be_bytes(rest[..8].try_into().unwrap());
                let flags = u16::from_be_bytes([rest[8], rest[9]]);
                let _ = info_export(size, flags);
                let errno = i32::from_be_bytes(rest[8..12].try_into().unwrap());
                let _ = wire_errno(errno);
                let _ = option_reply(u32::from(flags), REP_ACK, &rest[12..]);
            }
            encoders(rest, style(sel / 6 % 3));
        }
    }
});
