//! NBD over TLS with real clients: nbdinfo, nbdcopy and nbdsh (libnbd,
//! GnuTLS) and qemu-io (qemu, GnuTLS), with X.509 certificates and with
//! pre-shared keys, against the real server over a real engine store.
//! Credentials come from `scripts/tls-certs.sh` (certtool), run once per
//! test process.
//!
//! libnbd 1.14 quirk: a PSK username goes in the URI's user part
//! (`nbds://alice@host/export?tls-psk-file=FILE`); the `tls-username`
//! query parameter came later.

mod nbd_support;

use std::path::Path;
use std::time::{Duration, Instant};

use nbd_support::{big_requests_integrity, run, tls_certs, tool, Harness, Opts};
use snapmv_nbd::nbd::{TlsConfig, TlsCredentials, TlsMode};

const T: Duration = Duration::from_secs(60);

fn x509(certs: &Path, mode: TlsMode) -> TlsConfig {
    let creds = TlsCredentials::x509_dir(&certs.join("server")).expect("server credentials");
    TlsConfig::new(mode, Some(creds)).unwrap()
}

fn psk(certs: &Path, mode: TlsMode) -> TlsConfig {
    let creds = TlsCredentials::psk_file(&certs.join("psk/keys.psk")).expect("PSK file");
    TlsConfig::new(mode, Some(creds)).unwrap()
}

/// `nbds://` URI for `export` with client certificates from `client`.
fn cert_uri(h: &Harness, certs: &Path, client: &str, export: &str) -> String {
    format!(
        "nbds://{}/{export}?tls-certificates={}",
        h.addr,
        certs.join(client).display()
    )
}

fn psk_uri(h: &Harness, file: &Path, user: &str, export: &str) -> String {
    format!(
        "nbds://{user}@{}/{export}?tls-psk-file={}",
        h.addr,
        file.display()
    )
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

/// qemu-io over TLS: `creds` is the `--object` for the credentials (id
/// tls0), `cmds` the qemu-io commands.
fn qemu_io_tls(qemu_io: &Path, h: &Harness, creds: &str, export: &str, cmds: &[&str]) -> String {
    let opts = format!(
        "driver=nbd,server.type=inet,server.host={},server.port={},export={export},tls-creds=tls0",
        h.addr.ip(),
        h.addr.port()
    );
    let mut args = vec!["--object", creds, "--image-opts"];
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(&opts);
    let out = run(qemu_io, &args, T);
    assert!(
        out.ok && !out.stdout.contains("fail") && !out.stderr.contains("rror"),
        "qemu-io {cmds:?}\n{out}"
    );
    out.stdout
}

#[test]
fn x509_nbdinfo_nbdcopy_and_qemu_io() {
    let (Some(certs), Some(nbdinfo), Some(nbdcopy), Some(qemu_io)) = (
        tls_certs(),
        tool("nbdinfo"),
        tool("nbdcopy"),
        tool("qemu-io"),
    ) else {
        return;
    };
    let h = Harness::new(Opts {
        unix: true,
        tls: x509(certs, TlsMode::Require),
        ..Opts::default()
    });
    let s1 = h.snapshot("before TLS writes");

    // nbdinfo: the export over TLS, and the list.
    let out = run(&nbdinfo, &[&cert_uri(&h, certs, "alice", "o")], T);
    assert!(out.ok, "{out}");
    assert!(out.stdout.contains("with TLS"), "{out}");
    assert!(out.stdout.contains("export-size: 16777216"), "{out}");
    let list = format!(
        "nbds://{}/?tls-certificates={}",
        h.addr,
        certs.join("bob").display()
    );
    let out = run(&nbdinfo, &["--list", &list], T);
    assert!(out.ok, "{out}");
    assert!(out.stdout.contains("export=\"o\""), "{out}");
    assert!(out.stdout.contains(&format!("export=\"o@{s1}\"")), "{out}");

    // nbdcopy 4 MiB in and out, every byte checked.
    let img = pattern(4 << 20, 7);
    let src = h.dir.path().join("in.img");
    std::fs::write(&src, &img).unwrap();
    let uri = cert_uri(&h, certs, "alice", "o");
    let out = run(&nbdcopy, &[src.to_str().unwrap(), &uri], T);
    assert!(out.ok, "{out}");
    assert!(h.read("o", 0, img.len()) == img, "nbdcopy in: data differs");
    let back = h.dir.path().join("out.img");
    let out = run(&nbdcopy, &[&uri, back.to_str().unwrap()], T);
    assert!(out.ok, "{out}");
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), 16 << 20);
    assert!(got[..img.len()] == img[..], "nbdcopy out: data differs");
    assert!(got[img.len()..].iter().all(|&b| b == 0));
    // The snapshot kept the old content.
    assert_eq!(h.read(&format!("o@{s1}"), 0, 4096), vec![0; 4096]);

    // qemu-io with tls-creds-x509 (qemu negotiates extended headers).
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        certs.join("bob").display()
    );
    qemu_io_tls(
        &qemu_io,
        &h,
        &creds,
        "o",
        &["write -P 0x5a 8M 1M", "read -P 0x5a 8M 1M", "flush"],
    );
    assert_eq!(h.read("o", 8 << 20, 4096), vec![0x5a; 4096]);
    let snap = format!("o@{s1}");
    qemu_io_tls(&qemu_io, &h, &creds, &snap, &["read -P 0 8M 1M"]);

    // Over the Unix socket too (libnbd checks the name "localhost").
    let sock = h.unix.as_ref().unwrap().display().to_string();
    let unix = format!(
        "nbds+unix:///o?socket={sock}&tls-certificates={}",
        certs.join("alice").display()
    );
    let out = run(&nbdinfo, &["--size", &unix], T);
    assert!(out.ok && out.stdout.trim() == "16777216", "{out}");
}

