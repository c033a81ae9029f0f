//! `snapmv serve` and live admin: the admin commands reach a running
//! server through its control socket, give the same output as offline, and
//! new snapshots are exported at once. Needs libnbd-bin (nbdinfo, nbdcopy).

mod cli_support;
use cli_support::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

const A: u64 = 0xA1A1_0000_0000_0000;
const B: u64 = 0xB2B2_0000_0000_0000;
const C: u64 = 0xC3C3_0000_0000_0000;

/// Fixture whose origin holds pattern A before it is bound.
fn fixture_with_a() -> Fixture {
    let f = Fixture::new();
    write_file(&f.origin, &pattern(A, ORIGIN_SIZE as usize));
    snapmv(&["format", s(&f.cow)]).ok();
    snapmv(&["bind", s(&f.cow), s(&f.origin)]).ok();
    f
}

fn serve(f: &Fixture, extra: &[&str]) -> Server {
    let nbd = f.path("nbd.sock");
    let mut args = vec![s(&f.cow), "--unix", s(&nbd)];
    args.extend_from_slice(extra);
    Server::start(f.dir.path(), &args, &f.sock(), &f.path("serve.log"))
}

/// Write pattern `seed` over the whole export `name`.
fn nbd_fill(f: &Fixture, name: &str, seed: u64) {
    let src = f.path(&format!("fill-{seed:x}.bin"));
    std::fs::write(&src, pattern(seed, ORIGIN_SIZE as usize)).unwrap();
    nbdcopy(s(&src), &nbd_unix(&f.path("nbd.sock"), name));
}

/// Read the whole export `name`.
fn nbd_read(f: &Fixture, name: &str) -> Vec<u8> {
    let dst = f.path("read.bin");
    let _ = std::fs::remove_file(&dst);
    nbdcopy(&nbd_unix(&f.path("nbd.sock"), name), s(&dst));
    std::fs::read(&dst).unwrap()
}

#[track_caller]
fn assert_pattern(data: &[u8], seed: u64, what: &str) {
    assert_eq!(data.len(), ORIGIN_SIZE as usize, "{what}: size");
    assert!(
        data == pattern(seed, data.len()).as_slice(),
        "{what}: content differs from pattern {seed:#x}"
    );
}

fn tools() -> bool {
    have_tool("nbdinfo") && have_tool("nbdcopy")
}

