//! The offline admin CLI, run as a separate process on temp files:
//! format, bind, snapshot, list (table and JSON), delete, unbind, check,
//! argument errors, and the exclusive lock.

mod cli_support;
use cli_support::*;
use serde_json::Value;
use std::os::fd::AsRawFd;

#[test]
fn format_refuses_a_formatted_device_without_force() {
    let f = Fixture::new();
    snapmv(&["format", s(&f.cow), "--chunk-size", "4096"]).ok();
    snapmv(&["format", s(&f.cow)]).fails_with(1, &[s(&f.cow), "--force"]);
    // The refused format left the store alone: still 4 KiB chunks.
    assert_eq!(f.list_json()["chunk_size"], 4096);
    snapmv(&["format", s(&f.cow), "--force"]).ok();
    assert_eq!(f.list_json()["chunk_size"], 65536);
    // Suffixes are accepted.
    snapmv(&["format", s(&f.cow), "--force", "--chunk-size", "1MiB"]).ok();
    assert_eq!(f.list_json()["chunk_size"], 1 << 20);
}

#[test]
fn format_argument_errors() {
    let f = Fixture::new();
    snapmv(&["format", s(&f.cow), "--chunk-size", "3000"]).fails_with(2, &["power of two"]);
    snapmv(&["format", s(&f.cow), "--chunk-size", "2M"]).fails_with(2, &["power of two"]);
    snapmv(&["format", s(&f.cow), "--bogus"]).fails_with(2, &["--bogus"]);
    let missing = f.path("nope.img");
    snapmv(&["format", s(&missing)]).fails_with(1, &[s(&missing), "does not exist"]);
    // Too small to hold a store: the engine's reason comes through.
    let tiny = f.path("tiny.img");
    sparse(&tiny, 64 << 10);
    snapmv(&["format", s(&tiny)]).fails_with(1, &[s(&tiny), "too small"]);
}