#[test]
fn psk_nbdinfo_and_qemu_io() {
    let (Some(certs), Some(nbdinfo), Some(qemu_io)) =
        (tls_certs(), tool("nbdinfo"), tool("qemu-io"))
    else {
        return;
    };
    let h = Harness::new(Opts {
        tls: psk(certs, TlsMode::Require),
        ..Opts::default()
    });
    let keys = certs.join("psk/keys.psk");
    let out = run(&nbdinfo, &[&psk_uri(&h, &keys, "alice", "o")], T);
    assert!(out.ok && out.stdout.contains("with TLS"), "{out}");
    let creds = format!(
        "tls-creds-psk,id=tls0,dir={},username=bob,endpoint=client",
        certs.join("psk").display()
    );
    qemu_io_tls(
        &qemu_io,
        &h,
        &creds,
        "o",
        &["write -P 0xc3 1M 256k", "read -P 0xc3 1M 256k"],
    );
    assert_eq!(h.read("o", 1 << 20, 4096), vec![0xc3; 4096]);

    // A wrong key, and a user the server does not know: refused.
    let bad = h.dir.path().join("bad.psk");
    std::fs::write(&bad, "alice:00112233445566778899aabbccddeeff\ncarol:0011\n").unwrap();
    for user in ["alice", "carol"] {
        let out = run(&nbdinfo, &["--size", &psk_uri(&h, &bad, user, "o")], T);
        assert!(!out.ok, "{user} with a wrong key got in\n{out}");
    }
}

