//! The status a `list` shows, in one wire form shared by the offline path
//! and the control socket, so the table and the JSON come out identical
//! whichever way the status was obtained.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use snapmv_engine::store::{RollbackStatus, Status};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StatusWire {
    /// Canonical path of the COW device (shown above the table).
    pub cow: String,
    pub chunk_size: u32,
    pub chunks_total: u64,
    pub chunks_used: u64,
    pub status: String,
    pub cleaning: bool,
    pub rollback: Option<RollbackWire>,
    pub origins: Vec<OriginWire>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RollbackWire {
    pub origin: String,
    pub tag: u64,
    pub done_chunks: u64,
    pub total_chunks: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct OriginWire {
    pub id: String,
    pub path: String,
    pub size: u64,
    /// Unix seconds (bind time).
    pub created: i64,
    pub snapshots: Vec<SnapshotWire>,
    /// Why the origin's device could not be opened, when an offline `list`
    /// went on without it (it needs only the COW device). A server never
    /// runs without its origins, so the field is absent from its replies:
    /// hence the default.
    #[serde(default)]
    pub device_error: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SnapshotWire {
    pub tag: u64,
    pub parent: Option<u64>,
    /// Unix seconds; kept numeric on the wire so the table and the JSON can
    /// each format it without parsing a string back.
    pub created: i64,
    pub memo: String,
    pub own_chunks: u64,
    /// Absent from an older server's replies: hence the default.
    #[serde(default)]
    pub shared_chunks: u64,
}

impl From<RollbackStatus> for RollbackWire {
    fn from(r: RollbackStatus) -> RollbackWire {
        RollbackWire {
            origin: r.origin,
            tag: r.tag,
            done_chunks: r.done_chunks,
            total_chunks: r.total_chunks,
        }
    }
}

impl StatusWire {
    pub fn from_status(cow: String, s: Status) -> StatusWire {
        StatusWire {
            cow,
            chunk_size: s.chunk_size,
            chunks_total: s.chunks_total,
            chunks_used: s.chunks_used,
            status: s.status,
            cleaning: s.cleaning,
            rollback: s.rollback.map(RollbackWire::from),
            origins: s
                .origins
                .into_iter()
                .map(|o| OriginWire {
                    id: o.id,
                    path: o.path,
                    size: o.size,
                    created: o.created,
                    device_error: o.absent,
                    snapshots: o
                        .snapshots
                        .into_iter()
                        .map(|s| SnapshotWire {
                            tag: s.tag,
                            parent: s.parent,
                            created: s.created,
                            memo: s.memo,
                            own_chunks: s.own_chunks,
                            shared_chunks: s.shared_chunks,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// The `list --json` object, exactly the documented schema (built by
    /// hand rather than derived so internal fields never leak into it).
    pub fn to_json(&self) -> Value {
        json!({
            "chunk_size": self.chunk_size,
            "chunks_total": self.chunks_total,
            "chunks_used": self.chunks_used,
            "chunks_free": self.chunks_total.saturating_sub(self.chunks_used),
            "status": self.status,
            "cleaning": self.cleaning,
            "rollback": self.rollback.as_ref().map(|r| json!({
                "origin": r.origin,
                "tag": r.tag,
                "done_chunks": r.done_chunks,
                "total_chunks": r.total_chunks,
            })),
            "origins": self.origins.iter().map(|o| json!({
                "id": o.id,
                "path": o.path,
                "size": o.size,
                "device_missing": o.device_error.is_some(),
                "device_error": o.device_error,
                "snapshots": o.snapshots.iter().map(|s| json!({
                    "tag": s.tag,
                    "parent": s.parent,
                    "created": rfc3339(s.created),
                    "memo": s.memo,
                    "own_chunks": s.own_chunks,
                    "shared_chunks": s.shared_chunks,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }

    /// The `list` table, after `dms list`: a header block describing the COW
    /// device, then one block per origin. Times are UTC so the output does
    /// not depend on the reader's time zone.
    pub fn to_table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let snaps: usize = self.origins.iter().map(|o| o.snapshots.len()).sum();
        let pages = self.chunk_size / 4096;
        // Writing to a String cannot fail; the results are ignored on purpose.
        let _ = writeln!(out, "cow-device    : {}", self.cow);
        let _ = writeln!(
            out,
            "chunk-size    : {} bytes ({} page(s))",
            self.chunk_size, pages
        );
        let _ = writeln!(
            out,
            "used-chunks   : {}% ({}/{})",
            percent(self.chunks_used, self.chunks_total),
            self.chunks_used,
            self.chunks_total
        );
        let _ = writeln!(
            out,
            "free-chunks   : {}",
            self.chunks_total.saturating_sub(self.chunks_used)
        );
        let _ = writeln!(
            out,
            "versions      : {} ({} origin(s), {} snapshot(s))",
            self.origins.len() + snaps,
            self.origins.len(),
            snaps
        );
        let _ = writeln!(out, "cow-status    : {}", self.status);
        let _ = writeln!(
            out,
            "cleaning      : {}",
            if self.cleaning { "yes" } else { "no" }
        );
        match &self.rollback {
            None => {
                let _ = writeln!(out, "rollbacking   : no");
            }
            Some(r) => {
                let _ = writeln!(
                    out,
                    "rollbacking   : yes, snapshot {} onto origin {} ({}/{} chunks, {}%)",
                    r.tag,
                    r.origin,
                    r.done_chunks,
                    r.total_chunks,
                    percent(r.done_chunks, r.total_chunks)
                );
            }
        }
        for o in &self.origins {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "origin-device : {} ({}, {} bytes)",
                o.id, o.path, o.size
            );
            if let Some(e) = &o.device_error {
                // The frontend's reason names the path it tried.
                let _ = writeln!(out, "device        : missing ({e})");
            }
            // Column widths grow with the largest value so big tags and
            // chunk counts stay aligned.
            let tag_w = o
                .snapshots
                .iter()
                .map(|s| s.tag.to_string().len())
                .max()
                .unwrap_or(0)
                .max(3);
            let par_w = o
                .snapshots
                .iter()
                .filter_map(|s| s.parent)
                .map(|p| p.to_string().len())
                .max()
                .unwrap_or(0)
                .max(6);
            let own_w = width(o.snapshots.iter().map(|s| s.own_chunks), 3);
            let sh_w = width(o.snapshots.iter().map(|s| s.shared_chunks), 6);
            let _ = writeln!(
                out,
                "YYYY/MM/DD HH:MM:SS  {:>tag_w$}  {:>par_w$}  {:>own_w$}  {:>sh_w$}  Memo",
                "Tag", "Parent", "Own", "Shared"
            );
            let _ = writeln!(
                out,
                "{}  {:>tag_w$}  {:>par_w$}  {:>own_w$}  {:>sh_w$}  {:?}",
                table_time(o.created),
                0,
                ".",
                ".",
                ".",
                "ORIGIN"
            );
            for s in &o.snapshots {
                let parent = s.parent.map_or_else(|| ".".to_string(), |p| p.to_string());
                // Debug formatting quotes the memo and escapes control
                // characters, so a memo cannot garble the terminal.
                let _ = writeln!(
                    out,
                    "{}  {:>tag_w$}  {:>par_w$}  {:>own_w$}  {:>sh_w$}  {:?}",
                    table_time(s.created),
                    s.tag,
                    parent,
                    s.own_chunks,
                    s.shared_chunks,
                    s.memo
                );
            }
        }
        out
    }
}

/// Column width: the widest value, at least `min`.
fn width(values: impl Iterator<Item = u64>, min: usize) -> usize {
    values
        .map(|v| v.to_string().len())
        .max()
        .unwrap_or(0)
        .max(min)
}

fn percent(part: u64, total: u64) -> u64 {
    if total == 0 {
        0
    } else {
        ((part as u128 * 100) / total as u128) as u64
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Unix seconds to UTC (year, month, day, hour, minute, second).
fn utc(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400) as u32;
    let (y, m, d) = civil_from_days(days);
    (y, m, d, sod / 3600, sod / 60 % 60, sod % 60)
}

/// RFC 3339 timestamp in UTC, e.g. `2010-10-19T21:41:28Z`.
pub fn rfc3339(secs: i64) -> String {
    let (y, mo, d, h, mi, s) = utc(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `dms list` style time: `2010/10/19 21:41:28` (UTC).
fn table_time(secs: i64) -> String {
    let (y, mo, d, h, mi, s) = utc(secs);
    format!("{y:04}/{mo:02}/{d:02} {h:02}:{mi:02}:{s:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        // The dm-snap-mv example's snap1: 2010/10/19 21:41:28 UTC.
        assert_eq!(rfc3339(1_287_524_488), "2010-10-19T21:41:28Z");
        // Leap day and the end of a leap year.
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(table_time(1_287_524_488), "2010/10/19 21:41:28");
    }

    #[test]
    fn civil_round_trip_matches_day_count() {
        // Walk 800 years day by day and check the calendar advances by
        // exactly one day each step.
        let mut prev = civil_from_days(-146_097);
        for z in -146_096..146_097 {
            let cur = civil_from_days(z);
            let next_day = if cur.2 == 1 {
                cur.1 == prev.1 % 12 + 1
            } else {
                cur.1 == prev.1 && cur.2 == prev.2 + 1
            };
            assert!(next_day, "day {z}: {prev:?} -> {cur:?}");
            prev = cur;
        }
    }

    fn sample() -> StatusWire {
        StatusWire {
            cow: "/tmp/cow.img".into(),
            chunk_size: 65536,
            chunks_total: 1000,
            chunks_used: 10,
            status: "valid".into(),
            cleaning: false,
            rollback: Some(RollbackWire {
                origin: "orig".into(),
                tag: 2,
                done_chunks: 1,
                total_chunks: 4,
            }),
            origins: vec![OriginWire {
                id: "orig".into(),
                path: "/dev/sdb1".into(),
                size: 1 << 30,
                created: 1_287_524_317,
                device_error: None,
                snapshots: vec![
                    SnapshotWire {
                        tag: 1,
                        parent: None,
                        created: 1_287_524_488,
                        memo: "snap1".into(),
                        own_chunks: 5,
                        shared_chunks: 2,
                    },
                    SnapshotWire {
                        tag: 2,
                        parent: Some(1),
                        created: 1_287_524_577,
                        memo: "snap2".into(),
                        own_chunks: 5,
                        shared_chunks: 2,
                    },
                ],
            }],
        }
    }

    #[test]
    fn table_looks_like_dms_list() {
        let t = sample().to_table();
        assert!(t.contains("used-chunks   : 1% (10/1000)"), "{t}");
        assert!(t.contains("versions      : 3 (1 origin(s), 2 snapshot(s))"));
        assert!(t.contains("YYYY/MM/DD HH:MM:SS  Tag  Parent  Own  Shared  Memo"));
        assert!(t.contains("free-chunks   : 990"), "{t}");
        assert!(
            t.contains("2010/10/19 21:38:37    0       .    .       .  \"ORIGIN\""),
            "{t}"
        );
        assert!(
            t.contains("2010/10/19 21:41:28    1       .    5       2  \"snap1\""),
            "{t}"
        );
        assert!(
            t.contains("2010/10/19 21:42:57    2       1    5       2  \"snap2\""),
            "{t}"
        );
        assert!(t.contains("rollbacking   : yes, snapshot 2 onto origin orig (1/4 chunks, 25%)"));
        assert!(!t.contains("device        :"), "{t}");
    }

    #[test]
    fn a_missing_origin_device_is_marked() {
        let mut w = sample();
        w.origins[0].device_error =
            Some("/dev/sdb1: No such file or directory (os error 2)".into());
        let t = w.to_table();
        assert!(
            t.contains(
                "device        : missing (/dev/sdb1: No such file or directory (os error 2))"
            ),
            "{t}"
        );
        // The snapshots are listed all the same.
        assert!(t.contains("\"snap2\""), "{t}");
        let v = w.to_json();
        assert_eq!(v["origins"][0]["device_missing"], true);
        assert_eq!(
            v["origins"][0]["device_error"],
            "/dev/sdb1: No such file or directory (os error 2)"
        );
        assert_eq!(sample().to_json()["origins"][0]["device_missing"], false);
        assert_eq!(
            sample().to_json()["origins"][0]["device_error"],
            Value::Null
        );
    }

    #[test]
    fn a_reply_without_device_error_parses() {
        // An older server's reply has no device_error field.
        let mut v = serde_json::to_value(sample()).unwrap();
        v["origins"][0]
            .as_object_mut()
            .unwrap()
            .remove("device_error");
        let w: StatusWire = serde_json::from_value(v).unwrap();
        assert_eq!(w, sample());
    }

    #[test]
    fn json_has_exactly_the_schema() {
        let v = sample().to_json();
        let keys: Vec<_> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        assert_eq!(
            keys,
            [
                "chunk_size",
                "chunks_free",
                "chunks_total",
                "chunks_used",
                "cleaning",
                "origins",
                "rollback",
                "status"
            ]
        );
        assert_eq!(v["origins"][0]["snapshots"][1]["parent"], 1);
        assert_eq!(v["origins"][0]["snapshots"][0]["parent"], Value::Null);
        assert_eq!(
            v["origins"][0]["snapshots"][0]["created"],
            "2010-10-19T21:41:28Z"
        );
    }
}
