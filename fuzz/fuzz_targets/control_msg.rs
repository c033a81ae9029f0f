//! Control-socket messages.
//!
//! The control socket lives in the `snapmv` *binary* (nbd-frontend/src/
//! control/, with status.rs, operations.rs, route.rs, diff.rs, admin.rs
//! and lock.rs), not in the
//! `snapmv-nbd` lib, so nothing outside the binary can call it. This target
//! compiles those modules in place (`#[path]`, unmodified) and drives them
//! the way `serve_conn` does:
//!
//! - mode 0 (raw): the input is the client's byte stream; it is cut into
//!   lines exactly as `serve_conn` cuts them (at most `MAX_LINE` bytes),
//!   each line is parsed as a `Request` and, if it parses, executed by
//!   `control::handle_request` against a fresh store (origins `o`, `p`; snapshots
//!   1, 2 of `o`). Every reply must serialise to one line, and the client
//!   side must parse that line back to the same `Reply`.
//! - mode 1 (structured): requests built from fuzzer-chosen fields (ids,
//!   tags, memos), so the handler paths get explored without JSON syntax.
//! - mode 2: the client's side: an arbitrary line parsed as a `Reply` and,
//!   if it is a status, rendered as `list` and `list --json` would.
//! - mode 3: an arbitrary engine `Status` (as a damaged device may report
//!   it) rendered through `StatusWire`, table and JSON.
#![no_main]
#![allow(dead_code, unused_imports)]

#[path = "../../nbd-frontend/src/admin.rs"]
mod admin;
#[path = "../../nbd-frontend/src/control/mod.rs"]
mod control;
#[path = "../../nbd-frontend/src/diff.rs"]
mod diff;
#[path = "../../nbd-frontend/src/lock.rs"]
mod lock;
#[path = "../../nbd-frontend/src/operations.rs"]
mod operations;
#[path = "../../nbd-frontend/src/route.rs"]
mod route;
#[path = "../../nbd-frontend/src/status.rs"]
mod status;

use arbitrary::{Arbitrary, Unstructured};
use control::{Reply, Request};
use libfuzzer_sys::fuzz_target;
use snapmv_engine::store::{
    Dev, OriginStatus, RollbackStatus, SnapshotStatus, Status, Store,
};
use snapmv_fuzz::*;
use std::sync::OnceLock;

struct Base {
    cow: Vec<u8>,
    origins: Vec<(String, Vec<u8>)>,
}

fn base() -> &'static Base {
    static B: OnceLock<Base> = OnceLock::new();
    B.get_or_init(|| {
        let (cow, s) = fresh_store(3 << 20);
        let o = origin_dev(8 * 4096, 1);
        let p = origin_dev(3 * 4096, 2);
        s.bind("o", "/dev/o", o.clone(), 1).unwrap();
        s.bind("p", "/dev/p", p.clone(), 1).unwrap();
        let t = s.snapshot("o", None, "one", 2).unwrap();
        s.volume("o", None).unwrap().write(0, &pattern(5000, 3), false).unwrap();
        s.snapshot("o", Some(t), "two", 3).unwrap();
        s.close().unwrap();
        Base {
            cow: image_of(&*cow),
            origins: vec![("o".into(), image_of(&*o)), ("p".into(), image_of(&*p))],
        }
    })
}

fn fresh() -> Store {
    let b = base();
    let origins: Vec<_> = b
        .origins
        .iter()
        .map(|(id, img)| (id.clone(), dev_from_image(img)))
        .collect();
    let mut r = resolver(&origins, false);
    let s = Store::open(dev_from_image(&b.cow) as Dev, &mut r).expect("open fixture");
    s
}

/// Execute one request and check the reply's trip over the wire.
fn serve_one(store: &Store, req: Request) {
    let reply = control::handle_request(req, store, "/fuzz/cow.img");
    // What `send` writes: one JSON object and a newline, no newline inside.
    let line = serde_json::to_vec(&reply).expect("reply serialises");
    assert!(!line.contains(&b'\n'), "reply line contains a newline");
    let back: Reply = serde_json::from_slice(&line).expect("client parses the server's reply");
    assert_eq!(back, reply, "reply round trip");
    if let Reply::Status(s) = &back {
        let _ = s.to_table();
        let _ = s.to_json();
    }
    let _ = store.step_background(4);
}

#[derive(Arbitrary, Debug)]
enum SReq {
    Hello,
    List,
    Snapshot { origin: u8, of: Option<u8>, memo: String },
    Delete { origin: u8, tag: u8 },
    Rollback { origin: u8, tag: u8 },
    Raw(String),
}

fn origin_name(sel: u8) -> String {
    match sel % 6 {
        0 => "o".into(),
        1 => "p".into(),
        2 => "".into(),
        3 => "o@1".into(),
        4 => "x".repeat(200),
        _ => format!("n{sel}"),
    }
}

