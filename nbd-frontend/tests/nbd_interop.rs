//! Interop: real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh,
//! the `nbd` crate) against the real server over a real engine store.
//! qemu 10 negotiates extended headers; libnbd 1.14 (nbdinfo, nbdcopy,
//! nbdsh) predates them and the `nbd` crate uses OPT_EXPORT_NAME, so those
//! exercise the compact framing.

mod nbd_support;

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use nbd_support::{run, tool, Harness, Opts};
use snapmv_engine::store::ExtentKind;

const T: Duration = Duration::from_secs(60);

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

#[test]
fn qemu_io_patterns_over_origin_and_snapshots() {
    let Some(qemu_io) = tool("qemu-io") else {
        return;
    };
    let h = Harness::new(Opts {
        unix: true,
        ..Opts::default()
    });
    let qio = |export: &str, cmds: &[&str]| {
        let uri = h.uri(export);
        let mut args = vec!["-f", "raw"];
        for c in cmds {
            args.extend_from_slice(&["-c", c]);
        }
        args.push(&uri);
        let out = run(&qemu_io, &args, T);
        assert!(
            out.ok && !out.stdout.contains("fail") && !out.stderr.contains("rror"),
            "qemu-io {export} {cmds:?}\n{out}"
        );
        out
    };
    qio(
        "o",
        &["write -P 0xaa 0 1M", "write -P 0x11 4M 64k", "flush"],
    );
    let s1 = h.snapshot("before bb");
    qio("o", &["write -P 0xbb 0 256k", "write -z 4M 64k"]);
    let snap = format!("o@{s1}");
    qio(
        &snap,
        &[
            "read -P 0xaa 0 1M",
            "read -P 0x11 4M 64k",
            "read -P 0 8M 1M",
        ],
    );
    qio(
        "o",
        &[
            "read -P 0xbb 0 256k",
            "read -P 0xaa 256k 768k",
            "read -P 0 4M 64k",
        ],
    );
    // Writable snapshot; a FUA write; the origin is not touched by it.
    qio(
        &snap,
        &["write -f -P 0xcc 512k 64k", "read -P 0xcc 512k 64k"],
    );
    qio("o", &["read -P 0xaa 512k 64k"]);
    // Unaligned I/O through the same paths.
    qio("o", &["write -P 0x5a 1000 3000", "read -P 0x5a 1000 3000"]);
    // A failed pattern check must be visible to this harness.
    let uri = h.uri("o");
    let bad = run(&qemu_io, &["-f", "raw", "-c", "read -P 0x77 0 4k", &uri], T);
    assert!(bad.stdout.contains("Pattern verification failed"), "{bad}");
    // The same over the Unix socket.
    let sock = h.unix.as_ref().unwrap().display().to_string();
    let unix_uri = format!("nbd+unix:///{snap}?socket={sock}");
    let out = run(
        &qemu_io,
        &["-f", "raw", "-c", "read -P 0xcc 512k 64k", &unix_uri],
        T,
    );
    assert!(out.ok && !out.stdout.contains("fail"), "{out}");
}