#[test]
fn live_admin_through_the_control_socket() {
    if !tools() {
        return;
    }
    let f = fixture_with_a();
    let srv = serve(&f, &[]);
    let nbd = f.path("nbd.sock");
    assert_eq!(nbd_list(&nbd_unix(&nbd, "")), ["sdb1"]);

    // Snapshot while serving: the tag alone, and the export is there at once.
    let r = snapmv(&["snapshot", s(&f.cow), "sdb1", "-m", "live1"]).ok();
    assert_eq!(r.stdout, "1\n");
    assert_eq!(nbd_list(&nbd_unix(&nbd, "")), ["sdb1", "sdb1@1"]);
    let r = snapmv(&["snapshot", s(&f.cow), "sdb1", "--of", "1", "-m", "live2"]).ok();
    assert_eq!(r.stdout, "2\n");
    assert_eq!(nbd_list(&nbd_unix(&nbd, "")), ["sdb1", "sdb1@1", "sdb1@2"]);
    // The memo is the export description.
    let info = sh("nbdinfo", &["--json", &nbd_unix(&nbd, "sdb1@2")]);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["exports"][0]["description"], "live2", "{info}");

    // list works live, in both forms.
    let live_json: Value =
        serde_json::from_str(&snapmv(&["list", s(&f.cow), "--json"]).ok().stdout).unwrap();
    let snaps = live_json["origins"][0]["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[1]["parent"], 1);
    assert_eq!(snaps[1]["memo"], "live2");
    let live_table = snapmv(&["list", s(&f.cow)]).ok().stdout;
    assert!(live_table.contains("\"live2\""), "{live_table}");

    // Errors come back as messages and non-zero exits.
    snapmv(&["delete", s(&f.cow), "sdb1", "9"]).fails_with(1, &["9", "sdb1"]);
    snapmv(&["snapshot", s(&f.cow), "nosuch"]).fails_with(1, &["nosuch"]);

    // Commands a server cannot run for us are refused, naming its pid.
    let pid = srv.pid().to_string();
    for args in [
        vec!["format", s(&f.cow), "--force"],
        vec!["unbind", s(&f.cow), "sdb1"],
        vec!["check", s(&f.cow)],
    ] {
        snapmv(&args).fails_with(1, &["in use by a running server", &pid]);
    }
    let other = f.path("other");
    sparse(&other, 1 << 20);
    snapmv(&["bind", s(&f.cow), s(&other)]).fails_with(1, &["in use by a running server", &pid]);
    // A second server on the same device is refused too.
    let r = snapmv_in(
        Some(f.dir.path()),
        &["serve", s(&f.cow), "--unix", s(&f.path("nbd2.sock"))],
    );
    r.fails_with(1, &[s(&f.cow), "in use by a running server", &pid]);

    // Delete live: the export vanishes.
    snapmv(&["delete", s(&f.cow), "sdb1", "2"]).ok();
    assert_eq!(nbd_list(&nbd_unix(&nbd, "")), ["sdb1", "sdb1@1"]);

    // Once the cleaner has caught up, live and offline output are identical,
    // table and JSON alike.
    let t0 = std::time::Instant::now();
    let live_json = loop {
        let v: Value =
            serde_json::from_str(&snapmv(&["list", s(&f.cow), "--json"]).ok().stdout).unwrap();
        if v["cleaning"] == false {
            break v;
        }
        assert!(t0.elapsed().as_secs() < 60, "cleaner never caught up: {v}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let live_table = snapmv(&["list", s(&f.cow)]).ok().stdout;
    assert_eq!(srv.stop(), 0, "serve must exit 0 on SIGTERM");
    assert!(!f.sock().exists(), "control socket left behind");
    assert_eq!(f.list_json(), live_json);
    assert_eq!(snapmv(&["list", s(&f.cow)]).ok().stdout, live_table);
    snapmv(&["check", s(&f.cow)]).ok();
}

/// Write `len` bytes of `byte` at `offset` of export `name`.
fn nbd_pwrite(f: &Fixture, name: &str, offset: u64, len: usize, byte: u8) {
    let code = format!("h.pwrite(bytes([{byte}]) * {len}, {offset})");
    sh(
        "nbdsh",
        &["-u", &nbd_unix(&f.path("nbd.sock"), name), "-c", &code],
    );
}

/// The chunks of `extents` (a `diff --json` array), 64 KiB each.
fn diff_chunks(v: &Value) -> Vec<u64> {
    let mut out = Vec::new();
    for e in v["extents"].as_array().unwrap() {
        let (off, len) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        out.extend(off / 65536..(off + len).div_ceil(65536));
    }
    out
}

/// `diff` live, while the server holds the device: writes to the origin
/// and to snapshots between snapshots show as exactly the chunks written;
/// the chunks listed are the ones whose bytes differ; after the server
/// stops, the offline answer is the same.
#[test]
fn live_diff_lists_the_chunks_written() {
    if !tools() || !have_tool("nbdsh") {
        return;
    }
    let f = fixture_with_a();
    let srv = serve(&f, &[]);
    snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok();
    nbd_pwrite(&f, "sdb1", 10, 100, 1); // chunk 0
    nbd_pwrite(&f, "sdb1", 5 * 65536 - 1, 2, 2); // chunks 4 and 5
    snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok();
    nbd_pwrite(&f, "sdb1", 64 * 65536, 65536 * 3, 3); // chunks 64-66
    snapmv(&["snapshot", s(&f.cow), "sdb1", "--of", "1"]).ok();
    nbd_pwrite(&f, "sdb1@3", 100 * 65536 + 7, 1, 4); // chunk 100 of 3
    let diff = |from: &str, to: &str| -> Value {
        let r = snapmv(&["diff", s(&f.cow), "sdb1", from, to, "--json"]).ok();
        serde_json::from_str(&r.stdout).unwrap()
    };
    let cases = [
        ("1", "2", vec![0, 4, 5]),
        ("2", "origin", vec![64, 65, 66]),
        ("1", "origin", vec![0, 4, 5, 64, 65, 66]),
        ("1", "3", vec![100]),
        ("3", "2", vec![0, 4, 5, 100]),
    ];
    let mut live = Vec::new();
    for (from, to, want) in &cases {
        let v = diff(from, to);
        assert_eq!(diff_chunks(&v), *want, "diff {from} {to}: {v}");
        assert_eq!(v["bytes"], want.len() as u64 * 65536, "{v}");
        live.push(v);
    }
    // What the exports hold agrees, chunk by chunk.
    let (one, origin) = (nbd_read(&f, "sdb1@1"), nbd_read(&f, "sdb1"));
    for c in 0..ORIGIN_SIZE / 65536 {
        let r = (c * 65536) as usize..((c + 1) * 65536) as usize;
        let listed = cases[2].2.contains(&c);
        assert_eq!(one[r.clone()] != origin[r], listed, "chunk {c}");
    }
    assert_eq!(srv.stop(), 0);
    for ((from, to, _), v) in cases.iter().zip(&live) {
        assert_eq!(diff(from, to), *v, "offline diff {from} {to}");
    }
}

/// A snapshot taken live holds exactly what was written before it, is
/// readable at once, and the origin moves on independently.
#[test]
fn live_snapshot_is_usable_at_once() {
    if !tools() {
        return;
    }
    let f = fixture_with_a();
    let _srv = serve(&f, &[]);
    nbd_fill(&f, "sdb1", B);
    let tag = snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok().stdout;
    assert_eq!(tag, "1\n");
    assert_pattern(
        &nbd_read(&f, "sdb1@1"),
        B,
        "snapshot right after it was taken",
    );
    nbd_fill(&f, "sdb1", C);
    assert_pattern(
        &nbd_read(&f, "sdb1@1"),
        B,
        "snapshot after origin overwrite",
    );
    assert_pattern(&nbd_read(&f, "sdb1"), C, "origin");
    // Writes to the snapshot stay in the snapshot.
    nbd_fill(&f, "sdb1@1", A);
    assert_pattern(&nbd_read(&f, "sdb1@1"), A, "snapshot after its own write");
    assert_pattern(&nbd_read(&f, "sdb1"), C, "origin after snapshot write");
    let v: Value =
        serde_json::from_str(&snapmv(&["list", s(&f.cow), "--json"]).ok().stdout).unwrap();
    assert!(v["chunks_used"].as_u64().unwrap() > 0);
}

/// Contract 2 through the CLI: a snapshot taken with `snapmv snapshot`
/// while a client writes the origin block by block, in order, holds exactly
/// a prefix of that write stream: every block is whole, and the blocks
/// before some boundary carry pass P while the rest still carry pass P-1.
#[test]
fn live_snapshot_under_write_load_is_atomic() {
    if !tools() || !have_tool("python3") {
        return;
    }
    let f = fixture_with_a();
    let _srv = serve(&f, &[]);
    let nblocks = ORIGIN_SIZE / 4096;
    let stop = f.path("stop-writer");
    // libnbd's pwrite is synchronous: one write in flight, in block order.
    let writer = r#"
import nbd, os, struct, sys
uri, n, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
h = nbd.NBD()
h.connect_uri(uri)
p = 0
while not os.path.exists(stop):
    p += 1
    for i in range(n):
        h.pwrite(struct.pack('<QQ', p, i) * 256, i * 4096)
h.shutdown()
"#;
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = std::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            writer,
            &nbd_unix(&f.path("nbd.sock"), "sdb1"),
            &nblocks.to_string(),
            s(&stop),
        ])
        .spawn()
        .unwrap();
    // Killed and reaped on every path, a failed assertion included.
    let mut child = Reap(child);
    let mut tags = Vec::new();
    std::thread::sleep(std::time::Duration::from_millis(300));
    for i in 0..6u64 {
        let t = snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok().stdout;
        tags.push(t.trim().to_string());
        std::thread::sleep(std::time::Duration::from_millis(100 + 70 * i));
    }
    std::fs::write(&stop, b"").unwrap();
    let st = child.0.wait().unwrap();
    assert!(st.success(), "writer failed");
    let a = pattern(A, ORIGIN_SIZE as usize);
    let mut saw_writes = false;
    for t in tags {
        let img = nbd_read(&f, &format!("sdb1@{t}"));
        let passes: Vec<u64> = img
            .chunks(4096)
            .enumerate()
            .map(|(i, blk)| {
                if blk == &a[i * 4096..(i + 1) * 4096] {
                    return 0;
                }
                let p = u64::from_le_bytes(blk[0..8].try_into().unwrap());
                let idx = u64::from_le_bytes(blk[8..16].try_into().unwrap());
                assert_eq!(idx, i as u64, "snapshot {t}: block {i} holds block {idx}");
                assert!(
                    blk.chunks(16).all(|c| c == &blk[0..16]),
                    "snapshot {t}: block {i} is torn"
                );
                p
            })
            .collect();
        let top = passes[0];
        let j = passes.iter().take_while(|&&p| p == top).count();
        assert!(
            passes[j..].iter().all(|&p| top > 0 && p == top - 1),
            "snapshot {t} is not a prefix of the write stream: pass {top} up to block {j}, then {:?}",
            &passes[j..(j + 4).min(passes.len())]
        );
        println!("snapshot {t}: pass {top} up to block {j}");
        saw_writes |= top > 0;
    }
    assert!(saw_writes, "the writer never got going");
}