fn tag(sel: u8) -> u64 {
    match sel {
        250 => 0,
        251 => u64::MAX,
        s => u64::from(s % 8),
    }
}

#[derive(Arbitrary, Debug)]
struct ArbStatus {
    chunk_size: u32,
    chunks_total: u64,
    chunks_used: u64,
    status: String,
    cleaning: bool,
    rollback: Option<(String, u64, u64, u64)>,
    /// id, path, size, created, snapshots, absent.
    origins: Vec<(
        String,
        String,
        u64,
        i64,
        Vec<(u64, Option<u64>, i64, String, u64)>,
        Option<String>,
    )>,
}

fn status_case(a: ArbStatus) {
    let s = Status {
        chunk_size: a.chunk_size,
        chunks_total: a.chunks_total,
        chunks_used: a.chunks_used,
        status: a.status,
        cleaning: a.cleaning,
        rollback: a.rollback.map(|(origin, tag, done_chunks, total_chunks)| RollbackStatus {
            origin,
            tag,
            done_chunks,
            total_chunks,
        }),
        origins: a
            .origins
            .into_iter()
            .take(16)
            .map(|(id, path, size, created, snaps, absent)| OriginStatus {
                id,
                path,
                size,
                created,
                absent,
                snapshots: snaps
                    .into_iter()
                    .take(16)
                    .map(|(tag, parent, created, memo, own_chunks)| SnapshotStatus {
                        tag,
                        parent,
                        created,
                        memo,
                        own_chunks,
                        shared_chunks: own_chunks / 2,
                    })
                    .collect(),
            })
            .collect(),
    };
    let w = status::StatusWire::from_status("/fuzz/cow.img".into(), s);
    let _ = w.to_table();
    let j = w.to_json();
    let _ = serde_json::to_string(&j).expect("status JSON serialises");
    let line = serde_json::to_vec(&Reply::Status(w.clone())).expect("status reply serialises");
    let back: Reply = serde_json::from_slice(&line).expect("status reply parses back");
    assert_eq!(back, Reply::Status(w));
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            let store = fresh();
            // serve_conn's framing: lines of at most MAX_LINE bytes; a longer
            // one ends the connection.
            for line in rest.split_inclusive(|b| *b == b'\n').take(32) {
                if line.len() > control::MAX_LINE {
                    break;
                }
                if line.last() != Some(&b'\n') {
                    break; // an unfinished line at EOF is dropped
                }
                match serde_json::from_slice::<Request>(line) {
                    Ok(req) => {
                        // What parses must serialise back to an equal request.
                        let again = serde_json::to_vec(&req).unwrap();
                        let r2: Request = serde_json::from_slice(&again).unwrap();
                        assert_eq!(r2, req);
                        serve_one(&store, req)
                    }
                    Err(e) => {
                        let reply = Reply::Error {
                            message: format!("malformed request: {e}"),
                        };
                        let l = serde_json::to_vec(&reply).unwrap();
                        let _: Reply = serde_json::from_slice(&l).unwrap();
                    }
                }
            }
            let _ = store.close();
        }
        1 => {
            let u = Unstructured::new(rest);
            let Ok(reqs) = Vec::<SReq>::arbitrary_take_rest(u) else {
                return;
            };
            let store = fresh();
            for r in reqs.into_iter().take(24) {
                let req = match r {
                    SReq::Hello => Request::Hello,
                    SReq::List => Request::List,
                    SReq::Snapshot { origin, of, memo } => Request::Snapshot {
                        origin: origin_name(origin),
                        of: of.map(tag),
                        memo,
                    },
                    SReq::Delete { origin, tag: t } => Request::Delete {
                        origin: origin_name(origin),
                        tag: tag(t),
                    },
                    SReq::Rollback { origin, tag: t } => Request::Rollback {
                        origin: origin_name(origin),
                        tag: tag(t),
                    },
                    SReq::Raw(s) => match serde_json::from_str::<Request>(&s) {
                        Ok(r) => r,
                        Err(_) => continue,
                    },
                };
                serve_one(&store, req);
            }
            let _ = store.close();
        }
        2 => {
            if let Ok(reply) = serde_json::from_slice::<Reply>(rest) {
                if let Reply::Status(s) = &reply {
                    let _ = s.to_table();
                    let _ = s.to_json();
                }
                let again = serde_json::to_vec(&reply).unwrap();
                let back: Reply = serde_json::from_slice(&again).unwrap();
                assert_eq!(back, reply);
            }
        }
        _ => {
            let u = Unstructured::new(rest);
            if let Ok(a) = ArbStatus::arbitrary_take_rest(u) {
                status_case(a);
            }
        }
    }
});