/// Clients the server must turn away in the TLS handshake, and plain
/// clients against `--tls require`.
#[test]
fn refused_clients() {
    let (Some(certs), Some(nbdinfo)) = (tls_certs(), tool("nbdinfo")) else {
        return;
    };
    let h = Harness::new(Opts {
        tls: x509(certs, TlsMode::Require),
        ..Opts::default()
    });
    for client in ["nocert", "otherca", "expired", "selfsigned"] {
        let out = run(&nbdinfo, &["--size", &cert_uri(&h, certs, client, "o")], T);
        assert!(!out.ok, "{client} got in\n{out}");
        assert!(out.stderr.contains("TLS"), "{client}: {out}");
    }
    // Plain text: nothing but an error; no list either.
    let out = run(&nbdinfo, &["--size", &h.uri("o")], T);
    assert!(!out.ok, "{out}");
    let out = run(&nbdinfo, &["--list", &format!("nbd://{}/", h.addr)], T);
    assert!(!out.ok && !out.stdout.contains("\"o\""), "{out}");
    // And a good client still gets in afterwards.
    let out = run(&nbdinfo, &["--size", &cert_uri(&h, certs, "alice", "o")], T);
    assert!(out.ok, "{out}");
}

/// `--tls on`: plain clients are served as before, TLS clients upgrade.
#[test]
fn tls_on_serves_both() {
    let (Some(certs), Some(nbdinfo)) = (tls_certs(), tool("nbdinfo")) else {
        return;
    };
    let h = Harness::new(Opts {
        tls: x509(certs, TlsMode::On),
        ..Opts::default()
    });
    let out = run(&nbdinfo, &[&h.uri("o")], T);
    assert!(out.ok && out.stdout.contains("without TLS"), "{out}");
    let out = run(&nbdinfo, &[&cert_uri(&h, certs, "alice", "o")], T);
    assert!(out.ok && out.stdout.contains("with TLS"), "{out}");
}

/// The big-request integrity check (32 MiB requests, 8 in flight, every
/// byte compared) over TLS, X.509 and PSK; the plain run is in
/// nbd_interop.
#[test]
fn big_requests_over_tls() {
    let (Some(certs), Some(nbdsh)) = (tls_certs(), tool("nbdsh")) else {
        return;
    };
    let (req, count) = (32 << 20, 8);
    for tls in [x509(certs, TlsMode::Require), psk(certs, TlsMode::Require)] {
        let is_psk = format!("{tls:?}").contains("PSK");
        let h = Harness::new(Opts {
            origin_size: (req * count) as u64,
            tls,
            ..Opts::default()
        });
        let uri = if is_psk {
            psk_uri(&h, &certs.join("psk/keys.psk"), "alice", "o")
        } else {
            cert_uri(&h, certs, "alice", "o")
        };
        let out = big_requests_integrity(&nbdsh, &uri, req, count);
        assert!(out.stdout.contains("tls=True"), "{out}");
    }
}

/// A server stopping with TLS connections open (libnbd clients, idle
/// after a read) returns promptly: every connection thread and its pump
/// end. (nbd/tests.rs cuts a TLS client that never reads its replies.)
#[test]
fn shutdown_with_tls_connections_open() {
    let (Some(certs), Some(_)) = (tls_certs(), tool("nbdsh")) else {
        return;
    };
    let mut h = Harness::new(Opts {
        tls: x509(certs, TlsMode::Require),
        ..Opts::default()
    });
    let uri = cert_uri(&h, certs, "alice", "o");
    let script = format!(
        r#"
import nbd, time
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri("{uri}")
h.pread(4096, 0)
print("connected", flush=True)
time.sleep(60)
"#
    );
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let mut kids: Vec<std::process::Child> = (0..3)
        .map(|_| {
            std::process::Command::new("/usr/bin/python3")
                .args(["-c", &script])
                .env("PATH", &path)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("python3")
        })
        .collect();
    for k in &mut kids {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(k.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "connected");
    }
    let t = Instant::now();
    h.stop();
    println!("stopped in {:?}", t.elapsed());
    for mut k in kids {
        let _ = k.kill();
        let _ = k.wait();
    }
    assert!(
        std::net::TcpStream::connect(h.addr).is_err(),
        "still listening"
    );
}