#[test]
fn live_rollback_wait() {
    if !tools() {
        return;
    }
    let f = fixture_with_a();
    let srv = serve(&f, &[]);
    snapmv(&["snapshot", s(&f.cow), "sdb1", "-m", "A"]).ok();
    nbd_fill(&f, "sdb1", B);
    assert_pattern(&nbd_read(&f, "sdb1"), B, "origin before rollback");
    let r = snapmv(&["rollback", s(&f.cow), "sdb1", "1", "--wait"]).ok();
    assert_eq!(r.stdout, "");
    // Done: no rollback in progress, and the origin shows the snapshot.
    let v: Value =
        serde_json::from_str(&snapmv(&["list", s(&f.cow), "--json"]).ok().stdout).unwrap();
    assert_eq!(v["rollback"], Value::Null, "{v}");
    assert_pattern(&nbd_read(&f, "sdb1"), A, "origin after rollback");
    assert_pattern(&nbd_read(&f, "sdb1@1"), A, "snapshot after rollback");
    assert_eq!(srv.stop(), 0);
    // After a clean stop the origin file itself holds the content.
    assert_pattern(
        &std::fs::read(&f.origin).unwrap(),
        A,
        "origin file after stop",
    );
    snapmv(&["check", s(&f.cow)]).ok();
}

