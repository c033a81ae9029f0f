//! The NBD frontend's pure protocol functions (`snapmv_nbd::nbd::proto`):
//! option header and option payload parsing, request header parsing and
//! checking against an arbitrary negotiated context, meta-context query
//! matching, and the BLOCK_STATUS descriptor builder. Never a panic; and
//! the properties the server relies on are asserted:
//! - a request accepted by `check_request` lies inside the export, within
//!   `max_request` for READ/WRITE, and respects read-only;
//! - a rejected WRITE drains exactly its payload length;
//! - descriptors cover the request from its start without overrunning it,
//!   have no zero lengths, and respect `req_one` / `MAX_DESCRIPTORS`.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use snapmv_nbd::nbd::proto::*;

#[derive(Arbitrary, Debug)]
struct Cx {
    size: u64,
    read_only: bool,
    structured: bool,
    meta_context: bool,
    max_request: u32,
}

#[derive(Arbitrary, Debug)]
struct Extents {
    offset: u64,
    len: u32,
    req_one: bool,
    extents: Vec<(u32, u32, u8)>,
}

fn request(data: &[u8], cx: &Cx) {
    let Ok(h) = parse_request_header(data) else {
        return;
    };
    let cx = TransmissionContext {
        size: cx.size,
        read_only: cx.read_only,
        structured: cx.structured,
        meta_context: cx.meta_context,
        max_request: cx.max_request,
    };
    let end = |o: u64, l: u32| o.checked_add(u64::from(l)).is_some_and(|e| e <= cx.size);
    match check_request(&h, &cx) {
        Ok(Command::Read { offset, len }) => {
            assert!(len <= cx.max_request && end(offset, len));
        }
        Ok(Command::Write { offset, len, .. }) => {
            assert!(!cx.read_only && len <= cx.max_request && end(offset, len));
        }
        Ok(Command::Trim { offset, len, .. }) | Ok(Command::WriteZeroes { offset, len, .. }) => {
            assert!(!cx.read_only && end(offset, len));
        }
        Ok(Command::BlockStatus { offset, len, .. }) => {
            assert!(cx.structured && cx.meta_context && len > 0 && end(offset, len));
        }
        Ok(Command::Flush) => assert!(h.offset == 0 && h.len == 0),
        Ok(Command::Disconnect) => assert_eq!(h.cmd, CMD_DISC),
        Err(r) => {
            assert_eq!(r.drain, if h.cmd == CMD_WRITE { h.len } else { 0 });
            assert!(r.errno != 0);
            let _ = structured_error(h.handle, r.errno, r.why);
            let _ = simple_reply_header(r.errno, h.handle);
        }
    }
}

fn descriptors(e: Extents) {
    // The server asks for extents of a request that passed check_request,
    // so offset + len does not overflow.
    if e.offset.checked_add(u64::from(e.len)).is_none() || e.len == 0 {
        return;
    }
    let mut pos = e.offset;
    let ext: Vec<(u64, u64, u32)> = e
        .extents
        .iter()
        .take(2048)
        .map(|(gap, l, f)| {
            let o = pos.saturating_add(u64::from(*gap % 4 == 0) * u64::from(*gap));
            pos = o.saturating_add(u64::from(*l));
            (o, u64::from(*l), u32::from(*f % 4))
        })
        .collect();
    let d = extents_to_descriptors(e.offset, e.len, &ext, e.req_one);
    assert!(!d.is_empty());
    assert!(d.len() <= if e.req_one { 1 } else { MAX_DESCRIPTORS });
    let total: u64 = d.iter().map(|(l, _)| u64::from(*l)).sum();
    assert!(total <= u64::from(e.len), "descriptors overrun the request");
    assert!(d.iter().all(|(l, _)| *l > 0), "zero-length descriptor");
    let _ = block_status_chunk(1, BASE_ALLOCATION_ID, &d);
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
                _ => {}
            }
        }
        2 => {
            let mut u = Unstructured::new(rest);
            let Ok(cx) = Cx::arbitrary(&mut u) else { return };
            let hdr = u.bytes(REQUEST_HEADER_LEN.min(u.len())).unwrap_or(&[]);
            let mut h = [0u8; REQUEST_HEADER_LEN];
            h[..hdr.len()].copy_from_slice(hdr);
            if sel & 0x80 != 0 {
                h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
                request(&h, &cx);
            } else {
                request(hdr, &cx);
            }
        }
        3 => {
            let u = Unstructured::new(rest);
            if let Ok(e) = Extents::arbitrary_take_rest(u) {
                descriptors(e);
            }
        }
        4 => {
            if let Ok(s) = std::str::from_utf8(rest) {
                let _ = query_matches_base_allocation(s, sel & 0x80 != 0);
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
                let _ = offset_data_header(1, size, u32::from(flags) << 16);
                let _ = option_reply(u32::from(flags), REP_ACK, &rest[12..]);
            }
        }
    }
});