#[test]
fn bind_defaults_the_id_to_the_file_name() {
    let f = Fixture::new();
    snapmv(&["format", s(&f.cow)]).ok();
    snapmv(&["bind", s(&f.cow), s(&f.origin)]).ok();
    let second = f.path("second.img");
    sparse(&second, 4 << 20);
    snapmv(&["bind", s(&f.cow), s(&second), "--id", "data"]).ok();
    let v = f.list_json();
    let mut ids: Vec<&str> = v["origins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["data", "sdb1"]);
    // Binding an id twice, or a bad id, is refused with the id named.
    snapmv(&["bind", s(&f.cow), s(&second), "--id", "data"]).fails_with(1, &["data"]);
    snapmv(&["bind", s(&f.cow), s(&second), "--id", "a@b"]).fails_with(1, &["a@b", "'@'"]);
    let missing = f.path("missing");
    snapmv(&["bind", s(&f.cow), s(&missing)]).fails_with(1, &[s(&missing), "does not exist"]);
    snapmv(&["bind", s(&f.cow), s(&f.cow)]).fails_with(1, &["both the COW device and an origin"]);
}

/// Every field of `list --json`, with its type.
fn check_schema(v: &Value) {
    let top: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut want = vec![
        "chunk_size",
        "chunks_free",
        "chunks_total",
        "chunks_used",
        "status",
        "cleaning",
        "rollback",
        "origins",
    ];
    want.sort();
    let mut got = top.clone();
    got.sort();
    assert_eq!(got, want, "top-level keys");
    assert!(v["chunk_size"].is_u64());
    assert!(v["chunks_total"].as_u64().unwrap() > 0);
    assert!(v["chunks_used"].as_u64().unwrap() <= v["chunks_total"].as_u64().unwrap());
    assert_eq!(v["status"], "valid");
    assert!(v["cleaning"].is_boolean());
    assert!(v["rollback"].is_null() || v["rollback"].is_object());
    for o in v["origins"].as_array().unwrap() {
        let mut k: Vec<&str> = o.as_object().unwrap().keys().map(String::as_str).collect();
        k.sort();
        assert_eq!(
            k,
            [
                "device_error",
                "device_missing",
                "id",
                "path",
                "size",
                "snapshots"
            ]
        );
        assert!(o["id"].is_string() && o["path"].is_string() && o["size"].is_u64());
        assert_eq!(o["device_missing"], !o["device_error"].is_null());
        assert!(o["device_error"].is_null() || o["device_error"].is_string());
        for sn in o["snapshots"].as_array().unwrap() {
            let mut k: Vec<&str> = sn.as_object().unwrap().keys().map(String::as_str).collect();
            k.sort();
            assert_eq!(
                k,
                [
                    "created",
                    "memo",
                    "own_chunks",
                    "parent",
                    "shared_chunks",
                    "tag"
                ]
            );
            assert!(sn["tag"].as_u64().unwrap() >= 1);
            assert!(sn["parent"].is_null() || sn["parent"].is_u64());
            assert!(sn["memo"].is_string() && sn["own_chunks"].is_u64());
            check_rfc3339_now(sn["created"].as_str().unwrap());
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ`, and within a day of now (the CLI passes the wall
/// clock into the engine).
fn check_rfc3339_now(t: &str) {
    let b = t.as_bytes();
    assert_eq!(b.len(), 20, "{t}");
    for (i, c) in b.iter().enumerate() {
        match i {
            4 | 7 => assert_eq!(*c, b'-', "{t}"),
            10 => assert_eq!(*c, b'T', "{t}"),
            13 | 16 => assert_eq!(*c, b':', "{t}"),
            19 => assert_eq!(*c, b'Z', "{t}"),
            _ => assert!(c.is_ascii_digit(), "{t}"),
        }
    }
    let n = |r: std::ops::Range<usize>| t[r].parse::<i64>().unwrap();
    let (y, mo, d) = (n(0..4), n(5..7), n(8..10));
    // Days from civil (Hinnant), to compare with the system clock.
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - secs).abs() < 86_400, "{t} is not near now ({now})");
}

#[test]
fn snapshot_prints_the_tag_alone_and_list_shows_it() {
    let f = Fixture::bound();
    let r = snapmv(&["snapshot", s(&f.cow), "sdb1", "-m", "snap1"]).ok();
    assert_eq!(r.stdout, "1\n");
    assert_eq!(r.stderr, "");
    let r = snapmv(&["snapshot", s(&f.cow), "sdb1", "--of", "1", "-m", "snap2"]).ok();
    assert_eq!(r.stdout, "2\n");
    let r = snapmv(&["snapshot", s(&f.cow), "sdb1", "--memo", "with \"quotes\""]).ok();
    assert_eq!(r.stdout, "3\n");

    let v = f.list_json();
    check_schema(&v);
    assert_eq!(v["chunk_size"], 65536);
    assert_eq!(v["cleaning"], false);
    assert_eq!(v["rollback"], Value::Null);
    let o = &v["origins"][0];
    assert_eq!(o["id"], "sdb1");
    assert_eq!(
        o["path"],
        std::path::absolute(&f.origin).unwrap().to_str().unwrap()
    );
    assert_eq!(o["size"], ORIGIN_SIZE);
    let snaps = o["snapshots"].as_array().unwrap();
    let tags: Vec<u64> = snaps.iter().map(|s| s["tag"].as_u64().unwrap()).collect();
    assert_eq!(tags, [1, 2, 3]);
    assert_eq!(snaps[0]["parent"], Value::Null);
    assert_eq!(snaps[0]["memo"], "snap1");
    assert_eq!(snaps[1]["parent"], 1);
    assert_eq!(snaps[1]["memo"], "snap2");
    assert_eq!(snaps[2]["memo"], "with \"quotes\"");

    // The dms-style table.
    let t = snapmv(&["list", s(&f.cow)]).ok().stdout;
    let canon = std::fs::canonicalize(&f.cow).unwrap();
    for needle in [
        format!("cow-device    : {}", canon.display()),
        "chunk-size    : 65536 bytes (16 page(s))".to_string(),
        "versions      : 4 (1 origin(s), 3 snapshot(s))".to_string(),
        "cow-status    : valid".to_string(),
        "cleaning      : no".to_string(),
        "rollbacking   : no".to_string(),
        "YYYY/MM/DD HH:MM:SS  Tag  Parent  Own  Shared  Memo".to_string(),
    ] {
        assert!(t.contains(&needle), "missing {needle:?} in\n{t}");
    }
    assert!(t.contains("used-chunks   : "), "{t}");
    let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("20")).collect();
    assert_eq!(rows.len(), 4, "{t}");
    let cols = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    assert_eq!(cols(rows[0])[2..], ["0", ".", ".", ".", "\"ORIGIN\""]);
    assert_eq!(cols(rows[1])[2..4], ["1", "."]);
    assert_eq!(cols(rows[1])[6], "\"snap1\"");
    assert_eq!(cols(rows[2])[2..4], ["2", "1"]);
    assert_eq!(cols(rows[2])[6], "\"snap2\"");
    assert!(rows[3].ends_with(r#""with \"quotes\"""#), "{}", rows[3]);
}

#[test]
fn delete_and_unbind() {
    let f = Fixture::bound();
    for _ in 0..3 {
        snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok();
    }
    snapmv(&["delete", s(&f.cow), "sdb1", "2"]).ok();
    let tags = |v: &Value| -> Vec<u64> {
        v["origins"][0]["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["tag"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(tags(&f.list_json()), [1, 3]);
    snapmv(&["delete", s(&f.cow), "sdb1", "2"]).fails_with(1, &["snapshot 2", "sdb1"]);
    snapmv(&["delete", s(&f.cow), "nosuch", "1"]).fails_with(1, &["nosuch"]);
    // Tags are never reused.
    assert_eq!(snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok().stdout, "4\n");
    // Unbind is refused while snapshots exist...
    snapmv(&["unbind", s(&f.cow), "sdb1"]).fails_with(1, &["sdb1", "snapshot"]);
    for t in ["1", "3", "4"] {
        snapmv(&["delete", s(&f.cow), "sdb1", t]).ok();
    }
    // ...and allowed once they are gone.
    snapmv(&["unbind", s(&f.cow), "sdb1"]).ok();
    assert_eq!(f.list_json()["origins"].as_array().unwrap().len(), 0);
    snapmv(&["unbind", s(&f.cow), "sdb1"]).fails_with(1, &["sdb1"]);
}

#[test]
fn bad_arguments_give_clear_errors() {
    let f = Fixture::bound();
    snapmv(&["snapshot", s(&f.cow), "sdb1", "--of", "abc"]).fails_with(2, &["'abc'", "tag"]);
    snapmv(&["delete", s(&f.cow), "sdb1", "0"]).fails_with(2, &["tags start at 1"]);
    snapmv(&["delete", s(&f.cow), "sdb1", "-3"]).expect_code(2);
    snapmv(&["rollback", s(&f.cow), "sdb1", "x1"]).fails_with(2, &["'x1'"]);
    snapmv(&["delete", s(&f.cow), "sdb1", "99"]).fails_with(1, &["99", "sdb1"]);
    snapmv(&["snapshot", s(&f.cow), "sdb1", "--of", "7"]).fails_with(1, &["7", "sdb1"]);
    snapmv(&["rollback", s(&f.cow), "sdb1", "5"]).fails_with(1, &["5", "sdb1"]);
    snapmv(&["snapshot", s(&f.cow), "nosuch"]).fails_with(1, &["nosuch"]);
    snapmv(&["list", s(&f.cow), "--yaml"]).fails_with(2, &["--yaml"]);
    snapmv(&["frobnicate"]).expect_code(2);
    let missing = f.path("missing.img");
    snapmv(&["list", s(&missing)]).fails_with(1, &[s(&missing), "does not exist"]);
    snapmv(&["snapshot", s(&missing), "sdb1"]).fails_with(1, &[s(&missing)]);
    // A file that is not a snapmv store.
    let junk = f.path("junk.img");
    write_file_new(&junk, &pattern(7, 1 << 20));
    snapmv(&["list", s(&junk)]).fails_with(1, &[s(&junk)]);
}

/// `list` and `check` need only the COW device: with an origin's file gone
/// they still report everything, mark the origin, and exit 0. Commands
/// that write (and `serve`) still refuse, naming the origin and its path.
#[test]
fn list_and_check_work_with_an_origin_file_missing() {
    let f = Fixture::bound();
    let data = f.path("data.img");
    sparse(&data, 4 << 20);
    snapmv(&["bind", s(&f.cow), s(&data), "--id", "data"]).ok();
    snapmv(&["snapshot", s(&f.cow), "sdb1", "-m", "s1"]).ok();
    snapmv(&["snapshot", s(&f.cow), "sdb1", "--of", "1", "-m", "s2"]).ok();
    snapmv(&["snapshot", s(&f.cow), "data", "-m", "d1"]).ok();
    let moved = f.path("moved");
    std::fs::rename(&f.origin, &moved).unwrap();

    let r = snapmv(&["list", s(&f.cow)]).ok();
    let t = &r.stdout;
    let mark = format!("device        : missing ({}: ", s(&f.origin));
    assert!(t.contains(&mark), "no {mark:?} in\n{t}");
    assert_eq!(
        t.matches("device        :").count(),
        1,
        "only sdb1 is marked\n{t}"
    );
    assert!(
        t.contains("versions      : 5 (2 origin(s), 3 snapshot(s))"),
        "{t}"
    );
    for memo in ["\"s1\"", "\"s2\"", "\"d1\""] {
        assert!(t.contains(memo), "{memo} not listed\n{t}");
    }
    assert!(
        r.stderr.contains("origin sdb1's device is missing") && r.stderr.contains(s(&f.origin)),
        "{}",
        r.stderr
    );

    let v = f.list_json();
    check_schema(&v);
    let origin = |id: &str| {
        v["origins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["id"] == id)
            .unwrap_or_else(|| panic!("origin {id} not listed: {v}"))
            .clone()
    };
    let (sdb1, other) = (origin("sdb1"), origin("data"));
    assert_eq!(sdb1["device_missing"], true);
    let why = sdb1["device_error"].as_str().unwrap();
    assert!(
        why.contains(s(&f.origin)) && why.contains("No such file"),
        "{why}"
    );
    assert_eq!(sdb1["path"], s(&f.origin));
    let tags: Vec<u64> = sdb1["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["tag"].as_u64().unwrap())
        .collect();
    assert_eq!(tags, [1, 2]);
    assert_eq!(other["device_missing"], false);
    assert_eq!(other["snapshots"][0]["memo"], "d1");

    // check: clean metadata, the missing origin a note, exit 0.
    let r = snapmv(&["check", s(&f.cow)]).ok();
    assert!(r.stdout.contains(": clean ("), "{}", r.stdout);
    let note = format!("note: origin sdb1's device is missing ({}: ", s(&f.origin));
    assert!(r.stdout.contains(&note), "no {note:?} in\n{}", r.stdout);
    let r = snapmv(&["check", s(&f.cow), "--json"]).ok();
    let c: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(c["clean"], true);
    assert_eq!(c["errors"].as_array().unwrap().len(), 0);
    let missing = c["missing_origins"].as_array().unwrap();
    assert_eq!(missing.len(), 1, "{c}");
    assert_eq!(missing[0]["id"], "sdb1");
    assert_eq!(missing[0]["path"], s(&f.origin));
    assert!(missing[0]["error"]
        .as_str()
        .unwrap()
        .contains("No such file"));
    assert_eq!(c["notes"].as_array().unwrap().len(), 1, "{c}");

    // Writing needs every origin: refused, naming the origin and its path,
    // even for the other origin. So does serve (unless --origin points it
    // at the moved file, covered in cli_live).
    let refused = [s(&f.origin), "sdb1"];
    snapmv(&["snapshot", s(&f.cow), "data"]).fails_with(1, &refused);
    snapmv(&["delete", s(&f.cow), "sdb1", "2"]).fails_with(1, &refused);
    let sock = f.path("n.sock");
    snapmv_in(
        Some(f.dir.path()),
        &["serve", s(&f.cow), "--unix", s(&sock)],
    )
    .fails_with(1, &refused);

    // Deleted rather than moved: the same. Back in place: no marks, no notes.
    std::fs::copy(&moved, f.path("kept")).unwrap();
    std::fs::remove_file(&moved).unwrap();
    let r = snapmv(&["list", s(&f.cow)]).ok();
    assert!(r.stdout.contains(&mark), "{}", r.stdout);
    std::fs::rename(f.path("kept"), &f.origin).unwrap();
    let r = snapmv(&["list", s(&f.cow)]).ok();
    assert!(!r.stdout.contains("device        :"), "{}", r.stdout);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let r = snapmv(&["check", s(&f.cow)]).ok();
    assert!(!r.stdout.contains("note:"), "{}", r.stdout);
    let c: Value =
        serde_json::from_str(&snapmv(&["check", s(&f.cow), "--json"]).ok().stdout).unwrap();
    assert_eq!(c["missing_origins"].as_array().unwrap().len(), 0);
    assert_eq!(c["notes"].as_array().unwrap().len(), 0);
    snapmv(&["snapshot", s(&f.cow), "data"]).ok();
}

fn write_file_new(p: &std::path::Path, data: &[u8]) {
    std::fs::write(p, data).unwrap();
}

#[test]
fn check_exit_codes() {
    let f = Fixture::bound();
    for i in 0..3 {
        snapmv(&["snapshot", s(&f.cow), "sdb1", "-m", &format!("s{i}")]).ok();
    }
    let r = snapmv(&["check", s(&f.cow)]).ok();
    assert!(r.stdout.contains("clean"), "{}", r.stdout);
    let r = snapmv(&["check", s(&f.cow), "--json"]).ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["clean"], true);
    assert_eq!(v["errors"].as_array().unwrap().len(), 0);
    assert!(v["pages_checked"].as_u64().unwrap() > 0);

    // Not a snapmv device at all: could not read.
    let junk = f.path("junk.img");
    write_file_new(&junk, &pattern(3, 4 << 20));
    snapmv(&["check", s(&junk)]).fails_with(2, &[s(&junk)]);
    let r = snapmv(&["check", s(&junk), "--json"]).expect_code(2);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["clean"], false);

    // Damage. Flip one byte in the middle of each B+tree or space-map page
    // at its home location (found by its header: type leaf 5 / internal 6 /
    // bitmap 7, and its own block number), each on a fresh copy. A page the
    // journal supersedes may legitimately check clean, but then the store
    // must read exactly as before; the live ones must be reported (exit 1).
    // Nothing may make check fail to run (2) or crash.
    let img = std::fs::read(&f.cow).unwrap();
    let base = snapmv(&["list", s(&f.cow), "--json"]).ok().stdout;
    let copy = f.path("damaged.img");
    let mut detected = 0;
    let mut candidates = 0;
    for (b, page) in img.chunks(4096).enumerate() {
        let kind = u32::from_le_bytes(page[0..4].try_into().unwrap());
        let own = u64::from_le_bytes(page[8..16].try_into().unwrap());
        if !(5..=7).contains(&kind) || own != b as u64 {
            continue;
        }
        candidates += 1;
        let mut d = img.clone();
        d[b * 4096 + 2049] ^= 0x10;
        std::fs::write(&copy, &d).unwrap();
        let r = snapmv(&["check", s(&copy)]);
        match r.code {
            1 => {
                detected += 1;
                assert!(r.stdout.contains("problem"), "{}", r.stdout);
                let r = snapmv(&["check", s(&copy), "--json"]).expect_code(1);
                let v: Value = serde_json::from_str(&r.stdout).unwrap();
                assert_eq!(v["clean"], false);
                assert!(!v["errors"].as_array().unwrap().is_empty());
            }
            0 => {
                let l = snapmv(&["list", s(&copy), "--json"]).ok().stdout;
                assert_eq!(
                    l, base,
                    "flip in block {b} checked clean but changed the store"
                );
            }
            c => panic!(
                "flip in block {b}: check exit {c}\nstdout: {}\nstderr: {}",
                r.stdout, r.stderr
            ),
        }
    }
    assert!(candidates >= 3, "found only {candidates} metadata pages");
    assert!(
        detected >= 2,
        "only {detected} of {candidates} flips detected"
    );
}

/// Hold the lock the way another process would and see every command
/// refused with the path named, instead of opening the device twice.
#[test]
fn exclusive_lock_refuses_a_second_opener() {
    let f = Fixture::bound();
    let held = std::fs::File::open(&f.cow).unwrap();
    // SAFETY: flock on a descriptor owned by this test.
    let rc = unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0);
    for args in [
        vec!["snapshot", s(&f.cow), "sdb1"],
        vec!["list", s(&f.cow)],
        vec!["format", s(&f.cow), "--force"],
        vec!["check", s(&f.cow)],
    ] {
        snapmv(&args).fails_with(1, &[s(&f.cow), "locked by another process"]);
    }
    drop(held);
    snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok();

    // A shared hold (another `list`) lets readers in but keeps writers out.
    let held = std::fs::File::open(&f.cow).unwrap();
    // SAFETY: as above.
    let rc = unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    assert_eq!(rc, 0);
    snapmv(&["list", s(&f.cow)]).ok();
    snapmv(&["delete", s(&f.cow), "sdb1", "1"]).fails_with(1, &["locked"]);
}

/// `diff` offline: versions that read the same chunks give no extents,
/// in both forms; tags are taken as `snapshot` and `delete` take them, plus
/// `origin`; errors name what is wrong. It needs only the COW device.
#[test]
fn diff_offline() {
    let f = Fixture::bound();
    snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok();
    snapmv(&["snapshot", s(&f.cow), "sdb1", "--of", "1"]).ok();
    let r = snapmv(&["diff", s(&f.cow), "sdb1", "1", "--json"]).ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        ["bytes", "chunk_size", "extents", "from", "origin", "to"]
    );
    assert_eq!(
        v,
        serde_json::json!({"origin": "sdb1", "from": 1, "to": "origin",
            "chunk_size": 65536, "extents": [], "bytes": 0})
    );
    let v: Value = serde_json::from_str(
        &snapmv(&["diff", s(&f.cow), "sdb1", "origin", "2", "--json"])
            .ok()
            .stdout,
    )
    .unwrap();
    assert_eq!((&v["from"], &v["to"]), (&"origin".into(), &2.into()));
    let table = snapmv(&["diff", s(&f.cow), "sdb1", "2", "1"]).ok().stdout;
    assert!(table.starts_with("              OFFSET"), "{table}");
    assert!(
        table.ends_with("total: 0 bytes in 0 extent(s) may differ between sdb1@2 and sdb1@1 (chunk size 65536)\n"),
        "{table}"
    );
    // The origin's device is not needed: diff reads no data.
    std::fs::rename(&f.origin, f.path("moved")).unwrap();
    snapmv(&["diff", s(&f.cow), "sdb1", "1", "2"]).ok();
    std::fs::rename(f.path("moved"), &f.origin).unwrap();
    snapmv(&["diff", s(&f.cow), "sdb1", "9"]).fails_with(1, &["snapshot 9", "sdb1"]);
    snapmv(&["diff", s(&f.cow), "nosuch", "1"]).fails_with(1, &["nosuch"]);
    snapmv(&["diff", s(&f.cow), "sdb1", "0"]).fails_with(2, &["'origin'"]);
    snapmv(&["diff", s(&f.cow), "sdb1", "x"]).fails_with(2, &["not a snapshot tag"]);
    snapmv(&["diff", s(&f.cow), "sdb1"]).fails_with(2, &["FROM"]);
}