#[test]
fn offline_rollback_wait_drives_the_copier() {
    if !tools() {
        return;
    }
    let f = fixture_with_a();
    let srv = serve(&f, &[]);
    snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok();
    nbd_fill(&f, "sdb1", B);
    assert_eq!(srv.stop(), 0);
    assert_pattern(
        &std::fs::read(&f.origin).unwrap(),
        B,
        "origin file before rollback",
    );
    snapmv(&["rollback", s(&f.cow), "sdb1", "1", "--wait"]).ok();
    assert_eq!(f.list_json()["rollback"], Value::Null);
    assert_pattern(
        &std::fs::read(&f.origin).unwrap(),
        A,
        "origin file after rollback",
    );
    snapmv(&["check", s(&f.cow)]).ok();
}

#[test]
fn default_data_dir_on_first_run() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let cow = dir.path().join("snapmv-data/cow.img");
    let sock = {
        // The control socket is next to the COW file, which does not exist
        // yet: derive the path by hand.
        let d = std::fs::canonicalize(dir.path()).unwrap();
        d.join("snapmv-data/cow.img.snapmv.sock")
    };
    let log = dir.path().join("serve.log");
    let srv = Server::start(dir.path(), &["--listen", &listen], &sock, &log);
    assert_eq!(std::fs::metadata(&cow).unwrap().len(), 4 << 30);
    assert_eq!(
        std::fs::metadata(dir.path().join("snapmv-data/origin.img"))
            .unwrap()
            .len(),
        1 << 30
    );
    let uri = format!("nbd://{listen}");
    assert_eq!(nbd_list(&uri), ["origin"]);
    let tag = snapmv_in(
        Some(dir.path()),
        &["snapshot", "snapmv-data/cow.img", "origin"],
    )
    .ok();
    assert_eq!(tag.stdout, "1\n");
    assert_eq!(nbd_list(&uri), ["origin", "origin@1"]);
    assert_eq!(srv.stop(), 0);
    // A second run reuses the store instead of formatting it again.
    let srv = Server::start(dir.path(), &["--listen", &listen], &sock, &log);
    assert_eq!(nbd_list(&uri), ["origin", "origin@1"]);
    assert_eq!(srv.stop(), 0);
}