#[test]
fn nbdinfo_list_size_flags_and_map() {
    let Some(nbdinfo) = tool("nbdinfo") else {
        return;
    };
    let h = Harness::new(Opts::default());
    let o = h.store.volume("o", None).unwrap();
    o.write(0, &vec![0xAA; 1 << 20], false).unwrap();
    let s1 = h.snapshot("first memo");
    // Origin overwrites copy the old chunks aside; the engine reports such
    // copies as shared (they sit on the spine, inherited by every older
    // snapshot)...
    o.write(0, &vec![0xBB; 256 << 10], false).unwrap();
    // ...and a direct write gives the snapshot a chunk of its own.
    let snap = format!("o@{s1}");
    let sv = h.store.volume("o", Some(s1)).unwrap();
    sv.write(1 << 20, &vec![0xCC; 64 << 10], false).unwrap();

    let base = format!("nbd://{}", h.addr);
    let out = run(&nbdinfo, &["--list", "--json", &base], T);
    assert!(out.ok, "{out}");
    assert!(out.stdout.contains("\"export-name\": \"o\""), "{out}");
    assert!(
        out.stdout.contains(&format!("\"export-name\": \"{snap}\"")),
        "{out}"
    );
    assert!(out.stdout.contains("first memo"), "{out}");

    let out = run(&nbdinfo, &["--json", &h.uri(&snap)], T);
    assert!(out.ok, "{out}");
    let j = &out.stdout;
    for want in [
        "\"export-size\": 16777216",
        "\"can_multi_conn\": true",
        "\"can_flush\": true",
        "\"can_fua\": true",
        "\"can_trim\": true",
        "\"can_zero\": true",
        "\"can_fast_zero\": true",
        "\"is_read_only\": false",
        "\"block_size_preferred\": 4096",
        "\"description\": \"first memo\"",
        "base:allocation",
    ] {
        assert!(j.contains(want), "missing {want}\n{out}");
    }

    // --map tells copied/written ranges (data) from shared ones (hole).
    let out = run(&nbdinfo, &["--map", &h.uri(&snap)], T);
    assert!(out.ok, "{out}");
    let map: Vec<(u64, u64, u32)> = out
        .stdout
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(2)?.parse().ok()?,
            ))
        })
        .collect();
    println!("map of {snap}:\n{}", out.stdout);
    let kind_at = |off: u64| {
        map.iter()
            .find(|(o, l, _)| *o <= off && off < o + l)
            .map(|e| e.2)
            .unwrap_or_else(|| panic!("offset {off} not mapped\n{}", out.stdout))
    };
    assert_eq!(kind_at(1 << 20), 0, "written in the snapshot: data");
    assert_eq!(
        kind_at(512 << 10) & 1,
        1,
        "still shared with the origin: hole"
    );
    assert_eq!(kind_at(8 << 20) & 1, 1, "never written: hole");
    // Beyond those, the map is exactly the engine's extents with the
    // documented flags (Own 0, Shared hole, Zero hole+zero), merged.
    let sv = h.store.volume("o", Some(s1)).unwrap();
    let mut want: Vec<(u64, u64, u32)> = Vec::new();
    for e in sv.block_status(0, 16 << 20).unwrap() {
        let f = match e.kind {
            ExtentKind::Own => 0,
            ExtentKind::Shared => 1,
            ExtentKind::Zero => 3,
        };
        match want.last_mut() {
            Some(last) if last.2 == f && last.0 + last.1 == e.offset => last.1 += e.len,
            _ => want.push((e.offset, e.len, f)),
        }
    }
    assert_eq!(map, want, "nbdinfo --map vs the engine's extents");
    let total: u64 = map.iter().map(|e| e.1).sum();
    assert_eq!(total, 16 << 20, "the map covers the export");
    // The origin owns everything in place.
    let out = run(&nbdinfo, &["--map", &h.uri("o")], T);
    assert!(
        out.ok && out.stdout.lines().all(|l| l.contains("data")),
        "{out}"
    );

    // Unknown export: a clean failure.
    let out = run(&nbdinfo, &[&h.uri("nope")], T);
    assert!(!out.ok, "{out}");
}

