//! The control socket's wire format: one JSON object per line each way
//! (see the module above for the exchange), and a line reader that never
//! buffers more than its bound.

use crate::status::{RollbackWire, StatusWire};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Read, Write};

/// Largest request line. Requests are tiny.
pub const MAX_LINE: usize = 64 * 1024;
/// Largest reply line: a `list` reply carries the whole status, which grows
/// with the snapshot count (about 110 bytes a snapshot).
pub const MAX_REPLY_LINE: usize = 256 << 20;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Hello,
    List,
    Snapshot {
        origin: String,
        of: Option<u64>,
        memo: String,
    },
    Delete {
        origin: String,
        tag: u64,
    },
    Rollback {
        origin: String,
        tag: u64,
    },
    /// One page of the byte ranges where versions `from` and `to` of
    /// `origin` (null: the origin itself) may differ, from byte `offset`
    /// to the end (`Reply::Diff`); the client asks again from its `end`.
    Diff {
        origin: String,
        from: Option<u64>,
        to: Option<u64>,
        #[serde(default)]
        offset: u64,
    },
    /// The rollback in progress, without the rest of the status. With
    /// `seen` (what an earlier reply said), the server answers only once
    /// the rollback is no longer there (it moved on, ended, or another
    /// one runs) or after `wait_ms` (capped by the server), so a client
    /// follows it with blocking calls instead of polling.
    RollbackProgress {
        #[serde(default)]
        seen: Option<RollbackWire>,
        #[serde(default)]
        wait_ms: u64,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Hello {
        pid: u32,
        cow: String,
        version: String,
    },
    Status(StatusWire),
    Tag {
        tag: u64,
    },
    Ok,
    Diff(DiffPage),
    /// `null` when no rollback is in progress.
    RollbackProgress {
        rollback: Option<RollbackWire>,
    },
    Error {
        message: String,
    },
}

/// A byte range of a diff.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentWire {
    pub offset: u64,
    pub length: u64,
}

/// One page of a diff (`Request::Diff`): extents from the request's
/// offset, ascending; every differing byte before `end` is in them. `end`
/// is the origin's `size` on the last page.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DiffPage {
    pub chunk_size: u32,
    pub size: u64,
    pub extents: Vec<ExtentWire>,
    pub end: u64,
}

/// Serialise `message` as one line into `buf` (reused across calls, so a
/// connection allocates once) and write it out in one call.
pub fn write_line<W: Write, T: Serialize>(
    w: &mut W,
    message: &T,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    buf.clear();
    serde_json::to_writer(&mut *buf, message).map_err(std::io::Error::other)?;
    buf.push(b'\n');
    w.write_all(buf)
}

/// What [`read_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A line, now in the buffer without its '\n'. A fragment cut short by
    /// the end of the stream counts as a line.
    Text,
    Eof,
    /// Longer than the bound: the rest of it cannot be skipped reliably.
    TooLong,
}

/// Read one '\n'-terminated line of at most `max` bytes into `buf`
/// (cleared first) without ever buffering more than `max + 1`.
pub fn read_line<R: BufRead>(r: &mut R, max: usize, buf: &mut Vec<u8>) -> std::io::Result<Line> {
    buf.clear();
    let n = r.by_ref().take(max as u64 + 1).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Line::Text);
    }
    if buf.len() > max {
        return Ok(Line::TooLong);
    }
    Ok(Line::Text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        let r: Request =
            serde_json::from_str(r#"{"op":"snapshot","origin":"o","of":3,"memo":"m"}"#).unwrap();
        assert_eq!(
            r,
            Request::Snapshot {
                origin: "o".into(),
                of: Some(3),
                memo: "m".into()
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"format"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"delete","origin":"o","tag":-1}"#).is_err()
        );
        assert_eq!(
            serde_json::to_string(&Reply::Ok).unwrap(),
            r#"{"reply":"ok"}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::Tag { tag: 7 }).unwrap(),
            r#"{"reply":"tag","tag":7}"#
        );
    }

    #[test]
    fn rollback_progress_wire_format() {
        let r: Request = serde_json::from_str(r#"{"op":"rollback_progress"}"#).unwrap();
        assert_eq!(
            r,
            Request::RollbackProgress {
                seen: None,
                wait_ms: 0
            }
        );
        let seen = RollbackWire {
            origin: "o".into(),
            tag: 2,
            done_chunks: 64,
            total_chunks: 256,
        };
        let line = serde_json::to_string(&Request::RollbackProgress {
            seen: Some(seen.clone()),
            wait_ms: 500,
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"op":"rollback_progress","seen":{"origin":"o","tag":2,"done_chunks":64,"total_chunks":256},"wait_ms":500}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::RollbackProgress { rollback: None }).unwrap(),
            r#"{"reply":"rollback_progress","rollback":null}"#
        );
    }

    #[test]
    fn diff_wire_format() {
        let r: Request =
            serde_json::from_str(r#"{"op":"diff","origin":"o","from":2,"to":null}"#).unwrap();
        assert_eq!(
            r,
            Request::Diff {
                origin: "o".into(),
                from: Some(2),
                to: None,
                offset: 0
            }
        );
        let page = Reply::Diff(DiffPage {
            chunk_size: 4096,
            size: 8192,
            extents: vec![ExtentWire {
                offset: 4096,
                length: 4096,
            }],
            end: 8192,
        });
        assert_eq!(
            serde_json::to_string(&page).unwrap(),
            r#"{"reply":"diff","chunk_size":4096,"size":8192,"extents":[{"offset":4096,"length":4096}],"end":8192}"#
        );
    }

    #[test]
    fn bounded_line_reader() {
        let mut buf = Vec::new();
        let mut r = std::io::Cursor::new(b"abc\ndef".to_vec());
        assert_eq!(read_line(&mut r, 10, &mut buf).unwrap(), Line::Text);
        assert_eq!(buf, b"abc");
        assert_eq!(read_line(&mut r, 10, &mut buf).unwrap(), Line::Text);
        assert_eq!(buf, b"def");
        assert_eq!(read_line(&mut r, 10, &mut buf).unwrap(), Line::Eof);
        let mut r = std::io::Cursor::new(vec![b'x'; 100]);
        assert_eq!(read_line(&mut r, 10, &mut buf).unwrap(), Line::TooLong);
    }

    #[test]
    fn lines_reuse_the_buffer() {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        write_line(&mut out, &Reply::Ok, &mut buf).unwrap();
        write_line(&mut out, &Reply::Tag { tag: 1 }, &mut buf).unwrap();
        assert_eq!(out, b"{\"reply\":\"ok\"}\n{\"reply\":\"tag\",\"tag\":1}\n");
    }
}