/// The README's main job exactly: `snapmv serve` with no arguments serves
/// ./snapmv-data on 127.0.0.1:10809, and nbdinfo lists its origin.
#[test]
fn main_job_on_the_default_port() {
    if !tools() {
        return;
    }
    // The port is shared with anything else on the machine; wait for it a
    // while, and skip (fail in CI) if it stays taken.
    let t0 = std::time::Instant::now();
    while std::net::TcpListener::bind("127.0.0.1:10809").is_err() {
        if t0.elapsed().as_secs() > 30 {
            assert!(
                std::env::var("SNAPMV_CI").as_deref() != Ok("1"),
                "127.0.0.1:10809 is taken"
            );
            eprintln!("skipping: 127.0.0.1:10809 is taken");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = std::fs::canonicalize(dir.path())
        .unwrap()
        .join("snapmv-data/cow.img.snapmv.sock");
    let srv = Server::start(dir.path(), &[], &sock, &dir.path().join("serve.log"));
    assert_eq!(nbd_list("nbd://127.0.0.1:10809"), ["origin"]);
    let size = sh("nbdinfo", &["--size", "nbd://127.0.0.1:10809/origin"]);
    assert_eq!(size.trim(), (1u64 << 30).to_string());
    assert_eq!(srv.stop(), 0);
}

#[test]
fn several_cow_devices_in_one_process() {
    if !tools() {
        return;
    }
    let f = Fixture::bound();
    let cow2 = f.path("cow2.img");
    let org2 = f.path("sdc1");
    sparse(&cow2, COW_SIZE);
    sparse(&org2, ORIGIN_SIZE);
    snapmv(&["format", s(&cow2)]).ok();
    snapmv(&["bind", s(&cow2), s(&org2)]).ok();
    let nbd = f.path("nbd.sock");
    let sock2 = {
        let mut p = std::fs::canonicalize(&cow2).unwrap().into_os_string();
        p.push(".snapmv.sock");
        std::path::PathBuf::from(p)
    };
    let srv = Server::start(
        f.dir.path(),
        &["--cow", s(&f.cow), "--cow", s(&cow2), "--unix", s(&nbd)],
        &f.sock(),
        &f.path("serve.log"),
    );
    // Both control sockets are up (the first is what start() waited for).
    assert!(UnixStream::connect(&sock2).is_ok());
    assert_eq!(nbd_list(&nbd_unix(&nbd, "")), ["sdb1", "sdc1"]);
    assert_eq!(snapmv(&["snapshot", s(&cow2), "sdc1"]).ok().stdout, "1\n");
    assert_eq!(snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok().stdout, "1\n");
    // Each device's control socket only knows its own origins.
    snapmv(&["snapshot", s(&cow2), "sdb1"]).fails_with(1, &["sdb1"]);
    assert_eq!(
        nbd_list(&nbd_unix(&nbd, "")),
        ["sdb1", "sdb1@1", "sdc1", "sdc1@1"]
    );
    assert_eq!(srv.stop(), 0);

    // Origin id clash across devices: refused at start, naming both.
    let cow3 = f.path("cow3.img");
    sparse(&cow3, COW_SIZE);
    snapmv(&["format", s(&cow3)]).ok();
    let org3 = f.path("x");
    sparse(&org3, ORIGIN_SIZE);
    snapmv(&["bind", s(&cow3), s(&org3), "--id", "sdb1"]).ok();
    let c1 = std::fs::canonicalize(&f.cow).unwrap();
    let c3 = std::fs::canonicalize(&cow3).unwrap();
    snapmv_in(
        Some(f.dir.path()),
        &[
            "serve",
            "--cow",
            s(&f.cow),
            "--cow",
            s(&cow3),
            "--unix",
            s(&nbd),
        ],
    )
    .fails_with(1, &["sdb1", s(&c1), s(&c3)]);
    // The refused start released both devices.
    snapmv(&["list", s(&f.cow)]).ok();
    snapmv(&["list", s(&cow3)]).ok();
}

#[test]
fn serve_origin_override_and_errors() {
    if !tools() {
        return;
    }
    let f = fixture_with_a();
    // Move the origin; --origin points serve at its new place.
    let moved = f.path("moved");
    std::fs::rename(&f.origin, &moved).unwrap();
    let r = snapmv_in(
        Some(f.dir.path()),
        &["serve", s(&f.cow), "--unix", s(&f.path("n.sock"))],
    );
    r.fails_with(1, &["sdb1", s(&f.origin)]);
    let ov = format!("sdb1={}", s(&moved));
    let srv = serve(&f, &["--origin", &ov]);
    assert_pattern(&nbd_read(&f, "sdb1"), A, "origin served from its new path");
    assert_eq!(srv.stop(), 0);
    // An override for an id nobody has is an error, not silently ignored.
    let r = snapmv_in(
        Some(f.dir.path()),
        &[
            "serve",
            s(&f.cow),
            "--unix",
            s(&f.path("n.sock")),
            "--origin",
            &ov,
            "--origin",
            "zzz=/dev/null",
        ],
    );
    r.fails_with(1, &["zzz"]);
    snapmv(&["serve", s(&f.cow), "--origin", "novalue"]).fails_with(2, &["ID=PATH"]);
    snapmv(&["serve", s(&f.cow), "--listen", "nonsense"]).fails_with(2, &["nonsense"]);
}

/// Garbage on the control socket gets error replies, never a crash, and
/// the server keeps answering.
#[test]
fn control_socket_survives_malformed_requests() {
    if !tools() {
        return;
    }
    let f = fixture_with_a();
    let srv = serve(&f, &[]);
    let ask = |c: &mut UnixStream, r: &mut BufReader<UnixStream>, line: &[u8]| -> Value {
        c.write_all(line).unwrap();
        let mut out = String::new();
        r.read_line(&mut out).unwrap();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    };
    let mut c = UnixStream::connect(f.sock()).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    for bad in [
        &b"not json\n"[..],
        b"{}\n",
        b"{\"op\":\"format\"}\n",
        b"{\"op\":\"delete\",\"origin\":\"sdb1\",\"tag\":-1}\n",
        b"{\"op\":\"snapshot\",\"origin\":5}\n",
        b"\xff\xfe\n",
        b"[1,2,3]\n",
    ] {
        let v = ask(&mut c, &mut r, bad);
        assert_eq!(v["reply"], "error", "{v}");
    }
    let v = ask(&mut c, &mut r, b"{\"op\":\"hello\"}\n");
    assert_eq!(v["reply"], "hello");
    assert_eq!(v["pid"], srv.pid());
    // An oversized line is refused and that connection closed.
    let mut big = vec![b'x'; 200 << 10];
    big.push(b'\n');
    let mut c2 = UnixStream::connect(f.sock()).unwrap();
    let _ = c2.write_all(&big);
    let mut out = String::new();
    let _ = BufReader::new(c2).read_line(&mut out);
    assert!(out.contains("longer than"), "{out:?}");
    // Truncated request then hang-up.
    let mut c3 = UnixStream::connect(f.sock()).unwrap();
    c3.write_all(b"{\"op\":\"sna").unwrap();
    drop(c3);
    // Still serving.
    assert_eq!(snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok().stdout, "1\n");
    assert_eq!(srv.stop(), 0);
}

/// `--read-only` refuses writes to every export; admin still works.
#[test]
fn read_only_serve_refuses_writes() {
    if !tools() {
        return;
    }
    let f = fixture_with_a();
    let _srv = serve(&f, &["--read-only"]);
    let src = f.path("b.bin");
    std::fs::write(&src, pattern(B, ORIGIN_SIZE as usize)).unwrap();
    let o = std::process::Command::new("nbdcopy")
        .args([s(&src), &nbd_unix(&f.path("nbd.sock"), "sdb1")])
        .output()
        .unwrap();
    assert!(!o.status.success(), "write to a read-only export succeeded");
    assert_eq!(snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok().stdout, "1\n");
    assert_pattern(&nbd_read(&f, "sdb1"), A, "origin");
    assert_pattern(&nbd_read(&f, "sdb1@1"), A, "snapshot");
}

/// SIGINT stops the server as cleanly as SIGTERM.
#[test]
fn sigint_shuts_down_cleanly() {
    if !tools() {
        return;
    }
    let f = fixture_with_a();
    let srv = serve(&f, &[]);
    nbd_fill(&f, "sdb1", B);
    assert_eq!(srv.stop_with(libc::SIGINT), 0);
    assert!(!Path::new(&f.sock()).exists());
    assert_pattern(
        &std::fs::read(&f.origin).unwrap(),
        B,
        "origin file after SIGINT",
    );
    snapmv(&["check", s(&f.cow)]).ok();
}

/// `--cache-budget`: a metadata cache of a few pages serves the same data
/// (pages are evicted and read again), and the shutdown log reports the
/// cache's counters.
#[test]
fn serve_with_a_tiny_cache_budget() {
    snapmv(&["serve", "cow.img", "--cache-budget", "lots"]).fails_with(2, &["lots"]);
    if !tools() {
        return;
    }
    let f = fixture_with_a();
    let srv = serve(&f, &["--cache-budget", "16K"]);
    nbd_fill(&f, "sdb1", B);
    assert_eq!(snapmv(&["snapshot", s(&f.cow), "sdb1"]).ok().stdout, "1\n");
    nbd_fill(&f, "sdb1", C);
    assert_pattern(&nbd_read(&f, "sdb1@1"), B, "snapshot, tiny cache");
    assert_pattern(&nbd_read(&f, "sdb1"), C, "origin, tiny cache");
    assert_eq!(srv.stop(), 0);
    let log = std::fs::read_to_string(f.path("serve.log")).unwrap();
    assert!(log.contains("bytes=16384"), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("metadata page cache") && l.contains("evictions="))
        .unwrap_or_else(|| panic!("no cache counters at shutdown:\n{log}"));
    assert!(line.contains("misses="), "{line}");
    snapmv(&["check", s(&f.cow)]).ok();
}

/// SIGTERM with 16 connections busy writing and reading (each a client of
/// the third-party `nbd` crate, over the Unix socket): the server stops
/// promptly (no connection waits on a timer to notice), exits 0, every
/// client sees its connection end after whole replies, and what was written
/// and acknowledged is in the origin and `check` is clean.
#[test]
fn sigterm_with_16_busy_connections_is_clean_and_prompt() {
    use std::io::{Read, Seek, SeekFrom};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let f = fixture_with_a();
    let srv = serve(&f, &[]);
    let nbd_sock = f.path("nbd.sock");
    let started = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..16u64)
        .map(|i| {
            let (path, started, stop) = (nbd_sock.clone(), started.clone(), stop.clone());
            std::thread::spawn(move || -> (u64, Option<(u64, Vec<u8>)>) {
                let mut sock = UnixStream::connect(&path).unwrap();
                let export = nbd::client::handshake(&mut sock, b"sdb1").unwrap();
                let mut c = nbd::client::NbdClient::new(&mut sock, &export);
                started.fetch_add(1, Ordering::SeqCst);
                // Each client owns a 16 KiB slice and rewrites it with a
                // counter: the last acknowledged write must be on disk.
                let base = i * 16384;
                let (mut done, mut last) = (0u64, None);
                while !stop.load(Ordering::Relaxed) {
                    let data = vec![(done % 251) as u8 + 1; 16384];
                    if c.seek(SeekFrom::Start(base)).is_err() || c.write_all(&data).is_err() {
                        break;
                    }
                    last = Some((base, data));
                    let mut back = vec![0u8; 4096];
                    if c.seek(SeekFrom::Start(base)).is_err() || c.read_exact(&mut back).is_err() {
                        break;
                    }
                    done += 1;
                }
                (done, last)
            })
        })
        .collect();
    while started.load(Ordering::SeqCst) < 16 {
        std::thread::yield_now();
    }
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let code = srv.stop();
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    assert_eq!(
        code, 0,
        "serve must exit 0 on SIGTERM with busy connections"
    );
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    let origin = std::fs::read(&f.origin).unwrap();
    for c in clients {
        let (done, last) = c.join().unwrap();
        assert!(done > 0, "every client was served before the stop");
        let (base, data) = last.expect("a client wrote");
        let on_disk = &origin[base as usize..base as usize + data.len()];
        // The last acknowledged write is on disk, unless the next one (sent,
        // its reply cut by the stop) was applied over it.
        let next = (done % 251) as u8 + 1;
        assert!(
            on_disk == data.as_slice() || on_disk.iter().all(|&b| b == next),
            "slice at {base}: neither the last acknowledged write nor the next"
        );
    }
    snapmv(&["check", s(&f.cow)]).ok();
}