fn sha(data: &[u8]) -> u64 {
    // FNV-1a over the bytes: enough to compare two copies.
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn nbdcopy_out_of_and_into_snapshots() {
    let Some(nbdcopy) = tool("nbdcopy") else {
        return;
    };
    let h = Harness::new(Opts::default());
    let size = 16usize << 20;
    let o = h.store.volume("o", None).unwrap();
    let content = pattern(size / 2, 7);
    o.write(0, &content, false).unwrap();
    let s1 = h.snapshot("copy me");
    o.write(0, &vec![0xFF; 4 << 20], false).unwrap();
    let snap = format!("o@{s1}");

    let file = h.dir.path().join("snap.img");
    let fs = file.display().to_string();
    let out = run(&nbdcopy, &["--connections=4", &h.uri(&snap), &fs], T);
    assert!(out.ok, "{out}");
    let copied = std::fs::read(&file).unwrap();
    let mut want = content.clone();
    want.resize(size, 0);
    assert_eq!(copied.len(), size);
    assert_eq!(sha(&copied), sha(&want), "snapshot copy differs");

    // Copy a sparse file into another snapshot: writes plus zeroing.
    let s2 = h.snapshot("target");
    let src = h.dir.path().join("src.img");
    let mut img = vec![0u8; size];
    img[3 << 20..5 << 20].copy_from_slice(&pattern(2 << 20, 99));
    std::fs::write(&src, &img).unwrap();
    let srcs = src.display().to_string();
    let out = run(&nbdcopy, &[&srcs, &h.uri(&format!("o@{s2}"))], T);
    assert!(out.ok, "{out}");
    let back = h.read(&format!("o@{s2}"), 0, size);
    assert_eq!(sha(&back), sha(&img), "copy into the snapshot differs");
    // Isolation: the first snapshot and the origin are unchanged.
    assert_eq!(sha(&h.read(&snap, 0, size)), sha(&want));
    assert_eq!(h.read("o", 0, 4 << 20), vec![0xFF; 4 << 20]);
}

#[test]
fn nbd_crate_client_and_large_requests() {
    let h = Harness::new(Opts {
        origin_size: 160 << 20,
        cow_size: 512 << 20,
        ..Opts::default()
    });
    let mut tcp = nbd_support::connect(h.addr);
    let export = nbd::client::handshake(&mut tcp, b"o").unwrap();
    assert_eq!(export.size, 160 << 20);
    assert!(export.send_flush && export.send_trim && !export.readonly);
    let mut c = nbd::client::NbdClient::new(&mut tcp, &export);
    // 48 MiB and 64 MiB single requests are served.
    for (off, len) in [(0u64, 48usize << 20), (64 << 20, 64 << 20)] {
        let data = pattern(len, (off >> 20) as u8);
        c.seek(SeekFrom::Start(off)).unwrap();
        assert_eq!(c.write(&data).unwrap(), len, "one request");
        c.flush().unwrap();
        let mut back = vec![0u8; len];
        c.seek(SeekFrom::Start(off)).unwrap();
        assert_eq!(c.read(&mut back).unwrap(), len, "one request");
        assert!(back == data, "{len} bytes at {off} read back differently");
    }
    // Over 64 MiB: refused with an error, and the connection goes on.
    let mut big = vec![0u8; (64 << 20) + 4096];
    c.seek(SeekFrom::Start(0)).unwrap();
    assert!(c.read(&mut big).is_err(), "oversized read refused");
    c.seek(SeekFrom::Start(0)).unwrap();
    assert!(c.write(&big).is_err(), "oversized write refused");
    let mut small = [0u8; 4096];
    c.seek(SeekFrom::Start(4096)).unwrap();
    c.read_exact(&mut small).unwrap();
    assert_eq!(&small[..], &pattern(48 << 20, 0)[4096..8192]);
    // Beyond the end.
    c.seek(SeekFrom::Start((160 << 20) - 100)).unwrap();
    assert_eq!(
        c.read(&mut small).unwrap(),
        100,
        "the client clamps at the end"
    );
}

/// Big requests, many in flight (32 MiB each, the most the server
/// advertises, 8 at once: more than a connection's 128 MiB budget holds),
/// every byte compared, through libnbd. nbd_tls runs the same over TLS.
#[test]
fn big_requests_in_flight_every_byte_checked() {
    let Some(nbdsh) = tool("nbdsh") else {
        return;
    };
    let (req, count) = (32 << 20, 8);
    let h = Harness::new(Opts {
        origin_size: (req * count) as u64,
        ..Opts::default()
    });
    let out = nbd_support::big_requests_integrity(&nbdsh, &h.uri("o"), req, count);
    assert!(out.stdout.contains("tls=False"), "{out}");
}

/// Protocol-level negotiation over the real engine, step by step, with
/// libnbd validating every reply.
#[test]
fn nbdsh_negotiation_and_commands() {
    let Some(nbdsh) = tool("nbdsh") else {
        return;
    };
    let h = Harness::new(Opts::default());
    let o = h.store.volume("o", None).unwrap();
    o.write(0, &[0xAB; 65536], false).unwrap();
    let s1 = h.snapshot("memo: before upgrade");
    o.write(0, &[0xCD; 65536], false).unwrap();
    let base = format!("nbd://{}", h.addr);
    let script = format!(
        r#"
h.set_opt_mode(True)
h.set_request_structured_replies(True)
h.set_full_info(True)
h.connect_uri("{base}")
assert h.get_structured_replies_negotiated()
names = []
h.opt_list(lambda n, d: names.append(n) or 0)
assert names == ["o", "o@{s1}"], names
h.set_export_name("o@{s1}")
h.opt_info()
assert h.get_export_description() == "memo: before upgrade"
assert h.get_size() == 16 << 20
assert h.get_canonical_export_name() == "o@{s1}"
ctx = []
h.opt_list_meta_context(lambda c: ctx.append(c) or 0)
assert ctx == ["base:allocation", "qemu:allocation-depth",
               "snapmv:changed-since:origin", "snapmv:changed-since:{s1}"], ctx
h.set_export_name("o@999")
try:
    h.opt_info()
    raise SystemExit("unknown export accepted")
except nbd.Error:
    pass
h.set_export_name("o@{s1}")
h.add_meta_context("base:allocation")
h.opt_go()
assert h.can_meta_context("base:allocation") and h.can_multi_conn()
assert h.pread(65536, 0) == b"\xab" * 65536
def extents():
    ext = []
    h.block_status(1 << 20, 0, lambda m, o, e, err: ext.extend(e) or 0)
    return ext
ext = extents()
assert ext[:2] == [65536, 0], ("the origin's overwrite copied chunk 0 out: data", ext)
assert ext[3] & 1 == 1, ("the rest is still the origin's, shared: hole", ext)
h.pwrite(b"\x42" * 4096, 8192, nbd.CMD_FLAG_FUA)
ext = extents()
assert ext[0] == 65536 and ext[1] == 0, ("the written chunk is its own", ext)
assert ext[3] & 1 == 1, ext
h.zero(4096, 65536 * 3)
h.trim(4096, 65536 * 5)
h.flush()
assert h.pread(4096, 8192) == b"\x42" * 4096
assert h.pread(4096, 65536 * 3) == bytes(4096)
try:
    h.pread(4096, 16 << 20)
    raise SystemExit("read past end accepted")
except nbd.Error as e:
    assert e.errno == "EINVAL", e.errno
h.shutdown()
print("ok")
"#
    );
    let out = run(&nbdsh, &["-c", &script], T);
    assert!(out.ok && out.stdout.contains("ok"), "{out}");
    assert_eq!(h.read("o", 8192, 4), vec![0xCD; 4], "origin untouched");
}

#[test]
fn deleted_snapshot_errors_and_leaves_the_list() {
    let h = Harness::new(Opts::default());
    let s1 = h.snapshot("doomed");
    let name = format!("o@{s1}");
    let mut tcp = nbd_support::connect(h.addr);
    let export = nbd::client::handshake(&mut tcp, name.as_bytes()).unwrap();
    let mut c = nbd::client::NbdClient::new(&mut tcp, &export);
    let mut buf = [0u8; 4096];
    c.read_exact(&mut buf).unwrap();
    h.store.delete("o", s1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    c.seek(SeekFrom::Start(0)).unwrap();
    let err = c.read_exact(&mut buf).unwrap_err();
    assert!(err.to_string().contains("other error"), "ESHUTDOWN: {err}");
    // A new connection cannot open it, and the list no longer has it.
    let mut tcp2 = nbd_support::connect(h.addr);
    assert!(nbd::client::handshake(&mut tcp2, name.as_bytes()).is_err());
    if let Some(nbdinfo) = tool("nbdinfo") {
        let out = run(&nbdinfo, &["--list", &format!("nbd://{}", h.addr)], T);
        assert!(out.ok && !out.stdout.contains(&name), "{out}");
    }
}

#[test]
fn read_only_server_refuses_writes() {
    let Some(qemu_io) = tool("qemu-io") else {
        return;
    };
    let h = Harness::new(Opts {
        read_only: true,
        ..Opts::default()
    });
    let uri = h.uri("o");
    let out = run(
        &qemu_io,
        &["-f", "raw", "-r", "-c", "read -P 0 0 64k", &uri],
        T,
    );
    assert!(out.ok && !out.stdout.contains("fail"), "{out}");
    // nbd crate: the flag is set, and a write gets EPERM.
    let mut tcp = nbd_support::connect(h.addr);
    let export = nbd::client::handshake(&mut tcp, b"o").unwrap();
    assert!(export.readonly);
    let mut c = nbd::client::NbdClient::new(&mut tcp, &export);
    let err = c.write(&[1u8; 512]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    assert_eq!(h.read("o", 0, 512), vec![0; 512]);
}

/// qemu 10's NBD client asks for extended headers first. Its trace shows
/// what it negotiated and every reply header it parsed: a server that
/// sends the wrong reply width is only traced as `nbd_receive_wrong_header`
/// (qemu tolerates it), so the test looks for that too. Data goes both
/// ways above 4 GiB, and BLOCK_STATUS uses 64-bit lengths: one request and
/// one BLOCK_STATUS_EXT descriptor cover the whole 8 GiB origin.
#[test]
fn qemu_negotiates_extended_headers() {
    let (Some(qemu_io), Some(qemu_img)) = (tool("qemu-io"), tool("qemu-img")) else {
        return;
    };
    let size: u64 = 8 << 30;
    let h = Harness::new(Opts {
        origin_size: size,
        ..Opts::default()
    });
    let traced = |prog: &std::path::Path, args: &[&str]| {
        let mut all = vec!["--trace", "nbd_*"];
        all.extend_from_slice(args);
        let out = run(prog, &all, T);
        assert!(
            out.stderr
                .contains("Received option reply 11 (extended headers), type 1 (ack)"),
            "extended headers not negotiated\n{out}"
        );
        assert!(!out.stderr.contains("wrong_header"), "{out}");
        out
    };
    let qio = |export: &str, cmds: &[&str]| {
        let uri = h.uri(export);
        let mut args = vec!["-f", "raw"];
        for c in cmds {
            args.extend_from_slice(&["-c", c]);
        }
        args.push(&uri);
        let out = traced(&qemu_io, &args);
        assert!(out.ok && !out.stdout.contains("fail"), "{cmds:?}\n{out}");
        out
    };
    qio(
        "o",
        &[
            "write -P 0xa5 0 1M",
            "write -P 0x5a 5G 64k",
            "flush",
            "read -P 0x5a 5G 64k",
            "read -P 0 6G 64k",
        ],
    );
    assert_eq!(h.read("o", 5 << 30, 65536), vec![0x5a; 65536]);
    let s1 = h.snapshot("extended");
    let snap = format!("o@{s1}");
    qio(
        &snap,
        &[
            "write -P 0xc3 6G 64k",
            "read -P 0xa5 0 1M",
            "read -P 0x5a 5G 64k",
            "read -P 0xc3 6G 64k",
            "write -z 7G 1M",
            "read -P 0 7G 1M",
        ],
    );
    assert_eq!(h.read(&snap, 6 << 30, 4), vec![0xc3; 4]);
    assert_eq!(h.read("o", 6 << 30, 4), vec![0; 4], "origin untouched");
    // A 5 GiB zeroing in one request (its length needs 64 bits) with
    // "fast zero": refused, as zeroing is not faster than writing here.
    let uri = h.uri(&snap);
    let fast = traced(&qemu_io, &["-f", "raw", "-c", "write -z -n 1G 5G", &uri]);
    assert!(fast.stderr.contains(".len = 5368709120"), "{fast}");
    assert!(fast.stdout.contains("Operation not supported"), "{fast}");

    // The origin owns all of its 8 GiB: one 64-bit request, one
    // BLOCK_STATUS_EXT descriptor, one extent.
    let map = |export: &str| {
        let uri = h.uri(export);
        let args = ["map", "--output=json", "-f", "raw", &uri];
        let out = traced(&qemu_img, &args);
        assert!(out.ok, "{out}");
        let extents: serde_json::Value = serde_json::from_str(&out.stdout).expect("map JSON");
        // (start, length, data, zero)
        let extents: Vec<(u64, u64, bool, bool)> = extents
            .as_array()
            .expect("a list")
            .iter()
            .map(|e| {
                let n = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{k} in {e}"));
                let b = |k: &str| e[k].as_bool().unwrap_or_else(|| panic!("{k} in {e}"));
                (n("start"), n("length"), b("data"), b("zero"))
            })
            .collect();
        (out, extents)
    };
    let (out, extents) = map("o");
    assert_eq!(extents, vec![(0, size, true, false)], "{out}");
    assert!(out.stderr.contains(".len = 8589934592"), "{out}");
    assert!(
        out.stderr.contains("type = 6 (block status (64-bit))")
            && out.stderr.contains("length = 24"),
        "one BLOCK_STATUS_EXT descriptor\n{out}"
    );
    // The snapshot shares everything with the origin (hole) but the chunk
    // written into it at 6 GiB (data) and the 1 MiB zeroed at 7 GiB.
    let (out, extents) = map(&snap);
    println!("map of {snap}:\n{}", out.stdout);
    let data: Vec<(u64, u64)> = extents.iter().filter(|e| e.2).map(|e| (e.0, e.1)).collect();
    assert_eq!(data, vec![(6 << 30, 65536)], "{out}");
    let zero: Vec<(u64, u64)> = extents.iter().filter(|e| e.3).map(|e| (e.0, e.1)).collect();
    assert_eq!(zero, vec![(7 << 30, 1 << 20)], "{out}");
    assert_eq!(extents.iter().map(|e| e.1).sum::<u64>(), size, "{out}");
}

/// Origin "o" with data, snapshot 1, then writes to two chunks (one of
/// them partly), snapshot 2: what the changed-since tests share.
fn two_snapshots(h: &Harness) -> (u64, u64) {
    let o = h.store.volume("o", None).unwrap();
    o.write(0, &vec![0xAA; 1 << 20], false).unwrap();
    let s1 = h.snapshot("one");
    o.write(2 << 20, &vec![0xBB; 64 << 10], false).unwrap();
    o.write((5 << 20) + 100, &[0xCC; 10], false).unwrap();
    let s2 = h.snapshot("two");
    (s1, s2)
}

/// `nbdinfo --map=CONTEXT --json`: (offset, length, type) per line.
fn map_json(out: &str) -> Vec<(u64, u64, u32)> {
    out.lines()
        .filter(|l| l.contains("\"offset\""))
        .map(|l| {
            let num = |key: &str| -> u64 {
                let at = l.find(key).unwrap() + key.len();
                l[at..]
                    .trim_start_matches([':', ' '])
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .unwrap()
            };
            (num("\"offset\""), num("\"length\""), num("\"type\"") as u32)
        })
        .collect()
}

/// nbdinfo (libnbd 1.14) negotiates `snapmv:changed-since:1` and
/// `qemu:allocation-depth` by name, lists every context, and sees exactly
/// the chunks written between the snapshots.
#[test]
fn nbdinfo_maps_changed_since_and_allocation_depth() {
    let Some(nbdinfo) = tool("nbdinfo") else {
        return;
    };
    let h = Harness::new(Opts::default());
    let (s1, s2) = two_snapshots(&h);
    let uri = h.uri(&format!("o@{s2}"));
    let ctx = format!("--map=snapmv:changed-since:{s1}");
    let out = run(&nbdinfo, &[&ctx, "--json", &uri], T);
    assert!(out.ok, "{out}");
    let (m, c) = (1u64 << 20, 64u64 << 10);
    assert_eq!(
        map_json(&out.stdout),
        [
            (0, 2 * m, 0),
            (2 * m, c, 1),
            (2 * m + c, 3 * m - c, 0),
            (5 * m, c, 1),
            (5 * m + c, 11 * m - c, 0)
        ],
        "{out}"
    );
    // The other way round, and against the origin: the same chunks.
    let back = format!("--map=snapmv:changed-since:{s2}");
    let out1 = run(&nbdinfo, &[&back, "--json", &h.uri(&format!("o@{s1}"))], T);
    assert_eq!(map_json(&out1.stdout), map_json(&out.stdout), "{out1}");
    let o = h.store.volume("o", None).unwrap();
    o.write(8 << 20, &[1; 4096], false).unwrap();
    let to_origin = "--map=snapmv:changed-since:origin";
    let out2 = run(&nbdinfo, &[to_origin, "--json", &uri], T);
    assert_eq!(
        map_json(&out2.stdout),
        [(0, 8 * m, 0), (8 * m, c, 1), (8 * m + c, 8 * m - c, 0)],
        "{out2}"
    );
    // Depth counts layers as an image chain does. o@2 wrote 12 MiB itself
    // (1); all else it inherits from the origin (2), read in place or, at
    // 8 MiB where the origin moved on, from the copy of what it held.
    let depth = |uri: &str| {
        let out = run(&nbdinfo, &["--map=qemu:allocation-depth", "--json", uri], T);
        assert!(out.ok, "{out}");
        out
    };
    let s2v = h.store.volume("o", Some(s2)).unwrap();
    s2v.write(12 << 20, &[2; 4096], false).unwrap();
    let out = depth(&uri);
    assert_eq!(
        map_json(&out.stdout),
        [(0, 12 * m, 2), (12 * m, c, 1), (12 * m + c, 4 * m - c, 2)],
        "{out}"
    );
    assert!(
        out.stdout.contains("backing depth 2") && out.stdout.contains("local"),
        "{out}"
    );
    // A snapshot of o@2 is a layer above it: o@2's writes are depth 2
    // there, the origin's data 3, and its own write 1.
    let s3 = h.store.snapshot("o", Some(s2), "three", 0).unwrap();
    let s3v = h.store.volume("o", Some(s3)).unwrap();
    s3v.write(14 << 20, &[3; 4096], false).unwrap();
    let out = depth(&h.uri(&format!("o@{s3}")));
    assert_eq!(
        map_json(&out.stdout),
        [
            (0, 12 * m, 3),
            (12 * m, c, 2),
            (12 * m + c, 2 * m - c, 3),
            (14 * m, c, 1),
            (14 * m + c, 2 * m - c, 3)
        ],
        "{out}"
    );
    assert!(out.stdout.contains("backing depth 3"), "{out}");
    // Every context is listed, newest tag first.
    let out = run(&nbdinfo, &["--content", &uri], T);
    let listed = format!(
        "base:allocation\n\t\tqemu:allocation-depth\n\t\tsnapmv:changed-since:origin\n\t\t\
         snapmv:changed-since:{s3}\n\t\tsnapmv:changed-since:{s2}\n\t\tsnapmv:changed-since:{s1}\n"
    );
    assert!(out.ok && out.stdout.contains(&listed), "{out}");
    // A tag that is no snapshot is not negotiated: nbdinfo says so.
    let out = run(&nbdinfo, &["--map=snapmv:changed-since:99", &uri], T);
    assert!(!out.ok, "{out}");
}

/// A write after negotiation shows in the next BLOCK_STATUS on the same
/// connection (nbdsh, libnbd's Python shell), with three contexts in one
/// reply.
#[test]
fn nbdsh_sees_writes_after_negotiation() {
    let Some(nbdsh) = tool("nbdsh") else {
        return;
    };
    let h = Harness::new(Opts::default());
    let (s1, s2) = two_snapshots(&h);
    let uri = h.uri(&format!("o@{s2}"));
    let script = format!(
        r#"
import nbd
h = nbd.NBD()
for c in ["base:allocation", "snapmv:changed-since:{s1}", "qemu:allocation-depth"]:
    h.add_meta_context(c)
h.connect_uri("{uri}")
for c in ["base:allocation", "snapmv:changed-since:{s1}", "qemu:allocation-depth"]:
    assert h.can_meta_context(c), c
def status(off, n):
    seen = {{}}
    def cb(ctx, o, e, err):
        seen[ctx] = list(e)
        return 0
    h.block_status(n, off, cb)
    return seen
M, C = 1 << 20, 64 << 10
before = status(4 * M, 4 * M)
assert before["snapmv:changed-since:{s1}"] == [M, 0, C, 1, 3 * M - C, 0], before
h.pwrite(b"w" * 512, 6 * M + 1000)
after = status(4 * M, 4 * M)
assert after["snapmv:changed-since:{s1}"] == [M, 0, C, 1, M - C, 0, C, 1, 2 * M - C, 0], after
assert after["qemu:allocation-depth"] == [2 * M, 2, C, 1, 2 * M - C, 2], after
assert after["base:allocation"] == [2 * M, 1, C, 0, 2 * M - C, 1], after
h.shutdown()
print("ok")
"#
    );
    let out = run(&nbdsh, &["-c", &script], T);
    assert!(out.ok && out.stdout.contains("ok"), "{out}");
}

/// qemu 10 asks for the context through its `x-dirty-bitmap` option and
/// reports changed chunks as `"data": false` (a dirty bit sits where
/// base:allocation's hole bit does), over extended headers.
#[test]
fn qemu_img_map_with_x_dirty_bitmap() {
    let Some(qemu_img) = tool("qemu-img") else {
        return;
    };
    let h = Harness::new(Opts::default());
    let (s1, s2) = two_snapshots(&h);
    let opts = format!(
        "driver=nbd,server.type=inet,server.host={},server.port={},export=o@{s2},\
         x-dirty-bitmap=snapmv:changed-since:{s1}",
        h.addr.ip(),
        h.addr.port()
    );
    let out = run(
        &qemu_img,
        &["map", "--output=json", "--image-opts", &opts],
        T,
    );
    assert!(out.ok, "{out}");
    // Changed chunks are the entries without data.
    let changed: Vec<(u64, u64)> = out
        .stdout
        .lines()
        .filter(|l| l.contains("\"data\": false"))
        .map(|l| {
            let num = |key: &str| -> u64 {
                let at = l.find(key).unwrap() + key.len();
                l[at..]
                    .trim_start_matches([':', ' '])
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .unwrap()
            };
            (num("\"start\""), num("\"length\""))
        })
        .collect();
    assert_eq!(changed, [(2 << 20, 64 << 10), (5 << 20, 64 << 10)], "{out}");
}
